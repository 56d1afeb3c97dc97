"""Orbax train-state checkpoints, params-only variables, and restoring a checkpoint's model for evaluation and prediction."""
