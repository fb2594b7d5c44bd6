"""The backing-file prefetcher (``kmsfs/fs/prefetch.py``) and its use by the mount."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

from kmsfs.format.offsets import CHUNK_OVERHEAD, HEADER_SIZE
from kmsfs.fs.prefetch import AHEAD, STEP, Prefetcher, Stream
from tests.fs.helpers import MountFactory

CHUNK = 64 << 10
MIB = 1 << 20


def _wait_for(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def test_sequential_large_reads_are_read_ahead_and_the_fd_is_closed(tmp_path: Path) -> None:
    backing = tmp_path / "backing"
    backing.write_bytes(os.urandom(HEADER_SIZE + 512 * (CHUNK + CHUNK_OVERHEAD)))
    before = _open_fds()
    fd = os.open(backing, os.O_RDONLY)
    prefetcher = Prefetcher()
    stream = Stream()
    try:
        prefetcher.after_read(stream, fd, 0, MIB, CHUNK)  # the first read: not yet a stream
        assert prefetcher.requested == 0 and stream.fd is None
        prefetcher.after_read(stream, fd, MIB, MIB, CHUNK)  # continues it: read ahead
        assert AHEAD - STEP <= prefetcher.requested <= AHEAD + CHUNK
        assert stream.fd is not None and stream.fd != fd
        _wait_for(lambda: prefetcher.done == prefetcher.requested)
        asked = prefetcher.requested
        prefetcher.after_read(stream, fd, 2 * MIB, MIB, CHUNK)  # 1 MiB more: 1 MiB more ahead
        assert prefetcher.requested - asked <= MIB + CHUNK + CHUNK_OVERHEAD * 16
        prefetcher.after_read(stream, fd, 40 * MIB, MIB, CHUNK)  # a jump: nothing
        prefetcher.after_read(stream, fd, 7, 100, CHUNK)  # small: nothing
        asked = prefetcher.requested
        prefetcher.after_read(stream, fd, 107, 100, CHUNK)  # small, sequential: nothing
        assert prefetcher.requested == asked
        prefetcher.forget(stream)
        assert stream.fd is None
    finally:
        prefetcher.stop()
        os.close(fd)
    assert _open_fds() == before  # the helper closed its duplicate


def test_a_failing_prefetch_only_costs_time(tmp_path: Path) -> None:
    prefetcher = Prefetcher()
    stream = Stream()
    try:
        fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)  # preads fail with EISDIR
        prefetcher.after_read(stream, fd, 0, MIB, CHUNK)
        prefetcher.after_read(stream, fd, MIB, MIB, CHUNK)
        assert prefetcher.requested > 0
        os.close(fd)
        closed = Stream()
        closed.next_offset = 0
        prefetcher.after_read(closed, fd, 0, MIB, CHUNK)  # fd closed: dup fails, no error
        assert closed.fd is None
        prefetcher.forget(stream)
    finally:
        prefetcher.stop()
    assert prefetcher._thread is None


def test_the_mount_reads_big_files_right_and_keeps_no_fds(mounts: MountFactory) -> None:
    mount = mounts.mount()
    assert mount.process is not None
    data = os.urandom(24 * MIB + 12345)
    digest = hashlib.sha256(data).hexdigest()
    for index in range(3):
        (mount.mnt / f"big{index}").write_bytes(data)
    proc_fds = Path(f"/proc/{mount.process.pid}/fd")
    baseline = len(os.listdir(proc_fds))
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
    _wait_for(lambda: len(os.listdir(proc_fds)) <= baseline)
    with open(mount.mnt / "big0", "rb", buffering=0) as reader:  # while a stream is open:
        for _ in range(6):
            assert len(reader.read(MIB)) == MIB
        # its backing fd, and the helper's duplicate of it
        assert len(os.listdir(proc_fds)) == baseline + 2
    _wait_for(lambda: len(os.listdir(proc_fds)) <= baseline)
