"""The committed Deep Compression artifact: ``benchmarks/results/lenet300_compressed<ext>`` loads
with ``pj.load`` into a plain tree ``pj.mlp_apply`` runs, is at least 100x smaller than the dense
float32 file, and its error on MNIST's 10,000 test images is the one ``compression.json`` states.
"""

import json
import os
from pathlib import Path

import jax
import numpy as np
import pytest

import prunejax as pj
from prunejax.apps.mnist.data import find_data_dir, load_mnist

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
ARTIFACT = RESULTS / f"lenet300_compressed{pj.fileformat.EXTENSION}"
ISSUE_DENSE_BYTES = 1_068_942  # the dense float32 LeNet-300-100 file the 100x target refers to


def _mnist_available() -> bool:
    try:
        find_data_dir()
    except FileNotFoundError:
        return False
    return True


@pytest.fixture(scope="module")
def meta():
    if not ARTIFACT.is_file():
        pytest.fail(f"{ARTIFACT} is missing")
    return json.loads((RESULTS / "compression.json").read_text())


def test_artifact_is_what_the_json_says(meta):
    size = os.path.getsize(ARTIFACT)
    assert size == meta["file_bytes"]
    assert size <= ISSUE_DENSE_BYTES // 100 and size <= meta["dense_file_bytes"] // 100
    assert meta["selected_on"] == "validation" and meta["split"] == "test"
    assert len(meta["seeds"]) == 3
    assert meta["command"].startswith("prunejax compress")
    assert meta["test_error_std"] >= 0 and 0 < meta["test_error_mean"] < 0.05


def test_artifact_loads_into_a_plain_tree_mlp_apply_runs(meta):
    params = pj.load(ARTIFACT)
    leaves = jax.tree_util.tree_leaves(params)
    assert all(isinstance(x, np.ndarray) and x.dtype == np.float32 for x in leaves)
    assert [params[f"Dense_{i}"]["kernel"].shape for i in range(3)] == [
        (784, 300),
        (300, 100),
        (100, 10),
    ]
    kept = sum(int(np.count_nonzero(params[f"Dense_{i}"]["kernel"])) for i in range(3))
    stage = next(s for s in meta["stages"] if s["path"].endswith(meta["artifact"]["source"]))
    assert kept <= sum(r["weights_kept"] for r in stage["layers"])


@pytest.mark.skipif(not _mnist_available(), reason="MNIST not found offline")
def test_artifact_test_error_matches_the_json(meta):
    d = load_mnist()
    params = pj.load(ARTIFACT)
    wrong = int(np.sum(np.argmax(np.asarray(pj.mlp_apply(params, d.x_test)), -1) != d.y_test))
    assert wrong / 10_000 == meta["test_error"]
