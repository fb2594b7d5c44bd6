"""The ``kmsfs`` command: parse, call, print.

Every failure ends as one line on stderr (``kmsfs: error: ...``) and a non-zero
exit status taken from the error's type (see ``kmsfs.errors``): 2 usage,
3 refused by the key service, 4 keyd unreachable, 5 keystore, 6 audit, 7 format.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import errno
import getpass
import json
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO

from kmsfs.errors import KeystoreError, KmsfsError, UsageError

PASSPHRASE_FILE_ENV = "KMSFS_PASSPHRASE_FILE"
DEFAULT_CHUNK_SIZE_CLI = 1 << 16  # kmsfs.format.DEFAULT_CHUNK_SIZE, without importing it


# --------------------------------------------------------------------- output
def _when(timestamp: float | None) -> str:
    if timestamp is None:
        return "-"
    return dt.datetime.fromtimestamp(timestamp, dt.UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def print_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> None:
    """Columns padded to their widest cell; a header line first."""
    cells = [[str(row.get(column, "")) for column in columns] for row in rows]
    widths = [
        max([len(column)] + [len(line[i]) for line in cells]) for i, column in enumerate(columns)
    ]
    for line in [list(columns)] + cells:
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        )


def print_json(value: Any) -> None:
    json.dump(value, sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")


def print_record(record: dict[str, Any]) -> None:
    width = max((len(name) for name in record), default=0)
    for name, value in record.items():
        if isinstance(value, list):
            value = ", ".join(str(item) for item in value) or "-"
        print(f"{name.ljust(width)}  {value}")


def parse_pairs(pairs: Iterable[str] | None, what: str) -> dict[str, str]:
    """``["k=v", ...]`` → dict; the value may contain '='."""
    result: dict[str, str] = {}
    for pair in pairs or []:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise UsageError(f"{what} must look like key=value, got {pair!r}")
        result[name] = value
    return result


# ---------------------------------------------------------------- passphrase
def _read_secret_file(path: str) -> bytes:
    from kmsfs.kms.keystore import read_passphrase_file

    return read_passphrase_file(path)


def root_key_source(args: argparse.Namespace, *, confirm: bool = False):
    """Root key file, passphrase fd/file/env, or a prompt — in that order."""
    from kmsfs.kms.keystore import RootKeySource

    if getattr(args, "root_key_file", None):
        return RootKeySource.from_key_file(args.root_key_file)
    if getattr(args, "passphrase_fd", None) is not None:
        with os.fdopen(args.passphrase_fd, "rb") as pipe:
            return RootKeySource.from_passphrase(pipe.read())
    path = getattr(args, "passphrase_file", None) or os.environ.get(PASSPHRASE_FILE_ENV)
    if path:
        return RootKeySource.from_passphrase(_read_secret_file(path))
    if not sys.stdin.isatty():
        raise UsageError(
            "no passphrase: give --passphrase-file, set KMSFS_PASSPHRASE_FILE, "
            "or use --root-key-file"
        )
    passphrase = getpass.getpass("keystore passphrase: ")
    if confirm and getpass.getpass("again: ") != passphrase:
        raise UsageError("the two passphrases differ")
    return RootKeySource.from_passphrase(passphrase)


# ---------------------------------------------------------------------- keyd
def cmd_keyd_init(args: argparse.Namespace) -> None:
    from kmsfs.kms.keystore import Keystore
    from kmsfs.kms.paths import resolve_keystore_dir

    path = resolve_keystore_dir(args.keystore)
    if Keystore.exists(path):
        raise KeystoreError(f"a keystore already exists at {path}")
    source = root_key_source(args, confirm=True)
    keystore = Keystore.create(path, source, region=args.region, account=args.account)
    keystore.close()
    how = f"root key file {source.key_file}" if source.key_file else "a passphrase"
    print(f"created keystore {path}, protected by {how}")


def cmd_keyd_serve(args: argparse.Namespace) -> None:
    from kmsfs.background import start_detached
    from kmsfs.kms.daemon import run_keyd
    from kmsfs.kms.paths import resolve_keystore_dir, resolve_socket_path

    keystore_dir = resolve_keystore_dir(args.keystore)
    socket_path = resolve_socket_path(args.socket)
    socket_mode = int(args.socket_mode, 8)
    if args.daemon:
        source = root_key_source(args)
        argv = [
            "keyd",
            "serve",
            "--keystore",
            str(keystore_dir),
            "--socket",
            str(socket_path),
            "--socket-mode",
            args.socket_mode,
        ]
        if source.key_file is not None:
            argv += ["--root-key-file", str(source.key_file)]
        log_path = keystore_dir / "keyd.log"
        pid = start_detached(argv, log_path, what="keyd", passphrase=source.passphrase)
        print(f"keyd running as pid {pid} on {socket_path} (log: {log_path})")
        return
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.INFO,
        format="%(asctime)s keyd[%(process)d] %(levelname)s %(message)s",
    )
    run_keyd(
        keystore_dir,
        root_key_source(args),
        socket_path,
        socket_mode=socket_mode,
        ready_fd=args.ready_fd,
    )


def cmd_keyd_stop(args: argparse.Namespace) -> None:
    """Ask the keyd on a socket to stop (SIGTERM to the socket's peer) and wait."""
    from kmsfs.errors import KeydUnavailable
    from kmsfs.kms.paths import resolve_socket_path
    from kmsfs.kms.trust import check_peer, check_socket_path, expected_keyd_uids, peer_credentials

    socket_path = resolve_socket_path(args.socket)
    # the same checks as every client: signal only a keyd run by us, root or the named
    # service account, found through a path nobody else controls
    expected = expected_keyd_uids()
    resolved = check_socket_path(socket_path, expected)
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(resolved))
        check_peer(probe, socket_path, expected)
        pid = peer_credentials(probe)[0]
    except OSError as exc:
        raise KeydUnavailable(f"no keyd on {socket_path}: {exc.strerror}") from None
    finally:
        probe.close()
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            print(f"keyd (pid {pid}) stopped")
            return
        time.sleep(0.05)
    raise KmsfsError(f"keyd (pid {pid}) did not stop within 10 s")


def cmd_audit_tail(args: argparse.Namespace) -> None:
    from kmsfs.kms import audit
    from kmsfs.kms.keystore import AUDIT_NAME
    from kmsfs.kms.paths import resolve_keystore_dir

    path = resolve_keystore_dir(args.keystore) / AUDIT_NAME
    if not path.exists() and not audit.rotated_files(path):
        raise KeystoreError(f"no audit log at {path}")
    events = audit.tail(path, args.lines, follow=args.follow, key=args.key, event_name=args.event)
    try:
        for event in events:
            if args.json:
                print(json.dumps(event, sort_keys=True), flush=True)
            else:
                print(audit.format_event_line(event), flush=True)
    except KeyboardInterrupt:
        pass


def cmd_audit_verify(args: argparse.Namespace) -> None:
    from kmsfs.errors import AuditTampered
    from kmsfs.kms import audit
    from kmsfs.kms.keystore import AUDIT_NAME
    from kmsfs.kms.paths import resolve_keystore_dir

    path = resolve_keystore_dir(args.keystore) / AUDIT_NAME
    if not path.exists() and not audit.rotated_files(path):
        raise KeystoreError(f"no audit log at {path}")
    report = audit.verify(path)
    if not report.ok:
        where = f" line {report.first_bad_line}:" if report.first_bad_line is not None else ""
        raise AuditTampered(
            f"audit log {report.file or path}:{where} {report.problem}",
            report.first_bad_line or 0,
        )
    files = f" in {report.files} files (rotated ones included)" if report.files > 1 else ""
    print(f"audit log {path}: {report.lines} lines{files}, chain intact")


# ---------------------------------------------------------------------- keys
def _client(args: argparse.Namespace):
    from kmsfs.kms.client import KMSClient

    return KMSClient(args.keyd_socket)


def _all_pages(client, operation: str, params: dict[str, Any], field: str) -> list[Any]:
    items: list[Any] = []
    marker = None
    while True:
        page = client.call(operation, {**params, **({"Marker": marker} if marker else {})})
        items += page.get(field, [])
        marker = page.get("NextMarker")
        if not page.get("Truncated") or not marker:
            return items


def _key_row(metadata: dict[str, Any], aliases: list[str]) -> dict[str, Any]:
    return {
        "KeyId": metadata["KeyId"],
        "State": metadata["KeyState"],
        "Aliases": ",".join(aliases) or "-",
        "Created": _when(metadata.get("CreationDate")),
        "Description": metadata.get("Description") or "",
    }


def cmd_keys_create(args: argparse.Namespace) -> None:
    tags = [{"TagKey": k, "TagValue": v} for k, v in parse_pairs(args.tag, "--tag").items()]
    params: dict[str, Any] = {"Description": args.description or ""}
    if tags:
        params["Tags"] = tags
    with _client(args) as client:
        metadata = client.call("CreateKey", params)["KeyMetadata"]
        if args.alias:
            client.call("CreateAlias", {"AliasName": args.alias, "TargetKeyId": metadata["KeyId"]})
    if args.json:
        print_json({"KeyMetadata": metadata, "Alias": args.alias})
    else:
        print_record(
            {
                "KeyId": metadata["KeyId"],
                "Arn": metadata["Arn"],
                "Alias": args.alias or "-",
                "State": metadata["KeyState"],
            }
        )


def cmd_keys_list(args: argparse.Namespace) -> None:
    with _client(args) as client:
        keys = _all_pages(client, "ListKeys", {}, "Keys")
        aliases = _all_pages(client, "ListAliases", {}, "Aliases")
        described = [client.call("DescribeKey", {"KeyId": k["KeyId"]})["KeyMetadata"] for k in keys]
    by_key: dict[str, list[str]] = {}
    for alias in aliases:
        by_key.setdefault(alias.get("TargetKeyId", ""), []).append(alias["AliasName"])
    if args.json:
        print_json([{**m, "Aliases": by_key.get(m["KeyId"], [])} for m in described])
        return
    rows = [_key_row(m, by_key.get(m["KeyId"], [])) for m in described]
    print_table(rows, ["KeyId", "State", "Aliases", "Created", "Description"])


def cmd_keys_describe(args: argparse.Namespace) -> None:
    with _client(args) as client:
        metadata = client.call("DescribeKey", {"KeyId": args.key})["KeyMetadata"]
        rotation = None
        if metadata["KeyState"] != "PendingDeletion":
            rotation = client.call("GetKeyRotationStatus", {"KeyId": metadata["KeyId"]})
        aliases = _all_pages(client, "ListAliases", {"KeyId": metadata["KeyId"]}, "Aliases")
        tags = _all_pages(client, "ListResourceTags", {"KeyId": metadata["KeyId"]}, "Tags")
    if args.json:
        print_json(
            {
                "KeyMetadata": metadata,
                "Rotation": rotation,
                "Aliases": [a["AliasName"] for a in aliases],
                "Tags": tags,
            }
        )
        return
    record: dict[str, Any] = {
        "KeyId": metadata["KeyId"],
        "Arn": metadata["Arn"],
        "State": metadata["KeyState"],
        "Description": metadata.get("Description") or "-",
        "KeySpec": metadata["KeySpec"],
        "KeyUsage": metadata["KeyUsage"],
        "Created": _when(metadata.get("CreationDate")),
        "Aliases": [a["AliasName"] for a in aliases],
        "Tags": [f"{t['TagKey']}={t['TagValue']}" for t in tags],
    }
    if metadata.get("DeletionDate"):
        record["DeletionDate"] = _when(metadata["DeletionDate"])
    if rotation is not None:
        record["Rotation"] = (
            f"every {rotation['RotationPeriodInDays']} days, next "
            f"{_when(rotation.get('NextRotationDate'))}"
            if rotation["KeyRotationEnabled"]
            else "off"
        )
    print_record(record)


def _simple(operation: str, done: str) -> Callable[[argparse.Namespace], None]:
    """A keys subcommand that sends one KeyId-only request and prints what it did."""

    def command(args: argparse.Namespace) -> None:
        with _client(args) as client:
            response = client.call(operation, {"KeyId": args.key})
        if args.json:
            print_json(response)
        else:
            print(f"{args.key}: {done}")

    return command


def cmd_keys_schedule_deletion(args: argparse.Namespace) -> None:
    with _client(args) as client:
        response = client.call(
            "ScheduleKeyDeletion", {"KeyId": args.key, "PendingWindowInDays": args.days}
        )
    if args.json:
        print_json(response)
    else:
        print(
            f"{response['KeyId']}: pending deletion, destroyed at {_when(response['DeletionDate'])}"
        )


def cmd_keys_rotation(args: argparse.Namespace) -> None:
    with _client(args) as client:
        if args.action == "enable":
            params: dict[str, Any] = {"KeyId": args.key}
            if args.days:
                params["RotationPeriodInDays"] = args.days
            client.call("EnableKeyRotation", params)
        elif args.action == "disable":
            client.call("DisableKeyRotation", {"KeyId": args.key})
        status = client.call("GetKeyRotationStatus", {"KeyId": args.key})
        rotations = _all_pages(client, "ListKeyRotations", {"KeyId": args.key}, "Rotations")
    if args.json:
        print_json({**status, "Rotations": rotations})
        return
    print_record(
        {
            "KeyId": status["KeyId"],
            "AutomaticRotation": "on" if status["KeyRotationEnabled"] else "off",
            "PeriodDays": status.get("RotationPeriodInDays", "-"),
            "NextRotation": _when(status.get("NextRotationDate")),
            "Rotations": len(rotations),
        }
    )
    if rotations:
        print()
        print_table(
            [{"Date": _when(r["RotationDate"]), "Type": r["RotationType"]} for r in rotations],
            ["Date", "Type"],
        )


def _read_stdin_limited(limit: int, what: str) -> bytes:
    data = sys.stdin.buffer.read(limit + 1)
    if len(data) > limit:
        raise UsageError(f"{what} is larger than {limit} bytes")
    if not data:
        raise UsageError(f"{what} is empty")
    return data


def cmd_keys_encrypt(args: argparse.Namespace) -> None:
    from kmsfs.kms.service import MAX_PLAINTEXT

    plaintext = _read_stdin_limited(MAX_PLAINTEXT, "the plaintext on standard input")
    context = parse_pairs(args.context, "--context")
    with _client(args) as client:
        response = client.encrypt(args.key, plaintext, encryption_context=context)
    sys.stdout.buffer.write(response["CiphertextBlob"])
    sys.stdout.buffer.flush()


def cmd_keys_decrypt(args: argparse.Namespace) -> None:
    from kmsfs.kms.service import MAX_CIPHERTEXT

    blob = _read_stdin_limited(MAX_CIPHERTEXT, "the ciphertext on standard input")
    context = parse_pairs(args.context, "--context")
    with _client(args) as client:
        response = client.decrypt(blob, encryption_context=context, key_id=args.key)
    sys.stdout.buffer.write(response["Plaintext"])
    sys.stdout.buffer.flush()


def cmd_alias(args: argparse.Namespace) -> None:
    with _client(args) as client:
        if args.action == "list":
            aliases = _all_pages(client, "ListAliases", {}, "Aliases")
            if args.json:
                print_json(aliases)
            else:
                print_table(aliases, ["AliasName", "TargetKeyId"])
            return
        if args.action in ("create", "update"):
            if not args.key:
                raise UsageError(f"alias {args.action} needs --key")
            operation = "CreateAlias" if args.action == "create" else "UpdateAlias"
            client.call(operation, {"AliasName": args.name, "TargetKeyId": args.key})
        else:
            client.call("DeleteAlias", {"AliasName": args.name})
    print(f"{args.name}: {args.action}d")


def cmd_tags(args: argparse.Namespace) -> None:
    with _client(args) as client:
        if args.action == "add":
            pairs = parse_pairs(args.pairs, "a tag")
            tags = [{"TagKey": k, "TagValue": v} for k, v in pairs.items()]
            client.call("TagResource", {"KeyId": args.key, "Tags": tags})
        elif args.action == "remove":
            client.call("UntagResource", {"KeyId": args.key, "TagKeys": args.pairs})
        tags = _all_pages(client, "ListResourceTags", {"KeyId": args.key}, "Tags")
    if args.json:
        print_json(tags)
    else:
        print_table(tags, ["TagKey", "TagValue"])


# ------------------------------------------------------------ single files
@contextlib.contextmanager
def _input(path: str) -> Iterator[BinaryIO]:
    if path == "-":
        yield sys.stdin.buffer
        return
    try:
        stream = open(path, "rb")  # noqa: SIM115
    except OSError as error:
        raise UsageError(f"cannot read {path}: {error.strerror}") from None
    with stream:
        yield stream


_PART_SUFFIX = ".kmsfs-part"


@contextlib.contextmanager
def _output(path: str) -> Iterator[BinaryIO]:
    """stdout for '-', else a new file that appears as ``path`` only when complete.

    The content goes to an unnamed file (O_TMPFILE) that is linked in at the end, so a
    killed command leaves no plaintext behind. Where the filesystem has no O_TMPFILE it goes
    to ``.NAME.PID.kmsfs-part``; such files of processes that are gone are removed on the
    next run for the same name.
    """
    if path == "-":
        yield sys.stdout.buffer
        sys.stdout.buffer.flush()
        return
    target = Path(path)
    if target.is_dir():  # refused before any work, not after the whole input
        raise UsageError(f"cannot write {path}: it is a directory")
    directory = target.parent
    mode = 0o666 & ~_umask()
    temporary: Path | None = None
    try:
        try:
            fd = os.open(directory, os.O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC, mode)
        except OSError as error:
            if error.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                raise
            _remove_dead_parts(target)
            temporary = directory / f".{target.name}.{os.getpid()}{_PART_SUFFIX}"
            fd = os.open(temporary, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC, 0o600)
    except OSError as error:
        raise UsageError(f"cannot write {path}: {error.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as stream:
            yield stream
            stream.flush()
            os.fsync(stream.fileno())
            if temporary is None:
                temporary = _link_unnamed(stream.fileno(), target)
        if temporary is not None:
            os.chmod(temporary, mode)
            os.replace(temporary, target)
    except BaseException as error:
        if temporary is not None:
            temporary.unlink(missing_ok=True)
        if isinstance(error, OSError):  # e.g. a full disk, or the name taken meanwhile
            raise UsageError(f"cannot write {path}: {error.strerror}") from None
        raise


def _link_unnamed(fd: int, target: Path) -> Path | None:
    """Give the O_TMPFILE ``fd`` the name ``target``, or a temporary name beside it when
    ``target`` exists (returned: the caller renames it over ``target``)."""
    source = f"/proc/self/fd/{fd}"
    # a directory fd makes os.link call linkat (AT_SYMLINK_FOLLOW), not link()
    directory = os.open(target.parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        try:
            os.link(source, target.name, dst_dir_fd=directory, follow_symlinks=True)
            return None
        except FileExistsError:
            temporary = target.parent / f".{target.name}.{os.getpid()}{_PART_SUFFIX}"
            temporary.unlink(missing_ok=True)
            os.link(source, temporary.name, dst_dir_fd=directory, follow_symlinks=True)
            return temporary
    finally:
        os.close(directory)


def _remove_dead_parts(target: Path) -> None:
    """Remove ``.NAME.PID.kmsfs-part`` files beside ``target`` whose process is gone."""
    prefix = f".{target.name}."
    for entry in os.scandir(target.parent):
        name = entry.name
        if not (name.startswith(prefix) and name.endswith(_PART_SUFFIX)):
            continue
        pid = name[len(prefix) : -len(_PART_SUFFIX)]
        if pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
            Path(entry.path).unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def cmd_encrypt(args: argparse.Namespace) -> None:
    from kmsfs.format import encrypt_stream
    from kmsfs.kms.datakeys import KeydDataKeyProvider

    context = parse_pairs(args.context, "--context")
    with _input(args.src) as src, _output(args.dst) as dst:
        encrypt_stream(
            src,
            dst,
            key_provider=KeydDataKeyProvider(args.keyd_socket),
            key_id=args.key,
            encryption_context=context,
            chunk_size=args.chunk_size,
        )


def cmd_decrypt(args: argparse.Namespace) -> None:
    from kmsfs.format import decrypt_stream
    from kmsfs.kms.datakeys import KeydDataKeyProvider

    context = parse_pairs(args.context, "--context")
    source = args.src
    if args.cipherdir:
        from kmsfs.fs.config import keyd_endpoint
        from kmsfs.fs.offline import open_tree

        config, tree = open_tree(Path(args.cipherdir), args.keyd_socket)
        source = os.fsdecode(tree.resolve(args.src))
        context = {**config.file_context, **context}
        keyd_socket = str(keyd_endpoint(args.keyd_socket, config))
    else:
        keyd_socket = args.keyd_socket
    with _input(source) as src, _output(args.dst) as dst:
        decrypt_stream(
            src, dst, key_provider=KeydDataKeyProvider(keyd_socket), encryption_context=context
        )


def cmd_inspect(args: argparse.Namespace) -> None:
    from kmsfs.errors import FormatError
    from kmsfs.format import inspect, verify
    from kmsfs.kms.datakeys import KeydDataKeyProvider, blob_key_version

    try:
        info = inspect(args.file)
    except FileNotFoundError:
        raise UsageError(f"{args.file} does not exist") from None
    except OSError as error:  # a directory, no permission, an I/O error
        raise UsageError(f"cannot read {args.file}: {error.strerror}") from None
    named = blob_key_version(info.wrapped_key) if info.wrapped_key else None
    record: dict[str, Any] = {
        "File": args.file,
        "FormatVersion": info.format_version if not info.empty else "- (empty file, no header)",
        "ChunkSize": info.chunk_size,
        "FileId": info.file_id,
        "KeyArn": info.key_arn,
        "KeyVersion": named[1] if named else "-",
        "EncryptionContext": ", ".join(f"{k}={v}" for k, v in info.encryption_context.items())
        or "-",
        "PlaintextSize": info.plaintext_size,
        "CiphertextSize": info.ciphertext_size,
    }
    if info.size_problem:
        record["SizeProblem"] = info.size_problem
    report = None
    if args.verify:
        try:
            report = verify(
                args.file,
                key_provider=KeydDataKeyProvider(args.keyd_socket),
                encryption_context=parse_pairs(args.context, "--context"),
            )
        except OSError as error:  # e.g. removed or made unreadable since inspect()
            raise UsageError(f"cannot read {args.file}: {error.strerror}") from None
        record["Chunks"] = report.chunks
        record["Verified"] = "ok" if report.ok else "FAILED"
        for warning in report.warnings:
            record.setdefault("Warnings", []).append(warning)
    if args.json:
        print_json(record)
    else:
        print_record({k: ("-" if v is None else v) for k, v in record.items()})
    if report is not None and not report.ok:
        assert report.error is not None
        where = ""
        if report.first_bad_chunk is not None:
            where = (
                f"chunk {report.first_bad_chunk} (plaintext offset "
                f"{report.first_bad_plaintext_offset}, ciphertext offset "
                f"{report.first_bad_cipher_offset}); {report.bad_chunks} bad chunk(s); "
                f"the first {report.authentic_size} bytes are authentic: "
            )
        error = FormatError(f"{args.file}: {where}{report.error}")
        raise error


def cmd_ls(args: argparse.Namespace) -> None:
    from kmsfs.fs.offline import list_entries, open_tree

    _config, tree = open_tree(Path(args.cipherdir), args.keyd_socket)
    listed = list(list_entries(tree, args.path or "", recursive=args.recursive))
    if args.json:
        print_json([item.__dict__ for item in listed])
    else:
        print_table(
            [{"Kind": i.kind, "Path": i.path, "Backing": i.backing} for i in listed],
            ["Kind", "Path", "Backing"],
        )


_REPAIRED = "repaired: "


def cmd_fsck(args: argparse.Namespace) -> None:
    from kmsfs.errors import FormatError, Truncated
    from kmsfs.format import repair, verify
    from kmsfs.fs.config import keyd_endpoint
    from kmsfs.fs.offline import fsck, open_tree
    from kmsfs.kms.datakeys import KeydDataKeyProvider

    config, tree = open_tree(Path(args.cipherdir), args.keyd_socket)
    provider = KeydDataKeyProvider(str(keyd_endpoint(args.keyd_socket, config)))

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
    problems = list(fsck(tree, verify_file=verify_file if checking else None))
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


# ------------------------------------------------------------------ the mount
def _state_dir() -> Path:
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
    )
    print(f"initialised {args.cipherdir}: filesystem {config.filesystem_id}, key {config.key_arn}")


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
        Path(args.cipherdir), args.keyd_socket, keyd_uid=args.keyd_uid, confirm=confirm
    )
    if sealed_now:
        print(f"sealed {args.cipherdir}/kmsfs.conf (filesystem {config.filesystem_id})")
    else:
        print(f"{args.cipherdir}/kmsfs.conf is sealed and authentic; nothing to do")


def _parse_mount_options(values: list[str] | None) -> tuple[bool, bool]:
    read_only = allow_other = False
    for value in values or []:
        for option in value.split(","):
            if option == "ro":
                read_only = True
            elif option == "rw":
                read_only = False
            elif option == "allow_other":
                allow_other = True
            elif option:
                raise UsageError(f"unknown mount option {option!r} (known: ro, rw, allow_other)")
    return read_only, allow_other


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"cannot be negative: {value}")
    return value


def _percent(text: str) -> int:
    value = _non_negative_int(text)
    if not 1 <= value <= 100:
        raise argparse.ArgumentTypeError(f"must be from 1 to 100: {value}")
    return value


def cmd_mount(args: argparse.Namespace) -> None:
    from kmsfs.background import start_detached
    from kmsfs.fs.mount import MountOptions, check_mountpoint, mount_foreground

    read_only, allow_other = _parse_mount_options(args.options)
    options = MountOptions(
        foreground=args.foreground,
        read_only=read_only,
        allow_other=allow_other,
        keyd_socket=args.keyd_socket,
        keyd_uid=args.keyd_uid,
        debug=args.debug,
        key_cache_seconds=args.key_cache_seconds,
    )
    if args.busy_poll_us is not None:
        options.busy_poll_seconds = args.busy_poll_us / 1e6
    if args.max_dirty_ratio is not None:
        options.max_dirty_ratio = args.max_dirty_ratio
    cipherdir, mountpoint = Path(args.cipherdir).resolve(), Path(args.mountpoint).resolve()
    if args.foreground:
        logging.basicConfig(
            level=logging.DEBUG if args.debug else logging.INFO,
            format="%(asctime)s kmsfs[%(process)d] %(levelname)s %(message)s",
        )
        mount_foreground(cipherdir, mountpoint, options, ready_fd=args.ready_fd)
        return
    check_mountpoint(mountpoint)
    argv = [
        "mount",
        "-f",
        str(cipherdir),
        str(mountpoint),
        "--key-cache-seconds",
        str(args.key_cache_seconds),
    ]
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
    if args.debug:
        argv.append("--debug")
    log_path = Path(args.log_file) if args.log_file else _state_dir() / "mount.log"
    pid = start_detached(argv, log_path, what="the mount")
    print(f"mounted {cipherdir} on {mountpoint} (pid {pid}, log: {log_path})")


def cmd_umount(args: argparse.Namespace) -> None:
    from kmsfs.fs.mount import unmount

    unmount(Path(args.mountpoint))


# -------------------------------------------------------------------- parser
def _keystore_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--keystore",
        help="keystore directory (default: $KMSFS_KEYSTORE or $XDG_DATA_HOME/kmsfs/keystore)",
    )


def _root_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--root-key-file", help="protect/unseal with this 0600 key file")
    group.add_argument(
        "--passphrase-file",
        help=f"read the passphrase from this file (or set {PASSPHRASE_FILE_ENV})",
    )
    group.add_argument("--passphrase-fd", type=int, help=argparse.SUPPRESS)


def _context_option(parser: argparse.ArgumentParser, help_text: str) -> None:
    parser.add_argument("--context", action="append", metavar="KEY=VALUE", help=help_text)


KEYD_HINT_HELP = (
    "keyd's socket (default: $KMSFS_KEYD_SOCKET, else the per-user default if it exists, "
    "else the hint in kmsfs.conf; whichever it is must pass the ownership checks)"
)


def _keyd_options(
    parser: argparse.ArgumentParser,
    socket_help: str = "keyd's socket (default: $KMSFS_KEYD_SOCKET or the per-user default)",
) -> None:
    parser.add_argument("--keyd-socket", help=socket_help)
    parser.add_argument(
        "--keyd-uid",
        metavar="USER",
        help="also trust a keyd run by this user (a system keyd's service account; "
        "default: $KMSFS_KEYD_UID). Otherwise only one run by you or root is trusted",
    )


def _export_keyd_uid(args: argparse.Namespace) -> None:
    """--keyd-uid reaches every client of this process (and a detached mount) as the
    environment variable the clients read."""
    value = getattr(args, "keyd_uid", None)
    if value:
        from kmsfs.kms.trust import KEYD_UID_ENV, named_keyd_uids

        named_keyd_uids(value)  # an unknown user is a usage error, now
        os.environ[KEYD_UID_ENV] = value


def _client_options(parser: argparse.ArgumentParser) -> None:
    _keyd_options(parser)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kmsfs", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    # single files, offline
    encrypt_file = commands.add_parser("encrypt", help="encrypt a file or a pipe (- for stdio)")
    encrypt_file.add_argument("src")
    encrypt_file.add_argument("dst")
    encrypt_file.add_argument("--key", required=True, help="key id, ARN or alias/NAME")
    _context_option(encrypt_file, "encryption context pair (repeatable)")
    encrypt_file.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE_CLI)
    _keyd_options(encrypt_file)
    encrypt_file.set_defaults(func=cmd_encrypt)

    decrypt_file = commands.add_parser("decrypt", help="decrypt a file or a pipe (- for stdio)")
    decrypt_file.add_argument("src")
    decrypt_file.add_argument("dst")
    _context_option(decrypt_file, "require this encryption context pair")
    _keyd_options(decrypt_file)
    decrypt_file.add_argument(
        "--cipherdir",
        help="SRC is a path inside this cipher directory as seen at the mountpoint",
    )
    decrypt_file.set_defaults(func=cmd_decrypt)

    ls = commands.add_parser("ls", help="list a cipher directory's plaintext names, unmounted")
    ls.add_argument("cipherdir")
    ls.add_argument("path", nargs="?", help="a directory, as seen at the mountpoint")
    ls.add_argument("-R", "--recursive", action="store_true")
    _keyd_options(ls, KEYD_HINT_HELP)
    ls.add_argument("--json", action="store_true")
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
    _keyd_options(fsck_parser, KEYD_HINT_HELP)
    fsck_parser.set_defaults(func=cmd_fsck)

    inspect_file = commands.add_parser("inspect", help="show a ciphertext file's header")
    inspect_file.add_argument("file")
    inspect_file.add_argument(
        "--verify", action="store_true", help="authenticate every chunk (needs keyd)"
    )
    _context_option(inspect_file, "require this encryption context pair")
    _keyd_options(inspect_file)
    inspect_file.add_argument("--json", action="store_true", help="print JSON")
    inspect_file.set_defaults(func=cmd_inspect)

    # the filesystem
    init_fs = commands.add_parser("init", help="make an empty directory a cipher directory")
    init_fs.add_argument("cipherdir", help="where the ciphertext will live")
    init_fs.add_argument("--key", required=True, help="the CMK: key id, ARN or alias/NAME")
    _keyd_options(
        init_fs,
        "keyd's socket (recorded in kmsfs.conf as a hint for later mounts; "
        "default: $KMSFS_KEYD_SOCKET or the per-user default)",
    )
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
    init_fs.set_defaults(func=cmd_init)

    seal = commands.add_parser(
        "seal", help="authenticate the settings of a kmsfs.conf made by an older kmsfs"
    )
    seal.add_argument("cipherdir")
    seal.add_argument("--yes", action="store_true", help="seal without asking")
    _keyd_options(seal, KEYD_HINT_HELP)
    seal.set_defaults(func=cmd_seal)

    mount = commands.add_parser("mount", help="mount a cipher directory")
    mount.add_argument("cipherdir")
    mount.add_argument("mountpoint")
    mount.add_argument("-f", "--foreground", action="store_true", help="stay in the foreground")
    mount.add_argument(
        "-o",
        dest="options",
        action="append",
        metavar="OPTIONS",
        help="ro, rw, allow_other (comma-separated)",
    )
    _keyd_options(mount, KEYD_HINT_HELP)
    mount.add_argument("--debug", action="store_true", help="log debug messages")
    mount.add_argument(
        "--key-cache-seconds",
        type=float,
        default=60.0,
        help="keep a file's data key this long after its last close (60)",
    )
    mount.add_argument(
        "--busy-poll-us",
        type=_non_negative_int,
        metavar="US",
        help="after each request, keep polling for the next one this many microseconds "
        "before sleeping: faster small synchronous I/O for some CPU (0: never; default 1000)",
    )
    mount.add_argument(
        "--max-dirty-ratio",
        type=_percent,
        metavar="PERCENT",
        help="share of the kernel's dirty-page limit this mount may hold before writers "
        "are throttled (kernel default for FUSE: 1; default 5; needs root)",
    )
    mount.add_argument("--log-file", help="log file when detached")
    mount.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
    mount.set_defaults(func=cmd_mount)

    umount = commands.add_parser("umount", help="unmount (like fusermount3 -u)")
    umount.add_argument("mountpoint")
    umount.set_defaults(func=cmd_umount)

    # keyd
    keyd = commands.add_parser("keyd", help="the local key daemon").add_subparsers(
        dest="keyd_command", required=True, metavar="SUBCOMMAND"
    )
    init = keyd.add_parser("init", help="create a new keystore")
    _keystore_options(init)
    _root_options(init)
    init.add_argument("--region", default="local", help="region used in key ARNs")
    init.add_argument("--account", default="000000000000", help="account used in key ARNs")
    init.set_defaults(func=cmd_keyd_init)

    serve_parser = keyd.add_parser("serve", help="unseal the keystore and serve on a socket")
    _keystore_options(serve_parser)
    _root_options(serve_parser)
    serve_parser.add_argument("--socket", help="socket path (default: per-user or /run/kmsfs)")
    serve_parser.add_argument("--socket-mode", default="0600", help="socket file mode (octal)")
    serve_parser.add_argument("-d", "--daemon", action="store_true", help="detach")
    serve_parser.add_argument("--debug", action="store_true", help="log debug messages")
    serve_parser.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
    serve_parser.set_defaults(func=cmd_keyd_serve)

    stop = keyd.add_parser("stop", help="stop the keyd serving on a socket")
    stop.add_argument("--socket", help="socket path")
    stop.set_defaults(func=cmd_keyd_stop)

    audit_parser = keyd.add_parser("audit", help="read and verify the audit log")
    audit_commands = audit_parser.add_subparsers(dest="audit_command", required=True)
    tail = audit_commands.add_parser("tail", help="show the last events")
    _keystore_options(tail)
    tail.add_argument("-n", "--lines", type=int, default=20, help="how many events")
    tail.add_argument("-f", "--follow", action="store_true", help="keep printing new events")
    tail.add_argument("--key", help="only events about this key (id, ARN or alias)")
    tail.add_argument("--event", help="only events of this name (e.g. Decrypt)")
    tail.add_argument("--json", action="store_true", help="print JSON lines")
    tail.set_defaults(func=cmd_audit_tail)
    verify = audit_commands.add_parser("verify", help="check the log's hash chain")
    _keystore_options(verify)
    verify.set_defaults(func=cmd_audit_verify)

    # keys
    keys = commands.add_parser("keys", help="manage and use keys in keyd").add_subparsers(
        dest="keys_command", required=True, metavar="SUBCOMMAND"
    )

    def key_command(
        name: str,
        help_text: str,
        func: Callable[[argparse.Namespace], None],
        *,
        positional_key: bool = True,
    ) -> argparse.ArgumentParser:
        sub = keys.add_parser(name, help=help_text)
        _client_options(sub)
        if positional_key:
            sub.add_argument("key", help="key id, key ARN or alias/NAME")
        sub.set_defaults(func=func)
        return sub

    create = key_command("create", "create a key", cmd_keys_create, positional_key=False)
    create.add_argument("--alias", help="also create this alias (alias/NAME)")
    create.add_argument("--description", default="", help="free text")
    create.add_argument("--tag", action="append", metavar="KEY=VALUE", help="add a tag")
    key_command("list", "list keys", cmd_keys_list, positional_key=False)
    key_command("describe", "show one key", cmd_keys_describe)
    key_command("enable", "enable a key", _simple("EnableKey", "enabled"))
    key_command("disable", "disable a key", _simple("DisableKey", "disabled"))
    key_command("rotate", "rotate now (new key version)", _simple("RotateKeyOnDemand", "rotated"))
    rotation = key_command(
        "rotation", "automatic rotation: status/enable/disable", cmd_keys_rotation
    )
    rotation.add_argument(
        "action", nargs="?", default="status", choices=["status", "enable", "disable"]
    )
    rotation.add_argument("--days", type=int, help="rotation period (90-2560)")
    schedule = key_command(
        "schedule-deletion", "destroy after a waiting period", cmd_keys_schedule_deletion
    )
    schedule.add_argument("--days", type=int, default=30, help="waiting period, 7-30 (30)")
    key_command(
        "cancel-deletion",
        "cancel a scheduled deletion (key stays disabled)",
        _simple("CancelKeyDeletion", "deletion cancelled, key is Disabled"),
    )
    encrypt = key_command(
        "encrypt", "encrypt stdin (<= 4096 bytes) to stdout", cmd_keys_encrypt, positional_key=False
    )
    encrypt.add_argument("--key", required=True, help="key id, ARN or alias")
    _context_option(encrypt, "encryption context pair (repeatable)")
    decrypt = key_command(
        "decrypt", "decrypt stdin to stdout", cmd_keys_decrypt, positional_key=False
    )
    decrypt.add_argument("--key", help="require this key")
    _context_option(decrypt, "encryption context pair (repeatable)")
    alias = keys.add_parser("alias", help="create/update/delete/list aliases")
    _client_options(alias)
    alias.add_argument("action", choices=["create", "update", "delete", "list"])
    alias.add_argument("name", nargs="?", help="alias/NAME")
    alias.add_argument("--key", help="target key id or ARN")
    alias.set_defaults(func=cmd_alias)
    tags = key_command("tags", "list/add/remove tags", cmd_tags)
    tags.add_argument("action", nargs="?", default="list", choices=["list", "add", "remove"])
    tags.add_argument("pairs", nargs="*", help="KEY=VALUE to add, or KEY to remove")
    return parser


def _leaf_errors(group: BaseExceptionGroup) -> Iterator[BaseException]:
    for error in group.exceptions:
        if isinstance(error, BaseExceptionGroup):
            yield from _leaf_errors(error)
        else:
            yield error


def main(argv: Sequence[str] | None = None) -> int:
    # Library warnings are for daemons' logs; a command reports through its own output.
    logging.getLogger("kmsfs").addHandler(logging.NullHandler())
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is cmd_alias and args.action != "list" and not args.name:
        parser.error("alias create/update/delete need an alias name")
    try:
        _export_keyd_uid(args)
        args.func(args)
    except KmsfsError as exc:
        print(f"kmsfs: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except BaseExceptionGroup as group:
        # trio wraps what fails while a nursery starts (keyd serve: a live socket) in a
        # group: one line for the first kmsfs error, if kmsfs errors are all it holds
        errors = list(_leaf_errors(group))
        if not all(isinstance(error, KmsfsError) for error in errors):
            raise
        first = errors[0]
        assert isinstance(first, KmsfsError)
        print(f"kmsfs: error: {first}", file=sys.stderr)
        return first.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
