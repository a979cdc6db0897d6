"""Launch scripts: a TPU pod slice, Dataflow for the data_prep jobs, a multi-host GPU cluster."""
