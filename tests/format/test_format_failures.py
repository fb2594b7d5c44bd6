"""A write that fails (full disk, EIO) or a kill between two syscalls loses nothing stored.

The backing file's write syscalls are replaced by fakes: a disk that fills up at a given
byte (writes short, then ENOSPC, as a real full filesystem does), an EIO at the n-th call,
and a recorder that copies the backing file after every call (what a kill at that moment
leaves). Whatever happens, the data stored by the last flush reads back byte for byte —
directly after a failure, after ``repair`` after a kill — and after a failure the engine
says what the backing file says.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
from format_testkit import TEST_KEY_ID, FakeKeyProvider, memfd, pattern

from kmsfs.format import file as file_module
from kmsfs.format.file import EncryptedFile
from kmsfs.format.offsets import ciphertext_size
from kmsfs.format.tools import repair, verify

KEY_ID = TEST_KEY_ID
CHUNK = 64


def stored_content(fd: int, provider: FakeKeyProvider) -> bytes:
    """What a new reader of the backing file gets (it must open and verify)."""
    report = verify(fd, key_provider=provider)
    assert report.ok, report.error
    reader = EncryptedFile.open(fd, key_provider=provider, writable=False)
    return reader.read(0, reader.size + 1)


class Syscalls:
    """Stands in for the engine's writing syscalls (pwritev, pwrite, fallocate, ftruncate).

    ``capacity``: bytes the "disk" holds; writes and reservations beyond it write what fits
    and then fail with ENOSPC (overwrites inside the file always fit). ``fail_at``: the
    call (counted from 1) that raises EIO without writing. ``after_each``: called after
    every call that went through.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.calls = 0
        self.capacity: int | None = None
        self.full_errno = errno.ENOSPC  # what a write beyond ``capacity`` fails with
        self.fail_at: int | None = None
        self.after_each: Callable[[], None] | None = None
        self.real_pwritev = os.pwritev
        self.real_pwrite = os.pwrite
        self.real_ftruncate = os.ftruncate
        self.real_reserve = getattr(file_module, "_reserve_space", None)

    def _count(self) -> None:
        self.calls += 1
        if self.calls == self.fail_at:
            raise OSError(errno.EIO, "injected EIO")

    def _room(self, offset: int, length: int) -> int:
        if self.capacity is None:
            return length
        limit = max(self.capacity, os.fstat(self.fd).st_size)
        return max(0, min(length, limit - offset))

    def _done(self) -> None:
        if self.after_each is not None:
            self.after_each()

    def pwritev(self, fd: int, buffers: list, offset: int) -> int:
        return self.pwrite(fd, b"".join(bytes(b) for b in buffers), offset)

    def pwrite(self, fd: int, data, offset: int) -> int:
        self._count()
        data = bytes(data)
        room = self._room(offset, len(data))
        if room == 0 and data:
            raise OSError(self.full_errno, os.strerror(self.full_errno))
        written = self.real_pwrite(fd, data[:room], offset)
        self._done()
        return written

    def reserve(self, fd: int, offset: int, length: int) -> bool:
        self._count()
        if self._room(offset, length) < length:
            raise OSError(self.full_errno, os.strerror(self.full_errno))
        assert self.real_reserve is not None
        result = self.real_reserve(fd, offset, length)
        self._done()
        return result

    def ftruncate(self, fd: int, length: int) -> None:
        self._count()
        self.real_ftruncate(fd, length)
        self._done()


@contextmanager
def faked(monkeypatch: pytest.MonkeyPatch, fd: int) -> Iterator[Syscalls]:
    calls = Syscalls(fd)
    with monkeypatch.context() as patch:
        patch.setattr(file_module.os, "pwritev", calls.pwritev)
        patch.setattr(file_module.os, "pwrite", calls.pwrite)
        patch.setattr(file_module.os, "ftruncate", calls.ftruncate)
        patch.setattr(file_module, "_reserve_space", calls.reserve, raising=False)
        yield calls


def assert_old_or_new(content: bytes, old: bytes, new: bytes) -> None:
    """Every byte is the old or the new one; a file that grew keeps all of the old."""
    assert len(content) >= min(len(old), len(new))
    for index, byte in enumerate(content):
        expected = {new[index]} if index < len(new) else {0}
        if index < len(old):
            expected.add(old[index])
        assert byte in expected, f"byte {index} of {len(content)}"


def stored_file(provider: FakeKeyProvider, plaintext: bytes) -> tuple[int, EncryptedFile]:
    """A backing file holding ``plaintext`` (flushed), and an engine open on it."""
    fd = memfd()
    engine = EncryptedFile.open(fd, key_provider=provider, key_id=KEY_ID, chunk_size=CHUNK)
    engine.write(0, plaintext)
    engine.fsync()
    return fd, engine


# The changes that follow a flush: appends (the old final chunk full or short, new chunks
# right after it or beyond a gap), a write across the end, overwrites, a growing truncate.
# Each is (plaintext stored first, the change).
Change = Callable[[EncryptedFile], None]
CHANGES: dict[str, tuple[bytes, Change]] = {
    "append after a full final chunk": (
        pattern(1, 32 * CHUNK),
        lambda e: e.write(32 * CHUNK, pattern(2, 5 * CHUNK + 17)),
    ),
    "append after a short final chunk": (
        pattern(3, 5 * CHUNK + 20),
        lambda e: e.write(5 * CHUNK + 20, pattern(4, 4 * CHUNK)),
    ),
    "small append inside the final chunk": (
        pattern(5, 3 * CHUNK + 20),
        lambda e: e.write(3 * CHUNK + 20, b"tail"),
    ),
    "write past the end (holes)": (
        pattern(6, 2 * CHUNK + 9),
        lambda e: e.write(7 * CHUNK + 3, pattern(7, 2 * CHUNK)),
    ),
    "write across the end": (
        pattern(8, 4 * CHUNK + 30),
        lambda e: e.write(2 * CHUNK + 5, pattern(9, 4 * CHUNK)),
    ),
    "appends in several writes": (
        pattern(10, 6 * CHUNK + 1),
        lambda e: [e.write(6 * CHUNK + 1 + i * 50, pattern(11 + i, 50)) for i in range(9)],
    ),
    "overwrites inside": (
        pattern(20, 6 * CHUNK),
        lambda e: [e.write(o, b"new" * 7) for o in (70, 75, 200, 10)],
    ),
    "truncate up": (pattern(21, 2 * CHUNK + 7), lambda e: e.truncate(9 * CHUNK + 1)),
}


def apply_and_flush(engine: EncryptedFile, change: Change) -> None:
    change(engine)
    engine.fsync()


def final_content(plaintext: bytes, change: Change, provider: FakeKeyProvider) -> bytes:
    fd, engine = stored_file(provider, plaintext)
    apply_and_flush(engine, change)
    content = stored_content(fd, provider)
    os.close(fd)
    return content


@pytest.mark.parametrize("full_errno", [errno.ENOSPC, errno.EDQUOT], ids=["ENOSPC", "EDQUOT"])
@pytest.mark.parametrize("name", CHANGES)
def test_a_full_disk_loses_nothing_stored(
    name: str, full_errno: int, provider: FakeKeyProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The disk fills up at every possible byte of the change: the change fails with
    ENOSPC or succeeds; either way the backing file verifies, the stored data reads back
    byte for byte and the engine agrees with the backing file."""
    plaintext, change = CHANGES[name]
    new_content = final_content(plaintext, change, provider)
    old_disk = ciphertext_size(len(plaintext), CHUNK)
    new_disk = ciphertext_size(len(new_content), CHUNK)
    capacities = range(old_disk - CHUNK, max(old_disk, new_disk) + 2 * CHUNK, 7)
    failures = 0
    for capacity in capacities:
        fd, engine = stored_file(provider, plaintext)
        with faked(monkeypatch, fd) as calls:
            calls.capacity = capacity
            calls.full_errno = full_errno
            try:
                apply_and_flush(engine, change)
            except OSError as error:
                assert error.errno == full_errno
                failures += 1
        content = stored_content(fd, provider)
        assert_old_or_new(content, plaintext, new_content)
        assert engine.size == len(content), f"capacity {capacity}"
        assert engine.read(0, engine.size + 10) == content
        engine.close()  # nothing left to write, or nothing that fits: the file stays sound
        assert stored_content(fd, provider) == content
        os.close(fd)
    if new_disk > old_disk:
        assert failures > 0


@pytest.mark.parametrize("name", CHANGES)
def test_an_eio_at_any_write_loses_nothing_stored(
    name: str, provider: FakeKeyProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    """EIO (nothing written) at the n-th syscall, for every n: as for a full disk."""
    plaintext, change = CHANGES[name]
    new_content = final_content(plaintext, change, provider)
    for fail_at in range(1, 40):
        fd, engine = stored_file(provider, plaintext)
        with faked(monkeypatch, fd) as calls:
            calls.fail_at = fail_at
            try:
                apply_and_flush(engine, change)
            except OSError as error:
                assert error.errno == errno.EIO
            else:
                assert calls.calls < fail_at
                os.close(fd)
                break
        content = stored_content(fd, provider)
        assert_old_or_new(content, plaintext, new_content)
        assert engine.size == len(content)
        assert engine.read(0, engine.size + 10) == content
        os.close(fd)


@pytest.mark.parametrize("name", CHANGES)
def test_a_kill_between_any_two_syscalls_loses_nothing_stored(
    name: str, provider: FakeKeyProvider, monkeypatch: pytest.MonkeyPatch, tmp_path
) -> None:
    """The backing file as a kill after each syscall of the change leaves it: either it
    verifies as the old or the new file, or repair restores a sound file that starts with
    every byte stored before the change (an interrupted append: exactly the old file)."""
    plaintext, change = CHANGES[name]
    new_content = final_content(plaintext, change, provider)
    fd, engine = stored_file(provider, plaintext)
    snapshots: list[bytes] = []
    with faked(monkeypatch, fd) as calls:
        calls.after_each = lambda: snapshots.append(os.pread(fd, 1 << 22, 0))
        apply_and_flush(engine, change)
    os.close(fd)
    assert snapshots
    path = tmp_path / "killed"
    for snapshot in snapshots:
        path.write_bytes(snapshot)
        report = verify(path, key_provider=provider)
        if not report.ok:
            repair(path, key_provider=provider)
        with open(path, "rb") as stream:
            content = stored_content(stream.fileno(), provider)
        assert_old_or_new(content, plaintext, new_content)
