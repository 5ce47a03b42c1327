"""Captioned image sources: a folder (``.txt`` beside each image, or ``metadata.jsonl``) and tar shards in the
webdataset layout (``KEY.jpg|png`` + ``KEY.txt|json``). Both yield the same items for the same data.

Bad data never stops a run: an unreadable, truncated or too-small image, one without a caption, a file that a
``metadata.jsonl`` row names but that does not exist, and a key a shard holds twice are skipped and counted (found
by a header scan when the source opens, or when decoding fails later), and ``report()`` summarises it with the
first offending paths. An empty or missing source is a clear error before any model loads.

:meth:`ImageCaptionDataset.load` gives None for a sample that fails to decode (``cache`` skips it); indexing the
data set, as training does, gives the next decodable sample in its place, counted and logged.
"""

from __future__ import annotations

import glob
import io
import json
import logging
import posixpath
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from lightning_distill.errors import UserError
from lightning_distill.config.registry import DATA

log = logging.getLogger(__name__)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass
class Record:
    """One sample before decoding: where its image bytes are, its caption, a display path."""

    key: str
    where: tuple[Any, ...]
    """``("file", path)``, ``("tar", path, offset, size)``, or ``("missing", reason)`` for a sample to count."""
    caption: str | None
    path: str


def _read(where: tuple[Any, ...]) -> bytes:
    if where[0] == "file":
        return Path(where[1]).read_bytes()
    _, tar_path, offset, size = where
    with open(tar_path, "rb") as f:
        f.seek(offset)
        return f.read(size)


def folder_records(root: Path, caption_suffix: str = ".txt") -> list[Record]:
    """Images under ``root`` (recursively); captions from ``metadata.jsonl`` (``file_name`` + ``text``/``caption``)
    when present, else from the ``.txt`` beside each image."""
    if not root.is_dir():
        raise UserError(f"data.root: no folder {root}")
    meta: dict[str, str] = {}
    rows: dict[str, str] = {}  # resolved path -> where its row is, for files that turn out missing
    for jsonl in sorted(root.rglob("metadata.jsonl")):
        for n, line in enumerate(jsonl.read_bytes().splitlines()):
            if not line.strip():
                continue
            try:
                row = json.loads(line.decode())
                resolved = str((jsonl.parent / row["file_name"]).resolve())
                meta[resolved] = row.get("text", row.get("caption", ""))
                rows[resolved] = f"{jsonl}:{n + 1} ({row['file_name']})"
            except (KeyError, TypeError, ValueError) as err:  # ValueError: bad JSON or not UTF-8
                raise UserError(f"{jsonl}:{n + 1}: expected a UTF-8 JSON object with file_name and text ({err})") from err
    records = []
    for path in sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()):
        resolved = str(path.resolve())
        caption = meta.get(resolved)
        rows.pop(resolved, None)
        if caption is None and path.with_suffix(caption_suffix).is_file():
            caption = _text_caption(path.with_suffix(caption_suffix))
        key = str(path.relative_to(root).with_suffix(""))
        records.append(Record(key, ("file", str(path)), caption, str(path)))
    for resolved, where in rows.items():  # rows whose file is not there
        records.append(Record(resolved, ("missing", "missing file named in metadata.jsonl"), meta[resolved], where))
    return records


def _text_caption(path: Path) -> str | None:
    """A ``.txt`` caption; None (the sample is skipped as without caption) when it is not UTF-8 text."""
    try:
        return path.read_bytes().decode().strip()
    except (UnicodeDecodeError, OSError):
        return None


def tar_records(patterns: list[str]) -> list[Record]:
    """Samples of webdataset-style shards: members grouped by key (the name up to its first dot)."""
    paths: list[str] = []
    for pattern in patterns:
        found = sorted(glob.glob(str(Path(pattern).expanduser())))
        if not found:
            raise UserError(f"data.shards: nothing matches {pattern!r}")
        paths += found
    records = []
    for tar_path in paths:
        try:
            # uncompressed only: images are read later by offset, which a compressed stream does not have
            with tarfile.open(tar_path, "r:") as tar:
                groups: dict[str, dict[str, tarfile.TarInfo]] = {}
                for member in tar.getmembers():
                    if member.isfile():  # webdataset: the key is the path up to the first dot of the file name
                        folder, name = posixpath.split(member.name.removeprefix("./"))
                        stem, _, ext = name.partition(".")
                        group = groups.setdefault(posixpath.join(folder, stem), {})
                        if ext.lower() in group:  # the first one is used; the others are counted
                            where = ("missing", "duplicate key in a shard")
                            records.append(Record(stem, where, None, f"{tar_path}:{member.name}"))
                            continue
                        group[ext.lower()] = member
                for key in sorted(groups):
                    members = groups[key]
                    image = next((members[e] for e in ("png", "jpg", "jpeg", "webp") if e in members), None)
                    if image is None:
                        records.append(Record(key, ("missing", "no image"), None, f"{tar_path}:{key}"))
                        continue
                    where = ("tar", tar_path, image.offset_data, image.size)
                    records.append(Record(key, where, _tar_caption(tar, members), f"{tar_path}:{image.name}"))
        except tarfile.ReadError as err:
            raise UserError(f"data.shards: {tar_path} is not an uncompressed tar ({err}); use plain .tar shards") from err
        except (tarfile.TarError, OSError) as err:
            raise UserError(f"data.shards: cannot read {tar_path}: {err}") from err
    return records


def _tar_caption(tar: tarfile.TarFile, members: dict[str, tarfile.TarInfo]) -> str | None:
    """The ``.txt`` caption, or ``caption``/``text`` of the ``.json``; None when missing or unreadable."""
    try:
        if "txt" in members:
            return tar.extractfile(members["txt"]).read().decode().strip()  # type: ignore[union-attr]
        if "json" in members:
            row = json.loads(tar.extractfile(members["json"]).read())  # type: ignore[union-attr]
            caption = row.get("caption", row.get("text"))
            return caption if isinstance(caption, str) else None
    except (UnicodeDecodeError, ValueError, AttributeError, tarfile.TarError):
        return None
    return None


class ImageCaptionDataset(Dataset):
    """Decoded, resized, cropped images with captions and SDXL micro-conditioning.

    Items: ``pixels`` ``[3, R, R]`` in ``[-1, 1]`` (shorter side resized to R, then a center or random crop),
    ``caption``, ``time_ids`` = (original height, width, crop top, crop left, R, R).
    """

    def __init__(self, records: list[Record], *, resolution: int, crop: str, min_size: int | None, seed: int,
                 source: str) -> None:
        self.resolution, self.crop, self.seed = resolution, crop, seed
        self.min_size = resolution if min_size is None else min_size
        self.skipped: Counter[str] = Counter()
        self.examples: list[str] = []
        self.records = [r for r in records if self._usable(r)]
        if not self.records:
            detail = f" ({self._summary()})" if self.skipped else ""
            raise UserError(f"{source}: no usable images{detail}")
        if self.skipped:
            log.warning("%s: %s", source, self._summary())

    def skip(self, reason: str, path: str) -> None:
        """Count one skipped sample (``cache`` also counts those of shards an earlier run finished)."""
        self.skipped[reason] += 1
        if len(self.examples) < 5:
            self.examples.append(f"{path} ({reason})")

    def _usable(self, r: Record) -> bool:
        """A header scan: cheap, catches missing captions, non-images and small images."""
        from PIL import Image, UnidentifiedImageError

        if r.where[0] == "missing":
            self.skip(r.where[1], r.path)
            return False
        if not r.caption:
            self.skip("missing caption", r.path)
            return False
        try:
            with Image.open(io.BytesIO(_read(r.where))) as im:
                w, h = im.size
        except (UnidentifiedImageError, Image.DecompressionBombError, Exception):  # any failure: skip, count
            self.skip("unreadable image", r.path)
            return False
        if min(w, h) < self.min_size:
            self.skip(f"smaller than {self.min_size} px", r.path)
            return False
        return True

    def _summary(self) -> str:
        reasons = ", ".join(f"{n} {reason}" for reason, n in self.skipped.most_common())
        return f"skipped {sum(self.skipped.values())} items: {reasons}; first: {'; '.join(self.examples)}"

    def report(self) -> str | None:
        """What was skipped, or None."""
        return self._summary() if self.skipped else None

    def __len__(self) -> int:
        return len(self.records)

    def load(self, i: int) -> dict[str, Any] | None:
        """Sample ``i``, or None (counted and logged) when its image fails to decode."""
        r = self.records[i]
        try:
            return self._load(r, i)
        except Exception as err:  # PIL raises many kinds (OSError, EOFError, zlib.error, ...): skip, count
            self.skip("truncated or corrupt image", r.path)
            log.warning("skipping %s: %s", r.path, err)
            return None

    def __getitem__(self, i: int) -> dict[str, Any]:
        for k in range(len(self.records)):  # a file that fails to decode gives way to the next one
            item = self.load((i + k) % len(self.records))
            if item is not None:
                return item
        raise UserError("no image of the data set could be decoded")

    def _load(self, r: Record, i: int) -> dict[str, Any]:
        from PIL import Image

        with Image.open(io.BytesIO(_read(r.where))) as im:
            im = to_rgb(im)
            w, h = im.size
            res = self.resolution
            scale = res / min(w, h)
            nw, nh = max(res, round(w * scale)), max(res, round(h * scale))
            im = im.resize((nw, nh), Image.Resampling.BICUBIC)
            if self.crop == "random":
                g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
                top = int(torch.randint(0, nh - res + 1, (1,), generator=g))
                left = int(torch.randint(0, nw - res + 1, (1,), generator=g))
            else:
                top, left = (nh - res) // 2, (nw - res) // 2
            im = im.crop((left, top, left + res, top + res))
            pixels = torch.from_numpy(np.asarray(im, dtype=np.float32).copy()).permute(2, 0, 1) / 127.5 - 1
        time_ids = torch.tensor([h, w, top, left, res, res], dtype=torch.float32)
        return {"pixels": pixels, "caption": r.caption, "time_ids": time_ids}


def to_rgb(im: Any) -> Any:
    """An image of any mode as 8-bit RGB: 16- and 32-bit grey scaled to 8 bits (``convert`` would clip them to
    white), CMYK through PIL's conversion, and transparency (alpha, or a palette's transparent colour) laid
    over white rather than dropped to whatever colour the transparent pixels hold."""
    from PIL import Image

    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        im = Image.fromarray((np.asarray(im, dtype=np.float64) / 257).clip(0, 255).round().astype(np.uint8))
    if im.mode == "P" and "transparency" in im.info or im.mode == "PA":
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "La", "RGBa"):
        im = im.convert("RGBA")
        white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(white, im)
    return im.convert("RGB")


@dataclass(kw_only=True)
class ImageOptions:
    resolution: int = 1024
    crop: Literal["center", "random"] = "center"
    min_size: int | None = None
    """Images whose shorter side is smaller are skipped; default: resolution."""


@DATA.register("image_folder")
class ImageFolder(ImageCaptionDataset):
    """A folder of images with captions: ``.txt`` beside each image, or Hugging Face's ``metadata.jsonl``."""

    @dataclass(kw_only=True)
    class Config(ImageOptions):
        root: str
        caption_suffix: str = ".txt"

    def __init__(self, config: Config, *, seed: int = 0) -> None:
        root = Path(config.root).expanduser()
        super().__init__(folder_records(root, config.caption_suffix), resolution=config.resolution, crop=config.crop,
                         min_size=config.min_size, seed=seed, source=f"data.root {root}")


@DATA.register("tar_shards")
class TarShards(ImageCaptionDataset):
    """webdataset-layout tar shards (``KEY.jpg|png`` + ``KEY.txt|json``), local paths or globs."""

    @dataclass(kw_only=True)
    class Config(ImageOptions):
        shards: list[str] = field(default_factory=list)

    def __init__(self, config: Config, *, seed: int = 0) -> None:
        if not config.shards:
            raise UserError("data.shards: give at least one tar file or glob")
        super().__init__(tar_records(config.shards), resolution=config.resolution, crop=config.crop,
                         min_size=config.min_size, seed=seed, source=f"data.shards {config.shards}")
