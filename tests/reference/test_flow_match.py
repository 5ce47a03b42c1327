"""Tier (b): the flow-matching schedule against diffusers' ``FlowMatchEulerDiscreteScheduler`` (SD3's static
shift, Flux's resolution-dependent one): the same sigmas and timesteps, the same noising, the same Euler steps."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.flux.pipeline_flux import calculate_shift

from lightning_distill.errors import UserError
from lightning_distill.inference.sampler import sample_latents
from lightning_distill.models.noise import (
    FlowMatchConfig,
    FlowMatchSchedule,
    NoiseSchedule,
    schedule_from_pretrained,
    snr_matched_timesteps,
)

FLUX = dict(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)


def diffusers_grid(scheduler: FlowMatchEulerDiscreteScheduler, n: int, like: torch.Tensor) -> None:
    """How the flow pipelines set a few-step grid: ``sigmas = linspace(1, 1/n, n)`` (and Flux's ``mu``)."""
    mu = None
    if scheduler.config.use_dynamic_shifting:
        c = scheduler.config
        seq = (like.shape[-2] // 2) * (like.shape[-1] // 2)
        mu = calculate_shift(seq, c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / n, n), mu=mu)


CASES = [  # (our config, diffusers' config, latent size)
    (FlowMatchConfig(shift=1.0), dict(shift=1.0), 16),
    (FlowMatchConfig(shift=3.0), dict(shift=3.0), 16),  # SD3
    (FlowMatchConfig(**FLUX), dict(**FLUX), 64),  # Flux at 512 px: 1024 tokens
    (FlowMatchConfig(**FLUX), dict(**FLUX), 128),  # Flux at 1024 px
]


@pytest.mark.parametrize("ours, theirs, size", CASES)
@pytest.mark.parametrize("n", [1, 2, 4, 8, 40])
def test_sigmas_and_model_times_match_diffusers(ours, theirs, size, n):
    schedule = FlowMatchSchedule(ours)
    like = torch.zeros(1, 16, size, size)
    scheduler = FlowMatchEulerDiscreteScheduler(**theirs)
    diffusers_grid(scheduler, n, like)
    ts = torch.tensor([*schedule.timesteps(n), -1])
    assert torch.allclose(schedule.sigma(ts, like).float(), scheduler.sigmas, atol=1e-6)
    assert torch.allclose(schedule.model_time(ts[:-1], like), scheduler.timesteps, atol=1e-3)  # σ·1000 in float32


def test_grids_that_do_not_divide_T_round_to_integer_timesteps():
    """32 steps of 31.25: our timesteps are rounded to the integer grid (as for discrete schedules); diffusers takes
    the same grid when given its unshifted sigmas ``(t + 1) / T``, which is how ``sample`` passes it."""
    schedule = FlowMatchSchedule(FlowMatchConfig(shift=3.0))
    ts = torch.tensor(schedule.timesteps(32))
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(sigmas=((ts + 1) / 1000).numpy())
    assert torch.allclose(schedule.sigma(ts).float(), scheduler.sigmas[:-1], atol=1e-6)
    assert ((ts + 1) / 1000 - torch.tensor(np.linspace(1, 1 / 32, 32))).abs().max() < 1e-3  # close to linspace


@pytest.mark.parametrize("ours, theirs, size", CASES)
def test_euler_steps_match_diffusers(ours, theirs, size):
    schedule = FlowMatchSchedule(ours)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, size, size, generator=g)
    scheduler = FlowMatchEulerDiscreteScheduler(**theirs)
    diffusers_grid(scheduler, 4, x)
    ts = [*schedule.timesteps(4), -1]
    ref = x.clone()
    for i, (t, t_prev) in enumerate(zip(ts[:-1], ts[1:])):
        v = torch.randn(x.shape, generator=g)
        ref = scheduler.step(v, scheduler.timesteps[i], ref).prev_sample
        x0, eps = schedule.split(v, x, torch.tensor([t, t]), "flow")
        x = schedule.step(x0, eps, torch.tensor([t_prev, t_prev]))
        assert (x - ref).abs().max() < 1e-5, i


def test_sampler_matches_a_diffusers_loop():
    """Our one sampler with a velocity network, against diffusers' scheduler driving the same network."""
    schedule = FlowMatchSchedule(FlowMatchConfig(shift=3.0))
    w = torch.randn(16, 16, generator=torch.Generator().manual_seed(1)) * 0.1

    def velocity(x, time):  # any deterministic function of x and the network's time
        return torch.einsum("oc,bchw->bohw", w, x) * (time.float()[:, None, None, None] / 1000) - 0.1 * x

    noise = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(2))
    ours = sample_latents(lambda x, t, cond: velocity(x, schedule.model_time(t, x)), schedule, "flow", noise, {}, 4)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    diffusers_grid(scheduler, 4, noise)
    x = noise.clone()
    for t in scheduler.timesteps:
        x = scheduler.step(velocity(x, t.expand(2)), t, x).prev_sample
    assert (ours - x).abs().max() < 1e-5


def test_add_noise_matches_scale_noise():
    schedule = FlowMatchSchedule(FlowMatchConfig(shift=3.0))
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)  # its training grid: t = 999 ... 0
    x0, noise = torch.randn(3, 16, 8, 8), torch.randn(3, 16, 8, 8)
    ours_t = torch.tensor([999, 500, 0])
    ref = scheduler.scale_noise(x0, scheduler.timesteps[999 - ours_t], noise)
    assert (schedule.add_noise(x0, noise, ours_t) - ref).abs().max() < 1e-5


def test_parameterisations_round_trip():
    schedule = FlowMatchSchedule(FlowMatchConfig(shift=3.0))
    x0, eps, t = torch.randn(4, 16, 4, 4), torch.randn(4, 16, 4, 4), torch.tensor([998, 600, 200, 3])
    x_t = schedule.add_noise(x0, eps, t)
    for prediction in ("flow", "epsilon", "sample"):
        got_x0, got_eps = schedule.split(schedule.target(x0, eps, t, prediction), x_t, t, prediction)
        assert torch.allclose(got_x0, x0, atol=1e-3) and torch.allclose(got_eps, eps, atol=1e-3), prediction
    assert torch.equal(schedule.add_noise(x0, eps, torch.tensor([999] * 4)), eps)  # σ = 1 at the first step
    with pytest.raises(ValueError, match="discrete"):
        schedule.split(x0, x_t, t, "v_prediction")
    with pytest.raises(ValueError, match="flow_match"):
        NoiseSchedule().split(x0, x_t, t, "flow")


def test_dynamic_shift_needs_the_size():
    schedule = FlowMatchSchedule(FlowMatchConfig(**FLUX))
    small, large = torch.zeros(1, 16, 32, 32), torch.zeros(1, 16, 128, 128)
    assert schedule.shift(small) < schedule.shift(large)  # more tokens: more time at high noise
    with pytest.raises(ValueError, match="size"):
        schedule.sigma(torch.tensor([10]))


def test_sdxl_renoise_levels_map_onto_a_flow_schedule():
    sdxl, flow = NoiseSchedule(), FlowMatchSchedule(FlowMatchConfig(shift=3.0))
    levels = [10, 250, 500, 750]
    mapped = snr_matched_timesteps(levels, sdxl, flow)
    assert mapped == sorted(mapped) and len(set(mapped)) == 4
    for t, m in zip(levels, mapped):
        assert abs(float(sdxl.log_snr(torch.tensor(t)) - flow.log_snr(torch.tensor(m)))) < 0.05


def test_schedule_is_read_from_a_flow_scheduler_folder(tmp_path):
    FlowMatchEulerDiscreteScheduler(shift=3.0).save_pretrained(tmp_path / "scheduler")
    schedule, prediction = schedule_from_pretrained(str(tmp_path))
    assert isinstance(schedule, FlowMatchSchedule) and schedule.config.shift == 3.0 and prediction == "flow"
    FlowMatchEulerDiscreteScheduler(**FLUX).save_pretrained(tmp_path / "flux")
    schedule, _ = schedule_from_pretrained(str(tmp_path), "flux")
    assert schedule.config.use_dynamic_shifting and schedule.config.max_shift == 1.15
    FlowMatchEulerDiscreteScheduler(invert_sigmas=True).save_pretrained(tmp_path / "odd")
    with pytest.raises(UserError, match="invert_sigmas"):
        schedule_from_pretrained(str(tmp_path), "odd")
