"""rlhf-dvc: RLHF with PPO + LoRA as a reproducible DVC pipeline. The DVC stages are the scripts in stages/; this package is the library they run."""
