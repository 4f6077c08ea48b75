"""Pre-training the image encoder: the training step, losses, schedules, data, probes, checkpoints."""
