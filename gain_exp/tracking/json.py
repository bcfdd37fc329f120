"""The always-on local record: metrics.jsonl, attention PNGs and per-image results under the run directory."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Sequence

from gain_exp.output.files import atomic_write, cannot_write, jsonable, write_error
from gain_exp.output.panels import Panel, save_panels
from gain_exp.tracking.base import Tracker

log = logging.getLogger(__name__)


class JsonTracker(Tracker):
    """metrics.jsonl, attention PNGs and per-image results/<split>.jsonl under the run directory."""

    optional = False  # the local record is what summary tables and re-analysis read

    def __init__(self, out_dir: str | os.PathLike, resume: dict[str, Any] | None = None, **_: Any) -> None:
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.out_dir / "metrics.jsonl"
        # Resuming in the same run dir (wherever it lives now: train.checkpoints.saved_tracking points a checkpoint
        # of this directory at this file) continues the file from the checkpoint's byte count: the lines written
        # after the checkpoint (a kill between the two) are dropped, and the resumed run writes them again. Lines
        # here on any other start are an earlier start's (e.g. one killed before its first checkpoint, then
        # trainer.resume=auto starting fresh): this run logs its steps anew. Either happens at the first record, so
        # a start that fails before training (a resume that is refused) leaves the file as it was.
        continues = bool(resume) and resume.get("path") == str(self.path.resolve()) and self.path.is_file()
        self._keep = min(resume["bytes"], self.path.stat().st_size) if continues else 0
        self._file: Any = None
        self.path.touch()  # the record exists from the start, empty until the first step

    def _open(self) -> Any:
        if self._file is None:
            if self.path.is_file() and self.path.stat().st_size > self._keep:
                if self._keep == 0:
                    log.warning(
                        "%s: dropping the %d line(s) of an earlier start in this run directory; this run "
                        "logs its steps anew",
                        self.path,
                        self.path.read_bytes().count(b"\n"),
                    )
                os.truncate(self.path, self._keep)
            self._file = open(self.path, "a", encoding="utf-8")
        return self._file

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        record = {"step": step, **{k: jsonable(v) for k, v in metrics.items()}}
        try:
            f = self._open()
            f.write(json.dumps(record) + "\n")
            f.flush()
        except OSError as err:  # a full disk: one sentence; a resume cuts the file back to its last checkpoint
            cause = write_error(err)
            if cause is None:
                raise
            raise cannot_write(self.path, cause).but(
                kept="its earlier lines are kept",
                fix="free some space, then continue this run with trainer.resume=auto",
            ) from None

    def log_panels(self, split: str, panels: Sequence[Panel], epoch: int, step: int | None = None) -> None:
        if not panels:
            return
        name = f"{split}_epoch{epoch:03d}.png" if step is None else f"{split}_step{step:06d}.png"
        save_panels([p.strip for p in panels], self.out_dir / "attention" / name)

    def log_table(self, split: str, panels: Sequence[Panel]) -> None:
        with atomic_write(self.out_dir / "results" / f"{split}.jsonl") as f:
            f.write("".join(json.dumps(p.row(i)) + "\n" for i, p in enumerate(panels)).encode())

    def state(self) -> dict[str, Any]:
        if self._file is None:  # nothing logged yet: the file will be kept up to here
            size = self._keep
        else:
            size = self.path.stat().st_size if self._file.closed else self._file.tell()
        return {"path": str(self.path.resolve()), "bytes": size}

    def finish(self, summary: dict[str, Any]) -> None:
        if self._file is not None:
            self._file.close()
