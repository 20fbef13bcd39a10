"""unit_masks on conv kernels, on (out, in) layouts (Equinox, PyTorch) and the output-layer
default: the bias follows its kernel's units, and the network's outputs are kept unless asked."""

import warnings

import equinox as eqx
import flax.linen as nn
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings

import prunejax as pj

SETTINGS = settings(max_examples=40, deadline=None)


def expected_units(norms: np.ndarray, s: float) -> np.ndarray:
    """Oracle: prune the round(s * n) smallest norms, the lower index first among ties."""
    n = norms.shape[0]
    k = int(np.round(np.float64(s) * n))
    order = sorted(range(n), key=lambda j: (norms[j], j))
    keep = np.ones(n, bool)
    keep[order[:k]] = False
    return keep


def rng_array(seed: int, shape: tuple) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


# ----------------------------------------------------------------------------- (out, in)


def eqx_style_params(widths=(6, 5, 4, 3), seed=0) -> dict:
    """An Equinox-style MLP tree: weight (out, in), bias (out,)."""
    return {
        "layers": [
            {"weight": rng_array(seed + i, (o, i_)), "bias": rng_array(seed + 10 + i, (o,))}
            for i, (i_, o) in enumerate(zip(widths[:-1], widths[1:], strict=True))
        ]
    }


def test_out_in_dict_prunes_rows_with_their_biases():
    p = eqx_style_params()
    m = pj.unit_masks(p, 0.4, layout="out_in")
    for layer, mask in zip(p["layers"][:-1], m["layers"][:-1], strict=True):
        w, mw, mb = layer["weight"], mask["weight"], mask["bias"]
        assert mb.shape == (w.shape[0],)  # the output width, not the input width
        rows = expected_units(np.linalg.norm(w.astype(np.float64), axis=1), 0.4)
        np.testing.assert_array_equal(mb, rows)
        np.testing.assert_array_equal(mw, np.broadcast_to(rows[:, None], w.shape))
        assert (~rows).sum() == round(0.4 * w.shape[0])
    # the output layer keeps its units
    assert m["layers"][-1]["weight"].all() and m["layers"][-1]["bias"].all()


def test_out_in_tree_under_the_default_layout_is_refused_not_mispaired():
    p = eqx_style_params()
    with pytest.raises(ValueError, match=r"'layers/0/bias'.*\(5,\).*6 output units"):
        pj.unit_masks(p, 0.5)


def test_real_equinox_mlp_partitioned_arrays():
    model = eqx.nn.MLP(6, 3, 5, 2, key=jax.random.key(0))
    params, static = eqx.partition(model, eqx.is_array)
    masks = pj.unit_masks(params, 0.4, layout="out_in")
    for i in (0, 1):
        mw, mb = masks.layers[i].weight, masks.layers[i].bias
        assert mb.shape == (5,) and mw.shape == model.layers[i].weight.shape
        w = np.asarray(model.layers[i].weight, np.float64)
        np.testing.assert_array_equal(
            np.asarray(mb), expected_units(np.linalg.norm(w, axis=1), 0.4)
        )
    assert np.asarray(masks.layers[2].weight).all() and np.asarray(masks.layers[2].bias).all()
    # the pruned hidden units of the masked model output exactly zero
    pruned = eqx.combine(pj.apply_masks(params, masks), static)
    x = jax.random.normal(jax.random.key(1), (6,))
    h = jax.nn.relu(pruned.layers[0](x))
    dead = ~np.asarray(masks.layers[0].bias)
    assert dead.sum() == 2 and np.all(np.asarray(h)[dead] == 0.0)
    # opting in prunes the outputs too
    out = pj.unit_masks(params, 0.4, layout="out_in", prune_output=True)
    assert (~np.asarray(out.layers[2].bias)).sum() == round(0.4 * 3)


def test_equinox_conv_bias_of_shape_out_1_1_follows_its_filters():
    conv = eqx.nn.Conv2d(2, 5, 3, key=jax.random.key(0))
    head = eqx.nn.Linear(5, 2, key=jax.random.key(1))
    params, _ = eqx.partition([conv, head], eqx.is_array)
    m = pj.unit_masks(params, 0.4, layout="out_in")  # the (5, 1, 1) bias is selected by ndim
    w = np.asarray(conv.weight, np.float64)
    filters = expected_units(np.linalg.norm(w.reshape(5, -1), axis=1), 0.4)
    np.testing.assert_array_equal(np.asarray(m[0].bias), filters[:, None, None])
    np.testing.assert_array_equal(
        np.asarray(m[0].weight), np.broadcast_to(filters[:, None, None, None], w.shape)
    )
    assert np.asarray(m[1].weight).all()  # the output layer


def test_pytorch_state_dict_dotted_keys():
    p = {
        "fc1.weight": rng_array(0, (4, 6)),
        "fc1.bias": rng_array(1, (4,)),
        "fc2.weight": rng_array(2, (3, 4)),
        "fc2.bias": rng_array(3, (3,)),
    }
    layers = pj.dense_layers(p, layout="out_in")
    assert [(x.name, x.kernel, x.bias) for x in layers] == [("fc1", 1, 0), ("fc2", 3, 2)]
    m = pj.unit_masks(p, 0.5, layout="out_in")
    rows = expected_units(np.linalg.norm(p["fc1.weight"].astype(np.float64), axis=1), 0.5)
    np.testing.assert_array_equal(m["fc1.bias"], rows)
    np.testing.assert_array_equal(m["fc1.weight"][:, 0], rows)
    assert m["fc2.weight"].all() and m["fc2.bias"].all()


def test_bad_layout_is_refused():
    with pytest.raises(ValueError, match="layout"):
        pj.unit_masks(eqx_style_params(), 0.5, layout="oi")


# ----------------------------------------------------------------------------- conv


@SETTINGS
@given(
    shape=st.tuples(st.integers(1, 3), st.integers(1, 3), st.integers(1, 4), st.integers(1, 6)),
    s=st.sampled_from([0.0, 0.25, 0.5, 0.75, 1.0]),
    ord=st.sampled_from([1, 2, np.inf]),
    seed=st.integers(0, 2**16),
    layout=st.sampled_from(["in_out", "out_in"]),
)
def test_conv_filters_by_norm_with_their_bias(shape, s, ord, seed, layout):
    rng = np.random.default_rng(seed)
    k = rng.integers(-2, 3, size=shape).astype(np.float32)  # small integers: many ties
    if layout == "out_in":
        k = np.moveaxis(k, -1, 0)  # OIHW-like: (out, h, w, in) is enough for the norm
    axis = -1 if layout == "in_out" else 0
    out = k.shape[axis]
    p = {
        "Conv_0": {"kernel": k, "bias": rng.normal(size=out).astype(np.float32)},
        "Dense_0": {"kernel": np.ones((out, 2), np.float32), "bias": np.ones(2, np.float32)},
    }
    if layout == "out_in":
        p["Dense_0"]["kernel"] = p["Dense_0"]["kernel"].T
    m = pj.unit_masks(p, s, ord=ord, layout=layout)
    norms = np.linalg.norm(
        np.moveaxis(k, axis, 0).reshape(out, -1).astype(np.float64), ord=ord, axis=1
    )
    filters = expected_units(norms, s)
    np.testing.assert_array_equal(m["Conv_0"]["bias"], filters)
    bshape = [1] * k.ndim
    bshape[axis] = out
    np.testing.assert_array_equal(
        m["Conv_0"]["kernel"], np.broadcast_to(filters.reshape(bshape), k.shape)
    )
    assert m["Dense_0"]["kernel"].all() and m["Dense_0"]["bias"].all()
    # JAX in, JAX out, also under jit
    jm = jax.jit(lambda q: pj.unit_masks(q, s, ord=ord, layout=layout))(
        jax.tree_util.tree_map(jnp.asarray, p)
    )
    np.testing.assert_array_equal(np.asarray(jm["Conv_0"]["kernel"]), m["Conv_0"]["kernel"])


def test_flax_cnn_conv_filters_pruned_output_layer_kept():
    class CNN(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.relu(nn.Conv(4, (3, 3))(x))
            x = nn.relu(nn.Conv(6, (3, 3))(x))
            x = x.reshape(x.shape[0], -1)
            x = nn.relu(nn.Dense(8)(x))
            return nn.Dense(3)(x)

    x = jax.random.normal(jax.random.key(0), (2, 5, 5, 1))
    params = CNN().init(jax.random.key(1), x)["params"]
    m = pj.unit_masks(params, 0.5)
    assert (~np.asarray(m["Conv_0"]["bias"])).sum() == 2
    assert (~np.asarray(m["Conv_1"]["bias"])).sum() == 3
    assert (~np.asarray(m["Dense_0"]["bias"])).sum() == 4
    assert np.asarray(m["Dense_1"]["kernel"]).all() and np.asarray(m["Dense_1"]["bias"]).all()
    # a masked filter's channel is exactly zero after the conv
    conv = params["Conv_0"]
    masked = pj.apply_masks(conv, m["Conv_0"])
    y = nn.Conv(4, (3, 3)).apply({"params": masked}, x)
    dead = ~np.asarray(m["Conv_0"]["bias"])
    assert np.all(np.asarray(y)[..., dead] == 0.0)
    opt = pj.unit_masks(params, 0.5, prune_output=True)
    assert (~np.asarray(opt["Dense_1"]["bias"])).sum() == 2  # round(1.5) of 3 classes


def test_attention_kernel_with_a_2d_bias_is_refused_naming_it():
    p = {
        "query": {"kernel": rng_array(0, (6, 2, 3)), "bias": rng_array(1, (2, 3))},
        "Dense_0": {"kernel": rng_array(2, (6, 4)), "bias": rng_array(3, (4,))},
    }
    with pytest.raises(ValueError, match=r"'query/bias'.*\(2, 3\)"):
        pj.unit_masks(p, 0.5, where=lambda path, leaf: path == "query/kernel", prune_output=True)


def test_norm_parameters_of_a_pruned_width_are_named_in_a_warning():
    p = {
        "BatchNorm_0": {"bias": np.zeros(4, np.float32), "scale": np.ones(4, np.float32)},
        "Conv_0": {"kernel": rng_array(0, (3, 3, 1, 4)), "bias": rng_array(1, (4,))},
        "Dense_0": {"kernel": rng_array(2, (4, 2)), "bias": rng_array(3, (2,))},
    }
    with pytest.warns(UserWarning, match=r"BatchNorm_0/bias.*BatchNorm_0/scale.*'Conv_0/kernel'"):
        m = pj.unit_masks(p, 0.5)
    assert m["BatchNorm_0"]["scale"].all()  # not paired silently
    assert (~m["Conv_0"]["bias"]).sum() == 2


# ----------------------------------------------------------------------------- output layer


def flax_mlp(widths=(6, 5, 4, 3)) -> dict:
    return {
        f"Dense_{i}": {"kernel": rng_array(i, (a, b)), "bias": rng_array(10 + i, (b,))}
        for i, (a, b) in enumerate(zip(widths[:-1], widths[1:], strict=True))
    }


def test_output_layer_kept_by_default_and_prunable_on_opt_in():
    p = flax_mlp()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = pj.unit_masks(p, 0.5)
    assert (~m["Dense_0"]["bias"]).sum() == 2 and (~m["Dense_1"]["bias"]).sum() == 2
    assert m["Dense_2"]["kernel"].all() and m["Dense_2"]["bias"].all()
    opt = pj.unit_masks(p, 0.5, prune_output=True)
    np.testing.assert_array_equal(opt["Dense_0"]["kernel"], m["Dense_0"]["kernel"])
    cols = expected_units(np.linalg.norm(p["Dense_2"]["kernel"].astype(np.float64), axis=0), 0.5)
    np.testing.assert_array_equal(opt["Dense_2"]["bias"], cols)
    assert (~cols).sum() == 2  # round(1.5) = 2


def test_output_layer_forward_order_is_natural_not_lexicographic():
    p = flax_mlp((3, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 2))  # Dense_0 .. Dense_10
    m = pj.unit_masks(p, 0.5)
    assert m["Dense_10"]["kernel"].all()
    assert not m["Dense_9"]["kernel"].all()


def test_output_layer_skipped_with_a_warning_when_named_or_alone():
    p = flax_mlp()
    with pytest.warns(UserWarning, match=r"'Dense_2/kernel'.*prune_output=True"):
        m = pj.unit_masks(p, {"Dense_1": 0.5, "Dense_2": 0.5})
    assert m["Dense_2"]["kernel"].all() and not m["Dense_1"]["kernel"].all()
    with pytest.warns(UserWarning, match=r"'w'.*output layer"):
        m = pj.unit_masks({"w": rng_array(0, (3, 4))}, 0.5)
    assert m["w"].all()


def test_an_embedding_matrix_is_not_taken_for_the_output_layer():
    p = flax_mlp() | {"embed": rng_array(9, (7, 6))}  # "embed" sorts after "Dense_2"
    m = pj.unit_masks(p, 0.5, where=lambda path, leaf: leaf.ndim >= 2 and path != "embed")
    assert m["Dense_2"]["kernel"].all() and not m["Dense_1"]["kernel"].all()


def test_where_idiom_keeps_biases_out():
    p = flax_mlp()
    where = lambda path, leaf: path.startswith("Dense_0/") and leaf.ndim >= 2  # noqa: E731
    m = pj.magnitude_masks(p, 0.5, where=where)
    assert m["Dense_0"]["bias"].all() and not m["Dense_0"]["kernel"].all()
    assert m["Dense_1"]["kernel"].all()
    u = pj.unit_masks(p, 0.5, where=where)
    assert (~u["Dense_0"]["bias"]).sum() == 2 and u["Dense_1"]["kernel"].all()


@pytest.mark.parametrize("bad", ["yes", 1, None])
def test_prune_output_must_be_a_bool(bad):
    with pytest.raises(TypeError, match="prune_output"):
        pj.unit_masks(flax_mlp(), 0.5, prune_output=bad)


@pytest.mark.parametrize("shape", [(0, 3), (3, 0), (3, 3, 0, 2), (2, 0, 3, 4)])
@pytest.mark.parametrize("layout", ["in_out", "out_in"])
def test_empty_kernels_give_masks_of_their_shape(shape, layout):
    for xp in (np, jnp):
        m = pj.unit_masks({"w": xp.ones(shape, xp.float32)}, 0.5, layout=layout, prune_output=True)
        assert np.shape(m["w"]) == shape


def test_equinox_modules_are_detected_and_in_out_is_refused_for_them():
    # a square hidden layer: (out, in) read as (in, out) would fit its bias and go wrong silently
    model = eqx.nn.MLP(4, 2, 4, 2, key=jax.random.key(3))
    params, _ = eqx.partition(model, eqx.is_array)
    detected = pj.unit_masks(params, 0.5)
    explicit = pj.unit_masks(params, 0.5, layout="out_in")
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(np.array_equal, detected, explicit))
    w = np.asarray(model.layers[1].weight, np.float64)
    rows = expected_units(np.linalg.norm(w, axis=1), 0.5)
    np.testing.assert_array_equal(np.asarray(detected.layers[1].weight)[:, 0], rows)
    with pytest.raises(ValueError, match=r"'layers/0'.*Equinox.*layout='out_in'"):
        pj.unit_masks(params, 0.5, layout="in_out")


def test_nnx_state_pairs_kernel_value_with_bias_value():
    from flax import nnx

    class MLP(nnx.Module):
        def __init__(self, rngs):
            self.fc1 = nnx.Linear(6, 4, rngs=rngs)
            self.fc2 = nnx.Linear(4, 3, rngs=rngs)

    _, state = nnx.split(MLP(nnx.Rngs(0)))
    layers = pj.dense_layers(state)
    assert [(x.name, x.kind) for x in layers] == [("fc1", "named"), ("fc2", "named")]
    assert all(x.bias is not None for x in layers)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        m = pj.unit_masks(state, 0.5)
    kernel = np.asarray(state["fc1"]["kernel"][...], np.float64)
    cols = expected_units(np.linalg.norm(kernel, axis=0), 0.5)
    np.testing.assert_array_equal(np.asarray(m["fc1"]["bias"][...]), cols)
    np.testing.assert_array_equal(np.asarray(m["fc1"]["kernel"][...])[0], cols)
    assert np.asarray(m["fc2"]["kernel"][...]).all()


def torch_state_dict() -> dict:
    return {
        "features.0.weight": rng_array(0, (8, 3, 3, 3)),
        "features.0.bias": rng_array(1, (8,)),
        "features.3.weight": rng_array(2, (8, 8, 3, 3)),
        "features.3.bias": rng_array(3, (8,)),
        "classifier.0.weight": rng_array(4, (16, 8)),
        "classifier.0.bias": rng_array(5, (16,)),
        "classifier.3.weight": rng_array(6, (10, 16)),
        "classifier.3.bias": rng_array(7, (10,)),
    }


def test_output_layer_of_a_torch_state_dict_is_the_classifier_with_a_warning():
    sd = torch_state_dict()  # "classifier.*" sorts before "features.*"
    with pytest.warns(UserWarning, match=r"'classifier.3.weight'.*output="):
        m = pj.unit_masks(sd, 0.5, layout="out_in")
    assert m["classifier.3.weight"].all() and m["classifier.3.bias"].all()
    assert not m["features.3.weight"].all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        named = pj.unit_masks(sd, 0.5, layout="out_in", output="classifier.3")
    assert all(np.array_equal(named[k], m[k]) for k in sd)


def test_output_layer_of_a_nested_linen_model_is_named_or_warned():
    # Net: MLP_0 (Dense_0, Dense_1) then the head Dense_0: names do not give the order
    p = {
        "params": {
            "MLP_0": flax_mlp((8, 16, 16)),
            "Dense_0": {"kernel": rng_array(7, (16, 10)), "bias": rng_array(8, (10,))},
        }
    }
    with pytest.warns(UserWarning, match=r"took kernel 'params/MLP_0/Dense_1/kernel'.*output="):
        pj.unit_masks(p, 0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = pj.unit_masks(p, 0.5, output="params/Dense_0/kernel")
    assert m["params"]["Dense_0"]["kernel"].all()
    assert (~m["params"]["MLP_0"]["Dense_1"]["bias"]).sum() == 8


def test_a_layer_named_classifier_is_the_output_layer():
    p = {
        "params": {
            "hidden": flax_mlp((8, 16))["Dense_0"],
            "classifier": flax_mlp((16, 10))["Dense_0"],
        }
    }
    with pytest.warns(UserWarning, match=r"'params/classifier/kernel'"):
        m = pj.unit_masks(p, 0.5)
    assert m["params"]["classifier"]["kernel"].all()
    assert (~m["params"]["hidden"]["bias"]).sum() == 8


def test_clear_orders_keep_the_output_layer_silently():
    head = {"kernel": rng_array(9, (3, 2)), "bias": rng_array(10, (2,))}
    cases = [
        (flax_mlp((3, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 2)), "Dense_10/kernel"),
        (
            {"fc1": flax_mlp((4, 3))["Dense_0"], "fc2": flax_mlp((3, 3))["Dense_0"], "head": head},
            "head/kernel",
        ),
        ({"layers": [flax_mlp((4, 3))["Dense_0"], flax_mlp((3, 2))["Dense_0"]]}, "layers/1/kernel"),
        ([rng_array(0, (4, 3)), rng_array(1, (3,)), rng_array(2, (3, 2)), rng_array(3, (2,))], "2"),
    ]
    for p, out in cases:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            m = pj.unit_masks(p, 0.5)
        kept = [pj._util.path_str(kp) for kp, x in jax.tree_util.tree_flatten_with_path(m)[0]]
        whole = [
            k
            for k, x in zip(kept, jax.tree_util.tree_leaves(m), strict=True)
            if np.ndim(x) >= 2 and np.all(x)
        ]
        assert whole == [out]


def test_output_must_name_a_kernel():
    with pytest.raises(ValueError, match=r"output='Dense_9'.*Dense_0/kernel"):
        pj.unit_masks(flax_mlp(), 0.5, output="Dense_9")
    with pytest.raises(TypeError, match="output"):
        pj.unit_masks(flax_mlp(), 0.5, output=2)
