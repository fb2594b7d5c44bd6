"""The mount's per-file structures are bounded, without a mount (see tests/fs/test_fs_memory.py)."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import trio

from kmsfs.format.header import SlotKind
from kmsfs.fs.config import FsConfig
from kmsfs.fs.keys import KeyManager
from kmsfs.fs.names import NameCipher
from kmsfs.fs.tree import MAX_WARNED, CipherTree

KEY = bytes(range(32))


def test_a_removed_name_leaves_the_name_cache(tmp_path: Path) -> None:
    cipher = NameCipher(KEY)
    directory = bytes(tmp_path)
    tree = CipherTree(directory, cipher)
    tree.write_dir_id(directory)
    entries = [tree.entry(directory, f"file-{n}".encode()) for n in range(50)]
    for entry in entries:
        assert cipher.decrypt_name(entry.dir_id, entry.encoded) == entry.name
    for entry in entries[:40]:
        tree.drop_name(directory, entry)  # as unlink, rmdir and rename do
    assert len(cipher._encrypted) == len(cipher._decrypted) == 10


def test_name_cache_is_lru_bounded() -> None:
    cipher = NameCipher(KEY, cache_size=100)
    for n in range(1000):
        cipher.encrypt_name(b"D" * 16, f"name-{n}".encode())
    assert len(cipher._encrypted) == len(cipher._decrypted) == 100


class _FakeKeyd:
    def __init__(self) -> None:
        self.decrypts = 0

    async def decrypt(self, wrapped: bytes, encryption_context: dict[str, str]) -> dict:
        self.decrypts += 1
        return {"Plaintext": b"k" * 32}


def _header(n: int) -> SimpleNamespace:
    return SimpleNamespace(
        file_id=n.to_bytes(16, "big"),
        active_slot=SimpleNamespace(wrapped_key=b"w%d" % n, kind=SlotKind.KMS_BLOB),
        full_context={},
    )


def test_key_cache_keeps_at_most_its_cap_and_evicts_the_oldest() -> None:
    keyd = _FakeKeyd()
    config = FsConfig(filesystem_id="f" * 32, key_arn="arn:aws:kms:x:1:key/k")
    keys = KeyManager(keyd, config, cache_seconds=60, max_cached_keys=4)
    for n in range(10):
        keys.remember(_header(n), b"%032d" % n)
    keys.remember(_header(6), b"%032d" % 6)  # used again: now the newest
    assert len(keys._cache) == 4

    async def unwrap_all() -> list[bytes]:
        return [await keys.unwrap(_header(n)) for n in (6, 7, 8, 9)]

    assert trio.run(unwrap_all) == [b"%032d" % n for n in (6, 7, 8, 9)]
    assert keyd.decrypts == 0  # all four from the cache
    trio.run(keys.unwrap, _header(0))
    assert keyd.decrypts == 1  # evicted: asked keyd again


def test_a_stray_known_already_costs_no_readlink(tmp_path: Path, monkeypatch) -> None:
    """The mount lists through /proc/self/fd/N paths, shown in messages as the path they
    stand for (a readlink): worked out once per listing that warns, not per stray, and
    not at all for strays warned about before (it was a readlink per stray per listing)."""
    tree = CipherTree(bytes(tmp_path), NameCipher(KEY))
    directory = tmp_path / "d"
    directory.mkdir()
    tree.write_dir_id(bytes(directory))
    for n in range(20):
        (directory / f"stray-{n}").write_bytes(b"")  # names that do not decrypt
    fd = os.open(directory, os.O_PATH | os.O_DIRECTORY)
    try:
        proc_path = b"/proc/self/fd/%d" % fd
        calls: list[object] = []
        readlink = os.readlink

        def counted(path, *args, **kwargs):
            calls.append(path)
            return readlink(path, *args, **kwargs)

        monkeypatch.setattr(os, "readlink", counted)
        entries, strays = tree.list_dir(proc_path, cache_key=7)
        assert (entries, len(strays)) == ([], 20)
        assert len(calls) == 1
        entries, strays = tree.list_dir(proc_path, cache_key=7)
        assert (entries, len(strays)) == ([], 20)
        assert len(calls) == 1
    finally:
        os.close(fd)


def test_stray_warnings_are_remembered_up_to_a_cap(tmp_path: Path) -> None:
    tree = CipherTree(bytes(tmp_path), NameCipher(KEY))
    for n in range(3 * MAX_WARNED):
        tree._warn(bytes(tmp_path), b"stray-%d" % n, "unknown kmsfs file")
    assert len(tree._warned) <= MAX_WARNED
