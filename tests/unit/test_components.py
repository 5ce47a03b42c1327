"""Tier (a): every built-in component on tiny CPU configs — shapes, finiteness, gradients only where intended."""

from __future__ import annotations

import pytest
import torch
from lightning.fabric import Fabric
from torch.utils.data import default_collate

from support import DEBUG_RECIPE
from lightning_distill.engine.artifacts import Artifacts
from lightning_distill.engine.phase import module_views, optimizer_step, setup_phase
from lightning_distill.config.recipe import load_recipe
from lightning_distill.config.registry import REGISTRIES


@pytest.fixture(scope="module")
def recipe():
    return load_recipe(DEBUG_RECIPE).recipe


def _phase_setup(recipe, index, tmp_path):
    fabric = Fabric(accelerator="cpu", devices=1)
    phases = recipe.schedule.build().phases()
    method = recipe.method.build(phases=phases, codec=recipe.codec.build(), seed=0)
    artifacts = Artifacts(tmp_path, fabric, {p.index: p.name for p in phases})
    for earlier in phases[:index]:  # stand-in results of the earlier phases, each different
        state = method.build_phase(earlier, artifacts)["student"].state_dict()
        artifacts.save(earlier.index, {"student": {k: v + 0.01 * (earlier.index + 1) for k, v in state.items()}})
    torch.manual_seed(0)
    state = setup_phase(fabric, method, phases[index], artifacts, recipe.optimizer)
    data = recipe.data.build(seed=0)
    method.attach(module_views(state.modules, None))
    prepared = [method.prepare(default_collate([data[i] for i in range(4)]), phases[index].start)]
    return fabric, method, state.modules, state, prepared


def _params(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _changed(before, module):
    after = module.state_dict()
    return {k for k in before if not torch.equal(before[k], after[k])}


def test_teacher_is_frozen_and_samples_to_the_target_timestep(recipe, tmp_path):
    _, method, modules, _, prepared = _phase_setup(recipe, 0, tmp_path)
    teacher = modules["teacher"]
    assert not any(p.requires_grad for p in teacher.parameters())
    b = prepared[0]
    assert b["target"].shape == b["x_t"].shape and torch.isfinite(b["target"]).all()
    assert not b["target"].requires_grad
    # n = teacher_steps / student_steps = 4 solver steps from t to t - ns
    assert torch.all(b["t"] - b["t_prev"] == 1000 // 8)


def test_mse_step_trains_only_the_student(recipe, tmp_path):
    fabric, method, modules, state, prepared = _phase_setup(recipe, 0, tmp_path)
    teacher, student = _params(modules["teacher"]), _params(modules["student"])
    logs = optimizer_step(fabric, method, state, "student", prepared, 1.0)
    assert torch.isfinite(logs["loss/mse"]) and logs["loss/mse"] > 0
    assert _changed(teacher, modules["teacher"]) == set()
    assert _changed(student, modules["student"])


@pytest.mark.parametrize("index", [1, 2], ids=["conditional", "unconditional"])
def test_adversarial_steps_touch_only_their_module(recipe, tmp_path, index):
    fabric, method, modules, state, prepared = _phase_setup(recipe, index, tmp_path)
    assert modules["discriminator"].conditional == (index == 1)
    t0, s0, d0 = (_params(modules[n]) for n in ("teacher", "student", "discriminator"))
    logs = optimizer_step(fabric, method, state, "discriminator", prepared, 1.0)
    assert set(logs) >= {"loss/discriminator", "d/p_real", "d/p_fake"}
    assert _changed(s0, modules["student"]) == set(), "a D step must leave the student unchanged"
    assert _changed(d0, modules["discriminator"])
    d1 = _params(modules["discriminator"])
    logs = optimizer_step(fabric, method, state, "student", prepared, 1.0)
    assert torch.isfinite(logs["loss/generator"])
    assert _changed(d1, modules["discriminator"]) == set(), "a G step must leave the discriminator unchanged"
    assert _changed(s0, modules["student"])
    assert _changed(t0, modules["teacher"]) == set()
    assert all(p.grad is None for p in modules["discriminator"].parameters())


def test_discriminator_is_reinitialised_each_phase_and_student_carries_over(recipe, tmp_path):
    _, method, m1, *_ = _phase_setup(recipe, 1, tmp_path / "a")
    phases = recipe.schedule.build().phases()
    artifacts = Artifacts(tmp_path / "a", None, {p.index: p.name for p in phases})
    artifacts.fabric = type("F", (), {"is_global_zero": True, "barrier": lambda self: None})()
    artifacts.save(1, {"student": m1["student"].state_dict()})
    torch.manual_seed(5)
    m2 = method.build_phase(phases[2], artifacts)
    s1, s2 = m1["student"].state_dict(), m2["student"].state_dict()
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    # the stage's teacher is the previous stage's last student (phase 0's artifact), not the phase-1 student
    t = m2["teacher"].denoiser.state_dict()
    a0 = artifacts(0)
    assert all(torch.equal(t[k], a0[f"student.net.{k}"]) for k in t)


def test_ns_gan_matches_its_formula():
    loss = REGISTRIES["loss"].get("ns_gan")(REGISTRIES["loss"].get("ns_gan").Config())
    real, fake = torch.tensor([2.0, -1.0]), torch.tensor([0.5, -3.0])
    p, q = torch.sigmoid(real), torch.sigmoid(fake)
    assert torch.allclose(loss.discriminator_loss(real, fake), (-p.log()).mean() + (-(1 - q).log()).mean())
    assert torch.allclose(loss.generator_loss(fake), (-q.log()).mean())


def test_optimizer_factories_build_with_phase_settings():
    param = torch.nn.Parameter(torch.zeros(3))
    for name in ("adam", "adamw"):
        cls = REGISTRIES["optimizer"].get(name)
        opt = cls(cls.Config(), [param], lr=1e-3, betas=(0.0, 0.99), weight_decay=0.0)
        assert opt.param_groups[0]["lr"] == 1e-3 and opt.param_groups[0]["betas"] == (0.0, 0.99)


def test_ema_callback_averages_and_swaps(tmp_path):
    ema_cls = REGISTRIES["callback"].get("ema")
    ema = ema_cls(ema_cls.Config(decay=0.5, warmup=False))
    net = torch.nn.Linear(2, 1)
    modules = {"student": net}
    ema.on_phase_start(modules=modules)
    start = net.weight.detach().clone()
    with torch.no_grad():
        net.weight.add_(2.0)
    ema.on_step_end(modules=modules)
    assert torch.allclose(ema.shadow["weight"], start + 1.0)
    ema.swap(modules)
    assert torch.allclose(net.weight, start + 1.0)
    ema.swap(modules)
    assert torch.allclose(net.weight, start + 2.0)
    restored = ema_cls(ema_cls.Config(decay=0.5, warmup=False))
    restored.load_state_dict(ema.state_dict())
    restored.on_phase_start(modules=modules)  # a resumed shadow is kept, not re-initialised
    assert torch.allclose(restored.shadow["weight"], start + 1.0)


@pytest.mark.parametrize("name", sorted(REGISTRIES["loss"]))
def test_every_registered_loss(name):
    from lightning_distill.config.fields import validate

    cls = REGISTRIES["loss"].get(name)
    loss = cls(validate({}, cls.Config))
    a = torch.randn(4, requires_grad=True)
    if getattr(loss, "adversarial", False):
        good, bad = torch.full((4,), 3.0), torch.full((4,), -3.0)
        # a discriminator that tells real (high) from fake (low) is rewarded; a fooled one is not
        assert loss.discriminator_loss(good, bad) < loss.discriminator_loss(bad, good)
        real = torch.zeros(4)  # relativistic losses judge each fake against its real sample's logit
        assert loss.generator_loss(good, real) < loss.generator_loss(bad, real)  # the generator wants high fake logits
        out = loss.discriminator_loss(a, a.flip(0)) + loss.generator_loss(a, real)
    else:
        out = loss(a, torch.zeros(4))
        assert loss(torch.zeros(4), torch.zeros(4)) == 0
    out.backward()
    assert torch.isfinite(out) and a.grad is not None


@pytest.mark.parametrize("name", sorted(REGISTRIES["head"]))
def test_every_registered_head(name):
    from lightning_distill.config.fields import validate

    cls = REGISTRIES["head"].get(name)
    head = cls(validate({"channels": 32, "groups": 8}, cls.Config), in_channels=16)
    logits = head(torch.randn(2, 16, 8, 8))
    assert logits.shape[0] == 2 and torch.isfinite(logits).all()
    logits.mean().backward()
    assert all(p.grad is not None for p in head.parameters())


def test_teacher_paths_walk_the_teachers_grid():
    from lightning_distill.methods.lightning.method import teacher_paths

    # 2-step student trained on 4 timesteps, 4-step teacher: jumps of 500 in teacher steps of 250
    assert teacher_paths(torch.arange(4), 4, 2, 4).tolist() == [[999, 749, 499], [749, 499, 249], [499, 249, -1],
                                                                 [249, 249, -1]]
    # 1-step student from a 2-step teacher: everything goes to clean
    assert teacher_paths(torch.arange(4), 4, 4, 2)[:, -1].tolist() == [-1, -1, -1, -1]
    # the paper's first stage: 32-step student, 128-step teacher: 4 teacher steps per student step
    assert teacher_paths(torch.tensor([0]), 32, 1, 128).tolist() == [[999, 991, 983, 976, 968]]
    # sharded runs pad every rank's paths to the longest possible, so all ranks run the teacher equally often
    assert teacher_paths(torch.tensor([3]), 4, 2, 4).tolist() == [[249, -1]]
    assert teacher_paths(torch.tensor([3]), 4, 2, 4, pad_to=2).tolist() == [[249, 249, -1]]


def test_renoise_plan_moves_weights_and_touches_only_clean_targets(recipe, tmp_path):
    phases = recipe.schedule.build().phases()
    method = recipe.method.build(phases=phases, codec=recipe.codec.build(), seed=0)
    from dataclasses import replace

    phase = replace(phases[1], steps=101, options=replace(phases[1].options, renoise_timesteps=(10, 750),
                                                          renoise_weights=(1.0, 0.0), renoise_weights_end=(0.0, 1.0)))
    method.phase = phase
    like = torch.zeros(4000, 1)
    t_prev = torch.tensor([-1, 124] * 2000)
    start = method._renoise_plan(t_prev, like, phase.start)
    assert set(start["t_disc"][t_prev < 0].tolist()) == {10} and set(start["t_disc"][t_prev >= 0].tolist()) == {124}
    end = method._renoise_plan(t_prev, like, phase.end - 1)
    assert set(end["t_disc"][t_prev < 0].tolist()) == {750}
    middle = method._renoise_plan(t_prev, like, phase.start + 50)["t_disc"][t_prev < 0]
    assert 0.4 < (middle == 750).float().mean() < 0.6


def test_x0_conversion_targets_the_x0_the_teacher_implies(tmp_path):
    loaded = load_recipe(DEBUG_RECIPE, ["schedule.stages.1.prediction=sample", "schedule.stages.1.train_timesteps=4",
                                        "schedule.stages.1.student_steps=1",
                                        "schedule.stages.1.phases=[{kind: x0_convert, steps: 2}, {kind: adversarial, steps: 1}]"])
    r = loaded.recipe
    fabric, method, modules, state, prepared = _phase_setup(r, 1, tmp_path)
    phase = method.phase
    assert phase.kind == "x0_convert" and modules["student"].prediction == "sample"
    assert modules["teacher"].prediction == "epsilon"
    b = prepared[0]
    assert torch.equal(b["t"], b["t_prev"]) and set(b["t"].tolist()) <= {999, 749, 499, 249}
    teacher = modules["teacher"]
    x0 = teacher.schedule.split(teacher.denoiser(b["x_t"], b["t"], b["cond"]), b["x_t"], b["t"], "epsilon")[0]
    assert torch.allclose(b["target"], x0)
    loss, logs = method.training_step(b, "student")
    assert "loss/x0_convert" in logs and torch.isfinite(loss)


def test_skip_level_teacher_comes_from_the_named_stage(tmp_path):
    loaded = load_recipe(DEBUG_RECIPE, [
        "schedule.stages=[{name: a, teacher_steps: 16, student_steps: 8, phases: [{kind: mse, steps: 1}]},"
        " {name: b, student_steps: 4, phases: [{kind: mse, steps: 1}]},"
        " {name: c, student_steps: 2, phases: [{kind: adversarial, steps: 1, teacher_from: a}]}]"])
    phases = loaded.recipe.schedule.build().phases()
    assert phases[2].options.teacher_steps == 8  # stage a's student takes 8 steps
    assert phases[1].options.teacher_steps == 8  # by default: the previous stage's student_steps
    fabric, method, modules, *_ = _phase_setup(loaded.recipe, 2, tmp_path)
    artifacts = Artifacts(tmp_path, fabric, {p.index: p.name for p in phases})
    a, b = artifacts(0), artifacts(1)
    t = modules["teacher"].denoiser.state_dict()
    assert all(torch.equal(t[k], a[f"student.net.{k}"]) for k in t)
    assert not all(torch.equal(t[k], b[f"student.net.{k}"]) for k in t)
    s = modules["student"].state_dict()  # the student still continues from the previous phase (stage b)
    assert all(torch.equal(s[k], b[f"student.{k}"]) for k in s)


def test_ema_hands_the_average_on_at_phase_end(cli, tmp_path):
    """With the EMA callback the phase result is the averaged student, not the last one."""
    from safetensors.torch import load_file

    common = ["schedule.stages.0.phases.0.steps=4", "schedule.stages.1.phases.0.steps=1",
              "schedule.stages.1.phases.1.steps=1", "schedule.stages.0.phases.0.lr=0.01"]
    plain, ema = tmp_path / "plain", tmp_path / "ema"
    assert cli("train", str(DEBUG_RECIPE), "--out", str(plain), *common).returncode == 0
    result = cli("train", str(DEBUG_RECIPE), "--out", str(ema), *common,
                 "callbacks=[{name: ema, decay: 0.5, warmup: false}]")
    assert result.returncode == 0, result.stderr[-2000:]
    a = load_file(str(plain / "phases" / "00-s8-mse.safetensors"))
    b = load_file(str(ema / "phases" / "00-s8-mse.safetensors"))
    differs = [k for k in a if not torch.equal(a[k], b[k])]
    assert differs  # same training, but the EMA run hands on the average
    # the average of the trajectory lies nearer the last weights than the start (the teacher's) does
    teacher = load_recipe(DEBUG_RECIPE).recipe.method.config.teacher.build(seed=0)
    init = {f"student.net.{k}": v for k, v in teacher.denoiser.state_dict().items()}
    dist = lambda x, y: sum(float((x[k] - y[k]).pow(2).sum()) for k in x)  # noqa: E731
    assert 0 < dist(b, a) < dist(init, a)


def test_guidance_nulls_the_text_and_keeps_what_the_codec_declares():
    """A codec's ``null_keeps`` (here a mask besides ``time_ids``) stays as the batch has it in guidance's
    unconditional half, with zero text (``zero_null``) or the empty caption's encoding; the method hands the
    codec's declaration to the teacher."""
    from lightning_distill.codecs.base import Identity
    from lightning_distill.config.recipe import load_recipe
    from lightning_distill.models.teacher import guided, null_cond

    from support import DEBUG_RECIPE

    torch.manual_seed(0)
    cond = {"text": torch.randn(2, 3, 4), "pooled": torch.randn(2, 4), "time_ids": torch.randn(2, 6),
            "mask": torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])}
    keeps = ("time_ids", "mask")
    zeroed = null_cond(cond, None, keeps)
    assert zeroed["text"].abs().sum() == 0 and zeroed["pooled"].abs().sum() == 0
    assert torch.equal(zeroed["mask"], cond["mask"]) and torch.equal(zeroed["time_ids"], cond["time_ids"])
    assert null_cond(cond, None)["mask"].abs().sum() == 0  # the old rule: only time_ids kept
    empty = {"text": torch.randn(1, 3, 4), "pooled": torch.randn(1, 4)}
    encoded = null_cond(cond, {**empty, "mask": torch.zeros(1, 3)}, keeps)
    assert torch.equal(encoded["text"], empty["text"].expand(2, 3, 4)) and torch.equal(encoded["mask"], cond["mask"])

    seen = {}

    def denoiser(x, t, c):
        seen.update(c)
        return x

    guided(denoiser, 3.0, None, keeps)(torch.randn(2, 1), torch.zeros(2), cond)
    assert torch.equal(seen["mask"], torch.cat([cond["mask"], cond["mask"]]))
    assert seen["text"][:2].abs().sum() == 0 and torch.equal(seen["text"][2:], cond["text"])

    codec = Identity()
    codec.null_keeps = keeps
    recipe = load_recipe(DEBUG_RECIPE).recipe
    phases = recipe.schedule.build().phases()
    method = recipe.method.build(phases=phases, codec=codec, seed=0)
    assert method.build_phase(phases[0], lambda index: {}, empty=True)["teacher"].null_keeps == keeps


def test_x0_conversion_on_a_schedule_with_almost_no_signal_at_t_is_warned_before_anything_loads(caplog):
    """Linear betas leave sqrt(alpha_bar_T) = 0.0064: the x0 target divides by it; SDXL's 0.068 is not warned.
    Loading the recipe (``validate``, the start of ``train``) says so, before any model loads."""
    import logging

    x0 = ["schedule.stages.1.phases.0={kind: x0_convert, steps: 2}"]
    linear = "method.teacher.noise_schedule={name: discrete, beta_schedule: linear, beta_start: 0.0001, beta_end: 0.02}"
    with caplog.at_level(logging.WARNING):
        load_recipe(DEBUG_RECIPE, [*x0, linear])
    assert "sqrt(alpha_bar_T) = 0.0064" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        load_recipe(DEBUG_RECIPE, [*x0, linear.replace("linear,", "scaled_linear,").replace("0.0001", "0.00085")
                                   .replace("0.02}", "0.012}")])
        load_recipe(DEBUG_RECIPE, [linear])  # no x0 conversion: nothing to say
    assert "x0_convert" not in caplog.text


def test_launch_registers_its_exit_handler_once_per_process(monkeypatch):
    """Every ``train`` launches its Fabric; a process that trains several times destroys its group once."""
    import atexit

    from lightning_distill.engine import distributed

    class Launched:
        calls = 0

        def launch(self):
            Launched.calls += 1

    registered = []
    monkeypatch.setattr(atexit, "register", registered.append)
    distributed._register_destroy.cache_clear()
    try:
        for _ in range(3):
            distributed.launch(Launched())
    finally:
        distributed._register_destroy.cache_clear()  # a later launch in this process registers for real
    assert Launched.calls == 3
    assert registered == [distributed._destroy_process_group]


def test_exit_together_flushes_and_exits_with_its_code_skipping_exit_handlers(tmp_path):
    """A finished multi-process helper exits with its status, its output written, and no finalization run."""
    import os
    import subprocess
    import sys

    script = tmp_path / "finish.py"
    script.write_text(
        "import atexit, logging, sys\n"
        "from lightning.fabric import Fabric\n"
        "from lightning_distill.engine.distributed import exit_together\n"
        "atexit.register(lambda: print('finalized', flush=True))\n"
        "logging.basicConfig(stream=sys.stderr, level=logging.INFO)\n"
        "fabric = Fabric(accelerator='cpu', devices=1)\n"
        "print('unflushed stdout', end='')\n"
        "sys.stderr.write('unflushed stderr')\n"
        "exit_together(fabric, 3)\n"
        "print('after exit')\n"
    )
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                          env={k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"})  # piped: buffered
    assert done.returncode == 3, done.stderr[-2000:]
    assert done.stdout == "unflushed stdout"  # flushed; neither the exit handler nor the next line ran
    assert done.stderr.endswith("unflushed stderr")
