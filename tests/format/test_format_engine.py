"""The random-access engine against a plain bytearray model, and its special cases."""

from __future__ import annotations

import os
import random
from collections.abc import Callable

import pytest
from format_testkit import TEST_KEY_ID, FakeKeyProvider, memfd, pattern
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kmsfs.errors import CorruptChunk, CorruptHeader, Truncated, UsageError
from kmsfs.format import file as file_module
from kmsfs.format.file import EncryptedFile
from kmsfs.format.offsets import (
    CHUNK_OVERHEAD,
    DEFAULT_CHUNK_SIZE,
    HEADER_SIZE,
    cipher_offset,
    ciphertext_size,
)
from kmsfs.format.tools import verify

KEY_ID = TEST_KEY_ID


def disk_size(fd: int) -> int:
    return os.fstat(fd).st_size


# ------------------------------------------------------------------ the model test
def offsets(chunk: int) -> st.SearchStrategy[int]:
    near_boundary = st.builds(
        lambda k, d: max(0, k * chunk + d), st.integers(0, 8), st.integers(-2, 2)
    )
    return st.one_of(near_boundary, st.integers(0, 8 * chunk + 3))


def lengths(chunk: int) -> st.SearchStrategy[int]:
    return st.one_of(
        st.integers(0, 3),
        st.builds(lambda k, d: max(0, k * chunk + d), st.integers(0, 3), st.integers(-2, 2)),
        st.integers(0, 3 * chunk + 2),
    )


def operations(chunk: int) -> st.SearchStrategy[list[tuple]]:
    return st.lists(
        st.one_of(
            st.tuples(st.just("write"), offsets(chunk), lengths(chunk), st.integers(0, 1 << 16)),
            st.tuples(st.just("read"), offsets(chunk), lengths(chunk)),
            st.tuples(st.just("truncate"), offsets(chunk)),
            st.tuples(st.just("flush")),
            st.tuples(st.just("reopen")),
        ),
        max_size=25,
    )


def run_against_model(chunk: int, ops: list[tuple], version: int = 2) -> None:
    provider = FakeKeyProvider()
    fd = memfd()
    try:
        model = bytearray()
        engine = EncryptedFile.open(
            fd, key_provider=provider, key_id=KEY_ID, chunk_size=chunk, format_version=version
        )
        for op in ops:
            kind = op[0]
            if kind == "write":
                _, offset, length, seed = op
                data = pattern(seed, length)
                assert engine.write(offset, data) == length
                if length:
                    if offset > len(model):
                        model.extend(bytes(offset - len(model)))
                    model[offset : offset + length] = data
            elif kind == "read":
                _, offset, length = op
                assert engine.read(offset, length) == bytes(model[offset : offset + length])
                buffer = bytearray(length)
                count = engine.readinto(offset, buffer)
                assert buffer[:count] == model[offset : offset + length]
            elif kind == "truncate":
                engine.truncate(op[1])
                if op[1] < len(model):
                    del model[op[1] :]
                else:
                    model.extend(bytes(op[1] - len(model)))
                assert disk_size(fd) == ciphertext_size(len(model), chunk)
            elif kind == "flush":
                engine.flush()
                assert disk_size(fd) == ciphertext_size(len(model), chunk)
            else:
                engine.close()
                engine = EncryptedFile.open(
                    fd, key_provider=provider, key_id=KEY_ID, chunk_size=chunk
                )
            assert engine.size == len(model)
        engine.close()
        assert disk_size(fd) == ciphertext_size(len(model), chunk)
        reopened = EncryptedFile.open(fd, key_provider=provider, writable=False)
        assert reopened.size == len(model)
        assert reopened.read(0, len(model) + 1) == bytes(model)
        report = verify(fd, key_provider=provider)
        assert report.ok, report.error
    finally:
        os.close(fd)


@settings(max_examples=600, deadline=None)
@given(operations(16))
def test_engine_matches_bytearray_model_chunk_16(ops: list[tuple]) -> None:
    run_against_model(16, ops)


@settings(max_examples=200, deadline=None)
@given(operations(16))
def test_a_version_1_engine_matches_bytearray_model_chunk_16(ops: list[tuple]) -> None:
    run_against_model(16, ops, version=1)


@settings(max_examples=300, deadline=None)
@given(operations(64))
def test_engine_matches_bytearray_model_chunk_64(ops: list[tuple]) -> None:
    run_against_model(64, ops)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(operations(DEFAULT_CHUNK_SIZE))
def test_engine_matches_bytearray_model_default_chunk(ops: list[tuple]) -> None:
    run_against_model(DEFAULT_CHUNK_SIZE, ops)


def test_big_requests_go_in_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(file_module, "BATCH_BYTES", 3 * (64 + CHUNK_OVERHEAD))
    ops = [("write", 5, 1000, 1), ("read", 0, 1200), ("write", 130, 600, 2), ("reopen",)]
    ops += [("read", 3, 1100), ("truncate", 700), ("write", 2000, 300, 3), ("read", 0, 2400)]
    run_against_model(64, ops)


def test_offsets_beyond_4_gib(provider: FakeKeyProvider) -> None:
    chunk = 1 << 20  # few hole markers up to 5 GiB
    four = 4 << 30
    fd = memfd()
    try:
        engine = EncryptedFile.open(fd, key_provider=provider, key_id=KEY_ID, chunk_size=chunk)
        engine.write(four - 1, b"abc")  # across the 4 GiB line, inside one chunk
        engine.write(5 * (1 << 30) + chunk - 1, b"de")  # across a chunk boundary past 5 GiB
        engine.close()
        size = 5 * (1 << 30) + chunk + 1
        assert disk_size(fd) == ciphertext_size(size, chunk)
        reopened = EncryptedFile.open(fd, key_provider=provider)
        assert reopened.size == size
        assert reopened.read(four - 2, 5) == b"\0abc\0"
        assert reopened.read(size - 3, 10) == b"\0de"
        reopened.truncate(four + 1)
        assert reopened.read(four - 1, 10) == b"abc"[:2]
        reopened.close()
        assert disk_size(fd) == ciphertext_size(four + 1, chunk)
        assert verify(fd, key_provider=provider).ok
    finally:
        os.close(fd)


# --------------------------------------------------------------- lazy header, tail
def test_touch_costs_no_key_request_and_no_bytes(provider: FakeKeyProvider) -> None:
    fd = memfd()
    engine = EncryptedFile.open(fd, key_provider=provider, key_id=KEY_ID)
    engine.write(0, b"")
    engine.close()
    assert provider.generate_calls == 0
    assert disk_size(fd) == 0
    again = EncryptedFile.open(fd, key_provider=provider)
    assert again.size == 0 and again.read(0, 10) == b""
    assert provider.decrypt_calls == 0
    os.close(fd)


def test_header_is_written_with_the_first_byte(provider: FakeKeyProvider) -> None:
    fd = memfd()
    engine = EncryptedFile.open(fd, key_provider=provider, key_id=KEY_ID, chunk_size=64)
    engine.write(0, b"x")
    assert provider.generate_calls == 1
    assert disk_size(fd) == 0 and engine.dirty  # held until flush
    engine.flush()
    assert disk_size(fd) == HEADER_SIZE + 1 + CHUNK_OVERHEAD
    assert not engine.dirty
    os.close(fd)


def test_sequential_appends_seal_each_chunk_once(provider: FakeKeyProvider) -> None:
    fd = memfd()
    engine = EncryptedFile.open(fd, key_provider=provider, key_id=KEY_ID, chunk_size=64)
    rng = random.Random(5)
    written = 0
    while written < 10 * 64:
        piece = rng.randrange(1, 9)
        engine.write(written, bytes(piece))
        written += piece
    engine.close()
    assert engine.seal_count == -(-written // 64)
    os.close(fd)


def test_growth_reseals_the_old_tail_once(provider: FakeKeyProvider) -> None:
    fd = memfd()
    with EncryptedFile.open(fd, key_provider=provider, key_id=KEY_ID, chunk_size=64) as engine:
        engine.write(0, b"a" * 10)
        engine.flush()  # chunk 0 sealed final (1 seal)
        engine.write(10, b"b" * 200)  # chunk 0 re-sealed non-final, 1 and 2 sealed, 3 held
    assert engine.seal_count == 1 + 3 + 1
    reopened = EncryptedFile.open(fd, key_provider=provider)
    assert reopened.read(0, 300) == b"a" * 10 + b"b" * 200
    os.close(fd)


def _backing(fd: int) -> bytes:
    return os.pread(fd, disk_size(fd), 0)


def test_writes_inside_one_interior_chunk_are_held_and_sealed_once(provider) -> None:
    fd = memfd()
    engine = EncryptedFile.open(fd, key_provider=provider, key_id=KEY_ID, chunk_size=64)
    model = bytearray(pattern(1, 5 * 64))
    engine.write(0, model)
    engine.flush()
    seals, before = engine.seal_count, _backing(fd)
    for step in range(10):  # small writes all over chunk 1: memory only
        offset = 64 + (step * 7) % 60
        engine.write(offset, bytes([step]) * 3)
        model[offset : offset + 3] = bytes([step]) * 3
        assert engine.read(0, 400) == bytes(model)
    assert engine.dirty and engine.seal_count == seals and _backing(fd) == before
    engine.write(3 * 64 + 5, b"XY")  # another chunk: chunk 1 is written, chunk 3 held
    model[3 * 64 + 5 : 3 * 64 + 7] = b"XY"
    assert engine.seal_count == seals + 1
    after = _backing(fd)
    chunk_1 = slice(cipher_offset(1, 64), cipher_offset(2, 64))
    assert after[chunk_1] != before[chunk_1]
    assert after[: chunk_1.start] == before[: chunk_1.start]
    assert after[chunk_1.stop :] == before[chunk_1.stop :]
    engine.write(3 * 64, b"z" * 64)  # the whole held chunk, rewritten
    model[3 * 64 : 4 * 64] = b"z" * 64
    engine.close()
    assert engine.seal_count == seals + 2 and not engine.dirty
    reopened = EncryptedFile.open(fd, key_provider=provider)
    assert reopened.read(0, 400) == bytes(model)
    assert verify(fd, key_provider=provider).ok
    os.close(fd)


@pytest.mark.parametrize("then", ["truncate_inside", "truncate_grow", "span", "reopen"])
def test_the_held_chunk_is_written_before_anything_that_reads_the_disk(provider, then) -> None:
    fd = memfd()
    engine = EncryptedFile.open(fd, key_provider=provider, key_id=KEY_ID, chunk_size=64)
    model = bytearray(pattern(2, 4 * 64 + 10))
    engine.write(0, model)
    engine.write(70, b"held")
    model[70:74] = b"held"
    if then == "truncate_inside":  # the held chunk becomes the tail
        engine.truncate(72)
        del model[72:]
    elif then == "truncate_grow":
        engine.truncate(9 * 64)
        model.extend(bytes(9 * 64 - len(model)))
    elif then == "span":  # a write across chunks 0-2 merges with the held chunk 1
        engine.write(60, b"s" * 8)
        engine.write(120, b"t" * 20)
        model[60:68] = b"s" * 8
        model[120:140] = b"t" * 20
    engine.close()
    reopened = EncryptedFile.open(fd, key_provider=provider)
    assert reopened.read(0, 1000) == bytes(model)
    assert verify(fd, key_provider=provider).ok
    os.close(fd)


def test_a_failed_write_back_drops_what_was_not_stored(provider, monkeypatch) -> None:
    """After a failed write the engine is what the backing file holds: the held chunk
    that could not be written is dropped (the caller was told), nothing is half-applied."""
    fd = memfd()
    engine = EncryptedFile.open(fd, key_provider=provider, key_id=KEY_ID, chunk_size=64)
    model = bytearray(pattern(3, 4 * 64))
    engine.write(0, model)
    engine.flush()
    engine.write(70, b"first")
    real_pwritev = os.pwritev

    def full_disk(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(file_module.os, "pwritev", full_disk)
    with pytest.raises(OSError):
        engine.write(140, b"second")  # chunk 1 must be written first: the disk is full
    assert not engine.dirty
    assert engine.read(0, 300) == bytes(model)  # what is stored, nothing half-applied
    monkeypatch.setattr(file_module.os, "pwritev", real_pwritev)
    engine.write(140, b"second")
    model[140:146] = b"second"
    engine.close()
    assert EncryptedFile.open(fd, key_provider=provider).read(0, 300) == bytes(model)
    os.close(fd)


def test_truncate_to_zero_removes_the_header_and_keeps_the_key(provider: FakeKeyProvider) -> None:
    fd = memfd()
    engine = EncryptedFile.open(fd, key_provider=provider, key_id=KEY_ID, chunk_size=64)
    engine.write(0, b"hello" * 50)
    engine.flush()
    header = engine.header
    engine.truncate(0)
    assert disk_size(fd) == 0
    engine.write(3, b"again")
    engine.close()
    assert provider.generate_calls == 1
    reopened = EncryptedFile.open(fd, key_provider=provider)
    assert reopened.header is not None and header is not None
    assert reopened.header.file_id == header.file_id
    assert reopened.read(0, 100) == b"\0\0\0again"
    os.close(fd)


def test_writing_an_empty_file_needs_a_key_id(provider: FakeKeyProvider) -> None:
    fd = memfd()
    engine = EncryptedFile.open(fd, key_provider=provider)
    with pytest.raises(UsageError):
        engine.write(0, b"x")
    with pytest.raises(UsageError):
        engine.truncate(10)
    os.close(fd)


def test_read_only_engine_refuses_writes(make_file: Callable, provider: FakeKeyProvider) -> None:
    fd, _ = make_file("ro", b"data")
    engine = EncryptedFile.open(fd, key_provider=provider, writable=False)
    import io

    with pytest.raises(io.UnsupportedOperation):
        engine.write(0, b"x")
    with pytest.raises(io.UnsupportedOperation):
        engine.truncate(1)


def test_expected_context_must_be_in_the_header(
    open_fd: Callable, provider: FakeKeyProvider
) -> None:
    fd = open_fd("ctx")
    with EncryptedFile.open(
        fd, key_provider=provider, key_id=KEY_ID, encryption_context={"kmsfs:fs-id": "A"}
    ) as engine:
        engine.write(0, b"payload")
    assert EncryptedFile.open(fd, key_provider=provider, encryption_context={"kmsfs:fs-id": "A"})
    with pytest.raises(CorruptHeader):
        EncryptedFile.open(fd, key_provider=provider, encryption_context={"kmsfs:fs-id": "B"})
    with pytest.raises(ValueError):
        EncryptedFile.open(fd, key_provider=provider, encryption_context={"kmsfs:file-id": "x"})


def test_a_missing_key_is_not_corrupt_data(open_fd: Callable, provider: FakeKeyProvider) -> None:
    from kmsfs.errors import NotFoundException

    fd = open_fd("missing")
    engine = EncryptedFile.open(fd, key_provider=provider, key_id="alias/missing")
    with pytest.raises(NotFoundException):
        engine.write(0, b"x")


def test_header_only_file_is_truncated(open_fd: Callable, make_file: Callable, provider) -> None:
    fd, _ = make_file("h", b"x" * 10)
    os.ftruncate(fd, HEADER_SIZE)
    with pytest.raises(Truncated):
        EncryptedFile.open(fd, key_provider=provider)


def test_a_file_cut_under_an_open_engine_reports_truncation(make_file: Callable, provider) -> None:
    fd, _ = make_file("cut", b"x" * 200)
    engine = EncryptedFile.open(fd, key_provider=provider, writable=False)
    os.ftruncate(fd, cipher_offset(2, 64))
    with pytest.raises(Truncated):
        engine.read(0, 200)


# -------------------------------------------------------------------------- holes
@pytest.mark.parametrize("version", [1, 2])
def test_truncate_10_gib_on_an_empty_file(provider: FakeKeyProvider, version: int) -> None:
    """Cost, format 1: one 16-byte marker per 64 KiB chunk; the zero bodies stay sparse.
    Format 2: one 24-byte marker for the whole run.

    On a memfd (tmpfs) rather than ext4: the same 642 MiB (format 1) get allocated, but
    closing it is instant, where deleting the ext4 file (163,840 extents, mounted with
    discard) takes seconds.
    """
    fd = memfd()
    try:
        size = 10 << 30
        engine = EncryptedFile.open(
            fd, key_provider=provider, key_id=KEY_ID, format_version=version
        )
        engine.truncate(size)
        assert engine.size == size
        stat = os.fstat(fd)
        assert stat.st_size == ciphertext_size(size, DEFAULT_CHUNK_SIZE)
        chunks = size // DEFAULT_CHUNK_SIZE
        assert engine.seal_count == 0  # nothing sealed: markers only
        if version == 1:
            # about one 4 KiB page per chunk boundary (two when a marker straddles pages)
            assert stat.st_blocks * 512 <= chunks * 4096 * 1.02 + (1 << 20)
        else:  # the header's page and the marker's page(s)
            assert stat.st_blocks * 512 <= 3 * 4096
        for offset in (0, 12345, size // 2 - 7, size - DEFAULT_CHUNK_SIZE - 1, size - 1):
            assert engine.read(offset, 10) == bytes(min(10, size - offset))
        engine.write(size // 2, b"middle")
        engine.write(size - 3, b"end")
        engine.close()
        reopened = EncryptedFile.open(fd, key_provider=provider, writable=False)
        assert reopened.read(size // 2 - 2, 10) == b"\0\0middle\0\0"
        assert reopened.read(size - 5, 10) == b"\0\0end"
        # a marker is authenticated: zero it and the hole no longer reads as zeros
        marker_chunk = 7 if version == 1 else size // 2 // DEFAULT_CHUNK_SIZE - 1
        marker_at = cipher_offset(marker_chunk, DEFAULT_CHUNK_SIZE) + 12 + DEFAULT_CHUNK_SIZE
        os.pwrite(fd, bytes(16), marker_at)
        with pytest.raises(CorruptChunk) as caught:
            reopened.read(7 * DEFAULT_CHUNK_SIZE, 1)
        assert caught.value.chunk_index == 7
    finally:
        os.close(fd)


def test_a_zeroed_data_chunk_is_not_a_hole(make_file: Callable, provider) -> None:
    fd, plain = make_file("z", pattern(1, 64 * 4))
    os.pwrite(fd, bytes(64 + CHUNK_OVERHEAD), cipher_offset(1, 64))
    engine = EncryptedFile.open(fd, key_provider=provider)
    assert engine.read(0, 64) == plain[:64]
    with pytest.raises(CorruptChunk) as caught:
        engine.read(64, 1)
    assert caught.value.chunk_index == 1


def test_hole_markers_cannot_move(open_fd: Callable, provider) -> None:
    fd = open_fd("holes")
    with EncryptedFile.open(
        fd, key_provider=provider, key_id=KEY_ID, chunk_size=64, format_version=1
    ) as engine:
        engine.write(0, b"start")
        engine.write(64 * 5, b"end")  # chunks 1..4 are holes, each with its own marker
    stored = 64 + CHUNK_OVERHEAD
    hole_2 = os.pread(fd, stored, cipher_offset(2, 64))
    assert hole_2[:-16] == bytes(stored - 16)  # sparse body, marker only
    os.pwrite(fd, hole_2, cipher_offset(3, 64))  # replay chunk 2's marker as chunk 3
    engine = EncryptedFile.open(fd, key_provider=provider)
    assert engine.read(64 * 2, 64) == bytes(64)
    with pytest.raises(CorruptChunk) as caught:
        engine.read(64 * 3, 64)
    assert caught.value.chunk_index == 3


def test_failed_readinto_leaves_no_plaintext_in_the_buffer(make_file: Callable, provider) -> None:
    secret = b"TOPSECRET" * 30
    fd, _ = make_file("wipe", secret)
    tag_at = cipher_offset(1, 64) + 64 + 12 + 15
    last = os.pread(fd, 1, tag_at)
    os.pwrite(fd, bytes([last[0] ^ 1]), tag_at)  # chunk 1's tag
    engine = EncryptedFile.open(fd, key_provider=provider)
    buffer = bytearray(b"\xaa" * 200)
    with pytest.raises(CorruptChunk):
        engine.readinto(0, buffer)
    assert b"SECRET" not in buffer


# ------------------------------------------------------------- crash during append
def test_a_crash_during_an_append_damages_nothing_before_the_old_tail(tmp_path, provider) -> None:
    """Mixes of old and new bytes an interrupted append can leave: no damage before the
    old tail chunk, verify points at it, and repair gives an authentic prefix."""
    from kmsfs.format.tools import repair

    chunk = 64
    old_plain = pattern(7, 2 * chunk + 20)
    new_plain = old_plain + pattern(8, 3 * chunk + 5)
    fd = os.open(tmp_path / "a", os.O_RDWR | os.O_CREAT, 0o600)
    with EncryptedFile.open(fd, key_provider=provider, key_id=KEY_ID, chunk_size=chunk) as engine:
        engine.write(0, old_plain)
        engine.flush()
        old = os.pread(fd, 1 << 20, 0)
        engine.write(len(old_plain), new_plain[len(old_plain) :])
    new = os.pread(fd, 1 << 20, 0)
    os.close(fd)
    old_tail = (len(old_plain) - 1) // chunk
    states = []
    for cut in range(len(old) - 30, len(new) + 1, 5):
        states.append(new[:cut])  # the new bytes reached disk up to some point
        states.append(old + new[len(old) : cut])  # the old tail was not rewritten yet
    for torn in range(cipher_offset(old_tail, chunk), len(old), 9):
        states.append(new[:torn] + old[torn:])  # the old tail itself torn
    path = tmp_path / "state"
    for state in states:
        path.write_bytes(state)
        report = verify(path, key_provider=provider)
        if report.ok:
            content = EncryptedFile.open(
                os.open(path, os.O_RDONLY), key_provider=provider, writable=False
            )
            assert content.read(0, 1 << 20) in (old_plain, new_plain)
            continue
        assert report.first_bad_chunk is not None and report.first_bad_chunk >= old_tail
        assert report.authentic_size >= old_tail * chunk
        size = repair(path, key_provider=provider)
        assert size == report.authentic_size
        fd = os.open(path, os.O_RDONLY)
        try:
            repaired = EncryptedFile.open(fd, key_provider=provider, writable=False)
            assert repaired.read(0, 1 << 20) == new_plain[:size]
            assert verify(fd, key_provider=provider).ok
        finally:
            os.close(fd)


def test_every_change_to_the_backing_file_raises_disk_generation(
    open_fd: Callable[[str], int], provider: FakeKeyProvider
) -> None:
    """What the mount's read-ahead relies on to never use ciphertext read before a change."""
    fd = open_fd("gen.kmsfs")
    engine = EncryptedFile.open(fd, key_provider=provider, key_id="alias/test", chunk_size=64)

    def step(action: Callable[[], object]) -> tuple[bool, bool]:
        """(did the backing file change, did disk_generation rise)."""
        generation, disk = engine.disk_generation, os.pread(fd, 1 << 16, 0)
        action()
        return os.pread(fd, 1 << 16, 0) != disk, engine.disk_generation > generation

    assert step(lambda: engine.write(0, os.urandom(1000))) == (True, True)  # all but the tail
    assert step(engine.flush) == (True, True)  # the tail and the header: pwrite
    assert step(lambda: engine.write(100, b"x" * 10)) == (False, False)  # held in memory
    assert step(lambda: engine.write(700, b"y" * 10)) == (True, True)  # held one written back
    assert step(lambda: engine.truncate(5000)) == (True, True)  # growth: hole markers
    assert step(lambda: engine.truncate(300)) == (True, True)  # shrink: ftruncate in flush
    assert step(lambda: engine.truncate(0)) == (True, True)  # to nothing
    seen = engine.disk_generation
    engine.write(0, b"z" * 200)
    engine.flush()
    assert engine.disk_generation > seen
    seen = engine.disk_generation
    assert engine.read(0, 200) == b"z" * 200  # reading changes nothing
    assert engine.disk_generation == seen
    engine.close()


def test_ciphertext_from_the_cipher_cache_is_used_and_authenticated(
    make_file: Callable[..., tuple[int, bytes]], provider: FakeKeyProvider
) -> None:
    fd, plaintext = make_file("cached.kmsfs", os.urandom(640), chunk_size=64)
    engine = EncryptedFile.open(fd, key_provider=provider, chunk_size=64)
    disk = bytearray(os.pread(fd, 1 << 16, 0))
    asked: list[tuple[int, int, int]] = []

    class Cache:
        def __init__(self, data: bytes) -> None:
            self.data = data

        def lookup(self, offset: int, length: int, generation: int) -> bytes | None:
            asked.append((offset, length, generation))
            return self.data[offset : offset + length]

    engine.cipher_cache = Cache(bytes(disk))
    assert engine.read(0, 640) == plaintext
    assert asked and all(generation == engine.disk_generation for *_, generation in asked)
    tampered = bytearray(disk)
    tampered[HEADER_SIZE + 64 + CHUNK_OVERHEAD + 40] ^= 1  # chunk 1, only in the cache
    engine.cipher_cache = Cache(bytes(tampered))
    with pytest.raises(CorruptChunk):
        engine.read(64, 64)
    engine.cipher_cache = None
    assert engine.read(64, 64) == plaintext[64:128]  # the disk itself is fine
