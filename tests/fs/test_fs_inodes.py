"""The inode table on its own (no mount): FUSE inode numbers and what the table keeps."""

from __future__ import annotations

from pathlib import Path

import pyfuse3

from kmsfs.fs.inodes import InodeTable

ROOT = pyfuse3.ROOT_INODE
REUSED_ST_INO = 4242


def _table_size(table: InodeTable) -> int:
    """Everything the table holds in its maps and sets (it must stay bounded)."""
    return sum(len(value) for value in vars(table).values() if isinstance(value, (dict, set)))


def test_one_name_created_and_unlinked_100000_times(tmp_path: Path) -> None:
    """A backing inode number reused on every cycle while the kernel still knows the
    previous file (it forgets a node a little after the unlink): every new file gets a
    number no known node has, every number fits in 64 bits, and the table stays small."""
    table = InodeTable(str(tmp_path).encode())
    known: list[int] = []  # nodes the kernel still knows, oldest first
    largest = 0
    for _ in range(100_000):
        ino = table.ino_of(REUSED_ST_INO)
        assert ino not in known
        assert 0 < ino < 1 << 64
        largest = max(largest, ino)
        table.remember(ino, ROOT, b"f")
        known.append(ino)
        table.unlink(ROOT, b"f", REUSED_ST_INO, last_link=True)
        if len(known) > 2:  # the kernel forgets the node of two cycles ago
            table.forget(known.pop(0), 1)
        assert _table_size(table) <= 16
    for ino in known:
        table.forget(ino, 1)
    assert set(table.nodes) == {ROOT}
    assert _table_size(table) <= 2
    # once nothing is known any more, the backing number is the FUSE number again
    assert table.ino_of(REUSED_ST_INO) == REUSED_ST_INO


def test_backing_number_is_the_fuse_number_while_unique(tmp_path: Path) -> None:
    table = InodeTable(str(tmp_path).encode())
    assert table.ino_of(tmp_path.stat().st_ino) == ROOT
    assert table.ino_of(77) == 77
    table.remember(77, ROOT, b"a")
    table.remember(77, ROOT, b"b")  # a hard link: same number
    table.unlink(ROOT, b"a", 77, last_link=False)
    assert table.ino_of(77) == 77
    table.unlink(ROOT, b"b", 77, last_link=True)
    fresh = table.ino_of(77)  # reused while the old file is still known
    assert fresh != 77
    table.remember(fresh, ROOT, b"c")
    assert table.ino_of(77) == fresh  # the same new file keeps its number
    table.forget(77, 2)
    assert table.ino_of(77) == fresh  # still known by that number
    table.forget(fresh, 1)
    assert table.ino_of(77) == 77
