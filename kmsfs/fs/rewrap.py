"""``kmsfs rewrap``: move a cipher directory's wrapped keys to another CMK, or to the
current version of its CMK after a rotation, without rewriting any file content.

What is rewrapped:

- every file header's active key slot: the wrapped data key goes through KMS
  ``ReEncrypt``, the new blob is unwrapped once (Decrypt) and must open the header (key
  commitment and slot MACs: the same data key), and the format's two-slot rewrap plan
  (:func:`kmsfs.format.header.plan_rewrap`, the steps of :func:`kmsfs.format.rewrap`)
  writes it into the inactive slot and then erases the old one. Killed at any instant,
  the file opens with the old or the new wrapping (kmsfs/format/README.md, *Rewrap*).
  ``kmsfs.format.rewrap`` fsyncs after each of its two writes (3.3 ms each on this
  disk); here the files go in batches of :data:`BATCH_FILES`: every new slot of the
  batch, one ``syncfs``, every old slot erased, one ``syncfs`` -- the same order per
  file, so the same guarantee on power loss, for two syncs per batch;
- ``kmsfs.conf``'s wrapped metadata key (the key of names, symlink targets and
  xattrs), ReEncrypted, checked to unwrap to the same key, the config re-sealed with the
  new ``key_arn`` and replaced atomically (``write_new_config``). New files then get
  data keys from the new CMK. Directory ids (``kmsfs.diriv``) are random ids, not
  keys, and long-name sidecars hold encrypted names: both stay as they are.

AWS KMS's ``ReEncrypt`` under the same key id re-encrypts under the key's *current*
backing key (after ``RotateKeyOnDemand`` or automatic rotation), so ``--to-key`` left
out means "the current version of the filesystem's CMK".

Resumable: a file whose active slot already holds a blob of the target key (for keyd's
blobs: also its current version, which the blob names) and whose other slot is empty is
skipped, so a second run, or a run after a kill, does only what is left. A file the
format left with an older wrapping in its inactive slot (a rewrap killed between its
two writes) is done again.

``--dry-run`` writes nothing; it asks the key service for one ReEncrypt (of kmsfs.conf's
metadata key, whose new blob names the target's current key version) and reads headers.

Mounted filesystems: refused. The mount holds an exclusive flock on the cipher
directory (:func:`kmsfs.fs.mount.lock_cipherdir`); rewrap takes the same lock for its
whole run, so it refuses while the filesystem is mounted and no mount can start while
it runs. (A mount caches open files' headers and data keys; rewrapping under it would
race its own header writes.)

File times: the mount shows the backing file's times, so each file's atime and mtime
are put back after its header changed (its ctime does change). A kill between a file's
header write and that step leaves that file (one per worker) with the kill's time as
its mtime: the old one is not stored anywhere else.

The ``key_arn`` field of a slot and the blob's key version are read without a key to
decide what to skip (as ``kmsfs inspect`` shows them); they are authenticated by the
slot MAC when the file is next opened. A forged "already done" slot can only leave a
file under its old key, which ``kmsfs fsck --keys`` then shows.
"""

from __future__ import annotations

import dataclasses
import hmac
import os
import stat
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from kmsfs.errors import FormatError, InUse, KMSError, KmsfsError, UsageError
from kmsfs.format.header import (
    SLOT_SIZE,
    Header,
    SlotState,
    authenticate_header,
    plan_rewrap,
    read_header,
    unwrap_data_key,
)
from kmsfs.fs.bindings import (
    name_key_commitment,
    name_key_context,
    read_records,
    store_records,
    unlock_records,
)
from kmsfs.fs.config import (
    CONFIG_NAME,
    FsConfig,
    keyd_endpoint,
    load_config,
    write_new_config,
)
from kmsfs.fs.names import NameCipher, is_internal, is_longname
from kmsfs.fs.offline import unlock_config
from kmsfs.fs.tree import CipherTree
from kmsfs.kms.client import KMSClient
from kmsfs.kms.datakeys import blob_key_version


class ClientDataKeyProvider:
    """A :class:`kmsfs.format.DataKeyProvider` over one open blocking client (one
    keep-alive connection per worker instead of one per call)."""

    def __init__(self, client: KMSClient) -> None:
        self.client = client

    def generate_data_key(
        self, key_id: str, encryption_context: dict[str, str]
    ) -> tuple[bytes, bytes, str]:
        response = self.client.generate_data_key(key_id, encryption_context=encryption_context)
        return response["Plaintext"], response["CiphertextBlob"], response["KeyId"]

    def decrypt_data_key(self, wrapped_blob: bytes, encryption_context: dict[str, str]) -> bytes:
        return self.client.decrypt(wrapped_blob, encryption_context=encryption_context)["Plaintext"]


@dataclass(frozen=True)
class KeyTarget:
    """Where wrapped keys go: the CMK's ARN and, for keyd's blobs, its current version."""

    key_arn: str
    key_id: str  # the uuid at the end of the ARN
    version: int | None  # None when the blob is opaque (AWS KMS)

    def holds(self, wrapped_key: bytes, key_arn: str) -> bool:
        """Whether a slot (its blob and its ARN field) is already under this target."""
        named = blob_key_version(wrapped_key)
        if named is not None and self.version is not None:
            return named == (self.key_id, self.version)
        return key_arn == self.key_arn and self.version is None


@dataclass
class RewrapSummary:
    files: int = 0  # regular files looked at (non-empty ones have a header)
    rewrapped: int = 0
    already_done: int = 0
    empty: int = 0  # no header, nothing to rewrap
    header_bytes: int = 0  # bytes written into headers (and kmsfs.conf)
    config_rewrapped: bool = False
    seconds: float = 0.0
    failed: list[tuple[str, str]] = field(default_factory=list)  # (backing path, problem)
    target: str = ""


def _is_user_file(tree: CipherTree, directory: bytes, name: bytes) -> bool:
    if tree.encrypted:
        return not is_internal(name) or is_longname(name)
    return not (directory == tree.root and name == CONFIG_NAME.encode())


def backing_files(tree: CipherTree, start: bytes) -> Iterator[bytes]:
    """Every user regular file below ``start`` (backing paths; symlinks not followed)."""
    for directory, subdirs, files in os.walk(start):
        subdirs.sort()
        for name in sorted(files):
            if not _is_user_file(tree, directory, name):
                continue
            path = directory + b"/" + name
            try:
                if stat.S_ISREG(os.lstat(path).st_mode):
                    yield path
            except FileNotFoundError:
                continue


def require_keyd_service(config: FsConfig, what: str) -> None:
    """rewrap, import and export talk to keyd only so far: a cipher directory whose CMK
    lives in AWS KMS (kmsfs.conf's key_service) is refused with one clear line rather
    than sent to a keyd that does not hold its key."""
    if config.key_service is not None:
        raise UsageError(
            f"kmsfs {what} works with keyd's CMKs only so far; this cipher directory's "
            f"key {config.key_arn} is in AWS KMS ({config.key_service.region})"
        )


def _target_of(client: KMSClient, key: str) -> tuple[str, str]:
    try:
        metadata = client.describe_key(key)["KeyMetadata"]
    except KMSError as error:
        if error.aws_type == "NotFoundException":
            raise UsageError(f"unknown key {key}: {error.message}") from None
        raise
    if metadata.get("KeyState") != "Enabled":
        raise UsageError(f"key {metadata.get('Arn')} is {metadata.get('KeyState')}: enable it")
    return metadata["Arn"], metadata["KeyId"]


def rewrap_config(
    client: KMSClient, config: FsConfig, metadata_key: bytes, target_arn: str
) -> tuple[FsConfig, bytes]:
    """``config`` with its metadata key ReEncrypted under ``target_arn`` and re-sealed
    (not written); and the new blob. The new blob must unwrap to the same key."""
    response = client.re_encrypt(
        config.metadata_key_wrapped,
        target_arn,
        source_encryption_context=config.metadata_key_context,
        destination_encryption_context=config.metadata_key_context,
        source_key_id=config.key_arn,
    )
    new_blob: bytes = response["CiphertextBlob"]
    unwrapped = client.decrypt(
        new_blob, encryption_context=config.metadata_key_context, key_id=target_arn
    )["Plaintext"]
    if not hmac.compare_digest(unwrapped, metadata_key):
        raise KmsfsError("the key service returned a metadata key that is not this filesystem's")
    new_config = dataclasses.replace(
        config, key_arn=response["KeyId"], metadata_key_wrapped=new_blob, extra=dict(config.extra)
    )
    new_config.seal(metadata_key)
    return new_config, new_blob


def _rewrap_bindings(client: KMSClient, config: FsConfig, targets: dict[str, KeyTarget]) -> bool:
    """Each binding's name key ReEncrypted under its CMK's current version (into
    ``config``, not yet sealed or written); ``targets`` gets each bound CMK's target.
    Whether any blob changed. A new blob must unwrap to the committed name key."""
    records = read_records(config)
    changed = False
    for dir_id, record in sorted(records.items()):
        context = name_key_context(config, dir_id)
        response = client.re_encrypt(
            record.wrapped,
            record.key_arn,
            source_encryption_context=context,
            destination_encryption_context=context,
            source_key_id=record.key_arn,
        )
        new_blob: bytes = response["CiphertextBlob"]
        unwrapped = client.decrypt(new_blob, encryption_context=context, key_id=record.key_arn)
        if not hmac.compare_digest(name_key_commitment(unwrapped["Plaintext"]), record.commitment):
            raise KmsfsError("the key service returned another name key for a key binding")
        named = blob_key_version(new_blob)
        if record.key_arn not in targets:
            arn, key_id = _target_of(client, record.key_arn)
            targets[record.key_arn] = KeyTarget(arn, key_id, named[1] if named else None)
        if named is None or blob_key_version(record.wrapped) != named:
            records[dir_id] = dataclasses.replace(record, wrapped=new_blob)
            changed = True
    store_records(config, records)
    return changed


def _restore_times(fd: int, before: os.stat_result) -> None:
    os.utime(fd, ns=(before.st_atime_ns, before.st_mtime_ns))


def _open_for_rewrap(path: bytes) -> tuple[int, int | None]:
    """The file opened read-write; a read-only file of ours is made writable for the
    moment (its mode is returned, to be put back after its batch; a kill in between
    leaves it with the owner's write bit set -- root never needs this)."""
    flags = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        return os.open(path, flags), None
    except PermissionError:
        info = os.lstat(path)
        if info.st_uid != os.geteuid():
            raise
        os.chmod(path, stat.S_IMODE(info.st_mode) | stat.S_IWUSR, follow_symlinks=False)
        try:
            return os.open(path, flags), stat.S_IMODE(info.st_mode)
        except BaseException:
            os.chmod(path, stat.S_IMODE(info.st_mode))
            raise


def _needs_rewrap(header: Header, target: KeyTarget) -> bool:
    active = header.active_slot
    return not (
        target.holds(bytes(active.wrapped_key), active.key_arn)
        and header.inactive_state is SlotState.EMPTY
    )


class ClientPerThread:
    """One blocking keyd client per thread (one keep-alive connection each; a
    :class:`KMSClient` is not thread-safe). Also used by :mod:`kmsfs.fs.transfer`."""

    def __init__(self, endpoint: Path, keyd_uid: str | None) -> None:
        self._endpoint = endpoint
        self._keyd_uid = keyd_uid
        self._local = threading.local()
        self._clients: list[KMSClient] = []
        self._lock = threading.Lock()

    def client(self) -> KMSClient:
        client = getattr(self._local, "client", None)
        if client is None:
            client = KMSClient(self._endpoint, keyd_uid=self._keyd_uid)
            self._local.client = client
            with self._lock:
                self._clients.append(client)
        return client

    def provider(self) -> ClientDataKeyProvider:
        return ClientDataKeyProvider(self.client())

    def close(self) -> None:
        for client in self._clients:
            client.close()


@dataclass
class _Prepared:
    """A file whose new slot is ready: its two header writes, in order."""

    path: bytes
    fd: int
    mode: int | None  # a read-only file's mode, put back at the end
    before: os.stat_result
    writes: list[tuple[int, bytes]]

    def close(self) -> None:
        os.close(self.fd)
        if self.mode is not None:
            os.chmod(self.path, self.mode)


def prepare_file(
    path: bytes, client: KMSClient, target: KeyTarget, *, dry_run: bool = False
) -> _Prepared | str:
    """ReEncrypt one file's wrapped key and plan its header writes (nothing written yet).

    'empty', 'done' (already under the target) or, dry run, 'would' instead. The new blob
    is unwrapped (Decrypt) and must open the header: the key commitment and every valid
    slot's MAC are checked with the data key it holds, so a blob of another data key is
    refused before anything is written -- what :func:`kmsfs.format.rewrap` checks too.
    """
    if dry_run:
        fd, mode = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC), None
    else:
        fd, mode = _open_for_rewrap(path)
    prepared = None
    try:
        before = os.fstat(fd)
        if before.st_size == 0:
            return "empty"
        header = read_header(fd)
        if not _needs_rewrap(header, target):
            return "done"
        if dry_run:
            return "would"
        context = header.full_context
        response = client.re_encrypt(
            bytes(header.active_slot.wrapped_key),
            target.key_arn,
            source_encryption_context=context,
            destination_encryption_context=context,
        )
        new_blob = response["CiphertextBlob"]
        data_key = unwrap_data_key(ClientDataKeyProvider(client), header, new_blob)
        keys = authenticate_header(header, data_key)
        writes = plan_rewrap(header, keys, new_blob, response["KeyId"])
        prepared = _Prepared(path, fd, mode, before, writes)
        return prepared
    finally:
        if prepared is None:
            os.close(fd)
            if mode is not None:
                os.chmod(path, mode)


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written


def syncfs(path: bytes) -> None:
    """syncfs(2) of the filesystem holding ``path`` (Python has no os.syncfs)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if libc.syncfs(fd) != 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code))
    finally:
        os.close(fd)


def write_batch(batch: list[_Prepared], root: bytes) -> dict[bytes, str]:
    """The format's two rewrap steps for a batch of files, each step made durable for the
    whole batch with one syncfs (instead of an fsync per file and step, 2-4 ms each
    here): first every new slot, then every old slot erased. Per file the order is the
    one :func:`kmsfs.format.rewrap` keeps, so a crash at any point leaves each file with
    its old or its new wrapping. Returns the files that failed, with why."""
    failed: dict[bytes, str] = {}
    try:
        for step in (0, 1):
            for item in batch:
                if item.path in failed:
                    continue
                offset, data = item.writes[step]
                try:
                    _pwrite_all(item.fd, data, offset)
                except OSError as error:
                    failed[item.path] = f"error: {error.strerror}"
            syncfs(root)
        for item in batch:
            try:
                _restore_times(item.fd, item.before)
            except OSError as error:
                failed.setdefault(item.path, f"error: {error.strerror}")
    finally:
        for item in batch:
            item.close()
    return failed


#: files whose header writes share one syncfs per step
BATCH_FILES = 256


def rewrap_cipherdir(
    cipherdir: Path,
    *,
    to_key: str | None = None,
    subdir: str | None = None,
    dry_run: bool = False,
    workers: int = 1,
    keyd_socket: str | None = None,
    keyd_uid: str | None = None,
    on_total: Callable[[int], None] | None = None,
    on_file: Callable[[], None] | None = None,
    batch_files: int = BATCH_FILES,
) -> RewrapSummary:
    """Rewrap kmsfs.conf (unless ``subdir``) and every file below ``subdir`` (a path as
    seen at the mountpoint; the whole tree by default). Refused while mounted."""
    from kmsfs.fs.mount import lock_cipherdir

    if workers < 1:
        raise UsageError("--workers must be at least 1")
    if batch_files < 1:
        raise UsageError("--batch must be at least 1")
    started = time.monotonic()
    cipherdir = Path(cipherdir)
    config = load_config(cipherdir)
    require_keyd_service(config, "rewrap")
    endpoint = keyd_endpoint(keyd_socket, config, keyd_uid=keyd_uid)
    try:
        lock = lock_cipherdir(cipherdir)  # InUse while mounted (see the module doc)
    except InUse as error:
        raise InUse(f"{error}; kmsfs rewrap works only on an unmounted cipher directory") from None
    summary = RewrapSummary()
    pool = ClientPerThread(endpoint, keyd_uid)
    try:
        client = pool.client()
        metadata_key = unlock_config(client, config, f"keyd at {endpoint}")
        root = os.fsencode(cipherdir.resolve())
        tree = CipherTree(
            root,
            None if config.plaintext_names else NameCipher(metadata_key),
            key_arn=config.key_arn,
            bindings=unlock_records(client, config),
        )
        target_arn, target_id = _target_of(client, to_key or config.key_arn)
        summary.target = target_arn
        # ReEncrypt the metadata key first: its blob names the target's current version
        new_config, new_blob = rewrap_config(client, config, metadata_key, target_arn)
        named = blob_key_version(new_blob)
        target = KeyTarget(target_arn, target_id, named[1] if named else None)
        # per-directory CMKs, without --to-key: each file to its directory's binding,
        # and each binding's name key to its CMK's current version
        targets = {target_arn: target}
        per_binding = to_key is None and bool(tree.bindings)
        bindings_rewrapped = False
        if per_binding:
            bindings_rewrapped = _rewrap_bindings(client, new_config, targets)
            if bindings_rewrapped:
                new_config.seal(metadata_key)
            summary.target = "their directories' bindings"
        if subdir is None and (
            target.version is None
            or not target.holds(config.metadata_key_wrapped, config.key_arn)
            or config.key_arn != new_config.key_arn
            or bindings_rewrapped
        ):
            if not dry_run:
                write_new_config(cipherdir, new_config)
                summary.header_bytes += len(new_config.to_json())
            summary.config_rewrapped = True
        start = tree.resolve(subdir) if subdir else root
        if not os.path.isdir(start):
            raise UsageError(f"{subdir} is not a directory in {cipherdir}")
        paths = list(backing_files(tree, start))
        if on_total is not None:
            on_total(len(paths))

        def work(path: bytes) -> tuple[bytes, _Prepared | str]:
            try:
                wanted = target
                if per_binding:
                    wanted = targets[tree.binding(os.path.dirname(path)).key_arn]
                return path, prepare_file(path, pool.client(), wanted, dry_run=dry_run)
            except (OSError, FormatError, KmsfsError, ValueError) as error:
                return path, f"error: {getattr(error, 'strerror', None) or error}"

        def account(path: bytes, outcome: str) -> None:
            summary.files += 1
            if outcome == "empty":
                summary.empty += 1
            elif outcome == "done":
                summary.already_done += 1
            elif outcome in ("rewrapped", "would"):
                summary.rewrapped += 1
                if outcome == "rewrapped":
                    summary.header_bytes += 2 * SLOT_SIZE
            else:
                relative = os.fsdecode(os.path.relpath(path, root))
                summary.failed.append((relative, outcome.removeprefix("error: ")))
            if on_file is not None:
                on_file()

        executor = ThreadPoolExecutor(max_workers=workers) if workers > 1 else None
        try:
            for first in range(0, len(paths), batch_files):
                chunk = paths[first : first + batch_files]
                results = list(executor.map(work, chunk) if executor else map(work, chunk))
                batch = [outcome for _, outcome in results if isinstance(outcome, _Prepared)]
                failed = write_batch(batch, root) if batch else {}
                for path, outcome in results:
                    if isinstance(outcome, _Prepared):
                        outcome = failed.get(path, "rewrapped")
                    account(path, outcome)
        finally:
            if executor is not None:
                executor.shutdown(wait=True, cancel_futures=True)
    finally:
        pool.close()
        if lock is not None:
            os.close(lock)
    summary.seconds = time.monotonic() - started
    return summary
