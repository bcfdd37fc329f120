"""DataLoader workers never die of a stop signal, whenever it lands (the CI flake of stop 17: SIGTERM to the process
group reached a freshly forked worker before its worker_init_fn ran, and the main process crashed mid-step)."""

from __future__ import annotations

import os
import signal
import threading

import pytest
import torch
from torch.utils.data import TensorDataset
from torch.utils.data._utils import signal_handling

from gain_exp.train.signals import StopSafeLoader, blocked, stop_signals


def _signalled_right_after_torch_setup(monkeypatch):
    """Every worker sends itself SIGTERM just after PyTorch's own worker setup, before any worker_init_fn: the
    narrowest moment a group-wide SIGTERM can land in."""
    original = signal_handling._set_worker_signal_handlers

    def setup_then_sigterm():
        original()
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(signal_handling, "_set_worker_signal_handlers", setup_then_sigterm)


def test_a_worker_signalled_before_its_init_fn_keeps_working(monkeypatch):
    _signalled_right_after_torch_setup(monkeypatch)
    data = TensorDataset(torch.arange(12))
    loader = StopSafeLoader(data, batch_size=3, num_workers=2)
    for _ in range(2):  # the workers are forked again each epoch
        assert torch.cat([b for (b,) in loader]).tolist() == list(range(12))


def test_the_main_process_still_gets_the_signal_after_the_workers_start():
    # thread-directed (pthread_kill): a process-directed os.kill may land on any thread that does not block it
    got = []
    main = threading.main_thread().ident
    old = signal.signal(signal.SIGTERM, lambda signum, _frame: got.append(signum))
    try:
        loader = StopSafeLoader(TensorDataset(torch.arange(4)), batch_size=2, num_workers=1)
        with blocked([signal.SIGTERM]):
            signal.pthread_kill(main, signal.SIGTERM)  # pending while blocked
            assert got == []
        assert got == [signal.SIGTERM]  # delivered once the block ends
        next(iter(loader))
        signal.pthread_kill(main, signal.SIGTERM)
        assert got == [signal.SIGTERM] * 2  # iterating left the main thread's mask as it was
    finally:
        signal.signal(signal.SIGTERM, old)


def test_submitit_jobs_also_stop_on_their_preemption_signal(monkeypatch):
    monkeypatch.delenv("SUBMITIT_EXECUTOR", raising=False)
    assert stop_signals() == [signal.SIGINT, signal.SIGTERM]
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
    assert stop_signals()[-1] == signal.SIGUSR2
    monkeypatch.setenv("SUBMITIT_PREEMPT_SIGNAL", "USR1")
    assert stop_signals()[-1] == signal.SIGUSR1


def test_the_loader_owns_its_worker_init_fn():
    with pytest.raises(ValueError, match="worker_init_fn"):
        StopSafeLoader(TensorDataset(torch.arange(4)), worker_init_fn=print)
