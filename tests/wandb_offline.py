"""Reads an offline W&B run back from its run-*.wandb file (wandb ships no public reader)."""

from __future__ import annotations

import json
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from wandb.proto import wandb_internal_pb2 as pb

FILE_HEADER = 7  # b":W&B", u16 magic 0xBEE1, u8 version
BLOCK = 32 * 1024
CHUNK_HEADER = 7  # u32 crc, u16 length, u8 type
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


@dataclass
class MetricDefinition:
    """A ``define_metric`` as recorded: its x-axis metric ("" = the global step) and summary aggregates."""

    step_metric: str = ""
    summary: set[str] = field(default_factory=set)
    hidden: bool = False


@dataclass
class OfflineRun:
    """What one offline run recorded: its identity, config, metric definitions, history rows and final summary."""

    path: Path
    run_id: str = ""
    group: str = ""
    name: str = ""
    job_type: str = ""
    tags: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    artifacts: list[str] = field(default_factory=list)
    metrics: dict[str, MetricDefinition] = field(default_factory=dict)

    @property
    def files(self) -> Path:
        return self.path.parent / "files"

    def history_keys(self) -> set[str]:
        return {k for row in self.history for k in row}


def records(path: Path) -> Iterator[pb.Record]:
    """Every Record in a LevelDB-style log: 32 KiB blocks of chunks, records split across chunks."""
    data = path.read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a W&B run file (no :W&B header).")
    pos, pending = FILE_HEADER, b""
    while pos + CHUNK_HEADER <= len(data):
        left_in_block = BLOCK - pos % BLOCK
        if left_in_block < CHUNK_HEADER:  # block tail too short for a header is zero padding
            pos += left_in_block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + CHUNK_HEADER])
        pos += CHUNK_HEADER
        payload = data[pos : pos + length]
        pos += length
        if kind == 0 and length == 0:
            break  # preallocated space past the last record
        if kind in (FULL, FIRST):
            pending = payload
        else:
            pending += payload
        if kind in (FULL, LAST):
            record = pb.Record()
            record.ParseFromString(pending)
            yield record


def _key(item: Any) -> str:
    return "/".join(item.nested_key) if item.nested_key else item.key


def read_run(path: Path) -> OfflineRun:
    """Parse one run-*.wandb file into an OfflineRun."""
    run = OfflineRun(path=path)
    for record in records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            r = record.run
            run.run_id, run.group, run.name, run.job_type = r.run_id, r.run_group, r.display_name, r.job_type
            run.tags = list(r.tags)
            for item in r.config.update:
                run.config[_key(item)] = json.loads(item.value_json)
        elif kind == "config":
            for item in record.config.update:
                run.config[_key(item)] = json.loads(item.value_json)
        elif kind == "history":
            run.history.append({_key(item): json.loads(item.value_json) for item in record.history.item})
        elif kind == "summary":
            for item in record.summary.update:
                run.summary[_key(item)] = json.loads(item.value_json)
        elif kind == "metric":
            m = record.metric
            run.metrics[m.name or m.glob_name] = MetricDefinition(
                step_metric=m.step_metric,
                summary={f.name for f, on in m.summary.ListFields() if on},
                hidden=m.options.hidden,
            )
        elif kind == "artifact":
            run.artifacts.append(record.artifact.name)
    return run


def offline_runs(root: Path) -> list[OfflineRun]:
    """Every offline run under ``root`` (searched recursively), oldest first.

    Tears this process's W&B service down first: ``run.finish()`` returns before wandb-core closes the run's stream,
    so a log read straight after it can still be the bare 7-byte header (seen under load: run_id '' and no history).
    ``wandb.teardown()`` waits until every stream is written and closed."""
    if "wandb" in sys.modules:
        sys.modules["wandb"].teardown()
    return [read_run(p) for p in sorted(Path(root).rglob("offline-run-*/run-*.wandb"))]
