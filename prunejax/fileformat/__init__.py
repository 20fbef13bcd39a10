"""Saving and loading pruned models in their small forms.

A pruned model is mostly zeros, yet ``np.savez`` of its params is as large as the dense model.
``save`` writes each leaf in a form that stores only what is needed, and ``load`` gives back params
of the same tree kind that produce identical outputs.

Modules: ``container`` (the safetensors file, its JSON headers and checksum: write, read, byte
counts), ``legacy`` (the hardened reader of version-1 ZIP files), ``encodings`` (per-leaf
encode/decode), ``dtypes``, ``structure`` (the pytree as JSON), ``compaction`` (compacted files),
``header`` and ``plan`` (the encoding of every leaf and the exact file size before writing;
``plan.leaf_bytes`` predicts one leaf), ``quantized`` (the encodings of quantized leaves) and
``entropy`` (canonical Huffman coding and relative indices), ``relative`` (the ``relative``
encoding).

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
* ``relative``: relative indices (the gaps between nonzero positions in C order, ``index_bits``
  per symbol with an escape for longer gaps, Han, Mao & Dally 2016, section 4), canonically
  Huffman-coded, in a ``uint8`` member ``indices``, plus the nonzero values in ``data``
  (``prunejax.fileformat.relative``); about the positions' entropy, e.g. 5 bits per index at 5%
  density where CSR spends 16.  Its size depends on where the nonzeros are, so ``auto``
  computes it per leaf.
* ``compact``: the whole MLP is first compacted (``prunejax.compact.compact``: dead units
  physically removed, constants folded into the next biases), then every leaf is dense.

Quantized leaves (``prunejax.quantize.Quantized``: codes into a shared codebook, Han, Mao & Dally
2016, "Deep Compression") are stored as codes and codebook in one ``uint8`` member ``blob``
(layouts in ``prunejax.fileformat.quantized``): ``qdense`` (every entry kept), ``qbitmask``,
``qrelative`` (relative indices of ``index_bits`` bits with an escape symbol for longer gaps,
fixed-width codes) and ``qhuffman`` (the same relative indices and the codes, each canonically
Huffman-coded, ``prunejax.fileformat.entropy``).  ``format="auto"`` picks the smallest per leaf
(and the best ``index_bits``); ``format="qbitmask"``/``"qrelative"``/``"qhuffman"`` force one for
the quantized leaves (others get their smallest plain encoding); any other format saves them
dequantized.  A quantized leaf loads as its exact dequantized values (``codebook[codes]`` at kept
entries, exact zeros elsewhere), or, with ``load(..., quantized=True)``, as the ``Quantized``
leaf, bit-exact.

Values: only finite weights are saved (``save`` refuses NaN and infinity, naming the leaf, so no
NaN ever travels in a file and nothing is there to propagate).  The sparse encodings keep the
entries ``!= 0``: a ``-0.0`` weight is a zero, not stored, and loads as ``+0.0`` (``dense`` and
``compact`` keep the sign).  Outputs differ only in the sign of an exactly-zero result.

File format (version 2; conventional extension ``EXTENSION`` = ``.safetensors``, e.g.
``model.safetensors``).  The file is a valid safetensors file (https://github.com/huggingface/
safetensors), so any safetensors reader opens its member arrays, and nothing in it is ever
executed:

* 8 bytes: the header length ``N`` (little-endian ``uint64``; ``load`` accepts at most
  ``container.MAX_HEADER_BYTES`` = 64 MiB).
* ``N`` bytes: the safetensors JSON header, padded with spaces to a multiple of 8.  One entry per
  member array, ``"<name>": {"dtype", "shape", "data_offsets": [begin, end]}`` (offsets into the
  data, written space-padded to 20 characters, so an entry's size never depends on its position),
  in data order, then ``"__metadata__": {"prunejax": <the prunejax header, JSON text>,
  "prunejax.sha256": <64 hex digits>}`` as the header's last entry.
* the data: the member payloads, contiguous, little-endian, widest dtype first, so every payload
  is aligned to its item size (memory-mappable).

Members: ``"<leaf index>.<role>"`` with roles ``data`` (dense), ``mask``/``values`` (bitmask),
``indptr``/``indices``/``data`` (csr), ``indices``/``data`` (bcoo and relative), ``blob``
(quantized encodings), plus ``kept.<layer>`` (the
original indices of the units each layer keeps) in compacted files.  Payloads are stored in
safetensors dtypes: ``bfloat16`` as its ``uint16`` bits (``U16``), complex values as pairs of
reals (a trailing axis of 2: real, imaginary; ``F32`` for ``complex64``, ``F64`` for
``complex128``).

The prunejax header is a JSON object with ``magic`` (``"prunejax"``), ``format_version``
(``2``), ``library_version``, ``format`` (the requested format), ``structure`` (the pytree, see
below), ``leaves`` (one entry per leaf in ``jax.tree_util`` flatten order: ``path`` such as
``"Dense_0/kernel"``, ``encoding``, ``shape``, ``dtype`` name, ``array`` = ``"numpy"`` or
``"jax"`` (the kind ``load`` gives back), ``nnz``; a quantized leaf adds ``codebook`` (its
size ``K``), ``kind``, ``index_bits`` and ``blob`` (the blob's bytes), and its ``nnz`` counts the
kept entries; a ``relative`` leaf adds ``index_bits`` and ``blob``, the bytes of its ``indices``)
and ``compaction`` (``null``, or
``{"activation", "layers": [{"name", "kernel", "bias", "in", "out"}]}`` with leaf indices and the
ORIGINAL layer widths), and, for params saved from an ``nnx.State``, an Equinox module or with
``layout="out_in"``, ``container`` (``plan_container``: the container kind, NNX ``Variable``
types, and the paths of the ``(out, in)`` kernels stored transposed).
``structure`` is a JSON tree of nodes ``{"dict": [[key, node], ...]}``
(keys are JSON strings or integers, one kind per dict), ``{"frozendict": [...]}`` (Flax
``FrozenDict``), ``{"list": [node, ...]}``, ``{"tuple": [...]}``, ``{"none": null}`` and
``{"leaf": index}``.

Checksum: ``prunejax.sha256`` is the SHA-256 of the whole file (length, header, metadata, padding
and data) with its own 64 digits read as ``"0"`` characters.  Any damaged byte fails it.

Safety (``load``, ``load_header``): only regular files are opened (``O_NONBLOCK`` and ``fstat``
first: a FIFO, directory or device raises at once).  Before anything is decoded, the header length
is bounded, JSON is parsed with bounded size and nesting depth (measured before parsing) and
duplicate keys are refused, the magic, version and checksum are verified, the safetensors offsets
are validated by the safetensors library, and every member's shape and dtype must be what the
prunejax header implies.  A quantized blob or relative index stream is decoded with work
bounded by the declared leaf, whatever the blob's length: it is unpacked chunk by chunk, and every
relative index symbol advances at least one entry, so decoding stops with an error as soon as the
indices pass the leaf (nothing is allocated beyond the declared leaf and one chunk); it is refused
unless it decodes to exactly ``nnz`` kept entries inside the leaf, codes inside the codebook, finite
centroids and zero padding.  Declared shapes are then checked against ``max_bytes``/``max_elements``
(after ``expand``), so a small file cannot make ``load`` allocate more than the caller allows
(default 64 MiB, or 256 times the file size for files over 256 KiB).  Index arrays are
bounds-checked while decoding.  Every failure raises ``FileFormatError`` (a ``ValueError``)
naming what is wrong; a file is never half-accepted.  ``save`` writes to a temporary file in the
destination directory and renames it into place (``prunejax._util.atomic_path``); temporary files
left by a killed writer are removed at the next write to the same path.

Version 1 (legacy, ``.pjz``/``.npz``): a ZIP archive of uncompressed ``.npy`` members behind a
``header.json`` whose ``checksum`` (``"sha256:<hex>"``) covers the header without its checksum
(sorted keys, no spaces) and every member's name and ``.npy`` bytes.  ``load`` still reads these
files, hardened the same way (``prunejax.fileformat.legacy``): compressed or encrypted members,
duplicate names, sizes beyond the file, oversized or deep or duplicate-keyed JSON and ``.npy``
headers that disagree with the prunejax header are refused before anything is inflated or
allocated.  ``save`` writes version 2 only; ``save(new, load(old))`` converts a file (a
compacted file loads compacted: pass ``load(old, expand=True)`` and ``format="compact"`` with the
model's ``activation=`` to keep its record of removed units).

File size: every member costs its payload and its header entry (name, dtype, shape and the two
20-character offsets, plus a comma); the file adds 8 bytes (the header length), the 2 bytes of
the header's outer braces, the metadata entry and up to 7 bytes of padding.
``prunejax.report.size_report`` uses this model.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from prunejax._util import (
    PyTree,
    Unwrapped,
    flatten,
    path_str,
    read_regular_file,
    rewrap_record,
    unwrap,
)
from prunejax.fileformat import compaction, container, legacy
from prunejax.fileformat.container import EXTENSION
from prunejax.fileformat.dtypes import DTYPES
from prunejax.fileformat.encodings import ROLES, decode, encode
from prunejax.fileformat.errors import FileFormatError
from prunejax.fileformat.header import header_members
from prunejax.fileformat.plan import FORMATS, Plan, plan_tree
from prunejax.fileformat.structure import rebuild_structure
from prunejax.quantize import Quantized, is_quantized

__all__ = [
    "DEFAULT_MIN_BYTES",
    "DEFAULT_RATIO",
    "EXTENSION",
    "FORMATS",
    "FileFormatError",
    "save",
    "load",
    "load_header",
    "plan_container",
]

#: ``load``'s default ``max_bytes`` is ``max(DEFAULT_MIN_BYTES, DEFAULT_RATIO * file size)``.
DEFAULT_MIN_BYTES = 64 * 2**20
DEFAULT_RATIO = 256


def save(
    path: str | os.PathLike,
    params: PyTree,
    *,
    format: str = "auto",
    masks: PyTree | None = None,
    activation: Callable | None = None,
    layout: str | None = None,
) -> int:
    """Save pruned params in a small form (the file format is described in the module docstring).

    Args:
      path: destination file; written atomically (temporary file + ``os.replace``).  No suffix
        is added (``EXTENSION``, ``.safetensors``, is the conventional one).
      params: any pytree of arrays made of dicts, Flax ``FrozenDict``s, lists, tuples and
        ``None`` (Flax params, Keras ``get_weights()`` lists, ...), a Flax NNX ``nnx.State`` or
        an Equinox module (its arrays; ``prunejax._util.unwrap``).  Sparse kernel objects are
        saved densified, ``prunejax.quantize.Quantized`` leaves as codes and codebook (in a
        plain tree, not in an ``(out, in)`` position: quantize the ``(in, out)`` tree).  Pruned
        weights are exact zeros, or pass ``masks`` (not with quantized leaves, which hold theirs).
      format: ``"dense"``; ``"bitmask"``, ``"csr"`` or ``"bcoo"`` (for leaves with ``ndim >= 2``;
        other leaves are dense); ``"compact"`` (dead units removed, see ``prunejax.compact``;
        needs ``activation``); ``"relative"`` (Huffman-coded relative indices, for leaves with
        ``ndim >= 2``); ``"auto"`` (alias ``"smallest"``): the smallest encoding per leaf,
        after compaction when ``activation`` is given and params are an MLP without quantized
        leaves; ``"qbitmask"``, ``"qrelative"``, ``"qhuffman"``: that encoding for quantized
        leaves (see the module docstring; the other formats save them dequantized).
      masks: optional bool pytree of ``params``' structure (True = kept) applied before saving.
      activation: the model's nonlinearity between layers; required by ``"compact"`` and enables
        compaction in ``"auto"``.  There is no default: folding with a wrong activation would
        save a different model.

    Returns:
      The size of the written file in bytes.

    Raises:
      ValueError: unknown format, a NaN/inf weight (the message names the leaf), masks that do
        not match, ``"compact"`` without ``activation`` or on params that are not an MLP, a
        ``Quantized`` leaf in an ``nnx.State``, Equinox module or ``layout="out_in"`` kernel.
      TypeError: an unsupported container, dict key or dtype, or traced leaves.
    """
    plan = plan_container(params, format=format, masks=masks, activation=activation, layout=layout)
    members: list[tuple[str, np.ndarray]] = []
    for i, (arr, enc, meta) in enumerate(
        zip(plan.leaves, plan.encodings, plan.header["leaves"], strict=True)
    ):
        parts = encode(enc, arr, index_bits=meta.get("index_bits"))
        for role, a in zip(ROLES[enc], parts, strict=True):
            members.append((f"{i}.{role}", a))
    for j, k in enumerate(plan.kept):
        members.append((f"kept.{j}", k))
    expected = [(n, tuple(s), np.dtype(d)) for n, s, d in plan.members()]
    if [(n, a.shape, a.dtype) for n, a in members] != expected:  # pragma: no cover - internal
        raise AssertionError("member list does not match the plan")
    return container.write(path, plan.header, members)


def plan_container(
    params: PyTree,
    *,
    format: str,
    masks: PyTree | None = None,
    activation: Callable | None = None,
    layout: str | None = None,
) -> Plan:
    """The plan of the file ``save`` writes for ``params`` of any container.

    The container (``nnx.State``, Equinox module, plain tree) is unwrapped to a plain tree of
    ``(in, out)`` kernels (``prunejax._util.unwrap``), planned by
    ``prunejax.fileformat.plan.plan_tree``, and its record goes into the header as
    ``"container"``: ``{"kind": "nnx.State", "variables": {path: Variable type}}``,
    ``{"kind": "equinox", "class", "out_in": [paths]}`` or ``{"kind": "tree", "out_in": [...]}``
    (absent for a plain tree with nothing transposed).

    Args:
      params, format, masks, activation, layout: as ``save``.

    Returns:
      The ``Plan``.
    """
    u = unwrap(params, layout=layout)
    _refuse_wrapped_quantized(params, u)
    mtree = None if masks is None else unwrap(masks, layout=layout).tree
    plan = plan_tree(u.tree, format=format, masks=mtree, activation=activation)
    if u.record is not None:
        plan.header["container"] = u.record
    return plan


def _refuse_wrapped_quantized(params: PyTree, u: Unwrapped) -> None:
    """Refuse ``Quantized`` leaves the container layer would take apart: any in an
    ``nnx.State`` or Equinox module, and any in an ``(out, in)`` position of a plain tree
    (``layout="out_in"``), whose codes and mask would be transposed as separate arrays.

    Raises:
      ValueError: naming the first such leaf.
    """
    flat = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_quantized)[0]
    qpaths = [path_str(kp) for kp, leaf in flat if is_quantized(leaf)]
    for p in qpaths:
        if u.kind != "tree" or any(o == p or o.startswith(p + "/") for o in u.out_in):
            where = {"nnx.State": "an nnx.State", "equinox": "an Equinox module"}.get(
                u.kind, "an (out, in) position (layout='out_in')"
            )
            raise ValueError(
                f"cannot save Quantized leaf {p!r} in {where}: quantized leaves are saved only "
                "as (in, out) kernels of a plain tree; quantize the unwrapped (in, out) tree, "
                "or dequantize first"
            )


def _read(path: str | os.PathLike) -> tuple[dict, dict[str, np.ndarray], int]:
    """Header, member arrays and file size of a file of either container (all verified)."""
    where = os.fspath(path)
    data = read_regular_file(path, error=FileFormatError, what="prunejax model file")
    if legacy.is_legacy(data):
        header, arrays = legacy.read(
            where, data, lambda h: header_members(h, version=container.LEGACY_VERSION)
        )
    else:
        header, arrays = container.read(where, data, header_members)
    return header, arrays, len(data)


def load_header(path: str | os.PathLike) -> dict:
    """The verified JSON header of a saved file (format, leaves, compaction, versions).

    Args:
      path: the file (the safetensors container, or a legacy version-1 ZIP file).

    Returns:
      The header (the keys of the module docstring, and ``checksum``).

    Raises:
      FileFormatError: the file is not a regular file, is truncated, corrupted, of another format
        version, or not a prunejax file.
    """
    header, _, _ = _read(path)
    return header


def _loaded_shapes(header: dict, expand: bool) -> list[tuple[int, ...]]:
    """The shape of every leaf as ``load`` returns it."""
    shapes = [tuple(leaf["shape"]) for leaf in header["leaves"]]
    if expand:
        for lay in compaction.check_record(header):
            shapes[lay["kernel"]] = (lay["in"], lay["out"])
            if lay["bias"] is not None:
                shapes[lay["bias"]] = (lay["out"],)
    return shapes


def check_budget(
    where: str,
    header: dict,
    *,
    expand: bool,
    max_bytes: int | None,
    max_elements: int | None,
    file_size: int,
) -> None:
    """Refuse a file whose loaded params would exceed the limits, before anything is allocated.

    Args:
      where: the file (for messages).
      header: its verified header.
      expand, max_bytes, max_elements: as ``load``.
      file_size: the file's size in bytes (for the default ``max_bytes``).

    Raises:
      FileFormatError: a leaf that takes the loaded params past a limit (the message names it).
    """
    limit = max(DEFAULT_MIN_BYTES, DEFAULT_RATIO * file_size) if max_bytes is None else max_bytes
    total_b = total_e = 0
    for i, (leaf, shape) in enumerate(
        zip(header["leaves"], _loaded_shapes(header, expand), strict=True)
    ):
        n = math.prod(shape)
        total_e += n
        total_b += n * DTYPES[leaf["dtype"]].itemsize
        what = None
        if total_b > limit:
            what = f"max_bytes={limit:,} ({total_b:,} bytes so far)"
        elif max_elements is not None and total_e > max_elements:
            what = f"max_elements={max_elements:,} ({total_e:,} entries so far)"
        if what is not None:
            raise FileFormatError(
                f"{where!r}: leaf {i} ({leaf['path']!r}) of shape {list(shape)} and dtype "
                f"{leaf['dtype']} takes the loaded params past {what}; a file this small "
                "cannot legitimately hold it unless it is extremely sparse (pass a larger "
                "max_bytes=/max_elements= if you trust the file)"
            )


def _as_kind(where: str, i: int, a: object, meta: dict) -> object:
    """A decoded leaf as the array kind it was saved as (JAX arrays keep their dtype or raise)."""
    if meta["array"] != "jax":
        return a
    if isinstance(a, Quantized):
        return Quantized(
            codes=jnp.asarray(a.codes),
            codebook=jnp.asarray(a.codebook),
            mask=jnp.asarray(a.mask),
            dtype=a.dtype,
            kind=a.kind,
        )
    out = jnp.asarray(a)
    if out.dtype != a.dtype:
        raise FileFormatError(
            f"{where!r}: leaf {i} ({meta['path']!r}) is a {a.dtype} JAX array, which this JAX "
            f"configuration would silently turn into {out.dtype} (enable jax_enable_x64 to load it)"
        )
    return out


def _check_limit(value: int | None, name: str) -> None:
    if value is not None and (
        not isinstance(value, int | np.integer) or isinstance(value, bool) or value < 0
    ):
        raise TypeError(f"{name} must be a non-negative int or None, got {value!r}")


def _decode_leaves(
    where: str, header: dict, arrays: dict, version: int, quantized: bool
) -> list[object]:
    """Every leaf of a verified file, decoded (any failure is a ``FileFormatError``)."""
    leaves = []
    for i, leaf in enumerate(header["leaves"]):
        members = {r: arrays[f"{i}.{r}"] for r in ROLES[leaf["encoding"]]}
        try:
            leaves.append(decode(leaf, members, i, version=version, quantized=quantized))
        except (ValueError, TypeError, IndexError) as e:
            if isinstance(e, FileFormatError):
                raise FileFormatError(f"{where!r}: {e}") from None
            raise FileFormatError(
                f"{where!r}: corrupted file: leaf {i} ({leaf['path']!r}) cannot be decoded ({e})"
            ) from None
    return leaves


def load(
    path: str | os.PathLike,
    *,
    expand: bool = False,
    max_bytes: int | None = None,
    max_elements: int | None = None,
    like: PyTree | None = None,
    quantized: bool = False,
) -> PyTree:
    """Load params saved by ``save`` (or a legacy version-1 ``.pjz``/``.npz`` ZIP file).

    Args:
      path: the file; it must be a regular file (a FIFO, directory or device raises at once).
      expand: for a compacted file, re-insert the removed units as zeros so every leaf gets its
        original shape (outputs stay identical: a re-inserted unit has no incoming or outgoing
        weights).  By default a compacted file loads compacted, the smaller and faster network.
      max_bytes: the most bytes the loaded params (every leaf, dense, after ``expand``) may take.
        Checked on the header before anything is decoded.  ``None`` (default):
        ``max(DEFAULT_MIN_BYTES, DEFAULT_RATIO * file size)``, i.e. 64 MiB, or 256 times the
        file for files over 256 KiB; a sparse file whose weights expand further needs an explicit
        limit.
      max_elements: the most entries the loaded params may hold in total (``None``: no limit
        besides ``max_bytes``).
      like: a template of the saved container, whose leaf paths must be the file's (needed to
        get an Equinox module back, as in ``eqx.tree_deserialise_leaves``: the file holds no
        code; optional for an ``nnx.State``; a plain tree takes the file's ``(out, in)``
        kernels); shapes may differ (a compacted file).
      quantized: give quantized leaves back as ``prunejax.quantize.Quantized`` (bit-exact codes,
        codebook and mask) instead of their dequantized values.

    Returns:
      Dense params of the container kind that was saved (dict / Flax FrozenDict / list / tuple /
      ``nnx.State`` with the saved ``Variable`` types; an Equinox module with ``like``, else its
      arrays as a nested dict keyed by attribute names, ``(out, in)`` weights as saved), each
      leaf a JAX array if it was one when saved and a NumPy array otherwise, with the saved
      dtypes.  They produce the same outputs as the saved (masked) params; a quantized leaf
      loads as ``prunejax.quantize.dequantize`` of it (exact centroids, exact zeros), or as the
      ``Quantized`` leaf itself with ``quantized=True``.

    Raises:
      FileFormatError: (a ``ValueError``) not a regular file; a truncated, corrupted or
        tampered file; declared shapes beyond the limits (naming the leaf); a file format
        version this prunejax does not read; not a prunejax file.  Nothing from the file is ever
        executed (no pickle).
      TypeError: a bad ``max_bytes``/``max_elements``.
    """
    _check_limit(max_bytes, "max_bytes")
    _check_limit(max_elements, "max_elements")
    if not isinstance(quantized, bool):
        raise TypeError(f"quantized must be a bool, got {quantized!r}")
    where = os.fspath(path)
    header, arrays, size = _read(path)
    version = header["format_version"]
    check_budget(
        where,
        header,
        expand=expand,
        max_bytes=max_bytes,
        max_elements=max_elements,
        file_size=size,
    )
    leaves = _decode_leaves(where, header, arrays, version, quantized)
    comp = header.get("compaction")
    if expand and comp is not None:
        kept = [arrays[f"kept.{j}"] for j in range(len(comp["layers"]))]
        try:
            leaves = compaction.expand(leaves, comp, kept)
        except FileFormatError as e:
            raise FileFormatError(f"{where!r}: {e}") from None
    leaves = [
        _as_kind(where, i, a, meta) for i, (a, meta) in enumerate(zip(leaves, header["leaves"]))
    ]
    used: set[int] = set()
    try:
        tree = rebuild_structure(header.get("structure"), leaves, used)
    except FileFormatError as e:
        raise FileFormatError(f"{where!r}: {e}") from None
    if len(used) != len(leaves):
        raise FileFormatError(f"{where!r}: corrupted header (structure does not use every leaf)")
    return _rewrap(where, header.get("container"), tree, like)


def _rewrap(where: str, record: object, tree: PyTree, like: PyTree | None) -> PyTree:
    """The loaded plain tree in its saved container (``like`` as the template, if given)."""
    if like is None:
        try:
            return rewrap_record(record, tree)
        except ValueError as e:
            raise FileFormatError(f"{where!r}: corrupted header: {e}") from None
    u = unwrap(like)
    saved = record.get("out_in", []) if isinstance(record, dict) else []
    # a plain template (no Equinox layer) says nothing of the layout: the file's record does
    plain = u.kind == "tree" and not u.out_in
    if not plain and sorted(u.out_in) != saved:
        raise ValueError(
            f"{where!r}: like= has (out, in) kernels at {sorted(u.out_in)}, but the file stored "
            f"{saved} transposed; pass a template of the saved model"
        )
    have = set(flatten(tree)[0])
    want = set(flatten(u.tree)[0])
    if have != want:
        raise ValueError(
            f"{where!r}: like= does not match the file: leaves missing from the file "
            f"{sorted(want - have)[:5]}, not in like= {sorted(have - want)[:5]}"
        )
    if plain and saved:
        try:
            return rewrap_record({"kind": "tree", "out_in": saved}, tree)
        except ValueError as e:
            raise FileFormatError(f"{where!r}: corrupted header: {e}") from None
    return u.rewrap(tree)
