"""``lightning-distill plan``: its memory figures against a measured CPU step, its counts against published ones."""

from __future__ import annotations

import ctypes
import json

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from support import DEBUG_RECIPE, ROOT, run_cli
from lightning_distill.config.recipe import load_recipe
from lightning_distill.plan.planner import example_batch, plan_phase


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                    "fsmblks", "uordblks", "fordblks", "keepcost")]


_libc = ctypes.CDLL("libc.so.6")
_libc.mallinfo2.restype = _Mallinfo2


def _allocated() -> int:
    """Bytes glibc's malloc has handed out (heap and mmapped blocks): where torch's CPU tensors live."""
    info = _libc.mallinfo2()
    return info.uordblks + info.hblkhd


class _PeakMalloc(TorchDispatchMode):
    """The most bytes allocated after any op, above the level on entry: an allocator's-eye measurement."""

    def __enter__(self):
        self.base = self.peak = _allocated()
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.peak = max(self.peak, _allocated())
        return out


def _measured_step(recipe, phases, phase) -> int:
    """A real iteration on the CPU (random weights, random batch of the plan's shapes), as the loop runs it
    (CPU autocast around prepare and each training step under ``bf16-mixed``); returns the peak bytes allocated
    above what existed before it."""
    from lightning_distill.codecs.base import Identity

    method = recipe.method.build(phases=phases, codec=Identity(), seed=0)
    modules = method.build_phase(phase, lambda index: {}, empty=True)
    for name, module in modules.items():
        module.to_empty(device="cpu")
        with torch.no_grad():
            for p in module.parameters():
                p.normal_(0, 0.02)
            for b in module.buffers():
                b.zero_() if not b.is_floating_point() else b.normal_(0, 0.02)
        if name not in phase.optimizers:
            module.requires_grad_(False).eval()
    method.attach(modules)
    trained = {n: [p for p in modules[n].parameters() if p.requires_grad] for n in phase.optimizers}
    batch = {k: (torch.randn(v.shape) if v.is_floating_point() else torch.zeros(v.shape, dtype=v.dtype))
             for k, v in example_batch(recipe, recipe.train.batch_size).items()}
    mixed = recipe.fabric.precision == "bf16-mixed"

    def autocast():
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=mixed)

    def iteration() -> None:
        with autocast():
            prepared = method.prepare(batch, phase.start)
        for name in phase.optimizers:
            for other, params in trained.items():
                for p in params:
                    p.requires_grad_(other == name)
            with autocast():
                loss, _ = method.training_step(prepared, name)
            loss.backward()
            for p in trained[name]:
                p.grad = None
            del loss

    # a first iteration initialises what a step allocates once (kernel workspaces, caches of first use), which
    # depends on the processor and on what ran before in the process; the plan models a step's tensors
    torch.manual_seed(0)
    iteration()
    torch.manual_seed(0)
    with _PeakMalloc() as mode:
        iteration()
    return mode.peak - mode.base


TINY_SDXL = ["fabric.accelerator=cpu", "fabric.devices=1", "fabric.strategy=auto", "fabric.precision=32-true",
             "train.batch_size=4", "data.resolution=256", "method.teacher.dtype=float32", "codec.name=sdxl",
             "method.discriminator.head.channels=32", "method.discriminator.head.blocks=1"]


@pytest.mark.parametrize("case", [
    ("debug mse full", DEBUG_RECIPE, ["train.batch_size=32", "data.resolution=32"], 0),
    ("debug adversarial full", DEBUG_RECIPE, ["train.batch_size=32", "data.resolution=32"], 1),
    ("debug adversarial lora", DEBUG_RECIPE, ["train.batch_size=32", "data.resolution=32",
                                             "schedule.stages.1.phases.0.adapter={name: lora, rank: 4}"], 1),
    ("tiny sdxl lora mse", "sdxl", ["method.student.gradient_checkpointing=false"], 0),
    ("tiny sdxl lora adversarial", "sdxl", ["method.student.gradient_checkpointing=false"], 1),
    ("tiny sdxl lora adversarial, checkpointing", "sdxl", ["method.student.gradient_checkpointing=true"], 1),
    ("tiny sdxl full adversarial, bf16-mixed", "sdxl full", ["fabric.precision=bf16-mixed", "train.batch_size=2",
                                                            "method.student.gradient_checkpointing=false"], 3),
], ids=lambda c: c[0])
def test_the_plans_peak_is_within_15_percent_of_a_measured_cpu_step(case, tiny_sdxl):
    _, path, overrides, index = case
    if isinstance(path, str):
        full = path == "sdxl full"
        path = ROOT / "recipes" / "sdxl_lightning" / ("full.yaml" if full else "lora.yaml")
        ranks = ["schedule.stages.1.phases.1.adapter.rank=4"] if full else ["schedule.stages.0.phases.0.adapter.rank=4"]
        overrides = [*TINY_SDXL, f"method.teacher.pretrained={tiny_sdxl['pipeline']}", *overrides, *ranks,
                     "schedule.stages.1.phases.0.adapter.rank=4"]
    recipe = load_recipe(path, overrides).recipe
    phases = recipe.schedule.build().phases()
    plan = plan_phase(recipe, phases, phases[index], device_type="cpu")  # CPU autocast's rules, as measured
    planned = (plan.parts["activations"] + plan.parts["gradients"]) * 2**30
    measured = _measured_step(recipe, phases, phases[index])
    static = (plan.parts["parameters"]) * 2**30
    assert abs(planned - measured) <= 0.15 * measured, (planned / 2**20, measured / 2**20)
    assert abs((static + planned) - (static + measured)) <= 0.15 * (static + measured)


def test_the_meter_counts_new_memory_only_and_inference_mode_flops_in_full():
    """A view of a weight (``weight.t()`` in a linear layer) is no new memory; a network run in inference mode
    (the teacher's solver) has the FLOPs torch's own counter finds when autograd decomposes its layers."""
    from diffusers import UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    from lightning_distill.plan.memory import Meter

    layer = torch.nn.Linear(1024, 1024, device="meta")
    x = torch.empty(2, 1024, device="meta", requires_grad=True)
    with Meter() as meter:
        y = layer(x)
    assert meter.now == meter.peak == 2 * 1024 * 4  # the output alone; the 4 MiB weight's transpose is a view
    del y
    assert meter.now == 0  # freed when the output goes

    with torch.device("meta"):
        unet = UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,
                                    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), sample_size=16)
    args = (torch.empty(2, 4, 16, 16, device="meta"), torch.zeros(2, device="meta"),
            torch.empty(2, 7, 32, device="meta"))
    with FlopCounterMode(display=False) as reference:
        unet(*args)
    with torch.inference_mode(), Meter() as meter:
        unet(*args)
    assert reference.get_total_flops() > 0 and meter.flops == reference.get_total_flops()


def test_autocast_on_meta_casts_as_torch_autocast_does_and_caches_trained_weights():
    from lightning_distill.plan.memory import Autocast, Meter

    conv = torch.nn.Conv2d(8, 8, 3, padding=1)
    x = torch.randn(2, 8, 4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the reference: real tensors, torch's autocast
        real = (conv(x).dtype, torch.nn.functional.mse_loss(conv(x), x).dtype)
    conv_meta = torch.nn.Conv2d(8, 8, 3, padding=1, device="meta")
    x_meta = x.to("meta")
    autocast = Autocast(torch.bfloat16, "cpu")
    with autocast.patched(), Meter() as meter, autocast.region():
        a = conv_meta(x_meta)
        cast_once = meter.now
        b = conv_meta(x_meta)
        second = meter.now
        emulated = (a.dtype, torch.nn.functional.mse_loss(a, x_meta).dtype)
    assert emulated == real == (torch.bfloat16, torch.float32)
    weights = (8 * 8 * 9 + 8) * 2  # the trained weight and bias in bf16, cast once and kept for the region
    assert cast_once - weights == a.numel() * 2 + x_meta.numel() * 2  # output and the cast input (saved)
    assert second - cast_once == b.numel() * 2 + x_meta.numel() * 2  # second call: no new weight cast
    assert meter.now == second - 8 * 2  # the region over, the bias's copy goes (backward needs only the weight)
    assert Autocast(torch.bfloat16).float32 == ("group_norm", "layer_norm", "mse_loss")


def test_fused_attention_keeps_the_math_kernel_where_a_penalty_asks_for_it():
    """Planned attention is the fused kernel, except inside ``sdpa_kernel([MATH])``, where R1/R2's double backward
    runs (the fused kernels have no second derivative): planning a regularised phase must not fail there."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from lightning_distill.models.regularizers import gradient_penalty
    from lightning_distill.plan.memory import fused_attention

    q = torch.randn(1, 2, 4, 8, device="meta", requires_grad=True)
    with fused_attention():
        out = torch.nn.functional.scaled_dot_product_attention(q, q, q)
        (grad,) = torch.autograd.grad(out.sum(), q, create_graph=True)
        with pytest.raises(RuntimeError, match="not implemented"):  # the fused kernel: no second derivative
            grad.sum().backward()
        with sdpa_kernel([SDPBackend.MATH]):
            out = torch.nn.functional.scaled_dot_product_attention(q, q, q)
        (grad,) = torch.autograd.grad(out.sum(), q, create_graph=True)
        grad.sum().backward()
        assert q.grad is not None and q.grad.shape == q.shape
        penalty = gradient_penalty(lambda x: torch.nn.functional.scaled_dot_product_attention(x, x, x).sum((1, 2, 3)),
                                   torch.randn(2, 2, 4, 8, device="meta"))
        assert penalty.shape == () and penalty.requires_grad


def test_plan_counts_sdxls_published_parameters_and_lora_shares_nothing_yet():
    """The SDXL UNet has 2,567,463,684 parameters (its published config); a LoRA phase freezes the teacher and
    the student's base copy, two of them."""
    recipe = load_recipe(ROOT / "recipes" / "sdxl_lightning" / "lora.yaml", ["train.batch_size=1"]).recipe
    phases = recipe.schedule.build().phases()
    plan = plan_phase(recipe, phases, phases[0])
    assert plan.modules["teacher"] == {"trained": 0, "frozen": 2_567_463_684}
    assert plan.modules["student"]["frozen"] == 2_567_463_684 and 0 < plan.modules["student"]["trained"] < 3e8
    assert plan.parts["activations"] > 0.1 and plan.tflop_per_sample > 6.76  # more than one UNet forward (6.76)


def test_plan_json_and_gpu_verdict(tmp_path):
    result = run_cli("plan", str(DEBUG_RECIPE), "--json", "--gpu", "4090")
    assert result.returncode == 0, result.stderr[-2000:]
    plan = json.loads(result.stdout)
    names = [p["phase"] for p in plan["phases"]]
    assert names == ["s8-mse", "s4-cond", "s4-uncond"]
    for p in plan["phases"]:
        assert set(p) >= {"phase", "params_trained", "params_frozen", "peak_gib_per_rank", "parts",
                          "tflop_per_sample", "tflop_per_step", "fits"}
        assert p["fits"] is True and abs(sum(p["parts"].values()) - p["peak_gib_per_rank"]) < 1e-2
    small = run_cli("plan", str(DEBUG_RECIPE), "--json", "--gpu-memory", "0.5", "--gpu-tflops", "10")
    assert all(p["fits"] is False for p in json.loads(small.stdout)["phases"])  # the 0.75 GiB context alone
    bad = run_cli("plan", str(DEBUG_RECIPE), "--gpu", "h1000")
    assert bad.returncode == 2 and "unknown" in bad.stderr and "h100" in bad.stderr


@pytest.mark.slow
@pytest.mark.parametrize("recipe", sorted(str(p.relative_to(ROOT)) for p in (ROOT / "recipes").rglob("*.yaml")
                                          if not p.name.startswith("_")))
def test_plan_json_runs_offline_on_every_shipped_recipe(recipe):
    result = run_cli("plan", recipe, "--json", env={"HF_HUB_OFFLINE": "1"}, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout)["phases"]


def test_a_plugin_family_is_planned_from_what_it_registers_without_building_its_codec(monkeypatch):
    """A family plugin registers its base model's published configs (``register_config``) and gives its codec's
    shapes and bytes as classmethods (``plan_shapes``, ``plan_bytes``): ``plan`` reads those, offline, and never
    builds the codec (a T5-XXL on the CPU, for a real one)."""
    from dataclasses import dataclass

    from lightning_distill import CODECS
    from lightning_distill.models import architectures
    from lightning_distill.plan.planner import _codec_bytes

    hub = "someone/tiny-transformer-family"
    monkeypatch.setitem(architectures.KNOWN, (hub, "transformer"), {
        "_class_name": "SD3Transformer2DModel", "sample_size": 4, "patch_size": 2, "in_channels": 16, "out_channels": 16,
        "num_layers": 2, "attention_head_dim": 8, "num_attention_heads": 2, "joint_attention_dim": 32,
        "caption_projection_dim": 16, "pooled_projection_dim": 64, "pos_embed_max_size": 16})
    architectures.register_config(hub, "scheduler", {"_class_name": "FlowMatchEulerDiscreteScheduler",
                                                     "num_train_timesteps": 1000, "shift": 3.0})
    monkeypatch.setitem(architectures.KNOWN, (hub, "scheduler"), architectures.KNOWN[(hub, "scheduler")])
    seen = {}

    @CODECS.register("plugin_text_for_plan", override=True)
    class PluginCodec:
        @dataclass(kw_only=True)
        class Config:
            tokens: int = 12

        def __init__(self, config):
            raise AssertionError("plan built the codec")

        @classmethod
        def plan_shapes(cls, resolution, config, net):
            seen["net"] = net["joint_attention_dim"]
            return {"latents": (16, resolution // 8, resolution // 8), "text": (config["tokens"], net["joint_attention_dim"]),
                    "pooled": (net["pooled_projection_dim"],)}

        @classmethod
        def plan_bytes(cls, config):
            return 3 * 2**30

    recipe = load_recipe(ROOT / "recipes" / "sd3_lightning" / "lora.yaml", [
        "fabric.devices=1", "fabric.strategy=auto", "train.batch_size=2", "data.resolution=64",
        f"method.teacher.pretrained={hub}", "codec={name: plugin_text_for_plan, tokens: 12}",
        "method.discriminator.head.channels=32"]).recipe
    batch = example_batch(recipe, 2)
    assert {k: tuple(v.shape) for k, v in batch.items()} == {"latents": (2, 16, 8, 8), "text": (2, 12, 32), "pooled": (2, 64)}
    assert seen["net"] == 32  # the registered config, read offline
    phases = recipe.schedule.build().phases()
    plan = plan_phase(recipe, phases, phases[1])
    assert plan.parts["codec"] == 3.0 and _codec_bytes(recipe) == 3 * 2**30
    assert plan.parts["activations"] > 0 and plan.tflop_per_sample > 0
