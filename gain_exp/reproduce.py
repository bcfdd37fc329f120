"""Re-run saved jobs exactly as they ran and compare their numbers with the originals.

    python -m gain_exp.reproduce SOURCE [--out DIR] [--jobs N] [--dry-run] [--resume] [--trust]

SOURCE is a run directory, a multirun directory or a table spec (sweeps/tables/<name>.yaml, written by
``python -m gain_exp.table ... --save-spec``). Every job runs again as a subprocess with its saved task overrides,
config dirs, config name and torch thread count, into DIR/<run dir name> or DIR/<sweep dir name>/<job subdir>.
The original and reproduced tables are printed side by side with a verdict per cell and written to
DIR/comparison.md and DIR/comparison.json. Exit status: 0 when every cell is identical or within the original's
seed spread, 1 when any cell differs or a job fails, 2 for a user error. A spec or run directory from someone else
is checked before any job is composed (docs/trust.md: a ``_target_`` the project does not use, hydra callbacks, ...
are refused with one sentence, exit 2); ``--trust`` skips the check.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Sequence

from gain_exp.output.files import CannotWrite, jsonable, write_json
from gain_exp.runs.rundir import (
    Job,
    read_run,
    sweeps_dir,
)
from gain_exp.runs.tables import Row, Run, Table, build_table, completed_runs, read_spec, spec_runs
from gain_exp.runs.trust import TRUST_FLAG, TRUST_HELP, check_run, check_spec
from gain_exp.tracking.wandb import REPRODUCING

TOLERANCE = 1e-9  # |reproduced - original| at or below this is the same number


@dataclass
class Source:
    """What to reproduce: the jobs, the original runs (one per job, same order) and the original table."""

    name: str
    jobs: list[Job]
    runs: list[Run]
    table: Table
    committed: dict[tuple[str, ...], dict[str, Any]] = field(default_factory=dict)  # a spec's cells, by row


def load_source(text: str, trust: bool = False) -> Source:
    """The jobs and original numbers of a run directory, a multirun directory or a table spec; unless ``trust``,
    every job is checked first (runs.trust) and the first untrusted override is one sentence (``Untrusted``)."""
    path = Path(text)
    shipped = sweeps_dir() / "tables" / f"{text}.yaml"
    if not path.exists() and "/" not in text and shipped.is_file():  # `reproduce readme_shapes`
        path = shipped
    if not path.exists():
        raise FileNotFoundError(
            f"SOURCE {text} does not exist (relative to {Path.cwd()}); pass a run directory, "
            f"a multirun directory or a table spec such as sweeps/tables/<name>.yaml."
        )
    if path.is_file():
        if path.suffix not in (".yaml", ".yml"):
            raise ValueError(
                f"SOURCE {text} is a file but not a table spec (.yaml); pass a run directory, "
                f"a multirun directory or a spec written by python -m gain_exp.table --save-spec."
            )
        spec = read_spec(path)
        if not trust:
            check_spec(spec, path)
        runs = spec_runs(spec)
        table = build_table(
            runs, spec.get("metrics"), spec.get("rows") or [], int((spec.get("format") or {}).get("digits", 3))
        )
        committed = {tuple(str(r.get(k)) for k in table.row_keys): r for r in spec.get("records") or []}
        return Source(path.stem, [Job.from_recipe(j) for j in spec["jobs"]], runs, table, committed)
    runs = completed_runs([path], damaged="raise")
    if not runs:
        raise ValueError(f"SOURCE {text} holds no completed runs; finish them first or pass another directory.")
    if not trust:
        for run in runs:
            check_run(run, [path.resolve()])
    return Source(path.resolve().name, [Job.from_recipe(r.recipe()) for r in runs], runs, build_table(runs))


class Stopped(Exception):
    """A stop signal ended the reproduction: its running jobs were stopped, the others not started."""

    def __init__(self, signum: int, interrupted: list[str], not_started: list[str]) -> None:
        super().__init__(signum)
        self.signum, self.interrupted, self.not_started = signum, interrupted, not_started


class _Jobs:
    """The running jobs' processes, each in its own process group, so that a stop signal reaches every one of them:
    the first SIGINT / SIGTERM sends them SIGTERM (each saves a checkpoint and exits), a second one SIGKILL."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.running: dict[str, subprocess.Popen] = {}
        self.stopped: int | None = None
        self.interrupted: list[str] = []
        self.not_started: list[str] = []

    def start(self, name: str, argv: list[str], env: dict[str, str], log: Any) -> subprocess.Popen | None:
        with self.lock:
            if self.stopped is not None:
                self.not_started.append(name)
                return None
            process = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            self.running[name] = process
        if self.stopped is not None:  # the signal came while it started: it missed the stop
            self._send(name, process, signal.SIGTERM)
        return process

    def finished(self, name: str) -> None:
        with self.lock:
            self.running.pop(name, None)

    def stop(self, signum: int, _frame: Any = None) -> None:
        """The signal handler (main thread): SIGTERM to every running job, SIGKILL at the second signal."""
        final = self.stopped is not None
        self.stopped = signum
        for name, process in list(self.running.items()):
            self._send(name, process, signal.SIGKILL if final else signal.SIGTERM)

    def _send(self, name: str, process: subprocess.Popen, signum: int) -> None:
        if name not in self.interrupted:
            self.interrupted.append(name)
        try:
            os.killpg(process.pid, signum)  # the job's process group: the run and its DataLoader workers
        except (ProcessLookupError, PermissionError):
            pass


def run_jobs(
    jobs: Sequence[Job], out: Path, parallel: int = 1, resume: bool = False, label: str = "jobs"
) -> list[Run | None]:
    """Run every job into out/<job name>; the reproduced runs (None where a job failed), in job order. ``resume``:
    keep the jobs that completed in ``out`` and run the others again (interrupted, failed or never started).
    A stop signal (SIGINT, SIGTERM) stops every running job and starts no other; then ``Stopped`` is raised."""
    control = _Jobs()

    def one(numbered: tuple[int, Job]) -> Run | None:
        i, job = numbered
        dest = out / job.name
        status = _summary_status(dest) if (dest / "summary.json").is_file() else None
        if resume and status == "completed":
            print(f"[{i + 1}/{len(jobs)}] {job.name}: kept from {dest}", file=sys.stderr)
            return read_run(dest)
        argv, env = job.command(dest, label=label)
        if dest.exists():  # what an interrupted or failed attempt left there must not mix with the new run
            argv.append("--overwrite")
        dest.mkdir(parents=True, exist_ok=True)
        started = time.time()
        with open(dest / "reproduce.log", "w") as log:
            process = control.start(job.name, argv, env, log)
            if process is None:
                return None
            try:
                code = process.wait()
            finally:
                control.finished(job.name)
        done = code == 0 and _summary_status(dest) == "completed"
        if control.stopped is not None and not done:
            outcome = f"interrupted (exit {code}), see {dest / 'reproduce.log'}"
        else:
            outcome = "done" if done else f"failed (exit {code}), see {dest / 'reproduce.log'}"
        print(f"[{i + 1}/{len(jobs)}] {job.name}: {outcome} in {time.time() - started:.1f} s", file=sys.stderr)
        return read_run(dest) if done else None

    handlers = {}
    if threading.current_thread() is threading.main_thread():
        handlers = {s: signal.signal(s, control.stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
            results = list(pool.map(one, enumerate(jobs)))
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)
    if control.stopped is not None:
        stopped = [job.name for job, r in zip(jobs, results) if r is None and job.name in control.interrupted]
        not_started = [job.name for job in jobs if job.name in control.not_started]
        raise Stopped(control.stopped, stopped, not_started)
    return results


Stats = tuple[float | None, float | None, int]


@dataclass
class Cell:
    """One (row, metric) of both tables and how they compare."""

    row: tuple[str, ...]
    metric: str
    original: Stats
    reproduced: Stats
    diff: float | None
    verdict: str  # identical | within spread | differs | differs (n=1: no seed spread) | failed


def verdict(original: Stats, reproduced: Stats) -> tuple[float | None, str]:
    """(reproduced mean - original mean, verdict) for one cell."""
    (m0, s0, n0), (m1, _, n1) = original, reproduced
    if m0 is None or m1 is None or n0 != n1:
        return None, ("identical" if m0 is None and m1 is None else "differs")
    diff = m1 - m0
    if m1 == m0 or abs(diff) <= TOLERANCE:
        return diff, "identical"
    if s0 is None:
        return diff, "differs (n=1: no seed spread)"
    return diff, ("within spread" if abs(diff) <= s0 else "differs")


def compare(source: Source, reproduced: Sequence[Run | None]) -> list[Cell]:
    """Cells of the original table beside the same jobs' reproduced numbers, grouped by the original's rows."""
    index = {id(run): i for i, run in enumerate(source.runs)}
    cells = []
    for row in source.table.rows:
        rerun = [reproduced[index[id(run)]] for run in row.runs]
        again = Row(row.values, [r for r in rerun if r is not None])
        for metric in source.table.metrics:
            original = _committed_stats(source.committed.get(row.values), metric) or row.stats(metric)
            new = again.stats(metric)
            # a row with a job that did not finish has no number to compare: it failed, it did not differ
            outcome = (None, "failed") if None in rerun else verdict(original, new)
            cells.append(Cell(row.values, metric, original, new, *outcome))
    return cells


def commits(gits: Sequence[dict[str, Any] | None]) -> list[str]:
    """Distinct ``sha`` / ``sha+dirty`` labels of the given git states."""
    labels = {f"{g.get('commit')}{'+dirty' if g.get('dirty') else ''}" for g in gits if g and g.get("commit")}
    return sorted(labels) or ["unknown"]


def report(
    source: Source, where: str, out: Path, cells: Sequence[Cell], reproduced: Sequence[Run | None]
) -> tuple[str, dict[str, Any], int]:
    """(Markdown, JSON record, exit status) of a comparison."""
    before = commits([job.git for job in source.jobs])
    after = commits([(r.summary.get("git") or {}) for r in reproduced if r is not None])
    failed = [job.name for job, r in zip(source.jobs, reproduced) if r is None]
    keys = source.table.row_keys or ["runs"]
    digits = source.table.digits
    lines = [
        f"# Reproduction of {where}",
        "",
        f"- original: commit {', '.join(before)}",
        f"- reproduced in {out}: commit {', '.join(after)}",
        "",
    ]
    if before != after:
        lines += [
            (
                f"warning: the code differs (original {', '.join(before)}, reproduced {', '.join(after)}), "
                f"so differences may come from the code, not from chance."
            ),
            "",
        ]
    if failed:
        lines += [f"failed jobs (see their reproduce.log): {', '.join(failed)}", ""]
    threads = [
        f"{job.name} ({again.summary.get('threads')} vs {job.threads})"
        for job, again in zip(source.jobs, reproduced)
        if again is not None and job.threads and again.summary.get("threads") != job.threads
    ]
    if threads:
        lines += [f"warning: torch thread counts differ (reproduced vs original): {', '.join(threads)}.", ""]
    lines += [
        "| " + " | ".join([*keys, "metric", "original", "reproduced", "diff", "verdict"]) + " |",
        "|" + "---|" * (len(keys) + 5),
    ]
    for cell in cells:
        diff = "-" if cell.diff is None else ("0" if cell.diff == 0 else f"{cell.diff:+.2g}")
        lines.append(
            "| "
            + " | ".join(
                [
                    *(cell.row or ("all",)),
                    cell.metric,
                    _stats_text(cell.original, digits),
                    _stats_text(cell.reproduced, digits),
                    diff,
                    cell.verdict,
                ]
            )
            + " |"
        )
    counts = {v: sum(c.verdict == v for c in cells) for v in ("identical", "within spread", "failed")}
    differ = len(cells) - sum(counts.values())
    status = 1 if differ or failed else 0
    lines += [
        "",
        (
            f"{counts['identical']} of {len(cells)} cells identical, {counts['within spread']} within the "
            f"original's seed spread, {differ} differ"
            + (f", {counts['failed']} failed (a job did not finish)." if counts["failed"] else ".")
        ),
    ]
    record = {
        "source": where,
        "out": str(out),
        "exit_status": status,
        "row_keys": source.table.row_keys,
        "original_commits": before,
        "reproduced_commits": after,
        "code_differs": before != after,
        "failed_jobs": failed,
        "cells": [
            {
                "row": dict(zip(source.table.row_keys, c.row)),
                "metric": c.metric,
                "original": dict(zip(("mean", "std", "n"), c.original)),
                "reproduced": dict(zip(("mean", "std", "n"), c.reproduced)),
                "diff": c.diff,
                "verdict": c.verdict,
            }
            for c in cells
        ],
        "jobs": [
            {
                "name": job.name,
                "original": {m: run.metrics.get(m) for m in source.table.metrics},
                "reproduced": None if again is None else {m: again.metrics.get(m) for m in source.table.metrics},
                "threads": job.threads,
                "reproduced_threads": None if again is None else again.summary.get("threads"),
            }
            for job, run, again in zip(source.jobs, source.runs, reproduced)
        ],
    }
    return "\n".join(lines) + "\n", record, status


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry; returns the process exit status."""
    parser = argparse.ArgumentParser(prog="python -m gain_exp.reproduce", description=__doc__.splitlines()[0])
    parser.add_argument("source", help="run directory, multirun directory or table spec (.yaml)")
    parser.add_argument("--out", type=Path, help="where the re-runs go (default: outputs/reproduce/<source>_<time>)")
    parser.add_argument("--jobs", type=int, default=1, help="jobs run at once (default 1: one after another)")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="keep the jobs already finished in --out (an interrupted reproduction) and run the rest",
    )
    parser.add_argument(TRUST_FLAG, action="store_true", help=TRUST_HELP)
    args = parser.parse_args(argv)
    try:
        source = load_source(args.source, args.trust)
        out = args.out or Path("outputs/reproduce") / f"{source.name}_{datetime.now():%Y-%m-%d_%H-%M-%S}"
        commands = [job.command(out / job.name, label=source.name) for job in source.jobs]
        if args.dry_run:
            for command, env in commands:
                print(
                    shlex.join(
                        [
                            *(
                                f"{k}={env[k]}"
                                for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "PYTHONPATH", REPRODUCING)
                                if k in env and env[k] != os.environ.get(k)
                            ),
                            *command,
                        ]
                    )
                )
            return 0
        taken = [out / job.name for job in source.jobs if (out / job.name / "summary.json").exists()]
        if taken and not args.resume:
            raise ValueError(f"{taken[0]} already holds a run; pass a new --out directory, or --resume to keep it.")
        if args.jobs < 1:
            raise ValueError(f"--jobs {args.jobs} must be at least 1; pass --jobs 1 to run one job at a time.")
    except (ValueError, FileNotFoundError, CannotWrite) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"reproducing {len(source.jobs)} job(s) of {args.source} in {out}", file=sys.stderr)
    try:
        reproduced = run_jobs(source.jobs, out, args.jobs, args.resume, source.name)
    except Stopped as stop:
        print(
            f"stopped: signal {stop.signum} ({signal.Signals(stop.signum).name}) stopped "
            f"{len(stop.interrupted)} running job(s) ({', '.join(stop.interrupted) or 'none'}) and "
            f"{len(stop.not_started)} were not started, so no comparison was written; the finished jobs stay in "
            f"{out}: continue with `gain-exp reproduce {args.source} --out {out} --resume`.",
            file=sys.stderr,
        )
        return 130
    text, record, status = report(source, args.source, out, compare(source, reproduced), reproduced)
    print(text, end="")
    (out / "comparison.md").write_text(text)
    write_json(out / "comparison.json", jsonable(record))
    return status


def _summary_status(run_dir: Path) -> str | None:
    try:
        return json.loads((run_dir / "summary.json").read_text()).get("status")
    except (OSError, ValueError, AttributeError):
        return None


def _committed_stats(record: dict[str, Any] | None, metric: str) -> Stats | None:
    """(mean, std, n) of ``metric`` in a spec's committed row record, if it has one."""
    if not record or f"{metric} mean" not in record:
        return None
    return record[f"{metric} mean"], record.get(f"{metric} std"), int(record.get(f"{metric} n") or 0)


def _stats_text(stats: Stats, digits: int) -> str:
    mean, std, n = stats
    if mean is None:
        return "-"
    text = f"{mean:.{digits}f}" if std is None else f"{mean:.{digits}f} ± {std:.{digits}f}"
    return f"{text} (n={n})"


if __name__ == "__main__":
    sys.exit(main())
