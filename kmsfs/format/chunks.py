"""Sealing and opening runs of chunks with AES-256-GCM (and authenticated hole chunks).

One :class:`ChunkCodec` per open file: it holds the file's single ``AESGCM`` object and
works on contiguous runs of chunks in one buffer — the shape of one ``pread``/``pwrite``.
Per chunk the Python work is a few slice operations and one call into OpenSSL; nonces for
a run come from one ``os.urandom`` call. No per-byte Python.
"""

from __future__ import annotations

import hmac
import threading
from collections.abc import Callable, Sequence
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from kmsfs.errors import CorruptChunk, FormatError, Truncated
from kmsfs.format import _rng
from kmsfs.format.keys import FileKeys
from kmsfs.format.offsets import CHUNK_OVERHEAD, NONCE_SIZE, TAG_SIZE, check_chunk_size

FINAL = 0x01
HOLE = 0x02
_FLAG_BYTE = (b"\x00", b"\x01", b"\x02", b"\x03")
ZERO_NONCE = bytes(NONCE_SIZE)
#: format version 2 stores one marker per run of hole chunks (README.md, *Holes*)
RUNS_VERSION = 2
#: a v2 marker chunk ends in: first index of the run (u64) ‖ marker (16)
RUN_TRAILER = 8 + TAG_SIZE
#: ``bytes(stored_size)`` per stored chunk size, shared by every codec (immutable): one
#: per codec cost each open file 64 KiB (issue 19)
_ZEROS: dict[int, bytes] = {}


class _OpenScratch(threading.local):
    """The buffer :meth:`ChunkCodec.open_part` decrypts into, one per thread and chunk
    size rather than one per codec (an open file then kept a chunk of plaintext, 64 KiB,
    after its first small read: issue 19). Sharing is safe: it is used and wiped within
    one synchronous call, so no other file's request (a trio task switches only at an
    await) or thread (one buffer each) can use it meanwhile."""

    def __init__(self) -> None:
        self.by_size: dict[int, memoryview] = {}


_open_scratch = _OpenScratch()


def _zeros_of(size: int) -> bytes:
    zeros = _ZEROS.get(size)
    if zeros is None:
        zeros = _ZEROS[size] = bytes(size)
    return zeros


#: ``run_lookup(zero_from, after)``: authenticate chunks ``[zero_from, after)``, which are
#: all zero, by the first non-zero chunk at or after ``after`` (raise if it is not the
#: marker of a run that starts at or before ``zero_from``)
RunLookup = Callable[[int, int], None]

Buffer = Any  # bytes, bytearray, memoryview: anything with the buffer protocol


class ChunkCodec:
    """Seals and opens the chunks of one file (one key, one file id, one chunk size)."""

    __slots__ = (
        "chunk_size",
        "stored_size",
        "seal_count",
        "_aead",
        "_file_id",
        "_hole_key",
        "_zeros",
        "version",
    )

    def __init__(self, keys: FileKeys, chunk_size: int, version: int = RUNS_VERSION) -> None:
        self.chunk_size = check_chunk_size(chunk_size)
        #: format version of the file: 1 has a marker per hole chunk, 2 one per run
        self.version = version
        self.stored_size = chunk_size + CHUNK_OVERHEAD
        #: chunks sealed with this key by this object (see the spec's nonce bound)
        self.seal_count = 0
        self._aead = AESGCM(keys.chunk_key)
        self._file_id = keys.file_id
        self._hole_key = keys.hole_key
        self._zeros = _zeros_of(self.stored_size)

    @property
    def runs(self) -> bool:
        """Whether holes are stored as runs with one marker each (format version 2)."""
        return self.version >= RUNS_VERSION

    def is_zero(self, stored_chunk: Buffer) -> bool:
        """Whether every byte of a stored chunk (at most one stored chunk long) is zero."""
        view = memoryview(stored_chunk)
        return view.tobytes() == self._zeros[: len(view)]

    # ------------------------------------------------------------------------ helpers
    def aad(self, chunk_index: int, flags: int) -> bytes:
        """Associated data of a chunk: file id ‖ index (u64) ‖ flags (u8)."""
        return self._file_id + chunk_index.to_bytes(8, "big") + _FLAG_BYTE[flags]

    def hole_marker(self, chunk_index: int, length: int, final: bool) -> bytes:
        """The 16-byte tag of a hole chunk of ``length`` zero bytes."""
        flags = HOLE | (FINAL if final else 0)
        message = self.aad(chunk_index, flags) + length.to_bytes(4, "big")
        return hmac.digest(self._hole_key, message, "sha256")[:TAG_SIZE]

    def run_marker(self, first_index: int, last_index: int, length: int, final: bool) -> bytes:
        """The 24-byte trailer of the last chunk of a hole run ``[first_index, last_index]``.

        ``first_index`` (u64) ‖ HMAC-SHA256(hole key, file id ‖ first (u64) ‖ last (u64) ‖
        flags ‖ length of the last chunk (u32))[:16]; ``length`` is that chunk's plaintext length.
        """
        flags = HOLE | (FINAL if final else 0)
        first = first_index.to_bytes(8, "big")
        message = (
            self._file_id
            + first
            + last_index.to_bytes(8, "big")
            + _FLAG_BYTE[flags]
            + length.to_bytes(4, "big")
        )
        return first + hmac.digest(self._hole_key, message, "sha256")[:TAG_SIZE]

    def run_start(self, chunk_index: int, stored_chunk: Buffer, final: bool) -> int | None:
        """If the stored chunk is a valid run marker chunk ending a run at ``chunk_index``
        (all zero but its 24-byte trailer), the first index of that run; else None."""
        view = memoryview(stored_chunk)
        size = len(view)
        length = size - CHUNK_OVERHEAD
        if length <= 0 or not self.is_zero(view[: size - RUN_TRAILER]):
            return None
        trailer = bytes(view[size - RUN_TRAILER :])
        first = int.from_bytes(trailer[:8], "big")
        if first > chunk_index:
            return None
        if hmac.compare_digest(self.run_marker(first, chunk_index, length, final), trailer):
            return first
        return None

    # -------------------------------------------------------------------------- seal
    def seal_into(
        self, out: memoryview, first_index: int, plaintexts: Sequence[Buffer], final: bool
    ) -> int:
        """Seal ``plaintexts`` as chunks ``first_index, first_index+1, …`` into ``out``.

        Every plaintext but the last must be exactly one chunk long; the last is sealed
        as the final chunk when ``final``. Chunk ``j`` lands at ``out[j*S:]``. Returns the
        number of bytes of ``out`` used. Each chunk gets a fresh random nonce.
        """
        count = len(plaintexts)
        if count == 0:
            return 0
        chunk_size = self.chunk_size
        last = count - 1
        for j in range(last):
            if len(plaintexts[j]) != chunk_size:
                raise ValueError("only the last chunk of a run may be short")
        stored = self.stored_size
        last_length = len(plaintexts[last])
        end = last * stored + NONCE_SIZE + last_length + TAG_SIZE
        if not 0 < last_length <= chunk_size or len(out) < end:
            raise ValueError("empty or oversized last chunk, or output buffer too small")
        nonces = memoryview(_rng.random_bytes(NONCE_SIZE * count))
        encrypt_into = self._aead.encrypt_into
        prefix = self._file_id
        position = 0
        for index in range(first_index, first_index + last):  # full, non-final chunks
            nonce = nonces[:NONCE_SIZE]
            nonces = nonces[NONCE_SIZE:]
            out[position : position + NONCE_SIZE] = nonce
            encrypt_into(
                nonce,
                plaintexts[index - first_index],
                prefix + index.to_bytes(8, "big") + b"\x00",
                out[position + NONCE_SIZE : position + stored],
            )
            position += stored
        out[position : position + NONCE_SIZE] = nonces
        encrypt_into(
            nonces,
            plaintexts[last],
            self.aad(first_index + last, FINAL if final else 0),
            out[position + NONCE_SIZE : end],
        )
        self.seal_count += count
        return end

    # -------------------------------------------------------------------------- open
    def open_into(
        self,
        cipher: Buffer,
        first_index: int,
        dest: memoryview,
        skip: int,
        final_index: int,
        run_lookup: RunLookup | None = None,
        zeros_from: int | None = None,
    ) -> None:
        """Open the run of chunks in ``cipher`` and write part of its plaintext to ``dest``.

        ``cipher`` holds chunks ``first_index, …`` back to back (only the last may be
        short). Plaintext bytes ``[skip, skip + len(dest))`` of the run (counted from the
        start of chunk ``first_index``) go to ``dest``. The chunk with index
        ``final_index`` must open as final, all others as non-final. Every chunk is
        authenticated before any of its bytes reach ``dest``; on failure ``dest`` is wiped
        and CorruptChunk / Truncated is raised.

        Format 2: all-zero chunks are authenticated by the marker at the end of their run.
        When a stretch of them reaches the end of ``cipher`` (and the file goes on),
        ``run_lookup(zero_from, after)`` must authenticate it from the backing file (or
        raise); without one that is CorruptChunk. ``zeros_from``: chunks ``[zeros_from,
        first_index)`` before ``cipher`` were all zero and are still to be authenticated
        by the first non-zero chunk here (streams).
        """
        if self.version >= RUNS_VERSION:
            try:
                self._open_runs(
                    memoryview(cipher), first_index, dest, skip, final_index, run_lookup, zeros_from
                )
            except FormatError:
                dest[:] = bytes(len(dest))
                raise
            return
        self._open_chunks(cipher, first_index, dest, skip, final_index)

    def _open_runs(
        self,
        view: memoryview,
        first_index: int,
        dest: memoryview,
        skip: int,
        final_index: int,
        run_lookup: RunLookup | None,
        zeros_from: int | None,
    ) -> None:
        """Format 2: data chunks in spans (the fast loop), hole runs resolved once each."""
        chunk_size = self.chunk_size
        stored = self.stored_size
        total = len(view)
        count = -(-total // stored)
        if zeros_from is None and total - (count - 1) * stored >= CHUNK_OVERHEAD + 8:
            for start in range(0, total, stored):
                if view[start : start + NONCE_SIZE] == ZERO_NONCE:
                    break
            else:  # no zero nonce field, so no hole chunk: all data (the common case)
                self._open_chunks(view, first_index, dest, skip, final_index)
                return
        want_end = skip + len(dest)
        pending = zeros_from  # first index of all-zero chunks not yet authenticated
        span = 0  # first j of the current span of data chunks

        def open_span(end_j: int) -> None:
            if end_j <= span:
                return
            plain_low = span * chunk_size
            cipher_end = min(end_j * stored, total)
            plain_high = plain_low + cipher_end - span * stored - (end_j - span) * CHUNK_OVERHEAD
            low = min(max(skip, plain_low), plain_high)
            high = max(low, min(want_end, plain_high))
            self._open_chunks(
                view[span * stored : cipher_end],
                first_index + span,
                dest[low - skip : high - skip],
                low - plain_low,
                final_index,
            )

        def zero_fill(from_index: int, to_index: int) -> None:  # chunks [from, to] of cipher
            low = max(skip, (max(from_index, first_index) - first_index) * chunk_size)
            end_plain = (to_index - first_index) * chunk_size + min(
                chunk_size, total - (to_index - first_index) * stored - CHUNK_OVERHEAD
            )
            high = min(want_end, end_plain)
            if high > low:
                dest[low - skip : high - skip] = bytes(high - low)

        zero_prefix = ZERO_NONCE
        for j in range(count):
            start = j * stored
            index = first_index + j
            end = min(start + stored, total)
            short_final = end - start - CHUNK_OVERHEAD < 8
            if view[start : start + NONCE_SIZE] != zero_prefix and not short_final:
                if pending is not None:
                    raise CorruptChunk(pending, f"chunk {pending} is zero outside a hole run")
                continue  # a data chunk: opened with its span
            piece = view[start:end]
            if self.is_zero(piece):
                open_span(j)
                span = j + 1
                if pending is None:
                    pending = index
                continue
            first = self.run_start(index, piece, index == final_index)
            if first is None:
                if pending is not None:
                    raise CorruptChunk(pending, f"chunk {pending} is zero outside a hole run")
                continue  # not a marker: opened (and failing) as data with its span
            open_span(j)
            span = j + 1
            if pending is not None and first > pending:
                raise CorruptChunk(pending, f"chunk {pending} is zero outside a hole run")
            zero_fill(index if pending is None else pending, index)
            pending = None
        open_span(count)
        if pending is not None:
            if first_index <= final_index < first_index + count or run_lookup is None:
                raise CorruptChunk(pending, f"chunk {pending} is zero outside a hole run")
            run_lookup(pending, first_index + count)
            zero_fill(pending, first_index + count - 1)

    def _open_chunks(
        self,
        cipher: Buffer,
        first_index: int,
        dest: memoryview,
        skip: int,
        final_index: int,
    ) -> None:
        """Open data chunks (and format-1 hole chunks): the general loop of open_into."""
        chunk_size = self.chunk_size
        stored = self.stored_size
        total = len(cipher)
        want_end = skip + len(dest)
        view = memoryview(cipher)
        count = -(-total // stored)
        # The hot loop: chunks wholly inside the window, not final, not holes, go straight
        # from ``cipher`` into ``dest`` with nothing but slicing per chunk.
        fast_low = -(-skip // chunk_size)
        fast_high = min(want_end // chunk_size, total // stored, count)
        if first_index <= final_index < first_index + fast_high:
            fast_high = max(fast_low, final_index - first_index)
        for j in range(min(fast_low, count)):
            self._open_one(view, first_index, j, dest, skip, want_end, final_index)
        if fast_low < fast_high:
            decrypt_into = self._aead.decrypt_into
            prefix = self._file_id
            zero = ZERO_NONCE
            start = fast_low * stored
            plain = fast_low * chunk_size - skip
            for index in range(first_index + fast_low, first_index + fast_high):
                nonce = view[start : start + NONCE_SIZE]
                if nonce == zero:
                    self._open_one(
                        view, first_index, index - first_index, dest, skip, want_end, final_index
                    )
                else:
                    try:
                        decrypt_into(
                            nonce,
                            view[start + NONCE_SIZE : start + stored],
                            prefix + index.to_bytes(8, "big") + b"\x00",
                            dest[plain : plain + chunk_size],
                        )
                    except InvalidTag:
                        self._fail(dest, self.diagnose(index, view[start : start + stored], 0))
                start += stored
                plain += chunk_size
        for j in range(max(fast_high, fast_low), count):
            self._open_one(view, first_index, j, dest, skip, want_end, final_index)

    def open_part(
        self,
        stored_chunk: memoryview,
        index: int,
        dest: memoryview,
        skip: int,
        run_lookup: RunLookup | None = None,
    ) -> None:
        """Open full-length, non-final chunk ``index`` and copy plaintext ``[skip, …)`` to ``dest``.

        The shortcut of one small read inside one chunk (the general case is
        :meth:`open_into`, which this falls back to for holes and failures).
        """
        nonce = stored_chunk[:NONCE_SIZE]
        if nonce == ZERO_NONCE:
            self.open_into(stored_chunk, index, dest, skip, -1, run_lookup)
            return
        aad = self._file_id + index.to_bytes(8, "big") + b"\x00"
        body = stored_chunk[NONCE_SIZE:]
        try:
            if skip == 0 and len(dest) == self.chunk_size:
                self._aead.decrypt_into(nonce, body, aad, dest)
            else:
                scratch = _open_scratch.by_size.get(self.chunk_size)
                if scratch is None:
                    scratch = memoryview(bytearray(self.chunk_size))
                    _open_scratch.by_size[self.chunk_size] = scratch
                self._aead.decrypt_into(nonce, body, aad, scratch)
                dest[:] = scratch[skip : skip + len(dest)]
        except InvalidTag:
            wiped = _open_scratch.by_size.get(self.chunk_size)
            if wiped is not None:
                wiped[:] = _zeros_of(self.chunk_size)
            self._fail(dest, self.diagnose(index, stored_chunk, 0))

    def _open_one(
        self,
        view: memoryview,
        first_index: int,
        j: int,
        dest: memoryview,
        skip: int,
        want_end: int,
        final_index: int,
    ) -> None:
        """Open chunk ``j`` of the run, whatever its kind (the general, slower path)."""
        stored = self.stored_size
        index = first_index + j
        start = j * stored
        chunk_end = min(start + stored, len(view))
        length = chunk_end - start - CHUNK_OVERHEAD
        if length <= 0:
            self._fail(dest, CorruptChunk(index, f"chunk {index} is shorter than its overhead"))
        plain_start = j * self.chunk_size
        low = max(plain_start, skip)
        high = min(plain_start + length, want_end)
        flags = FINAL if index == final_index else 0
        nonce = bytes(view[start : start + NONCE_SIZE])
        if (
            nonce == ZERO_NONCE
            and self.version < RUNS_VERSION
            and self._is_hole(index, view[start:chunk_end], flags)
        ):
            if high > low:
                dest[low - skip : high - skip] = bytes(high - low)
            return
        aad = self.aad(index, flags)
        body = view[start + NONCE_SIZE : chunk_end]
        try:
            if low >= high:  # not wanted, but never skipped unauthenticated
                self._aead.decrypt(nonce, body, aad)
            elif low == plain_start and high == plain_start + length:
                self._aead.decrypt_into(nonce, body, aad, dest[low - skip : high - skip])
            else:
                plaintext = self._aead.decrypt(nonce, body, aad)
                dest[low - skip : high - skip] = plaintext[low - plain_start : high - plain_start]
        except InvalidTag:
            self._fail(dest, self.diagnose(index, view[start:chunk_end], flags))

    def open_chunk(self, stored_chunk: Buffer, chunk_index: int, final: bool) -> bytes:
        """Open one stored chunk (nonce ‖ ciphertext ‖ tag, or a hole) and return its plaintext."""
        length = len(stored_chunk) - CHUNK_OVERHEAD
        if length <= 0:
            raise CorruptChunk(chunk_index, f"chunk {chunk_index} has an impossible length")
        out = bytearray(length)
        self.open_into(
            bytes(stored_chunk), chunk_index, memoryview(out), 0, chunk_index if final else -1
        )
        return bytes(out)

    # ----------------------------------------------------------------- slow paths
    @staticmethod
    def _fail(dest: memoryview, error: FormatError) -> None:
        dest[:] = bytes(len(dest))  # never leave unauthenticated plaintext behind
        raise error

    def _is_hole(self, chunk_index: int, stored_chunk: memoryview, flags: int) -> bool:
        """Format 1: whether the stored chunk is a valid hole chunk of its own."""
        length = len(stored_chunk) - CHUNK_OVERHEAD
        body = bytes(stored_chunk[: NONCE_SIZE + length])
        if body != bytes(NONCE_SIZE + length):
            return False
        marker = self.hole_marker(chunk_index, length, bool(flags & FINAL))
        return hmac.compare_digest(marker, bytes(stored_chunk[NONCE_SIZE + length :]))

    def authenticates(self, chunk_index: int, stored_chunk: Buffer, flags: int) -> bool:
        """Whether the stored chunk opens (as data or as a hole) with these flags."""
        view = memoryview(stored_chunk)
        if len(view) <= CHUNK_OVERHEAD:
            return False
        if self.version >= RUNS_VERSION:
            if self.run_start(chunk_index, view, bool(flags & FINAL)) is not None:
                return True  # (an all-zero chunk needs its run: see open_into)
        elif bytes(view[:NONCE_SIZE]) == ZERO_NONCE and self._is_hole(chunk_index, view, flags):
            return True
        try:
            self._aead.decrypt(
                bytes(view[:NONCE_SIZE]), view[NONCE_SIZE:], self.aad(chunk_index, flags)
            )
        except InvalidTag:
            return False
        return True

    def diagnose(self, chunk_index: int, stored_chunk: Buffer, flags: int) -> FormatError:
        """The error for a chunk that failed to open with ``flags`` (FINAL or 0)."""
        if self.authenticates(chunk_index, stored_chunk, flags ^ FINAL):
            if flags & FINAL:
                return Truncated(
                    f"the file ends after chunk {chunk_index}, which is not its final chunk"
                )
            return CorruptChunk(chunk_index + 1, f"data after the final chunk {chunk_index}")
        return CorruptChunk(chunk_index)
