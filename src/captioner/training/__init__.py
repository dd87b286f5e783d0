"""Training: config, length-bucketed batches, the loop, checkpoints, torchrun support."""
