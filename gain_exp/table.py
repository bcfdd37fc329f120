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
import csv
import difflib
import io
import json
import math
import shlex
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml
from omegaconf import OmegaConf

from gain_exp.train.provenance import SOURCE_ROOT

TEST_STATS = ("acc", "mAP", "loc_iou", "pointing_game")  # default columns, per evaluated split, when present
NOT_ROWS = ("seed",)  # what a row averages over
SPEC_KIND = "gain_exp.table/1"
SPEC_SUFFIXES = (".yaml", ".yml")  # a path with one of these among the table's inputs is a table spec
PLOT_MISSING = "--plot needs matplotlib; install it with pip install 'gain-exp[plot]' (or pip install matplotlib)."
# Hydra overrides that only shape a sweep or place its output; a re-run of one job sets its own mode and run dir.
SWEEP_ONLY = ("hydra.mode", "hydra.run.", "hydra.sweep.", "hydra.launcher", "hydra.sweeper", "hydra/launcher",
              "hydra/sweeper", "hydra.job.num", "hydra.job.id")


@dataclass
class Run:
    """One finished job as the table sees it."""

    path: Path
    summary: dict[str, Any]
    overrides: dict[str, str]  # key (without +/++) -> value, from .hydra/overrides.yaml
    config: dict[str, Any] = field(default_factory=dict)
    listed: list[str] = field(default_factory=list)  # the task overrides as Hydra saved them
    hydra: dict[str, Any] = field(default_factory=dict)  # .hydra/hydra.yaml (for runs older than summary provenance)
    fixed: dict[str, str] = field(default_factory=dict)  # row values a spec committed, when there is no run dir

    @property
    def metrics(self) -> dict[str, Any]:
        return self.summary.get("final") or {}

    @property
    def task_overrides(self) -> list[str]:
        """The job's task overrides as given (summary provenance, else .hydra/overrides.yaml)."""
        return list(self.summary.get("overrides") or self.listed)

    @property
    def choices(self) -> dict[str, str]:
        """Hydra group choices (``loss`` -> ``gain_ext``), from summary.json or else .hydra/hydra.yaml."""
        saved = self.summary.get("choices") or (self.hydra.get("runtime") or {}).get("choices") or {}
        return {k: str(v) for k, v in saved.items() if not k.startswith("hydra/") and v is not None}

    def value(self, key: str) -> str:
        """The run's setting for ``key``: its override, else its group choice, else its config value."""
        if key in self.fixed:
            return self.fixed[key]
        if key in self.overrides:
            return self.overrides[key]
        choices = self.choices
        if key in choices:
            return str(choices[key])
        node: Any = self.config
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                return "-"
            node = node[part]
        return json.dumps(node) if isinstance(node, (dict, list)) else str(node)

    def recipe(self) -> dict[str, Any]:
        """How to run this job again: name, task/hydra overrides, config dirs, cwd, threads, git, seed."""
        hydra_info = self.summary.get("hydra") or {}
        runtime = self.hydra.get("runtime") or {}
        saved_dirs = hydra_info.get("config_dirs")
        if saved_dirs is None:  # older runs: the --config-dir entries of Hydra's search path
            saved_dirs = [s["path"] for s in runtime.get("config_sources") or []
                          if s.get("provider") == "command-line" and s.get("schema") == "file"]
        hydra_overrides = (self.hydra.get("overrides") or {}).get("hydra") or []
        return {
            "name": job_name(self),
            "overrides": self.task_overrides,
            "hydra_overrides": [o for o in hydra_overrides if not o.lstrip("+~").startswith(SWEEP_ONLY)],
            "config_dirs": list(saved_dirs),
            "config_name": hydra_info.get("config_name") or (self.hydra.get("job") or {}).get("config_name")
            or "config",
            "cwd": hydra_info.get("cwd") or runtime.get("cwd"),
            "threads": self.summary.get("threads"),
            "git": self.summary.get("git") or _parse_commit(self.summary.get("git_commit")),
            "seed": self.summary.get("seed", self.config.get("seed")),
        }


def job_name(run: Run) -> str:
    """Where the job lives relative to its output root: ``<sweep dir name>/<job subdir>`` or ``<run dir name>``."""
    hydra_info = run.summary.get("hydra") or {}
    multirun = hydra_info.get("job_num") is not None or run.hydra.get("mode") == "MULTIRUN"
    if not multirun:
        return run.path.name
    sweep = hydra_info.get("sweep_dir") or (run.hydra.get("sweep") or {}).get("dir")
    cwd = hydra_info.get("cwd") or (run.hydra.get("runtime") or {}).get("cwd")
    if sweep and "${" not in str(sweep):
        sweep_dir = Path(sweep) if Path(sweep).is_absolute() or not cwd else Path(cwd) / sweep
        try:
            return f"{sweep_dir.name}/{run.path.resolve().relative_to(sweep_dir.resolve()).as_posix()}"
        except ValueError:  # the sweep was moved since: name it by where it is now
            pass
    return f"{run.path.resolve().parent.name}/{run.path.name}"


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
    try:
        summary = json.loads((path / "summary.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path / 'summary.json'} is not valid JSON ({err}); the job was cut off while writing it "
                         f"or the file was edited: re-run the job (gain_exp.reproduce {path}) or remove the run.") from None
    if not isinstance(summary, dict):
        raise ValueError(f"{path / 'summary.json'} holds a {type(summary).__name__}, not a run summary; re-run the "
                         f"job or remove the run.")
    hydra_dir = path / ".hydra"
    listed = summary.get("overrides") or []
    if (hydra_dir / "overrides.yaml").is_file():
        listed = load_yaml(hydra_dir / "overrides.yaml") or []
    config = load_yaml(hydra_dir / "config.yaml") if (hydra_dir / "config.yaml").is_file() else {}
    hydra_file = hydra_dir / "hydra.yaml"  # older runs keep their choices and search path only here
    hydra = (load_yaml(hydra_file) or {}).get("hydra", {}) if hydra_file.is_file() else {}
    return Run(path, summary, _parse_overrides(listed), config, list(listed), hydra)


def build_table(runs: Sequence[Run], metrics: Sequence[str] | None = None,
                rows: Sequence[str] | None = None, digits: int = 3) -> Table:
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


def optuna_notes(paths: Sequence[str | Path]) -> list[str]:
    """The best trial of each Optuna sweep below the paths (its optimization_results.yaml)."""
    notes = []
    for raw in paths:
        if not Path(raw).is_dir():
            continue
        for result in sorted(Path(raw).rglob("optimization_results.yaml")):
            best = load_yaml(result) or {}
            params = ", ".join(f"{k}={v}" for k, v in (best.get("best_params") or {}).items())
            notes.append(f"Optuna best in {result.parent}: {best.get('best_value')} with {params}")
    return notes


def portable(path: str | Path) -> str:
    """``path`` relative to this repository when inside it (so a spec works on any clone), else absolute."""
    resolved = Path(path).resolve()
    try:
        return resolved.relative_to(SOURCE_ROOT).as_posix()
    except ValueError:
        return str(resolved)


def local(text: str | Path) -> Path:
    """A path read from a spec on this machine: relative ones are relative to this repository."""
    path = Path(text).expanduser()
    return path if path.is_absolute() else SOURCE_ROOT / path


def table_spec(table: Table, sources: Sequence[str | Path], command: str | None = None) -> dict[str, Any]:
    """The table as a saved config: sources, rows, metrics, format, each job's recipe and numbers, and its cells."""
    jobs = []
    for row in table.rows:
        for run in row.runs:
            recipe = run.recipe()
            recipe["config_dirs"] = [portable(d) for d in recipe["config_dirs"]]
            recipe["cwd"] = portable(recipe["cwd"]) if recipe["cwd"] else None
            jobs.append({**recipe, "run_dir": portable(run.path), "choices": run.choices,
                         "row": dict(zip(table.row_keys, row.values)),
                         "final": {m: run.metrics.get(m) for m in table.metrics}})
    return {"kind": SPEC_KIND, "command": command, "sources": [portable(s) for s in sources],
            "rows": table.row_keys, "metrics": table.metrics, "format": {"digits": table.digits},
            "jobs": jobs, "records": table.records()}


def write_spec(path: Path, spec: dict[str, Any]) -> None:
    """Write a table spec as YAML, with a header saying how to use it."""
    header = ("# A table as a saved config (gain_exp.table). Re-print it: python -m gain_exp.table --spec <this file>\n"
              "# Re-run every job and compare with the numbers below: python -m gain_exp.reproduce <this file>\n"
              "# Relative paths are relative to the repository root.\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(header + yaml.safe_dump(spec, sort_keys=False, allow_unicode=True, width=120))


def read_spec(path: Path) -> dict[str, Any]:
    """A table spec written by ``write_spec``, checked enough to use."""
    how = f"write one with python -m gain_exp.table <runs> --save-spec {path}"
    if not path.is_file():
        raise FileNotFoundError(f"table spec {path} does not exist; {how}.")
    try:
        spec = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ValueError(f"{path} is not valid YAML ({str(err).splitlines()[0]}); fix it or {how}.") from None
    if not isinstance(spec, dict) or spec.get("kind") != SPEC_KIND or not isinstance(spec.get("jobs"), list) \
            or not spec["jobs"]:
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
        summary = {"status": "completed", "final": job["final"], "choices": job.get("choices") or {},
                   "overrides": job["overrides"], "seed": job.get("seed"), "git": job.get("git"),
                   "threads": job.get("threads")}
        runs.append(Run(local(job.get("run_dir") or job["name"]), summary, _parse_overrides(job["overrides"]),
                        listed=list(job["overrides"]), fixed={k: str(v) for k, v in job["row"].items()}))
    return runs


def table_from_spec(spec: dict[str, Any]) -> tuple[Table, str]:
    """The spec's table from its run directories when all are here, else from its committed numbers; and which."""
    dirs = [local(job["run_dir"]) for job in spec["jobs"] if job.get("run_dir")]
    here = len(dirs) == len(spec["jobs"]) and all((d / "summary.json").is_file() for d in dirs)
    runs = [load_run(d) for d in dirs] if here else spec_runs(spec)
    digits = int((spec.get("format") or {}).get("digits", 3))
    table = build_table(runs, spec.get("metrics"), spec.get("rows") or [], digits)
    return table, ("its run directories" if here else "the numbers it holds")


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
    parser.add_argument("paths", nargs="*", help="multirun directories, run directories or table specs (their "
                                                 "jobs' committed numbers join the runs)")
    parser.add_argument("--metrics", nargs="+", help="columns (default: test-split accuracy and localisation)")
    parser.add_argument("--rows", help="comma-separated row keys (default: the overrides that differ between runs)")
    parser.add_argument("--where", nargs="+", metavar="KEY=VALUE[,VALUE]", help="only the runs whose setting KEY "
                        "(an override, group choice or config key, as --rows) is one of the values")
    parser.add_argument("--csv", type=Path, help="also write the table as CSV (mean, std, n per metric)")
    parser.add_argument("--md", type=Path, help="also write the Markdown table to this file")
    parser.add_argument("--wandb", action="store_true", help="also log the table to W&B (offline without a login)")
    parser.add_argument("--save-spec", type=Path, help="write the table's spec here (default: beside --md/--csv, "
                                                       "as <name>.spec.yaml)")
    parser.add_argument("--spec", type=Path, help="re-print the table of this spec (instead of run directories)")
    parser.add_argument("--digits", type=int, default=3, help="decimals per mean and std")
    parser.add_argument("--plot", type=Path, help="also draw the table as PNG bar charts: a panel per metric, a bar "
                                                  "per row, mean ± std (needs matplotlib: the plot extra)")
    args = parser.parse_args(argv)
    if args.plot is not None and not _can_plot():
        print(f"error: {PLOT_MISSING}", file=sys.stderr)
        return 2
    if args.spec is not None:
        return _print_spec(args)
    try:
        if not args.paths:
            raise ValueError("no runs given; pass multirun or run directories, or --spec <table spec>.")
        runs = completed_runs(args.paths)
        if not runs:
            raise ValueError(f"no completed runs under {', '.join(args.paths)}; finish or re-run them first.")
        if args.where:
            runs = select_runs(runs, args.where)
        table = build_table(runs, args.metrics, args.rows.split(",") if args.rows else None, args.digits)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for note in optuna_notes(args.paths):
        print(f"note: {note}", file=sys.stderr)
    if _emit(table, args):
        return 2
    spec_path = args.save_spec or (_spec_beside(args.md or args.csv) if (args.md or args.csv) else None)
    if spec_path:
        command = shlex.join(["python", "-m", "gain_exp.table", *(sys.argv[1:] if argv is None else argv)])
        write_spec(spec_path, table_spec(table, args.paths, command))
        print(f"note: spec in {spec_path}; re-run and check it with python -m gain_exp.reproduce {spec_path}",
              file=sys.stderr)
    if args.wandb:
        wandb_cfg = (runs[0].config.get("logger") or {}).get("wandb") or {}
        log_to_wandb(table, Path(args.paths[0]), wandb_cfg.get("project"), wandb_cfg.get("entity"))
    return 0


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


def completed_runs(paths: Sequence[str | Path]) -> list[Run]:
    """The completed runs at or below ``paths``, plus the jobs of any table spec among them; the others
    (interrupted, diverged, failed) are named and left out. A spec's job that is also here as a run directory (same
    directory, same overrides) is counted once, from the directory."""
    specs = [Path(p) for p in paths if Path(p).suffix in SPEC_SUFFIXES]
    dirs = [p for p in paths if Path(p).suffix not in SPEC_SUFFIXES]
    runs = _live_runs(dirs) if dirs else []
    here = {_identity(r) for r in runs}
    for spec in specs:
        runs += [r for r in spec_runs(read_spec(spec)) if _identity(r) not in here]
    return runs


def _identity(run: Run) -> tuple[Path, tuple[str, ...]]:
    """What makes a spec's job and a run directory the same job: where it ran and its task overrides."""
    return run.path.resolve(), tuple(run.task_overrides)


def _live_runs(paths: Sequence[str | Path]) -> list[Run]:
    runs = []
    for path in find_runs(paths):
        try:
            run = load_run(path)
        except ValueError as err:  # one broken run dir must not hide a sweep's table
            print(f"note: skipped {path}: {err}", file=sys.stderr)
            continue
        if run.summary.get("status") != "completed":
            print(f"note: skipped {path}: status={run.summary.get('status')}", file=sys.stderr)
            continue
        runs.append(run)
    return runs


def _print_spec(args: argparse.Namespace) -> int:
    """``--spec``: print (and write on request) the table a spec holds."""
    try:
        if args.paths:
            raise ValueError(f"--spec {args.spec} and run directories were both given; pass one of them.")
        table, origin = table_from_spec(read_spec(args.spec))
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"note: table of {args.spec} from {origin}", file=sys.stderr)
    return _emit(table, args)


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
        except ValueError as err:
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
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _spec_beside(output: Path) -> Path:
    """``table.md`` -> ``table.spec.yaml``."""
    return output.with_suffix(".spec.yaml")


def _parse_commit(text: str | None) -> dict[str, Any]:
    """``"sha+dirty"`` (summary.json's git_commit) -> ``{"commit": sha, "dirty": True}``."""
    if not text:
        return {"commit": None, "dirty": None}
    return {"commit": text.removesuffix("+dirty"), "dirty": text.endswith("+dirty")}


def load_yaml(path: Path) -> Any:
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


def _natural(path: Path) -> list[Any]:
    """Sort key that puts job 2 before job 10."""
    return [int(part) if part.isdigit() else part for part in path.parts]


if __name__ == "__main__":
    sys.exit(main())
