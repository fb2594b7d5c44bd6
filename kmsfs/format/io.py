"""Python file objects on ciphertext files: :func:`open_encrypted`.

For applications and backup tools that cannot mount: ``open_encrypted(path, "r+b",
key_provider=…)`` returns the usual ``io`` stack — a raw object over the random-access
engine inside a ``BufferedReader`` / ``BufferedWriter`` / ``BufferedRandom`` (and a
``TextIOWrapper`` in text mode) — so ``seek``, partial reads and writes, ``truncate``,
``readinto``, iteration and ``with`` all behave as for a plain file.

``fileno()`` is deliberately unsupported: it would hand out the ciphertext's descriptor
to code that would then read or ``sendfile`` ciphertext as if it were the content.
Use ``fsync()`` on the returned binary object for durability.
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping
from typing import Any

from kmsfs.format.file import EncryptedFile
from kmsfs.format.keys import DataKeyProvider
from kmsfs.format.offsets import DEFAULT_CHUNK_SIZE

StrPath = str | os.PathLike[str]


class EncryptedRawIO(io.RawIOBase):
    """Unbuffered file object over an :class:`EncryptedFile`; owns the backing fd."""

    def __init__(
        self, engine: EncryptedFile, *, name: Any, mode: str, readable: bool, append: bool
    ) -> None:
        super().__init__()
        self._engine = engine
        self._readable = readable
        self._append = append
        self._position = engine.size if append else 0
        self.name = name
        self.mode = mode

    @property
    def engine(self) -> EncryptedFile:
        return self._engine

    def readable(self) -> bool:
        self._checkClosed()  # type: ignore[attr-defined]
        return self._readable

    def writable(self) -> bool:
        self._checkClosed()  # type: ignore[attr-defined]
        return self._engine.writable

    def seekable(self) -> bool:
        self._checkClosed()  # type: ignore[attr-defined]
        return True

    def fileno(self) -> int:
        raise io.UnsupportedOperation("an encrypted file does not expose its ciphertext fd")

    def readinto(self, buffer: Any) -> int:
        self._checkClosed()  # type: ignore[attr-defined]
        if not self._readable:
            raise io.UnsupportedOperation("not readable")
        count = self._engine.readinto(self._position, buffer)
        self._position += count
        return count

    def readall(self) -> bytes:
        self._checkClosed()  # type: ignore[attr-defined]
        if not self._readable:
            raise io.UnsupportedOperation("not readable")
        data = self._engine.read(self._position, max(0, self._engine.size - self._position))
        self._position += len(data)
        return data

    def write(self, data: Any) -> int:
        self._checkClosed()  # type: ignore[attr-defined]
        if not self._engine.writable:
            raise io.UnsupportedOperation("not writable")
        if self._append:
            self._position = self._engine.size
        count = self._engine.write(self._position, data)
        self._position += count
        return count

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self._checkClosed()  # type: ignore[attr-defined]
        if whence == io.SEEK_SET:
            position = offset
        elif whence == io.SEEK_CUR:
            position = self._position + offset
        elif whence == io.SEEK_END:
            position = self._engine.size + offset
        else:
            raise ValueError(f"invalid whence ({whence})")
        if position < 0:
            raise OSError(22, "Invalid argument: negative seek position")
        self._position = position
        return position

    def tell(self) -> int:
        self._checkClosed()  # type: ignore[attr-defined]
        return self._position

    def truncate(self, size: int | None = None) -> int:
        self._checkClosed()  # type: ignore[attr-defined]
        if not self._engine.writable:
            raise io.UnsupportedOperation("not writable")
        if size is None:
            size = self._position
        self._engine.truncate(size)
        return size

    def flush(self) -> None:
        if not self.closed:
            self._engine.flush()

    def fsync(self) -> None:
        """Write everything held and fsync the ciphertext file."""
        self._checkClosed()  # type: ignore[attr-defined]
        self._engine.fsync()

    def close(self) -> None:
        if self.closed:
            return
        try:
            super().close()  # flush()
        finally:
            try:
                self._engine.close()
            finally:
                os.close(self._engine.fd)


class _FsyncMixin:
    raw: EncryptedRawIO

    def flush(self) -> None:
        """Write the buffer to the engine and the engine's held tail to the backing file.

        (``io.BufferedWriter.flush`` alone never calls ``raw.flush``.)
        """
        super().flush()  # type: ignore[misc]
        if not self.raw.closed:
            self.raw.flush()

    def fsync(self) -> None:
        """Flush the buffer and the engine, then fsync the ciphertext file."""
        self.flush()  # type: ignore[attr-defined]
        self.raw.fsync()


class EncryptedBufferedReader(_FsyncMixin, io.BufferedReader):
    pass


class EncryptedBufferedWriter(_FsyncMixin, io.BufferedWriter):
    pass


class EncryptedBufferedRandom(_FsyncMixin, io.BufferedRandom):
    pass


def _parse_mode(mode: str) -> tuple[str, bool, bool]:
    """(kind r/w/x/a, plus, text) from an open() mode string."""
    letters = set(mode)
    if len(mode) != len(letters) or not letters <= set("rwxa+bt"):
        raise ValueError(f"invalid mode: {mode!r}")
    kinds = letters & set("rwxa")
    if len(kinds) != 1 or ("b" in letters and "t" in letters):
        raise ValueError(f"invalid mode: {mode!r}")
    return kinds.pop(), "+" in letters, "b" not in letters


def open_encrypted(
    path: StrPath,
    mode: str = "rb",
    *,
    key_provider: DataKeyProvider,
    key_id: str | None = None,
    encryption_context: Mapping[str, str] | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    buffering: int = -1,
    encoding: str | None = None,
    errors: str | None = None,
    newline: str | None = None,
) -> Any:
    """Open a ciphertext file as a plaintext file object, like the built-in ``open``.

    Modes: ``r``, ``w``, ``x``, ``a``, each with ``+`` and ``b``/``t``. A new or emptied
    file gets its header (and a data key from ``key_provider.generate_data_key(key_id,
    context)``) with its first byte, so ``w``/``x`` need ``key_id``. For an existing
    file, ``encryption_context`` entries must be stored in its header; for a new one they
    are stored (with ``kmsfs:file-id``, which the format adds). ``chunk_size`` applies to
    new files only. Returns ``EncryptedBufferedReader`` / ``EncryptedBufferedWriter`` /
    ``EncryptedBufferedRandom`` (or the raw object with ``buffering=0``, or a
    ``TextIOWrapper`` in text mode).
    """
    kind, plus, text = _parse_mode(mode)
    if kind in "wx" and key_id is None:
        raise ValueError(f"mode {mode!r} creates a file: key_id is needed")
    if not text and (encoding is not None or errors is not None or newline is not None):
        raise ValueError("encoding, errors and newline are for text mode only")
    if buffering == 0 and text:
        raise ValueError("can't have unbuffered text I/O")
    flags = os.O_CLOEXEC
    if kind == "r":
        flags |= os.O_RDWR if plus else os.O_RDONLY
    else:  # the engine reads back partial chunks, so writers need O_RDWR
        flags |= os.O_RDWR | os.O_CREAT
        flags |= {"w": os.O_TRUNC, "x": os.O_EXCL, "a": 0}[kind]
    readable = kind == "r" or plus
    writable = kind != "r" or plus
    fd = os.open(path, flags, 0o666)
    try:
        engine = EncryptedFile.open(
            fd,
            key_provider=key_provider,
            key_id=key_id,
            encryption_context=encryption_context,
            chunk_size=chunk_size,
            writable=writable,
        )
    except BaseException:
        os.close(fd)
        raise
    raw = EncryptedRawIO(
        engine, name=path, mode=mode.replace("t", ""), readable=readable, append=kind == "a"
    )
    if buffering == 0:
        return raw
    line_buffering = buffering == 1 and text
    buffer_size = buffering if buffering > 1 else max(engine.chunk_size, io.DEFAULT_BUFFER_SIZE)
    buffered: io.BufferedIOBase
    if readable and writable:
        buffered = EncryptedBufferedRandom(raw, buffer_size)
    elif writable:
        buffered = EncryptedBufferedWriter(raw, buffer_size)
    else:
        buffered = EncryptedBufferedReader(raw, buffer_size)
    if not text:
        return buffered
    wrapper = io.TextIOWrapper(
        buffered, encoding=encoding, errors=errors, newline=newline, line_buffering=line_buffering
    )
    wrapper.mode = mode  # type: ignore[misc]
    return wrapper
