"""Results of runs: the Parquet schema, the writer, summary tables and plots."""
