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
    keyd_options(rewrap, KEYD_HINT_HELP)
    progress.add_progress_options(rewrap)
    rewrap.set_defaults(func=cmd_rewrap)
