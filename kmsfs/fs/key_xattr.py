"""Per-directory CMKs at the mountpoint (``bindings.py``): the mount's side.

- ``user.kmsfs.key``, a virtual extended attribute the mount answers itself (never
  stored): *get* on any path gives JSON saying which CMK protects it and where that comes
  from; *set* on an EMPTY directory (by its owner or root) binds it to the CMK the value
  names (an id, ARN or alias). A non-empty directory is refused with ENOTEMPTY: its
  entries' names would have to be re-encrypted, which the offline ``kmsfs key set
  --cipherdir`` does.
- The rename and link rules across a binding boundary (EXDEV for directories that are not
  bound themselves and for symlinks, whose names or targets are under the name key of
  the binding they live in; regular files keep the data key their header names).
- The CMK a new file's data key comes from.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import stat
from pathlib import Path
from typing import TYPE_CHECKING

import pyfuse3
import trio

from kmsfs.errors import KeydUnavailable, KMSError, KmsfsError
from kmsfs.format.header import read_header
from kmsfs.fs.bindings import (
    Binding,
    binding_from_key,
    failure_of,
    name_key_context,
    new_record,
    read_records,
    store_records,
)
from kmsfs.fs.config import write_new_config
from kmsfs.fs.inodes import ROOT, Node
from kmsfs.fs.keys import KEYD_TIMEOUT
from kmsfs.fs.names import DIRIV_NAME

if TYPE_CHECKING:
    from kmsfs.fs.ops import Operations

log = logging.getLogger("kmsfs.mount")

KEY_XATTR = b"user.kmsfs.key"


class MountKeyBindings:
    def __init__(self, operations: Operations, metadata_key: bytes) -> None:
        self._ops = operations
        self._metadata_key = metadata_key
        operations.tree.parent_of = self._parent_directory

    # ------------------------------------------------------------- resolution
    def _parent_directory(self, _directory: bytes, cache_key: object) -> tuple[bytes, int] | None:
        if cache_key is None or cache_key == ROOT:
            return None
        assert isinstance(cache_key, int)
        parent = self._ops.inodes.parent_of(cache_key)
        return self._ops.inodes.dir_path(parent), parent

    def of_directory(self, ino: int) -> Binding:
        return self._ops.tree.binding(self._ops.inodes.dir_path(ino), ino)

    # ------------------------------------------------------------ per caller
    def _forwarded_binding(self, directory_ino: int) -> Binding | None:
        """The binding of a directory whose names a forwarded caller must be let into,
        or None (forwarding off, or the directory under kmsfs.conf's own key)."""
        ops = self._ops
        if not ops.forward_callers or not ops.tree.bindings:
            return None
        binding = self.of_directory(directory_ino)
        return None if binding.dir_id is None else binding

    def uncached(self, directory_ino: int) -> bool:
        """Whether the kernel must ask the mount again for every use of an entry of this
        directory (entry and attribute timeouts 0). The kernel's dentry and attribute
        caches are shared by all users: an entry one user looked up would otherwise be
        resolved for another user without the mount being asked (issue 17)."""
        return self._forwarded_binding(directory_ino) is not None

    async def check_caller(self, directory_ino: int, ctx: pyfuse3.RequestContext) -> None:
        """Let the request's caller use the names of a bound directory only if keyd lets
        that caller Decrypt the binding's name key (forwarded, kms:ViaService
        kmsfs-mount; the answer kept per caller for --key-cache-seconds like a data
        key's): a user the CMK's policy leaves out sees the bound directory's entry in
        its parent but gets EACCES listing it, looking names up, creating, removing or
        renaming in it, whatever the mode bits say. The mount's own user and requests of
        a mount that does not forward are not checked (the mount unwrapped the key)."""
        binding = self._forwarded_binding(directory_ino)
        if binding is None:
            return
        caller = self._ops._caller(ctx)
        if caller is None:
            return
        if binding.wrapped is None or binding.dir_id is None:
            binding.name_cipher()  # a failed binding: raises its failure
            return
        await self._ops.keys.decrypt_blob(
            binding.wrapped,
            name_key_context(self._ops.config, binding.dir_id),
            caller,
            key_id=binding.key_arn,
        )

    def file_key_arn(self, node: Node) -> str | None:
        """The CMK for a new data key of ``node`` (None: kmsfs.conf's)."""
        if not self._ops.tree.bindings or not node.links:
            return None
        return self.new_file_key_arn(next(iter(node.links))[0])

    def new_file_key_arn(self, directory_ino: int) -> str | None:
        """The CMK for the data key of a file made in this directory (None: kmsfs.conf's)."""
        if not self._ops.tree.bindings:
            return None
        key_arn = self.of_directory(directory_ino).key_arn
        return None if key_arn == self._ops.config.key_arn else key_arn

    def _bound_here(self, path: bytes) -> bool:
        """Whether the directory at backing ``path`` has a binding of its own."""
        try:
            return self._ops.tree.dir_id(path) in self._ops.tree.bindings.bound
        except OSError:
            return False

    def _may_cross(self, path: bytes, st: os.stat_result) -> bool:
        if stat.S_ISDIR(st.st_mode):
            return self._bound_here(path)  # its own names stay under its own key
        return not stat.S_ISLNK(st.st_mode)  # a symlink's target is under the old key

    def check_rename(
        self,
        old_parent: int,
        new_parent: int,
        old_path: bytes,
        new_path: bytes,
        exchange: bool,
    ) -> None:
        """EXDEV for a rename that would carry names across a binding boundary."""
        if old_parent == new_parent or not self._ops.tree.bindings:
            return
        if self.of_directory(old_parent) is self.of_directory(new_parent):
            return
        if not self._may_cross(old_path, os.lstat(old_path)):
            raise OSError(errno.EXDEV, "rename across a key binding")
        if exchange and not self._may_cross(new_path, os.lstat(new_path)):
            raise OSError(errno.EXDEV, "rename across a key binding")

    def check_link(self, inode: int, new_parent: int) -> None:
        """EXDEV for a hard link of a symlink into another binding (its target would not
        decrypt there); regular files keep their data key, as on a rename."""
        if not self._ops.tree.bindings:
            return
        node = self._ops.inodes.get(inode)
        if not node.links:
            return
        old_parent = next(iter(node.links))[0]
        if self.of_directory(old_parent) is self.of_directory(new_parent):
            return
        if stat.S_ISLNK(os.lstat(self._ops.inodes.path(inode)).st_mode):
            raise OSError(errno.EXDEV, "link of a symlink across a key binding")

    # ----------------------------------------------------------------- get
    def _source(self, directory_ino: int, binding: Binding) -> str:
        """Where ``binding`` comes from: the bound directory's path at the mountpoint
        (relative to its root; "." for the root itself), or kmsfs.conf."""
        if binding.dir_id is None:
            return binding.source
        ops = self._ops
        ino = directory_ino
        for _ in range(1 << 16):
            if ops.tree.dir_id(ops.inodes.dir_path(ino), ino) == binding.dir_id:
                break
            if ino == ROOT:
                return binding.dir_id.hex()
            ino = ops.inodes.parent_of(ino)
        if ino == ROOT or ops.mountpoint is None:
            return "."
        path = ops._mount_path(ino)
        return os.fsdecode(os.path.relpath(path, ops.mountpoint))

    def _header_key_arn(self, node: Node) -> str | None:
        if node.open_file is not None and node.open_file.engine.header is not None:
            return node.open_file.engine.header.active_slot.key_arn
        fd = os.open(self._ops.inodes.path(node.ino), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            if os.fstat(fd).st_size == 0:
                return None
            return read_header(fd).active_slot.key_arn
        finally:
            os.close(fd)

    def describe(self, inode: int) -> bytes:
        ops = self._ops
        node = ops.inodes.get(inode)
        st = ops._stat_node(node)
        directory_ino = inode if stat.S_ISDIR(st.st_mode) else ops.inodes.parent_of(inode)
        binding = self.of_directory(directory_ino)
        key_arn = binding.key_arn
        if stat.S_ISREG(st.st_mode):
            key_arn = self._header_key_arn(node) or binding.key_arn
            # hard links in several bindings: the request names no path, so the one
            # that differs from the file's CMK is shown (the file is listed as stale)
            for parent in sorted({link_parent for link_parent, _name in node.links}):
                other = self.of_directory(parent)
                if other.key_arn != key_arn:
                    directory_ino, binding = parent, other
                    break
        document = {
            "key_arn": key_arn,
            "binding_key_arn": binding.key_arn,
            "source": self._source(directory_ino, binding),
        }
        if binding.failure is not None:
            document["error"] = os.strerror(binding.failure[0])
        return json.dumps(document, sort_keys=True).encode()

    # ------------------------------------------------------------- refresh
    async def refresh(self, cache_seconds: float) -> None:
        """Ask the key service for every binding's name key again every ``cache_seconds``
        (at least 1 s; runs until cancelled), as the data-key cache expires: a CMK
        disabled or a grant revoked fails its subtree (EACCES) within that time, one
        enabled again brings it back. While the key service is unreachable a binding
        keeps what it had."""
        interval = max(1.0, cache_seconds)
        while True:
            await trio.sleep(interval)
            if self._ops.tree.bindings:
                await self._refresh_once()

    async def _refresh_once(self) -> None:
        ops = self._ops
        records = read_records(ops.config)
        current = ops.tree.bindings.bound
        for dir_id, record in records.items():
            known = current.get(dir_id)
            if known is None or known.key_arn != record.key_arn:
                continue  # bound or removed meanwhile: bind() and rmdir keep it
            try:
                with trio.fail_after(KEYD_TIMEOUT):
                    name_key = (
                        await ops.keys._client.decrypt(
                            record.wrapped,
                            encryption_context=name_key_context(ops.config, dir_id),
                            key_id=record.key_arn,
                        )
                    )["Plaintext"]
            except (trio.TooSlowError, KeydUnavailable):
                continue
            except KMSError as error:
                failure = failure_of(error, record)
                if known.failure != failure:
                    log.warning("directory id %s: %s", dir_id.hex(), failure[1])
                    ops.tree.bindings.add(Binding(record.key_arn, None, dir_id, failure))
                continue
            if known.failure is not None:
                log.warning("directory id %s: its name key is usable again", dir_id.hex())
                ops.tree.bindings.add(binding_from_key(record, name_key))

    # ------------------------------------------------------------- removal
    def bound_id(self, path: bytes) -> bytes | None:
        """The directory id of the directory at ``path`` if it is bound (before rmdir)."""
        if not self._ops.tree.bindings:
            return None
        try:
            dir_id = self._ops.tree.dir_id(path)
        except OSError:
            return None
        return dir_id if dir_id in self._ops.tree.bindings.bound else None

    def unbind_removed(self, dir_id: bytes | None) -> None:
        """A bound directory was removed: its registry entry goes (else fsck would report
        a binding whose directory is missing). A failure to rewrite kmsfs.conf is logged:
        the directory is gone either way, and fsck reports the entry."""
        if dir_id is None:
            return
        config = self._ops.config
        records = read_records(config)
        if records.pop(dir_id, None) is None:
            return
        try:
            self._store(records)
        except (OSError, KmsfsError) as error:
            log.error("directory id %s removed, its key binding stays: %s", dir_id.hex(), error)
            return
        self._ops.tree.bindings.remove(dir_id)

    def _store(self, records: dict) -> None:
        """Seal ``records`` into kmsfs.conf and write it (atomically); on failure the
        config in memory is as before."""
        ops = self._ops
        config = ops.config
        before = dict(config.extra), config.mac, config.metadata_key_commitment
        store_records(config, records)
        config.seal(self._metadata_key)
        try:
            write_new_config(Path(os.fsdecode(ops.inodes.root_path)), config)
        except (OSError, KmsfsError):
            config.extra, config.mac, config.metadata_key_commitment = before
            raise

    # ----------------------------------------------------------------- set
    async def bind(self, inode: int, value: bytes, ctx: pyfuse3.RequestContext) -> None:
        ops = self._ops
        ops._check_writable_mount()
        config = ops.config
        node = ops.inodes.get(inode)
        st = ops._stat_node(node)
        if not stat.S_ISDIR(st.st_mode):
            raise OSError(errno.ENOTDIR, "only a directory can be bound to a key")
        if ctx.uid != 0 and ctx.uid != st.st_uid:
            raise OSError(errno.EPERM, "only the directory's owner or root binds it")
        if config.plaintext_names:
            raise OSError(errno.EOPNOTSUPP, "key bindings need encrypted names")
        try:
            key = value.decode("ascii").strip()
        except UnicodeDecodeError:
            raise OSError(errno.EINVAL, "not a key id") from None
        if not key:
            raise OSError(errno.EINVAL, "no key given")
        directory = ops.inodes.dir_path(inode)
        self._check_empty(directory)
        dir_id = ops.tree.dir_id(directory, inode)
        keys = ops.keys
        client = keys._client  # the mount's own key-service client
        # as the caller when forwarding (issue 17): the CMK's policy decides who may bind
        caller = ops._caller(ctx)
        on_behalf = {} if caller is None else {"on_behalf_of": caller}
        metadata = (await keys._call(client.describe_key, key, **on_behalf))["KeyMetadata"]
        if metadata.get("KeyState") != "Enabled":
            raise OSError(errno.EACCES, "the key is not enabled")
        key_arn = metadata["Arn"]
        response = await keys._call(
            client.generate_data_key,
            key_arn,
            encryption_context=name_key_context(config, dir_id),
            **on_behalf,
        )
        # after the awaits: nothing may have been created meanwhile
        directory = ops.inodes.dir_path(inode)
        self._check_empty(directory)
        if ops.tree.dir_id(directory, inode) != dir_id:
            raise OSError(errno.ESTALE, "the directory changed")
        record = new_record(dir_id, key_arn, response)
        records = read_records(config)
        records[dir_id] = record
        self._store(records)
        ops.tree.bindings.add(binding_from_key(record, response["Plaintext"]))
        log.info("directory id %s bound to %s", dir_id.hex(), key_arn)

    @staticmethod
    def _check_empty(directory: bytes) -> None:
        if any(name != DIRIV_NAME for name in os.listdir(directory)):
            raise OSError(
                errno.ENOTEMPTY,
                "only an empty directory is bound at the mountpoint "
                "(unmount and use kmsfs key set --cipherdir)",
            )
