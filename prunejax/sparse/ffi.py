"""Compiled CPU kernels for sparse ``x @ W`` (XLA FFI custom calls), built on first use.

The C++ sources ship with the package in ``prunejax/sparse/csrc``: ``kernels.h`` /
``kernels.cc`` hold the kernel cores (plain functions on raw pointers, given a thread pool),
``simd.h`` the portable vector layer they are written in, ``ffi_bindings.cc`` the XLA FFI
handlers that check the buffers and call them.  On first use they are compiled with the
machine's C++ compiler (``$CXX`` or ``g++``/``c++``/``clang++``, ``-O3 -march=native`` by
default) into prunejax's cache directory (``prunejax._util.cache_dir``: ``$PRUNEJAX_CACHE_DIR``,
else ``$XDG_CACHE_HOME/prunejax``, else ``~/.cache/prunejax``), keyed by a hash of the sources,
the compiler, the flags (so the ISA path), the CPU (for ``native``) and the JAX and jaxlib
versions (the FFI headers come with them), and
registered as XLA FFI targets, so the kernels run inside ``jax.jit`` like any other op.  When no
compiler is present, the build fails, or ``PRUNEJAX_DISABLE_FFI=1`` is set, :func:`available`
returns ``False`` and :mod:`prunejax.sparse` uses its pure-JAX paths instead.

ISA paths.  One source serves every CPU: the kernels are written once on a vector type whose
width the compiler picks from the target (GCC/Clang vector extensions, ``csrc/simd.h``): 16
floats in a zmm register on AVX-512, 8 in a ymm on AVX2+FMA, 4 in an xmm (SSE2) or an aarch64
NEON q register, 1 on the scalar path; register blocks are sized to the register file (32 zmm,
16 ymm, 32 q).  The kernels need only element-wise multiply-adds on full vectors, which the
vector extensions lower to the native FMA of each ISA; Google Highway (``libhwy-dev``) would add a
build dependency on every user's machine for no instruction these kernels lack, so it was not
used.  ``$PRUNEJAX_ISA`` forces a path: ``native`` (default, ``-march=native``), ``scalar``
(``-march=x86-64 -DPRUNEJAX_NO_SIMD``), ``sse2`` (``-march=x86-64``), ``avx2``
(``-march=x86-64-v3``), ``avx512`` (``-march=x86-64-v4``); on aarch64 ``scalar`` and ``neon``
(``-march=armv8-a``).  A path the CPU cannot execute is refused with a ``ValueError``
(:func:`requested_isa`); :func:`isa` says which path the loaded library runs.

Kernels (fp32, ``y = x @ W`` with ``x`` of shape ``(batch, in)``):

* ``csr``: ``W`` stored as CSR of ``W.T`` (one row per output unit, uint16 or int32 column
  indices).  Batch < 8: one gather-dot per output and batch row (8 independent sums); bound by
  load issue (~1.5 cycles per nonzero) and by streaming the ~6 bytes per nonzero.  Batch >= 8:
  ``x`` is transposed into 64-byte aligned tiles of 16 (batch < 32) or 32 batch rows, so every
  loaded nonzero is multiplied into a whole tile row held in vector registers (1-2 zmm, 2-4
  ymm, 4-8 q), several nonzeros in flight; bound by the L2 -> core bandwidth of those random
  tile rows, with W streamed once per tile from cache-sized chunks of rows.
* ``dense_rows``: a dense ``W`` stored transposed, ``(out, in)``, for batch 1: one contiguous
  dot product per output (each loaded ``W`` vector serves up to 4 batch rows), so ``W`` streams
  once front to back; bound by those 4 bytes per weight.  XLA's own batch-1 ``x @ W`` on an
  ``(in, out)`` kernel reaches ~25-35 GB/s here; this form is 1.1-1.3x faster on 4096-wide
  layers and ~3x on LeNet-sized ones (see ``benchmarks/results/RESULTS.md``).
* ``block``: ``W`` stored as dense ``(bh, bw)`` blocks grouped by block column; each thread owns
  whole block columns of ``y`` (no scatter).  For ``bw`` of 16/32 a block row sits in vector
  registers and a register block of batch rows is accumulated at once (8 rows of one zmm on
  AVX-512, 6 rows of two ymm on AVX2 -- BLIS's 6x16 Haswell block --, 6 rows of four q on NEON;
  bound by streaming the block bytes at batch 1).  From two register blocks of rows on, ``x``
  is first re-laid out block row by block row so the rows one block multiplies are contiguous;
  once that copy outgrows L2 (1 MiB), each block multiplies the whole batch in turn, reading
  its block row of ``x`` front to back, so the reads are prefetched instead of latency-bound.

Work is split over XLA's own intra-op thread pool (FFI ``ThreadPool`` context), in dynamically
assigned chunks, so the kernels use the cores XLA's dense matmul uses and never oversubscribe;
below ~131k multiply-adds a call runs on the calling thread alone.  The FFI calls themselves
define no derivatives and run once per batch element under ``jax.vmap``
(``vmap_method="sequential"``); ``prunejax.sparse.DenseTKernel`` wraps ``dense_rows_matmul`` in a
custom JVP and a custom vmap rule (both XLA's dot).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from importlib import resources
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from prunejax._util import cache_dir

__all__ = [
    "BASE_FLAGS",
    "CSR_TILED_FROM",
    "ISA_FLAGS",
    "SOURCES",
    "available",
    "block_matmul",
    "build_error",
    "csr_matmul",
    "dense_rows_matmul",
    "cpu_flags",
    "find_compiler",
    "isa",
    "isa_flags",
    "machine_arch",
    "read_sources",
    "requested_isa",
    "supported_isas",
]

# The C++ sources in prunejax/sparse/csrc (package data); the .cc files are compiled.
SOURCES = ("kernels.h", "simd.h", "kernels.cc", "ffi_bindings.cc")
# Flags of every build; the target flags come from ISA_FLAGS.
BASE_FLAGS = ("-O3", "-std=c++17", "-ffp-contract=fast")
_LIB_FLAGS = ("-fPIC", "-shared", "-w")
# PRUNEJAX_ISA value -> the target flags it compiles with, per machine architecture.
ISA_FLAGS: dict[str, dict[str, tuple[str, ...]]] = {
    "x86_64": {
        "native": ("-march=native",),
        "scalar": ("-march=x86-64", "-DPRUNEJAX_NO_SIMD"),
        "sse2": ("-march=x86-64",),
        "avx2": ("-march=x86-64-v3",),
        "avx512": ("-march=x86-64-v4",),
    },
    "aarch64": {
        "native": ("-march=native",),
        "scalar": ("-march=armv8-a", "-DPRUNEJAX_NO_SIMD"),
        "neon": ("-march=armv8-a",),
    },
}
# The /proc/cpuinfo flags each forced x86-64 path needs (the x86-64-v3 / -v4 levels).
_X86_NEEDS = {
    "avx2": ("avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "movbe", "xsave"),
    "avx512": ("avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"),
}
_CSR_TARGET = "prunejax_csr_matmul_f32"
_BLOCK_TARGET = "prunejax_block_matmul_f32"
_ROWS_TARGET = "prunejax_dense_rows_matmul_f32"
# (FFI target, symbol of its handler in the shared library)
_TARGETS = (
    (_CSR_TARGET, "PrunejaxCsrMatmul"),
    (_BLOCK_TARGET, "PrunejaxBlockMatmul"),
    (_ROWS_TARGET, "PrunejaxDenseRowsMatmul"),
)
# Batches from this size on use the tiled CSR kernel (x transposed into 16-row tiles).
CSR_TILED_FROM = 8

_lock = threading.Lock()
_state: dict[str, Any] = {"loaded": None, "error": None}


def jaxlib_version() -> str:
    """The installed jaxlib's version (the FFI headers and XLA's dense dot come from it).

    Returns:
      The version string, or ``"unknown"``.
    """
    try:
        import jaxlib

        return str(jaxlib.__version__)
    except (ImportError, AttributeError):
        return "unknown"


def find_compiler() -> str | None:
    """The C++ compiler to build the kernels with: ``$CXX``, else ``g++``, ``c++``, ``clang++``.

    Returns:
      Its full path, or ``None`` when none is on ``PATH``.
    """
    for cand in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if cand and shutil.which(cand):
            return shutil.which(cand)
    return None


def read_sources() -> dict[str, str]:
    """The kernels' C++ sources, read from the package data (``prunejax/sparse/csrc``).

    Returns:
      ``{file name: text}`` for every name in ``SOURCES``, in that order.
    """
    csrc = resources.files(__package__).joinpath("csrc")
    return {name: csrc.joinpath(name).read_text(encoding="utf-8") for name in SOURCES}


def machine_arch() -> str:
    """This machine's architecture as ``ISA_FLAGS`` names it (``x86_64``, ``aarch64``, ...)."""
    m = platform.machine().lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(m, m)


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (``/proc/cpuinfo``, x86 ``flags`` or ARM ``Features``).

    Returns:
      The flags, empty where the OS does not list them.
    """
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key = line.split(":", 1)[0].strip().lower()
                if key in ("flags", "features"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def supported_isas() -> dict[str, str | None]:
    """Every ISA path of this architecture, with why this CPU cannot run it.

    Returns:
      ``{name: None}`` for a path the CPU executes, ``{name: reason}`` for one it lacks, over the
      names of ``ISA_FLAGS[machine_arch()]`` (empty on an architecture without an entry).
    """
    names = ISA_FLAGS.get(machine_arch(), {})
    flags = cpu_flags()
    out: dict[str, str | None] = {}
    for name in names:
        missing = [f for f in _X86_NEEDS.get(name, ()) if f not in flags]
        out[name] = f"CPU lacks {', '.join(missing)}" if missing else None
    return out


def requested_isa() -> str:
    """The ISA path to build: ``$PRUNEJAX_ISA`` (default ``native``), checked.

    Returns:
      A name of ``ISA_FLAGS[machine_arch()]``.

    Raises:
      ValueError: ``PRUNEJAX_ISA`` names no path of this architecture, or one this CPU cannot
        execute (running it would kill the process with an illegal instruction).
    """
    name = os.environ.get("PRUNEJAX_ISA", "").strip().lower() or "native"
    paths = supported_isas()
    if name not in paths and name != "native":
        raise ValueError(
            f"PRUNEJAX_ISA={name!r} is not an ISA path of {machine_arch()}: "
            f"choose one of {sorted(paths) or ['native']}"
        )
    if paths.get(name):
        raise ValueError(f"PRUNEJAX_ISA={name!r} cannot run here: {paths[name]}")
    return name


def isa_flags(name: str) -> tuple[str, ...]:
    """The compiler flags of an ISA path: ``BASE_FLAGS`` plus its target flags.

    Args:
      name: ``native`` or a name of ``ISA_FLAGS[machine_arch()]``.

    Returns:
      The flags, the ones the kernels library and the C++ test driver are built with.
    """
    target = ISA_FLAGS.get(machine_arch(), {}).get(name)
    if target is None:
        if name != "native":
            raise ValueError(f"no ISA path {name!r} on {machine_arch()}")
        target = ("-march=native",)
    return (*BASE_FLAGS, *target)


def _build() -> Path:
    """Compile the kernels (once per source/flags/headers/CPU) and return the library path."""
    cxx = find_compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler found (set $CXX)")
    name = requested_isa()
    flags = (*isa_flags(name), *_LIB_FLAGS)
    sources = read_sources()
    include = jax.ffi.include_dir()
    parts = [f"{n}\0{text}" for n, text in sources.items()]
    # -march=native builds differ per CPU: key them by its model and flags too.
    cpu = " ".join(sorted(cpu_flags())) + platform.processor() if name == "native" else ""
    key = hashlib.sha256(
        "\0".join(
            [*parts, cxx, *flags, include, jax.__version__, jaxlib_version(), sys.platform, cpu]
        ).encode()
    ).hexdigest()[:16]
    out = cache_dir(create=True) / f"prunejax_kernels_{name}_{key}.so"
    if out.exists():
        return out
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        for n, text in sources.items():
            Path(tmp, n).write_text(text, encoding="utf-8")
        lib = os.path.join(tmp, "kernels.so")
        units = [os.path.join(tmp, n) for n in sources if n.endswith(".cc")]
        cmd = [cxx, *flags, f"-I{include}", *units, "-o", lib]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            raise RuntimeError(f"compiling the prunejax kernels failed:\n{proc.stderr[-2000:]}")
        os.replace(lib, out)  # atomic: concurrent builders never see a partial file
    return out


def _load() -> None:
    """Build the library, load it and register its handlers as XLA FFI targets (CPU)."""
    lib = ctypes.cdll.LoadLibrary(str(_build()))
    lib.prunejax_isa.restype = ctypes.c_char_p
    _state["isa"] = lib.prunejax_isa().decode()
    for target, symbol in _TARGETS:
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
    _state["lib"] = lib


def available() -> bool:
    """True when the compiled CPU kernels are usable (built and registered on first call).

    Returns:
      ``False`` when ``PRUNEJAX_DISABLE_FFI`` is set (to anything but ``0``), or when building or
      registering failed (see :func:`build_error`).
    """
    if os.environ.get("PRUNEJAX_DISABLE_FFI", "") not in ("", "0"):
        return False
    if _state["loaded"] is not None:
        return _state["loaded"]
    requested_isa()  # a bad PRUNEJAX_ISA is the caller's error, not a missing compiler
    with _lock:
        if _state["loaded"] is None:
            try:
                _load()
                _state["loaded"] = True
            except Exception as e:  # no compiler, failed build, missing FFI support
                _state["error"] = f"{type(e).__name__}: {e}"
                _state["loaded"] = False
    return _state["loaded"]


def isa() -> str | None:
    """The vector path the loaded kernels run, as compiled (see ``csrc/simd.h``).

    Returns:
      ``"avx512"``, ``"avx2"``, ``"avx"``, ``"sse2"``, ``"neon"`` or ``"scalar"``; ``None`` when
      the compiled kernels are unavailable (:func:`available` is false).
    """
    return _state.get("isa") if available() else None


def build_error() -> str | None:
    """Why the compiled kernels are unavailable.

    Returns:
      The error of the failed build or registration, or ``None`` if they are available or were
      not tried yet.
    """
    return _state["error"]


def csr_matmul(
    x: jax.Array, ptr: jax.Array, idx: jax.Array, val: jax.Array, n_out: int
) -> jax.Array:
    """``y[b, j] = sum_k val[k] * x[b, idx[k]]`` over ``ptr[j] <= k < ptr[j+1]`` (fp32, 2-D x).

    Args:
      x: ``(batch, in)`` float32.
      ptr: ``(n_out + 1,)`` int32 row pointers of the CSR of ``W.T``.
      idx: ``(nnz,)`` uint16 or int32 input index of each nonzero.
      val: ``(nnz,)`` float32 nonzeros.
      n_out: output units.

    Returns:
      ``(batch, n_out)`` float32.
    """
    return jax.ffi.ffi_call(
        _CSR_TARGET,
        jax.ShapeDtypeStruct((x.shape[0], n_out), jnp.float32),
        vmap_method="sequential",
    )(x, ptr, idx, val, tiled_from=np.int64(CSR_TILED_FROM))


def block_matmul(
    x: jax.Array, colptr: jax.Array, rowb: jax.Array, blocks: jax.Array, n_out: int
) -> jax.Array:
    """``x @ W`` for ``W`` given as blocks grouped by block column (fp32, 2-D x).

    Args:
      x: ``(batch, in)`` float32.
      colptr: ``(n_out / bw + 1,)`` int32: ``colptr[j]:colptr[j+1]`` are block column ``j``'s.
      rowb: ``(nb,)`` int32 block row of each block.
      blocks: ``(nb, bh, bw)`` float32 blocks.
      n_out: output units (a multiple of ``bw``).

    Returns:
      ``(batch, n_out)`` float32.
    """
    return jax.ffi.ffi_call(
        _BLOCK_TARGET,
        jax.ShapeDtypeStruct((x.shape[0], n_out), jnp.float32),
        vmap_method="sequential",
    )(x, colptr, rowb, blocks)


def dense_rows_matmul(x: jax.Array, wt: jax.Array) -> jax.Array:
    """``x @ wt.T`` for a dense ``wt`` of shape ``(out, in)``: one dot product per output.

    Args:
      x: ``(batch, in)`` float32.
      wt: ``(out, in)`` float32, the kernel transposed.

    Returns:
      ``(batch, out)`` float32.
    """
    return jax.ffi.ffi_call(
        _ROWS_TARGET,
        jax.ShapeDtypeStruct((x.shape[0], wt.shape[0]), jnp.float32),
        vmap_method="sequential",
    )(x, wt)
