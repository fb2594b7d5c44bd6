"""The ``kmsfs`` command: parse, call, print.

Every failure ends as one line on stderr (``kmsfs: error: ...``) and a non-zero
exit status taken from the error's type (the table: ``kmsfs.cli.errors.EXIT_STATUSES``).

One module per command group, each holding its parsers (``add_parsers``) and handlers:
``tools`` (encrypt, decrypt, inspect), ``fs`` (ls, fsck, init, seal, mount, umount),
``rewrap`` (rewrap, import, export),
``keyd`` (keyd ...), ``keys`` (keys ...), ``sign`` (sign, verify, mac, verify-mac),
``key_bindings`` (key set, key show), ``whoami``, ``systemd`` (systemd-units),
``meta`` (completion, man). ``errors`` maps exceptions to exit statuses.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from kmsfs.cli import fs, key_bindings, keyd, keys, meta, rewrap, sign, systemd, tools, whoami
from kmsfs.cli.common import export_keyd_uid
from kmsfs.cli.errors import exit_status_epilog, run_reporting_errors
from kmsfs.fs.fstab import is_helper_call, run_helper

__all__ = ["build_parser", "main"]


def _installed_version() -> str:
    """The version pip installed (package metadata), or the source tree's if not installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("kmsfs")
    except PackageNotFoundError:
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kmsfs",
        description="kmsfs: a transparently encrypting filesystem with its own "
        "AWS-KMS-compatible key daemon (keyd).",
        epilog=exit_status_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"kmsfs {_installed_version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in (tools, fs, rewrap, keyd, keys, key_bindings, sign, whoami, systemd, meta):
        group.add_parsers(commands)
    return parser


def _command_names(parser: argparse.ArgumentParser) -> set[str]:
    return {
        name
        for action in parser._actions
        if isinstance(action, argparse._SubParsersAction)
        for name in action.choices
    }


def main(argv: Sequence[str] | None = None) -> int:
    # Library warnings are for daemons' logs; a command reports through its own output.
    logging.getLogger("kmsfs").addHandler(logging.NullHandler())
    parser = build_parser()
    arguments = sys.argv[1:] if argv is None else list(argv)
    if is_helper_call(arguments, _command_names(parser)):
        # mount -t fuse.kmsfs / fstab: mount.fuse3 runs "kmsfs SOURCE MOUNTPOINT -o ..."
        return run_helper(arguments, prog="kmsfs")
    args = parser.parse_args(arguments)
    check_args = getattr(args, "check_args", None)
    if check_args is not None and (problem := check_args(args)):
        parser.error(problem)

    def command() -> None:
        export_keyd_uid(args)
        args.func(args)

    return run_reporting_errors(command)


if __name__ == "__main__":
    sys.exit(main())
