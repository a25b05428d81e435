"""Pieces of the pretraining loop: optimizer/schedule, sampler, checkpoints, logs, distributed setup."""
