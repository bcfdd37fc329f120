"""One checkpoint policy (gain_exp.train.checkpoints.CheckpointPolicy): which files an epoch gets (best when the
monitor improved, last always, epoch_NNN every checkpoint_every epochs), all from one serialisation of the state."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import compose

from gain_exp.output.files import TEMP_GLOB
from gain_exp.run import train
from gain_exp.train.checkpoints import CheckpointPolicy


class _State:
    """A state function that counts its calls; each call's state differs (its call number)."""

    def __init__(self, main: bool = True) -> None:
        self.calls, self.main = 0, main

    def __call__(self) -> dict | None:
        self.calls += 1
        return {"call": self.calls, "weights": torch.arange(4.0) * self.calls} if self.main else None


@pytest.fixture
def saves(monkeypatch):
    """The states torch.save serialises (checkpoint states only: those with a "model" or "call" entry)."""
    seen: list[dict] = []
    real = torch.save

    def counting(obj, *args, **kwargs):
        if isinstance(obj, dict) and ("model" in obj or "call" in obj):
            seen.append(obj)
        return real(obj, *args, **kwargs)

    monkeypatch.setattr(torch, "save", counting)
    return seen


def test_an_improving_epoch_serialises_once_and_best_equals_last(tmp_path, saves):
    policy, state = CheckpointPolicy(tmp_path, "val/acc", "max"), _State()
    written = policy.after_epoch(0, {"val/acc": 0.5}, state)
    assert list(written) == ["best", "last"] and state.calls == 1 and len(saves) == 1
    assert written["best"].read_bytes() == written["last"].read_bytes()
    assert torch.load(written["best"], weights_only=True)["call"] == 1
    assert policy.best == {"metric": "val/acc", "value": 0.5, "epoch": 0}
    assert not list(tmp_path.glob(TEMP_GLOB))


def test_a_non_improving_epoch_leaves_best_alone(tmp_path, saves):
    policy, state = CheckpointPolicy(tmp_path, "val/acc", "max"), _State()
    policy.after_epoch(0, {"val/acc": 0.5}, state)
    best = (tmp_path / "best.ckpt").read_bytes()
    for epoch, value in ((1, 0.5), (2, 0.4)):  # a tie does not improve
        assert list(policy.after_epoch(epoch, {"val/acc": value}, state)) == ["last"]
    assert (tmp_path / "best.ckpt").read_bytes() == best and policy.best["epoch"] == 0
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["call"] == 3 and len(saves) == 3
    assert list(policy.after_epoch(3, {"val/acc": 0.9}, state)) == ["best", "last"]
    assert policy.best == {"metric": "val/acc", "value": 0.9, "epoch": 3}
    assert torch.load(tmp_path / "best.ckpt", weights_only=True)["call"] == 4


def test_min_mode_keeps_the_lowest(tmp_path):
    policy, state = CheckpointPolicy(tmp_path, "val/loss", "min"), _State()
    chosen = [("best" in policy.after_epoch(e, {"val/loss": v}, state)) for e, v in enumerate((1.0, 2.0, 0.5, 0.7))]
    assert chosen == [True, False, True, False] and policy.best == {"metric": "val/loss", "value": 0.5, "epoch": 2}


def test_checkpoint_every_copies_last_under_the_number_of_epochs_done(tmp_path, saves):
    policy, state = CheckpointPolicy(tmp_path, "val/acc", "max", every=2), _State()
    names = [list(policy.after_epoch(e, {"val/acc": 0.1}, state)) for e in range(4)]
    assert names == [["best", "last"], ["last", "epoch_002"], ["last"], ["last", "epoch_004"]]
    assert (tmp_path / "epoch_004.ckpt").read_bytes() == (tmp_path / "last.ckpt").read_bytes()
    assert torch.load(tmp_path / "epoch_002.ckpt", weights_only=True)["call"] == 2
    assert len(saves) == 4 and sorted(p.name for p in tmp_path.iterdir()) == [
        "best.ckpt",
        "epoch_002.ckpt",
        "epoch_004.ckpt",
        "last.ckpt",
    ]
    assert list(CheckpointPolicy(tmp_path, "val/acc", every=None).after_epoch(0, {}, state)) == ["last"]


@pytest.mark.parametrize("value", [None, math.nan, "missing"])
def test_a_missing_or_nan_monitor_never_becomes_best(tmp_path, value):
    policy, state = CheckpointPolicy(tmp_path, "val/acc", "max"), _State()
    metrics = {} if value == "missing" else {"val/acc": value}
    assert list(policy.after_epoch(0, metrics, state)) == ["last"]
    assert policy.best == {"metric": "val/acc", "value": None, "epoch": None} and not (tmp_path / "best.ckpt").exists()
    policy.after_epoch(1, {"val/acc": 0.2}, state)
    assert list(policy.after_epoch(2, metrics, state)) == ["last"] and policy.best["epoch"] == 1


@pytest.mark.parametrize("mode", ["max", "min"])
def test_a_tiebreak_decides_only_between_epochs_whose_monitor_ties(tmp_path, mode):
    """A worst-group monitor stuck at 0 for every epoch (the degenerate case): the tie-break metric picks the epoch."""
    sign = 1 if mode == "max" else -1
    policy, state = CheckpointPolicy(tmp_path, "val/wg", mode, tiebreak="val/mean"), _State()
    epochs = [  # (monitor, tiebreak) -> best epoch after it
        ((0.0, 0.30 * sign), 0),
        ((0.0, 0.50 * sign), 1),  # tie, better tiebreak: the later epoch wins
        ((0.0, 0.40 * sign), 1),  # tie, worse tiebreak
        ((0.0, 0.50 * sign), 1),  # tie on both: the earlier stays
        ((0.0, math.nan), 1),  # a NaN tiebreak never wins a tie
        ((0.1 * sign, 0.0), 5),  # a better monitor wins whatever its tiebreak
        ((0.1 * sign, 0.9 * sign), 6),
    ]
    for epoch, ((value, second), best) in enumerate(epochs):
        written = policy.after_epoch(epoch, {"val/wg": value, "val/mean": second}, state)
        assert policy.best["epoch"] == best and ("best" in written) == (best == epoch), epoch
    assert policy.best == {
        "metric": "val/wg",
        "value": 0.1 * sign,
        "epoch": 6,
        "tiebreak": {"metric": "val/mean", "value": 0.9 * sign},
    }
    plain = CheckpointPolicy(tmp_path / "plain", "val/wg", mode)  # without one, a tie never improves
    for epoch, ((value, second), _) in enumerate(epochs[:4]):
        plain.after_epoch(epoch, {"val/wg": value, "val/mean": second}, state)
    assert plain.best["epoch"] == 0 and "tiebreak" not in plain.best


def test_other_processes_call_the_state_once_and_write_nothing(tmp_path):
    """The state function gathers every process's RNG streams (a collective): one call per epoch on each process."""
    policy, state = CheckpointPolicy(tmp_path, "val/acc", "max", every=1), _State(main=False)
    written = policy.after_epoch(0, {"val/acc": 0.3}, state)
    assert list(written) == ["best", "last", "epoch_001"] and state.calls == 1
    assert policy.best["epoch"] == 0 and not list(tmp_path.iterdir())


def test_an_unknown_mode_is_one_sentence(tmp_path):
    with pytest.raises(ValueError, match=r"^trainer\.monitor_mode=median must be max or min$"):
        CheckpointPolicy(tmp_path, "val/acc", "median")


def test_a_fit_serialises_its_state_once_per_epoch(tmp_path, tiny, saves, one_thread):
    """Two epochs, checkpoint_every=1: best (at least epoch 0), last and epoch_NNN, yet only two torch.save calls."""
    out = tmp_path / "run"
    summary = train(compose(tiny + ["trainer.checkpoint_every=1"]), out_dir=out)
    folder = out / "checkpoints"
    assert summary["status"] == "completed" and len(saves) == 2
    assert sorted(p.name for p in folder.iterdir()) == ["best.ckpt", "epoch_001.ckpt", "epoch_002.ckpt", "last.ckpt"]
    assert (folder / "epoch_002.ckpt").read_bytes() == (folder / "last.ckpt").read_bytes()
    best_epoch = summary["best"]["epoch"]
    assert (folder / "best.ckpt").read_bytes() == (folder / f"epoch_{best_epoch + 1:03d}.ckpt").read_bytes()
    best = torch.load(folder / "best.ckpt", weights_only=True)
    assert best["epoch"] == best_epoch + 1 and best["best"] == summary["best"]
