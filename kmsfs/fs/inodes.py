"""The inode table: which backing entries the kernel knows, by inode number.

**Numbers.** A FUSE inode number is the backing filesystem's (stable while mounted,
shared by hard links), except that the cipher directory itself is
``pyfuse3.ROOT_INODE`` (and the backing inode numbered 1, if any, takes the cipher
directory's number). The kernel must never see one number for two different files: it
would serve the new one from the old one's cache, or refuse it as a removed directory.
So when a backing inode number is reused while the kernel still knows its previous owner
(a node whose last link went away — a file deleted but open or still cached, a
directory just removed — is *dead*), the new file gets a *fresh* number from a counter
that starts at ``FRESH_BASE`` (2**63, a range backing filesystems do not hand out) and
is never reused. The mapping backing number → fresh number lives only while the fresh
node or the dead node it stands in for is known, so every map here is bounded by the
number of nodes the kernel knows, however many times a name is created and deleted.

**Entries.** A node remembers the directory entries it was reached through as
``(parent inode, backing name)`` pairs: renaming a directory updates one link, never its
descendants. A dead node keeps the last attributes seen of its file (``last_stat``),
so the kernel's late requests for it (its writeback of timestamps after the last
unlink) are answered instead of failing.

**No whole backing paths.** Backing paths would be the cipher directory's path plus
every (encrypted, longer) name down to the entry, and exceed the kernel's PATH_MAX long
before the plaintext path does. Like gocryptfs, the mount works relative to directory
file descriptors instead: the table keeps ``O_PATH`` descriptors of directories (the
cipher directory's always; others in a bounded LRU cache, reopened with ``openat`` from
the nearest cached ancestor, iteratively, when missing) and names an entry as
``/proc/self/fd/<parent's descriptor>/<backing name>`` — short whatever the depth, and
usable by every ``os`` call, xattr calls included. An entry is always (parent, name):
``/proc/self/fd/N`` itself is never stat'ed (that would be the proc link). A cached
descriptor follows its directory through renames; it is closed when its node is
dropped or the directory removed, and the cache is trimmed to its bound only between
requests (:meth:`InodeTable.trim_dir_fds`), so a path a request built stays valid for
that request.
"""

from __future__ import annotations

import errno
import os
from collections import OrderedDict

import pyfuse3
import trio

ROOT = pyfuse3.ROOT_INODE
FRESH_BASE = 1 << 63  # fresh FUSE numbers: above anything a backing filesystem uses
MAX_DEPTH = 1 << 16  # a loop guard for walking up the parents
DIR_FD_CACHE = 256  # directory descriptors kept open between requests
_DIR_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class Node:
    __slots__ = (
        "ino",
        "st_ino",
        "links",
        "lookups",
        "open_file",
        "_lock",
        "dead",
        "last_stat",
        "cache_stale",
        "header_id",
    )

    def __init__(self, ino: int, st_ino: int) -> None:
        self.ino = ino
        self.st_ino = st_ino  # the backing inode number
        #: a tuple, not a set: nearly every node has one link (48 bytes against a set's
        #: 216; issue 19); changed only here, with _add_link and _drop_link
        self.links: tuple[tuple[int, bytes], ...] = ()
        self.lookups = 0
        self.open_file = None  # kmsfs.fs.ops.OpenFile while any handle is open
        self._lock: trio.Lock | None = None  # made on first use: see ``lock``
        self.dead = False  # the backing inode's last link is gone (its number may be reused)
        self.last_stat: os.stat_result | None = None  # of a dead node: its last attributes
        #: the file was open with direct_io (written past the kernel's page cache): the
        #: next open without it drops the cache (kmsfs.fs.ops: Operations._open_mode)
        self.cache_stale = False
        #: (ctime_ns, size, file id) of the backing file when an audited open read its
        #: header (kmsfs.fs.access_audit): an unlink of it unchanged since takes the id
        #: from here
        self.header_id: tuple[int, int, str] | None = None

    @property
    def lock(self) -> trio.Lock:
        """Serialises opening (a keyd round trip) per inode. Made when first asked for:
        a trio.Lock (with its ParkingLot) is ~0.5 KiB, and most nodes are only stat'ed
        (issue 19: a million stats). No await here, so two tasks cannot make two."""
        lock = self._lock
        if lock is None:
            lock = self._lock = trio.Lock()
        return lock


def _add_link(node: Node, link: tuple[int, bytes]) -> None:
    if link not in node.links:
        node.links += (link,)


def _drop_link(node: Node, link: tuple[int, bytes]) -> None:
    if link in node.links:
        node.links = tuple(other for other in node.links if other != link)


class InodeTable:
    def __init__(self, root_path: bytes) -> None:
        self.root_path = root_path
        self.root_fd = os.open(root_path, _DIR_FLAGS)
        self.root_st_ino = os.fstat(self.root_fd).st_ino
        root = Node(ROOT, self.root_st_ino)
        root.lookups = 1
        self.nodes: dict[int, Node] = {ROOT: root}
        self._fresh: dict[int, int] = {}  # backing number -> fresh FUSE number of its file
        self._fresh_owner: dict[int, int] = {}  # the reverse: fresh number -> backing number
        self._next_fresh = FRESH_BASE
        self._dir_fds: OrderedDict[int, int] = OrderedDict()  # directory inode -> O_PATH fd
        #: the most nodes held since the last :meth:`compact`: after the kernel forgot
        #: many, the mount gives memory back (kmsfs.fs.mount: _return_memory)
        self.peak = 1

    def close(self) -> None:
        for fd in self._dir_fds.values():
            os.close(fd)
        self._dir_fds.clear()
        os.close(self.root_fd)

    # ---------------------------------------------------------------- numbers
    def _natural(self, st_ino: int) -> int:
        if st_ino == ROOT:  # the backing inode that collides with FUSE's root
            return self.root_st_ino
        return st_ino

    def current_ino(self, st_ino: int) -> int:
        """The FUSE number the live backing inode ``st_ino`` has now (allocates nothing)."""
        if st_ino == self.root_st_ino:
            return ROOT
        return self._fresh.get(st_ino) or self._natural(st_ino)

    def ino_of(self, st_ino: int) -> int:
        """The FUSE number for the live backing inode ``st_ino``; a fresh one if the number
        it would have belongs to a dead node the kernel still knows."""
        ino = self.current_ino(st_ino)
        if ino == ROOT:
            return ino
        node = self.nodes.get(ino)
        if node is None or not node.dead:
            return ino
        ino = self._next_fresh
        self._next_fresh += 1
        replaced = self._fresh.get(st_ino)
        if replaced is not None:
            del self._fresh_owner[replaced]
        self._fresh[st_ino] = ino
        self._fresh_owner[ino] = st_ino
        return ino

    def _backing_number(self, ino: int) -> int:
        if ino >= FRESH_BASE:
            st_ino = self._fresh_owner.get(ino)
            if st_ino is None:
                raise pyfuse3.FUSEError(errno.ESTALE)
            return st_ino
        if ino == self.root_st_ino:
            return ROOT
        return ino

    # ------------------------------------------------------------------ nodes
    def get(self, ino: int) -> Node:
        node = self.nodes.get(ino)
        if node is None:
            raise pyfuse3.FUSEError(errno.ESTALE)
        return node

    def remember(self, ino: int, parent: int, name: bytes) -> Node:
        """Record that the kernel now knows ``ino`` through ``parent/name`` (lookup + 1)."""
        node = self.nodes.get(ino)
        if node is None:
            node = self.nodes[ino] = Node(ino, self._backing_number(ino))
            if len(self.nodes) > self.peak:
                self.peak = len(self.nodes)
        _add_link(node, (parent, name))
        node.lookups += 1
        return node

    def unlink(
        self,
        parent: int,
        name: bytes,
        st_ino: int,
        *,
        last_link: bool,
        last_stat: os.stat_result | None = None,
    ) -> None:
        """``parent/name`` is gone; ``last_link``: so is the backing inode (free for reuse).

        ``last_stat``: the entry's attributes just before, kept by a dead node.
        """
        node = self.nodes.get(self.current_ino(st_ino))
        if node is None:
            return
        _drop_link(node, (parent, name))
        if last_link:
            node.dead = True
            node.last_stat = last_stat
            node.links = ()
            self.close_dir_fd(node.ino)

    def move(self, ino: int, old: tuple[int, bytes], new: tuple[int, bytes]) -> None:
        node = self.nodes.get(ino)
        if node is not None:
            _drop_link(node, old)
            _add_link(node, new)

    def compact(self) -> None:
        """Copy the maps into new ones sized for what they hold now. A Python dict never
        shrinks when entries are deleted: one that held a million nodes keeps its
        million-slot table (~40 MiB) after the kernel forgot them all."""
        self.nodes = dict(self.nodes)
        self._fresh = dict(self._fresh)
        self._fresh_owner = dict(self._fresh_owner)
        self.peak = len(self.nodes)

    def forget(self, ino: int, count: int) -> None:
        node = self.nodes.get(ino)
        if node is None or ino == ROOT:
            return
        node.lookups -= count
        self.drop_if_unused(node)

    def drop_if_unused(self, node: Node) -> None:
        if node.lookups > 0 or node.open_file is not None or node.ino == ROOT:
            return
        if self.nodes.pop(node.ino, None) is None:
            return
        self.close_dir_fd(node.ino)
        fresh = self._fresh.get(node.st_ino)
        if fresh is None:
            return
        # the mapping lives while its fresh node, or the dead node it replaces, is known
        if fresh == node.ino or (
            fresh not in self.nodes and self._natural(node.st_ino) not in self.nodes
        ):
            del self._fresh[node.st_ino]
            del self._fresh_owner[fresh]

    def parent_of(self, ino: int) -> int:
        if ino == ROOT:
            return ROOT
        node = self.get(ino)
        if not node.links:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return next(iter(node.links))[0]

    # ------------------------------------------------------------ descriptors
    def dir_fd(self, ino: int) -> int:
        """An ``O_PATH`` descriptor of directory ``ino``, valid until the next request."""
        if ino == ROOT:
            return self.root_fd
        fd = self._dir_fds.get(ino)
        if fd is not None:
            self._dir_fds.move_to_end(ino)
            return fd
        missing: list[tuple[int, bytes]] = []  # from ``ino`` up to a cached ancestor
        current = ino
        while True:
            node = self.nodes.get(current)
            if node is None or not node.links:
                raise pyfuse3.FUSEError(errno.ENOENT)
            parent, name = next(iter(node.links))
            missing.append((current, name))
            if parent == ROOT:
                base = self.root_fd
                break
            base_fd = self._dir_fds.get(parent)
            if base_fd is not None:
                base = base_fd
                break
            current = parent
            if len(missing) > MAX_DEPTH:
                raise pyfuse3.FUSEError(errno.ELOOP)
        owned = -1  # a descriptor opened on the way down and not cached: closed after use
        try:
            for depth, (current, name) in enumerate(reversed(missing)):
                fd = os.open(name, _DIR_FLAGS, dir_fd=base)
                if owned >= 0:
                    os.close(owned)
                    owned = -1
                if depth == len(missing) - 1 or len(self._dir_fds) < DIR_FD_CACHE:
                    self._dir_fds[current] = fd
                else:
                    owned = fd
                base = fd
        except BaseException:
            if owned >= 0:
                os.close(owned)
            raise
        return base

    def trim_dir_fds(self) -> None:
        """Close the least recently used directory descriptors beyond the cache's bound.

        Only between requests: a request's paths name descriptors of this cache.
        """
        while len(self._dir_fds) > DIR_FD_CACHE:
            _, fd = self._dir_fds.popitem(last=False)
            os.close(fd)

    def close_dir_fd(self, ino: int) -> None:
        fd = self._dir_fds.pop(ino, None)
        if fd is not None:
            os.close(fd)

    def dir_path(self, ino: int) -> bytes:
        """A short path of directory ``ino`` to put entry names under (never to stat)."""
        return self.dir_at(ino)[0]

    def dir_at(self, ino: int) -> tuple[bytes, int]:
        """:meth:`dir_path` and :meth:`dir_fd` of directory ``ino`` at once."""
        fd = self.dir_fd(ino)
        return (self.root_path if ino == ROOT else b"/proc/self/fd/%d" % fd), fd

    def entry_at(self, ino: int) -> tuple[int, bytes]:
        """The inode's entry as (descriptor of its directory, backing name), for ``*at``
        calls (cheaper than any path); ENOENT once all links are gone. Not for the root."""
        node = self.nodes.get(ino)
        if node is None or not node.links:
            raise pyfuse3.FUSEError(errno.ENOENT)
        parent, name = next(iter(node.links))
        return self.dir_fd(parent), name

    def path(self, ino: int) -> bytes:
        """A short backing path of the inode (any of its links); ENOENT once all are gone."""
        if ino == ROOT:
            return self.root_path
        node = self.nodes.get(ino)
        if node is None or not node.links:
            raise pyfuse3.FUSEError(errno.ENOENT)
        parent, name = next(iter(node.links))
        return self.dir_path(parent) + b"/" + name
