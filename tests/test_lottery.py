import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prunejax.lottery import imp_step, lottery_ticket, random_reinit, rewind
from prunejax.masks import magnitude_masks

SHAPES = [(12, 10), (10, 4)]


def _params(seed=0):
    rng = np.random.default_rng(seed)
    return {
        f"Dense_{i}": {
            "kernel": rng.normal(size=s).astype(np.float32),
            "bias": rng.normal(size=(s[1],)).astype(np.float32),
        }
        for i, s in enumerate(SHAPES)
    }


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


def test_rewind_restores_initial_values_exactly_at_kept_positions():
    init = _params(0)
    trained = _params(1)
    masks = magnitude_masks(trained, 0.7)
    ticket = rewind(init, masks)
    for t, i, m in zip(_leaves(ticket), _leaves(init), _leaves(masks), strict=True):
        assert t.dtype == i.dtype
        np.testing.assert_array_equal(t[m], i[m])  # bit-exact
        assert (t[~m] == 0).all()
    # JAX in, JAX out
    jticket = rewind(jax.tree_util.tree_map(jnp.asarray, init), masks)
    assert isinstance(jticket["Dense_0"]["kernel"], jax.Array)


def test_imp_step_never_regrows_and_counts_exactly():
    rng = np.random.default_rng(2)
    params = _params(2)
    masks = None
    for s in (0.3, 0.5, 0.8, 0.9):
        # training moves the weights; pruned ones are zero
        params = jax.tree_util.tree_map(
            lambda p: p + 0.1 * rng.normal(size=p.shape).astype(np.float32), params
        )
        new = imp_step(params, masks, s)
        for name, (a, b) in zip(params, [SHAPES[0], SHAPES[1]], strict=True):
            m = np.asarray(new[name]["kernel"])
            assert int((~m).sum()) == round(s * a * b)
            if masks is not None:
                assert not (m & ~np.asarray(masks[name]["kernel"])).any()
            # kept = the largest |w| among those still kept
            w = np.abs(params[name]["kernel"])
            if masks is not None:
                w = np.where(masks[name]["kernel"], w, -1.0)
            assert w[m].min() >= w[~m].max()
        masks = new
        params = jax.tree_util.tree_map(lambda p, m: np.where(m, p, 0), params, masks)


def test_lottery_ticket_driver_rewinds_every_round():
    init = _params(3)
    calls = []

    def train_fn(params, masks):
        calls.append((params, masks))
        rng = np.random.default_rng(len(calls))
        return jax.tree_util.tree_map(
            lambda p, m: np.where(m, p + rng.normal(size=p.shape).astype(np.float32), 0),
            params,
            masks,
        )

    seen = []
    rounds = lottery_ticket(train_fn, init, [0.5, 0.75, 0.9], on_round=seen.append)
    assert [r.round for r in rounds] == [1, 2, 3] and seen == rounds
    assert len(calls) == 4  # the dense training, then one per round
    for params, masks in calls:
        for p, i, m in zip(_leaves(params), _leaves(init), _leaves(masks), strict=True):
            np.testing.assert_array_equal(p[m], i[m])
            assert (p[~m] == 0).all()
    prev = None
    for r, s in zip(rounds, (0.5, 0.75, 0.9), strict=True):
        for name, (a, b) in zip(init, SHAPES, strict=True):
            m = np.asarray(r.masks[name]["kernel"])
            assert int((~m).sum()) == round(s * a * b)
            if prev is not None:
                assert not (m & ~np.asarray(prev[name]["kernel"])).any()
        prev = r.masks


def test_lottery_ticket_late_rewinding_uses_the_given_point_and_trained_net():
    init, early, trained = _params(4), _params(5), _params(6)
    calls = []

    def train_fn(params, masks):
        calls.append(params)
        return params

    rounds = lottery_ticket(train_fn, early, [0.6], trained_params=trained, scope="global")
    assert len(calls) == 1
    m = rounds[0].masks
    # pruned by the trained weights' magnitude (globally), rewound to the early point
    want = magnitude_masks(trained, 0.6, scope="global")
    for a, b in zip(_leaves(m), _leaves(want), strict=True):
        np.testing.assert_array_equal(a, b)
    for p, e, mm in zip(_leaves(calls[0]), _leaves(early), _leaves(m), strict=True):
        np.testing.assert_array_equal(p[mm], e[mm])
    del init


def test_random_reinit_control():
    init = _params(7)
    masks = magnitude_masks(init, 0.5)
    key = jax.random.key(0)
    # permutation within each leaf: same values per layer, new positions
    a = random_reinit(key, masks, init)
    for x, i, m in zip(_leaves(a), _leaves(init), _leaves(masks), strict=True):
        assert (x[~m] == 0).all()
        assert set(x[m].tolist()) <= set(i.ravel().tolist())
    assert not np.array_equal(
        a["Dense_0"]["kernel"], np.where(masks["Dense_0"]["kernel"], init["Dense_0"]["kernel"], 0)
    )
    b = random_reinit(key, masks, init)
    for x, y in zip(_leaves(a), _leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)

    # an initialiser function
    def fresh(k):
        return jax.tree_util.tree_map(
            lambda p: jax.random.normal(jax.random.fold_in(k, p.size), p.shape), init
        )

    c = random_reinit(key, masks, fresh)
    for x, m in zip(_leaves(c), _leaves(masks), strict=True):
        assert (x[~m] == 0).all() and (x[m] != 0).all()


def test_errors():
    with pytest.raises(ValueError, match="sparsities"):
        lottery_ticket(lambda p, m: p, _params(), [])
    with pytest.raises(ValueError):
        random_reinit(
            jax.random.key(0), magnitude_masks(_params(), 0.5), {"Dense_0": _params()["Dense_0"]}
        )
