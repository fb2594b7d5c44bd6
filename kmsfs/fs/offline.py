"""Reading a cipher directory without mounting it: for operators restoring from backup.

``kmsfs ls`` shows plaintext names beside backing names, ``kmsfs decrypt --cipherdir``
finds a file by its plaintext path, ``kmsfs fsck`` walks the whole tree and lists what
does not belong (names that do not decrypt, stray or orphaned files, damaged directory
ids, and with ``--verify`` every chunk of every file).
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from kmsfs.errors import FormatError, KMSError, KmsfsError, UsageError
from kmsfs.format.header import read_header
from kmsfs.fs.bindings import unlock_records
from kmsfs.fs.config import (
    CONFIG_NAME,
    FsConfig,
    load_config,
    unwrap_refused,
    write_new_config,
)
from kmsfs.fs.keyservice import KeyServiceOptions
from kmsfs.fs.keyservice import resolve as resolve_key_service
from kmsfs.fs.names import (
    LONGNAME_SUFFIX,
    NameCipher,
    is_internal,
    is_longname,
)
from kmsfs.fs.tree import CipherTree, Entry
from kmsfs.kms.client import KMSOperations

# KMSClient or AwsKMSClient (kmsfs.fs.keyservice): the blocking clients' shared methods
KeyServiceClient = KMSOperations


def _options(
    keyd_socket: str | None, keyd_uid: str | None, service_options: KeyServiceOptions | None
) -> KeyServiceOptions:
    return service_options or KeyServiceOptions(keyd_socket=keyd_socket, keyd_uid=keyd_uid)


def unlock_config(client: KeyServiceClient, config: FsConfig, where: str = "keyd") -> bytes:
    """Unwrap the metadata key with the config's CMK, authenticate the config; the key.

    Nothing else of ``config`` may be used before this returns. *where* names the key
    service in errors (see :func:`unwrap_refused`).
    """
    metadata_key = _unwrap_metadata_key(client, config, where)
    config.verify(metadata_key)
    return metadata_key


def _unwrap_metadata_key(client: KeyServiceClient, config: FsConfig, where: str) -> bytes:
    """The metadata key, unwrapped by keyd with the CMK kmsfs.conf names (not verified)."""
    try:
        return client.decrypt(
            config.metadata_key_wrapped,
            encryption_context=config.metadata_key_context,
            key_id=config.key_arn,
        )["Plaintext"]
    except KMSError as error:
        raise unwrap_refused(config, error, where) from None


def open_tree(
    cipherdir: Path,
    keyd_socket: str | None = None,
    *,
    keyd_uid: str | None = None,
    service_options: KeyServiceOptions | None = None,
) -> tuple[FsConfig, CipherTree]:
    """The cipher directory's authenticated config and its tree (names decrypted unless the
    config says they are plaintext), through the key service kmsfs.conf names (keyd: the
    socket :func:`keyd_endpoint` chooses; see :mod:`kmsfs.fs.keyservice`)."""
    config = load_config(cipherdir)
    root = os.fsencode(Path(cipherdir).resolve())
    service = resolve_key_service(config, _options(keyd_socket, keyd_uid, service_options))
    with service.client() as client:
        metadata_key = unlock_config(client, config, service.describe(client))
        bound = unlock_records(client, config)
    names = None if config.plaintext_names else NameCipher(metadata_key)
    return config, CipherTree(root, names, key_arn=config.key_arn, bindings=bound)


def describe_settings(config: FsConfig) -> list[tuple[str, str]]:
    """The settings a seal vouches for, as (name, value) lines for a person to check."""
    names = (
        "PLAINTEXT (names and symlink targets are stored unencrypted)"
        if config.plaintext_names
        else "encrypted"
    )
    return [
        ("FilesystemId", config.filesystem_id),
        ("KeyArn", config.key_arn),
        ("ChunkSize", str(config.chunk_size)),
        ("Names", names),
        ("KeydSocketHint", config.keyd_socket or "-"),
        *(
            [("KeyService", json.dumps(config.key_service.document()))]
            if config.key_service is not None
            else []
        ),
        ("Created", config.created or "-"),
        *((name, json.dumps(value)) for name, value in sorted(config.extra.items())),
    ]


@dataclass
class BackingCounts:
    files: int = 0
    directories: int = 0
    symlinks: int = 0
    backing_bytes: int = 0


def count_backing(cipherdir: Path) -> BackingCounts:
    """What a cipher directory holds, from the backing tree alone (no key needed):
    kmsfs's own entries (kmsfs.conf, directory ids, long-name sidecars) not counted."""
    counts = BackingCounts()
    for directory, subdirs, files in os.walk(os.fsencode(cipherdir)):
        subdirs[:] = [name for name in subdirs if _counted(name)]
        counts.directories += len(subdirs)
        for name in files:
            if not _counted(name):
                continue
            try:
                info = os.lstat(os.path.join(directory, name))
            except OSError:
                continue  # removed while counting
            if stat.S_ISLNK(info.st_mode):
                counts.symlinks += 1
            else:
                counts.files += 1
                counts.backing_bytes += info.st_size
        for name in subdirs:  # os.walk lists a symlink to a directory among the dirs
            if os.path.islink(os.path.join(directory, name)):
                counts.directories -= 1
                counts.symlinks += 1
    return counts


def _counted(backing_name: bytes) -> bool:
    """A user's entry: not kmsfs's own, except a long name's stand-in (kmsfs.longname.*)."""
    return not is_internal(backing_name) or is_longname(backing_name)


def seal_cipherdir(
    cipherdir: Path,
    keyd_socket: str | None = None,
    *,
    keyd_uid: str | None = None,
    confirm: Callable[[FsConfig], bool],
    service_options: KeyServiceOptions | None = None,
) -> tuple[FsConfig, bool]:
    """Seal an unsealed (version 1) kmsfs.conf after ``confirm(config)`` says yes.

    Returns the config and whether it was sealed now (False: it already was, and is
    authentic). The metadata key is unwrapped with the config's CMK first, so a config
    whose wrapped key or key ARN was changed is refused here too.
    """
    config = load_config(cipherdir, allow_unsealed=True)
    service = resolve_key_service(config, _options(keyd_socket, keyd_uid, service_options))
    with service.client() as client:
        if config.sealed:
            unlock_config(client, config, service.describe(client))
            return config, False
        metadata_key = _unwrap_metadata_key(client, config, service.describe(client))
    if not confirm(config):
        raise UsageError(f"{cipherdir}: kmsfs.conf left unsealed")
    config.seal(metadata_key)
    write_new_config(Path(cipherdir), config)
    return config, True


@dataclass(frozen=True)
class Listed:
    path: str  # plaintext, relative to the mountpoint
    backing: str  # backing path, relative to the cipher directory
    kind: str  # file, dir, symlink, fifo, socket, other


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISREG, "file"),
        (stat.S_ISDIR, "dir"),
        (stat.S_ISLNK, "symlink"),
        (stat.S_ISFIFO, "fifo"),
        (stat.S_ISSOCK, "socket"),
    ):
        if test(mode):
            return name
    return "other"


def list_entries(
    tree: CipherTree, plain_dir: str = "", *, recursive: bool = False
) -> Iterator[Listed]:
    """Entries of a directory given by its plaintext path (relative to the mountpoint)."""
    directory = tree.resolve(plain_dir)
    entries, _strays = tree.list_dir(directory)
    for entry in sorted(entries, key=lambda e: e.name):
        backing = directory + b"/" + entry.backing
        mode = os.lstat(backing).st_mode
        plain = (
            os.path.join(plain_dir, os.fsdecode(entry.name))
            if plain_dir
            else os.fsdecode(entry.name)
        )
        yield Listed(plain, os.fsdecode(os.path.relpath(backing, tree.root)), _kind(mode))
        if recursive and stat.S_ISDIR(mode):
            yield from list_entries(tree, plain, recursive=True)


@dataclass(frozen=True)
class Problem:
    backing: str  # relative to the cipher directory
    plain: str | None  # the plaintext path when known
    problem: str


def fsck(tree: CipherTree, *, verify_file=None) -> Iterator[Problem]:
    """Walk the tree; yield every problem. ``verify_file(backing_path)`` checks content.

    With per-directory CMKs (``bindings.py``) also: bindings whose name key is refused or
    fails its commitment, bindings whose directory is gone, and files whose header names
    another CMK than their directory's binding (renamed in, or older than the binding:
    ``kmsfs rewrap`` moves them).
    """
    bound = tree.bindings.bound
    for dir_id, binding in sorted(bound.items()):
        if binding.failure is not None:
            yield Problem(CONFIG_NAME, None, f"key binding {dir_id.hex()}: {binding.failure[1]}")
    seen: set[bytes] = set()
    yield from _fsck_dir(tree, tree.root, "", verify_file, seen)
    for dir_id in sorted(set(bound) - seen):
        yield Problem(
            CONFIG_NAME,
            None,
            f"key binding {dir_id.hex()} ({bound[dir_id].key_arn}): its directory is missing",
        )


def _fsck_dir(
    tree: CipherTree, directory: bytes, plain_dir: str, verify_file, seen: set[bytes]
) -> Iterator[Problem]:
    def relative(path: bytes) -> str:
        return os.fsdecode(os.path.relpath(path, tree.root))

    try:
        if tree.bindings:
            seen.add(tree.dir_id(directory))
        entries, strays = tree.list_dir(directory)
    except (OSError, KmsfsError) as error:
        yield Problem(relative(directory), plain_dir or "/", f"cannot list: {error}")
        return
    for stray in strays:
        yield Problem(relative(directory + b"/" + stray.backing), None, stray.problem)
    if tree.encrypted:
        present = set(os.listdir(directory))
        for name in present:
            if is_internal(name) and name.endswith(LONGNAME_SUFFIX):
                owner = name[: -len(LONGNAME_SUFFIX)]
                if not is_longname(owner) or owner not in present:
                    yield Problem(relative(directory + b"/" + name), None, "orphaned long name")
    for entry in entries:
        yield from _fsck_entry(tree, directory, plain_dir, entry, verify_file, seen)


def _fsck_entry(
    tree: CipherTree,
    directory: bytes,
    plain_dir: str,
    entry: Entry,
    verify_file,
    seen: set[bytes],
) -> Iterator[Problem]:
    backing = directory + b"/" + entry.backing
    plain = f"{plain_dir}/{os.fsdecode(entry.name)}"
    relative = os.fsdecode(os.path.relpath(backing, tree.root))
    mode = os.lstat(backing).st_mode
    try:
        if stat.S_ISDIR(mode):
            yield from _fsck_dir(tree, backing, plain, verify_file, seen)
        elif stat.S_ISLNK(mode):
            tree.symlink_target(os.readlink(backing), directory)
        elif stat.S_ISREG(mode):
            if tree.bindings:
                problem = _binding_mismatch(tree, directory, backing)
                if problem:
                    yield Problem(relative, plain, problem)
            if verify_file is not None:
                problem = verify_file(backing)
                if problem:
                    yield Problem(relative, plain, problem)
    except (OSError, FormatError) as error:
        yield Problem(relative, plain, str(error))


def _binding_mismatch(tree: CipherTree, directory: bytes, backing: bytes) -> str | None:
    """A file whose header names another CMK than its directory's binding."""
    with open(backing, "rb") as file:
        if os.fstat(file.fileno()).st_size == 0:
            return None
        key_arn = read_header(file.fileno()).active_slot.key_arn
    want = tree.binding(directory).key_arn
    if key_arn == want:
        return None
    return (
        f"under {key_arn}, not its directory's binding {want} "
        "(renamed in, or older than the binding: kmsfs rewrap moves it)"
    )
