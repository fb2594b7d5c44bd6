"""Key policies enforced by the key service (issue 14), on the sans-IO service.

Two ordinary callers of different uids (A and B) and root (uid 0) call one
KeyService. Principals are built directly (no /proc), so every test names exactly
who calls. Names, parameters and errors are AWS KMS's: PutKeyPolicy, GetKeyPolicy,
ListKeyPolicies, CreateKey's Policy and BypassPolicyLockoutSafetyCheck,
AccessDeniedException and MalformedPolicyDocumentException.
"""

from __future__ import annotations

import base64
import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kmsfs.errors import (
    AccessDeniedException,
    AuditError,
    MalformedPolicyDocumentException,
    StorageUnavailableException,
    ValidationException,
)
from kmsfs.kms.caller import Caller
from kmsfs.kms.keystore import DB_NAME, Keystore, RootKeySource
from kmsfs.kms.principal import AccountAccess, Principal
from kmsfs.kms.service import KeyService

REGION = "eu-test-1"
ACCOUNT = "123456789012"
A = Caller(uid=4321, gid=4321, pid=1001)
B = Caller(uid=4322, gid=4322, pid=1002)
ROOT = Caller(uid=0, gid=0, pid=1003)
A_ARN = f"arn:aws:iam::{ACCOUNT}:user/uid-4321"
B_ARN = f"arn:aws:iam::{ACCOUNT}:user/uid-4322"
ROOT_ARN = f"arn:aws:iam::{ACCOUNT}:root"


def principal_of(caller: Caller) -> Principal:
    login = "root" if caller.uid == 0 else None
    return Principal(ACCOUNT, caller.uid, caller.gid, caller.pid, login, (), None)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def policy(*statements: dict[str, Any]) -> str:
    return json.dumps({"Version": "2012-10-17", "Statement": list(statements)})


def allow(arn: str, action: str | list[str] = "kms:*", **extra: Any) -> dict[str, Any]:
    return {
        "Effect": "Allow",
        "Principal": {"AWS": arn},
        "Action": action,
        "Resource": "*",
        **extra,
    }


class Harness:
    def __init__(self, tmp_path: Path, owner_uid: int = A.uid) -> None:
        self.root_key = tmp_path / "root.key"
        self.path = tmp_path / "ks"
        self.keystore = Keystore.create(
            self.path, RootKeySource.from_key_file(self.root_key), region=REGION, account=ACCOUNT
        )
        self.events: list[dict[str, Any]] = []
        self.owner_uid = owner_uid
        self.service = self._service()
        self.requests = 0

    def _service(self) -> KeyService:
        return KeyService(
            self.keystore,
            self.events,
            principals=principal_of,
            owner_uid=self.owner_uid,
        )

    def reopen(self) -> None:
        self.keystore.close()
        self.keystore = Keystore.open(self.path, RootKeySource.from_key_file(self.root_key))
        self.service = self._service()

    def call(self, caller: Caller, operation: str, **params: Any) -> dict[str, Any]:
        self.requests += 1
        return self.service.handle(operation, params, caller, f"req-{self.requests}")

    def create_key(self, caller: Caller = A, **params: Any) -> str:
        return self.call(caller, "CreateKey", **params)["KeyMetadata"]["KeyId"]

    def arn(self, key_id: str) -> str:
        return f"arn:aws:kms:{REGION}:{ACCOUNT}:key/{key_id}"

    def data_key(self, caller: Caller, key_id: str, context: dict[str, str] | None = None):
        params: dict[str, Any] = {"KeyId": key_id, "KeySpec": "AES_256"}
        if context:
            params["EncryptionContext"] = context
        response = self.call(caller, "GenerateDataKey", **params)
        return response["CiphertextBlob"], response["Plaintext"]

    def decrypt(self, caller: Caller, blob: str, context: dict[str, str] | None = None) -> str:
        params: dict[str, Any] = {"CiphertextBlob": blob}
        if context:
            params["EncryptionContext"] = context
        return self.call(caller, "Decrypt", **params)["Plaintext"]

    def put_policy(self, caller: Caller, key_id: str, text: str, **params: Any) -> None:
        self.call(caller, "PutKeyPolicy", KeyId=key_id, PolicyName="default", Policy=text, **params)


@pytest.fixture
def kms(tmp_path: Path) -> Iterator[Harness]:
    harness = Harness(tmp_path)
    try:
        yield harness
    finally:
        harness.keystore.close()


def test_other_user_cannot_decrypt_until_the_key_policy_allows_it(kms: Harness) -> None:
    key_id = kms.create_key(A)
    blob, plaintext = kms.data_key(A, key_id)
    with pytest.raises(AccessDeniedException) as refused:
        kms.decrypt(B, blob)
    # AWS's message shape: principal, action, key ARN, reason
    assert refused.value.message == (
        f"User: {B_ARN} is not authorized to perform: kms:Decrypt on resource: "
        f"{kms.arn(key_id)} because no resource-based policy allows the kms:Decrypt action"
    )
    assert plaintext not in refused.value.message
    kms.put_policy(A, key_id, policy(allow(A_ARN), allow(B_ARN, "kms:Decrypt")))
    assert kms.decrypt(B, blob) == plaintext
    # only Decrypt was granted
    with pytest.raises(AccessDeniedException):
        kms.data_key(B, key_id)


def test_default_policy_names_root_and_the_creator(kms: Harness) -> None:
    key_id = kms.create_key(B)
    response = kms.call(B, "GetKeyPolicy", KeyId=key_id, PolicyName="default")
    assert response["PolicyName"] == "default"
    document = json.loads(response["Policy"])
    principals = [s["Principal"]["AWS"] for s in document["Statement"]]
    assert principals == [ROOT_ARN, B_ARN]
    assert all(s["Action"] == "kms:*" and s["Effect"] == "Allow" for s in document["Statement"])
    with pytest.raises(AccessDeniedException):
        kms.call(A, "DescribeKey", KeyId=key_id)
    assert kms.call(ROOT, "DescribeKey", KeyId=key_id)["KeyMetadata"]["KeyId"] == key_id


def test_explicit_deny_wins_over_allow(kms: Harness) -> None:
    key_id = kms.create_key(A)
    blob, _ = kms.data_key(A, key_id)
    deny = {**allow(B_ARN, "kms:Decrypt"), "Effect": "Deny"}
    kms.put_policy(A, key_id, policy(allow(A_ARN), allow(B_ARN), deny))
    with pytest.raises(AccessDeniedException) as refused:
        kms.decrypt(B, blob)
    assert refused.value.message == (
        f"User: {B_ARN} is not authorized to perform: kms:Decrypt on resource: "
        f"{kms.arn(key_id)} with an explicit deny in a resource-based policy"
    )
    # the rest of B's kms:* still applies
    kms.data_key(B, key_id)


def test_encryption_context_condition_allows_only_matching_contexts(kms: Harness) -> None:
    key_id = kms.create_key(A)
    condition = {"StringEquals": {"kms:EncryptionContext:project": "apollo"}}
    kms.put_policy(
        A, key_id, policy(allow(A_ARN), allow(B_ARN, "kms:Decrypt", Condition=condition))
    )
    good_blob, good_plain = kms.data_key(A, key_id, {"project": "apollo"})
    other_blob, _ = kms.data_key(A, key_id, {"project": "gemini"})
    bare_blob, _ = kms.data_key(A, key_id)
    assert kms.decrypt(B, good_blob, {"project": "apollo"}) == good_plain
    with pytest.raises(AccessDeniedException):
        kms.decrypt(B, other_blob, {"project": "gemini"})
    with pytest.raises(AccessDeniedException):
        kms.decrypt(B, bare_blob)


def test_lockout_check_refuses_a_self_locking_policy_unless_bypassed(kms: Harness) -> None:
    key_id = kms.create_key(A)
    before = kms.call(A, "GetKeyPolicy", KeyId=key_id)["Policy"]
    locking = policy(allow(B_ARN, "kms:*"))  # A (and root) lose PutKeyPolicy
    with pytest.raises(MalformedPolicyDocumentException):
        kms.put_policy(A, key_id, locking)
    assert kms.call(A, "GetKeyPolicy", KeyId=key_id)["Policy"] == before
    kms.put_policy(A, key_id, locking, BypassPolicyLockoutSafetyCheck=True)
    with pytest.raises(AccessDeniedException):
        kms.call(A, "GetKeyPolicy", KeyId=key_id)
    assert kms.call(B, "GetKeyPolicy", KeyId=key_id)["Policy"] == locking


def test_create_key_runs_the_lockout_check_on_its_policy(kms: Harness) -> None:
    locking = policy(allow(B_ARN, "kms:Decrypt"))
    with pytest.raises(MalformedPolicyDocumentException):
        kms.create_key(A, Policy=locking)
    assert kms.call(ROOT, "ListKeys")["Keys"] == []
    key_id = kms.create_key(A, Policy=locking, BypassPolicyLockoutSafetyCheck=True)
    assert kms.call(ROOT, "GetKeyPolicy", KeyId=key_id)["Policy"] == locking
    with pytest.raises(AccessDeniedException):
        kms.call(A, "DescribeKey", KeyId=key_id)


def test_root_can_always_repair_a_policy_but_nothing_else(kms: Harness) -> None:
    key_id = kms.create_key(A)
    blob, plaintext = kms.data_key(A, key_id)
    kms.put_policy(A, key_id, policy(allow(B_ARN)), BypassPolicyLockoutSafetyCheck=True)
    # policies apply to root as in AWS: this policy does not allow root to decrypt
    with pytest.raises(AccessDeniedException):
        kms.decrypt(ROOT, blob)
    with pytest.raises(AccessDeniedException):
        kms.call(ROOT, "ListKeyPolicies", KeyId=key_id)
    # kmsfs's exception: uid 0 may read and replace any key policy
    assert json.loads(kms.call(ROOT, "GetKeyPolicy", KeyId=key_id)["Policy"])
    kms.put_policy(ROOT, key_id, policy(allow(ROOT_ARN), allow(A_ARN)))
    assert kms.decrypt(A, blob) == plaintext
    with pytest.raises(AccessDeniedException):
        kms.decrypt(B, blob)


def test_malformed_policy_is_refused_naming_the_place(kms: Harness) -> None:
    key_id = kms.create_key(A)
    bad = policy(allow(A_ARN, Condition={"StringEquals": {"kms:Foo": "x"}}))
    with pytest.raises(MalformedPolicyDocumentException) as refused:
        kms.put_policy(A, key_id, bad)
    assert "Statement[0].Condition.StringEquals" in refused.value.message
    assert "kms:Foo" in refused.value.message
    with pytest.raises(MalformedPolicyDocumentException):
        kms.create_key(A, Policy="{")
    with pytest.raises(MalformedPolicyDocumentException):
        kms.put_policy(A, key_id, policy(allow(A_ARN, "kms:Decrpyt")))


def test_policy_name_and_list_key_policies(kms: Harness) -> None:
    key_id = kms.create_key(A)
    assert kms.call(A, "ListKeyPolicies", KeyId=key_id)["PolicyNames"] == ["default"]
    text = policy(allow(A_ARN))
    # PolicyName is optional; "default" is the only valid value
    kms.call(A, "PutKeyPolicy", KeyId=key_id, Policy=text)
    assert kms.call(A, "GetKeyPolicy", KeyId=key_id) == {"Policy": text, "PolicyName": "default"}
    with pytest.raises(ValidationException):
        kms.call(A, "GetKeyPolicy", KeyId=key_id, PolicyName="other")
    with pytest.raises(ValidationException):
        kms.call(A, "PutKeyPolicy", KeyId=key_id, PolicyName="other", Policy=text)
    with pytest.raises(ValidationException):
        kms.call(A, "PutKeyPolicy", KeyId=key_id)  # Policy is required


def test_list_keys_and_aliases_show_only_keys_the_caller_may_describe(kms: Harness) -> None:
    a_key = kms.create_key(A)
    b_key = kms.create_key(B)
    kms.call(A, "CreateAlias", AliasName="alias/a", TargetKeyId=a_key)
    kms.call(B, "CreateAlias", AliasName="alias/b", TargetKeyId=b_key)

    def keys(caller: Caller) -> list[str]:
        return [k["KeyId"] for k in kms.call(caller, "ListKeys")["Keys"]]

    def aliases(caller: Caller) -> list[str]:
        return [a["AliasName"] for a in kms.call(caller, "ListAliases")["Aliases"]]

    assert keys(A) == [a_key] and aliases(A) == ["alias/a"]
    assert keys(B) == [b_key] and aliases(B) == ["alias/b"]
    assert sorted(keys(ROOT)) == sorted([a_key, b_key])
    # aliasing another user's key needs rights on that key
    with pytest.raises(AccessDeniedException):
        kms.call(A, "CreateAlias", AliasName="alias/sneaky", TargetKeyId=b_key)
    with pytest.raises(AccessDeniedException):
        kms.call(A, "DeleteAlias", AliasName="alias/b")
    kms.put_policy(B, b_key, policy(allow(B_ARN), allow(A_ARN, "kms:DescribeKey")))
    assert sorted(keys(A)) == sorted([a_key, b_key])


def test_refusals_are_audited_with_access_denied(kms: Harness) -> None:
    key_id = kms.create_key(A)
    blob, _ = kms.data_key(A, key_id)
    with pytest.raises(AccessDeniedException):
        kms.decrypt(B, blob)
    event = kms.events[-1]
    assert event["eventName"] == "Decrypt"
    assert event["errorCode"] == "AccessDeniedException"
    assert event["userIdentity"]["arn"] == B_ARN
    assert kms.arn(key_id) in event["errorMessage"]
    # the refused request's record names the key it was about, as a success's does
    assert event["resources"] == [
        {"accountId": ACCOUNT, "type": "AWS::KMS::Key", "ARN": kms.arn(key_id)}
    ]
    kms.put_policy(A, key_id, policy(allow(A_ARN)))
    put = kms.events[-1]
    assert put["eventName"] == "PutKeyPolicy" and "errorCode" not in put
    assert put["requestParameters"]["keyId"] == key_id


def test_a_refused_put_key_policy_changes_nothing(kms: Harness) -> None:
    key_id = kms.create_key(A)
    before = kms.call(A, "GetKeyPolicy", KeyId=key_id)["Policy"]
    with pytest.raises(AccessDeniedException):
        kms.put_policy(B, key_id, policy(allow(B_ARN)))
    assert kms.call(A, "GetKeyPolicy", KeyId=key_id)["Policy"] == before
    assert kms.events[-2]["errorCode"] == "AccessDeniedException"


class FailingLog(list[dict[str, Any]]):
    """An audit sink that can be made to fail like a full disk."""

    failing = False

    def append(self, event: dict[str, Any]) -> None:
        if self.failing:
            raise AuditError("cannot write") from OSError(28, "No space left on device")
        super().append(event)


def test_put_key_policy_without_its_audit_record_changes_nothing(kms: Harness) -> None:
    key_id = kms.create_key(A)
    blob, _ = kms.data_key(A, key_id)
    before = kms.call(A, "GetKeyPolicy", KeyId=key_id)["Policy"]
    with pytest.raises(AccessDeniedException):
        kms.decrypt(B, blob)  # the service has read (and may keep) the stored policy
    sink = FailingLog()
    kms.service.audit = sink
    sink.failing = True
    with pytest.raises(StorageUnavailableException):
        kms.put_policy(A, key_id, policy(allow(A_ARN), allow(B_ARN)))
    sink.failing = False
    with pytest.raises(AccessDeniedException):
        kms.decrypt(B, blob)
    assert kms.call(A, "GetKeyPolicy", KeyId=key_id)["Policy"] == before


def test_request_alias_condition(kms: Harness) -> None:
    key_id = kms.create_key(A)
    kms.call(A, "CreateAlias", AliasName="alias/shared", TargetKeyId=key_id)
    condition = {"StringEquals": {"kms:RequestAlias": "alias/shared"}}
    kms.put_policy(
        A, key_id, policy(allow(A_ARN), allow(B_ARN, "kms:Encrypt", Condition=condition))
    )
    kms.call(B, "Encrypt", KeyId="alias/shared", Plaintext=b64(b"x"))
    with pytest.raises(AccessDeniedException):
        kms.call(B, "Encrypt", KeyId=key_id, Plaintext=b64(b"x"))


def test_resource_aliases_condition_sees_every_alias_of_the_key(kms: Harness) -> None:
    key_id = kms.create_key(A)
    condition = {"ForAnyValue:StringLike": {"kms:ResourceAliases": "alias/team-*"}}
    kms.put_policy(
        A, key_id, policy(allow(A_ARN), allow(B_ARN, "kms:Encrypt", Condition=condition))
    )
    with pytest.raises(AccessDeniedException):
        kms.call(B, "Encrypt", KeyId=key_id, Plaintext=b64(b"x"))
    kms.call(A, "CreateAlias", AliasName="alias/team-blue", TargetKeyId=key_id)
    kms.call(A, "CreateAlias", AliasName="alias/other", TargetKeyId=key_id)
    # by id, by the matching alias, by the other alias: the key has a matching alias
    for name in (key_id, "alias/team-blue", "alias/other"):
        kms.call(B, "Encrypt", KeyId=name, Plaintext=b64(b"x"))
    kms.call(A, "DeleteAlias", AliasName="alias/team-blue")
    with pytest.raises(AccessDeniedException):
        kms.call(B, "Encrypt", KeyId="alias/other", Plaintext=b64(b"x"))


def test_root_is_also_named_by_its_user_arn(kms: Harness) -> None:
    """uid 0 is the account root and the IAM user named after its login name: a
    statement naming ...:user/root applies to it (and not to anyone else)."""
    key_id = kms.create_key(A)
    blob, plaintext = kms.data_key(A, key_id)
    root_user = f"arn:aws:iam::{ACCOUNT}:user/root"
    kms.put_policy(A, key_id, policy(allow(A_ARN), allow(root_user, "kms:Decrypt")))
    assert kms.decrypt(ROOT, blob) == plaintext
    with pytest.raises(AccessDeniedException):
        kms.data_key(ROOT, key_id)  # only Decrypt was allowed to user/root
    deny = {**allow(root_user, "kms:Decrypt"), "Effect": "Deny"}
    kms.put_policy(A, key_id, policy(allow(A_ARN), allow(ROOT_ARN), deny))
    with pytest.raises(AccessDeniedException):
        kms.decrypt(ROOT, blob)  # a Deny naming user/root reaches uid 0 too
    with pytest.raises(AccessDeniedException):
        kms.decrypt(B, blob)


def test_existing_keys_without_a_stored_policy_keep_working_for_keyd_owner(
    kms: Harness,
) -> None:
    """A keystore made before key policies: no key_policies table, keys without policy."""
    key_id = kms.create_key(B)  # made by someone else: the fallback ignores the creator
    blob, plaintext = kms.data_key(B, key_id)
    kms.keystore.close()
    db = sqlite3.connect(kms.path / DB_NAME)
    db.execute("DROP TABLE key_policies")
    db.commit()
    db.close()
    kms.keystore = Keystore.open(kms.path, RootKeySource.from_key_file(kms.root_key))
    kms.service = kms._service()  # keyd runs as A (owner_uid)
    assert kms.keystore.get_policy(key_id) is None  # the table is back, empty
    assert kms.decrypt(A, blob) == plaintext
    assert kms.decrypt(ROOT, blob) == plaintext
    with pytest.raises(AccessDeniedException):
        kms.decrypt(B, blob)
    document = json.loads(kms.call(A, "GetKeyPolicy", KeyId=key_id)["Policy"])
    assert [s["Principal"]["AWS"] for s in document["Statement"]] == [ROOT_ARN, A_ARN]
    # storing a policy replaces the fallback, and survives a restart
    kms.put_policy(A, key_id, policy(allow(A_ARN), allow(B_ARN, "kms:Decrypt")))
    kms.reopen()
    assert kms.decrypt(B, blob) == plaintext


def test_policies_go_away_with_the_key(kms: Harness) -> None:
    key_id = kms.create_key(A)
    kms.call(A, "ScheduleKeyDeletion", KeyId=key_id, PendingWindowInDays=7)
    kms.service.clock = lambda: 2_000_000_000.0 + 8 * 86400
    kms.service.run_maintenance()
    db = sqlite3.connect(kms.path / DB_NAME)
    try:
        assert db.execute("SELECT * FROM key_policies").fetchall() == []
    finally:
        db.close()


def test_account_level_operations_can_be_limited(tmp_path: Path) -> None:
    """CreateKey and GenerateRandom concern no key: every local principal may call them
    unless keyd is given --account-users (root always may)."""
    harness = Harness(tmp_path)
    try:
        harness.service = KeyService(
            harness.keystore,
            harness.events,
            principals=principal_of,
            account_access=AccountAccess(frozenset({A.uid})),
        )
        harness.create_key(A)
        harness.create_key(ROOT)
        assert harness.call(A, "GenerateRandom", NumberOfBytes=8)["Plaintext"]
        for operation, params in (("CreateKey", {}), ("GenerateRandom", {"NumberOfBytes": 8})):
            with pytest.raises(AccessDeniedException) as refused:
                harness.call(B, operation, **params)
            assert refused.value.message == (
                f"User: {B_ARN} is not authorized to perform: kms:{operation} on resource: * "
                f"because no identity-based policy allows the kms:{operation} action"
            )
            assert harness.events[-1]["errorCode"] == "AccessDeniedException"
        assert len(harness.keystore.list_keys()) == 2
    finally:
        harness.keystore.close()


def test_account_access_by_name_uid_and_group() -> None:
    import grp
    import pwd

    nobody = pwd.getpwuid(65534)
    group = grp.getgrgid(nobody.pw_gid).gr_name
    access = AccountAccess.parse(f"{nobody.pw_name}, 4321 ,@{group}")
    assert access.uids == frozenset({65534, 4321})
    assert access.groups == frozenset({group})

    def who(uid: int, groups: tuple[str, ...] = ()) -> Principal:
        return Principal(ACCOUNT, uid, uid, 1, None, groups, None)

    assert access.allows(who(4321)) and access.allows(who(0))
    assert not access.allows(who(4322))
    assert access.allows(who(4322, (group,)))
    assert AccountAccess.parse(None).allows(who(4322))
    # SigV4-signed users (no uid) are named iam:NAME, and only that way
    signed = Principal(ACCOUNT, None, None, None, "build", (), None, access_key_id="AKIA1")
    assert not access.allows(signed)
    assert AccountAccess.parse("iam:build").allows(signed)
    assert not AccountAccess.parse("iam:build").allows(who(4322))
    with pytest.raises(ValueError, match="iam: needs a user name"):
        AccountAccess.parse("iam:")
    with pytest.raises(ValueError, match="no user 'no-such-user-kmsfs'"):
        AccountAccess.parse("no-such-user-kmsfs")
    with pytest.raises(ValueError, match="no group 'no-such-group-kmsfs'"):
        AccountAccess.parse("@no-such-group-kmsfs")


def test_time_conditions_see_keyds_clock(kms: Harness) -> None:
    """aws:CurrentTime / aws:EpochTime with the Date operators: a key shared until a date."""
    key_id = kms.create_key(A)
    blob, plaintext = kms.data_key(A, key_id)
    until = {"DateLessThan": {"aws:CurrentTime": "2030-01-01T00:00:00Z"}}
    kms.put_policy(A, key_id, policy(allow(A_ARN), allow(B_ARN, "kms:Decrypt", Condition=until)))
    kms.service.clock = lambda: 1893455999.0  # 2029-12-31T23:59:59Z
    assert kms.decrypt(B, blob) == plaintext
    kms.service.clock = lambda: 1893456000.0  # 2030-01-01T00:00:00Z
    with pytest.raises(AccessDeniedException):
        kms.decrypt(B, blob)
    epoch = {"NumericLessThan": {"aws:EpochTime": 1893456000}}
    kms.put_policy(A, key_id, policy(allow(A_ARN), allow(B_ARN, "kms:Decrypt", Condition=epoch)))
    with pytest.raises(AccessDeniedException):
        kms.decrypt(B, blob)
    kms.service.clock = lambda: 1893455000.0
    assert kms.decrypt(B, blob) == plaintext


def test_principal_arn_conditions(kms: Harness) -> None:
    key_id = kms.create_key(A)
    blob, plaintext = kms.data_key(A, key_id)
    anyone_but_root = {
        **allow("*", "kms:Decrypt"),
        "Principal": "*",
        "Condition": {"ArnLike": {"aws:PrincipalArn": f"arn:aws:iam::{ACCOUNT}:user/uid-43*"}},
    }
    kms.put_policy(A, key_id, policy(allow(A_ARN), anyone_but_root))
    assert kms.decrypt(B, blob) == plaintext
    with pytest.raises(AccessDeniedException):
        kms.decrypt(ROOT, blob)  # root's aws:PrincipalArn is ...:root


def test_algorithm_and_origin_condition_keys(kms: Harness) -> None:
    """kms:EncryptionAlgorithm (SYMMETRIC_DEFAULT when the request names none),
    kms:SigningAlgorithm, kms:MessageType, kms:MacAlgorithm and kms:KeyOrigin come from
    the request and the key: a Deny on them must reach the request."""
    key_id = kms.create_key(A)
    blob, plaintext = kms.data_key(A, key_id)
    no_default = {
        **allow(A_ARN, "kms:Decrypt"),
        "Effect": "Deny",
        "Condition": {"StringEquals": {"kms:EncryptionAlgorithm": "SYMMETRIC_DEFAULT"}},
    }
    kms.put_policy(A, key_id, policy(allow(A_ARN), no_default))
    with pytest.raises(AccessDeniedException):
        kms.decrypt(A, blob)
    only_external = {
        **allow(B_ARN, "kms:Decrypt"),
        "Condition": {"StringEquals": {"kms:KeyOrigin": "EXTERNAL"}},
    }
    kms.put_policy(A, key_id, policy(allow(A_ARN), only_external))
    assert kms.decrypt(A, blob) == plaintext
    with pytest.raises(AccessDeniedException):
        kms.decrypt(B, blob)  # the key's origin is AWS_KMS

    signing = kms.create_key(A, KeySpec="ECC_NIST_P256", KeyUsage="SIGN_VERIFY")
    pss_only = {
        **allow(B_ARN, "kms:Sign"),
        "Condition": {
            "StringEquals": {"kms:SigningAlgorithm": "ECDSA_SHA_256", "kms:MessageType": "DIGEST"}
        },
    }
    kms.put_policy(A, signing, policy(allow(A_ARN), pss_only))
    digest = b64(bytes(32))
    kms.call(B, "Sign", KeyId=signing, Message=digest, MessageType="DIGEST",
             SigningAlgorithm="ECDSA_SHA_256")  # fmt: skip
    with pytest.raises(AccessDeniedException):
        kms.call(B, "Sign", KeyId=signing, Message=digest, SigningAlgorithm="ECDSA_SHA_256")

    mac_key = kms.create_key(A, KeySpec="HMAC_256", KeyUsage="GENERATE_VERIFY_MAC")
    deny_mac = {
        **allow(A_ARN, "kms:GenerateMac"),
        "Effect": "Deny",
        "Condition": {"StringEquals": {"kms:MacAlgorithm": "HMAC_SHA_256"}},
    }
    kms.put_policy(A, mac_key, policy(allow(A_ARN), deny_mac))
    with pytest.raises(AccessDeniedException):
        kms.call(A, "GenerateMac", KeyId=mac_key, Message=b64(b"m"), MacAlgorithm="HMAC_SHA_256")
