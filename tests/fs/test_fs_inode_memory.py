"""What the inode table costs per inode the kernel knows, and that it gives the memory
back once the kernel forgot them (issue 19: 381 MiB after stat-ing a million files,
kept after ``echo 2 > drop_caches`` left one node).

Measured in-process with tracemalloc (Python's own count of the bytes it allocated), on
an :class:`InodeTable` alone: no mount, no timing.
"""

from __future__ import annotations

import tracemalloc
import types
from collections.abc import Iterator
from pathlib import Path

import pytest

from kmsfs.fs.bindings import Binding
from kmsfs.fs.inodes import InodeTable
from kmsfs.fs.mount import CLEAR_NAMES_AFTER_NODES, RETURN_MEMORY_AFTER_NODES, return_memory
from kmsfs.fs.names import NameCipher
from kmsfs.fs.tree import CipherTree

NODES = 50_000
FIRST_INO = 1000
#: traced bytes per node the kernel knows: ~850 before (a trio.Lock and its ParkingLot
#: made for every node, a set of one link), ~345 after (the lock made when an open first
#: needs it, the links a tuple)
NODE_BOUND = 512
#: traced bytes left once every node was forgotten and the memory given back: before,
#: the nodes dict kept its 50,000-entry table (~2.7 MB); after, ~0.1 MB
LEFT_BOUND = 512 << 10


@pytest.fixture
def table(tmp_path: Path) -> Iterator[InodeTable]:
    inodes = InodeTable(bytes(tmp_path))
    try:
        yield inodes
    finally:
        inodes.close()


@pytest.fixture
def traced() -> Iterator[None]:
    tracemalloc.start()
    try:
        yield
    finally:
        tracemalloc.stop()


def operations_of(table: InodeTable) -> types.SimpleNamespace:
    """What return_memory uses of the mount's Operations: its inode table and name tree."""
    tree = CipherTree(table.root_path, NameCipher(bytes(range(32))), key_arn="arn:test")
    return types.SimpleNamespace(inodes=table, tree=tree)


def cached_names(names: NameCipher) -> int:
    return len(names._decrypted) + len(names._encrypted)


def remember_all(table: InodeTable, count: int) -> None:
    for index in range(count):
        table.remember(FIRST_INO + index, 1, b"file-%07d-with-a-name" % index)


def test_a_known_inode_costs_little(table: InodeTable, traced: None) -> None:
    before = tracemalloc.get_traced_memory()[0]
    remember_all(table, NODES)
    per_node = (tracemalloc.get_traced_memory()[0] - before) / NODES
    assert per_node <= NODE_BOUND, f"{per_node:.0f} traced bytes per node"


def test_lock_is_made_once_per_node(table: InodeTable) -> None:
    node = table.remember(FIRST_INO, 1, b"name")
    assert node.lock is node.lock
    other = table.remember(FIRST_INO + 1, 1, b"other")
    assert other.lock is not node.lock


def test_memory_of_forgotten_inodes_goes_back(table: InodeTable, traced: None) -> None:
    operations = operations_of(table)
    before = tracemalloc.get_traced_memory()[0]
    remember_all(table, NODES)
    for index in range(NODES):
        table.forget(FIRST_INO + index, 1)
    assert len(table.nodes) == 1
    assert return_memory(operations)  # type: ignore[arg-type]
    left = tracemalloc.get_traced_memory()[0] - before
    assert left <= LEFT_BOUND, f"{left} traced bytes left after every node was forgotten"
    assert table.peak == 1
    assert not return_memory(operations)  # type: ignore[arg-type]  # nothing new to give


def test_few_forgotten_inodes_give_nothing_back(table: InodeTable) -> None:
    """A small drop leaves the maps alone: the copy costs time in proportion to them."""
    operations = operations_of(table)
    remember_all(table, RETURN_MEMORY_AFTER_NODES * 4)
    nodes = table.nodes
    for index in range(RETURN_MEMORY_AFTER_NODES - 1):
        table.forget(FIRST_INO + index, 1)
    assert not return_memory(operations)  # type: ignore[arg-type]
    assert table.nodes is nodes
    for index in range(RETURN_MEMORY_AFTER_NODES - 1, RETURN_MEMORY_AFTER_NODES + 1):
        table.forget(FIRST_INO + index, 1)  # now over a quarter of the peak (and the root)
    assert return_memory(operations)  # type: ignore[arg-type]
    assert table.nodes is not nodes
    assert len(table.nodes) == RETURN_MEMORY_AFTER_NODES * 3
    kept = FIRST_INO + RETURN_MEMORY_AFTER_NODES + 1
    assert table.get(kept).ino == kept


def test_name_caches_go_with_a_mass_forget(table: InodeTable) -> None:
    """The name caches' entries, made all through a stat storm, each outlive their
    neighbours and keep a small-object arena mapped: they are dropped once the kernel
    forgot a tree far larger than a cache (measured through a mount, 200,000 stats then
    drop_caches: 123 MiB kept before, 72-85 MiB after; 49 MiB mounted), and names still
    encrypt the same afterwards. A smaller drop keeps them (lookups come back)."""
    operations = operations_of(table)
    names = operations.tree.names
    bound = NameCipher(bytes(range(32, 64)))  # a subtree bound to a CMK of its own
    operations.tree.bindings.add(Binding("arn:bound", bound, dir_id=bytes(range(16))))
    dir_id = bytes(16)
    encrypted = [names.encrypt_name(dir_id, b"name-%05d" % index) for index in range(1000)]
    bound.encrypt_name(dir_id, b"in-the-bound-subtree")
    assert (cached_names(names), cached_names(bound)) == (2000, 2)
    remember_all(table, CLEAR_NAMES_AFTER_NODES * 2)
    for index in range(CLEAR_NAMES_AFTER_NODES - 1):
        table.forget(FIRST_INO + index, 1)
    assert return_memory(operations)  # type: ignore[arg-type]  # the maps: compacted
    assert (cached_names(names), cached_names(bound)) == (2000, 2)  # not the names
    for index in range(CLEAR_NAMES_AFTER_NODES - 1, CLEAR_NAMES_AFTER_NODES * 2):
        table.forget(FIRST_INO + index, 1)
    assert return_memory(operations)  # type: ignore[arg-type]
    assert (cached_names(names), cached_names(bound)) == (0, 0)
    assert names.encrypt_name(dir_id, b"name-00007") == encrypted[7]
    assert names.decrypt_name(dir_id, encrypted[9]) == b"name-00009"
