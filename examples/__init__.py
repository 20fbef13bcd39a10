"""prunejax examples: each is a script (``python examples/<name>.py``); helpers are importable."""
