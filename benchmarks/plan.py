"""``lightning-distill plan`` on every shipped recipe: how long it takes offline, and what each recipe needs.

Each recipe is planned by the real CLI in a fresh process (``plan RECIPE --json``, ``HF_HUB_OFFLINE=1``): one row
per recipe with its wall time, phases and the largest peak GiB per device; then the CLI's tables for the SDXL
ladders the plan issue asks about (a 24 GB card for the LoRA ladder, 8 × 80 GB for the full one).

    python benchmarks/plan.py                          # every shipped recipe (about 6 min on 2 cores)
    python benchmarks/plan.py --recipes recipes/debug.yaml --no-record
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, commit, record  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TABLES = [  # (what it answers, arguments)
    ("the LoRA ladder on one 24 GB card, batch 1, 1024 px", ["recipes/sdxl_lightning/lora_24gb.yaml", "--gpu", "4090"]),
    ("lora.yaml itself on one device, batch 1 (the defaults the 24 GB variant changes)",
     ["recipes/sdxl_lightning/lora.yaml", "fabric.devices=1", "fabric.strategy=auto", "train.batch_size=1",
      "--gpu", "4090"]),
    ("the full ladder as shipped: FSDP2 on 8 devices, batch 8 per device", ["recipes/sdxl_lightning/full.yaml",
                                                                           "--gpu", "h100"]),
]


def plan(args: list[str]) -> tuple[str, float]:
    """What ``lightning-distill plan ARGS`` prints, offline, and its seconds."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "lightning_distill", "plan", *args], cwd=ROOT, env=env,
                         capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if out.returncode != 0:
        raise SystemExit(f"plan {' '.join(args)} failed:\n{out.stderr[-3000:]}")
    return out.stdout.strip(), seconds


def main(argv: list[str] | None = None) -> list[dict[str, object]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", nargs="*", help="recipe files (default: every shipped one)")
    parser.add_argument("--no-tables", action="store_true", help="skip the SDXL tables")
    parser.add_argument("--no-record", action="store_true")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    recipes = args.recipes or sorted(str(p.relative_to(ROOT)) for p in (ROOT / "recipes").rglob("*.yaml")
                                     if not p.name.startswith("_"))
    results = None if args.no_record else args.results
    rows = []
    for recipe in recipes:
        out, seconds = plan([recipe, "--json"])
        phases = json.loads(out)["phases"]
        peak = max(p["peak_gib_per_rank"] for p in phases)
        rows.append({"recipe": recipe, "seconds": round(seconds, 1), "phases": len(phases),
                     "largest peak GiB/device": round(peak, 2)})
        print(rows[-1], flush=True)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    record("Plan: every shipped recipe offline", f"python benchmarks/plan.py  # {cores} cores, HF_HUB_OFFLINE=1",
           f"CPU, {cores} cores", rows, results)
    if not args.no_tables:
        for title, plan_args in TABLES:
            text, _ = plan(plan_args)  # the CLI's own table
            print(f"\n{title}\n{text}")
            if results is not None:
                with results.open("a") as f:
                    f.write(f"\n#### Plan: {title}\n\nmeta device · commit `{commit()}`\n\n"
                            f"`lightning-distill plan {' '.join(plan_args)}`\n\n{text}\n")
    return rows


if __name__ == "__main__":
    main()
