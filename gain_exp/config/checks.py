"""Checks of a composed config and the resolutions the plan makes (device, workers, monitor, normalisation)."""

from __future__ import annotations

import difflib
import importlib
import inspect
import math
import os
from typing import Any

import timm
import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from gain_exp.config.schema import TrainerSchema
from gain_exp.core.backbones import create_backbone
from gain_exp.core.gain import check_options as check_gain_options
from gain_exp.core.losses import check_options as check_loss_options
from gain_exp.core.models import MAPLESS_BACKBONES


def check_config(cfg: DictConfig) -> TrainerSchema:
    """Raise ValueError with one sentence for the first out-of-range value, before any work is done; returns the
    trainer's typed settings (checked on the way)."""
    missing = sorted(OmegaConf.missing_keys(cfg))  # ??? in conf/: values only the user can give (a dataset's folder)
    if missing:
        given = " ".join(f"{key}=<value>" for key in missing)
        raise ValueError(
            f"{', '.join(missing)} {'has' if len(missing) == 1 else 'have'} no value (??? in the config: a value only "
            f"you know); add {given} to the command line (each is described in its conf/ file)."
        )
    for key, value in _numbers(cfg):
        if not math.isfinite(value):
            raise ValueError(f"{key}={value} is not a finite number; give a finite value (see its default in conf/).")
    g, loss, t = cfg.gain, cfg.loss, cfg.trainer
    check_gain_options(
        g.sigma,
        g.omega,
        g.formulation,
        g.grad_mode,
        g.normalisation,
        g.fill,
        g.am_grad_scale,
        prefix="gain.",
        cam=g.cam,
    )
    check_loss_options(
        loss.am_weight,
        loss.ex_weight,
        loss.am_score,
        loss.ex_on,
        loss.am_start_epoch,
        loss.ex_start_epoch,
        prefix="loss.",
        cl_weight=loss.cl_weight,
        ex_loss=loss.ex_loss,
        rrr_norm_stats=loss.rrr_norm_stats,
    )
    if t.compile and loss.ex_weight > 0 and loss.ex_loss == "rrr":
        raise ValueError(
            "trainer.compile: torch.compile has no double backward, which loss.ex_loss=rrr needs (it "
            "trains through input gradients); set trainer.compile=false."
        )
    check_map_needs(cfg)
    settings = trainer_settings(cfg.trainer)  # the range checks live beside the types (TrainerSchema)
    check_optimizer_keys(t.optimizer)
    check_scheduler(t.scheduler)
    if not timm.is_model(cfg.backbone.name):
        create_backbone(cfg.backbone.name, num_classes=2)  # raises the error with close matches
    return settings


def check_map_needs(cfg: DictConfig) -> None:
    """A backbone without a spatial feature map (MAPLESS_BACKBONES, e.g. mlp) has no Grad-CAM: refuse the losses
    and metrics that read one."""
    name, loss = cfg.backbone.name, cfg.loss
    if name not in MAPLESS_BACKBONES:
        return
    if loss.am_weight > 0 or (loss.ex_weight > 0 and loss.ex_loss != "rrr"):
        raise ValueError(
            f"backbone={name} has no spatial feature map, so it has no Grad-CAM for GAIN's attention mining or a map "
            f"loss (loss.am_weight={loss.am_weight}, loss.ex_loss={loss.ex_loss}: gain, gain_ext, gradia, haics and "
            f"energy need one); use loss=baseline or loss=rrr (input gradients), or a CNN backbone such as gain_cnn4."
        )
    metrics = cfg.trainer.get("eval_metrics")
    if metrics is not None and metrics.deletion_insertion != "off":
        raise ValueError(
            f"trainer.eval_metrics.deletion_insertion={metrics.deletion_insertion} orders pixels by attention, and "
            f"backbone={name} has no attention map; set trainer.eval_metrics.deletion_insertion=off."
        )


def trainer_settings(node: DictConfig) -> TrainerSchema:
    """The trainer/ node as the typed object the loop takes; its ranges are checked on the way (TrainerSchema)."""
    settings = OmegaConf.to_object(node)
    if not isinstance(settings, TrainerSchema):  # a node composed without the schema (hand-built in a script)
        settings = TrainerSchema(**{k: node[k] for k in node})
    return settings


def check_scheduler(node: Any) -> None:
    """trainer.scheduler is null or a node naming a learning-rate scheduler class (or factory) by ``_target_``."""
    if node is None:
        return
    if not isinstance(node, DictConfig) or "_target_" not in node:
        raise ValueError(
            f"trainer.scheduler={node} is not a scheduler node; give one with a _target_ such as "
            f"torch.optim.lr_scheduler.CosineAnnealingLR (the default in conf/trainer/default.yaml), "
            f"or trainer.scheduler=null for a constant learning rate."
        )
    target = _import_target(
        node._target_,
        "trainer.scheduler._target_",
        "name a torch.optim.lr_scheduler class such as torch.optim.lr_scheduler.CosineAnnealingLR",
    )
    _check_arguments(node, target, "trainer.scheduler", passed="optimizer")
    if not node.get("_partial_"):
        raise ValueError(
            "trainer.scheduler needs _partial_: true (the app passes the optimizer when it builds it); "
            "add +trainer.scheduler._partial_=true or copy the default node in conf/trainer/default.yaml."
        )


def _import_target(target: Any, key: str, how: str) -> Any:
    module, _, name = str(target).rpartition(".")
    try:  # importlib, not hydra.utils.get_class: that one also logs its own multi-line error
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        raise ValueError(f"{key}={target} is not importable; {how}.") from None


def check_data(cfg: DictConfig, data: Any) -> None:
    """What the built dataset must offer the chosen loss: pixel masks for L_e."""
    masked = data.extras.get("num_masked_train")
    if cfg.loss.ex_weight > 0 and masked == 0:
        raise ValueError(
            f"loss.ex_weight={cfg.loss.ex_weight} needs pixel masks but dataset.masks_to_use="
            f"{cfg.dataset.get('masks_to_use')} puts none in the L_e budget; set dataset.masks_to_use "
            f"(a count >= 1 or a fraction) or use loss=gain / loss=baseline."
        )


def check_panels(cfg: DictConfig, data: Any) -> None:
    """Positive / negative panel counts need binary data with a negative class."""
    t = cfg.trainer
    if (t.panel_positives is not None or t.panel_negatives is not None) and data.negative_class is None:
        raise ValueError(
            f"trainer.panel_positives / panel_negatives need binary data with a negative class, and "
            f"this dataset has {data.num_classes} classes and none is negative; use trainer.num_panels."
        )


def check_metric_names(cfg: DictConfig, monitor: str, data: Any) -> None:
    """The monitor reads validation metrics; the swept metric must come from a split this run evaluates."""
    if not monitor.startswith("val/"):
        raise ValueError(
            f"trainer.monitor={monitor} must be a validation metric (val/<name>, e.g. val/acc): the best "
            f"checkpoint is chosen on val, never on a test split."
        )
    tiebreak = cfg.trainer.get("monitor_tiebreak")
    if tiebreak is not None and not str(tiebreak).startswith("val/"):
        raise ValueError(
            f"trainer.monitor_tiebreak={tiebreak} must be a validation metric (val/<name>, e.g. val/mean_group_acc) "
            f"or null: ties of the monitor are decided on val, never on a test split."
        )
    metric = cfg.optimize_metric
    splits = {"train", "val", *data.tests}
    if metric != "auto" and metric.split("/")[0] not in splits:
        raise ValueError(
            f"optimize_metric={metric} names no split of this run; use auto or <split>/<metric> with "
            f"split one of {', '.join(sorted(splits))} (e.g. val/acc)."
        )


def _numbers(node: Any, prefix: str = "") -> list[tuple[str, float]]:
    """(dotted key, value) of every float in the config tree (lists included)."""
    if isinstance(node, DictConfig):
        items = [(f"{prefix}{k}", node[k]) for k in node.keys() if not OmegaConf.is_missing(node, k)]
    elif isinstance(node, ListConfig):
        items = [(f"{prefix[:-1]}[{i}]", v) for i, v in enumerate(node)]
    else:
        return [(prefix[:-1], node)] if isinstance(node, float) else []
    found = []
    for key, value in items:
        if isinstance(value, (DictConfig, ListConfig)):
            found += _numbers(value, key + ".")
        elif isinstance(value, float):
            found.append((key, value))
    return found


def check_optimizer_keys(node: DictConfig) -> None:
    """Every trainer.optimizer key is an argument of its class: the node is open (keys vary by class), so the
    schema cannot catch a misspelt one."""
    target = node._target_
    cls = _import_target(
        target, "trainer.optimizer._target_", "name a torch.optim class such as torch.optim.AdamW or torch.optim.SGD"
    )
    _check_arguments(node, cls, "trainer.optimizer", passed="params")


def _check_arguments(node: DictConfig, target: Any, where: str, passed: str) -> None:
    """Every key of ``node`` is an argument of ``target`` and every required one is given (``passed``: the one the
    app passes itself): the node is open (keys vary by class), so the schema cannot catch a misspelt one."""
    params = inspect.signature(target).parameters
    name = node._target_
    accepted = [p for p in params if p != passed]
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        for key in node:
            if str(key).startswith("_") or key in accepted:
                continue
            close = difflib.get_close_matches(str(key), accepted, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ValueError(
                f"{where}.{key} is not an argument of {name}{hint}; fix or remove it (it takes {', '.join(accepted)})."
            )
    for key in accepted:
        p = params[key]
        if p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and key not in node:
            raise ValueError(f"{where}.{key} is required by {name}; add +{where}.{key}=<value>.")


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu; asking for cuda without one is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"trainer.device={name} but no CUDA device is visible; use trainer.device=auto or cpu.")
    return torch.device(name)


def resolve_workers(workers: int | str, device: torch.device) -> int:
    """``auto`` -> 0 on CPU (workers would take the cores the model computes on); on CUDA each of the node's GPU
    processes gets an equal share of the cores less one for itself, at most 8 (batches are prefetched and pinned)."""
    if workers != "auto":
        return int(workers)
    if device.type != "cuda":
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    per_process = cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(1, min(8, per_process - 1))


def resolve_monitor(name: str, multi_label: bool) -> str:
    """``auto`` -> val/mAP for multi-label data, val/acc otherwise."""
    if name != "auto":
        return name
    return "val/mAP" if multi_label else "val/acc"


def backbone_normalisation(name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean/std of the backbone's pretrained config (ImageNet's when it names none)."""
    cfg = timm.get_pretrained_cfg(name)
    mean = getattr(cfg, "mean", None) or IMAGENET_DEFAULT_MEAN
    std = getattr(cfg, "std", None) or IMAGENET_DEFAULT_STD
    return tuple(mean), tuple(std)
