"""Smoke test of the benchmark suite (``python -m benchmarks.run``) at toy sizes; no timing
assertions."""

from __future__ import annotations

import json

import numpy as np
import pytest

import prunejax as pj
from benchmarks import formats, run, targets, workload


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    res = run.main(
        [
            "--models",
            "toy",
            "--sparsities",
            "0.5",
            "--batches",
            "3",
            "--runs",
            "2",
            "--warmup",
            "1",
            "--min-runs",
            "1",
            "--no-multidevice",
            "--train-batch",
            "8",
            "--formats",
            "dense.aa,dense_x_mask,jsp.bcoo,jsp.bcsr,scipy.csr,compact,pj.auto,no_such_format",
            "--out",
            str(out),
        ]
    )
    return res, out


def test_writes_results_markdown_and_plots(toy_run):
    res, out = toy_run
    data = json.loads((out / "results.json").read_text())
    assert data["info"]["jax"] and data["info"]["cores"] >= 1
    md = (out / "RESULTS.md").read_text()
    for needle in ("## Targets", "JAX", "cores", "Date", "CPU"):
        assert needle in md
    pngs = sorted(p.name for p in (out / "plots").iterdir())
    plot_of_toy_model = "speedup_toy_unstructured.png"
    assert plot_of_toy_model in pngs
    assert all((out / "plots" / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    assert len(data["cells"]) == len(res["cells"])


def test_every_format_ran_correctly_or_was_skipped_with_a_note(toy_run):
    res, _ = toy_run
    cells = res["cells"]
    grans = {c["granularity"] for c in cells}
    assert grans == {"unstructured", "unit", "2:4", "block16"}
    for c in cells:
        assert c["status"] in ("ok", "capped", "skipped", "skipped-memory"), c
        if c["status"] in ("ok", "capped"):
            assert np.isfinite(c["ratio"]) and c["ratio"] > 0
            assert c["runs"] >= 1
        else:
            assert c["note"]
    ran = {c["format"] for c in cells if c["status"] == "ok"}
    assert {
        "dense",
        "dense.aa",
        "dense_x_mask",
        "jsp.bcoo",
        "jsp.bcsr",
        "scipy.csr",
        "compact",
    } <= ran
    # An unknown format is reported, not a crash.
    assert any("no_such_format" in n for n in res["notes"])


def test_compaction_bound_is_the_flop_ratio(toy_run):
    res, _ = toy_run
    comp = [c for c in res["cells"] if c["format"] == "compact" and c["status"] == "ok"]
    assert [c["granularity"] for c in comp] == ["unit"]
    # Half the units of the two hidden layers go (64-24-16-16); the last layer keeps its outputs.
    dense_flops = 64 * 48 + 48 * 32 + 32 * 16
    assert comp[0]["bound"] == pytest.approx(dense_flops / (64 * 24 + 24 * 16 + 16 * 16))


def test_training_step_keeps_pruned_weights_zero(toy_run):
    res, _ = toy_run
    (t,) = res["train"]
    assert t["pruned_entries_nonzero"] == 0
    assert t["ratio"] > 0


def test_compaction_matches_masked_dense():
    dims = (32, 16, 16, 8)
    params = workload.init_params(dims, 0)
    masks = workload.build_masks(params, "unit", 0.5)
    pruned = pj.apply_masks(params, masks)
    small = formats.compact_params(pruned)
    assert small["Dense_0"]["kernel"].shape == (32, 8)
    assert small["Dense_2"]["kernel"].shape == (8, 8)
    x = np.random.default_rng(0).standard_normal((5, 32), dtype=np.float32)
    np.testing.assert_allclose(
        np.asarray(workload.dense_forward(small, x)),
        np.asarray(workload.dense_forward(pruned, x)),
        rtol=1e-5,
        atol=1e-5,
    )


def test_dense_baseline_layout_check():
    params = workload.init_params((8, 4), 0)
    workload.check_dense_layout(params, (8, 4))
    params["Dense_0"]["kernel"] = np.ascontiguousarray(params["Dense_0"]["kernel"].T)
    with pytest.raises(AssertionError, match="in, out"):
        workload.check_dense_layout(params, (8, 4))


def test_bad_arguments_are_rejected():
    with pytest.raises(SystemExit):
        run.parse_args(["--models", "resnet"])
    with pytest.raises(SystemExit):
        run.parse_args(["--sparsities", "150"])


def test_unstructured_masks_equal_prunejax_masks():
    from prunejax.masks import magnitude_masks

    params = workload.init_params((40, 24, 10), 3)
    params["Dense_0"]["kernel"][0, :6] = 0.5  # ties: broken by flat index in both
    for s in (0.0, 0.5, 0.9, 0.99, {"Dense_0": 0.92, "Dense_1": 0.74}):
        ours = workload.build_masks(params, "unstructured", s)
        ref = magnitude_masks(params, s, scope="layer")
        for name in params:
            np.testing.assert_array_equal(ours[name]["kernel"], np.asarray(ref[name]["kernel"]))
            np.testing.assert_array_equal(ours[name]["bias"], np.asarray(ref[name]["bias"]))


def test_rerender_from_json(toy_run, tmp_path):
    _, out = toy_run
    res = run.main(["--from-json", str(out / "results.json"), "--out", str(tmp_path), "--no-plots"])
    md = (tmp_path / "RESULTS.md").read_text()
    assert "## Targets" in md and "toy" in md
    assert len(res["cells"]) == len(json.loads((out / "results.json").read_text())["cells"])


def test_auto_target_judges_only_cells_that_differ_from_the_baseline():
    def cell(ratio, note, sparsity="50%"):
        return {
            "model": "lenet",
            "granularity": "unstructured",
            "sparsity": sparsity,
            "batch": 32,
            "format": "pj.auto",
            "ratio": ratio,
            "note": note,
        }

    assert targets.auto_is_baseline(cell(0.9, "chose dense/dense/dense; build 0.00s"))
    assert not targets.auto_is_baseline(cell(0.9, "chose csr/dense/dense; build 0.00s"))
    assert not targets.auto_is_baseline(cell(0.9, "chose dense_t/dense_t/dense_t"))
    assert not targets.auto_is_baseline(cell(0.9, ""))

    def auto_target(cells):
        (t,) = [t for t in targets.compute_targets({"cells": cells}) if "auto" in t["target"]]
        return t

    same = cell(0.91, "chose dense/dense/dense; build 0.00s")
    good = cell(1.5, "chose csr/dense/dense", "90%")
    t = auto_target([same, good])
    assert t["met"] is True and t["measured"] == 1.5
    assert "Not judged: 1 cells" in t["detail"] and "0.91x" in t["detail"]
    slow = cell(0.9, "chose csr/dense/dense", "80%")
    t = auto_target([same, good, slow])
    assert t["met"] is False and t["measured"] == 0.9
