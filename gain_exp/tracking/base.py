"""The tracking interface every backend implements, and the fan-out that drives them (built in ``__init__``)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

from gain_exp.output.panels import Panel

log = logging.getLogger("gain_exp.tracking")


class Tracker:
    """Interface every backend implements; the defaults do nothing so a backend overrides only what it needs.

    A backend is built by ``hydra.utils.instantiate`` from its ``logger.<name>`` node with three runtime
    arguments: ``out_dir`` (the run directory), ``run_config`` (the resolved config plus provenance) and
    ``resume`` (what its ``state()`` returned when the checkpoint being resumed was written, else None).
    """

    optional = True  # Trackers drops an optional backend that raises instead of stopping training

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Scalars at a global optimisation step (per-step losses, per-epoch split metrics with an ``epoch`` key)."""

    def log_panels(self, split: str, panels: Sequence[Panel], epoch: int, step: int | None = None) -> None:
        """Attention panels of a fixed set of images of ``split`` after ``epoch``; with ``step``, of a training
        batch at that step (trainer.train_panels_every decides when: no panel schedule applies)."""

    def log_table(self, split: str, panels: Sequence[Panel]) -> None:
        """Per-image results of a final test split (one row per panel)."""

    def log_checkpoint(self, path: Path, name: str) -> None:
        """A checkpoint worth keeping (the best one) has been written."""

    def state(self) -> dict[str, Any]:
        """What a resumed run needs to continue this backend's record (saved in checkpoints and summary.json)."""
        return {}

    def finish(self, summary: dict[str, Any]) -> None:
        """The run ended (normally or not): flush and close."""


class PanelSchedule:
    """Val panels every ``every`` epochs, counted from the first time val is seen; the test splits' panels (before
    training with trainer.test_first, and once at the end, named by the tested weights' epoch) always."""

    def __init__(self, every: int, key: str = "logger.panel_every") -> None:
        if every < 1:
            raise ValueError(f"{key}={every} must be >= 1 (epochs between attention panels).")
        self.every = every
        self._last: dict[str, int] = {}

    def due(self, split: str, epoch: int) -> bool:
        if split != "val":
            return True
        last = self._last.get(split)
        if last is not None and epoch < last + self.every:
            return False
        self._last[split] = epoch
        return True


class Trackers(Tracker):
    """Fans every call out to several backends; a failing optional backend is dropped, never stops training."""

    def __init__(self, backends: Sequence[Tracker], names: Sequence[str] | None = None) -> None:
        self.backends = list(backends)
        self.names = dict(zip(map(id, self.backends), names or [type(b).__name__ for b in self.backends]))

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self._each("log_metrics", metrics, step)

    def log_panels(self, split: str, panels: Sequence[Panel], epoch: int, step: int | None = None) -> None:
        # a backend written for (split, panels, epoch) keeps working for the per-epoch panels
        self._each("log_panels", split, panels, epoch, *(() if step is None else (step,)))

    def log_table(self, split: str, panels: Sequence[Panel]) -> None:
        self._each("log_table", split, panels)

    def log_checkpoint(self, path: Path, name: str) -> None:
        self._each("log_checkpoint", path, name)

    def state(self) -> dict[str, Any]:
        """Each backend's resume state under its ``logger.<name>`` key (backends with none are left out)."""
        return {self.names[id(b)]: s for b in self.backends if (s := b.state())}

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
            log.warning(
                "%s failed in %s (%s: %s); it is dropped for the rest of this run, local JSON logging continues.",
                type(backend).__name__,
                method,
                type(err).__name__,
                err,
            )
