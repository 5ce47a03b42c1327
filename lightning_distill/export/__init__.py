"""Export: finished phases as diffusers folders and LoRA files (diffusers and ComfyUI names)."""
