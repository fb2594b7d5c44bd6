"""Bringing your own key material with the command line and openssl, exactly as AWS's
"Importing key material" pages show it, against a real keyd; then losing the keystore
and re-importing the escrowed material into a fresh one under the key's old id."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import Keyd

OPENSSL_OAEP_SHA256 = [
    "-pkeyopt", "rsa_padding_mode:oaep", "-pkeyopt", "rsa_oaep_md:sha256",
    "-pkeyopt", "rsa_mgf1_md:sha256",
]  # fmt: skip


def openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


def wrap_with_openssl(work: Path, algorithm: str, material: Path) -> Path:
    public = work / "WrappingPublicKey.der"
    out = work / "EncryptedKeyMaterial.bin"
    if algorithm == "RSAES_OAEP_SHA_256":
        openssl("pkeyutl", "-encrypt", "-in", str(material), "-out", str(out), "-inkey",
                str(public), "-keyform", "DER", "-pubin", *OPENSSL_OAEP_SHA256)  # fmt: skip
        return out
    # RSA_AES_KEY_WRAP_SHA_256: an AES-256 key wraps the material (RFC 5649, openssl's
    # id-aes256-wrap-pad with its default IV A65959A6), RSA-OAEP wraps the AES key
    aes_key = work / "aes-key.bin"
    openssl("rand", "-out", str(aes_key), "32")
    openssl("enc", "-id-aes256-wrap-pad", "-K", aes_key.read_bytes().hex(), "-iv", "A65959A6",
            "-in", str(material), "-out", str(work / "material-wrapped.bin"))  # fmt: skip
    openssl("pkeyutl", "-encrypt", "-in", str(aes_key), "-out", str(work / "aes-wrapped.bin"),
            "-inkey", str(public), "-keyform", "DER", "-pubin", *OPENSSL_OAEP_SHA256)  # fmt: skip
    out.write_bytes(
        (work / "aes-wrapped.bin").read_bytes() + (work / "material-wrapped.bin").read_bytes()
    )
    return out


def import_into(keyd: Keyd, key: str, work: Path, algorithm: str, material: Path) -> None:
    keyd.kmsfs("keys", "import-parameters", key, "--algorithm", algorithm,
               "--wrapping-key-spec", "RSA_2048", "--out-dir", str(work))  # fmt: skip
    assert (work / "WrappingPublicKey.pem").read_text().startswith("-----BEGIN PUBLIC KEY-----")
    encrypted = wrap_with_openssl(work, algorithm, material)
    keyd.kmsfs("keys", "import-material", key, "--import-token", str(work / "ImportToken.bin"),
               "--encrypted-material", str(encrypted), "--no-expiry")  # fmt: skip


@pytest.mark.parametrize("algorithm", ["RSAES_OAEP_SHA_256", "RSA_AES_KEY_WRAP_SHA_256"])
def test_openssl_wrapped_material_and_escrow_into_a_fresh_keystore(
    keyd_factory: Callable[..., Keyd], tmp_path: Path, algorithm: str
) -> None:
    material = tmp_path / "material.bin"
    openssl("rand", "-out", str(material), "32")  # the escrow copy, kept outside keyd
    first = keyd_factory("first")
    first.init()
    first.start()
    created = json.loads(
        first.kmsfs(
            "keys", "create", "--origin", "EXTERNAL", "--alias", "alias/byok", "--json"
        ).stdout  # fmt: skip
    )
    key_id = created["KeyMetadata"]["KeyId"]
    assert created["KeyMetadata"]["KeyState"] == "PendingImport"
    refused = first.kmsfs("keys", "encrypt", "--key", "alias/byok", input=b"x", check=False)
    assert refused.returncode != 0 and "KMSInvalidStateException" in refused.stderr.decode()
    (tmp_path / "one").mkdir()
    import_into(first, "alias/byok", tmp_path / "one", algorithm, material)
    blob = first.kmsfs("keys", "encrypt", "--key", "alias/byok", "--context", "app=x",
                       input=b"kept for years").stdout  # fmt: skip
    first.stop()  # ... and its keystore is lost

    fresh = keyd_factory("fresh")
    fresh.init()
    fresh.start()
    fresh.kmsfs("keys", "create", "--origin", "EXTERNAL", "--key-id", key_id)
    (tmp_path / "two").mkdir()
    import_into(fresh, key_id, tmp_path / "two", algorithm, material)
    opened = fresh.kmsfs("keys", "decrypt", "--context", "app=x", input=blob)
    assert opened.stdout == b"kept for years"
    # other material is refused for this key
    other = tmp_path / "other.bin"
    other.write_bytes(os.urandom(32))
    (tmp_path / "three").mkdir()
    fresh.kmsfs("keys", "import-parameters", key_id, "--wrapping-key-spec", "RSA_2048",
                "--out-dir", str(tmp_path / "three"))  # fmt: skip
    encrypted = wrap_with_openssl(tmp_path / "three", "RSAES_OAEP_SHA_256", other)
    result = fresh.kmsfs("keys", "import-material", key_id, "--import-token",
                         str(tmp_path / "three" / "ImportToken.bin"), "--encrypted-material",
                         str(encrypted), "--no-expiry", check=False)  # fmt: skip
    assert result.returncode != 0
    assert "IncorrectKeyMaterialException" in result.stderr.decode()
    fresh.kmsfs("keys", "delete-material", key_id)
    gone = fresh.kmsfs("keys", "decrypt", "--context", "app=x", input=blob, check=False)
    assert gone.returncode != 0 and "KMSInvalidStateException" in gone.stderr.decode()
