"""A kill in the middle of a rewrite in place loses nothing that was fsync'd.

The engine rewrites chunks in place with a fresh nonce (the old final chunk re-sealed as
non-final when the file grows, a final chunk that grows or shrinks, an interior chunk
overwritten). A SIGKILL during such a ``pwrite`` tears the chunk: the kernel stops a
buffered write between pages when a fatal signal is pending, and a chunk spans many
pages. Here the engine's writing syscalls are replaced by fakes: the n-th call writes only
the first ``k`` bytes of its buffer (an ``ftruncate``: nothing) and the "process" dies —
a BaseException the engine must not catch; the engine is then abandoned without close.
For every n and several k, ``repair`` must give back the content of the last fsync or
the new content, chunk by chunk, and never less than what was fsync'd.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
from format_testkit import TEST_KEY_ID, FakeKeyProvider, memfd, pattern

from kmsfs.format import file as file_module
from kmsfs.format.file import UNDO_MAGIC, EncryptedFile
from kmsfs.format.offsets import CHUNK_OVERHEAD
from kmsfs.format.tools import repair, verify

KEY_ID = TEST_KEY_ID
C = 64
S = C + CHUNK_OVERHEAD


class Killed(BaseException):
    """The process died (SIGKILL): nothing may catch this."""


class Killer:
    """The engine's writing syscalls, dying at call ``kill_at`` (from 1) after writing the
    first ``keep`` bytes of that call's buffer; ``None``: never (counts the calls)."""

    def __init__(self, kill_at: int | None = None, keep: int = 0) -> None:
        self.kill_at = kill_at
        self.keep = keep
        self.calls = 0
        self.lengths: list[int] = []  # bytes each call would write (0: ftruncate)
        self.real_pwrite = os.pwrite
        self.real_ftruncate = os.ftruncate

    def pwritev(self, fd: int, buffers: list, offset: int) -> int:
        return self.pwrite(fd, b"".join(bytes(buffer) for buffer in buffers), offset)

    def pwrite(self, fd: int, data, offset: int) -> int:
        data = bytes(data)
        self.calls += 1
        self.lengths.append(len(data))
        if self.calls == self.kill_at:
            if self.keep:
                self.real_pwrite(fd, data[: self.keep], offset)
            raise Killed
        return self.real_pwrite(fd, data, offset)

    def ftruncate(self, fd: int, length: int) -> None:
        self.calls += 1
        self.lengths.append(0)
        if self.calls == self.kill_at:
            raise Killed
        self.real_ftruncate(fd, length)


@contextmanager
def syscalls(monkeypatch: pytest.MonkeyPatch, killer: Killer) -> Iterator[Killer]:
    with monkeypatch.context() as patch:
        patch.setattr(file_module.os, "pwritev", killer.pwritev)
        patch.setattr(file_module.os, "pwrite", killer.pwrite)
        patch.setattr(file_module.os, "ftruncate", killer.ftruncate)
        yield killer


Step = Callable[[EncryptedFile], object]

# name: (what is written and fsync'd first, the change that follows, fsync'd too)
SCENARIOS: dict[str, tuple[Step, Step]] = {
    "append after a short final chunk": (
        lambda e: e.write(0, pattern(1, 5 * C + 20)),
        lambda e: e.write(5 * C + 20, pattern(2, 4 * C)),
    ),
    "append after a full final chunk": (
        lambda e: e.write(0, pattern(3, 4 * C)),
        lambda e: e.write(4 * C, pattern(4, 3 * C + 5)),
    ),
    "final chunk grows": (
        lambda e: e.write(0, pattern(5, 3 * C + 10)),
        lambda e: e.write(3 * C + 10, b"twenty bytes more..."),
    ),
    "final chunk rewritten, same size": (
        lambda e: e.write(0, pattern(6, 3 * C + 10)),
        lambda e: e.write(3 * C + 2, b"xyz"),
    ),
    "interior overwrite": (
        lambda e: e.write(0, pattern(7, 6 * C + 7)),
        lambda e: e.write(2 * C + 5, b"ten bytes!"),
    ),
    "overwrite across several chunks": (
        lambda e: e.write(0, pattern(8, 6 * C + 7)),
        lambda e: e.write(C + 7, pattern(9, 3 * C)),
    ),
    "small overwrites in several chunks": (
        lambda e: e.write(0, pattern(10, 6 * C + 7)),
        lambda e: [e.write(offset, b"new" * 5) for offset in (70, 75, 200, 10, 6 * C)],
    ),
    "write across the end": (
        lambda e: e.write(0, pattern(11, 4 * C + 30)),
        lambda e: e.write(2 * C + 5, pattern(12, 4 * C)),
    ),
    "write past the end (holes)": (
        lambda e: e.write(0, pattern(13, 2 * C + 9)),
        lambda e: e.write(7 * C + 3, pattern(14, 2 * C)),
    ),
    "truncate down inside a chunk": (
        lambda e: e.write(0, pattern(15, 6 * C + 7)),
        lambda e: e.truncate(3 * C + 9),
    ),
    "truncate down to a chunk boundary": (
        lambda e: e.write(0, pattern(16, 6 * C + 7)),
        lambda e: e.truncate(3 * C),
    ),
    "truncate down inside the final chunk": (
        lambda e: e.write(0, pattern(17, 2 * C + 50)),
        lambda e: e.truncate(2 * C + 5),
    ),
    "truncate up": (
        lambda e: e.write(0, pattern(18, 2 * C + 7)),
        lambda e: e.truncate(9 * C + 1),
    ),
    "truncate up inside the final chunk": (
        lambda e: e.write(0, pattern(19, 2 * C + 7)),
        lambda e: e.truncate(2 * C + 40),
    ),
    "write into a hole run": (
        lambda e: [e.write(0, pattern(20, C + 3)), e.truncate(8 * C)],
        lambda e: e.write(4 * C + 5, b"inside the hole"),
    ),
    "write over the marker chunk of a final run": (
        lambda e: [e.write(0, pattern(21, C + 3)), e.truncate(8 * C + 10)],
        lambda e: e.write(8 * C + 2, b"at the end"),
    ),
    "append after a final hole run": (
        lambda e: [e.write(0, pattern(22, C + 3)), e.truncate(6 * C + 10)],
        lambda e: e.write(6 * C + 10, pattern(23, 2 * C)),
    ),
}


def content_of(fd: int, provider: FakeKeyProvider) -> bytes:
    report = verify(fd, key_provider=provider)
    assert report.ok, report.error
    reader = EncryptedFile.open(fd, key_provider=provider, writable=False)
    return reader.read(0, reader.size + 1)


def prepared(provider: FakeKeyProvider, setup: Step, version: int) -> tuple[int, EncryptedFile]:
    fd = memfd()
    engine = EncryptedFile.open(
        fd, key_provider=provider, key_id=KEY_ID, chunk_size=C, format_version=version
    )
    setup(engine)
    engine.fsync()
    return fd, engine


def assert_recovered(content: bytes, old: bytes, new: bytes) -> None:
    """Chunk by chunk the old or the new content, and no shorter than both: nothing
    fsync'd (``old``) is lost unless the change itself replaced it."""
    assert min(len(old), len(new)) <= len(content) <= max(len(old), len(new)), len(content)
    for start in range(0, len(content), C):
        piece = content[start : start + C]
        candidates = [
            (version + bytes(start + C))[start : start + len(piece)] for version in (old, new)
        ]
        assert piece in candidates, f"chunk {start // C} of {len(content)} bytes"


def kill_points(lengths: list[int]) -> Iterator[tuple[int, int]]:
    """(call, bytes written before the kill) for every call: torn at several places."""
    for call, length in enumerate(lengths, start=1):
        keeps = {0, 1, NONCE_TEAR, length // 2, length - 1} if length else {0}
        for keep in sorted(k for k in keeps if 0 <= k < max(length, 1)):
            yield call, keep


NONCE_TEAR = 13  # just past the nonce


@pytest.mark.parametrize("version", [2, 1], ids=["v2", "v1"])
@pytest.mark.parametrize("reopen", [False, True], ids=["same engine", "reopened"])
@pytest.mark.parametrize("name", SCENARIOS)
def test_a_kill_inside_any_write_loses_nothing_fsyncd(
    name: str,
    reopen: bool,
    version: int,
    provider: FakeKeyProvider,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    setup, change = SCENARIOS[name]
    fd, engine = prepared(provider, setup, version)
    old = content_of(fd, provider)
    if reopen:
        engine = EncryptedFile.open(fd, key_provider=provider, key_id=KEY_ID)
    with syscalls(monkeypatch, Killer()) as counter:
        change(engine)
        engine.fsync()
    new = content_of(fd, provider)
    os.close(fd)
    assert counter.calls
    repaired_some = False
    for call, keep in kill_points(counter.lengths):
        fd, engine = prepared(provider, setup, version)
        if reopen:
            engine = EncryptedFile.open(fd, key_provider=provider, key_id=KEY_ID)
        with syscalls(monkeypatch, Killer(call, keep)), pytest.raises(Killed):
            change(engine)
            engine.fsync()
        del engine  # abandoned: no flush, no close
        if not verify(fd, key_provider=provider).ok:
            repair(fd, key_provider=provider)
            repaired_some = True
        assert_recovered(content_of(fd, provider), old, new)
        os.close(fd)
    assert repaired_some


def test_verify_tells_an_interrupted_rewrite_and_repair_restores_the_old_chunk(
    provider: FakeKeyProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A rewrite of chunk 2 torn half-way: verify names chunk 2 as an interrupted rewrite
    (not an attack), and repair gives back exactly the file of the last fsync."""
    setup, change = SCENARIOS["interior overwrite"]
    fd, engine = prepared(provider, setup, 2)
    old = content_of(fd, provider)
    counter = Killer()
    with syscalls(monkeypatch, counter):
        change(engine)
        engine.flush()
    # the calls: the undo record, the chunk in place, the cut
    assert counter.lengths == [S + 32, S, 0]
    fd, engine = prepared(provider, setup, 2)
    with syscalls(monkeypatch, Killer(2, S // 2)), pytest.raises(Killed):
        change(engine)
        engine.flush()
    assert UNDO_MAGIC in os.pread(fd, 1 << 20, 0)
    report = verify(fd, key_provider=provider)
    assert not report.ok and report.interrupted_rewrite == 2
    assert report.first_bad_chunk == 2 and "rewrite in place" in str(report.error)
    assert repair(fd, key_provider=provider) == len(old)
    assert content_of(fd, provider) == old
    os.close(fd)


def test_only_chunks_that_may_hold_fsyncd_data_are_copied(
    provider: FakeKeyProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Appends and rewrites of chunks written since the last fsync (and past it) cost no
    copy; after an fsync (or on a file just opened) a rewrite of a stored chunk does."""
    copies: list[int] = []
    real = file_module.write_undo_record
    monkeypatch.setattr(
        file_module,
        "write_undo_record",
        lambda fd, at, first, piece, end: [copies.append(first), real(fd, at, first, piece, end)],
    )
    fd = memfd()
    engine = EncryptedFile.open(fd, key_provider=provider, key_id=KEY_ID, chunk_size=C)
    engine.write(0, pattern(1, 3 * C + 10))
    engine.flush()
    engine.write(3 * C + 10, b"more")  # the final chunk grows: never fsync'd
    engine.write(C + 1, b"x")  # an interior chunk: never fsync'd
    engine.write(5 * C, b"y")  # the old final chunk re-sealed: never fsync'd
    engine.flush()
    assert copies == []
    engine.fsync()
    engine.write(5 * C + 1, b"z")  # the final chunk, fsync'd
    engine.flush()
    assert copies == [5]
    engine.write(7 * C, b"w")  # past the fsync'd size: the old final chunk 5 is copied
    engine.flush()
    assert copies == [5, 5]
    engine.write(6 * C + 3, b"v")  # chunk 6 lies wholly past the last fsync: no copy
    engine.flush()
    assert copies == [5, 5]
    engine.truncate(2 * C)  # chunk 1 (fsync'd) re-sealed as final; the rest cut off ...
    assert copies == [5, 5, 1]
    engine.write(2 * C, pattern(2, 2 * C))  # chunk 1 re-sealed as non-final
    engine.flush()
    assert copies == [5, 5, 1, 1]
    engine.write(3 * C, b"u")  # ... so chunk 3 holds nothing fsync'd any more
    engine.flush()
    assert copies == [5, 5, 1, 1]
    engine.close()
    reopened = EncryptedFile.open(fd, key_provider=provider)  # durable, as far as it knows
    reopened.write(3 * C, b"t")
    reopened.flush()
    assert copies == [5, 5, 1, 1, 3]
    os.close(fd)


def test_a_repair_killed_half_way_can_be_run_again(
    provider: FakeKeyProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    """repair re-seals a last chunk that is not final in place, protected by an undo
    record like the engine's rewrites: killed anywhere, running it again finishes it."""
    fd = memfd()
    engine = EncryptedFile.open(fd, key_provider=provider, key_id=KEY_ID, chunk_size=C)
    engine.write(0, pattern(3, 7 * C + 11))
    engine.fsync()
    cut = os.pread(fd, 1 << 20, 0)[: file_module.cipher_offset(5, C)]  # ends with chunk 4
    os.close(fd)
    counter = Killer()
    fd = memfd()
    os.write(fd, cut)
    with syscalls(monkeypatch, counter):
        assert repair(fd, key_provider=provider) == 5 * C
    expected = content_of(fd, provider)
    os.close(fd)
    assert counter.calls >= 3  # the copy, the re-seal, the cut
    for call, keep in kill_points(counter.lengths):
        fd = memfd()
        os.write(fd, cut)
        with syscalls(monkeypatch, Killer(call, keep)), pytest.raises(Killed):
            repair(fd, key_provider=provider)
        assert repair(fd, key_provider=provider) == 5 * C
        assert content_of(fd, provider) == expected
        os.close(fd)


def test_fsck_repair_puts_back_a_torn_chunk_and_cuts_a_bad_end_only_when_forced(
    live_keyd, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``kmsfs fsck --repair`` on a cipher directory: a file whose rewrite of chunk 1 was
    killed half-way gets chunk 1 back, byte for byte, in one pass; a last chunk that fails
    authentication (no copy of it anywhere: tampering, or a torn write of data never
    fsync'd) is reported and left alone unless ``--force`` is given."""
    from kmsfs.fs.config import load_config
    from kmsfs.kms.datakeys import KeydDataKeyProvider

    keyd = live_keyd
    keyd.kmsfs("keys", "create", "--alias", "alias/fs")
    cipher = keyd.socket.parent / "cipher"
    keyd.kmsfs("init", str(cipher), "--key", "alias/fs", "--plaintext-names")
    config = load_config(cipher)
    keys = KeydDataKeyProvider(str(keyd.socket))
    old = pattern(30, 3 * 65536 + 100)

    def stored(name: str) -> tuple[int, EncryptedFile]:
        fd = os.open(cipher / name, os.O_RDWR | os.O_CREAT, 0o600)
        engine = EncryptedFile.open(
            fd, key_provider=keys, key_id=config.key_arn, encryption_context=config.file_context
        )
        engine.write(0, old)
        engine.fsync()
        return fd, engine

    fd, engine = stored("rewritten")
    with syscalls(monkeypatch, Killer(2, 30_000)), pytest.raises(Killed):
        engine.write(65536 + 10, b"new bytes")
        engine.flush()
    os.close(fd)
    fd, _ = stored("tampered")
    end = os.fstat(fd).st_size
    os.pwrite(fd, bytes([os.pread(fd, 1, end - 5)[0] ^ 1]), end - 5)
    os.close(fd)

    result = keyd.kmsfs("fsck", str(cipher), "--repair", check=False)
    lines = {line.split(" ")[0]: line for line in result.stdout.decode().splitlines()}
    assert result.returncode != 0, result
    assert "repaired: chunk 1 put back from its copy, 196708 bytes" in lines["rewritten"]
    assert "repaired" not in lines["tampered"] and "--force" in lines["tampered"]
    reader = EncryptedFile.open(os.open(cipher / "rewritten", os.O_RDONLY), key_provider=keys)
    assert reader.read(0, 1 << 20) == old
    os.close(reader.fd)

    result = keyd.kmsfs("fsck", str(cipher), "--repair", "--force", check=False)
    assert result.returncode == 0, result.stdout
    assert (
        b"tampered (/tampered): repaired: cut back to its last consistent length, 196608"
        in result.stdout
    )
