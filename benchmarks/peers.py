"""Reference formats from other libraries, timed beside prunejax's as points of comparison.

What a user would pick instead for CPU inference of the same pruned MLP:

* ``jsp.bcoo``: ``jax.experimental.sparse.BCOO`` kernels, ``x @ W`` (through ``pj.mlp_apply``);
* ``jsp.bcsr``: ``W^T`` as ``jax.experimental.sparse.BCSR`` on the LEFT, ``(W^T @ x^T)^T``: the
  only BCSR product JAX implements, and the one that reaches the Eigen CSR x dense kernel on CPU;
* ``scipy.csr``: SciPy CSR (``W^T``) x dense in NumPy, outside jit;
* ``onnxruntime``: the MLP exported to ONNX (``benchmarks.onnx_export``: MatMul + Add + Relu,
  fp32, pruned weights as zeros) run by ONNX Runtime's CPU provider (dense MLAS kernels), in
  this process, intra-op threads = the machine's cores;
* ``deepsparse``: the same ONNX file compiled by Neural Magic's DeepSparse 1.8 (a sparse CPU
  engine: it finds the zeros itself), in a worker process with its own venv (DeepSparse 1.8
  needs NumPy < 2; ``benchmarks.deepsparse_worker``), timed in bursts inside the worker,
  round-robin with the others.  The worker's Python is ``$PRUNEJAX_DEEPSPARSE_PYTHON``, else
  the venv ``python -m benchmarks.peers --setup-deepsparse`` makes under the cache dir.

The ONNX packages are optional (``pip install prunejax[bench]``): without them, or without the
DeepSparse venv, those peers are skipped with the reason recorded in the results.

``PEERS`` maps each name to ``(builder, granularities it applies to by default)``.
"""

from __future__ import annotations

import argparse
import atexit
import itertools
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import sparse as jsparse

from benchmarks import onnx_export
from benchmarks.deepsparse_worker import WORKER_PATH, RemoteForward, WorkerClient, WorkerError
from benchmarks.formats import Built, Ctx, Skip, cached
from benchmarks.workload import biases, dense_forward, kernels, tree_nbytes
from prunejax._util import cache_dir

BENCH_EXTRA = "pip install 'prunejax[bench]'"
DEEPSPARSE_ENV = "PRUNEJAX_DEEPSPARSE_PYTHON"
DEEPSPARSE_REQUIREMENTS = ("deepsparse==1.8.0", "numpy<2")
SETUP_HINT = "python -m benchmarks.peers --setup-deepsparse"


def _bcoo(k: np.ndarray) -> jsparse.BCOO:
    rows, cols = np.nonzero(k)  # row-major: sorted, unique
    idx = np.stack([rows, cols], axis=1).astype(np.int32)
    return jsparse.BCOO(
        (jnp.asarray(k[rows, cols]), jnp.asarray(idx)),
        shape=k.shape,
        indices_sorted=True,
        unique_indices=True,
    )


def _bcsr_t(k: np.ndarray) -> jsparse.BCSR:
    kt = np.ascontiguousarray(k.T)
    indptr = np.concatenate([[0], np.cumsum((kt != 0).sum(axis=1))]).astype(np.int32)
    rows, cols = np.nonzero(kt)
    data = (jnp.asarray(kt[rows, cols]), jnp.asarray(cols.astype(np.int32)), jnp.asarray(indptr))
    return jsparse.BCSR(data, shape=kt.shape, indices_sorted=True, unique_indices=True)


def _with_kernels(ctx: Ctx, ks: list) -> dict:
    """The pruned params with their kernels replaced by ``ks`` (biases as JAX arrays)."""
    return {
        f"Dense_{i}": {"kernel": k, "bias": jnp.asarray(b)}
        for i, (k, b) in enumerate(zip(ks, biases(ctx.pruned), strict=True))
    }


def build_jsp_bcoo(ctx: Ctx) -> Built:
    """``jax.experimental.sparse.BCOO`` kernels built from the NumPy nonzeros."""
    ks = cached(ctx, "jsp.bcoo", lambda: [_bcoo(k) for k in kernels(ctx.pruned)])
    p = _with_kernels(ctx, ks)
    return Built(dense_forward, (p, jnp.asarray(ctx.x)), nbytes=tree_nbytes(p))


@jax.jit
def bcsr_left_forward(kernels_t: list, biases_: list, x: jax.Array) -> jax.Array:
    """The MLP forward with every kernel stored transposed, multiplied on the left."""
    h = x
    for i, (kt, b) in enumerate(zip(kernels_t, biases_, strict=True)):
        h = (kt @ h.T).T + b
        if i < len(kernels_t) - 1:
            h = jax.nn.relu(h)
    return h


def build_jsp_bcsr(ctx: Ctx) -> Built:
    """``W^T`` as ``jax.experimental.sparse.BCSR`` on the left (Eigen CSR kernel on CPU)."""
    ks = cached(ctx, "jsp.bcsr", lambda: [_bcsr_t(k) for k in kernels(ctx.pruned)])
    bs = [jnp.asarray(b) for b in biases(ctx.pruned)]
    return Built(
        bcsr_left_forward,
        (ks, bs, jnp.asarray(ctx.x)),
        nbytes=tree_nbytes((ks, bs)),
        note="W^T as BCSR on the left (Eigen CSR kernel on CPU)",
    )


def build_scipy_csr(ctx: Ctx) -> Built:
    """SciPy CSR (``W^T``) x dense, NumPy, outside jit: a reference outside JAX."""
    try:
        import scipy.sparse as ssp
    except ModuleNotFoundError:
        raise Skip("scipy is not installed") from None
    ks = cached(
        ctx,
        "scipy.csr",
        lambda: [ssp.csr_matrix(np.ascontiguousarray(k.T)) for k in kernels(ctx.pruned)],
    )
    bs = biases(ctx.pruned)

    def fwd(x: np.ndarray) -> np.ndarray:
        h = x
        for i, (kt, b) in enumerate(zip(ks, bs, strict=True)):
            h = (kt @ h.T).T + b
            if i < len(ks) - 1:
                h = np.maximum(h, 0)
        return h

    nb = sum(k.data.nbytes + k.indices.nbytes + k.indptr.nbytes for k in ks) + tree_nbytes(bs)
    return Built(
        fwd,
        (np.asarray(ctx.x),),
        jitted=False,
        nbytes=nb,
        note="SciPy CSR (W^T) x dense, NumPy, outside jit (reference)",
    )


# ----------------------------------------------------------------------------- ONNX peers

_ONNX_DIR: list[str] = []
_ONNX_NAMES = itertools.count()  # a new name per export: engines are cached by path


def _onnx_dir() -> str:
    """This process's folder of exported models (removed at exit)."""
    if not _ONNX_DIR:
        d = tempfile.mkdtemp(prefix="prunejax-onnx-")
        atexit.register(shutil.rmtree, d, True)
        _ONNX_DIR.append(d)
    return _ONNX_DIR[0]


def onnx_file(ctx: Ctx) -> str:
    """The cell's pruned MLP as an ONNX file (one per sparsity; the previous one is removed).

    Raises:
      Skip: the ``onnx`` package is not installed.
    """

    def make() -> str | Skip:
        try:
            import onnx  # noqa: F401
        except ImportError:
            return Skip(f"onnx is not installed ({BENCH_EXTRA})")
        d = _onnx_dir()
        for old in os.listdir(d):
            os.remove(os.path.join(d, old))
        path = os.path.join(d, f"mlp-{next(_ONNX_NAMES)}.onnx")
        model = onnx_export.mlp_to_onnx(kernels(ctx.pruned), biases(ctx.pruned))
        return onnx_export.save(model, path)

    got = cached(ctx, "onnx", make)
    if isinstance(got, Skip):
        raise got
    return got


def ort_session(path: str, threads: int | None = None) -> Any:
    """An ONNX Runtime CPU session of ``path``: all graph optimizations, ``threads`` intra-op
    threads (default: the machine's cores), no spin-waiting.

    ONNX Runtime's pool spin-waits for work after every run by default: on a machine whose cores
    the other timed formats share, the spinning threads would slow whatever is timed next, dense
    included.  Turned off here (``session.intra_op.allow_spinning = 0``).
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads or os.cpu_count() or 1
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def build_onnxruntime(ctx: Ctx) -> Built:
    """ONNX Runtime (CPU provider, dense MLAS) on the exported pruned MLP, in this process."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise Skip(f"onnxruntime is not installed ({BENCH_EXTRA})") from None
    path = onnx_file(ctx)
    sess = cached(ctx, "onnxruntime", lambda: ort_session(path))
    threads = os.cpu_count() or 1

    def fwd(x: np.ndarray) -> np.ndarray:
        return sess.run(None, {onnx_export.INPUT: x})[0]

    return Built(
        fwd,
        (np.ascontiguousarray(ctx.x, dtype=np.float32),),
        jitted=False,
        nbytes=tree_nbytes(ctx.pruned),
        kind="dense",
        note=f"ONNX Runtime {ort.__version__} CPU (dense MLAS), {threads} intra-op threads, "
        "no spin-wait",
    )


# ----------------------------------------------------------------------------- DeepSparse

_DS: dict[str, Any] = {"client": None, "error": None, "engines": {}}


def deepsparse_venv() -> Path:
    """Where ``--setup-deepsparse`` puts the worker's venv: ``<cache dir>/deepsparse-venv``."""
    return cache_dir() / "deepsparse-venv"


def deepsparse_python() -> str | None:
    """The worker's Python: ``$PRUNEJAX_DEEPSPARSE_PYTHON``, else the set-up venv's, else None."""
    env = os.environ.get(DEEPSPARSE_ENV)
    if env:
        return env
    py = deepsparse_venv() / "bin" / "python"
    return str(py) if py.exists() else None


def deepsparse_command(python: str) -> list[str]:
    """The worker's command line (``-I``: isolated, so neither ``benchmarks/`` nor ``PYTHON*``
    variables shadow the worker venv's packages)."""
    return [python, "-I", WORKER_PATH]


def deepsparse_client() -> WorkerClient:
    """The process's DeepSparse worker, started at first use (once: a failure is remembered).

    Raises:
      Skip: no worker venv, or the worker cannot start or cannot give right answers (why).
    """
    if _DS["error"] is not None:
        raise Skip(_DS["error"])
    if _DS["client"] is None:
        py = deepsparse_python()
        if py is None:
            _DS["error"] = f"no DeepSparse worker venv: run `{SETUP_HINT}` or set ${DEEPSPARSE_ENV}"
            raise Skip(_DS["error"])
        try:
            client = WorkerClient(deepsparse_command(py), env={"NM_DISABLE_ANALYTICS": "1"})
        except WorkerError as e:
            _DS["error"] = f"DeepSparse worker ({py}) unavailable: {e}"[:500]
            raise Skip(_DS["error"]) from None
        atexit.register(client.close)
        _DS["client"] = client
    return _DS["client"]


def reset_deepsparse() -> None:
    """Stop the worker (if any) and forget a remembered failure."""
    if _DS["client"] is not None:
        _DS["client"].close()
    _DS.update(client=None, error=None, engines={})


def _deepsparse_engine(client: WorkerClient, path: str, batch: int) -> dict:
    """The compiled engine of ``path`` at ``batch`` (those of other files are released)."""
    engines = _DS["engines"]
    if (path, batch) not in engines:
        for key in [k for k in engines if k[0] != path]:
            client.free(engines.pop(key)["engine"])
        engines[(path, batch)] = client.load(path, batch, os.cpu_count())
    return engines[(path, batch)]


def build_deepsparse(ctx: Ctx) -> Built:
    """DeepSparse 1.8 on the exported pruned MLP, in its worker process, timed there."""
    client = deepsparse_client()
    path = onnx_file(ctx)
    try:
        eng = _deepsparse_engine(client, path, ctx.batch)
    except WorkerError:
        if client.proc.poll() is not None:  # the worker died: do not try it again
            reset_deepsparse()
            _DS["error"] = "the DeepSparse worker died earlier in this run"
        raise
    h = client.hello
    return Built(
        RemoteForward(client, eng["engine"]),
        (np.ascontiguousarray(ctx.x, dtype=np.float32),),
        jitted=False,
        nbytes=None,
        kind="index",
        note=f"DeepSparse {h.get('deepsparse')} ({h.get('avx_type')}), "
        f"{eng.get('num_cores')} cores, compiled in {eng['compile_s']:.1f}s; timed in its "
        f"worker process (NumPy {h.get('numpy')})",
    )


PEERS: dict[str, tuple[Callable[[Ctx], Built], set[str] | None]] = {
    "jsp.bcoo": (build_jsp_bcoo, {"unstructured", "2:4"}),
    "jsp.bcsr": (build_jsp_bcsr, {"unstructured", "2:4", "block16"}),
    "scipy.csr": (build_scipy_csr, {"unstructured", "2:4", "block16"}),
    # Dense: its cost does not depend on the pattern (it also runs at 0%, see cells.py).
    "onnxruntime": (build_onnxruntime, {"unstructured", "block16"}),
    "deepsparse": (build_deepsparse, {"unstructured", "block16"}),
}


# ----------------------------------------------------------------------------- setup CLI


def setup_deepsparse(venv: Path, python: str = sys.executable) -> str:
    """Create ``venv`` with ``python -m venv`` and install DeepSparse 1.8 (with NumPy < 2) in it.

    Args:
      venv: the folder of the new venv.
      python: the interpreter that makes it (DeepSparse 1.8 has wheels for CPython 3.8-3.11).

    Returns:
      The venv's Python (pass it as ``$PRUNEJAX_DEEPSPARSE_PYTHON``; the default place needs
      nothing).

    Raises:
      subprocess.CalledProcessError: venv creation or pip failed (pip's output was shown).
    """
    subprocess.run([python, "-m", "venv", str(venv)], check=True)
    py = str(Path(venv) / "bin" / "python")
    subprocess.run([py, "-m", "pip", "install", *DEEPSPARSE_REQUIREMENTS], check=True)
    return py


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m benchmarks.peers --setup-deepsparse [--venv DIR] [--python PY]``."""
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.peers", description=__doc__.split("\n")[0]
    )
    p.add_argument("--setup-deepsparse", action="store_true", help="make the DeepSparse venv")
    p.add_argument("--venv", type=Path, default=None, help=f"default {deepsparse_venv()}")
    p.add_argument("--python", default=sys.executable, help="the interpreter that makes the venv")
    opts = p.parse_args(argv)
    if not opts.setup_deepsparse:
        p.print_help()
        return 0
    venv = opts.venv or deepsparse_venv()
    try:
        py = setup_deepsparse(venv, opts.python)
        client = WorkerClient(deepsparse_command(py), env={"NM_DISABLE_ANALYTICS": "1"})
    except subprocess.CalledProcessError as e:
        print(
            f"setup failed ({e}); DeepSparse 1.8 has wheels for CPython 3.8-3.11 on x86-64 and "
            "aarch64 Linux: pass --python python3.11 (or older)",
            file=sys.stderr,
        )
        return 1
    except WorkerError as e:
        print(f"the venv was made but its worker does not serve: {e}", file=sys.stderr)
        return 1
    print(f"DeepSparse worker ready: {client.hello}")
    client.close()
    if opts.venv is not None:
        print(f"set {DEEPSPARSE_ENV}={py} for python -m benchmarks.run")
    return 0


if __name__ == "__main__":
    sys.exit(main())
