"""Built-in components. Importing this package registers them all."""

from . import codecs, data, discriminator, distill, losses, optim, schedule, student, toy  # noqa: F401
from .. import callbacks  # noqa: F401
