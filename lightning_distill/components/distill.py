"""Progressive adversarial diffusion distillation (SDXL-Lightning): the method that owns the step.

Each stage's student learns to take, in one solver step from ``x_t`` to ``x_{t-ns}``, what the frozen teacher
takes ``n`` steps for. A phase regresses the teacher's result (mse) or plays a GAN against a discriminator
that sees ``x_{t-ns}`` (and ``x_t`` when conditional). A stage's final student is the next stage's teacher.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..config import Spec, component
from ..method import ArtifactLoader, Method, Phase
from ..registry import METHODS


@METHODS.register("distill")
class ProgressiveDistillation(Method):
    @dataclass(kw_only=True)
    class Config:
        teacher: component("teacher")  # type: ignore[valid-type]
        student: component("student") = field(default_factory=lambda: {"name": "copy"})  # type: ignore[valid-type]
        discriminator: component("discriminator") = field(  # type: ignore[valid-type]
            default_factory=lambda: {"name": "backbone_head"}
        )
        regression_loss: component("loss") = field(default_factory=lambda: {"name": "mse"})  # type: ignore[valid-type]
        adversarial_loss: component("loss") = field(default_factory=lambda: {"name": "ns_gan"})  # type: ignore[valid-type]
        pure_noise_at_T: bool = True
        """Train on pure noise at t = T (SDXL's schedule never reaches it; sampling starts there)."""
        preview_size: int = 4
        """Samples in each preview grid."""

    def __init__(self, config: Config, *, phases: list[Phase], codec: nn.Module, seed: int = 0) -> None:
        self.config = config
        self.phases = phases
        self.codec = codec
        self.seed = seed
        self.regression = config.regression_loss.build()
        self.adversarial = config.adversarial_loss.build()
        if not getattr(self.adversarial, "adversarial", False):
            raise TypeError(f"adversarial_loss {config.adversarial_loss.name!r} is not an adversarial loss")

    # -- phases -------------------------------------------------------------------------------------------
    def build_phase(self, phase: Phase, artifacts: ArtifactLoader) -> dict[str, nn.Module]:
        c = self.config
        teacher_spec: Spec = c.teacher
        self.phase = phase
        teacher = teacher_spec.build(seed=self.seed)
        earlier = [p for p in self.phases if p.end <= phase.start]
        previous_stage = [p for p in earlier if p.stage != phase.stage]
        if previous_stage:  # this stage's teacher: the last student of the stage before
            state = _strip(artifacts(previous_stage[-1].index), "student.net.")
            teacher.denoiser.load_state_dict(state)
        student = c.student.build(teacher=teacher)
        if earlier:  # continue from the last phase's student
            student.load_state_dict(_strip(artifacts(earlier[-1].index), "student."))
        modules: dict[str, nn.Module] = {"teacher": teacher, "student": student}
        if phase.kind == "adversarial":
            # Re-initialised at every phase: the paper re-initialises the discriminator at each stage, and the
            # conditional and unconditional heads differ in shape anyway.
            modules["discriminator"] = c.discriminator.build(teacher=teacher, conditional=phase.options["conditional"])
        return modules

    def artifact(self) -> dict[str, nn.Module]:
        return {"student": self.modules["student"]}

    # -- steps --------------------------------------------------------------------------------------------
    def _timesteps(self, batch_size: int, device: torch.device) -> Tensor:
        """Per sample: the teacher's ``n + 1`` timesteps from a random student timestep ``t`` to ``t - ns``."""
        o = self.phase.options
        schedule = self.modules["teacher"].schedule
        n = o["teacher_steps"] // o["student_steps"]
        grid = torch.tensor([*schedule.timesteps(o["teacher_steps"]), -1], device=device)
        j = torch.randint(0, o["student_steps"], (batch_size,), device=device)
        return grid[j[:, None] * n + torch.arange(n + 1, device=device)]

    @torch.no_grad()
    def prepare(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        latents = batch["latents"] if "latents" in batch else self.codec.encode(batch["pixels"])
        cond = {k: v for k, v in batch.items() if k not in ("latents", "pixels")}
        teacher = self.modules["teacher"]
        ts = self._timesteps(latents.shape[0], latents.device)
        noise = torch.randn_like(latents)
        x_t = teacher.schedule.add_noise(latents, noise, ts[:, 0], pure_noise_at_T=self.config.pure_noise_at_T)
        target = teacher(x_t, ts, cond, self.phase.options["guidance"])
        return {"x_t": x_t, "t": ts[:, 0], "t_prev": ts[:, -1], "target": target, "cond": cond}  # type: ignore[dict-item]

    def _student_step(self, b: dict) -> Tensor:
        x0, eps = self.modules["student"](b["x_t"], b["t"], b["cond"])
        return self.modules["teacher"].schedule.step(x0, eps, b["t_prev"])

    def _discriminate(self, x_prev: Tensor, b: dict) -> Tensor:
        return self.modules["discriminator"](x_prev, b["t_prev"], b["cond"], b["x_t"], b["t"])

    def training_step(self, batch: dict, optimizer: str) -> tuple[Tensor, dict[str, Tensor]]:
        if self.phase.kind == "mse":
            loss = self.regression(self._student_step(batch), batch["target"])
            return loss, {"loss/mse": loss.detach()}
        if optimizer == "discriminator":
            with torch.no_grad():
                fake = self._student_step(batch)
            real_logits = self._discriminate(batch["target"], batch)
            fake_logits = self._discriminate(fake, batch)
            loss = self.adversarial.discriminator_loss(real_logits, fake_logits)
            return loss, {
                "loss/discriminator": loss.detach(),
                "d/p_real": torch.sigmoid(real_logits.detach().float()).mean(),
                "d/p_fake": torch.sigmoid(fake_logits.detach().float()).mean(),
            }
        fake = self._student_step(batch)
        loss = self.adversarial.generator_loss(self._discriminate(fake, batch))
        with torch.no_grad():
            gap = self.regression(fake, batch["target"])
        return loss, {"loss/generator": loss.detach(), "mse_to_teacher": gap}

    @torch.no_grad()
    def preview(self, batch: dict[str, Tensor]) -> Tensor:
        """The student's samples in ``student_steps`` steps from fixed noise, first three latent channels."""
        latents = batch["latents"] if "latents" in batch else self.codec.encode(batch["pixels"])
        n = min(self.config.preview_size, latents.shape[0])
        cond = {k: v[:n] for k, v in batch.items() if k not in ("latents", "pixels")}
        g = torch.Generator(device="cpu").manual_seed(self.seed)
        x = torch.randn(latents[:n].shape, generator=g).to(latents)
        schedule = self.modules["teacher"].schedule
        steps = [*schedule.timesteps(self.phase.options["student_steps"]), -1]
        for t, t_prev in zip(steps[:-1], steps[1:]):
            x0, eps = self.modules["student"](x, torch.full((n,), t, device=x.device), cond)
            x = schedule.step(x0, eps, torch.full((n,), t_prev, device=x.device))
        images = self.codec.decode(x)[:, :3].float()
        return ((images.clamp(-1, 1) + 1) / 2).cpu()


def _strip(state: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
