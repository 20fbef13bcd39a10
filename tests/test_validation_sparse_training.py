"""The sparse-training benchmark's validation-era pieces: the gradual movement-pruning
transformation, per-seed merging, and the validation error beside the test error."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import prunejax as pj
from benchmarks import sparse_training as st


def _params():
    k = jax.random.PRNGKey(0)
    return {
        "Dense_0": {"kernel": jax.random.normal(k, (12, 8)), "bias": jnp.zeros(8)},
        "Dense_1": {
            "kernel": jax.random.normal(jax.random.fold_in(k, 1), (8, 4)),
            "bias": jnp.zeros(4),
        },
    }


def test_movement_pruning_hits_the_schedule_and_never_regrows():
    params = _params()
    targets = {"Dense_0/kernel": jnp.float32(0.75), "Dense_1/kernel": jnp.float32(0.5)}
    tx = st.movement_pruning(optax.adam(1e-2), targets, 0, 20, 5, "layer")
    state = tx.init(params)
    x = jax.random.normal(jax.random.PRNGKey(1), (32, 12))
    y = jnp.arange(32) % 4

    def loss(p):
        return optax.softmax_cross_entropy_with_integer_labels(pj.mlp_apply(p, x), y).mean()

    prev = None
    for _ in range(30):
        g = jax.grad(loss)(params)
        upd, state = tx.update(g, state, params)
        params = optax.apply_updates(params, upd)
        m = state.masks
        if prev is not None:  # a pruned weight never comes back
            for a, b in zip(jax.tree_util.tree_leaves(m), jax.tree_util.tree_leaves(prev)):
                assert not np.any(np.asarray(a) & ~np.asarray(b))
        prev = m
        for n in params:  # pruned weights are exact zeros
            assert not np.any(np.asarray(params[n]["kernel"])[~np.asarray(m[n]["kernel"])])
    assert int(state.masks["Dense_0"]["kernel"].sum()) == 96 - 72
    assert int(state.masks["Dense_1"]["kernel"].sum()) == 32 - 16
    assert state.masks["Dense_0"]["bias"].all()


def test_rank_kept_only_puts_pruned_entries_last_and_keeps_the_order():
    scores = {"a": jnp.array([[3.0, -1.0], [0.5, -7.0]]), "b": jnp.array([2.0, 1.0])}
    masks = {"a": jnp.array([[True, True], [False, True]]), "b": jnp.array([True, False])}
    r = st._rank_kept_only(scores, masks)
    a = np.asarray(r["a"])
    assert a[1, 0] == 0.0 and np.all(a[np.asarray(masks["a"])] > 0)
    assert a[0, 0] > a[0, 1] > a[1, 1]  # order of the kept scores unchanged
    np.testing.assert_array_equal(np.asarray(r["b"]), [2.0, 1.0])  # 1-D leaves untouched


def _part(tmp_path, seed, err, **opt):
    options = {"seeds": [seed], "methods": ["gradual"], "sparsities": [0.98], "lr": 0.02, **opt}
    rec = {
        "method": "gradual",
        "sparsity": 0.98,
        "seed": seed,
        "val_error": err + 0.001,
        "test_error": err,
        "weights_kept": 5324,
        "weights_total": 266200,
        "seconds": 1.0,
    }
    meta = {
        "command": f"run {seed}",
        "wall_seconds": 10.0,
        "options": options,
        "load_average_end": "1.0",
    }
    p = tmp_path / f"s{seed}.json"
    p.write_text(json.dumps({"meta": meta, "summary": [], "runs": [rec]}))
    return str(p)


def test_merge_combines_seeds_and_refuses_other_options(tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr(
        st, "_write", lambda out, meta, recs, log: seen.update(meta=meta, recs=recs)
    )
    st.merge([_part(tmp_path, 0, 0.015), _part(tmp_path, 1, 0.017)], str(tmp_path))
    assert seen["meta"]["options"]["seeds"] == [0, 1]
    assert seen["meta"]["wall_seconds"] == 20.0 and len(seen["recs"]) == 2
    rows = st._summary(seen["recs"], [0.98], ["gradual"])
    assert rows[0]["error_mean"] == pytest.approx(1.6)
    assert rows[0]["val_error_mean"] == pytest.approx(1.7)
    with pytest.raises(ValueError, match="other options"):
        st.merge([_part(tmp_path, 0, 0.01), _part(tmp_path, 1, 0.01, lr=0.005)], str(tmp_path))


def test_merge_combines_sparsities_of_separate_runs(tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr(
        st, "_write", lambda out, meta, recs, log: seen.update(meta=meta, recs=recs)
    )
    p98 = _part(tmp_path, 0, 0.015)
    p90 = tmp_path / "s90.json"
    d = json.loads(open(_part(tmp_path, 1, 0.012, sparsities=[0.9])).read())
    d["runs"][0]["sparsity"] = 0.9
    p90.write_text(json.dumps(d))
    st.merge([p98, str(p90)], str(tmp_path))
    assert seen["meta"]["options"]["sparsities"] == [0.9, 0.98]
    assert seen["meta"]["options"]["seeds"] == [0, 1]
    rows = st._summary(seen["recs"], [0.9, 0.98], ["gradual"])
    assert [r["error_mean"] for r in rows] == pytest.approx([1.2, 1.5])
