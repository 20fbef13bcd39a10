"""The encodings of ``Quantized`` leaves: codes and codebook in one byte blob per leaf.

A ``prunejax.quantize.Quantized`` leaf (codes, a ``float32`` codebook of ``K`` entries, a mask) is
stored as one ``uint8`` member ``"<leaf>.blob"``: the codebook (``K`` little-endian ``float32``,
bit-exact), then for ``qhuffman`` the two canonical Huffman code-length tables (nibbles; see
``prunejax.fileformat.entropy``), then one bit stream (most significant bit first, zero-padded to
a byte) of the positions of the kept entries followed by their codes:

* ``qdense`` (every entry kept): the codes of all entries in C order, ``w`` bits each
  (``w = ceil(log2 K)``);
* ``qbitmask``: one bit per entry (1 = kept), then the kept entries' codes, ``w`` bits each;
* ``qrelative``: relative indices of ``index_bits`` bits with escapes (Deep Compression's
  relative indices, Han, Mao & Dally 2016, section 4), then the codes, ``w`` bits each;
* ``qhuffman``: the same relative-index symbols and the codes, each Huffman-coded with its own
  table (the index table first; Han et al. 2016, section 4).

The leaf's header entry adds ``codebook`` (``K``), ``kind``, ``index_bits`` (0 when unused) and
``blob`` (the member's bytes).  Pruned entries carry no code: they load as exact zeros (and as
``mask`` False, code 0, with ``load(..., quantized=True)``).  ``plan_leaf`` computes every
applicable encoding's exact size from counts alone (``index_bits`` chosen per leaf to minimise
it) and picks the smallest; ``encode_leaf`` and ``decode_leaf`` write and read the blob, the
latter checking everything a hostile file could get wrong (truncated or overlong streams, codes
past the codebook, positions past the leaf, non-finite centroids, non-zero padding).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import jax.numpy as jnp
import numpy as np

from prunejax.fileformat import entropy
from prunejax.fileformat.errors import FileFormatError
from prunejax.quantize import MAX_CODEBOOK, Quantized

__all__ = [
    "QUANT_ENCODINGS",
    "QuantLeaf",
    "as_numpy",
    "decode_leaf",
    "encode_leaf",
    "check_entry",
    "header_fields",
    "plan_leaf",
]

#: The encodings of quantized leaves.
QUANT_ENCODINGS = ("qdense", "qbitmask", "qrelative", "qhuffman")
#: The widest relative index tried for ``qrelative`` and ``qhuffman``.
MAX_INDEX_BITS = {"qrelative": 16, "qhuffman": 12}


@dataclass(frozen=True)
class QuantLeaf:
    """A quantized leaf with its chosen encoding (what a file plan holds for it).

    Attributes:
      q: the leaf (NumPy parts, checked).
      encoding: one of ``QUANT_ENCODINGS``.
      index_bits: the relative-index width (0 for ``qdense``/``qbitmask``).
      parts: bytes of the blob by part: ``codebook``, ``indices`` (the positions: bitmask or
        relative indices, with their Huffman table), ``values`` (the codes, with their table and
        the last byte's padding); they sum to the blob's size.
    """

    q: Quantized
    encoding: str
    index_bits: int
    parts: dict[str, int] = field(default_factory=dict)

    @property
    def blob(self) -> int:
        return int(sum(self.parts.values()))

    @property
    def shape(self) -> tuple[int, ...]:
        return self.q.shape

    @property
    def ndim(self) -> int:
        return self.q.ndim

    @property
    def size(self) -> int:
        return self.q.size

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(jnp.dtype(self.q.dtype))

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize

    @property
    def nnz(self) -> int:
        return int(np.count_nonzero(self.q.mask))


def as_numpy(path: str, q: Quantized) -> Quantized:
    """A ``Quantized`` leaf with NumPy parts, validated for saving.

    Args:
      path: the leaf's path (for messages).
      q: the leaf.

    Returns:
      The leaf with NumPy ``codes`` (``uint8``/``uint16``), ``float32`` codebook, ``bool`` mask
      and canonical zero codes at pruned entries.

    Raises:
      ValueError: mismatched shapes, codes past the codebook, a non-finite centroid, a
        codebook of more than ``MAX_CODEBOOK`` entries.
      TypeError: traced parts, a dtype that is not a float.
    """
    try:
        codes, cb, mask = (np.asarray(a) for a in (q.codes, q.codebook, q.mask))
    except Exception as e:  # tracers refuse conversion
        raise TypeError(f"cannot save leaf {path!r}: its parts are traced ({e})") from None
    k = cb.shape[0] if cb.ndim == 1 else 0
    if cb.ndim != 1 or not 1 <= k <= MAX_CODEBOOK:
        raise ValueError(f"cannot save leaf {path!r}: codebook of shape {cb.shape}")
    if codes.shape != mask.shape or codes.dtype.kind not in "ui" or mask.dtype != np.bool_:
        raise ValueError(f"cannot save leaf {path!r}: codes/mask of bad shape or dtype")
    if not np.isfinite(cb.astype(np.float32)).all():
        raise ValueError(f"cannot save leaf {path!r}: its codebook holds NaN or inf")
    if not _finite_as(cb, q.dtype):
        raise ValueError(
            f"cannot save leaf {path!r}: its codebook overflows its dtype {jnp.dtype(q.dtype)}"
        )
    if codes[mask].size and (codes[mask].min() < 0 or codes[mask].max() >= k):
        raise ValueError(f"cannot save leaf {path!r}: a code points past its codebook of {k}")
    if jnp.dtype(q.dtype).kind != "f" and q.dtype != "bfloat16":
        raise TypeError(f"cannot save leaf {path!r}: dtype {q.dtype} is not a float")
    dt = np.uint8 if k <= 256 else np.uint16
    return Quantized(
        codes=np.where(mask, codes, 0).astype(dt),
        codebook=cb.astype(np.float32),
        mask=mask,
        dtype=str(jnp.dtype(q.dtype)),
        kind=str(q.kind),
    )


def _finite_as(codebook: np.ndarray, dtype: object) -> bool:
    """Whether every centroid stays finite when cast to the leaf's ``dtype``."""
    try:
        with np.errstate(over="ignore"):
            cast = np.asarray(codebook, np.float32).astype(np.dtype(jnp.dtype(dtype)))
    except TypeError:
        return True  # not a float dtype: refused elsewhere
    return bool(np.isfinite(cast.astype(np.float32)).all())


def _width(k: int) -> int:
    return (k - 1).bit_length()


def _half(n: int) -> int:
    return (n + 1) // 2


def _candidates(q: Quantized) -> list[QuantLeaf]:
    """Every applicable encoding with its best ``index_bits`` and exact part sizes."""
    k, size = q.codebook.shape[0], q.size
    w = _width(k)
    mask = q.mask.reshape(-1)
    nnz = int(mask.sum())
    pos = np.flatnonzero(mask)
    cb = 4 * k

    def leaf(enc: str, ib: int, idx_bytes: int, idx_bits: int, val_bytes: int, val_bits: int):
        total = entropy.bits_to_bytes(idx_bits + val_bits)
        idx = idx_bytes + idx_bits // 8
        parts = {"codebook": cb, "indices": idx, "values": val_bytes + total - idx_bits // 8}
        return QuantLeaf(q, enc, ib, parts)

    out = [leaf("qbitmask", 0, 0, size, 0, nnz * w)]
    if nnz == size:
        out.append(leaf("qdense", 0, 0, 0, 0, size * w))
    fixed = [(entropy.relative_count(pos, ib)[1] * ib, ib) for ib in range(1, 17)]
    bits, ib = min(fixed)
    out.append(leaf("qrelative", ib, 0, bits, 0, nnz * w))
    if k <= entropy.MAX_ALPHABET:
        counts = np.bincount(q.codes.reshape(-1)[mask], minlength=k)
        clen = entropy.code_lengths(counts)
        code_bits = int((counts * clen).sum())
        best = None
        for ib in range(1, MAX_INDEX_BITS["qhuffman"] + 1):
            c, _ = entropy.relative_count(pos, ib)
            b = int((c * entropy.code_lengths(c)).sum())
            cost = _half(2**ib) * 8 + b
            if best is None or cost < best[0]:
                best = (cost, ib, b)
        _, ib, b = best
        out.append(leaf("qhuffman", ib, _half(2**ib), b, _half(k), code_bits))
    return out


def plan_leaf(path: str, q: Quantized, format: str) -> QuantLeaf:
    """The encoding of a quantized leaf: the smallest (``format="auto"``) or the one named.

    Args:
      path: the leaf's path (for messages).
      q: the leaf (``as_numpy`` applied).
      format: ``"auto"`` or one of ``QUANT_ENCODINGS``.

    Returns:
      The ``QuantLeaf`` (ties go to the simpler encoding, in ``QUANT_ENCODINGS`` order).

    Raises:
      ValueError: the named encoding does not apply (``qdense`` with pruned entries, or
        ``qhuffman`` with a codebook over ``entropy.MAX_ALPHABET`` entries).
    """
    cands = _candidates(q)
    if format == "auto":
        return min(cands, key=lambda c: (c.blob, QUANT_ENCODINGS.index(c.encoding)))
    for c in cands:
        if c.encoding == format:
            return c
    k = q.codebook.shape[0]
    why = {
        "qdense": "it keeps every entry, and this leaf has pruned ones",
        "qhuffman": f"it Huffman-codes codebooks of at most {entropy.MAX_ALPHABET} entries, "
        f"and this one has {k} (use qrelative or qbitmask)",
    }.get(format, "the encoding does not apply")
    raise ValueError(f"cannot save leaf {path!r} as {format!r}: {why}")


def header_fields(leaf: QuantLeaf) -> dict:
    """The keys a quantized leaf adds to its header entry."""
    return {
        "codebook": int(leaf.q.codebook.shape[0]),
        "kind": leaf.q.kind,
        "index_bits": leaf.index_bits,
        "blob": leaf.blob,
    }


def _fixed_bits(values: np.ndarray, width: int) -> np.ndarray:
    values = np.asarray(values, np.int64).reshape(-1)
    shifts = np.arange(width - 1, -1, -1)
    return ((values[:, None] >> shifts[None, :]) & 1).astype(np.uint8).reshape(-1)


def _read_fixed(
    rd: entropy.BitReader, start: int, count: int, width: int, dtype: type = np.uint32
) -> np.ndarray:
    """``count`` unsigned values of ``width`` bits from bit ``start`` (``dtype``), in chunks."""
    if start + count * width > rd.n:
        raise FileFormatError("a fixed-width stream ends early")
    out = np.zeros(count, dtype)
    if width == 0:
        return out
    weights = 1 << np.arange(width - 1, -1, -1, dtype=np.int64)
    step = 2**16
    for c in range(0, count, step):
        n = min(step, count - c)
        seg = rd.bits(start + c * width, start + (c + n) * width).reshape(n, width)
        out[c : c + n] = seg.astype(np.int64) @ weights
    return out


def encode_leaf(leaf: QuantLeaf) -> np.ndarray:
    """The blob of a planned quantized leaf (``uint8``, ``leaf.blob`` bytes)."""
    q, enc, ib = leaf.q, leaf.encoding, leaf.index_bits
    k = q.codebook.shape[0]
    w = _width(k)
    mask = q.mask.reshape(-1)
    pos = np.flatnonzero(mask)
    codes = q.codes.reshape(-1)[mask].astype(np.int64)
    head = [q.codebook.astype("<f4").view(np.uint8)]
    if enc == "qdense":
        bits = [_fixed_bits(q.codes, w)]
    elif enc == "qbitmask":
        bits = [mask.astype(np.uint8), _fixed_bits(codes, w)]
    elif enc == "qrelative":
        bits = [_fixed_bits(entropy.relative_symbols(pos, ib), ib), _fixed_bits(codes, w)]
    else:
        syms = entropy.relative_symbols(pos, ib)
        ilen = entropy.code_lengths(np.bincount(syms, minlength=2**ib))
        clen = entropy.code_lengths(np.bincount(codes, minlength=k))
        head += [entropy.pack_lengths(ilen), entropy.pack_lengths(clen)]
        bits = [entropy.encode(syms, ilen), entropy.encode(codes, clen)]
    blob = np.concatenate(head + [np.packbits(np.concatenate(bits))])
    if blob.size != leaf.blob:  # pragma: no cover - internal
        raise AssertionError(f"blob of {blob.size} bytes, planned {leaf.blob}")
    return blob


def _relative_fixed(
    rd: entropy.BitReader, ib: int, nnz: int, size: int, chunk: int = 2**16
) -> np.ndarray:
    """The fixed-width relative-index symbols up to the ``nnz``-th kept entry, read in chunks.

    Every symbol advances at least one entry, so reading stops with an error once the indices
    pass the leaf's ``size``: work and memory stay bounded by the leaf and the chunk, whatever
    the blob's length.
    """
    m = 2**ib - 1
    out: list[np.ndarray] = []
    start, seen, pos = 0, 0, 0
    while seen < nnz:
        count = min(chunk, (rd.n - start) // ib)
        if count <= 0:
            raise FileFormatError("the relative-index stream ends early")
        syms = _read_fixed(rd, start, count, ib).astype(np.uint16)
        kept = np.flatnonzero(syms != m)
        if seen + kept.size >= nnz:
            syms = syms[: int(kept[nnz - seen - 1]) + 1]
        pos += int(np.where(syms == m, m, syms.astype(np.int64) + 1).sum())
        if pos > size:
            raise FileFormatError(f"a relative index past its leaf of {size}")
        out.append(syms)
        seen += min(kept.size, nnz - seen)
        start += count * ib
    return np.concatenate(out) if out else np.zeros(0, np.uint16)


def _positions(enc: str, leaf: Mapping, rd: entropy.BitReader, tables: tuple, size: int):
    """The kept entries (a slice, a boolean mask or flat positions: an index into the flat
    leaf, in C order) and the next bit of the stream."""
    nnz, ib = leaf["nnz"], leaf["index_bits"]
    if enc == "qdense":
        if nnz != size:
            raise FileFormatError("a qdense leaf must keep every entry")
        return slice(None), 0
    if enc == "qbitmask":
        if size > rd.n:
            raise FileFormatError("the bitmask ends early")
        pos = rd.bits(0, size).view(bool)
        if np.count_nonzero(pos) != nnz:
            raise FileFormatError(f"the bitmask does not hold {nnz} bits")
        return pos, size
    if enc == "qrelative":
        syms = _relative_fixed(rd, ib, nnz, size)
        return entropy.relative_mask(syms, ib, size=size), syms.size * ib
    else:
        syms, end = entropy.decode(rd, 0, tables[0], count=nnz, stop=2**ib - 1, size=size)
        return entropy.relative_mask(syms, ib, size=size), end


def _check_entry(leaf: Mapping) -> tuple[int, int, int]:
    k, ib, blob = leaf.get("codebook"), leaf.get("index_bits"), leaf.get("blob")
    for name, v, lo, hi in (("codebook", k, 1, MAX_CODEBOOK), ("index_bits", ib, 0, 16)):
        if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
            raise FileFormatError(f"bad {name} {v!r}")
    enc = leaf["encoding"]
    if (enc in ("qrelative", "qhuffman")) != (ib > 0) or (enc == "qhuffman" and ib > 12):
        raise FileFormatError(f"bad index_bits {ib!r} for {enc}")
    if enc == "qhuffman" and k > entropy.MAX_ALPHABET:
        raise FileFormatError(f"a Huffman-coded codebook of {k} entries")
    if not isinstance(blob, int) or isinstance(blob, bool) or blob < 0:
        raise FileFormatError(f"bad blob size {blob!r}")
    if not isinstance(leaf.get("kind"), str):
        raise FileFormatError("bad kind")
    return k, ib, blob


def check_entry(leaf: Mapping) -> int:
    """Validate a quantized leaf's header fields; return its blob size.

    Raises:
      ValueError: a malformed field.
    """
    try:
        return _check_entry(leaf)[2]
    except FileFormatError as e:
        raise ValueError(f"leaf {leaf.get('path')!r}: {e}") from None


def decode_leaf(leaf: Mapping, blob: np.ndarray, where: str) -> Quantized:
    """Rebuild a quantized leaf from its header entry and blob, checking everything.

    Args:
      leaf: the leaf's header entry.
      blob: its ``uint8`` blob member.
      where: the leaf, for messages.

    Returns:
      The ``Quantized`` leaf (NumPy parts), bit-exact as saved.

    Raises:
      FileFormatError: a malformed entry or blob (the message names the leaf).
    """
    try:
        return _decode(leaf, np.asarray(blob, np.uint8))
    except FileFormatError as e:
        raise FileFormatError(f"corrupted file: {where}: {e}") from None


def _decode(leaf: Mapping, blob: np.ndarray) -> Quantized:
    k, ib, _ = _check_entry(leaf)
    enc, shape = leaf["encoding"], tuple(leaf["shape"])
    size, w, nnz = math.prod(shape), _width(k), leaf["nnz"]
    off = 4 * k
    if blob.size < off:
        raise FileFormatError("the blob is shorter than its codebook")
    codebook = blob[:off].view("<f4").astype(np.float32)
    if not np.isfinite(codebook).all():
        raise FileFormatError("its codebook holds NaN or inf")
    if not _finite_as(codebook, leaf["dtype"]):
        raise FileFormatError(f"its codebook overflows its dtype {leaf['dtype']}")
    tables: tuple = ()
    if enc == "qhuffman":
        ni, nc = _half(2**ib), _half(k)
        if blob.size < off + ni + nc:
            raise FileFormatError("the blob is shorter than its Huffman tables")
        tables = (
            entropy.unpack_lengths(blob[off : off + ni], 2**ib),
            entropy.unpack_lengths(blob[off + ni : off + ni + nc], k),
        )
        off += ni + nc
    rd = entropy.BitReader.packed(blob[off:])
    pos, p = _positions(enc, leaf, rd, tables, size)
    if enc == "qhuffman":
        codes, p = entropy.decode(rd, p, tables[1], count=nnz)
    else:
        cdt = np.uint8 if k <= 256 else np.uint16
        codes, p = _read_fixed(rd, p, nnz, w, cdt), p + nnz * w
    if codes.size and int(codes.max()) >= k:
        raise FileFormatError("a code points past the codebook")
    if entropy.bits_to_bytes(p) != rd.n // 8 or not rd.zero_from(p):
        raise FileFormatError("the bit stream has trailing data")
    full = np.zeros(size, np.uint8 if k <= 256 else np.uint16)
    mask = np.zeros(size, bool)
    full[pos], mask[pos] = codes, True
    return Quantized(
        codes=full.reshape(shape),
        codebook=codebook,
        mask=mask.reshape(shape),
        dtype=leaf["dtype"],
        kind=leaf["kind"],
    )
