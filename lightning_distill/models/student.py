"""Students: a trainable copy of the teacher's denoiser with its own parameterisation."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from lightning_distill.models.noise import Prediction, Schedule
from lightning_distill.config.registry import STUDENTS
from lightning_distill.models.teacher import SamplerTeacher


@STUDENTS.register("copy")
class CopyStudent(nn.Module):
    """A full copy of the teacher's denoiser, initialised from it, trained whole.

    ``forward(x_t, t, cond)`` returns ``(x0, ε)`` under the student's parameterisation.
    """

    @dataclass(kw_only=True)
    class Config:
        prediction: Prediction | None = None
        """The parameterisation of the first stage (None: the teacher's); a stage's ``prediction`` changes it."""
        dtype: Literal["float32", "bfloat16"] = "float32"
        """Weights of the trained copy (float32 master weights are usual; precision is set in ``fabric``)."""
        gradient_checkpointing: bool = False

    def __init__(self, config: Config, *, teacher: SamplerTeacher, prediction: str | None = None) -> None:
        super().__init__()
        self.config = config
        self.prediction = prediction or config.prediction or teacher.prediction
        self.net = copy.deepcopy(teacher.denoiser).to(getattr(torch, config.dtype)).requires_grad_(True).train()
        if config.gradient_checkpointing and hasattr(self.net, "enable_gradient_checkpointing"):
            self.net.enable_gradient_checkpointing()
        self.schedule: Schedule = teacher.schedule

    def forward(self, x_t: Tensor, t: Tensor, cond: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        return self.schedule.split(self.net(x_t, t, cond).to(x_t.dtype), x_t, t, self.prediction)  # type: ignore[arg-type]

    def fsdp_units(self) -> list[nn.Module]:
        units = getattr(self.net, "fsdp_units", None)
        return units() if units else []
