"""The one generic Fabric loop. It knows phases, modules and optimizers by name; the method owns the maths."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import default_collate

from lightning_distill.engine.artifacts import Artifacts
from lightning_distill.engine.checkpoint import Checkpoints, rng_state, set_rng_state
from lightning_distill.errors import Diverged, UserError
from lightning_distill.engine.loader import make_loader
from lightning_distill.engine.phase import all_finite, module_views, run_iteration, setup_phase
from lightning_distill.methods.base import Method, Phase
from lightning_distill.config.recipe import Recipe

log = logging.getLogger(__name__)


def phase_stream_seed(seed: int, index: int) -> int:
    """The seed of phase ``index``'s own stream of batches (``train.data_stream: phase``)."""
    return seed * 10_007 + index + 1


def reduce_logs(fabric: Any, logs: dict[str, torch.Tensor], weights: dict[str, str]) -> dict[str, float]:
    """Each log averaged over the ranks; one named in ``weights`` (:attr:`Method.log_weights`) pooled by the log of
    its share instead, 0 where no rank has any. Every rank calls this with the same keys (collectives in order)."""
    out = {}
    for key, value in logs.items():
        share = logs.get(weights.get(key, ""))
        if share is not None and fabric.world_size > 1:
            total = fabric.all_reduce((value * share).to(fabric.device), reduce_op="sum")
            shares = fabric.all_reduce(share.to(fabric.device), reduce_op="sum")
            out[key] = float(total / shares) if float(shares) > 0 else 0.0
        else:
            out[key] = float(fabric.all_reduce(value.to(fabric.device), reduce_op="mean"))
    return out


def fit(
    fabric: Any, recipe: Recipe, out_dir: Path, callbacks: list[Any], on_start: Callable[[], None] = lambda: None
) -> dict[str, float]:
    """Run every phase of the recipe's schedule, resuming from the newest checkpoint in ``out_dir``.

    ``on_start`` runs once the data source and the codec opened, before any model loads. Returns the last logged
    metrics.
    """
    cfg = recipe.train
    phases: list[Phase] = recipe.schedule.build().phases()
    ckpts = Checkpoints(out_dir / "checkpoints", fabric, cfg.keep_last)
    artifacts = Artifacts(out_dir / "phases", fabric, {p.index: p.name for p in phases})
    ckpts.clean_partial()

    def finished_phases_intact(path: Path) -> str | None:  # a checkpoint past a phase needs that phase's result
        done = Checkpoints.meta(path)["step"]
        return next((p for p in (artifacts.damage(ph.index) for ph in phases if ph.end <= done) if p), None)

    resume = ckpts.latest_intact(finished_phases_intact)
    meta = ckpts.meta(resume) if resume else {"step": 0, "phase": -1}
    if resume and meta["world_size"] != fabric.world_size:
        raise UserError(
            f"{resume} was written by {meta['world_size']} processes, this run has {fabric.world_size}; "
            "resume with the same devices x num_nodes"
        )
    step: int = meta["step"]

    dataset = recipe.data.build(seed=recipe.seed)
    # decoded before anything is written: data none of which decodes stops the run with the folder as it was
    preview_batch = fabric.to_device(default_collate([dataset[i] for i in range(min(cfg.batch_size, len(dataset)))]))
    codec = fabric.to_device(recipe.codec.build().eval().requires_grad_(False))
    if hasattr(dataset, "check_codec"):  # cached encodings must hold all the codec gives, before anything is written
        dataset.check_codec(codec, fabric.device)
    on_start()

    def open_stream(seed: int, state: dict | None = None) -> tuple[Any, Any]:
        loader = make_loader(dataset, batch_size=cfg.batch_size, num_workers=cfg.num_workers, seed=seed, fabric=fabric)
        if state is not None:
            loader.load_state_dict(state)
        return loader, iter(loader)

    per_phase = cfg.data_stream == "phase"
    if not per_phase:  # one stream through the run, resumed where the checkpoint left it
        loader, batches = open_stream(recipe.seed, ckpts.load_rank_state(resume)["loader"] if resume else None)
    method: Method = recipe.method.build(phases=phases, codec=codec, seed=recipe.seed)
    metrics: dict[str, float] = {}

    fabric.call("on_fit_start", fabric=fabric, total_steps=phases[-1].end, start_step=step)
    try:
        for phase in phases:
            if step >= phase.end:
                continue
            fabric.seed_everything(recipe.seed + phase.index, verbose=False)  # same fresh modules on every rank
            run = setup_phase(fabric, method, phase, artifacts, recipe.optimizer, cfg.compile)
            modules, state = run.modules, run.checkpoint_state()
            skipped = 0  # optimizer steps skipped as non-finite in this phase (train.on_nonfinite: skip)
            own = ckpts.load(resume, state) if meta["phase"] == phase.index else None  # type: ignore[arg-type]
            if per_phase:  # the phase's own stream (its batches do not depend on the phases before it), opened
                # before the phase's random state is set: an iterator draws its base seed from the global generator
                loader = batches = None  # the last phase's workers go first
                loader, batches = open_stream(phase_stream_seed(recipe.seed, phase.index), own["loader"] if own else None)
            if own is not None:  # resume inside this phase
                set_rng_state(own["rng"])
                skipped = own.get("skipped", 0)
                for cb, cb_state in zip(callbacks, own["callbacks"]):
                    if cb_state is not None:
                        cb.load_state_dict(cb_state)
            else:  # each rank draws its own noise
                torch.manual_seed(recipe.seed * 100_003 + phase.index * 1009 + fabric.global_rank)
            fabric.call("on_phase_start", fabric=fabric, phase=phase, modules=modules, step=step)

            while step < phase.end:
                micro = [fabric.to_device(next(batches)) for _ in range(cfg.grad_accum)]
                logs = run_iteration(fabric, method, run, micro, step, cfg.clip_grad_norm, cfg.on_nonfinite)
                step += 1
                for name in [k.removeprefix("skipped/") for k in logs if k.startswith("skipped/")]:
                    skipped += 1
                    if fabric.is_global_zero:
                        log.warning("phase %r step %d: skipped the step of %r (non-finite loss or gradient); "
                                    "%d of at most %d in this phase", phase.name, step, name, skipped, cfg.max_skipped_steps)
                    if skipped > cfg.max_skipped_steps:
                        raise Diverged(
                            f"phase {phase.name!r} step {step}: {skipped} optimizer steps skipped as non-finite, more than "
                            f"train.max_skipped_steps ({cfg.max_skipped_steps}); stopped before any save, so the newest "
                            "checkpoint holds the last finite weights. Lower the phase's lr or set train.clip_grad_norm"
                        )
                fabric.call("on_step_end", fabric=fabric, phase=phase, step=step, logs=logs, modules=modules)

                if step % cfg.log_every == 0 or step == phase.end:
                    metrics = reduce_logs(fabric, logs, method.log_weights)
                    fabric.call("on_log", fabric=fabric, phase=phase, step=step, metrics=metrics)
                if (cfg.preview_every and step % cfg.preview_every == 0) or step == phase.end:
                    method.attach(module_views(modules, active=None))
                    images = method.preview(preview_batch)
                    if images is not None:
                        fabric.call("on_preview", fabric=fabric, phase=phase, step=step, images=images)
                if step % cfg.checkpoint_every == 0 or step == phase.end:
                    trained = [p for name in run.optimizers for p in modules[name].parameters()]
                    if not all_finite(fabric, trained):  # an optimizer step overflowed: never save such weights
                        raise Diverged(
                            f"phase {phase.name!r} step {step}: the trained weights are not finite; nothing was saved, so "
                            "the newest checkpoint holds the last finite weights. Lower the phase's lr, then run the "
                            "same command to resume"
                        )
                    if step == phase.end:  # before the checkpoint: a resume past this phase needs its result
                        fabric.call("on_phase_result", fabric=fabric, phase=phase, modules=modules, step=step)
                        artifacts.save(phase.index, method.artifact(), method.facts(phase))
                    own = {
                        "rng": rng_state(),
                        "loader": loader.state_dict(),
                        "callbacks": [cb.state_dict() if hasattr(cb, "state_dict") else None for cb in callbacks],
                        "skipped": skipped,
                    }
                    ckpts.save(step, state, own, {"phase": phase.index, "phase_name": phase.name})
            fabric.call("on_phase_end", fabric=fabric, phase=phase, modules=modules, step=step)
    except Diverged as err:  # callbacks flush what they hold (TensorBoard), then the CLI says why
        fabric.call("on_fit_abort", fabric=fabric, step=step, error=err)
        raise
    report = getattr(dataset, "report", lambda: None)()
    if report and fabric.is_global_zero:
        log.warning("data: %s", report)
    fabric.call("on_fit_end", fabric=fabric, step=step, recipe=recipe)
    return metrics


