"""What a user opens after a run: plots, the sample report, the memory table, reward-model accuracy, the exported model."""
