"""Adversarial objectives, discriminator regularisers, lazy regularisation and the student EMA: exact values on
small tensors, checked against hand computations and explicit ``torch.autograd.grad``."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lightning_distill.config.recipe import load_recipe
from lightning_distill.config.registry import LOSSES, REGULARIZERS
from lightning_distill.models.regularizers import discriminator_step_index, regularizer_due
from support import DEBUG_RECIPE

REAL = torch.tensor([2.0, -1.0, 0.5])
FAKE = torch.tensor([-3.0, 0.0, 1.5])


def _loss(name, **fields):
    cls = LOSSES.get(name)
    return cls(cls.Config(**fields))


def sp(x):  # softplus, by hand
    return math.log1p(math.exp(x))


def test_ns_gan_by_hand():
    loss = _loss("ns_gan")
    d = sum(sp(-r) for r in REAL.tolist()) / 3 + sum(sp(f) for f in FAKE.tolist()) / 3
    assert float(loss.discriminator_loss(REAL, FAKE)) == pytest.approx(d, rel=1e-6)
    assert float(loss.generator_loss(FAKE)) == pytest.approx(sum(sp(-f) for f in FAKE.tolist()) / 3, rel=1e-6)


def test_hinge_by_hand():
    loss = _loss("hinge", margin=1.0)
    # relu(1 - [2, -1, .5]) = [0, 2, .5]; relu(1 + [-3, 0, 1.5]) = [0, 1, 2.5]
    assert float(loss.discriminator_loss(REAL, FAKE)) == pytest.approx(2.5 / 3 + 3.5 / 3)
    assert float(loss.generator_loss(FAKE)) == pytest.approx(1.5 / 3)


def test_lsgan_by_hand_lives_in_the_package():
    loss = _loss("lsgan", target=1.0)
    assert type(loss).__module__ == "lightning_distill.models.losses"
    # (real - 1)^2 = [1, 4, .25]; fake^2 = [9, 0, 2.25]; (fake - 1)^2 = [16, 1, .25]
    assert float(loss.discriminator_loss(REAL, FAKE)) == pytest.approx(5.25 / 3 + 11.25 / 3)
    assert float(loss.generator_loss(FAKE)) == pytest.approx(17.25 / 3)


def test_rpgan_pairs_each_real_with_its_fake():
    loss = _loss("rpgan")
    assert loss.relativistic
    # real - fake per pair: [5, -1, -1]
    assert float(loss.discriminator_loss(REAL, FAKE)) == pytest.approx((sp(-5) + sp(1) + sp(1)) / 3, rel=1e-6)
    assert float(loss.generator_loss(FAKE, REAL)) == pytest.approx((sp(5) + sp(-1) + sp(-1)) / 3, rel=1e-6)
    # pairing, not pooling: shuffling the fakes changes the loss
    assert float(loss.discriminator_loss(REAL, FAKE.flip(0))) != pytest.approx(float(loss.discriminator_loss(REAL, FAKE)))
    # the student's gradient flows through the fake logits only
    real, fake = REAL.clone().requires_grad_(True), FAKE.clone().requires_grad_(True)
    loss.generator_loss(fake, real).backward()
    assert real.grad is None and fake.grad is not None and bool((fake.grad < 0).all())
    with pytest.raises(ValueError, match="pass real"):
        loss.generator_loss(FAKE)


@pytest.mark.parametrize("name, fields, by_hand", [
    ("ns_gan", {}, 2 * math.log(2)),   # logit 0: -log ½ twice
    ("hinge", {"margin": 2.0}, 4.0),   # any logit in [-2, 2]: relu(2 - c) + relu(2 + c) = 4
    ("lsgan", {"target": 0.5}, 0.125),  # logit ¼: (¼ - ½)² + ¼²
    ("rpgan", {}, math.log(2)),        # equal logits: softplus(0)
])
def test_each_losses_chance_is_the_least_loss_of_a_discriminator_that_cannot_tell_samples_apart(name, fields, by_hand):
    """``chance()``: the loss of the best constant logit, by hand, and no constant on a fine grid does better; the
    generic search (for a plugin's loss that lacks it) finds the same value."""
    from lightning_distill.models.losses import chance_loss

    loss = _loss(name, **fields)
    assert loss.chance() == pytest.approx(by_hand, abs=1e-9)
    grid = torch.linspace(-8, 8, 16001)
    least = min(float(loss.discriminator_loss(torch.full((2,), c), torch.full((2,), c))) for c in grid.tolist())
    assert least == pytest.approx(by_hand, abs=1e-6)

    class Plugin:  # a third-party loss with only the registry's contract
        adversarial = True

        def discriminator_loss(self, real, fake):
            return loss.discriminator_loss(real, fake)

    assert chance_loss(Plugin()) == pytest.approx(by_hand, abs=1e-4)


class Quadratic(nn.Module):
    """``D(x)_i = Σ_j w_j x_ij²``: gradient ``2 w x``, by hand."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor([0.5, -1.0, 2.0]))

    def forward(self, x):
        return (self.w * x.square()).sum(1)


def _reg(name, **fields):
    cls = REGULARIZERS.get(name)
    return cls(cls.Config(**fields))


@pytest.mark.parametrize("name", ["r1", "r2"])
def test_r1_and_r2_match_an_explicit_gradient(name):
    torch.manual_seed(0)
    d = Quadratic()
    real, fake = torch.randn(4, 3), torch.randn(4, 3)
    value = _reg(name)(d, real, fake, d(real), d(fake))
    x = (real if name == "r1" else fake).clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(d(x).sum(), x)
    assert torch.allclose(grad, 2 * d.w.detach() * x.detach())  # the hand computation
    expected = (grad.square().sum(1)).mean()
    assert float(value.detach()) == pytest.approx(float(expected), rel=1e-6)
    value.backward()  # the penalty trains D: d/dw of mean Σ 4 w² x² = mean 8 w x²
    by_hand = (8 * d.w.detach() * x.detach().square()).mean(0)
    assert torch.allclose(d.w.grad, by_hand, rtol=1e-5)


def test_approximate_r1_is_a_finite_difference_on_real_inputs():
    torch.manual_seed(0)
    a = nn.Parameter(torch.tensor([1.0, -2.0, 0.5]))

    def d(x):
        return (a * x).sum(1)

    real, fake = torch.randn(5, 3), torch.randn(5, 3)
    reg = _reg("approx_r1", sigma=0.1)
    torch.manual_seed(7)
    value = reg(d, real, fake, d(real), d(fake))
    torch.manual_seed(7)
    eps = torch.randn_like(real)
    expected = (0.1 * (a.detach() * eps).sum(1)).square().mean()  # D linear: D(x) - D(x + σε) = -σ a·ε
    assert float(value.detach()) == pytest.approx(float(expected), rel=1e-5)
    value.backward()
    assert a.grad is not None and float(a.grad.abs().sum()) > 0  # a single backward reaches D's weights


def test_pair_centering_penalises_what_a_pair_shares_and_leaves_its_gap_alone():
    real = REAL.clone().requires_grad_(True)
    fake = FAKE.clone().requires_grad_(True)
    value = _reg("pair_centering")(None, None, None, real, fake)
    # shared parts (2 - 3) / 2, (-1 + 0) / 2, (0.5 + 1.5) / 2 = -0.5, -0.5, 1.0: mean of squares 1.5 / 3
    assert float(value.detach()) == pytest.approx(0.5)
    value.backward()
    shared = torch.tensor([-0.5, -0.5, 1.0])
    assert torch.allclose(real.grad, shared / 3) and torch.allclose(fake.grad, shared / 3)  # d/dr = d/df = s / n
    # hence no gradient along the gap r - f: moving both logits of a pair apart by the same amount costs nothing
    gap = torch.tensor([0.3, -2.0, 1.0])
    moved = _reg("pair_centering")(None, None, None, REAL + gap, FAKE - gap)
    assert float(moved) == pytest.approx(0.5)
    assert float(_reg("pair_centering")(None, None, None, REAL, -REAL)) == 0.0


def test_lazy_regularisation_steps_on_the_right_iterations():
    assert [i for i in range(10) if regularizer_due(i, 4)] == [0, 4, 8]
    assert all(regularizer_due(i, 1) for i in range(5))
    loaded = load_recipe(DEBUG_RECIPE, ["schedule.stages.1.phases.0.steps=12",
                                        "schedule.stages.1.phases.0.discriminator_every=2",
                                        "schedule.stages.1.phases.0.discriminator_warmup=0"])
    phase = loaded.recipe.schedule.build().phases()[1]
    stepping = [s for s in range(phase.start, phase.end) if "discriminator" in phase.optimizers_at(s)]
    assert [discriminator_step_index(phase, s) for s in stepping] == list(range(6))
    due = [s - phase.start for s in stepping if regularizer_due(discriminator_step_index(phase, s), 2)]
    assert due == [0, 4, 8]  # every second discriminator step, which steps every second iteration


def _method(*overrides):
    recipe = load_recipe(DEBUG_RECIPE, list(overrides)).recipe
    phases = recipe.schedule.build().phases()
    return recipe, phases, recipe.method.build(phases=phases, codec=recipe.codec.build(), seed=0)


def _adversarial_phase(tmp_path, *overrides):
    """The method set up for its first adversarial phase (after an MSE phase), and a batch of 4."""
    from torch.utils.data import default_collate

    from lightning_distill.engine.artifacts import Artifacts

    recipe, phases, method = _method(*overrides)
    artifacts = Artifacts(tmp_path, None, {p.index: p.name for p in phases})
    artifacts.fabric = type("F", (), {"is_global_zero": True, "barrier": lambda self: None})()
    method.attach(method.build_phase(phases[0], artifacts))
    method.phase = phases[0]
    artifacts.save(0, method.artifact())
    phase = phases[1]
    method.attach(method.build_phase(phase, artifacts))
    data = recipe.data.build(seed=0)
    return method, phase, default_collate([data[i] for i in range(4)])


def test_pair_accuracy_reads_the_ranking_that_an_offset_hides_from_accuracy(tmp_path):
    """``d/accuracy`` thresholds each logit at 0; ``d/pair_accuracy`` compares each teacher sample's logit with
    the student sample's made from the same x_t. A discriminator whose logits are all shifted above 0 is at
    chance by the first and ranks by the second."""
    method, phase, batch = _adversarial_phase(tmp_path)
    seen = []

    class Shifted(nn.Module):  # a fixed function of the judged latents, shifted so that every logit is positive
        def forward(self, x, t_prev, cond, x_t=None, t=None):
            seen.append(x.flatten(1).mean(1) + 100.0)
            return seen[-1]

    method.modules["discriminator"] = Shifted()
    torch.manual_seed(3)
    _, logs = method.training_step(method.prepare(batch, phase.start), "discriminator")
    real, fake = seen
    assert float(logs["d/accuracy"]) == 0.5
    # the loss over its value at chance (ns_gan: 2 ln 2): far above 1 for a discriminator this wrong about fakes
    assert float(logs["d/loss_ratio"]) == pytest.approx(float(logs["loss/discriminator"]) / (2 * math.log(2)), rel=1e-6)
    assert float(logs["d/loss_ratio"]) > 10
    assert float(logs["d/pair_accuracy"]) == pytest.approx(float((real > fake).float().mean()))
    assert 0 < float(logs["d/pair_accuracy"]) < 1  # the student's samples differ from the teacher's, both ways
    # the gap that ranks the pairs, and the spread of what each pair shares (here the offset 100 cancels in both)
    assert float(logs["d/margin"]) == pytest.approx(float((real - fake).mean()), abs=1e-5)
    assert float(logs["d/shared_spread"]) == pytest.approx(float(((real + fake) / 2 - 100).std(correction=0)), rel=1e-3)


def test_accuracy_at_the_lowest_renoise_level_counts_only_the_pairs_renoised_there(tmp_path):
    """``d/accuracy_lowest``: the accuracy over the pairs whose clean samples were re-noised to the phase's lowest
    level, beside their share of the batch; a pair judged at that timestep without re-noising, or re-noised higher,
    does not count."""
    stage = "schedule.stages.1.phases.0."
    method, phase, batch = _adversarial_phase(tmp_path, f"{stage}renoise_timesteps=[10, 250]")
    logits = iter([torch.tensor([1.0, -1.0, 1.0, -1.0]), torch.tensor([-1.0, -1.0, 1.0, 1.0])])  # real, then fake

    class Fixed(nn.Module):
        def forward(self, x, t_prev, cond, x_t=None, t=None):
            return next(logits)

    method.modules["discriminator"] = Fixed()
    torch.manual_seed(3)
    prepared = method.prepare(batch, phase.start)
    assert "t_disc" in prepared
    # pair 0 right on both sides, 1 and 2 half right, 3 wrong on both; pairs 0 and 2 re-noised to the lowest level,
    # 1 re-noised to 250, 3 judged at timestep 10 but not re-noised (its sample was not clean)
    prepared |= {"renoise": torch.tensor([True, True, True, False]), "t_disc": torch.tensor([10, 250, 10, 10])}
    _, logs = method.training_step(prepared, "discriminator")
    assert float(logs["d/accuracy"]) == 0.5
    assert float(logs["d/accuracy_lowest"]) == 0.75 and float(logs["d/lowest_share"]) == 0.5
    # the same logits as a column (a plugin discriminator's (B, 1)): the same accuracy, per pair
    logits = iter([torch.tensor([[1.0], [-1.0], [1.0], [-1.0]]), torch.tensor([[-1.0], [-1.0], [1.0], [1.0]])])
    _, logs = method.training_step(prepared, "discriminator")
    assert float(logs["d/accuracy_lowest"]) == 0.75 and float(logs["d/lowest_share"]) == 0.5
    # a batch with no pair at the lowest level: share 0 (the report's pooling ignores its accuracy)
    logits = iter([torch.ones(4), -torch.ones(4)])
    prepared["t_disc"] = torch.tensor([250, 250, 250, 10])
    _, logs = method.training_step(prepared, "discriminator")
    assert float(logs["d/lowest_share"]) == 0.0 and float(logs["d/accuracy_lowest"]) == 0.0
    # without discrete re-noise levels the phase logs neither
    method, phase, batch = _adversarial_phase(tmp_path / "none")
    torch.manual_seed(3)
    _, logs = method.training_step(method.prepare(batch, phase.start), "discriminator")
    assert "d/accuracy_lowest" not in logs and "d/lowest_share" not in logs and "d/accuracy" in logs


def test_logs_over_part_of_a_batch_are_pooled_across_ranks_by_their_share():
    """TensorBoard's ``d/accuracy_lowest`` over two ranks (threads standing in for them, one all-reduce at a time):
    weighted by each rank's ``d/lowest_share``, as the report pools it over steps, while other logs take the plain
    mean; no pair at the lowest level on any rank gives 0, and one rank gives its own value unchanged."""
    import threading

    from lightning_distill.engine.loop import reduce_logs
    from lightning_distill.methods.lightning.method import ProgressiveDistillation

    weights = ProgressiveDistillation.log_weights
    assert weights == {"d/accuracy_lowest": "d/lowest_share"}

    class Rank:
        device = "cpu"

        def __init__(self, rank, world, board, barrier):
            self.rank, self.world_size, self.board, self.barrier = rank, world, board, barrier

        def all_reduce(self, tensor, reduce_op):
            self.board[self.rank] = tensor.clone()
            self.barrier.wait()
            total = sum(self.board[r] for r in range(self.world_size))
            self.barrier.wait()  # every rank has read the board before the next collective writes it
            return total if reduce_op == "sum" else total / self.world_size

    def reduce(per_rank):
        world, board, out = len(per_rank), {}, {}
        barrier = threading.Barrier(world)
        threads = [threading.Thread(target=lambda r=r: out.__setitem__(r, reduce_logs(
            Rank(r, world, board, barrier), {k: torch.tensor(v) for k, v in per_rank[r].items()}, weights)))
            for r in range(world)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert out[0] == out[world - 1]  # every rank logs the same
        return out[0]

    logs = reduce([{"d/accuracy": 0.75, "d/accuracy_lowest": 1.0, "d/lowest_share": 0.25},
                   {"d/accuracy": 0.25, "d/accuracy_lowest": 0.0, "d/lowest_share": 0.75}])
    assert logs["d/accuracy_lowest"] == pytest.approx(0.25)  # (1.0 * 0.25 + 0.0 * 0.75) / 1.0; a plain mean: 0.5
    assert logs["d/accuracy"] == pytest.approx(0.5) and logs["d/lowest_share"] == pytest.approx(0.5)
    none = reduce([{"d/accuracy_lowest": 0.0, "d/lowest_share": 0.0}, {"d/accuracy_lowest": 0.0, "d/lowest_share": 0.0}])
    assert none["d/accuracy_lowest"] == 0.0
    one = reduce([{"d/accuracy_lowest": 0.6, "d/lowest_share": 0.0}])
    assert one["d/accuracy_lowest"] == pytest.approx(0.6)


def test_the_discriminator_step_adds_each_due_regulariser_with_its_weight(tmp_path):
    method, phase, batch = _adversarial_phase(tmp_path, "method.adversarial_loss.name=rpgan",
                                              "method.regularizers=[{name: r1, weight: 0.5, every: 2}, {name: approx_r1}]")
    losses = {}
    for step in (phase.start, phase.start + 1):  # disc steps 0 (r1 due) and 1 (not due)
        torch.manual_seed(3)
        prepared = method.prepare(batch, step)
        torch.manual_seed(4)
        loss, logs = method.training_step(prepared, "discriminator")
        losses[step - phase.start] = (loss, logs)
    (loss0, logs0), (loss1, logs1) = losses[0], losses[1]
    assert "reg/r1" in logs0 and "reg/r1" not in logs1 and "reg/approx_r1" in logs0 and "reg/approx_r1" in logs1
    expected = logs0["loss/discriminator"] + 0.5 * 2 * logs0["reg/r1"] + logs0["reg/approx_r1"]
    assert float(loss0.detach()) == pytest.approx(float(expected), rel=1e-5)
    loss, logs = method.training_step(prepared, "student")
    assert "loss/generator" in logs and torch.isfinite(loss)


def test_the_regression_anchor_adds_its_weight_times_the_distance_to_the_teachers_step(tmp_path):
    """``regression_weight``: the student's loss is the adversarial loss plus the weight times the regression to the
    teacher's x_{t-ns}, and that term's gradient reaches the student (checked against the gradient of the MSE
    alone); 0 leaves the paper's pure adversarial loss. An MSE phase refuses the option."""
    losses, grads = {}, {}
    for weight in (0.0, 2.0):
        torch.manual_seed(0)  # the same fresh discriminator for both
        method, phase, batch = _adversarial_phase(tmp_path / str(weight),
                                                  f"schedule.stages.1.phases.0.regression_weight={weight}")
        torch.manual_seed(3)
        prepared = method.prepare(batch, phase.end - 1)
        student = method.modules["student"]
        loss, logs = method.training_step(prepared, "student")
        losses[weight] = (float(loss.detach()), float(logs["loss/generator"]), float(logs["mse_to_teacher"]))
        grads[weight] = torch.autograd.grad(loss, list(student.parameters()))
        mse = method.regression(method._student_step(prepared), prepared["target"])
        grads["mse"] = torch.autograd.grad(mse, list(student.parameters()))
    (l0, g0, m0), (l2, g2, m2) = losses[0.0], losses[2.0]
    assert l0 == pytest.approx(g0) and (g0, m0) == pytest.approx((g2, m2), rel=1e-6)
    assert l2 == pytest.approx(g2 + 2.0 * m2, rel=1e-6) and m2 > 0
    for a, b, m in zip(grads[0.0], grads[2.0], grads["mse"]):
        torch.testing.assert_close(b - a, 2.0 * m, rtol=1e-4, atol=1e-7)
    with pytest.raises(Exception, match="regression_weight apply to adversarial phases only"):
        load_recipe(DEBUG_RECIPE, ["schedule.stages.0.phases.0.regression_weight=1"]).recipe.schedule.build().phases()


def _ema_run(callback, weights, phase):
    """Phase start, then each weight vector as the live weights after a step, then the phase's result."""
    net = nn.Linear(1, 2, bias=False)
    modules = {"student": net}
    with torch.no_grad():
        net.weight.copy_(torch.tensor([[0.0], [0.0]]))
    callback.on_phase_start(modules=modules, phase=phase, step=phase.start)
    for i, w in enumerate(weights):
        with torch.no_grad():
            net.weight.copy_(torch.tensor(w).reshape(2, 1))
        callback.on_step_end(modules=modules, phase=phase, step=phase.start + i + 1)
    callback.on_phase_result(modules=modules, phase=phase)
    return net.weight.detach().flatten().tolist()


def test_the_method_ema_hands_on_the_averaged_weights():
    from lightning_distill.methods.lightning.method import ProgressiveDistillation

    recipe, phases, _ = _method("method.ema={decay: 0.5, start: 1, warmup: false}")
    (ema,) = ProgressiveDistillation.callbacks(recipe.method.config)
    adversarial, mse = phases[1], phases[0]
    # start 1: after the first step the average is that step's weights; then shadow = .5 shadow + .5 w
    got = _ema_run(ema, [[1.0, 2.0], [3.0, 4.0], [5.0, 8.0]], adversarial)
    expected = [0.5 * (0.5 * 1 + 0.5 * 3) + 0.5 * 5, 0.5 * (0.5 * 2 + 0.5 * 4) + 0.5 * 8]
    assert got == pytest.approx(expected)
    ema.on_phase_end()
    # MSE phases are not averaged by default (kinds: [adversarial]): the live weights are handed on
    assert _ema_run(ema, [[1.0, 2.0], [3.0, 4.0]], mse) == pytest.approx([3.0, 4.0])
    assert ProgressiveDistillation.callbacks(load_recipe(DEBUG_RECIPE, []).recipe.method.config) == []


def test_logit_normal_renoising_draws_levels_at_the_same_signal_to_noise_ratio(tmp_path):
    """LADD's re-noise distribution: flow σ = sigmoid(m + s z), mapped to the teacher's timestep of the same log-SNR;
    only clean targets are re-noised. Discrete levels and the logit-normal draw do not mix."""
    from lightning_distill.errors import UserError

    stage = "schedule.stages.1.phases.0."
    recipe, phases, method = _method(f"{stage}renoise_distribution=logit_normal", f"{stage}renoise_mean=1.0",
                                     f"{stage}renoise_scale=0.5")
    phase = phases[1]
    assert phase.options.renoises and phase.options.renoise_distribution == "logit_normal"
    teacher = recipe.method.config.teacher.build(seed=0)
    method.attach({"teacher": teacher})
    method.phase = phase
    like = torch.zeros(4000, 4, 8, 8)
    t_prev = torch.where(torch.arange(4000) % 2 == 0, -1, 500)
    torch.manual_seed(0)
    plan = method._renoise_plan(t_prev, like, phase.start)
    assert torch.equal(plan["renoise"], t_prev < 0)
    assert torch.equal(plan["t_disc"][t_prev >= 0], t_prev[t_prev >= 0])  # intermediate targets stay as they are
    levels = plan["t_disc"][t_prev < 0]
    snr = teacher.schedule.log_snr(levels, like[:1]).double()
    # log-SNR = -2 (1 + 0.5 z): mean -2, sd 1, up to the grid's spacing
    assert float(snr.mean()) == pytest.approx(-2.0, abs=0.1) and float(snr.std()) == pytest.approx(1.0, abs=0.1)
    with pytest.raises(UserError, match="renoise_timesteps apply to renoise_distribution: discrete"):
        _method(f"{stage}renoise_distribution=logit_normal", f"{stage}renoise_timesteps=[10, 250]")
