"""kill -9 at random (seeded) moments: what a killed run leaves loads, and `trainer.resume=auto` ends exactly where an
uninterrupted run does.

One run directory is killed again and again (SIGKILL to the whole process group: no handler runs, nothing is
flushed or cleaned up), each time by the same command with trainer.resume=auto, so every kill after the first hits a
resumed run; then the command runs to the end. The kill moments are drawn from a seeded generator
(GAIN_EXP_FAULT_SEED, default 0) over events the run makes visible on disk: a step's metrics line, a checkpoint's
temporary file appearing (a kill during the write or right after its rename), the last epoch's validation line (a
kill during the best/last writes or the test splits). A try whose run finishes before its moment still resumes and
is checked like the others.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from functools import partial
from pathlib import Path
from typing import Callable

import pytest
import torch
from conftest import ROOT, compose, tiny_overrides

from gain_exp.output.files import TEMP_GLOB
from gain_exp.run import train

SEED = int(os.environ.get("GAIN_EXP_FAULT_SEED", "0"))
STEPS = 6  # steps per epoch of the tiny run: 48 train images, batch 8
EPOCHS = 2  # the tiny run's
CKPT_KEYS = {
    "model",
    "optimizer",
    "scheduler",
    "epoch",
    "batch_in_epoch",
    "step",
    "best",
    "history",
    "epoch_sums",
    "rng",
    "tracking",
    "run",
}


def _lines(out: Path) -> list[str]:
    path = out / "metrics.jsonl"
    return path.read_text().splitlines() if path.is_file() else []


def after_lines(out: Path, n: int) -> Callable[[], bool]:
    """True once metrics.jsonl holds n lines (a step's losses, an epoch's val metrics, the test metrics)."""
    return lambda: len(_lines(out)) >= n


def during_checkpoint_write(out: Path, k: int) -> Callable[[], bool]:
    """True once this process has opened its k-th checkpoint temp file (the write is under way, or just renamed)."""
    folder = out / "checkpoints"
    before = set(os.listdir(folder)) if folder.is_dir() else set()  # a killed run's temps, removed at start

    seen: set[str] = set()

    def ready() -> bool:
        try:
            seen.update(n for n in os.listdir(folder) if n.endswith(".tmp") and n not in before)
        except FileNotFoundError:
            pass
        return len(seen) >= k

    return ready


def after_last_val(out: Path) -> Callable[[], bool]:
    """True once the last epoch's validation metrics are logged: next come the best/last writes and the tests."""
    path = out / "metrics.jsonl"
    return lambda: path.is_file() and path.read_bytes().count(b'"val/acc"') >= EPOCHS


def _start(args: list[str], cwd: Path, log) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    return subprocess.Popen(
        [sys.executable, "-m", "gain_exp.run", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=log,
        start_new_session=True,
    )


def _kill_when(proc: subprocess.Popen, ready: Callable[[], bool], delay: float, timeout: float = 180) -> bool:
    """SIGKILL the process group `delay` s after `ready()` turns true; False if the run ended first."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None and not ready():
        assert time.monotonic() < deadline, "the run neither reached its kill moment nor ended"
        time.sleep(0.002)
    if proc.poll() is not None:
        return False
    time.sleep(delay)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:  # ended in the meantime
        pass
    proc.wait(timeout=60)
    return proc.returncode == -signal.SIGKILL


def _check_left_files(out: Path, what: str) -> None:
    """Every checkpoint and summary a kill leaves is complete: loads (weights_only) with the keys a resume reads."""
    for name in ("last", "best"):
        path = out / "checkpoints" / f"{name}.ckpt"
        if not path.exists():
            continue
        state = torch.load(path, weights_only=True)
        assert CKPT_KEYS <= set(state), f"{what}: {path} lacks {sorted(CKPT_KEYS - set(state))}"
        assert 0 <= state["epoch"] <= EPOCHS, what
        # a kill -9 saves nothing: both are an epoch boundary's (best.ckpt resumes after its best epoch)
        assert state["batch_in_epoch"] == 0 and state["step"] == state["epoch"] * STEPS, what
        if name == "best":
            assert state["best"]["epoch"] == state["epoch"] - 1, what
    if (out / "summary.json").exists():
        json.loads((out / "summary.json").read_text())
    for line in _lines(out):
        json.loads(line)  # a kill never leaves half a line


@pytest.mark.slow
def test_kill_9_at_random_moments_then_resume_auto_matches_an_uninterrupted_run(tmp_path):
    base = tiny_overrides(tmp_path) + ["trainer.workers=0"]
    full_dir = tmp_path / "full"
    full = json.loads(json.dumps(train(compose(base), out_dir=full_dir)["final"]))  # also makes the shapes cache

    out = tmp_path / "killed"
    args = base + ["trainer.resume=auto", f"hydra.run.dir={out}"]
    rng = random.Random(SEED)
    plan = [  # (what, trigger factory, delay after it in s), spread over the run
        # mid epoch 0, before any checkpoint: the next start is a fresh one in a directory holding metrics lines
        (f"after metrics line {(n := rng.randint(1, STEPS - 1))}", partial(after_lines, out, n), rng.uniform(0, 0.05)),
        # the k-th checkpoint write of the next start (usually a fresh one): 1 and 2 are epoch 0's best and last,
        # 3 epoch 1's first
        (
            f"at checkpoint write {(k := rng.randint(1, 3))}",
            partial(during_checkpoint_write, out, k),
            rng.uniform(0, 0.003),
        ),
        # the last epoch's best/last writes, the test splits, or just after the end
        ("after the last val line", partial(after_last_val, out), rng.uniform(0, 0.4)),
    ]
    log = open(tmp_path / "stderr.log", "ab")  # a file, not a pipe: nothing reads it while the run is killed
    happened = []
    try:
        for what, make_trigger, delay in plan:
            trigger = make_trigger()  # as this run starts (during_checkpoint_write notes the temps already there)
            proc = _start(args, tmp_path, log)
            killed = _kill_when(proc, trigger, delay)
            assert killed or proc.returncode == 0, f"{what}: exit {proc.returncode}, see {tmp_path / 'stderr.log'}"
            partial_write = list((out / "checkpoints").glob(TEMP_GLOB))  # killed in the middle of a checkpoint write
            happened.append(
                f"{what} + {delay * 1000:.0f} ms: "
                f"{'killed' if killed else 'finished first'}{' mid-write' if partial_write else ''}"
            )
            _check_left_files(out, "; ".join(happened))
        proc = _start(args, tmp_path, log)
        assert proc.wait(timeout=180) == 0, f"{happened}: the final resume failed, see {tmp_path / 'stderr.log'}"
    finally:
        log.close()
    story = f"seed {SEED}: {'; '.join(happened)}"
    print(story)  # which moments the kills hit (pytest -s shows it)
    _check_left_files(out, story)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["epochs_completed"] == EPOCHS, story
    assert [k for k in full if k.startswith(("val/", "test_"))], "the comparison would be empty"
    assert summary["final"] == full, story
    # one metrics line per step and epoch, with the values an uninterrupted run logs
    assert [json.loads(x) for x in _lines(out)] == [json.loads(x) for x in _lines(full_dir)], story
    assert not list((out / "checkpoints").glob(TEMP_GLOB)), story  # a partial write is removed at the next start
