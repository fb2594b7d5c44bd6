"""Key policy evaluation (kmsfs.kms.policy.evaluate) against AWS's documented semantics.

The table cases follow the IAM User Guide ("Policy evaluation logic", "IAM JSON policy
elements: Condition operators", "...: NotPrincipal / NotAction / NotResource",
"Single-valued vs. multivalued context keys") and the AWS KMS Developer Guide's
key-policy examples (kms:EncryptionContext:, kms:ViaService, kms:CallerAccount,
kms:GrantIsForAWSResource...). Each case names the rule it pins.

A hypothesis test then checks ``evaluate`` against a reference evaluator written here,
separately, on the raw JSON: slow and simple, sharing no code with the module.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kmsfs.kms.policy import (
    CREATOR_SID,
    KMS_ACTIONS,
    RequestContext,
    default_policy,
    evaluate,
    matching_actions,
    parse_policy,
    would_lock_out,
)

ACCT = "111122223333"
OTHER_ACCT = "444455556666"
ROOT = f"arn:aws:iam::{ACCT}:root"
ALICE = f"arn:aws:iam::{ACCT}:user/alice"
BOB = f"arn:aws:iam::{ACCT}:user/bob"
ROOT_USER = f"arn:aws:iam::{ACCT}:user/root"  # uid 0's user ARN; it is also ROOT
KEY = f"arn:aws:kms:us-east-1:{ACCT}:key/1234abcd-12ab-34cd-56ef-1234567890ab"
KEY2 = f"arn:aws:kms:us-east-1:{ACCT}:key/0987dcba-09fe-87dc-65ba-ab0987654321"
EC = "kms:EncryptionContext:Department"
MISSING = object()


def stmt(
    effect: str = "Allow",
    principal: Any = "*",
    action: Any = "kms:*",
    resource: Any = "*",
    condition: dict[str, Any] | None = None,
    *,
    not_principal: Any = None,
    not_action: Any = None,
    not_resource: Any = None,
    sid: str | None = None,
) -> dict[str, Any]:
    out: dict[str, Any] = {"Effect": effect}
    if sid is not None:
        out["Sid"] = sid
    if not_principal is not None:
        out["NotPrincipal"] = not_principal
    else:
        out["Principal"] = principal
    if not_action is not None:
        out["NotAction"] = not_action
    else:
        out["Action"] = action
    if not_resource is not None:
        out["NotResource"] = not_resource
    else:
        out["Resource"] = resource
    if condition is not None:
        out["Condition"] = condition
    return out


def aws(*arns: str) -> dict[str, Any]:
    return {"AWS": arns[0] if len(arns) == 1 else list(arns)}


def policy_text(*statements: dict[str, Any]) -> str:
    return json.dumps({"Version": "2012-10-17", "Statement": list(statements)})


def ctx(
    principal: str = ALICE,
    action: str = "kms:Decrypt",
    resource: str = KEY,
    *,
    root: bool = False,
    account: str = ACCT,
    **conditions: Any,
) -> RequestContext:
    return RequestContext(principal, root, account, action, resource, conditions)


def _with(conditions: dict[str, Any], **kwargs: Any) -> RequestContext:
    base = ctx(**kwargs)
    return RequestContext(
        base.principal_arn, base.is_root, base.account_id, base.action, base.resource, conditions
    )


# ------------------------------------------------------------------ the table
# (case id, statements, context, expected effect)
Case = tuple[str, list[dict[str, Any]], RequestContext, str]
CASES: list[Case] = []


def case(name: str, statements: list[dict[str, Any]], context: RequestContext, expected: str):
    CASES.append((name, statements, context, expected))


A, D, I = "Allow", "Deny", "ImplicitDeny"  # noqa: E741

# --- precedence (IAM "Policy evaluation logic": explicit deny > allow > implicit deny)
case("empty-match-implicit-deny", [stmt(principal=aws(BOB))], ctx(), I)
case("allow-star", [stmt()], ctx(), A)
case("deny-star", [stmt("Deny")], ctx(), D)
case("deny-after-allow-wins", [stmt(), stmt("Deny")], ctx(), D)
case("deny-before-allow-wins", [stmt("Deny"), stmt()], ctx(), D)
case("deny-other-action-allow", [stmt(), stmt("Deny", action="kms:Encrypt")], ctx(), A)
case("deny-other-principal", [stmt(), stmt("Deny", principal=aws(BOB))], ctx(), A)
case("deny-other-resource", [stmt(), stmt("Deny", resource=KEY2)], ctx(), A)
case(
    "deny-condition-false-allows",
    [stmt(), stmt("Deny", condition={"StringEquals": {EC: "HR"}})],
    _with({EC: "IT"}),
    A,
)
case(
    "deny-condition-true-denies",
    [stmt(), stmt("Deny", condition={"StringEquals": {EC: "IT"}})],
    _with({EC: "IT"}),
    D,
)
case("only-deny-statements", [stmt("Deny", action="kms:Encrypt")], ctx(), I)
case("two-allows", [stmt(action="kms:Decrypt"), stmt(action="kms:*")], ctx(), A)

# --- principals
case("principal-user-match", [stmt(principal=aws(ALICE))], ctx(), A)
case("principal-user-other", [stmt(principal=aws(BOB))], ctx(), I)
case("principal-list", [stmt(principal=aws(BOB, ALICE))], ctx(), A)
case("principal-aws-star", [stmt(principal=aws("*"))], ctx(), A)
case("principal-star", [stmt(principal="*")], ctx(BOB), A)
case("root-arn-not-user", [stmt(principal=aws(ROOT))], ctx(), I)
case("root-arn-matches-root", [stmt(principal=aws(ROOT))], ctx(ROOT_USER, root=True), A)
case("account-id-is-root", [stmt(principal=aws(ACCT))], ctx(ROOT_USER, root=True), A)
case("account-id-not-user", [stmt(principal=aws(ACCT))], ctx(), I)
case(
    "root-arn-other-account",
    [stmt(principal=aws(f"arn:aws:iam::{OTHER_ACCT}:root"))],
    ctx(ROOT_USER, root=True),
    I,
)
case("root-user-arn-match", [stmt(principal=aws(ROOT_USER))], ctx(ROOT_USER, root=True), A)
case("principal-case-sensitive", [stmt(principal=aws(ALICE.replace("alice", "Alice")))], ctx(), I)
case(
    "principal-other-account-user",
    [stmt(principal=aws(f"arn:aws:iam::{OTHER_ACCT}:user/alice"))],
    ctx(),
    I,
)
# NotPrincipal: the statement applies to everyone except those listed
case("notprincipal-deny-others", [stmt(), stmt("Deny", not_principal=aws(ALICE))], ctx(BOB), D)
case("notprincipal-deny-spares-listed", [stmt(), stmt("Deny", not_principal=aws(ALICE))], ctx(), A)
case("notprincipal-allow-others", [stmt(not_principal=aws(BOB))], ctx(), A)
case("notprincipal-allow-not-listed", [stmt(not_principal=aws(ALICE))], ctx(), I)
case(
    "notprincipal-root-listed-root-spared",
    [stmt(), stmt("Deny", not_principal=aws(ROOT))],
    ctx(ROOT_USER, root=True),
    A,
)
case(
    "notprincipal-root-listed-user-denied",
    [stmt(), stmt("Deny", not_principal=aws(ROOT))],
    ctx(),
    D,
)
case("notprincipal-star-matches-nobody", [stmt(not_principal="*")], ctx(), I)

# --- actions and wildcards (action names are case-insensitive)
case("action-exact", [stmt(action="kms:Decrypt")], ctx(), A)
case("action-other", [stmt(action="kms:Encrypt")], ctx(), I)
case("action-case-insensitive", [stmt(action="KMS:decrypt")], ctx(), A)
case("action-context-case", [stmt(action="kms:Decrypt")], ctx(action="kms:DECRYPT"), A)
case("action-kms-star", [stmt(action="kms:*")], ctx(action="kms:PutKeyPolicy"), A)
case("action-bare-star", [stmt(action="*")], ctx(action="kms:ScheduleKeyDeletion"), A)
case("action-generate-star", [stmt(action="kms:Generate*")], ctx(action="kms:GenerateDataKey"), A)
case(
    "action-generate-star-pair",
    [stmt(action="kms:Generate*")],
    ctx(action="kms:GenerateDataKeyPairWithoutPlaintext"),
    A,
)
case("action-generate-star-no", [stmt(action="kms:Generate*")], ctx(action="kms:Encrypt"), I)
case("action-reencrypt-star", [stmt(action="kms:ReEncrypt*")], ctx(action="kms:ReEncryptTo"), A)
case("action-qmark", [stmt(action="kms:?ecrypt")], ctx(), A)
case("action-qmark-one-char", [stmt(action="kms:?crypt")], ctx(), I)
case("action-star-middle", [stmt(action="kms:*Key")], ctx(action="kms:DescribeKey"), A)
case("action-star-middle-no", [stmt(action="kms:*Key")], ctx(action="kms:DescribeKeys"), I)
case("action-list", [stmt(action=["kms:Encrypt", "kms:Decrypt"])], ctx(), A)
case("action-list-no", [stmt(action=["kms:Encrypt", "kms:Sign"])], ctx(), I)
case("action-wildcard-lowercase", [stmt(action="kms:generate*")], ctx(action="kms:GenerateMac"), A)
case("action-list-star", [stmt(action="kms:List*")], ctx(action="kms:ListRetirableGrants"), A)
case("action-describe-star", [stmt(action="kms:Describe*")], ctx(action="kms:DescribeKey"), A)
# NotAction: the statement applies to every action except those listed
case("notaction-allow-others", [stmt(not_action="kms:Encrypt")], ctx(), A)
case("notaction-allow-listed", [stmt(not_action="kms:Decrypt")], ctx(), I)
case("notaction-wildcard", [stmt(not_action="kms:*crypt")], ctx(), I)
case("notaction-wildcard-other", [stmt(not_action="kms:*crypt")], ctx(action="kms:Sign"), A)
case(
    "notaction-deny-all-but-decrypt",
    [stmt(), stmt("Deny", not_action=["kms:Decrypt", "kms:DescribeKey"])],
    ctx(),
    A,
)
case(
    "notaction-deny-all-but-decrypt-encrypt",
    [stmt(), stmt("Deny", not_action=["kms:Decrypt", "kms:DescribeKey"])],
    ctx(action="kms:Encrypt"),
    D,
)
case("notaction-kms-star-matches-none", [stmt(not_action="kms:*")], ctx(), I)
case("notaction-case-insensitive", [stmt(not_action="kms:DECRYPT")], ctx(), I)

# --- resources
case("resource-star", [stmt(resource="*")], ctx(), A)
case("resource-arn", [stmt(resource=KEY)], ctx(), A)
case("resource-other-arn", [stmt(resource=KEY2)], ctx(), I)
case("resource-wildcard", [stmt(resource=f"arn:aws:kms:*:{ACCT}:key/*")], ctx(), A)
case(
    "resource-wildcard-other-account",
    [stmt(resource=f"arn:aws:kms:*:{OTHER_ACCT}:key/*")],
    ctx(),
    I,
)
case("resource-list", [stmt(resource=[KEY2, KEY])], ctx(), A)
case("notresource-other", [stmt(not_resource=KEY2)], ctx(), A)
case("notresource-self", [stmt(not_resource=KEY)], ctx(), I)
case("notresource-star", [stmt(not_resource="*")], ctx(), I)
case("notresource-deny", [stmt(), stmt("Deny", not_resource=KEY2)], ctx(), D)

# --- grants: allow only when nothing denies (grants_allow handled in its own test too)


def cond_case(
    name: str,
    operator: str,
    key: str,
    policy_values: Any,
    request_value: Any,
    holds: bool,
) -> None:
    """An Allow statement with one condition: allowed iff the condition holds."""
    conditions = {} if request_value is MISSING else {key: request_value}
    case(
        f"cond-{name}",
        [stmt(condition={operator: {key: policy_values}})],
        _with(conditions),
        A if holds else I,
    )


# --- string operators: case-sensitive except IgnoreCase; several values are ORed
cond_case("streq-match", "StringEquals", EC, "IT", "IT", True)
cond_case("streq-case", "StringEquals", EC, "IT", "it", False)
cond_case("streq-other", "StringEquals", EC, "IT", "HR", False)
cond_case("streq-missing", "StringEquals", EC, "IT", MISSING, False)
cond_case("streq-list-or", "StringEquals", EC, ["HR", "IT"], "IT", True)
cond_case("streq-list-none", "StringEquals", EC, ["HR", "Ops"], "IT", False)
cond_case("streq-empty-string", "StringEquals", EC, "", "", True)
cond_case("strne-equal", "StringNotEquals", EC, "IT", "IT", False)
cond_case("strne-other", "StringNotEquals", EC, "IT", "HR", True)
cond_case("strne-missing-true", "StringNotEquals", EC, "IT", MISSING, True)
cond_case("strne-list-nor", "StringNotEquals", EC, ["HR", "IT"], "IT", False)
cond_case("strne-list-nor-none", "StringNotEquals", EC, ["HR", "Ops"], "IT", True)
cond_case("streqic-match", "StringEqualsIgnoreCase", EC, "IT", "it", True)
cond_case("streqic-other", "StringEqualsIgnoreCase", EC, "IT", "HR", False)
cond_case("streqic-missing", "StringEqualsIgnoreCase", EC, "IT", MISSING, False)
cond_case("strneic-equal", "StringNotEqualsIgnoreCase", EC, "IT", "iT", False)
cond_case("strneic-other", "StringNotEqualsIgnoreCase", EC, "IT", "HR", True)
cond_case("strneic-missing", "StringNotEqualsIgnoreCase", EC, "IT", MISSING, True)
cond_case("strlike-star", "StringLike", "aws:PrincipalArn", "arn:aws:iam::*:user/a*", ALICE, True)
cond_case("strlike-star-no", "StringLike", "aws:PrincipalArn", "arn:aws:iam::*:user/a*", BOB, False)
cond_case("strlike-qmark", "StringLike", "aws:username", "b?b", "bob", True)
cond_case("strlike-qmark-no", "StringLike", "aws:username", "b?b", "bb", False)
cond_case("strlike-case", "StringLike", "aws:username", "A*", "alice", False)
cond_case("strlike-missing", "StringLike", "aws:username", "*", MISSING, False)
cond_case("strlike-star-empty", "StringLike", "aws:username", "*", "", True)
cond_case("strnotlike-match", "StringNotLike", "aws:username", "a*", "alice", False)
cond_case("strnotlike-nomatch", "StringNotLike", "aws:username", "a*", "bob", True)
cond_case("strnotlike-missing", "StringNotLike", "aws:username", "a*", MISSING, True)

# --- numeric operators (request strings are read as numbers; non-numbers never match)
UID = "kmsfs:CallerUid"
ECK_NAME = "kms:EncryptionContextKeys"
cond_case("numeq", "NumericEquals", UID, "1000", 1000, True)
cond_case("numeq-str", "NumericEquals", UID, 1000, "1000", True)
cond_case("numeq-other", "NumericEquals", UID, "1000", 1001, False)
cond_case("numeq-missing", "NumericEquals", UID, "1000", MISSING, False)
cond_case("numeq-not-a-number", "NumericEquals", UID, "1000", "abc", False)
cond_case("numeq-request-underscores", "NumericEquals", UID, "1000", "1_000", False)
cond_case("numne-request-nan", "NumericNotEquals", UID, "1000", "nan", True)  # not a number ≠ 1000
cond_case("numlt-request-minus-inf", "NumericLessThan", UID, "1000", "-inf", False)
cond_case("numeq-request-spaces", "NumericEquals", UID, "1000", " 1000", False)
cond_case("numeq-negative-decimal", "NumericEquals", UID, "-1.50", "-1.5", True)
cond_case("numne-equal", "NumericNotEquals", UID, "1000", 1000, False)
cond_case("numne-other", "NumericNotEquals", UID, "1000", 1001, True)
cond_case("numne-missing", "NumericNotEquals", UID, "1000", MISSING, True)
cond_case("numlt-less", "NumericLessThan", UID, "1000", 999, True)
cond_case("numlt-equal", "NumericLessThan", UID, "1000", 1000, False)
cond_case("numlt-missing", "NumericLessThan", UID, "1000", MISSING, False)
cond_case("numle-equal", "NumericLessThanEquals", UID, "1000", 1000, True)
cond_case("numle-more", "NumericLessThanEquals", UID, "1000", 1001, False)
cond_case("numgt-more", "NumericGreaterThan", UID, "1000", 1001, True)
cond_case("numgt-equal", "NumericGreaterThan", UID, "1000", 1000, False)
cond_case("numge-equal", "NumericGreaterThanEquals", UID, "1000", 1000, True)
cond_case("numge-less", "NumericGreaterThanEquals", UID, "1000", 999, False)
cond_case("numge-float", "NumericGreaterThanEquals", UID, "999.5", 999.5, True)
cond_case("numlt-list-or", "NumericLessThan", UID, ["10", "2000"], 1000, True)

# --- Bool
GIFAR = "kms:GrantIsForAWSResource"
cond_case("bool-true", "Bool", GIFAR, "true", True, True)
cond_case("bool-true-false", "Bool", GIFAR, "true", False, False)
cond_case("bool-false", "Bool", GIFAR, "false", False, True)
cond_case("bool-string", "Bool", GIFAR, "true", "true", True)
cond_case("bool-json-literal", "Bool", GIFAR, True, "true", True)
cond_case("bool-missing", "Bool", GIFAR, "false", MISSING, False)

# --- Null: "true" means the key is absent, "false" that it is present
cond_case("null-true-missing", "Null", EC, "true", MISSING, True)
cond_case("null-true-present", "Null", EC, "true", "IT", False)
cond_case("null-false-present", "Null", EC, "false", "IT", True)
cond_case("null-false-missing", "Null", EC, "false", MISSING, False)
cond_case("null-true-empty-list", "Null", "kms:EncryptionContextKeys", "true", [], True)
cond_case("null-true-none", "Null", EC, "true", None, True)
cond_case("null-false-none-in-list", "Null", ECK_NAME, "false", [None], False)
cond_case("strne-none-is-missing", "StringNotEquals", EC, "IT", None, True)

# --- ...IfExists: absent key → true; present key → the operator
cond_case("ifexists-missing", "StringEqualsIfExists", EC, "IT", MISSING, True)
cond_case("ifexists-present-match", "StringEqualsIfExists", EC, "IT", "IT", True)
cond_case("ifexists-present-other", "StringEqualsIfExists", EC, "IT", "HR", False)
cond_case("ifexists-not-present-equal", "StringNotEqualsIfExists", EC, "IT", "IT", False)
cond_case("ifexists-not-missing", "StringNotEqualsIfExists", EC, "IT", MISSING, True)
cond_case("ifexists-numeric-missing", "NumericLessThanIfExists", UID, "1000", MISSING, True)
cond_case("ifexists-numeric-present", "NumericLessThanIfExists", UID, "1000", 5000, False)
cond_case("ifexists-bool-missing", "BoolIfExists", GIFAR, "true", MISSING, True)
cond_case("ifexists-like-present", "StringLikeIfExists", "aws:username", "a*", "bob", False)

# --- set operators on multivalued keys (empty set and missing key)
ECK = "kms:EncryptionContextKeys"
cond_case("anyvalue-one-matches", "ForAnyValue:StringEquals", ECK, ["a", "b"], ["a", "c"], True)
cond_case("anyvalue-none-matches", "ForAnyValue:StringEquals", ECK, ["a", "b"], ["c"], False)
cond_case("anyvalue-empty-set", "ForAnyValue:StringEquals", ECK, ["a", "b"], [], False)
cond_case("anyvalue-missing", "ForAnyValue:StringEquals", ECK, ["a", "b"], MISSING, False)
cond_case("anyvalue-scalar-request", "ForAnyValue:StringEquals", ECK, "a", "a", True)
cond_case("allvalues-all-match", "ForAllValues:StringEquals", ECK, ["a", "b"], ["a", "b"], True)
cond_case("allvalues-subset", "ForAllValues:StringEquals", ECK, ["a", "b"], ["a"], True)
cond_case("allvalues-one-outside", "ForAllValues:StringEquals", ECK, ["a", "b"], ["a", "c"], False)
cond_case("allvalues-empty-set-true", "ForAllValues:StringEquals", ECK, ["a"], [], True)
cond_case("allvalues-missing-true", "ForAllValues:StringEquals", ECK, ["a"], MISSING, True)
cond_case("allvalues-like", "ForAllValues:StringLike", ECK, "Dept*", ["DeptA", "DeptB"], True)
cond_case("allvalues-like-no", "ForAllValues:StringLike", ECK, "Dept*", ["DeptA", "X"], False)
cond_case("anyvalue-not-equals", "ForAnyValue:StringNotEquals", ECK, "a", ["a", "b"], True)
cond_case("anyvalue-not-equals-no", "ForAnyValue:StringNotEquals", ECK, "a", ["a"], False)
cond_case("anyvalue-not-equals-missing", "ForAnyValue:StringNotEquals", ECK, "a", MISSING, False)
cond_case("allvalues-not-equals", "ForAllValues:StringNotEquals", ECK, "a", ["b", "c"], True)
cond_case("allvalues-not-equals-no", "ForAllValues:StringNotEquals", ECK, "a", ["a", "b"], False)
cond_case("allvalues-not-equals-missing", "ForAllValues:StringNotEquals", ECK, "a", [], True)
# ForAnyValue ignores IfExists: a missing key is false all the same (observed on AWS,
# re:Post "ForAnyValue:StringEqualsIfExists behaving unexpectedly")
cond_case("anyvalue-ifexists-missing", "ForAnyValue:StringEqualsIfExists", ECK, "a", MISSING, False)
cond_case("anyvalue-not-ifexists-empty", "ForAnyValue:StringNotEqualsIfExists", ECK, "a", [], False)
cond_case(
    "allvalues-ifexists-missing", "ForAllValues:StringEqualsIfExists", ECK, "a", MISSING, True
)
cond_case("anyvalue-ifexists-present", "ForAnyValue:StringEqualsIfExists", ECK, "a", ["b"], False)
cond_case("allvalues-ignorecase", "ForAllValues:StringEqualsIgnoreCase", ECK, "A", ["a"], True)
cond_case("anyvalue-numeric", "ForAnyValue:NumericLessThan", "kmsfs:CallerUid", 10, [5, 50], True)
cond_case(
    "allvalues-numeric", "ForAllValues:NumericLessThan", "kmsfs:CallerUid", 10, [5, 50], False
)
cond_case("anyvalue-null-missing", "ForAnyValue:Null", ECK, "true", MISSING, True)
GROUPS = "kmsfs:CallerGroups"
cond_case("plain-on-multivalue-any", "StringEquals", GROUPS, "wheel", ["users", "wheel"], True)
cond_case("plain-on-multivalue-none", "StringEquals", GROUPS, "wheel", ["users"], False)
cond_case("plain-negated-multivalue", "StringNotEquals", GROUPS, "wheel", ["users", "wheel"], False)
cond_case("groups-anyvalue", "ForAnyValue:StringEquals", GROUPS, ["adm", "wheel"], ["wheel"], True)
cond_case("groups-anyvalue-no", "ForAnyValue:StringEquals", GROUPS, ["adm"], ["users"], False)

# --- each condition key (StringEquals, matched and not matched)
KEY_VALUES: list[tuple[str, Any, Any, Any]] = [
    # key, policy value, matching request value, non-matching request value
    ("kms:EncryptionContext:Project", "Alpha", "Alpha", "Beta"),
    ("kms:EncryptionContext:aws:s3:arn", "arn:aws:s3:::bucket", "arn:aws:s3:::bucket", "x"),
    ("kms:EncryptionContextKeys", "Project", ["Project"], ["Other"]),
    ("kms:CallerAccount", ACCT, ACCT, OTHER_ACCT),
    ("kms:ViaService", "ec2.us-east-1.amazonaws.com", "ec2.us-east-1.amazonaws.com", "s3"),
    ("kms:GrantOperations", "Decrypt", ["Decrypt"], ["Encrypt"]),
    ("kms:GranteePrincipal", BOB, BOB, ALICE),
    ("kms:RetiringPrincipal", BOB, BOB, ALICE),
    ("kms:GrantIsForAWSResource", "false", False, True),
    ("kms:KeySpec", "SYMMETRIC_DEFAULT", "SYMMETRIC_DEFAULT", "RSA_2048"),
    ("kms:KeyUsage", "ENCRYPT_DECRYPT", "ENCRYPT_DECRYPT", "SIGN_VERIFY"),
    ("kms:KeyOrigin", "AWS_KMS", "AWS_KMS", "EXTERNAL"),
    ("kms:RequestAlias", "alias/fs", "alias/fs", "alias/other"),
    ("kms:ResourceAliases", "alias/fs", ["alias/fs", "alias/b"], ["alias/b"]),
    ("kms:EncryptionAlgorithm", "SYMMETRIC_DEFAULT", "SYMMETRIC_DEFAULT", "RSAES_OAEP_SHA_256"),
    ("aws:PrincipalArn", ALICE, ALICE, BOB),
    ("aws:username", "alice", "alice", "bob"),
    ("aws:userid", "1000", "1000", "1001"),
    ("aws:SourceIp", "192.0.2.1", "192.0.2.1", "192.0.2.2"),
    ("aws:PrincipalAccount", ACCT, ACCT, OTHER_ACCT),
    ("kmsfs:CallerUid", "1000", 1000, 0),
    ("kmsfs:CallerGroups", "wheel", ["wheel"], ["users"]),
    ("kmsfs:CallerExecutable", "/usr/bin/kmsfs", "/usr/bin/kmsfs", "/bin/sh"),
]
for _key, _policy_value, _match, _other in KEY_VALUES:
    cond_case(f"key-{_key}-match", "StringEquals", _key, _policy_value, _match, True)
    cond_case(f"key-{_key}-other", "StringEquals", _key, _policy_value, _other, False)

# --- case rules: key names case-insensitive, values case-sensitive
case(
    "keyname-policy-upper",
    [stmt(condition={"StringEquals": {"KMS:ENCRYPTIONCONTEXT:DEPARTMENT": "IT"}})],
    _with({EC: "IT"}),
    A,
)
case(
    "keyname-request-lower",
    [stmt(condition={"StringEquals": {EC: "IT"}})],
    _with({EC.lower(): "IT"}),
    A,
)
case(
    "keyname-global-mixed",
    [stmt(condition={"StringEquals": {"AWS:UserName": "alice"}})],
    _with({"aws:username": "alice"}),
    A,
)
case(
    "value-case-sensitive",
    [stmt(condition={"StringEquals": {"aws:username": "Alice"}})],
    _with({"aws:username": "alice"}),
    I,
)
case(
    "value-ignorecase",
    [stmt(condition={"StringEqualsIgnoreCase": {"aws:username": "Alice"}})],
    _with({"aws:username": "alice"}),
    A,
)

# context keys differing only in case pool their values under the one condition key;
# AWS's advice (GrantConstraints) is to pin the exact keys with kms:EncryptionContextKeys
case(
    "context-keys-differing-in-case-pool",
    [stmt(condition={"StringEquals": {EC: "IT"}})],
    _with({EC: "HR", EC.lower(): "IT"}),
    A,
)
case(
    "context-keys-differing-in-case-deny-not-equals",
    [stmt(), stmt("Deny", condition={"StringNotEquals": {EC: "IT"}})],
    _with({EC: "HR", EC.lower(): "IT"}),
    A,
)
case(
    "context-keys-pinned-by-encryption-context-keys",
    [
        stmt(
            condition={
                "StringEquals": {EC: "IT"},
                "ForAllValues:StringEquals": {"kms:EncryptionContextKeys": "Department"},
            }
        )
    ],
    _with({EC: "HR", EC.lower(): "IT", "kms:EncryptionContextKeys": ["Department", "department"]}),
    I,
)

# --- several keys and several operators are ANDed
case(
    "and-two-keys-both",
    [stmt(condition={"StringEquals": {EC: "IT", "aws:username": "alice"}})],
    _with({EC: "IT", "aws:username": "alice"}),
    A,
)
case(
    "and-two-keys-one",
    [stmt(condition={"StringEquals": {EC: "IT", "aws:username": "alice"}})],
    _with({EC: "IT", "aws:username": "bob"}),
    I,
)
case(
    "and-two-operators-both",
    [stmt(condition={"StringEquals": {EC: "IT"}, "NumericLessThan": {UID: 1000}})],
    _with({EC: "IT", UID: 500}),
    A,
)
case(
    "and-two-operators-one",
    [stmt(condition={"StringEquals": {EC: "IT"}, "NumericLessThan": {UID: 1000}})],
    _with({EC: "IT", UID: 5000}),
    I,
)

# --- AWS KMS Developer Guide examples
case(
    "kms-example-viaservice-deny-direct",
    [
        stmt(principal=aws(ALICE)),
        stmt("Deny", action="kms:Decrypt", condition={"Null": {"kms:ViaService": "true"}}),
    ],
    ctx(),
    D,
)
case(
    "kms-example-viaservice-via",
    [
        stmt(principal=aws(ALICE)),
        stmt("Deny", action="kms:Decrypt", condition={"Null": {"kms:ViaService": "true"}}),
    ],
    _with({"kms:ViaService": "ec2.us-east-1.amazonaws.com"}),
    A,
)
case(
    "kms-example-grant-for-aws-resource",
    [
        stmt(
            principal=aws(ALICE),
            action=["kms:CreateGrant", "kms:ListGrants", "kms:RevokeGrant"],
            condition={"Bool": {"kms:GrantIsForAWSResource": "true"}},
        )
    ],
    _with({"kms:GrantIsForAWSResource": False}, action="kms:CreateGrant"),
    I,
)
case(
    "kms-example-grant-operations-subset",
    [
        stmt(
            action="kms:CreateGrant",
            condition={
                "ForAllValues:StringEquals": {"kms:GrantOperations": ["Decrypt", "Encrypt"]}
            },
        )
    ],
    _with({"kms:GrantOperations": ["Decrypt"]}, action="kms:CreateGrant"),
    A,
)
case(
    "kms-example-grant-operations-too-wide",
    [
        stmt(
            action="kms:CreateGrant",
            condition={
                "ForAllValues:StringEquals": {"kms:GrantOperations": ["Decrypt", "Encrypt"]}
            },
        )
    ],
    _with({"kms:GrantOperations": ["Decrypt", "RetireGrant"]}, action="kms:CreateGrant"),
    I,
)
case(
    "kms-example-require-context-key",
    [
        stmt(
            action="kms:GenerateDataKey",
            condition={"ForAnyValue:StringEquals": {"kms:EncryptionContextKeys": "Project"}},
        )
    ],
    _with({"kms:EncryptionContextKeys": ["Project", "Other"]}, action="kms:GenerateDataKey"),
    A,
)
case(
    "kms-example-caller-account",
    [stmt(condition={"StringEquals": {"kms:CallerAccount": ACCT}})],
    _with({"kms:CallerAccount": OTHER_ACCT}),
    I,
)
case(
    "kms-example-deny-outside-groups",
    [
        stmt(),
        stmt(
            "Deny",
            action="kms:Decrypt",
            condition={"ForAllValues:StringNotEquals": {"kmsfs:CallerGroups": "crypto"}},
        ),
    ],
    _with({"kmsfs:CallerGroups": ["users"]}),
    D,
)

# --- Date, IP address, ARN and binary operators (IAM "Condition operators")
NOW = "2026-12-07T10:00:00Z"
NOW_EPOCH = 1796637600  # the same instant
for name, operator, value, expected in [
    ("date-less-than-later", "DateLessThan", "2027-01-01T00:00:00Z", A),
    ("date-less-than-earlier", "DateLessThan", "2026-01-01", I),
    ("date-less-than-equal-same", "DateLessThanEquals", NOW, A),
    ("date-greater-than-same", "DateGreaterThan", NOW, I),
    ("date-greater-than-equals-epoch", "DateGreaterThanEquals", str(NOW_EPOCH), A),
    ("date-equals-offset", "DateEquals", "2026-12-07T11:00:00+01:00", A),
    ("date-not-equals-other", "DateNotEquals", "2026-12-07T10:00:01Z", A),
    ("date-equals-date-only-is-midnight", "DateEquals", "2026-12-07", I),
]:
    case(
        name,
        [stmt(condition={operator: {"aws:CurrentTime": value}})],
        _with({"aws:CurrentTime": NOW}),
        expected,
    )
case(
    "date-epoch-key-against-iso-value",
    [stmt(condition={"DateLessThan": {"aws:EpochTime": "2027-01-01T00:00:00Z"}})],
    _with({"aws:EpochTime": NOW_EPOCH}),
    A,
)
case(
    "date-missing-key-false",
    [stmt(condition={"DateLessThan": {"aws:CurrentTime": "2027-01-01"}})],
    _with({}),
    I,
)
case(
    "date-deny-after-expiry",
    [
        stmt(),
        stmt("Deny", condition={"DateGreaterThan": {"aws:CurrentTime": "2026-06-30T23:59:59Z"}}),
    ],
    _with({"aws:CurrentTime": NOW}),
    D,
)
for name, operator, value, source, expected in [
    ("ip-in-cidr", "IpAddress", "192.0.2.0/24", "192.0.2.17", A),
    ("ip-outside-cidr", "IpAddress", "192.0.2.0/24", "198.51.100.1", I),
    ("ip-single-address", "IpAddress", "203.0.113.5", "203.0.113.5", A),
    ("ip-v6-cidr", "IpAddress", "2001:db8::/32", "2001:db8::1", A),
    ("ip-v4-against-v6-cidr", "IpAddress", "2001:db8::/32", "192.0.2.1", I),
    ("not-ip-outside", "NotIpAddress", "10.0.0.0/8", "192.0.2.1", A),
    ("not-ip-inside", "NotIpAddress", "10.0.0.0/8", "10.1.2.3", I),
    ("ip-garbage-request-value", "IpAddress", "0.0.0.0/0", "not-an-ip", I),
]:
    case(
        name,
        [stmt(condition={operator: {"aws:SourceIp": value}})],
        _with({"aws:SourceIp": source}),
        expected,
    )
case(
    "not-ip-missing-key-true",
    [stmt(condition={"NotIpAddress": {"aws:SourceIp": "10.0.0.0/8"}})],
    _with({}),
    A,
)
case(
    "ip-if-exists-missing-key",
    [stmt(condition={"IpAddressIfExists": {"aws:SourceIp": "10.0.0.0/8"}})],
    _with({}),
    A,
)
for name, operator, value, expected in [
    ("arn-like-user-wildcard", "ArnLike", f"arn:aws:iam::{ACCT}:user/*", A),
    ("arn-equals-exact", "ArnEquals", ALICE, A),
    ("arn-equals-takes-wildcards-too", "ArnEquals", f"arn:aws:iam::{ACCT}:user/al?ce", A),
    ("arn-like-other-account", "ArnLike", f"arn:aws:iam::{OTHER_ACCT}:user/*", I),
    ("arn-like-account-part-wild", "ArnLike", "arn:aws:iam::*:user/alice", A),
    ("arn-like-star-stays-in-its-part", "ArnLike", "arn:aws:*:*:*:alice", I),
    ("arn-like-every-part-wild", "ArnLike", "arn:*:*:*:*:*", A),
    ("arn-like-case-sensitive", "ArnLike", f"arn:aws:iam::{ACCT}:user/ALICE", I),
    ("arn-not-like-other", "ArnNotLike", f"arn:aws:iam::{ACCT}:user/b*", A),
    ("arn-not-equals-self", "ArnNotEquals", ALICE, I),
]:
    case(
        name,
        [stmt(condition={operator: {"aws:PrincipalArn": value}})],
        _with({"aws:PrincipalArn": ALICE}),
        expected,
    )
case(
    "arn-for-any-value-grantee",
    [
        stmt(
            condition={
                "ForAnyValue:ArnLike": {"kms:GranteePrincipal": f"arn:aws:iam::{ACCT}:user/b*"}
            }
        )
    ],
    _with({"kms:GranteePrincipal": [ALICE, BOB]}),
    A,
)
case(
    "binary-equals",
    [stmt(condition={"BinaryEquals": {"aws:username": "YWxpY2U="}})],
    _with({"aws:username": "YWxpY2U="}),
    A,
)
case(
    "binary-equals-other",
    [stmt(condition={"BinaryEquals": {"aws:username": "Ym9i"}})],
    _with({"aws:username": "YWxpY2U="}),
    I,
)


def _ids() -> list[str]:
    return [c[0] for c in CASES]


def test_table_is_large_and_ids_unique() -> None:
    assert len(CASES) >= 150
    assert len(set(_ids())) == len(CASES)


@pytest.mark.parametrize(("name", "statements", "context", "expected"), CASES, ids=_ids())
def test_policy_table(
    name: str, statements: list[dict[str, Any]], context: RequestContext, expected: str
) -> None:
    policy = parse_policy(policy_text(*statements))
    decision = evaluate(policy, context)
    assert decision.effect == expected, name
    assert decision.allowed == (expected == "Allow")


# ------------------------------------------------------------------ decision details
def test_decision_names_the_deciding_statement() -> None:
    policy = parse_policy(
        policy_text(
            stmt(sid="Everyone", action="kms:Encrypt"),
            stmt(sid="Decrypt for all"),
            stmt("Deny", sid="No bob", principal=aws(BOB)),
        )
    )
    allowed = evaluate(policy, ctx())
    assert (allowed.statement_index, allowed.sid) == (1, "Decrypt for all")
    assert "Statement[1]" in allowed.describe() and "Decrypt for all" in allowed.describe()
    denied = evaluate(policy, ctx(BOB))
    assert (denied.effect, denied.statement_index, denied.sid) == ("Deny", 2, "No bob")
    nothing = evaluate(policy, ctx(action="kms:Sign", principal=BOB, resource=KEY2))
    assert nothing.effect == "Deny"  # bob is denied everything
    implicit = evaluate(parse_policy(policy_text(stmt(principal=aws(BOB)))), ctx())
    assert implicit.statement_index is None and not implicit.allowed


def test_grant_allows_only_when_no_statement_denies() -> None:
    nothing = parse_policy(policy_text(stmt(principal=aws(BOB))))
    assert evaluate(nothing, ctx()).allowed is False
    by_grant = evaluate(nothing, ctx(), grants_allow=True)
    assert by_grant.allowed and by_grant.by_grant and "grant" in by_grant.describe()
    deny = parse_policy(policy_text(stmt("Deny", principal=aws(ALICE))))
    assert evaluate(deny, ctx(), grants_allow=True).effect == "Deny"
    allow = parse_policy(policy_text(stmt(principal=aws(ALICE))))
    assert evaluate(allow, ctx(), grants_allow=True).by_grant is False


def test_default_policy_lets_root_and_creator_do_everything_and_nobody_else() -> None:
    text = default_policy(ACCT, ALICE)
    document = json.loads(text)
    assert document["Statement"][0]["Sid"] == "Enable IAM User Permissions"
    assert document["Statement"][0]["Principal"] == {"AWS": ROOT}
    assert document["Statement"][1]["Sid"] == CREATOR_SID
    policy = parse_policy(text)
    for action in KMS_ACTIONS:
        assert evaluate(policy, ctx(ALICE, action)).allowed
        assert evaluate(policy, ctx(ROOT_USER, action, root=True)).allowed
        assert not evaluate(policy, ctx(BOB, action)).allowed
    assert len(parse_policy(default_policy(ACCT, ROOT)).statements) == 1


def test_lockout_check() -> None:
    caller = ctx(ALICE, "kms:Decrypt")
    assert not would_lock_out(parse_policy(default_policy(ACCT, ALICE)), caller)
    # only root may manage: alice locks herself out
    assert would_lock_out(parse_policy(default_policy(ACCT, BOB)), caller)
    # she keeps Decrypt but not PutKeyPolicy
    assert would_lock_out(
        parse_policy(policy_text(stmt(principal=aws(ALICE), action="kms:Decrypt"))), caller
    )
    # a Deny on PutKeyPolicy locks out even with kms:*
    assert would_lock_out(
        parse_policy(policy_text(stmt(), stmt("Deny", action="kms:PutKeyPolicy"))), caller
    )
    # a condition the caller's request context fails also locks out
    guarded = policy_text(stmt(condition={"StringEquals": {"aws:username": "alice"}}))
    assert not would_lock_out(parse_policy(guarded), _with({"aws:username": "alice"}))
    assert would_lock_out(parse_policy(guarded), _with({"aws:username": "bob"}))


def test_matching_actions_expands_wildcards() -> None:
    assert matching_actions(["kms:ReEncrypt*"]) == ["kms:ReEncryptFrom", "kms:ReEncryptTo"]
    assert "kms:GenerateRandom" in matching_actions(["kms:Generate*"])
    assert matching_actions(["kms:*"]) == list(KMS_ACTIONS)


def test_unknown_action_in_context_still_matches_wildcards() -> None:
    policy = parse_policy(policy_text(stmt(action="kms:Frob*")))
    assert evaluate(policy, ctx(action="kms:Frobnicate")).allowed
    assert not evaluate(policy, ctx(action="kms:Decrypt")).allowed


# ------------------------------------------------------------------ reference evaluator
# Written from the IAM documentation directly on the JSON document, without the
# module's compiled forms; slow on purpose (recursive wildcard matching, linear scans).


def ref_wildcard(pattern: str, text: str) -> bool:
    if not pattern:
        return not text
    if pattern[0] == "*":
        return any(ref_wildcard(pattern[1:], text[i:]) for i in range(len(text) + 1))
    if not text:
        return False
    if pattern[0] == "?" or pattern[0] == text[0]:
        return ref_wildcard(pattern[1:], text[1:])
    return False


def ref_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def ref_text(value: Any) -> str:
    if value is True:
        return "true"
    if value is False:
        return "false"
    return str(value)


def ref_number(value: Any) -> float | None:
    """Integers and decimals only (no NaN, infinities, exponents, spaces, underscores)."""
    if isinstance(value, bool):
        return None
    text = str(value)
    if isinstance(value, float) and text.endswith(".0"):
        text = text[:-2]
    allowed = set("0123456789.")
    body = text[1:] if text.startswith("-") else text
    if not body or not set(body) <= allowed or body.count(".") > 1:
        return None
    if body.startswith(".") or body.endswith("."):
        return None
    return float(text)


def ref_request_values(conditions: dict[str, Any], key: str) -> list[Any]:
    found: list[Any] = []
    for name, value in conditions.items():
        if name.lower() == key.lower():
            found.extend(v for v in ref_list(value) if v is not None)
    return found


def ref_date(value: Any) -> float | None:
    """Epoch seconds, or ISO 8601 text (UTC when no zone is given)."""
    number = ref_number(value)
    if number is not None:
        return number
    text = ref_text(value)
    for layout in ("%Y-%m-%dT%H:%M:%S%z", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d"):
        try:
            moment = datetime.datetime.strptime(text.replace("Z", "+0000"), layout)
        except ValueError:
            continue
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=datetime.UTC)
        return moment.timestamp()
    return None


def ref_arn(pattern: str, text: str) -> bool:
    want, have = pattern.split(":", 5), text.split(":", 5)
    if len(want) != 6 or len(have) != 6:
        return False
    return all(ref_wildcard(w, h) for w, h in zip(want, have, strict=True))


def ref_ip(network: str, address: str) -> bool:
    try:
        return ipaddress.ip_address(address) in ipaddress.ip_network(network, strict=False)
    except ValueError:
        return False


def ref_one(base: str, request_value: Any, policy_value: Any) -> bool:
    """Positive form of the operator, one request value against one policy value."""
    positive = base.replace("Not", "")
    if positive in ("ArnEquals", "ArnLike"):
        return ref_arn(ref_text(policy_value), ref_text(request_value))
    if positive == "IpAddress":
        return ref_ip(ref_text(policy_value), ref_text(request_value))
    if positive == "BinaryEquals":
        return ref_text(request_value) == ref_text(policy_value)
    if positive.startswith("Date"):
        a, b = ref_date(request_value), ref_date(policy_value)
        if a is None or b is None:
            return False
        positive = positive.replace("Date", "Numeric")
        return {
            "NumericEquals": a == b,
            "NumericLessThan": a < b,
            "NumericLessThanEquals": a <= b,
            "NumericGreaterThan": a > b,
            "NumericGreaterThanEquals": a >= b,
        }[positive]
    if positive == "StringEquals":
        return ref_text(request_value) == ref_text(policy_value)
    if positive == "StringEqualsIgnoreCase":
        return ref_text(request_value).casefold() == ref_text(policy_value).casefold()
    if positive == "StringLike":
        return ref_wildcard(ref_text(policy_value), ref_text(request_value))
    if positive == "Bool":
        text = ref_text(request_value).lower()
        return text in ("true", "false") and text == ref_text(policy_value).lower()
    a, b = ref_number(request_value), ref_number(policy_value)
    if a is None or b is None:
        return False
    return {
        "NumericEquals": a == b,
        "NumericLessThan": a < b,
        "NumericLessThanEquals": a <= b,
        "NumericGreaterThan": a > b,
        "NumericGreaterThanEquals": a >= b,
    }[positive]


def ref_condition(operator: str, key: str, policy_values: Any, conditions: dict[str, Any]) -> bool:
    prefix = None
    if ":" in operator:
        prefix, operator = operator.split(":", 1)
    if_exists = operator.endswith("IfExists")
    base = operator.removesuffix("IfExists")
    negated = "Not" in base
    values = ref_list(policy_values)
    request = ref_request_values(conditions, key)
    if base == "Null":
        return any((len(request) == 0) == (ref_text(v).lower() == "true") for v in values)
    if not request:
        if prefix == "ForAnyValue":
            return False
        if if_exists or prefix == "ForAllValues":
            return True
        return negated

    def one(request_value: Any) -> bool:
        hit = any(ref_one(base, request_value, v) for v in values)
        return not hit if negated else hit

    if prefix == "ForAllValues":
        return all(one(r) for r in request)
    if prefix == "ForAnyValue":
        return any(one(r) for r in request)
    hit_any = any(any(ref_one(base, r, v) for v in values) for r in request)
    return not hit_any if negated else hit_any


def ref_principal_listed(principal: Any, context: RequestContext) -> bool:
    if principal == "*":
        return True
    for arn in ref_list(principal["AWS"]):
        if arn == "*" or arn == context.principal_arn:
            return True
        root_names = (context.account_id, f"arn:aws:iam::{context.account_id}:root")
        if arn in root_names and context.is_root:
            return True
    return False


def ref_applies(statement: dict[str, Any], context: RequestContext) -> bool:
    if "Principal" in statement:
        principal_ok = ref_principal_listed(statement["Principal"], context)
    else:
        principal_ok = not ref_principal_listed(statement["NotPrincipal"], context)
    action_field = "Action" if "Action" in statement else "NotAction"
    action_hit = any(
        ref_wildcard(a.lower(), context.action.lower()) for a in ref_list(statement[action_field])
    )
    action_ok = action_hit if action_field == "Action" else not action_hit
    resource_field = "Resource" if "Resource" in statement else "NotResource"
    resource_hit = any(
        ref_wildcard(r, context.resource) for r in ref_list(statement[resource_field])
    )
    resource_ok = resource_hit if resource_field == "Resource" else not resource_hit
    conditions_ok = all(
        ref_condition(operator, key, values, dict(context.conditions))
        for operator, block in statement.get("Condition", {}).items()
        for key, values in block.items()
    )
    return principal_ok and action_ok and resource_ok and conditions_ok


def ref_evaluate(document: dict[str, Any], context: RequestContext) -> str:
    statements = ref_list(document["Statement"])
    applying = [s for s in statements if ref_applies(s, context)]
    if any(s["Effect"] == "Deny" for s in applying):
        return "Deny"
    if any(s["Effect"] == "Allow" for s in applying):
        return "Allow"
    return "ImplicitDeny"


def test_reference_evaluator_agrees_with_the_table() -> None:
    """The reference is itself checked on the hand-written table."""
    for name, statements, context, expected in CASES:
        document = json.loads(policy_text(*statements))
        assert ref_evaluate(document, context) == expected, name


# ------------------------------------------------------------------ hypothesis
PRINCIPALS = [
    "*",
    {"AWS": ALICE},
    {"AWS": BOB},
    {"AWS": ROOT},
    {"AWS": ACCT},
    {"AWS": [ALICE, BOB]},
]
ACTIONS = [
    "kms:*",
    "*",
    "kms:Decrypt",
    "kms:Encrypt",
    "kms:Generate*",
    "kms:?ecrypt",
    "KMS:decrypt",
]
RESOURCES = ["*", KEY, KEY2, f"arn:aws:kms:*:{ACCT}:key/*"]
BASES = [
    "StringEquals",
    "StringNotEquals",
    "StringEqualsIgnoreCase",
    "StringNotEqualsIgnoreCase",
    "StringLike",
    "StringNotLike",
    "NumericEquals",
    "NumericNotEquals",
    "NumericLessThan",
    "NumericLessThanEquals",
    "NumericGreaterThan",
    "NumericGreaterThanEquals",
    "Bool",
    "Null",
    "DateLessThan",
    "DateGreaterThanEquals",
    "DateNotEquals",
    "IpAddress",
    "NotIpAddress",
    "ArnLike",
    "ArnNotEquals",
]
KEYS = [
    EC,
    "kms:EncryptionContext:project",
    "kmsfs:CallerGroups",
    "kmsfs:CallerUid",
    "aws:username",
]
STRINGS = ["IT", "it", "HR", "a*", "*T", "?T", "1000", "999.5", "true", "alice", ""]
NUMBERS = ["1000", "999.5", "0", 1000, -1]
DATES = [
    "2026-12-07T10:00:00Z",
    "2026-12-07",
    "1796637600",
    1796637600,
    "2027-01-01T00:00:00+01:00",
]
NETWORKS = ["10.0.0.0/8", "192.0.2.17", "2001:db8::/32", "0.0.0.0/0"]
ARN_PATTERNS = [
    ALICE,
    f"arn:aws:iam::{ACCT}:user/*",
    "arn:aws:iam::*:root",
    "arn:*:*:*:*:*",
    "arn:aws:*:*:*:alice",
]
REQUEST_SCALARS = st.sampled_from(
    ["IT", "it", "HR", "alice", "1000", "999.5", "true", "FALSE", "", 1000, 999.5, 0, True, False]
    + [None, "2026-12-07T10:00:00Z", 1796637600, "10.1.2.3", "2001:db8::5", ALICE, ROOT]
)


@st.composite
def conditions_strategy(draw: st.DrawFn) -> dict[str, Any]:
    block: dict[str, dict[str, Any]] = {}
    for _ in range(draw(st.integers(0, 3))):
        base = draw(st.sampled_from(BASES))
        prefix = draw(st.sampled_from(["", "ForAnyValue:", "ForAllValues:"]))
        suffix = "" if base == "Null" else draw(st.sampled_from(["", "IfExists"]))
        if base.startswith("Numeric"):
            pool = NUMBERS
        elif base.startswith("Date"):
            pool = DATES
        elif base.endswith("IpAddress"):
            pool = NETWORKS
        elif base.startswith("Arn"):
            pool = ARN_PATTERNS
        elif base in ("Bool", "Null"):
            pool = ["true", "false", True, False]
        else:
            pool = STRINGS
        values = draw(st.lists(st.sampled_from(pool), min_size=1, max_size=3))
        key = draw(st.sampled_from(KEYS))
        if draw(st.booleans()):
            key = key.upper()
        keys = block.setdefault(prefix + base + suffix, {})
        if any(k.lower() == key.lower() for k in keys):
            continue  # one key once per operator (a repeat is refused by parse_policy)
        keys[key] = values if len(values) > 1 else values[0]
    return block


@st.composite
def statement_strategy(draw: st.DrawFn) -> dict[str, Any]:
    out: dict[str, Any] = {"Effect": draw(st.sampled_from(["Allow", "Allow", "Deny"]))}
    principal_field = draw(st.sampled_from(["Principal", "Principal", "NotPrincipal"]))
    out[principal_field] = draw(st.sampled_from(PRINCIPALS))
    action_field = draw(st.sampled_from(["Action", "Action", "NotAction"]))
    out[action_field] = draw(st.lists(st.sampled_from(ACTIONS), min_size=1, max_size=2))
    resource_field = draw(st.sampled_from(["Resource", "Resource", "NotResource"]))
    out[resource_field] = draw(st.sampled_from(RESOURCES))
    condition = draw(conditions_strategy())
    if condition:
        out["Condition"] = condition
    return out


@st.composite
def context_strategy(draw: st.DrawFn) -> RequestContext:
    who = draw(st.sampled_from(["alice", "bob", "root"]))
    principal = {"alice": ALICE, "bob": BOB, "root": ROOT_USER}[who]
    conditions: dict[str, Any] = {}
    for key in draw(st.lists(st.sampled_from(KEYS), unique=True, max_size=len(KEYS))):
        if draw(st.booleans()):
            key = key.lower()
        if draw(st.booleans()):
            conditions[key] = draw(st.lists(REQUEST_SCALARS, max_size=3))
        else:
            conditions[key] = draw(REQUEST_SCALARS)
    return RequestContext(
        principal,
        who == "root",
        ACCT,
        draw(st.sampled_from(["kms:Decrypt", "kms:Encrypt", "kms:GenerateDataKey", "kms:Sign"])),
        draw(st.sampled_from([KEY, KEY2])),
        conditions,
    )


@settings(max_examples=400, deadline=None)
@given(
    statements=st.lists(statement_strategy(), min_size=1, max_size=4),
    contexts=st.lists(context_strategy(), min_size=1, max_size=5),
)
def test_evaluate_agrees_with_reference(
    statements: list[dict[str, Any]], contexts: list[RequestContext]
) -> None:
    text = json.dumps({"Version": "2012-10-17", "Statement": statements})
    policy = parse_policy(text)
    document = json.loads(text)
    for context in contexts:
        assert evaluate(policy, context).effect == ref_evaluate(document, context)


# ------------------------------------------------------------------ cost (printed, not asserted)
def test_the_last_of_ten_conditioned_statements_decides() -> None:
    """The policy scripts/bench_policy.py times: nine statements that do not match, the
    tenth allows."""
    ten = parse_policy(
        policy_text(
            *[
                stmt(
                    principal=aws(BOB, f"arn:aws:iam::{ACCT}:user/u{i}"),
                    action=["kms:Encrypt", "kms:Generate*"],
                    condition={
                        "StringEquals": {EC: f"dept{i}"},
                        "ForAllValues:StringLike": {"kms:EncryptionContextKeys": "Dep*"},
                        "NumericLessThanIfExists": {UID: 60000},
                    },
                )
                for i in range(9)
            ],
            stmt(principal=aws(ALICE), condition={"StringEquals": {EC: "IT"}}),
        )
    )
    context = _with({EC: "IT", "kms:EncryptionContextKeys": ["Department"], UID: 1000})
    assert evaluate(ten, context).allowed
