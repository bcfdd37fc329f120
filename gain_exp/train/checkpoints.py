"""Checkpoints: which files an epoch gets (CheckpointPolicy), writing them atomically, the RNG state they carry,
where they are, reading them safely, and what may differ on resume.

A checkpoint stores the config it was made with (``run.config``). On resume, settings that define the experiment
(backbone, classes, dataset, formulation, optimizer and schedule type) must match; the others (epochs, learning rate
and other optimizer hyperparameters, loss weights, logger, ...) may change and are applied for real.
"""

from __future__ import annotations

import math
import os
import random
import shutil
from pathlib import Path
from typing import Any, Callable

import torch

from gain_exp.output.files import NO_SPACE, CannotWrite, CorruptFile, atomic_write, load_state

# Dotted config keys (and prefixes) that define what a checkpoint is: a resume with other values is refused.
MUST_MATCH = (
    "backbone.name",
    "backbone.kwargs",
    "backbone.grad_layer",
    "dataset",
    "gain.formulation",
    "trainer.optimizer._target_",
    "trainer.scheduler._target_",
)
COSINE = "torch.optim.lr_scheduler.CosineAnnealingLR"  # the schedule whose length and lr a resume may change
# Within those, keys that only locate or read the same data.
MAY_DIFFER = ("dataset.root", "dataset.strict", "dataset.sbd_train_list")
# What the resumed run would not notice, so there is nothing to note.
IGNORED = (
    "trainer.resume",
    "trainer.interrupt_after_steps",
    "trainer.progress",
    "trainer.device",
    "trainer.workers",
    "trainer.compile",
    "trainer.compile_backend",
    "logger",
)


def save_checkpoint(path: Path, state: dict[str, Any]) -> Path:
    """Write ``state`` to ``path`` atomically (unique temp file, then rename): a kill leaves the old file or the new."""
    with atomic_write(path) as f:
        torch.save(state, f)
    return path


def pareto_front(points: list[tuple[float, ...]], modes: tuple[str, ...]) -> list[int]:
    """Indices of the points no other point dominates (at least as good in every metric, better in one), by ``modes``
    (max | min per metric). Equal points do not dominate each other: ties stay. A point with a NaN is never on it."""
    signs = [1.0 if m == "max" else -1.0 for m in modes]
    keyed = [None if any(math.isnan(v) for v in p) else tuple(s * v for s, v in zip(signs, p)) for p in points]

    def dominates(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
        return all(x >= y for x, y in zip(a, b)) and any(x > y for x, y in zip(a, b))

    return [
        i for i, p in enumerate(keyed) if p is not None and not any(q is not None and dominates(q, p) for q in keyed)
    ]


def pareto_pick(members: list[dict[str, Any]], metric: str, mode: str) -> dict[str, Any] | None:
    """The Pareto member ({"epoch", "val": {metric: value}, ...}, as in summary.json's ``pareto.members``) best in val
    ``metric`` by ``mode``; the earlier epoch on a tie (as ``best``); None when no member has a finite value."""
    sign = 1.0 if mode == "max" else -1.0
    scored = [
        m for m in members if isinstance(v := (m.get("val") or {}).get(metric), (int, float)) and math.isfinite(v)
    ]
    return max(scored, key=lambda m: (sign * m["val"][metric], -m["epoch"]), default=None)


class ParetoFront:
    """The epochs on the front of two val metrics (Rao et al., ICCV 2023: accuracy against localisation), each with
    its checkpoint ``pareto_epoch_NNN.ckpt`` (NNN: epochs done); a member dropped from the front loses its file.

    ``members``: [{"epoch", "checkpoint", "val": {metric: value}}] in epoch order (saved in checkpoints, resumed).
    """

    def __init__(self, metrics: list[str], modes: list[str]) -> None:
        self.metrics, self.modes = list(metrics), list(modes)
        self.members: list[dict[str, Any]] = []

    def offer(self, epoch: int, metrics: dict[str, Any]) -> tuple[str | None, list[str]]:
        """Epoch ``epoch`` ended with val ``metrics``: (its checkpoint name if it joins the front, the names of the
        members it pushes off)."""
        val = {m: float(metrics.get(m, math.nan)) for m in self.metrics}
        candidate = {"epoch": epoch, "checkpoint": f"pareto_epoch_{epoch + 1:03d}", "val": val}
        everyone = [*self.members, candidate]
        kept = pareto_front([tuple(m["val"][k] for k in self.metrics) for m in everyone], tuple(self.modes))
        self.members = [everyone[i] for i in kept]
        dropped = [m["checkpoint"] for i, m in enumerate(everyone[:-1]) if i not in kept]
        return (candidate["checkpoint"] if len(everyone) - 1 in kept else None), dropped

    def pick(self, metric: str) -> dict[str, Any] | None:
        """The member best in ``metric`` (one of the front's two), as ``pareto_pick``; None for an empty front."""
        return pareto_pick(self.members, metric, self.modes[self.metrics.index(metric)])


class CheckpointPolicy:
    """Which checkpoint files each epoch gets, written from one serialisation, and the best epoch so far (the role of
    timm's CheckpointSaver).

    After an epoch, in this order: ``best.ckpt`` when the monitored val metric improved, ``last.ckpt`` always,
    ``epoch_NNN.ckpt`` (NNN: epochs done) every ``every`` epochs. They hold one state, resuming at the next epoch: it
    is serialised once, into the first, and the others are byte copies of that file, each written atomically.

    Args:
        folder: the run's ``checkpoints`` directory.
        monitor: the val metric that picks the best epoch; ``mode``: ``max`` or ``min`` is better.
        tiebreak: a second val metric (same ``mode``) that decides between epochs whose monitor ties (None: the
            earlier epoch stays best). On a tie the later epoch wins only if it is strictly better in ``tiebreak``.
        every: ``trainer.checkpoint_every`` (None or 0: no ``epoch_NNN`` copies).
        pareto: keep the front of two val metrics as ``pareto_epoch_NNN`` copies (None: no front).
    """

    def __init__(
        self,
        folder: str | os.PathLike,
        monitor: str,
        mode: str = "max",
        every: int | None = None,
        pareto: ParetoFront | None = None,
        tiebreak: str | None = None,
    ) -> None:
        if mode not in ("max", "min"):
            raise ValueError(f"trainer.monitor_mode={mode} must be max or min")
        self.folder, self.monitor, self.mode, self.every = Path(folder), monitor, mode, every
        self.pareto, self.tiebreak = pareto, tiebreak
        self.best: dict[str, Any] = {"metric": monitor, "value": None, "epoch": None}  # saved, resumed, summarised
        if tiebreak is not None:
            self.best["tiebreak"] = {"metric": tiebreak, "value": None}
        self.written: tuple[Path, int] | None = None  # the last checkpoint this run wrote, and its epochs done

    def path(self, name: str) -> Path:
        return self.folder / f"{name}.ckpt"

    def improves(self, value: Any, second: Any = None) -> bool:
        """Whether ``value`` of the monitor beats the best so far (a missing or NaN value never does); on a tie,
        whether ``second``, the tie-break metric's value, beats the best epoch's."""
        if _missing(value):
            return False
        best = self.best["value"]
        if best is None or self._better(value, best):
            return True
        if value != best or self.tiebreak is None or _missing(second):
            return False
        kept = self.best.get("tiebreak", {}).get("value")
        return _missing(kept) or self._better(second, kept)

    def _better(self, a: Any, b: Any) -> bool:
        return a > b if self.mode == "max" else a < b

    def after_epoch(
        self, epoch: int, metrics: dict[str, Any], state: Callable[[], dict[str, Any] | None]
    ) -> dict[str, Path]:
        """Epoch ``epoch`` (0-based) ended with val ``metrics``: update the best, then write this epoch's files from
        one call of ``state`` (after the update: best.ckpt records itself as the best). Returns {name: path}."""
        names = []
        value = metrics.get(self.monitor)
        second = metrics.get(self.tiebreak) if self.tiebreak is not None else None
        if self.improves(value, second):
            self.best = {"metric": self.monitor, "value": value, "epoch": epoch}
            if self.tiebreak is not None:
                self.best["tiebreak"] = {"metric": self.tiebreak, "value": second}
            names.append("best")
        names.append("last")
        if self.every and (epoch + 1) % self.every == 0:
            names.append(f"epoch_{epoch + 1:03d}")
        dropped: list[str] = []
        if self.pareto is not None:
            joined, dropped = self.pareto.offer(epoch, metrics)
            names += [joined] if joined else []
        return self.write(names, state, remove=dropped)

    def write(
        self, names: list[str], state: Callable[[], dict[str, Any] | None], remove: list[str] = ()
    ) -> dict[str, Path]:
        """Write checkpoints ``names`` (in order) from one call of ``state``, then delete the checkpoints ``remove``;
        returns {name: path}.

        Every process calls this alike: ``state`` may be a collective (it gathers every process's RNG streams) and
        returns None where nothing is written (processes other than the main one).
        """
        paths = {name: self.path(name) for name in names}
        snapshot = state()
        if snapshot is None or not paths:
            return paths
        first, *copies = paths.values()
        try:
            save_checkpoint(first, snapshot)
            for path in copies:
                with open(first, "rb") as src, atomic_write(path) as dst:
                    shutil.copyfileobj(src, dst)
        except CannotWrite as err:  # what a full disk or a read-only folder kept, and how to go on from there
            raise err.but(kept=self._kept(), fix=self._go_on(err)) from None
        self.written = (first, snapshot.get("epoch", 0))
        for name in remove:  # after the new files exist: a kill in between leaves one too many, never one too few
            self.path(name).unlink(missing_ok=True)
        return paths

    def _kept(self) -> str:
        if self.written is None:
            last = self.path("last")
            return (
                f"the checkpoints already in {self.folder} are unchanged"
                if last.exists()
                else "no checkpoint was written yet"
            )
        path, epochs = self.written
        return (
            f"the last good checkpoint, {path} (after {epochs} epoch(s)), and the others in {self.folder} are unchanged"
        )

    def _go_on(self, err: CannotWrite) -> str:
        where = "free some space" if err.errno in NO_SPACE else f"make {self.folder} writable"
        return (
            f"{where}, then continue this run with trainer.resume=auto"
            if self.written or self.path("last").exists()
            else f"{where}, then run again"
        )


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def rng_state() -> dict[str, Any]:
    """The global RNG streams a mid-epoch resume must continue (torch CPU, Python, every CUDA device)."""
    return {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng(state: dict[str, Any]) -> None:
    """Continue the streams saved by ``rng_state`` (CUDA ones only where the same devices exist)."""
    torch.set_rng_state(state["torch"].cpu())
    random.setstate(_as_tuple(state["python"]))
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in cuda])


def resolve_checkpoint(where: str | os.PathLike, out_dir: Path) -> Path | None:
    """``auto`` -> this run's last checkpoint if any; a run directory -> its last checkpoint; else the file."""
    if str(where) == "auto":
        path = out_dir / "checkpoints" / "last.ckpt"
        return path if path.is_file() else None
    path = Path(where).expanduser()
    if path.is_dir():
        path = path / "checkpoints" / "last.ckpt"
    if not path.is_file():
        raise FileNotFoundError(
            f"trainer.resume={where}: no checkpoint at {path}; give a .ckpt file, a run directory holding "
            f"checkpoints/last.ckpt, or 'auto'."
        )
    return path


def saved_tracking(where: str | os.PathLike | None, out_dir: Path) -> dict[str, Any] | None:
    """The tracker state (e.g. W&B run id) in the checkpoint ``trainer.resume`` points at; None when starting fresh."""
    path = resolve_checkpoint(where, out_dir) if where else None
    if path is None:
        return None
    tracking = read_checkpoint(path, "cpu", mmap=True).get("tracking")  # mmap: the tensors are not read
    local = (tracking or {}).get("json")
    if isinstance(local, dict) and _inside(path, out_dir):
        # the run directory's own checkpoint (trainer.resume=auto or the directory itself): its metrics.jsonl is
        # this directory's, wherever the directory has been moved or copied since the checkpoint named it
        tracking = {**tracking, "json": {**local, "path": str((Path(out_dir) / "metrics.jsonl").resolve())}}
    return tracking


def _inside(path: Path, folder: Path) -> bool:
    try:
        Path(path).resolve().relative_to(Path(folder).resolve())
    except ValueError:
        return False
    return True


TRAINING_STATE = ("model", "optimizer", "epoch", "step")  # what resuming needs; evaluation needs only "model"
RESUME_INSTEAD = (
    "resume from another one (checkpoints/best.ckpt or a checkpoint_every copy) or start fresh without trainer.resume"
)


def read_checkpoint(
    path: Path,
    device: Any,
    mmap: bool = False,
    option: str = "trainer.resume",
    needs: tuple[str, ...] = TRAINING_STATE,
    instead: str = RESUME_INSTEAD,
) -> dict[str, Any]:
    """A checkpoint's state, or one sentence: the option that named the file (``option``), what is wrong with it and
    what to do ``instead``. ``needs``: the entries the caller reads (resuming: all of TRAINING_STATE)."""
    try:
        state = load_state(path, map_location=device, mmap=mmap)
    except CorruptFile as err:
        raise ValueError(f"{option}: checkpoint {str(err).rstrip('.')}; {instead}.") from None
    missing = set(needs) - set(state)
    if missing:
        raise ValueError(f"{option}: {path} is not a gain-exp checkpoint (no {', '.join(sorted(missing))}); {instead}.")
    if "model" in needs and not isinstance(state["model"], dict):
        what = type(state["model"]).__name__
        raise ValueError(
            f"{option}: {path} is not a gain-exp checkpoint (its model is a {what}, not a state dict); {instead}."
        )
    return state


def config_changes(saved: dict[str, Any], new: dict[str, Any], path: Path) -> dict[str, list[Any]]:
    """{dotted key: [checkpoint value, new value]} of settings that changed; ValueError if one may not."""
    old_flat, new_flat = _flatten(_legacy(saved)), _flatten(new)
    changed = {
        k: [old_flat.get(k), new_flat.get(k)]
        for k in sorted(old_flat.keys() | new_flat.keys())
        if old_flat.get(k) != new_flat.get(k) and not _under(k, IGNORED)
    }
    fixed = [k for k in changed if _under(k, MUST_MATCH) and not _under(k, MAY_DIFFER)]
    scheduler = (new.get("trainer") or {}).get("scheduler")
    if isinstance(scheduler, dict) and scheduler.get("_target_") != COSINE:
        # its state comes back from the checkpoint: a new lr or schedule setting could be logged but not applied
        fixed += [k for k in changed if k == "trainer.optimizer.lr" or _under(k, ("trainer.scheduler",))]
    if fixed:
        key = fixed[0]
        old, value = changed[key]
        raise ValueError(
            f"trainer.resume: {path} was made with {key}={old}, this run has {key}={value}; a resumed "
            f"run keeps what defines the experiment, so resume with {key}={old} or start a new run."
        )
    return changed


def apply_hyperparameters(
    optimizer: torch.optim.Optimizer, scheduler: Any, optimizer_cfg: dict[str, Any], epochs: int
) -> None:
    """After loading their states: the configured optimizer hyperparameters and schedule length take effect.

    ``load_state_dict`` restores the checkpoint's param_groups (its lr, weight decay, ...) and the scheduler's T_max,
    so without this a new ``trainer.optimizer.lr`` or ``trainer.epochs`` would be logged but not used.
    """
    hyper = {k: v for k, v in optimizer_cfg.items() if not k.startswith("_")}
    restored_schedule = scheduler is not None and not isinstance(scheduler, torch.optim.lr_scheduler.CosineAnnealingLR)
    if restored_schedule:  # another schedule continues from its saved state, lr included (config_changes: unchanged)
        hyper = {k: v for k, v in hyper.items() if k != "lr"}
    for group in optimizer.param_groups:
        for key, value in hyper.items():
            if key in group:
                group[key] = tuple(value) if isinstance(group[key], tuple) else value
        if not restored_schedule:
            group["initial_lr"] = group["lr"]
    if isinstance(scheduler, torch.optim.lr_scheduler.CosineAnnealingLR):
        scheduler.T_max = epochs
        scheduler.base_lrs = [group["lr"] for group in optimizer.param_groups]
        done = scheduler.last_epoch
        for group, base in zip(optimizer.param_groups, scheduler.base_lrs):  # the closed form at the current epoch
            group["lr"] = scheduler.eta_min + (base - scheduler.eta_min) * (1 + math.cos(math.pi * done / epochs)) / 2
        scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


def _legacy(saved: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's config in today's terms: before the restructure the GAIN and loss classes lived in
    ``gain_exp.gain`` / ``gain_exp.losses``, and trainer.scheduler was ``cosine`` or ``none``, not a ``_target_`` node."""
    moved = {
        "gain_exp.gain.GAIN": "gain_exp.core.gain.GAIN",
        "gain_exp.losses.GAINLoss": "gain_exp.core.losses.GAINLoss",
    }
    saved = dict(saved)
    for key in ("gain", "loss"):
        node = saved.get(key)
        if isinstance(node, dict) and node.get("_target_") in moved:
            saved[key] = {**node, "_target_": moved[node["_target_"]]}
    trainer = saved.get("trainer") or {}
    old = trainer.get("scheduler")
    if not isinstance(old, str):
        return saved
    cosine = {"_target_": COSINE, "_partial_": True, "T_max": trainer.get("epochs")}
    return {**saved, "trainer": {**trainer, "scheduler": cosine if old == "cosine" else None}}


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for key, value in node.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out if out or not prefix else {prefix[:-1]: {}}
    return {prefix[:-1]: node}


def _under(key: str, prefixes: tuple[str, ...]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def _as_tuple(value: Any) -> Any:
    """random.getstate() as it was: checkpoints may turn its tuples into lists."""
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value
