"""Models: making them local, the actors (policy, reference, critic) and their LoRA forward, forward passes, sampling, attention, reward scorers, checkpoints."""
