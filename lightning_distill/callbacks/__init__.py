"""Loop callbacks: hooks fired with ``fabric.call("on_...")``. Importing this package registers them."""

from .base import Callback
from . import ema, progress, report, tensorboard  # noqa: F401

__all__ = ["Callback"]
