"""Where a run executes: its device and, under torchrun or SLURM, its place among the processes of one experiment.

Everything distributed goes through ``Runtime``: the loop asks it for its device, its rank, whether it is the main
process (the one that writes files and trackers), and for the three collectives it needs (sum, gather, agree). A
single process is a Runtime with world size 1 whose collectives return their input, so the loop has one code path.

Launch: ``torchrun --nproc_per_node=N -m gain_exp.run ...`` sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR; a
SLURM job with several tasks (``+launcher=slurm hydra.launcher.tasks_per_node=N``) gets them from submitit.
``gloo`` serves CPU tensors and ``nccl`` CUDA ones, chosen from the device.
"""

from __future__ import annotations

import datetime
import logging
import os
import signal
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.distributed as dist

from gain_exp.train.signals import blocked

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Runtime:
    """device, rank, world size; the collectives the loop needs (no-ops in a single process)."""

    device: torch.device
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """The process that writes checkpoints, summary.json, panels and trackers."""
        return self.rank == 0

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over processes, in place (autograd-free); returns the tensor."""
        if self.distributed:
            dist.all_reduce(tensor)
        return tensor

    def mean(self, tensor: torch.Tensor) -> torch.Tensor:
        """Mean over processes of a detached tensor (a new tensor; the input when there is one process)."""
        if not self.distributed:
            return tensor
        total = tensor.detach().clone()
        dist.all_reduce(total)
        return total / self.world_size

    mean_count = mean  # a row count summed over processes / world size: the losses' CountReducer

    def any(self, flag: bool) -> bool:
        """True on every process if it is True on one (a CPU collective: no device sync)."""
        if not self.distributed:
            return flag
        value = torch.tensor([int(flag)])
        dist.all_reduce(value, op=dist.ReduceOp.MAX, group=_cpu_group())
        return bool(value.item())

    def gather(self, obj: Any) -> list[Any]:
        """Every process's ``obj``, in rank order, on every process."""
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=_cpu_group())
        return out

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier(group=_cpu_group())

    @contextmanager
    def main_first(self) -> Iterator[None]:
        """The main process runs the block first (e.g. writing a cache), the others after it."""
        if not self.is_main:
            self.barrier()
        yield
        if self.is_main:
            self.barrier()


def launched_processes() -> tuple[int, int, int] | None:
    """(rank, world size, local rank) when this process is one of several of one experiment, else None.

    torchrun's variables come first; a SLURM job step with several tasks run by submitit (hydra-submitit-launcher)
    is read through submitit, which also sets MASTER_ADDR/MASTER_PORT for the rendezvous.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", "0"))
    tasks = os.environ.get("SUBMITIT_LOCAL_NTASKS") or os.environ.get("SLURM_NTASKS") or "1"
    if _in_submitit() and int(tasks) > 1:
        from submitit.helpers import TorchDistributedEnvironment

        env = TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        return env.rank, env.world_size, env.local_rank
    return None


def init_runtime(device: torch.device) -> Runtime:
    """The Runtime of this process on ``device``: joins the process group when launched as several processes.

    With CUDA each process takes GPU LOCAL_RANK. Idempotent: a process group that exists already is reused.
    """
    placement = launched_processes()
    if placement is None:
        return Runtime(device)
    rank, world, local = placement
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    _join(rank, world)
    log.info("process %d of %d on %s", rank, world, device)
    return Runtime(device, rank=rank, world_size=world, local_rank=local)


def _join(rank: int, world: int) -> None:
    """Join the process group once: gloo for CPU tensors, and nccl for CUDA ones where CUDA exists."""
    if dist.is_initialized():
        return
    backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    # The process group's threads block the stop signals (they inherit this mask), so SIGTERM / USR2 reach the main
    # thread only and never interrupt a collective's socket I/O midway (that left the processes out of step).
    with blocked([signal.SIGINT, signal.SIGTERM, signal.SIGUSR2]):
        dist.init_process_group(backend=backend, rank=rank, world_size=world, timeout=datetime.timedelta(minutes=30))
        _cpu_group()


class _SharedClock(datetime.datetime):
    """``datetime`` whose now() is one instant chosen by rank 0 (see share_start_time)."""

    start: datetime.datetime

    @classmethod
    def now(cls, tz: Any = None) -> datetime.datetime:  # type: ignore[override]
        return cls.start if tz is None else cls.start.astimezone(tz)


def share_start_time() -> None:
    """Make Hydra's ``${now:...}`` the same instant on every process, so all of them name the same run dir.

    Hydra's ``now`` resolver reads ``datetime`` from hydra.core.utils at call time; it is pointed at rank 0's clock.
    """
    placement = launched_processes()
    if placement is None:
        return
    _join(placement[0], placement[1])
    box = [datetime.datetime.now()]
    dist.broadcast_object_list(box, src=0, group=_cpu_group())
    import hydra.core.utils

    _SharedClock.start = box[0]
    hydra.core.utils.datetime = _SharedClock  # type: ignore[attr-defined]


def close_runtime() -> None:
    """Leave the process group (end of a run under torchrun)."""
    global _CPU_GROUP
    if dist.is_initialized():
        dist.destroy_process_group()
    _CPU_GROUP = None


_CPU_GROUP: Any = None


def _cpu_group() -> Any:
    """A gloo group for host-side collectives (flags, objects) whatever the main backend is."""
    global _CPU_GROUP
    if _CPU_GROUP is None:
        _CPU_GROUP = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else dist.group.WORLD
    return _CPU_GROUP


def _in_submitit() -> bool:
    return "SUBMITIT_EXECUTOR" in os.environ  # set by submitit's local and SLURM executors in every task
