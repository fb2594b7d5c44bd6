"""Clients of keyd: :class:`AsyncKMSClient` (trio + h11) and :class:`KMSClient` (blocking).

Both speak AWS KMS's JSON 1.1 protocol over keyd's Unix socket and share everything
but the transport: request bodies, response and error decoding, base64 handling
(:mod:`kmsfs.kms.protocol`) and the convenience methods (:class:`KMSOperations`).

Connections. Each client keeps ONE keep-alive connection and sends one request at a
time over it (the async client serialises concurrent callers with a ``trio.Lock``; a
keyd round trip is a few hundred microseconds, so a queue of callers drains fast).
Open several clients for parallel requests. The connection is opened on first use and
reopened transparently, once, when keyd turns out to have closed it (idle timeout,
keyd restarted): either it is found closed before the request is sent, or it closes
without sending a single byte of the response. A request on a fresh connection is
never retried.

Which keyd. A client given no socket finds one by :func:`kmsfs.kms.paths.find_keyd`
(``$KMSFS_KEYD_SOCKET``, the per-user config, the default), when it is made.

Trust. Before connecting, each client checks who controls the socket's path, and
after connecting, before sending anything, who listens on it (``SO_PEERCRED``): see
:mod:`kmsfs.kms.trust`. A keyd run by anyone but the client's own user, root or a
service account named with ``keyd_uid`` / ``KMSFS_KEYD_UID`` raises
:class:`kmsfs.errors.KeydUntrusted`, also for a socket named explicitly.

Failures. An error body raises the matching :class:`kmsfs.errors.KMSError` subclass.
A missing socket, a refused or lost connection, or no answer within ``timeout``
seconds raises :class:`kmsfs.errors.KeydUnavailable` with a one-line message naming
the socket path and the cause.

Forwarding. Every call takes ``on_behalf_of`` (a
:class:`kmsfs.kms.caller.ForwardedCaller`): see :func:`forwarded_headers`.

Binary fields. ``call`` base64-encodes any ``bytes`` value in ``params`` and returns
the response as decoded JSON (binary fields still base64 strings). The convenience
methods (``decrypt``, ``generate_data_key``...) also decode ``Plaintext`` and
``CiphertextBlob`` in the result to ``bytes``.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Awaitable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Generic, Self, TypeVar

import h11
import trio

from kmsfs.kms.caller import FORWARDED_CALLER_HEADER, ForwardedCaller
from kmsfs.kms.paths import find_keyd
from kmsfs.kms.protocol import (
    CONTENT_TYPE,
    KMSRequest,
    ResponseReader,
    connection_looks_dead,
    decode_response,
    describe_connection_error,
    encode_request,
    encode_request_body,
    keyd_unavailable,
    request_headers,
)
from kmsfs.kms.trust import check_peer, check_socket_path, expected_keyd_uids

__all__ = ["AsyncKMSClient", "KMSClient", "KMSOperations"]

ResultT = TypeVar("ResultT")

_RECEIVE_SIZE = 64 * 1024
_CONTENT_TYPE = CONTENT_TYPE.encode("ascii")


class KMSOperations(Generic[ResultT]):
    """The convenience methods, written once for both clients.

    Each builds a :class:`KMSRequest` and hands it to ``_execute``: the blocking client
    returns the decoded result, the async one an awaitable of it.
    """

    def _execute(self, request: KMSRequest, on_behalf_of: ForwardedCaller | None = None) -> ResultT:
        raise NotImplementedError

    def generate_data_key(
        self,
        key_id: str,
        *,
        encryption_context: Mapping[str, str] | None = None,
        key_spec: str | None = None,
        number_of_bytes: int | None = None,
        on_behalf_of: ForwardedCaller | None = None,
    ) -> ResultT:
        """GenerateDataKey: ``Plaintext`` and ``CiphertextBlob`` as bytes, ``KeyId``.

        ``key_spec`` defaults to ``"AES_256"`` unless ``number_of_bytes`` is given.
        """
        return self._execute(
            KMSRequest.generate_data_key(
                key_id,
                encryption_context=encryption_context,
                key_spec=key_spec,
                number_of_bytes=number_of_bytes,
            ),
            on_behalf_of,
        )

    def generate_data_key_without_plaintext(
        self,
        key_id: str,
        *,
        encryption_context: Mapping[str, str] | None = None,
        key_spec: str | None = None,
        number_of_bytes: int | None = None,
        on_behalf_of: ForwardedCaller | None = None,
    ) -> ResultT:
        """GenerateDataKeyWithoutPlaintext: ``CiphertextBlob`` as bytes, ``KeyId``."""
        return self._execute(
            KMSRequest.generate_data_key(
                key_id,
                encryption_context=encryption_context,
                key_spec=key_spec,
                number_of_bytes=number_of_bytes,
                without_plaintext=True,
            ),
            on_behalf_of,
        )

    def decrypt(
        self,
        ciphertext_blob: bytes,
        *,
        encryption_context: Mapping[str, str] | None = None,
        key_id: str | None = None,
        encryption_algorithm: str | None = None,
        on_behalf_of: ForwardedCaller | None = None,
    ) -> ResultT:
        """Decrypt: ``Plaintext`` as bytes, ``KeyId``, ``EncryptionAlgorithm``.

        RSA keys: give ``key_id`` and ``encryption_algorithm`` (``RSAES_OAEP_SHA_256``...).
        """
        return self._execute(
            KMSRequest.decrypt(
                ciphertext_blob,
                encryption_context=encryption_context,
                key_id=key_id,
                encryption_algorithm=encryption_algorithm,
            ),
            on_behalf_of,
        )

    def encrypt(
        self,
        key_id: str,
        plaintext: bytes,
        *,
        encryption_context: Mapping[str, str] | None = None,
        encryption_algorithm: str | None = None,
        on_behalf_of: ForwardedCaller | None = None,
    ) -> ResultT:
        """Encrypt: ``CiphertextBlob`` as bytes, ``KeyId``, ``EncryptionAlgorithm``."""
        return self._execute(
            KMSRequest.encrypt(
                key_id,
                plaintext,
                encryption_context=encryption_context,
                encryption_algorithm=encryption_algorithm,
            ),
            on_behalf_of,
        )

    def re_encrypt(
        self,
        ciphertext_blob: bytes,
        destination_key_id: str,
        *,
        source_encryption_context: Mapping[str, str] | None = None,
        destination_encryption_context: Mapping[str, str] | None = None,
        source_key_id: str | None = None,
        on_behalf_of: ForwardedCaller | None = None,
    ) -> ResultT:
        """ReEncrypt: ``CiphertextBlob`` as bytes, ``KeyId``, ``SourceKeyId``."""
        return self._execute(
            KMSRequest.re_encrypt(
                ciphertext_blob,
                destination_key_id,
                source_encryption_context=source_encryption_context,
                destination_encryption_context=destination_encryption_context,
                source_key_id=source_key_id,
            ),
            on_behalf_of,
        )

    def describe_key(self, key_id: str, *, on_behalf_of: ForwardedCaller | None = None) -> ResultT:
        """DescribeKey: ``KeyMetadata``."""
        return self._execute(KMSRequest.describe_key(key_id), on_behalf_of)

    def generate_random(
        self, number_of_bytes: int, *, on_behalf_of: ForwardedCaller | None = None
    ) -> ResultT:
        """GenerateRandom: ``Plaintext`` as bytes."""
        return self._execute(KMSRequest.generate_random(number_of_bytes), on_behalf_of)

    # -- asymmetric and HMAC keys (binary fields come back as bytes) ---------------
    def get_public_key(
        self, key_id: str, *, on_behalf_of: ForwardedCaller | None = None
    ) -> ResultT:
        """GetPublicKey: ``PublicKey`` (DER SubjectPublicKeyInfo) as bytes, ``KeySpec``,
        ``KeyUsage`` and the algorithm lists."""
        return self._execute(KMSRequest.get_public_key(key_id), on_behalf_of)

    def sign(
        self,
        key_id: str,
        message: bytes,
        signing_algorithm: str,
        *,
        message_type: str = "RAW",
        on_behalf_of: ForwardedCaller | None = None,
    ) -> ResultT:
        """Sign: ``Signature`` as bytes. ``message_type="DIGEST"`` signs a digest."""
        return self._execute(
            KMSRequest.sign(key_id, message, signing_algorithm, message_type=message_type),
            on_behalf_of,
        )

    def verify(
        self,
        key_id: str,
        message: bytes,
        signature: bytes,
        signing_algorithm: str,
        *,
        message_type: str = "RAW",
        on_behalf_of: ForwardedCaller | None = None,
    ) -> ResultT:
        """Verify: ``SignatureValid`` true, or raises KMSInvalidSignatureException."""
        return self._execute(
            KMSRequest.verify(
                key_id, message, signature, signing_algorithm, message_type=message_type
            ),
            on_behalf_of,
        )

    def generate_mac(
        self,
        key_id: str,
        message: bytes,
        mac_algorithm: str,
        *,
        on_behalf_of: ForwardedCaller | None = None,
    ) -> ResultT:
        """GenerateMac: ``Mac`` as bytes."""
        return self._execute(KMSRequest.generate_mac(key_id, message, mac_algorithm), on_behalf_of)

    def verify_mac(
        self,
        key_id: str,
        message: bytes,
        mac: bytes,
        mac_algorithm: str,
        *,
        on_behalf_of: ForwardedCaller | None = None,
    ) -> ResultT:
        """VerifyMac: ``MacValid`` true, or raises KMSInvalidMacException."""
        return self._execute(
            KMSRequest.verify_mac(key_id, message, mac, mac_algorithm), on_behalf_of
        )

    def generate_data_key_pair(
        self,
        key_id: str,
        key_pair_spec: str,
        *,
        encryption_context: Mapping[str, str] | None = None,
        without_plaintext: bool = False,
        on_behalf_of: ForwardedCaller | None = None,
    ) -> ResultT:
        """GenerateDataKeyPair(WithoutPlaintext): ``PrivateKeyCiphertextBlob``,
        ``PrivateKeyPlaintext`` (unless without_plaintext) and ``PublicKey`` as bytes."""
        return self._execute(
            KMSRequest.generate_data_key_pair(
                key_id,
                key_pair_spec,
                encryption_context=encryption_context,
                without_plaintext=without_plaintext,
            ),
            on_behalf_of,
        )

    def derive_shared_secret(
        self, key_id: str, public_key: bytes, *, on_behalf_of: ForwardedCaller | None = None
    ) -> ResultT:
        """DeriveSharedSecret (ECDH): ``SharedSecret`` as bytes."""
        return self._execute(KMSRequest.derive_shared_secret(key_id, public_key), on_behalf_of)


def forwarded_headers(on_behalf_of: ForwardedCaller | None) -> list[tuple[bytes, bytes]]:
    """The header naming the caller a request is made for (``X-Kmsfs-Forwarded-Caller``).

    keyd evaluates such a request as that caller's, with ``kms:ViaService`` =
    ``kmsfs-mount``, if this client's user is trusted to forward (root, or named by
    ``keyd serve --forwarders``); from anyone else keyd refuses it with
    AccessDeniedException. AWS KMS has no such header: the AWS clients
    (:mod:`kmsfs.kms.aws`) forward nothing.
    """
    if on_behalf_of is None:
        return []
    return [(FORWARDED_CALLER_HEADER.encode("ascii"), on_behalf_of.header_value().encode("ascii"))]


class _LostBeforeResponse(Exception):
    """The connection failed after the request was (partly) sent, before any response byte."""


# ------------------------------------------------------------------------ async
class AsyncKMSClient(KMSOperations[Awaitable[dict[str, Any]]]):
    """keyd client for trio code: one keep-alive connection, callers take turns."""

    def __init__(
        self,
        socket_path: str | os.PathLike[str] | None = None,
        *,
        timeout: float = 10.0,
        keyd_uid: str | int | None = None,
    ) -> None:
        self.socket_path: Path = find_keyd(socket_path, keyd_uid=keyd_uid)
        self.timeout = timeout
        #: uids a keyd may run as (see kmsfs.kms.trust)
        self.expected_uids = expected_keyd_uids(keyd_uid)
        self._lock = trio.Lock()
        self._stream: trio.SocketStream | None = None

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connection (a later call opens a new one)."""
        self._drop()
        await trio.lowlevel.checkpoint()

    async def _execute(
        self, request: KMSRequest, on_behalf_of: ForwardedCaller | None = None
    ) -> dict[str, Any]:
        result = await self.call(request.operation, request.params, on_behalf_of=on_behalf_of)
        return request.decode_result(result)

    async def call(
        self,
        operation: str,
        params: Mapping[str, Any],
        *,
        on_behalf_of: ForwardedCaller | None = None,
    ) -> dict[str, Any]:
        """Call ``operation`` with ``params``; the decoded JSON result. With
        ``on_behalf_of``, as that caller (see :func:`forwarded_headers`)."""
        return await self.call_encoded(
            operation, encode_request_body(params), on_behalf_of=on_behalf_of
        )

    async def call_encoded(
        self,
        operation: str,
        body: bytes,
        *,
        on_behalf_of: ForwardedCaller | None = None,
    ) -> dict[str, Any]:
        """:meth:`call` with the request's JSON body already encoded (the access audit
        writes its batches' JSON itself)."""
        extra = forwarded_headers(on_behalf_of)
        with trio.move_on_after(self.timeout) as deadline:
            async with self._lock:
                try:
                    status, payload = await self._round_trip(operation, body, extra)
                except BaseException:
                    self._drop()  # cancelled or failed mid-exchange: state unknown
                    raise
        if deadline.cancelled_caught:
            raise keyd_unavailable(self.socket_path, f"no answer within {self.timeout:g} s")
        return decode_response(status, payload)

    async def _round_trip(
        self, operation: str, body: bytes, extra: list[tuple[bytes, bytes]]
    ) -> tuple[int, bytes]:
        for attempt in (1, 2):
            reused = self._stream is not None
            if self._stream is not None and connection_looks_dead(self._stream.socket.fileno()):
                self._drop()
                reused = False
            if self._stream is None:
                await self._connect()
            try:
                return await self._exchange(operation, body, extra)
            except _LostBeforeResponse as lost:
                self._drop()
                if reused and attempt == 1:
                    continue
                cause = lost.__cause__ or EOFError()
                raise keyd_unavailable(
                    self.socket_path, describe_connection_error(cause)
                ) from lost.__cause__
            except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                self._drop()
                reason = describe_connection_error(exc)
                raise keyd_unavailable(self.socket_path, reason) from exc
            except h11.ProtocolError as exc:
                self._drop()
                raise keyd_unavailable(self.socket_path, f"bad HTTP response: {exc}") from exc
        raise AssertionError("unreachable")  # pragma: no cover

    async def _connect(self) -> None:
        # a few lstat() calls: cheap enough to make inside trio, once per connection
        resolved = check_socket_path(self.socket_path, self.expected_uids)
        try:
            stream = await trio.open_unix_socket(os.fspath(resolved))
        except OSError as exc:
            raise keyd_unavailable(self.socket_path, describe_connection_error(exc)) from exc
        try:
            check_peer(stream.socket, self.socket_path, self.expected_uids)  # type: ignore[arg-type]
        except BaseException:
            stream.socket.close()
            raise
        self._stream = stream

    async def _exchange(
        self, operation: str, body: bytes, extra: list[tuple[bytes, bytes]]
    ) -> tuple[int, bytes]:
        stream = self._stream
        assert stream is not None
        headers = request_headers(operation, len(body), extra)
        send_error: BaseException | None = None
        try:
            await stream.send_all(encode_request(headers, body))
        except (trio.BrokenResourceError, OSError) as exc:
            send_error = exc  # keyd may have answered early (413) and hung up: read on
        reader = ResponseReader(headers, body)
        received_any = False
        while True:
            try:
                data = await stream.receive_some(_RECEIVE_SIZE)
            except (trio.BrokenResourceError, OSError) as exc:
                if not received_any:
                    raise _LostBeforeResponse from send_error or exc
                raise
            if not data and not received_any:
                raise _LostBeforeResponse from send_error
            received_any = True
            response = reader.feed(data)
            if response is not None:
                break
        if not reader.keep_alive:
            self._drop()  # keyd said Connection: close
        return response

    def _drop(self) -> None:
        if self._stream is not None:
            self._stream.socket.close()
        self._stream = None


# ------------------------------------------------------------------------- sync
class KMSClient(KMSOperations[dict[str, Any]]):
    """Blocking keyd client (for the CLI and scripts): one keep-alive connection.

    Not thread-safe: use one client per thread.
    """

    def __init__(
        self,
        socket_path: str | os.PathLike[str] | None = None,
        *,
        timeout: float = 10.0,
        keyd_uid: str | int | None = None,
    ) -> None:
        self.socket_path: Path = find_keyd(socket_path, keyd_uid=keyd_uid)
        self.timeout = timeout
        #: uids a keyd may run as (see kmsfs.kms.trust)
        self.expected_uids = expected_keyd_uids(keyd_uid)
        self._sock: socket.socket | None = None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection (a later call opens a new one)."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _execute(
        self, request: KMSRequest, on_behalf_of: ForwardedCaller | None = None
    ) -> dict[str, Any]:
        result = self.call(request.operation, request.params, on_behalf_of=on_behalf_of)
        return request.decode_result(result)

    def call(
        self,
        operation: str,
        params: Mapping[str, Any],
        *,
        on_behalf_of: ForwardedCaller | None = None,
    ) -> dict[str, Any]:
        """Call ``operation`` with ``params``; the decoded JSON result. With
        ``on_behalf_of``, as that caller (see :func:`forwarded_headers`)."""
        body = encode_request_body(params)
        headers = request_headers(operation, len(body), forwarded_headers(on_behalf_of))
        request = encode_request(headers, body)
        for attempt in (1, 2):
            reused = self._sock is not None
            if self._sock is not None and connection_looks_dead(self._sock.fileno()):
                self.close()
                reused = False
            if self._sock is None:
                self._connect()
            assert self._sock is not None
            try:
                status, payload = self._exchange(self._sock, request, headers, body)
            except _LostBeforeResponse as lost:
                # Not one byte of a response: keyd closed before it read our request.
                self.close()
                if reused and attempt == 1:
                    continue
                cause = lost.__cause__ or EOFError()
                raise keyd_unavailable(
                    self.socket_path, describe_connection_error(cause)
                ) from lost.__cause__
            except TimeoutError as exc:
                self.close()
                raise keyd_unavailable(
                    self.socket_path, f"no answer within {self.timeout:g} s"
                ) from exc
            except (OSError, EOFError) as exc:
                self.close()
                raise keyd_unavailable(self.socket_path, describe_connection_error(exc)) from exc
            except h11.ProtocolError as exc:
                self.close()
                raise keyd_unavailable(self.socket_path, f"bad HTTP response: {exc}") from exc
            return decode_response(status, payload)
        raise AssertionError("unreachable")  # pragma: no cover

    def _connect(self) -> None:
        try:
            resolved = check_socket_path(self.socket_path, self.expected_uids)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        except OSError as exc:
            raise keyd_unavailable(self.socket_path, describe_connection_error(exc)) from exc
        try:
            sock.settimeout(self.timeout)
            sock.connect(os.fspath(resolved))
            check_peer(sock, self.socket_path, self.expected_uids)
        except OSError as exc:
            sock.close()
            raise keyd_unavailable(self.socket_path, describe_connection_error(exc)) from exc
        except BaseException:
            sock.close()
            raise
        self._sock = sock

    def _exchange(
        self,
        sock: socket.socket,
        request: bytes,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
    ) -> tuple[int, bytes]:
        send_error: OSError | None = None
        try:
            sock.sendall(request)
        except (BrokenPipeError, ConnectionResetError) as exc:
            send_error = exc  # keyd may have answered early (413) and hung up: read on
        reader = ResponseReader(headers, body)
        received_any = False
        while True:
            try:
                data = sock.recv(_RECEIVE_SIZE)
            except (BrokenPipeError, ConnectionResetError) as exc:
                if not received_any:
                    raise _LostBeforeResponse from send_error or exc
                raise
            if not data and not received_any:
                raise _LostBeforeResponse from send_error
            received_any = True
            response = reader.feed(data)
            if response is not None:
                break
        if not reader.keep_alive:
            self.close()  # keyd said Connection: close
        return response
