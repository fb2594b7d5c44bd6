"""Streaming encryption and decryption in bounded memory (pipes, sockets, any stream).

Both directions work on batches of chunks held in two fixed buffers (``BATCH_BYTES`` of
plaintext and the matching ciphertext), whatever the size of the input: memory use does
not grow with the data. The encryptor seals each chunk exactly once; it holds back the
last full chunk of a batch until it knows whether more input follows (the final flag).

Decryption of a stream necessarily writes the plaintext of early chunks before it has
seen the end: a stream cut short or tampered with late is reported by an exception
*after* the authentic prefix was written. Every byte written is authenticated; callers
that must not keep a prefix (the CLI writing to a file) delete the output on error.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import BinaryIO

from kmsfs.errors import CorruptChunk, CorruptHeader, Truncated
from kmsfs.format.chunks import ChunkCodec
from kmsfs.format.header import Header, create_header, unlock_header
from kmsfs.format.keys import DataKeyProvider
from kmsfs.format.offsets import CHUNK_OVERHEAD, DEFAULT_CHUNK_SIZE, HEADER_SIZE

#: plaintext bytes per batch (and so, roughly, each of the two buffers)
BATCH_BYTES = 4 << 20


def _readinto(src: BinaryIO, view: memoryview) -> int:
    readinto = getattr(src, "readinto", None)
    if readinto is not None:
        count = readinto(view)
    else:
        data = src.read(len(view))
        count = None if data is None else len(data)
        if count:
            view[:count] = data
    if count is None:
        raise BlockingIOError("the source stream has no data ready (non-blocking)")
    return count


def _fill(src: BinaryIO, view: memoryview, filled: int) -> tuple[int, bool]:
    """Read until ``view`` is full or the stream ends; returns (filled, at_eof)."""
    while filled < len(view):
        count = _readinto(src, view[filled:])
        if count == 0:
            return filled, True
        filled += count
    return filled, False


def _write_all(dst: BinaryIO, data: memoryview | bytes) -> None:
    view = memoryview(data)
    while view:
        count = dst.write(view)
        if count is None:
            raise BlockingIOError("the destination stream would block (non-blocking)")
        view = view[count:]


def encrypt_stream(
    src: BinaryIO,
    dst: BinaryIO,
    *,
    key_provider: DataKeyProvider,
    key_id: str,
    encryption_context: Mapping[str, str] | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> int:
    """Encrypt everything ``src`` yields into ``dst``; returns the plaintext byte count.

    An empty input gives an empty output (no header, no key request).
    """
    batch_chunks = max(2, BATCH_BYTES // chunk_size)
    plain = bytearray(batch_chunks * chunk_size)
    plain_view = memoryview(plain)
    cipher_view = memoryview(bytearray(batch_chunks * (chunk_size + CHUNK_OVERHEAD)))
    header: Header | None = None
    codec: ChunkCodec | None = None
    index = 0
    total = 0
    filled = 0
    while True:
        filled, at_eof = _fill(src, plain_view, filled)
        if filled == 0:
            break  # empty input (a held-back chunk always leaves filled > 0)
        if at_eof:
            count = -(-filled // chunk_size)
            used_plain = filled
        else:  # a full batch: hold its last chunk back, it may be the final one
            count = batch_chunks - 1
            used_plain = count * chunk_size
        if codec is None:
            header, keys = create_header(key_provider, key_id, encryption_context, chunk_size)
            codec = ChunkCodec(keys, chunk_size, header.version)
            _write_all(dst, header.raw)
        plaintexts = [
            plain_view[j * chunk_size : min((j + 1) * chunk_size, used_plain)] for j in range(count)
        ]
        used = codec.seal_into(cipher_view, index, plaintexts, final=at_eof)
        _write_all(dst, cipher_view[:used])
        index += count
        total += used_plain
        if at_eof:
            break
        plain[:chunk_size] = plain[used_plain : used_plain + chunk_size]
        filled = chunk_size
    return total


def decrypt_stream(
    src: BinaryIO,
    dst: BinaryIO,
    *,
    key_provider: DataKeyProvider,
    encryption_context: Mapping[str, str] | None = None,
) -> int:
    """Decrypt a ciphertext stream into ``dst``; returns the plaintext byte count.

    ``encryption_context`` entries, if given, must be stored in the header. Raises
    CorruptHeader / UnsupportedFormat / CorruptChunk / Truncated (see the module doc for
    what has been written by then).
    """
    header_view = memoryview(bytearray(HEADER_SIZE))
    got, _ = _fill(src, header_view, 0)
    if got == 0:
        return 0
    header = Header.parse(header_view[:got].tobytes())  # short: CorruptHeader
    if got < HEADER_SIZE:
        raise CorruptHeader("the stream ends inside the header")
    keys = unlock_header(header, key_provider, encryption_context)
    chunk_size = header.chunk_size
    stored = chunk_size + CHUNK_OVERHEAD
    codec = ChunkCodec(keys, chunk_size, header.version)
    batch_chunks = max(2, BATCH_BYTES // chunk_size)
    cipher = bytearray(batch_chunks * stored)
    cipher_view = memoryview(cipher)
    plain_view = memoryview(bytearray(batch_chunks * chunk_size))
    index = 0
    total = 0
    filled = 0
    # Format 2: all-zero chunks are authenticated by the marker at the end of their run,
    # which may come batches later. They are counted, not kept: ``pending`` is the first
    # of them, and their zeros are written once the marker has been checked.
    pending: int | None = None
    deferred: list[int] = []

    def defer(zero_from: int, after: int) -> None:
        deferred.append(zero_from)  # its bytes are withheld below until authenticated

    def emit(count: int, final_index: int) -> None:
        """Open ``count`` stored chunks of the batch and write what is authenticated."""
        nonlocal pending
        cipher_length = min(filled, count * stored)
        last_length = cipher_length - (count - 1) * stored - CHUNK_OVERHEAD
        # a last piece too short to be a chunk is reported by open_into, in order
        plain_length = (count - 1) * chunk_size + max(0, last_length)
        deferred.clear()
        codec.open_into(
            cipher_view[:cipher_length], index, plain_view[:plain_length], 0, final_index,
            defer, pending,
        )  # fmt: skip
        resolved = deferred[0] if deferred else index + count
        if pending is not None and resolved >= index:
            _write_zeros(dst, (index - pending) * chunk_size)
        if resolved > index:
            _write_all(dst, plain_view[: min(plain_length, (resolved - index) * chunk_size)])
        pending = deferred[0] if deferred else None

    while True:
        filled, at_eof = _fill(src, cipher_view, filled)
        if at_eof:
            if filled == 0:
                if pending is not None:
                    raise CorruptChunk(pending, f"chunk {pending} is zero outside a hole run")
                raise Truncated("the stream has a header but no chunk")
            count = -(-filled // stored)
            emit(count, index + count - 1)
            last_length = filled - (count - 1) * stored - CHUNK_OVERHEAD
            return total + (count - 1) * chunk_size + max(0, last_length)
        count = batch_chunks - 1  # the last stored chunk may be the final one: hold it
        emit(count, -1)
        index += count
        total += count * chunk_size
        cipher[:stored] = cipher[count * stored : (count + 1) * stored]
        filled = stored


def _write_zeros(dst: BinaryIO, count: int) -> None:
    """Write ``count`` zero bytes, at most 1 MiB at a time."""
    zeros = memoryview(bytes(min(count, 1 << 20)))
    while count > 0:
        step = min(count, len(zeros))
        _write_all(dst, zeros[:step])
        count -= step
