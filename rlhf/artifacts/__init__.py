"""What stages hand each other: the parquet schema (the contract between stages) and crash-safe file writes."""
