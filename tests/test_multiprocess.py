"""Two JAX processes on this machine: global masks, a pruning step and a sharded save/load."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]


def test_two_processes_prune_like_one():
    r = subprocess.run(
        [sys.executable, "-m", "examples.multiprocess_prune"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    for i in range(2):
        assert f"PROCESS {i} OK pruned=538 of 768" in r.stdout, r.stdout + r.stderr
