"""The clients' response reader (protocol.ResponseReader): a plain response is read
without h11, any other framing by h11, with the same result either way."""

from __future__ import annotations

import h11
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kmsfs.kms import protocol
from kmsfs.kms.protocol import ResponseReader, encode_request, request_headers

BODY = b'{"KeyId":"k"}'
HEADERS = request_headers("GenerateDataKey", len(BODY), [(b"X-Extra", b"1")])
PLAIN = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/x-amz-json-1.1\r\n"
    b"Content-Length: 11\r\nx-amzn-RequestId: 1234\r\n\r\n"
    b'{"Ok":true}'
)


def read_all(chunks: list[bytes]) -> tuple[tuple[int, bytes] | None, bool]:
    reader = ResponseReader(HEADERS, BODY)
    result = None
    for chunk in chunks:
        result = reader.feed(chunk)
        if result is not None:
            break
    return result, reader.keep_alive


def read_by_h11_only(data: bytes) -> tuple[int, bytes]:
    """What h11 alone makes of *data* as the response to the request."""
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method=b"POST", target=b"/", headers=HEADERS))
    conn.send(h11.Data(data=BODY))
    conn.send(h11.EndOfMessage())
    conn.receive_data(data)
    status, parts = 0, []
    while True:
        event = conn.next_event()
        assert event is not h11.NEED_DATA
        if type(event) is h11.Response:
            status = event.status_code
        elif type(event) is h11.Data:
            parts.append(bytes(event.data))
        elif type(event) is h11.EndOfMessage:
            assert conn.their_state is h11.DONE and conn.trailing_data == (b"", False)
            return status, b"".join(parts)


def test_request_is_what_h11_writes() -> None:
    conn = h11.Connection(h11.CLIENT)
    expected = conn.send(h11.Request(method=b"POST", target=b"/", headers=HEADERS))
    expected += conn.send(h11.Data(data=BODY)) + conn.send(h11.EndOfMessage())
    assert encode_request(HEADERS, BODY) == expected


def test_plain_response_in_one_piece_without_h11(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_h11(*args: object, **kwargs: object) -> None:
        raise AssertionError("h11 used for a plain response")

    monkeypatch.setattr(protocol.h11, "Connection", no_h11)
    assert read_all([PLAIN]) == ((200, b'{"Ok":true}'), True)


def test_plain_response_byte_by_byte() -> None:
    assert read_all([PLAIN[i : i + 1] for i in range(len(PLAIN))]) == (
        (200, b'{"Ok":true}'),
        True,
    )


@pytest.mark.parametrize(
    ("response", "keep_alive"),
    [
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            b'4\r\n{"Ok\r\n7;x=1\r\n":true}\r\n0\r\nX-Trailer: 1\r\n\r\n',
            True,
        ),
        (b"HTTP/1.1 100 Continue\r\n\r\n" + PLAIN, True),
        (b'HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 11\r\n\r\n{"Ok":true}', False),
        (b'HTTP/1.0 200 OK\r\nContent-Length: 11\r\n\r\n{"Ok":true}', False),
    ],
    ids=["chunked", "100-continue", "connection-close", "http-1.0"],
)
def test_other_framings_are_read_by_h11(response: bytes, keep_alive: bool) -> None:
    reader = ResponseReader(HEADERS, BODY)
    assert reader.feed(response) == (200, b'{"Ok":true}')
    assert reader.keep_alive is keep_alive
    assert reader._h11 is not None  # not by the fast path


def test_body_running_to_the_close() -> None:
    assert read_all([b'HTTP/1.0 200 OK\r\n\r\n{"Ok":true}', b""]) == (
        (200, b'{"Ok":true}'),
        False,
    )


def test_stream_ending_mid_response() -> None:
    reader = ResponseReader(HEADERS, BODY)
    assert reader.feed(PLAIN[:-3]) is None
    with pytest.raises((EOFError, h11.RemoteProtocolError)):
        reader.feed(b"")


def test_garbage_is_a_protocol_error() -> None:
    reader = ResponseReader(HEADERS, BODY)
    with pytest.raises(h11.RemoteProtocolError):
        reader.feed(b"SSH-2.0-OpenSSH_9.6\r\n\r\n")


@settings(max_examples=400, deadline=None)
@given(
    position=st.integers(min_value=0, max_value=len(PLAIN) - 1),
    replacement=st.binary(min_size=0, max_size=4),
)
def test_a_mangled_response_is_read_as_h11_reads_it(position: int, replacement: bytes) -> None:
    """Whatever the fast path (httptools) accepts of a changed response, h11 reads
    the same way; whatever it does not is h11's to read or refuse."""
    data = PLAIN[:position] + replacement + PLAIN[position + 1 :]
    reader = ResponseReader(HEADERS, BODY)
    try:
        result = reader.feed(data)
    except (h11.ProtocolError, EOFError):
        assert reader._h11 is not None  # only h11 refuses
        return
    if result is not None and reader._h11 is None:  # the fast path accepted it
        assert reader.keep_alive
        assert result == read_by_h11_only(data)
