"""The keystore's own care: backups, restore, the root secret, the root key.

The keystore is the crown jewels: every file of every cipherdir is wrapped under a CMK
that exists only in it. This module holds what ``kmsfs keyd backup|restore|passwd|
rotate-root-key`` do, as functions of an open :class:`~kmsfs.kms.keystore.Keystore`,
and the keyd operations that run them inside a running keyd (:class:`KeystoreAdmin`,
mixed into :class:`~kmsfs.kms.service.KeyService`) so that each is audited like every
other change: its record is written and flushed before the change commits.

kmsfs's own operations (targets ``TrentService.BackupKeystore``,
``TrentService.UpdateRootProtection``, ``TrentService.RotateRootKey``) are allowed to
root and to the uid keyd runs as only: they concern the keystore, not a key, so no key
policy can grant them.

A backup is a directory::

    keystore.db     a consistent snapshot (SQLite's online backup API, taken on keyd's
                    own connection between two requests), still sealed under the root key
    manifest.json   what it holds: keystore id, account, region, the database's size and
                    SHA-256, counts of keys/versions/aliases/policies, the audit log's head
                    (seq and digest of its last record) when it was taken

It is written under a temporary name and renamed into place once its audit record is on
disk; it never holds key material in the clear or the root secret.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import shutil
import sqlite3
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from kmsfs.errors import (
    AccessDeniedException,
    KeystoreError,
    UnsupportedOperationException,
    ValidationException,
)
from kmsfs.kms.caller import Caller
from kmsfs.kms.keystore import (
    DB_NAME,
    Keystore,
    RootKeySource,
    _fsync_dir,
    check_root_protection,
)

BACKUP_FORMAT = "kmsfs-keystore-backup"
BACKUP_VERSION = 1
MANIFEST_NAME = "manifest.json"

#: request members of the operations below (see kmsfs.kms.service.REQUEST_MEMBERS)
ADMIN_REQUEST_MEMBERS: dict[str, dict[str, str]] = {
    "BackupKeystore": {"Destination": "string"},
    "UpdateRootProtection": {"Protection": "string", "ProtectionKind": "string"},
    "RotateRootKey": {},
}
ADMIN_OPERATIONS = frozenset(ADMIN_REQUEST_MEMBERS)

_COUNTED_TABLES = ("keys", "key_versions", "aliases", "key_policies", "tags", "grants")


# ----------------------------------------------------------------- backups
def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as source:
        while chunk := source.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _counts(db: sqlite3.Connection) -> dict[str, int]:
    present = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    return {
        table: db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]
        for table in _COUNTED_TABLES
        if table in present
    }


def write_backup(
    keystore: Keystore, destination: Path, audit_head: tuple[int, str] | None
) -> dict[str, Any]:
    """Snapshot the keystore into a new directory *destination* (which must not exist)
    and return its manifest. The snapshot is taken with SQLite's online backup API on
    the keystore's connection, so it is one consistent state even while keyd serves."""
    destination = Path(destination)
    if destination.exists() or destination.is_symlink():
        raise KeystoreError(f"{destination} exists; a backup goes into a new directory")
    parent = destination.parent
    if not parent.is_dir():
        raise KeystoreError(f"{parent} is not a directory")
    os.mkdir(destination, 0o700)
    try:
        target = destination / DB_NAME
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.close(fd)
        # A connection of its own, read-only: keyd's connection is inside the request's
        # write transaction (SQLite refuses a backup from it: SQLITE_LOCKED), and a
        # reader of a WAL database sees one committed state for the whole copy.
        source = sqlite3.connect(f"file:{keystore.path / DB_NAME}?mode=ro", uri=True)
        copy = sqlite3.connect(target)
        try:
            source.backup(copy)
            # a backup is one file: no WAL beside it (its checksum covers everything)
            copy.execute("PRAGMA journal_mode=DELETE")
            counts = _counts(copy)
        finally:
            copy.close()
            source.close()
        manifest: dict[str, Any] = {
            "format": BACKUP_FORMAT,
            "version": BACKUP_VERSION,
            "keystore_id": keystore.meta("keystore_id"),
            "account": keystore.meta("account"),
            "region": keystore.meta("region"),
            "root_protection": json.loads(keystore.meta("root_protection"))["kind"],
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "database": {
                "name": DB_NAME,
                "bytes": target.stat().st_size,
                "sha256": _sha256_file(target),
            },
            "contents": counts,
            "audit_head": ({"seq": audit_head[0], "digest": audit_head[1]} if audit_head else None),
        }
        manifest_path = destination / MANIFEST_NAME
        fd = os.open(manifest_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            json.dump(manifest, out, indent=2, sort_keys=True)
            out.write("\n")
            out.flush()
            os.fsync(out.fileno())
        with open(target, "rb") as written:
            os.fsync(written.fileno())
        _fsync_dir(destination)
        _fsync_dir(parent)
    except BaseException:
        shutil.rmtree(destination, ignore_errors=True)
        raise
    return manifest


def read_manifest(backup: Path) -> dict[str, Any]:
    """The manifest of a backup directory, its database checked against it."""
    backup = Path(backup)
    try:
        manifest = json.loads((backup / MANIFEST_NAME).read_text())
    except FileNotFoundError:
        raise KeystoreError(
            f"{backup} is not a kmsfs keystore backup (no {MANIFEST_NAME})"
        ) from None
    except (OSError, ValueError) as exc:
        raise KeystoreError(f"cannot read {backup / MANIFEST_NAME}: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != BACKUP_FORMAT:
        raise KeystoreError(f"{backup} is not a kmsfs keystore backup")
    if manifest.get("version") != BACKUP_VERSION:
        raise KeystoreError(
            f"{backup} is a backup of version {manifest.get('version')}; "
            f"this kmsfs reads version {BACKUP_VERSION}"
        )
    database = manifest.get("database")
    if not isinstance(database, dict) or not isinstance(database.get("sha256"), str):
        raise KeystoreError(f"{backup / MANIFEST_NAME} has no database checksum")
    path = backup / DB_NAME
    if not path.is_file():
        raise KeystoreError(f"{backup} has no {DB_NAME}")
    if not hmac.compare_digest(_sha256_file(path), database["sha256"]):
        raise KeystoreError(
            f"{path} does not match its manifest (SHA-256 differs): the backup is damaged"
        )
    return manifest


def _check_backup_contents(keystore: Keystore, manifest: dict[str, Any]) -> int:
    """Unseal every key version of an opened backup; compare with the manifest.
    Returns the number of key versions checked."""
    if not hmac.compare_digest(keystore.meta("keystore_id"), str(manifest.get("keystore_id"))):
        raise KeystoreError("the backup's database is of another keystore than its manifest says")
    if _counts(keystore._db) != manifest.get("contents"):
        raise KeystoreError("the backup's database does not hold what its manifest lists")
    checked = 0
    for key in keystore.list_keys():
        for version in keystore.list_versions(key.key_id):
            if keystore.unseal_material(key.key_id, version.version) is None:
                raise KeystoreError(f"key {key.key_id} version {version.version} is missing")
            checked += 1
    return checked


def verify_backup(backup: Path, source: RootKeySource) -> dict[str, Any]:
    """Check a backup without serving it: its manifest and checksum, then open a copy
    with the root secret and unseal every key version. Returns the manifest, with
    ``checked_versions``."""
    manifest = read_manifest(backup)
    with tempfile.TemporaryDirectory(prefix="kmsfs-backup-verify-") as scratch:
        copy_dir = Path(scratch) / "keystore"
        os.mkdir(copy_dir, 0o700)
        shutil.copyfile(Path(backup) / DB_NAME, copy_dir / DB_NAME)
        os.chmod(copy_dir / DB_NAME, 0o600)
        keystore = Keystore.open(copy_dir, source)
        try:
            checked = _check_backup_contents(keystore, manifest)
        finally:
            keystore.close()
    return {**manifest, "checked_versions": checked}


def restore_backup(backup: Path, target: Path, source: RootKeySource) -> dict[str, Any]:
    """Make *target* a keystore from *backup* (checked as :func:`verify_backup` does).

    Refuses a target that holds a keystore (or anything else). The database appears
    under its final name only once it was copied, fsynced and opened with the root
    secret; the caller then starts its audit log with a RestoreKeystore record."""
    manifest = read_manifest(backup)
    target = Path(target)
    if Keystore.exists(target):
        raise KeystoreError(f"{target} holds a keystore; restore into a new directory")
    if target.exists() and any(target.iterdir()):
        raise KeystoreError(f"{target} is not empty; restore into a new directory")
    target.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(target, 0o700)
    partial = target / f".{DB_NAME}.restoring-{uuid.uuid4().hex[:8]}"
    try:
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as out, open(Path(backup) / DB_NAME, "rb") as source_file:
            shutil.copyfileobj(source_file, out, 1 << 20)
            out.flush()
            os.fsync(out.fileno())
        if not hmac.compare_digest(_sha256_file(partial), manifest["database"]["sha256"]):
            raise KeystoreError("the copy does not match the backup's manifest")
        os.rename(partial, target / DB_NAME)
        _fsync_dir(target)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    try:
        keystore = Keystore.open(target, source)
        try:
            checked = _check_backup_contents(keystore, manifest)
        finally:
            keystore.close()
    except BaseException:
        for name in (DB_NAME, DB_NAME + "-wal", DB_NAME + "-shm"):
            (target / name).unlink(missing_ok=True)
        raise
    return {**manifest, "checked_versions": checked}


# ------------------------------------------------------------ keyd operations
class KeystoreAdmin:
    """kmsfs's keystore operations, mixed into KeyService (which provides keystore,
    audit, principal, owner_uid and the after-commit hook)."""

    keystore: Keystore
    audit: Any
    owner_uid: int
    #: set only by ``kmsfs keyd rotate-root-key`` on its own local service
    root_secret_for_rotation: RootKeySource | None = None

    def _after_commit(self, action: Any, *, on_abort: Any = None) -> None:  # pragma: no cover
        raise NotImplementedError  # KeyService's

    def principal(self, caller: Caller) -> Any:  # pragma: no cover
        raise NotImplementedError  # KeyService's

    def _require_keystore_owner(self, caller: Caller, operation: str) -> None:
        """Root, or the uid keyd runs as (who holds the keystore's files anyway); a
        SigV4-signed request is its signed user's, never a local uid's."""
        if self.principal(caller).uid not in (0, self.owner_uid) or caller.signed_user:
            raise AccessDeniedException(
                f"User: {self.principal(caller).arn} is not authorized to perform: "
                f"kmsfs:{operation}: only root and keyd's own user (uid {self.owner_uid}) "
                "may manage the keystore"
            )

    def _op_BackupKeystore(self, params: dict[str, Any], caller: Caller) -> dict[str, Any]:
        self._require_keystore_owner(caller, "BackupKeystore")
        destination = params.get("Destination")
        if not isinstance(destination, str) or not os.path.isabs(destination):
            raise ValidationException("Destination must be an absolute path")
        if "\0" in destination:
            raise ValidationException("Destination must not contain a NUL character")
        final = Path(destination)
        if final.exists() or final.is_symlink():
            raise ValidationException(f"{final} exists; a backup goes into a new directory")
        partial = final.with_name(f".{final.name}.partial-{uuid.uuid4().hex[:8]}")
        head = self.audit.head() if hasattr(self.audit, "head") else None
        try:
            manifest = write_backup(self.keystore, partial, head)
        except OSError as exc:
            raise ValidationException(f"cannot write the backup: {exc.strerror}") from None
        except KeystoreError as exc:  # the destination's parent is no directory, ...
            raise ValidationException(f"cannot write the backup: {exc}") from None

        def publish() -> None:
            os.rename(partial, final)
            _fsync_dir(final.parent)

        # renamed into place only once the audit record is on disk and the (empty)
        # transaction committed; removed if either fails
        self._after_commit(publish, on_abort=lambda: shutil.rmtree(partial, ignore_errors=True))
        return {
            "Destination": str(final),
            "DatabaseSha256": manifest["database"]["sha256"],
            "Manifest": manifest,
        }

    def _op_UpdateRootProtection(self, params: dict[str, Any], caller: Caller) -> dict[str, Any]:
        self._require_keystore_owner(caller, "UpdateRootProtection")
        text = params.get("Protection")
        if not isinstance(text, str):
            raise ValidationException("Protection is required")
        try:
            protection = check_root_protection(text)
        except ValueError as exc:
            raise ValidationException(f"Protection is not valid: {exc}") from None
        before = json.loads(self.keystore.meta("root_protection"))["kind"]
        with self.keystore.transaction() as db:
            self.keystore.set_root_protection(db, text)
        return {"PreviousProtectionKind": before, "ProtectionKind": protection["kind"]}

    def _op_RotateRootKey(self, params: dict[str, Any], caller: Caller) -> dict[str, Any]:
        """A new root key; every sealed record resealed under it, in one commit.

        The new root key must be wrapped for the root secret, which keyd does not keep:
        only ``kmsfs keyd rotate-root-key`` (keyd stopped; it sets
        :attr:`root_secret_for_rotation` on its own local service) can run it."""
        self._require_keystore_owner(caller, "RotateRootKey")
        source = self.root_secret_for_rotation
        if source is None:
            raise UnsupportedOperationException(
                "RotateRootKey needs the root secret: run 'kmsfs keyd rotate-root-key' "
                "with keyd stopped"
            )
        with self.keystore.transaction() as db:
            count = self.keystore.rotate_root_key(db, source)
        self._after_commit(
            self.keystore.root_key_committed, on_abort=self.keystore.root_key_aborted
        )
        return {"ResealedRecords": count}
