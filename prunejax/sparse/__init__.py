"""Conversion of pruned kernels to sparse formats that really run faster, and back.

``sparsify`` turns each selected kernel (by default every 2-D leaf; kernels are ``(in, out)`` and
used as ``x @ W``) into a kernel object that supports ``x @ W`` inside and outside ``jax.jit``,
so model code written for dense kernels (``prunejax.models.mlp_apply``) runs unchanged.

Formats (``FORMATS``):

``"dense"``
    the plain array (what ``"auto"`` falls back to when no sparse form wins).
``"dense_t"``
    the dense kernel stored transposed, ``(out, in)``: a layout, not a sparse form.  At batch 1
    on CPU it runs a compiled row-dot kernel that streams ``W`` once (faster than XLA's batch-1
    dot on ``(in, out)``: LeNet-300-100 ~3x, 4096-wide layers ~1.3x); at other batches and
    elsewhere XLA's dot with the transposed operand.  ``"auto"`` uses it for layer kernels
    that stay dense at batch 1; it is also the fastest way to run compacted layers at batch 1.
``"bcoo"``, ``"bcsr"``
    ``jax.experimental.sparse`` matrices of ``W`` (int32 indices, sorted).  Reference forms: on
    CPU their ``x @ W`` is gather -> multiply -> scatter-add and loses to dense almost everywhere.
    On GPU they reach cuSPARSE only with ``jax.config.update("jax_bcoo_cusparse_lowering", True)``
    (a global setting this library never touches).
``"csr"``
    CSR of ``W.T`` (one row per output unit; uint16 column indices when ``in <= 65536``).  On CPU
    with fp32 it runs a compiled kernel (``prunejax.sparse.ffi``): batch < 8 gather-dot, bound
    by the ~6 bytes read per nonzero; batch >= 8 x-tiled 16-wide FMAs, bound by FMA/load rate.
    Elsewhere (GPU, other dtypes, no compiler) it runs as ``"bcsr_t"``.
``"bcsr_t"``
    the same CSR of ``W.T`` run as ``(W_T @ x.T).T`` with ``jax.experimental.sparse.BCSR`` on the
    LEFT, the only placement that reaches XLA CPU's multithreaded Eigen CSR kernel (and cuSPARSE
    on GPU with the flag above).  Wins on CPU at batch >= ~32 and density <= 10%.
``"ell"``
    padded-row ELL of ``W.T``: ``(out, K)`` indices and values, ``y = sum(x[..., idx] * val)``.
    Pure JAX gather; a batch-1 form (its temporary grows as ``batch * out * K``).
``"block"``
    dense ``(bh, bw)`` blocks (``block=`` argument, default 16x16) grouped by block column.
    Compiled kernel on CPU (blocks in registers, no scatter); elsewhere gather + batched matmul +
    sorted ``segment_sum``.  For masks from ``prunejax.masks.block_masks``.
``"nm"``
    N:M sparsity along the input axis (``nm_masks(params, n, m, axis=0)``): the kept values of
    ``W.T`` with uint8 offsets inside each group of ``m`` inputs, run as a compressed gather.
``"auto"``
    per layer the form predicted fastest for ``batch_size`` by a cost model whose constants are
    measured on this machine on first use (seconds, announced on stderr, cached per CPU
    model, ISA, kernel sources, thread count and JAX/prunejax versions: ``tuning``), dense
    unless the predicted gain exceeds a safety margin (1.43x): at batch 1 with the compiled CPU
    kernels a layer kernel that stays dense is ``"dense_t"`` (faster than XLA's batch-1 dot),
    elsewhere the plain array.  With ``sparsify(..., "auto", tune=True)`` the candidate forms of
    each layer are timed against dense at the user's batch size instead, in the same process
    and rounds, and a form is chosen only where measured at least 1.1x faster than dense (the
    times are cached; ``predict_times(..., measured=True)`` shows measured beside predicted).
    ``export_tuning`` / ``import_tuning`` move the measurements between machines of one kind.

Every prunejax kernel object (``"dense_t"``, ``"csr"``, ``"bcsr_t"``, ``"ell"``, ``"block"``,
``"nm"``) has ``shape``, ``dtype``, ``nnz`` (nonzeros), ``nse`` (stored entries, padding
included), ``nbytes``, ``format``, ``todense()`` and ``__rmatmul__``; ``"bcoo"`` and ``"bcsr"``
are ``jax.experimental.sparse`` matrices (``shape``, ``dtype``, ``nse``, ``todense()``, ``x @ W``).
All are registered pytrees whose arrays are their children, so they pass through ``jax.jit`` as
arguments.
``format_of`` / ``formats_of`` report the format of a leaf / of every kernel of a tree.

NaN and infinity in ``x``: the sparse forms multiply only the stored entries, so a NaN (or inf)
in ``x`` that meets only pruned (zero) weights does not reach the output, where dense ``x @ W``
gives NaN (``0 * nan`` is NaN).  ``"dense"`` and ``"dense_t"`` propagate NaN like ``x @ W``;
``"csr"``, ``"bcsr_t"``, ``"ell"``, ``"nm"`` and ``"bcoo"``/``"bcsr"`` skip pruned entries
(ELL/N:M padding entries hold value 0 and may pass a NaN of the input they point at), and
``"block"`` propagates NaN only through the blocks it stores.  An input NaN that meets a kept
weight is NaN in every form.  Check inputs with ``jnp.isfinite`` where a NaN must surface.

Kernel objects are for inference, and their sparsity pattern is fixed when they are built.
``"dense_t"`` is differentiable (a custom JVP through XLA's dot) and runs as one XLA dot under
``jax.vmap`` (a custom vmap rule); the pure-JAX forms differentiate by JAX's own rules; ``"csr"``
and ``"block"`` on the compiled CPU kernels define no derivatives (``jax.grad`` raises).  Train
and fine-tune with dense masked kernels (``prunejax.masked``, ``prunejax.pruning``) and sparsify
afterwards.

Any model, not only prunejax's MLP: ``sparse_apply(apply_fn)`` runs the user's own apply function
(Flax linen, NNX, Equinox, Haiku-style) with the kernel objects in place of its dense kernels
(``apply``).  ``sparsify``/``densify`` take an ``nnx.State`` or an Equinox module as well as
plain pytrees; ``(out, in)`` kernels (Equinox ``Linear``) become ``TransposedKernel`` views.

Modules: ``apply`` (``sparse_apply``), ``convert`` (``sparsify``, ``densify``, ``format_of``),
``kernels`` (the kernel classes), ``auto`` (the cost model ``predict_times`` and the
``tune=True`` measurement),
``tuning`` (this machine's calibration and measurements, their cache file, export/import),
``ffi`` (building and registering the
compiled CPU kernels, whose C++ sources are in ``csrc/``), ``gpu`` (the Pallas block-sparse
kernel ``"pallas_block"`` for NVIDIA GPUs, and ``auto``'s GPU candidates: on a GPU backend
``sparsify(..., "auto")`` times them per layer and keeps dense unless a form is measured faster).
"""

from prunejax.sparse.apply import sparse_apply
from prunejax.sparse.auto import predict_times
from prunejax.sparse.convert import (
    FORMATS,
    TransposedKernel,
    densify,
    format_of,
    formats_of,
    sparsify,
)
from prunejax.sparse.gpu import PallasBlockKernel, choose_gpu_format, gpu_candidates
from prunejax.sparse.kernels import (
    BCSRKernel,
    BlockKernel,
    CsrKernel,
    DenseTKernel,
    EllKernel,
    NMKernel,
)
from prunejax.sparse.tuning import calibrate, export_tuning, import_tuning

__all__ = [
    "FORMATS",
    "BCSRKernel",
    "BlockKernel",
    "CsrKernel",
    "DenseTKernel",
    "EllKernel",
    "NMKernel",
    "PallasBlockKernel",
    "TransposedKernel",
    "calibrate",
    "choose_gpu_format",
    "densify",
    "export_tuning",
    "format_of",
    "formats_of",
    "gpu_candidates",
    "import_tuning",
    "predict_times",
    "sparse_apply",
    "sparsify",
]
