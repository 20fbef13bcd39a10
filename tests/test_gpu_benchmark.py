"""The GPU benchmark's pure parts (budgets, rounds, crossover, bandwidth, targets, rendering),
with fake numbers: nothing here needs a GPU or times anything."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from benchmarks import gpu as gb
from benchmarks import gpu_cells as gc
from benchmarks import gpu_report as rep


class FakeClock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def test_budget_counts_down_on_its_clock():
    clock = FakeClock()
    b = rep.Budget(10, clock=clock)
    assert b.left() == 10 and b.allows(10) and not b.allows(10.5)
    clock.t += 9
    assert b.left() == pytest.approx(1) and b.allows(1) and not b.allows(2)
    clock.t += 5
    assert b.left() == pytest.approx(-4) and not b.allows(0)


def test_plan_rounds_and_burst():
    assert rep.plan_rounds(0.01, 1.0) == 50  # capped at max_rounds
    assert rep.plan_rounds(0.1, 1.0) == 10
    assert rep.plan_rounds(2.0, 1.0) == 3  # never fewer than min_rounds
    assert rep.plan_rounds(0.0, 1.0) == 50
    assert rep.burst(1e-5) == 64 and rep.burst(5e-4) == 4 and rep.burst(0.5) == 1


def test_median_ratio_pairs_rounds():
    # per round dense/form: 2, 1, 4 -> median 2 (a median of times would give 2/2 = 1... not)
    assert rep.median_ratio([2.0, 1.0, 4.0], [1.0, 1.0, 1.0]) == 2.0
    assert rep.median_ratio([1.0, 3.0], [2.0, 1.0]) == pytest.approx((0.5 + 3.0) / 2)
    assert rep.median_ratio([], []) is None


@pytest.mark.parametrize(
    ("points", "expected"),
    [
        ([(0.5, 0.2), (0.9, 0.6), (0.95, 1.4), (0.99, 3.0)], ("interpolated", 0.925)),
        ([(0.99, 3.0), (0.5, 0.2), (0.95, 1.4), (0.9, 0.6)], ("interpolated", 0.925)),  # unsorted
        ([(0.5, 1.2), (0.9, 2.0)], ("at_or_below", 0.5)),
        ([(0.5, 0.2), (0.9, 0.6)], ("never", None)),
        # a win that does not last is no crossover: the winning tail starts at 0.9
        ([(0.5, 1.1), (0.8, 0.5), (0.9, 1.0), (0.95, 2.0)], ("interpolated", 0.9)),
        (
            [(0.5, 1.1), (0.8, 0.5), (0.9, 0.9), (0.95, 2.0)],
            ("interpolated", 0.9 + 0.05 * 0.1 / 1.1),
        ),
        ([(0.5, None), (0.9, float("nan"))], ("unmeasured", None)),
    ],
)
def test_crossover(points, expected):
    got = rep.crossover(points)
    assert got["kind"] == expected[0]
    if expected[1] is None:
        assert got["sparsity"] is None
    else:
        assert got["sparsity"] == pytest.approx(expected[1])


def test_bandwidth_fraction():
    assert rep.peak_bandwidth("NVIDIA H200") == 4.8e12
    assert rep.peak_bandwidth("NVIDIA H100 80GB HBM3") == 3.35e12
    assert rep.peak_bandwidth("cpu") is None
    # 48 MB in 20 µs = 2.4 TB/s = half an H200
    assert rep.hbm_fraction(48_000_000, 20e-6, 4.8e12) == pytest.approx(0.5)
    assert rep.hbm_fraction(1, 1.0, None) is None and rep.hbm_fraction(1, 0.0, 1.0) is None


def fake_cells():
    def c(pattern, batch, fmt, ratio):
        return {"model": "wide", "pattern": pattern, "batch": batch, "format": fmt, "ratio": ratio}

    return [
        c("block16", 1, "pallas_block", 3.5),
        c("block16", 256, "pallas_block", 1.5),
        c("block16", 1, "auto", 3.4),
        c("unstructured", 32, "auto", 0.93),
        c("unstructured", 1, "auto", None),
    ]


def test_targets_judged_on_the_cells():
    rows = {r["name"]: r for r in rep.compute_targets(fake_cells())}
    assert rows["block16 90% b1 >= 3x"]["met"] is True
    assert rows["block16 90% b256 >= 2x"]["met"] is False
    auto = rows["auto >= 0.95x in every cell"]
    assert (auto["measured"], auto["met"], auto["where"]) == (0.93, False, "wide unstructured b32")
    off = rep.compute_targets(fake_cells(), on_gpu=False)
    assert all(r["met"] is None for r in off) and off[0]["measured"] == 3.5
    empty = rep.compute_targets([])
    assert all(r["met"] is None and r["measured"] is None for r in empty)


def fake_results():
    cells = fake_cells()
    cells[0].update(median_us=12.5, runs=30, hbm_frac=0.41, status="ok", note="")
    return {
        "mode": "full",
        "info": {"device_kind": "NVIDIA H200", "driver": "550.54", "cuda": "12.4", "jax": "0.11.2"},
        "targets": rep.compute_targets(cells),
        "checks": [
            {"name": "block 16 float32 batch 1 split 0", "err": 1e-4, "tol": 2e-2, "ok": True}
        ],
        "cells": cells,
        "crossover": [
            {
                "format": "bcoo",
                "batch": 1,
                "cusparse": True,
                "layer": 4096,
                "points": [(0.9, 0.5), (0.99, 2.0)],
                "crossover": rep.crossover([(0.9, 0.5), (0.99, 2.0)]),
            }
        ],
        "pytest": {"command": "pytest -q", "summary": "40 passed in 30.0s"},
        "sections": ["machine: ok (0 s)"],
        "elapsed_s": 300.0,
    }


def test_render_shows_every_part():
    md = rep.render_markdown(fake_results())
    for needle in [
        "NVIDIA H200",
        "550.54",
        "| cuda | 12.4 |",
        "| block16 90% b1 >= 3x | 3.50 | 3.0 | met |",
        "| block16 90% b256 >= 2x | 1.50 | 2.0 | missed |",
        "1.00e-04",
        "| 12.5 | 3.50 | 30 | 0.410 |",
        "| 4096x4096 | bcoo | 1 | True | 0.9: 0.50, 0.99: 2.00 | 0.930 |",
        "40 passed in 30.0s",
        "Elapsed: 300 s",
    ]:
        assert needle in md, needle


def test_write_results_writes_both_files(tmp_path):
    paths = rep.write_results(fake_results(), str(tmp_path / "out"))
    data = json.loads(open(paths[0]).read())
    assert data["cells"][0]["ratio"] == 3.5
    assert open(paths[1]).read().startswith("# prunejax GPU benchmark (full run)")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "RESULTS_GPU.md",
        "results_gpu.json",
    ]


def test_timed_forms_fill_ratios_from_paired_rounds():
    y = np.zeros((1, 2), np.float32)
    forms = [gc.Form(n, None, None, exe=lambda p, x: y, t1=1e-6) for n in ("dense", "auto")]
    slow = gc.Form("bcoo", None, None, exe=lambda p, x: y, t1=5.0)
    rows = [{"stored_bytes": 4800}, {"stored_bytes": 480}, {"stored_bytes": 48}]
    ctx = {"max_call": 1.0, "cell_s": 0.01, "peak": 4.8e12}
    gb.timed_forms(list(zip([*forms, slow], rows)), ctx, {"batch": 1})
    assert rows[0]["ratio"] == pytest.approx(1.0) and rows[0]["runs"] >= 3
    assert rows[1]["runs"] == rows[0]["runs"] and rows[1]["ratio"] > 0
    # the slow form ran once (its warm call) and is judged against dense's median
    assert rows[2]["runs"] == 1 and "one call" in rows[2]["note"]
    assert rows[2]["ratio"] == pytest.approx(np.median(forms[0].times) / 5.0)
    assert rows[0]["hbm_frac"] == pytest.approx(4800 / (rows[0]["median_us"] * 1e-6) / 4.8e12)


def test_a_failing_section_is_recorded_and_the_run_goes_on(tmp_path):
    res = {"cells": [], "sections": [], "_t0": 0.0}

    def boom():
        raise RuntimeError("no device")

    gb.section(res, "checks", boom, "checks", str(tmp_path))
    gb.section(res, "more", lambda: [{"model": "m"}], "cells", str(tmp_path))
    assert res["sections"][0].startswith("checks: error: RuntimeError: no device")
    assert res["sections"][1].startswith("more: ok") and res["cells"] == [{"model": "m"}]
    data = json.loads((tmp_path / "results_gpu.json").read_text())
    assert "_t0" not in data and len(data["sections"]) == 2


def test_options():
    a = gb.parse(["--out", "d", "--quick", "--pytest-s", "0"])
    assert (a.out, a.quick, a.pytest_s, a.max_call) == ("d", True, 0.0, 1.0)
    with pytest.raises(SystemExit):
        gb.parse([])  # --out is required


CHECKED_FORMS = ("dense", "dense_bf16", "bcoo_cusparse", "bcsr_t", "pallas_block_w1", "auto")


def test_forms_of_a_cell_build_and_match_dense():
    """The cell's plumbing on a toy MLP, as on a GPU (Pallas off the GPU runs its fallback)."""
    from benchmarks.workload import build_masks, init_params
    from prunejax.masks import apply_masks

    params = init_params((64, 48, 32, 16), seed=0)
    pruned = apply_masks(params, build_masks(params, "block16", 0.75))
    forms = gc.build_forms(pruned, 3, "block16", "NVIDIA H200", True, auto_runs=1)
    names = [n for n, _ in forms]
    assert names[0] == "dense" and "pallas_block" in names and "bcoo_cusparse" in names
    ref = None
    # the plumbing of each kind: baseline, cuSPARSE flag, Pallas kernel object, measured auto
    for name, thunk in [(n, t) for n, t in forms if n in CHECKED_FORMS]:
        f = thunk()
        if ref is None:
            gc.compile_form(f, 2**30)
            ref = np.asarray(f.exe(f.params, f.x), np.float64)
        row = gc.prepare(f, ref, 2**30, 1.0)
        assert row["err"] <= gc.TOL["bfloat16" if "bf16" in name else "float32"], name
        assert f.t1 > 0 and row["stored_bytes"] > 0
        # every array is on the device: a NumPy leaf would be copied there at every timed call
        leaves = jax.tree_util.tree_leaves(f.params)
        assert leaves and all(isinstance(a, jax.Array) for a in leaves), name
    assert "Dense_0:" in f.note  # auto records its per-layer choice and times
    skipped = dict(gc.build_forms(pruned, 1, "unstructured", "cpu", False, 1))
    with pytest.raises(RuntimeError, match="skipped: no GPU"):
        skipped["pallas_block"]()
