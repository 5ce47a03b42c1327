"""Loop callbacks: hooks fired with ``fabric.call("on_...")``. Importing this package registers them."""

from lightning_distill.callbacks.base import Callback
from lightning_distill.callbacks import ema, progress, report, tensorboard  # noqa: F401

__all__ = ["Callback"]
