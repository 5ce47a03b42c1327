"""The tiny world's parts: the MiniLM codec, the metrics, the shipped teacher, plain diffusion training, the ladder's
branches and a short run of the main job."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from lightning_distill.config.recipe import load_recipe
from lightning_distill.eval.metrics import Adherence, coverage, frechet_distance
from lightning_distill.worlds.shapes.features import ShapesFeatures
from lightning_distill.worlds.shapes.world import Shapes
from support import ROOT, tree_snapshot

TINY = ROOT / "recipes" / "tiny"


@pytest.fixture(scope="module")
def minilm():
    from lightning_distill.codecs.minilm import MiniLMCodec

    return MiniLMCodec(MiniLMCodec.Config())


@pytest.fixture(scope="module")
def features():
    return ShapesFeatures(ShapesFeatures.Config())


def _images(split: str, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    data = Shapes(Shapes.Config(size=n, split=split), seed=seed)
    items = [data[i] for i in range(n)]
    pixels = torch.stack([it["pixels"] for it in items])
    return (pixels + 1) / 2, torch.stack([it["attributes"] for it in items]), [it["caption"] for it in items]


@pytest.mark.parametrize("shown", [True, False])
def test_minilm_loads_without_a_progress_bar_and_leaves_the_setting_as_it_was(shown, capfd):
    """The small bundled encoder loads at once: no transformers "Loading weights" bar each time a run (or each phase
    `plan` measures) builds the codec, and transformers' own progress-bar setting is restored afterwards."""
    from transformers.utils import logging as transformers_logging

    from lightning_distill.codecs.minilm import MiniLMCodec

    (transformers_logging.enable_progress_bar if shown else transformers_logging.disable_progress_bar)()
    try:
        capfd.readouterr()
        MiniLMCodec(MiniLMCodec.Config())
        assert "Loading weights" not in capfd.readouterr().err
        assert transformers_logging.is_progress_bar_enabled() == shown
    finally:
        transformers_logging.enable_progress_bar()


def test_minilm_embeds_paraphrases_close_and_empty_captions_as_zero(minilm):
    captions = ["a small red circle on the left", "there is a small red circle on the left of the picture",
                "a large blue square at the top", ""]
    text = minilm.encode_text(captions)["text"]
    assert text.shape == (4, minilm.config.max_length, 384)
    assert text[3].abs().sum() == 0  # the null conditioning of classifier-free guidance
    pooled = text.sum(1) / (text.abs().sum(-1) > 0).sum(1, keepdim=True)
    same, other = F.cosine_similarity(pooled[0], pooled[1], 0), F.cosine_similarity(pooled[0], pooled[2], 0)
    assert same > other + 0.2
    # cached embeddings equal a fresh encoding, in any batch composition
    again = minilm._encode([captions[2], captions[0]])
    assert torch.allclose(minilm.encode_text([captions[2], captions[0]])["text"], again, atol=1e-5)


def test_frechet_distance_matches_the_scipy_formula():
    scipy_linalg = pytest.importorskip("scipy.linalg")
    g = torch.Generator().manual_seed(0)
    a = torch.randn(400, 8, generator=g, dtype=torch.float64) @ torch.randn(8, 8, generator=g, dtype=torch.float64)
    b = torch.randn(300, 8, generator=g, dtype=torch.float64) * 1.5 + 0.3
    mu_a, mu_b = a.mean(0).numpy(), b.mean(0).numpy()
    cov_a, cov_b = np.cov(a.numpy(), rowvar=False), np.cov(b.numpy(), rowvar=False)
    root = scipy_linalg.sqrtm(cov_a @ cov_b).real
    expected = ((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root)
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-6)


def test_coverage_counts_reference_points_reached():
    real = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [10.0, 10.0], [11.0, 10.0], [10.0, 11.0]])
    near_first = torch.tensor([[0.1, 0.1]])
    assert coverage(real, near_first, k=2) == pytest.approx(3 / 6)  # the first cluster's three balls hold it
    assert coverage(real, real + 0.01, k=2) == 1.0
    assert coverage(real, torch.tensor([[100.0, 100.0]]), k=2) == 0.0


def test_metrics_on_real_data_and_noise(features):
    real, attributes, _ = _images("all", 384, seed=1)
    other, other_attributes, _ = _images("all", 384, seed=2)
    noise = torch.rand_like(real)
    d_real = features.describe(real, attributes)
    d_other = features.describe(other, other_attributes)
    d_noise = features.describe(noise, attributes)
    same, against_noise = frechet_distance(d_other.whole, d_real.whole), frechet_distance(d_noise.whole, d_real.whole)
    assert same < 0.05 * against_noise, (same, against_noise)
    same_patch = frechet_distance(d_other.patch, d_real.patch)
    assert same_patch < 0.05 * frechet_distance(d_noise.patch, d_real.patch)
    adherence = Adherence(Adherence.Config())
    assert adherence(d_other, d_real) > 0.97  # the classifier reads real images' captions back
    assert adherence(d_noise, d_real) < 0.5
    blurred = F.avg_pool2d(F.pad(other, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    d_blur = features.describe(blurred, other_attributes)
    # blur costs much more in patch features than in whole-image features, relative to the same-data floor
    assert frechet_distance(d_blur.patch, d_real.patch) / same_patch > frechet_distance(d_blur.whole, d_real.whole) / same


@pytest.mark.parametrize("asset", ["teacher", "teacher-mixed", "flow-teacher"])
def test_shipped_teacher_follows_captions(minilm, features, asset):
    """The shipped teachers, loaded through from_pretrained, draw what the captions say (the flow teacher: an
    SD3-shaped transformer on a shifted flow-matching schedule)."""
    from lightning_distill.models.noise import FlowMatchSchedule
    from lightning_distill.models.sd3.network import SD3Teacher
    from lightning_distill.models.sdxl.network import UNetTeacher
    from lightning_distill.models.teacher import guided
    from lightning_distill.config.recipe import ASSETS
    from lightning_distill.inference.sampler import sample_latents

    folder = str(ASSETS / "tiny" / asset)
    if asset == "flow-teacher":
        teacher = SD3Teacher(SD3Teacher.Config(pretrained=folder))
        assert isinstance(teacher.schedule, FlowMatchSchedule) and teacher.schedule.config.shift == 1.5
        assert teacher.prediction == "flow"
    else:
        teacher = UNetTeacher(UNetTeacher.Config(pretrained=folder))
        assert teacher.schedule.config.beta_schedule == "linear" and teacher.prediction == "v_prediction"
    real, attributes, captions = _images("train", 48, seed=3)
    cond = minilm.encode_text(captions)
    noise = torch.randn(real.shape, generator=torch.Generator().manual_seed(0))
    x = sample_latents(guided(teacher.denoiser, 3.0), teacher.schedule, teacher.prediction, noise, cond, 16)
    images = ((x.clamp(-1, 1) + 1) / 2)
    score = Adherence(Adherence.Config())(features.describe(images, attributes), features.describe(real, attributes))
    assert score > 0.8, score


def test_branch_from_starts_a_second_ladder():
    loaded = load_recipe(TINY / "lightning.yaml")
    phases = {p.name: p for p in loaded.recipe.schedule.build().phases()}
    s8 = phases["s8-mse"]
    m4 = phases["m4-mse"]
    assert m4.options.teacher_from == "s8" and m4.options.student_from == s8.index
    assert m4.options.teacher_steps == 8 and m4.options.student_steps == 4
    m2 = phases["m2-mse"]
    assert m2.options.teacher_from is None and m2.options.student_from is None  # follows its branch
    assert phases["m1-mse"].options.prediction is None  # v-prediction throughout: no x0 conversion
    assert phases["l4-cond"].options.student_from is None
    scaled = load_recipe(TINY / "lightning.yaml", ["schedule.steps_scale=0.01"]).recipe.schedule.build().phases()
    assert all(p.steps == max(1, round(phases[p.name].steps * 0.01)) for p in scaled)


def test_flow_job_schedule_is_the_main_jobs_but_its_stated_differences():
    """flow_lightning.yaml copies lightning.yaml's stages (lists replace under extends) to add the 2- and 1-step MSE
    starts and to give the 4-, 2- and 1-step adversarial phases their discriminators' optimizer and longer warm-ups,
    the anchor to the teacher, and at 1 step the student's betas: the copy must not drift from the main job's
    schedule in anything else."""
    main = load_recipe(TINY / "lightning.yaml").resolved["schedule"]
    flow = load_recipe(TINY / "flow_lightning.yaml").resolved["schedule"]
    for name, steps in (("l2", 50), ("l1", 100)):
        stage = next(stage for stage in flow["stages"] if stage["name"] == name)
        first = stage["phases"].pop(0)
        assert first["kind"] == "mse" and first["teacher_from"] == "s8" and first["steps"] == steps
    changed = 0
    for stage, ours in zip(flow["stages"], main["stages"]):
        if stage["name"] not in ("l4", "l2", "l1"):
            continue
        for phase, theirs in zip(stage["phases"], ours["phases"]):
            if phase["kind"] != "adversarial":
                continue
            # the student's steps stay the main job's (at 1 step 140 and 80, not 60 and 40, in both); the
            # discriminator trains alone longer first
            student_steps = phase["steps"] - phase["discriminator_warmup"]
            assert student_steps == theirs["steps"] - theirs["discriminator_warmup"]
            if stage["name"] == "l1":
                assert student_steps == (140 if phase["conditional"] else 80)
            assert phase["discriminator_warmup"] == (60 if phase["conditional"] else 30)
            assert phase["discriminator_lr"] == 1.0e-4 and phase["regression_weight"] == 10.0
            if stage["name"] in ("l4", "l2"):  # the discriminator's betas its own, the student's the main job's
                assert phase["discriminator_betas"] == [0.5, 0.999] and phase["betas"] == theirs["betas"]
            else:  # one pair of betas for both
                assert phase["discriminator_betas"] is None and phase["betas"] == [0.5, 0.999]
            for key in ("steps", "discriminator_warmup", "discriminator_lr", "discriminator_betas", "regression_weight",
                        "betas"):
                phase[key] = theirs[key]
            changed += 1
    assert changed == 6
    assert flow == main


@pytest.mark.parametrize(("job", "ablation"), [("lightning", "from_mse"), ("flow_lightning", "from_mse_flow")])
def test_the_ablation_recipes_are_their_main_jobs_with_the_adversarial_stages_from_mse_appended(job, ablation):
    """ablations/from_mse*.yaml (what benchmarks/fidelity.py trains) are the main jobs with a2 and a1 appended: every
    phase of the main job first, unchanged (index, steps, options: so its rows are the main job's), then the 2- and
    1-step stages again from the MSE ladder's students, with the adversarial phases of the main job's own l2 and l1
    (l1's unconditional teacher two levels up: m4 for l4), and the report's two rows for them."""
    main = load_recipe(TINY / f"{job}.yaml")
    ablation = load_recipe(TINY / "ablations" / f"{ablation}.yaml")
    whole, extended = main.recipe.schedule.build().phases(), ablation.recipe.schedule.build().phases()
    assert [(p.index, p.name, p.start, p.end, p.options) for p in extended[: len(whole)]] == \
           [(p.index, p.name, p.start, p.end, p.options) for p in whole]
    assert [p.name for p in extended[len(whole):]] == ["a2-cond", "a2-uncond", "a1-cond", "a1-uncond"]
    stages = {s["name"]: s for s in ablation.resolved["schedule"]["stages"]}
    assert stages["a2"]["branch_from"] == "m4" and stages["a1"]["branch_from"] == "m2"
    for ours, theirs in (("a2", "l2"), ("a1", "l1")):
        adversarial = [p for p in stages[theirs]["phases"] if p["kind"] == "adversarial"]
        if ours == "a1":  # the unconditional phase's teacher two levels up, on the MSE ladder
            assert adversarial[1]["teacher_from"] == "l4" and stages["a1"]["phases"][1]["teacher_from"] == "m4"
            adversarial[1] = {**adversarial[1], "teacher_from": "m4"}
        assert stages[ours]["phases"] == adversarial, ours
    rows = [(r["model"], r["stage"]) for r in ablation.resolved["callbacks"][2]["models"]]
    assert rows == [(r["model"], r["stage"]) for r in main.resolved["callbacks"][2]["models"]] + \
           [("adversarial-from-mse", "a2"), ("adversarial-from-mse", "a1")]
    for tree in (main.resolved, ablation.resolved):
        tree.pop("out"), tree["schedule"].pop("stages"), tree["callbacks"][2].pop("models")
    assert ablation.resolved == main.resolved


def test_until_trains_the_ladder_up_to_a_stage():
    """``schedule.until`` keeps the stages up to the named one, each phase exactly as in the whole ladder (index,
    steps, options), so that a run cut there starts every later stage where the whole run would; a name that is
    no stage is refused with the names, and the report's rows must name stages that are kept."""
    from lightning_distill.errors import UserError

    whole = load_recipe(TINY / "lightning.yaml").recipe.schedule.build().phases()
    rows = "callbacks.2.models=[{model: lightning, stage: l4}, {model: lightning, stage: l2}]"
    cut = load_recipe(TINY / "lightning.yaml", ["schedule.until=l2", rows]).recipe.schedule.build().phases()
    assert [p.stage for p in cut] == ["s8", "l4", "l4", "l2", "l2"]
    assert [(p.index, p.name, p.start, p.end, p.options) for p in cut] == \
           [(p.index, p.name, p.start, p.end, p.options) for p in whole[: len(cut)]]
    with pytest.raises(UserError, match="until 'l3' is not a stage; choose one of s8, l4, l2, l1, m4"):
        load_recipe(TINY / "lightning.yaml", ["schedule.until=l3"])
    with pytest.raises(UserError, match="models stage 'l1' is not in the schedule.*cut by until"):
        load_recipe(TINY / "lightning.yaml", ["schedule.until=l2"])


def test_branch_from_must_name_an_earlier_stage(tmp_path):
    from lightning_distill.errors import UserError

    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"extends: {TINY / 'lightning.yaml'}\n")
    with pytest.raises(UserError, match="branch_from 'zz' is not an earlier stage"):
        load_recipe(recipe, ["schedule.stages.4.branch_from=zz"])


def test_diffusion_training_and_export_roundtrip(tmp_path, cli):
    """The teacher recipe's method trains in the same loop; its export loads with from_pretrained as a teacher."""
    from safetensors.torch import load_file

    from lightning_distill.models.sdxl.network import UNetTeacher

    out = tmp_path / "teacher"
    small = ["method.unet.block_out_channels=[8,16,16]", "schedule.steps=3", "train.batch_size=4",
             "train.log_every=1", "method.preview_steps=2", "method.preview_size=2", "data.size=64"]
    done = cli("train", str(TINY / "teacher.yaml"), "--out", str(out), *small)
    assert done.returncode == 0, done.stderr[-3000:]
    state = load_file(str(out / "phases" / "00-diffusion.safetensors"))
    done = cli("export", str(out), "--format", "diffusers", "--out", str(tmp_path / "export"))
    assert done.returncode == 0, done.stderr[-3000:]
    teacher = UNetTeacher(UNetTeacher.Config(pretrained=str(tmp_path / "export")))
    loaded = teacher.denoiser.unet.state_dict()
    assert teacher.schedule.config.beta_schedule == "linear"
    for key, value in loaded.items():
        assert torch.allclose(value, state[f"model.unet.{key}"].half().float()), key


def test_main_job_short_run_writes_every_report_file(tmp_path, cli):
    out = tmp_path / "tiny"
    done = cli(
        "train", str(TINY / "lightning.yaml"), "--out", str(out), "schedule.steps_scale=0.01", "train.batch_size=4",
        "callbacks.2.samples=64", "callbacks.2.teacher.steps=[4]", "callbacks.2.grid=4",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    tree = json.loads((out / "metrics.json").read_text())
    rows = tree["results"]
    assert {(r["model"], r["steps"]) for r in rows} == {
        ("teacher", 4), ("teacher-unguided", 4), ("mse", 8), ("lightning", 4), ("lightning", 2), ("lightning", 1),
        ("mse", 4), ("mse", 2), ("mse", 1)}
    for r in rows:
        assert isinstance(r["steps"], int) and r["model"] in ("teacher", "teacher-unguided", "lightning", "mse")
        assert r["guidance"] == (3.0 if r["model"] == "teacher" else 0.0)
        for key in ("fd", "fd_patch", "fd_teacher", "fd_patch_teacher", "adherence", "diversity", "diversity_per_prompt"):
            assert isinstance(r[key], float) and np.isfinite(r[key])
        assert 0.0 <= r["adherence"] <= 1.0
        assert (out / "samples" / f"{r['model']}-{r['steps']}step.png").is_file()
    assert 0.8 < tree["real"]["diversity_per_prompt"] < 1.2  # real scenes drawn for the same prompts
    # the instruments of every adversarial phase, and no others
    adversarial = ["l4-cond", "l4-uncond", "l2-cond", "l2-uncond", "l1-cond", "l1-uncond"]
    assert [d["phase"] for d in tree["discriminator"]] == adversarial
    for d in tree["discriminator"]:
        assert set(d) == {"phase", "d_accuracy_warmup", "d_accuracy_end", "d_pair_accuracy_warmup", "d_pair_accuracy_end",
                          "d_loss_ratio_warmup", "d_loss_ratio_end", "d_accuracy_lowest_warmup",
                          "d_accuracy_lowest_end", "student_teacher_gap"}
        assert 0.0 < d["d_loss_ratio_warmup"] < 3.0 and 0.0 < d["d_loss_ratio_end"] < 3.0
        # the lowest re-noise level's accuracy only where the phase re-noises to discrete levels (2 and 1 steps); in
        # phases this short (batches of 4) a window may hold no pair at that level
        lowest = [d["d_accuracy_lowest_warmup"], d["d_accuracy_lowest_end"]]
        if d["phase"][:2] in ("l2", "l1"):
            assert all(v is None or 0.0 <= v <= 1.0 for v in lowest)
        else:
            assert lowest == [None, None]
        assert 0.0 <= d["d_pair_accuracy_warmup"] <= 1.0 and 0.0 <= d["d_pair_accuracy_end"] <= 1.0
        assert 0.0 <= d["d_accuracy_warmup"] <= 1.0 and 0.0 <= d["d_accuracy_end"] <= 1.0 and d["student_teacher_gap"] >= 0
    assert any(d["d_accuracy_lowest_end"] is not None for d in tree["discriminator"])
    report = (out / "report.md").read_text()
    assert "| lightning | 1 |" in report and "samples/lightning-1step.png" in report
    assert "## Discriminators" in report and "| l1-uncond |" in report
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard")).Reload()
    assert "eval/lightning/fd_patch" in events.Tags()["scalars"]
    # a stage of the run samples from prompts through the CLI, in pixel space with the MiniLM codec
    grid = tmp_path / "grid.png"
    done = cli("sample", str(out), "--stage", "l2", "--prompt", "a small red circle on the left", "--prompt",
               "a large blue square at the top", "--out", str(grid))
    assert done.returncode == 0, done.stderr[-3000:]
    from PIL import Image

    assert Image.open(grid).size == (2 * 33 + 1, 34)  # two 32-pixel images in one row, 1-pixel padding
    # the report again without training, with other rows (a phase's student) into another folder: the row it
    # shares with the run's report scores the same, the run folder is untouched
    before, again = tree_snapshot(out), tmp_path / "again"
    done = cli("report", str(out), "callbacks.report.models=[{model: lightning, stage: l1}, {model: cond, stage: l1-cond}]",
               "callbacks.report.teacher.unguided=false", "--out", str(again))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "cond        1 steps" in done.stdout
    rerun = json.loads((again / "metrics.json").read_text())
    assert [(r["model"], r["steps"]) for r in rerun["results"]] == [("teacher", 4), ("lightning", 1), ("cond", 1)]
    first = next(r for r in rows if (r["model"], r["steps"]) == ("lightning", 1))
    assert {k: v for k, v in rerun["results"][1].items() if k != "seconds"} == {k: v for k, v in first.items() if k != "seconds"}
    assert rerun["results"][2]["fd"] != first["fd"]  # another student
    assert rerun["discriminator"] == tree["discriminator"] and (again / "samples" / "cond-1step.png").is_file()
    assert tree_snapshot(out) == before


def test_report_refuses_what_would_misdescribe_the_run_before_writing(tmp_path, cli):
    """``report`` changes only the report: a training setting, overrides without --out, a row whose stage has not
    finished and a recipe with no report are refused with exit 2, naming the cause, and nothing is written."""
    run = tmp_path / "run"
    run.mkdir()
    resolved = cli("validate", str(TINY / "lightning.yaml"))
    assert resolved.returncode == 0, resolved.stderr[-3000:]
    (run / "recipe.yaml").write_text(resolved.stdout)
    (run / "phases").mkdir()
    other = tmp_path / "other"
    cases = [
        (["seed=3", "--out", str(other)], "seed is a setting of the training"),
        (["schedule.stages.0.phases.0.steps=5", "--out", str(other)], "schedule.stages.0.phases.0.steps is a setting of the training"),
        (["callbacks.report.samples=8"], "pass --out DIR"),
        ([], "'s8' (row 'mse') has not finished"),
        (["callbacks=[{name: tensorboard}]", "--out", str(other)], "has no report callback"),
        (["callbacks.report.models=[{model: x, stage: nowhere}]", "--out", str(other)], "'nowhere' is not in the schedule"),
    ]
    before = tree_snapshot(run)
    for args, message in cases:
        done = cli("report", str(run), *args)
        assert done.returncode == 2 and message in done.stderr, (args, done.stderr[-2000:])
    assert tree_snapshot(run) == before and not other.exists()
    done = cli("report", str(tmp_path / "nothing"))
    assert done.returncode == 2 and "is not a run folder (no recipe.yaml)" in done.stderr


@pytest.mark.parametrize("x0_at_one_step", [False, True])
def test_students_sample_with_their_teachers_parameterisation(x0_at_one_step):
    """Students of the v-prediction teacher sample as v-prediction (v is defined at t = T, so the main job's 1-step
    students keep it); a 1-step stage switched to x0 (the paper's way for epsilon teachers) samples as x0."""
    overrides = ["schedule.stages.6.prediction=sample", "schedule.stages.3.prediction=sample"] * x0_at_one_step
    loaded = load_recipe(TINY / "lightning.yaml", overrides)
    phases = {p.stage: p for p in loaded.recipe.schedule.build().phases()}
    method = loaded.recipe.method.build(phases=list(phases.values()), codec=None, seed=0)

    def prediction_of(loaded, phase):  # what the method records for the phase (built empty: no weights read)
        method.attach(method.build_phase(phase, artifacts=None, empty=True))
        return method.facts(phase).prediction

    assert prediction_of(loaded, phases["s8"]) == "v_prediction"
    assert prediction_of(loaded, phases["m2"]) == "v_prediction"
    one_step = "sample" if x0_at_one_step else "v_prediction"
    assert prediction_of(loaded, phases["l1"]) == prediction_of(loaded, phases["m1"]) == one_step
