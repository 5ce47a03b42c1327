"""``lightning-distill plan``: what each phase of a recipe needs per device, before anything runs.

Every phase is built at its real size on the meta device (no weights read, no data opened; the shipped recipes'
base models from their published configs) and one training iteration is run there as the loop runs it: the
method's ``prepare`` (teacher solver steps) and, for each optimizer the phase steps, its forward and backward,
each under the recipe's autocast. From that:

- **parameters** of each module (trained, frozen) in the dtype they are held in (``*-true`` precision casts all);
- **gradients** of one optimizer's parameters (each steps and sets them to None before the next one's backward);
  **optimizer** state of all of them (Adam: two tensors like the parameters; 8-bit Adam: two bytes a parameter);
- **activations**: the peak of the bytes ops create and keep alive during the iteration (autograd's saved
  tensors, autocast's weight copies and the temporaries around them; views of weights are no new memory),
  measured op by op (:class:`~lightning_distill.plan.memory.Meter`), minus the gradients. ``bf16-mixed``
  follows CUDA autocast (:class:`~lightning_distill.plan.memory.Autocast`: matmuls and convolutions in bf16,
  norms in fp32);
- under FSDP2, parameters, gradients and optimizer state divided among the ranks, plus two gathered units (the
  largest ``fsdp_units()`` block as held, all-gathered while it runs and the next one prefetched);
- **codec**: the VAE and, unless ``codec.text_encoders`` is false, the text encoders (their published sizes);
- **rest**: 0.75 GiB of CUDA context and 5 % of the rest for allocator fragmentation (assumed, not measured);
- **TFLOP** per sample and per step, counted with ``torch.utils.flop_counter``'s formulas as
  ``benchmarks/step.py`` does (gradient checkpointing's recomputation included; attention as flash attention).

Approximate: attention is modelled as the fused flash kernel (a GPU without it, or another kernel, keeps more),
autocast's op lists are modelled for the functional layers diffusers calls (``@`` matmuls are not cast), the
per-device batch is what is planned (no data loader, text encoders or VAE unless the method runs them), and the
allocator's fragmentation is a guess. The peak of a real CPU step of small configurations, full and LoRA, with and
without checkpointing, fp32 and bf16-mixed, is within 15 % of the plan (``tests/unit/test_plan.py``).

Fast enough to run before every job: meta ops are run once per argument layout and remade after, calls without
autograd (the teacher's solver steps) once per input shape, phases that differ only in their teacher's path
share the measurement of their optimizers' steps, and groups of phases are planned on forked processes.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import multiprocessing
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lightning_distill.errors import UserError
from lightning_distill.plan.memory import Autocast, Meter, fused_attention, replay_no_grad_calls

GIB = 2**30
GPUS: dict[str, tuple[float, float]] = {
    "h100": (79.6, 989.0), "h200": (139.8, 989.0), "a100": (79.2, 312.0), "a100-40": (39.4, 312.0),
    "l40s": (44.5, 362.0), "4090": (24.0, 165.0),
}
"""Name -> (memory GiB as torch reports it, dense bf16 TFLOP/s)."""
CONTEXT_GIB = 0.75
FRAGMENTATION = 0.05
def _family_shapes(codec: str, r: int, codec_config: dict[str, Any], net: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Per-sample shapes of a family's cached batch at resolution ``r``, read off the teacher network's config
    (a fine-tune or a tiny test model has its own widths)."""
    channels = net.get("in_channels", 4)
    if codec == "flux":
        channels //= 4  # packed 2x2 into the transformer's input
    latents = (channels, r // 8, r // 8)
    if codec == "sdxl":
        pooled = net["projection_class_embeddings_input_dim"] - 6 * net["addition_time_embed_dim"]
        return {"latents": latents, "text": (77, net["cross_attention_dim"]), "pooled": (pooled,), "time_ids": (6,)}
    if codec == "sd15":
        return {"latents": latents, "text": (77, net["cross_attention_dim"])}
    tokens = codec_config.get("max_sequence_length", 256 if codec == "sd3" else 512)
    return {"latents": latents, "text": ((77 if codec == "sd3" else 0) + tokens, net["joint_attention_dim"]),
            "pooled": (net["pooled_projection_dim"],)}


FAMILIES = ("sdxl", "sd15", "sd3", "flux")
CODEC_PARAMETERS: dict[str, tuple[int, tuple[int, ...]]] = {
    "sdxl": (83_653_863, (123_060_480, 694_659_840)),  # VAE; CLIP ViT-L, OpenCLIP ViT-bigG with projection
    "sd15": (83_653_863, (123_060_480,)),
    "sd3": (83_819_683, (123_650_304, 694_659_840, 4_762_310_656)),  # 16-channel VAE; CLIP-L, CLIP-G, T5-XXL
    "flux": (83_819_683, (123_060_480, 4_762_310_656)),
}
"""Parameters of each family's codec as published: its VAE and its text encoders (the last of SD3's is T5)."""


def _codec_bytes(recipe: Any) -> int:
    """The codec's weights, resident for the whole run: the VAE (encoding uncached images, decoding previews) and
    the text encoders unless ``codec.text_encoders`` is false (data cached by ``lightning-distill cache``). A
    plugin's codec says it with ``plan_bytes(config)`` (a classmethod: nothing is built)."""
    config = recipe.codec.to_dict()
    declared = getattr(recipe.codec.component(), "plan_bytes", None)
    if declared is not None:
        return int(declared(config))
    if recipe.codec.name not in CODEC_PARAMETERS:  # a small codec of this package: built for real, counted
        return sum(p.numel() * p.element_size() for p in recipe.codec.build().parameters())
    size = {"float32": 4, "float16": 2, "bfloat16": 2}
    vae, texts = CODEC_PARAMETERS[recipe.codec.name]
    if recipe.codec.name == "sd3" and not config.get("t5", True):
        texts = texts[:2]
    text = sum(texts) if config.get("text_encoders", True) else 0
    return vae * size[config.get("vae_dtype", "float32")] + text * size[config.get("text_dtype", "float32")]


@dataclass
class PhasePlan:
    phase: str
    params_trained: int
    params_frozen: int
    parts: dict[str, float]
    """GiB per rank: parameters, gradients, optimizer, activations, rest."""
    tflop_per_sample: float
    tflop_per_step: float
    modules: dict[str, dict[str, int]] = field(default_factory=dict)
    """Per module: trained and frozen parameter counts."""
    fits: bool | None = None
    seconds_per_step: float | None = None
    teacher_tflop: float = 0.0
    """Of ``tflop_per_step``'s iteration (one micro-batch), the teacher's solver steps."""
    teacher_path: int | None = None
    """The teacher's solver steps per sample ``teacher_tflop`` is for (None: no teacher solver measured)."""

    @property
    def peak_gib_per_rank(self) -> float:
        return sum(self.parts.values())

    def to_dict(self) -> dict[str, Any]:
        return {"phase": self.phase, "params_trained": self.params_trained, "params_frozen": self.params_frozen,
                "peak_gib_per_rank": round(self.peak_gib_per_rank, 3),
                "parts": {k: round(v, 3) for k, v in self.parts.items()}, "modules": self.modules,
                "tflop_per_sample": round(self.tflop_per_sample, 3), "tflop_per_step": round(self.tflop_per_step, 3),
                "fits": self.fits, "seconds_per_step": self.seconds_per_step}


def gpu_spec(name: str | None, memory_gib: float | None, tflops: float | None) -> tuple[float, float] | None:
    """(GiB, bf16 TFLOP/s) of ``--gpu NAME`` or of ``--gpu-memory``/``--gpu-tflops``; None: no device named."""
    if name is not None:
        if name.lower() not in GPUS:
            raise UserError(f"--gpu {name}: unknown; choose one of {', '.join(GPUS)} or give --gpu-memory and --gpu-tflops")
        memory, rate = GPUS[name.lower()]
        return memory_gib or memory, tflops or rate
    if memory_gib is not None:
        return memory_gib, tflops or 0.0
    return None


def _bytes(params: list[nn.Parameter], dtype: torch.dtype | None = None) -> int:
    return sum(p.numel() * (dtype.itemsize if dtype else p.element_size()) for p in params)


def _unique(params: Any) -> list[nn.Parameter]:
    seen: dict[int, nn.Parameter] = {}
    for p in params:
        seen.setdefault(id(p), p)
    return list(seen.values())


def _largest_unit(modules: dict[str, nn.Module]) -> int:
    """Bytes of the largest FSDP2 unit (``fsdp_units()``) of any module, as held (FSDP2 gathers them so)."""
    largest = 0
    for module in modules.values():
        for unit in getattr(module, "fsdp_units", lambda: [])():
            largest = max(largest, _bytes(list(unit.parameters())))
    return largest


def example_batch(recipe: Any, batch_size: int) -> dict[str, torch.Tensor]:
    """A batch as the method receives it from cached data (latents and the codec's conditioning), on meta."""
    codec_name = recipe.codec.name
    data_config = getattr(recipe.data, "config", None)
    resolution = getattr(data_config, "resolution", None) or 1024
    declared = getattr(recipe.codec.component(), "plan_shapes", None)  # a plugin family's codec: its own shapes
    if declared is not None or codec_name in FAMILIES:
        from diffusers import UNet2DConditionModel

        from lightning_distill.models.architectures import offline_configs
        from lightning_distill.models.architectures import network_config

        teacher = recipe.method.config.teacher.config
        with offline_configs():
            net = network_config(UNet2DConditionModel, teacher.pretrained, teacher.subfolder)
        if declared is not None:
            shapes = declared(resolution, recipe.codec.to_dict(), net)
        else:
            shapes = _family_shapes(codec_name, resolution, recipe.codec.to_dict(), net)
        return {k: torch.empty(batch_size, *s, device="meta") for k, s in shapes.items()}
    # a small codec of this package (identity, minilm): encode one example for real, keep only the shapes
    from lightning_distill.codecs.base import batch_conditioning

    item = recipe.data.build(seed=recipe.seed)[0] if recipe.data.name in ("synthetic", "shapes") else None
    if item is None:
        item = {"pixels": torch.zeros(3, resolution, resolution), "caption": "a photo"}
    codec = recipe.codec.build().eval()
    one = {k: (v.unsqueeze(0) if torch.is_tensor(v) else [v]) for k, v in item.items()}
    with torch.no_grad():
        latents = one["latents"] if "latents" in one else codec.encode(one["pixels"])
        cond = batch_conditioning({k: v for k, v in one.items() if k != "pixels"} | {"latents": latents}, codec)
    out = {"latents": latents, **{k: v for k, v in cond.items() if torch.is_tensor(v)}}
    return {k: torch.empty(batch_size, *v.shape[1:], dtype=v.dtype, device="meta") for k, v in out.items()}


def _world(recipe: Any) -> tuple[int, bool]:
    f = recipe.fabric
    return f.devices * f.num_nodes, f.strategy == "fsdp2"


def _compute_dtype(precision: str) -> torch.dtype | None:
    return {"bf16-mixed": torch.bfloat16, "bf16-true": torch.bfloat16, "16-mixed": torch.float16}.get(precision)


@dataclass
class _Memo:
    """Measurements shared by the phases of one plan: calls without autograd (the teacher's solver steps) and
    the optimizers' steps, by what they depend on."""

    calls: dict[Any, Any] = field(default_factory=dict)
    steps: dict[str, tuple[int, int]] = field(default_factory=dict)
    codec: int | None = None
    """Bytes of the recipe's codec (the same in every phase)."""


def plan_phase(recipe: Any, phases: list[Any], phase: Any, memo: _Memo | None = None,
               device_type: str = "cuda") -> PhasePlan:
    """Build ``phase`` on the meta device and measure one iteration of it (``memo``: measurements of earlier
    phases of the same recipe, reused where they apply; ``device_type``: whose autocast rules mixed precision
    follows)."""
    from lightning_distill.codecs.base import Identity
    from lightning_distill.models.architectures import offline_configs
    from lightning_distill.models.teacher import SamplerTeacher

    with offline_configs():
        method = recipe.method.build(phases=phases, codec=Identity(), seed=recipe.seed)
        modules = method.build_phase(phase, lambda index: {}, empty=True)
    precision = recipe.fabric.precision
    dtype = _compute_dtype(precision)
    true = precision.endswith("-true") and dtype is not None
    if true:  # every weight held in the compute dtype
        for m in modules.values():
            m.to(dtype)
    trained = {n: _unique(p for p in modules[n].parameters() if p.requires_grad) for n in phase.optimizers}
    trained_ids = {id(p) for ps in trained.values() for p in ps}
    counts = {}
    for name, module in modules.items():
        params = _unique(module.parameters())
        n_trained = sum(p.numel() for p in trained.get(name, []))
        counts[name] = {"trained": n_trained, "frozen": sum(p.numel() for p in params) - n_trained}
    all_trained = _unique(p for ps in trained.values() for p in ps)
    frozen = [p for p in _unique(p for m in modules.values() for p in m.parameters()) if id(p) not in trained_ids]
    buffers = sum(b.numel() * b.element_size() for m in modules.values() for b in m.buffers())
    world, sharded = _world(recipe)
    shard = world if sharded else 1
    params_bytes = (_bytes(all_trained) + _bytes(frozen) + buffers) / shard
    # one optimizer's gradients at a time: each steps and sets them to None before the next one's backward
    grads_bytes = max((_bytes(ps) for ps in trained.values()), default=0) / shard
    eight_bit = recipe.optimizer.name == "adam8bit"
    optim_bytes = (2 * sum(p.numel() for p in all_trained) if eight_bit else 2 * _bytes(all_trained)) / shard
    gathered = 2 * _largest_unit(modules) if sharded and world > 1 else 0

    # one iteration on meta, as the loop runs it: autocast around prepare and each training step, backward after
    for name, module in modules.items():
        if name not in phase.optimizers:
            module.requires_grad_(False).eval()
    method.attach(modules)
    batch = example_batch(recipe, recipe.train.batch_size)
    if true:
        batch = {k: v.to(dtype) if v.is_floating_point() else v for k, v in batch.items()}
    autocast = Autocast(dtype, device_type) if dtype is not None and not true else None
    region = autocast.region if autocast is not None else nullcontext
    meter = Meter()
    memo = _Memo() if memo is None else memo
    calls = [m.denoiser if isinstance(m, SamplerTeacher) else m for m in modules.values()]
    tally: dict[int, tuple[int, int]] = {}
    torch.manual_seed(recipe.seed)  # the method draws timesteps on the CPU: the same plan every time
    with (autocast.patched() if autocast is not None else fused_attention()), meter, \
            replay_no_grad_calls(calls, meter, memo.calls, tally):
        with region():
            prepared = method.prepare(batch, phase.start)
        kept, prepare_peak, prepare_flops = meter.now, meter.peak, meter.flops  # what prepare leaves, its peak
        key = _measure_key(phase, prepare=False)
        if key not in memo.steps:  # the optimizers' steps, alike in phases that differ only in their teacher
            meter.peak, before = kept, meter.flops
            for name in phase.optimizers:  # each once, as after any warm-up
                for other, params in trained.items():
                    for p in params:
                        p.requires_grad_(other == name)
                with region():
                    loss, _ = method.training_step(prepared, name)
                loss.backward()
                for p in trained[name]:
                    p.grad = None  # the optimizer steps and zeroes before the next one
                del loss
            memo.steps[key] = (meter.peak - kept, meter.flops - before)
        rise, step_flops = memo.steps[key]
    peak = max(prepare_peak, kept + rise)
    activations = max(0, peak - grads_bytes * shard)
    if memo.codec is None:
        memo.codec = _codec_bytes(recipe)
    parts = {"parameters": params_bytes + gathered, "codec": memo.codec, "gradients": grads_bytes,
             "optimizer": optim_bytes, "activations": activations}
    parts = {k: v / GIB for k, v in parts.items()}
    parts["rest"] = CONTEXT_GIB + FRAGMENTATION * sum(parts.values())
    total_flops = float(prepare_flops + step_flops)
    solver = [tally[id(m.denoiser)] for m in modules.values() if isinstance(m, SamplerTeacher) and id(m.denoiser) in tally]
    teacher_flops, teacher_calls = sum(f for f, _ in solver), sum(c for _, c in solver)
    plan = PhasePlan(
        phase=phase.name, params_trained=sum(c["trained"] for c in counts.values()),
        params_frozen=sum(c["frozen"] for c in counts.values()), parts=parts,
        tflop_per_sample=total_flops / 1e12 / recipe.train.batch_size,
        tflop_per_step=total_flops / 1e12 * recipe.train.grad_accum, modules=counts,
        teacher_tflop=teacher_flops / 1e12, teacher_path=teacher_calls or None,
    )
    # the teacher's solver at its longest path (a batch's draw of timesteps may have asked for fewer steps)
    return _at_teacher_path(plan, _teacher_path(phase), recipe)


def _at_teacher_path(plan: PhasePlan, path: int | None, recipe: Any) -> PhasePlan:
    """``plan`` with its teacher's solver taking ``path`` steps per sample: the solver's FLOPs scale with its
    steps, nothing else differs."""
    if path is not None and plan.teacher_path and path != plan.teacher_path:
        extra = plan.teacher_tflop * (path / plan.teacher_path - 1)  # per iteration (one micro-batch)
        plan.tflop_per_sample += extra / recipe.train.batch_size
        plan.tflop_per_step += extra * recipe.train.grad_accum
        plan.teacher_tflop, plan.teacher_path = plan.teacher_tflop + extra, path
    return plan


def _teacher_path(phase: Any) -> int | None:
    """The teacher's solver steps per sample in ``phase`` (None: options without a ladder's step counts)."""
    o = phase.options
    if phase.kind == "x0_convert":
        return 1
    if not all(hasattr(o, n) for n in ("teacher_steps", "student_steps", "train_timesteps")):
        return None
    jump = o.train_timesteps // o.student_steps
    return math.ceil(jump * o.teacher_steps / o.train_timesteps)


def _measure_key(phase: Any, prepare: bool = True) -> str:
    """What sets a phase's memory and FLOPs, but for the teacher's path length (:func:`_teacher_path`, which sets
    only the FLOPs of the teacher's solver): its kind, optimizers and options, less learning rates, lengths and
    weights. ``prepare=False``: what sets the optimizers' steps alone (not the teacher's guidance either)."""
    o = phase.options
    if o is None or not dataclasses.is_dataclass(o):
        return repr((phase.kind, sorted(phase.optimizers), o)).replace(repr(phase.name), "").replace(repr(phase.stage), "")
    fields = {f.name: getattr(o, f.name) for f in dataclasses.fields(o)}
    for name in ("teacher_steps", "student_steps", "train_timesteps", "teacher_from", "student_from",
                 "renoise_weights", "renoise_weights_end"):
        fields.pop(name, None)
    if not prepare:
        fields.pop("guidance", None)
    return repr((phase.kind, sorted(phase.optimizers), sorted(fields.items())))


def plan_recipe(loaded: Any, gpu: tuple[float, float] | None = None, mfu: float = 0.4,
                progress: bool = False, workers: int | None = None) -> list[PhasePlan]:
    """A :class:`PhasePlan` per phase; phases alike in everything that sets memory and FLOPs are measured once.

    Phases whose optimizers' steps are alike are planned together (the steps measured once); such groups are
    shared among ``workers`` forked processes (default: one per core), each its own meta computation. Forking
    after CPU work in the same process can hang in OpenMP's thread pool: a caller that has computed on the CPU
    before (a notebook, a test) passes ``workers=1``; the CLI forks before any.
    ``progress``: a line on stderr per phase measured."""
    recipe = loaded.recipe
    phases = recipe.schedule.build().phases()
    groups: dict[str, list[Any]] = {}
    for phase in {_measure_key(p): p for p in reversed(phases)}.values():  # the first phase of each key
        groups.setdefault(_measure_key(phase, prepare=False), []).append(phase)
    jobs = sorted(groups.values(), key=len, reverse=True)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    workers = max(1, min(workers or cores, len(jobs)))
    lanes: list[list[Any]] = [[] for _ in range(workers)]
    for job in jobs:  # the longest groups first, each to the lane with the least work so far
        min(lanes, key=lambda lane: sum(len(j) for j in lane)).append(job)
    total = sum(len(g) for g in groups.values())
    if workers > 1 and any(getattr(getattr(p.options, "adapter", None), "name", None) == "lora" for p in phases):
        import peft.tuners.lora  # noqa: F401  # imported once before forking (it alone takes seconds)
    global _JOB
    _JOB = (recipe, phases, progress, total)
    try:
        if workers == 1:
            results = [_plan_lane(lanes[0])]
        else:
            context = multiprocessing.get_context("fork")  # the recipe and imports as they are here
            with context.Pool(workers) as pool:
                results = pool.map(_plan_lane, lanes)
    finally:
        _JOB = None
    done = {k: v for r in results for k, v in r.items()}
    plans: list[PhasePlan] = []
    for phase in phases:
        plan = _at_teacher_path(copy.deepcopy(done[_measure_key(phase)]), _teacher_path(phase), recipe)
        plan.phase = phase.name
        if gpu is not None:
            memory, rate = gpu
            plan.fits = plan.peak_gib_per_rank <= memory
            plan.seconds_per_step = round(plan.tflop_per_step / (rate * mfu), 3) if rate else None  # per rank
        plans.append(plan)
    return plans


_JOB: tuple[Any, list[Any], bool, int] | None = None
"""What the forked workers of :func:`plan_recipe` plan: recipe, phases, progress, phases to measure."""


def _plan_lane(lane: list[list[Any]]) -> dict[str, PhasePlan]:
    assert _JOB is not None
    recipe, phases, progress, total = _JOB
    memo = _Memo()
    out = {}
    for group in lane:
        for phase in group:
            started = time.perf_counter()
            out[_measure_key(phase)] = plan_phase(recipe, phases, phase, memo)
            if progress:
                print(f"plan: measured {phase.name} ({time.perf_counter() - started:.0f} s; {total} phases "
                      "to measure in all)", file=sys.stderr, flush=True)
    return out


def plan_table(plans: list[PhasePlan], gpu: tuple[float, float] | None) -> str:
    """The plan as a markdown table (GiB per rank)."""
    head = ["phase", "trained", "frozen", "params", "codec", "grads", "optim", "activ", "rest", "peak GiB",
            "TFLOP/sample"]
    if gpu is not None:
        head += ["fits", "s/step"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for p in plans:
        row = [p.phase, _count(p.params_trained), _count(p.params_frozen),
               *(f"{p.parts.get(k, 0.0):.2f}" for k in ("parameters", "codec", "gradients", "optimizer", "activations",
                                                        "rest")),
               f"{p.peak_gib_per_rank:.2f}", f"{p.tflop_per_sample:.1f}"]
        if gpu is not None:
            row += ["yes" if p.fits else "**no**", f"{p.seconds_per_step:.3g}" if p.seconds_per_step is not None else "-"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def _count(n: int) -> str:
    if n >= 1e9:
        return f"{n / 1e9:.2f} B"
    if n >= 1e6:
        return f"{n / 1e6:.1f} M"
    return f"{n / 1e3:.1f} k" if n >= 1e3 else str(n)
