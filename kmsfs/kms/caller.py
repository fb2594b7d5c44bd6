"""Who is calling keyd: taken from the Unix socket's peer credentials.

:class:`Caller` is what ``SO_PEERCRED`` says (pid, uid, gid at connect time);
:mod:`kmsfs.kms.principal` turns it into the principal that policies and audit
records name (ARN, groups, executable).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Caller:
    uid: int
    gid: int
    pid: int

    @property
    def user_name(self) -> str:
        """``aws:username``: the login name of the uid, or ``uid-<n>`` when it has none."""
        from kmsfs.kms.principal import login_name

        name = login_name(self.uid)
        return name if name is not None else f"uid-{self.uid}"
