"""Training machinery: build the experiment, the loop, evaluation, checkpoints, processes, signals, provenance."""
