"""A small read's whole chunk goes to the kernel's page cache (kmsfs/fs/pagefill.py).

The filler on its own (queue, bar, settle, stop), then at a real mount: which pages the
kernel holds after one 4 KiB read (``fincore``), that they hold the file's bytes, and
that no store reaches a file with a writer or one being truncated.
"""

from __future__ import annotations

import errno
import mmap
import os
import random
import subprocess
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import trio

from kmsfs.fs.inodes import Node
from kmsfs.fs.ops import Operations
from kmsfs.fs.pagefill import ChunkFiller
from kmsfs.fs.polling import BusyPoller
from tests.fs.helpers import CHUNK, drop_page_cache
from tests.fs.test_fs_ops import pattern

PAGE = 4096


def resident_pages(path: Path) -> int:
    """Pages of ``path`` in the page cache (util-linux fincore)."""
    out = subprocess.run(
        ["fincore", "--raw", "--noheadings", "--bytes", "--output", "PAGES", str(path)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return int(out.split()[0])


def read_page(path: Path, offset: int, *, writer: bool = False) -> bytes:
    """One 4 KiB pread with read-ahead off (POSIX_FADV_RANDOM): the READ asks for one page."""
    fd = os.open(path, os.O_RDWR if writer else os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        return os.pread(fd, PAGE, offset)
    finally:
        os.close(fd)


def wait_for(condition, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


# ----------------------------------------------------------------- the filler alone
class GatedStore:
    """A store that waits for ``release`` and records what it was given."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.calls: list[tuple[int, int, bytes]] = []

    def __call__(self, ino: int, offset: int, data) -> None:
        self.release.wait(10)
        self.calls.append((ino, offset, bytes(data)))


def test_settle_waits_for_the_inodes_stores_and_bar_refuses_new_ones() -> None:
    store = GatedStore()
    filler = ChunkFiller(store)
    try:
        assert filler.accepts(7)
        filler.offer(7, CHUNK, bytearray(b"x" * 16))
        assert filler.busy(7) and not filler.busy(8)
        filler.bar(7)
        assert not filler.accepts(7) and filler.accepts(8)
        settled: list[float] = []

        async def main() -> None:
            async with trio.open_nursery() as nursery:

                async def settle() -> None:
                    await filler.settle(7)
                    settled.append(trio.current_time())

                nursery.start_soon(settle)
                await trio.sleep(0.2)
                assert not settled, "settle returned while a store was still queued"
                store.release.set()
            assert settled

        trio.run(main)
        assert store.calls == [(7, CHUNK, b"x" * 16)]
        assert not filler.busy(7)
        filler.unbar(7)
        assert filler.accepts(7)
    finally:
        store.release.set()
        filler.stop()


def test_a_full_queue_drops_chunks_and_stop_ends_the_thread() -> None:
    store = GatedStore()
    filler = ChunkFiller(store, max_pending=2)
    filler.offer(1, 0, bytearray(1))
    filler.offer(1, CHUNK, bytearray(1))
    assert not filler.accepts(2)
    filler.offer(2, 0, bytearray(1))  # over the bound: dropped, nothing queued
    assert filler.dropped == 1 and not filler.busy(2)
    store.release.set()
    assert wait_for(lambda: not filler.busy(1))
    assert len(store.calls) == 2
    thread = filler._thread
    filler.stop()
    assert thread is not None and not thread.is_alive()
    assert not filler.accepts(1)


def test_a_kernel_without_notify_store_turns_the_filler_off() -> None:
    def refuse(ino: int, offset: int, data) -> None:
        raise OSError(errno.ENOSYS, "no")

    filler = ChunkFiller(refuse)
    try:
        filler.offer(3, 0, bytearray(1))
        assert wait_for(lambda: not filler.busy(3))
        assert not filler.enabled and not filler.accepts(3)
    finally:
        filler.stop()


def test_a_filler_made_off_takes_nothing() -> None:
    assert not ChunkFiller(enabled=False).accepts(1)


# ----------------------------------------------------------------- at a real mount
def test_one_small_read_caches_its_whole_chunk_with_the_files_bytes(workdir: Path) -> None:
    data = pattern(8 * CHUNK, seed=1)
    path = workdir / "random.dat"
    path.write_bytes(data)
    drop_page_cache(path)
    assert resident_pages(path) == 0
    offset = 3 * CHUNK + 5 * PAGE
    assert read_page(path, offset) == data[offset : offset + PAGE]
    # the READ asked for one page; the chunk's other 15 come from the mount's store
    assert wait_for(lambda: resident_pages(path) == CHUNK // PAGE), resident_pages(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        stored = os.pread(fd, CHUNK, 3 * CHUNK)  # from the page cache: what the file holds
    finally:
        os.close(fd)
    assert stored == data[3 * CHUNK : 4 * CHUNK]
    assert path.read_bytes() == data


def test_no_chunk_is_cached_for_a_file_open_for_writing(workdir: Path) -> None:
    data = pattern(4 * CHUNK, seed=2)
    path = workdir / "written.dat"
    path.write_bytes(data)
    drop_page_cache(path)
    writer = os.open(path, os.O_RDWR)
    try:
        assert read_page(path, CHUNK + PAGE) == data[CHUNK + PAGE : CHUNK + 2 * PAGE]
        time.sleep(0.3)  # a store would have landed by now
        assert resident_pages(path) == 1
    finally:
        os.close(writer)
    # the writer gone, the next small read fills its chunk again
    assert read_page(path, 2 * CHUNK) == data[2 * CHUNK : 2 * CHUNK + PAGE]
    assert wait_for(lambda: resident_pages(path) == 1 + CHUNK // PAGE)


def test_o_direct_reads_cache_no_chunk(workdir: Path) -> None:
    """An O_DIRECT reader bypasses the page cache: its small reads store nothing there
    (the store would be work for nobody); a buffered read after it still does."""
    data = pattern(4 * CHUNK, seed=4)
    path = workdir / "direct.dat"
    path.write_bytes(data)
    drop_page_cache(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError as error:
        pytest.skip(f"O_DIRECT not offered: {error}")
    buffer = mmap.mmap(-1, PAGE)  # page-aligned, as O_DIRECT wants
    try:
        for offset in (PAGE, CHUNK + 2 * PAGE, 3 * CHUNK):
            assert os.preadv(fd, [buffer], offset) == PAGE
            assert buffer[:] == data[offset : offset + PAGE]
        time.sleep(0.3)  # a store would have landed by now
        assert resident_pages(path) == 0
    finally:
        os.close(fd)
        buffer.close()
    assert read_page(path, 2 * CHUNK) == data[2 * CHUNK : 2 * CHUNK + PAGE]
    assert wait_for(lambda: resident_pages(path) == CHUNK // PAGE), resident_pages(path)


def test_the_last_partial_chunk_is_not_stored(workdir: Path) -> None:
    data = pattern(2 * CHUNK + 3 * PAGE + 100, seed=3)
    path = workdir / "tail.dat"
    path.write_bytes(data)
    drop_page_cache(path)
    offset = 2 * CHUNK + PAGE
    assert read_page(path, offset) == data[offset : offset + PAGE]
    time.sleep(0.3)
    assert resident_pages(path) == 1
    assert os.stat(path).st_size == len(data)


def test_writes_and_truncates_between_small_reads_are_never_undone(workdir: Path) -> None:
    """Readers fill chunks while the file is rewritten and truncated: every state read
    back is the one just made, never a store of an older chunk."""
    path = workdir / "race.dat"
    size = 16 * CHUNK
    path.write_bytes(pattern(size, seed=0))
    stop = threading.Event()
    errors: list[BaseException] = []

    def reader() -> None:
        rng = random.Random(4)
        try:
            while not stop.is_set():
                fd = os.open(path, os.O_RDONLY)
                try:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
                    for _ in range(32):
                        os.pread(fd, PAGE, rng.randrange(size // PAGE) * PAGE)
                finally:
                    os.close(fd)
        except BaseException as error:  # noqa: BLE001 - reported by the main thread
            errors.append(error)

    threads = [threading.Thread(target=reader) for _ in range(2)]
    for thread in threads:
        thread.start()
    try:
        deadline = time.monotonic() + 4
        seed = 0
        while time.monotonic() < deadline:
            seed += 1
            expected = pattern(size, seed=seed)
            fd = os.open(path, os.O_RDWR)
            try:
                os.pwrite(fd, expected, 0)
            finally:
                os.close(fd)
            fd = os.open(path, os.O_RDONLY)
            try:
                assert os.pread(fd, size, 0) == expected, f"round {seed}: an older chunk"
            finally:
                os.close(fd)
            os.truncate(path, size // 2)
            assert os.stat(path).st_size == size // 2
            assert path.read_bytes() == expected[: size // 2], f"round {seed} after truncate"
            os.truncate(path, size)  # back to full size: the rest reads as zeros
            assert path.read_bytes()[size // 2 :] == bytes(size // 2)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    assert not errors
    assert seed > 3


@pytest.mark.parametrize("size", [CHUNK, 3 * CHUNK])
def test_random_small_reads_of_every_page_read_the_file(workdir: Path, size: int) -> None:
    data = pattern(size, seed=size)
    path = workdir / f"every-{size}.dat"
    path.write_bytes(data)
    drop_page_cache(path)
    pages = list(range(size // PAGE))
    random.Random(size).shuffle(pages)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        for page in pages:
            assert os.pread(fd, PAGE, page * PAGE) == data[page * PAGE : (page + 1) * PAGE]
    finally:
        os.close(fd)


# ------------------------------------------- the handlers that wait (in-process)
def _operations_with(filler: ChunkFiller) -> Operations:
    """An Operations with only what open and _truncate touch before their real work."""
    operations = Operations.__new__(Operations)
    operations.filler = filler
    operations.read_only = False
    operations.auditor = None
    operations.poller = BusyPoller(0)
    operations.inodes = SimpleNamespace(trim_dir_fds=lambda: None)
    return operations


def _waits_for_queued_stores(start, inner: str) -> list[tuple[bool, bool]]:
    """Run ``start(operations)`` while a store for inode 5 is held back; returns what
    the real work (``inner``, replaced) saw: (store still queued, new store accepted)."""
    store = GatedStore()
    filler = ChunkFiller(store)
    operations = _operations_with(filler)
    seen: list[tuple[bool, bool]] = []

    async def work(*args) -> None:
        seen.append((filler.busy(5), filler.accepts(5)))

    setattr(operations, inner, work)
    filler.offer(5, 0, bytearray(1))

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(start, operations)
            await trio.sleep(0.2)
            assert seen == [], "the change began while a store of a chunk read before was queued"
            assert not filler.accepts(5), "a new store was accepted while the change waited"
            assert filler.accepts(6)
            store.release.set()

    try:
        trio.run(main)
    finally:
        store.release.set()
        filler.stop()
    assert filler.accepts(5) or not filler.enabled
    return seen


def test_an_open_for_writing_waits_for_the_files_queued_stores() -> None:
    seen = _waits_for_queued_stores(
        lambda operations: operations.open(5, os.O_RDWR, SimpleNamespace()), "_open"
    )
    assert seen == [(False, False)]


def test_a_truncate_waits_for_the_files_queued_stores() -> None:
    seen = _waits_for_queued_stores(
        lambda operations: operations._truncate(Node(5, 5), 0), "_truncate_settled"
    )
    assert seen == [(False, False)]


def test_an_open_for_reading_does_not_wait() -> None:
    store = GatedStore()
    filler = ChunkFiller(store)
    operations = _operations_with(filler)
    opened: list[int] = []

    async def work(inode, flags, ctx) -> None:
        opened.append(inode)

    operations._open = work
    filler.offer(5, 0, bytearray(1))
    try:
        trio.run(operations.open, 5, os.O_RDONLY, SimpleNamespace())
        assert opened == [5] and filler.busy(5)
    finally:
        store.release.set()
        filler.stop()


def test_the_last_release_keeps_the_backing_file_open_until_its_stores_are_done(
    tmp_path: Path,
) -> None:
    store = GatedStore()
    filler = ChunkFiller(store)
    (tmp_path / "f").write_bytes(b"x")
    fd = os.open(tmp_path / "f", os.O_RDONLY)
    ino = os.fstat(fd).st_ino
    try:
        filler.hold_open(9, fd)  # nothing queued for 9: nothing kept
        filler.offer(9, 0, bytearray(1))
        filler.hold_open(9, fd)
    finally:
        os.close(fd)
    (tmp_path / "f").unlink()

    def held() -> list[int]:
        found = []
        for name in os.listdir("/proc/self/fd"):
            try:
                if os.stat(f"/proc/self/fd/{name}").st_ino == ino:
                    found.append(int(name))
            except OSError:
                pass
        return found

    try:
        assert len(held()) == 1, "the backing inode was freed while a store was queued"
        store.release.set()
        assert wait_for(lambda: not filler.busy(9))
        assert held() == []
    finally:
        store.release.set()
        filler.stop()
