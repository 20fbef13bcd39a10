"""``sparse_apply``: the user's own Flax linen, NNX, Equinox and Haiku-style models run with kernel
objects and give the dense masked model's outputs; misuse of a kernel is refused by name."""

from __future__ import annotations

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import prunejax as pj
from prunejax.sparse import TransposedKernel

FORMATS = ["bcoo", "bcsr", "csr", "bcsr_t", "dense_t", "ell", "block"]
TOL = dict(rtol=1e-5, atol=1e-5)


def two_d(path, leaf):
    return np.ndim(leaf) == 2


def sparse(params, fmt):
    """Every 2-D kernel of ``params`` in ``fmt`` (conv kernels stay dense)."""
    return pj.sparsify(params, fmt, where=two_d, block=(4, 4))


def pruned(params, sparsity=0.8):
    return pj.apply_masks(params, pj.magnitude_masks(params, sparsity, where=two_d))


# ----------------------------------------------------------------------------- models


class LinenNet(nn.Module):
    """Conv -> flatten -> Dense -> LayerNorm -> residual Dense block -> Dense."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(4, (3, 3))(x)).reshape(x.shape[0], -1)
        h = nn.LayerNorm()(nn.Dense(16)(x))
        h = h + nn.Dense(16)(nn.relu(h))
        return nn.Dense(8)(h)


class NnxNet(nnx.Module):
    def __init__(self, rngs):
        self.conv = nnx.Conv(1, 4, (3, 3), rngs=rngs)
        self.fc1 = nnx.Linear(4 * 6 * 6, 16, rngs=rngs)
        self.ln = nnx.LayerNorm(16, rngs=rngs)
        self.fc2 = nnx.Linear(16, 16, rngs=rngs)
        self.out = nnx.Linear(16, 8, rngs=rngs)

    def __call__(self, x):
        x = jax.nn.relu(self.conv(x)).reshape(x.shape[0], -1)
        h = self.ln(self.fc1(x))
        h = h + self.fc2(jax.nn.relu(h))
        return self.out(h)


class EqxNet(eqx.Module):
    conv: eqx.nn.Conv2d
    fc1: eqx.nn.Linear
    ln: eqx.nn.LayerNorm
    fc2: eqx.nn.Linear
    out: eqx.nn.Linear

    def __init__(self, key):
        k = jax.random.split(key, 4)
        self.conv = eqx.nn.Conv2d(1, 4, 3, padding=1, key=k[0])
        self.fc1 = eqx.nn.Linear(4 * 6 * 6, 16, key=k[1])
        self.ln = eqx.nn.LayerNorm(16)
        self.fc2 = eqx.nn.Linear(16, 16, key=k[2])
        self.out = eqx.nn.Linear(16, 8, key=k[3])

    def __call__(self, x):  # one example, (1, 6, 6)
        h = self.ln(self.fc1(jax.nn.relu(self.conv(x)).reshape(-1)))
        h = h + self.fc2(jax.nn.relu(h))
        return self.out(h)


@pytest.fixture(scope="module")
def images():
    return jax.random.normal(jax.random.key(1), (5, 6, 6, 1))


@pytest.fixture(scope="module")
def linen(images):
    model = LinenNet()
    params = pruned(model.init(jax.random.key(0), images)["params"])
    return model, params, model.apply({"params": params}, images)


@pytest.fixture(scope="module")
def nnx_model(images):
    graphdef, state = nnx.split(NnxNet(nnx.Rngs(0)))
    state = pruned(state)

    def apply(state, x):
        return nnx.merge(graphdef, state)(x)

    return apply, state, apply(state, images)


@pytest.fixture(scope="module")
def eqx_model(images):
    model = EqxNet(jax.random.key(0))
    params, static = eqx.partition(model, eqx.is_array)
    model = eqx.combine(pruned(params), static)
    x = jnp.moveaxis(images, -1, 1)
    return model, x, jax.vmap(model)(x)


# ----------------------------------------------------------------------------- equality


@pytest.mark.parametrize("fmt", FORMATS)
def test_linen_model_apply_under_jit(linen, images, fmt):
    model, params, ref = linen
    sp = sparse(params, fmt)
    assert pj.format_of(sp["Dense_0"]["kernel"]) == fmt
    assert pj.format_of(sp["Conv_0"]["kernel"]) == "dense"
    out = jax.jit(pj.sparse_apply(model.apply))({"params": sp}, images)
    np.testing.assert_allclose(out, ref, **TOL)


@pytest.mark.parametrize("fmt", ["csr", "bcoo", "dense_t", "block"])
def test_linen_under_vmap_and_eagerly(linen, images, fmt):
    model, params, ref = linen
    sp = {"params": sparse(params, fmt)}
    f = pj.sparse_apply(model.apply)
    per_example = jax.vmap(f, in_axes=(None, 0))(sp, images[:, None])
    np.testing.assert_allclose(per_example[:, 0], ref, **TOL)
    np.testing.assert_allclose(f(sp, images), ref, **TOL)  # no jit at all


@pytest.mark.parametrize("fmt", ["csr", "bcoo", "ell"])
def test_nnx_split_merge_under_jit_and_vmap(nnx_model, images, fmt):
    apply, state, ref = nnx_model
    sp = sparse(state, fmt)
    assert isinstance(sp, nnx.State)
    assert pj.format_of(sp["fc1"]["kernel"].get_value()) == fmt
    out = jax.jit(pj.sparse_apply(apply))(sp, images)
    np.testing.assert_allclose(out, ref, **TOL)
    per = jax.jit(jax.vmap(pj.sparse_apply(apply), in_axes=(None, 0)))(sp, images[:, None])
    np.testing.assert_allclose(per[:, 0], ref, **TOL)


@pytest.mark.parametrize("fmt", ["csr", "bcoo", "dense_t", "block", "bcsr_t"])
def test_equinox_module_out_in_weights(eqx_model, fmt):
    model, x, ref = eqx_model
    sp = sparse(model, fmt)
    assert isinstance(sp, EqxNet)
    assert isinstance(sp.fc1.weight, TransposedKernel) and sp.fc1.weight.shape == (16, 144)
    assert sp.conv.weight.shape == model.conv.weight.shape  # conv stays dense
    np.testing.assert_array_equal(pj.densify(sp).fc1.weight, model.fc1.weight)
    inner = pj.sparse_apply(lambda m, x: jax.vmap(m)(x))  # vmap inside: one batched product
    np.testing.assert_allclose(eqx.filter_jit(inner)(sp, x), ref, **TOL)
    params, static = eqx.partition(sp, eqx.is_array, is_leaf=lambda v: isinstance(v, jax.Array))
    outer = jax.vmap(pj.sparse_apply(lambda m, x: m(x)), in_axes=(None, 0))

    def run(arrays, x):
        return outer(eqx.combine(arrays, static), x)

    np.testing.assert_allclose(jax.jit(run)(params, x), ref, **TOL)


def test_haiku_style_function_and_closures():
    rng = np.random.default_rng(0)
    p = {
        "w1": rng.normal(size=(12, 8)).astype(np.float32),
        "b1": rng.normal(size=(8,)).astype(np.float32),
        "w2": rng.normal(size=(8, 4)).astype(np.float32),
    }
    p = pruned(p, 0.7)
    x = jnp.asarray(rng.normal(size=(3, 12)).astype(np.float32))

    @jax.jit
    def inner(h, w):  # a nested jit: evaluated inline
        return jnp.tanh(h @ w)

    def f(p, x, scale=1.0):
        return scale * inner(x + 0.0, p["w1"]) @ p["w2"] + p["b1"].sum()

    ref = f(p, x, scale=2.0)
    sp = sparse(p, "csr")
    np.testing.assert_allclose(pj.sparse_apply(f)(sp, x, scale=2.0), ref, **TOL)
    closure = jax.jit(lambda x: pj.sparse_apply(f)(sp, x, scale=2.0))  # kernels as constants
    np.testing.assert_allclose(closure(x), ref, **TOL)


def test_kernels_in_scan_cond_and_while_bodies():
    rng = np.random.default_rng(1)
    w = pruned({"w": rng.normal(size=(6, 6)).astype(np.float32)}, 0.5)
    x = jnp.asarray(rng.normal(size=(2, 6)).astype(np.float32))

    def f(p, x, flag):
        h, _ = jax.lax.scan(lambda h, _: (jnp.tanh(h @ p["w"]), None), x, None, length=3)
        h = jax.lax.cond(flag, lambda h: h @ p["w"], lambda h: -h, h)
        return jax.lax.fori_loop(0, 2, lambda i, h: jnp.sin(h @ p["w"]), h)

    sp = sparse(w, "csr")
    g = jax.jit(pj.sparse_apply(f))
    for flag in (True, False):
        np.testing.assert_allclose(g(sp, x, jnp.asarray(flag)), f(w, x, flag), **TOL)


def test_returning_the_kernel_and_same_dtype_conversion():
    w = pruned({"w": np.arange(1.0, 13.0, dtype=np.float32).reshape(4, 3)}, 0.5)
    sp = sparse(w, "csr")

    def f(p, x):
        k = jax.lax.convert_element_type(p["w"], jnp.float32)
        return x @ k, p

    y, p_out = jax.jit(pj.sparse_apply(f))(sp, jnp.ones((2, 4)))
    np.testing.assert_allclose(y, np.ones((2, 4)) @ w["w"], **TOL)
    assert pj.format_of(p_out["w"]) == "csr"
    np.testing.assert_array_equal(p_out["w"].todense(), w["w"])


# ----------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    ("body", "prim"),
    [
        (lambda p, x: x[:, :3] @ p["w"].T, "transpose"),
        (lambda p, x: x @ (p["w"] + 1.0), "add"),
        (lambda p, x: x @ p["w"].reshape(2, 6).reshape(4, 3), "reshape"),
        (lambda p, x: x @ p["w"].astype(jnp.bfloat16), "convert_element_type"),
        (lambda p, x: jnp.einsum("bj,ij->bi", x[:, :3], p["w"]), "dot_general"),
    ],
)
def test_a_kernel_used_by_another_primitive_is_named(body, prim):
    sp = sparse({"w": np.eye(4, 3, dtype=np.float32)}, "csr")
    with pytest.raises(TypeError, match=rf"kernel leaf 'w' of argument 0.*{prim}"):
        pj.sparse_apply(body)(sp, jnp.ones((2, 4)))


def test_refusal_names_nested_leaf_and_keyword(linen, images):
    model, params, _ = linen
    sp = sparse(params, "bcoo")

    def peek(variables, x):
        return model.apply(variables, x) + variables["params"]["Dense_1"]["kernel"].sum()

    with pytest.raises(TypeError, match=r"'params/Dense_1/kernel' of argument 0.*reduce_sum"):
        jax.jit(pj.sparse_apply(peek))({"params": sp}, images)
    with pytest.raises(TypeError, match=r"'Dense_0/kernel' of keyword 'ps'.*transpose"):
        pj.sparse_apply(lambda x, ps: x @ ps["Dense_0"]["kernel"].T)(jnp.ones((1, 16)), ps=sp)


def test_wrong_layout_is_refused_with_a_hint():
    w = {"weight": np.eye(4, 3, dtype=np.float32)}
    sp = sparse(w, "csr")  # (in, out) by default, but the model computes W @ x
    with pytest.raises(TypeError, match="layout"):
        pj.sparse_apply(lambda p, x: p["weight"] @ x)(sp, jnp.ones(3))
    ok = pj.sparsify(w, "csr", layout="out_in")
    np.testing.assert_allclose(
        pj.sparse_apply(lambda p, x: p["weight"] @ x)(ok, jnp.ones(3)), w["weight"] @ np.ones(3)
    )


def test_not_a_function():
    with pytest.raises(TypeError, match="expects a function"):
        pj.sparse_apply({"w": 1})


def test_kernels_inside_checkpoint_and_custom_vjp():
    rng = np.random.default_rng(2)
    w = pruned({"w": rng.normal(size=(6, 6)).astype(np.float32)}, 0.5)
    x = jnp.asarray(rng.normal(size=(2, 6)).astype(np.float32))

    @jax.custom_vjp
    def layer(x, k):
        return jnp.tanh(x @ k)

    layer.defvjp(lambda x, k: (layer(x, k), None), lambda _, g: (g, None))

    def f(p, x):
        h = jax.checkpoint(lambda h: jnp.sin(h @ p["w"]))(x)
        return layer(h, p["w"])

    np.testing.assert_allclose(jax.jit(pj.sparse_apply(f))(sparse(w, "csr"), x), f(w, x), **TOL)


def test_nm_kernels_in_a_linen_model(linen, images):
    model, params, _ = linen
    nm = pj.apply_masks(params, pj.nm_masks(params, 2, 4, axis=0, where=two_d))
    ref = model.apply({"params": nm}, images)
    sp = pj.sparsify(nm, "nm", where=two_d, nm=(2, 4))
    assert pj.format_of(sp["Dense_2"]["kernel"]) == "nm"
    out = jax.jit(pj.sparse_apply(model.apply))({"params": sp}, images)
    np.testing.assert_allclose(out, ref, **TOL)


def test_wrong_layout_message_names_the_axis_the_stored_layout_and_the_fitting_one():
    w = {"weight": np.eye(4, 3, dtype=np.float32)}
    with pytest.raises(
        TypeError,
        match=r"contracting its axis 1, which is the output axis in the layout sparsify stored, "
        r"layout='in_out' \(in, out\).*sparsify\(\.\.\., layout='out_in'\)",
    ):
        pj.sparse_apply(lambda p, x: p["weight"] @ x)(sparse(w, "csr"), jnp.ones(3))
    t = {"weight": np.eye(3, 4, dtype=np.float32)}
    with pytest.raises(
        TypeError,
        match=r"contracting its axis 0, which is the output axis in the layout sparsify stored, "
        r"layout='out_in' \(out, in\).*sparsify\(\.\.\., layout='in_out'\)",
    ):
        pj.sparse_apply(lambda p, x: x @ p["weight"])(
            pj.sparsify(t, "csr", layout="out_in"), jnp.ones(3)
        )
