"""The GPU benchmark's cells: the forms of one pruned MLP, compiled, checked and timed in rounds.

A cell is (model, pattern, batch); its forms run the same ``pj.mlp_apply`` forward (ReLU
between layers) on: dense fp32 (the cuBLAS baseline), dense bf16, the compacted network
(``pj.compact``), BCOO and BCSR-of-W.T-on-the-left with and without
``jax_bcoo_cusparse_lowering`` (set only while that form is lowered and compiled), the Pallas
block kernel (fp32, bf16; fp32 also unsplit and with 1 and 8 warps) and ``auto`` (per layer
``gpu_candidates`` + ``choose_gpu_format``); ``dense_aa`` is dense again (own buffers and
executable), an A/A control whose distance from 1.00 is the cell's noise floor.
Every form's output is checked against dense before it is timed; a form that fails is recorded
with its error and the cell goes on.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import sparse as jsparse

import prunejax as pj
from benchmarks import gpu_report as rep
from benchmarks.workload import mlp_forward, tree_nbytes
from prunejax.sparse import gpu as pgpu
from prunejax.sparse.kernels import CsrKernel

# Relative tolerance (to the largest output) of a form against dense fp32: TF32 and bf16
# products (10- and 7-bit mantissas) over three layers.
TOL = {"float32": 2e-2, "bfloat16": 6e-2}


@dataclasses.dataclass
class Form:
    """One timed form of a cell."""

    name: str
    params: Any
    x: Any
    cusparse: bool = False
    note: str = ""
    exe: Callable | None = None
    temp: int | None = None
    t1: float = 0.0
    times: list = dataclasses.field(default_factory=list)


def set_cusparse(on: bool) -> None:
    """Set ``jax_bcoo_cusparse_lowering`` (the benchmark's only global setting).

    Raises:
      RuntimeError: this JAX has no such option (the cuSPARSE forms are then skipped).
    """
    try:
        jax.config.update("jax_bcoo_cusparse_lowering", bool(on))
    except (AttributeError, KeyError, ValueError) as e:
        raise RuntimeError(f"skipped: this JAX has no jax_bcoo_cusparse_lowering ({e})") from e


def compile_form(f: Form, mem_limit: float) -> int | None:
    """AOT-compile ``f`` (cuSPARSE lowering on only while a ``cusparse`` form compiles).

    Returns:
      The compiled temporary's bytes (None when XLA does not say).

    Raises:
      MemoryError: the compiled temporary exceeds ``mem_limit`` bytes.
    """

    def lower() -> Any:
        return jax.jit(lambda p, x: mlp_forward(p, x)).lower(f.params, f.x).compile()

    if f.cusparse:
        set_cusparse(True)
        try:
            exe = lower()
        finally:
            set_cusparse(False)
    else:
        exe = lower()
    temp = None
    try:
        temp = int(exe.memory_analysis().temp_size_in_bytes)
    except Exception:  # noqa: BLE001 - optional on some backends
        temp = None
    if temp is not None and temp > mem_limit:
        raise MemoryError(f"compiled temporary {temp / 2**30:.1f} GiB > limit")
    f.exe, f.temp = exe, temp
    return temp


def map_kernels(params: dict, fn: Callable[[str, np.ndarray], Any]) -> dict:
    """``params`` with each layer's kernel replaced by ``fn(layer name, kernel)``, and the other
    leaves (biases) on the device: a NumPy leaf would be copied to the device at every call."""
    return {
        k: {n: fn(k, np.asarray(a)) if n == "kernel" else jnp.asarray(a) for n, a in v.items()}
        for k, v in params.items()
    }


def to_device(params: dict, dtype: Any = jnp.float32) -> dict:
    return jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype), params)


def auto_params(pruned: dict, batch: int, kind: str, runs: int) -> tuple[dict, str]:
    """Per layer the form ``choose_gpu_format`` measures fastest; and a note of the choices."""
    chosen = []

    def pick(name: str, w: np.ndarray) -> Any:
        cands = pgpu.gpu_candidates(w, batch, kind)
        if not cands:
            chosen.append(f"{name}: dense (not an NVIDIA GPU)")
            return jnp.asarray(w)
        fmt, opts, times = pgpu.choose_gpu_format(w, batch, cands, runs=runs)
        shown = ", ".join(f"{f} {t * 1e6:.0f}" for f, t in times.items())
        chosen.append(f"{name}: {fmt} ({shown} µs)")
        return pgpu.gpu_format(w, fmt, **opts)

    return map_kernels(pruned, pick), "; ".join(chosen)


def build_forms(
    pruned: dict, batch: int, pattern: str, kind: str, on_gpu: bool, auto_runs: int
) -> list[tuple[str, Callable[[], Form]]]:
    """The forms of a cell as ``(name, thunk)``; a thunk builds its form (and may raise)."""
    rng = np.random.default_rng(batch)
    n_in = pruned["Dense_0"]["kernel"].shape[0]
    x32 = jnp.asarray(rng.standard_normal((batch, n_in), dtype=np.float32))
    xbf = x32.astype(jnp.bfloat16)

    def bcoo(_: str, w: np.ndarray) -> Any:
        return jsparse.BCOO.fromdense(jnp.asarray(w), index_dtype=jnp.int32)

    def bcsr_t(_: str, w: np.ndarray) -> Any:
        return CsrKernel.fromdense(w, "bcsr_t")

    def pallas(name: str, dtype: Any, **config: Any) -> tuple[str, Callable[[], Form]]:
        def thunk() -> Form:
            if not on_gpu:
                raise RuntimeError("skipped: no GPU (the Pallas kernel times only on a GPU)")
            if pattern != "block16":
                raise RuntimeError("skipped: not block-structured (16x16 blocks store ~all of W)")

            def build(n: str, w: np.ndarray) -> Any:
                return pgpu.PallasBlockKernel.fromdense(w.astype(dtype), (16, 16), n, **config)

            note = ", ".join(f"{k}={v}" for k, v in config.items())
            return Form(name, map_kernels(pruned, build), x32.astype(dtype), note=note)

        return name, thunk

    def auto() -> Form:
        p, note = auto_params(pruned, batch, kind, auto_runs)
        return Form("auto", p, x32, note=note)

    dense = to_device(pruned)
    return [
        ("dense", lambda: Form("dense", dense, x32)),
        ("dense_aa", lambda: Form("dense_aa", to_device(pruned), x32, note="A/A control")),
        ("dense_bf16", lambda: Form("dense_bf16", to_device(pruned, jnp.bfloat16), xbf)),
        ("compact", lambda: Form("compact", to_device(pj.compact(pruned).params), x32)),
        ("bcoo", lambda: Form("bcoo", map_kernels(pruned, bcoo), x32)),
        ("bcoo_cusparse", lambda: Form("bcoo_cusparse", map_kernels(pruned, bcoo), x32, True)),
        ("bcsr_t", lambda: Form("bcsr_t", map_kernels(pruned, bcsr_t), x32)),
        (
            "bcsr_t_cusparse",
            lambda: Form("bcsr_t_cusparse", map_kernels(pruned, bcsr_t), x32, True),
        ),
        pallas("pallas_block", jnp.float32),
        pallas("pallas_block_bf16", jnp.bfloat16),
        # launch variants, so that one GPU run shows which settings the defaults should take
        pallas("pallas_block_split1", jnp.float32, split=1),
        pallas("pallas_block_w1", jnp.float32, num_warps=1),
        pallas("pallas_block_w8", jnp.float32, num_warps=8),
        ("auto", auto),
    ]


def rel_error(y: Any, ref: np.ndarray) -> float:
    y = np.asarray(jnp.asarray(y, jnp.float32), np.float64)
    scale = float(np.abs(ref).max()) or 1.0
    return float(np.abs(y - ref).max() / scale)


def prepare(f: Form, ref: np.ndarray, mem_limit: float, max_call: float) -> dict:
    """Compile, check against ``ref`` and warm ``f`` up; the cell row's fields so far."""
    temp = compile_form(f, mem_limit) if f.exe is None else f.temp
    t0 = time.perf_counter()
    y = jax.block_until_ready(f.exe(f.params, f.x))
    first = time.perf_counter() - t0
    dt = "bfloat16" if "bf16" in f.name else "float32"
    err = rel_error(y, ref)
    if not err <= TOL[dt]:
        raise ArithmeticError(f"WRONG: max rel. error {err:.2e} > {TOL[dt]:.0e}")
    f.t1 = first
    if first <= max_call:
        for _ in range(2):
            t0 = time.perf_counter()
            jax.block_until_ready(f.exe(f.params, f.x))
            f.t1 = min(f.t1, time.perf_counter() - t0)
    return {"err": err, "temp_bytes": temp, "stored_bytes": tree_nbytes(f.params)}


def time_rounds(forms: list[Form], cell_s: float, seed: int = 0) -> int:
    """Time ``forms`` (forms[0] = dense) in shuffled rounds within ``cell_s``; rounds run."""
    bursts = [rep.burst(f.t1) for f in forms]
    t_round = sum(f.t1 * b for f, b in zip(forms, bursts, strict=True))
    rounds = rep.plan_rounds(t_round, cell_s)
    order_rng = np.random.default_rng(seed)
    for _ in range(rounds):
        for k in order_rng.permutation(len(forms)):
            f, n = forms[k], bursts[k]
            t0 = time.perf_counter()
            for _ in range(n):
                jax.block_until_ready(f.exe(f.params, f.x))
            f.times.append((time.perf_counter() - t0) / n)
    return rounds
