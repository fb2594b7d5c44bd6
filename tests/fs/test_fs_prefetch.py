"""The read-ahead helper (``kmsfs/fs/prefetch.py``), the engine's use of it, and the mount's."""

from __future__ import annotations

import hashlib
import os
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from kmsfs.errors import CorruptChunk
from kmsfs.format.file import EncryptedFile
from kmsfs.format.offsets import CHUNK_OVERHEAD, HEADER_SIZE
from kmsfs.fs.prefetch import AHEAD_SEGMENTS, Prefetcher, Stream
from tests.format.format_testkit import FakeKeyProvider
from tests.fs.helpers import MountFactory

CHUNK = 64 << 10
STORED = CHUNK + CHUNK_OVERHEAD
MIB = 1 << 20


def _wait_for(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


@pytest.fixture
def engine_of(tmp_path: Path):
    """engine_of(plaintext) -> an EncryptedFile (64 KiB chunks) holding it, flushed."""
    fds: list[int] = []
    provider = FakeKeyProvider()

    def make(plaintext: bytes) -> EncryptedFile:
        fd = os.open(tmp_path / f"f{len(fds)}", os.O_RDWR | os.O_CREAT, 0o600)
        fds.append(fd)
        engine = EncryptedFile.open(fd, key_provider=provider, key_id="alias/t", chunk_size=CHUNK)
        engine.write(0, plaintext)
        engine.flush()
        return engine

    yield make
    for fd in fds:
        os.close(fd)


def _read_sequentially(
    prefetcher: Prefetcher, stream: Stream, engine: EncryptedFile, start: int, count: int
) -> bytes:
    """What the mount's read handler does: readinto, then tell the prefetcher."""
    out = bytearray()
    offset = start
    for _ in range(count):
        buffer = bytearray(min(MIB, engine.size - offset))
        engine.readinto(offset, buffer)
        prefetcher.after_read(stream, engine.fd, offset, len(buffer), CHUNK)
        out += buffer
        offset += len(buffer)
    return bytes(out)


def test_sequential_reads_are_served_from_segments_and_the_fd_is_closed(engine_of) -> None:
    data = os.urandom(20 * MIB + 777)
    engine = engine_of(data)
    before = _open_fds()
    prefetcher = Prefetcher()
    stream = Stream(engine)
    try:
        assert _read_sequentially(prefetcher, stream, engine, 0, 1) == data[:MIB]
        assert prefetcher.requested == 0 and stream.fd is None  # one read: not yet a stream
        assert _read_sequentially(prefetcher, stream, engine, MIB, 1) == data[MIB : 2 * MIB]
        assert prefetcher.requested == AHEAD_SEGMENTS  # segments 2..9, read ahead
        assert stream.fd is not None and stream.fd != engine.fd
        assert engine.cipher_cache is stream
        _wait_for(lambda: prefetcher.done == prefetcher.requested)
        # the rest, with reads that straddle segments too: all right, and from the segments
        got = _read_sequentially(prefetcher, stream, engine, 2 * MIB, 5)
        got += _read_sequentially(prefetcher, stream, engine, 7 * MIB, 1)
        assert got == data[2 * MIB : 8 * MIB]
        assert stream.hits >= 5
        odd = bytearray(MIB)  # not at a segment boundary: two segments joined
        engine.readinto(8 * MIB + 4096, odd)
        assert bytes(odd) == data[8 * MIB + 4096 : 9 * MIB + 4096]
        assert stream.hits >= 6
        # segments behind the reader went back to the pool; never more than the window
        assert set(stream.segments) <= set(range(8, 8 + AHEAD_SEGMENTS + 1))
        prefetcher.after_read(stream, engine.fd, 7, 100, CHUNK)  # small, elsewhere: nothing
        assert prefetcher.requested == AHEAD_SEGMENTS + 6
        prefetcher.forget(stream)
        assert stream.fd is None and engine.cipher_cache is None
    finally:
        prefetcher.stop()
    assert _open_fds() == before  # the helper closed its duplicate


def test_a_write_makes_the_segments_stale(engine_of) -> None:
    """A segment read before a write is never used after it (old chunks still authenticate)."""
    data = bytearray(os.urandom(12 * MIB))
    engine = engine_of(bytes(data))
    prefetcher = Prefetcher()
    stream = Stream(engine)
    try:
        _read_sequentially(prefetcher, stream, engine, 0, 2)
        _wait_for(lambda: prefetcher.done == prefetcher.requested)
        new = os.urandom(CHUNK)
        engine.write(5 * MIB, new)  # an interior chunk: held in memory...
        engine.flush()  # ...and now on disk, behind the segment's back
        data[5 * MIB : 5 * MIB + CHUNK] = new
        hits = stream.hits
        assert _read_sequentially(prefetcher, stream, engine, 2 * MIB, 4) == data[2 * MIB : 6 * MIB]
        # the stale segment 2 was dropped, not used; 3 to 5 came from segments read anew
        assert stream.hits == hits + 3
        assert prefetcher._buffers <= AHEAD_SEGMENTS + 1  # the stale ones' buffers reused
    finally:
        prefetcher.forget(stream)
        prefetcher.stop()


def test_segments_are_authenticated_like_any_ciphertext(engine_of) -> None:
    engine = engine_of(os.urandom(12 * MIB))
    position = HEADER_SIZE + 5 * 16 * STORED + 100  # inside segment 5
    byte = os.pread(engine.fd, 1, position)
    os.pwrite(engine.fd, bytes([byte[0] ^ 1]), position)  # tampered with on disk
    prefetcher = Prefetcher()
    stream = Stream(engine)
    try:
        _read_sequentially(prefetcher, stream, engine, 0, 2)
        _wait_for(lambda: prefetcher.done == prefetcher.requested)
        _read_sequentially(prefetcher, stream, engine, 2 * MIB, 3)
        hits = stream.hits
        buffer = bytearray(MIB)
        with pytest.raises(CorruptChunk):
            engine.readinto(5 * MIB, buffer)
        assert stream.hits == hits + 1  # it came from the segment, and was refused
        assert buffer == bytes(MIB)  # nothing unauthenticated left in the caller's buffer
    finally:
        prefetcher.forget(stream)
        prefetcher.stop()


class _FailsOffTheMainThread:
    disk_size = 100 * MIB
    cipher_cache = None

    @property
    def disk_generation(self) -> int:
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("a bug in the helper")
        return 0


def test_a_failing_prefetch_only_costs_time(tmp_path: Path) -> None:
    prefetcher = Prefetcher()
    fake = SimpleNamespace(disk_generation=0, disk_size=100 * MIB, cipher_cache=None)
    stream = Stream(fake)
    try:
        fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)  # preads fail with EISDIR
        prefetcher.after_read(stream, fd, 0, MIB, CHUNK)
        prefetcher.after_read(stream, fd, MIB, MIB, CHUNK)
        assert prefetcher.requested > 0
        _wait_for(lambda: all(s.done.is_set() for s in stream.segments.values()))
        assert stream.lookup(HEADER_SIZE + 2 * 16 * STORED, STORED, 0) is None
        os.close(fd)
        closed = Stream(SimpleNamespace(disk_generation=0, disk_size=100 * MIB, cipher_cache=None))
        closed.next_offset = 0
        prefetcher.after_read(closed, fd, 0, MIB, CHUNK)  # fd closed: dup fails, no error
        assert closed.fd is None and not closed.segments
        prefetcher.forget(stream)
        # a bug in the helper (here: an engine that fails there) loses only time
        broken = Stream(_FailsOffTheMainThread())
        good_fd = os.open(tmp_path / "data", os.O_RDWR | os.O_CREAT)
        os.write(good_fd, os.urandom(4 * MIB))
        prefetcher.after_read(broken, good_fd, 0, MIB, CHUNK)
        prefetcher.after_read(broken, good_fd, MIB, MIB, CHUNK)
        _wait_for(lambda: all(s.done.is_set() for s in broken.segments.values()))
        assert broken.lookup(HEADER_SIZE + 2 * 16 * STORED, STORED, 0) is None
        assert prefetcher._thread is not None and prefetcher._thread.is_alive()
        prefetcher.forget(broken)
        os.close(good_fd)
    finally:
        prefetcher.stop()
    assert prefetcher._thread is None


def test_buffers_of_closed_readers_are_let_go_beyond_one_window(engine_of) -> None:
    prefetcher = Prefetcher()
    engines = [engine_of(os.urandom(12 * MIB)) for _ in range(3)]
    streams = [Stream(engine) for engine in engines]
    try:
        for engine, stream in zip(engines, streams, strict=True):
            _read_sequentially(prefetcher, stream, engine, 0, 2)
        assert prefetcher._buffers == 3 * AHEAD_SEGMENTS
        for stream in streams:
            prefetcher.forget(stream)  # the files are closed
        _wait_for(lambda: len(prefetcher._spare) == prefetcher._buffers)  # all given back
        assert (prefetcher._buffers, len(prefetcher._spare)) == (AHEAD_SEGMENTS, AHEAD_SEGMENTS)
        # the next reader still finds its window warm
        stream = Stream(engines[0])
        streams.append(stream)
        assert _read_sequentially(prefetcher, stream, engines[0], 0, 2)
        assert (prefetcher._buffers, len(prefetcher._spare)) == (AHEAD_SEGMENTS, 0)
    finally:
        for stream in streams:
            prefetcher.forget(stream)
        prefetcher.stop()


def test_buffers_are_bounded_for_the_whole_mount(engine_of) -> None:
    prefetcher = Prefetcher(max_buffers=10)
    engines = [engine_of(os.urandom(12 * MIB)) for _ in range(2)]
    streams = [Stream(engine) for engine in engines]
    try:
        for engine, stream in zip(engines, streams, strict=True):
            _read_sequentially(prefetcher, stream, engine, 0, 2)
        assert len(streams[0].segments) == AHEAD_SEGMENTS
        assert len(streams[1].segments) == 10 - AHEAD_SEGMENTS  # what was left
        prefetcher.forget(streams[0])
        _wait_for(lambda: len(prefetcher._spare) >= AHEAD_SEGMENTS)  # the helper gave them back
        _read_sequentially(prefetcher, streams[1], engines[1], 2 * MIB, 1)
        assert len(streams[1].segments) == AHEAD_SEGMENTS  # the freed buffers are reused
    finally:
        for stream in streams:
            prefetcher.forget(stream)
        prefetcher.stop()


def test_the_mount_reads_big_files_right_and_keeps_no_fds(mounts: MountFactory) -> None:
    mount = mounts.mount()
    assert mount.process is not None
    data = os.urandom(24 * MIB + 12345)
    digest = hashlib.sha256(data).hexdigest()
    for index in range(3):
        (mount.mnt / f"big{index}").write_bytes(data)
    proc_fds = Path(f"/proc/{mount.process.pid}/fd")

    def backing_fds() -> int:
        """The mount's fds on files of the cipher directory."""
        count = 0
        for name in os.listdir(proc_fds):
            try:
                count += os.readlink(proc_fds / name).startswith(f"{mount.cipher}/")
            except OSError:  # closed meanwhile
                pass
        return count

    _wait_for(lambda: backing_fds() == 0)  # RELEASE of the writers comes asynchronously
    for _ in range(2):
        for index in range(3):
            path = mount.mnt / f"big{index}"
            with open(path, "rb", buffering=0) as reader:  # 1 MiB sequential reads
                hasher = hashlib.sha256()
                while block := reader.read(MIB):
                    hasher.update(block)
            assert hasher.hexdigest() == digest
            fd = os.open(path, os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # next round: READs again
            os.close(fd)
    _wait_for(lambda: backing_fds() == 0)
    with open(mount.mnt / "big0", "rb", buffering=0) as reader:  # while a stream is open:
        for _ in range(6):
            assert len(reader.read(MIB)) == MIB
        assert backing_fds() == 2  # its backing fd, and the helper's duplicate of it
    _wait_for(lambda: backing_fds() == 0)


def test_the_mount_sees_writes_made_while_a_reader_streams(mounts: MountFactory) -> None:
    """Another handle overwrites data ahead of a sequential reader: the reader gets the new."""
    mount = mounts.mount()
    path = mount.mnt / "f"
    data = bytearray(os.urandom(16 * MIB))
    path.write_bytes(data)
    with open(path, "rb", buffering=0) as reader:
        assert reader.read(2 * MIB) == data[: 2 * MIB]
        assert reader.read(MIB) == data[2 * MIB : 3 * MIB]
        new = os.urandom(3 * MIB)
        with open(path, "r+b", buffering=0) as writer:
            writer.seek(8 * MIB)
            writer.write(new)
            os.fsync(writer.fileno())
        data[8 * MIB : 11 * MIB] = new
        fd = reader.fileno()
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # no kernel cache: READs again
        rest = bytearray()
        while block := reader.read(MIB):
            rest += block
        assert rest == data[3 * MIB :]
