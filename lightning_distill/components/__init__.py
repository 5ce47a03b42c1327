"""Built-in components. Importing this package registers them all."""

from . import adapters, cache, codecs, data, discriminator, distill, images, losses, metrics, optim, pretrain, schedule, sdxl, shapes, student, text, toy  # noqa: F401
from .. import callbacks  # noqa: F401
