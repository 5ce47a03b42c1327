"""The adversarial method's stabilisers and the mixed-caption world: pure schedule and mapping tests."""

from __future__ import annotations

import pytest
import torch

from lightning_distill.config.recipe import load_recipe
from lightning_distill.engine.artifacts import Artifacts
from lightning_distill.errors import UserError
from lightning_distill.models.noise import NoiseSchedule, NoiseScheduleConfig, snr_matched_timesteps
from lightning_distill.worlds.shapes.world import COLORS, KINDS, POSITIONS, SIZES, WHERE, Shapes
from support import DEBUG_RECIPE


def _phases(*overrides):
    return load_recipe(DEBUG_RECIPE, list(overrides)).recipe.schedule.build().phases()


def test_warmup_and_several_discriminator_steps_per_student_step():
    phases = _phases("schedule.stages.1.phases.0.steps=10", "schedule.stages.1.phases.0.discriminator_warmup=3",
                     "schedule.stages.1.phases.0.student_every=2")
    phase = phases[1]
    steps = {i: phase.optimizers_at(phase.start + i) for i in range(phase.steps)}
    assert all(steps[i] == ["discriminator"] for i in range(3))  # warm-up: the discriminator alone
    assert [i for i in range(10) if "student" in steps[i]] == [3, 5, 7, 9]  # then every second iteration
    assert all("discriminator" in s for s in steps.values())  # the discriminator steps on every iteration
    assert all(s.index("discriminator") == 0 for s in steps.values())  # and before the student
    plain = _phases()[1]
    assert all(plain.optimizers_at(plain.start + i) == ["discriminator", "student"] for i in range(plain.steps))


def test_warmup_is_refused_where_it_cannot_apply():
    with pytest.raises(UserError, match="adversarial phases only"):
        _phases("schedule.stages.0.phases.0.discriminator_warmup=2")
    with pytest.raises(UserError, match="leaves the student no step"):
        _phases("schedule.stages.1.phases.0.discriminator_warmup=4")


def test_sdxl_renoise_levels_map_to_the_same_snr_on_the_tiny_schedule():
    sdxl = NoiseSchedule(NoiseScheduleConfig())
    tiny = NoiseSchedule(NoiseScheduleConfig(beta_schedule="linear", beta_start=0.0001, beta_end=0.02))
    mapped = snr_matched_timesteps([10, 250, 500, 750], sdxl, tiny)
    for got, want in zip(mapped, [26, 194, 353, 531]):
        assert abs(got - want) <= 0.01 * 1000, (mapped, want)

    def snr(s, t):
        a = s.alpha_bar(torch.tensor(t)).double()
        return float(a / (1 - a))

    for t_ref, t in zip([10, 250, 500, 750], mapped):  # the nearest grid point: no neighbour is closer in log-SNR
        target = torch.tensor(snr(sdxl, t_ref)).log()
        here = abs(torch.tensor(snr(tiny, t)).log() - target)
        assert here <= abs(torch.tensor(snr(tiny, t - 1)).log() - target)
        assert here <= abs(torch.tensor(snr(tiny, t + 1)).log() - target)
    assert snr_matched_timesteps([10, 250], sdxl, sdxl) == [10, 250]  # the identity on the same schedule


def _fake_artifacts(tmp_path, phases):
    artifacts = Artifacts(tmp_path, None, {p.index: p.name for p in phases})
    artifacts.fabric = type("F", (), {"is_global_zero": True, "barrier": lambda self: None})()
    return artifacts


@pytest.mark.parametrize("keep", [True, False])
def test_the_discriminator_carries_over_within_a_stage(tmp_path, keep):
    loaded = load_recipe(DEBUG_RECIPE, [f"method.keep_discriminator={str(keep).lower()}"])
    recipe = loaded.recipe
    phases = recipe.schedule.build().phases()
    method = recipe.method.build(phases=phases, codec=recipe.codec.build(), seed=0)
    artifacts = _fake_artifacts(tmp_path, phases)
    method.attach(method.build_phase(phases[0], artifacts))
    method.phase = phases[0]
    artifacts.save(0, method.artifact())
    torch.manual_seed(1)
    modules = method.build_phase(phases[1], artifacts)  # conditional
    with torch.no_grad():
        for p in modules["discriminator"].parameters():
            p.add_(0.5)  # "trained"
    method.attach(modules)
    saved = method.artifact()
    assert ("discriminator" in saved) == keep
    artifacts.save(1, saved)
    torch.manual_seed(2)
    second = method.build_phase(phases[2], artifacts)["discriminator"]  # unconditional: its head is new
    first = modules["discriminator"].state_dict()
    state = second.state_dict()
    backbone = [k for k in state if k.startswith("backbone.")]
    assert backbone and all(torch.equal(state[k], first[k]) == keep for k in backbone)
    assert not any(torch.equal(state[k], first[k]) for k in state if k.startswith("head.") and k in first
                   and state[k].shape == first[k].shape and state[k].numel() > 1)


def test_mixed_captions_name_only_true_attributes_and_flag_them():
    world = Shapes(Shapes.Config(size=400, captions="mixed"))
    levels = set()
    for i in range(400):
        item = world[i]
        names = [list(d)[k] for d, k in zip((COLORS, KINDS, POSITIONS, SIZES), item["attributes"])]
        text, mentioned = item["caption"], item["mentioned"].tolist()
        words = (names[0], names[1], WHERE[names[2]], names[3])
        for word, said in zip(words, mentioned):
            assert (word in text) == said, (text, words, mentioned)
        for other in [*COLORS, *KINDS, *SIZES, *WHERE.values()]:  # nothing false is named
            if other in text:
                assert other in words, (text, other)
        levels.add(sum(mentioned))
    assert levels == {0, 1, 2, 3, 4}  # from "a shape" to the full description
    full = Shapes(Shapes.Config(size=50))
    assert all(full[i]["mentioned"].all() for i in range(50))
