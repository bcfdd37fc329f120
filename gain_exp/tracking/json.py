"""The always-on local record: metrics.jsonl, attention PNGs and per-image results under the run directory."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

from gain_exp.files import jsonable
from gain_exp.tracking.base import Tracker
from gain_exp.viz import Panel, save_panels


class JsonTracker(Tracker):
    """metrics.jsonl, attention PNGs and per-image results/<split>.jsonl under the run directory."""

    optional = False  # the local record is what summary tables and re-analysis read

    def __init__(self, out_dir: str | os.PathLike, resume: dict[str, Any] | None = None, **_: Any) -> None:
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.out_dir / "metrics.jsonl"
        # Resuming in the same run dir: drop the lines written after the checkpoint (a kill between the two),
        # which the resumed run writes again.
        if resume and resume.get("path") == str(self.path.resolve()) and self.path.is_file():
            if self.path.stat().st_size > resume["bytes"]:
                os.truncate(self.path, resume["bytes"])
        self._file = open(self.path, "a", encoding="utf-8")

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

    def state(self) -> dict[str, Any]:
        size = self.path.stat().st_size if self._file.closed else self._file.tell()
        return {"path": str(self.path.resolve()), "bytes": size}

    def finish(self, summary: dict[str, Any]) -> None:
        self._file.close()
