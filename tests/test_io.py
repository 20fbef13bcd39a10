"""Tests of prunejax.fileformat: round trips in every format, small files, safety against bad
files."""

from __future__ import annotations

import hashlib
import io
import json
import os
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from mlp_factory import make_mlp

from prunejax.compact import compact
from prunejax.fileformat import FileFormatError, load, load_header, save
from prunejax.fileformat.container import npy_bytes
from prunejax.fileformat.encodings import ENCODINGS, ROLES, encode
from prunejax.fileformat.plan import leaf_bytes
from prunejax.masks import apply_masks, magnitude_masks, unit_masks
from prunejax.models import mlp_apply

FORMATS = ["dense", "bitmask", "csr", "bcoo", "auto", "smallest", "compact"]


def out(params, x, act=jax.nn.relu):
    return np.asarray(mlp_apply(params, jnp.asarray(x), activation=act))


def x_of(n, seed=1):
    return np.random.default_rng(seed).normal(size=(32, n)).astype(np.float32)


def act_for(fmt):
    return jax.nn.relu if fmt == "compact" else None


# ----------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("kind", ["flax", "keras"])
def test_round_trip_every_format(tmp_path, fmt, kind):
    params = make_mlp([20, 16, 12, 5], [0.2, 0.5, 1.0], seed=1, kind=kind)
    # a dead hidden unit so that compaction has something to do
    if kind == "flax":
        params["Dense_1"]["kernel"][:, 3] = 0
    else:
        params[2][:, 3] = 0
    f = tmp_path / f"m-{fmt}.npz"
    size = save(f, params, format=fmt, activation=act_for(fmt))
    assert size == os.path.getsize(f)
    back = load(f)
    assert type(back) is type(params)
    x = x_of(20)
    if fmt == "compact":
        np.testing.assert_allclose(out(back, x), out(params, x), rtol=1e-5, atol=1e-6)
        assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(params)
        full = load(f, expand=True)
        for a, b in zip(
            jax.tree_util.tree_leaves(full), jax.tree_util.tree_leaves(params), strict=True
        ):
            assert a.shape == b.shape
        np.testing.assert_allclose(out(full, x), out(params, x), rtol=1e-5, atol=1e-6)
    else:
        for a, b in zip(
            jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(params), strict=True
        ):
            assert isinstance(a, np.ndarray) and a.dtype == b.dtype
            np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(out(back, x), out(params, x))
    assert load_header(f)["format"] == ("auto" if fmt == "smallest" else fmt)


def test_jax_leaves_come_back_as_jax_and_masks_are_applied(tmp_path):
    params = jax.tree_util.tree_map(jnp.asarray, make_mlp([10, 8, 3], [1.0, 1.0]))
    masks = magnitude_masks(params, 0.7)
    for fmt in ("csr", "bitmask", "bcoo", "dense"):
        f = tmp_path / f"j-{fmt}.npz"
        save(f, params, format=fmt, masks=masks)
        back = load(f)
        pruned = apply_masks(params, masks)
        for a, b in zip(
            jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(pruned), strict=True
        ):
            assert isinstance(a, jax.Array)
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_compacted_model_loads_compacted_and_matches_compact(tmp_path):
    params = make_mlp([30, 20, 10, 4], [1.0, 1.0, 1.0], seed=2)
    hidden = lambda p, leaf: np.ndim(leaf) == 2 and "Dense_2" not in p  # noqa: E731
    masks = unit_masks(params, 0.5, where=hidden)
    f = tmp_path / "c.npz"
    save(f, params, format="compact", masks=masks, activation=jax.nn.softplus)
    back = load(f)
    small, kept = compact(params, masks=masks, activation=jax.nn.softplus)
    for a, b in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(small), strict=True):
        np.testing.assert_array_equal(a, b)
    header = load_header(f)
    assert header["compaction"]["activation"] == "softplus"
    assert [lay["out"] for lay in header["compaction"]["layers"]] == [20, 10, 4]
    x = x_of(30)
    pruned = apply_masks(params, masks)
    ref = out(pruned, x, jax.nn.softplus)
    np.testing.assert_allclose(out(back, x, jax.nn.softplus), ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        out(load(f, expand=True), x, jax.nn.softplus), ref, rtol=1e-5, atol=1e-6
    )


def test_auto_with_activation_compacts_when_it_pays(tmp_path):
    params = make_mlp([40, 30, 20, 5], [1.0, 1.0, 1.0], seed=3)
    hidden = lambda p, leaf: np.ndim(leaf) == 2 and "Dense_2" not in p  # noqa: E731
    pruned = apply_masks(params, unit_masks(params, 0.5, where=hidden))
    plain = save(tmp_path / "a.npz", pruned, format="auto")
    smart = save(tmp_path / "b.npz", pruned, format="auto", activation=jax.nn.relu)
    assert smart < plain
    assert load_header(tmp_path / "b.npz")["compaction"] is not None
    assert load_header(tmp_path / "a.npz")["compaction"] is None
    x = x_of(40)
    np.testing.assert_allclose(
        out(load(tmp_path / "b.npz"), x), out(pruned, x), rtol=1e-5, atol=1e-6
    )


def test_100_percent_pruned_layer_round_trips_with_empty_arrays(tmp_path):
    params = make_mlp([6, 5, 4, 3], [0.5, 0.5, 0.5], seed=4)
    params["Dense_1"]["kernel"][:] = 0
    for fmt in FORMATS:
        f = tmp_path / f"z-{fmt}.npz"
        save(f, params, format=fmt, activation=act_for(fmt))
        x = x_of(6)
        np.testing.assert_allclose(out(load(f), x), out(params, x), rtol=1e-5, atol=1e-6)
    small = load(tmp_path / "z-compact.npz")
    assert small["Dense_0"]["kernel"].shape == (6, 0)


def test_other_tree_kinds_and_dtypes_round_trip(tmp_path):
    from flax.core import FrozenDict

    rng = np.random.default_rng(0)
    w = rng.normal(size=(300, 4)).astype(np.float32) * (rng.random((300, 4)) < 0.3)
    tree = {
        "a": FrozenDict({"kernel": w, "bias": np.zeros(4, np.float32)}),
        "b": (np.arange(5, dtype=np.int32), None, [np.float16(1.5) * np.ones((2, 3), np.float16)]),
        "c": jnp.asarray(w, jnp.bfloat16),
        "d": np.array([True, False, True]),
        "e": np.float64(3.25),
        "f": {7: np.zeros((0, 3), np.float32), 2: np.ones(2, np.float32)},
    }
    for fmt in ("dense", "bitmask", "csr", "bcoo", "auto"):
        f = tmp_path / f"t-{fmt}.npz"
        save(f, tree, format=fmt)
        back = load(f)
        assert isinstance(back["a"], FrozenDict)
        assert (
            isinstance(back["b"], tuple) and back["b"][1] is None and isinstance(back["b"][2], list)
        )
        assert set(back["f"]) == {7, 2}
        assert isinstance(back["c"], jax.Array) and back["c"].dtype == jnp.bfloat16
        assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(tree)
        for a, b in zip(
            jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(tree), strict=True
        ):
            assert np.asarray(a).dtype == np.asarray(b).dtype
            assert np.asarray(a).shape == np.asarray(b).shape
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_file_is_an_npz_numpy_opens_without_pickle(tmp_path):
    params = make_mlp([10, 4], [0.3])
    f = tmp_path / "m.npz"
    save(f, params, format="csr")
    with np.load(f, allow_pickle=False) as z:
        assert set(z.files) == {"header.json", "0.data", "1.indptr", "1.indices", "1.data"}
        header = json.loads(z["header.json"])
        assert z["1.indices"].dtype == np.uint8  # 4 columns
    assert header["magic"] == "prunejax" and header["format_version"] == 1
    assert [leaf["path"] for leaf in header["leaves"]] == ["Dense_0/bias", "Dense_0/kernel"]
    assert header["leaves"][1]["encoding"] == "csr"


# ----------------------------------------------------------------------------- size targets


def lenet_han():
    """LeNet-300-100 at Han et al.'s densities (8% / 9% / 26% of the weights kept)."""
    return make_mlp([784, 300, 100, 10], [0.08, 0.09, 0.26], seed=0)


def test_lenet_at_han_densities_is_at_most_one_sixth_of_dense(tmp_path):
    params = lenet_han()
    dense = save(tmp_path / "dense.npz", params, format="dense")
    assert dense >= 266_610 * 4  # the dense fp32 file holds every weight
    for fmt in ("auto", "csr", "bitmask"):
        size = save(tmp_path / f"{fmt}.npz", params, format=fmt)
        assert size <= dense / 6, (fmt, size, dense)
    enc = [leaf["encoding"] for leaf in load_header(tmp_path / "csr.npz")["leaves"]]
    assert enc == ["dense", "csr"] * 3
    with zipfile.ZipFile(tmp_path / "csr.npz") as z:
        col = np.load(io.BytesIO(z.read("1.indices.npy")))
    assert col.dtype == np.uint16  # 300 columns fit 16 bits


def test_lenet_unit_pruning_then_compact_is_at_most_55_percent(tmp_path):
    params = make_mlp([784, 300, 100, 10], [1.0, 1.0, 1.0], seed=0)
    hidden = lambda p, leaf: np.ndim(leaf) == 2 and "Dense_2" not in p  # noqa: E731
    pruned = apply_masks(params, unit_masks(params, 0.5, where=hidden))
    dense = save(tmp_path / "dense.npz", params, format="dense")
    small = save(tmp_path / "small.npz", pruned, format="compact", activation=jax.nn.relu)
    assert small <= 0.55 * dense
    x = x_of(784)
    np.testing.assert_allclose(
        out(load(tmp_path / "small.npz"), x), out(pruned, x), rtol=1e-5, atol=1e-6
    )


# ----------------------------------------------------------------------------- bad files


@pytest.fixture
def saved(tmp_path):
    params = make_mlp([12, 8, 3], [0.4, 0.6])
    f = tmp_path / "m.npz"
    save(f, params, format="csr")
    return f, params


def _rewrite(path, header_fn=None, member_fn=None, fix_checksum=False):
    """Rewrite a saved file, editing its header and/or members (CRCs stay valid)."""
    with zipfile.ZipFile(path) as z:
        header = json.loads(z.read("header.json"))
        members = {n: z.read(n) for n in z.namelist() if n != "header.json"}
    if header_fn:
        header_fn(header)
    if member_fn:
        member_fn(members)
    if fix_checksum:
        body = {k: v for k, v in header.items() if k != "checksum"}
        d = hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())
        for n in members:
            d.update(n[: -len(".npy")].encode())
            d.update(members[n])
        header["checksum"] = "sha256:" + d.hexdigest()
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("header.json", json.dumps(header))
        for n, data in members.items():
            z.writestr(n, data)


@pytest.mark.parametrize("cut", [0.5, 0.9, -1, -22, 10])
def test_truncated_file_raises(saved, cut):
    f, _ = saved
    data = f.read_bytes()
    n = int(len(data) * cut) if isinstance(cut, float) else (len(data) + cut if cut < 0 else cut)
    f.write_bytes(data[:n])
    with pytest.raises(FileFormatError, match="truncated or corrupted"):
        load(f)


def test_flipped_payload_byte_raises(saved):
    f, _ = saved
    data = bytearray(f.read_bytes())
    with zipfile.ZipFile(f) as z:
        info = z.getinfo("1.data.npy")
    pos = info.header_offset + 30 + len(info.filename) + 130
    data[pos] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(FileFormatError, match="corrupted"):
        load(f)


def test_tampered_header_fails_the_checksum(saved):
    f, _ = saved

    def edit(h):
        h["leaves"][1]["path"] = "Dense_9/kernel"

    _rewrite(f, header_fn=edit)
    with pytest.raises(FileFormatError, match="checksum"):
        load(f)


def test_tampered_member_with_valid_crc_fails_the_checksum(saved):
    f, _ = saved

    def edit(m):
        arr = np.load(io.BytesIO(m["1.data.npy"]))
        buf = io.BytesIO()
        np.save(buf, arr * 2)
        m["1.data.npy"] = buf.getvalue()

    _rewrite(f, member_fn=edit)
    with pytest.raises(FileFormatError, match="checksum"):
        load(f)


def test_version_mismatch_raises_clearly(saved):
    f, _ = saved

    def edit(h):
        h["format_version"] = 2
        h["library_version"] = "9.9.9"

    _rewrite(f, header_fn=edit, fix_checksum=True)
    with pytest.raises(FileFormatError, match=r"format version 2.*9\.9\.9.*reads format version 1"):
        load(f)


def test_out_of_bounds_indices_with_valid_checksum_raise(saved):
    f, _ = saved

    def edit(m):
        arr = np.load(io.BytesIO(m["1.indices.npy"]))
        arr[0] = 200
        buf = io.BytesIO()
        np.save(buf, arr)
        m["1.indices.npy"] = buf.getvalue()

    _rewrite(f, member_fn=edit, fix_checksum=True)
    with pytest.raises(FileFormatError, match="CSR index arrays of leaf 1"):
        load(f)


class _Boom:
    triggered = False

    def __reduce__(self):
        return (_boom, ())


def _boom():
    _Boom.triggered = True
    return 0


def test_pickled_member_is_never_unpickled(saved):
    f, _ = saved

    def edit(m):
        buf = io.BytesIO()
        np.save(buf, np.array([_Boom()], dtype=object), allow_pickle=True)
        m["1.data.npy"] = buf.getvalue()

    _rewrite(f, member_fn=edit, fix_checksum=True)
    with pytest.raises(FileFormatError):
        load(f)
    assert not _Boom.triggered


def test_not_a_prunejax_file(tmp_path):
    f = tmp_path / "plain.npz"
    np.savez(f, a=np.ones(3))
    with pytest.raises(FileFormatError, match="not a prunejax model file"):
        load(f)
    g = tmp_path / "junk.npz"
    g.write_bytes(os.urandom(300))
    with pytest.raises(FileFormatError):
        load(g)
    with pytest.raises(FileNotFoundError):
        load(tmp_path / "missing.npz")


def test_extra_or_missing_members_raise(saved):
    f, _ = saved
    _rewrite(f, member_fn=lambda m: m.pop("1.indptr.npy"), fix_checksum=True)
    with pytest.raises(FileFormatError, match="do not match its header"):
        load(f)


# ----------------------------------------------------------------------------- bad input, atomicity


def test_nan_leaf_is_refused_naming_it(tmp_path):
    params = make_mlp([6, 4], [0.5])
    params["Dense_0"]["kernel"][1, 1] = np.nan
    with pytest.raises(ValueError, match=r"'Dense_0/kernel'.*1 NaN"):
        save(tmp_path / "x.npz", params)
    assert not (tmp_path / "x.npz").exists()


def test_unknown_format_and_compact_without_activation(tmp_path):
    params = make_mlp([6, 4], [0.5])
    with pytest.raises(ValueError, match="unknown format 'coo'.*bcoo"):
        save(tmp_path / "x.npz", params, format="coo")
    with pytest.raises(ValueError, match="activation="):
        save(tmp_path / "x.npz", params, format="compact")
    bad = {"a": np.ones((3, 4), np.float32), "b": np.ones((5, 2), np.float32)}
    with pytest.raises(ValueError, match="not an MLP chain"):
        save(tmp_path / "x.npz", bad, format="compact", activation=jax.nn.relu)
    # auto falls back to no compaction for such a tree
    save(tmp_path / "x.npz", bad, format="auto", activation=jax.nn.relu)
    assert load_header(tmp_path / "x.npz")["compaction"] is None


def test_unsupported_containers_and_dtypes(tmp_path):
    from collections import namedtuple

    P = namedtuple("P", "w")
    with pytest.raises(TypeError, match="P"):
        save(tmp_path / "x.npz", P(np.ones(3)))
    with pytest.raises(TypeError, match="'a'.*object"):
        save(tmp_path / "x.npz", {"a": np.array(["s"], dtype=object)})


def test_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path, monkeypatch):
    params = make_mlp([6, 4], [0.5])
    f = tmp_path / "m.npz"
    save(f, params)
    before = f.read_bytes()
    calls = {"n": 0}
    real = zipfile.ZipFile.writestr

    def failing(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("disk full")
        return real(self, *a, **k)

    monkeypatch.setattr(zipfile.ZipFile, "writestr", failing)
    with pytest.raises(OSError, match="disk full"):
        save(f, jax.tree_util.tree_map(lambda x: x * 2, params))
    assert f.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["m.npz"]


def test_leaf_bytes_matches_encoded_members():
    rng = np.random.default_rng(0)
    w = (rng.normal(size=(70, 300)) * (rng.random((70, 300)) < 0.1)).astype(np.float32)
    nnz = int(np.count_nonzero(w))
    for enc in ENCODINGS:
        arrays = encode(enc, w)
        names = [f"3.{r}" for r in ROLES[enc]]
        actual = sum(
            76 + 2 * len(n + ".npy") + len(npy_bytes(a)) for n, a in zip(names, arrays, strict=True)
        )
        assert leaf_bytes(enc, w.shape, w.dtype, nnz, index=3) == actual


def test_save_is_deterministic_and_densifies_sparse_kernels(tmp_path):
    from jax.experimental import sparse as jsparse

    params = make_mlp([12, 8, 3], [0.4, 0.6])
    save(tmp_path / "a.npz", params, format="auto")
    save(tmp_path / "b.npz", params, format="auto")
    assert (tmp_path / "a.npz").read_bytes() == (tmp_path / "b.npz").read_bytes()
    sp = dict(
        params,
        Dense_0=dict(params["Dense_0"], kernel=jsparse.BCOO.fromdense(params["Dense_0"]["kernel"])),
    )
    save(tmp_path / "c.npz", sp, format="csr")
    back = load(tmp_path / "c.npz")
    assert isinstance(back["Dense_0"]["kernel"], jax.Array)
    np.testing.assert_array_equal(
        np.asarray(back["Dense_0"]["kernel"]), params["Dense_0"]["kernel"]
    )


def test_nan_at_a_masked_out_entry_is_not_saved(tmp_path):
    params = make_mlp([6, 4], [1.0])
    masks = jax.tree_util.tree_map(lambda x: np.ones(x.shape, bool), params)
    params["Dense_0"]["kernel"][2, 3] = np.nan
    masks["Dense_0"]["kernel"][2, 3] = False
    save(tmp_path / "m.npz", params, masks=masks, format="bitmask")
    back = load(tmp_path / "m.npz")
    assert back["Dense_0"]["kernel"][2, 3] == 0 and np.isfinite(back["Dense_0"]["kernel"]).all()
