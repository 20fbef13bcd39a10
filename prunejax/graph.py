"""Structural compaction of any JAX model, from its computation graph.

``compact_graph(apply_fn, params, example_input)`` traces ``apply_fn(params, example_input)``
to a jaxpr and works out, from the primitives alone, which slices of which parameters belong to
each hidden unit or channel: a dependency graph in the sense of DepGraph (Fang et al., "DepGraph:
Towards Any Structural Pruning", CVPR 2023), where every axis of every value carries a *group*
and the primitives say which axes must be pruned together:

* ``dot_general`` / ``conv_general_dilated`` with a parameter as one operand: the kernel's output
  feature axis (``(in, out)`` dense kernels, ``(..., in, out)`` HWIO conv kernels, any layout the
  dimension numbers name) starts a group, the *producer* of its units; the kernel's contracted
  axis joins the group of the activation it contracts with, as a *consumer*.
* elementwise primitives (activations, ``add``/``mul`` with a broadcast per-unit parameter:
  biases, BatchNorm scale, bias, running mean and variance) tie the axes they line up: a
  residual ``add`` merges the groups of its two operands, a bias joins its layer's group.
* ``broadcast_in_dim``, ``transpose``, ``squeeze``, ``reshape``; a reshape that flattens
  ``(h, w, c)`` into one axis (conv -> dense) makes channel ``c`` own the ``h * w`` rows of the
  next kernel at the positions it lands on.
* pooling (``reduce_window_*``) and reductions over other axes pass a unit axis through.
* a reduction over a unit axis (LayerNorm statistics, a softmax over units), a contraction of
  that axis between two activations (attention scores over the query/key feature axis), a
  concatenation, slice, pad or reshape that splits it, grouped convolution, being an input or
  an output of ``apply_fn``, and a constant of ``apply_fn`` (a closure array) with several
  elements along the axis *couple* the group's units: such a group is kept whole (its reason is
  reported in ``GraphCompacted.groups``).
* any other primitive that touches a group which could otherwise be pruned is refused with a
  ``ValueError`` naming the primitive and the parameter: no unit is removed on a guess.

A unit is then removed when it provably does not change the output:

* **dead on output**: the slices of every consumer kernel that read it are all zero.
* **dead on input**: the slices of every producer kernel that write it are zero, so it emits a
  constant that depends on the parameters only (``activation(bias)``, or BatchNorm's
  ``(bias - mean) * scale / sqrt(var + eps) + beta``, through pooling and flattening).  The
  constant is computed by running the traced graph on the example and on the example plus
  deterministic noise (a unit whose value differs depends on the input through another path,
  such as a gate, and is kept, even when the example is all ones or one row); where it is zero
  at every consumer the unit
  goes; otherwise its contribution is folded into the bias added right after a dense consumer
  (``dot_general`` followed by ``add`` of a parameter), as ``prunejax.compact`` does for MLPs.  A
  nonzero constant read by a convolution (its image borders see the padding, so it is no bias)
  or by a layer without a bias keeps the unit.

Removals repeat to a fixed point, then every slice of every removed unit is cut out of every
parameter that carries it (kernels on both sides, biases, norm scales and statistics, the
``h * w`` rows of a flattened channel).  The compacted model computes what the masked model
computes, up to float rounding of folded biases.

Rebuilding the model at the new widths (``GraphCompacted.widths`` maps each layer, the path of
its kernel's parent, to its new number of output units):

* **Flax linen** checks parameter shapes against the module's declared features, so rebuild
  the module with the new widths and apply it to the compacted variables::

      small = pj.compact_graph(lambda v, x: model.apply(v, x), variables, x[:2])
      w = small.widths                      # {"params/Conv_0": 16, "params/Dense_0": 64, ...}
      model2 = CNN(c1=w["params/Conv_0"], c2=w["params/Conv_1"], hidden=w["params/Dense_0"])
      model2.apply(small.params, x)         # {"params": ..., "batch_stats": ...} kept as given

* **Flax NNX**: compact the ``nnx.State`` of ``nnx.split(model)``; ``nnx.merge(graphdef,
  small.params)`` runs at once (NNX layers read their shapes from their arrays); to have
  ``in_features``/``out_features`` right too, build ``Model(widths..., rngs=...)`` and
  ``nnx.update(model2, small.params)``.
* **Equinox**: pass the module itself as ``params`` (its non-array fields are held static) and
  ``apply_fn=lambda m, x: jax.vmap(m)(x)``; the returned module runs as is.  Its static
  ``in_features``/``out_features`` fields keep the old numbers; rebuild at the new widths and
  copy the arrays (``eqx.tree_at``) where they matter.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jcore

from prunejax._util import (
    PyTree,
    is_jax,
    is_matrix_object,
    is_traced,
    parent_path,
    path_str,
)

__all__ = ["GraphCompacted", "UnitGroup", "compact_graph"]


class UnitGroup(NamedTuple):
    """A set of parameter slices pruned together (one DepGraph group).

    Attributes:
      slices: ``(leaf path, axis)`` of every parameter axis whose entries belong to the group's
        units (an axis that a flattened channel owns several positions of is listed too).
      size: the number of units before compaction.
      kept: sorted ``int64`` indices of the units kept.
      whole: why the group was kept whole (``None`` when it was compacted).
    """

    slices: tuple[tuple[str, int], ...]
    size: int
    kept: np.ndarray
    whole: str | None


class GraphCompacted(NamedTuple):
    """The result of ``compact_graph``.

    Attributes:
      params: a tree of the same kind and structure as the input (a Flax variables dict, an
        ``nnx.State``, an Equinox module, a list...), with smaller arrays.
      widths: layer (the path of its kernel's parent, e.g. ``"params/Dense_0"``) -> new number
        of output units: an ``int``, or a tuple for kernels with several output axes
        (``DenseGeneral`` to ``(heads, head_dim)``).  Every layer whose kernel produces units is
        listed, changed or not.
      removed: layer -> the removed output units in the original numbering (``int64`` arrays,
        a tuple of them where ``widths`` has a tuple).
      groups: every group found, compacted or kept whole, with its slices and reason.
    """

    params: PyTree
    widths: dict[str, int | tuple[int, ...]]
    removed: dict[str, np.ndarray | tuple[np.ndarray, ...]]
    groups: tuple[UnitGroup, ...]


# ----------------------------------------------------------------------------- axis groups


@dataclass
class _Info:
    """What is known about one group of axes (a union-find root)."""

    reasons: list[str] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)
    mixed: bool = False
    produced: bool = False


class _Slots:
    """Union-find over axes ("slots"); each root holds an ``_Info``."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.size: list[int] = []
        self.info: list[_Info | None] = []

    def new(self, size: int) -> int:
        self.parent.append(len(self.parent))
        self.size.append(int(size))
        self.info.append(_Info())
        return len(self.parent) - 1

    def find(self, s: int) -> int:
        root = s
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[s] != root:
            self.parent[s], s = root, self.parent[s]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        ia, ib = self.info[ra], self.info[rb]
        ia.reasons += [r for r in ib.reasons if r not in ia.reasons]
        ia.unknown += [u for u in ib.unknown if u not in ia.unknown]
        ia.mixed |= ib.mixed
        ia.produced |= ib.produced
        self.parent[rb] = ra
        self.info[rb] = None
        if self.size[ra] != self.size[rb]:
            ia.reasons.append(f"axes of sizes {self.size[ra]} and {self.size[rb]} meet")

    def get(self, s: int) -> _Info:
        return self.info[self.find(s)]

    def reason(self, s: int, why: str) -> None:
        info = self.get(s)
        if why not in info.reasons:
            info.reasons.append(why)


@dataclass(eq=False)
class _Node:
    """A value of the traced program: its shape, one slot per axis, and where it comes from."""

    shape: tuple[int, ...]
    dtype: Any
    slots: list[int]
    data: bool = False  # depends on the example input
    prov: tuple[int, tuple[int | None, ...]] | None = None  # (leaf, leaf axis of each axis)
    value: Any = None  # literals and constants
    op: int | None = None  # the op that computed it
    users: list[int] = field(default_factory=list)


class _Op(NamedTuple):
    prim: Any
    params: dict
    ins: list[_Node]
    outs: list[_Node]


class _Consumer(NamedTuple):
    op: int
    act: int  # operand index of the activation (the other is the kernel)
    act_axis: int
    leaf: int
    leaf_axis: int
    slot: int


class _Derive(NamedTuple):
    slot: int  # the merged (flattened) axis
    sources: list[tuple[int, int]]  # (slot, size) of the axes merged into it, in order


class _Graph:
    """The flattened program (sub-jaxprs inlined) and what the primitives say about its axes."""

    def __init__(self) -> None:
        self.slots = _Slots()
        self.ops: list[_Op] = []
        self.consumers: list[_Consumer] = []
        self.producers: list[tuple[int, int, int]] = []  # (leaf, leaf axis, op)
        self.derives: list[_Derive] = []
        self.leaf_slots: list[list[int]] = []

    def node(self, aval: Any, **kw: Any) -> _Node:
        shape = tuple(int(d) for d in aval.shape)
        return _Node(shape, aval.dtype, [self.slots.new(d) for d in shape], **kw)

    def unknown(self, op: _Op) -> None:
        for n in op.ins + op.outs:
            for s in n.slots:
                info = self.slots.get(s)
                if op.prim.name not in info.unknown:
                    info.unknown.append(op.prim.name)

    def add_op(self, prim: Any, params: dict, ins: list[_Node], outs: list[_Node]) -> None:
        index = len(self.ops)
        op = _Op(prim, dict(params), ins, outs)
        self.ops.append(op)
        for n in ins:
            n.users.append(index)
        for n in outs:
            n.op = index
            n.data = any(i.data for i in ins)
        rule = _RULES.get(prim.name)
        if rule is None and prim.name in _ELEMENTWISE:
            rule = _elementwise
        if rule is None:
            self.unknown(op)
        else:
            rule(self, op, index)


_CALLS = (
    "jit",
    "pjit",
    "closed_call",
    "core_call",
    "custom_jvp_call",
    "custom_vjp_call",
    "custom_vjp_call_jaxpr",
    "checkpoint",
    "remat",
    "remat2",
)


def _subjaxpr(eqn: Any) -> tuple[Any, list] | None:
    """The jaxpr an inlined call primitive runs, and its constants; None for other primitives."""
    if eqn.primitive.name not in _CALLS:
        return None
    for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
        sub = eqn.params.get(key)
        if isinstance(sub, jcore.ClosedJaxpr):
            return sub.jaxpr, list(sub.consts)
        if isinstance(sub, jcore.Jaxpr):
            return sub, []
    return None


def _constant(g: _Graph, value: Any, aval: Any) -> _Node:
    """A node for a literal or a constant of ``apply_fn``; an axis along which it has more than
    one element ties the units there to values outside the parameters, so they stay whole."""
    node = g.node(aval, value=jnp.asarray(value, dtype=aval.dtype))
    for d, slot in zip(node.shape, node.slots, strict=True):
        if d > 1:
            g.slots.reason(slot, "carried by a constant of apply_fn")
    return node


def _walk(g: _Graph, jaxpr: Any, consts: list[_Node], ins: list[_Node]) -> list[_Node]:
    """Add ``jaxpr``'s equations to ``g`` (call primitives inlined); return its output nodes."""
    env: dict[Any, _Node] = dict(zip(jaxpr.constvars, consts, strict=True))
    env.update(zip(jaxpr.invars, ins, strict=True))

    def read(a: Any) -> _Node:
        if isinstance(a, jcore.Literal):
            return _constant(g, a.val, a.aval)
        return env[a]

    for eqn in jaxpr.eqns:
        args = [read(a) for a in eqn.invars]
        sub = _subjaxpr(eqn)
        if sub is not None:
            sub_jaxpr, sub_consts = sub
            cnodes = [_constant(g, c, jax.typeof(c)) for c in sub_consts]
            outs = _walk(g, sub_jaxpr, cnodes, args)
        else:
            outs = [g.node(v.aval) for v in eqn.outvars]
            g.add_op(eqn.primitive, eqn.params, args, outs)
        env.update(zip(eqn.outvars, outs, strict=True))
    return [read(a) for a in jaxpr.outvars]


# ----------------------------------------------------------------------------- primitive rules

_PROV_KEEP = {
    "convert_element_type",
    "copy",
    "copy_p",
    "reduce_precision",
    "stop_gradient",
    "sharding_constraint",
    "optimization_barrier",
}
_ELEMENTWISE = _PROV_KEEP | {
    "add",
    "add_any",
    "sub",
    "mul",
    "div",
    "rem",
    "pow",
    "max",
    "min",
    "atan2",
    "nextafter",
    "and",
    "or",
    "xor",
    "not",
    "eq",
    "ne",
    "lt",
    "le",
    "gt",
    "ge",
    "select_n",
    "clamp",
    "neg",
    "sign",
    "floor",
    "ceil",
    "round",
    "is_finite",
    "exp",
    "exp2",
    "log",
    "log1p",
    "expm1",
    "tanh",
    "logistic",
    "sin",
    "cos",
    "tan",
    "asin",
    "acos",
    "atan",
    "sinh",
    "cosh",
    "asinh",
    "acosh",
    "atanh",
    "sqrt",
    "rsqrt",
    "cbrt",
    "integer_pow",
    "square",
    "abs",
    "erf",
    "erfc",
    "erf_inv",
    "lgamma",
    "digamma",
    "real",
    "imag",
    "conj",
}


def _elementwise(g: _Graph, op: _Op, index: int) -> None:
    """Operands line up axis by axis (size-1 axes and scalars broadcast)."""
    out = op.outs[0]
    for n in op.ins:
        if not n.shape:
            if n.data:
                for s in out.slots:
                    g.slots.get(s).mixed = True
            continue
        if len(n.shape) != len(out.shape):
            g.unknown(op)
            return
        for ax, (d, s) in enumerate(zip(n.shape, n.slots, strict=True)):
            if d == out.shape[ax]:
                g.slots.union(s, out.slots[ax])
            elif d == 1:
                # a per-example value broadcast along this axis: the axis's units now depend
                # on the input through something other than their producers
                g.slots.get(out.slots[ax]).mixed |= n.data
            else:
                g.unknown(op)
                return
    for o in op.outs[1:]:
        for a, b in zip(o.slots, out.slots, strict=True):
            g.slots.union(a, b)
    if op.prim.name in _PROV_KEEP and len(op.ins) == 1 and op.ins[0].prov is not None:
        out.prov = op.ins[0].prov


def _broadcast(g: _Graph, op: _Op, index: int) -> None:
    n, out = op.ins[0], op.outs[0]
    mapped = {o: i for i, o in enumerate(op.params["broadcast_dimensions"])}
    leaf_axes: list[int | None] = []
    for oax, s in enumerate(out.slots):
        iax = mapped.get(oax)
        if iax is not None and n.shape[iax] == out.shape[oax]:
            g.slots.union(n.slots[iax], s)
            leaf_axes.append(None if n.prov is None else n.prov[1][iax])
        else:
            g.slots.get(s).mixed |= n.data
            leaf_axes.append(None)
    if n.prov is not None:
        out.prov = (n.prov[0], tuple(leaf_axes))


def _transpose(g: _Graph, op: _Op, index: int) -> None:
    n, out = op.ins[0], op.outs[0]
    perm = op.params["permutation"]
    for oax, iax in enumerate(perm):
        g.slots.union(n.slots[iax], out.slots[oax])
    if n.prov is not None:
        out.prov = (n.prov[0], tuple(n.prov[1][i] for i in perm))


def _squeeze(g: _Graph, op: _Op, index: int) -> None:
    n, out = op.ins[0], op.outs[0]
    dims = {d % len(n.shape) for d in op.params["dimensions"]}
    kept = [a for a in range(len(n.shape)) if a not in dims]
    for oax, iax in enumerate(kept):
        g.slots.union(n.slots[iax], out.slots[oax])
    if n.prov is not None:
        out.prov = (n.prov[0], tuple(n.prov[1][i] for i in kept))


def _reshape_chunks(a: tuple[int, ...], b: tuple[int, ...]) -> list[tuple[list, list]] | None:
    """Pair the axes of shape ``a`` with those of ``b`` into chunks of equal size (size-1 axes
    on their own); None when a size-0 axis makes the pairing meaningless."""
    if 0 in a or 0 in b:
        return None
    i = j = 0
    chunks: list[tuple[list, list]] = []
    while i < len(a) or j < len(b):
        if i < len(a) and a[i] == 1 and (j >= len(b) or b[j] != 1):
            chunks.append(([i], []))
            i += 1
        elif j < len(b) and b[j] == 1 and (i >= len(a) or a[i] != 1):
            chunks.append(([], [j]))
            j += 1
        else:
            ia, jb, pa, pb = [i], [j], a[i], b[j]
            i, j = i + 1, j + 1
            while pa != pb:
                if pa < pb:
                    ia.append(i)
                    pa, i = pa * a[i], i + 1
                else:
                    jb.append(j)
                    pb, j = pb * b[j], j + 1
            chunks.append((ia, jb))
    return chunks


def _reshape(g: _Graph, op: _Op, index: int) -> None:
    """1:1 axes line up; merged axes (a flatten) are derived from their sources; a split axis
    is kept whole."""
    n, out = op.ins[0], op.outs[0]
    chunks = None if op.params.get("dimensions") else _reshape_chunks(n.shape, out.shape)
    if chunks is None:
        g.unknown(op)
        return
    leaf_axes: list[int | None] = [None] * len(out.shape)
    simple = True
    for ia, jb in chunks:
        if len(ia) == 1 and len(jb) == 1:
            g.slots.union(n.slots[ia[0]], out.slots[jb[0]])
            leaf_axes[jb[0]] = None if n.prov is None else n.prov[1][ia[0]]
        elif len(jb) == 1 and ia:
            g.derives.append(_Derive(out.slots[jb[0]], [(n.slots[i], n.shape[i]) for i in ia]))
            simple = False
        elif ia and jb:
            for s in [n.slots[i] for i in ia] + [out.slots[j] for j in jb]:
                g.slots.reason(s, "split by reshape")
            simple = False
    if n.prov is not None and simple:
        out.prov = (n.prov[0], tuple(leaf_axes))


def _reduce(g: _Graph, op: _Op, index: int) -> None:
    n, out = op.ins[0], op.outs[0]
    axes = {a % len(n.shape) for a in op.params["axes"]}
    kept = [a for a in range(len(n.shape)) if a not in axes]
    for a in axes:
        g.slots.reason(n.slots[a], f"reduced over by {op.prim.name}")
    for oax, iax in enumerate(kept):
        g.slots.union(n.slots[iax], out.slots[oax])


def _cumulative(g: _Graph, op: _Op, index: int) -> None:
    n, out = op.ins[0], op.outs[0]
    for a, b in zip(n.slots, out.slots, strict=True):
        g.slots.union(a, b)
    g.slots.reason(n.slots[op.params["axis"] % len(n.shape)], f"accumulated by {op.prim.name}")


def _window(g: _Graph, op: _Op, index: int) -> None:
    """Pooling: axes with a window of 1 (no stride, padding or dilation) pass through."""
    n, out = op.ins[0], op.outs[0]
    p = op.params
    for ax in range(len(n.shape)):
        plain = (
            p["window_dimensions"][ax] == 1
            and p["window_strides"][ax] == 1
            and tuple(p["padding"][ax]) == (0, 0)
            and p["base_dilation"][ax] == 1
            and p["window_dilation"][ax] == 1
        )
        if plain:
            g.slots.union(n.slots[ax], out.slots[ax])
        else:
            g.slots.reason(n.slots[ax], f"windowed by {op.prim.name}")
            g.slots.reason(out.slots[ax], f"windowed by {op.prim.name}")


def _per_axis(g: _Graph, op: _Op, plain: list[bool], operands: list[_Node]) -> None:
    out = op.outs[0]
    for n in operands:
        for ax, ok in enumerate(plain):
            if ok:
                g.slots.union(n.slots[ax], out.slots[ax])
            else:
                g.slots.reason(n.slots[ax], f"cut or joined by {op.prim.name}")
                g.slots.reason(out.slots[ax], f"cut or joined by {op.prim.name}")


def _concatenate(g: _Graph, op: _Op, index: int) -> None:
    dim = op.params["dimension"]
    _per_axis(g, op, [ax != dim for ax in range(len(op.outs[0].shape))], op.ins)


def _pad(g: _Graph, op: _Op, index: int) -> None:
    plain = [tuple(c) == (0, 0, 0) for c in op.params["padding_config"]]
    _per_axis(g, op, plain, op.ins[:1])


def _slice(g: _Graph, op: _Op, index: int) -> None:
    n, p = op.ins[0], op.params
    strides = p["strides"] or (1,) * len(n.shape)
    plain = [
        p["start_indices"][a] == 0 and p["limit_indices"][a] == n.shape[a] and strides[a] == 1
        for a in range(len(n.shape))
    ]
    _per_axis(g, op, plain, [n])


def _split(g: _Graph, op: _Op, index: int) -> None:
    n = op.ins[0]
    axis = op.params["axis"] % len(n.shape)
    for out in op.outs:
        for ax, (a, b) in enumerate(zip(n.slots, out.slots, strict=True)):
            if ax == axis:
                g.slots.reason(a, "cut by split")
                g.slots.reason(b, "cut by split")
            else:
                g.slots.union(a, b)


def _kernel_side(lhs: _Node, rhs: _Node, contract: tuple, free: tuple) -> int | None:
    """Which operand (0 or 1) is a parameter kernel applied to an activation, or None."""
    for side, (k, act) in enumerate(((lhs, rhs), (rhs, lhs))):
        if k.prov is None or k.data or not act.data:
            continue
        if all(k.prov[1][a] is not None for a in list(contract[side]) + list(free[side])):
            return side
    return None


def _dot_general(g: _Graph, op: _Op, index: int) -> None:
    lhs, rhs = op.ins[:2]
    out = op.outs[0]
    (lc, rc), (lb, rb) = op.params["dimension_numbers"]
    lfree = [a for a in range(len(lhs.shape)) if a not in lc and a not in lb]
    rfree = [a for a in range(len(rhs.shape)) if a not in rc and a not in rb]
    for i, (a, b) in enumerate(zip(lb, rb, strict=True)):
        g.slots.union(lhs.slots[a], out.slots[i])
        g.slots.union(rhs.slots[b], out.slots[i])
    for k, a in enumerate(lfree):
        g.slots.union(lhs.slots[a], out.slots[len(lb) + k])
    for k, b in enumerate(rfree):
        g.slots.union(rhs.slots[b], out.slots[len(lb) + len(lfree) + k])
    for a, b in zip(lc, rc, strict=True):
        g.slots.union(lhs.slots[a], rhs.slots[b])
    side = _kernel_side(lhs, rhs, (lc, rc), (lfree, rfree))
    if side is None:
        for a in lc:
            g.slots.reason(
                lhs.slots[a],
                "contracted by a dot_general that is not a layer "
                "(not a parameter applied to an activation)",
            )
        return
    kernel, act = op.ins[side], op.ins[1 - side]
    kc, ac = (lc, rc)[side], (lc, rc)[1 - side]
    for a_k, a_a in zip(kc, ac, strict=True):
        g.consumers.append(
            _Consumer(index, 1 - side, a_a, kernel.prov[0], kernel.prov[1][a_k], act.slots[a_a])
        )
    first = len(lb) + (0 if side == 0 else len(lfree))
    for k, a in enumerate((lfree, rfree)[side]):
        g.producers.append((kernel.prov[0], kernel.prov[1][a], index))
        g.slots.get(out.slots[first + k]).produced = True


def _conv(g: _Graph, op: _Op, index: int) -> None:
    lhs, rhs = op.ins[:2]
    out = op.outs[0]
    dn = op.params["dimension_numbers"]
    ls, rs, os_ = dn.lhs_spec, dn.rhs_spec, dn.out_spec
    g.slots.union(lhs.slots[ls[0]], out.slots[os_[0]])
    for a in os_[2:]:
        g.slots.reason(out.slots[a], "spatial axis of a convolution")
    for a in rs[2:]:
        g.slots.reason(rhs.slots[a], "window axis of a convolution kernel")
    grouped = op.params["feature_group_count"] != 1 or op.params["batch_group_count"] != 1
    is_layer = (
        rhs.prov is not None
        and not rhs.data
        and lhs.data
        and rhs.prov[1][rs[0]] is not None
        and rhs.prov[1][rs[1]] is not None
    )
    if grouped or not is_layer:
        why = "grouped convolution" if grouped else "convolution with a computed kernel"
        for s in (lhs.slots[ls[1]], out.slots[os_[1]], rhs.slots[rs[0]], rhs.slots[rs[1]]):
            g.slots.reason(s, why)
        return
    leaf, axes = rhs.prov
    g.slots.union(lhs.slots[ls[1]], rhs.slots[rs[1]])
    g.consumers.append(_Consumer(index, 0, ls[1], leaf, axes[rs[1]], lhs.slots[ls[1]]))
    g.slots.union(out.slots[os_[1]], rhs.slots[rs[0]])
    g.producers.append((leaf, axes[rs[0]], index))
    g.slots.get(out.slots[os_[1]]).produced = True


_RULES: dict[str, Callable[[_Graph, _Op, int], None]] = {
    "broadcast_in_dim": _broadcast,
    "transpose": _transpose,
    "squeeze": _squeeze,
    "reshape": _reshape,
    "dot_general": _dot_general,
    "conv_general_dilated": _conv,
    "concatenate": _concatenate,
    "pad": _pad,
    "slice": _slice,
    "split": _split,
    "iota": lambda g, op, i: None,
    **{
        name: _reduce
        for name in (
            "reduce_sum",
            "reduce_max",
            "reduce_min",
            "reduce_prod",
            "reduce_and",
            "reduce_or",
            "reduce_xor",
            "argmax",
            "argmin",
        )
    },
    **{name: _cumulative for name in ("cumsum", "cumprod", "cummax", "cummin", "cumlogsumexp")},
    **{name: _window for name in ("reduce_window_sum", "reduce_window_max", "reduce_window_min")},
}


# ----------------------------------------------------------------------------- tracing


class _Model(NamedTuple):
    paths: list[str]  # of the array leaves
    leaves: list[Any]  # every leaf, arrays and static ones
    treedef: Any
    arrays: list[int]  # positions of the array leaves in ``leaves``
    work: list[np.ndarray]  # the array leaves, masked, as writable NumPy copies


def _mask_lookup(params: PyTree, masks: PyTree, paths: list[str]) -> dict[str, Any]:
    """Mask leaves keyed by the params path they mask (a Flax variables dict may be masked
    through its ``"params"`` collection alone)."""
    flat = jax.tree_util.tree_flatten_with_path(masks)[0]
    found = {path_str(kp): m for kp, m in flat}
    known = set(paths)
    if all(p in known for p in found):
        return found
    if isinstance(params, dict) or hasattr(params, "keys"):
        prefixed = {f"params/{p}": m for p, m in found.items()}
        if "params" in params and all(p in known for p in prefixed):
            return prefixed
    bad = next(p for p in found if p not in known)
    raise ValueError(f"compact_graph: mask leaf {bad!r} has no parameter of that path in params")


def _prepare(params: PyTree, masks: PyTree | None) -> _Model:
    flat, treedef = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_matrix_object)
    leaves = [leaf for _, leaf in flat]
    arrays = [
        i
        for i, leaf in enumerate(leaves)
        if isinstance(leaf, np.ndarray | jax.Array) or is_matrix_object(leaf)
    ]
    paths = [path_str(flat[i][0]) for i in arrays]
    if not arrays:
        raise ValueError("compact_graph: params hold no arrays")
    lookup = {} if masks is None else _mask_lookup(params, masks, paths)
    work = []
    for p, i in zip(paths, arrays, strict=True):
        leaf = leaves[i]
        if is_traced(leaf):
            raise TypeError(
                f"compact_graph: leaf {p!r} is traced; compaction changes shapes "
                "from the values of the weights, so it cannot run under jax.jit/vmap"
            )
        if is_matrix_object(leaf):
            raise TypeError(
                f"compact_graph: leaf {p!r} is a sparse kernel object "
                f"({type(leaf).__name__}); call .todense() first"
            )
        arr = np.array(leaf)
        if arr.dtype.kind == "f" or arr.dtype == jnp.bfloat16:
            if not np.isfinite(arr.astype(np.float64)).all():
                raise ValueError(f"compact_graph: leaf {p!r} has non-finite values (NaN or inf)")
        m = lookup.get(p)
        if m is not None:
            if np.shape(m) != arr.shape or np.asarray(m).dtype != np.bool_:
                raise ValueError(
                    f"compact_graph: mask for leaf {p!r} must be bool of shape "
                    f"{arr.shape}, got {np.asarray(m).dtype}{np.shape(m)}"
                )
            arr = np.where(np.asarray(m), arr, np.zeros((), arr.dtype))
        work.append(arr)
    return _Model(paths, leaves, treedef, arrays, work)


class _Traced(NamedTuple):
    graph: _Graph
    leaf_nodes: list[_Node]
    input_nodes: list[_Node]
    inputs: list[Any]


def _trace(apply_fn: Callable, model: _Model, example_input: Any) -> _Traced:
    """Trace ``apply_fn(params, example_input)`` into a ``_Graph``."""

    def wrapped(arrays: list, x: Any) -> Any:
        full = list(model.leaves)
        for i, a in zip(model.arrays, arrays, strict=True):
            full[i] = a
        return apply_fn(jax.tree_util.tree_unflatten(model.treedef, full), x)

    closed = jax.make_jaxpr(wrapped)(model.work, example_input)
    jaxpr = closed.jaxpr
    g = _Graph()
    n = len(model.work)
    leaf_nodes = []
    for k, v in enumerate(jaxpr.invars[:n]):
        node = g.node(v.aval, prov=(k, tuple(range(len(v.aval.shape)))))
        g.leaf_slots.append(node.slots)
        leaf_nodes.append(node)
    input_nodes = [g.node(v.aval, data=True) for v in jaxpr.invars[n:]]
    for node in input_nodes:
        for s in node.slots:
            g.slots.reason(s, "carries the model input")
    consts = [_constant(g, c, jax.typeof(c)) for c in closed.consts]
    for node in _walk(g, jaxpr, consts, leaf_nodes + input_nodes):
        node.users.append(-1)
        for s in node.slots:
            g.slots.reason(s, "is an output of apply_fn")
    inputs = [jnp.asarray(x) for x in jax.tree_util.tree_leaves(example_input)]
    return _Traced(g, leaf_nodes, input_nodes, inputs)


def _runner(t: _Traced, capture: set[int]) -> Callable[[list, list], dict]:
    """A jitted run of the flattened program returning the operands of the ops in ``capture``."""
    g = t.graph

    def run(arrays: list, inputs: list) -> dict:
        vals = {id(n): v for n, v in zip(t.leaf_nodes, arrays, strict=True)}
        vals.update({id(n): v for n, v in zip(t.input_nodes, inputs, strict=True)})
        got = {}
        for i, op in enumerate(g.ops):
            args = [vals.get(id(n), n.value) for n in op.ins]
            if i in capture:
                got[i] = args[:2]
            res = op.prim.bind(*args, **op.params)
            res = res if op.prim.multiple_results else [res]
            vals.update({id(n): r for n, r in zip(op.outs, res, strict=True)})
        return got

    return jax.jit(run)


# ----------------------------------------------------------------------------- groups


@dataclass
class _Group:
    root: int
    size: int
    slices: list[tuple[int, int, np.ndarray | None]]  # (leaf, axis, unit of each position)
    producers: list[tuple[int, int, None]]
    consumers: list[tuple[_Consumer, np.ndarray | None]]
    reasons: list[str]
    mixed: bool
    order: int
    removed: np.ndarray
    stuck: np.ndarray

    @property
    def consumer_slices(self) -> list[tuple[int, int, np.ndarray | None]]:
        return [(c.leaf, c.leaf_axis, umap) for c, umap in self.consumers]


def _children(g: _Graph) -> dict[int, tuple[int, np.ndarray]]:
    """Flattened axes derived from one unit axis: child root -> (parent root, unit of each
    position).  Conflicting or ambiguous flattens keep the groups involved whole."""
    child: dict[int, tuple[int, np.ndarray]] = {}
    sl = g.slots
    for d in g.derives:
        out = sl.find(d.slot)
        srcs = [(sl.find(s), size) for s, size in d.sources]
        units = [k for k, (r, _) in enumerate(srcs) if sl.info[r].produced]
        if not units:
            continue
        if len(units) > 1:
            for k in units:
                sl.reason(srcs[k][0], "merged with another unit axis by reshape")
            continue
        k = units[0]
        umap = np.indices([size for _, size in srcs])[k].reshape(-1)
        prev = child.get(out)
        if prev is not None and (prev[0] != srcs[k][0] or not np.array_equal(prev[1], umap)):
            sl.reason(srcs[k][0], "flattened inconsistently by reshape")
            sl.reason(prev[0], "flattened inconsistently by reshape")
        child[out] = (srcs[k][0], umap)
    for c, (p, _) in child.items():
        ci, pi = sl.info[c], sl.get(p)
        if sl.find(p) in child:
            pi.reasons.append("flattened twice")
        pi.reasons += [f"after flattening: {r}" for r in ci.reasons]
        pi.unknown += ci.unknown
        pi.mixed |= ci.mixed
        if ci.produced:
            pi.reasons.append("flattened into an axis a layer also writes")
            ci.reasons.append("is a flattened unit axis")
    return child


def _refuse(g: _Graph, root: int, info: _Info, paths: list[str]) -> None:
    leaf, axis, _ = next(p for p in g.producers if g.slots.find(g.leaf_slots[p[0]][p[1]]) == root)
    raise ValueError(
        f"compact_graph: primitive {info.unknown[0]!r} acts on the units (axis {axis}) of leaf "
        f"{paths[leaf]!r}, and how it couples them is not known; refusing to remove any unit "
        "rather than guess. Compact a model without it, or the sub-model before it"
    )


def _resolve(g: _Graph, paths: list[str]) -> list[_Group]:
    """The groups that layers produce, with every slice, producer and consumer they own."""
    sl = g.slots
    child = _children(g)
    groups: dict[int, _Group] = {}
    for leaf, axis, op in g.producers:
        root = sl.find(g.leaf_slots[leaf][axis])
        info = sl.info[root]
        if root not in groups:
            if info.unknown and not info.reasons:
                _refuse(g, root, info, paths)
            n = sl.size[root]
            groups[root] = _Group(
                root,
                n,
                [],
                [],
                [],
                list(info.reasons),
                info.mixed,
                op,
                np.zeros(n, bool),
                np.zeros(n, bool),
            )
        if (leaf, axis, None) not in groups[root].producers:
            groups[root].producers.append((leaf, axis, None))

    def owner(slot: int) -> tuple[_Group, np.ndarray | None] | None:
        r = sl.find(slot)
        if r in groups:
            return groups[r], None
        if r in child and child[r][0] in groups:
            return groups[child[r][0]], child[r][1]
        return None

    for leaf, slots in enumerate(g.leaf_slots):
        for axis, s in enumerate(slots):
            got = owner(s)
            if got is not None:
                got[0].slices.append((leaf, axis, got[1]))
    for c in g.consumers:
        got = owner(c.slot)
        if got is not None:
            got[0].consumers.append((c, got[1]))
    return sorted(groups.values(), key=lambda grp: grp.order)


# ----------------------------------------------------------------------------- removal


def _nonzero(work: list[np.ndarray], slices: list, size: int) -> np.ndarray:
    """Units (of ``size``) with a nonzero entry in any of ``slices``."""
    nz = np.zeros(size, bool)
    for leaf, axis, umap in slices:
        arr = work[leaf]
        pos = np.moveaxis(arr != 0, axis, 0).reshape(arr.shape[axis], -1).any(axis=1)
        if umap is None:
            nz |= pos
        else:
            np.logical_or.at(nz, umap, pos)
    return nz


def _zero(work: list[np.ndarray], slices: list, units: np.ndarray) -> None:
    for leaf, axis, umap in slices:
        pos = units if umap is None else units[umap]
        if pos.any():
            index: list[Any] = [slice(None)] * work[leaf].ndim
            index[axis] = np.flatnonzero(pos)
            work[leaf][tuple(index)] = 0


def _remove_dead_outputs(groups: list[_Group], work: list[np.ndarray]) -> None:
    """Units no consumer reads: remove them, zeroing their producer slices (which may make
    units upstream dead in turn), to a fixed point."""
    again = True
    while again:
        again = False
        for grp in groups:
            if grp.reasons:
                continue
            dead = ~grp.removed & ~_nonzero(work, grp.consumer_slices, grp.size)
            if dead.any():
                grp.removed |= dead
                _zero(work, grp.producers, dead)
                again = True


def _sole_chain(g: _Graph, node: _Node) -> bool:
    """``node`` is a parameter leaf seen through reshapes/broadcasts, used nowhere else."""
    while True:
        if len(node.users) != 1:
            return False
        if node.op is None:
            return node.prov is not None
        op = g.ops[node.op]
        if (
            op.prim.name not in _PROV_KEEP | {"reshape", "broadcast_in_dim", "transpose", "squeeze"}
            or len(op.ins) != 1
        ):
            return False
        node = op.ins[0]


class _Target(NamedTuple):
    leaf: int  # the bias leaf
    leaf_axes: list[int]  # the bias axis of each kernel output axis
    out_axes: list[int]  # the kernel output axes in the dot's output


def _fold_target(g: _Graph, c: _Consumer) -> _Target | None:
    """The bias added right after dense consumer ``c`` (possibly through transposes, as under
    ``vmap``; a parameter used there alone), or None when a constant input cannot be folded
    (convolution, no bias, batched dot)."""
    op = g.ops[c.op]
    if op.prim.name != "dot_general" or op.params["dimension_numbers"][1][0]:
        return None
    out = op.outs[0]
    node, perm = out, list(range(len(out.shape)))  # axis i of node is axis perm[i] of out
    while len(node.users) == 1 and node.users[0] >= 0:
        user = g.ops[node.users[0]]
        if user.prim.name != "transpose":
            break
        perm = [perm[p] for p in user.params["permutation"]]
        node = user.outs[0]
    if len(node.users) != 1 or node.users[0] < 0:
        return None
    user = g.ops[node.users[0]]
    if user.prim.name not in ("add", "add_any") or len(user.ins) != 2:
        return None
    bias = user.ins[1] if user.ins[0] is node else user.ins[0]
    if bias is node or bias.data or bias.prov is None or not _sole_chain(g, bias):
        return None
    n_act_free = len(op.ins[c.act].shape) - len(op.params["dimension_numbers"][0][0])
    n_out = len(out.shape)
    out_axes = list(range(n_act_free, n_out) if c.act == 0 else range(n_out - n_act_free))
    for ax in range(n_out):
        mapped = bias.prov[1][ax] is not None and bias.shape[ax] == node.shape[ax]
        if perm[ax] in out_axes and not mapped:
            return None
        if perm[ax] not in out_axes and bias.shape[ax] != 1 and bias.prov[1][ax] is not None:
            return None
    leaf_axes = [bias.prov[1][perm.index(d)] for d in out_axes]
    if sorted(leaf_axes) != list(range(len(g.leaf_slots[bias.prov[0]]))):
        return None
    return _Target(bias.prov[0], leaf_axes, out_axes)


def _perturbed(inputs: list) -> list:
    """``inputs`` plus deterministic noise (floats) or redrawn values in their range (integers,
    bools): a second input on which a unit that is constant on a degenerate example (all ones,
    one row) shows that it depends on the input."""
    out = []
    for k, x in enumerate(inputs):
        key = jax.random.fold_in(jax.random.key(0), k)
        if jnp.issubdtype(x.dtype, jnp.inexact):
            out.append(x + jax.random.normal(key, x.shape, x.dtype))
        elif x.dtype == jnp.bool_:
            out.append(jax.random.bernoulli(key, 0.5, x.shape))
        elif x.size:
            lo, hi = int(x.min()), int(x.max())
            out.append(jax.random.randint(key, x.shape, lo, hi + 1).astype(x.dtype))
        else:
            out.append(x)
    return out


def _constant_along(act: np.ndarray, axes: list[int]) -> bool:
    return all(
        np.array_equal(act, np.broadcast_to(np.take(act, [0], axis=ax), act.shape)) for ax in axes
    )


def _fold(
    g: _Graph,
    work: list[np.ndarray],
    c: _Consumer,
    operands: list,
    units: np.ndarray,
    target: _Target,
) -> None:
    """Add what the constant units ``units`` (bool per position of ``c``'s activation axis)
    contribute through consumer ``c`` to the bias ``target``."""
    act, kernel = (np.asarray(x, np.float64) for x in (operands[c.act], operands[1 - c.act]))
    (lc, rc), _ = g.ops[c.op].params["dimension_numbers"]
    ac, kc = (lc, rc) if c.act == 0 else (rc, lc)
    for ax in range(act.ndim):
        if ax not in ac:
            act = np.take(act, [0], axis=ax)
    shape = [1] * act.ndim
    shape[c.act_axis] = -1
    act = act * units.reshape(shape)
    contrib = (
        np.tensordot(act, kernel, axes=(ac, kc))
        if c.act == 0
        else np.tensordot(kernel, act, axes=(kc, ac))
    )
    out_shape = g.ops[c.op].outs[0].shape
    contrib = contrib.reshape([out_shape[a] for a in target.out_axes])
    contrib = np.transpose(contrib, np.argsort(target.leaf_axes))
    bias = work[target.leaf]
    work[target.leaf] = (bias.astype(np.float64) + contrib).astype(bias.dtype)


def _remove_constant_units(
    grp: _Group, g: _Graph, work: list[np.ndarray], run: Callable, inputs: tuple[list, list]
) -> bool:
    """Units whose producers are all zero emit constants: remove those whose constant is zero
    where it is read, fold the others into dense consumers' biases; True if any was removed.
    ``inputs`` are the example and the ``_perturbed`` example: a unit whose value differs
    between them depends on the input through a path other than its producers and is kept."""
    if grp.reasons or grp.mixed:
        return False
    dead = ~grp.removed & ~grp.stuck & ~_nonzero(work, grp.producers, grp.size)
    if not dead.any():
        return False
    arrays = [jnp.asarray(w) for w in work]
    got, again = run(arrays, inputs[0]), run(arrays, inputs[1])
    keep, folds = np.zeros(grp.size, bool), []
    for c, umap in grp.consumers:
        operands = [np.asarray(x) for x in got[c.op]]
        other = np.asarray(again[c.op][c.act])
        unit_of = np.arange(grp.size) if umap is None else umap
        at = dead[unit_of]
        vals = np.moveaxis(operands[c.act], c.act_axis, 0)[at]
        vals2 = np.moveaxis(other, c.act_axis, 0)[at]
        nonzero = np.zeros(grp.size, bool)
        np.logical_or.at(nonzero, unit_of[at], vals.reshape(len(vals), -1).any(axis=1))
        np.logical_or.at(nonzero, unit_of[at], vals2.reshape(len(vals2), -1).any(axis=1))
        if not nonzero.any():
            continue
        target = _fold_target(g, c)
        if target is not None:
            contracted = g.ops[c.op].params["dimension_numbers"][0][c.act]
            sub = np.take(operands[c.act], np.flatnonzero(at), axis=c.act_axis)
            same = np.array_equal(sub, np.take(other, np.flatnonzero(at), axis=c.act_axis))
            if not same or not _constant_along(
                sub, [a for a in range(sub.ndim) if a not in contracted]
            ):
                target = None
        if target is None:
            keep |= nonzero
        else:
            folds.append((c, operands, unit_of, target))
    grp.stuck |= dead & keep
    fold = dead & ~keep
    if not fold.any():
        return False
    for c, operands, unit_of, target in folds:
        _fold(g, work, c, operands, fold[unit_of], target)
    _zero(work, grp.consumer_slices, fold)
    grp.removed |= fold
    return True


def _cut(work: list[np.ndarray], groups: list[_Group]) -> list[np.ndarray]:
    """Cut every slice of every removed unit out of the parameters."""
    out = list(work)
    for grp in groups:
        for leaf, axis, umap in grp.slices:
            keep = ~grp.removed if umap is None else ~grp.removed[umap]
            if not keep.all():
                out[leaf] = np.take(out[leaf], np.flatnonzero(keep), axis=axis)
    return out


def _layers(g: _Graph, groups: list[_Group], model: _Model, cut: list[np.ndarray]) -> tuple:
    """``(widths, removed)`` keyed by layer (the parent path of a producing kernel)."""
    removed_of = {}
    for grp in groups:
        for leaf, axis, _ in grp.producers:
            removed_of[(leaf, axis)] = np.flatnonzero(grp.removed).astype(np.int64)
    per_leaf: dict[int, list[int]] = {}
    for leaf, axis in sorted(removed_of):
        per_leaf.setdefault(leaf, []).append(axis)
    widths: dict[str, Any] = {}
    removed: dict[str, Any] = {}
    for leaf, axes in per_leaf.items():
        path = model.paths[leaf].removesuffix("/value")  # nnx.State leaves end in /value
        layer = parent_path(path) or path
        w = tuple(int(cut[leaf].shape[a]) for a in axes)
        r = tuple(removed_of[(leaf, a)] for a in axes)
        widths[layer] = w[0] if len(w) == 1 else w
        removed[layer] = r[0] if len(r) == 1 else r
    return widths, removed


def compact_graph(
    apply_fn: Callable[[PyTree, Any], Any],
    params: PyTree,
    example_input: Any,
    *,
    masks: PyTree | None = None,
) -> GraphCompacted:
    """Physically remove the dead units and channels of any JAX model, from its jaxpr.

    The dependency groups come from tracing ``apply_fn(params, example_input)`` (DepGraph,
    Fang et al., CVPR 2023; see the module docstring for the rules).  A unit whose consumer
    slices are all zero is removed; a unit whose producer slices are all zero emits a constant,
    which is removed where it is zero and folded into the bias of a dense consumer otherwise
    (the bias folding of ``prunejax.compact``, Hu et al. 2016's unit pruning made physical).
    The result computes the same outputs as the masked model (up to float rounding of folded
    biases) with smaller arrays.  Input features and output units are never removed; groups
    whose units are coupled (LayerNorm statistics, attention scores, grouped convolution,
    reshapes that split a unit axis) are kept whole and listed in ``groups`` with the reason.

    Args:
      apply_fn: ``apply_fn(params, example_input)``, the model's forward pass (e.g.
        ``lambda v, x: model.apply(v, x)`` for Flax linen, with ``use_running_average=True``
        for BatchNorm; ``lambda m, x: jax.vmap(m)(x)`` for an Equinox module).  It must be
        traceable by ``jax.make_jaxpr``.
      params: the parameters: a Flax variables dict (``{"params": ..., "batch_stats":
        ...}``), an ``nnx.State``, an Equinox module (non-array leaves are held static), a
        list or any pytree of arrays.  Pruned weights are exact zeros (or pass ``masks``).
      example_input: an input of the shapes the model takes (a couple of examples suffice; it
        is only used to trace the model and to evaluate the constants of dead-on-input units).
      masks: optional bool tree over ``params`` (or over ``variables["params"]`` of a Flax
        variables dict), True = kept, applied first; leaves it does not cover are unmasked.

    Returns:
      ``GraphCompacted(params, widths, removed, groups)``: the compacted tree (same container
      and array kinds, NumPy in gives NumPy out, dtypes kept), the new widths and removed
      units per layer, and every dependency group found.

    Raises:
      ValueError: a primitive whose effect on a unit axis is not known acts on a group that
        could otherwise be pruned (the message names the primitive and the leaf), a weight
        is NaN/inf, or a mask does not fit its leaf.
      TypeError: a leaf is traced or a sparse kernel object; ``apply_fn`` is not callable.
    """
    if not callable(apply_fn):
        raise TypeError(f"apply_fn must be callable, got {type(apply_fn).__name__}")
    model = _prepare(params, masks)
    traced = _trace(apply_fn, model, example_input)
    g = traced.graph
    groups = _resolve(g, model.paths)
    work = model.work
    run = _runner(traced, {c.op for grp in groups for c, _ in grp.consumers})
    inputs = (traced.inputs, _perturbed(traced.inputs))
    while True:
        _remove_dead_outputs(groups, work)
        if not any(_remove_constant_units(grp, g, work, run, inputs) for grp in groups):
            break
        for grp in groups:
            grp.stuck[:] = False
    cut = _cut(work, groups)
    widths, removed = _layers(g, groups, model, cut)
    leaves = list(model.leaves)
    for k, i in enumerate(model.arrays):
        leaves[i] = jnp.asarray(cut[k]) if is_jax(model.leaves[i]) else cut[k]
    report = tuple(
        UnitGroup(
            tuple((model.paths[leaf], axis) for leaf, axis, _ in grp.slices),
            grp.size,
            np.flatnonzero(~grp.removed).astype(np.int64),
            "; ".join(grp.reasons) if grp.reasons else None,
        )
        for grp in groups
    )
    return GraphCompacted(
        jax.tree_util.tree_unflatten(model.treedef, leaves), widths, removed, report
    )
