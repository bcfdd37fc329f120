"""The folder tree is the architecture: each package imports only the layers below it, and nothing forms a cycle.

The rule is stated in the README's Layout section; this test reads every ``import`` in gain_exp/ (top level and
inside functions) with ``ast``, so a shortcut that breaks it fails here, not in a review.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "gain_exp"
COMMANDS = ("run", "evaluate", "cams", "figure", "table", "reproduce", "bench")
PUBLIC_ALIASES = ("gain", "losses")  # from gain_exp.gain import GAIN, from gain_exp.losses import GAINLoss
# layer -> the layers it may import (besides itself); the package root (gain_exp/__init__) registers schemas + models
ALLOWED: dict[str, set[str]] = {
    "cli": {"commands", "runs", "train", "tracking", "config", "core", "data", "output"},
    "commands": {"runs", "train", "tracking", "config", "core", "data", "output", "root"},
    "aliases": {"core"},
    "runs": {"train", "tracking", "config", "core", "data", "output", "root"},
    "train": {"tracking", "config", "core", "data", "output", "root"},
    "tracking": {"core", "output"},
    "config": {"core", "data", "output"},
    "core": {"data", "output"},  # output: reading saved tensors safely (output.files)
    "data": {"output"},
    "output": set(),
    "root": {"config", "core"},
}


def layer(module: str) -> str:
    """gain_exp.train.engine -> train; gain_exp.run -> commands; gain_exp -> root."""
    parts = module.split(".")
    if len(parts) == 1:
        return "root"
    head = parts[1]
    if head == "cli":
        return "cli"
    if head in COMMANDS:
        return "commands"
    if head in PUBLIC_ALIASES:
        return "aliases"
    return head


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(path: Path) -> set[str]:
    """The gain_exp modules ``path`` imports, anywhere in the file (``from gain_exp.x import y`` counts as x or x.y)."""
    found = set()
    own = module_name(path)
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("gain_exp")}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                anchor = own.split(".") if path.name == "__init__.py" else own.split(".")[:-1]
                base = ".".join(anchor[: len(anchor) - node.level + 1] + ([base] if base else []))
            if base.startswith("gain_exp"):
                found |= {f"{base}.{a.name}" if modules.get(f"{base}.{a.name}") else base for a in node.names}
    return found


modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
GRAPH = {name: {m for m in imported(path) if m in modules and m != name} for name, path in modules.items()}


@pytest.mark.parametrize("name", sorted(GRAPH))
def test_a_module_imports_only_the_layers_below_it(name: str) -> None:
    mine = layer(name)
    assert mine in ALLOWED, f"{name}: a new top-level name; add it to a layer in tests/test_layers.py and the README"
    wrong = sorted(m for m in GRAPH[name] if layer(m) != mine and layer(m) not in ALLOWED[mine])
    if mine == "core":  # the method knows the data only through the sample contract
        wrong += sorted(m for m in GRAPH[name] if layer(m) == "data" and m != "gain_exp.data.base")
    assert not wrong, f"{name} ({mine}) imports {wrong}; {mine} may import only {sorted(ALLOWED[mine])}"


def test_commands_never_import_each_other() -> None:
    crossing = {
        n: sorted(m for m in deps if layer(m) == "commands") for n, deps in GRAPH.items() if layer(n) == "commands"
    }
    assert not any(crossing.values()), f"commands import commands: { {k: v for k, v in crossing.items() if v} }"


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle in ``graph`` (as a path that returns to its start), or None."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                return path[path.index(dep) :] + [dep]
            if dep not in state and (cycle := visit(dep, [*path, dep])):
                return cycle
        state[node] = 2
        return None

    for name in sorted(graph):
        if name not in state and (cycle := visit(name, [name])):
            return cycle
    return None


def test_no_import_cycles() -> None:
    cycle = find_cycle(GRAPH)
    assert cycle is None, f"import cycle: {' -> '.join(cycle or [])}"


def test_the_checker_sees_a_breach() -> None:
    """The checker itself: a core module importing train is a breach, and a three-module circle is found."""
    assert "train" not in ALLOWED["core"] and layer("gain_exp.train.engine") == "train"
    assert layer("gain_exp.table") == "commands" and layer("gain_exp") == "root"
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_public_imports_of_the_method_still_work() -> None:
    from gain_exp.core.gain import GAIN as CoreGAIN
    from gain_exp.core.losses import GAINLoss as CoreLoss
    from gain_exp.gain import GAIN
    from gain_exp.losses import GAINLoss

    assert GAIN is CoreGAIN and GAINLoss is CoreLoss
