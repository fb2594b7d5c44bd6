"""Where keyd keeps its keystore and its socket by default.

Order of precedence everywhere: an explicit command-line path, then an
environment variable, then the per-user (or, for root, system-wide) default.
"""

from __future__ import annotations

import os
from pathlib import Path

KEYSTORE_ENV = "KMSFS_KEYSTORE"
SOCKET_ENV = "KMSFS_KEYD_SOCKET"


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
        return Path("/run/kmsfs/keyd.sock")
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
