"""Asymmetric (RSA, ECC) and HMAC CMKs on the sans-IO key service (issue 15).

Every key spec x key usage x algorithm the AWS KMS key spec reference lists: keyd
signs, `cryptography` verifies using only GetPublicKey's output; `cryptography`
encrypts to the exported public key and keyd decrypts; every refused combination and
limit answers AWS's exception. HMAC keys are checked against the standard library's
hmac (over material unsealed test-only) and RFC 4231's vectors (material imported
test-only).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, utils
from hypothesis import given, settings
from hypothesis import strategies as st

from kmsfs.errors import (
    AccessDeniedException,
    DisabledException,
    DryRunOperationException,
    InvalidCiphertextException,
    InvalidKeyUsageException,
    KMSError,
    KMSInvalidMacException,
    KMSInvalidSignatureException,
    SerializationException,
    UnsupportedOperationException,
    ValidationException,
)
from kmsfs.kms import asymmetric
from kmsfs.kms.caller import Caller
from kmsfs.kms.keystore import KeyRecord, Keystore, RootKeySource
from kmsfs.kms.service import KeyService

CALLER = Caller(uid=4321, gid=8765, pid=24680)
STRANGER = Caller(uid=4322, gid=8766, pid=24681)

RSA_SPECS = ("RSA_2048", "RSA_3072", "RSA_4096")
ECC_SIGNING = {
    "ECC_NIST_P256": "ECDSA_SHA_256",
    "ECC_NIST_P384": "ECDSA_SHA_384",
    "ECC_NIST_P521": "ECDSA_SHA_512",
    "ECC_SECG_P256K1": "ECDSA_SHA_256",
}
NIST_CURVES = ("ECC_NIST_P256", "ECC_NIST_P384", "ECC_NIST_P521")
HMAC_SPECS = {
    "HMAC_224": ("HMAC_SHA_224", "sha224"),
    "HMAC_256": ("HMAC_SHA_256", "sha256"),
    "HMAC_384": ("HMAC_SHA_384", "sha384"),
    "HMAC_512": ("HMAC_SHA_512", "sha512"),
}
RSA_SIGNING = (
    "RSASSA_PKCS1_V1_5_SHA_256",
    "RSASSA_PKCS1_V1_5_SHA_384",
    "RSASSA_PKCS1_V1_5_SHA_512",
    "RSASSA_PSS_SHA_256",
    "RSASSA_PSS_SHA_384",
    "RSASSA_PSS_SHA_512",
)
HASHES = {"256": hashes.SHA256, "384": hashes.SHA384, "512": hashes.SHA512}
#: AWS's RSA Encrypt plaintext limits (Key spec reference, "RSA key specs for
#: encryption and decryption"), in bytes
PLAINTEXT_LIMITS = {
    ("RSA_2048", "RSAES_OAEP_SHA_1"): 214,
    ("RSA_2048", "RSAES_OAEP_SHA_256"): 190,
    ("RSA_3072", "RSAES_OAEP_SHA_1"): 342,
    ("RSA_3072", "RSAES_OAEP_SHA_256"): 318,
    ("RSA_4096", "RSAES_OAEP_SHA_1"): 470,
    ("RSA_4096", "RSAES_OAEP_SHA_256"): 446,
}
OAEP_HASHES = {"RSAES_OAEP_SHA_1": hashes.SHA1, "RSAES_OAEP_SHA_256": hashes.SHA256}


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def unb64(text: str) -> bytes:
    return base64.b64decode(text)


class Harness:
    def __init__(self, keystore: Keystore) -> None:
        self.keystore = keystore
        self.events: list[dict[str, Any]] = []
        self.service = KeyService(keystore, self.events)
        self.keys: dict[tuple[str, str], str] = {}
        self.requests = 0

    def call(self, operation: str, caller: Caller = CALLER, **params: Any) -> dict[str, Any]:
        self.requests += 1
        return self.service.handle(operation, params, caller, f"req-{self.requests}")

    def key(self, spec: str, usage: str) -> str:
        """One key per spec and usage, made once for the module (RSA_4096 is slow)."""
        if (spec, usage) not in self.keys:
            metadata = self.call("CreateKey", KeySpec=spec, KeyUsage=usage)["KeyMetadata"]
            self.keys[spec, usage] = metadata["KeyId"]
        return self.keys[spec, usage]

    def public_key(self, key_id: str) -> Any:
        der = unb64(self.call("GetPublicKey", KeyId=key_id)["PublicKey"])
        return serialization.load_der_public_key(der)

    def private_key_test_only(self, key_id: str) -> Any:
        material = self.keystore.unseal_material(key_id, 1)
        assert material is not None
        return serialization.load_der_private_key(material, password=None)


def make_harness(path: Path) -> Harness:
    keystore = Keystore.create(
        path / "keystore", RootKeySource.from_key_file(path / "root.key"), region="eu-test-1"
    )
    return Harness(keystore)


@pytest.fixture(scope="module")
def kms(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    harness = make_harness(tmp_path_factory.mktemp("asym"))
    try:
        yield harness
    finally:
        harness.keystore.close()


@pytest.fixture
def fresh(tmp_path: Path) -> Iterator[Harness]:
    harness = make_harness(tmp_path)
    try:
        yield harness
    finally:
        harness.keystore.close()


def _all_spec_usages() -> list[tuple[str, str]]:
    return [
        (spec, usage)
        for spec, usages in asymmetric.KEY_SPEC_USAGES.items()
        for usage in usages
        if spec != "SYMMETRIC_DEFAULT"
    ]


def _expected_algorithms(spec: str, usage: str) -> dict[str, list[str]]:
    if usage == "ENCRYPT_DECRYPT":
        return {"EncryptionAlgorithms": ["RSAES_OAEP_SHA_1", "RSAES_OAEP_SHA_256"]}
    if usage == "SIGN_VERIFY":
        return {
            "SigningAlgorithms": list(RSA_SIGNING) if spec in RSA_SPECS else [ECC_SIGNING[spec]]
        }
    if usage == "GENERATE_VERIFY_MAC":
        return {"MacAlgorithms": [HMAC_SPECS[spec][0]]}
    return {"KeyAgreementAlgorithms": ["ECDH"]}


_ALGORITHM_FIELDS = (
    "EncryptionAlgorithms",
    "SigningAlgorithms",
    "MacAlgorithms",
    "KeyAgreementAlgorithms",
)


# ------------------------------------------------------------- create/describe
@pytest.mark.parametrize(("spec", "usage"), _all_spec_usages())
def test_create_and_describe_every_spec_and_usage(kms: Harness, spec: str, usage: str) -> None:
    key_id = kms.key(spec, usage)
    metadata = kms.call("DescribeKey", KeyId=key_id)["KeyMetadata"]
    assert metadata["KeySpec"] == metadata["CustomerMasterKeySpec"] == spec
    assert metadata["KeyUsage"] == usage
    expected = _expected_algorithms(spec, usage)
    assert {name: metadata[name] for name in _ALGORITHM_FIELDS if name in metadata} == expected


@pytest.mark.parametrize(("spec", "usage"), _all_spec_usages())
def test_get_public_key_or_refusal(kms: Harness, spec: str, usage: str) -> None:
    key_id = kms.key(spec, usage)
    if spec in HMAC_SPECS:
        with pytest.raises(UnsupportedOperationException):
            kms.call("GetPublicKey", KeyId=key_id)
        return
    response = kms.call("GetPublicKey", KeyId=key_id)
    assert response["KeySpec"] == response["CustomerMasterKeySpec"] == spec
    assert response["KeyUsage"] == usage
    assert response["KeyId"].endswith(key_id)
    assert {n: response[n] for n in _ALGORITHM_FIELDS if n in response} == (
        _expected_algorithms(spec, usage)
    )
    public = serialization.load_der_public_key(unb64(response["PublicKey"]))
    if spec in RSA_SPECS:
        assert isinstance(public, rsa.RSAPublicKey)
        assert public.key_size == int(spec[4:])
    else:
        assert isinstance(public, ec.EllipticCurvePublicKey)
        expected_curve = {
            "ECC_NIST_P256": "secp256r1",
            "ECC_NIST_P384": "secp384r1",
            "ECC_NIST_P521": "secp521r1",
            "ECC_SECG_P256K1": "secp256k1",
        }[spec]
        assert public.curve.name == expected_curve


def test_get_public_key_refused_for_symmetric_key(kms: Harness) -> None:
    key_id = kms.call("CreateKey")["KeyMetadata"]["KeyId"]
    with pytest.raises(UnsupportedOperationException):
        kms.call("GetPublicKey", KeyId=key_id)


@pytest.mark.parametrize(
    ("spec", "usage", "allowed"),
    [
        ("RSA_2048", "GENERATE_VERIFY_MAC", "ENCRYPT_DECRYPT, SIGN_VERIFY"),
        ("RSA_4096", "KEY_AGREEMENT", "ENCRYPT_DECRYPT, SIGN_VERIFY"),
        ("ECC_NIST_P256", "ENCRYPT_DECRYPT", "SIGN_VERIFY, KEY_AGREEMENT"),
        ("ECC_NIST_P521", "GENERATE_VERIFY_MAC", "SIGN_VERIFY, KEY_AGREEMENT"),
        ("ECC_SECG_P256K1", "KEY_AGREEMENT", "SIGN_VERIFY"),
        ("ECC_SECG_P256K1", "ENCRYPT_DECRYPT", "SIGN_VERIFY"),
        ("HMAC_256", "ENCRYPT_DECRYPT", "GENERATE_VERIFY_MAC"),
        ("HMAC_512", "SIGN_VERIFY", "GENERATE_VERIFY_MAC"),
        ("SYMMETRIC_DEFAULT", "SIGN_VERIFY", "ENCRYPT_DECRYPT"),
        ("SYMMETRIC_DEFAULT", "GENERATE_VERIFY_MAC", "ENCRYPT_DECRYPT"),
    ],
)
def test_create_key_refuses_combination_naming_allowed_usages(
    fresh: Harness, spec: str, usage: str, allowed: str
) -> None:
    with pytest.raises(ValidationException) as caught:
        fresh.call("CreateKey", KeySpec=spec, KeyUsage=usage)
    assert allowed in caught.value.message
    assert fresh.call("ListKeys")["Keys"] == []


def test_create_key_default_usage_for_rsa_is_encrypt_decrypt(fresh: Harness) -> None:
    metadata = fresh.call("CreateKey", KeySpec="RSA_2048")["KeyMetadata"]
    assert metadata["KeyUsage"] == "ENCRYPT_DECRYPT"


def test_key_material_sealed_as_pkcs8_and_hmac_lengths(kms: Harness) -> None:
    """Private keys are PKCS#8 DER inside the sealed record; the sealed row does not
    hold them in the clear; HMAC keys are as long as their digest."""
    key_id = kms.key("ECC_NIST_P256", "SIGN_VERIFY")
    material = kms.keystore.unseal_material(key_id, 1)
    assert material is not None
    private = serialization.load_der_private_key(material, password=None)
    assert isinstance(private, ec.EllipticCurvePrivateKey)
    sealed = kms.keystore._db.execute(
        "SELECT sealed FROM key_versions WHERE key_id = ?", (key_id,)
    ).fetchone()[0]
    assert material not in bytes(sealed)
    for spec, (_, name) in HMAC_SPECS.items():
        hmac_material = kms.keystore.unseal_material(kms.key(spec, "GENERATE_VERIFY_MAC"), 1)
        assert hmac_material is not None
        assert len(hmac_material) == hashlib.new(name).digest_size


# ------------------------------------------------------------- sign and verify
def _sign_cases() -> list[tuple[str, str]]:
    cases = [(spec, algorithm) for spec in RSA_SPECS for algorithm in RSA_SIGNING]
    cases += list(ECC_SIGNING.items())
    return cases


def _verify_outside(public: Any, algorithm: str, message: bytes, signature: bytes) -> None:
    """Verify with `cryptography` only (raises InvalidSignature)."""
    digest = HASHES[algorithm[-3:]]()
    if algorithm.startswith("RSASSA_PSS_"):
        public.verify(
            signature,
            message,
            padding.PSS(mgf=padding.MGF1(digest), salt_length=digest.digest_size),
            digest,
        )
    elif algorithm.startswith("RSASSA_PKCS1_V1_5_"):
        public.verify(signature, message, padding.PKCS1v15(), digest)
    else:
        public.verify(signature, message, ec.ECDSA(digest))


@pytest.mark.parametrize(("spec", "algorithm"), _sign_cases())
def test_sign_in_keyd_verify_with_public_key_only(kms: Harness, spec: str, algorithm: str) -> None:
    key_id = kms.key(spec, "SIGN_VERIFY")
    public = kms.public_key(key_id)
    message = os.urandom(100)
    response = kms.call("Sign", KeyId=key_id, Message=b64(message), SigningAlgorithm=algorithm)
    assert response["SigningAlgorithm"] == algorithm
    signature = unb64(response["Signature"])
    _verify_outside(public, algorithm, message, signature)
    # and in keyd
    verified = kms.call(
        "Verify",
        KeyId=key_id,
        Message=b64(message),
        Signature=b64(signature),
        SigningAlgorithm=algorithm,
    )
    assert verified["SignatureValid"] is True
    # DIGEST: keyd signs the given digest, which verifies against the raw message
    digest = hashlib.new("sha" + algorithm[-3:], message).digest()
    signature = unb64(
        kms.call(
            "Sign",
            KeyId=key_id,
            Message=b64(digest),
            MessageType="DIGEST",
            SigningAlgorithm=algorithm,
        )["Signature"]
    )
    _verify_outside(public, algorithm, message, signature)
    # a signature made outside (ECDSA keys cannot sign outside keyd: use keyd's own
    # with one flipped bit) fails in keyd with KMSInvalidSignatureException
    flipped = bytearray(signature)
    flipped[len(flipped) // 2] ^= 0x01
    with pytest.raises(InvalidSignature):
        _verify_outside(public, algorithm, message, bytes(flipped))
    with pytest.raises(KMSInvalidSignatureException):
        kms.call(
            "Verify",
            KeyId=key_id,
            Message=b64(message),
            Signature=b64(bytes(flipped)),
            SigningAlgorithm=algorithm,
        )
    with pytest.raises(KMSInvalidSignatureException):  # another message
        kms.call(
            "Verify",
            KeyId=key_id,
            Message=b64(message + b"x"),
            Signature=b64(signature),
            SigningAlgorithm=algorithm,
        )


@pytest.mark.parametrize(("spec", "algorithm"), [("RSA_2048", a) for a in RSA_SIGNING])
def test_verify_in_keyd_a_signature_made_outside(kms: Harness, spec: str, algorithm: str) -> None:
    """The reverse: a signature made with the private key (unsealed test-only) by
    `cryptography` verifies in keyd."""
    key_id = kms.key(spec, "SIGN_VERIFY")
    private = kms.private_key_test_only(key_id)
    message = b"signed outside keyd"
    digest = HASHES[algorithm[-3:]]()
    if algorithm.startswith("RSASSA_PSS_"):
        pad: Any = padding.PSS(mgf=padding.MGF1(digest), salt_length=digest.digest_size)
    else:
        pad = padding.PKCS1v15()
    signature = private.sign(message, pad, digest)
    assert kms.call(
        "Verify",
        KeyId=key_id,
        Message=b64(message),
        Signature=b64(signature),
        SigningAlgorithm=algorithm,
    )["SignatureValid"]


@pytest.mark.parametrize(
    ("spec", "algorithm", "size"),
    [
        ("ECC_NIST_P256", "ECDSA_SHA_256", 32),
        ("ECC_NIST_P384", "ECDSA_SHA_384", 48),
        ("ECC_NIST_P521", "ECDSA_SHA_512", 64),
        ("RSA_2048", "RSASSA_PSS_SHA_384", 48),
        ("RSA_2048", "RSASSA_PKCS1_V1_5_SHA_512", 64),
    ],
)
def test_digest_of_wrong_length_refused(kms: Harness, spec: str, algorithm: str, size: int) -> None:
    key_id = kms.key(spec, "SIGN_VERIFY")
    for wrong in (size - 1, size + 1, 20):
        with pytest.raises(ValidationException, match="Digest is invalid length"):
            kms.call(
                "Sign",
                KeyId=key_id,
                Message=b64(bytes(wrong)),
                MessageType="DIGEST",
                SigningAlgorithm=algorithm,
            )
        with pytest.raises(ValidationException, match="Digest is invalid length"):
            kms.call(
                "Verify",
                KeyId=key_id,
                Message=b64(bytes(wrong)),
                MessageType="DIGEST",
                Signature=b64(b"x" * 64),
                SigningAlgorithm=algorithm,
            )
    kms.call(
        "Sign",
        KeyId=key_id,
        Message=b64(bytes(size)),
        MessageType="DIGEST",
        SigningAlgorithm=algorithm,
    )


def test_sign_message_limits_and_refusals(kms: Harness) -> None:
    key_id = kms.key("ECC_NIST_P256", "SIGN_VERIFY")
    kms.call("Sign", KeyId=key_id, Message=b64(bytes(4096)), SigningAlgorithm="ECDSA_SHA_256")
    refusals: list[tuple[dict[str, Any], type[KMSError]]] = [
        ({"Message": b64(bytes(4097)), "SigningAlgorithm": "ECDSA_SHA_256"}, ValidationException),
        ({"Message": "", "SigningAlgorithm": "ECDSA_SHA_256"}, ValidationException),
        ({"Message": b64(b"m")}, ValidationException),  # SigningAlgorithm is required
        ({"Message": b64(b"m"), "SigningAlgorithm": "ECDSA_SHA_257"}, ValidationException),
        (
            {"Message": b64(b"m"), "SigningAlgorithm": "ECDSA_SHA_256", "MessageType": "RAWX"},
            ValidationException,
        ),
        ({"Message": b64(b"m"), "SigningAlgorithm": "ECDSA_SHA_384"}, InvalidKeyUsageException),
        (
            {"Message": b64(b"m"), "SigningAlgorithm": "RSASSA_PSS_SHA_256"},
            InvalidKeyUsageException,
        ),
        ({"Message": 5, "SigningAlgorithm": "ECDSA_SHA_256"}, SerializationException),
    ]
    for params, error in refusals:
        with pytest.raises(error) as caught:
            kms.call("Sign", KeyId=key_id, **params)
        assert caught.value.aws_type == error.__name__, params
    # the allowed algorithms are named
    with pytest.raises(InvalidKeyUsageException, match="ECDSA_SHA_256"):
        kms.call("Sign", KeyId=key_id, Message=b64(b"m"), SigningAlgorithm="ECDSA_SHA_512")
    # RSA keys do not sign with ECDSA; P-384 signs only with SHA-384
    with pytest.raises(InvalidKeyUsageException):
        kms.call(
            "Sign",
            KeyId=kms.key("RSA_2048", "SIGN_VERIFY"),
            Message=b64(b"m"),
            SigningAlgorithm="ECDSA_SHA_256",
        )
    with pytest.raises(InvalidKeyUsageException):
        kms.call(
            "Sign",
            KeyId=kms.key("ECC_NIST_P384", "SIGN_VERIFY"),
            Message=b64(b"m"),
            SigningAlgorithm="ECDSA_SHA_256",
        )


@pytest.mark.parametrize(
    ("operation", "spec", "usage", "params"),
    [
        ("Sign", "RSA_2048", "ENCRYPT_DECRYPT", {"SigningAlgorithm": "RSASSA_PSS_SHA_256"}),
        ("Sign", "ECC_NIST_P256", "KEY_AGREEMENT", {"SigningAlgorithm": "ECDSA_SHA_256"}),
        ("Sign", "HMAC_256", "GENERATE_VERIFY_MAC", {"SigningAlgorithm": "ECDSA_SHA_256"}),
        ("Sign", "SYMMETRIC_DEFAULT", "ENCRYPT_DECRYPT", {"SigningAlgorithm": "ECDSA_SHA_256"}),
        ("GenerateMac", "RSA_2048", "SIGN_VERIFY", {"MacAlgorithm": "HMAC_SHA_256"}),
        ("GenerateMac", "SYMMETRIC_DEFAULT", "ENCRYPT_DECRYPT", {"MacAlgorithm": "HMAC_SHA_256"}),
        ("Encrypt", "RSA_2048", "SIGN_VERIFY", {"EncryptionAlgorithm": "RSAES_OAEP_SHA_256"}),
        ("Encrypt", "ECC_NIST_P256", "SIGN_VERIFY", {"EncryptionAlgorithm": "RSAES_OAEP_SHA_1"}),
        ("Encrypt", "HMAC_256", "GENERATE_VERIFY_MAC", {}),
        ("Encrypt", "RSA_2048", "ENCRYPT_DECRYPT", {}),  # SYMMETRIC_DEFAULT by default
        ("Encrypt", "RSA_2048", "ENCRYPT_DECRYPT", {"EncryptionAlgorithm": "SM2PKE"}),
        (
            "Encrypt",
            "SYMMETRIC_DEFAULT",
            "ENCRYPT_DECRYPT",
            {"EncryptionAlgorithm": "RSAES_OAEP_SHA_1"},
        ),
        ("GenerateDataKey", "RSA_2048", "ENCRYPT_DECRYPT", {"KeySpec": "AES_256"}),
        ("GenerateDataKey", "HMAC_256", "GENERATE_VERIFY_MAC", {"KeySpec": "AES_256"}),
        ("GenerateDataKeyPair", "RSA_2048", "ENCRYPT_DECRYPT", {"KeyPairSpec": "ECC_NIST_P256"}),
        (
            "GenerateDataKeyPairWithoutPlaintext",
            "ECC_NIST_P256",
            "SIGN_VERIFY",
            {"KeyPairSpec": "ECC_NIST_P256"},
        ),
        ("DeriveSharedSecret", "ECC_NIST_P256", "SIGN_VERIFY", {"KeyAgreementAlgorithm": "ECDH"}),
        ("DeriveSharedSecret", "RSA_2048", "ENCRYPT_DECRYPT", {"KeyAgreementAlgorithm": "ECDH"}),
    ],
)
def test_wrong_key_usage_refused(
    kms: Harness, operation: str, spec: str, usage: str, params: dict[str, Any]
) -> None:
    if spec == "SYMMETRIC_DEFAULT":
        key_id = kms.keys.get((spec, usage)) or kms.key(spec, usage)
    else:
        key_id = kms.key(spec, usage)
    message = {"Message": b64(b"m")} if operation in ("Sign", "GenerateMac") else {}
    if operation == "Encrypt":
        message = {"Plaintext": b64(b"m")}
    if operation == "DeriveSharedSecret":
        peer = ec.generate_private_key(ec.SECP256R1()).public_key()
        message = {
            "PublicKey": b64(
                peer.public_bytes(
                    serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
                )
            )
        }
    with pytest.raises(InvalidKeyUsageException) as caught:
        kms.call(operation, KeyId=key_id, **message, **params)
    assert caught.value.aws_type == "InvalidKeyUsageException"


# ------------------------------------------------------------------ RSA-OAEP
@pytest.mark.parametrize(("spec", "algorithm"), list(PLAINTEXT_LIMITS))
def test_encrypt_outside_decrypt_in_keyd_and_reverse(
    kms: Harness, spec: str, algorithm: str
) -> None:
    key_id = kms.key(spec, "ENCRYPT_DECRYPT")
    public = kms.public_key(key_id)
    digest = OAEP_HASHES[algorithm]
    oaep = padding.OAEP(mgf=padding.MGF1(digest()), algorithm=digest(), label=None)
    limit = PLAINTEXT_LIMITS[spec, algorithm]
    for plaintext in (b"x", os.urandom(limit)):
        ciphertext = public.encrypt(plaintext, oaep)
        response = kms.call(
            "Decrypt", KeyId=key_id, CiphertextBlob=b64(ciphertext), EncryptionAlgorithm=algorithm
        )
        assert unb64(response["Plaintext"]) == plaintext
        assert response["EncryptionAlgorithm"] == algorithm
        assert response["KeyId"].endswith(key_id)
    # the reverse: keyd's output is raw RSA-OAEP that the private key opens outside
    private = kms.private_key_test_only(key_id)
    plaintext = os.urandom(limit)
    response = kms.call(
        "Encrypt", KeyId=key_id, Plaintext=b64(plaintext), EncryptionAlgorithm=algorithm
    )
    assert response["EncryptionAlgorithm"] == algorithm
    blob = unb64(response["CiphertextBlob"])
    assert len(blob) == int(spec[4:]) // 8
    assert private.decrypt(blob, oaep) == plaintext
    # limits: one byte more is refused, as AWS's table
    with pytest.raises(ValidationException):
        kms.call(
            "Encrypt", KeyId=key_id, Plaintext=b64(bytes(limit + 1)), EncryptionAlgorithm=algorithm
        )
    assert asymmetric.max_plaintext(spec, algorithm) == limit
    # the other OAEP hash cannot open it: one InvalidCiphertextException
    other = next(a for a in OAEP_HASHES if a != algorithm)
    with pytest.raises(InvalidCiphertextException):
        kms.call("Decrypt", KeyId=key_id, CiphertextBlob=b64(blob), EncryptionAlgorithm=other)


def test_rsa_decrypt_refusals(kms: Harness) -> None:
    key_id = kms.key("RSA_2048", "ENCRYPT_DECRYPT")
    blob = unb64(
        kms.call(
            "Encrypt", KeyId=key_id, Plaintext=b64(b"p"), EncryptionAlgorithm="RSAES_OAEP_SHA_256"
        )["CiphertextBlob"]
    )
    # raw RSA ciphertext does not name its key: KeyId is required
    with pytest.raises(ValidationException, match="KeyId is required"):
        kms.call("Decrypt", CiphertextBlob=b64(blob), EncryptionAlgorithm="RSAES_OAEP_SHA_256")
    # SYMMETRIC_DEFAULT (the default) with an RSA key
    with pytest.raises(InvalidKeyUsageException):
        kms.call("Decrypt", KeyId=key_id, CiphertextBlob=b64(blob))
    # encryption context only with symmetric keys
    with pytest.raises(ValidationException, match="EncryptionContext"):
        kms.call(
            "Decrypt",
            KeyId=key_id,
            CiphertextBlob=b64(blob),
            EncryptionAlgorithm="RSAES_OAEP_SHA_256",
            EncryptionContext={"a": "b"},
        )
    with pytest.raises(ValidationException, match="EncryptionContext"):
        kms.call(
            "Encrypt",
            KeyId=key_id,
            Plaintext=b64(b"p"),
            EncryptionAlgorithm="RSAES_OAEP_SHA_256",
            EncryptionContext={"a": "b"},
        )
    # tampered, truncated ciphertext
    tampered = bytearray(blob)
    tampered[10] ^= 1
    for bad in (bytes(tampered), blob[:-1], blob + b"\0"):
        with pytest.raises(InvalidCiphertextException):
            kms.call(
                "Decrypt",
                KeyId=key_id,
                CiphertextBlob=b64(bad),
                EncryptionAlgorithm="RSAES_OAEP_SHA_256",
            )


def test_re_encrypt_between_symmetric_and_rsa(kms: Harness) -> None:
    symmetric_key = kms.key("SYMMETRIC_DEFAULT", "ENCRYPT_DECRYPT")
    rsa_key = kms.key("RSA_3072", "ENCRYPT_DECRYPT")
    blob = kms.call(
        "Encrypt", KeyId=symmetric_key, Plaintext=b64(b"moving"), EncryptionContext={"f": "1"}
    )["CiphertextBlob"]
    to_rsa = kms.call(
        "ReEncrypt",
        CiphertextBlob=blob,
        SourceEncryptionContext={"f": "1"},
        DestinationKeyId=rsa_key,
        DestinationEncryptionAlgorithm="RSAES_OAEP_SHA_1",
    )
    assert to_rsa["DestinationEncryptionAlgorithm"] == "RSAES_OAEP_SHA_1"
    assert to_rsa["SourceEncryptionAlgorithm"] == "SYMMETRIC_DEFAULT"
    back = kms.call(
        "ReEncrypt",
        CiphertextBlob=to_rsa["CiphertextBlob"],
        SourceKeyId=rsa_key,
        SourceEncryptionAlgorithm="RSAES_OAEP_SHA_1",
        DestinationKeyId=symmetric_key,
        DestinationEncryptionContext={"f": "2"},
    )
    plaintext = kms.call(
        "Decrypt", CiphertextBlob=back["CiphertextBlob"], EncryptionContext={"f": "2"}
    )["Plaintext"]
    assert unb64(plaintext) == b"moving"
    with pytest.raises(ValidationException, match="SourceKeyId is required"):
        kms.call(
            "ReEncrypt",
            CiphertextBlob=to_rsa["CiphertextBlob"],
            SourceEncryptionAlgorithm="RSAES_OAEP_SHA_1",
            DestinationKeyId=symmetric_key,
        )
    with pytest.raises(InvalidKeyUsageException):  # RSA destination needs its algorithm
        kms.call(
            "ReEncrypt",
            CiphertextBlob=blob,
            SourceEncryptionContext={"f": "1"},
            DestinationKeyId=rsa_key,
        )


# ---------------------------------------------------------------------- HMAC
@pytest.mark.parametrize("spec", list(HMAC_SPECS))
def test_hmac_matches_stdlib_over_unsealed_material(kms: Harness, spec: str) -> None:
    algorithm, name = HMAC_SPECS[spec]
    key_id = kms.key(spec, "GENERATE_VERIFY_MAC")
    material = kms.keystore.unseal_material(key_id, 1)  # test-only
    assert material is not None
    for message in (b"m", os.urandom(4096)):
        response = kms.call(
            "GenerateMac", KeyId=key_id, Message=b64(message), MacAlgorithm=algorithm
        )
        assert response["MacAlgorithm"] == algorithm
        mac = unb64(response["Mac"])
        assert mac == hmac.new(material, message, name).digest()
        assert kms.call(
            "VerifyMac", KeyId=key_id, Message=b64(message), Mac=b64(mac), MacAlgorithm=algorithm
        )["MacValid"]
        flipped = bytes([mac[0] ^ 0x80]) + mac[1:]
        with pytest.raises(KMSInvalidMacException):
            kms.call(
                "VerifyMac",
                KeyId=key_id,
                Message=b64(message),
                Mac=b64(flipped),
                MacAlgorithm=algorithm,
            )
        with pytest.raises(KMSInvalidMacException):  # truncated
            kms.call(
                "VerifyMac",
                KeyId=key_id,
                Message=b64(message),
                Mac=b64(mac[:-1]),
                MacAlgorithm=algorithm,
            )
    with pytest.raises(ValidationException):
        kms.call("GenerateMac", KeyId=key_id, Message=b64(bytes(4097)), MacAlgorithm=algorithm)
    other = next(a for a, _ in HMAC_SPECS.values() if a != algorithm)
    with pytest.raises(InvalidKeyUsageException, match=algorithm):
        kms.call("GenerateMac", KeyId=key_id, Message=b64(b"m"), MacAlgorithm=other)


#: RFC 4231 test case 2: key "Jefe", data "what do ya want for nothing?"
RFC4231_CASE2 = {
    "HMAC_224": "a30e01098bc6dbbf45690f3a7e9e6d0f8bbea2a39e6148008fd05e44",
    "HMAC_256": "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843",
    "HMAC_384": "af45d2e376484031617f78d2b58a6b1b9c7ef464f5a01b47e42ec3736322445e"
    "8e2240ca5e69e2c78b3239ecfab21649",
    "HMAC_512": "164b7a7bfcf819e2e395fbe73b56e0a387bd64222e831fd610270cd7ea250554"
    "9758bf75c05a994a6d034f65f8f0e6fdcaeab1a34d4a6b4b636e070a38bce737",
}


def _import_hmac_key_test_only(kms: Harness, spec: str, material: bytes) -> str:
    """A key with given material, written straight into the keystore (keyd has no
    ImportKeyMaterial); sealed like any other key."""
    created = kms.call("CreateKey", KeySpec=spec, KeyUsage="GENERATE_VERIFY_MAC")
    key_id = created["KeyMetadata"]["KeyId"]
    with kms.keystore.transaction() as db:
        db.execute(
            "UPDATE key_versions SET sealed = ? WHERE key_id = ? AND version = 1",
            (kms.keystore.seal_material(key_id, 1, material), key_id),
        )
    return key_id


@pytest.mark.parametrize("spec", list(RFC4231_CASE2))
def test_hmac_rfc4231_vectors_through_verify_mac(fresh: Harness, spec: str) -> None:
    algorithm = HMAC_SPECS[spec][0]
    key_id = _import_hmac_key_test_only(fresh, spec, b"Jefe")
    data = b"what do ya want for nothing?"
    expected = bytes.fromhex(RFC4231_CASE2[spec])
    assert fresh.call(
        "VerifyMac", KeyId=key_id, Message=b64(data), Mac=b64(expected), MacAlgorithm=algorithm
    )["MacValid"]
    generated = fresh.call("GenerateMac", KeyId=key_id, Message=b64(data), MacAlgorithm=algorithm)
    assert unb64(generated["Mac"]) == expected


# -------------------------------------------------------- data key pairs, ECDH
@pytest.mark.parametrize(
    "pair_spec",
    [
        "RSA_2048",
        "RSA_3072",
        "RSA_4096",
        "ECC_NIST_P256",
        "ECC_NIST_P384",
        "ECC_NIST_P521",
        "ECC_SECG_P256K1",
    ],
)
def test_generate_data_key_pair(kms: Harness, pair_spec: str) -> None:
    wrapping_key = kms.key("SYMMETRIC_DEFAULT", "ENCRYPT_DECRYPT")
    context = {"purpose": "pair"}
    response = kms.call(
        "GenerateDataKeyPair", KeyId=wrapping_key, KeyPairSpec=pair_spec, EncryptionContext=context
    )
    assert response["KeyPairSpec"] == pair_spec
    assert response["KeyId"].endswith(wrapping_key)
    private_der = unb64(response["PrivateKeyPlaintext"])
    private = serialization.load_der_private_key(private_der, password=None)
    public_der = unb64(response["PublicKey"])
    assert (
        private.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        == public_der
    )
    opened = kms.call(
        "Decrypt", CiphertextBlob=response["PrivateKeyCiphertextBlob"], EncryptionContext=context
    )
    assert unb64(opened["Plaintext"]) == private_der
    with pytest.raises(InvalidCiphertextException):  # the context is bound
        kms.call("Decrypt", CiphertextBlob=response["PrivateKeyCiphertextBlob"])
    without = kms.call(
        "GenerateDataKeyPairWithoutPlaintext", KeyId=wrapping_key, KeyPairSpec=pair_spec
    )
    assert "PrivateKeyPlaintext" not in without
    opened = kms.call("Decrypt", CiphertextBlob=without["PrivateKeyCiphertextBlob"])
    private = serialization.load_der_private_key(unb64(opened["Plaintext"]), password=None)
    assert private.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ) == unb64(without["PublicKey"])


def test_generate_data_key_pair_refusals(kms: Harness) -> None:
    wrapping_key = kms.key("SYMMETRIC_DEFAULT", "ENCRYPT_DECRYPT")
    with pytest.raises(ValidationException):
        kms.call("GenerateDataKeyPair", KeyId=wrapping_key)
    with pytest.raises(ValidationException):
        kms.call("GenerateDataKeyPair", KeyId=wrapping_key, KeyPairSpec="RSA_1024")
    with pytest.raises(UnsupportedOperationException):
        kms.call("GenerateDataKeyPair", KeyId=wrapping_key, KeyPairSpec="SM2")


@pytest.mark.parametrize(
    ("spec", "curve"),
    [
        ("ECC_NIST_P256", ec.SECP256R1),
        ("ECC_NIST_P384", ec.SECP384R1),
        ("ECC_NIST_P521", ec.SECP521R1),
    ],
)
def test_derive_shared_secret_matches_peer(kms: Harness, spec: str, curve: type) -> None:
    key_id = kms.key(spec, "KEY_AGREEMENT")
    kms_public = kms.public_key(key_id)
    peer = ec.generate_private_key(curve())
    peer_der = peer.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    response = kms.call(
        "DeriveSharedSecret", KeyId=key_id, KeyAgreementAlgorithm="ECDH", PublicKey=b64(peer_der)
    )
    assert response["KeyAgreementAlgorithm"] == "ECDH"
    assert response["KeyOrigin"] == "AWS_KMS"
    assert unb64(response["SharedSecret"]) == peer.exchange(ec.ECDH(), kms_public)
    other_curve = ec.SECP256K1() if spec != "ECC_NIST_P256" else ec.SECP384R1()
    wrong = (
        ec.generate_private_key(other_curve)
        .public_key()
        .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    for bad in (wrong, b"not a key", peer_der[:-3]):
        with pytest.raises(ValidationException):
            kms.call(
                "DeriveSharedSecret", KeyId=key_id, KeyAgreementAlgorithm="ECDH", PublicKey=b64(bad)
            )
    with pytest.raises(ValidationException):
        kms.call(
            "DeriveSharedSecret", KeyId=key_id, KeyAgreementAlgorithm="DH", PublicKey=b64(peer_der)
        )
    with pytest.raises(ValidationException):
        kms.call("DeriveSharedSecret", KeyId=key_id, PublicKey=b64(peer_der))


# ------------------------------------------------- rotation, state, policy, audit
@pytest.mark.parametrize(
    ("spec", "usage"),
    [
        ("RSA_2048", "SIGN_VERIFY"),
        ("ECC_NIST_P256", "KEY_AGREEMENT"),
        ("HMAC_256", "GENERATE_VERIFY_MAC"),
    ],
)
def test_rotation_refused(kms: Harness, spec: str, usage: str) -> None:
    key_id = kms.key(spec, usage)
    for operation in ("EnableKeyRotation", "DisableKeyRotation", "RotateKeyOnDemand"):
        with pytest.raises(UnsupportedOperationException):
            kms.call(operation, KeyId=key_id)
    # "The key rotation status of these KMS keys is always false"
    assert kms.call("GetKeyRotationStatus", KeyId=key_id)["KeyRotationEnabled"] is False


def test_disabled_key_refuses_use(fresh: Harness) -> None:
    key_id = fresh.call("CreateKey", KeySpec="ECC_NIST_P256", KeyUsage="SIGN_VERIFY")[
        "KeyMetadata"
    ]["KeyId"]
    fresh.call("DisableKey", KeyId=key_id)
    with pytest.raises(DisabledException):
        fresh.call("Sign", KeyId=key_id, Message=b64(b"m"), SigningAlgorithm="ECDSA_SHA_256")
    with pytest.raises(DisabledException):
        fresh.call("GetPublicKey", KeyId=key_id)
    fresh.call("EnableKey", KeyId=key_id)
    fresh.call("Sign", KeyId=key_id, Message=b64(b"m"), SigningAlgorithm="ECDSA_SHA_256")
    fresh.call("ScheduleKeyDeletion", KeyId=key_id, PendingWindowInDays=7)
    with pytest.raises(KMSError) as caught:
        fresh.call("Sign", KeyId=key_id, Message=b64(b"m"), SigningAlgorithm="ECDSA_SHA_256")
    assert caught.value.aws_type == "KMSInvalidStateException"


@pytest.mark.parametrize(
    ("operation", "spec", "usage", "params"),
    [
        (
            "Sign",
            "ECC_NIST_P256",
            "SIGN_VERIFY",
            {"Message": b64(b"m"), "SigningAlgorithm": "ECDSA_SHA_256"},
        ),
        (
            "Verify",
            "ECC_NIST_P256",
            "SIGN_VERIFY",
            {"Message": b64(b"m"), "Signature": b64(b"s"), "SigningAlgorithm": "ECDSA_SHA_256"},
        ),
        ("GetPublicKey", "ECC_NIST_P256", "SIGN_VERIFY", {}),
        (
            "GenerateMac",
            "HMAC_256",
            "GENERATE_VERIFY_MAC",
            {"Message": b64(b"m"), "MacAlgorithm": "HMAC_SHA_256"},
        ),
        (
            "VerifyMac",
            "HMAC_256",
            "GENERATE_VERIFY_MAC",
            {"Message": b64(b"m"), "Mac": b64(b"x"), "MacAlgorithm": "HMAC_SHA_256"},
        ),
        (
            "GenerateDataKeyPair",
            "SYMMETRIC_DEFAULT",
            "ENCRYPT_DECRYPT",
            {"KeyPairSpec": "ECC_NIST_P256"},
        ),
        (
            "GenerateDataKeyPairWithoutPlaintext",
            "SYMMETRIC_DEFAULT",
            "ENCRYPT_DECRYPT",
            {"KeyPairSpec": "ECC_NIST_P256"},
        ),
        (
            "Decrypt",
            "RSA_2048",
            "ENCRYPT_DECRYPT",
            {"CiphertextBlob": b64(bytes(256)), "EncryptionAlgorithm": "RSAES_OAEP_SHA_256"},
        ),
    ],
)
def test_key_policy_applies(
    kms: Harness, operation: str, spec: str, usage: str, params: dict[str, Any]
) -> None:
    """The default key policy names root and the creator only: another uid is refused
    before anything is computed."""
    key_id = kms.key(spec, usage)
    with pytest.raises(AccessDeniedException, match=f"kms:{operation} "):
        kms.call(operation, caller=STRANGER, KeyId=key_id, **params)


def test_audit_never_holds_messages_signatures_macs_or_private_keys(fresh: Harness) -> None:
    sign_key = fresh.call("CreateKey", KeySpec="ECC_NIST_P256", KeyUsage="SIGN_VERIFY")[
        "KeyMetadata"
    ]["KeyId"]
    mac_key = fresh.call("CreateKey", KeySpec="HMAC_256", KeyUsage="GENERATE_VERIFY_MAC")[
        "KeyMetadata"
    ]["KeyId"]
    agree_key = fresh.call("CreateKey", KeySpec="ECC_NIST_P256", KeyUsage="KEY_AGREEMENT")[
        "KeyMetadata"
    ]["KeyId"]
    wrap_key = fresh.call("CreateKey")["KeyMetadata"]["KeyId"]
    message = b"MESSAGE-that-must-not-be-logged"
    secrets: list[bytes] = [message]
    signature = fresh.call(
        "Sign", KeyId=sign_key, Message=b64(message), SigningAlgorithm="ECDSA_SHA_256"
    )["Signature"]
    secrets.append(unb64(signature))
    fresh.call(
        "Verify",
        KeyId=sign_key,
        Message=b64(message),
        Signature=signature,
        SigningAlgorithm="ECDSA_SHA_256",
    )
    with pytest.raises(KMSInvalidSignatureException):
        fresh.call(
            "Verify",
            KeyId=sign_key,
            Message=b64(message + b"!"),
            Signature=signature,
            SigningAlgorithm="ECDSA_SHA_256",
        )
    mac = fresh.call(
        "GenerateMac", KeyId=mac_key, Message=b64(message), MacAlgorithm="HMAC_SHA_256"
    )["Mac"]
    secrets.append(unb64(mac))
    fresh.call(
        "VerifyMac", KeyId=mac_key, Message=b64(message), Mac=mac, MacAlgorithm="HMAC_SHA_256"
    )
    pair = fresh.call("GenerateDataKeyPair", KeyId=wrap_key, KeyPairSpec="ECC_NIST_P256")
    secrets += [unb64(pair["PrivateKeyPlaintext"]), unb64(pair["PrivateKeyCiphertextBlob"])]
    peer = (
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    shared = fresh.call(
        "DeriveSharedSecret", KeyId=agree_key, KeyAgreementAlgorithm="ECDH", PublicKey=b64(peer)
    )
    secrets.append(unb64(shared["SharedSecret"]))
    for key_id in (sign_key, mac_key, agree_key):
        secrets.append(fresh.keystore.unseal_material(key_id, 1) or b"")
    log = json.dumps(fresh.events)
    for secret in secrets:
        for form in (b64(secret), secret.hex()):
            assert form not in log
    assert message.decode() not in log
    names = [event["eventName"] for event in fresh.events]
    for operation in (
        "Sign",
        "Verify",
        "GenerateMac",
        "VerifyMac",
        "GenerateDataKeyPair",
        "DeriveSharedSecret",
    ):
        assert operation in names
    sign_event = next(event for event in fresh.events if event["eventName"] == "Sign")
    assert sign_event["requestParameters"] == {
        "keyId": sign_key,
        "signingAlgorithm": "ECDSA_SHA_256",
    }
    failed = [
        event for event in fresh.events if event.get("errorCode") == "KMSInvalidSignatureException"
    ]
    assert len(failed) == 1


def test_slow_work_result_is_the_key_stored(fresh: Harness) -> None:
    """The server runs slow_work (RSA generation) in a thread and hands its result to
    handle: the key created is that one."""
    params = {"KeySpec": "RSA_2048", "KeyUsage": "SIGN_VERIFY"}
    work = fresh.service.slow_work("CreateKey", params)
    assert work is not None
    tag, function = work
    private_der, public_der = function()
    metadata = fresh.service.handle(
        "CreateKey", params, CALLER, "r1", prepared=(tag, (private_der, public_der))
    )
    key_id = metadata["KeyMetadata"]["KeyId"]
    assert unb64(fresh.call("GetPublicKey", KeyId=key_id)["PublicKey"]) == public_der
    assert fresh.service.slow_work("CreateKey", {"KeySpec": "ECC_NIST_P256"}) is None
    # nothing is generated for a request that will be refused or is a dry run
    assert fresh.service.slow_work("CreateKey", {**params, "KeyUsage": "KEY_AGREEMENT"}) is None
    assert fresh.service.slow_work("CreateKey", {**params, "DryRun": True}) is None
    assert fresh.service.slow_work("CreateKey", {"KeySpec": "RSA_2048"}) is not None
    assert fresh.service.slow_work("Sign", params) is None
    # a result prepared for another spec is not used
    other = fresh.service.handle(
        "CreateKey",
        {"KeySpec": "RSA_3072"},
        CALLER,
        "r2",
        prepared=(tag, (private_der, public_der)),
    )
    other_id = other["KeyMetadata"]["KeyId"]
    assert unb64(fresh.call("GetPublicKey", KeyId=other_id)["PublicKey"]) != public_der


def test_pair_generation_uses_prepared_pair(fresh: Harness) -> None:
    wrap_key = fresh.call("CreateKey")["KeyMetadata"]["KeyId"]
    params = {"KeyId": wrap_key, "KeyPairSpec": "RSA_2048"}
    work = fresh.service.slow_work("GenerateDataKeyPair", params)
    assert work is not None
    tag, function = work
    prepared = function()
    response = fresh.service.handle(
        "GenerateDataKeyPair", params, CALLER, "r", prepared=(tag, prepared)
    )
    assert unb64(response["PublicKey"]) == prepared[1]


def test_rsa_key_record_kept(fresh: Harness) -> None:
    key_id = fresh.call("CreateKey", KeySpec="RSA_2048", KeyUsage="SIGN_VERIFY")["KeyMetadata"][
        "KeyId"
    ]
    record = fresh.keystore.get_key(key_id)
    assert isinstance(record, KeyRecord)
    assert (record.key_spec, record.key_usage) == ("RSA_2048", "SIGN_VERIFY")
    private = fresh.private_key_test_only(key_id)
    assert isinstance(private, rsa.RSAPrivateKey)
    assert private.key_size == 2048
    # the Prehashed API agrees with the raw one (keyd signs digests)
    digest = hashlib.sha256(b"m").digest()
    signature = unb64(
        fresh.call(
            "Sign",
            KeyId=key_id,
            Message=b64(digest),
            MessageType="DIGEST",
            SigningAlgorithm="RSASSA_PKCS1_V1_5_SHA_256",
        )["Signature"]
    )
    private.public_key().verify(
        signature, digest, padding.PKCS1v15(), utils.Prehashed(hashes.SHA256())
    )


# ---------------------------------------------------------------- properties
@settings(max_examples=60, deadline=None)
@given(message=st.binary(min_size=1, max_size=4096))
def test_property_mac_matches_stdlib(kms: Harness, message: bytes) -> None:
    key_id = kms.key("HMAC_384", "GENERATE_VERIFY_MAC")
    material = kms.keystore.unseal_material(key_id, 1)
    assert material is not None
    mac = unb64(
        kms.call("GenerateMac", KeyId=key_id, Message=b64(message), MacAlgorithm="HMAC_SHA_384")[
            "Mac"
        ]
    )
    assert mac == hmac.new(material, message, "sha384").digest()


@settings(max_examples=40, deadline=None)
@given(
    plaintext=st.binary(min_size=1, max_size=190),
    algorithm=st.sampled_from(sorted(OAEP_HASHES)),
)
def test_property_rsa_round_trip(kms: Harness, plaintext: bytes, algorithm: str) -> None:
    key_id = kms.key("RSA_2048", "ENCRYPT_DECRYPT")
    blob = kms.call(
        "Encrypt", KeyId=key_id, Plaintext=b64(plaintext), EncryptionAlgorithm=algorithm
    )["CiphertextBlob"]
    opened = kms.call("Decrypt", KeyId=key_id, CiphertextBlob=blob, EncryptionAlgorithm=algorithm)
    assert unb64(opened["Plaintext"]) == plaintext


@settings(max_examples=40, deadline=None)
@given(message=st.binary(min_size=1, max_size=4096), flip=st.integers(min_value=0))
def test_property_ecdsa_signature_and_any_flipped_bit(
    kms: Harness, message: bytes, flip: int
) -> None:
    key_id = kms.key("ECC_NIST_P256", "SIGN_VERIFY")
    params = {"KeyId": key_id, "Message": b64(message), "SigningAlgorithm": "ECDSA_SHA_256"}
    signature = unb64(kms.call("Sign", **params)["Signature"])
    assert kms.call("Verify", Signature=b64(signature), **params)["SignatureValid"]
    flipped = bytearray(signature)
    flipped[(flip // 8) % len(flipped)] ^= 1 << (flip % 8)
    with pytest.raises(KMSInvalidSignatureException):
        kms.call("Verify", Signature=b64(bytes(flipped)), **params)


def test_dry_run_answers_dry_run_and_does_nothing(kms: Harness) -> None:
    """DryRun (AWS: "Checks if your request will succeed") on every new key-use
    operation: DryRunOperationException after every check passed, no result."""
    sign_key = kms.key("ECC_NIST_P256", "SIGN_VERIFY")
    mac_key = kms.key("HMAC_256", "GENERATE_VERIFY_MAC")
    agree_key = kms.key("ECC_NIST_P256", "KEY_AGREEMENT")
    wrap_key = kms.key("SYMMETRIC_DEFAULT", "ENCRYPT_DECRYPT")
    rsa_key = kms.key("RSA_2048", "ENCRYPT_DECRYPT")
    message = b64(b"m")
    signature = kms.call("Sign", KeyId=sign_key, Message=message, SigningAlgorithm="ECDSA_SHA_256")[
        "Signature"
    ]
    mac = kms.call("GenerateMac", KeyId=mac_key, Message=message, MacAlgorithm="HMAC_SHA_256")[
        "Mac"
    ]
    peer = b64(
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    requests = [
        ("Sign", {"KeyId": sign_key, "Message": message, "SigningAlgorithm": "ECDSA_SHA_256"}),
        (
            "Verify",
            {
                "KeyId": sign_key,
                "Message": message,
                "Signature": signature,
                "SigningAlgorithm": "ECDSA_SHA_256",
            },
        ),
        ("GenerateMac", {"KeyId": mac_key, "Message": message, "MacAlgorithm": "HMAC_SHA_256"}),
        (
            "VerifyMac",
            {"KeyId": mac_key, "Message": message, "Mac": mac, "MacAlgorithm": "HMAC_SHA_256"},
        ),
        ("GenerateDataKeyPair", {"KeyId": wrap_key, "KeyPairSpec": "ECC_NIST_P256"}),
        (
            "GenerateDataKeyPairWithoutPlaintext",
            {"KeyId": wrap_key, "KeyPairSpec": "ECC_NIST_P256"},
        ),
        (
            "DeriveSharedSecret",
            {"KeyId": agree_key, "KeyAgreementAlgorithm": "ECDH", "PublicKey": peer},
        ),
        (
            "Encrypt",
            {"KeyId": rsa_key, "Plaintext": message, "EncryptionAlgorithm": "RSAES_OAEP_SHA_256"},
        ),
        ("CreateKey", {"KeySpec": "RSA_2048", "KeyUsage": "SIGN_VERIFY"}),
    ]
    keys_before = len(kms.call("ListKeys", Limit=1000)["Keys"])
    for operation, params in requests:
        with pytest.raises(DryRunOperationException):
            kms.call(operation, DryRun=True, **params)
    assert len(kms.call("ListKeys", Limit=1000)["Keys"]) == keys_before


def test_sealed_private_key_is_bound_to_its_key(fresh: Harness) -> None:
    """A sealed private key copied onto another key's record does not open there (the
    key id and version are the seal's associated data): keyd refuses to use it."""
    first = fresh.call("CreateKey", KeySpec="ECC_NIST_P256", KeyUsage="SIGN_VERIFY")
    second = fresh.call("CreateKey", KeySpec="ECC_NIST_P256", KeyUsage="SIGN_VERIFY")
    first_id = first["KeyMetadata"]["KeyId"]
    second_id = second["KeyMetadata"]["KeyId"]
    with fresh.keystore.transaction() as db:
        sealed = db.execute(
            "SELECT sealed FROM key_versions WHERE key_id = ?", (first_id,)
        ).fetchone()[0]
        db.execute("UPDATE key_versions SET sealed = ? WHERE key_id = ?", (sealed, second_id))
    with pytest.raises(KMSError) as caught:
        fresh.call("Sign", KeyId=second_id, Message=b64(b"m"), SigningAlgorithm="ECDSA_SHA_256")
    assert caught.value.aws_type == "KMSInternalException"
    fresh.call("Sign", KeyId=first_id, Message=b64(b"m"), SigningAlgorithm="ECDSA_SHA_256")
