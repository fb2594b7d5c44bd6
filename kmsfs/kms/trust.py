"""Which keyd a client may talk to: checks on the socket's path and on the peer.

A keyd hands out plaintext data keys and sees every Encrypt plaintext, so a client
must know it talks to the right one before it sends a byte. The model is OpenSSH's
``safe_path`` / ssh-agent and gpg-agent's socket directory checks:

- **Expected owners**: the client's own effective uid, root, and a service account
  the administrator names for a system keyd run under a dedicated user
  (:data:`KEYD_UID_ENV` or the clients' ``keyd_uid`` option: a uid or a user name,
  several separated by commas).
- **The path** (:func:`check_socket_path`), before connecting: the path is resolved
  (symlinks followed once, here) and every directory on the way is ``lstat``-ed. Each
  must belong to an expected owner; the socket's own directory must be writable by
  nobody else (a sticky, world-writable directory such as ``/tmp`` is fine further up,
  where another user can neither rename nor replace our entries, but never as the
  socket's own directory, where anyone can take a free name first); the socket must
  be a socket and belong to an expected owner. The client then connects to the
  resolved path, so a symlink changed after the check does not count.
- **The peer** (:func:`check_peer`), after connecting and before sending anything:
  the uid of the process that listens (``SO_PEERCRED``) must be an expected one.

Anything else raises :class:`kmsfs.errors.KeydUntrusted`: one line naming the path and
the owner found.
"""

from __future__ import annotations

import os
import pwd
import socket
import stat
import struct
from collections.abc import Iterable
from pathlib import Path

from kmsfs.errors import KeydUnavailable, KeydUntrusted, UsageError

KEYD_UID_ENV = "KMSFS_KEYD_UID"

_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


def _parse_uid(text: str, where: str) -> int:
    text = text.strip()
    if text.isdigit():
        return int(text)
    try:
        return pwd.getpwnam(text).pw_uid
    except KeyError:
        raise UsageError(f"{where}: no user {text!r}") from None


def named_keyd_uids(keyd_uid: str | int | Iterable[str | int] | None = None) -> frozenset[int]:
    """The service accounts named by ``keyd_uid`` (if given) or else :data:`KEYD_UID_ENV`."""
    where = "--keyd-uid"
    if keyd_uid is None:
        keyd_uid = os.environ.get(KEYD_UID_ENV) or None
        where = KEYD_UID_ENV
    if keyd_uid is None:
        return frozenset()
    if isinstance(keyd_uid, int):
        return frozenset({keyd_uid})
    items = keyd_uid.split(",") if isinstance(keyd_uid, str) else keyd_uid
    return frozenset(
        item if isinstance(item, int) else _parse_uid(item, where)
        for item in items
        if isinstance(item, int) or item.strip()
    )


def expected_keyd_uids(keyd_uid: str | int | Iterable[str | int] | None = None) -> frozenset[int]:
    """Whom a keyd may run as: us, root, and the named service accounts."""
    return frozenset({os.geteuid(), 0}) | named_keyd_uids(keyd_uid)


def describe_uid(uid: int) -> str:
    """``uid 65534 (nobody)``, or ``uid 4242`` for a uid without a name."""
    try:
        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except KeyError:
        return f"uid {uid}"


def _expected_text(expected: frozenset[int]) -> str:
    own = os.geteuid()
    others = sorted(expected - {own, 0})
    named = f", or {KEYD_UID_ENV} ({', '.join(str(uid) for uid in others)})" if others else ""
    return f"you (uid {own}), root{named}"


def _refuse(socket_path: Path, what: str) -> KeydUntrusted:
    return KeydUntrusted(f"refusing keyd socket {os.fspath(socket_path)}: {what}")


def check_socket_path(socket_path: str | os.PathLike[str], expected: frozenset[int]) -> Path:
    """Check the socket's path (see the module's doc); the resolved path to connect to.

    Raises :class:`KeydUntrusted` for a path someone unexpected controls, and
    :class:`KeydUnavailable` for a socket or directory that does not exist.
    """
    named = Path(socket_path)
    resolved = Path(os.path.realpath(named))
    directory = resolved.parent
    chain = [*reversed(directory.parents), directory]
    for component in chain:
        info = _lstat(component, named, f"no such directory {component}", f"check {component}")
        if not stat.S_ISDIR(info.st_mode):
            raise _refuse(named, f"{component} changed while it was being checked")
        if info.st_uid not in expected:
            raise _refuse(
                named,
                f"{'its directory' if component == directory else 'the directory'} "
                f"{component} is owned by {describe_uid(info.st_uid)}, "
                f"not by {_expected_text(expected)}",
            )
        shared = info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
        if shared and (component == directory or not info.st_mode & stat.S_ISVTX):
            raise _refuse(
                named,
                f"its directory {component} is writable by other users "
                f"(mode {stat.S_IMODE(info.st_mode):04o}): use a private directory",
            )
    info = _lstat(resolved, named, "no socket there", "check it")
    if not stat.S_ISSOCK(info.st_mode):
        raise _refuse(named, f"{resolved} is not a socket")
    if info.st_uid not in expected:
        raise _refuse(
            named,
            f"the socket is owned by {describe_uid(info.st_uid)}, "
            f"not by {_expected_text(expected)}",
        )
    return resolved


def _lstat(path: Path, named: Path, missing: str, doing: str) -> os.stat_result:
    """``os.lstat(path)``; a missing path or a failure is KeydUnavailable naming ``named``."""
    try:
        return os.lstat(path)
    except FileNotFoundError:
        raise KeydUnavailable(f"keyd at {os.fspath(named)}: {missing} (is keyd running?)") from None
    except OSError as error:
        raise KeydUnavailable(
            f"keyd at {os.fspath(named)}: cannot {doing}: {error.strerror}"
        ) from None


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """``(pid, uid, gid)`` of the process that listens on the other end (SO_PEERCRED)."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
    pid, uid, gid = _PEERCRED.unpack(raw)
    return pid, uid, gid


def check_peer(
    sock: socket.socket, socket_path: str | os.PathLike[str], expected: frozenset[int]
) -> None:
    """Refuse a connection whose listening process runs as an unexpected uid."""
    pid, uid, _gid = peer_credentials(sock)
    if uid not in expected:
        raise _refuse(
            Path(socket_path),
            f"the process answering there (pid {pid}) runs as {describe_uid(uid)}, "
            f"not as {_expected_text(expected)}",
        )
