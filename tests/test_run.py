"""The Hydra app end to end: composition, training, outputs, resume, re-run, multirun, errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import CONF, ROOT, compose, tiny_overrides

from gain_exp.run import train
from gain_exp.tracking import Tracker
from gain_exp.train.engine import Diverged, Interrupted

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


@pytest.mark.slow
def test_same_config_and_seed_give_same_metrics(tmp_path, tiny):
    a = train(compose(tiny), out_dir=tmp_path / "a")["final"]
    b = train(compose(tiny), out_dir=tmp_path / "b")["final"]
    assert a == b
    c = train(compose(tiny + ["seed=1"]), out_dir=tmp_path / "c")["final"]
    assert c != a


@pytest.mark.slow
@pytest.mark.parametrize("stop_after", [3, 9])  # mid-epoch 0, and mid-epoch 1 after an epoch boundary
def test_resumed_run_matches_uninterrupted(tmp_path, tiny, stop_after):
    full = train(compose(tiny), out_dir=tmp_path / "full")["final"]
    with pytest.raises(Interrupted) as stop:
        train(compose(tiny + [f"trainer.interrupt_after_steps={stop_after}"]), out_dir=tmp_path / "cut")
    assert stop.value.checkpoint.is_file()
    assert json.loads((tmp_path / "cut" / "summary.json").read_text())["status"] == "interrupted"
    resumed = train(compose(tiny + [f"trainer.resume={tmp_path / 'cut'}"]), out_dir=tmp_path / "resumed")
    assert resumed["final"] == full


@pytest.mark.slow
def test_localisation_scores_do_not_depend_on_the_map_normalisation(tmp_path, tiny):
    # Baseline training ignores the maps, so only the evaluation sees gain.normalisation: the scores must agree.
    # gain_cnn4: test_resnet's random-init maps are ~1e-7, where the normalisations' eps terms dominate.
    tiny = [o for o in tiny if not o.startswith("backbone.name=")]
    runs = {
        how: train(
            compose(tiny + ["loss=baseline", "trainer.epochs=1", f"gain.normalisation={how}"]), out_dir=tmp_path / how
        )["final"]
        for how in ("minmax", "max", "none")
    }
    keys = [f"{split}/{m}" for split in ("val", "test_unbiased") for m in ("loc_iou", "pointing_game", "energy_pg")]
    for how in ("max", "none"):
        assert runs[how]["val/acc"] == runs["minmax"]["val/acc"]
        assert [runs[how][k] for k in keys] == pytest.approx([runs["minmax"][k] for k in keys], abs=1e-5), how


def test_resume_auto_without_checkpoint_starts_fresh(tmp_path, tiny):
    summary = train(compose(tiny + ["trainer.resume=auto", "trainer.epochs=1"]), out_dir=tmp_path / "r")
    assert summary["epochs_completed"] == 1


def _app(args: list[str], cwd: Path, threads: int | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    if threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    return subprocess.run(
        [sys.executable, "-m", "gain_exp.run", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


@pytest.mark.slow
def test_multirun_then_rerun_from_saved_config(tmp_path):
    sweep = tmp_path / "sweep"
    args = tiny_overrides(tmp_path) + ["trainer.epochs=1", f"hydra.sweep.dir={sweep}"]
    proc = _app(["-m", "loss=baseline,gain", *args], cwd=tmp_path, threads=1)
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and (p / "summary.json").exists())
    assert len(jobs) == 2
    summaries = [json.loads((j / "summary.json").read_text()) for j in jobs]
    assert {s["choices"]["loss"] for s in summaries} == {"baseline", "gain"}
    assert (jobs[0] / ".hydra" / "config.yaml").is_file() and (jobs[0] / ".hydra" / "overrides.yaml").is_file()

    rerun = tmp_path / "rerun"
    saved = os.path.relpath(jobs[0] / ".hydra", tmp_path)  # relative, as the README writes it
    # on a machine (here: a process) with another thread count, the saved one is used, as reproduce does
    proc = _app(["--config-path", saved, "--config-name", "config", f"hydra.run.dir={rerun}"], cwd=tmp_path, threads=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "note: using the run's 1 torch thread(s), not this machine's 2" in proc.stderr
    again = json.loads((rerun / "summary.json").read_text())
    assert again["threads"] == summaries[0]["threads"] == 1
    assert again["final"] == summaries[0]["final"]
    assert again["choices"] == summaries[0]["choices"] and again["overrides"] == summaries[0]["overrides"]


@pytest.mark.slow
def test_an_error_after_the_start_is_printed_once_and_kept_in_run_log(tmp_path):
    out = tmp_path / "r"
    proc = _app([*tiny_overrides(tmp_path), "dataset.masks_to_use=0", f"hydra.run.dir={out}"], cwd=tmp_path)
    assert proc.returncode == 2
    sentence = "loss.ex_weight=1.0 needs pixel masks but dataset.masks_to_use=0"
    assert (proc.stdout + proc.stderr).count(sentence) == 1 and f"error: {sentence}" in proc.stderr
    assert (out / "run.log").read_text().count(sentence) == 1


@pytest.mark.slow
def test_a_finished_run_ends_with_what_it_measured_and_which_weights(tmp_path):
    out = tmp_path / "r"
    args = [*tiny_overrides(tmp_path), "trainer.epochs=3", "trainer.monitor_mode=min", f"hydra.run.dir={out}"]
    proc = _app(args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    best = summary["tested_on"]["epoch"]
    # the summary says which weights each split's numbers come from; the test panels are named by that epoch
    assert summary["weights"]["val"] == {"checkpoint": "last", "epoch": 2}
    assert summary["weights"]["test_unbiased"] == {"checkpoint": "best", "epoch": best}
    assert summary["tested_on"] == {"checkpoint": "best", "epoch": best, "rule": "best: the epoch with the min val/acc"}
    assert (out / "attention" / f"test_unbiased_epoch{best:03d}.png").is_file()
    lines = proc.stdout.strip().splitlines()
    table = lines[[i for i, line in enumerate(lines) if line.startswith("done: ")][-1] :]
    assert len(table) == 8  # done, header, rule, val, test_biased, test_unbiased, which rule chose them, view
    assert table[6] == "test weights chosen by best: the epoch with the min val/acc"
    final = summary["final"]
    assert table[0] == f"done: val/acc={final['val/acc']:.3f}  results in {out}"
    assert table[1].startswith("| split | weights | acc | worst_group_acc | loc_iou | pointing_game |")
    assert table[3].startswith(
        f"| val | last, after epoch 3 | {final['val/acc']:.3f} | {final['val/worst_group_acc']:.3f} | "
        f"{final['val/loc_iou']:.3f} |"
    )
    assert table[5].startswith(
        f"| test_unbiased | best, after epoch {best + 1} | {final['test_unbiased/acc']:.3f} | "
        f"{final['test_unbiased/worst_group_acc']:.3f} | {final['test_unbiased/loc_iou']:.3f} |"
    )
    assert table[-1].startswith(f"view: {out / 'attention'}")


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


@pytest.mark.slow
def test_app_prints_the_sentence_not_a_traceback(tmp_path):
    proc = _app(tiny_overrides(tmp_path) + ["gain.sigma=0", f"hydra.run.dir={tmp_path / 'r'}"], cwd=tmp_path)
    assert proc.returncode == 2
    assert "error: gain.sigma=0" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_unknown_group_option_lists_the_options(tmp_path):
    proc = _app(["backbone=resnet81", f"hydra.run.dir={tmp_path / 'r'}"], cwd=tmp_path)
    assert proc.returncode == 2
    options = ", ".join(sorted(p.stem for p in (ROOT / "conf" / "backbone").glob("*.yaml")))
    assert "resnet18, resnet50" in options
    assert proc.stderr.strip().splitlines() == [
        "error: backbone=resnet81: group backbone has no option 'resnet81' (did you mean resnet18 or resnet50?); "
        f"choose one of {options}."
    ]


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_exits(tmp_path):
    out = tmp_path / "r"
    args = tiny_overrides(tmp_path) + ["trainer.epochs=200", f"hydra.run.dir={out}"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "gain_exp.run", *args],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
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


@pytest.mark.slow
def test_test_splits_use_the_best_checkpoint_unless_told_last(tmp_path, tiny):
    # val/loss_cl with mode max picks epoch 0 (the loss falls), so best and last weights differ
    pick_first = tiny + ["loss=baseline", "trainer.monitor=val/loss_cl", "trainer.monitor_mode=max"]
    best = train(compose(pick_first), out_dir=tmp_path / "best")
    last = train(compose(pick_first + ["trainer.test_on=last"]), out_dir=tmp_path / "last")
    assert best["best"]["epoch"] == 0 and best["tested_on"]["checkpoint"] == "best" and best["tested_on"]["epoch"] == 0
    assert last["tested_on"] == {"checkpoint": "last", "epoch": 1, "rule": "last: the final epoch"}
    assert best["final"]["val/acc"] == last["final"]["val/acc"]  # same training
    assert best["final"]["test_biased/loss_cl"] != last["final"]["test_biased/loss_cl"]
    saved = torch.load(tmp_path / "best" / "checkpoints" / "best.ckpt", weights_only=True)
    assert saved["best"]["epoch"] == 0 and saved["run"]["config"]["trainer"]["test_on"] == "best"
    assert saved["run"]["choices"] == {} and saved["run"]["seed"] == 0 and "git" in saved["run"]


def test_summary_records_how_to_rerun_the_job(tmp_path, tiny):
    summary = json.loads(json.dumps(train(compose(tiny), out_dir=tmp_path / "r"), default=str))
    assert summary["config"]["trainer"]["epochs"] == 2 and summary["seed"] == 0
    assert summary["threads"] == torch.get_num_threads() and set(summary["versions"]) >= {"torch", "timm", "python"}
    assert set(summary["git"]) == {"commit", "dirty"}


class Counting(Tracker):
    """A backend whose state counts the metric records it has seen, across resumes."""

    def __init__(self, out_dir, run_config, resume=None):
        self.start = (resume or {}).get("records", 0)
        self.resumed_from, self.records = resume, 0
        Counting.last = self

    def log_metrics(self, metrics, step):
        self.records += 1

    def state(self):
        return {"records": self.start + self.records}


def test_a_resumed_run_hands_each_backend_its_saved_state(tmp_path, tiny):
    backend = ["+logger.mine._target_=test_run.Counting"]
    with pytest.raises(Interrupted) as stop:
        train(compose(tiny + backend + ["trainer.interrupt_after_steps=3"]), out_dir=tmp_path / "cut")
    saved = torch.load(stop.value.checkpoint, weights_only=True)["tracking"]
    assert saved["mine"] == {"records": 3}  # one record per logged step, nothing per epoch yet
    summary = train(compose(tiny + backend + [f"trainer.resume={tmp_path / 'cut'}"]), out_dir=tmp_path / "resumed")
    assert Counting.last.resumed_from == {"records": 3}
    assert summary["tracking"]["mine"]["records"] == 3 + Counting.last.records


@pytest.mark.slow
def test_resuming_a_killed_run_in_place_cleans_temps_and_keeps_one_line_per_step(tmp_path, tiny):
    out = tmp_path / "run"
    with pytest.raises(Interrupted):
        train(compose(tiny + ["trainer.interrupt_after_steps=3"]), out_dir=out)
    # what a kill -9 after the checkpoint leaves: a half-written checkpoint and metric lines past the checkpoint
    (out / "checkpoints" / ".last.ckpt.x1y2.tmp").write_bytes(b"partial")
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 4, "epoch": 0, "train/loss": 9.0}) + "\n")
    train(compose(tiny + ["trainer.resume=auto"]), out_dir=out)
    assert not list((out / "checkpoints").glob("*.tmp"))
    steps = [
        json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines() if "train/loss" in line
    ]
    assert steps == sorted(set(steps)) and 9.0 not in [
        json.loads(x).get("train/loss") for x in (out / "metrics.jsonl").read_text().splitlines()
    ]


@pytest.mark.slow
def test_outputs_are_readable_by_the_group_as_the_umask_allows(tmp_path):
    # a fresh process: the file mode is taken from the umask when gain_exp.output.files is imported
    code = (
        "import os, sys; os.umask(0o022); from gain_exp.output.files import atomic_write\n"
        "with atomic_write(sys.argv[1]) as f: f.write(b'1')"
    )
    subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "x.bin")], check=True, env={**os.environ, "PYTHONPATH": str(ROOT)}
    )
    assert (tmp_path / "x.bin").stat().st_mode & 0o777 == 0o644


@pytest.mark.parametrize("damage", ["truncate", "foreign", "not_a_checkpoint"])
def test_a_corrupt_checkpoint_is_one_sentence_with_its_path(tmp_path, tiny, damage):
    out = tmp_path / "run"
    train(compose(tiny + ["trainer.epochs=1"]), out_dir=out)
    last = out / "checkpoints" / "last.ckpt"
    if damage == "truncate":
        last.write_bytes(last.read_bytes()[:2000])
    elif damage == "foreign":  # a pickle that would run code on load
        torch.save({"model": Path("x")}, last)
    else:
        torch.save({"weights": torch.zeros(1)}, last)
    with pytest.raises(ValueError) as err:
        train(compose(tiny + [f"trainer.resume={out}"]), out_dir=tmp_path / "again")
    message = str(err.value)
    assert str(last) in message and "weights_only" not in message and "\n" not in message
    assert "start fresh" in message or "point trainer.resume" in message


def test_a_corrupt_shapes_cache_is_generated_again(tmp_path, tiny, caplog):
    first = train(compose(tiny + ["trainer.epochs=1", "loss=baseline"]), out_dir=tmp_path / "a")["final"]
    [cache] = (tmp_path / "shapes").glob("*.pt")
    cache.write_bytes(b"not a cache")
    again = train(compose(tiny + ["trainer.epochs=1", "loss=baseline"]), out_dir=tmp_path / "b")["final"]
    assert again == first and f"shapes: {cache} is unreadable (" in caplog.text
    assert "generating the splits again" in caplog.text and caplog.text.count(str(cache)) == 1  # named once


def test_a_diverging_run_stops_says_so_and_saves_no_nonfinite_weights(tmp_path, tiny):
    out = tmp_path / "run"
    with pytest.raises(Diverged, match=r"training loss became non-finite .* lower trainer\.optimizer\.lr"):
        train(compose(tiny + ["trainer.optimizer.lr=1e6", "loss=baseline", "trainer.epochs=3"]), out_dir=out)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "diverged" and "non-finite" in summary["error"]
    for ckpt in (out / "checkpoints").glob("*.ckpt"):
        state = torch.load(ckpt, weights_only=True)
        assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point()), ckpt


@pytest.mark.parametrize(
    "override",
    [
        "gain.omega=nan",
        "loss.ex_weight=inf",
        "trainer.optimizer.lr=inf",
        "gain.am_grad_scale=nan",
        "trainer.grad_clip=-1",
    ],
)
def test_non_finite_numbers_and_a_negative_clip_are_refused(tmp_path, tiny, override):
    key = override.split("=")[0].replace(".", r"\.")
    with pytest.raises(ValueError, match=rf"^{key}=\S+ (is not a finite number|must be > 0)"):
        train(compose(tiny + [override]), out_dir=tmp_path / "r")


def test_a_failed_start_never_clobbers_a_finished_run_and_a_crash_says_failed(tmp_path, tiny, monkeypatch):
    out = tmp_path / "run"
    done = train(compose(tiny + ["trainer.epochs=1"]), out_dir=out)
    (out / "checkpoints" / "last.ckpt").write_bytes(b"truncated")
    with pytest.raises(ValueError, match="unreadable"):
        train(compose(tiny + ["trainer.epochs=1", "trainer.resume=auto"]), out_dir=out)
    assert json.loads((out / "summary.json").read_text())["final"] == json.loads(json.dumps(done["final"]))

    from gain_exp.train.engine import Trainer

    def crash(self, *args, **kwargs):
        raise RuntimeError("CUDA error: an illegal memory access")

    monkeypatch.setattr(Trainer, "evaluate", crash)
    with pytest.raises(RuntimeError):
        train(compose(tiny + ["trainer.epochs=1"]), out_dir=tmp_path / "crash")
    summary = json.loads((tmp_path / "crash" / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["error"] == "RuntimeError: CUDA error: an illegal memory access"


@pytest.mark.slow
def test_the_app_exits_non_zero_on_divergence(tmp_path):
    args = tiny_overrides(tmp_path) + ["trainer.optimizer.lr=1e6", "loss=baseline", f"hydra.run.dir={tmp_path / 'r'}"]
    proc = _app(args, cwd=tmp_path)
    assert proc.returncode == 3 and "error: training diverged: the training loss became non-finite" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    "override,phrase",
    [
        ("trainer.monitor=val/nonexistent", r"trainer\.monitor=val/nonexistent is not a metric of this run"),
        (
            "optimize_metric=val/acc_typo",
            r"optimize_metric=val/acc_typo is not a metric of this run; did you mean val/acc",
        ),
        ("trainer.monitor=test_unbiased/acc", r"must be a validation metric"),
        ("optimize_metric=tset/acc", r"optimize_metric=tset/acc names no split of this run"),
        ("dataset.masks_to_use=0", r"loss\.ex_weight=1\.0 needs pixel masks but dataset\.masks_to_use=0"),
    ],
)
def test_names_and_budgets_that_cannot_work_are_one_sentence(tmp_path, tiny, override, phrase):
    with pytest.raises(ValueError, match=phrase):
        train(compose(tiny + [override, "trainer.epochs=1"]), out_dir=tmp_path / "r")
    assert not (tmp_path / "r" / "checkpoints" / "best.ckpt").exists()


@pytest.mark.slow
def test_resume_applies_a_new_lr_and_length_for_real(tmp_path, tiny):
    with pytest.raises(Interrupted):
        train(compose(tiny + ["trainer.interrupt_after_steps=6"]), out_dir=tmp_path / "cut")  # end of epoch 0
    resumed = train(
        compose(tiny + [f"trainer.resume={tmp_path / 'cut'}", "trainer.optimizer.lr=0.0005", "trainer.epochs=4"]),
        out_dir=tmp_path / "r",
    )
    assert resumed["resumed"]["changed"]["trainer.optimizer.lr"] == [0.001, 0.0005]
    assert resumed["resumed"]["changed"]["trainer.epochs"] == [2, 4] and resumed["epochs_completed"] == 4
    lrs = {}
    for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "train/lr" in row:
            lrs.setdefault(row["epoch"], row["train/lr"])
    # cosine over 4 epochs from the new lr, continued at epoch 1: 0.0005 * (1 + cos(pi * e / 4)) / 2
    import math

    for epoch in (1, 2, 3):
        assert lrs[epoch] == pytest.approx(0.0005 * (1 + math.cos(math.pi * epoch / 4)) / 2), epoch


@pytest.mark.slow
def test_resuming_from_best_ckpt_continues_at_the_next_epoch(tmp_path, tiny):
    # val/loss_cl with mode max picks epoch 0 (the loss falls): best.ckpt is an epoch behind last.ckpt
    pick_first = tiny + ["trainer.epochs=3", "loss=baseline", "trainer.monitor=val/loss_cl", "trainer.monitor_mode=max"]
    whole = train(compose(pick_first), out_dir=tmp_path / "whole")
    assert whole["best"]["epoch"] == 0
    best = torch.load(tmp_path / "whole" / "checkpoints" / "best.ckpt", weights_only=True)
    assert (best["epoch"], best["batch_in_epoch"], best["best"]["epoch"]) == (1, 0, 0)
    again = train(
        compose(pick_first + [f"trainer.resume={tmp_path / 'whole' / 'checkpoints' / 'best.ckpt'}"]),
        out_dir=tmp_path / "again",
    )
    assert [h["epoch"] for h in again_history(tmp_path / "again")] == [0, 1, 2]  # epoch 0 is not trained twice
    val = {k: v for k, v in whole["final"].items() if not k.startswith("test_")}
    assert {k: v for k, v in again["final"].items() if not k.startswith("test_")} == val
    assert again["tested_on"] == {
        "checkpoint": "last",
        "epoch": 2,
        "rule": "last: the final epoch",
    }  # best.ckpt: elsewhere


def again_history(run_dir):
    return torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["history"]


@pytest.mark.parametrize(
    "override,key",
    [
        ("backbone.name=gain_cnn4", "backbone.name"),
        ("dataset.n_train=40", "dataset.n_train"),
        ("formulation=per_label", "gain.formulation"),
        ("trainer.optimizer._target_=torch.optim.SGD", "trainer.optimizer._target_"),
        ("trainer.batch_size=4", "trainer.batch_size"),
    ],
)
def test_resume_refuses_what_defines_the_experiment_in_one_sentence(tmp_path, tiny, override, key):
    with pytest.raises(Interrupted):
        train(compose(tiny + ["trainer.interrupt_after_steps=3"]), out_dir=tmp_path / "cut")  # mid-epoch 0
    with pytest.raises(ValueError, match=rf"^trainer\.resume: .*{key.replace('.', chr(92) + '.')}="):
        train(compose(tiny + [f"trainer.resume={tmp_path / 'cut'}", override]), out_dir=tmp_path / "r")


@pytest.mark.slow
def test_sigterm_to_the_process_group_with_workers_saves_and_resumes_exactly(tmp_path, tiny):
    # what scancel and preemption do: SIGTERM to every process of the job, DataLoader workers included
    out = tmp_path / "r"
    run = tiny + ["trainer.epochs=20", "trainer.workers=2", "loss=baseline"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    log = open(tmp_path / "stderr.log", "w")  # a file, not a pipe: forked workers must not hold the reader open
    proc = subprocess.Popen(
        [sys.executable, "-m", "gain_exp.run", *run, f"hydra.run.dir={out}"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=log,
        start_new_session=True,
    )
    deadline = time.time() + 180
    while not (out / "checkpoints" / "last.ckpt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=180)
    log.close()
    stderr = (tmp_path / "stderr.log").read_text()
    assert proc.returncode == 130, stderr[-2000:]
    assert json.loads((out / "summary.json").read_text())["status"] == "interrupted"
    assert torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["step"] >= 6
    resumed = train(compose(run + ["trainer.resume=auto"]), out_dir=out)
    full = train(compose(run[:-2] + ["loss=baseline"]), out_dir=tmp_path / "full")  # workers=0, uninterrupted
    assert resumed["final"] == full["final"]


@pytest.mark.slow
def test_channels_last_trains_the_same_and_the_summary_reports_speed(tmp_path, tiny):
    plain = train(compose(tiny + ["trainer.epochs=1"]), out_dir=tmp_path / "plain")
    last = train(compose(tiny + ["trainer.epochs=1", "trainer.channels_last=true"]), out_dir=tmp_path / "cl")
    assert last["final"]["val/loss_cl"] == pytest.approx(plain["final"]["val/loss_cl"], rel=1e-4)
    speed = last["speed"]
    assert speed["images_per_s"] > 0 and 0 <= speed["data_wait_share"] < 1 and speed["epoch"] == 0


@pytest.mark.slow
def test_compile_trains_like_eager_and_checkpoints_load_uncompiled(tmp_path, tiny):
    # aot_eager: the same graph capture as inductor (Dynamo + AOTAutograd) without a C++ toolchain
    run = tiny + ["trainer.epochs=1", "grad_mode=features"]
    plain = train(compose(run), out_dir=tmp_path / "plain")
    compiled = train(
        compose(run + ["trainer.compile=true", "trainer.compile_backend=aot_eager"]), out_dir=tmp_path / "compiled"
    )
    for key in ("val/loss_cl", "val/acc", "test_unbiased/acc"):
        assert compiled["final"][key] == pytest.approx(plain["final"][key], rel=1e-4, abs=1e-6), key
    weights = torch.load(tmp_path / "compiled" / "checkpoints" / "last.ckpt", weights_only=True)["model"]
    assert not any("_orig_mod" in k for k in weights)  # the state dict of the uncompiled model


@pytest.mark.parametrize(
    "override,phrase",
    [
        (["grad_mode=full"], r"^trainer\.compile: torch\.compile has no double backward, which gain\.grad_mode=full"),
        (["formulation=per_label", "trainer.compile_backend=inductor"], r"inductor cannot batch per_label.*aot_eager"),
        (["backbone.grad_layer=layer2"], r"the map layer layer2 lies inside the compiled forward_features"),
    ],
)
def test_compile_refuses_what_it_cannot_run_in_one_sentence(tmp_path, tiny, override, phrase):
    with pytest.raises(ValueError, match=phrase):
        train(compose(tiny + ["trainer.compile=true", *override]), out_dir=tmp_path / "r")


def test_workers_auto_is_none_on_cpu_and_a_share_of_the_cores_per_gpu_process(monkeypatch):
    from gain_exp.config.checks import resolve_workers

    assert resolve_workers("auto", torch.device("cpu")) == 0
    assert resolve_workers(3, torch.device("cpu")) == 3
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: set(range(16)))
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert resolve_workers("auto", torch.device("cuda")) == 8  # at most 8
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert resolve_workers("auto", torch.device("cuda")) == 3  # 16 cores / 4 GPU processes, one left for each
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "32")
    assert resolve_workers("auto", torch.device("cuda")) == 1


@pytest.mark.parametrize("value", ["-1", "many", "true"])
def test_workers_must_be_auto_or_a_count(tmp_path, tiny, value):
    with pytest.raises(ValueError, match=rf"^trainer\.workers={value if value != 'true' else 'True'} must be auto"):
        train(compose(tiny + [f"trainer.workers={value}"]), out_dir=tmp_path / "r")
