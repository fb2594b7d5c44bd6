"""keyd's HTTP server: protocol, error mapping, limits, socket handling.

The server runs in a background thread (conftest ``start_keyd``); the tests talk to it
with raw sockets, so every byte on the wire is under their control.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import shutil
import socket
import stat
import subprocess
import threading
import time
import uuid
from pathlib import Path
from typing import Any, BinaryIO

import pytest
import trio

from kmsfs.errors import KeydUntrusted, UsageError
from kmsfs.kms.caller import Caller
from kmsfs.kms.client import KMSClient
from kmsfs.kms.server import KeydAlreadyRunning, ServerLimits, serve

TARGET = "TrentService."
JSON_11 = "application/x-amz-json-1.1"


# ----------------------------------------------------------------------- helpers
class _SharedReader:
    """One buffered reader several http.client.HTTPResponse objects read in turn."""

    def __init__(self, file: BinaryIO) -> None:
        self._file = file

    def makefile(self, *args: Any, **kwargs: Any) -> _SharedReader:
        return self

    def __getattr__(self, name: str) -> Any:
        return getattr(self._file, name)

    def close(self) -> None:
        """A finished response must not close the connection's reader."""


class RawClient:
    """A hand-driven connection: send any bytes, read responses one at a time."""

    def __init__(self, path: Path, timeout: float = 5.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(os.fspath(path))
        self.file = self.sock.makefile("rb")

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def request(
        self, operation: str | None, body: bytes = b"{}", extra: str = "", method: str = "POST"
    ) -> None:
        self.send(raw_request(operation, body, extra, method=method))

    def response(self) -> tuple[int, http.client.HTTPMessage, bytes]:
        response = http.client.HTTPResponse(_SharedReader(self.file))  # type: ignore[arg-type]
        response.begin()
        return response.status, response.headers, response.read()

    def call(self, operation: str | None, body: bytes = b"{}", extra: str = "") -> Any:
        self.request(operation, body, extra)
        status, headers, payload = self.response()
        return status, headers, json.loads(payload)

    def at_eof(self) -> bool:
        """True if the server closed the connection (no more bytes)."""
        return self.file.read(1) == b""

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def raw_request(
    operation: str | None, body: bytes = b"{}", extra: str = "", *, method: str = "POST"
) -> bytes:
    target = f"X-Amz-Target: {TARGET}{operation}\r\n" if operation is not None else ""
    head = (
        f"{method} / HTTP/1.1\r\nHost: localhost\r\n{target}"
        f"Content-Type: {JSON_11}\r\nContent-Length: {len(body)}\r\n{extra}\r\n"
    )
    return head.encode("ascii") + body


@pytest.fixture
def raw_client() -> Any:
    opened: list[RawClient] = []

    def connect(path: Path, timeout: float = 5.0) -> RawClient:
        client = RawClient(path, timeout)
        opened.append(client)
        return client

    yield connect
    for client in opened:
        client.close()


def assert_serves(path: Path) -> None:
    """A fresh connection gets a correct answer."""
    with KMSClient(path, timeout=5) as client:
        assert client.call("ListKeys", {})["Keys"][0]["KeyId"] == "key-1"


# ------------------------------------------------------------------ happy paths
def test_round_trip_has_aws_headers_and_body(keyd: Any, raw_client: Any) -> None:
    client = raw_client(keyd.socket_path)
    status, headers, body = client.call("Echo", b'{"KeyId": "k", "Nested": {"a": [1, 2]}}')
    assert status == 200
    assert headers["Content-Type"] == JSON_11
    request_id = headers["x-amzn-RequestId"]
    assert uuid.UUID(request_id).version == 4
    assert body == {"Params": {"KeyId": "k", "Nested": {"a": [1, 2]}}}
    (call,) = keyd.service.calls
    assert call.operation == "Echo"
    assert call.request_id == request_id


def test_caller_is_the_peer_credentials(keyd: Any, raw_client: Any) -> None:
    raw_client(keyd.socket_path).call("ListKeys")
    assert keyd.service.calls[0].caller == Caller(uid=os.getuid(), gid=os.getgid(), pid=os.getpid())


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to connect as another user")
def test_caller_of_another_user(start_keyd: Any, short_tmp: Path) -> None:
    short_tmp.chmod(0o755)
    keyd = start_keyd(socket_mode=0o666)
    script = (
        "import socket, sys\n"
        "s = socket.socket(socket.AF_UNIX)\n"
        "s.connect(sys.argv[1])\n"
        "s.sendall(b'POST / HTTP/1.1\\r\\nHost: x\\r\\nX-Amz-Target: TrentService.ListKeys"
        "\\r\\nContent-Length: 2\\r\\nConnection: close\\r\\n\\r\\n{}')\n"
        "print(s.recv(100).split()[1].decode())\n"
    )
    child = subprocess.Popen(
        ["/usr/bin/env", "python3", "-I", "-c", script, os.fspath(keyd.socket_path)],
        user=65534, group=65533, extra_groups=[], stdout=subprocess.PIPE, cwd="/",
    )  # fmt: skip
    output, _ = child.communicate(timeout=10)
    assert output.strip() == b"200"
    assert keyd.service.calls[0].caller == Caller(uid=65534, gid=65533, pid=child.pid)


def test_each_request_gets_its_own_request_id(keyd: Any, raw_client: Any) -> None:
    client = raw_client(keyd.socket_path)
    ids = {client.call("ListKeys")[1]["x-amzn-RequestId"] for _ in range(3)}
    assert len(ids) == 3


@pytest.mark.parametrize("content_type", ["application/json", "text/plain", None])
def test_content_type_is_not_enforced(keyd: Any, raw_client: Any, content_type: str | None) -> None:
    head = "POST / HTTP/1.1\r\nHost: x\r\nX-Amz-Target: TrentService.ListKeys\r\n"
    if content_type:
        head += f"Content-Type: {content_type}\r\n"
    client = raw_client(keyd.socket_path)
    client.send(head.encode() + b"Content-Length: 2\r\n\r\n{}")
    assert client.response()[0] == 200


def test_empty_body_means_no_parameters(keyd: Any, raw_client: Any) -> None:
    status, _, _ = raw_client(keyd.socket_path).call("Echo", b"")
    assert status == 200
    assert keyd.service.calls[0].params == {}


def test_chunked_request_body(keyd: Any, raw_client: Any) -> None:
    client = raw_client(keyd.socket_path)
    client.send(
        b"POST / HTTP/1.1\r\nHost: x\r\nX-Amz-Target: TrentService.Echo\r\n"
        b'Transfer-Encoding: chunked\r\n\r\n5\r\n{"a":\r\n2\r\n1}\r\n0\r\n\r\n'
    )
    status, _, body = client.response()
    assert status == 200
    assert json.loads(body) == {"Params": {"a": 1}}


def test_expect_100_continue_is_answered_before_the_body(keyd: Any, raw_client: Any) -> None:
    client = raw_client(keyd.socket_path)
    body = b'{"x": "' + b"y" * 2000 + b'"}'
    head = raw_request("Echo", body, "Expect: 100-continue\r\n")[: -len(body)]
    client.send(head)
    assert client.file.readline().startswith(b"HTTP/1.1 100 ")
    assert client.file.readline() == b"\r\n"
    client.send(body)
    status, _, payload = client.response()
    assert status == 200
    assert json.loads(payload)["Params"]["x"] == "y" * 2000


# ------------------------------------------------------------------ keep-alive
def test_keep_alive_serves_several_requests_on_one_connection(keyd: Any, raw_client: Any) -> None:
    client = raw_client(keyd.socket_path)
    for index in range(3):
        status, _, body = client.call("Echo", json.dumps({"n": index}).encode())
        assert (status, body) == (200, {"Params": {"n": index}})
    assert len(keyd.service.calls) == 3


def test_pipelined_requests_are_answered_in_order(keyd: Any, raw_client: Any) -> None:
    client = raw_client(keyd.socket_path)
    client.send(b"".join(raw_request("Echo", json.dumps({"n": n}).encode()) for n in range(4)))
    for index in range(4):
        status, _, body = client.response()
        assert (status, json.loads(body)) == (200, {"Params": {"n": index}})


def test_connection_close_is_honoured(keyd: Any, raw_client: Any) -> None:
    client = raw_client(keyd.socket_path)
    client.request("ListKeys", extra="Connection: close\r\n")
    assert client.response()[0] == 200
    assert client.at_eof()


# ---------------------------------------------------------------------- errors
def test_kms_error_has_aws_body_and_status(keyd: Any, raw_client: Any) -> None:
    client = raw_client(keyd.socket_path)
    status, headers, body = client.call("DescribeKey", b'{"KeyId": "missing"}')
    assert status == 400
    assert headers["Content-Type"] == JSON_11
    assert uuid.UUID(headers["x-amzn-RequestId"])
    assert body == {"__type": "NotFoundException", "message": "key missing does not exist"}
    # the connection stays usable after a client error
    assert client.call("ListKeys")[0] == 200


def test_unexpected_exception_is_a_generic_500(
    keyd: Any, raw_client: Any, caplog: pytest.LogCaptureFixture
) -> None:
    client = raw_client(keyd.socket_path)
    client.request("Explode", b'{"Plaintext": "c2VjcmV0LWJvZHk="}')
    status, headers, payload = client.response()
    assert status == 500
    body = json.loads(payload)
    assert body["__type"] == "KMSInternalException"
    assert headers["x-amzn-RequestId"] in body["message"]
    assert keyd.service.SECRET.encode() not in payload
    assert b"Traceback" not in payload and b"RuntimeError" not in payload
    # the failure is logged with its traceback, but never the request body
    assert "RuntimeError" in caplog.text
    assert "c2VjcmV0LWJvZHk=" not in caplog.text
    assert client.call("ListKeys")[0] == 200


def test_unserialisable_result_is_a_500(
    start_keyd: Any, fake_service: Any, raw_client: Any
) -> None:
    class BadResult(fake_service):  # type: ignore[misc, valid-type]
        def handle(self, *args: Any) -> dict[str, Any]:
            return {"Plaintext": b"raw bytes are not JSON"}

    keyd = start_keyd(BadResult())
    status, _, body = raw_client(keyd.socket_path).call("ListKeys")
    assert (status, body["__type"]) == (500, "KMSInternalException")


def test_operation_unknown_to_the_service(keyd: Any, raw_client: Any) -> None:
    status, _, body = raw_client(keyd.socket_path).call("NoSuchOperation")
    assert (status, body["__type"]) == (400, "UnknownOperationException")


@pytest.mark.parametrize(
    "target_line",
    [
        "",
        "X-Amz-Target: ListKeys\r\n",
        "X-Amz-Target: TrentService.\r\n",
        "X-Amz-Target: OtherService.ListKeys\r\n",
        "X-Amz-Target: TrentService.List/Keys\r\n",
        "X-Amz-Target: TrentService.ListKeys extra\r\n",
    ],
)
def test_missing_or_malformed_target(keyd: Any, raw_client: Any, target_line: str) -> None:
    client = raw_client(keyd.socket_path)
    client.send(
        f"POST / HTTP/1.1\r\nHost: x\r\n{target_line}Content-Length: 2\r\n\r\n{{}}".encode()
    )
    status, _, payload = client.response()
    assert status == 400
    assert json.loads(payload)["__type"] == "UnknownOperationException"
    assert keyd.service.calls == []


@pytest.mark.parametrize(
    "body",
    [b"{", b"[]", b"1", b'"text"', b"null", b"\xff\xfe{}", b"[" * 100_000, b'{"a": 1} x'],
    ids=["truncated", "array", "number", "string", "null", "bad-utf8", "deep", "trailing"],
)
def test_body_that_is_not_a_json_object(keyd: Any, raw_client: Any, body: bytes) -> None:
    status, _, response = raw_client(keyd.socket_path).call("Echo", body)
    assert (status, response["__type"]) == (400, "SerializationException")
    assert keyd.service.calls == []


def test_wrong_method_and_path(keyd: Any, raw_client: Any) -> None:
    client = raw_client(keyd.socket_path)
    client.request("ListKeys", method="GET")
    status, _, payload = client.response()
    assert status == 405
    assert "__type" in json.loads(payload)
    client.send(raw_request("ListKeys").replace(b"POST / ", b"POST /keys "))
    assert client.response()[0] == 404
    assert keyd.service.calls == []
    assert client.call("ListKeys")[0] == 200


# ---------------------------------------------------------------------- limits
def test_oversized_body_is_413_and_others_are_still_served(keyd: Any, raw_client: Any) -> None:
    client = raw_client(keyd.socket_path)
    body = b"x" * (256 * 1024 + 1)
    # keyd answers after the head, but keeps reading for a while so that a client that
    # sends the whole body in one go (as curl does) does not fail with EPIPE
    client.send(
        b"POST / HTTP/1.1\r\nHost: x\r\nX-Amz-Target: TrentService.Echo\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    status, headers, payload = client.response()
    assert status == 413
    assert headers["Connection"] == "close"
    assert json.loads(payload)["__type"]
    assert client.at_eof()
    assert keyd.service.calls == []
    assert_serves(keyd.socket_path)


def test_body_at_the_limit_is_accepted(start_keyd: Any, raw_client: Any) -> None:
    keyd = start_keyd(limits=ServerLimits(max_body_bytes=1000))
    body = b'{"x":"' + b"a" * (1000 - 8) + b'"}'
    assert len(body) == 1000
    assert raw_client(keyd.socket_path).call("Echo", body)[0] == 200
    status, _, _ = raw_client(keyd.socket_path).call("Echo", body[:-1] + b' "}')
    assert status == 413


def test_oversized_chunked_body_is_413(start_keyd: Any, raw_client: Any) -> None:
    keyd = start_keyd(limits=ServerLimits(max_body_bytes=1000))
    client = raw_client(keyd.socket_path)
    client.send(
        b"POST / HTTP/1.1\r\nHost: x\r\nX-Amz-Target: TrentService.Echo\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
    )
    client.send(b"".join(b"100\r\n" + b"a" * 256 + b"\r\n" for _ in range(5)))
    assert client.response()[0] == 413
    assert client.at_eof()
    assert keyd.service.calls == []


def test_too_many_headers_is_431(keyd: Any, raw_client: Any) -> None:
    client = raw_client(keyd.socket_path)
    client.request("ListKeys", extra="".join(f"X-Filler-{n}: v\r\n" for n in range(100)))
    status, _, payload = client.response()
    assert status == 431
    assert json.loads(payload)["__type"]
    assert client.at_eof()
    assert keyd.service.calls == []


def test_headers_too_large_is_431(keyd: Any, raw_client: Any) -> None:
    client = raw_client(keyd.socket_path)
    client.request("ListKeys", extra=f"X-Filler: {'v' * 20_000}\r\n")
    assert client.response()[0] == 431
    assert client.at_eof()
    assert_serves(keyd.socket_path)


@pytest.mark.parametrize(
    "garbage",
    [
        b"\x00\x01\x02garbage\r\n\r\n",
        b"POST / HTTP/1.1\r\nBad Header Line\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
    ],
    ids=["binary", "header-without-colon", "negative-length", "conflicting-lengths"],
)
def test_malformed_http_is_400_and_closed(keyd: Any, raw_client: Any, garbage: bytes) -> None:
    client = raw_client(keyd.socket_path)
    client.send(garbage)
    assert client.response()[0] == 400
    assert client.at_eof()
    assert_serves(keyd.socket_path)


def test_slow_request_gets_408(start_keyd: Any, raw_client: Any) -> None:
    keyd = start_keyd(limits=ServerLimits(request_read_timeout=0.3))
    client = raw_client(keyd.socket_path)
    started = time.monotonic()
    client.send(raw_request("ListKeys")[:20])
    time.sleep(0.1)
    client.send(raw_request("ListKeys")[20:30])  # trickling bytes does not extend the deadline
    status, _, payload = client.response()
    assert status == 408
    assert json.loads(payload)["__type"]
    assert client.at_eof()
    assert 0.25 < time.monotonic() - started < 2.0
    assert_serves(keyd.socket_path)


def test_idle_connection_is_closed_quietly(start_keyd: Any, raw_client: Any) -> None:
    keyd = start_keyd(limits=ServerLimits(idle_timeout=0.2))
    client = raw_client(keyd.socket_path)
    assert client.call("ListKeys")[0] == 200
    started = time.monotonic()
    assert client.at_eof()  # nothing sent: no 408, just a close
    assert 0.15 < time.monotonic() - started < 2.0
    fresh = raw_client(keyd.socket_path)
    assert fresh.at_eof()


def test_connection_limit_answers_503(start_keyd: Any, raw_client: Any) -> None:
    keyd = start_keyd(limits=ServerLimits(max_connections=2))
    first, second = raw_client(keyd.socket_path), raw_client(keyd.socket_path)
    assert first.call("ListKeys")[0] == 200
    assert second.call("ListKeys")[0] == 200
    third = raw_client(keyd.socket_path)
    status, _, payload = third.response()
    assert status == 503
    assert json.loads(payload)["__type"] == "ServiceUnavailableException"
    assert third.at_eof()
    first.close()
    deadline = time.monotonic() + 5
    while True:  # the slot frees once keyd has noticed the close
        fourth = raw_client(keyd.socket_path)
        fourth.request("ListKeys")
        if fourth.response()[0] == 200:
            break
        assert time.monotonic() < deadline
        time.sleep(0.02)


# ----------------------------------------------------- misbehaving and many clients
def test_clients_vanishing_harm_no_one_else(keyd: Any, raw_client: Any) -> None:
    steady = raw_client(keyd.socket_path)
    for _ in range(20):
        half = RawClient(keyd.socket_path)  # half a request, then gone
        half.send(raw_request("ListKeys")[:25])
        half.close()
        rude = RawClient(keyd.socket_path)  # a full request, gone before the response
        rude.request("ListKeys")
        rude.close()
        assert steady.call("ListKeys")[0] == 200
    assert_serves(keyd.socket_path)


def test_client_that_never_reads_is_dropped(start_keyd: Any, raw_client: Any) -> None:
    keyd = start_keyd(limits=ServerLimits(send_timeout=0.2))
    hog = raw_client(keyd.socket_path)
    request = raw_request("Echo", json.dumps({"x": "y" * 100_000}).encode())
    outcome: list[object] = []

    def flood() -> None:  # pipelines requests, never reads a response
        try:
            for _ in range(100):
                hog.send(request)
            outcome.append("keyd kept reading")
        except OSError as exc:
            outcome.append(exc)

    thread = threading.Thread(target=flood)
    thread.start()
    assert_serves(keyd.socket_path)  # others are served meanwhile
    thread.join(4)
    assert not thread.is_alive()
    # keyd hung up on the hog (a socket timeout here would mean it did not)
    assert isinstance(outcome[0], BrokenPipeError | ConnectionResetError), outcome


def test_fifty_concurrent_clients(keyd: Any) -> None:
    barrier = threading.Barrier(50)
    failures: list[BaseException] = []

    def work(index: int) -> None:
        try:
            with KMSClient(keyd.socket_path, timeout=10) as client:
                barrier.wait(5)
                for round_ in range(5):
                    result = client.call("Echo", {"i": index, "r": round_})
                    assert result == {"Params": {"i": index, "r": round_}}
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(50)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    assert not failures, failures[0]
    assert len(keyd.service.calls) == 250


# ----------------------------------------------------------------- the socket
def test_socket_mode_and_new_directory_mode(start_keyd: Any, short_tmp: Path) -> None:
    path = short_tmp / "run" / "keyd.sock"
    start_keyd(socket_path=path)
    assert stat.S_ISSOCK(path.stat().st_mode)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700


def test_refuses_a_socket_directory_others_can_write(short_tmp: Path, fake_service: Any) -> None:
    shared = short_tmp / "shared"
    shared.mkdir()
    shared.chmod(0o777)  # anyone could swap the socket for their own
    with pytest.raises(UsageError, match="writable by other users"):
        trio.run(serve, fake_service(), shared / "keyd.sock")
    assert list(shared.iterdir()) == []


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to chown")
def test_refuses_a_socket_directory_of_another_user(short_tmp: Path, fake_service: Any) -> None:
    theirs = short_tmp / "theirs"
    theirs.mkdir(mode=0o700)
    os.chown(theirs, 65534, 65534)
    with pytest.raises(UsageError, match="another user"):
        trio.run(serve, fake_service(), theirs / "keyd.sock")


def test_socket_in_a_sticky_shared_directory(start_keyd: Any, short_tmp: Path) -> None:
    sticky = short_tmp / "sticky"
    sticky.mkdir()
    sticky.chmod(0o1777)  # like /tmp: others cannot remove or rename our socket
    keyd = start_keyd(socket_path=sticky / "keyd.sock")
    # but anyone may take a free name there first: clients trust no socket whose own
    # directory others can write (kmsfs/kms/trust.py)
    with pytest.raises(KeydUntrusted, match="writable by other users"):
        assert_serves(keyd.socket_path)


def test_socket_mode_is_configurable(start_keyd: Any, short_tmp: Path) -> None:
    keyd = start_keyd(socket_mode=0o660)
    assert stat.S_IMODE(keyd.socket_path.stat().st_mode) == 0o660


def test_socket_is_removed_on_exit(start_keyd: Any) -> None:
    keyd = start_keyd()
    assert keyd.socket_path.exists()
    keyd.stop()
    assert not keyd.socket_path.exists()


def test_exit_leaves_a_successors_socket_alone(start_keyd: Any) -> None:
    first = start_keyd()
    first.socket_path.unlink()  # e.g. removed by hand, and a new keyd started
    second = start_keyd(socket_path=first.socket_path)
    first.stop()
    assert second.socket_path.exists()
    assert_serves(second.socket_path)


def test_stale_socket_is_replaced(start_keyd: Any, short_tmp: Path) -> None:
    path = short_tmp / "keyd.sock"
    leftover = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    leftover.bind(os.fspath(path))
    leftover.close()  # the file stays, nobody listens
    keyd = start_keyd(socket_path=path)  # binding would fail if the file were still there
    assert_serves(keyd.socket_path)


def test_refuses_to_start_over_a_live_keyd(keyd: Any, fake_service: Any) -> None:
    with pytest.raises(KeydAlreadyRunning, match="already|listening"):
        trio.run(serve, fake_service(), keyd.socket_path)
    assert keyd.socket_path.exists()  # the live keyd's socket is left alone
    assert_serves(keyd.socket_path)


def test_refuses_to_replace_a_file_that_is_not_a_socket(short_tmp: Path, fake_service: Any) -> None:
    path = short_tmp / "keyd.sock"
    path.write_text("precious")
    with pytest.raises(UsageError, match="not a socket"):
        trio.run(serve, fake_service(), path)
    assert path.read_text() == "precious"


# --------------------------------------------------------------- maintenance
def test_maintenance_runs_at_start_and_periodically_and_survives_errors(
    start_keyd: Any, fake_service: Any
) -> None:
    service = fake_service(maintenance_failures=2)
    keyd = start_keyd(service, maintenance_interval=0.05)
    assert service.maintenance_runs >= 1  # before clients could connect
    deadline = time.monotonic() + 5
    while service.maintenance_runs < 4:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert_serves(keyd.socket_path)


# ---------------------------------------------------------------------- curl
@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_works(keyd: Any) -> None:
    result = subprocess.run(
        [
            "curl", "--silent", "--show-error", "--include", "--max-time", "5",
            "--unix-socket", os.fspath(keyd.socket_path),
            "-H", "X-Amz-Target: TrentService.ListKeys",
            "-H", f"Content-Type: {JSON_11}",
            "-d", "{}", "http://localhost/",
        ],
        capture_output=True, check=True, timeout=10,
    )  # fmt: skip
    head, _, body = result.stdout.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert b"x-amzn-RequestId: " in head
    assert json.loads(body)["Keys"][0]["KeyId"] == "key-1"


def test_binary_parameters_arrive_as_base64_strings(keyd: Any) -> None:
    with KMSClient(keyd.socket_path) as client:
        client.call("Echo", {"CiphertextBlob": b"\x00\xff"})
    assert keyd.service.calls[0].params == {
        "CiphertextBlob": base64.b64encode(b"\x00\xff").decode()
    }
