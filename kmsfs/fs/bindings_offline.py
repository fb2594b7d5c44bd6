"""``kmsfs key set|show --cipherdir``: per-directory CMKs on an unmounted cipher directory.

Binding a directory writes its entry in kmsfs.conf's sealed ``key_bindings``
(``bindings.py``). An empty directory is bound in one step. A non-empty one is
*migrated*: the names of its subtree (down to nested bindings, which keep their own
keys), its long names' sidecars and its symlinks' targets are re-encrypted under the new
name key, entry by entry, each by an atomic rename (see :func:`_migrate_directory`). The
registry entry records ``"migrating": {"from": <dir id hex of the previous binding, or
null for kmsfs.conf's>}`` until the walk is done; an entry that decrypts under the new
key is already done, so a run killed in the middle is finished by the next one. While an
entry is migrating, the mount and the other offline tools refuse the cipher directory
(they say to run ``kmsfs key set`` again), and no other binding may be made.
"""

from __future__ import annotations

import dataclasses
import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from kmsfs.errors import InUse, KMSError, UsageError
from kmsfs.format.header import read_header
from kmsfs.fs.bindings import (
    Binding,
    BindingRecord,
    binding_from_key,
    name_key_context,
    new_record,
    read_records,
    store_records,
    unlock_records,
)
from kmsfs.fs.config import FsConfig, load_config, write_new_config
from kmsfs.fs.keyservice import KeyServiceOptions
from kmsfs.fs.keyservice import resolve as resolve_key_service
from kmsfs.fs.names import (
    DIRIV_NAME,
    NameCipher,
    NameError_,
    is_internal,
    is_longname,
    longname_sidecar,
)
from kmsfs.fs.tree import CipherTree


@dataclass
class KeyShown:
    """What ``kmsfs key show`` says about a path."""

    path: str
    key_arn: str  # the CMK protecting it (a file: the one its header names)
    binding_key_arn: str  # its directory's binding
    source: str  # the bound directory (relative to the root, "." the root) or kmsfs.conf
    error: str | None = None  # the binding's name key could not be had
    #: files below the path whose header names another CMK than their directory's binding
    stale: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class _Opened:
    config: FsConfig
    tree: CipherTree
    metadata_key: bytes


def _open(cipherdir: Path, client, *, allow_migrating: bool = False) -> _Opened:
    from kmsfs.fs.offline import unlock_config

    config = load_config(cipherdir)
    metadata_key = unlock_config(client, config)
    root = os.fsencode(cipherdir.resolve())
    names = None if config.plaintext_names else NameCipher(metadata_key)
    bound = unlock_records(client, config, allow_migrating=allow_migrating)
    tree = CipherTree(root, names, key_arn=config.key_arn, bindings=bound)
    return _Opened(config, tree, metadata_key)


def _plain_parts(plain_path: str) -> list[bytes]:
    parts = [p for p in os.fsencode(plain_path).split(b"/") if p not in (b"", b".")]
    if b".." in parts:
        raise UsageError("'..' is not supported in a cipher path")
    return parts


# ------------------------------------------------------------------ show
def show_offline(
    cipherdir: Path, plain_path: str, *, options: KeyServiceOptions, files: bool = True
) -> KeyShown:
    config = load_config(cipherdir)
    service = resolve_key_service(config, options)
    with service.client() as client:
        opened = _open(cipherdir, client)
    tree = opened.tree
    parts = _plain_parts(plain_path)
    # the directories from the root down to the path (or to its parent, for a file)
    chain: list[tuple[bytes, str]] = [(tree.root, ".")]
    current = tree.root
    for index, part in enumerate(parts):
        current = current + b"/" + tree.entry(current, part).backing
        if index < len(parts) - 1 or stat.S_ISDIR(os.lstat(current).st_mode):
            chain.append((current, os.fsdecode(b"/".join(parts[: index + 1]))))
    target = current
    directory = chain[-1][0]
    binding = tree.binding(directory)
    source = binding.source
    if binding.dir_id is not None:
        for path, plain in reversed(chain):
            if tree.dir_id(path) == binding.dir_id:
                source = plain
                break
    mode = os.lstat(target).st_mode
    key_arn = binding.key_arn
    if stat.S_ISREG(mode):
        key_arn = _header_key_arn(target) or key_arn
    shown = KeyShown(
        plain_path or ".",
        key_arn,
        binding.key_arn,
        source,
        None if binding.failure is None else binding.failure[1],
    )
    if files:
        if stat.S_ISDIR(mode):
            shown.stale = list(stale_files(tree, target, "/".join(map(os.fsdecode, parts))))
        elif stat.S_ISREG(mode) and key_arn != binding.key_arn:
            shown.stale = [(shown.path, key_arn)]
    return shown


def _header_key_arn(backing: bytes) -> str | None:
    fd = os.open(backing, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        if os.fstat(fd).st_size == 0:
            return None
        return read_header(fd).active_slot.key_arn
    finally:
        os.close(fd)


def stale_files(tree: CipherTree, directory: bytes, plain_dir: str) -> Iterator[tuple[str, str]]:
    """(plain path, header CMK) of every file below ``directory`` whose header names
    another CMK than its directory's binding (renamed in, or made before the binding)."""
    try:
        entries, _strays = tree.list_dir(directory)
    except OSError:
        return  # the subtree's name key is refused: nothing to say about it here
    want = tree.binding(directory).key_arn
    for entry in sorted(entries, key=lambda e: e.name):
        backing = directory + b"/" + entry.backing
        plain = f"{plain_dir}/{os.fsdecode(entry.name)}" if plain_dir else os.fsdecode(entry.name)
        mode = os.lstat(backing).st_mode
        if stat.S_ISDIR(mode):
            yield from stale_files(tree, backing, plain)
        elif stat.S_ISREG(mode):
            try:
                key_arn = _header_key_arn(backing)
            except (OSError, ValueError, KMSError):
                continue
            except Exception:  # a damaged header is fsck's to report
                continue
            if key_arn is not None and key_arn != want:
                yield plain, key_arn


# ------------------------------------------------------------------- set
def bind_offline(
    cipherdir: Path,
    plain_path: str,
    key: str,
    *,
    options: KeyServiceOptions,
    after_entry: Callable[[], None] | None = None,
) -> BindingRecord:
    """Bind the directory at ``plain_path`` to ``key`` (unmounted; see the module doc).

    ``after_entry`` is called after each entry migrated (tests kill the process there).
    """
    from kmsfs.fs.mount import lock_cipherdir

    cipherdir = Path(cipherdir)
    config = load_config(cipherdir)
    if config.plaintext_names:
        raise UsageError(f"{cipherdir}: key bindings need encrypted names")
    try:
        lock = lock_cipherdir(cipherdir)
    except InUse as error:
        raise InUse(
            f"{error}; kmsfs key set --cipherdir works only on an unmounted cipher directory "
            "(at the mountpoint: kmsfs key set MOUNTPOINT/DIR KEY, for an empty directory)"
        ) from None
    try:
        service = resolve_key_service(config, options)
        with service.client() as client:
            opened = _open(cipherdir, client, allow_migrating=True)
            config, tree = opened.config, opened.tree
            directory = tree.resolve(plain_path)
            if not stat.S_ISDIR(os.lstat(directory).st_mode):
                raise UsageError(f"{plain_path}: not a directory")
            dir_id = tree.dir_id(directory)
            metadata = client.describe_key(key)["KeyMetadata"]
            key_arn = metadata["Arn"]
            records = read_records(config)
            unfinished = {d: r for d, r in records.items() if r.migrating}
            if dir_id in unfinished:  # a run killed in the middle: finish it
                record = unfinished[dir_id]
                if record.key_arn != key_arn:
                    raise UsageError(
                        f"{plain_path} is half way to {record.key_arn}: run kmsfs key set "
                        "with that key first to finish it"
                    )
                new = tree.bindings.bound[dir_id]
                old = (
                    tree.bindings.default
                    if record.migrating_from is None
                    else tree.bindings.bound[record.migrating_from]
                )
            else:
                if unfinished:
                    raise UsageError(
                        "another directory's binding is unfinished: run its kmsfs key set "
                        "again first"
                    )
                if metadata.get("KeyState") != "Enabled":
                    raise UsageError(f"key {key_arn} is {metadata.get('KeyState')}")
                empty = not any(name != DIRIV_NAME for name in os.listdir(directory))
                old = tree.binding(directory)
                if not empty and old.dir_id == dir_id:
                    raise UsageError(
                        f"{plain_path} is bound already and not empty: rebinding it is not "
                        "supported (bind an empty directory and move the files there)"
                    )
                old.name_cipher()  # its names must be readable to be moved
                response = client.generate_data_key(
                    key_arn, encryption_context=name_key_context(config, dir_id)
                )
                record = new_record(
                    dir_id, key_arn, response, migrating=not empty, migrating_from=old.dir_id
                )
                new = binding_from_key(record, response["Plaintext"])
                records[dir_id] = record
                _write(cipherdir, config, opened.metadata_key, records)  # migrating first
        if record.migrating:
            _migrate_tree(tree, directory, old, new, after_entry)
            record = dataclasses.replace(record, migrating=False, migrating_from=None)
            records[dir_id] = record
            _write(cipherdir, config, opened.metadata_key, records)
        return record
    finally:
        if lock is not None:
            os.close(lock)


def _write(
    cipherdir: Path, config: FsConfig, metadata_key: bytes, records: dict[bytes, BindingRecord]
) -> None:
    store_records(config, records)
    config.seal(metadata_key)
    write_new_config(cipherdir, config)


def _migrate_tree(
    tree: CipherTree,
    top: bytes,
    old: Binding,
    new: Binding,
    after_entry: Callable[[], None] | None,
) -> None:
    """Re-encrypt the names below ``top`` from ``old``'s name key to ``new``'s."""
    old_names = old.name_cipher()
    new_names = new.name_cipher()
    assert old_names is not None and new_names is not None
    pending = [top]
    while pending:
        directory = pending.pop()
        for child, is_dir in _migrate_directory(tree, directory, old_names, new_names, after_entry):
            if is_dir and tree.dir_id(child) not in tree.bindings.bound:
                pending.append(child)  # a nested binding keeps its own key below it


def _migrate_directory(
    tree: CipherTree,
    directory: bytes,
    old_names: NameCipher,
    new_names: NameCipher,
    after_entry: Callable[[], None] | None,
) -> Iterator[tuple[bytes, bool]]:
    """Each entry of ``directory`` under the new name key: its name, then (a symlink)
    its target. Each step is an atomic rename, and an entry already under the new key
    is left alone, so a second run finishes what a killed one started."""
    dir_id = tree.dir_id(directory)
    for backing in sorted(os.listdir(directory)):
        if is_internal(backing) and not is_longname(backing):
            continue  # kmsfs.diriv, sidecars (moved with their entries)
        encoded = backing
        if is_longname(backing):
            try:
                with open(directory + b"/" + longname_sidecar(backing), "rb") as sidecar:
                    encoded = sidecar.read(4096)
            except FileNotFoundError:
                continue  # not ours: fsck reports it
        try:
            new_names.decrypt_name(dir_id, encoded)
            done = True
        except NameError_:
            done = False
        path = directory + b"/" + backing
        if not done:
            try:
                plain = old_names.decrypt_name(dir_id, encoded)
            except NameError_:
                continue  # a stray: fsck reports it
            new_encoded = new_names.encrypt_name(dir_id, plain)
            new_backing = NameCipher.backing_name(new_encoded)
            if new_backing != new_encoded:  # a long name: its new sidecar first
                _replace_file(directory + b"/" + longname_sidecar(new_backing), new_encoded)
            os.rename(path, directory + b"/" + new_backing)
            if backing != encoded:
                try:
                    os.unlink(directory + b"/" + longname_sidecar(backing))
                except FileNotFoundError:
                    pass
            path = directory + b"/" + new_backing
            if after_entry is not None:
                after_entry()
        mode = os.lstat(path).st_mode
        if stat.S_ISLNK(mode):
            _migrate_symlink(path, old_names, new_names)
        yield path, stat.S_ISDIR(mode)


def _migrate_symlink(path: bytes, old_names: NameCipher, new_names: NameCipher) -> None:
    stored = os.readlink(path)
    try:
        new_names.decrypt_target(stored)
        return  # done already
    except NameError_:
        pass
    try:
        target = old_names.decrypt_target(stored)
    except NameError_:
        return  # fsck reports it
    temporary = path + b".kmsfs-tmp"
    try:
        os.unlink(temporary)
    except FileNotFoundError:
        pass
    os.symlink(new_names.encrypt_target(target), temporary)
    st = os.lstat(path)
    try:
        os.chown(temporary, st.st_uid, st.st_gid, follow_symlinks=False)
    except PermissionError:
        pass
    os.utime(temporary, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)
    os.rename(temporary, path)


def _replace_file(path: bytes, content: bytes) -> None:
    temporary = path + b".tmp"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o444)
    try:
        os.write(fd, content)
    finally:
        os.close(fd)
    os.rename(temporary, path)
