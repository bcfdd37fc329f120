"""Where a run's numbers and pictures go: one small interface, a local JSON backend that is always on,
and optional Weights & Biases and TensorBoard backends."""
from __future__ import annotations

import functools
import json
import logging
import math
import netrc
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence
from urllib.parse import urlparse

import numpy as np
import torch

from gain_exp.metrics import LOC_THRESHOLD
from gain_exp.viz import attention_panel, overlay, save_panels, tile_scale, upscale

log = logging.getLogger(__name__)

WANDB_MODES = ("online", "offline", "disabled")
RECIPE_GROUPS = ("sweep", "launcher")  # sweeps/ selectors: the same for every job, so no part of a run name


@dataclass
class Panel:
    """One image's attention story, in display units ([0, 1] images, H x W maps)."""

    image: torch.Tensor  # 3 x H x W
    attention: torch.Tensor  # H x W
    mask: torch.Tensor  # H x W soft mask T(A)
    masked_image: torch.Tensor  # 3 x H x W
    gt_mask: torch.Tensor | None  # H x W 0/1, None when the image has no pixel mask
    true_classes: list[str]
    pred_classes: list[str]
    explained: str  # the class(es) the map explains
    score: float  # predicted probability of the top class
    am_drop: float  # true-class score drop on the masked image
    iou: float | None = None  # localisation IoU of this map (None without a mask)
    index: int | None = None  # position of the image in its split (None: the panel's own position)

    @property
    def caption(self) -> str:
        return (f"true: {', '.join(self.true_classes)} | pred: {', '.join(self.pred_classes)} ({self.score:.2f})"
                f" | map: {self.explained} | AM drop {self.am_drop:+.2f}")

    @functools.cached_property
    def strip(self) -> Any:
        """The PIL strip (image | overlay | soft mask | masked image | ground truth), drawn once for all backends."""
        return attention_panel(self.image, self.attention, self.mask, self.masked_image, self.gt_mask,
                               caption=self.caption)

    def row(self, position: int) -> dict[str, Any]:
        """The per-image results row (JSON-ready) of this panel, ``position`` standing in for a missing index."""
        return {"index": position if self.index is None else self.index, "true": self.true_classes,
                "pred": self.pred_classes, "explained": self.explained, "score": jsonable(self.score),
                "am_drop": jsonable(self.am_drop), "iou": jsonable(self.iou)}


class Tracker:
    """Interface every backend implements; the defaults do nothing so a backend overrides only what it needs."""

    optional = True  # Trackers drops an optional backend that raises instead of stopping training

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Scalars at a global optimisation step (per-step losses, per-epoch split metrics)."""

    def log_panels(self, split: str, panels: Sequence[Panel], epoch: int) -> None:
        """Attention panels of a fixed set of images of ``split`` after ``epoch``."""

    def log_table(self, split: str, panels: Sequence[Panel]) -> None:
        """Per-image results of a final test split (one row per panel)."""

    def log_checkpoint(self, path: Path, name: str) -> None:
        """A checkpoint worth keeping (the best one) has been written."""

    def finish(self, summary: dict[str, Any]) -> None:
        """The run ended (normally or not): flush and close."""


class JsonTracker(Tracker):
    """metrics.jsonl, attention PNGs and per-image results/<split>.jsonl under the run directory."""

    optional = False  # the local record is what summary tables and re-analysis read

    def __init__(self, out_dir: str | os.PathLike) -> None:
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._file = open(self.out_dir / "metrics.jsonl", "a", encoding="utf-8")

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        record = {"step": step, **{k: jsonable(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def log_panels(self, split: str, panels: Sequence[Panel], epoch: int) -> None:
        if not panels:
            return
        save_panels([p.strip for p in panels], self.out_dir / "attention" / f"{split}_epoch{epoch:03d}.png")

    def log_table(self, split: str, panels: Sequence[Panel]) -> None:
        path = self.out_dir / "results" / f"{split}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(p.row(i)) + "\n" for i, p in enumerate(panels)), encoding="utf-8")

    def finish(self, summary: dict[str, Any]) -> None:
        self._file.close()


class _PanelSchedule:
    """Panels of a split every ``every`` epochs, counted from the first time the split is seen."""

    def __init__(self, every: int) -> None:
        if every < 1:
            raise ValueError(f"logger.panel_every={every} must be >= 1 (epochs between attention panels).")
        self.every = every
        self._last: dict[str, int] = {}

    def due(self, split: str, epoch: int) -> bool:
        last = self._last.get(split)
        if last is not None and epoch < last + self.every:
            return False
        self._last[split] = epoch
        return True


def _best_effort(method: Callable[..., None]) -> Callable[..., None]:
    """W&B never stops training: the first failing call logs one warning and turns the backend off."""

    @functools.wraps(method)
    def wrapper(self: WandbTracker, *args: Any, **kwargs: Any) -> None:
        if self.run is None:
            return
        try:
            method(self, *args, **kwargs)
        except Exception as err:  # noqa: BLE001 - any W&B failure (network, disk, API change) must not stop training
            self._disable(f"{method.__name__} failed ({type(err).__name__}: {err})")

    return wrapper


class WandbTracker(Tracker):
    """One W&B run per job: scalars, attention images with mask layers, per-image tables, summary, checkpoint."""

    def __init__(self, logger_cfg: Any, out_dir: str | os.PathLike, run_config: dict[str, Any], mode: str) -> None:
        self.run: Any = None
        self.out_dir = Path(out_dir)
        self.mode = mode
        self.upload_checkpoint = bool(logger_cfg.get("log_checkpoint", False))
        self.schedule = _PanelSchedule(int(logger_cfg.get("panel_every", 1)))
        self._step = 0
        self._best: Path | None = None
        group, name, choices = _hydra_job_context()
        in_wandb_sweep = bool(os.environ.get("WANDB_SWEEP_ID"))  # the agent's project/entity must win
        try:
            import wandb

            self._wandb = wandb
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self.run = wandb.init(
                project=None if in_wandb_sweep else logger_cfg.get("project"),
                entity=None if in_wandb_sweep else logger_cfg.get("entity"),
                group=logger_cfg.get("group") or group,
                job_type=logger_cfg.get("job_type"),
                tags=list(logger_cfg.get("tags") or []),
                name=logger_cfg.get("name") or name or self.out_dir.name,
                config={**run_config, "choices": choices, "run_dir": str(self.out_dir.resolve())},
                dir=str(self.out_dir),
                mode=mode,
                reinit="finish_previous",  # a multirun in one process gets one W&B run per job
            )
        except Exception as err:  # noqa: BLE001 - an unreachable or misconfigured W&B must not stop training
            self._disable(f"could not start a run ({type(err).__name__}: {err})")

    @_best_effort
    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self._step = max(self._step, step)
        values = {k: jsonable(v) for k, v in metrics.items()}
        self.run.log({k: v for k, v in values.items() if v is not None}, step=self._step)

    @_best_effort
    def log_panels(self, split: str, panels: Sequence[Panel], epoch: int) -> None:
        if not panels or not self.schedule.due(split, epoch):
            return
        wandb = self._wandb
        self.run.log({
            f"{split}/attention": [self._image(p.image, p) for p in panels],
            f"{split}/panels": [wandb.Image(p.strip, caption=p.caption) for p in panels],
            "epoch": epoch,
        }, step=self._step)

    @_best_effort
    def log_table(self, split: str, panels: Sequence[Panel]) -> None:
        columns = ["index", "image", "true", "pred", "explained", "score", "am_drop", "iou"]
        table = self._wandb.Table(columns=columns)
        for i, p in enumerate(panels):
            row = p.row(i)
            table.add_data(row["index"], self._image(overlay(p.image, p.attention), p), ", ".join(row["true"]),
                           ", ".join(row["pred"]), row["explained"], row["score"], row["am_drop"], row["iou"])
        self.run.log({f"{split}/results": table}, step=self._step)

    def log_checkpoint(self, path: Path, name: str) -> None:
        self._best = Path(path)  # uploaded once at the end: the best file is rewritten whenever it improves

    @_best_effort
    def finish(self, summary: dict[str, Any]) -> None:
        run, status = self.run, summary.get("status")
        final = {k: v for k, v in (summary.get("final") or {}).items() if jsonable(v) is not None}
        best = summary.get("best") or {}
        run.summary.update({**final, **{f"best/{k}": v for k, v in best.items()}, "status": status})
        if self.upload_checkpoint and self._best is not None and self._best.is_file():
            artifact = self._wandb.Artifact(f"model-{run.id}", type="model", metadata=best)
            artifact.add_file(str(self._best), name=self._best.name)
            run.log_artifact(artifact, aliases=["best"])
        sync_dir = Path(run.dir).parent
        self.run = None
        run.finish(exit_code=0 if status == "completed" else 1)
        if self.mode == "offline":
            print(f"W&B run saved offline; upload it with: wandb sync {sync_dir}")

    def _image(self, base: torch.Tensor, p: Panel) -> Any:
        """A wandb.Image of ``base`` with the ground truth and the thresholded attention as toggleable masks."""
        scale = tile_scale(base.shape[-2:])  # 32 px images are unreadable as they are
        masks = {"attention": _mask_layer(p.attention, scale, f"attention >= {LOC_THRESHOLD}")}
        if p.gt_mask is not None:
            masks["ground_truth"] = _mask_layer(p.gt_mask, scale, "object")
        return self._wandb.Image(upscale(base.float(), scale).permute(1, 2, 0).mul(255).round().byte().numpy(),
                                 caption=p.caption, masks=masks)

    def _disable(self, why: str) -> None:
        log.warning("W&B is off for the rest of this run: %s; local JSON logging continues. "
                    "Use logger.mode=offline (then `wandb sync`) or logger=json to silence this.", why)
        run, self.run = self.run, None
        if run is not None:
            try:
                run.finish(exit_code=1)
            except Exception:  # noqa: BLE001 - already failing; the warning above is the one message
                pass


class TensorboardTracker(Tracker):
    """Scalars and attention panel strips as TensorBoard events under ``<run dir>/tensorboard``."""

    def __init__(self, out_dir: str | os.PathLike, panel_every: int = 1) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.schedule = _PanelSchedule(panel_every)
        self.writer = SummaryWriter(log_dir=str(Path(out_dir) / "tensorboard"))
        self._step = 0

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self._step = max(self._step, step)
        for key, value in metrics.items():
            value = jsonable(value)
            if isinstance(value, (int, float)):
                self.writer.add_scalar(key, value, self._step)

    def log_panels(self, split: str, panels: Sequence[Panel], epoch: int) -> None:
        if not self.schedule.due(split, epoch):
            return
        for i, p in enumerate(panels):
            self.writer.add_image(f"{split}/panel_{i}", np.asarray(p.strip), self._step, dataformats="HWC")

    def log_table(self, split: str, panels: Sequence[Panel]) -> None:
        header = "| index | true | pred | explained | score | AM drop | IoU |\n|---|---|---|---|---|---|---|\n"
        rows = "".join(f"| {r['index']} | {', '.join(r['true'])} | {', '.join(r['pred'])} | {r['explained']} | "
                       f"{_fmt(r['score'])} | {_fmt(r['am_drop'])} | {_fmt(r['iou'])} |\n"
                       for r in (p.row(i) for i, p in enumerate(panels)))
        self.writer.add_text(f"{split}/results", header + rows, self._step)

    def finish(self, summary: dict[str, Any]) -> None:
        self.writer.close()


class Trackers(Tracker):
    """Fans every call out to several backends; a failing optional backend is dropped, never stops training."""

    def __init__(self, backends: Sequence[Tracker]) -> None:
        self.backends = list(backends)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self._each("log_metrics", metrics, step)

    def log_panels(self, split: str, panels: Sequence[Panel], epoch: int) -> None:
        self._each("log_panels", split, panels, epoch)

    def log_table(self, split: str, panels: Sequence[Panel]) -> None:
        self._each("log_table", split, panels)

    def log_checkpoint(self, path: Path, name: str) -> None:
        self._each("log_checkpoint", path, name)

    def finish(self, summary: dict[str, Any]) -> None:
        # Every backend gets to close even if one fails; a required backend's error is raised afterwards.
        failure: Exception | None = None
        for backend in list(self.backends):
            try:
                self._call(backend, "finish", summary)
            except Exception as err:  # noqa: BLE001 - re-raised below once the others are closed
                failure = failure or err
        if failure is not None:
            raise failure

    def _each(self, method: str, *args: Any) -> None:
        for backend in list(self.backends):
            self._call(backend, method, *args)

    def _call(self, backend: Tracker, method: str, *args: Any) -> None:
        try:
            getattr(backend, method)(*args)
        except Exception as err:
            if not backend.optional:
                raise
            self.backends.remove(backend)
            log.warning("%s failed in %s (%s: %s); it is dropped for the rest of this run, local JSON logging "
                        "continues.", type(backend).__name__, method, type(err).__name__, err)


def wandb_mode(mode: str | None) -> str:
    """``auto``/null -> $WANDB_MODE if set, else online when W&B credentials exist, else offline."""
    if mode in (None, "auto"):
        env = os.environ.get("WANDB_MODE")
        if env:
            return "offline" if env == "dryrun" else env
        return "online" if _has_wandb_credentials() else "offline"
    if mode not in WANDB_MODES:
        raise ValueError(f"logger.mode={mode} is unknown; use auto, online, offline or disabled.")
    return mode


def _has_wandb_credentials() -> bool:
    """An API key (or identity token) in the environment or ~/.netrc, found without prompting or network."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL") or _default_wandb_host()).hostname
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host or "") is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def _default_wandb_host() -> str:
    import wandb

    return wandb.Settings().base_url


def _hydra_job_context() -> tuple[str | None, str | None, dict[str, str]]:
    """(group, name, group choices) of the current Hydra job: a multirun's sweep dir names its group."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None, None, {}
    hc = HydraConfig.get()
    choices = {k: v for k, v in hc.runtime.choices.items() if not k.startswith("hydra/") and v is not None}
    if hc.job.get("num") is None:  # only sweeps number their jobs (hydra.mode is unset in some launch paths)
        return None, _run_name(list(hc.overrides.task), None), choices
    return Path(hc.sweep.dir).name, _run_name(list(hc.overrides.task), _swept_keys(hc)), choices


def _swept_keys(hc: Any) -> set[str]:
    """Keys a multirun varies: its sweeper's params plus the command line's sweep overrides (a,b / range)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    keys = set((hc.sweeper.get("params") or {}).keys())
    saved = Path(hc.sweep.dir) / "multirun.yaml"  # the basic sweeper saves the unexpanded command line here
    if saved.is_file():
        original = OmegaConf.load(saved).hydra.overrides.task
        parsed = OverridesParser.create().parse_overrides([str(o) for o in original])
        keys |= {o.get_key_element() for o in parsed if o.is_sweep_override()}
    return {k.lstrip("+~") for k in keys}


def _run_name(overrides: list[str], swept: set[str] | None, limit: int = 128) -> str | None:
    """``loss=gain,seed=1``: the job's overrides (only the swept ones in a sweep that names them)."""
    picked = []
    for item in overrides:
        key = item.split("=", 1)[0].lstrip("+~")
        if key.startswith("hydra") or key in RECIPE_GROUPS:
            continue
        if swept and key not in swept:
            continue
        picked.append(item.lstrip("+"))
    name = ",".join(picked)
    return name[:limit] or None


def _mask_layer(values: torch.Tensor, scale: int, label: str) -> dict[str, Any]:
    """A W&B mask layer: class 1 where ``values`` >= the threshold, background elsewhere."""
    data = (upscale(values.squeeze().float(), scale) >= LOC_THRESHOLD).to(torch.uint8).numpy()
    return {"mask_data": data, "class_labels": {0: "background", 1: label}}


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def jsonable(value: Any) -> Any:
    """A metric value as strict JSON takes it: tensors as Python numbers, NaN and inf as None."""
    if isinstance(value, torch.Tensor):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None  # strict JSON has no NaN; None reads back as "undefined on this data"
    return value


def build_tracker(logger_cfg: Any, out_dir: str | os.PathLike, run_config: dict[str, Any]) -> Trackers:
    """The local JSON tracker plus the backend ``logger.backend`` names (json and none add nothing)."""
    backend = logger_cfg.get("backend", "json") if logger_cfg is not None else "json"
    extra: list[Tracker] = []
    if backend == "wandb":
        mode = wandb_mode(logger_cfg.get("mode"))
        if mode != "disabled":
            extra.append(WandbTracker(logger_cfg, out_dir, run_config, mode))
    elif backend == "tensorboard":
        extra.append(TensorboardTracker(out_dir, int(logger_cfg.get("panel_every", 1))))
    elif backend not in ("json", "none"):
        raise ValueError(f"logger.backend={backend} is unknown; use logger=wandb, logger=tensorboard, logger=json "
                         f"or logger=none.")
    return Trackers([JsonTracker(out_dir), *extra])
