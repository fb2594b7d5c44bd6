"""Unit tests of kmsfs.kms.service.KeyService: the AWS KMS operations, with no I/O.

Every test runs the service in-process over a fresh keystore protected by a root key
file, with a fake clock (a mutable float) and an audit sink that is a plain list.
Expected names, parameters, limits and error types are AWS KMS's (API reference).
"""

from __future__ import annotations

import base64
import json
import sqlite3
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kmsfs.errors import (
    AlreadyExistsException,
    DisabledException,
    DryRunOperationException,
    IncorrectKeyException,
    InvalidAliasNameException,
    InvalidCiphertextException,
    InvalidKeyUsageException,
    InvalidMarkerException,
    KMSError,
    KMSInternalException,
    KMSInvalidStateException,
    NotFoundException,
    SerializationException,
    TagException,
    UnknownOperationException,
    UnsupportedOperationException,
    ValidationException,
)
from kmsfs.kms.caller import Caller
from kmsfs.kms.keystore import DB_NAME, Keystore, RootKeySource
from kmsfs.kms.service import DAY, KeyService, encode_encryption_context

START = 1_700_000_000.0  # 2023-11-14T22:13:20Z
CALLER = Caller(uid=4321, gid=8765, pid=24680)
REGION = "eu-test-1"
ACCOUNT = "123456789012"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def unb64(text: str) -> bytes:
    return base64.b64decode(text)


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self, now: float = START) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Harness:
    """One KeyService over a fresh keystore, with helpers for the common calls."""

    def __init__(self, keystore: Keystore, clock: FakeClock) -> None:
        self.keystore = keystore
        self.clock = clock
        self.events: list[dict[str, Any]] = []
        self.service = KeyService(keystore, self.events, clock=clock)
        self.requests = 0
        self.decoy: str | None = None

    @property
    def db_path(self) -> Path:
        return self.keystore.path / DB_NAME

    def call(self, operation: str, **params: Any) -> dict[str, Any]:
        self.requests += 1
        return self.service.handle(operation, params, CALLER, f"req-{self.requests}")

    def arn(self, key_id: str) -> str:
        return f"arn:aws:kms:{REGION}:{ACCOUNT}:key/{key_id}"

    def alias_arn(self, alias_name: str) -> str:
        return f"arn:aws:kms:{REGION}:{ACCOUNT}:{alias_name}"

    def create_key(self, **params: Any) -> str:
        return self.call("CreateKey", **params)["KeyMetadata"]["KeyId"]

    def describe(self, key_id: str) -> dict[str, Any]:
        return self.call("DescribeKey", KeyId=key_id)["KeyMetadata"]

    def encrypt(
        self, key_id: str, plaintext: bytes = b"secret", context: dict[str, str] | None = None
    ) -> str:
        params: dict[str, Any] = {"KeyId": key_id, "Plaintext": b64(plaintext)}
        if context is not None:
            params["EncryptionContext"] = context
        return self.call("Encrypt", **params)["CiphertextBlob"]

    def decrypt(self, blob: str, context: dict[str, str] | None = None, **params: Any) -> bytes:
        if context is not None:
            params["EncryptionContext"] = context
        return unb64(self.call("Decrypt", CiphertextBlob=blob, **params)["Plaintext"])

    def rows(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        """Read the database file directly, through a connection of its own."""
        db = sqlite3.connect(self.db_path)
        try:
            return db.execute(sql, args).fetchall()
        finally:
            db.close()


def make_harness(path: Path) -> Harness:
    keystore = Keystore.create(
        path / "ks", RootKeySource.from_key_file(path / "root.key"), region=REGION, account=ACCOUNT
    )
    return Harness(keystore, FakeClock())


@pytest.fixture
def kms(tmp_path: Path) -> Iterator[Harness]:
    harness = make_harness(tmp_path)
    try:
        yield harness
    finally:
        harness.keystore.close()


@pytest.fixture(scope="module")
def shared_kms(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Harness, str]]:
    """One service and key for property tests (their examples do not depend on its state)."""
    harness = make_harness(tmp_path_factory.mktemp("shared"))
    try:
        yield harness, harness.create_key()
    finally:
        harness.keystore.close()


def blob_version(blob: str) -> int:
    return int.from_bytes(unb64(blob)[17:21], "big")


# ---------------------------------------------------------------- CreateKey
def test_create_key_defaults(kms: Harness) -> None:
    metadata = kms.call("CreateKey")["KeyMetadata"]
    key_id = metadata["KeyId"]
    assert str(uuid.UUID(key_id)) == key_id
    assert metadata == {
        "AWSAccountId": ACCOUNT,
        "KeyId": key_id,
        "Arn": kms.arn(key_id),
        "CreationDate": START,
        "Enabled": True,
        "Description": "",
        "KeyUsage": "ENCRYPT_DECRYPT",
        "KeyState": "Enabled",
        "Origin": "AWS_KMS",
        "KeyManager": "CUSTOMER",
        "CustomerMasterKeySpec": "SYMMETRIC_DEFAULT",
        "KeySpec": "SYMMETRIC_DEFAULT",
        "EncryptionAlgorithms": ["SYMMETRIC_DEFAULT"],
        "MultiRegion": False,
    }
    assert kms.describe(key_id) == metadata


def test_create_key_with_description_tags_and_explicit_defaults(kms: Harness) -> None:
    key_id = kms.create_key(
        Description="home dir",
        KeySpec="SYMMETRIC_DEFAULT",
        KeyUsage="ENCRYPT_DECRYPT",
        Origin="AWS_KMS",
        Tags=[{"TagKey": "team", "TagValue": "ops"}, {"TagKey": "env", "TagValue": ""}],
    )
    assert kms.describe(key_id)["Description"] == "home dir"
    tags = kms.call("ListResourceTags", KeyId=key_id)
    assert tags["Tags"] == [
        {"TagKey": "env", "TagValue": ""},
        {"TagKey": "team", "TagValue": "ops"},
    ]
    assert tags["Truncated"] is False


def test_create_key_legacy_customer_master_key_spec(kms: Harness) -> None:
    key_id = kms.create_key(CustomerMasterKeySpec="SYMMETRIC_DEFAULT")
    assert kms.describe(key_id)["KeySpec"] == "SYMMETRIC_DEFAULT"
    with pytest.raises(ValidationException):
        kms.call("CreateKey", KeySpec="SYMMETRIC_DEFAULT", CustomerMasterKeySpec="RSA_2048")


def test_create_key_description_limits(kms: Harness) -> None:
    kms.create_key(Description="d" * 8192)
    with pytest.raises(ValidationException):
        kms.call("CreateKey", Description="d" * 8193)
    with pytest.raises(SerializationException):  # a wrong JSON type, as AWS answers it
        kms.call("CreateKey", Description=5)


@pytest.mark.parametrize(
    ("params", "error"),
    [
        ({"KeySpec": "SM2"}, UnsupportedOperationException),
        ({"KeySpec": "ML_DSA_44", "KeyUsage": "SIGN_VERIFY"}, UnsupportedOperationException),
        # KeyUsage defaults to ENCRYPT_DECRYPT, which these key specs do not allow
        ({"KeySpec": "ECC_NIST_P256"}, ValidationException),
        ({"KeySpec": "HMAC_256"}, ValidationException),
        ({"KeySpec": "AES_256"}, ValidationException),
        ({"KeySpec": "symmetric_default"}, ValidationException),
        ({"KeyUsage": "SIGN_VERIFY"}, ValidationException),
        ({"KeyUsage": "GENERATE_VERIFY_MAC"}, ValidationException),
        ({"KeyUsage": "ENCRYPT"}, ValidationException),
        ({"Origin": "AWS_CLOUDHSM"}, UnsupportedOperationException),
        ({"Origin": "AWS_CLOUDHSM"}, UnsupportedOperationException),
        ({"Origin": "NOWHERE"}, ValidationException),
        ({"MultiRegion": True}, UnsupportedOperationException),
        ({"Tags": [{"TagKey": "aws:owner", "TagValue": "x"}]}, TagException),
        ({"Tags": [{"TagKey": "", "TagValue": "x"}]}, ValidationException),
        ({"Tags": [{"TagKey": "k"}]}, ValidationException),
        ({"Tags": ["k=v"]}, SerializationException),
        ({"Tags": [{"TagKey": f"k{i}", "TagValue": "v"} for i in range(51)]}, TagException),
    ],
)
def test_create_key_rejects(kms: Harness, params: dict[str, Any], error: type[KMSError]) -> None:
    with pytest.raises(error) as caught:
        kms.call("CreateKey", **params)
    assert caught.value.aws_type == error.__name__
    assert kms.call("ListKeys")["Keys"] == []


def test_create_key_dry_run_creates_nothing(kms: Harness) -> None:
    with pytest.raises(DryRunOperationException):
        kms.call("CreateKey", DryRun=True)
    assert kms.call("ListKeys")["Keys"] == []


# ------------------------------------------------------ DescribeKey, ListKeys
@pytest.mark.parametrize(
    "key_ref",
    [
        "00000000-0000-4000-8000-000000000000",
        "not-a-key",
        "alias/none",
        f"arn:aws:kms:{REGION}:{ACCOUNT}:key/00000000-0000-4000-8000-000000000000",
        f"arn:aws:kms:{REGION}:{ACCOUNT}:alias/none",
    ],
)
def test_describe_unknown_key(kms: Harness, key_ref: str) -> None:
    kms.create_key()
    with pytest.raises(NotFoundException):
        kms.call("DescribeKey", KeyId=key_ref)


def test_describe_key_arn_of_other_region_or_account(kms: Harness) -> None:
    key_id = kms.create_key()
    for arn in (
        f"arn:aws:kms:us-east-1:{ACCOUNT}:key/{key_id}",
        f"arn:aws:kms:{REGION}:999999999999:key/{key_id}",
    ):
        with pytest.raises(NotFoundException):
            kms.call("DescribeKey", KeyId=arn)


@pytest.mark.parametrize(
    ("params", "error"),
    [
        ({}, ValidationException),
        ({"KeyId": ""}, ValidationException),
        ({"KeyId": 7}, SerializationException),
        ({"KeyId": None}, ValidationException),
    ],
)
def test_describe_key_requires_key_id(
    kms: Harness, params: dict[str, Any], error: type[KMSError]
) -> None:
    with pytest.raises(error):
        kms.call("DescribeKey", **params)


def test_list_keys_empty(kms: Harness) -> None:
    assert kms.call("ListKeys") == {"Keys": [], "Truncated": False}


def test_list_keys_pagination(kms: Harness) -> None:
    created = set()
    for _ in range(7):
        created.add(kms.create_key())
        kms.clock.advance(1)
    seen: list[str] = []
    params: dict[str, Any] = {"Limit": 3}
    pages = 0
    while True:
        page = kms.call("ListKeys", **params)
        pages += 1
        assert len(page["Keys"]) <= 3
        for entry in page["Keys"]:
            assert entry["KeyArn"] == kms.arn(entry["KeyId"])
            seen.append(entry["KeyId"])
        if not page["Truncated"]:
            assert "NextMarker" not in page
            break
        params = {"Limit": 3, "Marker": page["NextMarker"]}
    assert pages == 3
    assert len(seen) == 7 and set(seen) == created
    everything = kms.call("ListKeys")
    assert [entry["KeyId"] for entry in everything["Keys"]] == seen  # oldest first
    assert everything["Truncated"] is False


def test_list_keys_limit_bounds(kms: Harness) -> None:
    for _ in range(2):
        kms.create_key()
    assert len(kms.call("ListKeys", Limit=1)["Keys"]) == 1
    assert len(kms.call("ListKeys", Limit=1000)["Keys"]) == 2
    for bad in (0, 1001, -1):
        with pytest.raises(ValidationException):
            kms.call("ListKeys", Limit=bad)
    for wrong_type in ("3", True, 3.0):
        with pytest.raises(SerializationException):
            kms.call("ListKeys", Limit=wrong_type)


@pytest.mark.parametrize(
    "marker",
    [
        "garbage!",
        "zzzz",
        "////",
        base64.urlsafe_b64encode(b"i:999").decode(),
        base64.urlsafe_b64encode(b"i:-1").decode(),
        base64.urlsafe_b64encode(b"i:one").decode(),
    ],
)
def test_list_keys_bad_marker(kms: Harness, marker: str) -> None:
    kms.create_key()
    with pytest.raises(InvalidMarkerException):
        kms.call("ListKeys", Marker=marker)


# ----------------------------------------------------- EnableKey, DisableKey
def test_disable_and_enable(kms: Harness) -> None:
    key_id = kms.create_key()
    blob = kms.encrypt(key_id, b"before")
    data_key_blob = kms.call("GenerateDataKey", KeyId=key_id, KeySpec="AES_256")["CiphertextBlob"]
    assert kms.call("DisableKey", KeyId=key_id) == {}
    metadata = kms.describe(key_id)
    assert (metadata["KeyState"], metadata["Enabled"]) == ("Disabled", False)
    other = kms.create_key()
    refused: list[tuple[str, dict[str, Any]]] = [
        ("Encrypt", {"KeyId": key_id, "Plaintext": b64(b"x")}),
        ("Decrypt", {"CiphertextBlob": blob}),
        ("Decrypt", {"CiphertextBlob": data_key_blob, "KeyId": key_id}),
        ("GenerateDataKey", {"KeyId": key_id, "KeySpec": "AES_256"}),
        ("GenerateDataKeyWithoutPlaintext", {"KeyId": key_id, "NumberOfBytes": 16}),
        ("ReEncrypt", {"CiphertextBlob": blob, "DestinationKeyId": other}),
        ("ReEncrypt", {"CiphertextBlob": kms.encrypt(other), "DestinationKeyId": key_id}),
        ("RotateKeyOnDemand", {"KeyId": key_id}),
        ("EnableKeyRotation", {"KeyId": key_id}),
    ]
    for operation, params in refused:
        with pytest.raises(DisabledException):
            kms.call(operation, **params)
    kms.call("DisableKey", KeyId=key_id)  # idempotent
    # Administrative operations still work on a disabled key.
    kms.call("TagResource", KeyId=key_id, Tags=[{"TagKey": "k", "TagValue": "v"}])
    kms.call("CreateAlias", AliasName="alias/disabled", TargetKeyId=key_id)
    assert kms.call("GetKeyRotationStatus", KeyId=key_id)["KeyRotationEnabled"] is False

    assert kms.call("EnableKey", KeyId=key_id) == {}
    kms.call("EnableKey", KeyId=key_id)  # idempotent
    assert kms.describe(key_id)["KeyState"] == "Enabled"
    assert kms.decrypt(blob) == b"before"
    assert kms.decrypt(kms.encrypt("alias/disabled", b"after")) == b"after"
    assert len(kms.decrypt(data_key_blob)) == 32


# ------------------------------------------------ deletion window and destruction
def test_schedule_key_deletion_default_window(kms: Harness) -> None:
    key_id = kms.create_key()
    response = kms.call("ScheduleKeyDeletion", KeyId=key_id)
    assert response == {
        "KeyId": kms.arn(key_id),
        "DeletionDate": START + 30 * DAY,
        "KeyState": "PendingDeletion",
        "PendingWindowInDays": 30,
    }
    metadata = kms.describe(key_id)
    assert metadata["KeyState"] == "PendingDeletion"
    assert metadata["Enabled"] is False
    assert metadata["DeletionDate"] == START + 30 * DAY
    assert metadata["PendingDeletionWindowInDays"] == 30


@pytest.mark.parametrize("days", [7, 8, 29, 30])
def test_schedule_key_deletion_window_accepted(kms: Harness, days: int) -> None:
    key_id = kms.create_key()
    response = kms.call("ScheduleKeyDeletion", KeyId=key_id, PendingWindowInDays=days)
    assert response["PendingWindowInDays"] == days
    assert response["DeletionDate"] == START + days * DAY


@pytest.mark.parametrize("days", [6, 31, 0, -7, 365, "7", 7.0, True])
def test_schedule_key_deletion_window_rejected(kms: Harness, days: Any) -> None:
    key_id = kms.create_key()
    error = ValidationException if type(days) is int else SerializationException
    with pytest.raises(error):
        kms.call("ScheduleKeyDeletion", KeyId=key_id, PendingWindowInDays=days)
    assert kms.describe(key_id)["KeyState"] == "Enabled"


def test_key_pending_deletion_refuses_use(kms: Harness) -> None:
    key_id = kms.create_key()
    other = kms.create_key()
    kms.call("CreateAlias", AliasName="alias/doomed", TargetKeyId=key_id)
    blob = kms.encrypt(key_id)
    other_blob = kms.encrypt(other)
    kms.call("ScheduleKeyDeletion", KeyId=key_id, PendingWindowInDays=7)
    refused: list[tuple[str, dict[str, Any]]] = [
        ("Encrypt", {"KeyId": key_id, "Plaintext": b64(b"x")}),
        ("Encrypt", {"KeyId": "alias/doomed", "Plaintext": b64(b"x")}),
        ("Decrypt", {"CiphertextBlob": blob}),
        ("GenerateDataKey", {"KeyId": key_id, "KeySpec": "AES_128"}),
        ("GenerateDataKeyWithoutPlaintext", {"KeyId": key_id, "KeySpec": "AES_128"}),
        ("ReEncrypt", {"CiphertextBlob": blob, "DestinationKeyId": other}),
        ("ReEncrypt", {"CiphertextBlob": other_blob, "DestinationKeyId": key_id}),
        ("EnableKey", {"KeyId": key_id}),
        ("DisableKey", {"KeyId": key_id}),
        ("ScheduleKeyDeletion", {"KeyId": key_id}),
        ("EnableKeyRotation", {"KeyId": key_id}),
        ("DisableKeyRotation", {"KeyId": key_id}),
        ("RotateKeyOnDemand", {"KeyId": key_id}),
        ("ListKeyRotations", {"KeyId": key_id}),
        ("CreateAlias", {"AliasName": "alias/new", "TargetKeyId": key_id}),
        ("UpdateAlias", {"AliasName": "alias/doomed", "TargetKeyId": key_id}),
        ("TagResource", {"KeyId": key_id, "Tags": [{"TagKey": "k", "TagValue": "v"}]}),
        ("UntagResource", {"KeyId": key_id, "TagKeys": ["k"]}),
    ]
    for operation, params in refused:
        with pytest.raises(KMSInvalidStateException):
            kms.call(operation, **params)
    # Still visible, listable and describable.
    assert kms.describe("alias/doomed")["KeyId"] == key_id
    assert key_id in {entry["KeyId"] for entry in kms.call("ListKeys")["Keys"]}
    assert kms.call("ListResourceTags", KeyId=key_id)["Tags"] == []
    assert kms.decrypt(other_blob) == b"secret"


def test_cancel_key_deletion_leaves_key_disabled(kms: Harness) -> None:
    key_id = kms.create_key()
    blob = kms.encrypt(key_id, b"keep me")
    kms.call("ScheduleKeyDeletion", KeyId=key_id, PendingWindowInDays=7)
    assert kms.call("CancelKeyDeletion", KeyId=key_id) == {"KeyId": kms.arn(key_id)}
    metadata = kms.describe(key_id)
    assert metadata["KeyState"] == "Disabled"
    assert "DeletionDate" not in metadata and "PendingDeletionWindowInDays" not in metadata
    with pytest.raises(DisabledException):
        kms.decrypt(blob)
    kms.call("EnableKey", KeyId=key_id)
    assert kms.decrypt(blob) == b"keep me"
    # The cancelled deletion does not happen later.
    kms.clock.advance(60 * DAY)
    assert kms.service.run_maintenance()["deleted"] == []
    assert kms.decrypt(blob) == b"keep me"


@pytest.mark.parametrize("state", ["Enabled", "Disabled"])
def test_cancel_key_deletion_of_key_not_pending(kms: Harness, state: str) -> None:
    key_id = kms.create_key()
    if state == "Disabled":
        kms.call("DisableKey", KeyId=key_id)
    with pytest.raises(KMSInvalidStateException):
        kms.call("CancelKeyDeletion", KeyId=key_id)
    assert kms.describe(key_id)["KeyState"] == state


def test_deletion_window_destroys_material(kms: Harness) -> None:
    key_id = kms.create_key()
    survivor = kms.create_key()
    kms.call("CreateAlias", AliasName="alias/doomed", TargetKeyId=key_id)
    kms.call("TagResource", KeyId=key_id, Tags=[{"TagKey": "k", "TagValue": "v"}])
    old_blob = kms.encrypt(key_id, b"old data")
    kms.call("RotateKeyOnDemand", KeyId=key_id)
    newer_blob = kms.encrypt(key_id, b"newer data")
    survivor_blob = kms.encrypt(survivor, b"survivor")
    sealed = [
        row[0] for row in kms.rows("SELECT sealed FROM key_versions WHERE key_id = ?", key_id)
    ]
    assert len(sealed) == 2 and all(len(blob) >= 44 for blob in sealed)

    response = kms.call("ScheduleKeyDeletion", KeyId=key_id, PendingWindowInDays=7)
    deletion_date = response["DeletionDate"]
    # Before the window ends, maintenance keeps the key.
    kms.clock.now = deletion_date - 1
    assert kms.service.run_maintenance() == {"deleted": [], "rotated": [], "expired": []}
    assert kms.describe(key_id)["KeyState"] == "PendingDeletion"
    assert len(kms.rows("SELECT 1 FROM key_versions WHERE key_id = ?", key_id)) == 2

    # When it ends, the key and everything about it goes.
    kms.clock.now = deletion_date
    events_before = len(kms.events)
    assert kms.service.run_maintenance() == {"deleted": [key_id], "rotated": [], "expired": []}
    assert [event["eventName"] for event in kms.events[events_before:]] == ["DeleteKey"]
    for key_ref in (key_id, kms.arn(key_id), "alias/doomed"):
        with pytest.raises(NotFoundException):
            kms.call("DescribeKey", KeyId=key_ref)
    for blob in (old_blob, newer_blob):
        with pytest.raises(NotFoundException):
            kms.decrypt(blob)
        with pytest.raises(NotFoundException):
            kms.call("ReEncrypt", CiphertextBlob=blob, DestinationKeyId=survivor)
    with pytest.raises(NotFoundException):
        kms.call("CancelKeyDeletion", KeyId=key_id)
    assert [entry["KeyId"] for entry in kms.call("ListKeys")["Keys"]] == [survivor]
    assert kms.call("ListAliases")["Aliases"] == []
    assert kms.rows("SELECT * FROM key_versions WHERE key_id = ?", key_id) == []
    assert kms.rows("SELECT * FROM tags WHERE key_id = ?", key_id) == []
    assert kms.keystore.unseal_material(key_id, 1) is None

    # The sealed material is gone from the raw bytes of the database and its WAL.
    for name in (DB_NAME, DB_NAME + "-wal"):
        path = kms.keystore.path / name
        raw = path.read_bytes() if path.exists() else b""
        for blob in sealed:
            assert blob not in raw, f"sealed material still in {name}"
            assert blob[12:] not in raw, f"sealed ciphertext still in {name}"
            assert blob[:12] not in raw, f"sealing nonce still in {name}"

    # Other keys are untouched; running maintenance again does nothing.
    assert kms.decrypt(survivor_blob) == b"survivor"
    kms.clock.advance(DAY)
    assert kms.service.run_maintenance() == {"deleted": [], "rotated": [], "expired": []}


def test_destroyed_material_leaves_the_wal_once_a_reader_goes(kms: Harness) -> None:
    key_id = kms.create_key()
    sealed = kms.rows("SELECT sealed FROM key_versions WHERE key_id = ?", key_id)[0][0]
    kms.call("ScheduleKeyDeletion", KeyId=key_id, PendingWindowInDays=7)
    kms.keystore._db.execute("PRAGMA busy_timeout = 100")  # do not wait 5 s for the reader
    reader = sqlite3.connect(kms.db_path, isolation_level=None)
    try:
        reader.execute("BEGIN")
        reader.execute("SELECT COUNT(*) FROM keys").fetchone()  # holds a snapshot
        kms.clock.advance(7 * DAY)
        assert kms.service.run_maintenance()["deleted"] == [key_id]
    finally:
        reader.close()
    kms.clock.advance(DAY)
    kms.service.run_maintenance()  # the next pass, with no reader in the way
    wal = kms.keystore.path / (DB_NAME + "-wal")
    assert sealed not in (wal.read_bytes() if wal.exists() else b"")


def test_deleted_key_blob_with_flipped_bit_still_not_found(kms: Harness) -> None:
    key_id = kms.create_key()
    blob = bytearray(unb64(kms.encrypt(key_id)))
    kms.call("ScheduleKeyDeletion", KeyId=key_id, PendingWindowInDays=7)
    kms.clock.advance(7 * DAY)
    kms.service.run_maintenance()
    blob[-1] ^= 1
    with pytest.raises(NotFoundException):
        kms.decrypt(b64(bytes(blob)))


# ------------------------------------------------------------------ rotation
def test_key_rotation_status_and_period(kms: Harness) -> None:
    key_id = kms.create_key()
    assert kms.call("GetKeyRotationStatus", KeyId=key_id) == {
        "KeyId": kms.arn(key_id),
        "KeyRotationEnabled": False,
    }
    assert kms.call("EnableKeyRotation", KeyId=key_id) == {}
    status = kms.call("GetKeyRotationStatus", KeyId=key_id)
    assert status["KeyRotationEnabled"] is True
    assert status["RotationPeriodInDays"] == 365
    assert status["NextRotationDate"] == START + 365 * DAY
    for days in (90, 2560):
        kms.call("EnableKeyRotation", KeyId=key_id, RotationPeriodInDays=days)
        status = kms.call("GetKeyRotationStatus", KeyId=key_id)
        assert status["RotationPeriodInDays"] == days
        assert status["NextRotationDate"] == START + days * DAY
    assert kms.call("DisableKeyRotation", KeyId=key_id) == {}
    assert kms.call("GetKeyRotationStatus", KeyId=key_id)["KeyRotationEnabled"] is False


@pytest.mark.parametrize("days", [89, 2561, 0, -1, "365", 365.0, True])
def test_enable_key_rotation_period_rejected(kms: Harness, days: Any) -> None:
    key_id = kms.create_key()
    error = ValidationException if type(days) is int else SerializationException
    with pytest.raises(error):
        kms.call("EnableKeyRotation", KeyId=key_id, RotationPeriodInDays=days)
    assert kms.call("GetKeyRotationStatus", KeyId=key_id)["KeyRotationEnabled"] is False


def test_decrypt_after_several_rotations(kms: Harness) -> None:
    key_id = kms.create_key()
    blobs = [kms.encrypt(key_id, b"v1", {"n": "1"})]
    assert blob_version(blobs[0]) == 1
    for version in range(2, 6):
        assert kms.call("RotateKeyOnDemand", KeyId=key_id) == {"KeyId": kms.arn(key_id)}
        kms.clock.advance(DAY)
        blob = kms.encrypt(key_id, f"v{version}".encode(), {"n": str(version)})
        assert blob_version(blob) == version  # new blobs use the newest version
        blobs.append(blob)
    data_key = kms.call("GenerateDataKey", KeyId=key_id, KeySpec="AES_256")
    assert blob_version(data_key["CiphertextBlob"]) == 5
    for version, blob in enumerate(blobs, start=1):
        assert kms.decrypt(blob, {"n": str(version)}) == f"v{version}".encode()
    assert kms.decrypt(data_key["CiphertextBlob"]) == unb64(data_key["Plaintext"])
    rotations = kms.call("ListKeyRotations", KeyId=key_id)
    assert rotations["Truncated"] is False
    assert [entry["RotationType"] for entry in rotations["Rotations"]] == ["ON_DEMAND"] * 4
    assert [entry["RotationDate"] for entry in rotations["Rotations"]] == [
        START + n * DAY for n in range(4)
    ]
    assert {entry["KeyId"] for entry in rotations["Rotations"]} == {kms.arn(key_id)}
    # Re-encrypting an old blob moves it to the newest version.
    moved = kms.call(
        "ReEncrypt",
        CiphertextBlob=blobs[0],
        SourceEncryptionContext={"n": "1"},
        DestinationKeyId=key_id,
    )["CiphertextBlob"]
    assert blob_version(moved) == 5
    assert kms.decrypt(moved) == b"v1"


def test_list_key_rotations_pagination(kms: Harness) -> None:
    key_id = kms.create_key()
    assert kms.call("ListKeyRotations", KeyId=key_id) == {"Rotations": [], "Truncated": False}
    for _ in range(5):
        kms.call("RotateKeyOnDemand", KeyId=key_id)
    first = kms.call("ListKeyRotations", KeyId=key_id, Limit=2)
    assert len(first["Rotations"]) == 2 and first["Truncated"] is True
    second = kms.call("ListKeyRotations", KeyId=key_id, Limit=2, Marker=first["NextMarker"])
    third = kms.call("ListKeyRotations", KeyId=key_id, Limit=2, Marker=second["NextMarker"])
    assert len(third["Rotations"]) == 1 and third["Truncated"] is False
    with pytest.raises(InvalidMarkerException):
        kms.call("ListKeyRotations", KeyId=key_id, Marker="bogus!")


def test_automatic_rotation_with_fake_clock(kms: Harness) -> None:
    key_id = kms.create_key()
    idle = kms.create_key()
    kms.call("EnableKeyRotation", KeyId=key_id, RotationPeriodInDays=90)
    old_blob = kms.encrypt(key_id, b"old")
    kms.clock.advance(90 * DAY - 1)
    assert kms.service.run_maintenance() == {"deleted": [], "rotated": [], "expired": []}
    assert blob_version(kms.encrypt(key_id)) == 1

    kms.clock.advance(1)
    events_before = len(kms.events)
    assert kms.service.run_maintenance() == {"deleted": [], "rotated": [key_id], "expired": []}
    event = kms.events[events_before]
    assert event["eventName"] == "RotateKey"
    assert event["eventType"] == "AwsServiceEvent"
    assert event["resources"][0]["ARN"] == kms.arn(key_id)
    new_blob = kms.encrypt(key_id, b"new")
    assert blob_version(new_blob) == 2
    assert kms.decrypt(old_blob) == b"old" and kms.decrypt(new_blob) == b"new"
    status = kms.call("GetKeyRotationStatus", KeyId=key_id)
    assert status["NextRotationDate"] == kms.clock.now + 90 * DAY
    rotations = kms.call("ListKeyRotations", KeyId=key_id)["Rotations"]
    assert rotations == [
        {"KeyId": kms.arn(key_id), "RotationDate": kms.clock.now, "RotationType": "AUTOMATIC"}
    ]
    # Nothing more until the next period ends; the idle key never rotates.
    assert kms.service.run_maintenance()["rotated"] == []
    kms.clock.advance(90 * DAY)
    assert kms.service.run_maintenance()["rotated"] == [key_id]
    assert blob_version(kms.encrypt(key_id)) == 3
    assert kms.call("ListKeyRotations", KeyId=idle)["Rotations"] == []


def test_automatic_rotation_skips_disabled_and_pending_keys(kms: Harness) -> None:
    disabled = kms.create_key()
    pending = kms.create_key()
    for key_id in (disabled, pending):
        kms.call("EnableKeyRotation", KeyId=key_id, RotationPeriodInDays=90)
    kms.call("DisableKey", KeyId=disabled)
    kms.clock.advance(85 * DAY)
    kms.call("ScheduleKeyDeletion", KeyId=pending, PendingWindowInDays=30)
    kms.clock.advance(6 * DAY)  # rotation was due at day 90; deletion comes at day 115
    assert kms.service.run_maintenance() == {"deleted": [], "rotated": [], "expired": []}
    kms.call("CancelKeyDeletion", KeyId=pending)  # back to Disabled: still no rotation
    assert kms.service.run_maintenance() == {"deleted": [], "rotated": [], "expired": []}
    # Enabled again after the rotation date: rotated at the next maintenance.
    kms.call("EnableKey", KeyId=disabled)
    assert kms.service.run_maintenance()["rotated"] == [disabled]
    kms.call("EnableKey", KeyId=pending)
    assert kms.service.run_maintenance()["rotated"] == [pending]
    assert kms.call("GetKeyRotationStatus", KeyId=pending)["KeyRotationEnabled"] is True
    assert blob_version(kms.encrypt(pending)) == 2 and blob_version(kms.encrypt(disabled)) == 2


def test_get_key_rotation_status_pending_deletion_is_false(kms: Harness) -> None:
    key_id = kms.create_key()
    kms.call("EnableKeyRotation", KeyId=key_id)
    kms.call("ScheduleKeyDeletion", KeyId=key_id, PendingWindowInDays=7)
    status = kms.call("GetKeyRotationStatus", KeyId=key_id)
    assert status["KeyRotationEnabled"] is False
    kms.call("CancelKeyDeletion", KeyId=key_id)
    assert kms.call("GetKeyRotationStatus", KeyId=key_id)["KeyRotationEnabled"] is True


def test_on_demand_rotation_keeps_automatic_schedule(kms: Harness) -> None:
    key_id = kms.create_key()
    kms.call("EnableKeyRotation", KeyId=key_id, RotationPeriodInDays=730)
    scheduled = kms.call("GetKeyRotationStatus", KeyId=key_id)["NextRotationDate"]
    kms.clock.advance(726 * DAY)
    kms.call("RotateKeyOnDemand", KeyId=key_id)
    assert kms.call("GetKeyRotationStatus", KeyId=key_id)["NextRotationDate"] == scheduled
    kms.clock.now = scheduled
    assert kms.service.run_maintenance()["rotated"] == [key_id]


# ------------------------------------------------------------ Encrypt, Decrypt
@pytest.mark.parametrize("size", [1, 2, 16, 4095, 4096])
def test_encrypt_decrypt_sizes(kms: Harness, size: int) -> None:
    key_id = kms.create_key()
    plaintext = bytes(range(256)) * (size // 256) + bytes(range(size % 256))
    response = kms.call("Encrypt", KeyId=key_id, Plaintext=b64(plaintext))
    assert response["KeyId"] == kms.arn(key_id)
    assert response["EncryptionAlgorithm"] == "SYMMETRIC_DEFAULT"
    blob = unb64(response["CiphertextBlob"])
    assert len(blob) == 1 + 16 + 4 + 12 + size + 16
    if size >= 16:
        assert plaintext not in blob
    decrypted = kms.call("Decrypt", CiphertextBlob=response["CiphertextBlob"])
    assert decrypted == {
        "KeyId": kms.arn(key_id),
        "Plaintext": b64(plaintext),
        "EncryptionAlgorithm": "SYMMETRIC_DEFAULT",
    }


def test_encrypt_is_randomised(kms: Harness) -> None:
    key_id = kms.create_key()
    assert kms.encrypt(key_id, b"same") != kms.encrypt(key_id, b"same")


@pytest.mark.parametrize(
    ("params", "error"),
    [
        ({"Plaintext": ""}, ValidationException),
        ({"Plaintext": b64(b"x" * 4097)}, ValidationException),
        ({"Plaintext": None}, ValidationException),
        ({"Plaintext": "not base64!"}, ValidationException),
        ({"Plaintext": 12}, SerializationException),
        (
            {"Plaintext": b64(b"x"), "EncryptionAlgorithm": "RSAES_OAEP_SHA_256"},
            InvalidKeyUsageException,
        ),
        ({"Plaintext": b64(b"x"), "EncryptionAlgorithm": "AES_GCM"}, ValidationException),
        ({"Plaintext": b64(b"x"), "EncryptionContext": "a=b"}, SerializationException),
        ({"Plaintext": b64(b"x"), "EncryptionContext": {"a": 1}}, SerializationException),
        ({"Plaintext": b64(b"x"), "EncryptionContext": {"": "v"}}, ValidationException),
        ({"Plaintext": b64(b"x"), "DryRun": True}, DryRunOperationException),
    ],
)
def test_encrypt_rejects(kms: Harness, params: dict[str, Any], error: type[KMSError]) -> None:
    key_id = kms.create_key()
    with pytest.raises(error):
        kms.call("Encrypt", KeyId=key_id, **params)


def test_encrypt_without_key_id(kms: Harness) -> None:
    with pytest.raises(ValidationException):
        kms.call("Encrypt", Plaintext=b64(b"x"))


def test_decrypt_with_key_id_forms_and_wrong_key(kms: Harness) -> None:
    key_id = kms.create_key()
    other = kms.create_key()
    kms.call("CreateAlias", AliasName="alias/other", TargetKeyId=other)
    blob = kms.encrypt(key_id, b"payload")
    assert kms.decrypt(blob) == b"payload"
    assert kms.decrypt(blob, KeyId=key_id) == b"payload"
    assert kms.decrypt(blob, KeyId=kms.arn(key_id)) == b"payload"
    for wrong in (other, kms.arn(other), "alias/other", kms.alias_arn("alias/other")):
        with pytest.raises(IncorrectKeyException):
            kms.decrypt(blob, KeyId=wrong)
    with pytest.raises(NotFoundException):
        kms.decrypt(blob, KeyId=str(uuid.uuid4()))
    with pytest.raises(InvalidKeyUsageException):
        kms.decrypt(blob, EncryptionAlgorithm="RSAES_OAEP_SHA_1")
    with pytest.raises(DryRunOperationException):
        kms.decrypt(blob, DryRun=True)
    with pytest.raises(UnsupportedOperationException):
        kms.decrypt(blob, Recipient={"AttestationDocument": b64(b"doc")})


def test_decrypt_blob_relabelled_to_other_key(kms: Harness) -> None:
    """A blob whose header is changed to name another existing key fails to open."""
    key_id = kms.create_key()
    other = kms.create_key()
    blob = bytearray(unb64(kms.encrypt(key_id)))
    blob[1:17] = uuid.UUID(other).bytes
    with pytest.raises(InvalidCiphertextException):
        kms.decrypt(b64(bytes(blob)))
    with pytest.raises(IncorrectKeyException):
        kms.decrypt(b64(bytes(blob)), KeyId=key_id)


def test_flipped_bit_anywhere_in_blob(kms: Harness) -> None:
    key_id = kms.create_key()
    kms.call("RotateKeyOnDemand", KeyId=key_id)
    kms.call("RotateKeyOnDemand", KeyId=key_id)  # versions 1, 2 and 3 all exist
    context = {"purpose": "bit flips"}
    blob = unb64(kms.encrypt(key_id, b"P", context))
    assert len(blob) == 1 + 16 + 4 + 12 + 1 + 16
    assert kms.decrypt(b64(blob), context) == b"P"
    for position in range(len(blob)):
        for bit in range(8):
            tampered = bytearray(blob)
            tampered[position] ^= 1 << bit
            with pytest.raises(InvalidCiphertextException):
                kms.decrypt(b64(bytes(tampered)), context)


def test_truncated_extended_and_garbage_blobs(kms: Harness) -> None:
    key_id = kms.create_key()
    blob = unb64(kms.encrypt(key_id, b"payload"))
    for length in range(1, len(blob)):
        with pytest.raises(InvalidCiphertextException):
            kms.decrypt(b64(blob[:length]))
    for extended in (blob + b"\x00", b"\x00" + blob, blob + blob):
        with pytest.raises(InvalidCiphertextException):
            kms.decrypt(b64(extended))
    for garbage in (b"\x01" * 64, bytes(range(80)), b"x", b"\x01" + bytes(48)):
        with pytest.raises(InvalidCiphertextException):
            kms.decrypt(b64(garbage))
    # Not a blob at all: empty, not base64, too long.
    for bad in ("", "not base64!", "====", b64(b"\x01" * 6145)):
        with pytest.raises(ValidationException):
            kms.call("Decrypt", CiphertextBlob=bad)
    with pytest.raises(ValidationException):
        kms.call("Decrypt")


# ---------------------------------------------------------- encryption context
CONTEXT = {"app": "x", "Purpose": "backup", "user": "alice"}


@pytest.mark.parametrize(
    "wrong",
    [
        {},  # missing
        {"app": "x", "Purpose": "backup"},  # a pair short
        {**CONTEXT, "extra": "pair"},  # a pair too many
        {"app": "X", "Purpose": "backup", "user": "alice"},  # value case
        {"App": "x", "Purpose": "backup", "user": "alice"},  # key case
        {"app": "x", "purpose": "backup", "user": "alice"},
        {"app": "x", "Purpose": "backup", "user": "alice "},
        {"app": "x", "Purpose": "backup", "user": "bob"},
        {"appx": "", "Purpose": "backup", "user": "alice"},  # boundary moved
    ],
)
def test_context_must_match_exactly(kms: Harness, wrong: dict[str, str]) -> None:
    key_id = kms.create_key()
    blob = kms.encrypt(key_id, b"ctx", CONTEXT)
    with pytest.raises(InvalidCiphertextException):
        kms.decrypt(blob, wrong)
    with pytest.raises(InvalidCiphertextException):
        kms.call(
            "ReEncrypt", CiphertextBlob=blob, SourceEncryptionContext=wrong, DestinationKeyId=key_id
        )
    assert kms.decrypt(blob, CONTEXT) == b"ctx"


def test_context_order_does_not_matter(kms: Harness) -> None:
    key_id = kms.create_key()
    blob = kms.encrypt(key_id, b"ctx", CONTEXT)
    reordered = dict(reversed(list(CONTEXT.items())))
    assert list(reordered) != list(CONTEXT)
    assert kms.decrypt(blob, reordered) == b"ctx"


def test_context_boundary_is_unambiguous(kms: Harness) -> None:
    key_id = kms.create_key()
    blob = kms.encrypt(key_id, b"ctx", {"ab": "c"})
    with pytest.raises(InvalidCiphertextException):
        kms.decrypt(blob, {"a": "bc"})
    blob2 = kms.encrypt(key_id, b"ctx", {"a": "b", "c": "d"})
    for wrong in ({"a": "bcd"}, {"ab": "cd"}, {"a": "b\x00\x01\x00\x01c\x00\x01d"}):
        with pytest.raises(InvalidCiphertextException):
            kms.decrypt(blob2, wrong)
    assert kms.decrypt(blob, {"ab": "c"}) == b"ctx"


def test_context_empty_equals_absent(kms: Harness) -> None:
    key_id = kms.create_key()
    assert kms.decrypt(kms.encrypt(key_id, b"a"), {}) == b"a"
    assert kms.decrypt(kms.encrypt(key_id, b"b", {})) == b"b"
    with pytest.raises(InvalidCiphertextException):
        kms.decrypt(kms.encrypt(key_id, b"c"), {"a": "b"})


def test_context_unicode_is_compared_by_bytes(kms: Harness) -> None:
    key_id = kms.create_key()
    composed = {"caf\u00e9": "\u00fc"}
    blob = kms.encrypt(key_id, b"u", composed)
    assert kms.decrypt(blob, {"caf\u00e9": "\u00fc"}) == b"u"
    with pytest.raises(InvalidCiphertextException):
        kms.decrypt(blob, {"cafe\u0301": "\u00fc"})  # same text, decomposed


def test_encode_encryption_context_known_values() -> None:
    assert encode_encryption_context({}) == b""
    assert encode_encryption_context({"a": "bc"}) == b"\x00\x01\x00\x01a\x00\x02bc"
    assert encode_encryption_context({"ab": "c"}) == b"\x00\x01\x00\x02ab\x00\x01c"
    assert encode_encryption_context({"b": "2", "a": "1"}) == encode_encryption_context(
        {"a": "1", "b": "2"}
    )


def test_context_with_lone_surrogate_is_a_validation_error(kms: Harness) -> None:
    key_id = kms.create_key()
    with pytest.raises(ValidationException):
        kms.encrypt(key_id, b"x", {"k": "\ud800"})


def test_context_with_oversized_value_is_a_validation_error(kms: Harness) -> None:
    key_id = kms.create_key()
    with pytest.raises(ValidationException):
        kms.encrypt(key_id, b"x", {"k": "v" * 70_000})


def test_description_with_lone_surrogate_is_a_validation_error(kms: Harness) -> None:
    with pytest.raises(ValidationException):
        kms.call("CreateKey", Description="bad \udc80")


_text = st.text(st.characters(exclude_categories=("Cs",)), max_size=12)
_key_text = st.text(st.characters(exclude_categories=("Cs",)), min_size=1, max_size=12)
_contexts = st.dictionaries(_key_text, _text, max_size=6)


# A tiny alphabet (with the bytes a length prefix is made of) makes collisions of a
# careless encoding likely; the full alphabet covers multi-byte UTF-8.
_tiny = st.text("ab\x00\x01", max_size=3)
_tiny_contexts = st.dictionaries(_tiny.filter(bool), _tiny, max_size=3)


@settings(max_examples=300, deadline=None)
@given(st.lists(_contexts | _tiny_contexts, min_size=2, max_size=6))
def test_encode_encryption_context_is_injective(contexts: list[dict[str, str]]) -> None:
    for first in contexts:
        for second in contexts:
            same_encoding = encode_encryption_context(first) == encode_encryption_context(second)
            assert same_encoding == (first == second)


def decode_encryption_context(data: bytes) -> dict[str, str]:
    """The inverse of the documented encoding: a 2-byte count, then 2-byte-length-prefixed
    UTF-8 keys and values, sorted by key bytes. Raises if ``data`` is not exactly that."""
    if data == b"":
        return {}
    count, offset = int.from_bytes(data[:2], "big"), 2
    context: dict[str, str] = {}
    previous_key = None
    for _ in range(count):
        fields = []
        for _ in range(2):
            length = int.from_bytes(data[offset : offset + 2], "big")
            field = data[offset + 2 : offset + 2 + length]
            assert len(field) == length
            fields.append(field)
            offset += 2 + length
        assert previous_key is None or previous_key < fields[0]  # canonical order
        previous_key = fields[0]
        context[fields[0].decode()] = fields[1].decode()
    assert offset == len(data) and count >= 1
    return context


@settings(max_examples=300, deadline=None)
@given(_contexts | _tiny_contexts)
def test_encode_encryption_context_has_an_inverse(context: dict[str, str]) -> None:
    """A left inverse exists, so the encoding is injective (and order-independent)."""
    encoded = encode_encryption_context(context)
    assert decode_encryption_context(encoded) == context
    assert encode_encryption_context(dict(reversed(list(context.items())))) == encoded


@settings(max_examples=300, deadline=None)
@given(_key_text, _text, st.integers(min_value=0, max_value=12), _contexts)
def test_encode_encryption_context_moved_boundary(
    key: str, value: str, cut: int, rest: dict[str, str]
) -> None:
    """Moving characters between a key and its value always changes the encoding."""
    joined = key + value
    cut = min(max(cut, 1), len(joined))
    if joined[:cut] == key:
        return
    rest = {k: v for k, v in rest.items() if k not in (key, joined[:cut])}
    original = {**rest, key: value}
    moved = {**rest, joined[:cut]: joined[cut:]}
    assert encode_encryption_context(original) != encode_encryption_context(moved)


@settings(max_examples=80, deadline=None)
@given(context=st.dictionaries(_key_text, _text, min_size=1, max_size=6), data=st.data())
def test_context_round_trip_property(
    shared_kms: tuple[Harness, str], context: dict[str, str], data: st.DataObject
) -> None:
    kms, key_id = shared_kms
    blob = kms.encrypt(key_id, b"prop", context)
    permuted = dict(data.draw(st.permutations(list(context.items())), label="permuted"))
    assert kms.decrypt(blob, permuted) == b"prop"

    name = data.draw(st.sampled_from(sorted(context)), label="changed pair")
    changes = data.draw(st.sampled_from(["key", "value", "drop", "add"]), label="change")
    changed = dict(context)
    if changes == "key":
        new_key = data.draw(_key_text.filter(lambda k: k not in context), label="new key")
        changed[new_key] = changed.pop(name)
    elif changes == "value":
        changed[name] = data.draw(_text.filter(lambda v: v != context[name]), label="new value")
    elif changes == "drop":
        del changed[name]
    else:
        new_key = data.draw(_key_text.filter(lambda k: k not in context), label="added key")
        changed[new_key] = data.draw(_text, label="added value")
    with pytest.raises(InvalidCiphertextException):
        kms.decrypt(blob, changed)


# ------------------------------------------------------------------ ReEncrypt
def test_reencrypt_across_keys_and_contexts(kms: Harness) -> None:
    source = kms.create_key()
    destination = kms.create_key()
    blob = kms.encrypt(source, b"move me", {"stage": "one"})
    response = kms.call(
        "ReEncrypt",
        CiphertextBlob=blob,
        SourceEncryptionContext={"stage": "one"},
        DestinationKeyId=destination,
        DestinationEncryptionContext={"stage": "two"},
    )
    assert response["SourceKeyId"] == kms.arn(source)
    assert response["KeyId"] == kms.arn(destination)
    assert response["SourceEncryptionAlgorithm"] == "SYMMETRIC_DEFAULT"
    assert response["DestinationEncryptionAlgorithm"] == "SYMMETRIC_DEFAULT"
    assert "Plaintext" not in response
    new_blob = response["CiphertextBlob"]
    assert unb64(new_blob)[1:17] == uuid.UUID(destination).bytes
    assert kms.decrypt(new_blob, {"stage": "two"}, KeyId=destination) == b"move me"
    for wrong in ({"stage": "one"}, {}):
        with pytest.raises(InvalidCiphertextException):
            kms.decrypt(new_blob, wrong)
    with pytest.raises(IncorrectKeyException):
        kms.decrypt(new_blob, {"stage": "two"}, KeyId=source)
    assert kms.decrypt(blob, {"stage": "one"}) == b"move me"  # the old blob still works

    # Same key, new context; the SourceKeyId check.
    same = kms.call(
        "ReEncrypt",
        CiphertextBlob=blob,
        SourceKeyId=source,
        SourceEncryptionContext={"stage": "one"},
        DestinationKeyId=source,
    )
    assert kms.decrypt(same["CiphertextBlob"]) == b"move me"
    with pytest.raises(IncorrectKeyException):
        kms.call(
            "ReEncrypt",
            CiphertextBlob=blob,
            SourceKeyId=destination,
            SourceEncryptionContext={"stage": "one"},
            DestinationKeyId=source,
        )
    with pytest.raises(ValidationException):
        kms.call("ReEncrypt", CiphertextBlob=blob, SourceEncryptionContext={"stage": "one"})
    with pytest.raises(NotFoundException):
        kms.call(
            "ReEncrypt",
            CiphertextBlob=blob,
            SourceEncryptionContext={"stage": "one"},
            DestinationKeyId="alias/missing",
        )


# ---------------------------------------------------------------- data keys
@pytest.mark.parametrize(
    ("params", "length"),
    [
        ({"KeySpec": "AES_256"}, 32),
        ({"KeySpec": "AES_128"}, 16),
        ({"NumberOfBytes": 1}, 1),
        ({"NumberOfBytes": 64}, 64),
        ({"NumberOfBytes": 1024}, 1024),
    ],
)
def test_generate_data_key(kms: Harness, params: dict[str, Any], length: int) -> None:
    key_id = kms.create_key()
    context = {"file": "/home/a"}
    response = kms.call("GenerateDataKey", KeyId=key_id, EncryptionContext=context, **params)
    assert set(response) == {"CiphertextBlob", "Plaintext", "KeyId"}
    assert response["KeyId"] == kms.arn(key_id)
    data_key = unb64(response["Plaintext"])
    assert len(data_key) == length
    assert data_key not in unb64(response["CiphertextBlob"]) or length == 1
    assert kms.decrypt(response["CiphertextBlob"], context) == data_key
    with pytest.raises(InvalidCiphertextException):
        kms.decrypt(response["CiphertextBlob"])

    without = kms.call(
        "GenerateDataKeyWithoutPlaintext", KeyId=key_id, EncryptionContext=context, **params
    )
    assert set(without) == {"CiphertextBlob", "KeyId"}
    assert without["KeyId"] == kms.arn(key_id)
    assert len(kms.decrypt(without["CiphertextBlob"], context)) == length


def test_generate_data_keys_differ(kms: Harness) -> None:
    key_id = kms.create_key()
    keys = {
        kms.call("GenerateDataKey", KeyId=key_id, KeySpec="AES_256")["Plaintext"] for _ in range(8)
    }
    assert len(keys) == 8


@pytest.mark.parametrize("operation", ["GenerateDataKey", "GenerateDataKeyWithoutPlaintext"])
@pytest.mark.parametrize(
    ("params", "error"),
    [
        ({}, ValidationException),  # neither
        ({"KeySpec": "AES_256", "NumberOfBytes": 32}, ValidationException),  # both
        ({"NumberOfBytes": 0}, ValidationException),
        ({"NumberOfBytes": 1025}, ValidationException),
        ({"NumberOfBytes": -1}, ValidationException),
        ({"NumberOfBytes": "32"}, SerializationException),
        ({"NumberOfBytes": True}, SerializationException),
        ({"KeySpec": "AES_512"}, ValidationException),
        ({"KeySpec": "aes_256"}, ValidationException),
        ({"KeySpec": "AES_256", "EncryptionContext": ["a"]}, SerializationException),
        ({"KeySpec": "AES_256", "DryRun": True}, DryRunOperationException),
    ],
)
def test_generate_data_key_rejects(
    kms: Harness, operation: str, params: dict[str, Any], error: type[KMSError]
) -> None:
    key_id = kms.create_key()
    with pytest.raises(error):
        kms.call(operation, KeyId=key_id, **params)


@pytest.mark.parametrize("count", [1, 2, 32, 1024])
def test_generate_random(kms: Harness, count: int) -> None:
    first = unb64(kms.call("GenerateRandom", NumberOfBytes=count)["Plaintext"])
    second = unb64(kms.call("GenerateRandom", NumberOfBytes=count)["Plaintext"])
    assert len(first) == len(second) == count
    if count >= 16:
        assert first != second


@pytest.mark.parametrize(
    ("params", "error"),
    [
        ({"NumberOfBytes": 0}, ValidationException),
        ({"NumberOfBytes": 1025}, ValidationException),
        ({"NumberOfBytes": "8"}, SerializationException),
        ({}, ValidationException),
        ({"NumberOfBytes": 8, "CustomKeyStoreId": "cks-1"}, UnsupportedOperationException),
    ],
)
def test_generate_random_rejects(
    kms: Harness, params: dict[str, Any], error: type[KMSError]
) -> None:
    with pytest.raises(error):
        kms.call("GenerateRandom", **params)


# ------------------------------------------------------------------- aliases
def test_alias_lifecycle(kms: Harness) -> None:
    first = kms.create_key()
    second = kms.create_key()
    assert kms.call("CreateAlias", AliasName="alias/home", TargetKeyId=first) == {}
    kms.clock.advance(10)
    kms.call("CreateAlias", AliasName="alias/app/data_1-x", TargetKeyId=kms.arn(first))
    aliases = kms.call("ListAliases")
    assert aliases["Truncated"] is False
    assert aliases["Aliases"] == [
        {
            "AliasName": "alias/app/data_1-x",
            "AliasArn": kms.alias_arn("alias/app/data_1-x"),
            "TargetKeyId": first,
            "CreationDate": START + 10,
            "LastUpdatedDate": START + 10,
        },
        {
            "AliasName": "alias/home",
            "AliasArn": kms.alias_arn("alias/home"),
            "TargetKeyId": first,
            "CreationDate": START,
            "LastUpdatedDate": START,
        },
    ]
    with pytest.raises(AlreadyExistsException):
        kms.call("CreateAlias", AliasName="alias/home", TargetKeyId=second)

    blob = kms.encrypt("alias/home", b"first")
    kms.clock.advance(5)
    assert kms.call("UpdateAlias", AliasName="alias/home", TargetKeyId=second) == {}
    assert kms.describe("alias/home")["KeyId"] == second
    entry = next(a for a in kms.call("ListAliases")["Aliases"] if a["AliasName"] == "alias/home")
    assert entry["TargetKeyId"] == second
    assert (entry["CreationDate"], entry["LastUpdatedDate"]) == (START, START + 15)
    assert kms.decrypt(blob) == b"first"  # the blob names its key, not the alias
    with pytest.raises(IncorrectKeyException):
        kms.decrypt(blob, KeyId="alias/home")

    by_key = kms.call("ListAliases", KeyId=second)["Aliases"]
    assert [a["AliasName"] for a in by_key] == ["alias/home"]
    by_arn = kms.call("ListAliases", KeyId=kms.arn(first))["Aliases"]
    assert [a["AliasName"] for a in by_arn] == ["alias/app/data_1-x"]

    assert kms.call("DeleteAlias", AliasName="alias/home") == {}
    with pytest.raises(NotFoundException):
        kms.call("DeleteAlias", AliasName="alias/home")
    with pytest.raises(NotFoundException):
        kms.describe("alias/home")
    assert kms.describe(second)["KeyState"] == "Enabled"  # deleting an alias keeps the key


def test_alias_errors(kms: Harness) -> None:
    key_id = kms.create_key()
    with pytest.raises(NotFoundException):
        kms.call("UpdateAlias", AliasName="alias/none", TargetKeyId=key_id)
    with pytest.raises(NotFoundException):
        kms.call("CreateAlias", AliasName="alias/x", TargetKeyId=str(uuid.uuid4()))
    kms.call("CreateAlias", AliasName="alias/x", TargetKeyId=key_id)
    with pytest.raises(NotFoundException):
        kms.call("UpdateAlias", AliasName="alias/x", TargetKeyId=str(uuid.uuid4()))
    with pytest.raises(ValidationException):
        kms.call("CreateAlias", AliasName="alias/y")
    with pytest.raises(ValidationException):
        kms.call("CreateAlias", TargetKeyId=key_id)
    with pytest.raises(NotFoundException):
        kms.call("ListAliases", KeyId=str(uuid.uuid4()))
    # Aliases to disabled keys are allowed.
    kms.call("DisableKey", KeyId=key_id)
    kms.call("CreateAlias", AliasName="alias/z", TargetKeyId=key_id)


@pytest.mark.parametrize(
    "name",
    [
        "home",
        "alias/",
        "alias",
        "Alias/home",
        "alias/has space",
        "alias/caf\u00e9",
        "alias/a:b",
        "alias/a.b",
        "alias/a*",
        "aliases/home",
        "arn:aws:kms:eu-test-1:123456789012:alias/home",
        "alias/aws/ebs",
        "alias/aws/",
    ],
)
def test_invalid_alias_names(kms: Harness, name: str) -> None:
    key_id = kms.create_key()
    with pytest.raises(InvalidAliasNameException):
        kms.call("CreateAlias", AliasName=name, TargetKeyId=key_id)
    assert kms.call("ListAliases")["Aliases"] == []


def test_alias_name_length(kms: Harness) -> None:
    key_id = kms.create_key()
    longest = "alias/" + "a" * 250
    kms.call("CreateAlias", AliasName=longest, TargetKeyId=key_id)
    assert kms.describe(longest)["KeyId"] == key_id
    with pytest.raises(ValidationException):
        kms.call("CreateAlias", AliasName=longest + "a", TargetKeyId=key_id)
    with pytest.raises(ValidationException):
        kms.call("CreateAlias", AliasName="", TargetKeyId=key_id)


def test_alias_name_with_trailing_newline_is_invalid(kms: Harness) -> None:
    key_id = kms.create_key()
    with pytest.raises(InvalidAliasNameException):
        kms.call("CreateAlias", AliasName="alias/foo\n", TargetKeyId=key_id)


def test_key_arn_naming_an_alias_is_not_found(kms: Harness) -> None:
    key_id = kms.create_key()
    kms.call("CreateAlias", AliasName="alias/foo", TargetKeyId=key_id)
    with pytest.raises(NotFoundException):
        kms.call("DescribeKey", KeyId=f"arn:aws:kms:{REGION}:{ACCOUNT}:key/alias/foo")


def test_list_aliases_pagination(kms: Harness) -> None:
    key_id = kms.create_key()
    names = [f"alias/a{i:02d}" for i in range(12)]
    for name in names:
        kms.call("CreateAlias", AliasName=name, TargetKeyId=key_id)
    seen: list[str] = []
    params: dict[str, Any] = {"Limit": 5}
    while True:
        page = kms.call("ListAliases", **params)
        seen += [alias["AliasName"] for alias in page["Aliases"]]
        if not page["Truncated"]:
            break
        params["Marker"] = page["NextMarker"]
    assert seen == names
    assert len(kms.call("ListAliases", Limit=100)["Aliases"]) == 12
    with pytest.raises(InvalidMarkerException):
        kms.call("ListAliases", Marker="!!")


@pytest.mark.parametrize(("operation", "limit"), [("ListAliases", 101), ("ListResourceTags", 51)])
def test_list_limits_per_operation(kms: Harness, operation: str, limit: int) -> None:
    key_id = kms.create_key()
    params = {"KeyId": key_id} if operation == "ListResourceTags" else {}
    with pytest.raises(ValidationException):
        kms.call(operation, Limit=limit, **params)


# ---------------------------------------------------------------------- tags
def test_tag_untag_list(kms: Harness) -> None:
    key_id = kms.create_key(Tags=[{"TagKey": "a", "TagValue": "1"}])
    assert (
        kms.call(
            "TagResource",
            KeyId=key_id,
            Tags=[
                {"TagKey": "b", "TagValue": "2"},
                {"TagKey": "a", "TagValue": "replaced"},
            ],
        )
        == {}
    )
    tags = kms.call("ListResourceTags", KeyId=kms.arn(key_id))["Tags"]
    assert tags == [{"TagKey": "a", "TagValue": "replaced"}, {"TagKey": "b", "TagValue": "2"}]
    assert kms.call("UntagResource", KeyId=key_id, TagKeys=["a", "never-there"]) == {}
    assert kms.call("ListResourceTags", KeyId=key_id)["Tags"] == [{"TagKey": "b", "TagValue": "2"}]
    other = kms.create_key()
    assert kms.call("ListResourceTags", KeyId=other) == {"Tags": [], "Truncated": False}


@pytest.mark.parametrize(
    ("params", "error"),
    [
        ({"Tags": [{"TagKey": "aws:created-by", "TagValue": "me"}]}, TagException),
        ({"Tags": []}, ValidationException),
        ({}, ValidationException),
        ({"Tags": [{"TagKey": "k" * 129, "TagValue": "v"}]}, ValidationException),
        ({"Tags": [{"TagKey": "k", "TagValue": "v" * 257}]}, ValidationException),
        ({"Tags": [{"TagKey": "k", "TagValue": None}]}, ValidationException),
        ({"Tags": {"TagKey": "k", "TagValue": "v"}}, SerializationException),
    ],
)
def test_tag_resource_rejects(kms: Harness, params: dict[str, Any], error: type[KMSError]) -> None:
    key_id = kms.create_key(Tags=[{"TagKey": "keep", "TagValue": "me"}])
    with pytest.raises(error):
        kms.call("TagResource", KeyId=key_id, **params)
    assert kms.call("ListResourceTags", KeyId=key_id)["Tags"] == [
        {"TagKey": "keep", "TagValue": "me"}
    ]


def test_tag_count_limit_is_atomic(kms: Harness) -> None:
    key_id = kms.create_key(Tags=[{"TagKey": f"k{i:02d}", "TagValue": "v"} for i in range(49)])
    kms.call("TagResource", KeyId=key_id, Tags=[{"TagKey": "k49", "TagValue": "v"}])
    with pytest.raises(TagException):
        kms.call("TagResource", KeyId=key_id, Tags=[{"TagKey": "k50", "TagValue": "v"}])
    tags = kms.call("ListResourceTags", KeyId=key_id)["Tags"]
    assert len(tags) == 50 and "k50" not in {tag["TagKey"] for tag in tags}
    page = kms.call("ListResourceTags", KeyId=key_id, Limit=20)
    assert len(page["Tags"]) == 20 and page["Truncated"] is True


@pytest.mark.parametrize("tag_keys", [[], None, "a", [1]])
def test_untag_resource_rejects(kms: Harness, tag_keys: Any) -> None:
    key_id = kms.create_key()
    error = ValidationException if tag_keys in ([], None) else SerializationException
    with pytest.raises(error):
        kms.call("UntagResource", KeyId=key_id, TagKeys=tag_keys)


# ----------------------------------------------- every KeyId position, every form
FORMS = ["key-id", "key-arn", "alias-name", "alias-arn"]


def key_ref(kms: Harness, key_id: str, form: str) -> str:
    if form == "key-id":
        return key_id
    if form == "key-arn":
        return kms.arn(key_id)
    alias_name = "alias/ref/" + key_id[:8]
    if kms.keystore.get_alias(alias_name) is None:
        kms.call("CreateAlias", AliasName=alias_name, TargetKeyId=key_id)
    return alias_name if form == "alias-name" else kms.alias_arn(alias_name)


def _describe(kms: Harness, ref: str, key_id: str) -> None:
    assert kms.call("DescribeKey", KeyId=ref)["KeyMetadata"]["KeyId"] == key_id


def _encrypt(kms: Harness, ref: str, key_id: str) -> None:
    response = kms.call("Encrypt", KeyId=ref, Plaintext=b64(b"x"))
    assert response["KeyId"] == kms.arn(key_id)
    assert kms.decrypt(response["CiphertextBlob"], KeyId=key_id) == b"x"


def _decrypt(kms: Harness, ref: str, key_id: str) -> None:
    assert kms.decrypt(kms.encrypt(key_id, b"y"), KeyId=ref) == b"y"


def _reencrypt_source(kms: Harness, ref: str, key_id: str) -> None:
    response = kms.call(
        "ReEncrypt", CiphertextBlob=kms.encrypt(key_id), SourceKeyId=ref, DestinationKeyId=key_id
    )
    assert response["SourceKeyId"] == kms.arn(key_id)


def _reencrypt_destination(kms: Harness, ref: str, key_id: str) -> None:
    assert kms.decoy is not None and kms.decoy != key_id
    response = kms.call("ReEncrypt", CiphertextBlob=kms.encrypt(kms.decoy), DestinationKeyId=ref)
    assert response["KeyId"] == kms.arn(key_id)
    assert kms.decrypt(response["CiphertextBlob"], KeyId=key_id) == b"secret"


def _generate_data_key(kms: Harness, ref: str, key_id: str) -> None:
    response = kms.call("GenerateDataKey", KeyId=ref, NumberOfBytes=32)
    assert response["KeyId"] == kms.arn(key_id)
    assert kms.decrypt(response["CiphertextBlob"], KeyId=key_id) == unb64(response["Plaintext"])


def _generate_data_key_without_plaintext(kms: Harness, ref: str, key_id: str) -> None:
    response = kms.call("GenerateDataKeyWithoutPlaintext", KeyId=ref, KeySpec="AES_128")
    assert response["KeyId"] == kms.arn(key_id)
    assert len(kms.decrypt(response["CiphertextBlob"], KeyId=key_id)) == 16


def _disable_enable(kms: Harness, ref: str, key_id: str) -> None:
    kms.call("DisableKey", KeyId=ref)
    assert kms.describe(key_id)["KeyState"] == "Disabled"
    kms.call("EnableKey", KeyId=ref)
    assert kms.describe(key_id)["KeyState"] == "Enabled"


def _schedule_cancel_deletion(kms: Harness, ref: str, key_id: str) -> None:
    assert kms.call("ScheduleKeyDeletion", KeyId=ref)["KeyId"] == kms.arn(key_id)
    assert kms.describe(key_id)["KeyState"] == "PendingDeletion"
    assert kms.call("CancelKeyDeletion", KeyId=ref)["KeyId"] == kms.arn(key_id)
    assert kms.describe(key_id)["KeyState"] == "Disabled"


def _rotation_settings(kms: Harness, ref: str, key_id: str) -> None:
    kms.call("EnableKeyRotation", KeyId=ref, RotationPeriodInDays=100)
    status = kms.call("GetKeyRotationStatus", KeyId=ref)
    assert status["KeyId"] == kms.arn(key_id) and status["RotationPeriodInDays"] == 100
    kms.call("DisableKeyRotation", KeyId=ref)
    assert kms.call("GetKeyRotationStatus", KeyId=key_id)["KeyRotationEnabled"] is False


def _rotate_on_demand(kms: Harness, ref: str, key_id: str) -> None:
    assert kms.call("RotateKeyOnDemand", KeyId=ref) == {"KeyId": kms.arn(key_id)}
    assert len(kms.call("ListKeyRotations", KeyId=ref)["Rotations"]) == 1
    assert len(kms.call("ListKeyRotations", KeyId=key_id)["Rotations"]) == 1


POSITIONS: dict[str, Callable[[Harness, str, str], None]] = {
    "DescribeKey": _describe,
    "Encrypt": _encrypt,
    "Decrypt": _decrypt,
    "ReEncrypt.SourceKeyId": _reencrypt_source,
    "ReEncrypt.DestinationKeyId": _reencrypt_destination,
    "GenerateDataKey": _generate_data_key,
    "GenerateDataKeyWithoutPlaintext": _generate_data_key_without_plaintext,
    "DisableKey+EnableKey": _disable_enable,
    "ScheduleKeyDeletion+CancelKeyDeletion": _schedule_cancel_deletion,
    "Enable/Get/DisableKeyRotation": _rotation_settings,
    "RotateKeyOnDemand+ListKeyRotations": _rotate_on_demand,
}


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("position", sorted(POSITIONS))
def test_key_id_forms_in_every_position(kms: Harness, position: str, form: str) -> None:
    kms.decoy = kms.create_key()  # created first, so a sloppy lookup picks the wrong key
    key_id = kms.create_key()
    POSITIONS[position](kms, key_ref(kms, key_id, form), key_id)


def _tag(kms: Harness, ref: str, key_id: str) -> None:
    kms.call("TagResource", KeyId=ref, Tags=[{"TagKey": "t", "TagValue": "v"}])
    assert kms.call("ListResourceTags", KeyId=key_id)["Tags"] == [{"TagKey": "t", "TagValue": "v"}]


def _untag(kms: Harness, ref: str, key_id: str) -> None:
    kms.call("TagResource", KeyId=key_id, Tags=[{"TagKey": "t", "TagValue": "v"}])
    kms.call("UntagResource", KeyId=ref, TagKeys=["t"])
    assert kms.call("ListResourceTags", KeyId=key_id)["Tags"] == []


def _list_tags(kms: Harness, ref: str, key_id: str) -> None:
    kms.call("TagResource", KeyId=key_id, Tags=[{"TagKey": "t", "TagValue": "v"}])
    assert kms.call("ListResourceTags", KeyId=ref)["Tags"] == [{"TagKey": "t", "TagValue": "v"}]


def _list_aliases(kms: Harness, ref: str, key_id: str) -> None:
    kms.call("CreateAlias", AliasName="alias/listed", TargetKeyId=key_id)
    names = [alias["AliasName"] for alias in kms.call("ListAliases", KeyId=ref)["Aliases"]]
    assert "alias/listed" in names


def _create_alias_target(kms: Harness, ref: str, key_id: str) -> None:
    kms.call("CreateAlias", AliasName="alias/target", TargetKeyId=ref)
    assert kms.describe("alias/target")["KeyId"] == key_id


def _update_alias_target(kms: Harness, ref: str, key_id: str) -> None:
    kms.call("CreateAlias", AliasName="alias/moving", TargetKeyId=kms.decoy)
    kms.call("UpdateAlias", AliasName="alias/moving", TargetKeyId=ref)
    assert kms.describe("alias/moving")["KeyId"] == key_id


KEY_ONLY_POSITIONS: dict[str, Callable[[Harness, str, str], None]] = {
    "TagResource": _tag,
    "UntagResource": _untag,
    "ListResourceTags": _list_tags,
    "ListAliases.KeyId": _list_aliases,
    "CreateAlias.TargetKeyId": _create_alias_target,
    "UpdateAlias.TargetKeyId": _update_alias_target,
}


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("position", sorted(KEY_ONLY_POSITIONS))
def test_key_only_positions(kms: Harness, position: str, form: str) -> None:
    """These parameters take a key id or key ARN only (as in AWS), never an alias."""
    kms.decoy = kms.create_key()
    key_id = kms.create_key()
    ref = key_ref(kms, key_id, form)
    if form.startswith("alias"):
        with pytest.raises(ValidationException):
            KEY_ONLY_POSITIONS[position](kms, ref, key_id)
    else:
        KEY_ONLY_POSITIONS[position](kms, ref, key_id)


# --------------------------------------------------------------------- audit
SECRET_PLAINTEXT = b"PLAINTEXT-MARKER-\x00\x01-do-not-log"


def test_one_audit_event_per_call(kms: Harness) -> None:
    key_id = kms.create_key(Description="audited")
    blob = kms.encrypt(key_id, SECRET_PLAINTEXT, {"app": "x"})
    kms.decrypt(blob, {"app": "x"})
    with pytest.raises(InvalidCiphertextException):
        kms.decrypt(blob, {"app": "y"})
    with pytest.raises(NotFoundException):
        kms.call("DescribeKey", KeyId="alias/missing")
    with pytest.raises(ValidationException):
        kms.call("GenerateRandom", NumberOfBytes=0)
    with pytest.raises(UnknownOperationException):
        kms.call("DeleteEverything", KeyId=key_id)
    assert len(kms.events) == kms.requests == 7
    names = [event["eventName"] for event in kms.events]
    assert names == [
        "CreateKey",
        "Encrypt",
        "Decrypt",
        "Decrypt",
        "DescribeKey",
        "GenerateRandom",
        "DeleteEverything",
    ]
    codes = [event.get("errorCode") for event in kms.events]
    assert codes == [
        None,
        None,
        None,
        "InvalidCiphertextException",
        "NotFoundException",
        "ValidationException",
        "UnknownOperationException",
    ]
    event_ids = set()
    for number, event in enumerate(kms.events, start=1):
        assert event["eventVersion"]
        assert event["eventSource"] == "kms.amazonaws.com"
        assert event["eventTime"] == "2023-11-14T22:13:20Z"
        assert event["awsRegion"] == REGION
        assert event["recipientAccountId"] == ACCOUNT
        assert event["requestID"] == f"req-{number}"
        assert event["eventType"] == "AwsApiCall"
        identity = event["userIdentity"]
        assert (identity["uid"], identity["gid"], identity["pid"]) == (4321, 8765, 24680)
        assert identity["userName"] == CALLER.user_name
        if event.get("errorCode"):
            assert isinstance(event["errorMessage"], str)
            assert event["responseElements"] is None
        else:
            assert "errorMessage" not in event
        event_ids.add(event["eventID"])
        json.dumps(event)  # every event is JSON
    assert len(event_ids) == 7
    assert kms.events[1]["requestParameters"] == {
        "keyId": key_id,
        "encryptionContext": {"app": "x"},
    }
    assert kms.events[1]["resources"][0]["ARN"] == kms.arn(key_id)
    assert kms.events[0]["requestParameters"] == {"description": "audited"}
    assert kms.events[4]["readOnly"] is True and kms.events[1]["readOnly"] is False


def test_audit_never_holds_secrets(kms: Harness) -> None:
    key_id = kms.create_key()
    other = kms.create_key()
    blob = kms.encrypt(key_id, SECRET_PLAINTEXT)
    secrets = {SECRET_PLAINTEXT, unb64(blob)}
    kms.decrypt(blob)
    moved = kms.call("ReEncrypt", CiphertextBlob=blob, DestinationKeyId=other)["CiphertextBlob"]
    secrets.add(unb64(moved))
    for _ in range(3):
        response = kms.call("GenerateDataKey", KeyId=key_id, KeySpec="AES_256")
        secrets |= {unb64(response["Plaintext"]), unb64(response["CiphertextBlob"])}
    response = kms.call("GenerateDataKeyWithoutPlaintext", KeyId=key_id, NumberOfBytes=48)
    secrets.add(unb64(response["CiphertextBlob"]))
    secrets.add(kms.decrypt(response["CiphertextBlob"]))
    secrets.add(unb64(kms.call("GenerateRandom", NumberOfBytes=32)["Plaintext"]))
    # Refused calls carrying secrets are audited without them too.
    with pytest.raises(ValidationException):
        kms.call("Encrypt", KeyId=key_id, Plaintext=b64(SECRET_PLAINTEXT * 200))
    kms.call("DisableKey", KeyId=other)
    with pytest.raises(DisabledException):
        kms.decrypt(moved)
    secrets |= {kms.keystore.unseal_material(key_id, 1), kms.keystore.unseal_material(other, 1)}

    for event in kms.events:
        for section in ("requestParameters", "responseElements"):
            for field in event.get(section) or {}:
                assert field.lower() not in {"plaintext", "ciphertextblob"}, (event, field)
        text = json.dumps(event)
        for secret in secrets:
            assert secret is not None
            assert b64(secret) not in text
            assert base64.urlsafe_b64encode(secret).decode() not in text
            assert secret.hex() not in text
        assert "PLAINTEXT-MARKER" not in text


def test_internal_error_is_typed_and_audited(kms: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    key_id = kms.create_key()

    def broken(_key_id: str) -> None:
        raise RuntimeError("database fell over: secret detail")

    monkeypatch.setattr(kms.keystore, "get_key", broken)
    with pytest.raises(KMSInternalException) as caught:
        kms.call("DescribeKey", KeyId=key_id)
    assert "secret detail" not in str(caught.value)
    event = kms.events[-1]
    assert event["eventName"] == "DescribeKey"
    assert event["errorCode"] == "KMSInternalException"
    assert "secret detail" not in json.dumps(event)
    assert len(kms.events) == kms.requests


def test_service_without_audit_sink(tmp_path: Path) -> None:
    keystore = Keystore.create(tmp_path / "ks", RootKeySource.from_key_file(tmp_path / "k"))
    try:
        service = KeyService(keystore, None, clock=FakeClock())
        response = service.handle("CreateKey", {}, CALLER, "r")
        assert response["KeyMetadata"]["Arn"].startswith("arn:aws:kms:local:000000000000:key/")
        with pytest.raises(NotFoundException):
            service.handle("DescribeKey", {"KeyId": "alias/x"}, CALLER, "r")
        assert service.run_maintenance() == {"deleted": [], "rotated": [], "expired": []}
    finally:
        keystore.close()


def test_operation_names_cover_the_issue() -> None:
    assert set(KeyService.operation_names()) >= {
        "CreateKey",
        "DescribeKey",
        "ListKeys",
        "EnableKey",
        "DisableKey",
        "ScheduleKeyDeletion",
        "CancelKeyDeletion",
        "EnableKeyRotation",
        "DisableKeyRotation",
        "GetKeyRotationStatus",
        "RotateKeyOnDemand",
        "ListKeyRotations",
        "Encrypt",
        "Decrypt",
        "ReEncrypt",
        "GenerateDataKey",
        "GenerateDataKeyWithoutPlaintext",
        "GenerateRandom",
        "CreateAlias",
        "UpdateAlias",
        "DeleteAlias",
        "ListAliases",
        "TagResource",
        "UntagResource",
        "ListResourceTags",
    }


def test_random_uuid_is_a_version_4_uuid_in_canonical_form() -> None:
    import uuid as uuid_module

    from kmsfs.kms.service import random_uuid

    made = {random_uuid() for _ in range(2000)}
    assert len(made) == 2000
    for text in made:
        parsed = uuid_module.UUID(text)
        assert parsed.version == 4 and parsed.variant == uuid_module.RFC_4122
        assert str(parsed) == text


def test_random_uuid_asks_the_kernel_once_for_a_batch_of_ids(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two ids per request (request id, audit event id), one getrandom() per batch."""
    import os

    from kmsfs.kms import protocol

    real_urandom = os.urandom
    sizes: list[int] = []

    def counting_urandom(size: int) -> bytes:
        sizes.append(size)
        return real_urandom(size)

    monkeypatch.setattr(protocol, "_UUIDS_AHEAD", [])
    monkeypatch.setattr(os, "urandom", counting_urandom)
    made = {protocol.random_uuid() for _ in range(protocol.UUID_BATCH)}
    assert len(made) == protocol.UUID_BATCH
    assert sizes == [16 * protocol.UUID_BATCH]


def test_a_forked_child_does_not_repeat_its_parents_ids() -> None:
    import os

    from kmsfs.kms.protocol import random_uuid

    random_uuid()  # ids are waiting in the pool now
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next ids, to the parent
        try:
            os.write(write_end, ",".join(random_uuid() for _ in range(8)).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        child_ids = set(pipe.read().decode().split(","))
    os.waitpid(pid, 0)
    parent_ids = {random_uuid() for _ in range(8)}
    assert len(child_ids) == 8
    assert not child_ids & parent_ids


def test_iso_time_of_the_same_second_and_the_next() -> None:
    from kmsfs.kms.service import _iso

    assert _iso(1_700_000_000.0) == "2023-11-14T22:13:20Z"
    assert _iso(1_700_000_000.999) == "2023-11-14T22:13:20Z"
    assert _iso(1_700_000_001.0) == "2023-11-14T22:13:21Z"
    assert _iso(0.5) == "1970-01-01T00:00:00Z"


# ------------------------------------------------- the key record cache (_key_record)
def test_a_change_by_keyd_is_seen_by_the_very_next_request(kms: Harness) -> None:
    key_id = kms.create_key()
    blob = kms.encrypt(key_id)
    for _ in range(2):  # the key's record is cached now
        kms.call("GenerateDataKey", KeyId=key_id, KeySpec="AES_256")
        kms.decrypt(blob)
    kms.call("DisableKey", KeyId=key_id)
    with pytest.raises(DisabledException):
        kms.call("GenerateDataKey", KeyId=key_id, KeySpec="AES_256")
    with pytest.raises(DisabledException):
        kms.decrypt(blob)
    kms.call("EnableKey", KeyId=key_id)
    kms.call("GenerateDataKey", KeyId=key_id, KeySpec="AES_256")
    assert kms.decrypt(blob) == b"secret"


def test_a_change_by_another_connection_is_seen_by_the_very_next_request(kms: Harness) -> None:
    """Another process writing the keystore (an admin command) commits through its own
    SQLite connection: keyd's cached record must not outlive that commit."""
    key_id = kms.create_key()
    blob = kms.encrypt(key_id)
    for _ in range(2):
        kms.call("GenerateDataKey", KeyId=key_id, KeySpec="AES_256")
        kms.decrypt(blob)
    other = sqlite3.connect(kms.db_path)
    try:
        with other:
            other.execute("UPDATE keys SET key_state = 'Disabled' WHERE key_id = ?", (key_id,))
    finally:
        other.close()
    with pytest.raises(DisabledException):
        kms.call("GenerateDataKey", KeyId=key_id, KeySpec="AES_256")
    with pytest.raises(DisabledException):
        kms.decrypt(blob)


def test_a_cached_key_record_is_found_without_a_statement(kms: Harness) -> None:
    """While nothing changed, a request's key lookup runs no SQL at all (not even
    ``PRAGMA data_version``, two fcntl() locks): the WAL index header tells."""
    key_id = kms.create_key()
    for _ in range(2):
        kms.service._key_record(key_id)
    statements: list[str] = []
    kms.keystore._db.set_trace_callback(statements.append)
    try:
        for _ in range(3):
            assert kms.service._key_record(key_id) is not None
    finally:
        kms.keystore._db.set_trace_callback(None)
    assert statements == []


def test_a_change_after_the_wal_restarts_is_seen_by_the_next_request(kms: Harness) -> None:
    """Another connection checkpoints and empties the WAL (it restarts with new salts,
    and its frame count starts over), then commits: keyd's cache must still drop."""
    key_id = kms.create_key()
    blob = kms.encrypt(key_id)
    for _ in range(2):
        kms.call("GenerateDataKey", KeyId=key_id, KeySpec="AES_256")
        kms.decrypt(blob)
    for state in ("Disabled", "Enabled", "Disabled"):
        other = sqlite3.connect(kms.db_path, isolation_level=None)
        try:
            other.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            other.execute("UPDATE keys SET key_state = ? WHERE key_id = ?", (state, key_id))
        finally:
            other.close()
        if state == "Disabled":
            with pytest.raises(DisabledException):
                kms.call("GenerateDataKey", KeyId=key_id, KeySpec="AES_256")
            with pytest.raises(DisabledException):
                kms.decrypt(blob)
        else:
            kms.call("GenerateDataKey", KeyId=key_id, KeySpec="AES_256")
            assert kms.decrypt(blob) == b"secret"


def test_a_deleted_key_is_not_found_by_the_next_request(kms: Harness) -> None:
    key_id = kms.create_key()
    kms.call("GenerateDataKey", KeyId=key_id, KeySpec="AES_256")
    kms.call("ScheduleKeyDeletion", KeyId=key_id, PendingWindowInDays=7)
    with pytest.raises(KMSInvalidStateException):
        kms.call("GenerateDataKey", KeyId=key_id, KeySpec="AES_256")
