"""``kmsfs encrypt|decrypt|inspect``: single ciphertext files, no mount."""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from kmsfs.cli import progress
from kmsfs.cli.common import (
    DEFAULT_CHUNK_SIZE_CLI,
    aws_options,
    context_option,
    key_service_options,
    keyd_options,
    parse_pairs,
    print_json,
    print_record,
)
from kmsfs.errors import KmsfsError, UsageError


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
def _output(path: str, *, force: bool = False) -> Iterator[BinaryIO]:
    """stdout for '-', else a new file that appears as ``path`` only when complete.

    The content goes to an unnamed file (O_TMPFILE) that is linked in at the end, so a
    killed command leaves no plaintext behind. Where the filesystem has no O_TMPFILE it goes
    to ``.NAME.PID.kmsfs-part``; such files of processes that are gone are removed on the
    next run for the same name.

    An existing ``path`` is replaced only with ``force`` (as ``gpg --yes``; ``openssl enc``
    and ``age`` would overwrite it silently), checked before any work and again when the
    file is linked in. A device or a FIFO (``/dev/null``, a named pipe) is written into,
    as ``cp`` does, never replaced.
    """
    if path == "-":
        yield sys.stdout.buffer
        sys.stdout.buffer.flush()
        return
    target = Path(path)
    if target.is_dir():  # refused before any work, not after the whole input
        raise UsageError(f"cannot write {path}: it is a directory")
    if target.exists() and not target.is_file():
        with _special_output(path) as stream:
            yield stream
        return
    if not force and os.path.lexists(target):
        raise UsageError(_EXISTS.format(path=path))
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
                temporary = _link_unnamed(stream.fileno(), target, force=force)
        if temporary is not None:
            os.chmod(temporary, mode)
            if force:
                os.replace(temporary, target)
            else:  # link() refuses an existing name, where rename() would replace it
                os.link(temporary, target)
                temporary.unlink()
    except BaseException as error:
        if temporary is not None:
            temporary.unlink(missing_ok=True)
        if isinstance(error, FileExistsError):  # created while we worked
            raise UsageError(_EXISTS.format(path=path)) from None
        if isinstance(error, OSError):  # e.g. a full disk
            raise UsageError(f"cannot write {path}: {error.strerror}") from None
        raise


_EXISTS = "{path} exists; add --force to replace it"

#: the output rules of encrypt/decrypt, for other commands that write a file
output_file = _output


@contextlib.contextmanager
def _special_output(path: str) -> Iterator[BinaryIO]:
    """Write into a device or FIFO that exists at ``path`` (no temporary file, no rename)."""
    try:
        stream = open(path, "wb")  # noqa: SIM115
    except OSError as error:
        raise UsageError(f"cannot write {path}: {error.strerror}") from None
    try:
        with stream:
            yield stream
    except OSError as error:
        raise UsageError(f"cannot write {path}: {error.strerror}") from None


def _link_unnamed(fd: int, target: Path, *, force: bool) -> Path | None:
    """Give the O_TMPFILE ``fd`` the name ``target``. When ``target`` exists: with
    ``force`` link it under a temporary name beside it (returned: the caller renames it
    over ``target``), else FileExistsError."""
    source = f"/proc/self/fd/{fd}"
    # a directory fd makes os.link call linkat (AT_SYMLINK_FOLLOW), not link()
    directory = os.open(target.parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        try:
            os.link(source, target.name, dst_dir_fd=directory, follow_symlinks=True)
            return None
        except FileExistsError:
            if not force:
                raise
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


def _find_cipherdir(path: str) -> Path | None:
    """The cipher directory ``path`` (a file to be made) lies in: the nearest directory
    above it that holds a kmsfs.conf, or None."""
    from kmsfs.fs.config import CONFIG_NAME

    if path == "-":
        return None
    directory = Path(os.path.abspath(path)).parent
    for candidate in (directory, *directory.parents):
        if (candidate / CONFIG_NAME).is_file():
            return candidate
    return None


def _ingest_settings(args: argparse.Namespace, public_key) -> tuple[str, dict[str, str], int]:
    """``(recipient key ARN, encryption context, chunk size)`` for ``encrypt --public-key``.

    DST inside a cipher directory: from its kmsfs.conf, which this host cannot
    authenticate (that needs keyd) -- so nothing it says is trusted for secrecy: the data
    key is wrapped to the public key the user named, which must be the recipient key the
    config names (a changed config makes a file the readers refuse, never one readable
    by someone else), and the file gets exactly the name the user gave. Elsewhere: --key
    names the recipient CMK, stored in the slot for the reader's keyd.
    """
    from kmsfs.format.recipient import public_key_der
    from kmsfs.fs.config import CONFIG_NAME, load_config
    from kmsfs.fs.names import is_internal

    context = parse_pairs(args.context, "--context")
    cipherdir = _find_cipherdir(args.dst)
    if cipherdir is None:
        if not args.key:
            raise UsageError(
                "encrypt --public-key: name the recipient CMK with --key ARN (the reader's "
                "keyd decrypts with it), or write into a cipher directory made with "
                "kmsfs init --recipient-key"
            )
        return args.key, context, args.chunk_size
    config = load_config(cipherdir)
    recipient = config.recipient_key
    if recipient is None:
        raise UsageError(
            f"{cipherdir} takes no files written with a public key "
            "(it was made without kmsfs init --recipient-key)"
        )
    if recipient.public_key_der != public_key_der(public_key):
        raise UsageError(
            f"{args.public_key} is not the public key of {cipherdir}'s recipient key "
            f"{recipient.key_arn}"
        )
    if args.key and args.key != recipient.key_arn:
        raise UsageError(f"--key {args.key}: {cipherdir}'s recipient key is {recipient.key_arn}")
    if not config.plaintext_names:
        raise UsageError(
            f"{cipherdir} encrypts file names with its metadata key, which only keyd can "
            "unwrap: a host with only the public key can write single files, or into a "
            "cipher directory made with --plaintext-names"
        )
    name = os.fsencode(Path(args.dst).name)
    if name == os.fsencode(CONFIG_NAME) or is_internal(name):
        raise UsageError(f"{args.dst} is a name kmsfs keeps for itself")
    if context:
        raise UsageError("--context: a cipher directory's files carry its own context")
    return recipient.key_arn, config.file_context, config.chunk_size


def cmd_encrypt(args: argparse.Namespace) -> None:
    from kmsfs.format import encrypt_stream
    from kmsfs.fs.keyservice import data_key_provider, resolve_for_key

    if args.public_key:
        # write-only ingestion: no keyd, the data key wrapped to a recipient's public key
        from kmsfs.format.recipient import RecipientKeyProvider, load_recipient_public_key

        try:
            pem = Path(args.public_key).read_bytes()
        except OSError as error:
            raise UsageError(f"cannot read {args.public_key}: {error.strerror}") from None
        public_key = load_recipient_public_key(pem, args.public_key)
        key_id, context, chunk_size = _ingest_settings(args, public_key)
        providing: Any = contextlib.nullcontext(RecipientKeyProvider(public_key, key_id))
    else:
        key_id, chunk_size = args.key, args.chunk_size
        context = parse_pairs(args.context, "--context")
        providing = data_key_provider(resolve_for_key(args.key, key_service_options(args)))
    with (
        _input(args.src) as src,
        _output(args.dst, force=args.force) as dst,
        progress.bar(args, total=progress.stream_size(src), what="encrypt") as shown,
        providing as provider,
    ):
        encrypt_stream(
            progress.CountingReader(src, shown),
            dst,
            key_provider=provider,
            key_id=key_id,
            encryption_context=context,
            chunk_size=chunk_size,
        )


def cmd_decrypt(args: argparse.Namespace) -> None:
    from kmsfs.format import decrypt_stream
    from kmsfs.fs.keyservice import data_key_provider, resolve, resolve_for_key

    context = parse_pairs(args.context, "--context")
    source = args.src
    recipient_keys = None  # a single file: whatever recipient CMK its slot names
    options = key_service_options(args)
    if args.cipherdir:
        from kmsfs.fs.offline import open_tree

        config, tree = open_tree(Path(args.cipherdir), service_options=options)
        source = os.fsdecode(tree.resolve(args.src))
        context = {**config.file_context, **context}
        service = resolve(config, options)
        recipient_keys = config.recipient_key_arns
    else:
        service = resolve_for_key(_header_key_arn(source) if options.wants_aws else None, options)
    with (
        _input(source) as src,
        _output(args.dst, force=args.force) as dst,
        progress.bar(args, total=progress.stream_size(src), what="decrypt") as shown,
        data_key_provider(service, recipient_keys=recipient_keys) as provider,
    ):
        decrypt_stream(
            progress.CountingReader(src, shown),
            dst,
            key_provider=provider,
            encryption_context=context,
        )


def _header_key_arn(path: str) -> str | None:
    """The key ARN a ciphertext file's header names (for the region of the aws key
    service), or None (stdin, no header, unreadable: the command says why later)."""
    if path == "-" or not os.path.isfile(path):
        return None
    from kmsfs.format import inspect

    try:
        return inspect(path).key_arn
    except (OSError, ValueError, KmsfsError):
        return None


def cmd_inspect(args: argparse.Namespace) -> None:
    from kmsfs.errors import FormatError
    from kmsfs.format import inspect, verify
    from kmsfs.fs.keyservice import data_key_provider, resolve_for_key
    from kmsfs.kms.datakeys import blob_key_version

    if os.path.isdir(args.file) and os.path.exists(os.path.join(args.file, "kmsfs.conf")):
        # a cipher directory has no header to show: describe it as `kmsfs info` does
        from kmsfs.cli.fs import print_info

        print_info(
            args.file,
            args.keyd_socket,
            keyd_uid=args.keyd_uid,
            as_json=args.json,
            service_options=key_service_options(args),
        )
        return
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
        "KeyWrapping": info.slot_kind,
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
            with data_key_provider(
                resolve_for_key(info.key_arn, key_service_options(args))
            ) as provider:
                report = verify(
                    args.file,
                    key_provider=provider,
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


# -------------------------------------------------------------------- parser
def _force_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-f", "--force", action="store_true", help="replace DST if it exists (refused otherwise)"
    )


def _check_encrypt_args(args: argparse.Namespace) -> str | None:
    if not args.key and not args.public_key:
        return "encrypt needs --key (or --public-key)"
    return None


def add_parsers(commands: argparse._SubParsersAction) -> None:
    encrypt_file = commands.add_parser("encrypt", help="encrypt a file or a pipe (- for stdio)")
    encrypt_file.add_argument("src")
    encrypt_file.add_argument("dst")
    encrypt_file.add_argument(
        "--key",
        help="key id, ARN or alias/NAME (with --public-key: the recipient CMK's ARN, needed "
        "unless DST is inside a cipher directory)",
    )
    encrypt_file.add_argument(
        "--public-key",
        metavar="PEM",
        help="write-only: wrap the data key with RSAES_OAEP_SHA_256 to this RSA public key "
        "(kmsfs keys public-key) instead of asking keyd; needs no keyd, cannot read back",
    )
    context_option(encrypt_file, "encryption context pair (repeatable)")
    encrypt_file.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE_CLI)
    keyd_options(encrypt_file)
    aws_options(encrypt_file)
    _force_option(encrypt_file)
    progress.add_progress_options(encrypt_file)
    encrypt_file.set_defaults(func=cmd_encrypt, check_args=_check_encrypt_args)

    decrypt_file = commands.add_parser("decrypt", help="decrypt a file or a pipe (- for stdio)")
    decrypt_file.add_argument("src")
    decrypt_file.add_argument("dst")
    context_option(decrypt_file, "require this encryption context pair")
    keyd_options(decrypt_file)
    aws_options(decrypt_file)
    decrypt_file.add_argument(
        "--cipherdir",
        help="SRC is a path inside this cipher directory as seen at the mountpoint",
    )
    _force_option(decrypt_file)
    progress.add_progress_options(decrypt_file)
    decrypt_file.set_defaults(func=cmd_decrypt)
    inspect_file = commands.add_parser(
        "inspect", help="show a ciphertext file's header (a cipher directory: as info)"
    )
    inspect_file.add_argument("file")
    inspect_file.add_argument(
        "--verify", action="store_true", help="authenticate every chunk (needs keyd)"
    )
    context_option(inspect_file, "require this encryption context pair")
    keyd_options(inspect_file)
    aws_options(inspect_file)
    inspect_file.add_argument("--json", action="store_true", help="print JSON")
    inspect_file.set_defaults(func=cmd_inspect)
