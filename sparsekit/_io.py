"""Atomic writes: a file or a folder appears under its final name whole, or not at all.

Everything is written to a temporary path beside the target (same file system) and renamed into
place, so a crash or a kill never leaves a half-written output under the final name. This module
imports nothing from sparsekit, so every layer may use it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)

OWNER_FILE = ".sparsekit-owner"  # pid of the process writing a temp folder
STALE_AFTER_S = 3600  # a temp folder without an owner file this old is debris


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(target: Path) -> list[Path]:
    """Remove ``.NAME.tmp-*`` / ``.NAME.old-*`` folders beside ``target`` left by a killed save
    (their writer's pid is gone, or they have no owner and are over an hour old)."""
    removed = []
    for item in [*target.parent.glob(f".{target.name}.tmp-*"), *target.parent.glob(f".{target.name}.old-*")]:
        owner = item / OWNER_FILE
        try:
            pid = int(owner.read_text()) if owner.is_file() else None
            stale = (not _pid_alive(pid)) if pid else time.time() - item.stat().st_mtime > STALE_AFTER_S
        except (OSError, ValueError):
            continue
        if stale:
            shutil.rmtree(item, ignore_errors=True)
            removed.append(item)
            log.warning("removed %s, left by an interrupted save", item)
    return removed


def check_can_write_file(target: str | Path) -> None:
    """Raise (before any long work) unless ``target`` can be written: not a folder, and its nearest
    existing parent a writable folder (an existing file is replaced atomically later)."""
    target = Path(target).expanduser().resolve()
    if target.is_dir():
        raise IsADirectoryError(f"{target} is a folder; give a file path such as {target / 'result.json'}")
    parent = target.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot write {target}: {parent} is not a writable folder")


def check_can_create(target: str | Path) -> None:
    """Raise (before any long work) when ``target`` exists or its folder cannot be written."""
    target = Path(target).expanduser().resolve()
    if target.exists():
        raise FileExistsError(f"{target} exists; remove it or pick another output folder")
    parent = target.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(
            f"cannot create {target}: {parent} is not a writable folder; pick another output"
        )


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _default_permissions(path: Path) -> None:
    """mkdtemp/mkstemp make 0700 folders and 0600 files: give the output the modes an ordinary
    write would have under the current umask, so servers running as other users read it."""
    umask = _umask()
    if path.is_file():
        path.chmod(0o666 & ~umask)
        return
    path.chmod(0o777 & ~umask)
    for item in path.rglob("*"):
        item.chmod((0o777 if item.is_dir() else 0o666) & ~umask)


@contextlib.contextmanager
def atomic_dir(target: str | Path, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temp folder beside ``target``; on success it replaces ``target``.

    ``overwrite=False`` refuses (FileExistsError) when ``target`` exists by the time the folder is
    complete; otherwise the old folder is moved aside first and removed after the rename.
    """
    target = Path(target).resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(target)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    (tmp / OWNER_FILE).write_text(str(os.getpid()))
    try:
        yield tmp
        (tmp / OWNER_FILE).unlink(missing_ok=True)
        _default_permissions(tmp)
        old = None
        if target.exists():
            if not overwrite:
                raise FileExistsError(f"{target} exists; remove it or pick another output folder")
            old = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.old-"))
            os.replace(target, old / "d")
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` to a temp file beside ``path`` and rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        _default_permissions(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def _finite(value: object) -> object:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def print_and_write(text: str, out: str | Path | None) -> None:
    """Print ``text`` and, when ``out`` is given, write it there atomically (a report script's output)."""
    print(text)
    if out:
        write_text_atomic(out, text)


def write_json_atomic(path: str | Path, data: object) -> Path:
    """JSON (indented; NaN and inf written as null) through ``write_text_atomic``."""
    return write_text_atomic(path, json.dumps(_finite(data), indent=2))
