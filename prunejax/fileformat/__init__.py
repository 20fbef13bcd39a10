"""Saving and loading pruned models in their small forms.

A pruned model is mostly zeros, yet ``np.savez`` of its params is as large as the dense model.
``save`` writes each leaf in a form that stores only what is needed, and ``load`` gives back params
of the same tree kind that produce identical outputs.

Modules: ``container`` (the ZIP archive, its JSON header and checksum: write, read, byte counts),
``encodings`` (per-leaf encode/decode), ``dtypes``, ``structure`` (the pytree as JSON),
``compaction`` (compacted files), ``header`` and ``plan`` (the encoding of every leaf and the exact
file size before writing; ``plan.leaf_bytes`` predicts one leaf).

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

import os
from collections.abc import Callable

import jax.numpy as jnp
import numpy as np

from prunejax._util import PyTree
from prunejax.fileformat import compaction, container
from prunejax.fileformat.encodings import ROLES, decode, encode
from prunejax.fileformat.errors import FileFormatError
from prunejax.fileformat.header import header_members
from prunejax.fileformat.plan import FORMATS, plan_tree
from prunejax.fileformat.structure import rebuild_structure

__all__ = ["FORMATS", "FileFormatError", "save", "load", "load_header"]


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
    plan = plan_tree(params, format=format, masks=masks, activation=activation)
    members: list[tuple[str, bytes]] = []
    for i, (arr, enc) in enumerate(zip(plan.leaves, plan.encodings, strict=True)):
        for role, a in zip(ROLES[enc], encode(enc, arr), strict=True):
            members.append((f"{i}.{role}", container.npy_bytes(a)))
    for j, k in enumerate(plan.kept):
        members.append((f"kept.{j}", container.npy_bytes(k)))
    expected = [n for n, _, _ in plan.members()]
    if [n for n, _ in members] != expected:  # pragma: no cover - internal consistency
        raise AssertionError("member list does not match the plan")
    return container.write(path, plan.header, members)


def _read(path: str | os.PathLike) -> tuple[dict, dict[str, bytes]]:
    return container.read(path, lambda header: [n for n, _, _ in header_members(header)])


def load_header(path: str | os.PathLike) -> dict:
    """The verified JSON header of a saved file (format, leaves, compaction, versions).

    Args:
      path: the file.

    Returns:
      The header (the keys of the module docstring).

    Raises:
      FileFormatError: the file is truncated, corrupted, of another format version, or not a
        prunejax file.
    """
    header, _ = _read(path)
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
    header, raw = _read(path)
    where = os.fspath(path)
    arrays: dict[str, np.ndarray] = {
        name: container.read_array(where, name, raw[name], shape, dtype)
        for name, shape, dtype in header_members(header)
    }
    leaves = []
    for i, leaf in enumerate(header["leaves"]):
        members = {r: arrays[f"{i}.{r}"] for r in ROLES[leaf["encoding"]]}
        leaves.append(decode(leaf, members, i))
    comp = header.get("compaction")
    if expand and comp is not None:
        kept = [arrays[f"kept.{j}"] for j in range(len(comp["layers"]))]
        leaves = compaction.expand(leaves, comp, kept)
    leaves = [
        jnp.asarray(a) if meta["array"] == "jax" else a
        for a, meta in zip(leaves, header["leaves"], strict=True)
    ]
    used: set[int] = set()
    tree = rebuild_structure(header["structure"], leaves, used)
    if len(used) != len(leaves):
        raise FileFormatError(f"{where!r}: corrupted header (structure does not use every leaf)")
    return tree
