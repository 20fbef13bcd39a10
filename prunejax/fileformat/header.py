"""The JSON header of a file: built from the planned leaves, and read back as a member list."""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from prunejax._version import __version__
from prunejax.fileformat.compaction import kept_members
from prunejax.fileformat.container import FORMAT_VERSION, MAGIC
from prunejax.fileformat.dtypes import DTYPES, dtype_name
from prunejax.fileformat.encodings import ENCODINGS, leaf_members

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
) -> dict:
    """The header of a file, without its checksum (keys in file order).

    Args:
      format: the requested format (``"smallest"`` already resolved to ``"auto"``).
      structure: the pytree structure (``prunejax.fileformat.structure``).
      paths, arrays, encodings, jax_flags, nnzs: per leaf, its path, the (possibly compacted)
        NumPy array, its encoding, whether it was a JAX array and its nonzero count.
      compaction: the compaction record or ``None``.

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
            }
            for p, a, e, j, n in zip(paths, arrays, encodings, jax_flags, nnzs, strict=True)
        ],
        "compaction": compaction,
    }


def header_members(header: Mapping) -> list[tuple[str, tuple[int, ...], np.dtype]]:
    """``(member name, shape, dtype)`` of every array member a header calls for, in file order.

    Args:
      header: a file's JSON header.

    Returns:
      The leaves' members, then the compaction's ``kept`` members.

    Raises:
      ValueError, KeyError, TypeError: a malformed header (bad shape, dtype, encoding or nnz).
    """
    out = []
    for i, leaf in enumerate(header["leaves"]):
        shape = tuple(int(s) for s in leaf["shape"])
        if any(s < 0 for s in shape) or leaf["dtype"] not in DTYPES:
            raise ValueError(f"bad shape or dtype for leaf {i}")
        if leaf["encoding"] not in ENCODINGS:
            raise ValueError(f"unknown encoding {leaf['encoding']!r} for leaf {i}")
        nnz = int(leaf["nnz"])
        if not 0 <= nnz <= math.prod(shape):
            raise ValueError(f"bad nnz for leaf {i}")
        out += leaf_members(i, leaf["encoding"], shape, DTYPES[leaf["dtype"]], nnz)
    return out + kept_members(header)
