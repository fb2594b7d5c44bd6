"""Progress bars for long commands (encrypt, decrypt, fsck --verify, ls -R): tqdm on
stderr with rate and ETA when stderr is a terminal, nothing otherwise; ``--progress`` and
``-q/--quiet`` force it either way (as ``rsync --progress`` / ``curl -s`` do)."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, BinaryIO


def add_progress_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--progress",
        action="store_true",
        default=None,
        help="show a progress bar on stderr even when it is not a terminal",
    )
    group.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        help="no progress bar (default when stderr is not a terminal)",
    )


def wanted(args: argparse.Namespace) -> bool:
    if getattr(args, "quiet", False):
        return False
    if getattr(args, "progress", None):
        return True
    return sys.stderr.isatty()


def bar(
    args: argparse.Namespace,
    *,
    total: int | None,
    what: str,
    unit: str = "B",
    enabled: bool = True,
) -> Any:
    """A tqdm bar, or a bar that shows nothing (tqdm not even imported: its import costs
    a few MiB of memory that a piped ``encrypt - -`` does not need)."""
    if not (enabled and wanted(args)):
        return _NoBar()
    from tqdm import tqdm

    columns, rows = _terminal_size()
    return tqdm(
        total=total,
        desc=what,
        unit=unit,
        unit_scale=unit == "B",
        unit_divisor=1024 if unit == "B" else 1000,
        file=sys.stderr,
        leave=True,
        ncols=columns,
        nrows=rows,
    )


class _NoBar:
    def update(self, count: int) -> None:
        pass

    def __enter__(self) -> _NoBar:
        return self

    def __exit__(self, *exc_info: object) -> None:
        pass


def _terminal_size() -> tuple[int, int]:
    """stderr's terminal size; 80x24 where it reports none (0x0: a new pseudo-terminal
    nobody sized, a pipe), where tqdm would draw nothing at all."""
    try:
        size = os.get_terminal_size(sys.stderr.fileno())
    except (OSError, ValueError, AttributeError):
        return 80, 24
    return size.columns or 80, size.lines or 24


def stream_size(stream: BinaryIO) -> int | None:
    """The size of a regular file behind ``stream`` (None for a pipe or terminal)."""
    try:
        info = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):
        return None
    import stat

    return info.st_size if stat.S_ISREG(info.st_mode) else None


class CountingReader:
    """``src`` for encrypt_stream/decrypt_stream that moves ``progress`` by what is read."""

    def __init__(self, src: BinaryIO, progress: Any) -> None:
        self._src = src
        self._progress = progress

    def readinto(self, view: memoryview) -> int | None:
        readinto = getattr(self._src, "readinto", None)
        if readinto is None:
            data = self._src.read(len(view))
            if data is None:
                return None
            view[: len(data)] = data
            count: int | None = len(data)
        else:
            count = readinto(view)
        if count:
            self._progress.update(count)
        return count

    def read(self, size: int = -1) -> bytes | None:
        data = self._src.read(size)
        if data:
            self._progress.update(len(data))
        return data
