"""Damaged run directories (issue 27, reliability round 3): a summary.json, .hydra/*.yaml or ``tested_on`` that is not
as the app writes it (wrong types, invalid YAML, YAML tags, a checkpoint name that is a path) is one sentence naming
the file and the field. evaluate, cams, figure and reproduce print it as their ``error:`` line and exit 2; table
leaves the run out with a warning and prints the others. What the tools do not read (metrics.jsonl) or can do
without (.hydra/ when summary.json holds the overrides) does not stop them.

Every test is fast: the run directories are fabricated (test_table.make_run) and no tool gets as far as loading
weights; an intact fabricated run gets to "no checkpoints/best.ckpt" in the tools that load weights."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Callable

import pytest
from test_table import make_run

from gain_exp import cams, evaluate, figure, reproduce, table
from gain_exp.runs.rundir import read_run

TOOLS = ("table", "evaluate", "cams", "figure", "reproduce")
NO_WEIGHTS = "has no checkpoints/best.ckpt"  # how far an intact fabricated run gets in evaluate, cams and figure


def _summary(run: Path, **fields: Any) -> None:
    """summary.json with ``fields`` replaced."""
    summary = json.loads((run / "summary.json").read_text())
    (run / "summary.json").write_text(json.dumps({**summary, **fields}))


def _write(name: str, text: str) -> Callable[[Path], None]:
    def damage(run: Path) -> None:
        (run / name).write_text(text)

    return damage


def _hydra_yaml(text: str) -> Callable[[Path], None]:
    return _write(".hydra/hydra.yaml", text)


# case: (damage, the file it names, what the sentence says about the field)
DAMAGED: dict[str, tuple[Callable[[Path], None], str, str]] = {
    "summary empty": (_write("summary.json", ""), "summary.json", "is empty"),
    "summary cut off": (_write("summary.json", '{"status": "completed", "fin'), "summary.json", "is not valid JSON"),
    "summary a list": (_write("summary.json", "[1, 2]"), "summary.json", "holds a JSON list, not a run summary"),
    "final a string": (lambda r: _summary(r, final="oops"), "summary.json", "field final is a string"),
    "final holds strings": (
        lambda r: _summary(r, final={"val/acc": "0.5"}),
        "summary.json",
        "field final['val/acc'] is a string (\"0.5\"), not a number",
    ),
    "hydra a string": (lambda r: _summary(r, hydra="oops"), "summary.json", "field hydra is a string"),
    "choices a list": (lambda r: _summary(r, choices=["loss"]), "summary.json", "field choices is a list"),
    "overrides a string": (lambda r: _summary(r, overrides="seed=0"), "summary.json", "field overrides is a string"),
    "a selection a string": (
        lambda r: _summary(r, selections={"last": "oops"}),
        "summary.json",
        "field selections['last'] is a string",
    ),
    "pareto members a string": (
        lambda r: _summary(r, pareto={"metrics": ["val/acc"], "modes": ["max"], "members": "oops"}),
        "summary.json",
        "field pareto.members is a string",
    ),
    "tested_on a string": (lambda r: _summary(r, tested_on="best"), "summary.json", "field tested_on is a string"),
    "tested_on outside the run": (
        lambda r: _summary(r, tested_on={"checkpoint": "../../elsewhere/checkpoints/best"}),
        "summary.json",
        'field tested_on.checkpoint is "../../elsewhere/checkpoints/best", not best, last or the name',
    ),
    "tested_on an absolute path": (
        lambda r: _summary(r, tested_on={"checkpoint": "/etc/passwd"}),
        "summary.json",
        'field tested_on.checkpoint is "/etc/passwd", not best, last or the name',
    ),
    "tested_on not a checkpoint": (
        lambda r: _summary(r, tested_on={"checkpoint": "summary.json"}),
        "summary.json",
        'field tested_on.checkpoint is "summary.json", not best, last or the name',
    ),
    "threads a word": (lambda r: _summary(r, threads="many"), "summary.json", "field threads is a string"),
    "git a string": (lambda r: _summary(r, git="abc123"), "summary.json", "field git is a string"),
    "overrides.yaml not YAML": (
        _write(".hydra/overrides.yaml", "- seed=0\n- [oops\n"),
        ".hydra/overrides.yaml",
        "is not valid YAML",
    ),
    "overrides.yaml with a python tag": (
        _write(".hydra/overrides.yaml", "- !!python/object/apply:os.system ['echo hi']\n"),
        ".hydra/overrides.yaml",
        "holds the YAML tag !!python/object/apply:os.system (line 1), which Hydra never writes",
    ),
    "overrides.yaml a mapping": (
        _write(".hydra/overrides.yaml", "seed: 0\n"),
        ".hydra/overrides.yaml",
        "is a mapping, not a list of strings",
    ),
    "overrides.yaml a nested item": (
        _write(".hydra/overrides.yaml", "- seed=0\n- {a: 1}\n"),
        ".hydra/overrides.yaml",
        "item [1] is a mapping, not a string",
    ),
    "config.yaml not YAML": (
        _write(".hydra/config.yaml", "gain:\n\tsigma: 1\n"),
        ".hydra/config.yaml",
        "not valid YAML",
    ),
    "config.yaml a list": (
        _write(".hydra/config.yaml", "- gain\n"),
        ".hydra/config.yaml",
        "is a list, not a mapping",
    ),
    "hydra.yaml not YAML": (_hydra_yaml("hydra: {runtime: [\n"), ".hydra/hydra.yaml", "is not valid YAML"),
    "hydra.yaml with a tag": (
        _hydra_yaml("hydra: !foo bar\n"),
        ".hydra/hydra.yaml",
        "holds the YAML tag !foo (line 1)",
    ),
    "hydra.yaml runtime a string": (
        _hydra_yaml("hydra:\n  runtime: oops\n"),
        ".hydra/hydra.yaml",
        "field hydra.runtime is a string",
    ),
    "hydra.yaml hydra overrides a string": (
        _hydra_yaml("hydra:\n  overrides:\n    hydra: oops\n    task: [seed=1]\n"),
        ".hydra/hydra.yaml",
        "field hydra.overrides.hydra is a string",
    ),
}

# damage that the tools read past: the intact run's outcome
TOLERATED: dict[str, Callable[[Path], None]] = {
    "intact": lambda run: None,
    "no .hydra folder": lambda run: shutil.rmtree(run / ".hydra"),
    "metrics.jsonl garbage in the middle": _write("metrics.jsonl", '{"step": 1}\n\x00garbage}{\n{"step": 2}\n'),
    "metrics.jsonl last line cut off": _write("metrics.jsonl", '{"step": 1, "train/loss": 0.5}\n{"step": 2, "tr'),
}


def _sweep(tmp_path: Path) -> tuple[Path, Path]:
    """A sweep of two fabricated finished runs (seeds 0 and 1); returns (the intact one, the one to damage)."""
    good = make_run(tmp_path / "sweep" / "0", ["seed=0"], {"val/acc": 0.5})
    return good, make_run(tmp_path / "sweep" / "1", ["seed=1"], {"val/acc": 0.7})


def _run_tool(tool: str, run: Path, tmp_path: Path) -> int:
    if tool == "table":
        return table.main([str(run.parent)])
    if tool == "evaluate":
        return evaluate.main([str(run), "--no-wandb"])
    if tool == "cams":
        return cams.main([str(run), "--split", "val", "--out", str(tmp_path / "cams")])
    if tool == "figure":
        return figure.main([str(run), "--out", str(tmp_path / "figure.png")])
    return reproduce.main([str(run.parent), "--dry-run"])  # the whole sweep: a damaged job is not left out silently


def _one_error_line(err: str) -> str:
    assert err.startswith("error: ") and err.count("\n") == 1 and err.endswith(".\n"), err
    assert "Traceback" not in err
    return err.removeprefix("error: ").strip()


@pytest.mark.parametrize("tool", TOOLS)
@pytest.mark.parametrize("case", DAMAGED)
def test_a_damaged_run_dir_is_one_sentence_naming_the_file_and_field(tmp_path, monkeypatch, capsys, case, tool):
    _good, run = _sweep(tmp_path)
    damage, name, phrase = DAMAGED[case]
    damage(run)
    monkeypatch.chdir(tmp_path)
    code = _run_tool(tool, run, tmp_path)
    out, err = capsys.readouterr()
    if tool == "table":  # the damaged run is left out with a warning, the other one is the table
        assert code == 0, err
        assert "| all | 1 | 0.500 |" in out
        warnings = [line for line in err.splitlines() if line.startswith(f"warning: skipped {run}: ")]
        assert len(warnings) == 1 and "Traceback" not in err, err
        sentence = warnings[0]
    else:
        assert code == 2 and out == "", (out, err)
        sentence = _one_error_line(err)
    assert str(run / name) in sentence and phrase in sentence, sentence
    assert sentence.endswith(
        " restore the file from a copy of the run, or re-run the job and remove this run directory."
    )


@pytest.mark.parametrize("tool", TOOLS)
@pytest.mark.parametrize("case", TOLERATED)
def test_what_the_tools_do_not_need_does_not_stop_them(tmp_path, monkeypatch, capsys, case, tool):
    _good, run = _sweep(tmp_path)
    TOLERATED[case](run)
    monkeypatch.chdir(tmp_path)
    code = _run_tool(tool, run, tmp_path)
    out, err = capsys.readouterr()
    if tool == "table":
        assert code == 0 and "| all | 2 | 0.600 ± 0.141 |" in out and "skipped" not in err, (out, err)
    elif tool == "reproduce":
        assert code == 0 and len(out.splitlines()) == 2 and "seed=1" in out.splitlines()[1], (out, err)
    else:  # as far as a fabricated run goes: its (absent) weights
        assert code == 2 and NO_WEIGHTS in _one_error_line(err), err


@pytest.mark.parametrize("tool", ["evaluate", "cams", "figure"])
def test_tested_on_naming_a_checkpoint_the_run_does_not_have_is_one_sentence(tmp_path, monkeypatch, capsys, tool):
    _good, run = _sweep(tmp_path)
    _summary(run, tested_on={"checkpoint": "pareto_epoch_009", "epoch": 8, "rule": "pareto"})
    monkeypatch.chdir(tmp_path)
    assert _run_tool(tool, run, tmp_path) == 2
    sentence = _one_error_line(capsys.readouterr().err)
    assert sentence.startswith(f"{run / 'summary.json'}: field tested_on.checkpoint names pareto_epoch_009, but ")
    assert str(run / "checkpoints" / "pareto_epoch_009.ckpt") in sentence and "--checkpoint" in sentence


@pytest.mark.parametrize("tool", ["table", "reproduce"])
def test_tested_on_naming_a_missing_checkpoint_does_not_stop_table_or_reproduce(tmp_path, monkeypatch, capsys, tool):
    _good, run = _sweep(tmp_path)
    _summary(run, tested_on={"checkpoint": "pareto_epoch_009", "epoch": 8, "rule": "pareto"})
    monkeypatch.chdir(tmp_path)
    assert _run_tool(tool, run, tmp_path) == 0
    assert "skipped" not in capsys.readouterr().err


def test_a_pareto_tested_run_is_scored_with_its_pareto_checkpoint(tmp_path, monkeypatch, capsys):
    """tested_on names a Pareto member's checkpoint (pareto_epoch_NNN, in checkpoints/): evaluate reads that file."""
    _good, run = _sweep(tmp_path)
    _summary(run, tested_on={"checkpoint": "pareto_epoch_003", "epoch": 2, "rule": "pareto"})
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "pareto_epoch_003.ckpt").write_bytes(b"not a checkpoint")
    monkeypatch.chdir(tmp_path)
    assert evaluate.main([str(run), "--no-wandb"]) == 2
    sentence = _one_error_line(capsys.readouterr().err)
    assert str(run / "checkpoints" / "pareto_epoch_003.ckpt") in sentence and sentence.startswith(
        "the run's tested checkpoint: checkpoint "
    )


def test_the_reader_raises_one_value_error_subclass(tmp_path):
    from gain_exp.runs.rundir import DamagedRun

    _good, run = _sweep(tmp_path)
    _summary(run, final="oops")
    with pytest.raises(DamagedRun) as damaged:
        read_run(run)
    assert isinstance(damaged.value, ValueError) and "\n" not in str(damaged.value)
