"""The Deep Compression pipeline (``prunejax compress``): its pieces and a tiny end-to-end run."""

import json
import os

import jax
import numpy as np
import pytest

import prunejax as pj
from prunejax.apps.mnist import compress as C
from prunejax.apps.mnist.cli import build_parser, main
from prunejax.apps.mnist.data import find_data_dir


def _mnist_available() -> bool:
    try:
        find_data_dir()
    except FileNotFoundError:
        return False
    return True


needs_mnist = pytest.mark.skipif(not _mnist_available(), reason="MNIST not found offline")


def _lenet():
    return pj.MLP().init(jax.random.PRNGKey(0), np.zeros((1, 784), np.float32))["params"]


@pytest.mark.parametrize("allocation", C.ALLOCATIONS)
@pytest.mark.parametrize("density", [0.02, 0.08])
def test_kernel_allocation_keeps_the_overall_density(allocation, density):
    params = _lenet()
    targets = C.kernel_allocation(params, density, allocation)
    assert set(targets) == {"Dense_0/kernel", "Dense_1/kernel", "Dense_2/kernel"}
    sizes = {f"{n}/kernel": params[n]["kernel"].size for n in params}
    kept = sum((1 - targets[k]) * sizes[k] for k in sizes)
    assert kept == pytest.approx(density * sum(sizes.values()), rel=1e-6)
    if allocation == "han":  # Han et al.'s 8 : 9 : 26 proportions
        d = [1 - targets[f"Dense_{i}/kernel"] for i in range(3)]
        assert d[1] / d[0] == pytest.approx(9 / 8) and d[2] / d[0] == pytest.approx(26 / 8)


def test_kernel_allocation_rejects_bad_input():
    with pytest.raises(ValueError, match="density"):
        C.kernel_allocation(_lenet(), 0.0, "erk")
    with pytest.raises(ValueError, match="allocation"):
        C.kernel_allocation(_lenet(), 0.1, "uniformish")


def test_quantize_model_shares_weights_and_keeps_the_masks():
    rng = np.random.default_rng(0)
    params = jax.tree_util.tree_map(lambda x: rng.normal(size=x.shape).astype(np.float32), _lenet())
    masks = pj.magnitude_masks(params, 0.9)
    params = pj.apply_masks(params, masks)
    q = C.quantize_model(params, masks, 3, bias_bits=2)
    for n in params:
        k, b = q[n]["kernel"], q[n]["bias"]
        assert isinstance(k, pj.Quantized) and isinstance(b, pj.Quantized)
        assert k.bits == 3 and b.bits == 2
        np.testing.assert_array_equal(np.asarray(k.mask), np.asarray(masks[n]["kernel"]))
        assert np.asarray(b.mask).all()
        w = pj.dequantize(q)[n]["kernel"]
        assert len(np.unique(w[np.asarray(masks[n]["kernel"])])) <= 8
        assert not np.any(w[~np.asarray(masks[n]["kernel"])])
    rows = C.layer_rows(q)
    assert [r["weights_kept"] for r in rows] == [
        int(np.count_nonzero(masks[n]["kernel"])) for n in ("Dense_0", "Dense_1", "Dense_2")
    ]
    # the layers' bytes by part are the file's, minus the file's own overhead
    report = pj.size_report(q)
    assert sum(r["bytes"] for r in rows) <= report.file_bytes
    assert sum(r["parts"]["indices"] for r in rows) == report.breakdown["indices"]
    assert all(r["bits_per_index"] > 0 and r["value_bits"] <= 3 + 1e-9 for r in rows)


def _row(stage, d, b, val, nbytes, test=None):
    return {
        "stage": stage,
        "density": d,
        "bits": b,
        "bias_bits": 0,
        "file_bytes": nbytes,
        "file_bytes_max": nbytes,
        "val_error_mean": val,
        "test_error_mean": test,
    }


def test_select_uses_the_validation_error_and_the_size_limit_only():
    rows = [
        _row("compressed", 0.02, 4, 0.020, 9_000, test=0.010),
        _row("compressed", 0.03, 4, 0.018, 10_000, test=0.030),
        _row("compressed", 0.05, 5, 0.015, 20_000, test=0.001),
        _row("pruned", 0.02, None, 0.001, 5_000),
    ]
    assert C.select(rows, 10_689)["density"] == 0.03  # best validation error that fits
    assert C.select(rows, 30_000)["density"] == 0.05
    assert C.select(rows, 8_000) is None  # the pruned row is not a candidate
    front = C.pareto(rows)
    assert [r["density"] for r in front] == [0.02, 0.03, 0.05]


def test_command_line_rejects_bad_points_and_settings(capsys):
    p = build_parser()
    with pytest.raises(SystemExit):
        p.parse_args(["compress", "--points", "0.02"])
    args = p.parse_args(["compress", "--points", "1.5/4"])
    with pytest.raises(ValueError, match="density"):
        C.points_of(args)
    args = p.parse_args(["compress", "--points", "0.1/17"])
    with pytest.raises(ValueError, match="bits"):
        C.points_of(args)
    args = p.parse_args(["compress", "--lr", "-1"])
    with pytest.raises(ValueError, match="--lr"):
        C.settings_of(args)
    assert main(["compress", "--prune-fraction", "0", "--out", "/nonexistent/x"]) == 2
    assert "--prune-fraction" in capsys.readouterr().err


@needs_mnist
def test_compress_end_to_end_on_a_tiny_subset(tmp_path):
    argv = [
        "compress",
        "--split",
        "test",
        "--points",
        "0.01/3/0,0.01/3/4",
        "--seeds",
        "0",
        "--train-limit",
        "512",
        "--batch-size",
        "128",
        "--dense-epochs",
        "1",
        "--prune-epochs",
        "1",
        "--quant-epochs",
        "1",
        "--update-every",
        "1",
        "--out",
        str(tmp_path),
    ]
    assert main(argv) == 0
    res = json.loads((tmp_path / "compression.json").read_text())
    assert res["selected_on"] == "validation" and res["split"] == "test"
    assert res["command"] == "prunejax " + " ".join(argv)
    from prunejax.apps.mnist.data import load_mnist

    d = load_mnist()
    comp = [s for s in res["stages"] if s["stage"] == "compressed"]
    assert {(s["bits"], s["bias_bits"]) for s in comp} == {(3, 0), (3, 4)}
    for s in res["stages"]:
        path = s["path"]
        assert os.path.getsize(path) == s["file_bytes"]
        loaded = pj.load(path)  # a plain float tree mlp_apply runs
        assert all(np.asarray(x).dtype == np.float32 for x in jax.tree_util.tree_leaves(loaded))
        err = float(np.sum(np.argmax(pj.mlp_apply(loaded, d.x_test), -1) != d.y_test)) / 10_000
        assert err == s["test_error"]
    for s in comp:
        assert s["no_entropy_bytes"] >= s["file_bytes"]  # auto never loses to fixed width
        q = pj.load(s["path"], quantized=True)
        k = q["Dense_0"]["kernel"]
        assert isinstance(k, pj.Quantized) and k.bits == 3
        assert int(np.count_nonzero(np.asarray(k.mask))) == s["layers"][0]["weights_kept"]
        assert isinstance(q["Dense_0"]["bias"], pj.Quantized) == (s["bias_bits"] == 4)
    pruned = next(s for s in res["stages"] if s["stage"] == "pruned")
    assert pruned["file_bytes"] > max(s["file_bytes"] for s in comp)
    # the artifact: the smallest file of the configuration chosen on validation for 100x
    art = tmp_path / f"lenet300_compressed{pj.fileformat.EXTENSION}"
    assert res["file_bytes"] == os.path.getsize(art) <= res["dense_file_bytes"] // 100
    err = float(np.sum(np.argmax(pj.mlp_apply(pj.load(art), d.x_test), -1) != d.y_test))
    assert err / 10_000 == res["test_error"]
    assert res["test_error_std"] == 0.0 and res["seeds"] == [0]
    assert (tmp_path / "compression.md").is_file() and (tmp_path / "compression.png").is_file()

    # per-seed runs side by side, merged into one report (here: the same run twice)
    out2 = tmp_path / "merged"
    src = str(tmp_path / "compression.json")
    assert main(["compress", "--merge", f"{src},{src}", "--out", str(out2), "--no-artifact"]) == 0
    merged = json.loads((out2 / "compression.json").read_text())
    assert merged["seeds"] == [0, 0] and merged["command"].count("prunejax compress") == 3
    row = next(r for r in merged["summary"] if r["stage"] == "compressed" and r["bias_bits"] == 4)
    assert row["seeds"] == [0, 0] and row["test_error_std"] == 0.0
