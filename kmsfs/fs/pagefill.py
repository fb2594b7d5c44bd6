"""The rest of a decrypted chunk goes to the kernel's page cache (issue 19).

A read smaller than a chunk (fio's random 4 KiB reads, a database's pages, `file`
reading a header) still costs the mount a whole chunk: AES-GCM authenticates a chunk as
one piece, so all 64 KiB are read from the backing file and decrypted to answer 4 KiB,
and the kernel then caches only the pages it asked for. gocryptfs, with 4 KiB blocks,
decrypts little more than it is asked for. kmsfs keeps the chunk it had to decrypt
anyway: after such a read the whole chunk is handed to the kernel with FUSE's
NOTIFY_STORE (``pyfuse3.notify_store``), so the chunk's other pages are read from the
page cache without a FUSE request, as pages the kernel's read-ahead had fetched would be.

Why a thread: the kernel locks each page it stores into. The page of the READ being
answered is locked until its reply is written, and so is any page another reader is
waiting for; the mount's only request thread must not wait for those. One thread does
the stores, each after the mount has moved on.

When it is safe (the callers in ``ops.py`` keep to this):

- NOTIFY_STORE overwrites whatever the page cache holds, dirty pages included, and grows
  the kernel's idea of the file's size if the data reaches past it. So a store is only
  offered while no handle of the file is open for writing (none has dirty pages: FLUSH
  writes them back before close, and a writable mmap keeps its handle open), for a chunk
  wholly inside the file;
- and nothing that changes the file may start while a store for it is still queued: an
  open for writing and a truncate wait for the file's stores (:meth:`ChunkFiller.settle`,
  which barely waits: stores take microseconds), and new ones are barred meanwhile
  (:meth:`ChunkFiller.bar`). The last release keeps the backing file open until the
  file's stores are done (:meth:`ChunkFiller.hold_open`), so a store never reaches a
  file that took over a freed inode number.

What it costs: a copy of up to 64 KiB into the kernel per small read that misses the
cache, done by the second thread; memory the kernel may reclaim like any clean page.
At most ``MAX_PENDING`` chunks wait; beyond that a chunk is not offered (a store is a
hint: the kernel asks again for what it does not have).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import queue
import threading
from collections.abc import AsyncIterator, Callable

import pyfuse3
import trio

log = logging.getLogger(__name__)

#: chunks waiting for the storing thread at most (64 KiB each)
MAX_PENDING = 64

#: how often a waiter looks again while a file's stores are queued; a store takes
#: microseconds unless the kernel holds one of its pages for a READ in the mount's queue
SETTLE_POLL_SECONDS = 0.0002

#: how long a stopping mount waits for the store under way (it normally takes microseconds)
DRAIN_SECONDS = 5.0

Store = Callable[[int, int, bytes | bytearray | memoryview], None]


class ChunkFiller:
    """Hands decrypted chunks to the kernel's page cache from a thread of its own."""

    def __init__(
        self,
        store: Store | None = None,
        max_pending: int = MAX_PENDING,
        *,
        enabled: bool = True,
    ) -> None:
        self._store: Store = store if store is not None else pyfuse3.notify_store
        self._max_pending = max_pending
        self._queue: queue.SimpleQueue[tuple[int, int, bytearray] | None] = queue.SimpleQueue()
        self._lock = threading.Lock()  # _pending and _total, shared with the thread
        #: inode -> its stores queued or in progress
        self._pending: dict[int, int] = {}
        self._total = 0
        #: inode -> how many requests wait for its stores (no new ones meanwhile)
        self._barred: dict[int, int] = {}
        #: inode -> descriptors of its backing file kept open until its stores are done
        self._held: dict[int, list[int]] = {}
        self._thread: threading.Thread | None = None
        self._stopped = False
        #: False when off (an Operations without a FUSE session), once the kernel refused
        #: NOTIFY_STORE (ENOSYS) and once the filler stopped
        self.enabled = enabled
        # counters for the memory/activity report
        self.stored = 0
        self.dropped = 0  # not offered: too many pending
        self.failed = 0

    def accepts(self, ino: int) -> bool:
        """Whether a chunk of ``ino`` may be offered now (the caller checked the file)."""
        return self.enabled and ino not in self._barred and self._total < self._max_pending

    def offer(self, ino: int, offset: int, data: bytearray) -> None:
        """Queue ``data`` (which the caller hands over and no longer changes) for the
        page cache of ``ino`` at ``offset``."""
        with self._lock:
            if self._total >= self._max_pending:
                self.dropped += 1
                return
            self._pending[ino] = self._pending.get(ino, 0) + 1
            self._total += 1
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="kmsfs-pagefill", daemon=True)
            self._thread.start()
        self._queue.put((ino, offset, data))

    def busy(self, ino: int) -> bool:
        """Whether stores for ``ino`` are queued or in progress."""
        return ino in self._pending

    def hold_open(self, ino: int, fd: int) -> None:
        """If stores for ``ino`` are queued, keep a duplicate of ``fd`` (its backing file)
        open until they are done: the file's inode number cannot pass to another file
        while a store may still reach it."""
        if ino not in self._pending:
            return
        with self._lock:
            if ino in self._pending:
                self._held.setdefault(ino, []).append(os.dup(fd))

    async def settle(self, ino: int) -> None:
        """Return once no store for ``ino`` is queued or in progress.

        Polls rather than blocks: the store may be waiting for a page that a READ in the
        mount's own queue holds, which this trio thread must stay free to answer.
        """
        while ino in self._pending:
            await trio.sleep(SETTLE_POLL_SECONDS)

    def bar(self, ino: int) -> None:
        """No new store for ``ino`` until :meth:`unbar` (for a change of the file: open
        for writing, truncate; it then awaits :meth:`settle` for the ones queued)."""
        self._barred[ino] = self._barred.get(ino, 0) + 1

    def unbar(self, ino: int) -> None:
        left = self._barred[ino] - 1
        if left:
            self._barred[ino] = left
        else:
            del self._barred[ino]

    @contextlib.asynccontextmanager
    async def barred(self, ino: int) -> AsyncIterator[None]:
        """For a change of ``ino`` (open for writing, truncate): no new store of it while
        the block runs, and the ones queued are done before it starts."""
        self.bar(ino)
        try:
            await self.settle(ino)
            yield
        finally:
            self.unbar(ino)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            ino, offset, data = item
            try:
                if self.enabled:
                    self._store(ino, offset, data)
                    self.stored += 1
            except OSError as error:
                self.failed += 1
                if error.errno == errno.ENOSYS:
                    log.info("the kernel does not take pages from the mount (NOTIFY_STORE)")
                    self.enabled = False
                elif error.errno != errno.ENOENT:  # ENOENT: the kernel forgot the inode
                    log.debug("storing pages of inode %d: %s", ino, error)
            except Exception:
                self.failed += 1
                log.exception("storing pages of inode %d", ino)
            finally:
                held: list[int] = []
                with self._lock:
                    left = self._pending[ino] - 1
                    if left:
                        self._pending[ino] = left
                    else:
                        del self._pending[ino]
                        held = self._held.pop(ino, held)
                    self._total -= 1
                for fd in held:
                    os.close(fd)

    async def drain(self, timeout: float = DRAIN_SECONDS) -> None:
        """Take no more chunks and wait, still serving requests, for the store under way.

        Before the mount stops answering requests (SIGTERM): a store may wait for a page
        that a queued READ holds locked, and once the mount no longer answers, nothing
        would unlock it. Not even closing /dev/fuse would: the store's own write() holds
        the device open, so the kernel never aborts the connection, and the mount's
        process could not exit (seen: a mount stuck in the kernel after SIGTERM while
        readers kept reading). Queued chunks are dropped.
        """
        self.enabled = False
        with trio.move_on_after(timeout):
            while self._total:
                await trio.sleep(SETTLE_POLL_SECONDS)
        if self._total:
            log.warning("a page-cache store did not finish within %.0f s", timeout)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop taking chunks and end the thread (before the FUSE session closes: a store
        after that would use a session that is gone). The mount calls :meth:`drain`
        first, while it still answers requests."""
        self.enabled = False
        if self._stopped:
            return
        self._stopped = True
        thread = self._thread
        if thread is not None:
            self._queue.put(None)
            thread.join(timeout)
            if thread.is_alive():
                log.warning("the page-cache thread did not stop within %.0f s", timeout)
                return
        with self._lock:
            held = [fd for fds in self._held.values() for fd in fds]
            self._held.clear()
        for fd in held:
            os.close(fd)
