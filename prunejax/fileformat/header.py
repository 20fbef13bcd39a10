"""The JSON header of a file: built from the planned leaves, and read back as a member list."""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from prunejax._version import __version__
from prunejax.fileformat.compaction import kept_members
from prunejax.fileformat.container import FORMAT_VERSION, LEGACY_VERSION, MAGIC
from prunejax.fileformat.dtypes import DTYPES, dtype_name
from prunejax.fileformat.encodings import ALL_ENCODINGS, ENCODINGS, leaf_members
from prunejax.fileformat.quantized import QUANT_ENCODINGS, check_entry
from prunejax.fileformat.relative import check_relative_entry

__all__ = ["make_header", "header_members"]


def make_header(
    *,
    format: str,
    structure: dict,
    paths: list[str],
    arrays: list[np.ndarray],
    encodings: list[str],
    jax_flags: list[bool],
    nnzs: list[int],
    compaction: dict | None,
    extras: list[dict] | None = None,
) -> dict:
    """The header of a file, without its checksum (keys in file order).

    Args:
      format: the requested format (``"smallest"`` already resolved to ``"auto"``).
      structure: the pytree structure (``prunejax.fileformat.structure``).
      paths, arrays, encodings, jax_flags, nnzs: per leaf, its path, the (possibly compacted)
        NumPy array, its encoding, whether it was a JAX array and its nonzero count.
      compaction: the compaction record or ``None``.
      extras: per leaf, further keys of its entry (a quantized leaf's ``codebook``, ``kind``,
        ``index_bits`` and ``blob``), or ``None``.

    Returns:
      The JSON header.
    """
    return {
        "magic": MAGIC,
        "format_version": FORMAT_VERSION,
        "library_version": __version__,
        "format": format,
        "structure": structure,
        "leaves": [
            {
                "path": p,
                "encoding": e,
                "shape": list(a.shape),
                "dtype": dtype_name(a.dtype),
                "array": "jax" if j else "numpy",
                "nnz": n,
                **x,
            }
            for p, a, e, j, n, x in zip(
                paths,
                arrays,
                encodings,
                jax_flags,
                nnzs,
                extras if extras is not None else [{}] * len(paths),
                strict=True,
            )
        ],
        "compaction": compaction,
    }


#: The largest dimension and number of dimensions a header may declare.
MAX_DIM = 2**48
MAX_NDIM = 64


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def check_leaf_entry(i: int, leaf: object, *, version: int = FORMAT_VERSION) -> tuple[int, ...]:
    """Validate one leaf entry of a header (types and ranges only).

    Args:
      i: the leaf's index.
      leaf: its header entry.
      version: the file's format version (version 1 knows only the plain ``ENCODINGS``).

    Returns:
      The leaf's shape.

    Raises:
      ValueError: a malformed entry (the message names the leaf).
    """
    if not isinstance(leaf, dict):
        raise ValueError(f"leaf {i} is not a JSON object")
    name = f"leaf {i} ({leaf.get('path')!r})"
    if not isinstance(leaf.get("path"), str):
        raise ValueError(f"leaf {i} has no path")
    shape = leaf.get("shape")
    if (
        not isinstance(shape, list)
        or len(shape) > MAX_NDIM
        or not all(_is_int(s) and 0 <= s <= MAX_DIM for s in shape)
    ):
        raise ValueError(f"{name} has a bad shape {shape!r}")
    for key in ("dtype", "encoding", "array"):
        if not isinstance(leaf.get(key), str):
            raise ValueError(f"{name} has a bad {key} {leaf.get(key)!r}")
    if leaf.get("dtype") not in DTYPES:
        raise ValueError(f"{name} has an unknown dtype {leaf.get('dtype')!r}")
    known = ENCODINGS if version == LEGACY_VERSION else ALL_ENCODINGS
    if leaf.get("encoding") not in known:
        raise ValueError(
            f"{name} has an unknown encoding {leaf.get('encoding')!r} for format version {version}"
        )
    if leaf.get("array") not in ("numpy", "jax"):
        raise ValueError(f"{name} has a bad array kind {leaf.get('array')!r}")
    nnz = leaf.get("nnz")
    if not _is_int(nnz) or not 0 <= nnz <= math.prod(shape):
        raise ValueError(f"{name} has a bad nnz {nnz!r}")
    if leaf["encoding"] in QUANT_ENCODINGS:
        if DTYPES[leaf["dtype"]].kind != "f" and leaf["dtype"] != "bfloat16":
            raise ValueError(f"{name} is quantized but of dtype {leaf['dtype']}")
        check_entry(leaf)
    if leaf["encoding"] == "relative":
        check_relative_entry(leaf)
    return tuple(shape)


def header_members(
    header: Mapping, *, version: int = FORMAT_VERSION
) -> list[tuple[str, tuple[int, ...], np.dtype]]:
    """``(member name, shape, dtype)`` of every array member a header calls for, in file order.

    Args:
      header: a file's JSON header.
      version: its format version (how payloads are stored).

    Returns:
      The leaves' members, then the compaction's ``kept`` members.

    Raises:
      ValueError: a malformed header (bad shape, dtype, encoding, nnz or compaction record).
    """
    leaves = header.get("leaves")
    if not isinstance(leaves, list):
        raise ValueError("the header has no leaf list")
    out = []
    for i, leaf in enumerate(leaves):
        shape = check_leaf_entry(i, leaf, version=version)
        out += leaf_members(
            i,
            leaf["encoding"],
            shape,
            DTYPES[leaf["dtype"]],
            leaf["nnz"],
            version=version,
            blob=leaf.get("blob"),
        )
    return out + kept_members(header)
