"""Forwarded caller identity (issue 17): a trusted forwarder (root, or a principal named
by ``keyd serve --forwarders``) makes keyd requests as one of its own callers, with the
header X-Kmsfs-Forwarded-Caller; keyd evaluates them as that user's, with
kms:ViaService = kmsfs-mount, and audits both identities.

Real keyd, real peer credentials: A is uid 4242 (no login name), B is nobody (65534),
whom keyd trusts to forward (--forwarders); A is trusted by nobody.
"""

from __future__ import annotations

import json
import os
import pwd
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from kmsfs.errors import AccessDeniedException, ValidationException
from kmsfs.kms.caller import Caller, ForwardedCaller
from kmsfs.kms.client import KMSClient
from kmsfs.kms.principal import resolve
from tests.conftest import Keyd, run_kmsfs
from tests.kms.users import ACCOUNT, NOBODY, needs_other_users, user_env, user_prefix

A = 4242
B = NOBODY
A_ARN = f"arn:aws:iam::{ACCOUNT}:user/uid-{A}"
B_ARN = f"arn:aws:iam::{ACCOUNT}:user/{pwd.getpwuid(NOBODY).pw_name}"
ROOT_ARN = f"arn:aws:iam::{ACCOUNT}:root"
FS_ID = "0123456789abcdef0123456789abcdef"
CONTEXT = {"kmsfs:file": "report.txt"}

# One call through kmsfs's client as whoever runs it, forwarding the caller on stdin
_CALL_FORWARDED = """
import json, sys
from kmsfs.errors import KMSError
from kmsfs.kms.caller import ForwardedCaller
from kmsfs.kms.client import KMSClient
operation, params, forwarded = json.load(sys.stdin)
try:
    with KMSClient() as client:
        on_behalf_of = ForwardedCaller(*forwarded) if forwarded else None
        print(json.dumps(client.call(operation, params, on_behalf_of=on_behalf_of)))
except KMSError as exc:
    print(json.dumps({"__type": exc.aws_type, "message": exc.message}))
"""


def call_forwarding(
    uid: int, keyd: Keyd, operation: str, forwarded: ForwardedCaller | None, **params: Any
) -> dict[str, Any]:
    """``operation`` as uid, forwarding ``forwarded``: the response or ``{"__type"...}``."""
    fields = None
    if forwarded is not None:
        fields = [forwarded.uid, forwarded.gid, forwarded.pid, forwarded.filesystem_id]
    result = subprocess.run(
        [*user_prefix(uid), sys.executable, "-c", _CALL_FORWARDED],
        input=json.dumps([operation, params, fields]).encode(),
        capture_output=True,
        env=user_env(keyd),
        timeout=120,
    )
    assert result.returncode == 0, result.stderr.decode()
    return json.loads(result.stdout)


def audit(keyd: Keyd, *args: str) -> list[dict[str, Any]]:
    out = keyd.kmsfs("keyd", "audit", "tail", "--json", "-n", "200", *args).stdout.decode()
    return [json.loads(line) for line in out.splitlines()]


def policy(*statements: dict[str, Any]) -> str:
    return json.dumps({"Version": "2012-10-17", "Statement": list(statements)})


# ------------------------------------------------------------------ the header itself
def test_header_round_trip_and_strict_parse() -> None:
    caller = ForwardedCaller(1001, 1002, 4242, FS_ID)
    assert caller.header_value() == f"uid=1001,gid=1002,pid=4242,fs={FS_ID}"
    assert ForwardedCaller.parse(caller.header_value()) == caller
    assert ForwardedCaller.parse("uid=0,gid=0,pid=1") == ForwardedCaller(0, 0, 1)
    for bad in (
        "",
        "uid=1,gid=1",
        "gid=1,uid=1,pid=1",
        "uid=1,gid=1,pid=1,fs=XYZ",
        "uid=1,gid=1,pid=1,fs=" + FS_ID.upper(),
        "uid=01,gid=1,pid=1",
        "uid=-1,gid=1,pid=1",
        "uid=+1,gid=1,pid=1",
        "uid= 1,gid=1,pid=1",
        "uid=1,gid=1,pid=1,fs=" + FS_ID + ",x=1",
        "uid=1,gid=1,pid=1,uid=2",  # a header sent twice is joined: refused
        "uid=4294967295,gid=1,pid=1",  # (uid_t)-1
        "uid=1,gid=1,pid=99999999",
        "uid=1,gid=1,pid=1,fs=" + FS_ID + "\n",
    ):
        with pytest.raises(ValueError):
            ForwardedCaller.parse(bad)


def test_forwarded_principal_takes_proc_only_from_the_users_own_process(tmp_path: Path) -> None:
    """/proc/<pid> speaks for the forwarded user only while that process is theirs."""
    proc = tmp_path / "proc"
    (proc / "77").mkdir(parents=True)
    (proc / "77" / "status").write_text("Uid:\t0\t0\t0\t0\nGroups:\t0 4242\n")
    os.symlink("/usr/bin/evil", proc / "77" / "exe")
    mount = Caller(uid=0, gid=0, pid=os.getpid())
    forwarded = Caller(uid=A, gid=A, pid=77, forwarded_by=mount, filesystem_id=FS_ID)
    principal = resolve(forwarded, ACCOUNT, proc=str(proc))
    assert principal.uid == A and principal.executable is None
    assert principal.groups == (str(A),)  # the user database: uid 4242 has no entry
    assert principal.condition_keys()["kms:ViaService"] == "kmsfs-mount"
    assert principal.user_identity()["invokedBy"] == "kmsfs-mount"
    assert principal.forwarded_event_data() == {
        "arn": ROOT_ARN,
        "pid": os.getpid(),
        "filesystemId": FS_ID,
    }
    # the same pid, now A's process: its groups and executable count
    (proc / "77" / "status").write_text(f"Uid:\t{A}\t{A}\t{A}\t{A}\nGroups:\t{A} 0\n")
    principal = resolve(forwarded, ACCOUNT, proc=str(proc))
    assert principal.executable == "/usr/bin/evil" and "root" in principal.groups
    # a direct caller has no kms:ViaService and no invokedBy
    direct = resolve(Caller(uid=A, gid=A, pid=77), ACCOUNT, proc=str(proc))
    assert "kms:ViaService" not in direct.condition_keys()
    assert "invokedBy" not in direct.user_identity()


# --------------------------------------------------------------------- a real keyd
@pytest.fixture
def forwarding_keyd(keyd_factory: Callable[..., Keyd], short_tmp: Path) -> Keyd:
    """root's keyd for every user (socket 0666), trusting B (nobody) to forward."""
    keyd = keyd_factory()
    run_kmsfs(
        "keyd",
        "init",
        "--keystore",
        str(keyd.keystore),
        "--root-key-file",
        str(keyd.root_key),
        "--account-id",
        ACCOUNT,
    )
    os.chmod(short_tmp, 0o755)
    os.chmod(keyd.workdir, 0o755)
    keyd.start("--socket-mode", "0666", "--forwarders", str(B))
    return keyd


def _key_only_a_may_use_via_the_mount(client: KMSClient) -> tuple[str, bytes, bytes]:
    """A key root administers and A may Decrypt only through a kmsfs mount."""
    key_id = client.call("CreateKey", {})["KeyMetadata"]["KeyId"]
    via_mount = {"StringEquals": {"kms:ViaService": "kmsfs-mount"}}
    client.call(
        "PutKeyPolicy",
        {
            "KeyId": key_id,
            "Policy": policy(
                {
                    "Effect": "Allow",
                    "Principal": {"AWS": ROOT_ARN},
                    "Action": "kms:*",
                    "Resource": "*",
                },
                {
                    "Effect": "Allow",
                    "Principal": {"AWS": A_ARN},
                    "Action": "kms:Decrypt",
                    "Resource": "*",
                    "Condition": via_mount,
                },
            ),
        },
    )
    made = client.generate_data_key(key_id, encryption_context=CONTEXT)
    return key_id, made["CiphertextBlob"], made["Plaintext"]


@needs_other_users
def test_root_forwards_a_and_the_policy_sees_a_via_the_mount(forwarding_keyd: Keyd) -> None:
    keyd = forwarding_keyd
    as_a = ForwardedCaller(A, A, os.getpid(), FS_ID)
    with KMSClient(keyd.socket) as client:
        key_id, blob, data_key = _key_only_a_may_use_via_the_mount(client)
        # forwarded by root: evaluated as A, with kms:ViaService = kmsfs-mount
        opened = client.decrypt(blob, encryption_context=CONTEXT, on_behalf_of=as_a)
        assert opened["Plaintext"] == data_key
        # ... and as A only: A may not make data keys, even through the mount
        with pytest.raises(AccessDeniedException, match=f"User: {A_ARN} "):
            client.generate_data_key(key_id, encryption_context=CONTEXT, on_behalf_of=as_a)
        # a malformed header: ValidationException, nothing done
        with pytest.raises(ValidationException, match="X-Kmsfs-Forwarded-Caller"):
            client.call(
                "Decrypt",
                {"CiphertextBlob": blob, "EncryptionContext": CONTEXT},
                on_behalf_of=_Raw("uid=4242,gid=4242"),  # type: ignore[arg-type]
            )
        assert client.call("GetCallerIdentity", {}, on_behalf_of=as_a)["Arn"] == A_ARN
    # A directly: the policy's condition does not hold (no kms:ViaService)
    direct = call_forwarding(
        A, keyd, "Decrypt", None, CiphertextBlob=_b64(blob), EncryptionContext=CONTEXT
    )
    assert direct["__type"] == "AccessDeniedException"
    assert A_ARN in direct["message"]

    # the audit record names A (invokedBy the mount) and the mount that forwarded
    records = audit(keyd, "--event", "Decrypt")
    (forwarded,) = [r for r in records if "errorCode" not in r]
    identity = forwarded["userIdentity"]
    assert identity["arn"] == A_ARN and identity["uid"] == A and identity["gid"] == A
    assert identity["invokedBy"] == "kmsfs-mount"
    assert identity["pid"] == os.getpid() and identity["executable"] is None
    assert forwarded["additionalEventData"]["forwardedBy"] == {
        "arn": ROOT_ARN,
        "pid": os.getpid(),
        "filesystemId": FS_ID,
    }
    refusals = [r for r in records if r.get("errorCode")]
    assert {r["errorCode"] for r in refusals} == {"AccessDeniedException", "ValidationException"}
    (malformed,) = [r for r in refusals if r["errorCode"] == "ValidationException"]
    assert malformed["userIdentity"]["arn"] == ROOT_ARN  # the real caller's refusal
    (direct_record,) = [r for r in refusals if r["errorCode"] == "AccessDeniedException"]
    assert "invokedBy" not in direct_record["userIdentity"]
    assert "additionalEventData" not in direct_record


@needs_other_users
def test_untrusted_user_cannot_forge_another_users_identity(forwarding_keyd: Keyd) -> None:
    keyd = forwarding_keyd
    with KMSClient(keyd.socket) as client:
        _key_id, blob, _data_key = _key_only_a_may_use_via_the_mount(client)
    # A (not a forwarder) claims to be root, and to be B: refused as A, naming the action
    for claimed in (ForwardedCaller(0, 0, 1), ForwardedCaller(B, B, 1, FS_ID)):
        refused = call_forwarding(A, keyd, "GenerateRandom", claimed, NumberOfBytes=16)
        assert refused["__type"] == "AccessDeniedException"
        assert refused["message"].startswith(
            f"User: {A_ARN} is not authorized to perform: kmsfs:ForwardCaller"
        )
    # and A cannot reach its own via-mount permission by forwarding itself either
    self_forwarded = call_forwarding(
        A,
        keyd,
        "Decrypt",
        ForwardedCaller(A, A, 1),
        CiphertextBlob=_b64(blob),
        EncryptionContext=CONTEXT,
    )
    assert self_forwarded["__type"] == "AccessDeniedException"
    # B is a named forwarder (--forwarders): forwarding A works, as A via the mount
    opened = call_forwarding(
        B,
        keyd,
        "Decrypt",
        ForwardedCaller(A, A, 1, FS_ID),
        CiphertextBlob=_b64(blob),
        EncryptionContext=CONTEXT,
    )
    assert "Plaintext" in opened, opened
    # ... but not root: only root forwards uid 0
    as_root = call_forwarding(B, keyd, "GenerateRandom", ForwardedCaller(0, 0, 1), NumberOfBytes=16)
    assert as_root["__type"] == "AccessDeniedException" and "uid 0" in as_root["message"]

    records = audit(keyd)
    refused = [r for r in records if r.get("additionalEventData", {}).get("forwardedCallerRefused")]
    assert len(refused) == 4
    assert [r["userIdentity"]["arn"] for r in refused] == [A_ARN, A_ARN, A_ARN, B_ARN]
    assert all(r["errorCode"] == "AccessDeniedException" for r in refused)
    (by_b,) = [
        r
        for r in records
        if r["eventName"] == "Decrypt"
        and "errorCode" not in r
        and r["userIdentity"]["arn"] == A_ARN
    ]
    assert by_b["additionalEventData"]["forwardedBy"]["arn"] == B_ARN


class _Raw:
    """A stand-in ForwardedCaller whose header value is any text (malformed headers)."""

    def __init__(self, text: str) -> None:
        self.text = text

    def header_value(self) -> str:
        return self.text


def _b64(data: bytes) -> str:
    import base64

    return base64.b64encode(data).decode("ascii")
