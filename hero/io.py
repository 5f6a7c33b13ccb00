"""Atomic file and directory writes for everything the ``hero`` package saves.

A reader (or a crash) sees either the previous file or the complete new one, never a half-written file:

* files: written to a temp file in the destination's folder (same filesystem, so the rename is atomic),
  flushed and fsynced, then moved into place with ``os.replace``; the folder is fsynced afterwards so the
  rename itself survives a power loss. On any error the temp file is removed and the old file is untouched.
* directories (checkpoints, ``save_pretrained`` exports): filled in ``.tmp-<name>-<pid>`` next to the
  destination, every file fsynced, then renamed into place; an existing destination is swapped out only once
  the new one is complete, and put back if the final rename fails.

Permissions are the usual ``0o666 & ~umask`` for files (``0o777 & ~umask`` for directories), the same as
``open(path, "w")`` would give: temp files are created with ``os.open(..., 0o666)`` so the kernel applies the
umask, rather than ``tempfile.mkstemp``'s private 0600 (which made saved models, reports and plots
unreadable to other users of a shared machine).

JSON: ``json_safe`` is the one sanitizer (NaN and +-inf -> null, numpy scalars and arrays -> Python values,
tuples -> lists) and ``write_json`` writes strict JSON atomically with it; metrics logs, diagnoses, the demo
summary and the benchmark results all go through them.
"""
from __future__ import annotations

import codecs
import contextlib
import json
import math
import os
import re
import secrets
import shutil
from typing import IO, Any, Callable, Iterator, List, Optional, Union

__all__ = ["atomic_open", "atomic_write_bytes", "atomic_write_text", "atomic_dir", "json_safe", "write_json",
           "remove_stale_temp_dirs"]

PathLike = Union[str, "os.PathLike[str]"]

_TMP_PREFIX = ".tmp-"
_TEXT_MODES = ("w", "wt")
_BINARY_MODES = ("wb",)


def _fsync_path(path: str) -> None:
    """fsync a file or directory by name; a no-op where the OS cannot open directories (Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. directories on Windows
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some filesystems refuse fsync on directories
        pass
    finally:
        os.close(fd)


def _create_temp(folder: str, name: str):
    """Create a new empty file next to ``name`` in ``folder``; returns (fd, path).

    Mode 0o666 is filtered by the process umask at creation, exactly like a plain ``open(path, "w")``;
    O_EXCL makes the name ours alone (another writer, or a leftover, just means another random name)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0) | getattr(os, "O_CLOEXEC", 0)
    for _ in range(100):
        tmp = os.path.join(folder, f"{_TMP_PREFIX}{secrets.token_hex(4)}-{name}")
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"could not create a unique temp file for {name!r} in {folder}")


@contextlib.contextmanager
def atomic_open(path: PathLike, mode: str = "wb", encoding: Optional[str] = None) -> Iterator[IO]:
    """Open a temp file that replaces ``path`` when the ``with`` block ends without an exception.

    mode: "wb" (bytes) or "w"/"wt" (text; encoding defaults to UTF-8). The parent folder is created if
    missing. On success the data is flushed, fsynced and the temp file ``os.replace``-d onto ``path``; on an
    exception (KeyboardInterrupt included) the temp file is deleted and ``path`` keeps its old content.
    """
    if mode not in _TEXT_MODES + _BINARY_MODES:
        raise ValueError(f"mode must be one of {_TEXT_MODES + _BINARY_MODES}, got {mode!r}")
    if mode in _BINARY_MODES and encoding is not None:
        raise ValueError(f"encoding={encoding!r} given for binary mode {mode!r}")
    if mode in _TEXT_MODES:
        encoding = codecs.lookup(encoding or "utf-8").name  # an unknown codec fails here, before any file
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = _create_temp(folder, os.path.basename(path))
    try:
        with os.fdopen(fd, mode, encoding=encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_path(folder)


def atomic_write_bytes(path: PathLike, data: bytes) -> str:
    """Write ``data`` to ``path`` atomically (see ``atomic_open``); returns the path."""
    with atomic_open(path, "wb") as f:
        f.write(data)
    return os.fspath(path)


def atomic_write_text(path: PathLike, text: str, encoding: str = "utf-8") -> str:
    """Write ``text`` (encoded, no newline translation) to ``path`` atomically; returns the path."""
    return atomic_write_bytes(path, text.encode(encoding))


def json_safe(obj: Any) -> Any:
    """A strict-JSON copy of ``obj``: NaN / +-inf -> None (null), numpy scalars / arrays -> Python values,
    tuples -> lists, dict keys -> str; anything else unchanged (``json.dumps`` rejects what it cannot write)."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if hasattr(obj, "tolist") and type(obj).__module__ == "numpy":  # ndarray or numpy scalar, without importing numpy
        return json_safe(obj.tolist())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write_json(path: PathLike, obj: Any, indent: Optional[int] = 1, default: Optional[Callable] = None) -> str:
    """``json_safe(obj)`` as strict JSON (+ newline) to ``path``, atomically; returns the path."""
    return atomic_write_text(path, json.dumps(json_safe(obj), indent=indent, default=default, allow_nan=False) + "\n")


def _fsync_tree(root: str) -> None:
    """fsync every regular file and folder below ``root`` (writers such as torch.save or a third-party
    save_pretrained do not fsync their own files)."""
    for folder, _, files in os.walk(root):
        for name in files:
            p = os.path.join(folder, name)
            if not os.path.islink(p):
                _fsync_path(p)
        _fsync_path(folder)


def _replace_dir(tmp: str, final: str) -> None:
    """Move the complete directory ``tmp`` to ``final``; an existing ``final`` is swapped out first and
    deleted only after the new one is in place (and restored if that last rename fails)."""
    if os.path.exists(final):
        old = f"{final}.old-{os.getpid()}"
        os.replace(final, old)
        try:
            os.replace(tmp, final)
        except BaseException:
            os.replace(old, final)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync_path(os.path.dirname(final))


@contextlib.contextmanager
def atomic_dir(path: PathLike) -> Iterator[str]:
    """Yield a fresh temp directory that becomes ``path`` when the ``with`` block succeeds.

    The temp directory is ``.tmp-<name>-<pid>`` beside ``path`` (a stale one from a crashed run of the same
    pid is cleared first). On success every file in it is fsynced and it is renamed onto ``path`` (an existing
    ``path`` is replaced as a whole, never merged). On an exception it is deleted and ``path`` is untouched.
    """
    final = os.path.abspath(os.fspath(path))
    parent = os.path.dirname(final)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f"{_TMP_PREFIX}{os.path.basename(final)}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        yield tmp
        _fsync_tree(tmp)
        _replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


#: Directories ``atomic_dir`` / ``_replace_dir`` name after the writing process: ``.tmp-<name>-<pid>`` and
#: ``<name>.old-<pid>``.
_PID_DIR_RE = re.compile(r"^(?:\.tmp-.+|.+\.old)-(\d+)$")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)  # signal 0: only checks that the process exists
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):  # exists but is someone else's (or the OS cannot tell): keep its files
        return True
    return True


def remove_stale_temp_dirs(folder: PathLike) -> List[str]:
    """Delete the ``.tmp-<name>-<pid>`` / ``<name>.old-<pid>`` directories that ``atomic_dir`` left in
    ``folder`` when its process was killed mid-write (e.g. a full model copy from a killed final export). Only
    those whose pid is no longer running are removed; returns their paths."""
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        return []
    removed = []
    for name in sorted(os.listdir(folder)):
        m = _PID_DIR_RE.match(name)
        path = os.path.join(folder, name)
        if m and os.path.isdir(path) and not os.path.islink(path) and not _pid_alive(int(m.group(1))):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed
