"""What every command group shares: output formats, option builders, argument types."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from kmsfs.errors import UsageError

DEFAULT_CHUNK_SIZE_CLI = 1 << 16  # kmsfs.format.DEFAULT_CHUNK_SIZE, without importing it


# --------------------------------------------------------------------- output
def when(timestamp: float | None) -> str:
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


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"cannot be negative: {value}")
    return value


def percent(text: str) -> int:
    value = non_negative_int(text)
    if not 1 <= value <= 100:
        raise argparse.ArgumentTypeError(f"must be from 1 to 100: {value}")
    return value


def context_option(parser: argparse.ArgumentParser, help_text: str) -> None:
    parser.add_argument("--context", action="append", metavar="KEY=VALUE", help=help_text)


KEYD_HINT_HELP = (
    "keyd's socket (default: $KMSFS_KEYD_SOCKET, else the hint in kmsfs.conf, else "
    "~/.config/kmsfs/config, else the default socket: the first where a keyd you trust "
    "answers; every one must pass the ownership checks)"
)


def keyd_options(
    parser: argparse.ArgumentParser,
    socket_help: str = "keyd's socket (default: $KMSFS_KEYD_SOCKET, else ~/.config/kmsfs/config, "
    "else the default socket)",
) -> None:
    parser.add_argument("--keyd-socket", help=socket_help)
    parser.add_argument(
        "--keyd-uid",
        metavar="USER",
        help="also trust a keyd run by this user (a system keyd's service account; "
        "default: $KMSFS_KEYD_UID). Otherwise only one run by you or root is trusted",
    )


def aws_options(parser: argparse.ArgumentParser, *, init: bool = False) -> None:
    """--aws-endpoint-url/--aws-profile (and --aws-region): the ``aws`` key service
    (kmsfs.fs.keyservice); for ``init`` also --key-service."""
    group = parser.add_argument_group("AWS KMS (a CMK outside keyd, through botocore)")
    if init:
        group.add_argument(
            "--key-service",
            choices=("keyd", "aws"),
            help="where the CMK lives (default: aws for a key ARN keyd does not know or when "
            "an --aws-* option is given, else keyd); recorded in kmsfs.conf",
        )
    group.add_argument(
        "--aws-endpoint-url",
        metavar="URL",
        help="a KMS-compatible endpoint instead of AWS's own (https, or http on loopback)",
    )
    group.add_argument(
        "--aws-profile", metavar="NAME", help="the AWS profile whose credentials to use"
    )
    if not init:
        group.add_argument(
            "--aws-region", metavar="REGION", help="the region (default: the key ARN's)"
        )


def key_service_options(args: argparse.Namespace):
    """The command line's choices about the key service (kmsfs.fs.keyservice)."""
    from kmsfs.fs.keyservice import KeyServiceOptions

    return KeyServiceOptions(
        keyd_socket=getattr(args, "keyd_socket", None),
        keyd_uid=getattr(args, "keyd_uid", None),
        kind=getattr(args, "key_service", None),
        aws_endpoint_url=getattr(args, "aws_endpoint_url", None),
        aws_profile=getattr(args, "aws_profile", None),
        aws_region=getattr(args, "aws_region", None),
    )


def export_keyd_uid(args: argparse.Namespace) -> None:
    """--keyd-uid reaches every client of this process (and a detached mount) as the
    environment variable the clients read."""
    value = getattr(args, "keyd_uid", None)
    if value:
        from kmsfs.kms.trust import KEYD_UID_ENV, named_keyd_uids

        named_keyd_uids(value)  # an unknown user is a usage error, now
        os.environ[KEYD_UID_ENV] = value


def client_options(parser: argparse.ArgumentParser) -> None:
    keyd_options(parser)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def walk_commands(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> Iterator[tuple[list[str], argparse.ArgumentParser]]:
    """Every (sub)command's parser with its path of names (the top level's is ``[]``);
    what completion, the man page and the no-traceback test walk."""
    yield list(path), parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from walk_commands(sub, (*path, name))
