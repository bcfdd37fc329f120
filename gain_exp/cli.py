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

import os
import sys
from pathlib import Path
from typing import Callable, Sequence

from gain_exp.config.paths import SWEEPS_DIR


def run(argv: Sequence[str]) -> None:
    """The Hydra app with ``argv`` as its command line (after the fixes in ``app_argv``)."""
    from gain_exp.run import main

    sys.argv = [sys.argv[0], *app_argv(argv)]
    main()


def app_argv(argv: Sequence[str]) -> list[str]:
    """The command line Hydra should see.

    - ``--config-path`` relative to the working directory (Hydra resolves it against the package otherwise).
    - The sweep recipes (``+sweep=``, ``+launcher=``, ``+setting=``) are found from any directory: without a
      ``--config-dir`` the package's ``sweeps/`` is added (``--config-dir sweeps`` as in the README still works).
    """
    args = _saved_run(list(argv))
    for flag in ("--config-path", "-cp"):
        for i, arg in enumerate(args):
            value = None
            if arg == flag and i + 1 < len(args):
                value, at = args[i + 1], i + 1
            elif arg.startswith(flag + "="):
                value, at = arg.split("=", 1)[1], i
            if value is not None and not os.path.isabs(value) and not value.startswith("pkg://"):
                absolute = str(Path(value).resolve())
                args[at] = absolute if at != i else f"{flag}={absolute}"
    has_dir = any(a in ("--config-dir", "-cd") or a.startswith(("--config-dir=", "-cd=")) for a in args)
    if not has_dir and SWEEPS_DIR.is_dir():
        args = ["--config-dir", str(SWEEPS_DIR), *args]
    return args


def _saved_run(args: list[str]) -> list[str]:
    """``--config-path <run>/.hydra --config-name config [overrides]`` -> that run's saved job plus the overrides.

    Hydra would compose the saved config.yaml on its own, losing the group choices (run names, summary, W&B) and the
    hydra: block; the saved overrides recompose the job exactly (what ``gain-exp reproduce`` runs too).
    """
    value, drop = None, set()
    for i, arg in enumerate(args):
        for flag in ("--config-path", "-cp", "--config-name", "-cn"):
            if arg == flag and i + 1 < len(args):
                drop |= {i, i + 1}
                if flag in ("--config-path", "-cp"):
                    value = args[i + 1]
            elif arg.startswith(flag + "="):
                drop.add(i)
                if flag in ("--config-path", "-cp"):
                    value = arg.split("=", 1)[1]
    saved = Path(value) if value else None
    if saved is None or not (saved / "hydra.yaml").is_file() or not (saved / "overrides.yaml").is_file():
        return args
    from gain_exp.reproduce import saved_job

    job = saved_job(saved.resolve().parent)
    print(f"note: re-running the job saved in {saved.parent} with its overrides (`gain-exp reproduce "
          f"{saved.parent}` also compares the numbers)", file=sys.stderr)
    return job.app_args([a for i, a in enumerate(args) if i not in drop])


def _tool(module: str) -> Callable[[Sequence[str]], None]:
    def call(argv: Sequence[str]) -> None:
        import importlib

        status = importlib.import_module(module).main(list(argv))
        sys.exit(status or 0)

    return call


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
        print(f"error: gain-exp has no command '{command}'; use one of {', '.join(COMMANDS)} "
              f"(gain-exp --help).", file=sys.stderr)
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
