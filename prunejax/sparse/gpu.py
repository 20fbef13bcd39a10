"""GPU kernels: a block-sparse ``x @ W`` in Pallas, and the formats worth measuring on a GPU.

``W`` (in, out) is stored as its nonzero ``(bh, bw)`` blocks grouped by output block column
(block-CSC, Gray et al. 2017, "GPU Kernels for Block-Sparse Weights"): ``blocks`` (nb, bh, bw),
``rowb`` (nb,) their input block rows, ``colptr`` (out/bw + 1,) so that
``colptr[j]:colptr[j+1]`` are the blocks of output block column ``j``.  The Pallas kernel
(``jax.experimental.pallas``, Triton lowering on NVIDIA GPUs) runs one program per
``(batch tile, output block column, split)``: it walks that column's blocks, loads the matching
``(tile, bh)`` slice of ``x`` and accumulates ``x_slice @ block`` in fp32 (tensor cores for
bf16/fp16, TF32 for fp32 at JAX's default precision).  Only the stored blocks are read; the
batch is padded to the tile (16 to 128 rows).  ``split > 1`` divides each column's blocks among
that many programs (partial sums added afterwards): more programs in flight at small batch.

Off the GPU (and for ``interpret=False`` on CPU) ``x @ W`` runs an equivalent pure-JAX form
(gather, batched matmul, sorted ``segment_sum``); ``interpret=True`` runs the Pallas kernel in
Pallas's interpreter on any platform (how the kernel itself is tested without a GPU).  The
kernel defines no derivatives: an inference form, like the compiled CPU kernels.

``gpu_candidates`` proposes, per layer, the formats worth timing on a GPU (dense cuBLAS always;
``jax.experimental.sparse`` BCOO and BCSR-on-the-left where cuSPARSE is enabled; this kernel
where the mask is block-structured); ``choose_gpu_format`` times them and keeps a sparse form
only where it measured faster than dense.
"""

from __future__ import annotations

import functools
import math
import statistics
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import sparse as jsparse

from prunejax.sparse.kernels import CsrKernel, block_nse

__all__ = [
    "BLOCK_SIZES",
    "GPU_FORMATS",
    "PallasBlockKernel",
    "batch_tile",
    "choose_gpu_format",
    "default_split",
    "gpu_candidates",
    "gpu_format",
    "is_nvidia",
    "pallas_block_matmul",
]

GPU_FORMATS = ("dense", "bcoo", "bcsr_t", "pallas_block")
# Block sides the kernel supports: Triton's dot needs power-of-two tiles of at least 16.
BLOCK_SIZES = (16, 32, 64, 128)
# gpu_candidates proposes cuSPARSE forms only up to this density (cuSPARSE SpMM rarely beats
# cuBLAS above a few percent; the bound leaves the decision to measurement below it) ...
CUSPARSE_MAX_DENSITY = 0.3
# ... and the block kernel only where its stored blocks hold at most this fraction of W.
BLOCK_MAX_STORED = 0.5
# choose_gpu_format keeps a sparse form only when its median time is at most this x dense.
CHOOSE_MARGIN = 0.95
# Streaming multiprocessors assumed by default_split (an H100/H200 has 132).
DEFAULT_SMS = 132


# ----------------------------------------------------------------------------- the kernel


def batch_tile(batch: int) -> int:
    """Rows of ``x`` per program: the next power of two >= ``batch``, between 16 and 128.

    Args:
      batch: rows of ``x``.

    Returns:
      The batch tile (Triton's dot needs at least 16 rows; 128 bounds the accumulator).
    """
    return int(min(128, max(16, 1 << max(0, int(batch) - 1).bit_length())))


def default_split(batch: int, n_cols: int, max_count: int, sms: int = DEFAULT_SMS) -> int:
    """How many programs share one output block column's blocks.

    At small batch there is one batch tile, so ``n_cols`` programs would leave most of a large
    GPU idle; the columns' blocks are split until about ``4 * sms`` programs are in flight, with
    at least 4 blocks per program.

    Args:
      batch: rows of ``x``.
      n_cols: output block columns.
      max_count: the most blocks in one column.
      sms: streaming multiprocessors of the card.

    Returns:
      The split, >= 1.
    """
    programs = math.ceil(batch / batch_tile(batch)) * max(n_cols, 1)
    want = math.ceil(4 * sms / programs)
    return int(max(1, min(want, max_count // 4)))


def _triton_params(num_warps: int | None, num_stages: int | None) -> Any:
    """Triton compiler parameters (selecting the Triton lowering), if this JAX has them."""
    try:
        from jax.experimental.pallas import triton as pltriton
    except ImportError:  # pragma: no cover - depends on the JAX build
        return None
    cls = getattr(pltriton, "CompilerParams", None) or getattr(
        pltriton, "TritonCompilerParams", None
    )
    return None if cls is None else cls(num_warps=num_warps, num_stages=num_stages)


def _block_kernel(colptr_ref, rowb_ref, x_ref, blocks_ref, o_ref, *, bm, bh, bw, chunk):  # noqa: ANN001
    """One program: ``o[tile, col] (+)= sum over its share of the column's blocks``."""
    from jax.experimental import pallas as pl

    i, j, s = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    start = colptr_ref[j]
    lo = start + s * chunk
    hi = jnp.minimum(colptr_ref[j + 1], lo + chunk)
    rows = pl.ds(pl.multiple_of(i * bm, bm), bm)

    def body(k: jax.Array, acc: jax.Array) -> jax.Array:
        rb = rowb_ref[k]
        xb = x_ref[rows, pl.ds(pl.multiple_of(rb * bh, bh), bh)]
        wb = blocks_ref[k, :, :]
        return acc + jnp.dot(xb, wb, preferred_element_type=jnp.float32)

    acc = jax.lax.fori_loop(lo, hi, body, jnp.zeros((bm, bw), jnp.float32))
    o_ref[0, :, :] = acc.astype(o_ref.dtype)


def pallas_block_matmul(
    x2: jax.Array,
    colptr: jax.Array,
    rowb: jax.Array,
    blocks: jax.Array,
    n_out: int,
    max_count: int,
    *,
    split: int = 1,
    interpret: bool = False,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> jax.Array:
    """``x2 @ W`` for a block-CSC ``W`` by the Pallas kernel (Gray et al. 2017).

    Args:
      x2: ``(batch, in)``, ``in`` a multiple of the block height.
      colptr: ``(out/bw + 1,)`` int32 block-column pointers.
      rowb: ``(nb,)`` int32 input block row of each block.
      blocks: ``(nb, bh, bw)`` block values (``nb >= 1``; pad with one zero block if empty).
      n_out: output features (a multiple of ``bw``).
      max_count: the most blocks in one column (static: sizes each program's share).
      split: programs per output block column (partial sums added in fp32).
      interpret: run in Pallas's interpreter (any platform) instead of lowering to Triton.
      num_warps: Triton warps per program (None: Pallas's default).
      num_stages: Triton software-pipelining stages (None: Pallas's default).

    Returns:
      ``(batch, out)`` in the result dtype of ``x2`` and ``blocks``.
    """
    from jax.experimental import pallas as pl

    dt = jnp.result_type(x2.dtype, blocks.dtype)
    batch = x2.shape[0]
    bm = batch_tile(batch)
    _, bh, bw = blocks.shape
    padded = -(-batch // bm) * bm
    x2 = jnp.pad(x2.astype(dt), ((0, padded - batch), (0, 0)))
    split = max(1, min(int(split), max(int(max_count), 1)))
    chunk = max(1, -(-int(max_count) // split))
    out_dt = dt if split == 1 else jnp.float32
    kernel = functools.partial(_block_kernel, bm=bm, bh=bh, bw=bw, chunk=chunk)
    whole = pl.BlockSpec()
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((split, padded, n_out), out_dt),
        grid=(padded // bm, n_out // bw, split),
        in_specs=[whole, whole, whole, whole],
        out_specs=pl.BlockSpec((1, bm, bw), lambda i, j, s: (s, i, j)),
        interpret=interpret,
        compiler_params=None if interpret else _triton_params(num_warps, num_stages),
        name="prunejax_block_matmul",
    )(colptr, rowb, x2, blocks.astype(dt))
    y = out[0] if split == 1 else out.sum(axis=0).astype(dt)
    return y[:batch]


def _block_pure(x2: jax.Array, colptr: jax.Array, rowb: jax.Array, blocks: jax.Array, n_out: int):  # noqa: ANN202
    """The same product in pure JAX: gather, batched matmul, sorted segment sum."""
    dt = jnp.result_type(x2.dtype, blocks.dtype)
    nb, bh, bw = blocks.shape
    n_cols = n_out // bw
    colb = jnp.searchsorted(colptr, jnp.arange(nb, dtype=colptr.dtype), side="right") - 1
    xb = x2.astype(dt).reshape(x2.shape[0], -1, bh)
    part = jnp.einsum("bnk,nkw->nbw", xb[:, rowb], blocks.astype(dt))
    y = jax.ops.segment_sum(part, colb, num_segments=n_cols, indices_are_sorted=True)
    return y.transpose(1, 0, 2).reshape(x2.shape[0], n_out)


# ----------------------------------------------------------------------------- kernel object


def _check_block(block: Any, path: str) -> tuple[int, int]:
    if (
        not isinstance(block, tuple | list)
        or len(block) != 2
        or not all(isinstance(b, int | np.integer) and int(b) in BLOCK_SIZES for b in block)
    ):
        raise ValueError(
            f"leaf {path!r}: block must be a pair of sides in {BLOCK_SIZES} for the "
            f"'pallas_block' format, got {block!r}"
        )
    return int(block[0]), int(block[1])


@jax.tree_util.register_pytree_node_class
class PallasBlockKernel:
    """Block-sparse ``W`` (in, out) run by the Pallas block kernel on NVIDIA GPUs.

    Arrays (pytree children): ``colptr`` (out/bw + 1,), ``rowb`` (nb,), ``blocks``
    (nb, bh, bw); static: ``shape``, ``nnz`` (entries of the stored blocks), ``max_count``
    (most blocks in a column), ``split`` (programs per column; 0 = ``default_split``),
    ``interpret`` (run the kernel in Pallas's interpreter everywhere), ``num_warps`` and
    ``num_stages`` (Triton's launch settings; None = Pallas's defaults).
    """

    __prunejax_kernel__ = True
    __array_ufunc__ = None  # make ``numpy_array @ W`` defer to ``W.__rmatmul__``
    format = "pallas_block"

    def __init__(
        self,
        colptr: Any,
        rowb: Any,
        blocks: Any,
        shape: tuple[int, int],
        nnz: int,
        max_count: int,
        split: int = 0,
        interpret: bool = False,
        num_warps: int | None = None,
        num_stages: int | None = None,
    ):
        self.colptr, self.rowb, self.blocks = colptr, rowb, blocks
        self.shape = tuple(shape)
        self.nnz, self.max_count = int(nnz), int(max_count)
        self.split, self.interpret = int(split), bool(interpret)
        self.num_warps, self.num_stages = num_warps, num_stages

    def tree_flatten(self) -> tuple[tuple, tuple]:
        aux = (self.shape, self.nnz, self.max_count, self.split, self.interpret)
        aux += (self.num_warps, self.num_stages)
        return (self.colptr, self.rowb, self.blocks), aux

    @classmethod
    def tree_unflatten(cls, aux: tuple, children: tuple) -> PallasBlockKernel:
        return cls(*children, *aux)

    @classmethod
    def fromdense(
        cls,
        w: Any,
        block: tuple[int, int] = (16, 16),
        path: str = "W",
        *,
        split: int = 0,
        interpret: bool = False,
        num_warps: int | None = None,
        num_stages: int | None = None,
    ) -> PallasBlockKernel:
        """Build from a dense (masked) ``(in, out)`` kernel; all-zero blocks are dropped.

        Args:
          w: the concrete 2-D kernel.
          block: ``(bh, bw)``, each side in ``BLOCK_SIZES``.
          path: the leaf's name, for error messages.
          split: programs per output block column (0: ``default_split`` per call).
          interpret: run the Pallas kernel in its interpreter on every platform.
          num_warps: Triton warps per program (None: Pallas's default).
          num_stages: Triton pipelining stages (None: Pallas's default).

        Returns:
          The kernel object.

        Raises:
          ValueError: ``w`` not 2-D, a block side not in ``BLOCK_SIZES``, or a shape not
            divisible into blocks.
          TypeError: ``w`` is not a float array.
        """
        w = np.asarray(w)
        bh, bw = _check_block(block, path)
        if w.ndim != 2:
            raise ValueError(f"leaf {path!r} has shape {w.shape}: 'pallas_block' needs 2-D")
        if not np.issubdtype(w.dtype, np.floating) and w.dtype != jnp.bfloat16:
            raise TypeError(f"leaf {path!r} has dtype {w.dtype}: 'pallas_block' needs floats")
        r, c = w.shape
        if r % bh or c % bw:
            raise ValueError(
                f"leaf {path!r} of shape {w.shape} is not divisible into {(bh, bw)} blocks "
                "for the 'pallas_block' format"
            )
        g = w.reshape(r // bh, bh, c // bw, bw).transpose(2, 0, 1, 3)  # (cols, rows, bh, bw)
        keep = (g != 0).any(axis=(2, 3))
        colb, rowb = np.nonzero(keep)  # grouped by output block column
        counts = keep.sum(axis=1)
        colptr = np.zeros(c // bw + 1, np.int32)
        np.cumsum(counts, out=colptr[1:])
        blocks = np.ascontiguousarray(g[colb, rowb])
        if blocks.shape[0] == 0:  # one zero block keeps every array non-empty
            blocks, rowb = np.zeros((1, bh, bw), w.dtype), np.zeros(1, np.int64)
        return cls(
            jnp.asarray(colptr),
            jnp.asarray(rowb.astype(np.int32)),
            jnp.asarray(blocks),
            w.shape,
            int(colptr[-1]) * bh * bw,
            int(counts.max(initial=0)),
            split,
            interpret,
            num_warps,
            num_stages,
        )

    @property
    def block(self) -> tuple[int, int]:
        return tuple(self.blocks.shape[1:])

    @property
    def dtype(self) -> Any:
        return self.blocks.dtype

    @property
    def ndim(self) -> int:
        return 2

    @property
    def nse(self) -> int:
        return int(math.prod(self.blocks.shape))

    @property
    def nbytes(self) -> int:
        """Bytes of all stored arrays (blocks, block rows, column pointers)."""
        arrays = (self.colptr, self.rowb, self.blocks)
        return int(sum(np.dtype(a.dtype).itemsize * math.prod(a.shape) for a in arrays))

    def todense(self) -> jax.Array:
        r, c = self.shape
        bh, bw = self.block
        nb = self.blocks.shape[0]
        # block column of each block (the placeholder block of an empty W lands past the end
        # and is dropped by the scatter)
        colb = jnp.searchsorted(self.colptr, jnp.arange(nb, dtype=self.colptr.dtype), "right") - 1
        g = jnp.zeros((r // bh, c // bw, bh, bw), self.dtype)
        g = g.at[self.rowb, colb].set(self.blocks, mode="drop")
        return g.transpose(0, 2, 1, 3).reshape(r, c)

    def __repr__(self) -> str:
        return (
            f"PallasBlockKernel(format='pallas_block', shape={self.shape}, dtype={self.dtype}, "
            f"block={self.block}, nnz={self.nnz})"
        )

    def __rmatmul__(self, x: Any) -> jax.Array:
        x = jnp.asarray(x)
        n_in, n_out = self.shape
        if x.ndim == 0 or x.shape[-1] != n_in:
            raise ValueError(
                f"x @ W: x has shape {x.shape}, but W has {n_in} input features (x.shape[-1])"
            )
        lead = x.shape[:-1]
        x2 = x.reshape(math.prod(lead), n_in)
        b = x2.shape[0]
        split = self.split or default_split(b, n_out // self.block[1], self.max_count)
        pallas = functools.partial(
            pallas_block_matmul,
            n_out=n_out,
            max_count=self.max_count,
            split=split,
            num_warps=self.num_warps,
            num_stages=self.num_stages,
        )
        args = (x2, self.colptr, self.rowb, self.blocks)
        if b == 0:
            y = jnp.zeros((0, n_out), jnp.result_type(x2.dtype, self.dtype))
        elif self.interpret:
            y = pallas(*args, interpret=True)
        else:
            y = jax.lax.platform_dependent(
                *args, cuda=pallas, default=functools.partial(_block_pure, n_out=n_out)
            )
        return y.reshape(*lead, n_out)


# ----------------------------------------------------------------------------- choosing


def is_nvidia(device_kind: str) -> bool:
    """Whether a ``jax.Device.device_kind`` names an NVIDIA GPU (e.g. ``"NVIDIA H200"``)."""
    kind = device_kind.lower()
    return any(k in kind for k in ("nvidia", "tesla", "geforce", "quadro", "rtx"))


def gpu_candidates(
    kernel: Any,
    batch_size: int,
    device_kind: str,
    *,
    cusparse: bool | None = None,
) -> dict[str, dict]:
    """The formats worth timing for one layer kernel on a GPU, with their build options.

    Dense (cuBLAS) is always a candidate.  ``"bcoo"`` (``x @ BCOO(W)``) and ``"bcsr_t"``
    (BCSR of ``W.T`` on the left, cuSPARSE's SpMM placement) are proposed when cuSPARSE is
    enabled and the density is at most ``CUSPARSE_MAX_DENSITY``: without
    ``jax_bcoo_cusparse_lowering`` they lower to XLA gather/scatter, which loses to cuBLAS.
    ``"pallas_block"`` is proposed with the mask's own block size, the largest square block
    (64, 32, 16) whose nonzero blocks store no more entries than the smallest, when they hold
    at most ``BLOCK_MAX_STORED`` of ``W`` (a block-structured mask; an unstructured or 2:4 mask
    keeps almost every block and gains nothing).

    Args:
      kernel: the ``(in, out)`` kernel, dense (masked) or any object with ``todense()``.
      batch_size: the inference batch size (positive).
      device_kind: ``jax.devices()[0].device_kind``, e.g. ``"NVIDIA H200"`` or ``"cpu"``.
      cusparse: whether ``jax_bcoo_cusparse_lowering`` is on (default: read ``jax.config``).

    Returns:
      ``{format: options for gpu_format}``; empty when ``device_kind`` is no NVIDIA GPU (the
      CPU cost model of ``prunejax.sparse.auto`` applies there).

    Raises:
      ValueError: ``kernel`` is not 2-D or ``batch_size`` is not a positive int.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int | np.integer):
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    w = np.asarray(kernel.todense() if hasattr(kernel, "todense") else kernel)
    if w.ndim != 2:
        raise ValueError(f"kernel has shape {w.shape}: gpu_candidates needs a 2-D kernel")
    if not is_nvidia(str(device_kind)):
        return {}
    if cusparse is None:
        cusparse = bool(getattr(jax.config, "jax_bcoo_cusparse_lowering", False))
    out: dict[str, dict] = {"dense": {}}
    density = np.count_nonzero(w) / max(w.size, 1)
    if cusparse and density <= CUSPARSE_MAX_DENSITY:
        out["bcoo"] = {}
        out["bcsr_t"] = {}
    stored = {s: block_nse(w, (s, s)) for s in (64, 32, 16)}
    stored = {s: n for s, n in stored.items() if n is not None}
    if stored and min(stored.values()) <= BLOCK_MAX_STORED * w.size:
        # the mask's own block size: the largest block storing no more than the smallest
        side = next(s for s, n in stored.items() if n == min(stored.values()))
        out["pallas_block"] = {"block": (side, side)}
    return out


def gpu_format(w: Any, fmt: str, **options: Any) -> Any:
    """``w`` in one of ``GPU_FORMATS`` (options from :func:`gpu_candidates`).

    Args:
      w: the concrete dense ``(in, out)`` kernel.
      fmt: ``"dense"``, ``"bcoo"``, ``"bcsr_t"`` or ``"pallas_block"``.
      **options: ``block=`` (and ``split=``, ``interpret=``) for ``"pallas_block"``.

    Returns:
      An object supporting ``x @ W`` inside ``jax.jit``.

    Raises:
      ValueError: an unknown format.
    """
    if fmt == "dense":
        return jnp.asarray(w)
    if fmt == "bcoo":
        return jsparse.BCOO.fromdense(jnp.asarray(w), index_dtype=jnp.int32)
    if fmt == "bcsr_t":
        return CsrKernel.fromdense(np.asarray(w), "bcsr_t")  # BCSR of W.T on the left
    if fmt == "pallas_block":
        return PallasBlockKernel.fromdense(w, **options)
    raise ValueError(f"unknown GPU format {fmt!r}; valid: {', '.join(GPU_FORMATS)}")


def _median_seconds(fn: Callable, args: tuple, runs: int, warmup: int) -> float:
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    ts = []
    for _ in range(runs):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def choose_gpu_format(
    w: Any,
    batch_size: int,
    candidates: Mapping[str, dict],
    *,
    runs: int = 20,
    warmup: int = 3,
    margin: float = CHOOSE_MARGIN,
    timer: Callable[[Callable, tuple], float] | None = None,
) -> tuple[str, dict, dict[str, float]]:
    """Time each candidate's ``x @ W`` at ``batch_size`` and keep the fastest, dense unless beaten.

    A sparse form is chosen only when its median time is at most ``margin`` x dense's, measured
    in this process on this device, so the choice is never slower than dense by measurement.
    A candidate that fails to build or run is skipped (its time is recorded as ``inf``).

    Args:
      w: the concrete dense ``(in, out)`` kernel.
      batch_size: rows of ``x``.
      candidates: ``{format: options}`` from :func:`gpu_candidates` (``"dense"`` is added).
      runs: timed calls per candidate (median).
      warmup: untimed calls first (compilation, autotuning).
      margin: how much faster than dense a sparse form must be.
      timer: ``(fn, args) -> seconds`` replacing the wall-clock median (for tests).

    Returns:
      ``(format, options, {format: seconds})``.
    """
    w = np.asarray(w)
    x = jnp.ones((batch_size, w.shape[0]), w.dtype)
    measure = timer or functools.partial(_median_seconds, runs=runs, warmup=warmup)
    times: dict[str, float] = {}
    for fmt, opts in {"dense": {}, **dict(candidates)}.items():
        try:
            obj = gpu_format(w, fmt, **opts)
            times[fmt] = float(measure(jax.jit(lambda x, o: x @ o), (x, obj)))
        except Exception:  # noqa: BLE001 - a candidate that cannot run is not chosen
            times[fmt] = math.inf
    best = min(times, key=times.get)
    if best != "dense" and times[best] <= margin * times["dense"]:
        return best, dict(candidates[best]), times
    return "dense", {}, times
