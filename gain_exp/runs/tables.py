"""Runs grouped into a paper-style table (mean ± std over seeds, n per row) and the table as a saved spec."""

from __future__ import annotations

import csv
import difflib
import io
import math
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from gain_exp.output.files import atomic_write
from gain_exp.runs.rundir import (
    DamagedRun,
    Run,
    _parse_overrides,
    find_runs,
    local,
    portable,
    read_run,
)

TEST_STATS = ("acc", "mAP", "loc_iou", "pointing_game")  # default columns, per evaluated split, when present


NOT_ROWS = ("seed",)  # what a row averages over


SPEC_KIND = "gain_exp.table/1"


SPEC_SUFFIXES = (".yaml", ".yml")  # a path with one of these among the table's inputs is a table spec


@dataclass
class Row:
    """Runs sharing every row key's value: one line of the table."""

    values: tuple[str, ...]
    runs: list[Run]

    def stats(self, metric: str) -> tuple[float | None, float | None, int]:
        """(mean, sample std, count) of ``metric`` over this row's runs that report a finite value."""
        xs = [float(v) for r in self.runs if _finite(v := r.metrics.get(metric))]
        if not xs:
            return None, None, 0
        return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else None), len(xs)

    def label(self) -> str:
        """The row's key values as the table prints them, joined: ``shapes / gain_ext`` (``all`` without keys)."""
        return " / ".join(_short(v) for v in self.values) or "all"


@dataclass
class Table:
    """Rows keyed by ``row_keys``, one column per metric."""

    row_keys: list[str]
    metrics: list[str]
    rows: list[Row]
    digits: int = 3  # decimals printed per mean and std

    def markdown(self) -> str:
        head = [*(self.row_keys or ["runs"]), "n", *self.metrics]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for row in self.rows:
            cells = [*(_short(v) for v in row.values or ("all",)), str(len(row.runs))]
            for metric in self.metrics:
                cells.append(_cell(*row.stats(metric), total=len(row.runs), digits=self.digits))
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n"

    def records(self) -> list[dict[str, Any]]:
        """One flat dict per row: row keys, n, and mean/std/n per metric (full precision)."""
        out = []
        for row in self.rows:
            record: dict[str, Any] = dict(zip(self.row_keys, row.values))
            record["n"] = len(row.runs)
            for metric in self.metrics:
                mean, std, count = row.stats(metric)
                record.update({f"{metric} mean": mean, f"{metric} std": std, f"{metric} n": count})
            out.append(record)
        return out

    def csv(self) -> str:
        records = self.records()
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(records[0]) if records else ["n"], lineterminator="\n")
        writer.writeheader()
        writer.writerows(records)
        return buffer.getvalue()


def build_table(
    runs: Sequence[Run], metrics: Sequence[str] | None = None, rows: Sequence[str] | None = None, digits: int = 3
) -> Table:
    """Group ``runs`` by the row keys (auto: overrides that differ, except seed and hydra.*) and pick metrics."""
    row_keys = list(rows) if rows is not None else _differing_keys(runs)
    chosen = list(metrics) if metrics else default_metrics(runs)
    known = {k for r in runs for k in r.metrics}
    for metric in chosen:
        if metric not in known:
            close = difflib.get_close_matches(metric, sorted(known), n=3)
            hint = f"did you mean {', '.join(close)}?" if close else f"available: {', '.join(sorted(known)[:12])} ..."
            raise ValueError(f"--metrics {metric} is in no run's summary.json final metrics; {hint}")
    groups: dict[tuple[str, ...], list[Run]] = {}
    for run in runs:
        groups.setdefault(tuple(run.value(k) for k in row_keys), []).append(run)
    return Table(row_keys, chosen, [Row(values, members) for values, members in groups.items()], digits)


def default_metrics(runs: Sequence[Run]) -> list[str]:
    """Accuracy-type metrics of every test split, then their localisation metrics; val when there is no test."""
    known = {k for r in runs for k in r.metrics}
    splits = sorted({k.split("/")[0] for k in known if k.startswith("test")}) or ["val"]
    first = [f"{s}/{m}" for s in splits for m in TEST_STATS[:2]]
    then = [f"{s}/{m}" for s in splits for m in TEST_STATS[2:]]
    return [m for m in first + then if m in known]


def table_spec(
    table: Table,
    sources: Sequence[str | Path],
    command: str | None = None,
    specs: Mapping[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The table as a saved config: sources, rows, metrics, format, each job's recipe and numbers, and its cells.

    A spec among ``sources`` (``specs``, as ``read_specs`` gives them: a table grown from a saved one) stands for what
    it was made from: its own sources replace it, and the commands that made it are kept in order under
    ``earlier_commands``, so a spec grown in place still says where every job came from."""
    flat: list[str] = []
    earlier: list[str] = []
    for source in sources:
        spec = (specs or {}).get(str(source))
        mine = [portable(source)] if spec is None else spec.get("sources") or []
        flat += [s for s in mine if s not in flat]
        if spec is not None:
            earlier += [c for c in [*(spec.get("earlier_commands") or []), spec.get("command")] if c]
    jobs = []
    for row in table.rows:
        for run in row.runs:
            recipe = run.recipe()
            recipe["config_dirs"] = [portable(d) for d in recipe["config_dirs"]]
            recipe["cwd"] = portable(recipe["cwd"]) if recipe["cwd"] else None
            jobs.append(
                {
                    **recipe,
                    "run_dir": portable(run.path),
                    "choices": run.choices,
                    "row": dict(zip(table.row_keys, row.values)),
                    "final": {m: run.metrics.get(m) for m in table.metrics},
                }
            )
    return {
        "kind": SPEC_KIND,
        "command": command,
        **({"earlier_commands": earlier} if earlier else {}),
        "sources": flat,
        "rows": table.row_keys,
        "metrics": table.metrics,
        "format": {"digits": table.digits},
        "jobs": jobs,
        "records": table.records(),
    }


def write_spec(path: Path, spec: dict[str, Any]) -> None:
    """Write a table spec as YAML, with a header saying how to use it."""
    header = (
        "# A table as a saved config (gain_exp.table). Re-print it: python -m gain_exp.table --spec <this file>\n"
        "# Re-run every job and compare with the numbers below: python -m gain_exp.reproduce <this file>\n"
        "# Relative paths are relative to the repository root.\n"
    )
    with atomic_write(path) as f:
        f.write((header + yaml.safe_dump(spec, sort_keys=False, allow_unicode=True, width=120)).encode())


def read_spec(path: Path) -> dict[str, Any]:
    """A table spec written by ``write_spec``, checked enough to use."""
    how = f"write one with python -m gain_exp.table <runs> --save-spec {path}"
    if not path.is_file():
        raise FileNotFoundError(f"table spec {path} does not exist; {how}.")
    try:
        spec = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ValueError(f"{path} is not valid YAML ({str(err).splitlines()[0]}); fix it or {how}.") from None
    if (
        not isinstance(spec, dict)
        or spec.get("kind") != SPEC_KIND
        or not isinstance(spec.get("jobs"), list)
        or not spec["jobs"]
    ):
        raise ValueError(f"{path} is not a table spec (kind: {SPEC_KIND} with a list of jobs); {how}.")
    for i, job in enumerate(spec["jobs"]):
        missing = [k for k in ("name", "overrides", "row", "final") if not isinstance(job, dict) or k not in job]
        if missing:
            raise ValueError(f"job {i} of {path} lacks {', '.join(missing)}; {how}.")
    return spec


def spec_runs(spec: dict[str, Any]) -> list[Run]:
    """The spec's jobs as runs that carry its committed numbers and row values (no run directory needed)."""
    runs = []
    for job in spec["jobs"]:
        summary = {
            "status": "completed",
            "final": job["final"],
            "choices": job.get("choices") or {},
            "overrides": job["overrides"],
            "seed": job.get("seed"),
            "git": job.get("git"),
            "threads": job.get("threads"),
        }
        runs.append(
            Run(
                local(job.get("run_dir") or job["name"]),
                summary,
                _parse_overrides(job["overrides"]),
                listed=list(job["overrides"]),
                fixed={k: str(v) for k, v in job["row"].items()},
            )
        )
    return runs


def table_from_spec(spec: dict[str, Any]) -> tuple[Table, str]:
    """The spec's table from its run directories when all are here, else from its committed numbers; and which."""
    dirs = [local(job["run_dir"]) for job in spec["jobs"] if job.get("run_dir")]
    here = len(dirs) == len(spec["jobs"]) and all((d / "summary.json").is_file() for d in dirs)
    runs = [read_run(d) for d in dirs] if here else spec_runs(spec)
    digits = int((spec.get("format") or {}).get("digits", 3))
    table = build_table(runs, spec.get("metrics"), spec.get("rows") or [], digits)
    return table, ("its run directories" if here else "the numbers it holds")


def select_runs(runs: Sequence[Run], where: Sequence[str]) -> list[Run]:
    """The runs whose value of each ``KEY=V1,V2`` is one of its values; none left is one sentence naming the values."""
    wanted = {}
    for item in where:
        key, sep, values = item.partition("=")
        if not sep or not key or not values:
            raise ValueError(f"--where {item}: write KEY=VALUE or KEY=VALUE1,VALUE2 (e.g. --where loss=gain_ext).")
        wanted[key.lstrip("+")] = values.split(",")
    chosen = [r for r in runs if all(r.value(k) in vs for k, vs in wanted.items())]
    if not chosen:
        seen = "; ".join(f"{k}: {', '.join(sorted({r.value(k) for r in runs}))}" for k in wanted)
        raise ValueError(f"--where {' '.join(where)} matches none of the {len(runs)} runs; their values are {seen}.")
    return chosen


def read_specs(paths: Sequence[str | Path]) -> dict[str, dict[str, Any]]:
    """The table specs among ``paths`` (a ``.yaml``/``.yml`` path is one), each read once, by path."""
    return {str(p): read_spec(Path(p)) for p in paths if Path(p).suffix in SPEC_SUFFIXES}


def completed_runs(
    paths: Sequence[str | Path], damaged: str = "skip", specs: Mapping[str, dict[str, Any]] | None = None
) -> list[Run]:
    """The completed runs at or below ``paths``, plus the jobs of any table spec among them (``specs``, when the
    caller has read them with ``read_specs``); the others (interrupted, diverged, failed) are named and left out. A
    spec's job that is also here as a run directory (same directory, same overrides) is counted once, from the
    directory. A damaged run directory (``DamagedRun``) is left out with a warning, or with ``damaged="raise"`` raised
    (a reproduction must not drop a job). Runs come in the order of ``paths`` (a spec's jobs in its own order), so a
    table grown from its spec keeps its rows' order."""
    specs = read_specs(paths) if specs is None else specs
    live = {str(p): _live_runs([p], damaged) for p in paths if str(p) not in specs}
    by_identity = {_identity(r): r for found in live.values() for r in found}
    runs: list[Run] = []
    taken: set[tuple[Path, tuple[str, ...]]] = set()
    for path in map(str, paths):
        spec = specs.get(path)
        found = live[path] if spec is None else [by_identity.get(_identity(j), j) for j in spec_runs(spec)]
        for run in found:
            identity = _identity(run)
            if identity not in taken:
                taken.add(identity)
                runs.append(run)
    return runs


def _identity(run: Run) -> tuple[Path, tuple[str, ...]]:
    """What makes a spec's job and a run directory the same job: where it ran and its task overrides."""
    return run.path.resolve(), tuple(run.task_overrides)


def _live_runs(paths: Sequence[str | Path], damaged: str = "skip") -> list[Run]:
    runs = []
    for path in find_runs(paths):
        try:
            run = read_run(path)
        except DamagedRun as err:  # one broken run dir must not hide a sweep's table
            if damaged == "raise":
                raise
            print(f"warning: skipped {path}: {err}", file=sys.stderr)
            continue
        if run.summary.get("status") == "diverged":
            reason = str(run.summary.get("error") or "non-finite loss or weights").split(";")[0]
            print(f"warning: skipped {path}: it diverged in training ({reason}), so it has no numbers", file=sys.stderr)
            continue
        if run.summary.get("status") != "completed":
            print(f"note: skipped {path}: status={run.summary.get('status')}", file=sys.stderr)
            continue
        runs.append(run)
    return runs


def _differing_keys(runs: Sequence[Run]) -> list[str]:
    """Override keys (in first-seen order) whose value is not the same in every run."""
    keys: list[str] = []
    for run in runs:
        keys += [k for k in run.overrides if k not in keys]
    keys = [k for k in keys if k not in NOT_ROWS and not k.startswith("hydra")]
    return [k for k in keys if len({r.value(k) for r in runs}) > 1]


def _cell(mean: float | None, std: float | None, count: int, total: int, digits: int = 3) -> str:
    if mean is None:
        return "-"
    text = f"{mean:.{digits}f}" if std is None else f"{mean:.{digits}f} ± {std:.{digits}f}"
    return text if count == total else f"{text} ({count} of {total})"


def _short(value: str) -> str:
    """Sampled floats (Optuna's 0.45419287960334287) as 4 significant digits; anything else as it is."""
    try:
        number = float(value)
    except ValueError:
        return value
    return f"{number:.4g}" if len(value) > 8 and "." in value else value


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
