"""Where keyd keeps its keystore and its socket, and how every client finds keyd.

keyd itself (``kmsfs keyd serve``) listens on: ``--socket``, else ``$KMSFS_KEYD_SOCKET``,
else the per-user (for root, system-wide) default (:func:`resolve_socket_path`).

A client -- every command, the mount, ``kmsfs.open`` -- finds keyd by one rule
(:func:`find_keyd`):

1. ``--keyd-socket`` (or the ``socket_path`` the caller passes),
2. else ``$KMSFS_KEYD_SOCKET``,
3. else the socket the cipher directory's kmsfs.conf names (a hint: not authenticated
   yet, so it goes through the same ownership and peer checks as any socket),
4. else ``keyd_socket`` in the per-user config file ``$XDG_CONFIG_HOME/kmsfs/config``
   (``~/.config/kmsfs/config``; written by ``kmsfs keyd serve`` when it listens on a
   socket other than the default, and by ``scripts/try``),
5. else the default socket.

A socket the user named (1, 2) is used as it is: if nothing answers there, that is the
error (as ssh-agent's ``SSH_AUTH_SOCK``). The others (3-5) are tried in order and the
first where a keyd we trust answers is used; when none does, the error names each
place looked at and why it was passed over.
"""

from __future__ import annotations

import json
import os
import socket
import tomllib
from dataclasses import dataclass
from pathlib import Path

from kmsfs.errors import KeydUnavailable, KeydUntrusted

KEYSTORE_ENV = "KMSFS_KEYSTORE"
SOCKET_ENV = "KMSFS_KEYD_SOCKET"
#: the per-user config file's setting that names keyd's socket
USER_CONFIG_SOCKET = "keyd_socket"
#: how long a probe waits for a socket to accept (a full backlog blocks connect)
PROBE_TIMEOUT = 5.0


def default_keystore_dir() -> Path:
    """``$XDG_DATA_HOME/kmsfs/keystore`` (``~/.local/share/kmsfs/keystore``)."""
    data_home = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data_home) / "kmsfs" / "keystore"


def resolve_keystore_dir(explicit: str | os.PathLike[str] | None = None) -> Path:
    if explicit:
        return Path(explicit)
    from_env = os.environ.get(KEYSTORE_ENV)
    if from_env:
        return Path(from_env)
    return default_keystore_dir()


#: root's keyd, and a system keyd serving every user of the machine
SYSTEM_SOCKET = Path("/run/kmsfs/keyd.sock")


def default_socket_path() -> Path:
    """``/run/kmsfs/keyd.sock`` for root, else ``$XDG_RUNTIME_DIR/kmsfs/keyd.sock``.

    Without ``XDG_RUNTIME_DIR`` a non-root user falls back to ``/tmp/kmsfs-<uid>/``,
    a directory keyd creates with mode 0700. Anyone can create that name in ``/tmp``
    first, so it is no more than a name: keyd refuses a directory it does not own and
    every client checks the directory, the socket and the peer before it trusts them
    (:mod:`kmsfs.kms.trust`; ssh-agent's ``/tmp/ssh-*`` directories are trusted the
    same way).
    """
    if os.geteuid() == 0:
        return SYSTEM_SOCKET
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return Path(runtime) / "kmsfs" / "keyd.sock"
    return Path(f"/tmp/kmsfs-{os.geteuid()}") / "keyd.sock"


def resolve_socket_path(explicit: str | os.PathLike[str] | None = None) -> Path:
    if explicit:
        return Path(explicit)
    from_env = os.environ.get(SOCKET_ENV)
    if from_env:
        return Path(from_env)
    return default_socket_path()


# ------------------------------------------------------------ per-user config
def user_config_path() -> Path:
    """``$XDG_CONFIG_HOME/kmsfs/config``, else ``~/.config/kmsfs/config``.

    A relative ``XDG_CONFIG_HOME`` is ignored, as the XDG Base Directory spec says.
    """
    config_home = os.environ.get("XDG_CONFIG_HOME")
    if not config_home or not os.path.isabs(config_home):
        config_home = str(Path.home() / ".config")
    return Path(config_home) / "kmsfs" / "config"


def read_user_config(path: Path | None = None) -> dict[str, object]:
    """The per-user config (TOML; ``keyd_socket = "/path"``), or {} if there is none.

    Raises :class:`OSError` or :class:`ValueError` for one that cannot be read.
    """
    path = path or user_config_path()
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"not TOML: {exc}") from None


def remember_keyd_socket(socket_path: Path) -> tuple[Path | None, str]:
    """Record ``socket_path`` as ``keyd_socket`` in the per-user config, so that a new
    shell's commands find this keyd; returns (the file written or None, what was done).

    Not written for the default socket (clients look there anyway), nor over a
    ``keyd_socket`` where a keyd we trust still answers: a throwaway keyd (a benchmark,
    a test) does not take the place of the one the user runs. Other lines are kept;
    the file is replaced atomically.
    """
    from kmsfs.kms.trust import expected_keyd_uids

    socket_path = Path(os.path.abspath(socket_path))
    if socket_path == default_socket_path():
        return None, f"{socket_path} is the default socket"
    path = user_config_path()
    try:
        configured = read_user_config(path).get(USER_CONFIG_SOCKET)
        lines = path.read_text().splitlines() if path.exists() else []
    except (OSError, ValueError) as exc:
        return None, f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}"
    if isinstance(configured, str) and Path(configured) == socket_path:
        return None, f"{path} names it already"
    if isinstance(configured, str) and os.path.isabs(configured):
        try:
            probe_keyd(Path(configured), expected_keyd_uids())
        except KeydUnavailable:
            pass  # stale: replace it
        else:
            return None, f"{path} names {configured}, where a keyd answers"
    if not lines:
        lines = ["# kmsfs per-user settings: which keyd a new shell's commands use"]
    kept = [line for line in lines if line.split("=", 1)[0].strip() != USER_CONFIG_SOCKET]
    # a JSON string with ASCII escapes is a valid TOML basic string
    kept.append(f"{USER_CONFIG_SOCKET} = {json.dumps(str(socket_path))}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        temporary.write_text("\n".join(kept) + "\n")
        os.replace(temporary, path)
    except OSError as exc:
        return None, f"cannot write {path}: {exc.strerror}"
    return path, f"recorded {socket_path} in {path}"


# ---------------------------------------------------------------- find keyd
@dataclass(frozen=True)
class KeydCandidate:
    """A place a client may find keyd, and why it looks there."""

    path: Path
    origin: str  # "--keyd-socket", "KMSFS_KEYD_SOCKET", "kmsfs.conf", ...
    named: bool  # named by the user: used as it is, never passed over


def keyd_candidates(
    explicit: str | os.PathLike[str] | None = None, *, hint: str | None = None
) -> tuple[list[KeydCandidate], list[str]]:
    """Where to look for keyd, in order, and the places skipped before looking (why)."""
    if explicit:
        return [KeydCandidate(Path(explicit), "--keyd-socket", True)], []
    from_env = os.environ.get(SOCKET_ENV)
    if from_env:
        return [KeydCandidate(Path(from_env), SOCKET_ENV, True)], []
    candidates: list[KeydCandidate] = []
    skipped: list[str] = []
    if hint:
        if os.path.isabs(hint):
            candidates.append(KeydCandidate(Path(hint), "the hint in kmsfs.conf", False))
        else:
            skipped.append(f"kmsfs.conf's hint {hint!r}: not an absolute path")
    config_path = user_config_path()
    try:
        configured = read_user_config(config_path).get(USER_CONFIG_SOCKET)
    except (OSError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else str(exc)
        skipped.append(f"{config_path}: cannot read it: {reason}")
    else:
        if isinstance(configured, str) and os.path.isabs(configured):
            candidates.append(KeydCandidate(Path(configured), str(config_path), False))
        elif configured is not None:
            skipped.append(f"{config_path}: {USER_CONFIG_SOCKET} is not an absolute path")
    default = default_socket_path()
    candidates.append(KeydCandidate(default, "the default", False))
    if default != SYSTEM_SOCKET:
        # a user's last resort: the machine's system keyd (one keyd serving every user,
        # its socket open to all and its key policies deciding; see the README's "Who
        # runs keyd"). It is trusted like any other: owned by root, you or --keyd-uid.
        candidates.append(KeydCandidate(SYSTEM_SOCKET, "the system keyd", False))
    return candidates, skipped


def probe_keyd(path: Path, expected: frozenset[int]) -> None:
    """Check ``path`` as every client does and connect once; raises why it is no keyd
    for us (:class:`KeydUntrusted` or :class:`KeydUnavailable`)."""
    from kmsfs.kms.trust import check_peer, check_socket_path

    resolved = check_socket_path(path, expected)
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        probe.settimeout(PROBE_TIMEOUT)
        probe.connect(str(resolved))
        check_peer(probe, path, expected)
    except OSError as exc:
        reason = exc.strerror or "timed out"
        raise KeydUnavailable(f"keyd at {path}: nothing answers ({reason})") from None
    finally:
        probe.close()


def find_keyd(
    explicit: str | os.PathLike[str] | None = None,
    *,
    hint: str | None = None,
    keyd_uid: str | int | None = None,
) -> Path:
    """The socket of the keyd to talk to, by the rule in this module's doc.

    A named socket (``explicit``, ``$KMSFS_KEYD_SOCKET``) is returned unchecked: the
    client checks it when it connects. Otherwise each candidate is checked
    (:mod:`kmsfs.kms.trust`) and probed; raises :class:`KeydUntrusted` (if one was
    refused) or :class:`KeydUnavailable` naming every place looked at.
    """
    from kmsfs.kms.trust import expected_keyd_uids

    candidates, skipped = keyd_candidates(explicit, hint=hint)
    if candidates[0].named:
        return candidates[0].path
    expected = expected_keyd_uids(keyd_uid)
    reasons = list(skipped)
    refused = False
    for candidate in candidates:
        try:
            probe_keyd(candidate.path, expected)
        except KeydUnavailable as exc:
            refused = refused or isinstance(exc, KeydUntrusted)
            reasons.append(f"{candidate.origin}: {exc}")
            continue
        return candidate.path
    error = KeydUntrusted if refused else KeydUnavailable
    raise error(
        "no keyd found; looked at "
        + "; ".join(reasons)
        + f". Start one with 'kmsfs keyd serve -d', or name its socket with "
        f"--keyd-socket or {SOCKET_ENV}"
    )
