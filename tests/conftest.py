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


def pytest_addoption(parser):
    parser.addoption(
        "--fuzz-long",
        action="store_true",
        default=False,
        help="run the file fuzz suite (tests/test_fuzz_files.py) with 20x the examples",
    )


@pytest.fixture(scope="session")
def fuzz_examples(request):
    """``n -> examples``: ``n``, or ``20 * n`` under ``--fuzz-long``."""
    factor = 20 if request.config.getoption("--fuzz-long") else 1
    return lambda n: n * factor
