"""Big files and real applications: a 200 MiB file's sha256, a sqlite3 database."""

from __future__ import annotations

import hashlib
import os
import sqlite3

from tests.fs.helpers import MountFactory

MIB = 1 << 20


def sha256_of(path: os.PathLike, block: int = MIB) -> str:
    digest = hashlib.sha256()
    with open(path, "rb", buffering=0) as handle:
        while chunk := handle.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def test_200_mib_file_sha256_across_remount(mounts: MountFactory) -> None:
    mount = mounts.mount()
    path = mount.mnt / "big.bin"
    digest = hashlib.sha256()
    fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o600)
    try:
        for _ in range(200):
            block = os.urandom(MIB)
            digest.update(block)
            assert os.write(fd, block) == MIB
    finally:
        os.close(fd)
    expected = digest.hexdigest()
    assert os.stat(path).st_size == 200 * MIB
    assert sha256_of(path) == expected
    mount.remount()
    assert os.stat(path).st_size == 200 * MIB
    assert sha256_of(path, block=3 * MIB + 17) == expected
    backing = os.stat(mount.backing(path)).st_size
    assert backing == 2048 + 200 * 16 * (65536 + 28)


def _fill(database: sqlite3.Connection) -> None:
    database.execute("CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT, blob BLOB)")
    database.execute("CREATE INDEX items_name ON items(name)")
    for batch in range(20):
        with database:
            database.executemany(
                "INSERT INTO items (name, blob) VALUES (?, ?)",
                [(f"item-{batch}-{i}", os.urandom(i % 700)) for i in range(250)],
            )
    with database:
        database.execute("DELETE FROM items WHERE id % 7 = 0")
        database.execute("UPDATE items SET name = name || '-updated' WHERE id % 5 = 0")
    try:
        with database:
            database.execute("INSERT INTO items (name) VALUES ('rolled back')")
            raise RuntimeError("roll back")
    except RuntimeError:
        pass
    database.execute("VACUUM")


def _check(path: os.PathLike) -> None:
    database = sqlite3.connect(path)
    try:
        assert database.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        count = database.execute("SELECT count(*) FROM items").fetchone()[0]
        assert count == 5000 - 5000 // 7
        assert (
            database.execute("SELECT count(*) FROM items WHERE name = 'rolled back'").fetchone()[0]
            == 0
        )
        updated = database.execute(
            "SELECT count(*) FROM items WHERE name LIKE '%-updated'"
        ).fetchone()[0]
        assert updated == len([i for i in range(1, 5001) if i % 5 == 0 and i % 7 != 0])
    finally:
        database.close()


def test_sqlite_database(mounts: MountFactory) -> None:
    mount = mounts.mount()
    for journal in ("delete", "wal"):
        path = mount.mnt / f"app-{journal}.db"
        database = sqlite3.connect(path)
        try:
            database.execute(f"PRAGMA journal_mode={journal}")
            _fill(database)
        finally:
            database.close()
        _check(path)
    mount.remount()
    for journal in ("delete", "wal"):
        _check(mount.mnt / f"app-{journal}.db")
