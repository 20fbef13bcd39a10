"""Per-leaf encodings: how one array becomes the member arrays of a file, and back.

``ENCODINGS`` lists them; ``ROLES`` names each one's member arrays, in file order (a leaf's
members are ``"<leaf index>.<role>"``).  ``leaf_members`` predicts the members' names, shapes and
dtypes from a leaf's shape, dtype and nonzero count alone (the size model and the reader's
checks rely on it), ``encode`` builds them and ``decode`` rebuilds the dense leaf, checking every
index array's bounds.  The layouts are specified in ``prunejax.fileformat``'s docstring.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from prunejax.fileformat.dtypes import (
    DTYPES,
    from_storage,
    index_dtype,
    storage_dtype,
    storage_shape,
    to_storage,
)
from prunejax.fileformat.errors import FileFormatError
from prunejax.fileformat.quantized import QUANT_ENCODINGS, decode_leaf, encode_leaf
from prunejax.fileformat.relative import decode_relative, encode_relative
from prunejax.quantize import dequantize_leaf

__all__ = [
    "ENCODINGS",
    "ALL_ENCODINGS",
    "ROLES",
    "csr_dims",
    "leaf_members",
    "encode",
    "decode",
]

#: The per-leaf encodings of plain arrays.
ENCODINGS = ("dense", "bitmask", "csr", "bcoo")
#: Every per-leaf encoding: also ``relative`` (``prunejax.fileformat.relative``, whose size
#: depends on the positions, not only on their count) and those of quantized leaves
#: (``prunejax.fileformat.quantized``).
ALL_ENCODINGS = ENCODINGS + ("relative",) + QUANT_ENCODINGS
#: The member arrays of each encoding, in file order.
ROLES = {
    "dense": ("data",),
    "bitmask": ("mask", "values"),
    "csr": ("indptr", "indices", "data"),
    "bcoo": ("indices", "data"),
    "relative": ("indices", "data"),
    **{e: ("blob",) for e in QUANT_ENCODINGS},
}


def csr_dims(shape: tuple[int, ...]) -> tuple[int, int]:
    """The matrix a leaf is viewed as in CSR: ``(shape[0], prod(shape[1:]))``, 1-D as one row.

    Args:
      shape: the leaf's shape.

    Returns:
      ``(rows, cols)``.
    """
    if len(shape) >= 2:
        return shape[0], math.prod(shape[1:])
    return 1, math.prod(shape)


def leaf_members(
    index: int | str,
    encoding: str,
    shape: tuple[int, ...],
    dtype: np.dtype,
    nnz: int,
    *,
    version: int = 2,
    blob: int | None = None,
) -> list[tuple[str, tuple[int, ...], np.dtype]]:
    """``(member name, shape, storage dtype)`` of every array encoding one leaf.

    Args:
      index: the leaf's position in the tree (the members' name prefix).
      encoding: one of ``ENCODINGS``.
      shape, dtype, nnz: the leaf's shape, dtype and number of nonzero (kept) entries.
      version: the file format version (it decides how complex payloads are stored).
      blob: the bytes of a quantized leaf's blob, or of a ``relative`` leaf's ``indices``
        (required by those encodings).

    Returns:
      One triple per role of ``ROLES[encoding]``, in order.

    Raises:
      ValueError: unknown encoding.
    """
    if encoding in QUANT_ENCODINGS:
        if blob is None:
            raise ValueError(f"encoding {encoding!r} needs the blob size")
        return [(f"{index}.blob", (int(blob),), np.dtype(np.uint8))]
    sd = storage_dtype(np.dtype(dtype), version)
    size = math.prod(shape)

    def payload(n: int) -> tuple[int, ...]:
        return storage_shape((n,), dtype, version)

    if encoding == "dense":
        return [(f"{index}.data", storage_shape(tuple(shape), dtype, version), sd)]
    if encoding == "bitmask":
        return [
            (f"{index}.mask", ((size + 7) // 8,), np.dtype(np.uint8)),
            (f"{index}.values", payload(nnz), sd),
        ]
    if encoding == "csr":
        rows, cols = csr_dims(shape)
        return [
            (f"{index}.indptr", (rows + 1,), index_dtype(nnz)),
            (f"{index}.indices", (nnz,), index_dtype(max(cols - 1, 0))),
            (f"{index}.data", payload(nnz), sd),
        ]
    if encoding == "relative":
        if blob is None:
            raise ValueError("encoding 'relative' needs the size of its indices")
        return [
            (f"{index}.indices", (int(blob),), np.dtype(np.uint8)),
            (f"{index}.data", payload(nnz), sd),
        ]
    if encoding == "bcoo":
        return [
            (
                f"{index}.indices",
                (nnz, len(shape)),
                index_dtype(max(max(shape, default=1) - 1, 0)),
            ),
            (f"{index}.data", payload(nnz), sd),
        ]
    raise ValueError(f"unknown encoding {encoding!r}; expected one of {ALL_ENCODINGS}")


def encode(encoding: str, arr: Any, *, index_bits: int | None = None) -> list[np.ndarray]:
    """The member arrays of one leaf (format version 2).

    Args:
      encoding: one of ``ALL_ENCODINGS``.
      arr: the dense leaf (NumPy), or the planned ``QuantLeaf`` of a quantized encoding.
      index_bits: the relative-index width of a ``relative`` leaf.

    Returns:
      The arrays of ``ROLES[encoding]``, in order, in their storage dtypes and shapes.

    Raises:
      ValueError: unknown encoding.
    """
    if encoding in QUANT_ENCODINGS:
        return [encode_leaf(arr)]
    flat = np.asarray(arr, order="C").reshape(-1)
    nz = flat != 0
    nnz = int(nz.sum())
    values = to_storage(flat[nz])
    if encoding == "dense":
        return [to_storage(np.asarray(arr, order="C"))]
    if encoding == "bitmask":
        return [np.packbits(nz), values]
    if encoding == "csr":
        rows, cols = csr_dims(arr.shape)
        nzm = nz.reshape(rows, cols)
        counts = nzm.sum(axis=1)
        indptr = np.concatenate([[0], np.cumsum(counts)]).astype(index_dtype(nnz))
        col = np.nonzero(nzm)[1].astype(index_dtype(max(cols - 1, 0)))
        return [indptr, col, values]
    if encoding == "relative":
        return [encode_relative(arr, index_bits), values]
    if encoding == "bcoo":
        idx_dt = index_dtype(max(max(arr.shape, default=1) - 1, 0))
        coords = np.stack(np.unravel_index(np.flatnonzero(nz), arr.shape), axis=1)
        return [coords.astype(idx_dt).reshape(nnz, arr.ndim), values]
    raise ValueError(f"unknown encoding {encoding!r}")


def decode(
    leaf: Mapping,
    arrays: Mapping[str, np.ndarray],
    index: int,
    *,
    version: int = 2,
    quantized: bool = False,
) -> Any:
    """Rebuild one dense leaf from its member arrays, checking them against the header.

    Args:
      leaf: the leaf's header entry (``path``, ``encoding``, ``shape``, ``dtype``, ``nnz``).
      arrays: role -> member array, as read from the file (shapes and dtypes already checked).
      index: the leaf's position (for messages).
      version: the file's format version (how its payloads are stored).
      quantized: return a quantized leaf as its ``prunejax.quantize.Quantized`` (NumPy parts)
        instead of its dequantized values.

    Returns:
      The dense NumPy leaf, of the header's shape and dtype (or a ``Quantized`` leaf).

    Raises:
      FileFormatError: index arrays out of bounds, unsorted or repeated, a bitmask that does not
        hold ``nnz`` bits, zeros stored as nonzero values, or an unknown encoding.
    """
    shape = tuple(leaf["shape"])
    dtype = DTYPES[leaf["dtype"]]
    enc = leaf["encoding"]
    where = f"leaf {index} ({leaf['path']!r})"

    def values(a: np.ndarray) -> np.ndarray:
        return from_storage(a, dtype, version).reshape(-1)

    if enc == "dense":
        return values(arrays["data"]).reshape(shape).copy()
    if enc in QUANT_ENCODINGS:
        q = decode_leaf(leaf, arrays["blob"], where)
        return q if quantized else dequantize_leaf(q)
    decoder = _DECODERS.get(enc)
    if decoder is None and enc != "relative":
        raise FileFormatError(f"corrupted header: {where} has unknown encoding {enc!r}")
    out = np.zeros(math.prod(shape), dtype)
    if enc == "relative":
        return decode_relative(out, arrays, values, shape, leaf, where)
    return decoder(out, arrays, values, shape, leaf["nnz"], where)


def _decode_bitmask(
    out: np.ndarray,
    arrays: Mapping[str, np.ndarray],
    values: Callable[[np.ndarray], np.ndarray],
    shape: tuple[int, ...],
    nnz: int,
    where: str,
) -> np.ndarray:
    size = out.size
    bits = np.unpackbits(arrays["mask"], count=None)
    if bits[size:].any() or int(bits[:size].sum()) != nnz:
        raise FileFormatError(f"corrupted file: the bitmask of {where} does not hold {nnz} bits")
    out[bits[:size].astype(bool)] = values(arrays["values"])
    if np.any(out[bits[:size].astype(bool)] == 0):
        raise FileFormatError(f"corrupted file: {where} stores zeros as nonzero values")
    return out.reshape(shape)


def _decode_csr(
    out: np.ndarray,
    arrays: Mapping[str, np.ndarray],
    values: Callable[[np.ndarray], np.ndarray],
    shape: tuple[int, ...],
    nnz: int,
    where: str,
) -> np.ndarray:
    rows, cols = csr_dims(shape)
    indptr = arrays["indptr"].astype(np.int64)
    indices = arrays["indices"].astype(np.int64)
    if (
        indptr[0] != 0
        or indptr[-1] != nnz
        or np.any(np.diff(indptr) < 0)
        or np.any(indices >= cols)
    ):
        raise FileFormatError(f"corrupted file: the CSR index arrays of {where} are invalid")
    row = np.repeat(np.arange(rows), np.diff(indptr))
    out2 = out.reshape(rows, cols)
    if np.any(np.diff(row * max(cols, 1) + indices) <= 0):
        raise FileFormatError(f"corrupted file: {where} has unsorted or repeated CSR indices")
    out2[row, indices] = values(arrays["data"])
    return out2.reshape(shape)


def _decode_bcoo(
    out: np.ndarray,
    arrays: Mapping[str, np.ndarray],
    values: Callable[[np.ndarray], np.ndarray],
    shape: tuple[int, ...],
    nnz: int,
    where: str,
) -> np.ndarray:
    coords = arrays["indices"].astype(np.int64)
    if nnz and (np.any(coords >= np.asarray(shape, np.int64))):
        raise FileFormatError(f"corrupted file: the BCOO indices of {where} are out of bounds")
    flat_idx = np.ravel_multi_index(tuple(coords.T), shape) if nnz else np.zeros(0, np.int64)
    if np.any(np.diff(flat_idx) <= 0):
        raise FileFormatError(f"corrupted file: {where} has unsorted or repeated BCOO indices")
    out[flat_idx] = values(arrays["data"])
    return out.reshape(shape)


_DECODERS: dict[str, Callable[..., np.ndarray]] = {
    "bitmask": _decode_bitmask,
    "csr": _decode_csr,
    "bcoo": _decode_bcoo,
}
