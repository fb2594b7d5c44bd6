"""The kmsfs on-disk format: pure bytes, keys and file descriptors (no FUSE, no sockets).

The specification is README.md in this folder. Entry points:

- :class:`EncryptedFile` — random-access engine over a backing fd (the FUSE layer's core);
- :func:`encrypt_stream` / :func:`decrypt_stream` — pipes, bounded memory;
- :func:`open_encrypted` — Python file objects (``kmsfs.open``);
- :func:`inspect` / :func:`verify` / :func:`repair` — offline tools;
- :func:`rewrap` — replace a file's wrapped data key in place, crash-safely;
- :func:`plaintext_size` / :func:`ciphertext_size` — sizes without a key;
- :class:`DataKeyProvider` — the protocol through which the format gets its keys.
"""

from kmsfs.format.file import EncryptedFile
from kmsfs.format.header import rewrap
from kmsfs.format.io import open_encrypted
from kmsfs.format.keys import FILE_ID_CONTEXT_KEY, DataKeyProvider
from kmsfs.format.offsets import (
    CHUNK_OVERHEAD,
    DEFAULT_CHUNK_SIZE,
    HEADER_SIZE,
    ciphertext_size,
    plaintext_size,
)
from kmsfs.format.stream import decrypt_stream, encrypt_stream
from kmsfs.format.tools import HeaderInfo, VerifyReport, inspect, repair, verify

__all__ = [
    "CHUNK_OVERHEAD",
    "DEFAULT_CHUNK_SIZE",
    "FILE_ID_CONTEXT_KEY",
    "HEADER_SIZE",
    "DataKeyProvider",
    "EncryptedFile",
    "HeaderInfo",
    "VerifyReport",
    "ciphertext_size",
    "decrypt_stream",
    "encrypt_stream",
    "inspect",
    "open_encrypted",
    "plaintext_size",
    "repair",
    "rewrap",
    "verify",
]
