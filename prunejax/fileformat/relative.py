"""The ``relative`` encoding of a plain (unquantized) sparse leaf: Huffman-coded relative
indices plus the nonzero values as they are.

Deep Compression's index coding (Han, Mao & Dally 2016, section 4; see
``prunejax.fileformat.entropy``) without weight sharing: the leaf's nonzero positions in C order
become relative-index symbols of ``index_bits`` bits (with the escape for longer gaps), canonically
Huffman-coded.  Members: ``indices`` (``uint8``: the nibble code-length table of the
``2**index_bits`` symbols, then the bit stream, zero-padded to a byte) and ``data`` (the nonzero
values in C order, in the leaf's storage dtype, so any safetensors reader still sees them).  The
leaf's header entry adds ``index_bits`` and ``blob`` (the bytes of ``indices``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import numpy as np

from prunejax.fileformat import entropy
from prunejax.fileformat.errors import FileFormatError

__all__ = ["plan_relative", "encode_relative", "decode_relative", "check_relative_entry"]

#: The widest relative index tried.
MAX_INDEX_BITS = 12


def plan_relative(arr: np.ndarray) -> tuple[int, int]:
    """The best ``index_bits`` for a leaf and the bytes of its ``indices`` member.

    Args:
      arr: the dense leaf.

    Returns:
      ``(index_bits, indices bytes)``, the smallest over ``index_bits`` 1..12.
    """
    pos = np.flatnonzero(np.asarray(arr).reshape(-1) != 0)
    best = None
    for ib in range(1, MAX_INDEX_BITS + 1):
        counts, _ = entropy.relative_count(pos, ib)
        bits = int((counts * entropy.code_lengths(counts)).sum())
        size = (2**ib + 1) // 2 + entropy.bits_to_bytes(bits)
        if best is None or size < best[1]:
            best = (ib, size)
    return best


def encode_relative(arr: np.ndarray, index_bits: int) -> np.ndarray:
    """The ``indices`` member of a leaf (``uint8``).

    Args:
      arr: the dense leaf.
      index_bits: the relative-index width.

    Returns:
      The code-length table and the Huffman bit stream.
    """
    pos = np.flatnonzero(np.asarray(arr).reshape(-1) != 0)
    syms = entropy.relative_symbols(pos, index_bits)
    lengths = entropy.code_lengths(np.bincount(syms, minlength=2**index_bits))
    return np.concatenate(
        [entropy.pack_lengths(lengths), np.packbits(entropy.encode(syms, lengths))]
    ).astype(np.uint8)


def check_relative_entry(leaf: Mapping) -> int:
    """Validate a ``relative`` leaf's header fields; return its ``indices`` bytes.

    Raises:
      ValueError: a bad ``index_bits`` or ``blob``.
    """
    ib, blob = leaf.get("index_bits"), leaf.get("blob")
    for name, v, hi in (("index_bits", ib, MAX_INDEX_BITS), ("blob", blob, None)):
        if (
            not isinstance(v, int)
            or isinstance(v, bool)
            or v < (1 if name == "index_bits" else 0)
            or (hi is not None and v > hi)
        ):
            raise ValueError(f"leaf {leaf.get('path')!r} has a bad {name} {v!r}")
    return blob


def decode_relative(
    out: np.ndarray,
    arrays: Mapping[str, np.ndarray],
    values: Callable[[np.ndarray], np.ndarray],
    shape: tuple[int, ...],
    leaf: Mapping,
    where: str,
) -> np.ndarray:
    """Rebuild a ``relative`` leaf (bounded decoding; every failure a ``FileFormatError``).

    Args:
      out: zeros of the leaf's size and dtype (flat).
      arrays: the ``indices`` and ``data`` members.
      values: member -> values in the leaf's dtype.
      shape: the leaf's shape.
      leaf: its header entry (``nnz``, ``index_bits``).
      where: the leaf, for messages.

    Returns:
      The dense leaf.
    """
    ib, nnz = leaf["index_bits"], leaf["nnz"]
    blob = np.asarray(arrays["indices"], np.uint8)
    nt = (2**ib + 1) // 2
    try:
        if blob.size < nt:
            raise FileFormatError("its index table is truncated")
        lengths = entropy.unpack_lengths(blob[:nt], 2**ib)
        rd = entropy.BitReader.packed(blob[nt:])
        size = math.prod(shape)
        syms, end = entropy.decode(rd, 0, lengths, count=nnz, stop=2**ib - 1, size=size)
        if entropy.bits_to_bytes(end) != rd.n // 8 or not rd.zero_from(end):
            raise FileFormatError("its index stream has trailing data")
        kept = entropy.relative_mask(syms, ib, size=size)
    except FileFormatError as e:
        raise FileFormatError(f"corrupted file: {where}: {e}") from None
    vals = values(arrays["data"])
    if np.any(vals == 0):
        raise FileFormatError(f"corrupted file: {where} stores zeros as nonzero values")
    out[kept] = vals
    return out.reshape(shape)
