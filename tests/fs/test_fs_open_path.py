"""The open path of the mount (Operations._open_node) in-process, on a real backing file:
what it opens and reads when a key must come from keyd, and what it gives when the file
changes while the open waits for the node's lock."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import trio

from kmsfs.fs import ops as ops_module
from kmsfs.fs.inodes import Node
from kmsfs.fs.ops import Operations

_KEY = b"k" * 32


class _Keys:
    """A key cache that never holds the key; ``on_miss`` runs when it is asked."""

    def __init__(self, on_miss=lambda: None) -> None:
        self.on_miss = on_miss
        self.unwrapped: list[bytes] = []

    def cached(self, header, caller=None):
        self.on_miss()
        return None

    async def unwrap(self, header, caller=None) -> bytes:
        await trio.sleep(0)  # keyd's round trip
        self.unwrapped.append(header)
        return _KEY


@pytest.fixture
def dir_fd(tmp_path: Path):
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    yield fd
    os.close(fd)


def _operations(
    tmp_path: Path, dir_fd: int, keys: _Keys, monkeypatch
) -> tuple[Operations, Node, list]:
    """An Operations with only what _open_node touches; its file ``tmp_path/f``; the list
    of (header, disk_size) that _adopt was given."""
    operations = Operations.__new__(Operations)
    operations.read_only = False
    operations.keys = keys
    operations.inodes = SimpleNamespace(
        path=lambda ino: os.fsencode(tmp_path / "f"), entry_at=lambda ino: (dir_fd, b"f")
    )
    adopted: list[tuple[bytes | None, int | None]] = []

    def adopt(node, fd, provider, path, writable, header=None, disk_size=None):
        adopted.append((header, disk_size))
        assert provider.data_key == (_KEY if header is not None else None)
        node.open_file = SimpleNamespace(fd=fd)
        return node.open_file

    operations._adopt = adopt
    # the header: the file's first 8 bytes (the parsing is the format's business)
    monkeypatch.setattr(ops_module, "read_header", lambda fd: os.pread(fd, 8, 0))
    node = Node(2, os.stat(tmp_path / "f").st_ino)
    return operations, node, adopted


def test_an_open_that_asks_keyd_opens_the_backing_file_once(
    tmp_path: Path, dir_fd: int, monkeypatch
) -> None:
    """The first attempt (key cached?) used to close the backing file when the key was
    not cached, and the locked path opened it again: two opens and two closes per file."""
    (tmp_path / "f").write_bytes(b"HEADER-1" + b"x" * 100)
    keys = _Keys()
    operations, node, adopted = _operations(tmp_path, dir_fd, keys, monkeypatch)
    opens: list[bytes] = []
    real_open = os.open

    def counting_open(path, flags, mode=0o777, *, dir_fd=None):
        fd = real_open(path, flags, mode, dir_fd=dir_fd)
        if path == b"f":
            opens.append(path)
        return fd

    monkeypatch.setattr(ops_module.os, "open", counting_open)
    open_file = trio.run(operations._open_node, node)
    try:
        assert opens == [b"f"]
        assert adopted == [(b"HEADER-1", 108)]
        assert keys.unwrapped == [b"HEADER-1"]
        assert os.fstat(open_file.fd).st_ino == node.st_ino
    finally:
        os.close(open_file.fd)


def test_a_truncate_while_the_open_waits_for_the_lock_is_seen(
    tmp_path: Path, dir_fd: int, monkeypatch
) -> None:
    """A truncate of a closed file takes no node lock (os.truncate by path): one that
    lands after the first attempt read the header opens the file as empty, no stale
    header or size handed on, and no key asked for."""
    path = tmp_path / "f"
    path.write_bytes(b"HEADER-1" + b"x" * 100)
    keys = _Keys(on_miss=lambda: os.truncate(path, 0))
    operations, node, adopted = _operations(tmp_path, dir_fd, keys, monkeypatch)
    open_file = trio.run(operations._open_node, node)
    try:
        assert adopted == [(None, 0)]
        assert keys.unwrapped == []
    finally:
        os.close(open_file.fd)


def test_a_file_rewritten_while_the_open_waits_gives_the_new_header(
    tmp_path: Path, dir_fd: int, monkeypatch
) -> None:
    """Same size, new header (another open wrote and closed it meanwhile): the key
    asked for is the new header's."""
    path = tmp_path / "f"
    path.write_bytes(b"HEADER-1" + b"x" * 100)

    def rewrite() -> None:
        with open(path, "r+b") as file:
            file.write(b"HEADER-2")

    keys = _Keys(on_miss=rewrite)
    operations, node, adopted = _operations(tmp_path, dir_fd, keys, monkeypatch)
    open_file = trio.run(operations._open_node, node)
    try:
        assert adopted == [(b"HEADER-2", 108)]
        assert keys.unwrapped == [b"HEADER-2"]
    finally:
        os.close(open_file.fd)


def test_a_file_opened_by_another_request_meanwhile_is_shared(
    tmp_path: Path, dir_fd: int, monkeypatch
) -> None:
    """Another open of the node finished while this one waited: its OpenFile is used and
    the backing file this attempt opened is closed (no fd left behind)."""
    (tmp_path / "f").write_bytes(b"HEADER-1" + b"x" * 100)
    operations, node, adopted = _operations(tmp_path, dir_fd, _Keys(), monkeypatch)
    other = SimpleNamespace(fd=-1)
    operations._checked = _returns(other)
    keys = operations.keys
    keys.on_miss = lambda: setattr(node, "open_file", other)
    fds_before = len(os.listdir("/proc/self/fd"))
    assert trio.run(operations._open_node, node) is other
    assert len(os.listdir("/proc/self/fd")) == fds_before
    assert adopted == []


def _returns(value):
    async def checked(open_file, caller):
        return value

    return checked
