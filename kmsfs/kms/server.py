"""keyd's front door: AWS KMS JSON 1.1 over HTTP/1.1 on a Unix socket (trio + h11).

HTTP parsing: a request that arrives whole and plain in one read (what kmsfs's clients
and AWS's SDKs send) is parsed by httptools (llhttp) and answered without h11, which
costs a few microseconds instead of tens (:func:`parse_plain_request`); every other
request (chunked, Expect, Connection, pipelined, split over reads, malformed...) is
read by h11 exactly as before, so h11's limits and error answers still apply to it.

The server knows HTTP, sockets and peer credentials, and nothing about keys: every
request becomes one synchronous ``service.handle(operation, params, caller, request_id)``
call, made directly in the connection's trio task (it is sub-millisecond; a thread hop
would cost more than the call). The one exception is work that takes long: a service
may name it (``slow_operations`` and ``slow_work``, e.g. generating an RSA_4096 key
pair, up to seconds), and the server runs that part in a worker thread first (at most
:data:`SLOW_WORK_THREADS` at once) and hands its result to ``handle``, so other clients
are not stalled meanwhile. This module is the one place that maps
:class:`kmsfs.errors.KMSError` to AWS error bodies and HTTP status codes.

Protection against misbehaving clients (all in :class:`ServerLimits`): a body limit
(413), a header size and count limit (431), a per-request read deadline (408, against
slow-loris clients), an idle keep-alive timeout (quiet close), a send deadline for
clients that stop reading, a cap on concurrent connections (503) kept below the
process's file descriptor limit, and a per-uid quota (429). Malformed HTTP gets a 400
and the connection is closed; no client can stop the daemon or harm another
connection. Should descriptors run out anyway (other files, another limit), accept()
failing with EMFILE/ENFILE does not stop the daemon: a spare descriptor kept for this
is given up for a moment to accept the waiting client and answer it 503, so it is
told instead of hanging in the backlog, and open connections are served on.

keyd on the network (``--listen HOST:PORT``, :class:`TcpEndpoint`): the same
connection handling and limits serve TCP listeners beside the Unix socket, with TLS
(``trio.SSLStream``) when a certificate is given; plain HTTP only on loopback
addresses. A TCP request must carry a valid AWS Signature V4
(:mod:`kmsfs.kms.sigv4`; the signed IAM user is the caller; the per-uid quota counts
per source address). A signed request on the Unix socket is verified too, and then the
signed user is the caller. Refused signatures are answered with AWS's error types and
audited (``KeyService.record_refused``).

Nothing from a request body is ever logged: it may hold plaintext.
"""

from __future__ import annotations

import collections
import dataclasses
import errno
import ipaddress
import logging
import os
import resource
import socket
import ssl
import stat
import struct
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from typing import Any, Protocol

import h11
import httptools
import trio

from kmsfs.errors import (
    KeydAlreadyRunning,
    KMSError,
    KMSInternalException,
    UnknownOperationException,
    UsageError,
)
from kmsfs.kms.caller import FORWARDED_CALLER_HEADER, Caller
from kmsfs.kms.protocol import (
    CONTENT_TYPE,
    REQUEST_ID_HEADER,
    TARGET_PREFIX,
    decode_request_body,
    encode_error_body,
    encode_response_body,
    random_uuid,
)

__all__ = [
    "KeyServiceLike",
    "KeydAlreadyRunning",
    "ServerLimits",
    "DEFAULT_LIMITS",
    "TcpEndpoint",
    "parse_listen",
    "serve",
]

logger = logging.getLogger(__name__)

_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid
_RECEIVE_SIZE = 64 * 1024
#: after an error response that ends a connection, how long and how much to keep reading
_LINGER_SECONDS = 1.0
_LINGER_BYTES = 1024 * 1024
#: what a refused connection (503/429) may still send before it is closed
_REJECT_DRAIN_BYTES = 64 * 1024
_TARGET_PREFIX = TARGET_PREFIX.encode("ascii")
_CONTENT_TYPE = CONTENT_TYPE.encode("ascii")
_REQUEST_ID_HEADER = REQUEST_ID_HEADER.encode("ascii")
_FORWARDED_HEADER = FORWARDED_CALLER_HEADER.lower().encode("ascii")  # h11 lower-cases names
_INTERNAL_ERROR_MESSAGE = "An internal error occurred in keyd (request id {request_id})."
#: slow work (key pair generation) running at once: more requests wait for a slot. One
#: per core: a burst then finishes as fast as the cores allow, while the event loop
#: keeps the CPU it needs because slow work runs at a lower priority (SLOW_WORK_NICE)
SLOW_WORK_THREADS = max(2, os.cpu_count() or 2)
#: how much nicer than keyd slow work runs (Linux: per-thread nice values)
SLOW_WORK_NICE = 10
#: requests one connection may have answered, without waiting for its next, before it
#: lets the other connections run (a trio checkpoint per request costs ~10 us)
REQUESTS_PER_CHECKPOINT = 8


class KeyServiceLike(Protocol):
    """What the server needs from :class:`kmsfs.kms.service.KeyService`."""

    def handle(
        self, operation: str, params: dict[str, Any], caller: Caller, request_id: str
    ) -> dict[str, Any]: ...

    def run_maintenance(self) -> object: ...


class SignatureVerifier(Protocol):
    """What the server needs from :class:`kmsfs.kms.sigv4.SigV4Verifier`."""

    def verify(
        self, method: str, target: str, headers: Sequence[tuple[bytes, bytes]], body: bytes
    ) -> Any: ...


@dataclass(frozen=True)
class TcpEndpoint:
    """One ``--listen`` address: an IP literal and a port, with TLS or (loopback only)
    without."""

    host: str
    port: int
    ssl_context: ssl.SSLContext | None = None

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https' if self.ssl_context else 'http'}://{host}:{self.port}"

    @property
    def is_loopback(self) -> bool:
        return ipaddress.ip_address(self.host).is_loopback


def parse_listen(text: str) -> tuple[str, int]:
    """``127.0.0.1:4599``, ``[::1]:4599``, ``0.0.0.0:443``, ``localhost:4599`` ->
    (IP literal, port). Raises UsageError naming what is wrong."""
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        port_text = rest[1:] if bracket and rest.startswith(":") else None
    else:
        host, colon, port_text_raw = text.rpartition(":")
        port_text = port_text_raw if colon else None
    if not host or port_text is None or not port_text.isdigit() or int(port_text) > 65535:
        raise UsageError(f"--listen {text}: give ADDRESS:PORT, e.g. 127.0.0.1:4599 or [::1]:4599")
    if host == "localhost":
        host = "127.0.0.1"
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise UsageError(
            f"--listen {text}: {host!r} is not an IP address (keyd binds addresses, not host names)"
        ) from None
    return host, int(port_text)


@dataclass(frozen=True, slots=True)
class ServerLimits:
    """Bounds on what one client may make keyd hold or wait for."""

    #: largest request body accepted (413 beyond)
    max_body_bytes: int = 256 * 1024
    #: largest request line + headers (h11's max_incomplete_event_size; 431 beyond)
    max_header_bytes: int = 16 * 1024
    #: most header fields in one request (431 beyond)
    max_header_count: int = 100
    #: seconds an idle keep-alive connection may wait for its next request
    idle_timeout: float = 60.0
    #: seconds from a request's first byte to its last (408 beyond)
    request_read_timeout: float = 10.0
    #: seconds a response may take to be accepted by the client's socket
    send_timeout: float = 10.0
    #: connections served at once; more are answered 503 and closed. serve() lowers
    #: it to stay below the file descriptor limit (see effective_max_connections)
    max_connections: int = 1024
    #: connections one uid (peer credentials) may hold at once; more are answered
    #: 429 ThrottlingException, so one user cannot take every connection
    max_connections_per_uid: int = 256
    #: listen() backlog
    backlog: int = 128


DEFAULT_LIMITS = ServerLimits()

#: descriptors kept free for keyd's own files (keystore, WAL, audit log and head,
#: SQLite's temporary files, the spare descriptor, trio's wake-up pipes) on top of
#: those already open when serve() starts
FD_HEADROOM = 32


def effective_max_connections(limits: ServerLimits) -> int:
    """The connection cap: ``limits.max_connections``, lowered so that every served
    connection still leaves :data:`FD_HEADROOM` descriptors under RLIMIT_NOFILE."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return limits.max_connections
    try:
        open_now = len(os.listdir("/proc/self/fd"))
    except OSError:
        open_now = 64
    return max(1, min(limits.max_connections, soft - open_now - FD_HEADROOM))


# ------------------------------------------------------------------------- serve()
async def serve(
    service: KeyServiceLike,
    socket_path: Path,
    *,
    socket_mode: int = 0o600,
    maintenance_interval: float = 60.0,
    limits: ServerLimits = DEFAULT_LIMITS,
    tcp: Sequence[TcpEndpoint] = (),
    verifier: SignatureVerifier | None = None,
    task_status: trio.TaskStatus[Path] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``service`` on the Unix socket ``socket_path`` until cancelled.

    With ``tcp`` endpoints, also on those (each needs TLS unless it is a loopback
    address; requests there must be signed, checked by ``verifier``).

    Creates the socket's directory (mode 0700) if missing, replaces a stale socket
    file, refuses with :class:`KeydAlreadyRunning` if a live keyd answers there,
    binds with ``socket_mode``, runs ``service.run_maintenance()`` once and then every
    ``maintenance_interval`` seconds, and calls ``task_status.started(socket_path)``
    once clients can connect. The socket file is removed on exit.
    """
    socket_path = Path(socket_path)
    for endpoint in tcp:
        check_endpoint(endpoint)
    if tcp and verifier is None:
        raise UsageError("keyd over TCP needs a signature verifier (SigV4 credentials)")
    _prepare_directory(socket_path.parent)
    await _remove_stale_socket(socket_path)
    # TCP first: once the socket answers (what clients and tests wait for), all listen
    tcp_listeners: list[tuple[trio.socket.SocketType, TcpEndpoint]] = []
    try:
        for endpoint in tcp:
            tcp_listeners.append(await _bind_tcp(endpoint, limits.backlog))
        listener = await _bind(socket_path, socket_mode, limits.backlog)
    except BaseException:
        for tcp_listener, _endpoint in tcp_listeners:
            tcp_listener.close()
        raise
    identity: tuple[int, int] | None = None
    server: _Server | None = None
    try:
        bound = os.stat(socket_path)
        identity = (bound.st_dev, bound.st_ino)
        _run_maintenance(service)
        server = _Server(service, limits, verifier)
        logger.debug("keyd serves at most %d connections", server.max_connections)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_maintenance_loop, service, maintenance_interval)
            nursery.start_soon(server.accept_loop, listener, nursery)
            for tcp_listener, endpoint in tcp_listeners:
                nursery.start_soon(server.accept_loop, tcp_listener, nursery, endpoint)
                logger.info("keyd listening on %s", endpoint)
            logger.debug("keyd listening on %s", socket_path)
            task_status.started(socket_path)
    finally:
        listener.close()
        for tcp_listener, _endpoint in tcp_listeners:
            tcp_listener.close()
        if server is not None:
            server.close()
        _unlink_if_ours(socket_path, identity)


def check_endpoint(endpoint: TcpEndpoint) -> None:
    """Plain HTTP only on loopback: elsewhere signed requests could be read and replayed
    (for 5 minutes) by anyone on the path, and responses (data keys) read."""
    if endpoint.ssl_context is None and not endpoint.is_loopback:
        raise UsageError(
            f"--listen {endpoint.host}:{endpoint.port}: plain HTTP is allowed only on "
            "loopback addresses; give --tls-cert and --tls-key (kmsfs keyd tls-cert makes them)"
        )


async def _bind_tcp(
    endpoint: TcpEndpoint, backlog: int
) -> tuple[trio.socket.SocketType, TcpEndpoint]:
    """Bind and listen; returns the listener and the endpoint with the port bound (for
    port 0)."""
    family = socket.AF_INET6 if ":" in endpoint.host else socket.AF_INET
    listener = trio.socket.socket(family, socket.SOCK_STREAM)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        try:
            await listener.bind((endpoint.host, endpoint.port))
            listener.listen(backlog)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise KeydAlreadyRunning(
                    f"cannot listen on {endpoint.host}:{endpoint.port}: the address is in use"
                ) from None
            raise UsageError(
                f"cannot listen on {endpoint.host}:{endpoint.port}: {exc.strerror or exc}"
            ) from None
    except BaseException:
        listener.close()
        raise
    port = listener.getsockname()[1]
    return listener, dataclasses.replace(endpoint, port=port)


def _prepare_directory(directory: Path) -> None:
    """Create the socket's directory (0700), or check that an existing one is safe.

    The socket's own mode protects it from other users only if none of them can
    replace it: the directory must belong to us (or root) and be writable by no one
    else, unless it is sticky (like ``/tmp``).
    """
    try:
        directory.mkdir(mode=0o700, parents=True)
    except FileExistsError:
        pass
    except OSError as exc:
        raise UsageError(
            f"cannot create the socket directory {directory}: {exc.strerror}"
        ) from None
    else:
        os.chmod(directory, 0o700)  # mkdir's mode is masked by the umask
        return
    try:
        info = os.stat(directory)
    except OSError as exc:
        raise UsageError(f"cannot use the socket directory {directory}: {exc.strerror}") from None
    if not stat.S_ISDIR(info.st_mode):
        raise UsageError(f"{directory} exists and is not a directory")
    if info.st_uid not in (os.geteuid(), 0):
        raise UsageError(
            f"the socket directory {directory} belongs to another user (uid {info.st_uid})"
        )
    shared = info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
    if shared and not info.st_mode & stat.S_ISVTX:
        raise UsageError(
            f"the socket directory {directory} is writable by other users "
            f"(mode {stat.S_IMODE(info.st_mode):04o}); use a private directory"
        )


async def _remove_stale_socket(socket_path: Path) -> None:
    try:
        existing = os.lstat(socket_path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise UsageError(f"cannot check {socket_path}: {exc.strerror}") from None
    if not stat.S_ISSOCK(existing.st_mode):
        raise UsageError(f"{socket_path} exists and is not a socket; refusing to replace it")
    owner = "" if existing.st_uid == os.geteuid() else f" (owned by uid {existing.st_uid})"
    alive = KeydAlreadyRunning(
        f"another keyd is listening on {socket_path}{owner}; stop it or choose another --socket"
        if not owner
        else f"another process is listening on {socket_path}{owner}; choose another --socket"
    )
    probe = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with trio.fail_after(2.0):
            await probe.connect(os.fspath(socket_path))
    except (ConnectionRefusedError, FileNotFoundError):
        pass  # nobody listens there: a leftover of a keyd that did not exit cleanly
    except BlockingIOError:  # backlog full: very much alive
        raise alive from None
    except trio.TooSlowError:
        raise alive from None
    except OSError as exc:
        raise UsageError(
            f"cannot check the existing socket {socket_path}{owner}: "
            f"{os.strerror(exc.errno or 0)}; remove it or choose another --socket"
        ) from None
    else:
        raise alive
    finally:
        probe.close()
    try:
        os.unlink(socket_path)
        logger.info("removed stale socket %s", socket_path)
    except FileNotFoundError:
        pass
    except OSError as exc:  # e.g. another user's socket in a sticky directory
        raise UsageError(
            f"cannot remove the stale socket {socket_path}{owner}: {exc.strerror}; "
            "remove it or choose another --socket"
        ) from None


async def _bind(socket_path: Path, socket_mode: int, backlog: int) -> trio.socket.SocketType:
    listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        # On Linux the node bind() creates takes the socket inode's mode (less the
        # umask): setting it first leaves no window with a wider mode.
        os.fchmod(listener.fileno(), socket_mode)
        try:
            await listener.bind(os.fspath(socket_path))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise KeydAlreadyRunning(f"another keyd is listening on {socket_path}") from None
            raise UsageError(f"cannot listen on {socket_path}: {exc.strerror}") from None
        try:
            os.chmod(socket_path, socket_mode)
            listener.listen(backlog)
        except OSError as exc:
            raise UsageError(f"cannot listen on {socket_path}: {exc.strerror}") from None
    except BaseException:
        listener.close()
        raise
    return listener


def _unlink_if_ours(socket_path: Path, identity: tuple[int, int] | None) -> None:
    """Remove the socket file unless it is gone or another keyd has replaced it."""
    if identity is None:
        return
    try:
        current = os.lstat(socket_path)
        if (current.st_dev, current.st_ino) == identity:
            os.unlink(socket_path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        logger.warning("could not remove socket %s: %s", socket_path, exc.strerror)


def _run_maintenance(service: KeyServiceLike) -> None:
    try:
        service.run_maintenance()
    except Exception:
        logger.exception("keyd maintenance failed; will retry at the next interval")


async def _maintenance_loop(service: KeyServiceLike, interval: float) -> None:
    while True:
        await trio.sleep(interval)
        _run_maintenance(service)


# ------------------------------------------------------------------ connections
class _HTTPError(Exception):
    """A request that gets an error response; ``close`` ends the connection after it."""

    def __init__(self, status: int, aws_type: str, message: str, *, close: bool) -> None:
        super().__init__(message)
        self.status = status
        self.aws_type = aws_type
        self.message = message
        self.close = close


class _ClientGone(Exception):
    """The client closed the connection, or stayed idle past the keep-alive timeout."""


_REASONS: dict[int, bytes] = {s.value: s.phrase.encode("ascii") for s in HTTPStatus}


class _Server:
    def __init__(
        self,
        service: KeyServiceLike,
        limits: ServerLimits,
        verifier: SignatureVerifier | None = None,
    ) -> None:
        self.service = service
        self.limits = limits
        self.verifier = verifier
        self.max_connections = effective_max_connections(limits)
        self.active_connections = 0
        #: open connections per uid (Unix socket) or per source address (TCP)
        self.connections_by_uid: collections.Counter[int | str | None] = collections.Counter()
        #: a descriptor held in reserve, given up to accept-and-refuse at the fd limit
        self._spare_fd: int | None = _open_spare_fd()
        self._at_fd_limit = False
        self.slow_operations: frozenset[str] = frozenset(
            getattr(service, "slow_operations", frozenset())
        )
        self.slow_work_limiter = trio.CapacityLimiter(SLOW_WORK_THREADS)

    def close(self) -> None:
        if self._spare_fd is not None:
            os.close(self._spare_fd)
            self._spare_fd = None

    async def accept_loop(
        self,
        listener: trio.socket.SocketType,
        nursery: trio.Nursery,
        endpoint: TcpEndpoint | None = None,
    ) -> None:
        while True:
            try:
                sock, address = await listener.accept()
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE):
                    tls = endpoint is not None and endpoint.ssl_context is not None
                    await self._refuse_at_fd_limit(listener, nursery, tls=tls)
                else:
                    # Out of memory or buffers: back off instead of spinning or dying.
                    logger.warning("keyd accept failed: %s", exc.strerror or exc)
                    await trio.sleep(0.1)
                continue
            if self._at_fd_limit:
                self._at_fd_limit = False
                logger.warning("keyd: file descriptors available again; accepting connections")
            if endpoint is not None:
                source_ip = address[0]
                peer: int | str | None = source_ip
                caller = Caller(uid=None, gid=None, pid=None, source_ip=source_ip)
                try:
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                except OSError:
                    pass  # only latency is at stake
            else:
                try:
                    pid, uid, gid = _PEERCRED.unpack(
                        sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
                    )
                except OSError as exc:
                    logger.debug("keyd: no peer credentials: %s", exc.strerror or exc)
                    sock.close()
                    continue
                peer = uid
                caller = Caller(uid=uid, gid=gid, pid=pid)
            who = f"uid {peer}" if endpoint is None else f"address {peer}"
            refusing = (
                self.active_connections >= self.max_connections
                or self.connections_by_uid[peer] >= self.limits.max_connections_per_uid
            )
            if refusing and endpoint is not None and endpoint.ssl_context is not None:
                # a TLS client cannot read a plain-HTTP refusal: close (it retries)
                logger.debug("keyd: refusing a TLS connection from %s: at a limit", peer)
                sock.close()
                continue
            if self.active_connections >= self.max_connections:
                nursery.start_soon(
                    self._reject,
                    sock,
                    HTTPStatus.SERVICE_UNAVAILABLE,
                    "ServiceUnavailableException",
                    "keyd is serving too many connections; try again",
                )
            elif self.connections_by_uid[peer] >= self.limits.max_connections_per_uid:
                # AWS's name for "this caller asks too much" (its SDKs retry it with
                # backoff), with HTTP's status for a per-client limit.
                nursery.start_soon(
                    self._reject,
                    sock,
                    HTTPStatus.TOO_MANY_REQUESTS,
                    "ThrottlingException",
                    f"{who} holds {self.limits.max_connections_per_uid} connections to "
                    "keyd already; close some or try again",
                )
            else:
                self.active_connections += 1
                self.connections_by_uid[peer] += 1
                nursery.start_soon(self._serve_connection, sock, caller, peer, endpoint)

    async def _refuse_at_fd_limit(
        self, listener: trio.socket.SocketType, nursery: trio.Nursery, *, tls: bool = False
    ) -> None:
        """accept() failed for want of descriptors: answer the waiting client 503.

        Gives up the spare descriptor, accepts one client with it, answers and closes
        it, and takes the spare back. Without a spare (it could not be taken back),
        waits a little: the client waits in the backlog until descriptors free up.
        """
        if not self._at_fd_limit:
            self._at_fd_limit = True
            logger.warning(
                "keyd: out of file descriptors; refusing new connections (503) while "
                "serving open ones"
            )
        if self._spare_fd is None:
            self._spare_fd = _open_spare_fd()
            await trio.sleep(0.1)
            return
        os.close(self._spare_fd)
        self._spare_fd = None
        try:
            with trio.move_on_after(0.5):
                sock, _ = await listener.accept()
                if tls:  # a TLS client cannot read a plain-HTTP 503: close (it retries)
                    sock.close()
                    return
                await self._reject(
                    sock,
                    HTTPStatus.SERVICE_UNAVAILABLE,
                    "ServiceUnavailableException",
                    "keyd is out of file descriptors; try again",
                    wait=0.2,
                )
        except OSError as exc:
            logger.debug("keyd: accept at the fd limit failed: %s", exc.strerror or exc)
        finally:
            self._spare_fd = _open_spare_fd()
        if self._spare_fd is None:
            await trio.sleep(0.1)

    async def _reject(
        self,
        sock: trio.socket.SocketType,
        status: int,
        aws_type: str,
        message: str,
        *,
        wait: float = 1.0,
    ) -> None:
        with sock:
            conn = h11.Connection(h11.SERVER)
            data = _error_response(conn, status, aws_type, message, random_uuid(), close=True)
            try:
                with trio.move_on_after(wait):
                    await _send_all(sock, data)
                    # Read (and drop) what the client still sends, briefly: closing with
                    # its request unread would make its send fail (EPIPE) before it reads
                    # our answer.
                    sock.shutdown(socket.SHUT_WR)
                    budget = _REJECT_DRAIN_BYTES
                    while budget > 0:
                        received = await sock.recv(_RECEIVE_SIZE)
                        if not received:
                            break
                        budget -= len(received)
            except OSError as exc:
                logger.debug("keyd: rejected connection vanished: %s", exc.strerror or exc)

    async def _serve_connection(
        self,
        sock: trio.socket.SocketType,
        caller: Caller,
        quota_key: int | str | None,
        endpoint: TcpEndpoint | None = None,
    ) -> None:
        peer = f"pid {caller.pid}" if endpoint is None else f"{caller.source_ip}"
        transport: _Transport | None = None
        try:
            with sock:
                if endpoint is not None and endpoint.ssl_context is not None:
                    transport = await self._tls_handshake(sock, endpoint.ssl_context)
                    if transport is None:
                        return
                else:
                    transport = _SocketTransport(sock)
                connection = _Connection(self, transport, caller, signed_only=endpoint is not None)
                await connection.run()
        except OSError as exc:
            logger.debug("keyd connection from %s lost: %s", peer, exc.strerror or exc)
        except h11.ProtocolError as exc:
            logger.debug("keyd connection from %s: HTTP error: %s", peer, exc)
        except Exception:
            # A bug in this module; the daemon must outlive it.
            logger.exception("keyd connection from %s failed unexpectedly", peer)
        finally:
            if transport is not None:
                await transport.close()
            self.active_connections -= 1
            self.connections_by_uid[quota_key] -= 1
            if not self.connections_by_uid[quota_key]:
                del self.connections_by_uid[quota_key]

    async def _tls_handshake(
        self, sock: trio.socket.SocketType, context: ssl.SSLContext
    ) -> _Transport | None:
        """TLS on an accepted socket, within the request read deadline (a client that
        never finishes its handshake holds a connection no longer than a slow request)."""
        stream = trio.SSLStream(
            trio.SocketStream(sock), context, server_side=True, https_compatible=True
        )
        try:
            with trio.fail_after(self.limits.request_read_timeout):
                await stream.do_handshake()
        except (trio.TooSlowError, trio.BrokenResourceError) as exc:
            logger.debug("keyd: TLS handshake failed: %s", exc.__cause__ or exc)
            await trio.aclose_forcefully(stream)
            return None
        return _TLSTransport(stream)


def _run_at_low_priority(function: Callable[[], Any]) -> Any:
    """``function()`` in a new thread of its own with nice raised by SLOW_WORK_NICE, so the
    event loop thread wins the CPU from it (on Linux, setpriority on a thread id changes
    only that thread). A thread of its own because an unprivileged thread cannot lower
    its nice again: trio's cached worker threads must keep their priority."""
    outcome: list[Any] = []

    def run() -> None:
        try:
            thread_id = threading.get_native_id()
            try:
                current = os.getpriority(os.PRIO_PROCESS, thread_id)
                os.setpriority(os.PRIO_PROCESS, thread_id, min(19, current + SLOW_WORK_NICE))
            except OSError:
                pass  # best effort: it then runs at keyd's priority
            outcome.append((True, function()))
        except BaseException as exc:
            outcome.append((False, exc))

    thread = threading.Thread(target=run, name="keyd-slow-work", daemon=True)
    thread.start()
    thread.join()
    ok, value = outcome[0]
    if not ok:
        raise value
    return value


def _open_spare_fd() -> int | None:
    try:
        return os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None


class _Transport(Protocol):
    async def recv(self, max_bytes: int) -> bytes: ...

    def recv_now(self, max_bytes: int) -> bytes | None: ...

    def send_now(self, data: bytes) -> int: ...

    async def send_all(self, data: bytes) -> None: ...

    def shutdown_write(self) -> None: ...

    async def close(self) -> None: ...


class _SocketTransport:
    """A plain socket (Unix, or TCP on loopback)."""

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self.sock = sock

    async def recv(self, max_bytes: int) -> bytes:
        while True:
            await trio.lowlevel.wait_readable(self.sock)
            data = self.recv_now(max_bytes)
            if data is not None:
                return data

    def recv_now(self, max_bytes: int) -> bytes | None:
        """What the socket holds now (b"" at its end), or None if nothing yet; no wait."""
        try:
            return os.read(self.sock.fileno(), max_bytes)
        except BlockingIOError:
            return None

    def send_now(self, data: bytes) -> int:
        """Send what the socket takes without waiting; how many bytes that was.

        A response usually fits the socket's buffer whole: this sends it with one
        write() and no trip through trio's scheduler (trio's send would add a yield
        per response; the connection yields in its next recv anyway)."""
        try:
            return os.write(self.sock.fileno(), data)
        except BlockingIOError:
            return 0

    async def send_all(self, data: bytes) -> None:
        await _send_all(self.sock, data)

    def shutdown_write(self) -> None:
        self.sock.shutdown(socket.SHUT_WR)

    async def close(self) -> None:
        self.sock.close()


class _TLSTransport:
    """TLS over TCP; trio's stream errors become OSError, as a socket's would be."""

    def __init__(self, stream: trio.SSLStream[trio.SocketStream]) -> None:
        self.stream = stream

    async def recv(self, max_bytes: int) -> bytes:
        try:
            return await self.stream.receive_some(max_bytes)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise ConnectionResetError(f"TLS connection broken: {exc.__cause__ or exc}") from None

    def recv_now(self, max_bytes: int) -> bytes | None:
        return None  # TLS: everything goes through the stream

    def send_now(self, data: bytes) -> int:
        return 0  # TLS: everything goes through the stream

    async def send_all(self, data: bytes) -> None:
        try:
            await self.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise ConnectionResetError(f"TLS connection broken: {exc.__cause__ or exc}") from None

    def shutdown_write(self) -> None:
        pass  # TLS has no half-close; lingering just reads what still comes

    async def close(self) -> None:
        await trio.aclose_forcefully(self.stream)


class _Connection:
    """One client connection: read a request, answer it, repeat (keep-alive)."""

    def __init__(
        self, server: _Server, sock: _Transport, caller: Caller, *, signed_only: bool = False
    ) -> None:
        self.server = server
        self.service = server.service
        self.limits = server.limits
        self.verifier = server.verifier
        self.sock = sock
        self.caller = caller
        #: TCP: every request must carry a valid SigV4 signature
        self.signed_only = signed_only
        self.h11 = h11.Connection(
            h11.SERVER, max_incomplete_event_size=server.limits.max_header_bytes
        )
        #: the request being answered was read by parse_plain_request, not by h11
        #: (h11 then stays IDLE, and the response is written without it)
        self.plain = False
        #: requests answered since this connection last let other tasks run
        self.unyielded = 0

    async def run(self) -> None:
        while True:
            try:
                request, body = await self._read_request()
            except _ClientGone:
                return
            except _HTTPError as error:
                await self._send_error(error)
                await self._linger()
                return
            request_id = random_uuid()
            caller, refusal = self._caller_or_refusal(request, body, request_id)
            caller = _with_forwarded_header(caller, request)
            if refusal is not None:
                response = refusal
            else:
                # the slow part (a key pair's generation) only for an authenticated
                # caller: an unsigned network client must not make keyd spend CPU
                prepared = await self._prepare(request, body)
                response = self._dispatch(request, body, prepared, caller, request_id)
            await self._send(response)
            self.unyielded += 1
            if self.unyielded >= REQUESTS_PER_CHECKPOINT:
                # a client whose requests are always waiting (pipelined, or a busy
                # one) must not keep the other connections waiting for long
                self.unyielded = 0
                await trio.lowlevel.checkpoint()
            if self.plain:
                continue  # h11 never saw this exchange: it is IDLE for the next one
            if self.h11.our_state is not h11.DONE or self.h11.their_state is not h11.DONE:
                return  # MUST_CLOSE: the client asked for it, or spoke HTTP/1.0
            self.h11.start_next_cycle()

    # -- reading ------------------------------------------------------------------
    async def _receive(self, deadline: float) -> bytes:
        with trio.move_on_at(deadline):
            return await self.sock.recv(_RECEIVE_SIZE)
        raise _HTTPError(
            HTTPStatus.REQUEST_TIMEOUT,
            "RequestTimeoutException",
            "the request was not received in time",
            close=True,
        )

    async def _read_request(self) -> tuple[Request, bytes]:
        conn = self.h11
        limits = self.limits
        deadline: float | None = None
        self.plain = False
        data: bytes | None = None
        if conn.trailing_data[0]:  # a pipelined request is already buffered
            deadline = trio.current_time() + limits.request_read_timeout
        else:
            # The common case, a whole plain request in one read (what kmsfs's clients
            # and AWS's SDKs send), is parsed by httptools; anything else goes to h11.
            # Under load the next request is usually waiting already: then it is read
            # at once, without a deadline scope or a trip through trio's scheduler.
            ready = self.sock.recv_now(_RECEIVE_SIZE)
            if ready is not None:
                data = ready  # no wait: run() checkpoints every few requests instead
            else:
                self.unyielded = 0
                with trio.move_on_after(limits.idle_timeout):
                    data = await self.sock.recv(_RECEIVE_SIZE)
            deadline = trio.current_time() + limits.request_read_timeout
            if data is None:
                raise _ClientGone  # idle keep-alive connection: close quietly
            if not data:
                raise _ClientGone
            plain = parse_plain_request(data, limits)
            if plain is not None:
                self.plain = True
                return plain
            conn.receive_data(data)
        request: Request | None = None
        body_parts: list[bytes] = []
        body_size = 0
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                raise _HTTPError(
                    exc.error_status_hint,
                    "BadRequestException",
                    "malformed HTTP request",
                    close=True,
                ) from None
            if event is h11.NEED_DATA:
                if deadline is None:
                    with trio.move_on_after(limits.idle_timeout):
                        data = await self.sock.recv(_RECEIVE_SIZE)
                        deadline = trio.current_time() + limits.request_read_timeout
                    if deadline is None:
                        raise _ClientGone  # idle keep-alive connection: close quietly
                else:
                    data = await self._receive(deadline)
                if not data:
                    raise _ClientGone  # closed between requests, or vanished mid-request
                conn.receive_data(data)
            elif type(event) is h11.Request:
                self._check_request_head(event)
                request = event
                if conn.they_are_waiting_for_100_continue:
                    await self._send(
                        conn.send(h11.InformationalResponse(status_code=100, headers=[])) or b""
                    )
            elif type(event) is h11.Data:
                body_size += len(event.data)
                if body_size > limits.max_body_bytes:
                    raise self._too_large()
                body_parts.append(event.data)
            elif type(event) is h11.EndOfMessage:
                assert request is not None
                return request, b"".join(body_parts)
            else:  # ConnectionClosed
                raise _ClientGone

    def _check_request_head(self, request: Request) -> None:
        limits = self.limits
        if len(request.headers) > limits.max_header_count:
            raise _HTTPError(
                HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE,
                "BadRequestException",
                f"more than {limits.max_header_count} header fields",
                close=True,
            )
        # h11 enforces max_incomplete_event_size only on a head that is still incomplete;
        # one that arrived whole in a single read is measured here.
        head_size = len(request.method) + len(request.target) + 12
        for name, value in request.headers:
            head_size += len(name) + len(value) + 4
            # h11 has already checked Content-Length is a well-formed number.
            if name == b"content-length" and int(value) > limits.max_body_bytes:
                raise self._too_large()
        if head_size > limits.max_header_bytes:
            raise _HTTPError(
                HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE,
                "BadRequestException",
                f"the request head exceeds {limits.max_header_bytes} bytes",
                close=True,
            )

    def _too_large(self) -> _HTTPError:
        return _HTTPError(
            HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
            "RequestEntityTooLargeException",
            f"the request body exceeds {self.limits.max_body_bytes} bytes",
            close=True,
        )

    # -- answering ----------------------------------------------------------------
    async def _prepare(self, request: Request, body: bytes) -> Any:
        """Run the slow part of a request (see the module docstring) in a worker thread;
        None when there is none, or when anything about it fails (then ``handle`` does
        everything itself, and answers any problem with the request)."""
        server = self.server
        if not server.slow_operations:
            return None
        try:
            operation = self._operation(request)
            if operation not in server.slow_operations:
                return None
            work = self.service.slow_work(operation, decode_request_body(body))  # type: ignore[attr-defined]
            if work is None:
                return None
            tag, function = work
            result = await trio.to_thread.run_sync(
                _run_at_low_priority, function, limiter=server.slow_work_limiter
            )
            return tag, result
        except (_HTTPError, KMSError):
            return None
        except Exception:
            logger.exception("keyd: slow work failed; the request runs without it")
            return None

    def _caller_or_refusal(
        self, request: Request, body: bytes, request_id: str
    ) -> tuple[Caller, bytes | None]:
        """Who the request is from: the socket's caller, or for a signed request (every
        request over TCP) the signed user; else the refusal to send (audited)."""
        if not (self.signed_only or any(name == b"authorization" for name, _ in request.headers)):
            return self.caller, None
        try:
            return self._authenticate(request, body, request_id), None
        except KMSError as error:
            refusal = self._error_bytes(error.status, error.aws_type, error.message, request_id)
            return self.caller, refusal
        except Exception:
            logger.exception(
                "keyd internal error verifying a signature (request id %s, caller %s)",
                request_id,
                self._peer(),
            )
            message = _INTERNAL_ERROR_MESSAGE.format(request_id=request_id)
            return self.caller, self._error_bytes(500, "KMSInternalException", message, request_id)

    def _dispatch(
        self,
        request: Request,
        body: bytes,
        prepared: Any = None,
        caller: Caller | None = None,
        request_id: str | None = None,
    ) -> bytes:
        """The complete response (head and body) to one request from *caller*
        (authenticated already: :meth:`_caller_or_refusal`)."""
        request_id = request_id or random_uuid()
        caller = caller or self.caller
        operation = ""
        try:
            operation = self._operation(request)
            params = decode_request_body(body)
            if prepared is None:
                result = self.service.handle(operation, params, caller, request_id)
            else:
                result = self.service.handle(  # type: ignore[call-arg]
                    operation, params, caller, request_id, prepared=prepared
                )
            payload = encode_response_body(result)
        except _HTTPError as error:
            return self._error_bytes(error.status, error.aws_type, error.message, request_id)
        except KMSError as error:
            return self._error_bytes(error.status, error.aws_type, error.message, request_id)
        except Exception:
            logger.exception(
                "keyd internal error in %s (request id %s, caller %s)",
                operation or "?",
                request_id,
                self._peer(),
            )
            return self._error_bytes(
                500,
                "KMSInternalException",
                _INTERNAL_ERROR_MESSAGE.format(request_id=request_id),
                request_id,
            )
        return self._response(200, payload, request_id)

    def _authenticate(self, request: Request, body: bytes, request_id: str) -> Caller:
        """The caller a signed request is from (the signed IAM user), or the AWS error,
        audited. Without a verifier (tests of the bare server) the socket's caller."""
        if self.verifier is None:
            if self.signed_only:
                raise KMSInternalException("keyd has no signature verifier")
            return self.caller
        try:
            identity = self.verifier.verify(
                request.method.decode("ascii", "replace"),
                request.target.decode("ascii", "replace"),
                list(request.headers),
                body,
            )
        except KMSError as error:
            refused = dataclasses.replace(self.caller, access_key_id=claimed_access_key_id(error))
            record_refused = getattr(self.service, "record_refused", None)
            if record_refused is not None:
                record_refused(_operation_for_audit(request), refused, request_id, error)
            logger.debug("keyd: refused signature from %s: %s", self._peer(), error.aws_type)
            raise
        return dataclasses.replace(
            self.caller, signed_user=identity.user_name, access_key_id=identity.access_key_id
        )

    def _peer(self) -> str:
        if self.caller.source_ip is not None:
            return self.caller.source_ip
        return f"pid {self.caller.pid}"

    def _operation(self, request: Request) -> str:
        if request.method != b"POST":
            raise _HTTPError(
                HTTPStatus.METHOD_NOT_ALLOWED,
                "UnknownOperationException",
                "keyd accepts only POST",
                close=False,
            )
        if request.target != b"/":
            raise _HTTPError(
                HTTPStatus.NOT_FOUND,
                "UnknownOperationException",
                "keyd serves only the path /",
                close=False,
            )
        for name, value in request.headers:
            if name == b"x-amz-target":
                if value.startswith(_TARGET_PREFIX) and len(value) > len(_TARGET_PREFIX):
                    operation = value[len(_TARGET_PREFIX) :]
                    if operation.isalnum():  # bytes.isalnum() is ASCII-only
                        return operation.decode("ascii")
                break
        raise UnknownOperationException(
            "the X-Amz-Target header must name an operation as TrentService.<Operation>"
        )

    def _error_bytes(self, status: int, aws_type: str, message: str, request_id: str) -> bytes:
        return self._response(status, encode_error_body(aws_type, message), request_id)

    def _response(self, status: int, payload: bytes, request_id: str) -> bytes:
        if self.plain:
            return plain_response(status, payload, request_id)
        return _response(self.h11, status, payload, request_id, close=False)

    async def _send_error(self, error: _HTTPError) -> None:
        if self.h11.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        data = _error_response(
            self.h11,
            error.status,
            error.aws_type,
            error.message,
            random_uuid(),
            close=error.close,
        )
        logger.debug("keyd: %s from %s: %s", error.status, self._peer(), error.message)
        await self._send(data)

    async def _linger(self) -> None:
        """Let a client still sending its request finish, so that it reads our answer.

        Closing with its request unread would make the client's send fail (EPIPE) before
        it sees the 413/431/400. So: shut our side, then discard what still comes, for a
        bounded time and number of bytes.
        """
        try:
            self.sock.shutdown_write()
        except OSError:
            return
        budget = _LINGER_BYTES
        with trio.move_on_after(_LINGER_SECONDS):
            while budget > 0:
                data = await self.sock.recv(_RECEIVE_SIZE)
                if not data:
                    return
                budget -= len(data)

    async def _send(self, data: bytes) -> None:
        sent = self.sock.send_now(data)
        if sent == len(data):
            return  # the usual case: no deadline to set, no wait (recv checkpoints)
        with trio.move_on_after(self.limits.send_timeout) as scope:
            await self.sock.send_all(data[sent:])
        if scope.cancelled_caught:
            raise TimeoutError("client stopped reading its response")


@dataclass(frozen=True, slots=True)
class PlainRequest:
    """A request read by :func:`parse_plain_request`: the attributes of ``h11.Request``
    that the server reads (header names lower-cased, values stripped, as h11 gives them)."""

    method: bytes
    target: bytes
    headers: list[tuple[bytes, bytes]]
    http_version: bytes = b"1.1"


Request = h11.Request | PlainRequest

#: headers that change how a request is framed or the connection is kept: h11's work
_NOT_PLAIN_HEADERS = frozenset(
    (b"transfer-encoding", b"expect", b"connection", b"upgrade", b"te", b"trailer")
)


class _PlainRequestEvents:
    """httptools' callbacks for :func:`parse_plain_request`: what the request said."""

    __slots__ = ("url", "headers", "body", "begun", "completed")

    def __init__(self) -> None:
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.body: list[bytes] = []
        self.begun = 0
        self.completed = 0

    def on_message_begin(self) -> None:
        self.begun += 1

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        # as h11 gives them: names lower-cased, values without surrounding whitespace
        self.headers.append((name.lower(), value.strip(b" \t")))

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        self.completed += 1


def parse_plain_request(data: bytes, limits: ServerLimits) -> tuple[PlainRequest, bytes] | None:
    """The request and body if *data* is exactly one whole, plain request, else None.

    Parsed by httptools (llhttp, the parser of Node.js and uvicorn) in a few
    microseconds, where h11 takes tens. Plain: ``POST / HTTP/1.1``, one Host, one
    Content-Length and exactly that many body bytes, nothing after the request (no
    pipelining), within every limit of *limits*, and none of the headers that make
    framing or the connection h11's business (Transfer-Encoding, Expect, Connection,
    Upgrade...). This is what kmsfs's clients and AWS's SDKs send. Everything else,
    and whatever llhttp refuses, returns None and goes to h11, which answers it
    exactly as before (400, 408, 413, 431, 100 Continue, chunked bodies,
    Connection: close, pipelining): this function only ever accepts, never refuses.
    """
    if not data.startswith(b"POST / HTTP/1.1\r\n"):
        return None  # (llhttp skips empty lines before a request; h11 refuses them)
    head_end = data.find(b"\r\n\r\n")
    if head_end < 0 or head_end + 4 > limits.max_header_bytes:
        return None
    events = _PlainRequestEvents()
    parser = httptools.HttpRequestParser(events)
    try:
        parser.feed_data(data)
    except httptools.HttpParserError:  # HttpParserUpgrade included
        return None
    if events.begun != 1 or events.completed != 1:
        return None  # incomplete, or followed by (part of) another request
    if parser.get_method() != b"POST" or events.url != b"/":
        return None
    if parser.get_http_version() != "1.1" or len(events.headers) > limits.max_header_count:
        return None
    hosts = lengths = 0
    for name, _value in events.headers:
        if name == b"content-length":
            lengths += 1
        elif name == b"host":
            hosts += 1
        elif name in _NOT_PLAIN_HEADERS:
            return None
    body = b"".join(events.body)
    if hosts != 1 or lengths != 1 or len(body) > limits.max_body_bytes:
        return None
    if head_end + 4 + len(body) != len(data):
        return None  # bytes the parser skipped (stray line ends): h11 decides
    return PlainRequest(b"POST", b"/", events.headers), body


def plain_response(status: int, payload: bytes, request_id: str) -> bytes:
    """The bytes h11 writes for ``_response(conn, status, payload, request_id,
    close=False)`` on a keep-alive HTTP/1.1 connection, without h11."""
    return b"".join(
        (
            b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n%s: %s\r\n\r\n"
            % (
                status,
                _REASONS.get(status, b""),
                _CONTENT_TYPE,
                len(payload),
                _REQUEST_ID_HEADER,
                request_id.encode("ascii"),
            ),
            payload,
        )
    )


def _with_forwarded_header(caller: Caller, request: Request) -> Caller:
    """*caller* with the request's X-Kmsfs-Forwarded-Caller header, as received: the
    service checks it (well-formed, sent by a trusted forwarder) before anything runs.
    Sent twice, the values are joined, which no strict parse accepts."""
    values = [value for name, value in request.headers if name == _FORWARDED_HEADER]
    if not values:
        return caller
    text = b",".join(values).decode("ascii", "replace")
    return dataclasses.replace(caller, forwarded_header=text)


def claimed_access_key_id(error: KMSError) -> str | None:
    """The access key id a refused request claimed (set by kmsfs.kms.sigv4)."""
    return getattr(error, "claimed_access_key_id", None)


def _operation_for_audit(request: Request) -> str:
    """The operation a refused request named, for its audit record ("Unknown" if none)."""
    for name, value in request.headers:
        if name == b"x-amz-target" and value.startswith(_TARGET_PREFIX):
            operation = value[len(_TARGET_PREFIX) :]
            if operation.isalnum() and len(operation) <= 64:
                return operation.decode("ascii")
    return "Unknown"


def _response(
    conn: h11.Connection, status: int, payload: bytes, request_id: str, *, close: bool
) -> bytes:
    headers = [
        (b"Content-Type", _CONTENT_TYPE),
        (b"Content-Length", b"%d" % len(payload)),
        (_REQUEST_ID_HEADER, request_id.encode("ascii")),
    ]
    if close:
        headers.append((b"Connection", b"close"))
    head = conn.send(
        h11.Response(status_code=status, headers=headers, reason=_REASONS.get(status, b""))
    )
    conn.send(h11.Data(data=payload))  # returns payload as is; we join it once below
    conn.send(h11.EndOfMessage())
    return b"".join((head or b"", payload))


def _error_response(
    conn: h11.Connection,
    status: int,
    aws_type: str,
    message: str,
    request_id: str,
    *,
    close: bool,
) -> bytes:
    return _response(conn, status, encode_error_body(aws_type, message), request_id, close=close)


async def _send_all(sock: trio.socket.SocketType, data: bytes) -> None:
    view = memoryview(data)
    while view:
        sent = await sock.send(view)
        view = view[sent:]
