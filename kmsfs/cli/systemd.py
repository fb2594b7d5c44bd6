"""``kmsfs systemd-units``: print or install kmsfs-keyd.service, and show the fstab line."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

from kmsfs.errors import UsageError


def _kmsfs_command() -> list[str]:
    """How the unit runs kmsfs (an absolute path, as systemd needs): the ``kmsfs`` beside
    this Python (a virtual environment), else the one on PATH, else ``python -m``."""
    beside = Path(sys.executable).parent / "kmsfs"
    if os.access(beside, os.X_OK):
        return [str(beside)]
    found = shutil.which("kmsfs")
    if found:
        return [os.path.abspath(found)]
    return [sys.executable, "-m", "kmsfs.cli"]


def cmd_systemd_units(args: argparse.Namespace) -> None:
    from kmsfs.kms.paths import resolve_keystore_dir
    from kmsfs.systemd import KEYD_SERVICE, KeydUnit, fstab_line, keyd_service_unit, unit_directory

    if args.root_key_file:
        passphrase_from, secret = "root-key-file", Path(os.path.abspath(args.root_key_file))
    elif args.passphrase_file:
        passphrase_from, secret = "credential", Path(os.path.abspath(args.passphrase_file))
    else:
        passphrase_from, secret = "ask-password", None
    unit = KeydUnit(
        kmsfs_command=_kmsfs_command(),
        keystore=Path(os.path.abspath(resolve_keystore_dir(args.keystore))),
        socket=Path(os.path.abspath(args.socket)) if args.socket else None,
        user=args.user,
        passphrase_from=passphrase_from,  # type: ignore[arg-type]
        secret_file=secret,
    )
    text = keyd_service_unit(unit)
    systemctl = "systemctl --user" if args.user else "systemctl"
    if args.install:
        directory = unit_directory(user=args.user)
        path = directory / KEYD_SERVICE
        if path.exists() and path.read_text() != text and not args.force:
            raise UsageError(f"{path} exists and differs: --force replaces it")
        directory.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{KEYD_SERVICE}.tmp")
        temporary.write_text(text)
        os.replace(temporary, path)
        print(f"installed {path}")
        print(
            f"start it now and at every boot:  {systemctl} daemon-reload && "
            f"{systemctl} enable --now {KEYD_SERVICE}"
        )
    else:
        sys.stdout.write(text)
    if args.user:
        print(
            "# fstab mounts belong to the system manager: with a user keyd, mount with "
            "'kmsfs mount' (or a user service running it)"
        )
        return
    cipherdir = args.cipherdir or "CIPHERDIR"
    mountpoint = args.mountpoint or "MOUNTPOINT"
    print(f"# /etc/fstab: mount a cipher directory once {KEYD_SERVICE} is ready:")
    print(f"# {fstab_line(cipherdir, mountpoint, keyd_socket=unit.socket)}")


def add_parsers(commands: argparse._SubParsersAction) -> None:
    units = commands.add_parser(
        "systemd-units",
        help="print (or --install) kmsfs-keyd.service and the fstab line for a mount",
        description="kmsfs-keyd.service runs 'kmsfs keyd serve' with Type=notify (ready "
        "once its socket listens). The passphrase comes from systemd-ask-password "
        "(default), or from a file handed over with LoadCredential= (--passphrase-file, "
        "--root-key-file).",
    )
    units.add_argument("--user", action="store_true", help="a user unit (systemctl --user)")
    units.add_argument(
        "--install",
        action="store_true",
        help="write it to /etc/systemd/system (--user: ~/.config/systemd/user)",
    )
    units.add_argument(
        "--force", action="store_true", help="with --install: replace a different unit"
    )
    units.add_argument(
        "--keystore",
        help="keystore directory (default: $KMSFS_KEYSTORE or $XDG_DATA_HOME/kmsfs/keystore)",
    )
    units.add_argument(
        "--socket", help="keyd's socket (default: keyd's default for the unit's user)"
    )
    secret = units.add_mutually_exclusive_group()
    secret.add_argument(
        "--passphrase-file",
        metavar="FILE",
        help="the keystore's passphrase is in FILE (mode 0600), given to keyd with LoadCredential=",
    )
    secret.add_argument(
        "--root-key-file",
        metavar="FILE",
        help="the keystore is protected by this root key file, given with LoadCredential=",
    )
    secret.add_argument(
        "--ask-password",
        action="store_true",
        help="ask for the passphrase at start with systemd-ask-password (the default)",
    )
    units.add_argument("--cipherdir", help="the cipher directory for the fstab line")
    units.add_argument("--mountpoint", help="the mountpoint for the fstab line")
    units.set_defaults(func=cmd_systemd_units)
