"""The random-access engine: an encrypted file over a backing file descriptor.

:class:`EncryptedFile` offers ``read``/``readinto``/``write``/``truncate``/``size``/
``flush``/``fsync`` on plaintext offsets and keeps the backing file in the format of
README.md. A request touching many chunks does one ``pread`` and/or one ``pwrite`` for the
whole ciphertext range (batches of at most ``BATCH_BYTES`` for huge requests) and seals or
opens its chunks in one loop over one buffer.

**The lazy tail.** The last chunk of the file (the only one that may be short and the only
one sealed as *final*) is kept as plaintext in memory once a write touches it, and is only
sealed and written by :meth:`flush` — or, sealed as non-final, when a later write grows the
file past it. Sequential appends therefore seal every chunk exactly once and small
appends cost no I/O at all until ``flush``.

**The held chunk.** A write inside one interior chunk (not the tail) is merged into a
plaintext copy of that chunk kept in memory, and the chunk is sealed and written only
when a write goes to another chunk, or by ``flush``/``truncate``. Random small writes
arrive sorted by offset from the kernel's writeback (about half of them, measured with
fio, land in the same 64 KiB chunk as the one before): each of those costs no I/O and no
sealing instead of a read, open, seal and write of the whole chunk. Reads see the held
chunk. Until ``flush`` (or ``fsync``) the backing file shows neither the tail nor the held
chunk: flush before anyone else looks at it.

Not thread-safe: one writer per backing file, requests serialised by the caller.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import io
import os
import struct
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Protocol, TypeVar

from kmsfs.errors import CorruptChunk, FileTooLarge, FormatError, Truncated, UsageError
from kmsfs.format.chunks import FINAL, RUN_TRAILER, ZERO_NONCE, Buffer, ChunkCodec
from kmsfs.format.header import (
    FORMAT_VERSION,
    Header,
    create_header,
    read_header,
    unlock_header,
)
from kmsfs.format.keys import DataKeyProvider
from kmsfs.format.offsets import (
    CHUNK_OVERHEAD,
    DEFAULT_CHUNK_SIZE,
    HEADER_SIZE,
    MAX_CIPHERTEXT_SIZE,
    NONCE_SIZE,
    TAG_SIZE,
    check_chunk_size,
    cipher_offset,
    cipher_range,
    ciphertext_size,
    max_plaintext_size,
    plaintext_size,
)

#: ciphertext bytes per pread/pwrite when a single request is larger than this
BATCH_BYTES = 8 << 20
#: a version-1 file (a marker per hole chunk, one write of ~30 µs each) grows by at most
#: this many hole chunks per write or truncate (16 MiB with 64 KiB chunks), so that no
#: request holds the mount up for long; past that: FileTooLarge. Version 2 has no limit.
V1_MAX_HOLE_CHUNKS = 256
#: scratch buffers up to this size are kept per thread and reused (no page faults)
_SCRATCH_KEEP = (1 << 20) + (64 << 10)


class _Scratch(threading.local):
    def __init__(self) -> None:
        self.buffers: dict[str, bytearray] = {}


_scratch = _Scratch()

_FALLOC_FL_KEEP_SIZE = 0x01
_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
#: errnos of fallocate meaning "this filesystem cannot reserve space" (not "no space")
_NO_FALLOCATE = {errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL, errno.ENODEV}


def _reserve_space(fd: int, offset: int, length: int) -> bool:
    """Allocate the blocks of ``[offset, offset + length)`` without changing the file size.

    Returns False where the filesystem cannot (then nothing is reserved); raises OSError
    (ENOSPC, EDQUOT, EIO...) when it can but fails. No data changes either way.
    """
    if _libc.fallocate(fd, _FALLOC_FL_KEEP_SIZE, offset, length) == 0:
        return True
    code = ctypes.get_errno()
    if code in _NO_FALLOCATE:
        return False
    raise OSError(code, os.strerror(code))


def _may_need_blocks(fd: int, offset: int, length: int, disk_size: int) -> bool:
    """Whether overwriting ``[offset, offset + length)`` may need new blocks: it reaches
    past the end, or a hole lies in it (a sparse hole run). Writes wholly beyond the end
    need no reservation (a failure there changes no stored byte); rewriting allocated
    blocks in place needs none on ext4, xfs or tmpfs (one lseek instead of a fallocate)."""
    if offset >= disk_size:
        return False
    if offset + length > disk_size:
        return True
    try:
        return os.lseek(fd, offset, os.SEEK_HOLE) < offset + length
    except OSError:
        return True


_Method = TypeVar("_Method", bound=Callable[..., Any])


def _settles_on_failure(method: _Method) -> _Method:
    """On an OSError, bring the backing file and the engine back to what is stored.

    See :meth:`EncryptedFile._settle`. Nested calls settle once, in the outermost.
    """

    @functools.wraps(method)
    def wrapper(self: EncryptedFile, *args: Any) -> Any:
        if self._changing:
            return method(self, *args)
        disk_end = self._disk_size
        self._changing = True
        try:
            return method(self, *args)
        except OSError:
            self._settle(disk_end)
            raise
        finally:
            self._changing = False

    return wrapper  # type: ignore[return-value]


def _scratch_view(name: str, size: int) -> memoryview:
    """A writable buffer of ``size`` bytes, reused per thread when small."""
    if size > _SCRATCH_KEEP:
        return memoryview(bytearray(size))
    buffer = _scratch.buffers.get(name)
    if buffer is None or len(buffer) < size:
        buffer = bytearray(max(size, 1 << 16))
        _scratch.buffers[name] = buffer
    return memoryview(buffer)[:size]


def _byte_view(data: Buffer) -> memoryview:
    view = memoryview(data)
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    return view


def chunks_on_disk(disk_size: int, chunk_size: int) -> int:
    """How many (possibly partial) chunk slots a backing file of ``disk_size`` bytes holds."""
    return max(0, -(-(disk_size - HEADER_SIZE) // (chunk_size + CHUNK_OVERHEAD)))


def run_marker_offset(chunk_index: int, length: int, chunk_size: int) -> int:
    """Where the 24-byte run trailer of chunk ``chunk_index`` (``length`` plaintext bytes) is."""
    return cipher_offset(chunk_index, chunk_size) + length + CHUNK_OVERHEAD - RUN_TRAILER


def hole_prefix(fd: int, offset: int, length: int) -> int:
    """How many bytes from ``offset`` (at most ``length``) are a hole in the backing file:
    zeros that need not be read (reading a long hole cold took ~3.6 ms per MiB on ext4)."""
    try:
        data = os.lseek(fd, offset, os.SEEK_DATA)
    except OSError as error:
        if error.errno != errno.ENXIO:
            raise
        return length  # only holes up to the end of the file
    return min(max(0, data - offset), length)


def first_data_chunk(
    fd: int, codec: ChunkCodec, position: int, disk_size: int
) -> tuple[int, bytes] | None:
    """The first chunk at or after ``position`` that is not all zero: (index, stored slot).

    The zero chunks in between are skipped with ``SEEK_DATA`` (sparse, never written);
    where the filesystem reports everything as data, chunk by chunk.
    """
    chunk_size = codec.chunk_size
    stored = codec.stored_size
    disk_chunks = chunks_on_disk(disk_size, chunk_size)
    while position < disk_chunks:
        offset = cipher_offset(position, chunk_size)
        try:
            data = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError as error:
            if error.errno == errno.ENXIO:  # nothing but holes up to the end
                return None
            raise
        index = max(position, (data - HEADER_SIZE) // stored)
        if index >= disk_chunks:
            return None
        start = cipher_offset(index, chunk_size)
        slot = os.pread(fd, min(stored, disk_size - start), start)
        if not codec.is_zero(slot):
            return index, slot
        position = index + 1
    return None


def next_run_marker(
    fd: int, codec: ChunkCodec, position: int, disk_size: int, final_index: int | None = None
) -> tuple[int, int, int, bool] | None:
    """Format 2: the first non-zero chunk at or after ``position``, if it ends a hole run.

    Returns ``(its index, first index of the run, its plaintext length, final)``, or None
    when that chunk is not a valid run marker or no non-zero chunk follows. The chunk with
    index ``final_index`` must carry the final flag and no other may (None: the last chunk
    on disk should, but either is accepted — for writers working out what is there).
    """
    found = first_data_chunk(fd, codec, position, disk_size)
    if found is None:
        return None
    index, slot = found
    if final_index is not None:
        finals: tuple[bool, ...] = (index == final_index,)
    else:
        disk_last = chunks_on_disk(disk_size, codec.chunk_size) - 1
        finals = (index == disk_last, index != disk_last)
    for final in finals:
        first = codec.run_start(index, slot, final)
        if first is not None:
            return index, first, len(slot) - CHUNK_OVERHEAD, final
    return None


# ------------------------------------------------------------------ undo records
#: the trailer of an undo record (README.md, *Crashes*): magic ‖ index of the first chunk
#: copied (u64) ‖ length of the copy (u64) ‖ the backing file's length before it (u64)
UNDO_MAGIC = b"\x8bKMSUNDO"
_UNDO_TRAILER = struct.Struct(">8sQQQ")
UNDO_TRAILER_SIZE = _UNDO_TRAILER.size
#: the longest copy an undo record holds (one batch of chunks, with room to spare)
_UNDO_MAX_PIECE = 2 * BATCH_BYTES + (16 << 20)


@dataclass(frozen=True)
class UndoRecord:
    """A verbatim copy of stored chunks that were about to be rewritten in place."""

    offset: int  #: where the copy starts: a chunk slot boundary after the file's data
    first_index: int  #: the chunk the copy's first bytes belong to
    piece: bytes  #: the stored bytes of chunks ``first_index ...`` before the rewrite
    restore_length: int  #: the backing file's length when the copy was written


def undo_record_position(disk_size: int, end: int, chunk_size: int) -> int:
    """Where an undo record goes: the first chunk slot after ``disk_size`` and ``end``."""
    return cipher_offset(chunks_on_disk(max(disk_size, end), chunk_size), chunk_size)


def write_undo_record(
    fd: int, position: int, first_index: int, piece: Buffer, restore_length: int
) -> None:
    """Write ``piece ‖ trailer`` at ``position`` (beyond the end: nothing stored changes).

    One ``pwrite``; the trailer comes last, so a write cut short by a kill leaves no
    trailer (a piece without one is cut off like any data after the final chunk). Zeros
    the piece starts with (a hole run's marker chunk, its sparse body) are not written:
    past the end of the file they read as zeros anyway.
    """
    trailer = _UNDO_TRAILER.pack(UNDO_MAGIC, first_index, len(piece), restore_length)
    data = bytes(piece) + trailer
    skip = len(data) - len(data.lstrip(b"\0")) if data[0] == 0 else 0
    record = memoryview(data)[skip:]
    position += skip
    while record:
        written = os.pwrite(fd, record, position)
        if written <= 0:
            raise OSError(errno.EIO, "short write of an undo record")
        record = record[written:]
        position += written


def find_undo_record(fd: int, disk_size: int, codec: ChunkCodec) -> UndoRecord | None:
    """The undo record at the end of the backing file, if there is a sound one.

    Sound: the trailer's fields fit the file, and every chunk of the copy opens as the
    chunk of that index (data, non-final or final, or a hole marker) or is all zeros (the
    sparse body of a hole run, which only its marker authenticates).
    """
    if disk_size < HEADER_SIZE + UNDO_TRAILER_SIZE + 1:
        return None
    magic, first, length, restore = _UNDO_TRAILER.unpack(
        os.pread(fd, UNDO_TRAILER_SIZE, disk_size - UNDO_TRAILER_SIZE)
    )
    offset = disk_size - UNDO_TRAILER_SIZE - length
    stored = codec.stored_size
    if (
        magic != UNDO_MAGIC
        or not 0 < length <= _UNDO_MAX_PIECE
        or offset < HEADER_SIZE
        or (offset - HEADER_SIZE) % stored
        or first >= (offset - HEADER_SIZE) // stored
        or not cipher_offset(first, codec.chunk_size) + length <= restore <= offset
    ):
        return None
    piece = os.pread(fd, length, offset)
    view = memoryview(piece)
    for start in range(0, length, stored):
        part = view[start : start + stored]
        index = first + start // stored
        if len(part) <= CHUNK_OVERHEAD:
            return None
        last_part = start + stored >= length
        if not (
            codec.is_zero(part)
            or codec.authenticates(index, part, 0)
            or (last_part and codec.authenticates(index, part, FINAL))
        ):
            return None
    return UndoRecord(offset, first, piece, restore)


def restore_undo_record(fd: int, record: UndoRecord, chunk_size: int) -> None:
    """Put the copied chunks back in place, then cut the file to its length before the copy
    (in that order: a repair killed half-way finds the record again).

    A copy ending with a short chunk (the old final chunk) was followed by nothing up to
    the next chunk slot: the zeros there are put back too (the rewrite may have filled
    them), so that chunks written after that slot read as an interrupted append.
    """
    position = cipher_offset(record.first_index, chunk_size)
    stored = chunk_size + CHUNK_OVERHEAD
    slots_end = position + -(-len(record.piece) // stored) * stored
    gap = max(0, min(slots_end, record.restore_length) - position - len(record.piece))
    data = record.piece + bytes(gap)
    if os.pread(fd, len(data), position) != data:
        rest = memoryview(data)
        while rest:
            written = os.pwrite(fd, rest, position)
            if written <= 0:
                raise OSError(errno.EIO, "short write restoring an undo record")
            rest = rest[written:]
            position += written
    os.ftruncate(fd, record.restore_length)


def seal_last_chunk_final(
    fd: int, codec: ChunkCodec, index: int, piece: Buffer, disk_size: int
) -> bool:
    """Make stored chunk ``index`` (``piece``: its stored bytes) the file's final chunk and
    cut the backing file (``disk_size`` bytes long) right after it.

    A non-final data chunk is re-sealed as final in place, after an undo record of it (a
    kill tearing the re-seal loses nothing: ``repair`` puts it back); a hole-run marker
    chunk, or a zero chunk inside a run, gets a final run marker (format 2; one 24-byte
    write); a format-1 hole chunk a final hole marker. Returns False, changing nothing,
    when the piece opens neither way (torn, or not this file's). The one implementation
    behind ``repair`` and the engine's recovery after a failed write.
    """
    view = memoryview(piece)
    chunk_size = codec.chunk_size
    start = cipher_offset(index, chunk_size)
    end = start + len(view)
    length = len(view) - CHUNK_OVERHEAD
    out: Buffer | None = None
    position = start
    if length <= 0:
        return False
    if codec.authenticates(index, view, FINAL):
        pass  # only what follows it is cut
    elif codec.runs and codec.is_zero(view):
        found = next_run_marker(fd, codec, index + 1, disk_size)
        if found is None or found[1] > index:
            return False
        out = codec.run_marker(found[1], index, length, True)  # the run now ends here
        position = run_marker_offset(index, length, chunk_size)
    elif codec.runs and (first := codec.run_start(index, view, False)) is not None:
        out = codec.run_marker(first, index, length, True)
        position = run_marker_offset(index, length, chunk_size)
    elif (
        not codec.runs
        and codec.authenticates(index, view, 0)
        and codec.is_zero(view[: NONCE_SIZE + length])
    ):
        out = codec.hole_marker(index, length, True)  # a format-1 hole chunk
        position = start + NONCE_SIZE + length
    elif codec.authenticates(index, view, 0):
        plaintext = codec.open_chunk(view, index, final=False)
        out = memoryview(bytearray(len(view)))
        codec.seal_into(out, index, [plaintext], True)
        record_at = undo_record_position(disk_size, end, chunk_size)
        if record_at + len(view) + UNDO_TRAILER_SIZE <= MAX_CIPHERTEXT_SIZE:
            try:
                write_undo_record(fd, record_at, index, view, disk_size)
            except OSError:  # no room for the copy (a full disk): re-sealed without one
                os.ftruncate(fd, disk_size)
    else:
        return False
    if out is not None and os.pwrite(fd, out, position) != len(out):
        raise OSError(errno.EIO, "short write sealing the last stored chunk")
    if os.fstat(fd).st_size != end:
        os.ftruncate(fd, end)
    return True


class CipherCache(Protocol):
    """Ciphertext that someone read ahead; see ``EncryptedFile.cipher_cache``."""

    def lookup(self, offset: int, length: int, generation: int) -> Buffer | None: ...


class EncryptedFile:
    """Plaintext view of one ciphertext file. Build it with :meth:`open`."""

    def __init__(
        self,
        fd: int,
        *,
        header: Header | None,
        codec: ChunkCodec | None,
        disk_size: int,
        chunk_size: int,
        key_provider: DataKeyProvider,
        key_id: str | None,
        encryption_context: Mapping[str, str] | None,
        writable: bool,
        format_version: int = FORMAT_VERSION,
    ) -> None:
        self._fd = fd
        self._format_version = format_version
        self._header = header
        self._codec = codec
        self._chunk_size = chunk_size
        self._stored_size = chunk_size + CHUNK_OVERHEAD
        self._batch_chunks = max(1, BATCH_BYTES // self._stored_size)
        self._max_size = max_plaintext_size(chunk_size)
        self._disk_size = disk_size
        self._header_on_disk = disk_size > 0
        self._size = plaintext_size(disk_size, chunk_size)
        self._key_provider = key_provider
        self._key_id = key_id
        self._context = dict(encryption_context or {})
        self._writable = writable
        self._tail: bytearray | None = None  # plaintext of the last chunk, when held
        self._tail_dirty = False  # the held tail differs from (or is missing on) disk
        self._held_index = -1  # an interior chunk whose newer plaintext is only in memory
        self._held: bytearray | None = None
        self._closed = False
        self._changing = False  # inside a change to the backing file (see _settles_on_failure)
        #: a failed change could not leave the backing file consistent: needs ``repair``
        self.damaged = False
        self._can_reserve = True  # fallocate works on the backing filesystem
        #: plaintext bytes before this offset may be durable (fsync'd by someone): a chunk
        #: holding any of them is copied to an undo record before it is rewritten in place.
        #: Unknown at open, so all of them; raised by ``mark_durable``, lowered by a
        #: truncate that cut the rest off (README.md, *Crashes*)
        self._durable_end = self._size
        #: an undo record is on disk and the chunks it copies may be torn: keep it
        self._undo_pending = False
        #: what the last hole-run lookup proved, while the backing file is unchanged:
        #: (disk generation, z, a, m) — chunks [z, m) are zero on disk and the marker
        #: chunk m ends the run [a, m]. Reads inside [z, m) need no pread at all.
        self._known_zeros = (-1, 0, 0, 0)
        #: a few chunks known to be data chunks on disk (read or written as such): writing
        #: them again needs no look at hole runs (only a truncation changes that)
        self._data_chunks: set[int] = set()
        #: while one change writes new chunks beyond the old end before it overwrites
        #: stored ones: the backing file's length before that change, which is where the
        #: layout of hole runs that the overwrites must keep valid is read from
        self._layout_end: int | None = None
        #: raised after every change to the backing file has finished: ciphertext read
        #: before the last change is stale (see ``cipher_cache``)
        self.disk_generation = 0
        #: optional ciphertext read ahead by someone else (the mount's prefetcher): an
        #: object whose ``lookup(offset, length, disk_generation)`` returns those bytes
        #: if it has them from the current generation, else None. They are
        #: authenticated like any other.
        self.cipher_cache: CipherCache | None = None

    @classmethod
    def open(
        cls,
        fd: int,
        *,
        key_provider: DataKeyProvider,
        key_id: str | None = None,
        encryption_context: Mapping[str, str] | None = None,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        writable: bool = True,
        format_version: int = FORMAT_VERSION,
        header: Header | None = None,
        disk_size: int | None = None,
    ) -> EncryptedFile:
        """Open the ciphertext file behind ``fd`` (readable; O_RDWR if ``writable``).

        A non-empty file's header is read and unlocked now (one key-provider call);
        ``encryption_context`` entries must then be in the header (else CorruptHeader).
        An empty file costs nothing: its header — a new file id and data key from
        ``key_provider.generate_data_key(key_id, context)`` — is made when the first byte
        is written, with ``encryption_context`` and ``chunk_size`` (and ``format_version``;
        an existing file keeps its own version).

        ``disk_size`` and ``header``: the backing file's size and its parsed header, when
        the caller has just read them from ``fd`` (the mount reads the header to ask keyd
        for its key first); the header is then not read and parsed a second time. It is
        authenticated here all the same.
        """
        check_chunk_size(chunk_size)
        if disk_size is None:
            disk_size = os.fstat(fd).st_size
        codec = None
        if not disk_size:
            header = None
        else:
            if header is None:
                header = read_header(fd)
            keys = unlock_header(header, key_provider, encryption_context)
            chunk_size = header.chunk_size
            codec = ChunkCodec(keys, chunk_size, header.version)
            if disk_size == HEADER_SIZE:
                raise Truncated("the file has a header but no chunk")
        return cls(
            fd,
            header=header,
            codec=codec,
            disk_size=disk_size,
            chunk_size=chunk_size,
            key_provider=key_provider,
            key_id=key_id,
            encryption_context=header.context if header else encryption_context,
            writable=writable,
            format_version=format_version,
        )

    # ------------------------------------------------------------------- properties
    @property
    def size(self) -> int:
        """Plaintext size, including writes not yet flushed."""
        return self._size

    @property
    def chunk_size(self) -> int:
        return self._chunk_size

    @property
    def disk_size(self) -> int:
        """Bytes of the backing file, as far as this engine knows."""
        return self._disk_size

    @property
    def header(self) -> Header | None:
        """The header (None while an empty file has none yet)."""
        return self._header

    @property
    def fd(self) -> int:
        return self._fd

    @property
    def writable(self) -> bool:
        return self._writable

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def seal_count(self) -> int:
        """Chunks sealed under this file's key since it was opened (nonce budget)."""
        return self._codec.seal_count if self._codec else 0

    @property
    def dirty(self) -> bool:
        """Whether writes are held in memory that :meth:`flush` has yet to write."""
        return (
            self._tail_dirty
            or self._held is not None
            or (self._size > 0 and not self._header_on_disk)
        )

    # ------------------------------------------------------------------------- read
    def read(self, offset: int, size: int) -> bytes:
        """Up to ``size`` plaintext bytes from ``offset`` (fewer at the end of the file).

        Every byte is authenticated first. :meth:`readinto` avoids one copy.
        """
        if offset < 0 or size < 0:
            raise ValueError("negative offset or size")
        count = min(size, self._size - offset)
        if count <= 0:
            return b""
        buffer = bytearray(count)
        self.readinto(offset, buffer)
        return bytes(buffer)

    def readinto(self, offset: int, buffer: Buffer) -> int:
        """Read into ``buffer`` from ``offset``; returns the number of bytes read.

        On an authentication failure the bytes of the failing batch are wiped from
        ``buffer`` and CorruptChunk / Truncated is raised.
        """
        self._check_open()
        if offset < 0:
            raise ValueError("negative offset")
        dest = _byte_view(buffer)
        size = self._size
        if offset >= size or not len(dest):
            return 0
        end = min(offset + len(dest), size)
        chunk_size = self._chunk_size
        first = offset // chunk_size
        last = (end - 1) // chunk_size
        tail_index = (size - 1) // chunk_size
        if first == last < tail_index and first != self._held_index:
            # the hot path of small random reads: inside one full chunk on disk
            if self._zeros_known(first, first + 1):
                dest[: end - offset] = bytes(end - offset)
                return end - offset
            stored = self._stored_size
            self._require_codec().open_part(
                self._pread(HEADER_SIZE + first * stored, stored),
                first,
                dest[: end - offset],
                offset - first * chunk_size,
                self._run_lookup,
            )
            return end - offset
        held_tail = self._tail is not None and last == tail_index
        disk_end = tail_index if held_tail else last + 1
        codec = self._require_codec()
        position = first
        while position < disk_end:
            batch_end = min(disk_end, position + self._batch_chunks)
            low = max(offset, position * chunk_size)
            high = min(end, batch_end * chunk_size)
            if self._zeros_known(position, batch_end):  # inside a hole run already checked
                dest[low - offset : high - offset] = bytes(high - low)
                position = batch_end
                continue
            cipher_start, cipher_length = cipher_range(position, batch_end, size, chunk_size)
            cipher = self._pread(cipher_start, cipher_length)
            codec.open_into(
                cipher, position, dest[low - offset : high - offset],
                low - position * chunk_size, tail_index, self._run_lookup,
            )  # fmt: skip
            position = batch_end
        if held_tail:
            assert self._tail is not None
            tail_start = tail_index * chunk_size
            low = max(offset, tail_start)
            dest[low - offset : end - offset] = self._tail[low - tail_start : end - tail_start]
        held = self._held
        if held is not None and first <= self._held_index <= last:
            held_start = self._held_index * chunk_size
            low = max(offset, held_start)
            high = min(end, held_start + chunk_size)
            dest[low - offset : high - offset] = held[low - held_start : high - held_start]
        return end - offset

    # ------------------------------------------------------------------------ write
    def write(self, offset: int, data: Buffer) -> int:
        """Write ``data`` at plaintext ``offset`` (growing the file, zero-filling any gap).

        Returns ``len(data)``. Chunks wholly inside a gap become hole chunks; the last
        chunk is held in memory until :meth:`flush`.
        """
        self._check_writable()
        if offset < 0:
            raise ValueError("negative offset")
        source = _byte_view(data)
        count = len(source)
        if count == 0:
            return 0
        if offset + count > self._max_size:
            raise FileTooLarge(offset + count, self._max_size)
        self._check_hole_count(offset // self._chunk_size, offset + count)
        total = count
        if self._size == 0:
            self._ensure_keys()
        while count > 0:  # huge writes go in batches of whole chunks
            step = count
            limit = self._batch_chunks * self._chunk_size
            if step > limit:
                step = limit - offset % self._chunk_size
            self._write_batch(offset, source[:step])
            offset += step
            source = source[step:]
            count -= step
        return total

    @_settles_on_failure
    def _write_batch(self, offset: int, source: memoryview) -> None:
        chunk_size = self._chunk_size
        old_size = self._size
        end = offset + len(source)
        new_size = max(old_size, end)
        old_tail = (old_size - 1) // chunk_size if old_size else -1
        new_tail = (new_size - 1) // chunk_size
        first = offset // chunk_size
        last = (end - 1) // chunk_size
        tail = self._tail
        if tail is not None and first == last == new_tail == old_tail:
            # the hot path of appends: the write stays inside the held tail, no I/O
            low = offset - first * chunk_size
            if len(tail) < low:
                tail.extend(bytes(low - len(tail)))
            tail[low : low + len(source)] = source
            self._tail_dirty = True
            self._size = new_size
            return
        if first == last < old_tail:
            self._write_held(first, offset - first * chunk_size, source)
            return
        self._write_back_held()

        # Build every chunk first (copies, never the held tail itself), write, and only
        # then change state: a failed read or write leaves the engine as it was.
        runs: list[tuple[int, list[Buffer]]] = []
        run_start = first
        plaintexts: list[Buffer] = []
        if 0 <= old_tail < first:
            # the old tail stops being the last chunk: pad it and re-seal it non-final
            resealed = self._padded_copy(old_tail)
            if old_tail + 1 == first:
                run_start = old_tail
                plaintexts.append(resealed)
            else:
                runs.append((old_tail, [resealed]))
        holes = range(old_tail + 1, first)
        new_tail_plain: bytearray | None = None
        for index in range(first, last + 1):
            chunk_start = index * chunk_size
            length = min(chunk_size, new_size - chunk_start)
            low = max(offset, chunk_start)
            high = min(end, chunk_start + chunk_size)
            plaintext: Buffer
            if low == chunk_start and high == chunk_start + length:
                plaintext = source[low - offset : high - offset]
            else:
                merged = self._chunk_copy(index) if index <= old_tail else bytearray()
                if len(merged) < length:
                    merged.extend(bytes(length - len(merged)))
                merged[low - chunk_start : high - chunk_start] = source[
                    low - offset : high - offset
                ]
                plaintext = merged
            if index == new_tail:
                new_tail_plain = (
                    plaintext if isinstance(plaintext, bytearray) else bytearray(plaintext)
                )
            else:
                plaintexts.append(plaintext)
        if plaintexts:
            runs.append((run_start, plaintexts))

        disk_end = self._disk_size
        self._write_holes(holes, final_length=None)
        self._write_runs_new_first(runs, disk_end)
        if new_tail_plain is not None:
            self._tail = new_tail_plain
            self._tail_dirty = True
        self._size = new_size

    def _write_runs_new_first(self, runs: list[tuple[int, list[Buffer]]], disk_end: int) -> None:
        """Write runs of non-final chunks: first the chunks beyond ``disk_end`` (the end of
        the backing file), then those that overwrite stored chunks — the old final chunk
        among them, re-sealed as non-final. A failure (or a kill) before the last write
        leaves every stored chunk as it was; what was added beyond ``disk_end`` is cut off
        again (:meth:`_settle`, ``repair``)."""
        stored_chunks = max(0, -(-(disk_end - HEADER_SIZE) // self._stored_size))
        overwrites: list[tuple[int, list[Buffer]]] = []
        self._layout_end = disk_end
        try:
            for index, plaintexts in runs:
                split = min(len(plaintexts), max(0, stored_chunks - index))
                if split < len(plaintexts):
                    self._write_run(index + split, plaintexts[split:], final=False)
                if split:
                    overwrites.append((index, plaintexts[:split]))
            for index, plaintexts in overwrites:
                self._write_run(index, plaintexts, final=False)
        finally:
            self._layout_end = None

    # --------------------------------------------------------------------- truncate
    @_settles_on_failure
    def truncate(self, size: int) -> None:
        """Shrink or grow the file to ``size`` bytes; growth reads as zeros (hole chunks).

        Done at once (the backing file is consistent afterwards, like after flush).
        """
        self._check_writable()
        if size < 0:
            raise ValueError("negative size")
        if size > self._max_size:
            raise FileTooLarge(size, self._max_size)
        if size > self._size:
            self._check_hole_count(-(-size // self._chunk_size), size)
        old_size = self._size
        if size == old_size:
            self.flush()
            return
        self._write_back_held()
        if size == 0:
            self._truncate_backing(0)
            self._header_on_disk = False  # written again (same key) with the next byte
            self._tail = None
            self._tail_dirty = False
            self._size = 0
            self._durable_end = 0
            return
        if old_size == 0:
            self._ensure_keys()
        chunk_size = self._chunk_size
        new_tail = (size - 1) // chunk_size
        new_length = size - new_tail * chunk_size
        old_tail = (old_size - 1) // chunk_size if old_size else -1
        if size < old_size or new_tail == old_tail:
            tail = self._load_chunk(new_tail)
            if len(tail) > new_length:
                del tail[new_length:]
            else:
                tail.extend(bytes(new_length - len(tail)))
            self._tail = tail
            self._tail_dirty = True
            self._size = size
            if new_tail < old_tail:
                self._cut_behind(new_tail)
            self.flush()
            self._durable_end = min(self._durable_end, size)  # the rest is cut off
            return
        # growth past the old tail: holes up to the new final (hole) chunk, written
        # before the old tail loses its final flag
        resealed = self._padded_copy(old_tail) if old_tail >= 0 else None
        disk_end = self._disk_size
        if self._require_codec().runs:  # one run up to the new final chunk: one marker
            self._write_holes(range(old_tail + 1, new_tail + 1), final_length=new_length)
        else:
            self._write_holes(range(old_tail + 1, new_tail), final_length=None)
            self._write_holes(range(new_tail, new_tail + 1), final_length=new_length)
        if resealed is not None:
            self._layout_end = disk_end
            try:
                self._write_run(old_tail, [resealed], final=False)
            finally:
                self._layout_end = None
        self._tail = bytearray(new_length)
        self._tail_dirty = False
        self._size = size

    # ------------------------------------------------------------------------ flush
    @_settles_on_failure
    def flush(self) -> None:
        """Seal and write the held tail chunk (final) and trim the backing file."""
        if self._closed or not self._writable:
            return
        self._write_back_held()
        if self._tail is not None and self._tail_dirty:
            tail_index = (self._size - 1) // self._chunk_size
            self._write_run(tail_index, [self._tail], final=True)
            self._tail_dirty = False
        expected = ciphertext_size(self._size, self._chunk_size)
        if self._size and not self._header_on_disk:
            self._write_header()
        if self._disk_size != expected:
            self._truncate_backing(expected)

    def fsync(self) -> None:
        """flush, then fsync the backing file."""
        self.flush()
        size = self._size
        os.fsync(self._fd)
        self.mark_durable(size)

    def mark_durable(self, size: int) -> None:
        """The backing file was fsync'd after a ``flush`` at plaintext size ``size``.

        Whoever fsyncs the backing fd itself (the mount does, in a thread) says so here:
        from then on a rewrite in place of a chunk before ``size`` first copies the chunk to
        an undo record (a kill tearing the rewrite loses nothing; README.md, *Crashes*).
        Chunks written after the last fsync and wholly past its size are rewritten
        without a copy. Telling the engine nothing keeps it safe: what the file held when
        it was opened always counts as durable.
        """
        self._durable_end = max(self._durable_end, size)

    def close(self) -> None:
        """Flush. The backing fd stays open: it belongs to the caller."""
        if not self._closed:
            try:
                self.flush()
            finally:
                self._closed = True
                self._tail = self._held = None

    def __enter__(self) -> EncryptedFile:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    # ---------------------------------------------------------------------- helpers
    def _check_open(self) -> None:
        if self._closed:
            raise ValueError("I/O operation on a closed encrypted file")

    def _check_writable(self) -> None:
        self._check_open()
        if not self._writable:
            raise io.UnsupportedOperation("the encrypted file is not open for writing")

    def _check_hole_count(self, hole_end: int, new_size: int) -> None:
        """Version 1: refuse growth that needs more than V1_MAX_HOLE_CHUNKS hole markers
        (chunks ``[old chunk count, hole_end)``) before anything changes."""
        codec = self._codec
        if codec is None or codec.runs:
            return
        old_chunks = -(-self._size // self._chunk_size)
        if hole_end - old_chunks > V1_MAX_HOLE_CHUNKS:
            limit = (old_chunks + V1_MAX_HOLE_CHUNKS) * self._chunk_size
            raise FileTooLarge(new_size, limit)

    def _require_codec(self) -> ChunkCodec:
        assert self._codec is not None, "a non-empty file always has keys"
        return self._codec

    def _ensure_keys(self) -> None:
        if self._codec is not None:
            return
        if self._key_id is None:
            raise UsageError("writing to an empty encrypted file needs a key id (key_id=...)")
        header, keys = create_header(
            self._key_provider, self._key_id, self._context, self._chunk_size, self._format_version
        )
        self._header = header
        self._codec = ChunkCodec(keys, self._chunk_size, header.version)
        self._header_on_disk = False

    def _pread(self, offset: int, length: int) -> Buffer:
        cache = self.cipher_cache
        if cache is not None:
            found = cache.lookup(offset, length, self.disk_generation)
            if found is not None:
                return found
        view = _scratch_view("read", length)
        got = 0
        codec = self._codec
        if codec is not None and codec.runs and length > self._stored_size:
            # a batch that starts in the sparse body of a hole run: those bytes are zero
            got = hole_prefix(self._fd, offset, length)
            if got:
                view[:got] = bytes(got)
        if got < length:
            got += os.preadv(self._fd, [view[got:]], offset + got)
        while got < length:
            more = os.preadv(self._fd, [view[got:]], offset + got)
            if more == 0:
                raise Truncated("the backing file is shorter than the file's size says")
            got += more
        return view

    def _load_chunk(self, index: int) -> bytearray:
        """Plaintext of existing chunk ``index`` (the held tail itself, if that is it)."""
        tail_index = (self._size - 1) // self._chunk_size
        if index == tail_index and self._tail is not None:
            return self._tail
        cipher_start, cipher_length = cipher_range(index, index + 1, self._size, self._chunk_size)
        plaintext = bytearray(cipher_length - CHUNK_OVERHEAD)
        cipher = self._pread(cipher_start, cipher_length)
        self._require_codec().open_into(
            cipher, index, memoryview(plaintext), 0, tail_index, self._run_lookup
        )
        if cipher[:NONCE_SIZE] != ZERO_NONCE and cipher_length >= CHUNK_OVERHEAD + 8:
            self._note_data_chunk(index)  # it opened as data (a marker chunk's nonce is zero)
        return plaintext

    def _chunk_copy(self, index: int) -> bytearray:
        """Plaintext of existing chunk ``index`` that the caller may change."""
        plaintext = self._load_chunk(index)
        return bytearray(plaintext) if plaintext is self._tail else plaintext

    def _padded_copy(self, index: int) -> bytearray:
        plaintext = self._chunk_copy(index)
        if len(plaintext) < self._chunk_size:
            plaintext.extend(bytes(self._chunk_size - len(plaintext)))
        return plaintext

    def _write_held(self, index: int, low: int, source: memoryview) -> None:
        """Merge a write inside interior chunk ``index`` into the held copy of that chunk."""
        held = self._held
        if held is None or self._held_index != index:
            if low == 0 and len(source) == self._chunk_size:
                fresh = bytearray(source)  # the whole chunk: nothing to read
            else:
                fresh = self._chunk_copy(index)
            self._write_back_held()  # may fail: then nothing has changed
            held = self._held = fresh
            self._held_index = index
        held[low : low + len(source)] = source

    def _write_back_held(self) -> None:
        """Seal and write the held interior chunk, if any, and let it go."""
        if self._held is not None:
            self._write_run(self._held_index, [self._held], final=False)
            self._held = None
            self._held_index = -1

    def _write_header(self) -> None:
        if not self._header_on_disk:
            assert self._header is not None
            self._pwrite([self._header.raw], 0)
            self._header_on_disk = True

    def _write_run(self, first_index: int, plaintexts: list[Buffer], final: bool) -> None:
        codec = self._require_codec()
        total = (len(plaintexts) - 1) * self._stored_size + len(plaintexts[-1]) + CHUNK_OVERHEAD
        out = _scratch_view("write", total)
        used = codec.seal_into(out, first_index, plaintexts, final)
        assert used == total
        before = after = None
        if codec.runs and self._header_on_disk:
            before, after = self._split_runs(first_index, first_index + len(plaintexts) - 1)
        # the part of a hole run in front keeps a marker of its own (unless it has it
        # already: _write_hole_run wrote it when this is the old tail of a final run)
        if before is not None and os.pread(self._fd, len(before[1]), before[0]) != before[1]:
            self._overwrite([before[1]], before[0])
        self._write_sealed(first_index, out, final)
        for index in range(first_index, first_index + len(plaintexts)):
            self._note_data_chunk(index)
        if after is not None:  # then the part behind the new data gets its own
            self._overwrite([after[1]], after[0])

    def _write_sealed(self, first_index: int, out: memoryview, final: bool) -> None:
        if self._header_on_disk:
            self._overwrite([out], cipher_offset(first_index, self._chunk_size), final)
        elif first_index == 0:
            assert self._header is not None
            self._pwrite([self._header.raw, out], 0)
            self._header_on_disk = True
        else:
            self._write_header()
            self._pwrite([out], cipher_offset(first_index, self._chunk_size))

    def _overwrite(self, buffers: list[Buffer], offset: int, final: bool = False) -> None:
        """``pwrite`` that may overwrite stored bytes: where those belong to chunks that
        may hold durable data, their stored bytes are first copied into an undo record after
        the end of the backing file, and the record is cut off again after the write (a
        ``final`` chunk ends the file: the cut is then right after it). A kill at any
        point leaves a file that ``repair`` brings back to before or after the write."""
        length = sum(len(buffer) for buffer in buffers)
        copied = self._write_undo_copy(offset, length)
        if copied is None:
            self._pwrite(buffers, offset)
            return
        piece_offset, piece, restore_length = copied
        try:
            self._pwrite(buffers, offset)
            if final:
                self._truncate_backing(offset + length)
            else:
                end = max(restore_length, offset + length)
                os.ftruncate(self._fd, end)
                self._disk_size = end
                self.disk_generation += 1
        except OSError:  # the copied bytes are put back before the error goes on
            try:
                rest = piece
                position = piece_offset
                while rest:
                    written = os.pwrite(self._fd, rest, position)
                    if written <= 0:
                        raise OSError(errno.EIO, "short write putting chunks back") from None
                    rest = rest[written:]
                    position += written
            except OSError:
                self._undo_pending = True  # the record stays for repair
            raise

    def _write_undo_copy(self, offset: int, length: int) -> tuple[int, memoryview, int] | None:
        """Before ``[offset, offset + length)`` is overwritten: if the stored chunks it
        reaches may hold durable data, copy them (whole) into an undo record after the end
        of the backing file; return where they start, their bytes and the file's length
        before the record (what ``repair`` cuts back to after it put them back), else None."""
        layout_end = self._disk_size if self._layout_end is None else self._layout_end
        if offset >= layout_end:
            return None  # nothing stored there yet: appends
        chunk_size = self._chunk_size
        stored = self._stored_size
        first_index = (offset - HEADER_SIZE) // stored
        durable_end = self._durable_end
        if durable_end <= first_index * chunk_size:
            return None  # chunks written since the last fsync, past its size
        # the stored chunks the write reaches (all of each), up to the last durable one
        end_index = min(
            -(-(offset + length - HEADER_SIZE) // stored), -(-durable_end // chunk_size)
        )
        piece_offset = cipher_offset(first_index, chunk_size)
        piece_end = min(layout_end, cipher_offset(end_index, chunk_size))
        restore_length = self._disk_size
        position = undo_record_position(restore_length, offset + length, chunk_size)
        if position + piece_end - piece_offset + UNDO_TRAILER_SIZE > MAX_CIPHERTEXT_SIZE:
            return None  # no room after a file of the maximum size: written unprotected
        piece = _scratch_view("undo", piece_end - piece_offset)
        got = 0
        while got < len(piece):
            more = os.preadv(self._fd, [piece[got:]], piece_offset + got)
            if more == 0:
                raise OSError(errno.EIO, "the backing file is shorter than its chunks")
            got += more
        try:
            write_undo_record(self._fd, position, first_index, piece, restore_length)
        finally:
            self.disk_generation += 1
        return piece_offset, piece, restore_length

    def _write_holes(self, indexes: range, final_length: int | None) -> None:
        """Write the markers of hole chunks (the zero bodies stay sparse)."""
        if not indexes:
            return
        self._write_header()
        codec = self._require_codec()
        chunk_size = self._chunk_size
        start = cipher_offset(indexes[0], chunk_size)
        if codec.runs:
            self._write_hole_run(indexes[0], indexes[-1], final_length)
            return
        if self._disk_size > start:  # hole bodies must read as zeros: nothing stale there
            self._truncate_backing(start)
        length = chunk_size if final_length is None else final_length
        final = final_length is not None
        hole_marker = codec.hole_marker
        pwrite = os.pwrite
        fd = self._fd
        stored = self._stored_size
        position = start + NONCE_SIZE + length
        try:
            for index in indexes:  # one 16-byte write per hole chunk; the bodies stay sparse
                marker = hole_marker(index, length, final)
                written = pwrite(fd, marker, position)
                # a short write (a full disk): the next write says why, or finishes it
                if written < TAG_SIZE and (
                    pwrite(fd, marker[written:], position + written) < TAG_SIZE - written
                ):
                    raise OSError(errno.EIO, "short write of a hole marker")
                position += stored
        finally:
            self.disk_generation += 1
            self._disk_size = max(self._disk_size, os.fstat(fd).st_size)

    def _settle(self, disk_end: int) -> None:
        """After a change failed: the backing file and the engine become what is stored.

        What the change added beyond ``disk_end`` is cut off (frees the space); writes held
        in memory (the tail, the held chunk) are dropped, as they were not stored; if the
        backing file then ends with a chunk sealed as non-final (an append in progress),
        that chunk is sealed as final in place. The size is then the backing file's. If
        the file cannot be made consistent (its last chunk torn, or a write failing again)
        ``damaged`` is set and ``repair`` is left to do it.
        """
        fd = self._fd
        self._data_chunks.clear()
        self._held = self._tail = None
        self._held_index = -1
        self._tail_dirty = False
        self.disk_generation += 1
        try:
            if self._undo_pending:  # chunks may be torn: their copy at the end must stay
                self.damaged = True
                return
            disk_size = os.fstat(fd).st_size
            keep = min(disk_size, disk_end)
            if keep <= HEADER_SIZE:  # a header without chunks: the file is empty again
                keep = 0
            if keep != disk_size:
                os.ftruncate(fd, keep)
                disk_size = keep
            if disk_size and not self._seal_last_stored_chunk(disk_size):
                self.damaged = True
        except OSError:
            self.damaged = True
        finally:
            disk_size = os.fstat(fd).st_size
            self._disk_size = disk_size
            self._header_on_disk = disk_size > 0
            try:
                self._size = plaintext_size(disk_size, self._chunk_size)
            except FormatError:
                self.damaged = True
                self._size = 0

    def _seal_last_stored_chunk(self, disk_size: int) -> bool:
        """Seal the backing file's last chunk as final if it is stored as non-final.

        Returns whether the file now ends with an authentic final chunk.
        """
        last = chunks_on_disk(disk_size, self._chunk_size) - 1
        start = cipher_offset(last, self._chunk_size)
        piece = os.pread(self._fd, disk_size - start, start)
        return seal_last_chunk_final(self._fd, self._require_codec(), last, piece, disk_size)

    def _write_hole_run(self, first: int, last: int, final_length: int | None) -> None:
        """Format 2: chunks ``[first, last]`` (past the old tail) become one hole run.

        Only the 24-byte trailer of chunk ``last`` is written; its last chunk has
        ``final_length`` bytes and the final flag when that is given. If the old tail, the
        chunk before ``first``, ends a hole run, the rest of that run gets a marker first
        (so that those chunks read even if the file then stops growing): the old tail is
        then re-sealed as data (README.md, *Holes*), whose split finds that marker there.
        """
        codec = self._require_codec()
        chunk_size = self._chunk_size
        old_tail = first - 1
        if old_tail >= 0 and old_tail == (self._size - 1) // chunk_size:
            run = self._run_at(old_tail)
            if run is not None and run[0] < old_tail:
                self._overwrite(
                    [codec.run_marker(run[0], old_tail - 1, chunk_size, False)],
                    run_marker_offset(old_tail - 1, chunk_size, chunk_size),
                )
        start = cipher_offset(first, chunk_size)
        if self._disk_size > start:  # hole bodies must read as zeros: nothing stale there
            self._truncate_backing(start)
        length = chunk_size if final_length is None else final_length
        self._overwrite(
            [codec.run_marker(first, last, length, final_length is not None)],
            run_marker_offset(last, length, chunk_size),
        )

    def _run_lookup(self, zero_from: int, after: int) -> None:
        """Authenticate all-zero chunks ``[zero_from, after)`` by the run marker behind them."""
        generation, zeros_start, run_first, marker = self._known_zeros
        if (
            generation == self.disk_generation
            and run_first <= zero_from
            and zeros_start <= after <= marker
        ):
            return
        tail_index = (self._size - 1) // self._chunk_size
        found = next_run_marker(self._fd, self._require_codec(), after, self._disk_size, tail_index)
        if found is None or found[1] > zero_from:
            raise CorruptChunk(zero_from, f"chunk {zero_from} is zero outside a hole run")
        self._known_zeros = (self.disk_generation, zero_from, found[1], found[0])

    def _zeros_known(self, first: int, end: int) -> bool:
        """Whether chunks ``[first, end)`` lie in the hole run the last lookup proved."""
        generation, zeros_start, _, marker = self._known_zeros
        return generation == self.disk_generation and zeros_start <= first and end <= marker

    def _run_at(self, index: int) -> tuple[int, int, int, bool] | None:
        """Format 2: ``(first, last, length of last, final)`` of the hole run on disk that
        chunk ``index`` belongs to, or None (a data chunk, beyond the disk, or damaged)."""
        if index in self._data_chunks:
            return None
        codec = self._require_codec()
        chunk_size = self._chunk_size
        disk_size = self._disk_size if self._layout_end is None else self._layout_end
        start = cipher_offset(index, chunk_size)
        slot_length = min(self._stored_size, disk_size - start)
        if slot_length <= CHUNK_OVERHEAD:
            return None
        if (
            slot_length - CHUNK_OVERHEAD >= 8
            and os.pread(self._fd, NONCE_SIZE, start) != ZERO_NONCE
        ):
            return None  # a data chunk (the common case: 12 bytes read)
        slot = os.pread(self._fd, slot_length, start)
        if codec.is_zero(slot):
            found = next_run_marker(self._fd, codec, index + 1, disk_size)
            if found is None or found[1] > index:
                return None
            return found[1], found[0], found[2], found[3]
        disk_last = chunks_on_disk(disk_size, chunk_size) - 1
        for final in (index == disk_last, index != disk_last):
            first = codec.run_start(index, slot, final)
            if first is not None:
                return first, index, slot_length - CHUNK_OVERHEAD, final
        return None

    def _split_runs(
        self, first: int, last: int
    ) -> tuple[tuple[int, bytes] | None, tuple[int, bytes] | None]:
        """Format 2: the marker writes that keep hole runs around data chunks ``[first,
        last]`` valid: ``(offset, trailer)`` for the part of a run before ``first`` (to be
        written before the data) and for the part after ``last`` (after it)."""
        chunk_size = self._chunk_size
        disk_size = self._disk_size if self._layout_end is None else self._layout_end
        disk_chunks = chunks_on_disk(disk_size, chunk_size)
        if first >= disk_chunks:
            return None, None
        codec = self._require_codec()
        before = after = None
        run = self._run_at(first)
        if run is not None and run[0] < first:
            before = (
                run_marker_offset(first - 1, chunk_size, chunk_size),
                codec.run_marker(run[0], first - 1, chunk_size, False),
            )
        last_on_disk = min(last, disk_chunks - 1)
        if run is None or run[1] < last_on_disk:
            run = self._run_at(last_on_disk) if last_on_disk != first else None
        logical_tail = (self._size - 1) // chunk_size
        if run is not None and last < run[1] <= logical_tail:
            _, run_last, length, final = run
            after = (
                run_marker_offset(run_last, length, chunk_size),
                codec.run_marker(last + 1, run_last, length, final),
            )
        return before, after

    def _note_data_chunk(self, index: int) -> None:
        if len(self._data_chunks) >= 64 and index not in self._data_chunks:
            self._data_chunks.pop()  # any one: the set only saves a look at the disk
        self._data_chunks.add(index)

    def _cut_behind(self, index: int) -> None:
        """Before a shrinking truncate re-seals data chunk ``index`` as the final one, cut
        the chunks behind it off: the re-seal's undo record then fits in the room they
        free (on a full disk it would not fit past them), and what is dropped is what the
        truncate drops anyway. A kill right after leaves chunk ``index`` last but not
        final (``Truncated``); ``repair`` seals it final: the truncated file, up to the end
        of that chunk. A chunk of a hole run is left to ``flush``, which splits the run
        first (the zeros before it must stay covered by a marker)."""
        end = cipher_offset(index + 1, self._chunk_size)
        if end >= self._disk_size:
            return
        if os.pread(self._fd, NONCE_SIZE, cipher_offset(index, self._chunk_size)) == ZERO_NONCE:
            return  # a hole chunk (data chunks have a random nonce)
        self._truncate_backing(end)

    def _truncate_backing(self, length: int) -> None:
        self._data_chunks.clear()
        try:
            os.ftruncate(self._fd, length)
        finally:
            self.disk_generation += 1
        self._disk_size = length

    def _pwrite(self, buffers: list[Buffer], offset: int) -> None:
        total = sum(len(buffer) for buffer in buffers)
        try:
            if self._can_reserve and _may_need_blocks(self._fd, offset, total, self._disk_size):
                # an overwrite of stored chunks: allocate first, so that a full disk fails
                # here, before any byte changed, and not halfway through a chunk
                self._can_reserve = _reserve_space(self._fd, offset, total)
            written = os.pwritev(self._fd, buffers, offset)
            if written < total:  # short write (e.g. a full disk): finish or raise OSError
                rest = memoryview(b"".join(buffers))[written:]
                position = offset + written
                while rest:
                    written = os.pwrite(self._fd, rest, position)
                    rest = rest[written:]
                    position += written
        except BaseException:
            self._disk_size = os.fstat(self._fd).st_size
            raise
        finally:
            self.disk_generation += 1
        self._disk_size = max(self._disk_size, offset + total)
