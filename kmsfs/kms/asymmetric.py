"""Asymmetric (RSA, ECC) and HMAC customer master keys: AWS KMS's tables, and the
cryptography behind Sign, Verify, RSA Encrypt/Decrypt, GenerateMac, VerifyMac,
DeriveSharedSecret and GenerateDataKeyPair. Sans-IO: bytes in, bytes out.

The tables are copied from the AWS KMS Developer Guide, "Key spec reference"
(symm-asymm-choose-key-spec) and "Asymmetric key specs", and the API reference of
CreateKey (KeySpec/KeyUsage), Sign/Verify (SigningAlgorithm, MessageType), Encrypt
(EncryptionAlgorithm and its plaintext limits), GenerateMac (MacAlgorithm),
DeriveSharedSecret (KeyAgreementAlgorithm) and GenerateDataKeyPair (KeyPairSpec).

Key material, as sealed in the keystore (:meth:`Keystore.seal_material`, bound to the
key id and version):

- RSA and ECC keys: the private key, PKCS#8 DER (unencrypted inside the sealed record);
- HMAC keys: the raw HMAC key, as long as the spec's digest (HMAC_224: 28 bytes ...),
  as AWS KMS makes them ("HMAC key specs": the key length equals the digest length);
- SYMMETRIC_DEFAULT: 32 random bytes (AES-256-GCM), unchanged.

Nothing here logs; no message, signature input or key material ever reaches an
exception message.
"""

from __future__ import annotations

import hashlib
import hmac
import os

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, utils

from kmsfs.errors import (
    InvalidCiphertextException,
    InvalidKeyUsageException,
    ValidationException,
)

SYMMETRIC_DEFAULT = "SYMMETRIC_DEFAULT"
ENCRYPT_DECRYPT = "ENCRYPT_DECRYPT"
SIGN_VERIFY = "SIGN_VERIFY"
GENERATE_VERIFY_MAC = "GENERATE_VERIFY_MAC"
KEY_AGREEMENT = "KEY_AGREEMENT"

#: AWS KMS "Key spec reference": the key usages each key spec may be created with.
#: RSA: encrypt/decrypt or sign/verify (never both); NIST curves: sign/verify or
#: derive shared secrets; secp256k1: sign/verify only; HMAC: generate/verify MAC.
KEY_SPEC_USAGES: dict[str, tuple[str, ...]] = {
    SYMMETRIC_DEFAULT: (ENCRYPT_DECRYPT,),
    "RSA_2048": (ENCRYPT_DECRYPT, SIGN_VERIFY),
    "RSA_3072": (ENCRYPT_DECRYPT, SIGN_VERIFY),
    "RSA_4096": (ENCRYPT_DECRYPT, SIGN_VERIFY),
    "ECC_NIST_P256": (SIGN_VERIFY, KEY_AGREEMENT),
    "ECC_NIST_P384": (SIGN_VERIFY, KEY_AGREEMENT),
    "ECC_NIST_P521": (SIGN_VERIFY, KEY_AGREEMENT),
    "ECC_SECG_P256K1": (SIGN_VERIFY,),
    "HMAC_224": (GENERATE_VERIFY_MAC,),
    "HMAC_256": (GENERATE_VERIFY_MAC,),
    "HMAC_384": (GENERATE_VERIFY_MAC,),
    "HMAC_512": (GENERATE_VERIFY_MAC,),
}

RSA_BITS = {"RSA_2048": 2048, "RSA_3072": 3072, "RSA_4096": 4096}
_CURVES: dict[str, type[ec.EllipticCurve]] = {
    "ECC_NIST_P256": ec.SECP256R1,
    "ECC_NIST_P384": ec.SECP384R1,
    "ECC_NIST_P521": ec.SECP521R1,
    "ECC_SECG_P256K1": ec.SECP256K1,
}
#: HMAC key specs: MAC algorithm and key length in bytes (AWS: "HMAC key specs",
#: the key length matches the digest length of the hash function).
_HMAC: dict[str, tuple[str, int]] = {
    "HMAC_224": ("HMAC_SHA_224", 28),
    "HMAC_256": ("HMAC_SHA_256", 32),
    "HMAC_384": ("HMAC_SHA_384", 48),
    "HMAC_512": ("HMAC_SHA_512", 64),
}
_MAC_HASHES = {
    "HMAC_SHA_224": "sha224",
    "HMAC_SHA_256": "sha256",
    "HMAC_SHA_384": "sha384",
    "HMAC_SHA_512": "sha512",
}
MAC_ALGORITHMS = tuple(_MAC_HASHES)

#: AWS "RSA key specs for encryption and decryption" (PKCS #1 v2.2, section 7.1,
#: OAEP with the same hash for the digest and MGF1, empty label).
RSA_ENCRYPTION_ALGORITHMS = ("RSAES_OAEP_SHA_1", "RSAES_OAEP_SHA_256")
_OAEP_HASHES: dict[str, type[hashes.HashAlgorithm]] = {
    "RSAES_OAEP_SHA_1": hashes.SHA1,
    "RSAES_OAEP_SHA_256": hashes.SHA256,
}
ENCRYPTION_ALGORITHMS = (SYMMETRIC_DEFAULT, *RSA_ENCRYPTION_ALGORITHMS, "SM2PKE")

#: AWS "RSA key specs for signing and verification": PKCS #1 v2.2 section 8.2
#: (RSASSA-PKCS1-v1_5) and 8.1 (RSASSA-PSS, MGF1 with the same hash, and a salt as
#: long as the digest: "with a 256-bit salt" for SHA-256, and so on).
RSA_SIGNING_ALGORITHMS = (  # in the order AWS's DescribeKey examples list them
    "RSASSA_PKCS1_V1_5_SHA_256",
    "RSASSA_PKCS1_V1_5_SHA_384",
    "RSASSA_PKCS1_V1_5_SHA_512",
    "RSASSA_PSS_SHA_256",
    "RSASSA_PSS_SHA_384",
    "RSASSA_PSS_SHA_512",
)
#: AWS "Elliptic curve key specs": each curve signs with one ECDSA algorithm
#: (P-256 and secp256k1 with SHA-256, P-384 with SHA-384, P-521 with SHA-512);
#: signatures are DER-encoded ECDSA-Sig-Value (ANSI X9.62).
ECC_SIGNING_ALGORITHMS = {
    "ECC_NIST_P256": "ECDSA_SHA_256",
    "ECC_NIST_P384": "ECDSA_SHA_384",
    "ECC_NIST_P521": "ECDSA_SHA_512",
    "ECC_SECG_P256K1": "ECDSA_SHA_256",
}
SIGNING_ALGORITHMS = (
    *RSA_SIGNING_ALGORITHMS,
    "ECDSA_SHA_256",
    "ECDSA_SHA_384",
    "ECDSA_SHA_512",
    "SM2DSA",
    "ML_DSA_SHAKE_256",
)
_SIGNING_HASHES: dict[str, type[hashes.HashAlgorithm]] = {
    "SHA_256": hashes.SHA256,
    "SHA_384": hashes.SHA384,
    "SHA_512": hashes.SHA512,
}
KEY_AGREEMENT_ALGORITHMS = ("ECDH",)
MESSAGE_TYPES = ("RAW", "DIGEST", "EXTERNAL_MU")

#: GenerateDataKeyPair KeyPairSpec values (SM2 only in China Regions, refused here)
KEY_PAIR_SPECS = (
    "RSA_2048",
    "RSA_3072",
    "RSA_4096",
    "ECC_NIST_P256",
    "ECC_NIST_P384",
    "ECC_NIST_P521",
    "ECC_SECG_P256K1",
    "SM2",
)

#: Sign/Verify/GenerateMac/VerifyMac Message: 1 to 4096 bytes (API reference)
MAX_MESSAGE = 4096
#: Verify Signature: 1 to 6144 bytes; VerifyMac Mac: 1 to 6144 bytes
MAX_SIGNATURE = 6144
#: DeriveSharedSecret PublicKey: 1 to 8192 bytes
MAX_PUBLIC_KEY = 8192


def is_asymmetric(key_spec: str) -> bool:
    return key_spec in RSA_BITS or key_spec in _CURVES


def check_spec_usage(key_spec: str, key_usage: str) -> None:
    """Refuse a KeySpec/KeyUsage pair AWS refuses (CreateKey: ValidationException)."""
    allowed = KEY_SPEC_USAGES[key_spec]
    if key_usage not in allowed:
        raise ValidationException(
            f"KeyUsage {key_usage} is not compatible with KeySpec {key_spec}; "
            f"valid KeyUsage values for {key_spec}: {', '.join(allowed)}"
        )


# ----------------------------------------------------------------- algorithms
def encryption_algorithms(key_spec: str, key_usage: str) -> list[str]:
    if key_usage != ENCRYPT_DECRYPT:
        return []
    return [SYMMETRIC_DEFAULT] if key_spec == SYMMETRIC_DEFAULT else list(RSA_ENCRYPTION_ALGORITHMS)


def signing_algorithms(key_spec: str, key_usage: str) -> list[str]:
    if key_usage != SIGN_VERIFY:
        return []
    if key_spec in RSA_BITS:
        return list(RSA_SIGNING_ALGORITHMS)
    return [ECC_SIGNING_ALGORITHMS[key_spec]]


def mac_algorithms(key_spec: str, key_usage: str) -> list[str]:
    return [_HMAC[key_spec][0]] if key_usage == GENERATE_VERIFY_MAC else []


def key_agreement_algorithms(key_spec: str, key_usage: str) -> list[str]:
    return list(KEY_AGREEMENT_ALGORITHMS) if key_usage == KEY_AGREEMENT else []


def algorithm_fields(key_spec: str, key_usage: str) -> dict[str, list[str]]:
    """The algorithm lists DescribeKey and GetPublicKey report: each appears only for
    the usage it belongs to, as AWS does (EncryptionAlgorithms for ENCRYPT_DECRYPT,
    SigningAlgorithms for SIGN_VERIFY, MacAlgorithms for GENERATE_VERIFY_MAC,
    KeyAgreementAlgorithms for KEY_AGREEMENT)."""
    fields = {
        "EncryptionAlgorithms": encryption_algorithms(key_spec, key_usage),
        "SigningAlgorithms": signing_algorithms(key_spec, key_usage),
        "MacAlgorithms": mac_algorithms(key_spec, key_usage),
        "KeyAgreementAlgorithms": key_agreement_algorithms(key_spec, key_usage),
    }
    return {name: values for name, values in fields.items() if values}


def require_usage(key_spec: str, key_usage: str, wanted: str, operation: str) -> None:
    """InvalidKeyUsageException unless the key's usage is ``wanted`` (AWS: "The KeyUsage
    value of the KMS key is incompatible with the API operation")."""
    if key_usage != wanted:
        raise InvalidKeyUsageException(
            f"{operation} requires a KMS key with KeyUsage {wanted}; this key ({key_spec}) "
            f"has KeyUsage {key_usage}"
        )


def require_algorithm(kind: str, algorithm: str, allowed: list[str], key_spec: str) -> None:
    """InvalidKeyUsageException for an algorithm the key spec does not support (AWS: "The
    encryption algorithm or signing algorithm specified for the operation is incompatible
    with the type of key material in the KMS key")."""
    if algorithm not in allowed:
        raise InvalidKeyUsageException(
            f"{kind} {algorithm} is not compatible with KeySpec {key_spec}; "
            f"valid values: {', '.join(allowed)}"
        )


# -------------------------------------------------------------- key material
def generate_material(key_spec: str) -> bytes:
    """New key material for a CMK of ``key_spec`` (see the module docstring).

    RSA_4096 takes up to seconds: callers on an event loop run this in a thread
    (cryptography releases the GIL while OpenSSL generates the key)."""
    if key_spec == SYMMETRIC_DEFAULT:
        return os.urandom(32)
    if key_spec in _HMAC:
        return os.urandom(_HMAC[key_spec][1])
    return private_key_der(generate_private_key(key_spec))


def generate_private_key(key_spec: str) -> rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey:
    if key_spec in RSA_BITS:
        return rsa.generate_private_key(public_exponent=65537, key_size=RSA_BITS[key_spec])
    if key_spec in _CURVES:
        return ec.generate_private_key(_CURVES[key_spec]())
    raise ValueError(f"{key_spec} has no key pair")


def slow_to_generate(key_spec: str) -> bool:
    """Whether generating ``key_spec`` takes long enough to stall an event loop
    (RSA: ~50 ms for 2048 bits, up to seconds for 4096)."""
    return key_spec in RSA_BITS


def private_key_der(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey


def load_private_key(material: bytes) -> PrivateKey:
    # The material was sealed by this keystore (AES-GCM under the root key, bound to
    # the key id and version), so the slow RSA consistency check buys nothing here.
    key = serialization.load_der_private_key(
        material, password=None, unsafe_skip_rsa_key_validation=True
    )
    if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
        raise ValueError("sealed material is not an RSA or EC private key")
    return key


def public_key_der(key: PrivateKey | PublicKey) -> bytes:
    """DER SubjectPublicKeyInfo (RFC 5280), as GetPublicKey returns it."""
    public = (
        key.public_key() if isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) else key
    )
    return public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


# ---------------------------------------------------------------- RSA-OAEP
def _oaep(algorithm: str) -> padding.OAEP:
    digest = _OAEP_HASHES[algorithm]
    return padding.OAEP(mgf=padding.MGF1(digest()), algorithm=digest(), label=None)


def max_plaintext(key_spec: str, algorithm: str) -> int:
    """AWS's "Maximum plaintext length" table for RSA Encrypt: k - 2*hLen - 2 bytes
    (RSA_2048: 214 with SHA-1, 190 with SHA-256; RSA_3072: 342/318; RSA_4096: 470/446)."""
    k = RSA_BITS[key_spec] // 8
    return k - 2 * _OAEP_HASHES[algorithm].digest_size - 2


def rsa_encrypt(
    key: PrivateKey | PublicKey, key_spec: str, algorithm: str, plaintext: bytes
) -> bytes:
    """Raw RSAES-OAEP output (as long as the modulus), as AWS KMS returns it, so
    `openssl pkeyutl -decrypt` and `cryptography` can read it with the private key,
    and their output decrypts here."""
    limit = max_plaintext(key_spec, algorithm)
    if len(plaintext) > limit:
        raise ValidationException(
            f"Plaintext is {len(plaintext)} bytes; the maximum for KeySpec {key_spec} with "
            f"{algorithm} is {limit} bytes"
        )
    public = key.public_key() if isinstance(key, rsa.RSAPrivateKey) else key
    assert isinstance(public, rsa.RSAPublicKey)
    return public.encrypt(plaintext, _oaep(algorithm))


def rsa_decrypt(key: PrivateKey, algorithm: str, ciphertext: bytes) -> bytes:
    assert isinstance(key, rsa.RSAPrivateKey)
    if len(ciphertext) != key.key_size // 8:
        raise InvalidCiphertextException("The ciphertext is invalid.")
    try:
        return key.decrypt(ciphertext, _oaep(algorithm))
    except ValueError:
        # one message for every failure: no padding oracle
        raise InvalidCiphertextException("The ciphertext is invalid.") from None


# --------------------------------------------------------------- signatures
def _signing_hash(algorithm: str) -> hashes.HashAlgorithm:
    return _SIGNING_HASHES["SHA_" + algorithm.rsplit("_", 1)[-1]]()


def digest_for(
    algorithm: str, message: bytes, message_type: str
) -> tuple[bytes, hashes.HashAlgorithm]:
    """The digest a signature covers: the message hashed (RAW) or the message itself
    (DIGEST, whose length must match the algorithm's hash: AWS "When the value of
    MessageType is DIGEST, the length of the Message value must match the length of
    hashed messages for the specified signing algorithm")."""
    digest_algorithm = _signing_hash(algorithm)
    if message_type == "DIGEST":
        if len(message) != digest_algorithm.digest_size:
            raise ValidationException(
                f"Digest is invalid length for algorithm {algorithm}: it must be "
                f"{digest_algorithm.digest_size} bytes"
            )
        return message, digest_algorithm
    hasher = hashes.Hash(digest_algorithm)
    hasher.update(message)
    return hasher.finalize(), digest_algorithm


def _signature_scheme(
    algorithm: str, digest_algorithm: hashes.HashAlgorithm
) -> tuple[padding.AsymmetricPadding | None, utils.Prehashed | ec.ECDSA]:
    """(RSA padding, scheme) for an AWS signing algorithm, over a precomputed digest."""
    prehashed = utils.Prehashed(digest_algorithm)
    if algorithm.startswith("RSASSA_PSS_"):
        # salt length = digest length, as AWS KMS (PKCS #1 v2.2 8.1, "256-bit salt")
        pad = padding.PSS(
            mgf=padding.MGF1(digest_algorithm), salt_length=digest_algorithm.digest_size
        )
        return pad, prehashed
    if algorithm.startswith("RSASSA_PKCS1_V1_5_"):
        return padding.PKCS1v15(), prehashed
    return None, ec.ECDSA(prehashed)


def sign(key: PrivateKey, algorithm: str, message: bytes, message_type: str) -> bytes:
    digest, digest_algorithm = digest_for(algorithm, message, message_type)
    pad, scheme = _signature_scheme(algorithm, digest_algorithm)
    if isinstance(key, rsa.RSAPrivateKey):
        assert pad is not None and isinstance(scheme, utils.Prehashed)
        return key.sign(digest, pad, scheme)
    assert isinstance(scheme, ec.ECDSA)
    return key.sign(digest, scheme)


def verify(
    key: PrivateKey | PublicKey, algorithm: str, message: bytes, message_type: str, signature: bytes
) -> bool:
    digest, digest_algorithm = digest_for(algorithm, message, message_type)
    public = (
        key.public_key() if isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) else key
    )
    pad, scheme = _signature_scheme(algorithm, digest_algorithm)
    try:
        if isinstance(public, rsa.RSAPublicKey):
            assert pad is not None and isinstance(scheme, utils.Prehashed)
            public.verify(signature, digest, pad, scheme)
        else:
            assert isinstance(scheme, ec.ECDSA)
            public.verify(signature, digest, scheme)
    except (InvalidSignature, ValueError):
        return False
    return True


# --------------------------------------------------------------------- HMAC
def generate_mac(material: bytes, algorithm: str, message: bytes) -> bytes:
    """RFC 2104 HMAC with the key spec's hash (AWS "HMAC key specs")."""
    return hmac.new(material, message, getattr(hashlib, _MAC_HASHES[algorithm])).digest()


def verify_mac(material: bytes, algorithm: str, message: bytes, mac: bytes) -> bool:
    return hmac.compare_digest(generate_mac(material, algorithm, message), mac)


# ---------------------------------------------------------------------- ECDH
def load_peer_public_key(key_spec: str, public_key_der: bytes) -> ec.EllipticCurvePublicKey:
    """DeriveSharedSecret's PublicKey: a DER SubjectPublicKeyInfo on the curve of the
    KMS key (AWS: the peer's key pair "must use the same ... curve"), else
    ValidationException."""
    try:
        peer = serialization.load_der_public_key(public_key_der)
    except (ValueError, TypeError):
        raise ValidationException(
            "PublicKey is not a DER-encoded X.509 SubjectPublicKeyInfo"
        ) from None
    curve = _CURVES[key_spec]
    if not isinstance(peer, ec.EllipticCurvePublicKey) or peer.curve.name != curve.name:
        raise ValidationException(
            f"PublicKey must be an elliptic curve public key on the curve of KeySpec {key_spec}"
        )
    return peer


def derive_shared_secret(key: PrivateKey, peer: ec.EllipticCurvePublicKey) -> bytes:
    """ECDH (NIST SP 800-56A cofactor Diffie-Hellman; the NIST curves have cofactor 1):
    the raw shared secret, the x coordinate of the shared point, as AWS returns it."""
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return key.exchange(ec.ECDH(), peer)


def generate_key_pair_der(key_spec: str) -> tuple[bytes, bytes]:
    """A new key pair: (private key PKCS#8 DER, public key SubjectPublicKeyInfo DER)."""
    key = generate_private_key(key_spec)
    return private_key_der(key), public_key_der(key)
