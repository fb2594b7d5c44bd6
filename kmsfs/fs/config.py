"""``kmsfs.conf``: what a cipher directory is, in one small JSON file at its root.

It holds no secret. Fields (version 2)::

    {
      "config_version": 2,
      "format_version": 1,                 # the file format of kmsfs/format/README.md
      "filesystem_id": "<32 hex digits>",  # bound into every file's encryption context
      "key_arn": "arn:aws:kms:...:key/<uuid>",   # the CMK that wraps every data key
      "chunk_size": 65536,
      "plaintext_names": false,            # names and symlink targets encrypted (default)
      "keyd_socket": "/run/kmsfs/keyd.sock",     # or null; only ever a hint (see below)
      "key_service": {"type": "aws", "region": "eu-west-1",   # only when the CMK is not
                      "endpoint_url": null, "profile": null}, # keyd's: see AwsKeyService
      "created": "2026-11-29T05:00:00Z",
      "metadata_key": {                    # a data key for the filesystem's own metadata
        "wrapped": "<base64 CiphertextBlob>",    # (names, symlinks, xattrs), wrapped by keyd
        "context": {"kmsfs:fs-id": ..., "kmsfs:purpose": "metadata"},
        "commitment": "<base64, 32 bytes>"       # HKDF(metadata key, "kmsfs.conf commitment")
      },
      "mac": "<base64 HMAC-SHA256>"        # over every other field, see below
    }

and, in a cipher directory that takes files written with a public key (``kmsfs init
--recipient-key``; format version 3, kmsfs/format/README.md *Recipient slots*)::

      "recipient_key": {
        "key_arn": "arn:aws:kms:...:key/<uuid>",  # an RSA ENCRYPT_DECRYPT CMK
        "public_key": "<base64 DER SubjectPublicKeyInfo>",   # its GetPublicKey output
        "encryption_algorithm": "RSAES_OAEP_SHA_256"
      }

sealed with the rest: a recipient slot is accepted only for that CMK, and only once the
config has been authenticated; without the field every recipient slot is refused.

Per-directory CMKs (``kmsfs key set``) add ``"key_bindings"``, sealed like every extra
field: see :mod:`kmsfs.fs.bindings`.

Sealing. Whoever can write the cipher directory can write this file, so nothing in it
is used before it is authenticated (a flipped ``plaintext_names`` sent new names to disk
in plaintext; a ``keyd_socket`` of the attacker's choosing handed the mount all-zero
keys). The metadata key is unwrapped first (Decrypt with the config's encryption
context and ``KeyId`` = ``key_arn``, through a keyd the mounting user chose: see
:func:`keyd_endpoint`), then two values derived from it with HKDF-SHA256 are checked
with ``hmac.compare_digest``:

- the **key commitment** (info ``kmsfs.conf commitment``): the unwrapped key is the one
  the file was sealed with (as a file header's commitment, after the AWS Encryption SDK);
- the **MAC** (info ``kmsfs.conf mac``): HMAC-SHA256 over :data:`SEAL_LABEL` and the
  canonical JSON (sorted keys, no spaces, ASCII) of every field above but ``mac`` as this
  kmsfs reads them, unknown extra fields included.

The key service. Without ``key_service`` the CMK is keyd's (the socket chosen as
:func:`keyd_endpoint` says). With ``{"type": "aws", ...}`` it lives in AWS KMS or another
KMS-compatible endpoint, called through botocore with the mounting user's own
credentials (never stored here): see :class:`AwsKeyService` and
:mod:`kmsfs.fs.keyservice`. The entry is sealed with everything else, and like
``keyd_socket`` it is a hint until then, which is why an endpoint URL it names is only
used when it is AWS's own or the mounting user names it too.

Version 1 files (made before sealing existed) have neither: they are refused until
their owner has looked at the settings and sealed them (``kmsfs seal CIPHERDIR``).
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import hmac
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from kmsfs.errors import KmsfsError, NotFoundException, UsageError
from kmsfs.format import DEFAULT_CHUNK_SIZE
from kmsfs.kms.paths import find_keyd

CONFIG_NAME = "kmsfs.conf"
CONFIG_VERSION = 2
#: the version of unsealed configs, read only to be sealed (``kmsfs seal``)
UNSEALED_CONFIG_VERSION = 1
FORMAT_VERSION = 1
FS_ID_CONTEXT_KEY = "kmsfs:fs-id"
PURPOSE_CONTEXT_KEY = "kmsfs:purpose"
SEAL_LABEL = b"kmsfs.conf seal v2\n"
_COMMITMENT_INFO = b"kmsfs.conf commitment"
_MAC_INFO = b"kmsfs.conf mac"
_FS_ID = re.compile(r"[0-9a-f]{32}")


class ConfigError(KmsfsError):
    """kmsfs.conf is missing, unreadable or not one this kmsfs understands."""

    exit_code = 8


class ConfigNotSealed(ConfigError):
    """kmsfs.conf predates sealing (version 1): its owner must check and seal it."""


class ConfigTampered(ConfigError):
    """kmsfs.conf failed authentication: a field, its MAC or its wrapped key was changed."""


RECIPIENT_KEY_FIELD = "recipient_key"
RECIPIENT_ALGORITHM = "RSAES_OAEP_SHA_256"


@dataclass(frozen=True)
class RecipientKey:
    """The CMK whose public key may write files into the cipher directory."""

    key_arn: str
    public_key_der: bytes
    encryption_algorithm: str = RECIPIENT_ALGORITHM

    def to_document(self) -> dict[str, str]:
        return {
            "key_arn": self.key_arn,
            "public_key": base64.b64encode(self.public_key_der).decode(),
            "encryption_algorithm": self.encryption_algorithm,
        }


_REGION = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
KEY_SERVICE_AWS = "aws"


@dataclass(frozen=True)
class AwsKeyService:
    """kmsfs.conf's ``key_service`` entry for a CMK in AWS KMS (or a KMS-compatible
    endpoint): the region, an optional endpoint URL and profile name. No credentials."""

    region: str
    endpoint_url: str | None = None
    profile: str | None = None

    def document(self) -> dict[str, Any]:
        return {
            "type": KEY_SERVICE_AWS,
            "region": self.region,
            "endpoint_url": self.endpoint_url,
            "profile": self.profile,
        }

    @classmethod
    def from_document(cls, document: object) -> AwsKeyService:
        """Parse the entry; ValueError names what is wrong."""
        if not isinstance(document, dict):
            raise ValueError("key_service is not an object")
        if document.get("type") != KEY_SERVICE_AWS:
            raise ValueError(f"key_service type {document.get('type')!r} is not 'aws'")
        unknown = set(document) - {"type", "region", "endpoint_url", "profile"}
        if unknown:
            raise ValueError(f"key_service has unknown fields {sorted(unknown)}")
        region = document.get("region")
        endpoint_url = document.get("endpoint_url")
        profile = document.get("profile")
        if not isinstance(region, str) or not _REGION.fullmatch(region):
            raise ValueError("key_service region is not a region name")
        if endpoint_url is not None and not (
            isinstance(endpoint_url, str) and endpoint_url.startswith(("https://", "http://"))
        ):
            raise ValueError("key_service endpoint_url is not an http(s) URL")
        if profile is not None and not (isinstance(profile, str) and profile):
            raise ValueError("key_service profile is not a name")
        return cls(region, endpoint_url, profile)


def key_arn_region(key_arn: str) -> str | None:
    """The region an ARN names (``arn:aws:kms:REGION:ACCOUNT:key/ID``), else None."""
    parts = key_arn.split(":", 5)
    if len(parts) == 6 and parts[0] == "arn" and parts[2] == "kms" and _REGION.fullmatch(parts[3]):
        return parts[3]
    return None


def _derive(metadata_key: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(metadata_key)


@dataclass
class FsConfig:
    filesystem_id: str
    key_arn: str
    chunk_size: int = DEFAULT_CHUNK_SIZE
    keyd_socket: str | None = None
    #: None: the CMK is keyd's
    key_service: AwsKeyService | None = None
    created: str = ""
    metadata_key_wrapped: bytes = b""
    plaintext_names: bool = False
    format_version: int = FORMAT_VERSION
    extra: dict[str, Any] = field(default_factory=dict)
    config_version: int = CONFIG_VERSION
    metadata_key_commitment: bytes = b""
    mac: bytes = b""
    #: where it was read from (for messages)
    source: Path | None = field(default=None, compare=False)

    @property
    def file_context(self) -> dict[str, str]:
        """What every file's encryption context holds besides its file id."""
        return {FS_ID_CONTEXT_KEY: self.filesystem_id}

    @property
    def metadata_key_context(self) -> dict[str, str]:
        return {FS_ID_CONTEXT_KEY: self.filesystem_id, PURPOSE_CONTEXT_KEY: "metadata"}

    @property
    def recipient_key(self) -> RecipientKey | None:
        """The recipient CMK (``recipient_key``), or None. Like every field, trust it only
        after :meth:`verify`."""
        document = self.extra.get(RECIPIENT_KEY_FIELD)
        if document is None:
            return None
        where = self.source or CONFIG_NAME
        try:
            if not isinstance(document, dict):
                raise ValueError("not an object")
            key_arn = document["key_arn"]
            algorithm = document.get("encryption_algorithm", RECIPIENT_ALGORITHM)
            if not isinstance(key_arn, str) or not key_arn:
                raise ValueError("key_arn is not a string")
            if algorithm != RECIPIENT_ALGORITHM:
                raise ValueError(f"encryption_algorithm must be {RECIPIENT_ALGORITHM}")
            public_key_der = base64.b64decode(document["public_key"], validate=True)
        except (ValueError, KeyError, TypeError, binascii.Error) as exc:
            raise ConfigError(f"{where}: recipient_key is not valid ({exc})") from None
        return RecipientKey(key_arn, public_key_der, algorithm)

    @property
    def recipient_key_arns(self) -> frozenset[str]:
        """The CMKs whose recipient slots this cipher directory accepts (zero or one)."""
        recipient = self.recipient_key
        return frozenset() if recipient is None else frozenset({recipient.key_arn})

    @property
    def sealed(self) -> bool:
        return self.config_version == CONFIG_VERSION

    def _document(self) -> dict[str, Any]:
        """Every field but the MAC, as written (and as authenticated)."""
        metadata_key: dict[str, Any] = {
            "wrapped": base64.b64encode(self.metadata_key_wrapped).decode(),
            "context": self.metadata_key_context,
        }
        if self.sealed:
            metadata_key["commitment"] = base64.b64encode(self.metadata_key_commitment).decode()
        document: dict[str, Any] = {
            "config_version": self.config_version,
            "format_version": self.format_version,
            "filesystem_id": self.filesystem_id,
            "key_arn": self.key_arn,
            "chunk_size": self.chunk_size,
            "plaintext_names": self.plaintext_names,
            "keyd_socket": self.keyd_socket,
            "created": self.created,
            "metadata_key": metadata_key,
            **self.extra,
        }
        if self.key_service is not None:  # absent for keyd: older configs' MACs still hold
            document["key_service"] = self.key_service.document()
        return document

    def _mac(self, metadata_key: bytes) -> bytes:
        canonical = json.dumps(
            self._document(), sort_keys=True, separators=(",", ":"), ensure_ascii=True
        ).encode("ascii")
        return hmac.new(
            _derive(metadata_key, _MAC_INFO), SEAL_LABEL + canonical, hashlib.sha256
        ).digest()

    def seal(self, metadata_key: bytes) -> None:
        """Make this a sealed (version 2) config under ``metadata_key`` (the unwrapped key
        of ``metadata_key_wrapped``); ``created`` is set now if empty."""
        if not self.created:
            self.created = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        self.config_version = CONFIG_VERSION
        self.metadata_key_commitment = _derive(metadata_key, _COMMITMENT_INFO)
        self.mac = self._mac(metadata_key)

    def verify(self, metadata_key: bytes) -> None:
        """Check the key commitment and the MAC; :class:`ConfigTampered` if either fails."""
        where = self.source or CONFIG_NAME
        if not self.sealed:
            raise ConfigNotSealed(unsealed_message(where))
        if not hmac.compare_digest(
            _derive(metadata_key, _COMMITMENT_INFO), self.metadata_key_commitment
        ):
            raise ConfigTampered(
                f"{where} failed authentication: the metadata key keyd unwrapped is not the "
                "one it was sealed with (its wrapped key or key was replaced); refusing it"
            )
        if not hmac.compare_digest(self._mac(metadata_key), self.mac):
            raise ConfigTampered(
                f"{where} failed authentication: its settings were changed after it was "
                "sealed; refusing it (restore kmsfs.conf from a backup)"
            )

    def to_json(self) -> str:
        document = self._document()
        if self.sealed:
            document["mac"] = base64.b64encode(self.mac).decode()
        return json.dumps(document, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str, where: Path) -> FsConfig:
        try:
            document = json.loads(text)
            if not isinstance(document, dict):
                raise ConfigError(f"{where} is not a valid kmsfs.conf (not a JSON object)")
            version = document.get("config_version")
            if version not in (CONFIG_VERSION, UNSEALED_CONFIG_VERSION) or isinstance(
                version, bool
            ):
                raise ConfigError(
                    f"{where}: config version {version!r} is not "
                    f"one this kmsfs reads ({CONFIG_VERSION})"
                )
            if document.get("format_version") != FORMAT_VERSION:
                raise ConfigError(
                    f"{where}: format version {document.get('format_version')!r} is not "
                    f"one this kmsfs reads ({FORMAT_VERSION})"
                )
            known = {
                "config_version",
                "format_version",
                "filesystem_id",
                "key_arn",
                "chunk_size",
                "plaintext_names",
                "keyd_socket",
                "key_service",
                "created",
                "metadata_key",
                "mac",
            }
            filesystem_id = document["filesystem_id"]
            chunk_size = document["chunk_size"]
            plaintext_names = document.get("plaintext_names", False)
            keyd_socket = document.get("keyd_socket")
            metadata_key = document["metadata_key"]
            if not isinstance(filesystem_id, str) or not _FS_ID.fullmatch(filesystem_id):
                raise ValueError("filesystem_id is not 32 hex digits")
            if not isinstance(document["key_arn"], str):
                raise ValueError("key_arn is not a string")
            if not isinstance(chunk_size, int) or isinstance(chunk_size, bool):
                raise ValueError("chunk_size is not a whole number")
            if not isinstance(plaintext_names, bool):
                raise ValueError("plaintext_names is not true or false")
            if keyd_socket is not None and not isinstance(keyd_socket, str):
                raise ValueError("keyd_socket is not a string")
            if not isinstance(metadata_key, dict):
                raise ValueError("metadata_key is not an object")
            key_service = document.get("key_service")
            if key_service is not None:
                key_service = AwsKeyService.from_document(key_service)
            config = cls(
                filesystem_id=filesystem_id,
                key_arn=document["key_arn"],
                chunk_size=chunk_size,
                plaintext_names=plaintext_names,
                keyd_socket=keyd_socket,
                key_service=key_service,
                created=str(document.get("created", "")),
                metadata_key_wrapped=base64.b64decode(metadata_key["wrapped"], validate=True),
                extra={k: v for k, v in document.items() if k not in known},
                config_version=version,
                source=where,
            )
            if version == CONFIG_VERSION:
                config.metadata_key_commitment = base64.b64decode(
                    metadata_key["commitment"], validate=True
                )
                config.mac = base64.b64decode(document["mac"], validate=True)
            return config
        except ConfigError:
            raise
        except (ValueError, KeyError, TypeError, binascii.Error) as exc:
            raise ConfigError(f"{where} is not a valid kmsfs.conf ({exc})") from None


def unwrap_refused(config: FsConfig, error: KmsfsError, where: str = "keyd") -> KmsfsError:
    """What a keyd's refusal to unwrap the metadata key means for the config.

    InvalidCiphertextException (the blob or its context, i.e. ``filesystem_id``, was
    changed) and IncorrectKeyException (``key_arn`` names another CMK than the blob's)
    are a config that fails authentication. NotFoundException means the key service in
    use (*where*) does not hold the filesystem's CMK at all: most often a lost or
    replaced keystore, said in those words with both names. Anything else is keyd's
    answer as it is.
    """
    if getattr(error, "aws_type", None) == "NotFoundException":
        message = getattr(error, "message", "") or str(error)
        if "deleted" in message:
            return NotFoundException(
                f"this filesystem's key {config.key_arn} was deleted from the keystore of "
                f"{where}: its files cannot be decrypted any more (only a backup of the "
                "keystore taken before the deletion, or an escrow copy of imported key "
                "material, holds it)"
            )
        return NotFoundException(
            f"the keystore of {where} does not hold this filesystem's key {config.key_arn}: "
            "it is not the keystore this cipher directory was made with (lost or "
            "replaced?). Restore that keystore from a backup ('kmsfs keyd restore', then "
            "serve it) or name the keyd that holds the key (--keyd-socket)"
        )
    if getattr(error, "aws_type", None) in (
        "InvalidCiphertextException",
        "IncorrectKeyException",
    ):
        return ConfigTampered(
            f"{config.source or CONFIG_NAME} failed authentication: keyd does not unwrap its "
            f"metadata key under its key_arn and filesystem_id ({error}); refusing it"
        )
    return error


def unsealed_message(where: Path | str) -> str:
    return (
        f"{where} is not sealed (it was made before kmsfs authenticated its settings): "
        f"check its settings and seal them with 'kmsfs seal {Path(where).parent}'"
    )


def keyd_endpoint(
    explicit: str | os.PathLike[str] | None,
    config: FsConfig,
    *,
    keyd_uid: str | int | None = None,
) -> Path:
    """The keyd socket to unwrap ``config``'s keys with, chosen by the mounting user.

    :func:`kmsfs.kms.paths.find_keyd`: the command line, then ``$KMSFS_KEYD_SOCKET``,
    then the socket kmsfs.conf names, then the per-user config, then the default. The
    socket kmsfs.conf names is a hint: it is not authenticated before a keyd has
    unwrapped the metadata key, and it passes the clients' checks as any other
    (:mod:`kmsfs.kms.trust`), so it can only ever name a keyd run by the user, root or
    a service account the user trusts -- and the seal names the socket too.
    """
    return find_keyd(explicit, hint=config.keyd_socket, keyd_uid=keyd_uid)


def config_path(cipherdir: Path) -> Path:
    return Path(cipherdir) / CONFIG_NAME


def load_config(cipherdir: Path, *, allow_unsealed: bool = False) -> FsConfig:
    """Read and parse kmsfs.conf (not yet authenticated: see :meth:`FsConfig.verify`).

    An unsealed (version 1) config is refused unless ``allow_unsealed`` (``kmsfs seal``).
    """
    path = config_path(cipherdir)
    if not Path(cipherdir).is_dir():
        raise UsageError(f"cipher directory {cipherdir} does not exist")
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(
            f"{cipherdir} is not a kmsfs cipher directory (no {CONFIG_NAME}; "
            "create one with 'kmsfs init')"
        ) from None
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    config = FsConfig.from_json(text, path)
    if not config.sealed and not allow_unsealed:
        raise ConfigNotSealed(unsealed_message(path))
    return config


def write_new_config(cipherdir: Path, config: FsConfig) -> None:
    """Write kmsfs.conf (new, or replacing the old one: atomically, fsync'ed)."""
    if not config.created:
        config.created = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    path = config_path(cipherdir)
    temporary = path.with_name(CONFIG_NAME + ".tmp")
    temporary.unlink(missing_ok=True)  # left by an interrupted write
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        os.write(fd, config.to_json().encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(temporary, path)
    directory = os.open(cipherdir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
