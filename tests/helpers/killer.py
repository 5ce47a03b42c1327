"""Test helper imported through a recipe's ``imports:``: a callback that SIGKILLs its process at a given step."""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from typing import Any

from lightning_distill.callbacks import Callback
from lightning_distill.config.registry import CALLBACKS


@CALLBACKS.register("kill_at_env")
class KillAtEnv(Callback):
    """Kills the process (every rank) at the end of step ``$LD_KILL_AT_STEP``; does nothing when it is unset."""

    @dataclass(kw_only=True)
    class Config:
        pass

    def __init__(self, config: Config, *, out_dir: Any = None) -> None:
        self.step = int(os.environ.get("LD_KILL_AT_STEP", "-1"))

    def on_step_end(self, *, step: int, **_: Any) -> None:
        if step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)
