"""One prepared GPU check: every figure that needs an accelerator, in one command, offline, at real size.

    python benchmarks/gpu.py                 # one CUDA device; about 8 minutes on an H100/H200, imports included
    python benchmarks/gpu.py --dry-run       # the same code paths on the CPU at tiny sizes (the test suite runs it)

Every network has random weights built from the published configs the project ships
(``lightning_distill.models.architectures``); nothing is downloaded. Parts, in order:

1. ``steps``: ``benchmarks/step.py``'s SDXL cases at 1024 px, bf16 (MSE, adversarial conditional/unconditional;
   full and LoRA; with and without checkpointing; 8-bit Adam): step time, samples/s, counted FLOPs, MFU against the
   device's measured bf16 matmul rate. The batch starts at ``--batch`` and halves on out-of-memory.
2. ``plan``: each distinct phase of ``recipes/sdxl_lightning/lora_24gb.yaml`` (batch 1) and of ``full.yaml`` (its
   shipped batch, one device): ``torch.cuda.max_memory_allocated`` of a real iteration (optimizer step included)
   against the tensors ``lightning-distill plan`` models for it (parameters, gradients, optimizer, activations; not
   the codec, which is not built here, nor its allowance for the CUDA context), as a ratio.
3. ``optimizers``: the full adversarial phase with 8-bit Adam (bitsandbytes) and with ``train.compile: true``
   against plain Adam, eager (time, peak; compile's first step, which compiles, apart).
4. ``transformers``: one adversarial LoRA phase of SD3 (``recipes/sd3_lightning/lora.yaml``, 1024 px) and of Flux
   (``recipes/flux_lightning/lora.yaml``), one device, batch 1: time and peak against the plan.
5. ``tiny``: the main job (``recipes/tiny/lightning.yaml``) on the device (time), and ``pytest -m gpu``.

Each part prints a table and appends it to ``benchmarks/RESULTS.md`` with the device and commit; all rows go to
``benchmarks/gpu.json``. The script keeps to ``--budget`` seconds from its start: a part (or a case) whose estimate
would pass it is skipped, and the skipped ones are named in the json and at the end.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

START = time.monotonic()

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, commit, device_name, matmul_rate, record  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SDXL = ROOT / "recipes" / "sdxl_lightning"

# --dry-run: the hub ids the recipes name get tiny configs instead of the published ones (same classes, same code)
TINY_CONFIGS: dict[tuple[str, str], dict[str, Any]] = {
    ("stabilityai/stable-diffusion-xl-base-1.0", "unet"): {
        "_class_name": "UNet2DConditionModel", "sample_size": 8, "in_channels": 4, "out_channels": 4,
        "layers_per_block": 1, "block_out_channels": [32, 64], "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"], "cross_attention_dim": 64, "attention_head_dim": [2, 4],
        "addition_embed_type": "text_time", "addition_time_embed_dim": 8,
        "projection_class_embeddings_input_dim": 8 * 6 + 32, "use_linear_projection": True,
    },
    ("stabilityai/stable-diffusion-3.5-medium", "transformer"): {
        "_class_name": "SD3Transformer2DModel", "sample_size": 4, "patch_size": 2, "in_channels": 16,
        "out_channels": 16, "num_layers": 2, "attention_head_dim": 8, "num_attention_heads": 2,
        "joint_attention_dim": 32, "caption_projection_dim": 16, "pooled_projection_dim": 64, "pos_embed_max_size": 16,
    },
    ("black-forest-labs/FLUX.1-dev", "transformer"): {
        "_class_name": "FluxTransformer2DModel", "patch_size": 1, "in_channels": 64, "num_layers": 1,
        "num_single_layers": 1, "attention_head_dim": 16, "num_attention_heads": 2, "joint_attention_dim": 32,
        "pooled_projection_dim": 32, "guidance_embeds": True, "axes_dims_rope": [4, 6, 6],
    },
}
DRY = ["data.resolution=64", "method.discriminator.head.channels=32", "method.discriminator.head.blocks=1"]
"""--dry-run's overrides of every recipe: 64 px (8x8 latents), a small discriminator head."""

ESTIMATES = {"steps": 25.0, "plan": 40.0, "optimizers": 60.0, "compile": 150.0, "transformers": 60.0,
             "tiny": 200.0, "pytest": 60.0}
"""Seconds one case of each part takes on an H100/H200 (a guess before the first run; then the budget's guard)."""


class Budget:
    """Seconds left of ``total`` since the script started; what did not fit is named in ``skipped``."""

    def __init__(self, total: float, dry: bool) -> None:
        self.total, self.dry, self.skipped = total, dry, []

    def left(self) -> float:
        return self.total - (time.monotonic() - START)

    def fits(self, what: str, estimate: str) -> bool:
        seconds = 0.0 if self.dry else ESTIMATES[estimate]
        if self.left() >= seconds:
            return True
        self.skipped.append(f"{what} (needs about {seconds:.0f} s, {max(0.0, self.left()):.0f} s left)")
        print(f"skipped: {self.skipped[-1]}", flush=True)
        return False


@contextmanager
def tiny_configs(dry: bool) -> Iterator[None]:
    """Within: the published configs are the tiny ones (``--dry-run``); otherwise nothing changes."""
    from lightning_distill.models import architectures

    saved = dict(architectures.KNOWN)
    if dry:
        architectures.KNOWN.update(TINY_CONFIGS)
    try:
        yield
    finally:
        architectures.KNOWN.clear()
        architectures.KNOWN.update(saved)


RATE = [float("nan")]
"""The device's measured matmul rate (FLOP/s, bf16 on CUDA), set once in main: the MFU denominator."""


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")


def is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


# -- part 1: step.py's cases ------------------------------------------------------------------------------------
def part_steps(device: torch.device, dry: bool, batch: int, steps: int, budget: Budget) -> list[dict[str, Any]]:
    import step

    step.RATE[device.type] = RATE[0]
    rows = []
    cases = [c for c in step.CASES if c[0] == "adv-uncond lora ckpt"] if dry else step.CASES
    for case in cases:
        if case[4] == "adam8bit" and device.type != "cuda":
            budget.skipped.append(f"steps: {case[0]} (bitsandbytes' 8-bit Adam needs CUDA)")
            continue
        if not budget.fits(f"steps: {case[0]}", "steps"):
            continue
        b = batch
        while True:
            oom = False
            try:
                with torch.device(device):  # random weights made where they run (no copy of 2.6 B parameters)
                    rows.append(step.run_case(case, dry, b, steps, device))
            except (RuntimeError, torch.OutOfMemoryError) as err:
                if not is_oom(err) or b == 1:
                    raise
                oom = True
            free(device)  # outside the handler: its traceback no longer holds the failed attempt's tensors
            if not oom:
                break
            b //= 2
    return rows


# -- parts 2-4: a shipped recipe's phase, random weights, against the plan ----------------------------------------
def random_modules(method: Any, phase: Any, device: torch.device) -> dict[str, torch.nn.Module]:
    """The phase's modules from the published configs, materialised on ``device`` with random weights (normal,
    then each layer's own initialisation where it has one)."""
    from lightning_distill.models.architectures import offline_configs

    with offline_configs():
        modules = method.build_phase(phase, lambda index: {}, empty=True)
    for module in modules.values():
        module.to_empty(device=device)
        with torch.no_grad():
            for p in module.parameters():
                p.normal_(0, 0.02)
            for b in module.buffers():
                b.zero_() if not b.is_floating_point() else b.normal_(0, 0.02)
            for m in module.modules():
                if hasattr(m, "reset_parameters") and m is not module:
                    m.reset_parameters()
    return modules


def measure_phase(path: Path, overrides: list[str], index: int, device: torch.device, steps: int,
                  compile: bool = False) -> dict[str, Any]:
    """One phase of a recipe on one device: median iteration time, peak memory, and the plan's figure."""
    from lightning.fabric import Fabric

    from lightning_distill.codecs.base import Identity
    from lightning_distill.config.recipe import load_recipe
    from lightning_distill.engine.phase import run_iteration, setup_phase
    from lightning_distill.plan.planner import example_batch, plan_phase

    one = ["fabric.devices=1", "fabric.num_nodes=1", "fabric.strategy=auto", f"fabric.accelerator={device.type}"]
    recipe = load_recipe(path, [*one, *overrides]).recipe
    phases = recipe.schedule.build().phases()
    phase = phases[index]
    plan = plan_phase(recipe, phases, phase, device_type=device.type)
    planned = sum(plan.parts[k] for k in ("parameters", "gradients", "optimizer", "activations"))
    free(device)
    fabric = Fabric(accelerator=device.type, devices=1, precision=recipe.fabric.precision)
    method = recipe.method.build(phases=phases, codec=Identity(), seed=recipe.seed)
    modules = random_modules(method, phase, device)
    method.build_phase = lambda *args, **kwargs: modules  # setup_phase hands these to the strategy as it would
    state = setup_phase(fabric, method, phase, None, recipe.optimizer, compile)
    batch = {k: torch.randn(v.shape, device=device) if v.is_floating_point() else torch.zeros(v.shape, device=device)
             for k, v in example_batch(recipe, recipe.train.batch_size).items()}
    every = next(s for s in range(phase.start, phase.end) if set(phase.optimizers_at(s)) == set(phase.optimizers))

    def iteration() -> None:
        run_iteration(fabric, method, state, [batch], every, recipe.train.clip_grad_norm, on_nonfinite="skip")
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    begin = time.perf_counter()
    iteration()  # the first: allocations of first use, and compilation when compiling
    first = time.perf_counter() - begin
    times = []
    for _ in range(steps):
        begin = time.perf_counter()
        iteration()
        times.append(time.perf_counter() - begin)
    measured = peak_gib(device)
    del state, modules, method
    free(device)
    return {"phase": phase.name, "batch": recipe.train.batch_size, "first step s": first,
            "step s": statistics.median(times), "samples/s": recipe.train.batch_size / statistics.median(times),
            "peak GiB": measured, "plan GiB": planned, "measured/plan": measured / planned,
            "TFLOP/step (plan)": plan.tflop_per_step / recipe.train.grad_accum,
            "MFU %": 100 * plan.tflop_per_step / recipe.train.grad_accum * 1e12 / (statistics.median(times) * RATE[0])}


def distinct_phases(path: Path, overrides: list[str]) -> list[int]:
    """Indices of a recipe's first phase of each kind, conditioning and adapter (what sets a phase's memory and
    speed; phases alike but for their lengths, rates and re-noise levels are measured once)."""
    from lightning_distill.config.recipe import load_recipe

    recipe = load_recipe(path, ["fabric.devices=1", "fabric.strategy=auto", *overrides]).recipe
    seen, out = set(), []
    for phase in recipe.schedule.build().phases():
        key = (phase.kind, getattr(phase.options, "conditional", None), phase.options.adapter.name)
        if key not in seen:
            seen.add(key)
            out.append(phase.index)
    return out


def measured_rows(label: str, path: Path, overrides: list[str], indices: list[int], device: torch.device,
                  steps: int, budget: Budget, estimate: str, **kwargs: Any) -> list[dict[str, Any]]:
    rows = []
    for i in indices:
        if not budget.fits(f"{label}: phase {i}", estimate):
            continue
        try:
            rows.append({"recipe": label, **measure_phase(path, overrides, i, device, steps, **kwargs)})
        except (RuntimeError, torch.OutOfMemoryError) as err:
            if not is_oom(err):
                raise
            rows.append({"recipe": label, "phase": f"#{i}", "error": "out of memory"})
        free(device)
    return rows


def part_plan(device: torch.device, dry: bool, steps: int, budget: Budget) -> list[dict[str, Any]]:
    dryrun = DRY if dry else []
    rows = []
    for label, path, extra in (("lora_24gb.yaml", SDXL / "lora_24gb.yaml", ["train.batch_size=1"]),
                               ("full.yaml", SDXL / "full.yaml", [])):
        overrides = [*dryrun, *extra]
        indices = distinct_phases(path, overrides)
        rows += measured_rows(label, path, overrides, indices[1:2] if dry else indices, device, steps, budget, "plan")
    return rows


def _adversarial_full(path: Path, overrides: list[str]) -> int:
    from lightning_distill.config.recipe import load_recipe

    recipe = load_recipe(path, ["fabric.devices=1", "fabric.strategy=auto", *overrides]).recipe
    return next(p.index for p in recipe.schedule.build().phases()
                if p.kind == "adversarial" and p.options.adapter.name == "full")


def part_optimizers(device: torch.device, dry: bool, steps: int, budget: Budget) -> list[dict[str, Any]]:
    """The full adversarial phase: Adam eager (the reference), 8-bit Adam, compiled."""
    base = [*(DRY if dry else []), "train.batch_size=1" if dry else "train.batch_size=4"]
    path = SDXL / "full.yaml"
    index = _adversarial_full(path, base)
    rows = [{"variant": "adam, eager", **r} for r in
            measured_rows("full.yaml", path, base, [index], device, steps, budget, "optimizers")]
    if device.type == "cuda":
        rows += [{"variant": "adam8bit", **r} for r in measured_rows(
            "full.yaml", path, [*base, "optimizer.name=adam8bit"], [index], device, steps, budget, "optimizers")]
    else:
        budget.skipped.append("optimizers: adam8bit (bitsandbytes' 8-bit Adam needs CUDA)")
    if device.type == "cuda":
        rows += [{"variant": "adam, compiled", **r} for r in
                 measured_rows("full.yaml", path, base, [index], device, steps, budget, "compile", compile=True)]
    else:  # inductor's C++ build takes minutes on a CPU; the flag's code path is setup_phase's, run in parts 2 and 4
        budget.skipped.append("optimizers: compiled (dry run: compiled on a device only)")
    return rows


def part_transformers(device: torch.device, dry: bool, steps: int, budget: Budget) -> list[dict[str, Any]]:
    from lightning_distill.config.recipe import load_recipe

    rows = []
    for family in ("sd3", "flux"):
        path = ROOT / "recipes" / f"{family}_lightning" / "lora.yaml"
        overrides = [*(DRY if dry else []), "train.batch_size=1", "train.grad_accum=1"]
        recipe = load_recipe(path, ["fabric.devices=1", "fabric.strategy=auto", *overrides]).recipe
        index = next(p.index for p in recipe.schedule.build().phases() if p.kind == "adversarial")
        rows += measured_rows(f"{family} lora.yaml", path, overrides, [index], device, steps, budget, "transformers")
    return rows


# -- part 5: the tiny main job and the gpu tests ----------------------------------------------------------------
def part_tiny(device: torch.device, dry: bool, budget: Budget, out: Path) -> list[dict[str, Any]]:
    rows = []
    recipe = "recipes/debug.yaml" if dry else "recipes/tiny/lightning.yaml"  # dry: the same command, a short recipe
    if budget.fits(f"tiny: train {recipe}", "tiny"):
        begin = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "lightning_distill", "train", recipe, "--out", str(out / "tiny"),
                               f"fabric.accelerator={device.type}"], cwd=ROOT, capture_output=True, text=True)
        rows.append({"what": f"lightning-distill train {recipe}", "seconds": time.perf_counter() - begin,
                     "exit": done.returncode})
        if done.returncode:
            print(done.stderr[-3000:], file=sys.stderr)
    if budget.fits("tiny: pytest -m gpu", "pytest"):
        begin = time.perf_counter()
        # dry: collected only, from the gpu tests' folder (a CPU skips them; collecting the whole suite is slow)
        args = ["-m", "gpu", "-q", "-p", "no:cacheprovider"] + (["--collect-only", "tests/gpu"] if dry else [])
        done = subprocess.run([sys.executable, "-m", "pytest", *args], cwd=ROOT, capture_output=True, text=True)
        summary = (done.stdout.strip().splitlines() or [""])[-1]
        rows.append({"what": "pytest -m gpu" + (" --collect-only tests/gpu" if dry else ""),
                     "seconds": time.perf_counter() - begin, "exit": done.returncode, "summary": summary})
    return rows


PARTS: dict[str, tuple[str, Callable[..., list[dict[str, Any]]]]] = {
    "steps": ("GPU check 1: training step per phase (SDXL UNet, 1024 px, bf16)", part_steps),
    "plan": ("GPU check 2: measured peak against plan (SDXL recipes, one device)", part_plan),
    "optimizers": ("GPU check 3: 8-bit Adam and compile on the full adversarial phase", part_optimizers),
    "transformers": ("GPU check 4: one adversarial LoRA phase of SD3 and of Flux, one device", part_transformers),
    "tiny": ("GPU check 5: the tiny main job and the gpu tests", part_tiny),
}


def _finite(v: Any) -> Any:
    """``v`` with NaN (a figure this device does not give) as null, for strict json."""
    if isinstance(v, float) and v != v:
        return None
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_finite(x) for x in v]
    return v


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny configs, the same code paths")
    parser.add_argument("--budget", type=float, default=None, help="seconds from the start (default 470; dry 600)")
    parser.add_argument("--batch", type=int, default=8, help="part 1's first batch (halved on out-of-memory)")
    parser.add_argument("--steps", type=int, default=3, help="timed iterations per case (median)")
    parser.add_argument("--parts", nargs="*", choices=list(PARTS), help="only these parts")
    parser.add_argument("--json", default=str(ROOT / "benchmarks" / "gpu.json"))
    parser.add_argument("--out", default=str(ROOT / "runs" / "gpu-check"), help="where part 5 trains")
    parser.add_argument("--results", default=str(RESULTS), help="the RESULTS.md the tables are appended to")
    parser.add_argument("--no-record", action="store_true", help="print only: no RESULTS.md, no json")
    args = parser.parse_args(argv)
    dry = args.dry_run
    if not dry and not torch.cuda.is_available():
        parser.error("no CUDA device: run with --dry-run on a CPU")
    device = torch.device("cpu" if dry else "cuda")
    budget = Budget(args.budget if args.budget is not None else (600.0 if dry else 470.0), dry)
    batch, steps = (2, 1) if dry else (args.batch, args.steps)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # random weights cast to bf16: diffusers' advice is not for this
    RATE[0] = matmul_rate(device, torch.float32 if dry else torch.bfloat16)
    name = device_name(device) + (" (dry run: tiny configs)" if dry else "")
    command = "python benchmarks/gpu.py" + (" --dry-run" if dry else "")
    results = None if args.no_record else Path(args.results)
    report: dict[str, Any] = {"device": name, "commit": commit(), "parts": {}, "skipped": budget.skipped, "seconds": 0.0}
    with tiny_configs(dry):
        for key, (title, run) in PARTS.items():
            if args.parts and key not in args.parts:
                continue
            kwargs: dict[str, Any] = {"device": device, "dry": dry, "budget": budget}
            if key == "steps":
                kwargs.update(batch=batch, steps=steps)
            elif key == "tiny":
                kwargs.update(out=Path(args.out))
            else:
                kwargs.update(steps=steps)
            print(f"\n== {title} ({budget.left():.0f} s left)", flush=True)
            rows = run(**kwargs)
            report["parts"][key] = rows
            if rows:
                keys = list(dict.fromkeys(k for r in rows for k in r))
                rows = [{k: r.get(k, "") for k in keys} for r in rows]
                record(title, command, name, rows, results)
            report["seconds"] = time.monotonic() - START
            if not args.no_record:  # after every part: a run cut short keeps what it measured
                Path(args.json).write_text(json.dumps(_finite(report), indent=1) + "\n")
    print(f"\n{report['seconds']:.0f} s in all; skipped: {', '.join(budget.skipped) or 'nothing'}")
    return report


if __name__ == "__main__":
    main()
