"""Plaintext ↔ ciphertext arithmetic: sizes, chunk indexes, ciphertext ranges.

Small pure functions on integers, tested at every edge (0, 1, C−1, C, C+1, > 4 GiB).
``C`` is the chunk size (plaintext bytes per chunk), ``S = C + CHUNK_OVERHEAD`` the stored
size of a full chunk, ``HEADER_SIZE`` the header in front of chunk 0.
"""

from __future__ import annotations

from kmsfs.errors import CorruptChunk, CorruptHeader

HEADER_SIZE = 2048
NONCE_SIZE = 12
TAG_SIZE = 16
CHUNK_OVERHEAD = NONCE_SIZE + TAG_SIZE
MIN_CHUNK_SIZE = 16
MAX_CHUNK_SIZE = 1 << 24
DEFAULT_CHUNK_SIZE = 1 << 16
#: the largest backing file the format makes: ext4's limit with 4 KiB blocks ((2^32 - 1)
#: blocks), so a kmsfs file never fails half-way on the commonest backing filesystem
MAX_CIPHERTEXT_SIZE = (1 << 44) - (1 << 12)


def check_chunk_size(chunk_size: int) -> int:
    """Return ``chunk_size`` if it is a power of two in [16, 16 MiB], else raise ValueError."""
    if not (MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE and chunk_size & (chunk_size - 1) == 0):
        raise ValueError(f"chunk size must be a power of two from 16 to 16 MiB, not {chunk_size}")
    return chunk_size


def stored_chunk_size(chunk_size: int) -> int:
    """Bytes a full chunk takes on disk."""
    return chunk_size + CHUNK_OVERHEAD


def chunk_count(plaintext_size: int, chunk_size: int) -> int:
    """Number of chunks of a file of ``plaintext_size`` bytes (0 for an empty file)."""
    return -(-plaintext_size // chunk_size)


def chunk_length(chunk_index: int, plaintext_size: int, chunk_size: int) -> int:
    """Plaintext bytes in chunk ``chunk_index`` of a file of that size (0 past the end)."""
    return max(0, min(chunk_size, plaintext_size - chunk_index * chunk_size))


def cipher_offset(chunk_index: int, chunk_size: int) -> int:
    """Where chunk ``chunk_index`` starts in the ciphertext file."""
    return HEADER_SIZE + chunk_index * (chunk_size + CHUNK_OVERHEAD)


def ciphertext_size(plaintext_size: int, chunk_size: int) -> int:
    """Size of the ciphertext file that holds ``plaintext_size`` bytes (0 ↔ 0: no header)."""
    if plaintext_size < 0:
        raise ValueError("negative size")
    if plaintext_size == 0:
        return 0
    full, rest = divmod(plaintext_size, chunk_size)
    return (
        HEADER_SIZE + full * (chunk_size + CHUNK_OVERHEAD) + (rest + CHUNK_OVERHEAD if rest else 0)
    )


def max_plaintext_size(chunk_size: int) -> int:
    """The maximum file size: the largest plaintext whose ciphertext fits MAX_CIPHERTEXT_SIZE.

    With 64 KiB chunks that is 16 TiB minus 7.0 GiB (writes and truncates past it raise
    FileTooLarge, EFBIG at the mountpoint).
    """
    full, rest = divmod(MAX_CIPHERTEXT_SIZE - HEADER_SIZE, chunk_size + CHUNK_OVERHEAD)
    return full * chunk_size + max(0, rest - CHUNK_OVERHEAD)


def plaintext_size(ciphertext_size: int, chunk_size: int) -> int:
    """Plaintext size of a ciphertext file of ``ciphertext_size`` bytes (no key needed).

    A header with no chunk gives 0 (opening such a file reports ``Truncated``). Sizes no
    writer produces raise: ``CorruptHeader`` below the header size, ``CorruptChunk`` when
    the last chunk is too short to hold even its nonce, tag and one byte.
    """
    if ciphertext_size < 0:
        raise ValueError("negative size")
    if ciphertext_size == 0:
        return 0
    if ciphertext_size < HEADER_SIZE:
        raise CorruptHeader("the file is shorter than its header")
    full, rest = divmod(ciphertext_size - HEADER_SIZE, chunk_size + CHUNK_OVERHEAD)
    if rest == 0:
        return full * chunk_size
    if rest <= CHUNK_OVERHEAD:
        raise CorruptChunk(full, f"chunk {full} is shorter than its nonce and tag")
    return full * chunk_size + rest - CHUNK_OVERHEAD


def chunk_span(offset: int, length: int, chunk_size: int) -> range:
    """Indexes of the chunks that plaintext bytes ``[offset, offset + length)`` touch."""
    if offset < 0 or length < 0:
        raise ValueError("negative offset or length")
    if length == 0:
        return range(offset // chunk_size, offset // chunk_size)
    return range(offset // chunk_size, (offset + length - 1) // chunk_size + 1)


def cipher_range(
    first_chunk: int, end_chunk: int, plaintext_size: int, chunk_size: int
) -> tuple[int, int]:
    """``(offset, length)`` of the ciphertext of chunks ``[first_chunk, end_chunk)``.

    The last chunk of the file may be short; chunks past the end take no bytes.
    """
    stored = chunk_size + CHUNK_OVERHEAD
    end_chunk = min(end_chunk, chunk_count(plaintext_size, chunk_size))
    if end_chunk <= first_chunk:
        return cipher_offset(first_chunk, chunk_size), 0
    last_length = chunk_length(end_chunk - 1, plaintext_size, chunk_size)
    length = (end_chunk - 1 - first_chunk) * stored + last_length + CHUNK_OVERHEAD
    return cipher_offset(first_chunk, chunk_size), length
