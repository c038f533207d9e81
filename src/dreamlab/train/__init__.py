"""Trainers. The training loop (checkpoints, EMA, logging, processes) lives apart from the maths."""
