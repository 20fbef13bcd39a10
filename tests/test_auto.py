"""``format="auto"``: the per-machine calibration cache and ``tune=True`` measurements.

Timings are never asserted: where a measured value must be controlled, the probe runner or the
interleaved timer is replaced by one returning chosen numbers.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import jax
import numpy as np
import pytest

from prunejax import sparse as sp
from prunejax.sparse import auto, ffi, tuning

# Plausible probe times (µs) for both kernel paths, and the probe kernels' counts.
PROBES = {
    "dense_tiny_b1": 10.0,
    "dense_mid_b1": 100.0,
    "dense_big_b1": 700.0,
    "dense_mid_bn": 3000.0,
    "csr_tiny_b1": 5.0,
    "csr_b1": 150.0,
    "csr_bn": 600.0,
    "block_b1": 60.0,
    "block_bn": 250.0,
    "bcsr_t_bn": 2000.0,
    "bcsr_t_tiny_bn": 60.0,
    "ell_tiny_b1": 20.0,
    "ell_b1": 500.0,
    "block_pure_bn": 900.0,
}
COUNTS = {"nnz": 419_430, "block_nse": 419_840, "ell_nse": 419_430}
# Load the compiled kernels now, from the usual cache: the fixtures below point the cache
# directory (where the kernels are built too) at an empty temporary one.
COMPILED = ffi.available()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty cache directory and a probe runner that counts its calls instead of timing."""
    monkeypatch.setenv("PRUNEJAX_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("PRUNEJAX_CALIBRATE", raising=False)
    monkeypatch.setenv("PRUNEJAX_QUIET", "1")
    tuning.clear_memo()
    runs = []

    def fake_probes(compiled, rounds=15):
        runs.append(compiled)
        return dict(PROBES), dict(COUNTS)

    monkeypatch.setattr(tuning, "run_probes", fake_probes)
    yield runs
    tuning.clear_memo()


def cache_file():
    return tuning.cache_dir() / tuning.CACHE_NAME


# ----------------------------------------------------------------------------- calibration


def test_machine_key_names_what_the_measurements_depend_on():
    key = tuning.machine_key()
    assert set(key) == {
        "cpu",
        "isa",
        "kernels",
        "compiled",
        "threads",
        "xla_flags",
        "backend",
        "jax",
        "jaxlib",
        "prunejax",
    }
    assert key["jax"] == jax.__version__ and key["compiled"] == str(ffi.available())
    assert all(isinstance(v, str) for v in key.values()) and key["cpu"] and key["isa"]


def test_calibration_is_measured_once_then_read_from_the_cache(cache):
    c = tuning.constants()
    assert cache == [ffi.available()]
    assert c["dense_call_us"] == PROBES["dense_tiny_b1"]
    assert c["dense_weight_ns"] == pytest.approx((700.0 - 10.0) * 1e3 / 2048**2)
    assert tuning.constants() == c and len(cache) == 1  # this process remembers
    tuning.clear_memo()
    assert tuning.constants() == c and len(cache) == 1  # the file remembers
    data = json.loads(cache_file().read_text())
    (entry,) = data["machines"].values()
    assert entry["key"] == tuning.machine_key()
    assert entry["calibration"]["probes_us"] == PROBES


@pytest.mark.parametrize("part", ["isa", "threads", "xla_flags", "jax"])
def test_a_changed_machine_key_measures_again(cache, monkeypatch, part):
    first = tuning.constants()
    assert len(cache) == 1
    if part == "isa":  # the hook the kernel build can provide: the ISA path it compiled
        monkeypatch.setattr(ffi, "isa", lambda: "x86-64-v3", raising=False)
        assert tuning.machine_key()["isa"] == "x86-64-v3"
    elif part == "threads":
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(999)), raising=False)
    elif part == "xla_flags":
        monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false")
    else:
        monkeypatch.setattr(jax, "__version__", "0.0.1-other")
    assert tuning.constants() == first  # same fake probes, but measured again
    assert len(cache) == 2
    assert len(json.loads(cache_file().read_text())["machines"]) == 2  # both kept


@pytest.mark.parametrize(
    "damage",
    [
        "not json {",
        json.dumps({"schema": "something-else", "machines": {}}),
        "nan",  # a calibration constant becomes NaN
        "negative",  # ... or negative
        "missing",  # ... or disappears
        "renamed",  # an entry whose key does not hash to its name
    ],
)
def test_a_corrupt_cache_is_ignored_with_a_warning_and_measured_again(cache, damage):
    good = tuning.constants()
    tuning.clear_memo()
    path = cache_file()
    if damage.startswith(("not", "{")):
        path.write_text(damage)
    else:
        data = json.loads(path.read_text())
        (mid,) = data["machines"]
        consts = data["machines"][mid]["calibration"]["constants"]
        if damage == "nan":
            consts["csr_gather_ns"] = float("nan")
        elif damage == "negative":
            consts["csr_gather_ns"] = -1.0
        elif damage == "missing":
            del consts["csr_gather_ns"]
        else:
            data["machines"]["0" * 16] = data["machines"].pop(mid)
        path.write_text(json.dumps(data))
    with pytest.warns(RuntimeWarning, match="cannot be trusted"):
        again = tuning.constants()
    assert again == good and len(cache) == 2  # re-measured, never trusted
    tuning.clear_memo()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the rewritten file is valid again
        assert tuning.constants() == good
    assert len(cache) == 2


def test_implausible_probe_times_are_bounded_and_kept_raw(cache, monkeypatch):
    if not ffi.available():
        pytest.skip("csr_b1 is a probe of the compiled kernels")
    slow = dict(PROBES, csr_b1=1e7)  # a probe preempted for 10 s
    monkeypatch.setattr(tuning, "run_probes", lambda compiled, rounds=15: (slow, dict(COUNTS)))
    rec = tuning.calibrate(force=True)
    assert rec["solved"]["csr_gather_ns"] > 16 * tuning.PRIOR["csr_gather_ns"]
    assert rec["constants"]["csr_gather_ns"] == 16 * tuning.PRIOR["csr_gather_ns"]


def test_calibrate_zero_uses_the_prior_without_measuring(cache, monkeypatch):
    monkeypatch.setenv("PRUNEJAX_CALIBRATE", "0")
    assert tuning.constants() == tuning.PRIOR
    assert cache == [] and not cache_file().exists()


def test_progress_line_and_quiet(cache, monkeypatch, capsys):
    monkeypatch.delenv("PRUNEJAX_QUIET")
    tuning.calibrate()
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "measuring" in err and "PRUNEJAX_QUIET" in err
    monkeypatch.setenv("PRUNEJAX_QUIET", "1")
    tuning.calibrate(force=True)
    assert capsys.readouterr().err == ""
    assert len(cache) == 2


def test_cache_writes_are_atomic(cache, monkeypatch):
    tuning.constants()
    before = cache_file().read_bytes()

    real = Path.write_text

    def half_then_fail(self, text, *args, **kwargs):
        real(self, text[: len(text) // 2], *args, **kwargs)
        raise OSError("disk full")

    monkeypatch.setattr(Path, "write_text", half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        tuning.calibrate(force=True)
    assert cache_file().read_bytes() == before  # the old file, whole
    assert sorted(p.name for p in cache_file().parent.iterdir()) == [tuning.CACHE_NAME]


def test_export_import_round_trip(cache, tmp_path, monkeypatch):
    consts = tuning.constants()
    rec = {
        "times_us": {"dense": 10.0, "csr": 4.0},
        "launch_us": 1.0,
        "ratios": {"csr": 2.5},
        "rounds": 3,
    }
    tuning.store_measurement("k", rec)
    out = sp.export_tuning(tmp_path / "wisdom.json")
    # a fresh machine of the same kind: empty cache, nothing measured
    monkeypatch.setenv("PRUNEJAX_CACHE_DIR", str(tmp_path / "other"))
    tuning.clear_memo()
    assert tuning.lookup_measurement("k") is None
    assert sp.import_tuning(out) == 1
    assert tuning.constants() == consts and len(cache) == 1  # imported, not measured
    assert tuning.lookup_measurement("k") == rec
    # a damaged export is refused whole
    bad = tmp_path / "bad.json"
    bad.write_text(out.read_text().replace('"rounds": 3', '"rounds": 0'))
    with pytest.raises(ValueError, match="rounds"):
        sp.import_tuning(bad)
    assert tuning.lookup_measurement("k") == rec


def test_store_measurement_rejects_bad_records(cache):
    with pytest.raises(ValueError, match="unknown formats"):
        tuning.store_measurement("k", {"times_us": {"csr": 1.0}, "ratios": {}, "rounds": 1})
    with pytest.raises(ValueError, match="times_us"):
        tuning.store_measurement(
            "k", {"times_us": {"dense": float("inf")}, "ratios": {}, "rounds": 1}
        )
    with pytest.raises(ValueError, match="launch_us"):
        tuning.store_measurement("k", {"times_us": {"dense": 1.0}, "ratios": {}, "rounds": 1})


def test_probe_kernels_are_what_fromdense_builds():
    from prunejax.sparse.kernels import BlockKernel, CsrKernel

    for fmt in ("csr", "bcsr_t"):
        k = tuning.probe_csr((80, 24), 0.1, fmt)
        ref = CsrKernel.fromdense(np.asarray(k.todense()), fmt)
        for a, b in zip(k.tree_flatten()[0], ref.tree_flatten()[0], strict=True):
            assert np.asarray(a).dtype == np.asarray(b).dtype
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        assert k.nnz == 8 * 24
    k = tuning.probe_block((160, 48), 0.1)
    ref = BlockKernel.fromdense(np.asarray(k.todense()), (16, 16), "p")
    for a, b in zip(k.tree_flatten()[0], ref.tree_flatten()[0], strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert k.nse == 3 * 256


# ----------------------------------------------------------------------------- tune=True


def sparse_kernel(rng, n_in=64, n_out=32, density=0.1):
    w = rng.standard_normal((n_in, n_out)).astype(np.float32)
    w[rng.random(w.shape) >= density] = 0
    return w


def blocky_kernel(rng):
    """64x32, two of its eight 16x16 blocks kept: every sparse form is a candidate."""
    w = rng.standard_normal((64, 32)).astype(np.float32)
    keep = np.zeros((4, 2), bool)
    keep[0, 0] = keep[2, 1] = True
    return np.where(np.kron(keep, np.ones((16, 16), bool)), w, 0).astype(np.float32)


@pytest.fixture
def fake_timer(cache, monkeypatch):
    """Replace the interleaved timer: each call runs once (so it must work), then gets the
    per-round times in ``table`` (by format; formats not in it get ``default``, the executable
    launch 1 µs)."""
    state = {"table": {}, "default": 1000.0, "timed": []}

    def fake(calls, rounds, **kwargs):
        state["timed"].append(sorted(calls))
        out = {}
        for name, fn in calls.items():
            fn()
            default = 1.0 if name == "launch" else state["default"]
            out[name] = list(state["table"].get(name, [default] * rounds))
        return out

    monkeypatch.setattr(tuning, "time_interleaved", fake)
    return state


def tuned(w, batch, **kw):
    return sp.formats_of(sp.sparsify({"kernel": w}, "auto", batch_size=batch, tune=True, **kw))


def record_for(w, batch, block=(16, 16)):
    key = auto.measurement_key(
        w.shape,
        int(np.count_nonzero(w)),
        batch,
        block,
        auto.block_nse(w, block),
        "float32",
    )
    return tuning.lookup_measurement(key)


@pytest.mark.parametrize("path", ["compiled", "pure"])
def test_tune_chooses_only_what_it_measured_faster_than_dense(fake_timer, monkeypatch, path):
    if path == "pure":
        monkeypatch.setenv("PRUNEJAX_DISABLE_FFI", "1")
    elif not ffi.available():
        pytest.skip(f"compiled kernels unavailable: {ffi.build_error()}")
    fast = "block"  # a candidate on both paths
    w = blocky_kernel(np.random.default_rng(0))
    R = auto.TUNE_ROUNDS
    fake_timer["table"] = {"dense": [100.0] * R, fast: [95.0] * R}
    assert tuned(w, 8) == {"kernel": "dense"}  # faster, but not by the 10% margin
    rec = record_for(w, 8)
    assert rec["times_us"][fast] == 95.0 and rec["ratios"][fast] == pytest.approx(99 / 94)
    assert rec["launch_us"] == 1.0
    assert set(rec["times_us"]) == {"dense", *auto._candidates(w, 8, (16, 16))}
    assert {"block", "csr" if path == "compiled" else "ell"} <= set(rec["times_us"])
    # a cached decision: the same layer is not measured again
    n = len(fake_timer["timed"])
    assert tuned(w, 8) == {"kernel": "dense"} and len(fake_timer["timed"]) == n
    # another batch size is another measurement
    fake_timer["table"] = {"dense": [100.0] * R, fast: [50.0, 300.0] + [50.0] * (R - 2)}
    assert tuned(w, 9) == {"kernel": fast}
    assert record_for(w, 9)["ratios"][fast] == pytest.approx(99 / 49)
    assert len(fake_timer["timed"]) == n + 1
    # measured slower: dense, whatever the model predicts
    fake_timer["table"] = {"dense": [100.0] * R, fast: [150.0] * R}
    assert tuned(w, 10) == {"kernel": "dense"}
    # the launch of an executable, paid once per model, is not counted against a layer:
    # 95 vs 100 µs with 60 µs of launch is 35 vs 40 µs of work, 1.14x
    fake_timer["table"] = {"dense": [100.0] * R, fast: [95.0] * R, "launch": [60.0] * R}
    assert tuned(w, 11) == {"kernel": fast}
    assert record_for(w, 11)["ratios"][fast] == pytest.approx(40 / 35)


def test_tune_dense_t_only_for_layer_kernels_and_only_when_faster(fake_timer):
    if not ffi.available():
        pytest.skip(f"compiled kernels unavailable: {ffi.build_error()}")
    w = np.random.default_rng(1).standard_normal((64, 32)).astype(np.float32)  # dense
    R = auto.TUNE_ROUNDS
    fake_timer["table"] = {"dense": [100.0] * R, "dense_t": [60.0] * R}
    assert tuned(w, 1) == {"kernel": "dense_t"}
    out = sp.sparsify({"table": w}, "auto", batch_size=1, tune=True)  # not a layer kernel
    assert sp.formats_of(out) == {"table": "dense"}
    fake_timer["table"] = {"dense": [100.0] * R, "dense_t": [105.0] * R}
    w2 = w.copy()
    w2[0, 0] = 0  # another pattern class: measured anew
    assert tuned(w2, 1) == {"kernel": "dense"}


def test_tune_for_real_never_picks_what_it_measured_slower(cache, monkeypatch):
    # real timings on tiny layers: whatever they are on this machine, each choice must be
    # backed by the layer's own recorded measurements
    rng = np.random.default_rng(2)
    params = {
        "Dense_0": {"kernel": sparse_kernel(rng, 64, 48, 0.05), "bias": np.zeros(48, np.float32)},
        "Dense_1": {"kernel": sparse_kernel(rng, 48, 16, 0.5), "bias": np.zeros(16, np.float32)},
    }
    monkeypatch.setattr(auto, "TUNE_ROUNDS", 3)
    for batch in (1, 5):
        s = sp.sparsify(params, "auto", batch_size=batch, tune=True)
        x = rng.standard_normal((batch, 64)).astype(np.float32)
        y = jax.nn.relu(x @ s["Dense_0"]["kernel"]) @ s["Dense_1"]["kernel"]
        ref = np.maximum(x @ params["Dense_0"]["kernel"], 0) @ params["Dense_1"]["kernel"]
        np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-5, atol=1e-5)
        for name, fmt in sp.formats_of(s).items():
            w = params[name.split("/")[0]]["kernel"]
            rec = record_for(w, batch)
            assert rec is not None and "dense" in rec["times_us"]
            if fmt != "dense":
                assert rec["ratios"][fmt] >= auto.TUNE_MARGIN
                assert rec["times_us"][fmt] * auto.TUNE_MARGIN <= rec["times_us"]["dense"]
            # predict_times shows the measurement beside the prediction
            table = sp.predict_times(
                w.shape,
                int(np.count_nonzero(w)),
                batch,
                block_nse=auto.block_nse(w, (16, 16)),
                measured=True,
            )
            assert table["dense"]["measured"] == rec["times_us"]["dense"]
            assert table["dense"]["predicted"] > 0
            assert {f for f, v in table.items() if v["measured"] is not None} == set(
                rec["times_us"]
            )


def test_predict_times_without_a_measurement(cache):
    table = sp.predict_times((512, 512), 5000, 3, measured=True)
    assert table and all(v["measured"] is None and v["predicted"] > 0 for v in table.values())
    assert set(table) == set(sp.predict_times((512, 512), 5000, 3))


def test_tune_arguments_are_checked():
    w = {"kernel": np.eye(4, dtype=np.float32)}
    with pytest.raises(ValueError, match='format="auto" only'):
        sp.sparsify(w, "csr", tune=True)
    with pytest.raises(TypeError, match="tune must be a bool"):
        sp.sparsify(w, "auto", batch_size=1, tune="yes")


def test_tune_keeps_non_fp32_dense_without_measuring(fake_timer):
    w = sparse_kernel(np.random.default_rng(3)).astype(np.float16)
    assert tuned(w, 4) == {"kernel": "dense"}
    assert fake_timer["timed"] == []


def test_model_choice_uses_the_calibrated_constants(cache, monkeypatch):
    # the same kernel, two machines: where the csr kernel measured 20x slower per nonzero the
    # model keeps the layer dense (the committed prior is no longer the decider)
    if not ffi.available():
        pytest.skip(f"compiled kernels unavailable: {ffi.build_error()}")
    w = sparse_kernel(np.random.default_rng(4), 1024, 1024, 0.05)
    assert sp.formats_of(sp.sparsify({"kernel": w}, "auto", batch_size=1)) == {"kernel": "csr"}
    slow = dict(PROBES, csr_b1=PROBES["csr_tiny_b1"] + 20 * (PROBES["csr_b1"] - 5.0))
    monkeypatch.setattr(tuning, "run_probes", lambda compiled, rounds=15: (slow, dict(COUNTS)))
    monkeypatch.setattr(ffi, "isa", lambda: "slow-gathers", raising=False)
    tuning.clear_memo()
    assert sp.formats_of(sp.sparsify({"kernel": w}, "auto", batch_size=1)) == {"kernel": "dense_t"}


def test_cache_lives_under_xdg_cache_home(cache, tmp_path, monkeypatch):
    monkeypatch.delenv("PRUNEJAX_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    tuning.clear_memo()
    tuning.constants()
    assert (tmp_path / "xdg" / "prunejax" / tuning.CACHE_NAME).is_file()


def test_one_bad_entry_does_not_wipe_the_other_machines(cache):
    """A cache directory may be shared by machines and prunejax versions: an untrustworthy entry
    is dropped with a warning, and the other entries (ours, and another machine's) are kept."""
    good = tuning.constants()
    path = cache_file()
    data = json.loads(path.read_text())
    (mid,) = data["machines"]
    other_key = {**data["machines"][mid]["key"], "cpu": "another cpu"}
    data["machines"][tuning._key_id(other_key)] = {**data["machines"][mid], "key": other_key}
    bad_key = {**other_key, "cpu": "a third cpu"}
    bad = json.loads(json.dumps(data["machines"][mid]))
    bad["key"] = bad_key
    bad["calibration"]["constants"]["csr_gather_ns"] = -1.0
    data["machines"][tuning._key_id(bad_key)] = bad
    path.write_text(json.dumps(data))
    tuning.clear_memo()
    with pytest.warns(RuntimeWarning, match="cannot be trusted"):
        assert tuning.constants() == good
    assert len(cache) == 1  # our entry was valid: not measured again
    with pytest.warns(RuntimeWarning, match="cannot be trusted"):  # still in the file
        tuning.store_measurement(
            "1x1/nnz=1/block=16x16:None/batch=1/float32",
            {"times_us": {"dense": 2.0}, "ratios": {}, "launch_us": 1.0, "rounds": 1},
        )
    kept = json.loads(path.read_text())["machines"]
    assert set(kept) == {mid, tuning._key_id(other_key)}
