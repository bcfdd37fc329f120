"""A finished run directory as data: its saved job, summary and checkpoints; tables and plots over many runs."""
