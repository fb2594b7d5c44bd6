"""``kmsfs key set|show``: per-directory CMKs (kmsfs/fs/bindings.py).

At a mountpoint both go through the virtual extended attribute ``user.kmsfs.key`` the
mount answers (kmsfs/fs/key_xattr.py); with ``--cipherdir`` they work on the unmounted
cipher directory (kmsfs/fs/bindings_offline.py), where a non-empty directory can be
bound too.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
from pathlib import Path

from kmsfs.cli.common import KEYD_HINT_HELP, key_service_options, keyd_options, print_json
from kmsfs.errors import UsageError

KEY_XATTR = "user.kmsfs.key"


def _kmsfs_mount_of(path: str) -> str:
    """The kmsfs mountpoint ``path`` lies in; UsageError if it is in none."""
    from kmsfs.fs.mount import mount_entries

    real = os.path.realpath(path)
    best = None
    for entry in mount_entries():
        point = entry.mountpoint
        inside = real == point or real.startswith(point.rstrip("/") + "/")
        if inside and (best is None or len(point) >= len(best.mountpoint)):
            best = entry
    if best is None or best.fstype != "fuse.kmsfs":
        raise UsageError(
            f"{path} is not in a mounted kmsfs filesystem "
            "(for a cipher directory: kmsfs key ... --cipherdir CIPHERDIR PATH)"
        )
    return best.mountpoint


def _mounted_error(path: str, error: OSError, key: str | None = None) -> Exception:
    code = error.errno
    if code == errno.ENOTEMPTY:
        return UsageError(
            f"{path} is not empty: at the mountpoint only an empty directory can be bound. "
            "Unmount and run: kmsfs key set --cipherdir CIPHERDIR PATH/IN/CIPHERDIR KEY "
            "(it re-encrypts the names below it)"
        )
    if code == errno.EPERM:
        return UsageError(f"{path}: only the directory's owner or root may bind it")
    if code == errno.ENOTDIR:
        return UsageError(f"{path}: only a directory can be bound to a key")
    if code == errno.EACCES:
        return UsageError(f"{path}: the key service refused {key or 'the key'} (or it is disabled)")
    if code == errno.EOPNOTSUPP:
        return UsageError(f"{path}: this filesystem cannot bind directories (plaintext names?)")
    if code == errno.EROFS:
        return UsageError(f"{path}: the filesystem is mounted read-only")
    return UsageError(f"{path}: {os.strerror(code or errno.EIO)}")


def cmd_key_set(args: argparse.Namespace) -> None:
    if args.cipherdir:
        from kmsfs.fs.bindings_offline import bind_offline

        record = bind_offline(
            Path(args.cipherdir), args.path, args.key, options=key_service_options(args)
        )
        print(f"{args.path or '.'}: bound to {record.key_arn}")
        return
    _kmsfs_mount_of(args.path)
    try:
        os.setxattr(args.path, KEY_XATTR, args.key.encode(), follow_symlinks=False)
    except OSError as error:
        raise _mounted_error(args.path, error, args.key) from None
    shown = json.loads(os.getxattr(args.path, KEY_XATTR, follow_symlinks=False))
    print(f"{args.path}: bound to {shown['binding_key_arn']}")


def _stale_at_mount(path: str):
    """Files below ``path`` (at the mountpoint) whose CMK is not their directory's."""
    for directory, _dirs, files in os.walk(path):
        for name in sorted(files):
            full = os.path.join(directory, name)
            if os.path.islink(full):
                continue
            try:
                shown = json.loads(os.getxattr(full, KEY_XATTR, follow_symlinks=False))
            except OSError:
                continue
            if shown["key_arn"] != shown["binding_key_arn"]:
                yield os.path.relpath(full, path), shown["key_arn"]


def cmd_key_show(args: argparse.Namespace) -> None:
    if args.cipherdir:
        from kmsfs.fs.bindings_offline import show_offline

        shown = show_offline(
            Path(args.cipherdir), args.path, options=key_service_options(args), files=True
        )
        record = {
            "path": shown.path,
            "key_arn": shown.key_arn,
            "binding_key_arn": shown.binding_key_arn,
            "source": shown.source,
            **({"error": shown.error} if shown.error else {}),
            "stale": [{"path": p, "key_arn": k} for p, k in shown.stale],
        }
    else:
        _kmsfs_mount_of(args.path)
        try:
            record = json.loads(os.getxattr(args.path, KEY_XATTR, follow_symlinks=False))
        except OSError as error:
            raise UsageError(f"{args.path}: {os.strerror(error.errno or errno.EIO)}") from None
        record = {"path": args.path, **record}
        stale = []
        if os.path.isdir(args.path) and not os.path.islink(args.path):
            stale = list(_stale_at_mount(args.path))
        elif record["key_arn"] != record["binding_key_arn"]:
            stale = [(args.path, record["key_arn"])]
        record["stale"] = [{"path": p, "key_arn": k} for p, k in stale]
    if args.json:
        print_json(record)
        return
    print(f"{record['path']}: {record['key_arn']}")
    print(f"  binding: {record['binding_key_arn']} (from {record['source']})")
    if record.get("error"):
        print(f"  its name key cannot be used: {record['error']}")
    for item in record["stale"]:
        print(f"  still under the old CMK {item['key_arn']}: {item['path']} (run kmsfs rewrap)")


def add_parsers(commands: argparse._SubParsersAction) -> None:
    key = commands.add_parser(
        "key", help="per-directory CMKs: bind a directory subtree to a CMK, show what protects"
    )
    actions = key.add_subparsers(dest="key_command", required=True, metavar="ACTION")
    set_parser = actions.add_parser(
        "set",
        help="bind a directory to a CMK: its new files' data keys and its names are under it",
        description="At a mountpoint: only an empty directory (by its owner or root). With "
        "--cipherdir (unmounted): any directory; the names below it are re-encrypted "
        "(an interrupted run is finished by running it again).",
    )
    set_parser.add_argument(
        "path",
        metavar="PATH",
        help="a directory (at the mountpoint, or "
        "inside CIPHERDIR as seen at the mountpoint with --cipherdir)",
    )
    set_parser.add_argument("key", metavar="KEY", help="the CMK: id, ARN or alias/NAME")
    set_parser.add_argument("--cipherdir", help="work on this unmounted cipher directory")
    keyd_options(set_parser, KEYD_HINT_HELP)
    set_parser.set_defaults(func=cmd_key_set)
    show = actions.add_parser(
        "show",
        help="which CMK protects a path, where its binding comes from, and the files "
        "below it still under another CMK",
    )
    show.add_argument("path", metavar="PATH")
    show.add_argument("--cipherdir", help="look in this unmounted cipher directory")
    show.add_argument("--json", action="store_true", help="print JSON")
    keyd_options(show, KEYD_HINT_HELP)
    show.set_defaults(func=cmd_key_show)
