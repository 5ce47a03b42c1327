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


def _described(predicted, attributes, mentioned):
    from lightning_distill.eval.metrics import Described

    n = predicted.shape[0]
    return Described(torch.zeros(n, 2), torch.zeros(n, 2), predicted, attributes, mentioned)


def test_diversity_is_one_on_real_scenes_and_low_when_modes_collapse():
    from lightning_distill.eval.metrics import Adherence, Diversity

    world = Shapes(Shapes.Config(size=600, captions="mixed", split="all"))
    items = [world[i] for i in range(600)]
    attributes = torch.stack([it["attributes"] for it in items])
    mentioned = torch.stack([it["mentioned"] for it in items])
    real = _described(attributes, attributes, mentioned)
    diversity = Diversity(Diversity.Config())
    assert diversity(real, real) == pytest.approx(1.0)
    # a model that draws the named attributes right and always the same value for the open ones
    collapsed = torch.where(mentioned, attributes, torch.zeros_like(attributes))
    fake = _described(collapsed, attributes, mentioned)
    assert diversity(fake, real) < 0.05
    assert Adherence(Adherence.Config())(fake, real) == 1.0  # the named attributes are right
    # a model that keeps two of the values it should vary: in between
    halved = torch.where(mentioned, attributes, attributes % 2)
    assert 0.2 < diversity(_described(halved, attributes, mentioned), real) < 0.9
    with pytest.raises(UserError, match="leave attributes open"):
        diversity(_described(attributes, attributes, None), real)


def test_adherence_counts_only_the_attributes_a_caption_names():
    from lightning_distill.eval.metrics import Adherence

    attributes = torch.tensor([[0, 1, 2, 1], [3, 2, 4, 0]])
    predicted = torch.tensor([[0, 1, 0, 0], [3, 0, 4, 0]])  # wrong where the captions are silent, and one named
    mentioned = torch.tensor([[True, True, False, False], [True, True, False, True]])
    adherence = Adherence(None)
    assert adherence(_described(predicted, attributes, mentioned), None) == pytest.approx(4 / 5)
    assert adherence(_described(predicted, attributes, None), None) == pytest.approx(5 / 8)


def _per_prompt_world(prompts=24, noises=8):
    """Under-specified prompts of the mixed world, ``noises`` real scenes drawn for each, and the reference pool."""
    world = Shapes(Shapes.Config(size=3000, captions="mixed", split="all"), seed=5)
    items = [world[i] for i in range(3000)]
    pool = torch.stack([it["attributes"] for it in items])
    open_ = [it for it in items if not it["mentioned"].all()][:prompts]
    g = torch.Generator().manual_seed(0)
    draws, scenes = [], []
    for it in open_:
        named = it["mentioned"]
        agree = torch.nonzero((pool[:, named] == it["attributes"][named]).all(dim=1)).flatten()
        pick = agree[torch.randint(len(agree), (noises,), generator=g)]
        draws.append(pool[pick])
        scenes.append(pick)
    attributes = torch.stack([it["attributes"] for it in open_])
    mentioned = torch.stack([it["mentioned"] for it in open_])
    return torch.stack(draws), attributes, mentioned, pool, items, scenes


def test_diversity_per_prompt_is_one_on_real_scenes_low_on_collapse_and_on_blurred_means():
    from lightning_distill.eval.metrics import per_prompt_diversity
    from lightning_distill.worlds.shapes.features import ShapesFeatures

    draws, attributes, mentioned, pool, items, scenes = _per_prompt_world()
    real = per_prompt_diversity(draws, attributes, mentioned, pool)
    assert 0.9 < real < 1.1
    # mode dropping: every noise gives the same (valid) scene of the prompt
    collapsed = per_prompt_diversity(draws[:, :1].expand_as(draws), attributes, mentioned, pool)
    assert collapsed < 0.45
    # mode averaging: each noise lands on the mean of the prompt's real scenes (a blur); the classifier reads
    # one value from it, however many noises
    features = ShapesFeatures(ShapesFeatures.Config())
    means = torch.stack([torch.stack([items[int(i)]["pixels"] for i in pick]).mean(0) for pick in scenes])
    read = features.describe((means + 1) / 2).predicted
    blurred = per_prompt_diversity(read[:, None].expand_as(draws), attributes, mentioned, pool)
    assert blurred < 0.45
    # a prompt that names everything has nothing open: skipped; none open at all is an error
    with pytest.raises(UserError, match="leaves an attribute open"):
        per_prompt_diversity(draws, attributes, torch.ones_like(mentioned), pool)


def test_instruments_average_their_windows_and_survive_a_resume(tmp_path):
    """The report's per-phase instruments: D accuracy, pair accuracy and loss ratio over the last fifth of the
    warm-up and of the phase, the lowest re-noise level's accuracy pooled by its share of each batch (a step with
    none counts for nothing), the student's gap over the last fifth; rows of phases finished before a resume are
    kept, and checkpoints from before an instrument existed resume with the others where they were."""
    import json

    from lightning_distill.callbacks.report import Report, instrument_windows
    from lightning_distill.eval.evaluate import EvalConfig

    phase = _phases("schedule.stages.1.phases.0.steps=20", "schedule.stages.1.phases.0.discriminator_warmup=10")[1]
    warm, end = instrument_windows(phase)
    assert (warm, end) == (range(8, 10), range(16, 20))
    fabric = type("F", (), {"world_size": 1, "is_global_zero": True})()
    report = Report(EvalConfig(), out_dir=tmp_path)
    report.on_phase_start(phase=phase)
    # (accuracy, share) at the lowest level: pooled 0.9 over the warm-up window and 0.6 over the end (plain means of
    # the logged accuracies: 0.8 and 0.3)
    lowest = {8: (0.6, 0.25), 9: (1.0, 0.75), 16: (0.0, 0.0), 17: (0.4, 0.5), 18: (0.8, 0.5), 19: (0.0, 0.0)}
    for i in range(phase.steps):
        logs = {"d/accuracy": torch.tensor(i / 100), "d/pair_accuracy": torch.tensor(1 - i / 100),
                "d/loss_ratio": torch.tensor(2 - i / 10)}
        if i >= 10:
            logs["mse_to_teacher"] = torch.tensor(float(i))
        accuracy, share = lowest.get(i, (0.5, 0.5))
        logs |= {"d/accuracy_lowest": torch.tensor(accuracy), "d/lowest_share": torch.tensor(share)}
        report.on_step_end(phase=phase, step=phase.start + i + 1, logs=logs)
    report.on_phase_result(fabric=fabric, phase=phase)
    row = json.loads((tmp_path / "instruments.json").read_text())["phases"][0]
    assert row == {"phase": phase.name, "d_accuracy_warmup": pytest.approx(0.085), "d_accuracy_end": pytest.approx(0.175),
                   "d_pair_accuracy_warmup": pytest.approx(0.915), "d_pair_accuracy_end": pytest.approx(0.825),
                   "student_teacher_gap": pytest.approx(17.5), "d_loss_ratio_warmup": pytest.approx(1.15),
                   "d_loss_ratio_end": pytest.approx(0.25), "d_accuracy_lowest_warmup": pytest.approx(0.9),
                   "d_accuracy_lowest_end": pytest.approx(0.6)}
    # a checkpoint written before the pair accuracy existed resumes with its instruments where they were
    old = Report(EvalConfig(), out_dir=tmp_path)
    old.load_state_dict({"rows": [], "phase": phase.name, "sums": [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]})
    assert old._sums.tolist() == [1.0, 2.0, 3.0, 4.0, 0.0, 0.0, 0.0, 0.0, 5.0, 6.0, *[0.0] * 8]
    # and one from before the loss ratio, and one from before the lowest level's accuracy
    old.load_state_dict({"rows": [], "phase": phase.name, "sums": list(map(float, range(1, 11)))})
    assert old._sums.tolist() == [*map(float, range(1, 11)), *[0.0] * 8]
    old.load_state_dict({"rows": [], "phase": phase.name, "sums": list(map(float, range(1, 15)))})
    assert old._sums.tolist() == [*map(float, range(1, 15)), *[0.0] * 4]
    resumed = Report(EvalConfig(), out_dir=tmp_path)  # a new process: its state starts empty
    later = _phases("schedule.stages.1.phases.0.steps=20")[2]
    resumed.on_phase_start(phase=later)
    resumed.on_step_end(phase=later, step=later.start + 1, logs={"d/accuracy": torch.tensor(1.0)})
    resumed.on_phase_result(fabric=fabric, phase=later)
    rows = json.loads((tmp_path / "instruments.json").read_text())["phases"]
    assert [r["phase"] for r in rows] == [phase.name, later.name]
