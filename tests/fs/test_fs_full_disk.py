"""A full backing filesystem: nothing fsync'd is lost, and every writer is told.

The review's two scenarios on a 64 MiB tmpfs, side by side with the same writer on the
tmpfs itself (what ext4 and every local filesystem do: write() fails with ENOSPC) and, when
it is installed, on gocryptfs over the same tmpfs. Also ``kmsfs fsck --repair`` on what an
interrupted append leaves.
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import mounted_tmpfs
from tests.format.format_testkit import pattern
from tests.fs.helpers import Mount, MountFactory, cipher_chunk_offset

MIB = 1 << 20
TMPFS_SIZE = "64m"


@pytest.fixture
def tmpfs() -> Iterator[Path]:
    """A fresh 64 MiB tmpfs, unmounted at teardown whatever happened."""
    with mounted_tmpfs(TMPFS_SIZE, prefix="kfull-") as path:
        yield path


def fill_up(directory: Path) -> int:
    """Fill the filesystem of ``directory`` with a file; return the bytes it took."""
    filler = directory / "filler"
    written = 0
    with open(filler, "wb", buffering=0) as stream:
        block = b"\xa5" * MIB
        while True:
            try:
                written += stream.write(block)
            except OSError as error:
                assert error.errno == errno.ENOSPC
                break
        with pytest.raises(OSError):
            stream.write(b"x" * 4096)
    return written


def outcome(call: Callable[..., object], *args: object) -> str:
    """'ok' or the errno name of what ``call(*args)`` raised."""
    try:
        call(*args)
    except OSError as error:
        return errno.errorcode.get(error.errno or 0, str(error.errno))
    return "ok"


@dataclass
class Told:
    """What one writer was told and what it reads back afterwards."""

    where: str
    first_write_error: str = "none"
    writes_ok: int = 0
    accepted: int = 0  # bytes write() said it wrote
    fsync1: str = ""
    fsync2: str = ""
    close: str = ""
    size_after: int = 0
    readable_after: int = 0
    stored: int = 0  # bytes the backing filesystem holds for the file

    def line(self) -> str:
        return (
            f"{self.where}: {self.writes_ok} write() calls ok, {self.accepted} bytes accepted, "
            f"first failing write: "
            f"{self.first_write_error}; fsync {self.fsync1}, fsync again {self.fsync2}, "
            f"close {self.close}; afterwards size {self.size_after}, readable "
            f"{self.readable_after} bytes, backing holds {self.stored} bytes"
        )


def unbounded_writer(path: Path, where: str, backing: Callable[[], int]) -> Told:
    """200 x 1 MiB writes (stopping at the first failure), fsync, fsync, close, read back."""
    told = Told(where)
    block = pattern(11, MIB)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for _ in range(200):
            try:
                told.accepted += os.write(fd, block)
            except OSError as error:
                told.first_write_error = errno.errorcode[error.errno or 0]
                break
            told.writes_ok += 1
        told.fsync1 = outcome(lambda: os.fsync(fd))
        told.fsync2 = outcome(lambda: os.fsync(fd))
    finally:
        told.close = outcome(lambda: os.close(fd))
    told.size_after = os.stat(path).st_size
    with open(path, "rb") as stream:
        content = stream.read()
    told.readable_after = len(content)
    assert content == (block * (len(content) // MIB + 1))[: len(content)], "garbage read back"
    told.stored = backing()
    return told


# ------------------------------------------------------------- fsck --repair
def test_fsck_repair_restores_interrupted_appends(mounts: MountFactory) -> None:
    cipher = mounts.init(plaintext_names=True)
    mount = mounts.mount(cipher)
    old = pattern(1, 2 * MIB)
    for name in ("appended", "cut", "flipped"):
        (mount.mnt / name).write_bytes(old)
    mount.unmount_clean()
    before = {name: (cipher / name).read_bytes() for name in ("appended", "cut", "flipped")}
    mount.start()
    for name in ("appended", "cut"):
        with open(mount.mnt / name, "ab") as stream:
            stream.write(pattern(2, 300_000))
    mount.unmount_clean()
    after = (cipher / "appended").read_bytes()
    # the appended chunks are there, the old final chunk 31 not re-sealed yet
    (cipher / "appended").write_bytes(before["appended"] + after[len(before["appended"]) :])
    # the file ends with non-final chunk 33
    cut = (cipher / "cut").read_bytes()
    (cipher / "cut").write_bytes(cut[: cipher_chunk_offset(34)])
    # damage inside a file is not what an interrupted write leaves: reported, not repaired
    raw = bytearray(before["flipped"])
    raw[cipher_chunk_offset(3) + 100] ^= 1
    (cipher / "flipped").write_bytes(raw)

    result = mounts.keyd.kmsfs("fsck", str(cipher), "--repair", check=False)
    lines = result.stdout.decode().splitlines()
    assert result.returncode != 0, lines  # "flipped" is left
    by_name = {line.split(" ")[0].rstrip(":"): line for line in lines}
    assert "repaired: cut back to its last consistent length, 2097152 bytes" in by_name["appended"]
    assert "repaired: cut back to its last consistent length, 2228224 bytes" in by_name["cut"]
    assert "chunk 3 failed authentication" in by_name["flipped"]
    assert "repaired" not in by_name["flipped"]
    assert (cipher / "appended").read_bytes() == before["appended"]  # byte for byte

    mount.start()
    assert (mount.mnt / "appended").read_bytes() == old
    assert (mount.mnt / "cut").read_bytes() == (old + pattern(2, 300_000))[: 34 * 65536]
    mount.unmount_clean()
    result = mounts.keyd.kmsfs("fsck", str(cipher), "--repair", check=False)
    assert result.returncode != 0 and b"repaired" not in result.stdout


# ------------------------------------------------------------- the full disk
def kmsfs_on(tmpfs: Path, mounts: MountFactory, names: str = "plaintext") -> Mount:
    """A kmsfs mount whose cipher directory is on the tmpfs (mountpoint and log are not)."""
    cipher = tmpfs / "cipher"
    plaintext = ["--plaintext-names"] if names == "plaintext" else []
    mounts.keyd.kmsfs("init", str(cipher), "--key", "alias/fs", *plaintext)
    return mounts.mount(cipher)


def backing_size(cipher_file: Path) -> Callable[[], int]:
    def size() -> int:
        from kmsfs.format import plaintext_size

        return plaintext_size(cipher_file.stat().st_size, 65536)

    return size


def test_statfs_reports_the_backing_filesystem(tmpfs: Path, mounts: MountFactory) -> None:
    mount = kmsfs_on(tmpfs, mounts)
    (tmpfs / "some").write_bytes(b"x" * (5 * MIB))
    at_mount, backing = os.statvfs(mount.mnt), os.statvfs(tmpfs)
    assert at_mount.f_bsize * at_mount.f_blocks == backing.f_bsize * backing.f_blocks
    assert at_mount.f_bfree * at_mount.f_frsize == backing.f_bfree * backing.f_frsize
    assert at_mount.f_bavail * at_mount.f_frsize == backing.f_bavail * backing.f_frsize
    fill_up(tmpfs)
    assert os.statvfs(mount.mnt).f_bavail == os.statvfs(tmpfs).f_bavail == 0


def test_an_append_on_a_full_disk_keeps_fsyncd_data(tmpfs: Path, mounts: MountFactory) -> None:
    """The review's first scenario: ten 2 MiB files fsync'd, the disk filled, 300 KB
    appended to one and fsync'd: ENOSPC, and every file reads back as it was. The handles
    are opened while there is room, so they use the write-back cache: write() cannot
    fail, fsync and close tell (opened on the full disk, write() tells: see below)."""
    mount = kmsfs_on(tmpfs, mounts)
    contents = {f"f{i}": pattern(100 + i, 2 * MIB) for i in range(10)}
    for name, content in contents.items():
        with open(mount.mnt / name, "wb") as stream:
            stream.write(content)
            os.fsync(stream.fileno())
    other_writer = os.open(mount.mnt / "f3", os.O_WRONLY)
    reader = os.open(mount.mnt / "f3", os.O_RDONLY)
    fd = os.open(mount.mnt / "f3", os.O_WRONLY | os.O_APPEND)
    fill_up(tmpfs)
    try:
        os.write(fd, pattern(7, 300_000))  # into the page cache: it cannot fail here
        assert outcome(lambda: os.fsync(fd)) == "ENOSPC"
        assert outcome(lambda: os.fsync(fd)) == "ENOSPC"  # and again: it was not stored
    finally:
        assert outcome(lambda: os.close(fd)) == "ENOSPC"
    # every handle open for writing at the time is told too, a reader is not
    assert outcome(lambda: os.fsync(other_writer)) == "ENOSPC"
    assert outcome(lambda: os.close(other_writer)) == "ENOSPC"
    assert outcome(lambda: os.close(reader)) == "ok"
    for name, content in contents.items():
        assert (mount.mnt / name).read_bytes() == content, name
    assert os.stat(mount.mnt / "f3").st_size == 2 * MIB
    log = mount.log()
    assert log.count("f3: storing data failed") == 1, log
    assert "No space left on device" in log
    # the writers that were told are gone: with room again, the same append works
    (tmpfs / "filler").unlink()
    with open(mount.mnt / "f3", "ab") as stream:
        stream.write(pattern(7, 300_000))
        os.fsync(stream.fileno())
    assert (mount.mnt / "f3").read_bytes() == contents["f3"] + pattern(7, 300_000)
    result = mounts.keyd.kmsfs("fsck", "--verify", str(mount.cipher), check=False)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("names", ["encrypted", "plaintext"])
def test_a_writer_opened_on_a_full_disk_is_told_by_write(
    tmpfs: Path, mounts: MountFactory, names: str
) -> None:
    """Opened while the backing filesystem is full, a file bypasses the write-back cache
    (direct_io): write() itself returns ENOSPC, as on ext4 and gocryptfs, and nothing of
    it is shown as stored; fsync and close tell as well. An overwrite in place of
    fsync'd data is refused too: its undo record (the old chunk, kept past the end of the
    file while the chunk is rewritten, format README *Crashes*) needs room, and without it
    a kill could tear fsync'd data (ext4 and gocryptfs accept the overwrite, unprotected).
    With room again, the overwrite works and new handles write through the cache again."""
    mount = kmsfs_on(tmpfs, mounts, names)
    kept = pattern(21, 3 * MIB + 5)
    with open(mount.mnt / "kept", "wb") as stream:
        stream.write(kept)
        os.fsync(stream.fileno())
    fill_up(tmpfs)
    for name, flags in (
        ("new", os.O_WRONLY | os.O_CREAT | os.O_EXCL),
        ("kept", os.O_WRONLY | os.O_APPEND),
    ):
        fd = os.open(mount.mnt / name, flags, 0o644)
        try:
            assert outcome(os.write, fd, pattern(22, MIB)) == "ENOSPC", name
            assert outcome(os.write, fd, b"x") == "ENOSPC", name  # and again
            assert outcome(os.fsync, fd) == "ENOSPC", name
        finally:
            assert outcome(os.close, fd) == "ENOSPC", name
    assert os.stat(mount.mnt / "new").st_size == 0
    assert (mount.mnt / "new").read_bytes() == b""
    assert backing_size(mount.backing(mount.mnt / "new"))() == 0
    assert os.stat(mount.mnt / "kept").st_size == len(kept)
    assert (mount.mnt / "kept").read_bytes() == kept
    # an overwrite in place of fsync'd data is refused at write() and changes nothing
    fd = os.open(mount.mnt / "kept", os.O_RDWR)
    try:
        assert outcome(os.pwrite, fd, pattern(23, 70_000), MIB + 1000) == "ENOSPC"
        assert os.pread(fd, 80_000, MIB) == kept[MIB : MIB + 80_000]
    finally:
        outcome(os.close, fd)
    assert (mount.mnt / "kept").read_bytes() == kept
    assert "files opened for writing bypass the write-back cache" in mount.log()

    (tmpfs / "filler").unlink()
    with open(mount.mnt / "kept", "r+b") as stream:
        stream.seek(MIB + 1000)
        stream.write(pattern(23, 70_000))
        os.fsync(stream.fileno())
    kept = kept[: MIB + 1000] + pattern(23, 70_000) + kept[MIB + 71_000 :]
    with open(mount.mnt / "new", "r+b") as stream:
        stream.write(pattern(24, 3 * MIB))
        os.fsync(stream.fileno())
    with open(mount.mnt / "kept", "ab") as stream:
        stream.write(pattern(25, 300_000))
    assert "has room again: writes are cached" in mount.log()
    assert (mount.mnt / "new").read_bytes() == pattern(24, 3 * MIB)
    assert (mount.mnt / "kept").read_bytes() == kept + pattern(25, 300_000)
    mount.unmount_clean()
    result = mounts.keyd.kmsfs("fsck", "--verify", str(mount.cipher), check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_short_write_on_a_nearly_full_disk(tmpfs: Path, mounts: MountFactory) -> None:
    """Less than LOW_SPACE free: a new writer gets direct_io; its write() stores what fits
    (a short count, or ENOSPC at once) and the file then shows exactly what is stored."""
    mount = kmsfs_on(tmpfs, mounts)
    fill_up(tmpfs)
    os.truncate(tmpfs / "filler", (tmpfs / "filler").stat().st_size - 3 * MIB)
    block = pattern(26, 8 * MIB)
    fd = os.open(mount.mnt / "big", os.O_WRONLY | os.O_CREAT, 0o644)
    accepted = 0
    try:
        try:
            while accepted < len(block):
                accepted += os.write(fd, block[accepted:])
        except OSError as error:
            assert error.errno == errno.ENOSPC
        assert 0 < accepted < len(block)
        assert outcome(lambda: os.fsync(fd)) == "ENOSPC"
    finally:
        assert outcome(lambda: os.close(fd)) == "ENOSPC"
    stored = backing_size(mount.backing(mount.mnt / "big"))()
    assert stored == accepted  # write() claimed exactly what was stored
    assert os.stat(mount.mnt / "big").st_size == stored
    assert (mount.mnt / "big").read_bytes() == block[:stored]


def test_a_file_open_with_the_cache_keeps_it_on_a_full_disk(
    tmpfs: Path, mounts: MountFactory
) -> None:
    """A handle opened on the full disk while the file is open in cached mode is cached
    too, and reads the other handle's dirty pages. (A direct_io handle would read the
    backing file past them on kernels without the 2025 fix that writes dirty pages back
    before direct I/O; on 6.18 this passes either way.) Storing the overwrite of fsync'd
    data then fails (its undo record needs room): fsync and close tell, the file shows
    what is stored, and with room again the same overwrite is stored."""
    mount = kmsfs_on(tmpfs, mounts)
    old = pattern(31, 2 * MIB)
    with open(mount.mnt / "f", "wb") as stream:
        stream.write(old)
        os.fsync(stream.fileno())
    writer = os.open(mount.mnt / "f", os.O_RDWR)  # while there is room: cached
    try:
        fill_up(tmpfs)
        head = pattern(32, 65536)
        assert os.pwrite(writer, head, 0) == 65536  # a dirty page in the kernel's cache
        second = os.open(mount.mnt / "f", os.O_RDWR)
        try:
            assert os.pread(second, 65536, 0) == head
        finally:
            told = [outcome(os.close, second)]
        told.append(outcome(os.fsync, writer))
    finally:
        told.append(outcome(os.close, writer))
    # every handle open for writing is told, the writer too: the kernel's write-back of
    # the dirty page at the first close ended in a SETATTR (times) whose flush failed;
    # the writer's fsync returned 0 and its data was gone
    assert told == ["ENOSPC", "ENOSPC", "ENOSPC"]
    assert mount.log().count("storing data failed") == 1
    assert (mount.mnt / "f").read_bytes() == old
    (tmpfs / "filler").unlink()
    with open(mount.mnt / "f", "r+b") as stream:
        stream.write(head)
        os.fsync(stream.fileno())
    assert (mount.mnt / "f").read_bytes() == head + old[65536:]


def test_an_unbounded_writer_is_told(tmpfs: Path, mounts: MountFactory) -> None:
    """The review's second scenario: 200 x 1 MiB write() on a 64 MiB filesystem. The writer
    learns at the latest from every fsync and from close that its data was not stored, and
    then reads back what is stored, no more; kmsfs is measured beside the tmpfs itself."""
    baseline_dir = tmpfs / "plain"
    baseline_dir.mkdir()
    plain = unbounded_writer(
        baseline_dir / "big", "tmpfs", lambda: (baseline_dir / "big").stat().st_size
    )
    (baseline_dir / "big").unlink()
    print(plain.line())
    assert plain.first_write_error == "ENOSPC"

    mount = kmsfs_on(tmpfs, mounts)
    told = unbounded_writer(mount.mnt / "big", "kmsfs", backing_size(mount.cipher / "big"))
    print(told.line())
    assert (told.fsync1, told.fsync2, told.close) == ("ENOSPC", "ENOSPC", "ENOSPC")
    assert told.size_after == told.readable_after == told.stored
    assert told.stored < 64 * MIB
    assert mount.log().count("big: storing data failed") == 1, mount.log()
    # the file is sound and the mount goes on: space freed, the next writer succeeds
    os.unlink(mount.mnt / "big")
    (mount.mnt / "after").write_bytes(pattern(3, 5 * MIB))
    assert (mount.mnt / "after").read_bytes() == pattern(3, 5 * MIB)


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv to drop a capability")
@pytest.mark.parametrize("names", ["encrypted", "plaintext"])
def test_a_mount_that_cannot_open_by_handle_corrects_sizes_by_path(
    tmpfs: Path, mounts: MountFactory, names: str
) -> None:
    """A mount without CAP_DAC_READ_SEARCH (a user's own mount) cannot reopen a file by
    its handle to set the size the kernel shows after a failed write: it goes through the
    file's path at the mountpoint (plaintext names decrypted on the way) instead."""
    cipher = tmpfs / "cipher"
    plaintext = ["--plaintext-names"] if names == "plaintext" else []
    mounts.keyd.kmsfs("init", str(cipher), "--key", "alias/fs", *plaintext)
    no_handles = (
        "setpriv",
        "--inh-caps=-dac_read_search",
        "--bounding-set=-dac_read_search",
        "--",
    )
    mount = mounts.mount(cipher, None, wrapper=no_handles)
    (mount.mnt / "a directory").mkdir()
    path = mount.mnt / "a directory" / "big"
    told = unbounded_writer(path, "kmsfs", lambda: backing_size(mount.backing(path))())
    print(told.line())
    assert (told.fsync1, told.fsync2, told.close) == ("ENOSPC", "ENOSPC", "ENOSPC")
    assert told.size_after == told.readable_after == told.stored, mount.log()
    assert "corrected through paths at the mountpoint" in mount.log()


_libc = ctypes.CDLL(None, use_errno=True)
_libc.sync_file_range.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
SYNC_FILE_RANGE_WAIT_BEFORE, SYNC_FILE_RANGE_WRITE, SYNC_FILE_RANGE_WAIT_AFTER = 1, 2, 4


def write_back(fd: int, offset: int, length: int) -> str:
    """Have the kernel write back (only) this range of its cached pages now: WRITE
    requests for it reach the mount, none for the file's other dirty pages. 'ok' or the
    errno name sync_file_range returned."""
    flags = SYNC_FILE_RANGE_WAIT_BEFORE | SYNC_FILE_RANGE_WRITE | SYNC_FILE_RANGE_WAIT_AFTER
    if _libc.sync_file_range(fd, offset, length, flags) != 0:
        return errno.errorcode.get(ctypes.get_errno(), "?")
    return "ok"


def test_a_failure_drops_what_lies_past_a_gap_the_kernel_had_not_written_back(
    tmpfs: Path, mounts: MountFactory
) -> None:
    """The kernel writes a file's dirty pages back in no fixed order (the flusher resumes
    where it stopped, a sync starts at the beginning): a WRITE past the stored end comes
    first and the engine fills the gap with zeros. When storing fails before the WRITEs
    of the gap came, they never will (refused, every writer told): the file would read
    as zeros where the writer wrote data, followed by data (what the unbounded writer
    once read back, zeros at 54.6 MiB of a 64 MiB file). Storing is cut back to the gap,
    so the file keeps a prefix of what was written: here what was fsync'd."""
    mount = kmsfs_on(tmpfs, mounts)
    durable, first, later, last = (pattern(40 + i, MIB) for i in range(4))
    fd = os.open(mount.mnt / "f", os.O_RDWR | os.O_CREAT, 0o644)  # with room: cached
    try:
        os.pwrite(fd, durable, 0)
        os.fsync(fd)
        os.pwrite(fd, later, 2 * MIB)
        assert write_back(fd, 2 * MIB, MIB) == "ok"  # stored past a gap [1 MiB, 2 MiB)
        fill_up(tmpfs)
        os.pwrite(fd, last, 3 * MIB)
        told = [write_back(fd, 3 * MIB, MIB)]  # storing it fails: the disk is full
        os.pwrite(fd, first, MIB)  # the gap's data, in the cache after the failure
        told.append(outcome(os.fsync, fd))  # its WRITE is refused
    finally:
        told.append(outcome(os.close, fd))
    assert told == ["ENOSPC", "ENOSPC", "ENOSPC"]
    written = durable + first + later + last
    content = (mount.mnt / "f").read_bytes()
    assert content == written[: len(content)], mount.log()
    assert len(content) == os.stat(mount.mnt / "f").st_size == MIB
    assert backing_size(mount.backing(mount.mnt / "f"))() == MIB
    result = mounts.keyd.kmsfs("fsck", "--verify", str(mount.cipher), check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def gocryptfs_stored(cipher: Path) -> int:
    """Plaintext bytes of the one file in a gocryptfs cipher directory (18-byte header,
    4096-byte blocks stored with a 16-byte nonce and a 16-byte tag)."""
    (stored,) = [entry for entry in cipher.iterdir() if not entry.name.startswith("gocryptfs.")]
    blocks, rest = divmod(max(0, stored.stat().st_size - 18), 4096 + 32)
    return blocks * 4096 + max(0, rest - 32)


@pytest.mark.skipif(shutil.which("gocryptfs") is None, reason="gocryptfs is not installed")
def test_gocryptfs_on_the_same_full_disk(tmpfs: Path, short_tmp: Path) -> None:
    """The same writer on gocryptfs over the same kind of tmpfs: for the record (printed)."""
    cipher, mnt, passfile = tmpfs / "gocryptfs", short_tmp / "gmnt", short_tmp / "pass"
    cipher.mkdir()
    mnt.mkdir()
    passfile.write_text("a test passphrase\n")
    subprocess.run(
        ["gocryptfs", "-init", "-q", "-passfile", str(passfile), str(cipher)], check=True
    )
    subprocess.run(
        ["gocryptfs", "-q", "-passfile", str(passfile), str(cipher), str(mnt)], check=True
    )
    try:
        told = unbounded_writer(mnt / "big", "gocryptfs", lambda: gocryptfs_stored(cipher))
        print(told.line())
    finally:
        for _ in range(50):
            if subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True).returncode == 0:
                break
            time.sleep(0.1)
        else:
            subprocess.run(["fusermount3", "-uz", str(mnt)], capture_output=True)
    # gocryptfs has no write-back cache: write() itself is refused once the disk is full,
    # and what reads back afterwards is what is stored
    assert told.first_write_error == "ENOSPC"
    assert told.size_after == told.readable_after == told.stored
