"""The FSYNC handler fsyncs the backing file in a thread: other requests go on meanwhile."""

from __future__ import annotations

import os
import threading
from types import SimpleNamespace

import trio

from kmsfs.fs import ops as ops_module
from kmsfs.fs.ops import Operations
from kmsfs.fs.polling import BusyPoller


class _Engine:
    size = 7
    marked: list[int] = []

    def flush(self) -> None:
        pass

    def mark_durable(self, size: int) -> None:
        self.marked.append(size)

    def fsync(self) -> None:  # what EncryptedFile.fsync does
        self.flush()
        os.fsync(_OpenFile.fd)


class _OpenFile:
    fd = 12345
    engine = _Engine()
    write_error = 0
    gaps: list[tuple[int, int]] = []  # noqa: RUF012 (never mutated: fsync replaces it)


def test_fsync_of_the_backing_file_does_not_hold_up_other_requests(monkeypatch) -> None:
    """The backing fsync blocks until another request has run: only possible if it runs
    off the trio thread (on it, this would deadlock and the deadline fail the test)."""
    operations = Operations.__new__(Operations)  # only what FSYNC touches
    operations.poller = BusyPoller(0)
    operations.inodes = SimpleNamespace(trim_dir_fds=lambda: None)  # every handler calls it
    operations._handles = {1: _OpenFile()}
    operations._write_errors = {}
    other_request_ran = threading.Event()
    synced: list[int] = []

    def slow_fsync(fd: int) -> None:
        assert other_request_ran.wait(timeout=10), "no other request ran during the fsync"
        assert not _Engine.marked  # only what an fsync that returned covered is durable
        synced.append(fd)

    monkeypatch.setattr(ops_module.os, "fsync", slow_fsync)

    async def other_request() -> None:
        await trio.sleep(0)
        other_request_ran.set()

    async def main() -> None:
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(operations.fsync, 1, False)
                nursery.start_soon(other_request)

    trio.run(main)
    assert synced == [12345]
    assert _Engine.marked == [7]  # the engine was told: its rewrites of it keep a copy
