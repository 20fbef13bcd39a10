"""Canonical Huffman coding and relative (delta) indices, in NumPy, with bounded decoding.

Deep Compression (Han, Mao & Dally, ICLR 2016, section 4) stores the positions of a pruned
layer's weights as *relative indices* (the gap to the previous kept weight, in a few bits, with a
padding entry when a gap is longer than the width allows) and Huffman-codes both the weight codes
and the index gaps.  This module provides both pieces for ``prunejax.fileformat.quantized``.

Relative indices (``relative_symbols``/``relative_positions``): kept positions in C order become
symbols of ``index_bits`` bits: ``s < M`` (``M = 2**index_bits - 1``) means "skip ``s`` pruned
entries, then one kept entry"; ``s = M`` is the escape, "skip ``M`` entries, no kept entry" (the
paper's padding zero, as an index symbol instead of a value, so that the codebook only holds
kept values).  A gap ``g`` costs ``g // M`` escapes and one symbol ``g % M``.

Huffman codes (``code_lengths``, ``encode``, ``decode``): canonical (codes assigned in order of
length, then symbol), at most ``MAX_CODE_LENGTH`` = 15 bits, so a code table is one nibble per
symbol of the alphabet (``pack_lengths``).  Lengths are limited by halving the counts (keeping
used symbols at least 1) until the longest code fits, which terminates for alphabets up to
``2**15``.  A stream of one used symbol takes 1 bit per symbol; an empty stream takes nothing.
Bits are written most significant first, streams back to back.

Why hand-written Huffman rather than a library range/ANS coder (``constriction`` on PyPI): the
file size must be predictable to the byte from symbol counts alone (``size_report``), decoding
must be bounded against hostile input with every failure a ``FileFormatError``, and the model
must be tiny: a canonical table is one nibble per symbol (16 bytes for 32 codes), where an ANS
coder must ship quantized frequencies (about 2 bytes per symbol).  Measured on LeNet-300-100
(NumPy, k-means codes, ``index_bits`` chosen per layer): with random normal weights pruned to
8.3% (5/5/6-bit codes) the Huffman streams exceed their order-0 entropy by 0.61% (indices) and
0.96% (codes), 184 bytes in all, plus 88 bytes of tables; with MNIST-trained weights at 5%
density (4-bit codes) by 1.62% and 1.18%, 200 bytes, plus 45 bytes of tables, on a file of about
18 KB.  A coder reaching the entropy exactly would save at most about 1% of the file, and less
after paying for its frequency tables.
"""

from __future__ import annotations

import array
import heapq

import numpy as np

from prunejax.fileformat.errors import FileFormatError

__all__ = [
    "MAX_ALPHABET",
    "MAX_CODE_LENGTH",
    "code_lengths",
    "canonical_codes",
    "encode",
    "decode",
    "pack_lengths",
    "unpack_lengths",
    "relative_symbols",
    "relative_positions",
    "relative_mask",
    "relative_count",
    "bits_to_bytes",
    "BitReader",
]

#: The longest Huffman code (a code-length table stores one nibble per symbol).
MAX_CODE_LENGTH = 15
#: The largest alphabet this module Huffman-codes.
MAX_ALPHABET = 2**12


def _huffman(counts: np.ndarray) -> np.ndarray:
    """Unlimited Huffman code lengths of the used symbols (deterministic tie-breaking)."""
    used = np.flatnonzero(counts)
    lengths = np.zeros(counts.size, np.int64)
    if used.size == 1:
        lengths[used] = 1
        return lengths
    heap = [(int(counts[s]), int(s), [int(s)]) for s in used]
    heapq.heapify(heap)
    while len(heap) > 1:
        c1, t1, s1 = heapq.heappop(heap)
        c2, t2, s2 = heapq.heappop(heap)
        lengths[s1] += 1
        lengths[s2] += 1
        heapq.heappush(heap, (c1 + c2, min(t1, t2), s1 + s2))
    return lengths


def code_lengths(counts: np.ndarray, max_length: int = MAX_CODE_LENGTH) -> np.ndarray:
    """Length-limited Huffman code lengths for symbol ``counts`` (0 for unused symbols).

    Args:
      counts: occurrences of each symbol of the alphabet (non-negative integers).
      max_length: the longest allowed code.

    Returns:
      ``uint8`` lengths, one per symbol.

    Raises:
      ValueError: an alphabet larger than ``2**max_length`` symbols.
    """
    counts = np.asarray(counts, np.int64)
    if counts.size > 2**max_length:
        raise ValueError(f"alphabet of {counts.size} symbols exceeds 2**{max_length}")
    work = counts.copy()
    while True:
        lengths = _huffman(work)
        if lengths.max(initial=0) <= max_length:
            return lengths.astype(np.uint8)
        work = np.where(work > 0, np.maximum(work >> 1, 1), 0)


def canonical_codes(lengths: np.ndarray) -> np.ndarray:
    """The canonical code of every symbol (by length, then symbol order; 0 for unused ones).

    Args:
      lengths: code lengths (0 = unused).

    Returns:
      ``int64`` codes, the value of each symbol's ``lengths[s]`` bits.
    """
    lengths = np.asarray(lengths, np.int64)
    codes = np.zeros(lengths.size, np.int64)
    order = np.lexsort((np.arange(lengths.size), lengths))
    code, prev = 0, 0
    for s in order:
        n = int(lengths[s])
        if n == 0:
            continue
        code <<= n - prev
        codes[s] = code
        code += 1
        prev = n
    return codes


def encode(symbols: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """The Huffman bits of ``symbols`` (one ``uint8`` 0/1 per bit, most significant first).

    Args:
      symbols: the stream (integers indexing ``lengths``; every used symbol has a length).
      lengths: the code lengths (``code_lengths``).

    Returns:
      The bits, ``sum(lengths[symbols])`` of them.
    """
    symbols = np.asarray(symbols, np.int64).reshape(-1)
    lens = np.asarray(lengths, np.int64)[symbols]
    codes = canonical_codes(lengths)[symbols]
    width = int(lens.max(initial=0))
    if width == 0:
        return np.zeros(0, np.uint8)
    shift = lens[:, None] - 1 - np.arange(width)[None, :]
    bits = (codes[:, None] >> np.maximum(shift, 0)) & 1
    return bits[shift >= 0].astype(np.uint8)


def pack_lengths(lengths: np.ndarray) -> np.ndarray:
    """A code-length table as nibbles (two symbols a byte, the first in the high nibble)."""
    lengths = np.asarray(lengths, np.uint8)
    padded = np.concatenate([lengths, np.zeros(lengths.size % 2, np.uint8)])
    return (padded[0::2] << 4 | padded[1::2]).astype(np.uint8)


def unpack_lengths(table: np.ndarray, n: int) -> np.ndarray:
    """The inverse of ``pack_lengths`` for an alphabet of ``n`` symbols."""
    table = np.asarray(table, np.uint8)
    out = np.stack([table >> 4, table & 15], axis=1).reshape(-1)
    if out[n:].any():
        raise FileFormatError("corrupted file: a Huffman table has lengths past its alphabet")
    return out[:n]


class BitReader:
    """A bit stream read through ``window``-bit lookups, in chunks.

    The stream is held packed (eight bits a byte, most significant first) and unpacked one
    chunk at a time, so reading a prefix of a long stream costs the prefix, not the stream.
    """

    CHUNK = 2**16

    def __init__(self, bits: np.ndarray, window: int = MAX_CODE_LENGTH) -> None:
        """A reader of ``bits`` (``uint8`` 0/1, one per bit)."""
        bits = np.asarray(bits, np.uint8).reshape(-1)
        self._init(np.packbits(bits), int(bits.size), window)

    @classmethod
    def packed(cls, data: np.ndarray, window: int = MAX_CODE_LENGTH) -> BitReader:
        """A reader of the ``8 * data.size`` bits of the bytes ``data`` (not copied)."""
        rd = cls.__new__(cls)
        data = np.asarray(data, np.uint8).reshape(-1)
        rd._init(data, 8 * int(data.size), window)
        return rd

    def _init(self, data: np.ndarray, n: int, window: int) -> None:
        self.data, self.n, self.window = data, n, window
        self._chunk = -1
        self._windows: list[int] = []

    def bits(self, start: int, stop: int) -> np.ndarray:
        """Bits ``start`` to ``stop`` (clipped to the stream) as ``uint8`` 0/1."""
        stop = min(stop, self.n)
        if stop <= start:
            return np.zeros(0, np.uint8)
        seg = np.unpackbits(self.data[start // 8 : (stop + 7) // 8])
        return seg[start % 8 : start % 8 + stop - start]

    def zero_from(self, p: int) -> bool:
        """Whether every bit from bit ``p`` on is zero."""
        if p >= self.n:
            return True
        head = int(self.data[p // 8]) & (0xFF >> (p % 8))
        return head == 0 and not self.data[p // 8 + 1 :].any()

    def at(self, p: int) -> int:
        """The ``window`` bits from bit ``p`` as an integer (zeros past the end)."""
        c = p // self.CHUNK
        if c != self._chunk:
            seg = self.bits(c * self.CHUNK, (c + 1) * self.CHUNK + self.window)
            seg = np.concatenate([seg, np.zeros(self.window, np.uint8)]).astype(np.int64)
            w = np.zeros(min(self.CHUNK, seg.size - self.window), np.int64)
            for j in range(self.window):
                w = (w << 1) | seg[j : j + w.size]
            self._chunk, self._windows = c, w.tolist()
        return self._windows[p - c * self.CHUNK]


def _decode_table(lengths: np.ndarray, width: int) -> tuple[list[int], list[int]]:
    """``(symbol, length)`` for every ``width``-bit window (length 0: not a code)."""
    lengths = np.asarray(lengths, np.int64)
    if lengths.max(initial=0) > MAX_CODE_LENGTH:
        raise FileFormatError("corrupted file: a Huffman code is longer than 15 bits")
    used = lengths > 0
    kraft = np.sum(2.0 ** (-lengths[used].astype(np.float64)))
    if kraft > 1.0 or (used.sum() > 1 and kraft != 1.0):
        raise FileFormatError("corrupted file: a Huffman table is not a complete prefix code")
    sym = np.zeros(2**width, np.int64)
    ln = np.zeros(2**width, np.int64)
    codes = canonical_codes(lengths)
    for s in np.flatnonzero(used):
        shift = width - int(lengths[s])
        sym[codes[s] << shift : (codes[s] + 1) << shift] = s
        ln[codes[s] << shift : (codes[s] + 1) << shift] = lengths[s]
    return sym.tolist(), ln.tolist()


def decode(
    reader: BitReader,
    start: int,
    lengths: np.ndarray,
    *,
    count: int,
    stop: int | None = None,
    size: int | None = None,
) -> tuple[np.ndarray, int]:
    """Decode Huffman symbols from ``reader`` at bit ``start``.

    Args:
      reader: the bit stream.
      start: the first bit.
      lengths: the code lengths (validated: at most 15 bits, a complete prefix code, or one
        symbol of length 1).
      count: decode exactly ``count`` symbols; or, with ``stop``, until ``count`` symbols other
        than ``stop`` have been decoded.
      stop: the escape symbol (``None``: plain count).
      size: with ``stop``, the leaf's number of entries: the symbols are relative indices (see
        ``relative_symbols``; an escape advances ``stop`` entries, any other symbol ``s``
        advances ``s + 1``) and decoding stops with an error as soon as they pass the leaf.

    Returns:
      ``(symbols, next bit)``, the symbols as ``uint32``.

    Raises:
      FileFormatError: a bad table, a stream that runs out or holds a bit pattern that is not
        a code, or relative indices past the leaf.  Every decoded symbol consumes at least one
        bit and (with ``size``) advances at least one entry, so the work is bounded by both the
        stream's length and the leaf's size.
    """
    if count == 0:
        return np.zeros(0, np.uint32), start
    sym, ln = _decode_table(lengths, reader.window)
    n = reader.n
    out = array.array("I")  # four bytes a symbol while decoding
    p, seen, pos = start, 0, 0
    limit = -1 if size is None or stop is None else size
    while seen < count:
        if p >= n:
            raise FileFormatError("corrupted file: a Huffman stream ends early")
        w = reader.at(p)
        if ln[w] == 0:
            raise FileFormatError("corrupted file: a Huffman stream holds an invalid code")
        s = sym[w]
        out.append(s)
        p += ln[w]
        seen += s != stop
        if limit >= 0:
            pos += stop if s == stop else s + 1
            if pos > limit:
                raise FileFormatError(f"corrupted file: a relative index past its leaf of {size}")
    if p > n:
        raise FileFormatError("corrupted file: a Huffman stream ends early")
    return np.frombuffer(out, np.uint32), p


# ----------------------------------------------------------------------------- relative indices


def relative_symbols(positions: np.ndarray, index_bits: int) -> np.ndarray:
    """Relative-index symbols of sorted flat ``positions`` (see the module docstring).

    Args:
      positions: strictly increasing kept positions (C order).
      index_bits: the symbol width (>= 1); ``M = 2**index_bits - 1`` is the escape.

    Returns:
      ``int64`` symbols: for each position, ``gap // M`` escapes, then ``gap % M``.
    """
    m = 2**index_bits - 1
    positions = np.asarray(positions, np.int64)
    gaps = np.diff(positions, prepend=-1) - 1
    esc, rem = gaps // m, gaps % m
    out = np.full(int(positions.size + esc.sum()), m, np.int64)
    out[np.cumsum(esc + 1) - 1] = rem
    return out


def relative_count(positions: np.ndarray, index_bits: int) -> tuple[np.ndarray, int]:
    """Symbol counts of ``relative_symbols(positions, index_bits)`` without building it.

    Returns:
      ``(counts per symbol, number of symbols)``.
    """
    m = 2**index_bits - 1
    gaps = np.diff(np.asarray(positions, np.int64), prepend=-1) - 1
    counts = np.bincount(gaps % m, minlength=m + 1)
    counts[m] += int((gaps // m).sum())
    return counts, int(counts.sum())


def relative_positions(symbols: np.ndarray, index_bits: int, *, size: int) -> np.ndarray:
    """The positions a relative-index stream names (the inverse of ``relative_symbols``).

    Args:
      symbols: the stream, ending with a kept entry (not an escape), or empty.
      index_bits: the symbol width.
      size: the number of entries of the leaf (positions must be below it).

    Returns:
      The kept positions (``int64``, strictly increasing).

    Raises:
      FileFormatError: a stream that ends with an escape or points past the leaf.
    """
    m = 2**index_bits - 1
    symbols = np.asarray(symbols, np.int64)
    if symbols.size == 0:
        return np.zeros(0, np.int64)
    esc = symbols == m
    if esc[-1] or np.any(symbols > m) or np.any(symbols < 0):
        raise FileFormatError("corrupted file: a relative-index stream is malformed")
    pos = np.cumsum(np.where(esc, m, symbols + 1)) - 1
    if pos[-1] >= size:
        raise FileFormatError("corrupted file: a relative index points past its leaf")
    return pos[~esc]


def relative_mask(
    symbols: np.ndarray, index_bits: int, *, size: int, chunk: int = 2**16
) -> np.ndarray:
    """``relative_positions`` as a boolean mask of the leaf, built chunk by chunk (memory: the
    mask and one chunk, not eight bytes a position).

    Args:
      symbols: the stream, ending with a kept entry (not an escape), or empty.
      index_bits: the symbol width.
      size: the number of entries of the leaf.

    Returns:
      A flat ``bool`` array of ``size`` entries, True at the kept positions.

    Raises:
      FileFormatError: as ``relative_positions``.
    """
    m = 2**index_bits - 1
    symbols = np.asarray(symbols).reshape(-1)
    mask = np.zeros(size, bool)
    if symbols.size == 0:
        return mask
    if symbols[-1] == m or int(symbols.max()) > m or int(symbols.min()) < 0:
        raise FileFormatError("corrupted file: a relative-index stream is malformed")
    base = -1
    for a in range(0, symbols.size, chunk):
        s = symbols[a : a + chunk].astype(np.int64)
        pos = base + np.cumsum(np.where(s == m, m, s + 1))
        base = int(pos[-1])
        if base >= size:
            raise FileFormatError("corrupted file: a relative index points past its leaf")
        mask[pos[s != m]] = True
    return mask


def bits_to_bytes(nbits: int) -> int:
    """Bytes holding ``nbits`` bits."""
    return (nbits + 7) // 8
