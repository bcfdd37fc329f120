"""Typed schemas of the conf/ tree, registered in Hydra's ConfigStore so a wrongly typed value fails at composition.

The YAML files hold every default (with its comment); these dataclasses hold only names and types, so they cannot
drift from it: every field is MISSING. A YAML file opts in with a defaults entry before ``_self_``, e.g.
``defaults: [/gain_exp_schema_trainer@_here_, _self_]``. The schemas are stored at the ConfigStore's root, not in a
config group, so they never appear as group options in ``--help``, tab completion or ``runtime.choices``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Union

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

PREFIX = "gain_exp_schema_"  # ConfigStore names: <PREFIX><name>, referenced as /<PREFIX><name> in conf/ defaults


@dataclass
class GainSchema:
    """conf/config.yaml ``gain`` (gain_exp.core.gain.GAIN); grad_mode/ and formulation/ fill two keys."""

    _target_: str = MISSING
    sigma: float = MISSING
    omega: float = MISSING
    normalisation: str = MISSING
    fill: Any = MISSING  # "zero" | "mean" | [r, g, b]
    am_grad_scale: float = MISSING
    freeze_am_bn: bool = MISSING
    formulation: str = MISSING
    grad_mode: str = MISSING
    cam: str = MISSING  # gradcam | gradcam++ | xgradcam | layercam | hirescam


@dataclass
class AppSchema:
    """conf/config.yaml's own keys; the groups' nodes are typed by their own options' schemas."""

    seed: int = MISSING
    optimize_metric: str = MISSING
    gain: GainSchema = field(default_factory=GainSchema)


@dataclass
class OptimizerSchema:
    """conf/trainer ``optimizer``: a partial ``torch.optim`` class; stored open, since extra keys vary by class."""

    _target_: str = MISSING
    _partial_: bool = MISSING
    lr: float = MISSING


@dataclass
class EvalMetricsSchema:
    """trainer.eval_metrics: explanation metrics beyond localisation and where each runs (epoch | test | off)."""

    spurious_energy: str = MISSING
    deletion_insertion: str = MISSING
    steps: int = MISSING
    baseline: str = MISSING
    images: Optional[int] = MISSING

    def __post_init__(self) -> None:  # runs when a composed node becomes this object (OmegaConf.to_object)
        if self.steps is MISSING:
            return
        for name in ("spurious_energy", "deletion_insertion"):
            _require(
                getattr(self, name) in ("epoch", "test", "off"),
                f"trainer.eval_metrics.{name}={getattr(self, name)} is unknown; use epoch, test or off"
                + (' (in YAML quote it, "off": a bare off reads as false)' if getattr(self, name) == "False" else ""),
            )
        _require(self.steps >= 1, f"trainer.eval_metrics.steps={self.steps} must be >= 1")
        _require(
            self.baseline in ("blur", "mean", "zero"),
            f"trainer.eval_metrics.baseline={self.baseline} is unknown; use blur, mean or zero",
        )
        _require(
            self.images is None or self.images >= 1, f"trainer.eval_metrics.images={self.images} must be >= 1 or null"
        )


SELECTIONS = ("best", "last", "pareto")  # trainer.test_on / test_also: which weights the test splits are scored with


@dataclass
class ParetoSchema:
    """trainer.pareto: the two val metrics whose front keeps checkpoints (trainer.test_on / test_also: pareto)."""

    metrics: List[str] = MISSING  # two val metrics (auto: val/acc, or val/mAP on multi-label data)
    modes: List[str] = MISSING  # max | min, per metric
    pick: str = MISSING  # the front member whose test metrics are the headline: the best in this metric (auto: first)

    def __post_init__(self) -> None:  # runs when a composed node becomes this object (OmegaConf.to_object)
        if self.pick is MISSING:
            return
        _require(
            len(self.metrics) == 2 and len(self.modes) == 2,
            f"trainer.pareto.metrics={list(self.metrics)} and modes={list(self.modes)} must each name two",
        )
        for m in self.modes:
            _require(m in ("max", "min"), f"trainer.pareto.modes has {m}; each mode must be max or min")
        _require(
            self.pick == "auto" or self.pick in self.metrics,
            f"trainer.pareto.pick={self.pick} must be auto or one of trainer.pareto.metrics {list(self.metrics)}",
        )


@dataclass
class TrainerSchema:
    """conf/trainer/*.yaml: the loop, optimiser and checkpoint settings."""

    epochs: int = MISSING
    batch_size: int = MISSING
    eval_batch_size: Optional[int] = MISSING
    device: str = MISSING
    amp: bool = MISSING
    channels_last: bool = MISSING
    sync_bn: bool = MISSING
    compile: bool = MISSING
    compile_backend: str = MISSING
    workers: Any = MISSING  # auto or an int >= 0; the plan holds the resolved count (checks.resolve_workers)
    grad_clip: Optional[float] = MISSING
    optimizer: OptimizerSchema = field(default_factory=OptimizerSchema)
    scheduler: Optional[Any] = MISSING  # a torch.optim.lr_scheduler node (_target_, _partial_) or null
    monitor: str = MISSING  # auto until the plan resolves it from the data (val/acc or val/mAP)
    monitor_mode: str = MISSING
    monitor_tiebreak: Optional[str] = MISSING  # a val metric deciding ties of the monitor (same mode), or null
    test_on: str = MISSING
    test_also: List[str] = MISSING
    pareto: ParetoSchema = field(default_factory=ParetoSchema)
    num_panels: int = MISSING
    eval_metrics: EvalMetricsSchema = field(default_factory=EvalMetricsSchema)
    panel_positives: Optional[int] = MISSING
    panel_negatives: Optional[int] = MISSING
    train_panels_every: Optional[int] = MISSING
    train_panels: int = MISSING
    test_first: bool = MISSING
    checkpoint_every: Optional[int] = MISSING
    steps_per_epoch: Optional[int] = MISSING
    table_images: int = MISSING
    log_every_n_steps: int = MISSING
    resume: Optional[str] = MISSING
    interrupt_after_steps: Optional[int] = MISSING
    progress: Optional[bool] = MISSING

    @property
    def selections(self) -> list[str]:
        """The selection rules scored on the test splits: ``test_on`` (the headline) first, then ``test_also``."""
        return list(dict.fromkeys([self.test_on, *self.test_also]))

    def __post_init__(self) -> None:
        """The range of every key, checked when the composed node becomes this object (``config.checks``)."""
        if self.epochs is MISSING:  # the ConfigStore's template, not a composed config
            return
        for key, value, low in (
            ("epochs", self.epochs, 1),
            ("batch_size", self.batch_size, 1),
            ("num_panels", self.num_panels, 0),
            ("train_panels", self.train_panels, 1),
            ("table_images", self.table_images, 0),
            ("log_every_n_steps", self.log_every_n_steps, 1),
        ):
            _require(value >= low, f"trainer.{key}={value} must be >= {low}")
        for key, value, low in (
            ("eval_batch_size", self.eval_batch_size, 1),
            ("train_panels_every", self.train_panels_every, 1),
            ("checkpoint_every", self.checkpoint_every, 1),
            ("steps_per_epoch", self.steps_per_epoch, 1),
            ("panel_positives", self.panel_positives, 0),
            ("panel_negatives", self.panel_negatives, 0),
        ):
            _require(value is None or value >= low, f"trainer.{key}={value} must be >= {low} or null")
        _require(self.optimizer.lr > 0, f"trainer.optimizer.lr={self.optimizer.lr} must be > 0")
        _require(self.monitor_mode in ("max", "min"), f"trainer.monitor_mode={self.monitor_mode} must be max or min")
        for rule in (self.test_on, *self.test_also):
            _require(
                rule in SELECTIONS,
                f"trainer.test_on / test_also has {rule}, an unknown selection; use {', '.join(SELECTIONS)}",
            )
        _require(
            self.device in ("auto", "cpu", "cuda") or str(self.device).startswith("cuda:"),
            f"trainer.device={self.device} is unknown; use auto, cpu or cuda",
        )
        _require(
            self.workers == "auto"
            or (isinstance(self.workers, int) and not isinstance(self.workers, bool) and self.workers >= 0),
            f"trainer.workers={self.workers} must be auto or a count >= 0",
        )
        _require(
            self.grad_clip is None or self.grad_clip > 0,
            f"trainer.grad_clip={self.grad_clip} must be > 0 (a gradient-norm bound) or null for no clipping",
        )


@dataclass
class LossSchema:
    """conf/loss/*.yaml (gain_exp.core.losses.GAINLoss)."""

    _target_: str = MISSING
    cl_weight: float = MISSING
    am_weight: float = MISSING
    ex_weight: float = MISSING
    am_score: str = MISSING
    am_start_epoch: int = MISSING
    ex_start_epoch: int = MISSING
    am_on_all: bool = MISSING
    ex_on: str = MISSING
    ex_loss: str = MISSING  # mse | gradia | haics | energy | rrr
    rrr_norm_stats: str = MISSING  # rrr, batch norm: input gradient through the batch statistics | held


@dataclass
class BackboneSchema:
    """conf/backbone/*.yaml: a timm model by name."""

    name: str = MISSING
    pretrained: bool = MISSING
    weights_file: Optional[str] = MISSING
    grad_layer: Optional[str] = MISSING
    kwargs: Dict[str, Any] = MISSING


@dataclass
class ShapesSchema:
    """conf/dataset/shapes.yaml (gain_exp.data.shapes.build)."""

    _target_: str = MISSING
    root: str = MISSING
    num_classes: int = MISSING
    image_size: int = MISSING
    n_train: int = MISSING
    n_val: int = MISSING
    n_test: int = MISSING
    bias: float = MISSING
    masks_to_use: Union[int, float] = MISSING  # int: a count, float: a fraction (the type carries the meaning)
    annotation: str = MISSING  # mask | box: what the training split's L_e label maps are made of
    box_enlarge: float = MISSING  # annotation=box: fractional growth of each box side (0.1 = 10% longer)
    max_objects: int = MISSING
    augment: bool = MISSING
    val_bias: Any = MISSING  # null (= bias) | a probability | balanced
    background: str = MISSING  # tint | texture: what carries the class cue on the background


@dataclass
class DecoyDigitsSchema:
    """conf/dataset/decoy_digits.yaml (gain_exp.data.decoy_digits.build)."""

    _target_: str = MISSING
    root: str = MISSING
    image_size: int = MISSING
    n_train: int = MISSING
    n_val: int = MISSING
    n_test: int = MISSING
    bias: float = MISSING
    decoy: str = MISSING  # colour | grey
    patch_fraction: float = MISSING
    mask_threshold: float = MISSING
    masks_to_use: Union[int, float] = MISSING  # int: a count, float: a fraction (the type carries the meaning)
    annotation: str = MISSING  # mask | box | decoy: what the training split's L_e label maps are made of
    box_enlarge: float = MISSING  # annotation=box: fractional growth of each box side (0.1 = 10% longer)
    val_bias: Any = MISSING  # null (= bias) | a probability | balanced


@dataclass
class Voc2012Schema:
    """conf/dataset/voc2012.yaml (gain_exp.data.voc.build)."""

    _target_: str = MISSING
    root: str = MISSING
    image_size: int = MISSING
    exclude_difficult: bool = MISSING
    sbd_train_list: Optional[str] = MISSING
    masks_to_use: Union[int, float] = MISSING
    annotation: str = MISSING  # mask | box: what the training split's L_e label maps are made of
    box_enlarge: float = MISSING  # annotation=box: fractional growth of each box side (0.1 = 10% longer)
    autoaugment: bool = MISSING
    hflip: bool = MISSING
    strict: bool = MISSING
    max_pixels: Optional[int] = MISSING  # larger image or mask files (decompression bombs) are unreadable


@dataclass
class MaskFolderSchema:
    """conf/dataset/mask_folder.yaml (gain_exp.data.mask_folder.build)."""

    _target_: str = MISSING
    root: str = MISSING
    image_size: int = MISSING
    negative_class: Optional[str] = MISSING
    masks_to_use: Union[int, float] = MISSING
    annotation: str = MISSING  # mask | box: what the training split's L_e label maps are made of
    box_enlarge: float = MISSING  # annotation=box: fractional growth of each box side (0.1 = 10% longer)
    batch_pos_dist: Optional[float] = MISSING
    steps_per_epoch: Optional[int] = MISSING
    autoaugment: bool = MISSING
    hflip: bool = MISSING
    strict: bool = MISSING
    max_pixels: Optional[int] = MISSING  # larger image or mask files (decompression bombs) are unreadable
    extensions: List[str] = MISSING


@dataclass
class WaterbirdsSchema:
    """conf/dataset/waterbirds.yaml (gain_exp.data.waterbirds.build)."""

    _target_: str = MISSING
    root: str = MISSING
    segmentations: str = MISSING
    cub_root: Optional[str] = MISSING
    image_size: int = MISSING
    masks_to_use: Union[int, float] = MISSING
    annotation: str = MISSING  # mask | box: what the training split's L_e label maps are made of
    box_enlarge: float = MISSING  # annotation=box: fractional growth of each box side (0.1 = 10% longer)
    augment: bool = MISSING
    strict: bool = MISSING
    max_pixels: Optional[int] = MISSING  # larger image or mask files (decompression bombs) are unreadable


@dataclass
class WandbSchema:
    """conf/logger/wandb.yaml ``logger.wandb`` (gain_exp.tracking.wandb.WandbTracker)."""

    _target_: str = MISSING
    project: str = MISSING
    entity: Optional[str] = MISSING
    group: Optional[str] = MISSING
    job_type: str = MISSING
    tags: List[str] = MISSING
    name: Optional[str] = MISSING
    mode: str = MISSING
    log_checkpoint: bool = MISSING
    panel_every: int = MISSING


@dataclass
class TensorboardSchema:
    """conf/logger/tensorboard.yaml ``logger.tensorboard`` (gain_exp.tracking.tensorboard.TensorboardTracker)."""

    _target_: str = MISSING
    panel_every: int = MISSING


def _require(ok: bool, sentence: str) -> None:
    if not ok:
        raise ValueError(sentence + ".")


SCHEMAS: dict[str, type] = {
    "app": AppSchema,
    "trainer": TrainerSchema,
    "loss": LossSchema,
    "backbone": BackboneSchema,
    "dataset_shapes": ShapesSchema,
    "dataset_decoy_digits": DecoyDigitsSchema,
    "dataset_voc2012": Voc2012Schema,
    "dataset_mask_folder": MaskFolderSchema,
    "dataset_waterbirds": WaterbirdsSchema,
    "logger_wandb": WandbSchema,
    "logger_tensorboard": TensorboardSchema,
}


def _node(schema: type) -> DictConfig:
    """The schema as a config node; nodes whose keys are open by design get struct off (keys typed, extras allowed)."""
    node = OmegaConf.structured(schema)
    if schema is AppSchema:
        OmegaConf.set_struct(node, False)  # the groups add their nodes at the root; Hydra closes the root afterwards
    if schema is TrainerSchema:
        OmegaConf.set_struct(node.optimizer, False)  # momentum, betas, ... depend on the optimizer class
    return node


def register() -> None:
    """Store every schema at the ConfigStore's root as ``<PREFIX><name>`` (idempotent)."""
    store = ConfigStore.instance()
    for name, schema in SCHEMAS.items():
        store.store(name=PREFIX + name, node=_node(schema), provider="gain_exp")


register()
