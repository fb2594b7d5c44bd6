"""One seeded sequence of ≥ 10,000 file operations, run on the mount and on a plain directory.

Each operation's outcome (value or errno) must be the same on both; after every step the
sizes of what it touched must agree, and every ``CHECKPOINT`` steps (and at the end, and
again after a remount) the whole trees must: names, types, sizes, link counts, contents
read with the page cache dropped, so that they come from the mount's own storage.
The cipher directory uses 4 KiB chunks so that writes cross chunk boundaries often.

To explore: ``KMSFS_TEST_SEED=<n>`` picks another sequence, ``KMSFS_TEST_HISTORY=<n>``
shows more of the operations before a difference.
"""

from __future__ import annotations

import hashlib
import os
import random
import stat
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.fs.helpers import MountFactory

CHUNK = 4096
STEPS = 10_000
CHECKPOINT = 250
SEED = int(os.environ.get("KMSFS_TEST_SEED", "20261129"))
FILES = ["f0", "f1", "f2", "f3", "d0/f0", "d0/f1", "d1/f2", "d0/e/f3"]
DIRS = ["d0", "d1", "d2", "d0/e", "d1/e"]
OPEN_FLAGS = [
    os.O_RDWR,
    os.O_RDWR | os.O_CREAT,
    os.O_WRONLY | os.O_CREAT,
    os.O_RDONLY,
    os.O_RDWR | os.O_TRUNC,
    os.O_RDWR | os.O_APPEND,
    os.O_WRONLY | os.O_APPEND | os.O_CREAT,
    os.O_WRONLY | os.O_CREAT | os.O_EXCL,
    os.O_RDWR | os.O_CREAT | os.O_TRUNC,
]


def outcome(call: Callable[[], object]) -> tuple[str, object]:
    try:
        return ("ok", call())
    except OSError as error:
        return ("errno", error.errno)


@dataclass
class Handle:
    mount_fd: int
    plain_fd: int
    path: str
    flags: int
    number: int

    @property
    def name(self) -> str:
        return f"#{self.number}:{self.path}"


class Twins:
    """The same operations on two roots; any difference fails with the recent history."""

    def __init__(
        self,
        mount_root: Path,
        plain_root: Path,
        rng: random.Random,
        open_flags: list[int],
        rename_replaces: bool,
    ) -> None:
        self.roots = (mount_root, plain_root)
        self.open_flags = open_flags
        self.rename_replaces = rename_replaces
        self.rng = rng
        self.handles: list[Handle] = []
        self.history: list[str] = []
        self.step = 0
        self.opened = 0
        self.counts: Counter[tuple[str, object]] = Counter()

    # ------------------------------------------------------------ plumbing
    def fail(self, message: str) -> None:
        recent = "\n".join(self.history[-int(os.environ.get("KMSFS_TEST_HISTORY", "25")) :])
        raise AssertionError(f"step {self.step}: {message}\nrecent operations:\n{recent}")

    def same(self, what: str, on_mount: Callable[[], object], on_plain: Callable[[], object]):
        mounted, plain = outcome(on_mount), outcome(on_plain)
        self.history.append(f"{self.step}: {what} -> {_brief(plain)}")
        kind = what.split("(")[0].split("#")[0]
        self.counts[(kind, plain[0] if plain[0] == "ok" else plain[1])] += 1
        if mounted != plain:
            self.fail(f"{what}: mount gave {_brief(mounted)}, plain directory gave {_brief(plain)}")
        return plain

    def paths(self, relative: str) -> tuple[Path, Path]:
        return self.roots[0] / relative, self.roots[1] / relative

    # ------------------------------------------------------------ choices
    def offset(self) -> int:
        rng = self.rng
        kind = rng.random()
        if kind < 0.35:
            return max(0, rng.randrange(0, 40) * CHUNK + rng.randrange(-3, 4))
        if kind < 0.5:
            return max(0, rng.randrange(0, 4) * 65536 + rng.randrange(-5, 6))
        return rng.randrange(0, 200_000)

    def length(self) -> int:
        rng = self.rng
        kind = rng.random()
        if kind < 0.3:
            return rng.randrange(1, 16)
        if kind < 0.5:
            return CHUNK + rng.randrange(-2, 3)
        if kind < 0.95:
            return rng.randrange(1, 20_000)
        return rng.randrange(60_000, 70_000)

    # ------------------------------------------------------------ operations
    def op_open(self) -> None:
        if len(self.handles) >= 10:
            self.op_close()
            return
        relative = self.rng.choice(FILES)
        flags = self.rng.choice(self.open_flags)
        mount_path, plain_path = self.paths(relative)
        fds: list[int] = []

        def opener(path: Path) -> Callable[[], str]:
            def call() -> str:
                fds.append(os.open(path, flags | os.O_CLOEXEC, 0o644))
                return "fd"

            return call

        result = self.same(
            f"open#{self.opened + 1}({relative}, {flags:#o})",
            opener(mount_path),
            opener(plain_path),
        )
        if result[0] == "ok":
            self.opened += 1
            if stat.S_ISDIR(os.fstat(fds[1]).st_mode):
                # a directory opened read-only: not a file handle to play with (an open
                # directory that is then removed is test_fs_ops' business)
                os.close(fds[0])
                os.close(fds[1])
                return
            self.handles.append(Handle(fds[0], fds[1], relative, flags, self.opened))

    def pick(self) -> Handle | None:
        return self.rng.choice(self.handles) if self.handles else None

    def op_close(self) -> None:
        handle = self.pick()
        if handle is None:
            return
        self.handles.remove(handle)
        self.same(
            f"close({handle.name})",
            lambda: os.close(handle.mount_fd),
            lambda: os.close(handle.plain_fd),
        )

    def check_size(self, handle: Handle) -> None:
        """After each change: the sizes agree, and the contents too where the handle reads."""
        size = self.same(
            f"fstat-size({handle.name})",
            lambda: os.fstat(handle.mount_fd).st_size,
            lambda: os.fstat(handle.plain_fd).st_size,
        )
        if size[0] == "ok" and handle.flags & os.O_ACCMODE != os.O_WRONLY:
            self.same(
                f"content({handle.name})",
                lambda: os.pread(handle.mount_fd, size[1] + 1, 0),
                lambda: os.pread(handle.plain_fd, size[1] + 1, 0),
            )

    def op_pwrite(self) -> None:
        handle = self.pick()
        if handle is None:
            return
        offset, data = self.offset(), self.rng.randbytes(self.length())
        self.same(
            f"pwrite({handle.name}, {offset}, {len(data)})",
            lambda: os.pwrite(handle.mount_fd, data, offset),
            lambda: os.pwrite(handle.plain_fd, data, offset),
        )
        self.check_size(handle)

    def op_write(self) -> None:
        handle = self.pick()
        if handle is None:
            return
        data = self.rng.randbytes(self.length())
        self.same(
            f"write({handle.name}, {len(data)})",
            lambda: os.write(handle.mount_fd, data),
            lambda: os.write(handle.plain_fd, data),
        )
        self.check_size(handle)

    def op_pread(self) -> None:
        handle = self.pick()
        if handle is None:
            return
        offset, length = self.offset(), self.length()
        self.same(
            f"pread({handle.name}, {length}, {offset})",
            lambda: os.pread(handle.mount_fd, length, offset),
            lambda: os.pread(handle.plain_fd, length, offset),
        )

    def op_read(self) -> None:
        handle = self.pick()
        if handle is None:
            return
        length = self.length()
        self.same(
            f"read({handle.name}, {length})",
            lambda: os.read(handle.mount_fd, length),
            lambda: os.read(handle.plain_fd, length),
        )

    def op_lseek(self) -> None:
        handle = self.pick()
        if handle is None:
            return
        whence = self.rng.choice([os.SEEK_SET, os.SEEK_END, os.SEEK_CUR])
        offset = self.offset() if whence == os.SEEK_SET else self.rng.randrange(-100, 100)
        self.same(
            f"lseek({handle.name}, {offset}, {whence})",
            lambda: os.lseek(handle.mount_fd, offset, whence),
            lambda: os.lseek(handle.plain_fd, offset, whence),
        )

    def op_ftruncate(self) -> None:
        handle = self.pick()
        if handle is None:
            return
        size = self.offset()
        self.same(
            f"ftruncate({handle.name}, {size})",
            lambda: os.ftruncate(handle.mount_fd, size),
            lambda: os.ftruncate(handle.plain_fd, size),
        )
        self.check_size(handle)

    def op_truncate(self) -> None:
        relative, size = self.rng.choice(FILES), self.offset()
        mount_path, plain_path = self.paths(relative)
        self.same(
            f"truncate({relative}, {size})",
            lambda: os.truncate(mount_path, size),
            lambda: os.truncate(plain_path, size),
        )
        self.op_stat(relative)

    def op_fsync(self) -> None:
        handle = self.pick()
        if handle is None:
            return
        self.same(
            f"fsync({handle.name})",
            lambda: os.fsync(handle.mount_fd),
            lambda: os.fsync(handle.plain_fd),
        )

    def op_rename(self) -> None:
        pool = FILES + DIRS if self.rng.random() < 0.1 else FILES
        old, new = self.rng.choice(pool), self.rng.choice(pool)
        (mount_old, plain_old), (mount_new, plain_new) = self.paths(old), self.paths(new)
        if not self.rename_replaces and os.path.lexists(plain_new) and old != new:
            return
        self.same(
            f"rename({old}, {new})",
            lambda: os.rename(mount_old, mount_new),
            lambda: os.rename(plain_old, plain_new),
        )

    def op_unlink(self) -> None:
        relative = self.rng.choice(FILES)
        mount_path, plain_path = self.paths(relative)
        self.same(
            f"unlink({relative})", lambda: os.unlink(mount_path), lambda: os.unlink(plain_path)
        )

    def op_mkdir(self) -> None:
        relative = self.rng.choice(DIRS)
        mount_path, plain_path = self.paths(relative)
        mode = self.rng.choice([0o755, 0o700, 0o1777])
        self.same(
            f"mkdir({relative}, {mode:o})",
            lambda: os.mkdir(mount_path, mode),
            lambda: os.mkdir(plain_path, mode),
        )

    def op_rmdir(self) -> None:
        relative = self.rng.choice(DIRS)
        mount_path, plain_path = self.paths(relative)
        self.same(f"rmdir({relative})", lambda: os.rmdir(mount_path), lambda: os.rmdir(plain_path))

    def op_link(self) -> None:
        old, new = self.rng.choice(FILES + DIRS[:1]), self.rng.choice(FILES)
        (mount_old, plain_old), (mount_new, plain_new) = self.paths(old), self.paths(new)
        self.same(
            f"link({old}, {new})",
            lambda: os.link(mount_old, mount_new),
            lambda: os.link(plain_old, plain_new),
        )

    def op_stat(self, relative: str | None = None) -> None:
        relative = relative or self.rng.choice(FILES + DIRS)
        mount_path, plain_path = self.paths(relative)

        def summary(path: Path) -> Callable[[], tuple]:
            def call() -> tuple:
                st = os.stat(path)
                size = st.st_size if stat.S_ISREG(st.st_mode) else None
                return (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), size, st.st_nlink)

            return call

        self.same(f"stat({relative})", summary(mount_path), summary(plain_path))

    # ------------------------------------------------------------ whole trees
    def tree(self, root: Path, *, cold: bool) -> dict[str, tuple]:
        entries: dict[str, tuple] = {}
        for directory, dirnames, filenames in os.walk(root):
            for name in dirnames + filenames:
                path = Path(directory) / name
                relative = str(path.relative_to(root))
                st = os.lstat(path)
                if stat.S_ISREG(st.st_mode):
                    fd = os.open(path, os.O_RDONLY)
                    try:
                        if cold:
                            os.fsync(fd)
                            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                        content = os.pread(fd, st.st_size + 1, 0)
                    finally:
                        os.close(fd)
                    entries[relative] = ("file", st.st_size, st.st_nlink, content)
                else:
                    entries[relative] = ("dir", stat.S_IMODE(st.st_mode), st.st_nlink)
        return entries

    def compare_trees(self, label: str) -> None:
        mounted = self.tree(self.roots[0], cold=True)
        plain = self.tree(self.roots[1], cold=False)
        if mounted != plain:
            names = sorted(set(mounted) | set(plain))
            diff = [
                f"  {name}: mount {_short(mounted.get(name))} plain {_short(plain.get(name))}"
                for name in names
                if mounted.get(name) != plain.get(name)
            ]
            self.fail(f"{label}: trees differ\n" + "\n".join(diff))
        for handle in self.handles:  # open files, maybe unlinked: their whole content
            os.posix_fadvise(handle.mount_fd, 0, 0, os.POSIX_FADV_DONTNEED)
            size = os.fstat(handle.plain_fd).st_size
            if handle.flags & os.O_ACCMODE != os.O_WRONLY:
                self.same(
                    f"{label}: content of open {handle.name}",
                    lambda h=handle, s=size: os.pread(h.mount_fd, s + 1, 0),
                    lambda h=handle, s=size: os.pread(h.plain_fd, s + 1, 0),
                )
            self.check_size(handle)

    def close_all(self) -> None:
        while self.handles:
            handle = self.handles.pop()
            os.close(handle.mount_fd)
            os.close(handle.plain_fd)


def _brief(result: tuple[str, object]) -> str:
    kind, value = result
    if isinstance(value, bytes):
        head = value[:8].hex()
        return f"({kind}, {len(value)} bytes {head}… sha {hashlib.sha256(value).hexdigest()[:8]})"
    return repr(result)


def _short(entry: tuple | None) -> str:
    if entry is None or entry[0] != "file":
        return repr(entry)
    return f"(file size={entry[1]} nlink={entry[2]} sha={hash(entry[3]) & 0xFFFFFF:06x})"


@pytest.mark.parametrize(
    "open_flags,rename_replaces",
    [pytest.param(OPEN_FLAGS, True, id="all-open-flags,renames-replace")],
)
def test_random_operations_match_a_plain_directory(
    mounts: MountFactory, open_flags: list[int], rename_replaces: bool
) -> None:
    mount = mounts.mount(mounts.init(chunk_size=CHUNK))
    plain = mounts.root / f"plain-{mount.mnt.name}"
    plain.mkdir()
    os.chmod(plain, os.stat(mount.mnt).st_mode & 0o7777)
    rng = random.Random(SEED)
    twins = Twins(mount.mnt, plain, rng, open_flags, rename_replaces)
    operations = [
        (twins.op_open, 12),
        (twins.op_close, 8),
        (twins.op_pwrite, 20),
        (twins.op_write, 8),
        (twins.op_pread, 14),
        (twins.op_read, 5),
        (twins.op_lseek, 4),
        (twins.op_ftruncate, 5),
        (twins.op_truncate, 3),
        (twins.op_fsync, 3),
        (twins.op_rename, 5),
        (twins.op_unlink, 4),
        (twins.op_mkdir, 3),
        (twins.op_rmdir, 2),
        (twins.op_link, 3),
        (twins.op_stat, 4),
    ]
    functions = [function for function, _ in operations]
    weights = [weight for _, weight in operations]
    try:
        for step in range(STEPS):
            twins.step = step
            rng.choices(functions, weights)[0]()
            if step % CHECKPOINT == CHECKPOINT - 1:
                twins.compare_trees(f"checkpoint at step {step}")
                assert mount.alive, mount.log()
        twins.compare_trees("end")
    finally:
        twins.close_all()
    mount.remount()
    twins.compare_trees("after remount")
    # the sequence must have exercised what it claims to
    counts = twins.counts
    for kind, least in [
        ("pwrite", 1000),
        ("write", 300),
        ("pread", 400),
        ("ftruncate", 200),
        ("truncate", 50),
        ("rename", 50),
        ("link", 20),
        ("unlink", 100),
        ("mkdir", 20),
        ("rmdir", 10),
        ("fsync", 100),
        ("open", 500),
    ]:
        assert counts[(kind, "ok")] >= least, (kind, counts[(kind, "ok")])
