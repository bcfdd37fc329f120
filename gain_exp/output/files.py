"""Files a run writes: atomic writes (a reader sees the old file or the new one, never part) and strict JSON records."""

from __future__ import annotations

import errno
import json
import math
import os
import re
import shutil
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, Iterator


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()  # what open() would give: mkstemp's 0600 would hide shared outputs from the group
TEMP_GLOB = ".*.tmp"
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)  # the disk (or the user's quota) is full
READ_ONLY = (errno.EROFS, errno.EACCES, errno.EPERM)  # a read-only file system, or a folder this user cannot write


class CannotWrite(OSError):
    """A file cannot be written: the disk is full or the folder read-only. Its message is one sentence: the path, why
    (with the free space), what is kept, how to go on; ``but`` rewrites the last two where the caller knows more."""

    def __init__(self, path: Path, reason: str, kept: str, fix: str, code: int | None = None) -> None:
        super().__init__(f"cannot write {path}: {reason}; {kept}; {fix}.")
        self.path, self.reason, self.kept, self.fix, self.errno = path, reason, kept, fix, code

    def but(self, kept: str | None = None, fix: str | None = None) -> CannotWrite:
        return CannotWrite(self.path, self.reason, kept or self.kept, fix or self.fix, self.errno)


def write_error(err: BaseException) -> OSError | None:
    """The OSError behind ``err`` when it means "no space" or "not writable" (torch.save wraps ENOSPC in a
    RuntimeError "unexpected pos"), else None."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in NO_SPACE + READ_ONLY:
            return err
        err = err.__cause__ or err.__context__
    return None


def free_space(path: str | os.PathLike) -> str:
    """Free space on the file system that holds ``path`` (its nearest existing folder), e.g. "1.2 MB free"."""
    try:
        free = float(shutil.disk_usage(_existing(Path(path))).free)
    except OSError:
        return "free space unknown"
    unit = "bytes"
    for bigger in ("kB", "MB", "GB", "TB"):
        if free < 1000:
            break
        free, unit = free / 1000, bigger
    return f"{free:.0f} {unit} free" if unit == "bytes" else f"{free:.1f} {unit} free"


def _existing(path: Path) -> Path:
    """``path`` or its nearest parent that exists."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def cannot_write(path: str | os.PathLike, err: OSError) -> CannotWrite:
    """The one sentence for ``err`` (from ``write_error``) while writing ``path``."""
    path = Path(path)
    kept = f"the earlier {path.name} is unchanged" if path.exists() else "nothing partial was left"
    if err.errno in NO_SPACE:
        return CannotWrite(
            path, f"the disk is full ({free_space(path)})", kept, "free some space, then run again", err.errno
        )
    folder = _existing(path.parent)  # the folder that refused (a missing one is created in its nearest parent)
    reason = f"{folder} is not writable ({os.strerror(err.errno).lower()})"
    return CannotWrite(path, reason, kept, "make it writable or write elsewhere, then run again", err.errno)


@contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """Yield a binary file beside ``path``; on success it replaces ``path``, on any error it is removed.

    The temporary name is unique, so parallel writers of the same path (two jobs generating one dataset
    cache) never share a half-written file.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as err:
        if write_error(err) is None:
            raise
        raise cannot_write(path, err) from None
    try:
        with _open_temp(fd) as f:
            yield f
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        cause = write_error(err)
        if cause is None or isinstance(err, CannotWrite):
            raise
        raise cannot_write(path, cause) from None


def _open_temp(fd: int) -> BinaryIO:
    """The temporary file of ``atomic_write`` (a seam: tests make it fail the way a full disk does)."""
    return os.fdopen(fd, "wb")


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


def blocked_global(err: BaseException) -> str | None:
    """The importable name (e.g. posix.system) for which torch.load's weights-only unpickler refused a file."""
    import pickle

    match = re.search(r"GLOBAL (\S+)", str(err)) if isinstance(err, pickle.UnpicklingError) else None
    return match[1].rstrip(".,") if match else None


def load_failure(err: BaseException) -> str:
    """``Type: the first informative sentence`` of a failed torch.load or safetensors load, never torch's advice to
    load with weights_only=False (gain-exp only ever loads tensors)."""
    parts = (line.split("WeightsUnpickler error:")[-1].strip() for line in str(err).splitlines())
    text = next(
        (t for t in parts if t and "weights_only" not in t and not t.startswith(("Weights only", "Check the doc"))), ""
    )
    text = re.sub(r"\[enforce fail at [^\]]*\][\s.]*", "", text).split(". ")[0].rstrip(".")[:120]
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def load_state(path: str | os.PathLike, map_location: Any = "cpu", mmap: bool = False) -> dict[str, Any]:
    """``torch.load`` of a file this project wrote (tensors and plain values only); CorruptFile names the path."""
    import torch

    try:
        with warnings.catch_warnings():  # a plain pickle's protocol warning would only precede the sentence
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            state = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except MemoryError:
        raise
    except Exception as err:  # a foreign or damaged file fails in many types (KeyError, IndexError, SafetensorError)
        code = blocked_global(err)
        if code:  # weights_only refuses anything that could run code on load; such a file was not written by gain-exp
            raise CorruptFile(
                f"{path} holds objects other than tensors and plain values (unsupported GLOBAL {code}); gain-exp only "
                f"loads files it wrote, so point at one of those."
            ) from None
        empty = Path(path).is_file() and Path(path).stat().st_size == 0
        reason = "0 bytes" if empty else load_failure(err)
        raise CorruptFile(f"{path} is unreadable ({reason}); it is truncated or not a gain-exp file.") from None
    if not isinstance(state, dict):
        raise CorruptFile(f"{path} is not a gain-exp file (it holds a {type(state).__name__}, not a dict).")
    return state
