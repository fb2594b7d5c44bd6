"""systemd integration: readiness notification (sd_notify) and unit files for keyd.

**sd_notify.** A service started with ``Type=notify`` finds the address of systemd's
notification socket in ``$NOTIFY_SOCKET`` and sends newline-separated ``KEY=VALUE``
assignments there as one datagram (``READY=1`` once it serves, ``STOPPING=1`` when it
begins to shut down, ``STATUS=...`` free text). An address starting with ``@`` is in the
abstract namespace (the ``@`` stands for a leading NUL byte), as sd_notify(3) says. No
library is needed for one datagram; when ``$NOTIFY_SOCKET`` is unset every call is a
no-op, so the same code runs in a terminal.

**Units.** :func:`keyd_service_unit` writes ``kmsfs-keyd.service`` (``Type=notify``; the
passphrase from ``systemd-ask-password`` through ``--extpass``, or from a credential file
given to keyd with ``LoadCredential=``, which keyd reads from
``$CREDENTIALS_DIRECTORY/<name>``), and :func:`fstab_line` the /etc/fstab line that mounts
a cipher directory once that service is ready (``x-systemd.requires=``).
"""

from __future__ import annotations

import logging
import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

log = logging.getLogger("kmsfs.systemd")

NOTIFY_SOCKET_ENV = "NOTIFY_SOCKET"
CREDENTIALS_DIRECTORY_ENV = "CREDENTIALS_DIRECTORY"

KEYD_SERVICE = "kmsfs-keyd.service"
#: the credential names the generated unit gives LoadCredential= (and keyd reads)
PASSPHRASE_CREDENTIAL = "kmsfs-passphrase"
ROOT_KEY_CREDENTIAL = "kmsfs-root-key"


# ------------------------------------------------------------------ sd_notify
def _notify_address(address: str) -> str | bytes | None:
    if address.startswith("@"):
        return b"\0" + address[1:].encode()  # abstract namespace
    if address.startswith("/"):
        return address
    return None  # vsock: and anything newer than this code: not supported


class Notifier:
    """Sends states to the service manager at one address (``$NOTIFY_SOCKET``).

    :meth:`from_environment` takes the address and removes it from the environment (as
    ``sd_notify(unset_environment=1)`` does), so that no child -- an ``--extpass``
    command, a detached helper -- can claim to be the service's main process.
    """

    def __init__(self, address: str | None) -> None:
        self.address = address

    @classmethod
    def from_environment(cls, *, unset: bool = True) -> Notifier:
        address = os.environ.get(NOTIFY_SOCKET_ENV) or None
        if unset:
            os.environ.pop(NOTIFY_SOCKET_ENV, None)
        return cls(address)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, *assignments: str) -> bool:
        """Send ``KEY=VALUE`` assignments as one datagram; True if it was sent.

        A failure is logged and otherwise ignored: a daemon does not stop serving
        because the service manager went away (sd_notify(3) returns an error, too).
        """
        if self.address is None:
            return False
        target = _notify_address(self.address)
        if target is None:
            log.warning(
                "cannot notify the service manager at %r: unsupported address", self.address
            )
            return False
        message = "\n".join(assignments).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto(message, target)
        except OSError as exc:
            log.warning("cannot notify the service manager at %s: %s", self.address, exc.strerror)
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        return self.notify("READY=1", *([f"STATUS={status}"] if status else []))

    def stopping(self, status: str | None = None) -> bool:
        return self.notify("STOPPING=1", *([f"STATUS={status}"] if status else []))


def sd_notify(*assignments: str) -> bool:
    """Send assignments to ``$NOTIFY_SOCKET`` (left in the environment); False if unset."""
    return Notifier.from_environment(unset=False).notify(*assignments)


# ----------------------------------------------------------------- credentials
_CREDENTIAL_NAME = re.compile(r"[A-Za-z0-9_.@-]+")


def credential_path(name: str) -> Path:
    """``$CREDENTIALS_DIRECTORY/<name>``: a credential the unit passed with LoadCredential=.

    Raises :class:`kmsfs.errors.UsageError` outside such a unit or for a name that is
    not a plain file name.
    """
    from kmsfs.errors import UsageError

    if not _CREDENTIAL_NAME.fullmatch(name) or name in (".", ".."):
        raise UsageError(f"credential name {name!r} is not a plain file name")
    directory = os.environ.get(CREDENTIALS_DIRECTORY_ENV)
    if not directory:
        raise UsageError(
            f"no ${CREDENTIALS_DIRECTORY_ENV}: credential {name} is given only to a systemd "
            f"service with 'LoadCredential={name}:FILE'"
        )
    return Path(directory) / name


# ---------------------------------------------------------------------- units
PassphraseFrom = Literal["ask-password", "credential", "root-key-file"]

#: how ExecStart asks for the passphrase in ask-password mode (system units: the
#: console, wall or Plymouth agents answer; systemd-ask-password(1))
ASK_PASSWORD_COMMAND = (
    "systemd-ask-password --id=kmsfs-keyd:keystore --timeout=0 'Passphrase for the kmsfs keystore:'"
)

_PLAIN_WORD = re.compile(r"[A-Za-z0-9_@%+=:,./-]+")


def quote_exec_word(word: str) -> str:
    """One word of a systemd command line (systemd.service(5), "Command lines").

    ``%`` (specifiers) is doubled and ``$`` (environment expansion) is doubled; a word
    with anything but plain characters is double-quoted with C-style escapes.
    """
    escaped = word.replace("%", "%%").replace("$", "$$")
    if escaped and _PLAIN_WORD.fullmatch(escaped):
        return escaped
    escaped = escaped.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def quote_value(text: str) -> str:
    """A path as a whole setting's value (``LoadCredential=ID:PATH``): specifiers
    escaped; whitespace, quotes and backslashes refused (no quoting there to rely on)."""
    if any(ch.isspace() or ch in "\\\"'" for ch in text):
        raise ValueError(f"{text!r}: a path with blanks, quotes or backslashes cannot go there")
    return text.replace("%", "%%")


def quote_list_item(text: str) -> str:
    """A path in a space-separated list (``RequiresMountsFor=``): specifiers escaped,
    double-quoted if it holds blanks or quotes."""
    escaped = text.replace("%", "%%")
    if escaped and _PLAIN_WORD.fullmatch(escaped):
        return escaped
    return '"' + escaped.replace("\\", "\\\\").replace('"', '\\"') + '"'


@dataclass(frozen=True)
class KeydUnit:
    """What the generated ``kmsfs-keyd.service`` runs and how it gets its secret."""

    kmsfs_command: list[str]  # e.g. ["/usr/local/bin/kmsfs"]
    keystore: Path
    socket: Path | None = None  # None: keyd's default for the unit's user
    user: bool = False  # a user unit (systemctl --user)
    passphrase_from: PassphraseFrom = "ask-password"
    secret_file: Path | None = None  # the passphrase or root key file for LoadCredential=
    socket_mode: str | None = None

    def exec_start(self) -> list[str]:
        argv = [*self.kmsfs_command, "keyd", "serve", "--keystore", str(self.keystore)]
        if self.socket is not None:
            argv += ["--socket", str(self.socket)]
        if self.socket_mode is not None:
            argv += ["--socket-mode", self.socket_mode]
        if self.passphrase_from == "ask-password":
            argv += ["--extpass", ASK_PASSWORD_COMMAND]
        elif self.passphrase_from == "credential":
            argv += ["--passphrase-credential", PASSPHRASE_CREDENTIAL]
        else:
            argv += ["--root-key-credential", ROOT_KEY_CREDENTIAL]
        return argv


def keyd_service_unit(unit: KeydUnit) -> str:
    """The text of ``kmsfs-keyd.service`` for ``unit``."""
    if unit.passphrase_from != "ask-password" and unit.secret_file is None:
        raise ValueError(f"{unit.passphrase_from} needs the secret file's path")
    lines = [
        "# kmsfs-keyd.service: made by 'kmsfs systemd-units'",
        "[Unit]",
        "Description=kmsfs key daemon (keyd)",
    ]
    if not unit.user:
        # the keystore may live on any local filesystem; mounts that need keyd are
        # ordered after it by x-systemd.requires= in their fstab line
        lines.append("RequiresMountsFor=" + quote_list_item(str(unit.keystore)))
    lines += [
        "",
        "[Service]",
        # READY=1 once the socket listens, STOPPING=1 on SIGTERM (kmsfs.systemd.Notifier)
        "Type=notify",
        "NotifyAccess=main",
        "ExecStart=" + " ".join(quote_exec_word(word) for word in unit.exec_start()),
    ]
    if unit.passphrase_from == "credential":
        assert unit.secret_file is not None
        lines.append(f"LoadCredential={PASSPHRASE_CREDENTIAL}:{quote_value(str(unit.secret_file))}")
    elif unit.passphrase_from == "root-key-file":
        assert unit.secret_file is not None
        lines.append(f"LoadCredential={ROOT_KEY_CREDENTIAL}:{quote_value(str(unit.secret_file))}")
    else:
        # waits for someone to type the passphrase: no start timeout
        lines.append("TimeoutStartSec=infinity")
    lines += [
        # keyd stops on SIGTERM (systemd's default KillSignal), removing its socket
        "KillMode=mixed",
        "Restart=on-failure",
        "RestartSec=2s",
        "UMask=0077",
        # keyd locks its memory (mlockall) when the limit allows and disables core dumps
        "LimitMEMLOCK=infinity",
        "LimitCORE=0",
        "NoNewPrivileges=yes",
        "PrivateTmp=yes",
        "",
        "[Install]",
        "WantedBy=" + ("default.target" if unit.user else "multi-user.target"),
        "",
    ]
    return "\n".join(lines)


def fstab_line(
    cipherdir: Path | str,
    mountpoint: Path | str,
    *,
    keyd_socket: Path | str | None = None,
    options: str = "",
) -> str:
    """An /etc/fstab line (fstab(5)) that mounts ``cipherdir`` once keyd is up.

    ``x-systemd.requires=`` makes the mount unit require and start after
    kmsfs-keyd.service (systemd.mount(5)); ``_netdev`` keeps it out of
    local-fs.target, which every service (keyd too) is ordered after -- without it
    the mount would wait for keyd and keyd for local-fs.target: a cycle.
    ``nosuid,nodev`` instead of ``defaults``: mount.fuse3 adds ``dev,suid`` to a root
    mount unless told otherwise, and set-ID programs or device nodes on a filesystem
    whose backing files others may write are a hole. ``X-mount.mkdir`` creates a missing
    mountpoint (mount -a refuses one before kmsfs runs). mount(8) starts the helper with
    an empty environment, so a keyd on a socket other than root's default is named with
    ``keyd_socket=``.
    """
    items = ["nosuid", "nodev", "X-mount.mkdir", f"x-systemd.requires={KEYD_SERVICE}", "_netdev"]
    if keyd_socket is not None:
        items.append(f"keyd_socket={keyd_socket}")
    if options:
        items.append(options)
    fields = [_fstab_escape(str(cipherdir)), _fstab_escape(str(mountpoint)), "fuse.kmsfs"]
    return " ".join([*fields, _fstab_escape(",".join(items)), "0", "0"])


def _fstab_escape(field: str) -> str:
    """Spaces and tabs in an fstab field are written as octal escapes (fstab(5))."""
    return (
        field.replace("\\", "\\134")
        .replace(" ", "\\040")
        .replace("\t", "\\011")
        .replace("\n", "\\012")
    )


def unit_directory(*, user: bool) -> Path:
    """Where ``--install`` puts units: /etc/systemd/system, or the user's unit directory."""
    if not user:
        return Path("/etc/systemd/system")
    config_home = os.environ.get("XDG_CONFIG_HOME")
    base = (
        Path(config_home) if config_home and os.path.isabs(config_home) else Path.home() / ".config"
    )
    return base / "systemd" / "user"
