"""Evaluation: sample every model on the same prompts and noise, score with registered metrics, report."""
