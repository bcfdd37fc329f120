"""The table tool: run discovery, seed grouping, mean ± std, Markdown/CSV, notes and one-sentence errors."""

from __future__ import annotations

import csv
import io
import json
import shutil
import statistics
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, tiny_overrides

from gain_exp import run as app
from gain_exp.runs.rundir import find_runs, read_run
from gain_exp.runs.tables import build_table, completed_runs
from gain_exp.table import main


def make_run(
    path: Path,
    overrides: list[str],
    final: dict,
    status: str = "completed",
    choices: dict | None = None,
    config: dict | None = None,
) -> Path:
    """A run directory as the app writes it: summary.json and the .hydra files the table reads."""
    (path / ".hydra").mkdir(parents=True)
    summary = {
        "status": status,
        "final": final,
        "choices": choices or {"loss": "gain_ext"},
        "overrides": overrides,
        "seed": 0,
        "best": {},
    }
    (path / "summary.json").write_text(json.dumps(summary))
    (path / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (path / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config or {"gain": {"sigma": 0.5}}))
    return path


@pytest.mark.slow
def test_real_multirun_table_matches_the_runs_summaries(tmp_path, hydra_sweep_runner, hydra_restore_singletons, capsys):
    sweep_dir = tmp_path / "sweep"
    overrides = [
        f"hydra.searchpath=[file://{ROOT / 'sweeps'}]",
        "+setting=baseline,gain_ext_5pct",
        "seed=0,1",
        *tiny_overrides(tmp_path),
        "trainer.epochs=1",
        "dataset.n_train=16",
        "logger=json",
    ]
    runner = hydra_sweep_runner(
        calling_file=str(ROOT / "gain_exp" / "run.py"),
        calling_module=None,
        task_function=app.task,
        config_path="../conf",
        config_name="config",
        overrides=overrides,
        temp_dir=sweep_dir,
    )
    with runner:  # the runner deletes its sweep dir on exit
        md, out_csv = tmp_path / "t.md", tmp_path / "t.csv"
        capsys.readouterr()  # the jobs' own output
        assert main([str(sweep_dir), "--md", str(md), "--csv", str(out_csv)]) == 0
        printed = capsys.readouterr().out
        summaries = [json.loads((sweep_dir / str(i) / "summary.json").read_text()) for i in range(4)]

    lines = printed.splitlines()
    assert lines[0].startswith("| setting | n | test_biased/acc | test_unbiased/acc |") and md.read_text() == printed
    by_setting: dict[str, list[dict]] = {}
    for s in summaries:
        by_setting.setdefault(next(o.split("=")[1] for o in s["overrides"] if o.startswith("+setting=")), []).append(s)
    rows = {r["setting"]: r for r in csv.DictReader(io.StringIO(out_csv.read_text()))}
    assert list(rows) == ["baseline", "gain_ext_5pct"]
    for setting, runs in by_setting.items():
        values = [r["final"]["test_unbiased/acc"] for r in runs]
        assert int(rows[setting]["n"]) == 2 == len(values)
        assert float(rows[setting]["test_unbiased/acc mean"]) == pytest.approx(statistics.fmean(values))
        assert float(rows[setting]["test_unbiased/acc std"]) == pytest.approx(statistics.stdev(values))
        assert f"| {setting} | 2 | " in printed


def test_seeds_group_into_mean_std_n_and_unfinished_runs_are_skipped_with_a_note(tmp_path, capsys):
    for i, (loss, seed, acc) in enumerate(
        [("baseline", 0, 0.5), ("baseline", 1, 0.7), ("gain", 0, 0.8), ("gain", 1, 0.9), ("gain", 2, 1.0)]
    ):
        make_run(
            tmp_path / "m" / str(i),
            [f"loss={loss}", f"seed={seed}", "trainer.epochs=3"],
            {"test_unbiased/acc": acc, "val/acc": acc},
        )
    make_run(tmp_path / "m" / "5", ["loss=gain", "seed=3", "trainer.epochs=3"], {"val/acc": 0.0}, status="interrupted")
    assert main([str(tmp_path / "m")]) == 0
    out, err = capsys.readouterr()
    assert out.splitlines() == [
        "| loss | n | test_unbiased/acc |",
        "|---|---|---|",
        "| baseline | 2 | 0.600 ± 0.141 |",
        "| gain | 3 | 0.900 ± 0.100 |",
    ]
    assert f"skipped {tmp_path / 'm' / '5'}: status=interrupted" in err


def test_rows_fall_back_to_group_choices_and_config_values(tmp_path):
    a = make_run(
        tmp_path / "a", ["seed=0"], {"val/acc": 0.4}, choices={"loss": "gain_ext"}, config={"gain": {"sigma": 0.5}}
    )
    b = make_run(
        tmp_path / "b",
        ["loss=gain", "gain.sigma=0.3"],
        {"val/acc": 0.6},
        choices={"loss": "gain"},
        config={"gain": {"sigma": 0.3}},
    )
    runs = [read_run(p) for p in find_runs([a, b])]
    table = build_table(runs)
    assert table.row_keys == ["loss", "gain.sigma"] and table.metrics == ["val/acc"]  # no test split: val
    assert [row.values for row in table.rows] == [("gain_ext", "0.5"), ("gain", "0.3")]
    assert build_table(runs, rows=["gain.omega"]).rows[0].values == ("-",)


def test_optuna_sweep_dirs_are_found_without_multirun_yaml_and_the_best_trial_is_noted(tmp_path, capsys):
    sweep = tmp_path / "optuna"
    for i, sigma in enumerate([0.31234567891, 0.6]):
        make_run(sweep / str(i), [f"gain.sigma={sigma}", "+sweep=optuna"], {"val/acc": 0.5 + i / 10})
    (sweep / "optimization_results.yaml").write_text(
        yaml.safe_dump({"name": "optuna", "best_params": {"gain.sigma": 0.6}, "best_value": 0.6})
    )
    assert main([str(sweep), "--metrics", "val/acc"]) == 0
    out, err = capsys.readouterr()
    assert "| 0.3123 | 1 | 0.500 |" in out and "| 0.6 | 1 | 0.600 |" in out
    assert "Optuna best" in err and "gain.sigma=0.6" in err


@pytest.mark.parametrize(
    "setup,args,phrase",
    [
        ("none", ["missing"], "missing does not exist; pass a multirun directory"),
        ("empty", ["empty"], "empty holds no runs (no summary.json at or below it)"),
        ("interrupted", ["m"], "no completed runs under"),
        (
            "runs",
            ["m", "--metrics", "val/acc_top"],
            "--metrics val/acc_top is in no run's summary.json final metrics; did you mean val/acc",
        ),
    ],
)
def test_bad_input_is_one_sentence_on_stderr(tmp_path, monkeypatch, capsys, setup, args, phrase):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty").mkdir()
    if setup in ("interrupted", "runs"):
        make_run(
            tmp_path / "m" / "0",
            ["seed=0"],
            {"val/acc": 0.5},
            status="interrupted" if setup == "interrupted" else "completed",
        )
    assert main(args) == 2
    err = capsys.readouterr().err
    assert phrase in err and "Traceback" not in err


def test_wandb_flag_logs_the_table_offline(tmp_path, monkeypatch, capsys):
    from wandb_offline import offline_runs

    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_CONFIG_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb_home" / var.lower()))
    monkeypatch.setenv("WANDB_MODE", "offline")
    for i in range(2):
        make_run(tmp_path / "sweep" / str(i), [f"loss={['gain', 'baseline'][i]}"], {"val/acc": 0.5})
    assert main([str(tmp_path / "sweep"), "--wandb"]) == 0
    assert "wandb sync" in capsys.readouterr().out
    [run] = offline_runs(tmp_path / "sweep" / "wandb")
    assert run.group == "sweep" and run.job_type == "table" and "results/nrows" in run.history_keys()


def _spec_runs(root: Path) -> None:
    """Two losses x two seeds; the gain runs are older (no choices in summary.json, only .hydra/hydra.yaml)."""
    for i, (loss, seed, acc) in enumerate(
        [("baseline", 0, 0.5), ("baseline", 1, 0.7), ("gain", 0, 0.8), ("gain", 1, 0.9)]
    ):
        path = make_run(
            root / "m" / str(i),
            [f"seed={seed}"],
            {"val/acc": acc, "test_unbiased/acc": acc / 2},
            choices={"loss": loss},
            config={"loss": {"_target_": "x", "am_weight": float(loss == "gain")}},
        )
        if loss == "gain":
            summary = json.loads((path / "summary.json").read_text())
            del summary["choices"]
            (path / "summary.json").write_text(json.dumps(summary))
            (path / ".hydra" / "hydra.yaml").write_text(
                yaml.safe_dump(
                    {
                        "hydra": {
                            "mode": "MULTIRUN",
                            "sweep": {"dir": str(root / "m")},
                            "runtime": {
                                "choices": {"loss": "gain", "hydra/launcher": "basic"},
                                "cwd": str(root),
                                "config_sources": [
                                    {"path": str(ROOT / "sweeps"), "schema": "file", "provider": "command-line"}
                                ],
                            },
                            "overrides": {
                                "task": [f"seed={seed}"],
                                "hydra": ["hydra.mode=MULTIRUN", "hydra.job.chdir=false"],
                            },
                        }
                    }
                )
            )


def test_a_spec_is_written_beside_the_markdown_and_reprints_the_same_table(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    _spec_runs(tmp_path)
    assert main(["m", "--rows", "loss,loss.am_weight", "--md", "out/table.md"]) == 0
    printed = capsys.readouterr().out
    assert "| gain | 1.0 | 2 | 0.425 ± 0.035 |" in printed  # label from hydra.yaml, not JSON
    spec = yaml.safe_load((tmp_path / "out" / "table.spec.yaml").read_text())
    assert spec["rows"] == ["loss", "loss.am_weight"] and spec["metrics"] == ["test_unbiased/acc"]
    assert spec["sources"] == [str(tmp_path / "m")] and spec["format"] == {"digits": 3}
    assert spec["command"].endswith("m --rows loss,loss.am_weight --md out/table.md")
    gain = spec["jobs"][2]
    assert gain["name"] == "m/2" and gain["row"] == {"loss": "gain", "loss.am_weight": "1.0"}
    assert gain["config_dirs"] == ["sweeps"] and gain["cwd"] == str(tmp_path)  # inside the repo: repo-relative
    assert gain["hydra_overrides"] == ["hydra.job.chdir=false"]  # sweep-only hydra.mode dropped
    assert gain["final"] == {"test_unbiased/acc": 0.4} and gain["choices"] == {"loss": "gain"}
    assert spec["records"][1]["test_unbiased/acc mean"] == pytest.approx(0.425) and spec["records"][1]["n"] == 2

    assert main(["--spec", "out/table.spec.yaml"]) == 0
    again = capsys.readouterr()
    assert again.out == printed and "from its run directories" in again.err
    for run_dir in (tmp_path / "m").iterdir():  # a fresh clone: no outputs, only the committed numbers
        shutil.rmtree(run_dir)
    assert main(["--spec", "out/table.spec.yaml", "--csv", "out/again.csv"]) == 0
    fresh = capsys.readouterr()
    assert fresh.out == printed and "from the numbers it holds" in fresh.err
    rows = list(csv.DictReader(io.StringIO((tmp_path / "out" / "again.csv").read_text())))
    assert [r["loss"] for r in rows] == ["baseline", "gain"] and rows[0]["test_unbiased/acc n"] == "2"


def test_a_spec_among_the_paths_grows_by_new_runs_and_counts_each_job_once(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    _spec_runs(tmp_path)
    assert main(["m", "--rows", "loss", "--save-spec", "s.yaml"]) == 0
    first = capsys.readouterr().out
    assert "| gain | 2 | 0.425 ± 0.035 |" in first
    assert main(["s.yaml", "m", "--rows", "loss"]) == 0  # the spec beside its own runs: each job once
    assert capsys.readouterr().out == first
    shutil.rmtree(tmp_path / "m")  # a later session: those runs are gone, their numbers live in the spec
    make_run(tmp_path / "later" / "0", ["seed=2"], {"test_unbiased/acc": 0.5}, choices={"loss": "gain"})
    assert main(["s.yaml", "later", "--rows", "loss", "--save-spec", "grown.yaml"]) == 0
    grown_out = capsys.readouterr().out
    assert "| baseline | 2 | 0.300 ± 0.071 |" in grown_out and "| gain | 3 | 0.450 ± 0.050 |" in grown_out
    grown = yaml.safe_load((tmp_path / "grown.yaml").read_text())
    assert len(grown["jobs"]) == 5 and grown["sources"] == [str(tmp_path / "m"), str(tmp_path / "later")]
    assert grown["earlier_commands"] == ["python -m gain_exp.table m --rows loss --save-spec s.yaml"]
    assert main(["--spec", "grown.yaml"]) == 0  # the grown table stands alone
    assert capsys.readouterr().out == grown_out
    make_run(tmp_path / "latest" / "0", ["seed=3"], {"test_unbiased/acc": 0.6}, choices={"loss": "gain"})
    assert main(["grown.yaml", "latest", "--rows", "loss", "--save-spec", "grown.yaml"]) == 0  # grown in place
    capsys.readouterr()
    regrown = yaml.safe_load((tmp_path / "grown.yaml").read_text())  # still says where every job came from
    assert regrown["sources"] == [str(tmp_path / d) for d in ("m", "later", "latest")] and len(regrown["jobs"]) == 6
    assert regrown["earlier_commands"] == [*grown["earlier_commands"], grown["command"]]
    make_run(tmp_path / "new_loss" / "0", ["seed=0"], {"test_unbiased/acc": 0.1}, choices={"loss": "energy"})
    assert main(["grown.yaml", "new_loss", "--rows", "loss"]) == 0  # old rows keep their place, new ones follow
    assert [line.split("|")[1].strip() for line in capsys.readouterr().out.splitlines()[2:]] == [
        "baseline",
        "gain",
        "energy",
    ]


def test_where_keeps_the_runs_with_the_given_values_from_run_dirs_and_specs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    _spec_runs(tmp_path)
    assert main(["m", "--rows", "loss", "--save-spec", "s.yaml"]) == 0
    capsys.readouterr()
    make_run(
        tmp_path / "later" / "0", ["seed=0", "gain.sigma=0.3"], {"test_unbiased/acc": 0.5}, choices={"loss": "gain"}
    )
    # the spec's gain jobs (sigma from their config: 0.5) next to a new sigma, the baseline left out
    assert main(["s.yaml", "later", "--where", "loss=gain", "--rows", "gain.sigma"]) == 0
    out = capsys.readouterr().out
    assert "| 0.3 | 1 | 0.500 |" in out and "baseline" not in out and "| - | 2 | 0.425 ± 0.035 |" in out
    assert main(["m", "--where", "loss=gain,baseline", "seed=1", "--rows", "loss"]) == 0
    out = capsys.readouterr().out
    assert "| baseline | 1 | 0.350 |" in out and "| gain | 1 | 0.450 |" in out
    assert main(["m", "--where", "loss=rrr"]) == 2
    err = capsys.readouterr().err
    assert "--where loss=rrr matches none of the 4 runs; their values are loss: baseline, gain." in err
    assert main(["m", "--where", "loss"]) == 2
    assert "--where loss: write KEY=VALUE" in capsys.readouterr().err


@pytest.mark.parametrize(
    "content,args,phrase",
    [
        (None, ["--spec", "gone.yaml"], "table spec gone.yaml does not exist; write one with python -m gain_exp.table"),
        ("a: [", ["--spec", "s.yaml"], "s.yaml is not valid YAML"),
        (
            "kind: gain_exp.table/1\njobs: [{name: a}]\n",
            ["--spec", "s.yaml"],
            "job 0 of s.yaml lacks overrides, row, final",
        ),
        ("kind: x\n", ["--spec", "s.yaml", "m"], "--spec s.yaml and run directories were both given"),
        (None, [], "no runs given; pass multirun or run directories, or --spec"),
        ("kind: x\n", ["s.yaml"], "s.yaml is not a table spec (kind: gain_exp.table/1 with a list of jobs)"),
    ],
)
def test_bad_specs_are_one_sentence_errors(tmp_path, monkeypatch, capsys, content, args, phrase):
    monkeypatch.chdir(tmp_path)
    if content is not None:
        (tmp_path / "s.yaml").write_text(content)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert phrase in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("spec_file", sorted((ROOT / "sweeps" / "tables").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_spec_reprints_its_committed_cells(spec_file):
    from gain_exp.runs.tables import read_spec, table_from_spec

    spec = read_spec(spec_file)
    table, _ = table_from_spec(spec)
    assert table.row_keys == spec["rows"] and table.metrics == spec["metrics"]
    for record, again in zip(spec["records"], table.records(), strict=True):
        assert again == pytest.approx(record)


def test_a_corrupt_summary_is_skipped_with_one_sentence_naming_it(tmp_path, capsys):
    good = make_run(tmp_path / "sweep" / "0", ["seed=0"], {"val/acc": 0.5})
    bad = make_run(tmp_path / "sweep" / "1", ["seed=1"], {"val/acc": 0.7})
    (bad / "summary.json").write_text('{"status": "completed", "fin')  # cut off mid-write
    assert [r.path for r in completed_runs([tmp_path / "sweep"])] == [good]
    err = capsys.readouterr().err
    assert f"warning: skipped {bad}: {bad / 'summary.json'} is not valid JSON" in err and "Traceback" not in err
