"""``kmsfs rewrap``: a cipher directory's wrapped keys to another CMK or to the current
version of its own (:mod:`kmsfs.fs.rewrap`); ``import``/``export`` live beside it."""

from __future__ import annotations

import argparse
from pathlib import Path

from kmsfs.cli import progress
from kmsfs.cli.common import KEYD_HINT_HELP, keyd_options
from kmsfs.errors import FormatError


def cmd_rewrap(args: argparse.Namespace) -> None:
    from kmsfs.fs.rewrap import rewrap_cipherdir

    with progress.bar(args, total=None, what="rewrap", unit="files") as shown:

        def on_total(total: int) -> None:
            if hasattr(shown, "total"):
                shown.total = total
                shown.refresh()

        summary = rewrap_cipherdir(
            Path(args.cipherdir),
            to_key=args.to_key,
            subdir=args.path,
            dry_run=args.dry_run,
            workers=args.workers,
            keyd_socket=args.keyd_socket,
            keyd_uid=args.keyd_uid,
            on_total=on_total,
            on_file=lambda: shown.update(1),
            batch_files=args.batch,
        )
    for backing, problem in summary.failed:
        print(f"{backing}: {problem}")
    verb = "would rewrap" if args.dry_run else "rewrapped"
    config = (
        ("kmsfs.conf would be rewrapped; " if args.dry_run else "kmsfs.conf rewrapped; ")
        if summary.config_rewrapped
        else ""
    )
    rate = summary.files / summary.seconds if summary.seconds > 0 else 0.0
    print(
        f"{args.cipherdir}: {config}{summary.files} file(s): {verb} {summary.rewrapped}, "
        f"{summary.already_done} already under {summary.target}, {summary.empty} empty; "
        f"{summary.header_bytes} header bytes written; {summary.seconds:.1f} s "
        f"({rate:.0f} files/s)"
    )
    if summary.failed:
        raise FormatError(f"{args.cipherdir}: {len(summary.failed)} file(s) not rewrapped")


def add_parsers(commands: argparse._SubParsersAction) -> None:
    rewrap = commands.add_parser(
        "rewrap",
        help="re-encrypt every file's wrapped key under another CMK or the CMK's current "
        "version (unmounted; file contents are not rewritten)",
    )
    rewrap.add_argument("cipherdir")
    rewrap.add_argument(
        "--to-key",
        metavar="KEY",
        help="the CMK to move to (id, ARN or alias/NAME; default: the filesystem's own, "
        "i.e. its current version after a rotation)",
    )
    rewrap.add_argument(
        "--path",
        metavar="SUBDIR",
        help="only the files below this directory (as seen at the mountpoint); "
        "kmsfs.conf is then left as it is",
    )
    rewrap.add_argument(
        "--dry-run", action="store_true", help="count what would be rewrapped, change nothing"
    )
    rewrap.add_argument(
        "--workers", type=int, default=1, metavar="N", help="files rewrapped in parallel"
    )
    rewrap.add_argument(
        "--batch",
        type=int,
        default=256,
        metavar="N",
        help="files whose header writes share one syncfs per step (default 256)",
    )
    keyd_options(rewrap, KEYD_HINT_HELP)
    progress.add_progress_options(rewrap)
    rewrap.set_defaults(func=cmd_rewrap)
    add_transfer_parsers(commands)


def _summary_line(summary, what: str, where: str) -> str:
    return (
        f"{where}: {what} {summary.files} file(s), {summary.directories} director(ies), "
        f"{summary.symlinks} symlink(s), {summary.hard_links} hard link(s), "
        f"{summary.special} special; {summary.skipped} already there; "
        f"{summary.bytes} bytes in {summary.seconds:.1f} s"
    )


def cmd_import(args: argparse.Namespace) -> None:
    from kmsfs.fs.transfer import count_entries, import_tree

    total = count_entries(Path(args.src)) if progress.wanted(args) else None
    with progress.bar(args, total=total, what="import", unit="entries") as shown:
        summary = import_tree(
            Path(args.src),
            Path(args.cipherdir),
            merge=args.merge,
            verify=args.verify,
            workers=args.workers,
            keyd_socket=args.keyd_socket,
            keyd_uid=args.keyd_uid,
            on_entry=lambda: shown.update(1),
        )
    for mismatch in summary.mismatches:
        print(f"verify: {mismatch}")
    print(_summary_line(summary, "imported", args.cipherdir))
    if summary.mismatches:
        raise FormatError(f"{args.cipherdir}: {len(summary.mismatches)} entries differ")
    if args.verify:
        print(f"{args.cipherdir}: every entry read back and matches {args.src}")


def cmd_export(args: argparse.Namespace) -> None:
    from kmsfs.fs.offline import count_backing
    from kmsfs.fs.transfer import export_tree

    total = None
    if progress.wanted(args):
        counts = count_backing(Path(args.cipherdir))
        total = counts.files + counts.directories + counts.symlinks
    with progress.bar(args, total=total, what="export", unit="entries") as shown:
        summary = export_tree(
            Path(args.cipherdir),
            Path(args.dst),
            merge=args.merge,
            workers=args.workers,
            keyd_socket=args.keyd_socket,
            keyd_uid=args.keyd_uid,
            on_entry=lambda: shown.update(1),
        )
    for stray in summary.strays:
        print(f"left out (not a kmsfs entry; see kmsfs fsck): {stray}")
    print(_summary_line(summary, "exported", args.dst))


def _transfer_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--merge",
        action="store_true",
        help="write into a target that already holds entries (entries whose kind, size "
        "and mtime match are kept); also resumes an interrupted run",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=4,
        metavar="N",
        help="files over 1 MiB copied in parallel (smaller ones are copied one after the "
        "other, their keyd calls made ahead)",
    )
    keyd_options(parser, KEYD_HINT_HELP)
    progress.add_progress_options(parser)


def add_transfer_parsers(commands: argparse._SubParsersAction) -> None:
    importing = commands.add_parser(
        "import",
        help="encrypt a plaintext tree into an initialised, unmounted cipher directory",
    )
    importing.add_argument("src", help="the directory whose contents are imported")
    importing.add_argument("cipherdir")
    importing.add_argument(
        "--verify", action="store_true", help="read everything back and compare with SRC"
    )
    _transfer_options(importing)
    importing.set_defaults(func=cmd_import)
    exporting = commands.add_parser(
        "export", help="decrypt an unmounted cipher directory into a plaintext tree"
    )
    exporting.add_argument("cipherdir")
    exporting.add_argument("dst", help="an empty or new directory")
    _transfer_options(exporting)
    exporting.set_defaults(func=cmd_export)
