"""keyd's audit log: one hash-chained JSON line per request, allowed or refused.

The service layer builds a CloudTrail-shaped KMS event (``eventTime``, ``eventName``,
``userIdentity``, ``requestParameters``, ``errorCode``...). This module caps its size
(:func:`cap_event`), adds the integrity chain and writes it, rotating the file by size;
it also reads the log back (``verify``, ``iter_events``, ``tail``) for
``kmsfs keyd audit verify|tail``, across the rotated files.

On-disk format
--------------
One line per event, UTF-8 (in fact pure ASCII: ``ensure_ascii=True``), ``\\n``-terminated,
compact JSON (``separators=(",", ":")``, no NaN/Infinity). The two chain fields come
first, then the event's own fields in the order the service gave them::

    {"seq":1,"prevDigest":"000…000","eventVersion":"1.08","eventName":"Decrypt",…}

- ``seq``: 1, 2, 3… consecutive, across rotated files.
- ``prevDigest``: hex SHA-256 of the previous line's exact bytes *without* its
  terminating newline (:func:`line_digest`); 64 zeros (:data:`ZERO_DIGEST`) on line 1.
  The first line of a file started by rotation records the digest of the last line
  of the file before it: the rotated files and the current one form one chain.

A line is written with a single ``os.write`` on an ``O_APPEND`` descriptor; the log is
not fsynced per line (``sync()``/``close()`` do). An exclusive ``flock`` on
``<log>.lock`` keeps a second writer (a second keyd) from interleaving its own chain.

Size caps
---------
A request can carry up to 256 KiB of JSON that the operation ignores or refuses, and
``ensure_ascii`` turns a 2-byte UTF-8 character into a 6-byte escape: logged whole,
100 such requests grew the log by 71 MiB. CloudTrail bounds its events (256 KB per
event since event version 1.05; ``requestParameters``/``responseElements`` up to
100 KB) and "truncates a field if the field's contents exceeds the maximum field
size. If a field is truncated, omitted is present with a value of true" (CloudTrail
record contents). :func:`cap_event` does the same, with bounds sized for KMS events:
each string at most :data:`MAX_VALUE_BYTES` encoded (its start is kept), each object
or array at most :data:`MAX_ITEMS` entries and :data:`MAX_DEPTH` levels, each of
``requestParameters``/``responseElements`` at most :data:`MAX_SECTION_BYTES` (members
that do not fit are left out), the whole event at most :data:`MAX_EVENT_BYTES`. A capped
event gets ``"omitted": true`` and ``"omittedFields"``: the paths cut, with their sizes.
An event that encodes to at most :data:`MAX_VALUE_BYTES` (most do) is logged as it is.
Members an operation does not define are already left out by the service when they
are not audited fields at all; an audited name sent to an operation that ignores it
(``Description`` on ``ListKeys``) is logged, capped like any value.

Rotation
--------
When the log reaches ``max_bytes`` (default :data:`DEFAULT_MAX_BYTES`, 64 MiB;
``KMSFS_AUDIT_MAX_BYTES`` overrides it, 0 turns rotation off) it is renamed to
``<log>.<first seq>-<last seq>`` (e.g. ``audit.log.1-81234``) and a new, empty
``<log>`` takes its place; the chain goes on in it. keyd keeps every rotated file --
it never deletes audit records; archive and remove old ones yourself, knowing that
``verify`` then reports the records before the oldest remaining file as removed.
The set is ordered by the last seq in each name; names are not trusted otherwise.

Rotation is crash-safe: the log is fsynced, an empty ``<log>.new`` is created, the
log renamed to its rotated name, ``<log>.new`` renamed to ``<log>``, and the folder
fsynced. A kill between the steps leaves either the old state or a rotated file and
no (or an empty) log; :meth:`AuditLog.open` then continues the chain from the last
line of the newest rotated file, and removes an empty leftover ``<log>.new``. No
record is lost or written twice.

The head file
-------------
A chain alone cannot notice that its last lines were cut off. ``<log>.head`` (JSON
``{"seq": n, "digest": "<hex>"}``, mode 0600) records the last line written (in
whichever file of the set it is). It is
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
is a best guess from the neighbouring lines. A whole rotated file removed shows as
the records it held missing; a rotated file edited, or two swapped, as a broken link
in the file where the chain breaks.

Verifying a log keyd is appending to is safe (the head is read first, so it cannot be
ahead of what is read next; the log is opened before the rotated files are listed, so
a rotation meanwhile shows it among them, and it is read once, through the open file),
but a reader may rarely catch the last line half-written
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

import errno
import fcntl
import hashlib
import json
import os
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

from kmsfs.errors import AuditError, AuditLogInUse, AuditTampered

__all__ = [
    "DEFAULT_MAX_BYTES",
    "HEAD_INTERVAL",
    "MAX_DEPTH",
    "MAX_EVENT_BYTES",
    "MAX_ITEMS",
    "MAX_LINE_BYTES",
    "MAX_SECTION_BYTES",
    "MAX_VALUE_BYTES",
    "MAX_BYTES_ENV",
    "ZERO_DIGEST",
    "AuditLog",
    "VerifyReport",
    "cap_event",
    "event_key_id",
    "event_key_ids",
    "format_event_line",
    "head_path",
    "iter_events",
    "line_digest",
    "log_files",
    "matches",
    "rotated_files",
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
#: size at which the log is rotated, unless ``max_bytes`` or :data:`MAX_BYTES_ENV` say otherwise
DEFAULT_MAX_BYTES = 64 << 20
#: environment variable overriding :data:`DEFAULT_MAX_BYTES` (bytes; 0: never rotate)
MAX_BYTES_ENV = "KMSFS_AUDIT_MAX_BYTES"

#: longest string kept in a logged event, in bytes of its JSON encoding (a KMS
#: Description may have 8192 characters: its first ~1000 are kept)
MAX_VALUE_BYTES = 1024
#: most entries kept of one object or array of a logged event
MAX_ITEMS = 64
#: deepest nesting kept (KMS request members nest 3 levels at most)
MAX_DEPTH = 6
#: most bytes kept of ``requestParameters``, and of ``responseElements``
MAX_SECTION_BYTES = 16 * 1024
#: largest logged event; beyond it the two sections above are left out entirely
MAX_EVENT_BYTES = 64 * 1024
#: integers of more digits than MAX_VALUE_BYTES allows are left out
_INT_LIMIT = 10 ** (MAX_VALUE_BYTES - 2)
#: most paths listed in ``omittedFields``
_MAX_OMITTED_LISTED = 16
_SECTIONS = ("requestParameters", "responseElements")

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


def _lock_path(path: Path) -> Path:
    return path.with_name(path.name + ".lock")


def _new_path(path: Path) -> Path:
    return path.with_name(path.name + ".new")


def _rotated_path(path: Path, first_seq: int, last_seq: int) -> Path:
    return path.with_name(f"{path.name}.{first_seq}-{last_seq}")


def rotated_files(path: Path) -> list[Path]:
    """The rotated files of the log at *path* (``<log>.<first>-<last>``), oldest first
    (ordered by the last seq their name gives)."""
    path = Path(path)
    pattern = re.compile(re.escape(path.name) + r"\.(\d{1,20})-(\d{1,20})")
    found: list[tuple[int, int, Path]] = []
    try:
        names = os.listdir(path.parent)
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise AuditError(f"cannot list the folder of audit log {path}: {exc.strerror}") from exc
    for name in names:
        match = pattern.fullmatch(name)
        if match:
            found.append((int(match[2]), int(match[1]), path.with_name(name)))
    return [item[2] for item in sorted(found)]


def log_files(path: Path) -> list[Path]:
    """Every file of the log at *path*, oldest first: the rotated ones, then *path*."""
    return [*rotated_files(path), Path(path)]


def _configured_max_bytes() -> int:
    text = os.environ.get(MAX_BYTES_ENV, "").strip()
    if not text:
        return DEFAULT_MAX_BYTES
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise AuditError(f"{MAX_BYTES_ENV} must be a number of bytes (0: never rotate)")
    return value


# ------------------------------------------------------------------------ capping
def _encoded_size(value: Any) -> int:
    return len(_ENCODER.encode(value))


def cap_event(event: Mapping[str, Any]) -> dict[str, Any]:
    """*event* with every part bounded (see "Size caps" above): a new dict.

    Anything cut is named in ``omittedFields`` (``path (N bytes)``) and the event gets
    ``"omitted": true``, as CloudTrail marks a truncated field. Values that are not
    JSON types are passed through for :meth:`AuditLog.append` to refuse.
    """
    omitted: list[str] = []
    return _finish_cap(_cap_mapping(event, "", 0, omitted), omitted)


def _finish_cap(capped: dict[str, Any], omitted: list[str]) -> dict[str, Any]:
    """The section and event budgets, and the omitted marks, on a walked event."""
    if _encoded_size_or_zero(capped) > MAX_SECTION_BYTES:  # else no section can be larger
        for section in _SECTIONS:
            value = capped.get(section)
            if value is not None and _encoded_size_or_zero(value) > MAX_SECTION_BYTES:
                capped[section] = _fit_section(value, section, omitted)
        if _encoded_size_or_zero(capped) > MAX_EVENT_BYTES:
            for section in _SECTIONS:
                if capped.get(section) is not None:
                    omitted.append(f"{section} ({_encoded_size(capped[section])} bytes)")
                    capped[section] = None
    if omitted:
        capped["omitted"] = True
        listed = omitted[:_MAX_OMITTED_LISTED]
        if len(omitted) > _MAX_OMITTED_LISTED:
            listed.append(f"and {len(omitted) - _MAX_OMITTED_LISTED} more")
        capped["omittedFields"] = listed
    return capped


class EncodedEvent(str):
    """An event's JSON text (one object), written by keyd code faster than encoding a
    dictionary would (RecordAccessEvents: the records of one call share most of their
    text). Its maker is trusted as the dictionaries' makers are: an object, no reserved
    field (``seq``, ``prevDigest``), ASCII only."""

    __slots__ = ()

    def decoded(self) -> dict[str, Any]:
        """The event as a dictionary (for capping it, and for sinks that take those)."""
        event = json.loads(self)
        if not isinstance(event, dict):
            raise AuditError("an encoded audit event must be a JSON object")
        return event


def _capped_body(event: Mapping[str, Any]) -> str:
    """The JSON text of *event*, capped. An event that encodes to at most
    MAX_VALUE_BYTES holds nothing to cut, and is encoded once (the usual case: a
    GenerateDataKey event is about 900 bytes)."""
    try:
        body = _ENCODER.encode(dict(event))
    except RecursionError:  # nested deeper than Python recurses: cap_event cuts it
        body = None
    if body is not None and len(body) <= MAX_VALUE_BYTES:
        return body
    omitted: list[str] = []
    capped = _cap_mapping(event, "", 0, omitted)
    if not omitted and body is not None and len(body) <= MAX_SECTION_BYTES:
        return body  # nothing cut, and too small for a section to be over its budget
    return _ENCODER.encode(_finish_cap(capped, omitted))


def _encoded_size_or_zero(value: Any) -> int:
    try:
        return _encoded_size(value)
    except (TypeError, ValueError, RecursionError):
        return 0  # not JSON: append() refuses the event with a clear error


def _path(parent: str, name: object) -> str:
    """``parent.name`` for omittedFields; a long (client-chosen) name is shortened."""
    text = str(name)
    if len(text) > 64:
        text = text[:64] + "..."
    return f"{parent}.{text}" if parent else text


# The walk is on every audited request larger than MAX_VALUE_BYTES: exact type checks
# first, paths built only for what is cut.
def _cap_value(value: Any, parent: str, name: object, depth: int, omitted: list[str]) -> Any:
    kind = type(value)
    if kind is str:
        if len(value) * 12 + 2 <= MAX_VALUE_BYTES:  # no character encodes to more
            return value
        size = _encoded_size(value)
        if size <= MAX_VALUE_BYTES:
            return value
        omitted.append(f"{_path(parent, name)} ({size} bytes)")
        return _truncate_string(value)
    if kind is dict or kind is list or kind is tuple or isinstance(value, Mapping):
        if depth >= MAX_DEPTH:
            omitted.append(f"{_path(parent, name)} (nested deeper than {MAX_DEPTH} levels)")
            return None
        if kind is list or kind is tuple:
            return _cap_sequence(value, _path(parent, name), depth + 1, omitted)
        return _cap_mapping(value, _path(parent, name), depth + 1, omitted)
    if kind is int and -_INT_LIMIT < value < _INT_LIMIT:
        return value
    if kind is int:
        omitted.append(f"{_path(parent, name)} (a {len(str(value))}-digit number)")
        return None
    if isinstance(value, str):  # a str subclass
        return _cap_value(str(value), parent, name, depth, omitted)
    return value  # bool, float, None -- or not JSON, refused by append()


def _cap_sequence(
    value: list[Any] | tuple[Any, ...], path: str, depth: int, omitted: list[str]
) -> list[Any]:
    items = [
        _cap_value(item, path, f"[{index}]", depth, omitted)
        for index, item in zip(range(MAX_ITEMS), value, strict=False)
    ]
    if len(value) > MAX_ITEMS:
        omitted.append(f"{path} ({len(value) - MAX_ITEMS} of {len(value)} items)")
    return items


def _cap_mapping(
    value: Mapping[Any, Any], path: str, depth: int, omitted: list[str]
) -> dict[Any, Any]:
    result: dict[Any, Any] = {}
    for index, (name, item) in enumerate(value.items()):
        if index >= MAX_ITEMS:
            what = f"{path} " if path else ""
            omitted.append(f"{what}({len(value) - MAX_ITEMS} of {len(value)} members)")
            break
        key = name
        if type(name) is str and len(name) * 12 + 2 > MAX_VALUE_BYTES:
            size = _encoded_size(name)
            if size > MAX_VALUE_BYTES:
                key = _truncate_string(name)
                omitted.append(f"{_path(path, name)} (a member name of {size} bytes)")
                if key in result:
                    continue  # two long names with the same start: keep the first
        result[key] = _cap_value(item, path, name, depth, omitted)
    return result


def _truncate_string(value: str) -> str:
    """The longest start of *value* that encodes to at most MAX_VALUE_BYTES."""
    low, high = 0, min(len(value), MAX_VALUE_BYTES - 2)  # encoded size >= 2 + length
    while low < high:
        middle = (low + high + 1) // 2
        if _encoded_size(value[:middle]) <= MAX_VALUE_BYTES:
            low = middle
        else:
            high = middle - 1
    return value[:low]


def _fit_section(value: Any, section: str, omitted: list[str]) -> Any:
    """Members of *value* in order while they fit in MAX_SECTION_BYTES; the rest left out."""
    if not isinstance(value, dict):
        omitted.append(f"{section} ({_encoded_size(value)} bytes)")
        return None
    kept: dict[str, Any] = {}
    used = 2  # "{}"
    for name, item in value.items():
        size = _encoded_size(name) + 1 + _encoded_size(item) + 1
        if used + size > MAX_SECTION_BYTES:
            omitted.append(f"{_path(section, name)} ({size} bytes)")
            continue
        kept[name] = item
        used += size
    return kept


# ------------------------------------------------------------------------ writing
@dataclass
class _OpenFile:
    """The file the log currently appends to."""

    fd: int
    first_seq: int | None  # seq of its first line (None: unknown, first line unreadable)
    size: int


class AuditLog:
    """An open audit log, appended to by keyd (thread-safe).

    Use :meth:`open`; ``with AuditLog.open(p) as log: log.append(event)``.
    """

    def __init__(
        self,
        path: Path,
        lock_fd: int,
        current: _OpenFile,
        seq: int,
        digest: str,
        head_interval: float,
        max_bytes: int,
    ) -> None:
        self._path = path
        self._head_path = head_path(path)
        self._lock_fd = lock_fd
        self._current = current
        self._seq = seq
        self._digest = digest
        self._head_interval = head_interval
        self._max_bytes = max_bytes
        self._lock = threading.Lock()  # seq, digest, the write itself
        # one head rewrite or rotation at a time; guards fd closing. Taken before _lock.
        self._head_lock = threading.Lock()
        self._head_at = float("-inf")  # monotonic time of the last head rewrite
        self._head_seq: int | None = None
        self._rotate_after = float("-inf")  # monotonic time before which not to retry
        self._closed = False
        self._broken = False
        #: the last error of a head rewrite attempted by ``append`` (retried a second
        #: later; ``sync``/``close`` raise instead of storing)
        self.last_head_error: OSError | None = None
        #: the last error of a rotation (retried a second later); None after a success
        self.last_rotate_error: OSError | None = None

    # -------------------------------------------------------------- opening
    @classmethod
    def open(
        cls,
        path: Path,
        *,
        head_interval: float = HEAD_INTERVAL,
        max_bytes: int | None = None,
    ) -> AuditLog:
        """Open (creating with mode 0600) the log at *path* and continue its chain.

        Reads only the first and last lines (the last from the end of the file; from
        the newest rotated file if the log is empty) and the head file. *max_bytes*:
        rotate when the log reaches this size (default :data:`MAX_BYTES_ENV` or
        :data:`DEFAULT_MAX_BYTES`; 0 never).
        Raises :class:`AuditError` if the log cannot be opened, is locked by another
        writer, or ends in an incomplete or foreign line; :class:`AuditTampered` if it
        is shorter than its head file says or its last line contradicts the head.
        """
        path = Path(path)
        if max_bytes is None:
            max_bytes = _configured_max_bytes()
        try:
            lock_fd = os.open(_lock_path(path), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise AuditError(f"cannot open audit log {path}: {exc.strerror}") from exc
        fd: int | None = None
        try:
            try:
                fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise AuditLogInUse(
                    f"audit log {path} is in use by another process (locked)"
                ) from None
            _finish_interrupted_rotation(path)
            try:
                fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
                size = os.fstat(fd).st_size
            except OSError as exc:
                raise AuditError(f"cannot open audit log {path}: {exc.strerror}") from exc
            if size:
                seq, digest = _read_last_link(path)
                first_seq = _read_first_seq(path)
            else:
                rotated = rotated_files(path)
                seq, digest = _read_last_link(rotated[-1]) if rotated else (0, ZERO_DIGEST)
                first_seq = seq + 1
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
            if fd is not None:
                os.close(fd)
            os.close(lock_fd)
            raise
        current = _OpenFile(fd, first_seq, size)
        return cls(path, lock_fd, current, seq, digest, head_interval, max_bytes)

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
        """Append *event*, capped (:func:`cap_event`), as one chained line.

        *event* must be JSON-serializable and must not use the chain's field names
        (``seq``, ``prevDigest``); otherwise :class:`AuditError` and nothing is written.
        An ``OSError`` from the write becomes :class:`AuditError`; if part of the line
        reached the file the log refuses further appends (its end is now broken).
        When the log has reached its size limit it is rotated after the write (a failed
        rotation is kept in :attr:`last_rotate_error` and retried a second later).
        """
        for name in _RESERVED_FIELDS:
            if name in event:
                raise AuditError(f"audit event uses the reserved field {name!r}")
        try:
            body = _capped_body(event)
        except (TypeError, ValueError) as exc:
            # the message names a type ("Object of type bytes ..."), never a value
            raise AuditError(f"audit event is not JSON-serializable: {exc}") from None
        tail_text = "}" if body == "{}" else "," + body[1:]
        with self._lock:
            self._check_appendable()
            seq = self._seq + 1
            line = f'{{"seq":{seq},"prevDigest":"{self._digest}"{tail_text}'.encode("ascii")
            if len(line) > MAX_LINE_BYTES:
                raise AuditError(f"audit event too large ({len(line)} bytes)")
            self._write_line(line + b"\n")
            self._seq = seq
            self._digest = line_digest(line)
            full = 0 < self._max_bytes <= self._current.size
        now = time.monotonic()
        if full and now >= self._rotate_after:
            self._maybe_rotate()
        if now - self._head_at >= self._head_interval:
            self._maybe_write_head()

    def append_many(self, events: list[Mapping[str, Any] | EncodedEvent]) -> None:
        """Append *events* as consecutive chained lines, in one write: all of them or
        none (as :meth:`append` for one; every event is encoded and checked before
        anything is written, and a write that fails part way is cut off again). An
        :class:`EncodedEvent` is taken as it is when nothing in it needs capping."""
        bodies: list[str] = []
        for event in events:
            if type(event) is EncodedEvent:
                if len(event) <= MAX_VALUE_BYTES:  # nothing to cut: _capped_body
                    bodies.append(str(event))
                    continue
                event = event.decoded()
            for name in _RESERVED_FIELDS:
                if name in event:
                    raise AuditError(f"audit event uses the reserved field {name!r}")
            try:
                bodies.append(_capped_body(event))
            except (TypeError, ValueError) as exc:
                raise AuditError(f"audit event is not JSON-serializable: {exc}") from None
        if not bodies:
            return
        with self._lock:
            self._check_appendable()
            seq, digest = self._seq, self._digest
            lines: list[bytes] = []
            for body in bodies:
                seq += 1
                tail_text = "}" if body == "{}" else "," + body[1:]
                line = f'{{"seq":{seq},"prevDigest":"{digest}"{tail_text}'.encode("ascii")
                if len(line) > MAX_LINE_BYTES:
                    raise AuditError(f"audit event too large ({len(line)} bytes)")
                lines.append(line)
                digest = line_digest(line)
            self._write_line(b"".join(line + b"\n" for line in lines))
            self._seq, self._digest = seq, digest
            full = 0 < self._max_bytes <= self._current.size
        now = time.monotonic()
        if full and now >= self._rotate_after:
            self._maybe_rotate()
        if now - self._head_at >= self._head_interval:
            self._maybe_write_head()

    def _check_appendable(self) -> None:
        """AuditError unless lines may be appended now (called with the lock held)."""
        if self._closed:
            raise AuditError("audit log is closed")
        if self._broken:
            raise AuditError(
                f"audit log {self._path} has an incomplete last line after a failed "
                "write; reopen it after moving it aside"
            )

    def _write_line(self, data: bytes) -> None:
        written = 0
        try:
            while written < len(data):
                written += os.write(self._current.fd, data[written:])
        except OSError as exc:
            # Part of the line reached the file (ENOSPC in the middle of it): cut it
            # off again, so the log still ends with a whole line and accepts the next
            # append once there is space. Only if that fails is the log broken.
            if written:
                if self._cut_partial_line(written):
                    written = 0
                else:
                    self._broken = True
            raise AuditError(f"cannot write audit log {self._path}: {exc.strerror}") from exc
        finally:
            self._current.size += written

    # -------------------------------------------------------------- rotation
    def rotate(self) -> Path | None:
        """Rotate now (whatever the size), unless the log is empty; returns the rotated
        file's path. Raises :class:`AuditError` if it fails (nothing is lost: the log
        goes on in the same file)."""
        with self._head_lock:
            with self._lock:
                if self._closed:
                    raise AuditError("audit log is closed")
                if self._broken or self._current.size == 0:
                    return None
                try:
                    return self._rotate_locked()
                except OSError as exc:
                    raise AuditError(
                        f"cannot rotate audit log {self._path}: {exc.strerror}"
                    ) from exc

    def _maybe_rotate(self) -> None:
        # Not blocking: a head rewrite (sync) in another thread may be in its fsync;
        # the next append tries again.
        if not self._head_lock.acquire(blocking=False):
            return
        try:
            with self._lock:
                if self._closed or self._broken or self._current.size < self._max_bytes:
                    return
                try:
                    self._rotate_locked()
                    self.last_rotate_error = None
                except OSError as exc:
                    self.last_rotate_error = exc
                    self._rotate_after = time.monotonic() + 1.0
        finally:
            self._head_lock.release()

    def _rotate_locked(self) -> Path:
        """Rename the log to ``<log>.<first>-<last>`` and start an empty one in its
        place. Caller holds ``_head_lock`` and ``_lock``. On OSError nothing changed."""
        first = self._current.first_seq if self._current.first_seq is not None else 0
        target = _rotated_path(self._path, first, self._seq)
        if os.path.lexists(target):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(target))
        # every line of the old file is on disk before its name changes, so a head
        # written later never claims lines that a crash could take away
        os.fsync(self._current.fd)
        temporary = _new_path(self._path)
        new_fd = os.open(
            temporary, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600
        )
        try:
            os.rename(self._path, target)
            try:
                os.rename(temporary, self._path)
            except OSError:
                os.rename(target, self._path)  # put the old file back
                raise
        except BaseException:
            os.close(new_fd)
            temporary.unlink(missing_ok=True)
            raise
        old, self._current = self._current, _OpenFile(new_fd, self._seq + 1, 0)
        os.close(old.fd)
        # the new names must be durable before a line (and a head) goes past them
        _fsync_directory(self._path.parent)
        return target

    def _cut_partial_line(self, written: int) -> bool:
        """Remove the last ``written`` bytes (a partial line); caller holds ``_lock``."""
        try:
            os.ftruncate(self._current.fd, os.fstat(self._current.fd).st_size - written)
        except OSError:
            return False
        return True

    def head(self) -> tuple[int, str]:
        """The chain's end: the last line's seq and the digest the next line will carry."""
        with self._lock:
            return self._seq, self._digest

    def datasync(self) -> None:
        """Flush the lines appended so far to disk (``fdatasync``), without the head.

        The key service calls it after the record of a state change and before the
        change commits. Raises :class:`AuditError` if the flush fails.
        """
        with self._lock:
            if self._closed:
                raise AuditError("audit log is closed")
            try:
                os.fdatasync(self._current.fd)
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
        # flushes them: the head never gets ahead of what is on disk. (A rotation,
        # which swaps the fd, needs _head_lock too, and fsyncs the old file first.)
        if full_sync:
            os.fsync(self._current.fd)
        else:
            os.fdatasync(self._current.fd)
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
            _fsync_directory(self._head_path.parent)
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
                os.close(self._current.fd)
                os.close(self._lock_fd)

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"seq={self._seq}"
        return f"<AuditLog {str(self._path)!r} {state}>"


def _fsync_directory(directory: Path) -> None:
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _finish_interrupted_rotation(path: Path) -> None:
    """Remove the empty ``<log>.new`` a rotation killed before its last rename left.

    Whether the log was renamed already or not, nothing was written to ``<log>.new``
    yet, so dropping it loses nothing; ``open`` then continues from the log, or from
    the newest rotated file if the rename happened. A ``<log>.new`` with content is
    not ours: refused.
    """
    leftover = _new_path(path)
    try:
        info = os.lstat(leftover)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise AuditError(f"cannot check {leftover}: {exc.strerror}") from exc
    if info.st_size != 0 or not os.path.isfile(leftover) or os.path.islink(leftover):
        raise AuditError(
            f"{leftover} is not an empty file left by an interrupted rotation; "
            "move it aside to continue the audit log"
        )
    try:
        leftover.unlink()
    except OSError as exc:
        raise AuditError(f"cannot remove {leftover}: {exc.strerror}") from exc


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


def _read_first_seq(path: Path) -> int | None:
    """The seq of the log's first line, or None if it is unreadable (only names a
    rotated file: verify judges the content)."""
    try:
        with open(path, "rb") as f:
            line = f.readline(MAX_LINE_BYTES + 1)
    except OSError as exc:
        raise AuditError(f"cannot read audit log {path}: {exc.strerror}") from exc
    link, _problem = _parse_link(line.rstrip(b"\n")) if line.endswith(b"\n") else (None, None)
    return link.seq if link is not None else None


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

    ``lines``: lines in the log, over all its files (a last line without newline counts).
    ``first_bad_line``: 1-based line number, within ``file``, of the first problem; for
    a removed tail, one past the last line; ``None`` when the problem is the head file.
    ``kind``: ``"edited"``, ``"removed"``, ``"inserted"``, ``"reordered"``,
    ``"tail removed"``, ``"truncated"``, ``"garbage"``, ``"head damaged"`` or
    ``"head missing"`` (only with ``require_head``).
    ``warnings``: things that are not tampering (no head file, head behind the log).
    ``file``: the file ``first_bad_line`` is in (a rotated file or the log itself).
    ``files``: how many files were checked (rotated files and the log).
    """

    ok: bool
    lines: int
    first_bad_line: int | None = None
    problem: str | None = None
    kind: str | None = None
    warnings: tuple[str, ...] = ()
    file: Path | None = None
    files: int = 1


class _Finding(NamedTuple):
    line: int | None  # position in the whole set (1-based)
    kind: str
    message: str
    missing: tuple[int, int] | None = None  # seq range a "removed" finding misses


_Label = Callable[[int], str]


class _SetReader:
    """The lines of a log's files, one stream; maps a position in it back to a file.

    The rotated files are read by name (they never change); the log itself through
    *current*, opened before the rotated files were listed (None: it is missing).
    """

    def __init__(self, rotated: list[Path], path: Path, current: BinaryIO | None) -> None:
        self.files = [*rotated, path]
        self.current = current
        self.offsets: list[int] = []  # lines before each file that was started
        self.total = 0

    def lines(self) -> Iterator[tuple[bytes, str]]:
        for path in self.files[:-1]:
            self.offsets.append(self.total)
            f = _open_log_file(path, required=False)
            if f is not None:  # else moved away meanwhile: its lines are missing
                with f:
                    yield from self._count(f)
        self.offsets.append(self.total)
        if self.current is not None:
            yield from self._count(self.current)

    def _count(self, f: BinaryIO) -> Iterator[tuple[bytes, str]]:
        for item in _read_lines(f):
            self.total += 1
            yield item

    def locate(self, pos: int) -> tuple[Path, int]:
        """(file, line within it) of position *pos*; past the end: in the last file."""
        index = 0
        for i, offset in enumerate(self.offsets):
            if offset < pos:
                index = i
        if not self.offsets:
            return self.files[-1], pos
        return self.files[index], pos - self.offsets[index]

    def label(self, pos: int) -> str:
        if len(self.files) == 1:
            return f"line {pos}"
        path, line = self.locate(pos)
        return f"line {line} of {path.name}"


def verify(path: Path, *, require_head: bool = False) -> VerifyReport:
    """Check the chain of the log at *path*, over its rotated files and itself, and
    its head file; stream, constant memory.

    Returns a report; tampering never raises. Raises :class:`AuditError` only if a
    file cannot be read (or there is neither log, rotated file nor head).
    """
    path = Path(path)
    # The head is read before the log: it is only ever rewritten after the log was
    # flushed, so a keyd appending meanwhile can make it fall behind, never ahead.
    # The log is opened before the rotated files are listed: a rotation meanwhile
    # shows the open log among them, and it is read once, through the open file.
    head, head_problem = _read_head(head_path(path))
    current, rotated = _history(path, required=False)
    try:
        if current is None and not rotated and head is None and head_problem is None:
            raise AuditError(f"no audit log at {path}")
        reader = _SetReader(rotated, path, current)
        return _check_chain(reader, head, head_problem, require_head, path)
    finally:
        if current is not None:
            current.close()


def _check_chain(
    reader: _SetReader,
    head: _Head | None,
    head_problem: str | None,
    require_head: bool,
    path: Path,
) -> VerifyReport:
    label = reader.label
    files = len(reader.files)
    warnings: list[str] = []
    lines = reader.lines()
    z = a = _GENESIS  # the lines before the current one (position-2, position-1)
    pos = 0
    head_line: tuple[int, str] | None = None  # (position, digest) of seq == head.seq
    if head is not None and head.seq == 0:
        head_line = (0, ZERO_DIGEST)
    finding: _Finding | None = None
    for raw, status in lines:
        pos += 1
        if status != "ok":
            finding = _structural_finding(pos, status, "", label)
            break
        b, problem = _parse_link(raw)
        if b is None:
            finding = _structural_finding(pos, status, problem or "", label)
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
        finding = _classify(broken_at, z, a, b, c, head, label)
        break

    def failed(line: int | None, problem: str, kind: str) -> VerifyReport:
        where, local = reader.locate(line) if line is not None else (None, None)
        if kind == "removed" and local == 1 and files > 1:
            problem += "; a rotated file is missing?"
        return VerifyReport(False, pos, local, problem, kind, (), where, files)

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
            return failed(
                finding.line,
                f"lines are out of order: {finding.message}, but seq {moved_to[0]} "
                f"appears later, at {label(moved_to[1])}",
                "reordered",
            )
        return failed(finding.line, finding.message, finding.kind)

    last = a
    if head_problem is not None:
        return VerifyReport(False, pos, None, head_problem, "head damaged", (), None, files)
    if head is None:
        message = (
            f"no head file ({head_path(path).name}): removal of the last lines cannot be detected"
        )
        if require_head:
            return VerifyReport(False, pos, None, message, "head missing", (), None, files)
        warnings.append(message)
    elif head.seq > last.seq:
        count = head.seq - last.seq
        removed = "1 line was" if count == 1 else f"{count} lines were"
        return failed(
            pos + 1,
            f"the log ends at {label(pos)} (seq {last.seq}) but its head file records "
            f"seq {head.seq}: {removed} removed from the end, from {label(pos + 1)} on",
            "tail removed",
        )
    elif head_line is not None and head_line[1] != head.digest:
        return failed(
            head_line[0],
            f"{label(head_line[0])} (seq {head.seq}) does not match the digest in the head "
            "file: it was edited, or the end of the log was replaced",
            "edited",
        )
    elif head.seq < last.seq:
        warnings.append(
            f"head behind log: the head file records seq {head.seq}, the log goes on to "
            f"seq {last.seq} (lines written shortly before an unclean stop, or while keyd "
            "is running, are not covered yet)"
        )
    return VerifyReport(True, pos, None, None, None, tuple(warnings), None, files)


def verify_or_raise(path: Path, *, require_head: bool = False) -> VerifyReport:
    """:func:`verify`, raising :class:`AuditTampered` if the log is not intact."""
    report = verify(path, require_head=require_head)
    if not report.ok:
        raise AuditTampered(report.problem or "audit log is not intact", report.first_bad_line or 0)
    return report


def _structural_finding(pos: int, status: str, problem: str, label: _Label) -> _Finding:
    if status == "partial":
        return _Finding(
            pos,
            "truncated",
            f"{label(pos)} is incomplete (no newline at its end): the log was cut off "
            "mid-line, garbage was appended, or a write was interrupted",
        )
    if status == "too long":
        return _Finding(pos, "garbage", f"{label(pos)} is longer than {MAX_LINE_BYTES} bytes")
    if problem == "is empty":
        return _Finding(pos, "garbage", f"{label(pos)} is empty")
    return _Finding(
        pos,
        "garbage" if problem == "is not valid JSON" else "edited",
        f"{label(pos)} {problem}: it was edited, or garbage was written into the log",
    )


def _classify(
    p: int,
    z: _Link,
    a: _Link,
    b: _Link,
    c: _Link | None,
    head: _Head | None,
    label: _Label,
) -> _Finding:
    """Say what happened when the link from line p-1 (*a*) to line p (*b*) is broken.

    *z* is line p-2, *c* line p+1 (None at the end of the log or if unreadable); the
    virtual line 0 (:data:`_GENESIS`) stands before line 1. One tampered line is
    assumed; each case names the evidence it rests on.
    """
    after = label(p - 1) if p > 1 else "the start"
    if b.prev == a.digest:
        # b records a's digest, so it really follows a: its seq was altered
        return _Finding(
            p,
            "edited",
            f"{label(p)} was edited: its seq is {b.seq} where {a.seq + 1} was expected "
            f"(its prevDigest does match {after})",
        )
    if b.seq > a.seq + 1:
        if c is not None and c.seq < b.seq:
            return _Finding(
                p,
                "reordered",
                f"lines are out of order: {label(p)} has seq {b.seq} after seq {a.seq}, and "
                f"{label(p + 1)} has seq {c.seq}",
            )
        lo, hi = a.seq + 1, b.seq - 1
        missing = f"seq {lo}" if lo == hi else f"seqs {lo}..{hi}"
        return _Finding(
            p,
            "removed",
            f"{'line' if lo == hi else 'lines'} with {missing} removed before {label(p)} "
            f"(seq jumps from {a.seq} to {b.seq})",
            (lo, hi),
        )
    if b.seq <= a.seq:
        if b.digest == a.digest:
            return _Finding(p, "inserted", f"{label(p)} duplicates {label(p - 1)}")
        if a is not _GENESIS and b.seq == a.seq and b.prev == z.digest:
            return _Finding(
                p - 1,
                "inserted",
                f"{label(p - 1)} was inserted: {label(p)} has the same seq {b.seq} and "
                f"continues the chain from the line before it",
            )
        if c is not None and c.seq == a.seq + 1 and c.prev == a.digest:
            return _Finding(
                p,
                "inserted",
                f"{label(p)} was inserted (seq {b.seq} repeated; {label(p + 1)} continues the "
                f"chain from {after})",
            )
        if b.seq < a.seq:
            return _Finding(
                p,
                "reordered",
                f"seq goes back from {a.seq} to {b.seq} at {label(p)}: lines reordered or "
                "a line inserted",
            )
        return _Finding(
            p, "inserted", f"{label(p)} repeats seq {b.seq}: a line was inserted or duplicated"
        )
    # b.seq == a.seq + 1 but b.prev != a.digest: a or b is not original
    if a is _GENESIS:
        return _Finding(
            p, "edited", f"{label(p)} was edited: the first line's prevDigest must be zeros"
        )
    if c is not None:
        if c.seq == b.seq and c.prev == a.digest:
            return _Finding(
                p,
                "inserted",
                f"{label(p)} was inserted: {label(p + 1)} has the same seq {b.seq} and "
                f"continues the chain from {label(p - 1)}",
            )
        if c.seq == b.seq + 1 and c.prev == b.digest:
            return _edited_before(p, label)
        return _Finding(
            p,
            "edited",
            f"{label(p)} was edited or replaced: its prevDigest does not match {label(p - 1)} "
            f"and {label(p + 1)} does not record its digest",
        )
    # b is the last readable line: only the head can vouch for a or b
    if head is not None and head.seq == b.seq:
        if head.digest == b.digest:
            return _edited_before(p, label)
        return _Finding(
            p,
            "edited",
            f"{label(p)} was edited or replaced: its prevDigest does not match {label(p - 1)} "
            "and its digest does not match the head file",
        )
    if head is not None and head.seq == a.seq and head.digest == a.digest:
        return _Finding(
            p,
            "inserted",
            f"{label(p)} does not continue the chain from {label(p - 1)} (which matches the "
            "head file): forged or edited",
        )
    return _Finding(
        p - 1,
        "edited",
        f"{label(p)} does not record the digest of {label(p - 1)}: {label(p - 1)} (or the "
        f"prevDigest of {label(p)}) was edited",
    )


def _edited_before(p: int, label: _Label) -> _Finding:
    return _Finding(
        p - 1,
        "edited",
        f"{label(p - 1)} was edited: its digest no longer matches the prevDigest recorded "
        f"by {label(p)}",
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
    event: Mapping[str, Any],
    *,
    key: str | None = None,
    event_name: str | None = None,
    user: str | None = None,
    denied: bool = False,
) -> bool:
    """The ``--key``/``--event``/``--user``/``--denied`` filter.

    *event_name* must equal ``eventName`` exactly. *key* matches when it is a
    substring of any key reference of the event (``requestParameters.keyId``,
    ``sourceKeyId``, ``destinationKeyId``, ``targetKeyId``, ``aliasName``;
    ``responseElements.keyId`` and ``keyMetadata.keyId``/``arn``; ``resources[].ARN``).
    So a bare KeyId matches requests naming the key by id or ARN; an alias matches the
    requests that named that alias (a request by alias also records the key's ARN in
    ``responseElements.keyId``, so filter those by the key's id).
    *user* names the caller as a login name (``userIdentity.userName``), a uid, or a
    principal ARN (``userIdentity.arn``; uid 0's user ARN ``...:user/root`` matches
    too). *denied*: only refusals (``errorCode`` ``AccessDeniedException``).
    """
    if event_name is not None and event.get("eventName") != event_name:
        return False
    if denied and event.get("errorCode") != "AccessDeniedException":
        return False
    if user is not None and not _user_matches(event, user):
        return False
    if key is not None:
        return any(key in ref for ref in event_key_ids(event))
    return True


def _user_matches(event: Mapping[str, Any], user: str) -> bool:
    identity = event.get("userIdentity")
    if not isinstance(identity, Mapping):
        return False
    name = identity.get("userName")
    uid = identity.get("uid")
    arn = identity.get("arn")
    if user in (name, arn) or (type(uid) is int and user == str(uid)):
        return True
    # the IAM user ARN of the caller (for root: besides its ...:root ARN)
    account = identity.get("accountId")
    return isinstance(name, str) and user == f"arn:aws:iam::{account}:user/{name}"


Matcher = Callable[[Mapping[str, Any]], bool]


def _matcher(
    key: str | None, event_name: str | None, user: str | None = None, denied: bool = False
) -> Matcher:
    def match(record: Mapping[str, Any]) -> bool:
        return matches(record, key=key, event_name=event_name, user=user, denied=denied)

    return match


def _open_log_file(path: Path, *, required: bool) -> BinaryIO | None:
    try:
        return open(path, "rb")  # noqa: SIM115 - the caller closes it
    except FileNotFoundError:
        if required:
            raise AuditError(f"cannot read audit log {path}: no such file") from None
        return None
    except OSError as exc:
        raise AuditError(f"cannot read audit log {path}: {exc.strerror}") from exc


def _history(path: Path, *, required: bool = True) -> tuple[BinaryIO | None, list[Path]]:
    """The log opened (None if it is missing) and its rotated files, oldest first,
    without the one the open log has become if it was rotated meanwhile (the log is
    opened first, so no line falls between the two). *required*: raise if there is
    neither."""
    current = _open_log_file(path, required=False)
    try:
        rotated = rotated_files(path)
        if required and current is None and not rotated:
            raise AuditError(f"cannot read audit log {path}: no such file")
        if current is not None:
            own = os.fstat(current.fileno())
            rotated = [item for item in rotated if not _same_file(item, own.st_dev, own.st_ino)]
    except BaseException:
        if current is not None:
            current.close()
        raise
    return current, rotated


def _same_file(path: Path, dev: int, ino: int) -> bool:
    try:
        info = os.stat(path)
    except OSError:
        return False
    return (info.st_dev, info.st_ino) == (dev, ino)


def iter_events(
    path: Path,
    *,
    key: str | None = None,
    event_name: str | None = None,
    user: str | None = None,
    denied: bool = False,
) -> Iterator[dict[str, Any]]:
    """The log's events (with their ``seq``/``prevDigest``) that match the filters,
    oldest first -- the rotated files' first, then the log's -- streaming. Lines that
    are not JSON objects (and an incomplete last line of a file) are skipped: reading
    is not verifying -- use :func:`verify` for that."""
    path = Path(path)
    match = _matcher(key, event_name, user, denied)
    current, rotated = _history(path)
    try:
        for item in rotated:
            f = _open_log_file(item, required=False)
            if f is None:
                continue  # moved away meanwhile
            with f:
                yield from _matching(f, match)
        if current is not None:
            yield from _matching(current, match)
    finally:
        if current is not None:
            current.close()


def _matching(f: BinaryIO, match: Matcher) -> Iterator[dict[str, Any]]:
    for raw, status in _read_lines(f):
        if status != "ok":
            continue
        record = _parse_record(raw)
        if record is not None and match(record):
            yield record


def tail(
    path: Path,
    n: int = 20,
    *,
    follow: bool = False,
    key: str | None = None,
    event_name: str | None = None,
    user: str | None = None,
    denied: bool = False,
    poll_interval: float = 0.25,
    stop: threading.Event | None = None,
) -> Iterator[dict[str, Any]]:
    """The last *n* matching events, oldest first; with *follow*, then every matching
    event appended later, as it is appended (polling every *poll_interval* s).

    The log is read backwards from its end, then the rotated files newest first while
    fewer than *n* events were found, so a short tail of a huge log is cheap.
    Following waits for a line's newline before yielding it, and starts over from
    the beginning of the file if the log is truncated or replaced (rotated), after
    reading what the old file got last. It runs
    until the consumer stops iterating or *stop* is set. Unparseable lines are skipped
    (see :func:`iter_events`).
    """
    if n < 0:
        raise ValueError("n must be >= 0")
    path = Path(path)
    match = _matcher(key, event_name, user, denied)
    current, rotated = _history(path)
    try:
        end = 0
        if current is not None:
            size = os.fstat(current.fileno()).st_size
            end = _line_start(current, size, limit=None) or 0  # after the last complete line
        if n:
            newest: list[dict[str, Any]] = []
            if current is not None:
                _collect_backward(current, end, n, match, newest)
            for item in reversed(rotated):
                if len(newest) >= n:
                    break
                f = _open_log_file(item, required=False)
                if f is None:
                    continue
                with f:
                    item_end = _line_start(f, os.fstat(f.fileno()).st_size, limit=None) or 0
                    _collect_backward(f, item_end, n, match, newest)
            yield from reversed(newest)
        if not follow:
            return
        while current is None:  # the log is being started by a rotation: wait for it
            if stop is not None and stop.is_set():
                return
            if stop is not None:
                stop.wait(poll_interval)
            else:
                time.sleep(poll_interval)
            current = _open_log_file(path, required=False)
        yield from _follow(current, path, end, match, poll_interval, stop)
    finally:
        if current is not None:
            current.close()


def _collect_backward(
    f: BinaryIO,
    end: int,
    n: int,
    match: Matcher,
    newest: list[dict[str, Any]],
) -> None:
    """Add to *newest* (newest first) matching events of ``f[0:end]`` until it holds *n*."""
    if len(newest) >= n:
        return
    for raw in _lines_backward(f, end):
        record = _parse_record(raw) if raw else None
        if record is not None and match(record):
            newest.append(record)
            if len(newest) >= n:
                return


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
    match: Matcher,
    poll_interval: float,
    stop: threading.Event | None,
) -> Iterator[dict[str, Any]]:
    buffer = b""
    skipping = False  # dropping a line that grew past MAX_LINE_BYTES
    current = f
    draining = False  # the log was replaced: reading what the old file got last
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
                    if record is not None and match(record):
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
                if not draining:
                    # keyd may have written to the old file after our last read and
                    # before renaming it: read it to its end once more first
                    replacement.close()
                    draining = True
                    continue
                if current is not f:
                    current.close()
                current, offset, buffer, skipping = replacement, 0, b"", False
                draining = False
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
    if uid is None:  # a SigV4-signed caller (keyd over TCP): its access key and address
        uid = identity.get("accessKeyId") or "?"
        if event.get("sourceIPAddress"):
            uid = f"{uid}@{event['sourceIPAddress']}"
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
