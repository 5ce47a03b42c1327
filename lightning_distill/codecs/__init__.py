"""Codecs: pixels <-> latents and captions -> conditioning."""
