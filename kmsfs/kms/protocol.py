"""The wire format keyd and its clients share: AWS KMS's JSON 1.1 protocol over HTTP/1.1.

A request is ``POST /`` with ``X-Amz-Target: TrentService.<Operation>`` and a JSON
object as body; binary fields (``Plaintext``, ``CiphertextBlob``) travel as base64
strings. A response is ``200`` with the JSON result, or an error status with
``{"__type": "<AWS error type>", "message": "..."}``.

Everything here is pure (bytes in, bytes or exceptions out): the server
(:mod:`kmsfs.kms.server`) and both clients (:mod:`kmsfs.kms.client`) build on it.
"""

from __future__ import annotations

import base64
import binascii
import errno
import json
import os
import select
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import h11
import httptools

from kmsfs.errors import (
    KeydUnavailable,
    KMSError,
    KMSInternalException,
    SerializationException,
    kms_error_from_type,
)

TARGET_PREFIX = "TrentService."
CONTENT_TYPE = "application/x-amz-json-1.1"
REQUEST_ID_HEADER = "x-amzn-RequestId"

#: response fields that hold base64-encoded binary data
BINARY_FIELDS: tuple[str, ...] = ("Plaintext", "CiphertextBlob")


def _encode_default(value: object) -> Any:
    if isinstance(value, bytes | bytearray | memoryview):
        return base64.b64encode(value).decode("ascii")
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


# One encoder each, built once: json.dumps() with arguments builds a new one per call.
_REQUEST_ENCODER = json.JSONEncoder(separators=(",", ":"), default=_encode_default)
_RESPONSE_ENCODER = json.JSONEncoder(separators=(",", ":"))


def encode_request_body(params: Mapping[str, Any]) -> bytes:
    """The JSON body of a request; ``bytes`` values anywhere become base64 strings."""
    return _REQUEST_ENCODER.encode(params).encode("utf-8")


def encode_response_body(result: Mapping[str, Any]) -> bytes:
    """The JSON body of a successful response (raises ``TypeError``/``ValueError``)."""
    return _RESPONSE_ENCODER.encode(result).encode("utf-8")


def encode_error_body(aws_type: str, message: str) -> bytes:
    """The JSON body of an error response."""
    return _RESPONSE_ENCODER.encode({"__type": aws_type, "message": message}).encode("utf-8")


class _NotJSON(ValueError):
    """A number JSON does not have (NaN, Infinity) or that a double cannot hold."""


def _refuse_constant(name: str) -> float:
    # NaN, Infinity and -Infinity are Python's extensions, not JSON (RFC 8259 section 6)
    raise _NotJSON(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):  # 1e999 overflows a double
        raise _NotJSON("a number is out of range")
    return value


_REQUEST_DECODER = json.JSONDecoder(parse_constant=_refuse_constant, parse_float=_finite_float)


def decode_request_body(body: bytes) -> dict[str, Any]:
    """The JSON object of a request body (an empty body is ``{}``).

    Raises :class:`SerializationException` (400, as AWS answers a body it cannot
    deserialize) for anything that is not one strict JSON object: invalid UTF-8,
    syntax errors, trailing data, nesting too deep for the parser, ``NaN``/
    ``Infinity``/``-Infinity`` (which Python's json module would accept) and numbers
    that overflow a double (``1e999``, which would silently become infinity).
    Integers longer than Python's digit limit are refused the same way.
    """
    if not body:
        return {}
    try:
        text = body.decode("utf-8")  # strict: raw UTF-8 encoded surrogates are refused here
        document = _REQUEST_DECODER.decode(text)  # whitespace around is fine, data not
    except _NotJSON as exc:
        raise SerializationException(f"the body is not valid JSON: {exc}") from None
    except (ValueError, RecursionError):
        raise SerializationException("the body is not valid JSON") from None
    if type(document) is not dict:
        raise SerializationException("the body is not a JSON object")
    return document


#: response headers that make framing or the connection h11's business
_NOT_PLAIN_RESPONSE_HEADERS = frozenset((b"transfer-encoding", b"connection", b"trailer"))
_CONTENT_TYPE_BYTES = CONTENT_TYPE.encode("ascii")
#: bytes h11 refuses in a reason phrase (NUL, and white space but space and tab)
_NOT_IN_REASON = frozenset(b"\x00\n\r\x0b\x0c")


def request_headers(
    operation: str, body_length: int, extra: list[tuple[bytes, bytes]]
) -> list[tuple[bytes, bytes]]:
    """The header fields of a request to keyd (``extra``: e.g. the forwarded caller)."""
    return [
        (b"Host", b"localhost"),
        (b"Content-Type", _CONTENT_TYPE_BYTES),
        (b"X-Amz-Target", target_header(operation).encode("ascii")),
        (b"Content-Length", b"%d" % body_length),
        *extra,
    ]


def encode_request(headers: list[tuple[bytes, bytes]], body: bytes) -> bytes:
    """``POST /`` with ``headers`` and ``body``: the bytes h11 writes for it."""
    lines = [b"POST / HTTP/1.1"]
    lines += [b"%s: %s" % header for header in headers]
    lines += [b"", body]
    return b"\r\n".join(lines)


class _PlainResponseEvents:
    """httptools' callbacks for :class:`ResponseReader`: what the response said."""

    __slots__ = ("reason", "headers", "body", "begun", "completed")

    def __init__(self) -> None:
        self.reason = b""
        self.headers: list[bytes] = []
        self.body: list[bytes] = []
        self.begun = 0
        self.completed = 0

    def on_message_begin(self) -> None:
        self.begun += 1

    def on_status(self, reason: bytes) -> None:
        self.reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append(name.lower())

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        self.completed += 1


class ResponseReader:
    """Reads keyd's response to one request from the bytes as they arrive (sans-IO),
    for both clients.

    A plain response (what keyd sends: ``HTTP/1.1``, a final status, one
    Content-Length and exactly that body, no Transfer-Encoding or Connection header)
    is parsed by httptools (llhttp) in a few microseconds. Any other (100 Continue
    first, chunked, Connection: close, HTTP/1.0 with the body running to the
    close...), or anything llhttp refuses, is read by h11 from the start, given the
    request that was sent so that its state machine agrees. ``feed`` returns
    ``(status, body)`` once the response is complete, else None; ``feed(b"")`` is the
    end of the stream. Raises ``h11.ProtocolError`` for a malformed response and
    ``EOFError`` if the stream ends mid-response. ``keep_alive``: whether the
    connection may carry the next request.
    """

    def __init__(self, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        self._headers = headers
        self._body = body
        self._buffer = bytearray()
        self._events = _PlainResponseEvents()
        self._parser = httptools.HttpResponseParser(self._events)
        self._h11: h11.Connection | None = None
        self._status = 0
        self._parts: list[bytes] = []
        self.keep_alive = True

    def feed(self, data: bytes) -> tuple[int, bytes] | None:
        if self._h11 is not None:
            self._h11.receive_data(data)
            return self._next_events(self._h11)
        self._buffer += data
        if data:
            try:
                self._parser.feed_data(data)
            except httptools.HttpParserError:  # HttpParserUpgrade included
                pass
            else:
                events = self._events
                if not events.completed and events.begun <= 1:
                    return None  # not complete yet
                plain = self._plain()
                if plain is not None:
                    return plain
        return self._read_with_h11(end_of_stream=not data)

    def _plain(self) -> tuple[int, bytes] | None:
        """The complete response, if it is plain (see the class docstring)."""
        events, parser = self._events, self._parser
        if events.begun != 1 or events.completed != 1:
            return None  # more than one message (a 100 Continue first)
        status = parser.get_status_code()
        if status < 200 or status in (204, 304) or parser.get_http_version() != "1.1":
            return None
        if any(byte in _NOT_IN_REASON for byte in events.reason):
            return None  # llhttp takes a NUL (and more) in the reason phrase; h11 does not
        if events.headers.count(b"content-length") != 1:
            return None
        if any(name in _NOT_PLAIN_RESPONSE_HEADERS for name in events.headers):
            return None
        body = b"".join(events.body)
        if self._buffer.find(b"\r\n\r\n") + 4 + len(body) != len(self._buffer):
            return None  # bytes the parser skipped or that follow the response
        return status, body

    def _read_with_h11(self, *, end_of_stream: bool) -> tuple[int, bytes] | None:
        conn = self._h11 = h11.Connection(h11.CLIENT)
        conn.send(h11.Request(method=b"POST", target=b"/", headers=self._headers))
        conn.send(h11.Data(data=self._body))
        conn.send(h11.EndOfMessage())
        if self._buffer:
            conn.receive_data(bytes(self._buffer))
            self._buffer = bytearray()
        if end_of_stream:
            conn.receive_data(b"")
        return self._next_events(conn)

    def _next_events(self, conn: h11.Connection) -> tuple[int, bytes] | None:
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                return None
            if type(event) is h11.Response:
                self._status = event.status_code
            elif type(event) is h11.Data:
                self._parts.append(bytes(event.data))
            elif type(event) is h11.EndOfMessage:
                self.keep_alive = conn.our_state is h11.DONE and conn.their_state is h11.DONE
                return self._status, b"".join(self._parts)
            elif type(event) is h11.ConnectionClosed:
                raise EOFError("keyd closed the connection mid-response")
            # InformationalResponse (100 Continue): keep reading


#: ids made ahead from one os.urandom() call (random_uuid); list.pop() hands each out
#: once, also between threads (atomic under the GIL)
_UUIDS_AHEAD: list[str] = []
#: how many ids one os.urandom() call makes
UUID_BATCH = 64


def random_uuid() -> str:
    """``str(uuid.uuid4())``, made in a fraction of the time (request ids, audit event
    ids): 16 random bytes in hex, with the version (4) and the RFC 4122 variant (10xx)
    set. The bytes come from the kernel's CSPRNG, as uuid4's, but for UUID_BATCH ids
    at a time (one getrandom() instead of one per id: keyd makes two ids per request).
    These ids are identifiers, not secrets (a response carries its request id); key
    material, nonces and IVs are never taken from this pool. A forked child starts
    with an empty pool (os.register_at_fork), so it never repeats its parent's ids."""
    try:
        return _UUIDS_AHEAD.pop()
    except IndexError:
        pass
    text = os.urandom(16 * UUID_BATCH).hex()
    made = []
    for start in range(0, len(text), 32):
        part = text[start : start + 32]
        variant = "89ab"[int(part[16], 16) & 3]
        made.append(f"{part[:8]}-{part[8:12]}-4{part[13:16]}-{variant}{part[17:20]}-{part[20:]}")
    uuid = made.pop()
    _UUIDS_AHEAD.extend(made)
    return uuid


os.register_at_fork(after_in_child=_UUIDS_AHEAD.clear)


def target_header(operation: str) -> str:
    """The ``X-Amz-Target`` value naming ``operation``."""
    return TARGET_PREFIX + operation


def decode_response(status: int, body: bytes) -> dict[str, Any]:
    """The result of a response, or raise the :class:`KMSError` its error body names."""
    try:
        document = json.loads(body) if body else {}
    except (ValueError, RecursionError):
        document = None
    if status == 200:
        if not isinstance(document, dict):
            raise KMSInternalException("keyd sent a response that is not a JSON object")
        return document
    if isinstance(document, dict):
        aws_type = document.get("__type")
        message = document.get("message", document.get("Message", ""))
        if isinstance(aws_type, str) and aws_type:
            raise kms_error_from_type(aws_type, message if isinstance(message, str) else "")
    if status >= 500:
        raise KMSInternalException(f"keyd answered HTTP {status}")
    error = KMSError(f"keyd answered HTTP {status}")
    error.aws_type = "UnknownError"
    error.status = status
    raise error


def decode_binary_fields(result: dict[str, Any], names: tuple[str, ...]) -> dict[str, Any]:
    """Replace the base64 strings of ``names`` in ``result`` (in place) by bytes."""
    for name in names:
        value = result.get(name)
        if value is None:
            continue
        if not isinstance(value, str):
            raise KMSInternalException(f"keyd sent a non-string {name}")
        try:
            result[name] = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise KMSInternalException(f"keyd sent malformed base64 in {name}") from None
    return result


def _drop_none(**params: Any) -> dict[str, Any]:
    return {name: value for name, value in params.items() if value is not None}


@dataclass(frozen=True, slots=True)
class KMSRequest:
    """One API call: operation, parameters and the response fields to base64-decode."""

    operation: str
    params: dict[str, Any]
    binary_fields: tuple[str, ...] = field(default=())

    def decode_result(self, result: dict[str, Any]) -> dict[str, Any]:
        return decode_binary_fields(result, self.binary_fields)

    # -- builders for the operations the clients wrap ---------------------------------
    @classmethod
    def generate_data_key(
        cls,
        key_id: str,
        *,
        encryption_context: Mapping[str, str] | None = None,
        key_spec: str | None = None,
        number_of_bytes: int | None = None,
        without_plaintext: bool = False,
    ) -> KMSRequest:
        if key_spec is None and number_of_bytes is None:
            key_spec = "AES_256"
        params = _drop_none(
            KeyId=key_id,
            EncryptionContext=dict(encryption_context) if encryption_context else None,
            KeySpec=key_spec,
            NumberOfBytes=number_of_bytes,
        )
        if without_plaintext:
            return cls("GenerateDataKeyWithoutPlaintext", params, ("CiphertextBlob",))
        return cls("GenerateDataKey", params, BINARY_FIELDS)

    @classmethod
    def decrypt(
        cls,
        ciphertext_blob: bytes,
        *,
        encryption_context: Mapping[str, str] | None = None,
        key_id: str | None = None,
        encryption_algorithm: str | None = None,
    ) -> KMSRequest:
        params = _drop_none(
            CiphertextBlob=ciphertext_blob,
            EncryptionContext=dict(encryption_context) if encryption_context else None,
            KeyId=key_id,
            EncryptionAlgorithm=encryption_algorithm,
        )
        return cls("Decrypt", params, ("Plaintext",))

    @classmethod
    def encrypt(
        cls,
        key_id: str,
        plaintext: bytes,
        *,
        encryption_context: Mapping[str, str] | None = None,
        encryption_algorithm: str | None = None,
    ) -> KMSRequest:
        params = _drop_none(
            KeyId=key_id,
            Plaintext=plaintext,
            EncryptionContext=dict(encryption_context) if encryption_context else None,
            EncryptionAlgorithm=encryption_algorithm,
        )
        return cls("Encrypt", params, ("CiphertextBlob",))

    @classmethod
    def re_encrypt(
        cls,
        ciphertext_blob: bytes,
        destination_key_id: str,
        *,
        source_encryption_context: Mapping[str, str] | None = None,
        destination_encryption_context: Mapping[str, str] | None = None,
        source_key_id: str | None = None,
    ) -> KMSRequest:
        params = _drop_none(
            CiphertextBlob=ciphertext_blob,
            DestinationKeyId=destination_key_id,
            SourceEncryptionContext=(
                dict(source_encryption_context) if source_encryption_context else None
            ),
            DestinationEncryptionContext=(
                dict(destination_encryption_context) if destination_encryption_context else None
            ),
            SourceKeyId=source_key_id,
        )
        return cls("ReEncrypt", params, ("CiphertextBlob",))

    @classmethod
    def describe_key(cls, key_id: str) -> KMSRequest:
        return cls("DescribeKey", {"KeyId": key_id})

    @classmethod
    def generate_random(cls, number_of_bytes: int) -> KMSRequest:
        return cls("GenerateRandom", {"NumberOfBytes": number_of_bytes}, ("Plaintext",))

    # -- asymmetric and HMAC keys --------------------------------------------------
    @classmethod
    def get_public_key(cls, key_id: str) -> KMSRequest:
        return cls("GetPublicKey", {"KeyId": key_id}, ("PublicKey",))

    @classmethod
    def sign(
        cls, key_id: str, message: bytes, signing_algorithm: str, *, message_type: str = "RAW"
    ) -> KMSRequest:
        params = {
            "KeyId": key_id,
            "Message": message,
            "MessageType": message_type,
            "SigningAlgorithm": signing_algorithm,
        }
        return cls("Sign", params, ("Signature",))

    @classmethod
    def verify(
        cls,
        key_id: str,
        message: bytes,
        signature: bytes,
        signing_algorithm: str,
        *,
        message_type: str = "RAW",
    ) -> KMSRequest:
        params = {
            "KeyId": key_id,
            "Message": message,
            "MessageType": message_type,
            "Signature": signature,
            "SigningAlgorithm": signing_algorithm,
        }
        return cls("Verify", params)

    @classmethod
    def generate_mac(cls, key_id: str, message: bytes, mac_algorithm: str) -> KMSRequest:
        params = {"KeyId": key_id, "Message": message, "MacAlgorithm": mac_algorithm}
        return cls("GenerateMac", params, ("Mac",))

    @classmethod
    def verify_mac(cls, key_id: str, message: bytes, mac: bytes, mac_algorithm: str) -> KMSRequest:
        params = {"KeyId": key_id, "Message": message, "Mac": mac, "MacAlgorithm": mac_algorithm}
        return cls("VerifyMac", params)

    @classmethod
    def generate_data_key_pair(
        cls,
        key_id: str,
        key_pair_spec: str,
        *,
        encryption_context: Mapping[str, str] | None = None,
        without_plaintext: bool = False,
    ) -> KMSRequest:
        params = _drop_none(
            KeyId=key_id,
            KeyPairSpec=key_pair_spec,
            EncryptionContext=dict(encryption_context) if encryption_context else None,
        )
        if without_plaintext:
            return cls(
                "GenerateDataKeyPairWithoutPlaintext",
                params,
                ("PrivateKeyCiphertextBlob", "PublicKey"),
            )
        return cls(
            "GenerateDataKeyPair",
            params,
            ("PrivateKeyCiphertextBlob", "PrivateKeyPlaintext", "PublicKey"),
        )

    @classmethod
    def derive_shared_secret(cls, key_id: str, public_key: bytes) -> KMSRequest:
        params = {"KeyId": key_id, "KeyAgreementAlgorithm": "ECDH", "PublicKey": public_key}
        return cls("DeriveSharedSecret", params, ("SharedSecret",))


# ----------------------------------------------------------------- connection errors
def describe_connection_error(cause: BaseException) -> str:
    """A short, one-line reason for a failed connection to keyd."""
    while not isinstance(cause, OSError) and cause.__cause__ is not None:
        cause = cause.__cause__  # e.g. trio.BrokenResourceError wrapping the OSError
    if isinstance(cause, FileNotFoundError):
        return "no socket there (is keyd running?)"
    if isinstance(cause, ConnectionRefusedError):
        return "connection refused (stale socket: keyd is not running)"
    if isinstance(cause, PermissionError):
        return "permission denied"
    if isinstance(cause, TimeoutError | socket.timeout):
        return "timed out"
    if isinstance(cause, BrokenPipeError | ConnectionResetError | EOFError):
        return "connection lost"
    if isinstance(cause, OSError) and cause.errno is not None:
        return os.strerror(cause.errno).lower() or f"errno {cause.errno}"
    text = str(cause).splitlines()[0] if str(cause) else ""
    return text or type(cause).__name__


def keyd_unavailable(socket_path: os.PathLike[str] | str, reason: str) -> KeydUnavailable:
    """The :class:`KeydUnavailable` for ``socket_path``; one line, names the path."""
    return KeydUnavailable(f"keyd at {os.fspath(socket_path)}: {reason}")


def connection_looks_dead(fileno: int) -> bool:
    """True if an idle keep-alive connection is readable: EOF, an error, or stray bytes.

    An idle connection has nothing to read until we send a request, so readability
    means keyd closed it (idle timeout, restart) and it must not be reused.
    """
    poller = select.poll()
    poller.register(fileno, select.POLLIN | select.POLLERR | select.POLLHUP)
    try:
        return bool(poller.poll(0))
    except OSError as exc:  # pragma: no cover - EINTR is retried by Python
        return exc.errno != errno.EINTR
