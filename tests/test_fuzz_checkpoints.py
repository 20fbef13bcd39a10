"""Fuzzing the training checkpoint file: every damaged or crafted file either raises
``CheckpointError`` or loads exactly what it holds.

Groups: every truncation and every single-bit flip of a small checkpoint (exhaustive), random
multi-byte damage anywhere, metadata edits with and without a recomputed hash (down to the
training loop's resume checks), swapped, missing, extra and retyped members written by the
real writer, and arbitrary bodies with a valid hash (deep nesting included).
"""

from __future__ import annotations

import hashlib
import json
import struct

import flax.serialization
import jax
import numpy as np
import optax
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import prunejax.apps.mnist.train as ptrain
from prunejax import magnitude_masks, masked
from prunejax.apps.mnist import CheckpointError, load_checkpoint, restore_checkpoint
from prunejax.apps.mnist.checkpoint import leaf_shapes, save_checkpoint
from prunejax.models import MLP

FUZZ = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
MODEL = MLP(features=(4, 3))
PARAMS = jax.device_get(MODEL.init(jax.random.key(0), np.zeros((1, 5), np.float32))["params"])
MASKS = magnitude_masks(PARAMS, 0.5)
TEMPLATE = {"params": PARAMS, "opt_state": masked(optax.adam(1e-3), MASKS).init(PARAMS)}
META_BASE = {"model": "MLP", "shapes": {}, "config": {"seed": 0, "batch_size": 8}}
META = {**META_BASE, "epoch": 2, "history": [{"epoch": 1, "loss": 1.5}, {"epoch": 2, "loss": 0.5}]}
MAGIC_LEN, DIGEST = 12, 32


def _tree():
    rng = np.random.default_rng(1)
    return jax.tree_util.tree_map(
        lambda a: rng.normal(size=np.shape(a)).astype(np.asarray(a).dtype), TEMPLATE
    )


TREE = _tree()


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    path = tmp_path_factory.mktemp("ck") / "good.ckpt"
    save_checkpoint(path, TREE, META)
    return path.read_bytes()


def _rehash(data: bytes) -> bytes:
    return data[:-DIGEST] + hashlib.sha256(data[:-DIGEST]).digest()


def _check_exact(path) -> tuple:
    """Load ``path`` fully; ``("error", msg)`` or ``("ok", tree, meta)``."""
    try:
        tree, meta = restore_checkpoint(path, TEMPLATE)
    except CheckpointError as e:
        assert str(e), "an empty message"
        return ("error", str(e))
    return ("ok", tree, meta)


def _same(a, b) -> bool:
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    return len(la) == len(lb) and all(
        np.asarray(u).dtype == np.asarray(v).dtype
        and np.asarray(u).tobytes() == np.asarray(v).tobytes()
        for u, v in zip(la, lb, strict=True)
    )


def test_the_good_file_loads_exactly(good, tmp_path):
    path = tmp_path / "c.ckpt"
    path.write_bytes(good)
    out = _check_exact(path)
    assert out[0] == "ok" and _same(out[1], TREE) and out[2] == META


def test_every_truncation_is_refused(good, tmp_path):
    path = tmp_path / "c.ckpt"
    path.write_bytes(good)
    with open(path, "r+b") as f:
        for n in reversed(range(len(good))):  # exhaustive: every prefix, the empty file included
            f.truncate(n)
            with pytest.raises(CheckpointError, match="truncated or corrupt|not a prunejax"):
                load_checkpoint(path)
    assert path.stat().st_size == 0


def test_every_single_bit_flip_is_refused(good, tmp_path):
    path = tmp_path / "c.ckpt"
    path.write_bytes(good)
    with open(path, "r+b") as f:  # flipped in place: a fresh write per case is slow on some disks
        for i in range(len(good)):  # exhaustive: every bit of the file, the hash itself included
            for bit in range(8):
                f.seek(i)
                f.write(bytes([good[i] ^ (1 << bit)]))
                f.flush()
                with pytest.raises(CheckpointError):
                    load_checkpoint(path)
            f.seek(i)
            f.write(good[i : i + 1])
    assert path.read_bytes() == good


@FUZZ
@given(data=st.data())
def test_random_damage_anywhere_is_refused(good, tmp_path, data):
    raw = bytearray(good)
    edits = data.draw(
        st.lists(st.tuples(st.integers(0, len(raw) - 1), st.integers(1, 255)), min_size=1)
    )
    for i, x in edits:
        raw[i] ^= x
    cut = data.draw(st.integers(0, len(raw)))
    tail = data.draw(st.binary(max_size=16))
    damaged = bytes(raw[:cut]) + tail
    path = tmp_path / "c.ckpt"
    path.write_bytes(damaged)
    if damaged == good:  # the edits undid each other
        assert _check_exact(path)[0] == "ok"
    else:
        with pytest.raises(CheckpointError):
            load_checkpoint(path)


def _unique(pairs):
    if len({k for k, _ in pairs}) != len(pairs):
        raise ValueError("duplicate keys")
    return dict(pairs)


def _meta_span(raw: bytes) -> tuple[int, int]:
    text = json.dumps(META, sort_keys=True, allow_nan=True).encode()
    start = raw.index(text)
    return start, start + len(text)


@FUZZ
@given(data=st.data(), rehash=st.booleans())
def test_edited_metadata(good, tmp_path, data, rehash):
    """Same-length edits of the metadata text: refused unless the hash is recomputed; then
    the file loads exactly what it says, and resuming accepts it only if it agrees with the
    run (settings, model, epoch and history)."""
    a, b = _meta_span(good)
    raw = bytearray(good)
    i = data.draw(st.integers(a, b - 1))
    new = data.draw(st.sampled_from(b'0123456789"{}[],: .-eEaxtrufnl\\\x00\xff'))
    raw[i] = new
    edited = bytes(raw)
    if rehash:
        edited = _rehash(edited)
    path = tmp_path / "c.ckpt"
    path.write_bytes(edited)
    if edited == good:
        event("unchanged")
        return
    if not rehash:
        event("no rehash: refused (SHA-256)")
        with pytest.raises(CheckpointError, match="SHA-256 mismatch"):
            load_checkpoint(path)
        return
    try:
        want = json.loads(edited[a:b].decode(), object_pairs_hook=_unique)
    except (UnicodeDecodeError, ValueError):
        event("rehash: refused (malformed metadata)")
        with pytest.raises(CheckpointError, match="malformed"):
            load_checkpoint(path)
        return
    if not isinstance(want, dict):
        event("rehash: refused (metadata not a map)")
        with pytest.raises(CheckpointError, match="malformed"):
            load_checkpoint(path)
        return
    state, meta = load_checkpoint(path)
    assert meta == want and _same(state, flax.serialization.to_state_dict(TREE))
    try:
        tree, history, epoch = ptrain._resume(path, TEMPLATE, META_BASE, 3)
    except CheckpointError:
        event("rehash: loads exactly, resume refused")
        return
    event("rehash: loads exactly, resume accepted (consistent metadata)")
    assert meta["config"] == META_BASE["config"] and meta["model"] == "MLP"
    assert [h["epoch"] for h in history] == list(range(1, epoch + 1)) and 1 <= epoch <= 3
    assert _same(tree, TREE)


PATHS = sorted(leaf_shapes(flax.serialization.to_state_dict(TEMPLATE)))


def _set(state: dict, path: str, value) -> None:
    *head, last = path.split("/")
    for k in head:
        state = state.setdefault(k, {})
    if value is None:
        del state[last]
    else:
        state[last] = value


def _get(state: dict, path: str):
    for k in path.split("/"):
        state = state[k]
    return state


MEMBER_EDITS = st.one_of(
    st.tuples(st.just("swap"), st.sampled_from(PATHS), st.sampled_from(PATHS)),
    st.tuples(st.just("drop"), st.sampled_from(PATHS), st.none()),
    st.tuples(st.just("extra"), st.sampled_from(PATHS), st.sampled_from(["x", "kernel2", "0"])),
    st.tuples(
        st.just("retype"),
        st.sampled_from(PATHS),
        st.sampled_from(["float16", "float64", "int32", "bool", "int8", "complex64"]),
    ),
    st.tuples(st.just("reshape"), st.sampled_from(PATHS), st.sampled_from([(), (1,), (2, 2)])),
)


@FUZZ
@given(edit=MEMBER_EDITS)
def test_swapped_missing_extra_and_retyped_members(tmp_path, edit):
    """Written by the real writer (a valid hash): refused by the template check unless the
    tree still has the template's paths, shapes and dtypes; then loaded exactly."""
    kind, p, q = edit
    state = flax.serialization.to_state_dict(jax.tree_util.tree_map(np.array, TREE))
    if kind == "swap":
        u, v = _get(state, p), _get(state, q)
        _set(state, p, v)
        _set(state, q, u)
    elif kind == "drop":
        _set(state, p, None)
    elif kind == "extra":
        _set(state, p.rsplit("/", 1)[0] + "/" + q, np.zeros(3, np.float32))
    elif kind == "retype":
        _set(state, p, _get(state, p).astype(q))
    else:
        _set(state, p, np.zeros(q, _get(state, p).dtype))
    path = tmp_path / "c.ckpt"
    save_checkpoint(path, state, META)
    out = _check_exact(path)
    event(f"{kind}: {out[0]}")
    if leaf_shapes(state) == leaf_shapes(flax.serialization.to_state_dict(TEMPLATE)):
        assert out[0] == "ok" and out[2] == META
        assert _same(flax.serialization.to_state_dict(out[1]), state)
    else:
        assert out[0] == "error"
        assert any(w in out[1] for w in ("missing leaves", "different model", "dtype"))


MSGPACK_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=8)
    | st.binary(max_size=16),
    lambda kids: (
        st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=5), kids, max_size=4)
    ),
    max_leaves=20,
)


def _file(body: bytes) -> bytes:
    head = b"\x89PJCK\r\n\x1a" + struct.pack("<I", 2) + body
    return head + hashlib.sha256(head).digest()


@FUZZ
@given(
    body=st.one_of(
        st.binary(max_size=64),
        MSGPACK_VALUES.map(flax.serialization.msgpack_serialize),
        st.fixed_dictionaries(
            {"meta": st.text(max_size=20) | MSGPACK_VALUES, "state": MSGPACK_VALUES}
        ).map(flax.serialization.msgpack_serialize),
    )
)  # fmt: skip
def test_crafted_bodies_with_a_valid_hash(tmp_path, body):
    path = tmp_path / "c.ckpt"
    path.write_bytes(_file(body))
    out = _check_exact(path)
    event(f"crafted body: {out[0]}")
    if out[0] == "ok":  # only a well-formed body with the template's exact leaves loads
        assert leaf_shapes(out[1]) == leaf_shapes(TEMPLATE)


def test_deep_nesting_and_bad_versions_with_a_valid_hash(good, tmp_path):
    path = tmp_path / "c.ckpt"
    depth = 100_000
    for body in (b"\x91" * depth + b"\xc0", b"\x81\xa1a" * depth + b"\xc0"):  # lists, maps
        path.write_bytes(_file(body))
        with pytest.raises(CheckpointError, match="malformed"):
            load_checkpoint(path)
    meta = '{"a": ' + "[" * 5000 + "]" * 5000 + "}"
    path.write_bytes(_file(flax.serialization.msgpack_serialize({"meta": meta, "state": {}})))
    with pytest.raises(CheckpointError, match="malformed.*Recursion"):
        load_checkpoint(path)
    dup = {"meta": '{"a":1,"a":2}', "state": {}}
    path.write_bytes(_file(flax.serialization.msgpack_serialize(dup)))
    with pytest.raises(CheckpointError, match="duplicate keys"):
        load_checkpoint(path)
    for v in (1, 3, 2**32 - 1):
        head = good[:8] + struct.pack("<I", v) + good[MAGIC_LEN:-DIGEST]
        path.write_bytes(head + hashlib.sha256(head).digest())
        with pytest.raises(CheckpointError, match=f"format version {v}, this prunejax reads"):
            load_checkpoint(path)
