"""Imported key material (issue 18's BYOK) on the sans-IO key service: CreateKey with
Origin EXTERNAL, GetParametersForImport, ImportKeyMaterial, DeleteImportedKeyMaterial,
expiry, AWS's wrapping algorithms and errors, and an escrow copy re-imported into a
fresh keystore under the key's old id."""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding
from cryptography.hazmat.primitives.keywrap import aes_key_wrap_with_padding

from kmsfs.errors import (
    AlreadyExistsException,
    ExpiredImportTokenException,
    IncorrectKeyMaterialException,
    InvalidCiphertextException,
    InvalidImportTokenException,
    KMSInvalidStateException,
    UnsupportedOperationException,
    ValidationException,
)
from kmsfs.kms.caller import Caller
from kmsfs.kms.keystore import Keystore, RootKeySource
from kmsfs.kms.service import KeyService

ME = Caller(uid=0, gid=0, pid=1)
NOW = 1_800_000_000.0
DAY = 86400.0
CONTEXT = {"file": "f1"}


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> float:
        return self.now


class Kms:
    def __init__(self, path: Path) -> None:
        self.root_key = path / "root.key"
        self.path = path / "ks"
        self.keystore = Keystore.create(self.path, RootKeySource.from_key_file(self.root_key))
        self.events: list[dict[str, Any]] = []
        self.clock = Clock()
        self.service = KeyService(self.keystore, self.events, clock=self.clock)
        self.n = 0

    def __call__(self, operation: str, **params: Any) -> dict[str, Any]:
        self.n += 1
        return self.service.handle(operation, params, ME, f"r{self.n}")

    def external_key(self, **params: Any) -> str:
        return self("CreateKey", Origin="EXTERNAL", **params)["KeyMetadata"]["KeyId"]

    def state(self, key_id: str) -> str:
        return self("DescribeKey", KeyId=key_id)["KeyMetadata"]["KeyState"]

    def parameters(
        self, key_id: str, algorithm: str = "RSAES_OAEP_SHA_256", spec: str = "RSA_2048"
    ):
        response = self(
            "GetParametersForImport",
            KeyId=key_id,
            WrappingAlgorithm=algorithm,
            WrappingKeySpec=spec,
        )
        public = serialization.load_der_public_key(base64.b64decode(response["PublicKey"]))
        return public, response["ImportToken"], response

    def import_material(
        self, key_id: str, material: bytes, algorithm: str = "RSAES_OAEP_SHA_256", **extra: Any
    ) -> None:
        public, token, _ = self.parameters(key_id, algorithm)
        params = {"ExpirationModel": "KEY_MATERIAL_DOES_NOT_EXPIRE", **extra}
        self(
            "ImportKeyMaterial", KeyId=key_id, ImportToken=token,
            EncryptedKeyMaterial=b64(wrap(public, algorithm, material)), **params,
        )  # fmt: skip

    def encrypt(self, key_id: str, data: bytes = b"secret") -> str:
        return self("Encrypt", KeyId=key_id, Plaintext=b64(data), EncryptionContext=CONTEXT)[
            "CiphertextBlob"
        ]

    def decrypt(self, blob: str) -> bytes:
        return base64.b64decode(
            self("Decrypt", CiphertextBlob=blob, EncryptionContext=CONTEXT)["Plaintext"]
        )


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def wrap(public: Any, algorithm: str, material: bytes) -> bytes:
    """As AWS's "Encrypt your key material" page describes each wrapping algorithm."""
    digest = hashes.SHA256 if algorithm.endswith("SHA_256") else hashes.SHA1
    oaep = padding.OAEP(mgf=padding.MGF1(digest()), algorithm=digest(), label=None)
    if algorithm.startswith("RSAES_OAEP"):
        return public.encrypt(material, oaep)
    aes_key = os.urandom(32)
    return public.encrypt(aes_key, oaep) + aes_key_wrap_with_padding(aes_key, material)


@pytest.fixture
def kms(tmp_path: Path) -> Iterator[Kms]:
    instance = Kms(tmp_path)
    try:
        yield instance
    finally:
        instance.keystore.close()


@pytest.mark.parametrize(
    "algorithm",
    [
        "RSAES_OAEP_SHA_1",
        "RSAES_OAEP_SHA_256",
        "RSA_AES_KEY_WRAP_SHA_1",
        "RSA_AES_KEY_WRAP_SHA_256",
    ],
)
def test_import_with_each_wrapping_algorithm(kms: Kms, algorithm: str) -> None:
    key_id = kms.external_key()
    metadata = kms("DescribeKey", KeyId=key_id)["KeyMetadata"]
    assert metadata["Origin"] == "EXTERNAL" and metadata["KeyState"] == "PendingImport"
    assert metadata["Enabled"] is False and "ExpirationModel" not in metadata
    with pytest.raises(KMSInvalidStateException):
        kms.encrypt(key_id)
    material = os.urandom(32)
    kms.import_material(key_id, material, algorithm)
    metadata = kms("DescribeKey", KeyId=key_id)["KeyMetadata"]
    assert metadata["KeyState"] == "Enabled"
    assert metadata["ExpirationModel"] == "KEY_MATERIAL_DOES_NOT_EXPIRE"
    assert kms.decrypt(kms.encrypt(key_id)) == b"secret"
    # the material is what was imported: a blob made with it by hand (keyd's blob
    # format: header, nonce, AES-GCM under the material) is what keyd makes
    assert kms.keystore.unseal_material(key_id, 1) == material


def test_parameters_are_aws_shaped_and_validated(kms: Kms) -> None:
    key_id = kms.external_key()
    public, token, response = kms.parameters(key_id, "RSA_AES_KEY_WRAP_SHA_256", "RSA_3072")
    assert public.key_size == 3072
    assert response["KeyId"].endswith(key_id)
    assert response["ParametersValidTo"] == NOW + DAY
    for algorithm, spec, error in [
        ("RSAES_PKCS1_V1_5", "RSA_2048", UnsupportedOperationException),
        ("SM2PKE", "RSA_2048", UnsupportedOperationException),
        ("RSA_OAEP", "RSA_2048", ValidationException),
        ("RSAES_OAEP_SHA_256", "RSA_1024", ValidationException),
    ]:
        with pytest.raises(error):
            kms("GetParametersForImport", KeyId=key_id, WrappingAlgorithm=algorithm,
                WrappingKeySpec=spec)  # fmt: skip
    ordinary = kms("CreateKey")["KeyMetadata"]["KeyId"]
    with pytest.raises(UnsupportedOperationException, match="Origin AWS_KMS"):
        kms.parameters(ordinary)


def test_tokens_errors_and_wrong_material(kms: Kms) -> None:
    key_id, other = kms.external_key(), kms.external_key()
    public, token, _ = kms.parameters(key_id)
    material = os.urandom(32)
    encrypted = b64(wrap(public, "RSAES_OAEP_SHA_256", material))

    def load(**params: Any) -> None:
        kms("ImportKeyMaterial", **{"KeyId": key_id, "ImportToken": token,
            "EncryptedKeyMaterial": encrypted, "ExpirationModel": "KEY_MATERIAL_DOES_NOT_EXPIRE",
            **params})  # fmt: skip

    _, other_token, _ = kms.parameters(other)
    with pytest.raises(InvalidImportTokenException):
        load(ImportToken=other_token)  # another key's token
    with pytest.raises(InvalidImportTokenException):
        load(ImportToken=b64(os.urandom(64)))
    with pytest.raises(InvalidCiphertextException):
        load(EncryptedKeyMaterial=b64(os.urandom(256)))
    with pytest.raises(IncorrectKeyMaterialException, match="256 bits"):
        load(EncryptedKeyMaterial=b64(wrap(public, "RSAES_OAEP_SHA_256", os.urandom(16))))
    kms.clock.now += DAY + 1
    with pytest.raises(ExpiredImportTokenException):
        load()
    kms.clock.now = NOW
    load()
    assert kms.state(key_id) == "Enabled"
    # only the same material may come back
    with pytest.raises(IncorrectKeyMaterialException):
        kms.import_material(key_id, os.urandom(32))
    kms.import_material(key_id, material)  # the same: fine (e.g. to change expiry)
    # nothing secret in the audit log: no token, no wrapped material, no material
    log = json.dumps(kms.events)
    assert token not in log and encrypted not in log and b64(material) not in log


def test_valid_to_rules(kms: Kms) -> None:
    key_id = kms.external_key()
    public, token, _ = kms.parameters(key_id)
    encrypted = b64(wrap(public, "RSAES_OAEP_SHA_256", os.urandom(32)))
    for params in (
        {},  # KEY_MATERIAL_EXPIRES is the default: ValidTo required
        {"ExpirationModel": "KEY_MATERIAL_EXPIRES", "ValidTo": NOW + 60},
        {"ExpirationModel": "KEY_MATERIAL_EXPIRES", "ValidTo": NOW + 366 * DAY},
        {"ExpirationModel": "KEY_MATERIAL_DOES_NOT_EXPIRE", "ValidTo": NOW + DAY},
        {"ExpirationModel": "NEVER"},
    ):
        with pytest.raises(ValidationException):
            kms("ImportKeyMaterial", KeyId=key_id, ImportToken=token,
                EncryptedKeyMaterial=encrypted, **params)  # fmt: skip
    assert kms.state(key_id) == "PendingImport"


def test_expired_material_is_unusable_then_deleted_then_reimported(kms: Kms) -> None:
    key_id = kms.external_key()
    material = os.urandom(32)
    kms.import_material(
        key_id, material, ExpirationModel="KEY_MATERIAL_EXPIRES", ValidTo=NOW + 2 * DAY
    )
    assert kms("DescribeKey", KeyId=key_id)["KeyMetadata"]["ValidTo"] == NOW + 2 * DAY
    blob = kms.encrypt(key_id)
    kms.clock.now = NOW + 2 * DAY  # ValidTo reached: unusable at once
    with pytest.raises(KMSInvalidStateException, match="expired"):
        kms.decrypt(blob)
    assert kms.service.run_maintenance()["expired"] == [key_id]
    assert kms.events[-1]["eventName"] == "DeleteExpiredKeyMaterial"
    assert kms.state(key_id) == "PendingImport"
    assert kms.keystore.unseal_material(key_id, 1) is None
    with pytest.raises(KMSInvalidStateException):
        kms.decrypt(blob)
    kms.import_material(key_id, material)  # the escrowed copy
    assert kms.decrypt(blob) == b"secret"


def test_delete_imported_material_and_state_rules(kms: Kms) -> None:
    key_id = kms.external_key()
    with pytest.raises(KMSInvalidStateException):
        kms("EnableKey", KeyId=key_id)  # no material yet
    with pytest.raises(KMSInvalidStateException):
        kms("DeleteImportedKeyMaterial", KeyId=key_id)
    material = os.urandom(32)
    kms.import_material(key_id, material)
    blob = kms.encrypt(key_id)
    with pytest.raises(UnsupportedOperationException):
        kms("EnableKeyRotation", KeyId=key_id)
    with pytest.raises(UnsupportedOperationException):
        kms("RotateKeyOnDemand", KeyId=key_id)
    kms("DeleteImportedKeyMaterial", KeyId=key_id)
    assert kms.events[-1]["eventName"] == "DeleteImportedKeyMaterial"
    assert kms.state(key_id) == "PendingImport"
    with pytest.raises(KMSInvalidStateException):
        kms.decrypt(blob)
    # scheduled for deletion and cancelled without material: back to PendingImport
    kms("ScheduleKeyDeletion", KeyId=key_id, PendingWindowInDays=7)
    kms("CancelKeyDeletion", KeyId=key_id)
    assert kms.state(key_id) == "PendingImport"
    kms.import_material(key_id, material)
    assert kms.decrypt(blob) == b"secret"


def test_escrowed_material_opens_old_ciphertext_in_a_fresh_keystore(tmp_path: Path) -> None:
    first = Kms(tmp_path / "a")
    key_id = first.external_key()
    escrow = os.urandom(32)  # the copy the user keeps outside keyd
    first.import_material(key_id, escrow)
    blob = first.encrypt(key_id)
    first.keystore.close()  # the keystore is lost

    fresh = Kms(tmp_path / "b")
    try:
        with pytest.raises(ValidationException):
            fresh("CreateKey", KeyId=key_id)  # a chosen id only for Origin EXTERNAL
        assert fresh.external_key(KeyId=key_id.upper()) == key_id
        with pytest.raises(AlreadyExistsException):
            fresh.external_key(KeyId=key_id)
        with pytest.raises(ValidationException):
            fresh.external_key(KeyId="not-a-uuid")
        fresh.import_material(key_id, escrow)
        assert fresh.decrypt(blob) == b"secret"
        # it survives a restart of keyd
        fresh.keystore.close()
        fresh.keystore = Keystore.open(fresh.path, RootKeySource.from_key_file(fresh.root_key))
        fresh.service = KeyService(fresh.keystore, fresh.events, clock=fresh.clock)
        assert fresh.decrypt(blob) == b"secret"
        with pytest.raises(IncorrectKeyMaterialException):
            fresh.import_material(key_id, os.urandom(32))
    finally:
        fresh.keystore.close()
