"""summary.json for one run, and the rules by which it is written whatever way the run ends.

summary.json only ever moves forward: "completed", "interrupted" (checkpoint saved), "diverged" or "failed" (with the
reason). A run that fails before training starts (e.g. an unreadable resume checkpoint) leaves an existing
summary.json as it was; only the main process writes it; the trackers are always finished with it.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from gain_exp.core.metrics import HEADLINE
from gain_exp.output.files import CannotWrite, jsonable, write_json
from gain_exp.tracking import Tracker
from gain_exp.train.engine import Diverged, Interrupted, Trainer
from gain_exp.train.experiment import USER_ERRORS
from gain_exp.train.provenance import resolved
from gain_exp.train.runtime import launched_processes

log = logging.getLogger("gain_exp")


def final_report(summary: dict[str, Any], out_dir: Path) -> str:
    """What a finished run measured, for the console: each split's headline metrics (rounded), which weights each
    row is from, where the results are and how to view them."""
    final, tested = summary.get("final") or {}, summary.get("tested_on") or {}
    splits = list(dict.fromkeys(k.split("/", 1)[0] for k in final if "/" in k and not k.startswith("train/")))
    columns = [m for m in HEADLINE if any(f"{s}/{m}" in final for s in splits)]
    weights = summary.get("weights") or {}
    rows = ["| split | weights | " + " | ".join(columns) + " |", "|---|---|" + "---|" * len(columns)]
    for split in splits:
        used = weights.get(split) or tested
        epoch = "-" if used.get("epoch") is None else used["epoch"] + 1  # 1-based, as the epoch lines count
        cells = [_rounded(final.get(f"{split}/{m}")) for m in columns]
        rows.append(f"| {split} | {used.get('checkpoint')}, after epoch {epoch} | " + " | ".join(cells) + " |")
    metric = summary.get("optimize_metric")
    lines = [f"done: {metric}={_rounded(final.get(metric))}  results in {out_dir}", *rows]
    if tested.get("rule"):
        lines.append(f"test weights chosen by {tested['rule']}")
    wandb = (summary.get("tracking") or {}).get("wandb") or {}
    view = f"view: {out_dir / 'attention'} (panels), {out_dir / 'summary.json'}"
    if wandb.get("run_id"):
        view += f"; W&B run {wandb['run_id']}"
    return "\n".join([*lines, view])


def _weights(final: dict[str, float], trainer: Trainer) -> dict[str, dict[str, Any]]:
    """{split: {"checkpoint", "epoch"}} for the splits in ``final``: train and val from the last epoch's weights,
    the test splits from the weights ``trainer.test_on`` chose (epochs 0-based, as in ``tested_on``)."""
    last = {"checkpoint": "last", "epoch": final.get("epoch")}
    splits = dict.fromkeys(k.split("/", 1)[0] for k in final if "/" in k)
    tested = {k: trainer.tested_on.get(k) for k in ("checkpoint", "epoch")}
    return {s: dict(tested) if s in trainer.data.tests else last for s in splits}


def _front(trainer: Trainer) -> dict[str, Any] | None:
    """The Pareto front the run kept (trainer.test_on / test_also pareto): its metrics, modes and members, each with
    its epoch, checkpoint, val values and (once tested) test metrics."""
    front = trainer.checkpoints.pareto
    if front is None:
        return None
    members = [
        {
            **m,
            "val": {k: jsonable(v) for k, v in m["val"].items()},
            "tests": {k: jsonable(v) for k, v in m.get("tests", {}).items()},
        }
        for m in front.members
    ]
    return {"metrics": front.metrics, "modes": front.modes, "members": members}


def _rounded(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, (int, float)) and not isinstance(value, bool) else "-"


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
            self._write(failing=err is not None)
        return False  # the exception goes on to the caller

    def _write(self, failing: bool) -> None:
        """summary.json (main process), then the trackers' end. When the run already fails, a summary that cannot be
        written (a full disk) is a warning: the run's own error is the one to report."""
        path = self.out_dir / "summary.json"
        trainer = self.trainer
        # the main process writes; before the Trainer exists, rank 0 of the launched processes
        main = trainer.runtime.is_main if trainer is not None else (launched_processes() or (0,))[0] == 0
        if main and self.summary is not None and (trainer is not None and trainer.started or not path.exists()):
            try:
                write_json(path, self.summary)
            except CannotWrite as err:
                if not failing:
                    raise
                log.warning("summary.json not updated: %s", err)
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
            "tested_on": trainer.tested_on,  # {"checkpoint", "epoch", "rule"}: the weights behind the test metrics
            # every selection scored on the test splits (trainer.test_on and test_also), and the Pareto front
            "selections": {
                k: {**v, "metrics": {m: jsonable(x) for m, x in v["metrics"].items()}}
                for k, v in trainer.selections.items()
            },
            "pareto": _front(trainer),
            "weights": _weights(final, trainer),  # which weights each split's numbers in "final" come from
            "before_training": trainer.before_training,  # trainer.test_first: metrics of the initial weights
            "speed": trainer.speed,  # the last epoch's training images/s over all processes and data-wait share
            "resumed": trainer.resumed,  # {"from": checkpoint, "changed": {key: [old, new]}} when the run resumed
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
