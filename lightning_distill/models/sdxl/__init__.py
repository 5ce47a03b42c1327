"""The SDXL family (any diffusers ``UNet2DConditionModel``): teacher, denoiser and discriminator backbone."""
