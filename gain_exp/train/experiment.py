"""One experiment's parts, built from a composed config: data, backbone, GAIN, loss. And a finished run's parts again,
with its weights, for evaluation and export after training (gain_exp.evaluate, gain_exp.cams).

``build_experiment`` is what ``gain_exp.run.train`` builds before its optimiser; ``load_run`` recomposes a run
directory's saved config (the same overrides and config dirs, plus any new ones, e.g. another ``dataset.root``) and
loads one of its checkpoints into the model.
"""
from __future__ import annotations

import os
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig

from gain_exp.core.backbones import create_backbone
from gain_exp.train.checkpoints import read_checkpoint
from gain_exp.config.checks import backbone_normalisation, check_config, resolve_device
from gain_exp.data.base import DataSplits
from gain_exp.core.gain import GAIN, compile_gain
from gain_exp.core.losses import GAINLoss
from gain_exp.config.paths import CONF_DIR
from gain_exp.train.runtime import Runtime

USER_ERRORS = (ValueError, FileNotFoundError)
CHECKPOINT_INSTEAD = "use best, last or another .ckpt file the run wrote"  # a --checkpoint that cannot be read


@dataclass
class Experiment:
    """The parts of one experiment; ``checkpoint`` is the file the weights came from (load_run only)."""

    cfg: DictConfig
    runtime: Runtime
    data: DataSplits
    gain: GAIN
    loss: GAINLoss
    mean: tuple[float, ...]
    std: tuple[float, ...]
    checkpoint: Path | None = None

    @property
    def model(self) -> torch.nn.Module:
        return self.gain.model


def build_experiment(cfg: DictConfig, runtime: Runtime, prepare_model: Any = None) -> Experiment:
    """Data, backbone, GAIN (compiled under ``trainer.compile``) and loss from a checked config, on ``runtime.device``. ``prepare_model(model)`` runs
    before GAIN wraps the backbone (e.g. SyncBatchNorm, which must come before GAIN finds its BN layers)."""
    mean, std = backbone_normalisation(cfg.backbone.name)
    # every builder takes its YAML keys plus these runtime arguments (DatasetBuilder in gain_exp/data/base.py)
    with runtime.main_first():  # caches (e.g. generated shapes) are written once, then read by the others
        data = instantiate_user(cfg.dataset, mean=mean, std=std, seed=cfg.seed, batch_size=cfg.trainer.batch_size)
    model = create_backbone(cfg.backbone.name, num_classes=data.num_classes, pretrained=cfg.backbone.pretrained,
                            weights_file=cfg.backbone.weights_file, **cfg.backbone.kwargs)
    model = (prepare_model(model) if prepare_model else model).to(runtime.device)
    if cfg.trainer.channels_last:
        model = model.to(memory_format=torch.channels_last)
    gain = instantiate_user(cfg.gain, model=model, grad_layer=cfg.backbone.grad_layer, multi_label=data.multi_label,
                            pixel_mean=mean, pixel_std=std)
    if cfg.trainer.compile:  # training and every reload of a run (load_run) alike
        compile_gain(gain, cfg.trainer.compile_backend)
    loss = instantiate_user(cfg.loss, multi_label=data.multi_label, negative_class=data.negative_class)
    return Experiment(cfg, runtime, data, gain, loss, mean, std)


def instantiate_user(node: DictConfig, **kwargs: Any) -> Any:
    """hydra's instantiate, re-raising our one-sentence user errors instead of Hydra's wrapper."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        if isinstance(err.__cause__, USER_ERRORS):
            raise err.__cause__ from None
        raise


def run_config(run_dir: str | os.PathLike, overrides: Sequence[str] = ()) -> DictConfig:
    """The config a run directory was trained with (its saved overrides and config dirs), then ``overrides``."""
    from hydra import compose, initialize_config_dir

    from gain_exp.reproduce import config_dir, local, resolve_override, saved_job

    job = saved_job(run_dir)
    cwd = local(job.cwd) if job.cwd else None
    searchpath = [f"file://{config_dir(d)}" for d in job.config_dirs]
    extra = [f"hydra.searchpath=[{','.join(searchpath)}]"] if searchpath else []
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name=job.config_name, overrides=[
            *(resolve_override(o, cwd) for o in job.overrides), *extra, *overrides])


def load_run(run_dir: str | os.PathLike, checkpoint: str | None = None, overrides: Sequence[str] = (),
             device: str | None = None) -> Experiment:
    """A run's experiment with the weights of ``checkpoint``: ``best`` (``last`` when the run kept no best),
    ``last``, or a checkpoint file; by default the one the run's own test splits were scored with. ``device``
    defaults to the run's ``trainer.device``; ``overrides`` apply on top of the run's own (e.g.
    ``dataset.root=<another folder>``)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir} is not a directory; give a run directory written by "
                                f"python -m gain_exp.run (it holds summary.json and checkpoints/).")
    cfg = run_config(run_dir, [*overrides, *([f"trainer.device={device}"] if device else [])])
    check_config(cfg)
    path = _checkpoint_file(run_dir, checkpoint or _tested_on(run_dir))
    runtime = Runtime(resolve_device(cfg.trainer.device))
    experiment = build_experiment(cfg, runtime)
    state = read_checkpoint(path, runtime.device, option="--checkpoint", needs=("model",), instead=CHECKPOINT_INSTEAD)
    experiment.model.load_state_dict(state["model"])
    experiment.gain.eval()
    experiment.checkpoint = path
    return experiment


def _tested_on(run_dir: Path) -> str:
    try:
        return json.loads((run_dir / "summary.json").read_text())["tested_on"]["checkpoint"]
    except (OSError, ValueError, KeyError, TypeError):
        return "best"


def _checkpoint_file(run_dir: Path, which: str) -> Path:
    ckpts = run_dir / "checkpoints"
    if which in ("best", "last"):
        path = ckpts / f"{which}.ckpt"
        if which == "best" and not path.is_file():
            path = ckpts / "last.ckpt"  # a run whose monitor never had a value keeps only last.ckpt
        if not path.is_file():
            raise FileNotFoundError(f"{run_dir} has no checkpoints/{which}.ckpt; the run saved none yet (it stopped "
                                    f"before its first epoch ended), or pass --checkpoint with a file.")
        return path
    path = Path(which)
    if not path.is_file():
        raise FileNotFoundError(f"--checkpoint {which}: no checkpoint there; use best, last or a .ckpt file.")
    return path
