"""Leaves that write: atomic files, strict JSON, attention panels. Imports nothing else of gain_exp."""
