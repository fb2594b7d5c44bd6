"""keyd's keystore: a directory holding a SQLite database and the audit log.

Layout of the keystore directory (mode 0700)::

    keystore.db     SQLite (WAL, synchronous=FULL, secure_delete): keys, versions, aliases,
                    tags, key policies, grants
    audit.log       hash-chained JSON lines (kmsfs.kms.audit)

Key material of every CMK version is stored only sealed with AES-256-GCM under the
keystore's *root key*, with the key id and version as associated data, so a sealed
record copied onto another key or version fails to open.

The root key is random (32 bytes). It is itself stored wrapped (AES-256-GCM) under a
key-encryption key (KEK) that comes either from a passphrase through Argon2id (its
parameters and salt stored beside the wrapped key; iterations calibrated at ``init``
so one derivation takes at least 0.25 s on this machine) or from a root key file
(32 random bytes, mode 0600) for unattended start. A wrong passphrase or key file
fails to unwrap the root key: :class:`~kmsfs.errors.WrongRootKey`.

Nothing here logs or raises with key material in the message.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import mmap
import os
import sqlite3
import stat
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.argon2 import Argon2id

from kmsfs.errors import (
    KeystoreError,
    KeystoreExists,
    KeystoreInsecure,
    KeystoreNotFound,
    WrongRootKey,
)
from kmsfs.kms.grants import Constraints, Grant

log = logging.getLogger("kmsfs.keystore")

DB_NAME = "keystore.db"
AUDIT_NAME = "audit.log"
SCHEMA_VERSION = 1
ROOT_KEY_BYTES = 32
MIN_KDF_SECONDS = 0.25

_SCHEMA = """
CREATE TABLE meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE keys (
    key_id TEXT PRIMARY KEY,
    description TEXT NOT NULL DEFAULT '',
    key_state TEXT NOT NULL,
    key_spec TEXT NOT NULL,
    key_usage TEXT NOT NULL,
    origin TEXT NOT NULL,
    creation_date REAL NOT NULL,
    deletion_date REAL,
    pending_window_days INTEGER,
    rotation_enabled INTEGER NOT NULL DEFAULT 0,
    rotation_period_days INTEGER,
    next_rotation_date REAL,
    current_version INTEGER NOT NULL,
    creator_uid INTEGER
);
CREATE TABLE key_versions (
    key_id TEXT NOT NULL REFERENCES keys(key_id),
    version INTEGER NOT NULL,
    sealed BLOB NOT NULL,
    created REAL NOT NULL,
    rotation_type TEXT,
    PRIMARY KEY (key_id, version)
);
CREATE TABLE aliases (
    alias_name TEXT PRIMARY KEY,
    key_id TEXT NOT NULL REFERENCES keys(key_id),
    creation_date REAL NOT NULL,
    last_updated REAL NOT NULL
);
CREATE INDEX aliases_by_key ON aliases(key_id);
CREATE TABLE tags (
    key_id TEXT NOT NULL REFERENCES keys(key_id),
    tag_key TEXT NOT NULL,
    tag_value TEXT NOT NULL,
    PRIMARY KEY (key_id, tag_key)
);
CREATE TABLE deleted_keys (key_id TEXT PRIMARY KEY, deletion_date REAL NOT NULL);
"""

# Key policies (issue 14), one row per key: the policy text exactly as PutKeyPolicy or
# CreateKey received it (GetKeyPolicy returns it unchanged, as AWS does). Added to
# schema version 1 without a version bump: Keystore.open creates the table in an older
# keystore, and a key without a row has keyd's fallback policy (see
# kmsfs.kms.service.KeyService.policy_text). An older kmsfs ignores the table.
_POLICY_SCHEMA = """
CREATE TABLE IF NOT EXISTS key_policies (
    key_id TEXT PRIMARY KEY REFERENCES keys(key_id),
    policy TEXT NOT NULL
)
"""

# Access keys for SigV4-signed callers (issue 16; kmsfs.kms.credentials), one row per
# access key id: the IAM user it signs for, its secret sealed under the root key (AAD:
# the access key id), Active or Inactive (IAM's words). Created on open for keystores
# made before it, as key_policies; an older kmsfs ignores the table.
_CREDENTIALS_SCHEMA = """
CREATE TABLE IF NOT EXISTS credentials (
    access_key_id TEXT PRIMARY KEY,
    user_name TEXT NOT NULL,
    sealed_secret BLOB NOT NULL,
    status TEXT NOT NULL,
    create_date REAL NOT NULL
)
"""

# Grants (issue 14; AWS KMS CreateGrant), one row per grant, created on open in older
# keystores like key_policies. operations is a JSON list, constraints the JSON
# GrantConstraints structure (NULL without constraints), grant_token the token
# CreateGrant first returned (a token names a grant; it grants nothing by itself).
_GRANT_SCHEMA = (
    """
CREATE TABLE IF NOT EXISTS grants (
    grant_id TEXT PRIMARY KEY,
    key_id TEXT NOT NULL REFERENCES keys(key_id),
    name TEXT NOT NULL DEFAULT '',
    grantee_principal TEXT NOT NULL,
    retiring_principal TEXT,
    operations TEXT NOT NULL,
    constraints TEXT,
    creation_date REAL NOT NULL,
    issuing_account TEXT NOT NULL,
    grant_token TEXT NOT NULL
)""",
    "CREATE INDEX IF NOT EXISTS grants_by_key ON grants(key_id, creation_date)",
    "CREATE INDEX IF NOT EXISTS grants_by_retiring ON grants(retiring_principal)",
)

# Imported key material (BYOK, Origin=EXTERNAL keys; kmsfs/kms/byok.py): how the current
# material expires, and a check value of the first material imported (SHA-256 of a
# label, the key id and the material: reveals nothing of 256 random bits), so that a
# reimport of different material is refused as AWS refuses it. Added like key_policies.
_IMPORT_SCHEMA = """
CREATE TABLE IF NOT EXISTS imported_key_material (
    key_id TEXT PRIMARY KEY REFERENCES keys(key_id),
    expiration_model TEXT,
    valid_to REAL,
    material_check BLOB NOT NULL
)
"""
#: columns holding secrets sealed with Keystore.seal_secret (resealed by rotate_root_key):
#: (table, id column, sealed column, label prefix)
_SEALED_SECRET_COLUMNS = (("credentials", "access_key_id", "sealed_secret", "credential:"),)
_EXTRA_SCHEMAS = (_POLICY_SCHEMA, _IMPORT_SCHEMA, _CREDENTIALS_SCHEMA, *_GRANT_SCHEMA)


# ------------------------------------------------------------------- root key
@dataclass(frozen=True)
class RootKeySource:
    """Where the key that unwraps the root key comes from: a passphrase or a key file."""

    passphrase: bytes | None = None
    key_file: Path | None = None

    def __post_init__(self) -> None:
        if (self.passphrase is None) == (self.key_file is None):
            raise ValueError("exactly one of passphrase and key_file is required")

    @classmethod
    def from_passphrase(cls, passphrase: str | bytes) -> RootKeySource:
        if isinstance(passphrase, str):
            passphrase = passphrase.encode()
        if not passphrase:
            raise KeystoreError("the passphrase is empty")
        return cls(passphrase=passphrase)

    @classmethod
    def from_key_file(cls, path: str | os.PathLike[str]) -> RootKeySource:
        return cls(key_file=Path(path))

    @property
    def kind(self) -> str:
        return "passphrase" if self.passphrase is not None else "key-file"


def create_root_key_file(path: Path) -> None:
    """Write 32 random bytes (base64, one line) to a new file with mode 0600.

    The file appears whole or not at all: written and fsynced under a temporary name,
    then linked to ``path`` (which must not exist: link fails rather than replace) and
    the folder fsynced, so a kill never leaves a truncated key file behind."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        try:
            os.write(fd, base64.b64encode(os.urandom(ROOT_KEY_BYTES)) + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        os.link(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_root_key_file(path: Path) -> bytes:
    """Read a root key file, refusing one that other users can read or write."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        raise KeystoreError(f"root key file {path} does not exist") from None
    except OSError as exc:
        raise KeystoreError(f"cannot open root key file {path}: {exc.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise KeystoreError(f"root key file {path} is not a regular file")
        if info.st_mode & 0o077:
            raise KeystoreInsecure(
                f"root key file {path} has mode {stat.S_IMODE(info.st_mode):04o}; "
                "it must be readable by its owner only (chmod 600)"
            )
        data = os.read(fd, 4096)
    finally:
        os.close(fd)
    try:
        key = base64.b64decode(data.strip(), validate=True)
    except ValueError:
        key = b""
    if len(key) != ROOT_KEY_BYTES:
        raise KeystoreError(f"root key file {path} does not hold a kmsfs root key")
    return key


def _calibrate_argon2(min_seconds: float) -> dict[str, int]:
    """Pick Argon2id parameters (128 MiB, 1 lane) whose derivation takes >= min_seconds."""
    params = {"memory_cost": 128 * 1024, "lanes": 1, "iterations": 3}
    while params["iterations"] < 64:
        # The fastest of two runs, held to a 20 % margin: a busy machine makes one
        # run look slower than a later unlock will be.
        fastest = min(_time_derivation(params) for _ in range(2))
        if fastest >= min_seconds * 1.2:
            break
        params["iterations"] += 1
    return params


def _time_derivation(params: dict[str, int]) -> float:
    started = time.perf_counter()
    _derive_kek(b"calibration", os.urandom(16), params)
    return time.perf_counter() - started


def _derive_kek(passphrase: bytes, salt: bytes, params: dict[str, int]) -> bytes:
    return Argon2id(
        salt=salt,
        length=32,
        iterations=params["iterations"],
        lanes=params["lanes"],
        memory_cost=params["memory_cost"],
    ).derive(passphrase)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(text: str) -> bytes:
    return base64.b64decode(text)


def _root_wrap_aad(keystore_id: str) -> bytes:
    return b"kmsfs-root-key-v1|" + keystore_id.encode()


def _material_aad(key_id: str, version: int) -> bytes:
    return f"kmsfs-cmk-material-v1|{key_id}|{version}".encode()


def protect_root_key(
    root_key: bytes, keystore_id: str, source: RootKeySource, kdf_seconds: float = MIN_KDF_SECONDS
) -> dict[str, Any]:
    """The ``root_protection`` setting: the root key wrapped under the key-encryption
    key of *source* (Argon2id of a passphrase, with fresh salt and calibrated cost; or
    a root key file, created if missing)."""
    protection: dict[str, Any] = {"kind": source.kind}
    if source.passphrase is not None:
        salt = os.urandom(16)
        params = _calibrate_argon2(kdf_seconds)
        kek = _derive_kek(source.passphrase, salt, params)
        protection.update(kdf="argon2id", salt=_b64(salt), **params)
    else:
        assert source.key_file is not None
        if not source.key_file.exists():
            create_root_key_file(source.key_file)
        kek = read_root_key_file(source.key_file)
    nonce = os.urandom(12)
    wrapped = AESGCM(kek).encrypt(nonce, root_key, _root_wrap_aad(keystore_id))
    protection.update(nonce=_b64(nonce), wrapped_root_key=_b64(wrapped))
    return protection


def check_root_protection(text: str) -> dict[str, Any]:
    """Parse a ``root_protection`` setting and check its shape (not its secret: that
    takes the passphrase or key file). Raises ValueError saying what is wrong."""
    try:
        protection = json.loads(text)
    except ValueError:
        raise ValueError("not JSON") from None
    if not isinstance(protection, dict):
        raise ValueError("not a JSON object")
    kind = protection.get("kind")
    if kind not in ("passphrase", "key-file"):
        raise ValueError("kind must be 'passphrase' or 'key-file'")
    try:
        nonce = base64.b64decode(protection["nonce"], validate=True)
        wrapped = base64.b64decode(protection["wrapped_root_key"], validate=True)
        if kind == "passphrase":
            if protection.get("kdf") != "argon2id":
                raise ValueError("kdf must be argon2id")
            if len(base64.b64decode(protection["salt"], validate=True)) < 16:
                raise ValueError("salt too short")
            for name, least in (("memory_cost", 8 * 1024), ("lanes", 1), ("iterations", 1)):
                value = protection[name]
                if not isinstance(value, int) or isinstance(value, bool) or value < least:
                    raise ValueError(f"{name} must be an integer >= {least}")
    except (KeyError, TypeError, binascii.Error) as exc:
        raise ValueError(f"missing or malformed field ({exc})") from None
    if len(nonce) != 12 or len(wrapped) != ROOT_KEY_BYTES + 16:
        raise ValueError("nonce or wrapped key has the wrong length")
    return protection


# --------------------------------------------------------------------- records
@dataclass
class KeyRecord:
    key_id: str
    description: str
    key_state: str
    key_spec: str
    key_usage: str
    origin: str
    creation_date: float
    deletion_date: float | None
    pending_window_days: int | None
    rotation_enabled: bool
    rotation_period_days: int | None
    next_rotation_date: float | None
    current_version: int
    creator_uid: int | None

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> KeyRecord:
        values = dict(row)
        values["rotation_enabled"] = bool(values["rotation_enabled"])
        return cls(**values)


@dataclass
class KeyVersion:
    key_id: str
    version: int
    created: float
    rotation_type: str | None


@dataclass
class AliasRecord:
    alias_name: str
    key_id: str
    creation_date: float
    last_updated: float


# -------------------------------------------------------------------- keystore
class Keystore:
    """The keystore directory, unsealed: its database and its root key in memory."""

    def __init__(self, path: Path, db: sqlite3.Connection, root_key: bytes) -> None:
        self.path = path
        self._db = db
        self._root_key = root_key
        self._root = AESGCM(root_key)
        #: the new root key of a rotate_root_key whose transaction has not committed
        self._pending_root: tuple[bytes, AESGCM] | None = None
        self.scrub_pending = False
        self._savepoints = 0  # names nested transactions (savepoints) uniquely
        #: the WAL index (keystore.db-shm), mapped read-only by change_stamp
        self._wal_index: mmap.mmap | None = None

    # ---------------------------------------------------------------- lifecycle
    @property
    def audit_path(self) -> Path:
        return self.path / AUDIT_NAME

    @staticmethod
    def exists(path: Path) -> bool:
        return (path / DB_NAME).exists()

    @classmethod
    def create(
        cls,
        path: Path,
        source: RootKeySource,
        *,
        region: str = "local",
        account: str = "000000000000",
        kdf_seconds: float = MIN_KDF_SECONDS,
    ) -> Keystore:
        """Create a new keystore at ``path`` (which must not hold one yet)."""
        path = Path(path)
        if cls.exists(path):
            raise KeystoreExists(f"a keystore already exists at {path}")
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(path, 0o700)
        if source.key_file is not None and not source.key_file.exists():
            create_root_key_file(source.key_file)

        keystore_id = str(uuid.uuid4())
        root_key = os.urandom(ROOT_KEY_BYTES)
        protection = protect_root_key(root_key, keystore_id, source, kdf_seconds)

        db = _connect(path / DB_NAME)
        try:
            db.execute("BEGIN")
            for statement in _SCHEMA.strip().split(";"):
                if statement.strip():
                    db.execute(statement)
            for schema in _EXTRA_SCHEMAS:
                db.execute(schema)
            meta = {
                "schema_version": str(SCHEMA_VERSION),
                "keystore_id": keystore_id,
                "region": region,
                "account": account,
                "root_protection": json.dumps(protection),
                "created": str(time.time()),
            }
            db.executemany("INSERT INTO meta(name, value) VALUES (?, ?)", meta.items())
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            db.close()
            for leftover in (DB_NAME, DB_NAME + "-wal", DB_NAME + "-shm"):
                (path / leftover).unlink(missing_ok=True)
            raise
        return cls(path, db, root_key)

    @classmethod
    def open(cls, path: Path, source: RootKeySource) -> Keystore:
        """Open and unseal an existing keystore."""
        path = Path(path)
        if not cls.exists(path):
            raise KeystoreNotFound(f"no keystore at {path} (create one with 'kmsfs keyd init')")
        try:
            db = _connect(path / DB_NAME)
        except sqlite3.DatabaseError as exc:
            raise KeystoreError(f"keystore {path} is not readable: {exc}") from None
        try:
            try:
                meta = dict(db.execute("SELECT name, value FROM meta").fetchall())
                meta["root_protection"]
            except (sqlite3.DatabaseError, KeyError):
                raise KeystoreError(
                    f"keystore {path} is damaged or incomplete (no settings table); "
                    "if 'kmsfs keyd init' was interrupted, remove it and run init again"
                ) from None
            if int(meta.get("schema_version", "0")) != SCHEMA_VERSION:
                raise KeystoreError(
                    f"keystore {path} has schema version {meta.get('schema_version')}, "
                    f"this kmsfs reads version {SCHEMA_VERSION}"
                )
            protection = json.loads(meta["root_protection"])
            if protection["kind"] != source.kind:
                raise WrongRootKey(
                    f"keystore {path} is protected by a {protection['kind']}, not a {source.kind}"
                )
            if source.passphrase is not None:
                params = {k: int(protection[k]) for k in ("memory_cost", "lanes", "iterations")}
                kek = _derive_kek(source.passphrase, _unb64(protection["salt"]), params)
            else:
                assert source.key_file is not None
                kek = read_root_key_file(source.key_file)
            try:
                root_key = AESGCM(kek).decrypt(
                    _unb64(protection["nonce"]),
                    _unb64(protection["wrapped_root_key"]),
                    _root_wrap_aad(meta["keystore_id"]),
                )
            except InvalidTag:
                what = "passphrase" if source.passphrase is not None else "root key file"
                raise WrongRootKey(f"wrong {what} for keystore {path}") from None
            # migration: keystores made before key policies get the (empty) table
            for schema in _EXTRA_SCHEMAS:
                db.execute(schema)
        except BaseException:
            db.close()
            raise
        return cls(path, db, root_key)

    def close(self) -> None:
        try:
            self.scrub()
        finally:
            if self._wal_index is not None:
                self._wal_index.close()
                self._wal_index = None
            self._db.close()

    def change_stamp(self) -> object:
        """A value that moves with every commit to the keystore, by this connection or
        any other (another process's admin command), read without a system call.

        SQLite's WAL index (``keystore.db-shm``, shared memory every connection maps)
        starts with the WAL index header, twice (2 x 48 bytes): a writer rewrites it at
        every commit (its change counter, last frame, checksums; new salts when the WAL
        restarts), before that commit returns. Comparing those 96 bytes is what
        ``PRAGMA data_version`` tells, without a statement and its two fcntl() locks;
        a header caught mid-update only differs, which is safe for a cache. Until the
        WAL index exists (or if it cannot be mapped), ``PRAGMA data_version`` is used.
        """
        db = self._db
        wal_index = self._wal_index
        if wal_index is None:
            # the statement first: this connection then has the WAL index open (and
            # holds the lock that keeps any other from truncating it) before it is mapped
            version = db.execute("PRAGMA data_version").fetchone()[0]
            self._map_wal_index()
            return (db.total_changes, version)
        return (db.total_changes, wal_index[:96])

    def _map_wal_index(self) -> mmap.mmap | None:
        try:
            fd = os.open(self.path / (DB_NAME + "-shm"), os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            if os.fstat(fd).st_size < 136:  # both header copies and the checkpoint info
                return None
            self._wal_index = mmap.mmap(fd, 136, mmap.MAP_SHARED, mmap.PROT_READ)
        except OSError:
            return None
        finally:
            os.close(fd)
        return self._wal_index

    def meta(self, name: str) -> str:
        row = self._db.execute("SELECT value FROM meta WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise KeystoreError(f"keystore is missing its {name!r} setting")
        return row[0]

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One atomic change: committed when the block ends, rolled back if it raises.

        Nested blocks are savepoints of the outer transaction: their changes commit
        only when the outermost block does (the key service wraps each state-changing
        operation in one, so that the change commits only after its audit record was
        written).
        """
        if self._db.in_transaction:
            self._savepoints += 1
            name = f"nested{self._savepoints}"
            self._db.execute(f"SAVEPOINT {name}")
            try:
                yield self._db
            except BaseException:
                self._db.execute(f"ROLLBACK TO {name}")
                self._db.execute(f"RELEASE {name}")
                raise
            else:
                self._db.execute(f"RELEASE {name}")
            return
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
            self._db.execute("COMMIT")
        except BaseException:
            # Also when COMMIT itself failed (disk full, I/O error): SQLite may leave
            # the transaction open, and every later BEGIN would fail.
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise

    # ------------------------------------------------------------- root secret
    def protection_for(self, source: RootKeySource, kdf_seconds: float = MIN_KDF_SECONDS) -> str:
        """This keystore's root key wrapped for *source*, as ``root_protection`` text:
        what ``kmsfs keyd passwd`` stores (with :meth:`set_root_protection`)."""
        return json.dumps(
            protect_root_key(self._root_key, self.meta("keystore_id"), source, kdf_seconds)
        )

    def set_root_protection(self, db: sqlite3.Connection, text: str) -> None:
        """Replace how the root key is stored (one row: atomic with its transaction).

        Only a wrapping of *this* root key belongs here (build it with
        :meth:`protection_for`); without the new secret nothing here can unwrap it, so
        only its shape is checked (:func:`check_root_protection`)."""
        check_root_protection(text)
        db.execute("UPDATE meta SET value = ? WHERE name = 'root_protection'", (text,))

    def rotate_root_key(self, db: sqlite3.Connection, source: RootKeySource) -> int:
        """A new root key: every sealed record is resealed under it and the new key is
        wrapped for *source*, all in the caller's transaction (one commit: a kill at any
        point leaves the old root key and records, or the new ones). Returns the number
        of records resealed. The new key is used only once the transaction commits."""
        new_key = os.urandom(ROOT_KEY_BYTES)
        new_root = AESGCM(new_key)
        rows = db.execute("SELECT key_id, version, sealed FROM key_versions").fetchall()
        for row in rows:
            key_id, version, sealed = row[0], row[1], bytes(row[2])
            aad = _material_aad(key_id, version)
            try:
                material = self._root.decrypt(sealed[:12], sealed[12:], aad)
            except InvalidTag:
                raise KeystoreError(
                    f"sealed material of key {key_id} version {version} failed authentication"
                ) from None
            nonce = os.urandom(12)
            db.execute(
                "UPDATE key_versions SET sealed = ? WHERE key_id = ? AND version = ?",
                (nonce + new_root.encrypt(nonce, material, aad), key_id, version),
            )
        # secrets of other tables sealed with seal_secret (access keys' secrets), each
        # bound to its label: (table, id column, sealed column, label prefix)
        for table, id_column, sealed_column, prefix in _SEALED_SECRET_COLUMNS:
            sealed_rows = db.execute(f"SELECT {id_column}, {sealed_column} FROM {table}").fetchall()
            for row_id, sealed in sealed_rows:
                aad = b"kmsfs-secret:" + (prefix + row_id).encode()
                sealed = bytes(sealed)
                try:
                    secret = self._root.decrypt(sealed[:12], sealed[12:], aad)
                except InvalidTag:
                    raise KeystoreError(
                        f"sealed secret {prefix}{row_id} failed authentication"
                    ) from None
                nonce = os.urandom(12)
                db.execute(
                    f"UPDATE {table} SET {sealed_column} = ? WHERE {id_column} = ?",
                    (nonce + new_root.encrypt(nonce, secret, aad), row_id),
                )
            rows = [*rows, *sealed_rows]
        protection = protect_root_key(new_key, self.meta("keystore_id"), source)
        db.execute(
            "UPDATE meta SET value = ? WHERE name = 'root_protection'", (json.dumps(protection),)
        )
        self._pending_root = (new_key, new_root)
        return len(rows)

    def root_key_aborted(self) -> None:
        """Forget the new root key of a :meth:`rotate_root_key` that was rolled back."""
        self._pending_root = None

    def root_key_committed(self) -> None:
        """Start using the root key of a committed :meth:`rotate_root_key`."""
        pending = self._pending_root
        if pending is not None:
            self._root_key, self._root = pending
            self._pending_root = None

    # ------------------------------------------------------------ key material
    def seal_material(self, key_id: str, version: int, material: bytes) -> bytes:
        nonce = os.urandom(12)
        return nonce + self._root.encrypt(nonce, material, _material_aad(key_id, version))

    def unseal_material(self, key_id: str, version: int) -> bytes | None:
        """The plaintext material of one key version, or None if that version is gone."""
        row = self._db.execute(
            "SELECT sealed FROM key_versions WHERE key_id = ? AND version = ?",
            (key_id, version),
        ).fetchone()
        if row is None:
            return None
        sealed = bytes(row[0])
        try:
            return self._root.decrypt(sealed[:12], sealed[12:], _material_aad(key_id, version))
        except InvalidTag:
            raise KeystoreError(
                f"sealed material of key {key_id} version {version} failed authentication"
            ) from None

    def seal_secret(self, label: str, secret: bytes) -> bytes:
        """Seal a secret other than key material (an access key's secret) under the root
        key; *label* (e.g. ``credential:<access key id>``) is the associated data."""
        nonce = os.urandom(12)
        return nonce + self._root.encrypt(nonce, secret, b"kmsfs-secret:" + label.encode())

    def unseal_secret(self, label: str, sealed: bytes) -> bytes:
        try:
            return self._root.decrypt(sealed[:12], sealed[12:], b"kmsfs-secret:" + label.encode())
        except InvalidTag:
            raise KeystoreError(f"sealed secret {label} failed authentication") from None

    def query(self, sql: str, parameters: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        """Rows of one read-only statement (for tables kept by other modules)."""
        return self._db.execute(sql, parameters).fetchall()

    # ------------------------------------------------------------------- keys
    def insert_key(self, db: sqlite3.Connection, record: KeyRecord, material: bytes | None) -> None:
        """Insert a key and its first version's material (None: a key for imported
        material, which has none until ImportKeyMaterial)."""
        values = dict(record.__dict__)
        values["rotation_enabled"] = int(record.rotation_enabled)
        columns = ", ".join(values)
        marks = ", ".join(f":{name}" for name in values)
        db.execute(f"INSERT INTO keys ({columns}) VALUES ({marks})", values)
        if material is not None:
            self.insert_version(db, record.key_id, 1, material, record.creation_date, None)

    def insert_version(
        self,
        db: sqlite3.Connection,
        key_id: str,
        version: int,
        material: bytes,
        created: float,
        rotation_type: str | None,
    ) -> None:
        db.execute(
            "INSERT INTO key_versions (key_id, version, sealed, created, rotation_type) "
            "VALUES (?, ?, ?, ?, ?)",
            (
                key_id,
                version,
                self.seal_material(key_id, version, material),
                created,
                rotation_type,
            ),
        )

    def get_key(self, key_id: str) -> KeyRecord | None:
        row = self._db.execute("SELECT * FROM keys WHERE key_id = ?", (key_id,)).fetchone()
        return KeyRecord.from_row(row) if row is not None else None

    def was_deleted(self, key_id: str) -> bool:
        row = self._db.execute("SELECT 1 FROM deleted_keys WHERE key_id = ?", (key_id,)).fetchone()
        return row is not None

    def list_keys(self) -> list[KeyRecord]:
        rows = self._db.execute("SELECT * FROM keys ORDER BY creation_date, key_id").fetchall()
        return [KeyRecord.from_row(row) for row in rows]

    def update_key(self, db: sqlite3.Connection, key_id: str, **changes: Any) -> None:
        if "rotation_enabled" in changes:
            changes["rotation_enabled"] = int(changes["rotation_enabled"])
        assignments = ", ".join(f"{name} = :{name}" for name in changes)
        db.execute(
            f"UPDATE keys SET {assignments} WHERE key_id = :key_id", {**changes, "key_id": key_id}
        )

    def list_versions(self, key_id: str) -> list[KeyVersion]:
        rows = self._db.execute(
            "SELECT key_id, version, created, rotation_type FROM key_versions "
            "WHERE key_id = ? ORDER BY version",
            (key_id,),
        ).fetchall()
        return [KeyVersion(**dict(row)) for row in rows]

    def destroy_key(self, db: sqlite3.Connection, key_id: str, when: float) -> None:
        """Remove a key, its material, aliases, tags, policy and grants; remember that it
        existed."""
        db.execute("DELETE FROM key_versions WHERE key_id = ?", (key_id,))
        db.execute("DELETE FROM aliases WHERE key_id = ?", (key_id,))
        db.execute("DELETE FROM tags WHERE key_id = ?", (key_id,))
        db.execute("DELETE FROM key_policies WHERE key_id = ?", (key_id,))
        db.execute("DELETE FROM imported_key_material WHERE key_id = ?", (key_id,))
        db.execute("DELETE FROM grants WHERE key_id = ?", (key_id,))
        db.execute("DELETE FROM keys WHERE key_id = ?", (key_id,))
        db.execute(
            "INSERT OR REPLACE INTO deleted_keys (key_id, deletion_date) VALUES (?, ?)",
            (key_id, when),
        )

    def scrub(self) -> bool:
        """Push deleted pages out of the WAL so removed material leaves the disk.

        A reader holding an old snapshot can block the checkpoint; then the scrub
        stays pending and is retried at the next maintenance pass and at close.
        Returns whether the WAL is now empty.
        """
        busy, _log_frames, _done = self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        self.scrub_pending = bool(busy)
        if busy:
            log.warning("keystore WAL checkpoint was blocked by a reader; will retry")
        return not busy

    # --------------------------------------------------------------- policies
    def get_policy(self, key_id: str) -> str | None:
        """The key's stored policy text, or None for a key made before key policies."""
        row = self._db.execute(
            "SELECT policy FROM key_policies WHERE key_id = ?", (key_id,)
        ).fetchone()
        return row[0] if row is not None else None

    def put_policy(self, db: sqlite3.Connection, key_id: str, policy: str) -> None:
        db.execute(
            "INSERT OR REPLACE INTO key_policies (key_id, policy) VALUES (?, ?)", (key_id, policy)
        )

    # ----------------------------------------------------------------- grants
    def insert_grant(self, db: sqlite3.Connection, grant: Grant) -> None:
        db.execute(
            "INSERT INTO grants (grant_id, key_id, name, grantee_principal, retiring_principal, "
            "operations, constraints, creation_date, issuing_account, grant_token) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                grant.grant_id,
                grant.key_id,
                grant.name,
                grant.grantee,
                grant.retiring,
                grant.operations_json(),
                grant.constraints_json(),
                grant.creation_date,
                grant.issuing_account,
                grant.token,
            ),
        )

    def list_grants(self, key_id: str) -> list[Grant]:
        """The key's grants, oldest first."""
        rows = self._db.execute(
            "SELECT * FROM grants WHERE key_id = ? ORDER BY creation_date, grant_id", (key_id,)
        ).fetchall()
        return [_grant_from_row(row) for row in rows]

    def list_retirable_grants(self, retiring_principal: str) -> list[Grant]:
        rows = self._db.execute(
            "SELECT * FROM grants WHERE retiring_principal = ? ORDER BY creation_date, grant_id",
            (retiring_principal,),
        ).fetchall()
        return [_grant_from_row(row) for row in rows]

    def list_grants_named(self, key_id: str, name: str) -> list[Grant]:
        rows = self._db.execute(
            "SELECT * FROM grants WHERE key_id = ? AND name = ? ORDER BY creation_date",
            (key_id, name),
        ).fetchall()
        return [_grant_from_row(row) for row in rows]

    def get_grant(self, key_id: str, grant_id: str) -> Grant | None:
        row = self._db.execute(
            "SELECT * FROM grants WHERE key_id = ? AND grant_id = ?", (key_id, grant_id)
        ).fetchone()
        return _grant_from_row(row) if row is not None else None

    def count_grants(self, db: sqlite3.Connection, key_id: str) -> int:
        return db.execute("SELECT COUNT(*) FROM grants WHERE key_id = ?", (key_id,)).fetchone()[0]

    def delete_grant(self, db: sqlite3.Connection, key_id: str, grant_id: str) -> bool:
        cursor = db.execute(
            "DELETE FROM grants WHERE key_id = ? AND grant_id = ?", (key_id, grant_id)
        )
        return cursor.rowcount > 0

    # ---------------------------------------------------------------- aliases
    def get_alias(self, alias_name: str) -> AliasRecord | None:
        row = self._db.execute(
            "SELECT * FROM aliases WHERE alias_name = ?", (alias_name,)
        ).fetchone()
        return AliasRecord(**dict(row)) if row is not None else None

    def list_aliases(self, key_id: str | None = None) -> list[AliasRecord]:
        if key_id is None:
            rows = self._db.execute("SELECT * FROM aliases ORDER BY alias_name").fetchall()
        else:
            rows = self._db.execute(
                "SELECT * FROM aliases WHERE key_id = ? ORDER BY alias_name", (key_id,)
            ).fetchall()
        return [AliasRecord(**dict(row)) for row in rows]

    # ------------------------------------------------------------------- tags
    def list_tags(self, key_id: str) -> list[tuple[str, str]]:
        rows = self._db.execute(
            "SELECT tag_key, tag_value FROM tags WHERE key_id = ? ORDER BY tag_key", (key_id,)
        ).fetchall()
        return [(row[0], row[1]) for row in rows]


def _grant_from_row(row: sqlite3.Row) -> Grant:
    constraints = json.loads(row["constraints"]) if row["constraints"] else None
    return Grant(
        grant_id=row["grant_id"],
        key_id=row["key_id"],
        name=row["name"],
        grantee=row["grantee_principal"],
        retiring=row["retiring_principal"],
        operations=tuple(json.loads(row["operations"])),
        constraints=Constraints.from_json(constraints),
        creation_date=row["creation_date"],
        issuing_account=row["issuing_account"],
        token=row["grant_token"],
    )


def _connect(db_path: Path) -> sqlite3.Connection:
    # isolation_level=None: we issue BEGIN/COMMIT ourselves (Keystore.transaction).
    existed = db_path.exists()
    if not existed:
        fd = os.open(db_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.close(fd)
    db = sqlite3.connect(db_path, isolation_level=None, check_same_thread=False)
    db.row_factory = sqlite3.Row
    db.execute("PRAGMA journal_mode=WAL")
    # FULL: a transaction that returned is on disk, even across power loss.
    db.execute("PRAGMA synchronous=FULL")
    # Deleted content (destroyed key material) is overwritten with zeros.
    db.execute("PRAGMA secure_delete=ON")
    db.execute("PRAGMA foreign_keys=ON")
    return db


def check_keystore_permissions(path: Path) -> None:
    """Refuse a keystore directory, or anything in it, that is not this user's or that
    group or others may read, write or search: the database (sealed key material:
    a copy allows an offline passphrase search), the audit log and its rotated files,
    keyd's log. As ssh refuses a private key other users can read, keyd refuses to
    start; ``keyd init`` and keyd create everything with mode 0700 / 0600.
    """
    try:
        items = [path, *sorted(path.iterdir())]
    except FileNotFoundError:
        raise KeystoreNotFound(f"no keystore at {path}") from None
    except OSError as exc:
        raise KeystoreError(f"cannot read keystore {path}: {exc.strerror}") from None
    for item in items:
        try:
            info = item.lstat()
        except FileNotFoundError:
            continue
        mode = stat.S_IMODE(info.st_mode)
        if mode & 0o077:
            private = "700" if stat.S_ISDIR(info.st_mode) else "600"
            raise KeystoreInsecure(
                f"refusing keystore {path}: {item} has mode {mode:04o} and is "
                f"{_access_by_others(mode)} by group or others; run 'chmod {private} {item}'"
            )
        if info.st_uid != os.geteuid():
            raise KeystoreInsecure(
                f"refusing keystore {path}: {item} belongs to uid {info.st_uid}, "
                f"not to this user (uid {os.geteuid()})"
            )


def _access_by_others(mode: int) -> str:
    if mode & 0o022:
        return "writable"
    if mode & 0o044:
        return "readable"
    return "searchable" if mode & 0o011 else "accessible"


def read_passphrase_file(path: str | os.PathLike[str]) -> bytes:
    """The passphrase in a file (its trailing newline removed), refusing a regular file
    that group or others may read or write -- as ssh refuses such a private key.
    A pipe (``--passphrase-file <(pass show kmsfs)``) or a device is read as it is."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise KeystoreError(f"cannot read passphrase file {path}: {exc.strerror}") from None
    try:
        info = os.fstat(fd)
        mode = stat.S_IMODE(info.st_mode)
        if stat.S_ISREG(info.st_mode) and mode & 0o077:
            raise KeystoreInsecure(
                f"passphrase file {path} has mode {mode:04o} and is "
                f"{_access_by_others(mode)} by group or others; run 'chmod 600 {path}'"
            )
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
    except OSError as exc:
        raise KeystoreError(f"cannot read passphrase file {path}: {exc.strerror}") from None
    finally:
        os.close(fd)
    return b"".join(chunks).rstrip(b"\r\n")
