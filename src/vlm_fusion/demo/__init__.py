"""The demo: a synthetic shapes task, tiny checkpoints of each family trained on it, and their evaluation."""
