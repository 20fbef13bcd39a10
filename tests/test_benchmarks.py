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


# ----------------------------------------------------------------------------- peers


def _toy_ctx(batch: int = 3, dims=(16, 12, 8, 4)):
    params = workload.init_params(dims, 1)
    masks = workload.build_masks(params, "unstructured", 0.5)
    pruned = pj.apply_masks(params, masks)
    x = np.random.default_rng(2).standard_normal((batch, dims[0]), dtype=np.float32)
    return formats.Ctx("toy", dims, "unstructured", "50%", params, masks, pruned, batch, x, {})


def _cell_opts():
    from types import SimpleNamespace

    return SimpleNamespace(
        runs=2, warmup=1, min_runs=1, cell_budget=0.5, max_call=1.0, mem_limit_gb=1.0, seed=0
    )


def _masked_dense(ctx) -> np.ndarray:
    return np.asarray(workload.dense_forward(ctx.pruned, ctx.x))


@pytest.fixture
def fresh_deepsparse():
    from benchmarks import peers

    peers.reset_deepsparse()
    yield peers
    peers.reset_deepsparse()


def test_onnx_export_equals_mlp_apply():
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    import jax

    from benchmarks import onnx_export

    ctx = _toy_ctx()
    model = onnx_export.mlp_to_onnx(workload.kernels(ctx.pruned), workload.biases(ctx.pruned))
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    for batch in (1, 5):  # the batch dimension is symbolic
        x = np.random.default_rng(batch).standard_normal((batch, 16), dtype=np.float32)
        got = sess.run(None, {"x": x})[0]
        want = np.asarray(pj.mlp_apply(ctx.pruned, x, activation=jax.nn.relu))
        assert got.shape == (batch, 4)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    fixed = onnx_export.mlp_to_onnx(workload.kernels(ctx.pruned), workload.biases(ctx.pruned), 7)
    dims = [d.dim_value for d in fixed.graph.input[0].type.tensor_type.shape.dim]
    assert dims == [7, 16]


def test_onnx_export_rejects_layers_that_do_not_chain():
    from benchmarks import onnx_export

    k0, k1 = np.zeros((4, 3), np.float32), np.zeros((5, 2), np.float32)
    with pytest.raises(ValueError, match="layer 1: kernel has 5 inputs, previous layer 3"):
        onnx_export.mlp_to_onnx([k0, k1], [np.zeros(3), np.zeros(2)])
    with pytest.raises(ValueError, match=r"layer 0: kernel \(4, 3\)"):
        onnx_export.mlp_to_onnx([k0], [np.zeros(4)])
    with pytest.raises(ValueError, match="one bias per kernel"):
        onnx_export.mlp_to_onnx([k0], [])


FAKE_WORKER = """
import sys
sys.path.insert(0, {root!r})
import numpy as np
from benchmarks.deepsparse_worker import serve

def load(model, batch, cores):
    w = np.load(model)
    return (lambda x: np.maximum(x @ w, 0) * {scale}), {{"num_cores": cores, "batch": batch}}

serve(sys.stdin, sys.stdout, load, {hello})
"""


def _fake_worker(tmp_path, scale=1.0, hello="{'fake': True}", body=None) -> list[str]:
    import os
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = tmp_path / "fake_worker.py"
    script.write_text(body or FAKE_WORKER.format(root=root, scale=scale, hello=hello))
    return [sys.executable, str(script)]


def test_worker_protocol_round_trips(tmp_path):
    import os

    from benchmarks import timing
    from benchmarks.deepsparse_worker import RemoteForward, WorkerClient, WorkerError

    w = np.random.default_rng(0).standard_normal((6, 4)).astype(np.float32)
    np.save(tmp_path / "w.npy", w)
    x = np.random.default_rng(1).standard_normal((3, 6)).astype(np.float32)
    client = WorkerClient(_fake_worker(tmp_path))
    try:
        assert client.hello["fake"] is True and client.hello["protocol"] == 1
        eng = client.load(str(tmp_path / "w.npy"), 3, 2)
        assert eng["batch"] == 3 and eng["num_cores"] == 2 and eng["compile_s"] >= 0
        fwd = RemoteForward(client, eng["engine"])
        np.testing.assert_array_equal(fwd(x), np.maximum(x @ w, 0))
        times = client.time_calls(eng["engine"], 5)
        assert len(times) == 5 and all(t > 0 for t in times)
        assert timing.timed(fwd, (x,), 4) > 0  # the timer asks the worker
        # Errors are answered, and the worker goes on serving.
        second = client.load(str(tmp_path / "w.npy"), 1, 1)["engine"]
        with pytest.raises(WorkerError, match="has no input yet"):
            client.time_calls(second, 1)
        client.free(second)
        with pytest.raises(WorkerError, match=f"no engine {second}"):
            client.run(second, x[:1])
        with pytest.raises(WorkerError, match="unknown op 'dance'"):
            client.request("dance")
        with pytest.raises(WorkerError, match="FileNotFoundError"):
            client.load(str(tmp_path / "missing.npy"), 1, 1)
        np.testing.assert_array_equal(fwd(x), np.maximum(x @ w, 0))
    finally:
        client.close()
    assert client.proc.returncode == 0
    assert not os.path.exists(client.tmp.name)  # the exchanged arrays are gone


def test_worker_that_cannot_serve_says_why(tmp_path):
    from benchmarks.deepsparse_worker import WorkerClient, WorkerError

    refusing = "{'ok': False, 'error': 'numpy 2.1 in the worker: needs numpy<2'}"
    with pytest.raises(WorkerError, match="needs numpy<2"):
        WorkerClient(_fake_worker(tmp_path, hello=refusing))
    crash = "import sys\nprint('boom: no deepsparse', file=sys.stderr)\nsys.exit(3)\n"
    with pytest.raises(WorkerError, match=r"exited \(rc 3\): boom: no deepsparse"):
        WorkerClient(_fake_worker(tmp_path, body=crash))
    with pytest.raises(WorkerError, match="not JSON"):
        WorkerClient(_fake_worker(tmp_path, body="print('hello there')\n"))
    with pytest.raises(WorkerError, match="cannot start"):
        WorkerClient([str(tmp_path / "no_such_python")])


def test_missing_peer_packages_are_recorded_skips(monkeypatch, tmp_path, fresh_deepsparse):
    import sys

    from benchmarks import cells

    ctx = _toy_ctx()
    ref = _masked_dense(ctx)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails as if not installed
    got = cells.prepare("onnxruntime", ctx, ref, _cell_opts(), print)
    assert got["status"] == "skipped" and "onnxruntime is not installed" in got["note"]
    assert "prunejax[bench]" in got["note"]
    # No worker venv: neither the variable nor the default place under the cache dir.
    monkeypatch.delenv(fresh_deepsparse.DEEPSPARSE_ENV, raising=False)
    monkeypatch.setenv("PRUNEJAX_CACHE_DIR", str(tmp_path))
    got = cells.prepare("deepsparse", ctx, ref, _cell_opts(), print)
    assert got["status"] == "skipped" and "--setup-deepsparse" in got["note"]
    fresh_deepsparse.reset_deepsparse()
    monkeypatch.setenv(fresh_deepsparse.DEEPSPARSE_ENV, str(tmp_path / "bin" / "python"))
    got = cells.prepare("deepsparse", ctx, ref, _cell_opts(), print)
    assert got["status"] == "skipped" and "unavailable: cannot start" in got["note"]
    # The failure is remembered: the next cell does not try to start the worker again.
    again = cells.prepare("deepsparse", ctx, ref, _cell_opts(), print)
    assert again == got


def test_missing_onnx_is_a_recorded_skip(monkeypatch):
    import sys

    pytest.importorskip("onnxruntime")
    from benchmarks import cells

    ctx = _toy_ctx()
    monkeypatch.setitem(sys.modules, "onnx", None)
    got = cells.prepare("onnxruntime", ctx, _masked_dense(ctx), _cell_opts(), print)
    assert got["status"] == "skipped" and "onnx is not installed" in got["note"]


def test_onnxruntime_peer_is_checked_and_timed():
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from benchmarks import cells

    rows = cells.run_cell(_toy_ctx(), ["onnxruntime"], _cell_opts(), print)
    (row,) = [r for r in rows if r["format"] == "onnxruntime"]
    assert row["status"] in ("ok", "capped") and row["ratio"] > 0, row
    assert "ONNX Runtime" in row["note"] and row["kind"] == "dense"


ONNX_FAKE_WORKER = """
import sys
sys.path.insert(0, {root!r})
import numpy as np
import onnx
from onnx import numpy_helper
from benchmarks.deepsparse_worker import serve

def load(model, batch, cores):
    w = {{t.name: numpy_helper.to_array(t) for t in onnx.load(model).graph.initializer}}
    n = len(w) // 2

    def forward(x):
        for i in range(n):
            x = x @ w[f"W{{i}}"] + w[f"b{{i}}"]
            x = np.maximum(x, 0) if i < n - 1 else x
        return x * {scale}

    return forward, {{"num_cores": cores}}

serve(sys.stdin, sys.stdout, load, {{"deepsparse": "fake"}})
"""


@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_deepsparse_peer_through_a_fake_worker(monkeypatch, tmp_path, fresh_deepsparse, scale):
    import os
    import sys

    pytest.importorskip("onnx")
    from benchmarks import cells

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = _fake_worker(tmp_path, body=ONNX_FAKE_WORKER.format(root=root, scale=scale))
    monkeypatch.setenv(fresh_deepsparse.DEEPSPARSE_ENV, sys.executable)
    monkeypatch.setattr(fresh_deepsparse, "deepsparse_command", lambda py: cmd)
    rows = cells.run_cell(_toy_ctx(), ["deepsparse"], _cell_opts(), print)
    (row,) = [r for r in rows if r["format"] == "deepsparse"]
    if scale == 1.0:  # right answers: checked, then timed by the worker
        assert row["status"] in ("ok", "capped") and row["ratio"] > 0, row
        assert "timed in its worker process" in row["note"]
    else:  # a worker giving wrong answers is reported WRONG, not timed
        assert row["status"] == "WRONG" and "ratio" not in row
