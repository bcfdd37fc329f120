"""Several processes train one experiment like one process (gloo on CPU, 2 processes).

- one optimiser step under DDP equals one process on the whole global batch, for both formulations and every grad
  mode, with pair / mask counts that differ between the processes' shares;
- evaluation under 2 processes equals one process exactly on a split whose size 2 does not divide;
- torchrun end to end: one run dir (with ${now:...} in its name), one summary.json, one checkpoint set, metrics that
  agree with one process; SIGTERM to the process group mid-epoch, then resume, ends exactly like an uninterrupted
  2-process run.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from conftest import ROOT, compose

from gain_exp.run import train

pytestmark = pytest.mark.slow  # every test here starts processes (gloo) or runs torchrun

COMBOS = [(f, g) for f in ("batch", "per_label") for g in ("full", "features", "frozen")]
GLOBAL_BATCH, SIZE, K = 8, 32, 4


def _inputs():
    """A global batch whose two halves differ in (image, label) pairs and in masks that feed L_e."""
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(GLOBAL_BATCH, 3, SIZE, SIZE, generator=gen)
    targets = torch.zeros(GLOBAL_BATCH, K)
    for i, labels in enumerate([[0], [1, 2], [3], [0, 1, 2], [2], [1], [0, 3], [3]]):
        targets[i, labels] = 1.0
    seg = torch.randint(0, K + 1, (GLOBAL_BATCH, SIZE, SIZE), generator=gen)
    use_mask = torch.tensor([True, False, False, False, True, True, False, True])
    return images, targets, seg, use_mask


def _setup(formulation: str, grad_mode: str):
    import timm

    from gain_exp.core.gain import GAIN
    from gain_exp.core.losses import GAINLoss

    torch.manual_seed(0)
    model = timm.create_model("convnext_atto", pretrained=False, num_classes=K)  # LayerNorm: no batch statistics
    # an inner stage (8 x 8 at 32 px): the last one is 1 x 1 there, where a max-normalised map is degenerate
    gain = GAIN(
        model,
        grad_layer="stages.1",
        formulation=formulation,
        grad_mode=grad_mode,
        multi_label=True,
        normalisation="max",
        freeze_am_bn=False,
    )
    loss = GAINLoss(multi_label=True, am_weight=1.0, ex_weight=10.0)
    return gain, loss, torch.optim.SGD(model.parameters(), lr=0.1)


def _step(module, loss, optimizer, images, targets, seg, use_mask, count=None):
    module.train()
    out = module(images, targets, attention=True, mining=True)
    terms = loss(out, targets, seg, use_mask, 0, count=count)
    optimizer.zero_grad()
    terms.total.backward()
    optimizer.step()
    return terms


def _eval_split(runtime, root: Path):
    """convnext_atto with fixed weights on 17 shapes images, eval batches of 4: metrics and panel indices."""
    from gain_exp.data.shapes import build
    from gain_exp.train.evaluation import Evaluator

    gain, loss, _ = _setup("per_label", "features")
    data = build(
        root=str(root),
        image_size=SIZE,
        n_train=8,
        n_val=17,
        n_test=4,
        mean=(0.5,) * 3,
        std=(0.25,) * 3,
        seed=0,
        batch_size=8,
        val_bias="balanced",  # cue-conflicting val images, so cue_follow's counts are summed over processes too
    )
    gain.model.reset_classifier(data.num_classes)
    evaluator = Evaluator(
        gain, loss, data, runtime, batch_size=4, workers=0, amp=False, mean=(0.5,) * 3, std=(0.25,) * 3, progress=False
    )
    result = evaluator.evaluate(data.val, "val", panels=6)
    return result.metrics, [p.index for p in result.panels]


def _worker(rank: int, world: int, port: int, out: str, tmp: str) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)
    from torch.nn.parallel import DistributedDataParallel

    from gain_exp.train.runtime import close_runtime, init_runtime

    runtime = init_runtime(torch.device("cpu"))
    images, targets, seg, use_mask = _inputs()
    share = slice(rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world)
    results = {}
    for formulation, grad_mode in COMBOS:
        gain, loss, optimizer = _setup(formulation, grad_mode)
        terms = _step(
            DistributedDataParallel(gain),
            loss,
            optimizer,
            images[share],
            targets[share],
            seg[share],
            use_mask[share],
            count=runtime.mean_count,
        )
        logged = runtime.mean(terms.stacked())
        results[formulation, grad_mode] = ([p.detach().clone() for p in gain.parameters()], logged)
    evaluation = _eval_split(runtime, Path(tmp) / f"shapes{rank}")
    if rank == 0:
        torch.save({"steps": results, "eval": evaluation}, out)
    close_runtime()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    """What rank 0 of a 2-process group computed (one spawn serves every check below)."""
    tmp = tmp_path_factory.mktemp("ddp")
    out = tmp / "rank0.pt"
    mp.spawn(_worker, args=(2, _free_port(), str(out), str(tmp)), nprocs=2, join=True)
    return {**torch.load(out, weights_only=False), "tmp": tmp}


@pytest.mark.parametrize("formulation,grad_mode", COMBOS)
def test_one_ddp_step_equals_one_process_on_the_global_batch(two_processes, formulation, grad_mode):
    gain, loss, optimizer = _setup(formulation, grad_mode)
    before = [p.detach().clone() for p in gain.parameters()]
    terms = _step(gain, loss, optimizer, *_inputs())
    ddp_params, ddp_logged = two_processes["steps"][formulation, grad_mode]
    moved = 0.0
    for p, q, p0 in zip(gain.parameters(), ddp_params, before):
        torch.testing.assert_close(q, p.detach(), rtol=1e-5, atol=1e-6)
        moved = max(moved, float((p.detach() - p0).abs().max()))
    assert moved > 1e-3  # the step did change the weights, so equality is not trivial
    torch.testing.assert_close(ddp_logged, terms.stacked(), rtol=1e-5, atol=1e-6)  # logged = global batch's terms
    assert float(terms.ex.detach()) > 0 and float(terms.am.detach()) > 0


def test_evaluation_under_two_processes_equals_one_exactly(two_processes):
    from gain_exp.train.runtime import Runtime

    metrics, panels = _eval_split(Runtime(torch.device("cpu")), two_processes["tmp"] / "shapes_one")
    ddp_metrics, ddp_panels = two_processes["eval"]
    assert metrics["val/loc_n"] == 17.0  # every image once, though 2 does not divide 17 (5 batches: 3 + 2)
    # group accuracy too: per-group counts summed over both processes' batches equal one process's (17 images)
    assert sum(v for k, v in metrics.items() if k.startswith("val/group_n/")) == 17.0
    assert "val/worst_group_acc" in ddp_metrics and ddp_metrics["val/cue_conflict_n"] > 0  # conflict counts add too
    assert json.dumps(ddp_metrics, sort_keys=True) == json.dumps(metrics, sort_keys=True)  # NaNs compare too
    assert ddp_panels == panels == list(range(6))


# ------------------------------------------------------------------------------------------------ end to end
def _torchrun(args: list[str], cwd: Path, wait: bool = True):
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "HF_HUB_OFFLINE": "1",
        "WANDB_MODE": "offline",
        "OMP_NUM_THREADS": "1",
    }
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "gain_exp.run",
        *args,
    ]
    proc = subprocess.Popen(
        cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=open(cwd / "stderr.txt", "ab"), start_new_session=True
    )
    if wait:
        proc.wait(timeout=300)
    return proc


def _e2e_overrides(tmp: Path) -> list[str]:
    return [
        "backbone.name=convnext_atto",
        "backbone.grad_layer=stages.1",
        f"dataset.root={tmp / 'shapes'}",
        "dataset.image_size=32",
        "dataset.n_train=96",
        "dataset.n_val=17",
        "dataset.n_test=16",
        "dataset.masks_to_use=0.5",
        "trainer.epochs=2",
        "trainer.batch_size=8",
        "trainer.eval_batch_size=4",
        "trainer.num_panels=2",
        "trainer.log_every_n_steps=1",
        "loss.am_start_epoch=1",
        "logger=json",
        "trainer.device=cpu",
        "trainer.sync_bn=true",
        "formulation=per_label",
        "trainer.optimizer.lr=1e-4",
    ]


def test_torchrun_trains_one_run_like_one_process_and_resumes_exactly(tmp_path):
    args = _e2e_overrides(tmp_path)
    # the default run dir (with ${now:...} to the second): both processes must agree on it
    whole = _torchrun(args, tmp_path)
    assert whole.returncode == 0, (tmp_path / "stderr.txt").read_text()[-3000:]
    runs = list((tmp_path / "outputs" / "runs").iterdir())
    assert len(runs) == 1, runs  # one run dir, one summary, one set of checkpoints
    run = runs[0]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["epochs_completed"] == 2
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]
    steps = [
        json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines() if "train/loss" in line
    ]
    assert steps == list(range(1, 25))  # 96 / 8 global batches x 2 epochs, logged once (by rank 0)

    one = train(compose(args), out_dir=tmp_path / "one")  # one process, same global batch
    for key in ("val/loss_cl", "train/mean_loss", "test_unbiased/loss_cl"):
        assert summary["final"][key] == pytest.approx(one["final"][key], rel=1e-4), key
    assert summary["final"]["val/loc_n"] == one["final"]["val/loc_n"] == 17.0

    # SIGTERM to the whole process group (what scancel does) mid-epoch 1, then resume in place
    cut = tmp_path / "cut"
    proc = _torchrun(args + [f"hydra.run.dir={cut}"], tmp_path, wait=False)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        lines = (cut / "metrics.jsonl").read_text().splitlines() if (cut / "metrics.jsonl").exists() else []
        if sum('"train/loss"' in x for x in lines) >= 15:
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=120)
    state = torch.load(cut / "checkpoints" / "last.ckpt", weights_only=True)
    assert json.loads((cut / "summary.json").read_text())["status"] == "interrupted"
    assert 15 <= state["step"] < 24 and state["batch_in_epoch"] > 0 and len(state["rng_ranks"]) == 2
    resumed = _torchrun(args + [f"hydra.run.dir={cut}", "trainer.resume=auto"], tmp_path)
    assert resumed.returncode == 0, (tmp_path / "stderr.txt").read_text()[-3000:]
    again = json.loads((cut / "summary.json").read_text())
    assert again["status"] == "completed" and again["resumed"]["from"].endswith("last.ckpt")
    assert again["final"] == summary["final"]


def _task_pids(folder: Path) -> list[int]:
    """Processes running a submitit task whose job folder is under ``folder``."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        if proc.name.isdigit() and b"submitit.core._submit" in cmd and any(str(folder).encode() in c for c in cmd):
            pids.append(int(proc.name))
    return pids


def test_slurm_path_two_tasks_preempted_requeue_and_resume(tmp_path):
    # +launcher=submitit_local with 2 tasks: one DDP experiment whose ranks come from submitit, as on SLURM. The
    # preemption signal (USR2) mid-epoch saves a checkpoint, submitit requeues the job, and it resumes to the end.
    sweep = tmp_path / "sweep"
    args = [
        "--config-dir",
        str(ROOT / "sweeps"),
        *_e2e_overrides(tmp_path),
        "+launcher=submitit_local",
        "hydra.launcher.tasks_per_node=2",
        f"hydra.sweep.dir={sweep}",
    ]
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "HF_HUB_OFFLINE": "1",
        "WANDB_MODE": "offline",
        "OMP_NUM_THREADS": "1",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "gain_exp.run", *args],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=open(tmp_path / "stderr.txt", "ab"),
    )
    metrics = sweep / "0" / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        lines = metrics.read_text().splitlines() if metrics.exists() else []
        if sum('"train/loss"' in x for x in lines) >= 15:
            break
        time.sleep(0.05)
    pids = _task_pids(sweep / ".submitit")
    assert len(pids) == 2, pids
    for pid in pids:  # SLURM signals every task of the job
        os.kill(pid, signal.SIGUSR2)
    assert proc.wait(timeout=300) == 0, (tmp_path / "stderr.txt").read_text()[-3000:]
    summary = json.loads((sweep / "0" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["epochs_completed"] == 2
    assert summary["resumed"]["from"].endswith("last.ckpt")  # the requeued job continued from the saved step
    state = torch.load(sweep / "0" / "checkpoints" / "last.ckpt", weights_only=True)
    assert len(state["rng_ranks"]) == 2 and state["step"] == 24
    logs = "".join(p.read_text() for p in (sweep / ".submitit").glob("*/*_0_log.*"))
    assert "Requeued job" in logs or "requeu" in logs.lower()
    one = train(compose(_e2e_overrides(tmp_path)), out_dir=tmp_path / "one")
    for key in ("val/loss_cl", "train/mean_loss", "test_unbiased/loss_cl"):
        assert summary["final"][key] == pytest.approx(one["final"][key], rel=1e-4), key


def test_trainer_refuses_batches_and_splits_that_cannot_be_shared_by_the_processes(tmp_path, tiny):
    import dataclasses
    from types import SimpleNamespace

    import timm

    from gain_exp.config.plan import make_plan
    from gain_exp.core.gain import GAIN
    from gain_exp.core.losses import GAINLoss
    from gain_exp.data.base import DataSplits
    from gain_exp.tracking import Trackers
    from gain_exp.train.engine import Trainer
    from gain_exp.train.experiment import Experiment
    from gain_exp.train.runtime import Runtime

    plan = make_plan(compose(tiny + ["trainer.batch_size=7"])).with_data(SimpleNamespace(multi_label=False), False)
    gain = GAIN(timm.create_model("test_resnet", pretrained=False, num_classes=2))
    two = Runtime(torch.device("cpu"), rank=0, world_size=2)  # no process group needed: both checks come first

    def trainer(plan, n_train):
        data = DataSplits(train=list(range(n_train)), val=[], tests={}, classes=["a", "b"], multi_label=False)
        optimizer = torch.optim.SGD(gain.parameters(), lr=0.1)
        experiment = Experiment(plan, two, data, gain, GAINLoss(multi_label=False), optimizer, None)
        return Trainer(experiment, tmp_path, Trackers([]))

    with pytest.raises(ValueError, match=r"^trainer\.batch_size=7 is the global batch and must split evenly over 2 "):
        trainer(plan, 10)
    with pytest.raises(ValueError, match=r"^the train split has 1 images, fewer than the 2 processes"):
        trainer(dataclasses.replace(plan, trainer=dataclasses.replace(plan.trainer, batch_size=8)), 1)
