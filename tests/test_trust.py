"""Trust boundaries (docs/trust.md): a table spec or a run directory from someone else is checked before anything is
composed from it. A ``_target_`` the project does not use, a hydra callback, a launcher, a foreign config dir: refused
with one sentence (the file, the override or key, --trust), exit 2, nothing written or run; --trust lets it through.

Every test here is fast: the refused payloads are ``os.mkdir`` calls into tmp_path (their absence is the proof that
nothing ran), reproduce's subprocess is replaced by a recorder, and the run directories are fabricated."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import ROOT
from test_table import make_run

from gain_exp import cams, evaluate, figure, reproduce
from gain_exp.run import app_argv
from gain_exp.runs.reload import run_config
from gain_exp.runs.tables import read_spec
from gain_exp.runs.trust import Untrusted, allowed_target, check_overrides, check_run_dir, check_spec

SENTENCE_END = "nothing was composed or run, pass --trust if you trust this source (docs/trust.md)."
NOT_OURS = "a callable that neither the project's config tree (conf/) uses nor the allow-list"


def _target_payload(marker: Path) -> str:
    """An override whose value builds ``os.mkdir(marker)`` when the dataset is instantiated."""
    return f"+dataset.x={{_target_:os.mkdir,_args_:['{marker}']}}"


def _callback_payload(marker: Path) -> str:
    """An override that makes Hydra call ``os.mkdir(marker)`` as a callback when the job starts."""
    return f"+hydra.callbacks.evil={{_target_:os.mkdir,_args_:['{marker}']}}"


def _spec(path: Path, overrides: list[str], **job) -> Path:
    spec = {
        "kind": "gain_exp.table/1",
        "rows": [],
        "metrics": ["val/acc"],
        "jobs": [{"name": "sweep/0", "overrides": overrides, "row": {}, "final": {"val/acc": 0.5}, **job}],
    }
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.fixture
def recorder(monkeypatch) -> list[list[str]]:
    """reproduce's subprocess replaced: the argv of every job it would have run (each 'fails' at once)."""
    calls: list[list[str]] = []

    class FakePopen:  # reproduce starts each job with Popen (in its own session, so a stop reaches it)
        pid = -1

        def __init__(self, argv, **kwargs):
            calls.append(list(argv))

        def wait(self, timeout=None):
            return 1

        def poll(self):
            return 1

    monkeypatch.setattr(reproduce.subprocess, "Popen", FakePopen)
    monkeypatch.setattr(reproduce.subprocess, "run", lambda argv, **kw: pytest.fail(f"a job ran for real: {argv}"))
    return calls


def _one_sentence(err: str, *phrases: str) -> None:
    assert err.startswith("error: ") and err.count("\n") == 1 and err.rstrip().endswith(SENTENCE_END), err
    for phrase in phrases:
        assert phrase in err, err


# ---- table specs (reproduce) ----


@pytest.mark.parametrize(
    "payload,phrase", [(_target_payload, "names _target_ os.mkdir"), (_callback_payload, "sets hydra.callbacks")]
)
def test_a_spec_with_code_in_an_override_is_refused_and_nothing_runs(
    tmp_path, monkeypatch, capsys, recorder, payload, phrase
):
    marker = tmp_path / "pwned"
    spec = _spec(tmp_path / "shared.yaml", ["seed=0", payload(marker)])
    monkeypatch.chdir(tmp_path)
    assert reproduce.main([str(spec), "--out", str(tmp_path / "out")]) == 2
    captured = capsys.readouterr()
    _one_sentence(captured.err, f"{spec} (job sweep/0): override ", phrase)
    assert captured.out == "" and recorder == []
    assert not marker.exists() and not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shared.yaml"]


@pytest.mark.parametrize("payload", [_target_payload, _callback_payload])
def test_trust_lets_the_same_spec_through(tmp_path, monkeypatch, capsys, recorder, payload):
    marker = tmp_path / "pwned"
    spec = _spec(tmp_path / "shared.yaml", ["seed=0", payload(marker)])
    monkeypatch.chdir(tmp_path)
    assert reproduce.main([str(spec), "--out", str(tmp_path / "out"), "--trust"]) == 1  # the recorder's job 'failed'
    assert len(recorder) == 1 and payload(marker) in recorder[0]  # handed to the job as saved
    capsys.readouterr()
    assert reproduce.main([str(spec), "--out", str(tmp_path / "dry"), "--dry-run", "--trust"]) == 0
    assert "os.mkdir" in capsys.readouterr().out and not marker.exists()


def test_a_nested_target_inside_a_dict_value_is_refused(tmp_path, capsys, recorder):
    spec = _spec(tmp_path / "s.yaml", ["+dataset.extra={a:{b:[1,{_target_:os.system,_args_:[touch x]}]}}"])
    assert reproduce.main([str(spec), "--out", str(tmp_path / "out")]) == 2
    _one_sentence(capsys.readouterr().err, "names _target_ os.system", NOT_OURS)
    assert recorder == []


@pytest.mark.parametrize(
    "override,phrase",
    [
        ("trainer.optimizer._target_=os.system", "names _target_ os.system"),
        ("trainer.optimizer=${oc.create:'{_target_: os.system}'}", "names _target_ os.system"),
        ("trainer.optimizer._target_=torch.optim.sgd.torch.save", "names _target_ torch.optim.sgd.torch.save"),
        ("hydra.job.env_set.PYTHONPATH=/tmp/elsewhere", "sets hydra.job.env_set"),
        ("hydra/launcher=joblib", "chooses a Hydra launcher (hydra/launcher)"),
        ("dataset=../../../../elsewhere/evil", "reads a config file outside the config tree"),
        ("hydra.searchpath=[file:///tmp]", "to Hydra's config search path, outside the project's"),
        ("hydra.searchpath=[pkg://their_plugin.conf]", "to Hydra's config search path, outside the project's"),
        ("hydra.job_logging.handlers.h={'()':os.system}", "configures Hydra's logging (hydra.job_logging)"),
        ("hydra.output_subdir=/tmp/elsewhere", "writes Hydra's .hydra files outside the job's run directory"),
    ],
)
def test_each_way_to_run_code_is_one_sentence(override, phrase):
    with pytest.raises(Untrusted) as caught:
        check_overrides([override], "shared.yaml")
    assert str(caught.value).startswith(f"shared.yaml: override {override!r} ") and phrase in str(caught.value)
    assert str(caught.value).endswith(SENTENCE_END) and "\n" not in str(caught.value)


def test_a_config_dir_outside_the_project_is_refused(tmp_path, capsys, recorder):
    (tmp_path / "their_conf" / "setting").mkdir(parents=True)
    spec = _spec(tmp_path / "s.yaml", ["+setting=x"], config_dirs=[str(tmp_path / "their_conf")])
    assert reproduce.main([str(spec), "--out", str(tmp_path / "out")]) == 2
    _one_sentence(capsys.readouterr().err, f"config dir {tmp_path / 'their_conf'} is outside the project's conf/")
    assert recorder == []


def test_a_config_dir_inside_the_saved_run_is_read_and_checked(tmp_path):
    run = make_run(tmp_path / "run", ["+setting=mine"], {})
    summary = json.loads((run / "summary.json").read_text())
    (run / "summary.json").write_text(json.dumps({**summary, "hydra": {"config_dirs": [str(run / "conf")]}}))
    (run / "conf" / "setting").mkdir(parents=True)
    (run / "conf" / "setting" / "mine.yaml").write_text("# @package _global_\ngain:\n  sigma: 0.4\n")
    check_run_dir(run)  # inside the run, and harmless
    (run / "conf" / "setting" / "mine.yaml").write_text("# @package _global_\nx:\n  _target_: os.mkdir\n")
    with pytest.raises(Untrusted, match=r"mine\.yaml: key 'x\._target_' names _target_ os\.mkdir"):
        check_run_dir(run)


def test_the_project_configs_own_targets_pass_without_trust(tmp_path, capsys):
    legit = [
        "loss=gain",
        "+launcher=joblib",
        "trainer.optimizer._target_=torch.optim.SGD",
        "+trainer.optimizer.momentum=0.9",
        "trainer.scheduler._target_=gain_exp.train.schedules.warmup_cosine",
        "+trainer.scheduler.warmup_epochs=2",
        "trainer.optimizer={_target_:torch.optim.AdamW,_partial_:true,lr:0.001}",
        "hydra/job_logging=disabled",
        "dataset.root=/data/shapes",
        "seed=0",
    ]
    spec = _spec(tmp_path / "s.yaml", legit, config_dirs=["sweeps"])
    assert reproduce.main([str(spec), "--out", str(tmp_path / "out"), "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert "trainer.scheduler._target_=gain_exp.train.schedules.warmup_cosine" in printed
    assert f"--config-dir {ROOT / 'sweeps'}" in printed
    assert allowed_target("torch.optim.lr_scheduler.StepLR") and allowed_target("gain_exp.data.shapes.build")
    assert not allowed_target("torch.optim.lr_scheduler.warnings") and not allowed_target("os.mkdir")


def test_every_shipped_spec_passes_the_check():
    specs = sorted((ROOT / "sweeps" / "tables").glob("*.yaml"))
    assert specs
    for path in specs:
        check_spec(read_spec(path), path)


# ---- run directories (reproduce, evaluate, cams, figure, run --config-path) ----


def _shared_run(tmp_path: Path, overrides: list[str], hydra_overrides: list[str] = ()) -> Path:
    """A fabricated run directory (as a colleague's or a W&B download) whose saved overrides carry a payload, with
    an empty checkpoint so that, unchecked, the commands would get as far as building the dataset."""
    run = make_run(tmp_path / "theirs" / "run", overrides, {"val/acc": 0.5})
    hydra = {"hydra": {"overrides": {"task": overrides, "hydra": list(hydra_overrides)}}}
    (run / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump(hydra))
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "best.ckpt").write_bytes(b"")
    return run


def _commands(run: Path, tmp_path: Path) -> dict[str, tuple]:
    return {
        "evaluate": (evaluate.main, [str(run), "--no-wandb", "--out", str(tmp_path / "eval")]),
        "cams": (cams.main, [str(run), "--split", "val", "--out", str(tmp_path / "cams")]),
        "figure": (figure.main, [str(run), "--out", str(tmp_path / "fig" / "f.png")]),
        "reproduce": (reproduce.main, [str(run), "--out", str(tmp_path / "rep")]),
    }


@pytest.mark.parametrize("command", ["evaluate", "cams", "figure", "reproduce"])
def test_a_run_dir_with_a_target_override_is_refused_by_every_command(tmp_path, capsys, recorder, command):
    marker = tmp_path / "pwned"
    run = _shared_run(tmp_path, ["logger=json", _target_payload(marker)])
    main, argv = _commands(run, tmp_path)[command]
    assert main(argv) == 2
    _one_sentence(capsys.readouterr().err, f"{run / 'summary.json'}: override ", "names _target_ os.mkdir")
    assert not marker.exists() and recorder == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["theirs"]  # no eval/, cams/, fig/, rep/


@pytest.mark.parametrize("command", ["evaluate", "reproduce"])
def test_a_run_dir_with_a_hydra_callback_is_refused(tmp_path, capsys, recorder, command):
    marker = tmp_path / "pwned"
    run = _shared_run(tmp_path, ["logger=json"], hydra_overrides=[_callback_payload(marker)])
    main, argv = _commands(run, tmp_path)[command]
    assert main(argv) == 2
    _one_sentence(capsys.readouterr().err, f"{run / '.hydra' / 'hydra.yaml'}: override ", "sets hydra.callbacks")
    assert not marker.exists() and recorder == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["theirs"]


def test_a_foreign_target_in_a_saved_config_yaml_is_refused(tmp_path):
    run = make_run(tmp_path / "run", ["seed=0"], {}, config={"gain": {"extra": {"_target_": "os.mkdir"}}})
    with pytest.raises(Untrusted, match=r"config\.yaml: key 'gain\.extra\._target_' names _target_ os\.mkdir"):
        run_config(run)


def test_trust_lets_a_run_dir_through(tmp_path, capsys):
    marker = tmp_path / "pwned"
    run = _shared_run(tmp_path, ["logger=json", _target_payload(marker)])
    cfg = run_config(run, trust=True)  # composed, not instantiated: nothing has run yet
    assert cfg.dataset.x._target_ == "os.mkdir" and not marker.exists()
    (run / "checkpoints" / "best.ckpt").unlink()  # the command gets past the check and stops at the weights
    assert evaluate.main([str(run), "--no-wandb", "--trust"]) == 2
    assert "has no checkpoints/best.ckpt" in capsys.readouterr().err and not marker.exists()


def test_a_legitimate_run_dir_needs_no_trust(tmp_path):
    legit = [
        "trainer.optimizer._target_=torch.optim.SGD",
        "+trainer.optimizer.momentum=0.9",
        "trainer.scheduler._target_=gain_exp.train.schedules.warmup_cosine",
        "+trainer.scheduler.warmup_epochs=2",
    ]
    config = {
        "trainer": {"optimizer": {"_target_": "torch.optim.SGD"}},
        "gain": {"_target_": "gain_exp.core.gain.GAIN"},
    }
    run = make_run(tmp_path / "run", legit, {}, config=config)
    cfg = run_config(run)
    assert cfg.trainer.optimizer._target_ == "torch.optim.SGD"
    assert cfg.trainer.scheduler._target_ == "gain_exp.train.schedules.warmup_cosine"


def test_run_config_path_of_a_shared_run_is_refused_unless_trusted(tmp_path, capsys):
    marker = tmp_path / "pwned"
    run = _shared_run(tmp_path, ["logger=json", _target_payload(marker)])
    argv = ["--config-path", str(run / ".hydra"), "--config-name", "config"]
    with pytest.raises(SystemExit) as stopped:
        app_argv(argv)
    assert stopped.value.code == 2
    _one_sentence(capsys.readouterr().err, "names _target_ os.mkdir")
    args = app_argv([*argv, "--trust"])
    assert _target_payload(marker) in args and "--trust" not in args and not marker.exists()
