"""``kmsfs sign|verify|mac|verify-mac``: asymmetric signatures and HMACs through keyd.

Thin wrappers over AWS KMS's Sign, Verify, GenerateMac and VerifyMac (the names of
algorithms and message types are AWS's), plus ``verify --public-key`` that checks a
signature offline with ``cryptography`` and the key ``kmsfs keys public-key`` exported:
no keyd needed, as AWS recommends for verifying outside KMS.

Messages come on standard input. AWS KMS takes at most 4096 bytes of RAW message; a
longer message is hashed here with the algorithm's hash and sent as a DIGEST (RSA and
ECDSA signatures over a message are signatures over its digest, so the result is the
same signature AWS would give for the RAW message, and ``openssl dgst -verify`` checks
it). ``--digest`` says standard input already is the digest (AWS's MessageType DIGEST).
A MAC has no digest form: its message is at most 4096 bytes.

Exit status of ``verify`` / ``verify-mac``: 0 when valid, 1 when not (as ``openssl dgst
-verify``), other statuses from the table in ``kmsfs.cli.errors`` for other failures.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import sys
from typing import Any

from kmsfs.cli.common import keyd_options
from kmsfs.errors import InvalidSignature, KMSError, UsageError

#: AWS KMS's limit on a RAW message for Sign, Verify, GenerateMac and VerifyMac
MAX_MESSAGE = 4096
#: what may be read from a --signature/--mac file (RSA 4096 signatures are 512 bytes)
_MAX_SIGNATURE_FILE = 64 * 1024

#: SigningAlgorithm → hash name (hashlib) of the message digest it signs
SIGNING_ALGORITHMS: dict[str, str] = {
    "RSASSA_PSS_SHA_256": "sha256",
    "RSASSA_PSS_SHA_384": "sha384",
    "RSASSA_PSS_SHA_512": "sha512",
    "RSASSA_PKCS1_V1_5_SHA_256": "sha256",
    "RSASSA_PKCS1_V1_5_SHA_384": "sha384",
    "RSASSA_PKCS1_V1_5_SHA_512": "sha512",
    "ECDSA_SHA_256": "sha256",
    "ECDSA_SHA_384": "sha384",
    "ECDSA_SHA_512": "sha512",
}
MAC_ALGORITHMS = ("HMAC_SHA_224", "HMAC_SHA_256", "HMAC_SHA_384", "HMAC_SHA_512")


def _client(args: argparse.Namespace):
    from kmsfs.kms.client import KMSClient

    return KMSClient(args.keyd_socket)


def _read_message(digest: bool, algorithm: str, *, allow_hashing: bool = True) -> tuple[bytes, str]:
    """``(message, MessageType)`` from standard input, as Sign/Verify take them."""
    hash_name = SIGNING_ALGORITHMS.get(algorithm)
    if digest:
        data = sys.stdin.buffer.read(_MAX_SIGNATURE_FILE + 1)
        if hash_name is not None:
            expected = hashlib.new(hash_name).digest_size
            if len(data) != expected:
                raise UsageError(
                    f"--digest: {algorithm} signs a {expected}-byte digest, "
                    f"standard input holds {len(data)} bytes"
                )
        return data, "DIGEST"
    head = sys.stdin.buffer.read(MAX_MESSAGE + 1)
    if len(head) <= MAX_MESSAGE:
        return head, "RAW"
    if not allow_hashing or hash_name is None:
        raise UsageError(f"the message on standard input is larger than {MAX_MESSAGE} bytes")
    hasher = hashlib.new(hash_name, head)
    while block := sys.stdin.buffer.read(1 << 20):
        hasher.update(block)
    return hasher.digest(), "DIGEST"


def _read_small_file(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as stream:
            data = stream.read(_MAX_SIGNATURE_FILE + 1)
    except OSError as error:
        raise UsageError(f"cannot read {what} {path}: {error.strerror}") from None
    if not data or len(data) > _MAX_SIGNATURE_FILE:
        raise UsageError(f"{what} {path} is {'empty' if not data else 'too large'}")
    return data


def _write_binary(data: bytes) -> None:
    sys.stdout.buffer.write(data)
    sys.stdout.buffer.flush()


def _is(error: KMSError, aws_type: str) -> bool:
    return error.aws_type == aws_type


# ------------------------------------------------------------------ commands
def cmd_sign(args: argparse.Namespace) -> None:
    message, message_type = _read_message(args.digest, args.algorithm)
    with _client(args) as client:
        response = client.call(
            "Sign",
            {
                "KeyId": args.key,
                "Message": message,
                "MessageType": message_type,
                "SigningAlgorithm": args.algorithm,
            },
        )
    _write_binary(base64.b64decode(response["Signature"]))


def cmd_verify(args: argparse.Namespace) -> None:
    signature = _read_small_file(args.signature, "signature")
    message, message_type = _read_message(args.digest, args.algorithm)
    if args.public_key:
        verify_offline(
            _read_small_file(args.public_key, "public key"),
            args.algorithm,
            message,
            message_type,
            signature,
            where=args.public_key,
        )
        print(f"signature valid ({args.algorithm}, public key {args.public_key})")
        return
    with _client(args) as client:
        try:
            client.call(
                "Verify",
                {
                    "KeyId": args.key,
                    "Message": message,
                    "MessageType": message_type,
                    "Signature": signature,
                    "SigningAlgorithm": args.algorithm,
                },
            )
        except KMSError as error:
            # AWS KMS answers an invalid signature with KMSInvalidSignatureException,
            # not with SignatureValid false
            if _is(error, "KMSInvalidSignatureException"):
                raise InvalidSignature(
                    f"signature NOT valid for {args.key} with {args.algorithm}"
                ) from None
            raise
    print(f"signature valid ({args.algorithm}, key {args.key})")


def cmd_mac(args: argparse.Namespace) -> None:
    message, _ = _read_message(False, args.algorithm, allow_hashing=False)
    with _client(args) as client:
        response = client.call(
            "GenerateMac", {"KeyId": args.key, "Message": message, "MacAlgorithm": args.algorithm}
        )
    _write_binary(base64.b64decode(response["Mac"]))


def cmd_verify_mac(args: argparse.Namespace) -> None:
    mac = _read_small_file(args.mac, "MAC")
    message, _ = _read_message(False, args.algorithm, allow_hashing=False)
    with _client(args) as client:
        try:
            client.call(
                "VerifyMac",
                {
                    "KeyId": args.key,
                    "Message": message,
                    "Mac": mac,
                    "MacAlgorithm": args.algorithm,
                },
            )
        except KMSError as error:
            if _is(error, "KMSInvalidMacException"):
                raise InvalidSignature(
                    f"MAC NOT valid for {args.key} with {args.algorithm}"
                ) from None
            raise
    print(f"MAC valid ({args.algorithm}, key {args.key})")


# ----------------------------------------------------------- offline verify
def load_public_key(data: bytes, where: str) -> Any:
    """A public key from PEM (``-----BEGIN PUBLIC KEY-----``) or DER SubjectPublicKeyInfo
    (what AWS KMS's GetPublicKey returns, base64-decoded)."""
    from cryptography.hazmat.primitives.serialization import (
        load_der_public_key,
        load_pem_public_key,
    )

    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            return load_pem_public_key(data)
        return load_der_public_key(data)
    except (ValueError, TypeError) as error:  # cryptography's words name no key material
        raise UsageError(f"{where} is not a PEM or DER public key ({error})") from None
    except Exception as error:  # UnsupportedAlgorithm: a key type we cannot use
        raise UsageError(f"{where}: unsupported public key ({error})") from None


def verify_offline(
    public_key_bytes: bytes,
    algorithm: str,
    message: bytes,
    message_type: str,
    signature: bytes,
    *,
    where: str,
) -> None:
    """Check ``signature`` as AWS KMS's Verify would, with the public key alone.

    Raises :class:`InvalidSignature` when it does not verify, UsageError when key and
    algorithm do not fit. RSASSA-PSS uses MGF1 with the same hash and a salt as long as
    the digest, which is what AWS KMS signs with; ECDSA signatures are DER (as AWS KMS's).
    """
    from cryptography.exceptions import InvalidSignature as CryptographyInvalidSignature
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, utils

    public_key = load_public_key(public_key_bytes, where)
    hash_algorithm: hashes.HashAlgorithm = {
        "sha256": hashes.SHA256(),
        "sha384": hashes.SHA384(),
        "sha512": hashes.SHA512(),
    }[SIGNING_ALGORITHMS[algorithm]]
    chosen: Any = utils.Prehashed(hash_algorithm) if message_type == "DIGEST" else hash_algorithm
    try:
        if algorithm.startswith("RSASSA_"):
            if not isinstance(public_key, rsa.RSAPublicKey):
                raise UsageError(f"{algorithm} needs an RSA public key; {where} is not one")
            if algorithm.startswith("RSASSA_PSS_"):
                pad: padding.AsymmetricPadding = padding.PSS(
                    mgf=padding.MGF1(hash_algorithm), salt_length=hash_algorithm.digest_size
                )
            else:
                pad = padding.PKCS1v15()
            public_key.verify(signature, message, pad, chosen)
        else:
            if not isinstance(public_key, ec.EllipticCurvePublicKey):
                raise UsageError(f"{algorithm} needs an elliptic-curve public key; {where} is not")
            public_key.verify(signature, message, ec.ECDSA(chosen))
    except CryptographyInvalidSignature:
        raise InvalidSignature(
            f"signature NOT valid for public key {where} with {algorithm}"
        ) from None


# -------------------------------------------------------------------- parser
def _check_verify_args(args: argparse.Namespace) -> str | None:
    if bool(args.key) == bool(args.public_key):
        return "verify: name the key with --key (keyd) or --public-key FILE (offline), not both"
    return None


def add_parsers(commands: argparse._SubParsersAction) -> None:
    signing = sorted(SIGNING_ALGORITHMS)

    def message_options(sub: argparse.ArgumentParser) -> None:
        sub.add_argument(
            "--digest",
            action="store_true",
            help="standard input is the message's digest (AWS MessageType DIGEST), not the "
            "message; without it a message over 4096 bytes is hashed here and sent as DIGEST",
        )

    sign = commands.add_parser(
        "sign", help="sign standard input with an asymmetric key in keyd; signature to stdout"
    )
    sign.add_argument("--key", required=True, help="key id, key ARN or alias/NAME")
    sign.add_argument("--algorithm", required=True, choices=signing, help="SigningAlgorithm")
    message_options(sign)
    keyd_options(sign)
    sign.set_defaults(func=cmd_sign)

    verify = commands.add_parser(
        "verify",
        help="verify a signature of standard input (exit 0 valid, 1 not valid), by keyd "
        "(--key) or offline with a public key (--public-key)",
    )
    verify.add_argument("--key", help="key id, key ARN or alias/NAME (Verify in keyd)")
    verify.add_argument(
        "--public-key",
        metavar="FILE",
        help="verify offline, without keyd, with this PEM or DER public key "
        "(kmsfs keys public-key)",
    )
    verify.add_argument("--algorithm", required=True, choices=signing, help="SigningAlgorithm")
    verify.add_argument("--signature", required=True, metavar="FILE", help="the signature")
    message_options(verify)
    keyd_options(verify)
    verify.set_defaults(func=cmd_verify, check_args=_check_verify_args)

    mac = commands.add_parser(
        "mac", help="HMAC of standard input (<= 4096 bytes) with an HMAC key in keyd, to stdout"
    )
    mac.add_argument("--key", required=True, help="key id, key ARN or alias/NAME")
    mac.add_argument("--algorithm", required=True, choices=MAC_ALGORITHMS, help="MacAlgorithm")
    keyd_options(mac)
    mac.set_defaults(func=cmd_mac)

    verify_mac = commands.add_parser(
        "verify-mac", help="verify an HMAC of standard input (exit 0 valid, 1 not valid)"
    )
    verify_mac.add_argument("--key", required=True, help="key id, key ARN or alias/NAME")
    verify_mac.add_argument(
        "--algorithm", required=True, choices=MAC_ALGORITHMS, help="MacAlgorithm"
    )
    verify_mac.add_argument("--mac", required=True, metavar="FILE", help="the MAC")
    keyd_options(verify_mac)
    verify_mac.set_defaults(func=cmd_verify_mac)
