"""Sharding in, sharding out, and sharded training, on 8 forced CPU devices.

The checks run in a subprocess (``python tests/test_sharding.py MODE``): the device count is fixed
when JAX starts, and the rest of the suite runs on one device.  MODE is the mesh's axis type,
``auto`` (GSPMD/Shardy propagation) or ``explicit`` (shardings in the types).
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


def _run(mode: str) -> str:
    env = dict(os.environ)
    env["XLA_FLAGS"] = env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run(
        [sys.executable, str(Path(__file__)), mode],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


@pytest.mark.parametrize("mode", ["auto", "explicit"])
def test_sharding_is_kept_and_sharded_training_matches(mode):
    out = _run(mode)
    assert "BUILDERS OK" in out and "TRANSFORMS OK" in out and "TRAINING OK" in out, out


# ----------------------------------------------------------------------------- the subprocess


def _setup(mode):
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import AxisType, NamedSharding
    from jax.sharding import PartitionSpec as P

    assert jax.device_count() == 8, jax.devices()
    kind = AxisType.Auto if mode == "auto" else AxisType.Explicit
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(kind, kind))
    rng = np.random.default_rng(0)
    host = {
        "d0": {
            "kernel": rng.normal(size=(16, 32)).astype(np.float32),
            "bias": rng.normal(size=(32,)).astype(np.float32),
        },
        "d1": {
            "kernel": rng.integers(-3, 4, (32, 8)).astype(np.float32),  # ties
            "bias": np.zeros(8, np.float32),
        },
    }
    specs = {
        "d0": {"kernel": P(None, "model"), "bias": P("model")},
        "d1": {"kernel": P("model", None), "bias": P()},
    }
    shardings = jax.tree_util.tree_map(
        lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda s: isinstance(s, P)
    )
    params = jax.tree_util.tree_map(lambda x, s: jax.device_put(jnp.asarray(x), s), host, shardings)
    return mesh, host, params, shardings


def _same_sharding(tree, like, what):
    import jax

    for (kp, a), b in zip(
        jax.tree_util.tree_flatten_with_path(tree)[0], jax.tree_util.tree_leaves(like), strict=True
    ):
        assert a.sharding.is_equivalent_to(b.sharding, a.ndim), (
            what,
            jax.tree_util.keystr(kp),
            a.sharding,
            b.sharding,
        )


def _check_builders(params, host):
    import jax
    import numpy as np

    import prunejax as pj

    builders = {
        "magnitude": lambda p: pj.magnitude_masks(p, 0.5),
        "magnitude global": lambda p: pj.magnitude_masks(p, 0.7, scope="global"),
        "unit": lambda p: pj.unit_masks(p, 0.5),
        "threshold": lambda p: pj.threshold_masks(p, 0.5),
        "nm": lambda p: pj.nm_masks(p, 2, 4),
        "block": lambda p: pj.block_masks(p, 0.5, block=(4, 4)),
        "random": lambda p: pj.random_masks(jax.random.key(0), p, 0.5),
    }
    for name, f in builders.items():
        want = f(host)  # the NumPy result on one host
        for tag, g in (("eager", f), ("jit", jax.jit(f))):
            got = g(params)
            _same_sharding(got, params, f"{name} {tag}")
            for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)
    m = pj.magnitude_masks(params, 0.5)
    _same_sharding(pj.apply_masks(params, m), params, "apply_masks")
    _same_sharding(jax.jit(pj.apply_masks)(params, m), params, "apply_masks jit")
    _same_sharding(pj.combine(m, m), params, "combine")
    _same_sharding(jax.jit(pj.combine)(m, m), params, "combine jit")
    print("BUILDERS OK")


def _transforms():
    import optax

    import prunejax as pj

    return {
        "masked": lambda p: pj.masked(optax.adam(1e-2), pj.magnitude_masks(p, 0.5)),
        "pruning": lambda p: pj.pruning(
            optax.sgd(0.1, momentum=0.9),
            lambda q, s: pj.magnitude_masks(q, s, scope="global"),
            pj.polynomial_sparsity(0.0, 0.8, 0, 3),
            begin_step=0,
            end_step=3,
            update_every=1,
        ),
        "set": lambda p: pj.set_sparse(optax.adam(1e-2), 0.6, delta_t=1, t_end=10, seed=1),
        "rigl": lambda p: pj.rigl(optax.adam(1e-2), 0.6, delta_t=1, t_end=10, seed=1),
    }


def _masks_of(name, state):
    import prunejax as pj

    if name == "pruning":
        return pj.current_masks(state)
    if name in ("set", "rigl"):
        return pj.dst_masks(state)
    return None


def _train(name, make, params, x, y, steps=3, out=None):
    """``steps`` jitted steps; returns the params, masks and exact pruned counts after each."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    def mm(a, b):  # an explicit mesh asks where a product over a sharded axis goes
        if out is None:
            return a @ b
        return jnp.matmul(a, b, out_sharding=out)

    def loss(p, x, y):
        h = jnp.tanh(mm(x, p["d0"]["kernel"]) + p["d0"]["bias"])
        return jnp.mean((mm(h, p["d1"]["kernel"]) + p["d1"]["bias"] - y) ** 2)

    tx = make(params)
    state = tx.init(params)

    @jax.jit
    def step(p, s, x, y):
        g = jax.grad(loss)(p, x, y)
        u, s = tx.update(g, s, p)
        return jax.tree_util.tree_map(lambda a, b: a + b, p, u), s, u

    history = []
    for _ in range(steps):
        params, state, updates = step(params, state, x, y)
        masks = _masks_of(name, state)
        if masks is not None:
            for w, m in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(masks)):
                assert not np.any(np.asarray(w)[~np.asarray(m)]), name  # exactly zero
        history.append((params, masks, updates, state))
    return history


def _check_training(params, host, shardings, mesh):
    import jax
    import numpy as np
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import prunejax as pj

    rng = np.random.default_rng(1)
    x = rng.normal(size=(8, 16)).astype(np.float32)
    y = rng.normal(size=(8, 8)).astype(np.float32)
    xs = jax.device_put(x, NamedSharding(mesh, P("data", None)))
    ys = jax.device_put(y, NamedSharding(mesh, P("data", None)))
    one = jax.devices()[0]
    explicit = any(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types)
    out = P("data", None) if explicit else None
    for name, make in _transforms().items():
        single = _train(
            name, make, jax.device_put(host, one), jax.device_put(x, one), jax.device_put(y, one)
        )
        with jax.set_mesh(mesh):
            sharded = _train(name, make, params, xs, ys, out=out)
        for t, (a, b) in enumerate(zip(single, sharded, strict=True)):
            pa, ma, _, _ = a
            pb, mb, ub, sb = b
            _same_sharding(pb, params, f"{name} params step {t}")
            _same_sharding(ub, params, f"{name} updates step {t}")
            for u, v in zip(jax.tree_util.tree_leaves(pa), jax.tree_util.tree_leaves(pb)):
                np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=1e-5, atol=1e-6)
            if ma is not None:
                _same_sharding(mb, params, f"{name} masks step {t}")
                for u, v in zip(jax.tree_util.tree_leaves(ma), jax.tree_util.tree_leaves(mb)):
                    np.testing.assert_array_equal(np.asarray(u), np.asarray(v), err_msg=name)
                kern = [np.asarray(m) for m in (mb["d0"]["kernel"], mb["d1"]["kernel"])]
                pruned = sum(int((~k).sum()) for k in kern)
                if name == "pruning":  # global scope over the two kernels, 768 entries
                    s = np.float32(np.asarray(pj.current_sparsity(sb)))
                    assert t < 2 or pruned > 0  # the schedule reaches 0.8 by step 3
                    assert pruned == int(np.round(s * np.float32(768))), (pruned, s)
                else:  # SET/RigL: the same exact count at every step
                    assert [int((~k).sum()) for k in kern] == [round(0.6 * 512), round(0.6 * 256)]
    print("TRANSFORMS OK")
    print("TRAINING OK")


def main(mode):
    import jax

    mesh, host, params, shardings = _setup(mode)
    with jax.set_mesh(mesh):
        _check_builders(params, host)
    _check_training(params, host, shardings, mesh)


if __name__ == "__main__":
    main(sys.argv[1])


def test_sharded_checkpoint_round_trip_and_refusals(tmp_path):
    import jax
    import jax.numpy as jnp
    import numpy as np

    from prunejax.sharded import load_sharded, save_sharded

    dev = jax.devices()[0]
    tree = {"w": jnp.arange(12.0).reshape(3, 4), "m": jnp.arange(12).reshape(3, 4) % 2 == 0}
    save_sharded(tmp_path / "ck", tree)
    with pytest.raises(FileExistsError, match="overwrite"):
        save_sharded(tmp_path / "ck", tree)
    like = {
        k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=jax.sharding.SingleDeviceSharding(dev))
        for k, v in tree.items()
    }
    back = load_sharded(tmp_path / "ck", like)
    for k in tree:
        np.testing.assert_array_equal(np.asarray(back[k]), np.asarray(tree[k]))
        assert back[k].dtype == tree[k].dtype
    with pytest.raises(FileNotFoundError):
        load_sharded(tmp_path / "nothing", like)
    with pytest.raises(ValueError, match="no sharding"):
        load_sharded(
            tmp_path / "ck", {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in tree.items()}
        )
    with pytest.raises(TypeError, match="'w'"):
        save_sharded(tmp_path / "ck2", {"w": "not an array"})


def test_sharded_checkpoint_refuses_wrong_dtypes_and_non_checkpoints(tmp_path):
    import jax
    import jax.numpy as jnp

    from prunejax.sharded import load_sharded, save_sharded

    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    tree = {"w": jnp.ones((2, 3), jnp.float32)}
    save_sharded(tmp_path / "ck", tree)
    with pytest.raises(ValueError, match="'w' was saved as float32"):
        load_sharded(tmp_path / "ck", {"w": jax.ShapeDtypeStruct((2, 3), jnp.int32, sharding=one)})
    with pytest.raises(ValueError, match="'w' was saved as float32"):
        load_sharded(
            tmp_path / "ck", {"w": jax.ShapeDtypeStruct((3, 2), jnp.float32, sharding=one)}
        )
    save_sharded(
        tmp_path / "ck", {"w": jnp.zeros((2, 3))}, overwrite=True
    )  # a checkpoint: replaced
    other = tmp_path / "notes"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a sharded checkpoint"):
        save_sharded(other, tree, overwrite=True)
    assert (other / "notes.txt").read_text() == "keep me"
    a_file = tmp_path / "file"
    a_file.write_text("keep me")
    with pytest.raises(FileExistsError, match="not a sharded checkpoint"):
        save_sharded(a_file, tree, overwrite=True)
    assert a_file.read_text() == "keep me"
