"""The package surface: the flat namespace, optional imports, and the README's promises."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import prunejax as pj

ROOT = Path(__file__).resolve().parents[1]


def test_all_names_exist_and_are_sorted_unique():
    assert len(pj.__all__) == len(set(pj.__all__))
    missing = [name for name in pj.__all__ if not hasattr(pj, name)]
    assert not missing


def test_core_import_pulls_in_neither_keras_nor_tensorflow():
    code = (
        "import sys, prunejax; "
        "print(sorted(m for m in ('keras', 'tensorflow') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_ci_runs_the_readme_test_command_verbatim():
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```(?:bash|sh)?\n(.*?)```", readme, flags=re.S)
    commands = [line.strip() for block in blocks[:2] for line in block.splitlines() if line.strip()]
    assert len(commands) == 2, "the README opens with exactly two commands"
    main_job, tests = commands
    assert "prunejax mnist" in main_job
    assert "pytest" in tests
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert tests in [line.strip() for line in ci]
