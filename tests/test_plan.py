"""The plan (gain_exp/config/plan.py) and what the experiment builds from it: optimizer and schedule by _target_."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from conftest import compose, tiny_overrides

from gain_exp.config.plan import make_plan
from gain_exp.train.checkpoints import config_changes
from gain_exp.train.experiment import build_experiment
from gain_exp.train.runtime import Runtime


def _build(tmp_path: Path, *overrides: str):
    plan = make_plan(compose([*tiny_overrides(tmp_path), "trainer.epochs=6", *overrides]))
    return build_experiment(plan, Runtime(torch.device("cpu")))


def _lrs(experiment, epochs: int = 6) -> list[float]:
    """The learning rate of each epoch, as the loop steps the scheduler once per epoch."""
    rates = []
    for _ in range(epochs):
        rates.append(experiment.optimizer.param_groups[0]["lr"])
        experiment.optimizer.step()
        if experiment.scheduler is not None:
            experiment.scheduler.step()
    return rates


def test_the_default_schedule_is_cosine_over_the_runs_epochs(tmp_path):
    experiment = _build(tmp_path)
    assert isinstance(experiment.optimizer, torch.optim.AdamW)
    assert isinstance(experiment.scheduler, torch.optim.lr_scheduler.CosineAnnealingLR)
    assert experiment.scheduler.T_max == 6
    assert _lrs(experiment) == pytest.approx([1e-3 * (1 + math.cos(math.pi * e / 6)) / 2 for e in range(6)])


def test_any_torch_scheduler_or_none_by_target(tmp_path):
    assert _build(tmp_path, "trainer.scheduler=null").scheduler is None
    step = _build(
        tmp_path,
        "trainer.scheduler._target_=torch.optim.lr_scheduler.StepLR",
        "~trainer.scheduler.T_max",
        "+trainer.scheduler.step_size=2",
        "+trainer.scheduler.gamma=0.5",
    )
    assert _lrs(step) == pytest.approx([1e-3, 1e-3, 5e-4, 5e-4, 2.5e-4, 2.5e-4])
    sgd = _build(tmp_path, "trainer.optimizer._target_=torch.optim.SGD", "+trainer.optimizer.momentum=0.9")
    assert isinstance(sgd.optimizer, torch.optim.SGD) and sgd.optimizer.param_groups[0]["momentum"] == 0.9


def test_warmup_then_cosine(tmp_path):
    experiment = _build(
        tmp_path,
        "trainer.scheduler._target_=gain_exp.train.schedules.warmup_cosine",
        "+trainer.scheduler.warmup_epochs=2",
    )
    rates = _lrs(experiment)
    assert rates[0] == pytest.approx(1e-4) and rates[1] == pytest.approx(5.5e-4)  # 0.1 x lr, linearly up
    assert rates[2] == pytest.approx(1e-3)  # the cosine over the remaining 4 epochs starts at lr
    assert rates[2] > rates[3] > rates[4] > rates[5] > 0
    with pytest.raises(ValueError, match=r"^trainer\.scheduler\.warmup_epochs=6 must be >= 1 and below T_max=6"):
        _build(
            tmp_path,
            "trainer.scheduler._target_=gain_exp.train.schedules.warmup_cosine",
            "+trainer.scheduler.warmup_epochs=6",
        )


def test_a_checkpoint_from_before_scheduler_nodes_resumes_and_a_longer_run_is_applied(tmp_path):
    new = {
        "trainer": {
            "epochs": 8,
            "scheduler": {"_target_": "torch.optim.lr_scheduler.CosineAnnealingLR", "_partial_": True, "T_max": 8},
        }
    }
    old = {"trainer": {"epochs": 4, "scheduler": "cosine"}}  # how trainer.scheduler was saved before
    changed = config_changes(old, new, tmp_path / "last.ckpt")
    assert changed == {"trainer.epochs": [4, 8], "trainer.scheduler.T_max": [4, 8]}
    # the GAIN class saved under its old module path is the same class: nothing to note
    moved = {**new, "gain": {"_target_": "gain_exp.core.gain.GAIN"}}
    assert config_changes({**new, "gain": {"_target_": "gain_exp.gain.GAIN"}}, moved, tmp_path / "last.ckpt") == {}
    step = {"trainer": {"epochs": 8, "scheduler": {"_target_": "torch.optim.lr_scheduler.StepLR", "_partial_": True}}}
    with pytest.raises(ValueError, match="trainer.scheduler._target_=torch.optim.lr_scheduler.CosineAnnealingLR"):
        config_changes(new, step, tmp_path / "last.ckpt")  # another kind of schedule is another experiment


def test_checks_that_need_the_data_run_at_the_end_of_the_build(tmp_path):
    # no masks in the L_e budget is known only once the data is built; the sentence names the fix
    with pytest.raises(ValueError, match=r"^loss\.ex_weight=.* needs pixel masks but dataset\.masks_to_use=0"):
        _build(tmp_path, "loss=gain_ext", "dataset.masks_to_use=0")
    experiment = _build(tmp_path)
    assert experiment.plan.monitor == "val/acc" and experiment.plan.optimize_metric == "val/acc"


def test_a_resumed_step_schedule_continues_its_learning_rates(tmp_path):
    from omegaconf import OmegaConf

    from gain_exp.train.checkpoints import apply_hyperparameters

    step = (
        "trainer.scheduler._target_=torch.optim.lr_scheduler.StepLR",
        "~trainer.scheduler.T_max",
        "+trainer.scheduler.step_size=2",
        "+trainer.scheduler.gamma=0.5",
    )
    whole = _lrs(_build(tmp_path, *step))
    first = _build(tmp_path, *step)
    head = _lrs(first, 3)
    again = _build(tmp_path, *step)  # a resumed run: fresh parts, then the checkpoint's states
    again.optimizer.load_state_dict(first.optimizer.state_dict())
    again.scheduler.load_state_dict(first.scheduler.state_dict())
    config = OmegaConf.to_container(again.cfg.trainer, resolve=True)
    apply_hyperparameters(again.optimizer, again.scheduler, config["optimizer"], 6)
    assert head + _lrs(again, 3) == pytest.approx(whole)
    # a new lr would be restored over by the schedule's state: refused, not logged as applied
    new = {"trainer": {**config, "optimizer": {**config["optimizer"], "lr": 0.1}}}
    with pytest.raises(ValueError, match=r"trainer\.optimizer\.lr=0\.001, this run has trainer\.optimizer\.lr=0\.1"):
        config_changes({"trainer": config}, new, tmp_path / "last.ckpt")


def test_runs_saved_with_the_old_scheduler_words_replay():
    from gain_exp.runs.rundir import replayed

    saved = ["trainer.scheduler=none", "+trainer.scheduler=cosine", "seed=1"]
    assert replayed(saved, None) == ["trainer.scheduler=null", "seed=1"]
    assert make_plan(compose(replayed(saved[:1], None))).cfg.trainer.scheduler is None


def test_test_panels_are_always_logged_and_val_panels_on_schedule():
    from gain_exp.tracking import PanelSchedule

    schedule = PanelSchedule(5)
    assert schedule.due("test_unbiased", -1) and schedule.due("test_unbiased", 3)  # before training, then at the end
    assert schedule.due("val", 0) and not schedule.due("val", 3) and schedule.due("val", 5)
