"""Training: config, schedules, checkpoints with exact resume, distributed, the loop."""
