"""``kmsfs init|seal|mount|umount|ls|fsck``: the filesystem and its cipher directory."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from kmsfs.cli import progress
from kmsfs.cli.common import (
    DEFAULT_CHUNK_SIZE_CLI,
    KEYD_HINT_HELP,
    aws_options,
    key_service_options,
    keyd_options,
    non_negative_int,
    percent,
    print_json,
    print_record,
    print_table,
)
from kmsfs.errors import FormatError, UsageError


def cmd_ls(args: argparse.Namespace) -> None:
    from kmsfs.fs.offline import list_entries, open_tree

    _config, tree = open_tree(Path(args.cipherdir), service_options=key_service_options(args))
    entries = list_entries(tree, args.path or "", recursive=args.recursive)
    if not args.recursive:
        listed = list(entries)
    else:  # a big tree takes a while: a bar over the entries the backing tree holds
        from kmsfs.fs.offline import count_backing

        counts = count_backing(Path(args.cipherdir))
        total = None if args.path else counts.files + counts.directories + counts.symlinks
        with progress.bar(args, total=total, what="ls", unit="entries") as shown:
            listed = []
            for item in entries:
                listed.append(item)
                shown.update(1)
    if args.json:
        print_json([item.__dict__ for item in listed])
    else:
        print_table(
            [{"Kind": i.kind, "Path": i.path, "Backing": i.backing} for i in listed],
            ["Kind", "Path", "Backing"],
        )


_REPAIRED = "repaired: "


def cmd_fsck(args: argparse.Namespace) -> None:
    from kmsfs.errors import Truncated
    from kmsfs.format import repair, verify
    from kmsfs.fs.keyservice import resolve
    from kmsfs.fs.offline import count_backing, fsck, open_tree

    options = key_service_options(args)
    config, tree = open_tree(Path(args.cipherdir), service_options=options)
    provider = resolve(config, options).data_key_provider(recipient_keys=config.recipient_key_arns)

    def verify_file(backing: bytes) -> str | None:
        report = verify(backing, key_provider=provider, encryption_context=config.file_context)
        if report.ok:
            return None
        where = f"chunk {report.first_bad_chunk}: " if report.first_bad_chunk is not None else ""
        problem = f"{where}{report.error}"
        # what an interrupted write leaves at the end of a file, and nothing else
        interrupted = (
            isinstance(report.error, Truncated)
            or report.interrupted_append
            or report.interrupted_rewrite is not None
        )
        # a last chunk that fails: a torn write of data nobody fsync'd, or tampering
        torn_end = (
            report.first_bad_chunk is not None and report.first_bad_chunk == report.chunks - 1
        )
        if not args.repair or not (interrupted or (torn_end and args.force)):
            hint = "; --repair --force cuts it off" if torn_end and not interrupted else ""
            return problem + hint
        before = report.info.plaintext_size
        size = repair(
            backing, key_provider=provider, encryption_context=config.file_context, report=report
        )
        if report.interrupted_rewrite is not None:
            return (
                f"{_REPAIRED}chunk {report.interrupted_rewrite} put back from its copy, "
                f"{size} bytes ({problem})"
            )
        return (
            f"{_REPAIRED}cut back to its last consistent length, {size} bytes "
            f"(the backing file said {before}; {problem})"
        )

    checking = args.verify or args.repair
    total = count_backing(Path(args.cipherdir)).backing_bytes if checking else None
    files_by_key: dict[str, int] = {}
    with progress.bar(args, total=total, what="fsck", enabled=checking) as shown:

        def verify_with_progress(backing: bytes) -> str | None:
            if args.keys:
                _count_key(backing, files_by_key)
            if not checking:
                return None
            try:
                return verify_file(backing)
            finally:
                with contextlib.suppress(OSError):
                    shown.update(os.stat(backing).st_size)

        wanted = checking or args.keys
        problems = list(fsck(tree, verify_file=verify_with_progress if wanted else None))
    for key, count in sorted(files_by_key.items()):
        print(f"key {key}: {count} file(s)")
    for problem in problems:
        shown = f" ({problem.plain})" if problem.plain else ""
        print(f"{problem.backing}{shown}: {problem.problem}")
    left = [problem for problem in problems if not problem.problem.startswith(_REPAIRED)]
    if left:
        raise FormatError(f"{args.cipherdir}: {len(left)} problem(s) found")
    repaired = len(problems) - len(left)
    print(
        f"{args.cipherdir}: "
        + (f"{repaired} file(s) repaired, no other problems" if repaired else "no problems found")
        + (" (all files verified)" if checking else "")
    )


def _count_key(backing: bytes, files_by_key: dict[str, int]) -> None:
    """Count the file under the CMK (and, for keyd's blobs, the key version) its header's
    active slot names (read without a key, as ``kmsfs inspect`` shows it)."""
    from kmsfs.format import inspect
    from kmsfs.kms.datakeys import blob_key_version

    try:
        info = inspect(backing)
    except (OSError, FormatError):
        return  # fsck reports unreadable files itself (with --verify)
    if info.empty or info.wrapped_key is None:
        key = "- (empty files, no key)"
    else:
        named = blob_key_version(info.wrapped_key)
        key = f"{info.key_arn} version {named[1]}" if named else str(info.key_arn)
    files_by_key[key] = files_by_key.get(key, 0) + 1


def cmd_info(args: argparse.Namespace) -> None:
    """What ``gocryptfs -info`` shows, for a cipher directory: its settings as kmsfs.conf
    records them, the CMK's state in keyd (and whether the config is authentic), and what
    it holds. Without keyd it says so and still prints the rest."""
    print_info(
        args.cipherdir,
        args.keyd_socket,
        keyd_uid=args.keyd_uid,
        as_json=args.json,
        service_options=key_service_options(args),
    )


def print_info(
    cipherdir: str,
    keyd_socket: str | None,
    *,
    keyd_uid: str | None,
    as_json: bool,
    service_options: Any = None,
) -> None:
    from kmsfs.errors import KeydUnavailable, KMSError
    from kmsfs.fs.config import ConfigError, load_config
    from kmsfs.fs.keyservice import KeyServiceOptions, resolve
    from kmsfs.fs.offline import count_backing, describe_settings, unlock_config

    config = load_config(Path(cipherdir), allow_unsealed=True)
    record: dict[str, Any] = {"CipherDir": cipherdir}
    settings = dict(describe_settings(config))
    record["FormatVersion"] = config.format_version
    record["ConfigVersion"] = config.config_version
    record["ChunkSize"] = config.chunk_size
    record["KeyArn"] = config.key_arn
    key_state = authenticated = "not checked"
    options = service_options or KeyServiceOptions(keyd_socket=keyd_socket, keyd_uid=keyd_uid)
    service = None
    tampered: ConfigError | None = None
    try:
        service = resolve(config, options)
        with service.client() as client:
            try:
                key_state = client.describe_key(config.key_arn)["KeyMetadata"]["KeyState"]
            except KMSError as error:
                key_state = f"unknown ({error})"
            if not config.sealed:
                authenticated = "no: not sealed (kmsfs seal)"
            elif key_state != "Enabled":
                authenticated = "not checked (the key is not enabled)"
            else:
                try:
                    unlock_config(client, config)  # one audited Decrypt of the metadata key
                    authenticated = "yes"
                except ConfigError as error:
                    authenticated = "NO"
                    tampered = error
    except KeydUnavailable as error:
        if config.key_service is None:
            key_state = f"unknown (keyd unreachable: {error})"
            authenticated = "not checked (no keyd)"
        else:
            key_state = f"unknown (key service unreachable: {error})"
            authenticated = "not checked (no key service)"
    except UsageError as error:  # e.g. an endpoint kmsfs.conf names that you did not
        key_state = f"unknown ({error})"
        authenticated = "not checked"
    record["KeyState"] = key_state
    record["Authenticated"] = authenticated
    record["Names"] = settings["Names"]
    record["FilesystemId"] = config.filesystem_id
    record["Created"] = config.created or "-"
    record["KeydSocketHint"] = config.keyd_socket or "-"
    if config.key_service is not None:
        record["KeyService"] = (
            service.describe() if service is not None else json.dumps(config.key_service.document())
        )
    counts = count_backing(Path(cipherdir))
    record["Files"] = counts.files
    record["Directories"] = counts.directories
    record["Symlinks"] = counts.symlinks
    record["BackingBytes"] = counts.backing_bytes
    if as_json:
        print_json(record)
    else:
        print_record(record)
    if tampered is not None:
        raise tampered


# ------------------------------------------------------------------ the mount
def state_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "kmsfs"


def cmd_init(args: argparse.Namespace) -> None:
    from kmsfs.fs.mount import init_cipherdir

    config = init_cipherdir(
        Path(args.cipherdir),
        args.key,
        keyd_socket=args.keyd_socket,
        chunk_size=args.chunk_size,
        plaintext_names=args.plaintext_names,
        keyd_uid=args.keyd_uid,
        recipient_key=args.recipient_key,
        key_service_options=key_service_options(args),
    )
    print(f"initialised {args.cipherdir}: filesystem {config.filesystem_id}, key {config.key_arn}")
    if config.recipient_key is not None:
        print(
            f"files written with the public key of {config.recipient_key.key_arn} are accepted "
            "(kmsfs encrypt --public-key)"
        )


def cmd_seal(args: argparse.Namespace) -> None:
    """Seal a kmsfs.conf made before configs were authenticated, once its owner agrees."""
    from kmsfs.fs.offline import describe_settings, seal_cipherdir

    def confirm(config) -> bool:
        print(f"{args.cipherdir}/kmsfs.conf is not sealed. Its settings:")
        print_record(dict(describe_settings(config)))
        if config.plaintext_names:
            print(
                "WARNING: names are stored in plaintext. If you did not choose that, do not seal."
            )
        if args.yes:
            return True
        if not sys.stdin.isatty():
            raise UsageError("not sealed: check the settings above, then run again with --yes")
        return input("Are these the settings you chose? Seal them [y/N] ").strip().lower() in (
            "y",
            "yes",
        )

    config, sealed_now = seal_cipherdir(
        Path(args.cipherdir),
        args.keyd_socket,
        keyd_uid=args.keyd_uid,
        confirm=confirm,
        service_options=key_service_options(args),
    )
    if sealed_now:
        print(f"sealed {args.cipherdir}/kmsfs.conf (filesystem {config.filesystem_id})")
    else:
        print(f"{args.cipherdir}/kmsfs.conf is sealed and authentic; nothing to do")


def cmd_mount(args: argparse.Namespace) -> None:
    from kmsfs.background import start_detached
    from kmsfs.fs.fstab import apply_options, parse_options
    from kmsfs.fs.mount import MountOptions, check_mount, mount_foreground

    parsed = parse_options(args.options)  # mount(8)'s options and kmsfs's: see fstab.py
    options = MountOptions(
        foreground=args.foreground,
        keyd_socket=args.keyd_socket,
        keyd_uid=args.keyd_uid,
        aws_endpoint_url=args.aws_endpoint_url,
        aws_profile=args.aws_profile,
        aws_region=args.aws_region,
        debug=args.debug,
        key_cache_seconds=args.key_cache_seconds,
        nonempty=args.nonempty,
        idle_seconds=args.idle or None,
        forward_callers=args.forward_callers,
        audit_opens=args.audit_opens,
        audit_queue=args.audit_queue,
    )
    if args.busy_poll_us is not None:
        options.busy_poll_seconds = args.busy_poll_us / 1e6
    if args.max_dirty_ratio is not None:
        options.max_dirty_ratio = args.max_dirty_ratio
    apply_options(parsed, options)
    cipherdir, mountpoint = Path(args.cipherdir).resolve(), Path(args.mountpoint).resolve()
    if args.foreground:
        logging.basicConfig(
            level=logging.DEBUG if args.debug else logging.INFO,
            format="%(asctime)s kmsfs[%(process)d] %(levelname)s %(message)s",
        )
        mount_foreground(cipherdir, mountpoint, options, ready_fd=args.ready_fd)
        return
    if check_mount(cipherdir, mountpoint, options):
        print(f"created the mountpoint {mountpoint}")
    argv = [
        "mount",
        "-f",
        str(cipherdir),
        str(mountpoint),
        "--key-cache-seconds",
        str(args.key_cache_seconds),
    ]
    if args.forward_callers is not None:
        argv.append("--forward-callers" if args.forward_callers else "--no-forward-callers")
    if args.busy_poll_us is not None:
        argv += ["--busy-poll-us", str(args.busy_poll_us)]
    if args.max_dirty_ratio is not None:
        argv += ["--max-dirty-ratio", str(args.max_dirty_ratio)]
    for option in args.options or []:
        argv += ["-o", option]
    if args.keyd_socket:
        argv += ["--keyd-socket", args.keyd_socket]
    if args.keyd_uid:
        argv += ["--keyd-uid", args.keyd_uid]
    if args.aws_endpoint_url:
        argv += ["--aws-endpoint-url", args.aws_endpoint_url]
    if args.aws_profile:
        argv += ["--aws-profile", args.aws_profile]
    if args.aws_region:
        argv += ["--aws-region", args.aws_region]
    if args.debug:
        argv.append("--debug")
    if args.nonempty:
        argv.append("--nonempty")
    if args.idle:
        argv += ["--idle", repr(args.idle)]
    if args.audit_opens:
        argv += ["--audit-opens", "--audit-queue", str(args.audit_queue)]
    log_path = Path(options.log_file or args.log_file or state_dir() / "mount.log")
    pid = start_detached(argv, log_path, what="the mount")
    print(f"mounted {cipherdir} on {mountpoint} (pid {pid}, log: {log_path})")


def _duration(text: str) -> float:
    from kmsfs.fs.fstab import parse_duration

    try:
        return parse_duration(text)
    except UsageError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def cmd_umount(args: argparse.Namespace) -> None:
    from kmsfs.fs.mount import unmount

    unmount(Path(args.mountpoint), lazy=args.lazy)


# -------------------------------------------------------------------- parser
def add_parsers(commands: argparse._SubParsersAction) -> None:
    ls = commands.add_parser("ls", help="list a cipher directory's plaintext names, unmounted")
    ls.add_argument("cipherdir")
    ls.add_argument("path", nargs="?", help="a directory, as seen at the mountpoint")
    ls.add_argument("-R", "--recursive", action="store_true")
    keyd_options(ls, KEYD_HINT_HELP)
    aws_options(ls)
    ls.add_argument("--json", action="store_true")
    progress.add_progress_options(ls)
    ls.set_defaults(func=cmd_ls)

    fsck_parser = commands.add_parser("fsck", help="check a cipher directory, unmounted")
    fsck_parser.add_argument("cipherdir")
    fsck_parser.add_argument("--verify", action="store_true", help="also check every chunk")
    fsck_parser.add_argument(
        "--repair",
        action="store_true",
        help="verify, and bring back each file that an interrupted write left without a "
        "sound end (an interrupted rewrite in place, an interrupted append, a last chunk "
        "that is not final) to its last consistent state",
    )
    fsck_parser.add_argument(
        "--force",
        action="store_true",
        help="with --repair: also cut off a last chunk that fails authentication (a torn "
        "write of data that was never fsync'd, or tampering)",
    )
    fsck_parser.add_argument(
        "--keys",
        action="store_true",
        help="count the files under each CMK and key version (read from the headers, as "
        "kmsfs inspect shows them): after kmsfs rewrap no file is left under the old key",
    )
    keyd_options(fsck_parser, KEYD_HINT_HELP)
    aws_options(fsck_parser)
    progress.add_progress_options(fsck_parser)
    fsck_parser.set_defaults(func=cmd_fsck)
    info = commands.add_parser(
        "info", help="describe a cipher directory: settings, its key's state, file count"
    )
    info.add_argument("cipherdir")
    keyd_options(info, KEYD_HINT_HELP)
    aws_options(info)
    info.add_argument("--json", action="store_true", help="print JSON")
    info.set_defaults(func=cmd_info)

    init_fs = commands.add_parser("init", help="make an empty directory a cipher directory")
    init_fs.add_argument("cipherdir", help="where the ciphertext will live")
    init_fs.add_argument("--key", required=True, help="the CMK: key id, ARN or alias/NAME")
    keyd_options(
        init_fs,
        "keyd's socket (recorded in kmsfs.conf as a hint for later mounts; "
        "default: $KMSFS_KEYD_SOCKET, else ~/.config/kmsfs/config, else the default socket)",
    )
    aws_options(init_fs, init=True)
    init_fs.add_argument(
        "--chunk-size",
        type=int,
        default=DEFAULT_CHUNK_SIZE_CLI,
        help="plaintext bytes per chunk (a power of two)",
    )
    init_fs.add_argument(
        "--plaintext-names",
        action="store_true",
        help="leave file names and symlink targets unencrypted",
    )
    init_fs.add_argument(
        "--recipient-key",
        metavar="KEY",
        help="also accept files written with this RSA ENCRYPT_DECRYPT CMK's public key "
        "alone (write-only ingestion: kmsfs encrypt --public-key; needs --plaintext-names "
        "for files written into the directory)",
    )
    init_fs.set_defaults(func=cmd_init)

    seal = commands.add_parser(
        "seal", help="authenticate the settings of a kmsfs.conf made by an older kmsfs"
    )
    seal.add_argument("cipherdir")
    seal.add_argument("--yes", action="store_true", help="seal without asking")
    keyd_options(seal, KEYD_HINT_HELP)
    aws_options(seal)
    seal.set_defaults(func=cmd_seal)

    mount = commands.add_parser(
        "mount",
        help="mount a cipher directory",
        description="Mount a cipher directory; a missing mountpoint is created "
        "(as mount --mkdir does), a non-empty one refused unless --nonempty.",
    )
    mount.add_argument("cipherdir")
    mount.add_argument("mountpoint")
    mount.add_argument("-f", "--foreground", action="store_true", help="stay in the foreground")
    mount.add_argument(
        "-o",
        dest="options",
        action="append",
        metavar="OPTIONS",
        help="comma-separated, as mount(8) and /etc/fstab pass them: ro, rw, allow_other, "
        "nonempty, nosuid, nodev, noexec, noatime, sync, dirsync (and their opposites), "
        "keyd_socket=, keyd_uid=, aws_endpoint_url=, aws_profile=, aws_region=, "
        "audit_opens, key_cache_seconds=, idle=, busy_poll_us=, max_dirty_ratio=, "
        "audit_queue=, "
        "log_file=; _netdev, nofail, x-*, user, auto/noauto, defaults are ignored",
    )
    keyd_options(mount, KEYD_HINT_HELP)
    aws_options(mount)
    mount.add_argument("--debug", action="store_true", help="log debug messages")
    mount.add_argument(
        "--nonempty",
        action="store_true",
        help="mount over a directory that has files, hiding them while mounted "
        "(-o nonempty; refused otherwise)",
    )
    mount.add_argument(
        "--key-cache-seconds",
        type=float,
        default=60.0,
        help="keep a file's data key this long after its last close, and a forwarded "
        "user's answer from keyd this long after keyd gave it (60)",
    )
    mount.add_argument(
        "--forward-callers",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="make keyd calls (open, create, a new file's key) as the request's caller "
        "(keyd checks its key policy for that user, kms:ViaService=kmsfs-mount); default: "
        "on when root mounts on keyd with allow_other (without it nobody else can make "
        "requests). A non-root mount needs keyd serve --forwarders",
    )
    mount.add_argument(
        "--busy-poll-us",
        type=non_negative_int,
        metavar="US",
        help="after each request, keep polling for the next one this many microseconds "
        "before sleeping: faster small synchronous I/O for some CPU (0: never; default 1000)",
    )
    mount.add_argument(
        "--max-dirty-ratio",
        type=percent,
        metavar="PERCENT",
        help="share of the kernel's dirty-page limit this mount may hold before writers "
        "are throttled (kernel default for FUSE: 1; default 5; needs root)",
    )
    mount.add_argument(
        "--idle",
        type=_duration,
        metavar="DURATION",
        help="unmount after this long with no request and no open file, e.g. 30s, 10m, 1h "
        "(as gocryptfs -idle; -o idle=)",
    )
    mount.add_argument(
        "--audit-opens",
        action="store_true",
        help="record every open, create, unlink and rename (user, pid, executable, "
        "access mode, file id, outcome; no names) in keyd's audit log",
    )
    mount.add_argument(
        "--audit-queue",
        type=non_negative_int,
        default=100_000,
        metavar="N",
        help="with --audit-opens: events kept while keyd does not answer; beyond, they "
        "are counted and reported as a gap (100000)",
    )
    mount.add_argument("--log-file", help="log file when detached")
    mount.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
    mount.set_defaults(func=cmd_mount)

    umount = commands.add_parser("umount", help="unmount (like fusermount3 -u)")
    umount.add_argument("mountpoint")
    umount.add_argument(
        "-z",
        "--lazy",
        action="store_true",
        help="detach now, finish when no longer busy (fusermount3 -uz); clears a dead mount "
        "left by a killed mount process",
    )
    umount.set_defaults(func=cmd_umount)
