"""Run with 2 CPU processes: the multi-level discriminator on frozen SD3 features, first unsharded, then with the
teacher and the discriminator sharded by FSDP2 as the training loop shards them; writes ``RESULT.json`` (the
largest differences of the logits and of the latents' gradient) on rank 0.

    python tests/helpers/ladd_fsdp.py OUT_DIR TINY_SD3_PIPELINE
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from lightning_distill.config.fields import validate
from lightning_distill.config.recipe import FabricConfig
from lightning_distill.config.registry import DISCRIMINATORS, TEACHERS
from lightning_distill.engine.distributed import build_fabric, exit_together, launch


def main(out_dir: Path, pipeline: str) -> None:
    fabric = build_fabric(validate({"accelerator": "cpu", "devices": 2, "strategy": "fsdp2"}, FabricConfig), [])
    launch(fabric)
    torch.manual_seed(0)  # the same modules on every rank
    cls = TEACHERS.get("sd3")
    teacher = cls(validate({"pretrained": pipeline}, cls.Config)).requires_grad_(False).eval()
    disc_cls = DISCRIMINATORS.get("multilevel")
    config = validate({"backbone": {"name": "frozen_features", "blocks": [1]}, "channels": 16, "groups": 8,
                       "embed_dim": 32}, disc_cls.Config)
    disc = disc_cls(config, teacher=teacher, conditional=True)
    with torch.no_grad():  # heads away from their zero start, so the conditioning matters
        for p in disc.parameters():
            p.add_(0.05 * torch.randn_like(p))
    g = torch.Generator().manual_seed(1)
    x_prev, x_t = torch.randn(2, 16, 8, 8, generator=g), torch.randn(2, 16, 8, 8, generator=g)
    t_prev, t = torch.tensor([300, 100]), torch.tensor([999, 500])
    net = teacher.denoiser.transformer.config
    cond = {"text": torch.randn(2, 7, net.joint_attention_dim, generator=g),
            "pooled": torch.randn(2, net.pooled_projection_dim, generator=g)}

    def judge() -> tuple[torch.Tensor, torch.Tensor]:
        x = x_prev.clone().requires_grad_(True)
        logits = disc(x, t_prev, cond, x_t, t)
        (grad,) = torch.autograd.grad(logits.sum(), x)
        return logits.detach(), grad

    one_logits, one_grad = judge()
    fabric.setup_module(teacher)  # sharded in place, as the loop sets up frozen modules
    fabric.setup_module(disc)
    teacher(x_t, torch.stack([t, t_prev], dim=1), cond)  # as in training: the teacher's root runs first
    logits, grad = judge()
    if fabric.is_global_zero:
        (out_dir / "RESULT.json").write_text(json.dumps({
            "world_size": fabric.world_size,
            "teacher_is_dtensor": any(type(p).__name__ == "DTensor" for p in teacher.parameters()),
            "logits_diff": float((logits - one_logits).abs().max()),
            "grad_diff": float((grad - one_grad).abs().max()),
        }))
    exit_together(fabric)  # no interpreter finalization for gloo to abort in


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
