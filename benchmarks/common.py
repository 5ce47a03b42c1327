"""Shared by the benchmarks: the device, its measured matmul rate, timing, and rows for RESULTS.md."""

from __future__ import annotations

import datetime
import platform
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device, warmup: int, iters: int) -> float:
    """Median seconds per call."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def matmul_rate(device: torch.device, dtype: torch.dtype, n: int = 4096, iters: int = 10) -> float:
    """Measured FLOP/s of a square matmul on this device (the MFU denominator)."""
    if device.type == "cpu":
        n = min(n, 1024)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    seconds = timed(lambda: a @ b, device, warmup=2, iters=iters)
    return 2 * n**3 / seconds


def table(rows: list[dict[str, object]]) -> str:
    """A markdown table of rows (all with the same keys)."""
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r[k]) for k in keys) + " |")
    return "\n".join(lines)


def _fmt(v: object) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def record(title: str, command: str, device: str, rows: list[dict[str, object]], results: Path | None = RESULTS) -> str:
    """Print the table and append it, with device, commit, date and command, to RESULTS.md."""
    text = table(rows)
    print(text)
    if results is not None:
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        block = f"\n### {title}\n\n{device} · commit `{commit()}` · {stamp}\n\n`{command}`\n\n{text}\n"
        if not results.exists():
            results.write_text("# Benchmark results\n\nRows appended by the scripts in `benchmarks/`.\n")
        with results.open("a") as f:
            f.write(block)
    return text
