"""One sentence (what, where, how to fix) for the config mistakes Hydra reports at composition, instead of its
multi-line ``Error merging override`` text with OmegaConf's details."""

from __future__ import annotations

import difflib
import re
import typing
from typing import Any

from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException
from omegaconf import Container, Node
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException, ValidationError

# OmegaConf value node class -> (what a value must be, the type's short name)
_EXPECTED = {
    "IntegerNode": ("an integer", "int"),
    "FloatNode": ("a number", "float"),
    "BooleanNode": ("true or false", "bool"),
    "StringNode": ("a string", "str"),
    "BytesNode": ("bytes", "bytes"),
    "PathNode": ("a path", "path"),
}
GRAMMAR = "https://hydra.cc/docs/advanced/override_grammar/basic/"
# (Hydra group, option) -> the plugin package that provides it: the ``sweeps`` extra of pyproject.toml
PLUGINS = {
    ("hydra/launcher", "joblib"): "hydra-joblib-launcher",
    ("hydra/launcher", "submitit_local"): "hydra-submitit-launcher",
    ("hydra/launcher", "submitit_slurm"): "hydra-submitit-launcher",
    ("hydra/sweeper", "optuna"): "hydra-optuna-sweeper",
}


def explain(err: BaseException) -> str | None:
    """The one-sentence explanation of a Hydra composition or override error; None when ``err`` is not one."""
    if isinstance(err, OverrideParseException):
        return _parse_error(err)
    if isinstance(err, MissingConfigException):
        return _missing_option(err)
    if isinstance(err, ConfigCompositionException):
        cause = err.__cause__
        if isinstance(cause, ValidationError):
            return _wrong_type(str(err), cause)
        if isinstance(cause, (ConfigAttributeError, ConfigKeyError)):
            return _unknown_key(str(err), cause)
        return _one_line(str(err) if cause is None else f"{err}: {_first_line(str(cause))}")
    return None


def _parse_error(err: OverrideParseException) -> str:
    """A malformed override: what the parser saw, and the forms that work."""
    lines = [
        line
        for line in err.message.splitlines()
        if line.strip() and not line.startswith(("Error parsing override", "See https"))
    ]
    reason = _first_line(lines[0]) if lines else "unparsable"
    return (
        f"{err.override}: not a valid override ({reason}); write key=value, group=option, +key=value (new key) or "
        f"~key (delete), and quote values with spaces or special characters ({GRAMMAR})."
    )


def _missing_option(err: MissingConfigException) -> str:
    """An unknown group option: the options there are, and the closest."""
    missing, options = err.missing_cfg_file or "", list(err.options or [])
    if "/" not in missing or not options:
        return _one_line(str(err))
    group, name = missing.rsplit("/", 1)
    plugin = PLUGINS.get((group, name))
    if plugin is not None:  # a recipe naming a Hydra plugin that is not installed
        return (
            f"{group}={name} needs the Hydra plugin {plugin}, which is not installed; install the sweep extras with "
            f"pip install 'gain-exp[sweeps]' (or pip install {plugin})."
        )
    hint = _did_you_mean(name, options)
    return f"{group}={name}: group {group} has no option '{name}'{hint}; choose one of {', '.join(options)}."


def _wrong_type(message: str, cause: ValidationError) -> str:
    """A value of the wrong type for a typed key: what it must be and an example of a good value."""
    where = _override_in(message) or cause.full_key
    node = cause.child_node
    expected = _EXPECTED.get(type(node).__name__) if node is not None else None
    if expected is None and node is not None and type(node).__name__ == "UnionNode":
        names = [t.__name__ for t in typing.get_args(node._metadata.ref_type) if t is not type(None)]
        expected = (" or ".join(("an " if n[0] in "aeiou" else "a ") + n for n in names), " | ".join(names))
    if expected is None:
        return f"{where}: {_first_line(cause.msg)}."
    what, type_name = expected
    if node is not None and node._is_optional():
        what, type_name = f"{what} or null", f"{type_name} | null"
    example = _example(cause.full_key, node)
    return f"{where}: {_show(cause.value)} is not {what} ({cause.full_key} is {type_name}){example}."


def _unknown_key(message: str, cause: OmegaConfBaseException) -> str:
    """A key the config does not have: close matches, and ``+key=`` for keys that are meant to be new."""
    override = _override_in(message) or cause.full_key
    parent = cause.parent_node
    prefix = parent._get_full_key(None) if isinstance(parent, Container) else ""
    keys = [str(k) for k in parent.keys()] if hasattr(parent, "keys") else []
    close = difflib.get_close_matches(str(cause.key), keys, n=3, cutoff=0.6)
    owner = prefix or "the config"
    hint = f" (did you mean {', '.join(f'{prefix}.{k}' if prefix else k for k in close)}?)" if close else ""
    return (
        f"{override}: {owner} has no key '{cause.key}'{hint}; fix the name, or write +{override.lstrip('+')} "
        f"to add a new key."
    )


def _override_in(message: str) -> str | None:
    """The override a Hydra composition message is about, e.g. ``trainer.epochs=two``."""
    found = re.search(r"Error merging override (\S+)", message) or re.search(r"use \+(\S+)", message)
    return found.group(1) if found else None


def _example(full_key: str, node: Node | None) -> str:
    """``; e.g. key=<current value>`` from the value the key holds now (the default unless overridden before)."""
    if node is None or node._is_missing() or node._is_interpolation():
        return ""
    value = node._value()
    return "" if value is None else f"; e.g. {full_key}={_show(value, quote=False)}"


def _show(value: Any, quote: bool = True) -> str:
    """A value as a user writes it on the command line (true/null, lists in brackets)."""
    if isinstance(value, bool):
        return str(value).lower()
    if value is None:
        return "null"
    if isinstance(value, str):
        return repr(value) if quote else value
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_show(v, quote) for v in value) + "]"
    return str(value)


def _did_you_mean(name: str, options: list[str]) -> str:
    close = difflib.get_close_matches(name, options, n=3, cutoff=0.5)
    return f" (did you mean {' or '.join(close)}?)" if close else ""


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0].rstrip(".") if text.strip() else ""


def _one_line(text: str) -> str:
    """Hydra's multi-line message as one sentence (Hydra's own hint about HYDRA_FULL_ERROR dropped)."""
    lines = [line.strip() for line in text.splitlines() if line.strip() and "HYDRA_FULL_ERROR" not in line]
    sentence = " ".join(line if line.endswith((".", ":", "?")) else line + ";" for line in lines).rstrip(";")
    return sentence if sentence.endswith((".", "?")) else sentence + "."
