"""The keyd calls ``kmsfs import`` / ``export`` make ahead of their files
(:mod:`kmsfs.fs.transfer`, ``_KeysAhead`` / ``_UnwrapAhead``): each key is used by one
file only, bound to that file's id and context, never more made than the walk asked for
nor more than ``AHEAD_DEPTH`` ahead of their use; a key unwrapped ahead is only used for
exactly the wrapped key and context it was unwrapped under; a failure ahead leaves the
file to make its own call (so it raises keyd's own error, as before)."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kmsfs.errors import DisabledException
from kmsfs.format import EncryptedFile
from kmsfs.format.keys import FILE_ID_CONTEXT_KEY
from kmsfs.fs import transfer
from kmsfs.fs.transfer import _ExportKeys, _ImportKeys, _KeysAhead, _UnwrapAhead

KEY_ARN = "arn:aws:kms:eu-west-1:111122223333:key/0b7d1a4e-0000-4000-8000-000000000001"
CONTEXT = {"kmsfs:fs-id": "f" * 32}


class FakeClient:
    """A keyd client answering GenerateDataKey / Decrypt from a table (thread-safe)."""

    def __init__(self, fail_after: int | None = None) -> None:
        self.lock = threading.Lock()
        self.generated: list[dict[str, str]] = []
        self.decrypted: list[tuple[bytes, dict[str, str]]] = []
        self.keys: dict[bytes, tuple[bytes, dict[str, str]]] = {}
        self.fail_after = fail_after
        self.attempts = 0

    def generate_data_key(self, key_id: str, *, encryption_context: dict[str, str]) -> dict:
        with self.lock:
            self.attempts += 1
            if self.fail_after is not None and len(self.generated) >= self.fail_after:
                raise DisabledException(f"{key_id} is disabled")
            self.generated.append(dict(encryption_context))
            data_key = os.urandom(32)
            wrapped = os.urandom(48)
            self.keys[wrapped] = (data_key, dict(encryption_context))
        return {"Plaintext": data_key, "CiphertextBlob": wrapped, "KeyId": key_id}

    def decrypt(self, blob: bytes, *, encryption_context: dict[str, str]) -> dict:
        with self.lock:
            self.decrypted.append((blob, dict(encryption_context)))
            data_key, context = self.keys[blob]
        if context != encryption_context:
            raise AssertionError("context does not match")
        return {"Plaintext": data_key}


class FakeClients:
    """Stands in for :class:`kmsfs.fs.rewrap.ClientPerThread`: one shared fake."""

    def __init__(self, client: FakeClient) -> None:
        self.shared = client

    def client(self) -> Any:
        return self.shared

    def close(self) -> None:
        pass


def _eventually(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + 30
    while not condition():
        assert time.monotonic() < deadline, "the threads ahead never got there"
        time.sleep(0.005)


def test_keys_made_ahead_are_one_per_file_each_bound_to_its_own_file_id() -> None:
    fake = FakeClient()
    ahead = _KeysAhead(FakeClients(fake), KEY_ARN, CONTEXT)  # type: ignore[arg-type]
    try:
        for _ in range(10):
            ahead.add(None)
        ahead.close()
        taken = [ahead.take() for _ in range(10)]
        assert ahead.take() is None  # an eleventh file makes its own
    finally:
        ahead.stop()
    assert len(fake.generated) == 10  # none made for nothing
    file_ids = [prepared[0] for prepared in taken if prepared is not None]
    assert len(file_ids) == 10 and len(set(file_ids)) == 10
    for file_id, data_key, wrapped, key_arn in taken:  # type: ignore[misc]
        bound_data_key, bound_context = fake.keys[wrapped]
        assert bound_data_key == data_key and key_arn == KEY_ARN
        assert bound_context == {**CONTEXT, FILE_ID_CONTEXT_KEY: file_id.hex()}


def test_no_more_keys_are_made_ahead_than_the_depth() -> None:
    fake = FakeClient()
    ahead = _KeysAhead(FakeClients(fake), KEY_ARN, CONTEXT)  # type: ignore[arg-type]
    depth = transfer.AHEAD_DEPTH
    try:
        for _ in range(depth * 3):
            ahead.add(None)
        ahead.close()
        _eventually(lambda: len(fake.generated) == depth)
        for _ in range(depth // 2):  # half used: refilled in one go
            assert ahead.take() is not None
        _eventually(lambda: len(fake.generated) == depth + depth // 2)
    finally:
        ahead.stop()
    assert len(fake.generated) == depth + depth // 2


def test_a_failure_ahead_leaves_the_file_to_raise_keyds_own_error(tmp_path: Path) -> None:
    fake = FakeClient(fail_after=2)
    ahead = _KeysAhead(FakeClients(fake), KEY_ARN, CONTEXT)  # type: ignore[arg-type]
    try:
        for _ in range(5):
            ahead.add(None)
        ahead.close()
        files = []
        for number in range(5):
            fd = os.open(tmp_path / f"f{number}", os.O_RDWR | os.O_CREAT, 0o600)
            engine = EncryptedFile.open(
                fd,
                key_provider=_ImportKeys(fake, ahead),  # type: ignore[arg-type]
                key_id=KEY_ARN,
                encryption_context=CONTEXT,
            )
            try:
                engine.write(0, b"data")
                engine.close()
                files.append(number)
            except DisabledException:
                pass
            finally:
                os.close(fd)
    finally:
        ahead.stop()
    # keyd refuses from its third call on: two files got a key (which two depends on
    # which of the two threads ahead asked first), each other file said so itself
    assert len(files) == 2
    assert len(fake.generated) == 2
    # after the first refusal no more calls ahead (at most one in flight per thread):
    # 2 keys, the refusals ahead, then each of the 3 files' own refused call
    assert fake.attempts <= 2 + transfer.AHEAD_CONNECTIONS + 3


def test_a_file_of_another_cmk_or_context_gets_a_key_of_its_own(tmp_path: Path) -> None:
    fake = FakeClient()
    ahead = _KeysAhead(FakeClients(fake), KEY_ARN, CONTEXT)  # type: ignore[arg-type]
    other_arn = KEY_ARN[:-1] + "2"
    try:
        ahead.add(None)
        ahead.close()
        _eventually(lambda: len(fake.generated) == 1)
        keys = _ImportKeys(fake, ahead)  # type: ignore[arg-type]
        file_id, _key, _wrapped, key_arn = keys.take_prepared_key(other_arn, CONTEXT)
        assert key_arn == other_arn
        assert fake.generated[-1] == {**CONTEXT, FILE_ID_CONTEXT_KEY: file_id.hex()}
        keys.release()
        assert ahead.take() is None  # the one made ahead was not left in memory
    finally:
        ahead.stop()


def _encrypted_file(path: Path, fake: FakeClient, data: bytes) -> None:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        with EncryptedFile.open(
            fd,
            key_provider=_ImportKeys(fake, None),  # type: ignore[arg-type]
            key_id=KEY_ARN,
            encryption_context=CONTEXT,
        ) as engine:
            engine.write(0, data)
    finally:
        os.close(fd)


def _read(path: Path, keys: _ExportKeys) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        engine = EncryptedFile.open(
            fd, key_provider=keys, encryption_context=CONTEXT, writable=False
        )
        return engine.read(0, 1 << 20)
    finally:
        keys.release()
        os.close(fd)


def test_export_uses_a_key_unwrapped_ahead_only_for_the_header_it_was_read_from(
    tmp_path: Path,
) -> None:
    fake = FakeClient()
    for name in ("a", "b", "c"):
        _encrypted_file(tmp_path / name, fake, f"content of {name}".encode())
    ahead = _UnwrapAhead(FakeClients(fake))  # type: ignore[arg-type]
    try:
        indexes = [ahead.add(os.fsencode(tmp_path / name)) for name in ("a", "b", "c")]
        ahead.close()
        _eventually(lambda: len(fake.decrypted) == 3)
        # a: used as unwrapped ahead, no further Decrypt
        assert _read(tmp_path / "a", _ExportKeys(fake, ahead, indexes[0])) == b"content of a"  # type: ignore[arg-type]
        assert len(fake.decrypted) == 3
        # b replaced by another file after its key was unwrapped ahead: that key is not
        # used for it; the file's own header is unwrapped (and authenticated) as always
        os.replace(tmp_path / "c", tmp_path / "b")
        assert _read(tmp_path / "b", _ExportKeys(fake, ahead, indexes[1])) == b"content of c"  # type: ignore[arg-type]
        assert len(fake.decrypted) == 4
        assert ahead.take(indexes[1]) is None  # each result is used (or dropped) once
    finally:
        ahead.stop()
