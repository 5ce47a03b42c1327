"""Data sources: synthetic batches, image folders and tar shards, cached latents."""
