"""Offset arithmetic at every edge: 0, 1, C−1, C, C+1 and beyond 4 GiB."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kmsfs.errors import CorruptChunk, CorruptHeader
from kmsfs.format.offsets import (
    CHUNK_OVERHEAD,
    DEFAULT_CHUNK_SIZE,
    HEADER_SIZE,
    check_chunk_size,
    chunk_count,
    chunk_length,
    chunk_span,
    cipher_offset,
    cipher_range,
    ciphertext_size,
    plaintext_size,
)

C = DEFAULT_CHUNK_SIZE
S = C + CHUNK_OVERHEAD
GIB = 1 << 30


@pytest.mark.parametrize(
    ("plain", "cipher"),
    [
        (0, 0),
        (1, HEADER_SIZE + 1 + CHUNK_OVERHEAD),
        (C - 1, HEADER_SIZE + C - 1 + CHUNK_OVERHEAD),
        (C, HEADER_SIZE + S),
        (C + 1, HEADER_SIZE + S + 1 + CHUNK_OVERHEAD),
        (2 * C, HEADER_SIZE + 2 * S),
        (4 * GIB, HEADER_SIZE + (4 * GIB // C) * S),
        (4 * GIB + 1, HEADER_SIZE + (4 * GIB // C) * S + 1 + CHUNK_OVERHEAD),
        (5 * GIB + C - 1, HEADER_SIZE + (5 * GIB // C) * S + C - 1 + CHUNK_OVERHEAD),
        (1 << 50, HEADER_SIZE + ((1 << 50) // C) * S),
    ],
)
def test_sizes_at_the_edges(plain: int, cipher: int) -> None:
    assert ciphertext_size(plain, C) == cipher
    assert plaintext_size(cipher, C) == plain


@given(st.integers(0, 1 << 45), st.sampled_from([16, 64, 4096, 65536, 1 << 20, 1 << 24]))
def test_sizes_round_trip(plain: int, chunk_size: int) -> None:
    cipher = ciphertext_size(plain, chunk_size)
    assert plaintext_size(cipher, chunk_size) == plain
    assert cipher == (
        0 if plain == 0 else HEADER_SIZE + plain + chunk_count(plain, chunk_size) * CHUNK_OVERHEAD
    )


def test_header_only_is_size_zero() -> None:
    assert plaintext_size(HEADER_SIZE, C) == 0


@pytest.mark.parametrize("cipher", [1, HEADER_SIZE - 1])
def test_shorter_than_a_header_is_corrupt(cipher: int) -> None:
    with pytest.raises(CorruptHeader):
        plaintext_size(cipher, C)


@pytest.mark.parametrize("rest", [1, CHUNK_OVERHEAD])
def test_a_chunk_without_room_for_a_byte_is_corrupt(rest: int) -> None:
    with pytest.raises(CorruptChunk) as caught:
        plaintext_size(HEADER_SIZE + 3 * S + rest, C)
    assert caught.value.chunk_index == 3
    assert plaintext_size(HEADER_SIZE + 3 * S + CHUNK_OVERHEAD + 1, C) == 3 * C + 1


def test_negative_sizes_are_errors() -> None:
    with pytest.raises(ValueError):
        ciphertext_size(-1, C)
    with pytest.raises(ValueError):
        plaintext_size(-1, C)


@pytest.mark.parametrize(
    ("size", "count"),
    [(0, 0), (1, 1), (C - 1, 1), (C, 1), (C + 1, 2), (4 * GIB + 1, 4 * GIB // C + 1)],
)
def test_chunk_count(size: int, count: int) -> None:
    assert chunk_count(size, C) == count


@pytest.mark.parametrize(
    ("index", "size", "length"),
    [
        (0, 0, 0),
        (0, 1, 1),
        (0, C - 1, C - 1),
        (0, C, C),
        (0, C + 1, C),
        (1, C + 1, 1),
        (2, C + 1, 0),
    ],
)
def test_chunk_length(index: int, size: int, length: int) -> None:
    assert chunk_length(index, size, C) == length


@pytest.mark.parametrize(
    ("offset", "length", "chunks"),
    [
        (0, 0, range(0, 0)),
        (0, 1, range(0, 1)),
        (C - 1, 1, range(0, 1)),
        (C - 1, 2, range(0, 2)),
        (C, 1, range(1, 2)),
        (C + 1, C, range(1, 3)),
        (0, C, range(0, 1)),
        (0, C + 1, range(0, 2)),
        (4 * GIB - 1, 2, range(4 * GIB // C - 1, 4 * GIB // C + 1)),
    ],
)
def test_chunk_span(offset: int, length: int, chunks: range) -> None:
    assert chunk_span(offset, length, C) == chunks


def test_cipher_offsets() -> None:
    assert cipher_offset(0, C) == HEADER_SIZE
    assert cipher_offset(1, C) == HEADER_SIZE + S
    assert cipher_offset(4 * GIB // C, C) == HEADER_SIZE + (4 * GIB // C) * S
    assert cipher_offset(4 * GIB // C, C) > 4 * GIB


@pytest.mark.parametrize(
    ("first", "end", "size", "expected"),
    [
        (0, 1, 1, (HEADER_SIZE, 1 + CHUNK_OVERHEAD)),
        (0, 1, C, (HEADER_SIZE, S)),
        (0, 2, C + 1, (HEADER_SIZE, S + 1 + CHUNK_OVERHEAD)),
        (1, 2, C + 1, (HEADER_SIZE + S, 1 + CHUNK_OVERHEAD)),
        (0, 5, C + 1, (HEADER_SIZE, S + 1 + CHUNK_OVERHEAD)),  # past the end: no bytes
        (3, 4, C + 1, (HEADER_SIZE + 3 * S, 0)),
        (65536, 65538, 5 * GIB, (HEADER_SIZE + 65536 * S, 2 * S)),
    ],
)
def test_cipher_range(first: int, end: int, size: int, expected: tuple[int, int]) -> None:
    assert cipher_range(first, end, size, C) == expected


@given(st.integers(0, 1 << 40), st.integers(0, 1 << 22), st.sampled_from([16, 4096, 65536]))
def test_span_and_range_agree(offset: int, length: int, chunk_size: int) -> None:
    size = offset + length
    span = chunk_span(offset, length, chunk_size)
    start, cipher_length = cipher_range(span.start, span.stop, size, chunk_size)
    if length:
        assert span.start * chunk_size <= offset < (span.start + 1) * chunk_size
        assert (span.stop - 1) * chunk_size < size <= span.stop * chunk_size
        assert start + cipher_length == ciphertext_size(size, chunk_size)
    else:
        assert cipher_length == 0


@pytest.mark.parametrize("bad", [0, 8, 15, 17, 100, 3 << 12, 1 << 25])
def test_chunk_size_must_be_a_power_of_two_in_range(bad: int) -> None:
    with pytest.raises(ValueError):
        check_chunk_size(bad)


@pytest.mark.parametrize("good", [16, 4096, 65536, 1 << 24])
def test_good_chunk_sizes(good: int) -> None:
    assert check_chunk_size(good) == good


def test_the_package_exports_its_api() -> None:
    import kmsfs.format as fmt

    for name in fmt.__all__:
        assert getattr(fmt, name) is not None
    assert fmt.DEFAULT_CHUNK_SIZE == 65536 and fmt.HEADER_SIZE == 2048
