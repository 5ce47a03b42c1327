"""One training step of each phase on the SDXL architecture: time, samples/s, peak memory, counted FLOPs, MFU.

FLOPs are counted with ``torch.utils.flop_counter``'s formulas on the meta device, as ``lightning-distill plan``
counts them (``lightning_distill.plan.memory.Meter``; no memory, no time): the real
method's ``prepare`` (teacher solver steps) and each optimizer's ``training_step`` and backward. MFU is
counted FLOPs / (median step time × this device's measured matmul rate) in the same run.

    python benchmarks/step.py                      # SDXL UNet config, 1024 px (128×128 latents), CUDA, bf16
    python benchmarks/step.py --tiny --steps 2     # a tiny UNet on CPU (the test suite runs this)
"""

from __future__ import annotations

import argparse
import gc
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import device_name, matmul_rate, record, timed  # noqa: E402

from lightning_distill.models.sdxl.network import UNetDenoiser  # noqa: E402
from lightning_distill.models.teacher import SamplerTeacher  # noqa: E402
from lightning_distill.codecs.base import Identity  # noqa: E402
from lightning_distill.models.noise import NoiseSchedule  # noqa: E402
from lightning_distill.config.registry import TEACHERS  # noqa: E402

SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=2048,
    attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10), addition_embed_type="text_time",
    addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816, use_linear_projection=True,
)
TINY_UNET = dict(
    sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=64, attention_head_dim=(2, 4), addition_embed_type="text_time", addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=8 * 6 + 32, use_linear_projection=True,
)


@TEACHERS.register("random_unet", override=True)
class RandomUNetTeacher(SamplerTeacher):
    """A teacher with a diffusers UNet of a given architecture and random weights (benchmarks only)."""

    @dataclass(kw_only=True)
    class Config:
        unet: dict = field(default_factory=dict)
        dtype: str = "float32"

    def __init__(self, config: Config, *, seed: int = 0) -> None:
        from diffusers import UNet2DConditionModel

        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**config.unet).to(getattr(torch, config.dtype))
        super().__init__(UNetDenoiser(unet), prediction="epsilon", schedule=NoiseSchedule())


CASES = [  # name, phase kind, conditional, adapter, optimizer, gradient checkpointing
    ("mse full", "mse", True, "full", "adam", False),
    ("adv-cond full", "adversarial", True, "full", "adam", False),
    ("adv-uncond full", "adversarial", False, "full", "adam", False),
    ("adv-uncond full ckpt", "adversarial", False, "full", "adam", True),
    ("adv-uncond full 8bit", "adversarial", False, "full", "adam8bit", False),
    ("adv-cond lora", "adversarial", True, "lora", "adam", False),
    ("adv-uncond lora", "adversarial", False, "lora", "adam", False),
    ("adv-uncond lora ckpt", "adversarial", False, "lora", "adam", True),
]


def recipe_for(case: tuple, tiny: bool, batch: int) -> object:
    from lightning_distill.config.recipe import Recipe
    from lightning_distill.config.fields import validate

    name, kind, conditional, adapter, optimizer, ckpt = case
    unet = TINY_UNET if tiny else SDXL_UNET
    phase = {"kind": kind, "steps": 1000, "conditional": conditional, "lr": 1e-6, "betas": [0.0, 0.99],
             "adapter": {"name": "lora", "rank": 4 if tiny else 64} if adapter == "lora" else {"name": "full"}}
    if kind == "mse":
        phase.update(guidance=6.0, lr=1e-5, betas=[0.9, 0.999])
    tree = {
        "fabric": {"accelerator": "cpu" if tiny else "cuda", "precision": "32-true" if tiny else "bf16-mixed"},
        "train": {"batch_size": batch},
        "data": {"name": "synthetic"},
        "optimizer": {"name": optimizer},
        "method": {
            "name": "distill",
            "teacher": {"name": "random_unet", "unet": unet, "dtype": "float32" if tiny else "bfloat16"},
            "student": {"name": "copy", "prediction": "epsilon", "gradient_checkpointing": ckpt},
            "discriminator": {"name": "backbone_head", "backbone": {"name": "unet_encoder", "gradient_checkpointing": ckpt},
                              "head": {"name": "conv", "channels": 32 if tiny else 1280, "blocks": 1 if tiny else 2}},
        },
        # the paper's 8 -> 4 stage: 2 teacher steps per student step (mse: its 128 -> 32 stage, 4 steps, CFG)
        "schedule": {"name": "ladder", "stages": [{"name": "s", "teacher_steps": 128 if kind == "mse" else 8,
                                                   "student_steps": 32 if kind == "mse" else 4, "phases": [phase]}]},
    }
    return validate(tree, Recipe)


def make_batch(tiny: bool, batch: int, device: torch.device) -> dict[str, torch.Tensor]:
    size, tokens, text, pooled = (16, 16, 64, 32) if tiny else (128, 77, 2048, 1280)
    res = size * 8
    return {
        "latents": torch.randn(batch, 4, size, size, device=device),
        "text": torch.randn(batch, tokens, text, device=device),
        "pooled": torch.randn(batch, pooled, device=device),
        "time_ids": torch.tensor([[res, res, 0, 0, res, res]], dtype=torch.float32, device=device).repeat(batch, 1),
    }


def count_flops(recipe: object, tiny: bool, batch: int) -> float:
    """FLOPs of one step (prepare, then each optimizer's forward and backward), on the meta device, counted as
    ``lightning-distill plan`` counts them (attention as the fused kernel; the teacher's inference-mode layers
    decomposed, so its linear layers and convolutions count)."""
    from lightning_distill.plan.memory import Meter, fused_attention

    phases = recipe.schedule.build().phases()
    phase = phases[0]
    with torch.device("meta"):
        method = recipe.method.build(phases=phases, codec=Identity(), seed=0)
        modules = method.build_phase(phase, lambda i: {})
        for name, module in modules.items():
            if name not in phase.optimizers:
                module.requires_grad_(False)
        method.attach(modules)
        trainable = {n: [p for p in modules[n].parameters() if p.requires_grad] for n in phase.optimizers}
        b = make_batch(tiny, batch, torch.device("meta"))
        with fused_attention(), Meter() as counter:
            prepared = method.prepare(b, 0)
            for name in phase.optimizers_at(0):
                for other, params in trainable.items():  # as the loop does: gradients only where they train
                    for p in params:
                        p.requires_grad_(other == name)
                loss, _ = method.training_step(prepared, name)
                loss.backward()
        return float(counter.flops)


def run_case(case: tuple, tiny: bool, batch: int, steps: int, device: torch.device) -> dict[str, object]:
    from lightning.fabric import Fabric

    from lightning_distill.engine.artifacts import Artifacts
    from lightning_distill.engine.phase import run_iteration, setup_phase

    recipe = recipe_for(case, tiny, batch)
    # model FLOPs: counted without checkpointing, whose recomputation is overhead, not model work
    flops = count_flops(recipe_for((*case[:5], False), tiny, batch), tiny, batch)
    fabric = Fabric(accelerator=recipe.fabric.accelerator, devices=1, precision=recipe.fabric.precision)
    phases = recipe.schedule.build().phases()
    phase = phases[0]
    method = recipe.method.build(phases=phases, codec=Identity(), seed=0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    state = setup_phase(fabric, method, phase, Artifacts(Path("."), fabric, {}), recipe.optimizer)
    batch_data = make_batch(tiny, batch, device)

    def step() -> None:
        run_iteration(fabric, method, state, [batch_data], 0, 1.0)

    seconds = timed(step, device, warmup=1, iters=steps)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    rate = RATE[device.type]
    row = {"phase": case[0], "batch": batch, "step s": seconds, "samples/s": batch / seconds,
           "peak GiB": peak, "TFLOP/step": flops / 1e12, "MFU %": 100 * flops / (seconds * rate)}
    return row


def run_cases(cases: list[tuple], tiny: bool, batch: int, steps: int, device: torch.device) -> list[dict[str, object]]:
    """Each case in turn, freeing the previous case's models before the next one is built."""
    rows = []
    for case in cases:
        rows.append(run_case(case, tiny, batch, steps, device))
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


RATE: dict[str, float] = {}


def main(argv: list[str] | None = None) -> list[dict[str, object]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny UNet on CPU")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per case (median)")
    parser.add_argument("--cases", nargs="*", help="only these case names")
    parser.add_argument("--results", default=None, help="RESULTS.md to append to (default: benchmarks/RESULTS.md)")
    parser.add_argument("--no-record", action="store_true")
    parser.add_argument("--flops-only", action="store_true",
                        help="only count each phase's FLOPs on the meta device (no device needed)")
    args = parser.parse_args(argv)
    from common import RESULTS

    results = None if args.no_record else Path(args.results or RESULTS)
    command = "python benchmarks/step.py " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.flops_only:
        rows = []
        for c in (c for c in CASES if (not args.cases or c[0] in args.cases) and not c[5] and c[4] == "adam"):
            flops = count_flops(recipe_for(c, args.tiny, args.batch), args.tiny, args.batch)
            rows.append({"phase": c[0], "batch": args.batch, "TFLOP/step": flops / 1e12,
                         "TFLOP/sample": flops / 1e12 / args.batch})
        size = "tiny UNet, 128 px" if args.tiny else "SDXL UNet, 1024 px"
        record(f"Counted FLOPs per training step ({size}, meta device)", command, "meta device (no hardware)", rows, results)
        return rows
    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    if not args.tiny and device.type != "cuda":
        parser.error("the SDXL-size benchmark needs a CUDA device; use --tiny on CPU")
    RATE[device.type] = matmul_rate(device, torch.float32 if device.type == "cpu" else torch.bfloat16)
    cases = [c for c in CASES if not args.cases or c[0] in args.cases]
    if device.type == "cpu":
        cases = [c for c in cases if c[4] != "adam8bit"]  # bitsandbytes' 8-bit Adam is for CUDA
    rows = run_cases(cases, args.tiny, args.batch, args.steps, device)
    size = "tiny UNet, 128 px" if args.tiny else "SDXL UNet, 1024 px"
    record(f"Training step per phase ({size}; matmul rate {RATE[device.type] / 1e12:.3g} TFLOP/s)", command,
           device_name(device), rows, results)
    return rows


if __name__ == "__main__":
    main()
