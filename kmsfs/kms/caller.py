"""Who is calling keyd: taken from the Unix socket's peer credentials."""

from __future__ import annotations

import pwd
from dataclasses import dataclass
from functools import lru_cache


@lru_cache(maxsize=256)
def user_name(uid: int) -> str:
    """The login name of a uid, or the number itself when it has none."""
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


@dataclass(frozen=True, slots=True)
class Caller:
    uid: int
    gid: int
    pid: int

    @property
    def user_name(self) -> str:
        return user_name(self.uid)
