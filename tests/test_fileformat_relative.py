"""The ``relative`` encoding of plain sparse leaves: Huffman-coded relative indices + values."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
import safetensors
from hypothesis import given, settings
from hypothesis import strategies as st

import prunejax as pj
from prunejax.fileformat import FileFormatError, container, load, load_header, save
from prunejax.fileformat.plan import plan_tree


def _sparse(shape, density, seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=shape) * (rng.random(shape) < density)).astype(dtype)


@settings(max_examples=25, deadline=None)
@given(
    rows=st.integers(1, 40),
    cols=st.integers(1, 40),
    density=st.sampled_from([0.0, 0.01, 0.1, 0.5, 0.99]),
    seed=st.integers(0, 2**31 - 1),
    dtype=st.sampled_from([np.float32, np.float16, np.float64]),
)
def test_relative_round_trips_and_its_size_is_predicted(
    tmp_path_factory, rows, cols, density, seed, dtype
):
    w = _sparse((rows, cols), density, seed, dtype)
    tree = {"b": np.ones(3, np.float32), "k": w}
    d = tmp_path_factory.mktemp("r")
    for fmt in ("relative", "auto"):
        n = save(d / fmt, tree, format=fmt)
        assert (
            n == plan_tree(tree, format=fmt).nbytes() == pj.size_report(tree, format=fmt).file_bytes
        )
        back = load(d / fmt)
        assert back["k"].dtype == w.dtype and np.array_equal(back["k"], w)
    assert load_header(d / "relative")["leaves"][1]["encoding"] == "relative"


def test_auto_prefers_relative_indices_for_very_sparse_kernels(tmp_path):
    w = _sparse((784, 300), 0.05)
    tree = {"k": w}
    sizes = {fmt: save(tmp_path / fmt, tree, format=fmt) for fmt in ("csr", "bitmask", "relative")}
    auto = save(tmp_path / "auto", tree, format="auto")
    assert load_header(tmp_path / "auto")["leaves"][0]["encoding"] == "relative"
    assert auto == sizes["relative"] < min(sizes["csr"], sizes["bitmask"])
    # ~5 bits per index at 5% density (the entropy of the positions), not 16 as in CSR
    leaf = load_header(tmp_path / "auto")["leaves"][0]
    nnz = int(np.count_nonzero(w))
    assert leaf["blob"] * 8 / nnz < 6.0
    # the values are a plain safetensors member any reader sees
    z = safetensors.numpy.load_file(tmp_path / "auto")
    assert np.array_equal(z["0.data"], w[w != 0])
    # JAX in, JAX out
    save(tmp_path / "j", {"k": jnp.asarray(w)}, format="relative")
    assert isinstance(load(tmp_path / "j")["k"], type(jnp.zeros(1)))


def _rewrite(path, header_fn=None, member_fn=None):
    with safetensors.safe_open(path, framework="np") as st_:
        header = json.loads(st_.metadata()["prunejax"])
        members = {k: st_.get_tensor(k) for k in st_.keys()}
    if header_fn:
        header_fn(header)
    if member_fn:
        member_fn(members)
    container.write(path, header, list(members.items()))


@pytest.mark.parametrize(
    "edit",
    [
        "trailing",
        "truncate",
        "zero_value",
        "ones",
        "bad_index_bits",
        "index_bits_mismatch",
    ],
)
def test_corrupted_relative_leaf_raises(tmp_path, edit):
    w = _sparse((50, 40), 0.05, seed=2)
    f = tmp_path / "r"
    save(f, {"k": w}, format="relative")

    def members(m):
        b = m["0.indices"]
        if edit == "trailing":
            m["0.indices"] = np.concatenate([b, np.array([1], np.uint8)])
        elif edit == "truncate":
            m["0.indices"] = b[: b.size - 3]
        elif edit == "zero_value":
            d = m["0.data"].copy()
            d[3] = 0
            m["0.data"] = d
        elif edit == "ones":
            m["0.indices"] = np.concatenate([b[:8], np.full(b.size - 8, 255, np.uint8)])

    def header(h):
        leaf = h["leaves"][0]
        leaf["blob"] = int(
            {"trailing": leaf["blob"] + 1, "truncate": leaf["blob"] - 3}.get(edit, leaf["blob"])
        )
        if edit == "bad_index_bits":
            leaf["index_bits"] = 40
        if edit == "index_bits_mismatch":
            leaf["index_bits"] = leaf["index_bits"] + 1

    _rewrite(f, header_fn=header, member_fn=members)
    with pytest.raises(FileFormatError):
        load(f)


def test_a_long_stream_of_escapes_is_refused_at_the_end_of_its_leaf(tmp_path):
    """A leaf of one entry whose index stream is 64 KiB of escapes: decoding stops as soon as
    the relative indices pass the leaf, not at the end of the stream."""
    f = tmp_path / "r"
    save(f, {"k": _sparse((50, 40), 0.05, seed=2)}, format="relative")
    # symbols 0 and 1 (the escape for index_bits=1) of one bit each, then all escapes
    blob = np.concatenate([np.array([0x11], np.uint8), np.full(2**16, 0xFF, np.uint8)])

    def header_fn(h):
        h["leaves"][0].update(shape=[1, 1], nnz=1, index_bits=1, blob=int(blob.size))

    def member_fn(m):
        m["0.indices"] = blob
        m["0.data"] = np.ones(1, np.float32)

    _rewrite(f, header_fn=header_fn, member_fn=member_fn)
    with pytest.raises(FileFormatError, match="relative index past its leaf of 1"):
        load(f)


@pytest.mark.parametrize("fmt", ["relative", "qbitmask"])
def test_version_1_files_do_not_accept_the_version_2_encodings(tmp_path, fmt):
    """A legacy (version-1) ZIP file whose leaf claims an encoding only version 2 defines is
    refused, even when its members are consistent with that encoding."""
    from craft_files import checksum, header_bytes, npy_bytes, write_zip

    w = _sparse((20, 10), 0.1, seed=1)
    params = pj.kmeans_quantize({"k": w}, 2) if fmt.startswith("q") else {"k": w}
    f2 = tmp_path / "v2"
    save(f2, params, format=fmt)
    with safetensors.safe_open(f2, framework="np") as st_:
        header = json.loads(st_.metadata()["prunejax"])
        members = [(k, npy_bytes(st_.get_tensor(k))) for k in st_.keys()]
    assert header["leaves"][0]["encoding"] == fmt
    header = {k: v for k, v in header.items() if k != "checksum"}
    header["format_version"] = 1
    header["checksum"] = checksum(header, members)
    f1 = tmp_path / "v1.pjz"
    write_zip(f1, header_bytes(header), members)
    with pytest.raises(FileFormatError, match=f"unknown encoding '{fmt}' for format version 1"):
        load(f1)
