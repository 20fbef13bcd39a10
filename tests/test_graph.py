"""compact_graph: dependency groups from the jaxpr, exact physical removal on real Flax models
(residual MLP, CNN with BatchNorm, transformer block), Equinox and NNX containers, refusals."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prunejax.graph import GraphCompacted, compact_graph


def _ones(tree):
    return jax.tree.map(lambda a: np.ones(np.shape(a), bool), tree)


def _masked(tree, masks):
    return jax.tree.map(lambda a, m: np.where(m, a, 0).astype(a.dtype), tree, masks)


def _shapes(tree):
    return jax.tree.map(np.shape, tree)


def _init(model, x, seed=0):
    """Random variables of the model's shapes (no init compile): nonzero biases and statistics,
    positive BatchNorm variances."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(model.init, jax.random.key(0), x)

    def draw(path, a):
        name = jax.tree_util.keystr(path)
        w = rng.standard_normal(a.shape)
        if "var" in name:
            w = np.abs(w) + 0.5
        else:
            w = w / np.sqrt(a.shape[0]) if len(a.shape) > 1 else 0.3 * w
        return w.astype(a.dtype)

    return jax.tree_util.tree_map_with_path(draw, shapes)


def _apply(model, variables, x):
    return jax.jit(model.apply)(variables, x)


def _init_shapes(model, x):
    return _shapes(jax.eval_shape(model.init, jax.random.key(0), x))


def _group(res: GraphCompacted, path: str, axis: int):
    return next(g for g in res.groups if (path, axis) in g.slices)


# ----------------------------------------------------------------------------- residual MLP


class ResMLP(nn.Module):
    width: int = 16
    hidden: int = 32
    head: int = 24
    use_bias_last: bool = True

    @nn.compact
    def __call__(self, x):
        h = nn.Dense(self.width)(x)
        r = nn.relu(nn.Dense(self.hidden)(nn.relu(h)))
        h = h + nn.Dense(self.width)(r)
        h = nn.relu(nn.Dense(self.head)(h))
        return nn.Dense(3, use_bias=self.use_bias_last)(h)


def _resmlp():
    model = ResMLP()
    x = jax.random.normal(jax.random.key(1), (4, 8))
    variables = _init(model, x)
    bias = variables["params"]["Dense_1"]["bias"]
    variables["params"]["Dense_1"]["bias"] = np.abs(bias) + 0.1
    return model, variables, x


def test_residual_mlp_is_exact_and_removes_coupled_units():
    model, variables, x = _resmlp()
    masks = _ones(variables)
    p = masks["params"]
    p["Dense_1"]["kernel"][:, [0, 5, 9, 30]] = False  # dead on input; 0 and 5 keep a bias
    p["Dense_1"]["bias"][[9, 30]] = False
    p["Dense_2"]["kernel"][[3, 7], :] = False  # dead on output
    p["Dense_3"]["kernel"][:, :12] = False
    p["Dense_4"]["kernel"][[12, 13], :] = False
    # residual unit 4: no producer writes it (Dense_0 and Dense_2 columns), so it is a constant
    p["Dense_0"]["kernel"][:, 4] = False
    p["Dense_2"]["kernel"][:, 4] = False
    res = compact_graph(model.apply, variables, x, masks=masks)
    assert res.widths == {
        "params/Dense_0": 15,
        "params/Dense_1": 26,
        "params/Dense_2": 15,
        "params/Dense_3": 10,
        "params/Dense_4": 3,
    }
    np.testing.assert_array_equal(res.removed["params/Dense_1"], [0, 3, 5, 7, 9, 30])
    np.testing.assert_array_equal(res.removed["params/Dense_0"], [4])
    np.testing.assert_array_equal(res.removed["params/Dense_4"], [])
    residual = _group(res, "params/Dense_0/kernel", 1)
    assert ("params/Dense_2/kernel", 1) in residual.slices  # the add ties the two layers
    assert ("params/Dense_3/kernel", 0) in residual.slices and residual.whole is None
    small = ResMLP(15, 26, 10)
    assert _init_shapes(small, x) == _shapes(res.params)
    ref = _apply(model, _masked(variables, masks), x)
    np.testing.assert_allclose(_apply(small, res.params, x), ref, rtol=1e-5, atol=1e-5)


def test_constant_unit_without_a_bias_to_fold_into_is_kept():
    model = ResMLP(use_bias_last=False)
    x = jax.random.normal(jax.random.key(1), (4, 8))
    variables = _init(model, x)
    variables["params"]["Dense_3"]["bias"] = jnp.full((24,), 0.5)
    masks = _ones(variables)
    masks["params"]["Dense_3"]["kernel"][:, [2, 6]] = False  # relu(0.5) != 0 feeds Dense_4
    masks["params"]["Dense_3"]["bias"][6] = False  # relu(0) == 0: removable
    res = compact_graph(model.apply, variables, x, masks=masks)
    np.testing.assert_array_equal(res.removed["params/Dense_3"], [6])
    small = ResMLP(use_bias_last=False, head=23)
    ref = _apply(model, _masked(variables, masks), x)
    np.testing.assert_allclose(_apply(small, res.params, x), ref, rtol=1e-5, atol=1e-5)


def test_numpy_in_numpy_out_and_masks_over_the_params_collection():
    model, variables, x = _resmlp()
    host = jax.tree.map(np.asarray, variables)
    masks = _ones(host["params"])
    masks["Dense_3"]["kernel"][:, 5] = False
    masks["Dense_3"]["bias"][5] = False
    res = compact_graph(model.apply, host, x, masks=masks)
    assert all(type(a) is np.ndarray for a in jax.tree.leaves(res.params))
    assert res.params["params"]["Dense_3"]["kernel"].dtype == np.float32
    assert res.widths["params/Dense_3"] == 23
    assert host["params"]["Dense_3"]["kernel"].shape == (16, 24)  # the input is not modified


# ----------------------------------------------------------------------------- CNN + BatchNorm


class CNN(nn.Module):
    c1: int = 6
    c2: int = 8
    hidden: int = 12

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(self.c1, (3, 3), use_bias=False)(x)
        x = nn.BatchNorm(use_running_average=True)(x)
        x = nn.max_pool(nn.relu(x), (2, 2), (2, 2))
        x = nn.relu(nn.Conv(self.c2, (3, 3))(x))
        x = nn.avg_pool(x, (2, 2), (2, 2))
        x = x.reshape((x.shape[0], -1))
        x = nn.relu(nn.Dense(self.hidden)(x))
        return nn.Dense(4)(x)


def _cnn():
    model = CNN()
    x = jax.random.normal(jax.random.key(1), (3, 8, 8, 2))
    variables = _init(model, x)
    stats = variables["batch_stats"]["BatchNorm_0"]
    stats["var"] = np.abs(stats["var"]) + 0.5
    return model, variables, x


def test_cnn_with_batchnorm_is_exact():
    model, variables, x = _cnn()
    variables["params"]["BatchNorm_0"]["bias"][3] = 2.0
    masks = _ones(variables)
    p = masks["params"]
    p["Conv_0"]["kernel"][..., [1, 3]] = False
    p["BatchNorm_0"]["scale"][1] = False  # channel 1 emits BatchNorm's bias ...
    p["BatchNorm_0"]["bias"][1] = False  # ... zero here: removed
    # channel 3 emits relu(2.0 - mean * scale / sqrt(var + eps)) != 0 into a convolution,
    # whose borders see the padding: no bias can absorb it, so it stays
    p["Conv_1"]["kernel"][:, :, 0, :] = False  # channel 0: dead on output
    p["Conv_1"]["kernel"][..., [2, 5]] = False  # conv channels feeding the flatten ...
    p["Conv_1"]["bias"][2] = False  # ... 5 keeps its bias: relu(b) is folded into Dense_0
    p["Dense_0"]["kernel"][:, [0, 3, 7]] = False
    res = compact_graph(model.apply, variables, x, masks=masks)
    np.testing.assert_array_equal(res.removed["params/Conv_0"], [0, 1])
    np.testing.assert_array_equal(res.removed["params/Conv_1"], [2, 5])
    np.testing.assert_array_equal(res.removed["params/Dense_0"], [0, 3, 7])
    bn = _group(res, "params/Conv_0/kernel", 3)
    for leaf in ("params/BatchNorm_0/scale", "params/BatchNorm_0/bias"):
        assert (leaf, 0) in bn.slices
    for leaf in ("batch_stats/BatchNorm_0/mean", "batch_stats/BatchNorm_0/var"):
        assert (leaf, 0) in bn.slices
    assert ("params/Dense_0/kernel", 0) in _group(res, "params/Conv_1/kernel", 3).slices
    assert res.params["params"]["Dense_0"]["kernel"].shape == (2 * 2 * 6, 9)
    small = CNN(4, 6, 9)
    assert _init_shapes(small, x) == _shapes(res.params)
    ref = _apply(model, _masked(variables, masks), x)
    np.testing.assert_allclose(_apply(small, res.params, x), ref, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- transformer block


class Attention(nn.Module):
    heads: int
    dk: int
    dv: int

    @nn.compact
    def __call__(self, x):
        q = nn.DenseGeneral((self.heads, self.dk), name="query")(x)
        k = nn.DenseGeneral((self.heads, self.dk), name="key")(x)
        v = nn.DenseGeneral((self.heads, self.dv), name="value")(x)
        s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
        o = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, axis=-1), v)
        return nn.DenseGeneral(x.shape[-1], axis=(-2, -1), name="out")(o)


class Block(nn.Module):
    heads: int = 3
    dk: int = 4
    dv: int = 5
    hidden: int = 16

    @nn.compact
    def __call__(self, x):
        x = x + Attention(self.heads, self.dk, self.dv)(nn.LayerNorm()(x))
        h = nn.gelu(nn.Dense(self.hidden)(nn.LayerNorm()(x)))
        return x + nn.Dense(x.shape[-1])(h)


def test_transformer_block_is_exact_and_keeps_the_residual_stream_whole():
    model = Block()
    x = jax.random.normal(jax.random.key(1), (2, 5, 6))
    variables = _init(model, x)
    masks = _ones(variables)
    p = masks["params"]
    p["Dense_0"]["kernel"][:, [0, 3, 7, 9]] = False  # gelu(bias) folded into Dense_1
    p["Dense_0"]["bias"][[0, 3]] = False
    p["Dense_1"]["kernel"][[1, 2], :] = False
    att = p["Attention_0"]
    att["out"]["kernel"][1] = False  # head 1 is read by nothing
    att["value"]["kernel"][:, :, 4] = False  # value feature 4 of every head: a constant ...
    att["value"]["bias"][:, 4] = False  # ... zero
    att["query"]["kernel"][:, :, 0] = False  # query/key features are coupled by the scores
    p["LayerNorm_1"]["scale"][2] = False  # residual unit: coupled by the statistics
    res = compact_graph(model.apply, variables, x, masks=masks)
    assert res.widths["params/Dense_0"] == 10
    assert res.widths["params/Attention_0/query"] == (2, 4)
    assert res.widths["params/Attention_0/value"] == (2, 4)
    assert res.widths["params/Dense_1"] == 6 and res.widths["params/Attention_0/out"] == 6
    residual = _group(res, "params/Dense_1/kernel", 1)
    assert "reduced over by reduce_sum" in residual.whole
    assert ("params/LayerNorm_0/scale", 0) in residual.slices
    scores = _group(res, "params/Attention_0/query/kernel", 2)
    assert "dot_general" in scores.whole and scores.kept.size == 4
    small = Block(heads=2, dk=4, dv=4, hidden=10)
    assert _init_shapes(small, x) == _shapes(res.params)
    ref = _apply(model, _masked(variables, masks), x)
    np.testing.assert_allclose(_apply(small, res.params, x), ref, rtol=1e-5, atol=1e-5)


def test_flax_multi_head_attention_loses_a_head():
    mha = nn.MultiHeadDotProductAttention(num_heads=3, qkv_features=6, out_features=5)
    x = jax.random.normal(jax.random.key(1), (2, 4, 5))
    variables = _init(mha, x)
    masks = _ones(variables)
    masks["params"]["out"]["kernel"][2] = False
    res = compact_graph(mha.apply, variables, x, masks=masks)
    assert res.widths["params/query"] == (2, 2)
    small = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=4, out_features=5)
    ref = _apply(mha, _masked(variables, masks), x)
    np.testing.assert_allclose(_apply(small, res.params, x), ref, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- coupling, refusal


class Gated(nn.Module):
    op: str = "softmax"

    @nn.compact
    def __call__(self, x):
        h = nn.Dense(8)(x)
        if self.op == "softmax":
            h = jax.nn.softmax(h)
        elif self.op == "sort":
            h = jnp.sort(h, axis=-1)
        elif self.op == "gather":
            h = h[:, jnp.array([1, 0, 2, 3, 4, 5, 6, 7])]
        elif self.op == "scale":  # a per-example scalar: units depend on the input without
            h = h * jax.nn.sigmoid(x.sum(axis=1, keepdims=True))  # their producers
        return nn.Dense(2)(h)


def test_softmax_over_units_keeps_the_group_whole():
    model = Gated("softmax")
    x = jax.random.normal(jax.random.key(1), (3, 4))
    variables = _init(model, x)
    masks = _ones(variables)
    masks["params"]["Dense_1"]["kernel"][3] = False
    res = compact_graph(model.apply, variables, x, masks=masks)
    group = _group(res, "params/Dense_0/kernel", 1)
    assert "reduce_max" in group.whole and group.kept.size == 8
    assert res.widths["params/Dense_0"] == 8


def test_input_dependent_broadcast_keeps_constant_units():
    model = Gated("scale")
    x = jax.random.normal(jax.random.key(1), (3, 4))
    variables = _init(model, x)
    variables["params"]["Dense_0"]["bias"] = jnp.full((8,), 0.7)
    masks = _ones(variables)
    masks["params"]["Dense_0"]["kernel"][:, [1, 2]] = False  # 0.7 * sigmoid(sum x): not constant
    masks["params"]["Dense_1"]["kernel"][5] = False  # dead on output: still removable
    res = compact_graph(model.apply, variables, x, masks=masks)
    np.testing.assert_array_equal(res.removed["params/Dense_0"], [5])
    ref = _apply(model, _masked(variables, masks), x)

    class Small(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.Dense(7)(x) * jax.nn.sigmoid(x.sum(axis=1, keepdims=True))
            return nn.Dense(2)(h)

    np.testing.assert_allclose(_apply(Small(), res.params, x), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("op", ["sort", "gather"])
def test_unknown_primitive_on_a_unit_axis_is_refused_naming_op_and_leaf(op):
    model = Gated(op)
    x = jax.random.normal(jax.random.key(1), (3, 4))
    variables = _init(model, x)
    with pytest.raises(ValueError, match=rf"primitive '{op}'.*'params/Dense_0/kernel'"):
        compact_graph(model.apply, variables, x)


def test_bad_arguments():
    model, variables, x = _resmlp()
    with pytest.raises(TypeError, match="apply_fn"):
        compact_graph("apply", variables, x)
    bad = _ones(variables)
    bad["params"]["Dense_0"]["kernel"] = np.ones((3, 3), bool)
    with pytest.raises(ValueError, match="params/Dense_0/kernel"):
        compact_graph(model.apply, variables, x, masks=bad)
    with pytest.raises(ValueError, match="'params/nope'"):
        compact_graph(model.apply, variables, x, masks={"params": {"nope": np.ones(2, bool)}})
    nan = jax.tree.map(np.array, variables)
    nan["params"]["Dense_1"]["bias"][0] = np.nan
    with pytest.raises(ValueError, match="params/Dense_1/bias"):
        compact_graph(model.apply, nan, x)

    @jax.jit
    def traced(v):
        return compact_graph(model.apply, v, x)

    with pytest.raises(TypeError, match="traced"):
        traced(variables)


# ----------------------------------------------------------------------------- other containers


def _fill(tree, seed=0):
    """Random arrays in place of the ShapeDtypeStructs of an abstract (eval_shape) tree."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda a: (
            jnp.asarray(0.5 * rng.standard_normal(a.shape), a.dtype)
            if isinstance(a, jax.ShapeDtypeStruct)
            else a
        ),
        tree,
    )


def test_equinox_module_in_equinox_module_out():
    eqx = pytest.importorskip("equinox")
    mlp = _fill(eqx.filter_eval_shape(eqx.nn.MLP, 6, 3, 10, 2, key=jax.random.key(0)))
    x = np.random.default_rng(1).standard_normal((4, 6)).astype(np.float32)
    w0 = mlp.layers[0].weight.at[jnp.array([0, 2, 7])].set(0)  # (out, in): rows are units
    b0 = mlp.layers[0].bias.at[jnp.array([0, 2])].set(0).at[7].set(0.5)  # 7: folded
    w1 = mlp.layers[1].weight.at[:, jnp.array([0, 2, 5])].set(0)
    pruned = eqx.tree_at(
        lambda m: (m.layers[0].weight, m.layers[0].bias, m.layers[1].weight), mlp, (w0, b0, w1)
    )
    res = compact_graph(lambda m, v: jax.vmap(m)(v), pruned, x)
    assert isinstance(res.params, eqx.nn.MLP)
    assert res.params.layers[0].weight.shape == (6, 6)
    assert res.params.layers[1].weight.shape == (10, 6)
    assert res.widths == {"layers/0": 6, "layers/1": 10, "layers/2": 3}
    run = eqx.filter_jit(lambda m, v: jax.vmap(m)(v))
    np.testing.assert_allclose(run(res.params, x), run(pruned, x), rtol=1e-5, atol=1e-5)


def test_nnx_state_in_nnx_state_out():
    from flax import nnx

    class Net(nnx.Module):
        def __init__(self, hidden: int, rngs: nnx.Rngs):
            self.fc1 = nnx.Linear(6, hidden, rngs=rngs)
            self.fc2 = nnx.Linear(hidden, 3, rngs=rngs)

        def __call__(self, x):
            return self.fc2(nnx.relu(self.fc1(x)))

    graphdef, state = nnx.split(nnx.eval_shape(lambda: Net(10, nnx.Rngs(0))))
    state = _fill(state)
    x = np.random.default_rng(1).standard_normal((4, 6)).astype(np.float32)
    state["fc2"]["kernel"][...] = state["fc2"]["kernel"][...].at[jnp.array([1, 4])].set(0)
    res = compact_graph(lambda s, v: nnx.merge(graphdef, s)(v), state, x)
    assert type(res.params) is type(state)
    assert res.widths == {"fc1": 8, "fc2": 3}
    small_def, _ = nnx.split(nnx.eval_shape(lambda: Net(8, nnx.Rngs(0))))

    @jax.jit
    def run(s, v):
        return nnx.merge(small_def if s["fc1"]["bias"].shape == (8,) else graphdef, s)(v)

    np.testing.assert_allclose(run(res.params, x), run(state, x), rtol=1e-5, atol=1e-5)


def test_plain_function_through_custom_vjp_and_checkpoint():
    @jax.custom_vjp
    def act(x):
        return jnp.maximum(x, 0)

    act.defvjp(lambda x: (act(x), x), lambda x, g: (g * (x > 0),))

    def apply(p, x):
        h = jax.checkpoint(jnp.tanh)(act(x @ p["w1"] + p["b1"]))
        return h @ p["w2"] + p["b2"]

    rng = np.random.default_rng(0)
    p = {
        "w1": rng.standard_normal((4, 6)).astype(np.float32),
        "b1": np.abs(rng.standard_normal(6)).astype(np.float32) + 0.1,
        "w2": rng.standard_normal((6, 2)).astype(np.float32),
        "b2": np.zeros(2, np.float32),
    }
    p["w1"][:, [1, 3]] = 0  # tanh(relu(b1)) != 0: folded into b2
    p["w2"][5] = 0
    x = rng.standard_normal((3, 4)).astype(np.float32)
    res = compact_graph(apply, p, x)
    assert res.widths == {"w1": 3, "w2": 2}
    assert np.abs(res.params["b2"]).max() > 0
    np.testing.assert_allclose(apply(res.params, x), apply(p, x), rtol=1e-5, atol=1e-6)


def _gated_params(rng):
    n = lambda *s: (rng.standard_normal(s) / np.sqrt(s[0])).astype(np.float32)  # noqa: E731
    p = {
        "l1": {"kernel": n(6, 5), "bias": n(5) + 0.5},
        "l2": {"kernel": n(5, 3), "bias": n(3)},
        "g": {"v": n(6, 5), "s": np.ones(5, np.float32)},
    }
    p["l1"]["kernel"][:, 0] = 0.0  # unit 0 is dead on input: relu(bias) * gate(x)
    return p


def _weight_normed_gate(p, x):
    v = p["g"]["v"]
    gate = jax.nn.sigmoid(x @ (v * (p["g"]["s"] / jnp.linalg.norm(v, axis=0))))
    hidden = jax.nn.relu(x @ p["l1"]["kernel"] + p["l1"]["bias"]) * gate
    return hidden @ p["l2"]["kernel"] + p["l2"]["bias"]


@pytest.mark.parametrize("example", ["ones", "one row", "two rows"])
def test_an_input_dependent_unit_is_not_folded_on_a_degenerate_example(example):
    rng = np.random.default_rng(1)
    p = _gated_params(rng)
    x = rng.standard_normal((4, 6)).astype(np.float32)
    ex = {"ones": np.ones((2, 6), np.float32), "one row": x[:1], "two rows": x[:2]}[example]
    res = compact_graph(_weight_normed_gate, p, ex)
    assert res.widths["l1"] == 5  # the dead-on-input unit is gated by the input: kept
    np.testing.assert_allclose(
        _weight_normed_gate(res.params, x), _weight_normed_gate(p, x), rtol=1e-5, atol=1e-5
    )


def test_a_constant_of_apply_fn_along_the_units_keeps_them_whole():
    rng = np.random.default_rng(2)
    cst = rng.standard_normal(5).astype(np.float32)
    p = {
        "a": {
            "kernel": rng.standard_normal((6, 5)).astype(np.float32),
            "bias": np.ones(5, np.float32),
        },
        "c": {
            "kernel": rng.standard_normal((5, 3)).astype(np.float32),
            "bias": np.zeros(3, np.float32),
        },
    }
    p["c"]["kernel"][1] = 0.0  # unit 1 is dead on output

    def fn(q, x):
        return (jax.nn.relu(x @ q["a"]["kernel"] + q["a"]["bias"]) * cst) @ q["c"]["kernel"]

    x = rng.standard_normal((4, 6)).astype(np.float32)
    res = compact_graph(fn, p, x[:2])
    assert res.widths["a"] == 5
    (grp,) = [u for u in res.groups if ("a/kernel", 1) in u.slices]
    assert "carried by a constant of apply_fn" in grp.whole
    np.testing.assert_allclose(fn(res.params, x), fn(p, x), rtol=1e-6)
