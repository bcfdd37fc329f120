"""Weights & Biases backend: one W&B run per job with scalars, attention images with mask layers, per-image tables,
summary metrics and the best checkpoint as an artifact. W&B trouble never stops training, and an unreachable
server means an offline run after a short probe rather than a 90 s stall."""

from __future__ import annotations

import functools
import logging
import netrc
import os
import ssl
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable, Sequence
from urllib.parse import urlparse

import torch

from gain_exp.core.metrics import LOC_THRESHOLD
from gain_exp.output.panels import Panel, overlay, tile_scale, upscale
from gain_exp.tracking.base import PanelSchedule, Tracker

log = logging.getLogger("gain_exp.tracking")

WANDB_MODES = ("online", "offline", "disabled")
RECIPE_GROUPS = ("sweep", "launcher")  # sweeps/ selectors: the same for every job, so no part of a run name
# Per-epoch metric names (after ``<split>/``, up to the next ``/``) whose best value is the largest; losses and
# ``train/mean_*`` take the smallest; anything else (am_drop, loc_n, ...) keeps W&B's default, the last value.
MAX_METRICS = {
    "acc",
    "acc_macro",
    "pos_acc",
    "neg_acc",
    "auroc",
    "mAP",
    "AP",
    "f1_macro",
    "loc_iou",
    "pointing_game",
    "energy_pg",
}
# Seconds the reachability probe of the W&B server may take before online mode is given up for offline: W&B's
# own wait is init_timeout (90 s) per run, which a sweep pays once per job and then loses the run.
PROBE_TIMEOUT_S = 3.0
# wandb.init's init_timeout for online runs (W&B default 90 s; $WANDB_INIT_TIMEOUT wins): run creation takes a
# few seconds on a working link, so a server that answers the probe but not init costs this, then offline.
INIT_TIMEOUT_S = 20.0
_PROBES: dict[str, str | None] = {}  # base URL -> why it is unreachable (None: it answered); one probe a process


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
    """One W&B run per job: scalars, attention images with mask layers, per-image tables, summary, checkpoint.

    Per-epoch metrics (``val/*``, ``train/mean_*``, test splits) are charted against ``epoch`` and summarised by
    their best value (max for scores, min for losses); per-step ``train/*`` keep the global step and their last
    value. ``state()`` names the run and its last step so a resumed job continues the same run without re-sending
    steps W&B already has.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        run_config: dict[str, Any],
        resume: dict[str, Any] | None = None,
        project: str | None = "gain-exp",
        entity: str | None = None,
        group: str | None = None,
        job_type: str | None = "train",
        tags: Sequence[str] | None = None,
        name: str | None = None,
        mode: str | None = "auto",
        log_checkpoint: bool = False,
        panel_every: int = 1,
    ) -> None:
        self.run: Any = None
        self.out_dir = Path(out_dir)
        self.mode = wandb_mode(mode, self.out_dir / "wandb")
        self.upload_checkpoint = bool(log_checkpoint)
        self.schedule = PanelSchedule(int(panel_every), "logger.wandb.panel_every")
        resume = resume or {}
        self._run_id: str | None = resume.get("run_id")
        self._floor = int(resume.get("step", -1))  # last step the interrupted job sent; W&B drops steps <= it
        self._step = max(self._floor, 0)
        self._epoch: int | None = resume.get("epoch")
        self._defined: set[str] = set()
        self._epoch_row = -1  # W&B step of the last row holding per-epoch values
        self._best: Path | None = None
        if self.mode == "disabled":
            return
        hydra_group, hydra_name, choices = _hydra_job_context()
        group, job_type, tags = reproduction_labels(group or hydra_group, job_type, list(tags or []))
        in_wandb_sweep = bool(os.environ.get("WANDB_SWEEP_ID"))  # the agent's project/entity must win
        config = {
            **run_config,
            "choices": {**choices, **(run_config.get("choices") or {})},
            "run_dir": str(self.out_dir.resolve()),
        }
        try:
            import wandb

            self._wandb = wandb
            self.out_dir.mkdir(parents=True, exist_ok=True)
            init = functools.partial(
                wandb.init,
                project=None if in_wandb_sweep else project,
                entity=None if in_wandb_sweep else entity,
                group=group,
                job_type=job_type,
                tags=tags,
                name=name or hydra_name or self.out_dir.name,
                config=config,
                dir=str(self.out_dir),
                id=self._run_id,
                resume="allow" if self._run_id else None,
                reinit="finish_previous",  # a multirun in one process gets one W&B run per job
            )
            self.run = self._start(init)
            self._run_id = self.run.id
            # Online, W&B knows where the resumed run stopped even if the saved state is older (a hard kill).
            self._floor = max(self._floor, int(getattr(self.run, "starting_step", 0) or 0) - 1)
            self._step = max(self._step, self._floor)
            _restore_clobbered_sections(self.run, config)
        except Exception as err:  # noqa: BLE001 - an unreachable or misconfigured W&B must not stop training
            self._disable(f"could not start a run ({type(err).__name__}: {err})")

    def _start(self, init: Callable[..., Any]) -> Any:
        """wandb.init in this tracker's mode; an online start that fails goes offline so the run's data is kept."""
        if self.mode != "online":
            return init(mode=self.mode)
        settings = {} if os.environ.get("WANDB_INIT_TIMEOUT") else {"init_timeout": INIT_TIMEOUT_S}
        try:
            return init(mode="online", settings=self._wandb.Settings(**settings))
        except Exception as err:  # noqa: BLE001 - the server answered the probe but not run creation
            self.mode = "offline"
            log.warning(
                "W&B could not start an online run at %s (%s: %s), so this run logs offline under %s; "
                "upload it later with `wandb sync %s`.",
                _base_url(),
                type(err).__name__,
                (str(err).splitlines() or [""])[0],
                self.out_dir / "wandb",
                self.out_dir / "wandb",
            )
            return init(mode="offline")

    @_best_effort
    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        values = {k: v for k, v in ((k, _number(v)) for k, v in metrics.items()) if v is not None}
        per_epoch = [k for k in values if k != "epoch" and not _per_step(k)]
        if per_epoch and "epoch" not in values and self._epoch is not None:
            values["epoch"] = self._epoch  # test metrics after training: on the epoch axis at the last epoch
        if "epoch" in values:
            self._epoch = int(values["epoch"])
        if step <= self._floor:
            # Re-done work after a resume: its per-step losses were sent before the interruption; anything else
            # (an epoch finished right at the interruption point) goes to the first step W&B still accepts.
            values = {k: v for k, v in values.items() if not _per_step(k)}
            if set(values) <= {"epoch"}:
                return
        for key in per_epoch:
            if key not in self._defined:
                summary = _summary_of(key)
                self.run.define_metric(key, step_metric="epoch", **({"summary": summary} if summary else {}))
                self._defined.add(key)
        step = self._next(step)
        if per_epoch:
            self._epoch_row = step
        elif step == self._epoch_row:
            values.pop("epoch", None)  # the row's epoch is its epoch record's (one moved here after a resume)
        self.run.log(values, step=step)

    @_best_effort
    def log_panels(self, split: str, panels: Sequence[Panel], epoch: int, step: int | None = None) -> None:
        if not panels or (step is None and not self.schedule.due(split, epoch)):
            return
        wandb, step = self._wandb, self._next(self._step)
        self._epoch_row = step
        self.run.log(
            {
                f"{split}/attention": [self._image(p.image, p) for p in panels],
                f"{split}/panels": [wandb.Image(p.strip, caption=p.caption) for p in panels],
                "epoch": epoch,
            },
            step=step,
        )

    @_best_effort
    def log_table(self, split: str, panels: Sequence[Panel]) -> None:
        columns = ["index", "image", "true", "pred", "explained", "score", "am_drop", "iou"]
        table = self._wandb.Table(columns=columns)
        for i, p in enumerate(panels):
            row = p.row(i)
            table.add_data(
                row["index"],
                self._image(overlay(p.image, p.attention), p),
                ", ".join(row["true"]),
                ", ".join(row["pred"]),
                row["explained"],
                row["score"],
                row["am_drop"],
                row["iou"],
            )
        self.run.log({f"{split}/results": table}, step=self._next(self._step))

    def log_checkpoint(self, path: Path, name: str) -> None:
        self._best = Path(path)  # uploaded once at the end: the best file is rewritten whenever it improves

    def state(self) -> dict[str, Any]:
        """The run id plus the last step and epoch sent, so a resumed job continues this run where it stopped."""
        if self._run_id is None:
            return {}
        return {"run_id": self._run_id, "step": self._step, "epoch": self._epoch}

    @_best_effort
    def finish(self, summary: dict[str, Any]) -> None:
        # Metric summaries come from the logged history (best epoch, NaN once diverged); writing the final
        # values here would overwrite them with the last epoch's.
        run, status = self.run, summary.get("status")
        run.summary["status"] = status
        if self.upload_checkpoint and self._best is not None and self._best.is_file():
            artifact = self._wandb.Artifact(f"model-{run.id}", type="model", metadata=summary.get("best") or {})
            artifact.add_file(str(self._best), name=self._best.name)
            run.log_artifact(artifact, aliases=["best"])
        sync_dir = Path(run.dir).parent
        self.run = None
        run.finish(exit_code=0 if status == "completed" else 1)
        if self.mode == "offline":
            print(f"W&B run saved offline; upload it with: wandb sync {sync_dir}")

    def _next(self, step: int) -> int:
        """The W&B step for a record at ``step``: never behind the last one sent, never at or before the floor."""
        self._step = max(self._step, step, self._floor + 1)
        return self._step

    def _image(self, base: torch.Tensor, p: Panel) -> Any:
        """A wandb.Image of ``base`` with the ground truth and the thresholded attention as toggleable masks."""
        scale = tile_scale(base.shape[-2:])  # 32 px images are unreadable as they are
        masks = {"attention": _mask_layer(p.attention, scale, f"attention >= {LOC_THRESHOLD}")}
        if p.gt_mask is not None:
            masks["ground_truth"] = _mask_layer(p.gt_mask, scale, "object")
        return self._wandb.Image(
            upscale(base.float(), scale).permute(1, 2, 0).mul(255).round().byte().numpy(),
            caption=p.caption,
            masks=masks,
        )

    def _disable(self, why: str) -> None:
        log.warning(
            "W&B is off for the rest of this run: %s; local JSON logging continues. "
            "Use logger.wandb.mode=offline (then `wandb sync`) or logger=json to silence this.",
            why,
        )
        run, self.run = self.run, None
        if run is not None:
            try:
                run.finish(exit_code=1)
            except Exception:  # noqa: BLE001 - already failing; the warning above is the one message
                pass


REPRODUCING = "GAIN_EXP_REPRODUCING"  # set by gain_exp.reproduce for its re-runs: the source's name


def reproduction_labels(group: str | None, job_type: str, tags: list[str]) -> tuple[str | None, str, list[str]]:
    """A job re-run by ``gain-exp reproduce`` goes to the W&B group ``reproduce/<source>`` with job type
    ``reproduce`` and the tag ``reproduce``, so the re-runs are told apart from the originals in the same project."""
    source = os.environ.get(REPRODUCING)
    if not source:
        return group, job_type, tags
    return f"reproduce/{source}", "reproduce", [*tags, "reproduce"]


def wandb_mode(mode: str | None, sync_dir: str | os.PathLike | None = None) -> str:
    """``auto``/null -> $WANDB_MODE if set, else online when W&B credentials exist, else offline.

    Online is only chosen (or kept, when asked for) if the W&B server answers a short probe; otherwise offline,
    with one warning naming ``sync_dir`` (where the offline run will be) for ``wandb sync``.
    """
    asked = mode
    if mode in (None, "auto"):
        env = os.environ.get("WANDB_MODE")
        if env:
            mode, asked = ("offline" if env == "dryrun" else env), f"WANDB_MODE={env}"
        else:
            mode = "online" if _has_wandb_credentials() else "offline"
    elif mode not in WANDB_MODES:
        raise ValueError(f"logger.wandb.mode={mode} is unknown; use auto, online, offline or disabled.")
    else:
        asked = f"logger.wandb.mode={mode}"
    if mode != "online":
        return mode
    url = _base_url()
    problem = _server_problem(url)
    if problem is None:
        return mode
    # An explicit online request also falls back (W&B trouble never stops training, and offline keeps the data).
    where = sync_dir or "<run dir>/wandb"
    log.warning(
        "%sW&B server %s is unreachable (%s), so this run logs offline under %s; upload it later with `wandb sync %s`.",
        f"{asked} but the " if asked not in (None, "auto") else "The ",
        url,
        problem,
        where,
        where,
    )
    return "offline"


def _has_wandb_credentials() -> bool:
    """An API key (or identity token) in the environment or ~/.netrc, found without prompting or network."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlparse(_base_url()).hostname
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host or "") is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def _default_wandb_host() -> str:
    import wandb

    return wandb.Settings().base_url


def _base_url() -> str:
    """The W&B server: $WANDB_BASE_URL, else W&B's default (https://api.wandb.ai)."""
    return os.environ.get("WANDB_BASE_URL") or _default_wandb_host()


def _server_problem(base_url: str) -> str | None:
    """Why the W&B server at ``base_url`` cannot be reached, or None; probed once per process (a multirun's jobs)."""
    if base_url not in _PROBES:
        _PROBES[base_url] = _probe(base_url, PROBE_TIMEOUT_S)
    return _PROBES[base_url]


def _probe(base_url: str, timeout: float) -> str | None:
    """One HTTP(S) request to ``base_url`` (proxies from the environment apply) bounded by ``timeout`` in all."""
    outcome: list[str | None] = []

    def attempt() -> None:
        try:
            urllib.request.urlopen(urllib.request.Request(base_url, method="HEAD"), timeout=timeout).close()
            outcome.append(None)
        except urllib.error.HTTPError:
            outcome.append(None)  # any HTTP answer (401, 404, ...) means the server is there
        except urllib.error.URLError as err:
            # A TLS complaint means the host answered; certificates are W&B's own business (custom CA bundles).
            outcome.append(None if isinstance(err.reason, ssl.SSLError) else f"{err.reason}")
        except ssl.SSLError:
            outcome.append(None)
        except Exception as err:  # noqa: BLE001 - timeouts, resets, bad URLs: all mean no usable server
            outcome.append(f"{type(err).__name__}: {err}")

    # A thread bounds the whole probe: urlopen's timeout does not cover DNS resolution.
    thread = threading.Thread(target=attempt, name="wandb-probe", daemon=True)
    thread.start()
    thread.join(timeout)
    return outcome[0] if outcome else f"no answer within {timeout:g} s"


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


def _number(value: Any) -> float | int | None:
    """A metric as a plain number, NaN and inf included (W&B records them); None for a value that is no number."""
    if hasattr(value, "item") and callable(value.item):  # torch/NumPy scalars, without importing either here
        value = value.item()
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _per_step(key: str) -> bool:
    """Per-step training scalars (``train/loss``, ``train/lr``): charted against the global step."""
    return key.startswith("train/") and not key.startswith("train/mean_")


def _summary_of(key: str) -> str | None:
    """The run-summary aggregate of a per-epoch metric: its best value (max or min), or None for W&B's last."""
    name = key.split("/", 1)[-1].split("/", 1)[0]
    if key.startswith("train/mean_") or "loss" in name:
        return "min"
    if name in MAX_METRICS or name.endswith("_acc") or name.startswith("sens@"):
        return "max"
    return None


def _restore_clobbered_sections(run: Any, config: dict[str, Any]) -> None:
    """Undo a W&B sweep parameter that replaced a whole config section with its value (``loss: gain``).

    The agent merges its parameters over ``config`` after init and locks those keys, so the section goes back
    under the same lock; the swept value stays visible as ``choices.<key>``.
    """
    clobbered = {
        k: run.config[k]
        for k, v in config.items()
        if isinstance(v, dict) and k in run.config and not isinstance(run.config[k], dict)
    }
    if not clobbered:
        return
    log.warning(
        "W&B sweep parameter(s) %s replaced whole config sections; the sections are restored in the W&B "
        "config with the swept values under choices (sweep over +setting or leaf keys such as "
        "loss.am_weight instead, see sweeps/wandb_sweep.yaml).",
        ", ".join(sorted(clobbered)),
    )
    run.config.update_locked({k: config[k] for k in clobbered}, user="sweep", _allow_val_change=True)
    run.config.update({"choices": {**config["choices"], **clobbered}}, allow_val_change=True)


def _mask_layer(values: torch.Tensor, scale: int, label: str) -> dict[str, Any]:
    """A W&B mask layer: class 1 where ``values`` >= the threshold, background elsewhere."""
    data = (upscale(values.squeeze().float(), scale) >= LOC_THRESHOLD).to(torch.uint8).numpy()
    return {"mask_data": data, "class_labels": {0: "background", 1: label}}
