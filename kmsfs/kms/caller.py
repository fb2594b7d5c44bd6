"""Who is calling keyd: the Unix socket's peer credentials, or a SigV4-signed user.

:class:`Caller` is what the transport says about a request: ``SO_PEERCRED`` (pid, uid,
gid at connect time) on the Unix socket; the peer's address on TCP (no uid: a network
caller has none); and, when the request carried a valid AWS Signature V4, the IAM user
name and access key id it was signed with (:mod:`kmsfs.kms.sigv4`). A signed request
is the signed user's, on either transport. :mod:`kmsfs.kms.principal` turns a Caller
into the principal that policies and audit records name (ARN, groups, executable).

:class:`ForwardedCaller` is the identity a trusted forwarder (a root kmsfs mount, or a
principal keyd allows ``kmsfs:ForwardCaller``) sends along with a request made on behalf
of one of its own callers, in the header :data:`FORWARDED_CALLER_HEADER`; keyd then
evaluates the request as that user's, with ``kms:ViaService`` = :data:`VIA_SERVICE`
(AWS's model for a service calling KMS on a user's behalf).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

#: the HTTP header a forwarder names its caller in
FORWARDED_CALLER_HEADER = "X-Kmsfs-Forwarded-Caller"
#: kms:ViaService of a forwarded request, and the audit record's ``invokedBy``
VIA_SERVICE = "kmsfs-mount"
#: uid and gid limits of Linux (32-bit, (uid_t)-1 is "no change", never a caller)
_MAX_ID = 0xFFFFFFFE
#: pid limit of Linux (PID_MAX_LIMIT, 2**22)
_MAX_PID = 1 << 22
_NUMBER = re.compile(r"(?:0|[1-9][0-9]{0,9})")
_FILESYSTEM_ID = re.compile(r"[0-9a-f]{32}")
_FIELDS = ("uid", "gid", "pid", "fs")


@dataclass(frozen=True, slots=True)
class ForwardedCaller:
    """The user a forwarded request is made for: FUSE's ``ctx.uid``, ``ctx.gid`` and
    ``ctx.pid``, and the kmsfs filesystem id of the mount that forwards it."""

    uid: int
    gid: int
    pid: int
    #: the kmsfs filesystem id of the mount (32 hex digits; empty: none named)
    filesystem_id: str = ""

    def __post_init__(self) -> None:
        for name, value, limit in (
            ("uid", self.uid, _MAX_ID),
            ("gid", self.gid, _MAX_ID),
            ("pid", self.pid, _MAX_PID),
        ):
            if type(value) is not int or not 0 <= value <= limit:
                raise ValueError(f"forwarded caller: {name} out of range")
        if self.filesystem_id and not _FILESYSTEM_ID.fullmatch(self.filesystem_id):
            raise ValueError("forwarded caller: fs is not 32 lower-case hex digits")

    def header_value(self) -> str:
        """``uid=1001,gid=1001,pid=4242,fs=<32 hex>`` (``fs=`` left out when empty)."""
        value = f"uid={self.uid},gid={self.gid},pid={self.pid}"
        return f"{value},fs={self.filesystem_id}" if self.filesystem_id else value

    @classmethod
    def parse(cls, text: str) -> ForwardedCaller:
        """The header's value, strictly: ``uid``, ``gid`` and ``pid`` once each as
        decimal numbers without sign or leading zeros, then optionally ``fs``; nothing
        else, no spaces. Raises ValueError (without echoing the text)."""
        if not isinstance(text, str) or len(text) > 128:
            raise ValueError("forwarded caller: malformed header")
        parts = text.split(",")
        if len(parts) not in (3, 4):
            raise ValueError("forwarded caller: expected uid=,gid=,pid=[,fs=]")
        values: dict[str, str] = {}
        for expected, part in zip(_FIELDS, parts, strict=False):
            name, equals, value = part.partition("=")
            if name != expected or not equals:
                raise ValueError("forwarded caller: expected uid=,gid=,pid=[,fs=] in that order")
            values[name] = value
        for name in ("uid", "gid", "pid"):
            if not _NUMBER.fullmatch(values[name]):
                raise ValueError(f"forwarded caller: {name} is not a decimal number")
        filesystem_id = values.get("fs", "")
        if "fs" in values and not _FILESYSTEM_ID.fullmatch(filesystem_id):
            raise ValueError("forwarded caller: fs is not 32 lower-case hex digits")
        return cls(int(values["uid"]), int(values["gid"]), int(values["pid"]), filesystem_id)


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
    #: the X-Kmsfs-Forwarded-Caller header as received (not yet validated or trusted;
    #: KeyService.handle does both before anything runs)
    forwarded_header: str | None = None
    #: for the caller a forwarded request is evaluated as: the peer that forwarded it
    #: (who was trusted to); None for every direct caller
    forwarded_by: Caller | None = None
    #: the forwarding mount's filesystem id (forwarded callers only; may be empty)
    filesystem_id: str = ""

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
