import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import sparse as jsparse

from prunejax.masks import apply_masks, magnitude_masks
from prunejax.models import MLP, mlp_apply


@pytest.fixture(scope="module")
def small():
    model = MLP(features=(16, 8, 4))
    x = jax.random.normal(jax.random.key(1), (5, 12))
    params = model.init(jax.random.key(0), x)["params"]
    return model, params, x


def test_default_is_lenet_300_100():
    params = MLP().init(jax.random.key(0), jnp.ones((1, 28, 28)))["params"]
    shapes = [params[f"Dense_{i}"]["kernel"].shape for i in range(3)]
    assert shapes == [(784, 300), (300, 100), (100, 10)]
    assert [params[f"Dense_{i}"]["bias"].shape for i in range(3)] == [(300,), (100,), (10,)]


def test_matches_mlp_apply(small):
    model, params, x = small
    np.testing.assert_allclose(
        model.apply({"params": params}, x), mlp_apply(params, x), rtol=1e-6, atol=1e-6
    )


def test_masked_and_bcoo_kernels_give_the_same_output(small):
    model, params, x = small
    masks = magnitude_masks(params, 0.7)
    pruned = apply_masks(params, masks)
    want = model.apply({"params": pruned}, x)
    sp = {
        name: {"kernel": jsparse.BCOO.fromdense(layer["kernel"]), "bias": layer["bias"]}
        for name, layer in pruned.items()
    }
    got = jax.jit(lambda p, x: model.apply({"params": p}, x))(sp, x)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    got_eager = model.apply({"params": sp}, x)
    np.testing.assert_allclose(got_eager, want, rtol=1e-5, atol=1e-5)


def test_compacted_params_give_the_same_output(small):
    model, params, x = small
    # kill hidden units 0, 3, 5 of the first layer (columns of Dense_0, rows of Dense_1)
    dead = np.array([0, 3, 5])
    keep = np.setdiff1d(np.arange(16), dead)
    masks = jax.tree_util.tree_map(lambda p: np.ones(p.shape, bool), params)
    masks["Dense_0"]["kernel"][:, dead] = False
    masks["Dense_0"]["bias"][dead] = False
    pruned = apply_masks(params, masks)
    want = model.apply({"params": pruned}, x)
    compact = {
        "Dense_0": {
            "kernel": pruned["Dense_0"]["kernel"][:, keep],
            "bias": pruned["Dense_0"]["bias"][keep],
        },
        "Dense_1": {"kernel": pruned["Dense_1"]["kernel"][keep], "bias": pruned["Dense_1"]["bias"]},
        "Dense_2": pruned["Dense_2"],
    }
    # the same module (widths only matter at init) and one rebuilt from the params
    for m in (model, MLP.from_params(compact)):
        got = jax.jit(lambda p, x, m=m: m.apply({"params": p}, x))(compact, x)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert MLP.from_params(compact).features == (13, 8, 4)


def test_dropout_only_in_training(small):
    _, params, x = small
    model = MLP(features=(16, 8, 4), dropout=0.5)
    det = model.apply({"params": params}, x)
    np.testing.assert_allclose(det, mlp_apply(params, x), rtol=1e-6, atol=1e-6)
    a = model.apply({"params": params}, x, train=True, rngs={"dropout": jax.random.key(0)})
    b = model.apply({"params": params}, x, train=True, rngs={"dropout": jax.random.key(1)})
    assert not np.allclose(a, det) and not np.allclose(a, b)


def test_from_params_rejects_non_mlp_trees():
    with pytest.raises(TypeError):
        MLP.from_params([np.ones((3, 2)), np.ones(2)])
    with pytest.raises(ValueError, match="Dense_0"):
        MLP.from_params({"Dense_1": {"kernel": np.ones((3, 2))}})
    with pytest.raises(ValueError, match="2-D"):
        MLP.from_params({"Dense_0": {"kernel": np.ones((3,))}})


def test_bad_dropout_rate(small):
    _, params, x = small
    with pytest.raises(ValueError, match="dropout"):
        MLP(features=(16, 8, 4), dropout=1.0).apply({"params": params}, x)
