"""Grants on keys (AWS KMS CreateGrant, ListGrants, RetireGrant, RevokeGrant), sans-IO.

A grant lets one principal (the *grantee*) use one key for a list of *grant
operations*, optionally only when the request's encryption context matches the
grant's *constraints*. This module holds everything about grants that needs no
keystore and no socket: validating CreateGrant's Operations, Constraints and Name,
the grant token format, constraint matching, "does a grant allow this request", the
narrower-grant rule for grantees that create grants, and who may retire a grant.
The key service (``kms/service.py``) stores grants (``kms/keystore.py``) and calls
these functions.

Behaviour follows the AWS KMS API reference and developer guide ("Grants in AWS
KMS", "Using grant constraints", "Retiring and revoking grants"); the places where
keyd chooses are marked "kmsfs".
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from kmsfs.errors import InvalidGrantIdException, InvalidGrantTokenException, ValidationException

#: AWS KMS quota "Grants per KMS key: 50,000" (CreateGrant beyond it:
#: LimitExceededException).
MAX_GRANTS_PER_KEY = 50_000

#: The GrantOperation enum of the AWS KMS API reference: the only operations a grant
#: can allow. Key management (CreateKey, PutKeyPolicy, ScheduleKeyDeletion, ListGrants,
#: RevokeGrant, ...) is never grantable.
GRANT_OPERATIONS: frozenset[str] = frozenset(
    {
        "Decrypt",
        "Encrypt",
        "GenerateDataKey",
        "GenerateDataKeyWithoutPlaintext",
        "ReEncryptFrom",
        "ReEncryptTo",
        "Sign",
        "Verify",
        "GetPublicKey",
        "CreateGrant",
        "RetireGrant",
        "DescribeKey",
        "GenerateDataKeyPair",
        "GenerateDataKeyPairWithoutPlaintext",
        "GenerateMac",
        "VerifyMac",
        "DeriveSharedSecret",
    }
)

#: Grant operations that take an encryption context: the only ones grant constraints
#: apply to ("KMS applies the grant constraints only to cryptographic operations that
#: support an encryption context", API reference, GrantConstraints).
CONTEXT_OPERATIONS: frozenset[str] = frozenset(
    {
        "Decrypt",
        "Encrypt",
        "GenerateDataKey",
        "GenerateDataKeyWithoutPlaintext",
        "ReEncryptFrom",
        "ReEncryptTo",
        "GenerateDataKeyPair",
        "GenerateDataKeyPairWithoutPlaintext",
    }
)

#: "Grants with grant constraints can include the DescribeKey and RetireGrant
#: operations, but the constraint doesn't apply to these operations"; CreateGrant is
#: allowed too (the constraint then binds the grants it creates). Other operations
#: (Sign, Verify, GenerateMac, ...) do not take a context: a constrained grant may not
#: list them (CreateGrant's Constraints parameter, API reference).
CONSTRAINABLE_OPERATIONS: frozenset[str] = CONTEXT_OPERATIONS | {
    "DescribeKey",
    "RetireGrant",
    "CreateGrant",
}

#: "Each constraint value can include up to 8 encryption context pairs. The encryption
#: context value in each constraint cannot exceed 384 characters."
MAX_CONSTRAINT_PAIRS = 8
MAX_CONSTRAINT_VALUE_CHARS = 384

#: GrantTokens: "Array Members: Minimum number of 0 items. Maximum number of 10
#: items. Length Constraints: Minimum length of 1. Maximum length of 8192."
MAX_GRANT_TOKENS = 10
MAX_GRANT_TOKEN_CHARS = 8192

#: CreateGrant Name: 1 to 256 characters, pattern ^[a-zA-Z0-9:/_-]+$.
_NAME_RE = re.compile(r"[a-zA-Z0-9:/_-]{1,256}")
#: A grant id: 64 hexadecimal characters, as AWS's.
_GRANT_ID_RE = re.compile(r"[0-9a-f]{64}")

#: Grant token layout (kmsfs; AWS's tokens are opaque base64 strings):
#: version (1 byte) | key id (16-byte UUID) | grant id (32 bytes) | 16 random bytes,
#: base64url without padding. The random tail makes every token distinct (AWS: "the
#: returned grant token is unique with every CreateGrant request"). A token names a
#: grant; it grants nothing by itself: keyd still checks that the caller is the
#: grantee (the caller's identity comes from the socket's peer credentials).
_TOKEN_VERSION = 1
_TOKEN_BYTES = 1 + 16 + 32 + 16

CONSTRAINT_EQUALS = "EncryptionContextEquals"
CONSTRAINT_SUBSET = "EncryptionContextSubset"


def _normalised(context: Mapping[str, str]) -> frozenset[tuple[str, str]]:
    """Constraint pairs compare keys case-insensitively and values case-sensitively
    ("in a grant constraint, the key in each key-value pair is not case sensitive, but
    the value is case sensitive", API reference, GrantConstraints)."""
    return frozenset((name.lower(), value) for name, value in context.items())


@dataclass(frozen=True)
class Constraints:
    """A grant's encryption-context constraints; ``None`` parts are absent.

    An empty map counts as absent (as AWS's IAM Access Analyzer documents for
    KmsGrantConstraints). Both parts may be given; a request must then satisfy both.
    """

    equals: Mapping[str, str] | None = None
    subset: Mapping[str, str] | None = None

    @property
    def empty(self) -> bool:
        return self.equals is None and self.subset is None

    def matches(self, context: Mapping[str, str] | None) -> bool:
        """Whether a request's encryption context satisfies the constraints."""
        pairs = _normalised(context or {})
        if self.equals is not None and pairs != _normalised(self.equals):
            return False
        return self.subset is None or _normalised(self.subset) <= pairs

    def at_least_as_strict_as(self, parent: Constraints) -> bool:
        """Whether every context these constraints accept, *parent* accepts too: AWS's
        rule for a grant created through a grant ("the constraint requires that any
        grants created with the CreateGrant permission have an equally strict or
        stricter encryption context constraint")."""
        if parent.empty:
            return True
        if self.empty:
            return False
        if self.equals is not None:
            # accepts at most one context (none when its Subset part disagrees)
            return parent.matches(self.equals)
        assert self.subset is not None
        # accepts every superset of its subset: only a parent Subset that is
        # contained in ours accepts them all
        if parent.equals is not None:
            return False
        assert parent.subset is not None
        return _normalised(parent.subset) <= _normalised(self.subset)

    def to_json(self) -> dict[str, dict[str, str]] | None:
        """The ``Constraints`` structure of ListGrants' GrantListEntry (None if empty)."""
        result: dict[str, dict[str, str]] = {}
        if self.equals is not None:
            result[CONSTRAINT_EQUALS] = dict(self.equals)
        if self.subset is not None:
            result[CONSTRAINT_SUBSET] = dict(self.subset)
        return result or None

    @classmethod
    def from_json(cls, value: Mapping[str, Any] | None) -> Constraints:
        if not value:
            return cls()
        return cls(value.get(CONSTRAINT_EQUALS), value.get(CONSTRAINT_SUBSET))

    def context_for_policy(self) -> dict[str, str]:
        """The pairs a key policy's kms:EncryptionContext:* conditions see in a
        CreateGrant request (AWS evaluates them against the grant's constraints)."""
        return {**(self.subset or {}), **(self.equals or {})}


@dataclass(frozen=True)
class Grant:
    """One stored grant."""

    grant_id: str
    key_id: str
    name: str
    grantee: str
    retiring: str | None
    operations: tuple[str, ...]
    constraints: Constraints
    creation_date: float
    issuing_account: str  # the account root ARN, as ListGrants shows it
    token: str = field(repr=False, compare=False, default="")

    def allows(self, operation: str, context: Mapping[str, str] | None) -> bool:
        """Whether this grant allows *operation* (a grant operation name) with this
        encryption context; constraints apply only to operations that take one."""
        if operation not in self.operations:
            return False
        if operation in CONTEXT_OPERATIONS:
            return self.constraints.matches(context)
        return True

    def may_create(self, new: Grant) -> bool:
        """AWS's rule for a grantee whose grant includes CreateGrant: the new grant's
        operations are a subset of this grant's, and its constraints at least as
        strict."""
        return (
            "CreateGrant" in self.operations
            and set(new.operations) <= set(self.operations)
            and new.constraints.at_least_as_strict_as(self.constraints)
        )

    def same_request(self, other: Grant) -> bool:
        """CreateGrant with a Name: a retry "with identical parameters" returns the
        existing grant (API reference, CreateGrant, Name)."""
        return (
            self.key_id == other.key_id
            and self.name == other.name
            and self.grantee == other.grantee
            and self.retiring == other.retiring
            and sorted(self.operations) == sorted(other.operations)
            and self.constraints.to_json() == other.constraints.to_json()
        )

    def list_entry(self, key_arn: str) -> dict[str, Any]:
        """ListGrants' GrantListEntry."""
        entry: dict[str, Any] = {
            "KeyId": key_arn,
            "GrantId": self.grant_id,
            "Name": self.name,
            "CreationDate": self.creation_date,
            "GranteePrincipal": self.grantee,
            "IssuingAccount": self.issuing_account,
            "Operations": list(self.operations),
        }
        if self.retiring is not None:
            entry["RetiringPrincipal"] = self.retiring
        constraints = self.constraints.to_json()
        if constraints is not None:
            entry["Constraints"] = constraints
        return entry

    def operations_json(self) -> str:
        return json.dumps(list(self.operations))

    def constraints_json(self) -> str | None:
        constraints = self.constraints.to_json()
        return None if constraints is None else json.dumps(constraints, sort_keys=True)


# ----------------------------------------------------------------- validation
def parse_operations(value: Any) -> tuple[str, ...]:
    """CreateGrant's Operations: a non-empty list of GrantOperation names; duplicates
    are dropped, the order kept. Anything else is ValidationException."""
    if not isinstance(value, list) or not value:
        raise ValidationException("1 validation error detected: Operations is required")
    operations: list[str] = []
    for item in value:
        if item not in GRANT_OPERATIONS:
            raise ValidationException(
                f"1 validation error detected: Value '{item}' at 'operations' failed to "
                "satisfy constraint: Member must satisfy enum value set: "
                f"[{', '.join(sorted(GRANT_OPERATIONS))}]"
            )
        if item not in operations:
            operations.append(item)
    return tuple(operations)


def _constraint_map(value: Any, name: str) -> dict[str, str] | None:
    if value is None:
        return None
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise ValidationException(f"Constraints.{name} must map strings to strings")
    if not value:
        return None
    if len(value) > MAX_CONSTRAINT_PAIRS:
        raise ValidationException(
            f"Constraints.{name} can have at most {MAX_CONSTRAINT_PAIRS} pairs"
        )
    for key, item in value.items():
        if not key:
            raise ValidationException(f"Constraints.{name} keys must not be empty")
        if len(item) > MAX_CONSTRAINT_VALUE_CHARS:
            raise ValidationException(
                f"Constraints.{name} values can have at most {MAX_CONSTRAINT_VALUE_CHARS} "
                "characters"
            )
    return dict(value)


def parse_constraints(value: Any, operations: Iterable[str]) -> Constraints:
    """CreateGrant's Constraints (GrantConstraints), checked against the operations."""
    if value is None:
        return Constraints()
    if not isinstance(value, dict):
        raise ValidationException("Constraints must be a GrantConstraints structure")
    constraints = Constraints(
        _constraint_map(value.get(CONSTRAINT_EQUALS), CONSTRAINT_EQUALS),
        _constraint_map(value.get(CONSTRAINT_SUBSET), CONSTRAINT_SUBSET),
    )
    if not constraints.empty:
        unconstrainable = sorted(set(operations) - CONSTRAINABLE_OPERATIONS)
        if unconstrainable:
            raise ValidationException(
                "Grant constraints (encryption context) apply only to operations that "
                "take an encryption context (and DescribeKey, RetireGrant, CreateGrant); "
                f"not to {', '.join(unconstrainable)}"
            )
    return constraints


def parse_name(value: Any) -> str:
    """CreateGrant's optional Name ("" when absent, as AWS lists unnamed grants)."""
    if value is None:
        return ""
    if not isinstance(value, str) or not _NAME_RE.fullmatch(value):
        raise ValidationException(
            "1 validation error detected: Value at 'name' failed to satisfy constraint: "
            "Member must have length between 1 and 256 and satisfy regular expression "
            "pattern: ^[a-zA-Z0-9:/_-]+$"
        )
    return value


def check_principal(value: Any, member: str, account: str) -> str:
    """GranteePrincipal / RetiringPrincipal: an ARN of this account's root or of one of
    its users (``arn:aws:iam::<account>:user/<login name or uid-N>``), the principals
    keyd knows. (AWS also takes roles, other accounts and service principals; keyd has
    none of those.)"""
    if not isinstance(value, str) or not 1 <= len(value) <= 256:
        raise ValidationException(
            f"1 validation error detected: Value at '{member[:1].lower() + member[1:]}' "
            "failed to satisfy constraint: Member must have length between 1 and 256"
        )
    if not re.fullmatch(
        rf"arn:aws:iam::{re.escape(account)}:(root|user/[A-Za-z0-9_+=,.@-]{{1,64}})", value
    ):
        raise ValidationException(
            f"{member} {value!r} is not a principal of account {account}: use "
            f"arn:aws:iam::{account}:user/NAME or arn:aws:iam::{account}:root"
        )
    return value


def check_grant_id(value: Any) -> str:
    """A GrantId parameter: 64 hexadecimal characters, else InvalidGrantIdException."""
    if not isinstance(value, str) or not _GRANT_ID_RE.fullmatch(value):
        raise InvalidGrantIdException("The grant ID is not valid.")
    return value


def new_grant_id() -> str:
    return os.urandom(32).hex()


# --------------------------------------------------------------------- tokens
@dataclass(frozen=True)
class GrantToken:
    """What a grant token names: a key and one of its grants."""

    key_id: str
    grant_id: str


def make_token(key_id: str, grant_id: str) -> str:
    raw = (
        bytes([_TOKEN_VERSION]) + uuid.UUID(key_id).bytes + bytes.fromhex(grant_id) + os.urandom(16)
    )
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def read_token(token: Any) -> GrantToken:
    """Decode a grant token; anything keyd did not issue is InvalidGrantTokenException
    (AWS: "The request was rejected because the specified grant token is not valid")."""
    if not isinstance(token, str) or not 1 <= len(token) <= MAX_GRANT_TOKEN_CHARS:
        raise InvalidGrantTokenException("The grant token is not valid.")
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    except (binascii.Error, ValueError):
        raise InvalidGrantTokenException("The grant token is not valid.") from None
    if len(raw) != _TOKEN_BYTES or raw[0] != _TOKEN_VERSION:
        raise InvalidGrantTokenException("The grant token is not valid.")
    return GrantToken(str(uuid.UUID(bytes=raw[1:17])), raw[17:49].hex())


def read_tokens(value: Any) -> tuple[GrantToken, ...]:
    """A request's GrantTokens: at most 10 tokens keyd issued."""
    if value is None:
        return ()
    if not isinstance(value, list) or len(value) > MAX_GRANT_TOKENS:
        raise InvalidGrantTokenException(
            f"GrantTokens must be a list of at most {MAX_GRANT_TOKENS} grant tokens"
        )
    return tuple(read_token(token) for token in value)


# -------------------------------------------------------------- authorisation
def allowing_grant(
    grants: Iterable[Grant],
    operation: str,
    context: Mapping[str, str] | None,
    new_grant: Grant | None = None,
) -> Grant | None:
    """The first of the caller's grants (*grants*: those whose grantee is the caller)
    that allows the request, or None. For CreateGrant, *new_grant* is the grant asked
    for, and the allowing grant must also pass :meth:`Grant.may_create`."""
    for grant in grants:
        if not grant.allows(operation, context):
            continue
        if operation == "CreateGrant" and (new_grant is None or not grant.may_create(new_grant)):
            continue
        return grant
    return None


def may_retire(grant: Grant, caller_arns: Iterable[str], account_root_arn: str) -> bool:
    """RetireGrant's rule ("Retiring and revoking grants"): the grant's retiring
    principal, its grantee if the grant includes RetireGrant, or the account in which
    the grant was created (here: the account root, uid 0)."""
    arns = set(caller_arns)
    if account_root_arn in arns:
        return True
    if grant.retiring is not None and grant.retiring in arns:
        return True
    return grant.grantee in arns and "RetireGrant" in grant.operations
