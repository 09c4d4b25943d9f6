"""What the advantages and update stages compute, between reading their parquet inputs and writing their outputs."""
