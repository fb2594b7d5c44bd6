"""Format 2 hole runs: layout at every edge, tampering, crash order, and a model test."""

from __future__ import annotations

import io
import os
import random

import pytest
from format_testkit import TEST_KEY_ID, FakeKeyProvider, memfd
from hypothesis import given, settings
from hypothesis import strategies as st

import kmsfs.format as fmt
from kmsfs.errors import CorruptChunk, FormatError
from kmsfs.format import stream as stream_module
from kmsfs.format.file import EncryptedFile
from kmsfs.format.offsets import CHUNK_OVERHEAD, HEADER_SIZE, cipher_offset, ciphertext_size
from kmsfs.format.tools import repair, verify

KEY_ID = TEST_KEY_ID
C = 16  # chunk size of most tests here
S = C + CHUNK_OVERHEAD


def layout(fd: int, chunk_size: int = C) -> list[str]:
    """One letter per stored chunk: D data, Z all zero, or M<first> for a run's marker chunk."""
    data = os.pread(fd, 1 << 24, 0)
    stored = chunk_size + CHUNK_OVERHEAD
    kinds = []
    for start in range(HEADER_SIZE, len(data), stored):
        piece = data[start : start + stored]
        if not any(piece):
            kinds.append("Z")
        elif not any(piece[:-24]):
            kinds.append(f"M{int.from_bytes(piece[-24:-16], 'big')}")
        else:
            kinds.append("D")
    return kinds


def apply(fd: int, provider: FakeKeyProvider, steps: list[tuple], version: int = 2) -> bytearray:
    """Run write/truncate steps through the engine (closed at the end) and a bytearray model."""
    model = bytearray()
    engine = EncryptedFile.open(
        fd, key_provider=provider, key_id=KEY_ID, chunk_size=C, format_version=version
    )
    for step in steps:
        if step[0] == "write":
            _, offset, data = step
            engine.write(offset, data)
            if offset > len(model):
                model.extend(bytes(offset - len(model)))
            model[offset : offset + len(data)] = data
        elif step[0] == "truncate":
            engine.truncate(step[1])
            del model[step[1] :]
            model.extend(bytes(step[1] - len(model)))
        else:
            engine.flush()
    engine.close()
    return model


def check_reads(fd: int, provider: FakeKeyProvider, model: bytes) -> None:
    engine = EncryptedFile.open(fd, key_provider=provider, writable=False)
    assert engine.size == len(model)
    assert engine.read(0, len(model) + 1) == model
    for offset in range(0, len(model), 7):  # small reads, each alone (run lookups)
        fresh = EncryptedFile.open(fd, key_provider=provider, writable=False)
        assert fresh.read(offset, 5) == model[offset : offset + 5]
    out = io.BytesIO()
    source = io.BytesIO(os.pread(fd, 1 << 24, 0))
    assert fmt.decrypt_stream(source, out, key_provider=provider) == len(model)
    assert out.getvalue() == model
    report = verify(fd, key_provider=provider)
    assert report.ok, report.error


# ------------------------------------------------------------------ layout at the edges
EDGES = {
    "a run of one chunk": (
        [("write", 0, b"a"), ("write", 2 * C, b"b")],
        ["D", "M1", "D"],
    ),
    "a run at the start": ([("write", 3 * C, b"x")], ["Z", "Z", "M0", "D"]),
    "a final run": (
        [("write", 0, b"a"), ("truncate", 100)],
        ["D", "Z", "Z", "Z", "Z", "Z", "M1"],
    ),
    "a file that is one final run": ([("truncate", 100)], ["Z"] * 6 + ["M0"]),
    "split at the run's first chunk": (
        [("truncate", 100), ("write", 0, b"A" * C)],
        ["D", "Z", "Z", "Z", "Z", "Z", "M1"],
    ),
    "split at the run's last (final) chunk": (
        [("truncate", 100), ("write", 6 * C, b"E")],
        ["Z", "Z", "Z", "Z", "Z", "M0", "D"],
    ),
    "split at the last chunk of an interior run": (
        [("write", 5 * C, b"end"), ("write", 4 * C + 3, b"x")],
        ["Z", "Z", "Z", "M0", "D", "D"],
    ),
    "split in the middle": (
        [("truncate", 100), ("write", 3 * C + 1, b"mid")],
        ["Z", "Z", "M0", "D", "Z", "Z", "M4"],
    ),
    "split at the second chunk": (
        [("truncate", 100), ("write", C, b"x")],
        ["M0", "D", "Z", "Z", "Z", "Z", "M2"],
    ),
    "data over a whole run and beyond": (
        [("write", 0, b"a"), ("write", 4 * C, b"b"), ("write", 5, b"Q" * (3 * C))],
        ["D", "D", "D", "D", "D"],
    ),
    "shrink into a run": ([("truncate", 200), ("truncate", 150)], ["Z"] * 8 + ["M0", "D"]),
    "shrink to the run's first chunk": ([("truncate", 200), ("truncate", 5)], ["D"]),
    "grow a file whose tail is a run": (
        [("truncate", 40), ("truncate", 100)],
        ["Z", "M0", "D", "Z", "Z", "Z", "M3"],
    ),
    "a write past a run tail": (
        [("truncate", 40), ("write", 6 * C, b"w")],
        ["Z", "M0", "D", "Z", "Z", "M3", "D"],
    ),
    "a write just past a run tail": (
        [("truncate", 40), ("write", 3 * C, b"w")],
        ["Z", "M0", "D", "D"],
    ),
}


@pytest.mark.parametrize("name", sorted(EDGES))
def test_run_layout_at_every_edge(name: str, provider: FakeKeyProvider) -> None:
    steps, expected = EDGES[name]
    fd = memfd()
    try:
        model = apply(fd, provider, steps)
        assert layout(fd) == expected
        assert os.fstat(fd).st_size == ciphertext_size(len(model), C)
        check_reads(fd, provider, bytes(model))
        # no stale marker is left: zeroing any data chunk is detected
        original = os.pread(fd, 1 << 24, 0)
        for index, kind in enumerate(expected):
            if kind != "D":
                continue
            start = cipher_offset(index, C)
            length = min(S, len(original) - start)
            os.pwrite(fd, bytes(length), start)
            engine = EncryptedFile.open(fd, key_provider=provider, writable=False)
            with pytest.raises(FormatError):
                engine.read(0, len(model))
            assert not verify(fd, key_provider=provider).ok
            os.pwrite(fd, original[start : start + length], start)
    finally:
        os.close(fd)


def test_growth_writes_one_marker_whatever_the_gap(provider: FakeKeyProvider) -> None:
    fd = memfd()
    try:
        engine = EncryptedFile.open(fd, key_provider=provider, key_id=KEY_ID)
        engine.write(0, b"start")
        engine.flush()
        writes: list[int] = []
        real = engine._pwrite
        engine._pwrite = lambda buffers, offset: (writes.append(offset), real(buffers, offset))
        engine.truncate(64 << 30)
        assert len(writes) == 2  # the new final run's marker, then the old tail re-sealed
        writes.clear()
        engine.write(200 << 30, b"x")
        engine.flush()
        # the old run's rest gets a marker (before and again when the old tail is
        # re-sealed), the gap's run its marker, the old tail, the new tail: a handful
        assert len(writes) <= 5
        engine.close()
        # the header, three markers, the new tail and the old tail re-sealed as 64 KiB of
        # sealed zeros (it was the final run's marker chunk)
        assert os.fstat(fd).st_blocks * 512 <= 256 << 10
        reopened = EncryptedFile.open(fd, key_provider=provider, writable=False)
        assert reopened.read((200 << 30) - 2, 5) == b"\0\0x"
        assert reopened.read(0, 7) == b"start\0\0"
        assert reopened.read(100 << 30, 3) == bytes(3)
    finally:
        os.close(fd)


def test_reads_inside_a_checked_run_skip_the_disk_until_it_changes(provider) -> None:
    fd = memfd()
    try:
        engine = EncryptedFile.open(fd, key_provider=provider, key_id=KEY_ID, chunk_size=C)
        engine.write(0, b"a")
        engine.truncate(1000 * C)
        assert engine.read(5 * C, 3 * C) == bytes(3 * C)  # one lookup proves the run
        reads: list[int] = []
        real = engine._pread
        engine._pread = lambda offset, length: (reads.append(offset), real(offset, length))[1]
        assert engine.read(300 * C + 1, 100 * C) == bytes(100 * C)
        assert engine.read(900 * C, 5) == bytes(5)
        assert reads == []
        engine.write(400 * C, b"new")  # the backing file changes: the proof is void
        assert engine.read(400 * C, 4) == b"new\0"
        assert engine.read(300 * C, 4) == bytes(4)
        assert reads != []
        engine.close()
        check_reads(fd, provider, b"a" + bytes(400 * C - 1) + b"new" + bytes(600 * C - 3))
    finally:
        os.close(fd)


def test_a_batch_that_starts_in_a_sparse_run_does_not_read_the_hole(provider, monkeypatch) -> None:
    from kmsfs.format import file as file_module

    fd = memfd()
    try:
        engine = EncryptedFile.open(fd, key_provider=provider, key_id=KEY_ID)
        engine.truncate(64 << 20)
        engine.write((64 << 20) - 5, b"end")
        engine.close()
        read_bytes: list[int] = []
        real = os.preadv

        def preadv(fd: int, buffers: list, offset: int) -> int:
            read_bytes.append(sum(len(buffer) for buffer in buffers))
            return real(fd, buffers, offset)

        monkeypatch.setattr(file_module.os, "preadv", preadv)
        engine = EncryptedFile.open(fd, key_provider=provider, writable=False)
        assert engine.read(5 << 20, 1 << 20) == bytes(1 << 20)
        assert sum(read_bytes) < 64 << 10  # the sparse body is not read (tmpfs and ext4)
        assert engine.read((64 << 20) - 6, 10) == b"\0end\0\0"
    finally:
        os.close(fd)


def test_the_largest_file_can_be_made(provider: FakeKeyProvider) -> None:
    from kmsfs.format.offsets import max_plaintext_size

    fd = memfd()
    try:
        engine = EncryptedFile.open(fd, key_provider=provider, key_id=KEY_ID)
        limit = max_plaintext_size(engine.chunk_size)
        engine.write(limit - 1, b"x")
        engine.close()
        reopened = EncryptedFile.open(fd, key_provider=provider, writable=False)
        assert reopened.size == limit
        assert reopened.read(limit - 3, 5) == b"\0\0x"
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------- tamper
def made(provider: FakeKeyProvider, steps: list[tuple]) -> tuple[int, bytearray]:
    fd = memfd()
    return fd, apply(fd, provider, steps)


def read_fails_at(fd: int, provider: FakeKeyProvider, offset: int, length: int = 1) -> int:
    engine = EncryptedFile.open(fd, key_provider=provider, writable=False)
    with pytest.raises(CorruptChunk) as caught:
        engine.read(offset, length)
    assert not verify(fd, key_provider=provider).ok
    return caught.value.chunk_index


@pytest.mark.parametrize("where", ["before a run", "after a run", "between two runs"])
def test_a_zeroed_data_chunk_next_to_a_run_is_detected(provider, where: str) -> None:
    steps = {
        "before a run": [("write", 0, b"A" * C), ("write", 5 * C, b"z")],  # D Z Z Z M1 D
        "after a run": [("write", 3 * C, b"B" * C), ("write", 5 * C, b"z")],  # Z Z M0 D D D
        "between two runs": [("truncate", 100), ("write", 3 * C, b"C" * C)],  # Z Z M0 D Z Z M4
    }[where]
    index = {"before a run": 0, "after a run": 3, "between two runs": 3}[where]
    fd, model = made(provider, steps)
    try:
        assert layout(fd)[index] == "D"
        os.pwrite(fd, bytes(S), cipher_offset(index, C))
        assert read_fails_at(fd, provider, index * C) == index
        for other in range(len(model) // C):  # the rest of the file still reads
            if other != index:
                engine = EncryptedFile.open(fd, key_provider=provider, writable=False)
                assert engine.read(other * C, C) == model[other * C : other * C + C]
    finally:
        os.close(fd)


def test_a_marker_moved_or_replayed_at_another_index_fails(provider) -> None:
    fd, model = made(provider, [("write", 0, b"a"), ("write", 9 * C, b"z")])  # D Z*7 M1 D
    try:
        assert layout(fd) == ["D"] + ["Z"] * 7 + ["M1", "D"]
        marker = os.pread(fd, S, cipher_offset(8, C))
        os.pwrite(fd, bytes(S), cipher_offset(8, C))  # moved one chunk earlier
        os.pwrite(fd, marker, cipher_offset(7, C))
        assert read_fails_at(fd, provider, 7 * C) == 7
        assert read_fails_at(fd, provider, 2 * C) == 2
        os.pwrite(fd, marker, cipher_offset(8, C))  # and replayed at both places
        assert read_fails_at(fd, provider, 7 * C) == 7
        # the run's start edited to cover the data chunk before it: the HMAC binds it
        os.pwrite(fd, bytes(S), cipher_offset(7, C))
        edited = bytearray(marker)
        edited[-24:-16] = (0).to_bytes(8, "big")
        os.pwrite(fd, bytes(edited), cipher_offset(8, C))
        assert read_fails_at(fd, provider, 8 * C) == 8
        os.pwrite(fd, marker, cipher_offset(8, C))  # put back: fine again
        check_reads(fd, provider, bytes(model))
    finally:
        os.close(fd)


def test_a_marker_from_another_file_or_a_final_one_in_the_middle_fails(provider) -> None:
    fd, _ = made(provider, [("write", 0, b"a"), ("write", 9 * C, b"z")])
    other, _ = made(provider, [("write", 0, b"a"), ("write", 9 * C, b"z")])
    final_fd, _ = made(provider, [("write", 0, b"a"), ("truncate", 9 * C)])  # D Z*7 M1(final)
    try:
        os.pwrite(fd, os.pread(other, S, cipher_offset(8, C)), cipher_offset(8, C))
        assert read_fails_at(fd, provider, 3 * C) == 3
        assert layout(final_fd)[-1] == "M1"
        os.pwrite(fd, os.pread(final_fd, S, cipher_offset(8, C)), cipher_offset(8, C))
        assert read_fails_at(fd, provider, 3 * C) == 3
    finally:
        for descriptor in (fd, other, final_fd):
            os.close(descriptor)


@pytest.mark.parametrize("what", ["random bytes", "a data chunk of the file"])
def test_a_chunk_injected_into_a_run_fails(provider, what: str) -> None:
    fd, model = made(provider, [("write", 0, b"a" * C), ("write", 9 * C, b"z")])
    try:
        injected = os.urandom(S) if what == "random bytes" else os.pread(fd, S, HEADER_SIZE)
        os.pwrite(fd, injected, cipher_offset(4, C))
        assert read_fails_at(fd, provider, 4 * C) == 4
        assert read_fails_at(fd, provider, 2 * C, 3) == 2  # its run no longer covers it
        engine = EncryptedFile.open(fd, key_provider=provider, writable=False)
        assert engine.read(5 * C, 4 * C) == model[5 * C : 9 * C]  # behind it: still covered
    finally:
        os.close(fd)


def test_the_final_marker_zeroed_or_cut_off(provider) -> None:
    fd, model = made(provider, [("write", 0, b"a"), ("truncate", 100)])
    try:
        size = os.fstat(fd).st_size
        os.pwrite(fd, bytes(24), size - 24)
        assert read_fails_at(fd, provider, 2 * C) == 2
        assert read_fails_at(fd, provider, C, 40) == 1
        os.ftruncate(fd, cipher_offset(6, C))  # the final chunk cut off
        assert not verify(fd, key_provider=provider).ok
    finally:
        os.close(fd)


# ----------------------------------------------------------------------- crash order
class Recorder:
    """Records the engine's writes (and backing truncations) in order."""

    def __init__(self, engine: EncryptedFile) -> None:
        self.events: list[tuple[str, int, bytes]] = []
        real_pwrite, real_truncate = engine._pwrite, engine._truncate_backing

        def pwrite(buffers: list, offset: int) -> None:
            self.events.append(("write", offset, b"".join(bytes(b) for b in buffers)))
            real_pwrite(buffers, offset)

        def truncate(length: int) -> None:
            self.events.append(("truncate", length, b""))
            real_truncate(length)

        engine._pwrite = pwrite  # type: ignore[method-assign]
        engine._truncate_backing = truncate  # type: ignore[method-assign]


def replay(before: bytes, events: list[tuple[str, int, bytes]]) -> int:
    fd = memfd()
    os.pwrite(fd, before, 0)
    for kind, offset, data in events:
        if kind == "write":
            os.pwrite(fd, data, offset)
        else:
            os.ftruncate(fd, offset)
    return fd


@pytest.mark.parametrize("where", [0, 1, 4, 8, 9])
def test_a_crash_between_the_writes_of_a_split_leaves_everything_readable(
    provider, where: int
) -> None:
    fd, old = made(provider, [("write", 10 * C, b"tail")])  # run [0, 9]
    try:
        assert layout(fd) == ["Z"] * 9 + ["M0", "D"]
        before = os.pread(fd, 1 << 20, 0)
        engine = EncryptedFile.open(fd, key_provider=provider)
        recorder = Recorder(engine)
        data = bytes(random.Random(where).randbytes(C))
        engine.write(where * C, data)
        engine.flush()
        new = bytearray(old)
        new[where * C : where * C + C] = data
        writes = [event for event in recorder.events if event[0] == "write"]
        assert len(writes) == 1 + (where > 0) + (where < 9)
        for stop in range(len(recorder.events) + 1):
            crashed = replay(before, recorder.events[:stop])
            try:
                engine = EncryptedFile.open(crashed, key_provider=provider, writable=False)
                for index in range(11):  # every chunk reads as before or after, never fails
                    got = engine.read(index * C, C)
                    assert got in (old[index * C : index * C + C], new[index * C : index * C + C])
                assert verify(crashed, key_provider=provider).ok
            finally:
                os.close(crashed)
    finally:
        os.close(fd)


def test_a_crash_while_growing_a_run_tail_keeps_the_chunks_before_it(provider) -> None:
    fd, old = made(provider, [("write", 0, b"head"), ("truncate", 6 * C - 3)])  # D Z*3 Z M1
    try:
        before = os.pread(fd, 1 << 20, 0)
        engine = EncryptedFile.open(fd, key_provider=provider)
        recorder = Recorder(engine)
        engine.truncate(20 * C)
        engine.close()
        old_tail = 5
        for stop in range(len(recorder.events) + 1):
            crashed = replay(before, recorder.events[:stop])
            try:
                engine = EncryptedFile.open(crashed, key_provider=provider, writable=False)
                # chunks before the old tail always read (as zeros, or "head")
                assert engine.read(0, old_tail * C) == old[: old_tail * C]
                report = verify(crashed, key_provider=provider)
                if not report.ok:  # the damage a crash while appending may leave
                    assert report.first_bad_chunk is not None
                    assert report.first_bad_chunk >= old_tail
                    repair(crashed, key_provider=provider)
                    assert verify(crashed, key_provider=provider).ok
            finally:
                os.close(crashed)
    finally:
        os.close(fd)


# ------------------------------------------------------------------ streams and repair
def test_a_stream_resolves_runs_across_batches(provider, monkeypatch) -> None:
    monkeypatch.setattr(stream_module, "BATCH_BYTES", 4 * C)
    fd, model = made(
        provider,
        [("write", 0, b"a"), ("write", 20 * C, b"b"), ("write", 23 * C, b"c"),
         ("truncate", 40 * C + 5)],
    )  # fmt: skip
    try:
        ciphertext = os.pread(fd, 1 << 20, 0)
        out = io.BytesIO()
        assert fmt.decrypt_stream(io.BytesIO(ciphertext), out, key_provider=provider) == len(model)
        assert out.getvalue() == model
        damaged = bytearray(ciphertext)  # zero the data chunk 20: the stream must fail
        start = cipher_offset(20, C)
        damaged[start : start + S] = bytes(S)
        out = io.BytesIO()
        with pytest.raises(CorruptChunk) as caught:
            fmt.decrypt_stream(io.BytesIO(bytes(damaged)), out, key_provider=provider)
        assert caught.value.chunk_index == 20
        assert len(out.getvalue()) <= 20 * C  # nothing unauthenticated was written
    finally:
        os.close(fd)


def test_repair_cuts_inside_a_run_and_keeps_its_start_covered(provider) -> None:
    fd, model = made(provider, [("write", 0, b"a"), ("write", 9 * C, b"zz")])  # D Z*7 M1 D
    try:
        os.pwrite(fd, os.urandom(S), cipher_offset(9, C))  # the last chunk destroyed
        report = verify(fd, key_provider=provider)
        assert report.first_bad_chunk == 9 and report.authentic_size == 9 * C
        assert repair(fd, key_provider=provider) == 9 * C
        assert verify(fd, key_provider=provider).ok
        check_reads(fd, provider, bytes(model[: 9 * C]))
    finally:
        os.close(fd)


# ------------------------------------------------------------------ version-1 files
def test_a_version_1_file_keeps_a_marker_per_hole_chunk_when_written(provider) -> None:
    fd = memfd()
    try:
        model = apply(fd, provider, [("write", 0, b"a"), ("truncate", 100)], version=1)
        engine = EncryptedFile.open(fd, key_provider=provider)
        assert engine.header is not None and engine.header.version == 1
        engine.truncate(200)
        engine.write(150, b"v1")
        engine.close()
        model.extend(bytes(100))
        model[150:152] = b"v1"
        data = os.pread(fd, 1 << 20, 0)
        assert int.from_bytes(data[8:10], "big") == 1
        hole = data[cipher_offset(3, C) : cipher_offset(4, C)]
        assert not any(hole[:-16]) and any(hole[-16:])  # a chunk of its own, with its marker
        check_reads(fd, provider, bytes(model))
    finally:
        os.close(fd)


def test_a_version_1_file_grows_by_at_most_256_hole_chunks_per_request(provider) -> None:
    from kmsfs.errors import FileTooLarge
    from kmsfs.format.file import V1_MAX_HOLE_CHUNKS

    fd = memfd()
    try:
        apply(fd, provider, [("write", 0, b"a")], version=1)
        before = os.pread(fd, 1 << 20, 0)
        engine = EncryptedFile.open(fd, key_provider=provider)
        limit = (1 + V1_MAX_HOLE_CHUNKS) * C
        with pytest.raises(FileTooLarge):
            engine.truncate(limit + 1)
        with pytest.raises(FileTooLarge):
            engine.write(limit + C, b"x")
        engine.flush()
        assert os.pread(fd, 1 << 20, 0) == before
        engine.truncate(limit)  # the most one request may add: 256 markers
        engine.write(limit + V1_MAX_HOLE_CHUNKS * C, b"y")
        engine.close()
        model = b"a" + bytes(limit + V1_MAX_HOLE_CHUNKS * C - 1) + b"y"
        check_reads(fd, provider, model)
    finally:
        os.close(fd)


# ------------------------------------------------------------------------ the model
def steps_strategy() -> st.SearchStrategy[list[tuple]]:
    offset = st.one_of(st.integers(0, 70 * C), st.builds(lambda k: k * C, st.integers(0, 70)))
    return st.lists(
        st.one_of(
            st.tuples(st.just("write"), offset, st.integers(1, 3 * C + 2), st.integers(0, 99)),
            st.tuples(st.just("truncate"), offset),
            st.tuples(st.just("flush")),
            st.tuples(st.just("reopen")),
        ),
        max_size=20,
    )


@settings(max_examples=300, deadline=None)
@given(steps_strategy())
def test_random_writes_and_truncates_with_big_gaps_match_a_model(steps: list[tuple]) -> None:
    provider = FakeKeyProvider()
    fd = memfd()
    try:
        model = bytearray()
        engine = EncryptedFile.open(fd, key_provider=provider, key_id=KEY_ID, chunk_size=C)
        for step in steps:
            if step[0] == "write":
                _, offset, length, seed = step
                data = random.Random(seed).randbytes(length)
                engine.write(offset, data)
                if offset > len(model):
                    model.extend(bytes(offset - len(model)))
                model[offset : offset + length] = data
            elif step[0] == "truncate":
                engine.truncate(step[1])
                del model[step[1] :]
                model.extend(bytes(step[1] - len(model)))
            elif step[0] == "flush":
                engine.flush()
            else:
                engine.close()
                engine = EncryptedFile.open(fd, key_provider=provider, key_id=KEY_ID)
            assert engine.read(0, len(model) + 1) == model
        engine.close()
        check_reads(fd, provider, bytes(model))
        # nothing stale: every data chunk, zeroed, is noticed
        original = os.pread(fd, 1 << 24, 0)
        for index, kind in enumerate(layout(fd)):
            if kind == "D":
                start = cipher_offset(index, C)
                length = min(S, len(original) - start)
                os.pwrite(fd, bytes(length), start)
                assert not verify(fd, key_provider=provider).ok, (index, layout(fd))
                os.pwrite(fd, original[start : start + length], start)
    finally:
        os.close(fd)


@pytest.mark.parametrize("grow", ["write", "truncate"])
def test_the_rest_of_a_final_run_gets_its_marker_once(
    grow: str, provider, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Growing a file that ends in a hole run [a, t]: chunks a … t−1 get their marker at
    t − 1 once (before the old tail t is re-sealed as data), not once more by the split."""
    fd = memfd()
    engine = EncryptedFile.open(fd, key_provider=provider, key_id=KEY_ID, chunk_size=C)
    engine.write(0, b"x" * 5)
    engine.truncate(6 * C)  # run [1, 5], final
    engine.flush()
    at = cipher_offset(4, C) + C + CHUNK_OVERHEAD - 24  # the trailer of chunk 4
    offsets: list[int] = []
    real_pwritev = os.pwritev

    def pwritev(fd: int, buffers: list, offset: int) -> int:
        offsets.append(offset)
        return real_pwritev(fd, buffers, offset)

    monkeypatch.setattr(fmt.file.os, "pwritev", pwritev)
    if grow == "write":
        engine.write(9 * C + 3, b"far")
    else:
        engine.truncate(9 * C + 3)
    engine.flush()
    monkeypatch.undo()
    assert offsets.count(at) == 1
    assert layout(fd)[:6] == ["D", "Z", "Z", "Z", "M1", "D"]
    assert verify(fd, key_provider=provider).ok
    os.close(fd)
