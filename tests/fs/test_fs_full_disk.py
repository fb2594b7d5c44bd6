"""A full backing filesystem: nothing fsync'd is lost, and every writer is told.

The review's two scenarios on a 64 MiB tmpfs, side by side with the same writer on the
tmpfs itself (what ext4 and every local filesystem do: write() fails with ENOSPC) and, when
it is installed, on gocryptfs over the same tmpfs. Also ``kmsfs fsck --repair`` on what an
interrupted append leaves.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import Keyd
from tests.fs.helpers import MountFactory, cipher_chunk_offset

MIB = 1 << 20
TMPFS_SIZE = "64m"


def pattern(seed: int, length: int) -> bytes:
    import random

    return random.Random(seed).randbytes(length)


@pytest.fixture
def tmpfs() -> Iterator[Path]:
    """A fresh 64 MiB tmpfs, unmounted at teardown whatever happened."""
    path = Path(tempfile.mkdtemp(prefix="kfull-", dir="/tmp"))
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={TMPFS_SIZE},mode=0755", "tmpfs", str(path)],
        check=True,
    )
    try:
        yield path
    finally:
        for _ in range(50):
            if subprocess.run(["umount", str(path)], capture_output=True).returncode == 0:
                break
            time.sleep(0.1)
        else:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def full_disk_mounts(tmpfs: Path, fs_keyd: Keyd) -> Iterator[MountFactory]:
    """Cipher directories on the tmpfs, mountpoints beside it; all unmounted at teardown."""
    factory = MountFactory(tmpfs, fs_keyd)
    try:
        yield factory
    finally:
        factory.close()


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


def outcome(call: Callable[[], object]) -> str:
    """'ok' or the errno name of what ``call`` raised."""
    try:
        call()
    except OSError as error:
        return errno.errorcode.get(error.errno or 0, str(error.errno))
    return "ok"


@dataclass
class Told:
    """What one writer was told and what it reads back afterwards."""

    where: str
    first_write_error: str = "none"
    writes_ok: int = 0
    fsync1: str = ""
    fsync2: str = ""
    close: str = ""
    size_after: int = 0
    readable_after: int = 0
    stored: int = 0  # bytes the backing filesystem holds for the file
    notes: list[str] = field(default_factory=list)

    def line(self) -> str:
        return (
            f"{self.where}: {self.writes_ok} x 1 MiB write() ok, first failing write: "
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
                os.write(fd, block)
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
