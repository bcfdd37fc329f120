"""Where the config tree and the sweep recipes live: the source checkout's top-level ``conf/`` and ``sweeps/`` when
running from one (editable installs too), else the copies a wheel ships inside the package (``gain_exp/conf``)."""

from __future__ import annotations

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent.parent  # gain_exp/


def _find(name: str) -> Path:
    shipped = PACKAGE_DIR / name  # pip install . (non-editable): the wheel carries conf/ and sweeps/ here
    checkout = PACKAGE_DIR.parent / name  # a clone, or pip install -e .
    for candidate in (shipped, checkout):
        if candidate.is_dir() and any(candidate.glob("*/*.yaml")):
            return candidate
    return checkout


CONF_DIR = _find("conf")
SWEEPS_DIR = _find("sweeps")
