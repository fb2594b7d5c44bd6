"""The FUSE operations: a POSIX filesystem whose regular files are stored encrypted.

Directories, symlinks, fifos, sockets, modes, owners, timestamps and link counts are
those of the backing entries in CIPHERDIR; regular files go through the format's
random-access engine (:class:`kmsfs.format.EncryptedFile`), one per inode, shared by
every handle open on it. Extended attributes are encrypted (``xattrs.py``).

All handlers run on the trio thread. Engine calls are synchronous, so the only places
where two requests interleave are the awaits on keyd (opening a file, giving an empty
file its first data key; those hold the inode's lock) and fsync, whose backing-file fsync
runs in a thread (it touches no engine state).

A failure to store a file's data (a full disk...) is told to every writer: see
``Operations._storing_failed``. While the backing filesystem is short of space, files are
opened with direct_io so that write() itself returns ENOSPC/EDQUOT: see
``Operations._open_mode``.

Backing entries are reached through the inode table's cached directory descriptors
(``*at`` calls, or short ``/proc/self/fd/N/name`` paths; see ``inodes.py``), never
through whole backing paths, which would exceed PATH_MAX long before the plaintext ones.

Errors: every handler goes through :func:`_errno_of` — the one place that maps
kmsfs's typed errors to errno. Nothing a request does can end the mount.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import logging
import os
import stat
import struct
import threading
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pyfuse3
import trio

from kmsfs.errors import (
    CorruptChunk,
    FileTooLarge,
    FormatError,
    KeydUnavailable,
    KMSError,
    KmsfsError,
    UsageError,
)
from kmsfs.format import EncryptedFile, plaintext_size
from kmsfs.format.header import Header, read_header
from kmsfs.fs.access_audit import AccessAuditor, audited, unlinked_file_id
from kmsfs.fs.config import FsConfig
from kmsfs.fs.inodes import ROOT, InodeTable, Node
from kmsfs.fs.key_xattr import KEY_XATTR, MountKeyBindings
from kmsfs.fs.keys import FileKeyProvider, KeyManager
from kmsfs.fs.names import NameError_
from kmsfs.fs.pagefill import ChunkFiller
from kmsfs.fs.polling import BusyPoller
from kmsfs.fs.prefetch import SEQUENTIAL_MIN, Prefetcher, Stream
from kmsfs.fs.tree import CipherTree, Entry, shown_path
from kmsfs.fs.xattrs import USER_PREFIX, XattrCipher
from kmsfs.kms.caller import ForwardedCaller

log = logging.getLogger("kmsfs.mount")

ATTR_TIMEOUT = 1.0
#: free space on the backing filesystem (for unprivileged users, statvfs f_bavail) below
#: which a file opened for writing bypasses the kernel's write-back cache: 8 x libfuse's
#: max_write of 1 MiB (one write() becomes at most 1 MiB WRITE requests)
LOW_SPACE = 8 << 20
_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
ENTRY_TIMEOUT = 1.0
#: how long the kernel may remember that a name is not there (a LOOKUP answered with
#: inode 0, libfuse's negative entry): as long as it keeps a name that is (ENTRY_TIMEOUT)
NEGATIVE_ENTRY_TIMEOUT = ENTRY_TIMEOUT
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
_AT_FDCWD = -100
_SET_ID = stat.S_ISUID | stat.S_ISGID
_REFUSED_BY_KEY = {
    "DisabledException",
    "KMSInvalidStateException",
    "NotFoundException",
    "AccessDeniedException",
}

_libc = ctypes.CDLL(None, use_errno=True)

T = TypeVar("T")


def _errno_of(error: BaseException) -> int:
    """The one place where kmsfs's errors become errno values."""
    if isinstance(error, OSError):
        return error.errno or errno.EIO
    if isinstance(error, FileTooLarge):
        return errno.EFBIG
    if isinstance(error, KMSError):
        return errno.EACCES if error.aws_type in _REFUSED_BY_KEY else errno.EIO
    if isinstance(error, (KeydUnavailable, FormatError)):
        return errno.EIO
    if isinstance(error, UsageError):
        return errno.EINVAL
    return errno.EIO


def _invalidate_inode(ino: int) -> None:
    """pyfuse3.invalidate_inode; an inode the kernel has forgotten has nothing to drop."""
    try:
        pyfuse3.invalidate_inode(ino)
    except OSError as error:
        log.debug("invalidating inode %d: %s", ino, os.strerror(error.errno or 0))


def _kernel_truncate(
    mountpoint: bytes, ino: int, size: int, own_threads: set[int], path: bytes | None = None
) -> None:
    """ftruncate inode ``ino`` of the FUSE mount to ``size``, through the kernel.

    The file is opened by its FUSE file handle (node id, generation 0: what the kernel's
    fuse_encode_fh makes of our inodes), which needs CAP_DAC_READ_SEARCH; or, given
    ``path`` (its path at the mountpoint, for a mount without that capability), by path,
    and truncated only if it is still inode ``ino``. The kernel sends OPEN, SETATTR (size),
    FLUSH and RELEASE to this filesystem, sets its size and drops its pages past it. Call
    from a thread, never from the trio thread; the thread's id is in ``own_threads``
    meanwhile (the FUSE requests it causes carry it as their pid).
    """
    thread = threading.get_native_id()
    own_threads.add(thread)
    try:
        if path is not None:
            fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
        else:
            handle = ctypes.create_string_buffer(
                struct.pack("=Ii3I", 12, 0x81, ino >> 32, ino & 0xFFFFFFFF, 0), 20
            )
            mount_fd = os.open(mountpoint, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                fd = _libc.open_by_handle_at(mount_fd, handle, os.O_WRONLY | os.O_CLOEXEC)
            finally:
                os.close(mount_fd)
            if fd < 0:
                code = ctypes.get_errno()
                raise OSError(code, os.strerror(code))
        try:
            if os.fstat(fd).st_ino != ino:  # renamed over meanwhile: not that file any more
                raise OSError(errno.ESTALE, "the path names another file now")
            os.ftruncate(fd, size)
        finally:
            os.close(fd)
    finally:
        own_threads.discard(thread)


#: at most this many gaps are tracked per file; past it the two last merge (the cut after
#: a failure may then drop more of what was written since the last fsync, never less)
MAX_GAPS = 1024


def _note_gap(gaps: list[tuple[int, int]], size_before: int, start: int, end: int) -> None:
    """Record a cached WRITE of [start, end) to a file that was ``size_before`` long:
    the gap it left is added to ``gaps``, what it covers taken out of them."""
    kept: list[tuple[int, int]] = []
    for gap_start, gap_end in gaps:
        if gap_end <= start or gap_start >= end:
            kept.append((gap_start, gap_end))
            continue
        if gap_start < start:
            kept.append((gap_start, start))
        if gap_end > end:
            kept.append((end, gap_end))
    if start > size_before:
        kept.append((size_before, start))
    if len(kept) > MAX_GAPS:
        kept.sort()
        kept[-2:] = [(kept[-2][0], kept[-1][1])]
    gaps[:] = kept


def _handler(method: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    """Turn every exception of a request into a FUSEError; log what is not routine."""

    @functools.wraps(method)
    async def wrapper(self: Operations, *args: Any) -> T:
        self.poller.note_request()
        self.inodes.trim_dir_fds()  # between requests: no path of a running one is affected
        try:
            return await method(self, *args)
        except Exception as error:
            raise _fuse_error(method.__name__, error) from None

    return wrapper


def _fuse_error(handler: str, error: Exception) -> pyfuse3.FUSEError:
    """What a request's exception becomes: its errno; unexpected ones are logged."""
    if isinstance(error, pyfuse3.FUSEError):
        return error
    if isinstance(error, (OSError, KmsfsError)):
        return pyfuse3.FUSEError(_errno_of(error))
    log.error("internal error in %s", handler, exc_info=error)
    return pyfuse3.FUSEError(errno.EIO)


class OpenFile:
    """Per-inode state while any handle is open: the backing fd and the engine."""

    __slots__ = (
        "node",
        "fd",
        "engine",
        "provider",
        "refs",
        "direct_handles",
        "stream",
        "write_error",
        "gaps",
        "writers",
    )

    def __init__(
        self,
        node: Node,
        fd: int,
        engine: EncryptedFile,
        provider: FileKeyProvider,
    ) -> None:
        self.node = node
        self.fd = fd
        self.engine = engine
        self.provider = provider
        self.refs = 0
        self.direct_handles = 0  # of the refs, handles opened with direct_io
        self.stream = Stream(engine)  # the sequential reader, for the prefetcher
        #: errno of a failure to store this file's data: WRITEs are refused until every
        #: handle open for writing at the time is released (see ``_storing_failed``)
        self.write_error = 0
        #: [start, end) ranges the engine zero-filled because a cached WRITE came past the
        #: end, that no WRITE has covered since and that were not there at the last fsync
        #: (see ``_note_gap``)
        self.gaps: list[tuple[int, int]] = []
        #: of the refs, handles open for writing (the mount's own included): while any
        #: is, no chunk goes to the kernel's page cache (see kmsfs.fs.pagefill)
        self.writers = 0


class DirHandle:
    """An open directory: its backing fd (so fstat works after rmdir) and its listing."""

    __slots__ = ("inode", "fd", "entries")

    def __init__(self, inode: int, fd: int) -> None:
        self.inode = inode
        self.fd = fd
        self.entries: list[Entry] | None = None


class Operations(pyfuse3.Operations):
    enable_writeback_cache = True
    supports_dot_lookup = True

    def __init__(
        self,
        cipherdir: bytes,
        config: FsConfig,
        keys: KeyManager,
        metadata_key: bytes,
        tree: CipherTree,
        *,
        read_only: bool = False,
        poller: BusyPoller | None = None,
        prefetcher: Prefetcher | None = None,
        forward_callers: bool = False,
        filler: ChunkFiller | None = None,
    ) -> None:
        super().__init__()
        self.poller = poller if poller is not None else BusyPoller(0)
        #: the kernel's page cache gets the rest of a chunk a small read decrypted (off
        #: without a FUSE session: the mount passes one)
        self.filler = filler if filler is not None else ChunkFiller(enabled=False)
        self.prefetcher = prefetcher if prefetcher is not None else Prefetcher(ahead=0)
        self.config = config
        self.keys = keys
        self.read_only = read_only
        self.inodes = InodeTable(cipherdir)
        self.tree = tree
        self.xattrs = XattrCipher(metadata_key)
        self.key_bindings = MountKeyBindings(self, metadata_key)  # per-directory CMKs
        self._handles: dict[int, OpenFile] = {}
        self._writers: set[int] = set()  # handles open for writing
        self._write_handles: set[int] = set()  # ... and the mount's own (OpenFile.writers)
        self._write_errors: dict[int, int] = {}  # handle -> errno its fsync/flush return
        self._direct: set[int] = set()  # handles opened with direct_io
        #: handles opened with O_DIRECT: their small reads fill no page cache, which their
        #: reads bypass (kmsfs.fs.pagefill)
        self._uncached_reads: set[int] = set()
        #: ENOSPC or EDQUOT once storing data failed with it (0: not short of space), and
        #: the free space then; see _short_of_space
        self._space_error = 0
        self._free_at_space_error = 0
        self._invalidating: dict[int, trio.Event] = {}  # inodes a thread is invalidating
        self._invalidate_again: set[int] = set()
        #: where the kernel shows this filesystem (set by the mount; see _kernel_truncate)
        self.mountpoint: bytes | None = None
        self._kernel_truncate_works = True
        self._own_threads: set[int] = set()  # threads of ours doing I/O on the mount
        self._dir_handles: dict[int, DirHandle] = {}
        self._next_handle = 1
        self._read_buffer = bytearray(1 << 20)
        self._is_root = os.geteuid() == 0
        #: forward each request's caller to keyd (kmsfs mount --forward-callers)
        self.forward_callers = forward_callers
        self._euid = os.geteuid()
        #: handle -> the caller that opened it, when forwarded (its first write's key)
        self._handle_callers: dict[int, ForwardedCaller] = {}
        #: records opens, creates, unlinks and renames (kmsfs mount --audit-opens)
        self.auditor: AccessAuditor | None = None

    # ---------------------------------------------------------------- helpers
    def _caller(self, ctx: pyfuse3.RequestContext) -> ForwardedCaller | None:
        """Who keyd calls for this request are made for: None (the mount itself) unless
        forwarding is on and the caller is not the mount's own user."""
        if not self.forward_callers or ctx.uid == self._euid:
            return None
        return ForwardedCaller(ctx.uid, ctx.gid, ctx.pid, self.config.filesystem_id)

    def _new_handle(self) -> int:
        handle = self._next_handle
        self._next_handle += 1
        return handle

    def _entry_of(self, parent: int, name: bytes) -> tuple[bytes, Entry]:
        """A short path of the parent's backing directory and where ``name`` lives in it."""
        directory = self.inodes.dir_path(parent)
        return directory, self.tree.entry(directory, name, cache_key=parent)

    def _child_at(self, parent: int, name: bytes) -> tuple[bytes, Entry, int]:
        """As :meth:`_child`, with the parent's descriptor for ``*at`` calls (hot paths)."""
        directory, dir_fd = self.inodes.dir_at(parent)
        return directory, self.tree.entry(directory, name, cache_key=parent), dir_fd

    def _child(self, parent: int, name: bytes) -> tuple[bytes, Entry, bytes]:
        directory, entry = self._entry_of(parent, name)
        return directory, entry, directory + b"/" + entry.backing

    def _attrs(
        self, st: os.stat_result, node: Node | None = None, ino: int | None = None
    ) -> pyfuse3.EntryAttributes:
        """The FUSE attributes of backing entry ``st``: inode number ``node``'s, else
        ``ino`` (the caller's ino_of), else looked up."""
        attrs = pyfuse3.EntryAttributes()
        if node is not None:
            attrs.st_ino = node.ino
        else:
            attrs.st_ino = ino if ino is not None else self.inodes.ino_of(st.st_ino)
        attrs.st_mode = st.st_mode
        attrs.st_nlink = 0 if node is not None and node.dead else st.st_nlink
        attrs.st_uid = st.st_uid
        attrs.st_gid = st.st_gid
        attrs.st_rdev = st.st_rdev
        if stat.S_ISREG(st.st_mode):
            if node is not None and node.open_file is not None:
                attrs.st_size = node.open_file.engine.size
            else:
                try:
                    attrs.st_size = plaintext_size(st.st_size, self.config.chunk_size)
                except FormatError:
                    attrs.st_size = 0  # an impossible size: open will say EIO
        elif stat.S_ISLNK(st.st_mode):
            attrs.st_size = self.tree.symlink_size(st.st_size)
        else:
            attrs.st_size = st.st_size
        attrs.st_blksize = st.st_blksize
        attrs.st_blocks = st.st_blocks
        attrs.st_atime_ns = st.st_atime_ns
        attrs.st_mtime_ns = st.st_mtime_ns
        attrs.st_ctime_ns = st.st_ctime_ns
        attrs.generation = 0
        attrs.entry_timeout = ENTRY_TIMEOUT
        attrs.attr_timeout = ATTR_TIMEOUT
        return attrs

    def _stat_node(self, node: Node) -> os.stat_result:
        if node.open_file is not None:
            return os.fstat(node.open_file.fd)
        if node.ino == ROOT:
            return os.lstat(self.inodes.root_path)
        try:
            dir_fd, name = self.inodes.entry_at(node.ino)
            return os.lstat(name, dir_fd=dir_fd)
        except pyfuse3.FUSEError:
            # a directory removed while open still answers, like on ext4
            for handle in self._dir_handles.values():
                if handle.inode == node.ino:
                    return os.fstat(handle.fd)
            if node.dead and node.last_stat is not None:
                return node.last_stat  # the kernel's late requests after the last unlink
            raise

    def _entry(self, parent: int, backing: bytes, st: os.stat_result) -> pyfuse3.EntryAttributes:
        """Register a new kernel reference to ``parent/backing`` and return its attributes."""
        node = self.inodes.remember(self.inodes.ino_of(st.st_ino), parent, backing)
        attrs = self._attrs(st, node)
        if self.key_bindings.uncached(parent):
            attrs.entry_timeout = attrs.attr_timeout = 0
        return attrs

    def _gives_away(self, ctx: pyfuse3.RequestContext) -> bool:
        """Whether entries made for this request are handed to another owner."""
        return self._is_root and (ctx.uid != 0 or ctx.gid != 0)

    def _mode_to_make(self, mode: int, ctx: pyfuse3.RequestContext) -> int:
        """The mode to make an entry with: no set-ID bits while it is still root's.

        :meth:`_give_to_caller` puts them back once the entry is the caller's (a chown
        clears them, root's too), so no set-ID entry of root's ever exists.
        """
        return mode & ~_SET_ID if self._gives_away(ctx) else mode

    def _give_to_caller(
        self,
        directory: bytes,
        path_or_fd: bytes | int,
        ctx: pyfuse3.RequestContext,
        mode: int = 0,
    ) -> None:
        """Files created for another user are theirs (when the mount runs as root).

        As on ext4, an entry made in a set-group-ID directory keeps the directory's group,
        and the set-ID bits of ``mode`` (the mode asked for) are kept.
        """
        if self._gives_away(ctx):
            gid = -1 if os.stat(directory).st_mode & stat.S_ISGID else ctx.gid
            if isinstance(path_or_fd, int):
                os.fchown(path_or_fd, ctx.uid, gid)
                if mode & _SET_ID:
                    os.fchmod(path_or_fd, stat.S_IMODE(mode))
            else:
                os.chown(path_or_fd, ctx.uid, gid, follow_symlinks=False)
                if mode & _SET_ID:
                    os.chmod(path_or_fd, stat.S_IMODE(mode))

    def _check_writable_mount(self) -> None:
        if self.read_only:
            raise pyfuse3.FUSEError(errno.EROFS)

    # ------------------------------------------------------------ open files
    async def _open_node(self, node: Node, caller: ForwardedCaller | None = None) -> OpenFile:
        """The node's OpenFile (one per inode), opening the backing file if needed (its
        key unwrapped for *caller*). A file already open is checked for a forwarded
        *caller*: keyd must give that user the key too (KeyManager.check_access)."""
        if node.open_file is not None:
            return await self._checked(node.open_file, caller)
        backing: tuple[int, bool, bytes] | None = None  # (fd, writable, path) still open
        if not node.lock.locked():
            # The usual case, a key in the cache (or an empty file): opened with no await,
            # so no other open of the node can come in between and the node's lock (a
            # trio checkpoint: a pass of the scheduler, ~5% of a cold read-all's time in
            # the mount) is not needed. Only a key from keyd waits, under the lock.
            opened = self._open_with_cached_key(node, caller)
            if isinstance(opened, OpenFile):
                return opened
            backing = opened  # the backing file stays open for the locked path
        try:
            async with node.lock:
                if node.open_file is not None:
                    return await self._checked(node.open_file, caller)
                if backing is None:
                    backing = self._open_backing(node)
                fd, writable, path = backing
                provider = FileKeyProvider()
                # Read under the lock even when the first attempt read it: while this
                # task waited for the lock, a truncate of the closed file (_truncate's
                # os.truncate by path, which takes no lock) or another open that wrote
                # and closed may have changed it. An fstat and the header's pread on the
                # fd already open are what is left of the old reopen (open, fstat, pread,
                # close); timestamps could not prove it unchanged (ctime is coarse).
                disk_size, header = self._read_header(fd, path)
                if header is not None:
                    provider.data_key = await self.keys.unwrap(header, caller)
                # (the header and size just read: the engine reads neither again)
                opened_file = self._adopt(node, fd, provider, path, writable, header, disk_size)
                backing = None  # the open file owns the fd now
                return opened_file
        finally:
            if backing is not None:
                os.close(backing[0])

    def _open_with_cached_key(
        self, node: Node, caller: ForwardedCaller | None
    ) -> OpenFile | tuple[int, bool, bytes]:
        """The node's new OpenFile if its key is cached for *caller* or it is empty, else
        the backing file's (fd, writable, path), still open, for the caller to unwrap
        its key under the node's lock (the header read here may be stale by then: read
        it again). Never awaits."""
        fd, writable, path = self._open_backing(node)
        try:
            disk_size, header = self._read_header(fd, path)
            provider = FileKeyProvider()
            if header is not None:
                provider.data_key = self.keys.cached(header, caller)
                if provider.data_key is None:
                    return fd, writable, path
            return self._adopt(node, fd, provider, path, writable, header, disk_size)
        except BaseException:
            os.close(fd)
            raise

    def _open_backing(self, node: Node) -> tuple[int, bool, bytes]:
        """(fd, writable, path for messages) of the node's backing file: O_RDWR unless the
        mount is read-only or the backing file refuses it."""
        path = self.inodes.path(node.ino)
        # openat on the directory's descriptor: 3 µs against 9 µs for the same open
        # through path's /proc/self/fd/N/ (procfs resolves the magic link each time)
        dir_fd, name = self.inodes.entry_at(node.ino)
        writable = not self.read_only
        flags = os.O_CLOEXEC | os.O_NOFOLLOW
        try:
            fd = os.open(name, flags | (os.O_RDWR if writable else os.O_RDONLY), dir_fd=dir_fd)
        except OSError as error:
            if error.errno not in (errno.EACCES, errno.EROFS, errno.EPERM):
                raise
            writable = False
            fd = os.open(name, flags | os.O_RDONLY, dir_fd=dir_fd)
        return fd, writable, path

    @staticmethod
    def _read_header(fd: int, path: bytes) -> tuple[int, Header | None]:
        """The backing file's size and its parsed header (None when empty)."""
        disk_size = os.fstat(fd).st_size
        if not disk_size:
            return 0, None
        try:
            return disk_size, read_header(fd)
        except FormatError as error:
            log.error("%s: unreadable header: %s", shown_path(path), error)
            raise

    def _adopt(
        self,
        node: Node,
        fd: int,
        provider: FileKeyProvider,
        path: bytes,
        writable: bool,
        header: Header | None = None,
        disk_size: int | None = None,
    ) -> OpenFile:
        """Make ``fd`` (the backing file, keys fetched) the node's open file; ``header``
        and ``disk_size``: as just read from ``fd``, if they were."""
        try:
            engine = EncryptedFile.open(
                fd,
                key_provider=provider,
                key_id=self.config.key_arn,
                encryption_context=self.config.file_context,
                chunk_size=self.config.chunk_size,
                writable=writable,
                header=header,
                disk_size=disk_size,
            )
        except FormatError as error:
            log.error("%s: %s", shown_path(path), error)
            raise
        open_file = OpenFile(node, fd, engine, provider)
        node.open_file = open_file
        return open_file

    async def _checked(self, open_file: OpenFile, caller: ForwardedCaller | None) -> OpenFile:
        """*open_file*, once keyd agreed *caller* may have its key (forwarded callers)."""
        header = open_file.engine.header
        if caller is not None and header is not None and open_file.provider.data_key:
            try:
                await self.keys.check_access(header, open_file.provider.data_key, caller)
            except BaseException:
                if open_file.refs == 0:
                    self._close_file(open_file)
                raise
        return open_file

    async def _ensure_file_key(
        self, open_file: OpenFile, caller: ForwardedCaller | None = None
    ) -> None:
        """An empty file gets its data key with its first byte: have one ready (made for
        *caller*, the writer's opener when forwarding)."""
        if open_file.engine.header is not None or open_file.provider.prepared is not None:
            return
        key_arn = self.key_bindings.file_key_arn(open_file.node)
        if not open_file.node.lock.locked():
            # The usual case, a key in the pool: taken with no await, so no other write
            # can come in between, and without the lock's checkpoint (a pass of trio's
            # scheduler, and the request waiter's hand-over to another worker: one per
            # file an untar writes). Only a key from keyd waits, under the lock.
            open_file.provider.prepared = self.keys.pooled_file_key(key_arn, caller)
            if open_file.provider.prepared is not None:
                return
        async with open_file.node.lock:
            if open_file.engine.header is None and open_file.provider.prepared is None:
                open_file.provider.prepared = await self.keys.new_file_key(
                    key_arn=key_arn, caller=caller
                )

    def _close_file(self, open_file: OpenFile) -> None:
        node = open_file.node
        try:
            open_file.engine.close()
            if node.dead:  # what the kernel's late requests for it are answered from
                node.last_stat = os.fstat(open_file.fd)
        finally:
            self.prefetcher.forget(open_file.stream)
            os.close(open_file.fd)
            node.open_file = None
            header = open_file.engine.header
            if header is not None and open_file.provider.data_key is not None:
                self.keys.remember(header, open_file.provider.data_key)
            self.inodes.drop_if_unused(node)

    def _read_error(self, open_file: OpenFile, error: FormatError) -> None:
        where = self._describe(open_file.node)
        if isinstance(error, CorruptChunk):
            log.error("%s: chunk %d failed authentication", where, error.chunk_index)
        else:
            log.error("%s: %s", where, error)

    def _describe(self, node: Node) -> str:
        """The node's backing path, for messages."""
        try:
            return shown_path(self.inodes.path(node.ino))
        except (pyfuse3.FUSEError, OSError):  # gone, or its directory cannot be opened now
            return f"inode {node.ino} (no backing path now)"

    def close_all(self) -> None:
        """Flush and close every open file (at unmount)."""
        for open_file in {id(f): f for f in self._handles.values()}.values():
            try:
                self._close_file(open_file)
            except Exception:
                log.exception("flushing %s at unmount", self._describe(open_file.node))
        self._handles.clear()

    # ------------------------------------------------------------ attributes
    @_handler
    async def lookup(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext):
        if name == b".":
            node = self.inodes.get(parent_inode)
            st = self._stat_node(node)
            node.lookups += 1
            return self._attrs(st, node)
        if name == b"..":
            grandparent = self.inodes.parent_of(parent_inode)
            node = self.inodes.get(grandparent)
            st = self._stat_node(node)
            node.lookups += 1
            return self._attrs(st, node)
        await self.key_bindings.check_caller(parent_inode, ctx)  # a bound directory's names
        try:
            _, entry, dir_fd = self._child_at(parent_inode, name)
        except OSError as error:
            if error.errno == errno.EPERM:  # a reserved name: nothing there to see
                raise pyfuse3.FUSEError(errno.ENOENT) from None
            raise
        try:
            st = os.lstat(entry.backing, dir_fd=dir_fd)
        except FileNotFoundError:
            self.tree.forget_name(entry)  # a name that is not there leaves nothing cached
            if self.key_bindings.uncached(parent_inode):
                raise  # a bound directory's names are checked against each caller
            # A negative entry: the kernel caches that the name is missing. Measured: a
            # stat then open(O_CREAT|O_TRUNC) of the name (cp) and a missing name
            # probed twice (search paths) cost 1 LOOKUP, not 2; an O_EXCL create (tar)
            # still costs 2, the kernel looks the name up again for it (LOOKUP_EXCL).
            # The kernel drops the entry itself when the name is made through this
            # mount; made past the mount, the name shows within the timeout, as a
            # removed one stops showing (positive entries).
            missing = pyfuse3.EntryAttributes()
            missing.st_ino = 0
            missing.entry_timeout = NEGATIVE_ENTRY_TIMEOUT
            return missing
        return self._entry(parent_inode, entry.backing, st)

    async def forget(self, inode_list) -> None:
        for ino, count in inode_list:
            self.inodes.forget(ino, count)
            if ino not in self.inodes.nodes:  # a directory's id is cached while it is known
                self.tree.forget_dir(ino)

    @_handler
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext):
        node = self.inodes.get(inode)
        parent = self._bound_parent(inode)
        if parent is not None:
            await self.key_bindings.check_caller(parent, ctx)
            attrs = self._attrs(self._stat_node(node), node)
            attrs.entry_timeout = attrs.attr_timeout = 0
            return attrs
        return self._attrs(self._stat_node(node), node)

    def _bound_parent(self, inode: int) -> int | None:
        """The directory of ``inode`` when its entry must not be cached by the kernel
        (:meth:`MountKeyBindings.uncached`), else None (also for the root and for a
        removed entry, whose parent is unknown)."""
        if inode == ROOT or not self.forward_callers or not self.tree.bindings:
            return None
        try:
            parent = self.inodes.parent_of(inode)
        except (pyfuse3.FUSEError, OSError):
            return None
        return parent if self.key_bindings.uncached(parent) else None

    @_handler
    async def setattr(self, inode: int, attr, fields, fh, ctx: pyfuse3.RequestContext):
        node = self.inodes.get(inode)
        open_file = self._handles[fh] if fh is not None else node.open_file
        if open_file is None and node.dead and not node.links:
            return self._setattr_dead(node, attr, fields)
        if fields.update_size:
            self._check_writable_mount()
            await self._truncate(node, attr.st_size, self._caller(ctx))
            open_file = self._handles[fh] if fh is not None else node.open_file
        # after the await: a path names a cached directory descriptor, valid for this step
        target: bytes | int = open_file.fd if open_file is not None else self.inodes.path(inode)
        if fields.update_mode:
            if isinstance(target, int):
                os.fchmod(target, stat.S_IMODE(attr.st_mode))
            else:
                os.chmod(target, stat.S_IMODE(attr.st_mode))
        if fields.update_uid or fields.update_gid:
            uid = attr.st_uid if fields.update_uid else -1
            gid = attr.st_gid if fields.update_gid else -1
            if isinstance(target, int):
                os.fchown(target, uid, gid)
            else:
                os.chown(target, uid, gid, follow_symlinks=False)
        if fields.update_atime or fields.update_mtime:
            current = os.fstat(target) if isinstance(target, int) else os.lstat(target)
            times = (
                attr.st_atime_ns if fields.update_atime else current.st_atime_ns,
                attr.st_mtime_ns if fields.update_mtime else current.st_mtime_ns,
            )
            if isinstance(target, int):
                if open_file is not None:
                    self._store(open_file)  # a later flush must not move mtime again
                os.utime(target, ns=times)
            else:
                os.utime(target, ns=times, follow_symlinks=False)
        attrs = self._attrs(self._stat_node(node), node)
        if self._bound_parent(inode) is not None:
            attrs.entry_timeout = attrs.attr_timeout = 0
        return attrs

    def _setattr_dead(self, node: Node, attr, fields) -> pyfuse3.EntryAttributes:
        """SETATTR of a file whose last link is gone and that no handle has open.

        The kernel sends one after the last unlink to write back the timestamps it kept
        (writeback cache); ext4 and gocryptfs accept it, and an error here would be
        recorded as a writeback error that the next syncfs() reports. Times are applied
        to the node's last attributes; nothing else can be changed any more.
        """
        if node.last_stat is None or fields.update_size or fields.update_mode:
            raise pyfuse3.FUSEError(errno.ENOENT)
        if fields.update_uid or fields.update_gid:
            raise pyfuse3.FUSEError(errno.ENOENT)
        attrs = self._attrs(node.last_stat, node)
        if fields.update_atime:
            attrs.st_atime_ns = attr.st_atime_ns
        if fields.update_mtime:
            attrs.st_mtime_ns = attr.st_mtime_ns
        if fields.update_ctime:
            attrs.st_ctime_ns = attr.st_ctime_ns
        return attrs

    async def _truncate(self, node: Node, size: int, caller: ForwardedCaller | None = None) -> None:
        # no store of a chunk read before may land on the truncated file (kmsfs.fs.pagefill)
        async with self.filler.barred(node.ino):
            await self._truncate_settled(node, size, caller)

    async def _truncate_settled(
        self, node: Node, size: int, caller: ForwardedCaller | None
    ) -> None:
        open_file = node.open_file
        if open_file is None and size == 0:
            os.truncate(self.inodes.path(node.ino), 0)
            return
        temporary = open_file is None
        open_file = await self._open_node(node, caller)
        try:
            if size > 0:
                await self._ensure_file_key(open_file, caller)
            try:
                open_file.engine.truncate(size)
                open_file.gaps = [
                    (start, min(end, size)) for start, end in open_file.gaps if start < size
                ]
            except OSError as error:
                # what the engine held (written, not yet stored) is dropped with it
                self._storing_failed(open_file, error)
                raise
        finally:
            if temporary and open_file.refs == 0:
                self._close_file(open_file)

    @_handler
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        stored = os.readlink(self.inodes.path(inode))
        if not self.tree.bindings:
            return self.tree.symlink_target(stored)
        parent = self.inodes.parent_of(inode)  # its target is under its directory's key
        await self.key_bindings.check_caller(parent, ctx)
        return self.tree.symlink_target(stored, self.inodes.dir_path(parent), parent)

    # --------------------------------------------------------- create / delete
    @_handler
    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx):
        await self.key_bindings.check_caller(parent_inode, ctx)  # a bound directory's names
        directory, entry, path = self._child(parent_inode, name)
        with self.tree.naming(directory, entry):
            os.mknod(path, self._mode_to_make(mode, ctx), rdev)
        self._give_to_caller(directory, path, ctx, mode)
        return self._entry(parent_inode, entry.backing, os.lstat(path))

    @_handler
    async def mkdir(self, parent_inode: int, name: bytes, mode: int, ctx):
        await self.key_bindings.check_caller(parent_inode, ctx)  # a bound directory's names
        directory, entry, path = self._child(parent_inode, name)
        with self.tree.naming(directory, entry):
            self.tree.make_dir(path, stat.S_IMODE(mode))  # exactly the mode asked, sticky too
        self._give_to_caller(directory, path, ctx)
        return self._entry(parent_inode, entry.backing, os.lstat(path))

    @_handler
    async def symlink(self, parent_inode: int, name: bytes, target: bytes, ctx):
        await self.key_bindings.check_caller(parent_inode, ctx)  # a bound directory's names
        directory, entry, path = self._child(parent_inode, name)
        with self.tree.naming(directory, entry):
            os.symlink(self.tree.stored_target(target, directory, parent_inode), path)
        self._give_to_caller(directory, path, ctx)
        return self._entry(parent_inode, entry.backing, os.lstat(path))

    @_handler
    async def link(self, inode: int, new_parent_inode: int, new_name: bytes, ctx):
        await self.key_bindings.check_caller(new_parent_inode, ctx)  # a bound directory's names
        node = self.inodes.get(inode)
        if node.open_file is not None:
            node.open_file.engine.flush()
        self.key_bindings.check_link(inode, new_parent_inode)
        directory, entry, new_path = self._child(new_parent_inode, new_name)
        with self.tree.naming(directory, entry):
            os.link(self.inodes.path(inode), new_path, follow_symlinks=False)
        return self._entry(new_parent_inode, entry.backing, os.lstat(new_path))

    @audited("Unlink")
    @_handler
    async def unlink(self, parent_inode: int, name: bytes, ctx) -> str | None:
        """Returns the removed file's id for the access audit (None when not auditing)."""
        await self.key_bindings.check_caller(parent_inode, ctx)  # a bound directory's names
        directory, entry, dir_fd = self._child_at(parent_inode, name)
        st = os.lstat(entry.backing, dir_fd=dir_fd)
        file_id = None
        if self.auditor is not None:
            node = self.inodes.nodes.get(self.inodes.current_ino(st.st_ino))
            file_id = unlinked_file_id(dir_fd, entry.backing, st, node)
        os.unlink(entry.backing, dir_fd=dir_fd)
        self.tree.drop_name(directory, entry)
        self.inodes.unlink(
            parent_inode, entry.backing, st.st_ino, last_link=st.st_nlink <= 1, last_stat=st
        )
        return file_id

    @_handler
    async def rmdir(self, parent_inode: int, name: bytes, ctx) -> None:
        await self.key_bindings.check_caller(parent_inode, ctx)  # a bound directory's names
        directory, entry, path = self._child(parent_inode, name)
        st = os.lstat(path)
        bound_id = self.key_bindings.bound_id(path)  # a bound directory's binding goes too
        self.tree.remove_dir(path)
        self.key_bindings.unbind_removed(bound_id)
        self.tree.drop_name(directory, entry)
        self.tree.forget_dir(self.inodes.current_ino(st.st_ino))
        self.inodes.unlink(parent_inode, entry.backing, st.st_ino, last_link=True, last_stat=st)

    @audited("Rename")
    @_handler
    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        await self.key_bindings.check_caller(parent_inode_old, ctx)  # a bound directory's names
        await self.key_bindings.check_caller(parent_inode_new, ctx)  # a bound directory's names
        old_dir, old_entry, old_path = self._child(parent_inode_old, name_old)
        new_dir, new_entry, new_path = self._child(parent_inode_new, name_new)
        self.key_bindings.check_rename(
            parent_inode_old, parent_inode_new, old_path, new_path, bool(flags & RENAME_EXCHANGE)
        )
        moved = self.inodes.current_ino(os.lstat(old_path).st_ino)
        try:
            replaced_st: os.stat_result | None = os.lstat(new_path)
        except FileNotFoundError:
            replaced_st = None
        replaced = self.inodes.current_ino(replaced_st.st_ino) if replaced_st else None
        # A directory replaced by a rename must look empty: set its id file aside.
        replaced_dir_id = None
        if (
            replaced_st is not None
            and replaced != moved
            and stat.S_ISDIR(replaced_st.st_mode)
            and not flags & RENAME_EXCHANGE
        ):
            replaced_dir_id = self.tree.take_dir_id(new_path)
        try:
            with self.tree.naming(new_dir, new_entry):
                if flags:
                    if _libc.renameat2(_AT_FDCWD, old_path, _AT_FDCWD, new_path, flags) != 0:
                        code = ctypes.get_errno()
                        raise OSError(code, os.strerror(code))
                else:
                    os.rename(old_path, new_path)
        except OSError:
            if replaced_dir_id is not None:
                self.tree.write_dir_id(new_path, replaced_dir_id)
            raise
        self.key_bindings.unbind_removed(replaced_dir_id)  # a bound directory replaced
        if not flags & RENAME_EXCHANGE and old_path != new_path:
            self.tree.drop_name(old_dir, old_entry)
        old, new = (parent_inode_old, old_entry.backing), (parent_inode_new, new_entry.backing)
        if flags & RENAME_EXCHANGE and replaced is not None:
            self.inodes.move(replaced, new, old)
        elif replaced is not None and replaced != moved:
            assert replaced_st is not None
            self.tree.forget_dir(replaced)
            last_link = stat.S_ISDIR(replaced_st.st_mode) or replaced_st.st_nlink <= 1
            self.inodes.unlink(
                parent_inode_new,
                new_entry.backing,
                replaced_st.st_ino,
                last_link=last_link,
                last_stat=replaced_st,
            )
        self.inodes.move(moved, old, new)

    # --------------------------------------------------------------- files
    @audited("Create")
    @_handler
    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int, ctx):
        await self.key_bindings.check_caller(parent_inode, ctx)  # a bound directory's names
        self._check_writable_mount()
        directory, entry, dir_fd = self._child_at(parent_inode, name)
        provider = FileKeyProvider()
        caller = self._caller(ctx)
        if caller is not None:  # keyd decides before the file exists (EACCES: none made)
            provider.prepared = await self.keys.new_file_key(
                self.key_bindings.new_file_key_arn(parent_inode), caller=caller
            )
        with self.tree.naming(directory, entry):
            fd = os.open(
                entry.backing,
                os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW,
                self._mode_to_make(stat.S_IMODE(mode), ctx),
                dir_fd=dir_fd,
            )
        try:
            self._give_to_caller(directory, fd, ctx, mode)
            st = os.fstat(fd)
            attrs = self._entry(parent_inode, entry.backing, st)
            # the new, empty file: no key yet (it comes with the first byte)
            open_file = self._adopt(
                self.inodes.get(attrs.st_ino),
                fd,
                provider,
                directory + b"/" + entry.backing,
                True,
            )
        except BaseException:
            os.close(fd)
            raise
        return self._new_file_handle(open_file, flags, ctx), attrs

    @audited("Open")
    @_handler
    async def open(self, inode: int, flags: int, ctx) -> pyfuse3.FileInfo:
        writing = flags & (os.O_WRONLY | os.O_RDWR)
        if self.read_only and writing:
            raise pyfuse3.FUSEError(errno.EROFS)
        if not writing:
            return await self._open(inode, flags, ctx)
        # a writer's pages must meet no store of a chunk read before (kmsfs.fs.pagefill)
        async with self.filler.barred(inode):
            return await self._open(inode, flags, ctx)

    async def _open(self, inode: int, flags: int, ctx) -> pyfuse3.FileInfo:
        node = self.inodes.get(inode)
        open_file = await self._open_node(node, self._caller(ctx))
        if flags & (os.O_WRONLY | os.O_RDWR) and not open_file.engine.writable:
            if open_file.refs == 0:
                self._close_file(open_file)
            raise pyfuse3.FUSEError(errno.EACCES)
        if flags & os.O_TRUNC and flags & (os.O_WRONLY | os.O_RDWR):
            # libfuse negotiates atomic_o_trunc: the kernel passes O_TRUNC here
            # instead of truncating first.
            open_file.engine.truncate(0)
            self._clear_set_id_after_truncate(open_file.fd, ctx)
        return self._new_file_handle(open_file, flags, ctx)

    def _new_file_handle(
        self, open_file: OpenFile, flags: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.FileInfo:
        direct_io, keep_cache = self._open_mode(open_file, flags)
        open_file.refs += 1
        handle = self._new_handle()
        self._handles[handle] = open_file
        if flags & (os.O_WRONLY | os.O_RDWR):
            open_file.writers += 1
            self._write_handles.add(handle)
        if direct_io:
            open_file.direct_handles += 1
            self._direct.add(handle)
        if flags & os.O_DIRECT:
            self._uncached_reads.add(handle)
        self._note_writer(handle, flags, ctx)
        caller = self._caller(ctx)
        if caller is not None:
            self._handle_callers[handle] = caller
        return pyfuse3.FileInfo(fh=handle, direct_io=direct_io, keep_cache=keep_cache)

    def _open_mode(self, open_file: OpenFile, flags: int) -> tuple[bool, bool]:
        """(direct_io, keep_cache) for a new handle of ``open_file``.

        With the write-back cache, write() returns once the kernel's pages are dirty, and
        a full disk is only told at fsync and close. While the backing filesystem is
        short of space, a file opened for writing gets direct_io instead: every write()
        becomes a WRITE request answered after the engine stored it, so write() itself
        returns ENOSPC/EDQUOT — what ext4 and gocryptfs (which has no write-back cache)
        do. The cost, while short of space only: no caching of that file, and its
        MAP_SHARED mmap() fails with ENODEV (the kernel refuses shared mappings of direct_io
        files unless FUSE_DIRECT_IO_ALLOW_MMAP, which libfuse 3.14 cannot ask for).

        One file is either all direct_io or all cached while any handle is open. Kernels
        with Bernd Schubert's 2025 fix ("fuse: ... flush dirty pages" before direct I/O,
        in 6.18 here) write another handle's dirty pages back before a direct_io read or
        write and drop the cached pages a direct_io write covers; older ones do not, and
        a direct_io handle would read past another handle's dirty pages, or have its
        write overwritten by their later write-back. So a file already open keeps its
        mode (a writer of a file open in cached mode is told at fsync and close, as
        before), and the first cached handle after direct_io ones drops the file's cached
        pages (keep_cache=False): they may predate those writes.
        """
        node = open_file.node
        if open_file.direct_handles:
            return True, True
        if (
            open_file.refs == 0
            and flags & (os.O_WRONLY | os.O_RDWR)
            and not self.read_only
            and self._short_of_space()
        ):
            node.cache_stale = True
            return True, True
        if open_file.refs == 0 and node.cache_stale:
            node.cache_stale = False
            return False, False
        return False, True

    def _short_of_space(self) -> bool:
        """Whether new writers should bypass the write-back cache (see _open_mode).

        One fstatvfs of the cipher directory (under a microsecond here). Short of space:
        less than LOW_SPACE free; or, since storing data failed with ENOSPC or EDQUOT,
        until LOW_SPACE more than then is free (a quota, or a filesystem whose statvfs
        shows room it cannot give, is not visible in statvfs: only its change is).
        """
        try:
            st = os.statvfs(self.inodes.root_fd)
        except OSError as error:
            log.debug("statvfs of the cipher directory: %s", os.strerror(error.errno or 0))
            return bool(self._space_error)
        free = st.f_bavail * st.f_frsize
        if self._space_error:
            if free < self._free_at_space_error + LOW_SPACE:
                return True
            log.info("the cipher directory's filesystem has room again: writes are cached")
            self._space_error = 0
        return free < LOW_SPACE

    def _space_failed(self, code: int) -> None:
        """Storing data failed with ENOSPC or EDQUOT: new writers get direct_io."""
        try:
            st = os.statvfs(self.inodes.root_fd)
            free = st.f_bavail * st.f_frsize
        except OSError:
            free = 0
        if not self._space_error:
            log.warning(
                "%s storing data: files opened for writing bypass the write-back cache "
                "until more space is free",
                os.strerror(code),
            )
            self._free_at_space_error = free
        else:
            self._free_at_space_error = min(self._free_at_space_error, free)
        self._space_error = code

    def _clear_set_id_after_truncate(self, fd: int, ctx: pyfuse3.RequestContext) -> None:
        """What truncate(2) does, and the kernel leaves to us for open(O_TRUNC).

        A truncation by anyone but root clears S_ISUID, and S_ISGID if the file is
        group-executable or not of the caller's (primary) group.
        """
        if ctx.uid == 0:
            return
        st = os.fstat(fd)
        clear = st.st_mode & stat.S_ISUID
        if st.st_mode & stat.S_ISGID and (st.st_mode & stat.S_IXGRP or st.st_gid != ctx.gid):
            clear |= stat.S_ISGID
        if clear:
            os.fchmod(fd, stat.S_IMODE(st.st_mode) & ~clear)

    async def read(self, fh: int, off: int, size: int) -> memoryview | bytes:
        # The busiest handler: its own copy of _handler's two lines, one coroutine less.
        self.poller.note_request()
        try:
            open_file = self._handles[fh]
            count = min(size, open_file.engine.size - off)
            if count <= 0:
                return b""
            engine = open_file.engine
            chunk_size = engine.chunk_size
            if count < chunk_size and not open_file.writers:
                start = off - off % chunk_size
                if (
                    off + count <= start + chunk_size <= engine.size
                    and not open_file.direct_handles
                    and fh not in self._uncached_reads
                    and self.filler.accepts(open_file.node.ino)
                    and not engine.dirty
                ):
                    return self._read_whole_chunk(open_file, start, off - start, count)
            # One scratch buffer for every read: pyfuse3 copies the reply to the kernel
            # as soon as this returns, before any other request runs.
            if len(self._read_buffer) < count:
                self._read_buffer = bytearray(count)
            view = memoryview(self._read_buffer)[:count]
            try:
                engine.readinto(off, view)
            except FormatError as error:
                self._read_error(open_file, error)
                raise
            if count >= SEQUENTIAL_MIN:
                self.prefetcher.after_read(
                    open_file.stream, open_file.fd, off, count, engine.chunk_size
                )
            return view
        except Exception as error:
            raise _fuse_error("read", error) from None

    def _read_whole_chunk(
        self, open_file: OpenFile, start: int, skip: int, count: int
    ) -> memoryview:
        """A READ of part of one full chunk: the whole chunk is decrypted (GCM opens no
        less), answers the READ and goes to the kernel's page cache (kmsfs.fs.pagefill)."""
        chunk = bytearray(open_file.engine.chunk_size)
        try:
            open_file.engine.readinto(start, chunk)
        except FormatError as error:
            self._read_error(open_file, error)
            raise
        self.filler.offer(open_file.node.ino, start, chunk)
        return memoryview(chunk)[skip : skip + count]

    @_handler
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        open_file = self._handles[fh]
        if open_file.write_error:
            # pages the kernel still holds from before the failure, or written since:
            # not stored either (every writer is told), and dropped from the cache again
            refused = OSError(open_file.write_error, os.strerror(open_file.write_error))
            self._storing_failed(open_file, refused)
            raise refused
        if open_file.engine.header is None:  # an empty file's first byte: its key
            await self._ensure_file_key(open_file, self._handle_callers.get(fh))
        engine = open_file.engine
        direct = fh in self._direct
        size_before = engine.size
        try:
            written = engine.write(off, buf)
            if direct:
                # the write() of a direct_io handle returns this count: it must be stored,
                # not held in the engine's memory (its tail chunk) where a later failure
                # would drop it
                engine.flush()
            else:
                _note_gap(open_file.gaps, size_before, off, off + written)
            return written
        except FormatError as error:
            self._read_error(open_file, error)
            raise
        except (OSError, FileTooLarge) as error:  # not stored: every writer is told
            self._storing_failed(open_file, error)
            # what of an append was stored (the engine is back to what the backing file
            # holds) is a short write: the application is told exactly what it has
            stored = engine.size - off
            if direct and off >= size_before and stored > 0 and not engine.damaged:
                return min(len(buf), stored)
            raise

    @_handler
    async def flush(self, fh: int) -> None:
        open_file = self._handles[fh]
        if fh in self._write_errors:
            # close() returns after the kernel's cache shows what is stored (FLUSH comes
            # without the inode lock held, so the invalidating thread can finish)
            event = self._invalidating.get(open_file.node.ino)
            if event is not None:
                with trio.move_on_after(30):
                    await event.wait()
            self._raise_write_error(fh)
        self._store(open_file)

    @_handler
    async def fsync(self, fh: int, datasync: bool) -> None:
        self._raise_write_error(fh)
        open_file = self._handles[fh]
        try:
            open_file.engine.flush()
            size = open_file.engine.size
            # the long part, off the trio thread: other requests go on meanwhile (the
            # handle keeps the fd open until its RELEASE, which cannot come before this)
            await trio.to_thread.run_sync(os.fdatasync if datasync else os.fsync, open_file.fd)
            open_file.engine.mark_durable(size)  # its rewrites in place now keep a copy
            # what the kernel had cached is all written back: a gap left is the writer's
            open_file.gaps = []
        except OSError as error:
            self._storing_failed(open_file, error)
            raise

    @_handler
    async def release(self, fh: int) -> None:
        open_file = self._handles.pop(fh)
        if fh in self._write_handles:
            self._write_handles.discard(fh)
            open_file.writers -= 1
        self._handle_callers.pop(fh, None)
        self._writers.discard(fh)
        self._uncached_reads.discard(fh)
        if fh in self._direct:
            self._direct.discard(fh)
            open_file.direct_handles -= 1
        if self._write_errors.pop(fh, None) and not any(
            self._handles.get(other) is open_file for other in self._write_errors
        ):
            open_file.write_error = 0  # every writer that was told is gone: writes resume
        open_file.refs -= 1
        if open_file.refs == 0:
            # while a store for the file is queued its backing inode stays open, so that
            # its number cannot pass to another file meanwhile. RELEASE does not wait for
            # the store: the kernel counts it among its background requests, and those
            # waiting would keep the READs the store may wait for from being sent.
            self.filler.hold_open(open_file.node.ino, open_file.fd)
            self._close_file(open_file)

    # ------------------------------------------------- failures to store data
    def _note_writer(self, fh: int, flags: int, ctx: pyfuse3.RequestContext) -> None:
        # (not the mount's own opens, see _kernel_truncate: it must not be told to wait)
        if flags & (os.O_WRONLY | os.O_RDWR) and ctx.pid not in self._own_threads:
            self._writers.add(fh)

    def _store(self, open_file: OpenFile) -> None:
        """The engine's flush for a request other than FLUSH/FSYNC (SETATTR of times, sent
        by the kernel's writeback too): a failure tells every writer, as theirs would."""
        try:
            open_file.engine.flush()
        except OSError as error:
            self._storing_failed(open_file, error)
            raise

    def _raise_write_error(self, fh: int) -> None:
        code = self._write_errors.get(fh)
        if code:
            raise pyfuse3.FUSEError(code)

    def _storing_failed(self, open_file: OpenFile, error: OSError | FileTooLarge) -> None:
        """Storing the file's data failed (a full disk, EIO...): tell every writer.

        The engine is back to what the backing file holds. Every handle open for writing
        now returns the errno from each later fsync and flush (close) until it is
        released; WRITEs are refused until then (the kernel still holds pages written
        before the failure: they must not land after a gap); the kernel's cache of the
        file is dropped from a thread. Logged once per inode until the writers are gone.
        """
        code = _errno_of(error)
        if code in _SPACE_ERRNOS:
            self._space_failed(code)
        self._cut_at_gap(open_file)
        if not open_file.write_error:
            engine = open_file.engine
            log.error(
                "%s: storing data failed (%s); its writers get the error from fsync and "
                "close, the file keeps what is stored (%d bytes)%s",
                self._describe(open_file.node),
                os.strerror(code),
                engine.size,
                "; its end is damaged: run kmsfs fsck --repair" if engine.damaged else "",
            )
        open_file.write_error = code
        for fh in self._writers:
            if self._handles.get(fh) is open_file:
                self._write_errors.setdefault(fh, code)
        self._invalidate_later(open_file.node.ino)

    def _cut_at_gap(self, open_file: OpenFile) -> None:
        """After a failure to store, keep the file a prefix of what was written.

        With the write-back cache the kernel writes dirty pages back in no fixed order
        (the flusher resumes where it stopped, a sync starts at the beginning): a WRITE
        past the end can come before those of the pages in between, which the engine
        fills with zeros meanwhile. Once storing failed the WRITEs of that gap never come
        (refused until the writers are gone), and the file would read as zeros where the
        writer wrote data, followed by data: cut it back to the first such gap. Only
        data written since the last fsync is dropped, and every writer is told.
        """
        gaps, open_file.gaps = open_file.gaps, []
        engine = open_file.engine
        start = min((start for start, _ in gaps), default=engine.size)
        if start >= engine.size:
            return
        try:
            # on a full disk too: the engine cuts the chunks behind the new final one
            # before it re-seals that (its undo record needs the room they free)
            engine.truncate(start)
        except OSError as error:
            log.error(
                "%s: cannot cut the file back to %d bytes, before data the kernel had not "
                "written back (%s): it reads as zeros there",
                self._describe(open_file.node),
                start,
                os.strerror(error.errno or 0),
            )
            return
        log.warning(
            "%s: cut back to %d bytes: the data written past that was stored before the "
            "data at it, which will not be stored now",
            self._describe(open_file.node),
            start,
        )

    def _invalidate_later(self, ino: int) -> None:
        """Drop the kernel's cached pages of ``ino`` and set its size to what is stored.

        From a thread, never from a request's handler itself: invalidating dirty pages
        makes the kernel send WRITEs and wait for them (pyfuse3.invalidate_inode's
        documentation), and a truncate needs the inode lock an fsync holds.
        """
        if ino in self._invalidating:
            self._invalidate_again.add(ino)
            return
        self._invalidating[ino] = trio.Event()
        trio.lowlevel.spawn_system_task(self._invalidate, ino)

    async def _invalidate(self, ino: int) -> None:
        try:
            while True:
                self._invalidate_again.discard(ino)
                await trio.to_thread.run_sync(_invalidate_inode, ino, abandon_on_cancel=True)
                await self._set_kernel_size(ino)
                if ino not in self._invalidate_again:
                    return
        except Exception:  # a system task must not raise: that would end the mount
            log.exception("dropping the cache of inode %d", ino)
        finally:
            self._invalidating.pop(ino).set()

    async def _set_kernel_size(self, ino: int) -> None:
        """With the write-back cache the kernel owns a file's size and ignores GETATTR's:
        after a failed write it keeps the size of what was not stored. A truncate through
        the mount to the stored size is the one way to correct it: by file handle where the
        mount may (CAP_DAC_READ_SEARCH, as root), else by the file's path at the mountpoint
        (a user's own mount: the user's own files)."""
        node = self.inodes.nodes.get(ino)
        if node is None or self.mountpoint is None:
            return
        try:
            size = self._attrs(self._stat_node(node), node).st_size  # what GETATTR says
            if self._kernel_truncate_works:
                try:
                    await self._truncate_through_kernel(ino, size, None)
                    return
                except OSError as error:
                    if error.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOSYS):
                        raise
                    self._kernel_truncate_works = False
                    log.info(
                        "cannot reopen files by handle (%s): sizes after a failed write are "
                        "corrected through paths at the mountpoint",
                        os.strerror(error.errno or 0),
                    )
            await self._truncate_through_kernel(ino, size, self._mount_path(ino))
        except (OSError, NameError_, pyfuse3.FUSEError) as error:
            code = error.errno if isinstance(error, (OSError, pyfuse3.FUSEError)) else None
            if code in (errno.ESTALE, errno.ENOENT):  # gone, or the kernel forgot it
                log.debug("inode %d: no size to correct", ino)
                return
            log.warning(
                "%s: cannot correct the size the kernel shows after a failed write (%s): "
                "it shows the old size, zeros past what was stored, until it forgets the file",
                self._describe(node),
                os.strerror(code) if code else error,
            )

    async def _truncate_through_kernel(self, ino: int, size: int, path: bytes | None) -> None:
        assert self.mountpoint is not None
        await trio.to_thread.run_sync(
            _kernel_truncate,
            self.mountpoint,
            ino,
            size,
            self._own_threads,
            path,
            abandon_on_cancel=True,
        )

    def _mount_path(self, ino: int) -> bytes:
        """A path of inode ``ino`` at the mountpoint (its plaintext names), for the mount's
        own calls through the kernel. ENOENT once a link on the way is gone."""
        assert self.mountpoint is not None
        names: list[bytes] = []
        while ino != ROOT:
            node = self.inodes.nodes.get(ino)
            if node is None or not node.links or len(names) > 4096:
                raise OSError(errno.ENOENT, "no path at the mountpoint")
            parent, backing = next(iter(node.links))
            if self.tree.encrypted:
                directory = self.inodes.dir_path(parent)
                backing = self.tree.decrypt_entry(directory, backing, cache_key=parent)
            names.append(backing)
            ino = parent
        return b"/".join([self.mountpoint, *reversed(names)])

    # ----------------------------------------------------------- directories
    @_handler
    async def opendir(self, inode: int, ctx) -> int:
        await self.key_bindings.check_caller(inode, ctx)  # a bound directory's names
        fd = os.open(self.inodes.path(inode), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        handle = self._new_handle()
        self._dir_handles[handle] = DirHandle(inode, fd)
        return handle

    @_handler
    async def readdir(self, fh: int, start_id: int, token) -> None:
        handle = self._dir_handles[fh]
        # the handle's own descriptor: short, and valid as long as the handle
        directory = (
            self.inodes.root_path if handle.inode == ROOT else b"/proc/self/fd/%d" % handle.fd
        )
        if handle.entries is None or start_id == 0:
            entries, _strays = self.tree.list_dir(directory, cache_key=handle.inode)
            handle.entries = sorted(entries, key=lambda entry: entry.name)
        # positions: 0 is '.', 1 is '..' (what getdents shows on ext4 and gocryptfs; the
        # kernel takes no reference to either, so neither counts as a lookup), then the
        # entries; each reply names the position after it
        for position in range(start_id, 2):
            name = (b".", b"..")[position]
            if not pyfuse3.readdir_reply(token, name, self._dot_attrs(handle, name), position + 1):
                return
        uncached = self.key_bindings.uncached(handle.inode)  # entries the kernel must not keep
        for index in range(max(start_id, 2) - 2, len(handle.entries)):
            entry = handle.entries[index]
            try:
                st = os.lstat(entry.backing, dir_fd=handle.fd)
            except FileNotFoundError:
                continue
            ino = self.inodes.ino_of(st.st_ino)
            attrs = self._attrs(st, self.inodes.nodes.get(ino), ino)
            if uncached:
                attrs.entry_timeout = attrs.attr_timeout = 0
            if not pyfuse3.readdir_reply(token, entry.name, attrs, index + 3):
                return
            self.inodes.remember(ino, handle.inode, entry.backing)

    def _dot_attrs(self, handle: DirHandle, name: bytes) -> pyfuse3.EntryAttributes:
        """The attributes of an open directory's '.' or '..' (its parent; its own at the
        root, and once it was removed: its parent is then unknown)."""
        node = self.inodes.nodes.get(handle.inode)
        if name == b".." and node is not None:
            try:
                parent = self.inodes.get(self.inodes.parent_of(handle.inode))
                return self._attrs(self._stat_node(parent), parent)
            except (pyfuse3.FUSEError, OSError):
                pass  # removed, or its parent just now: '..' is shown as the directory itself
        return self._attrs(os.fstat(handle.fd), node, handle.inode)

    @_handler
    async def releasedir(self, fh: int) -> None:
        handle = self._dir_handles.pop(fh, None)
        if handle is not None:
            os.close(handle.fd)

    @_handler
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        os.fsync(self._dir_handles[fh].fd)

    @_handler
    async def statfs(self, ctx) -> pyfuse3.StatvfsData:
        st = os.statvfs(self.inodes.root_path)
        data = pyfuse3.StatvfsData()
        for name in (
            "f_bsize",
            "f_frsize",
            "f_blocks",
            "f_bfree",
            "f_bavail",
            "f_files",
            "f_ffree",
            "f_favail",
        ):
            setattr(data, name, getattr(st, name))
        data.f_namemax = min(255, st.f_namemax)
        return data

    # ---------------------------------------------------- extended attributes
    def _xattr_call(self, inode: int, function: Callable[..., T], *args: Any) -> T:
        """Run an os.*xattr function on the inode's open fd, else on its path (no follow).

        Filesystems that refuse user xattrs (ENOTSUP, or EPERM on symlinks) are reported
        as ENODATA for reads.
        """
        node = self.inodes.get(inode)
        if node.open_file is not None:
            return function(node.open_file.fd, *args)
        return function(self.inodes.path(inode), *args, follow_symlinks=False)

    def _backing_xattr(self, name: bytes) -> bytes:
        if not name.startswith(USER_PREFIX):
            raise pyfuse3.FUSEError(errno.EOPNOTSUPP)
        backing = self.xattrs.backing_name(name)
        if backing is None:
            raise pyfuse3.FUSEError(errno.ERANGE)
        return backing

    @_handler
    async def setxattr(self, inode: int, name: bytes, value: bytes, ctx) -> None:
        if name == KEY_XATTR:
            return await self.key_bindings.bind(inode, value, ctx)
        self._check_writable_mount()
        backing = self._backing_xattr(name)
        self._xattr_call(inode, os.setxattr, backing, self.xattrs.seal_value(backing, value))

    async def getxattr(self, inode: int, name: bytes, ctx) -> bytes:
        # The kernel asks for security.capability before every write() and chown (3.8
        # per file of an untar, measured), ls -l for security.selinux and
        # system.posix_acl_access: answer at once (only user.* exists here, no lock, no
        # lookup) and keep the general path for user.*. The mount cannot make the kernel
        # stop asking: FUSE marks a superblock SB_NOSEC (no security xattrs to check)
        # only with FUSE_HANDLE_KILLPRIV_V2, which pyfuse3 3.5's init cannot ask for
        # (it sets only EXPORT_SUPPORT, WRITEBACK_CACHE and POSIX_ACL); and ENOSYS here
        # would turn off every getxattr, user.* ones too (the kernel's no_getxattr).
        self.poller.note_request()
        if not name.startswith(USER_PREFIX):
            raise pyfuse3.FUSEError(errno.ENODATA)
        return await self._get_user_xattr(inode, name)

    @_handler
    async def _get_user_xattr(self, inode: int, name: bytes) -> bytes:
        if name == KEY_XATTR:
            return self.key_bindings.describe(inode)
        backing = self._backing_xattr(name)
        try:
            sealed = self._xattr_call(inode, os.getxattr, backing)
        except OSError as error:
            if error.errno in (errno.ENODATA, errno.ENOTSUP, errno.EPERM):
                raise pyfuse3.FUSEError(errno.ENODATA) from None
            raise
        value = self.xattrs.open_value(backing, sealed)
        if value is None:
            log.error("inode %d: extended attribute failed authentication", inode)
            raise pyfuse3.FUSEError(errno.EIO)
        return value

    @_handler
    async def listxattr(self, inode: int, ctx) -> list[bytes]:
        try:
            stored = self._xattr_call(inode, os.listxattr)
        except OSError as error:
            if error.errno in (errno.ENOTSUP, errno.EPERM):
                return []
            raise
        plain_names = (self.xattrs.plain_name(os.fsencode(backing)) for backing in stored)
        return [name for name in plain_names if name is not None]

    @_handler
    async def removexattr(self, inode: int, name: bytes, ctx) -> None:
        if name == KEY_XATTR:
            raise pyfuse3.FUSEError(errno.EPERM)  # a binding is not removed this way
        self._check_writable_mount()
        backing = self._backing_xattr(name)
        try:
            self._xattr_call(inode, os.removexattr, backing)
        except OSError as error:
            if error.errno in (errno.ENOTSUP, errno.EPERM):
                raise pyfuse3.FUSEError(errno.ENODATA) from None
            raise
