"""Sealing and opening runs of chunks with AES-256-GCM (and authenticated hole chunks).

One :class:`ChunkCodec` per open file: it holds the file's single ``AESGCM`` object and
works on contiguous runs of chunks in one buffer — the shape of one ``pread``/``pwrite``.
Per chunk the Python work is a few slice operations and one call into OpenSSL; nonces for
a run come from one ``os.urandom`` call. No per-byte Python.
"""

from __future__ import annotations

import hmac
from collections.abc import Sequence
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
        "_scratch",
    )

    def __init__(self, keys: FileKeys, chunk_size: int) -> None:
        self.chunk_size = check_chunk_size(chunk_size)
        self.stored_size = chunk_size + CHUNK_OVERHEAD
        #: chunks sealed with this key by this object (see the spec's nonce bound)
        self.seal_count = 0
        self._aead = AESGCM(keys.chunk_key)
        self._file_id = keys.file_id
        self._hole_key = keys.hole_key
        #: plaintext of the last chunk opened by :meth:`open_part` (one chunk, reused)
        self._scratch: memoryview | None = None

    # ------------------------------------------------------------------------ helpers
    def aad(self, chunk_index: int, flags: int) -> bytes:
        """Associated data of a chunk: file id ‖ index (u64) ‖ flags (u8)."""
        return self._file_id + chunk_index.to_bytes(8, "big") + _FLAG_BYTE[flags]

    def hole_marker(self, chunk_index: int, length: int, final: bool) -> bytes:
        """The 16-byte tag of a hole chunk of ``length`` zero bytes."""
        flags = HOLE | (FINAL if final else 0)
        message = self.aad(chunk_index, flags) + length.to_bytes(4, "big")
        return hmac.digest(self._hole_key, message, "sha256")[:TAG_SIZE]

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
    ) -> None:
        """Open the run of chunks in ``cipher`` and write part of its plaintext to ``dest``.

        ``cipher`` holds chunks ``first_index, …`` back to back (only the last may be
        short). Plaintext bytes ``[skip, skip + len(dest))`` of the run (counted from the
        start of chunk ``first_index``) go to ``dest``. The chunk with index
        ``final_index`` must open as final, all others as non-final. Every chunk is
        authenticated before any of its bytes reach ``dest``; on failure ``dest`` is wiped
        and CorruptChunk / Truncated is raised.
        """
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

    def open_part(self, stored_chunk: memoryview, index: int, dest: memoryview, skip: int) -> None:
        """Open full-length, non-final chunk ``index`` and copy plaintext ``[skip, …)`` to ``dest``.

        The shortcut of one small read inside one chunk (the general case is
        :meth:`open_into`, which this falls back to for holes and failures).
        """
        nonce = stored_chunk[:NONCE_SIZE]
        if nonce == ZERO_NONCE:
            self.open_into(stored_chunk, index, dest, skip, -1)
            return
        aad = self._file_id + index.to_bytes(8, "big") + b"\x00"
        body = stored_chunk[NONCE_SIZE:]
        try:
            if skip == 0 and len(dest) == self.chunk_size:
                self._aead.decrypt_into(nonce, body, aad, dest)
            else:
                scratch = self._scratch
                if scratch is None:
                    scratch = self._scratch = memoryview(bytearray(self.chunk_size))
                self._aead.decrypt_into(nonce, body, aad, scratch)
                dest[:] = scratch[skip : skip + len(dest)]
        except InvalidTag:
            if self._scratch is not None:
                self._scratch[:] = bytes(self.chunk_size)
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
        if nonce == ZERO_NONCE and self._is_hole(index, view[start:chunk_end], flags):
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
        if bytes(view[:NONCE_SIZE]) == ZERO_NONCE and self._is_hole(chunk_index, view, flags):
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
