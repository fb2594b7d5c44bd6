"""``kmsfs import SRC CIPHERDIR`` and ``kmsfs export CIPHERDIR DST``: whole trees in and
out of a cipher directory without a mount (no FUSE round trips).

Import writes exactly what a mount would have written: names encrypted with the
filesystem's name cipher (:class:`kmsfs.fs.tree.CipherTree`, long names with their
sidecars), symlink targets encrypted, ``user.*`` extended attributes through
:class:`kmsfs.fs.xattrs.XattrCipher`, file content through the format's engine
(:class:`kmsfs.format.EncryptedFile`: one data key per file from GenerateDataKey under
the config's CMK and file context), and the metadata the mount passes through from the
backing entry: mode, owner (when run as root; ``cp -a`` does the same as a normal
user: the owner becomes the caller), atime and mtime, hard links (backing hard links),
FIFOs and device nodes. A source file's holes (``SEEK_HOLE``) are not written: the
engine stores them as the format's hole runs. Export is the reverse (zeros read back
from a hole are skipped, so the copy is sparse as well).

Atomic per file: a file's content is written into an unnamed file (``O_TMPFILE``) in its
directory, with its mode, owner, xattrs and times, and only then linked in under its
final name, so a killed import or export never leaves a partial file under a final name
(where the filesystem has no O_TMPFILE: a temporary name ``kmsfs.part.*`` / ``.NAME.
kmsfs-part`` renamed into place). Symlinks, directories and special files appear whole
by their nature. A directory gets its mode and times after its entries.

Resuming after a kill: run again with ``--merge``. An entry already at its final name
whose kind, size and mtime match the source is kept (what ``rsync``'s quick check
does; every file under a final name is complete, see above), anything else is
(re)written. ``--verify`` reads every imported file back and compares it with the source.

The guarantee is for a killed process (the page cache keeps every completed write); the
tree is synced once at the end (``syncfs``), not file by file.

Like rewrap, both take the cipher directory's lock: refused while it is mounted.

Speed: per small file what is left is one keyd call (GenerateDataKey or Decrypt, ~0.4 ms
of keyd's CPU), creating the file (ext4's inode allocation, the same for the mount) and
~0.3 ms of Python. The keyd calls are made ahead of the files by two threads of their
own (``_Ahead``), so neither side waits for the other; small files are then copied by
one thread in order, large ones by ``--workers`` threads (``SMALL_FILE``).
"""

from __future__ import annotations

import errno
import os
import stat
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kmsfs.errors import InUse, KmsfsError, UsageError
from kmsfs.format import EncryptedFile
from kmsfs.format.header import SlotKind, read_header
from kmsfs.format.keys import FILE_ID_SIZE, full_context
from kmsfs.fs.bindings import unlock_records
from kmsfs.fs.config import FsConfig, keyd_endpoint, load_config
from kmsfs.fs.names import NameCipher
from kmsfs.fs.offline import unlock_config
from kmsfs.fs.rewrap import (
    ClientDataKeyProvider,
    ClientPerThread,
    require_keyd_service,
    syncfs,
)
from kmsfs.fs.tree import CipherTree, Entry
from kmsfs.fs.xattrs import USER_PREFIX, XattrCipher
from kmsfs.kms.client import KMSClient

COPY_BLOCK = 1 << 20
#: keyd requests made ahead of the file work (GenerateDataKey for import, Decrypt of the
#: next files' headers for export), each on its own connection (its own thread): keyd
#: answers one request in ~0.4 ms of its own CPU, so two keep it busy while we write
AHEAD_CONNECTIONS = 2
#: at most this many keys made ahead and not yet used (plaintext data keys in memory)
AHEAD_DEPTH = 64
#: files up to this size are copied one after the other by the calling thread, with
#: their keyd calls made ahead; larger ones by the workers (``--workers``). A small
#: file's copy is Python and system calls under the GIL: more threads only add GIL
#: hand-offs (strace: ~130 futex calls per file with 4 workers and 2 threads ahead),
#: and in the same run 1 thread used 25-40% less CPU per file than 4 workers. A large
#: file's copy is AES-GCM and I/O, which release the GIL: workers run them in parallel.
SMALL_FILE = COPY_BLOCK


def _is_small(info: os.stat_result) -> bool:
    return info.st_size <= SMALL_FILE


#: export leaves runs of zeros this long (and aligned) as holes, as ``cp --sparse`` does
HOLE_GRAIN = 64 << 10


@dataclass
class TransferSummary:
    files: int = 0
    directories: int = 0
    symlinks: int = 0
    hard_links: int = 0
    special: int = 0
    skipped: int = 0  # already there (--merge)
    bytes: int = 0  # plaintext bytes copied
    seconds: float = 0.0
    mismatches: list[str] = field(default_factory=list)  # --verify
    strays: list[str] = field(default_factory=list)  # export: backing entries left out


@dataclass
class _Opened:
    """A cipher directory opened for import/export: authenticated config, tree, keys."""

    config: FsConfig
    tree: CipherTree
    xattrs: XattrCipher
    endpoint: Path
    keyd_uid: str | None
    lock: int | None

    def close(self) -> None:
        if self.lock is not None:
            os.close(self.lock)
            self.lock = None


def _open_cipherdir(
    cipherdir: Path, keyd_socket: str | None, keyd_uid: str | None, what: str
) -> _Opened:
    from kmsfs.fs.mount import lock_cipherdir

    config = load_config(cipherdir)
    require_keyd_service(config, what)
    endpoint = keyd_endpoint(keyd_socket, config, keyd_uid=keyd_uid)
    try:
        lock = lock_cipherdir(cipherdir)
    except InUse as error:
        raise InUse(f"{error}; kmsfs {what} works only on an unmounted cipher directory") from None
    try:
        with KMSClient(endpoint, keyd_uid=keyd_uid) as client:
            metadata_key = unlock_config(client, config, f"keyd at {endpoint}")
            bound = unlock_records(client, config)
    except BaseException:
        if lock is not None:
            os.close(lock)
        raise
    root = os.fsencode(Path(cipherdir).resolve())
    names = None if config.plaintext_names else NameCipher(metadata_key)
    return _Opened(
        config,
        CipherTree(root, names, key_arn=config.key_arn, bindings=bound),
        XattrCipher(metadata_key),
        endpoint,
        keyd_uid,
        lock,
    )


# ------------------------------------------------------------------ helpers
def _is_root() -> bool:
    return os.geteuid() == 0


def _chown(path_or_fd: bytes | int, info: os.stat_result, *, follow: bool = True) -> None:
    """The source's owner, as root; a normal user keeps their own (as ``cp -a``)."""
    if not _is_root():
        return
    if isinstance(path_or_fd, int):
        os.fchown(path_or_fd, info.st_uid, info.st_gid)
    else:
        os.chown(path_or_fd, info.st_uid, info.st_gid, follow_symlinks=follow)


def _data_segments(fd: int, size: int) -> Iterator[tuple[int, int]]:
    """(offset, end) of the regions of ``fd`` that hold data (holes left out)."""
    offset = 0
    while offset < size:
        try:
            start = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError as error:
            if error.errno == errno.ENXIO:  # only a hole from here on
                return
            if error.errno in (errno.EINVAL, errno.EOPNOTSUPP):
                yield offset, size  # no hole reporting: all data
                return
            raise
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        yield start, end
        offset = end


def _read_range(fd: int, start: int, end: int) -> Iterator[tuple[int, bytes]]:
    offset = start
    while offset < end:
        data = os.pread(fd, min(COPY_BLOCK, end - offset), offset)
        if not data:
            return  # shrank meanwhile
        yield offset, data
        offset += len(data)


def _new_unnamed(directory: bytes, mode: int = 0o600) -> tuple[int, bytes | None]:
    """A new file in ``directory`` with no name (O_TMPFILE), else under a temporary
    internal name (returned, to be renamed into place)."""
    try:
        return os.open(directory, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, mode), None
    except OSError as error:
        if error.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
            raise
    temporary = directory + b"/kmsfs.part." + os.urandom(8).hex().encode()
    return os.open(temporary, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode), temporary


def _place(fd: int, temporary: bytes | None, directory: bytes, name: bytes) -> None:
    """Give the finished file its final name ``directory/name`` (replacing what is there)."""
    final = directory + b"/" + name
    if temporary is not None:
        os.rename(temporary, final)
        return
    dir_fd = os.open(directory, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        try:
            os.link(f"/proc/self/fd/{fd}", name, dst_dir_fd=dir_fd, follow_symlinks=True)
            return
        except FileExistsError:
            pass
        # --merge over a stale entry: link under a temporary name, rename over it
        spare = b"kmsfs.part." + os.urandom(8).hex().encode()
        os.link(f"/proc/self/fd/{fd}", spare, dst_dir_fd=dir_fd, follow_symlinks=True)
        try:
            os.rename(spare, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except BaseException:
            os.unlink(spare, dir_fd=dir_fd)
            raise
    finally:
        os.close(dir_fd)


def _user_xattrs(path: bytes, *, follow: bool = True) -> Iterator[tuple[bytes, bytes]]:
    try:
        names = os.listxattr(path, follow_symlinks=follow)
    except OSError as error:
        if error.errno in (errno.ENOTSUP, errno.EPERM):
            return
        raise
    for name in names:
        encoded = os.fsencode(name)
        if encoded.startswith(USER_PREFIX):
            yield encoded, os.getxattr(path, name, follow_symlinks=follow)


def _remove_any(path: bytes) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        import shutil

        shutil.rmtree(path)
    else:
        os.unlink(path)


def _interleaved(jobs: dict[bytes, list[tuple[Any, ...]]]) -> list[tuple[Any, ...]]:
    """The files of different directories side by side (the first of each, then the
    second...), the order parallel workers take them in: the kernel serialises creating
    files in one directory (its lock), and ext4's inode allocation there is most of an
    import's time (perf: ext4_create). 5,000 files with 4 workers: 5.0 s interleaved,
    8-9 s directory by directory."""
    queues = list(jobs.values())
    order = []
    for index in range(max((len(queue) for queue in queues), default=0)):
        for queue in queues:
            if index < len(queue):
                order.append(queue[index])
    return order


# ------------------------------------------------------------------ keys made ahead
class _Ahead:
    """keyd calls made ahead of the file work, in threads of their own.

    A file's keyd round trip (GenerateDataKey for import, Decrypt of its header's
    wrapped key for export) used to sit in the middle of its copy: ~0.5 ms in which the
    worker waited and keyd then idled while the worker wrote. Here ``AHEAD_CONNECTIONS``
    threads, each with its own keep-alive connection (a :class:`KMSClient` is not
    thread-safe), keep that many requests in flight while the files are written, with
    at most ``AHEAD_DEPTH`` results made and not yet used (the mount's pool of data
    keys, :mod:`kmsfs.fs.keys`, does the same for new files).

    Items are added in the order they will be used (:meth:`add`), while the walk finds
    them; :meth:`close` ends the list. A result is used once (:meth:`_take`) and dropped
    at :meth:`stop`. Nothing fails here: an item whose call failed yields None and its
    file makes the call itself, so every error still surfaces in that file's copy
    exactly as without this class. After a failure no more calls are made ahead (keyd
    is down or refuses the key: asking again is pointless).
    """

    def __init__(self, clients: ClientPerThread) -> None:
        self._clients = clients
        self._items: list[Any] = []
        #: index -> result of a call made (None: it failed), or None for an item given up
        #: before its call started; an entry goes when it is taken (or skipped)
        self._results: dict[int, Any] = {}
        self._started = 0  # items handed to a thread so far (in order)
        self._in_flight: set[int] = set()  # items being called for
        self._ready = 0  # results made and not yet taken
        self._closed = False  # no more items
        self._stopped = False
        self._failed = False
        lock = threading.Lock()
        self._work = threading.Condition(lock)  # the threads wait here for work
        self._done = threading.Condition(lock)  # the files wait here for their result
        self._threads: list[threading.Thread] = []

    def call(self, client: KMSClient, item: Any) -> Any:
        raise NotImplementedError

    def add(self, item: Any) -> int:
        """Queue one more item (its index is returned)."""
        with self._work:
            self._items.append(item)
            if not self._threads:
                for number in range(AHEAD_CONNECTIONS):
                    thread = threading.Thread(
                        target=self._run, name=f"kmsfs-ahead-{number}", daemon=True
                    )
                    thread.start()
                    self._threads.append(thread)
            self._work.notify()
            return len(self._items) - 1

    def close(self) -> None:
        """No more items will be added."""
        with self._work:
            self._closed = True
            self._work.notify_all()
            self._done.notify_all()

    def _next(self) -> int | None:
        with self._work:
            while True:
                if self._stopped or self._failed:
                    return None
                if self._started < len(self._items):
                    if self._started in self._results:  # given up by its file already
                        del self._results[self._started]
                        self._started += 1
                        continue
                    if self._ready + len(self._in_flight) < AHEAD_DEPTH:
                        self._in_flight.add(self._started)
                        self._started += 1
                        return self._started - 1
                elif self._closed:
                    return None
                self._work.wait()

    def _run(self) -> None:
        client = self._clients.client()
        while (index := self._next()) is not None:
            failed = False
            try:
                result = self.call(client, self._items[index])
            except Exception:  # the file's own call will raise it (see the class)
                result, failed = None, True
            with self._work:
                self._in_flight.discard(index)
                self._failed |= failed
                if not self._stopped:
                    self._results[index] = result
                    self._ready += result is not None
                self._done.notify_all()
                if failed:
                    self._work.notify_all()

    def _take(self, index: int) -> Any:
        """The result for item ``index``, waiting while the threads get to it; None if
        its call failed, or no call will be made ahead for it (then its file makes its
        own). Used once: the result is not kept."""
        with self._work:
            while index not in self._results:
                if self._stopped or index >= len(self._items):
                    return None
                if index < self._started and index not in self._in_flight:
                    return None  # taken already
                if index >= self._started and (
                    self._failed or self._ready + len(self._in_flight) > AHEAD_DEPTH // 2
                ):
                    # not started, and the threads may be resting until more results
                    # are used (or failed): give it up rather than wait
                    self._results[index] = None  # skipped by the threads
                    return None
                self._done.wait()
            result = self._results.pop(index)
            if result is not None:
                self._ready -= 1
                # the threads wait until half the results made ahead are used, then
                # refill in one go (a wake-up per half depth, not per file)
                if self._ready + len(self._in_flight) <= AHEAD_DEPTH // 2:
                    self._work.notify_all()
            return result

    def stop(self) -> None:
        with self._work:
            self._stopped = True
            self._results.clear()
            self._ready = 0
            self._work.notify_all()
            self._done.notify_all()
        for thread in self._threads:
            thread.join()


class _KeysAhead(_Ahead):
    """Import: new data keys (GenerateDataKey), each bound to a file id chosen here, as
    the format's ``take_prepared_key`` expects (:func:`kmsfs.format.header.create_header`).
    Any key fits any new file of the filesystem: keys are handed out in the order they
    are ready, one per non-empty file the walk found."""

    def __init__(self, clients: ClientPerThread, key_id: str, context: dict[str, str]) -> None:
        super().__init__(clients)
        self.key_id = key_id
        self.context = dict(context)
        self._taken = 0

    def call(self, client: KMSClient, item: Any) -> tuple[bytes, bytes, bytes, str]:
        file_id = os.urandom(FILE_ID_SIZE)
        response = client.generate_data_key(
            self.key_id, encryption_context=full_context(file_id, self.context)
        )
        return file_id, response["Plaintext"], response["CiphertextBlob"], response["KeyId"]

    def take(self) -> tuple[bytes, bytes, bytes, str] | None:
        with self._work:
            index = self._taken
            self._taken += 1
        return self._take(index)

    def forgo(self) -> None:
        """A file counted by the walk needed no key after all (it is empty now)."""
        self.take()


class _ImportKeys(ClientDataKeyProvider):
    """The format's key provider for one imported file: a key made ahead when the file
    is the filesystem's kind (its CMK and context), else (or when none is ready) one
    GenerateDataKey of its own, as before."""

    def __init__(self, client: KMSClient, ahead: _KeysAhead | None) -> None:
        super().__init__(client)
        self.ahead = ahead

    def take_prepared_key(
        self, key_id: str, stored_context: dict[str, str]
    ) -> tuple[bytes, bytes, bytes, str]:
        ahead, self.ahead = self.ahead, None
        if ahead is not None:
            if key_id == ahead.key_id and stored_context == ahead.context:
                prepared = ahead.take()
                if prepared is not None:
                    return prepared
            else:
                ahead.forgo()  # counted for this file by the walk, not for another
        file_id = os.urandom(FILE_ID_SIZE)
        data_key, wrapped_key, key_arn = self.generate_data_key(
            key_id, full_context(file_id, stored_context)
        )
        return file_id, data_key, wrapped_key, key_arn

    def release(self) -> None:
        """The file is written: a key made ahead for it that it did not use is dropped."""
        ahead, self.ahead = self.ahead, None
        if ahead is not None:
            ahead.forgo()


class _UnwrapAhead(_Ahead):
    """Export: the data key of each file to be exported, unwrapped (Decrypt) from its
    header before the file's turn. Items are backing paths in the order the files are
    exported; a result is (wrapped key, full context, data key) and is only used for a
    request asking for exactly that wrapped key under exactly that context (what keyd
    itself would answer); the format then authenticates the header with the key as
    always."""

    def call(self, client: KMSClient, item: Any) -> tuple[bytes, dict[str, str], bytes] | None:
        fd = os.open(item, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            if os.fstat(fd).st_size == 0:
                return None
            header = read_header(fd)
        finally:
            os.close(fd)
        slot = header.active_slot
        if slot.kind != SlotKind.KMS_BLOB:
            return None
        context = header.full_context
        data_key = client.decrypt(slot.wrapped_key, encryption_context=context)["Plaintext"]
        return slot.wrapped_key, context, data_key

    def take(self, index: int) -> tuple[bytes, dict[str, str], bytes] | None:
        return self._take(index)


class _ExportKeys(ClientDataKeyProvider):
    """The format's key provider for one exported file: its key unwrapped ahead, if it
    is the one asked for, else a Decrypt of its own."""

    def __init__(self, client: KMSClient, ahead: _UnwrapAhead | None, index: int) -> None:
        super().__init__(client)
        self.ahead = ahead
        self.index = index

    def decrypt_data_key(self, wrapped_blob: bytes, encryption_context: dict[str, str]) -> bytes:
        ahead, self.ahead = self.ahead, None
        if ahead is not None and self.index >= 0:
            unwrapped = ahead.take(self.index)
            if unwrapped is not None:
                wrapped_key, context, data_key = unwrapped
                if wrapped_key == wrapped_blob and context == encryption_context:
                    return data_key
        return super().decrypt_data_key(wrapped_blob, encryption_context)

    def release(self) -> None:
        """The file is exported: its key unwrapped ahead, if it was not used, is dropped."""
        ahead, self.ahead = self.ahead, None
        if ahead is not None and self.index >= 0:
            ahead.take(self.index)


class _Transfer:
    """What import and export share: the walk queues files per directory (``jobs``),
    workers copy them (:meth:`copy_files`) while ``ahead`` makes their keyd calls ahead
    of them, hard links are made after every file, and directories get their modes and
    times last, children first (:meth:`finish`)."""

    def __init__(
        self, opened: _Opened, *, merge: bool, workers: int, on_entry: Callable[[], None] | None
    ) -> None:
        self.opened = opened
        self.tree = opened.tree
        self.merge = merge
        self.workers = workers
        self.on_entry = on_entry
        self.clients = ClientPerThread(opened.endpoint, opened.keyd_uid)
        self.summary = TransferSummary()
        self.directories: list[tuple[bytes, os.stat_result]] = []
        self.futures: list[Future[int]] = []
        self.jobs: dict[bytes, list[tuple[Any, ...]]] = {}
        self.ahead: _Ahead | None = None

    def tick(self) -> None:
        if self.on_entry is not None:
            self.on_entry()

    def copy_files(self, walk: Callable[[], None], copy: Callable[..., int]) -> None:
        """Walk the tree, queueing its files, then copy them, interleaving directories:
        the large ones on the workers, meanwhile the small ones in this thread, with
        their keyd calls made ahead (``SMALL_FILE``)."""
        executor = ThreadPoolExecutor(max_workers=self.workers) if self.workers > 1 else None
        try:
            walk()
            small = [job for job in _interleaved(self.jobs) if _is_small(job[1])]
            large = [job for job in _interleaved(self.jobs) if not _is_small(job[1])]
            small = self.before_copy(small)
            if self.ahead is not None:
                self.ahead.close()
            if executor is not None:
                self.futures = [executor.submit(copy, *job) for job in large]
                large = []
            for job in [*small, *large]:
                self.summary.bytes += copy(*job)
                self.tick()
            for future in self.futures:
                self.summary.bytes += future.result()
                self.tick()
        finally:
            if executor is not None:
                executor.shutdown(wait=True, cancel_futures=True)
            if self.ahead is not None:
                self.ahead.stop()
            self.clients.close()

    def before_copy(self, small: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
        """The small files' jobs, in the order they are about to be copied (export
        numbers them here for its keyd calls ahead)."""
        return small

    def finish(self, target: bytes) -> None:
        for path, info in reversed(self.directories):  # children first
            os.chmod(path, stat.S_IMODE(info.st_mode))
            os.utime(path, ns=(info.st_atime_ns, info.st_mtime_ns))
        syncfs(target)


# ------------------------------------------------------------------ import
class _Importer(_Transfer):
    def __init__(
        self, opened: _Opened, *, merge: bool, workers: int, on_entry: Callable[[], None] | None
    ) -> None:
        super().__init__(opened, merge=merge, workers=workers, on_entry=on_entry)
        self.config = opened.config
        self.links: dict[tuple[int, int], tuple[bytes, Entry]] = {}
        self.pending_links: list[tuple[bytes, Entry, tuple[int, int], bytes]] = []
        self.lock = threading.Lock()
        self.keys_ahead = _KeysAhead(self.clients, self.config.key_arn, self.config.file_context)
        self.ahead = self.keys_ahead

    def entry(self, directory: bytes, name: bytes) -> Entry:
        with self.lock:  # the name cache is shared
            return self.tree.entry(directory, name, cache_key=directory)

    def existing(self, directory: bytes, entry: Entry, source: os.stat_result) -> bool:
        """With --merge: True if the entry is there already as the source has it (kept);
        a different entry of that name is removed (it is then written anew)."""
        path = directory + b"/" + entry.backing
        try:
            present = os.lstat(path)
        except FileNotFoundError:
            return False
        if not self.merge:
            raise UsageError(f"{os.fsdecode(path)} exists (add --merge)")
        if stat.S_IFMT(present.st_mode) == stat.S_IFMT(source.st_mode):
            if stat.S_ISDIR(source.st_mode):
                return True
            if present.st_mtime_ns == source.st_mtime_ns and self.size_of(present) == (
                source.st_size
            ):
                return True
        _remove_any(path)
        return False

    def size_of(self, present: os.stat_result) -> int:
        from kmsfs.format import plaintext_size

        if stat.S_ISREG(present.st_mode):
            try:
                return plaintext_size(present.st_size, self.config.chunk_size)
            except KmsfsError:
                return -1
        if stat.S_ISLNK(present.st_mode):
            return self.tree.symlink_size(present.st_size)
        return present.st_size

    def run(self, source: bytes, target: bytes) -> None:
        self.copy_files(lambda: self.import_dir(source, target), self.import_file)
        for path, entry, key, target_dir in self.pending_links:
            self.link(path, entry, key, target_dir)
        self.finish(target)

    def import_dir(self, source: bytes, target: bytes) -> None:
        with os.scandir(source) as listing:
            children = sorted(listing, key=lambda item: item.name)
        for child in children:
            name = os.fsencode(child.name)
            path = source + b"/" + name
            info = os.lstat(path)
            entry = self.entry(target, name)
            backing = target + b"/" + entry.backing
            kind = stat.S_IFMT(info.st_mode)
            if kind == stat.S_IFREG and info.st_nlink > 1:
                key = (info.st_dev, info.st_ino)
                if key in self.links:
                    self.pending_links.append((path, entry, key, target))
                    continue
                self.links[key] = (target, entry)
            if self.existing(target, entry, info):
                self.summary.skipped += 1
                if kind == stat.S_IFDIR:
                    self.import_dir(path, backing)
                    self.directories.append((backing, info))
                self.tick()
                continue
            if kind == stat.S_IFDIR:
                with self.tree.naming(target, entry):
                    self.tree.make_dir(backing, 0o700)
                _chown(backing, info)
                self.copy_xattrs(path, backing)
                self.summary.directories += 1
                self.tick()
                self.import_dir(path, backing)
                self.directories.append((backing, info))
            elif kind == stat.S_IFREG:
                self.summary.files += 1
                self.jobs.setdefault(target, []).append((path, info, target, entry))
                if self.key_made_ahead(info, target):
                    self.keys_ahead.add(None)
            elif kind == stat.S_IFLNK:
                stored = self.tree.stored_target(os.readlink(path), target, target)
                with self.tree.naming(target, entry):
                    os.symlink(stored, backing)
                _chown(backing, info, follow=False)
                os.utime(backing, ns=(info.st_atime_ns, info.st_mtime_ns), follow_symlinks=False)
                self.summary.symlinks += 1
                self.tick()
            else:  # FIFO, socket, device: made under its final name at once
                with self.tree.naming(target, entry):
                    os.mknod(backing, info.st_mode, info.st_rdev)
                _chown(backing, info)
                os.chmod(backing, stat.S_IMODE(info.st_mode))
                os.utime(backing, ns=(info.st_atime_ns, info.st_mtime_ns))
                self.summary.special += 1
                self.tick()

    def copy_xattrs(self, source: bytes, backing_target: bytes | int) -> None:
        cipher = self.opened.xattrs
        for name, value in _user_xattrs(source):
            stored = cipher.backing_name(name)
            if stored is None:
                raise UsageError(f"{os.fsdecode(source)}: extended attribute name too long")
            os.setxattr(backing_target, stored, cipher.seal_value(stored, value))

    def key_made_ahead(self, info: os.stat_result, target: bytes) -> bool:
        """Whether a file gets a data key made ahead (:class:`_KeysAhead`): a non-empty
        small file whose directory is under kmsfs.conf's CMK (one bound to another CMK
        makes its own call: no key is made ahead for nothing)."""
        return bool(info.st_size and _is_small(info)) and (
            not self.tree.bindings
            or self.tree.binding(target, target).key_arn == self.config.key_arn
        )

    def import_file(self, path: bytes, info: os.stat_result, target: bytes, entry: Entry) -> int:
        copied = 0
        source_fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            fd, temporary = _new_unnamed(target)
            counted = self.key_made_ahead(info, target)  # by the walk
            keys = _ImportKeys(self.clients.client(), self.keys_ahead if counted else None)
            try:
                engine = EncryptedFile.open(
                    fd,
                    key_provider=keys,
                    key_id=self.tree.binding(target, target).key_arn,  # its directory's CMK
                    encryption_context=self.config.file_context,
                    chunk_size=self.config.chunk_size,
                )
                present = os.fstat(source_fd)
                size = present.st_size
                if present.st_blocks * 512 >= size:  # fully allocated: no hole to look for
                    segments: Iterator[tuple[int, int]] = iter([(0, size)] if size else [])
                else:
                    segments = _data_segments(source_fd, size)
                for start, end in segments:
                    for offset, data in _read_range(source_fd, start, end):
                        engine.write(offset, data)
                        copied += len(data)
                if engine.size < size:
                    engine.truncate(size)  # a hole at the end: one hole run
                engine.close()
                _chown(fd, info)
                os.fchmod(fd, stat.S_IMODE(info.st_mode))
                self.copy_xattrs(path, fd)
                os.utime(fd, ns=(info.st_atime_ns, info.st_mtime_ns))
                with self.tree.naming(target, entry):
                    _place(fd, temporary, target, entry.backing)
                temporary = None
            finally:
                keys.release()
                os.close(fd)
                if temporary is not None:
                    os.unlink(temporary)
        finally:
            os.close(source_fd)
        return copied

    def link(self, path: bytes, entry: Entry, key: tuple[int, int], target: bytes) -> None:
        first_dir, first = self.links[key]
        backing = target + b"/" + entry.backing
        info = os.lstat(path)
        if self.existing(target, entry, info):
            if os.path.samefile(backing, first_dir + b"/" + first.backing):
                self.summary.skipped += 1
                return
            os.unlink(backing)
        with self.tree.naming(target, entry):
            os.link(first_dir + b"/" + first.backing, backing)
        self.summary.hard_links += 1
        self.tick()


def _user_entries(directory: bytes, tree: CipherTree | None) -> list[bytes]:
    names = os.listdir(directory)
    if tree is None:
        return names
    return [name for name in names if not tree.is_hidden(directory, name)]


def count_entries(source: Path) -> int:
    total = 0
    for _directory, subdirs, files in os.walk(source):
        total += len(subdirs) + len(files)
    return total


def import_tree(
    source: Path,
    cipherdir: Path,
    *,
    merge: bool = False,
    verify: bool = False,
    workers: int = 1,
    keyd_socket: str | None = None,
    keyd_uid: str | None = None,
    on_entry: Callable[[], None] | None = None,
) -> TransferSummary:
    """Encrypt the tree ``source`` into the (initialised, unmounted) ``cipherdir``."""
    started = time.monotonic()
    if not Path(source).is_dir():
        raise UsageError(f"{source} is not a directory")
    if workers < 1:
        raise UsageError("--workers must be at least 1")
    opened = _open_cipherdir(Path(cipherdir), keyd_socket, keyd_uid, "import")
    try:
        root = opened.tree.root
        if not merge and _user_entries(root, opened.tree):
            raise UsageError(
                f"{cipherdir} already holds files: add --merge to import into it "
                "(also to resume an interrupted import)"
            )
        importer = _Importer(opened, merge=merge, workers=workers, on_entry=on_entry)
        importer.run(os.fsencode(Path(source).resolve()), root)
        summary = importer.summary
        if verify:
            summary.mismatches = list(_verify_import(os.fsencode(Path(source).resolve()), opened))
    finally:
        opened.close()
    summary.seconds = time.monotonic() - started
    return summary


def _verify_import(source: bytes, opened: _Opened) -> Iterator[str]:
    """Read every imported entry back through the cipher tree; what differs."""
    tree = opened.tree
    with KMSClient(opened.endpoint, keyd_uid=opened.keyd_uid) as client:
        provider = ClientDataKeyProvider(client)
        for directory, subdirs, files in os.walk(source):
            relative = os.path.relpath(directory, source)
            plain_dir = "" if relative == b"." else os.fsdecode(relative)
            for name in [*subdirs, *files]:
                plain = (
                    os.path.join(plain_dir, os.fsdecode(name)) if plain_dir else os.fsdecode(name)
                )
                path = directory + b"/" + name
                try:
                    backing = tree.resolve(plain)
                    problem = _compare(path, backing, tree, opened, provider)
                except (OSError, KmsfsError) as error:
                    problem = str(error)
                if problem:
                    yield f"{plain}: {problem}"


def _compare(
    path: bytes,
    backing: bytes,
    tree: CipherTree,
    opened: _Opened,
    provider: ClientDataKeyProvider,
) -> str | None:
    source = os.lstat(path)
    stored = os.lstat(backing)
    if stat.S_IFMT(source.st_mode) != stat.S_IFMT(stored.st_mode):
        return "not the same kind of entry"
    if stat.S_IMODE(source.st_mode) != stat.S_IMODE(stored.st_mode):
        return "mode differs"
    if stat.S_ISLNK(source.st_mode):
        if tree.symlink_target(os.readlink(backing), os.path.dirname(backing)) != os.readlink(path):
            return "symlink target differs"
        return None
    if source.st_mtime_ns != stored.st_mtime_ns and not stat.S_ISDIR(source.st_mode):
        return "mtime differs"
    if not stat.S_ISREG(source.st_mode):
        return None
    with open(path, "rb") as plain:
        fd = os.open(backing, os.O_RDONLY | os.O_CLOEXEC)
        try:
            engine = EncryptedFile.open(
                fd,
                key_provider=provider,
                encryption_context=opened.config.file_context,
                writable=False,
            )
            offset = 0
            while True:
                expected = plain.read(COPY_BLOCK)
                if engine.read(offset, COPY_BLOCK) != expected:
                    return f"content differs at or after byte {offset}"
                if not expected:
                    break
                offset += len(expected)
        finally:
            os.close(fd)
    for name, value in _user_xattrs(path):
        sealed_name = opened.xattrs.backing_name(name)
        try:
            sealed = os.getxattr(backing, sealed_name or b"")
        except OSError:
            return f"extended attribute {os.fsdecode(name)} missing"
        if opened.xattrs.open_value(sealed_name or b"", sealed) != value:
            return f"extended attribute {os.fsdecode(name)} differs"
    return None


# ------------------------------------------------------------------ export
def export_tree(
    cipherdir: Path,
    destination: Path,
    *,
    merge: bool = False,
    workers: int = 1,
    keyd_socket: str | None = None,
    keyd_uid: str | None = None,
    on_entry: Callable[[], None] | None = None,
) -> TransferSummary:
    """Decrypt the whole (unmounted) ``cipherdir`` into the directory ``destination``."""
    started = time.monotonic()
    destination = Path(destination)
    if destination.exists() and not destination.is_dir():
        raise UsageError(f"{destination} is not a directory")
    if destination.is_dir() and any(destination.iterdir()) and not merge:
        raise UsageError(
            f"{destination} is not empty: add --merge to export into it "
            "(also to resume an interrupted export)"
        )
    if workers < 1:
        raise UsageError("--workers must be at least 1")
    opened = _open_cipherdir(Path(cipherdir), keyd_socket, keyd_uid, "export")
    try:
        destination.mkdir(mode=0o700, parents=True, exist_ok=True)
        exporter = _Exporter(opened, merge=merge, workers=workers, on_entry=on_entry)
        exporter.run(opened.tree.root, os.fsencode(destination.resolve()))
        summary = exporter.summary
    finally:
        opened.close()
    summary.seconds = time.monotonic() - started
    return summary


class _Exporter(_Transfer):
    def __init__(
        self, opened: _Opened, *, merge: bool, workers: int, on_entry: Callable[[], None] | None
    ) -> None:
        super().__init__(opened, merge=merge, workers=workers, on_entry=on_entry)
        self.links: dict[tuple[int, int], bytes] = {}
        self.pending_links: list[tuple[bytes, bytes]] = []  # (first exported path, new path)
        self.unwrap_ahead = _UnwrapAhead(self.clients)
        self.ahead = self.unwrap_ahead

    def run(self, cipher_root: bytes, target: bytes) -> None:
        self.copy_files(lambda: self.export_dir(cipher_root, target), self.export_file)
        for first, path in self.pending_links:
            if os.path.lexists(path):
                if os.path.samefile(first, path):
                    continue
                os.unlink(path)
            os.link(first, path)
            self.summary.hard_links += 1
            self.tick()
        self.finish(target)

    def existing(self, path: bytes, backing: os.stat_result) -> bool:
        try:
            present = os.lstat(path)
        except FileNotFoundError:
            return False
        if not self.merge:
            raise UsageError(f"{os.fsdecode(path)} exists (add --merge)")
        if stat.S_IFMT(present.st_mode) == stat.S_IFMT(backing.st_mode):
            if stat.S_ISDIR(present.st_mode):
                return True
            if present.st_mtime_ns == backing.st_mtime_ns:
                return True
        _remove_any(path)
        return False

    def before_copy(self, small: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
        return [(*job, self.unwrap_ahead.add(job[0])) for job in small]

    def export_dir(self, directory: bytes, target: bytes) -> None:
        entries, strays = self.tree.list_dir(directory, cache_key=directory)
        for stray in strays:  # not a kmsfs entry: left out, as the mount leaves it out
            relative = os.path.relpath(directory + b"/" + stray.backing, self.tree.root)
            self.summary.strays.append(f"{os.fsdecode(relative)}: {stray.problem}")
        for entry in sorted(entries, key=lambda item: item.name):
            backing = directory + b"/" + entry.backing
            path = target + b"/" + entry.name
            info = os.lstat(backing)
            kind = stat.S_IFMT(info.st_mode)
            if kind == stat.S_IFREG and info.st_nlink > 1:
                key = (info.st_dev, info.st_ino)
                if key in self.links:
                    self.pending_links.append((self.links[key], path))
                    continue
                self.links[key] = path
            if self.existing(path, info):
                self.summary.skipped += 1
                if kind == stat.S_IFDIR:
                    self.export_dir(backing, path)
                    self.directories.append((path, info))
                self.tick()
                continue
            if kind == stat.S_IFDIR:
                os.mkdir(path, 0o700)
                _chown(path, info)
                self.copy_xattrs(backing, path)
                self.summary.directories += 1
                self.tick()
                self.export_dir(backing, path)
                self.directories.append((path, info))
            elif kind == stat.S_IFREG:
                self.summary.files += 1
                self.jobs.setdefault(target, []).append((backing, info, target, entry.name))
            elif kind == stat.S_IFLNK:
                stored = os.readlink(backing)
                os.symlink(self.tree.symlink_target(stored, directory, directory), path)
                _chown(path, info, follow=False)
                os.utime(path, ns=(info.st_atime_ns, info.st_mtime_ns), follow_symlinks=False)
                self.summary.symlinks += 1
                self.tick()
            else:
                os.mknod(path, info.st_mode, info.st_rdev)
                _chown(path, info)
                os.chmod(path, stat.S_IMODE(info.st_mode))
                os.utime(path, ns=(info.st_atime_ns, info.st_mtime_ns))
                self.summary.special += 1
                self.tick()

    def copy_xattrs(self, backing: bytes, target: bytes | int) -> None:
        cipher = self.opened.xattrs
        try:
            names = os.listxattr(backing)
        except OSError as error:
            if error.errno in (errno.ENOTSUP, errno.EPERM):
                return
            raise
        for stored in names:
            stored_name = os.fsencode(stored)
            plain = cipher.plain_name(stored_name)
            if plain is None:
                continue
            value = cipher.open_value(stored_name, os.getxattr(backing, stored))
            if value is None:
                raise KmsfsError(
                    f"{os.fsdecode(backing)}: extended attribute failed authentication"
                )
            os.setxattr(target, plain, value)

    def export_file(
        self, backing: bytes, info: os.stat_result, target: bytes, name: bytes, ahead: int = -1
    ) -> int:
        copied = 0
        keys = _ExportKeys(self.clients.client(), self.unwrap_ahead, ahead)
        try:
            backing_fd = os.open(backing, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except BaseException:
            keys.release()
            raise
        try:
            try:
                engine = EncryptedFile.open(
                    backing_fd,
                    key_provider=keys,
                    encryption_context=self.opened.config.file_context,
                    writable=False,
                )
            finally:
                keys.release()
            fd, temporary = _new_unnamed(target)
            try:
                size = engine.size
                buffer = bytearray(min(COPY_BLOCK, size))  # small files: not 1 MiB each
                view = memoryview(buffer)
                offset = written = 0
                while offset < size:
                    count = engine.readinto(offset, view[: min(COPY_BLOCK, size - offset)])
                    if count <= 0:
                        break
                    for start in range(0, count, HOLE_GRAIN):  # zeros: left as a hole
                        end = min(start + HOLE_GRAIN, count)
                        if buffer.count(0, start, end) != end - start:
                            while start < end:
                                start += os.pwrite(fd, view[start:end], offset + start)
                            written = offset + end
                    offset += count
                    copied += count
                if written != size:  # a hole at the end (the new file is empty, no larger)
                    os.ftruncate(fd, size)
                engine.close()
                _chown(fd, info)
                os.fchmod(fd, stat.S_IMODE(info.st_mode))
                self.copy_xattrs(backing, fd)
                os.utime(fd, ns=(info.st_atime_ns, info.st_mtime_ns))
                _place(fd, temporary, target, name)
                temporary = None
            finally:
                os.close(fd)
                if temporary is not None:
                    os.unlink(temporary)
        finally:
            os.close(backing_fd)
        return copied
