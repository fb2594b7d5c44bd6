"""keyd's plain-request fast path (server.parse_plain_request, server.plain_response).

The fast path may only ever accept: whatever it accepts, h11 must read the same way
(same method, target, headers, body), and whatever h11 would refuse or treat
specially it must leave to h11. Its responses must be byte for byte what h11 writes.
"""

from __future__ import annotations

import json
import socket
import threading
from typing import Any

import h11
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kmsfs.kms import server
from kmsfs.kms.client import KMSClient
from kmsfs.kms.server import DEFAULT_LIMITS, ServerLimits, parse_plain_request, plain_response

BODY = b'{"KeyId": "alias/k", "KeySpec": "AES_256"}'


def request_bytes(
    body: bytes = BODY, *, extra: bytes = b"", length: int | None = None, line: bytes = b""
) -> bytes:
    head = line or b"POST / HTTP/1.1"
    return (
        head + b"\r\nHost: localhost\r\nContent-Type: application/x-amz-json-1.1\r\n"
        b"X-Amz-Target: TrentService.GenerateDataKey\r\n"
        + extra
        + b"Content-Length: %d\r\n\r\n" % (len(body) if length is None else length)
        + body
    )


def h11_read(data: bytes) -> tuple[h11.Request, bytes, bytes]:
    """What h11 makes of *data*: the request, its body and the bytes left after it."""
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=DEFAULT_LIMITS.max_header_bytes)
    conn.receive_data(data)
    request = None
    parts = []
    while True:
        event = conn.next_event()
        assert event is not h11.NEED_DATA
        if type(event) is h11.Request:
            request = event
        elif type(event) is h11.Data:
            parts.append(bytes(event.data))
        elif type(event) is h11.EndOfMessage:
            assert request is not None
            return request, b"".join(parts), conn.trailing_data[0]


def test_what_kmsfs_clients_send_is_plain_and_read_as_h11_reads_it() -> None:
    data = request_bytes()
    parsed = parse_plain_request(data, DEFAULT_LIMITS)
    assert parsed is not None
    request, body = parsed
    expected, expected_body, _ = h11_read(data)
    assert (request.method, request.target) == (expected.method, expected.target)
    assert request.headers == list(expected.headers)
    assert body == expected_body == BODY


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (b"X-Odd-Case:\t  spaced  value \t\r\n", (b"x-odd-case", b"spaced  value")),
        (b"X-Obs-Text: caf\xe9\r\n", (b"x-obs-text", b"caf\xe9")),  # RFC 9110 obs-text
        (b"X-Empty:\r\n", (b"x-empty", b"")),
    ],
    ids=["whitespace", "obs-text", "empty"],
)
def test_headers_as_h11_reads_them(extra: bytes, expected: tuple[bytes, bytes]) -> None:
    data = request_bytes(extra=extra)
    parsed = parse_plain_request(data, DEFAULT_LIMITS)
    assert parsed is not None
    assert parsed[0].headers == list(h11_read(data)[0].headers)
    assert expected in parsed[0].headers


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(request_bytes(body=BODY[:-1], length=len(BODY)), id="body-incomplete"),
        pytest.param(request_bytes()[:30], id="head-incomplete"),
        pytest.param(request_bytes() + request_bytes(), id="pipelined"),
        pytest.param(request_bytes(line=b"GET / HTTP/1.1"), id="method"),
        pytest.param(request_bytes(line=b"POST /x HTTP/1.1"), id="path"),
        pytest.param(request_bytes(line=b"POST / HTTP/1.0"), id="http-1.0"),
        pytest.param(request_bytes(extra=b"Connection: close\r\n"), id="connection-close"),
        pytest.param(request_bytes(extra=b"Expect: 100-continue\r\n"), id="expect"),
        pytest.param(request_bytes(extra=b"Transfer-Encoding: chunked\r\n"), id="chunked"),
        pytest.param(request_bytes(extra=b"Content-Length: 5\r\n"), id="two-lengths"),
        pytest.param(request_bytes(length=-1), id="negative-length"),
        pytest.param(request_bytes(extra=b"Host: other\r\n"), id="two-hosts"),
        pytest.param(request_bytes().replace(b"Host: localhost\r\n", b""), id="no-host"),
        pytest.param(request_bytes(extra=b"Bad Name: x\r\n"), id="space-in-name"),
        pytest.param(request_bytes(extra=b"X: a\x00b\r\n"), id="nul-in-value"),
        pytest.param(request_bytes(extra=b"X: a\r\n folded\r\n"), id="obs-fold"),
        pytest.param(request_bytes(extra=b"X: a\rb\r\n"), id="bare-cr"),
        pytest.param(request_bytes(extra=b"X: a\nY: b\r\n"), id="bare-lf"),
        pytest.param(request_bytes(extra=b"X: " + b"v" * 17000 + b"\r\n"), id="head-too-large"),
        pytest.param(request_bytes(extra=b"X: y\r\n" * 100), id="too-many-headers"),
        pytest.param(request_bytes(body=b"x" * (256 * 1024 + 1)), id="body-too-large"),
        pytest.param(b"\r\n" + request_bytes(), id="leading-empty-line"),
        pytest.param(b"garbage\r\n\r\n", id="garbage"),
    ],
)
def test_anything_not_plain_is_left_to_h11(data: bytes) -> None:
    assert parse_plain_request(data, DEFAULT_LIMITS) is None


def test_limits_are_those_given() -> None:
    data = request_bytes()
    assert parse_plain_request(data, ServerLimits(max_body_bytes=len(BODY))) is not None
    assert parse_plain_request(data, ServerLimits(max_body_bytes=len(BODY) - 1)) is None
    head = len(data) - len(BODY)
    assert parse_plain_request(data, ServerLimits(max_header_bytes=head)) is not None
    assert parse_plain_request(data, ServerLimits(max_header_bytes=head - 1)) is None
    assert parse_plain_request(data, ServerLimits(max_header_count=4)) is not None
    assert parse_plain_request(data, ServerLimits(max_header_count=3)) is None


@settings(max_examples=400, deadline=None)
@given(
    position=st.integers(min_value=0, max_value=len(request_bytes()) - 1),
    replacement=st.binary(min_size=0, max_size=4),
)
def test_a_mangled_request_is_accepted_only_if_h11_reads_it_the_same(
    position: int, replacement: bytes
) -> None:
    """Change a few bytes anywhere: whenever the fast path still accepts, h11 must read
    exactly the same request and body (and find nothing after it)."""
    original = request_bytes()
    data = original[:position] + replacement + original[position + 1 :]
    parsed = parse_plain_request(data, DEFAULT_LIMITS)
    if parsed is None:
        return
    request, body = parsed
    expected, expected_body, trailing = h11_read(data)
    assert (request.method, request.target) == (expected.method, expected.target)
    assert request.headers == list(expected.headers)
    assert body == expected_body
    assert trailing == b""


@pytest.mark.parametrize("status", [200, 400, 403, 404, 413, 500, 503])
def test_plain_response_is_what_h11_writes(status: int) -> None:
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(request_bytes())
    h11_read_events = []
    while (event := conn.next_event()) is not h11.NEED_DATA:
        h11_read_events.append(event)
    payload = json.dumps({"KeyId": "k"}).encode()
    written = server._response(conn, status, payload, "3f0e-request-id", close=False)
    assert plain_response(status, payload, "3f0e-request-id") == written


def test_response_larger_than_the_socket_buffer_arrives_whole(
    keyd: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One write() takes what the socket buffer holds; the rest is sent as it drains
    (keyd's side of the socket gets a 32 KiB send buffer; the response is ~250 KiB)."""
    partial_sends: list[int] = []
    send_now = server._SocketTransport.send_now
    transport_init = server._SocketTransport.__init__

    def small_buffer_init(self: Any, sock: Any) -> None:
        transport_init(self, sock)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 32 * 1024)

    monkeypatch.setattr(server._SocketTransport, "__init__", small_buffer_init)

    def recording_send_now(self: Any, data: bytes) -> int:
        sent = send_now(self, data)
        if sent < len(data):
            partial_sends.append(sent)
        return sent

    monkeypatch.setattr(server._SocketTransport, "send_now", recording_send_now)
    big = "y" * (250 * 1024)
    with KMSClient(keyd.socket_path, timeout=10) as client:
        assert client.call("Echo", {"x": big}) == {"Params": {"x": big}}
        assert client.call("Echo", {"n": 1}) == {"Params": {"n": 1}}  # still in step
    assert partial_sends  # the response did not fit in one write


def test_a_request_waiting_when_the_last_is_answered_is_read_at_once(
    start_keyd: Any, fake_service: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under load the next request is already in the socket when the last response is
    sent: it is read without waiting (recv_now), and still answered correctly."""
    entered, proceed = threading.Event(), threading.Event()

    class WaitingService(fake_service):  # type: ignore[misc,valid-type]
        def handle(self, operation: str, params: Any, caller: Any, request_id: str) -> Any:
            if operation == "Wait":
                entered.set()
                assert proceed.wait(10)  # holds the loop until the next request was sent
                return {"Waited": True}
            return super().handle(operation, params, caller, request_id)

    ready_reads: list[int] = []
    recv_now = server._SocketTransport.recv_now

    def recording_recv_now(self: Any, max_bytes: int) -> bytes | None:
        data = recv_now(self, max_bytes)
        if data:
            ready_reads.append(len(data))
        return data

    monkeypatch.setattr(server._SocketTransport, "recv_now", recording_recv_now)
    keyd = start_keyd(WaitingService())
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(keyd.socket_path))
        sock.sendall(request_bytes(b"{}").replace(b"GenerateDataKey", b"Wait"))
        assert entered.wait(10)  # keyd read the first request alone and is inside Wait
        sock.sendall(request_bytes(b'{"n": 1}').replace(b"GenerateDataKey", b"Echo"))
        proceed.set()
        received = b""
        while b'{"Params":{"n":1}}' not in received:
            chunk = sock.recv(65536)
            assert chunk
            received += chunk
    assert received.count(b"HTTP/1.1 200 OK") == 2
    assert b'{"Waited":true}' in received
    assert ready_reads  # the second request was read without a wait


def test_a_client_whose_requests_are_always_waiting_lets_others_in(
    start_keyd: Any, fake_service: Any
) -> None:
    """keyd answers a waiting request without a trip through trio's scheduler, but
    lets the other connections run every REQUESTS_PER_CHECKPOINT requests: a client
    with many requests pipelined does not make another wait for all of them."""
    entered, proceed = threading.Event(), threading.Event()

    class WaitingService(fake_service):  # type: ignore[misc,valid-type]
        def handle(self, operation: str, params: Any, caller: Any, request_id: str) -> Any:
            if operation == "Wait":
                entered.set()
                assert proceed.wait(10)
                return {"Waited": True}
            return super().handle(operation, params, caller, request_id)

    service = WaitingService()
    keyd = start_keyd(service)
    flood = 10 * server.REQUESTS_PER_CHECKPOINT
    with (
        socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as busy,
        socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as other,
    ):
        for sock in (busy, other):
            sock.settimeout(10)
            sock.connect(str(keyd.socket_path))
        assert KMSClient(keyd.socket_path).call("Echo", {"warm": 1})  # both accepted by now
        requests = [request_bytes(b"{}").replace(b"GenerateDataKey", b"Wait")]
        requests += [
            request_bytes(json.dumps({"n": n}).encode()).replace(b"GenerateDataKey", b"Echo")
            for n in range(flood)
        ]
        busy.sendall(b"".join(requests))
        assert entered.wait(10)  # keyd is inside Wait: the loop cannot run anything else
        other.sendall(request_bytes(b'{"other": 1}').replace(b"GenerateDataKey", b"Echo"))
        proceed.set()
        received = b""
        while b'{"Params":{"other":1}}' not in received:
            chunk = other.recv(65536)
            assert chunk
            received += chunk
        answered = b""
        while answered.count(b"HTTP/1.1 200") < flood + 1:
            chunk = busy.recv(65536)
            assert chunk
            answered += chunk
    order = [call.params for call in service.calls if call.operation == "Echo"]
    other_position = order.index({"other": 1})
    # the other client was served long before the flood was through (8 to 16 of the
    # flood's requests before it were seen; 81 without the periodic checkpoint)
    assert other_position < 4 * server.REQUESTS_PER_CHECKPOINT, other_position
