"""Durable, atomic file writes: a reader sees the old file or the new one, never half of either."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path


def fsync_path(path: Path) -> None:
    """Flush a file's or a folder's entries to disk (before a rename that publishes them)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(tmp: Path, final: Path) -> None:
    """Rename a finished ``tmp`` (file or folder) over ``final`` durably: its data, the rename, the folder."""
    fsync_path(tmp)
    os.replace(tmp, final)
    fsync_path(final.parent)


def write_atomically(path: Path, data: str | bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file beside it and a durable rename."""
    path = Path(path)
    tmp = path.with_name(f".tmp-{path.name}")
    if isinstance(data, str):
        tmp.write_text(data)
    else:
        tmp.write_bytes(data)
    publish(tmp, path)


def replace_folder(out: Path, write: Callable[[Path], None]) -> None:
    """Fill a new folder with ``write(tmp)`` and put it in place of ``out`` (an earlier one is set aside, then
    removed once the new one is in place); a failed ``write`` leaves ``out`` as it was."""
    out = Path(out)
    tmp = out.with_name(f".tmp-{out.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        write(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = out.with_name(f".old-{out.name}")
    if out.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)
