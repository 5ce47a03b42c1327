"""Progressive adversarial diffusion distillation (SDXL-Lightning): the method and its stage ladder."""
