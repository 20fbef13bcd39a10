"""How small and how cheap a pruned model really is: bytes per format, file sizes and FLOPs.

``size_report`` answers, per dense layer and in total: how many weights survive, how many bytes
each storage form takes in a file written by ``prunejax.fileformat.save`` (dense, dense+bitmask,
CSR, BCOO, compacted, and the per-leaf smallest), the density below which each sparse form beats
dense, how many FLOPs one example costs dense, sparse and compacted, and how large the saved file
really is.

Byte counts are exact file bytes, not payload estimates: every member of the safetensors file
costs its payload and its entry in the file's JSON header (about 100 bytes: name, dtype, shape and
two data offsets padded to 20 digits each, so the entry's size does not depend on where the
member lies); a file adds its 8-byte header length, the prunejax header (JSON, stored as a string
in the safetensors metadata) with its SHA-256, and up to 7 spaces of padding (see
``prunejax.fileformat``).  The predicted size of each whole file (``prunejax.fileformat.plan``)
therefore matches ``save``'s output to the byte, which the tests check.

FLOPs per example count multiply-adds as 2 FLOPs and ignore biases and activations: ``2 * in *
out`` for a dense layer, ``2 * nnz`` for a sparse kernel (Han et al. 2015, "Learning both Weights
and Connections for Efficient Neural Networks", Table 1 convention), ``2 * in' * out'`` for the
compacted kernel.  A conv kernel (``ndim >= 3``: Flax ``(h, w, in, out)``, PyTorch/Equinox
``(out, in, h, w)``) costs those FLOPs at every output position: ``2 * kernel.size * H' * W'``
(dense), ``2 * nnz * H' * W'`` (sparse), with ``H' x W'`` the layer's output spatial size.  The
parameters alone do not say it (it depends on the input size, strides and padding), so
``size_report(spatial={"Conv_0": (26, 26), ...})`` takes it per conv layer (``conv_spatial``
finds it by tracing the model on an example input); without it a conv
layer's FLOPs (and the totals) are ``None``, never a guess.  Taps on padding are counted, as
most FLOP counters do (XLA's cost analysis leaves them out of ``SAME`` convs).
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np

from prunejax._util import PyTree, dense_layers, flatten, is_int
from prunejax.fileformat import EXTENSION, load_header, save
from prunejax.fileformat.plan import Plan, check_format, leaf_bytes, plan_tree

__all__ = ["LayerSize", "SizeReport", "conv_spatial", "size_report"]

#: The per-layer byte columns of the report, in display order.
COLUMNS = ("dense", "bitmask", "csr", "bcoo", "compact", "auto")
_SPARSE = ("bitmask", "csr", "bcoo")


@dataclass(frozen=True)
class LayerSize:
    """One row of a ``SizeReport``: a dense layer (kernel + bias) or a leaf outside any layer.

    Attributes:
      name: the layer name (``"Dense_0"``, or the kernel's path for Keras lists) or leaf path.
      paths: the leaf paths the row covers.
      shape: the kernel's shape (the leaf's shape for rows that are not layers).
      params: number of entries (kernel + bias).
      nnz: number of nonzero entries (after masks).
      dense_bytes: raw dense payload, ``params * itemsize``.
      bytes: file bytes of the row's members in each format of ``COLUMNS`` (``None`` for
        ``"compact"`` when params are not a compactable MLP).
      auto_encodings: the encoding ``format="auto"`` picks for each leaf.
      compact_shape: the kernel's shape after compaction (``None`` if not compactable).
      flops_dense, flops_sparse, flops_compact: FLOPs per example (0 for non-layer rows;
        ``None`` for a conv layer whose output spatial size was not given).
      break_even: per sparse format, the largest density at which the kernel in that format
        takes no more file bytes than dense (0.0: never).
    """

    name: str
    paths: tuple[str, ...]
    shape: tuple[int, ...]
    params: int
    nnz: int
    dense_bytes: int
    bytes: dict[str, int | None]
    auto_encodings: tuple[str, ...]
    compact_shape: tuple[int, ...] | None
    flops_dense: int | None
    flops_sparse: int | None
    flops_compact: int | None
    break_even: dict[str, float]

    @property
    def density(self) -> float:
        return self.nnz / self.params if self.params else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "paths": list(self.paths),
            "shape": list(self.shape),
            "params": self.params,
            "nnz": self.nnz,
            "density": self.density,
            "dense_bytes": self.dense_bytes,
            "bytes": dict(self.bytes),
            "auto_encodings": list(self.auto_encodings),
            "compact_shape": None if self.compact_shape is None else list(self.compact_shape),
            "flops_dense": self.flops_dense,
            "flops_sparse": self.flops_sparse,
            "flops_compact": self.flops_compact,
            "break_even": dict(self.break_even),
        }


@dataclass(frozen=True)
class SizeReport:
    """The result of ``size_report``: per-layer rows, totals and whole-file sizes.

    Attributes:
      layers: one ``LayerSize`` per dense layer (forward order), then one per other leaf.
      predicted_file_bytes: exact size of the file ``prunejax.fileformat.save`` writes in each
        format of ``COLUMNS`` (JSON header and container overhead included; ``None`` where the
        format does not apply).
      file_format: the format of the measured file.
      file_bytes: the measured size of that file.
      file_path: the measured file's path (``None`` when a temporary file was used).
    """

    layers: list[LayerSize]
    predicted_file_bytes: dict[str, int | None]
    file_format: str
    file_bytes: int
    file_path: str | None

    def total(self) -> dict[str, Any]:
        """Sums over all rows (``None`` propagates for the compacted columns)."""

        def tot(values: list[int | None]) -> int | None:
            return None if any(v is None for v in values) else int(sum(values))  # type: ignore[arg-type]

        params = sum(r.params for r in self.layers)
        nnz = sum(r.nnz for r in self.layers)
        return {
            "params": params,
            "nnz": nnz,
            "density": nnz / params if params else 0.0,
            "dense_bytes": sum(r.dense_bytes for r in self.layers),
            "bytes": {c: tot([r.bytes[c] for r in self.layers]) for c in COLUMNS},
            "flops_dense": tot([r.flops_dense for r in self.layers]),
            "flops_sparse": tot([r.flops_sparse for r in self.layers]),
            "flops_compact": tot([r.flops_compact for r in self.layers]),
        }

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict of everything in the report."""
        return {
            "layers": [r.to_dict() for r in self.layers],
            "total": self.total(),
            "predicted_file_bytes": dict(self.predicted_file_bytes),
            "file": {
                "format": self.file_format,
                "bytes": self.file_bytes,
                "path": self.file_path,
                "predicted_bytes": self.predicted_file_bytes.get(self.file_format),
            },
        }

    def __str__(self) -> str:
        def kb(b: int | None) -> str:
            return "-" if b is None else f"{b / 1000:,.1f}k"

        def fl(f: int | None) -> str:
            return "-" if f is None else f"{f:,}"

        head = ["layer", "shape", "params", "nnz", "density", *COLUMNS]
        head += ["FLOPs dense", "FLOPs sparse", "FLOPs compact"]
        rows = []
        for r in self.layers:
            rows.append(
                [
                    r.name,
                    "x".join(map(str, r.shape)),
                    f"{r.params:,}",
                    f"{r.nnz:,}",
                    f"{100 * r.density:.1f}%",
                    *(kb(r.bytes[c]) for c in COLUMNS),
                    fl(r.flops_dense),
                    fl(r.flops_sparse),
                    fl(r.flops_compact),
                ]
            )
        t = self.total()
        rows.append(
            [
                "total",
                "",
                f"{t['params']:,}",
                f"{t['nnz']:,}",
                f"{100 * t['density']:.1f}%",
                *(kb(t["bytes"][c]) for c in COLUMNS),
                fl(t["flops_dense"]),
                fl(t["flops_sparse"]),
                fl(t["flops_compact"]),
            ]
        )
        rows.append(
            ["whole file", "", "", "", "", *(kb(self.predicted_file_bytes[c]) for c in COLUMNS)]
            + ["", "", ""]
        )
        widths = [max(len(str(x[i])) for x in [head, *rows]) for i in range(len(head))]
        lines = ["Size report (bytes are file bytes, k = 1000; FLOPs per example)"]
        for line in [head, *rows]:
            cells = [
                str(c).ljust(w) if i == 0 else str(c).rjust(w)
                for i, (c, w) in enumerate(zip(line, widths, strict=True))
            ]
            lines.append("  ".join(cells).rstrip())
        lines.append("")
        lines.append("Break-even density (largest density at which the format is no larger):")
        for r in self.layers:
            if r.break_even:
                parts = ", ".join(f"{f} {100 * d:.1f}%" for f, d in r.break_even.items())
                lines.append(f"  {r.name}: {parts}")
        dense_file = self.predicted_file_bytes["dense"]
        pred = self.predicted_file_bytes.get(self.file_format)
        where = self.file_path if self.file_path is not None else "temporary file"
        lines.append("")
        lines.append(
            f"Saved file ({where}, format={self.file_format!r}): {self.file_bytes:,} bytes"
            + (f" (predicted {pred:,})" if pred is not None else "")
            + (
                f", {100 * self.file_bytes / dense_file:.1f}% of the dense file"
                if dense_file
                else ""
            )
        )
        return "\n".join(lines)


def _break_even(fmt: str, shape: tuple[int, ...], dtype: np.dtype, index: int) -> float:
    """Largest density at which ``fmt`` takes no more file bytes than dense (binary search)."""
    size = math.prod(shape)
    if size == 0:
        return 0.0
    dense = leaf_bytes("dense", shape, dtype, 0, index=index)
    if leaf_bytes(fmt, shape, dtype, 0, index=index) > dense:
        return 0.0
    lo, hi = 0, size  # invariant: bytes(lo) <= dense
    if leaf_bytes(fmt, shape, dtype, hi, index=index) <= dense:
        return 1.0
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if leaf_bytes(fmt, shape, dtype, mid, index=index) <= dense:
            lo = mid
        else:
            hi = mid
    return lo / size


def _plans(
    params: PyTree, masks: PyTree | None, activation: Callable | None
) -> dict[str, Plan | None]:
    """The plan of the file in each format of ``COLUMNS`` (``None``: not a compactable MLP)."""
    plans: dict[str, Plan | None] = {}
    for fmt in ("dense", "bitmask", "csr", "bcoo", "auto"):
        plans[fmt] = plan_tree(params, format=fmt, masks=masks, activation=activation)
    try:
        plans["compact"] = plan_tree(
            params, format="compact", masks=masks, activation=activation, structural=True
        )
    except ValueError:
        plans["compact"] = None
    return plans


def _row_groups(params: PyTree, paths: list[str]) -> list[tuple[str, list[int], int | None]]:
    """``(name, leaf indices, kernel index or None)`` of every row: dense layers, then the rest."""
    try:
        layers = dense_layers(params, conv=True)
    except (ValueError, TypeError):
        layers = []
    groups: list[tuple[str, list[int], int | None]] = []
    owned: set[int] = set()
    for layer in layers:
        idx = [layer.kernel] + ([layer.bias] if layer.bias is not None else [])
        owned.update(idx)
        groups.append((layer.name, idx, layer.kernel))
    for i, p in enumerate(paths):
        if i not in owned:
            groups.append((p, [i], None))
    return groups


def _sub_jaxprs(eqn: Any) -> list[Any]:
    """The jaxprs an equation calls (``jit``, ``custom_jvp_call``, ``closed_call``, ...)."""
    subs = []
    for v in eqn.params.values():
        for x in v if isinstance(v, tuple | list) else (v,):
            inner = getattr(x, "jaxpr", x)
            if hasattr(inner, "eqns") and hasattr(inner, "invars"):
                subs.append(inner)
    return subs


def _walk_convs(jaxpr: Any, leaf_of: dict, out: dict[str, tuple[int, ...]]) -> None:
    """Record the output spatial size of every conv whose kernel is a params leaf."""
    for eqn in jaxpr.eqns:
        ins = [None if hasattr(v, "val") else leaf_of.get(v) for v in eqn.invars]
        name = eqn.primitive.name
        if name == "convert_element_type" and ins[0] is not None:
            leaf_of[eqn.outvars[0]] = ins[0]
        elif name == "conv_general_dilated" and ins[1] is not None:
            spec = eqn.params["dimension_numbers"].out_spec
            size = tuple(int(eqn.outvars[0].aval.shape[d]) for d in spec[2:])
            if out.setdefault(ins[1], size) != size:
                raise ValueError(
                    f"conv kernel {ins[1]!r} is used at two output sizes, {out[ins[1]]} and "
                    f"{size}; pass size_report(spatial=...) with the sum of their positions"
                )
        for sub in _sub_jaxprs(eqn):
            if len(sub.invars) == len(eqn.invars):
                inner = {v: p for v, p in zip(sub.invars, ins, strict=True) if p is not None}
                _walk_convs(sub, inner, out)


def conv_spatial(fn: Callable[..., Any], params: PyTree, *args: Any) -> dict[str, tuple[int, ...]]:
    """The output spatial size of every conv kernel in ``params``, for ``size_report(spatial=)``.

    Traces ``fn(params, *args)`` to a jaxpr (nothing is computed) and reads the output shape of
    each ``conv_general_dilated`` whose kernel is a leaf of ``params`` (directly or cast).

    Args:
      fn: the model's forward function taking ``params`` first, e.g.
        ``lambda p, x: model.apply({"params": p}, x)`` (Flax) or
        ``lambda p, x: eqx.combine(p, static)(x)`` (Equinox).
      params: the params pytree ``size_report`` gets.
      *args: example inputs (arrays or ``jax.ShapeDtypeStruct``), batch size irrelevant.

    Returns:
      ``{kernel path: (H', W', ...)}``.

    Raises:
      ValueError: a kernel is used by convs of two different output sizes.
    """
    paths = flatten(params)[0]
    jaxpr = jax.make_jaxpr(fn)(params, *args).jaxpr
    out: dict[str, tuple[int, ...]] = {}
    _walk_convs(jaxpr, dict(zip(jaxpr.invars[: len(paths)], paths, strict=True)), out)
    return out


def _positions(name: str, path: str, shape: tuple[int, ...], spatial: Mapping) -> int | None:
    """Output positions of a layer: 1 for a 2-D kernel, ``prod(spatial[name])`` for a conv
    kernel (``None`` when not given)."""
    if len(shape) == 2:
        return 1
    size = spatial.get(name, spatial.get(path))
    if size is None:
        return None
    return math.prod(size)


def _check_spatial(
    spatial: Mapping,
    rows: list[tuple[str, list[int], int | None]],
    paths: list[str],
    leaves: list[Any],
) -> None:
    """``spatial`` as ``{layer name or kernel path: output spatial size}``, checked."""
    if not isinstance(spatial, Mapping):
        raise TypeError(
            f"spatial must be a mapping of conv layer -> (H', W'), got {type(spatial).__name__}"
        )
    convs = {}
    for name, _, k in rows:
        if k is not None and np.ndim(leaves[k]) >= 3:
            convs[name] = convs[paths[k]] = np.ndim(leaves[k]) - 2
    for key, size in spatial.items():
        if key not in convs:
            raise ValueError(
                f"spatial names {key!r}, which is not a conv layer of params "
                f"(conv layers: {sorted(n for n in convs if '/' not in n) or 'none'})"
            )
        ok = isinstance(size, tuple | list) and len(size) == convs[key]
        if not ok or not all(is_int(v) and v > 0 for v in size):
            raise ValueError(
                f"spatial[{key!r}] must be the output spatial size, {convs[key]} positive "
                f"int(s) for this kernel, got {size!r}"
            )


def _row(
    name: str,
    idx: list[int],
    kernel: int | None,
    plans: dict[str, Plan | None],
    member_bytes: dict[str, list[int] | None],
    spatial: Mapping,
) -> LayerSize:
    """The ``LayerSize`` of one row (leaves ``idx``; ``kernel`` is None for non-layer rows)."""
    dense_plan = plans["dense"]
    meta, leaves = dense_plan.header["leaves"], dense_plan.leaves
    compact_leaves = None if plans["compact"] is None else plans["compact"].leaves
    b: dict[str, int | None] = {}
    for fmt in COLUMNS:
        mb = member_bytes[fmt]
        b[fmt] = None if mb is None else int(sum(mb[i] for i in idx))
    cshape = None
    if compact_leaves is not None and kernel is not None:
        cshape = tuple(compact_leaves[kernel].shape)
    if kernel is not None:
        k = leaves[kernel]
        pos = _positions(name, meta[kernel]["path"], k.shape, spatial)
        flops_dense = None if pos is None else 2 * k.size * pos
        flops_sparse = None if pos is None else 2 * meta[kernel]["nnz"] * pos
        flops_compact = None if cshape is None or pos is None else 2 * math.prod(cshape) * pos
        be = {f: _break_even(f, k.shape, k.dtype, kernel) for f in _SPARSE}
    else:
        flops_dense = flops_sparse = 0
        flops_compact = None if compact_leaves is None else 0
        be = {}
    return LayerSize(
        name=name,
        paths=tuple(meta[i]["path"] for i in idx),
        shape=tuple(leaves[kernel if kernel is not None else idx[0]].shape),
        params=int(sum(leaves[i].size for i in idx)),
        nnz=int(sum(meta[i]["nnz"] for i in idx)),
        dense_bytes=int(sum(leaves[i].nbytes for i in idx)),
        bytes=b,
        auto_encodings=tuple(plans["auto"].encodings[i] for i in idx),
        compact_shape=cshape,
        flops_dense=None if flops_dense is None else int(flops_dense),
        flops_sparse=None if flops_sparse is None else int(flops_sparse),
        flops_compact=flops_compact,
        break_even=be,
    )


def size_report(
    params: PyTree,
    *,
    masks: PyTree | None = None,
    path: str | os.PathLike | None = None,
    activation: Callable | None = None,
    format: str = "auto",
    spatial: Mapping[str, tuple[int, ...]] | None = None,
) -> SizeReport:
    """Per-layer and total sizes, break-even densities, FLOPs and file sizes of a pruned model.

    Args:
      params: a params pytree (any pytree ``prunejax.fileformat.save`` accepts); rows are its
        dense layers (``prunejax._util.dense_layers``) plus one row per other leaf.
      masks: optional bool pytree of ``params``' structure (True = kept), applied first.
      path: a file written by ``prunejax.fileformat.save`` to measure; by default the params are
        saved in ``format`` to a temporary file that is measured and deleted.
      activation: the model's nonlinearity; passed to ``save`` (it enables compaction in
        ``"auto"``).  Compacted sizes and FLOPs do not depend on it (which units die depends only
        on the zeros), so the ``"compact"`` column is filled either way for an MLP.
      format: the format of the temporary file that is measured when ``path`` is None.
      spatial: the output spatial size of each conv layer, by layer name or kernel path
        (``{"Conv_0": (26, 26), "Conv_1": (24, 24)}``), for its FLOPs; conv layers it does not
        name get ``None`` FLOPs (see the module docstring).  A 3-D kernel that is no conv
        (a ``DenseGeneral`` ``(in, heads, head_dim)``) costs ``2 * size`` FLOPs: pass ``(1,)``.

    Returns:
      A ``SizeReport``: ``str(report)`` is a readable table, ``report.to_dict()`` a dict.

    Raises:
      ValueError/TypeError: as ``prunejax.fileformat.save`` (unknown format, NaN weights naming
        the leaf, mismatched masks, ...), or ``spatial`` naming something that is not a conv
        layer or a size of the wrong rank; ``FileNotFoundError`` if ``path`` does not exist.
    """
    plans = _plans(params, masks, activation)
    member_bytes = {f: (None if p is None else p.bytes_per_leaf()) for f, p in plans.items()}
    paths = [m["path"] for m in plans["dense"].header["leaves"]]
    groups = _row_groups(params, paths)
    spatial = {} if spatial is None else spatial
    _check_spatial(spatial, groups, paths, plans["dense"].leaves)
    rows = [_row(name, idx, kernel, plans, member_bytes, spatial) for name, idx, kernel in groups]
    predicted = {c: (None if plans[c] is None else plans[c].nbytes()) for c in COLUMNS}
    if path is not None:
        path = os.fspath(path)
        header = load_header(path)
        file_format, file_bytes, file_path = header["format"], os.path.getsize(path), path
    else:
        with tempfile.TemporaryDirectory() as d:
            tmp = os.path.join(d, "model" + EXTENSION)
            file_bytes = save(tmp, params, format=format, masks=masks, activation=activation)
        file_format, file_path = check_format(format), None
    return SizeReport(
        layers=rows,
        predicted_file_bytes=predicted,
        file_format=file_format,
        file_bytes=int(file_bytes),
        file_path=file_path,
    )
