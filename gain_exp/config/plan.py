"""The composed config checked and resolved once, before anything is built: the plan every builder and the loop read.

    plan = make_plan(cfg)              # every range and cross-key check that needs no data; every ``auto`` resolved
    ...build the data...
    plan = plan.with_data(data)        # the checks that need the data; ``trainer.monitor: auto`` resolved

``plan.trainer`` is the typed ``TrainerSchema`` (conf/trainer/default.yaml holds the defaults, the schema the types and
ranges): the loop reads its settings from there and nowhere else.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import DictConfig

from gain_exp.config.checks import (
    backbone_normalisation,
    check_config,
    check_data,
    check_metric_names,
    check_panels,
    resolve_device,
    resolve_monitor,
    resolve_workers,
)
from gain_exp.config.schema import TrainerSchema


@dataclass(frozen=True)
class Plan:
    """One experiment's settings, checked and resolved; ``cfg`` is the composed config the parts are built from."""

    cfg: DictConfig
    trainer: TrainerSchema  # workers: a count; monitor: a metric name once ``with_data`` ran
    seed: int
    device: torch.device  # the requested device (``auto`` resolved); several processes each take their own GPU
    mean: tuple[float, ...]  # the backbone's input normalisation
    std: tuple[float, ...]
    optimize_metric: str = "auto"  # what the app returns to a sweeper; resolved by ``with_data``

    @property
    def monitor(self) -> str:
        return self.trainer.monitor

    def with_data(self, data: Any, training: bool = True) -> Plan:
        """The plan once the data exists: ``monitor`` and the Pareto metrics' ``auto`` resolved (val/mAP for multi-label
        data, else val/acc), and for
        training, what the data must offer the chosen loss, panels and metric names."""
        monitor = resolve_monitor(self.trainer.monitor, data.multi_label)
        if training:
            check_data(self.cfg, data)
            check_panels(self.cfg, data)
            check_metric_names(self.cfg, monitor, data)
        metric = monitor if self.cfg.optimize_metric == "auto" else str(self.cfg.optimize_metric)
        front = self.trainer.pareto
        metrics = [resolve_monitor(m, data.multi_label) for m in front.metrics]
        pick = metrics[0] if front.pick == "auto" else resolve_monitor(front.pick, data.multi_label)
        pareto = dataclasses.replace(front, metrics=metrics, pick=pick)
        return dataclasses.replace(
            self, trainer=dataclasses.replace(self.trainer, monitor=monitor, pareto=pareto), optimize_metric=metric
        )

    def val_metric_names(self) -> dict[str, str]:
        """Config keys that name a validation metric, checked against the real names after the first epoch."""
        names = {"trainer.monitor": self.trainer.monitor}
        if self.trainer.monitor_tiebreak is not None:
            names["trainer.monitor_tiebreak"] = self.trainer.monitor_tiebreak
        if "pareto" in self.trainer.selections:
            for i, metric in enumerate(self.trainer.pareto.metrics):
                names[f"trainer.pareto.metrics[{i}]"] = metric
        if str(self.cfg.optimize_metric).startswith("val/"):
            names["optimize_metric"] = str(self.cfg.optimize_metric)
        return names


def make_plan(cfg: DictConfig) -> Plan:
    """Check ``cfg`` (one sentence for the first problem) and resolve what needs no data: device, workers, the
    backbone's normalisation."""
    settings = check_config(cfg)
    device = resolve_device(settings.device)
    settings = dataclasses.replace(settings, workers=resolve_workers(settings.workers, device))
    mean, std = backbone_normalisation(cfg.backbone.name)
    return Plan(cfg, settings, int(cfg.seed), device, mean, std)
