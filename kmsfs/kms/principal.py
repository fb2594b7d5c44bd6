"""Who a request comes from, as keyd names it: an AWS-style principal for a local uid.

A connection's peer credentials (``SO_PEERCRED``: pid, uid, gid; see
:class:`kmsfs.kms.caller.Caller`) become a :class:`Principal`:

- uid *n* with login name *name* is the IAM user ``arn:aws:iam::<account>:user/<name>``;
  a uid without a name in the user database is ``arn:aws:iam::<account>:user/uid-<n>``.
- uid 0 is the account's root user, ``arn:aws:iam::<account>:root`` (CloudTrail
  ``userIdentity.type`` ``Root``, ``principalId`` the account id, as AWS records its
  root user). It is *also* the IAM user named after its login name
  (``...:user/root``): :attr:`Principal.arns` holds both, so a key policy may name
  either, while :attr:`Principal.arn` (``aws:PrincipalArn``, the audit record's
  ``arn``) is the root ARN. Root of the machine owns keyd: there is no IAM here that
  could delegate the account's rights to anyone else, so the root ARN names uid 0 only.
- The account is the keystore's (``kmsfs keyd init --account-id``; 000000000000 for
  keystores made before the option, as before).

The caller's supplementary groups are read when the request arrives: the ``Groups:``
line of ``/proc/<pid>/status`` (what the kernel checks for that process), or, when the
process is gone or unreadable, the user database (``os.getgrouplist``). Groups are named
by their group name, or their number when they have none. The executable is
``/proc/<pid>/exe``'s target (``None`` when it cannot be read: another user's process
when keyd does not run as root, or a process that has exited).

A request forwarded by a trusted forwarder (a root kmsfs mount; header
``X-Kmsfs-Forwarded-Caller``, see :class:`kmsfs.kms.caller.ForwardedCaller`) is the
forwarded user's: the uid, gid and pid it names are resolved as a socket peer's, except
that groups and executable come from ``/proc/<pid>`` only if that process's effective
or filesystem uid is the forwarded uid (the pid may have exited and been reused by
someone else), else from the user database with no executable. Such a principal has
``via_service`` = ``kmsfs-mount`` (the ``kms:ViaService`` condition key, absent for
direct callers) and ``forwarded_by``, the forwarder's own principal (for the audit).

Looking these up costs two small /proc reads per request; :class:`PrincipalResolver`
keeps the answer for a second per process.

A request signed with AWS Signature V4 (keyd over TCP, or a signed request on the
socket; :mod:`kmsfs.kms.sigv4`) is the signed IAM user's, ``...:user/<name>`` from
``kmsfs keyd credentials create --user NAME``: a :class:`Principal` with no uid, gid, pid,
groups or executable, carrying the access key id and the peer's address
(``aws:SourceIp``, CloudTrail's ``sourceIPAddress``). Its ``principalId`` is a stable
``AIDA...`` id derived from the account and name, like IAM's unique user ids. Such a
user is never root, whatever its name (``kmsfs keyd credentials`` refuses ``root``).
"""

from __future__ import annotations

import base64
import grp
import hashlib
import os
import pwd
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from kmsfs.kms.caller import VIA_SERVICE, Caller

DEFAULT_ACCOUNT = "000000000000"
ROOT_UID = 0


@lru_cache(maxsize=1024)
def login_name(uid: int) -> str | None:
    """The login name of *uid*, or None when the user database has none."""
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return None


@lru_cache(maxsize=4096)
def group_name(gid: int) -> str:
    """The name of group *gid*, or the number (as text) when it has none."""
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def parse_status_groups(status_text: str) -> list[int] | None:
    """The gids of the ``Groups:`` line of a ``/proc/<pid>/status`` text (None if absent)."""
    for line in status_text.splitlines():
        if line.startswith("Groups:"):
            return [int(field) for field in line[len("Groups:") :].split()]
    return None


@dataclass(frozen=True, slots=True)
class Principal:
    """The caller of one request, as policies and audit records see it."""

    account: str
    #: None for a SigV4-signed user (see the module's docstring)
    uid: int | None
    gid: int | None
    pid: int | None
    #: login name (None when the uid has none), or the signed IAM user's name
    login: str | None
    #: supplementary groups (and the primary group), names or numbers, sorted
    groups: tuple[str, ...]
    #: realpath of the process's executable, None when unreadable
    executable: str | None
    #: the access key id of a SigV4-signed request (None for a peer-credentials caller)
    access_key_id: str | None = None
    #: the peer's IP address (TCP), None on the Unix socket
    source_ip: str | None = None
    #: False only for the record of a network request refused before it was
    #: authenticated (bad signature, unknown access key): no one is named then
    authenticated: bool = True
    #: kms:ViaService of a forwarded request ("kmsfs-mount"), None for a direct caller
    via_service: str | None = None
    #: the principal that forwarded this caller's request (None: a direct caller)
    forwarded_by: Principal | None = None
    #: the forwarding mount's kmsfs filesystem id ("" when none was named)
    filesystem_id: str = ""

    @property
    def is_root(self) -> bool:
        return self.uid == ROOT_UID

    @property
    def user_name(self) -> str:
        """``aws:username``: the login name, or ``uid-<n>``."""
        return self.login if self.login is not None else f"uid-{self.uid}"

    @property
    def user_arn(self) -> str:
        """The IAM user ARN of this uid (for uid 0 too: ``...:user/root``)."""
        return f"arn:aws:iam::{self.account}:user/{self.user_name}"

    @property
    def root_arn(self) -> str:
        return f"arn:aws:iam::{self.account}:root"

    @property
    def arn(self) -> str:
        """``aws:PrincipalArn``: the root ARN for uid 0, else the user ARN."""
        return self.root_arn if self.is_root else self.user_arn

    @property
    def arns(self) -> tuple[str, ...]:
        """Every ARN that names this caller in a policy's ``Principal``."""
        return (self.root_arn, self.user_arn) if self.is_root else (self.user_arn,)

    @property
    def identity_type(self) -> str:
        """CloudTrail's ``userIdentity.type``."""
        if not self.authenticated:
            return "Unknown"
        return "Root" if self.is_root else "IAMUser"

    @property
    def principal_id(self) -> str:
        """CloudTrail's ``principalId``: the account id for root (as AWS records its root
        user), else the uid as text (AWS's unique user id; here the uid is that id)."""
        if self.is_root:
            return self.account
        if self.uid is None:
            return signed_user_id(self.account, self.user_name)
        return str(self.uid)

    def condition_keys(self) -> dict[str, Any]:
        """The global condition keys this caller brings to every request."""
        keys: dict[str, Any] = {
            "aws:PrincipalArn": self.arn,
            "aws:PrincipalAccount": self.account,
            "aws:username": self.user_name,
            "aws:userid": self.principal_id if self.uid is None else str(self.uid),
            "kms:CallerAccount": self.account,
            "kmsfs:CallerUid": None if self.uid is None else str(self.uid),
            "kmsfs:CallerGroups": list(self.groups),
            "kmsfs:CallerExecutable": self.executable,
        }
        if self.source_ip is not None:  # network callers only, as in AWS
            keys["aws:SourceIp"] = self.source_ip
        if self.via_service is not None:  # AWS: present only when a service calls for a user
            keys["kms:ViaService"] = self.via_service
        return keys

    def user_identity(self) -> dict[str, Any]:
        """The audit record's ``userIdentity``: CloudTrail's fields (``accessKeyId``
        for a signed request), plus kmsfs's ``uid``, ``gid``, ``pid`` and ``executable``."""
        if not self.authenticated:
            # nobody was authenticated: name no one (CloudTrail's "Unknown" identity)
            unknown: dict[str, Any] = {"type": "Unknown", "accountId": self.account}
            if self.access_key_id is not None:
                unknown["accessKeyId"] = self.access_key_id
            return unknown
        identity: dict[str, Any] = {
            "type": self.identity_type,
            "principalId": self.principal_id,
            "arn": self.arn,
            "accountId": self.account,
            "userName": self.user_name,
            "uid": self.uid,
            "gid": self.gid,
            "pid": self.pid,
            "executable": self.executable,
        }
        if self.access_key_id is not None:
            identity["accessKeyId"] = self.access_key_id
        if self.via_service is not None:  # CloudTrail names the calling service so
            identity["invokedBy"] = self.via_service
        return identity

    def forwarded_event_data(self) -> dict[str, Any] | None:
        """``additionalEventData.forwardedBy`` of a forwarded request's record: the
        forwarder's ARN and pid and the mount's filesystem id (None: not forwarded)."""
        forwarder = self.forwarded_by
        if forwarder is None:
            return None
        return {"arn": forwarder.arn, "pid": forwarder.pid, "filesystemId": self.filesystem_id}

    def caller_identity(self) -> dict[str, Any]:
        """The GetCallerIdentity answer (STS's Arn/Account/UserId, plus kmsfs's own)."""
        return {
            "Arn": self.arn,
            "Account": self.account,
            "UserId": str(self.uid),
            "UserName": self.user_name,
            "Gid": self.gid,
            "Groups": list(self.groups),
            "Executable": self.executable,
        }


def _read_text(path: str) -> str | None:
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            return f.read()
    except OSError:
        return None


def _groups_from_user_db(login: str | None, gid: int) -> list[int]:
    if login is None:
        return [gid]
    try:
        return os.getgrouplist(login, gid)
    except OSError:
        return [gid]


def signed_user_id(account: str, user_name: str) -> str:
    """A stable IAM-style unique id (``AIDA`` + 17 base32 characters) for a signed user."""
    digest = hashlib.sha256(f"{account}:{user_name}".encode()).digest()
    return "AIDA" + base64.b32encode(digest).decode("ascii")[:17]


def signed_principal(caller: Caller, account: str) -> Principal:
    """The principal of a SigV4-signed request: the IAM user it was signed for."""
    assert caller.signed_user is not None
    return Principal(
        account=account,
        uid=None,
        gid=None,
        pid=None,
        login=caller.signed_user,
        groups=(),
        executable=None,
        access_key_id=caller.access_key_id,
        source_ip=caller.source_ip,
    )


def unauthenticated_principal(caller: Caller, account: str) -> Principal:
    """Who a refused, unauthenticated network request is recorded as: no user, the
    access key id it claimed (if any) and its address."""
    return Principal(
        account=account,
        uid=caller.uid,
        gid=caller.gid,
        pid=caller.pid,
        login="anonymous",
        groups=(),
        executable=None,
        access_key_id=caller.access_key_id,
        source_ip=caller.source_ip,
        authenticated=False,
    )


def parse_status_uids(status_text: str) -> tuple[int, ...]:
    """The ``Uid:`` line of a ``/proc/<pid>/status`` text: real, effective, saved, fs."""
    for line in status_text.splitlines():
        if line.startswith("Uid:"):
            try:
                return tuple(int(field) for field in line[len("Uid:") :].split())
            except ValueError:
                return ()
    return ()


def resolve(caller: Caller, account: str, *, proc: str = "/proc") -> Principal:
    """Look up *caller*'s groups and executable now (see the module's docstring)."""
    if caller.signed_user is not None:
        return signed_principal(caller, account)
    if caller.uid is None or caller.gid is None or caller.pid is None:
        return unauthenticated_principal(caller, account)
    forwarded = caller.forwarded_by is not None
    login = login_name(caller.uid)
    base = f"{proc}/{caller.pid}"
    status = _read_text(f"{base}/status")
    if forwarded and status is not None:
        uids = parse_status_uids(status)
        # the forwarder names a pid; /proc/<pid> speaks for the user only while that
        # process is the user's (effective or filesystem uid, as FUSE reports fsuid)
        if len(uids) < 4 or caller.uid not in (uids[1], uids[3]):
            status = None
    gids = parse_status_groups(status) if status is not None else None
    if gids is None:
        gids = _groups_from_user_db(login, caller.gid)
    executable: str | None = None
    if not forwarded or status is not None:
        try:
            executable = os.readlink(f"{base}/exe")  # the kernel's canonical path
        except OSError:
            executable = None
    groups = sorted({group_name(gid) for gid in (caller.gid, *gids)})
    forwarder = None
    if caller.forwarded_by is not None:
        forwarder = resolve(caller.forwarded_by, account, proc=proc)
    return Principal(
        account=account,
        uid=caller.uid,
        gid=caller.gid,
        pid=caller.pid,
        login=login,
        groups=tuple(groups),
        executable=executable,
        via_service=VIA_SERVICE if forwarder is not None else None,
        forwarded_by=forwarder,
        filesystem_id=caller.filesystem_id if forwarder is not None else "",
    )


class PrincipalResolver:
    """:func:`resolve` with a short per-process memory.

    Looking a caller up costs about 27 µs (two /proc reads and a readlink; measured on
    the 2-core test machine), about a tenth of a whole Decrypt round trip with 8
    clients, so an answer is reused for *ttl* seconds for the same (pid, uid, gid):
    a hit costs a dict lookup. A change of groups (``setgroups``) or executable
    (``exec``) shows after at most *ttl* seconds. A pid reused within *ttl* by a
    process with the same uid and gid gets the old process's groups and executable:
    both processes belong to the same user, who could ptrace either, so executable
    conditions are no boundary between one user's processes anyway.
    """

    def __init__(
        self,
        account: str,
        *,
        ttl: float = 1.0,
        proc: str = "/proc",
        clock: Callable[[], float] = time.monotonic,
        max_entries: int = 4096,
    ) -> None:
        self.account = account
        self.ttl = ttl
        self.proc = proc
        self.clock = clock
        self.max_entries = max_entries
        self._cache: dict[tuple[Any, ...], tuple[float, Principal]] = {}

    def __call__(self, caller: Caller) -> Principal:
        if caller.signed_user is not None or caller.uid is None:
            return resolve(caller, self.account)  # no /proc lookup to save
        now = self.clock()
        cache_key: tuple[Any, ...] = (caller.pid, caller.uid, caller.gid)
        if caller.forwarded_by is not None:
            cache_key = (*cache_key, caller.forwarded_by, caller.filesystem_id)
        cached = self._cache.get(cache_key)
        if cached is not None and now - cached[0] < self.ttl:
            return cached[1]
        principal = resolve(caller, self.account, proc=self.proc)
        if self.ttl > 0:
            if len(self._cache) >= self.max_entries:
                self._cache = {k: v for k, v in self._cache.items() if now - v[0] < self.ttl}
                if len(self._cache) >= self.max_entries:
                    self._cache.clear()
            self._cache[cache_key] = (now, principal)
        return principal


@dataclass(frozen=True)
class AccountAccess:
    """Who may call the account-level operations (CreateKey, GenerateRandom), which
    in AWS an IAM policy governs and no key policy can: ``None`` sets mean everyone.

    Given to keyd as ``--account-users`` (see :meth:`parse`); root always may.
    """

    uids: frozenset[int] | None = None
    groups: frozenset[str] = frozenset()
    #: SigV4-signed IAM users (keyd over TCP, ``kmsfs keyd credentials``) by name
    iam_users: frozenset[str] = frozenset()

    @classmethod
    def parse(cls, text: str | None) -> AccountAccess:
        """``alice,1001,@staff,iam:build``: login names, uids, ``@group`` names and
        ``iam:NAME`` for a SigV4-signed user (a comma list). Raises ValueError naming an
        unknown user or group."""
        if text is None:
            return cls()
        uids: set[int] = set()
        groups: set[str] = set()
        iam_users: set[str] = set()
        for item in (part.strip() for part in text.split(",")):
            if not item:
                continue
            if item.startswith("iam:"):
                if not item[4:]:
                    raise ValueError("iam: needs a user name (iam:NAME)")
                iam_users.add(item[4:])
            elif item.startswith("@"):
                name = item[1:]
                try:
                    grp.getgrnam(name) if not name.isdigit() else grp.getgrgid(int(name))
                except KeyError:
                    raise ValueError(f"no group {name!r}") from None
                groups.add(group_name(int(name)) if name.isdigit() else name)
            elif item.isdigit():
                uids.add(int(item))
            else:
                try:
                    uids.add(pwd.getpwnam(item).pw_uid)
                except KeyError:
                    raise ValueError(f"no user {item!r}") from None
        return cls(frozenset(uids), frozenset(groups), frozenset(iam_users))

    def allows(self, principal: Principal) -> bool:
        if self.uids is None:
            return True
        if principal.uid is None:  # a SigV4-signed user: named by iam:NAME only
            return principal.authenticated and principal.login in self.iam_users
        if principal.is_root or principal.uid in self.uids:
            return True
        return any(name in self.groups for name in principal.groups)
