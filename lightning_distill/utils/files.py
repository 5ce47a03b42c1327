"""Durable, atomic file writes: a reader sees the old file or the new one, never half of either."""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
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


def digest(path: Path) -> dict[str, int | str]:
    """A file's size and SHA-256 (read in 8 MiB blocks; hashlib releases the GIL, so threads hash in parallel)."""
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(8 << 20):
            sha.update(block)
    return {"size": Path(path).stat().st_size, "sha256": sha.hexdigest()}


def digests(folder: Path, names: list[str]) -> dict[str, dict[str, int | str]]:
    """:func:`digest` of each file ``folder/NAME``, several at once."""
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        return dict(zip(names, pool.map(lambda n: digest(Path(folder) / n), names)))


def find_damage(folder: Path, recorded: dict[str, dict[str, int | str]]) -> str | None:
    """What is wrong with the files ``recorded`` (name -> size and SHA-256) under ``folder``, or None if all are
    there as written. Sizes are compared first (cheap, and what a cut-short copy shows)."""
    for name, want in recorded.items():
        path = Path(folder) / name
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != want["size"]:
            return f"{path} has {path.stat().st_size} bytes, {want['size']} were written"
    for name, got in digests(folder, list(recorded)).items():
        if got["sha256"] != recorded[name]["sha256"]:
            return f"{Path(folder) / name} does not hold the bytes written (SHA-256 differs)"
    return None
