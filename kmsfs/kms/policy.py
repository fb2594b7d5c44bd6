"""Key policies: the AWS policy language, the subset AWS KMS key policies use. Sans-IO.

``parse_policy(text)`` validates a policy document as KMS does on CreateKey and
PutKeyPolicy and returns a :class:`Policy` whose patterns are compiled once;
``evaluate(policy, context)`` is a pure function of that policy and a
:class:`RequestContext` (who asks, for what action, on which key, with which
condition keys), returning a :class:`Decision`.

Evaluation follows AWS's documented logic ("Policy evaluation logic", IAM User Guide):
an explicit ``Deny`` in any statement that applies wins; otherwise the request is
allowed if some statement (or a grant, ``grants_allow``) allows it; otherwise it is
implicitly denied.

Where kmsfs differs from AWS, and why:

- **The account root ARN matches the root principal only.** In AWS,
  ``"Principal": {"AWS": "arn:aws:iam::111122223333:root"}`` in a key policy delegates
  to the account's IAM policies, so any IAM user the account allows matches it. keyd
  has no IAM to delegate to: here that ARN matches only the account's root principal
  (uid 0 over the Unix socket), and a user is matched by its own user ARN or ``"*"``.
  A bare 12-digit account id in ``Principal`` is accepted and, as AWS documents,
  means that account's root ARN.
- Principals are ``"*"`` or ``{"AWS": ...}`` with ARNs
  ``arn:aws:iam::<12 digits>:root`` or ``arn:aws:iam::<12 digits>:user/NAME``; the
  ``Service``, ``Federated`` and ``CanonicalUser`` forms name principals keyd never
  sees and are refused.
- Policy variables (``${aws:username}``) are not supported: a value containing ``${``
  is refused rather than matched literally, since a literal match would silently
  weaken a ``Deny``.
- Every statement needs Effect, Principal (or NotPrincipal), Action (or NotAction) and
  Resource (or NotResource). AWS's PutKeyPolicy accepts a statement without Action or
  Resource and ignores it ("the policy statement has no effect"); keyd refuses it, so
  a Deny the author believes in is never silently void.
- Unknown fields and unknown condition keys are refused, and so is a condition key
  given twice (in any case) under one operator.
- Places in error messages count statements from 0: ``Statement[2]`` is the third.

Condition semantics (IAM User Guide, "IAM JSON policy elements: Condition operators"
and "Single-valued vs. multivalued context keys"):

- Context key *names* are case-insensitive ("Context key names are not case-sensitive.
  For example, including the aws:SourceIP context key is equivalent to testing for
  AWS:SourceIp"); values are case-sensitive except for the ``...IgnoreCase``
  operators. Action names are case-insensitive too; ARNs are not.
- Several values for one key in a condition are ORed ("If a single condition operator
  includes multiple values for a context key, those values are evaluated using a
  logical OR"); for a negated operator (``StringNotEquals``...) they are NORed.
  Several keys in one operator, and several operators, are ANDed.
- A key absent from the request: "the values do not match and the condition is false.
  If the policy condition requires that the key is not matched, such as StringNotLike
  ... and the right key is not present, the condition is true. This logic applies to
  all condition operators except ...IfExists and Null check." An empty list (a
  multivalued key with no values) counts as absent.
- ``...IfExists``: "If the policy key is present in the context of the request,
  process the key as specified in the policy. If it is not present, evaluate the
  condition element as true." ``Null`` takes no ``IfExists`` (AWS: "You can add
  IfExists to the end of any condition operator name except the Null condition").
- ``ForAllValues:``: true if every request value matches; "It also returns true if
  there are no context keys in the request". ``ForAnyValue:``: true if at least one
  request value matches, and false if there is no matching context key or the key's
  value set is empty -- also with ``IfExists``, which ForAnyValue ignores (observed on
  AWS: re:Post "ForAnyValue:StringEqualsIfExists behaving unexpectedly", where a
  missing aws:TagKeys did not satisfy the condition). On ``Null`` the set prefixes
  change nothing (Null only tests presence).
- A plain (unprefixed) operator given a multivalued request value matches if any
  request value matches (negated operators: if none does). AWS says to use a set
  operator with a multivalued key and documents no result without one; this rule is
  kmsfs's choice.
- ``NotPrincipal`` with ``Deny``: AWS asks to list a user's account ARN next to the
  user, because an IAM user's request is also the account's; here the account root
  ARN is the root principal only, so listing the user alone spares that user.
- Encryption context keys that differ only in case (``Dept`` and ``dept``) both answer
  to ``kms:EncryptionContext:dept``; their values are pooled as one multivalued key.
  AWS KMS: "To avoid confusion, do not use multiple encryption context pairs that
  differ only by case. To require a fully case-sensitive encryption context, use the
  kms:EncryptionContext: and kms:EncryptionContextKeys conditions" (API reference,
  GrantConstraints); ``kms:EncryptionContextKeys`` values stay case-sensitive.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import ipaddress
import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from kmsfs.errors import MalformedPolicyDocumentException

#: AWS KMS key policy document size limit: 32 KiB ("Key policy document size: 32 KB
#: (32,768 bytes)", AWS KMS quotas).
MAX_POLICY_BYTES = 32 * 1024

#: Every AWS KMS action (Service Authorization Reference, "Actions defined by AWS Key
#: Management Service"). ReEncrypt is authorised as ReEncryptFrom and ReEncryptTo.
KMS_OPERATIONS: tuple[str, ...] = (
    "CancelKeyDeletion",
    "ConnectCustomKeyStore",
    "CreateAlias",
    "CreateCustomKeyStore",
    "CreateGrant",
    "CreateKey",
    "Decrypt",
    "DeleteAlias",
    "DeleteCustomKeyStore",
    "DeleteImportedKeyMaterial",
    "DeriveSharedSecret",
    "DescribeCustomKeyStores",
    "DescribeKey",
    "DisableKey",
    "DisableKeyRotation",
    "DisconnectCustomKeyStore",
    "EnableKey",
    "EnableKeyRotation",
    "Encrypt",
    "GenerateDataKey",
    "GenerateDataKeyPair",
    "GenerateDataKeyPairWithoutPlaintext",
    "GenerateDataKeyWithoutPlaintext",
    "GenerateMac",
    "GenerateRandom",
    "GetKeyPolicy",
    "GetKeyRotationStatus",
    "GetParametersForImport",
    "GetPublicKey",
    "ImportKeyMaterial",
    "ListAliases",
    "ListGrants",
    "ListKeyPolicies",
    "ListKeyRotations",
    "ListKeys",
    "ListResourceTags",
    "ListRetirableGrants",
    "PutKeyPolicy",
    "ReEncryptFrom",
    "ReEncryptTo",
    "ReplicateKey",
    "RetireGrant",
    "RevokeGrant",
    "RotateKeyOnDemand",
    "ScheduleKeyDeletion",
    "Sign",
    "SynchronizeMultiRegionKey",
    "TagResource",
    "UntagResource",
    "UpdateAlias",
    "UpdateCustomKeyStore",
    "UpdateKeyDescription",
    "UpdatePrimaryRegion",
    "Verify",
    "VerifyMac",
)
#: The same as IAM action names, ``kms:Decrypt``.
KMS_ACTIONS: tuple[str, ...] = tuple(f"kms:{name}" for name in KMS_OPERATIONS)
_KMS_ACTIONS_LOWER = frozenset(action.lower() for action in KMS_ACTIONS)

POLICY_VERSIONS = ("2012-10-17", "2008-10-17")

#: PutKeyPolicy: "A key policy document can include only the following characters:
#: printable ASCII characters from the space character (\u0020) through the end of the
#: ASCII character range; printable characters in the Basic Latin and Latin-1 Supplement
#: character set (through \u00FF); the tab (\u0009), line feed (\u000A), and carriage
#: return (\u000D) special characters". Checked on the document's text (a JSON escape
#: such as \u0100 is ASCII there).
_DISALLOWED_CHAR_RE = re.compile(r"[^\t\n\r\x20-\x7e\xa1-\xff]")

#: Condition keys accepted in key policies, lower-cased (names are case-insensitive).
#: ``kms:EncryptionContext:<key>`` is accepted for any non-empty <key>.
CONDITION_KEYS: tuple[str, ...] = (
    "kms:EncryptionContextKeys",
    "kms:CallerAccount",
    "kms:ViaService",
    "kms:GrantOperations",
    "kms:GranteePrincipal",
    "kms:RetiringPrincipal",
    "kms:GrantIsForAWSResource",
    "kms:GrantConstraintType",
    "kms:KeySpec",
    "kms:KeyUsage",
    "kms:KeyOrigin",
    "kms:RequestAlias",
    "kms:ResourceAliases",
    "kms:EncryptionAlgorithm",
    "kms:SigningAlgorithm",
    "kms:MessageType",
    "kms:MacAlgorithm",
    "kms:KeyAgreementAlgorithm",
    "kms:DataKeyPairSpec",
    "aws:PrincipalArn",
    "aws:username",
    "aws:userid",
    "aws:SourceIp",
    "aws:PrincipalAccount",
    "aws:CurrentTime",
    "aws:EpochTime",
    "kmsfs:CallerUid",
    "kmsfs:CallerGroups",
    "kmsfs:CallerExecutable",
)
ENCRYPTION_CONTEXT_PREFIX = "kms:EncryptionContext:"
_CONDITION_KEYS_LOWER = frozenset(key.lower() for key in CONDITION_KEYS)
_EC_PREFIX_LOWER = ENCRYPTION_CONTEXT_PREFIX.lower()

#: Base condition operators; each also exists with ``IfExists`` (except Null) and
#: the ``ForAnyValue:`` / ``ForAllValues:`` prefixes.
BASE_OPERATORS: tuple[str, ...] = (
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
    "DateEquals",
    "DateNotEquals",
    "DateLessThan",
    "DateLessThanEquals",
    "DateGreaterThan",
    "DateGreaterThanEquals",
    "Bool",
    "BinaryEquals",
    "IpAddress",
    "NotIpAddress",
    "ArnEquals",
    "ArnNotEquals",
    "ArnLike",
    "ArnNotLike",
    "Null",
)
NEGATED_OPERATORS = frozenset(
    {
        "StringNotEquals",
        "StringNotEqualsIgnoreCase",
        "StringNotLike",
        "NumericNotEquals",
        "DateNotEquals",
        "NotIpAddress",
        "ArnNotEquals",
        "ArnNotLike",
    }
)
SET_PREFIXES = ("ForAnyValue", "ForAllValues")

_ACCOUNT_RE = re.compile(r"[0-9]{12}")
_ROOT_ARN_RE = re.compile(r"arn:aws:iam::([0-9]{12}):root")
_USER_ARN_RE = re.compile(r"arn:aws:iam::([0-9]{12}):user/[A-Za-z0-9_+=,.@\-]{1,64}")
# A key ARN in Resource, with * and ? allowed anywhere (AWS allows wildcards in ARNs).
_KEY_ARN_RE = re.compile(r"arn:aws:kms:[a-z0-9\-*?]+:[0-9*?]+:key/[A-Za-z0-9\-*?]+")
_TOP_LEVEL_FIELDS = frozenset({"Version", "Id", "Statement"})
_STATEMENT_FIELDS = frozenset(
    {
        "Sid",
        "Effect",
        "Principal",
        "NotPrincipal",
        "Action",
        "NotAction",
        "Resource",
        "NotResource",
        "Condition",
    }
)


def root_arn(account_id: str) -> str:
    """The account's root principal ARN."""
    return f"arn:aws:iam::{account_id}:root"


# --------------------------------------------------------------------------- model
def _glob_regex(pattern: str, *, ignore_case: bool) -> re.Pattern[str]:
    """AWS wildcard matching: ``*`` any run of characters, ``?`` exactly one."""
    parts = []
    for char in pattern:
        if char == "*":
            parts.append(".*")
        elif char == "?":
            parts.append(".")
        else:
            parts.append(re.escape(char))
    return re.compile("".join(parts), re.DOTALL | (re.IGNORECASE if ignore_case else 0))


@dataclass(frozen=True)
class Condition:
    """One ``operator: {key: values}`` pair, compiled."""

    operator: str  # as written, e.g. "ForAllValues:StringLikeIfExists"
    base: str  # "StringLike"
    set_prefix: str | None  # "ForAnyValue" | "ForAllValues" | None
    if_exists: bool
    key: str  # lower-cased condition key name
    values: tuple[Any, ...]  # normalised policy values (see _compile_values)

    @property
    def negated(self) -> bool:
        return self.base in NEGATED_OPERATORS


@dataclass(frozen=True)
class Statement:
    """One statement, with its patterns compiled."""

    index: int
    sid: str | None
    effect: str  # "Allow" | "Deny"
    principals: tuple[str, ...]  # "*" or ARNs
    not_principal: bool
    actions: tuple[str, ...]  # as written
    not_action: bool
    resources: tuple[str, ...]
    not_resource: bool
    conditions: tuple[Condition, ...]
    # compiled forms
    _action_any: bool = field(repr=False, compare=False, default=False)
    _action_set: frozenset[str] = field(repr=False, compare=False, default=frozenset())
    _action_regexes: tuple[re.Pattern[str], ...] = field(repr=False, compare=False, default=())
    _resource_any: bool = field(repr=False, compare=False, default=False)
    _resource_regexes: tuple[re.Pattern[str], ...] = field(repr=False, compare=False, default=())
    _principal_any: bool = field(repr=False, compare=False, default=False)
    _principal_users: frozenset[str] = field(repr=False, compare=False, default=frozenset())
    _principal_root_accounts: frozenset[str] = field(repr=False, compare=False, default=frozenset())


@dataclass(frozen=True)
class Policy:
    """A validated key policy."""

    version: str
    id: str | None
    statements: tuple[Statement, ...]
    text: str = field(repr=False, compare=False, default="")


@dataclass(frozen=True)
class RequestContext:
    """Who asks for what, as the policy sees it.

    ``conditions`` maps condition key names (any case) to a value or a list of values:
    ``str``, ``int``/``float``, ``bool``. Missing keys, ``None`` and empty lists are
    all "absent from the request".
    """

    principal_arn: str
    is_root: bool
    account_id: str
    action: str  # "kms:Decrypt"
    resource: str  # the key ARN
    conditions: Mapping[str, Any] = field(default_factory=dict)
    #: other ARNs that name the same caller in a ``Principal`` (uid 0 is both the
    #: account's root and ``...:user/<its login name>``; see kmsfs.kms.principal)
    other_arns: tuple[str, ...] = ()
    _by_key: dict[str, tuple[Any, ...]] = field(
        init=False, repr=False, compare=False, default_factory=dict
    )

    def __post_init__(self) -> None:
        by_key: dict[str, tuple[Any, ...]] = {}
        for name, value in self.conditions.items():
            values = tuple(value) if isinstance(value, list | tuple | set | frozenset) else (value,)
            # A null value is no value ("Null ... the key is not present or its value
            # is null"): the key counts as absent.
            values = tuple(v for v in values if v is not None)
            if not values:
                continue
            # Two names that differ only in case (encryption context keys may) both
            # answer to the case-insensitive condition key: their values are pooled.
            lower = name.lower()
            by_key[lower] = by_key.get(lower, ()) + values
        object.__setattr__(self, "_by_key", by_key)

    def values(self, key: str) -> tuple[Any, ...]:
        """The request's values for a (lower-case) key; ``()`` if absent."""
        return self._by_key.get(key, ())

    def with_action(self, action: str) -> RequestContext:
        return RequestContext(
            self.principal_arn,
            self.is_root,
            self.account_id,
            action,
            self.resource,
            self.conditions,
            self.other_arns,
        )


@dataclass(frozen=True)
class Decision:
    """The outcome: ``effect`` is "Allow", "Deny" (explicit) or "ImplicitDeny"."""

    allowed: bool
    effect: str
    statement_index: int | None = None
    sid: str | None = None
    by_grant: bool = False

    def describe(self) -> str:
        """For audit messages: which statement decided."""
        if self.by_grant:
            return "allowed by a grant"
        if self.statement_index is None:
            return "no statement allows it"
        where = f"Statement[{self.statement_index}]"
        if self.sid:
            where += f" (Sid {self.sid!r})"
        verb = "allowed" if self.allowed else "denied"
        return f"{verb} by {where}"


# --------------------------------------------------------------------------- parsing
def _fail(place: str, message: str) -> MalformedPolicyDocumentException:
    return MalformedPolicyDocumentException(f"{place}: {message}" if place else message)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for name, value in pairs:
        if name in result:
            raise _fail("", f"duplicate field {name!r} in a JSON object")
        result[name] = value
    return result


def _string_list(value: Any, place: str) -> list[str]:
    items = value if isinstance(value, list) else [value]
    if not items:
        raise _fail(place, "must not be empty")
    for item in items:
        if not isinstance(item, str) or not item:
            raise _fail(place, "must be a non-empty string or a list of them")
    return items


def parse_policy(text: str) -> Policy:
    """Validate a key policy document and compile it.

    Raises :class:`MalformedPolicyDocumentException` naming the offending place.
    """
    if not isinstance(text, str):
        raise _fail("", "the policy must be a JSON string")
    if len(text.encode("utf-8", "surrogatepass")) > MAX_POLICY_BYTES:
        raise _fail("", f"the policy is larger than {MAX_POLICY_BYTES} bytes")
    bad_char = _DISALLOWED_CHAR_RE.search(text)
    if bad_char is not None:
        raise _fail(
            "",
            f"character U+{ord(bad_char.group()):04X} at offset {bad_char.start()} is not "
            "allowed in a key policy",
        )
    try:
        document = json.loads(text, object_pairs_hook=_no_duplicates)
    except MalformedPolicyDocumentException:
        raise
    except (ValueError, RecursionError) as exc:
        raise _fail("", f"not valid JSON ({type(exc).__name__})") from None
    if not isinstance(document, dict):
        raise _fail("", "the policy must be a JSON object")
    unknown = sorted(set(document) - _TOP_LEVEL_FIELDS)
    if unknown:
        raise _fail(unknown[0], "unknown top-level field")
    version = document.get("Version", "2008-10-17")
    if version not in POLICY_VERSIONS:
        raise _fail("Version", f"must be one of {', '.join(POLICY_VERSIONS)}")
    policy_id = document.get("Id")
    if policy_id is not None and not isinstance(policy_id, str):
        raise _fail("Id", "must be a string")
    if "Statement" not in document:
        raise _fail("Statement", "missing")
    raw_statements = document["Statement"]
    if isinstance(raw_statements, dict):
        raw_statements = [raw_statements]
    if not isinstance(raw_statements, list) or not raw_statements:
        raise _fail("Statement", "must be a statement object or a non-empty list of them")
    statements = tuple(
        _parse_statement(raw, index, f"Statement[{index}]")
        for index, raw in enumerate(raw_statements)
    )
    return Policy(version=version, id=policy_id, statements=statements, text=text)


def _pair(raw: dict[str, Any], name: str, place: str, *, required: bool = True) -> tuple[Any, bool]:
    """Return (value, negated) for Name/NotName, exactly one of which must be present."""
    has_plain, has_not = name in raw, f"Not{name}" in raw
    if has_plain and has_not:
        raise _fail(place, f"has both {name} and Not{name}")
    if not has_plain and not has_not:
        if required:
            raise _fail(place, f"needs {name} or Not{name}")
        return None, False
    return (raw[f"Not{name}"], True) if has_not else (raw[name], False)


def _parse_statement(raw: Any, index: int, place: str) -> Statement:
    if not isinstance(raw, dict):
        raise _fail(place, "must be an object")
    unknown = sorted(set(raw) - _STATEMENT_FIELDS)
    if unknown:
        raise _fail(f"{place}.{unknown[0]}", "unknown statement field")
    sid = raw.get("Sid")
    if sid is not None and not isinstance(sid, str):
        raise _fail(f"{place}.Sid", "must be a string")
    effect = raw.get("Effect")
    if effect not in ("Allow", "Deny"):
        raise _fail(f"{place}.Effect", "must be Allow or Deny")

    principal_value, not_principal = _pair(raw, "Principal", place)
    principal_place = f"{place}.{'NotPrincipal' if not_principal else 'Principal'}"
    principals = _parse_principals(principal_value, principal_place)

    action_value, not_action = _pair(raw, "Action", place)
    action_place = f"{place}.{'NotAction' if not_action else 'Action'}"
    actions = _string_list(action_value, action_place)
    for action in actions:
        _check_action(action, action_place)

    resource_value, not_resource = _pair(raw, "Resource", place)
    resource_place = f"{place}.{'NotResource' if not_resource else 'Resource'}"
    resources = _string_list(resource_value, resource_place)
    for resource in resources:
        if resource != "*" and not _KEY_ARN_RE.fullmatch(resource):
            raise _fail(resource_place, f'{resource!r} is not "*" or a key ARN')

    conditions = _parse_conditions(raw.get("Condition"), f"{place}.Condition")

    action_any = "*" in actions or any(a.lower() == "kms:*" for a in actions)
    action_set = frozenset(a.lower() for a in actions if "*" not in a and "?" not in a)
    action_regexes = tuple(
        _glob_regex(a, ignore_case=True) for a in actions if ("*" in a or "?" in a)
    )
    # Expand wildcards against the KMS action list once, so evaluation of a known
    # action is a set lookup; unknown actions still go through the regexes.
    expanded = set(action_set)
    for regex in action_regexes:
        expanded.update(a for a in _KMS_ACTIONS_LOWER if regex.fullmatch(a))
    return Statement(
        index=index,
        sid=sid,
        effect=effect,
        principals=tuple(principals),
        not_principal=not_principal,
        actions=tuple(actions),
        not_action=not_action,
        resources=tuple(resources),
        not_resource=not_resource,
        conditions=conditions,
        _action_any=action_any,
        _action_set=frozenset(expanded),
        _action_regexes=action_regexes,
        _resource_any="*" in resources,
        _resource_regexes=tuple(_glob_regex(r, ignore_case=False) for r in resources),
        _principal_any="*" in principals,
        _principal_users=frozenset(p for p in principals if _USER_ARN_RE.fullmatch(p)),
        _principal_root_accounts=frozenset(
            m.group(1) for p in principals if (m := _ROOT_ARN_RE.fullmatch(p))
        ),
    )


def _parse_principals(value: Any, place: str) -> list[str]:
    if value == "*":
        return ["*"]
    if not isinstance(value, dict):
        raise _fail(place, 'must be "*" or {"AWS": ARN or list of ARNs}')
    unknown = sorted(set(value) - {"AWS"})
    if unknown:
        raise _fail(f"{place}.{unknown[0]}", "unsupported principal type (only AWS)")
    if "AWS" not in value:
        raise _fail(place, 'needs "AWS"')
    result = []
    for principal in _string_list(value["AWS"], f"{place}.AWS"):
        if principal == "*":
            result.append("*")
        elif _ACCOUNT_RE.fullmatch(principal):
            # "You can also specify the account ID ... AWS converts it to the
            # account root ARN" (IAM User Guide, "AWS JSON policy elements: Principal").
            result.append(root_arn(principal))
        elif _ROOT_ARN_RE.fullmatch(principal) or _USER_ARN_RE.fullmatch(principal):
            result.append(principal)
        else:
            raise _fail(f"{place}.AWS", f"{principal!r} is not a valid principal ARN")
    return result


def _check_action(action: str, place: str) -> None:
    if action == "*":
        return
    service, _, name = action.partition(":")
    if service.lower() != "kms" or not name:
        raise _fail(place, f"{action!r} is not a kms: action")
    if "*" in name or "?" in name:
        if not re.fullmatch(r"[A-Za-z*?]+", name):
            raise _fail(place, f"{action!r} is not a valid action pattern")
        return
    if action.lower() not in _KMS_ACTIONS_LOWER:
        raise _fail(place, f"{action!r} matches no AWS KMS operation")


def _parse_operator(operator: str, place: str) -> tuple[str, str | None, bool]:
    set_prefix: str | None = None
    base = operator
    if ":" in operator:
        set_prefix, _, base = operator.partition(":")
        if set_prefix not in SET_PREFIXES:
            raise _fail(place, f"unknown condition operator {operator}")
    if_exists = base.endswith("IfExists")
    if if_exists:
        base = base[: -len("IfExists")]
    if base not in BASE_OPERATORS:
        raise _fail(place, f"unknown condition operator {operator}")
    if base == "Null" and if_exists:
        raise _fail(place, "Null takes no IfExists")
    return base, set_prefix, if_exists


def _check_condition_key(key: str, place: str) -> str:
    lower = key.lower()
    if lower in _CONDITION_KEYS_LOWER:
        return lower
    if lower.startswith(_EC_PREFIX_LOWER) and len(lower) > len(_EC_PREFIX_LOWER):
        return lower
    raise _fail(place, f"unknown condition key {key}")


def _compile_values(base: str, raw: Any, place: str) -> tuple[Any, ...]:
    items = raw if isinstance(raw, list) else [raw]
    if not items:
        raise _fail(place, "needs at least one value")
    values: list[Any] = []
    for item in items:
        if isinstance(item, dict | list) or item is None:
            raise _fail(place, "values must be strings, numbers or booleans")
        text = _as_text(item)
        if "${" in text:
            raise _fail(place, "policy variables (${...}) are not supported")
        if base.startswith("Numeric"):
            number = _as_number(item)
            if number is None:
                raise _fail(place, f"{text!r} is not a number")
            values.append(number)
        elif base in ("Bool", "Null"):
            if text.lower() not in ("true", "false"):
                raise _fail(place, f"{text!r} is not true or false")
            values.append(text.lower() == "true")
        elif base.startswith("Date"):
            moment = _as_date(item)
            if moment is None:
                raise _fail(place, f"{text!r} is not a date (ISO 8601 or epoch seconds)")
            values.append(moment)
        elif base in ("IpAddress", "NotIpAddress"):
            try:
                values.append(ipaddress.ip_network(text, strict=False))
            except ValueError:
                raise _fail(place, f"{text!r} is not an IP address or CIDR block") from None
        elif base.startswith("Arn"):
            parts = text.split(":", 5)
            if len(parts) != 6 or parts[0] not in ("arn", "*"):
                raise _fail(place, f"{text!r} is not an ARN (six parts separated by ':')")
            values.append(tuple(_glob_regex(part, ignore_case=False) for part in parts))
        elif base == "BinaryEquals":
            try:
                values.append(base64.b64decode(text, validate=True))
            except (binascii.Error, ValueError):
                raise _fail(place, f"{text!r} is not base64") from None
        elif base in ("StringLike", "StringNotLike"):
            values.append(_glob_regex(text, ignore_case=False))
        elif base in ("StringEqualsIgnoreCase", "StringNotEqualsIgnoreCase"):
            values.append(text.casefold())
        else:
            values.append(text)
    return tuple(values)


def _parse_conditions(raw: Any, place: str) -> tuple[Condition, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, dict):
        raise _fail(place, "must be an object {operator: {key: value}}")
    conditions: list[Condition] = []
    for operator, block in raw.items():
        operator_place = f"{place}.{operator}"
        base, set_prefix, if_exists = _parse_operator(operator, operator_place)
        if not isinstance(block, dict) or not block:
            raise _fail(operator_place, "must be a non-empty object {key: value}")
        seen: set[str] = set()
        for key, value in block.items():
            lower = _check_condition_key(key, operator_place)
            if lower in seen:
                raise _fail(operator_place, f"condition key {key} appears twice")
            seen.add(lower)
            conditions.append(
                Condition(
                    operator=operator,
                    base=base,
                    set_prefix=set_prefix,
                    if_exists=if_exists,
                    key=lower,
                    values=_compile_values(base, value, f"{operator_place}.{key}"),
                )
            )
    return tuple(conditions)


# --------------------------------------------------------------------------- evaluation
def _as_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


_NUMBER_RE = re.compile(r"-?[0-9]+(\.[0-9]+)?")


def _as_number(value: Any) -> float | None:
    """A policy or request value as a number: an integer or a decimal, as written in
    AWS's examples. NaN, infinities, exponents, spaces and Python's ``1_000`` are not
    numbers (float() would take them)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return float(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, str) and _NUMBER_RE.fullmatch(value):
        return float(value)
    return None


def _as_date(value: Any) -> float | None:
    """A policy or request date as epoch seconds: epoch seconds (a number), or ISO 8601
    text ("2026-12-07", "2026-12-07T10:00:00Z", with an offset); a time without a zone
    is UTC. IAM: "Date condition operators ... compare a context key to a date/time
    value. You can use ISO 8601 date formats or epoch (UNIX) time."""
    number = _as_number(value)
    if number is not None:
        return number
    if not isinstance(value, str) or not value or value[0] not in "0123456789":
        return None
    try:
        moment = datetime.datetime.fromisoformat(value)
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.UTC)
    return moment.timestamp()


def _arn_matches(request_value: Any, patterns: tuple[re.Pattern[str], ...]) -> bool:
    """IAM Arn operators: "Each of the six colon-delimited components of the ARN is
    checked separately and each can include multi-character match wildcards (*) or
    single-character match wildcards (?)" -- ArnEquals and ArnLike alike."""
    parts = _as_text(request_value).split(":", 5)
    if len(parts) != 6:
        return False
    pairs = zip(patterns, parts, strict=True)
    return all(regex.fullmatch(part) is not None for regex, part in pairs)


def _value_matches(base: str, request_value: Any, policy_values: tuple[Any, ...]) -> bool:
    """Does one request value match any policy value under the positive form of base?"""
    if base in ("StringEquals", "StringNotEquals"):
        text = _as_text(request_value)
        return any(text == value for value in policy_values)
    if base in ("StringEqualsIgnoreCase", "StringNotEqualsIgnoreCase"):
        text = _as_text(request_value).casefold()
        return any(text == value for value in policy_values)
    if base in ("StringLike", "StringNotLike"):
        text = _as_text(request_value)
        return any(regex.fullmatch(text) is not None for regex in policy_values)
    if base in ("IpAddress", "NotIpAddress"):
        try:
            address = ipaddress.ip_address(_as_text(request_value))
        except ValueError:
            return False
        return any(address in network for network in policy_values)
    if base == "Bool":
        text = _as_text(request_value).lower()
        if text not in ("true", "false"):
            return False
        return any((text == "true") == value for value in policy_values)
    if base.startswith("Arn"):
        return any(_arn_matches(request_value, patterns) for patterns in policy_values)
    if base == "BinaryEquals":
        if isinstance(request_value, bytes):
            data = request_value
        else:
            try:
                data = base64.b64decode(_as_text(request_value), validate=True)
            except (binascii.Error, ValueError):
                return False
        return any(data == value for value in policy_values)
    if base.startswith("Date"):
        number = _as_date(request_value)
        base = "Numeric" + base[len("Date") :]
    else:
        number = _as_number(request_value)
    if number is None:
        return False
    if base in ("NumericEquals", "NumericNotEquals"):
        return any(number == value for value in policy_values)
    if base == "NumericLessThan":
        return any(number < value for value in policy_values)
    if base == "NumericLessThanEquals":
        return any(number <= value for value in policy_values)
    if base == "NumericGreaterThan":
        return any(number > value for value in policy_values)
    if base == "NumericGreaterThanEquals":
        return any(number >= value for value in policy_values)
    raise AssertionError(base)  # pragma: no cover - parse_policy admits no other


def condition_holds(condition: Condition, context: RequestContext) -> bool:
    """Evaluate one condition (one operator, one key) against the request."""
    request_values = context.values(condition.key)
    if condition.base == "Null":
        absent = not request_values
        return any(absent == value for value in condition.values)
    if not request_values:
        # ForAnyValue is false on a missing key even with IfExists (see module doc).
        if condition.set_prefix == "ForAnyValue":
            return False
        if condition.if_exists or condition.set_prefix == "ForAllValues":
            return True
        return condition.negated
    negated = condition.negated
    base, policy_values = condition.base, condition.values
    if condition.set_prefix == "ForAllValues":
        return all(_value_matches(base, v, policy_values) != negated for v in request_values)
    if condition.set_prefix == "ForAnyValue":
        return any(_value_matches(base, v, policy_values) != negated for v in request_values)
    matched = any(_value_matches(base, v, policy_values) for v in request_values)
    return matched != negated


def _principal_matches(statement: Statement, context: RequestContext) -> bool:
    if statement._principal_any:
        listed = True
    else:
        users = statement._principal_users
        listed = (
            context.principal_arn in users
            or (context.is_root and context.account_id in statement._principal_root_accounts)
            or any(arn in users for arn in context.other_arns)
        )
    return listed != statement.not_principal


def _action_matches(statement: Statement, action: str) -> bool:
    lower = action.lower()
    if statement._action_any or lower in statement._action_set:
        listed = True
    elif lower in _KMS_ACTIONS_LOWER:
        listed = False  # wildcards were expanded against the KMS list at parse time
    else:
        listed = any(regex.fullmatch(lower) for regex in statement._action_regexes)
    return listed != statement.not_action


def _resource_matches(statement: Statement, resource: str) -> bool:
    if statement._resource_any:
        listed = True
    else:
        listed = any(regex.fullmatch(resource) for regex in statement._resource_regexes)
    return listed != statement.not_resource


def statement_applies(statement: Statement, context: RequestContext) -> bool:
    """Does the statement apply to this request (principal, action, resource, conditions)?"""
    return (
        _action_matches(statement, context.action)
        and _principal_matches(statement, context)
        and _resource_matches(statement, context.resource)
        and all(condition_holds(c, context) for c in statement.conditions)
    )


def evaluate(policy: Policy, context: RequestContext, grants_allow: bool = False) -> Decision:
    """Decide a request as AWS does: explicit Deny wins, then any Allow, else implicit deny.

    ``grants_allow`` says a grant on the key allows the request; a Deny in the key
    policy still wins over it ("an explicit deny in any of these policies overrides
    the allow", AWS KMS "Determining access to AWS KMS keys").
    """
    allowing: Statement | None = None
    for statement in policy.statements:
        if not statement_applies(statement, context):
            continue
        if statement.effect == "Deny":
            return Decision(False, "Deny", statement.index, statement.sid)
        if allowing is None:
            allowing = statement
    if allowing is not None:
        return Decision(True, "Allow", allowing.index, allowing.sid)
    if grants_allow:
        return Decision(True, "Allow", by_grant=True)
    return Decision(False, "ImplicitDeny")


def would_lock_out(policy: Policy, context_of_caller: RequestContext) -> bool:
    """AWS's policy lockout safety check: would the caller lose kms:PutKeyPolicy?

    "The key policy must allow the calling principal to make a subsequent
    PutKeyPolicy request on the KMS key" (AWS KMS API reference, PutKeyPolicy,
    BypassPolicyLockoutSafetyCheck). Grants cannot give PutKeyPolicy, so only the
    policy counts.
    """
    decision = evaluate(policy, context_of_caller.with_action("kms:PutKeyPolicy"))
    return not decision.allowed


CREATOR_SID = "Allow the key's creator (kmsfs)"


def default_policy(account_id: str, creator_arn: str) -> str:
    """The policy a key gets when CreateKey names none.

    AWS's default key policy ("Enable IAM User Permissions": the account root may do
    kms:*) plus, because keyd has no IAM through which the root statement could
    reach a user, a statement that lets the creating principal do kms:* as well.
    """
    root = root_arn(account_id)
    statements: list[dict[str, Any]] = [
        {
            "Sid": "Enable IAM User Permissions",
            "Effect": "Allow",
            "Principal": {"AWS": root},
            "Action": "kms:*",
            "Resource": "*",
        }
    ]
    if creator_arn != root:
        statements.append(
            {
                "Sid": CREATOR_SID,
                "Effect": "Allow",
                "Principal": {"AWS": creator_arn},
                "Action": "kms:*",
                "Resource": "*",
            }
        )
    document = {"Version": "2012-10-17", "Id": "key-default-1", "Statement": statements}
    return json.dumps(document, indent=2)


def matching_actions(patterns: Iterable[str]) -> list[str]:
    """The KMS actions an Action list names (wildcards expanded), in list order."""
    regexes = [_glob_regex(p, ignore_case=True) for p in patterns]
    return [a for a in KMS_ACTIONS if any(r.fullmatch(a) for r in regexes)]
