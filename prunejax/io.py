"""Saving and loading pruned models in their small forms.

A pruned model is mostly zeros, yet ``np.savez`` of its params is as large as the dense model.
``save`` writes each leaf in a form that stores only what is needed, and ``load`` gives back params
of the same tree kind that produce identical outputs.

Encodings (per leaf; ``format=`` picks them, see ``save``):

* ``dense``: the array as is.
* ``bitmask``: one bit per entry (``np.packbits`` of ``leaf != 0``, C order, big-endian bit order)
  plus the nonzero values in C order: ``size/8 + nnz * itemsize`` bytes.
* ``csr``: the leaf viewed as a matrix ``(shape[0], prod(shape[1:]))`` (a 1-D leaf as one row):
  row pointers ``indptr``, column ``indices`` and ``data``.  Index arrays use the smallest
  unsigned integer type that holds their largest value (``uint8``/``uint16``/``uint32``/
  ``uint64``): a 784x300 kernel has ``uint16`` column indices, 6 bytes per fp32 nonzero.
* ``bcoo``: COO coordinates ``indices`` of shape ``(nnz, ndim)`` (smallest unsigned type holding
  ``max(shape) - 1``) plus ``data``, the layout of ``jax.experimental.sparse.BCOO`` with
  ``n_batch = n_dense = 0``.
* ``compact``: the whole MLP is first compacted (``prunejax.compact.compact``: dead units
  physically removed, constants folded into the next biases), then every leaf is dense.

File format (version 1).  The file is a ZIP archive of uncompressed (``ZIP_STORED``) members, so
``np.load(path, allow_pickle=False)`` opens it as an ``.npz``:

* ``header.json`` (first member): UTF-8 JSON object with
    ``magic`` (``"prunejax"``), ``format_version`` (``1``), ``library_version``,
    ``format`` (the requested format), ``structure`` (the pytree, see below),
    ``leaves`` (one entry per leaf in ``jax.tree_util`` flatten order: ``path`` such as
    ``"Dense_0/kernel"``, ``encoding``, ``shape``, ``dtype`` name, ``array`` = ``"numpy"`` or
    ``"jax"`` (the kind ``load`` gives back), ``nnz``),
    ``compaction`` (``null``, or ``{"activation", "layers": [{"name", "kernel", "bias", "in",
    "out"}]}`` with leaf indices and the ORIGINAL layer widths) and
    ``checksum`` (``"sha256:<hex>"`` over the header without its checksum, serialised with sorted
    keys and no spaces, followed by every array member's name and raw ``.npy`` bytes in order).
* one ``.npy`` member per array, named ``"<leaf index>.<role>.npy"`` with roles ``data``
  (dense), ``mask``/``values`` (bitmask), ``indptr``/``indices``/``data`` (csr),
  ``indices``/``data`` (bcoo), plus ``kept.<layer>.npy`` (the original indices of the units
  each layer keeps) for compacted files.  ``bfloat16`` payloads are stored as ``uint16`` bits.
* ``structure`` is a JSON tree of nodes ``{"dict": [[key, node], ...]}`` (keys are JSON strings
  or integers), ``{"frozendict": [...]}`` (Flax ``FrozenDict``), ``{"list": [node, ...]}``,
  ``{"tuple": [...]}``, ``{"none": null}`` and ``{"leaf": index}``.

Safety: ``load`` parses JSON and ``.npy`` arrays with ``allow_pickle=False`` only, so opening a
downloaded file never executes code from it.  It verifies the ZIP CRCs, the member list, the
format version and the SHA-256 checksum before decoding, and the bounds of every index array
after; a truncated, corrupted, tampered or version-mismatched file raises ``FileFormatError``
(a ``ValueError``), never returns garbage weights.  ``save`` writes to a temporary file in the
destination directory and renames it into place (``os.replace``), so a crash never leaves a
half-written file under the final name.

File size: every member costs its ``.npy`` bytes (header of 128 bytes for small shapes, plus the
payload) and ``76 + 2 * len(member name)`` bytes of ZIP local and central headers; the archive
ends with a 22-byte end record.  ``prunejax.report.size_report`` uses this model.
"""

from __future__ import annotations

import functools
import hashlib
import io as _io
import json
import math
import os
import tempfile
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from prunejax._util import (
    PyTree,
    check_same_structure,
    dense_layers,
    flatten,
    is_jax,
    is_matrix_object,
    is_traced,
    path_str,
)

__all__ = ["FORMATS", "FileFormatError", "save", "load", "load_header"]

FORMAT_VERSION = 1
MAGIC = "prunejax"
HEADER_NAME = "header.json"
#: Accepted ``format=`` values of ``save``.
FORMATS = ("auto", "smallest", "dense", "compact", "bitmask", "csr", "bcoo")
ENCODINGS = ("dense", "bitmask", "csr", "bcoo")
_ROLES = {
    "dense": ("data",),
    "bitmask": ("mask", "values"),
    "csr": ("indptr", "indices", "data"),
    "bcoo": ("indices", "data"),
}
_DTYPES: dict[str, np.dtype] = {
    name: np.dtype(name)
    for name in (
        "bool",
        "int8",
        "int16",
        "int32",
        "int64",
        "uint8",
        "uint16",
        "uint32",
        "uint64",
        "float16",
        "float32",
        "float64",
        "complex64",
        "complex128",
    )
}
_DTYPES["bfloat16"] = np.dtype(jnp.bfloat16)
_CHECKSUM_PLACEHOLDER = "sha256:" + "0" * 64
_ZIP_ENTRY_OVERHEAD = 30 + 46  # local file header + central directory record, no extras
_ZIP_END = 22  # end of central directory record, no comment


class FileFormatError(ValueError):
    """A file is not a valid prunejax model file: truncated, corrupted, tampered with, written by
    an incompatible format version, or not a prunejax file at all."""


# ----------------------------------------------------------------------------- size model


def _dtype_name(dtype: np.dtype) -> str:
    for name, dt in _DTYPES.items():
        if dt == dtype:
            return name
    raise TypeError(f"dtype {dtype} cannot be saved")


def _storage_dtype(dtype: np.dtype) -> np.dtype:
    """The dtype a payload has in the ``.npy`` member (bfloat16 travels as its uint16 bits)."""
    if dtype == _DTYPES["bfloat16"]:
        return np.dtype(np.uint16)
    return dtype


def _index_dtype(max_value: int) -> np.dtype:
    """The smallest unsigned integer dtype holding ``max_value`` (>= 0)."""
    for dt in (np.uint8, np.uint16, np.uint32):
        if max_value <= np.iinfo(dt).max:
            return np.dtype(dt)
    return np.dtype(np.uint64)


@functools.lru_cache(maxsize=4096)
def _npy_header_bytes(shape: tuple[int, ...], descr: str) -> int:
    buf = _io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": descr, "fortran_order": False, "shape": shape}
    )
    return len(buf.getvalue())


def _member_bytes(name: str, shape: tuple[int, ...], dtype: np.dtype) -> int:
    """Exact bytes one array member adds to the file (zip headers + ``.npy`` header + payload)."""
    dtype = np.dtype(dtype)
    payload = math.prod(shape) * dtype.itemsize
    zip_name = name + ".npy"
    descr = np.lib.format.dtype_to_descr(dtype)
    return (
        _ZIP_ENTRY_OVERHEAD + 2 * len(zip_name) + _npy_header_bytes(tuple(shape), descr) + payload
    )


def _csr_dims(shape: tuple[int, ...]) -> tuple[int, int]:
    if len(shape) >= 2:
        return shape[0], math.prod(shape[1:])
    return 1, math.prod(shape)


def _leaf_members(
    index: int | str, encoding: str, shape: tuple[int, ...], dtype: np.dtype, nnz: int
) -> list[tuple[str, tuple[int, ...], np.dtype]]:
    """``(member name, shape, storage dtype)`` of every array encoding one leaf."""
    sd = _storage_dtype(np.dtype(dtype))
    size = math.prod(shape)
    if encoding == "dense":
        return [(f"{index}.data", tuple(shape), sd)]
    if encoding == "bitmask":
        return [
            (f"{index}.mask", ((size + 7) // 8,), np.dtype(np.uint8)),
            (f"{index}.values", (nnz,), sd),
        ]
    if encoding == "csr":
        rows, cols = _csr_dims(shape)
        return [
            (f"{index}.indptr", (rows + 1,), _index_dtype(nnz)),
            (f"{index}.indices", (nnz,), _index_dtype(max(cols - 1, 0))),
            (f"{index}.data", (nnz,), sd),
        ]
    if encoding == "bcoo":
        return [
            (
                f"{index}.indices",
                (nnz, len(shape)),
                _index_dtype(max(max(shape, default=1) - 1, 0)),
            ),
            (f"{index}.data", (nnz,), sd),
        ]
    raise ValueError(f"unknown encoding {encoding!r}; expected one of {ENCODINGS}")


def leaf_bytes(
    encoding: str, shape: tuple[int, ...], dtype: Any, nnz: int, *, index: int = 0
) -> int:
    """Bytes a leaf of ``shape``/``dtype`` with ``nnz`` nonzeros adds to a saved file.

    Args:
      encoding: ``"dense"``, ``"bitmask"``, ``"csr"`` or ``"bcoo"``.
      shape, dtype, nnz: the leaf's shape, dtype and number of nonzero entries.
      index: the leaf's position in the tree (member names, hence zip headers, grow with it).

    Returns:
      The exact number of bytes of the leaf's members (payloads, ``.npy`` and ZIP headers).
    """
    return sum(
        _member_bytes(n, s, d)
        for n, s, d in _leaf_members(index, encoding, tuple(shape), dtype, nnz)
    )


# ----------------------------------------------------------------------------- pytree structure


def _describe(node: Any, keypath: tuple, index_of: dict[str, int]) -> dict:
    if is_matrix_object(node) or isinstance(node, np.ndarray | np.generic | jax.Array):
        return {"leaf": index_of[path_str(keypath)]}
    if node is None:
        return {"none": None}
    kind = None
    if type(node) is dict:
        kind = "dict"
    else:
        try:
            from flax.core import FrozenDict
        except ImportError:  # pragma: no cover - flax is a dependency
            FrozenDict = ()  # noqa: N806
        if FrozenDict and isinstance(node, FrozenDict):
            kind = "frozendict"
    if kind is not None:
        items = []
        for k, v in node.items():
            if not isinstance(k, str | int) or isinstance(k, bool):
                raise TypeError(
                    f"cannot save params: dict key {k!r} at {path_str(keypath)!r} is a "
                    f"{type(k).__name__}; only str and int keys are supported"
                )
            items.append([k, _describe(v, keypath + (jax.tree_util.DictKey(k),), index_of)])
        return {kind: items}
    if type(node) in (list, tuple):
        children = [
            _describe(v, keypath + (jax.tree_util.SequenceKey(i),), index_of)
            for i, v in enumerate(node)
        ]
        return {type(node).__name__: children}
    raise TypeError(
        f"cannot save params: node at {path_str(keypath)!r} is a {type(node).__name__}; "
        "supported containers are dict, Flax FrozenDict, list, tuple and None"
    )


def _rebuild(node: Any, leaves: list[Any], used: set[int]) -> Any:
    if not isinstance(node, dict) or len(node) != 1:
        raise FileFormatError("corrupted header: malformed structure node")
    ((kind, value),) = node.items()
    if kind == "leaf":
        if not isinstance(value, int) or not 0 <= value < len(leaves) or value in used:
            raise FileFormatError(f"corrupted header: bad leaf reference {value!r}")
        used.add(value)
        return leaves[value]
    if kind == "none":
        return None
    if kind in ("list", "tuple"):
        if not isinstance(value, list):
            raise FileFormatError("corrupted header: malformed sequence node")
        seq = [_rebuild(v, leaves, used) for v in value]
        return seq if kind == "list" else tuple(seq)
    if kind in ("dict", "frozendict"):
        if not isinstance(value, list):
            raise FileFormatError("corrupted header: malformed dict node")
        out = {}
        for item in value:
            if (
                not isinstance(item, list)
                or len(item) != 2
                or not isinstance(item[0], str | int)
                or isinstance(item[0], bool)
            ):
                raise FileFormatError("corrupted header: malformed dict item")
            out[item[0]] = _rebuild(item[1], leaves, used)
        if kind == "frozendict":
            from flax.core import FrozenDict

            return FrozenDict(out)
        return out
    raise FileFormatError(f"corrupted header: unknown structure node kind {kind!r}")


# ----------------------------------------------------------------------------- encode / decode


def _encode(encoding: str, arr: np.ndarray) -> list[np.ndarray]:
    """The member arrays of one leaf (in ``_ROLES[encoding]`` order)."""
    sd = _storage_dtype(arr.dtype)
    flat = np.asarray(arr, order="C").reshape(-1)
    nz = flat != 0
    nnz = int(nz.sum())
    values = flat[nz].view(sd) if sd != arr.dtype else flat[nz]
    if encoding == "dense":
        full = np.asarray(arr, order="C")
        return [full.view(sd) if sd != arr.dtype else full]
    if encoding == "bitmask":
        return [np.packbits(nz), values]
    if encoding == "csr":
        rows, cols = _csr_dims(arr.shape)
        nzm = nz.reshape(rows, cols)
        counts = nzm.sum(axis=1)
        indptr = np.concatenate([[0], np.cumsum(counts)]).astype(_index_dtype(nnz))
        col = np.nonzero(nzm)[1].astype(_index_dtype(max(cols - 1, 0)))
        return [indptr, col, values]
    if encoding == "bcoo":
        idx_dt = _index_dtype(max(max(arr.shape, default=1) - 1, 0))
        coords = np.stack(np.unravel_index(np.flatnonzero(nz), arr.shape), axis=1)
        return [coords.astype(idx_dt).reshape(nnz, arr.ndim), values]
    raise ValueError(f"unknown encoding {encoding!r}")


def _decode(leaf: dict, arrays: dict[str, np.ndarray], index: int) -> np.ndarray:
    shape = tuple(leaf["shape"])
    dtype = _DTYPES[leaf["dtype"]]
    nnz = leaf["nnz"]
    enc = leaf["encoding"]
    size = math.prod(shape)
    where = f"leaf {index} ({leaf['path']!r})"

    def values(a: np.ndarray) -> np.ndarray:
        return a.view(dtype) if a.dtype != dtype else a

    if enc == "dense":
        return values(arrays["data"]).reshape(shape).copy()
    out = np.zeros(size, dtype)
    if enc == "bitmask":
        bits = np.unpackbits(arrays["mask"], count=None)
        if bits[size:].any() or int(bits[:size].sum()) != nnz:
            raise FileFormatError(
                f"corrupted file: the bitmask of {where} does not hold {nnz} bits"
            )
        out[bits[:size].astype(bool)] = values(arrays["values"])
        if np.any(out[bits[:size].astype(bool)] == 0):
            raise FileFormatError(f"corrupted file: {where} stores zeros as nonzero values")
        return out.reshape(shape)
    if enc == "csr":
        rows, cols = _csr_dims(shape)
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
    if enc == "bcoo":
        coords = arrays["indices"].astype(np.int64)
        if nnz and (np.any(coords >= np.asarray(shape, np.int64))):
            raise FileFormatError(f"corrupted file: the BCOO indices of {where} are out of bounds")
        flat_idx = np.ravel_multi_index(tuple(coords.T), shape) if nnz else np.zeros(0, np.int64)
        if np.any(np.diff(flat_idx) <= 0):
            raise FileFormatError(f"corrupted file: {where} has unsorted or repeated BCOO indices")
        out[flat_idx] = values(arrays["data"])
        return out.reshape(shape)
    raise FileFormatError(f"corrupted header: {where} has unknown encoding {enc!r}")


# ----------------------------------------------------------------------------- planning


@dataclass
class _Plan:
    """Everything that goes into a file, before the arrays are encoded."""

    header: dict
    leaves: list[np.ndarray]
    encodings: list[str]
    kept: list[np.ndarray] = field(default_factory=list)

    def members(self) -> list[tuple[str, tuple[int, ...], np.dtype]]:
        out = []
        for i, (arr, enc, meta) in enumerate(
            zip(self.leaves, self.encodings, self.header["leaves"], strict=True)
        ):
            out += _leaf_members(i, enc, arr.shape, arr.dtype, meta["nnz"])
        for j, k in enumerate(self.kept):
            out.append((f"kept.{j}", k.shape, k.dtype))
        return out

    def nbytes(self) -> int:
        """Exact size of the file ``save`` writes for this plan."""
        header = dict(self.header, checksum=_CHECKSUM_PLACEHOLDER)
        hlen = len(_header_json(header))
        return (
            _ZIP_ENTRY_OVERHEAD
            + 2 * len(HEADER_NAME)
            + hlen
            + sum(_member_bytes(n, s, d) for n, s, d in self.members())
            + _ZIP_END
        )


def _header_json(header: dict) -> bytes:
    return json.dumps(header, separators=(",", ":"), allow_nan=False).encode()


def _checksum_json(header: dict) -> bytes:
    body = {k: v for k, v in header.items() if k != "checksum"}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def _activation_name(activation: Callable | None) -> str | None:
    if activation is None:
        return None
    return str(getattr(activation, "__name__", type(activation).__name__))


def _check_format(format: str) -> str:
    if not isinstance(format, str) or format not in FORMATS:
        raise ValueError(f"unknown format {format!r}; expected one of {', '.join(FORMATS)}")
    return "auto" if format == "smallest" else format


def _prepare(
    params: PyTree, masks: PyTree | None
) -> tuple[list[str], list[np.ndarray], list[bool], dict]:
    """Flatten, densify, apply masks, validate; return paths, NumPy leaves, JAX flags, structure."""
    if masks is not None:
        paths, leaves, mleaves, _ = check_same_structure(params, masks)
    else:
        paths, leaves, _ = flatten(params)
        mleaves = [None] * len(leaves)
    if len(set(paths)) != len(paths):
        raise ValueError("cannot save params: two leaves have the same path (a key contains '/')")
    arrays, jax_flags = [], []
    for p, leaf, m in zip(paths, leaves, mleaves, strict=True):
        if is_traced(leaf):
            raise TypeError(f"cannot save leaf {p!r}: it is traced (call save outside jax.jit)")
        jax_flags.append(bool(is_jax(leaf) or is_matrix_object(leaf)))
        if is_matrix_object(leaf):
            if not hasattr(leaf, "todense"):
                raise TypeError(f"cannot save leaf {p!r}: {type(leaf).__name__} has no todense()")
            leaf = leaf.todense()
        arr = np.asarray(leaf)
        try:
            _dtype_name(arr.dtype)
        except TypeError:
            raise TypeError(
                f"cannot save leaf {p!r}: dtype {arr.dtype} is not supported "
                f"(supported: {', '.join(_DTYPES)})"
            ) from None
        if m is not None:  # masked-out entries are not part of the saved model
            arr = np.where(np.asarray(m), arr, np.zeros((), arr.dtype))
        if arr.dtype.kind in "fcV":
            finite = np.isfinite(arr.astype(np.float32) if arr.dtype.kind == "V" else arr)
            if not finite.all():
                nan = int(
                    np.isnan(
                        arr.astype(np.complex128 if arr.dtype.kind == "c" else np.float64)
                    ).sum()
                )
                raise ValueError(
                    f"cannot save leaf {p!r}: it holds {nan} NaN and "
                    f"{int(arr.size - finite.sum()) - nan} inf value(s); a model with non-finite "
                    "weights is broken, and sparse encodings would silently change it"
                )
        arrays.append(arr)
    index_of = {p: i for i, p in enumerate(paths)}
    structure = _describe(params, (), index_of)
    return paths, arrays, jax_flags, structure


def _plan(
    params: PyTree,
    *,
    format: str,
    masks: PyTree | None,
    activation: Callable | None,
    structural: bool = False,
) -> _Plan:
    """Decide every member of the file.

    ``structural=True`` (used by the size report) compacts by slicing only, without folding:
    the shapes and sizes are exact, the folded bias values are not.
    """
    format = _check_format(format)
    if format == "auto" and activation is not None:
        # compaction adds its unit indices to the file: keep it only where it pays
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
) -> _Plan:
    from prunejax.compact import compact, compaction_plan

    paths, arrays, jax_flags, structure = _prepare(params, masks)
    compaction = None
    kept: list[np.ndarray] = []
    if format == "compact" and activation is None and not structural:
        raise ValueError(
            "format='compact' needs activation= (the nonlinearity the model uses between layers): "
            "the constant outputs of dead units are folded into the next biases through it"
        )
    if do_compact:
        tree = jax.tree_util.tree_unflatten(
            jax.tree_util.tree_structure(params, is_leaf=is_matrix_object), arrays
        )
        layers = dense_layers(tree)
        if structural and activation is None:
            kept = compaction_plan(tree)
            rows = [np.arange(arrays[layers[0].kernel].shape[0])] + kept[:-1]
            new = list(arrays)
            for layer, r, c in zip(layers, rows, kept, strict=True):
                new[layer.kernel] = arrays[layer.kernel][np.ix_(r, c)]
                if layer.bias is not None:
                    new[layer.bias] = arrays[layer.bias][c]
        else:
            small, kept = compact(tree, activation=activation)
            new = [np.asarray(x) for x in jax.tree_util.tree_leaves(small)]
        compaction = {
            "activation": _activation_name(activation),
            "layers": [
                {
                    "name": layer.name,
                    "kernel": layer.kernel,
                    "bias": layer.bias,
                    "in": int(arrays[layer.kernel].shape[0]),
                    "out": int(arrays[layer.kernel].shape[1]),
                }
                for layer in layers
            ],
        }
        arrays = new
        kept = [
            k.astype(_index_dtype(max(lay["out"] - 1, 0)))
            for k, lay in zip(kept, compaction["layers"], strict=True)
        ]
    nnzs = [int(np.count_nonzero(a)) for a in arrays]
    encodings = []
    for i, (a, nnz) in enumerate(zip(arrays, nnzs, strict=True)):
        if format in ("dense", "compact"):
            enc = "dense"
        elif format == "auto":
            sizes = [leaf_bytes(e, a.shape, a.dtype, nnz, index=i) for e in ENCODINGS]
            enc = ENCODINGS[int(np.argmin(sizes))]
        else:
            enc = format if a.ndim >= 2 else "dense"
        encodings.append(enc)
    from prunejax import __version__

    header = {
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
                "dtype": _dtype_name(a.dtype),
                "array": "jax" if j else "numpy",
                "nnz": n,
            }
            for p, a, e, j, n in zip(paths, arrays, encodings, jax_flags, nnzs, strict=True)
        ],
        "compaction": compaction,
    }
    return _Plan(header=header, leaves=arrays, encodings=encodings, kept=kept)


# ----------------------------------------------------------------------------- save / load


def _npy(arr: np.ndarray) -> bytes:
    buf = _io.BytesIO()
    np.lib.format.write_array(buf, np.asarray(arr, order="C"), version=(1, 0), allow_pickle=False)
    return buf.getvalue()


def _zipinfo(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
    info.compress_type = zipfile.ZIP_STORED
    info.external_attr = 0o644 << 16
    return info


def save(
    path: str | os.PathLike,
    params: PyTree,
    *,
    format: str = "auto",
    masks: PyTree | None = None,
    activation: Callable | None = None,
) -> int:
    """Save pruned params in a small form (the file format is described in the module docstring).

    Args:
      path: destination file; written atomically (temporary file + ``os.replace``).  No suffix
        is added (``.npz`` is the conventional one).
      params: any pytree of arrays made of dicts, Flax ``FrozenDict``s, lists, tuples and
        ``None`` (Flax params, Keras ``get_weights()`` lists, ...).  Sparse kernel objects are
        saved densified.  Pruned weights are exact zeros, or pass ``masks``.
      format: ``"dense"``; ``"bitmask"``, ``"csr"`` or ``"bcoo"`` (for leaves with ``ndim >= 2``;
        other leaves are dense); ``"compact"`` (dead units removed, see ``prunejax.compact``;
        needs ``activation``); ``"auto"`` (alias ``"smallest"``): the smallest encoding per leaf,
        after compaction when ``activation`` is given and params are an MLP.
      masks: optional bool pytree of ``params``' structure (True = kept) applied before saving.
      activation: the model's nonlinearity between layers; required by ``"compact"`` and enables
        compaction in ``"auto"``.  There is no default: folding with a wrong activation would
        save a different model.

    Returns:
      The size of the written file in bytes.

    Raises:
      ValueError: unknown format, a NaN/inf weight (the message names the leaf), masks that do
        not match, ``"compact"`` without ``activation`` or on params that are not an MLP.
      TypeError: an unsupported container, dict key or dtype, or traced leaves.
    """
    plan = _plan(params, format=format, masks=masks, activation=activation)
    members: list[tuple[str, bytes]] = []
    for i, (arr, enc) in enumerate(zip(plan.leaves, plan.encodings, strict=True)):
        for role, a in zip(_ROLES[enc], _encode(enc, arr), strict=True):
            members.append((f"{i}.{role}", _npy(a)))
    for j, k in enumerate(plan.kept):
        members.append((f"kept.{j}", _npy(k)))
    expected = [n for n, _, _ in plan.members()]
    if [n for n, _ in members] != expected:  # pragma: no cover - internal consistency
        raise AssertionError("member list does not match the plan")
    header = dict(plan.header)
    digest = hashlib.sha256(_checksum_json(header))
    for name, data in members:
        digest.update(name.encode())
        digest.update(data)
    header["checksum"] = "sha256:" + digest.hexdigest()

    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(
        dir=directory, prefix="." + os.path.basename(path) + ".", suffix=".tmp"
    )
    try:
        with os.fdopen(fd, "wb") as f:
            with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
                zf.writestr(_zipinfo(HEADER_NAME), _header_json(header))
                for name, data in members:
                    zf.writestr(_zipinfo(name + ".npy"), data)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return os.path.getsize(path)


def _open(path: str | os.PathLike) -> tuple[dict, dict[str, bytes]]:
    """Read and verify a file: returns its header and the raw ``.npy`` bytes of every member."""
    where = os.fspath(path)
    try:
        with zipfile.ZipFile(where) as zf:
            names = zf.namelist()
            if HEADER_NAME not in names:
                raise FileFormatError(f"{where!r} is not a prunejax model file (no {HEADER_NAME})")
            raw_header = zf.read(HEADER_NAME)
            raw = {n[: -len(".npy")]: zf.read(n) for n in names if n != HEADER_NAME}
            extra = [n for n in names if n != HEADER_NAME and not n.endswith(".npy")]
    except zipfile.BadZipFile as e:
        raise FileFormatError(
            f"{where!r} is truncated or corrupted (not a readable ZIP archive: {e})"
        ) from None
    except (EOFError, zipfile.LargeZipFile, NotImplementedError) as e:
        raise FileFormatError(f"{where!r} is truncated or corrupted ({e})") from None
    if extra:
        raise FileFormatError(f"{where!r} holds unexpected members {extra[:5]}")
    try:
        header = json.loads(raw_header.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FileFormatError(f"{where!r} has a corrupted header ({e})") from None
    if not isinstance(header, dict) or header.get("magic") != MAGIC:
        raise FileFormatError(f"{where!r} is not a prunejax model file (bad magic)")
    version = header.get("format_version")
    if version != FORMAT_VERSION:
        from prunejax import __version__

        raise FileFormatError(
            f"{where!r} uses prunejax file format version {version!r} (written by prunejax "
            f"{header.get('library_version')!r}); this prunejax {__version__} reads format "
            f"version {FORMAT_VERSION} only"
        )
    try:
        expected = _expected_members(header)
    except (KeyError, TypeError, ValueError) as e:
        raise FileFormatError(
            f"{where!r} has a corrupted header ({type(e).__name__}: {e})"
        ) from None
    if sorted(raw) != sorted(n for n, _, _ in expected):
        raise FileFormatError(f"{where!r} is corrupted: its array members do not match its header")
    digest = hashlib.sha256(_checksum_json(header))
    for name, _, _ in expected:
        digest.update(name.encode())
        digest.update(raw[name])
    if header.get("checksum") != "sha256:" + digest.hexdigest():
        raise FileFormatError(f"{where!r} is corrupted: checksum mismatch")
    return header, raw


def _expected_members(header: dict) -> list[tuple[str, tuple[int, ...], np.dtype]]:
    out = []
    for i, leaf in enumerate(header["leaves"]):
        shape = tuple(int(s) for s in leaf["shape"])
        if any(s < 0 for s in shape) or leaf["dtype"] not in _DTYPES:
            raise ValueError(f"bad shape or dtype for leaf {i}")
        if leaf["encoding"] not in ENCODINGS:
            raise ValueError(f"unknown encoding {leaf['encoding']!r} for leaf {i}")
        nnz = int(leaf["nnz"])
        if not 0 <= nnz <= math.prod(shape):
            raise ValueError(f"bad nnz for leaf {i}")
        out += _leaf_members(i, leaf["encoding"], shape, _DTYPES[leaf["dtype"]], nnz)
    comp = header.get("compaction")
    if comp is not None:
        for j, lay in enumerate(comp["layers"]):
            n_kernel = header["leaves"][lay["kernel"]]["shape"][1]
            out.append((f"kept.{j}", (int(n_kernel),), _index_dtype(max(int(lay["out"]) - 1, 0))))
    return out


def load_header(path: str | os.PathLike) -> dict:
    """The verified JSON header of a saved file (format, leaves, compaction, versions).

    Raises:
      FileFormatError: the file is truncated, corrupted, of another format version, or not a
        prunejax file.
    """
    header, _ = _open(path)
    return header


def load(path: str | os.PathLike, *, expand: bool = False) -> PyTree:
    """Load params saved by ``save``.

    Args:
      path: the file.
      expand: for a compacted file, re-insert the removed units as zeros so every leaf gets its
        original shape (outputs stay identical: a re-inserted unit has no incoming or outgoing
        weights).  By default a compacted file loads compacted, the smaller and faster network.

    Returns:
      Dense params of the tree kind that was saved (dict / Flax FrozenDict / list / tuple), each
      leaf a JAX array if it was one when saved and a NumPy array otherwise, with the saved
      dtypes.  They produce the same outputs as the saved (masked) params.

    Raises:
      FileFormatError: (a ``ValueError``) truncated, corrupted or tampered file, a file format
        version this prunejax does not read, or not a prunejax file.  Nothing from the file is
        ever executed (no pickle).
    """
    header, raw = _open(path)
    where = os.fspath(path)
    arrays: dict[str, np.ndarray] = {}
    for name, shape, dtype in _expected_members(header):
        try:
            a = np.load(_io.BytesIO(raw[name]), allow_pickle=False)
        except ValueError as e:
            raise FileFormatError(
                f"{where!r}: member {name!r} is not a valid array ({e})"
            ) from None
        if a.shape != shape or a.dtype != dtype:
            raise FileFormatError(
                f"{where!r}: member {name!r} has shape {a.shape} and dtype {a.dtype}, "
                f"the header says {shape} and {dtype}"
            )
        arrays[name] = a
    leaves = []
    for i, leaf in enumerate(header["leaves"]):
        members = {r: arrays[f"{i}.{r}"] for r in _ROLES[leaf["encoding"]]}
        leaves.append(_decode(leaf, members, i))
    comp = header.get("compaction")
    if expand and comp is not None:
        leaves = _expand(leaves, comp, [arrays[f"kept.{j}"] for j in range(len(comp["layers"]))])
    leaves = [
        jnp.asarray(a) if meta["array"] == "jax" else a
        for a, meta in zip(leaves, header["leaves"], strict=True)
    ]
    used: set[int] = set()
    tree = _rebuild(header["structure"], leaves, used)
    if len(used) != len(leaves):
        raise FileFormatError(f"{where!r}: corrupted header (structure does not use every leaf)")
    return tree


def _expand(leaves: list[np.ndarray], comp: Mapping, kept: list[np.ndarray]) -> list[np.ndarray]:
    out = list(leaves)
    prev = None
    for lay, cols in zip(comp["layers"], kept, strict=True):
        cols = cols.astype(np.int64)
        rows = np.arange(lay["in"]) if prev is None else prev
        k = leaves[lay["kernel"]]
        if k.shape != (rows.size, cols.size) or np.any(cols >= lay["out"]):
            raise FileFormatError("corrupted header: compaction record does not fit the kernels")
        big = np.zeros((lay["in"], lay["out"]), k.dtype)
        big[np.ix_(rows, cols)] = k
        out[lay["kernel"]] = big
        if lay["bias"] is not None:
            b = leaves[lay["bias"]]
            full = np.zeros(lay["out"], b.dtype)
            full[cols] = b
            out[lay["bias"]] = full
        prev = cols
    return out
