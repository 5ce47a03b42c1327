"""The multi-level (LADD-style) discriminator on a UNet: one conditioned head per chosen resolution of the
encoder, trained copy or frozen teacher, and what receives gradients."""

from __future__ import annotations

import pytest
import torch

from lightning_distill.config.fields import validate
from lightning_distill.config.registry import DISCRIMINATORS, TEACHERS
from lightning_distill.errors import UserError
from lightning_distill.config.recipe import ASSETS


@pytest.fixture(scope="module")
def teacher():
    cls = TEACHERS.get("unet")
    return cls(validate({"pretrained": str(ASSETS / "tiny" / "teacher-mixed")}, cls.Config))


def _disc(teacher, conditional=True, **backbone):
    cls = DISCRIMINATORS.get("multilevel")
    config = validate({"backbone": {"name": "unet_encoder", **backbone}, "channels": 16, "groups": 8, "embed_dim": 32},
                      cls.Config)
    return cls(config, teacher=teacher, conditional=conditional)


@pytest.mark.parametrize("frozen", [False, True])
def test_heads_see_the_chosen_resolutions_and_only_what_trains_gets_gradients(teacher, frozen):
    disc = _disc(teacher, levels=[1, 2, 4], frozen=frozen)
    channels = list(teacher.denoiser.unet.config.block_out_channels)  # 16, 32, 48: level 4 is the mid block
    assert disc.backbone.level_channels == [channels[0], channels[1], channels[2]]
    x_prev, x_t = torch.randn(3, 3, 32, 32, requires_grad=True), torch.randn(3, 3, 32, 32)
    t_prev, t = torch.tensor([100, 300, 0]), torch.tensor([400, 600, 250])
    cond = {"text": torch.randn(3, 20, teacher.denoiser.unet.config.cross_attention_dim)}
    maps = disc.backbone.features(x_prev, t_prev, cond)
    assert [m.shape[1] for m in maps] == disc.backbone.level_channels
    sizes = [m.shape[-1] for m in maps]
    assert sizes == [16, 8, 8]  # the first down block halves 32 px, the second again; the mid block keeps 8
    assert [h.body[0].in_channels for h in disc.heads] == [2 * c for c in disc.backbone.level_channels]
    with torch.no_grad():  # heads away from their zero start, so the conditioning carries gradient too
        for h in disc.heads:
            h.modulation.weight.normal_(0, 0.1)
    logits = disc(x_prev, t_prev, cond, x_t, t)
    assert logits.shape == (3,)
    logits.sum().backward()
    assert x_prev.grad.abs().sum() > 0  # the generator's gradient reaches its latents
    assert all(p.grad is None for p in teacher.parameters())  # the frozen teacher gets none
    trained = dict(disc.named_parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trained.values())
    assert any(k.startswith("backbone.") for k in trained) == (not frozen)  # frozen: heads and embeddings only


def test_the_noise_level_and_the_text_change_the_logits(teacher):
    disc = _disc(teacher, conditional=False)
    with torch.no_grad():
        for h in disc.heads:
            h.modulation.weight.normal_(0, 0.1)
    x = torch.randn(2, 3, 32, 32)
    cond = {"text": torch.randn(2, 20, 384)}
    base = disc(x, torch.tensor([100, 100]), cond)
    assert not torch.allclose(base, disc(x, torch.tensor([700, 700]), cond))
    assert not torch.allclose(base, disc(x, torch.tensor([100, 100]), {"text": torch.randn(2, 20, 384)}))


def test_levels_out_of_range_are_a_clear_error(teacher):
    with pytest.raises(UserError, match="levels: each in 1 to 4"):
        _disc(teacher, levels=[0, 5])
