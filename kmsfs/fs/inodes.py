"""The inode table: which backing entries the kernel knows, by inode number.

FUSE inode numbers are the backing filesystem's (stable while mounted, shared by
hard links), except that the cipher directory itself is ``pyfuse3.ROOT_INODE``, and
that a backing inode number reused while the kernel still knows its previous owner
(a file deleted but open, a directory just removed) gets a new number: the backing
number with a generation in its top byte. The kernel must never see one number for
two different files: it would serve the new one from the old one's cache, or refuse
it as a removed directory.
A node remembers the directory entries it was reached through as
``(parent inode, backing name)`` pairs, so a path is rebuilt by walking up the
parents — renaming a directory updates one link, never its descendants.
"""

from __future__ import annotations

import errno
import os

import pyfuse3
import trio

ROOT = pyfuse3.ROOT_INODE
GENERATION_SHIFT = 56


class Node:
    __slots__ = ("ino", "links", "lookups", "open_file", "lock")

    def __init__(self, ino: int) -> None:
        self.ino = ino
        self.links: set[tuple[int, bytes]] = set()
        self.lookups = 0
        self.open_file = None  # kmsfs.fs.ops.OpenFile while any handle is open
        self.lock = trio.Lock()  # serialises opening (a keyd round trip) per inode


class InodeTable:
    def __init__(self, root_path: bytes) -> None:
        self.root_path = root_path
        self.root_st_ino = os.lstat(root_path).st_ino
        root = Node(ROOT)
        root.lookups = 1
        self.nodes: dict[int, Node] = {ROOT: root}
        # backing inode number -> generation, for numbers reused while still known
        self._generations: dict[int, int] = {}

    def ino_of(self, st_ino: int) -> int:
        """The FUSE inode number for a backing inode number."""
        if st_ino == self.root_st_ino:
            return ROOT
        generation = self._generations.get(st_ino)
        if generation:
            return (generation << GENERATION_SHIFT) | st_ino
        if st_ino == ROOT:  # the backing inode that collides with FUSE's root
            return self.root_st_ino
        return st_ino

    def get(self, ino: int) -> Node:
        node = self.nodes.get(ino)
        if node is None:
            raise pyfuse3.FUSEError(errno.ESTALE)
        return node

    def path(self, ino: int) -> bytes:
        """A backing path of the inode (any of its links); ENOENT once all are gone."""
        if ino == ROOT:
            return self.root_path
        parts: list[bytes] = []
        seen = 0
        while ino != ROOT:
            node = self.nodes.get(ino)
            if node is None or not node.links:
                raise pyfuse3.FUSEError(errno.ENOENT)
            ino, name = next(iter(node.links))
            parts.append(name)
            seen += 1
            if seen > 4096:
                raise pyfuse3.FUSEError(errno.ELOOP)
        parts.append(self.root_path)
        return b"/".join(reversed(parts))

    def remember(self, ino: int, parent: int, name: bytes) -> Node:
        """Record that the kernel now knows ``ino`` through ``parent/name`` (lookup + 1)."""
        node = self.nodes.get(ino)
        if node is None:
            node = self.nodes[ino] = Node(ino)
        node.links.add((parent, name))
        node.lookups += 1
        return node

    def unlink(self, parent: int, name: bytes, st_ino: int, *, last_link: bool) -> None:
        """``parent/name`` is gone; ``last_link``: so is the backing inode (free for reuse)."""
        node = self.nodes.get(self.ino_of(st_ino))
        if node is not None:
            node.links.discard((parent, name))
            if last_link:
                self._generations[st_ino] = self._generations.get(st_ino, 0) + 1

    def move(self, ino: int, old: tuple[int, bytes], new: tuple[int, bytes]) -> None:
        node = self.nodes.get(ino)
        if node is not None:
            node.links.discard(old)
            node.links.add(new)

    def forget(self, ino: int, count: int) -> None:
        node = self.nodes.get(ino)
        if node is None or ino == ROOT:
            return
        node.lookups -= count
        self.drop_if_unused(node)

    def drop_if_unused(self, node: Node) -> None:
        if node.lookups <= 0 and node.open_file is None and node.ino != ROOT:
            self.nodes.pop(node.ino, None)
            self._drop_generation(node.ino)

    def _drop_generation(self, ino: int) -> None:
        """Once the kernel knows no number of a backing inode, its generation can go.

        Its next owner then gets the plain number again, which the kernel has forgotten.
        Without this, every backing inode ever deleted while known kept an entry.
        """
        st_ino = ino & ((1 << GENERATION_SHIFT) - 1)
        if ino == self.root_st_ino:
            st_ino = ROOT  # the backing inode that collides with FUSE's root (ino_of)
        generation = self._generations.get(st_ino)
        if generation is None:
            return
        plain = self.root_st_ino if st_ino == ROOT else st_ino
        numbers = [plain] + [(old << GENERATION_SHIFT) | st_ino for old in range(1, generation + 1)]
        if not any(number in self.nodes for number in numbers):
            del self._generations[st_ino]

    def parent_of(self, ino: int) -> int:
        if ino == ROOT:
            return ROOT
        node = self.get(ino)
        if not node.links:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return next(iter(node.links))[0]
