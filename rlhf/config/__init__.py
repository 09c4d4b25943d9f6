"""Typed params (the only source of hyperparameters and paths), named presets and the generated params reference."""
