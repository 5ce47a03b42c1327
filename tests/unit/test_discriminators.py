"""The multi-level (LADD-style) discriminator on a UNet: one conditioned head per chosen resolution of the
encoder, trained copy or frozen teacher, and what receives gradients."""

from __future__ import annotations

import math

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


def _away_from_zero(disc) -> None:
    """Move the heads' zero-initialised layers (modulation, last projection) as training would."""
    with torch.no_grad():
        for h in disc.heads:
            h.modulation.weight.normal_(0, 0.1)
            h.out.weight.normal_(0, 0.1)


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
    _away_from_zero(disc)  # so the conditioning and the layers below the projection carry gradient too
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
    _away_from_zero(disc)
    x = torch.randn(2, 3, 32, 32)
    cond = {"text": torch.randn(2, 20, 384)}
    base = disc(x, torch.tensor([100, 100]), cond)
    assert not torch.allclose(base, disc(x, torch.tensor([700, 700]), cond))
    assert not torch.allclose(base, disc(x, torch.tensor([100, 100]), {"text": torch.randn(2, 20, 384)}))


def test_levels_out_of_range_are_a_clear_error(teacher):
    with pytest.raises(UserError, match="levels: each in 1 to 4"):
        _disc(teacher, levels=[0, 5])


@pytest.mark.parametrize("name", ["multilevel", "backbone_head"])
def test_a_fresh_discriminator_is_at_chance_and_first_learns_only_what_differs(teacher, name):
    """Every logit of a fresh discriminator is 0 (no offset to unlearn), and the first gradient on its last projection
    is the mean of (features of fake - features of real) / 2 over the batch: what real and fake share cancels. With
    ``zero_init: false`` the logits start off zero and differ between samples."""
    cls = DISCRIMINATORS.get(name)
    extra = {"channels": 16, "groups": 8, "embed_dim": 32, "zero_init": True} if name == "multilevel" else {
        "head": {"name": "conv", "channels": 16, "groups": 8, "zero_init": True}}
    disc = cls(validate({"backbone": {"name": "unet_encoder"}, **extra}, cls.Config), teacher=teacher, conditional=True)
    torch.manual_seed(0)
    x_t, real = torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)
    fake = real + 0.3 * torch.randn(4, 3, 32, 32)
    t, t_prev = torch.tensor([600, 600, 400, 400]), torch.tensor([300, 300, 100, 100])
    cond = {"text": torch.randn(4, 20, 384)}
    real_logits, fake_logits = disc(real, t_prev, cond, x_t, t), disc(fake, t_prev, cond, x_t, t)
    assert torch.equal(real_logits, torch.zeros(4)) and torch.equal(fake_logits, torch.zeros(4))
    loss = -torch.nn.functional.logsigmoid(real_logits).mean() - torch.nn.functional.logsigmoid(-fake_logits).mean()
    assert loss.item() == pytest.approx(2 * math.log(2))
    loss.backward()
    out = disc.heads[0].out if name == "multilevel" else disc.head.net[-1]
    captured = []
    handle = out.register_forward_hook(lambda m, i, o: captured.append(i[0].detach()))
    with torch.no_grad():
        disc(real, t_prev, cond, x_t, t), disc(fake, t_prev, cond, x_t, t)
    handle.remove()
    f_real, f_fake = (c.mean((2, 3)) for c in captured)  # the projection's input, averaged over positions
    scale = 1 / len(disc.heads) if name == "multilevel" else 1.0  # the logits are averaged over the heads
    expected = scale * (f_fake - f_real).mean(0) / 2
    assert torch.allclose(out.weight.grad.flatten(), expected, atol=1e-6)
    assert out.bias.grad.abs().item() < 1e-7  # the offset: +1/2 and -1/2 cancel
    assert out.weight.grad.abs().sum() > 0

    # off unless asked for (the probes measured no faster accuracy from it)
    config = validate({"backbone": {"name": "unet_encoder"}}, cls.Config)
    assert (config.zero_init if name == "multilevel" else config.head.config.zero_init) is False
    default = cls(validate({"backbone": {"name": "unet_encoder"}, **(
        {**extra, "zero_init": False} if name == "multilevel" else
        {"head": {**extra["head"], "zero_init": False}})}, cls.Config), teacher=teacher, conditional=True)
    with torch.no_grad():
        logits = default(real, t_prev, cond, x_t, t)
    assert logits.abs().min() > 0 and logits.std() > 0
