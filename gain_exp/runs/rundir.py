"""A run directory as data: its summary, saved job (overrides, config dirs, threads), checkpoint choice.

Everything that reads the run-directory format (summary.json, .hydra/, checkpoints/) lives here, so the format has one
reader; tables, reproduce, evaluate, figure and cams build on it."""

from __future__ import annotations

import json
import os
import re
import sys
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Sequence

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

import gain_exp
from gain_exp.config.paths import SWEEPS_DIR
from gain_exp.tracking.wandb import REPRODUCING
from gain_exp.train.checkpoints import pareto_pick, saved_tracking
from gain_exp.train.provenance import SOURCE_ROOT

# Hydra overrides that only shape a sweep or place its output; a re-run of one job sets its own mode and run dir.
SWEEP_ONLY = (
    "hydra.mode",
    "hydra.run.",
    "hydra.sweep.",
    "hydra.launcher",
    "hydra.sweeper",
    "hydra/launcher",
    "hydra/sweeper",
    "hydra.job.num",
    "hydra.job.id",
)


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

    @cached_property
    def metrics(self) -> dict[str, Any]:
        """summary.json's ``final`` metrics, plus each selection's test metrics as ``<metric>@<selection>``
        (``test_unbiased/acc@last``, ``@best``, ``@pareto``) and each Pareto pick's as ``<metric>@pareto:<val metric>``
        (the front member best in that val metric, e.g. ``test_unbiased/acc@pareto:val/energy_pg``)."""
        final = self.summary.get("final")
        out = dict(final) if isinstance(final, dict) else {}
        selections = self.summary.get("selections")
        for name, chosen in selections.items() if isinstance(selections, dict) else ():
            out |= {f"{k}@{name}": v for k, v in (chosen.get("metrics") or {}).items()}
        front = self.summary.get("pareto")
        if isinstance(front, dict) and front.get("members"):
            for metric, mode in zip(front.get("metrics") or (), front.get("modes") or ()):
                member = pareto_pick(front["members"], metric, mode)
                out |= {f"{k}@pareto:{metric}": v for k, v in (member or {}).get("tests", {}).items()}
        return out

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
            saved_dirs = [
                s["path"]
                for s in runtime.get("config_sources") or []
                if s and s.get("path") and s.get("provider") == "command-line" and s.get("schema") == "file"
            ]
        hydra_overrides = (self.hydra.get("overrides") or {}).get("hydra") or []
        return {
            "name": job_name(self),
            "overrides": self.task_overrides,
            "hydra_overrides": [o for o in hydra_overrides if not o.lstrip("+~").startswith(SWEEP_ONLY)],
            "config_dirs": list(saved_dirs),
            "config_name": hydra_info.get("config_name")
            or (self.hydra.get("job") or {}).get("config_name")
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


def find_runs(paths: Sequence[str | Path]) -> list[Path]:
    """Run directories (holding summary.json) at or below each path, in job order."""
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise FileNotFoundError(
                f"{path} does not exist; pass a multirun directory (outputs/multirun/<date>) "
                f"or run directories written by python -m gain_exp.run."
            )
        runs = (
            [path]
            if (path / "summary.json").is_file()
            else sorted((p.parent for p in path.rglob("summary.json")), key=_natural)
        )
        if not runs:
            raise FileNotFoundError(
                f"{path} holds no runs (no summary.json at or below it); pass a multirun "
                f"directory or run directories written by python -m gain_exp.run."
            )
        found += [r for r in runs if r not in found]
    return found


def read_run(path: Path) -> Run:
    """summary.json plus the .hydra overrides and config a job saved, each checked (``DamagedRun``)."""
    summary = read_summary(path / "summary.json")
    hydra_dir = path / ".hydra"
    listed = summary.get("overrides") or []
    if (hydra_dir / "overrides.yaml").is_file():
        listed = read_yaml(hydra_dir / "overrides.yaml", OVERRIDES_SHAPE)
    config = read_yaml(hydra_dir / "config.yaml", CONFIG_SHAPE) if (hydra_dir / "config.yaml").is_file() else {}
    hydra_file = hydra_dir / "hydra.yaml"  # older runs keep their choices and search path only here
    hydra = (read_yaml(hydra_file, HYDRA_SHAPE).get("hydra") or {}) if hydra_file.is_file() else {}
    return Run(path, summary, _parse_overrides(listed), config, list(listed), hydra)


# ---- the one reader of a run directory's files: what the app writes there, checked as it is read ----


class DamagedRun(ValueError):
    """One sentence: a run directory's file that is not as the app writes it (not JSON / YAML, or a field of another
    type), naming the file, the field and what to do. A ValueError, so every after-run tool prints it as its
    ``error:`` line and exits 2, and ``table`` leaves the run out with a warning."""


REPAIR = "restore the file from a copy of the run, or re-run the job and remove this run directory"
NUMBER = (int, float)
SCALAR = (str, int, float, bool)
METRICS = {"*": NUMBER}  # metric name -> number (null: not computed)
# what the tools read from summary.json, as the app writes it: a type, a mapping ("*": any key), or [element];
# null and absent keys are always allowed (older or interrupted runs lack fields)
SUMMARY_SHAPE: dict[str, Any] = {
    "status": str,
    "error": str,
    "final": METRICS,
    "selections": {"*": {"checkpoint": str, "epoch": NUMBER, "rule": str, "metrics": METRICS}},
    "pareto": {
        "metrics": [str],
        "modes": [str],
        "members": [{"epoch": NUMBER, "checkpoint": str, "val": METRICS, "tests": METRICS}],
    },
    "tested_on": {"checkpoint": str, "epoch": NUMBER, "rule": str},
    "overrides": [str],
    "choices": {"*": SCALAR},
    "hydra": {
        "config_dirs": [str],
        "config_name": str,
        "cwd": str,
        "sweep_dir": str,
        "job_num": NUMBER,
    },
    "threads": NUMBER,
    "seed": NUMBER,
    "git": {"commit": str, "dirty": bool},
    "git_commit": str,
    "tracking": {"wandb": {"run_id": str, "step": NUMBER}},
}
OVERRIDES_SHAPE = [str]  # .hydra/overrides.yaml
CONFIG_SHAPE = {"seed": NUMBER, "logger": {"wandb": {"project": str, "entity": str}}}  # .hydra/config.yaml
HYDRA_SHAPE = {  # .hydra/hydra.yaml
    "hydra": {
        "mode": str,
        "sweep": {"dir": str},
        "runtime": {
            "cwd": str,
            "choices": {"*": SCALAR},
            "config_sources": [{"path": str, "provider": str, "schema": str}],
        },
        "overrides": {"hydra": [str], "task": [str]},
        "job": {"config_name": str},
    }
}
CHECKPOINT_NAME = re.compile(r"[\w-]+")  # tested_on.checkpoint: best, last or a file stem in checkpoints/


def read_summary(path: Path) -> dict[str, Any]:
    """A run's summary.json, checked against ``SUMMARY_SHAPE``; ``DamagedRun`` names what is not as the app wrote it."""
    try:
        text = path.read_text()
        summary = json.loads(text)
    except UnicodeDecodeError:
        raise DamagedRun(f"{path} is not UTF-8 text; {REPAIR}.") from None
    except json.JSONDecodeError as err:
        what = "is empty" if not text.strip() else f"is not valid JSON ({err})"
        raise DamagedRun(
            f"{path} {what}; the job was cut off while writing it or the file was edited: {REPAIR}."
        ) from None
    if not isinstance(summary, dict):
        raise DamagedRun(
            f"{path} holds a JSON {_kind(summary)}, not a run summary (a mapping with status, final, ...); {REPAIR}."
        )
    check_shape(summary, SUMMARY_SHAPE, path)
    name = (summary.get("tested_on") or {}).get("checkpoint")
    if name is not None and not CHECKPOINT_NAME.fullmatch(name):
        raise DamagedRun(
            f"{path}: field tested_on.checkpoint is {json.dumps(name)}, not best, last or the name of a checkpoint "
            f"in the run's checkpoints/ folder (like pareto_epoch_003); {REPAIR}."
        )
    return summary


def read_yaml(path: Path, shape: Any) -> Any:
    """A run's .hydra YAML file (``load_yaml``), checked against ``shape`` (``DamagedRun``)."""
    data = load_yaml(path)
    if data == {} and not path.read_text(errors="replace").strip():
        raise DamagedRun(
            f"{path} is empty; the job was cut off while Hydra wrote it or the file was emptied: {REPAIR}."
        )
    check_shape(data, shape, path, top=True)
    return data


def load_yaml(path: Path) -> Any:
    """A YAML file as plain containers, interpolations left as written; a file that is not YAML (or uses a tag, an
    interpolation Hydra cannot parse) is one sentence (``DamagedRun``)."""
    try:
        return OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    except UnicodeDecodeError:
        raise DamagedRun(f"{path} is not UTF-8 text; {REPAIR}.") from None
    except yaml.YAMLError as err:
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark is not None else "YAML"
        tag = re.search(r"constructor for the tag '([^']*)'", problem)
        what = (
            f"holds the YAML tag {tag.group(1).replace('tag:yaml.org,2002:', '!!')} ({where}), which Hydra never "
            f"writes and nothing here reads"
            if tag
            else f"is not valid YAML ({problem}, {where})"
        )
        raise DamagedRun(f"{path} {what}; {REPAIR}.") from None
    except OmegaConfBaseException as err:
        raise DamagedRun(f"{path} cannot be read as a config ({str(err).splitlines()[0]}); {REPAIR}.") from None


def check_shape(value: Any, shape: Any, path: Path, field: str = "", top: bool = False) -> None:
    """Raise ``DamagedRun`` for the first value in ``value`` that is not of ``shape`` (a type or tuple of types, a
    mapping of known keys or ``"*"``, or a one-element list); null is always allowed below the top."""
    if value is None and not top:
        return
    if isinstance(shape, dict):
        ok = isinstance(value, dict)
    elif isinstance(shape, list):
        ok = isinstance(value, list)
    else:
        types = shape if isinstance(shape, tuple) else (shape,)
        ok = isinstance(value, types) and (bool in types or not isinstance(value, bool))  # JSON true is no number
    if not ok:
        shown = json.dumps(value, default=str)
        shown = f" ({shown})" if len(shown) <= 60 and not isinstance(value, (dict, list)) else ""
        what = f"{path}" if top else f"{path}: {field if field.startswith('item') else 'field ' + field}"
        raise DamagedRun(f"{what} is a {_kind(value)}{shown}, not {_expected(shape)}; {REPAIR}.")
    if isinstance(shape, list):
        for i, item in enumerate(value):
            check_shape(item, shape[0], path, f"{field}[{i}]" if field else f"item [{i}]")
    elif isinstance(shape, dict):
        for key, item in value.items():
            sub = shape.get(key, shape.get("*"))
            if sub is not None:
                name = f"{field}[{key!r}]" if "*" in shape else (f"{field}.{key}" if field else str(key))
                check_shape(item, sub, path, name)


def _kind(value: Any) -> str:
    """A JSON / YAML value's kind in words: string, number, list, mapping, ..."""
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    return {str: "string", list: "list", dict: "mapping", type(None): "null"}.get(type(value), type(value).__name__)


def _expected(shape: Any) -> str:
    """What ``shape`` asks for, in words."""
    if isinstance(shape, dict):
        return "a mapping of metric names to numbers" if shape is METRICS else "a mapping"
    if isinstance(shape, list):
        return "a list of strings" if shape[0] is str else "a list of mappings"
    return {str: "a string", bool: "true or false", NUMBER: "a number", SCALAR: "a string or number"}[shape]


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


def _parse_commit(text: str | None) -> dict[str, Any]:
    """``"sha+dirty"`` (summary.json's git_commit) -> ``{"commit": sha, "dirty": True}``."""
    if not text:
        return {"commit": None, "dirty": None}
    return {"commit": text.removesuffix("+dirty"), "dirty": text.endswith("+dirty")}


def _parse_overrides(items: Sequence[str]) -> dict[str, str]:
    """``["+setting=gain", "seed=1"]`` -> ``{"setting": "gain", "seed": "1"}`` (deletions ``~key`` dropped)."""
    parsed = {}
    for item in items:
        if "=" not in item or item.startswith("~"):
            continue
        key, value = item.split("=", 1)
        parsed[key.lstrip("+")] = value
    return parsed


def _natural(path: Path) -> list[Any]:
    """Sort key that puts job 2 before job 10."""
    return [int(part) if part.isdigit() else part for part in path.parts]


PATH_KEYS = ("root", "dir", "path", "file", "resume", "checkpoint", "weights_file")


SAFE_VALUE = re.compile(r"[\w./@:+-]+")  # what Hydra's override grammar takes unquoted


def package_root() -> Path:
    """The checkout (or install) this module runs from: its conf/ and sweeps/ are what jobs compose."""
    return Path(gain_exp.__file__).resolve().parent.parent


def sweeps_dir() -> Path:
    """The package's own sweep recipes, used when a job's saved --config-dir no longer exists: the checkout's
    sweeps/, or the copy a wheel ships inside the package (config.paths)."""
    return SWEEPS_DIR


def config_dir(saved: str) -> Path:
    """A job's saved ``--config-dir`` here, or the package's sweeps/ when that is gone (moved, another clone)."""
    path = local(saved)
    return path if path.is_dir() else sweeps_dir()


@dataclass
class Job:
    """One saved job: everything needed to run it again."""

    name: str  # destination below the output root: <run dir name> or <sweep dir name>/<job subdir>
    overrides: list[str]  # Hydra task overrides, as saved
    hydra_overrides: list[str] = field(default_factory=list)  # hydra.* overrides that shape composition
    config_dirs: list[str] = field(default_factory=list)
    config_name: str = "config"
    cwd: str | None = None  # where the job was launched: relative paths in overrides are relative to it
    threads: int | None = None  # torch threads: results are bit-identical only at a fixed count
    git: dict[str, Any] = field(default_factory=dict)
    seed: int | None = None

    @classmethod
    def from_recipe(cls, recipe: dict[str, Any]) -> Job:
        """A job from ``Run.recipe()`` or a spec's job entry (extra keys ignored)."""
        keys = cls.__dataclass_fields__
        job = cls(**{k: v for k, v in recipe.items() if k in keys and v is not None})
        job.threads = int(job.threads) if job.threads else None
        name = Path(str(job.name))
        if not str(job.name).strip() or name.is_absolute() or ".." in name.parts:
            # the name is where the job's results go below --out: a shared spec must not write elsewhere
            raise ValueError(
                f"job name {job.name!r} is not a folder below the output root (absolute, empty or with '..'); "
                f"a job name is relative, like <sweep dir>/<job number>: fix the spec or run directory it came from."
            )
        return job

    def app_args(self, extra_overrides: Sequence[str] = ()) -> list[str]:
        """The app's command line for this job: config dir and name, saved overrides, then ``extra_overrides``."""
        argv: list[str] = []
        if len(self.config_dirs) > 1:
            raise ValueError(
                f"job {self.name} saved {len(self.config_dirs)} config dirs but Hydra takes one "
                f"--config-dir; pass the extra ones as hydra.searchpath overrides."
            )
        argv += [arg for d in self.config_dirs for arg in ("--config-dir", str(config_dir(d)))]
        if self.config_name != "config":
            argv += ["--config-name", self.config_name]
        cwd = local(self.cwd) if self.cwd else None
        argv += replayed(self.overrides, cwd)
        # hydra.mode=RUN: a job of a +launcher=... or +sweep=... recipe would otherwise start a sweep of one job
        return [*argv, *self.hydra_overrides, *extra_overrides, "hydra.mode=RUN"]

    def command(
        self, dest: str | os.PathLike, extra_overrides: Sequence[str] = (), label: str | None = None
    ) -> tuple[list[str], dict[str, str]]:
        """(argv, environment) that run this job again with its results in ``dest``; ``label``: the reproduction's
        name, which puts the re-run's W&B run in the group reproduce/<label>."""
        argv = [
            sys.executable,
            "-m",
            "gain_exp.run",
            *self.app_args(extra_overrides),
            f"hydra.run.dir={_quote(str(Path(dest).resolve()))}",
        ]
        env = dict(os.environ)
        # run the code of this checkout, not whichever gain_exp the interpreter would find from the caller's cwd
        paths = [str(package_root()), *(env.get("PYTHONPATH") or "").split(os.pathsep)]
        env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(p for p in paths if p))
        if self.threads:
            env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(self.threads)
        if label:
            env[REPRODUCING] = label
        return argv, env


def saved_job(run_dir: str | os.PathLike) -> Job:
    """The job a run directory (summary.json and/or .hydra/) saved."""
    return Job.from_recipe(saved_run(run_dir).recipe())


def saved_run(run_dir: str | os.PathLike) -> Run:
    """A run directory as its saved job sees it: ``read_run`` when it has summary.json, else what Hydra's own
    .hydra/hydra.yaml records (a run that died before summary.json)."""
    path = Path(run_dir)
    if (path / "summary.json").is_file():
        return read_run(path)
    hydra_file = path / ".hydra" / "hydra.yaml"
    if not hydra_file.is_file():
        raise FileNotFoundError(
            f"{path} holds neither summary.json nor .hydra/hydra.yaml; pass a run directory "
            f"written by python -m gain_exp.run."
        )
    hydra = read_yaml(hydra_file, HYDRA_SHAPE).get("hydra") or {}
    task = (hydra.get("overrides") or {}).get("task")
    if task is None:
        raise DamagedRun(
            f"{hydra_file}: field hydra.overrides.task is missing, and the run has no summary.json either, so "
            f"its job is not known; {REPAIR}."
        )
    return Run(path, {}, _parse_overrides(task), listed=list(task), hydra=hydra)


def job_command(
    run_dir: str | os.PathLike, out_dir: str | os.PathLike, extra_overrides: Sequence[str] = ()
) -> tuple[list[str], dict[str, str]]:
    """(argv, environment) that re-run the job saved in ``run_dir`` with its results in ``out_dir``."""
    return saved_job(run_dir).command(out_dir, extra_overrides)


# overrides whose meaning changed: trainer.scheduler was cosine | none before it became a _target_ node
LEGACY_OVERRIDES: dict[str, str | None] = {
    "trainer.scheduler=none": "trainer.scheduler=null",
    "trainer.scheduler=cosine": None,
}


def replayed(overrides: Sequence[str], cwd: Path | None) -> list[str]:
    """A saved job's overrides as they compose today: legacy ones translated, relative paths made absolute."""
    translated = (
        LEGACY_OVERRIDES.get(item.lstrip("+"), item) if item.lstrip("+") in LEGACY_OVERRIDES else item
        for item in overrides
    )
    return [resolve_override(item, cwd) for item in translated if item is not None]


def resolve_override(item: str, cwd: Path | None) -> str:
    """``key=relative/path`` -> ``key=<cwd>/relative/path``, so the job reads the same files from any directory."""
    if cwd is None or "=" not in item or item.startswith("~"):
        return item
    key, value = item.split("=", 1)
    name = key.lstrip("+")
    if "." not in name or name.startswith("hydra"):  # group choices (loss=gain) and Hydra's own keys
        return item
    if not SAFE_VALUE.fullmatch(value) or value.startswith(("/", "~")) or ":" in value:
        return item
    last = name.rsplit(".", 1)[-1]
    pathlike = "/" in value or ((last in PATH_KEYS or last.endswith(PATH_KEYS)) and (cwd / value).exists())
    return f"{key}={_quote(str(cwd / value))}" if pathlike else item


def _quote(value: str) -> str:
    """A value as Hydra's override grammar reads it back unchanged."""
    return value if SAFE_VALUE.fullmatch(value) else "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def tested_checkpoint(run_dir: Path) -> Path:
    """The checkpoint the run's test splits were scored with (summary.json ``tested_on``: best, last or a Pareto
    member's file in checkpoints/); ``best`` for a run that does not say."""
    name = (saved_summary(run_dir).get("tested_on") or {}).get("checkpoint")
    if name in (None, "best", "last"):
        return checkpoint_file(run_dir, name or "best")
    path = run_dir / "checkpoints" / f"{name}.ckpt"
    if not path.is_file():
        raise FileNotFoundError(
            f"{run_dir / 'summary.json'}: field tested_on.checkpoint names {name}, but {path} does not exist "
            f"(removed or never copied); pass --checkpoint best, last or another .ckpt file of the run."
        )
    return path


def saved_summary(run_dir: Path) -> dict[str, Any]:
    """The run's summary.json, checked (``read_summary``); empty for a run that wrote none (it died before)."""
    path = run_dir / "summary.json"
    return read_summary(path) if path.is_file() else {}


def diverged(run_dir: Path) -> str | None:
    """Why the run diverged (summary.json's error) when its status is ``diverged``, else None."""
    summary = saved_summary(run_dir)
    if summary.get("status") != "diverged":
        return None
    return str(summary.get("error") or "the training loss or weights became non-finite")


def checkpoint_file(run_dir: Path, which: str) -> Path:
    """The weights ``which`` names: best (last when the run kept no best), last, or a checkpoint file."""
    ckpts = run_dir / "checkpoints"
    if which in ("best", "last"):
        path = ckpts / f"{which}.ckpt"
        if which == "best" and not path.is_file():
            path = ckpts / "last.ckpt"  # a run whose monitor never had a value keeps only last.ckpt
        if not path.is_file():
            raise FileNotFoundError(
                f"{run_dir} has no checkpoints/{which}.ckpt; the run saved none yet (it stopped "
                f"before its first epoch ended), or pass --checkpoint with a file."
            )
        return path
    path = Path(which)
    if not path.is_file():
        raise FileNotFoundError(f"--checkpoint {which}: no checkpoint there; use best, last or a .ckpt file.")
    return path


def wandb_state(run_dir: Path) -> dict[str, Any]:
    """The run's W&B state (run id, last step and epoch): summary.json's, else its last checkpoint's."""
    summary = saved_summary(run_dir)
    saved = summary.get("tracking") or {}
    if not saved.get("wandb") and (run_dir / "checkpoints" / "last.ckpt").is_file():
        saved = saved_tracking(run_dir, run_dir) or {}
    return saved.get("wandb") or {}


def run_threads(run_dir: Path) -> int | None:
    """The torch CPU thread count the run trained with (summary.json ``threads``), if saved."""
    summary = saved_summary(run_dir)
    threads = summary.get("threads")
    return int(threads) if threads else None
