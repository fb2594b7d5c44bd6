"""Several handles on one file, in one process and in several: one consistent content."""

from __future__ import annotations

import multiprocessing
import os
import random
import struct
from pathlib import Path

import pytest

from tests.fs.helpers import CHUNK, drop_page_cache

FORK = multiprocessing.get_context("fork")


def run_processes(*targets) -> None:
    """Start one process per (function, args) at once (they meet at a barrier); all must exit 0."""
    barrier = FORK.Barrier(len(targets))
    processes = [
        FORK.Process(target=function, args=(barrier, *args)) for function, *args in targets
    ]
    for process in processes:
        process.start()
    for process in processes:
        process.join(120)
    for process in processes:
        if process.is_alive():
            process.kill()
            process.join()
    assert [process.exitcode for process in processes] == [0] * len(processes)


def block(writer: int, index: int, length: int) -> bytes:
    return (f"<w{writer}:{index:06d}>".encode() * (length // 11 + 1))[:length]


def test_two_fds_one_process(workdir: Path) -> None:
    path = workdir / "f"
    path.write_bytes(bytes(4 * CHUNK))
    first, second = os.open(path, os.O_RDWR), os.open(path, os.O_WRONLY)
    third = os.open(path, os.O_RDONLY)
    try:
        os.pwrite(first, b"1" * 1000, CHUNK - 500)
        os.pwrite(second, b"2" * 1000, 3 * CHUNK - 10)
        os.pwrite(second, b"3" * 20, 4 * CHUNK)  # grows the file
        assert os.pread(first, 1000, 3 * CHUNK - 10) == b"2" * 1000
        assert os.pread(third, 1000, CHUNK - 500) == b"1" * 1000
        assert os.fstat(first).st_size == 4 * CHUNK + 20
        os.fsync(second)
        os.posix_fadvise(third, 0, 0, os.POSIX_FADV_DONTNEED)
        assert os.pread(third, 20, 4 * CHUNK) == b"3" * 20
    finally:
        for fd in (first, second, third):
            os.close(fd)
    expected = bytearray(4 * CHUNK)
    expected[CHUNK - 500 : CHUNK + 500] = b"1" * 1000
    expected[3 * CHUNK - 10 : 3 * CHUNK + 990] = b"2" * 1000
    expected += b"3" * 20
    drop_page_cache(path)
    assert path.read_bytes() == bytes(expected)


def _region_writer(barrier, path: str, writer: int, regions: list[tuple[int, int]]) -> None:
    fd = os.open(path, os.O_RDWR)
    try:
        barrier.wait()
        for round_number in range(3):
            for index, (offset, length) in enumerate(regions):
                os.pwrite(fd, block(writer, index + round_number * 1000, length), offset)
            os.fsync(fd)
    finally:
        os.close(fd)


def _regions(seed: int, count: int, size: int) -> tuple[list, list]:
    """Interleaved, unaligned regions covering [0, size): even ones for writer 0."""
    rng = random.Random(seed)
    cuts = sorted(rng.sample(range(1, size), count - 1))
    spans = list(zip([0, *cuts], [*cuts, size], strict=True))
    regions = [(start, end - start) for start, end in spans]
    return regions[0::2], regions[1::2]


@pytest.mark.parametrize("direct", [False, True], ids=["cached", "O_DIRECT-size-writes"])
def test_two_processes_write_interleaved_regions(workdir: Path, direct: bool) -> None:
    path = workdir / "f"
    size = 8 * CHUNK + 123
    path.write_bytes(bytes(size))
    even, odd = _regions(seed=11, count=400, size=size)
    if direct:
        # the same, through fds that bypass the page cache: the mount sees the writers'
        # own unaligned offsets and lengths at once (read-modify-write of shared chunks)
        try:
            os.close(os.open(path, os.O_RDWR | os.O_DIRECT))
        except OSError as error:
            pytest.skip(f"O_DIRECT not offered: {error}")
        target = _direct_region_writer
    else:
        target = _region_writer
    run_processes((target, str(path), 0, even), (target, str(path), 1, odd))
    expected = bytearray(size)
    for writer, regions in ((0, even), (1, odd)):
        for index, (offset, length) in enumerate(regions):
            expected[offset : offset + length] = block(writer, index + 2000, length)
    assert path.read_bytes() == bytes(expected)
    drop_page_cache(path)
    assert path.read_bytes() == bytes(expected)


def _direct_region_writer(barrier, path: str, writer: int, regions) -> None:
    fd = os.open(path, os.O_RDWR | os.O_DIRECT)
    try:
        barrier.wait()
        for round_number in range(3):
            for index, (offset, length) in enumerate(regions):
                os.pwrite(fd, block(writer, index + round_number * 1000, length), offset)
    finally:
        os.close(fd)


def _appender(barrier, path: str, writer: int, count: int) -> None:
    rng = random.Random(writer)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        barrier.wait()
        for index in range(count):
            body = block(writer, index, rng.randrange(1, 9000))
            os.write(fd, struct.pack(">BII", writer, index, len(body)) + body)
    finally:
        os.close(fd)


def test_append_from_two_processes_loses_nothing(workdir: Path) -> None:
    path = workdir / "log"
    path.write_bytes(b"")
    count = 400
    run_processes((_appender, str(path), 0, count), (_appender, str(path), 1, count))
    expected_length = 0
    for writer in (0, 1):
        rng = random.Random(writer)
        expected_length += sum(9 + rng.randrange(1, 9000) for _ in range(count))
    drop_page_cache(path)
    data = path.read_bytes()
    assert len(data) == expected_length == os.stat(path).st_size
    seen: dict[int, list[int]] = {0: [], 1: []}
    position = 0
    while position < len(data):
        writer, index, length = struct.unpack_from(">BII", data, position)
        position += 9
        assert data[position : position + length] == block(writer, index, length)
        position += length
        seen[writer].append(index)
    assert seen == {0: list(range(count)), 1: list(range(count))}


def _grower(barrier, path: str, writer: int) -> None:
    fd = os.open(path, os.O_RDWR)
    try:
        barrier.wait()
        for index in range(200):
            offset = (index * 2 + writer) * 3000
            os.pwrite(fd, block(writer, index, 3000), offset)
            if index % 50 == 0:
                os.fsync(fd)
    finally:
        os.close(fd)


def test_two_processes_growing_one_file(workdir: Path) -> None:
    path = workdir / "f"
    path.write_bytes(b"")
    run_processes((_grower, str(path), 0), (_grower, str(path), 1))
    expected = b"".join(block(index % 2, index // 2, 3000) for index in range(400))
    assert os.stat(path).st_size == len(expected)
    drop_page_cache(path)
    assert path.read_bytes() == expected
