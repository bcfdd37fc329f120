"""The signals that stop a run (Ctrl-C, scancel, preemption) and a DataLoader whose workers never die of them.

scancel, SLURM preemption and Ctrl-C signal every process of the job, DataLoader workers included. The main process
only sets a flag (engine.Trainer._signals), finishes the step, saves and exits; a worker that died of the signal would
instead crash the main process mid-step ("DataLoader worker ... is killed by signal: Terminated") before it could
save. So workers ignore the stop signals, and they hold them blocked from the moment they are forked: a signal that
lands before a worker has set itself to ignore them (between PyTorch's own worker setup and ``worker_init_fn``) waits,
and is then discarded.
"""

from __future__ import annotations

import os
import signal
from contextlib import contextmanager
from typing import Any, Iterable, Iterator

from torch.utils.data import DataLoader


def stop_signals() -> list[int]:
    """Signals that stop training after the current step: Ctrl-C, SIGTERM (scancel, torchrun, preemption) and, in a
    job run by submitit (hydra-submitit-launcher), its preemption / time-out signal (USR2 unless configured), after
    which run.task hands the saved run back to submitit to requeue."""
    stops = [signal.SIGINT, signal.SIGTERM]
    if "SUBMITIT_EXECUTOR" in os.environ:
        stops.append(getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2")))
    return stops


@contextmanager
def blocked(signals: Iterable[int]) -> Iterator[None]:
    """Hold ``signals`` pending in this thread (and in threads and processes it starts meanwhile, which inherit the
    mask); they are delivered when the block ends."""
    before = signal.pthread_sigmask(signal.SIG_BLOCK, set(signals))
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)


def _ignore_stop_signals(_worker: int) -> None:
    stops = stop_signals()
    for s in stops:
        signal.signal(s, signal.SIG_IGN)  # a signal pending since the fork is discarded here
    signal.pthread_sigmask(signal.SIG_UNBLOCK, set(stops))


class StopSafeLoader(DataLoader):
    """DataLoader whose worker processes ignore the stop signals from their first instruction on; the main process
    shuts them down itself when it stops."""

    def __init__(self, dataset: Any, **kwargs: Any) -> None:
        if kwargs.get("worker_init_fn") is not None:
            raise ValueError("StopSafeLoader sets worker_init_fn itself")
        super().__init__(dataset, worker_init_fn=_ignore_stop_signals, **kwargs)

    def __iter__(self) -> Iterator[Any]:
        if self.num_workers == 0:
            return super().__iter__()
        with blocked(stop_signals()):  # the workers are forked here and start with the stop signals blocked
            return super().__iter__()
