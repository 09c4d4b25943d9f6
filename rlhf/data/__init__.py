"""Prompt data: the TL;DR source, its cleaning, tokenisation, split and per-iteration batches."""
