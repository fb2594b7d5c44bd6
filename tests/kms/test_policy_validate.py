"""Key policy validation (kmsfs.kms.policy.parse_policy), as AWS KMS validates on
CreateKey/PutKeyPolicy: every refusal is MalformedPolicyDocumentException and its
message names the offending place (``Statement[2].Condition.StringEquals: ...``).
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kmsfs.errors import MalformedPolicyDocumentException, kms_error_from_type
from kmsfs.kms.policy import (
    BASE_OPERATORS,
    CONDITION_KEYS,
    KMS_ACTIONS,
    MAX_POLICY_BYTES,
    default_policy,
    parse_policy,
)

ACCT = "111122223333"
ALICE = f"arn:aws:iam::{ACCT}:user/alice"
KEY = f"arn:aws:kms:us-east-1:{ACCT}:key/1234abcd-12ab-34cd-56ef-1234567890ab"


def good(**overrides: Any) -> dict[str, Any]:
    statement: dict[str, Any] = {
        "Sid": "s",
        "Effect": "Allow",
        "Principal": {"AWS": ALICE},
        "Action": "kms:Decrypt",
        "Resource": "*",
    }
    for name, value in overrides.items():
        if value is None:
            statement.pop(name, None)
        else:
            statement[name] = value
    return statement


def doc(*statements: dict[str, Any], **top: Any) -> str:
    document: dict[str, Any] = {"Version": "2012-10-17", "Statement": list(statements)}
    document.update(top)
    return json.dumps(document, ensure_ascii=False)


def three(bad: dict[str, Any]) -> str:
    """A policy whose third statement (Statement[2]) is the bad one."""
    return doc(good(), good(), bad)


INVALID: list[tuple[str, str, str]] = [
    # (case id, policy text, expected message fragment)
    ("not-json", "{not json", "not valid JSON"),
    ("truncated-json", '{"Statement": [', "not valid JSON"),
    ("top-level-list", "[]", "must be a JSON object"),
    # PutKeyPolicy: "A key policy document can include only the following characters:
    # printable ASCII ..., printable characters in the Basic Latin and Latin-1
    # Supplement character set, the tab, line feed, and carriage return"
    ("char-nul", doc(good(Sid="aXb")).replace("aXb", "a\x00b"), "character U+0000 at offset"),
    ("char-del", doc(good(Sid="a\x7fb")), "character U+007F at offset"),
    ("char-c1-control", doc(good(Sid="a\x85b")), "character U+0085 at offset"),
    ("char-nbsp", doc(good(Sid="a\xa0b")), "character U+00A0 at offset"),
    ("char-latin-extended", doc(good(Sid="\u0100")), "character U+0100 at offset"),
    ("char-euro", doc(good(Sid="5\u20ac")), "character U+20AC at offset"),
    ("char-emoji", doc(good(Sid="\U0001f511")), "character U+1F511 at offset"),
    ("top-level-string", '"policy"', "must be a JSON object"),
    ("unknown-top-field", doc(good(), Foo=1), "Foo: unknown top-level field"),
    ("bad-version", doc(good(), Version="2020-01-01"), "Version: must be one of"),
    ("id-not-string", doc(good(), Id=5), "Id: must be a string"),
    ("statement-missing", json.dumps({"Version": "2012-10-17"}), "Statement: missing"),
    ("statement-empty", doc(), "Statement: must be a statement object"),
    ("statement-string", doc(good(), Statement="x"), "Statement: must be a statement object"),
    ("statement-not-object", doc(good(), 5), "Statement[1]: must be an object"),
    ("duplicate-json-field", '{"Statement": [], "Statement": []}', "duplicate field 'Statement'"),
    ("unknown-statement-field", three(good(Foo="x")), "Statement[2].Foo: unknown statement field"),
    ("sid-not-string", three(good(Sid=1)), "Statement[2].Sid: must be a string"),
    ("effect-missing", three(good(Effect=None)), "Statement[2].Effect: must be Allow or Deny"),
    ("effect-lowercase", three(good(Effect="allow")), "Statement[2].Effect: must be Allow or Deny"),
    ("principal-missing", three(good(Principal=None)), "Statement[2]: needs Principal"),
    (
        "principal-and-notprincipal",
        three(good(NotPrincipal="*")),
        "Statement[2]: has both Principal and NotPrincipal",
    ),
    ("principal-bare-arn", three(good(Principal=ALICE)), "Statement[2].Principal: must be"),
    (
        "principal-service",
        three(good(Principal={"Service": "ec2.amazonaws.com"})),
        "Statement[2].Principal.Service: unsupported principal type",
    ),
    ("principal-no-aws", three(good(Principal={})), 'Statement[2].Principal: needs "AWS"'),
    (
        "principal-not-arn",
        three(good(Principal={"AWS": "alice"})),
        "Statement[2].Principal.AWS: 'alice' is not a valid principal ARN",
    ),
    (
        "principal-short-account",
        three(good(Principal={"AWS": "arn:aws:iam::1234:root"})),
        "Statement[2].Principal.AWS: 'arn:aws:iam::1234:root' is not a valid principal ARN",
    ),
    (
        "principal-group",
        three(good(Principal={"AWS": f"arn:aws:iam::{ACCT}:group/admins"})),
        "is not a valid principal ARN",
    ),
    (
        "principal-wildcard-arn",
        three(good(Principal={"AWS": f"arn:aws:iam::{ACCT}:user/*"})),
        "is not a valid principal ARN",
    ),
    (
        "principal-second-in-list",
        three(good(Principal={"AWS": [ALICE, "bob"]})),
        "Statement[2].Principal.AWS: 'bob'",
    ),
    (
        "principal-empty-list",
        three(good(Principal={"AWS": []})),
        "Statement[2].Principal.AWS: must not be empty",
    ),
    (
        "notprincipal-bad",
        three(good(Principal=None, NotPrincipal={"AWS": "x"})),
        "Statement[2].NotPrincipal.AWS: 'x'",
    ),
    ("action-missing", three(good(Action=None)), "Statement[2]: needs Action or NotAction"),
    (
        "action-unknown",
        three(good(Action="kms:Foo")),
        "Statement[2].Action: 'kms:Foo' matches no AWS KMS operation",
    ),
    (
        "action-reencrypt-is-not-an-action",
        three(good(Action="kms:ReEncrypt")),
        "'kms:ReEncrypt' matches no AWS KMS operation",
    ),
    (
        "action-other-service",
        three(good(Action="s3:GetObject")),
        "Statement[2].Action: 's3:GetObject' is not a kms: action",
    ),
    ("action-no-name", three(good(Action="kms:")), "'kms:' is not a kms: action"),
    ("action-empty-string", three(good(Action="")), "Statement[2].Action: must be a non-empty"),
    ("action-number", three(good(Action=5)), "Statement[2].Action: must be a non-empty"),
    ("action-empty-list", three(good(Action=[])), "Statement[2].Action: must not be empty"),
    (
        "action-bad-in-list",
        three(good(Action=["kms:Decrypt", "kms:Decrypts"])),
        "Statement[2].Action: 'kms:Decrypts'",
    ),
    (
        "action-bad-pattern",
        three(good(Action="kms:Gen/*")),
        "Statement[2].Action: 'kms:Gen/*' is not a valid action pattern",
    ),
    (
        "notaction-unknown",
        three(good(Action=None, NotAction="kms:Nope")),
        "Statement[2].NotAction: 'kms:Nope'",
    ),
    ("resource-missing", three(good(Resource=None)), "Statement[2]: needs Resource or NotResource"),
    (
        "resource-s3",
        three(good(Resource="arn:aws:s3:::bucket")),
        "Statement[2].Resource: 'arn:aws:s3:::bucket' is not \"*\" or a key ARN",
    ),
    (
        "resource-alias-arn",
        three(good(Resource=f"arn:aws:kms:us-east-1:{ACCT}:alias/fs")),
        "Statement[2].Resource:",
    ),
    (
        "notresource-bad",
        three(good(Resource=None, NotResource="key")),
        "Statement[2].NotResource: 'key'",
    ),
    (
        "condition-not-object",
        three(good(Condition=["StringEquals"])),
        "Statement[2].Condition: must be an object",
    ),
    (
        "condition-unknown-operator",
        three(good(Condition={"StringEqual": {"aws:username": "a"}})),
        "Statement[2].Condition.StringEqual: unknown condition operator StringEqual",
    ),
    (
        "condition-unknown-set-prefix",
        three(good(Condition={"ForSomeValues:StringEquals": {"aws:username": "a"}})),
        "Statement[2].Condition.ForSomeValues:StringEquals: unknown condition operator",
    ),
    (
        "condition-date-value",
        three(good(Condition={"DateLessThan": {"aws:CurrentTime": "a"}})),
        "Statement[2].Condition.DateLessThan.aws:CurrentTime: 'a' is not a date",
    ),
    (
        "condition-date-operator",
        three(good(Condition={"DateBefore": {"aws:CurrentTime": "2026-01-01"}})),
        "unknown condition operator DateBefore",
    ),
    (
        "condition-ip-value",
        three(good(Condition={"IpAddress": {"aws:SourceIp": "10.0.0.300/8"}})),
        "Statement[2].Condition.IpAddress.aws:SourceIp: '10.0.0.300/8' is not an IP address",
    ),
    (
        "condition-arn-value",
        three(good(Condition={"ArnLike": {"aws:PrincipalArn": "arn:aws:iam:user"}})),
        "Statement[2].Condition.ArnLike.aws:PrincipalArn: 'arn:aws:iam:user' is not an ARN",
    ),
    (
        "condition-binary-value",
        three(good(Condition={"BinaryEquals": {"aws:username": "not base64!"}})),
        "Statement[2].Condition.BinaryEquals.aws:username: 'not base64!' is not base64",
    ),
    (
        "condition-null-ifexists",
        three(good(Condition={"NullIfExists": {"aws:username": "true"}})),
        "Statement[2].Condition.NullIfExists: Null takes no IfExists",
    ),
    (
        "condition-unknown-key",
        three(good(Condition={"StringEquals": {"kms:Foo": "x"}})),
        "Statement[2].Condition.StringEquals: unknown condition key kms:Foo",
    ),
    (
        "condition-other-service-key",
        three(good(Condition={"StringEquals": {"s3:prefix": "x"}})),
        "unknown condition key s3:prefix",
    ),
    (
        "condition-empty-context-key",
        three(good(Condition={"StringEquals": {"kms:EncryptionContext:": "x"}})),
        "unknown condition key kms:EncryptionContext:",
    ),
    (
        "condition-empty-block",
        three(good(Condition={"StringEquals": {}})),
        "Statement[2].Condition.StringEquals: must be a non-empty object",
    ),
    (
        "condition-key-twice-any-case",
        three(good(Condition={"StringEquals": {"aws:username": "a", "AWS:UserName": "b"}})),
        "condition key AWS:UserName appears twice",
    ),
    (
        "condition-value-null",
        three(good(Condition={"StringEquals": {"aws:username": None}})),
        "Statement[2].Condition.StringEquals.aws:username: values must be",
    ),
    (
        "condition-value-object",
        three(good(Condition={"StringEquals": {"aws:username": {"a": 1}}})),
        "values must be strings, numbers or booleans",
    ),
    (
        "condition-value-empty-list",
        three(good(Condition={"StringEquals": {"aws:username": []}})),
        "Statement[2].Condition.StringEquals.aws:username: needs at least one value",
    ),
    (
        "condition-numeric-not-number",
        three(good(Condition={"NumericLessThan": {"kmsfs:CallerUid": "many"}})),
        "Statement[2].Condition.NumericLessThan.kmsfs:CallerUid: 'many' is not a number",
    ),
    (
        "condition-numeric-nan",
        three(good(Condition={"NumericLessThan": {"kmsfs:CallerUid": "NaN"}})),
        "'NaN' is not a number",
    ),
    (
        "condition-numeric-infinity",
        three(good(Condition={"NumericGreaterThan": {"kmsfs:CallerUid": "inf"}})),
        "'inf' is not a number",
    ),
    (
        "condition-numeric-python-underscores",
        three(good(Condition={"NumericEquals": {"kmsfs:CallerUid": "1_000"}})),
        "'1_000' is not a number",
    ),
    (
        "condition-bool-not-bool",
        three(good(Condition={"Bool": {"kms:GrantIsForAWSResource": "yes"}})),
        "Statement[2].Condition.Bool.kms:GrantIsForAWSResource: 'yes' is not true or false",
    ),
    (
        "condition-null-not-bool",
        three(good(Condition={"Null": {"aws:username": "maybe"}})),
        "'maybe' is not true or false",
    ),
    (
        "condition-policy-variable",
        three(good(Condition={"StringEquals": {"aws:username": "${aws:username}"}})),
        "policy variables (${...}) are not supported",
    ),
]


@pytest.mark.parametrize(
    ("text", "fragment"), [c[1:] for c in INVALID], ids=[c[0] for c in INVALID]
)
def test_invalid_policy_names_the_place(text: str, fragment: str) -> None:
    with pytest.raises(MalformedPolicyDocumentException) as caught:
        parse_policy(text)
    assert fragment in caught.value.message
    assert caught.value.aws_type == "MalformedPolicyDocumentException"


def test_issue_example_message_exactly() -> None:
    text = three(good(Condition={"StringEquals": {"kms:Foo": "x"}}))
    with pytest.raises(MalformedPolicyDocumentException) as caught:
        parse_policy(text)
    assert (
        caught.value.message == "Statement[2].Condition.StringEquals: unknown condition key kms:Foo"
    )


def test_error_type_round_trips_through_the_client_mapping() -> None:
    error = kms_error_from_type("MalformedPolicyDocumentException", "m")
    assert isinstance(error, MalformedPolicyDocumentException)


def _policy_of_size(size: int) -> str:
    base = doc(good(), Id="")
    padding = size - len(base.encode())
    assert padding >= 0
    text = doc(good(), Id="x" * padding)
    assert len(text.encode()) == size
    return text


def test_size_limit_is_32_kib() -> None:
    parse_policy(_policy_of_size(MAX_POLICY_BYTES))
    with pytest.raises(MalformedPolicyDocumentException, match="larger than 32768 bytes"):
        parse_policy(_policy_of_size(MAX_POLICY_BYTES + 1))


def test_size_counts_utf8_bytes() -> None:
    text = _policy_of_size(MAX_POLICY_BYTES - 1).replace('"Id": "x', '"Id": "\u00e9', 1)
    assert len(text) == MAX_POLICY_BYTES - 1 and len(text.encode()) == MAX_POLICY_BYTES
    parse_policy(text)
    text = _policy_of_size(MAX_POLICY_BYTES).replace('"Id": "x', '"Id": "\u00e9', 1)
    with pytest.raises(MalformedPolicyDocumentException):
        parse_policy(text)


def test_deeply_nested_json_is_refused_not_crashing() -> None:
    with pytest.raises(MalformedPolicyDocumentException):
        parse_policy("[" * 100000 + "]" * 100000)


# ------------------------------------------------------------------ what is accepted
def test_allowed_characters() -> None:
    parse_policy(doc(good(Sid="caf\u00e9 \u00a1\u00ff ~")).replace(" ", "\t\r\n ", 1))
    with pytest.raises(MalformedPolicyDocumentException) as caught:
        parse_policy(doc(good(Sid="\u0100")))
    assert "offset" in caught.value.message and caught.value.message.startswith("character")
    # the rule is on the document's characters: a JSON escape is plain ASCII
    parse_policy(doc(good(Sid="aXb")).replace("aXb", "\\u0100"))


def test_statement_may_be_a_single_object_and_version_optional() -> None:
    policy = parse_policy(json.dumps({"Statement": good()}))
    assert len(policy.statements) == 1 and policy.version == "2008-10-17"
    assert parse_policy(doc(good(), Version="2008-10-17")).version == "2008-10-17"


def test_account_id_principal_means_root() -> None:
    policy = parse_policy(doc(good(Principal={"AWS": ACCT})))
    assert policy.statements[0].principals == (f"arn:aws:iam::{ACCT}:root",)


def test_principal_forms() -> None:
    for principal in (
        "*",
        {"AWS": "*"},
        {"AWS": [ALICE, f"arn:aws:iam::{ACCT}:root"]},
        {"AWS": f"arn:aws:iam::{ACCT}:user/uid-1000"},
        {"AWS": f"arn:aws:iam::{ACCT}:user/first.last@example"},
    ):
        parse_policy(doc(good(Principal=principal)))


def test_every_kms_action_and_wildcards_parse() -> None:
    parse_policy(doc(good(Action=list(KMS_ACTIONS))))
    parse_policy(doc(good(Action=[a.upper() for a in KMS_ACTIONS])))
    for pattern in ("*", "kms:*", "kms:Generate*", "kms:?ecrypt", "kms:*Grant*", "kms:Frob*"):
        parse_policy(doc(good(Action=pattern)))


def test_resource_forms() -> None:
    for resource in ("*", KEY, [KEY, "*"], f"arn:aws:kms:*:{ACCT}:key/*"):
        parse_policy(doc(good(Resource=resource)))


@pytest.mark.parametrize("base", BASE_OPERATORS)
def test_every_operator_with_prefixes_and_ifexists_parses(base: str) -> None:
    if base.startswith("Numeric"):
        value: Any = "10"
    elif base in ("Bool", "Null"):
        value = "true"
    elif base.startswith("Date"):
        value = ["2026-12-07T10:00:00Z", "1765100000"]
    elif base.endswith("IpAddress"):
        value = ["10.0.0.0/8", "::1"]
    elif base.startswith("Arn"):
        value = [f"arn:aws:iam::{ACCT}:user/*", "arn:aws:iam::*:root"]
    elif base == "BinaryEquals":
        value = "a2V5"
    else:
        value = ["a*", "b"]
    for prefix in ("", "ForAnyValue:", "ForAllValues:"):
        for suffix in ("", "IfExists"):
            if base == "Null" and suffix:
                continue
            parse_policy(doc(good(Condition={prefix + base + suffix: {"aws:username": value}})))


def test_every_condition_key_parses_in_any_case() -> None:
    keys = [*CONDITION_KEYS, "kms:EncryptionContext:Department", "kms:EncryptionContext:aws:arn"]
    for key in keys:
        parse_policy(doc(good(Condition={"StringEquals": {key: "x"}})))
        parse_policy(doc(good(Condition={"StringEquals": {key.upper(): "x"}})))


def test_json_scalars_are_accepted_as_condition_values() -> None:
    parse_policy(doc(good(Condition={"Bool": {"kms:GrantIsForAWSResource": True}})))
    parse_policy(doc(good(Condition={"NumericLessThan": {"kmsfs:CallerUid": 1000}})))
    parse_policy(doc(good(Condition={"StringEquals": {"kmsfs:CallerUid": 1000}})))


def test_default_policy_parses_and_keeps_its_text() -> None:
    text = default_policy(ACCT, ALICE)
    policy = parse_policy(text)
    assert policy.text == text
    assert [s.sid for s in policy.statements] == [
        "Enable IAM User Permissions",
        "Allow the key's creator (kmsfs)",
    ]


# ------------------------------------------------------------------ garbage in
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=12), children, max_size=3)
    ),
    max_leaves=12,
)
FIELD_NAMES = st.sampled_from(
    [
        "Sid",
        "Effect",
        "Principal",
        "NotPrincipal",
        "Action",
        "NotAction",
        "Resource",
        "NotResource",
        "Condition",
        "AWS",
        "StringEquals",
        "kms:EncryptionContext:x",
        "Foo",
    ]
)


@settings(max_examples=300, deadline=None)
@given(field=FIELD_NAMES, value=JSON_VALUES, index=st.integers(0, 2))
def test_any_field_value_is_accepted_or_malformed_never_a_crash(
    field: str, value: Any, index: int
) -> None:
    statements = [good(), good(), good()]
    statements[index][field] = value
    try:
        parse_policy(doc(*statements))
    except MalformedPolicyDocumentException as exc:
        assert f"Statement[{index}]" in exc.message or exc.message.startswith(
            ("duplicate", "character U+")
        ), exc.message


@settings(max_examples=300, deadline=None)
@given(condition=JSON_VALUES, operator=st.text(max_size=30) | st.sampled_from(BASE_OPERATORS))
def test_any_condition_is_accepted_or_malformed_never_a_crash(
    condition: Any, operator: str
) -> None:
    for block in (condition, {operator: condition}, {operator: {"aws:username": condition}}):
        try:
            parse_policy(doc(good(Condition=block)))
        except MalformedPolicyDocumentException as exc:
            assert exc.message.startswith(("Statement[0]", "character U+")), exc.message


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=200))
def test_any_text_is_accepted_or_malformed_never_a_crash(text: str) -> None:
    try:
        parse_policy(text)
    except MalformedPolicyDocumentException:
        pass
