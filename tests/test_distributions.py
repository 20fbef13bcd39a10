import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from prunejax.distributions import (
    custom_sparsity,
    erk_sparsity,
    global_magnitude_sparsity,
    pruned_counts,
    uniform_sparsity,
)
from prunejax.masks import magnitude_masks, random_masks


def _mlp(shapes, seed=0):
    rng = np.random.default_rng(seed)
    return {
        f"Dense_{i}": {
            "kernel": rng.normal(size=s).astype(np.float32),
            "bias": rng.normal(size=(s[1],)).astype(np.float32),
        }
        for i, s in enumerate(shapes)
    }


def _pruned(masks):
    return {k: int(np.size(v["kernel"]) - np.count_nonzero(v["kernel"])) for k, v in masks.items()}


LENET = [(784, 300), (300, 100), (100, 10)]


def test_uniform_is_the_same_everywhere_and_matches_a_scalar():
    params = _mlp([(20, 10), (10, 5)])
    d = uniform_sparsity(params, 0.7)
    assert d == {"Dense_0/kernel": 0.7, "Dense_1/kernel": 0.7}
    a = magnitude_masks(params, d)
    b = magnitude_masks(params, 0.7)
    for k in params:
        np.testing.assert_array_equal(a[k]["kernel"], b[k]["kernel"])
        assert a[k]["bias"].all()


def test_erk_on_lenet_matches_the_closed_form_and_the_budget():
    params = _mlp(LENET)
    s = 0.98
    d = erk_sparsity(params, s)
    sizes = np.array([784 * 300, 300 * 100, 100 * 10])
    ratio = np.array([(784 + 300) / sizes[0], 400 / sizes[1], 110 / sizes[2]])
    n_total = sizes.sum()
    eps = (n_total - round(s * n_total)) / np.sum(ratio * sizes)
    want_density = eps * ratio
    got_density = 1 - np.array([d[f"Dense_{i}/kernel"] for i in range(3)])
    # within one weight of the real-valued ERK allocation
    np.testing.assert_array_less(np.abs(got_density - want_density) * sizes, 1.0 + 1e-9)
    masks = magnitude_masks(params, d)
    assert sum(_pruned(masks).values()) == round(s * n_total)
    # smaller layers keep a larger fraction
    assert got_density[0] < got_density[1] < got_density[2]


def test_erk_saturates_small_layers_at_full_density():
    params = _mlp([(200, 200), (200, 4)])
    d = erk_sparsity(params, 0.5)
    # the tiny layer would get density > 1: it is dense and the big one pays for it
    assert d["Dense_1/kernel"] == 0.0
    assert sum(pruned_counts(params, d).values()) == round(0.5 * (200 * 200 + 200 * 4))


@settings(max_examples=60, deadline=None)
@given(
    shapes=st.lists(st.tuples(st.integers(1, 60), st.integers(1, 60)), min_size=1, max_size=5),
    sparsity=st.floats(0.0, 1.0, allow_nan=False),
    power=st.sampled_from([0.0, 0.5, 1.0, 2.0]),
)
def test_erk_property_budget_exact_and_no_layer_above_full_density(shapes, sparsity, power):
    params = _mlp(shapes)
    d = erk_sparsity(params, sparsity, power_scale=power)
    assert set(d) == {f"Dense_{i}/kernel" for i in range(len(shapes))}
    n_total = sum(a * b for a, b in shapes)
    counts = pruned_counts(params, d)
    assert sum(counts.values()) == round(sparsity * n_total)
    for i, (a, b) in enumerate(shapes):
        v = d[f"Dense_{i}/kernel"]
        assert 0.0 <= v <= 1.0  # density never above 100% (nor below 0%)
        assert 0 <= counts[f"Dense_{i}/kernel"] <= a * b
    # the builders agree with the counts
    masks = magnitude_masks(params, d)
    assert _pruned(masks) == {k.split("/")[0]: c for k, c in counts.items()}


def test_erk_with_where_excludes_a_layer_and_dense_keeps_one_dense():
    params = _mlp(LENET)

    def not_last(path, leaf):
        return leaf.ndim == 2 and not path.startswith("Dense_2")

    d = erk_sparsity(params, 0.9, where=not_last)
    assert set(d) == {"Dense_0/kernel", "Dense_1/kernel"}
    masks = magnitude_masks(params, d, where=not_last)
    assert masks["Dense_2"]["kernel"].all()
    n = 784 * 300 + 300 * 100
    assert sum(_pruned(masks).values()) == round(0.9 * n)

    d2 = erk_sparsity(params, 0.9, dense=["Dense_2/kernel"])
    assert d2["Dense_2/kernel"] == 0.0
    assert sum(pruned_counts(params, d2).values()) == round(0.9 * sum(a * b for a, b in LENET))
    with pytest.raises(ValueError, match="Dense_9"):
        erk_sparsity(params, 0.9, dense=["Dense_9/kernel"])


def test_erk_power_zero_is_uniform_up_to_rounding():
    params = _mlp([(30, 20), (20, 10)])
    d = erk_sparsity(params, 0.6, power_scale=0.0)
    for v in d.values():
        assert abs(v - 0.6) < 1.0 / 200


def test_distributions_feed_random_masks():
    import jax

    params = _mlp(LENET)
    d = erk_sparsity(params, 0.95)
    masks = random_masks(jax.random.key(0), params, d)
    assert sum(_pruned(masks).values()) == round(0.95 * sum(a * b for a, b in LENET))


def test_custom_sparsity_completes_and_validates():
    params = _mlp([(8, 6), (6, 4), (4, 2)])
    d = custom_sparsity(params, {"Dense_0": 0.5, "Dense_2/kernel": 0.25}, default=0.1)
    assert d == {"Dense_0/kernel": 0.5, "Dense_1/kernel": 0.1, "Dense_2/kernel": 0.25}
    with pytest.raises(ValueError, match="Dense_7"):
        custom_sparsity(params, {"Dense_7": 0.5})
    with pytest.raises(ValueError, match="Dense_1/kernel"):
        custom_sparsity(params, {"Dense_1/kernel": 1.5})
    with pytest.raises(ValueError, match="default"):
        custom_sparsity(params, {"Dense_1": 0.5}, default=-0.1)


def test_keras_list_paths():
    rng = np.random.default_rng(0)
    params = [
        rng.normal(size=(10, 5)),
        rng.normal(size=(5,)),
        rng.normal(size=(5, 3)),
        rng.normal(size=(3,)),
    ]
    d = erk_sparsity(params, 0.8)
    assert set(d) == {"0", "2"}
    masks = magnitude_masks(params, d)
    assert sum(int(np.size(m) - m.sum()) for m in masks[::2]) == round(0.8 * 65)


def test_global_magnitude_sparsity_reproduces_the_global_masks():
    params = _mlp([(40, 30), (30, 10), (10, 3)], seed=3)
    params["Dense_1"]["kernel"] *= 5.0  # a layer of large weights keeps more
    d = global_magnitude_sparsity(params, 0.8)
    a = magnitude_masks(params, d)
    b = magnitude_masks(params, 0.8, scope="global")
    for k in params:
        np.testing.assert_array_equal(a[k]["kernel"], b[k]["kernel"])
    assert d["Dense_1/kernel"] < d["Dense_0/kernel"]


def test_bad_input():
    params = _mlp([(4, 3)])
    with pytest.raises(ValueError, match="sparsity"):
        erk_sparsity(params, 1.5)
    with pytest.raises(ValueError, match="sparsity"):
        uniform_sparsity(params, float("nan"))
    with pytest.raises(TypeError):
        erk_sparsity(params, {"Dense_0": 0.5})
    with pytest.raises(ValueError, match="power_scale"):
        erk_sparsity(params, 0.5, power_scale=-1)
    with pytest.raises(ValueError, match="no leaf"):
        erk_sparsity(params, 0.5, where=lambda p, x: False)


@pytest.mark.parametrize("bad", ["0.5", True, np.bool_(False), b"1"])
def test_strings_and_bools_are_refused(bad):
    params = _mlp([(4, 3), (3, 2)])
    for call in (
        lambda: erk_sparsity(params, bad),
        lambda: uniform_sparsity(params, bad),
        lambda: erk_sparsity(params, 0.5, power_scale=bad),
    ):
        with pytest.raises(TypeError):
            call()
