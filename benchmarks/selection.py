"""Magnitude-mask selection: the sort it replaced against ``prunejax.selection``, on one device.

``python -m benchmarks.selection`` compiles both for a 4096x4096 float32 kernel (layer scope)
and for that kernel with a 4096x1024 one (global scope), reads the compiled temporaries from
XLA's memory analysis and times the compiled calls (best of ``--repeat``), then writes
``benchmarks/results/selection.md``.  "sort" is the ranking prunejax used before: a stable
argsort of the (concatenated) magnitudes and a scatter of the ranks.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.machine import cpu_model
from prunejax import magnitude_masks

OUT = Path(__file__).parent / "results" / "selection.md"


def sort_masks(params: dict, sparsity: jax.Array, scope: str) -> dict:
    """The sort-based ranking (the library's code before ``prunejax.selection``)."""

    def keep(flat: jax.Array) -> jax.Array:
        n = flat.shape[0]
        k = jnp.round(jnp.asarray(sparsity, jnp.float32) * n).astype(jnp.int32)
        order = jnp.argsort(flat, stable=True)
        ranks = jnp.zeros((n,), jnp.int32).at[order].set(jnp.arange(n, dtype=jnp.int32))
        return ranks >= k

    if scope == "layer":
        return {k: keep(jnp.abs(v).reshape(-1)).reshape(v.shape) for k, v in params.items()}
    flat = jnp.concatenate([jnp.abs(v).reshape(-1) for v in params.values()])
    out, off = {}, 0
    for k, v in params.items():
        out[k] = flat[off : off + v.size].reshape(v.shape)
        off += v.size
    kept = keep(flat)
    off = 0
    for k, v in params.items():
        out[k] = kept[off : off + v.size].reshape(v.shape)
        off += v.size
    return out


def isa() -> str:
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((ln for ln in f if ln.startswith("flags")), "")
    except OSError:
        pass
    return "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "other"


def measure(fn, params: dict, repeat: int) -> tuple[int, float]:
    compiled = jax.jit(fn).lower(params, jnp.float32(0.9)).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    jax.block_until_ready(compiled(params, jnp.float32(0.9)))
    best = np.inf
    for _ in range(repeat):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(params, jnp.float32(0.9)))
        best = min(best, time.perf_counter() - t0)
    return temp, best


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args(argv)
    key = jax.random.key(0)
    cases = {
        "layer": {"k": jax.random.normal(key, (4096, 4096), jnp.float32)},
        "global": {
            "k": jax.random.normal(key, (4096, 4096), jnp.float32),
            "k2": jax.random.normal(jax.random.fold_in(key, 1), (4096, 1024), jnp.float32),
        },
    }
    rows = []
    for scope, params in cases.items():
        pbytes = sum(v.size * 4 for v in params.values())
        new = measure(lambda p, s, sc=scope: magnitude_masks(p, s, scope=sc), params, args.repeat)
        old = measure(lambda p, s, sc=scope: sort_masks(p, s, sc), params, args.repeat)
        a = jax.jit(lambda p, s, sc=scope: magnitude_masks(p, s, scope=sc))(params, 0.9)
        b = jax.jit(lambda p, s, sc=scope: sort_masks(p, s, sc))(params, 0.9)
        same = all(bool(jnp.array_equal(a[k], b[k])) for k in params)
        shapes = " + ".join("x".join(map(str, v.shape)) for v in params.values())
        rows.append((scope, shapes, pbytes, old, new, same))
        print(scope, shapes, old, new, same, flush=True)
    lines = [
        "# Magnitude-mask selection: sort vs. prunejax.selection",
        "",
        f"CPU: {cpu_model()} ({isa()}), {jax.device_count()} device(s), "
        f"{len(jax.devices()[0].client.devices())} XLA CPU device(s), JAX {jax.__version__}; "
        f"load average {os.getloadavg()[0]:.1f} at the end of the run (a shared 2-core machine: "
        "absolute times are inflated, the two columns ran under the same load); "
        f"compiled calls, best of {args.repeat}, sparsity 0.9 (traced).  Temporaries from "
        "`jax.jit(...).lower(...).compile().memory_analysis().temp_size_in_bytes`.",
        "",
        "| scope | float32 leaves | param MB | sort temp MB | selection temp MB | "
        "temp / params | sort s | selection s | speed-up | same masks |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for scope, shapes, pbytes, (ot, os_), (nt, ns), same in rows:
        lines.append(
            f"| {scope} | {shapes} | {pbytes / 2**20:.0f} | {ot / 2**20:.1f} | {nt / 2**20:.2f} | "
            f"{nt / pbytes:.3f} | {os_:.3f} | {ns:.3f} | {os_ / ns:.1f}x | {same} |"
        )
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
