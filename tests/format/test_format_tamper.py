"""Tampering: every change to a ciphertext file fails cleanly, with the right typed error.

Each case is checked three ways: the random-access engine, decrypt_stream and verify.
"""

from __future__ import annotations

import io
import os
import random
from pathlib import Path

import pytest
from format_testkit import FakeKeyProvider

from kmsfs.errors import CorruptChunk, CorruptHeader, FormatError, Truncated, UnsupportedFormat
from kmsfs.format import chunks
from kmsfs.format.file import EncryptedFile
from kmsfs.format.header import CONTEXT_OFFSET, SLOT_OFFSETS, SLOT_SIZE, SUPPORTED_VERSIONS
from kmsfs.format.offsets import CHUNK_OVERHEAD, HEADER_SIZE, cipher_offset
from kmsfs.format.stream import decrypt_stream
from kmsfs.format.tools import verify

CHUNK = 64
STORED = CHUNK + CHUNK_OVERHEAD
CONTEXT = {"kmsfs:fs-id": "fs-0001"}
MARKER = b"PLANTED-MARKER-7f3a"


def plaintext(seed: int, size: int = 3 * CHUNK + 20) -> bytes:
    rng = random.Random(seed)
    data = bytearray(rng.randbytes(size))
    for at in range(0, size - len(MARKER), 50):
        data[at : at + len(MARKER)] = MARKER
    return bytes(data)


def encrypt(provider: FakeKeyProvider, data: bytes, chunk: int = CHUNK) -> bytes:
    fd = os.memfd_create("t")
    try:
        with EncryptedFile.open(
            fd,
            key_provider=provider,
            key_id="alias/test",
            encryption_context=CONTEXT,
            chunk_size=chunk,
        ) as engine:
            engine.write(0, data)
        return os.pread(fd, 1 << 24, 0)
    finally:
        os.close(fd)


def read_all(provider: FakeKeyProvider, ciphertext: bytes) -> bytes:
    fd = os.memfd_create("t")
    try:
        os.pwrite(fd, ciphertext, 0)
        engine = EncryptedFile.open(fd, key_provider=provider, writable=False)
        return engine.read(0, engine.size + 1)
    finally:
        os.close(fd)


def check_all_ways(
    provider: FakeKeyProvider,
    tmp_path: Path,
    ciphertext: bytes,
    error: type[FormatError],
    chunk_index: int | None = None,
    engine_chunk_index: int | None = None,
) -> None:
    """The engine, the stream decryptor and verify all report ``error`` (at ``chunk_index``).

    ``engine_chunk_index``: where the engine differs — it refuses at open a file whose size
    is impossible (it cannot tell its plaintext size), naming the impossible last piece.
    """
    with pytest.raises(error) as caught:
        read_all(provider, ciphertext)
    if chunk_index is not None:
        assert isinstance(caught.value, CorruptChunk)
        assert caught.value.chunk_index == (engine_chunk_index or chunk_index)
    with pytest.raises(error) as caught:
        decrypt_stream(io.BytesIO(ciphertext), io.BytesIO(), key_provider=provider)
    if chunk_index is not None:
        assert caught.value.chunk_index == chunk_index  # type: ignore[attr-defined]
    path = tmp_path / "tampered"
    path.write_bytes(ciphertext)
    report = verify(path, key_provider=provider)
    assert isinstance(report.error, error)
    if chunk_index is not None:
        assert report.first_bad_chunk == chunk_index
        assert report.first_bad_plaintext_offset == chunk_index * CHUNK
        assert report.first_bad_cipher_offset == HEADER_SIZE + chunk_index * STORED


@pytest.fixture
def original(provider: FakeKeyProvider) -> tuple[bytes, bytes]:
    data = plaintext(1)
    return data, encrypt(provider, data)


def flip(data: bytes, position: int, bit: int = 0) -> bytes:
    changed = bytearray(data)
    changed[position] ^= 1 << bit
    return bytes(changed)


# ----------------------------------------------------------------------- header
def _version(ciphertext: bytes) -> int:
    return int.from_bytes(ciphertext[8:10], "big")


def header_field(position: int) -> str:
    context_end = CONTEXT_OFFSET + len(b"\x00\x01\x00\x0bkmsfs:fs-id\x00\x07fs-0001")
    fields = [
        (0, "magic"), (8, "version"), (10, "context length"), (12, "chunk size"),
        (16, "file id"), (32, "key commitment"), (CONTEXT_OFFSET, "context"),
        (context_end, "context padding"), (SLOT_OFFSETS[0], "slot 0 (active)"),
        (SLOT_OFFSETS[1], "slot 1 (empty)"),
    ]  # fmt: skip
    return [name for start, name in fields if position >= start][-1]


def test_a_bit_flip_anywhere_in_the_header_is_detected(
    provider: FakeKeyProvider, original: tuple[bytes, bytes], tmp_path: Path
) -> None:
    data, ciphertext = original
    seen: dict[str, int] = {}
    for position in range(HEADER_SIZE):
        field = header_field(position)
        seen[field] = seen.get(field, 0) + 1
        tampered = flip(ciphertext, position, position % 8)
        if field == "slot 1 (empty)":
            # an inactive slot is never used; damage there is what an interrupted rewrap
            # leaves, so the file opens — and verify reports it
            assert read_all(provider, tampered) == data
            continue
        expected = CorruptHeader
        if field == "version" and _version(tampered) not in SUPPORTED_VERSIONS:
            expected = UnsupportedFormat  # else (2 -> 3) the header's MAC fails
        with pytest.raises(expected):
            read_all(provider, tampered)
    assert len(seen) == 10
    tampered = flip(ciphertext, SLOT_OFFSETS[1] + 100)
    path = tmp_path / "slot1"
    path.write_bytes(tampered)
    report = verify(path, key_provider=provider)
    assert report.ok and any("slot 1 is damaged" in warning for warning in report.warnings)


def test_every_header_field_through_all_readers(
    provider: FakeKeyProvider, original: tuple[bytes, bytes], tmp_path: Path
) -> None:
    _, ciphertext = original
    slot = SLOT_OFFSETS[0]
    positions = [0, 9, 11, 13, 20, 40, CONTEXT_OFFSET + 3, 500]
    positions += [slot + 3, slot + 20, slot + 600, slot + SLOT_SIZE - 1]
    for position in positions:
        tampered = flip(ciphertext, position)
        expected = CorruptHeader
        if position == 9 and _version(tampered) not in SUPPORTED_VERSIONS:
            expected = UnsupportedFormat
        check_all_ways(provider, tmp_path, tampered, expected)


def test_unsupported_version_carries_the_version(original: tuple[bytes, bytes], provider) -> None:
    _, ciphertext = original
    changed = bytearray(ciphertext)
    changed[8:10] = (4).to_bytes(2, "big")
    with pytest.raises(UnsupportedFormat) as caught:
        read_all(provider, bytes(changed))
    assert caught.value.version == 4


# ----------------------------------------------------------------------- chunks
def test_a_bit_flip_in_any_nonce_ciphertext_or_tag_byte(
    provider: FakeKeyProvider, original: tuple[bytes, bytes], tmp_path: Path
) -> None:
    _, ciphertext = original
    for position in range(HEADER_SIZE, len(ciphertext)):
        chunk_index = (position - HEADER_SIZE) // STORED
        with pytest.raises(CorruptChunk) as caught:
            read_all(provider, flip(ciphertext, position, position % 8))
        assert caught.value.chunk_index == chunk_index
    for part, offset in (("nonce", 3), ("ciphertext", 12 + 30), ("tag", STORED - 1)):
        for chunk_index in range(4):
            position = cipher_offset(chunk_index, CHUNK) + offset
            if position >= len(ciphertext):
                position = len(ciphertext) - (1 if part == "tag" else 10)
            check_all_ways(
                provider, tmp_path, flip(ciphertext, position), CorruptChunk, chunk_index
            )


def test_small_reads_inside_one_chunk_catch_every_flip_and_leave_no_plaintext(
    provider: FakeKeyProvider, original: tuple[bytes, bytes]
) -> None:
    """The engine's shortcut for a read inside one full chunk (the mount's random reads)."""
    data, ciphertext = original
    for chunk_index in range(3):  # the full, non-final chunks
        for offset in (3, 12 + 30, STORED - 1):  # nonce, ciphertext, tag
            fd = os.memfd_create("t")
            try:
                os.pwrite(fd, flip(ciphertext, cipher_offset(chunk_index, CHUNK) + offset), 0)
                engine = EncryptedFile.open(fd, key_provider=provider, writable=False)
                for start, length in ((0, CHUNK), (5, 20), (CHUNK - 1, 1)):
                    buffer = bytearray(b"\xaa" * length)
                    with pytest.raises(CorruptChunk) as caught:
                        engine.readinto(chunk_index * CHUNK + start, buffer)
                    assert caught.value.chunk_index == chunk_index
                    assert buffer == bytes(length)  # wiped, not left with plaintext
                scratch = chunks._open_scratch.by_size.get(CHUNK)  # shared per thread
                assert scratch is None or bytes(scratch) == bytes(CHUNK)
                other = (chunk_index + 1) % 3  # the other chunks still read
                assert engine.read(other * CHUNK + 5, 20) == data[other * CHUNK + 5 :][:20]
            finally:
                os.close(fd)


def test_two_chunks_swapped(provider, original, tmp_path: Path) -> None:
    _, ciphertext = original
    a, b = cipher_offset(0, CHUNK), cipher_offset(1, CHUNK)
    swapped = (
        ciphertext[:a] + ciphertext[b : b + STORED] + ciphertext[a:b] + ciphertext[b + STORED :]
    )
    check_all_ways(provider, tmp_path, swapped, CorruptChunk, 0)
    a, b = cipher_offset(1, CHUNK), cipher_offset(2, CHUNK)
    swapped = (
        ciphertext[:a] + ciphertext[b : b + STORED] + ciphertext[a:b] + ciphertext[b + STORED :]
    )
    check_all_ways(provider, tmp_path, swapped, CorruptChunk, 1)


def test_a_chunk_copied_in_from_another_file(provider, original, tmp_path: Path) -> None:
    _, ciphertext = original
    other = encrypt(provider, plaintext(2))
    at = cipher_offset(1, CHUNK)
    mixed = ciphertext[:at] + other[at : at + STORED] + ciphertext[at + STORED :]
    check_all_ways(provider, tmp_path, mixed, CorruptChunk, 1)


def test_headers_swapped_between_two_files(provider, original, tmp_path: Path) -> None:
    _, ciphertext = original
    other = encrypt(provider, plaintext(2))
    check_all_ways(
        provider, tmp_path, other[:HEADER_SIZE] + ciphertext[HEADER_SIZE:], CorruptChunk, 0
    )
    check_all_ways(
        provider, tmp_path, ciphertext[:HEADER_SIZE] + other[HEADER_SIZE:], CorruptChunk, 0
    )


def test_a_header_paired_with_another_files_body(provider, original, tmp_path: Path) -> None:
    _, ciphertext = original
    other = encrypt(provider, plaintext(3, size=10 * CHUNK))
    check_all_ways(
        provider, tmp_path, ciphertext[:HEADER_SIZE] + other[HEADER_SIZE:], CorruptChunk, 0
    )


def test_the_last_chunk_removed_is_truncation(provider, original, tmp_path: Path) -> None:
    data, ciphertext = original
    cut = ciphertext[: cipher_offset(3, CHUNK)]
    check_all_ways(provider, tmp_path, cut, Truncated)
    # the chunks still there remain readable one by one
    fd = os.memfd_create("t")
    os.pwrite(fd, cut, 0)
    engine = EncryptedFile.open(fd, key_provider=provider, writable=False)
    assert engine.read(0, 2 * CHUNK) == data[: 2 * CHUNK]
    os.close(fd)
    # a file ending exactly on a full final chunk, with that chunk removed
    full = encrypt(provider, plaintext(4, size=4 * CHUNK))
    check_all_ways(provider, tmp_path, full[: cipher_offset(3, CHUNK)], Truncated)
    check_all_ways(provider, tmp_path, full[: cipher_offset(1, CHUNK)], Truncated)
    check_all_ways(provider, tmp_path, full[:HEADER_SIZE], Truncated)


def test_the_last_chunk_cut_short(provider, original, tmp_path: Path) -> None:
    _, ciphertext = original
    check_all_ways(provider, tmp_path, ciphertext[:-1], CorruptChunk, 3)
    check_all_ways(provider, tmp_path, ciphertext[: cipher_offset(2, CHUNK) + 40], CorruptChunk, 2)


def test_garbage_appended(provider, original, tmp_path: Path) -> None:
    _, ciphertext = original
    check_all_ways(provider, tmp_path, ciphertext + b"\0" * 5, CorruptChunk, 3)
    full = encrypt(provider, plaintext(5, size=2 * CHUNK))
    check_all_ways(provider, tmp_path, full + os.urandom(STORED - 10), CorruptChunk, 2)
    check_all_ways(provider, tmp_path, full + os.urandom(STORED + 8), CorruptChunk, 2, 3)
    check_all_ways(provider, tmp_path, full + full[-STORED:], CorruptChunk, 2)
    check_all_ways(provider, tmp_path, full + bytes(STORED), CorruptChunk, 2)


def test_a_zeroed_chunk_is_not_accepted_as_a_hole(provider, original, tmp_path: Path) -> None:
    _, ciphertext = original
    at = cipher_offset(1, CHUNK)
    zeroed = ciphertext[:at] + bytes(STORED) + ciphertext[at + STORED :]
    check_all_ways(provider, tmp_path, zeroed, CorruptChunk, 1)


def test_ciphertext_never_contains_the_plaintext(provider: FakeKeyProvider, tmp_path: Path) -> None:
    import kmsfs.format as fmt

    data = plaintext(6, size=5000)
    assert data.count(MARKER) > 50
    outputs = [encrypt(provider, data, chunk) for chunk in (16, 64, 4096, 65536)]
    stream = io.BytesIO()
    fmt.encrypt_stream(io.BytesIO(data), stream, key_provider=provider, key_id="k")
    outputs.append(stream.getvalue())
    path = tmp_path / "io.kmsfs"
    with fmt.open_encrypted(path, "wb", key_provider=provider, key_id="k") as handle:
        handle.write(data)
    outputs.append(path.read_bytes())
    for output in outputs:
        for probe in (MARKER, MARKER[:8], data[100:116]):
            assert probe not in output
        assert read_all(provider, output) == data


def test_the_key_commitment_stops_a_header_opening_under_another_key(
    provider: FakeKeyProvider, original: tuple[bytes, bytes]
) -> None:
    """A slot rewrapped to a different data key (with a valid checksum) fails the commitment."""
    from kmsfs.format.header import Header, build_slot, full_context
    from kmsfs.format.keys import FileKeys

    _, ciphertext = original
    header = Header.parse(ciphertext[:HEADER_SIZE])
    other_key = bytes(32)
    forged_keys = FileKeys.derive(other_key, header.file_id)
    blob = provider.wrap(other_key, full_context(header.file_id, header.context))
    slot = build_slot(forged_keys.header_key, header.fixed, 5, blob, "arn:forged")
    forged = ciphertext[: SLOT_OFFSETS[0]] + slot + ciphertext[SLOT_OFFSETS[0] + SLOT_SIZE :]
    with pytest.raises(CorruptHeader, match="commit"):
        read_all(provider, forged)


def test_provider_errors_that_mean_a_missing_key_propagate(
    original: tuple[bytes, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    from kmsfs.errors import DisabledException

    _, ciphertext = original

    class DisabledProvider(FakeKeyProvider):
        def decrypt_data_key(
            self, wrapped_blob: bytes, encryption_context: dict[str, str]
        ) -> bytes:
            raise DisabledException("key disabled")

    with pytest.raises(DisabledException):
        read_all(DisabledProvider(), ciphertext)
