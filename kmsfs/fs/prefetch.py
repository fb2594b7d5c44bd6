"""Read the backing file ahead of a sequential reader, on a helper thread.

Why: on a cold sequential read the mount spent most of its time (74–87% of its samples,
perf, 1 MiB READs) in the ``pread`` of the backing file, copying page-cache pages that
the disk had just filled. The first touch of such pages is slow on this kind of VM, and
varies from run to run (cold 1 GiB reads by hand: 0.5 to 1.8 GB/s). The mount serves
requests on one thread, so that copy, the decryption and the reply to the kernel took
turns. gocryptfs gets the overlap from serving several READs at once on several threads.

How: a helper thread reads the ciphertext ahead of the reader into *segments*: buffers of
one MiB worth of chunks, aligned on chunk boundaries (a 1 MiB READ at a 1 MiB boundary
is exactly one segment). The mount's engine then takes its ciphertext from a segment
instead of calling ``pread`` itself (:meth:`Stream.lookup`, wired in as the engine's
``cipher_cache``), and only authenticates and decrypts it, which is cheap. The pread
releases the GIL, so the helper's copy runs on the other core while the mount replies.
Before reading a segment the helper also asks the kernel for the range further ahead
(``POSIX_FADV_WILLNEED``) so the disk works on it asynchronously.

Why it cannot return stale data: the engine counts its writes to the backing file
(``disk_generation``, raised after every pwrite, hole write and truncation has finished).
The helper notes that count before its pread; a segment is used only while the count is
unchanged, so any write that could have overlapped the pread makes it void. Everything
the engine keeps in memory (the held tail, the held interior chunk) is overlaid on the
decrypted ciphertext exactly as on the ``pread`` path. And every chunk is still
authenticated by the engine: a segment is ciphertext, never trusted plaintext.

Where it stops: segments hold ciphertext only. At most :data:`AHEAD_SEGMENTS` per stream
and :data:`MAX_BUFFERS` for the whole mount; buffers are recycled warm, and at most
:data:`AHEAD_SEGMENTS` are kept once their readers are gone. Each stream gets
its own duplicate of the backing fd, used and closed only by the helper thread in queue
order, so a file closed meanwhile is never read through a reused fd.
"""

from __future__ import annotations

import logging
import mmap
import os
import queue
import threading
from typing import Any

from kmsfs.format.file import hole_prefix
from kmsfs.format.offsets import CHUNK_OVERHEAD, HEADER_SIZE, cipher_offset

log = logging.getLogger("kmsfs.mount")

#: reads of at least this size that continue the previous one start the helper
SEQUENTIAL_MIN = 128 << 10
#: plaintext bytes per segment (rounded to whole chunks)
SEGMENT_PLAINTEXT = 1 << 20
#: segments the helper keeps ready ahead of a reader
AHEAD_SEGMENTS = 8
#: how far ahead of the reader the disk is asked to work (POSIX_FADV_WILLNEED)
ADVISE_AHEAD = 16 << 20
#: segment buffers for the whole mount (each about 1 MiB)
MAX_BUFFERS = 48
#: how long the mount waits for a segment the helper is reading before reading itself
WAIT_SECONDS = 5.0


class Segment:
    """Ciphertext of chunks ``[index * G, (index + 1) * G)``, once ``done`` is set."""

    __slots__ = ("offset", "buffer", "fd", "length", "generation", "done", "dropped")

    def __init__(self, offset: int, buffer: mmap.mmap, fd: int) -> None:
        self.offset = offset  # in the backing file
        self.buffer = buffer
        self.fd = fd  # the stream's duplicate fd, closed by the helper after this
        self.length = -1  # bytes read; -1 until done, or when the read failed
        self.generation = -1  # the engine's disk_generation before the read
        self.done = threading.Event()
        self.dropped = False  # the mount no longer wants it: the helper skips it


class Stream:
    """One open file's sequential reader: where it is and the segments read for it.

    Its methods run on the mount's thread; the helper only fills segments.
    """

    __slots__ = ("engine", "next_offset", "fd", "segments", "segment_bytes", "advised_to",
                 "joined", "hits")  # fmt: skip

    def __init__(self, engine: Any) -> None:
        self.engine = engine  # the EncryptedFile: its disk_generation and cipher_cache
        self.next_offset = -1  # plaintext offset a sequential read would start at
        self.fd: int | None = None  # the helper's duplicate of the backing fd
        self.segments: dict[int, Segment] = {}
        self.segment_bytes = 0  # ciphertext bytes per segment
        self.advised_to = 0  # ciphertext offset the disk has been asked to reach
        self.joined = bytearray()  # a request spanning two segments is copied here
        self.hits = 0  # preads served from segments, for tests

    def lookup(self, offset: int, length: int, generation: int) -> memoryview | None:
        """Ciphertext ``[offset, offset + length)`` from the segments, or None.

        Waits for a segment the helper has yet to finish (the mount would otherwise
        block on the same pread itself). None if any part is missing, failed or older
        than the engine's last write (the next :meth:`Prefetcher.after_read` drops
        those): the engine then reads for itself.
        """
        size = self.segment_bytes
        relative = offset - HEADER_SIZE
        if size == 0 or relative < 0 or length <= 0:
            return None
        first = relative // size
        last = (relative + length - 1) // size
        found = []
        for index in range(first, last + 1):
            segment = self.segments.get(index)
            if segment is None:
                return None
            if not segment.done.is_set() and not segment.done.wait(WAIT_SECONDS):
                return None
            if segment.generation != generation:
                return None  # the file changed since
            found.append(segment)
        low = relative - first * size
        if first == last:
            segment = found[0]
            if low + length > segment.length:
                return None
            self.hits += 1
            return memoryview(segment.buffer)[low : low + length]
        if len(self.joined) < length:
            self.joined = bytearray(length)
        out = memoryview(self.joined)[:length]
        position = 0
        for segment in found:
            start = low if position == 0 else 0
            piece = min(length - position, size - start)
            if start + piece > segment.length:
                return None
            out[position : position + piece] = memoryview(segment.buffer)[start : start + piece]
            position += piece
        self.hits += 1
        return out


class Prefetcher:
    """One helper thread for the mount; its public methods run on the mount's thread."""

    def __init__(
        self,
        *,
        ahead: int = AHEAD_SEGMENTS,
        max_buffers: int = MAX_BUFFERS,
        max_spare: int = AHEAD_SEGMENTS,
    ) -> None:
        self.ahead = ahead
        self.max_buffers = max_buffers
        self.max_spare = max_spare  # recycled buffers kept warm for the next reader
        self.requested = 0  # segments asked for, for tests
        self.done = 0  # segments the helper has read, for tests
        self._buffers = 0  # buffers allocated (in segments or spare)
        self._spare: list[mmap.mmap] = []  # recycled buffers, still warm
        self._spare_lock = threading.Lock()
        self._queue: queue.SimpleQueue[tuple[str, Any, Any] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def after_read(self, stream: Stream, fd: int, offset: int, size: int, chunk_size: int) -> None:
        """Note a READ of ``size`` bytes at ``offset``; keep the helper ahead if sequential."""
        sequential = offset == stream.next_offset
        stream.next_offset = end = offset + size
        if self.ahead <= 0:
            return
        group = max(1, SEGMENT_PLAINTEXT // chunk_size)
        segment_bytes = group * (chunk_size + CHUNK_OVERHEAD)
        stream.segment_bytes = segment_bytes
        here = (end // chunk_size) // group  # the segment the next sequential read needs
        # what lies behind the reader, too far from it after a jump, or was read before
        # the file's last change goes back
        generation = stream.engine.disk_generation
        unwanted = [
            index
            for index, segment in stream.segments.items()
            if index < here
            or index > here + self.ahead
            or (segment.done.is_set() and segment.generation != generation)
        ]
        if unwanted:
            self._recycle(self._drop(stream, unwanted))
        if not sequential or size < SEQUENTIAL_MIN:
            return
        disk_size = stream.engine.disk_size
        wanted = []
        for index in range(here, here + self.ahead):
            if cipher_offset(index * group, chunk_size) >= disk_size:
                break
            if index not in stream.segments:
                wanted.append(index)
        if not wanted:
            return
        if stream.fd is None:
            try:
                stream.fd = os.dup(fd)
            except OSError:  # out of fds: do without, the read itself succeeded
                return
        advise_end = min(disk_size, cipher_offset((end + ADVISE_AHEAD) // chunk_size, chunk_size))
        if advise_end > stream.advised_to:
            start = max(stream.advised_to, cipher_offset(wanted[0] * group, chunk_size))
            self._queue.put(("advise", stream.fd, (start, advise_end - start)))
            stream.advised_to = advise_end
        for index in wanted:
            buffer = self._take_buffer(segment_bytes)
            if buffer is None:
                break
            segment = Segment(cipher_offset(index * group, chunk_size), buffer, stream.fd)
            stream.segments[index] = segment
            self.requested += 1
            self._queue.put(("read", stream, segment))
        if stream.segments:
            stream.engine.cipher_cache = stream
        self._start()

    def forget(self, stream: Stream) -> None:
        """The file is closing: the helper closes its fd after what it still has to do."""
        buffers = self._drop(stream, list(stream.segments))
        if stream.fd is not None:
            self._queue.put(("close", stream.fd, buffers))
            stream.fd = None
        else:
            self._recycle(buffers)

    def stop(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout=30)
            self._thread = None

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _drop(stream: Stream, indexes: list[int]) -> list[mmap.mmap]:
        """Forget these segments; their buffers (the helper may still fill some)."""
        buffers = []
        for index in indexes:
            segment = stream.segments.pop(index)
            segment.dropped = True
            buffers.append(segment.buffer)
        if not stream.segments:
            stream.engine.cipher_cache = None
        return buffers

    def _take_buffer(self, size: int) -> mmap.mmap | None:
        with self._spare_lock:
            while self._spare:
                buffer = self._spare.pop()
                if len(buffer) == size:
                    return buffer
                self._buffers -= 1  # another chunk size: let it go
            if self._buffers >= self.max_buffers:
                return None
            self._buffers += 1
        # its own mapping: memory the allocator would keep goes back to the system when
        # the buffer is let go (a 1 MiB bytearray freed stays in the process's heap)
        return mmap.mmap(-1, size)

    def _recycle(self, buffers: list[mmap.mmap]) -> None:
        # A buffer whose segment the helper has yet to read can be reused at once: the
        # helper works in queue order, so its read of the old segment finishes before
        # it reads the new one into the same buffer, and only then is the new one done.
        # Spare buffers beyond one reader's window are let go: once every reader has
        # closed, the mount keeps at most AHEAD_SEGMENTS MiB, not MAX_BUFFERS.
        with self._spare_lock:
            self._spare.extend(buffers)
            excess = len(self._spare) - self.max_spare
            if excess > 0:
                del self._spare[:excess]
                self._buffers -= excess

    def _start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="kmsfs-prefetch", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            kind, target, argument = item
            try:  # only time is lost on failure: the mount reads for itself
                if kind == "close":
                    os.close(target)
                    self._recycle(argument)
                elif kind == "advise":
                    os.posix_fadvise(target, argument[0], argument[1], os.POSIX_FADV_WILLNEED)
                else:
                    self._fill(target, argument)
            except OSError as error:
                log.debug("prefetch: %s", error)
            except Exception:  # a bug here must not stop the helper: readers would wait
                log.exception("prefetch helper: unexpected error (read-ahead continues)")

    def _fill(self, stream: Stream, segment: Segment) -> None:
        try:
            if segment.dropped:
                return
            # noted before the read: a write that could overlap it voids the segment
            segment.generation = stream.engine.disk_generation
            view = memoryview(segment.buffer)
            got = hole_prefix(segment.fd, segment.offset, len(view))
            if got:  # the sparse body of a hole run: zeros without reading (slow on ext4)
                view[:got] = bytes(got)
            while got < len(view):
                more = os.preadv(segment.fd, [view[got:]], segment.offset + got)
                if more <= 0:
                    break
                got += more
            segment.length = got
            self.done += 1
        finally:
            segment.done.set()
