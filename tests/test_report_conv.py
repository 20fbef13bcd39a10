"""size_report on conv layers: rows of kernel + bias, FLOPs from the given output spatial size
(checked against XLA's own count), None (not a guess) without it."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import prunejax as pj
from prunejax.report import conv_spatial, size_report


class CNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(4, (3, 3), padding="VALID")(x))
        x = nn.relu(nn.Conv(6, (3, 3), strides=2, padding="VALID")(x))
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(8)(x))
        return nn.Dense(3)(x)


X = jnp.ones((1, 8, 8, 2), jnp.float32)
SPATIAL = {"Conv_0": (6, 6), "Conv_1": (2, 2)}  # VALID 8 -> 6; VALID stride 2: 6 -> 2


def cnn_params():
    params = CNN().init(jax.random.key(0), X)["params"]
    params = jax.tree_util.tree_map(np.asarray, params)
    for layer in params.values():
        layer["bias"] = np.full_like(layer["bias"], 0.5)  # nonzero, so nnz counts them
    return params


def xla_conv_flops(kernel: np.ndarray, in_shape: tuple, strides, padding) -> float:
    """XLA's own FLOP count of the conv alone (no bias; VALID padding, since XLA leaves out the
    taps that fall on SAME padding, which the report counts like most FLOP counters)."""
    conv = lambda x: jax.lax.conv_general_dilated(  # noqa: E731
        x, jnp.asarray(kernel), strides, padding, dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    x = jnp.ones(in_shape, jnp.float32)
    return jax.jit(conv).lower(x).compile().cost_analysis()["flops"]


def test_conv_rows_and_flops_match_xla():
    params = cnn_params()
    rep = size_report(params, spatial=SPATIAL)
    rows = {r.name: r for r in rep.layers}
    assert list(rows) == ["Conv_0", "Conv_1", "Dense_0", "Dense_1"]  # kernel + bias per row
    k0, k1 = params["Conv_0"]["kernel"], params["Conv_1"]["kernel"]
    assert rows["Conv_0"].params == k0.size + 4 and rows["Conv_0"].shape == (3, 3, 2, 4)
    assert rows["Conv_0"].flops_dense == 2 * k0.size * 36
    assert rows["Conv_0"].flops_dense == xla_conv_flops(k0, (1, 8, 8, 2), (1, 1), "VALID")
    assert rows["Conv_1"].flops_dense == xla_conv_flops(k1, (1, 6, 6, 4), (2, 2), "VALID")
    t = rep.total()
    assert t["flops_dense"] == sum(r.flops_dense for r in rep.layers)
    assert t["flops_dense"] == 2 * (k0.size * 36 + k1.size * 4 + 24 * 8 + 8 * 3)
    assert rep.predicted_file_bytes["dense"] == rep.file_bytes or rep.file_format != "dense"


def test_sparse_conv_flops_count_the_kept_filters():
    params = cnn_params()
    masks = pj.unit_masks(params, 0.5)
    rep = size_report(params, masks=masks, spatial={"Conv_0/kernel": (6, 6), "Conv_1": (2, 2)})
    row = rep.layers[0]
    kept = int(np.asarray(masks["Conv_0"]["kernel"]).sum())
    assert kept == params["Conv_0"]["kernel"].size // 2
    assert row.flops_sparse == 2 * kept * 36 and row.nnz == kept + 2


def test_conv_flops_without_spatial_are_none_not_guessed():
    rep = size_report(cnn_params(), spatial={"Conv_0": (6, 6)})
    rows = {r.name: r for r in rep.layers}
    assert rows["Conv_0"].flops_dense is not None
    assert rows["Conv_1"].flops_dense is None and rows["Conv_1"].flops_sparse is None
    assert rows["Dense_0"].flops_dense == 2 * 24 * 8
    assert rep.total()["flops_dense"] is None
    assert "Conv_1" in str(rep)


@pytest.mark.parametrize(
    ("spatial", "match"),
    [
        ({"Dense_0": (1, 1)}, "'Dense_0'.*not a conv layer"),
        ({"Conv_9": (6, 6)}, "'Conv_9'"),
        ({"Conv_0": (36,)}, r"spatial\['Conv_0'\].*2 positive"),
        ({"Conv_0": (6, 0)}, r"spatial\['Conv_0'\]"),
        ({"Conv_0": 36}, r"spatial\['Conv_0'\]"),
    ],
)
def test_bad_spatial_is_refused_naming_the_layer(spatial, match):
    with pytest.raises(ValueError, match=match):
        size_report(cnn_params(), spatial=spatial)


def test_conv_spatial_traces_the_output_sizes():
    params = cnn_params()
    spatial = conv_spatial(lambda p, x: CNN().apply({"params": p}, x), params, X)
    assert spatial == {"Conv_0/kernel": (6, 6), "Conv_1/kernel": (2, 2)}
    a = size_report(params, spatial=spatial)
    b = size_report(params, spatial=SPATIAL)
    assert a.total()["flops_dense"] == b.total()["flops_dense"] is not None
    # the batch size does not matter, a ShapeDtypeStruct is enough
    big = jax.ShapeDtypeStruct((32, 8, 8, 2), jnp.float32)
    assert conv_spatial(lambda p, x: CNN().apply({"params": p}, x), params, big) == spatial


def test_conv_spatial_on_an_equinox_cnn_out_in_layout():
    import equinox as eqx

    key1, key2 = jax.random.split(jax.random.key(0))
    model = [eqx.nn.Conv2d(1, 3, 3, stride=2, key=key1), eqx.nn.Linear(27, 2, key=key2)]
    params, static = eqx.partition(model, eqx.is_array)

    def forward(p, x):
        conv, lin = eqx.combine(p, static)
        return lin(jax.nn.relu(conv(x)).reshape(-1))

    spatial = conv_spatial(forward, params, jnp.ones((1, 7, 7)))
    assert spatial == {"0/weight": (3, 3)}
    # size_report on the same arrays in a dict (Equinox modules as containers are another matter)
    tree = {str(i): {"weight": m.weight, "bias": m.bias} for i, m in enumerate(model)}
    rep = size_report(jax.tree_util.tree_map(np.asarray, tree), spatial=spatial)
    conv_row = rep.layers[0]
    assert conv_row.name == "0" and conv_row.flops_dense == 2 * 3 * 1 * 3 * 3 * 9
