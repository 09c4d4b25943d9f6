"""RLHF with PPO + LoRA as a reproducible DVC pipeline: one module per stage."""

__version__ = "0.1.0"
