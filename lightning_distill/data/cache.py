"""Cached encodings: every sample encoded once (VAE latents, text embeddings) into safetensors shards.

``lightning-distill cache RECIPE --out DIR`` writes ``DIR/shard-NNNNN.safetensors`` (rows ``latents`` and every
entry the codec's conditioning holds, e.g. ``text``, ``pooled``, ``time_ids``, a mask) and ``DIR/manifest.json``; a shard is
written under a temporary name and renamed, so a second run skips the finished shards and resumes the rest.
A sample whose image fails to decode is left out and counted (each shard's metadata names those it left out,
so a resumed cache reports them too); no sample is stored twice. Training reads it with ``data: {name: cached,
root: DIR}``.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor
from torch.utils.data import Dataset, default_collate

from lightning_distill.utils.files import publish, write_atomically
from lightning_distill.errors import UserError
from lightning_distill.config.registry import DATA

NULL_FILE = "null.safetensors"
"""The empty caption's conditioning in a cache folder."""


def _save_atomically(path: Path, tensors: dict[str, Tensor], metadata: dict[str, str] | None = None) -> None:
    """A safetensors file written beside ``path`` as ``.tmp-NAME`` and published under its name."""
    tmp = path.with_name(f".tmp-{path.name}")
    save_file(tensors, str(tmp), metadata=metadata)
    publish(tmp, path)


@DATA.register("cached")
class Cached(Dataset):
    """Rows of a cache written by ``lightning-distill cache``: ``latents`` and every conditioning entry the codec
    gave when caching, ready to train."""

    @dataclass(kw_only=True)
    class Config:
        root: str

    def __init__(self, config: Config, *, seed: int = 0) -> None:
        self.root = Path(config.root).expanduser()
        manifest = self.root / "manifest.json"
        if not manifest.is_file():
            raise UserError(f"data.root: {self.root} is not a cache (no manifest.json); make one with lightning-distill cache")
        self.manifest = json.loads(manifest.read_text())
        if not self.manifest.get("complete"):
            raise UserError(f"data.root: the cache in {self.root} is unfinished; run the same cache command again")
        self.index: list[tuple[str, int]] = [
            (shard["file"], row) for shard in self.manifest["shards"] for row in range(shard["count"])
        ]
        if not self.index:
            raise UserError(f"data.root: the cache in {self.root} is empty")
        self._open: dict[str, Any] = {}
        keys = self.manifest.get("keys")
        if keys is None:  # a cache written before manifests listed their keys: the first shard's
            first = next(s["file"] for s in self.manifest["shards"] if s["count"])
            with safe_open(str(self.root / first), framework="pt") as f:
                keys = sorted(f.keys())
        self.keys: list[str] = list(keys)
        """The entries of each row: ``latents`` and the conditioning the codec gave."""
        null = self.root / NULL_FILE
        self.null: dict[str, Tensor] | None = load_file(str(null)) if null.is_file() else None
        """The empty caption's conditioning, as the codec gave it when caching (guidance's unconditional input
        for a codec that encodes it, ``zero_null = False``); None in caches written before it was kept."""

    def check_codec(self, codec: Any, device: Any = "cpu") -> None:
        """The recipe's codec must not give conditioning the cache lacks (its network takes every entry). With its
        text encoders off (``codec.text_encoders: false``, the point of a cache), the codec is handed the empty
        caption's encoding the cache holds, which guidance needs where the family encodes it."""
        if not getattr(codec, "has_text", False):
            return
        if getattr(getattr(codec, "config", None), "text_encoders", True) is False:
            if not getattr(codec, "zero_null", True):
                if self.null is None:
                    raise UserError(f"data.root: the cache in {self.root} holds no encoding of the empty caption "
                                    f"({NULL_FILE}), which guidance needs with codec {type(codec).__name__} and its "
                                    "text encoders off; cache the data again (lightning-distill cache), or set "
                                    "codec.text_encoders: true")
                codec.cached_null = self.null
            return
        shape = self[0]["latents"].shape
        f = getattr(codec, "scale_factor", 1)
        with torch.no_grad():
            wanted = set(codec.caption_conditioning([""], f * shape[-2], f * shape[-1], device))
        missing = sorted(wanted - set(self.keys))
        if missing:
            raise UserError(f"data.root: the cache in {self.root} lacks {', '.join(missing)}, which codec "
                            f"{type(codec).__name__} gives and the network takes; it holds {', '.join(self.keys)}. "
                            "Cache the data again with this recipe's codec (lightning-distill cache)")

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        file, row = self.index[i]
        if file not in self._open:  # opened lazily, per process (loader workers each open their own)
            self._open[file] = safe_open(str(self.root / file), framework="pt")
        f = self._open[file]
        return {k: f.get_slice(k)[row] for k in self.keys}

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_open": {}}


def build_cache(recipe: Any, out: Path, shard_size: int = 1000, batch_size: int | None = None) -> dict[str, Any]:
    """Encode the recipe's data with its codec into ``out`` (resumable). Returns the manifest."""
    from tqdm.auto import tqdm

    out = Path(out)
    dataset = recipe.data.build(seed=recipe.seed)
    codec = recipe.codec.build()
    if not codec.has_text:
        raise UserError(f"codec {recipe.codec.name!r} has no text encoders; caching needs one such as sdxl")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    codec.to(device)
    batch_size = batch_size or recipe.train.batch_size
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a folder")
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    for tmp in out.glob(".tmp-*"):
        tmp.unlink()
    n = len(dataset)
    # a resumed cache must be the same cache: same data, codec, shard size and samples
    keys = [getattr(r, "key", str(i)) for i, r in enumerate(getattr(dataset, "records", range(n)))]
    fingerprint = {"data": recipe.data.to_dict(), "codec": recipe.codec.to_dict(), "shard_size": shard_size,
                   "samples": n, "keys": hashlib.sha256("\n".join(keys).encode()).hexdigest()}
    stamp = out / "cache.json"
    if stamp.is_file() and json.loads(stamp.read_text()) != fingerprint:
        raise UserError(
            f"{out} holds a cache of other data, codec or shard size; use another --out or delete the folder"
        )
    write_atomically(stamp, json.dumps(fingerprint, indent=2))
    load = getattr(dataset, "load", dataset.__getitem__)  # None for a sample that cannot be decoded
    shards = []
    null_kept = (out / NULL_FILE).is_file()
    with tqdm(total=n, unit="img", desc=f"caching into {out}") as bar:
        for start in range(0, n, shard_size):
            name = f"shard-{start // shard_size:05d}.safetensors"
            path = out / name
            stop = min(n, start + shard_size)
            if path.is_file():  # finished by an earlier run, unless damaged
                finished = _finished_shard(path, start, stop)
                if finished is not None:
                    count, skipped = finished
                    for reason, where in skipped:  # the report counts what earlier runs skipped too
                        dataset.skip(reason, where)
                    shards.append({"file": name, "count": count})
                    bar.update(stop - start)
                    continue
                path.unlink()
            rows: dict[str, list[Tensor]] = {}
            skipped: list[tuple[str, str]] = []
            for b in range(start, stop, batch_size):
                items = []
                for i in range(b, min(stop, b + batch_size)):
                    item = load(i)
                    if item is None:  # failed to decode: counted by the data set, never replaced by another
                        skipped.append(("truncated or corrupt image", dataset.records[i].path))
                    else:
                        items.append(item)
                bar.update(min(stop, b + batch_size) - b)
                if not items:
                    continue
                batch = default_collate(items)
                pixels = batch["pixels"].to(device)
                time_ids = batch["time_ids"].to(device) if "time_ids" in batch else None
                with torch.no_grad():
                    rows.setdefault("latents", []).append(codec.encode(pixels).cpu())
                    cond = codec.caption_conditioning(list(batch["caption"]), *pixels.shape[-2:], device, time_ids)
                    if not null_kept:  # guidance's empty caption, for training without the encoders: once
                        null = codec.caption_conditioning([""], *pixels.shape[-2:], device)
                        _save_atomically(out / NULL_FILE, {k: v.cpu().contiguous() for k, v in null.items()})
                        null_kept = True
                for k, v in cond.items():  # everything the family's network takes: text, pooled, time_ids, ...
                    rows.setdefault(k, []).append(v.cpu())
            tensors = {k: torch.cat(v).contiguous() for k, v in rows.items()}
            _save_atomically(path, tensors, {"span": f"{start}-{stop}", "skipped": json.dumps(skipped)})
            shards.append({"file": name, "count": int(tensors["latents"].shape[0]) if tensors else 0})
    report = dataset.report() if hasattr(dataset, "report") else None
    if not any(s["count"] for s in shards):
        if created:  # leave no trace of a cache that holds nothing
            shutil.rmtree(out, ignore_errors=True)
        raise UserError(f"no sample of the data could be decoded ({report}); nothing was cached")
    keys: set[str] = set()
    for shard in shards:
        if shard["count"]:
            with safe_open(str(out / shard["file"]), framework="pt") as f:
                keys |= set(f.keys())
    manifest = {"complete": True, "total": sum(s["count"] for s in shards), "shards": shards, "keys": sorted(keys),
                "codec": recipe.codec.to_dict(), "data": recipe.data.to_dict(), "skipped": report}
    write_atomically(out / "manifest.json", json.dumps(manifest, indent=2))
    return manifest


def _finished_shard(path: Path, start: int, stop: int) -> tuple[int, list[tuple[str, str]]] | None:
    """A shard an earlier run finished: its row count and the samples it skipped; None if damaged or not
    this span (a crash cut it short, or an older cache)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            count = f.get_slice("latents").get_shape()[0] if "latents" in f.keys() else 0
        skipped = [tuple(s) for s in json.loads(meta.get("skipped", "[]"))]
    except Exception:  # cut short by a crash, or not a shard at all: encode it again
        return None
    if meta.get("span") != f"{start}-{stop}" or count + len(skipped) != stop - start:
        return None
    return count, skipped  # type: ignore[return-value]
