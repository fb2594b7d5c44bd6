"""open_encrypted: Python file objects, checked against a plain file model."""

from __future__ import annotations

import io
import os
import random
import tempfile
from pathlib import Path

import pytest
from format_testkit import FakeKeyProvider
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kmsfs.errors import CorruptChunk, UsageError
from kmsfs.format.io import (
    EncryptedBufferedRandom,
    EncryptedBufferedReader,
    EncryptedBufferedWriter,
    EncryptedRawIO,
    open_encrypted,
)
from kmsfs.format.offsets import DEFAULT_CHUNK_SIZE, HEADER_SIZE, ciphertext_size
from kmsfs.format.tools import inspect, verify

KEY = "alias/test"


# ------------------------------------------------------------------ model test
def positions(chunk: int) -> st.SearchStrategy[int]:
    return st.one_of(
        st.builds(lambda k, d: max(0, k * chunk + d), st.integers(0, 6), st.integers(-2, 2)),
        st.integers(0, 6 * chunk),
    )


def io_operations(chunk: int) -> st.SearchStrategy[list[tuple]]:
    sizes = st.one_of(st.integers(-1, 3), st.integers(0, 3 * chunk + 2))
    return st.lists(
        st.one_of(
            st.tuples(st.just("seek"), positions(chunk)),
            st.tuples(st.just("seek_end"), st.integers(-chunk, chunk)),
            st.tuples(st.just("write"), st.integers(0, 3 * chunk + 2), st.integers(0, 999)),
            st.tuples(st.just("read"), sizes),
            st.tuples(st.just("truncate"), st.one_of(st.none(), positions(chunk))),
            st.tuples(st.just("flush")),
            st.tuples(st.just("reopen")),
        ),
        max_size=25,
    )


def run_io_model(chunk: int, buffering: int, ops: list[tuple]) -> None:
    provider = FakeKeyProvider()
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "model.kmsfs"
        model = bytearray()
        position = 0

        def open_file(mode: str):
            return open_encrypted(
                path, mode, key_provider=provider, key_id=KEY, chunk_size=chunk, buffering=buffering
            )

        handle = open_file("w+b")
        try:
            for op in ops:
                kind = op[0]
                if kind == "seek":
                    position = handle.seek(op[1])
                    assert position == op[1]
                elif kind == "seek_end":
                    target = len(model) + op[1]
                    if target < 0:
                        with pytest.raises(OSError):
                            handle.seek(op[1], io.SEEK_END)
                        assert handle.tell() == position
                        continue
                    position = handle.seek(op[1], io.SEEK_END)
                    assert position == target
                elif kind == "write":
                    data = random.Random(op[2]).randbytes(op[1])
                    assert handle.write(data) == len(data)
                    if data:
                        if position > len(model):
                            model.extend(bytes(position - len(model)))
                        model[position : position + len(data)] = data
                        position += len(data)
                elif kind == "read":
                    size = op[1]
                    expected = bytes(
                        model[position:] if size < 0 else model[position : position + size]
                    )
                    assert handle.read(size) == expected
                    position += len(expected)
                elif kind == "truncate":
                    size = position if op[1] is None else op[1]
                    assert handle.truncate(op[1]) == size
                    if size < len(model):
                        del model[size:]
                    else:
                        model.extend(bytes(size - len(model)))
                elif kind == "flush":
                    handle.flush()
                    assert path.stat().st_size == ciphertext_size(len(model), chunk)
                else:
                    handle.close()
                    handle = open_file("r+b")
                    position = 0
                assert handle.tell() == position
        finally:
            handle.close()
        assert path.stat().st_size == ciphertext_size(len(model), chunk)
        with open_encrypted(path, "rb", key_provider=provider) as reader:
            assert reader.read() == bytes(model)
        assert verify(path, key_provider=provider).ok


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(io_operations(16), st.sampled_from([-1, 0, 7, 40]))
def test_file_objects_match_a_plain_file_model(ops: list[tuple], buffering: int) -> None:
    run_io_model(16, buffering, ops)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(io_operations(DEFAULT_CHUNK_SIZE))
def test_file_objects_match_the_model_at_the_default_chunk_size(ops: list[tuple]) -> None:
    run_io_model(DEFAULT_CHUNK_SIZE, -1, ops)


# ------------------------------------------------------------------------ modes
def test_modes_and_classes(tmp_path: Path, provider: FakeKeyProvider) -> None:
    path = tmp_path / "m.kmsfs"
    with open_encrypted(path, "wb", key_provider=provider, key_id=KEY) as f:
        assert isinstance(f, EncryptedBufferedWriter)
        assert f.writable() and not f.readable() and f.seekable()
        f.write(b"hello")
        with pytest.raises(io.UnsupportedOperation):
            f.read()
    with open_encrypted(path, "rb", key_provider=provider) as f:
        assert isinstance(f, EncryptedBufferedReader)
        assert f.read() == b"hello"
        with pytest.raises(io.UnsupportedOperation):
            f.write(b"x")
    with open_encrypted(path, "ab", key_provider=provider) as f:
        f.write(b" world")
        assert f.tell() == 11
    plain = tmp_path / "plain"
    plain.write_bytes(b"hello world")
    with open_encrypted(path, "a+b", key_provider=provider) as f, open(plain, "a+b") as p:
        assert isinstance(f, EncryptedBufferedRandom)
        for handle in (f, p):
            handle.seek(0)
            assert handle.read(5) == b"hello"
            handle.write(b"!")  # appends whatever the position
            handle.seek(0)
        # the buffered layer shows its stale read buffer, exactly as for a plain file
        assert f.read() == p.read() == b"hello!world"
    with open_encrypted(path, "rb", key_provider=provider) as f:
        assert f.read() == plain.read_bytes() == b"hello world!"
    with open_encrypted(path, "r+b", key_provider=provider) as f:
        f.seek(6)
        f.write(b"W")
        f.seek(0)
        assert f.read() == b"hello World!"
    with pytest.raises(FileExistsError):
        open_encrypted(path, "xb", key_provider=provider, key_id=KEY)
    raw = open_encrypted(path, "rb", key_provider=provider, buffering=0)
    assert isinstance(raw, EncryptedRawIO)
    assert raw.readall() == b"hello World!"
    raw.close()
    assert raw.closed


def test_w_truncates_and_takes_a_new_key(tmp_path: Path, provider: FakeKeyProvider) -> None:
    path = tmp_path / "w.kmsfs"
    with open_encrypted(path, "wb", key_provider=provider, key_id=KEY) as f:
        f.write(b"first")
    first_id = inspect(path).file_id
    with open_encrypted(path, "w+b", key_provider=provider, key_id=KEY) as f:
        assert f.read() == b""
        f.write(b"second")
    assert inspect(path).file_id != first_id
    with open_encrypted(path, "rb", key_provider=provider) as f:
        assert f.read() == b"second"


def test_creating_modes_need_a_key_id(tmp_path: Path, provider) -> None:
    for mode in ("wb", "xb", "w+b", "w"):
        with pytest.raises(ValueError, match="key_id"):
            open_encrypted(tmp_path / "n", mode, key_provider=provider)
    (tmp_path / "empty").touch()
    f = open_encrypted(tmp_path / "empty", "r+b", key_provider=provider)
    assert f.read() == b""
    f.write(b"x")  # buffered
    with pytest.raises(UsageError):
        f.flush()
    with pytest.raises(UsageError):
        f.close()  # still cannot write it, but the file is closed
    assert f.closed and f.raw.closed


def test_bad_modes(tmp_path: Path, provider) -> None:
    for mode in ("", "rw", "rbb", "q", "rbt", "r++"):
        with pytest.raises(ValueError):
            open_encrypted(tmp_path / "x", mode, key_provider=provider, key_id=KEY)
    with pytest.raises(ValueError):
        open_encrypted(tmp_path / "x", "w", key_provider=provider, key_id=KEY, buffering=0)
    with pytest.raises(FileNotFoundError):
        open_encrypted(tmp_path / "missing", "rb", key_provider=provider)


def test_touch_writes_nothing_and_asks_for_no_key(tmp_path: Path, provider) -> None:
    path = tmp_path / "t.kmsfs"
    open_encrypted(path, "wb", key_provider=provider, key_id=KEY).close()
    assert path.stat().st_size == 0 and provider.generate_calls == 0
    with open_encrypted(path, "rb", key_provider=provider) as f:
        assert f.read() == b""
    assert provider.decrypt_calls == 0


def test_text_mode(tmp_path: Path, provider) -> None:
    path = tmp_path / "text.kmsfs"
    with open_encrypted(path, "w", key_provider=provider, key_id=KEY, encoding="utf-8") as f:
        assert f.mode == "w"
        f.write("première ligne\nzweite Zeile\n")
    with open_encrypted(path, "r", key_provider=provider, encoding="utf-8") as f:
        assert list(f) == ["première ligne\n", "zweite Zeile\n"]


def test_no_fileno_but_fsync(tmp_path: Path, provider) -> None:
    path = tmp_path / "f.kmsfs"
    with open_encrypted(path, "wb", key_provider=provider, key_id=KEY) as f:
        with pytest.raises(io.UnsupportedOperation):
            f.fileno()
        f.write(b"durable")
        f.fsync()
        assert path.stat().st_size == HEADER_SIZE + 7 + 28


def test_close_releases_the_backing_fd(tmp_path: Path, provider) -> None:
    path = tmp_path / "c.kmsfs"
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(20):
        with open_encrypted(path, "a+b", key_provider=provider, key_id=KEY) as f:
            f.write(b"x")
    assert len(os.listdir("/proc/self/fd")) == before


def test_readinto_and_a_corrupt_chunk_through_the_file_object(tmp_path: Path, provider) -> None:
    path = tmp_path / "r.kmsfs"
    with open_encrypted(path, "wb", key_provider=provider, key_id=KEY, chunk_size=64) as f:
        f.write(bytes(range(256)) * 2)
    with open_encrypted(path, "rb", key_provider=provider) as f:
        buffer = bytearray(100)
        assert f.readinto(buffer) == 100 and buffer == bytes(range(100))
    raw = bytearray(path.read_bytes())
    raw[HEADER_SIZE + 92 * 3 + 50] ^= 4
    path.write_bytes(raw)
    with open_encrypted(path, "rb", key_provider=provider, buffering=0) as f:
        assert f.read(64 * 3) == (bytes(range(256)) * 2)[: 64 * 3]
        with pytest.raises(CorruptChunk) as caught:
            f.read()
        assert caught.value.chunk_index == 3
    with open_encrypted(path, "rb", key_provider=provider) as f:
        with pytest.raises(CorruptChunk):  # the buffer reads ahead into chunk 3
            f.read(10)
