"""summary.json for one run, and the rules by which it is written whatever way the run ends.

summary.json only ever moves forward: "completed", "interrupted" (checkpoint saved), "diverged" or "failed" (with the
reason). A run that fails before training starts (e.g. an unreadable resume checkpoint) leaves an existing
summary.json as it was; only the main process writes it; the trackers are always finished with it.
"""

from __future__ import annotations

import time
from pathlib import Path
from types import TracebackType
from typing import Any

from gain_exp.output.files import jsonable, write_json
from gain_exp.tracking import Tracker
from gain_exp.train.engine import Diverged, Interrupted, Trainer
from gain_exp.train.experiment import USER_ERRORS
from gain_exp.train.provenance import resolved


class RunSummary:
    """``with RunSummary(out_dir, cfg) as run:`` around one run; set ``run.record``, ``run.tracker`` and
    ``run.trainer`` as they exist, and end with ``run.completed(final)``. Any exception leaves with its status."""

    def __init__(self, out_dir: Path, cfg: Any) -> None:
        self.out_dir, self.cfg = out_dir, cfg
        self.started = time.time()
        self.record: dict[str, Any] = {}  # provenance (run_record): written even when the run fails early
        self.tracker: Tracker | None = None
        self.trainer: Trainer | None = None
        self.summary: dict[str, Any] | None = None

    def __enter__(self) -> RunSummary:
        return self

    def completed(self, final: dict[str, float]) -> dict[str, Any]:
        self.summary = self._summary(final, "completed")
        return self.summary

    def __exit__(self, kind: type[BaseException] | None, err: BaseException | None, _tb: TracebackType | None) -> bool:
        try:
            if isinstance(err, Interrupted):
                self.summary = self._summary(self._last(), "interrupted")
            elif err is not None:
                status = "diverged" if isinstance(err, Diverged) else "failed"
                reason = str(err) if isinstance(err, (Diverged, *USER_ERRORS)) else f"{type(err).__name__}: {err}"
                self.summary = (
                    self._summary(self._last(), status)
                    if self.trainer is not None
                    else {"status": status, **self.record}
                )
                self.summary["error"] = reason.splitlines()[0] if reason else type(err).__name__
        finally:
            self._write()
        return False  # the exception goes on to the caller

    def _write(self) -> None:
        path = self.out_dir / "summary.json"
        trainer = self.trainer
        main = trainer is None or trainer.runtime.is_main
        if main and self.summary is not None and (trainer is not None and trainer.started or not path.exists()):
            write_json(path, self.summary)
        if self.tracker is not None:
            self.tracker.finish(self.summary or {"status": "failed"})

    def _last(self) -> dict[str, float]:
        return self.trainer.history[-1] if self.trainer is not None and self.trainer.history else {}

    def _summary(self, final: dict[str, float], status: str) -> dict[str, Any]:
        """Status and metrics first, then everything needed to re-run the job (run_record, config)."""
        trainer, record = self.trainer, self.record
        assert trainer is not None
        git = record["git"]
        return {
            "status": status,
            "final": {k: jsonable(v) for k, v in final.items()},
            "best": trainer.best,
            "tested_on": trainer.tested_on,
            "before_training": trainer.before_training,  # trainer.test_first: metrics of the initial weights
            "speed": trainer.speed,  # the last epoch's training images/s over all processes and data-wait share
            "resumed": trainer.resumed,  # {"checkpoint": best|last, "epoch"}: the weights behind the test metrics
            "optimize_metric": trainer.plan.optimize_metric,
            "epochs_completed": trainer.epoch,
            "wall_time_s": round(time.time() - self.started, 2),
            "device": str(trainer.device),
            "git_commit": None if git["commit"] is None else git["commit"] + ("+dirty" if git["dirty"] else ""),
            **record,
            "tracking": trainer.tracker.state(),
            "data": trainer.data.extras,  # e.g. masks in the L_e budget, files skipped as unreadable
            "config": resolved(self.cfg),
        }
