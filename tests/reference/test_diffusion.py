"""Tier (b): our schedule and solver step against diffusers' schedulers (an independent implementation)."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler

from lightning_distill.models.noise import NoiseSchedule

SDXL = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


@pytest.mark.parametrize("n", [1, 2, 4, 8, 32])
def test_trailing_timesteps_match_diffusers(n):
    euler = EulerDiscreteScheduler(**SDXL, timestep_spacing="trailing")
    euler.set_timesteps(n)
    assert NoiseSchedule().timesteps(n, "trailing") == [int(t) for t in euler.timesteps]


def test_alphas_cumprod_match_diffusers():
    ddim = DDIMScheduler(**SDXL)
    assert torch.allclose(NoiseSchedule().alphas_cumprod.float(), ddim.alphas_cumprod, atol=1e-6)


@pytest.mark.parametrize("prediction", ["epsilon", "sample", "v_prediction"])
def test_ddim_step_matches_diffusers(prediction):
    ddim = DDIMScheduler(**SDXL, timestep_spacing="trailing", prediction_type=prediction, set_alpha_to_one=True,
                         clip_sample=False)
    ddim.set_timesteps(4)
    ours = NoiseSchedule()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    ts = [*ours.timesteps(4), -1]
    for t, t_prev in zip(ts[:-1], ts[1:]):
        out = torch.randn(x.shape, generator=g)
        expected = ddim.step(out, t, x).prev_sample
        x0, eps = ours.split(out, x, torch.tensor(t), prediction)
        got = ours.step(x0, eps, torch.tensor(t_prev))
        assert torch.allclose(got, expected, atol=1e-5), (t, (got - expected).abs().max())
        x = expected


@pytest.mark.parametrize("prediction", ["epsilon", "sample"])
def test_euler_trailing_equals_our_step_in_sigma_space(prediction):
    euler = EulerDiscreteScheduler(**SDXL, timestep_spacing="trailing", prediction_type=prediction)
    euler.set_timesteps(4)
    ours = NoiseSchedule()
    g = torch.Generator().manual_seed(1)
    x_sigma = torch.randn(2, 4, 8, 8, generator=g) * euler.init_noise_sigma
    ts = [*ours.timesteps(4), -1]
    for i, (t, t_prev) in enumerate(zip(ts[:-1], ts[1:])):
        out = torch.randn(x_sigma.shape, generator=g)
        expected = euler.step(out, euler.timesteps[i], x_sigma).prev_sample
        # Euler works on x / sqrt(ᾱ); the network sees the variance-preserving x_t
        a_t = ours.alpha_bar(torch.tensor(t)).float()
        x_t = x_sigma * a_t.sqrt()
        x0, eps = ours.split(out, x_t, torch.tensor(t), prediction)
        got = ours.step(x0, eps, torch.tensor(t_prev)) / ours.alpha_bar(torch.tensor(t_prev)).float().sqrt()
        assert torch.allclose(got, expected, atol=1e-4, rtol=1e-5), (t, (got - expected).abs().max())
        x_sigma = expected


def test_pure_noise_swap_only_at_the_last_timestep():
    ours = NoiseSchedule()
    x0, noise = torch.ones(3, 1, 2, 2), torch.randn(3, 1, 2, 2)
    t = torch.tensor([999, 998, 0])
    x = ours.add_noise(x0, noise, t, pure_noise_at_T=True)
    assert torch.equal(x[0], noise[0])
    assert not torch.equal(x[1], noise[1])
    plain = ours.add_noise(x0, noise, t)
    assert not torch.equal(plain[0], noise[0])  # inference keeps the original ᾱ


@pytest.mark.parametrize("prediction", ["epsilon", "sample", "v_prediction"])
def test_parameterisations_round_trip(prediction):
    ours = NoiseSchedule()
    g = torch.Generator().manual_seed(2)
    x0, eps = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)
    t = torch.tensor([10, 250, 500, 999])
    x_t = ours.add_noise(x0, eps, t)
    got_x0, got_eps = ours.split(ours.target(x0, eps, t, prediction), x_t, t, prediction)
    assert torch.allclose(got_x0, x0, atol=1e-4) and torch.allclose(got_eps, eps, atol=1e-4)
