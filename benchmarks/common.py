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
    return f"CPU ({cpu_model()}, {torch.get_num_threads()} threads)"


def cpu_model() -> str:
    """The processor's model name and the matrix extensions its kernels may use: on a CPU the adversarial stages
    amplify rounding, so their trained numbers reproduce only on the same kind of processor (the MSE rows do)."""
    model = platform.processor() or platform.machine()
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return model
    names = [line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")]
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    extensions = [f for f in ("avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    return ", ".join([names[0] if names else model, *extensions])


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
    """A markdown table of rows: the columns of all rows in the order they first appear, – where a row has none."""
    keys = list(dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(k, "–")) for k in keys) + " |")
    return "\n".join(lines)


def _fmt(v: object) -> str:
    if v is None:
        return "–"
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
