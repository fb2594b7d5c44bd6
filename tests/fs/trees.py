"""Plaintext trees for the import/export/rewrap tests, and a comparison of two trees that
names the first difference (content, kind, mode, owner, mtime, symlink target, xattrs,
hard-link groups)."""

from __future__ import annotations

import os
import random
import stat
from pathlib import Path

SPARSE_SIZE = 64 << 20  # 64 MiB, of which one 4 KiB block in the middle holds data


def make_rich_tree(root: Path) -> None:
    """A tree with everything import must keep: modes, owners, times, symlinks (relative,
    absolute, dangling), hard links (in one directory and across two), user xattrs on
    files and directories, a sparse file, an empty file, a FIFO, long and odd names,
    a read-only file and a read-only directory."""
    root.mkdir()
    (root / "plain.txt").write_bytes(b"hello, world\n")
    (root / "big.bin").write_bytes(random.Random(1).randbytes(300_000))
    (root / "empty").touch()
    (root / "dir" / "deeper").mkdir(parents=True)
    (root / "dir" / "deeper" / "leaf").write_bytes(b"leaf" * 5000)
    (root / ("long-" + "n" * 240)).write_bytes(b"a long name")
    (root / "spaces and ünïcödé").write_bytes(b"odd name")
    with open(root / "sparse", "wb") as sparse:
        sparse.seek(SPARSE_SIZE // 2)
        sparse.write(b"x" * 4096)
        sparse.truncate(SPARSE_SIZE)
    os.link(root / "plain.txt", root / "hardlink.txt")
    os.link(root / "plain.txt", root / "dir" / "hardlink-elsewhere")
    os.symlink("plain.txt", root / "rel-link")
    os.symlink("/etc/hostname", root / "abs-link")
    os.symlink("does/not/exist", root / "dangling")
    os.mkfifo(root / "fifo", 0o640)
    os.setxattr(root / "plain.txt", "user.colour", b"blue")
    os.setxattr(root / "big.bin", "user.binary", bytes(range(256)))
    os.setxattr(root / "dir", "user.on-a-dir", b"yes")
    (root / "readonly").write_bytes(b"do not touch")
    os.chmod(root / "readonly", 0o400)
    os.chmod(root / "big.bin", 0o751)
    os.chmod(root / "dir" / "deeper" / "leaf", 0o4755)  # set-user-ID kept (as root)
    if os.geteuid() == 0:
        os.chown(root / "big.bin", 1234, 5678)
        os.chown(root / "dir", 4321, 8765)
        os.chown(root / "rel-link", 1111, 2222, follow_symlinks=False)
    for number, path in enumerate(sorted(root.rglob("*"), reverse=True)):
        os.utime(path, ns=(1_600_000_000_000_000_000 + number, 1_500_000_000_123_456_789 + number),
                 follow_symlinks=False)  # fmt: skip
    os.chmod(root / "dir" / "deeper", 0o555)
    os.utime(root / "dir" / "deeper", ns=(1_400_000_000_000_000_000, 1_400_000_000_000_000_001))


def make_small_files(
    root: Path, count: int, *, per_dir: int = 100, seed: int = 0
) -> dict[str, bytes]:
    """``count`` small files in directories of ``per_dir``; their contents by path."""
    rng = random.Random(seed)
    files: dict[str, bytes] = {}
    for number in range(count):
        relative = f"d{number // per_dir:03d}/f{number:06d}"
        data = rng.randbytes(rng.randrange(1, 3000))
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        files[relative] = data
    return files


def _describe(path: Path) -> dict[str, object]:
    info = os.lstat(path)
    record: dict[str, object] = {
        "kind": stat.S_IFMT(info.st_mode),
        "mode": stat.S_IMODE(info.st_mode),
        "uid": info.st_uid,
        "gid": info.st_gid,
        "mtime": info.st_mtime_ns,
    }
    if stat.S_ISLNK(info.st_mode):
        record["target"] = os.readlink(path)
        return record
    if stat.S_ISREG(info.st_mode):
        record["content"] = path.read_bytes()
        record["nlink"] = info.st_nlink
    if stat.S_ISREG(info.st_mode) or stat.S_ISDIR(info.st_mode):
        record["xattrs"] = {
            name: os.getxattr(path, name) for name in os.listxattr(path) if name.startswith("user.")
        }
    return record


def link_groups(root: Path) -> list[list[str]]:
    """Names of regular files grouped by inode (only groups of two or more)."""
    groups: dict[int, list[str]] = {}
    for path in root.rglob("*"):
        info = os.lstat(path)
        if stat.S_ISREG(info.st_mode) and info.st_nlink > 1:
            groups.setdefault(info.st_ino, []).append(str(path.relative_to(root)))
    return sorted(sorted(group) for group in groups.values())


def assert_same_tree(expected: Path, actual: Path, *, times: bool = True) -> None:
    names = sorted(str(p.relative_to(expected)) for p in expected.rglob("*"))
    got = sorted(str(p.relative_to(actual)) for p in actual.rglob("*"))
    assert got == names
    for name in names:
        want, have = _describe(expected / name), _describe(actual / name)
        if not times:
            want.pop("mtime")
            have.pop("mtime")
        assert have == want, name
    assert link_groups(actual) == link_groups(expected)
