import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from prunejax.distributions import erk_sparsity
from prunejax.masks import apply_masks
from prunejax.transforms import cosine_drop_fraction, dst_masks, dynamic_sparse, rigl, set_sparse

SHAPES = [(24, 16), (16, 8), (8, 3)]


def _params(seed=0):
    rng = np.random.default_rng(seed)
    return {
        f"Dense_{i}": {
            "kernel": jnp.asarray(rng.normal(size=s), jnp.float32),
            "bias": jnp.asarray(rng.normal(size=(s[1],)), jnp.float32),
        }
        for i, s in enumerate(SHAPES)
    }


def _grads(params, key):
    leaves, treedef = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(key, len(leaves))
    return jax.tree_util.tree_unflatten(
        treedef, [jax.random.normal(k, x.shape) for k, x in zip(keys, leaves, strict=True)]
    )


def _stepper(tx):
    @jax.jit
    def step(params, state, key):
        g = _grads(params, key)
        u, state = tx.update(g, state, params)
        return optax.apply_updates(params, u), state, g

    return step


def _adam_moments(state):
    """(mu, nu) of the Adam inside a DSTState."""
    adam_state = state.inner_state[0]
    return adam_state.mu, adam_state.nu


@pytest.mark.parametrize("make", [set_sparse, rigl])
def test_exact_sparsity_every_step_and_zeros_outside_the_mask(make):
    params = _params()
    sparsity = {"Dense_0/kernel": 0.9, "Dense_1/kernel": 0.75, "Dense_2/kernel": 0.5}
    tx = make(optax.adam(1e-2), sparsity, delta_t=3, t_end=35, drop_fraction=0.4, seed=1)
    state = tx.init(params)
    step = _stepper(tx)
    want_active = {
        f"Dense_{i}": s[0] * s[1] - round(sparsity[f"Dense_{i}/kernel"] * s[0] * s[1])
        for i, s in enumerate(SHAPES)
    }
    changes = 0
    prev = dst_masks(state)
    for t in range(40):
        params, state, _ = step(params, state, jax.random.key(t))
        masks = dst_masks(state)
        for name in params:
            m = np.asarray(masks[name]["kernel"])
            assert int(m.sum()) == want_active[name], (t, name)
            assert np.asarray(masks[name]["bias"]).all()
            w = np.asarray(params[name]["kernel"])
            assert (w[~m] == 0).all(), (t, name)  # exactly zero outside the mask
            changes += int((m != np.asarray(prev[name]["kernel"])).sum())
        prev = masks
    assert changes > 0  # the topology did move
    assert int(state.count) == 40


@pytest.mark.parametrize("make", [set_sparse, rigl])
def test_regrown_weights_start_at_zero_with_zero_moments(make):
    params = _params(1)
    tx = make(optax.adam(1e-2), 0.8, delta_t=5, t_end=100, drop_fraction=0.5, seed=2)
    state = tx.init(params)
    params = apply_masks(params, dst_masks(state))
    step = _stepper(tx)
    grown_seen = 0
    for _ in range(30):
        t = int(state.count)  # the step this update performs
        old = dst_masks(state)
        params, state, _ = step(params, state, jax.random.key(100 + t))
        new = dst_masks(state)
        mu, nu = _adam_moments(state)
        for name in params:
            o, n = np.asarray(old[name]["kernel"]), np.asarray(new[name]["kernel"])
            grown = n & ~o
            dropped = o & ~n
            w = np.asarray(params[name]["kernel"])
            for moments in (mu, nu):
                mom = np.asarray(moments[name]["kernel"])
                assert (mom[grown] == 0).all() and (mom[~n] == 0).all()
            assert (w[grown] == 0).all()
            assert (w[dropped] == 0).all()
            if t > 0 and t % 5 == 0:
                grown_seen += int(grown.sum())
                # a weight kept through the update has nonzero moments, unless it was
                # dropped and regrown at this very step: then it restarts at zero too
                restarted = n & o & (np.asarray(nu[name]["kernel"]) == 0)
                assert (w[restarted] == 0).all()
                assert restarted.sum() < (n & o).sum() // 2
            else:
                assert not grown.any() and not dropped.any()
    assert grown_seen > 0


def test_rigl_drops_smallest_magnitudes_and_grows_largest_gradients():
    w = jnp.array([[0.5, -0.1, 0.0, 0.0], [0.3, 0.0, -2.0, 0.0]], jnp.float32)
    mask = np.array([[True, True, False, False], [True, False, True, False]])
    params = {"w": w}
    tx = rigl(
        optax.sgd(0.0),
        initial_masks={"w": mask},
        delta_t=1,
        t_end=10,
        drop_fraction=0.5,
        drop_schedule="constant",
    )
    state = tx.init(params)
    g0 = {"w": jnp.zeros_like(w)}
    # step 0 never updates the topology
    _, state = tx.update(g0, state, params)
    np.testing.assert_array_equal(dst_masks(state)["w"], mask)
    # step 1: k = round(0.5 * 4) = 2 dropped: |-0.1| and |0.3|; grown: the 2 largest |g|
    # among the inactive-after-drop entries (flat 1, 2, 3, 4, 5, 7)
    g = {"w": jnp.array([[9.0, 1.0, 3.0, -5.0], [0.5, 4.0, 9.0, 0.2]], jnp.float32)}
    u, state = tx.update(g, state, params)
    want = np.array([[True, False, False, True], [False, True, True, False]])
    np.testing.assert_array_equal(dst_masks(state)["w"], want)
    new = optax.apply_updates(params, u)["w"]
    np.testing.assert_array_equal(np.asarray(new), np.where(want & mask, np.asarray(w), 0.0))


def test_rigl_cosine_schedule_and_update_steps():
    f = cosine_drop_fraction(0.3, 100)
    np.testing.assert_allclose(float(f(0)), 0.3, rtol=1e-6)
    np.testing.assert_allclose(float(f(50)), 0.15, rtol=1e-6)
    np.testing.assert_allclose(float(f(100)), 0.0, atol=1e-7)
    params = {"w": jnp.asarray(np.random.default_rng(0).normal(size=(20, 10)), jnp.float32)}
    tx = rigl(optax.sgd(0.1), 0.7, delta_t=4, t_end=12, drop_fraction=0.3)
    state = tx.init(params)
    step = _stepper(tx)
    changed_at = []
    for t in range(20):
        old = np.asarray(dst_masks(state)["w"])
        params, state, _ = step(params, state, jax.random.key(t))
        if (np.asarray(dst_masks(state)["w"]) != old).any():
            changed_at.append(t)
    assert changed_at == [4, 8]  # 0 < t < t_end, t % delta_t == 0


def test_set_grows_at_random_and_depends_on_the_seed():
    params = {"w": jnp.asarray(np.random.default_rng(0).normal(size=(30, 20)), jnp.float32)}
    out = []
    for seed in (0, 0, 1):
        tx = set_sparse(optax.sgd(0.1), 0.9, delta_t=1, t_end=5, seed=seed)
        state = tx.init(params)
        p = params
        step = _stepper(tx)
        for t in range(3):
            p, state, _ = step(p, state, jax.random.key(t))
        out.append(np.asarray(dst_masks(state)["w"]))
    np.testing.assert_array_equal(out[0], out[1])
    assert (out[0] != out[2]).any()


def test_where_excludes_a_layer_which_trains_densely():
    params = _params(2)

    def not_last(path, leaf):
        return leaf.ndim == 2 and not path.startswith("Dense_2")

    tx = rigl(
        optax.sgd(0.1),
        erk_sparsity(params, 0.8, where=not_last),
        delta_t=2,
        t_end=20,
        where=not_last,
    )
    state = tx.init(params)
    ref = optax.sgd(0.1)
    step = _stepper(tx)
    for t in range(6):
        new, state, g_used = step(params, state, jax.random.key(t))
        ref_u, _ = ref.update(g_used, ref.init(params), params)
        m = dst_masks(state)
        assert np.asarray(m["Dense_2"]["kernel"]).all()
        np.testing.assert_allclose(
            np.asarray(new["Dense_2"]["kernel"]),
            np.asarray(params["Dense_2"]["kernel"] + ref_u["Dense_2"]["kernel"]),
            rtol=1e-6,
        )
        n_pruned = sum(int((~np.asarray(m[k]["kernel"])).sum()) for k in ("Dense_0", "Dense_1"))
        assert n_pruned == round(0.8 * (24 * 16 + 16 * 8))
        params = new


def test_masks_readable_inside_chain_and_errors():
    params = _params()
    tx = optax.chain(
        optax.clip_by_global_norm(1.0), set_sparse(optax.sgd(0.1), 0.5, delta_t=2, t_end=10)
    )
    state = tx.init(params)
    m = dst_masks(state)
    assert jax.tree_util.tree_structure(m) == jax.tree_util.tree_structure(params)
    with pytest.raises(ValueError, match="dynamic-sparse"):
        dst_masks(optax.sgd(0.1).init(params))
    with pytest.raises(ValueError, match="exactly one"):
        rigl(optax.sgd(0.1), 0.5, initial_masks=m, delta_t=1, t_end=2)
    with pytest.raises(ValueError, match="exactly one"):
        rigl(optax.sgd(0.1), delta_t=1, t_end=2)
    with pytest.raises(ValueError, match="delta_t"):
        rigl(optax.sgd(0.1), 0.5, delta_t=0, t_end=2)
    with pytest.raises(ValueError, match="grow"):
        dynamic_sparse(optax.sgd(0.1), 0.5, grow="magic", delta_t=1, t_end=2)
    with pytest.raises(ValueError, match="drop_fraction"):
        rigl(optax.sgd(0.1), 0.5, delta_t=1, t_end=2, drop_fraction=1.5)
    tx2 = rigl(optax.sgd(0.1), 0.5, delta_t=1, t_end=2)
    with pytest.raises(ValueError, match="params"):
        tx2.update(params, tx2.init(params))
    bad = {"Dense_0": m["Dense_0"]}
    with pytest.raises(ValueError):
        rigl(optax.sgd(0.1), initial_masks=bad, delta_t=1, t_end=2).init(params)
