"""prunejax benchmarks: each entry point is run as ``python -m benchmarks.<name>``."""
