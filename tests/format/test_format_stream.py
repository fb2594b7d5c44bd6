"""Streaming encryption and decryption: any size, short reads/writes, pipes, bounded memory."""

from __future__ import annotations

import hashlib
import io
import os
import random
import threading
import tracemalloc

import pytest
from format_testkit import FakeKeyProvider
from hypothesis import given, settings
from hypothesis import strategies as st

from kmsfs.errors import CorruptChunk, CorruptHeader, Truncated
from kmsfs.format import stream as stream_module
from kmsfs.format.file import EncryptedFile
from kmsfs.format.offsets import HEADER_SIZE, ciphertext_size
from kmsfs.format.stream import decrypt_stream, encrypt_stream


class Trickle(io.RawIOBase):
    """A raw stream that returns short reads (1..max_piece bytes), like a pipe."""

    def __init__(self, data: bytes, seed: int, max_piece: int = 7) -> None:
        self._data = memoryview(data)
        self._rng = random.Random(seed)
        self._max = max_piece

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:  # type: ignore[override]
        count = min(len(buffer), len(self._data), self._rng.randint(1, self._max))
        buffer[:count] = self._data[:count]
        self._data = self._data[count:]
        return count


class ShortWriter(io.RawIOBase):
    """A raw sink that accepts only a few bytes per write call."""

    def __init__(self, seed: int) -> None:
        self.data = bytearray()
        self._rng = random.Random(seed)

    def writable(self) -> bool:
        return True

    def write(self, buffer) -> int:  # type: ignore[override]
        count = min(len(buffer), self._rng.randint(1, 50))
        self.data += bytes(buffer[:count])
        return count


def round_trip(data: bytes, chunk: int, seed: int, provider: FakeKeyProvider) -> bytes:
    sink = ShortWriter(seed)
    assert encrypt_stream(
        Trickle(data, seed), sink, key_provider=provider, key_id="k", chunk_size=chunk
    ) == len(data)
    ciphertext = bytes(sink.data)
    assert len(ciphertext) == ciphertext_size(len(data), chunk)
    out = ShortWriter(seed + 1)
    assert decrypt_stream(Trickle(ciphertext, seed, 97), out, key_provider=provider) == len(data)
    assert bytes(out.data) == data
    return ciphertext


@pytest.fixture(autouse=True)
def small_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stream_module, "BATCH_BYTES", 64)  # 4 chunks of 16 per batch


@pytest.mark.parametrize(
    "size", [0, 1, 15, 16, 17, 47, 48, 49, 63, 64, 65, 79, 80, 81, 127, 128, 129, 1000]
)
def test_round_trip_at_chunk_and_batch_edges(size: int, provider: FakeKeyProvider) -> None:
    round_trip(random.Random(size).randbytes(size), 16, size, provider)


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=600), st.sampled_from([16, 32, 64]), st.integers(0, 1000))
def test_round_trip_any_input(data: bytes, chunk: int, seed: int) -> None:
    round_trip(data, chunk, seed, FakeKeyProvider())


def test_empty_input_gives_an_empty_output_and_asks_for_no_key(provider) -> None:
    out = io.BytesIO()
    assert encrypt_stream(io.BytesIO(), out, key_provider=provider, key_id="k") == 0
    assert out.getvalue() == b"" and provider.generate_calls == 0
    assert decrypt_stream(io.BytesIO(), io.BytesIO(), key_provider=provider) == 0


def test_streams_and_the_engine_read_each_other(provider, tmp_path) -> None:
    data = random.Random(3).randbytes(5000)
    out = io.BytesIO()
    encrypt_stream(io.BytesIO(data), out, key_provider=provider, key_id="k", chunk_size=64)
    path = tmp_path / "s.kmsfs"
    path.write_bytes(out.getvalue())
    fd = os.open(path, os.O_RDWR)
    try:
        engine = EncryptedFile.open(fd, key_provider=provider)
        assert engine.read(0, 6000) == data
        engine.write(4990, b"changed tail!")
        engine.close()
        back = io.BytesIO()
        decrypt_stream(io.BytesIO(path.read_bytes()), back, key_provider=provider)
        assert back.getvalue() == data[:4990] + b"changed tail!"
    finally:
        os.close(fd)


def test_stream_context_is_stored_and_checked(provider) -> None:
    out = io.BytesIO()
    encrypt_stream(
        io.BytesIO(b"x" * 100), out, key_provider=provider, key_id="k",
        encryption_context={"user": "alice"},
    )  # fmt: skip
    ciphertext = out.getvalue()
    decrypt_stream(io.BytesIO(ciphertext), io.BytesIO(), key_provider=provider)
    with pytest.raises(CorruptHeader):
        decrypt_stream(
            io.BytesIO(ciphertext), io.BytesIO(), key_provider=provider,
            encryption_context={"user": "bob"},
        )  # fmt: skip


def test_truncated_and_damaged_streams(provider) -> None:
    out = io.BytesIO()
    encrypt_stream(io.BytesIO(bytes(200)), out, key_provider=provider, key_id="k", chunk_size=16)
    ciphertext = out.getvalue()
    stored = 16 + 28
    with pytest.raises(Truncated):
        decrypt_stream(io.BytesIO(ciphertext[:HEADER_SIZE]), io.BytesIO(), key_provider=provider)
    with pytest.raises(Truncated):
        decrypt_stream(
            io.BytesIO(ciphertext[: HEADER_SIZE + 5 * stored]), io.BytesIO(), key_provider=provider
        )
    with pytest.raises(CorruptHeader):
        decrypt_stream(io.BytesIO(ciphertext[:100]), io.BytesIO(), key_provider=provider)
    with pytest.raises(CorruptChunk) as caught:
        decrypt_stream(io.BytesIO(ciphertext + b"junk"), io.BytesIO(), key_provider=provider)
    assert caught.value.chunk_index == 12
    # what was written before the failure is authentic: a prefix of the plaintext
    sink = io.BytesIO()
    damaged = bytearray(ciphertext)
    damaged[HEADER_SIZE + 7 * stored + 20] ^= 1
    with pytest.raises(CorruptChunk) as caught:
        decrypt_stream(io.BytesIO(bytes(damaged)), sink, key_provider=provider)
    assert caught.value.chunk_index == 7
    assert sink.getvalue() == bytes(len(sink.getvalue())) and len(sink.getvalue()) <= 7 * 16


def test_64_mib_through_a_pipe_in_bounded_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    """encrypt_stream → OS pipe → decrypt_stream, 64 MiB, with Python allocations bounded."""
    monkeypatch.setattr(stream_module, "BATCH_BYTES", 4 << 20)
    provider = FakeKeyProvider()
    size = 64 << 20
    block = random.Random(9).randbytes(1 << 20)

    class Source(io.RawIOBase):
        def __init__(self) -> None:
            self.left = size

        def readable(self) -> bool:
            return True

        def readinto(self, buffer) -> int:  # type: ignore[override]
            count = min(len(buffer), self.left, len(block))
            offset = (size - self.left) % len(block)
            count = min(count, len(block) - offset)
            buffer[:count] = block[offset : offset + count]
            self.left -= count
            return count

    class HashSink(io.RawIOBase):
        def __init__(self) -> None:
            self.hash = hashlib.sha256()
            self.count = 0

        def writable(self) -> bool:
            return True

        def write(self, buffer) -> int:  # type: ignore[override]
            self.hash.update(buffer)
            self.count += len(buffer)
            return len(buffer)

    read_end, write_end = os.pipe()
    errors: list[BaseException] = []

    def produce() -> None:
        try:
            with open(write_end, "wb", buffering=0) as pipe_in:
                encrypt_stream(Source(), pipe_in, key_provider=provider, key_id="k")
        except BaseException as error:  # reported by the main thread
            errors.append(error)

    tracemalloc.start()
    try:
        producer = threading.Thread(target=produce)
        producer.start()
        sink = HashSink()
        with open(read_end, "rb", buffering=0) as pipe_out:
            assert decrypt_stream(pipe_out, sink, key_provider=provider) == size
        producer.join()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert not errors
    expected = hashlib.sha256()
    for _ in range(size // len(block)):
        expected.update(block)
    assert sink.count == size and sink.hash.digest() == expected.digest()
    # two 4 MiB batches each way plus the 1 MiB source block: far below the 64 MiB streamed
    assert peak < 24 << 20, peak
