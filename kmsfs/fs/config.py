"""``kmsfs.conf``: what a cipher directory is, in one small JSON file at its root.

It holds no secret. Fields (version 1)::

    {
      "config_version": 1,
      "format_version": 1,                 # the file format of kmsfs/format/README.md
      "filesystem_id": "<32 hex digits>",  # bound into every file's encryption context
      "key_arn": "arn:aws:kms:...:key/<uuid>",   # the CMK that wraps every data key
      "chunk_size": 65536,
      "plaintext_names": false,            # names and symlink targets encrypted (default)
      "keyd_socket": "/run/kmsfs/keyd.sock",     # or null: the client's default
      "created": "2026-11-29T05:00:00Z",
      "metadata_key": {                    # a data key for the filesystem's own metadata
        "wrapped": "<base64 CiphertextBlob>",    # (names, symlinks, xattrs), wrapped by keyd
        "context": {"kmsfs:fs-id": ..., "kmsfs:purpose": "metadata"}
      }
    }
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kmsfs.errors import KmsfsError, UsageError
from kmsfs.format import DEFAULT_CHUNK_SIZE

CONFIG_NAME = "kmsfs.conf"
CONFIG_VERSION = 1
FORMAT_VERSION = 1
FS_ID_CONTEXT_KEY = "kmsfs:fs-id"
PURPOSE_CONTEXT_KEY = "kmsfs:purpose"


class ConfigError(KmsfsError):
    """kmsfs.conf is missing, unreadable or not one this kmsfs understands."""

    exit_code = 8


@dataclass
class FsConfig:
    filesystem_id: str
    key_arn: str
    chunk_size: int = DEFAULT_CHUNK_SIZE
    keyd_socket: str | None = None
    created: str = ""
    metadata_key_wrapped: bytes = b""
    plaintext_names: bool = False
    format_version: int = FORMAT_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def file_context(self) -> dict[str, str]:
        """What every file's encryption context holds besides its file id."""
        return {FS_ID_CONTEXT_KEY: self.filesystem_id}

    @property
    def metadata_key_context(self) -> dict[str, str]:
        return {FS_ID_CONTEXT_KEY: self.filesystem_id, PURPOSE_CONTEXT_KEY: "metadata"}

    def to_json(self) -> str:
        document = {
            "config_version": CONFIG_VERSION,
            "format_version": self.format_version,
            "filesystem_id": self.filesystem_id,
            "key_arn": self.key_arn,
            "chunk_size": self.chunk_size,
            "plaintext_names": self.plaintext_names,
            "keyd_socket": self.keyd_socket,
            "created": self.created,
            "metadata_key": {
                "wrapped": base64.b64encode(self.metadata_key_wrapped).decode(),
                "context": self.metadata_key_context,
            },
            **self.extra,
        }
        return json.dumps(document, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str, where: Path) -> FsConfig:
        try:
            document = json.loads(text)
            if document.get("config_version") != CONFIG_VERSION:
                raise ConfigError(
                    f"{where}: config version {document.get('config_version')!r} is not "
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
                "created",
                "metadata_key",
            }
            return cls(
                filesystem_id=str(document["filesystem_id"]),
                key_arn=str(document["key_arn"]),
                chunk_size=int(document["chunk_size"]),
                plaintext_names=bool(document.get("plaintext_names", False)),
                keyd_socket=document.get("keyd_socket"),
                created=str(document.get("created", "")),
                metadata_key_wrapped=base64.b64decode(document["metadata_key"]["wrapped"]),
                extra={k: v for k, v in document.items() if k not in known},
            )
        except ConfigError:
            raise
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"{where} is not a valid kmsfs.conf ({exc})") from None


def config_path(cipherdir: Path) -> Path:
    return Path(cipherdir) / CONFIG_NAME


def load_config(cipherdir: Path) -> FsConfig:
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
    return FsConfig.from_json(text, path)


def write_new_config(cipherdir: Path, config: FsConfig) -> None:
    """Write kmsfs.conf into an empty cipher directory (atomically, fsync'ed)."""
    if not config.created:
        config.created = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    path = config_path(cipherdir)
    temporary = path.with_name(CONFIG_NAME + ".tmp")
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
