"""Tests of prunejax.report.size_report: bytes per format, file sizes, FLOPs, break-even."""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from mlp_factory import make_mlp

from prunejax.fileformat import save
from prunejax.fileformat.encodings import ROLES
from prunejax.fileformat.plan import leaf_bytes
from prunejax.masks import apply_masks, unit_masks
from prunejax.report import COLUMNS, SizeReport, size_report


def lenet_han():
    return make_mlp([784, 300, 100, 10], [0.08, 0.09, 0.26], seed=0)


def lenet_units():
    params = make_mlp([784, 300, 100, 10], [1.0, 1.0, 1.0], seed=0)
    where = lambda p, leaf: np.ndim(leaf) == 2 and "Dense_2" not in p  # noqa: E731
    return params, apply_masks(params, unit_masks(params, 0.5, where=where))


@pytest.mark.parametrize("activation", [None, jax.nn.relu])
@pytest.mark.parametrize("kind", ["flax", "keras"])
def test_every_format_prediction_matches_the_written_file(tmp_path, kind, activation):
    """The report's predicted file size is within 5% of the real file (it is in fact exact)."""
    params = make_mlp([50, 40, 30, 5], [0.1, 0.3, 0.9], seed=1, kind=kind)
    kernels = [x for x in jax.tree_util.tree_leaves(params) if x.ndim == 2]
    kernels[1][:, :7] = 0  # dead units for compaction
    rep = size_report(params, activation=activation)
    for fmt in COLUMNS:
        act = jax.nn.relu if fmt == "compact" else activation
        size = save(tmp_path / f"{fmt}.safetensors", params, format=fmt, activation=act)
        predicted = rep.predicted_file_bytes[fmt]
        assert abs(size - predicted) <= 0.05 * size, (fmt, size, predicted)
        if fmt != "compact" or activation is not None:
            # exact; without activation= the report cannot know the activation's name, which
            # the compacted file's header records
            assert size == predicted, (fmt, size, predicted)
    assert rep.file_bytes == rep.predicted_file_bytes["auto"]


def test_lenet_prediction_matches_the_file_for_every_format(tmp_path):
    params = lenet_han()
    rep = size_report(params, activation=jax.nn.relu)
    for fmt in COLUMNS:
        size = save(tmp_path / f"{fmt}.safetensors", params, format=fmt, activation=jax.nn.relu)
        assert abs(size - rep.predicted_file_bytes[fmt]) <= 0.05 * size
    assert rep.file_bytes <= rep.predicted_file_bytes["dense"] / 6


def test_per_layer_counts_and_flops():
    params = make_mlp([20, 16, 12, 4], [0.25, 0.5, 1.0], seed=2)
    params["Dense_1"]["kernel"][:, :5] = 0
    rep = size_report(params)
    assert [r.name for r in rep.layers] == ["Dense_0", "Dense_1", "Dense_2"]
    for r, (a, b) in zip(rep.layers, [(20, 16), (16, 12), (12, 4)], strict=True):
        k = params[r.name]["kernel"]
        bias = params[r.name]["bias"]
        assert r.shape == (a, b)
        assert r.params == a * b + b
        assert r.nnz == np.count_nonzero(k) + np.count_nonzero(bias)
        assert r.dense_bytes == 4 * (a * b + b)
        assert r.flops_dense == 2 * a * b
        assert r.flops_sparse == 2 * np.count_nonzero(k)
        assert r.paths == (f"{r.name}/kernel", f"{r.name}/bias")
    # compaction: Dense_1's first 5 units die (and nothing else)
    assert rep.layers[1].compact_shape == (16, 7)
    assert rep.layers[2].compact_shape == (7, 4)
    assert rep.layers[1].flops_compact == 2 * 16 * 7
    t = rep.total()
    assert t["flops_dense"] == 2 * (20 * 16 + 16 * 12 + 12 * 4)
    assert t["flops_compact"] == sum(r.flops_compact for r in rep.layers)
    for c in COLUMNS:
        assert t["bytes"][c] == sum(r.bytes[c] for r in rep.layers)
        # the whole file adds only its JSON header (and padding) to the members
        assert 0 < rep.predicted_file_bytes[c] - t["bytes"][c] < 4000


def test_bytes_per_format_follow_the_documented_model():
    params = make_mlp([784, 300, 10], [0.1, 1.0], seed=3)
    rep = size_report(params)
    r = rep.layers[0]
    nnz_k = int(np.count_nonzero(params["Dense_0"]["kernel"]))
    payload = {
        "dense": 784 * 300 * 4,
        "bitmask": math.ceil(784 * 300 / 8) + 4 * nnz_k,
        "csr": 785 * 2 + nnz_k * (2 + 4),  # uint16 indptr (nnz < 65536), uint16 columns
        "bcoo": nnz_k * (2 * 2 + 4),  # (nnz, 2) uint16 coordinates
    }
    bias = leaf_bytes("dense", (300,), np.float32, 300, index=0)
    for fmt, p in payload.items():
        kernel = r.bytes[fmt] - bias
        n_members = len(ROLES[fmt])
        overhead = kernel - p
        # the member's safetensors header entry (name, dtype, shape, 2 x 20-digit offsets)
        assert n_members * 90 <= overhead <= n_members * 115, (fmt, overhead)


def test_break_even_densities():
    params = make_mlp([784, 300, 10], [0.1, 1.0], seed=3)
    rep = size_report(params)
    be = rep.layers[0].break_even
    assert set(be) == {"bitmask", "csr", "bcoo"}
    # fp32: the bitmask costs 1/32 of dense; uint16 CSR ~ 4/6; uint16 BCOO 4/8
    assert be["bitmask"] == pytest.approx(1 - 1 / 32, abs=0.002)
    assert be["csr"] == pytest.approx(4 / 6, abs=0.01)
    assert be["bcoo"] == pytest.approx(4 / 8, abs=0.01)
    size = 784 * 300
    for fmt, d in be.items():
        n = round(d * size)
        dense = leaf_bytes("dense", (784, 300), np.float32, n, index=1)
        assert leaf_bytes(fmt, (784, 300), np.float32, n, index=1) <= dense
        assert leaf_bytes(fmt, (784, 300), np.float32, n + 1, index=1) > dense


def test_lenet_targets_in_the_report():
    rep = size_report(lenet_han())
    assert rep.file_bytes <= rep.predicted_file_bytes["dense"] / 6
    dense, units = lenet_units()
    rep_d = size_report(dense)
    rep_u = size_report(units)
    assert rep_u.predicted_file_bytes["compact"] <= 0.55 * rep_d.predicted_file_bytes["dense"]
    assert rep_u.total()["flops_compact"] <= 0.55 * rep_d.total()["flops_dense"]
    assert [r.compact_shape for r in rep_u.layers] == [(784, 150), (150, 50), (50, 10)]


def test_str_and_to_dict(tmp_path):
    params = make_mlp([30, 20, 5], [0.2, 0.5], seed=4, kind="keras")
    rep = size_report(params)
    text = str(rep)
    for word in ("layer", "total", "bitmask", "csr", "bcoo", "compact", "FLOPs", "Break-even"):
        assert word in text
    assert "0" in text.splitlines()[2]  # first layer row names the Keras kernel path "0"
    d = rep.to_dict()
    json.dumps(d)
    assert d["total"]["flops_dense"] == 2 * (30 * 20 + 20 * 5)
    assert d["file"]["bytes"] == rep.file_bytes
    assert d["file"]["predicted_bytes"] == rep.file_bytes
    assert [row["name"] for row in d["layers"]] == ["0", "2"]


def test_path_measures_an_existing_file(tmp_path):
    params = make_mlp([30, 20, 5], [0.2, 0.5], seed=4)
    f = tmp_path / "m.safetensors"
    n = save(f, params, format="bcoo")
    rep = size_report(params, path=f)
    assert isinstance(rep, SizeReport)
    assert rep.file_format == "bcoo" and rep.file_bytes == n and rep.file_path == str(f)
    assert rep.predicted_file_bytes["bcoo"] == n
    assert str(f) in str(rep)
    with pytest.raises(FileNotFoundError):
        size_report(params, path=tmp_path / "missing.safetensors")


def test_non_mlp_tree_has_no_compact_column():
    tree = {"a": np.ones((3, 4), np.float32), "b": np.ones((5, 2), np.float32)}
    rep = size_report(tree)
    assert rep.predicted_file_bytes["compact"] is None
    assert all(r.bytes["compact"] is None for r in rep.layers)
    assert rep.total()["flops_compact"] is None
    assert "-" in str(rep)


def test_masks_and_jax_inputs():
    params = make_mlp([30, 20, 5], [1.0, 1.0], seed=5)
    where = lambda p, leaf: np.ndim(leaf) == 2 and "Dense_1" not in p  # noqa: E731
    masks = unit_masks(params, 0.5, where=where)
    a = size_report(jax.tree_util.tree_map(jnp.asarray, params), masks=masks)
    b = size_report(apply_masks(params, masks))
    assert a.layers[0].nnz == b.layers[0].nnz == 30 * 10 + 10
    assert a.layers[0].compact_shape == (30, 10)


def test_bad_input_is_reported_clearly():
    params = make_mlp([6, 4], [0.5])
    with pytest.raises(ValueError, match="unknown format"):
        size_report(params, format="zip")
    params["Dense_0"]["bias"][0] = np.nan
    with pytest.raises(ValueError, match="Dense_0/bias"):
        size_report(params)
