"""Key policies against real peer credentials (issue 14): one root keyd serving every
user (socket mode 0666), clients run as two other uids through setpriv.

A is uid 4242, which has no login name (so keyd names it ``user/uid-4242``); B is
nobody (65534). Each rule below fails if keyd stopped taking the caller from the
socket's peer credentials or stopped enforcing the key policy.
"""

from __future__ import annotations

import base64
import json
import os
import pwd
import subprocess

from tests.conftest import KMSFS, Keyd, run_kmsfs
from tests.kms.users import (
    ACCOUNT,
    NOBODY,
    call_as,
    kmsfs_as,
    needs_other_users,
    user_prefix,
)

pytestmark = needs_other_users

A = 4242
B = NOBODY
A_ARN = f"arn:aws:iam::{ACCOUNT}:user/uid-{A}"
B_ARN = f"arn:aws:iam::{ACCOUNT}:user/{pwd.getpwuid(NOBODY).pw_name}"
CONTEXT = {"kmsfs:file": "report.txt"}


def statement(arn: str, action: str | list[str], **extra: object) -> dict[str, object]:
    return {
        "Effect": "Allow",
        "Principal": {"AWS": arn},
        "Action": action,
        "Resource": "*",
        **extra,
    }


def policy(*statements: dict[str, object]) -> str:
    return json.dumps({"Version": "2012-10-17", "Statement": list(statements)})


def audit(keyd: Keyd, *args: str) -> list[dict[str, object]]:
    out = keyd.kmsfs("keyd", "audit", "tail", "--json", "-n", "200", *args).stdout.decode()
    return [json.loads(line) for line in out.splitlines()]


def test_b_cannot_decrypt_a_data_key_until_a_policy_allows_it(shared_keyd: Keyd) -> None:
    keyd = shared_keyd
    key_id = call_as(A, keyd, "CreateKey", Description="A's key")["KeyMetadata"]["KeyId"]
    key_arn = f"arn:aws:kms:local:{ACCOUNT}:key/{key_id}"
    made = call_as(A, keyd, "GenerateDataKey", KeyId=key_id, KeySpec="AES_256",
                   EncryptionContext=CONTEXT)  # fmt: skip
    blob, data_key = made["CiphertextBlob"], made["Plaintext"]

    # B: refused, in AWS's words, naming B, the action and A's key; the key is not listed
    refused = call_as(B, keyd, "Decrypt", CiphertextBlob=blob, EncryptionContext=CONTEXT)
    assert refused == {
        "__type": "AccessDeniedException",
        "message": f"User: {B_ARN} is not authorized to perform: kms:Decrypt on resource: "
        f"{key_arn} because no resource-based policy allows the kms:Decrypt action",
    }
    assert data_key not in json.dumps(refused)
    assert key_id not in json.dumps(call_as(B, keyd, "ListKeys"))
    assert call_as(B, keyd, "DescribeKey", KeyId=key_id)["__type"] == "AccessDeniedException"
    # the refusal is in the audit log under B's identity, naming the key
    (denied,) = audit(keyd, "--user", str(B), "--denied", "--event", "Decrypt")
    assert denied["errorCode"] == "AccessDeniedException"
    assert denied["userIdentity"]["arn"] == B_ARN  # type: ignore[index]
    assert denied["userIdentity"]["uid"] == B  # type: ignore[index]
    assert denied["resources"] == [  # type: ignore[comparison-overlap]
        {"accountId": ACCOUNT, "type": "AWS::KMS::Key", "ARN": key_arn}
    ]

    # A lets B decrypt, only with this file's context
    only_this_file = {"StringEquals": {"kms:EncryptionContext:kmsfs:file": "report.txt"}}
    new_policy = policy(
        statement(A_ARN, "kms:*"), statement(B_ARN, "kms:Decrypt", Condition=only_this_file)
    )
    assert call_as(A, keyd, "PutKeyPolicy", KeyId=key_id, Policy=new_policy) == {}
    opened = call_as(B, keyd, "Decrypt", CiphertextBlob=blob, EncryptionContext=CONTEXT)
    assert opened["Plaintext"] == data_key and opened["KeyId"] == key_arn
    other = call_as(A, keyd, "Encrypt", KeyId=key_id, Plaintext=base64.b64encode(b"x").decode(),
                    EncryptionContext={"kmsfs:file": "salaries.txt"})  # fmt: skip
    refused = call_as(B, keyd, "Decrypt", CiphertextBlob=other["CiphertextBlob"],
                      EncryptionContext={"kmsfs:file": "salaries.txt"})  # fmt: skip
    assert refused["__type"] == "AccessDeniedException"
    # Decrypt only: B may not make data keys under A's key, nor change its policy
    made_by_b = call_as(B, keyd, "GenerateDataKey", KeyId=key_id, KeySpec="AES_256")
    assert made_by_b["__type"] == "AccessDeniedException"
    takeover = call_as(
        B, keyd, "PutKeyPolicy", KeyId=key_id, Policy=policy(statement(B_ARN, "kms:*"))
    )
    assert takeover["__type"] == "AccessDeniedException"


def test_lockout_check_and_root_repairs_a_locked_key(shared_keyd: Keyd, tmp_path) -> None:
    keyd = shared_keyd
    key_id = call_as(A, keyd, "CreateKey")["KeyMetadata"]["KeyId"]
    before = call_as(A, keyd, "GetKeyPolicy", KeyId=key_id, PolicyName="default")["Policy"]
    # A policy that lets only B use the key would stop A from ever changing it again:
    # refused by the lockout safety check, as in AWS, and nothing changes.
    locking = policy(statement(B_ARN, "kms:*"))
    refused = call_as(A, keyd, "PutKeyPolicy", KeyId=key_id, Policy=locking)
    assert refused["__type"] == "MalformedPolicyDocumentException"
    assert call_as(A, keyd, "GetKeyPolicy", KeyId=key_id)["Policy"] == before
    # bypassed, it is stored: now A is locked out and B is in
    assert call_as(A, keyd, "PutKeyPolicy", KeyId=key_id, Policy=locking,
                   BypassPolicyLockoutSafetyCheck=True) == {}  # fmt: skip
    assert call_as(A, keyd, "DescribeKey", KeyId=key_id)["__type"] == "AccessDeniedException"
    assert call_as(B, keyd, "DescribeKey", KeyId=key_id)["KeyMetadata"]["KeyId"] == key_id
    # a locked-out user cannot put things back...
    assert call_as(A, keyd, "PutKeyPolicy", KeyId=key_id,
                   Policy=before)["__type"] == "AccessDeniedException"  # fmt: skip
    # ...but root of the machine owns keyd and repairs it with the CLI
    repaired = tmp_path / "policy.json"
    repaired.write_text(before)
    result = kmsfs_as(0, keyd, "keys", "policy", "put", key_id, "--file", str(repaired))
    assert result.returncode == 0, result.stderr.decode()
    assert call_as(A, keyd, "DescribeKey", KeyId=key_id)["KeyMetadata"]["KeyId"] == key_id
    assert call_as(B, keyd, "DescribeKey", KeyId=key_id)["__type"] == "AccessDeniedException"
    # root's repair is audited as root's
    (put,) = audit(keyd, "--user", "root", "--event", "PutKeyPolicy")
    assert put["userIdentity"]["type"] == "Root"  # type: ignore[index]
    keyd.kmsfs("keyd", "audit", "verify")


def test_whoami_as_two_users_names_each(shared_keyd: Keyd) -> None:
    """The principal comes from the peer's uid, not from anything the client says."""
    for uid, arn in ((A, A_ARN), (B, B_ARN)):
        result = kmsfs_as(uid, shared_keyd, "whoami", "--json")
        assert result.returncode == 0, result.stderr.decode()
        assert json.loads(result.stdout)["Arn"] == arn


KEYD_UID = 4300  # the dedicated service account of a system keyd (no login name needed)


def test_system_keyd_under_a_dedicated_user_serves_every_user(keyd_factory, short_tmp) -> None:
    """The README's second set-up: one keyd run by a service account, its socket open to
    every local user; clients trust it by name (KMSFS_KEYD_UID), key policies keep users
    apart, and root of the machine still owns every key policy."""
    keyd = keyd_factory("system")
    os.chmod(short_tmp, 0o755)
    os.chown(keyd.workdir, KEYD_UID, KEYD_UID)
    os.chmod(keyd.workdir, 0o755)
    service = tuple(user_prefix(KEYD_UID))
    env = {**keyd.env, "XDG_CONFIG_HOME": str(keyd.workdir / "xdg")}
    (keyd.workdir / "xdg").mkdir()
    (keyd.workdir / "xdg" / "kmsfs").write_text("tests: no per-user kmsfs config\n")
    subprocess.run(
        [*service, *KMSFS, "keyd", "init", "--keystore", str(keyd.keystore),
         "--root-key-file", str(keyd.root_key), "--account-id", ACCOUNT],
        env=env, check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    keyd.start("--socket-mode", "0666", env=env, prefix=service)
    assert keyd.socket.stat().st_uid == KEYD_UID

    # a client does not trust a socket of another user unless told to
    untrusted = call_as(B, keyd, "ListKeys", keyd_uid=None)
    assert untrusted["__type"] == "KeydUntrusted", untrusted
    # told to, B uses keyd: B's key, B's data
    key_id = call_as(B, keyd, "CreateKey", keyd_uid=KEYD_UID)["KeyMetadata"]["KeyId"]
    sealed = call_as(B, keyd, "Encrypt", keyd_uid=KEYD_UID, KeyId=key_id,
                     Plaintext=base64.b64encode(b"B's secret").decode())  # fmt: skip
    blob = sealed["CiphertextBlob"]
    opened = call_as(B, keyd, "Decrypt", keyd_uid=KEYD_UID, CiphertextBlob=blob)
    assert base64.b64decode(opened["Plaintext"]) == b"B's secret"
    # A, on the same keyd, may not; nor may keyd's own account (it is not the creator)
    refused = call_as(A, keyd, "Decrypt", keyd_uid=KEYD_UID, CiphertextBlob=blob)
    assert refused["__type"] == "AccessDeniedException"
    refused = call_as(KEYD_UID, keyd, "Decrypt", keyd_uid=KEYD_UID, CiphertextBlob=blob)
    assert refused["__type"] == "AccessDeniedException"
    # root reads and replaces any key policy (root of the machine owns keyd)
    text = call_as(0, keyd, "GetKeyPolicy", keyd_uid=KEYD_UID, KeyId=key_id)["Policy"]
    assert B_ARN in text
    opened_by_a = policy(statement(B_ARN, "kms:*"), statement(A_ARN, "kms:Decrypt"))
    assert call_as(0, keyd, "PutKeyPolicy", keyd_uid=KEYD_UID, KeyId=key_id,
                   Policy=opened_by_a) == {}  # fmt: skip
    opened = call_as(A, keyd, "Decrypt", keyd_uid=KEYD_UID, CiphertextBlob=blob)
    assert base64.b64decode(opened["Plaintext"]) == b"B's secret"


def test_keyd_account_users_limits_who_creates_keys(keyd_factory, short_tmp) -> None:
    keyd = keyd_factory("limited")
    run_kmsfs(
        "keyd", "init", "--keystore", str(keyd.keystore), "--root-key-file",
        str(keyd.root_key), "--account-id", ACCOUNT,
    )  # fmt: skip
    os.chmod(short_tmp, 0o755)
    os.chmod(keyd.workdir, 0o755)
    keyd.start("--socket-mode", "0666", "--account-users", str(A))
    assert "KeyMetadata" in call_as(A, keyd, "CreateKey")
    assert call_as(B, keyd, "CreateKey")["__type"] == "AccessDeniedException"
    assert call_as(B, keyd, "GenerateRandom", NumberOfBytes=8)["__type"] == (
        "AccessDeniedException"
    )
    bad = run_kmsfs(*keyd.serve_args("--account-users", "no-such-user-kmsfs"), check=False)
    assert bad.returncode == 2
    assert "--account-users: no user 'no-such-user-kmsfs'" in bad.stderr.decode()
