"""Cached-latent loading throughput on this machine against what a training step consumes.

Writes a cache of SDXL-shaped rows (4×128×128 latents, 77×2048 text, pooled, time ids), reads it through the
loop's StatefulDataLoader and reports samples/s; with ``--step-seconds`` it also reports the step's demand
(batch / step time) and the headroom.

    python benchmarks/data_loading.py --rows 512 --batch 8 --workers 0 2 --step-seconds 1.0
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import device_name, record  # noqa: E402


def write_cache(root: Path, rows: int, shard: int, latent: int) -> None:
    shards = []
    for start in range(0, rows, shard):
        n = min(shard, rows - start)
        name = f"shard-{start // shard:05d}.safetensors"
        save_file({"latents": torch.randn(n, 4, latent, latent), "text": torch.randn(n, 77, 2048),
                   "pooled": torch.randn(n, 1280), "time_ids": torch.zeros(n, 6)}, str(root / name))
        shards.append({"file": name, "count": n})
    (root / "manifest.json").write_text(json.dumps({"complete": True, "total": rows, "shards": shards}))


def throughput(root: Path, batch: int, workers: int, batches: int) -> float:
    from lightning_distill.data.cache import Cached
    from lightning_distill.engine.loader import make_loader

    class Fabric:
        global_rank, world_size = 0, 1

    loader = make_loader(Cached(Cached.Config(root=str(root))), batch_size=batch, num_workers=workers, seed=0,
                         fabric=Fabric())
    it = iter(loader)
    next(it)  # workers started
    start = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batches * batch / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> list[dict[str, object]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--shard", type=int, default=128)
    parser.add_argument("--latent", type=int, default=128, help="latent size (128 for 1024 px)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--workers", type=int, nargs="*", default=[0, 2])
    parser.add_argument("--step-seconds", type=float, default=None, help="a training step's time, for the demand")
    parser.add_argument("--results", default=None)
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        write_cache(Path(tmp), args.rows, args.shard, args.latent)
        for workers in args.workers:
            rate = throughput(Path(tmp), args.batch, workers, args.batches)
            row: dict[str, object] = {"workers": workers, "batch": args.batch, "samples/s": rate}
            if args.step_seconds:
                demand = args.batch / args.step_seconds
                row.update({"step demand samples/s": demand, "headroom ×": rate / demand})
            rows.append(row)
    from common import RESULTS

    record(f"Cached-latent loading ({args.latent}×{args.latent} latents)",
           "python benchmarks/data_loading.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           device_name(torch.device("cpu")), rows, None if args.no_record else Path(args.results or RESULTS))
    return rows


if __name__ == "__main__":
    main()
