"""A toy convolutional denoiser family for tests and the debug recipe."""
