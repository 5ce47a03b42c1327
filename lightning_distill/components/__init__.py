"""Built-in components. Importing this package registers them all."""

from . import adapters, cache, codecs, data, discriminator, distill, images, losses, optim, schedule, sdxl, shapes, student, toy  # noqa: F401
from .. import callbacks  # noqa: F401
