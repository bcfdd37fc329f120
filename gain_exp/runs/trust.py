"""Trust boundaries of files that come from someone else: a run directory or a table spec is checked before anything
is composed from it.

A colleague's sweep, a paper's committed spec or a W&B download holds Hydra overrides, and Hydra turns some of them
into code: a ``_target_`` names any callable, ``hydra.callbacks`` run around the job, ``hydra.job.env_set`` sets the
job's environment, a launcher is a plugin, a config dir or a ``..`` group option reads YAML from anywhere. Before
reproduce, evaluate, cams, figure or ``run --config-path <run>/.hydra`` compose a saved job, every saved override and
config value is checked here; the first one that could run something the project does not ship is refused with one
sentence naming the file, the override or key, and ``--trust`` (which says "I trust this source" and skips the check).

What is allowed without ``--trust``: a ``_target_`` that the project's own config tree (conf/ and the sweep recipes
in sweeps/) uses, or one of the allow-list below; config dirs inside the project's conf/ or sweeps/, or inside the
saved run (their YAML checked the same way). The docs page is docs/trust.md.
"""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Sequence

import yaml

from gain_exp.config.paths import CONF_DIR, SWEEPS_DIR
from gain_exp.runs.rundir import Job, Run, config_dir, load_yaml, saved_run

TRUST_FLAG = "--trust"
TRUST_HELP = "trust the run directory or spec: compose its saved overrides even if they name code (docs/trust.md)"
# modules whose public classes (torch) or functions (the project's schedules) any saved _target_ may name
ALLOWED_MODULES = ("torch.optim", "torch.optim.lr_scheduler", "gain_exp.train.schedules")
# hydra keys (and their children) that run code or change the job's environment whatever their value
REFUSED_KEYS = {
    "hydra.callbacks": "sets hydra.callbacks, which run code around the job",
    "hydra.job.env_set": "sets hydra.job.env_set, the job's environment variables",
    "hydra.job_logging": "configures Hydra's logging (hydra.job_logging), whose handlers can name any callable",
    "hydra.hydra_logging": "configures Hydra's logging (hydra.hydra_logging), whose handlers can name any callable",
}
REFUSED_GROUPS = {
    "hydra/launcher": "chooses a Hydra launcher (hydra/launcher), a plugin that runs the job",
    "hydra/sweeper": "chooses a Hydra sweeper (hydra/sweeper), a plugin that runs the jobs",
    "hydra/callbacks": "chooses hydra/callbacks, which run code around the job",
}
_TARGET_IN_TEXT = re.compile(r"""_target_['"]?\s*[:=]\s*['"]?([^\s,'"}\]]*)""")
_OVERRIDE_TEXT = 100  # characters of an override quoted in a refusal


class Untrusted(ValueError):
    """One sentence: the file, the override or key, and the --trust flag. A ValueError, so every command prints it
    as its usual ``error:`` line and exits 2."""


def refusal(where: str, what: str, why: str) -> Untrusted:
    return Untrusted(
        f"{where}: {what} {why}; nothing was composed or run, pass {TRUST_FLAG} if you trust this source "
        f"(docs/trust.md)."
    )


# ---- which _target_ names are the project's ----


@lru_cache(maxsize=1)
def project_targets() -> frozenset[str]:
    """Every ``_target_`` the project's own config tree names: conf/**/*.yaml and the sweep recipes (not the table
    specs under sweeps/tables, which hold overrides, not config)."""
    files = [*CONF_DIR.rglob("*.yaml"), *(p for p in SWEEPS_DIR.rglob("*.yaml") if "tables" not in p.parts)]
    found: set[str] = set()
    for path in files:
        try:
            docs = list(yaml.safe_load_all(path.read_text()))
        except (OSError, yaml.YAMLError):
            continue
        for doc in docs:
            found |= {value for key, value in _items(doc) if key == "_target_" and isinstance(value, str)}
    return frozenset(found)


def allowed_target(name: Any) -> bool:
    """True for a project target or a public optimizer / LR scheduler class of torch / a schedule of the project's
    ``gain_exp.train.schedules``. Checked by name against what those modules define (torch and the project are
    already imported; the named callable is not called)."""
    if not isinstance(name, str):
        return False
    if name in project_targets():
        return True
    module, _, attr = name.rpartition(".")
    if module not in ALLOWED_MODULES or not attr.isidentifier() or attr.startswith("_"):
        return False
    import torch.optim
    import torch.optim.lr_scheduler as schedulers

    if module == "torch.optim":
        obj = getattr(torch.optim, attr, None)
        return isinstance(obj, type) and issubclass(obj, torch.optim.Optimizer)
    if module == "torch.optim.lr_scheduler":
        obj = getattr(schedulers, attr, None)
        bases = (schedulers.LRScheduler, schedulers.ReduceLROnPlateau)
        return isinstance(obj, type) and issubclass(obj, bases)
    from gain_exp.train import schedules

    obj = getattr(schedules, attr, None)
    return callable(obj) and getattr(obj, "__module__", None) == schedules.__name__


# ---- overrides ----


@lru_cache(maxsize=1)
def _parser() -> Any:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create()


def check_overrides(overrides: Iterable[Any], where: str, roots: Sequence[Path] = ()) -> None:
    """Raise ``Untrusted`` for the first override that names a callable outside the project's, sets a refused hydra
    key, chooses a launcher / sweeper, reads config from outside the allowed dirs or writes Hydra's files elsewhere.
    ``roots``: folders besides conf/ and sweeps/ whose config may be read (the saved run)."""
    for item in overrides:
        text = str(item)
        try:
            parsed = _parser().parse_override(text)
        except Exception:  # noqa: BLE001 - Hydra refuses it too before composing; still read what it names
            parsed = None
        if parsed is None:
            key, _, value = text.lstrip("+~").partition("=")
            _check_override(text, key, None, value, where, roots)
        elif not parsed.is_delete():
            _check_override(text, parsed.key_or_group, parsed.package, parsed.value(), where, roots)


def _check_override(text: str, key: str, package: str | None, value: Any, where: str, roots: Sequence[Path]) -> None:
    shown = f"override {_clip(text)!r}"
    keys = [key, *([package] if package else [])]
    for name in keys:
        dotted = name.replace("/", ".")
        for refused, why in REFUSED_KEYS.items():
            if "/" not in name and (dotted == refused or dotted.startswith(refused + ".")):
                raise refusal(where, shown, why)
        if name in REFUSED_GROUPS:
            raise refusal(where, shown, REFUSED_GROUPS[name])
        if "_target_" in re.split(r"[./@]", name):
            if not isinstance(value, str) or not allowed_target(value):
                raise refusal(where, shown, _target_why(value))
        if dotted == "hydra.searchpath" or dotted.startswith("hydra.searchpath."):
            for entry in _strings(value):
                if not _searchable(entry, roots):
                    raise refusal(where, shown, f"adds {entry} to Hydra's config search path, {_OUTSIDE}")
        if dotted == "hydra.output_subdir":
            for entry in _strings(value):
                if _escapes(entry):
                    raise refusal(where, shown, "writes Hydra's .hydra files outside the job's run directory")
    for k, v in _items(value):
        if k == "_target_" and not allowed_target(v):
            raise refusal(where, shown, _target_why(v))
    group = "." not in key or "/" in key  # dataset=shapes, +launcher=joblib, hydra/job_logging=disabled
    for entry in _strings(value):
        if group and _escapes(entry):
            raise refusal(where, shown, "reads a config file outside the config tree ('..' or an absolute path)")
        for target in _targets_in_text(entry):
            if not allowed_target(target):
                raise refusal(where, shown, _target_why(target))


# ---- saved config values, config dirs ----


def check_values(node: Any, where: str) -> None:
    """Raise ``Untrusted`` for a ``_target_`` anywhere in a saved config (summary.json, .hydra/config.yaml) that is
    neither the project's nor on the allow-list."""
    for key, value, path in _items(node, with_path=True):
        if key == "_target_" and not allowed_target(value):
            raise refusal(where, f"key {path!r}", _target_why(value))


_OUTSIDE = "outside the project's conf/ and sweeps/ and outside the saved run"


def check_config_dirs(dirs: Iterable[str], where: str, roots: Sequence[Path] = ()) -> None:
    """Each saved ``--config-dir`` (as the job will use it: a dir that is gone falls back to the package's sweeps/)
    must lie in conf/ or sweeps/, or in one of ``roots``, whose YAML files are then checked like overrides."""
    for saved in dirs:
        used = config_dir(str(saved)).resolve()
        if _inside(used, _project_dirs()):
            continue
        if not _inside(used, roots):
            raise refusal(where, f"config dir {saved}", f"is {_OUTSIDE}")
        for path in sorted(used.rglob("*.yaml")):
            if path.relative_to(used).parts[0] == "hydra":  # hydra/launcher/x.yaml, hydra/job_logging/x.yaml, ...
                raise refusal(str(path), f"config dir {saved}", "holds Hydra's own config (a hydra/ group)")
            check_yaml(path)


def check_yaml(path: Path) -> None:
    """A config file from a saved run's own config dir: no foreign ``_target_``, no refused hydra key or group."""
    try:
        docs = list(yaml.safe_load_all(path.read_text()))
    except (OSError, yaml.YAMLError):
        return  # Hydra cannot compose it either
    header = re.search(r"^#\s*@package\s+(\S+)", path.read_text(errors="replace"), re.MULTILINE)
    if header and header.group(1).split(".")[0] == "hydra":
        raise refusal(str(path), f"package header {header.group(0)!r}", "places the file in Hydra's own config")
    for doc in docs:
        check_values(doc, str(path))
        for _key, value, where in _items(doc, with_path=True):
            for refused, why in REFUSED_KEYS.items():
                if where == refused or where.startswith(refused + "."):
                    raise refusal(str(path), f"key {where!r}", why)
            for target in _targets_in_text(value) if isinstance(value, str) else ():
                if not allowed_target(target):
                    raise refusal(str(path), f"key {where!r}", _target_why(target))
        defaults = doc.get("defaults") if isinstance(doc, dict) else None
        for entry in defaults if isinstance(defaults, list) else ():
            pairs = entry.items() if isinstance(entry, dict) else [(entry, "")]
            for k, v in pairs:
                for group, why in REFUSED_GROUPS.items():
                    if group in str(k):
                        raise refusal(str(path), f"defaults entry {_clip(str(entry))!r}", why)
                if isinstance(v, str) and _escapes(v):
                    raise refusal(
                        str(path),
                        f"defaults entry {_clip(str(entry))!r}",
                        "reads a config file outside the config tree ('..' or an absolute path)",
                    )


def check_config_name(name: Any, where: str) -> None:
    if name is not None and _escapes(str(name)):
        raise refusal(where, f"config name {name!r}", "reads a config file outside the config tree")


# ---- what the commands call ----


def check_job(job: Job, where: str, roots: Sequence[Path] = ()) -> None:
    """A job as a spec saved it: task and hydra overrides, config dirs, config name."""
    place = f"{where} (job {job.name})"
    check_overrides(job.overrides, place, roots)
    check_overrides(job.hydra_overrides, place, roots)
    check_config_dirs(job.config_dirs, place, roots)
    check_config_name(job.config_name, place)


def check_spec(spec: dict[str, Any], path: Path) -> None:
    """Every job of a table spec (before ``Job.from_recipe``, so a bad entry is named by the spec)."""
    for entry in spec.get("jobs") or []:
        name = entry.get("name") if isinstance(entry, dict) else None
        place = f"{path} (job {name})"
        for field in ("overrides", "hydra_overrides"):
            check_overrides(_as_list(entry.get(field)), place)
        check_config_dirs([str(d) for d in _as_list(entry.get("config_dirs"))], place)
        check_config_name(entry.get("config_name"), place)


def check_run(run: Run, roots: Sequence[Path] = ()) -> None:
    """A run directory's saved job and config: summary.json (its overrides, config dirs and any ``_target_``),
    .hydra/overrides.yaml, .hydra/hydra.yaml (the hydra overrides a re-run replays) and .hydra/config.yaml."""
    roots = [*roots, run.path]
    summary_file, hydra_dir = run.path / "summary.json", run.path / ".hydra"
    recipe = run.recipe()
    check_overrides(_as_list(run.summary.get("overrides")), str(summary_file), roots)
    listed_file = hydra_dir / "overrides.yaml"
    check_overrides(run.listed, str(listed_file if listed_file.is_file() else summary_file), roots)
    check_overrides(recipe["hydra_overrides"], str(hydra_dir / "hydra.yaml"), roots)
    saved_dirs = (run.summary.get("hydra") or {}).get("config_dirs") is not None
    check_config_dirs(recipe["config_dirs"], str(summary_file if saved_dirs else hydra_dir / "hydra.yaml"), roots)
    check_config_name(recipe["config_name"], str(summary_file))
    check_values(run.summary, str(summary_file))
    config = run.config or (load_yaml(hydra_dir / "config.yaml") if (hydra_dir / "config.yaml").is_file() else {})
    check_values(config, str(hydra_dir / "config.yaml"))


def check_run_dir(run_dir: str | Path) -> None:
    """``check_run`` on the job a run directory saved (summary.json and/or .hydra/), as ``saved_job`` reads it."""
    check_run(saved_run(run_dir), [Path(run_dir).resolve()])


# ---- helpers ----


def _target_why(target: Any) -> str:
    allowed = ", ".join(f"{m}.*" for m in ALLOWED_MODULES)
    return (
        f"names _target_ {target}, a callable that neither the project's config tree (conf/) uses nor the "
        f"allow-list ({allowed}) holds"
    )


def _items(node: Any, with_path: bool = False, prefix: str = "") -> Iterable[Any]:
    """(key, value) of every mapping entry at any depth of ``node`` (lists and hydra sweeps included); with
    ``with_path``: (key, value, dotted path)."""
    if isinstance(node, dict):
        for key, value in node.items():
            path = f"{prefix}.{key}" if prefix else str(key)
            yield (key, value, path) if with_path else (key, value)
            yield from _items(value, with_path, path)
    elif hasattr(node, "list") and isinstance(node.list, list):  # hydra's ChoiceSweep
        yield from _items(node.list, with_path, prefix)
    elif isinstance(node, (list, tuple)):
        for i, value in enumerate(node):
            yield from _items(value, with_path, f"{prefix}[{i}]")


def _strings(node: Any) -> Iterable[str]:
    """Every string value in an override value (dicts' values, lists, sweeps; a dict key is a plain name)."""
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for value in node.values():
            yield from _strings(value)
    elif hasattr(node, "list") and isinstance(node.list, list):
        yield from _strings(node.list)
    elif isinstance(node, (list, tuple)):
        for value in node:
            yield from _strings(value)


def _targets_in_text(text: str) -> list[str]:
    """The names after ``_target_:`` / ``_target_=`` in a string (e.g. inside ``${oc.create:...}``); a string that
    mentions ``_target_`` without a readable name yields itself, which no allow-list holds."""
    if "_target_" not in text:
        return []
    return [m for m in _TARGET_IN_TEXT.findall(text) if m] or [text]


def _escapes(text: str) -> bool:
    return text.startswith(("/", "~", "\\")) or ".." in re.split(r"[/\\]", text)


def _searchable(entry: str, roots: Sequence[Path]) -> bool:
    scheme, sep, rest = entry.partition("://")
    if sep and scheme != "file":
        return False  # pkg:// imports a package
    path = Path(rest if sep else entry).expanduser()
    if path.is_absolute() and not path.exists():
        return True  # another machine's path (a colleague's clone): nothing there to read
    return path.is_absolute() and _inside(path.resolve(), [*_project_dirs(), *roots])


def _project_dirs() -> list[Path]:
    return [CONF_DIR.resolve(), SWEEPS_DIR.resolve()]


def _inside(path: Path, roots: Iterable[Path]) -> bool:
    return any(path == root.resolve() or path.is_relative_to(root.resolve()) for root in roots)


def _as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, (list, tuple)) else ([] if value is None else [value])


def _clip(text: str) -> str:
    return text if len(text) <= _OVERRIDE_TEXT else text[: _OVERRIDE_TEXT - 3] + "..."
