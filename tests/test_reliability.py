"""Issue 27, reliability: finished work is never lost or mixed, and the after-run tools stop cleanly.

Run directories: a finished run is never replaced without --overwrite (which clears it first), a run directory is
locked by the run writing there, a moved run resumes with its whole metrics history, a run whose batch-norm statistics
overflowed saves no non-finite checkpoint and is refused by evaluate / figure and skipped by table, and CAM exports
never overwrite one image's maps with another's. Tools: a stop signal reaches every job of `reproduce`, whose --resume
re-runs the interrupted ones, and `evaluate` stops in one sentence, marking what it did not score.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, compose, tiny_overrides
from test_table import make_run

from gain_exp import evaluate as evaluate_tool
from gain_exp import figure as figure_tool
from gain_exp import reproduce as reproduce_tool
from gain_exp import table as table_tool
from gain_exp.cams import image_names
from gain_exp.run import RunDirTaken, claim_run_dir, train
from gain_exp.runs.reload import refuse_diverged
from gain_exp.runs.rundir import Job
from gain_exp.tracking.json import JsonTracker
from gain_exp.train.checkpoints import saved_tracking
from gain_exp.train.engine import Diverged, Interrupted, Trainer


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def _app(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "gain_exp.run", *args], cwd=cwd, env=_env(), capture_output=True, text=True, timeout=600
    )


def _listing(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


def _alive(pid: int) -> bool:
    """The process runs (a zombie, dead but not yet reaped, does not count)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


# ---- A1: a finished run is never replaced by accident, and --overwrite leaves nothing of it ----


def test_a_finished_run_dir_is_refused_before_anything_is_written(tmp_path):
    run = make_run(tmp_path / "r", ["seed=0"], {"val/acc": 0.5})
    (run / "attention").mkdir()
    (run / "attention" / "val_epoch005.png").write_bytes(b"png")
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    before = _listing(run)
    with pytest.raises(RunDirTaken) as refused:
        claim_run_dir(run)
    sentence = str(refused.value)
    assert sentence.startswith(f"{run} already holds a finished run (summary.json: status completed)")
    assert "trainer.resume=auto" in sentence and "--overwrite" in sentence and "\n" not in sentence
    assert _listing(run) == before  # not even the lock file
    with pytest.raises(RunDirTaken):  # resuming another run's checkpoint here would replace this one too
        claim_run_dir(run, resume=str(tmp_path / "other"))
    claim_run_dir(run, resume="auto").close()  # continuing this very run is allowed
    claim_run_dir(run, resume=str(run / "checkpoints" / "last.ckpt")).close()
    claim_run_dir(run, overwrite=True).close()
    assert not any((run / name).exists() for name in ("attention", "metrics.jsonl", "summary.json"))
    assert (run / ".hydra" / "overrides.yaml").is_file()  # Hydra rewrites it for the new run


@pytest.mark.slow
def test_the_app_refuses_a_finished_run_dir_and_overwrite_replaces_it_cleanly(tmp_path):
    run = tmp_path / "run"
    tiny = [*tiny_overrides(tmp_path), f"hydra.run.dir={run}"]
    first = _app(tiny, tmp_path)  # 2 epochs: val panels of epochs 0 and 1
    assert first.returncode == 0, first.stderr[-3000:]
    saved, summary = (run / ".hydra" / "overrides.yaml").read_text(), (run / "summary.json").read_text()
    again = _app([*tiny, "seed=1", "trainer.epochs=1"], tmp_path)
    assert again.returncode == 2 and again.stderr.strip().splitlines() == [
        f"error: {run} already holds a finished run (summary.json: status completed), and nothing was written "
        f"there; continue that run with trainer.resume=auto, pick a new hydra.run.dir, or pass --overwrite to "
        f"replace it."
    ]
    assert (run / ".hydra" / "overrides.yaml").read_text() == saved and (run / "summary.json").read_text() == summary
    replaced = _app([*tiny, "seed=1", "trainer.epochs=1", "--overwrite"], tmp_path)
    assert replaced.returncode == 0, replaced.stderr[-3000:]
    assert json.loads((run / "summary.json").read_text())["seed"] == 1
    assert sorted(p.name for p in (run / "attention").iterdir()) == [
        "test_biased_epoch000.png",
        "test_unbiased_epoch000.png",
        "val_epoch000.png",
    ]  # no val_epoch001.png of the old run
    epochs = [json.loads(line).get("epoch") for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert 0 in epochs and 1 not in epochs  # the old run's epoch-1 lines are gone


# ---- A2: one run per directory at a time ----


def test_a_run_dir_in_use_is_refused_naming_the_other_process(tmp_path):
    run = tmp_path / "r"
    held = claim_run_dir(run)
    try:
        with pytest.raises(RunDirTaken, match=rf"^{run} is in use by another run \(pid {os.getpid()} on ") as refused:
            claim_run_dir(run)
        assert "pick another hydra.run.dir" in str(refused.value)
        assert claim_run_dir(run, writer=False) is None  # torchrun's other ranks neither lock nor wait
    finally:
        held.close()
    claim_run_dir(run).close()  # released with its holder


@pytest.mark.slow
def test_the_app_stops_when_another_run_writes_to_its_dir(tmp_path):
    run = tmp_path / "run"
    held = claim_run_dir(run)  # this test process plays the run already writing there
    try:
        proc = _app([*tiny_overrides(tmp_path), f"hydra.run.dir={run}"], tmp_path)
    finally:
        held.close()
    assert proc.returncode == 2, proc.stderr[-3000:]
    [line] = proc.stderr.strip().splitlines()
    assert line.startswith(f"error: {run} is in use by another run (pid {os.getpid()} on ")
    assert _listing(run) == [".lock"]  # no .hydra/, run.log or metrics of the second run


# ---- A3: a moved run directory resumes with its whole history ----


def test_a_moved_run_dir_keeps_its_metrics_history_on_resume(tmp_path):
    before = tmp_path / "before"
    tracker = JsonTracker(before)
    for step in (1, 2):
        tracker.log_metrics({"train/loss": 1.0 / step}, step)
    state = {"model": {}, "optimizer": {}, "epoch": 0, "step": 2, "tracking": {"json": tracker.state()}}
    tracker.finish({})
    (before / "checkpoints").mkdir()
    torch.save(state, before / "checkpoints" / "last.ckpt")
    after = tmp_path / "moved" / "after"
    after.parent.mkdir()
    shutil.move(before, after)
    resumed = JsonTracker(after, resume=saved_tracking("auto", after)["json"])
    resumed.log_metrics({"train/loss": 0.3}, 3)
    resumed.finish({})
    assert [json.loads(line)["step"] for line in (after / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


@pytest.mark.slow
def test_a_moved_interrupted_run_resumes_with_every_step_logged(tmp_path, tiny):
    with pytest.raises(Interrupted):
        train(compose([*tiny, "trainer.interrupt_after_steps=8"]), out_dir=tmp_path / "a")  # mid epoch 1
    logged = (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()
    shutil.move(tmp_path / "a", tmp_path / "b")
    train(compose([*tiny, "trainer.resume=auto"]), out_dir=tmp_path / "b")
    lines = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    assert lines[: len(logged)] == logged
    steps = [json.loads(line)["step"] for line in lines if "train/loss" in json.loads(line)]
    assert steps == list(range(1, 13))  # 2 epochs of 6 steps, each once


# ---- A4: no non-finite batch-norm statistics in a checkpoint; diverged runs are not scored ----


@pytest.mark.slow
def test_overflowed_batch_norm_statistics_diverge_and_are_never_saved(tmp_path, tiny, monkeypatch, capsys):
    real = Trainer.train_epoch

    def overflowing(self, epoch):
        stats = real(self, epoch)
        if epoch == 1:  # the loss stayed finite, but a running variance overflowed
            norm = next(m for m in self.gain.model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm))
            norm.running_var.fill_(float("inf"))
        return stats

    monkeypatch.setattr(Trainer, "train_epoch", overflowing)
    run = tmp_path / "run"
    with pytest.raises(Diverged, match=r"the weights are no longer finite at step 12 \(.*running_var is not\)"):
        train(compose([*tiny, "loss=baseline"]), out_dir=run)
    assert json.loads((run / "summary.json").read_text())["status"] == "diverged"
    for ckpt in (run / "checkpoints").glob("*.ckpt"):
        state = torch.load(ckpt, weights_only=True)
        assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point()), ckpt
    assert evaluate_tool.main([str(run), "--no-wandb"]) == 2
    assert f"error: {run} diverged in training" in capsys.readouterr().err
    refuse_diverged(run, str(run / "checkpoints" / "last.ckpt"))  # a file named explicitly may still be scored


def test_evaluate_and_figure_refuse_a_diverged_run_and_table_skips_it_with_a_warning(tmp_path, capsys):
    good = make_run(tmp_path / "sweep" / "0", ["seed=0"], {"val/acc": 0.5})
    bad = make_run(tmp_path / "sweep" / "1", ["seed=1"], {"val/acc": 0.25}, status="diverged")
    summary = json.loads((bad / "summary.json").read_text())
    summary["error"] = "the training loss became non-finite in epoch 3 (step 40); lower trainer.optimizer.lr"
    (bad / "summary.json").write_text(json.dumps(summary))
    sentence = (
        f"error: {bad} diverged in training (the training loss became non-finite in epoch 3 (step 40)), so its "
        f"numbers would describe broken weights; re-run it (e.g. with a lower trainer.optimizer.lr), or pass "
        f"--checkpoint with one of its checkpoint files to use those weights anyway."
    )
    assert evaluate_tool.main([str(bad), "--no-wandb"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [sentence]
    assert figure_tool.main([str(good), str(bad), "--out", str(tmp_path / "f.png")]) == 2
    assert f"error: {bad} diverged in training" in capsys.readouterr().err
    assert not (bad / "eval").exists() and not (tmp_path / "f.png").exists()
    assert table_tool.main([str(tmp_path / "sweep")]) == 0
    err = capsys.readouterr().err
    assert f"warning: skipped {bad}: it diverged in training (the training loss became non-finite" in err


# ---- A5: CAM exports name every image uniquely ----


def test_cam_file_names_are_unique_when_stems_repeat_across_folders(tmp_path):
    class Folder:
        def __init__(self, images):
            self.images = images

        def __len__(self):
            return len(self.images)

    root = tmp_path / "data"
    files = [
        root / "train" / "cat" / "001.png",
        root / "val" / "cat" / "001.png",  # same folder name and stem
        root / "val" / "dog" / "001.png",
        root / "val" / "dog" / "001.jpg",  # same stem, other suffix
        root / "val" / "bird" / "002.png",
    ]
    names = image_names(Folder(files), "train")
    assert len(set(names)) == len(files)
    assert names[:3] == ["train/cat/001.png", "val/cat/001.png", "val/dog/001.png"]
    names = image_names(Folder(files[:3] + files[4:]), "train")
    assert names == ["train/cat/001", "val/cat/001", "val/dog/001", "val/bird/002"]
    assert image_names(Folder([root / "a.png", root / "b.png"]), "val") == ["a", "b"]  # unique stems: as before
    with pytest.raises(ValueError, match=r"lists the image .*001\.png more than once"):
        image_names(Folder([files[0], files[0]]), "train")


# ---- B6, B7: stopping reproduce, and resuming it ----

FAKE_JOBS = textwrap.dedent(
    """
    import json, os, signal, subprocess, sys, time
    from pathlib import Path
    from gain_exp import reproduce
    from gain_exp.runs.rundir import Job

    HANG = '''
    import json, os, signal, subprocess, sys, time
    from pathlib import Path
    dest = Path(sys.argv[1])
    child = subprocess.Popen(["sleep", "120"])
    def stop(signum, frame):
        (dest / "summary.json").write_text(json.dumps({"status": "interrupted"}))
        sys.exit(130)
    signal.signal(signal.SIGTERM, stop)
    (dest / "pids").write_text(f"{os.getpid()} {child.pid}")
    time.sleep(120)
    '''
    FINISH = '''
    import json, sys
    from pathlib import Path
    summary = {"status": "completed", "final": {"val/acc": 0.5}, "choices": {"loss": "gain_ext"},
               "overrides": [sys.argv[2]], "seed": 0, "best": {}}
    (Path(sys.argv[1]) / "summary.json").write_text(json.dumps(summary))
    (Path(sys.argv[1]) / "argv").write_text(" ".join(sys.argv))
    '''

    def command(self, dest, extra_overrides=(), label=None):
        code = HANG if os.environ["FAKE_JOB"] == "hang" else FINISH
        return [sys.executable, "-c", code, str(dest), *self.overrides], dict(os.environ)

    Job.command = command
    sys.exit(reproduce.main(sys.argv[1:]))
    """
)


def _sources(tmp_path: Path) -> Path:
    for seed in (0, 1):
        make_run(tmp_path / "multi" / str(seed), [f"seed={seed}"], {"val/acc": 0.5})
    return tmp_path / "multi"


@pytest.mark.slow
def test_a_stopped_reproduce_stops_every_job_and_resume_runs_them_again(tmp_path):
    driver = tmp_path / "driver.py"
    driver.write_text(FAKE_JOBS)
    source, out = _sources(tmp_path), tmp_path / "out"
    command = [sys.executable, str(driver), str(source), "--out", str(out), "--jobs", "2"]
    proc = subprocess.Popen(
        command, env={**_env(), "FAKE_JOB": "hang"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    pid_files = [out / "0" / "pids", out / "1" / "pids"]
    pids: list[int] = []
    try:
        deadline = time.time() + 60
        while not all(p.is_file() and p.read_text() for p in pid_files) and time.time() < deadline:
            time.sleep(0.1)
        pids = [int(pid) for p in pid_files for pid in p.read_text().split()]
        assert len(pids) == 4
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 130, err
        assert err.strip().splitlines()[-1] == (
            f"stopped: signal 15 (SIGTERM) stopped 2 running job(s) (0, 1) and 0 were not started, so no "
            f"comparison was written; the finished jobs stay in {out}: continue with `gain-exp reproduce "
            f"{source} --out {out} --resume`."
        )
        deadline = time.time() + 10
        while any(_alive(pid) for pid in pids) and time.time() < deadline:
            time.sleep(0.1)
        assert not any(_alive(pid) for pid in pids)  # the jobs and the processes they started
        assert not (out / "comparison.json").exists()
        for job in ("0", "1"):
            assert json.loads((out / job / "summary.json").read_text())["status"] == "interrupted"
    finally:
        proc.kill()
        for pid in pids:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
    again = subprocess.run(
        [*command, "--resume"], env={**_env(), "FAKE_JOB": "finish"}, capture_output=True, text=True, timeout=120
    )
    assert again.returncode == 0, again.stderr
    record = json.loads((out / "comparison.json").read_text())
    assert record["failed_jobs"] == [] and {c["verdict"] for c in record["cells"]} == {"identical"}
    assert (out / "0" / "argv").read_text().endswith("seed=0 --overwrite")  # what the stopped job left is cleared


def test_resume_runs_interrupted_and_failed_jobs_again_and_keeps_completed_ones(tmp_path, monkeypatch):
    out = tmp_path / "out"
    make_run(out / "done", ["seed=0"], {"val/acc": 0.5})
    make_run(out / "cut", ["seed=1"], {"val/acc": 0.1}, status="interrupted")
    make_run(out / "broken", ["seed=2"], {}, status="failed")
    (out / "cut" / "attention").mkdir()
    started = []

    class FakePopen:
        pid = -1

        def __init__(self, argv, env, **kwargs):
            started.append(argv)
            dest = Path(argv[argv.index("--overwrite") - 1].split("=", 1)[1])  # hydra.run.dir=..., then the flag
            summary = json.loads((dest / "summary.json").read_text())
            (dest / "summary.json").write_text(json.dumps({**summary, "status": "completed"}))

        def wait(self):
            return 0

    monkeypatch.setattr(reproduce_tool.subprocess, "Popen", FakePopen)
    jobs = [Job(name=name, overrides=[f"seed={i}"]) for i, name in enumerate(("done", "cut", "broken"))]
    runs = reproduce_tool.run_jobs(jobs, out, resume=True)
    assert [r is not None and r.summary["status"] for r in runs] == ["completed"] * 3
    assert [a[-1] for a in started] == ["--overwrite", "--overwrite"] and len(started) == 2  # not "done"


# ---- B8: stopping evaluate ----

FAKE_EVALUATION = textwrap.dedent(
    """
    import os, signal, sys, time, types
    import torch
    from omegaconf import OmegaConf
    from gain_exp import evaluate

    class Evaluation:
        def __init__(self, split):
            self.metrics, self.rows, self.panels = {f"{split}/acc": 0.5}, [{"index": 0}], []

    class Evaluator:
        def evaluate(self, dataset, split, **kwargs):
            if split == "b":  # the stop arrives while the second split is scored
                os.kill(os.getpid(), getattr(signal, sys.argv[1]))
                time.sleep(60)
            return Evaluation(split)

    experiment = types.SimpleNamespace(
        checkpoint=None, runtime=types.SimpleNamespace(device=torch.device("cpu")), cfg=OmegaConf.create({"dataset": {}})
    )
    evaluate.load_checked = lambda *args, **kwargs: experiment
    evaluate.choose_splits = lambda experiment, wanted: {"a": [0], "b": [0], "c": [0]}
    evaluate.checkpoint_record = lambda path: {"name": "best", "epoch": 0}
    evaluate.build_evaluator = lambda experiment: Evaluator()
    sys.exit(evaluate.main([sys.argv[2], "--out", sys.argv[3], "--no-wandb"]))
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["SIGINT", "SIGTERM"])
def test_a_stopped_evaluation_says_what_it_scored_and_marks_the_rest(tmp_path, name):
    driver = tmp_path / "driver.py"
    driver.write_text(FAKE_EVALUATION)
    out = tmp_path / "eval"
    proc = subprocess.run(
        [sys.executable, str(driver), name, str(tmp_path / "run"), str(out)],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 130, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines() == [
        f"stopped: {name} during the evaluation; 1 split(s) were scored and written to {out} (a), the rest were "
        f"not (listed in {out / 'interrupted.json'}); run it again to score them."
    ]
    marker = json.loads((out / "interrupted.json").read_text())
    assert marker["stopped_by"] == name and marker["scored"] == ["a"] and marker["not_scored"] == ["b", "c"]
    assert (out / "a.json").is_file() and not (out / "b.json").exists()
