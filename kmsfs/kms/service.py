"""The key service: AWS KMS operations over a keystore, with no I/O of its own.

``KeyService.handle(operation, params, caller, request_id)`` takes an operation name
(``"Encrypt"``) and its decoded JSON parameters (binary fields still base64, as on
the wire) and returns the JSON-able response, or raises a :class:`~kmsfs.errors.KMSError`
with AWS's error type. Every call, allowed or refused, is written to the audit log.
The HTTP server (``kms/server.py``) is a thin shell around this.

Names, parameters, limits, key states and error types follow the AWS KMS API
reference, so AWS's clients and documentation apply.

Ciphertext blobs (Encrypt, GenerateDataKey, ReEncrypt) are::

    0      1 byte   blob version (1)
    1     16 bytes  key id (UUID bytes)
    17     4 bytes  key version (big-endian), the CMK version that sealed it
    21    12 bytes  random nonce
    33     n bytes  AES-256-GCM ciphertext, then its 16-byte tag

and the GCM associated data is the first 21 bytes followed by the encryption
context encoded without ambiguity (see :func:`encode_encryption_context`).
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import datetime as dt
import json
import logging
import os
import re
import sqlite3
import struct
import time
import uuid
from collections.abc import Callable
from typing import Any, Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from kmsfs.errors import (
    AccessDeniedException,
    AlreadyExistsException,
    AuditError,
    DisabledException,
    DryRunOperationException,
    IncorrectKeyException,
    InvalidAliasNameException,
    InvalidCiphertextException,
    InvalidGrantTokenException,
    InvalidMarkerException,
    KMSError,
    KMSInternalException,
    KMSInvalidMacException,
    KMSInvalidSignatureException,
    KMSInvalidStateException,
    LimitExceededException,
    MalformedPolicyDocumentException,
    NotFoundException,
    SerializationException,
    StorageUnavailableException,
    TagException,
    UnknownOperationException,
    UnsupportedOperationException,
    ValidationException,
)
from kmsfs.kms import asymmetric, grants
from kmsfs.kms.access_events import (
    ACCESS_EVENT_OPERATIONS,
    ACCESS_EVENT_REQUEST_MEMBERS,
    AccessEvents,
)
from kmsfs.kms.admin import ADMIN_OPERATIONS, ADMIN_REQUEST_MEMBERS, KeystoreAdmin
from kmsfs.kms.audit import EncodedEvent
from kmsfs.kms.byok import BYOK_REQUEST_MEMBERS, BYOK_STATE_CHANGING, ImportedMaterial
from kmsfs.kms.caller import FORWARDED_CALLER_HEADER, Caller, ForwardedCaller
from kmsfs.kms.grants import Grant, GrantToken
from kmsfs.kms.keystore import KeyRecord, Keystore
from kmsfs.kms.policy import (
    ENCRYPTION_CONTEXT_PREFIX,
    Policy,
    RequestContext,
    default_policy,
    evaluate,
    parse_policy,
    root_arn,
    would_lock_out,
)
from kmsfs.kms.principal import AccountAccess, Principal, PrincipalResolver, login_name
from kmsfs.kms.protocol import random_uuid

log = logging.getLogger("kmsfs.keyd")

DAY = 86400.0
BLOB_VERSION = 1
_BLOB_HEAD = struct.Struct(">B16sI")
BLOB_HEADER_LEN = _BLOB_HEAD.size + 12  # + nonce
TAG_LEN = 16

MAX_PLAINTEXT = 4096
MAX_CIPHERTEXT = 6144
MAX_DATA_KEY_BYTES = 1024
MAX_TAGS = 50

_UUID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_ALIAS_RE = re.compile(r"alias/[a-zA-Z0-9/_-]+")
_ARN_RE = re.compile(r"arn:aws:kms:([^:]+):([^:]+):(key|alias)/(.+)")
MAX_CONTEXT_BYTES = 8192

# AWS key specs: symmetric, RSA, ECC and HMAC keys (kms/asymmetric.py); SM2 (China
# Regions only) and ML-DSA are known names, refused as unsupported.
_SUPPORTED_KEY_SPECS = set(asymmetric.KEY_SPEC_USAGES)
_KNOWN_KEY_SPECS = _SUPPORTED_KEY_SPECS | {
    "RSA_2048",
    "RSA_3072",
    "RSA_4096",
    "ECC_NIST_P256",
    "ECC_NIST_P384",
    "ECC_NIST_P521",
    "ECC_SECG_P256K1",
    "HMAC_224",
    "HMAC_256",
    "HMAC_384",
    "HMAC_512",
    "SM2",
    "ML_DSA_44",
    "ML_DSA_65",
    "ML_DSA_87",
}
_KEY_USAGES = {"ENCRYPT_DECRYPT", "SIGN_VERIFY", "GENERATE_VERIFY_MAC", "KEY_AGREEMENT"}
_ORIGINS = {"AWS_KMS", "EXTERNAL", "AWS_CLOUDHSM", "EXTERNAL_KEY_STORE"}
_ENCRYPTION_ALGORITHMS = set(asymmetric.ENCRYPTION_ALGORITHMS)
_DATA_KEY_SPECS = {"AES_256": 32, "AES_128": 16}

# Parameters that may appear in audit events. Everything else (Plaintext,
# CiphertextBlob, Policy, unknown fields) is left out: the audit log never holds
# secrets, and a whitelist cannot leak a field it does not know.
_AUDITED_FIELDS = {
    "KeyId",
    "FilesystemId",
    "EncryptionContext",
    "KeySpec",
    "NumberOfBytes",
    "KeyUsage",
    "Description",
    "AliasName",
    "TargetKeyId",
    "PendingWindowInDays",
    "RotationPeriodInDays",
    "EncryptionAlgorithm",
    "SourceKeyId",
    "DestinationKeyId",
    "SourceEncryptionContext",
    "DestinationEncryptionContext",
    "SourceEncryptionAlgorithm",
    "DestinationEncryptionAlgorithm",
    "Limit",
    "Marker",
    "TagKeys",
    "Origin",
    "MultiRegion",
    "KeyMetadata",
    "DeletionDate",
    "KeyState",
    "KeyRotationEnabled",
    "NextRotationDate",
    "DryRun",
    "PolicyName",
    "PolicyNames",
    "Destination",
    "DatabaseSha256",
    "ProtectionKind",
    "PreviousProtectionKind",
    "ResealedRecords",
    "WrappingAlgorithm",
    "WrappingKeySpec",
    "ParametersValidTo",
    "ExpirationModel",
    "ValidTo",
    "BypassPolicyLockoutSafetyCheck",
    # asymmetric and HMAC keys: names of algorithms and outcomes only. Never Message,
    # Signature, Mac, PublicKey, SharedSecret or any PrivateKey* member.
    "SigningAlgorithm",
    "MessageType",
    "MacAlgorithm",
    "KeyAgreementAlgorithm",
    "KeyPairSpec",
    "SignatureValid",
    "MacValid",
    # grants: never GrantToken(s) (see _op_CreateGrant)
    "GranteePrincipal",
    "RetiringPrincipal",
    "Operations",
    "Constraints",
    "Name",
    "GrantId",
}

# ------------------------------------------------------------ request members
# The members of every operation and their JSON types, from the AWS KMS API reference.
# Kinds: "string", "integer", "boolean", "blob" (a base64 string), "context" (a map of
# strings to strings), "strings" (a list of strings), "tags" (a list of {TagKey,
# TagValue} strings), "recipient" (the Nitro Enclaves structure, refused later).
#
# A member of the wrong JSON type is refused with 400 SerializationException before
# the operation runs, as AWS's JSON 1.1 services answer a value they cannot
# deserialize into the member's type ("STRING_VALUE can not be converted to an
# Integer", "Start of structure or map found where not expected"). Range, length,
# pattern and enum problems stay ValidationException (as AWS's constraint checks are).
# JSON null counts as absent, as in AWS.
#
# Unknown members are ignored, as AWS's services do (forward compatibility: an SDK
# newer than the service may send members the service does not know). They never
# reach the operation or the audit log, and their strings are still checked for lone
# surrogates (see _check_text), like every string in the request.
_STRING, _INTEGER, _BOOLEAN, _BLOB = "string", "integer", "boolean", "blob"
_CONTEXT, _STRINGS, _TAGS, _RECIPIENT = "context", "strings", "tags", "recipient"
_NUMBER = "number"
_CONSTRAINTS = "constraints"
#: an object, and a list of objects, whose members the operation checks itself
_STRUCTURE, _STRUCTURES = "structure", "structures"
_CRYPTO_COMMON = {"GrantTokens": _STRINGS, "DryRun": _BOOLEAN}
_PAGING = {"Limit": _INTEGER, "Marker": _STRING}
REQUEST_MEMBERS: dict[str, dict[str, str]] = {
    "CreateKey": {
        "Description": _STRING,
        "KeySpec": _STRING,
        "CustomerMasterKeySpec": _STRING,
        "KeyUsage": _STRING,
        "Origin": _STRING,
        "MultiRegion": _BOOLEAN,
        "Policy": _STRING,
        "Tags": _TAGS,
        "BypassPolicyLockoutSafetyCheck": _BOOLEAN,
        "CustomKeyStoreId": _STRING,
        "XksKeyId": _STRING,
        "DryRun": _BOOLEAN,
    },
    "DescribeKey": {"KeyId": _STRING, "GrantTokens": _STRINGS},
    "ListKeys": {**_PAGING},
    "EnableKey": {"KeyId": _STRING},
    "DisableKey": {"KeyId": _STRING},
    "ScheduleKeyDeletion": {"KeyId": _STRING, "PendingWindowInDays": _INTEGER},
    "CancelKeyDeletion": {"KeyId": _STRING},
    "EnableKeyRotation": {"KeyId": _STRING, "RotationPeriodInDays": _INTEGER},
    "DisableKeyRotation": {"KeyId": _STRING},
    "GetKeyRotationStatus": {"KeyId": _STRING},
    "RotateKeyOnDemand": {"KeyId": _STRING},
    "ListKeyRotations": {"KeyId": _STRING, **_PAGING},
    "Encrypt": {
        "KeyId": _STRING,
        "Plaintext": _BLOB,
        "EncryptionContext": _CONTEXT,
        "EncryptionAlgorithm": _STRING,
        **_CRYPTO_COMMON,
    },
    "Decrypt": {
        "CiphertextBlob": _BLOB,
        "EncryptionContext": _CONTEXT,
        "KeyId": _STRING,
        "EncryptionAlgorithm": _STRING,
        "Recipient": _RECIPIENT,
        **_CRYPTO_COMMON,
    },
    "ReEncrypt": {
        "CiphertextBlob": _BLOB,
        "SourceEncryptionContext": _CONTEXT,
        "SourceKeyId": _STRING,
        "DestinationKeyId": _STRING,
        "DestinationEncryptionContext": _CONTEXT,
        "SourceEncryptionAlgorithm": _STRING,
        "DestinationEncryptionAlgorithm": _STRING,
        **_CRYPTO_COMMON,
    },
    "GenerateDataKey": {
        "KeyId": _STRING,
        "EncryptionContext": _CONTEXT,
        "NumberOfBytes": _INTEGER,
        "KeySpec": _STRING,
        "Recipient": _RECIPIENT,
        **_CRYPTO_COMMON,
    },
    "GenerateDataKeyWithoutPlaintext": {
        "KeyId": _STRING,
        "EncryptionContext": _CONTEXT,
        "NumberOfBytes": _INTEGER,
        "KeySpec": _STRING,
        "Recipient": _RECIPIENT,
        **_CRYPTO_COMMON,
    },
    "GenerateRandom": {
        "NumberOfBytes": _INTEGER,
        "CustomKeyStoreId": _STRING,
        "Recipient": _RECIPIENT,
    },
    "CreateAlias": {"AliasName": _STRING, "TargetKeyId": _STRING},
    "UpdateAlias": {"AliasName": _STRING, "TargetKeyId": _STRING},
    "DeleteAlias": {"AliasName": _STRING},
    "ListAliases": {"KeyId": _STRING, **_PAGING},
    "TagResource": {"KeyId": _STRING, "Tags": _TAGS},
    "UntagResource": {"KeyId": _STRING, "TagKeys": _STRINGS},
    "ListResourceTags": {"KeyId": _STRING, **_PAGING},
    "GetCallerIdentity": {},
    "PutKeyPolicy": {
        "KeyId": _STRING,
        "PolicyName": _STRING,
        "Policy": _STRING,
        "BypassPolicyLockoutSafetyCheck": _BOOLEAN,
    },
    "GetKeyPolicy": {"KeyId": _STRING, "PolicyName": _STRING},
    "ListKeyPolicies": {"KeyId": _STRING, **_PAGING},
    "GetPublicKey": {"KeyId": _STRING, "GrantTokens": _STRINGS},
    "Sign": {
        "KeyId": _STRING,
        "Message": _BLOB,
        "MessageType": _STRING,
        "SigningAlgorithm": _STRING,
        **_CRYPTO_COMMON,
    },
    "Verify": {
        "KeyId": _STRING,
        "Message": _BLOB,
        "MessageType": _STRING,
        "Signature": _BLOB,
        "SigningAlgorithm": _STRING,
        **_CRYPTO_COMMON,
    },
    "GenerateMac": {
        "KeyId": _STRING,
        "Message": _BLOB,
        "MacAlgorithm": _STRING,
        **_CRYPTO_COMMON,
    },
    "VerifyMac": {
        "KeyId": _STRING,
        "Message": _BLOB,
        "Mac": _BLOB,
        "MacAlgorithm": _STRING,
        **_CRYPTO_COMMON,
    },
    "GenerateDataKeyPair": {
        "KeyId": _STRING,
        "KeyPairSpec": _STRING,
        "EncryptionContext": _CONTEXT,
        "Recipient": _RECIPIENT,
        **_CRYPTO_COMMON,
    },
    "GenerateDataKeyPairWithoutPlaintext": {
        "KeyId": _STRING,
        "KeyPairSpec": _STRING,
        "EncryptionContext": _CONTEXT,
        **_CRYPTO_COMMON,
    },
    "DeriveSharedSecret": {
        "KeyId": _STRING,
        "KeyAgreementAlgorithm": _STRING,
        "PublicKey": _BLOB,
        "Recipient": _RECIPIENT,
        **_CRYPTO_COMMON,
    },
    "CreateGrant": {
        "KeyId": _STRING,
        "GranteePrincipal": _STRING,
        "RetiringPrincipal": _STRING,
        "Operations": _STRINGS,
        "Constraints": _CONSTRAINTS,
        "Name": _STRING,
        **_CRYPTO_COMMON,
    },
    "ListGrants": {"KeyId": _STRING, "GrantId": _STRING, "GranteePrincipal": _STRING, **_PAGING},
    "ListRetirableGrants": {"RetiringPrincipal": _STRING, **_PAGING},
    "RetireGrant": {
        "GrantToken": _STRING,
        "KeyId": _STRING,
        "GrantId": _STRING,
        "DryRun": _BOOLEAN,
    },
    "RevokeGrant": {"KeyId": _STRING, "GrantId": _STRING, "DryRun": _BOOLEAN},
    **ADMIN_REQUEST_MEMBERS,
    **BYOK_REQUEST_MEMBERS,
    **ACCESS_EVENT_REQUEST_MEMBERS,
}

# What an operation does, which decides what happens when its audit record cannot be
# written (a full disk, an I/O error):
# - a state change runs in one keystore transaction that commits only after its audit
#   record was written and flushed to disk; without the record it is rolled back and
#   refused (AuditUnavailableException, 503).
# - key use (anything that opens or seals with a CMK's material) is refused the same
#   way: its answer is dropped, never sent unaudited.
# - everything else (Describe*, List*, Get*, GenerateRandom, and every refused request)
#   changes nothing and uses no key: it is answered even if its record cannot be
#   written, and keyd writes an "AuditGap" record counting such requests as soon as the
#   log accepts records again. (CloudTrail logs these read events too, but AWS does not
#   refuse them when delivery fails; refusing them would make a full disk take down
#   every mount's DescribeKey at start-up for no safety gain.)
STATE_CHANGING_OPERATIONS = frozenset(
    {
        "CreateKey",
        "EnableKey",
        "DisableKey",
        "ScheduleKeyDeletion",
        "CancelKeyDeletion",
        "EnableKeyRotation",
        "DisableKeyRotation",
        "RotateKeyOnDemand",
        "CreateAlias",
        "UpdateAlias",
        "DeleteAlias",
        "TagResource",
        "UntagResource",
        "PutKeyPolicy",
        "CreateGrant",
        "RetireGrant",
        "RevokeGrant",
        *ADMIN_OPERATIONS,
        *BYOK_STATE_CHANGING,
    }
)
KEY_USE_OPERATIONS = frozenset(
    {
        "Encrypt",
        "Decrypt",
        "ReEncrypt",
        "GenerateDataKey",
        "GenerateDataKeyWithoutPlaintext",
        "GenerateDataKeyPair",
        "GenerateDataKeyPairWithoutPlaintext",
        "Sign",
        "Verify",
        "GenerateMac",
        "VerifyMac",
        "DeriveSharedSecret",
    }
)

#: Operations whose preparation (:meth:`KeyService.slow_work`) may take long enough to
#: stall an event loop: generating an RSA key pair.
SLOW_OPERATIONS = frozenset(
    {"CreateKey", "GenerateDataKeyPair", "GenerateDataKeyPairWithoutPlaintext"}
)
_JSON_TYPE_NAMES = {
    str: "STRING_VALUE",
    int: "NUMBER_VALUE",
    float: "NUMBER_VALUE",
    bool: "BOOLEAN_VALUE",
    list: "START_ARRAY",
    dict: "START_OBJECT",
}
_KIND_NAMES = {
    _STRING: "a String",
    _INTEGER: "an Integer",
    _BOOLEAN: "a Boolean",
    _BLOB: "a Blob (base64 String)",
    _CONTEXT: "a Map of Strings",
    _STRINGS: "a List of Strings",
    _TAGS: "a List of Tags",
    _RECIPIENT: "a RecipientInfo structure",
    _NUMBER: "a Timestamp",
    _CONSTRAINTS: "a GrantConstraints structure",
    _STRUCTURE: "a structure",
    _STRUCTURES: "a List of structures",
}


def _wrong_type(path: str, value: object, kind: str) -> SerializationException:
    found = _JSON_TYPE_NAMES.get(type(value), type(value).__name__)
    return SerializationException(
        f"{found} at '{path}' can not be converted to {_KIND_NAMES[kind]}"
    )


def _is_string_map(value: object) -> bool:
    return type(value) is dict and all(type(item) is str for item in value.values())


def _check_member(path: str, value: object, kind: str) -> None:
    """Raise SerializationException unless ``value`` has the JSON type of ``kind``."""
    ok: bool
    if kind in (_STRING, _BLOB):
        ok = type(value) is str
    elif kind == _INTEGER:
        ok = type(value) is int  # not bool, not float (1.0 is not an Integer)
    elif kind == _BOOLEAN:
        ok = type(value) is bool
    elif kind == _CONTEXT:
        ok = _is_string_map(value)
    elif kind == _STRINGS:
        ok = type(value) is list and all(type(item) is str for item in value)
    elif kind == _TAGS:
        ok = type(value) is list and all(
            type(tag) is dict
            and all(type(tag.get(name)) in (str, type(None)) for name in ("TagKey", "TagValue"))
            for tag in value
        )
    elif kind in (_RECIPIENT, _STRUCTURE):
        ok = type(value) is dict
    elif kind == _STRUCTURES:
        ok = type(value) is list and all(type(item) is dict for item in value)
    elif kind == _NUMBER:
        ok = type(value) in (int, float)  # a timestamp (epoch seconds)
    elif kind == _CONSTRAINTS:
        ok = type(value) is dict and all(
            item is None or _is_string_map(item) for item in value.values()
        )
    else:  # pragma: no cover - a typo in REQUEST_MEMBERS
        raise AssertionError(f"unknown member kind {kind!r}")
    if not ok:
        raise _wrong_type(path, value, kind)


def _check_text(params: dict[str, Any]) -> None:
    """Refuse a lone surrogate in any string (member name or value) of the request.

    JSON's "\\ud800" escape decodes to a string that no UTF-8 encoder (SQLite, the
    audit log's readers) accepts. AWS answers ValidationException for text that is
    not valid Unicode. Iterative: the parser allows deeper nesting than recursion here
    would survive.
    """
    try:
        # fast path (a RecordAccessEvents call holds thousands of strings): a request
        # that encodes to UTF-8 whole has no lone surrogate; else find it below
        _UTF8_CHECKER.encode(params).encode()
        return
    except (UnicodeEncodeError, TypeError, ValueError, RecursionError):
        pass
    pending: list[tuple[str, object]] = [(name, value) for name, value in params.items()]
    for name in params:
        _require_utf8(name, "a member name")
    while pending:
        member, value = pending.pop()
        if type(value) is str:
            _require_utf8(value, member)
        elif type(value) is dict:
            for key, item in value.items():
                _require_utf8(key, member)
                pending.append((member, item))
        elif type(value) is list:
            pending.extend((member, item) for item in value)


_UTF8_CHECKER = json.JSONEncoder(ensure_ascii=False, check_circular=False)


def check_request(operation: str, params: dict[str, Any]) -> None:
    """Check every member's JSON type, and every string's text, before anything runs."""
    _check_text(params)
    members = REQUEST_MEMBERS.get(operation, {})
    for name, kind in members.items():
        value = params.get(name)
        if value is not None:
            _check_member(_camel(name), value, kind)


class AuditSink(Protocol):
    def append(self, event: dict[str, Any]) -> None: ...


def encode_encryption_context(context: dict[str, str]) -> bytes:
    """Serialise an encryption context without ambiguity, independent of key order.

    Pairs are sorted by the UTF-8 bytes of their keys; the count and every key and
    value are length-prefixed (as the AWS Encryption SDK does), so ``{"ab": "c"}``
    and ``{"a": "bc"}`` encode differently.
    """
    if not context:
        return b""
    items = sorted((key.encode(), value.encode()) for key, value in context.items())
    parts = [struct.pack(">H", len(items))]
    for key, value in items:
        parts += [struct.pack(">H", len(key)), key, struct.pack(">H", len(value)), value]
    return b"".join(parts)


def _iso(timestamp: float) -> str:
    second = int(timestamp // 1)
    cached = _ISO_CACHE.get(second)
    if cached is None:
        when = dt.datetime.fromtimestamp(second, dt.UTC)
        cached = when.strftime("%Y-%m-%dT%H:%M:%SZ")
        if len(_ISO_CACHE) >= 64:
            _ISO_CACHE.clear()
        _ISO_CACHE[second] = cached
    return cached


#: _iso's recent answers: every audit record formats the current second again
_ISO_CACHE: dict[int, str] = {}


def _camel(name: str) -> str:
    camel = _CAMEL_CACHE.get(name)
    if camel is None:
        camel = name[:1].lower() + name[1:]
        if len(_CAMEL_CACHE) < 4096:  # member names: a fixed set, but never unbounded
            _CAMEL_CACHE[name] = camel
    return camel


_CAMEL_CACHE: dict[str, str] = {}


def _key_id_bytes(key_id: str) -> bytes:
    """``uuid.UUID(key_id).bytes`` for a key id as keyd makes them (canonical form)."""
    raw = bytes.fromhex(key_id.replace("-", ""))
    if len(raw) != 16:
        raise ValueError(f"not a key id: {key_id!r}")
    return raw


# ------------------------------------------------------------ parameter parsing
def _field(params: dict[str, Any], name: str, kind: type | tuple[type, ...], required: bool):
    value = params.get(name)
    if value is None:
        if required:
            raise ValidationException(f"1 validation error detected: {name} is required")
        return None
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise ValidationException(f"1 validation error detected: {name} has the wrong type")
    return value


def _string(
    params: dict[str, Any],
    name: str,
    *,
    required: bool = False,
    min_len: int = 1,
    max_len: int = 2048,
    choices: set[str] | None = None,
) -> str | None:
    value = _field(params, name, str, required)
    if value is None:
        return None
    _require_utf8(value, name)
    if not min_len <= len(value) <= max_len:
        raise ValidationException(
            f"1 validation error detected: Value at '{_camel(name)}' failed to satisfy "
            f"constraint: Member must have length between {min_len} and {max_len}"
        )
    if choices is not None and value not in choices:
        raise ValidationException(
            f"1 validation error detected: Value '{value}' at '{_camel(name)}' failed to "
            f"satisfy constraint: Member must satisfy enum value set: {sorted(choices)}"
        )
    return value


def _integer(
    params: dict[str, Any], name: str, low: int, high: int, *, required: bool = False
) -> int | None:
    value = _field(params, name, int, required)
    if value is None:
        return None
    if not low <= value <= high:
        raise ValidationException(
            f"1 validation error detected: Value '{value}' at '{_camel(name)}' failed to "
            f"satisfy constraint: Member must have value between {low} and {high}"
        )
    return value


def _binary(
    params: dict[str, Any], name: str, max_len: int, *, required: bool = True
) -> bytes | None:
    value = _field(params, name, str, required)
    if value is None:
        return None
    try:
        data = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ValidationException(f"{name} is not valid base64") from None
    if not 1 <= len(data) <= max_len:
        raise ValidationException(
            f"1 validation error detected: Value at '{_camel(name)}' failed to satisfy "
            f"constraint: Member must have length between 1 and {max_len}"
        )
    return data


def _require_utf8(value: str, name: str) -> int:
    """The UTF-8 length of a string; a lone surrogate (from JSON "\\ud800") is refused."""
    try:
        return len(value.encode())
    except UnicodeEncodeError:
        raise ValidationException(f"{name} is not valid Unicode text") from None


def _context(params: dict[str, Any], name: str) -> dict[str, str]:
    value = _field(params, name, dict, False)
    if value is None:
        return {}
    total = 0
    for key, item in value.items():
        if not isinstance(item, str) or not key:
            raise ValidationException(f"{name} must map non-empty strings to strings")
        total += _require_utf8(key, name) + _require_utf8(item, name)
    if total > MAX_CONTEXT_BYTES:
        raise ValidationException(f"{name} is larger than {MAX_CONTEXT_BYTES} bytes")
    return value


def _alias_named(value: Any) -> str | None:
    """kms:RequestAlias: the alias name a KeyId-like parameter used, if it used one."""
    if not isinstance(value, str):
        return None
    if value.startswith("alias/"):
        return value
    match = _ARN_RE.fullmatch(value)
    if match and match.group(3) == "alias":
        return "alias/" + match.group(4)
    return None


def _dry_run(params: dict[str, Any]) -> None:
    if _field(params, "DryRun", bool, False):
        raise DryRunOperationException(
            "The request would have succeeded, but the DryRun flag is set."
        )


class KeyService(KeystoreAdmin, ImportedMaterial, AccessEvents):
    """AWS KMS operations on one keystore (and kmsfs's keystore operations, see
    kmsfs.kms.admin). Not thread-safe: call from one thread."""

    #: operations that may have slow work to run off the event loop (see slow_work)
    slow_operations = SLOW_OPERATIONS

    def __init__(
        self,
        keystore: Keystore,
        audit: AuditSink | None = None,
        *,
        clock: Callable[[], float] = time.time,
        principals: Callable[[Caller], Principal] | None = None,
        owner_uid: int | None = None,
        account_access: AccountAccess | None = None,
        forwarders: AccountAccess | None = None,
    ) -> None:
        self.keystore = keystore
        self.audit = audit
        self.clock = clock
        self.region = keystore.meta("region")
        self.account = keystore.meta("account")
        #: Caller (peer credentials) -> Principal (ARN, groups, executable); see
        #: kmsfs.kms.principal. Injectable so tests can give a fake /proc.
        self.principals: Callable[[Caller], Principal] = principals or PrincipalResolver(
            self.account
        )
        self._ciphers: dict[tuple[str, int], AESGCM] = {}
        #: key records read outside transactions, valid while _key_cache_stamp holds
        #: (see _key_record)
        self._key_cache: dict[str, KeyRecord] = {}
        self._key_cache_stamp: tuple[int, object] | None = None
        #: who may call CreateKey and GenerateRandom (everyone unless keyd was told)
        self.account_access = account_access or AccountAccess()
        #: who besides root may forward a caller's identity (kmsfs:ForwardCaller;
        #: keyd serve --forwarders): nobody unless keyd was told
        self.forwarders = forwarders or AccountAccess(frozenset())
        #: unsealed private keys of asymmetric CMKs, by (key id, version)
        self._private_keys: dict[tuple[str, int], asymmetric.PrivateKey] = {}
        #: the request being handled (its algorithm members become condition keys)
        self._params: dict[str, Any] = {}
        self._request_id = ""
        #: the result of slow_work for the request being handled (see handle)
        self._prepared: tuple[tuple[str, str], Any] | None = None
        #: the uid keyd runs as: a key made before key policies (no stored policy) has
        #: the default policy with this uid as its creator (see policy_text)
        self.owner_uid = os.getuid() if owner_uid is None else owner_uid
        owner = Principal(self.account, self.owner_uid, 0, 0, login_name(self.owner_uid), (), None)
        self._fallback_policy = default_policy(self.account, owner.arn)
        #: parsed policies by their text (parsing costs ~59 us, a lookup well under 1 us),
        #: with whether any statement has a Condition
        self._parsed: dict[str, tuple[Policy, bool]] = {}
        #: stored policy text by key id (None: no stored policy), saving a query per
        #: request. An entry is dropped when its policy is written, never replaced, so a
        #: write rolled back (its audit record failed) leaves the stored text in force.
        self._policy_texts: dict[str, str | None] = {}
        #: each key's grants by grantee ARN, loaded on first use; an entry is dropped
        #: when the key's grants are written (as _policy_texts), never replaced
        self._grants: dict[str, dict[str, tuple[Grant, ...]]] = {}
        #: the request being handled: its GrantTokens, and the grants that allowed it
        #: (additionalEventData.grantId); reset by handle()
        self._request_tokens: tuple[GrantToken, ...] = ()
        self._grant_ids: list[str] = []
        #: the key of the grant RetireGrant retired (its record's resources entry)
        self._grant_key_id: str | None = None
        #: requests answered while the audit log could not be written (see _record)
        self._unaudited = 0
        self._unaudited_since = 0.0
        self._unaudited_until = 0.0
        self._audit_problem: str | None = None
        #: (action, on_abort) pairs an operation asked to run once its transaction
        #: committed, or to undo if it did not (see _after_commit)
        self._commit_actions: list[tuple[Callable[[], None], Callable[[], None] | None]] = []
        self._operations: dict[str, Callable[[dict[str, Any], Caller], dict[str, Any]]] = {
            name: getattr(self, "_op_" + name) for name in self.operation_names()
        }

    @classmethod
    def operation_names(cls) -> list[str]:
        return sorted(name[4:] for name in dir(cls) if name.startswith("_op_"))

    def principal(self, caller: Caller) -> Principal:
        """The principal of a request from *caller*: its ARN, groups, executable and
        global condition keys (:meth:`Principal.condition_keys`)."""
        return self.principals(caller)

    # ------------------------------------------------------------------ entry
    def slow_work(
        self, operation: str, params: dict[str, Any]
    ) -> tuple[tuple[str, str], Callable[[], Any]] | None:
        """Work a request needs that would stall an event loop, for the caller to run in
        a thread before :meth:`handle` (then passed to it as ``prepared``): generating
        an RSA key pair for CreateKey or GenerateDataKeyPair(WithoutPlaintext), which
        takes up to seconds for RSA_4096. Pure: it touches nothing of the service.
        None when the request needs none (the request is not checked here: handle
        checks it, and generates inline what it was not given)."""
        if operation not in SLOW_OPERATIONS:
            return None
        name = "KeySpec" if operation == "CreateKey" else "KeyPairSpec"
        spec = params.get(name)
        if operation == "CreateKey" and spec is None:
            spec = params.get("CustomerMasterKeySpec")
        if not isinstance(spec, str) or not asymmetric.slow_to_generate(spec):
            return None
        if params.get("DryRun") is True:
            return None
        if operation == "CreateKey":
            usage = params.get("KeyUsage", "ENCRYPT_DECRYPT")
            if usage not in asymmetric.KEY_SPEC_USAGES.get(spec, ()):
                return None  # refused anyway: generate nothing
        return (operation, spec), lambda: asymmetric.generate_key_pair_der(spec)

    def _take_prepared(self, operation: str, spec: str) -> Any:
        """What slow_work computed for this request, if it was for this operation and
        spec; else None."""
        prepared, self._prepared = self._prepared, None
        if prepared is not None and prepared[0] == (operation, spec):
            return prepared[1]
        return None

    def handle(
        self,
        operation: str,
        params: dict[str, Any],
        caller: Caller,
        request_id: str,
        prepared: tuple[tuple[str, str], Any] | None = None,
    ) -> dict[str, Any]:
        """Run one operation and audit it, whatever its outcome.

        ``prepared``: the tag and result of :meth:`slow_work` for this request, computed
        off the event loop by the server.

        The whole request is checked (every member's type, every string's text)
        before anything runs. A state change (:data:`STATE_CHANGING_OPERATIONS`) runs
        in one keystore transaction that commits only after its audit record was
        written and flushed: if the record cannot be written the change is rolled back
        and :class:`StorageUnavailableException` (503) raised. Key use
        (:data:`KEY_USE_OPERATIONS`) is refused the same way. Other requests, and
        refusals, are answered even if their record cannot be written; the log then
        gets an ``AuditGap`` record counting them as soon as it accepts records again.

        If COMMIT itself fails after the record was written (the disk filled up in
        between), the request is answered with an error and a second record with the
        same request id and the error follows the first (when the log accepts it).
        """
        started = self.clock()
        response: dict[str, Any] | None = None
        error: KMSError | None = None
        recorded = False
        self._prepared = prepared
        self._request_id = request_id
        self._params = params if isinstance(params, dict) else {}
        self._request_tokens = ()
        self._grant_ids = []
        self._grant_key_id = None
        try:
            if caller.forwarded_header is not None:
                # before anything else: a refusal here is the real caller's
                caller = self._forwarded_caller(caller)
            method = self._operations.get(operation)
            if method is None:
                raise UnknownOperationException(f"unknown operation {operation!r}")
            check_request(operation, params)
            if "GrantTokens" in REQUEST_MEMBERS[operation]:
                # garbage is refused before anything runs (InvalidGrantTokenException)
                self._request_tokens = grants.read_tokens(params.get("GrantTokens"))
            if operation in STATE_CHANGING_OPERATIONS:
                self._commit_actions.clear()
                try:
                    with self.keystore.transaction():
                        response = method(params, caller)
                        self._record(
                            self._audit_event(
                                operation, params, caller, request_id, started, response, None
                            ),
                            durable=True,
                        )
                        recorded = True
                except BaseException:
                    for _action, on_abort in self._commit_actions:
                        if on_abort is not None:
                            on_abort()
                    raise
                finally:
                    actions, self._commit_actions = self._commit_actions, []
                for action, _on_abort in actions:
                    action()
            else:
                response = method(params, caller)
                # RecordAccessEvents wrote its own records (see kmsfs.kms.access_events)
                recorded = operation in ACCESS_EVENT_OPERATIONS
                if operation in KEY_USE_OPERATIONS:
                    self._record(
                        self._audit_event(
                            operation, params, caller, request_id, started, response, None
                        ),
                        durable=False,
                    )
                    recorded = True
            return response
        except KMSError as exc:
            error = exc
            raise
        except sqlite3.OperationalError as exc:
            # COMMIT (or a write) failed: a full disk, an I/O error. Rolled back.
            error = StorageUnavailableException(
                f"keyd could not write its keystore ({exc}); nothing was changed"
            )
            log.warning("keyd: %s refused: keystore write failed: %s", operation, exc)
            raise error from exc
        except Exception as exc:
            error = KMSInternalException("internal error")
            log.exception("keyd: internal error in %s (request id %s)", operation, request_id)
            raise error from exc
        finally:
            self._prepared = None
            self._params = {}
            if error is not None or not recorded:
                self._record_best_effort(
                    self._audit_event(
                        operation,
                        params,
                        caller,
                        request_id,
                        started,
                        response if error is None else None,
                        error,
                    )
                )

    def _forwarded_caller(self, caller: Caller) -> Caller:
        """The caller a forwarded request is evaluated as (the forwarded user, with the
        forwarder kept for the audit), after checking the header is well-formed
        (ValidationException) and that the peer may forward (AccessDeniedException):
        root, or a principal ``keyd serve --forwarders`` names (kmsfs:ForwardCaller).
        Only root may forward uid 0: anyone else would be claiming root's rights."""
        assert caller.forwarded_header is not None
        try:
            forwarded = ForwardedCaller.parse(caller.forwarded_header)
        except ValueError as exc:
            raise ValidationException(f"{FORWARDED_CALLER_HEADER}: {exc}") from None
        forwarder_caller = dataclasses.replace(caller, forwarded_header=None)
        forwarder = self.principal(forwarder_caller)
        if not forwarder.authenticated or not (
            forwarder.is_root or self.forwarders.allows(forwarder)
        ):
            raise AccessDeniedException(
                f"User: {forwarder.arn} is not authorized to perform: kmsfs:ForwardCaller "
                "on resource: * because keyd's configuration (--forwarders) does not allow "
                "it to forward another user's identity"
            )
        if forwarded.uid == 0 and not forwarder.is_root:
            raise AccessDeniedException(
                f"User: {forwarder.arn} is not authorized to perform: kmsfs:ForwardCaller "
                "for the root user: only root may forward uid 0"
            )
        return Caller(
            uid=forwarded.uid,
            gid=forwarded.gid,
            pid=forwarded.pid,
            forwarded_by=forwarder_caller,
            filesystem_id=forwarded.filesystem_id,
        )

    def _after_commit(
        self, action: Callable[[], None], *, on_abort: Callable[[], None] | None = None
    ) -> None:
        """Run *action* once this state change committed (its audit record on disk),
        or *on_abort* if it is rolled back."""
        self._commit_actions.append((action, on_abort))

    def record_refused(
        self, operation: str, caller: Caller, request_id: str, error: KMSError
    ) -> None:
        """Audit a request the server refused before it reached :meth:`handle` (a
        missing, stale or wrong SigV4 signature, an unknown or disabled access key)."""
        self._record_best_effort(
            self._audit_event(operation, {}, caller, request_id, self.clock(), None, error)
        )

    # ------------------------------------------------------------ audit writing
    def _record(self, event: dict[str, Any], *, durable: bool) -> None:
        """Write one audit record, after a pending ``AuditGap`` record if there is one.

        ``durable``: also flush the log to disk (``fdatasync``) before returning, so
        the record of a state change is on disk before the change commits (SQLite
        commits with synchronous=FULL). Raises :class:`StorageUnavailableException`
        if the record cannot be written.
        """
        if self.audit is None:
            return
        try:
            if self._unaudited:
                self.audit.append(self._gap_event())
                log.warning(
                    "keyd: audit log writable again; %d request(s) were answered without "
                    "a record (an AuditGap record says so)",
                    self._unaudited,
                )
                self._unaudited = 0
                self._audit_problem = None
            try:
                self.audit.append(event)
            except AuditError as exc:
                if isinstance(exc.__cause__, OSError):
                    raise
                # the event itself could not be encoded (too large): keep its outline
                event = {**event, "requestParameters": {"omitted": str(exc)[:200]}}
                self.audit.append(event)
            if durable:
                datasync = getattr(self.audit, "datasync", None)
                if datasync is not None:
                    datasync()
        except (AuditError, OSError) as exc:
            reason = _storage_reason(exc)
            if self._audit_problem is None:
                log.warning(
                    "keyd: cannot write the audit log (%s): refusing state changes and "
                    "key use until it can",
                    reason,
                )
            self._audit_problem = reason
            raise StorageUnavailableException(
                f"keyd cannot write its audit log ({reason}); the request was refused and "
                "nothing was changed. Retry when the keystore's filesystem has space."
            ) from exc

    def _record_many(self, events: list[dict[str, Any] | EncodedEvent], *, durable: bool) -> None:
        """Write *events* in one step (all or none), after a pending ``AuditGap``
        record; ``durable``: and flush them to disk (as :meth:`_record`)."""
        if self.audit is None:
            return
        append_many = getattr(self.audit, "append_many", None)
        if append_many is None:  # a plain sink (tests): one at a time, as dictionaries
            plain = [e.decoded() if isinstance(e, EncodedEvent) else e for e in events]
            for event in plain[:-1]:
                self._record(event, durable=False)
            self._record(plain[-1], durable=durable)
            return
        try:
            if self._unaudited:
                events = [self._gap_event(), *events]
            append_many(events)
            self._unaudited = 0
            self._audit_problem = None
            datasync = getattr(self.audit, "datasync", None)
            if durable and datasync is not None:
                datasync()
        except (AuditError, OSError) as exc:
            reason = _storage_reason(exc)
            self._audit_problem = reason
            raise StorageUnavailableException(
                f"keyd cannot write its audit log ({reason}); the request was refused and "
                "nothing was recorded. Retry when the keystore's filesystem has space."
            ) from exc

    def _record_best_effort(self, event: dict[str, Any]) -> None:
        """Record a request that changed nothing and used no key; count it if impossible."""
        try:
            self._record(event, durable=False)
        except StorageUnavailableException:
            if not self._unaudited:
                self._unaudited_since = self.clock()
            self._unaudited += 1
            self._unaudited_until = self.clock()

    def _gap_event(self) -> dict[str, Any]:
        event = self._service_event("AuditGap", None)
        event["readOnly"] = True
        event["additionalEventData"] = {
            "unauditedRequests": self._unaudited,
            "firstUnauditedTime": _iso(self._unaudited_since),
            "lastUnauditedTime": _iso(self._unaudited_until),
            "reason": self._audit_problem or "unknown",
            "note": "read-only or refused requests answered while the audit log could "
            "not be written; no state change and no key use happened unaudited",
        }
        return event

    def run_maintenance(self) -> dict[str, list[str]]:
        """Destroy keys whose deletion window has ended and rotate keys that are due.

        Returns the key ids acted on. Called by keyd at start-up and periodically.
        """
        now = self.clock()
        deleted: list[str] = []
        rotated: list[str] = []
        expired: list[str] = []
        for key in self.keystore.list_keys():
            # Each change commits together with its audit record, or not at all (then
            # it is retried at the next pass: the key stays pending or due).
            try:
                if key.key_state == "PendingDeletion" and key.deletion_date is not None:
                    if key.deletion_date <= now:
                        with self.keystore.transaction() as db:
                            self.keystore.destroy_key(db, key.key_id, now)
                            self._policy_texts.pop(key.key_id, None)
                            self._grants.pop(key.key_id, None)
                            self._record(self._service_event("DeleteKey", key.key_id), durable=True)
                        self._forget_ciphers(key.key_id)
                        deleted.append(key.key_id)
                elif key.key_state in ("Enabled", "Disabled") and self.material_expired(key, now):
                    # AWS deletes expired imported material (CloudTrail event
                    # DeleteExpiredKeyMaterial); the key waits in PendingImport
                    with self.keystore.transaction() as db:
                        self.delete_material(db, key)
                        self._record(
                            self._service_event("DeleteExpiredKeyMaterial", key.key_id),
                            durable=True,
                        )
                    self._forget_ciphers(key.key_id)
                    expired.append(key.key_id)
                elif (
                    key.key_state == "Enabled"
                    and key.rotation_enabled
                    and key.next_rotation_date is not None
                    and key.next_rotation_date <= now
                ):
                    with self.keystore.transaction():
                        self._add_version(key, "AUTOMATIC", now)
                        self._record(self._service_event("RotateKey", key.key_id), durable=True)
                    rotated.append(key.key_id)
            except (StorageUnavailableException, sqlite3.OperationalError) as exc:
                log.warning("keyd maintenance of key %s postponed: %s", key.key_id, exc)
        if deleted or self.keystore.scrub_pending:
            self.keystore.scrub()
        return {"deleted": deleted, "rotated": rotated, "expired": expired}

    # ---------------------------------------------------------- key policies
    def policy_text(self, key: KeyRecord) -> str:
        """The key's policy: the stored text, or for a key made before key policies
        (no stored policy) the default policy with keyd's owner as creator, so that
        existing single-user set-ups keep working (the account root may do kms:* too)."""
        try:
            text = self._policy_texts[key.key_id]
        except KeyError:
            text = self.keystore.get_policy(key.key_id)
            if len(self._policy_texts) >= 4096:
                self._policy_texts.clear()
            self._policy_texts[key.key_id] = text
        return self._fallback_policy if text is None else text

    def _policy(self, key: KeyRecord) -> tuple[Policy, bool]:
        """The key's parsed policy, and whether any of its statements has a Condition."""
        text = self.policy_text(key)
        cached = self._parsed.get(text)
        if cached is None:
            try:
                policy = parse_policy(text)
            except MalformedPolicyDocumentException as exc:
                # stored policies were valid when written; only a stricter kmsfs gets here
                log.warning(
                    "keyd: the stored policy of key %s no longer parses: %s", key.key_id, exc
                )
                raise KMSInternalException(
                    f"the key policy of {self.arn(key.key_id)} is not valid any more; "
                    "root of this machine can replace it with PutKeyPolicy"
                ) from None
            if len(self._parsed) >= 1024:
                self._parsed.clear()
            conditional = any(statement.conditions for statement in policy.statements)
            cached = self._parsed[text] = (policy, conditional)
        return cached

    def _request_context(
        self,
        principal: Principal,
        action: str,
        key: KeyRecord,
        encryption_context: dict[str, str] | None = None,
        request_alias: str | None = None,
        extra_conditions: dict[str, Any] | None = None,
    ) -> RequestContext:
        """What the key policy sees of a request: the caller's global condition keys
        (aws:PrincipalArn, kms:CallerAccount, kmsfs:Caller*, ...), the encryption
        context (kms:EncryptionContext:<k>, kms:EncryptionContextKeys), the key's
        kms:KeySpec and kms:KeyUsage, and kms:RequestAlias when the request named the
        key by an alias. kms:ViaService is "kmsfs-mount" for a request a kmsfs mount
        forwarded for its caller (kmsfs.kms.caller.ForwardedCaller), absent otherwise."""
        conditions: dict[str, Any] = principal.condition_keys()
        now = self.clock()
        conditions["aws:CurrentTime"] = _iso(now)
        conditions["aws:EpochTime"] = int(now)
        conditions["kms:KeySpec"] = key.key_spec
        conditions["kms:KeyUsage"] = key.key_usage
        conditions["kms:KeyOrigin"] = key.origin
        conditions.update(_algorithm_keys(action, self._params))
        if encryption_context:
            conditions["kms:EncryptionContextKeys"] = list(encryption_context)
            for name, value in encryption_context.items():
                conditions[ENCRYPTION_CONTEXT_PREFIX + name] = value
        if request_alias is not None:
            conditions["kms:RequestAlias"] = request_alias
        if extra_conditions:
            conditions.update(extra_conditions)
        # kms:ResourceAliases: every alias of the key, whichever name the request used
        conditions["kms:ResourceAliases"] = [
            alias.alias_name for alias in self.keystore.list_aliases(key.key_id)
        ]
        return RequestContext(
            principal.arn,
            principal.is_root,
            self.account,
            action,
            self.arn(key.key_id),
            conditions,
            _other_arns(principal),
        )

    def _allowed(
        self,
        caller: Caller,
        operation: str,
        key: KeyRecord,
        encryption_context: dict[str, str] | None = None,
        named: Any = None,
        extra_conditions: dict[str, Any] | None = None,
        new_grant: Grant | None = None,
    ) -> tuple[bool, str]:
        """Whether the key policy, or else one of the caller's grants on the key, allows
        the request (and AWS's refusal message if not). An explicit Deny in the key
        policy wins over grants ("an explicit deny in any of these policies overrides
        the allow", AWS KMS "Determining access to AWS KMS keys"). Grants are consulted
        only when the policy does not allow, so the default policy's fast path (its
        principals) costs nothing more. A grant that allowed the request is noted for
        the audit record (additionalEventData.grantId)."""
        principal = self.principal(caller)
        policy, conditional = self._policy(key)
        if conditional:
            context = self._request_context(
                principal,
                "kms:" + operation,
                key,
                encryption_context,
                _alias_named(named),
                extra_conditions,
            )
        else:
            # Only Condition blocks read condition keys: a policy without any (the
            # default policy) is decided on principal, action and resource alone, and
            # building the keys would cost more than the evaluation (~10 us a request).
            context = RequestContext(
                principal.arn,
                principal.is_root,
                self.account,
                "kms:" + operation,
                self.arn(key.key_id),
                other_arns=_other_arns(principal),
            )
        decision = evaluate(policy, context)
        if decision.allowed:
            return True, ""
        if decision.effect != "Deny" and operation in grants.GRANT_OPERATIONS:
            grant = self._grant_allowing(principal, operation, key, encryption_context, new_grant)
            if grant is not None:
                self._grant_ids.append(grant.grant_id)
                return True, ""
        action, resource = context.action, context.resource
        # AWS's AccessDeniedException message shape
        if decision.effect == "Deny":
            why = "with an explicit deny in a resource-based policy"
        else:
            why = f"because no resource-based policy allows the {action} action"
        return False, (
            f"User: {principal.arn} is not authorized to perform: {action} "
            f"on resource: {resource} {why}"
        )

    def _authorize(
        self,
        caller: Caller,
        operation: str,
        key: KeyRecord,
        encryption_context: dict[str, str] | None = None,
        named: Any = None,
        *,
        extra_conditions: dict[str, Any] | None = None,
        new_grant: Grant | None = None,
    ) -> None:
        """Refuse with AccessDeniedException unless the key policy (or a grant) allows
        the request.

        Policies apply to every caller, root (uid 0) included, as in AWS; the default
        policy allows root. (kmsfs's one exception, for PutKeyPolicy and GetKeyPolicy
        only, is in those operations.) The request's GrantTokens must name grants of
        this key (of either key for ReEncrypt): InvalidGrantTokenException otherwise."""
        if operation not in ("ReEncryptFrom", "ReEncryptTo"):
            for token in self._request_tokens:
                if token.key_id != key.key_id:
                    raise InvalidGrantTokenException(
                        f"A grant token does not name a grant of {self.arn(key.key_id)}."
                    )
        allowed, message = self._allowed(
            caller, operation, key, encryption_context, named, extra_conditions, new_grant
        )
        if not allowed:
            error = AccessDeniedException(message)
            error.resource_arn = self.arn(key.key_id)  # for the refusal's audit record
            raise error

    def _authorize_account_level(self, caller: Caller, operation: str) -> None:
        """CreateKey and GenerateRandom concern no key, so no key policy decides them;
        in AWS an IAM policy does. Here: every local principal, unless keyd was started
        with --account-users (root always)."""
        principal = self.principal(caller)
        if not self.account_access.allows(principal):
            # AWS's message shape for a request no identity-based policy allows
            raise AccessDeniedException(
                f"User: {principal.arn} is not authorized to perform: kms:{operation} "
                f"on resource: * because no identity-based policy allows the "
                f"kms:{operation} action"
            )

    def _may_describe(self, caller: Caller, key: KeyRecord) -> bool:
        """For filtering listings: a grant that makes a key visible did not allow the
        listing itself, so it is not named in the listing's audit record."""
        noted = len(self._grant_ids)
        allowed = self._allowed(caller, "DescribeKey", key)[0]
        del self._grant_ids[noted:]
        return allowed

    def _check_new_policy(
        self, params: dict[str, Any], caller: Caller, key: KeyRecord, text: str
    ) -> None:
        """Validate a policy and run AWS's lockout safety check unless bypassed."""
        bypass = _field(params, "BypassPolicyLockoutSafetyCheck", bool, False)
        policy = parse_policy(text)
        # root of the machine may always call PutKeyPolicy (see _op_PutKeyPolicy), so no
        # policy can lock it out: the check would refuse its repairs for nothing
        if not bypass and not self.principal(caller).is_root:
            context = self._request_context(self.principal(caller), "kms:PutKeyPolicy", key)
            if would_lock_out(policy, context):
                # AWS answers a self-locking policy with MalformedPolicyDocumentException
                raise MalformedPolicyDocumentException(
                    "The new key policy will not allow you to update the key policy in the future."
                )

    @staticmethod
    def _policy_name(params: dict[str, Any]) -> str:
        """PolicyName: optional, "default" when absent; "The only valid value is default"
        (AWS KMS API reference, PutKeyPolicy/GetKeyPolicy)."""
        name = _string(params, "PolicyName", max_len=128) or "default"
        if name != "default":
            raise ValidationException(
                f"1 validation error detected: Value '{name}' at 'policyName' failed to "
                "satisfy constraint: the only valid policy name is 'default'"
            )
        return name

    def _op_PutKeyPolicy(self, params: dict[str, Any], caller: Caller) -> dict[str, Any]:
        key = self._resolve(params, allow_alias=False)
        self._policy_name(params)
        text = _string(params, "Policy", required=True, max_len=32768)
        assert text is not None
        # kmsfs exception: root of the machine owns keyd and may always replace a key
        # policy (repair a key nobody can manage any more); documented in the README
        if not self.principal(caller).is_root:
            self._authorize(caller, "PutKeyPolicy", key)
        self._check_new_policy(params, caller, key, text)
        with self.keystore.transaction() as db:
            self.keystore.put_policy(db, key.key_id, text)
            self._policy_texts.pop(key.key_id, None)
        return {}

    def _op_GetKeyPolicy(self, params: dict[str, Any], caller: Caller) -> dict[str, Any]:
        key = self._resolve(params, allow_alias=False)
        name = self._policy_name(params)
        if not self.principal(caller).is_root:  # see _op_PutKeyPolicy
            self._authorize(caller, "GetKeyPolicy", key)
        return {"Policy": self.policy_text(key), "PolicyName": name}

    def _op_ListKeyPolicies(self, params: dict[str, Any], caller: Caller) -> dict[str, Any]:
        key = self._resolve(params, allow_alias=False)
        self._authorize(caller, "ListKeyPolicies", key)
        page, extra = self._page(params, ["default"], 100, 1000)
        return {"PolicyNames": page, **extra}

    # ----------------------------------------------------------------- grants
    def _grants_of(self, key_id: str) -> dict[str, tuple[Grant, ...]]:
        """The key's grants by grantee ARN (cached; one query per key)."""
        index = self._grants.get(key_id)
        if index is None:
            by_grantee: dict[str, list[Grant]] = {}
            for grant in self.keystore.list_grants(key_id):
                by_grantee.setdefault(grant.grantee, []).append(grant)
            index = {grantee: tuple(found) for grantee, found in by_grantee.items()}
            if len(self._grants) >= 4096:
                self._grants.clear()
            self._grants[key_id] = index
        return index

    def _grant_allowing(
        self,
        principal: Principal,
        operation: str,
        key: KeyRecord,
        encryption_context: dict[str, str] | None,
        new_grant: Grant | None,
    ) -> Grant | None:
        index = self._grants_of(key.key_id)
        if not index:
            return None
        for arn in principal.arns:
            grant = grants.allowing_grant(
                index.get(arn, ()), operation, encryption_context, new_grant
            )
            if grant is not None:
                return grant
        return None

    def _op_CreateGrant(self, params: dict[str, Any], caller: Caller) -> dict[str, Any]:
        # KeyId: key id or key ARN (AWS's CreateGrant takes no alias)
        key = self._resolve(params, allow_alias=False)
        grantee = grants.check_principal(
            params.get("GranteePrincipal"), "GranteePrincipal", self.account
        )
        retiring = None
        if params.get("RetiringPrincipal") is not None:
            retiring = grants.check_principal(
                params["RetiringPrincipal"], "RetiringPrincipal", self.account
            )
        operations = grants.parse_operations(params.get("Operations"))
        constraints = grants.parse_constraints(params.get("Constraints"), operations)
        grant = Grant(
            grant_id=grants.new_grant_id(),
            key_id=key.key_id,
            name=grants.parse_name(params.get("Name")),
            grantee=grantee,
            retiring=retiring,
            operations=operations,
            constraints=constraints,
            creation_date=self.clock(),
            issuing_account=root_arn(self.account),
        )
        # the condition keys AWS fills for CreateGrant; kms:EncryptionContext:* see the
        # grant's constraints
        extra: dict[str, Any] = {
            "kms:GrantOperations": list(operations),
            "kms:GranteePrincipal": grantee,
            "kms:GrantIsForAWSResource": False,
        }
        if retiring is not None:
            extra["kms:RetiringPrincipal"] = retiring
        # kms:GrantConstraintType: which constraint types the grant has
        extra["kms:GrantConstraintType"] = list(constraints.to_json() or ())
        self._authorize(
            caller,
            "CreateGrant",
            key,
            constraints.context_for_policy(),
            extra_conditions=extra,
            new_grant=grant,
        )
        self._require_not_pending(key)
        _dry_run(params)
        with self.keystore.transaction() as db:
            if grant.name:
                # a retry with the same Name and parameters returns the existing grant
                # and a new token (AWS CreateGrant, Name)
                for existing in self.keystore.list_grants_named(key.key_id, grant.name):
                    if existing.same_request(grant):
                        return {
                            "GrantToken": grants.make_token(key.key_id, existing.grant_id),
                            "GrantId": existing.grant_id,
                        }
            if self.keystore.count_grants(db, key.key_id) >= grants.MAX_GRANTS_PER_KEY:
                raise LimitExceededException(
                    f"{self.arn(key.key_id)} has {grants.MAX_GRANTS_PER_KEY} grants, the "
                    "most a key can have; retire or revoke some first"
                )
            grant = dataclasses.replace(grant, token=grants.make_token(key.key_id, grant.grant_id))
            self.keystore.insert_grant(db, grant)
        self._grants.pop(key.key_id, None)
        return {"GrantToken": grant.token, "GrantId": grant.grant_id}

    def _op_ListGrants(self, params: dict[str, Any], caller: Caller) -> dict[str, Any]:
        key = self._resolve(params, allow_alias=False)
        grant_id = None
        if params.get("GrantId") is not None:
            grant_id = grants.check_grant_id(params["GrantId"])
        grantee = _string(params, "GranteePrincipal", max_len=256)
        self._authorize(caller, "ListGrants", key)  # key policy only: not grantable
        key_arn = self.arn(key.key_id)
        entries = [
            grant.list_entry(key_arn)
            for grant in self.keystore.list_grants(key.key_id)
            if grant_id in (None, grant.grant_id) and grantee in (None, grant.grantee)
        ]
        page, extra = self._page(params, entries, 50, 100)
        return {"Grants": page, **extra}

    def _op_ListRetirableGrants(self, params: dict[str, Any], caller: Caller) -> dict[str, Any]:
        retiring = _string(params, "RetiringPrincipal", required=True, max_len=256)
        assert retiring is not None
        principal = self.principal(caller)
        # kmsfs: AWS governs ListRetirableGrants by IAM policies only; without IAM, a
        # principal may list the grants it may retire, and root anyone's.
        if retiring not in principal.arns and not principal.is_root:
            raise AccessDeniedException(
                f"User: {principal.arn} is not authorized to perform: "
                f"kms:ListRetirableGrants for {retiring}: only that principal itself or "
                "root may list its retirable grants"
            )
        entries = [
            grant.list_entry(self.arn(grant.key_id))
            for grant in self.keystore.list_retirable_grants(retiring)
        ]
        page, extra = self._page(params, entries, 50, 100)
        return {"Grants": page, **extra}

    def _grant_named(self, params: dict[str, Any]) -> tuple[KeyRecord, Grant]:
        """RetireGrant's grant: by GrantToken, or by KeyId and GrantId."""
        token = _string(params, "GrantToken", max_len=grants.MAX_GRANT_TOKEN_CHARS)
        if token is not None:
            named = grants.read_token(token)
            given_key = params.get("KeyId")
            if (
                given_key is not None
                and self._resolve(params, allow_alias=False).key_id != named.key_id
            ):
                raise ValidationException("GrantToken and KeyId name different keys")
            if params.get("GrantId") not in (None, named.grant_id):
                raise ValidationException("GrantToken and GrantId name different grants")
            key_id, grant_id = named.key_id, named.grant_id
            key = self.keystore.get_key(key_id)
        else:
            if params.get("KeyId") is None or params.get("GrantId") is None:
                raise ValidationException("RetireGrant needs GrantToken, or KeyId and GrantId")
            key = self._resolve(params, allow_alias=False)
            grant_id = grants.check_grant_id(params["GrantId"])
        grant = self.keystore.get_grant(key.key_id, grant_id) if key is not None else None
        if key is None or grant is None:
            raise NotFoundException(f"Grant ID {grant_id} not found")
        return key, grant

    def _op_RetireGrant(self, params: dict[str, Any], caller: Caller) -> dict[str, Any]:
        key, grant = self._grant_named(params)
        principal = self.principal(caller)
        # "The grant determines who can retire it" (Retiring and revoking grants):
        # no key policy check
        if not grants.may_retire(grant, principal.arns, principal.root_arn):
            raise AccessDeniedException(
                f"User: {principal.arn} is not authorized to perform: kms:RetireGrant on "
                f"resource: {self.arn(key.key_id)} because it is neither the grant's "
                "retiring principal nor its grantee with RetireGrant in the grant"
            )
        _dry_run(params)
        with self.keystore.transaction() as db:
            self.keystore.delete_grant(db, key.key_id, grant.grant_id)
        self._grants.pop(key.key_id, None)
        self._grant_ids.append(grant.grant_id)  # audited: which grant went away
        self._grant_key_id = key.key_id
        return {}

    def _op_RevokeGrant(self, params: dict[str, Any], caller: Caller) -> dict[str, Any]:
        key = self._resolve(params, allow_alias=False)
        _string(params, "GrantId", required=True, max_len=128)
        grant_id = grants.check_grant_id(params["GrantId"])
        # "access to the RevokeGrant operation is controlled through key policies"
        self._authorize(caller, "RevokeGrant", key)
        _dry_run(params)
        with self.keystore.transaction() as db:
            if not self.keystore.delete_grant(db, key.key_id, grant_id):
                raise NotFoundException(f"Grant ID {grant_id} not found")
        self._grants.pop(key.key_id, None)
        return {}

    # --------------------------------------------------------------- helpers
    def arn(self, key_id: str) -> str:
        return f"arn:aws:kms:{self.region}:{self.account}:key/{key_id}"

    def alias_arn(self, alias_name: str) -> str:
        return f"arn:aws:kms:{self.region}:{self.account}:{alias_name}"

    def _resolve(
        self, params: dict[str, Any], name: str = "KeyId", *, allow_alias: bool = True
    ) -> KeyRecord:
        """Find the key a KeyId-like parameter names: id, key ARN, alias name or alias ARN."""
        value = _string(params, name, required=True)
        assert value is not None
        return self._resolve_value(value, name, allow_alias=allow_alias)

    def _resolve_value(self, value: str, name: str, *, allow_alias: bool) -> KeyRecord:
        key_id = value
        match = _ARN_RE.fullmatch(value)
        if match:
            region, account, kind, rest = match.groups()
            if (region, account) != (self.region, self.account):
                raise NotFoundException(f"Invalid arn {value}: not in this region and account")
            if kind == "key" and not _UUID_RE.fullmatch(rest):
                raise NotFoundException(f"Invalid keyId '{value}'")
            key_id = rest if kind == "key" else "alias/" + rest
        if key_id.startswith("alias/"):
            if not allow_alias:
                raise ValidationException(f"{name} must be a key id or key ARN, not an alias")
            alias = self.keystore.get_alias(key_id)
            if alias is None:
                raise NotFoundException(f"Alias {self.alias_arn(key_id)} is not found.")
            key_id = alias.key_id
        elif not _UUID_RE.fullmatch(key_id):
            raise NotFoundException(f"Invalid keyId '{value}'")
        key = self._key_record(key_id)
        if key is None:
            raise NotFoundException(f"Key '{self.arn(key_id)}' does not exist")
        return key

    def _key_record(self, key_id: str) -> KeyRecord | None:
        """``keystore.get_key(key_id)``, from a cache while the keystore is unchanged.

        Every request names a key, and reading its row costs more than the rest of
        a GenerateDataKey's checks. The cache is dropped whenever anything may have
        changed a row: a change by keyd itself (SQLite's ``total_changes`` of its
        connection moved, committed or rolled back) or a commit by any other
        connection to the keystore (its WAL index header moved:
        ``Keystore.change_stamp``, no system call); inside a
        transaction (a state-changing operation) the row is always read. So a
        disabled, deleted or rotated key is seen by the very next request.
        """
        db = self.keystore._db
        if db.in_transaction:
            return self.keystore.get_key(key_id)
        stamp = (id(db), self.keystore.change_stamp())
        if stamp != self._key_cache_stamp:
            self._key_cache.clear()
            self._key_cache_stamp = stamp
        key = self._key_cache.get(key_id)
        if key is None:
            key = self.keystore.get_key(key_id)
            if key is not None:
                if len(self._key_cache) >= 1024:
                    self._key_cache.clear()
                self._key_cache[key_id] = key
        return key

    def _require_usable(self, key: KeyRecord) -> None:
        """Cryptographic operations need an Enabled key (with unexpired material)."""
        if key.key_state == "Disabled":
            raise DisabledException(f"{self.arn(key.key_id)} is disabled.")
        if key.key_state != "Enabled":
            raise KMSInvalidStateException(f"{self.arn(key.key_id)} is {key.key_state}.")
        if key.origin == "EXTERNAL" and self.material_expired(key, self.clock()):
            # deleted at the next maintenance pass; unusable from ValidTo on, as in AWS
            raise KMSInvalidStateException(
                f"{self.arn(key.key_id)}: its imported key material expired."
            )

    def _require_material(self, key: KeyRecord) -> None:
        if key.key_state == "PendingImport":
            raise KMSInvalidStateException(
                f"{self.arn(key.key_id)} is pending import: it has no key material yet."
            )

    def _require_not_pending(self, key: KeyRecord) -> None:
        if key.key_state == "PendingDeletion":
            raise KMSInvalidStateException(f"{self.arn(key.key_id)} is pending deletion.")

    def _refuse_rotation_of_imported(self, key: KeyRecord) -> None:
        # AWS: automatic rotation is not supported for keys with imported material (and
        # kmsfs has no new imported material versions either)
        if key.origin == "EXTERNAL":
            raise UnsupportedOperationException(
                f"{self.arn(key.key_id)} has imported key material: rotation is not supported"
            )

    def _cipher(self, key_id: str, version: int) -> AESGCM | None:
        cipher = self._ciphers.get((key_id, version))
        if cipher is None:
            material = self.keystore.unseal_material(key_id, version)
            if material is None:
                return None
            cipher = self._ciphers[(key_id, version)] = AESGCM(material)
        return cipher

    def _forget_ciphers(self, key_id: str) -> None:
        for cache_key in [k for k in self._ciphers if k[0] == key_id]:
            del self._ciphers[cache_key]
        for cache_key in [k for k in self._private_keys if k[0] == key_id]:
            del self._private_keys[cache_key]

    def _material(self, key: KeyRecord) -> bytes:
        """The unsealed material of the key's current version (asymmetric and HMAC keys
        have one version: they cannot be rotated)."""
        material = self.keystore.unseal_material(key.key_id, key.current_version)
        if material is None:
            raise KMSInternalException("key material is missing")
        return material

    def _private_key(self, key: KeyRecord) -> asymmetric.PrivateKey:
        cache_key = (key.key_id, key.current_version)
        private = self._private_keys.get(cache_key)
        if private is None:
            private = asymmetric.load_private_key(self._material(key))
            if len(self._private_keys) >= 1024:
                self._private_keys.clear()
            self._private_keys[cache_key] = private
        return private

    def _check_encryption_key(
        self, key: KeyRecord, algorithm: str, context: dict[str, str], operation: str
    ) -> None:
        """The key can encrypt/decrypt with ``algorithm``: its KeyUsage is ENCRYPT_DECRYPT
        and its KeySpec supports the algorithm (InvalidKeyUsageException otherwise, as
        AWS: SYMMETRIC_DEFAULT only for symmetric keys, RSAES_OAEP_SHA_1/256 only for
        RSA keys). An encryption context is supported only with symmetric encryption
        keys (AWS Encrypt: "An encryption context is supported only on operations with
        symmetric encryption KMS keys")."""
        asymmetric.require_usage(key.key_spec, key.key_usage, "ENCRYPT_DECRYPT", operation)
        asymmetric.require_algorithm(
            "EncryptionAlgorithm",
            algorithm,
            asymmetric.encryption_algorithms(key.key_spec, key.key_usage),
            key.key_spec,
        )
        if context and key.key_spec != "SYMMETRIC_DEFAULT":
            raise ValidationException(
                "EncryptionContext is supported only on operations with symmetric "
                f"encryption KMS keys; {self.arn(key.key_id)} has KeySpec {key.key_spec}"
            )

    def _rsa_encrypt(self, key: KeyRecord, algorithm: str, plaintext: bytes) -> bytes:
        return asymmetric.rsa_encrypt(self._private_key(key), key.key_spec, algorithm, plaintext)

    def _rsa_open(
        self,
        key: KeyRecord,
        algorithm: str,
        blob: bytes,
        context: dict[str, str],
        operation: str,
        authorize: Callable[[KeyRecord], None],
    ) -> bytes:
        """Decrypt raw RSAES-OAEP ciphertext with an RSA key named in the request."""
        self._check_encryption_key(key, algorithm, context, operation)
        authorize(key)
        self._require_usable(key)
        private = self._private_key(key)
        return asymmetric.rsa_decrypt(private, algorithm, blob)

    def _seal(self, key: KeyRecord, plaintext: bytes, context: dict[str, str]) -> bytes:
        cipher = self._cipher(key.key_id, key.current_version)
        if cipher is None:
            raise KMSInternalException("key material is missing")
        head = _BLOB_HEAD.pack(BLOB_VERSION, _key_id_bytes(key.key_id), key.current_version)
        nonce = os.urandom(12)
        aad = head + encode_encryption_context(context)
        return head + nonce + cipher.encrypt(nonce, plaintext, aad)

    def _blob_key(self, blob: bytes) -> KeyRecord | None:
        """The existing key one of keyd's symmetric blobs names, if it looks like one."""
        if len(blob) < BLOB_HEADER_LEN + TAG_LEN or blob[0] != BLOB_VERSION:
            return None
        _, key_bytes, _version = _BLOB_HEAD.unpack_from(blob)
        return self._key_record(str(uuid.UUID(bytes=key_bytes)))

    def _open(
        self,
        blob: bytes,
        context: dict[str, str],
        expected_key: KeyRecord | None,
        authorize: Callable[[KeyRecord], None],
    ) -> tuple[KeyRecord, bytes]:
        """Authenticate and decrypt a blob; returns the key that sealed it and the plaintext."""
        if len(blob) < BLOB_HEADER_LEN + TAG_LEN or blob[0] != BLOB_VERSION:
            raise InvalidCiphertextException("The ciphertext is invalid.")
        _, key_bytes, version = _BLOB_HEAD.unpack_from(blob)
        key_id = str(uuid.UUID(bytes=key_bytes))
        key = self._key_record(key_id)
        if key is None:
            if self.keystore.was_deleted(key_id):
                raise NotFoundException(f"Key '{self.arn(key_id)}' has been deleted")
            raise InvalidCiphertextException("The ciphertext is invalid.")
        if expected_key is not None and expected_key.key_id != key_id:
            raise IncorrectKeyException(
                "The key ID in the request does not identify a CMK that can perform this operation."
            )
        if key.key_spec != "SYMMETRIC_DEFAULT":
            # only symmetric keys seal blobs: this one was made, not sealed by keyd
            raise InvalidCiphertextException("The ciphertext is invalid.")
        authorize(key)  # the key policy decides before anything is decrypted
        self._require_usable(key)
        cipher = self._cipher(key_id, version) if 1 <= version <= key.current_version else None
        if cipher is None:
            raise InvalidCiphertextException("The ciphertext is invalid.")
        head = blob[: _BLOB_HEAD.size]
        aad = head + encode_encryption_context(context)
        try:
            plaintext = cipher.decrypt(
                blob[_BLOB_HEAD.size : BLOB_HEADER_LEN], blob[BLOB_HEADER_LEN:], aad
            )
        except InvalidTag:
            raise InvalidCiphertextException(
                "The ciphertext or its encryption context is invalid."
            ) from None
        return key, plaintext

    def _add_version(self, key: KeyRecord, rotation_type: str, now: float) -> int:
        version = key.current_version + 1
        changes: dict[str, Any] = {"current_version": version}
        # On-demand rotations leave the automatic schedule alone (as AWS does).
        if rotation_type == "AUTOMATIC" and key.rotation_enabled and key.rotation_period_days:
            changes["next_rotation_date"] = now + key.rotation_period_days * DAY
        with self.keystore.transaction() as db:
            self.keystore.insert_version(
                db, key.key_id, version, os.urandom(32), now, rotation_type
            )
            self.keystore.update_key(db, key.key_id, **changes)
        return version

    def key_metadata(self, key: KeyRecord) -> dict[str, Any]:
        metadata: dict[str, Any] = {
            "AWSAccountId": self.account,
            "KeyId": key.key_id,
            "Arn": self.arn(key.key_id),
            "CreationDate": key.creation_date,
            "Enabled": key.key_state == "Enabled",
            "Description": key.description,
            "KeyUsage": key.key_usage,
            "KeyState": key.key_state,
            "Origin": key.origin,
            "KeyManager": "CUSTOMER",
            "CustomerMasterKeySpec": key.key_spec,
            "KeySpec": key.key_spec,
            **asymmetric.algorithm_fields(key.key_spec, key.key_usage),
            "MultiRegion": False,
        }
        if key.key_state == "PendingDeletion":
            metadata["DeletionDate"] = key.deletion_date
            metadata["PendingDeletionWindowInDays"] = key.pending_window_days
        if key.origin == "EXTERNAL":
            metadata.update(self.import_metadata(key))
        return metadata

    @staticmethod
    def _page(
        params: dict[str, Any], items: list[Any], default_limit: int, max_limit: int
    ) -> tuple[list[Any], dict[str, Any]]:
        """AWS-style pagination: Limit (1 to the operation's maximum) and an opaque Marker."""
        limit = _integer(params, "Limit", 1, max_limit) or default_limit
        marker = _string(params, "Marker", max_len=320)
        start = 0
        if marker is not None:
            try:
                start = int(base64.urlsafe_b64decode(marker.encode()).decode().removeprefix("i:"))
            except (ValueError, binascii.Error, UnicodeDecodeError):
                raise InvalidMarkerException("The marker is invalid.") from None
            if not 0 <= start <= len(items):
                raise InvalidMarkerException("The marker is invalid.")
        page = items[start : start + limit]
        extra: dict[str, Any] = {"Truncated": start + limit < len(items)}
        if extra["Truncated"]:
            extra["NextMarker"] = base64.urlsafe_b64encode(f"i:{start + limit}".encode()).decode()
        return page, extra

    # ------------------------------------------------------------- key admin
    def _op_CreateKey(self, params: dict[str, Any], caller: Caller) -> dict[str, Any]:
        self._authorize_account_level(caller, "CreateKey")
        description = _string(params, "Description", min_len=0, max_len=8192) or ""
        key_spec = _string(params, "KeySpec", choices=_KNOWN_KEY_SPECS)
        legacy_spec = _string(params, "CustomerMasterKeySpec", choices=_KNOWN_KEY_SPECS)
        if key_spec and legacy_spec and key_spec != legacy_spec:
            raise ValidationException("KeySpec and CustomerMasterKeySpec disagree")
        key_spec = key_spec or legacy_spec or "SYMMETRIC_DEFAULT"
        key_usage = _string(params, "KeyUsage", choices=_KEY_USAGES) or "ENCRYPT_DECRYPT"
        origin = _string(params, "Origin", choices=_ORIGINS) or "AWS_KMS"
        if key_spec not in _SUPPORTED_KEY_SPECS:
            raise UnsupportedOperationException(
                f"KeySpec {key_spec} is not supported by keyd (supported: "
                f"{', '.join(asymmetric.KEY_SPEC_USAGES)})"
            )
        # AWS CreateKey: KeyUsage defaults to ENCRYPT_DECRYPT; a pair the key spec
        # reference does not list is a ValidationException naming the valid usages
        asymmetric.check_spec_usage(key_spec, key_usage)
        if origin not in ("AWS_KMS", "EXTERNAL"):
            raise UnsupportedOperationException(f"Origin {origin} is not supported")
        if origin == "EXTERNAL" and key_spec != "SYMMETRIC_DEFAULT":
            raise UnsupportedOperationException(
                "kmsfs imports symmetric key material only: Origin EXTERNAL needs KeySpec "
                "SYMMETRIC_DEFAULT"
            )
        key_id = str(uuid.uuid4())
        if params.get("KeyId") is not None:
            key_id = self._chosen_key_id(params, origin)
        if _field(params, "MultiRegion", bool, False):
            raise UnsupportedOperationException("multi-Region keys are not supported")
        policy = _string(params, "Policy", max_len=32768)
        tags = self._parse_tags(params)
        now = self.clock()
        key = KeyRecord(
            key_id=key_id,
            description=description,
            # AWS: a key for imported material waits in PendingImport without material
            key_state="PendingImport" if origin == "EXTERNAL" else "Enabled",
            key_spec=key_spec,
            key_usage=key_usage,
            origin=origin,
            creation_date=now,
            deletion_date=None,
            pending_window_days=None,
            rotation_enabled=False,
            rotation_period_days=None,
            next_rotation_date=None,
            current_version=1,
            creator_uid=caller.uid,
        )
        # CreateKey is account-level (AWS checks it against IAM policies only): see
        # _authorize_account_level. Without Policy the key gets AWS's default
        # policy (root may do kms:*) plus kms:* for its creator (see default_policy).
        if policy is None:
            policy = default_policy(self.account, self.principal(caller).arn)
        else:
            self._check_new_policy(params, caller, key, policy)
        _dry_run(params)
        # RSA pairs come generated off the event loop (slow_work), others are quick; a
        # key for imported material has none until ImportKeyMaterial
        prepared = self._take_prepared("CreateKey", key_spec)
        material: bytes | None = None
        if origin == "AWS_KMS":
            material = (
                prepared[0] if prepared is not None else asymmetric.generate_material(key_spec)
            )
        with self.keystore.transaction() as db:
            self.keystore.insert_key(db, key, material)
            self.keystore.put_policy(db, key.key_id, policy)
            self._policy_texts.pop(key.key_id, None)
            db.executemany(
                "INSERT INTO tags (key_id, tag_key, tag_value) VALUES (?, ?, ?)",
                [(key.key_id, tag_key, tag_value) for tag_key, tag_value in tags],
            )
        return {"KeyMetadata": self.key_metadata(key)}

    def _chosen_key_id(self, params: dict[str, Any], origin: str) -> str:
        """kmsfs's own CreateKey member ``KeyId``, for Origin EXTERNAL only: recreate a
        key under its old id in a fresh keystore, to re-import escrowed material (see
        kmsfs.kms.byok). Never an id this keystore has or had."""
        value = _string(params, "KeyId", max_len=36)
        assert value is not None
        if origin != "EXTERNAL":
            raise ValidationException("KeyId can be chosen only for a key with Origin EXTERNAL")
        value = value.lower()
        if not _UUID_RE.fullmatch(value):
            raise ValidationException(f"KeyId {value!r} is not a key id (a UUID)")
        if self.keystore.get_key(value) is not None or self.keystore.was_deleted(value):
            raise AlreadyExistsException(f"{self.arn(value)} exists or existed in this keystore")
        return value

    def _op_DescribeKey(self, params: dict[str, Any], caller: Caller) -> dict[str, Any]:
        key = self._resolve(params)
        self._authorize(caller, "DescribeKey", key, named=params.get("KeyId"))
        return {"KeyMetadata": self.key_metadata(key)}

    def _op_ListKeys(self, params: dict[str, Any], caller: Caller) -> dict[str, Any]:
        # Only the keys the caller may DescribeKey (kmsfs: AWS's ListKeys is governed by
        # IAM policies only and lists every key of the account).
        visible = [key for key in self.keystore.list_keys() if self._may_describe(caller, key)]
        page, extra = self._page(params, visible, 100, 1000)
        keys = [{"KeyId": key.key_id, "KeyArn": self.arn(key.key_id)} for key in page]
        return {"Keys": keys, **extra}

    def _op_EnableKey(self, params: dict[str, Any], caller: Caller) -> dict[str, Any]:
        key = self._resolve(params)
        self._authorize(caller, "EnableKey", key, named=params.get("KeyId"))
        self._require_not_pending(key)
        self._require_material(key)
        with self.keystore.transaction() as db:
            self.keystore.update_key(db, key.key_id, key_state="Enabled")
        return {}

    def _op_DisableKey(self, params: dict[str, Any], caller: Caller) -> dict[str, Any]:
        key = self._resolve(params)
        self._authorize(caller, "DisableKey", key, named=params.get("KeyId"))
        self._require_not_pending(key)
        self._require_material(key)
        with self.keystore.transaction() as db:
            self.keystore.update_key(db, key.key_id, key_state="Disabled")
        return {}

    def _op_ScheduleKeyDeletion(self, params: dict[str, Any], caller: Caller) -> dict[str, Any]:
        key = self._resolve(params)
        days = _integer(params, "PendingWindowInDays", 7, 30) or 30
        self._authorize(caller, "ScheduleKeyDeletion", key, named=params.get("KeyId"))
        self._require_not_pending(key)
        deletion_date = self.clock() + days * DAY
        with self.keystore.transaction() as db:
            self.keystore.update_key(
                db,
                key.key_id,
                key_state="PendingDeletion",
                deletion_date=deletion_date,
                pending_window_days=days,
            )
        return {
            "KeyId": self.arn(key.key_id),
            "DeletionDate": deletion_date,
            "KeyState": "PendingDeletion",
            "PendingWindowInDays": days,
        }

    def _op_CancelKeyDeletion(self, params: dict[str, Any], caller: Caller) -> dict[str, Any]:
        key = self._resolve(params)
        self._authorize(caller, "CancelKeyDeletion", key, named=params.get("KeyId"))
        if key.key_state != "PendingDeletion":
            raise KMSInvalidStateException(f"{self.arn(key.key_id)} is not pending deletion.")
        # As AWS does: a key whose deletion is cancelled comes back Disabled (a key
        # for imported material that has none: PendingImport).
        state = "Disabled"
        if key.origin == "EXTERNAL" and not self.keystore.list_versions(key.key_id):
            state = "PendingImport"
        with self.keystore.transaction() as db:
            self.keystore.update_key(
                db, key.key_id, key_state=state, deletion_date=None, pending_window_days=None
            )
        return {"KeyId": self.arn(key.key_id)}

    # -------------------------------------------------------------- rotation
    def _op_EnableKeyRotation(self, params: dict[str, Any], caller: Caller) -> dict[str, Any]:
        key = self._resolve(params)
        period = _integer(params, "RotationPeriodInDays", 90, 2560) or 365
        self._authorize(caller, "EnableKeyRotation", key, named=params.get("KeyId"))
        self._require_rotatable(key, "EnableKeyRotation")
        self._require_usable(key)
        self._refuse_rotation_of_imported(key)
        with self.keystore.transaction() as db:
            self.keystore.update_key(
                db,
                key.key_id,
                rotation_enabled=True,
                rotation_period_days=period,
                next_rotation_date=self.clock() + period * DAY,
            )
        return {}

    def _op_DisableKeyRotation(self, params: dict[str, Any], caller: Caller) -> dict[str, Any]:
        key = self._resolve(params)
        self._authorize(caller, "DisableKeyRotation", key, named=params.get("KeyId"))
        self._require_rotatable(key, "DisableKeyRotation")
        self._require_usable(key)
        with self.keystore.transaction() as db:
            self.keystore.update_key(
                db,
                key.key_id,
                rotation_enabled=False,
                rotation_period_days=None,
                next_rotation_date=None,
            )
        return {}

    def _require_rotatable(self, key: KeyRecord, operation: str) -> None:
        """AWS: "Automatic key rotation is supported only on symmetric encryption KMS
        keys. You cannot enable automatic rotation of asymmetric KMS keys, HMAC KMS
        keys..." (EnableKeyRotation, DisableKeyRotation; RotateKeyOnDemand likewise):
        UnsupportedOperationException. GetKeyRotationStatus reports false for them."""
        if key.key_spec != "SYMMETRIC_DEFAULT":
            raise UnsupportedOperationException(
                f"{operation} is supported only on symmetric encryption KMS keys; "
                f"{self.arn(key.key_id)} has KeySpec {key.key_spec}"
            )

    def _op_GetKeyRotationStatus(self, params: dict[str, Any], caller: Caller) -> dict[str, Any]:
        key = self._resolve(params)
        self._authorize(caller, "GetKeyRotationStatus", key, named=params.get("KeyId"))
        # As AWS does: a key pending deletion reports rotation off; its schedule
        # comes back if the deletion is cancelled.
        enabled = key.rotation_enabled and key.key_state != "PendingDeletion"
        response: dict[str, Any] = {"KeyId": self.arn(key.key_id), "KeyRotationEnabled": enabled}
        if enabled:
            response["RotationPeriodInDays"] = key.rotation_period_days
            response["NextRotationDate"] = key.next_rotation_date
        return response

    def _op_RotateKeyOnDemand(self, params: dict[str, Any], caller: Caller) -> dict[str, Any]:
        key = self._resolve(params)
        self._authorize(caller, "RotateKeyOnDemand", key, named=params.get("KeyId"))
        self._require_rotatable(key, "RotateKeyOnDemand")
        self._require_usable(key)
        self._refuse_rotation_of_imported(key)
        self._add_version(key, "ON_DEMAND", self.clock())
        return {"KeyId": self.arn(key.key_id)}

    def _op_ListKeyRotations(self, params: dict[str, Any], caller: Caller) -> dict[str, Any]:
        key = self._resolve(params)
        self._authorize(caller, "ListKeyRotations", key, named=params.get("KeyId"))
        self._require_not_pending(key)
        rotations = [
            {
                "KeyId": self.arn(key.key_id),
                "RotationDate": version.created,
                "RotationType": version.rotation_type,
            }
            for version in self.keystore.list_versions(key.key_id)
            if version.version > 1
        ]
        page, extra = self._page(params, rotations, 100, 1000)
        return {"Rotations": page, **extra}

    # ------------------------------------------------------------ cryptography
    def _encryption_algorithm(self, params: dict[str, Any], name: str) -> str:
        return _string(params, name, choices=_ENCRYPTION_ALGORITHMS) or "SYMMETRIC_DEFAULT"

    def _op_Encrypt(self, params: dict[str, Any], caller: Caller) -> dict[str, Any]:
        key = self._resolve(params)
        plaintext = _binary(params, "Plaintext", MAX_PLAINTEXT)
        context = _context(params, "EncryptionContext")
        algorithm = self._encryption_algorithm(params, "EncryptionAlgorithm")
        self._check_encryption_key(key, algorithm, context, "Encrypt")
        assert plaintext is not None
        if algorithm != "SYMMETRIC_DEFAULT":
            # the plaintext limit of the key size and OAEP hash, before anything runs
            limit = asymmetric.max_plaintext(key.key_spec, algorithm)
            if len(plaintext) > limit:
                raise ValidationException(
                    f"Plaintext is {len(plaintext)} bytes; the maximum for KeySpec "
                    f"{key.key_spec} with {algorithm} is {limit} bytes"
                )
        self._authorize(caller, "Encrypt", key, context, params.get("KeyId"))
        self._require_usable(key)
        _dry_run(params)
        if algorithm == "SYMMETRIC_DEFAULT":
            blob = self._seal(key, plaintext, context)
        else:
            blob = self._rsa_encrypt(key, algorithm, plaintext)
        return {
            "CiphertextBlob": base64.b64encode(blob).decode(),
            "KeyId": self.arn(key.key_id),
            "EncryptionAlgorithm": algorithm,
        }

    def _op_Decrypt(self, params: dict[str, Any], caller: Caller) -> dict[str, Any]:
        blob = _binary(params, "CiphertextBlob", MAX_CIPHERTEXT)
        context = _context(params, "EncryptionContext")
        expected = self._resolve(params) if params.get("KeyId") is not None else None
        algorithm = self._encryption_algorithm(params, "EncryptionAlgorithm")
        if params.get("Recipient") is not None:
            raise UnsupportedOperationException("Recipient (Nitro Enclaves) is not supported")
        assert blob is not None

        def authorize(key: KeyRecord) -> None:
            self._authorize(caller, "Decrypt", key, context, params.get("KeyId"))

        if algorithm == "SYMMETRIC_DEFAULT":
            if expected is not None:
                self._check_encryption_key(expected, algorithm, context, "Decrypt")
            key, plaintext = self._open(blob, context, expected, authorize)
        else:
            # AWS Decrypt: "If you used an asymmetric KMS key, you must specify KeyId":
            # raw RSA ciphertext does not name its key
            if expected is None:
                named = self._blob_key(blob)
                if named is not None:  # a symmetric blob: the algorithm cannot open it
                    self._check_encryption_key(named, algorithm, context, "Decrypt")
                raise ValidationException(
                    f"KeyId is required to decrypt with EncryptionAlgorithm {algorithm}"
                )
            key = expected
            plaintext = self._rsa_open(key, algorithm, blob, context, "Decrypt", authorize)
        _dry_run(params)
        return {
            "KeyId": self.arn(key.key_id),
            "Plaintext": base64.b64encode(plaintext).decode(),
            "EncryptionAlgorithm": algorithm,
        }

    def _op_ReEncrypt(self, params: dict[str, Any], caller: Caller) -> dict[str, Any]:
        blob = _binary(params, "CiphertextBlob", MAX_CIPHERTEXT)
        source_context = _context(params, "SourceEncryptionContext")
        destination_context = _context(params, "DestinationEncryptionContext")
        source_expected = (
            self._resolve(params, "SourceKeyId") if params.get("SourceKeyId") is not None else None
        )
        destination = self._resolve(params, "DestinationKeyId")
        source_algorithm = self._encryption_algorithm(params, "SourceEncryptionAlgorithm")
        destination_algorithm = self._encryption_algorithm(params, "DestinationEncryptionAlgorithm")
        self._check_encryption_key(
            destination, destination_algorithm, destination_context, "ReEncrypt"
        )
        if source_expected is not None:
            self._check_encryption_key(
                source_expected, source_algorithm, source_context, "ReEncrypt"
            )
        elif source_algorithm != "SYMMETRIC_DEFAULT":
            raise ValidationException(
                f"SourceKeyId is required to decrypt with SourceEncryptionAlgorithm "
                f"{source_algorithm}"
            )
        assert blob is not None
        self._authorize(
            caller,
            "ReEncryptTo",
            destination,
            destination_context,
            params.get("DestinationKeyId"),
        )

        def authorize(key: KeyRecord) -> None:
            self._authorize(caller, "ReEncryptFrom", key, source_context, params.get("SourceKeyId"))

        if source_algorithm == "SYMMETRIC_DEFAULT":
            source, plaintext = self._open(blob, source_context, source_expected, authorize)
        else:
            assert source_expected is not None
            source = source_expected
            plaintext = self._rsa_open(
                source, source_algorithm, blob, source_context, "ReEncrypt", authorize
            )
        self._require_usable(destination)
        if destination_algorithm != "SYMMETRIC_DEFAULT":
            limit = asymmetric.max_plaintext(destination.key_spec, destination_algorithm)
            if len(plaintext) > limit:
                raise ValidationException(
                    f"the plaintext is {len(plaintext)} bytes; the maximum for KeySpec "
                    f"{destination.key_spec} with {destination_algorithm} is {limit} bytes"
                )
        _dry_run(params)
        if destination_algorithm == "SYMMETRIC_DEFAULT":
            new_blob = self._seal(destination, plaintext, destination_context)
        else:
            new_blob = self._rsa_encrypt(destination, destination_algorithm, plaintext)
        return {
            "CiphertextBlob": base64.b64encode(new_blob).decode(),
            "SourceKeyId": self.arn(source.key_id),
            "KeyId": self.arn(destination.key_id),
            "SourceEncryptionAlgorithm": source_algorithm,
            "DestinationEncryptionAlgorithm": destination_algorithm,
        }

    def _data_key(
        self, params: dict[str, Any], caller: Caller, operation: str
    ) -> tuple[KeyRecord, bytes, bytes]:
        key = self._resolve(params)
        context = _context(params, "EncryptionContext")
        key_spec = _string(params, "KeySpec", choices=set(_DATA_KEY_SPECS))
        number_of_bytes = _integer(params, "NumberOfBytes", 1, MAX_DATA_KEY_BYTES)
        if (key_spec is None) == (number_of_bytes is None):
            raise ValidationException("Please specify either KeySpec or NumberOfBytes, not both")
        if params.get("Recipient") is not None:
            raise UnsupportedOperationException("Recipient (Nitro Enclaves) is not supported")
        self._check_encryption_key(key, "SYMMETRIC_DEFAULT", context, operation)
        self._authorize(caller, operation, key, context, params.get("KeyId"))
        self._require_usable(key)
        _dry_run(params)
        data_key = os.urandom(number_of_bytes or _DATA_KEY_SPECS[key_spec or "AES_256"])
        return key, data_key, self._seal(key, data_key, context)

    def _op_GenerateDataKey(self, params: dict[str, Any], caller: Caller) -> dict[str, Any]:
        key, data_key, blob = self._data_key(params, caller, "GenerateDataKey")
        return {
            "CiphertextBlob": base64.b64encode(blob).decode(),
            "Plaintext": base64.b64encode(data_key).decode(),
            "KeyId": self.arn(key.key_id),
        }

    def _op_GenerateDataKeyWithoutPlaintext(
        self, params: dict[str, Any], caller: Caller
    ) -> dict[str, Any]:
        key, _data_key, blob = self._data_key(params, caller, "GenerateDataKeyWithoutPlaintext")
        return {"CiphertextBlob": base64.b64encode(blob).decode(), "KeyId": self.arn(key.key_id)}

    # ------------------------------------------------ asymmetric and HMAC keys
    def _data_key_pair(
        self, params: dict[str, Any], caller: Caller, operation: str
    ) -> tuple[KeyRecord, str, bytes, bytes, bytes]:
        """GenerateDataKeyPair(WithoutPlaintext): a new RSA or ECC key pair whose private
        key (PKCS#8 DER) is sealed under a symmetric encryption CMK with the encryption
        context, as AWS KMS does. Returns the CMK, the pair spec, the private key, its
        sealed blob and the public key (SubjectPublicKeyInfo DER)."""
        key = self._resolve(params)
        context = _context(params, "EncryptionContext")
        pair_spec = _string(
            params, "KeyPairSpec", required=True, choices=set(asymmetric.KEY_PAIR_SPECS)
        )
        assert pair_spec is not None
        if pair_spec == "SM2":
            raise UnsupportedOperationException(
                "KeyPairSpec SM2 is available only in AWS China Regions"
            )
        if params.get("Recipient") is not None:
            raise UnsupportedOperationException("Recipient (Nitro Enclaves) is not supported")
        # AWS: the KMS key must be a symmetric encryption key (InvalidKeyUsageException)
        self._check_encryption_key(key, "SYMMETRIC_DEFAULT", context, operation)
        self._authorize(caller, operation, key, context, params.get("KeyId"))
        self._require_usable(key)
        _dry_run(params)
        prepared = self._take_prepared(operation, pair_spec)
        private_der, public_der = prepared or asymmetric.generate_key_pair_der(pair_spec)
        blob = self._seal(key, private_der, context)
        return key, pair_spec, private_der, blob, public_der

    def _op_GenerateDataKeyPair(self, params: dict[str, Any], caller: Caller) -> dict[str, Any]:
        key, pair_spec, private_der, blob, public_der = self._data_key_pair(
            params, caller, "GenerateDataKeyPair"
        )
        return {
            "PrivateKeyCiphertextBlob": base64.b64encode(blob).decode(),
            "PrivateKeyPlaintext": base64.b64encode(private_der).decode(),
            "PublicKey": base64.b64encode(public_der).decode(),
            "KeyId": self.arn(key.key_id),
            "KeyPairSpec": pair_spec,
        }

    def _op_GenerateDataKeyPairWithoutPlaintext(
        self, params: dict[str, Any], caller: Caller
    ) -> dict[str, Any]:
        key, pair_spec, _private_der, blob, public_der = self._data_key_pair(
            params, caller, "GenerateDataKeyPairWithoutPlaintext"
        )
        return {
            "PrivateKeyCiphertextBlob": base64.b64encode(blob).decode(),
            "PublicKey": base64.b64encode(public_der).decode(),
            "KeyId": self.arn(key.key_id),
            "KeyPairSpec": pair_spec,
        }

    def _op_GetPublicKey(self, params: dict[str, Any], caller: Caller) -> dict[str, Any]:
        key = self._resolve(params)
        self._authorize(caller, "GetPublicKey", key, named=params.get("KeyId"))
        if not asymmetric.is_asymmetric(key.key_spec):
            # AWS: GetPublicKey "Returns the public key of an asymmetric KMS key"
            raise UnsupportedOperationException(
                f"GetPublicKey is supported only on asymmetric KMS keys; "
                f"{self.arn(key.key_id)} has KeySpec {key.key_spec}"
            )
        self._require_usable(key)
        public_der = asymmetric.public_key_der(self._private_key(key))
        return {
            "KeyId": self.arn(key.key_id),
            "PublicKey": base64.b64encode(public_der).decode(),
            "CustomerMasterKeySpec": key.key_spec,
            "KeySpec": key.key_spec,
            "KeyUsage": key.key_usage,
            **asymmetric.algorithm_fields(key.key_spec, key.key_usage),
        }

    def _signing_request(
        self, params: dict[str, Any], operation: str
    ) -> tuple[KeyRecord, bytes, str, str]:
        """The checked members of Sign/Verify: key, message, message type, algorithm."""
        key = self._resolve(params)
        message = _binary(params, "Message", asymmetric.MAX_MESSAGE)
        message_type = (
            _string(params, "MessageType", choices=set(asymmetric.MESSAGE_TYPES)) or "RAW"
        )
        algorithm = _string(
            params, "SigningAlgorithm", required=True, choices=set(asymmetric.SIGNING_ALGORITHMS)
        )
        assert message is not None and algorithm is not None
        asymmetric.require_usage(key.key_spec, key.key_usage, "SIGN_VERIFY", operation)
        asymmetric.require_algorithm(
            "SigningAlgorithm",
            algorithm,
            asymmetric.signing_algorithms(key.key_spec, key.key_usage),
            key.key_spec,
        )
        if message_type == "EXTERNAL_MU":
            raise ValidationException("MessageType EXTERNAL_MU is valid only for ML-DSA keys")
        asymmetric.digest_for(algorithm, message, message_type)  # DIGEST length check
        return key, message, message_type, algorithm

    def _op_Sign(self, params: dict[str, Any], caller: Caller) -> dict[str, Any]:
        key, message, message_type, algorithm = self._signing_request(params, "Sign")
        self._authorize(caller, "Sign", key, named=params.get("KeyId"))
        self._require_usable(key)
        _dry_run(params)
        signature = asymmetric.sign(self._private_key(key), algorithm, message, message_type)
        return {
            "KeyId": self.arn(key.key_id),
            "Signature": base64.b64encode(signature).decode(),
            "SigningAlgorithm": algorithm,
        }

    def _op_Verify(self, params: dict[str, Any], caller: Caller) -> dict[str, Any]:
        key, message, message_type, algorithm = self._signing_request(params, "Verify")
        signature = _binary(params, "Signature", asymmetric.MAX_SIGNATURE)
        assert signature is not None
        self._authorize(caller, "Verify", key, named=params.get("KeyId"))
        self._require_usable(key)
        _dry_run(params)
        if not asymmetric.verify(
            self._private_key(key), algorithm, message, message_type, signature
        ):
            # AWS Verify: an invalid signature is KMSInvalidSignatureException, never
            # SignatureValid false
            raise KMSInvalidSignatureException("The signature is not valid.")
        return {
            "KeyId": self.arn(key.key_id),
            "SignatureValid": True,
            "SigningAlgorithm": algorithm,
        }

    def _mac_request(self, params: dict[str, Any], operation: str) -> tuple[KeyRecord, bytes, str]:
        key = self._resolve(params)
        message = _binary(params, "Message", asymmetric.MAX_MESSAGE)
        algorithm = _string(
            params, "MacAlgorithm", required=True, choices=set(asymmetric.MAC_ALGORITHMS)
        )
        assert message is not None and algorithm is not None
        asymmetric.require_usage(key.key_spec, key.key_usage, "GENERATE_VERIFY_MAC", operation)
        asymmetric.require_algorithm(
            "MacAlgorithm",
            algorithm,
            asymmetric.mac_algorithms(key.key_spec, key.key_usage),
            key.key_spec,
        )
        return key, message, algorithm

    def _op_GenerateMac(self, params: dict[str, Any], caller: Caller) -> dict[str, Any]:
        key, message, algorithm = self._mac_request(params, "GenerateMac")
        self._authorize(caller, "GenerateMac", key, named=params.get("KeyId"))
        self._require_usable(key)
        _dry_run(params)
        mac = asymmetric.generate_mac(self._material(key), algorithm, message)
        return {
            "Mac": base64.b64encode(mac).decode(),
            "MacAlgorithm": algorithm,
            "KeyId": self.arn(key.key_id),
        }

    def _op_VerifyMac(self, params: dict[str, Any], caller: Caller) -> dict[str, Any]:
        key, message, algorithm = self._mac_request(params, "VerifyMac")
        mac = _binary(params, "Mac", asymmetric.MAX_SIGNATURE)
        assert mac is not None
        self._authorize(caller, "VerifyMac", key, named=params.get("KeyId"))
        self._require_usable(key)
        _dry_run(params)
        if not asymmetric.verify_mac(self._material(key), algorithm, message, mac):
            # AWS VerifyMac: a wrong MAC is KMSInvalidMacException
            raise KMSInvalidMacException("The MAC is not valid.")
        return {"KeyId": self.arn(key.key_id), "MacValid": True, "MacAlgorithm": algorithm}

    def _op_DeriveSharedSecret(self, params: dict[str, Any], caller: Caller) -> dict[str, Any]:
        key = self._resolve(params)
        algorithm = _string(
            params,
            "KeyAgreementAlgorithm",
            required=True,
            choices=set(asymmetric.KEY_AGREEMENT_ALGORITHMS),
        )
        peer = _binary(params, "PublicKey", asymmetric.MAX_PUBLIC_KEY)
        assert peer is not None and algorithm is not None
        if params.get("Recipient") is not None:
            raise UnsupportedOperationException("Recipient (Nitro Enclaves) is not supported")
        asymmetric.require_usage(key.key_spec, key.key_usage, "KEY_AGREEMENT", "DeriveSharedSecret")
        peer_key = asymmetric.load_peer_public_key(key.key_spec, peer)
        self._authorize(caller, "DeriveSharedSecret", key, named=params.get("KeyId"))
        self._require_usable(key)
        _dry_run(params)
        secret = asymmetric.derive_shared_secret(self._private_key(key), peer_key)
        return {
            "KeyId": self.arn(key.key_id),
            "SharedSecret": base64.b64encode(secret).decode(),
            "KeyAgreementAlgorithm": algorithm,
            "KeyOrigin": key.origin,
        }

    def _op_GenerateRandom(self, params: dict[str, Any], caller: Caller) -> dict[str, Any]:
        count = _integer(params, "NumberOfBytes", 1, MAX_DATA_KEY_BYTES, required=True)
        self._authorize_account_level(caller, "GenerateRandom")
        if params.get("CustomKeyStoreId") is not None:
            raise UnsupportedOperationException("custom key stores are not supported")
        if params.get("Recipient") is not None:
            raise UnsupportedOperationException("Recipient (Nitro Enclaves) is not supported")
        assert count is not None
        return {"Plaintext": base64.b64encode(os.urandom(count)).decode()}

    def _op_GetCallerIdentity(self, params: dict[str, Any], caller: Caller) -> dict[str, Any]:
        """kmsfs's own operation (target ``TrentService.GetCallerIdentity``), shaped after
        STS GetCallerIdentity: who keyd takes the caller for. Audited like other reads."""
        return self.principal(caller).caller_identity()

    # ---------------------------------------------------------------- aliases
    def _alias_name(self, params: dict[str, Any]) -> str:
        name = _string(params, "AliasName", required=True, max_len=256)
        assert name is not None
        if not _ALIAS_RE.fullmatch(name):
            raise InvalidAliasNameException(
                f"Alias name {name!r} must begin with 'alias/' followed by letters, digits, "
                "'/', '_' or '-'"
            )
        return name

    def _alias_target(self, params: dict[str, Any]) -> KeyRecord:
        key = self._resolve(params, "TargetKeyId", allow_alias=False)
        self._require_not_pending(key)
        return key

    def _op_CreateAlias(self, params: dict[str, Any], caller: Caller) -> dict[str, Any]:
        name = self._alias_name(params)
        if name.startswith("alias/aws/"):
            raise InvalidAliasNameException("Alias names beginning with 'alias/aws/' are reserved")
        key = self._alias_target(params)
        self._authorize(caller, "CreateAlias", key)
        now = self.clock()
        with self.keystore.transaction() as db:
            if self.keystore.get_alias(name) is not None:
                raise AlreadyExistsException(
                    f"An alias with the name {self.alias_arn(name)} already exists"
                )
            db.execute(
                "INSERT INTO aliases (alias_name, key_id, creation_date, last_updated) "
                "VALUES (?, ?, ?, ?)",
                (name, key.key_id, now, now),
            )
        return {}

    def _op_UpdateAlias(self, params: dict[str, Any], caller: Caller) -> dict[str, Any]:
        name = self._alias_name(params)
        key = self._alias_target(params)
        current = self.keystore.get_alias(name)
        if current is None:
            raise NotFoundException(f"Alias {self.alias_arn(name)} is not found.")
        # as AWS: kms:UpdateAlias on the key the alias leaves and on the one it gets
        old_key = self.keystore.get_key(current.key_id)
        if old_key is not None:
            self._authorize(caller, "UpdateAlias", old_key)
        self._authorize(caller, "UpdateAlias", key)
        with self.keystore.transaction() as db:
            if self.keystore.get_alias(name) is None:
                raise NotFoundException(f"Alias {self.alias_arn(name)} is not found.")
            db.execute(
                "UPDATE aliases SET key_id = ?, last_updated = ? WHERE alias_name = ?",
                (key.key_id, self.clock(), name),
            )
        return {}

    def _op_DeleteAlias(self, params: dict[str, Any], caller: Caller) -> dict[str, Any]:
        name = self._alias_name(params)
        current = self.keystore.get_alias(name)
        target = self.keystore.get_key(current.key_id) if current is not None else None
        if target is not None:
            self._authorize(caller, "DeleteAlias", target)
        with self.keystore.transaction() as db:
            if db.execute("DELETE FROM aliases WHERE alias_name = ?", (name,)).rowcount == 0:
                raise NotFoundException(f"Alias {self.alias_arn(name)} is not found.")
        return {}

    def _op_ListAliases(self, params: dict[str, Any], caller: Caller) -> dict[str, Any]:
        key_id = None
        if params.get("KeyId") is not None:
            key_id = self._resolve(params, allow_alias=False).key_id
        # Only aliases of keys the caller may DescribeKey (kmsfs: AWS's ListAliases is
        # governed by IAM policies only).
        visible: dict[str, bool] = {}

        def may_see(target: str) -> bool:
            if target not in visible:
                key = self.keystore.get_key(target)
                visible[target] = key is not None and self._may_describe(caller, key)
            return visible[target]

        aliases = [
            {
                "AliasName": alias.alias_name,
                "AliasArn": self.alias_arn(alias.alias_name),
                "TargetKeyId": alias.key_id,
                "CreationDate": alias.creation_date,
                "LastUpdatedDate": alias.last_updated,
            }
            for alias in self.keystore.list_aliases(key_id)
            if may_see(alias.key_id)
        ]
        page, extra = self._page(params, aliases, 50, 100)
        return {"Aliases": page, **extra}

    # ------------------------------------------------------------------- tags
    @staticmethod
    def _parse_tags(params: dict[str, Any]) -> list[tuple[str, str]]:
        raw = _field(params, "Tags", list, False) or []
        tags: dict[str, str] = {}
        for tag in raw:
            if not isinstance(tag, dict):
                raise ValidationException("each tag must be an object with TagKey and TagValue")
            tag_key = _string(tag, "TagKey", required=True, max_len=128)
            tag_value = _string(tag, "TagValue", required=True, min_len=0, max_len=256)
            assert tag_key is not None and tag_value is not None
            if tag_key.startswith("aws:"):
                raise TagException("Tag keys beginning with 'aws:' are reserved")
            tags[tag_key] = tag_value
        if len(tags) > MAX_TAGS:
            raise TagException(f"a key can have at most {MAX_TAGS} tags")
        return sorted(tags.items())

    def _op_TagResource(self, params: dict[str, Any], caller: Caller) -> dict[str, Any]:
        key = self._resolve(params, allow_alias=False)
        self._authorize(caller, "TagResource", key)
        self._require_not_pending(key)
        tags = self._parse_tags(params)
        if not tags:
            raise ValidationException("1 validation error detected: Tags is required")
        with self.keystore.transaction() as db:
            db.executemany(
                "INSERT OR REPLACE INTO tags (key_id, tag_key, tag_value) VALUES (?, ?, ?)",
                [(key.key_id, tag_key, tag_value) for tag_key, tag_value in tags],
            )
            count = db.execute(
                "SELECT COUNT(*) FROM tags WHERE key_id = ?", (key.key_id,)
            ).fetchone()[0]
            if count > MAX_TAGS:
                raise TagException(f"a key can have at most {MAX_TAGS} tags")
        return {}

    def _op_UntagResource(self, params: dict[str, Any], caller: Caller) -> dict[str, Any]:
        key = self._resolve(params, allow_alias=False)
        self._authorize(caller, "UntagResource", key)
        self._require_not_pending(key)
        tag_keys = _field(params, "TagKeys", list, True)
        if not tag_keys or not all(isinstance(tag_key, str) for tag_key in tag_keys):
            raise ValidationException("TagKeys must be a non-empty list of strings")
        with self.keystore.transaction() as db:
            db.executemany(
                "DELETE FROM tags WHERE key_id = ? AND tag_key = ?",
                [(key.key_id, tag_key) for tag_key in tag_keys],
            )
        return {}

    def _op_ListResourceTags(self, params: dict[str, Any], caller: Caller) -> dict[str, Any]:
        key = self._resolve(params, allow_alias=False)
        self._authorize(caller, "ListResourceTags", key)
        tags = [{"TagKey": k, "TagValue": v} for k, v in self.keystore.list_tags(key.key_id)]
        page, extra = self._page(params, tags, 50, 50)
        return {"Tags": page, **extra}

    # ------------------------------------------------------------------ audit
    def _audit_event(
        self,
        operation: str,
        params: dict[str, Any],
        caller: Caller,
        request_id: str,
        started: float,
        response: dict[str, Any] | None,
        error: KMSError | None,
    ) -> dict[str, Any]:
        principal = self.principal(caller)
        event: dict[str, Any] = {
            "eventVersion": "1.08",
            # CloudTrail's userIdentity (type IAMUser or Root, principalId, arn,
            # accountId, userName) plus kmsfs's uid, gid, pid and executable
            "userIdentity": principal.user_identity(),
            "eventTime": _iso(started),
            "eventSource": "kms.amazonaws.com",
            "eventName": operation,
            "awsRegion": self.region,
            "requestParameters": (
                _safe_request_fields(operation, params) if isinstance(params, dict) else None
            ),
            "responseElements": _safe_fields(response) if response else None,
            "requestID": request_id,
            "eventID": random_uuid(),
            "readOnly": operation.startswith(("Describe", "List", "Get")),
            "eventType": "AwsApiCall",
            "recipientAccountId": self.account,
        }
        if caller.source_ip is not None:  # CloudTrail's field; network callers only
            event["sourceIPAddress"] = caller.source_ip
        key_arn = _key_arn_of(response) or getattr(error, "resource_arn", None)
        if key_arn is None and self._grant_key_id is not None:
            key_arn = self.arn(self._grant_key_id)  # RetireGrant by token names no key
        if key_arn:
            event["resources"] = [
                {"accountId": self.account, "type": "AWS::KMS::Key", "ARN": key_arn}
            ]
        if error is not None:
            event["errorCode"] = error.aws_type
            event["errorMessage"] = error.message
        if self._grant_ids:
            # CloudTrail: the grant that allowed the call (or that RetireGrant retired)
            ids = list(dict.fromkeys(self._grant_ids))
            event["additionalEventData"] = {"grantId": ids[0] if len(ids) == 1 else ids}
        if caller.forwarded_header is not None:  # refused: the claim is not trusted
            event.setdefault("additionalEventData", {})["forwardedCallerRefused"] = True
        forwarded_by = principal.forwarded_event_data()
        if forwarded_by is not None:
            event.setdefault("additionalEventData", {})["forwardedBy"] = forwarded_by
        return event

    def _service_event(self, name: str, key_id: str | None) -> dict[str, Any]:
        """An event keyd itself causes (deletion at the end of the window, auto-rotation,
        a gap in the log)."""
        now = self.clock()
        event: dict[str, Any] = {
            "eventVersion": "1.08",
            "userIdentity": {"type": "AWSService", "invokedBy": "keyd"},
            "eventTime": _iso(now),
            "eventSource": "kms.amazonaws.com",
            "eventName": name,
            "awsRegion": self.region,
            "requestParameters": {"keyId": self.arn(key_id)} if key_id else None,
            "responseElements": None,
            "eventID": random_uuid(),
            "readOnly": False,
        }
        if key_id:
            event["resources"] = [
                {"accountId": self.account, "type": "AWS::KMS::Key", "ARN": self.arn(key_id)}
            ]
        event["eventType"] = "AwsServiceEvent"
        event["recipientAccountId"] = self.account
        return event


#: AWS KMS condition keys an operation's own members set: (action, key, member,
#: value when the member is absent). kms:EncryptionAlgorithm is SYMMETRIC_DEFAULT when a
#: symmetric request names none, as for AWS's default algorithm.
_ALGORITHM_KEYS: dict[str, tuple[tuple[str, str | None, str | None], ...]] = {
    "kms:Encrypt": (("kms:EncryptionAlgorithm", "EncryptionAlgorithm", "SYMMETRIC_DEFAULT"),),
    "kms:Decrypt": (("kms:EncryptionAlgorithm", "EncryptionAlgorithm", "SYMMETRIC_DEFAULT"),),
    "kms:GenerateDataKey": (("kms:EncryptionAlgorithm", None, "SYMMETRIC_DEFAULT"),),
    "kms:GenerateDataKeyWithoutPlaintext": (
        ("kms:EncryptionAlgorithm", None, "SYMMETRIC_DEFAULT"),
    ),
    "kms:ReEncryptFrom": (
        ("kms:EncryptionAlgorithm", "SourceEncryptionAlgorithm", "SYMMETRIC_DEFAULT"),
    ),
    "kms:ReEncryptTo": (
        ("kms:EncryptionAlgorithm", "DestinationEncryptionAlgorithm", "SYMMETRIC_DEFAULT"),
    ),
    "kms:Sign": (
        ("kms:SigningAlgorithm", "SigningAlgorithm", None),
        ("kms:MessageType", "MessageType", "RAW"),
    ),
    "kms:Verify": (
        ("kms:SigningAlgorithm", "SigningAlgorithm", None),
        ("kms:MessageType", "MessageType", "RAW"),
    ),
    "kms:GenerateMac": (("kms:MacAlgorithm", "MacAlgorithm", None),),
    "kms:VerifyMac": (("kms:MacAlgorithm", "MacAlgorithm", None),),
    "kms:DeriveSharedSecret": (("kms:KeyAgreementAlgorithm", "KeyAgreementAlgorithm", None),),
    "kms:GenerateDataKeyPair": (("kms:DataKeyPairSpec", "KeyPairSpec", None),),
    "kms:GenerateDataKeyPairWithoutPlaintext": (("kms:DataKeyPairSpec", "KeyPairSpec", None),),
}


def _algorithm_keys(action: str, params: dict[str, Any]) -> dict[str, str]:
    keys: dict[str, str] = {}
    for name, member, default in _ALGORITHM_KEYS.get(action, ()):
        value = params.get(member) if member else None
        value = value if isinstance(value, str) else default
        if value is not None:
            keys[name] = value
    return keys


def _other_arns(principal: Principal) -> tuple[str, ...]:
    """The ARNs besides ``principal.arn`` that name the caller in a key policy's
    Principal: for uid 0, ``...:user/<its login name>`` besides the root ARN."""
    return principal.arns[1:] if principal.is_root else ()


def _safe_fields(values: dict[str, Any]) -> dict[str, Any]:
    return {_camel(name): value for name, value in values.items() if name in _AUDITED_FIELDS}


def _safe_request_fields(operation: str, params: dict[str, Any]) -> dict[str, Any]:
    """The audited members of a request: members of this operation only (unknown ones
    are ignored, see REQUEST_MEMBERS), and of the right type (a wrongly typed value,
    which may nest a thousand levels deep, is recorded by its type name only)."""
    members = REQUEST_MEMBERS.get(operation, {})
    fields: dict[str, Any] = {}
    for name, value in params.items():
        kind = members.get(name)
        if kind is None or name not in _AUDITED_FIELDS or value is None:
            continue
        try:
            _check_member(name, value, kind)
        except SerializationException:
            value = "<" + _JSON_TYPE_NAMES.get(type(value), type(value).__name__) + ">"
        fields[_camel(name)] = value
    return fields


def _storage_reason(exc: BaseException) -> str:
    """A short reason for a failed write: the OS error's text, else the message."""
    cause: BaseException | None = exc
    while cause is not None and not isinstance(cause, OSError):
        cause = cause.__cause__
    if isinstance(cause, OSError) and cause.errno is not None:
        return os.strerror(cause.errno)
    return str(exc) or type(exc).__name__


def _key_arn_of(response: dict[str, Any] | None) -> str | None:
    if not response:
        return None
    metadata = response.get("KeyMetadata")
    if isinstance(metadata, dict):
        return metadata.get("Arn")
    key_id = response.get("KeyId")
    return key_id if isinstance(key_id, str) and key_id.startswith("arn:") else None
