"""Aggregate run directories into one paper-style table: mean ± std over seeds, n runs per row.

    python -m gain_exp.table <multirun dir or run dirs ...> [--metrics ...] [--rows k1,k2] [--csv f] [--md f] [--wandb]

Runs that differ only by ``seed`` are one row (mean ± std over seeds, n); rows are the overrides that differ
between runs (or ``--rows``), columns the chosen metrics. Prints Markdown; writes CSV/Markdown on request.
"""
from __future__ import annotations

import argparse
import csv
import difflib
import io
import json
import math
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from omegaconf import OmegaConf

TEST_STATS = ("acc", "mAP", "loc_iou", "pointing_game")  # default columns, per evaluated split, when present
NOT_ROWS = ("seed",)  # what a row averages over


@dataclass
class Run:
    """One finished job as the table sees it."""

    path: Path
    summary: dict[str, Any]
    overrides: dict[str, str]  # key (without +/++) -> value, from .hydra/overrides.yaml
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def metrics(self) -> dict[str, Any]:
        return self.summary.get("final") or {}

    def value(self, key: str) -> str:
        """The run's setting for ``key``: its override, else its group choice, else its config value."""
        if key in self.overrides:
            return self.overrides[key]
        choices = self.summary.get("choices") or {}
        if key in choices:
            return str(choices[key])
        node: Any = self.config
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                return "-"
            node = node[part]
        return json.dumps(node) if isinstance(node, (dict, list)) else str(node)


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


@dataclass
class Table:
    """Rows keyed by ``row_keys``, one column per metric."""

    row_keys: list[str]
    metrics: list[str]
    rows: list[Row]

    def markdown(self) -> str:
        head = [*(self.row_keys or ["runs"]), "n", *self.metrics]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for row in self.rows:
            cells = [*(_short(v) for v in row.values or ("all",)), str(len(row.runs))]
            for metric in self.metrics:
                cells.append(_cell(*row.stats(metric), total=len(row.runs)))
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


def find_runs(paths: Sequence[str | Path]) -> list[Path]:
    """Run directories (holding summary.json) at or below each path, in job order."""
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist; pass a multirun directory (outputs/multirun/<date>) "
                                    f"or run directories written by python -m gain_exp.run.")
        runs = [path] if (path / "summary.json").is_file() else sorted(
            (p.parent for p in path.rglob("summary.json")), key=_natural)
        if not runs:
            raise FileNotFoundError(f"{path} holds no runs (no summary.json at or below it); pass a multirun "
                                    f"directory or run directories written by python -m gain_exp.run.")
        found += [r for r in runs if r not in found]
    return found


def load_run(path: Path) -> Run:
    """summary.json plus the .hydra overrides and config a job saved."""
    summary = json.loads((path / "summary.json").read_text())
    hydra_dir = path / ".hydra"
    listed = summary.get("overrides") or []
    if (hydra_dir / "overrides.yaml").is_file():
        listed = _load_yaml(hydra_dir / "overrides.yaml") or []
    config = _load_yaml(hydra_dir / "config.yaml") if (hydra_dir / "config.yaml").is_file() else {}
    return Run(path, summary, _parse_overrides(listed), config)


def build_table(runs: Sequence[Run], metrics: Sequence[str] | None = None,
                rows: Sequence[str] | None = None) -> Table:
    """Group ``runs`` by the row keys (auto: overrides that differ, except seed and hydra.*) and pick metrics."""
    row_keys = list(rows) if rows else _differing_keys(runs)
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
    return Table(row_keys, chosen, [Row(values, members) for values, members in groups.items()])


def default_metrics(runs: Sequence[Run]) -> list[str]:
    """Accuracy-type metrics of every test split, then their localisation metrics; val when there is no test."""
    known = {k for r in runs for k in r.metrics}
    splits = sorted({k.split("/")[0] for k in known if k.startswith("test")}) or ["val"]
    first = [f"{s}/{m}" for s in splits for m in TEST_STATS[:2]]
    then = [f"{s}/{m}" for s in splits for m in TEST_STATS[2:]]
    return [m for m in first + then if m in known]


def optuna_notes(paths: Sequence[str | Path]) -> list[str]:
    """The best trial of each Optuna sweep below the paths (its optimization_results.yaml)."""
    notes = []
    for raw in paths:
        for result in sorted(Path(raw).rglob("optimization_results.yaml")):
            best = _load_yaml(result) or {}
            params = ", ".join(f"{k}={v}" for k, v in (best.get("best_params") or {}).items())
            notes.append(f"Optuna best in {result.parent}: {best.get('best_value')} with {params}")
    return notes


def log_to_wandb(table: Table, where: Path, project: str | None, entity: str | None = None) -> None:
    """Log the table as a wandb.Table in its own run (job_type=table) grouped with the sweep it summarises."""
    import wandb

    from gain_exp.tracking.wandb import wandb_mode

    records = table.records()
    data = [list(r.values()) for r in records]
    columns = list(records[0]) if records else []
    mode = wandb_mode(None)
    run = wandb.init(project=project or "gain-exp", entity=entity, job_type="table", group=where.name, name=f"table-{where.name}",
                     dir=str(where), mode=mode, reinit="finish_previous")
    run.log({"results": wandb.Table(columns=columns, data=data)})
    run.finish()
    if mode == "offline":
        print(f"W&B table saved offline; upload it with: wandb sync {Path(run.dir).parent}")


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry; returns the process exit status."""
    parser = argparse.ArgumentParser(prog="python -m gain_exp.table", description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", help="multirun directories or run directories")
    parser.add_argument("--metrics", nargs="+", help="columns (default: test-split accuracy and localisation)")
    parser.add_argument("--rows", help="comma-separated row keys (default: the overrides that differ between runs)")
    parser.add_argument("--csv", type=Path, help="also write the table as CSV (mean, std, n per metric)")
    parser.add_argument("--md", type=Path, help="also write the Markdown table to this file")
    parser.add_argument("--wandb", action="store_true", help="also log the table to W&B (offline without a login)")
    args = parser.parse_args(argv)
    try:
        runs = []
        for path in find_runs(args.paths):
            run = load_run(path)
            if run.summary.get("status") != "completed":
                print(f"note: skipped {path}: status={run.summary.get('status')}", file=sys.stderr)
                continue
            runs.append(run)
        if not runs:
            raise ValueError(f"no completed runs under {', '.join(args.paths)}; finish or re-run them first.")
        table = build_table(runs, args.metrics, args.rows.split(",") if args.rows else None)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for note in optuna_notes(args.paths):
        print(f"note: {note}", file=sys.stderr)
    text = table.markdown()
    print(text, end="")
    if args.md:
        args.md.write_text(text)
    if args.csv:
        args.csv.write_text(table.csv())
    if args.wandb:
        wandb_cfg = (runs[0].config.get("logger") or {}).get("wandb") or {}
        log_to_wandb(table, Path(args.paths[0]), wandb_cfg.get("project"), wandb_cfg.get("entity"))
    return 0


def _load_yaml(path: Path) -> Any:
    """A YAML file as plain containers, interpolations left as written."""
    return OmegaConf.to_container(OmegaConf.load(path), resolve=False)


def _parse_overrides(items: Sequence[str]) -> dict[str, str]:
    """``["+setting=gain", "seed=1"]`` -> ``{"setting": "gain", "seed": "1"}`` (deletions ``~key`` dropped)."""
    parsed = {}
    for item in items:
        if "=" not in item or item.startswith("~"):
            continue
        key, value = item.split("=", 1)
        parsed[key.lstrip("+")] = value
    return parsed


def _differing_keys(runs: Sequence[Run]) -> list[str]:
    """Override keys (in first-seen order) whose value is not the same in every run."""
    keys: list[str] = []
    for run in runs:
        keys += [k for k in run.overrides if k not in keys]
    keys = [k for k in keys if k not in NOT_ROWS and not k.startswith("hydra")]
    return [k for k in keys if len({r.value(k) for r in runs}) > 1]


def _cell(mean: float | None, std: float | None, count: int, total: int) -> str:
    if mean is None:
        return "-"
    text = f"{mean:.3f}" if std is None else f"{mean:.3f} ± {std:.3f}"
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


def _natural(path: Path) -> list[Any]:
    """Sort key that puts job 2 before job 10."""
    return [int(part) if part.isdigit() else part for part in path.parts]


if __name__ == "__main__":
    sys.exit(main())
