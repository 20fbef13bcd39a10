"""Model containers beyond plain pytrees: ``nnx.State``, Equinox modules and ``(out, in)`` state
dicts go through save/load, compact, size_report, sparsify and densify and come back as the same
container with the same outputs."""

from __future__ import annotations

import equinox as eqx
import jax
import numpy as np
import pytest
from flax import nnx

import prunejax as pj
from prunejax._util import unwrap

TOL = dict(rtol=1e-5, atol=1e-6)


class Mlp(nnx.Module):
    def __init__(self, rngs):
        self.fc1 = nnx.Linear(12, 16, rngs=rngs)
        self.fc2 = nnx.Linear(16, 16, rngs=rngs)
        self.fc3 = nnx.Linear(16, 5, rngs=rngs)

    def __call__(self, x):
        return self.fc3(jax.nn.relu(self.fc2(jax.nn.relu(self.fc1(x)))))


@pytest.fixture(scope="module")
def x():
    return jax.random.normal(jax.random.key(3), (7, 12))


@pytest.fixture(scope="module")
def nnx_pruned():
    graphdef, state = nnx.split(Mlp(nnx.Rngs(0)))
    masks = pj.magnitude_masks(state, 0.85)
    assert isinstance(masks, nnx.State)
    return graphdef, state, masks, pj.apply_masks(state, masks)


@pytest.fixture(scope="module")
def eqx_pruned():
    model = eqx.nn.MLP(12, 5, 16, 2, key=jax.random.key(0))
    params, static = eqx.partition(model, eqx.is_array)
    masks = pj.magnitude_masks(params, 0.85)
    return model, masks, eqx.combine(pj.apply_masks(params, masks), static)


# ----------------------------------------------------------------------------- nnx.State


def test_unwrap_reads_nnx_value_paths_as_the_layer_kernel(nnx_pruned):
    _, state, _, _ = nnx_pruned
    u = unwrap(state)
    assert u.kind == "nnx.State"
    assert sorted(u.tree) == ["fc1", "fc2", "fc3"]
    assert u.tree["fc1"]["kernel"].shape == (12, 16)
    assert [layer.name for layer in pj.dense_layers(u.tree)] == ["fc1", "fc2", "fc3"]
    assert u.record["variables"]["fc1/kernel"] == "Param"


@pytest.mark.parametrize("fmt", ["auto", "bitmask", "csr", "dense"])
def test_nnx_state_save_load_round_trip(tmp_path, nnx_pruned, x, fmt):
    graphdef, state, masks, masked = nnx_pruned
    path = tmp_path / "m.safetensors"
    n = pj.save(path, state, masks=masks, format=fmt)
    assert n == path.stat().st_size
    loaded = pj.load(path)
    assert isinstance(loaded, nnx.State)
    assert isinstance(loaded["fc1"]["kernel"], nnx.Param)
    np.testing.assert_array_equal(loaded["fc2"]["kernel"][...], masked["fc2"]["kernel"][...])
    ref = nnx.merge(graphdef, masked)(x)
    np.testing.assert_allclose(nnx.merge(graphdef, loaded)(x), ref, **TOL)
    again = pj.load(path, like=state)
    assert isinstance(again, nnx.State)
    np.testing.assert_allclose(nnx.merge(graphdef, again)(x), ref, **TOL)


def test_nnx_state_compact_and_compact_file(tmp_path, nnx_pruned, x):
    graphdef, state, masks, masked = nnx_pruned
    ref = nnx.merge(graphdef, masked)(x)
    small, kept = pj.compact(state, masks=masks)
    assert isinstance(small, nnx.State)
    assert small["fc1"]["kernel"][...].shape == (12, len(kept[0]))
    assert len(kept[0]) < 16 and len(kept[-1]) == 5
    np.testing.assert_allclose(nnx.merge(graphdef, small)(x), ref, **TOL)
    assert [k.tolist() for k in pj.compaction_plan(masked)] == [k.tolist() for k in kept]
    path = tmp_path / "c.safetensors"
    pj.save(path, masked, format="compact", activation=jax.nn.relu)
    loaded = pj.load(path)
    assert isinstance(loaded, nnx.State)
    np.testing.assert_allclose(nnx.merge(graphdef, loaded)(x), ref, **TOL)
    full = pj.load(path, expand=True)
    assert full["fc2"]["kernel"][...].shape == (16, 16)
    np.testing.assert_allclose(nnx.merge(graphdef, full)(x), ref, **TOL)


def test_nnx_state_size_report_matches_the_file(tmp_path, nnx_pruned):
    _, state, masks, _ = nnx_pruned
    rep = pj.size_report(state, masks=masks, activation=jax.nn.relu)
    assert [r.name for r in rep.layers] == ["fc1", "fc2", "fc3"]
    assert rep.file_bytes == rep.predicted_file_bytes["auto"]
    assert rep.total()["flops_compact"] < rep.total()["flops_dense"]
    for fmt in ("dense", "csr", "compact"):
        path = tmp_path / f"{fmt}.safetensors"
        n = pj.save(path, state, masks=masks, format=fmt, activation=jax.nn.relu)
        assert n == rep.predicted_file_bytes[fmt]


def test_nnx_state_sparsify_densify(nnx_pruned):
    _, _, _, masked = nnx_pruned
    sp = pj.sparsify(masked, "csr")
    assert isinstance(sp, nnx.State)
    assert pj.format_of(sp["fc1"]["kernel"].get_value()) == "csr"
    back = pj.densify(sp)
    assert isinstance(back, nnx.State)
    np.testing.assert_array_equal(back["fc3"]["kernel"][...], masked["fc3"]["kernel"][...])


# ----------------------------------------------------------------------------- Equinox


def test_equinox_layout_is_detected(eqx_pruned):
    model, _, _ = eqx_pruned
    u = unwrap(model)
    assert u.kind == "equinox"
    assert u.out_in == {"layers/0/weight", "layers/1/weight", "layers/2/weight"}
    assert u.tree["layers"][0]["weight"].shape == (12, 16)  # (in, out) for the library
    assert [layer.name for layer in pj.dense_layers(u.tree)] == ["layers/0", "layers/1", "layers/2"]
    rebuilt = u.rewrap(u.tree)
    assert isinstance(rebuilt, eqx.nn.MLP)
    np.testing.assert_array_equal(rebuilt.layers[1].weight, model.layers[1].weight)
    assert rebuilt.activation is model.activation


def test_equinox_compact_returns_a_smaller_module(eqx_pruned, x):
    _, masks, masked = eqx_pruned
    ref = jax.vmap(masked)(x)
    small, kept = pj.compact(masked)
    assert isinstance(small, eqx.nn.MLP)
    assert small.layers[0].weight.shape == (len(kept[0]), 12)
    assert small.layers[0].out_features == len(kept[0]) < 16
    assert small.layers[1].in_features == len(kept[0])
    np.testing.assert_allclose(jax.vmap(small)(x), ref, **TOL)
    params, _ = eqx.partition(masked, eqx.is_array)
    via_masks = pj.compact(params, masks=masks)  # partitioned arrays + masks of that shape
    assert [k.tolist() for k in via_masks.kept] == [k.tolist() for k in kept]


@pytest.mark.parametrize("fmt", ["auto", "csr", "compact"])
def test_equinox_save_load_round_trip(tmp_path, eqx_pruned, x, fmt):
    model, _, masked = eqx_pruned
    ref = jax.vmap(masked)(x)
    path = tmp_path / "e.safetensors"
    n = pj.save(path, masked, format=fmt, activation=jax.nn.relu)
    assert pj.load_header(path)["container"]["kind"] == "equinox"
    loaded = pj.load(path, like=model)
    assert isinstance(loaded, eqx.nn.MLP)
    np.testing.assert_allclose(jax.vmap(loaded)(x), ref, **TOL)
    arrays = pj.load(path)  # no template: the arrays, as the module holds them
    assert arrays["layers"][0]["weight"].shape[1] == 12
    rep = pj.size_report(masked, activation=jax.nn.relu, format=fmt)
    assert rep.file_bytes == n == rep.predicted_file_bytes[fmt]


def test_equinox_sparsify_densify(eqx_pruned, x):
    _, _, masked = eqx_pruned
    sp = pj.sparsify(masked, "bcsr_t")
    assert isinstance(sp, eqx.nn.MLP)
    assert sp.layers[0].weight.shape == (16, 12)
    assert pj.format_of(sp.layers[0].weight) == "bcsr_t"
    back = pj.densify(sp)
    assert isinstance(back, eqx.nn.MLP)
    np.testing.assert_array_equal(back.layers[0].weight, masked.layers[0].weight)
    out = pj.sparse_apply(lambda m, x: jax.vmap(m)(x))(sp, x)
    np.testing.assert_allclose(out, jax.vmap(masked)(x), **TOL)


def test_load_like_must_match(tmp_path, eqx_pruned, nnx_pruned):
    model, _, masked = eqx_pruned
    path = tmp_path / "e.safetensors"
    pj.save(path, masked)
    _, state, _, _ = nnx_pruned
    with pytest.raises(ValueError, match="like="):
        pj.load(path, like=state)
    deeper = eqx.nn.MLP(12, 5, 16, 3, key=jax.random.key(1))
    with pytest.raises(ValueError, match=r"like= has \(out, in\) kernels at"):
        pj.load(path, like=deeper)
    no_bias = eqx.nn.MLP(12, 5, 16, 2, use_bias=False, use_final_bias=False, key=jax.random.key(1))
    with pytest.raises(ValueError, match="does not match the file.*layers/0/bias"):
        pj.load(path, like=no_bias)


# ----------------------------------------------------------------------------- (out, in) dicts


def test_out_in_state_dict_with_layout(tmp_path, x):
    rng = np.random.default_rng(0)
    sd = {
        "fc1": {
            "weight": rng.normal(size=(16, 12)).astype(np.float32),
            "bias": np.zeros(16, np.float32),
        },
        "fc2": {
            "weight": rng.normal(size=(5, 16)).astype(np.float32),
            "bias": np.ones(5, np.float32),
        },
    }
    sd["fc1"]["weight"][:6] = 0.0  # six hidden units without inputs
    xs = np.asarray(x)

    def run(p):
        h = np.maximum(xs @ np.asarray(p["fc1"]["weight"]).T + p["fc1"]["bias"], 0)
        return h @ np.asarray(p["fc2"]["weight"]).T + p["fc2"]["bias"]

    small, kept = pj.compact(sd, layout="out_in")
    assert small["fc1"]["weight"].shape == (10, 12) and isinstance(
        small["fc1"]["weight"], np.ndarray
    )
    np.testing.assert_allclose(run(small), run(sd), **TOL)
    path = tmp_path / "sd.safetensors"
    pj.save(path, sd, format="csr", layout="out_in")
    loaded = pj.load(path)
    assert loaded["fc1"]["weight"].shape == (16, 12)
    np.testing.assert_array_equal(loaded["fc2"]["weight"], sd["fc2"]["weight"])
    rep = pj.size_report(sd, layout="out_in")
    assert rep.layers[0].shape == (12, 16)
    with pytest.raises(ValueError, match="layout"):
        pj.compact(sd, layout="oi")


def test_load_like_a_plain_tree_of_a_file_saved_out_in(tmp_path):
    rng = np.random.default_rng(1)
    sd = {
        "fc1": {
            "weight": rng.normal(size=(6, 4)).astype(np.float32),
            "bias": np.ones(6, np.float32),
        },
        "fc2": {
            "weight": rng.normal(size=(3, 6)).astype(np.float32),
            "bias": np.ones(3, np.float32),
        },
    }
    sd["fc1"]["weight"][:, 1] = 0.0
    path = tmp_path / "sd.safetensors"
    pj.save(path, sd, format="csr", layout="out_in")
    loaded = pj.load(path, like=sd)
    for layer in sd:
        for name in sd[layer]:
            np.testing.assert_array_equal(np.asarray(loaded[layer][name]), sd[layer][name])


def test_out_in_layout_for_an_nnx_state_is_refused(nnx_pruned):
    _, state, _, _ = nnx_pruned
    with pytest.raises(ValueError, match=r"layout='out_in'.*nnx.State"):
        unwrap(state, layout="out_in")
    with pytest.raises(ValueError, match=r"layout='out_in'.*nnx.State"):
        pj.compact(state, layout="out_in")
    with pytest.raises(ValueError, match=r"layout='out_in'.*nnx.State"):
        pj.sparsify(state, layout="out_in")
