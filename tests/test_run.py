"""The Hydra app end to end: composition, training, outputs, resume, re-run, multirun, errors."""
from __future__ import annotations

import json
import os
import signal
import time
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import CONF, ROOT, compose, tiny_overrides
from gain_exp.engine import Interrupted
from gain_exp.run import train

EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_composes(name):
    cfg = compose([f"experiment={name}"])
    assert cfg.gain.formulation in ("batch", "per_label") and cfg.trainer.epochs >= 1


def test_short_training_writes_every_artefact(tmp_path, tiny):
    out = tmp_path / "run"
    summary = train(compose(tiny), out_dir=out)
    assert summary["status"] == "completed" and summary["epochs_completed"] == 2
    final = summary["final"]
    for split in ("val", "test_biased", "test_unbiased"):
        for key in ("acc", "loc_iou", "pointing_game", "energy_pg", "am_drop"):
            assert isinstance(final[f"{split}/{key}"], float), f"{split}/{key}"
        assert 0.0 <= final[f"{split}/acc"] <= 1.0
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["final"] == json.loads(json.dumps(final))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {"train/loss", "train/loss_cl", "train/loss_am", "train/loss_e", "train/lr"} <= set(records[0])
    epochs = [r for r in records if "val/acc" in r]
    assert [r["epoch"] for r in epochs] == [0, 1]
    assert any(r["train/loss_am"] > 0 for r in records if r.get("epoch") == 1 and "train/loss_am" in r)
    assert all(r["train/loss_am"] == 0 for r in records if r.get("epoch") == 0 and "train/loss_am" in r)
    assert (out / "checkpoints" / "last.ckpt").is_file() and (out / "checkpoints" / "best.ckpt").is_file()
    state = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    assert state["epoch"] == 2
    pngs = sorted(p.name for p in (out / "attention").glob("*.png"))
    assert pngs == ["test_biased_epoch001.png", "test_unbiased_epoch001.png", "val_epoch000.png", "val_epoch001.png"]
    assert not list(out.glob("**/*.tmp"))


def test_same_config_and_seed_give_same_metrics(tmp_path, tiny):
    a = train(compose(tiny), out_dir=tmp_path / "a")["final"]
    b = train(compose(tiny), out_dir=tmp_path / "b")["final"]
    assert a == b
    c = train(compose(tiny + ["seed=1"]), out_dir=tmp_path / "c")["final"]
    assert c != a


@pytest.mark.parametrize("stop_after", [3, 9])  # mid-epoch 0, and mid-epoch 1 after an epoch boundary
def test_resumed_run_matches_uninterrupted(tmp_path, tiny, stop_after):
    full = train(compose(tiny), out_dir=tmp_path / "full")["final"]
    with pytest.raises(Interrupted) as stop:
        train(compose(tiny + [f"trainer.interrupt_after_steps={stop_after}"]), out_dir=tmp_path / "cut")
    assert stop.value.checkpoint.is_file()
    assert json.loads((tmp_path / "cut" / "summary.json").read_text())["status"] == "interrupted"
    resumed = train(compose(tiny + [f"trainer.resume={tmp_path / 'cut'}"]), out_dir=tmp_path / "resumed")
    assert resumed["final"] == full


def test_localisation_scores_do_not_depend_on_the_map_normalisation(tmp_path, tiny):
    # Baseline training ignores the maps, so only the evaluation sees gain.normalisation: the scores must agree.
    # gain_cnn4: test_resnet's random-init maps are ~1e-7, where the normalisations' eps terms dominate.
    tiny = [o for o in tiny if not o.startswith("backbone.name=")]
    runs = {how: train(compose(tiny + ["loss=baseline", "trainer.epochs=1", f"gain.normalisation={how}"]),
                       out_dir=tmp_path / how)["final"] for how in ("minmax", "max", "none")}
    keys = [f"{split}/{m}" for split in ("val", "test_unbiased") for m in ("loc_iou", "pointing_game", "energy_pg")]
    for how in ("max", "none"):
        assert runs[how]["val/acc"] == runs["minmax"]["val/acc"]
        assert [runs[how][k] for k in keys] == pytest.approx([runs["minmax"][k] for k in keys], abs=1e-5), how


def test_resume_auto_without_checkpoint_starts_fresh(tmp_path, tiny):
    summary = train(compose(tiny + ["trainer.resume=auto", "trainer.epochs=1"]), out_dir=tmp_path / "r")
    assert summary["epochs_completed"] == 1


def _app(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "gain_exp.run", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def test_multirun_then_rerun_from_saved_config(tmp_path):
    sweep = tmp_path / "sweep"
    args = tiny_overrides(tmp_path) + ["trainer.epochs=1", f"hydra.sweep.dir={sweep}"]
    proc = _app(["-m", "loss=baseline,gain", *args], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and (p / "summary.json").exists())
    assert len(jobs) == 2
    summaries = [json.loads((j / "summary.json").read_text()) for j in jobs]
    assert {s["choices"]["loss"] for s in summaries} == {"baseline", "gain"}
    assert (jobs[0] / ".hydra" / "config.yaml").is_file() and (jobs[0] / ".hydra" / "overrides.yaml").is_file()

    rerun = tmp_path / "rerun"
    proc = _app(["--config-path", str(jobs[0] / ".hydra"), "--config-name", "config", f"hydra.run.dir={rerun}"],
                cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    again = json.loads((rerun / "summary.json").read_text())
    assert again["final"] == summaries[0]["final"]


@pytest.mark.parametrize(
    "override,phrase",
    [
        ("gain.sigma=1.5", r"gain\.sigma=1\.5 is outside \(0, 1\)"),
        ("gain.omega=-1", r"gain\.omega=-1.* must be > 0"),
        ("loss.am_weight=-1", r"loss\.am_weight=-1.* is negative"),
        ("loss.ex_weight=-0.5", r"loss\.ex_weight=-0\.5 is negative"),
        ("trainer.epochs=0", r"trainer\.epochs=0 must be >= 1"),
        ("trainer.batch_size=0", r"trainer\.batch_size=0 must be >= 1"),
        ("trainer.optimizer.lr=0", r"trainer\.optimizer\.lr=0.* must be > 0"),
        ("trainer.optimizer.momentum=0.9", r"trainer\.optimizer\.momentum is not an argument of torch\.optim\.AdamW"),
        ("trainer.optimizer.weight_decy=0", r"weight_decy .*\(did you mean weight_decay\?\)"),
        ("backbone.name=resnet81", r"backbone 'resnet81' is not a timm model; did you mean"),
        ("backbone.grad_layer=layer9", r"grad_layer 'layer9' does not exist"),
        ("dataset.bias=1.5", r"bias"),
        ("trainer.resume=/nonexistent/run", r"trainer\.resume=/nonexistent/run: no checkpoint"),
    ],
)
def test_bad_values_stop_with_one_sentence(tmp_path, tiny, override, phrase):
    out = tmp_path / "run"
    with pytest.raises((ValueError, FileNotFoundError), match=phrase):
        train(compose(tiny + [override]), out_dir=out)
    assert not (out / "checkpoints").exists()


def test_app_prints_the_sentence_not_a_traceback(tmp_path):
    proc = _app(tiny_overrides(tmp_path) + ["gain.sigma=0", f"hydra.run.dir={tmp_path / 'r'}"], cwd=tmp_path)
    assert proc.returncode == 2
    assert "error: gain.sigma=0" in proc.stderr and "Traceback" not in proc.stderr


def test_unknown_group_option_lists_the_options(tmp_path):
    proc = _app(["backbone=resnet81", f"hydra.run.dir={tmp_path / 'r'}"], cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: backbone=resnet81: group backbone has no option 'resnet81' (did you mean resnet18 or resnet50?); "
        "choose one of convnext_tiny, efficientnet_b0, gain_cnn4, mobilenetv3_large_100, resnet18, resnet50, vgg16_bn."]


def test_sigterm_saves_a_checkpoint_and_exits(tmp_path):
    out = tmp_path / "r"
    args = tiny_overrides(tmp_path) + ["trainer.epochs=200", f"hydra.run.dir={out}"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "gain_exp.run", *args], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / "checkpoints" / "last.ckpt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-2000:]
    assert "trainer.resume=" in stderr
    state = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    assert 1 <= state["epoch"] < 200
    assert json.loads((out / "summary.json").read_text())["status"] == "interrupted"
