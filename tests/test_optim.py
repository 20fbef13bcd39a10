import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from prunejax.masks import apply_masks, magnitude_masks
from prunejax.schedules import polynomial_sparsity
from prunejax.transforms import (
    current_masks,
    current_sparsity,
    mask_state,
    masked,
    pruning,
)


def _params(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "Dense_0": {
            "kernel": jnp.asarray(rng.normal(size=(12, 8)), jnp.float32),
            "bias": jnp.asarray(rng.normal(size=(8,)), jnp.float32),
        },
        "Dense_1": {
            "kernel": jnp.asarray(rng.normal(size=(8, 3)), jnp.float32),
            "bias": jnp.zeros((3,), jnp.float32),
        },
    }


def _masks(params, seed=1):
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(
        lambda p: rng.random(p.shape) < (0.4 if p.ndim == 2 else 0.8), params
    )


def _run(tx, params, steps, seed=0):
    state = tx.init(params)
    key = jax.random.key(seed)

    @jax.jit
    def step(params, state, key):
        grads = jax.tree_util.tree_map(
            lambda p: jax.random.normal(jax.random.fold_in(key, p.size), p.shape), params
        )
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    for i in range(steps):
        params, state = step(params, state, jax.random.fold_in(key, i))
    return params, state


def _per_param_subtrees(state, params):
    pdef = jax.tree_util.tree_structure(params)
    found = []
    jax.tree_util.tree_map(
        lambda x: found.append(x) if jax.tree_util.tree_structure(x) == pdef else None,
        state,
        is_leaf=lambda x: jax.tree_util.tree_structure(x) == pdef,
    )
    return found


OPTIMIZERS = {
    "adam": lambda: optax.adam(1e-2),
    "sgd_momentum": lambda: optax.sgd(1e-2, momentum=0.9),
    "adamw": lambda: optax.adamw(1e-2, weight_decay=0.1),
    "chain_decay_sgd": lambda: optax.chain(
        optax.add_decayed_weights(0.1), optax.sgd(1e-2, momentum=0.9, nesterov=True)
    ),
}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_masked_weights_stay_exactly_zero_and_state_is_zero(name):
    params = _params()
    masks = _masks(params)
    params = apply_masks(params, masks)
    new, state = _run(masked(OPTIMIZERS[name](), masks), params, 50)
    for p, m, p0 in zip(
        jax.tree_util.tree_leaves(new),
        jax.tree_util.tree_leaves(masks),
        jax.tree_util.tree_leaves(params),
        strict=True,
    ):
        p, m, p0 = np.asarray(p), np.asarray(m), np.asarray(p0)
        assert np.all(p[~m] == 0.0)
        assert np.all(p[m] != p0[m])  # kept weights did train
    subtrees = _per_param_subtrees(state, params)
    assert subtrees, "expected per-parameter optimizer state (moments/momentum)"
    for sub in subtrees:
        for leaf, m in zip(
            jax.tree_util.tree_leaves(sub), jax.tree_util.tree_leaves(masks), strict=True
        ):
            leaf, m = np.asarray(leaf), np.asarray(m)
            assert np.all(leaf[~m] == 0.0)
            assert np.any(leaf[m] != 0.0)


def test_masked_composes_with_chain():
    params = _params()
    masks = _masks(params)
    params = apply_masks(params, masks)
    tx = optax.chain(optax.clip_by_global_norm(1.0), masked(optax.adam(1e-2), masks))
    new, state = _run(tx, params, 10)
    for p, m in zip(jax.tree_util.tree_leaves(new), jax.tree_util.tree_leaves(masks), strict=True):
        assert np.all(np.asarray(p)[~np.asarray(m)] == 0.0)
    assert isinstance(state, tuple) and len(state) == 2


def test_masked_updates_are_zero_at_pruned_entries():
    params = _params()
    masks = _masks(params)
    tx = masked(optax.sgd(0.1), masks)
    state = tx.init(params)
    grads = jax.tree_util.tree_map(jnp.ones_like, params)
    updates, _ = tx.update(grads, state, params)
    for u, m in zip(
        jax.tree_util.tree_leaves(updates), jax.tree_util.tree_leaves(masks), strict=True
    ):
        u, m = np.asarray(u), np.asarray(m)
        assert np.all(u[~m] == 0.0) and np.all(u[m] == -0.1)


def test_masked_rejects_mismatched_masks():
    params = _params()
    masks = _masks(params)
    bad = {"Dense_0": masks["Dense_0"]}
    with pytest.raises(ValueError, match="masks"):
        masked(optax.adam(1e-3), bad).init(params)
    bad_shape = jax.tree_util.tree_map(lambda m: m, masks)
    bad_shape["Dense_1"]["kernel"] = np.ones((3, 8), bool)
    with pytest.raises(ValueError, match="Dense_1/kernel"):
        masked(optax.adam(1e-3), bad_shape).init(params)
    with pytest.raises(TypeError):
        masked("adam", masks)


def test_mask_state_zeroes_per_param_subtrees_and_leaves_scalars_alone():
    params = _params()
    masks = _masks(params)
    ones = jax.tree_util.tree_map(jnp.ones_like, params)
    state = (
        optax.ScaleByAdamState(count=jnp.asarray(7), mu=ones, nu=ones),
        optax.EmptyState(),
        {"other": jnp.ones((12, 8))},
    )
    out = mask_state(state, masks)
    assert int(out[0].count) == 7
    for sub in (out[0].mu, out[0].nu):
        for leaf, m in zip(
            jax.tree_util.tree_leaves(sub), jax.tree_util.tree_leaves(masks), strict=True
        ):
            np.testing.assert_array_equal(np.asarray(leaf), np.asarray(m, np.float32))
    np.testing.assert_array_equal(np.asarray(out[2]["other"]), 1.0)


def _mask_fn(p, s):
    return magnitude_masks(p, s)


def test_pruning_remasks_at_exactly_the_requested_steps():
    params = _params()
    begin, end, every = 3, 17, 4
    sched = polynomial_sparsity(0.1, 0.8, begin_step=begin, end_step=end)
    tx = pruning(
        optax.adam(1e-2), _mask_fn, sched, begin_step=begin, end_step=end, update_every=every
    )
    state = tx.init(params)

    @jax.jit
    def step(params, state, key):
        grads = jax.tree_util.tree_map(lambda p: jax.random.normal(key, p.shape), params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    changed = []
    prev_s = float(current_sparsity(state))
    for t in range(25):
        params, state = step(params, state, jax.random.key(t))
        s = float(current_sparsity(state))
        if s != prev_s:
            changed.append(t)
            assert s == float(sched(t))
        prev_s = s
        masks = current_masks(state)
        # pruned params are exactly zero after every step, moments too
        for p, m, mu, nu in zip(
            jax.tree_util.tree_leaves(params),
            jax.tree_util.tree_leaves(masks),
            jax.tree_util.tree_leaves(state.inner_state[0].mu),
            jax.tree_util.tree_leaves(state.inner_state[0].nu),
            strict=True,
        ):
            m = np.asarray(m)
            assert np.all(np.asarray(p)[~m] == 0.0)
            assert np.all(np.asarray(mu)[~m] == 0.0) and np.all(np.asarray(nu)[~m] == 0.0)
    assert changed == [3, 7, 11, 15]
    final = current_masks(state)
    k = np.asarray(final["Dense_0"]["kernel"])
    assert (~k).sum() == round(float(sched(15)) * k.size)
    assert np.asarray(final["Dense_0"]["bias"]).all()


def test_pruning_zeroes_newly_pruned_params_exactly():
    # params that are not zero get pruned at step 0: p + (-p) must be exactly 0
    params = _params(3)
    tx = pruning(
        optax.sgd(0.0),
        _mask_fn,
        polynomial_sparsity(0.5, 0.5, 0, 1),
        begin_step=0,
        end_step=1,
        update_every=1,
    )
    state = tx.init(params)
    grads = jax.tree_util.tree_map(jnp.ones_like, params)
    updates, state = tx.update(grads, state, params)
    new = optax.apply_updates(params, updates)
    m = np.asarray(current_masks(state)["Dense_0"]["kernel"])
    k = np.asarray(new["Dense_0"]["kernel"])
    assert (~m).sum() == 48
    assert np.all(k[~m] == 0.0)
    np.testing.assert_array_equal(k[m], np.asarray(params["Dense_0"]["kernel"])[m])


def test_pruning_inside_chain_and_current_masks():
    params = _params()
    tx = optax.chain(
        optax.clip_by_global_norm(1.0),
        pruning(
            optax.sgd(1e-2, momentum=0.9),
            _mask_fn,
            polynomial_sparsity(0.0, 0.5, 0, 4),
            begin_step=0,
            end_step=4,
            update_every=2,
        ),
    )
    params, state = _run(tx, params, 6)
    masks = current_masks(state)
    k = np.asarray(masks["Dense_1"]["kernel"])
    assert (~k).sum() == 12
    assert np.all(np.asarray(params["Dense_1"]["kernel"])[~k] == 0.0)
    with pytest.raises(ValueError, match="no pruning state"):
        current_masks(optax.adam(1e-3).init(params))


def test_pruning_bad_arguments():
    sched = polynomial_sparsity(0.0, 0.5, 0, 10)
    inner = optax.adam(1e-3)
    with pytest.raises(ValueError, match="update_every"):
        pruning(inner, _mask_fn, sched, begin_step=0, end_step=10, update_every=0)
    with pytest.raises(ValueError, match="end_step"):
        pruning(inner, _mask_fn, sched, begin_step=10, end_step=5, update_every=1)
    with pytest.raises(ValueError, match="begin_step"):
        pruning(inner, _mask_fn, sched, begin_step=-1, end_step=5, update_every=1)
    tx = pruning(inner, _mask_fn, sched, begin_step=0, end_step=10, update_every=1)
    params = _params()
    state = tx.init(params)
    with pytest.raises(ValueError, match="needs params"):
        tx.update(params, state)


# ----------------------------------------------------------------------------- update shapes


def _small():
    params = {"w": jnp.zeros((8, 6), jnp.float32), "b": jnp.zeros((6,), jnp.float32)}
    masks = {"w": np.arange(48).reshape(8, 6) % 2 == 0, "b": np.ones(6, bool)}
    return params, masks


@pytest.mark.parametrize("jit", [False, True])
def test_masked_refuses_broadcastable_grads_naming_the_leaf(jit):
    params, masks = _small()
    tx = masked(optax.sgd(0.1), masks)
    state = tx.init(params)
    update = jax.jit(tx.update) if jit else tx.update
    bad = {"w": jnp.ones((1, 6), jnp.float32), "b": jnp.ones((6,), jnp.float32)}
    with pytest.raises(ValueError, match=r"'w'.*\(1, 6\).*\(8, 6\)"):
        update(bad, state, params)
    scalar = {"w": jnp.ones((), jnp.float32), "b": jnp.ones((6,), jnp.float32)}
    with pytest.raises(ValueError, match="'w'"):
        update(scalar, state)
    with pytest.raises(ValueError, match="does not match the masks"):
        update({"w": jnp.ones((8, 6), jnp.float32)}, state)
    with pytest.raises(ValueError, match=r"params leaf 'b'"):
        update(jax.tree_util.tree_map(jnp.ones_like, params), state, {**params, "b": params["w"]})
    good, _ = update(jax.tree_util.tree_map(jnp.ones_like, params), state, params)
    np.testing.assert_array_equal(np.asarray(good["w"]) != 0, masks["w"])


def test_pruning_and_dst_refuse_mismatched_grads():
    from prunejax.transforms import rigl

    params, masks = _small()
    bad = {"w": jnp.ones((1, 6), jnp.float32), "b": jnp.ones((6,), jnp.float32)}
    for tx in (
        pruning(
            optax.sgd(0.1),
            magnitude_masks,
            polynomial_sparsity(0.0, 0.5, 0, 10),
            begin_step=0,
            end_step=10,
            update_every=1,
        ),
        rigl(optax.sgd(0.1), 0.5, delta_t=2, t_end=10),
    ):
        state = tx.init(params)
        with pytest.raises(ValueError, match=r"'w'.*\(1, 6\)"):
            tx.update(bad, state, params)
