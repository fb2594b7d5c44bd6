"""keyd's clients: the blocking KMSClient and the trio AsyncKMSClient.

Most tests run against both (the ``client`` fixture is parametrised); the async client
is driven from the test thread through a trio loop in a helper thread.
"""

from __future__ import annotations

import base64
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio

import kmsfs.kms.client as client_module
from kmsfs.errors import (
    InvalidCiphertextException,
    KeydUnavailable,
    KMSError,
    KMSInternalException,
    NotFoundException,
    UnknownOperationException,
)
from kmsfs.kms.client import AsyncKMSClient, KMSClient
from kmsfs.kms.paths import SOCKET_ENV
from kmsfs.kms.server import ServerLimits


# ------------------------------------------------------------------- harness
class TrioPortal:
    """A trio loop in a background thread that test code can run async calls in."""

    def __init__(self) -> None:
        self._ready = threading.Event()
        self._scope: trio.CancelScope | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._thread = threading.Thread(target=trio.run, args=(self._main,), daemon=True)
        self._thread.start()
        assert self._ready.wait(5)

    async def _main(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        with trio.CancelScope() as self._scope:
            self._ready.set()
            await trio.sleep_forever()

    def run(self, async_fn: Callable[[], Any]) -> Any:
        return trio.from_thread.run(async_fn, trio_token=self._token)

    def stop(self) -> None:
        assert self._scope is not None
        trio.from_thread.run_sync(self._scope.cancel, trio_token=self._token)
        self._thread.join(5)
        assert not self._thread.is_alive()


class AsyncClientDriver:
    """Calls an AsyncKMSClient's methods as if they were blocking."""

    def __init__(self, portal: TrioPortal, socket_path: Any, timeout: float) -> None:
        self._portal = portal
        self.client = AsyncKMSClient(socket_path, timeout=timeout)

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self.client, name)
        if not callable(attribute):
            return attribute
        return lambda *args, **kwargs: self._portal.run(partial(attribute, *args, **kwargs))

    def close(self) -> None:
        self._portal.run(self.client.aclose)

    def connection(self) -> object:
        return self.client._stream


class SyncClientDriver:
    def __init__(self, socket_path: Any, timeout: float) -> None:
        self.client = KMSClient(socket_path, timeout=timeout)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.client, name)

    def connection(self) -> object:
        return self.client._sock


@pytest.fixture(scope="module")
def portal() -> Iterator[TrioPortal]:
    running = TrioPortal()
    yield running
    running.stop()


@pytest.fixture(params=["sync", "async"])
def make_client(request: pytest.FixtureRequest, portal: TrioPortal) -> Iterator[Callable[..., Any]]:
    """Factory: a client of the parametrised kind; all are closed at teardown."""
    made: list[Any] = []

    def make(socket_path: Any, timeout: float = 5.0) -> Any:
        if request.param == "sync":
            driver: Any = SyncClientDriver(socket_path, timeout)
        else:
            driver = AsyncClientDriver(portal, socket_path, timeout)
        made.append(driver)
        return driver

    yield make
    for driver in made:
        driver.close()


class CannedServer:
    """A listening socket whose connections are handled by a test-supplied function."""

    def __init__(self, path: Path, handler: Callable[[socket.socket], None]) -> None:
        self.accepted = 0
        self._handler = handler
        self._stopping = False
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(os.fspath(path))
        self._listener.listen(8)
        self._listener.settimeout(0.05)
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stopping:
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            self.accepted += 1
            with conn:
                conn.settimeout(5)
                try:
                    self._handler(conn)
                except OSError:
                    pass

    def stop(self) -> None:
        self._stopping = True
        self._thread.join(5)
        self._listener.close()


@pytest.fixture
def canned_server(short_tmp: Path) -> Iterator[Callable[..., CannedServer]]:
    servers: list[CannedServer] = []

    def start(handler: Callable[[socket.socket], None]) -> CannedServer:
        server = CannedServer(short_tmp / "canned.sock", handler)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


def read_request(conn: socket.socket) -> bytes:
    """Read one request (head and Content-Length body); b"" at EOF."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            return b""
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":")[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length")
    )
    while len(body) < length:
        body += conn.recv(65536)
    return data


OK_RESPONSE = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/x-amz-json-1.1\r\n"
    b'Content-Length: 11\r\n\r\n{"Ok":true}'
)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# -------------------------------------------------------------- round trips
def test_call_round_trip(keyd: Any, make_client: Any) -> None:
    client = make_client(keyd.socket_path)
    assert client.call("Echo", {"KeyId": "k", "Limit": 5}) == {"Params": {"KeyId": "k", "Limit": 5}}
    assert keyd.service.calls[0].caller.pid == os.getpid()


def test_one_connection_is_reused(keyd: Any, make_client: Any) -> None:
    client = make_client(keyd.socket_path)
    client.call("ListKeys", {})
    first = client.connection()
    assert first is not None
    for _ in range(3):
        client.call("ListKeys", {})
        assert client.connection() is first


def test_call_encodes_bytes_as_base64(keyd: Any, make_client: Any) -> None:
    client = make_client(keyd.socket_path)
    result = client.call("Echo", {"CiphertextBlob": b"\x00\xffraw"})
    assert result == {"Params": {"CiphertextBlob": b64(b"\x00\xffraw")}}


def test_generate_data_key(keyd: Any, make_client: Any) -> None:
    client = make_client(keyd.socket_path)
    result = client.generate_data_key("key-1", encryption_context={"file": "a"})
    data_key = keyd.service.DATA_KEY
    assert result == {
        "KeyId": "key-1",
        "Plaintext": data_key,
        "CiphertextBlob": keyd.service.WRAP_PREFIX + data_key,
    }
    client.generate_data_key("key-1", number_of_bytes=16)
    client.generate_data_key("key-1", key_spec="AES_128")
    assert [call.params for call in keyd.service.calls] == [
        {"KeyId": "key-1", "KeySpec": "AES_256", "EncryptionContext": {"file": "a"}},
        {"KeyId": "key-1", "NumberOfBytes": 16},
        {"KeyId": "key-1", "KeySpec": "AES_128"},
    ]


def test_generate_data_key_without_plaintext(keyd: Any, make_client: Any) -> None:
    result = make_client(keyd.socket_path).generate_data_key_without_plaintext("key-1")
    assert result == {"KeyId": "key-1", "CiphertextBlob": b"wrapped:" + keyd.service.DATA_KEY}
    assert keyd.service.calls[0].operation == "GenerateDataKeyWithoutPlaintext"
    assert keyd.service.calls[0].params == {"KeyId": "key-1", "KeySpec": "AES_256"}


def test_encrypt_decrypt_re_encrypt(keyd: Any, make_client: Any) -> None:
    client = make_client(keyd.socket_path)
    encrypted = client.encrypt("key-1", b"\x00secret\xff", encryption_context={"a": "b"})
    assert encrypted == {"KeyId": "key-1", "CiphertextBlob": b"wrapped:\x00secret\xff"}
    decrypted = client.decrypt(
        encrypted["CiphertextBlob"], encryption_context={"a": "b"}, key_id="key-1"
    )
    assert decrypted == {"KeyId": "key-1", "Plaintext": b"\x00secret\xff"}
    moved = client.re_encrypt(
        encrypted["CiphertextBlob"], "key-2", source_encryption_context={"a": "b"}
    )
    assert moved["CiphertextBlob"] == b"wrapped:\x00secret\xff"
    assert moved["KeyId"] == "key-2"
    wire = [(call.operation, call.params) for call in keyd.service.calls]
    blob = b64(b"wrapped:\x00secret\xff")
    assert wire == [
        (
            "Encrypt",
            {
                "KeyId": "key-1",
                "Plaintext": b64(b"\x00secret\xff"),
                "EncryptionContext": {"a": "b"},
            },
        ),
        ("Decrypt", {"CiphertextBlob": blob, "EncryptionContext": {"a": "b"}, "KeyId": "key-1"}),
        (
            "ReEncrypt",
            {
                "CiphertextBlob": blob,
                "DestinationKeyId": "key-2",
                "SourceEncryptionContext": {"a": "b"},
            },
        ),
    ]


def test_describe_key_and_generate_random(keyd: Any, make_client: Any) -> None:
    client = make_client(keyd.socket_path)
    assert client.describe_key("key-9")["KeyMetadata"]["KeyId"] == "key-9"
    assert client.generate_random(5) == {"Plaintext": b"\x07" * 5}


def test_socket_path_from_environment(
    keyd: Any, make_client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(SOCKET_ENV, os.fspath(keyd.socket_path))
    client = make_client(None)
    assert client.socket_path == keyd.socket_path
    assert client.call("ListKeys", {})["Keys"]


# -------------------------------------------------------------------- errors
def test_kms_errors_map_to_their_classes(keyd: Any, make_client: Any) -> None:
    client = make_client(keyd.socket_path)
    with pytest.raises(NotFoundException, match="key missing does not exist"):
        client.describe_key("missing")
    with pytest.raises(InvalidCiphertextException):
        client.decrypt(b"not a blob")
    with pytest.raises(UnknownOperationException):
        client.call("NoSuchOperation", {})
    with pytest.raises(KMSInternalException) as internal:
        client.call("Explode", {})
    assert keyd.service.SECRET not in str(internal.value)
    assert client.call("ListKeys", {})["Keys"]  # errors leave the connection usable


def test_unknown_error_type_keeps_its_name(
    start_keyd: Any, fake_service: Any, make_client: Any
) -> None:
    class Exotic(KMSError):
        aws_type = "XksKeyNotFoundException"  # an AWS error type kmsfs has no class for

    class ExoticService(fake_service):  # type: ignore[misc, valid-type]
        def handle(self, *args: Any) -> dict[str, Any]:
            raise Exotic("signature does not verify")

    keyd = start_keyd(ExoticService())
    with pytest.raises(KMSError) as raised:
        make_client(keyd.socket_path).call("Verify", {})
    assert type(raised.value) is KMSError
    assert raised.value.aws_type == "XksKeyNotFoundException"
    assert raised.value.message == "signature does not verify"


@pytest.mark.parametrize("size", [200, 3_000_000], ids=["small", "larger-than-socket-buffers"])
def test_early_error_response_that_closes_the_connection(
    start_keyd: Any, make_client: Any, size: int
) -> None:
    keyd = start_keyd(limits=ServerLimits(max_body_bytes=100))
    client = make_client(keyd.socket_path)
    with pytest.raises(KMSError) as raised:  # keyd answers 413 without reading the body
        client.encrypt("key-1", b"x" * size)
    assert raised.value.aws_type == "RequestEntityTooLargeException"
    assert client.call("ListKeys", {})["Keys"]  # a new connection, transparently


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        (b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 4\r\n\r\noops", KMSInternalException),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\noops", KMSInternalException),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n[]", KMSInternalException),
        (b"HTTP/1.1 403 Forbidden\r\nContent-Length: 2\r\n\r\n{}", KMSError),
    ],
    ids=["502-text", "200-not-json", "200-not-object", "403-no-type"],
)
def test_response_without_a_proper_body(
    canned_server: Any, make_client: Any, response: bytes, expected: type[Exception]
) -> None:
    def answer(conn: socket.socket) -> None:
        read_request(conn)
        conn.sendall(response)

    server = canned_server(answer)
    with pytest.raises(KMSError) as raised:
        make_client(server._listener.getsockname()).call("ListKeys", {})
    assert type(raised.value) is expected


def test_malformed_base64_in_a_response(canned_server: Any, make_client: Any) -> None:
    def answer(conn: socket.socket) -> None:
        read_request(conn)
        conn.sendall(b'HTTP/1.1 200 OK\r\nContent-Length: 17\r\n\r\n{"Plaintext":"*"}')

    server = canned_server(answer)
    with pytest.raises(KMSInternalException, match="base64"):
        make_client(server._listener.getsockname()).generate_random(1)


# ---------------------------------------------------------- keyd unavailable
def test_missing_socket(short_tmp: Path, make_client: Any) -> None:
    path = short_tmp / "nothing.sock"
    with pytest.raises(KeydUnavailable) as raised:
        make_client(path).call("ListKeys", {})
    message = str(raised.value)
    assert os.fspath(path) in message and "no socket" in message
    assert "\n" not in message


def test_stale_socket_is_refused(short_tmp: Path, make_client: Any) -> None:
    path = short_tmp / "stale.sock"
    leftover = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    leftover.bind(os.fspath(path))
    leftover.close()
    with pytest.raises(KeydUnavailable, match="refused"):
        make_client(path).call("ListKeys", {})


def test_keyd_gone_for_good(start_keyd: Any, make_client: Any) -> None:
    keyd = start_keyd()
    client = make_client(keyd.socket_path)
    client.call("ListKeys", {})
    keyd.stop()
    with pytest.raises(KeydUnavailable, match="no socket"):
        client.call("ListKeys", {})


def test_timeout_when_keyd_never_answers(short_tmp: Path, make_client: Any) -> None:
    path = short_tmp / "mute.sock"
    mute = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    mute.bind(os.fspath(path))
    mute.listen(4)  # connections wait in the backlog forever
    try:
        client = make_client(path, timeout=0.3)
        started = time.monotonic()
        with pytest.raises(KeydUnavailable, match="no answer within 0.3 s"):
            client.call("ListKeys", {})
        assert 0.25 < time.monotonic() - started < 2.0
    finally:
        mute.close()


# ------------------------------------------------------------- reconnecting
def test_reconnects_after_keyd_restarts(start_keyd: Any, make_client: Any) -> None:
    first = start_keyd()
    client = make_client(first.socket_path)
    client.call("ListKeys", {})
    first.stop()
    second = start_keyd(socket_path=first.socket_path)
    assert client.call("Echo", {"n": 1}) == {"Params": {"n": 1}}
    assert [call.operation for call in second.service.calls] == ["Echo"]


def test_retries_once_when_keyd_closed_the_connection_unnoticed(
    start_keyd: Any, make_client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Without the idle-connection check the request goes out on the dead connection
    # and fails (EPIPE, ECONNRESET or EOF before any response byte): one retry.
    monkeypatch.setattr(client_module, "connection_looks_dead", lambda fileno: False)
    first = start_keyd()
    client = make_client(first.socket_path)
    client.call("ListKeys", {})
    first.stop()
    second = start_keyd(socket_path=first.socket_path)
    assert client.call("Echo", {"n": 2}) == {"Params": {"n": 2}}
    assert len(second.service.calls) == 1


def test_reconnects_after_idle_timeout(start_keyd: Any, make_client: Any) -> None:
    keyd = start_keyd(limits=ServerLimits(idle_timeout=0.1))
    client = make_client(keyd.socket_path)
    client.call("ListKeys", {})
    time.sleep(0.3)
    assert client.call("ListKeys", {})["Keys"]
    assert len(keyd.service.calls) == 2


def test_no_retry_on_a_fresh_connection(canned_server: Any, make_client: Any) -> None:
    server = canned_server(lambda conn: None)  # accept, then hang up
    with pytest.raises(KeydUnavailable, match="connection lost"):
        make_client(server._listener.getsockname()).call("ListKeys", {})
    assert server.accepted == 1


def test_no_retry_once_the_response_has_started(canned_server: Any, make_client: Any) -> None:
    def answer_then_break(conn: socket.socket) -> None:
        read_request(conn)
        conn.sendall(OK_RESPONSE)  # the first call succeeds, keep-alive
        read_request(conn)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\n{")  # then half an answer

    server = canned_server(answer_then_break)
    client = make_client(server._listener.getsockname())
    assert client.call("ListKeys", {}) == {"Ok": True}
    with pytest.raises(KeydUnavailable):
        client.call("ListKeys", {})
    assert server.accepted == 1  # the second request was not sent again


@pytest.mark.parametrize(
    ("response", "reused"),
    [
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            b'4\r\n{"Ok\r\n7;x=1\r\n":true}\r\n0\r\nX-Trailer: 1\r\n\r\n',
            True,
        ),
        (b"HTTP/1.1 100 Continue\r\n\r\n" + OK_RESPONSE, True),
        (
            b'HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 11\r\n\r\n{"Ok":true}',
            False,
        ),  # fmt: skip
        (b'HTTP/1.0 200 OK\r\n\r\n{"Ok":true}', False),  # the body runs to the close
    ],
    ids=["chunked", "100-continue", "connection-close", "no-length"],
)
def test_responses_of_every_framing(
    canned_server: Any, make_client: Any, response: bytes, reused: bool
) -> None:
    def answer(conn: socket.socket) -> None:
        while read_request(conn):
            conn.sendall(response)
            if not reused:
                return

    server = canned_server(answer)
    client = make_client(server._listener.getsockname())
    assert client.call("ListKeys", {}) == {"Ok": True}
    assert client.call("ListKeys", {}) == {"Ok": True}
    assert server.accepted == (1 if reused else 2)


# ----------------------------------------------------------------- async only
def test_async_client_shared_by_many_tasks(keyd: Any) -> None:
    async def main() -> set[object]:
        connections: set[object] = set()
        async with AsyncKMSClient(keyd.socket_path, timeout=5) as client:

            async def worker(index: int) -> None:
                for round_ in range(5):
                    result = await client.call("Echo", {"i": index, "r": round_})
                    assert result == {"Params": {"i": index, "r": round_}}
                    connections.add(client._stream)

            async with trio.open_nursery() as nursery:
                for index in range(20):
                    nursery.start_soon(worker, index)
        return connections

    assert len(trio.run(main)) == 1
    assert len(keyd.service.calls) == 100


def test_async_cancellation_leaves_the_client_usable(canned_server: Any, short_tmp: Path) -> None:
    answered = threading.Event()

    def slow(conn: socket.socket) -> None:
        while read_request(conn):
            if answered.is_set():
                conn.sendall(OK_RESPONSE)
            else:
                time.sleep(0.3)  # the first request is cancelled by then
                answered.set()
                return

    server = canned_server(slow)

    async def main() -> dict[str, Any]:
        async with AsyncKMSClient(server._listener.getsockname(), timeout=5) as client:
            with trio.move_on_after(0.1):
                await client.call("ListKeys", {})
                raise AssertionError("not cancelled")
            assert client._stream is None  # a half-used connection is never reused
            return await client.call("ListKeys", {})

    assert trio.run(main) == {"Ok": True}


def test_sync_client_context_manager_closes(keyd: Any) -> None:
    with KMSClient(keyd.socket_path) as client:
        client.call("ListKeys", {})
        assert client._sock is not None
    assert client._sock is None
