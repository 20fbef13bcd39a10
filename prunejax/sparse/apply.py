"""``sparse_apply``: run any model's apply function with kernel objects in place of dense kernels.

The model code stays as the user wrote it (Flax linen ``model.apply``, an NNX ``nnx.merge`` call,
an Equinox module call, a Haiku-style function).  ``sparse_apply(fn)`` traces ``fn`` to a jaxpr
with a dense abstract value for every kernel object among its arguments, then evaluates that
jaxpr, replacing each ``dot_general`` that consumes a kernel by the kernel object's own product
(the pattern of ``jax.experimental.sparse.sparsify``; Han et al. 2015, "Learning both Weights and
Connections for Efficient Neural Networks", run the pruned layers as sparse products the same
way).  Every other primitive runs unchanged.

A kernel may only be multiplied.  The primitives a kernel leaf may meet:

* ``dot_general`` contracting the kernel along its input axis (axis 0 of an ``(in, out)``
  kernel, axis 1 of an ``(out, in)`` :class:`~prunejax.sparse.convert.TransposedKernel`) with one
  axis of the other operand, in either operand position, with any number of free axes on the
  other operand: ``x @ W`` (Flax, NNX, Haiku), ``W @ x`` (Equinox) and their ``vmap``-ped forms.
  The product is computed by the kernel object (with its own arithmetic: the dense product's
  ``precision`` and ``preferred_element_type`` do not apply) and cast to the dtype the dense
  product had.
* passthroughs that provably leave the kernel as it is: ``convert_element_type`` to the
  kernel's own dtype, ``copy``, and returning the kernel as an output of ``fn`` (an NNX
  function that returns its state gets the kernel object back).
* calls that only forward it: nested ``jit``, ``closed_call``, ``checkpoint`` (remat),
  ``custom_jvp_call`` and ``custom_vjp_call`` are evaluated inline (their custom derivative
  rules do not apply to the sparse product); ``cond``, ``scan`` and ``while`` loops that close
  over a kernel (as a constant, not a carry or a scanned-over value) are rebuilt with
  ``lax.switch``/``lax.scan``/``lax.while_loop`` around the same evaluation.

Any other use (``transpose``, ``reshape``, ``add``, a contraction along the output axis, a
kernel in a batch dimension of ``dot_general``, ...) raises ``TypeError`` naming the leaf and the
primitive: such a model needs that kernel dense (leave it out of ``sparsify`` with ``where=``).
Convolution kernels are not kernel objects (``sparsify`` converts 2-D kernels only), so they
run dense as before, and a model mixing convolutions and sparse dense layers works.

Under ``jax.vmap`` of the wrapped function, the product of a batched input with an unbatched
``"csr"`` or ``"block"`` kernel runs as ONE compiled call over all rows (a custom batching
rule), not once per example; the other formats batch by JAX's own rules.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend import core as jcore

from prunejax._util import is_matrix_object, is_traced, path_str
from prunejax.sparse.convert import TransposedKernel

__all__ = ["sparse_apply"]

#: Primitives that only call a sub-jaxpr, evaluated inline: name -> the parameter holding it.
_INLINE = {
    "jit": "jaxpr",
    "pjit": "jaxpr",
    "closed_call": "call_jaxpr",
    "core_call": "call_jaxpr",
    "checkpoint": "jaxpr",
    "remat": "jaxpr",
    "remat2": "jaxpr",
    "custom_jvp_call": "call_jaxpr",
    "custom_vjp_call": "call_jaxpr",
}


@dataclass(frozen=True)
class _Kernel:
    """A kernel object standing where the traced function had a dense array."""

    obj: Any  # the object ``x @ obj`` multiplies with: ``(in, out)``
    path: str  # the leaf's name, for messages
    out_in: bool  # the dense value is ``obj``'s transpose (a TransposedKernel)
    shape: tuple[int, ...]  # the dense value's shape
    dtype: Any

    def describe(self) -> str:
        kind = type(self.obj).__name__
        return f"kernel leaf {self.path} ({kind}, dense shape {self.shape})"


def _refuse(k: _Kernel, prim: str, why: str = "") -> TypeError:
    return TypeError(
        f"sparse_apply: {k.describe()} is used by {prim!r}{why}; a kernel object can only be "
        "multiplied (dot_general along its input axis). Keep this leaf dense: "
        "sparsify(params, where=...) selects the leaves to convert"
    )


def _leaf_name(keypath: tuple) -> str:
    """``'params/Dense_0/kernel' of argument 0``: the name of a leaf of ``(args, kwargs)``."""
    head, rest = keypath[0], keypath[1:]
    where = f"argument {keypath[1].idx}" if head.idx == 0 else f"keyword {keypath[1].key!r}"
    inner = path_str(rest[1:])
    return where if inner == "<root>" else f"{inner!r} of {where}"


def _as_kernel(leaf: Any, name: str) -> _Kernel:
    if isinstance(leaf, TransposedKernel):
        return _Kernel(leaf.inner, name, True, tuple(leaf.shape), leaf.dtype)
    if len(leaf.shape) != 2:
        raise TypeError(f"sparse_apply: kernel leaf {name} has shape {leaf.shape}, not 2-D")
    return _Kernel(leaf, name, False, tuple(leaf.shape), leaf.dtype)


def _is_array(x: Any) -> bool:
    return isinstance(x, jax.Array | np.ndarray | np.generic) or is_traced(x)


def sparse_apply(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Make ``fn`` accept kernel objects from ``prunejax.sparsify`` wherever it takes kernels.

    ``fn`` is the user's unchanged apply function; ``sparse_apply(fn)(*args, **kwargs)`` returns
    what ``fn`` returns on the dense (masked) kernels, up to float rounding, with each matrix
    product that consumes a kernel object run by that object (sparse, compiled or ``dense_t``).
    See the module docstring for the rules.  Kernel objects may sit anywhere in the arguments
    (a Flax ``{"params": ...}`` dict, an ``nnx.State``, inside an Equinox module).  Array leaves
    are traced; every other leaf (Python numbers, strings, functions, ``None``) is passed to
    ``fn`` as it is (static).

    Wrap the result in ``jax.jit`` for speed: outside ``jit`` every call traces ``fn`` again and
    runs its operations one by one.  It works under ``jit``, ``vmap`` and inside other jitted
    functions.

    Args:
      fn: any JAX-traceable function returning a pytree of arrays.

    Returns:
      The wrapped function.

    Raises (when called):
      TypeError: a kernel object used by anything but a matrix product (the message names the
        leaf and the primitive), or a kernel object that is not 2-D.
    """
    if not callable(fn):
        raise TypeError(f"sparse_apply expects a function, got {type(fn).__name__}")

    @functools.wraps(fn)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        flat, treedef = jax.tree_util.tree_flatten_with_path(
            (args, kwargs), is_leaf=is_matrix_object
        )
        dynamic: list[Any] = []
        specs: list[Any] = []
        slots: list[int | None] = []
        for kp, leaf in flat:
            if is_matrix_object(leaf):
                k = _as_kernel(leaf, _leaf_name(kp))
                dynamic.append(k)
                specs.append(jax.ShapeDtypeStruct(k.shape, k.dtype))
            elif _is_array(leaf):
                arr = leaf if isinstance(leaf, jax.Array) or is_traced(leaf) else jnp.asarray(leaf)
                dynamic.append(arr)
                specs.append(
                    jax.ShapeDtypeStruct(arr.shape, arr.dtype, weak_type=jax.typeof(arr).weak_type)
                )
            else:
                slots.append(None)
                continue
            slots.append(len(dynamic) - 1)

        def flat_fn(*dyn: Any) -> Any:
            leaves = [
                leaf if s is None else dyn[s] for (_, leaf), s in zip(flat, slots, strict=True)
            ]
            a, kw = jax.tree_util.tree_unflatten(treedef, leaves)
            return fn(*a, **kw)

        closed, out_shape = jax.make_jaxpr(flat_fn, return_shape=True)(*specs)
        outs = _eval(closed.jaxpr, closed.consts, dynamic)
        outs = [_returned(o) for o in outs]
        return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(out_shape), outs)

    return wrapped


def _returned(x: Any) -> Any:
    """An output of ``fn``: a kernel returned as is becomes its object again."""
    if isinstance(x, _Kernel):
        return TransposedKernel(x.obj) if x.out_in else x.obj
    return x


def _eval(jaxpr: Any, consts: Sequence[Any], args: Sequence[Any]) -> list[Any]:
    """Evaluate ``jaxpr`` with ``_Kernel`` values among its inputs."""
    env: dict[Any, Any] = {}

    def read(a: Any) -> Any:
        return a.val if isinstance(a, jcore.Literal) else env[a]

    def write(v: Any, x: Any) -> None:
        if not isinstance(v, jcore.DropVar):
            env[v] = x

    for v, x in zip(jaxpr.constvars, consts, strict=True):
        write(v, x)
    for v, x in zip(jaxpr.invars, args, strict=True):
        write(v, x)
    for eqn in jaxpr.eqns:
        invals = [read(a) for a in eqn.invars]
        if any(isinstance(x, _Kernel) for x in invals):
            outs = _kernel_rule(eqn, invals)
        else:
            outs = _bind(eqn, invals)
        for v, x in zip(eqn.outvars, outs, strict=True):
            write(v, x)
    return [read(a) for a in jaxpr.outvars]


def _bind(eqn: Any, invals: list[Any]) -> list[Any]:
    """The equation as it was (the way ``jax.core.eval_jaxpr`` binds it)."""
    params = eqn.primitive.get_bind_params(eqn.params)
    subfuns: tuple = ()
    if isinstance(params, tuple):  # older JAX: (subfuns, params)
        subfuns, params = params
    ctx = getattr(getattr(eqn, "ctx", None), "manager", None)
    with ctx if ctx is not None else contextlib.nullcontext():
        outs = eqn.primitive.bind(*subfuns, *invals, **params)
    return outs if eqn.primitive.multiple_results else [outs]


def _kernel_rule(eqn: Any, invals: list[Any]) -> list[Any]:
    """The evaluation of one equation that has a kernel among its inputs."""
    name = eqn.primitive.name
    kernels = [x for x in invals if isinstance(x, _Kernel)]
    if name == "dot_general":
        return [_dot(eqn, invals)]
    if name == "convert_element_type" and np.dtype(eqn.params["new_dtype"]) == np.dtype(
        kernels[0].dtype
    ):
        return [kernels[0]]
    if name in ("copy", "copy_p"):
        return [kernels[0]]
    if name in _INLINE:
        sub = eqn.params[_INLINE[name]]
        if isinstance(sub, jcore.ClosedJaxpr):
            return _eval(sub.jaxpr, sub.consts, invals)
        return _eval(sub, (), invals)
    if name == "cond":
        return _cond(eqn, invals)
    if name == "scan":
        return _scan(eqn, invals)
    if name == "while":
        return _while(eqn, invals)
    raise _refuse(kernels[0], name)


def _no_kernels(values: Sequence[Any], prim: str, role: str) -> None:
    for x in values:
        if isinstance(x, _Kernel):
            raise _refuse(x, prim, f" as {role}")


def _closure(jaxpr: Any, fixed: list[Any]) -> Callable[..., list[Any]]:
    """``f(*dyn)``: evaluate ``jaxpr`` with the ``_Kernel`` entries of ``fixed`` kept and the
    other entries taken, in order, from ``dyn``; outputs must not be kernels."""
    pos = [i for i, x in enumerate(fixed) if not isinstance(x, _Kernel)]

    def f(*dyn: Any) -> list[Any]:
        full = list(fixed)
        for i, d in zip(pos, dyn, strict=True):
            full[i] = d
        outs = _eval(jaxpr.jaxpr, jaxpr.consts, full)
        _no_kernels(outs, "a loop or branch", "an output")
        return outs

    return f


def _dyn(values: list[Any]) -> list[Any]:
    return [x for x in values if not isinstance(x, _Kernel)]


def _cond(eqn: Any, invals: list[Any]) -> list[Any]:
    index, ops = invals[0], invals[1:]
    branches = [_closure(b, ops) for b in eqn.params["branches"]]
    return list(lax.switch(index, branches, *_dyn(ops)))


def _scan(eqn: Any, invals: list[Any]) -> list[Any]:
    p = eqn.params
    nc, ncarry = p["num_consts"], p["num_carry"]
    consts, carry, xs = invals[:nc], invals[nc : nc + ncarry], invals[nc + ncarry :]
    _no_kernels(carry, "scan", "a loop carry")
    _no_kernels(xs, "scan", "a scanned-over value")
    body = _closure(p["jaxpr"], consts + [None] * (ncarry + len(xs)))

    def step(c: tuple, x: tuple) -> tuple:
        outs = body(*_dyn(consts), *c, *x)
        return tuple(outs[:ncarry]), tuple(outs[ncarry:])

    c_out, ys = lax.scan(
        step, tuple(carry), tuple(xs), length=p["length"], reverse=p["reverse"], unroll=p["unroll"]
    )
    return [*c_out, *ys]


def _while(eqn: Any, invals: list[Any]) -> list[Any]:
    p = eqn.params
    cn, bn = p["cond_nconsts"], p["body_nconsts"]
    cconsts, bconsts, init = invals[:cn], invals[cn : cn + bn], invals[cn + bn :]
    _no_kernels(init, "while", "a loop carry")
    cond = _closure(p["cond_jaxpr"], cconsts + [None] * len(init))
    body = _closure(p["body_jaxpr"], bconsts + [None] * len(init))
    out = lax.while_loop(
        lambda c: cond(*_dyn(cconsts), *c)[0],
        lambda c: tuple(body(*_dyn(bconsts), *c)),
        tuple(init),
    )
    return list(out)


def _dot(eqn: Any, invals: list[Any]) -> Any:
    """``dot_general`` with a kernel operand, by the kernel object's ``x @ W``."""
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    lhs, rhs = invals
    if isinstance(lhs, _Kernel) and isinstance(rhs, _Kernel):
        raise _refuse(lhs, "dot_general", f" with another kernel ({rhs.path})")
    kpos = 0 if isinstance(lhs, _Kernel) else 1
    k, x = (lhs, rhs) if kpos == 0 else (rhs, lhs)
    kc, xc, kb = (lc, rc, lb) if kpos == 0 else (rc, lc, rb)
    if kb:
        raise _refuse(k, "dot_general", " in a batch dimension")
    if len(kc) != 1:
        raise _refuse(k, "dot_general", f" contracting {len(kc)} of its axes")
    native = 1 if k.out_in else 0
    if kc[0] != native:
        stored, fits = ("out_in", "in_out") if k.out_in else ("in_out", "out_in")
        shape = "(out, in)" if k.out_in else "(in, out)"
        raise _refuse(
            k,
            "dot_general",
            f" contracting its axis {kc[0]}, which is the output axis in the layout "
            f"sparsify stored, layout={stored!r} {shape}; the model uses it the other way: "
            f"pass sparsify(..., layout={fits!r})",
        )
    xm = jnp.moveaxis(jnp.asarray(x), xc[0], -1)
    y = _product(xm, k.obj)
    if kpos == 0:
        y = jnp.moveaxis(y, -1, 0)
    aval = eqn.outvars[0].aval
    if tuple(y.shape) != tuple(aval.shape):  # pragma: no cover - internal consistency
        raise AssertionError(f"sparse product of shape {y.shape}, expected {aval.shape}")
    return y.astype(aval.dtype)


#: Formats whose compiled products run once per example under ``vmap`` (and define no
#: derivatives): their products get a batching rule that folds the batch into the rows.
_FOLD_BATCH = ("csr", "block")


def _product(x: jax.Array, obj: Any) -> jax.Array:
    """``x @ obj`` (``x`` of shape ``(..., in)``); for the compiled formats, batched under
    ``vmap`` as one product over all rows."""
    if getattr(obj, "format", None) not in _FOLD_BATCH:
        return x @ obj
    leaves, treedef = jax.tree_util.tree_flatten(obj)

    @jax.custom_batching.custom_vmap
    def prod(x: jax.Array, leaves: list) -> jax.Array:
        return x @ jax.tree_util.tree_unflatten(treedef, leaves)

    @prod.def_vmap
    def _rule(axis_size: int, in_batched: list, x: jax.Array, leaves: list) -> tuple:
        x_b, leaves_b = in_batched
        if any(leaves_b):  # a batch of kernels: the object's own batching
            axes = [0 if b else None for b in leaves_b]
            y = jax.vmap(
                lambda xx, ll: xx @ jax.tree_util.tree_unflatten(treedef, ll),
                in_axes=(0 if x_b else None, axes),
            )(x, leaves)
            return y, True
        if not x_b:
            return prod(x, leaves), False
        rows = x.reshape(-1, x.shape[-1])  # batch axis first: fold it into the rows
        y = prod(rows, leaves)
        return y.reshape(*x.shape[:-1], y.shape[-1]), True

    return prod(x, leaves)
