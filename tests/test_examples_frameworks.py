"""The framework examples run end to end on an MNIST subset, and their sparse, compacted and
reloaded models give the masked dense model's outputs."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
RTOL, ATOL = 1e-4, 1e-5


def _example(name: str):
    from prunejax.apps.mnist.data import find_data_dir

    try:
        find_data_dir()
    except FileNotFoundError:
        pytest.skip("MNIST not found offline")
    sys.path.insert(0, str(EXAMPLES))
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses (Equinox modules) look their module up
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
@pytest.mark.parametrize(("name", "loaded_type"), [("nnx_mlp", "State"), ("equinox_mlp", "Mlp")])
def test_example_small_run(tmp_path, capsys, name, loaded_type):
    res = _example(name).main(
        ["--subset", "1500", "--steps", "40", "--rounds", "2", "--out", str(tmp_path)]
    )
    assert res["loaded_type"] == loaded_type
    logits = res["logits"]
    ref = logits["pruned (masked dense)"]
    for form in ("sparse (csr)", "compacted", "loaded"):
        np.testing.assert_allclose(logits[form], ref, rtol=RTOL, atol=ATOL, err_msg=form)
    assert not np.allclose(logits["dense"], ref)  # pruning did change the model
    rows = {r["model"]: r for r in res["rows"]}
    assert rows["sparse (csr)"]["accuracy"] == rows["pruned (masked dense)"]["accuracy"]
    assert res["files"]["pruned"] < 0.2 * res["files"]["dense"]
    assert res["files"]["compact"] <= res["files"]["pruned"] * 1.1
    for f in ("dense", "pruned", "compact"):
        assert (tmp_path / f"{f}.safetensors").stat().st_size == res["files"][f]
    out = capsys.readouterr().out
    assert "| sparse (csr) |" in out and "kernel ISA" in out
