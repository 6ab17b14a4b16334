"""Atomic writes: a file or a folder appears under its final name whole, or not at all.

Everything is written to a temporary path beside the target (same file system) and renamed into
place, so a crash or a kill never leaves a half-written output under the final name. This module
imports nothing from sparsekit, so every layer may use it.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


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
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    try:
        yield tmp
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


def write_json_atomic(path: str | Path, data: object) -> Path:
    """JSON (indented; NaN and inf written as null) through ``write_text_atomic``."""
    return write_text_atomic(path, json.dumps(_finite(data), indent=2))
