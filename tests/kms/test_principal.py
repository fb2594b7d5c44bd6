"""How keyd names its callers (kmsfs.kms.principal): ARNs, groups, executable, and
the audit filters that use them."""

from __future__ import annotations

import grp
import os
import pwd
from pathlib import Path

import pytest

from kmsfs.kms import audit
from kmsfs.kms import principal as principal_module
from kmsfs.kms.caller import Caller
from kmsfs.kms.principal import (
    PrincipalResolver,
    parse_status_groups,
    resolve,
)

ACCOUNT = "123456789012"
NOBODY = 65534
PID = 4711


def _unnamed(lookup, start: int = 4242) -> int:
    """A uid/gid number with no entry in the user/group database."""
    for number in range(start, start + 10_000):
        try:
            lookup(number)
        except KeyError:
            return number
    raise AssertionError("no unused number")


def _fake_proc(tmp_path: Path, status: str | None, exe: str | None = None) -> str:
    directory = tmp_path / str(PID)
    directory.mkdir(parents=True)
    if status is not None:
        (directory / "status").write_text(status)
    if exe is not None:
        (directory / "exe").symlink_to(exe)
    return str(tmp_path)


def test_a_uid_with_a_login_name_is_that_iam_user(tmp_path: Path) -> None:
    name = pwd.getpwuid(NOBODY).pw_name
    caller = Caller(uid=NOBODY, gid=NOBODY, pid=PID)
    who = resolve(caller, ACCOUNT, proc=_fake_proc(tmp_path, "Groups:\t\n"))
    assert who.arn == f"arn:aws:iam::{ACCOUNT}:user/{name}"
    assert who.arns == (who.arn,)
    assert not who.is_root
    assert who.user_name == name == caller.user_name
    assert who.user_identity() == {
        "type": "IAMUser",
        "principalId": str(NOBODY),
        "arn": f"arn:aws:iam::{ACCOUNT}:user/{name}",
        "accountId": ACCOUNT,
        "userName": name,
        "uid": NOBODY,
        "gid": NOBODY,
        "pid": PID,
        "executable": None,
    }


def test_a_uid_without_a_name_is_user_uid_n(tmp_path: Path) -> None:
    uid = _unnamed(pwd.getpwuid)
    caller = Caller(uid=uid, gid=uid, pid=PID)
    who = resolve(caller, ACCOUNT, proc=_fake_proc(tmp_path, None))
    assert who.arn == f"arn:aws:iam::{ACCOUNT}:user/uid-{uid}"
    assert who.user_name == f"uid-{uid}" == caller.user_name
    assert who.login is None
    # no status and no login name to ask the user database about: the primary group
    assert who.groups == (principal_module.group_name(uid),)


def test_uid_0_is_the_account_root_and_the_user_root(tmp_path: Path) -> None:
    who = resolve(Caller(uid=0, gid=0, pid=PID), ACCOUNT, proc=_fake_proc(tmp_path, None))
    root_name = pwd.getpwuid(0).pw_name
    assert who.is_root
    assert who.arn == f"arn:aws:iam::{ACCOUNT}:root"
    # a policy may name uid 0 either way
    assert who.arns == (f"arn:aws:iam::{ACCOUNT}:root", f"arn:aws:iam::{ACCOUNT}:user/{root_name}")
    identity = who.user_identity()
    assert identity["type"] == "Root"
    assert identity["principalId"] == ACCOUNT  # as CloudTrail records the root user
    assert identity["arn"] == f"arn:aws:iam::{ACCOUNT}:root"
    assert identity["userName"] == root_name
    assert who.condition_keys()["aws:PrincipalArn"] == f"arn:aws:iam::{ACCOUNT}:root"
    assert who.condition_keys()["aws:userid"] == "0"


def test_groups_come_from_proc_status_as_names_or_numbers(tmp_path: Path) -> None:
    unnamed = _unnamed(grp.getgrgid)
    status = (
        "Name:\tcat\nUmask:\t0022\nUid:\t0\t0\t0\t0\nGid:\t0\t0\t0\t0\n"
        f"FDSize:\t64\nGroups:\t0 {NOBODY} {unnamed} \nNStgid:\t{PID}\n"
    )
    assert parse_status_groups(status) == [0, NOBODY, unnamed]
    who = resolve(
        Caller(uid=NOBODY, gid=NOBODY, pid=PID), ACCOUNT, proc=_fake_proc(tmp_path, status)
    )
    expected = {grp.getgrgid(0).gr_name, grp.getgrgid(NOBODY).gr_name, str(unnamed)}
    assert set(who.groups) == expected
    assert who.condition_keys()["kmsfs:CallerGroups"] == sorted(expected)


def test_groups_fall_back_to_the_user_database(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The process is gone (no /proc/<pid>/status): its user's groups as the user
    database has them."""
    unnamed = _unnamed(grp.getgrgid)
    asked: list[tuple[str, int]] = []

    def getgrouplist(user: str, group: int) -> list[int]:
        asked.append((user, group))
        return [group, unnamed]

    monkeypatch.setattr(principal_module.os, "getgrouplist", getgrouplist)
    name = pwd.getpwuid(NOBODY).pw_name
    who = resolve(Caller(uid=NOBODY, gid=NOBODY, pid=PID), ACCOUNT, proc=_fake_proc(tmp_path, None))
    assert asked == [(name, NOBODY)]
    assert set(who.groups) == {grp.getgrgid(NOBODY).gr_name, str(unnamed)}


def test_executable_is_the_exe_link_or_none_when_unreadable(tmp_path: Path) -> None:
    caller = Caller(uid=NOBODY, gid=NOBODY, pid=PID)
    unreadable = resolve(caller, ACCOUNT, proc=_fake_proc(tmp_path / "a", "Groups:\n"))
    assert unreadable.executable is None
    assert unreadable.condition_keys()["kmsfs:CallerExecutable"] is None
    readable = resolve(
        caller, ACCOUNT, proc=_fake_proc(tmp_path / "b", "Groups:\n", "/usr/bin/cat")
    )
    assert readable.executable == "/usr/bin/cat"


def test_a_real_process_is_seen_as_it_runs() -> None:
    me = resolve(Caller(uid=os.getuid(), gid=os.getgid(), pid=os.getpid()), ACCOUNT)
    assert me.executable == os.path.realpath(f"/proc/{os.getpid()}/exe")
    assert set(me.groups) >= {principal_module.group_name(g) for g in os.getgroups()}


def test_condition_keys(tmp_path: Path) -> None:
    status = f"Groups:\t{NOBODY}\n"
    who = resolve(
        Caller(uid=NOBODY, gid=NOBODY, pid=PID),
        ACCOUNT,
        proc=_fake_proc(tmp_path, status, "/usr/bin/env"),
    )
    name = pwd.getpwuid(NOBODY).pw_name
    assert who.condition_keys() == {
        "aws:PrincipalArn": f"arn:aws:iam::{ACCOUNT}:user/{name}",
        "aws:PrincipalAccount": ACCOUNT,
        "aws:username": name,
        "aws:userid": str(NOBODY),
        "kms:CallerAccount": ACCOUNT,
        "kmsfs:CallerUid": str(NOBODY),
        "kmsfs:CallerGroups": [grp.getgrgid(NOBODY).gr_name],
        "kmsfs:CallerExecutable": "/usr/bin/env",
    }


def test_resolver_keeps_an_answer_for_its_ttl_only(tmp_path: Path) -> None:
    proc = _fake_proc(tmp_path, "Groups:\t0\n")
    now = [100.0]
    resolver = PrincipalResolver(ACCOUNT, ttl=1.0, proc=proc, clock=lambda: now[0])
    caller = Caller(uid=NOBODY, gid=NOBODY, pid=PID)
    first = resolver(caller)
    assert grp.getgrgid(0).gr_name in first.groups
    (tmp_path / str(PID) / "status").write_text("Groups:\t\n")
    now[0] += 0.5
    assert resolver(caller) is first
    now[0] += 0.6
    assert grp.getgrgid(0).gr_name not in resolver(caller).groups
    # another pid is its own entry
    assert resolver(Caller(uid=NOBODY, gid=NOBODY, pid=PID + 1)).groups == (
        grp.getgrgid(NOBODY).gr_name,
    )


# ------------------------------------------------------------------ audit filters
def _event(user: str, uid: int, error: str | None = None) -> dict[str, object]:
    arn = f"arn:aws:iam::{ACCOUNT}:root" if uid == 0 else f"arn:aws:iam::{ACCOUNT}:user/{user}"
    event: dict[str, object] = {
        "eventName": "Decrypt",
        "userIdentity": {"arn": arn, "accountId": ACCOUNT, "userName": user, "uid": uid},
    }
    if error:
        event["errorCode"] = error
    return event


def test_audit_user_filter_takes_a_name_a_uid_or_an_arn() -> None:
    alice, root = _event("alice", 1000), _event("root", 0)
    for name in ("alice", "1000", f"arn:aws:iam::{ACCOUNT}:user/alice"):
        assert audit.matches(alice, user=name)
        assert not audit.matches(root, user=name)
    for name in ("root", "0", f"arn:aws:iam::{ACCOUNT}:root", f"arn:aws:iam::{ACCOUNT}:user/root"):
        assert audit.matches(root, user=name)
        assert not audit.matches(alice, user=name)
    assert not audit.matches({"eventName": "Decrypt"}, user="alice")


def test_audit_denied_filter() -> None:
    assert audit.matches(_event("a", 1, "AccessDeniedException"), denied=True)
    assert not audit.matches(_event("a", 1, "NotFoundException"), denied=True)
    assert not audit.matches(_event("a", 1), denied=True)
    assert audit.matches(_event("a", 1), denied=False)
