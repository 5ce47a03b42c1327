"""Sampling: the one sampler, and the ``sample`` command over runs and exported models."""
