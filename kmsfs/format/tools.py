"""Offline tools on one ciphertext file: ``inspect`` (no key), ``verify`` and ``repair``.

``inspect`` reads the header and the file size only. ``verify`` unlocks the header and
authenticates every chunk in batches (bounded memory), and reports the first bad chunk
by index and byte offsets, the last bad chunk and how many fail, and how much of the file
is an authentic prefix — what is needed to tell a crash from an attack (README.md,
*Crashes*). ``repair`` first puts back the chunks of an undo record (what a rewrite in
place killed half-way leaves), then keeps the authentic prefix and re-seals its last
chunk as final.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field

from kmsfs.errors import CorruptChunk, CorruptHeader, FormatError, Truncated
from kmsfs.format.chunks import FINAL, ChunkCodec
from kmsfs.format.file import (
    find_undo_record,
    first_data_chunk,
    hole_prefix,
    next_run_marker,
    restore_undo_record,
    seal_last_chunk_final,
)
from kmsfs.format.header import Header, SlotState, read_header, unlock_header
from kmsfs.format.keys import DataKeyProvider
from kmsfs.format.offsets import (
    CHUNK_OVERHEAD,
    HEADER_SIZE,
    cipher_offset,
    plaintext_size,
)

PathOrFd = str | os.PathLike[str] | int
_VERIFY_BATCH_BYTES = 4 << 20


@dataclass(frozen=True)
class HeaderInfo:
    """What a file's header says (not authenticated: ``inspect`` uses no key)."""

    ciphertext_size: int
    plaintext_size: int | None  # None when the file size is impossible
    empty: bool = False  # an empty file has no header: every other field is None
    format_version: int | None = None
    chunk_size: int | None = None
    file_id: str | None = None  # 32 hex digits
    key_arn: str | None = None
    wrapped_key: bytes | None = field(default=None, repr=False)
    encryption_context: dict[str, str] = field(default_factory=dict)  # the stored entries
    key_slot: int | None = None
    key_generation: int | None = None
    #: the active slot's kind: "KMS_BLOB" (the key service's blob) or "RSAES_OAEP_SHA_256"
    #: (wrapped to a recipient's public key, format version 3)
    slot_kind: str | None = None
    inactive_slot: str | None = None  # "empty", "valid" (older wrapping) or "damaged"
    size_problem: str | None = None


@dataclass
class VerifyReport:
    """The result of :func:`verify`. ``error`` is the first problem, as its typed exception."""

    info: HeaderInfo
    chunks: int = 0  # chunks present on disk
    bad_chunks: int = 0
    first_bad_chunk: int | None = None
    first_bad_plaintext_offset: int | None = None
    first_bad_cipher_offset: int | None = None
    last_bad_chunk: int | None = None
    authentic_size: int = 0  # plaintext bytes before the first problem, all authentic
    error: FormatError | None = None
    warnings: list[str] = field(default_factory=list)
    #: a final chunk before the end: what an append interrupted before it re-sealed the
    #: old final chunk leaves (``repair`` restores the file before the append)
    interrupted_append: bool = False
    #: the first chunk of an undo record at the end: a rewrite in place of that chunk (and
    #: maybe the next ones) was interrupted (``repair`` puts the copied chunks back)
    interrupted_rewrite: int | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@contextmanager
def _opened(path_or_fd: PathOrFd, writable: bool = False) -> Iterator[int]:
    if isinstance(path_or_fd, int):
        yield path_or_fd
        return
    fd = os.open(path_or_fd, (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC)
    try:
        yield fd
    finally:
        os.close(fd)


def _info(header: Header | None, disk_size: int) -> HeaderInfo:
    if header is None:
        return HeaderInfo(ciphertext_size=0, plaintext_size=0, empty=True)
    problem = None
    try:
        size: int | None = plaintext_size(disk_size, header.chunk_size)
    except FormatError as error:
        size, problem = None, str(error)
    if disk_size == HEADER_SIZE:
        problem = "a header without chunks"
    slot = header.active_slot
    return HeaderInfo(
        ciphertext_size=disk_size,
        plaintext_size=size,
        format_version=header.version,
        chunk_size=header.chunk_size,
        file_id=header.file_id.hex(),
        key_arn=slot.key_arn,
        wrapped_key=slot.wrapped_key,
        encryption_context=dict(header.context),
        key_slot=header.active,
        key_generation=slot.generation,
        slot_kind=slot.kind.name,
        inactive_slot=header.inactive_state.value,
        size_problem=problem,
    )


def inspect(path_or_fd: PathOrFd) -> HeaderInfo:
    """Header fields and sizes, without a key. CorruptHeader or UnsupportedFormat if unparseable."""
    with _opened(path_or_fd) as fd:
        disk_size = os.fstat(fd).st_size
        header = read_header(fd) if disk_size else None
        return _info(header, disk_size)


def _slot_warnings(header: Header) -> list[str]:
    inactive = 1 - header.active
    state = header.inactive_state
    if state is SlotState.DAMAGED:
        return [
            f"key slot {inactive} is damaged: an interrupted rewrap, or tampering; "
            "it is not used, and the next rewrap overwrites it"
        ]
    if state is SlotState.VALID:
        return [
            f"key slot {inactive} still holds an older wrapping: a rewrap was interrupted "
            "before it erased it; rewrap again to finish"
        ]
    return []


def verify(
    path_or_fd: PathOrFd,
    *,
    key_provider: DataKeyProvider,
    encryption_context: Mapping[str, str] | None = None,
) -> VerifyReport:
    """Authenticate the header and every chunk; report instead of raising on bad data.

    Key-service failures other than a rejected blob (missing key, keyd down) still raise.
    """
    with _opened(path_or_fd) as fd:
        disk_size = os.fstat(fd).st_size
        if disk_size == 0:
            return VerifyReport(info=_info(None, 0))
        try:
            header = read_header(fd)
            info = _info(header, disk_size)
            keys = unlock_header(header, key_provider, encryption_context)
        except FormatError as error:
            try:
                partial_info = inspect(fd)
            except FormatError:
                partial_info = HeaderInfo(ciphertext_size=disk_size, plaintext_size=None)
            return VerifyReport(info=partial_info, error=error)
        report = VerifyReport(
            info=info, authentic_size=info.plaintext_size or 0, warnings=_slot_warnings(header)
        )
        codec = ChunkCodec(keys, header.chunk_size, header.version)
        undo = find_undo_record(fd, disk_size, codec)
        if undo is None:
            _scan_chunks(fd, disk_size, header, codec, report)
            return report
        # the file as it was when the copy was made, with the chunks being rewritten
        _scan_chunks(fd, undo.restore_length, header, codec, report)
        index = undo.first_index
        report.interrupted_rewrite = index
        if report.first_bad_chunk is None or report.first_bad_chunk >= index:
            report.error = None
            _record(
                report,
                index,
                header.chunk_size,
                CorruptChunk(
                    index,
                    "a rewrite in place was interrupted here; the copy of what was "
                    "there, after the end of the file, puts it back (repair)",
                ),
            )
        return report


def _scan_chunks(
    fd: int, disk_size: int, header: Header, codec: ChunkCodec, report: VerifyReport
) -> None:
    chunk_size = header.chunk_size
    stored = chunk_size + CHUNK_OVERHEAD
    chunk_total = -(-(disk_size - HEADER_SIZE) // stored)
    report.chunks = chunk_total
    if chunk_total == 0:
        _record(report, 0, chunk_size, Truncated("the file has a header but no chunk"))
        return
    final_index = chunk_total - 1
    batch = max(1, _VERIFY_BATCH_BYTES // stored)
    scratch = memoryview(bytearray(batch * chunk_size))
    after_final = False

    def covered(zero_from: int, after: int) -> bool:
        """Format 2: whether all-zero chunks from ``zero_from`` end in a run that covers them."""
        found = next_run_marker(fd, codec, after, disk_size, final_index)
        return found is not None and found[1] <= zero_from

    def run_lookup(zero_from: int, after: int) -> None:
        if not covered(zero_from, after):
            raise CorruptChunk(zero_from)

    bad_indexes: list[int] = []
    final_run_end = 0  # zero chunks before this lie in a final run followed by more data
    for first in range(0, chunk_total, batch):
        end = min(chunk_total, first + batch)
        start = cipher_offset(first, chunk_size)
        length = min(disk_size, cipher_offset(end, chunk_size)) - start
        skipped = hole_prefix(fd, start, length) if codec.runs else 0  # a run's sparse body
        cipher = bytes(skipped) + os.pread(fd, length - skipped, start + skipped)
        if not after_final:
            try:  # the fast path: the whole batch is fine
                length = max(0, len(cipher) - (end - first) * CHUNK_OVERHEAD)
                codec.open_into(cipher, first, scratch[:length], 0, final_index, run_lookup)
                continue
            except FormatError:
                pass
        view = memoryview(cipher)
        for index in range(first, end):
            piece = view[(index - first) * stored : (index - first + 1) * stored]
            if after_final:
                bad_indexes.append(index)
                continue
            flags = FINAL if index == final_index else 0
            if len(piece) > CHUNK_OVERHEAD and codec.authenticates(index, piece, flags):
                continue
            if (
                codec.runs
                and index != final_index
                and codec.is_zero(piece)
                and (
                    index < final_run_end
                    or covered(index, index + 1)
                    or (final_run_end := _final_run_end(fd, codec, index, disk_size)) > index
                )
            ):
                continue  # (data after a final run is reported at its marker chunk)
            error = codec.diagnose(index, piece, flags)
            short_final = None
            if isinstance(error, CorruptChunk) and error.chunk_index == index and not flags:
                short_final = _short_final_length(codec, index, piece)
            if short_final is not None:
                # a short final chunk, a gap of zeros, more chunks: an interrupted append
                after_final = report.interrupted_append = True
                recorded = report.error is None
                _record(report, index + 1, chunk_size, CorruptChunk(index + 1, _AFTER % index))
                if recorded:
                    report.authentic_size = index * chunk_size + short_final
                continue
            if isinstance(error, CorruptChunk) and error.chunk_index != index:
                # this chunk is a final chunk in the middle
                after_final = report.interrupted_append = True
                _record(report, error.chunk_index, chunk_size, error)
                continue
            if isinstance(error, Truncated):
                _record(report, chunk_total, chunk_size, error)
                continue
            bad_indexes.append(index)
            _record(report, index, chunk_size, error)
    report.bad_chunks = len(bad_indexes)
    if bad_indexes:
        report.last_bad_chunk = bad_indexes[-1]


_AFTER = "data after the final chunk %d"


def _final_run_end(fd: int, codec: ChunkCodec, index: int, disk_size: int) -> int:
    """Format 2: if zero chunk ``index`` lies in a run whose marker chunk is final but not
    the last on disk (an interrupted append after a final hole run), that marker's index;
    else 0."""
    found = first_data_chunk(fd, codec, index + 1, disk_size)
    if found is None:
        return 0
    marker, slot = found
    first = codec.run_start(marker, slot, True)
    if first is None:  # a short final marker chunk, zeros up to the next slot
        length = _short_final_length(codec, marker, memoryview(slot))
        if length is not None:
            first = codec.run_start(marker, slot[: length + CHUNK_OVERHEAD], True)
    return marker if first is not None and first <= index else 0


def _short_final_length(codec: ChunkCodec, index: int, piece: memoryview) -> int | None:
    """The plaintext length if ``piece`` starts with a short chunk sealed as final and
    continues with zeros (what an append leaves before it re-seals the old final chunk:
    the new chunks start at the next chunk boundary, the gap is still a hole)."""
    data = bytes(piece)
    end = len(data.rstrip(b"\0"))
    for candidate in range(max(end, CHUNK_OVERHEAD + 1), min(len(data), end + 8) + 1):
        if candidate < len(data) and codec.authenticates(index, data[:candidate], FINAL):
            return candidate - CHUNK_OVERHEAD
    return None


def _record(report: VerifyReport, chunk_index: int, chunk_size: int, error: FormatError) -> None:
    if report.error is not None:
        return
    report.error = error
    report.first_bad_chunk = chunk_index
    report.first_bad_plaintext_offset = chunk_index * chunk_size
    report.first_bad_cipher_offset = cipher_offset(chunk_index, chunk_size)
    report.authentic_size = (
        report.info.plaintext_size or 0
        if isinstance(error, Truncated)
        else chunk_index * chunk_size
    )


def repair(
    path_or_fd: PathOrFd,
    *,
    key_provider: DataKeyProvider,
    encryption_context: Mapping[str, str] | None = None,
    report: VerifyReport | None = None,
) -> int:
    """Undo an interrupted rewrite, cut the file after its authentic prefix and re-seal the
    prefix's last chunk as final.

    For a file whose tail a crash or a failed write left cut or torn (``verify`` says so):
    an undo record at the end (a rewrite in place that was interrupted) is put back first,
    which restores every chunk it copied byte for byte; then an interrupted append (the
    old final chunk followed by chunks that cannot belong to the file) is cut back to the
    old final chunk, exactly the file before the append; a file whose last chunk is not
    final gets that chunk re-sealed as final. Returns the new plaintext size; a sound file
    is left alone. A bad header cannot be repaired (raises). Everything after the first
    bad chunk is dropped, even chunks that authenticate. ``report``: what ``verify`` just
    said about this file (saves reading it again).
    """
    if report is None or report.interrupted_rewrite is not None:
        report = verify(
            path_or_fd, key_provider=key_provider, encryption_context=encryption_context
        )
    if report.ok:
        return report.info.plaintext_size or 0
    if report.first_bad_chunk is None or isinstance(report.error, CorruptHeader):
        assert report.error is not None
        raise report.error
    with _opened(path_or_fd, writable=True) as fd:
        header = read_header(fd)
        codec = ChunkCodec(
            unlock_header(header, key_provider, encryption_context),
            header.chunk_size,
            header.version,
        )
        chunk_size = header.chunk_size
        if report.interrupted_rewrite is not None:
            undo = find_undo_record(fd, os.fstat(fd).st_size, codec)
            assert undo is not None, "verify found it"
            restore_undo_record(fd, undo, chunk_size)
            os.fsync(fd)
            report = verify(fd, key_provider=key_provider, encryption_context=encryption_context)
            if report.ok:
                return report.info.plaintext_size or 0
            if report.first_bad_chunk is None:
                assert report.error is not None
                raise report.error
        keep = report.authentic_size
        if keep == 0:
            os.ftruncate(fd, 0)
            os.fsync(fd)
            return 0
        last = (keep - 1) // chunk_size
        start = cipher_offset(last, chunk_size)
        piece = os.pread(fd, keep - last * chunk_size + CHUNK_OVERHEAD, start)
        if not seal_last_chunk_final(fd, codec, last, piece, os.fstat(fd).st_size):
            raise CorruptChunk(last, f"chunk {last} cannot be sealed as final")
        os.fsync(fd)
        return keep
