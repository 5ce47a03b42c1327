"""Worlds made by code, where the method can be run and measured end to end on a CPU."""
