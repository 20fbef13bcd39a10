"""The plan of a file: the encoding of every leaf (``format="auto"`` picks the smallest), the
compaction, the header, and the exact size of the file before it is written.

``plan_tree`` is what ``prunejax.fileformat.save`` writes and what ``prunejax.report`` measures;
``leaf_bytes`` predicts one leaf's bytes in any encoding.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import jax
import numpy as np

from prunejax._util import (
    PyTree,
    check_same_structure,
    flatten,
    is_jax,
    is_matrix_object,
    is_traced,
    path_str,
)
from prunejax.fileformat import container
from prunejax.fileformat.compaction import compact_arrays
from prunejax.fileformat.dtypes import DTYPES, dtype_name
from prunejax.fileformat.encodings import ENCODINGS, leaf_members
from prunejax.fileformat.header import make_header
from prunejax.fileformat.quantized import (
    QUANT_ENCODINGS,
    QuantLeaf,
    as_numpy,
    header_fields,
    plan_leaf,
)
from prunejax.fileformat.relative import plan_relative
from prunejax.fileformat.structure import describe_structure
from prunejax.quantize import dequantize, is_quantized

__all__ = ["FORMATS", "Plan", "check_format", "leaf_bytes", "plan_tree"]

#: Accepted ``format=`` values of ``save``.
FORMATS = (
    "auto",
    "smallest",
    "dense",
    "compact",
    "bitmask",
    "csr",
    "bcoo",
    "relative",
    "qbitmask",
    "qrelative",
    "qhuffman",
)
#: The formats that keep quantized leaves quantized (the others save them dequantized).
QUANT_FORMATS = ("auto", "qbitmask", "qrelative", "qhuffman")


def check_format(format: str) -> str:
    """Validate a ``format=`` value.

    Args:
      format: one of ``FORMATS``.

    Returns:
      The format, with the alias ``"smallest"`` resolved to ``"auto"``.

    Raises:
      ValueError: unknown format.
    """
    if not isinstance(format, str) or format not in FORMATS:
        raise ValueError(f"unknown format {format!r}; expected one of {', '.join(FORMATS)}")
    return "auto" if format == "smallest" else format


def leaf_bytes(
    encoding: str,
    shape: tuple[int, ...],
    dtype: Any,
    nnz: int,
    *,
    index: int = 0,
    blob: int | None = None,
) -> int:
    """Bytes a leaf of ``shape``/``dtype`` with ``nnz`` nonzeros adds to a saved file.

    Args:
      encoding: ``"dense"``, ``"bitmask"``, ``"csr"`` or ``"bcoo"`` (or a quantized encoding,
        with ``blob``).
      shape, dtype, nnz: the leaf's shape, dtype and number of nonzero entries.
      index: the leaf's position in the tree (member names, hence zip headers, grow with it).
      blob: a quantized leaf's blob bytes (``prunejax.fileformat.quantized``).

    Returns:
      The exact number of bytes of the leaf's members (payloads and their safetensors header
      entries).
    """
    return sum(
        container.member_bytes(n, s, d)
        for n, s, d in leaf_members(index, encoding, tuple(shape), dtype, nnz, blob=blob)
    )


@dataclass
class Plan:
    """Everything that goes into a file, before the arrays are encoded.

    Attributes:
      header: the JSON header without its checksum.
      leaves: the dense NumPy leaves to encode (compacted if the file is); a quantized leaf is
        its ``prunejax.fileformat.quantized.QuantLeaf`` (it knows its encoding and blob).
      encodings: the encoding of each leaf.
      kept: the compaction's ``kept`` member arrays (empty for an uncompacted file).
    """

    header: dict
    leaves: list[Any]
    encodings: list[str]
    kept: list[np.ndarray] = field(default_factory=list)

    def members(self) -> list[tuple[str, tuple[int, ...], np.dtype]]:
        """``(member name, shape, dtype)`` of every array member, in file order."""
        out = []
        for i, (arr, enc, meta) in enumerate(
            zip(self.leaves, self.encodings, self.header["leaves"], strict=True)
        ):
            out += leaf_members(i, enc, arr.shape, arr.dtype, meta["nnz"], blob=meta.get("blob"))
        for j, k in enumerate(self.kept):
            out.append((f"kept.{j}", k.shape, k.dtype))
        return out

    def bytes_per_leaf(self) -> list[int]:
        """File bytes of each leaf's members."""
        return [
            leaf_bytes(enc, arr.shape, arr.dtype, meta["nnz"], index=i, blob=meta.get("blob"))
            for i, (arr, enc, meta) in enumerate(
                zip(self.leaves, self.encodings, self.header["leaves"], strict=True)
            )
        ]

    def nbytes(self) -> int:
        """Exact size of the file ``save`` writes for this plan."""
        return container.file_bytes(self.header, self.members())

    def parts_per_leaf(self) -> list[dict[str, int]]:
        """Each leaf's file bytes by part: ``values`` (weights or codes), ``indices`` (bitmask,
        CSR/BCOO or relative indices), ``codebooks`` and ``header`` (its members' entries in the
        safetensors header); they sum to ``bytes_per_leaf``."""
        out = []
        for i, (arr, enc, meta) in enumerate(
            zip(self.leaves, self.encodings, self.header["leaves"], strict=True)
        ):
            members = leaf_members(i, enc, arr.shape, arr.dtype, meta["nnz"], blob=meta.get("blob"))
            total = sum(container.member_bytes(n, sh, d) for n, sh, d in members)
            if isinstance(arr, QuantLeaf):
                parts = {
                    "values": arr.parts["values"],
                    "indices": arr.parts["indices"],
                    "codebooks": arr.parts["codebook"],
                }
            else:
                parts = {"values": 0, "indices": 0, "codebooks": 0}
                for name, sh, d in members:
                    role = name.rsplit(".", 1)[1]
                    key = "values" if role in ("data", "values") else "indices"
                    parts[key] += math.prod(sh) * np.dtype(d).itemsize
            parts["header"] = total - sum(parts.values())
            out.append(parts)
        return out

    def extra_bytes(self) -> dict[str, int]:
        """File bytes outside the leaves' members, by part: ``indices`` (the payload of a
        compacted file's ``kept`` unit indices) and ``header`` (everything else: the 8-byte
        length, the safetensors header with the ``kept`` entries, the prunejax header and
        checksum in its metadata, the padding)."""
        kept = sum(k.nbytes for k in self.kept)
        return {"indices": kept, "header": self.nbytes() - sum(self.bytes_per_leaf()) - kept}


def _leaf_array(p: str, leaf: Any, mask: Any) -> np.ndarray:
    """One leaf as a dense NumPy array with its mask applied, validated for saving."""
    if is_traced(leaf):
        raise TypeError(f"cannot save leaf {p!r}: it is traced (call save outside jax.jit)")
    if is_matrix_object(leaf):
        if not hasattr(leaf, "todense"):
            raise TypeError(f"cannot save leaf {p!r}: {type(leaf).__name__} has no todense()")
        leaf = leaf.todense()
    arr = np.asarray(leaf)
    try:
        dtype_name(arr.dtype)
    except TypeError:
        raise TypeError(
            f"cannot save leaf {p!r}: dtype {arr.dtype} is not supported "
            f"(supported: {', '.join(DTYPES)})"
        ) from None
    if mask is not None:  # masked-out entries are not part of the saved model
        arr = np.where(np.asarray(mask), arr, np.zeros((), arr.dtype))
    if arr.dtype.kind in "fcV":
        finite = np.isfinite(arr.astype(np.float32) if arr.dtype.kind == "V" else arr)
        if not finite.all():
            nan = int(
                np.isnan(arr.astype(np.complex128 if arr.dtype.kind == "c" else np.float64)).sum()
            )
            raise ValueError(
                f"cannot save leaf {p!r}: it holds {nan} NaN and "
                f"{int(arr.size - finite.sum()) - nan} inf value(s); a model with non-finite "
                "weights is broken, and sparse encodings would silently change it"
            )
    return arr


def _prepare(
    params: PyTree, masks: PyTree | None, format: str
) -> tuple[list[str], list[Any], list[bool], dict]:
    """Flatten, densify, apply masks, validate; return paths, NumPy leaves (``QuantLeaf`` for a
    quantized leaf), JAX flags and the structure."""
    if _has_quantized(params):
        if masks is not None:
            raise ValueError(
                "cannot save params with Quantized leaves and masks=: a Quantized leaf holds its "
                "own mask (apply the masks before quantizing)"
            )
        flat, _ = jax.tree_util.tree_flatten_with_path(
            params, is_leaf=lambda x: is_quantized(x) or is_matrix_object(x)
        )
        paths = [path_str(kp) for kp, _ in flat]
        leaves: list[Any] = [leaf for _, leaf in flat]
        mleaves: list[Any] = [None] * len(leaves)
    elif masks is not None:
        paths, leaves, mleaves, _ = check_same_structure(params, masks)
    else:
        paths, leaves, _ = flatten(params)
        mleaves = [None] * len(leaves)
    if len(set(paths)) != len(paths):
        raise ValueError("cannot save params: two leaves have the same path (a key contains '/')")
    arrays, jax_flags = [], []
    for p, leaf, m in zip(paths, leaves, mleaves, strict=True):
        if is_quantized(leaf):
            jax_flags.append(any(is_jax(a) for a in (leaf.codes, leaf.codebook, leaf.mask)))
            arrays.append(plan_leaf(p, as_numpy(p, leaf), format))
            continue
        jax_flags.append(bool(is_jax(leaf) or is_matrix_object(leaf)))
        arrays.append(_leaf_array(p, leaf, m))
    index_of = {p: i for i, p in enumerate(paths)}
    structure = describe_structure(params, index_of)
    return paths, arrays, jax_flags, structure


def _has_quantized(params: PyTree) -> bool:
    return any(is_quantized(x) for x in jax.tree_util.tree_leaves(params, is_leaf=is_quantized))


def _choose_encodings(
    format: str, arrays: list[Any], nnzs: list[int]
) -> tuple[list[str], list[dict]]:
    """The encoding of each leaf and the keys it adds to the leaf's header entry: the smallest
    for ``"auto"`` (``relative`` included), else ``format`` where it applies (a quantized leaf
    comes with its encoding; the quantized formats pick the smallest plain encoding for the
    other leaves)."""
    encodings, extras = [], []
    for i, (a, nnz) in enumerate(zip(arrays, nnzs, strict=True)):
        extra: dict = {}
        if isinstance(a, QuantLeaf):
            enc, extra = a.encoding, header_fields(a)
        elif format in ("dense", "compact"):
            enc = "dense"
        elif format == "auto" or format in QUANT_ENCODINGS:
            sizes = [leaf_bytes(e, a.shape, a.dtype, nnz, index=i) for e in ENCODINGS]
            enc = ENCODINGS[int(np.argmin(sizes))]
            if 0 < nnz < a.size:
                ib, blob = plan_relative(a)
                if leaf_bytes("relative", a.shape, a.dtype, nnz, index=i, blob=blob) < min(sizes):
                    enc, extra = "relative", {"index_bits": ib, "blob": blob}
        elif a.ndim >= 2:
            enc = format
            if format == "relative":
                ib, blob = plan_relative(a)
                extra = {"index_bits": ib, "blob": blob}
        else:
            enc = "dense"
        encodings.append(enc)
        extras.append(extra)
    return encodings, extras


def plan_tree(
    params: PyTree,
    *,
    format: str,
    masks: PyTree | None = None,
    activation: Callable | None = None,
    structural: bool = False,
) -> Plan:
    """Decide every member of the file ``save`` writes for ``params``.

    Args:
      params, format, masks, activation: as ``prunejax.fileformat.save``.
      structural: compact by slicing only, without folding (used by the size report): the
        shapes and sizes are exact, the folded bias values are not.

    Returns:
      The ``Plan``; for ``"auto"`` with an activation, compacted only where that is smaller
      (compaction adds its unit indices to the file).

    Raises:
      ValueError, TypeError: as ``save``.
    """
    format = check_format(format)
    if format not in QUANT_FORMATS and _has_quantized(params):
        params = dequantize(params)
    if format == "auto" and activation is not None and not _has_quantized(params):
        plain = _plan_one(params, format, masks, activation, structural, do_compact=False)
        try:
            small = _plan_one(params, format, masks, activation, structural, do_compact=True)
        except ValueError:
            return plain  # not a compactable MLP: save it uncompacted
        return small if small.nbytes() < plain.nbytes() else plain
    return _plan_one(params, format, masks, activation, structural, do_compact=format == "compact")


def _plan_one(
    params: PyTree,
    format: str,
    masks: PyTree | None,
    activation: Callable | None,
    structural: bool,
    *,
    do_compact: bool,
) -> Plan:
    paths, arrays, jax_flags, structure = _prepare(params, masks, format)
    compaction = None
    kept: list[np.ndarray] = []
    if format == "compact" and activation is None and not structural:
        raise ValueError(
            "format='compact' needs activation= (the nonlinearity the model uses between layers): "
            "the constant outputs of dead units are folded into the next biases through it"
        )
    if do_compact:
        arrays, compaction, kept = compact_arrays(params, arrays, activation, structural=structural)
    nnzs = [a.nnz if isinstance(a, QuantLeaf) else int(np.count_nonzero(a)) for a in arrays]
    encodings, extras = _choose_encodings(format, arrays, nnzs)
    header = make_header(
        format=format,
        structure=structure,
        paths=paths,
        arrays=arrays,
        encodings=encodings,
        jax_flags=jax_flags,
        nnzs=nnzs,
        compaction=compaction,
        extras=extras,
    )
    return Plan(header=header, leaves=arrays, encodings=encodings, kept=kept)
