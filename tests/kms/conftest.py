"""Fixtures for the keyd server and client tests: a fake service and a keyd in a thread."""

from __future__ import annotations

import base64
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio

from kmsfs.errors import (
    InvalidCiphertextException,
    NotFoundException,
    UnknownOperationException,
)
from kmsfs.kms.caller import Caller
from kmsfs.kms.server import serve
from tests.conftest import Keyd, run_kmsfs
from tests.kms.users import ACCOUNT

SECRET = "plaintext-SECRET-do-not-leak"
DATA_KEY = bytes(range(32))
WRAP_PREFIX = b"wrapped:"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


@dataclass(frozen=True)
class RecordedCall:
    operation: str
    params: dict[str, Any]
    caller: Caller
    request_id: str


class FakeService:
    """Stands in for KeyService: records calls, answers a few operations canned."""

    #: what the "Explode" operation puts in its exception: must never reach a client
    SECRET = SECRET
    #: the data key GenerateDataKey returns; its CiphertextBlob is WRAP_PREFIX + DATA_KEY
    DATA_KEY = DATA_KEY
    WRAP_PREFIX = WRAP_PREFIX

    def __init__(self, *, maintenance_failures: int = 0) -> None:
        self.calls: list[RecordedCall] = []
        self.maintenance_runs = 0
        self.maintenance_failures = maintenance_failures

    def handle(
        self, operation: str, params: dict[str, Any], caller: Caller, request_id: str
    ) -> dict[str, Any]:
        self.calls.append(RecordedCall(operation, params, caller, request_id))
        key_id = params.get("KeyId", "key-1")
        if operation == "ListKeys":
            return {"Keys": [{"KeyId": "key-1", "KeyArn": "arn:aws:kms:x:1:key/key-1"}]}
        if operation == "GenerateDataKey":
            return {
                "KeyId": key_id,
                "Plaintext": b64(DATA_KEY),
                "CiphertextBlob": b64(WRAP_PREFIX + DATA_KEY),
            }
        if operation == "GenerateDataKeyWithoutPlaintext":
            return {"KeyId": key_id, "CiphertextBlob": b64(WRAP_PREFIX + DATA_KEY)}
        if operation in ("Decrypt", "ReEncrypt"):
            blob = base64.b64decode(params["CiphertextBlob"])
            if not blob.startswith(WRAP_PREFIX):
                raise InvalidCiphertextException("ciphertext failed authentication")
            if operation == "ReEncrypt":
                return {
                    "KeyId": params["DestinationKeyId"],
                    "SourceKeyId": "key-1",
                    "CiphertextBlob": b64(WRAP_PREFIX + blob[len(WRAP_PREFIX) :]),
                }
            return {"KeyId": "key-1", "Plaintext": b64(blob[len(WRAP_PREFIX) :])}
        if operation == "Encrypt":
            plaintext = base64.b64decode(params["Plaintext"])
            return {"KeyId": key_id, "CiphertextBlob": b64(WRAP_PREFIX + plaintext)}
        if operation == "DescribeKey":
            if key_id == "missing":
                raise NotFoundException(f"key {key_id} does not exist")
            return {"KeyMetadata": {"KeyId": key_id, "KeyState": "Enabled"}}
        if operation == "GenerateRandom":
            return {"Plaintext": b64(b"\x07" * params["NumberOfBytes"])}
        if operation == "Echo":
            return {"Params": params}
        if operation == "Explode":
            raise RuntimeError(SECRET)
        raise UnknownOperationException(f"unknown operation {operation!r}")

    def run_maintenance(self) -> None:
        self.maintenance_runs += 1
        if self.maintenance_failures:
            self.maintenance_failures -= 1
            raise RuntimeError("maintenance failed")


class RunningKeyd:
    """``serve()`` in a background thread with its own trio loop."""

    def __init__(self, service: Any, socket_path: Path, **serve_kwargs: Any) -> None:
        self.service = service
        self.socket_path = socket_path
        self._serve = partial(serve, service, socket_path, **serve_kwargs)
        self._started = threading.Event()
        self._cancel_scope: trio.CancelScope | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=trio.run, args=(self._main,), daemon=True)

    async def _main(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        try:
            async with trio.open_nursery() as nursery:
                self._cancel_scope = nursery.cancel_scope
                await nursery.start(self._serve)
                self._started.set()
        except BaseException as exc:
            self.error = exc
        finally:
            self._started.set()

    def start(self) -> RunningKeyd:
        self._thread.start()
        assert self._started.wait(5), "keyd did not start"
        if self.error is not None:
            raise self.error
        return self

    def stop(self) -> None:
        if self._thread.is_alive() and self._token is not None:
            assert self._cancel_scope is not None
            try:
                trio.from_thread.run_sync(self._cancel_scope.cancel, trio_token=self._token)
            except trio.RunFinishedError:
                pass
        self._thread.join(5)
        assert not self._thread.is_alive(), "keyd thread did not stop"
        if self.error is not None:
            raise AssertionError(f"keyd died: {self.error!r}") from self.error


@pytest.fixture
def start_keyd(short_tmp: Path) -> Iterator[Callable[..., RunningKeyd]]:
    """Factory: start a keyd (FakeService unless given); every one is stopped at teardown.

    ``short_tmp`` (tests/conftest.py) is a short /tmp directory: socket paths must be
    shorter than 108 bytes.
    """
    running: list[RunningKeyd] = []

    def start(
        service: Any = None, socket_path: Path | None = None, **serve_kwargs: Any
    ) -> RunningKeyd:
        keyd = RunningKeyd(
            service if service is not None else FakeService(),
            socket_path or short_tmp / "keyd.sock",
            **serve_kwargs,
        )
        running.append(keyd)
        return keyd.start()

    yield start
    errors: list[BaseException] = []
    for keyd in running:
        try:
            keyd.stop()
        except BaseException as exc:
            errors.append(exc)
    if errors:
        raise errors[0]


@pytest.fixture
def fake_service() -> type[FakeService]:
    """The FakeService class, for tests that configure their own instance."""
    return FakeService


@pytest.fixture
def keyd(start_keyd: Callable[..., RunningKeyd]) -> RunningKeyd:
    return start_keyd()


@pytest.fixture
def shared_keyd(keyd_factory: Callable[..., Keyd], short_tmp: Path) -> Keyd:
    """root's keyd as a system keyd: a keystore of account 123456789012, its socket open
    to every user (--socket-mode 0666) in a root-owned directory every user can search."""
    keyd = keyd_factory()
    run_kmsfs(
        "keyd", "init", "--keystore", str(keyd.keystore), "--root-key-file",
        str(keyd.root_key), "--account-id", ACCOUNT,
    )  # fmt: skip
    os.chmod(short_tmp, 0o755)
    os.chmod(keyd.workdir, 0o755)
    keyd.start("--socket-mode", "0666")
    return keyd
