"""examples/flax_cnn.py end to end on an MNIST subset: the compacted CNN computes what the
masked one computes, at half the widths, with a smaller file and fewer FLOPs."""

from __future__ import annotations

import pytest

from prunejax.apps.mnist.data import find_data_dir


def _mnist_available() -> bool:
    try:
        find_data_dir()
    except FileNotFoundError:
        return False
    return True


@pytest.mark.skipif(not _mnist_available(), reason="MNIST not found offline")
def test_example_runs_small(tmp_path):
    from examples import flax_cnn

    r = flax_cnn.main(
        [
            "--subset",
            "256",
            "--epochs",
            "1",
            "--finetune-epochs",
            "1",
            "--repeats",
            "2",
            "--out",
            str(tmp_path),
        ]
    )
    assert r["widths"] == {
        "params/Conv_0": 16,
        "params/Conv_1": 32,
        "params/Dense_0": 128,
        "params/Dense_1": 10,
    }
    assert r["max_abs_diff"] <= 1e-4
    assert abs(r["accuracy"]["compact"] - r["accuracy"]["masked"]) <= 1 / 256
    assert r["compact"]["bytes"] <= 0.55 * r["dense"]["bytes"]
    assert r["compact"]["flops"] <= 0.55 * r["dense"]["flops"]
    for name in ("dense", "masked", "compact"):
        assert (tmp_path / f"{name}.prunejax.safetensors").stat().st_size == r[name]["bytes"]
    assert (tmp_path / "results.json").exists()
