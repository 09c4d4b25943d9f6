"""How stages run: the stage runner, warm start, data parallelism, seeds, progress and logs."""
