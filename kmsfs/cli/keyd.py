"""``kmsfs keyd ...``: create a keystore, serve it, stop it, read its audit log."""

from __future__ import annotations

import argparse
import getpass
import json
import logging
import os
import re
import signal
import socket
import sys
import time

from kmsfs.errors import KeystoreError, KmsfsError, UsageError

PASSPHRASE_FILE_ENV = "KMSFS_PASSPHRASE_FILE"


# ---------------------------------------------------------------- passphrase
def _read_secret_file(path: str) -> bytes:
    from kmsfs.kms.keystore import read_passphrase_file

    return read_passphrase_file(path)


def root_key_source(args: argparse.Namespace, *, confirm: bool = False):
    """Root key file, a systemd credential, an --extpass command, passphrase fd/file/env,
    or a prompt — in that order (the options exclude each other)."""
    from kmsfs.kms.daemon import extpass_argv, passphrase_from_command, source_from_credential
    from kmsfs.kms.keystore import RootKeySource

    if getattr(args, "root_key_file", None):
        return RootKeySource.from_key_file(args.root_key_file)
    if getattr(args, "root_key_credential", None):
        return source_from_credential(args.root_key_credential, root_key=True)
    if getattr(args, "passphrase_credential", None):
        return source_from_credential(args.passphrase_credential, root_key=False)
    if getattr(args, "extpass", None):
        return RootKeySource.from_passphrase(passphrase_from_command(extpass_argv(args.extpass)))
    if getattr(args, "passphrase_fd", None) is not None:
        with os.fdopen(args.passphrase_fd, "rb") as pipe:
            return RootKeySource.from_passphrase(pipe.read())
    path = getattr(args, "passphrase_file", None) or os.environ.get(PASSPHRASE_FILE_ENV)
    if path:
        return RootKeySource.from_passphrase(_read_secret_file(path))
    if not sys.stdin.isatty():
        raise UsageError(
            "no passphrase: give --passphrase-file, set KMSFS_PASSPHRASE_FILE, "
            "or use --root-key-file"
        )
    passphrase = getpass.getpass("keystore passphrase: ")
    if confirm and getpass.getpass("again: ") != passphrase:
        raise UsageError("the two passphrases differ")
    return RootKeySource.from_passphrase(passphrase)


# ---------------------------------------------------------------------- keyd
def cmd_keyd_init(args: argparse.Namespace) -> None:
    from kmsfs.kms.keystore import Keystore
    from kmsfs.kms.paths import resolve_keystore_dir

    if not re.fullmatch(r"[0-9]{12}", args.account):
        # AWS account ids are 12 digits; ARNs (arn:aws:iam::<account>:...) need one
        raise UsageError(f"--account-id must be 12 digits, not {args.account!r}")
    path = resolve_keystore_dir(args.keystore)
    if Keystore.exists(path):
        raise KeystoreError(f"a keystore already exists at {path}")
    source = root_key_source(args, confirm=True)
    keystore = Keystore.create(path, source, region=args.region, account=args.account)
    keystore.close()
    how = f"root key file {source.key_file}" if source.key_file else "a passphrase"
    print(f"created keystore {path}, protected by {how}")
    if args.tls:
        _make_tls_cert(path / "tls-cert.pem", path / "tls-key.pem", args.tls_name, force=False)


def _make_tls_cert(cert, key, names, *, force: bool) -> None:
    from kmsfs.kms.tls import make_self_signed

    # inside the keystore every file must be private (check_keystore_permissions)
    in_keystore = cert.parent.resolve() == key.parent.resolve()
    mode = 0o600 if in_keystore else 0o644
    fingerprint = make_self_signed(cert, key, names or (), overwrite=force, cert_mode=mode)
    print(f"TLS certificate {cert} (mode {mode:04o}; key {key}, mode 0600)")
    print(f"SHA-256 fingerprint: {fingerprint}")


def cmd_keyd_tls_cert(args: argparse.Namespace) -> None:
    from pathlib import Path

    from kmsfs.kms.paths import resolve_keystore_dir
    from kmsfs.kms.tls import CERT_NAME, KEY_NAME

    directory = resolve_keystore_dir(args.keystore)
    cert = Path(args.cert) if args.cert else directory / CERT_NAME
    key = Path(args.key) if args.key else directory / KEY_NAME
    _make_tls_cert(cert, key, args.name, force=args.force)


# --------------------------------------------------------------- credentials
def _open_credentials(args: argparse.Namespace):
    from kmsfs.kms.credentials import CredentialStore
    from kmsfs.kms.keystore import Keystore, check_keystore_permissions
    from kmsfs.kms.paths import resolve_keystore_dir

    path = resolve_keystore_dir(args.keystore)
    check_keystore_permissions(path)
    keystore = Keystore.open(path, root_key_source(args))
    return keystore, CredentialStore(keystore)


def _audit_now(keystore, store) -> None:
    """Move this change's audit record into the audit log now if keyd does not hold it
    (else keyd does within a second; see kmsfs.kms.credentials)."""
    from kmsfs.errors import AuditLogInUse
    from kmsfs.kms.audit import AuditLog

    try:
        audit = AuditLog.open(keystore.audit_path)
    except AuditLogInUse:
        return  # the running keyd writes it
    try:
        store.drain_events(audit)
    finally:
        audit.close()


def cmd_credentials_create(args: argparse.Namespace) -> None:
    from kmsfs.kms.credentials import check_user_name

    check_user_name(args.user)  # before asking for a passphrase
    keystore, store = _open_credentials(args)
    try:
        access_key, secret = store.create(args.user)
        account = keystore.meta("account")
        _audit_now(keystore, store)
    finally:
        keystore.close()
    if args.json:  # IAM CreateAccessKey's response shape
        body = {
            "AccessKey": {
                **access_key.as_iam(),
                "SecretAccessKey": secret,
            }
        }
        print(json.dumps(body, indent=2))
        return
    print(f"user:              arn:aws:iam::{account}:user/{access_key.user_name}")
    print(f"access key id:     {access_key.access_key_id}")
    print(f"secret access key: {secret}")
    print("(the secret is shown only now; keyd keeps it sealed under the root key)")


def cmd_credentials_list(args: argparse.Namespace) -> None:
    keystore, store = _open_credentials(args)
    try:
        keys = store.list(args.user)
    finally:
        keystore.close()
    if args.json:  # IAM ListAccessKeys's shape
        print(json.dumps({"AccessKeyMetadata": [key.as_iam() for key in keys]}, indent=2))
        return
    from kmsfs.cli.common import print_table

    print_table([key.as_iam() for key in keys], ["UserName", "AccessKeyId", "Status", "CreateDate"])


def cmd_credentials_status(args: argparse.Namespace) -> None:
    from kmsfs.kms.credentials import ACTIVE, INACTIVE

    status = ACTIVE if args.credentials_command == "enable" else INACTIVE
    keystore, store = _open_credentials(args)
    try:
        key = store.set_status(args.access_key_id, status)
        _audit_now(keystore, store)
    finally:
        keystore.close()
    print(f"access key {key.access_key_id} of user {key.user_name}: {key.status}")


def cmd_credentials_delete(args: argparse.Namespace) -> None:
    keystore, store = _open_credentials(args)
    try:
        store.delete(args.access_key_id)
        _audit_now(keystore, store)
    finally:
        keystore.close()
    print(f"access key {args.access_key_id} deleted")


def cmd_keyd_serve(args: argparse.Namespace) -> None:
    from kmsfs.background import start_detached
    from kmsfs.kms.daemon import run_keyd
    from kmsfs.kms.paths import resolve_keystore_dir, resolve_socket_path
    from kmsfs.kms.principal import AccountAccess

    keystore_dir = resolve_keystore_dir(args.keystore)
    socket_path = resolve_socket_path(args.socket)
    socket_mode = int(args.socket_mode, 8)
    try:
        account_access = AccountAccess.parse(args.account_users)
    except ValueError as exc:
        raise UsageError(f"--account-users: {exc}") from None
    try:  # nobody but root unless named (kmsfs:ForwardCaller)
        forwarders = AccountAccess.parse(args.forwarders or "")
    except ValueError as exc:
        raise UsageError(f"--forwarders: {exc}") from None
    if args.daemon:
        source = root_key_source(args)
        argv = [
            "keyd",
            "serve",
            "--keystore",
            str(keystore_dir),
            "--socket",
            str(socket_path),
            "--socket-mode",
            args.socket_mode,
        ]
        if source.key_file is not None:
            argv += ["--root-key-file", str(os.path.abspath(source.key_file))]
        if args.account_users is not None:
            argv += ["--account-users", args.account_users]
        if args.forwarders:
            argv += ["--forwarders", args.forwarders]
        for address in args.listen or ():
            argv += ["--listen", address]
        for region in args.extra_region or ():
            argv += ["--region", region]
        if args.tls_cert:
            argv += ["--tls-cert", os.path.abspath(args.tls_cert)]
        if args.tls_key:
            argv += ["--tls-key", os.path.abspath(args.tls_key)]
        log_path = keystore_dir / "keyd.log"
        pid = start_detached(argv, log_path, what="keyd", passphrase=source.passphrase)
        print(f"keyd running as pid {pid} on {socket_path} (log: {log_path})")
        return
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.INFO,
        format="%(asctime)s keyd[%(process)d] %(levelname)s %(message)s",
    )
    from pathlib import Path

    from kmsfs.kms.daemon import tcp_endpoints

    tls_cert = Path(args.tls_cert) if args.tls_cert else None
    tls_key = Path(args.tls_key) if args.tls_key else None
    tcp_endpoints(args.listen or (), tls_cert, tls_key)  # one clear line before unsealing
    run_keyd(
        keystore_dir,
        root_key_source(args),
        socket_path,
        socket_mode=socket_mode,
        ready_fd=args.ready_fd,
        account_access=account_access,
        forwarders=forwarders,
        listen=args.listen or (),
        tls_cert=tls_cert,
        tls_key=tls_key,
        regions=args.extra_region or (),
    )


def cmd_keyd_stop(args: argparse.Namespace) -> None:
    """Ask the keyd on a socket to stop (SIGTERM to the socket's peer) and wait."""
    from kmsfs.errors import KeydUnavailable
    from kmsfs.kms.paths import find_keyd
    from kmsfs.kms.trust import check_peer, check_socket_path, expected_keyd_uids, peer_credentials

    # the keyd every other command would use: --socket, else the one rule (kms/paths.py)
    socket_path = find_keyd(args.socket)
    # the same checks as every client: signal only a keyd run by us, root or the named
    # service account, found through a path nobody else controls
    expected = expected_keyd_uids()
    resolved = check_socket_path(socket_path, expected)
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(resolved))
        check_peer(probe, socket_path, expected)
        pid = peer_credentials(probe)[0]
    except OSError as exc:
        raise KeydUnavailable(f"no keyd on {socket_path}: {exc.strerror}") from None
    finally:
        probe.close()
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            print(f"keyd (pid {pid}) stopped")
            return
        time.sleep(0.05)
    raise KmsfsError(f"keyd (pid {pid}) did not stop within 10 s")


def cmd_audit_tail(args: argparse.Namespace) -> None:
    from kmsfs.kms import audit
    from kmsfs.kms.keystore import AUDIT_NAME
    from kmsfs.kms.paths import resolve_keystore_dir

    path = resolve_keystore_dir(args.keystore) / AUDIT_NAME
    if not path.exists() and not audit.rotated_files(path):
        raise KeystoreError(f"no audit log at {path}")
    events = audit.tail(
        path,
        args.lines,
        follow=args.follow,
        key=args.key,
        event_name=args.event,
        user=args.user,
        denied=args.denied,
    )
    try:
        for event in events:
            if args.json:
                print(json.dumps(event, sort_keys=True), flush=True)
            else:
                print(audit.format_event_line(event), flush=True)
    except KeyboardInterrupt:
        pass


def cmd_audit_verify(args: argparse.Namespace) -> None:
    from kmsfs.errors import AuditTampered
    from kmsfs.kms import audit
    from kmsfs.kms.keystore import AUDIT_NAME
    from kmsfs.kms.paths import resolve_keystore_dir

    path = resolve_keystore_dir(args.keystore) / AUDIT_NAME
    if not path.exists() and not audit.rotated_files(path):
        raise KeystoreError(f"no audit log at {path}")
    report = audit.verify(path)
    if not report.ok:
        where = f" line {report.first_bad_line}:" if report.first_bad_line is not None else ""
        raise AuditTampered(
            f"audit log {report.file or path}:{where} {report.problem}",
            report.first_bad_line or 0,
        )
    files = f" in {report.files} files (rotated ones included)" if report.files > 1 else ""
    print(f"audit log {path}: {report.lines} lines{files}, chain intact")


def cmd_audit_resolve(args: argparse.Namespace) -> None:
    """File ids (and ino:N) of ``--audit-opens`` records mapped back to plaintext paths."""
    from pathlib import Path

    from kmsfs.cli.common import key_service_options
    from kmsfs.fs.access_audit import access_events, resolve
    from kmsfs.fs.offline import open_tree
    from kmsfs.kms.audit import _printable

    config, tree = open_tree(Path(args.cipherdir), service_options=key_service_options(args))
    paths = resolve(tree)
    if args.log is None:
        for file_id, found in sorted(paths.items()):
            if args.json:
                print(json.dumps({"fileId": file_id, "paths": found}, sort_keys=True))
            else:
                print(f"{file_id}  {_printable(' '.join(found))}")
        return
    for event in access_events(Path(args.log)):
        data = event.get("additionalEventData") or {}
        if data.get("filesystemId") not in (config.filesystem_id, None):
            continue  # another filesystem's events
        file_id = data.get("fileId")
        found = paths.get(file_id, []) if isinstance(file_id, str) else []
        if args.json:
            print(json.dumps({**event, "paths": found}, sort_keys=True))
            continue
        identity = event.get("userIdentity") or {}
        fields = [
            str(event.get("eventTime", "?")),
            f"{identity.get('userName', '?')}({identity.get('uid', '?')})",
            f"pid={data.get('pid', '?')}",
            str(event.get("eventName", "?")),
            str(data.get("accessMode") or "-"),
            str(data.get("outcome") or "-"),
            str(file_id or "-"),
            " ".join(found) if found else "(not found)",
            str(data.get("executable") or "-"),
        ]
        if event.get("eventName") == "AccessEventsLost":
            fields[3:] = [f"AccessEventsLost: {data.get('lostEvents')} event(s) lost"]
        print("  ".join(_printable(text) for text in fields))


def _keystore_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--keystore",
        help="keystore directory (default: $KMSFS_KEYSTORE or $XDG_DATA_HOME/kmsfs/keystore)",
    )


def _root_options(parser: argparse.ArgumentParser, *, credentials: bool = False) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--root-key-file", help="protect/unseal with this 0600 key file")
    group.add_argument(
        "--passphrase-file",
        help=f"read the passphrase from this file (or set {PASSPHRASE_FILE_ENV})",
    )
    group.add_argument(
        "--extpass",
        action="append",
        metavar="CMD",
        help="run CMD and read the passphrase from its output, one trailing newline "
        "removed (as gocryptfs -extpass; given several times: the command and its arguments)",
    )
    if credentials:
        group.add_argument(
            "--passphrase-credential",
            metavar="NAME",
            help="the passphrase is the systemd credential NAME ($CREDENTIALS_DIRECTORY/NAME, "
            "from LoadCredential=)",
        )
        group.add_argument(
            "--root-key-credential",
            metavar="NAME",
            help="the root key file is the systemd credential NAME",
        )
    group.add_argument("--passphrase-fd", type=int, help=argparse.SUPPRESS)


# -------------------------------------------------------------------- parser
def add_parsers(commands: argparse._SubParsersAction) -> None:
    keyd = commands.add_parser("keyd", help="the local key daemon").add_subparsers(
        dest="keyd_command", required=True, metavar="SUBCOMMAND"
    )
    init = keyd.add_parser("init", help="create a new keystore")
    _keystore_options(init)
    _root_options(init)
    init.add_argument("--region", default="local", help="region used in key ARNs")
    init.add_argument(
        "--account-id",
        "--account",
        dest="account",
        default="000000000000",
        help="the 12-digit AWS account id in key and principal ARNs (stored in the "
        "keystore; default 000000000000, which keystores made before this option keep)",
    )
    init.add_argument(
        "--tls",
        action="store_true",
        help="also make a self-signed TLS certificate for --listen (tls-cert.pem, "
        "tls-key.pem in the keystore) and print its SHA-256 fingerprint",
    )
    init.add_argument(
        "--tls-name",
        action="append",
        metavar="NAME",
        help="a host name or address the certificate is for (repeatable; localhost, "
        "127.0.0.1 and ::1 always)",
    )
    init.set_defaults(func=cmd_keyd_init)

    tls = keyd.add_parser(
        "tls-cert", help="make a self-signed TLS certificate for keyd serve --listen"
    )
    _keystore_options(tls)
    tls.add_argument(
        "--name",
        action="append",
        metavar="NAME",
        help="a host name or address the certificate is for (repeatable; localhost, "
        "127.0.0.1 and ::1 always)",
    )
    tls.add_argument("--cert", help="certificate file (default: KEYSTORE/tls-cert.pem)")
    tls.add_argument("--key", help="private key file, written 0600 (default: KEYSTORE/tls-key.pem)")
    tls.add_argument("--force", action="store_true", help="replace existing files")
    tls.set_defaults(func=cmd_keyd_tls_cert)

    credentials = keyd.add_parser(
        "credentials", help="access keys for AWS SigV4 clients (boto3, aws CLI, SDKs)"
    ).add_subparsers(dest="credentials_command", required=True, metavar="SUBCOMMAND")
    create = credentials.add_parser(
        "create", help="make an access key for arn:aws:iam::ACCOUNT:user/NAME (secret shown once)"
    )
    _keystore_options(create)
    _root_options(create)
    create.add_argument("--user", required=True, metavar="NAME", help="the IAM user name")
    create.add_argument("--json", action="store_true", help="IAM CreateAccessKey's JSON shape")
    create.set_defaults(func=cmd_credentials_create)
    listing = credentials.add_parser("list", help="list access keys (never their secrets)")
    _keystore_options(listing)
    _root_options(listing)
    listing.add_argument("--user", metavar="NAME", help="only this user's keys")
    listing.add_argument("--json", action="store_true", help="IAM ListAccessKeys's JSON shape")
    listing.set_defaults(func=cmd_credentials_list)
    for name, what, func in (
        ("disable", "refuse an access key from the next request on (Inactive)", None),
        ("enable", "make an Inactive access key Active again", None),
        ("delete", "delete an access key", cmd_credentials_delete),
    ):
        command = credentials.add_parser(name, help=what)
        _keystore_options(command)
        _root_options(command)
        command.add_argument("access_key_id", metavar="ACCESS_KEY_ID")
        command.set_defaults(func=func or cmd_credentials_status)

    serve_parser = keyd.add_parser("serve", help="unseal the keystore and serve on a socket")
    _keystore_options(serve_parser)
    _root_options(serve_parser, credentials=True)
    serve_parser.add_argument("--socket", help="socket path (default: per-user or /run/kmsfs)")
    serve_parser.add_argument("--socket-mode", default="0600", help="socket file mode (octal)")
    serve_parser.add_argument(
        "--account-users",
        metavar="LIST",
        help="who may CreateKey and GenerateRandom (no key policy covers them): login names, "
        "uids, @groups and iam:NAME (a SigV4-signed user), comma-separated; root always may "
        "(default: everyone)",
    )
    serve_parser.add_argument(
        "--forwarders",
        metavar="LIST",
        help="who besides root may forward a caller's identity (kmsfs:ForwardCaller, header "
        "X-Kmsfs-Forwarded-Caller: a kmsfs mount run by that user): same syntax as "
        "--account-users (default: root only)",
    )
    serve_parser.add_argument(
        "--listen",
        action="append",
        metavar="ADDRESS:PORT",
        help="also serve AWS SigV4-signed requests over TCP (127.0.0.1:4599, [::1]:4599; "
        "repeatable); plain HTTP only on loopback, else give --tls-cert/--tls-key",
    )
    serve_parser.add_argument("--tls-cert", metavar="PEM", help="TLS certificate (chain)")
    serve_parser.add_argument("--tls-key", metavar="PEM", help="TLS private key")
    serve_parser.add_argument(
        "--region",
        dest="extra_region",
        action="append",
        metavar="REGION",
        help="a region signed requests may be scoped to, besides the keystore's (repeatable)",
    )
    serve_parser.add_argument("-d", "--daemon", action="store_true", help="detach")
    serve_parser.add_argument("--debug", action="store_true", help="log debug messages")
    serve_parser.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
    serve_parser.set_defaults(func=cmd_keyd_serve)

    stop = keyd.add_parser("stop", help="stop the keyd serving on a socket")
    stop.add_argument(
        "--socket",
        help="socket path (default: the keyd other commands find: $KMSFS_KEYD_SOCKET, "
        "~/.config/kmsfs/config, the default socket)",
    )
    stop.set_defaults(func=cmd_keyd_stop)

    _add_audit_commands(keyd.add_parser("audit", help="read and verify the audit log"))
    # also at the top level (issue 17 names it ``kmsfs audit resolve``): the same commands
    _add_audit_commands(
        commands.add_parser(
            "audit", help="keyd's audit log: tail, verify, resolve (as kmsfs keyd audit)"
        )
    )

    from kmsfs.cli import keyd_admin

    keyd_admin.add_parsers(keyd)


def _add_audit_commands(audit_parser: argparse.ArgumentParser) -> None:
    """``tail``, ``verify`` and ``resolve`` under ``kmsfs keyd audit`` and ``kmsfs audit``."""
    audit_commands = audit_parser.add_subparsers(dest="audit_command", required=True)
    tail = audit_commands.add_parser("tail", help="show the last events")
    _keystore_options(tail)
    tail.add_argument("-n", "--lines", type=int, default=20, help="how many events")
    tail.add_argument("-f", "--follow", action="store_true", help="keep printing new events")
    tail.add_argument("--key", help="only events about this key (id, ARN or alias)")
    tail.add_argument("--event", help="only events of this name (e.g. Decrypt)")
    tail.add_argument(
        "--user", metavar="NAME", help="only requests of this user (login name, uid or ARN)"
    )
    tail.add_argument(
        "--denied", action="store_true", help="only refusals (errorCode AccessDeniedException)"
    )
    tail.add_argument("--json", action="store_true", help="print JSON lines")
    tail.set_defaults(func=cmd_audit_tail)
    verify = audit_commands.add_parser("verify", help="check the log's hash chain")
    _keystore_options(verify)
    verify.set_defaults(func=cmd_audit_verify)
    resolve = audit_commands.add_parser(
        "resolve",
        help="map the file ids of access events (kmsfs mount --audit-opens) to paths",
        description="Walk a cipher directory (unlocking it with its key, as kmsfs ls does) "
        "and print every file id with its plaintext path; with --log, print the access "
        "events of that audit log for this filesystem, each with its path.",
    )
    resolve.add_argument("cipherdir")
    resolve.add_argument("--log", metavar="AUDIT_LOG", help="keyd's audit log to annotate")
    resolve.add_argument("--json", action="store_true", help="print JSON lines")
    from kmsfs.cli.common import KEYD_HINT_HELP, aws_options, keyd_options

    keyd_options(resolve, KEYD_HINT_HELP)
    aws_options(resolve)
    resolve.set_defaults(func=cmd_audit_resolve)
