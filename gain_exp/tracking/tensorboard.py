"""TensorBoard backend: scalars, attention panel strips and per-image result tables as event files."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from gain_exp.output.files import jsonable
from gain_exp.output.panels import Panel
from gain_exp.tracking.base import PanelSchedule, Tracker


class TensorboardTracker(Tracker):
    """Scalars and attention panel strips as TensorBoard events under ``<run dir>/tensorboard``."""

    def __init__(self, out_dir: str | os.PathLike, panel_every: int = 1, **_: Any) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.schedule = PanelSchedule(panel_every, "logger.tensorboard.panel_every")
        self.writer = SummaryWriter(log_dir=str(Path(out_dir) / "tensorboard"))
        self._step = 0

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self._step = max(self._step, step)
        for key, value in metrics.items():
            value = jsonable(value)
            if isinstance(value, (int, float)):
                self.writer.add_scalar(key, value, self._step)

    def log_panels(self, split: str, panels: Sequence[Panel], epoch: int, step: int | None = None) -> None:
        if step is None and not self.schedule.due(split, epoch):
            return
        for i, p in enumerate(panels):
            self.writer.add_image(f"{split}/panel_{i}", np.asarray(p.strip), self._step, dataformats="HWC")

    def log_table(self, split: str, panels: Sequence[Panel]) -> None:
        header = "| index | true | pred | explained | score | AM drop | IoU |\n|---|---|---|---|---|---|---|\n"
        rows = "".join(
            f"| {r['index']} | {', '.join(r['true'])} | {', '.join(r['pred'])} | {r['explained']} | "
            f"{_fmt(r['score'])} | {_fmt(r['am_drop'])} | {_fmt(r['iou'])} |\n"
            for r in (p.row(i) for i, p in enumerate(panels))
        )
        self.writer.add_text(f"{split}/results", header + rows, self._step)

    def finish(self, summary: dict[str, Any]) -> None:
        self.writer.close()


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"
