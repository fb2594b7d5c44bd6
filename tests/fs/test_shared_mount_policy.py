"""Issue 17 end to end: key policies reach a shared mount.

Root mounts one cipher directory with ``-o allow_other --audit-opens`` for two
unprivileged users, A (uid 4242) and B (nobody). The tree's own CMK lets both use it
through the mount; the directory ``secret`` (mode 0777) is bound to a CMK that only A may
use. The kernel's mode bits let B in everywhere: what refuses B is the key policy, which
keyd evaluates as B because the mount forwards each request's caller.
"""

from __future__ import annotations

import errno
import json
import os
import pwd
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from kmsfs.kms.client import KMSClient
from tests.conftest import Keyd
from tests.fs.helpers import Mount, MountFactory, run_as_child
from tests.fs.test_access_audit import access_records, header_id, summary
from tests.kms.users import NOBODY, needs_other_users, user_prefix

pytestmark = needs_other_users

A = 4242
B = NOBODY
CACHE_SECONDS = 1
VIA_MOUNT = {"StringEquals": {"kms:ViaService": "kmsfs-mount"}}
USE = ["kms:Decrypt", "kms:GenerateDataKey", "kms:DescribeKey"]


def _policy(account: str, users: list[str]) -> str:
    statements = [
        {
            "Effect": "Allow",
            "Principal": {"AWS": f"arn:aws:iam::{account}:root"},
            "Action": "kms:*",
            "Resource": "*",
        },
        {
            "Effect": "Allow",
            "Principal": {"AWS": users},
            "Action": USE,
            "Resource": "*",
            "Condition": VIA_MOUNT,
        },
    ]
    return json.dumps({"Version": "2012-10-17", "Statement": statements})


class Shared:
    """The shared mount, its keys and who A and B are to keyd."""

    def __init__(self, mount: Mount, keyd: Keyd, secret_key: str, b_arn: str) -> None:
        self.mount = mount
        self.keyd = keyd
        self.secret_key = secret_key
        self.b_arn = b_arn

    @property
    def mnt(self) -> Path:
        return self.mount.mnt


@pytest.fixture
def shared(fs_root: Path, fs_keyd: Keyd) -> Iterator[Shared]:
    with KMSClient(fs_keyd.socket) as client:
        account = client.call("GetCallerIdentity", {})["Account"]
        a_arn = f"arn:aws:iam::{account}:user/uid-{A}"
        b_arn = f"arn:aws:iam::{account}:user/{pwd.getpwuid(B).pw_name}"
        tree_key = client.call("CreateKey", {"Policy": _policy(account, [a_arn, b_arn])})
        secret_key = client.call("CreateKey", {"Policy": _policy(account, [a_arn])})
    with MountFactory(fs_root, fs_keyd) as factory:
        cipher = factory.init(key=tree_key["KeyMetadata"]["KeyId"])
        mount = factory.mount(
            cipher,
            None,
            "-o",
            "allow_other",
            "--audit-opens",
            "--key-cache-seconds",
            str(CACHE_SECONDS),
        )
        os.chmod(mount.mnt, 0o777)
        secret = mount.mnt / "secret"
        secret.mkdir()
        os.chmod(secret, 0o777)
        # root binds it: the mount's own user, so not forwarded; root administers the key
        bound = fs_keyd.kmsfs("key", "set", str(secret), secret_key["KeyMetadata"]["Arn"])
        assert bound.returncode == 0, bound.stderr.decode()
        yield Shared(mount, fs_keyd, secret_key["KeyMetadata"]["KeyId"], b_arn)


def _as(uid: int, action: Callable[[], object]) -> object:
    """``action`` run as uid: its result, or the errno name of the OSError it raised."""

    def attempt() -> object:
        try:
            return action()
        except OSError as error:
            return errno.errorcode[error.errno]

    return run_as_child(attempt, uid=uid)


def _write(path: Path, data: bytes) -> Callable[[], object]:
    def action() -> object:
        with open(path, "wb") as f:
            f.write(data)
        os.chmod(path, 0o666)
        return "ok"

    return action


def _read(path: Path) -> Callable[[], object]:
    return lambda: path.read_bytes()


def _list(path: Path) -> Callable[[], object]:
    return lambda: sorted(os.listdir(path))


def _stat(path: Path) -> Callable[[], object]:
    return lambda: os.stat(path).st_size


def test_a_bound_directory_is_a_s_alone_names_included(shared: Shared) -> None:
    secret = shared.mnt / "secret"
    assert _as(A, _write(secret / "plan.txt", b"A's plan")) == "ok"
    assert _as(A, _read(secret / "plan.txt")) == b"A's plan"
    assert _as(A, _list(secret)) == ["plan.txt"]
    os.mkdir(secret / "sub")
    os.chmod(secret / "sub", 0o777)
    assert _as(A, _write(secret / "sub" / "deep", b"deeper")) == "ok"

    # B: the entry itself is in the tree's directory, visible; nothing inside it is
    assert "secret" in _as(B, _list(shared.mnt))  # type: ignore[operator]
    assert _as(B, _list(secret)) == "EACCES"
    assert _as(B, _stat(secret / "plan.txt")) == "EACCES"
    assert _as(B, _read(secret / "plan.txt")) == "EACCES"
    assert _as(B, _list(secret / "sub")) == "EACCES"
    assert _as(B, _write(secret / "b-was-here", b"x")) == "EACCES"
    assert _as(A, _list(secret)) == ["plan.txt", "sub"]

    # ... also while A holds the file open (its key in the mount's memory)
    holder = subprocess.Popen(
        [*user_prefix(A), sys.executable, "-c",
         "import sys; f = open(sys.argv[1], 'rb'); print(f.read().decode(), flush=True); "
         "sys.stdin.read()", str(secret / "plan.txt")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline() == b"A's plan\n"
        assert _as(B, _read(secret / "plan.txt")) == "EACCES"
        assert _as(B, _list(secret)) == "EACCES"
    finally:
        holder.communicate(b"", timeout=60)
    assert holder.returncode == 0

    # a grant to B opens the directory to B at once (refusals are never cached) ...
    with KMSClient(shared.keyd.socket) as client:
        grant_id = client.call(
            "CreateGrant",
            {
                "KeyId": shared.secret_key,
                "GranteePrincipal": shared.b_arn,
                "Operations": ["Decrypt"],
            },
        )["GrantId"]
        assert _as(B, _list(secret)) == ["plan.txt", "sub"]
        assert _as(B, _read(secret / "plan.txt")) == b"A's plan"
        client.call("RevokeGrant", {"KeyId": shared.secret_key, "GrantId": grant_id})
    # ... and its revocation shuts B out once B's answers are older than the cache time
    time.sleep(CACHE_SECONDS + 0.5)
    assert _as(B, _read(secret / "plan.txt")) == "EACCES"
    assert _as(B, _list(secret)) == "EACCES"
    assert _as(A, _read(secret / "plan.txt")) == b"A's plan"

    # on disk: the file's header names the bound CMK
    shown = shared.keyd.kmsfs("key", "show", str(secret / "plan.txt"), "--json")
    assert shown.returncode == 0, shown.stderr.decode()
    assert json.loads(shown.stdout)["key_arn"].endswith(shared.secret_key)


def test_the_audit_of_a_scripted_session_matches_one_for_one(shared: Shared) -> None:
    """A creates and opens a file, B is refused opening it, A renames it: exactly those
    events, under the right users, and the chain verifies."""
    mnt = shared.mnt
    secret = mnt / "secret"
    before = len(access_records(shared.keyd.keystore))

    assert _as(A, _write(secret / "doc", b"A's doc")) == "ok"  # Create
    assert _as(A, _read(secret / "doc")) == b"A's doc"  # Open
    # A moves it to the tree's own directory, where B can name it: it keeps its CMK
    assert _as(A, lambda: os.rename(secret / "doc", mnt / "doc") or "ok") == "ok"  # Rename
    assert _as(B, _read(mnt / "doc")) == "EACCES"  # Open, refused by the bound CMK
    file_id = header_id(shared.mount.backing(mnt / "doc"))
    shared.mount.unmount_clean()  # the queue is flushed at unmount

    records = access_records(shared.keyd.keystore)[before:]
    records = [r for r in records if r["userIdentity"]["uid"] in (A, B)]
    create, *rest = records
    assert (create["eventName"], create["additionalEventData"]["outcome"]) == (
        "Create",
        "Allowed",
    )
    assert create["userIdentity"]["uid"] == A
    assert [summary(r) for r in rest] == [
        ("Open", "Allowed", file_id, A),
        ("Rename", "Allowed", file_id, A),
        ("Open", "EACCES", file_id, B),
    ]
    verified = shared.keyd.kmsfs("keyd", "audit", "verify")
    assert verified.returncode == 0, verified.stderr.decode()
