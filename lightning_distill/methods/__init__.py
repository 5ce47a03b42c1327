"""Training methods: each owns its step, its schedule of phases and what a finished phase is."""
