"""Files a run writes: atomic writes (a reader sees the old file or the new one, never part) and strict JSON records."""

from __future__ import annotations

import json
import math
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, Iterator


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()  # what open() would give: mkstemp's 0600 would hide shared outputs from the group
TEMP_GLOB = ".*.tmp"


@contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """Yield a binary file beside ``path``; on success it replaces ``path``, on any error it is removed.

    The temporary name is unique, so parallel writers of the same path (two jobs generating one dataset
    cache) never share a half-written file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def jsonable(value: Any) -> Any:
    """A metric value as strict JSON takes it: tensors as Python numbers, NaN and inf as None."""
    if hasattr(value, "item") and callable(value.item):  # torch/NumPy scalars, without importing either here
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None  # strict JSON has no NaN; None reads back as "undefined on this data"
    return value


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """``obj`` as indented JSON at ``path``, written atomically (non-JSON values as their str)."""
    with atomic_write(path) as f:
        f.write(json.dumps(obj, indent=2, default=str).encode())


def remove_stale_temps(folder: str | os.PathLike) -> list[Path]:
    """Delete the temp files a killed writer left in ``folder`` (only for folders one run writes alone)."""
    stale = sorted(Path(folder).glob(TEMP_GLOB)) if Path(folder).is_dir() else []
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


class CorruptFile(ValueError):
    """A saved file that cannot be read back (truncated, overwritten, or not what it should be)."""


def load_state(path: str | os.PathLike, map_location: Any = "cpu", mmap: bool = False) -> dict[str, Any]:
    """``torch.load`` of a file this project wrote (tensors and plain values only); CorruptFile names the path."""
    import pickle

    import torch

    try:
        state = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        # weights_only refuses anything that could run code on load; such a file was not written by gain-exp
        reason = str(err).split("WeightsUnpickler error: ")[-1].split(". ")[0].strip()
        raise CorruptFile(
            f"{path} holds objects other than tensors and plain values ({reason[:120]}); "
            f"gain-exp only loads files it wrote, so point at one of those."
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, AttributeError) as err:
        raise CorruptFile(
            f"{path} is unreadable ({type(err).__name__}: {str(err).splitlines()[0][:120]}); it is "
            f"truncated or not a gain-exp file."
        ) from None
    if not isinstance(state, dict):
        raise CorruptFile(f"{path} is not a gain-exp file (it holds a {type(state).__name__}, not a dict).")
    return state
