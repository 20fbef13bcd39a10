import importlib.util
import os
import sys
from collections.abc import Iterator
from types import ModuleType

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_script(name: str, relpath: str) -> Iterator[ModuleType]:
    """Import a script of the repo (e.g. ``benchmarks/run.py``) as module ``name`` for a fixture;
    registered in ``sys.modules`` while in use (dataclasses look their module up)."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, relpath))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    yield mod
    sys.modules.pop(spec.name, None)


@pytest.fixture(scope="session")
def toy_data():
    """A small 3-class classification problem (numpy float32 inputs, int32 labels)."""
    rng = np.random.default_rng(0)
    n, d, k = 512, 20, 3
    centers = rng.normal(scale=2.0, size=(k, d))
    y = rng.integers(0, k, size=n).astype(np.int32)
    x = (centers[y] + rng.normal(size=(n, d))).astype(np.float32)
    return x[:384], y[:384], x[384:], y[384:]
