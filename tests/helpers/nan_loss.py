"""Test helper imported through a recipe's ``imports:``: a regression loss that turns NaN on chosen calls."""

from __future__ import annotations

import os
from dataclasses import dataclass

from torch import Tensor

from lightning_distill.config.registry import LOSSES
from lightning_distill.models.losses import MSE


@LOSSES.register("nan_at_env")
class NaNAtEnv(MSE):
    """MSE, except on the calls listed in ``$LD_NAN_AT_CALL`` (1-based, comma-separated), where it is NaN."""

    @dataclass(kw_only=True)
    class Config(MSE.Config):
        pass

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self.calls = 0
        self.at = {int(c) for c in os.environ.get("LD_NAN_AT_CALL", "").split(",") if c}

    def __call__(self, pred: Tensor, target: Tensor) -> Tensor:
        self.calls += 1
        loss = super().__call__(pred, target)
        return loss * float("nan") if self.calls in self.at else loss
