"""A null FUSE filesystem for scripts/bench: a pyfuse3 + trio passthrough with no encryption.

It serves a backing directory as it is, with the same FUSE settings as the kmsfs mount
(writeback cache, entry and attribute timeouts of 1 s, default_permissions, pyfuse3's
default task pool and keep_cache), so that the difference between it and kmsfs in one run
of scripts/bench is what kmsfs does beyond being a Python FUSE filesystem: it shows the
ceiling that FUSE + pyfuse3 put on any filesystem written like kmsfs.

    python scripts/nullfs.py BACKING MOUNTPOINT     # serves until unmounted or SIGTERM

Inode numbers are the backing files' own; each known inode keeps the backing paths it was
reached by (several for hard links) and the kernel's lookup count. Extended attributes pass
through, so the kernel sends the same requests (security.capability on every write) as to
kmsfs. Not meant for anything but benchmarks and its test: no locking, no ACLs, no
per-caller permission checks beyond the kernel's default_permissions.
"""

from __future__ import annotations

import errno
import os
import signal
import stat
import sys
from pathlib import Path

import pyfuse3
import trio

#: the same as kmsfs.fs.ops's ENTRY_TIMEOUT and ATTR_TIMEOUT
ENTRY_TIMEOUT = 1.0
ATTR_TIMEOUT = 1.0


def _errno_of(error: OSError) -> pyfuse3.FUSEError:
    return pyfuse3.FUSEError(error.errno or errno.EIO)


class _Inode:
    __slots__ = ("paths", "lookups")

    def __init__(self, path: str) -> None:
        self.paths: set[str] = {path}
        self.lookups = 0

    def path(self) -> str:
        return next(iter(self.paths))


class NullOperations(pyfuse3.Operations):
    """Passthrough of every request the benchmark's workloads make to ``backing``."""

    enable_writeback_cache = True

    def __init__(self, backing: Path) -> None:
        super().__init__()
        self.backing = str(backing.resolve())
        root_ino = os.lstat(self.backing).st_ino
        self._root_ino = root_ino
        self._inodes: dict[int, _Inode] = {pyfuse3.ROOT_INODE: _Inode(self.backing)}
        self._inodes[pyfuse3.ROOT_INODE].lookups = 1
        #: open directories: handle -> the listing taken at the first readdir
        self._dirs: dict[int, list[tuple[bytes, os.stat_result]] | None] = {}
        self._dir_inodes: dict[int, int] = {}
        self._next_dir_handle = 1

    # --- inodes and paths ----------------------------------------------------------

    def _fuse_ino(self, backing_ino: int) -> int:
        return pyfuse3.ROOT_INODE if backing_ino == self._root_ino else backing_ino

    def _path(self, inode: int) -> str:
        known = self._inodes.get(inode)
        if known is None:
            raise pyfuse3.FUSEError(errno.ESTALE)
        return known.path()

    def _child(self, parent: int, name: bytes) -> str:
        return os.path.join(self._path(parent), os.fsdecode(name))

    def _remember(
        self, path: str, info: os.stat_result, lookups: int = 1
    ) -> pyfuse3.EntryAttributes:
        inode = self._fuse_ino(info.st_ino)
        known = self._inodes.get(inode)
        if known is None:
            known = self._inodes[inode] = _Inode(path)
        else:
            known.paths.add(path)
        known.lookups += lookups
        return self._attrs(info, inode)

    def _forget_path(self, inode: int, path: str) -> None:
        known = self._inodes.get(inode)
        if known is not None and len(known.paths) > 1:
            known.paths.discard(path)

    def _attrs(self, info: os.stat_result, inode: int | None = None) -> pyfuse3.EntryAttributes:
        attrs = pyfuse3.EntryAttributes()
        attrs.st_ino = self._fuse_ino(info.st_ino) if inode is None else inode
        attrs.generation = 0
        attrs.entry_timeout = ENTRY_TIMEOUT
        attrs.attr_timeout = ATTR_TIMEOUT
        attrs.st_mode = info.st_mode
        attrs.st_nlink = info.st_nlink
        attrs.st_uid = info.st_uid
        attrs.st_gid = info.st_gid
        attrs.st_rdev = info.st_rdev
        attrs.st_size = info.st_size
        attrs.st_blksize = info.st_blksize
        attrs.st_blocks = info.st_blocks
        attrs.st_atime_ns = info.st_atime_ns
        attrs.st_mtime_ns = info.st_mtime_ns
        attrs.st_ctime_ns = info.st_ctime_ns
        return attrs

    def _lstat(self, path: str) -> os.stat_result:
        try:
            return os.lstat(path)
        except OSError as error:
            raise _errno_of(error) from None

    def _owned_by_caller(self, path: str, ctx: pyfuse3.RequestContext) -> None:
        if ctx.uid != os.geteuid() or ctx.gid != os.getegid():
            os.lchown(path, ctx.uid, ctx.gid)

    # --- names -----------------------------------------------------------------------

    async def lookup(self, parent_inode, name, ctx=None):
        if name == b".":
            return self._remember(self._path(parent_inode), self._lstat(self._path(parent_inode)))
        if name == b"..":
            path = os.path.dirname(self._path(parent_inode))
            return self._remember(path, self._lstat(path))
        path = self._child(parent_inode, name)
        return self._remember(path, self._lstat(path))

    async def forget(self, inode_list):
        for inode, count in inode_list:
            known = self._inodes.get(inode)
            if known is None or inode == pyfuse3.ROOT_INODE:
                continue
            known.lookups -= count
            if known.lookups <= 0:
                del self._inodes[inode]

    async def getattr(self, inode, ctx=None):
        return self._attrs(self._lstat(self._path(inode)), inode)

    async def setattr(self, inode, attr, fields, fh, ctx):
        path = self._path(inode)
        try:
            if fields.update_size:
                if fh is not None:
                    os.ftruncate(fh, attr.st_size)
                else:
                    os.truncate(path, attr.st_size)
            if fields.update_mode:
                os.chmod(path, stat.S_IMODE(attr.st_mode))
            if fields.update_uid or fields.update_gid:
                uid = attr.st_uid if fields.update_uid else -1
                gid = attr.st_gid if fields.update_gid else -1
                os.lchown(path, uid, gid)
            if fields.update_atime or fields.update_mtime:
                current = os.lstat(path)
                atime = attr.st_atime_ns if fields.update_atime else current.st_atime_ns
                mtime = attr.st_mtime_ns if fields.update_mtime else current.st_mtime_ns
                os.utime(path, ns=(atime, mtime), follow_symlinks=False)
        except OSError as error:
            raise _errno_of(error) from None
        return self._attrs(self._lstat(path), inode)

    async def readlink(self, inode, ctx):
        try:
            return os.fsencode(os.readlink(self._path(inode)))
        except OSError as error:
            raise _errno_of(error) from None

    async def mknod(self, parent_inode, name, mode, rdev, ctx):
        path = self._child(parent_inode, name)
        try:
            os.mknod(path, mode, rdev)
            self._owned_by_caller(path, ctx)
        except OSError as error:
            raise _errno_of(error) from None
        return self._remember(path, self._lstat(path))

    async def mkdir(self, parent_inode, name, mode, ctx):
        path = self._child(parent_inode, name)
        try:
            os.mkdir(path, mode)
            self._owned_by_caller(path, ctx)
        except OSError as error:
            raise _errno_of(error) from None
        return self._remember(path, self._lstat(path))

    async def symlink(self, parent_inode, name, target, ctx):
        path = self._child(parent_inode, name)
        try:
            os.symlink(os.fsdecode(target), path)
            self._owned_by_caller(path, ctx)
        except OSError as error:
            raise _errno_of(error) from None
        return self._remember(path, self._lstat(path))

    async def link(self, inode, new_parent_inode, new_name, ctx):
        path = self._child(new_parent_inode, new_name)
        try:
            os.link(self._path(inode), path)
        except OSError as error:
            raise _errno_of(error) from None
        return self._remember(path, self._lstat(path))

    async def unlink(self, parent_inode, name, ctx):
        path = self._child(parent_inode, name)
        info = self._lstat(path)
        try:
            os.unlink(path)
        except OSError as error:
            raise _errno_of(error) from None
        self._forget_path(self._fuse_ino(info.st_ino), path)

    async def rmdir(self, parent_inode, name, ctx):
        path = self._child(parent_inode, name)
        info = self._lstat(path)
        try:
            os.rmdir(path)
        except OSError as error:
            raise _errno_of(error) from None
        self._forget_path(self._fuse_ino(info.st_ino), path)

    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        if flags:  # RENAME_NOREPLACE / RENAME_EXCHANGE: not needed by the workloads
            raise pyfuse3.FUSEError(errno.EINVAL)
        old = self._child(parent_inode_old, name_old)
        new = self._child(parent_inode_new, name_new)
        info = self._lstat(old)
        try:
            replaced: os.stat_result | None = os.lstat(new)
        except OSError:
            replaced = None
        try:
            os.rename(old, new)
        except OSError as error:
            raise _errno_of(error) from None
        if replaced is not None and replaced.st_ino != info.st_ino:
            self._forget_path(self._fuse_ino(replaced.st_ino), new)
        moved = self._inodes.get(self._fuse_ino(info.st_ino))
        if moved is not None:
            moved.paths.discard(old)
            moved.paths.add(new)
        if stat.S_ISDIR(info.st_mode):  # every known path below it moved too
            prefix = old + os.sep
            for known in self._inodes.values():
                if any(p.startswith(prefix) for p in known.paths):
                    known.paths = {
                        new + os.sep + p[len(prefix) :] if p.startswith(prefix) else p
                        for p in known.paths
                    }

    # --- files -----------------------------------------------------------------------

    @staticmethod
    def _backing_flags(flags: int) -> int:
        # With the writeback cache the kernel reads pages of files opened O_WRONLY and
        # sends writes with their own offsets (as kmsfs.fs.ops does: O_RDWR, no O_APPEND).
        flags &= ~(os.O_APPEND | os.O_CREAT | os.O_EXCL | os.O_NOCTTY)
        if flags & os.O_ACCMODE == os.O_WRONLY:
            flags = (flags & ~os.O_ACCMODE) | os.O_RDWR
        return flags

    async def open(self, inode, flags, ctx):
        try:
            fd = os.open(self._path(inode), self._backing_flags(flags))
        except OSError as error:
            raise _errno_of(error) from None
        return pyfuse3.FileInfo(fh=fd)

    async def create(self, parent_inode, name, mode, flags, ctx):
        path = self._child(parent_inode, name)
        try:
            fd = os.open(path, self._backing_flags(flags) | os.O_CREAT | os.O_TRUNC, mode)
            self._owned_by_caller(path, ctx)
            info = os.fstat(fd)
        except OSError as error:
            raise _errno_of(error) from None
        return pyfuse3.FileInfo(fh=fd), self._remember(path, info)

    async def read(self, fh, off, size):
        try:
            return os.pread(fh, size, off)
        except OSError as error:
            raise _errno_of(error) from None

    async def write(self, fh, off, buf):
        try:
            return os.pwrite(fh, buf, off)
        except OSError as error:
            raise _errno_of(error) from None

    async def flush(self, fh):
        return None

    async def release(self, fh):
        os.close(fh)

    async def fsync(self, fh, datasync):
        try:
            if datasync:
                os.fdatasync(fh)
            else:
                os.fsync(fh)
        except OSError as error:
            raise _errno_of(error) from None

    # --- directories -----------------------------------------------------------------

    async def opendir(self, inode, ctx):
        self._path(inode)
        handle = self._next_dir_handle
        self._next_dir_handle += 1
        self._dirs[handle] = None
        self._dir_inodes[handle] = inode
        return handle

    def _listing(self, handle: int) -> list[tuple[bytes, os.stat_result]]:
        listing = self._dirs.get(handle)
        if listing is None:
            path = self._path(self._dir_inodes[handle])
            listing = []
            try:
                with os.scandir(path) as entries:
                    for entry in entries:
                        try:
                            listing.append(
                                (os.fsencode(entry.name), entry.stat(follow_symlinks=False))
                            )
                        except FileNotFoundError:
                            continue
            except OSError as error:
                raise _errno_of(error) from None
            self._dirs[handle] = listing
        return listing

    async def readdir(self, fh, start_id, token):
        # next_id is the position in the listing taken at the first readdir of this
        # handle: stable while the directory changes underneath (rm -rf of a tree).
        listing = self._listing(fh)
        parent = self._path(self._dir_inodes[fh])
        for position in range(start_id, len(listing)):
            name, info = listing[position]
            attrs = self._attrs(info)
            if not pyfuse3.readdir_reply(token, name, attrs, position + 1):
                break
            self._remember(os.path.join(parent, os.fsdecode(name)), info)

    async def releasedir(self, fh):
        self._dirs.pop(fh, None)
        self._dir_inodes.pop(fh, None)

    async def fsyncdir(self, fh, datasync):
        return None

    async def statfs(self, ctx):
        info = os.statvfs(self.backing)
        data = pyfuse3.StatvfsData()
        for name in (
            "f_bsize",
            "f_frsize",
            "f_blocks",
            "f_bfree",
            "f_bavail",
            "f_files",
            "f_ffree",
            "f_favail",
            "f_namemax",
        ):
            setattr(data, name, getattr(info, name))
        return data

    # --- extended attributes ---------------------------------------------------------

    async def getxattr(self, inode, name, ctx):
        try:
            return os.getxattr(self._path(inode), os.fsdecode(name), follow_symlinks=False)
        except OSError as error:
            raise _errno_of(error) from None

    async def setxattr(self, inode, name, value, ctx):
        try:
            os.setxattr(self._path(inode), os.fsdecode(name), value, follow_symlinks=False)
        except OSError as error:
            raise _errno_of(error) from None

    async def listxattr(self, inode, ctx):
        try:
            names = os.listxattr(self._path(inode), follow_symlinks=False)
        except OSError as error:
            raise _errno_of(error) from None
        return [os.fsencode(name) for name in names]

    async def removexattr(self, inode, name, ctx):
        try:
            os.removexattr(self._path(inode), os.fsdecode(name), follow_symlinks=False)
        except OSError as error:
            raise _errno_of(error) from None


async def _serve(operations: NullOperations, mountpoint: Path) -> None:
    options = {"fsname=nullfs", "subtype=nullfs", "default_permissions"}
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as stops:
        pyfuse3.init(operations, str(mountpoint), options)
        unmount = True
        try:
            async with trio.open_nursery() as nursery:

                async def stop_on_signal() -> None:
                    async for _ in stops:
                        pyfuse3.terminate()
                        return

                nursery.start_soon(stop_on_signal)
                await pyfuse3.main()
                nursery.cancel_scope.cancel()
            # main returns when the kernel ended the session (fusermount3 -u) or after
            # pyfuse3.terminate() (a signal): only the latter still has to unmount
            unmount = os.path.ismount(mountpoint)
        finally:
            pyfuse3.close(unmount=unmount)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: nullfs.py BACKING MOUNTPOINT", file=sys.stderr)
        return 2
    backing, mountpoint = Path(args[0]), Path(args[1])
    if not backing.is_dir() or not mountpoint.is_dir():
        print(f"nullfs: {backing} and {mountpoint} must be directories", file=sys.stderr)
        return 2
    trio.run(_serve, NullOperations(backing), mountpoint)
    return 0


if __name__ == "__main__":
    sys.exit(main())
