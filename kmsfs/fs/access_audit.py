"""``kmsfs mount --audit-opens``: every open, create, unlink and rename, in keyd's audit log.

The FUSE handlers of those four operations are wrapped (:func:`audited`); once the
operation is done -- its outcome known: allowed, or the errno of the FUSEError it
raised (a key refusal is EACCES, as the application saw it) -- the wrapper calls
:meth:`AccessAuditor.record`, which only appends a tuple to an in-memory queue: it never
blocks and never talks to keyd. Nothing is added to read and write.

:meth:`AccessAuditor.run` (a task of the mount's nursery) sends the queue to keyd's
``RecordAccessEvents`` (:mod:`kmsfs.kms.access_events`) on a connection of its own: one
call per flush, at most :data:`BATCH_EVENTS` events (and :data:`BATCH_BYTES` of JSON,
under keyd's request size limit), at most once per :data:`FLUSH_INTERVAL` unless a full
batch is waiting. Events leave the queue only once keyd has answered that it wrote
their records. While keyd does not answer they stay queued and the call is retried
(backing off to :data:`MAX_RETRY_DELAY`); past ``max_queue`` new events are not kept
but counted, and the count is sent as a ``Gap`` (one ``AccessEventsLost`` record) with
the next call keyd answers: never silently dropped. At unmount the queue is flushed
(bounded by :data:`UNMOUNT_FLUSH_SECONDS`); what could not be delivered is logged.

What an event says: time, uid, gid, pid, the executable (``/proc/<pid>/exe``, read when
the event happens; "" if unreadable), the operation, the access mode and flags, the file
id and the outcome. The file id is the one in the file's header (16 random bytes, 32
hex digits) -- read from the open file for an open, from the backing file before an
unlink or a rename (only when auditing) -- or ``ino:<n>``, the backing inode number,
for an entry without a header (a new or empty file, a symlink, a directory; for a
create that failed, the directory's). No names: :func:`resolve` (``kmsfs keyd audit
resolve CIPHERDIR``) maps file ids back to paths for someone who can unlock the cipher
directory.

Note: with the write-back cache (which kmsfs enables) the kernel opens a file it is
asked to open O_WRONLY as O_RDWR, so such opens are recorded as O_RDWR.
"""

from __future__ import annotations

import collections
import datetime as dt
import errno
import functools
import json
import logging
import math
import os
import stat
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pyfuse3
import trio

from kmsfs.errors import KeydUnavailable, KMSError, KMSInternalException
from kmsfs.format.header import MAGIC

log = logging.getLogger("kmsfs.mount")

T = TypeVar("T")

#: most events per keyd call (keyd's limit: kmsfs.kms.access_events.MAX_EVENTS)
BATCH_EVENTS = 1000
#: most JSON bytes of events per call: keyd refuses request bodies over 256 KiB; 1 KiB
#: is left for the rest of the request (a typical event is about 250 bytes: 1,000 fit)
BATCH_BYTES = 255 * 1024
#: at most one call per this many seconds, unless a full batch is waiting
FLUSH_INTERVAL = 0.1
#: retry delays while keyd does not answer: doubling from FLUSH_INTERVAL to this
MAX_RETRY_DELAY = 2.0
#: how long the unmount waits for the queue to be delivered
UNMOUNT_FLUSH_SECONDS = 5.0
#: the longest executable path sent (keyd accepts PATH_MAX)
MAX_EXECUTABLE = 4096
#: the header's file id: after magic (8), version (2), context length (2), chunk size (4)
_FILE_ID_OFFSET = 16
_FILE_ID_END = _FILE_ID_OFFSET + 16
_ENCODER = json.JSONEncoder(separators=(",", ":"))
#: reading a header's file id: never a symlink, never waiting (a FIFO: not regular, not
#: read), and not touching the backing file's access time (an atime update would cost
#: the read a journal write: this is on the unlink path)
_ID_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
_NOATIME = getattr(os, "O_NOATIME", 0)
#: no file (a failure before any entry was found)
NO_FILE = "ino:0"

_OPEN_FLAGS = (
    (os.O_APPEND, "O_APPEND"),
    (os.O_CREAT, "O_CREAT"),
    (os.O_EXCL, "O_EXCL"),
    (os.O_TRUNC, "O_TRUNC"),
    (os.O_SYNC, "O_SYNC"),
    (os.O_DSYNC, "O_DSYNC"),
    (getattr(os, "O_DIRECT", 0), "O_DIRECT"),
    (getattr(os, "O_NOATIME", 0), "O_NOATIME"),
    (os.O_NONBLOCK, "O_NONBLOCK"),
)
_RENAME_FLAGS = ((1, "RENAME_NOREPLACE"), (2, "RENAME_EXCHANGE"), (4, "RENAME_WHITEOUT"))
RENAME_EXCHANGE = 2
_ACCESS_MODES = {os.O_RDONLY: "O_RDONLY", os.O_WRONLY: "O_WRONLY", os.O_RDWR: "O_RDWR"}
# O_SYNC includes O_DSYNC's bit: name O_DSYNC only when O_SYNC is not set
_SYNC_BITS = os.O_SYNC


def iso_time(timestamp: float) -> str:
    """``YYYY-MM-DDTHH:MM:SS.ffffffZ`` (UTC) of a time.time() value."""
    return dt.datetime.fromtimestamp(timestamp, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class _IsoTimes:
    """:func:`iso_time`, with the whole seconds' text kept from one call to the next (a
    batch's events share their seconds: a third of the cost per event)."""

    __slots__ = ("_second", "_prefix")

    def __init__(self) -> None:
        self._second = -1
        self._prefix = ""

    def __call__(self, timestamp: float) -> str:
        # as datetime.fromtimestamp rounds: the fraction alone, half to even
        fraction_part, whole = math.modf(timestamp)
        second, fraction = int(whole), round(fraction_part * 1_000_000)
        if fraction >= 1_000_000:
            second, fraction = second + 1, fraction - 1_000_000
        if second != self._second:
            self._prefix = dt.datetime.fromtimestamp(second, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S")
            self._second = second
        return f"{self._prefix}.{fraction:06d}Z"


@functools.lru_cache(maxsize=256)
def _json_string(text: str) -> str:
    """*text* as a JSON string (executables: few per batch, encoded once)."""
    return _ENCODER.encode(text)


def outcome_of(code: int) -> str:
    """The errno name of *code* (``EACCES``), as RecordAccessEvents takes it."""
    return errno.errorcode.get(code, "EIO")


def flag_names(operation: str, flags: int) -> tuple[str | None, list[str]]:
    """(access mode, other flag names) of an open's flags, or of a rename's."""
    if operation == "Rename":
        return None, [name for bit, name in _RENAME_FLAGS if flags & bit]
    if operation == "Unlink":
        return None, []
    mode = _ACCESS_MODES.get(flags & os.O_ACCMODE, "O_RDWR")
    names = []
    for bit, name in _OPEN_FLAGS:
        if not bit or flags & bit != bit:
            continue
        if name == "O_DSYNC" and flags & _SYNC_BITS == _SYNC_BITS:
            continue
        names.append(name)
    return mode, names


def executable_of(pid: int) -> str:
    """The path of *pid*'s executable (``/proc/<pid>/exe``), "" if unreadable. Bytes
    that are not UTF-8 are shown as ``\\xNN``."""
    try:
        raw = os.readlink(f"/proc/{pid}/exe".encode())
    except OSError:
        return ""
    return raw.decode("utf-8", "backslashreplace")[:MAX_EXECUTABLE]


def file_id_at(dir_fd: int | None, name: bytes, st: os.stat_result | None = None) -> str:
    """The file id of backing entry *name* (in *dir_fd*; a path if None; *st*: its
    lstat, if the caller has it): its header's id (32 hex digits) for a regular file that
    has one, else ``ino:<backing inode>``. The id is read, not authenticated: it names a
    file, it protects nothing."""
    if st is None:
        st = os.lstat(name, dir_fd=dir_fd)
    if stat.S_ISREG(st.st_mode) and st.st_size >= _FILE_ID_END:
        try:
            fd = os.open(name, _ID_READ_FLAGS | _NOATIME, dir_fd=dir_fd)
        except PermissionError:  # O_NOATIME: only for the file's owner (or CAP_FOWNER)
            try:
                fd = os.open(name, _ID_READ_FLAGS, dir_fd=dir_fd)
            except OSError:
                return f"ino:{st.st_ino}"
        except OSError:
            return f"ino:{st.st_ino}"
        try:
            return file_id_of_fd(fd) or f"ino:{st.st_ino}"
        finally:
            os.close(fd)
    return f"ino:{st.st_ino}"


def file_id_of_fd(fd: int) -> str | None:
    """The header's file id of the backing file open at *fd*, None if it has none."""
    try:
        fixed = os.pread(fd, _FILE_ID_END, 0)
    except OSError:
        return None
    if len(fixed) < _FILE_ID_END or fixed[: len(MAGIC)] != MAGIC:
        return None
    return fixed[_FILE_ID_OFFSET:_FILE_ID_END].hex()


@dataclass(slots=True)
class _Event:
    sequence: int
    when: float
    uid: int
    gid: int
    pid: int
    executable: str
    operation: str
    flags: int
    file_id: str
    outcome: str

    def text(self, times: Callable[[float], str] = iso_time) -> str:
        """The event as RecordAccessEvents takes it, in JSON (written here, not through a
        dict and the encoder: half the cost; the operation, file id, outcome and flag
        names are tokens of letters, digits, "_" and ":", which JSON takes as they are)."""
        mode, names = flag_names(self.operation, self.flags)
        text = (
            f'{{"Time":"{times(self.when)}","Uid":{self.uid},"Gid":{self.gid},'
            f'"Pid":{self.pid},"Executable":{_json_string(self.executable)},'
            f'"Operation":"{self.operation}","FileId":"{self.file_id}",'
            f'"Outcome":"{self.outcome}","Sequence":{self.sequence}'
        )
        if mode is not None:
            text += f',"AccessMode":"{mode}"'
        if names:
            text += ',"Flags":["' + '","'.join(names) + '"]'
        return text + "}"


class AccessAuditor:
    """The mount's queue of access events and the task that delivers them to keyd.

    *client*: an ``AsyncKMSClient`` of its own (a keyd connection not shared with the
    mount's key requests). *clock* gives the events' times (``time.time``);
    *read_executable* the executable of a pid (tests give fakes).
    """

    def __init__(
        self,
        client: Any,
        filesystem_id: str,
        max_queue: int = 100_000,
        *,
        clock: Callable[[], float] = time.time,
        read_executable: Callable[[int], str] = executable_of,
    ) -> None:
        self.client = client
        self.filesystem_id = filesystem_id
        self.max_queue = max_queue
        self.clock = clock
        self.read_executable = read_executable
        self._queue: collections.deque[_Event] = collections.deque()
        #: this mount's session and its event numbers: keyd leaves out what a retried
        #: call repeats (kmsfs.kms.access_events, "Exactly once")
        self.session = uuid.uuid4().hex
        self._next_sequence = 1
        #: the gap being reported (frozen with its number until keyd took it)
        self._gap: dict[str, Any] | None = None
        #: events not kept (the queue was full) and not yet in a reported gap, and when
        self.lost = 0
        self._lost_since = 0.0
        self._lost_until = 0.0
        #: set when there is something to send; replaced once everything was sent
        self._work = trio.Event()
        #: set when a full batch waits
        self._batch_full = trio.Event()
        self._last_flush = float("-inf")
        #: figures for logs and tests
        self.delivered = 0
        self.calls = 0
        self.failures = 0
        self._failing = False

    @property
    def pending(self) -> int:
        return len(self._queue)

    # ------------------------------------------------------------ recording
    def record(self, ctx: Any, operation: str, flags: int, file_id: str, outcome: str) -> None:
        """Queue one event (from the trio thread). Never blocks, never calls keyd."""
        now = self.clock()
        if len(self._queue) >= self.max_queue:
            if not self.lost:
                self._lost_since = now
            self.lost += 1
            self._lost_until = now
        else:
            self._queue.append(
                _Event(
                    self._take_sequence(),
                    now,
                    ctx.uid,
                    ctx.gid,
                    ctx.pid,
                    self.read_executable(ctx.pid),
                    operation,
                    flags,
                    file_id,
                    outcome,
                )
            )
            if len(self._queue) >= BATCH_EVENTS:
                self._batch_full.set()
        self._work.set()

    def _take_sequence(self) -> int:
        sequence = self._next_sequence
        self._next_sequence += 1
        return sequence

    @property
    def unreported(self) -> int:
        """Events lost and not yet taken by keyd as a gap."""
        return self.lost + (self._gap["Count"] if self._gap is not None else 0)

    # ------------------------------------------------------------ delivering
    async def run(self) -> None:
        """Deliver the queue until cancelled (the mount's nursery)."""
        retry_delay = FLUSH_INTERVAL
        while True:
            await self._work.wait()
            wait = self._last_flush + FLUSH_INTERVAL - trio.current_time()
            if wait > 0 and len(self._queue) < BATCH_EVENTS:
                with trio.move_on_after(wait):
                    await self._batch_full.wait()
            self._last_flush = trio.current_time()
            if await self.flush_once():
                retry_delay = FLUSH_INTERVAL
            else:
                await trio.sleep(retry_delay)
                retry_delay = min(retry_delay * 2, MAX_RETRY_DELAY)

    def _batch(self) -> list[str]:
        """The oldest events, in JSON: at most BATCH_EVENTS and BATCH_BYTES."""
        batch: list[str] = []
        size = 0
        times = _IsoTimes()
        for event in self._queue:
            if len(batch) >= BATCH_EVENTS:
                break
            text = event.text(times)
            cost = len(text) + 1  # ASCII: the encoder escapes everything else
            if batch and size + cost > BATCH_BYTES:
                break
            batch.append(text)
            size += cost
        return batch

    async def flush_once(self) -> bool:
        """One keyd call with the oldest events (and the gap count, if any). True if
        keyd took them (or there was nothing to send)."""
        batch = self._batch()
        if self._gap is None and self.lost:
            # frozen: a retry repeats it with the same number (losses meanwhile go to
            # the next gap)
            self._gap = {
                "Count": self.lost,
                "Since": iso_time(self._lost_since),
                "Until": iso_time(self._lost_until),
                "Sequence": self._take_sequence(),
            }
            self.lost = 0
        if not batch and self._gap is None:
            self._idle()
            return True
        # the request's JSON from the events' (the filesystem id and the session are
        # hex digits)
        body = (
            f'{{"FilesystemId":"{self.filesystem_id}","MountSession":"{self.session}",'
            f'"Events":[{",".join(batch)}]'
        )
        if self._gap is not None:
            body += ',"Gap":' + _ENCODER.encode(self._gap)
        self.calls += 1
        try:
            # not cancelled half way (the mount's nursery at unmount): keyd may have
            # written the records already; the client's own timeout bounds the wait
            with trio.CancelScope(shield=True):
                await self.client.call_encoded("RecordAccessEvents", (body + "}").encode())
        except (KeydUnavailable, KMSInternalException) as error:
            # keyd down, or it cannot write its log now (StorageUnavailableException):
            # keep everything and retry
            self.failures += 1
            if not self._failing:
                log.warning(
                    "access audit: keyd did not take %d event(s), keeping them: %s",
                    len(batch),
                    error,
                )
                self._failing = True
            return False
        except KMSError as error:
            # refused for good (an old keyd without RecordAccessEvents, a policy): these
            # events can never be recorded; they are counted as lost and the next call
            # reports them as a gap
            self.failures += 1
            log.error(
                "access audit: keyd refused %d event(s) (%s); counting them as lost",
                len(batch),
                error,
            )
            if batch:
                first = self._queue[0].when
                for _ in batch:
                    last = self._queue.popleft().when
                if not self.lost:
                    self._lost_since = first
                self.lost += len(batch)
                self._lost_until = max(self._lost_until, last)
                return True
            return False  # the gap alone was refused: keep counting, retry later
        if self._failing:
            log.warning("access audit: keyd answers again; delivering the queued events")
            self._failing = False
        for _ in batch:
            self._queue.popleft()
        self.delivered += len(batch)
        self._gap = None
        if len(self._queue) < BATCH_EVENTS:
            self._batch_full = trio.Event()
        self._idle()
        return True

    def _idle(self) -> None:
        if not self._queue and not self.lost and self._gap is None:
            self._work = trio.Event()

    async def drain(self, seconds: float = UNMOUNT_FLUSH_SECONDS) -> None:
        """Deliver everything queued, for at most *seconds* (at unmount); log what
        could not be delivered."""
        with trio.move_on_after(seconds):
            retry_delay = FLUSH_INTERVAL
            while self._queue or self.unreported:
                if await self.flush_once():
                    retry_delay = FLUSH_INTERVAL
                else:
                    await trio.sleep(retry_delay)
                    retry_delay = min(retry_delay * 2, MAX_RETRY_DELAY)
        if self._queue or self.unreported:
            log.error(
                "access audit: %d event(s) not delivered and %d lost at unmount "
                "(keyd did not answer within %g s)",
                len(self._queue),
                self.unreported,
                seconds,
            )


# ------------------------------------------------------------------ the hooks
def _errno_name(error: pyfuse3.FUSEError) -> str:
    return outcome_of(error.errno)


def _safely(find: Callable[[], str]) -> str:
    """A file id, or NO_FILE when it cannot be found: auditing never fails a request."""
    try:
        return find()
    except Exception:  # the entry is gone, a name does not decrypt, ...
        return NO_FILE


def _open_file_id(ops: Any, inode: int) -> str:
    node = ops.inodes.nodes.get(inode)
    open_file = node.open_file if node is not None else None
    if open_file is not None:
        header = open_file.engine.header
        if header is not None:
            return header.file_id.hex()
        return f"ino:{os.fstat(open_file.fd).st_ino}"
    dir_fd, name = ops.inodes.entry_at(inode)
    return file_id_at(dir_fd, name)


def _child_file_id(ops: Any, parent: int, name: bytes) -> str:
    _directory, entry, dir_fd = ops._child_at(parent, name)
    return file_id_at(dir_fd, entry.backing)


def _directory_id(ops: Any, parent: int) -> str:
    _directory, dir_fd = ops.inodes.dir_at(parent)
    return f"ino:{os.fstat(dir_fd).st_ino}"


async def _audit_open(ops: Any, auditor: AccessAuditor, handler: Any, args: tuple) -> Any:
    inode, flags, ctx = args
    try:
        result = await handler(ops, *args)
    except pyfuse3.FUSEError as error:
        file_id = _safely(lambda: _open_file_id(ops, inode))
        auditor.record(ctx, "Open", flags, file_id, _errno_name(error))
        raise
    auditor.record(ctx, "Open", flags, _safely(lambda: _remember_header_id(ops, inode)), "Allowed")
    return result


async def _audit_create(ops: Any, auditor: AccessAuditor, handler: Any, args: tuple) -> Any:
    parent, _name, _mode, flags, ctx = args
    try:
        result = await handler(ops, *args)
    except pyfuse3.FUSEError as error:
        file_id = _safely(lambda: _directory_id(ops, parent))
        auditor.record(ctx, "Create", flags, file_id, _errno_name(error))
        raise
    file_id = _safely(lambda: _open_file_id(ops, result[1].st_ino))
    auditor.record(ctx, "Create", flags, file_id, "Allowed")
    return result


def unlinked_file_id(dir_fd: int, name: bytes, st: os.stat_result, node: Any) -> str:
    """For ``Operations.unlink`` on an audited mount: the file id of the entry it is about
    to remove, read with the lstat it made (a second lookup and lstat here cost a fifth of
    an unlink). *node*: its inode's Node if the kernel knows it: when an audited open
    read the header and the file has not changed since (the same ctime and size: every
    write, truncate, chmod or new link moves ctime), the id is the one read then, and
    the header is not read again."""
    known = node.header_id if node is not None and node.st_ino == st.st_ino else None
    if known is not None and known[0] == st.st_ctime_ns and known[1] == st.st_size:
        return known[2]
    return _safely(lambda: file_id_at(dir_fd, name, st))


def _remember_header_id(ops: Any, inode: int) -> str:
    """The id of the file open at *inode* (its header's), kept on its node with the
    backing file's ctime and size for a later unlink (:func:`unlinked_file_id`)."""
    node = ops.inodes.nodes.get(inode)
    open_file = node.open_file if node is not None else None
    header = open_file.engine.header if open_file is not None else None
    if header is None:
        if node is not None:
            node.header_id = None
        return _open_file_id(ops, inode)
    file_id = header.file_id.hex()
    st = os.fstat(open_file.fd)
    node.header_id = (st.st_ctime_ns, st.st_size, file_id)
    return file_id


async def _audit_unlink(ops: Any, auditor: AccessAuditor, handler: Any, args: tuple) -> None:
    parent, name, ctx = args
    try:
        # the handler returns the removed file's id (unlinked_file_id) when auditing
        file_id = await handler(ops, *args)
    except pyfuse3.FUSEError as error:
        # refused before it removed anything (a key policy, ENOENT...): the entry, if any,
        # is still there
        file_id = _safely(lambda: _child_file_id(ops, parent, name))
        auditor.record(ctx, "Unlink", 0, file_id, _errno_name(error))
        raise
    auditor.record(ctx, "Unlink", 0, file_id if isinstance(file_id, str) else NO_FILE, "Allowed")


async def _audit_rename(ops: Any, auditor: AccessAuditor, handler: Any, args: tuple) -> Any:
    """A rename's event names the moved file. The entry at the new name, if there is one,
    gets an event too once the rename is done: with RENAME_EXCHANGE it moved the other
    way (a second Rename); otherwise the rename removed it, as an unlink would have (an
    Unlink, so that a file's removal is in the trail however it happened)."""
    parent_old, name_old, parent_new, name_new, flags, ctx = args
    file_id = _safely(lambda: _child_file_id(ops, parent_old, name_old))
    target_id = _safely(lambda: _child_file_id(ops, parent_new, name_new))
    try:
        result = await handler(ops, *args)
    except pyfuse3.FUSEError as error:
        auditor.record(ctx, "Rename", flags, file_id, _errno_name(error))
        raise
    auditor.record(ctx, "Rename", flags, file_id, "Allowed")
    if target_id != NO_FILE and target_id != file_id:  # (a rename onto a hard link of
        # itself changes nothing: POSIX)
        if flags & RENAME_EXCHANGE:
            auditor.record(ctx, "Rename", flags, target_id, "Allowed")
        else:
            auditor.record(ctx, "Unlink", 0, target_id, "Allowed")
    return result


_HOOKS = {
    "Open": _audit_open,
    "Create": _audit_create,
    "Unlink": _audit_unlink,
    "Rename": _audit_rename,
}


def audited(operation: str) -> Callable[[Callable[..., Awaitable[T]]], Callable[..., Awaitable[T]]]:
    """Wrap a FUSE handler (already wrapped by ops._handler, so its failures are
    FUSEErrors) of *operation* so that it is recorded when ``ops.auditor`` is set."""
    hook = _HOOKS[operation]

    def decorate(handler: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
        @functools.wraps(handler)
        async def wrapper(ops: Any, *args: Any) -> T:
            auditor = ops.auditor
            if auditor is None:
                return await handler(ops, *args)
            return await hook(ops, auditor, handler, args)

        return wrapper

    return decorate


# ------------------------------------------------------------------ resolving
def file_ids(tree: Any) -> Iterator[tuple[str, str]]:
    """(file id, plaintext path) of every entry of the cipher directory *tree* (a
    CipherTree): a regular file's header id, and every entry's ``ino:<n>``."""
    from kmsfs.fs.offline import list_entries

    root_st = os.lstat(tree.root)
    yield f"ino:{root_st.st_ino}", "/"
    for item in list_entries(tree, "", recursive=True):
        backing = os.path.join(tree.root, os.fsencode(item.backing))
        try:
            st = os.lstat(backing)
        except OSError:
            continue
        plain = "/" + item.path
        yield f"ino:{st.st_ino}", plain
        if stat.S_ISREG(st.st_mode):
            try:
                file_id = file_id_at(None, backing)
            except OSError:
                continue
            if not file_id.startswith("ino:"):
                yield file_id, plain


def resolve(tree: Any) -> dict[str, list[str]]:
    """Every file id of the cipher directory, with the plaintext paths that carry it
    (hard links: several)."""
    found: dict[str, list[str]] = {}
    for file_id, path in file_ids(tree):
        found.setdefault(file_id, []).append(path)
    return found


def access_events(log_path: Path) -> Iterator[dict[str, Any]]:
    """The access records (``eventSource`` kmsfs-mount) of keyd's audit log."""
    from kmsfs.kms import audit
    from kmsfs.kms.access_events import EVENT_SOURCE

    for event in audit.iter_events(log_path):
        if event.get("eventSource") == EVENT_SOURCE:
            yield event
