"""Canonical Huffman coding and relative indices (prunejax.fileformat.entropy)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from prunejax.fileformat import entropy as E
from prunejax.fileformat.errors import FileFormatError


def _roundtrip(symbols: np.ndarray, alphabet: int) -> np.ndarray:
    symbols = np.asarray(symbols, np.int64)
    counts = np.bincount(symbols, minlength=alphabet)
    lengths = E.code_lengths(counts)
    assert lengths.max(initial=0) <= E.MAX_CODE_LENGTH
    used = counts > 0
    assert np.all((lengths > 0) == used)
    kraft = np.sum(2.0 ** -lengths[used].astype(float))
    assert kraft == 1.0 or (used.sum() == 1 and kraft == 0.5) or used.sum() == 0
    bits = E.encode(symbols, lengths)
    assert bits.size == int((counts * lengths).sum())
    # decode from an offset inside a longer stream, with trailing bits after it
    stream = np.concatenate([np.ones(3, np.uint8), bits, np.ones(5, np.uint8)])
    table = E.unpack_lengths(E.pack_lengths(lengths), alphabet)
    assert np.array_equal(table, lengths)
    out, end = E.decode(E.BitReader(stream), 3, table, count=symbols.size)
    assert end == 3 + bits.size
    assert np.array_equal(out, symbols)
    return lengths


@settings(max_examples=60, deadline=None)
@given(
    alphabet=st.integers(1, 300),
    n=st.integers(0, 2000),
    skew=st.floats(0.01, 3.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_random_streams_round_trip_bit_exactly(alphabet, n, skew, seed):
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.full(alphabet, skew))
    _roundtrip(rng.choice(alphabet, size=n, p=p), alphabet)


@pytest.mark.parametrize(
    "symbols, alphabet",
    [
        (np.zeros(0, np.int64), 32),  # empty
        (np.array([7]), 32),  # one symbol
        (np.full(1000, 3), 4),  # all symbols equal
        (np.full(10, 0), 1),  # a one-entry alphabet
        (np.arange(4096), 4096),  # the largest alphabet, all used once
    ],
)
def test_adversarial_streams_round_trip(symbols, alphabet):
    lengths = _roundtrip(symbols, alphabet)
    if symbols.size and np.unique(symbols).size == 1:
        assert lengths.max() == 1  # one used symbol: one bit each
    if alphabet == 4096:
        assert np.all(lengths == 12)


def test_max_length_codes_are_limited_to_15_bits_and_round_trip():
    # Fibonacci counts make the deepest Huffman tree: 40 symbols would need 39-bit codes
    fib = [1, 1]
    while len(fib) < 40:
        fib.append(fib[-1] + fib[-2])
    counts = np.array(fib, np.int64)
    assert E._huffman(counts).max() == 39
    lengths = E.code_lengths(counts)
    assert lengths.max() == 15
    assert np.sum(2.0 ** -lengths.astype(float)) == 1.0
    # every symbol, the rarest (longest) codes first and repeated
    stream = np.concatenate([[0, 1, 0, 1, 1], np.arange(40), np.arange(39, -1, -1)])
    bits = E.encode(stream, lengths)
    assert bits.size == int(lengths[stream].sum()) and bits.size >= 5 * 15
    out, end = E.decode(E.BitReader(bits), 0, lengths, count=stream.size)
    assert np.array_equal(out, stream) and end == bits.size


def test_huffman_is_close_to_the_entropy_of_a_skewed_stream():
    rng = np.random.default_rng(1)
    symbols = np.minimum(rng.geometric(0.08, size=20000) - 1, 31)
    counts = np.bincount(symbols, minlength=32)
    p = counts[counts > 0] / counts.sum()
    entropy_bits = -(counts[counts > 0] * np.log2(p)).sum()
    huffman_bits = (counts * E.code_lengths(counts)).sum()
    assert entropy_bits <= huffman_bits <= 1.02 * entropy_bits


def test_corrupt_tables_and_streams_raise_file_format_error():
    lengths = E.code_lengths(np.array([5, 3, 1, 1]))
    bits = E.encode(np.array([0, 1, 2, 3, 0]), lengths)
    with pytest.raises(FileFormatError, match="ends early"):
        E.decode(E.BitReader(bits[:-1]), 0, lengths, count=5)
    bad = lengths.copy()
    bad[1] = 1  # over-subscribed: Kraft sum > 1
    assert np.sum(2.0 ** -bad.astype(float)) > 1
    with pytest.raises(FileFormatError, match="prefix code"):
        E.decode(E.BitReader(bits), 0, bad, count=5)
    with pytest.raises(FileFormatError, match="longer than 15"):
        E.decode(E.BitReader(bits), 0, np.array([16, 1], np.uint8), count=1)
    # an incomplete code (one symbol of length 2 among two): a window that is not a code
    with pytest.raises(FileFormatError, match="prefix code"):
        E.decode(E.BitReader(np.ones(8, np.uint8)), 0, np.array([1, 2, 0]), count=1)
    single = np.array([0, 1, 0])  # one used symbol of length 1: code "0"; "1" is invalid
    with pytest.raises(FileFormatError, match="invalid code"):
        E.decode(E.BitReader(np.array([0, 1], np.uint8)), 0, single, count=2)
    with pytest.raises(FileFormatError, match="past its alphabet"):
        E.unpack_lengths(np.array([0x12, 0x34], np.uint8), 3)


@settings(max_examples=60, deadline=None)
@given(
    size=st.integers(1, 3000),
    density=st.floats(0.0, 1.0),
    index_bits=st.integers(1, 9),
    seed=st.integers(0, 2**31 - 1),
)
def test_relative_indices_round_trip(size, density, index_bits, seed):
    rng = np.random.default_rng(seed)
    pos = np.flatnonzero(rng.random(size) < density)
    symbols = E.relative_symbols(pos, index_bits)
    assert symbols.max(initial=0) <= 2**index_bits - 1
    counts, n = E.relative_count(pos, index_bits)
    assert n == symbols.size
    assert np.array_equal(counts, np.bincount(symbols, minlength=2**index_bits))
    assert np.array_equal(E.relative_positions(symbols, index_bits, size=size), pos)


@pytest.mark.parametrize("index_bits", [1, 2, 3, 8])
def test_gaps_longer_than_the_index_width_use_escapes(index_bits):
    m = 2**index_bits - 1
    pos = np.array([0, 1, 1 + m + 1, 1000, 1000 + 5 * m + 2])
    symbols = E.relative_symbols(pos, index_bits)
    gaps = np.diff(pos, prepend=-1) - 1
    assert int((symbols == m).sum()) == int((gaps // m).sum())  # one escape per M skipped
    assert np.array_equal(symbols[symbols != m], gaps % m)
    size = int(pos[-1]) + 1
    assert np.array_equal(E.relative_positions(symbols, index_bits, size=size), pos)
    # a gap of exactly M: one escape, then a 0
    assert E.relative_symbols(np.array([m]), index_bits).tolist() == [m, 0]
    with pytest.raises(FileFormatError, match="malformed"):
        E.relative_positions(np.concatenate([symbols, [m]]), index_bits, size=size)
    with pytest.raises(FileFormatError, match="past its leaf"):
        E.relative_positions(symbols, index_bits, size=int(pos[-1]))


def test_escape_aware_decoding_stops_after_count_kept_entries():
    pos = np.array([3, 40, 41])
    symbols = E.relative_symbols(pos, 2)
    counts = np.bincount(symbols, minlength=4)
    lengths = E.code_lengths(counts)
    bits = np.concatenate([E.encode(symbols, lengths), np.zeros(9, np.uint8)])
    out, end = E.decode(E.BitReader(bits), 0, lengths, count=3, stop=3)
    assert np.array_equal(out, symbols) and end == bits.size - 9


def test_relative_decoding_stops_as_soon_as_the_indices_pass_the_leaf():
    """A stream of escapes longer than the leaf: the decoder refuses it inside the first chunk
    (work bounded by the leaf), where without ``size`` it reads to the end of the stream."""
    lengths = np.array([1, 1], np.uint8)  # index_bits=1: symbol 1 is the escape
    bits = np.ones(4 * E.BitReader.CHUNK, np.uint8)
    rd = E.BitReader(bits)
    with pytest.raises(FileFormatError, match="relative index past its leaf of 5"):
        E.decode(rd, 0, lengths, count=1, stop=1, size=5)
    assert rd._chunk == 0
    with pytest.raises(FileFormatError, match="ends early"):
        E.decode(E.BitReader(bits), 0, lengths, count=1, stop=1)
    # a valid stream ending exactly at the leaf's last entry decodes
    out, end = E.decode(
        E.BitReader(np.array([1, 1, 0], np.uint8)), 0, lengths, count=1, stop=1, size=3
    )
    assert out.tolist() == [1, 1, 0] and end == 3
    assert E.relative_positions(out, 1, size=3).tolist() == [2]


def test_packed_reader_matches_the_bit_reader():
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, size=300, dtype=np.uint8)
    a, b = E.BitReader(np.unpackbits(data)), E.BitReader.packed(data)
    assert a.n == b.n == 2400
    for p in (0, 7, 8, 1000, 2399):
        assert a.at(p) == b.at(p)
    assert np.array_equal(b.bits(5, 2395), np.unpackbits(data)[5:2395])
    assert b.zero_from(2400) and not b.zero_from(2390)
    assert E.BitReader.packed(np.array([0xF0, 0], np.uint8)).zero_from(4)


@pytest.mark.parametrize("index_bits", [1, 3, 8])
def test_relative_mask_matches_the_positions(index_bits):
    rng = np.random.default_rng(index_bits)
    size = 3 * 2**16 + 17
    pos = np.flatnonzero(rng.random(size) < 0.3)
    syms = E.relative_symbols(pos, index_bits)
    mask = E.relative_mask(syms, index_bits, size=size, chunk=1000)
    assert np.array_equal(np.flatnonzero(mask), E.relative_positions(syms, index_bits, size=size))
    with pytest.raises(FileFormatError, match="past its leaf"):
        E.relative_mask(syms, index_bits, size=int(pos[-1]))
    with pytest.raises(FileFormatError, match="malformed"):
        E.relative_mask(np.append(syms, 2**index_bits - 1), index_bits, size=size)
