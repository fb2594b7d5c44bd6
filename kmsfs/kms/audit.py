"""keyd's audit log: one hash-chained JSON line per request, allowed or refused.

The service layer builds a CloudTrail-shaped KMS event (``eventTime``, ``eventName``,
``userIdentity``, ``requestParameters``, ``errorCode``...). This module adds the
integrity chain and writes it; it also reads the log back (``verify``, ``iter_events``,
``tail``) for ``kmsfs keyd audit verify|tail``.

On-disk format
--------------
One line per event, UTF-8 (in fact pure ASCII: ``ensure_ascii=True``), ``\\n``-terminated,
compact JSON (``separators=(",", ":")``, no NaN/Infinity). The two chain fields come
first, then the event's own fields in the order the service gave them::

    {"seq":1,"prevDigest":"000…000","eventVersion":"1.08","eventName":"Decrypt",…}

- ``seq``: 1, 2, 3… consecutive.
- ``prevDigest``: hex SHA-256 of the previous line's exact bytes *without* its
  terminating newline (:func:`line_digest`); 64 zeros (:data:`ZERO_DIGEST`) on line 1.

A line is written with a single ``os.write`` on an ``O_APPEND`` descriptor; the log is
not fsynced per line (``sync()``/``close()`` do). An exclusive ``flock`` on the log keeps
a second writer (a second keyd) from interleaving its own chain.

The head file
-------------
A chain alone cannot notice that its last lines were cut off. ``<log>.head`` (JSON
``{"seq": n, "digest": "<hex>"}``, mode 0600) records the last line written. It is
replaced atomically (temp file, fsync, rename) by ``sync()`` and ``close()``, and by
``append()`` at most once per ``head_interval`` (1 s) -- always *after* the log itself
was flushed to disk with ``fdatasync``, so after a crash the head is never ahead of
what the log really holds.

- A head *behind* the log is normal: lines written in the last ≤ 1 s before a crash
  (or while keyd is still running) are not yet covered. ``verify`` reports it as a
  warning ("head behind log"), not as tampering -- and so cannot tell whether such
  recent tail lines were removed.
- The log *shorter* than the head, or the line at ``head.seq`` with a different digest,
  is tampering (tail removed, or last line edited / tail replaced).
- A missing head file is a warning by default (a log copied without its head can
  still be checked); ``verify(path, require_head=True)`` makes it a failure.
- A head file that exists but cannot be parsed is a failure (it is only ever
  replaced atomically, so damage means someone wrote it).

Limits
------
The chain is an unkeyed hash chain: it detects edits, removals, insertions and
reordering done with ordinary tools, and accidents, but someone who can write both
the log and its head can recompute the whole chain (or append well-formed forged lines
at the end). Defending against that needs an anchor outside their reach (copy the
head elsewhere, or ship lines off-host). ``verify`` reports the *first* problem only;
when a single line was tampered with, the reported line number is that line (for a
removal: the position where the missing line was; for a tail removal: one past the
last line). With several tampered lines the first one is found, but its description
is a best guess from the neighbouring lines.

Verifying a log keyd is appending to is safe (the head is read first, so it cannot be
ahead of what is read next), but a reader may rarely catch the last line half-written
(a page-spanning write becomes visible page by page); ``verify`` then reports that line
as truncated. Run it again, or verify after ``sync``/stopping keyd.

``AuditLog.open`` refuses (``AuditError``) a log whose last line is incomplete or not an
audit record, and (``AuditTampered``) a log shorter than its head or whose last line
contradicts the head: appending to it would bury the evidence. Move it aside (and keep
it) to start a new log.

Nothing here adds data to events; events must not carry secrets (the service's
events carry none), and error messages name types, never values.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import os
import re
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

from kmsfs.errors import AuditError, AuditTampered

__all__ = [
    "HEAD_INTERVAL",
    "MAX_LINE_BYTES",
    "ZERO_DIGEST",
    "AuditLog",
    "VerifyReport",
    "event_key_id",
    "event_key_ids",
    "format_event_line",
    "head_path",
    "iter_events",
    "line_digest",
    "matches",
    "tail",
    "verify",
    "verify_or_raise",
]

#: ``prevDigest`` of the first line
ZERO_DIGEST = "0" * 64
#: longest line (without newline) ``append`` writes and the readers accept
MAX_LINE_BYTES = 1 << 20
#: seconds between head-file rewrites done by ``append``
HEAD_INTERVAL = 1.0

_RESERVED_FIELDS = ("seq", "prevDigest")
_BLOCK = 64 * 1024
_HEX64 = re.compile(r"[0-9a-f]{64}")
_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def line_digest(line: bytes) -> str:
    """Hex SHA-256 of one log line's exact bytes, without its terminating newline."""
    return hashlib.sha256(line).hexdigest()


def head_path(path: Path) -> Path:
    """The head file that belongs to the log at *path*: ``<log>.head``."""
    path = Path(path)
    return path.with_name(path.name + ".head")


# ------------------------------------------------------------------------ writing
class AuditLog:
    """An open audit log, appended to by keyd (thread-safe).

    Use :meth:`open`; ``with AuditLog.open(p) as log: log.append(event)``.
    """

    def __init__(self, path: Path, fd: int, seq: int, digest: str, head_interval: float) -> None:
        self._path = path
        self._head_path = head_path(path)
        self._fd = fd
        self._seq = seq
        self._digest = digest
        self._head_interval = head_interval
        self._lock = threading.Lock()  # seq, digest, the write itself
        self._head_lock = threading.Lock()  # one head rewrite at a time; guards fd closing
        self._head_at = float("-inf")  # monotonic time of the last head rewrite
        self._head_seq: int | None = None
        self._closed = False
        self._broken = False
        #: the last error of a head rewrite attempted by ``append`` (retried a second
        #: later; ``sync``/``close`` raise instead of storing)
        self.last_head_error: OSError | None = None

    # -------------------------------------------------------------- opening
    @classmethod
    def open(cls, path: Path, *, head_interval: float = HEAD_INTERVAL) -> AuditLog:
        """Open (creating with mode 0600) the log at *path* and continue its chain.

        Reads only the last line (from the end of the file) and the head file.
        Raises :class:`AuditError` if the log cannot be opened, is locked by another
        writer, or ends in an incomplete or foreign line; :class:`AuditTampered` if it
        is shorter than its head file says or its last line contradicts the head.
        """
        path = Path(path)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise AuditError(f"cannot open audit log {path}: {exc.strerror}") from exc
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise AuditError(
                    f"audit log {path} is in use by another process (locked)"
                ) from None
            seq, digest = _read_last_link(path)
            head, head_problem = _read_head(head_path(path))
            if head_problem is not None:
                raise AuditError(f"{head_problem}; run 'kmsfs keyd audit verify'")
            if head is not None:
                if head.seq > seq:
                    raise AuditTampered(
                        f"audit log {path} ends at seq {seq} but its head file records "
                        f"seq {head.seq}: its last line(s) were removed",
                        seq + 1,
                    )
                if head.seq == seq and head.digest != digest:
                    raise AuditTampered(
                        f"the last line of audit log {path} (seq {seq}) does not match "
                        "its head file: it was edited or the end of the log was replaced",
                        seq,
                    )
        except BaseException:
            os.close(fd)
            raise
        return cls(path, fd, seq, digest, head_interval)

    # -------------------------------------------------------------- properties
    @property
    def path(self) -> Path:
        return self._path

    @property
    def seq(self) -> int:
        """The ``seq`` of the last line written (0 for an empty log)."""
        return self._seq

    @property
    def closed(self) -> bool:
        return self._closed

    # -------------------------------------------------------------- appending
    def append(self, event: Mapping[str, Any]) -> None:
        """Append *event* as one chained line.

        *event* must be JSON-serializable, must not use the chain's field names
        (``seq``, ``prevDigest``) and must serialize to at most
        :data:`MAX_LINE_BYTES`; otherwise :class:`AuditError` and nothing is written.
        An ``OSError`` from the write becomes :class:`AuditError`; if part of the line
        reached the file the log refuses further appends (its end is now broken).
        """
        for name in _RESERVED_FIELDS:
            if name in event:
                raise AuditError(f"audit event uses the reserved field {name!r}")
        try:
            body = _ENCODER.encode(dict(event))
        except (TypeError, ValueError) as exc:
            # the message names a type ("Object of type bytes ..."), never a value
            raise AuditError(f"audit event is not JSON-serializable: {exc}") from None
        tail_text = "}" if body == "{}" else "," + body[1:]
        with self._lock:
            if self._closed:
                raise AuditError("audit log is closed")
            if self._broken:
                raise AuditError(
                    f"audit log {self._path} has an incomplete last line after a failed "
                    "write; reopen it after moving it aside"
                )
            seq = self._seq + 1
            line = f'{{"seq":{seq},"prevDigest":"{self._digest}"{tail_text}'.encode("ascii")
            if len(line) > MAX_LINE_BYTES:
                raise AuditError(f"audit event too large ({len(line)} bytes)")
            self._write_line(line + b"\n")
            self._seq = seq
            self._digest = line_digest(line)
        if time.monotonic() - self._head_at >= self._head_interval:
            self._maybe_write_head()

    def _write_line(self, data: bytes) -> None:
        written = 0
        try:
            while written < len(data):
                written += os.write(self._fd, data[written:])
        except OSError as exc:
            # Part of the line reached the file (ENOSPC in the middle of it): cut it
            # off again, so the log still ends with a whole line and accepts the next
            # append once there is space. Only if that fails is the log broken.
            if written and not self._cut_partial_line(written):
                self._broken = True
            raise AuditError(f"cannot write audit log {self._path}: {exc.strerror}") from exc

    def _cut_partial_line(self, written: int) -> bool:
        """Remove the last ``written`` bytes (a partial line); caller holds ``_lock``."""
        try:
            os.ftruncate(self._fd, os.fstat(self._fd).st_size - written)
        except OSError:
            return False
        return True

    def datasync(self) -> None:
        """Flush the lines appended so far to disk (``fdatasync``), without the head.

        The key service calls it after the record of a state change and before the
        change commits. Raises :class:`AuditError` if the flush fails.
        """
        with self._lock:
            if self._closed:
                raise AuditError("audit log is closed")
            try:
                os.fdatasync(self._fd)
            except OSError as exc:
                raise AuditError(f"cannot sync audit log {self._path}: {exc.strerror}") from exc

    def _maybe_write_head(self) -> None:
        if not self._head_lock.acquire(blocking=False):
            return  # another thread is rewriting it right now
        try:
            if self._closed:
                return
            try:
                self._write_head(full_sync=False)
                self.last_head_error = None
            except OSError as exc:
                self.last_head_error = exc
            self._head_at = time.monotonic()
        finally:
            self._head_lock.release()

    def _write_head(self, *, full_sync: bool) -> None:
        """Flush the log, then replace the head file. Caller holds ``_head_lock``."""
        with self._lock:
            seq, digest = self._seq, self._digest
        # the lines up to `seq` were written before we took the snapshot, so this
        # flushes them: the head never gets ahead of what is on disk.
        if full_sync:
            os.fsync(self._fd)
        else:
            os.fdatasync(self._fd)
        if seq == self._head_seq and not full_sync:
            return
        tmp = self._head_path.with_name(self._head_path.name + ".tmp")
        data = json.dumps({"seq": seq, "digest": digest}).encode("ascii") + b"\n"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self._head_path)
        if full_sync:
            dir_fd = os.open(self._head_path.parent, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        self._head_seq = seq

    # -------------------------------------------------------------- sync / close
    def sync(self) -> None:
        """fsync the log, then rewrite the head file (atomically) and fsync its folder."""
        with self._head_lock:
            if self._closed:
                raise AuditError("audit log is closed")
            self._sync_locked()

    def _sync_locked(self) -> None:
        try:
            self._write_head(full_sync=True)
        except OSError as exc:
            raise AuditError(f"cannot sync audit log {self._path}: {exc.strerror}") from exc
        self._head_at = time.monotonic()

    def close(self) -> None:
        """Sync (see :meth:`sync`) and close. Closing twice is harmless."""
        with self._head_lock:
            with self._lock:
                if self._closed:
                    return
                self._closed = True
            try:
                if not self._broken:
                    self._sync_locked()
            finally:
                os.close(self._fd)

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"seq={self._seq}"
        return f"<AuditLog {str(self._path)!r} {state}>"


class _Head(NamedTuple):
    seq: int
    digest: str


def _read_head(path: Path) -> tuple[_Head | None, str | None]:
    """(head, None), (None, None) if there is no head file, or (None, problem)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None, None
    except OSError as exc:
        return None, f"head file {path} cannot be read: {exc.strerror}"
    try:
        record = json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError):
        record = None
    if isinstance(record, dict):
        seq, digest = record.get("seq"), record.get("digest")
        if (
            type(seq) is int
            and seq >= 0
            and isinstance(digest, str)
            and _HEX64.fullmatch(digest)
            and (seq > 0 or digest == ZERO_DIGEST)
        ):
            return _Head(seq, digest), None
    return None, f"head file {path} is damaged (not a valid head record)"


def _read_last_link(path: Path) -> tuple[int, str]:
    """(seq, digest) of the log's last line, or (0, ZERO_DIGEST) if it is empty."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                return 0, ZERO_DIGEST
            f.seek(size - 1)
            if f.read(1) != b"\n":
                raise AuditError(
                    f"audit log {path} ends with an incomplete line (cut off mid-write?); "
                    "run 'kmsfs keyd audit verify' and move the log aside to start a new one"
                )
            start = _line_start(f, size - 1)
            if start is None:
                raise AuditError(f"the last line of audit log {path} is too long")
            f.seek(start)
            line = f.read(size - 1 - start)
    except OSError as exc:
        raise AuditError(f"cannot read audit log {path}: {exc.strerror}") from exc
    link, problem = _parse_link(line)
    if link is None:
        raise AuditError(
            f"the last line of audit log {path} {problem}; run 'kmsfs keyd audit verify' "
            "and move the log aside to start a new one"
        )
    return link.seq, link.digest


def _line_start(f: BinaryIO, end: int, limit: int | None = MAX_LINE_BYTES) -> int | None:
    """Offset just after the last newline before *end* (0 if none); None if the line
    would be longer than *limit* (no limit: ``None``)."""
    pos = end
    while pos > 0:
        size = min(_BLOCK, pos)
        pos -= size
        f.seek(pos)
        index = f.read(size).rfind(b"\n")
        if index >= 0:
            start = pos + index + 1
            return start if limit is None or end - start <= limit else None
        if limit is not None and end - pos > limit:
            return None
    return 0


# ------------------------------------------------------------------------ parsing
class _Link(NamedTuple):
    seq: int
    prev: str  # the prevDigest the line records
    digest: str  # the digest of the line itself


_GENESIS = _Link(0, "", ZERO_DIGEST)


def _parse_link(line: bytes) -> tuple[_Link | None, str | None]:
    """The chain fields of one line, or (None, what is wrong with it)."""
    if not line.strip():
        return None, "is empty"
    record = _parse_record(line)
    if record is None:
        return None, "is not valid JSON"
    seq = record.get("seq")
    prev = record.get("prevDigest")
    if type(seq) is not int or seq < 1:
        return None, "has no valid seq field"
    if not isinstance(prev, str) or not _HEX64.fullmatch(prev):
        return None, "has no valid prevDigest field"
    return _Link(seq, prev, line_digest(line)), None


def _parse_record(line: bytes) -> dict[str, Any] | None:
    try:
        record = json.loads(line.decode("utf-8"))
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        return None
    return record if isinstance(record, dict) else None


def _read_lines(f: BinaryIO) -> Iterator[tuple[bytes, str]]:
    """Stream the lines of *f*: (line without newline, status), status being
    ``"ok"``, ``"partial"`` (last line, no newline) or ``"too long"`` (its start)."""
    while True:
        raw = f.readline(MAX_LINE_BYTES + 1)
        if not raw:
            return
        if raw.endswith(b"\n"):
            yield raw[:-1], "ok"
        elif len(raw) <= MAX_LINE_BYTES:
            yield raw, "partial"
            return
        else:
            yield raw[:64], "too long"
            while raw and not raw.endswith(b"\n"):  # skip the rest of the giant line
                raw = f.readline(_BLOCK)


# ------------------------------------------------------------------------ verifying
@dataclass(frozen=True)
class VerifyReport:
    """The outcome of :func:`verify`.

    ``lines``: lines in the log (a last line without newline counts).
    ``first_bad_line``: 1-based line number of the first problem; for a removed tail,
    one past the last line; ``None`` when the problem is the head file itself.
    ``kind``: ``"edited"``, ``"removed"``, ``"inserted"``, ``"reordered"``,
    ``"tail removed"``, ``"truncated"``, ``"garbage"``, ``"head damaged"`` or
    ``"head missing"`` (only with ``require_head``).
    ``warnings``: things that are not tampering (no head file, head behind the log).
    """

    ok: bool
    lines: int
    first_bad_line: int | None = None
    problem: str | None = None
    kind: str | None = None
    warnings: tuple[str, ...] = ()


class _Finding(NamedTuple):
    line: int | None
    kind: str
    message: str
    missing: tuple[int, int] | None = None  # seq range a "removed" finding misses


def verify(path: Path, *, require_head: bool = False) -> VerifyReport:
    """Check the chain of the log at *path* and its head file; stream, constant memory.

    Returns a report; tampering never raises. Raises :class:`AuditError` only if the
    log cannot be read (or neither it nor its head exists).
    """
    path = Path(path)
    # The head is read before the log: it is only ever rewritten after the log was
    # flushed, so a keyd appending meanwhile can make it fall behind, never ahead.
    head, head_problem = _read_head(head_path(path))
    try:
        f: BinaryIO = open(path, "rb")  # noqa: SIM115 - closed below
    except FileNotFoundError:
        if head is None and head_problem is None:
            raise AuditError(f"no audit log at {path}") from None
        f = io.BytesIO()  # the log is gone but its head remains: judge it as empty
    except OSError as exc:
        raise AuditError(f"cannot read audit log {path}: {exc.strerror}") from exc
    warnings: list[str] = []
    with f:
        lines = _read_lines(f)
        z = a = _GENESIS  # the lines before the current one (position-2, position-1)
        pos = 0
        head_line: tuple[int, str] | None = None  # (position, digest) of seq == head.seq
        if head is not None and head.seq == 0:
            head_line = (0, ZERO_DIGEST)
        finding: _Finding | None = None
        for raw, status in lines:
            pos += 1
            if status != "ok":
                finding = _structural_finding(pos, status, "")
                break
            b, problem = _parse_link(raw)
            if b is None:
                finding = _structural_finding(pos, status, problem or "")
                break
            if b.seq == a.seq + 1 and b.prev == a.digest:
                z, a = a, b
                if head is not None and b.seq == head.seq:
                    head_line = (pos, b.digest)
                continue
            # the link from line pos-1 to line pos is broken; look one line ahead
            broken_at = pos
            c: _Link | None = None
            for raw_next, status_next in lines:
                pos += 1
                if status_next == "ok":
                    c = _parse_link(raw_next)[0]
                break
            finding = _classify(broken_at, z, a, b, c, head)
            break
        if finding is not None:
            # count the rest; a "removed" line that shows up later was moved instead
            moved_to: tuple[int, int] | None = None
            for raw, _status in lines:
                pos += 1
                if finding.missing is not None and moved_to is None:
                    record = _parse_record(raw)
                    seq = record.get("seq") if record is not None else None
                    lo, hi = finding.missing
                    if type(seq) is int and lo <= seq <= hi:
                        moved_to = (seq, pos)
            if moved_to is not None:
                finding = _Finding(
                    finding.line,
                    "reordered",
                    f"lines are out of order: {finding.message}, but seq {moved_to[0]} "
                    f"appears later, at line {moved_to[1]}",
                )
            return VerifyReport(False, pos, finding.line, finding.message, finding.kind)

    last = a
    if head_problem is not None:
        return VerifyReport(False, pos, None, head_problem, "head damaged")
    if head is None:
        message = (
            f"no head file ({head_path(path).name}): removal of the last lines cannot be detected"
        )
        if require_head:
            return VerifyReport(False, pos, None, message, "head missing")
        warnings.append(message)
    elif head.seq > last.seq:
        count = head.seq - last.seq
        removed = "1 line was" if count == 1 else f"{count} lines were"
        return VerifyReport(
            False,
            pos,
            pos + 1,
            f"the log ends at line {pos} (seq {last.seq}) but its head file records "
            f"seq {head.seq}: {removed} removed from the end, from line {pos + 1} on",
            "tail removed",
        )
    elif head_line is not None and head_line[1] != head.digest:
        return VerifyReport(
            False,
            pos,
            head_line[0],
            f"line {head_line[0]} (seq {head.seq}) does not match the digest in the head "
            "file: it was edited, or the end of the log was replaced",
            "edited",
        )
    elif head.seq < last.seq:
        warnings.append(
            f"head behind log: the head file records seq {head.seq}, the log goes on to "
            f"seq {last.seq} (lines written shortly before an unclean stop, or while keyd "
            "is running, are not covered yet)"
        )
    return VerifyReport(True, pos, None, None, None, tuple(warnings))


def verify_or_raise(path: Path, *, require_head: bool = False) -> VerifyReport:
    """:func:`verify`, raising :class:`AuditTampered` if the log is not intact."""
    report = verify(path, require_head=require_head)
    if not report.ok:
        raise AuditTampered(report.problem or "audit log is not intact", report.first_bad_line or 0)
    return report


def _structural_finding(pos: int, status: str, problem: str) -> _Finding:
    if status == "partial":
        return _Finding(
            pos,
            "truncated",
            f"line {pos} is incomplete (no newline at its end): the log was cut off "
            "mid-line, garbage was appended, or a write was interrupted",
        )
    if status == "too long":
        return _Finding(pos, "garbage", f"line {pos} is longer than {MAX_LINE_BYTES} bytes")
    if problem == "is empty":
        return _Finding(pos, "garbage", f"line {pos} is empty")
    return _Finding(
        pos,
        "garbage" if problem == "is not valid JSON" else "edited",
        f"line {pos} {problem}: it was edited, or garbage was written into the log",
    )


def _classify(
    p: int,
    z: _Link,
    a: _Link,
    b: _Link,
    c: _Link | None,
    head: _Head | None,
) -> _Finding:
    """Say what happened when the link from line p-1 (*a*) to line p (*b*) is broken.

    *z* is line p-2, *c* line p+1 (None at the end of the log or if unreadable); the
    virtual line 0 (:data:`_GENESIS`) stands before line 1. One tampered line is
    assumed; each case names the evidence it rests on.
    """
    after = f"line {p - 1}" if p > 1 else "the start"
    if b.prev == a.digest:
        # b records a's digest, so it really follows a: its seq was altered
        return _Finding(
            p,
            "edited",
            f"line {p} was edited: its seq is {b.seq} where {a.seq + 1} was expected "
            f"(its prevDigest does match {after})",
        )
    if b.seq > a.seq + 1:
        if c is not None and c.seq < b.seq:
            return _Finding(
                p,
                "reordered",
                f"lines are out of order: line {p} has seq {b.seq} after seq {a.seq}, and "
                f"line {p + 1} has seq {c.seq}",
            )
        lo, hi = a.seq + 1, b.seq - 1
        missing = f"seq {lo}" if lo == hi else f"seqs {lo}..{hi}"
        return _Finding(
            p,
            "removed",
            f"{'line' if lo == hi else 'lines'} with {missing} removed before line {p} "
            f"(seq jumps from {a.seq} to {b.seq})",
            (lo, hi),
        )
    if b.seq <= a.seq:
        if b.digest == a.digest:
            return _Finding(p, "inserted", f"line {p} duplicates line {p - 1}")
        if a is not _GENESIS and b.seq == a.seq and b.prev == z.digest:
            return _Finding(
                p - 1,
                "inserted",
                f"line {p - 1} was inserted: line {p} has the same seq {b.seq} and "
                f"continues the chain from the line before it",
            )
        if c is not None and c.seq == a.seq + 1 and c.prev == a.digest:
            return _Finding(
                p,
                "inserted",
                f"line {p} was inserted (seq {b.seq} repeated; line {p + 1} continues the "
                f"chain from {after})",
            )
        if b.seq < a.seq:
            return _Finding(
                p,
                "reordered",
                f"seq goes back from {a.seq} to {b.seq} at line {p}: lines reordered or "
                "a line inserted",
            )
        return _Finding(
            p, "inserted", f"line {p} repeats seq {b.seq}: a line was inserted or duplicated"
        )
    # b.seq == a.seq + 1 but b.prev != a.digest: a or b is not original
    if a is _GENESIS:
        return _Finding(
            p, "edited", f"line {p} was edited: the first line's prevDigest must be zeros"
        )
    if c is not None:
        if c.seq == b.seq and c.prev == a.digest:
            return _Finding(
                p,
                "inserted",
                f"line {p} was inserted: line {p + 1} has the same seq {b.seq} and "
                f"continues the chain from line {p - 1}",
            )
        if c.seq == b.seq + 1 and c.prev == b.digest:
            return _edited_before(p)
        return _Finding(
            p,
            "edited",
            f"line {p} was edited or replaced: its prevDigest does not match line {p - 1} "
            f"and line {p + 1} does not record its digest",
        )
    # b is the last readable line: only the head can vouch for a or b
    if head is not None and head.seq == b.seq:
        if head.digest == b.digest:
            return _edited_before(p)
        return _Finding(
            p,
            "edited",
            f"line {p} was edited or replaced: its prevDigest does not match line {p - 1} "
            "and its digest does not match the head file",
        )
    if head is not None and head.seq == a.seq and head.digest == a.digest:
        return _Finding(
            p,
            "inserted",
            f"line {p} does not continue the chain from line {p - 1} (which matches the "
            "head file): forged or edited",
        )
    return _Finding(
        p - 1,
        "edited",
        f"line {p} does not record the digest of line {p - 1}: line {p - 1} (or the "
        f"prevDigest of line {p}) was edited",
    )


def _edited_before(p: int) -> _Finding:
    return _Finding(
        p - 1,
        "edited",
        f"line {p - 1} was edited: its digest no longer matches the prevDigest recorded "
        f"by line {p}",
    )


# ------------------------------------------------------------------------ reading
def event_key_ids(event: Mapping[str, Any]) -> list[str]:
    """Every key reference an event carries: KeyIds, ARNs and alias names."""
    found: list[str] = []

    def take(container: object, *names: str) -> None:
        if isinstance(container, Mapping):
            for name in names:
                value = container.get(name)
                if isinstance(value, str) and value:
                    found.append(value)

    request = event.get("requestParameters")
    take(request, "keyId", "sourceKeyId", "destinationKeyId", "targetKeyId", "aliasName")
    response = event.get("responseElements")
    take(response, "keyId", "sourceKeyId", "destinationKeyId")
    if isinstance(response, Mapping):
        take(response.get("keyMetadata"), "keyId", "arn")
    resources = event.get("resources")
    if isinstance(resources, list):
        for resource in resources:
            take(resource, "ARN")
    return found


def event_key_id(event: Mapping[str, Any]) -> str | None:
    """The key an event is about, for display: the request's KeyId, else the first
    key reference found (see :func:`event_key_ids`)."""
    ids = event_key_ids(event)
    return ids[0] if ids else None


def matches(
    event: Mapping[str, Any], *, key: str | None = None, event_name: str | None = None
) -> bool:
    """The ``--key``/``--event`` filter.

    *event_name* must equal ``eventName`` exactly. *key* matches when it is a
    substring of any key reference of the event (``requestParameters.keyId``,
    ``sourceKeyId``, ``destinationKeyId``, ``targetKeyId``, ``aliasName``;
    ``responseElements.keyId`` and ``keyMetadata.keyId``/``arn``; ``resources[].ARN``).
    So a bare KeyId matches requests naming the key by id or ARN; an alias matches the
    requests that named that alias (a request by alias also records the key's ARN in
    ``responseElements.keyId``, so filter those by the key's id).
    """
    if event_name is not None and event.get("eventName") != event_name:
        return False
    if key is not None:
        return any(key in ref for ref in event_key_ids(event))
    return True


def iter_events(
    path: Path, *, key: str | None = None, event_name: str | None = None
) -> Iterator[dict[str, Any]]:
    """The log's events (with their ``seq``/``prevDigest``) that match the filters,
    oldest first, streaming. Lines that are not JSON objects (and an incomplete last
    line) are skipped: reading is not verifying -- use :func:`verify` for that."""
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed below
    except OSError as exc:
        raise AuditError(f"cannot read audit log {path}: {exc.strerror}") from exc
    with f:
        for raw, status in _read_lines(f):
            if status != "ok":
                continue
            record = _parse_record(raw)
            if record is not None and matches(record, key=key, event_name=event_name):
                yield record


def tail(
    path: Path,
    n: int = 20,
    *,
    follow: bool = False,
    key: str | None = None,
    event_name: str | None = None,
    poll_interval: float = 0.25,
    stop: threading.Event | None = None,
) -> Iterator[dict[str, Any]]:
    """The last *n* matching events, oldest first; with *follow*, then every matching
    event appended later, as it is appended (polling every *poll_interval* s).

    The log is read backwards from its end, so a short tail of a huge log is cheap.
    Following waits for a line's newline before yielding it, and starts over from
    the beginning of the file if the log is truncated or replaced (rotated). It runs
    until the consumer stops iterating or *stop* is set. Unparseable lines are skipped
    (see :func:`iter_events`).
    """
    if n < 0:
        raise ValueError("n must be >= 0")
    path = Path(path)
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed below
    except OSError as exc:
        raise AuditError(f"cannot read audit log {path}: {exc.strerror}") from exc
    with f:
        size = os.fstat(f.fileno()).st_size
        end = _line_start(f, size, limit=None) or 0  # just after the last complete line
        if n:
            newest: list[dict[str, Any]] = []
            for raw in _lines_backward(f, end):
                record = _parse_record(raw) if raw else None
                if record is not None and matches(record, key=key, event_name=event_name):
                    newest.append(record)
                    if len(newest) == n:
                        break
            yield from reversed(newest)
        if not follow:
            return
        yield from _follow(f, path, end, key, event_name, poll_interval, stop)


def _lines_backward(f: BinaryIO, end: int) -> Iterator[bytes]:
    """Lines of ``f[0:end]`` (which ends with a newline, or is empty), last first.
    Lines longer than MAX_LINE_BYTES are dropped, in constant memory."""
    pos = end
    pending = b""  # the start of the line being assembled is not read yet
    overflow = False  # inside a line too long to keep
    while pos > 0:
        step = min(_BLOCK, pos)
        pos -= step
        f.seek(pos)
        parts = f.read(step).split(b"\n")
        if overflow:
            if len(parts) == 1:
                continue
            complete = parts[1:-1]  # parts[-1] belongs to the giant line
            overflow = False
        else:
            parts[-1] += pending
            complete = parts[1:]
        pending = parts[0]
        yield from reversed(complete)
        if len(pending) > MAX_LINE_BYTES:
            pending, overflow = b"", True
    if not overflow:
        yield pending


def _follow(
    f: BinaryIO,
    path: Path,
    offset: int,
    key: str | None,
    event_name: str | None,
    poll_interval: float,
    stop: threading.Event | None,
) -> Iterator[dict[str, Any]]:
    buffer = b""
    skipping = False  # dropping a line that grew past MAX_LINE_BYTES
    current = f
    try:
        while stop is None or not stop.is_set():
            current.seek(offset)
            data = current.read(_BLOCK)
            if data:
                offset += len(data)
                *complete, rest = (buffer + data).split(b"\n")
                if skipping and complete:
                    complete, skipping = complete[1:], False
                buffer = rest
                if len(buffer) > MAX_LINE_BYTES:
                    buffer, skipping = b"", True
                for raw in complete:
                    record = _parse_record(raw) if raw else None
                    if record is not None and matches(record, key=key, event_name=event_name):
                        yield record
                continue
            # nothing new: was the log truncated or replaced?
            try:
                st = os.stat(path)
            except FileNotFoundError:
                st = None
            own = os.fstat(current.fileno())
            replacement: BinaryIO | None = None
            if st is not None and (st.st_ino, st.st_dev) != (own.st_ino, own.st_dev):
                try:
                    replacement = open(path, "rb")  # noqa: SIM115 - closed below
                except FileNotFoundError:
                    replacement = None  # gone again between stat and open: poll on
            if replacement is not None:
                if current is not f:
                    current.close()
                current, offset, buffer, skipping = replacement, 0, b"", False
                continue
            if own.st_size < offset:
                offset, buffer, skipping = 0, b"", False
                continue
            if stop is not None:
                stop.wait(poll_interval)
            else:
                time.sleep(poll_interval)
    finally:
        if current is not f:
            current.close()


# ------------------------------------------------------------------------ display
def format_event_line(event: Mapping[str, Any]) -> str:
    """One line for humans: time, user(uid), eventName, key, and error or ``ok``.

    Control and other non-printable characters are escaped, so a crafted field
    cannot move the terminal's cursor or forge extra lines.
    """
    identity = event.get("userIdentity")
    identity = identity if isinstance(identity, Mapping) else {}
    user = identity.get("userName") or "?"
    uid = identity.get("uid", "?")
    error = event.get("errorCode")
    if error:
        message = event.get("errorMessage")
        status = f"{error}: {message}" if message else str(error)
    else:
        status = "ok"
    fields = [
        str(event.get("eventTime", "?")),
        f"{user}({uid})",
        str(event.get("eventName", "?")),
        event_key_id(event) or "-",
        status,
    ]
    return "  ".join(_printable(str(text)) for text in fields)


def _printable(text: str) -> str:
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else _escape(ch) for ch in text)


def _escape(ch: str) -> str:
    code = ord(ch)
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"
