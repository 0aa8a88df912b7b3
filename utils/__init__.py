"""Helpers with no knowledge of the trainer or the config: errors, checkpoints, seeding, devices, metrics."""
