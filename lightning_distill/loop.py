"""The one generic Fabric loop. It knows phases, modules and optimizers by name; the method owns the maths."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import default_collate

from .checkpoint import Artifacts, Checkpoints, rng_state, set_rng_state
from .config import Spec
from .errors import UserError
from .data import make_loader
from .method import Method, Phase
from .recipe import Recipe

log = logging.getLogger(__name__)


def fit(
    fabric: Any, recipe: Recipe, out_dir: Path, callbacks: list[Any], on_start: Callable[[], None] = lambda: None
) -> dict[str, float]:
    """Run every phase of the recipe's schedule, resuming from the newest checkpoint in ``out_dir``.

    ``on_start`` runs once the data source opened, before any model loads. Returns the last logged metrics.
    """
    cfg = recipe.train
    phases: list[Phase] = recipe.schedule.build().phases()
    ckpts = Checkpoints(out_dir / "checkpoints", fabric, cfg.keep_last)
    artifacts = Artifacts(out_dir / "phases", fabric, {p.index: p.name for p in phases})
    ckpts.clean_partial()
    resume = ckpts.latest()
    meta = ckpts.meta(resume) if resume else {"step": 0, "phase": -1}
    if resume and meta["world_size"] != fabric.world_size:
        raise UserError(
            f"{resume} was written by {meta['world_size']} processes, this run has {fabric.world_size}; "
            "resume with the same devices x num_nodes"
        )
    step: int = meta["step"]

    dataset = recipe.data.build(seed=recipe.seed)
    on_start()
    loader = make_loader(dataset, batch_size=cfg.batch_size, num_workers=cfg.num_workers, seed=recipe.seed, fabric=fabric)
    if resume:
        loader.load_state_dict(ckpts.load_rank_state(resume)["loader"])
    batches = iter(loader)
    preview_batch = fabric.to_device(default_collate([dataset[i] for i in range(min(cfg.batch_size, len(dataset)))]))
    codec = fabric.to_device(recipe.codec.build().eval().requires_grad_(False))
    method: Method = recipe.method.build(phases=phases, codec=codec, seed=recipe.seed)
    metrics: dict[str, float] = {}

    fabric.call("on_fit_start", fabric=fabric, total_steps=phases[-1].end, start_step=step)
    for phase in phases:
        if step >= phase.end:
            continue
        fabric.seed_everything(recipe.seed + phase.index, verbose=False)  # same fresh modules on every rank
        modules, optimizers = _setup_phase(fabric, method, phase, artifacts, recipe.optimizer, cfg.compile)
        trainable = {n: [p for p in modules[n].parameters() if p.requires_grad] for n in phase.optimizers}
        state = {n: {"model": modules[n], "optimizer": o} for n, o in optimizers.items()}
        if meta["phase"] == phase.index:  # resume inside this phase
            own = ckpts.load(resume, state)  # type: ignore[arg-type]
            set_rng_state(own["rng"])
            for cb, cb_state in zip(callbacks, own["callbacks"]):
                if cb_state is not None:
                    cb.load_state_dict(cb_state)
        else:  # each rank draws its own noise
            torch.manual_seed(recipe.seed * 100_003 + phase.index * 1009 + fabric.global_rank)
        fabric.call("on_phase_start", fabric=fabric, phase=phase, modules=modules, step=step)

        while step < phase.end:
            micro = [fabric.to_device(next(batches)) for _ in range(cfg.grad_accum)]
            method.attach(_views(modules, active=None))
            with fabric.autocast():
                prepared = [method.prepare(b, step) for b in micro]
            logs: dict[str, torch.Tensor] = {}
            for name in phase.optimizers_at(step):
                logs.update(optimizer_step(fabric, method, modules, optimizers, trainable, name, prepared, cfg.clip_grad_norm))
            step += 1
            fabric.call("on_step_end", fabric=fabric, phase=phase, step=step, logs=logs, modules=modules)

            if step % cfg.log_every == 0 or step == phase.end:
                metrics = {k: float(fabric.all_reduce(v.to(fabric.device), reduce_op="mean")) for k, v in logs.items()}
                fabric.call("on_log", fabric=fabric, phase=phase, step=step, metrics=metrics)
            if (cfg.preview_every and step % cfg.preview_every == 0) or step == phase.end:
                method.attach(_views(modules, active=None))
                images = method.preview(preview_batch)
                if images is not None:
                    fabric.call("on_preview", fabric=fabric, phase=phase, step=step, images=images)
            if step % cfg.checkpoint_every == 0 or step == phase.end:
                if step == phase.end:  # before the checkpoint: a resume past this phase needs its result
                    fabric.call("on_phase_result", fabric=fabric, phase=phase, modules=modules, step=step)
                    artifacts.save(phase.index, method.artifact())
                own = {
                    "rng": rng_state(),
                    "loader": loader.state_dict(),
                    "callbacks": [cb.state_dict() if hasattr(cb, "state_dict") else None for cb in callbacks],
                }
                ckpts.save(step, state, own, {"phase": phase.index, "phase_name": phase.name})
        fabric.call("on_phase_end", fabric=fabric, phase=phase, modules=modules, step=step)
    report = getattr(dataset, "report", lambda: None)()
    if report and fabric.is_global_zero:
        log.warning("data: %s", report)
    fabric.call("on_fit_end", fabric=fabric, step=step, recipe=recipe)
    return metrics


def optimizer_step(
    fabric: Any,
    method: Method,
    modules: dict[str, nn.Module],
    optimizers: dict[str, Any],
    trainable: dict[str, list[nn.Parameter]],
    name: str,
    prepared: list[dict[str, Any]],
    clip_grad_norm: float | None,
) -> dict[str, torch.Tensor]:
    """One step of optimizer ``name`` over the iteration's micro-batches; returns what to log."""
    for other, params in trainable.items():  # gradients only into the module being stepped
        for p in params:
            p.requires_grad_(other == name)
    method.attach(_views(modules, active=name))
    module, optimizer = modules[name], optimizers[name]
    logs: dict[str, torch.Tensor] = {}
    for i, b in enumerate(prepared):
        with fabric.no_backward_sync(module, enabled=i + 1 < len(prepared)):
            with fabric.autocast():
                loss, extra = method.training_step(b, name)
            fabric.backward(loss / len(prepared))
        for k, v in extra.items():
            logs[k] = logs.get(k, 0) + v.detach().float() / len(prepared)
    if clip_grad_norm is not None:
        norm = fabric.clip_gradients(module, optimizer, max_norm=clip_grad_norm)
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # a DTensor under FSDP2
        logs[f"grad_norm/{name}"] = torch.as_tensor(norm).detach().float()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    logs[f"lr/{name}"] = torch.tensor(optimizer.param_groups[0]["lr"])
    return logs


def _setup_phase(
    fabric: Any, method: Method, phase: Phase, artifacts: Artifacts, optimizer: Spec, compile: bool = False
) -> tuple[dict[str, nn.Module], dict[str, Any]]:
    """Build the phase's modules, hand them to the strategy, and make one optimizer per trained module."""
    from .distributed import uses_wrapper

    meta_init = getattr(fabric, "meta_init", False)
    raw = method.build_phase(phase, artifacts, empty=meta_init and fabric.global_rank != 0)
    full = {name: m.state_dict() for name, m in raw.items()} if meta_init and fabric.global_rank == 0 else {}
    modules: dict[str, nn.Module] = {}
    for name, module in raw.items():
        trained = name in phase.optimizers
        if not trained:
            module.requires_grad_(False).eval()
        if compile:
            module.compile()  # in place: parameter names, and so checkpoints, are unchanged
        if trained or not uses_wrapper(fabric):
            modules[name] = fabric.setup_module(module)
        else:  # DDP refuses modules without trainable parameters: convert (bf16-true) and move frozen ones
            modules[name] = fabric.to_device(fabric.strategy.precision.convert_module(module))
    if meta_init:  # shards were materialised empty (or from rank 0's copy): fill them all from rank 0
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
        for name, module in modules.items():
            set_model_state_dict(getattr(module, "_original_module", module), full.get(name, {}), options=options)
    optimizers = {}
    for name, settings in phase.optimizers.items():
        params = [p for p in modules[name].parameters() if p.requires_grad]
        opt = optimizer.build(params, lr=settings.lr, betas=settings.betas, weight_decay=settings.weight_decay)
        optimizers[name] = fabric.setup_optimizers(opt)
    method.attach(modules)
    return modules, optimizers


def _views(modules: dict[str, nn.Module], active: str | None) -> dict[str, nn.Module]:
    """Modules as the method should call them. Under DDP the module being stepped goes through its wrapper
    (gradient sync) and the others are called unwrapped, so no wrapper waits for gradients that never come.
    Elsewhere every module is called unwrapped: FSDP2's hooks live on the modules themselves, autocast is the
    loop's, and the modules cast their own inputs, so Fabric's per-call wrapper would be pure overhead."""
    from .distributed import DDPStrategy

    ddp = any(isinstance(getattr(m, "_strategy", None), DDPStrategy) for m in modules.values())
    return {n: m if (ddp and n == active) else getattr(m, "_original_module", m) for n, m in modules.items()}
