"""kmsfs: a transparently encrypting filesystem with its own AWS-KMS-compatible key daemon."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__version__ = "0.1.0"


def open(  # noqa: A001 - deliberately shaped like the built-in open
    path: Any,
    mode: str = "rb",
    *,
    key: str | None = None,
    encryption_context: Mapping[str, str] | None = None,
    keyd_socket: str | None = None,
    chunk_size: int | None = None,
    **io_options: Any,
) -> Any:
    """Open a kmsfs ciphertext file as a plaintext file object, without mounting.

    Reads and writes the format of ``kmsfs/format/README.md`` directly; data keys come
    from keyd (``keyd_socket``, else as :func:`kmsfs.kms.paths.find_keyd` finds it).
    A new file needs ``key`` (a key id, ARN or ``alias/NAME``); ``encryption_context``
    entries are bound to a new file and required of an existing one. Supports the modes,
    buffering, seek, partial reads and writes, truncate and ``with`` of the built-in
    ``open`` (``io_options``: buffering, encoding, errors, newline).
    """
    from kmsfs.format import DEFAULT_CHUNK_SIZE, open_encrypted
    from kmsfs.kms.datakeys import KeydDataKeyProvider

    return open_encrypted(
        path,
        mode,
        key_provider=KeydDataKeyProvider(keyd_socket),
        key_id=key,
        encryption_context=encryption_context,
        chunk_size=chunk_size or DEFAULT_CHUNK_SIZE,
        **io_options,
    )
