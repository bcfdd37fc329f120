"""A full disk and read-only places (issue 27): one sentence each, nothing partial left, the last good checkpoint and
summary kept, and a resume that finishes once space is back.

A real full disk is ``/dev/full`` (every write fails with ENOSPC) or a small tmpfs (root only); elsewhere the
temporary file of ``atomic_write`` is swapped for one that fails part-way, exactly as a full disk makes it fail.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from conftest import ROOT, compose, tiny_overrides

from gain_exp.data.base import cached_splits
from gain_exp.output import files
from gain_exp.output.files import CannotWrite, atomic_write, load_state, write_error
from gain_exp.run import RunDirTaken, _quiet_log_files, claim_run_dir, train
from gain_exp.tracking.json import JsonTracker


class _FullDisk:
    """A file that takes ``room`` bytes, then fails every write with ENOSPC (a disk filling up mid-write)."""

    def __init__(self, fd: int, room: int) -> None:
        self.f, self.room = os.fdopen(fd, "wb"), room

    def write(self, data: bytes) -> int:
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.f.write(data)

    def __getattr__(self, name: str):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.f.close()


@contextmanager
def disk_fills(monkeypatch, after: int = 0, room: int = 1000, where: str = ""):
    """From the ``after``-th atomic write on (under a path containing ``where``), every write fails part-way."""
    calls = {"n": 0}
    real = files._open_temp

    def opener(fd: int):
        target = os.readlink(f"/proc/self/fd/{fd}")
        if where in target:
            calls["n"] += 1
            if calls["n"] > after:
                return _FullDisk(fd, room)
        return real(fd)

    monkeypatch.setattr(files, "_open_temp", opener)
    yield calls
    monkeypatch.setattr(files, "_open_temp", real)


def _no_temps(folder: Path) -> list[str]:
    return [p.name for p in folder.rglob("*.tmp")]


# ---- the error behind a full disk is found, however it is wrapped ----


def test_write_error_finds_enospc_behind_torch_saves_runtime_error():
    with open("/dev/full", "wb", buffering=0) as f, pytest.raises(Exception) as caught:  # every write: ENOSPC
        torch.save({"w": torch.zeros(1000)}, f)
    assert write_error(caught.value).errno == errno.ENOSPC
    wrapped = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
    wrapped.__context__ = OSError(errno.ENOSPC, "No space left on device")  # how a file on a full disk shows it
    assert write_error(wrapped).errno == errno.ENOSPC
    assert write_error(RuntimeError("something else")) is None


def test_atomic_write_on_a_full_disk_is_one_sentence_and_keeps_the_earlier_file(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    torch.save({"epoch": 1}, path)
    with disk_fills(monkeypatch), pytest.raises(CannotWrite) as caught:
        with atomic_write(path) as f:
            torch.save({"epoch": 2, "w": torch.zeros(10_000)}, f)
    sentence = str(caught.value)
    assert "\n" not in sentence and str(path) in sentence
    assert (
        "the disk is full (" in sentence and " free)" in sentence and "the earlier last.ckpt is unchanged" in sentence
    )
    assert load_state(path) == {"epoch": 1} and _no_temps(tmp_path) == []


def test_metrics_jsonl_on_a_full_disk_is_one_sentence(tmp_path):
    tracker = JsonTracker(tmp_path)
    tracker.log_metrics({"train/loss": 1.0}, 1)
    tracker._file.close()
    tracker._file = open("/dev/full", "a", encoding="utf-8")  # the next line meets a full disk
    with pytest.raises(CannotWrite, match=r"metrics\.jsonl: the disk is full .*trainer\.resume=auto\.$"):
        tracker.log_metrics({"train/loss": 0.5}, 2)


def test_a_log_file_on_a_full_disk_is_one_warning_not_a_traceback_per_record(capsys):
    root = logging.getLogger()
    handler = logging.FileHandler("/dev/full")
    root.addHandler(handler)
    try:
        _quiet_log_files()
        for i in range(3):
            logging.getLogger("gain_exp.test").warning("record %d", i)
    finally:
        root.removeHandler(handler)
        handler.stream = None  # closing would flush into /dev/full once more
    err = capsys.readouterr().err
    assert "Traceback" not in err and "Logging error" not in err
    assert err.count("warning: /dev/full is no longer written (no space left on device)") == 1
    assert handler not in root.handlers


# ---- a run on a disk that fills up ----


@pytest.mark.slow
def test_a_full_disk_mid_run_keeps_the_last_good_checkpoint_and_resume_finishes(tmp_path, monkeypatch):
    overrides = [*tiny_overrides(tmp_path), "trainer.epochs=3"]
    out = tmp_path / "run"
    # epoch 1 writes best.ckpt and last.ckpt (2 atomic writes under checkpoints/); epoch 2's first one finds it full
    with disk_fills(monkeypatch, after=2, where=str(out / "checkpoints")), pytest.raises(CannotWrite) as caught:
        train(compose(overrides), out_dir=out)
    sentence = str(caught.value)
    assert "\n" not in sentence and "checkpoints/best.ckpt: the disk is full" in sentence
    assert f"the last good checkpoint, {out / 'checkpoints' / 'best.ckpt'} (after 1 epoch(s))" in sentence
    assert sentence.endswith("free some space, then continue this run with trainer.resume=auto.")
    assert _no_temps(out) == []
    last = load_state(out / "checkpoints" / "last.ckpt")
    assert last["epoch"] == 1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["error"] == sentence
    # space is back: the run continues from epoch 2 and logs every step once
    train(compose([*overrides, "trainer.resume=auto"]), out_dir=out)
    assert json.loads((out / "summary.json").read_text())["status"] == "completed"
    steps = [r["step"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "train/loss" in r]
    assert steps == list(range(1, 19))  # 3 epochs of 6 steps


def _mount_tmpfs(folder: Path, options: str) -> bool:
    """A tmpfs at ``folder`` (root only): True when mounted."""
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        return False
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True)
    return done.returncode == 0


def _umount(folder: Path) -> None:
    subprocess.run(["umount", str(folder)], capture_output=True)


def _app(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "gain_exp.run", *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_the_app_on_a_real_full_disk_exits_with_one_sentence_and_resumes(tmp_path):
    disk = tmp_path / "disk"
    # test_resnet's checkpoint is about 4.6 MB: epoch 1's best + last fit in 11 MB, epoch 2's new best does not
    if not _mount_tmpfs(disk, "size=11m"):
        pytest.skip("mounting a small tmpfs needs root (the patched-writer test above covers the logic)")
    try:
        args = [*tiny_overrides(tmp_path), "trainer.epochs=3", "trainer.device=cpu", f"hydra.run.dir={disk / 'run'}"]
        done = _app(args, tmp_path)
        errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
        assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
        assert len(errors) == 1 and "the disk is full" in errors[0] and "after 1 epoch(s)" in errors[0]
        assert load_state(disk / "run" / "checkpoints" / "last.ckpt")["epoch"] == 1
        assert _no_temps(disk) == []
        subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
        done = _app([*args, "trainer.resume=auto"], tmp_path)
        assert done.returncode == 0, done.stderr[-2000:]
        assert json.loads((disk / "run" / "summary.json").read_text())["status"] == "completed"
    finally:
        _umount(disk)


# ---- read-only places ----


@pytest.fixture
def read_only(tmp_path):
    """A folder nobody may write (a read-only tmpfs as root, mode 0555 otherwise) holding ``old/`` with a file."""
    folder = tmp_path / "ro"
    if os.geteuid() == 0:
        if not _mount_tmpfs(folder, "size=1m"):
            pytest.skip("a read-only folder for root needs a tmpfs mount, which this machine refuses")
        (folder / "old").mkdir()
        (folder / "old" / "summary.json").write_text('{"status": "failed"}')
        subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True)
        yield folder
        _umount(folder)
    else:
        (folder / "old").mkdir(parents=True)
        (folder / "old" / "summary.json").write_text('{"status": "failed"}')
        for path in (folder / "old", folder):
            path.chmod(0o555)
        yield folder
        for path in (folder, folder / "old"):
            path.chmod(0o755)


@pytest.mark.parametrize("name", ["new", "old"])
def test_a_read_only_run_dir_is_one_sentence_before_anything_is_written(read_only, name):
    with pytest.raises(RunDirTaken, match=rf"^cannot write the run directory {read_only / name}: .* is not writable"):
        claim_run_dir(read_only / name)
    assert sorted(p.name for p in read_only.rglob("*")) == ["old", "summary.json"]


def test_the_app_in_a_read_only_folder_exits_with_one_sentence(read_only, tmp_path):
    single = _app([*tiny_overrides(tmp_path), f"hydra.run.dir={read_only / 'run'}"], tmp_path)
    sweep = _app(["-m", *tiny_overrides(tmp_path), "seed=0,1", f"hydra.sweep.dir={read_only / 'sweep'}"], tmp_path)
    for done in (single, sweep):
        assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
        assert done.stderr.count("error:") == 1 and ("not writable" in done.stderr or "read-only" in done.stderr)
    assert sorted(p.name for p in read_only.rglob("*")) == ["old", "summary.json"]


def test_a_read_only_dataset_cache_keeps_the_splits_in_memory(read_only, caplog):
    made = {"train": {"x": torch.arange(3)}}
    with caplog.at_level(logging.WARNING):
        data = cached_splits(read_only / "cache", {"k": 1}, lambda: made, "shapes")
    assert data is made
    assert f"shapes: cannot cache the generated splits in {read_only / 'cache'}" in caplog.text
    assert "is not writable" in caplog.text and "set dataset.root to a writable folder to keep them" in caplog.text
    assert sorted(p.name for p in read_only.rglob("*")) == ["old", "summary.json"]


@pytest.mark.parametrize(
    ("root", "where"), [("/dev/null", "is a file"), ("/dev/null/cache", r"is inside a file \(/dev/null\)")]
)
def test_a_dataset_root_that_is_a_file_is_one_sentence(root, where):
    with pytest.raises(ValueError, match=rf"^shapes: dataset.root={root} {where}, not a folder; point dataset.root"):
        cached_splits(root, {"k": 1}, lambda: {}, "shapes")


def test_a_skipped_file_names_its_dataset_once(caplog):
    """A dataset's own sentence already starts with its name (voc2012 printed "voc2012 dataset: skipped: voc2012
    dataset: annotation ...")."""
    from gain_exp.data.mask_folder import BadFiles

    error = FileNotFoundError("voc2012 dataset: annotation a.xml does not exist; restore it from the VOC tar.")
    with caplog.at_level(logging.WARNING):
        BadFiles("voc2012 dataset", strict=False).report(error, Path("a.xml"))
    assert "voc2012 dataset: skipped: annotation a.xml does not exist" in caplog.text
    assert caplog.text.count("voc2012 dataset") == 1


@pytest.mark.parametrize("flag", ["--md", "--csv", "--save-spec"])
def test_table_files_on_a_full_disk_are_one_sentence_after_the_printed_table(tmp_path, monkeypatch, capsys, flag):
    from test_table import make_run

    from gain_exp.table import main as table

    for seed in (0, 1):
        make_run(tmp_path / "sweep" / str(seed), [f"seed={seed}"], {"test/acc": 0.5 + seed / 10})
    out = tmp_path / "out" / "table.md"
    with disk_fills(monkeypatch, room=10):  # the table's first line does not fit
        status = table([str(tmp_path / "sweep"), flag, str(out)])
    printed = capsys.readouterr()
    assert status == 2 and "| n |" in printed.out  # the table itself was printed
    errors = [line for line in printed.err.splitlines() if line.startswith("error:")]
    assert errors == [
        f"error: cannot write {out}: the disk is full ({errors[0].split('(')[1].split(')')[0]}); nothing partial was left; free some space, then run again."
    ]
    assert "Traceback" not in printed.err and not out.exists() and _no_temps(tmp_path) == []
