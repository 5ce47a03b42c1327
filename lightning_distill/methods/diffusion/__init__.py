"""Plain diffusion training of a denoiser from scratch (how the tiny world's teacher is made)."""
