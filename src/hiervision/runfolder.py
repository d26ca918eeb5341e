"""Run folders that belong to one process, and writes that never leave a file half-written.

A run folder (``train --out``) is claimed before anything is written to it:

* it must be absent, empty, or already a hiervision run — a user's own folder is refused (``force``
  overrides), because a run overwrites ``config.yaml`` and ``taxonomy.json``;
* an advisory lock (``flock`` on ``<out>/.lock``) stops a second process from writing the same run;
  the kernel drops it when the holder exits or crashes, so a killed run never leaves a stale lock;
* a marker file (:data:`MARKER`) says "hiervision wrote this", so the next claim recognises it.

Every file is written with :func:`atomic_write_bytes` (temp file in the same folder, ``fsync``,
``os.replace``): readers see the old file or the new one, never a mix, and a failed write (disk
full, read-only folder) is a one-line error that leaves the old file in place.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; the ownership check still applies
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "MARKER",
    "RunFolderError",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "check_run_dir",
    "claim_run_dir",
    "is_run_dir",
    "set_aside",
]

MARKER = ".hiervision-run"
LOCK = ".lock"
# files a run writes; a fresh start (--no-resume) moves these aside instead of deleting them
RUN_OUTPUTS = ("last.pt", "best.pt", "log.csv", "metrics.json")
PREVIOUS = "previous"


class RunFolderError(ValueError):
    """A run folder that is not ours, is in use, or cannot be written (one line, naming the path)."""


# ----------------------------------------------------------------------------- atomic writes
def _fsync_dir(folder: Path) -> None:
    # the rename itself must reach the disk too; not every platform/filesystem allows this
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _why(e: OSError) -> str:
    if e.errno == errno.ENOSPC:
        return "disk full"
    if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return "folder is read-only" if e.errno == errno.EROFS else "permission denied"
    return e.strerror or type(e).__name__


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], Any]) -> None:
    """Call ``write(f)`` on a temp file beside ``path``, flush it to disk, then rename it over ``path``.

    On any ``OSError`` (disk full, read-only, quota) the temp file is removed, ``path`` keeps its old
    content, and a :class:`RunFolderError` names the file and the reason.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        keep = " (the previous file is unchanged)" if path.exists() else ""
        raise RunFolderError(f"{path}: cannot write ({_why(e)}){keep}") from None
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_write`)."""
    atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> None:
    """Write ``obj`` as JSON atomically; the object is serialised before the file is touched."""
    atomic_write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False))


# ----------------------------------------------------------------------------- ownership
def is_run_dir(folder: str | os.PathLike) -> bool:
    """A folder hiervision wrote: it has the marker, or (runs older than the marker) a
    ``config.yaml`` beside a checkpoint."""
    folder = Path(folder)
    if (folder / MARKER).is_file():
        return True
    return (folder / "config.yaml").is_file() and any((folder / f).is_file() for f in ("last.pt", "best.pt"))


def check_run_dir(out: str | os.PathLike, force: bool = False) -> Path:
    """Refuse an ``out`` that is a file, or a folder with other content than a hiervision run."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise RunFolderError(f"{out}: --out is a file, not a folder")
    if not out.is_dir() or force or is_run_dir(out):
        return out
    try:
        entries = sorted(e.name for e in os.scandir(out) if e.name not in (LOCK, MARKER))
    except OSError as e:
        raise RunFolderError(f"{out}: cannot read the folder ({_why(e)})") from None
    if entries:
        shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
        raise RunFolderError(
            f"{out}: --out is a folder that is not a hiervision run (holds {shown}); "
            "use a new or empty folder, or --force to write into it"
        )
    return out


@contextlib.contextmanager
def _lock(out: Path) -> Iterator[None]:
    if fcntl is None:
        yield
        return
    try:
        fd = os.open(out / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise RunFolderError(f"{out}: cannot write the run folder ({_why(e)})") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RunFolderError(f"{out}: cannot lock the run folder ({_why(e)})") from None
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            who = f" (pid {holder})" if holder.isdigit() else ""
            raise RunFolderError(
                f"{out}: another hiervision process{who} is writing this run; wait for it or use another --out"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)  # closing drops the lock; the file stays (deleting it would race a waiting claimer)


@contextlib.contextmanager
def claim_run_dir(out: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """Own ``out`` for the duration of the ``with`` block: check it, create it, lock it, mark it.

    Raises :class:`RunFolderError` (one line) when ``out`` is a file, someone else's folder
    (unless ``force``), unwritable, or locked by another process.
    """
    out = check_run_dir(out, force)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunFolderError(f"{out}: cannot create the run folder ({_why(e)})") from None
    with _lock(out):
        if not (out / MARKER).is_file():
            atomic_write_json(out / MARKER, {"format": "hiervision-run", "version": 1})
        yield out


def set_aside(out: str | os.PathLike, names: tuple[str, ...] = RUN_OUTPUTS) -> list[str]:
    """Move a previous run's outputs into ``out/previous/`` instead of deleting them (a fresh start); when that
    already holds an earlier run's, into ``previous-2/``, ``previous-3/``, ...: every start over keeps what it
    replaces. A rename needs no free space, so even on a full disk nothing is lost. Returns the names moved.
    """
    out = Path(out)
    found = [n for n in names if (out / n).is_file()]
    if not found:
        return []
    prev, k = out / PREVIOUS, 1
    while prev.exists() and any(prev.iterdir()):
        k += 1
        prev = out / f"{PREVIOUS}-{k}"
    try:
        prev.mkdir(exist_ok=True)
        for n in found:
            os.replace(out / n, prev / n)
    except OSError as e:
        raise RunFolderError(f"{out}: cannot move the previous run's files aside ({_why(e)})") from None
    return found
