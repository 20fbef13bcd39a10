import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prunejax.schedules import (
    constant_sparsity,
    iterative_sparsity,
    one_shot_sparsity,
    polynomial_sparsity,
)


def test_polynomial_end_points_and_holds():
    s = polynomial_sparsity(0.1, 0.9, begin_step=100, end_step=1100, power=3)
    assert float(s(100)) == np.float32(0.1)
    assert float(s(1100)) == np.float32(0.9)
    # held at s_i before t0 and at s_f after t0 + n*dt (the definition, not clamping)
    assert float(s(0)) == float(s(100))
    assert float(s(5000)) == float(s(1100))


def test_polynomial_matches_zhu_gupta_formula():
    si, sf, t0, t1, p = 0.0, 0.8, 10, 210, 3.0
    s = polynomial_sparsity(si, sf, t0, t1, power=p)
    for t in (10, 11, 50, 110, 209, 210):
        want = sf + (si - sf) * (1 - (t - t0) / (t1 - t0)) ** p
        assert float(s(t)) == pytest.approx(want, rel=1e-6, abs=1e-7)


def test_polynomial_monotone_and_under_jit():
    s = polynomial_sparsity(0.0, 0.95, begin_step=5, end_step=505)
    steps = jnp.arange(0, 600)
    vals = np.asarray(jax.jit(jax.vmap(s))(steps))
    assert np.all(np.diff(vals) >= 0)
    assert vals[0] == 0.0 and vals[-1] == np.float32(0.95)
    eager = np.array([float(s(int(t))) for t in range(0, 600, 37)])
    np.testing.assert_allclose(vals[::37], eager, rtol=1e-6)


@pytest.mark.parametrize(
    "kwargs, exc",
    [
        (dict(initial=-0.1, final=0.5, begin_step=0, end_step=10), ValueError),
        (dict(initial=0.0, final=1.5, begin_step=0, end_step=10), ValueError),
        (dict(initial=0.0, final=float("nan"), begin_step=0, end_step=10), ValueError),
        (dict(initial=0.6, final=0.5, begin_step=0, end_step=10), ValueError),
        (dict(initial=0.0, final=0.5, begin_step=10, end_step=10), ValueError),
        (dict(initial=0.0, final=0.5, begin_step=-1, end_step=10), ValueError),
        (dict(initial=0.0, final=0.5, begin_step=0, end_step=10, power=0), ValueError),
        (dict(initial=0.0, final=0.5, begin_step=0.5, end_step=10), TypeError),
        (dict(initial="a", final=0.5, begin_step=0, end_step=10), TypeError),
    ],
)
def test_polynomial_bad_arguments(kwargs, exc):
    with pytest.raises(exc):
        polynomial_sparsity(**kwargs)


def test_constant_and_one_shot():
    c = constant_sparsity(0.7)
    assert float(c(0)) == np.float32(0.7) and float(jax.jit(c)(123)) == np.float32(0.7)
    o = one_shot_sparsity(0.9, step=50)
    assert float(o(49)) == 0.0
    assert float(o(50)) == np.float32(0.9)
    assert float(jax.jit(o)(1000)) == np.float32(0.9)
    with pytest.raises(ValueError):
        constant_sparsity(1.1)
    with pytest.raises(ValueError):
        one_shot_sparsity(0.5, step=-3)


def test_iterative_rounds():
    s = iterative_sparsity(3, per_round=0.2)
    np.testing.assert_allclose(s, [0.2, 0.36, 0.488])
    assert iterative_sparsity(2) == iterative_sparsity(2, per_round=0.2)
    f = iterative_sparsity(4, final=0.92)
    assert f[-1] == pytest.approx(0.92)
    assert all(a < b for a, b in zip(f, f[1:], strict=False))
    # the same fraction of the remaining weights is pruned each round
    remaining = 1 - np.array(f)
    np.testing.assert_allclose(remaining[1:] / remaining[:-1], remaining[0])
    with pytest.raises(ValueError):
        iterative_sparsity(0)
    with pytest.raises(ValueError):
        iterative_sparsity(3, per_round=0.2, final=0.9)
    with pytest.raises(ValueError):
        iterative_sparsity(3, per_round=1.2)


@pytest.mark.parametrize("bad", ["0.5", b"0.5", True, False, np.bool_(True), None, 0.5j])
def test_fractions_refuse_strings_bools_and_complex(bad):
    for call in (
        lambda: polynomial_sparsity(bad, 0.9, 0, 10),
        lambda: polynomial_sparsity(0.0, bad, 0, 10),
        lambda: polynomial_sparsity(0.0, 0.9, 0, 10, power=bad),
        lambda: constant_sparsity(bad),
        lambda: one_shot_sparsity(bad),
    ):
        with pytest.raises(TypeError):
            call()
    if bad is not None:  # None means "not given" for per_round and final
        with pytest.raises(TypeError):
            iterative_sparsity(3, per_round=bad)
        with pytest.raises(TypeError):
            iterative_sparsity(3, final=bad)
