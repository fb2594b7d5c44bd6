"""inspect (no key), verify (every chunk, first bad one by index and offset), repair."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from format_testkit import TEST_KEY_ARN, FakeKeyProvider

from kmsfs.errors import CorruptChunk, CorruptHeader, KeydUnavailable, Truncated
from kmsfs.format.file import EncryptedFile
from kmsfs.format.header import read_header
from kmsfs.format.offsets import CHUNK_OVERHEAD, HEADER_SIZE, ciphertext_size
from kmsfs.format.tools import inspect, repair, verify

CHUNK = 64
STORED = CHUNK + CHUNK_OVERHEAD


def write_file(path: Path, provider: FakeKeyProvider, data: bytes) -> None:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with EncryptedFile.open(
            fd, key_provider=provider, key_id="alias/test", chunk_size=CHUNK,
            encryption_context={"kmsfs:fs-id": "fs-9"},
        ) as engine:  # fmt: skip
            engine.write(0, data)
    finally:
        os.close(fd)


DATA = bytes(range(256)) * 3  # 768 bytes: 12 chunks of 64


def test_inspect_needs_no_key(tmp_path: Path, provider: FakeKeyProvider) -> None:
    path = tmp_path / "i.kmsfs"
    write_file(path, provider, DATA[:700])
    calls = provider.decrypt_calls
    info = inspect(path)
    assert provider.decrypt_calls == calls
    fd = os.open(path, os.O_RDONLY)
    header = read_header(fd)
    os.close(fd)
    assert info.format_version == 2 and info.chunk_size == CHUNK
    assert info.file_id == header.file_id.hex() and len(info.file_id) == 32
    assert info.key_arn == TEST_KEY_ARN
    assert info.encryption_context == {"kmsfs:fs-id": "fs-9"}
    assert info.plaintext_size == 700
    assert info.ciphertext_size == ciphertext_size(700, CHUNK) == path.stat().st_size
    assert (info.key_slot, info.key_generation, info.inactive_slot) == (0, 1, "empty")
    assert info.wrapped_key == header.active_slot.wrapped_key
    (tmp_path / "empty").touch()
    empty = inspect(tmp_path / "empty")
    assert empty.empty and empty.plaintext_size == 0 and empty.file_id is None


def test_inspect_reports_an_impossible_size(tmp_path: Path, provider) -> None:
    path = tmp_path / "odd.kmsfs"
    write_file(path, provider, DATA)
    with open(path, "ab") as handle:
        handle.write(b"xyz")
    info = inspect(path)
    assert info.plaintext_size is None and "chunk 12" in (info.size_problem or "")


def test_verify_a_sound_file(tmp_path: Path, provider) -> None:
    path = tmp_path / "ok.kmsfs"
    write_file(path, provider, DATA)
    report = verify(path, key_provider=provider)
    assert report.ok and report.error is None
    assert report.chunks == 12 and report.bad_chunks == 0
    assert report.authentic_size == len(DATA)
    assert verify(
        tmp_path / "ok.kmsfs", key_provider=provider, encryption_context={"kmsfs:fs-id": "fs-9"}
    ).ok


@pytest.mark.parametrize("bad", [0, 5, 11])
def test_verify_reports_the_first_bad_chunk(tmp_path: Path, provider, bad: int) -> None:
    path = tmp_path / "bad.kmsfs"
    write_file(path, provider, DATA)
    raw = bytearray(path.read_bytes())
    raw[HEADER_SIZE + bad * STORED + 30] ^= 0x80
    if bad < 9:
        raw[HEADER_SIZE + 9 * STORED + 30] ^= 0x80  # a second bad chunk further on
    path.write_bytes(raw)
    report = verify(path, key_provider=provider)
    assert isinstance(report.error, CorruptChunk) and report.error.chunk_index == bad
    assert report.first_bad_chunk == bad
    assert report.first_bad_plaintext_offset == bad * CHUNK
    assert report.first_bad_cipher_offset == HEADER_SIZE + bad * STORED
    assert report.bad_chunks == (1 if bad >= 9 else 2)
    assert report.last_bad_chunk == (bad if bad >= 9 else 9)
    assert report.authentic_size == bad * CHUNK


def test_verify_reports_truncation_and_trailing_data(tmp_path: Path, provider) -> None:
    path = tmp_path / "t.kmsfs"
    write_file(path, provider, DATA)
    whole = path.read_bytes()
    path.write_bytes(whole[: HEADER_SIZE + 10 * STORED])
    report = verify(path, key_provider=provider)
    assert isinstance(report.error, Truncated)
    assert report.first_bad_chunk == 10 and report.authentic_size == 10 * CHUNK
    path.write_bytes(whole + whole[-STORED:])
    report = verify(path, key_provider=provider)
    assert isinstance(report.error, CorruptChunk) and report.first_bad_chunk == 12
    assert report.authentic_size == len(DATA)


def test_verify_reports_header_problems_and_raises_for_a_missing_key(
    tmp_path: Path, provider
) -> None:
    path = tmp_path / "h.kmsfs"
    write_file(path, provider, DATA)
    raw = bytearray(path.read_bytes())
    raw[40] ^= 1  # the key commitment
    path.write_bytes(raw)
    report = verify(path, key_provider=provider)
    assert isinstance(report.error, CorruptHeader) and report.first_bad_chunk is None
    assert report.info.file_id is not None

    class Down(FakeKeyProvider):
        def decrypt_data_key(self, wrapped_blob, encryption_context):
            raise KeydUnavailable("no keyd")

    write_file(path, provider, DATA)
    with pytest.raises(KeydUnavailable):
        verify(path, key_provider=Down())


def test_verify_walks_big_files_in_batches(tmp_path: Path, provider, monkeypatch) -> None:
    from kmsfs.format import tools as verify_module

    monkeypatch.setattr(verify_module, "_VERIFY_BATCH_BYTES", 3 * STORED)
    path = tmp_path / "b.kmsfs"
    write_file(path, provider, DATA * 3)
    assert verify(path, key_provider=provider).ok
    raw = bytearray(path.read_bytes())
    raw[HEADER_SIZE + 31 * STORED + 1] ^= 1
    path.write_bytes(raw)
    assert verify(path, key_provider=provider).first_bad_chunk == 31


@pytest.mark.parametrize(
    ("cut", "expected_size"),
    [
        (HEADER_SIZE + 10 * STORED, 10 * CHUNK),  # last chunks removed: re-seal chunk 9 final
        (HEADER_SIZE + 10 * STORED + 40, 10 * CHUNK),  # and a torn piece after them
        (HEADER_SIZE + 0 * STORED + 40, 0),  # nothing authentic: the file becomes empty
    ],
)
def test_repair_keeps_the_authentic_prefix(
    tmp_path: Path, provider, cut: int, expected_size: int
) -> None:
    path = tmp_path / "r.kmsfs"
    write_file(path, provider, DATA)
    path.write_bytes(path.read_bytes()[:cut])
    assert repair(path, key_provider=provider) == expected_size
    assert path.stat().st_size == ciphertext_size(expected_size, CHUNK)
    assert verify(path, key_provider=provider).ok
    if expected_size:
        fd = os.open(path, os.O_RDONLY)
        assert EncryptedFile.open(fd, key_provider=provider).read(0, 10_000) == DATA[:expected_size]
        os.close(fd)


def test_repair_leaves_a_sound_file_alone_and_refuses_a_bad_header(
    tmp_path: Path, provider
) -> None:
    path = tmp_path / "s.kmsfs"
    write_file(path, provider, DATA)
    before = path.read_bytes()
    assert repair(path, key_provider=provider) == len(DATA)
    assert path.read_bytes() == before
    raw = bytearray(before)
    raw[0] ^= 1
    path.write_bytes(raw)
    with pytest.raises(CorruptHeader):
        repair(path, key_provider=provider)


def _old_and_new(tmp_path: Path, provider, old_size: int, appended: int):
    """The backing bytes of one file before and after an append (same key), and both plaintexts."""
    path = tmp_path / "append.kmsfs"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        engine = EncryptedFile.open(
            fd, key_provider=provider, key_id="alias/test", chunk_size=CHUNK
        )
        engine.write(0, DATA[:old_size])
        engine.flush()
        old = path.read_bytes()
        engine.write(old_size, DATA[old_size : old_size + appended])
        engine.close()
        new = path.read_bytes()
    finally:
        os.close(fd)
    return path, old, new


@pytest.mark.parametrize("old_size", [4 * CHUNK, 4 * CHUNK + 20])
def test_repair_cuts_an_interrupted_append_back_to_the_old_file(
    tmp_path: Path, provider, old_size: int
) -> None:
    """The old final chunk is still final and the appended chunks follow it (after a gap of
    zeros when it was short): repair restores exactly the old file."""
    path, old, new = _old_and_new(tmp_path, provider, old_size, 5 * CHUNK)
    next_chunk = HEADER_SIZE + (old_size // CHUNK + (old_size % CHUNK > 0)) * STORED
    for end in (next_chunk + STORED, next_chunk + 2 * STORED + 9, len(new)):
        path.write_bytes(old.ljust(next_chunk, b"\0") + new[next_chunk:end])
        report = verify(path, key_provider=provider)
        assert isinstance(report.error, CorruptChunk)
        assert report.authentic_size == old_size
        assert repair(path, key_provider=provider) == old_size
        assert path.read_bytes()[: len(old)] == old and path.stat().st_size == len(old)
        assert verify(path, key_provider=provider).ok


def test_repair_seals_a_last_chunk_that_is_not_final(tmp_path: Path, provider) -> None:
    """An append whose new final chunk never arrived: the chunks before it are kept."""
    path, old, new = _old_and_new(tmp_path, provider, 4 * CHUNK + 20, 5 * CHUNK)
    path.write_bytes(new[: HEADER_SIZE + 7 * STORED])
    report = verify(path, key_provider=provider)
    assert isinstance(report.error, Truncated) and report.authentic_size == 7 * CHUNK
    assert repair(path, key_provider=provider) == 7 * CHUNK
    assert verify(path, key_provider=provider).ok
    fd = os.open(path, os.O_RDONLY)
    assert EncryptedFile.open(fd, key_provider=provider).read(0, 10_000) == DATA[: 7 * CHUNK]
    os.close(fd)
