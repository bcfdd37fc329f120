"""One experiment's parts, built from a checked plan: data, backbone, GAIN, loss, optimizer and scheduler.

``build_experiment`` is what ``gain_exp.run.train`` fits; ``gain_exp.runs.reload`` builds the same parts again for a
finished run (its saved config, one of its checkpoints) to score, draw or export them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig

from gain_exp.config.plan import Plan
from gain_exp.core.backbones import create_backbone
from gain_exp.core.gain import GAIN, compile_gain
from gain_exp.core.losses import GAINLoss
from gain_exp.data.base import DataSplits
from gain_exp.output.files import CannotWrite
from gain_exp.train.runtime import Runtime

USER_ERRORS = (ValueError, FileNotFoundError, CannotWrite)  # one sentence each, exit 2


@dataclass
class Experiment:
    """The parts of one experiment; ``checkpoint`` is the file the weights came from (a reloaded run only)."""

    plan: Plan
    runtime: Runtime
    data: DataSplits
    gain: GAIN
    loss: GAINLoss
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler | None
    checkpoint: Path | None = None

    @property
    def model(self) -> torch.nn.Module:
        return self.gain.model

    @property
    def cfg(self) -> DictConfig:
        return self.plan.cfg

    @property
    def mean(self) -> tuple[float, ...]:
        return self.plan.mean

    @property
    def std(self) -> tuple[float, ...]:
        return self.plan.std


def build_experiment(
    plan: Plan,
    runtime: Runtime,
    prepare_model: Callable[[torch.nn.Module], torch.nn.Module] | None = None,
    training: bool = True,
) -> Experiment:
    """Data, backbone, GAIN (compiled under ``trainer.compile``), loss, optimizer and scheduler on ``runtime.device``;
    then the checks that need the data (``training``: also what the loss, panels and metric names need of it).
    ``prepare_model(model)`` runs before GAIN wraps the backbone (e.g. SyncBatchNorm, which must come before GAIN
    finds its BN layers)."""
    cfg, mean, std = plan.cfg, plan.mean, plan.std
    # every builder takes its YAML keys plus these runtime arguments (DatasetBuilder in gain_exp/data/base.py)
    with runtime.main_first():  # caches (e.g. generated shapes) are written once, then read by the others
        data = instantiate_user(cfg.dataset, mean=mean, std=std, seed=plan.seed, batch_size=plan.trainer.batch_size)
    plan = plan.with_data(data, training)
    model = create_backbone(
        cfg.backbone.name,
        num_classes=data.num_classes,
        pretrained=cfg.backbone.pretrained,
        weights_file=cfg.backbone.weights_file,
        **cfg.backbone.kwargs,
    )
    model = (prepare_model(model) if prepare_model else model).to(runtime.device)
    if plan.trainer.channels_last:
        model = model.to(memory_format=torch.channels_last)
    gain = instantiate_user(
        cfg.gain,
        model=model,
        grad_layer=cfg.backbone.grad_layer,
        multi_label=data.multi_label,
        pixel_mean=mean,
        pixel_std=std,
    )
    if plan.trainer.compile:  # training and every reload of a run alike
        compile_gain(gain, plan.trainer.compile_backend)
    loss = instantiate_user(cfg.loss, multi_label=data.multi_label, negative_class=data.negative_class)
    optimizer = instantiate_user(cfg.trainer.optimizer)(params=model.parameters())
    scheduler = instantiate_user(cfg.trainer.scheduler)(optimizer) if cfg.trainer.scheduler is not None else None
    return Experiment(plan, runtime, data, gain, loss, optimizer, scheduler)


def instantiate_user(node: DictConfig, **kwargs: Any) -> Any:
    """hydra's instantiate, re-raising our one-sentence user errors instead of Hydra's wrapper."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        if isinstance(err.__cause__, USER_ERRORS):
            raise err.__cause__ from None
        raise
