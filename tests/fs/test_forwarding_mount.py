"""A root mount with ``-o allow_other`` forwards each request's caller to keyd (issue 17):
the key policy decides per user. A (uid 4242) may Decrypt through the mount, B (nobody)
may not: B gets EACCES on a 0666 file, also while A holds it open (the mount has the
key in memory then; it still asks keyd as B).
"""

from __future__ import annotations

import errno
import json
import os
import pwd
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from kmsfs.fs.config import load_config
from kmsfs.kms.client import KMSClient
from tests.conftest import Keyd
from tests.fs.helpers import Mount, MountFactory, run_as_child
from tests.kms.users import NOBODY, needs_other_users, user_prefix

pytestmark = needs_other_users

A = 4242
B = NOBODY


@pytest.fixture
def policy_mount(fs_root: Path, fs_keyd: Keyd) -> Iterator[tuple[Mount, str]]:
    """A root mount (allow_other, forwarding by default) of a cipher directory whose CMK
    root administers and only A may Decrypt with, and only through a kmsfs mount."""
    with KMSClient(fs_keyd.socket) as client:
        account = client.call("GetCallerIdentity", {})["Account"]
        key_id = client.call("CreateKey", {})["KeyMetadata"]["KeyId"]
        a_arn = f"arn:aws:iam::{account}:user/uid-{A}"
        via_mount = {"StringEquals": {"kms:ViaService": "kmsfs-mount"}}
        statements = [
            {
                "Effect": "Allow",
                "Principal": {"AWS": f"arn:aws:iam::{account}:root"},
                "Action": "kms:*",
                "Resource": "*",
            },
            {
                "Effect": "Allow",
                "Principal": {"AWS": a_arn},
                "Action": "kms:Decrypt",
                "Resource": "*",
                "Condition": via_mount,
            },
        ]
        policy = json.dumps({"Version": "2012-10-17", "Statement": statements})
        client.call("PutKeyPolicy", {"KeyId": key_id, "Policy": policy})
    with MountFactory(fs_root, fs_keyd) as factory:
        cipher = factory.init(key=key_id)
        mount = factory.mount(cipher, None, "-o", "allow_other")
        os.chmod(mount.mnt, 0o755)
        yield mount, a_arn


def _open_as(uid: int, path: Path) -> object:
    def attempt() -> object:
        try:
            with open(path, "rb") as f:
                return f.read()
        except OSError as error:
            return errno.errorcode[error.errno]

    return run_as_child(attempt, uid=uid)


def test_b_is_refused_even_while_a_holds_the_file_open(
    policy_mount: tuple[Mount, str], fs_keyd: Keyd
) -> None:
    mount, a_arn = policy_mount
    shared = mount.mnt / "shared"
    shared.write_bytes(b"for A only")  # root: the mount's own key, no forwarding
    os.chmod(shared, 0o666)
    os.mkdir(mount.mnt / "tmp")
    os.chmod(mount.mnt / "tmp", 0o1777)

    assert _open_as(B, shared) == "EACCES"
    # A opens the file and keeps it open (until its stdin closes)
    holder = subprocess.Popen(
        [*user_prefix(A), sys.executable, "-c",
         "import sys; f = open(sys.argv[1], 'rb'); print(f.read().decode(), flush=True); "
         "sys.stdin.read()", str(shared)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        assert holder.stdout is not None
        line = holder.stdout.readline()
        assert line == b"for A only\n", holder.stderr.read() if holder.stderr else b""
        # the file is open (its key in the mount's memory): B is still asked about
        assert _open_as(B, shared) == "EACCES"
        assert _open_as(A, shared) == b"for A only"  # A: from A's own cached answer
    finally:
        holder.communicate(b"", timeout=60)
    assert holder.returncode == 0
    assert _open_as(B, shared) == "EACCES"
    assert _open_as(A, shared) == b"for A only"

    # B may not make data keys: creating a file is refused before it exists
    def create_as_b() -> object:
        try:
            with open(mount.mnt / "tmp" / "b-file", "wb") as f:
                f.write(b"x")
        except OSError as error:
            return errno.errorcode[error.errno]
        return "ok"

    assert run_as_child(create_as_b, uid=B) == "EACCES"
    assert not (mount.mnt / "tmp" / "b-file").exists()

    # keyd's audit: A's Decrypt through the mount names A, the mount and its filesystem
    filesystem_id = load_config(mount.cipher).filesystem_id
    out = fs_keyd.kmsfs("keyd", "audit", "tail", "--json", "-n", "500").stdout.decode()
    records = [json.loads(line) for line in out.splitlines()]
    by_a = [r for r in records if r["eventName"] == "Decrypt" and r["userIdentity"].get("uid") == A]
    assert by_a and all("errorCode" not in r for r in by_a)
    assert by_a[0]["userIdentity"]["invokedBy"] == "kmsfs-mount"
    forwarded_by = by_a[0]["additionalEventData"]["forwardedBy"]
    assert forwarded_by["filesystemId"] == filesystem_id
    assert forwarded_by["pid"] == mount.process.pid  # type: ignore[union-attr]
    b_name = pwd.getpwuid(B).pw_name
    by_b = [r for r in records if r["userIdentity"].get("userName") == b_name]
    assert {r["eventName"] for r in by_b} == {"Decrypt", "GenerateDataKey"}
    assert all(r["errorCode"] == "AccessDeniedException" for r in by_b)
    # A's own answer was cached: A's opens cost fewer Decrypts than A's opens
    assert len(by_a) < 3
