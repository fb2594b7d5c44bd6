"""Helpers for the real-mount tests: mounts, cipher directories, child processes.

Every mount is started in the foreground (``kmsfs mount -f``) as a child process that
the test owns, its log in a file; teardown always unmounts (``fusermount3 -u``, then
``-uz`` if busy) and reaps the process (SIGTERM, then SIGKILL), whether the test passed
or not. Paths stay short: keyd's socket path must fit in 108 bytes.
The fixtures that use these live in ``conftest.py``.

Cipher directories get encrypted names (kmsfs's default) unless
``KMSFS_TEST_PLAINTEXT_NAMES=1`` is set (then ``kmsfs init --plaintext-names``, to run
the whole mount suite in that mode) or a factory or ``init`` call says otherwise.
``KMSFS_TEST_AUDIT_OPENS=1`` mounts everything with ``--audit-opens``.
``KMSFS_TEST_ROOT_BINDING=1`` binds the root of every cipher directory with encrypted
names to a second CMK (``alias/fs-root``, made on the keyd if missing) right after
``init`` (``kmsfs key set --cipherdir CIPHER / alias/fs-root``), to run the suite with
a per-directory binding at the root.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.conftest import KMSFS, Keyd, run_kmsfs

MOUNT_TIMEOUT = 30.0
PLAINTEXT_NAMES_ENV = "KMSFS_TEST_PLAINTEXT_NAMES"
AUDIT_OPENS_ENV = "KMSFS_TEST_AUDIT_OPENS"
ROOT_BINDING_ENV = "KMSFS_TEST_ROOT_BINDING"
ROOT_BINDING_KEY = "alias/fs-root"
FRESH_INO_BASE = 1 << 63  # kmsfs/fs/inodes.py: FRESH_BASE
CHUNK = 1 << 16
HEADER_SIZE = 2048
CHUNK_OVERHEAD = 28


def plaintext_names_by_default() -> bool:
    """Whether ``KMSFS_TEST_PLAINTEXT_NAMES`` asks for ``--plaintext-names`` cipher directories."""
    return os.environ.get(PLAINTEXT_NAMES_ENV, "").strip().lower() not in ("", "0", "no", "false")


def audit_opens_by_default() -> bool:
    """Whether ``KMSFS_TEST_AUDIT_OPENS`` asks every mount for ``--audit-opens``."""
    return os.environ.get(AUDIT_OPENS_ENV, "").strip().lower() not in ("", "0", "no", "false")


def root_binding_by_default() -> bool:
    """Whether ``KMSFS_TEST_ROOT_BINDING`` asks for a binding at every cipher root."""
    return os.environ.get(ROOT_BINDING_ENV, "").strip().lower() not in ("", "0", "no", "false")


def _key_service_is_aws(cipher: Path) -> bool:
    try:
        return "key_service" in json.loads((cipher / "kmsfs.conf").read_text())
    except (OSError, ValueError):
        return False


def file_key_aliases() -> tuple[str, ...]:
    """The CMKs that protect the files of a cipher directory ``MountFactory.init`` made
    with its default key: alias/fs, and alias/fs-root when the root is bound to it."""
    return ("alias/fs", ROOT_BINDING_KEY) if root_binding_by_default() else ("alias/fs",)


def bind_root(keyd: Keyd, cipher: Path) -> None:
    """Bind the (empty) root of ``cipher`` to ``alias/fs-root``, made if missing."""
    if keyd.kmsfs("keys", "describe", ROOT_BINDING_KEY, check=False).returncode != 0:
        keyd.kmsfs("keys", "create", "--alias", ROOT_BINDING_KEY)
    keyd.kmsfs("key", "set", "--cipherdir", str(cipher), "/", ROOT_BINDING_KEY)


def mounted_paths() -> set[str]:
    """Mount points currently listed in /proc/self/mountinfo (octal escapes decoded)."""
    points = set()
    with open("/proc/self/mountinfo", "rb") as info:
        for line in info:
            raw = line.split()[4].decode()
            points.add(raw.encode().decode("unicode_escape"))
    return points


def is_mounted(path: Path | str) -> bool:
    return os.path.realpath(path) in mounted_paths()


@contextlib.contextmanager
def mount_area(root: Path, prefix: str) -> Iterator[Path]:
    """A fresh directory under ``root`` for a test's mountpoints; anything still mounted
    below it at the end (a mount a test started, detached or through mount(8)) is
    unmounted, lazily if it is busy."""
    path = root / f"{prefix}-{os.urandom(3).hex()}"
    path.mkdir()
    try:
        yield path
    finally:
        for point in sorted(mounted_paths(), reverse=True):
            if point.startswith(f"{path}/"):
                subprocess.run(["umount", point], capture_output=True)
                if is_mounted(point):
                    subprocess.run(["fusermount3", "-uz", point], capture_output=True)


def drop_page_cache(path: Path | str) -> None:
    """Evict a file's clean pages from the kernel cache so the next read reaches the mount."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def cipher_chunk_offset(chunk_index: int, chunk_size: int = CHUNK) -> int:
    """Where chunk ``chunk_index`` starts in a backing file."""
    return HEADER_SIZE + chunk_index * (chunk_size + CHUNK_OVERHEAD)


def flip_byte(path: Path | str, offset: int) -> None:
    with open(path, "r+b") as backing:
        backing.seek(offset)
        byte = backing.read(1)
        assert byte, f"{path} has no byte at {offset}"
        backing.seek(offset)
        backing.write(bytes([byte[0] ^ 0x5A]))


@dataclass
class Mount:
    """One ``kmsfs mount -f`` process serving ``cipher`` on ``mnt``."""

    cipher: Path
    mnt: Path
    args: tuple[str, ...]
    keyd: Keyd
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    wrapper: tuple[str, ...] = ()  # a command the mount runs under (prlimit, setpriv...)

    def start(self) -> None:
        assert self.process is None or self.process.poll() is not None
        assert not is_mounted(self.mnt), f"{self.mnt} is already mounted"
        self.mnt.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            log.write(f"---- mount {' '.join(self.args)}\n".encode())
            log.flush()
            self.process = subprocess.Popen(
                [
                    *self.wrapper,
                    *KMSFS,
                    "mount",
                    "-f",
                    str(self.cipher),
                    str(self.mnt),
                    "--keyd-socket",
                    str(self.keyd.socket),
                    *self.args,
                    *self._default_args(),
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=self.keyd.env,
            )
        deadline = time.monotonic() + MOUNT_TIMEOUT
        while not is_mounted(self.mnt):
            if self.process.poll() is not None:
                raise AssertionError(
                    f"kmsfs mount exited {self.process.returncode} before mounting:\n{self.log()}"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise AssertionError(
                    f"mount did not appear within {MOUNT_TIMEOUT} s:\n{self.log()}"
                )
            time.sleep(0.02)

    def _default_args(self) -> tuple[str, ...]:
        if (
            audit_opens_by_default()
            and "--audit-opens" not in self.args
            and not _key_service_is_aws(self.cipher)  # keyd's audit log: keyd mounts only
        ):
            return ("--audit-opens",)
        return ()

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def backing(self, path: Path | str) -> Path:
        """The backing entry of a path at the mountpoint, found by inode number.

        Inode numbers at the mountpoint are those of the backing filesystem, so this works
        whatever the backing names are — unless a backing number was reused while the
        kernel still knew its previous owner: then the mount gave a fresh number (2**63 and
        up), and the entry is the one in the parent's backing directory that no other name
        there accounts for.
        """
        path = Path(path)
        ino = os.lstat(path).st_ino
        if ino == 1:  # FUSE's root inode: the mountpoint itself
            return self.cipher
        if ino < FRESH_INO_BASE:
            return backing_of(self.cipher, ino)
        directory = self.backing(path.parent)
        known = {os.lstat(entry).st_ino for entry in path.parent.iterdir()}
        candidates = [
            entry
            for entry in directory.iterdir()
            if entry.lstat().st_ino not in known and not _is_internal(entry.name)
        ]
        assert len(candidates) == 1, f"{path}: cannot tell its backing entry: {candidates}"
        return candidates[0]

    def kill9(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=15)

    def stop(self) -> None:
        """Unmount and reap; safe to call at any time, any number of times."""
        if is_mounted(self.mnt):
            for _ in range(20):
                result = subprocess.run(
                    ["fusermount3", "-u", str(self.mnt)], capture_output=True, check=False
                )
                if result.returncode == 0 or not is_mounted(self.mnt):
                    break
                time.sleep(0.1)
            else:
                subprocess.run(["fusermount3", "-uz", str(self.mnt)], capture_output=True)
        process = self.process
        if process is not None:
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.terminate()
                try:
                    process.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(timeout=15)
        if is_mounted(self.mnt):  # the process died without its kernel mount going
            subprocess.run(["fusermount3", "-uz", str(self.mnt)], capture_output=True)

    def remount(self, *args: str) -> None:
        """Unmount cleanly (the process must exit 0) and mount again, maybe with new options."""
        self.unmount_clean()
        if args:
            self.args = args
        self.start()

    def unmount_clean(self) -> None:
        assert self.alive, f"mount process is not running:\n{self.log()}"
        result = subprocess.run(
            ["fusermount3", "-u", str(self.mnt)], capture_output=True, text=True, check=False
        )
        assert result.returncode == 0, result.stderr
        assert self.process is not None
        code = self.process.wait(timeout=30)
        assert code == 0, f"mount exited {code}:\n{self.log()}"
        assert not is_mounted(self.mnt)


def _is_internal(backing_name: str) -> bool:
    """kmsfs's own files in a backing directory (not entries at the mountpoint)."""
    if backing_name.startswith("kmsfs.longname."):
        return backing_name.endswith(".name")
    return backing_name.startswith("kmsfs.")


def backing_of(cipher: Path, ino: int) -> Path:
    """The entry of the cipher directory whose inode number is ``ino``."""
    if os.lstat(cipher).st_ino == ino:
        return cipher
    for directory, dirnames, filenames in os.walk(cipher):
        for name in dirnames + filenames:
            path = Path(directory) / name
            if os.lstat(path).st_ino == ino:
                return path
    raise FileNotFoundError(f"no entry with inode {ino} in {cipher}")


class MountFactory:
    """Init cipher directories and start mounts under ``root``; :meth:`close` undoes it all.

    ``plaintext_names`` (default: :func:`plaintext_names_by_default`) is what :meth:`init`
    does unless told otherwise per call.
    """

    def __init__(self, root: Path, keyd: Keyd, *, plaintext_names: bool | None = None) -> None:
        self.root = root
        self.keyd = keyd
        self.mounts: list[Mount] = []
        self.plaintext_names = (
            plaintext_names_by_default() if plaintext_names is None else plaintext_names
        )

    def init(
        self,
        name: str | None = None,
        *,
        chunk_size: int | None = None,
        key: str = "alias/fs",
        plaintext_names: bool | None = None,
    ) -> Path:
        cipher = self.root / (name or f"c{uuid.uuid4().hex[:6]}")
        extra = ["--chunk-size", str(chunk_size)] if chunk_size else []
        plaintext = self.plaintext_names if plaintext_names is None else plaintext_names
        if plaintext:
            extra.append("--plaintext-names")
        self.keyd.kmsfs("init", str(cipher), "--key", key, *extra)
        # (only with the default key: a test choosing its key is about that key's policy)
        if not plaintext and key == "alias/fs" and root_binding_by_default():
            bind_root(self.keyd, cipher)
        return cipher

    def mount(
        self,
        cipher: Path | None = None,
        mnt: Path | None = None,
        *args: str,
        keyd: Keyd | None = None,
        wrapper: tuple[str, ...] = (),
    ) -> Mount:
        cipher = cipher if cipher is not None else self.init()
        mnt = mnt if mnt is not None else self.root / f"m{uuid.uuid4().hex[:6]}"
        mount = Mount(
            cipher=cipher,
            mnt=mnt,
            args=tuple(args),
            keyd=keyd or self.keyd,
            log_path=self.root / f"{mnt.name}.log",
            wrapper=wrapper,
        )
        self.mounts.append(mount)
        mount.start()
        return mount

    def close(self) -> None:
        for mount in reversed(self.mounts):
            mount.stop()
        self.mounts.clear()

    def __enter__(self) -> MountFactory:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


# ------------------------------------------------------------ child processes
def run_as_child(function: Callable[[], object], *, uid: int | None = None, timeout: float = 60):
    """Run ``function`` in a forked child (optionally as ``uid``); return its result.

    The result (or the exception raised) travels back pickled through a pipe.
    """
    import pickle

    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        code = 0
        try:
            os.close(read_end)
            if uid is not None:
                os.setgroups([])
                os.setgid(uid)
                os.setuid(uid)
            try:
                outcome = ("ok", function())
            except BaseException as error:  # report anything to the parent
                outcome = ("error", repr(error), getattr(error, "errno", None))
            payload = pickle.dumps(outcome)
            with os.fdopen(write_end, "wb") as pipe:
                pipe.write(payload)
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    os.close(write_end)
    deadline = time.monotonic() + timeout

    def kill_child() -> None:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        raise AssertionError(f"child did not finish within {timeout} s: killed")

    # the result is read with the deadline too: a hung child never closes the pipe
    chunks: list[bytes] = []
    poller = select.poll()
    poller.register(read_end, select.POLLIN)
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not poller.poll(remaining * 1000):
                kill_child()
            chunk = os.read(read_end, 1 << 16)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(read_end)
    data = b"".join(chunks)
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            kill_child()
        time.sleep(0.01)
    assert data, f"child exited with status {status} and no result"
    outcome = pickle.loads(data)
    if outcome[0] == "error":
        raise ChildError(outcome[1], outcome[2])
    return outcome[1]


class ChildError(Exception):
    def __init__(self, text: str, errno_value: int | None) -> None:
        super().__init__(text)
        self.errno = errno_value


@contextlib.contextmanager
def umask(value: int) -> Iterator[None]:
    old = os.umask(value)
    try:
        yield
    finally:
        os.umask(old)


__all__ = [
    "CHUNK",
    "ChildError",
    "Mount",
    "MountFactory",
    "PLAINTEXT_NAMES_ENV",
    "cipher_chunk_offset",
    "drop_page_cache",
    "flip_byte",
    "is_mounted",
    "plaintext_names_by_default",
    "root_binding_by_default",
    "file_key_aliases",
    "run_as_child",
    "run_kmsfs",
    "umask",
]
