import numpy as np
import pytest


@pytest.fixture(scope="session")
def toy_data():
    """A small 3-class classification problem (numpy float32 inputs, int32 labels)."""
    rng = np.random.default_rng(0)
    n, d, k = 512, 20, 3
    centers = rng.normal(scale=2.0, size=(k, d))
    y = rng.integers(0, k, size=n).astype(np.int32)
    x = (centers[y] + rng.normal(size=(n, d))).astype(np.float32)
    return x[:384], y[:384], x[384:], y[384:]
