"""keyd as a process: harden it, unseal the keystore, serve until told to stop.

``run_keyd`` is what ``kmsfs keyd serve`` runs in the foreground; ``-d`` runs that same
command detached (:func:`kmsfs.background.start_detached`) and returns once the child
reports that its socket is listening (or has failed, with the child's one-line error).
"""

from __future__ import annotations

import logging
import os
import resource
import shlex
import signal
import sqlite3
import ssl
import subprocess
from collections.abc import Sequence
from pathlib import Path

import trio

from kmsfs.background import report_ready
from kmsfs.errors import AuditError, KeystoreError, UsageError
from kmsfs.hardening import harden_process
from kmsfs.kms.audit import AuditLog
from kmsfs.kms.credentials import CredentialStore
from kmsfs.kms.keystore import (
    Keystore,
    RootKeySource,
    check_keystore_permissions,
    read_passphrase_file,
)
from kmsfs.kms.paths import remember_keyd_socket
from kmsfs.kms.principal import AccountAccess
from kmsfs.kms.server import TcpEndpoint, parse_listen, serve
from kmsfs.kms.service import KeyService
from kmsfs.systemd import Notifier, credential_path

log = logging.getLogger("kmsfs.keyd")

AUDIT_SYNC_INTERVAL = 1.0


# ------------------------------------------------------------ the passphrase
#: the longest passphrase an --extpass command may print (gocryptfs: 2048 bytes)
EXTPASS_MAX_BYTES = 2048


def extpass_argv(values: Sequence[str]) -> list[str]:
    """The command of ``--extpass``, as gocryptfs's ``-extpass`` takes it: one value is
    split into words (here with shell quoting rules, without a shell); several values
    are the command and its arguments as they are."""
    if len(values) == 1:
        try:
            argv = shlex.split(values[0])
        except ValueError as exc:
            raise UsageError(f"--extpass: {exc}") from None
    else:
        argv = list(values)
    if not argv or not argv[0]:
        raise UsageError("--extpass: no command")
    return argv


def passphrase_from_command(argv: Sequence[str]) -> bytes:
    """Run ``argv`` and take the passphrase from its standard output, without one
    trailing newline (gocryptfs ``-extpass``). Its stdin and stderr are ours, so it may
    prompt (``systemd-ask-password``, ``pinentry``...). A command that fails, prints
    nothing or more than :data:`EXTPASS_MAX_BYTES` is refused; errors name the program
    only (its arguments may hold a secret)."""
    program = argv[0]
    try:
        child = subprocess.Popen(list(argv), stdout=subprocess.PIPE, close_fds=True)
    except OSError as exc:
        raise KeystoreError(f"--extpass: cannot run {program}: {exc.strerror}") from None
    assert child.stdout is not None
    with child.stdout:
        output = child.stdout.read(EXTPASS_MAX_BYTES + 2)  # one more, and the newline
    too_long = len(output.removesuffix(b"\n")) > EXTPASS_MAX_BYTES
    if too_long:
        child.kill()
    status = child.wait()
    if too_long:
        raise KeystoreError(f"--extpass: {program} printed more than {EXTPASS_MAX_BYTES} bytes")
    if status != 0:
        how = f"was killed by signal {-status}" if status < 0 else f"exited with status {status}"
        raise KeystoreError(f"--extpass: {program} {how}; no passphrase")
    passphrase = output.removesuffix(b"\n")
    if not passphrase:
        raise KeystoreError(f"--extpass: {program} printed no passphrase")
    return passphrase


def source_from_credential(name: str, *, root_key: bool) -> RootKeySource:
    """The passphrase (or root key file) systemd handed over with ``LoadCredential=``:
    ``$CREDENTIALS_DIRECTORY/<name>``. The same mode checks as any passphrase or root
    key file (systemd makes it 0400)."""
    path = credential_path(name)
    if root_key:
        return RootKeySource.from_key_file(path)
    return RootKeySource.from_passphrase(read_passphrase_file(path))


def open_service(
    keystore_dir: Path,
    source: RootKeySource,
    account_access: AccountAccess | None = None,
    forwarders: AccountAccess | None = None,
) -> tuple[Keystore, AuditLog, KeyService]:
    check_keystore_permissions(keystore_dir)
    keystore = Keystore.open(keystore_dir, source)
    try:
        audit = AuditLog.open(keystore.audit_path)
    except BaseException:
        keystore.close()
        raise
    service = KeyService(keystore, audit, account_access=account_access, forwarders=forwarders)
    return keystore, audit, service


def run_keyd(
    keystore_dir: Path,
    source: RootKeySource,
    socket_path: Path,
    *,
    socket_mode: int = 0o600,
    maintenance_interval: float = 60.0,
    ready_fd: int | None = None,
    notifier: Notifier | None = None,
    account_access: AccountAccess | None = None,
    forwarders: AccountAccess | None = None,
    listen: Sequence[str] = (),
    tls_cert: Path | None = None,
    tls_key: Path | None = None,
    regions: Sequence[str] = (),
) -> None:
    """Serve keyd in this process until SIGTERM or SIGINT.

    ``listen``: TCP addresses (``127.0.0.1:4599``, ``[::1]:4599``) served beside the
    socket, with TLS from ``tls_cert``/``tls_key`` when given (required for addresses
    other than loopback), SigV4-signed requests only, for the keystore's region and
    ``regions``.

    Under systemd (``Type=notify``: ``$NOTIFY_SOCKET`` set) it sends ``READY=1`` once
    the socket listens and ``STOPPING=1`` when a signal starts the shutdown.
    """
    if notifier is None:
        notifier = Notifier.from_environment()
    endpoints = tcp_endpoints(listen, tls_cert, tls_key)
    harden_process(log)
    raise_fd_limit()
    keystore, audit, service = open_service(keystore_dir, source, account_access, forwarders)
    # also without --listen: a signed request on the socket is verified (and then the
    # signed user is the caller), never taken for the peer's uid unchecked
    from kmsfs.kms.sigv4 import SigV4Verifier

    credentials = CredentialStore(keystore)
    verifier = SigV4Verifier(credentials.lookup, [keystore.meta("region"), *regions])
    try:
        trio.run(
            _serve_until_signalled,
            service,
            audit,
            socket_path,
            socket_mode,
            maintenance_interval,
            ready_fd,
            notifier,
            endpoints,
            verifier,
            credentials,
        )
    finally:
        audit.close()
        keystore.close()
    log.info("keyd stopped")


async def _serve_until_signalled(
    service: KeyService,
    audit: AuditLog,
    socket_path: Path,
    socket_mode: int,
    maintenance_interval: float,
    ready_fd: int | None,
    notifier: Notifier,
    endpoints: Sequence[TcpEndpoint] = (),
    verifier: object = None,
    credentials: CredentialStore | None = None,
) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(
                lambda task_status: serve(
                    service,
                    socket_path,
                    socket_mode=socket_mode,
                    maintenance_interval=maintenance_interval,
                    tcp=endpoints,
                    verifier=verifier,  # type: ignore[arg-type]
                    task_status=task_status,
                )
            )
            nursery.start_soon(_sync_audit_periodically, audit)
            if credentials is not None:
                nursery.start_soon(_audit_credential_changes, credentials, audit)
            log.info("keyd listening on %s (pid %d)", socket_path, os.getpid())
            _remember_socket(socket_path)
            report_ready(ready_fd)
            notifier.ready(f"serving on {socket_path}")
            async for signum in signals:
                log.info("keyd received %s, shutting down", signal.Signals(signum).name)
                notifier.stopping()
                nursery.cancel_scope.cancel()
                break


def tcp_endpoints(
    listen: Sequence[str], tls_cert: Path | None, tls_key: Path | None
) -> list[TcpEndpoint]:
    """The ``--listen`` endpoints, checked before anything is unsealed: each parses, and
    each without TLS is a loopback address (:func:`kmsfs.kms.server.check_endpoint`)."""
    from kmsfs.kms.server import check_endpoint

    if (tls_cert is None) != (tls_key is None):
        raise UsageError("--tls-cert and --tls-key go together")
    if tls_cert is not None and not listen:
        raise UsageError("--tls-cert needs --listen ADDRESS:PORT")
    context = None
    if tls_cert is not None and tls_key is not None:
        context = server_tls_context(tls_cert, tls_key)
    endpoints = [TcpEndpoint(*parse_listen(text), ssl_context=context) for text in listen]
    for endpoint in endpoints:
        check_endpoint(endpoint)
    return endpoints


def server_tls_context(cert: Path, key: Path) -> ssl.SSLContext:
    """TLS 1.2+ with Python's defaults for servers, serving ``cert`` (chain) and ``key``."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert, key)
    except FileNotFoundError as exc:
        raise UsageError(f"--tls-cert/--tls-key: {exc.filename}: no such file") from None
    except (ssl.SSLError, OSError) as exc:
        raise UsageError(
            f"--tls-cert {cert} / --tls-key {key}: cannot load them "
            f"({getattr(exc, 'reason', None) or exc.__class__.__name__})"
        ) from None
    return context


def _remember_socket(socket_path: Path) -> None:
    """Name a non-default socket in the per-user config, for clients in new shells."""
    written, what = remember_keyd_socket(socket_path)
    if written is not None:
        log.info("keyd: %s (clients in new shells find keyd there)", what)
    else:
        log.debug("keyd: per-user config left as it is: %s", what)


#: the soft RLIMIT_NOFILE keyd asks for when the hard limit is unlimited
FD_LIMIT_WANTED = 65536


def raise_fd_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit (where allowed); returns the soft
    limit now in force. The server keeps its connection cap below it
    (:func:`kmsfs.kms.server.effective_max_connections`)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = FD_LIMIT_WANTED if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
        except (ValueError, OSError) as exc:
            log.info("keyd: cannot raise the file descriptor limit from %d: %s", soft, exc)
    return soft


async def _audit_credential_changes(credentials: CredentialStore, audit: AuditLog) -> None:
    """Move the records of access key changes made by ``kmsfs keyd credentials`` while
    keyd runs (it holds the audit log) from the keystore's outbox into the audit log,
    every second (kmsfs.kms.credentials). A failure is logged and retried."""
    failing = False
    while True:
        await trio.sleep(AUDIT_SYNC_INTERVAL)
        try:
            moved = credentials.drain_events(audit)
        except (AuditError, OSError, sqlite3.Error) as exc:
            if not failing:
                log.warning("keyd: cannot audit access key changes yet (%s); will retry", exc)
            failing = True
        else:
            failing = False
            if moved:
                log.info("keyd: audited %d access key change(s)", moved)


async def _sync_audit_periodically(audit: AuditLog) -> None:
    """Flush the audit log and rewrite its head every second, for as long as keyd runs.

    A failing sync (no space left, out of file descriptors, an I/O error) is logged
    once and retried: it never ends keyd. Records of state changes do not wait for
    it (the key service flushes those before the change commits).
    """
    failing: str | None = None
    while True:
        await trio.sleep(AUDIT_SYNC_INTERVAL)
        try:
            await trio.to_thread.run_sync(audit.sync)
        except (AuditError, OSError, RuntimeError) as exc:
            # RuntimeError: no thread could be started (out of memory or threads)
            reason = str(exc)
            if failing is None:
                log.warning("keyd: %s; will retry every %g s", reason, AUDIT_SYNC_INTERVAL)
            failing = reason
        else:
            if failing is not None:
                log.warning("keyd: audit log synced again")
                failing = None
