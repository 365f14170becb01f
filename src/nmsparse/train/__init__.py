"""Training: the reference loop, data, checkpoints, distributed set-up, logs."""
