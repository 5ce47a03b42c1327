"""TensorBoard scalars and sample grids, written by rank 0 under ``RUN/tensorboard``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

from lightning_distill.utils.images import image_grid
from lightning_distill.methods.base import Phase
from lightning_distill.config.registry import CALLBACKS
from lightning_distill.callbacks.base import Callback


@CALLBACKS.register("tensorboard")
class TensorBoard(Callback):
    """Scalars every ``train.log_every`` steps (tagged ``PHASE/NAME`` and ``all/NAME``) and image grids."""

    @dataclass(kw_only=True)
    class Config:
        flush_secs: int = 30

    def __init__(self, config: Config, *, out_dir: Path) -> None:
        self.config = config
        self.log_dir = Path(out_dir) / "tensorboard"
        self.writer: Any = None

    def _writer(self, fabric: Any) -> Any:
        if self.writer is None and fabric.is_global_zero:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.log_dir), flush_secs=self.config.flush_secs)
        return self.writer

    def on_log(self, *, fabric: Any, phase: Phase, step: int, metrics: dict[str, float]) -> None:
        writer = self._writer(fabric)
        if writer is None:
            return
        for name, value in metrics.items():
            writer.add_scalar(f"{phase.name}/{name}", value, step)
            writer.add_scalar(f"all/{name}", value, step)

    def on_preview(self, *, fabric: Any, phase: Phase, step: int, images: Tensor) -> None:
        writer = self._writer(fabric)
        if writer is None:
            return
        writer.add_image(f"{phase.name}/samples", image_grid(images), step)

    def on_fit_end(self, **kwargs: Any) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
            self.writer = None

    on_fit_abort = on_fit_end
