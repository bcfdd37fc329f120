"""``gain-exp <command>``: one console script for the app and its tools.

gain-exp run [group=option ...] [key=value ...]     train + evaluate (the Hydra app; -m for sweeps)
gain-exp evaluate RUN_DIR [--split NAME] [k=v ...]   score a saved run's checkpoint again (no training)
gain-exp table RUN_DIRS ...                          aggregate runs into a paper-style table
gain-exp reproduce SOURCE                            re-run saved jobs and compare their numbers
gain-exp bench                                       step-time benchmark
gain-exp cams RUN_DIR --split S --out DIR            CAM pseudo-masks and their seed mIoU (WSSS protocol)
gain-exp figure RUN_DIR [RUN_DIR ...] --out F.png    attention of several saved runs on the same images
eval "$(gain-exp run -sc install=bash)"              tab completion for `gain-exp run`
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Callable, Sequence


def _tool(module: str) -> Callable[[Sequence[str]], None]:
    def call(argv: Sequence[str]) -> None:
        status = importlib.import_module(module).main(list(argv))
        sys.exit(status or 0)

    return call


def run(argv: Sequence[str]) -> None:
    """``gain-exp run ...``: the Hydra app (imported only when asked for, so ``gain-exp --help`` stays instant)."""
    importlib.import_module("gain_exp.run").run_command(argv)


COMMANDS: dict[str, Callable[[Sequence[str]], None]] = {
    "run": run,
    "table": _tool("gain_exp.table"),
    "reproduce": _tool("gain_exp.reproduce"),
    "bench": _tool("gain_exp.bench"),
    "evaluate": _tool("gain_exp.evaluate"),
    "cams": _tool("gain_exp.cams"),
    "figure": _tool("gain_exp.figure"),
}


def main(argv: Sequence[str] | None = None) -> None:
    """Console-script entry: dispatch ``gain-exp <command> ...``."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["-sc"] or (args and args[0].startswith("-sc")):
        _complete(args)
        return
    if not args or args[0] in ("-h", "--help"):
        print(__doc__.strip())
        sys.exit(0 if args else 2)
    command, rest = args[0], args[1:]
    if command not in COMMANDS:
        print(
            f"error: gain-exp has no command '{command}'; use one of {', '.join(COMMANDS)} (gain-exp --help).",
            file=sys.stderr,
        )
        sys.exit(2)
    COMMANDS[command](rest)


def _complete(args: list[str]) -> None:
    """Hydra's bash completion calls ``gain-exp -sc query=bash`` with the line in COMP_LINE: complete ``run``'s
    overrides as Hydra would for an app of its own, and the command names before one is typed."""
    words = os.environ.get("COMP_LINE", "").split(" ")
    if len(words) > 2 and words[1] == "run":
        os.environ["COMP_LINE"] = " ".join([words[0], *words[2:]])
        run(args)
        return
    typed = words[1] if len(words) > 1 else ""
    print(" ".join(c for c in COMMANDS if c.startswith(typed)))


if __name__ == "__main__":
    main()
