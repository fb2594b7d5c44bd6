"""Who is calling keyd: the Unix socket's peer credentials, or a SigV4-signed user.

:class:`Caller` is what the transport says about a request: ``SO_PEERCRED`` (pid, uid,
gid at connect time) on the Unix socket; the peer's address on TCP (no uid: a network
caller has none); and, when the request carried a valid AWS Signature V4, the IAM user
name and access key id it was signed with (:mod:`kmsfs.kms.sigv4`). A signed request
is the signed user's, on either transport. :mod:`kmsfs.kms.principal` turns a Caller
into the principal that policies and audit records name (ARN, groups, executable).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Caller:
    #: peer credentials (None for a TCP connection)
    uid: int | None
    gid: int | None
    pid: int | None
    #: the IAM user name a valid SigV4 signature names (``keyd credentials``), else None
    signed_user: str | None = None
    #: the access key id that signature used
    access_key_id: str | None = None
    #: the peer's IP address (TCP), for ``aws:SourceIp`` and ``sourceIPAddress``
    source_ip: str | None = None

    @property
    def is_signed(self) -> bool:
        return self.signed_user is not None

    @property
    def user_name(self) -> str:
        """``aws:username``: the signed user, the login name of the uid, or ``uid-<n>``."""
        if self.signed_user is not None:
            return self.signed_user
        if self.uid is None:
            return "anonymous"
        from kmsfs.kms.principal import login_name

        name = login_name(self.uid)
        return name if name is not None else f"uid-{self.uid}"
