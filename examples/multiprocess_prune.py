"""Pruning on a real multi-process JAX runtime: 2 processes on this machine, CPU backend.

``python -m examples.multiprocess_prune`` starts two JAX processes (``jax.distributed.initialize``
with a coordinator on localhost, 2 CPU devices each, gloo collectives), which together hold a
2x2 mesh ("data" across the processes, "model" within each).  Each process then:

1. builds parameters sharded across both processes (every process holds only its shards);
2. builds global magnitude masks under ``jit`` (the selection's counts are all-reduced across
   the processes; nothing is gathered) and checks, after gathering them for the check only,
   that masks and counts equal the single-process NumPy result;
3. runs one ``pruning`` optimizer step with params, optimizer state, masks and batch sharded and
   checks it equals the same step on one device;
4. saves params and masks with :func:`prunejax.sharded.save_sharded` (each shard written once)
   and restores them onto another sharding.

It prints ``PROCESS <i> OK`` per process and exits non-zero if any check fails.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

SPARSITY = 0.7


def _host_params():
    import numpy as np

    rng = np.random.default_rng(0)
    return {
        "d0": {
            "kernel": rng.integers(-4, 5, (16, 32)).astype(np.float32) / 4,  # many ties
            "bias": rng.normal(size=(32,)).astype(np.float32),
        },
        "d1": {
            "kernel": rng.normal(size=(32, 8)).astype(np.float32),
            "bias": np.zeros(8, np.float32),
        },
    }


def _loss(p, x, y):
    import jax.numpy as jnp

    h = jnp.tanh(x @ p["d0"]["kernel"] + p["d0"]["bias"])
    return jnp.mean((h @ p["d1"]["kernel"] + p["d1"]["bias"] - y) ** 2)


def _optimizer():
    import optax

    import prunejax as pj

    return pj.pruning(
        optax.sgd(0.1, momentum=0.9),
        lambda q, s: pj.magnitude_masks(q, s, scope="global"),
        pj.constant_sparsity(SPARSITY),
        begin_step=0,
        end_step=10,
        update_every=1,
    )


def _step(tx):
    import jax

    def step(p, s, x, y):
        g = jax.grad(_loss)(p, x, y)
        u, s = tx.update(g, s, p)
        return jax.tree_util.tree_map(lambda a, b: a + b, p, u), s

    return jax.jit(step)


def worker(pid: int, port: int, ckpt_dir: str) -> None:
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=pid)
    import numpy as np
    from jax.experimental import multihost_utils
    from jax.sharding import AxisType, NamedSharding
    from jax.sharding import PartitionSpec as P

    import prunejax as pj
    from prunejax.sharded import load_sharded, save_sharded

    assert jax.process_count() == 2 and jax.device_count() == 4, jax.devices()
    mesh = jax.make_mesh((2, 2), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
    host = _host_params()
    specs = {
        "d0": {"kernel": P("data", "model"), "bias": P("model")},
        "d1": {"kernel": P("model", "data"), "bias": P()},
    }

    def place(x, spec):
        sharding = NamedSharding(mesh, spec)
        return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])

    params = jax.tree_util.tree_map(place, host, specs, is_leaf=lambda s: isinstance(s, P))
    assert not params["d0"]["kernel"].is_fully_addressable  # each process holds a part

    def gather(tree):
        return multihost_utils.process_allgather(tree, tiled=True)

    # 2. global magnitude masks across both processes
    masks = jax.jit(lambda p: pj.magnitude_masks(p, SPARSITY, scope="global"))(params)
    want = pj.magnitude_masks(host, SPARSITY, scope="global")
    for (kp, a), b, w in zip(
        jax.tree_util.tree_flatten_with_path(masks)[0],
        jax.tree_util.tree_leaves(want),
        jax.tree_util.tree_leaves(params),
        strict=True,
    ):
        assert a.sharding.is_equivalent_to(w.sharding, a.ndim), jax.tree_util.keystr(kp)
        np.testing.assert_array_equal(gather(a), b, err_msg=jax.tree_util.keystr(kp))
    pruned = sum(int((~np.asarray(gather(masks[k]["kernel"]))).sum()) for k in ("d0", "d1"))
    assert pruned == round(SPARSITY * (16 * 32 + 32 * 8)), pruned

    # 3. one pruning step, sharded over both processes vs. one device
    rng = np.random.default_rng(1)
    x = rng.normal(size=(8, 16)).astype(np.float32)
    y = rng.normal(size=(8, 8)).astype(np.float32)
    tx = _optimizer()
    state = jax.jit(tx.init)(params)
    new, state = _step(tx)(params, state, place(x, P("data", None)), place(y, P("data", None)))
    local = jax.local_devices()[0]
    ref_p = jax.device_put(host, local)
    ref, ref_state = _step(tx)(
        ref_p, jax.jit(tx.init)(ref_p), jax.device_put(x, local), jax.device_put(y, local)
    )
    for a, b in zip(jax.tree_util.tree_leaves(new), jax.tree_util.tree_leaves(ref), strict=True):
        np.testing.assert_allclose(gather(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    step_masks = pj.current_masks(state)
    for a, b in zip(
        jax.tree_util.tree_leaves(step_masks),
        jax.tree_util.tree_leaves(pj.current_masks(ref_state)),
        strict=True,
    ):
        np.testing.assert_array_equal(gather(a), np.asarray(b))

    # 4. save each shard once, restore onto another sharding
    tree = {"params": new, "masks": step_masks}
    save_sharded(os.path.join(ckpt_dir, "ckpt"), tree)
    other = jax.tree_util.tree_map(
        lambda a: jax.ShapeDtypeStruct(
            a.shape, a.dtype, sharding=NamedSharding(mesh, P(*(["model"] + [None] * (a.ndim - 1))))
        ),
        tree,
    )
    back = load_sharded(os.path.join(ckpt_dir, "ckpt"), other)
    for a, b, o in zip(
        jax.tree_util.tree_leaves(back),
        jax.tree_util.tree_leaves(tree),
        jax.tree_util.tree_leaves(other),
        strict=True,
    ):
        assert a.sharding.is_equivalent_to(o.sharding, a.ndim)
        np.testing.assert_array_equal(gather(a), gather(b))
    print(f"PROCESS {pid} OK pruned={pruned} of {16 * 32 + 32 * 8}", flush=True)
    jax.distributed.shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def launch(timeout: float = 300) -> int:
    """Start the two processes, wait for both, print their output; 0 when both succeeded."""
    port = _free_port()
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ)
    env["XLA_FLAGS"] = env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = str(root) + os.pathsep + env.get("PYTHONPATH", "")
    with tempfile.TemporaryDirectory() as ckpt_dir:
        cmd = [sys.executable, "-m", "examples.multiprocess_prune", "--port", str(port)]
        procs = [
            subprocess.Popen(
                [*cmd, "--worker", str(i), "--dir", ckpt_dir],
                env=env,
                cwd=root,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            for i in range(2)
        ]
        rc = 0
        for i, p in enumerate(procs):
            try:
                out, _ = p.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                for q in procs:
                    q.kill()
                out, _ = p.communicate()
                print(f"process {i} timed out after {timeout} s")
            print(out)
            rc = rc or p.returncode or 0
    return rc


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--dir", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker is not None:
        worker(args.worker, args.port, args.dir)
        return 0
    return launch()


if __name__ == "__main__":
    sys.exit(main())
