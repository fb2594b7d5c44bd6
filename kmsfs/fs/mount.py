"""``kmsfs init`` and ``kmsfs mount``: make a cipher directory, serve it over FUSE."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import os
import re
import resource
import signal
import stat
import subprocess
import time
import tracemalloc
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyfuse3
import trio

from kmsfs.background import report_ready
from kmsfs.errors import (
    InUse,
    KeydUnavailable,
    KeydUntrusted,
    KMSError,
    KmsfsError,
    UsageError,
)
from kmsfs.format import DEFAULT_CHUNK_SIZE
from kmsfs.format.offsets import check_chunk_size
from kmsfs.fs import session
from kmsfs.fs.access_audit import AccessAuditor
from kmsfs.fs.bindings import unlock_records_async
from kmsfs.fs.config import (
    KEY_SERVICE_AWS,
    RECIPIENT_ALGORITHM,
    RECIPIENT_KEY_FIELD,
    AwsKeyService,
    FsConfig,
    RecipientKey,
    key_arn_region,
    load_config,
    unwrap_refused,
    write_new_config,
)
from kmsfs.fs.keys import KeyManager
from kmsfs.fs.keyservice import KEYD as KEY_SERVICE_KEYD
from kmsfs.fs.keyservice import KeyService, KeyServiceOptions
from kmsfs.fs.keyservice import resolve as resolve_key_service
from kmsfs.fs.names import NAME_CACHE_SIZE, NameCipher
from kmsfs.fs.ops import Operations
from kmsfs.fs.pagefill import ChunkFiller
from kmsfs.fs.polling import DEFAULT_WINDOW, BusyPoller
from kmsfs.fs.prefetch import Prefetcher
from kmsfs.fs.tree import CipherTree
from kmsfs.hardening import harden_process, is_dumpable
from kmsfs.systemd import Notifier

log = logging.getLogger("kmsfs.mount")


class MountError(KmsfsError):
    """The filesystem could not be mounted."""

    exit_code = 9


def _require_enabled_key(metadata: dict) -> None:
    state = metadata.get("KeyState")
    if state != "Enabled":
        raise MountError(f"key {metadata.get('Arn')} is {state}: enable it first")


def init_cipherdir(
    cipherdir: Path,
    key: str,
    *,
    keyd_socket: str | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    plaintext_names: bool = False,
    keyd_uid: str | None = None,
    recipient_key: str | None = None,
    key_service_options: KeyServiceOptions | None = None,
) -> FsConfig:
    """Make ``cipherdir`` (empty or new) a cipher directory whose files use ``key``.

    The key service is keyd unless the user asks for AWS (an ``--aws-*`` option or
    ``--key-service aws``) or ``key`` is a key ARN that keyd does not know (or no keyd
    answers): then AWS KMS in the ARN's region, recorded in kmsfs.conf's ``key_service``.

    ``recipient_key`` (an RSA ENCRYPT_DECRYPT CMK) also lets files written with its public
    key alone into it (``kmsfs encrypt --public-key``): its ARN and public key are sealed
    into kmsfs.conf."""
    try:
        check_chunk_size(chunk_size)
    except ValueError as error:
        raise UsageError(str(error)) from None
    cipherdir = Path(cipherdir)
    if cipherdir.exists():
        if not cipherdir.is_dir():
            raise UsageError(f"{cipherdir} is not a directory")
        if any(cipherdir.iterdir()):
            raise UsageError(f"{cipherdir} is not empty: kmsfs init needs an empty directory")
    options = key_service_options or KeyServiceOptions(keyd_socket=keyd_socket, keyd_uid=keyd_uid)
    service, metadata, stored = _choose_key_service(key, options)
    _require_enabled_key(metadata)
    config = FsConfig(
        filesystem_id=uuid.uuid4().hex,
        key_arn=metadata["Arn"],
        chunk_size=chunk_size,
        keyd_socket=str(keyd_socket) if keyd_socket and stored is None else None,
        key_service=stored,
        plaintext_names=plaintext_names,
    )
    with service.client() as client:
        if recipient_key is not None:
            config.extra[RECIPIENT_KEY_FIELD] = _recipient_key(client, recipient_key).to_document()
        # with its plaintext, to seal the config (see kmsfs/fs/config.py)
        metadata_key = client.generate_data_key(
            config.key_arn, encryption_context=config.metadata_key_context
        )
    config.metadata_key_wrapped = metadata_key["CiphertextBlob"]
    config.seal(metadata_key["Plaintext"])
    cipherdir.mkdir(mode=0o700, parents=True, exist_ok=True)
    if not plaintext_names:
        CipherTree(os.fsencode(cipherdir), None).write_dir_id(os.fsencode(cipherdir))
    write_new_config(cipherdir, config)
    return config


def _recipient_key(client: Any, key: str) -> RecipientKey:
    """The recipient CMK's ARN and public key, checked to be usable for recipient slots
    (an enabled RSA key for ENCRYPT_DECRYPT that offers RSAES_OAEP_SHA_256)."""
    import base64

    from kmsfs.format.recipient import load_recipient_public_key

    try:
        metadata = client.describe_key(key)["KeyMetadata"]
    except KMSError as error:
        if error.aws_type == "NotFoundException":
            raise UsageError(f"unknown recipient key {key}: {error.message}") from None
        raise
    _require_enabled_key(metadata)
    spec, usage = metadata.get("KeySpec", ""), metadata.get("KeyUsage", "")
    if (
        not spec.startswith("RSA_")
        or usage != "ENCRYPT_DECRYPT"
        or RECIPIENT_ALGORITHM not in metadata.get("EncryptionAlgorithms", [])
    ):
        raise UsageError(
            f"recipient key {key} is {spec or '?'} for {usage or '?'}: it must be an RSA key "
            f"(RSA_2048/3072/4096) for ENCRYPT_DECRYPT, which offers {RECIPIENT_ALGORITHM}"
        )
    public_key_der = base64.b64decode(client.call("GetPublicKey", {"KeyId": key})["PublicKey"])
    load_recipient_public_key(public_key_der, f"the public key of {key}")
    return RecipientKey(metadata["Arn"], public_key_der)


def _describe_known_key(service: KeyService, key: str) -> dict:
    with service.client() as client:
        try:
            return client.describe_key(key)["KeyMetadata"]
        except KMSError as error:
            if error.aws_type == "NotFoundException":
                raise UsageError(
                    f"unknown key {key} ({service.describe()}): {error.message}"
                ) from None
            raise


def _choose_key_service(
    key: str, options: KeyServiceOptions
) -> tuple[KeyService, dict, AwsKeyService | None]:
    """(service, the key's metadata, kmsfs.conf's key_service entry) for ``kmsfs init``."""
    region = key_arn_region(key)
    if options.kind == KEY_SERVICE_KEYD and options.wants_aws:
        raise UsageError("--key-service keyd and the --aws-* options exclude each other")
    wants_aws = options.kind == KEY_SERVICE_AWS or (options.kind is None and options.wants_aws)
    keyd_error: Exception | None = None
    if not wants_aws and options.kind is None and region is not None and ":key/" in key:
        # an ARN: keyd's own key, or one in AWS KMS (any ARN that is not keyd's)
        keyd = KeyService(
            KEY_SERVICE_KEYD,
            keyd_socket=options.keyd_socket,
            keyd_uid=options.keyd_uid,
        )
        try:
            with keyd.client() as client:
                return keyd, client.describe_key(key)["KeyMetadata"], None
        except KeydUntrusted:
            raise
        except (KeydUnavailable, KMSError) as error:
            if isinstance(error, KMSError) and error.aws_type != "NotFoundException":
                raise
            log.info("%s is not a key of %s (%s): using AWS KMS", key, keyd.describe(), error)
            keyd_error = error
            wants_aws = True
    if not wants_aws:
        keyd = KeyService(
            KEY_SERVICE_KEYD,
            keyd_socket=options.keyd_socket,
            keyd_uid=options.keyd_uid,
        )
        return keyd, _describe_known_key(keyd, key), None
    region = options.aws_region or region
    if region is None:
        raise UsageError(
            f"--key {key}: a key in AWS KMS is named by its ARN (arn:aws:kms:REGION:ACCOUNT:key/ID)"
        )
    stored = AwsKeyService(region, options.aws_endpoint_url, options.aws_profile)
    service = resolve_key_service(
        FsConfig(filesystem_id="0" * 32, key_arn=key, key_service=stored), options
    )
    try:
        return service, _describe_known_key(service, key), stored
    except (KeydUnavailable, KMSError, UsageError) as error:
        if keyd_error is None:
            raise
        # chosen because keyd did not know the ARN: say both, one may be a typo
        raise UsageError(
            f"{key}: keyd does not have it ({keyd_error}), and {service.describe()} "
            f"answered: {error} (--key-service keyd|aws to choose)"
        ) from None


#: share (percent) of the kernel's dirty-page limit the mount may use; the kernel's
#: default for FUSE is 1 (see _tune_backing_device)
DEFAULT_MAX_DIRTY_RATIO = 5


@dataclass
class MountOptions:
    foreground: bool = False
    read_only: bool = False
    allow_other: bool = False
    keyd_socket: str | None = None
    #: a service account whose keyd is trusted too (kmsfs.kms.trust; else $KMSFS_KEYD_UID)
    keyd_uid: str | None = None
    #: override kmsfs.conf's AWS key service entry (kmsfs.fs.keyservice)
    aws_endpoint_url: str | None = None
    aws_profile: str | None = None
    aws_region: str | None = None
    debug: bool = False
    key_cache_seconds: float = 60.0
    #: forward each request's caller to keyd (None: when mounted by root on keyd)
    forward_callers: bool | None = None
    busy_poll_seconds: float = DEFAULT_WINDOW
    max_dirty_ratio: int = DEFAULT_MAX_DIRTY_RATIO
    #: mount over a directory that has files (hiding them while mounted), as FUSE's
    #: old ``-o nonempty`` did; refused otherwise
    nonempty: bool = False
    #: kernel flags for FUSE (``nosuid``, ``nodev``, ``noexec``, ``noatime``...),
    #: from -o (kmsfs.fs.fstab)
    kernel_options: tuple[str, ...] = ()
    #: unmount after this many seconds with no request and no open file (None: never)
    idle_seconds: float | None = None
    #: where a detached mount logs
    log_file: str | None = None
    #: record every open, create, unlink and rename in keyd's audit log
    #: (kmsfs.fs.access_audit)
    audit_opens: bool = False
    #: events kept while keyd does not answer (beyond: counted, reported as a gap)
    audit_queue: int = 100_000


def fuse_options(options: MountOptions, cipherdir: Path | None = None) -> set[str]:
    """The options for pyfuse3.init.

    fsname is the cipher directory, as gocryptfs does: /proc/self/mountinfo (and so
    ``mount``, ``df``, ``findmnt``) shows what is mounted, ``mount -a`` sees that an
    fstab line is mounted already, and a dead mount can be recognised as ours.
    """
    fsname = "kmsfs" if cipherdir is None else _escape_option(str(cipherdir))
    # default_permissions: the kernel checks owner, group, mode and sticky bit as on ext4.
    chosen = {f"fsname={fsname}", "subtype=kmsfs", "default_permissions"}
    chosen.update(options.kernel_options)
    if options.read_only:
        chosen.add("ro")
    if options.allow_other:
        chosen.add("allow_other")
    return chosen


def _escape_option(value: str) -> str:
    """libfuse splits -o at commas and takes a backslash as an escape."""
    return value.replace("\\", "\\\\").replace(",", "\\,")


# ------------------------------------------------------------ mountpoint checks
@dataclass
class MountEntry:
    """One line of /proc/self/mountinfo."""

    mountpoint: str
    fstype: str
    source: str


def _unescape_mountinfo(raw: bytes) -> str:
    # the kernel writes space, tab, newline and backslash as \ooo (octal)
    return os.fsdecode(re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m.group(1), 8)]), raw))


def mount_entries() -> list[MountEntry]:
    entries = []
    with open("/proc/self/mountinfo", "rb") as mountinfo:
        for line in mountinfo:
            fields = line.split()
            try:
                separator = fields.index(b"-", 6)
            except ValueError:
                continue
            if len(fields) < separator + 3:
                continue
            entries.append(
                MountEntry(
                    _unescape_mountinfo(fields[4]),
                    _unescape_mountinfo(fields[separator + 1]),
                    _unescape_mountinfo(fields[separator + 2]),
                )
            )
    return entries


def mounted_at(mountpoint: Path) -> MountEntry | None:
    """The topmost mount at ``mountpoint`` (the one a path lookup sees), if any."""
    found = [entry for entry in mount_entries() if entry.mountpoint == str(mountpoint)]
    return found[-1] if found else None


def kmsfs_mounts_of(cipherdir: Path) -> list[str]:
    """Where ``cipherdir`` is mounted by kmsfs now (fsname is the cipher directory)."""
    return [
        entry.mountpoint
        for entry in mount_entries()
        if entry.fstype == "fuse.kmsfs" and entry.source == str(cipherdir)
    ]


#: how long a mount waits for the lock of a cipher directory mounted nowhere
LOCK_WAIT_SECONDS = 5.0


def lock_cipherdir(cipherdir: Path) -> int | None:
    """Hold an exclusive flock on the cipher directory itself for the mount's lifetime.

    Two mounts of one cipher directory would each cache names, sizes and file content
    (the kernel's write-back cache, the engine's held chunks) and overwrite each other's
    changes. A flock belongs to the open file: it goes when the process ends, however it
    ends, so a killed mount leaves no stale lock. Returns the descriptor to keep open;
    None where the filesystem cannot lock (some network filesystems): then a warning.

    A lock held while the cipher directory is mounted nowhere belongs to a mount that is
    starting or ending (``kmsfs umount`` returns when the kernel has let go, a moment
    before the process exits): then wait up to ``LOCK_WAIT_SECONDS`` for it.
    """
    try:
        fd = os.open(cipherdir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as error:
        raise MountError(f"cannot open {cipherdir}: {error.strerror}") from None
    deadline = time.monotonic() + LOCK_WAIT_SECONDS
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return fd
            except BlockingIOError:
                where = kmsfs_mounts_of(cipherdir)
                if where:
                    raise InUse(
                        f"{cipherdir} is already mounted on {where[0]}: "
                        "one mount at a time (unmount it first)"
                    ) from None
                if time.monotonic() > deadline:
                    raise InUse(
                        f"{cipherdir} is in use by another kmsfs process mounting or unmounting it"
                    ) from None
                time.sleep(0.05)
    except InUse:
        os.close(fd)
        raise
    except OSError as error:
        os.close(fd)
        log.warning(
            "cannot lock %s (%s): nothing stops a second mount of it", cipherdir, error.strerror
        )
        return None


def check_mountpoint(
    mountpoint: Path, options: MountOptions | None = None, *, cipherdir: Path | None = None
) -> bool:
    """Make ``mountpoint`` ready for a mount; True when this created it.

    - missing: created with its parents, as ``mount --mkdir`` does (mode 0755 less the
      umask);
    - a dead mount (ENOTCONN: its process was killed): unmounted (lazily) when it is
      provably ours — a ``fuse.kmsfs`` mount of this ``cipherdir``, whose lock the caller
      holds — otherwise one line saying to run ``kmsfs umount --lazy``;
    - a live mountpoint, a non-directory: refused;
    - a directory with files: refused unless ``nonempty``, since the mount would hide
      them (gocryptfs and FUSE refuse it too, unless ``-nonempty``/``-o nonempty``).
    """
    options = options or MountOptions()
    try:
        status = os.stat(mountpoint)
        if os.path.ismount(mountpoint):
            os.statvfs(mountpoint)  # a stat may come from the kernel's cache; statfs cannot
    except FileNotFoundError:
        try:
            mountpoint.mkdir(mode=0o755, parents=True)
        except OSError as error:
            raise UsageError(f"cannot create mountpoint {mountpoint}: {error.strerror}") from None
        log.info("created the mountpoint %s", mountpoint)
        return True
    except OSError as error:
        if error.errno != errno.ENOTCONN:
            raise UsageError(f"cannot use mountpoint {mountpoint}: {error.strerror}") from None
        _clear_dead_mount(mountpoint, cipherdir)
        return check_mountpoint(mountpoint, options, cipherdir=cipherdir)
    if not stat.S_ISDIR(status.st_mode):
        raise UsageError(f"mountpoint {mountpoint} is not a directory")
    entry = mounted_at(mountpoint) if os.path.ismount(mountpoint) else None
    if entry is not None:
        if (
            cipherdir is not None
            and entry.fstype == "fuse.kmsfs"
            and entry.source == str(cipherdir)
        ):
            raise InUse(f"{cipherdir} is already mounted on {mountpoint}")
        raise UsageError(f"{mountpoint} is already a mountpoint ({entry.fstype} {entry.source})")
    if not options.nonempty:
        try:
            with os.scandir(mountpoint) as entries:
                has_files = next(entries, None) is not None
        except OSError as error:
            raise UsageError(f"cannot read mountpoint {mountpoint}: {error.strerror}") from None
        if has_files:
            raise UsageError(
                f"mountpoint {mountpoint} is not empty: the mount would hide its files "
                "(use -o nonempty or --nonempty to mount over them anyway)"
            )
    return False


def _clear_dead_mount(mountpoint: Path, cipherdir: Path | None) -> None:
    """``mountpoint`` answers ENOTCONN: its FUSE process is gone, the mount stayed."""
    entry = mounted_at(mountpoint)
    ours = (
        cipherdir is not None
        and entry is not None
        and entry.fstype == "fuse.kmsfs"
        and entry.source == str(cipherdir)
    )
    if not ours:
        what = f" ({entry.fstype} {entry.source})" if entry is not None else ""
        raise MountError(
            f"{mountpoint} is a dead mount{what}: its process ended without unmounting "
            f"(transport endpoint is not connected); run: kmsfs umount --lazy {mountpoint}"
        )
    unmount(mountpoint, lazy=True)
    log.warning(
        "%s was a dead mount of %s (its process ended without unmounting): unmounted it",
        mountpoint,
        cipherdir,
    )


def mount_foreground(
    cipherdir: Path, mountpoint: Path, options: MountOptions, *, ready_fd: int | None = None
) -> None:
    """Mount and serve until unmounted (fusermount3 -u) or signalled (SIGTERM, SIGINT)."""
    config = load_config(cipherdir)
    lock_fd = lock_cipherdir(cipherdir)
    try:
        check_mountpoint(mountpoint, options, cipherdir=cipherdir)
        # not from kmsfs.conf unless the user named none: see keyd_endpoint and keyservice
        service = resolve_key_service(config, service_options(options))
        if config.key_service is not None and options.keyd_socket:
            log.info("the CMK is in %s: --keyd-socket is not used", service.describe())
        os.umask(0)  # modes arrive with the caller's umask applied; apply them exactly
        harden_process(log)  # it holds the metadata key and data keys: as keyd does
        _raise_open_file_limit()
        # READY=1 once mounted (Type=notify); taken out of the environment so that no
        # child (fusermount3) can speak for the service
        notifier = Notifier.from_environment()
        trio.run(
            _serve, Path(cipherdir), Path(mountpoint), config, options, service, ready_fd, notifier
        )
    finally:
        if lock_fd is not None:
            os.close(lock_fd)


def service_options(options: MountOptions) -> KeyServiceOptions:
    return KeyServiceOptions(
        keyd_socket=options.keyd_socket,
        keyd_uid=options.keyd_uid,
        aws_endpoint_url=options.aws_endpoint_url,
        aws_profile=options.aws_profile,
        aws_region=options.aws_region,
    )


def check_mount(cipherdir: Path, mountpoint: Path, options: MountOptions) -> bool:
    """What mount_foreground checks of the mountpoint and the lock, for a detached
    mount's parent to say at once; True when the mountpoint was created. The child checks
    again, holding the lock, and is the one to read kmsfs.conf and say what is wrong with
    a cipher directory."""
    try:
        lock_fd = lock_cipherdir(cipherdir)
    except InUse:
        raise
    except MountError:  # cannot even open it: the child says why
        lock_fd = None
    try:
        return check_mountpoint(mountpoint, options, cipherdir=cipherdir)
    finally:
        if lock_fd is not None:
            os.close(lock_fd)


def _raise_open_file_limit() -> None:
    """Descriptors: one per open file and up to ``DIR_FD_CACHE`` of directories (see
    ``inodes.py``); the soft limit (often 1024) goes up to the hard one, as gocryptfs does."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = 1 << 20 if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            log.warning("cannot raise the open file limit above %d", soft)


async def _serve(
    cipherdir: Path,
    mountpoint: Path,
    config: FsConfig,
    options: MountOptions,
    service: KeyService,
    ready_fd: int | None,
    notifier: Notifier,
) -> None:
    async with service.async_client() as client:
        try:
            # The metadata key first, with the CMK kmsfs.conf names, and the config
            # authenticated with it before anything else in it is used.
            try:
                metadata_key = (
                    await client.decrypt(
                        config.metadata_key_wrapped,
                        encryption_context=config.metadata_key_context,
                        key_id=config.key_arn,
                    )
                )["Plaintext"]
            except KMSError as error:
                refused = unwrap_refused(config, error, service.describe(client))
                if isinstance(refused, KMSError) and refused.aws_type == "NotFoundException":
                    raise MountError(refused.message) from None  # it names both already
                raise refused from None
            config.verify(metadata_key)
            _require_enabled_key((await client.describe_key(config.key_arn))["KeyMetadata"])
        except KeydUntrusted:
            raise
        except KeydUnavailable as error:
            raise MountError(f"cannot reach {service.describe()}: {error}") from None
        except KMSError as error:
            raise MountError(
                f"{service.describe()} refused the filesystem's key: {error}"
            ) from None
        keys = KeyManager(client, config, cache_seconds=options.key_cache_seconds)
        forward_callers = _forwards_callers(options, service)
        root = os.fsencode(cipherdir.resolve())
        names = None if config.plaintext_names else NameCipher(metadata_key)
        # per-directory CMKs: every name key now; one refused fails its subtree only
        bound = await unlock_records_async(client, config)
        operations = Operations(
            root,
            config,
            keys,
            metadata_key,
            CipherTree(root, names, key_arn=config.key_arn, bindings=bound),
            read_only=options.read_only,
            poller=BusyPoller(options.busy_poll_seconds),
            prefetcher=Prefetcher(),
            forward_callers=forward_callers,
            filler=ChunkFiller(),
        )
        operations.mountpoint = os.fsencode(mountpoint)
        auditor = _access_auditor(service, config, options)
        operations.auditor = auditor
        # Signal receivers before the mount appears: whoever waits for it may signal at
        # once, and SIGUSR1's default action would kill the mount.
        with (
            trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as stops,
            trio.open_signal_receiver(signal.SIGUSR1) as reports,
        ):
            try:
                pyfuse3.init(operations, str(mountpoint), fuse_options(options, cipherdir))
            except RuntimeError as error:
                raise MountError(f"cannot mount on {mountpoint}: {error}{_fuse_hint()}") from None
            # the busy poller's window bounds the reader's spin too (0: neither)
            waiter = session.install(
                operations, spin=min(session.SPIN_SECONDS, options.busy_poll_seconds)
            )
            log.info(
                "mounted %s on %s (key %s, %s)",
                cipherdir,
                mountpoint,
                config.key_arn,
                service.describe(),
            )
            signalled: list[int] = []
            unmount = True
            try:
                report_ready(ready_fd)
                notifier.ready(f"mounted {cipherdir} on {mountpoint}")
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(keys.run)
                    nursery.start_soon(operations.key_bindings.refresh, options.key_cache_seconds)
                    nursery.start_soon(operations.poller.run)
                    nursery.start_soon(_tune_backing_device, mountpoint, options.max_dirty_ratio)
                    nursery.start_soon(_terminate_on_signal, stops, signalled, operations)
                    nursery.start_soon(_report_memory_on_signal, reports, operations)
                    nursery.start_soon(_return_memory, operations)
                    if auditor is not None:
                        nursery.start_soon(auditor.run)
                    if options.idle_seconds:
                        nursery.start_soon(_unmount_when_idle, operations, mountpoint, options)
                    await pyfuse3.main()
                    # main returns after a signal (we still have to unmount) or when the
                    # kernel reports the mount gone (fusermount3 -u): nothing to unmount.
                    unmount = bool(signalled)
                    nursery.cancel_scope.cancel()
            finally:
                notifier.stopping()
                if auditor is not None:
                    with trio.CancelScope(shield=True):
                        await auditor.drain()
                    await auditor.client.aclose()
                operations.filler.stop()  # before the session it stores into closes
                operations.close_all()
                operations.prefetcher.stop()
                keys.forget_all()
                pyfuse3.close(unmount=unmount)
                operations.inodes.close()
                session.uninstall()
                if waiter is not None:
                    log.info(
                        "requests taken at once: %d, after a spin: %d, after a wait: %d; "
                        "readers handing over: %d",
                        waiter.fast,
                        waiter.spun,
                        waiter.slow,
                        waiter.handoffs,
                    )
                log.info("unmounted %s", mountpoint)


def _forwards_callers(options: MountOptions, service: KeyService) -> bool:
    """Whether keyd calls made for a request carry its caller (issue 17): by default
    when root mounts on keyd (keyd trusts root to forward); a non-root mount only when
    asked (keyd must name its user in --forwarders, else other users get EACCES).
    AWS KMS takes no forwarded identity: such a mount forwards nothing. Nor does a mount
    without ``allow_other``: the kernel lets only the mounting user in, who is the mount's
    own principal (and then nothing pays for forwarding: see MountKeyBindings.uncached)."""
    if service.kind != "keyd":
        if options.forward_callers:
            raise MountError(
                "--forward-callers: the CMK is in AWS KMS, which takes no forwarded "
                "identity (only keyd does)"
            )
        return False
    if not options.allow_other:
        return False
    if options.forward_callers is None:
        return os.geteuid() == 0
    return options.forward_callers


#: seconds the access auditor waits for one keyd answer
AUDIT_CALL_TIMEOUT = 5.0


def _access_auditor(
    service: KeyService, config: FsConfig, options: MountOptions
) -> AccessAuditor | None:
    """The access auditor of ``--audit-opens``, on a keyd connection of its own."""
    if not options.audit_opens:
        return None
    if service.kind != KEY_SERVICE_KEYD:
        raise MountError(
            f"--audit-opens records into keyd's audit log; this filesystem's key is in "
            f"{service.describe()}"
        )
    # a call is not cancelled half way (see AccessAuditor.flush_once): 5 s bounds the
    # unmount's wait for one
    client = service.async_client(timeout=AUDIT_CALL_TIMEOUT)
    return AccessAuditor(client, config.filesystem_id, options.audit_queue)


READ_AHEAD_KB = 1024


async def _tune_backing_device(mountpoint: Path, max_dirty_ratio: int) -> None:
    """Set the mount's read-ahead and write-back budget in /sys/class/bdi (needs root).

    read_ahead_kb: FUSE's READ size follows the mount's read-ahead, which the kernel sets
    when it receives our INIT reply: so set it once the session runs. 1 MiB lets the
    kernel send 1 MiB READs instead of 128 KiB ones.

    max_ratio: the kernel lets a FUSE mount hold only 1% of its dirty-page limit
    (strictlimit, meant for untrusted, unprivileged servers) and throttles writers
    beyond it. ``/sys/class/bdi/*/max_ratio`` is the knob the kernel added (6.2) for
    administrators of trusted FUSE filesystems. A larger budget lets the kernel's
    writeback send more WRITEs sorted by offset, so more of them land in the engine's
    held chunk and one seal covers several: fio random 4 KiB writes, 4 jobs, went from
    17-18k to 26k IOPS at 3%, 27-29k at 5-10% (gocryptfs: 16.7k at 1%, 17.5k at 5%).

    The device number comes from /proc/self/mountinfo (a stat of the mountpoint would
    ask this very process).
    """
    target = os.fsencode(mountpoint)
    device = None
    with open("/proc/self/mountinfo", "rb") as mountinfo:
        for line in mountinfo:
            fields = line.split()
            if len(fields) > 4 and fields[4].replace(b"\\040", b" ") == target:
                device = fields[2].decode()
    if device is None:
        log.debug("%s is not in /proc/self/mountinfo", mountpoint)
        return
    bdi = Path(f"/sys/class/bdi/{device}")
    wanted = {"read_ahead_kb": str(READ_AHEAD_KB), "max_ratio": str(max_dirty_ratio)}
    for attempt in range(50):  # until the INIT reply has been processed and ours stick
        await trio.sleep(0.05)
        settled = True
        for name, value in list(wanted.items()):
            try:
                if (bdi / name).read_text().strip() != value:
                    (bdi / name).write_text(value)
                    settled = False
            except OSError as error:
                log.debug("cannot set the mount's %s: %s", name, error)
                del wanted[name]
        if not wanted or (settled and attempt > 3):
            return


async def _unmount_when_idle(
    operations: Operations, mountpoint: Path, options: MountOptions
) -> None:
    """Unmount once no request came and no file or directory was open for
    ``options.idle_seconds``, looking every tenth of it, as gocryptfs's ``-idle`` does
    (CryFS: ``--unmount-idle``). A mountpoint still in use (a shell's working directory)
    makes the unmount fail with EBUSY: then the wait starts again."""
    idle_seconds = options.idle_seconds
    assert idle_seconds
    requests = operations.poller.requests
    idle_since = trio.current_time()
    while True:
        await trio.sleep(idle_seconds / 10)
        now = trio.current_time()
        open_handles = len(operations._handles) + len(operations._dir_handles)
        if operations.poller.requests != requests or open_handles:
            log.debug(
                "idle check: in use (%d open, %d requests)",
                open_handles,
                operations.poller.requests - requests,
            )
            requests = operations.poller.requests
            idle_since = now
            continue
        if now - idle_since < idle_seconds:
            continue
        log.info("unused for %g s: unmounting %s", idle_seconds, mountpoint)
        try:
            await trio.to_thread.run_sync(unmount, mountpoint)
        except KmsfsError as error:
            log.info("not unmounted, still in use: %s", error)
            requests = operations.poller.requests
            idle_since = trio.current_time()
            continue
        return  # pyfuse3.main() returns: the kernel has ended the session


async def _terminate_on_signal(
    signals: AsyncIterator[int], signalled: list[int], operations: Operations
) -> None:
    async for signum in signals:
        log.info("received %s, unmounting", signal.Signals(signum).name)
        signalled.append(signum)
        # while requests are still answered: a page-cache store may wait for a READ
        await operations.filler.drain()
        session.terminate()
        return


#: how often the mount looks whether the kernel forgot many inodes
RETURN_MEMORY_SECONDS = 2.0
#: nodes the table must have lost since its peak (and at least a quarter of that peak)
#: before the mount compacts it and gives free memory back to the system
RETURN_MEMORY_AFTER_NODES = 8192
#: ... and the name caches are emptied too when this many were forgotten: a drop eight
#: times the size of a cache (a tree the cache could never have held whole)
CLEAR_NAMES_AFTER_NODES = 8 * NAME_CACHE_SIZE
_libc = ctypes.CDLL(None)
#: glibc's malloc_trim (None elsewhere, e.g. musl: there nothing is returned)
_malloc_trim = getattr(_libc, "malloc_trim", None)
if _malloc_trim is not None:
    _malloc_trim.argtypes = (ctypes.c_size_t,)
    _malloc_trim.restype = ctypes.c_int


def return_memory(operations: Operations) -> bool:
    """After the kernel forgot many inodes (``echo 2 > drop_caches``, memory pressure,
    the end of a ``find`` over a big tree): compact the inode table's maps and ask glibc
    to give its free pages back. Returns whether it did.

    Before, the mount kept its peak: 381 MiB after stat-ing a million files, with one
    node left (issue 19). A dict never shrinks on deletion (the nodes map of a million
    entries keeps ~40 MiB of table); glibc keeps freed memory unless trimmed; Python's
    small-object arenas (1 MiB each) go back only when wholly empty, and entries of the
    name caches, made all through the lookups, kept most of them. Measured with a mount
    of 1,000,000 empty files (1000 directories), RSS 50 MiB mounted, 433 MiB after
    stat-ing them all, then after ``drop_caches``: 394 MiB before the name caches were
    emptied here, 108-110 MiB since. What is left is arenas that a few other survivors
    keep (trio's and pyfuse3's objects of the moment): no trim can return those.
    """
    inodes = operations.inodes
    held = len(inodes.nodes)
    forgotten = inodes.peak - held
    if forgotten < RETURN_MEMORY_AFTER_NODES or forgotten * 4 < inodes.peak:
        return False
    inodes.compact()
    if forgotten >= CLEAR_NAMES_AFTER_NODES:
        # The name caches' entries, made all through the lookups, are each the last
        # tenant of many a small-object arena, which goes back only when empty (200,000
        # stats then the forgets: 123 MiB kept with them, 72-85 MiB without; 49 MiB
        # mounted). After a smaller drop they stay: the kernel looks those names up
        # again (a cold `ls -lR` of a 10,000-file tree), and decrypting each costs more.
        operations.tree.clear_name_caches()
    if _malloc_trim is not None:
        _malloc_trim(0)
    log.debug("returned memory: %d nodes held, %d forgotten since the peak", held, forgotten)
    return True


async def _return_memory(operations: Operations) -> None:
    """:func:`return_memory` every few seconds. It runs between requests (a trio task),
    so no handler sees the maps change under it. In-process, compacting and trimming
    after a million forgotten nodes took 7 ms (1 ms after 100,000), once per large drop."""
    while True:
        await trio.sleep(RETURN_MEMORY_SECONDS)
        return_memory(operations)


def memory_counts(operations: Operations) -> dict[str, int]:
    """How many entries each of the mount's per-file structures holds now.

    Every one of them must be bounded by what the kernel still knows (inodes it has
    not forgotten, handles it has not released) or by an explicit cap.
    """
    keys = operations.keys
    prefetcher = operations.prefetcher
    names = operations.tree.names
    return {
        "nodes": len(operations.inodes.nodes),
        "fresh_numbers": len(operations.inodes._fresh),
        "handles": len(operations._handles),
        "dir_handles": len(operations._dir_handles),
        "dir_ids": len(operations.tree._dir_ids),
        "warned": len(operations.tree._warned),
        "names": 0 if names is None else len(names._decrypted) + len(names._encrypted),
        "cached_keys": len(keys._cache),
        "pooled_keys": len(keys._pool),
        "read_buffer": len(operations._read_buffer),
        "prefetch_buffers": prefetcher._buffers,
    }


def memory_report(operations: Operations) -> str:
    """One log line: :func:`memory_counts`, whether the process is dumpable (it must not
    be: :func:`kmsfs.hardening.harden_process`), and Python's traced memory when tracing.

    Tracing is Python's own switch (``PYTHONTRACEMALLOC=N`` in the mount's environment;
    it slows the mount down): then the line also has the bytes traced now and at the
    peak, and the ten source lines holding the most. Counts, sizes and source lines
    only: nothing of a file's or a key's content.
    """
    counts = memory_counts(operations)
    text = " ".join(f"{name}={value}" for name, value in counts.items())
    text += f" dumpable={int(is_dumpable())}"
    if tracemalloc.is_tracing():
        current, peak = tracemalloc.get_traced_memory()
        text += f" traced={current} traced_peak={peak}"
        snapshot = tracemalloc.take_snapshot().filter_traces(
            [tracemalloc.Filter(False, tracemalloc.__file__)]
        )
        for stat in snapshot.statistics("lineno")[:10]:
            frame = stat.traceback[0]
            text += f"\n  {stat.size} B in {stat.count} blocks: {frame.filename}:{frame.lineno}"
    return text


async def _report_memory_on_signal(signals: AsyncIterator[int], operations: Operations) -> None:
    """SIGUSR1 logs :func:`memory_report` (for tests and for finding what memory holds)."""
    async for _ in signals:
        try:
            log.info("memory: %s", memory_report(operations))
        except Exception:  # a report must never end the mount
            log.exception("memory report")


def unmount(mountpoint: Path, *, lazy: bool = False) -> None:
    """fusermount3 -u (``lazy``: -uz, which also clears a dead mount that is busy)."""
    result = subprocess.run(
        ["fusermount3", "-uz" if lazy else "-u", str(mountpoint)],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        message = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else ""
        raise KmsfsError(f"cannot unmount {mountpoint}: {message or 'fusermount3 failed'}")


def _fuse_hint() -> str:
    """Why libfuse could not mount, when it is this user's access to /dev/fuse (libfuse
    opens it itself before it falls back to fusermount3, and gives up on EACCES)."""
    if os.geteuid() == 0 or os.access("/dev/fuse", os.R_OK | os.W_OK):
        return ""
    if not os.path.exists("/dev/fuse"):
        return " (there is no /dev/fuse: load the fuse module, or in a container pass the device)"
    return (
        " (this user cannot open /dev/fuse: mount as root, or make it usable by users, "
        "as Debian's default mode 0666 does)"
    )
