"""Fuzzing the model file readers with hostile bytes.

Every input either loads exactly (the saved tree, bit for bit, or for a consistently crafted file
the shapes its header declares) or raises ``FileFormatError``; none crashes with another exception,
hangs, or allocates more than ``max(64 MiB, 4 x file size)`` before it is rejected.  The loads run
in one worker subprocess under ``RLIMIT_AS`` (a hard stop), which measures each case's peak
resident memory (``VmHWM`` after ``clear_refs``) and reports the outcome.

Groups, for the safetensors container (format 2) and the legacy ZIP files (format 1): truncations,
bit flips, crafted prunejax headers with recomputed checksums (shapes, dtypes, encodings, nnz,
structure, compaction records, duplicate keys, deep nesting, oversized JSON), crafted containers
(safetensors offsets, dtypes, lengths; ZIP duplicates, compression, bombs, ``.npy`` headers).

``pytest tests/test_fuzz_files.py`` runs in well under a minute; ``--fuzz-long`` (see
``tests/conftest.py``) runs 20 times the examples.  Counts of cases per group are printed with
``-s``.
"""

from __future__ import annotations

import collections
import io
import json
import os
import select
import subprocess
import sys
import zipfile

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from craft_files import (
    assemble,
    checksum,
    entry_text,
    header_bytes,
    legacy_members,
    split_file,
    tree_digest,
    write_zip,
)
from hypothesis import HealthCheck, given, settings
from mlp_factory import make_mlp

from prunejax.fileformat import save
from prunejax.fileformat.dtypes import SAFETENSORS_DTYPES
from prunejax.fileformat.header import header_members
from prunejax.fileformat.structure import rebuild_structure

MiB = 2**20
HARD_LIMIT = 1024 * MiB  # RLIMIT_AS headroom above the worker's baseline: a runaway stops here
COUNTS: collections.Counter = collections.Counter()

_WORKER = r"""
import json, os, resource, sys
import numpy as np, jax, jax.numpy as jnp
from craft_files import tree_digest
import prunejax.fileformat as ff

(jnp.asarray(np.ones(3, np.float32)) + 1).block_until_ready()  # start the backend first

def status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0

limit = status("VmSize") + int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
print(json.dumps({"ready": True}), flush=True)
for line in sys.stdin:
    cmd = json.loads(line)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = status("VmRSS")
    out = {}
    try:
        if cmd["op"] == "alloc":
            np.ones(cmd["n"], np.uint8)
            out["outcome"] = "ok"
        else:
            tree = ff.load(cmd["path"], expand=cmd["expand"])
            out = {"outcome": "ok", "digest": tree_digest(tree),
                   "shapes": [list(np.shape(x)) for x in jax.tree_util.tree_leaves(tree)]}
            del tree
    except ff.FileFormatError as e:
        out = {"outcome": "FileFormatError", "msg": str(e)[-300:]}
    except BaseException as e:
        out = {"outcome": "other", "type": type(e).__name__, "msg": str(e)[-300:]}
    out["peak"] = status("VmHWM") - base
    print(json.dumps(out), flush=True)
"""


class Worker:
    """One subprocess that loads files under RLIMIT_AS and reports outcome and peak memory."""

    def __init__(self, tmp):
        here = os.path.dirname(os.path.abspath(__file__))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([here, *sys.path]))
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _WORKER, str(HARD_LIMIT)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.path = os.path.join(tmp, "case.bin")
        assert json.loads(self._readline(120))["ready"]

    def _readline(self, timeout):
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            raise AssertionError(f"the reader did not answer within {timeout} s (a hang)")
        line = self.proc.stdout.readline()
        if not line:
            raise AssertionError(f"the reader process died (exit code {self.proc.wait()})")
        return line

    def ask(self, cmd, timeout=30):
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return json.loads(self._readline(timeout))

    def load(self, data: bytes, expand: bool = False) -> dict:
        with open(self.path, "wb") as f:
            f.write(data)
        return self.ask({"op": "load", "path": self.path, "expand": expand})

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    w = Worker(str(tmp_path_factory.mktemp("fuzz")))
    yield w
    w.close()
    print("\nfuzz cases per group:", json.dumps(dict(sorted(COUNTS.items()))))


def _trees():
    rng = np.random.default_rng(0)
    mlp = make_mlp([12, 8, 6, 3], [0.4, 0.6, 1.0], seed=1)
    mlp["Dense_1"]["kernel"][:, 2] = 0  # a dead unit for compaction
    mixed = {
        "c": (rng.normal(size=(3, 4)) * (rng.random((3, 4)) < 0.5)).astype(np.complex64) * 1j,
        "b": jnp.asarray(rng.normal(size=(4, 5)) * (rng.random((4, 5)) < 0.3), jnp.bfloat16),
        "i": [rng.integers(-3, 3, size=(5, 3)).astype(np.int16), np.array(True)],
        "e": (np.zeros((0, 3), np.float32), None, np.array(2.5)),
    }

    # no -0.0 (sparse encodings store it as +0.0, as documented): exact comparisons below
    def plus_zero(x):
        y = x + x.dtype.type(0)
        return np.asarray(y) if isinstance(x, np.ndarray) else y

    return jax.tree_util.tree_map(plus_zero, {"mlp": mlp, "mixed": mixed})


TREES = _trees()
CASES = [("mlp", f, None) for f in ("dense", "bitmask", "csr", "bcoo", "auto")]
CASES += [("mixed", f, None) for f in ("dense", "bitmask", "csr", "bcoo")]
CASES += [("mlp", "compact", jax.nn.relu)]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """``(tree name, new-format bytes, legacy bytes)`` of every base case."""
    d = tmp_path_factory.mktemp("base")
    out = []
    for i, (name, fmt, act) in enumerate(CASES):
        p = d / f"{i}.safetensors"
        save(p, TREES[name], format=fmt, activation=act)
        header, members = legacy_members(TREES[name], format=fmt, activation=act)
        q = d / f"{i}.pjz"
        write_zip(q, header_bytes(dict(header, checksum=checksum(header, members))), members)
        out.append((name, p.read_bytes(), q.read_bytes()))
    return out


def _check(res: dict, data: bytes, group: str, *, exact: str | None = None, shapes=None):
    """The outcome rules: FileFormatError within the memory bound, or an exact/consistent load."""
    COUNTS[group] += 1
    if res["outcome"] == "FileFormatError":
        assert res["peak"] <= max(64 * MiB, 4 * len(data)), (group, res)
        COUNTS[group + ":rejected"] += 1
        if os.environ.get("PRUNEJAX_FUZZ_LOG"):
            with open(os.environ["PRUNEJAX_FUZZ_LOG"], "a") as f:
                f.write(f"{group}\t{res['msg']}\n")
        return
    assert res["outcome"] == "ok", (group, res)
    if exact is not None:
        assert res["digest"] == exact, (group, "loaded something else", res)
    if shapes is not None:
        assert res["shapes"] == shapes, (group, res)


def _settings(n, fuzz_examples):
    return settings(
        max_examples=fuzz_examples(n),
        deadline=None,
        derandomize=False,
        suppress_health_check=list(HealthCheck),
    )


def test_the_memory_bound_is_enforced(worker):
    """The worker really is bounded (a 2 GiB allocation fails) and a plain load is small."""
    res = worker.ask({"op": "alloc", "n": 2 * HARD_LIMIT})
    assert res["outcome"] == "other" and res["type"] == "MemoryError"


def test_base_files_round_trip(worker, files):
    for (name, new, old), (_, fmt, _) in zip(files, CASES, strict=True):
        for data in (new, old):
            res = worker.load(data)
            assert res["outcome"] == "ok", res
            if fmt != "compact":  # a compacted file loads compacted
                assert res["digest"] == tree_digest(TREES[name]), (name, fmt, len(data))
            assert res["peak"] <= 64 * MiB, res


# ----------------------------------------------------------------------------- damage


def _expected(files, k):
    res_cache = _expected.cache
    if k not in res_cache:
        name, _, _ = files[k]
        res_cache[k] = None if CASES[k][1] == "compact" else tree_digest(TREES[name])
    return res_cache[k]


_expected.cache = {}


@pytest.mark.parametrize("legacy", [False, True], ids=["safetensors", "zip"])
def test_truncations(worker, files, fuzz_examples, legacy):
    @_settings(40, fuzz_examples)
    @given(k=st.integers(0, len(CASES) - 1), frac=st.floats(0, 1, exclude_max=True))
    def run(k, frac):
        data = files[k][2 if legacy else 1]
        cut = data[: int(frac * len(data))]
        res = worker.load(cut)
        group = f"{'zip' if legacy else 'safetensors'}/truncation"
        if legacy:
            _check(res, cut, group, exact=_expected(files, k))
        else:
            assert res["outcome"] == "FileFormatError", res  # every byte is under the checksum
            _check(res, cut, group)

    run()


@pytest.mark.parametrize("legacy", [False, True], ids=["safetensors", "zip"])
def test_bit_flips(worker, files, fuzz_examples, legacy):
    @_settings(60, fuzz_examples)
    @given(
        k=st.integers(0, len(CASES) - 1),
        flips=st.lists(
            st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 7)), min_size=1, max_size=3
        ),
    )
    def run(k, flips):
        data = bytearray(files[k][2 if legacy else 1])
        for pos, bit in flips:
            data[int(pos * len(data))] ^= 1 << bit
        data = bytes(data)
        res = worker.load(data)
        group = f"{'zip' if legacy else 'safetensors'}/bit flip"
        if legacy or data == files[k][1]:
            _check(res, data, group, exact=_expected(files, k))
        else:
            assert res["outcome"] == "FileFormatError", res
            _check(res, data, group)

    run()


# ----------------------------------------------------------------------------- crafted headers

JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=6),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=4), c, max_size=3),
    max_leaves=6,
)
BIG_SHAPES = st.sampled_from(
    [[1, 250_000_000], [2**24, 2**24], [0, 2**62], [2**48, 1], [70_000, 70_000], [3] * 70, [-1, 4]]
)
FIELDS = ("shape", "dtype", "encoding", "nnz", "array", "path")


@st.composite
def header_edits(draw, header):
    """A crafted prunejax header: one to three hostile edits of a real one."""
    h = json.loads(json.dumps(header))
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["leaf", "leaf", "big", "structure", "compaction", "top"]))
        leaves = h.get("leaves") if isinstance(h.get("leaves"), list) else []
        if kind in ("leaf", "big") and leaves and isinstance(leaves[0], dict):
            leaf = leaves[draw(st.integers(0, len(leaves) - 1))]
            if not isinstance(leaf, dict):
                continue
            if kind == "big":
                leaf["shape"] = draw(BIG_SHAPES)
                leaf["encoding"] = draw(st.sampled_from(["csr", "bcoo", "bitmask", "dense"]))
            else:
                field = draw(st.sampled_from(FIELDS))
                leaf[field] = draw(
                    JSON_VALUES
                    | st.sampled_from(["csr", "bcoo", "float64", "bfloat16", "jax", 0, 10**9])
                )
        elif kind == "structure":
            h["structure"] = _replace_somewhere(draw, h.get("structure"), JSON_VALUES)
        elif kind == "compaction":
            h["compaction"] = _replace_somewhere(
                draw,
                h.get("compaction") or {"activation": "relu", "layers": []},
                JSON_VALUES | st.integers(0, 2**40),
            )
        else:
            h[draw(st.sampled_from(["leaves", "structure", "format", "x"]))] = draw(JSON_VALUES)
    return h


def _replace_somewhere(draw, node, values):
    """``node`` with one randomly chosen descendant (or itself) replaced by a drawn value."""
    if isinstance(node, dict) and node and draw(st.booleans()):
        key = draw(st.sampled_from(sorted(node)))
        return dict(node, **{key: _replace_somewhere(draw, node[key], values)})
    if isinstance(node, list) and node and draw(st.booleans()):
        i = draw(st.integers(0, len(node) - 1))
        return node[:i] + [_replace_somewhere(draw, node[i], values)] + node[i + 1 :]
    return draw(values)


def _consistent_members(draw, header, version):
    """Members of exactly the shapes and dtypes a crafted header calls for (random contents), or
    None when the header is malformed or its members would be large."""
    try:
        members = header_members(header, version=version)
    except (ValueError, KeyError, TypeError, IndexError, OverflowError):
        return None
    if sum(int(np.prod(s)) * np.dtype(d).itemsize for _, s, d in members) > 2**20:
        return None
    out = {}
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    for name, shape, dtype in members:
        n = int(np.prod(shape)) * np.dtype(dtype).itemsize
        raw = rng.integers(0, 256, n, dtype=np.uint8)
        if draw(st.booleans()):  # small values: index arrays that are nearly valid
            raw = (raw % 4).astype(np.uint8)
        out[name] = raw.view(dtype).reshape(shape)
    return out


def _new_file(header_text, members):
    entries, payload, off = [], [], 0
    for name, a in members.items():
        a = np.asarray(a, order="C")
        entries.append(
            entry_text(
                name,
                {
                    "dtype": SAFETENSORS_DTYPES[a.dtype],
                    "shape": list(a.shape),
                    "data_offsets": [off, off + a.nbytes],
                },
            )
        )
        payload.append(a.tobytes())
        off += a.nbytes
    return assemble(entries, header_text, b"".join(payload))


def _old_members(data):
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        return {n[:-4]: z.read(n) for n in z.namelist() if n != "header.json"}


def _legacy_file(header, members_npy):
    buf = io.BytesIO()
    h = dict(header, checksum=checksum(header, list(members_npy.items())))
    write_zip(buf, header_bytes(h), list(members_npy.items()))
    return buf.getvalue()


def _npy(a):
    from craft_files import npy_bytes

    return npy_bytes(a)


@pytest.mark.parametrize("legacy", [False, True], ids=["safetensors", "zip"])
def test_crafted_headers_with_recomputed_checksums(worker, files, fuzz_examples, legacy):
    @_settings(80, fuzz_examples)
    @given(data=st.data(), k=st.integers(0, len(CASES) - 1), expand=st.booleans())
    def run(data, k, expand):
        _, new, old = files[k]
        entries, text, payload = split_file(new)
        header = json.loads(text)
        crafted = data.draw(header_edits(header))
        if legacy:
            crafted = dict(crafted, format_version=1)
        members = _consistent_members(data.draw, crafted, 1 if legacy else 2)
        if legacy:
            npy = {n: _npy(a) for n, a in members.items()} if members else _old_members(old)
            blob = _legacy_file(crafted, npy)
        else:
            if members is None:
                members = _members_of(new)
            blob = _new_file(json.dumps(crafted), members)
        res = worker.load(blob, expand=expand)
        group = f"{'zip' if legacy else 'safetensors'}/crafted header"
        _check(res, blob, group)
        if res["outcome"] == "ok" and not expand:
            assert res["shapes"] == _declared_shapes(crafted), res

    run()


def _declared_shapes(header):
    """The leaf shapes a header declares, in the flatten order of the tree it describes."""
    order = jax.tree_util.tree_leaves(
        rebuild_structure(header["structure"], list(range(len(header["leaves"]))), set())
    )
    return [list(header["leaves"][i]["shape"]) for i in order]


def _members_of(data):
    entries, _, payload = split_file(data)
    names = {v: k for k, v in SAFETENSORS_DTYPES.items()}
    out = {}
    for name, e in entries:
        b, end = e["data_offsets"]
        out[name] = np.frombuffer(payload[b:end], names[e["dtype"]]).reshape(e["shape"])
    return out


_BLOBS: dict = {}


def _hostile_blob(case, kind, depth, legacy):
    """A file whose prunejax header carries hostile JSON, its checksum recomputed."""
    _, new, old = case
    _, text, _ = split_file(new)
    if legacy:
        text = text.replace('"format_version":2', '"format_version":1')
    if kind == "dup":
        body = text[:-1] + ',"leaves":[]}'
    elif kind == "deep":
        body = text[:-1] + ',"z":' + "[" * depth + "]" * depth + "}"
    elif kind == "deep_string":  # brackets inside strings are not nesting: this one loads
        body = text[:-1] + ',"z":"' + "[" * depth + '"}'
    elif kind == "wide":  # 1.5 M empty objects: ~100 MB of Python objects from 4.5 MB
        body = text[:-1] + ',"z":[' + "{}," * 1_500_000 + "{}]}"
    elif kind == "big":
        body = text[:-1] + ',"z":"' + " " * (65 * 2**20) + '"}'
    else:
        body = text[:-1] + ',"z":NaN}'
    if not legacy:
        return _new_file(body, _members_of(new))
    header = json.loads(text)
    members = _old_members(old)
    header["checksum"] = checksum(header, list(members.items()))
    raw = json.dumps(header)[:-1] + body[len(text) - 1 :]
    buf = io.BytesIO()
    write_zip(buf, raw.encode(), list(members.items()))
    return buf.getvalue()


@pytest.mark.parametrize("legacy", [False, True], ids=["safetensors", "zip"])
def test_hostile_json(worker, files, fuzz_examples, legacy):
    """Duplicate keys, deep nesting and oversized headers, checksums recomputed."""

    @_settings(30, fuzz_examples)
    @given(
        k=st.integers(0, len(CASES) - 1),
        kind=st.sampled_from(["dup", "deep", "deep_string", "big", "wide", "nan"]),
        depth=st.integers(300, 200_000),
    )
    def run(k, kind, depth):
        key = (k, kind, depth if kind in ("deep", "deep_string") else 0, legacy)
        if key not in _BLOBS:
            if len(_BLOBS) > 8:
                _BLOBS.clear()
            _BLOBS[key] = _hostile_blob(files[k], kind, depth, legacy)
        blob = _BLOBS[key]
        res = worker.load(blob)
        group = f"{'zip' if legacy else 'safetensors'}/hostile json"
        if kind == "deep_string" and not legacy:
            assert res["outcome"] == "ok", res
        elif kind != "deep_string":
            assert res["outcome"] == "FileFormatError", res
        _check(res, blob, group)

    run()


# ----------------------------------------------------------------------------- crafted containers


def test_crafted_safetensors_headers(worker, files, fuzz_examples):
    """Offsets out of range or overlapping, wrong dtypes and shapes, duplicate tensor names and
    bad header lengths, with the checksum recomputed."""

    @_settings(80, fuzz_examples)
    @given(data=st.data(), k=st.integers(0, len(CASES) - 1))
    def run(data, k):
        entries, text, payload = split_file(files[k][1])
        entries = [(n, dict(e)) for n, e in entries]
        length = None
        for _ in range(data.draw(st.integers(1, 3))):
            i = data.draw(st.integers(0, len(entries) - 1))
            name, e = entries[i]
            kind = data.draw(st.sampled_from(["offsets", "dtype", "shape", "dup", "len", "drop"]))
            if kind == "offsets":
                e["data_offsets"] = data.draw(
                    st.lists(st.integers(-5, len(payload) + 64), min_size=0, max_size=3)
                    | st.just([0, len(payload)])
                )
            elif kind == "dtype":
                e["dtype"] = data.draw(st.sampled_from(["F64", "BF16", "F8_E4M3", "C64", "X", 3]))
            elif kind == "shape":
                e["shape"] = data.draw(st.lists(st.integers(-2, 2**33), max_size=4) | BIG_SHAPES)
            elif kind == "dup":
                entries.append((name, dict(e)))
            elif kind == "drop" and len(entries) > 1:
                entries.pop(i)
            else:
                length = data.draw(st.integers(0, 2**64 - 1))
        blob = assemble([entry_text(n, e) for n, e in entries], text, payload, length=length)
        res = worker.load(blob)
        _check(res, blob, "safetensors/crafted container", exact=_expected(files, k))

    run()


def test_crafted_zip_archives(worker, files, fuzz_examples):
    """Duplicate members, compressed members (bombs), extra members, bad ``.npy`` headers."""

    @_settings(60, fuzz_examples)
    @given(
        k=st.integers(0, len(CASES) - 1),
        kind=st.sampled_from(["dup", "dup_header", "deflate", "bomb", "extra", "npy", "npy_big"]),
        which=st.integers(0, 100),
    )
    def run(k, kind, which):
        old = files[k][2]
        with zipfile.ZipFile(io.BytesIO(old)) as z:
            items = [(n, z.read(n)) for n in z.namelist()]
        n, b = items[which % len(items)]
        method = zipfile.ZIP_STORED
        if kind == "dup":
            items.append((n, b))
        elif kind == "dup_header":
            items.append(items[0])
        elif kind in ("deflate", "bomb"):
            method = zipfile.ZIP_DEFLATED
            if kind == "bomb":
                items.append(("9999.data.npy", b"\0" * 30_000_000))
        elif kind == "extra":
            items.append(("evil.pkl", b"x"))
        elif n != "header.json":  # a hostile .npy header, the file's checksum recomputed
            shape = b"(1099511627776,)" if kind == "npy_big" else b"(2, 'x')"
            bad = b.replace(b"'shape': (", b"'shape': " + shape + b", '_': (", 1)
            items[which % len(items)] = (n, bad)
            header = json.loads(items[0][1])
            members = [(m[:-4], d) for m, d in items[1:]]
            items[0] = (
                "header.json",
                header_bytes(dict(header, checksum=checksum(header, members))),
            )
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", method) as z:
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                for name, data in items:
                    z.writestr(name, data)
        blob = buf.getvalue()
        res = worker.load(blob)
        _check(res, blob, "zip/crafted archive", exact=_expected(files, k))
        if kind in ("dup", "dup_header", "deflate", "bomb", "extra"):
            assert res["outcome"] == "FileFormatError", res

    run()
