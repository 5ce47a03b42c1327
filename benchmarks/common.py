"""Shared by the benchmarks: the device, its measured matmul rate, timing, and rows for RESULTS.md."""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

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


PROBE_METRICS = ("fd", "fd_patch", "fd_teacher", "diversity_per_prompt")


def student_rows(run: Path, seed: int) -> list[dict[str, object]]:
    """The students' rows of a finished run's report (``metrics.json``), each with ``seed``, printed as read."""
    rows = []
    for r in json.loads((Path(run) / "metrics.json").read_text())["results"]:
        if not r["model"].startswith("teacher"):
            rows.append({"model": r["model"], "steps": r["steps"], "seed": seed, **{m: r[m] for m in PROBE_METRICS}})
            print(f"seed {seed}: {r['model']} {r['steps']} step(s): "
                  + ", ".join(f"{m} {r[m]:.3f}" for m in PROBE_METRICS))
    return rows


def summarise(rows: list[dict], metrics: tuple[str, ...]) -> list[dict[str, object]]:
    """Mean ± sd (over seeds) of each metric, per (model, steps), in the order the rows first appear (a metric no row
    of a group has is left out of its row)."""
    groups: dict[tuple[str, int], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["model"], r["steps"]), []).append(r)
    table = []
    for (model, steps), group in groups.items():
        row: dict[str, object] = {"model": model, "steps": steps, "seeds": len(group)}
        for m in metrics:
            values = [float(r[m]) for r in group if r.get(m) is not None]
            if values:
                sd = statistics.stdev(values) if len(values) > 1 else 0.0
                row[m] = f"{statistics.fmean(values):.3f} ± {sd:.3f}"
        table.append(row)
    return table


def over_seeds(rows: list[dict[str, object]], per_seed: dict[str, str]) -> list[dict[str, object]]:
    """:func:`summarise` of the probes' metrics, with the ``per_seed`` metrics also listed seed by seed in their
    formats (``{"fd": ".1f"}`` adds the column ``fd per seed``)."""
    summary = summarise(rows, PROBE_METRICS)
    for row in summary:
        group = [r for r in rows if (r["model"], r["steps"]) == (row["model"], row["steps"])]
        for m, fmt in per_seed.items():
            row[f"{m} per seed"] = ", ".join(format(r[m], fmt) for r in group)
    return summary


def mark_done(out: Path, phase: Any, loader: dict[str, Any]) -> None:
    """A checkpoint in run folder ``out`` that says every phase up to ``phase`` is done (its results must be in
    ``out/phases``), with the data loader's state ``loader`` and nothing else: the run resumes at the next phase."""
    mark = Path(out) / "checkpoints" / f"step-{phase.end:08d}"
    mark.mkdir(parents=True)
    torch.save({"loader": loader}, mark / "rank-0.pt")
    (mark / "meta.json").write_text(json.dumps(
        {"phase": phase.index, "phase_name": phase.name, "step": phase.end, "world_size": 1}))


def record_arguments(parser: argparse.ArgumentParser) -> None:
    """``--no-record`` and ``--results FILE``: where the script appends its tables (``results_file`` reads them)."""
    parser.add_argument("--no-record", action="store_true", help="print only: no RESULTS.md row")
    parser.add_argument("--results", type=Path, default=RESULTS, help="the RESULTS.md the tables are appended to")


def results_file(args: argparse.Namespace) -> Path | None:
    return None if args.no_record else args.results


def probe_arguments(description: str, recipe_help: str) -> argparse.ArgumentParser:
    """The arguments the probes that train again from finished ``benchmarks/fidelity.py`` runs share."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--runs", default=str(Path(__file__).resolve().parents[1] / "runs" / "fidelity"),
                        help="benchmarks/fidelity.py's --out")
    parser.add_argument("--recipe", required=True, help=recipe_help)
    parser.add_argument("--out", required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    record_arguments(parser)
    return parser


def train_probe(out: Path, recipe: Path, overrides: list[str], prepare: Callable[[], None]) -> None:
    """Train ``recipe`` into run folder ``out`` after ``prepare()`` laid out its finished phases; a folder with a
    report is only read again, an unfinished one starts over (a probe is short). Exits with the run's failure."""
    if (out / "metrics.json").is_file():
        return
    if out.exists():
        shutil.rmtree(out)
    prepare()
    done = subprocess.run([sys.executable, "-m", "lightning_distill", "train", str(recipe), "--out", str(out),
                           *overrides], check=False, cwd=Path(__file__).resolve().parents[1])
    if done.returncode:
        sys.exit(done.returncode)
