"""Reproduce: run dirs, multirun dirs and table specs re-run as saved, from outside the repo, compared cell by cell."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, tiny_overrides

from gain_exp import table as table_tool
from gain_exp.reproduce import main, verdict
from gain_exp.runs import rundir
from gain_exp.runs.rundir import Job, job_command, resolve_override, saved_job, sweeps_dir

SWEEPS = ROOT / "sweeps"


def _tiny(epochs: int) -> list[str]:
    """tiny_overrides with a relative dataset root, so reproduce has a relative path to resolve."""
    return [o for o in tiny_overrides(Path("unused")) if not o.startswith("dataset.root=")] + [
        "dataset.root=shapes",
        f"trainer.epochs={epochs}",
        "dataset.n_train=16",
        "logger=json",
    ]


def _app(args: list[str], cwd: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "gain_exp.run", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.fixture(scope="module")
def originals(tmp_path_factory) -> Path:
    """A finished 2-epoch run (runs/single) and a 2-job joblib multirun (multi/0, multi/1), made with cwd outside
    the repo and relative paths; tests reproduce them from <root>/elsewhere."""
    root = tmp_path_factory.mktemp("originals")
    _app([*_tiny(2), "hydra.run.dir=runs/single"], root)
    _app(
        [
            "-m",
            "--config-dir",
            str(SWEEPS),
            "+launcher=joblib",
            "hydra.launcher.n_jobs=1",
            "seed=0,1",
            *_tiny(1),
            "hydra.sweep.dir=multi",
        ],
        root,
    )
    (root / "elsewhere").mkdir()
    return root


def _summary(path: Path) -> dict:
    return json.loads((path / "summary.json").read_text())


@pytest.mark.slow
def test_a_single_run_reproduces_identically_from_another_directory(originals, monkeypatch, capsys):
    monkeypatch.chdir(originals / "elsewhere")
    assert main(["../runs/single", "--out", "rep"]) == 0
    printed = capsys.readouterr().out
    before, after = _summary(originals / "runs" / "single"), _summary(originals / "elsewhere" / "rep" / "single")
    assert after["final"] == before["final"] and after["epochs_completed"] == 2
    assert after["choices"] == before["choices"] and after["threads"] == before["threads"]
    assert f"dataset.root={originals / 'shapes'}" in after["overrides"]  # relative to where the original ran
    record = json.loads((originals / "elsewhere" / "rep" / "comparison.json").read_text())
    assert record["exit_status"] == 0 and {c["verdict"] for c in record["cells"]} == {"identical"}
    assert (originals / "elsewhere" / "rep" / "comparison.md").read_text() == printed
    assert "| all | test_unbiased/acc |" in printed and "differs" not in printed


@pytest.mark.slow
def test_a_joblib_multirun_reproduces_job_by_job_as_single_runs(originals, monkeypatch, capsys):
    monkeypatch.chdir(originals / "elsewhere")
    assert main(["../multi", "--out", "rep_multi"]) == 0
    assert "0 differ" in capsys.readouterr().out
    for job in ("0", "1"):
        before = _summary(originals / "multi" / job)
        after = _summary(originals / "elsewhere" / "rep_multi" / "multi" / job)
        assert after["final"] == before["final"] and after["seed"] == int(job)
        assert after["choices"] == before["choices"] and after["choices"]["launcher"] == "joblib"
        assert after["hydra"]["job_num"] is None  # hydra.mode=RUN: one job, not a sweep of one
        assert after["hydra"]["config_dirs"] == [str(SWEEPS)]


@pytest.mark.slow
def test_a_table_spec_reproduces_and_a_tampered_committed_number_differs(originals, monkeypatch, capsys):
    monkeypatch.chdir(originals / "elsewhere")
    assert (
        table_tool.main(
            ["../multi", "--rows", "loss", "--metrics", "val/acc", "test_unbiased/acc", "--save-spec", "tiny.yaml"]
        )
        == 0
    )
    spec = yaml.safe_load(Path("tiny.yaml").read_text())
    assert [j["row"] for j in spec["jobs"]] == [{"loss": "gain_ext"}] * 2 and spec["rows"] == ["loss"]
    assert spec["jobs"][0]["config_dirs"] == ["sweeps"] and spec["jobs"][0]["threads"] >= 1  # repo-relative
    assert spec["records"][0]["n"] == 2
    capsys.readouterr()
    assert main(["tiny.yaml", "--out", "rep_spec"]) == 0
    printed = capsys.readouterr().out
    assert "| gain_ext | val/acc |" in printed and "2 of 2 cells identical" in printed
    assert sorted(p.name for p in Path("rep_spec", "multi").iterdir()) == ["0", "1"]

    bump = 0.25 + spec["records"][0]["val/acc std"]  # beyond the seed spread
    spec["records"][0]["val/acc mean"] += bump
    Path("tampered.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    assert main(["tampered.yaml", "--out", "rep_spec"]) == 2  # would overwrite the reproduction
    assert main(["tampered.yaml", "--out", "rep_spec", "--resume"]) == 1  # compares again, runs nothing
    captured = capsys.readouterr()
    assert "kept from" in captured.err and "done in" not in captured.err
    cells = {c["metric"]: c for c in json.loads(Path("rep_spec", "comparison.json").read_text())["cells"]}
    assert cells["val/acc"]["verdict"] == "differs" and cells["test_unbiased/acc"]["verdict"] == "identical"
    assert cells["val/acc"]["diff"] == pytest.approx(-bump)


def test_a_single_job_spec_has_no_spread_so_any_difference_differs(monkeypatch, tmp_path, capsys):
    from test_table import make_run

    monkeypatch.chdir(tmp_path)
    run = make_run(tmp_path / "runs" / "a", ["seed=0"], {"val/acc": 0.5})
    assert table_tool.main([str(run), "--save-spec", "one.yaml"]) == 0
    Path("out", "a").mkdir(parents=True)
    shutil.copytree(run, "out/a", dirs_exist_ok=True)
    summary = json.loads(Path("out/a/summary.json").read_text())
    Path("out/a/summary.json").write_text(json.dumps({**summary, "final": {"val/acc": 0.75}}))
    assert main(["one.yaml", "--out", "out", "--resume"]) == 1
    assert (
        "| all | val/acc | 0.500 (n=1) | 0.750 (n=1) | +0.25 | differs (n=1: no seed spread) |"
        in capsys.readouterr().out
    )


@pytest.mark.slow
def test_dry_run_prints_the_commands_and_runs_nothing(originals, monkeypatch, capsys):
    monkeypatch.chdir(originals / "elsewhere")
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):  # printed only where they differ from the caller's shell
        monkeypatch.delenv(name, raising=False)
    threads = _summary(originals / "multi" / "0")["threads"]
    assert main(["../multi", "--out", "dry", "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and not Path("dry").exists()
    for job, line in enumerate(lines):
        assert line.startswith(f"OMP_NUM_THREADS={threads} MKL_NUM_THREADS={threads} ")
        assert f"-m gain_exp.run --config-dir {SWEEPS} +launcher=joblib seed={job} " in line
        assert line.endswith(f"hydra.mode=RUN hydra.run.dir={originals / 'elsewhere' / 'dry' / 'multi' / str(job)}")


@pytest.mark.parametrize(
    "args,phrase",
    [
        (["nowhere"], "SOURCE nowhere does not exist (relative to "),
        (["notes.txt"], "SOURCE notes.txt is a file but not a table spec (.yaml)"),
        (["bad.yaml"], "bad.yaml is not a table spec (kind: gain_exp.table/1 with a list of jobs)"),
        (["empty"], "empty holds no runs (no summary.json at or below it)"),
    ],
)
def test_user_errors_are_one_sentence_with_exit_2(tmp_path, monkeypatch, capsys, args, phrase):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "bad.yaml").write_text("jobs: 3\n")
    (tmp_path / "empty").mkdir()
    assert main(args) == 2
    captured = capsys.readouterr()
    assert phrase in captured.err and len(captured.err.strip().splitlines()) == 1 and captured.out == ""


@pytest.mark.slow
def test_an_old_run_without_provenance_keys_is_read_from_hydra_yaml(originals, tmp_path):
    old = tmp_path / "moved" / "1"  # its sweep dir was renamed since: named by where it is now
    shutil.copytree(originals / "multi" / "1", old)
    summary = _summary(old)
    for key in ("overrides", "choices", "hydra", "git"):
        summary.pop(key)
    (old / "summary.json").write_text(json.dumps(summary))
    job = saved_job(old)
    assert job.overrides == _summary(originals / "multi" / "1")["overrides"]
    assert job.config_dirs == [str(SWEEPS)] and job.cwd == str(originals) and job.name == "moved/1"
    argv, _ = job_command(old, tmp_path / "again", ["trainer.epochs=1"])
    assert argv[-3:] == ["trainer.epochs=1", "hydra.mode=RUN", f"hydra.run.dir={tmp_path / 'again'}"]
    assert rundir.read_run(old).value("loss") == "gain_ext"  # a group choice, not the loss config as JSON


def test_relative_paths_in_overrides_resolve_against_the_original_cwd(tmp_path):
    (tmp_path / "weights.pth").write_text("")
    assert resolve_override("dataset.root=data/shapes", tmp_path) == f"dataset.root={tmp_path}/data/shapes"
    weights = resolve_override("backbone.weights_file=weights.pth", tmp_path)  # no slash, but an existing file
    assert weights == f"backbone.weights_file={tmp_path}/weights.pth"
    for kept in (
        "trainer.resume=auto",
        "+setting=gain_ext_5pct",
        "loss=gain",
        "dataset.root=/abs/shapes",
        "backbone.name=hf-hub:timm/resnet18",
        "gain.sigma=0.5",
        "hydra.run.dir=out/x",
    ):
        assert resolve_override(kept, tmp_path) == kept
    assert resolve_override("dataset.root=data/shapes", None) == "dataset.root=data/shapes"


def test_a_config_dir_that_is_gone_falls_back_to_the_package_sweeps(tmp_path):
    job = Job("x", ["seed=0"], config_dirs=[str(tmp_path / "moved" / "sweeps")], threads=3)
    argv, env = job.command(tmp_path / "dest")
    assert argv[argv.index("--config-dir") + 1] == str(sweeps_dir()) == str(SWEEPS)
    assert env["OMP_NUM_THREADS"] == env["MKL_NUM_THREADS"] == "3"
    assert env["PYTHONPATH"].split(os.pathsep)[0] == str(rundir.package_root())


@pytest.mark.parametrize(
    "original,again,expected",
    [
        ((0.5, 0.1, 3), (0.5, 0.1, 3), "identical"),
        ((0.5, 0.1, 3), (0.5 + 1e-12, 0.1, 3), "identical"),
        ((0.5, 0.1, 3), (0.58, 0.1, 3), "within spread"),
        ((0.5, 0.1, 3), (0.65, 0.1, 3), "differs"),
        ((0.5, None, 1), (0.51, None, 1), "differs (n=1: no seed spread)"),
        ((0.5, 0.1, 3), (0.5, 0.0, 2), "differs"),  # a job failed: not the same cell
    ],
)
def test_verdicts(original, again, expected):
    assert verdict(original, again)[1] == expected


def test_reproduce_labels_every_rerun_for_wandb(tmp_path, monkeypatch):
    from gain_exp import reproduce as tool

    seen = []

    class FakePopen:
        pid = -1

        def __init__(self, argv, env, **kwargs):
            seen.append(env.get("GAIN_EXP_REPRODUCING"))

        def wait(self):
            return 1

    monkeypatch.setattr(tool.subprocess, "Popen", FakePopen)
    jobs = [Job(name=f"sweep/{i}", overrides=["seed=0"]) for i in range(2)]
    assert tool.run_jobs(jobs, tmp_path, label="readme_shapes") == [None, None]
    assert seen == ["readme_shapes", "readme_shapes"]


@pytest.mark.parametrize("name", ["../escape", "/tmp/elsewhere", "sweep/../../up", ""])
def test_a_spec_job_name_cannot_write_outside_out(tmp_path, monkeypatch, capsys, name):
    spec = {
        "kind": "gain_exp.table/1",
        "rows": [],
        "metrics": ["val/acc"],
        "jobs": [{"name": name, "overrides": ["seed=0"], "row": {}, "final": {"val/acc": 0.5}}],
    }
    (tmp_path / "evil.yaml").write_text(yaml.safe_dump(spec))
    monkeypatch.chdir(tmp_path)
    assert main(["evil.yaml", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: job name {name!r} is not a folder below the output root") and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evil.yaml"]  # nothing written, inside or out
