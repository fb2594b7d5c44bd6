"""Faults: keyd gone, a key disabled, damaged ciphertext, a killed mount.

Whatever happens, the mount process stays up and the files not concerned keep working.
"""

from __future__ import annotations

import errno
import os
import subprocess
import time
from pathlib import Path

import pytest

from tests.fs.conftest import FaultEnv
from tests.fs.helpers import (
    CHUNK,
    Mount,
    MountFactory,
    cipher_chunk_offset,
    drop_page_cache,
    file_key_aliases,
    flip_byte,
    is_mounted,
    root_binding_by_default,
)


def errno_of(function, *args) -> int:
    with pytest.raises(OSError) as caught:
        function(*args)
    return caught.value.errno


def assert_healthy(mount: Mount, witness: Path, content: bytes) -> None:
    """The mount process is alive and a file it can read still reads."""
    assert mount.alive, f"the mount process died:\n{mount.log()}"
    assert witness.read_bytes() == content
    os.listdir(mount.mnt)


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = predicate()
        except OSError:
            result = None
        if result:
            return result
        if time.monotonic() > deadline:
            return None
        time.sleep(interval)


# ------------------------------------------------------------------ keyd down
def test_keyd_down_gives_eio_then_recovers(fault_env: FaultEnv) -> None:
    keyd, mounts = fault_env.keyd, fault_env.mounts
    mount = mounts.mount(None, None, "--key-cache-seconds", "1")
    closed, held = mount.mnt / "closed", mount.mnt / "held"
    closed.write_bytes(b"closed file " * 1000)
    held.write_bytes(b"held open " * 1000)
    held_fd = os.open(held, os.O_RDWR)
    try:
        keyd.stop()
        time.sleep(2.5)  # past the key cache and the key pool's lifetime
        assert errno_of(os.open, closed, os.O_RDONLY) == errno.EIO
        assert errno_of(os.open, closed, os.O_RDONLY) == errno.EIO
        assert mount.alive, mount.log()
        # what needs no key still works
        assert os.stat(closed).st_size == len(b"closed file " * 1000)
        assert sorted(os.listdir(mount.mnt)) == ["closed", "held"]
        (mount.mnt / "newdir").mkdir()
        (mount.mnt / "empty").write_bytes(b"")  # an empty file has no key yet
        os.rename(mount.mnt / "empty", mount.mnt / "newdir" / "empty")
        # a file open before keyd went keeps its key
        drop_page_cache(held)
        assert os.pread(held_fd, 20, 0) == b"held open held open "
        os.pwrite(held_fd, b"HELD", 0)
        os.fsync(held_fd)
        # a new file's first bytes need a new data key: the error must reach the writer
        fd = os.open(mount.mnt / "newdir" / "fresh", os.O_CREAT | os.O_WRONLY, 0o600)
        try:
            with pytest.raises(OSError) as caught:
                os.write(fd, b"no key for me")
                os.fsync(fd)
            assert caught.value.errno == errno.EIO
        finally:
            try:
                os.close(fd)
            except OSError:
                pass
        assert mount.alive, mount.log()
        log = mount.log()
        assert log.count("keyd unreachable") == 1, log

        keyd.start()
        # recovery by itself: no remount, no signal
        recovered = wait_until(lambda: closed.read_bytes(), timeout=10)
        assert recovered == b"closed file " * 1000, mount.log()
        (mount.mnt / "after").write_bytes(b"written after recovery")
        drop_page_cache(mount.mnt / "after")
        assert (mount.mnt / "after").read_bytes() == b"written after recovery"
        assert os.pread(held_fd, 4, 0) == b"HELD"
    finally:
        os.close(held_fd)
    assert mount.alive
    mount.remount()
    assert (mount.mnt / "held").read_bytes()[:14] == b"HELD open held"
    assert (mount.mnt / "after").read_bytes() == b"written after recovery"


# ------------------------------------------------------------------ disabled key
def test_disabled_key_gives_eacces_after_cache_time(fault_env: FaultEnv) -> None:
    keyd, mounts = fault_env.keyd, fault_env.mounts
    mount = mounts.mount(None, None, "--key-cache-seconds", "1")
    path = mount.mnt / "file"
    path.write_bytes(b"protected " * 100)
    held = mount.mnt / "held"
    held.write_bytes(b"held")
    held_fd = os.open(held, os.O_RDONLY)
    try:
        for alias in file_key_aliases():
            keyd.kmsfs("keys", "disable", alias)
        time.sleep(2.5)
        assert errno_of(os.open, path, os.O_RDONLY) == errno.EACCES
        assert errno_of(os.open, path, os.O_RDWR) == errno.EACCES
        assert mount.alive, mount.log()
        if root_binding_by_default():
            # the root's names are under the bound CMK too: its whole subtree is refused
            assert errno_of(os.stat, path) == errno.EACCES
            new = mount.mnt / "new"
            assert errno_of(os.open, new, os.O_CREAT | os.O_WRONLY, 0o600) == errno.EACCES
        else:
            assert os.stat(path).st_size == 1000  # metadata needs no key
            # a new file cannot get a data key from a disabled CMK
            fd = os.open(mount.mnt / "new", os.O_CREAT | os.O_WRONLY, 0o600)
            try:
                with pytest.raises(OSError) as caught:
                    os.write(fd, b"x")
                    os.fsync(fd)
                assert caught.value.errno in (errno.EACCES, errno.EIO)
            finally:
                try:
                    os.close(fd)
                except OSError:
                    pass
        # what was open before keeps working until closed (documented)
        os.posix_fadvise(held_fd, 0, 0, os.POSIX_FADV_DONTNEED)
        assert os.pread(held_fd, 10, 0) == b"held"

        for alias in file_key_aliases():
            keyd.kmsfs("keys", "enable", alias)
        assert wait_until(lambda: path.read_bytes(), timeout=5) == b"protected " * 100
        (mount.mnt / "new2").write_bytes(b"works again")
        assert (mount.mnt / "new2").read_bytes() == b"works again"
    finally:
        os.close(held_fd)
    assert mount.alive


# ------------------------------------------------------------------ damaged ciphertext
def test_flipped_byte_in_one_chunk(mounts: MountFactory) -> None:
    mount = mounts.mount()
    data = os.urandom(8 * CHUNK + 1000)
    path = mount.mnt / "damaged"
    path.write_bytes(data)
    witness = mount.mnt / "witness"
    witness.write_bytes(b"still fine")
    backing = mount.backing(path)
    time.sleep(0.2)  # let the release of the last handle reach the mount
    flip_byte(backing, cipher_chunk_offset(3) + 12 + 1234)  # inside chunk 3's ciphertext
    flip_byte(backing, cipher_chunk_offset(8) + 12 + 10)  # inside the short last chunk

    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)  # no readahead into chunk 3
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        for index in (0, 1, 2, 4, 5, 6, 7):
            offset = index * CHUNK
            assert os.pread(fd, CHUNK, offset) == data[offset : offset + CHUNK], index
        assert errno_of(os.pread, fd, 100, 3 * CHUNK + 5000) == errno.EIO
        assert errno_of(os.pread, fd, 10, 8 * CHUNK) == errno.EIO
        # a read across chunks 2 and 3: an error, or a short read that stops before chunk 3
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        try:
            across = os.pread(fd, 2 * CHUNK, 2 * CHUNK)
        except OSError as error:
            assert error.errno == errno.EIO
        else:
            assert len(across) <= CHUNK and across == data[2 * CHUNK : 2 * CHUNK + len(across)]
        # the neighbours still read after the errors
        assert os.pread(fd, 100, 4 * CHUNK) == data[4 * CHUNK : 4 * CHUNK + 100]
        assert os.pread(fd, 100, 3 * CHUNK - 100) == data[3 * CHUNK - 100 : 3 * CHUNK]
    finally:
        os.close(fd)
    with pytest.raises(OSError) as caught:
        drop_page_cache(path)
        path.read_bytes()
    assert caught.value.errno == errno.EIO
    assert_healthy(mount, witness, b"still fine")
    log = mount.log()
    assert "chunk 3" in log, log
    assert "damaged" in log or "/" in log  # names where it happened


def test_corrupt_header_gives_eio_at_open(mounts: MountFactory) -> None:
    mount = mounts.mount()
    names = ["magic", "file-id", "wrapped-key", "truncated"]
    for name in names:
        (mount.mnt / name).write_bytes(b"content of " + name.encode() + bytes(5000))
    witness = mount.mnt / "witness"
    witness.write_bytes(b"still fine")
    backings = {name: mount.backing(mount.mnt / name) for name in names}
    mount.remount()  # nothing cached: the kernel's pages and the mount's keys are gone
    flip_byte(backings["magic"], 0)
    flip_byte(backings["file-id"], 20)
    flip_byte(backings["wrapped-key"], 576 + 100)  # inside key slot 0
    os.truncate(backings["truncated"], 1000)  # shorter than a header
    for name in names:
        assert errno_of(os.open, mount.mnt / name, os.O_RDONLY) == errno.EIO, name
        assert mount.alive, mount.log()
    os.stat(mount.mnt / "magic")  # stat needs no header
    assert_healthy(mount, witness, b"still fine")


# ------------------------------------------------------------------ kill -9
def test_kill9_then_remount_keeps_fsynced_files(mounts: MountFactory) -> None:
    mount = mounts.mount()
    synced: dict[str, bytes] = {}
    (mount.mnt / "dir").mkdir()
    for index, size in enumerate([1, CHUNK - 1, CHUNK, CHUNK + 1, 5 * CHUNK + 77, 1 << 20]):
        name = f"dir/synced-{index}"
        content = os.urandom(size)
        fd = os.open(mount.mnt / name, os.O_CREAT | os.O_WRONLY, 0o640)
        try:
            os.write(fd, content)
            os.fsync(fd)
        finally:
            os.close(fd)
        synced[name] = content
    # rewritten in place, then fsync'ed
    fd = os.open(mount.mnt / "dir/synced-4", os.O_RDWR)
    try:
        os.pwrite(fd, b"PATCHED", CHUNK - 3)
        os.fsync(fd)
    finally:
        os.close(fd)
    patched = bytearray(synced["dir/synced-4"])
    patched[CHUNK - 3 : CHUNK + 4] = b"PATCHED"
    synced["dir/synced-4"] = bytes(patched)
    # renamed, with the directory fsync'ed: the new name survives
    os.rename(mount.mnt / "dir/synced-0", mount.mnt / "dir/renamed-0")
    synced["dir/renamed-0"] = synced.pop("dir/synced-0")
    directory = os.open(mount.mnt / "dir", os.O_RDONLY | os.O_DIRECTORY)
    os.fsync(directory)
    os.close(directory)
    # files with writes in flight at the kill: anything may be lost, nothing may break
    dirty = os.open(mount.mnt / "dirty", os.O_CREAT | os.O_WRONLY, 0o600)
    os.write(dirty, os.urandom(3 * CHUNK + 5))
    held = os.open(mount.mnt / "dir/synced-1", os.O_RDONLY)

    mount.kill9()
    try:
        assert errno_of(os.listdir, mount.mnt) == errno.ENOTCONN
    finally:
        for fd in (dirty, held):
            try:
                os.close(fd)
            except OSError:
                pass
    result = subprocess_run(["fusermount3", "-u", str(mount.mnt)])
    assert not is_mounted(mount.mnt), result
    mount.start()
    for name, content in synced.items():
        assert (mount.mnt / name).read_bytes() == content, name
        assert stat_mode(mount.mnt / name) == 0o640
    try:
        (mount.mnt / "dirty").read_bytes()
    except OSError as error:
        assert error.errno == errno.EIO  # a torn last chunk is reported, not served
    assert mount.alive, mount.log()
    (mount.mnt / "dirty").write_bytes(b"rewritten")
    assert (mount.mnt / "dirty").read_bytes() == b"rewritten"


def subprocess_run(argv: list[str]) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    return f"{argv} exited {done.returncode}: {done.stderr}"


def stat_mode(path: Path) -> int:
    return os.stat(path).st_mode & 0o7777
