"""The mount's cache of data keys (``KeyManager``): a tree read again soon after it was
written or read costs no keyd round trip per file, and the cache stays bounded.

Why (issue 19): ``scripts/bench``'s read-all of its 9,448-file tree made one keyd Decrypt
per file, 0.25x of gocryptfs, against 0.63x before the cache was capped at 4,096 keys:
a cache smaller than a tree read in order gets no hit at all (each miss evicts the
oldest key, the next one the scan needs).
"""

from __future__ import annotations

import json
import os
import tracemalloc
from pathlib import Path
from types import SimpleNamespace

import trio

from kmsfs.format.header import SlotKind
from kmsfs.fs.config import FsConfig
from kmsfs.fs.keys import MAX_CACHED_KEYS, KeyManager
from tests.fs.helpers import MountFactory

#: the files of scripts/bench's small-file tree (the Python standard library, 4 copies)
BENCH_TREE_FILES = 9448
#: a wrapped data key as keyd makes it (81 bytes) and a longer one, for the memory bound
WRAPPED_SIZE = 160
#: bytes the cache may hold per key at its cap (at most 16 MiB for 65,536 keys)
BYTES_PER_KEY = 256


class _CountingKeyd:
    def __init__(self) -> None:
        self.decrypts = 0

    async def decrypt(self, wrapped: bytes, encryption_context: dict[str, str]) -> dict:
        self.decrypts += 1
        return {"Plaintext": b"%032d" % int.from_bytes(wrapped[:8], "big")}


def _header(n: int) -> SimpleNamespace:
    return SimpleNamespace(
        file_id=n.to_bytes(16, "big"),
        active_slot=SimpleNamespace(
            wrapped_key=n.to_bytes(8, "big") + bytes(WRAPPED_SIZE - 8), kind=SlotKind.KMS_BLOB
        ),
        full_context={},
    )


def _manager(keyd: _CountingKeyd) -> KeyManager:
    config = FsConfig(filesystem_id="f" * 32, key_arn="arn:aws:kms:x:1:key/k")
    return KeyManager(keyd, config, cache_seconds=60)


def test_reading_the_bench_tree_again_asks_keyd_nothing() -> None:
    """Open (unwrap) and close (remember) every file of a 9,448-file tree twice, in the
    same order, as an untar and a read-all do: the second pass is all cache hits."""
    keyd = _CountingKeyd()
    keys = _manager(keyd)

    async def one_pass() -> None:
        for n in range(BENCH_TREE_FILES):
            header = _header(n)
            data_key = await keys.unwrap(header)
            assert data_key == b"%032d" % n
            keys.remember(header, data_key)  # the last close

    trio.run(one_pass)
    assert keyd.decrypts == BENCH_TREE_FILES
    trio.run(one_pass)
    assert keyd.decrypts == BENCH_TREE_FILES, "the second pass asked keyd again"


def test_the_key_cache_at_its_cap_stays_small() -> None:
    """At most MAX_CACHED_KEYS keys, in at most BYTES_PER_KEY bytes each."""
    keys = _manager(_CountingKeyd())
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for n in range(MAX_CACHED_KEYS + 1000):
            keys.remember(_header(n), b"%032d" % n)
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(keys._cache) == MAX_CACHED_KEYS
    assert held <= MAX_CACHED_KEYS * BYTES_PER_KEY, f"{held / MAX_CACHED_KEYS:.0f} B per key"


def _decrypts(keystore: Path) -> int:
    lines = (keystore / "audit.log").read_bytes().splitlines()
    return sum(json.loads(line)["eventName"] == "Decrypt" for line in lines)


def test_a_cold_read_of_a_tree_just_written_makes_no_keyd_calls(mounts: MountFactory) -> None:
    """Real mount and keyd: write more files than the old cap (4,096), drop the kernel's
    caches, read them all in the order written: keyd's audit log shows no Decrypt."""
    mount = mounts.mount()
    files = 4500
    top = mount.mnt / "tree"
    top.mkdir()
    paths = []
    for n in range(files):
        directory = top / f"d{n // 500}"
        if n % 500 == 0:
            directory.mkdir()
        path = directory / f"f{n}"
        path.write_bytes(b"%d\n" % n)
        paths.append(path)
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")
    before = _decrypts(mount.keyd.keystore)
    for n, path in enumerate(paths):
        assert path.read_bytes() == b"%d\n" % n
    assert _decrypts(mount.keyd.keystore) - before == 0


def _read_syscalls(pid: int) -> int:
    """read/pread/readv calls the process made so far (/proc/PID/io syscr)."""
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("syscr:"):
            return int(line.split()[1])
    raise AssertionError("no syscr in /proc/PID/io")


def test_opening_a_file_reads_its_header_once(mounts: MountFactory) -> None:
    """The mount reads a file's header to ask for its key; the engine used to read and
    parse it a second time. Count the mount's read syscalls over cold opens and reads
    of small files whose keys are cached: per file one header pread, one data preadv
    and reads of /dev/fuse (LOOKUP, OPEN, READ, FLUSH, RELEASE...): 8.01 per file
    measured, 9.01 when the engine read the header again."""
    mount = mounts.mount()
    assert mount.process is not None
    files = 300
    top = mount.mnt / "small"
    top.mkdir()
    for n in range(files):
        (top / f"f{n}").write_bytes(b"%d\n" % n)
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")
    before = _read_syscalls(mount.process.pid)
    for n in range(files):
        assert (top / f"f{n}").read_bytes() == b"%d\n" % n
    per_file = (_read_syscalls(mount.process.pid) - before) / files
    assert per_file < 8.5, f"{per_file:.2f} read calls per file"


def test_cached_answers_only_what_unwrap_would_from_the_cache() -> None:
    """KeyManager.cached (the mount's open without a wait): the key once keyd gave it
    and the file was closed, per principal, None after cache_seconds."""
    now = [0.0]
    keyd = _CountingKeyd()
    config = FsConfig(filesystem_id="f" * 32, key_arn="arn:aws:kms:x:1:key/k")
    keys = KeyManager(keyd, config, cache_seconds=60, clock=lambda: now[0])
    header = _header(7)
    assert keys.cached(header) is None
    data_key = trio.run(keys.unwrap, header)
    assert keys.cached(header) is None  # the mount's own answers are kept from the close
    keys.remember(header, data_key)
    assert keys.cached(header) == data_key
    assert keys.cached(_header(8)) is None
    now[0] = 61.0
    assert keys.cached(header) is None
    assert keyd.decrypts == 1
