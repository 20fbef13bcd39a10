"""What ``format="auto"`` knows about this machine: measured kernel costs, cached per machine.

Like FFTW's wisdom, the knowledge is measured once and kept: two kinds of record live in one
JSON file, ``tuning.json`` in ``prunejax._util.cache_dir()`` (``$PRUNEJAX_CACHE_DIR``, else
``$XDG_CACHE_HOME/prunejax``, else ``~/.cache/prunejax``), under the machine's key:

* the **calibration**: the cost model's constants (``prunejax.sparse.auto.predict_times``),
  measured on first use by timing the kernels at a few representative shapes (a 2048x2048
  kernel dense and at 10% density, unstructured and in 16x16 blocks, batch 1 and 32; a
  1024x1024 dense kernel at batch 1 and 256; tiny kernels for the fixed cost of a call).  It
  runs once per machine key and says so in one line on stderr (``PRUNEJAX_QUIET=1`` silences
  it); most of its time is compiling the ten probes (1.5 s measured on a 2-core AMD EPYC
  whose cores other processes kept busy, load average 9; 2.6 s at load average 13).
  ``PRIOR``, the constants calibrated on the machine the library was developed on (AVX-512),
  is only the starting point: the measured values replace every constant a probe measures;
  the few that none does (the transposition of ``x`` for the tiled CSR kernel; the 16-row
  tile and Eigen's fixed cost, scaled from the measured 32-row tile and XLA's fixed cost) are
  small terms.
  ``PRUNEJAX_CALIBRATE=0`` skips the measuring and uses ``PRIOR``.
* **measurements** of ``sparsify(..., format="auto", tune=True)``: the times of every
  candidate format of one layer shape, pattern class and batch size, measured in the user's
  process interleaved with dense (see ``prunejax.sparse.auto.tune_format``).

The machine key (:func:`machine_key`) is the CPU model, the instruction set the compiled kernels
were built for (:func:`kernel_isa`), a hash of the kernels' sources, whether they are available,
the thread count, ``XLA_FLAGS``, the JAX backend and the JAX and prunejax versions; when any of
them changes, nothing recorded under the old key is used and the kernels are measured again.
A cache file that cannot be read, or an entry that is not what this module writes (missing or
non-finite numbers, unknown formats), is never trusted: it is ignored with a ``RuntimeWarning``
and measured again.  Every write is atomic (``prunejax._util.atomic_path``).
:func:`export_tuning` / :func:`import_tuning` move the records between machines of one kind
(e.g. to ship the measurements of a deployment machine with a model).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import os
import platform
import random
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from prunejax._util import atomic_path, cache_dir
from prunejax._version import __version__
from prunejax.sparse import ffi
from prunejax.sparse.kernels import BlockKernel, CsrKernel, EllKernel

__all__ = [
    "CACHE_NAME",
    "PRIOR",
    "TIMED_FORMATS",
    "check_measurement",
    "calibrate",
    "clear_memo",
    "constants",
    "export_tuning",
    "import_tuning",
    "kernel_isa",
    "launch_call",
    "lookup_measurement",
    "matmul_call",
    "machine_key",
    "probe_block",
    "probe_csr",
    "run_probes",
    "store_measurement",
    "time_interleaved",
]

# The prior: constants in microseconds of one CPU core, calibrated (process CPU time, one XLA
# thread, median of 7) on a 2-core AMD EPYC Zen 4 (AVX-512) with jax 0.10.2, fp32, 4096x4096 at
# 10% density and LeNet-300-100 layers.  Calibrated constants are wall-clock microseconds of
# this machine with its threads (ratios are what decide, and all kernels use the same threads).
PRIOR: dict[str, float] = {
    "dense_call_us": 12.0,  # fixed cost of XLA's dot (wall-clock minimum, tiny layers)
    "kernel_call_us": 7.0,  # fixed cost of one compiled-kernel custom call
    "dense_weight_ns": 0.18,  # per weight streamed from DRAM (kernel > 8 MB), batch 1
    "dense_weight_cached_ns": 0.08,  # per weight when the kernel stays in cache (<= 8 MB)
    "dense_mac_ns": 0.0204,  # per multiply-add at large batch (~98 GFLOP/s per core)
    "csr_gather_ns": 0.45,  # per nonzero and batch row, gather-dot kernel (batch < 8)
    "csr_tile16_ns": 1.2,  # per nonzero and 16-row tile of x (8 <= batch < 32)
    "csr_tile32_ns": 2.0,  # per nonzero and 32-row tile of x (batch >= 32)
    "csr_transpose_ns": 0.3,  # per element of x, building the transposed tiles
    "block_b1_ns": 0.07,  # per stored block entry at batch 1 (streams the blocks)
    "block_mac_ns": 0.035,  # per stored block entry and batch row (~57 GFLOP/s per core)
    "bcsr_t_call_us": 40.0,  # jax.experimental.sparse BCSR (Eigen) fixed cost
    "bcsr_t_ns": 0.15,  # per nonzero and batch row
    "gather_call_us": 20.0,  # pure-JAX gather forms (ell, block without the compiled kernel)
    "ell_ns": 1.2,  # per stored ELL entry and batch row
    "block_pure_ns": 0.3,  # per stored block entry and batch row
}
CACHE_NAME = "tuning.json"
# The formats a measurement may time ("dense" is XLA's dot, the baseline).
TIMED_FORMATS = ("dense", "dense_t", "csr", "bcsr_t", "ell", "block")
_SCHEMA = "prunejax-tuning/1"
# A solved constant outside [PRIOR / _BOUND, PRIOR * _BOUND] is a timing accident (a probe
# preempted by another process, a subtraction of two noisy times): it is bounded there, and the
# raw value is kept in the record ("solved").
_BOUND = 16.0
# Probe shapes: big (DRAM-bound at batch 1), mid (cache-resident), tiny (fixed costs).
_BIG, _MID, _TINY = (2048, 2048), (1024, 1024), (64, 64)
_DENSITY, _BATCH = 0.1, 32
# The dense FLOP rate is probed at a batch where the multiply-adds, not the weight stream,
# bound the time (at batch 32 the two overlap and the rate would come out up to 3x too high).
_DENSE_BATCH = 256
_lock = threading.RLock()
_memo: dict[tuple[str, str], dict[str, float]] = {}
_sources_hash: list[str] = []


# ----------------------------------------------------------------------------- the machine key


def kernel_isa() -> str:
    """The instruction set the compiled kernels were built for, as part of the machine key.

    Returns:
      ``prunejax.sparse.ffi.isa()`` when that module defines it; else (kernels compiled with
      ``-march=native``) ``"native:"`` and the CPU's vector flags from ``/proc/cpuinfo``
      (``avx2``, ``fma``, ``avx512*``, ``asimd``, ``sve``...), or the machine name elsewhere.
    """
    isa = getattr(ffi, "isa", None)
    if callable(isa):
        return str(isa())
    flags = _cpuinfo_field(("flags", "Features"))
    wanted = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512", "amx", "asimd", "sve", "neon")
    keep = sorted({f for f in flags.split() if f.startswith(wanted)})
    return "native:" + (",".join(keep) if keep else platform.machine())


@functools.cache
def _cpuinfo_field(names: tuple[str, ...]) -> str:
    """The first ``/proc/cpuinfo`` line whose field is one of ``names`` ("" when none)."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return ""
    for line in text.splitlines():
        field, _, value = line.partition(":")
        if field.strip() in names:
            return value.strip()
    return ""


def _kernels_hash() -> str:
    if not _sources_hash:
        try:
            text = "\0".join(f"{k}\0{v}" for k, v in ffi.read_sources().items())
        except OSError:
            text = "unreadable"
        _sources_hash.append(hashlib.sha256(text.encode()).hexdigest()[:16])
    return _sources_hash[0]


def machine_key() -> dict[str, str]:
    """What the measurements depend on; a change of any part means measuring again.

    Returns:
      ``{"cpu", "isa", "kernels", "compiled", "threads", "xla_flags", "backend", "jax",
      "prunejax"}`` as strings: CPU model (``/proc/cpuinfo``, else ``platform.processor()``),
      :func:`kernel_isa`, hash of the kernels' C++ sources, whether they are available, CPUs
      this process may run on, ``$XLA_FLAGS``, JAX's default backend, the versions.
    """
    cpu = _cpuinfo_field(("model name", "Model", "CPU part")) or platform.processor()
    try:
        threads = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        threads = os.cpu_count() or 1
    return {
        "cpu": cpu or platform.machine(),
        "isa": kernel_isa(),
        "kernels": _kernels_hash(),
        "compiled": str(ffi.available()),
        "threads": str(threads),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "backend": jax.default_backend(),
        "jax": jax.__version__,
        "jaxlib": ffi.jaxlib_version(),
        "prunejax": __version__,
    }


def _key_id(key: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------- timing


def time_interleaved(
    calls: dict[str, Callable[[], Any]], rounds: int, *, seed: int = 0, burst_us: float = 1000.0
) -> dict[str, list[float]]:
    """Time several calls in the same rounds, order shuffled per round (paired measurements).

    Each call is run once to warm up, then in every round each call runs a burst of back-to-back
    calls lasting about ``burst_us`` (1 to 64 calls, each waited for), timed with
    ``time.perf_counter``.  Comparing two calls round by round cancels most of the load that
    other processes put on the machine.

    Args:
      calls: ``{name: function}``; each function runs the computation and waits for its result.
      rounds: measurement rounds.
      seed: seed of the shuffling.
      burst_us: target duration of one burst.

    Returns:
      ``{name: [microseconds per call, one per round]}``.
    """
    reps = {}
    for name, fn in calls.items():
        t0 = time.perf_counter()
        fn()
        once = (time.perf_counter() - t0) * 1e6
        reps[name] = max(1, min(64, math.ceil(burst_us / max(once, 1e-3))))
    out: dict[str, list[float]] = {name: [] for name in calls}
    order = list(calls)
    rng = random.Random(seed)
    for _ in range(rounds):
        rng.shuffle(order)
        for name in order:
            fn, n = calls[name], reps[name]
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            out[name].append((time.perf_counter() - t0) * 1e6 / n)
    return out


def matmul_call(x: np.ndarray, w: Any) -> Callable[[], Any]:
    """A zero-argument call running the AOT-compiled ``x @ w`` and waiting for its result.

    Args:
      x: the left operand (placed on the default device once, here).
      w: a dense kernel or a kernel object.

    Returns:
      The call.
    """
    xj = jax.device_put(jnp.asarray(x))
    exe = jax.jit(lambda a, b: a @ b).lower(xj, w).compile()
    return lambda: jax.block_until_ready(exe(xj, w))


def launch_call(x: np.ndarray) -> Callable[[], Any]:
    """A zero-argument call running a trivial AOT-compiled executable (``x * 2``) and waiting
    for it: the cost of launching an executable, which a jitted model pays once.

    Args:
      x: its operand (placed on the default device once, here).

    Returns:
      The call.
    """
    xj = jax.device_put(jnp.asarray(x))
    exe = jax.jit(lambda a: a * 2).lower(xj).compile()
    return lambda: jax.block_until_ready(exe(xj))


# ----------------------------------------------------------------------------- calibration


def probe_csr(shape: tuple[int, int], density: float, fmt: str, seed: int = 0) -> CsrKernel:
    """A CSR probe kernel built directly (``fromdense`` on a large kernel takes longer than the
    whole measurement): every output has ``round(density * in)`` nonzeros of value 0.5, one in
    each run of ``1 / density`` inputs at a random place.

    Args:
      shape: ``(in, out)``.
      density: fraction of nonzeros (``1 / density`` an integer).
      fmt: ``"csr"`` (uint16 indices where they fit) or ``"bcsr_t"`` (int32).
      seed: random seed of the positions.

    Returns:
      The kernel, as ``CsrKernel.fromdense`` would build it from its dense form.
    """
    n_in, n_out = shape
    step = round(1 / density)
    k = n_in // step
    rng = np.random.default_rng(seed)
    idx = (np.arange(k) * step + rng.integers(0, step, (n_out, k))).reshape(-1)
    small = n_in <= np.iinfo(np.uint16).max + 1 and fmt == "csr"
    ptr = np.arange(n_out + 1, dtype=np.int32) * k
    val = np.full(idx.shape, 0.5, np.float32)
    idx = idx.astype(np.uint16 if small else np.int32)
    return CsrKernel(jnp.asarray(ptr), jnp.asarray(idx), jnp.asarray(val), shape, fmt)


def probe_block(shape: tuple[int, int], density: float, seed: int = 0) -> BlockKernel:
    """A 16x16-block probe kernel built directly: ``round(density * in / 16)`` blocks of value
    0.5 per block column, one in each run of ``1 / density`` block rows at a random place.

    Args:
      shape: ``(in, out)``, multiples of 16.
      density: fraction of kept blocks (``1 / density`` an integer).
      seed: random seed of the positions.

    Returns:
      The kernel, as ``BlockKernel.fromdense`` would build it from its dense form.
    """
    n_in, n_out = shape
    step = round(1 / density)
    k, cols = n_in // 16 // step, n_out // 16
    rng = np.random.default_rng(seed)
    rowb = (np.arange(k) * step + rng.integers(0, step, (cols, k))).reshape(-1).astype(np.int32)
    colb = np.repeat(np.arange(cols, dtype=np.int32), k)
    colptr = np.arange(cols + 1, dtype=np.int32) * k
    blocks = np.full((rowb.size, 16, 16), 0.5, np.float32)
    arrays = (colptr, rowb, colb, blocks)
    return BlockKernel(*(jnp.asarray(a) for a in arrays), shape)


def _as_ell(k: CsrKernel) -> EllKernel:
    """The ELL form of a probe CSR kernel (every output has the same number of nonzeros)."""
    n_out = k.shape[1]
    return EllKernel(k.idx.reshape(n_out, -1), k.val.reshape(n_out, -1), k.shape, k.nnz)


def _probe_kernels(compiled: bool) -> dict[str, tuple[Any, int]]:
    """``{probe name: (kernel, batch)}`` for the calibration (see :func:`_solve`)."""
    big = jnp.full(_BIG, 0.5, jnp.float32)
    dense = {
        "dense_tiny_b1": (jnp.full(_TINY, 0.5, jnp.float32), 1),
        "dense_mid_b1": (jnp.full(_MID, 0.5, jnp.float32), 1),
        "dense_big_b1": (big, 1),
        "dense_mid_bn": (jnp.full(_MID, 0.5, jnp.float32), _DENSE_BATCH),
    }
    if compiled:
        csr = probe_csr(_BIG, _DENSITY, "csr")
        blk = probe_block(_BIG, _DENSITY)
        return {
            **dense,
            "csr_tiny_b1": (probe_csr(_TINY, _DENSITY, "csr"), 1),
            "csr_b1": (csr, 1),
            "csr_bn": (csr, _BATCH),
            "block_b1": (blk, 1),
            "block_bn": (blk, _BATCH),
            "bcsr_t_bn": (probe_csr(_BIG, _DENSITY, "bcsr_t"), _BATCH),
        }
    return {
        **dense,
        "bcsr_t_tiny_bn": (probe_csr(_TINY, _DENSITY, "bcsr_t"), _BATCH),
        "bcsr_t_bn": (probe_csr(_BIG, _DENSITY, "bcsr_t"), _BATCH),
        "ell_tiny_b1": (_as_ell(probe_csr(_TINY, _DENSITY, "bcsr_t")), 1),
        "ell_b1": (_as_ell(probe_csr(_BIG, _DENSITY, "bcsr_t")), 1),
        "block_pure_bn": (probe_block(_BIG, _DENSITY), _BATCH),
    }


def run_probes(compiled: bool, rounds: int = 15) -> tuple[dict[str, float], dict[str, int]]:
    """Time the calibration probes on this machine (fastest single call of interleaved rounds).

    The fastest call, not the median: the constants describe the machine, and on a machine
    other processes share, slower calls measure them (scheduling delays of XLA's threads can
    turn a 10 µs call into milliseconds; bursts of calls average such delays in).  Single
    calls interleaved with the other probes also find the big kernels' weights out of cache,
    as a layer's weights are when the rest of a model ran in between.

    Args:
      compiled: probe the compiled CPU kernels (else the pure-JAX forms).
      rounds: measurement rounds.

    Returns:
      ``({probe: microseconds per call}, {"nnz": ..., "block_nse": ..., "ell_nse": ...})``, the
      counts of the probe kernels the constants are solved with.
    """
    probes = _probe_kernels(compiled)
    rng = np.random.default_rng(1)
    calls = {
        name: matmul_call(rng.standard_normal((b, k.shape[0])).astype(np.float32), k)
        for name, (k, b) in probes.items()
    }
    times = time_interleaved(calls, rounds, burst_us=0.0)
    counts = {"nnz": 0, "block_nse": 0, "ell_nse": 0}
    for name, (k, _) in probes.items():
        if name.startswith(("csr_b", "bcsr_t_b")):
            counts["nnz"] = int(k.nnz)
        elif name.startswith("block"):
            counts["block_nse"] = int(k.nse)
        elif name == "ell_b1":
            counts["ell_nse"] = int(k.nse)
    return {name: float(min(t)) for name, t in times.items()}, counts


def _ns(t_us: float, fixed_us: float, units: float) -> float:
    """Nanoseconds per unit of work in a probe of ``t_us`` with fixed cost ``fixed_us``.

    At most half the probe's time is taken as fixed cost: the big probes run for hundreds of
    microseconds, so a larger fixed cost is a timing accident of the tiny probe, not of this one.
    """
    return max(t_us - fixed_us, t_us / 2) * 1e3 / units


def _solve(us: dict[str, float], counts: dict[str, int], compiled: bool) -> dict[str, float]:
    """The cost-model constants from probe times (microseconds); unmeasured ones from PRIOR."""
    c = dict(PRIOR)
    big, mid, b = math.prod(_BIG), math.prod(_MID), _BATCH
    nnz, nse, n_in = counts["nnz"], counts["block_nse"], _BIG[0]
    c["dense_call_us"] = call = us["dense_tiny_b1"]
    c["dense_weight_ns"] = _ns(us["dense_big_b1"], call, big)
    c["dense_weight_cached_ns"] = _ns(us["dense_mid_b1"], call, mid)
    streamed = call + mid * c["dense_weight_cached_ns"] / 1e3
    c["dense_mac_ns"] = _ns(us["dense_mid_bn"], streamed, _DENSE_BATCH * mid)
    if compiled:
        c["kernel_call_us"] = kc = us["csr_tiny_b1"]
        c["csr_gather_ns"] = _ns(us["csr_b1"], kc, nnz)
        # batch 32: one 32-row tile plus the transposition of x (its share: PRIOR's constant)
        c["csr_tile32_ns"] = _ns(us["csr_bn"], kc + b * n_in * PRIOR["csr_transpose_ns"] / 1e3, nnz)
        c["csr_tile16_ns"] = PRIOR["csr_tile16_ns"] * c["csr_tile32_ns"] / PRIOR["csr_tile32_ns"]
        c["block_b1_ns"] = _ns(us["block_b1"], kc, nse)
        c["block_mac_ns"] = _ns(us["block_bn"], kc, b * nse)
        # Eigen's BCSR: fixed cost scaled from XLA's (same dispatch path), per-entry measured
        c["bcsr_t_call_us"] = PRIOR["bcsr_t_call_us"] * call / PRIOR["dense_call_us"]
    else:
        c["bcsr_t_call_us"] = us["bcsr_t_tiny_bn"]
        c["gather_call_us"] = gc = us["ell_tiny_b1"]
        c["ell_ns"] = _ns(us["ell_b1"], gc, counts["ell_nse"])
        c["block_pure_ns"] = _ns(us["block_pure_bn"], gc, b * nse)
    c["bcsr_t_ns"] = _ns(us["bcsr_t_bn"], c["bcsr_t_call_us"], b * nnz)
    return c


def _bounded(solved: dict[str, float]) -> dict[str, float]:
    out = {}
    for k, v in solved.items():
        lo, hi = PRIOR[k] / _BOUND, PRIOR[k] * _BOUND
        out[k] = min(max(v, lo), hi) if math.isfinite(v) else PRIOR[k]
    return out


def calibrate(*, force: bool = False, progress: bool | None = None) -> dict[str, Any]:
    """Measure this machine's cost-model constants (once per machine key) and cache them.

    Args:
      force: measure again even when a valid record for this machine key exists.
      progress: print one line on stderr while measuring (default: unless ``PRUNEJAX_QUIET``
        is set to anything but ``0``).

    Returns:
      The calibration record: ``{"constants": {...}, "solved": {...}, "probes_us": {...},
      "seconds": ..., "when": ...}`` (``constants`` are the bounded ``solved`` values).
    """
    with _lock:
        key = machine_key()
        store = _load_store()
        entry = store["machines"].get(_key_id(key))
        if entry is not None and entry.get("calibration") and not force:
            return entry["calibration"]
        if progress is None:
            progress = os.environ.get("PRUNEJAX_QUIET", "") in ("", "0")
        path = cache_dir() / CACHE_NAME
        if progress:
            print(
                f"prunejax: measuring the sparse kernels on this machine once (cached in {path};"
                " PRUNEJAX_QUIET=1 silences this) ...",
                end="",
                file=sys.stderr,
                flush=True,
            )
        t0 = time.perf_counter()
        compiled = key["compiled"] == "True"
        us, counts = run_probes(compiled)
        solved = _solve(us, counts, compiled)
        rec = {
            "constants": _bounded(solved),
            "solved": solved,
            "probes_us": us,
            "seconds": time.perf_counter() - t0,
            "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        if progress:
            print(f" done in {rec['seconds']:.2f} s", file=sys.stderr, flush=True)
        _update_store(key, calibration=rec)
        _memo[(str(path), _key_id(key))] = rec["constants"]
        return rec


def constants() -> dict[str, float]:
    """The cost-model constants for this machine: measured (on first use) and cached.

    Returns:
      The calibrated constants (see ``PRIOR`` for their names and meaning); ``PRIOR`` itself
      when ``PRUNEJAX_CALIBRATE=0``.
    """
    if os.environ.get("PRUNEJAX_CALIBRATE", "") == "0":
        return dict(PRIOR)
    memo = (str(cache_dir() / CACHE_NAME), _key_id(machine_key()))
    if memo not in _memo:
        _memo[memo] = dict(calibrate()["constants"])
    return dict(_memo[memo])


def clear_memo() -> None:
    """Forget what this process read from the cache file (the next use reads it again)."""
    _memo.clear()


# ----------------------------------------------------------------------------- the cache file


def _finite_map(obj: Any, keys: Any = None) -> bool:
    """``obj`` is a dict of finite positive numbers (with exactly ``keys``, when given)."""
    return (
        isinstance(obj, dict)
        and (keys is None or set(obj) == set(keys))
        and all(
            isinstance(k, str)
            and isinstance(v, int | float)
            and not isinstance(v, bool)
            and math.isfinite(v)
            and v > 0
            for k, v in obj.items()
        )
    )


def _check_entry(entry: Any) -> str | None:
    """Why a machine entry of the cache is not trustworthy (``None`` when it is)."""
    if not isinstance(entry, dict) or not isinstance(entry.get("key"), dict):
        return "not a machine entry with a key"
    if not all(isinstance(v, str) for v in entry["key"].values()):
        return "key values are not strings"
    cal = entry.get("calibration")
    if cal is not None and not (isinstance(cal, dict) and _finite_map(cal.get("constants"), PRIOR)):
        return "calibration constants missing, unknown, non-finite or not positive"
    meas = entry.get("measurements", {})
    if not isinstance(meas, dict):
        return "measurements are not a mapping"
    for k, rec in meas.items():
        why = check_measurement(rec)
        if why:
            return f"measurement {k!r}: {why}"
    return None


def check_measurement(rec: Any) -> str | None:
    """Why a ``tune=True`` measurement record is not trustworthy (``None`` when it is).

    Args:
      rec: a record as :func:`store_measurement` stores it.

    Returns:
      The reason, or ``None``.
    """
    if not isinstance(rec, dict) or not _finite_map(rec.get("times_us")):
        return "times_us missing, non-finite or not positive"
    if "dense" not in rec["times_us"] or not set(rec["times_us"]) <= set(TIMED_FORMATS):
        return f"unknown formats {sorted(rec['times_us'])}"
    if not _finite_map(rec.get("ratios"), set(rec["times_us"]) - {"dense"}):
        return "ratios missing or do not match the timed formats"
    if not _finite_map({"launch_us": rec.get("launch_us")}):
        return "launch_us missing, non-finite or not positive"
    if not (isinstance(rec.get("rounds"), int) and rec["rounds"] >= 1):
        return "rounds missing"
    return None


def _parse_store(text: str, where: str, *, drop_bad: bool = False) -> dict[str, Any]:
    """The valid content of a cache file; raises ValueError naming what is wrong.

    With ``drop_bad``, an untrustworthy machine entry is dropped (with a RuntimeWarning naming
    it) and the others are kept: one bad entry (another prunejax version's, say) does not wipe
    the measurements of other machines and versions sharing the cache directory.
    """
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise ValueError(f"{where} is not JSON ({e})") from None
    if not isinstance(data, dict) or data.get("schema") != _SCHEMA:
        raise ValueError(f"{where} is not a {_SCHEMA} file")
    if not isinstance(data.get("machines"), dict):
        raise ValueError(f"{where} has no machines mapping")
    for mid, entry in list(data["machines"].items()):
        why = _check_entry(entry)
        if why is None and _key_id(entry["key"]) != mid:
            why = "its key does not hash to its name"
        if why and not drop_bad:
            raise ValueError(f"{where}: machine entry {mid!r}: {why}")
        if why:
            del data["machines"][mid]
            warnings.warn(
                f"dropping machine entry {mid!r} of the prunejax tuning cache {where}, which "
                f"cannot be trusted: {why}; measuring again where it is needed",
                RuntimeWarning,
                stacklevel=4,
            )
    return data


@contextlib.contextmanager
def _dir_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock on the directory ``path`` (``flock`` on its descriptor, so no
    lock file is left behind; a no-op where ``fcntl`` is missing)."""
    try:
        import fcntl
    except ImportError:  # not POSIX
        yield
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _empty() -> dict[str, Any]:
    return {"schema": _SCHEMA, "machines": {}}


def _load_store() -> dict[str, Any]:
    """The cache file's content; a corrupt file is ignored with a RuntimeWarning."""
    path = cache_dir() / CACHE_NAME
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return _empty()
    except (OSError, UnicodeDecodeError) as e:
        text = f"unreadable: {e}"
    try:
        return _parse_store(text, str(path), drop_bad=True)
    except ValueError as e:
        warnings.warn(
            f"ignoring the prunejax tuning cache, which cannot be trusted: {e}; measuring again",
            RuntimeWarning,
            stacklevel=3,
        )
        return _empty()


def _write_store(store: dict[str, Any], path: Path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(store, indent=1, sort_keys=True), encoding="utf-8")


def _update_store(
    key: dict[str, str],
    *,
    calibration: dict[str, Any] | None = None,
    measurements: dict[str, Any] | None = None,
) -> None:
    """Read the cache file again, add to this machine's entry and write it back atomically.

    The read-modify-write holds an advisory lock (``fcntl.flock`` on the cache directory), so
    processes calibrating at the same time do not lose each other's entries.
    """
    with _lock, _dir_lock(cache_dir(create=True)):
        store = _load_store()
        mid = _key_id(key)
        entry = store["machines"].setdefault(mid, {"key": key, "measurements": {}})
        if calibration is not None:
            entry["calibration"] = calibration
        entry.setdefault("measurements", {}).update(measurements or {})
        _write_store(store, cache_dir(create=True) / CACHE_NAME)


def lookup_measurement(key: str) -> dict[str, Any] | None:
    """The ``tune=True`` measurement recorded for ``key`` on this machine.

    Args:
      key: the layer's measurement key (``prunejax.sparse.auto.measurement_key``).

    Returns:
      The record, or ``None`` when this machine has none for ``key``.
    """
    entry = _load_store()["machines"].get(_key_id(machine_key()))
    return None if entry is None else entry.get("measurements", {}).get(key)


def store_measurement(key: str, rec: dict[str, Any]) -> None:
    """Record a ``tune=True`` measurement for this machine (atomic write of the cache file).

    Args:
      key: the layer's measurement key.
      rec: ``{"times_us": {format: µs}, "ratios": {format: dense/format}, "rounds": n, ...}``.

    Raises:
      ValueError: ``rec`` is not a valid record.
    """
    why = check_measurement(rec)
    if why:
        raise ValueError(f"invalid measurement record for {key!r}: {why}")
    _update_store(machine_key(), measurements={key: rec})


def export_tuning(path: str | os.PathLike) -> Path:
    """Write every calibration and measurement cached on this machine to ``path`` (atomically).

    Args:
      path: the file to write (JSON).

    Returns:
      ``path`` as a ``Path``.
    """
    path = Path(path)
    _write_store(_load_store(), path)
    return path


def import_tuning(path: str | os.PathLike) -> int:
    """Merge a file written by :func:`export_tuning` into this machine's cache.

    Records are used only on a machine whose key equals theirs; imported records replace the
    cached ones of the same key.

    Args:
      path: the exported file.

    Returns:
      The number of machine entries imported.

    Raises:
      ValueError: the file is not a valid tuning file (nothing is imported).
    """
    data = _parse_store(Path(path).read_text(encoding="utf-8"), str(path))
    with _lock:
        store = _load_store()
        for mid, entry in data["machines"].items():
            mine = store["machines"].setdefault(mid, {"key": entry["key"], "measurements": {}})
            if entry.get("calibration") is not None:
                mine["calibration"] = entry["calibration"]
            mine.setdefault("measurements", {}).update(entry.get("measurements", {}))
        _write_store(store, cache_dir(create=True) / CACHE_NAME)
        _memo.clear()
    return len(data["machines"])
