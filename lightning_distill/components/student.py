"""Students: a trainable copy of the teacher's denoiser with its own parameterisation."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Literal

from torch import Tensor, nn

from ..diffusion import NoiseSchedule
from ..registry import STUDENTS
from .teacher import SamplerTeacher


@STUDENTS.register("copy")
class CopyStudent(nn.Module):
    """A full copy of the teacher's denoiser, initialised from it, trained whole.

    ``forward(x_t, t, cond)`` returns ``(x0, ε)`` under the student's parameterisation.
    """

    @dataclass(kw_only=True)
    class Config:
        prediction: Literal["epsilon", "sample", "v_prediction"] = "epsilon"

    def __init__(self, config: Config, *, teacher: SamplerTeacher) -> None:
        super().__init__()
        self.config = config
        self.net = copy.deepcopy(teacher.denoiser).requires_grad_(True).train()
        self.schedule: NoiseSchedule = teacher.schedule

    def forward(self, x_t: Tensor, t: Tensor, cond: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        return self.schedule.split(self.net(x_t, t, cond).to(x_t.dtype), x_t, t, self.config.prediction)

    def fsdp_units(self) -> list[nn.Module]:
        units = getattr(self.net, "fsdp_units", None)
        return units() if units else []
