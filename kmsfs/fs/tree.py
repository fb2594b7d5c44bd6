"""The cipher directory's tree: plaintext names ↔ backing entries, for the mount and offline tools.

With encrypted names (the default) every backing directory holds a ``kmsfs.diriv``
and entries named as ``kmsfs/fs/names.py`` describes; with ``plaintext_names`` the
backing tree mirrors the plaintext one and only ``kmsfs.conf`` at the root is reserved.
All paths here are backing paths, as bytes: real ones for the offline tools, short
``/proc/self/fd/N`` ones for the mount's directories (``inodes.py``: never whole backing
paths, which exceed PATH_MAX); the cipher directory is always ``root`` itself.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from kmsfs.fs.bindings import Binding, BindingMap, offline_parent
from kmsfs.fs.config import CONFIG_NAME
from kmsfs.fs.names import (
    DIR_ID_SIZE,
    DIRIV_NAME,
    NameCipher,
    NameError_,
    is_internal,
    is_longname,
    longname_sidecar,
    new_dir_id,
)

log = logging.getLogger("kmsfs.mount")

_PROC_FD = b"/proc/self/fd/"

CONFIG_NAME_BYTES = CONFIG_NAME.encode()
#: stray entries remembered so each is warned about once (then warnings may repeat)
MAX_WARNED = 1024


@dataclass(frozen=True, slots=True)
class Entry:
    """One name at the mountpoint and where it lives in the backing directory."""

    name: bytes  # plaintext
    backing: bytes  # entry name in the backing directory
    encoded: bytes | None  # full encoded name (differs from backing for long names)
    dir_id: bytes | None = None  # the directory's id the name was encrypted with


@dataclass(frozen=True, slots=True)
class Stray:
    """A backing entry that is not a valid kmsfs entry (tampering, a stray file)."""

    directory: bytes
    backing: bytes
    problem: str


ParentOf = Callable[[bytes, Hashable | None], tuple[bytes, Hashable | None] | None]


class CipherTree:
    """``names``: the filesystem's default name cipher (None: plaintext names);
    ``bindings``: the per-directory CMKs (``bindings.py``), whose name keys replace it in
    their subtrees. ``parent_of`` finds a directory's parent for them (default: the
    backing path's dirname, for offline tools' real paths; the mount sets its own)."""

    def __init__(
        self,
        root: bytes,
        names: NameCipher | None,
        *,
        key_arn: str = "",
        bindings: dict[bytes, Binding] | None = None,
    ) -> None:
        self.root = root
        self.names = names
        self.bindings = BindingMap(Binding(key_arn, names), bindings)
        self.parent_of: ParentOf = offline_parent(root)
        self._dir_ids: dict[Hashable, bytes] = {}
        #: strays warned about: (the directory's cache key, or its path; backing name)
        self._warned: set[tuple[Hashable, bytes]] = set()

    @property
    def encrypted(self) -> bool:
        return self.names is not None

    # ------------------------------------------------------------ directories
    def dir_id(self, directory: bytes, cache_key: Hashable | None = None) -> bytes:
        """The directory's id, read from its ``kmsfs.diriv`` (cached under ``cache_key``)."""
        if cache_key is not None:
            cached = self._dir_ids.get(cache_key)
            if cached is not None:
                return cached
        try:
            with open(directory + b"/" + DIRIV_NAME, "rb") as diriv:
                dir_id = diriv.read(DIR_ID_SIZE + 1)
        except FileNotFoundError:
            log.error("%s: directory has no %s", shown_path(directory), DIRIV_NAME.decode())
            raise OSError(errno.EIO, "directory id missing") from None
        if len(dir_id) != DIR_ID_SIZE:
            log.error("%s: damaged %s", shown_path(directory), DIRIV_NAME.decode())
            raise OSError(errno.EIO, "directory id damaged")
        if cache_key is not None:
            self._dir_ids[cache_key] = dir_id
        return dir_id

    def clear_name_caches(self) -> None:
        """Empty every name cipher's cache (the default's and bound subtrees'): after the
        kernel forgot most of what it knew (see kmsfs.fs.mount.return_memory)."""
        ciphers = [self.bindings.default.names]
        ciphers += [binding.names for binding in self.bindings.bound.values()]
        for names in ciphers:
            if names is not None:
                names.clear()

    def forget_dir(self, cache_key: Hashable) -> None:
        self._dir_ids.pop(cache_key, None)
        self.bindings.forget(cache_key)

    def binding(self, directory: bytes, cache_key: Hashable | None = None) -> Binding:
        """The effective binding of a directory (its own, else its nearest ancestor's,
        else kmsfs.conf's): the CMK of its new files and the cipher of its names."""
        if not self.bindings:
            return self.bindings.default
        return self.bindings.effective(directory, cache_key, self.dir_id, self.parent_of)

    def _names_of(self, directory: bytes, cache_key: Hashable | None) -> NameCipher:
        """The name cipher for entries of ``directory`` (encrypted names only); OSError
        (EACCES, EIO) when its binding's name key could not be had."""
        if not self.bindings:
            assert self.names is not None
            return self.names
        names = self.binding(directory, cache_key).name_cipher()
        assert names is not None
        return names

    def write_dir_id(self, directory: bytes, dir_id: bytes | None = None) -> None:
        fd = os.open(
            directory + b"/" + DIRIV_NAME,
            os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
            0o444,
        )
        try:
            os.write(fd, dir_id or new_dir_id())
        finally:
            os.close(fd)

    def make_dir(self, path: bytes, mode: int) -> None:
        """mkdir with exactly ``mode``; with encrypted names, its id file first."""
        if not self.encrypted:
            os.mkdir(path, mode)
            os.chmod(path, mode | (os.lstat(path).st_mode & stat.S_ISGID))
            return
        os.mkdir(path, 0o700)
        try:
            self.write_dir_id(path)
        except BaseException:
            os.rmdir(path)
            raise
        # keep the set-group-ID bit a set-group-ID parent gives its subdirectories
        os.chmod(path, mode | (os.lstat(path).st_mode & stat.S_ISGID))

    def take_dir_id(self, path: bytes) -> bytes | None:
        """Empty a directory that is about to go (rmdir, or replaced by a rename).

        ENOTEMPTY unless it holds nothing but kmsfs's own id file, which is removed and
        returned so :meth:`write_dir_id` can put it back if the operation then fails.
        """
        if not self.encrypted:
            return None
        if any(name != DIRIV_NAME for name in os.listdir(path)):
            raise OSError(errno.ENOTEMPTY, "directory not empty")
        diriv = path + b"/" + DIRIV_NAME
        with open(diriv, "rb") as saved:
            dir_id = saved.read()
        os.unlink(diriv)
        return dir_id

    def remove_dir(self, path: bytes) -> None:
        """rmdir; ENOTEMPTY unless it holds nothing but kmsfs's own id file."""
        dir_id = self.take_dir_id(path)
        try:
            os.rmdir(path)
        except OSError:
            if dir_id is not None:
                self.write_dir_id(path, dir_id)  # something appeared meanwhile: put it back
            raise

    # ------------------------------------------------------------------ names
    def is_hidden(self, directory: bytes, backing: bytes) -> bool:
        if self.encrypted:
            return is_internal(backing)
        return directory == self.root and backing == CONFIG_NAME_BYTES

    def entry(self, directory: bytes, name: bytes, cache_key: Hashable | None = None) -> Entry:
        """Where ``name`` lives (or would live) in ``directory``."""
        if len(name) > 255:
            raise OSError(errno.ENAMETOOLONG, "file name too long")
        if self.names is None:
            if directory == self.root and name == CONFIG_NAME_BYTES:
                raise OSError(errno.EPERM, "kmsfs.conf is reserved")
            return Entry(name, name, None)
        dir_id = self.dir_id(directory, cache_key)
        encoded = self._names_of(directory, cache_key).encrypt_name(dir_id, name)
        return Entry(name, NameCipher.backing_name(encoded), encoded, dir_id)

    def add_name(self, directory: bytes, entry: Entry) -> bool:
        """Before an entry is created: a long name's sidecar. True if this made a new one.

        An existing sidecar (renaming over a long name) is kept when it already says the
        same, else replaced through a temporary file: sidecars are read-only (0444).
        """
        if entry.encoded is None or entry.backing == entry.encoded:
            return False
        sidecar = directory + b"/" + longname_sidecar(entry.backing)
        try:
            with open(sidecar, "rb") as existing:
                if existing.read(len(entry.encoded) + 1) == entry.encoded:
                    return False
            created = False
        except FileNotFoundError:
            created = True
        temporary = sidecar + b".tmp"
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o444)
        try:
            os.write(fd, entry.encoded)
        finally:
            os.close(fd)
        os.rename(temporary, sidecar)
        return created

    @contextmanager
    def naming(self, directory: bytes, entry: Entry) -> Iterator[None]:
        """Around creating an entry: its sidecar first, gone again if the creation fails."""
        created = self.add_name(directory, entry)
        try:
            yield
        except BaseException:
            if created:
                self.drop_name(directory, entry)
            raise

    def forget_name(self, entry: Entry) -> None:
        """Drop the entry's name from the name cache: it is gone, or never was there."""
        if self.names is not None and entry.encoded is not None and entry.dir_id is not None:
            self.names.forget(entry.dir_id, entry.name, entry.encoded)
            for binding in self.bindings.bound.values():
                if binding.names is not None:
                    binding.names.forget(entry.dir_id, entry.name, entry.encoded)

    def drop_name(self, directory: bytes, entry: Entry) -> None:
        """After an entry is gone: its sidecar, if it had one, and its cached name."""
        self.forget_name(entry)
        if entry.encoded is not None and entry.backing != entry.encoded:
            try:
                os.unlink(directory + b"/" + longname_sidecar(entry.backing))
            except FileNotFoundError:
                pass

    def decrypt_entry(
        self, directory: bytes, backing: bytes, cache_key: Hashable | None = None
    ) -> bytes:
        """The plaintext name of a backing entry; raises NameError_ if it is not ours."""
        assert self.names is not None
        dir_id = self.dir_id(directory, cache_key)
        names = self._names_of(directory, cache_key)
        if is_longname(backing):
            try:
                with open(directory + b"/" + longname_sidecar(backing), "rb") as sidecar:
                    encoded = sidecar.read(4096)
            except FileNotFoundError:
                raise NameError_("long name without its .name file") from None
            NameCipher.check_longname(backing, encoded)
            return names.decrypt_name(dir_id, encoded)
        if is_internal(backing):
            raise NameError_("internal file")
        return names.decrypt_name(dir_id, backing)

    def list_dir(
        self, directory: bytes, cache_key: Hashable | None = None
    ) -> tuple[list[Entry], list[Stray]]:
        """The plaintext entries of a backing directory, and the strays in it."""
        entries: list[Entry] = []
        strays: list[Stray] = []
        shown: list[str] = []  # the directory as messages show it, worked out once
        names = None if self.names is None else self._names_of(directory, cache_key)
        for backing in os.listdir(directory):
            if self.names is None:
                if not self.is_hidden(directory, backing):
                    entries.append(Entry(backing, backing, None))
                continue
            if is_internal(backing) and not is_longname(backing):
                if not self._known_internal(directory, backing):
                    strays.append(Stray(directory, backing, "unknown kmsfs file"))
                    self._warn(directory, backing, "unknown kmsfs file", cache_key, shown)
                continue
            try:
                name = self.decrypt_entry(directory, backing, cache_key)
            except NameError_ as error:
                strays.append(Stray(directory, backing, str(error)))
                self._warn(directory, backing, str(error), cache_key, shown)
                continue
            assert names is not None
            encoded = names.encrypt_name(self.dir_id(directory, cache_key), name)
            entries.append(Entry(name, backing, encoded))
        return entries, strays

    def _known_internal(self, directory: bytes, backing: bytes) -> bool:
        if backing == DIRIV_NAME or _is_sidecar(backing):
            return True
        return directory == self.root and backing == CONFIG_NAME_BYTES

    def _warn(
        self,
        directory: bytes,
        backing: bytes,
        problem: str,
        cache_key: Hashable | None = None,
        shown: list[str] | None = None,
    ) -> None:
        """Log a stray once (until MAX_WARNED others were). Known ones cost a set lookup:
        the directory's shown path (a readlink of the mount's /proc/self/fd paths) is
        worked out only to log, once per listing (``shown`` carries it)."""
        key = (directory if cache_key is None else cache_key, backing)
        if key in self._warned:
            return
        if len(self._warned) >= MAX_WARNED:
            self._warned.clear()
        self._warned.add(key)
        if shown is None:
            shown = []
        if not shown:
            shown.append(shown_path(directory))
        log.warning("%s/%s: left out of the listing: %s", shown[0], os.fsdecode(backing), problem)

    # --------------------------------------------------------------- symlinks
    def symlink_target(
        self, stored: bytes, directory: bytes | None = None, cache_key: Hashable | None = None
    ) -> bytes:
        """The target of a symlink stored in ``directory`` (its binding's name key; the
        filesystem's when no directory is given)."""
        if self.names is None:
            return stored
        names = self.names if directory is None else self._names_of(directory, cache_key)
        try:
            return names.decrypt_target(stored)
        except NameError_:
            raise OSError(errno.EIO, "symlink target failed authentication") from None

    def stored_target(
        self, target: bytes, directory: bytes | None = None, cache_key: Hashable | None = None
    ) -> bytes:
        if self.names is None:
            return target
        names = self.names if directory is None else self._names_of(directory, cache_key)
        return names.encrypt_target(target)

    def symlink_size(self, stored_size: int) -> int:
        return stored_size if self.names is None else NameCipher.target_length(stored_size)

    # ------------------------------------------------------------ plain paths
    def resolve(self, plain_path: str) -> bytes:
        """The backing path of a path relative to the mountpoint (offline tools)."""
        current = self.root
        for part in os.fsencode(plain_path).split(b"/"):
            if part in (b"", b"."):
                continue
            if part == b"..":
                raise OSError(errno.EINVAL, "'..' is not supported in a cipher path")
            current = current + b"/" + self.entry(current, part).backing
        return current


def shown_path(path: bytes) -> str:
    """A path for messages: the mount's short ``/proc/self/fd/N/...`` paths (see
    ``inodes.py``) shown as the backing path they stand for, while the descriptor is open."""
    if path.startswith(_PROC_FD):
        number, _, rest = path[len(_PROC_FD) :].partition(b"/")
        try:
            directory = os.readlink(_PROC_FD + number)
        except OSError:
            return os.fsdecode(path)
        return os.fsdecode(directory + b"/" + rest if rest else directory)
    return os.fsdecode(path)


def _is_sidecar(backing: bytes) -> bool:
    return is_internal(backing) and backing.endswith(b".name")
