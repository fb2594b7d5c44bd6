"""``kmsfs keyd backup|restore|passwd|rotate-root-key``: care of the keystore itself.

Each change is audited: when keyd serves the keystore the command asks keyd to do it
(keyd's own operations, kmsfs/kms/admin.py), so the record goes into the log keyd holds;
when keyd is stopped, the command opens the keystore and its audit log itself and runs
the same operation through a local key service.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import getpass
import json
import os
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kmsfs.errors import KeystoreError, KmsfsError, UsageError


def _keystore_dir(args: argparse.Namespace) -> Path:
    from kmsfs.kms.paths import resolve_keystore_dir

    return resolve_keystore_dir(args.keystore)


def keyd_holds(keystore_dir: Path) -> bool:
    """Whether a keyd serves this keystore now: it holds its audit log's lock."""
    from kmsfs.kms.audit import _lock_path
    from kmsfs.kms.keystore import AUDIT_NAME

    lock = _lock_path(keystore_dir / AUDIT_NAME)
    try:
        fd = os.open(lock, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing drops the lock if we took it
    return False


@contextlib.contextmanager
def local_service(keystore_dir: Path, source) -> Iterator[Any]:
    """The keystore opened here (keyd stopped), with its audit log, as a key service."""
    from kmsfs.kms.audit import AuditLog
    from kmsfs.kms.keystore import Keystore, check_keystore_permissions
    from kmsfs.kms.service import KeyService

    check_keystore_permissions(keystore_dir)
    keystore = Keystore.open(keystore_dir, source)
    try:
        audit = AuditLog.open(keystore.audit_path)
        try:
            yield KeyService(keystore, audit)
        finally:
            audit.close()
    finally:
        keystore.close()


def _me():
    from kmsfs.kms.caller import Caller

    return Caller(uid=os.getuid(), gid=os.getgid(), pid=os.getpid())


def _run(args: argparse.Namespace, operation: str, params: dict[str, Any], source=None):
    """Run a keystore operation: through the keyd serving the keystore, or locally."""
    keystore_dir = _keystore_dir(args)
    if keyd_holds(keystore_dir):
        from kmsfs.kms.client import KMSClient

        with KMSClient(args.keyd_socket) as client:
            return client.call(operation, params)
    if source is None:
        from kmsfs.cli.keyd import root_key_source

        source = root_key_source(args)
    with local_service(keystore_dir, source) as service:
        return service.handle(operation, params, _me(), str(uuid.uuid4()))


# -------------------------------------------------------------------- backup
def cmd_backup(args: argparse.Namespace) -> None:
    from kmsfs.cli.keyd import root_key_source

    if args.verify:
        from kmsfs.kms.admin import verify_backup

        report = verify_backup(Path(args.path), root_key_source(args))
        if args.json:
            print(json.dumps(report, indent=2, sort_keys=True))
            return
        print(
            f"backup {args.path}: intact; keystore {report['keystore_id']} taken "
            f"{report['created']}, {report['contents'].get('keys', 0)} keys, "
            f"{report['checked_versions']} key versions unsealed with the root secret"
        )
        return
    destination = os.path.abspath(args.path)
    response = _run(args, "BackupKeystore", {"Destination": destination})
    manifest = response["Manifest"]
    if args.json:
        print(json.dumps(response, indent=2, sort_keys=True))
        return
    head = manifest.get("audit_head") or {}
    print(
        f"backed up keystore {manifest['keystore_id']} to {destination}: "
        f"{manifest['contents'].get('keys', 0)} keys, {manifest['database']['bytes']} bytes, "
        f"sha256 {manifest['database']['sha256'][:16]}..., audit log at record "
        f"{head.get('seq', '?')}. Keep it apart from the root secret: the backup is sealed "
        "under it, and useless without it."
    )


def cmd_restore(args: argparse.Namespace) -> None:
    from kmsfs.cli.keyd import root_key_source
    from kmsfs.kms.admin import restore_backup
    from kmsfs.kms.keystore import Keystore

    if args.keystore is None:
        raise UsageError("restore needs --keystore DIR (a new directory)")
    target = _keystore_dir(args)
    if keyd_holds(target) or Keystore.exists(target):
        raise KeystoreError(f"{target} holds a live keystore; restore into a new directory")
    source = root_key_source(args)
    started = time.time()
    report = restore_backup(Path(args.backup), target, source)
    # the restored keystore's audit log begins with the restore, naming the backup and
    # the audit head it was taken at (the old log stays with the old keystore)
    with local_service(target, source) as service:
        event = service._audit_event(
            "RestoreKeystore",
            {},
            _me(),
            str(uuid.uuid4()),
            started,
            None,
            None,
        )
        event["readOnly"] = False
        event["additionalEventData"] = {
            "backup": os.path.abspath(args.backup),
            "backupCreated": report.get("created"),
            "databaseSha256": report["database"]["sha256"],
            "auditHeadAtBackup": report.get("audit_head"),
            "checkedKeyVersions": report["checked_versions"],
        }
        service._record(event, durable=True)
    print(
        f"restored keystore {report['keystore_id']} into {target}: "
        f"{report['contents'].get('keys', 0)} keys, {report['checked_versions']} key versions "
        f"checked. Start it with: kmsfs keyd serve --keystore {target}"
    )


# ------------------------------------------------------------ root secret
def _new_source(args: argparse.Namespace, old_key_file: Path | None):
    from kmsfs.kms.keystore import RootKeySource, read_passphrase_file

    if args.new_root_key_file:
        path = Path(os.path.abspath(args.new_root_key_file))
        if old_key_file is not None and path == Path(os.path.abspath(old_key_file)):
            raise UsageError(
                "--new-root-key-file names the key file in use; give a new path (the old "
                "file must stay valid until the change is committed)"
            )
        return RootKeySource.from_key_file(path)
    if args.new_passphrase_file:
        return RootKeySource.from_passphrase(read_passphrase_file(args.new_passphrase_file))
    if not sys.stdin.isatty():
        raise UsageError("no new secret: give --new-passphrase-file or --new-root-key-file")
    first = getpass.getpass("new keystore passphrase: ")
    if getpass.getpass("again: ") != first:
        raise UsageError("the two passphrases differ")
    return RootKeySource.from_passphrase(first)


def cmd_passwd(args: argparse.Namespace) -> None:
    from kmsfs.cli.keyd import root_key_source
    from kmsfs.kms.keystore import Keystore

    keystore_dir = _keystore_dir(args)
    old = root_key_source(args)
    # opening with the old secret proves it; the new wrapping is made here, so the
    # secrets never leave this process (keyd only stores the new wrapping)
    keystore = Keystore.open(keystore_dir, old)
    try:
        new = _new_source(args, old.key_file)
        protection = keystore.protection_for(new)
    finally:
        keystore.close()
    response = _run(args, "UpdateRootProtection", {"Protection": protection}, source=old)
    what = f"root key file {new.key_file}" if new.key_file else "the new passphrase"
    print(
        f"keystore {keystore_dir} is now opened by {what} "
        f"(was: {response.get('PreviousProtectionKind')})"
    )
    if old.key_file is not None:
        print(f"the old root key file {old.key_file} no longer opens it; remove it when ready")


def cmd_rotate_root_key(args: argparse.Namespace) -> None:
    from kmsfs.cli.keyd import root_key_source

    keystore_dir = _keystore_dir(args)
    if keyd_holds(keystore_dir):
        raise KmsfsError(
            f"keyd is serving {keystore_dir}: stop it first ('kmsfs keyd stop'), rotate, "
            "and start it again (keyd holds the root key in memory)"
        )
    source = root_key_source(args)
    started = time.monotonic()
    with local_service(keystore_dir, source) as service:
        service.root_secret_for_rotation = source
        response = service.handle("RotateRootKey", {}, _me(), str(uuid.uuid4()))
    print(
        f"keystore {keystore_dir}: new root key; {response['ResealedRecords']} sealed records "
        f"resealed in {time.monotonic() - started:.1f} s. The root secret is unchanged."
    )


# -------------------------------------------------------------------- parser
def add_parsers(keyd: argparse._SubParsersAction) -> None:
    from kmsfs.cli.common import keyd_options
    from kmsfs.cli.keyd import _keystore_options, _root_options

    backup = keyd.add_parser(
        "backup",
        help="snapshot the keystore (keyd may keep serving), or --verify a backup",
        description="Write a consistent snapshot of the keystore (still sealed under the "
        "root key) and a manifest with its SHA-256 into the new directory PATH. With "
        "--verify, check the backup at PATH with the root secret, without serving it.",
    )
    backup.add_argument(
        "path", metavar="PATH", help="a new directory (or, with --verify, a backup)"
    )
    backup.add_argument("--verify", action="store_true", help="check the backup at PATH")
    backup.add_argument("--json", action="store_true", help="print JSON")
    _keystore_options(backup)
    _root_options(backup)
    keyd_options(backup)
    backup.set_defaults(func=cmd_backup)

    restore = keyd.add_parser(
        "restore", help="make a new keystore directory from a backup (checked first)"
    )
    restore.add_argument("backup", metavar="BACKUP", help="a directory made by 'keyd backup'")
    _keystore_options(restore)
    _root_options(restore)
    restore.set_defaults(func=cmd_restore)

    passwd = keyd.add_parser(
        "passwd",
        help="change the passphrase, or switch between passphrase and root key file",
        description="Re-wrap the root key under a new secret (one atomic change: a kill at "
        "any point leaves the old or the new secret working). The old secret comes from "
        "the usual options (--root-key-file, --passphrase-file, ...).",
    )
    new = passwd.add_mutually_exclusive_group()
    new.add_argument("--new-passphrase-file", metavar="F", help="the new passphrase is in F")
    new.add_argument(
        "--new-root-key-file", metavar="F", help="switch to this root key file (created if missing)"
    )
    _keystore_options(passwd)
    _root_options(passwd)
    keyd_options(passwd)
    passwd.set_defaults(func=cmd_passwd)

    rotate = keyd.add_parser(
        "rotate-root-key",
        help="a new root key, every sealed record resealed (keyd must be stopped)",
    )
    _keystore_options(rotate)
    _root_options(rotate)
    rotate.set_defaults(func=cmd_rotate_root_key)
