"""Planning pruning at 7 billion parameters without the hardware: compile, don't run.

``python -m benchmarks.plan_sharded`` builds a 7-billion-parameter transformer-shaped tree
(LLaMA-7B shapes: vocabulary 32000, width 4096, MLP 11008, 32 layers) of abstract
``jax.ShapeDtypeStruct`` leaves sharded over 8 devices (tensor parallel, ``"model"``) and over 64
(8 x 8, ``"data"`` x ``"model"``, the weights sharded over both), lowers and compiles

* global magnitude mask building (traced sparsity),
* one ``pruning`` optimizer step (SGD, masks rebuilt in the step, global scope),
* ``sparsify`` (the "nm" and "bcoo" formats),

for forced CPU devices (nothing is allocated) and reports per-device argument, output and
temporary bytes from XLA's memory analysis as ``benchmarks/results/plan_sharded.md``.  The
target: temporaries of mask building at most 0.25x the per-device parameter bytes.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":  # before JAX starts: 64 host devices to compile for
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=64"
    )
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import prunejax as pj

OUT = Path(__file__).parent / "results" / "plan_sharded.md"
VOCAB, WIDTH, MLP = 32000, 4096, 11008


def tree_shapes(layers: int) -> dict:
    """``path -> (shape, spec)``: the kernel of every linear map, ``(in, out)``; norms 1-D."""
    out = {"embed": ((VOCAB, WIDTH), ("model", None)), "head": ((WIDTH, VOCAB), (None, "model"))}
    for i in range(layers):
        for name in ("q", "k", "v"):
            out[f"layer{i}/{name}"] = ((WIDTH, WIDTH), (None, "model"))
        out[f"layer{i}/o"] = ((WIDTH, WIDTH), ("model", None))
        out[f"layer{i}/gate"] = ((WIDTH, MLP), (None, "model"))
        out[f"layer{i}/up"] = ((WIDTH, MLP), (None, "model"))
        out[f"layer{i}/down"] = ((MLP, WIDTH), ("model", None))
        out[f"layer{i}/norm1"] = ((WIDTH,), (None,))
        out[f"layer{i}/norm2"] = ((WIDTH,), (None,))
    out["final_norm"] = ((WIDTH,), (None,))
    return out


def abstract_tree(mesh: jax.sharding.Mesh, layers: int, fsdp: bool) -> dict:
    """Abstract params; with ``fsdp`` the unsharded axis of each kernel is sharded over "data"."""
    tree = {}
    for path, (shape, spec) in tree_shapes(layers).items():
        if fsdp and len(shape) == 2:
            spec = tuple("data" if s is None else s for s in spec)
        tree[path] = jax.ShapeDtypeStruct(
            shape, jnp.float32, sharding=NamedSharding(mesh, P(*spec))
        )
    return tree


def per_device_param_bytes(tree: dict) -> int:
    total = 0
    for x in tree.values():
        shard = x.sharding.shard_shape(x.shape)
        total += int(np.prod(shard, dtype=np.int64)) * x.dtype.itemsize
    return total


def analyse(fn, *args) -> dict:
    t0 = time.perf_counter()
    try:
        compiled = jax.jit(fn).lower(*args).compile()
    except Exception as e:  # noqa: BLE001 - reported in the table
        return {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"}
    mem = compiled.memory_analysis()
    return {
        "args": mem.argument_size_in_bytes,
        "out": mem.output_size_in_bytes,
        "temp": mem.temp_size_in_bytes,
        "compile_s": time.perf_counter() - t0,
    }


def pruning_step(params: dict, state, grads: dict):
    tx = _tx()
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state


def _tx():
    return pj.pruning(
        optax.sgd(1e-3),
        lambda q, s: pj.magnitude_masks(q, s, scope="global"),
        pj.polynomial_sparsity(0.0, 0.5, 0, 1000),
        begin_step=0,
        end_step=1000,
        update_every=100,
    )


def plan(mesh: jax.sharding.Mesh, layers: int, fsdp: bool) -> list[tuple[str, dict]]:
    params = abstract_tree(mesh, layers, fsdp)
    rows = [
        (
            "magnitude_masks (global)",
            analyse(
                lambda p, s: pj.magnitude_masks(p, s, scope="global"), params, jnp.float32(0.5)
            ),
        )
    ]
    rows.append(
        (
            "magnitude_masks (layer)",
            analyse(lambda p, s: pj.magnitude_masks(p, s), params, jnp.float32(0.5)),
        )
    )
    state = jax.eval_shape(_tx().init, params)
    rows.append(
        (
            "pruning step (SGD)",
            analyse(pruning_step, params, _shard_state(state, params, mesh), params),
        )
    )
    for fmt in ("nm", "bcoo"):
        rows.append((f"sparsify ({fmt})", analyse(lambda p, f=fmt: pj.sparsify(p, f), params)))
    return [(name, {**r, "param": per_device_param_bytes(params)}) for name, r in rows]


def _shard_state(state, params: dict, mesh: jax.sharding.Mesh):
    """The optimizer state's per-parameter leaves sharded like the params, scalars replicated."""
    by_shape = {}
    for x in params.values():
        by_shape.setdefault((x.shape, "bool"), x.sharding)
        by_shape.setdefault((x.shape, "float32"), x.sharding)

    def place(s):
        sharding = by_shape.get((s.shape, str(s.dtype)), NamedSharding(mesh, P()))
        return jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding)

    return jax.tree_util.tree_map(place, state)


def render(results: list[tuple[str, str, list]]) -> str:
    gb = 2.0**30
    lines = [
        "# Planning pruning of a 7-billion-parameter model (compiled, not run)",
        "",
        "LLaMA-7B-shaped tree (vocabulary 32000, width 4096, MLP 11008), float32, abstract "
        "`jax.ShapeDtypeStruct` leaves compiled for forced XLA CPU devices; per-device bytes from "
        "`compiled.memory_analysis()` (arguments, outputs, temporaries).  Target: mask-building "
        "temporaries <= 0.25x the per-device parameter bytes.",
        "",
        "| mesh | params | computation | param GiB/dev | args GiB/dev | out GiB/dev | "
        "temp GiB/dev | temp / params | compile s |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for mesh_name, count, rows in results:
        for name, r in rows:
            if "error" in r:
                lines.append(
                    f"| {mesh_name} | {count} | {name} | {r['param'] / gb:.2f} | "
                    f"not lowerable: {r['error']} | | | | |"
                )
                continue
            lines.append(
                f"| {mesh_name} | {count} | {name} | {r['param'] / gb:.2f} | "
                f"{r['args'] / gb:.2f} | {r['out'] / gb:.2f} | {r['temp'] / gb:.3f} | "
                f"{r['temp'] / r['param']:.3f} | {r['compile_s']:.0f} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--meshes", default="8,64")
    args = ap.parse_args(argv)
    n_params = sum(int(np.prod(s)) for s, _ in tree_shapes(args.layers).values())
    results = []
    for n in [int(v) for v in args.meshes.split(",")]:
        shape, fsdp = ((1, 8), False) if n == 8 else ((n // 8, 8), True)
        mesh = jax.make_mesh(
            shape, ("data", "model"), axis_types=(AxisType.Auto,) * 2, devices=jax.devices()[:n]
        )
        rows = plan(mesh, args.layers, fsdp)
        name = f"{n} devices ({'data x model, FSDP' if fsdp else 'model'})"
        results.append((name, f"{n_params / 1e9:.2f} B", rows))
        for row in rows:
            print(name, row, flush=True)
    text = render(results)
    if args.layers != 32:
        text = text.replace(
            "\n\n| mesh",
            f"\n\nThis run: {args.layers} of the 32 layers (`--layers {args.layers}`), the "
            "same leaf shapes and shardings; the ratios are per leaf, the totals scale with "
            "the layers.\n\n| mesh",
            1,
        )
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(text)
    print(text)


if __name__ == "__main__":
    sys.exit(main())
