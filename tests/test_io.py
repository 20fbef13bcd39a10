"""Tests of prunejax.fileformat: round trips in every format, small files, safety against bad
files."""

from __future__ import annotations

import io
import json
import os
import signal
import stat
import subprocess
import sys
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors
import safetensors.numpy
from craft_files import checksum as legacy_checksum
from craft_files import legacy_save, npy_bytes, write_raw, write_zip
from mlp_factory import make_mlp

from prunejax._util import atomic_path
from prunejax.compact import compact
from prunejax.fileformat import FileFormatError, container, load, load_header, save
from prunejax.fileformat.encodings import ENCODINGS, ROLES
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
    f = tmp_path / f"m-{fmt}.safetensors"
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
        f = tmp_path / f"j-{fmt}.safetensors"
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
    f = tmp_path / "c.safetensors"
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
    plain = save(tmp_path / "a.safetensors", pruned, format="auto")
    smart = save(tmp_path / "b.safetensors", pruned, format="auto", activation=jax.nn.relu)
    assert smart < plain
    assert load_header(tmp_path / "b.safetensors")["compaction"] is not None
    assert load_header(tmp_path / "a.safetensors")["compaction"] is None
    x = x_of(40)
    np.testing.assert_allclose(
        out(load(tmp_path / "b.safetensors"), x), out(pruned, x), rtol=1e-5, atol=1e-6
    )


def test_100_percent_pruned_layer_round_trips_with_empty_arrays(tmp_path):
    params = make_mlp([6, 5, 4, 3], [0.5, 0.5, 0.5], seed=4)
    params["Dense_1"]["kernel"][:] = 0
    for fmt in FORMATS:
        f = tmp_path / f"z-{fmt}.safetensors"
        save(f, params, format=fmt, activation=act_for(fmt))
        x = x_of(6)
        np.testing.assert_allclose(out(load(f), x), out(params, x), rtol=1e-5, atol=1e-6)
    small = load(tmp_path / "z-compact.safetensors")
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
        f = tmp_path / f"t-{fmt}.safetensors"
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


def test_file_is_a_safetensors_file_any_reader_opens(tmp_path):
    params = make_mlp([10, 4], [0.3])
    f = tmp_path / "m.safetensors"
    save(f, params, format="csr")
    z = safetensors.numpy.load_file(f)
    assert set(z) == {"0.data", "1.indptr", "1.indices", "1.data"}
    assert z["1.indices"].dtype == np.uint8  # 4 columns
    with safetensors.safe_open(f, framework="np") as st:
        meta = st.metadata()
    assert set(meta) == {"prunejax", "prunejax.sha256"}
    header = json.loads(meta["prunejax"])
    assert header["magic"] == "prunejax" and header["format_version"] == 2
    assert [leaf["path"] for leaf in header["leaves"]] == ["Dense_0/bias", "Dense_0/kernel"]
    assert header["leaves"][1]["encoding"] == "csr"
    assert load_header(f)["checksum"] == "sha256:" + meta["prunejax.sha256"]
    # payloads are aligned to their item size (memory-mappable), the header padded to 8 bytes
    data = f.read_bytes()
    n = int.from_bytes(data[:8], "little")
    assert n % 8 == 0
    for name, entry in json.loads(data[8 : 8 + n]).items():
        if name != "__metadata__":
            assert entry["data_offsets"][0] % z[name].dtype.itemsize == 0


# ----------------------------------------------------------------------------- size targets


def lenet_han():
    """LeNet-300-100 at Han et al.'s densities (8% / 9% / 26% of the weights kept)."""
    return make_mlp([784, 300, 100, 10], [0.08, 0.09, 0.26], seed=0)


def test_lenet_at_han_densities_is_at_most_one_sixth_of_dense(tmp_path):
    params = lenet_han()
    dense = save(tmp_path / "dense.safetensors", params, format="dense")
    assert dense >= 266_610 * 4  # the dense fp32 file holds every weight
    for fmt in ("auto", "csr", "bitmask"):
        size = save(tmp_path / f"{fmt}.safetensors", params, format=fmt)
        assert size <= dense / 6, (fmt, size, dense)
    enc = [leaf["encoding"] for leaf in load_header(tmp_path / "csr.safetensors")["leaves"]]
    assert enc == ["dense", "csr"] * 3
    col = safetensors.numpy.load_file(tmp_path / "csr.safetensors")["1.indices"]
    assert col.dtype == np.uint16  # 300 columns fit 16 bits


def test_lenet_unit_pruning_then_compact_is_at_most_55_percent(tmp_path):
    params = make_mlp([784, 300, 100, 10], [1.0, 1.0, 1.0], seed=0)
    hidden = lambda p, leaf: np.ndim(leaf) == 2 and "Dense_2" not in p  # noqa: E731
    pruned = apply_masks(params, unit_masks(params, 0.5, where=hidden))
    dense = save(tmp_path / "dense.safetensors", params, format="dense")
    small = save(tmp_path / "small.safetensors", pruned, format="compact", activation=jax.nn.relu)
    assert small <= 0.55 * dense
    x = x_of(784)
    np.testing.assert_allclose(
        out(load(tmp_path / "small.safetensors"), x), out(pruned, x), rtol=1e-5, atol=1e-6
    )


# ----------------------------------------------------------------------------- bad files


@pytest.fixture
def saved(tmp_path):
    params = make_mlp([12, 8, 3], [0.4, 0.6])
    f = tmp_path / "m.safetensors"
    save(f, params, format="csr")
    return f, params


def read_unverified(path):
    """``(prunejax header, members, stored checksum)`` of a file, without any verification."""
    with safetensors.safe_open(path, framework="np") as st:
        meta = st.metadata()
        arrays = {k: st.get_tensor(k) for k in st.keys()}
    return json.loads(meta["prunejax"]), arrays, meta["prunejax.sha256"]


def _rewrite(path, header_fn=None, member_fn=None, fix_checksum=False):
    """Rewrite a saved file, editing its header and/or members; the checksum is recomputed only
    with ``fix_checksum`` (otherwise the old one is kept)."""
    header, members, old = read_unverified(path)
    header.pop("checksum", None)
    if header_fn:
        header_fn(header)
    if member_fn:
        member_fn(members)
    container.write(path, header, list(members.items()))
    if not fix_checksum:
        data = path.read_bytes()
        new = read_unverified(path)[2]
        path.write_bytes(data.replace(new.encode(), old.encode()))


@pytest.mark.parametrize("cut", [0.5, 0.9, -1, -22, 10, 3])
def test_truncated_file_raises(saved, cut):
    f, _ = saved
    data = f.read_bytes()
    n = int(len(data) * cut) if isinstance(cut, float) else (len(data) + cut if cut < 0 else cut)
    f.write_bytes(data[:n])
    with pytest.raises(FileFormatError, match="truncated or corrupted|checksum mismatch"):
        load(f)


def test_flipped_payload_byte_raises(saved):
    f, _ = saved
    data = bytearray(f.read_bytes())
    data[-3] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(FileFormatError, match="checksum mismatch"):
        load(f)


def test_tampered_header_fails_the_checksum(saved):
    f, _ = saved

    def edit(h):
        h["leaves"][1]["path"] = "Dense_9/kernel"

    _rewrite(f, header_fn=edit)
    with pytest.raises(FileFormatError, match="checksum"):
        load(f)


def test_tampered_member_fails_the_checksum(saved):
    f, _ = saved

    def edit(m):
        m["1.data"] = m["1.data"] * 2

    _rewrite(f, member_fn=edit)
    with pytest.raises(FileFormatError, match="checksum"):
        load(f)


def test_moved_checksum_field_raises(saved):
    f, _ = saved
    header, members, _ = read_unverified(f)
    f.write_bytes(
        safetensors.numpy.save(
            members, metadata={"prunejax.sha256": "0" * 64, "prunejax": json.dumps(header)}
        )
    )
    with pytest.raises(FileFormatError, match="checksum"):
        load(f)


def test_version_mismatch_raises_clearly(saved):
    f, _ = saved

    def edit(h):
        h["format_version"] = 3
        h["library_version"] = "9.9.9"

    _rewrite(f, header_fn=edit, fix_checksum=True)
    with pytest.raises(FileFormatError, match=r"format version 3.*9\.9\.9.*reads format version 2"):
        load(f)


def test_out_of_bounds_indices_with_valid_checksum_raise(saved):
    f, _ = saved

    def edit(m):
        m["1.indices"] = m["1.indices"].copy()
        m["1.indices"][0] = 200

    _rewrite(f, member_fn=edit, fix_checksum=True)
    with pytest.raises(FileFormatError, match="CSR index arrays of leaf 1"):
        load(f)


def test_not_a_prunejax_file(tmp_path):
    f = tmp_path / "plain.npz"
    np.savez(f, a=np.ones(3))
    with pytest.raises(FileFormatError, match="not a prunejax model file"):
        load(f)
    g = tmp_path / "junk.safetensors"
    g.write_bytes(os.urandom(300))
    with pytest.raises(FileFormatError):
        load(g)
    h = tmp_path / "plain.safetensors"
    safetensors.numpy.save_file({"a": np.ones(3, np.float32)}, h)
    with pytest.raises(FileFormatError, match="not a prunejax model file"):
        load(h)
    with pytest.raises(FileNotFoundError):
        load(tmp_path / "missing.safetensors")


def test_extra_or_missing_members_raise(saved):
    f, _ = saved
    _rewrite(f, member_fn=lambda m: m.pop("1.indptr"), fix_checksum=True)
    with pytest.raises(FileFormatError, match="do not match its header"):
        load(f)


def test_only_regular_files_are_opened_and_nothing_blocks(tmp_path):
    with pytest.raises(FileFormatError, match="directory"):
        load(tmp_path)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(FileFormatError, match="not a regular file"):
        load(fifo)  # would block forever if it were opened for a plain read
    if os.path.exists("/dev/zero"):
        with pytest.raises(FileFormatError, match="not a regular file"):
            load_header("/dev/zero")


def test_declared_shape_beyond_the_limits_is_refused_naming_the_leaf(tmp_path):
    f = tmp_path / "big.safetensors"
    params = {"a": np.ones(3, np.float32), "w": np.zeros((1, 8), np.float32)}
    params["w"][0, 2] = 1.0
    save(f, params, format="csr")

    def edit(h):  # a CSR leaf of 2.5e8 columns: 1 GB dense, a few KB on disk
        h["leaves"][1]["shape"] = [1, 250_000_000]

    def members(m):
        m["1.indices"] = m["1.indices"].astype(np.uint32)

    _rewrite(f, header_fn=edit, member_fn=members, fix_checksum=True)
    assert f.stat().st_size < 4000
    with pytest.raises(FileFormatError, match=r"leaf 1 \('w'\).*max_bytes=67,108,864"):
        load(f)
    back = load(f, max_bytes=2 * 10**9)  # an explicit limit the user trusts
    assert back["w"].shape == (1, 250_000_000) and back["w"][0, 2] == 1.0
    del back
    with pytest.raises(FileFormatError, match=r"leaf 1 \('w'\).*max_elements=1,000"):
        load(f, max_elements=1000, max_bytes=2 * 10**9)
    with pytest.raises(TypeError, match="max_bytes"):
        load(f, max_bytes="1GB")


def test_expand_is_checked_against_the_limits(tmp_path):
    params = make_mlp([6, 5, 3], [1.0, 1.0], seed=2)
    params["Dense_0"]["kernel"][:, 1] = 0
    f = tmp_path / "c.safetensors"
    save(f, params, format="compact", activation=jax.nn.relu)

    def edit(h):
        h["compaction"]["layers"][1]["out"] = 100_000_000
        h["compaction"]["layers"][1]["in"] = 6

    def members(m):
        m["kept.1"] = m["kept.1"].astype(np.uint32)

    _rewrite(f, header_fn=edit, member_fn=members, fix_checksum=True)
    load(f)  # compacted leaves are small
    with pytest.raises(
        FileFormatError, match=r"leaf 2 \('Dense_1/bias'\) of shape \[100000000\].*max_bytes"
    ):
        load(f, expand=True)


def test_duplicate_keys_and_deep_nesting_are_refused(saved):
    f, _ = saved
    header, members, _ = read_unverified(f)
    text = json.dumps(header)
    # a duplicated key in the JSON: the second "format" would silently win
    dup = text.replace('"format": "csr"', '"format": "csr", "format": "dense"')
    write_raw(f, text, members)
    assert load(f)["Dense_0"]["kernel"].shape == (12, 8)  # the raw writer follows the spec
    for inner, msg in (
        (dup, "duplicate key 'format'"),
        (text[:-1] + ', "deep": ' + "[" * 100_000 + "]" * 100_000 + "}", "nested deeper"),
        (text[:-1] + ', "wide": [' + "{}," * 1_500_000 + "{}]}", "more than 1,000,000 values"),
    ):
        write_raw(f, inner, members)
        with pytest.raises(FileFormatError, match=msg):
            load(f)


def test_duplicate_structure_key_does_not_drop_a_leaf(saved):
    f, _ = saved

    def edit(h):
        h["structure"]["dict"][0][1]["dict"][1][0] = "kernel"  # bias renamed to kernel

    _rewrite(f, header_fn=edit, fix_checksum=True)
    with pytest.raises(FileFormatError, match="duplicate dict key 'kernel'"):
        load(f)


# ----------------------------------------------------------------------------- legacy ZIP files


@pytest.mark.parametrize("fmt", ["dense", "bitmask", "csr", "bcoo", "compact"])
def test_legacy_zip_files_still_load(tmp_path, fmt):
    tree = {
        "a": make_mlp([12, 8, 3], [0.4, 0.6], seed=1),
        "c": np.array([1 + 2j, 0, 3j], np.complex64),
        "d": jnp.asarray(np.ones((3, 2)), jnp.bfloat16),
    }
    f = tmp_path / f"old-{fmt}.pjz"
    if fmt == "compact":
        tree = tree["a"]
        legacy_save(f, tree, format=fmt, activation=jax.nn.relu)
    else:
        legacy_save(f, tree, format=fmt)
    assert load_header(f)["format_version"] == 1
    back = load(f, expand=True)
    assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(tree)
    for a, b in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(tree), strict=True):
        assert type(a) is type(b) and np.asarray(a).dtype == np.asarray(b).dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.fixture
def legacy(tmp_path):
    params = make_mlp([12, 8, 3], [0.4, 0.6])
    f = tmp_path / "m.pjz"
    legacy_save(f, params, format="csr")
    return f, params


def _zip_rewrite(path, header_fn=None, member_fn=None, fix_checksum=False, raw_header=None):
    with zipfile.ZipFile(path) as z:
        header = json.loads(z.read("header.json"))
        members = {n[: -len(".npy")]: z.read(n) for n in z.namelist() if n != "header.json"}
    if header_fn:
        header_fn(header)
    if member_fn:
        member_fn(members)
    if fix_checksum:
        header["checksum"] = legacy_checksum(header, list(members.items()))
    text = raw_header if raw_header is not None else json.dumps(header).encode()
    write_zip(path, text, list(members.items()))


def test_legacy_tampering_and_version_raise(legacy):
    f, _ = legacy
    _zip_rewrite(f, member_fn=lambda m: m.update({"1.data": npy_bytes(np.ones(8, np.float32))}))
    with pytest.raises(FileFormatError, match="checksum mismatch|header says"):
        load(f)
    _zip_rewrite(f, header_fn=lambda h: h.update(format_version=7), fix_checksum=True)
    with pytest.raises(FileFormatError, match="format version 7"):
        load(f)


class _Boom:
    triggered = False

    def __reduce__(self):
        return (_boom, ())


def _boom():
    _Boom.triggered = True
    return 0


def test_legacy_pickled_member_is_never_unpickled(legacy):
    f, _ = legacy

    def edit(m):
        buf = io.BytesIO()
        np.save(buf, np.array([_Boom()], dtype=object), allow_pickle=True)
        m["1.data"] = buf.getvalue()

    _zip_rewrite(f, member_fn=edit, fix_checksum=True)
    with pytest.raises(FileFormatError):
        load(f)
    assert not _Boom.triggered


def test_legacy_zip_bomb_is_refused_before_inflating(tmp_path):
    f = tmp_path / "bomb.pjz"
    with zipfile.ZipFile(f, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("header.json", b" " * 50_000_000)  # 50 MB of spaces in ~50 KB
        z.writestr("0.data.npy", b"\0" * 50_000_000)
    assert f.stat().st_size < 200_000
    with pytest.raises(FileFormatError, match="compressed or encrypted"):
        load(f)


def test_legacy_duplicate_members_and_oversized_header(legacy, tmp_path):
    f, _ = legacy
    data = {}
    with zipfile.ZipFile(f) as z:
        for n in z.namelist():
            data[n] = z.read(n)
    g = tmp_path / "dup.pjz"
    with zipfile.ZipFile(g, "w") as z, pytest.warns(UserWarning, match="Duplicate name"):
        for n, b in data.items():
            z.writestr(n, b)
        z.writestr("header.json", data["header.json"])
    with pytest.raises(FileFormatError, match="duplicate archive members"):
        load(g)
    _zip_rewrite(f, raw_header=b"{" + b" " * (65 * 2**20) + b"}")
    with pytest.raises(FileFormatError, match="exceeds"):
        load(f)


def test_legacy_deep_or_duplicate_json_header(legacy):
    f, _ = legacy
    _zip_rewrite(f, raw_header=b'{"magic": "prunejax", "magic": "prunejax"}')
    with pytest.raises(FileFormatError, match="duplicate key 'magic'"):
        load(f)
    _zip_rewrite(f, raw_header=b"[" * 200_000 + b"]" * 200_000)
    with pytest.raises(FileFormatError, match="nested deeper"):
        load(f)


def test_legacy_crafted_npy_shape_is_not_allocated(legacy):
    f, _ = legacy

    def edit(m):  # an .npy header declaring 2**40 entries over 32 bytes of payload
        arr = np.zeros(8, np.float32)
        raw = npy_bytes(arr).replace(b"(8,)", b"(1099511627776,)")
        m["1.data"] = raw

    _zip_rewrite(f, member_fn=edit, fix_checksum=True)
    with pytest.raises(FileFormatError, match="member '1.data'"):
        load(f)


# ----------------------------------------------------------------------------- bad input, atomicity


def test_nan_leaf_is_refused_naming_it(tmp_path):
    params = make_mlp([6, 4], [0.5])
    params["Dense_0"]["kernel"][1, 1] = np.nan
    with pytest.raises(ValueError, match=r"'Dense_0/kernel'.*1 NaN"):
        save(tmp_path / "x.safetensors", params)
    assert not (tmp_path / "x.safetensors").exists()


def test_unknown_format_and_compact_without_activation(tmp_path):
    params = make_mlp([6, 4], [0.5])
    with pytest.raises(ValueError, match="unknown format 'coo'.*bcoo"):
        save(tmp_path / "x.safetensors", params, format="coo")
    with pytest.raises(ValueError, match="activation="):
        save(tmp_path / "x.safetensors", params, format="compact")
    bad = {"a": np.ones((3, 4), np.float32), "b": np.ones((5, 2), np.float32)}
    with pytest.raises(ValueError, match="not an MLP chain"):
        save(tmp_path / "x.safetensors", bad, format="compact", activation=jax.nn.relu)
    # auto falls back to no compaction for such a tree
    save(tmp_path / "x.safetensors", bad, format="auto", activation=jax.nn.relu)
    assert load_header(tmp_path / "x.safetensors")["compaction"] is None


def test_unsupported_containers_and_dtypes(tmp_path):
    from collections import namedtuple

    P = namedtuple("P", "w")
    with pytest.raises(TypeError, match="P"):
        save(tmp_path / "x.safetensors", P(np.ones(3)))
    with pytest.raises(TypeError, match="'a'.*object"):
        save(tmp_path / "x.safetensors", {"a": np.array(["s"], dtype=object)})


def test_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path, monkeypatch):
    params = make_mlp([6, 4], [0.5])
    f = tmp_path / "m.safetensors"
    save(f, params)
    before = f.read_bytes()
    calls = {"n": 0}
    real = container._raw

    def failing(a):
        calls["n"] += 1
        if calls["n"] == 4:  # the second payload written to the file
            raise OSError("disk full")
        return real(a)

    monkeypatch.setattr(container, "_raw", failing)
    with pytest.raises(OSError, match="disk full"):
        save(f, jax.tree_util.tree_map(lambda x: x * 2, params))
    assert calls["n"] == 4
    assert f.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["m.safetensors"]


_KILLED_WRITER = """
import os, sys, time
from prunejax._util import atomic_path
with atomic_path(sys.argv[1]) as tmp:
    with open(tmp, "wb") as f:
        f.write(b"x" * 1000)
        f.flush()
        print(tmp, flush=True)
        time.sleep(60)
"""


def test_temp_files_of_a_killed_writer_are_removed_at_the_next_write(tmp_path):
    f = tmp_path / "m.safetensors"
    child = subprocess.Popen(
        [sys.executable, "-c", _KILLED_WRITER, str(f)],
        stdout=subprocess.PIPE,
        text=True,
        env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)),
    )
    tmp = child.stdout.readline().strip()
    assert tmp and os.path.exists(tmp) and str(child.pid) in os.path.basename(tmp)
    # a live writer's temporary file is left alone by another writer
    with atomic_path(f) as t:
        t.write_bytes(b"live")
    assert os.path.exists(tmp) and f.read_bytes() == b"live"
    child.send_signal(signal.SIGKILL)
    child.wait()
    child.stdout.close()
    assert os.path.exists(tmp)  # nothing removes it until the next write
    save(f, make_mlp([6, 4], [0.5]))
    assert not os.path.exists(tmp)
    assert sorted(os.listdir(tmp_path)) == ["m.safetensors"]
    # names that only look alike, and other targets' temporary files, are never touched
    keep = [tmp_path / ".m.safetensors.notours.tmp", tmp_path / ".n.safetensors.pjtmp1.abc.tmp"]
    for k in keep:
        k.write_bytes(b"")
    save(f, make_mlp([6, 4], [0.5]))
    assert all(k.exists() for k in keep)


def test_leaf_bytes_matches_the_written_file():
    import re

    rng = np.random.default_rng(0)
    w = (rng.normal(size=(70, 300)) * (rng.random((70, 300)) < 0.1)).astype(np.float32)
    nnz = int(np.count_nonzero(w))
    tree = [np.ones(2, np.float32), np.ones(3, np.float32), np.ones(4, np.float32), w]
    for enc in ENCODINGS:
        data = _save_bytes(tree, enc)
        n = int.from_bytes(data[:8], "little")
        text = data[8 : 8 + n].decode()
        actual = 0
        for role in ROLES[enc]:
            m = re.search(rf'"3\.{role}":\{{[^}}]*\}}', text)
            begin, end = json.loads(m.group(0).split(":", 1)[1])["data_offsets"]
            actual += len(m.group(0)) + 1 + (end - begin)  # entry, comma, payload
        assert leaf_bytes(enc, w.shape, w.dtype, nnz, index=3) == actual, enc


def _save_bytes(tree, fmt):
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "m.safetensors")
        save(path, tree, format=fmt)
        with open(path, "rb") as fh:
            return fh.read()


def test_save_is_deterministic_and_densifies_sparse_kernels(tmp_path):
    from jax.experimental import sparse as jsparse

    params = make_mlp([12, 8, 3], [0.4, 0.6])
    save(tmp_path / "a.safetensors", params, format="auto")
    save(tmp_path / "b.safetensors", params, format="auto")
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    sp = dict(
        params,
        Dense_0=dict(params["Dense_0"], kernel=jsparse.BCOO.fromdense(params["Dense_0"]["kernel"])),
    )
    save(tmp_path / "c.safetensors", sp, format="csr")
    back = load(tmp_path / "c.safetensors")
    assert isinstance(back["Dense_0"]["kernel"], jax.Array)
    np.testing.assert_array_equal(
        np.asarray(back["Dense_0"]["kernel"]), params["Dense_0"]["kernel"]
    )


def test_nan_at_a_masked_out_entry_is_not_saved(tmp_path):
    params = make_mlp([6, 4], [1.0])
    masks = jax.tree_util.tree_map(lambda x: np.ones(x.shape, bool), params)
    params["Dense_0"]["kernel"][2, 3] = np.nan
    masks["Dense_0"]["kernel"][2, 3] = False
    save(tmp_path / "m.safetensors", params, masks=masks, format="bitmask")
    back = load(tmp_path / "m.safetensors")
    assert back["Dense_0"]["kernel"][2, 3] == 0 and np.isfinite(back["Dense_0"]["kernel"]).all()


def test_negative_zero_keeps_its_sign_only_in_dense_encodings(tmp_path):
    """Documented: sparse encodings store entries != 0, so -0.0 loads as +0.0."""
    w = np.array([[-0.0, 1.0], [0.0, -2.0]], np.float32)
    for fmt, sign in (("dense", True), ("csr", False), ("bitmask", False), ("bcoo", False)):
        save(tmp_path / "z.safetensors", {"w": w}, format=fmt)
        back = load(tmp_path / "z.safetensors")["w"]
        np.testing.assert_array_equal(back, w)
        assert bool(np.signbit(back[0, 0])) is sign, fmt


def test_a_float64_jax_leaf_is_not_silently_narrowed(tmp_path):
    f = tmp_path / "x.safetensors"
    save(f, {"w": np.ones(3, np.float64)})

    def edit(h):
        h["leaves"][0]["array"] = "jax"

    _rewrite(f, header_fn=edit, fix_checksum=True)
    if jax.config.jax_enable_x64:
        assert load(f)["w"].dtype == jnp.float64
    else:
        with pytest.raises(FileFormatError, match=r"leaf 0 \('w'\).*float64.*jax_enable_x64"):
            load(f)


def test_legacy_archive_with_too_many_members_is_refused_before_listing(tmp_path):
    f = tmp_path / "many.pjz"
    with zipfile.ZipFile(f, "w") as z:
        for i in range(100_001):
            z.writestr(zipfile.ZipInfo(f"{i}"), b"")
    with pytest.raises(FileFormatError, match="declares 100,001 members"):
        load(f)


def test_temp_files_of_another_host_are_never_judged(tmp_path):
    """A directory may be shared by hosts or containers: a PID only means something on the host
    that wrote the temporary file, so another host's file is left alone even if that PID is dead
    here; this host's file of a dead PID is removed."""
    from prunejax import _util

    other = "0" * 8 if _util._HOST != "0" * 8 else "1" * 8
    dead = 2**22 + 12345  # above Linux's default pid_max: no such process
    theirs = tmp_path / f".m.safetensors.pjtmp{other}-{dead}.abc.tmp"
    ours = tmp_path / f".m.safetensors.pjtmp{_util._HOST}-{dead}.abc.tmp"
    theirs.write_bytes(b"")
    ours.write_bytes(b"")
    save(tmp_path / "m.safetensors", make_mlp([6, 4], [0.5]))
    assert theirs.exists() and not ours.exists()


def test_rewriting_a_file_keeps_its_permissions(tmp_path):
    f = tmp_path / "m.safetensors"
    save(f, make_mlp([6, 4], [0.5]))
    os.chmod(f, 0o600)
    save(f, make_mlp([6, 4], [0.5]))
    assert stat.S_IMODE(os.stat(f).st_mode) == 0o600
