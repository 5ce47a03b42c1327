"""Networks and their parts: teacher, student, adapters, discriminator, losses, optimizers, the noise schedule,
and one subfolder per network family."""
