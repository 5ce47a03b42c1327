"""Run with 2 CPU processes: train an adversarial phase under FSDP2, checkpoint, load into fresh modules, and
compare every parameter and optimizer-state tensor exactly. Writes ``RESULT.json`` on rank 0.

    python tests/helpers/fsdp_roundtrip.py OUT_DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from lightning_distill.engine.artifacts import Artifacts
from lightning_distill.engine.checkpoint import Checkpoints
from lightning_distill.engine.distributed import build_fabric, exit_together, launch
from lightning_distill.engine.phase import module_views, setup_phase
from lightning_distill.config.recipe import load_recipe

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "debug.yaml"


def _full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def snapshot(modules, optimizers):
    out = {}
    for name, opt in optimizers.items():
        for k, p in modules[name].named_parameters():
            out[f"{name}.param.{k}"] = _full(p.detach()).clone()
        for i, (p, st) in enumerate(opt.state.items()):
            for key, v in st.items():
                if torch.is_tensor(v):
                    out[f"{name}.opt.{i}.{key}"] = _full(v).clone()
    return out


def main(out_dir: Path) -> None:
    loaded = load_recipe(RECIPE, ["fabric.devices=2", "fabric.strategy=fsdp2"])
    recipe = loaded.recipe
    fabric = build_fabric(recipe.fabric, callbacks=[])
    launch(fabric)
    phases = recipe.schedule.build().phases()
    phase = phases[1]  # conditional adversarial: student and discriminator, two optimizers
    codec = fabric.to_device(recipe.codec.build())
    method = recipe.method.build(phases=phases, codec=codec, seed=recipe.seed)
    artifacts = Artifacts(out_dir / "phases", fabric, {p.index: p.name for p in phases})

    def train_a_little(modules, optimizers):
        data = recipe.data.build(seed=0)
        from torch.utils.data import default_collate

        for step in range(3):
            batch = fabric.to_device(default_collate([data[(4 * step + i + fabric.global_rank) % len(data)] for i in range(4)]))
            method.attach(module_views(modules, None))
            prepared = method.prepare(batch, phase.start + step)
            for name in phase.optimizers_at(phase.start + step):
                method.attach(module_views(modules, name))
                loss, _ = method.training_step(prepared, name)
                fabric.backward(loss)
                optimizers[name].step()
                optimizers[name].zero_grad()

    # the phase's student starts from phase 0's result: make one
    artifacts.save(0, {"student": method.build_phase(phases[0], artifacts)["student"].state_dict()})

    fabric.seed_everything(1)
    run = setup_phase(fabric, method, phase, artifacts, recipe.optimizer)
    modules, optimizers = run.modules, run.optimizers
    train_a_little(modules, optimizers)
    before = snapshot(modules, optimizers)
    state = {n: {"model": modules[n], "optimizer": o} for n, o in optimizers.items()}
    ckpts = Checkpoints(out_dir / "checkpoints", fabric, keep_last=1)
    path = ckpts.save(3, state, {"rng": None}, {"phase": phase.index})
    sharded = sorted(p.name for p in (path / "state-student").iterdir())

    fabric.seed_everything(2)  # fresh modules and optimizers, different from the trained ones
    run2 = setup_phase(fabric, method, phase, artifacts, recipe.optimizer)
    modules2, optimizers2 = run2.modules, run2.optimizers
    fresh = snapshot(modules2, optimizers2)
    ckpts.load(path, {n: {"model": modules2[n], "optimizer": o} for n, o in optimizers2.items()})
    after = snapshot(modules2, optimizers2)

    same = sorted(k for k in before if k in after and torch.equal(before[k], after[k]))
    differed_before = sum(1 for k in before if k in fresh and not torch.equal(before[k], fresh[k]))
    if fabric.is_global_zero:
        (out_dir / "RESULT.json").write_text(json.dumps({
            "keys": len(before), "equal": len(same), "missing": sorted(set(before) - set(after)),
            "differed_before_load": differed_before, "optimizer_keys": sum(".opt." in k for k in before),
            "sharded_files": sharded, "world_size": fabric.world_size,
            "param_is_dtensor": type(next(modules2["student"].parameters())).__name__,
        }, indent=1))
    exit_together(fabric)  # no interpreter finalization for gloo to abort in


if __name__ == "__main__":
    main(Path(sys.argv[1]))
