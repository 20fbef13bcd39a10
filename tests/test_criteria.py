import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from prunejax.criteria import (
    movement,
    movement_masks,
    movement_scores,
    score_masks,
    snip_masks,
    snip_masks_from_batch,
    snip_scores,
)
from prunejax.masks import magnitude_masks
from prunejax.models import mlp_apply


def _mlp(shapes, seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    return {
        f"Dense_{i}": {
            "kernel": rng.normal(size=s).astype(dtype),
            "bias": (0.1 * rng.normal(size=(s[1],))).astype(dtype),
        }
        for i, s in enumerate(shapes)
    }


def _loss(params, batch):
    x, y = batch
    logits = mlp_apply(params, x, activation=jnp.tanh)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def test_score_masks_equals_magnitude_masks_on_nonnegative_scores():
    rng = np.random.default_rng(0)
    scores = {"a": rng.random((6, 7)), "b": rng.random((7,)), "c": rng.random((7, 3))}
    for scope in ("layer", "global"):
        a = score_masks(scores, 0.6, scope=scope)
        b = magnitude_masks(scores, 0.6, scope=scope)
        for k in scores:
            np.testing.assert_array_equal(a[k], b[k])


def test_score_masks_keeps_the_highest_signed_scores_ties_by_index():
    scores = {"w": np.array([[-3.0, 2.0, -1.0, 0.5], [2.0, -3.0, 4.0, 0.0]])}
    m = score_masks(scores, 0.5)["w"]
    # pruned: the 4 lowest: -3 (idx 0), -3 (idx 5), -1 (idx 2), 0 (idx 7)
    np.testing.assert_array_equal(m, [[False, True, False, True], [True, False, True, False]])
    # ties: with equal scores the lower index is pruned first
    m = score_masks({"w": -np.ones((2, 3))}, 0.5)["w"]
    np.testing.assert_array_equal(m.reshape(-1), [False, False, False, True, True, True])
    # global ranking across leaves of signed scores
    g = score_masks(
        {"a": np.array([[-5.0, 1.0]]), "b": np.array([[-1.0, 3.0]])}, 0.5, scope="global"
    )
    np.testing.assert_array_equal(g["a"], [[False, True]])
    np.testing.assert_array_equal(g["b"], [[False, True]])


def test_score_masks_under_jit():
    rng = np.random.default_rng(1)
    scores = {"w": jnp.asarray(rng.normal(size=(5, 8)), jnp.float32)}
    eager = score_masks(scores, 0.25, scope="global")
    jitted = jax.jit(lambda s: score_masks(s, 0.25, scope="global"))(scores)
    np.testing.assert_array_equal(eager["w"], jitted["w"])
    assert int((~eager["w"]).sum()) == 10


def test_snip_scores_match_finite_differences_of_the_connection_mask():
    with jax.enable_x64(True):
        params = jax.tree_util.tree_map(jnp.asarray, _mlp([(5, 4), (4, 3)], dtype=np.float64))
        rng = np.random.default_rng(2)
        batch = (jnp.asarray(rng.normal(size=(8, 5))), jnp.asarray(rng.integers(0, 3, 8)))
        grads = jax.grad(_loss)(params, batch)
        scores = snip_scores(params, grads)
        ones = jax.tree_util.tree_map(jnp.ones_like, params)

        @jax.jit
        def loss_of_connections(c):
            # c multiplies every weight: dL/dc at c = 1 is the connection sensitivity
            return _loss(jax.tree_util.tree_map(jnp.multiply, params, c), batch)

        h = 1e-6
        for layer in ("Dense_0", "Dense_1"):
            shape = params[layer]["kernel"].shape
            for i in range(shape[0]):
                for j in range(shape[1]):

                    def at(v, i=i, j=j, layer=layer):
                        c = jax.tree_util.tree_map(lambda a: a, ones)
                        c[layer] = dict(c[layer])
                        c[layer]["kernel"] = c[layer]["kernel"].at[i, j].set(v)
                        return float(loss_of_connections(c))

                    fd = (at(1 + h) - at(1 - h)) / (2 * h)
                    np.testing.assert_allclose(
                        float(scores[layer]["kernel"][i, j]), abs(fd), rtol=1e-6, atol=1e-9
                    )


def test_snip_masks_from_batch_matches_manual_gradients_and_counts():
    params = jax.tree_util.tree_map(jnp.asarray, _mlp([(10, 8), (8, 4)]))
    rng = np.random.default_rng(3)
    batch = (
        jnp.asarray(rng.normal(size=(16, 10)), jnp.float32),
        jnp.asarray(rng.integers(0, 4, 16)),
    )
    grads = jax.grad(_loss)(params, batch)
    a = snip_masks(params, grads, 0.75)
    b = snip_masks_from_batch(_loss, params, batch, 0.75)
    kernels = 10 * 8 + 8 * 4
    pruned = sum(int((~np.asarray(b[k]["kernel"])).sum()) for k in b)
    assert pruned == round(0.75 * kernels)
    for k in params:
        np.testing.assert_array_equal(a[k]["kernel"], b[k]["kernel"])
        assert np.asarray(b[k]["bias"]).all()
    # the kept connections are the largest |w * g| over both layers
    s = snip_scores(params, grads)
    all_scores = np.concatenate([np.asarray(s[k]["kernel"]).ravel() for k in s])
    kept_min = min(float(np.asarray(s[k]["kernel"])[np.asarray(b[k]["kernel"])].min()) for k in s)
    assert kept_min >= np.sort(all_scores)[round(0.75 * kernels) - 1]


def test_snip_with_where_excludes_a_layer_and_layer_scope():
    params = jax.tree_util.tree_map(jnp.asarray, _mlp([(10, 8), (8, 4)]))
    rng = np.random.default_rng(4)
    batch = (
        jnp.asarray(rng.normal(size=(16, 10)), jnp.float32),
        jnp.asarray(rng.integers(0, 4, 16)),
    )

    def first_only(path, leaf):
        return path == "Dense_0/kernel"

    m = snip_masks_from_batch(_loss, params, batch, 0.5, where=first_only)
    assert np.asarray(m["Dense_1"]["kernel"]).all()
    assert int((~np.asarray(m["Dense_0"]["kernel"])).sum()) == 40
    m = snip_masks_from_batch(_loss, params, batch, {"Dense_1/kernel": 0.25}, scope="layer")
    assert np.asarray(m["Dense_0"]["kernel"]).all()
    assert int((~np.asarray(m["Dense_1"]["kernel"])).sum()) == 8


def test_snip_rejects_mismatched_grads():
    params = _mlp([(4, 3)])
    with pytest.raises(ValueError, match="grads"):
        snip_scores(params, {"Dense_0": {"kernel": np.ones((4, 3))}})


def test_movement_accumulates_minus_w_times_g_and_passes_updates_through():
    params = jax.tree_util.tree_map(jnp.asarray, _mlp([(6, 5), (5, 2)]))
    tx = optax.chain(movement(), optax.sgd(0.1))
    state = tx.init(params)
    rng = np.random.default_rng(5)
    want = jax.tree_util.tree_map(lambda p: np.zeros(p.shape), params)
    ref_tx = optax.sgd(0.1)
    ref_state = ref_tx.init(params)
    for _ in range(5):
        g = jax.tree_util.tree_map(
            lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params
        )
        want = jax.tree_util.tree_map(
            lambda s, p, gg: s - np.asarray(p) * np.asarray(gg), want, params, g
        )
        u, state = tx.update(g, state, params)
        ru, ref_state = ref_tx.update(g, ref_state, params)
        for a, b in zip(jax.tree_util.tree_leaves(u), jax.tree_util.tree_leaves(ru), strict=True):
            np.testing.assert_array_equal(a, b)
        params = optax.apply_updates(params, u)
    got = movement_scores(state)
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    m1 = movement_masks(state, 0.5)
    m2 = score_masks(got, 0.5)
    for a, b in zip(jax.tree_util.tree_leaves(m1), jax.tree_util.tree_leaves(m2), strict=True):
        np.testing.assert_array_equal(a, b)


def test_movement_keeps_weights_moving_away_from_zero():
    params = {"w": jnp.array([[1.0, 1.0, -1.0, -1.0]])}
    # gradient descent moves w by -g: g < 0 grows a positive weight, g > 0 shrinks it
    grads = {"w": jnp.array([[-1.0, 1.0, 1.0, -1.0]])}
    tx = movement()
    state = tx.init(params)
    _, state = tx.update(grads, state, params)
    m = movement_masks(state, 0.5, where=lambda p, x: True)["w"]
    np.testing.assert_array_equal(m, [[True, False, True, False]])


def test_movement_needs_params_and_a_state():
    tx = movement()
    p = {"w": jnp.ones((2, 2))}
    with pytest.raises(ValueError, match="params"):
        tx.update(p, tx.init(p))
    with pytest.raises(ValueError, match="movement"):
        movement_scores(optax.adam(1e-3).init(p))
