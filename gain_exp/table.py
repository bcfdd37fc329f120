"""Aggregate run directories into one paper-style table: mean ± std over seeds, n runs per row.

    python -m gain_exp.table <multirun dir or run dirs ...> [--metrics ...] [--rows k1,k2] [--where k=v ...]
                             [--csv f] [--md f] [--save-spec f] [--wandb] [--plot f.png]
    python -m gain_exp.table --spec sweeps/tables/<name>.yaml [--plot f.png]
    python -m gain_exp.table sweeps/tables/<name>.yaml <more run dirs ...> --save-spec ...   # grow a saved table

Runs that differ only by ``seed`` are one row (mean ± std over seeds, n); rows are the overrides that differ
between runs (or ``--rows``), columns the chosen metrics. Prints Markdown; writes CSV/Markdown on request, and
beside them (or at ``--save-spec``) the table's spec: its sources, rows, metrics, every job's recipe and numbers,
so ``--spec`` re-prints it and ``python -m gain_exp.reproduce <spec>`` re-runs and checks it on a fresh clone.
``--plot`` also draws the table as bar charts (gain_exp/runs/plot.py; needs the ``plot`` extra, matplotlib).
A spec given among the paths adds its jobs' committed numbers, so a table measured over several sessions or machines
grows by the runs finished since (a job both in the spec and given as a run directory counts once, from its run).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Sequence

from gain_exp.output.files import CannotWrite, atomic_write
from gain_exp.runs.rundir import load_yaml
from gain_exp.runs.tables import (
    Table,
    build_table,
    completed_runs,
    read_spec,
    read_specs,
    select_runs,
    table_from_spec,
    table_spec,
    write_spec,
)
from gain_exp.tracking.wandb import wandb_mode

PLOT_MISSING = "--plot needs matplotlib; install it with pip install 'gain-exp[plot]' (or pip install matplotlib)."


def optuna_notes(paths: Sequence[str | Path]) -> list[str]:
    """The best trial of each Optuna sweep below the paths (its optimization_results.yaml)."""
    notes = []
    for raw in paths:
        if not Path(raw).is_dir():
            continue
        for result in sorted(Path(raw).rglob("optimization_results.yaml")):
            try:
                best = load_yaml(result)
            except ValueError as err:  # the table is made; a note it cannot add is no reason to stop
                print(f"warning: no Optuna note: {err}", file=sys.stderr)
                continue
            best = best if isinstance(best, dict) else {}
            params = best.get("best_params") if isinstance(best.get("best_params"), dict) else {}
            params = ", ".join(f"{k}={v}" for k, v in params.items())
            notes.append(f"Optuna best in {result.parent}: {best.get('best_value')} with {params}")
    return notes


def log_to_wandb(table: Table, where: Path, project: str | None, entity: str | None = None) -> None:
    """Log the table as a wandb.Table in its own run (job_type=table) grouped with the sweep it summarises."""
    import wandb

    records = table.records()
    data = [list(r.values()) for r in records]
    columns = list(records[0]) if records else []
    mode = wandb_mode(None)
    run = wandb.init(
        project=project or "gain-exp",
        entity=entity,
        job_type="table",
        group=where.name,
        name=f"table-{where.name}",
        dir=str(where),
        mode=mode,
        reinit="finish_previous",
    )
    run.log({"results": wandb.Table(columns=columns, data=data)})
    run.finish()
    if mode == "offline":
        print(f"W&B table saved offline; upload it with: wandb sync {Path(run.dir).parent}")


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry; returns the process exit status."""
    parser = argparse.ArgumentParser(prog="python -m gain_exp.table", description=__doc__.splitlines()[0])
    parser.add_argument(
        "paths",
        nargs="*",
        help="multirun directories, run directories or table specs (their jobs' committed numbers join the runs)",
    )
    parser.add_argument("--metrics", nargs="+", help="columns (default: test-split accuracy and localisation)")
    parser.add_argument("--rows", help="comma-separated row keys (default: the overrides that differ between runs)")
    parser.add_argument(
        "--where",
        nargs="+",
        metavar="KEY=VALUE[,VALUE]",
        help="only the runs whose setting KEY "
        "(an override, group choice or config key, as --rows) is one of the values",
    )
    parser.add_argument("--csv", type=Path, help="also write the table as CSV (mean, std, n per metric)")
    parser.add_argument("--md", type=Path, help="also write the Markdown table to this file")
    parser.add_argument("--wandb", action="store_true", help="also log the table to W&B (offline without a login)")
    parser.add_argument(
        "--save-spec", type=Path, help="write the table's spec here (default: beside --md/--csv, as <name>.spec.yaml)"
    )
    parser.add_argument("--spec", type=Path, help="re-print the table of this spec (instead of run directories)")
    parser.add_argument("--digits", type=int, default=3, help="decimals per mean and std")
    parser.add_argument(
        "--plot",
        type=Path,
        help="also draw the table as PNG bar charts: a panel per metric, a bar "
        "per row, mean ± std (needs matplotlib: the plot extra)",
    )
    args = parser.parse_args(argv)
    if args.plot is not None and not _can_plot():
        print(f"error: {PLOT_MISSING}", file=sys.stderr)
        return 2
    if args.spec is not None:
        return _print_spec(args)
    try:
        if not args.paths:
            raise ValueError("no runs given; pass multirun or run directories, or --spec <table spec>.")
        specs = read_specs(args.paths)
        runs = completed_runs(args.paths, specs=specs)
        if not runs:
            raise ValueError(f"no completed runs under {', '.join(args.paths)}; finish or re-run them first.")
        if args.where:
            runs = select_runs(runs, args.where)
        table = build_table(runs, args.metrics, args.rows.split(",") if args.rows else None, args.digits)
    except (ValueError, FileNotFoundError, CannotWrite) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for note in optuna_notes(args.paths):
        print(f"note: {note}", file=sys.stderr)
    spec_path = args.save_spec or (_spec_beside(args.md or args.csv) if (args.md or args.csv) else None)
    try:
        if _emit(table, args):
            return 2
        if spec_path:
            command = shlex.join(["python", "-m", "gain_exp.table", *(sys.argv[1:] if argv is None else argv)])
            write_spec(spec_path, table_spec(table, args.paths, command, specs))
    except CannotWrite as err:  # a read-only folder or a full disk: the table was printed, its file is not written
        print(f"error: {err}", file=sys.stderr)
        return 2
    if spec_path:
        print(
            f"note: spec in {spec_path}; re-run and check it with python -m gain_exp.reproduce {spec_path}",
            file=sys.stderr,
        )
    if args.wandb:
        wandb_cfg = (runs[0].config.get("logger") or {}).get("wandb") or {}
        log_to_wandb(table, Path(args.paths[0]), wandb_cfg.get("project"), wandb_cfg.get("entity"))
    return 0


def _print_spec(args: argparse.Namespace) -> int:
    """``--spec``: print (and write on request) the table a spec holds."""
    try:
        if args.paths:
            raise ValueError(f"--spec {args.spec} and run directories were both given; pass one of them.")
        table, origin = table_from_spec(read_spec(args.spec))
    except (ValueError, FileNotFoundError, CannotWrite) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"note: table of {args.spec} from {origin}", file=sys.stderr)
    try:
        return _emit(table, args)
    except CannotWrite as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def _emit(table: Table, args: argparse.Namespace) -> int:
    """Print the Markdown table and write the --md/--csv/--plot files asked for; returns the exit status."""
    text = table.markdown()
    print(text, end="")
    if args.md:
        _write(args.md, text)
    if args.csv:
        _write(args.csv, table.csv())
    if args.plot:
        from gain_exp.runs.plot import plot_table  # matplotlib only when asked for

        try:
            plot_table(table, args.plot)
        except (ValueError, CannotWrite) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    return 0


def _can_plot() -> bool:
    """Whether matplotlib imports (the ``plot`` extra), checked before any output so --plot fails in one line."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _write(path: Path, text: str) -> None:
    with atomic_write(path) as f:
        f.write(text.encode())


def _spec_beside(output: Path) -> Path:
    """``table.md`` -> ``table.spec.yaml``."""
    return output.with_suffix(".spec.yaml")


if __name__ == "__main__":
    sys.exit(main())
