"""Per-directory CMKs: a directory subtree bound to a CMK of its own (issue 17).

**Registry.** kmsfs.conf holds a field ``key_bindings``, sealed with every other field
(``config.py``: the MAC covers it, so removing, adding or swapping a binding makes the
config fail authentication and the mount and the offline tools refuse it)::

    "key_bindings": {
      "<dir id hex>": {                         # the bound directory's kmsfs.diriv
        "key_arn": "arn:aws:kms:...:key/<uuid>",
        "name_key": {"wrapped": "<base64 CiphertextBlob>",
                     "commitment": "<base64 HKDF(name key, 'kmsfs binding name key')>"}
      }
    }

No plaintext path is stored: a binding names its directory by its directory id. The name
key is a data key from GenerateDataKey under the bound CMK, with the encryption context
``{"kmsfs:fs-id": <fs id>, "kmsfs:purpose": "names", "kmsfs:dir-id": <dir id hex>}``, so a
name key copied to another binding or filesystem no longer unwraps; its commitment proves
that what keyd unwrapped is the key the binding was made with.

**Effective binding.** A directory's own entry, else its parent's effective binding, up
to the cipher directory's root, whose default is kmsfs.conf's ``key_arn`` and the metadata
key's name cipher (:mod:`kmsfs.fs.names`). Names and symlink targets of the entries of a
directory are encrypted under the name key of its effective binding; new files get their
data keys under its CMK. Files renamed or hard-linked across a boundary keep the data key
their header names (``kmsfs fsck`` and ``kmsfs key show`` report them; ``kmsfs rewrap``
moves them); directories and symlinks cannot cross one in place (EXDEV, as overlayfs
answers directory renames it cannot do in place: ``mv`` then copies, re-encrypting).

**Failures.** A name key that cannot be unwrapped (the CMK disabled, the caller refused:
EACCES; keyd unreachable: EIO) or that fails its commitment (EIO) makes its subtree fail;
there is never a fallback to the parent's key.
"""

from __future__ import annotations

import base64
import binascii
import errno
import hmac
import os
from collections.abc import Callable, Hashable
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from kmsfs.errors import KeydUnavailable, KMSError
from kmsfs.fs.config import (
    CONFIG_NAME,
    FS_ID_CONTEXT_KEY,
    PURPOSE_CONTEXT_KEY,
    ConfigError,
    FsConfig,
)
from kmsfs.fs.names import DIR_ID_SIZE, NameCipher

KEY_BINDINGS_FIELD = "key_bindings"
NAMES_PURPOSE = "names"
DIR_ID_CONTEXT_KEY = "kmsfs:dir-id"
_COMMITMENT_INFO = b"kmsfs binding name key"
#: where ``kmsfs key show`` says an unbound path's key comes from
DEFAULT_SOURCE = CONFIG_NAME
#: the AWS error types that mean "this caller may not use this key now" (EACCES)
_REFUSALS = {
    "AccessDeniedException",
    "DisabledException",
    "KMSInvalidStateException",
    "NotFoundException",
}
#: directories whose effective binding is remembered (the mount: by inode; offline tools:
#: by backing path); the map is emptied when it grows past this
MAX_CACHED_DIRECTORIES = 65536
MAX_DEPTH = 1 << 16


class BindingError(ConfigError):
    """A key binding cannot be made or used as asked."""


def name_key_commitment(name_key: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_COMMITMENT_INFO).derive(
        name_key
    )


def name_key_context(config: FsConfig, dir_id: bytes) -> dict[str, str]:
    return {
        FS_ID_CONTEXT_KEY: config.filesystem_id,
        PURPOSE_CONTEXT_KEY: NAMES_PURPOSE,
        DIR_ID_CONTEXT_KEY: dir_id.hex(),
    }


@dataclass(frozen=True)
class BindingRecord:
    """One entry of ``key_bindings`` as stored (authenticated with the config)."""

    dir_id: bytes
    key_arn: str
    wrapped: bytes
    commitment: bytes
    #: an offline binding of a non-empty directory not finished yet (bindings_offline.py)
    migrating: bool = False
    #: while migrating: the directory id of the binding the names come from (None:
    #: kmsfs.conf's)
    migrating_from: bytes | None = None

    def document(self) -> dict[str, object]:
        document: dict[str, object] = {
            "key_arn": self.key_arn,
            "name_key": {
                "wrapped": base64.b64encode(self.wrapped).decode(),
                "commitment": base64.b64encode(self.commitment).decode(),
            },
        }
        if self.migrating:
            document["migrating"] = {
                "from": None if self.migrating_from is None else self.migrating_from.hex()
            }
        return document


def read_records(config: FsConfig) -> dict[bytes, BindingRecord]:
    """The config's bindings by directory id; ConfigError if the field is malformed."""
    document = config.extra.get(KEY_BINDINGS_FIELD)
    if document is None:
        return {}
    where = config.source or CONFIG_NAME
    records: dict[bytes, BindingRecord] = {}
    try:
        if not isinstance(document, dict):
            raise ValueError("not an object")
        for dir_hex, entry in document.items():
            dir_id = bytes.fromhex(dir_hex)
            if len(dir_id) != DIR_ID_SIZE or dir_hex != dir_id.hex():
                raise ValueError(f"{dir_hex!r} is not a directory id")
            if not isinstance(entry, dict) or set(entry) - {"migrating"} != {
                "key_arn",
                "name_key",
            }:
                raise ValueError(f"entry {dir_hex} is not key_arn and name_key")
            migrating = "migrating" in entry
            migrating_from = None
            if migrating:
                source = entry["migrating"]
                if not isinstance(source, dict) or set(source) != {"from"}:
                    raise ValueError(f"entry {dir_hex}: migrating is not an object with from")
                if source["from"] is not None:
                    migrating_from = bytes.fromhex(source["from"])
                    if len(migrating_from) != DIR_ID_SIZE:
                        raise ValueError(f"entry {dir_hex}: migrating from no directory id")
            key_arn = entry["key_arn"]
            name_key = entry["name_key"]
            if not isinstance(key_arn, str) or not key_arn:
                raise ValueError(f"entry {dir_hex}: key_arn is not a string")
            if not isinstance(name_key, dict) or set(name_key) != {"wrapped", "commitment"}:
                raise ValueError(f"entry {dir_hex}: name_key is not wrapped and commitment")
            records[dir_id] = BindingRecord(
                dir_id,
                key_arn,
                base64.b64decode(name_key["wrapped"], validate=True),
                base64.b64decode(name_key["commitment"], validate=True),
                migrating,
                migrating_from,
            )
    except (ValueError, TypeError, binascii.Error) as exc:
        raise ConfigError(f"{where}: key_bindings is not valid ({exc})") from None
    return records


def store_records(config: FsConfig, records: dict[bytes, BindingRecord]) -> None:
    """Put ``records`` in the config (the caller re-seals and writes it)."""
    if records:
        config.extra[KEY_BINDINGS_FIELD] = {
            dir_id.hex(): record.document() for dir_id, record in sorted(records.items())
        }
    else:
        config.extra.pop(KEY_BINDINGS_FIELD, None)


@dataclass(eq=False)
class Binding:
    """What protects a subtree: a CMK and the cipher of its names (None: plaintext names).

    ``failure`` (an errno and a message) when the name key could not be had: every use of
    the subtree's names then fails with it.
    """

    key_arn: str
    names: NameCipher | None
    dir_id: bytes | None = None  # None: the filesystem's default (kmsfs.conf)
    failure: tuple[int, str] | None = None
    #: the name key as kmsfs.conf stores it (wrapped by key_arn): what a forwarded caller
    #: must be allowed to Decrypt to use the subtree's names (key_xattr.check_caller)
    wrapped: bytes | None = None

    @property
    def source(self) -> str:
        return DEFAULT_SOURCE if self.dir_id is None else self.dir_id.hex()

    def name_cipher(self) -> NameCipher | None:
        if self.failure is not None:
            raise OSError(*self.failure)
        return self.names


def failure_of(error: Exception, record: BindingRecord) -> tuple[int, str]:
    """What a failed name-key unwrap makes the subtree answer (no key material in it)."""
    what = f"the name key of the directory bound to {record.key_arn}"
    if isinstance(error, KMSError) and error.aws_type in _REFUSALS:
        return errno.EACCES, f"{what} was refused ({error.aws_type})"
    if isinstance(error, KeydUnavailable):
        return errno.EIO, f"{what} could not be unwrapped: key service unreachable"
    if isinstance(error, KMSError) and error.aws_type in (
        "InvalidCiphertextException",
        "IncorrectKeyException",
    ):
        return errno.EIO, f"{what} failed authentication ({error.aws_type})"
    return errno.EIO, f"{what} could not be unwrapped ({type(error).__name__})"


def binding_from_key(record: BindingRecord, name_key: bytes) -> Binding:
    """The binding, once its name key is unwrapped; a failed commitment fails the subtree."""
    if not hmac.compare_digest(name_key_commitment(name_key), record.commitment):
        return Binding(
            record.key_arn,
            None,
            record.dir_id,
            (errno.EIO, f"the name key bound to {record.key_arn} fails its commitment"),
        )
    return Binding(record.key_arn, NameCipher(name_key), record.dir_id, wrapped=record.wrapped)


def _records_to_use(config: FsConfig, allow_migrating: bool) -> dict[bytes, BindingRecord]:
    records = read_records(config)
    if not allow_migrating and any(record.migrating for record in records.values()):
        raise BindingError(
            f"{config.source or CONFIG_NAME}: a directory's names are being moved to a new "
            "key binding (an interrupted kmsfs key set --cipherdir): run the same kmsfs key "
            "set again to finish it"
        )
    return records


def unlock_records(
    client, config: FsConfig, *, allow_migrating: bool = False
) -> dict[bytes, Binding]:
    """Offline tools: every binding's name key unwrapped (blocking client)."""
    bindings: dict[bytes, Binding] = {}
    for dir_id, record in _records_to_use(config, allow_migrating).items():
        try:
            name_key = client.decrypt(
                record.wrapped,
                encryption_context=name_key_context(config, dir_id),
                key_id=record.key_arn,
            )["Plaintext"]
        except (KMSError, KeydUnavailable) as error:
            bindings[dir_id] = Binding(record.key_arn, None, dir_id, failure_of(error, record))
            continue
        bindings[dir_id] = binding_from_key(record, name_key)
    return bindings


async def unlock_records_async(client, config: FsConfig) -> dict[bytes, Binding]:
    """The mount: every binding's name key unwrapped (trio client)."""
    bindings: dict[bytes, Binding] = {}
    for dir_id, record in _records_to_use(config, False).items():
        try:
            name_key = (
                await client.decrypt(
                    record.wrapped,
                    encryption_context=name_key_context(config, dir_id),
                    key_id=record.key_arn,
                )
            )["Plaintext"]
        except (KMSError, KeydUnavailable) as error:
            bindings[dir_id] = Binding(record.key_arn, None, dir_id, failure_of(error, record))
            continue
        bindings[dir_id] = binding_from_key(record, name_key)
    return bindings


def new_record(
    dir_id: bytes,
    key_arn: str,
    response: dict,
    *,
    migrating: bool = False,
    migrating_from: bytes | None = None,
) -> BindingRecord:
    """The record of a binding from GenerateDataKey's answer (``response``)."""
    return BindingRecord(
        dir_id,
        response.get("KeyId") or key_arn,
        response["CiphertextBlob"],
        name_key_commitment(response["Plaintext"]),
        migrating,
        migrating_from,
    )


class BindingMap:
    """The bindings of one cipher directory, and the effective binding of a directory.

    ``parent_of(directory, cache_key)`` gives the parent directory (path and cache key)
    or None at the root; the mount's walks up its inode table, the offline tools' takes
    the backing path's dirname.
    """

    def __init__(self, default: Binding, bound: dict[bytes, Binding] | None = None) -> None:
        self.default = default
        self.bound: dict[bytes, Binding] = dict(bound or {})
        self._effective: dict[Hashable, Binding] = {}

    def __bool__(self) -> bool:
        return bool(self.bound)

    def add(self, binding: Binding) -> None:
        assert binding.dir_id is not None
        self.bound[binding.dir_id] = binding
        self._effective.clear()

    def remove(self, dir_id: bytes) -> None:
        self.bound.pop(dir_id, None)
        self._effective.clear()

    def forget(self, cache_key: Hashable) -> None:
        self._effective.pop(cache_key, None)

    def effective(
        self,
        directory: bytes,
        cache_key: Hashable | None,
        dir_id_of: Callable[[bytes, Hashable | None], bytes],
        parent_of: Callable[[bytes, Hashable | None], tuple[bytes, Hashable | None] | None],
    ) -> Binding:
        if not self.bound:
            return self.default
        chain: list[Hashable] = []
        current: tuple[bytes, Hashable | None] | None = (directory, cache_key)
        result = self.default
        while current is not None:
            path, key = current
            remembered_as = path if key is None else key
            cached = self._effective.get(remembered_as)
            if cached is not None:
                result = cached
                break
            chain.append(remembered_as)
            own = self.bound.get(dir_id_of(path, key))
            if own is not None:
                result = own
                break
            if len(chain) > MAX_DEPTH:
                raise OSError(errno.ELOOP, "directory nesting too deep")
            current = parent_of(path, key)
        if len(self._effective) + len(chain) > MAX_CACHED_DIRECTORIES:
            self._effective.clear()
        for remembered_as in chain:
            self._effective[remembered_as] = result
        return result


def offline_parent(root: bytes) -> Callable[[bytes, Hashable | None], tuple[bytes, None] | None]:
    """``parent_of`` for real backing paths below ``root`` (offline tools)."""

    def parent_of(directory: bytes, _cache_key: Hashable | None) -> tuple[bytes, None] | None:
        if os.path.normpath(directory) == os.path.normpath(root):
            return None
        return os.path.dirname(directory.rstrip(b"/")), None

    return parent_of
