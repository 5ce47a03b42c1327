"""One phase as the loop, the tests and the benchmarks run it: set its modules and optimizers up with the
strategy (:func:`setup_phase`), call them as the method should (:func:`module_views`), and step one optimizer
over an iteration's micro-batches (:func:`optimizer_step`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lightning_distill.config.fields import Spec
from lightning_distill.engine.artifacts import Artifacts
from lightning_distill.errors import Diverged
from lightning_distill.methods.base import Method, Phase


@dataclass
class PhaseState:
    """A phase's modules after the strategy set them up, and one optimizer per trained module."""

    phase: Phase
    modules: dict[str, nn.Module]
    optimizers: dict[str, Any]
    trainable: dict[str, list[nn.Parameter]]
    """Per optimizer, the parameters it trains (read at set-up, before steps toggle ``requires_grad``)."""

    def checkpoint_state(self) -> dict[str, dict[str, Any]]:
        """What a checkpoint saves per trained module: ``{"model": module, "optimizer": optimizer}``."""
        return {n: {"model": self.modules[n], "optimizer": o} for n, o in self.optimizers.items()}


def setup_phase(
    fabric: Any, method: Method, phase: Phase, artifacts: Artifacts, optimizer: Spec, compile: bool = False
) -> PhaseState:
    """Build the phase's modules, hand them to the strategy, and make one optimizer per trained module."""
    from lightning_distill.engine.distributed import uses_wrapper

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
    trainable = {name: [p for p in modules[name].parameters() if p.requires_grad] for name in phase.optimizers}
    optimizers = {}
    for name, settings in phase.optimizers.items():
        opt = optimizer.build(trainable[name], lr=settings.lr, betas=settings.betas, weight_decay=settings.weight_decay)
        optimizers[name] = fabric.setup_optimizers(opt)
    method.attach(modules)
    return PhaseState(phase, modules, optimizers, trainable)


def module_views(modules: dict[str, nn.Module], active: str | None) -> dict[str, nn.Module]:
    """Modules as the method should call them. Under DDP the module being stepped goes through its wrapper
    (gradient sync) and the others are called unwrapped, so no wrapper waits for gradients that never come.
    Elsewhere every module is called unwrapped: FSDP2's hooks live on the modules themselves, autocast is the
    loop's, and the modules cast their own inputs, so Fabric's per-call wrapper would be pure overhead."""
    from lightning_distill.engine.distributed import DDPStrategy

    ddp = any(isinstance(getattr(m, "_strategy", None), DDPStrategy) for m in modules.values())
    return {n: m if (ddp and n == active) else getattr(m, "_original_module", m) for n, m in modules.items()}


def prepare(fabric: Any, method: Method, state: PhaseState, micro: list[dict[str, Any]], step: int) -> list[dict[str, Any]]:
    """The method's shared per-iteration work (encoding, noise, teacher targets) on each micro-batch."""
    method.attach(module_views(state.modules, active=None))
    with fabric.autocast():
        return [method.prepare(b, step) for b in micro]


def all_finite(fabric: Any, tensors: list[torch.Tensor | None]) -> bool:
    """Whether every tensor is finite on every rank: one max-abs norm per tensor (its local shard under FSDP2;
    it overflows for no finite value, unlike a 2-norm in fp16) and one all-reduce, so all ranks agree."""
    local = [t.to_local() if hasattr(t, "to_local") else t for t in tensors if t is not None]
    local = [t.detach() for t in local if t.numel()]
    bad = torch.zeros((), device=fabric.device)
    if local:
        norms = torch.stack([n.float() for n in torch._foreach_norm(local, float("inf"))])
        bad = (~torch.isfinite(norms)).any().float().to(fabric.device)
    if fabric.world_size > 1:
        bad = fabric.all_reduce(bad, reduce_op="sum")
    return not bool(bad)


def optimizer_step(
    fabric: Any, method: Method, state: PhaseState, name: str, prepared: list[dict[str, Any]],
    clip_grad_norm: float | None, on_nonfinite: str = "stop", step: int | None = None,
) -> dict[str, torch.Tensor]:
    """One step of optimizer ``name`` over the iteration's micro-batches; returns what to log.

    A non-finite loss or gradient (on any rank) raises :class:`Diverged` before the optimizer steps
    (``on_nonfinite="stop"``), or skips the step and logs ``skipped/NAME`` = 1 (``"skip"``)."""
    for other, params in state.trainable.items():  # gradients only into the module being stepped
        for p in params:
            p.requires_grad_(other == name)
    method.attach(module_views(state.modules, active=name))
    module, optimizer = state.modules[name], state.optimizers[name]
    logs: dict[str, torch.Tensor] = {}
    total = torch.zeros((), device=fabric.device)
    for i, b in enumerate(prepared):
        with fabric.no_backward_sync(module, enabled=i + 1 < len(prepared)):
            with fabric.autocast():
                loss, extra = method.training_step(b, name)
            fabric.backward(loss / len(prepared))
        total = total + loss.detach().float() / len(prepared)
        for k, v in extra.items():
            logs[k] = logs.get(k, 0) + v.detach().float() / len(prepared)
    loss_ok = all_finite(fabric, [total])
    if not (loss_ok and all_finite(fabric, [p.grad for p in state.trainable[name]])):
        optimizer.zero_grad(set_to_none=True)
        what = "gradient" if loss_ok else "loss"
        if on_nonfinite == "skip":
            return {f"skipped/{name}": torch.ones(())}
        at = f" step {step}" if step is not None else ""
        raise Diverged(
            f"phase {state.phase.name!r}{at}: the {what} of {name!r} is not finite"
            f"{'' if loss_ok else f' ({float(total):.4g})'}; stopped before the optimizer "
            "step and before any save, so the newest checkpoint holds the last finite weights. Lower the phase's "
            "lr or set train.clip_grad_norm, then run the same command to resume, or set train.on_nonfinite=skip "
            "to skip such steps"
        )
    if clip_grad_norm is not None:
        norm = fabric.clip_gradients(module, optimizer, max_norm=clip_grad_norm)
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # a DTensor under FSDP2
        logs[f"grad_norm/{name}"] = torch.as_tensor(norm).detach().float()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    logs[f"lr/{name}"] = torch.tensor(optimizer.param_groups[0]["lr"])
    return logs


def run_iteration(
    fabric: Any, method: Method, state: PhaseState, micro: list[dict[str, Any]], step: int, clip_grad_norm: float | None,
    on_nonfinite: str = "stop",
) -> dict[str, torch.Tensor]:
    """One training iteration at global ``step``: prepare the micro-batches, then step each optimizer the phase
    steps there, in order. Returns what to log (``skipped/NAME`` for a step skipped as non-finite)."""
    prepared = prepare(fabric, method, state, micro, step)
    logs: dict[str, torch.Tensor] = {}
    for name in state.phase.optimizers_at(step):
        logs.update(optimizer_step(fabric, method, state, name, prepared, clip_grad_norm, on_nonfinite, step + 1))
    return logs
