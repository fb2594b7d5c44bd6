"""`kmsfs keys create --spec/--usage`, `keys public-key`, `sign`, `verify`, `mac`, `verify-mac`
(issue 15's CLI) against a real keyd, and `verify --public-key` offline; openssl checks what
`kmsfs sign` made with only the `keys public-key --pem` output."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from tests.conftest import KMSFS

needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="no openssl")


def kmsfs(
    env: dict[str, str], *args: str, stdin: bytes = b""
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [*KMSFS, *args], env=env, input=stdin, capture_output=True, timeout=120, check=False
    )


def ok(result: subprocess.CompletedProcess[bytes]) -> bytes:
    assert result.returncode == 0, result.stderr.decode()
    return result.stdout


def one_line(result: subprocess.CompletedProcess[bytes]) -> str:
    lines = result.stderr.decode().strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def flipped(data: bytes) -> bytes:
    return data[:-1] + bytes([data[-1] ^ 1])


def openssl_verify(public_pem: Path, algorithm_args: list[str], signature: Path, message: Path):
    return subprocess.run(
        ["openssl", "dgst", *algorithm_args, "-verify", str(public_pem)]
        + ["-signature", str(signature), str(message)],
        capture_output=True,
        timeout=60,
        check=False,
    )


def make_key(env: dict[str, str], alias: str, spec: str, usage: str) -> None:
    out = ok(kmsfs(env, "keys", "create", "--alias", alias, "--spec", spec, "--usage", usage))
    assert spec.encode() in out and usage.encode() in out


# ------------------------------------------------------------ through keyd
@needs_openssl
def test_ecc_p256_sign_checks_out_with_openssl_and_verify(live_keyd: Any, tmp_path: Path) -> None:
    env = live_keyd.env
    make_key(env, "alias/ec", "ECC_NIST_P256", "SIGN_VERIFY")
    pem = tmp_path / "pub.pem"
    ok(kmsfs(env, "keys", "public-key", "alias/ec", "--pem", "-o", str(pem)))
    assert pem.read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----\n")
    der = ok(kmsfs(env, "keys", "public-key", "alias/ec", "--der"))
    assert (
        serialization.load_pem_public_key(pem.read_bytes()).public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        == der
    )

    message = tmp_path / "msg"
    message.write_bytes(b"the quick brown fox\n" * 10)
    signature = tmp_path / "sig"
    signature.write_bytes(
        ok(
            kmsfs(
                env, "sign", "--key", "alias/ec", "--algorithm", "ECDSA_SHA_256",
                stdin=message.read_bytes(),
            )
        )
    )  # fmt: skip
    checked = openssl_verify(pem, ["-sha256"], signature, message)
    assert checked.returncode == 0 and b"Verified OK" in checked.stdout, checked

    verify = ["verify", "--algorithm", "ECDSA_SHA_256", "--signature", str(signature)]
    valid = kmsfs(env, *verify, "--key", "alias/ec", stdin=message.read_bytes())
    assert b"signature valid" in ok(valid)
    offline = kmsfs(env, *verify, "--public-key", str(pem), stdin=message.read_bytes())
    assert b"signature valid" in ok(offline)

    # a changed message, or a flipped bit in the signature: exit 1, one line
    original = message.read_bytes()
    for change in ("message", "signature"):
        stdin = original + b"!" if change == "message" else original
        if change == "signature":
            signature.write_bytes(flipped(signature.read_bytes()))
        for how in (["--key", "alias/ec"], ["--public-key", str(pem)]):
            bad = kmsfs(env, *verify, *how, stdin=stdin)
            assert bad.returncode == 1, bad.stderr
            assert "NOT valid" in one_line(bad)


@needs_openssl
def test_rsa_pss_and_pkcs1_over_a_long_message(live_keyd: Any, tmp_path: Path) -> None:
    """A message over 4096 bytes is hashed by the CLI and sent as DIGEST: the signature
    is the one over the whole message (openssl checks it over the file)."""
    env = live_keyd.env
    make_key(env, "alias/rsa", "RSA_2048", "SIGN_VERIFY")
    pem = tmp_path / "pub.pem"
    ok(kmsfs(env, "keys", "public-key", "alias/rsa", "-o", str(pem)))
    message = tmp_path / "msg"
    message.write_bytes(os.urandom(100_000))
    cases = {
        "RSASSA_PSS_SHA_256": ["-sha256", "-sigopt", "rsa_padding_mode:pss"]
        + ["-sigopt", "rsa_pss_saltlen:32"],
        "RSASSA_PKCS1_V1_5_SHA_512": ["-sha512"],
    }
    for algorithm, openssl_args in cases.items():
        signature = tmp_path / f"{algorithm}.sig"
        signature.write_bytes(
            ok(
                kmsfs(
                    env, "sign", "--key", "alias/rsa", "--algorithm", algorithm,
                    stdin=message.read_bytes(),
                )
            )
        )  # fmt: skip
        assert len(signature.read_bytes()) == 256
        checked = openssl_verify(pem, openssl_args, signature, message)
        assert checked.returncode == 0, checked
        verify = ["verify", "--algorithm", algorithm, "--signature", str(signature)]
        ok(kmsfs(env, *verify, "--key", "alias/rsa", stdin=message.read_bytes()))
        ok(kmsfs(env, *verify, "--public-key", str(pem), stdin=message.read_bytes()))
        # the same with --digest: standard input is the SHA digest
        digest = hashlib.new("sha" + algorithm[-3:], message.read_bytes()).digest()
        ok(kmsfs(env, *verify, "--digest", "--key", "alias/rsa", stdin=digest))
        ok(kmsfs(env, *verify, "--digest", "--public-key", str(pem), stdin=digest))


def test_digest_of_the_wrong_length_is_a_usage_error(live_keyd: Any) -> None:
    env = live_keyd.env
    make_key(env, "alias/ec", "ECC_NIST_P256", "SIGN_VERIFY")
    bad = kmsfs(
        env, "sign", "--key", "alias/ec", "--algorithm", "ECDSA_SHA_256", "--digest",
        stdin=bytes(20),
    )  # fmt: skip
    assert bad.returncode == 2 and "32-byte digest" in one_line(bad)


def test_hmac_mac_and_verify_mac(live_keyd: Any, tmp_path: Path) -> None:
    env = live_keyd.env
    make_key(env, "alias/h", "HMAC_256", "GENERATE_VERIFY_MAC")
    mac = ok(kmsfs(env, "mac", "--key", "alias/h", "--algorithm", "HMAC_SHA_256", stdin=b"hi"))
    assert len(mac) == 32
    again = ok(kmsfs(env, "mac", "--key", "alias/h", "--algorithm", "HMAC_SHA_256", stdin=b"hi"))
    assert again == mac  # deterministic
    (tmp_path / "mac").write_bytes(mac)
    verify = ["verify-mac", "--key", "alias/h", "--algorithm", "HMAC_SHA_256"]
    assert b"MAC valid" in ok(kmsfs(env, *verify, "--mac", str(tmp_path / "mac"), stdin=b"hi"))
    bad = kmsfs(env, *verify, "--mac", str(tmp_path / "mac"), stdin=b"ho")
    assert bad.returncode == 1 and "MAC NOT valid" in one_line(bad)
    (tmp_path / "mac").write_bytes(flipped(mac))
    bad = kmsfs(env, *verify, "--mac", str(tmp_path / "mac"), stdin=b"hi")
    assert bad.returncode == 1 and "MAC NOT valid" in one_line(bad)
    too_long = kmsfs(
        env, "mac", "--key", "alias/h", "--algorithm", "HMAC_SHA_256", stdin=bytes(4097)
    )
    assert too_long.returncode == 2 and "4096" in one_line(too_long)


def test_a_refused_combination_is_keyds_error_on_one_line(live_keyd: Any) -> None:
    env = live_keyd.env
    make_key(env, "alias/ec", "ECC_NIST_P256", "SIGN_VERIFY")
    refused = kmsfs(
        env, "sign", "--key", "alias/ec", "--algorithm", "RSASSA_PSS_SHA_256", stdin=b"x"
    )
    assert refused.returncode == 3 and "Exception" in one_line(refused)


# ------------------------------------------------------------------ offline
def no_keyd_env(tmp_path: Path) -> dict[str, str]:
    """An environment whose keyd socket does not exist: anything asking keyd fails."""
    return {**os.environ, "KMSFS_KEYD_SOCKET": str(tmp_path / "no-keyd.sock")}


@needs_openssl
def test_verify_offline_checks_openssl_signatures_without_keyd(tmp_path: Path) -> None:
    env = no_keyd_env(tmp_path)
    message = tmp_path / "msg"
    message.write_bytes(b"offline\n")
    cases = [
        ("ec.pem", ["ecparam", "-name", "secp384r1", "-genkey", "-noout"], "ECDSA_SHA_384", []),
        ("rsa.pem", ["genrsa", "2048"], "RSASSA_PSS_SHA_512", ["-sigopt", "rsa_padding_mode:pss"]),
        ("rsa.pem", ["genrsa", "2048"], "RSASSA_PKCS1_V1_5_SHA_256", []),
    ]
    for private_name, genkey, algorithm, sigopts in cases:
        private = tmp_path / private_name
        if not private.exists():
            private.write_bytes(subprocess.run(["openssl", *genkey], capture_output=True).stdout)
        public = tmp_path / f"{private_name}.pub"
        subprocess.run(
            ["openssl", "pkey", "-in", str(private), "-pubout", "-out", str(public)], check=True
        )
        digest = "-sha" + algorithm[-3:]
        salt = ["-sigopt", f"rsa_pss_saltlen:{int(algorithm[-3:]) // 8}"] if sigopts else []
        signature = tmp_path / "sig"
        subprocess.run(
            ["openssl", "dgst", digest, "-sign", str(private), *sigopts, *salt]
            + ["-out", str(signature), str(message)],
            check=True,
        )
        verify = ["verify", "--public-key", str(public), "--algorithm", algorithm]
        ok(kmsfs(env, *verify, "--signature", str(signature), stdin=message.read_bytes()))
        signature.write_bytes(flipped(signature.read_bytes()))
        bad = kmsfs(env, *verify, "--signature", str(signature), stdin=message.read_bytes())
        assert bad.returncode == 1 and "NOT valid" in one_line(bad)


def test_verify_offline_accepts_der_and_refuses_the_wrong_key_type(tmp_path: Path) -> None:
    env = no_keyd_env(tmp_path)
    private = ec.generate_private_key(ec.SECP256R1())
    der = tmp_path / "pub.der"
    der.write_bytes(
        private.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    signature = tmp_path / "sig"
    signature.write_bytes(private.sign(b"m", ec.ECDSA(hashes.SHA256())))
    verify = ["verify", "--public-key", str(der), "--signature", str(signature)]
    ok(kmsfs(env, *verify, "--algorithm", "ECDSA_SHA_256", stdin=b"m"))
    wrong = kmsfs(env, *verify, "--algorithm", "RSASSA_PSS_SHA_256", stdin=b"m")
    assert wrong.returncode == 2 and "RSA public key" in one_line(wrong)

    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    # a PSS signature with a salt other than the digest length is not what AWS KMS makes
    (tmp_path / "rsa.pem").write_bytes(
        rsa_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    pss_max = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.MAX_LENGTH)
    signature.write_bytes(rsa_key.sign(b"m", pss_max, hashes.SHA256()))
    verify = ["verify", "--public-key", str(tmp_path / "rsa.pem"), "--signature", str(signature)]
    assert kmsfs(env, *verify, "--algorithm", "RSASSA_PSS_SHA_256", stdin=b"m").returncode == 1
    pss_32 = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)
    signature.write_bytes(rsa_key.sign(b"m", pss_32, hashes.SHA256()))
    ok(kmsfs(env, *verify, "--algorithm", "RSASSA_PSS_SHA_256", stdin=b"m"))


def test_verify_needs_exactly_one_of_key_and_public_key(tmp_path: Path) -> None:
    env = no_keyd_env(tmp_path)
    (tmp_path / "sig").write_bytes(b"x")
    base = ["verify", "--algorithm", "ECDSA_SHA_256", "--signature", str(tmp_path / "sig")]
    for extra in ([], ["--key", "k", "--public-key", str(tmp_path / "sig")]):
        result = kmsfs(env, *base, *extra)
        assert result.returncode == 2 and b"--public-key" in result.stderr
    garbage = kmsfs(env, *base, "--public-key", str(tmp_path / "sig"), stdin=b"m")
    assert garbage.returncode == 2 and "not a PEM or DER public key" in one_line(garbage)
