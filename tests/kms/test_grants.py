"""Grants (issue 14) on the sans-IO key service: CreateGrant, ListGrants,
ListRetirableGrants, RetireGrant, RevokeGrant, grant tokens and constraints.

Callers A (the key's creator), B and C (other uids) and root call one KeyService;
principals are built directly (no /proc). Names, parameters and error types are AWS
KMS's.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from kmsfs.errors import (
    AccessDeniedException,
    AuditError,
    DryRunOperationException,
    InvalidGrantIdException,
    InvalidGrantTokenException,
    KMSInvalidStateException,
    LimitExceededException,
    NotFoundException,
    StorageUnavailableException,
    ValidationException,
)
from kmsfs.kms import grants
from kmsfs.kms.caller import Caller
from kmsfs.kms.keystore import DB_NAME, Keystore, RootKeySource
from kmsfs.kms.principal import Principal
from kmsfs.kms.service import KeyService

REGION = "eu-test-1"
ACCOUNT = "123456789012"
A = Caller(uid=4321, gid=4321, pid=1001)
B = Caller(uid=4322, gid=4322, pid=1002)
C = Caller(uid=4323, gid=4323, pid=1003)
ROOT = Caller(uid=0, gid=0, pid=1004)
A_ARN = f"arn:aws:iam::{ACCOUNT}:user/uid-4321"
B_ARN = f"arn:aws:iam::{ACCOUNT}:user/uid-4322"
C_ARN = f"arn:aws:iam::{ACCOUNT}:user/uid-4323"
ROOT_ARN = f"arn:aws:iam::{ACCOUNT}:root"
DAY = 86400.0


def principal_of(caller: Caller) -> Principal:
    login = "root" if caller.uid == 0 else None
    return Principal(ACCOUNT, caller.uid, caller.gid, caller.pid, login, (), None)


class FailingLog(list[dict[str, Any]]):
    """An audit sink that can be made to fail like a full disk."""

    failing = False

    def append(self, event: dict[str, Any]) -> None:
        if self.failing:
            raise AuditError("cannot write") from OSError(28, "No space left on device")
        super().append(event)


class Harness:
    def __init__(self, tmp_path: Path) -> None:
        self.root_key = tmp_path / "root.key"
        self.path = tmp_path / "ks"
        self.keystore = Keystore.create(
            self.path, RootKeySource.from_key_file(self.root_key), region=REGION, account=ACCOUNT
        )
        self.events = FailingLog()
        self.now = 1_800_000_000.0
        self.service = self._service()
        self.requests = 0

    def _service(self) -> KeyService:
        return KeyService(
            self.keystore,
            self.events,
            principals=principal_of,
            owner_uid=A.uid,
            clock=lambda: self.now,
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

    def grant(
        self, key_id: str, grantee: str, operations: list[str], caller: Caller = A, **params: Any
    ) -> dict[str, Any]:
        return self.call(
            caller,
            "CreateGrant",
            KeyId=key_id,
            GranteePrincipal=grantee,
            Operations=operations,
            **params,
        )

    def data_key(self, caller: Caller, key_id: str, context: dict[str, str] | None = None) -> str:
        params: dict[str, Any] = {"KeyId": key_id, "KeySpec": "AES_256"}
        if context:
            params["EncryptionContext"] = context
        return self.call(caller, "GenerateDataKey", **params)["CiphertextBlob"]

    def decrypt(
        self, caller: Caller, blob: str, context: dict[str, str] | None = None, **params: Any
    ) -> str:
        if context:
            params["EncryptionContext"] = context
        return self.call(caller, "Decrypt", CiphertextBlob=blob, **params)["Plaintext"]

    def list_grants(self, key_id: str, caller: Caller = A, **params: Any) -> list[dict[str, Any]]:
        return self.call(caller, "ListGrants", KeyId=key_id, **params)["Grants"]


@pytest.fixture
def kms(tmp_path: Path) -> Iterator[Harness]:
    harness = Harness(tmp_path)
    try:
        yield harness
    finally:
        harness.keystore.close()


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


# ------------------------------------------------------------ create / revoke
def test_a_grant_lets_the_grantee_decrypt_until_it_is_revoked(kms: Harness) -> None:
    key_id = kms.create_key(A)
    blob = kms.data_key(A, key_id)
    with pytest.raises(AccessDeniedException):
        kms.decrypt(B, blob)
    created = kms.grant(key_id, B_ARN, ["Decrypt"])
    assert len(created["GrantId"]) == 64 and int(created["GrantId"], 16) >= 0
    assert kms.decrypt(B, blob)
    # the grant allowed the call: CloudTrail's additionalEventData.grantId
    assert kms.events[-1]["eventName"] == "Decrypt"
    assert kms.events[-1]["additionalEventData"] == {"grantId": created["GrantId"]}
    # only the granted operation; and only the grantee
    with pytest.raises(AccessDeniedException):
        kms.call(B, "Encrypt", KeyId=key_id, Plaintext="aGk=")
    with pytest.raises(AccessDeniedException):
        kms.decrypt(C, blob)
    # A's own calls are allowed by the key policy: no grant id in their records
    kms.decrypt(A, blob)
    assert "additionalEventData" not in kms.events[-1]
    kms.call(A, "RevokeGrant", KeyId=key_id, GrantId=created["GrantId"])
    with pytest.raises(AccessDeniedException):
        kms.decrypt(B, blob)
    assert kms.list_grants(key_id) == []


def test_list_grants_shows_awss_entry_and_never_the_token(kms: Harness) -> None:
    key_id = kms.create_key(A)
    created = kms.grant(
        key_id,
        B_ARN,
        ["Decrypt", "DescribeKey", "Decrypt"],
        RetiringPrincipal=C_ARN,
        Name="backup-job",
        Constraints={"EncryptionContextSubset": {"dept": "it"}},
    )
    (entry,) = kms.list_grants(key_id)
    assert entry == {
        "KeyId": kms.arn(key_id),
        "GrantId": created["GrantId"],
        "Name": "backup-job",
        "CreationDate": kms.now,
        "GranteePrincipal": B_ARN,
        "RetiringPrincipal": C_ARN,
        "IssuingAccount": ROOT_ARN,
        "Operations": ["Decrypt", "DescribeKey"],
        "Constraints": {"EncryptionContextSubset": {"dept": "it"}},
    }
    assert created["GrantToken"] not in json.dumps(kms.list_grants(key_id))
    # filters
    assert kms.list_grants(key_id, GrantId=created["GrantId"]) == [entry]
    assert kms.list_grants(key_id, GrantId="0" * 64) == []
    assert kms.list_grants(key_id, GranteePrincipal=B_ARN) == [entry]
    assert kms.list_grants(key_id, GranteePrincipal=C_ARN) == []
    # ListGrants is not grantable: the key policy decides
    with pytest.raises(AccessDeniedException):
        kms.list_grants(key_id, caller=B)


def test_same_name_and_parameters_return_the_same_grant_with_a_new_token(kms: Harness) -> None:
    key_id = kms.create_key(A)
    first = kms.grant(key_id, B_ARN, ["Decrypt"], Name="job")
    again = kms.grant(key_id, B_ARN, ["Decrypt"], Name="job")
    assert again["GrantId"] == first["GrantId"]
    assert again["GrantToken"] != first["GrantToken"]
    assert len(kms.list_grants(key_id)) == 1
    # a different parameter makes a new grant; so does no name
    other = kms.grant(key_id, B_ARN, ["Decrypt", "Encrypt"], Name="job")
    assert other["GrantId"] != first["GrantId"]
    unnamed = [kms.grant(key_id, B_ARN, ["Decrypt"])["GrantId"] for _ in range(2)]
    assert len(set(unnamed)) == 2
    assert len(kms.list_grants(key_id)) == 4


# --------------------------------------------------------------- constraints
def test_subset_constraint_allows_supersets_and_keys_in_any_case(kms: Harness) -> None:
    key_id = kms.create_key(A)
    kms.grant(
        key_id,
        B_ARN,
        ["Decrypt", "DescribeKey"],
        Constraints={"EncryptionContextSubset": {"dept": "it"}},
    )
    for context in ({"dept": "it"}, {"dept": "it", "file": "x"}, {"DEPT": "it"}):
        assert kms.decrypt(B, kms.data_key(A, key_id, context), context)
    # values are case-sensitive; a missing pair or no context at all is refused
    for context in ({"dept": "IT"}, {"file": "x"}, {}):
        blob = kms.data_key(A, key_id, context)
        with pytest.raises(AccessDeniedException):
            kms.decrypt(B, blob, context)
    # DescribeKey takes no context: the constraint does not apply to it (AWS)
    assert kms.call(B, "DescribeKey", KeyId=key_id)["KeyMetadata"]["KeyId"] == key_id


def test_equals_constraint_allows_only_that_context(kms: Harness) -> None:
    key_id = kms.create_key(A)
    kms.grant(key_id, B_ARN, ["Decrypt"], Constraints={"EncryptionContextEquals": {"dept": "it"}})
    assert kms.decrypt(B, kms.data_key(A, key_id, {"Dept": "it"}), {"Dept": "it"})
    for context in ({"dept": "it", "file": "x"}, {"dept": "IT"}, {}):
        blob = kms.data_key(A, key_id, context)
        with pytest.raises(AccessDeniedException):
            kms.decrypt(B, blob, context)


def test_constraints_apply_to_generate_data_key_and_reencrypt(kms: Harness) -> None:
    key_id = kms.create_key(A)
    other_key = kms.create_key(A)
    kms.grant(
        key_id,
        B_ARN,
        ["GenerateDataKey", "ReEncryptFrom"],
        Constraints={"EncryptionContextSubset": {"job": "1"}},
    )
    kms.grant(other_key, B_ARN, ["ReEncryptTo"])
    blob = kms.data_key(B, key_id, {"job": "1"})
    with pytest.raises(AccessDeniedException):
        kms.data_key(B, key_id, {"job": "2"})
    moved = kms.call(
        B,
        "ReEncrypt",
        CiphertextBlob=blob,
        SourceEncryptionContext={"job": "1"},
        DestinationKeyId=other_key,
    )
    assert moved["KeyId"] == kms.arn(other_key)


def test_a_constrained_grant_cannot_name_operations_without_a_context(kms: Harness) -> None:
    key_id = kms.create_key(A)
    with pytest.raises(ValidationException, match="Sign"):
        kms.grant(
            key_id, B_ARN, ["Decrypt", "Sign"], Constraints={"EncryptionContextSubset": {"a": "b"}}
        )
    # at most 8 pairs, values at most 384 characters
    with pytest.raises(ValidationException):
        kms.grant(
            key_id,
            B_ARN,
            ["Decrypt"],
            Constraints={"EncryptionContextEquals": {f"k{i}": "v" for i in range(9)}},
        )
    with pytest.raises(ValidationException):
        kms.grant(
            key_id, B_ARN, ["Decrypt"], Constraints={"EncryptionContextSubset": {"k": "v" * 385}}
        )
    assert kms.list_grants(key_id) == []


# ------------------------------------------------------ grants that make grants
def test_a_grantee_creates_only_narrower_grants(kms: Harness) -> None:
    key_id = kms.create_key(A)
    kms.grant(
        key_id,
        B_ARN,
        ["Decrypt", "CreateGrant"],
        Constraints={"EncryptionContextSubset": {"a": "b"}},
    )
    # fewer operations, stricter constraints: allowed
    narrower = kms.grant(
        key_id,
        C_ARN,
        ["Decrypt"],
        caller=B,
        Constraints={"EncryptionContextSubset": {"a": "b", "c": "d"}},
    )
    equals = kms.grant(
        key_id, C_ARN, ["Decrypt"], caller=B, Constraints={"EncryptionContextEquals": {"A": "b"}}
    )
    assert {g["GrantId"] for g in kms.list_grants(key_id, GranteePrincipal=C_ARN)} == {
        narrower["GrantId"],
        equals["GrantId"],
    }
    refused: list[dict[str, Any]] = [
        {
            "Operations": ["Decrypt", "Encrypt"],
            "Constraints": {"EncryptionContextSubset": {"a": "b"}},
        },
        {"Operations": ["Decrypt"]},  # no constraint: looser
        {"Operations": ["Decrypt"], "Constraints": {"EncryptionContextSubset": {"c": "d"}}},
        {"Operations": ["Decrypt"], "Constraints": {"EncryptionContextEquals": {"c": "d"}}},
    ]
    for params in refused:
        with pytest.raises(AccessDeniedException):
            kms.call(B, "CreateGrant", KeyId=key_id, GranteePrincipal=C_ARN, **params)
    # a grant without CreateGrant creates nothing
    with pytest.raises(AccessDeniedException):
        kms.grant(key_id, B_ARN, ["Decrypt"], caller=C)


def test_kms_grant_operations_condition_in_the_key_policy(kms: Harness) -> None:
    key_id = kms.create_key(A)
    text = policy(
        allow(A_ARN),
        allow(
            B_ARN,
            "kms:CreateGrant",
            Condition={
                "ForAllValues:StringEquals": {"kms:GrantOperations": ["Decrypt", "Encrypt"]},
                "StringEquals": {"kms:GranteePrincipal": C_ARN},
                "Bool": {"kms:GrantIsForAWSResource": "false"},
            },
        ),
    )
    kms.call(A, "PutKeyPolicy", KeyId=key_id, PolicyName="default", Policy=text)
    kms.grant(key_id, C_ARN, ["Decrypt"], caller=B)
    with pytest.raises(AccessDeniedException):
        kms.grant(key_id, C_ARN, ["Decrypt", "ReEncryptFrom"], caller=B)
    with pytest.raises(AccessDeniedException):
        kms.grant(key_id, A_ARN, ["Decrypt"], caller=B)


def test_kms_grant_constraint_type_condition(kms: Harness) -> None:
    key_id = kms.create_key(A)
    text = policy(
        allow(A_ARN),
        allow(
            B_ARN,
            "kms:CreateGrant",
            Condition={"StringEquals": {"kms:GrantConstraintType": "EncryptionContextSubset"}},
        ),
    )
    kms.call(A, "PutKeyPolicy", KeyId=key_id, PolicyName="default", Policy=text)
    kms.grant(
        key_id, C_ARN, ["Decrypt"], caller=B, Constraints={"EncryptionContextSubset": {"a": "b"}}
    )
    for constraints in ({"EncryptionContextEquals": {"a": "b"}}, None):
        extra = {"Constraints": constraints} if constraints else {}
        with pytest.raises(AccessDeniedException):
            kms.grant(key_id, C_ARN, ["Decrypt"], caller=B, **extra)


def test_kms_retiring_principal_and_encryption_context_conditions(kms: Harness) -> None:
    key_id = kms.create_key(A)
    text = policy(
        allow(A_ARN),
        allow(
            B_ARN,
            "kms:CreateGrant",
            Condition={
                "StringEquals": {"kms:RetiringPrincipal": B_ARN, "kms:EncryptionContext:dept": "it"}
            },
        ),
    )
    kms.call(A, "PutKeyPolicy", KeyId=key_id, PolicyName="default", Policy=text)
    subset = {"EncryptionContextSubset": {"dept": "it"}}
    kms.grant(key_id, C_ARN, ["Decrypt"], caller=B, RetiringPrincipal=B_ARN, Constraints=subset)
    with pytest.raises(AccessDeniedException):
        kms.grant(key_id, C_ARN, ["Decrypt"], caller=B, Constraints=subset)
    with pytest.raises(AccessDeniedException):
        kms.grant(key_id, C_ARN, ["Decrypt"], caller=B, RetiringPrincipal=B_ARN)


# -------------------------------------------------------------- deny and state
def test_an_explicit_deny_in_the_key_policy_beats_a_grant(kms: Harness) -> None:
    key_id = kms.create_key(A)
    blob = kms.data_key(A, key_id)
    kms.grant(key_id, B_ARN, ["Decrypt"])
    deny = {"Effect": "Deny", "Principal": {"AWS": B_ARN}, "Action": "kms:Decrypt", "Resource": "*"}
    kms.call(
        A, "PutKeyPolicy", KeyId=key_id, PolicyName="default", Policy=policy(allow(A_ARN), deny)
    )
    with pytest.raises(AccessDeniedException, match="explicit deny"):
        kms.decrypt(B, blob)


def test_grants_survive_reopening_the_keystore(kms: Harness) -> None:
    key_id = kms.create_key(A)
    blob = kms.data_key(A, key_id)
    created = kms.grant(key_id, B_ARN, ["Decrypt"], Name="kept")
    kms.reopen()
    assert kms.decrypt(B, blob)
    assert [g["GrantId"] for g in kms.list_grants(key_id)] == [created["GrantId"]]


def test_grants_go_away_with_the_key(kms: Harness) -> None:
    key_id = kms.create_key(A)
    kept_key = kms.create_key(A)
    kms.grant(key_id, B_ARN, ["Decrypt"], RetiringPrincipal=C_ARN)
    kept = kms.grant(kept_key, B_ARN, ["Decrypt"], RetiringPrincipal=C_ARN)
    # a key pending deletion gets no new grants (KMSInvalidStateException, as AWS)
    kms.call(A, "ScheduleKeyDeletion", KeyId=key_id, PendingWindowInDays=7)
    with pytest.raises(KMSInvalidStateException):
        kms.grant(key_id, B_ARN, ["Decrypt"])
    kms.now += 8 * DAY
    assert kms.service.run_maintenance()["deleted"] == [key_id]
    assert kms.keystore.list_grants(key_id) == []
    retirable = kms.call(C, "ListRetirableGrants", RetiringPrincipal=C_ARN)["Grants"]
    assert [g["GrantId"] for g in retirable] == [kept["GrantId"]]


def test_create_grant_without_its_audit_record_changes_nothing(kms: Harness) -> None:
    key_id = kms.create_key(A)
    blob = kms.data_key(A, key_id)
    kms.events.failing = True
    with pytest.raises(StorageUnavailableException):
        kms.grant(key_id, B_ARN, ["Decrypt"])
    kms.events.failing = False
    assert kms.list_grants(key_id) == []
    with pytest.raises(AccessDeniedException):
        kms.decrypt(B, blob)
    created = kms.grant(key_id, B_ARN, ["Decrypt"])
    kms.events.failing = True
    with pytest.raises(StorageUnavailableException):
        kms.call(A, "RevokeGrant", KeyId=key_id, GrantId=created["GrantId"])
    kms.events.failing = False
    assert kms.decrypt(B, blob)  # the revocation was rolled back


def test_dry_run_creates_and_removes_nothing(kms: Harness) -> None:
    key_id = kms.create_key(A)
    with pytest.raises(DryRunOperationException):
        kms.grant(key_id, B_ARN, ["Decrypt"], DryRun=True)
    assert kms.list_grants(key_id) == []
    created = kms.grant(key_id, B_ARN, ["Decrypt"])
    with pytest.raises(DryRunOperationException):
        kms.call(A, "RevokeGrant", KeyId=key_id, GrantId=created["GrantId"], DryRun=True)
    with pytest.raises(DryRunOperationException):
        kms.call(ROOT, "RetireGrant", GrantToken=created["GrantToken"], DryRun=True)
    assert len(kms.list_grants(key_id)) == 1


# ------------------------------------------------------------ retire and revoke
def test_who_may_retire_a_grant(kms: Harness) -> None:
    key_id = kms.create_key(A)
    retirable = kms.grant(key_id, B_ARN, ["Decrypt"], RetiringPrincipal=C_ARN)
    # neither the grantee (no RetireGrant in the grant) nor the key's owner may retire
    for caller in (B, A):
        with pytest.raises(AccessDeniedException):
            kms.call(caller, "RetireGrant", KeyId=key_id, GrantId=retirable["GrantId"])
    kms.call(C, "RetireGrant", GrantToken=retirable["GrantToken"])
    assert kms.events[-1]["additionalEventData"] == {"grantId": retirable["GrantId"]}
    # the token names no key in the request: the record's resources entry does
    assert kms.events[-1]["resources"][0]["ARN"] == kms.arn(key_id)
    # the grantee may, when the grant includes RetireGrant
    own = kms.grant(key_id, B_ARN, ["Decrypt", "RetireGrant"])
    kms.call(B, "RetireGrant", KeyId=key_id, GrantId=own["GrantId"])
    # the account (root) may retire any grant
    other = kms.grant(key_id, B_ARN, ["Decrypt"])
    kms.call(ROOT, "RetireGrant", KeyId=kms.arn(key_id), GrantId=other["GrantId"])
    assert kms.list_grants(key_id) == []
    with pytest.raises(NotFoundException):
        kms.call(C, "RetireGrant", GrantToken=retirable["GrantToken"])


def test_revoke_needs_kms_revoke_grant_in_the_key_policy(kms: Harness) -> None:
    key_id = kms.create_key(A)
    created = kms.grant(key_id, B_ARN, ["Decrypt", "RetireGrant"], RetiringPrincipal=C_ARN)
    for caller in (B, C):
        with pytest.raises(AccessDeniedException):
            kms.call(caller, "RevokeGrant", KeyId=key_id, GrantId=created["GrantId"])
    kms.call(A, "RevokeGrant", KeyId=key_id, GrantId=created["GrantId"])
    with pytest.raises(NotFoundException):
        kms.call(A, "RevokeGrant", KeyId=key_id, GrantId=created["GrantId"])
    with pytest.raises(InvalidGrantIdException):
        kms.call(A, "RevokeGrant", KeyId=key_id, GrantId="not-a-grant-id")


def test_list_retirable_grants(kms: Harness) -> None:
    key_id = kms.create_key(A)
    other_key = kms.create_key(A)
    first = kms.grant(key_id, B_ARN, ["Decrypt"], RetiringPrincipal=C_ARN)
    kms.now += 1  # listed oldest first
    second = kms.grant(other_key, B_ARN, ["Encrypt"], RetiringPrincipal=C_ARN)
    kms.grant(key_id, B_ARN, ["Decrypt"], RetiringPrincipal=B_ARN)
    for caller in (C, ROOT):
        listed = kms.call(caller, "ListRetirableGrants", RetiringPrincipal=C_ARN)["Grants"]
        assert [(g["KeyId"], g["GrantId"]) for g in listed] == [
            (kms.arn(key_id), first["GrantId"]),
            (kms.arn(other_key), second["GrantId"]),
        ]
    with pytest.raises(AccessDeniedException):
        kms.call(B, "ListRetirableGrants", RetiringPrincipal=C_ARN)


# ------------------------------------------------------------------ validation
@pytest.mark.parametrize(
    "operations",
    [
        ["CreateKey"],
        ["PutKeyPolicy"],
        ["ScheduleKeyDeletion"],
        ["RevokeGrant"],
        ["kms:Decrypt"],
        [],
    ],
)
def test_only_awss_grant_operations_are_accepted(kms: Harness, operations: list[str]) -> None:
    key_id = kms.create_key(A)
    with pytest.raises(ValidationException):
        kms.grant(key_id, B_ARN, operations)


@pytest.mark.parametrize(
    "principal",
    [
        "uid-4322",
        "arn:aws:iam::999999999999:user/bob",
        f"arn:aws:iam::{ACCOUNT}:role/admin",
        f"arn:aws:iam::{ACCOUNT}:user/",
        "*",
    ],
)
def test_grantee_and_retiring_principal_must_be_this_accounts_arns(
    kms: Harness, principal: str
) -> None:
    key_id = kms.create_key(A)
    with pytest.raises(ValidationException):
        kms.grant(key_id, principal, ["Decrypt"])
    with pytest.raises(ValidationException):
        kms.grant(key_id, B_ARN, ["Decrypt"], RetiringPrincipal=principal)
    assert kms.list_grants(key_id) == []


def test_grant_tokens_must_be_keyds_and_name_a_grant_of_the_key(kms: Harness) -> None:
    key_id = kms.create_key(A)
    other_key = kms.create_key(A)
    blob = kms.data_key(A, key_id)
    token = kms.grant(key_id, B_ARN, ["Decrypt"])["GrantToken"]
    other_token = kms.grant(other_key, B_ARN, ["Decrypt"])["GrantToken"]
    # a token of this key's grant: usable at once
    assert kms.decrypt(B, blob, GrantTokens=[token])
    for garbage in (["garbage"], [token[:-4]], ["A" * 8193], [token] * 11):
        with pytest.raises(InvalidGrantTokenException):
            kms.decrypt(B, blob, GrantTokens=garbage)
    with pytest.raises(InvalidGrantTokenException):
        kms.decrypt(B, blob, GrantTokens=[other_token])
    with pytest.raises(InvalidGrantTokenException):
        kms.call(B, "RetireGrant", GrantToken="garbage")
    # garbage is refused before anything happens, and audited as such
    assert kms.events[-1]["errorCode"] == "InvalidGrantTokenException"
    assert token not in json.dumps(kms.events)


def test_the_audit_log_records_grants_but_never_their_tokens(kms: Harness) -> None:
    key_id = kms.create_key(A)
    created = kms.grant(
        key_id,
        B_ARN,
        ["Decrypt", "DescribeKey"],
        Constraints={"EncryptionContextSubset": {"dept": "it"}},
    )
    event = kms.events[-1]
    assert event["eventName"] == "CreateGrant" and event["readOnly"] is False
    assert event["requestParameters"] == {
        "keyId": key_id,
        "granteePrincipal": B_ARN,
        "operations": ["Decrypt", "DescribeKey"],
        "constraints": {"EncryptionContextSubset": {"dept": "it"}},
    }
    assert event["responseElements"] == {"grantId": created["GrantId"]}
    kms.call(B, "DescribeKey", KeyId=key_id, GrantTokens=[created["GrantToken"]])
    assert kms.events[-1]["additionalEventData"] == {"grantId": created["GrantId"]}
    kms.grant(key_id, B_ARN, ["Decrypt"], Name="n")
    kms.call(ROOT, "RetireGrant", GrantToken=created["GrantToken"])
    assert created["GrantToken"] not in json.dumps(kms.events)


def test_fifty_thousand_grants_per_key(kms: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    assert grants.MAX_GRANTS_PER_KEY == 50_000  # AWS's quota, documented in the README
    monkeypatch.setattr(grants, "MAX_GRANTS_PER_KEY", 3)
    key_id = kms.create_key(A)
    other_key = kms.create_key(A)
    for _ in range(3):
        kms.grant(key_id, B_ARN, ["Decrypt"])
    with pytest.raises(LimitExceededException):
        kms.grant(key_id, B_ARN, ["Decrypt"])
    kms.grant(other_key, B_ARN, ["Decrypt"])  # per key
    assert len(kms.list_grants(key_id)) == 3


def test_list_grants_pages(kms: Harness) -> None:
    key_id = kms.create_key(A)
    made = []
    for _ in range(5):
        made.append(kms.grant(key_id, B_ARN, ["Decrypt"])["GrantId"])
        kms.now += 1
    seen: list[str] = []
    pages = 0
    params: dict[str, Any] = {"Limit": 2}
    while True:
        page = kms.call(A, "ListGrants", KeyId=key_id, **params)
        pages += 1
        seen += [g["GrantId"] for g in page["Grants"]]
        if not page["Truncated"]:
            break
        params["Marker"] = page["NextMarker"]
    assert (pages, seen) == (3, made)
    with pytest.raises(ValidationException):
        kms.call(A, "ListGrants", KeyId=key_id, Limit=101)


# ------------------------------------------------------------- sans-IO rules
def test_constraint_strictness_rule() -> None:
    C_ = grants.Constraints
    subset_ab = C_(subset={"a": "b"})
    assert C_(subset={"a": "b", "c": "d"}).at_least_as_strict_as(subset_ab)
    assert C_(equals={"A": "b", "c": "d"}).at_least_as_strict_as(subset_ab)
    assert not C_(subset={"c": "d"}).at_least_as_strict_as(subset_ab)
    assert not subset_ab.at_least_as_strict_as(C_(subset={"a": "b", "c": "d"}))
    assert not C_().at_least_as_strict_as(subset_ab)
    assert C_(subset={"x": "y"}).at_least_as_strict_as(C_())
    equals_ab = C_(equals={"a": "b"})
    assert C_(equals={"a": "b"}).at_least_as_strict_as(equals_ab)
    assert not C_(subset={"a": "b"}).at_least_as_strict_as(equals_ab)
    assert not C_(equals={"a": "b", "c": "d"}).at_least_as_strict_as(equals_ab)


_pairs = st.dictionaries(st.sampled_from(["a", "A", "b"]), st.sampled_from(["1", "2"]), max_size=3)
_constraints = st.builds(
    grants.Constraints,
    equals=st.none() | _pairs.filter(bool),
    subset=st.none() | _pairs.filter(bool),
)


@settings(max_examples=600, deadline=None)
@given(child=_constraints, parent=_constraints, contexts=st.lists(_pairs, max_size=6))
@example(
    child=grants.Constraints(subset={"a": "1"}),
    parent=grants.Constraints(subset={"a": "1", "b": "1"}),
    contexts=[],
)
def test_a_stricter_grant_never_accepts_a_context_its_parent_refuses(
    child: grants.Constraints, parent: grants.Constraints, contexts: list[dict[str, str]]
) -> None:
    if child.at_least_as_strict_as(parent):
        for context in [*contexts, dict(child.equals or {}), dict(child.subset or {})]:
            if child.matches(context):
                assert parent.matches(context)


def test_tokens_round_trip_and_differ() -> None:
    key_id = "0b7c3d4e-1111-4222-8333-944455556666"
    grant_id = grants.new_grant_id()
    first, second = grants.make_token(key_id, grant_id), grants.make_token(key_id, grant_id)
    assert first != second
    assert grants.read_token(first) == grants.GrantToken(key_id, grant_id)
    assert grants.read_token(second) == grants.GrantToken(key_id, grant_id)


def test_a_keystore_made_before_grants_gets_the_table_on_open(kms: Harness) -> None:
    key_id = kms.create_key(A)
    blob = kms.data_key(A, key_id)
    kms.keystore.close()
    with sqlite3.connect(kms.path / DB_NAME) as db:
        db.execute("DROP TABLE grants")
    db.close()
    kms.keystore = Keystore.open(kms.path, RootKeySource.from_key_file(kms.root_key))
    kms.service = kms._service()
    kms.grant(key_id, B_ARN, ["Decrypt"])
    assert kms.decrypt(B, blob)


def test_a_describe_key_grant_makes_the_key_visible_in_listings(kms: Harness) -> None:
    key_id = kms.create_key(A)
    kms.call(A, "CreateAlias", AliasName="alias/shared", TargetKeyId=key_id)
    assert kms.call(B, "ListKeys")["Keys"] == []
    kms.grant(key_id, B_ARN, ["DescribeKey"])
    assert [k["KeyId"] for k in kms.call(B, "ListKeys")["Keys"]] == [key_id]
    assert "additionalEventData" not in kms.events[-1]  # the grant did not allow ListKeys
    assert [a["AliasName"] for a in kms.call(B, "ListAliases")["Aliases"]] == ["alias/shared"]
    assert [k["KeyId"] for k in kms.call(C, "ListKeys")["Keys"]] == []
