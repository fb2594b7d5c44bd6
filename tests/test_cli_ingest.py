"""Write-only ingestion (issue 15, "Use in the filesystem"): `kmsfs init --recipient-key`,
`kmsfs encrypt --public-key` with keyd stopped, and reading through keyd afterwards."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

from tests.conftest import KMSFS

HEADER = 2048
SLOT0 = 576
SLOT_SIZE = 736


def kmsfs(env: dict[str, str], *args: str, stdin: bytes = b"") -> subprocess.CompletedProcess:
    return subprocess.run(
        [*KMSFS, *args], env=env, input=stdin, capture_output=True, timeout=120, check=False
    )


def ok(result: subprocess.CompletedProcess) -> bytes:
    assert result.returncode == 0, result.stderr.decode()
    return result.stdout


def one_line(result: subprocess.CompletedProcess) -> str:
    lines = result.stderr.decode().strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def setup_keys(keyd: Any, tmp_path: Path) -> tuple[str, Path]:
    """alias/fs (symmetric) and alias/rsa-ingest (RSA_2048 ENCRYPT_DECRYPT); its ARN and
    its public key exported as ingest.pem."""
    ok(kmsfs(keyd.env, "keys", "create", "--alias", "alias/fs"))
    ok(
        kmsfs(
            keyd.env, "keys", "create", "--alias", "alias/rsa-ingest",
            "--spec", "RSA_2048", "--usage", "ENCRYPT_DECRYPT",
        )
    )  # fmt: skip
    described = json.loads(ok(kmsfs(keyd.env, "keys", "describe", "alias/rsa-ingest", "--json")))
    pem = tmp_path / "ingest.pem"
    ok(kmsfs(keyd.env, "keys", "public-key", "alias/rsa-ingest", "--pem", "-o", str(pem)))
    return described["KeyMetadata"]["Arn"], pem


def init(keyd: Any, cipherdir: Path, *extra: str) -> None:
    ok(kmsfs(keyd.env, "init", str(cipherdir), "--key", "alias/fs", *extra))


def test_ingest_with_keyd_stopped_then_read_through_keyd(live_keyd: Any, tmp_path: Path) -> None:
    arn, pem = setup_keys(live_keyd, tmp_path)
    cipherdir = tmp_path / "c"
    init(live_keyd, cipherdir, "--plaintext-names", "--recipient-key", "alias/rsa-ingest")
    assert json.loads((cipherdir / "kmsfs.conf").read_text())["recipient_key"]["key_arn"] == arn
    source = tmp_path / "report.csv"
    source.write_bytes(os.urandom(200_000))

    live_keyd.stop()  # the ingest host has no keyd
    ok(kmsfs(live_keyd.env, "encrypt", "--public-key", str(pem), str(source), str(cipherdir / "r")))
    no_read = kmsfs(live_keyd.env, "decrypt", str(cipherdir / "r"), "-")
    assert no_read.returncode == 4, no_read.stderr  # nothing can be read back here
    data = (cipherdir / "r").read_bytes()
    assert data[8:10] == b"\x00\x03" and data[SLOT0 + 12] == 1  # version 3, recipient slot

    live_keyd.start()
    out = tmp_path / "out"
    ok(kmsfs(live_keyd.env, "decrypt", "--cipherdir", str(cipherdir), "r", str(out)))
    assert out.read_bytes() == source.read_bytes()
    shown = json.loads(ok(kmsfs(live_keyd.env, "inspect", str(cipherdir / "r"), "--json")))
    assert shown["KeyWrapping"] == "RSAES_OAEP_SHA_256" and shown["FormatVersion"] == 3
    assert shown["KeyArn"] == arn
    ok(kmsfs(live_keyd.env, "fsck", str(cipherdir), "--verify"))
    # the single-file reader (no cipher directory) opens it too
    ok(kmsfs(live_keyd.env, "decrypt", str(cipherdir / "r"), str(tmp_path / "out2")))
    assert (tmp_path / "out2").read_bytes() == source.read_bytes()


def test_single_files_need_the_key_arn(live_keyd: Any, tmp_path: Path) -> None:
    arn, pem = setup_keys(live_keyd, tmp_path)
    live_keyd.stop()
    src = tmp_path / "in"
    src.write_bytes(b"single file\n")
    missing = kmsfs(
        live_keyd.env, "encrypt", "--public-key", str(pem), str(src), str(tmp_path / "x")
    )
    assert missing.returncode == 2 and "--key" in one_line(missing)
    encrypt = ["encrypt", "--public-key", str(pem), "--key", arn, "--context", "case=1"]
    ok(kmsfs(live_keyd.env, *encrypt, str(src), str(tmp_path / "x")))
    live_keyd.start()
    decrypted = ok(kmsfs(live_keyd.env, "decrypt", "--context", "case=1", str(tmp_path / "x"), "-"))
    assert decrypted == b"single file\n"
    wrong = kmsfs(live_keyd.env, "decrypt", "--context", "case=2", str(tmp_path / "x"), "-")
    assert wrong.returncode == 7, wrong.stderr


def test_refusals_name_the_reason(live_keyd: Any, tmp_path: Path) -> None:
    arn, pem = setup_keys(live_keyd, tmp_path)
    ok(kmsfs(live_keyd.env, "keys", "create", "--alias", "alias/ec", "--spec", "ECC_NIST_P256",
             "--usage", "SIGN_VERIFY"))  # fmt: skip
    src = tmp_path / "in"
    src.write_bytes(b"x")
    # a recipient key that cannot be one
    for bad in ("alias/ec", "alias/fs"):
        refused = kmsfs(
            live_keyd.env, "init", str(tmp_path / "bad"), "--key", "alias/fs",
            "--recipient-key", bad,
        )  # fmt: skip
        assert refused.returncode == 2 and "must be an RSA key" in one_line(refused)
    # a cipher directory without a recipient key; one with encrypted names
    plain = tmp_path / "plain"
    init(live_keyd, plain, "--plaintext-names")
    names = tmp_path / "names"
    init(live_keyd, names, "--recipient-key", "alias/rsa-ingest")
    live_keyd.stop()
    cases = [
        (plain / "f", str(pem), "takes no files written with a public key"),
        (names / "f", str(pem), "encrypts file names"),
    ]
    other = tmp_path / "other.pem"
    subprocess.run(["openssl", "genrsa", "-out", str(tmp_path / "o.key"), "2048"], check=True,
                   capture_output=True)  # fmt: skip
    subprocess.run(["openssl", "pkey", "-in", str(tmp_path / "o.key"), "-pubout", "-out",
                    str(other)], check=True)  # fmt: skip
    cipherdir = tmp_path / "c"
    live_keyd.start()
    init(live_keyd, cipherdir, "--plaintext-names", "--recipient-key", "alias/rsa-ingest")
    live_keyd.stop()
    cases += [
        (cipherdir / "f", str(other), "is not the public key"),
        (cipherdir / "kmsfs.conf", str(pem), "keeps for itself"),
    ]
    for dst, key, reason in cases:
        refused = kmsfs(live_keyd.env, "encrypt", "--public-key", key, str(src), str(dst))
        assert refused.returncode == 2 and reason in one_line(refused), (dst, refused.stderr)


def test_a_cipherdir_accepts_only_its_own_recipient_key(live_keyd: Any, tmp_path: Path) -> None:
    """Anyone with a public key can make a recipient slot: a cipher directory made without
    --recipient-key refuses such a file even when everything else about it is right."""
    arn, pem = setup_keys(live_keyd, tmp_path)
    plain = tmp_path / "plain"
    init(live_keyd, plain, "--plaintext-names")
    fs_id = json.loads((plain / "kmsfs.conf").read_text())["filesystem_id"]
    src = tmp_path / "in"
    src.write_bytes(b"planted")
    ok(
        kmsfs(
            live_keyd.env, "encrypt", "--public-key", str(pem), "--key", arn,
            "--context", f"kmsfs:fs-id={fs_id}", str(src), str(tmp_path / "planted"),
        )
    )  # fmt: skip
    (tmp_path / "planted").rename(plain / "planted")  # (encrypt refuses to write it there)
    refused = kmsfs(live_keyd.env, "decrypt", "--cipherdir", str(plain), "planted", "-")
    assert refused.returncode == 7 and "accepts none" in one_line(refused)
    # the single-file reader, asked for this file by name, does open it
    assert ok(kmsfs(live_keyd.env, "decrypt", str(plain / "planted"), "-")) == b"planted"


def test_swapped_slots_and_headers_are_detected(live_keyd: Any, tmp_path: Path) -> None:
    arn, pem = setup_keys(live_keyd, tmp_path)
    cipherdir = tmp_path / "c"
    init(live_keyd, cipherdir, "--plaintext-names", "--recipient-key", "alias/rsa-ingest")
    for name in ("a", "b"):
        (tmp_path / name).write_bytes(name.encode() * 1000)
        ok(kmsfs(live_keyd.env, "encrypt", "--public-key", str(pem), str(tmp_path / name),
                 str(cipherdir / name)))  # fmt: skip
    a, b = (cipherdir / "a").read_bytes(), (cipherdir / "b").read_bytes()
    slot_a = a[SLOT0 : SLOT0 + SLOT_SIZE]
    (cipherdir / "slot-swapped").write_bytes(b[:SLOT0] + slot_a + b[SLOT0 + SLOT_SIZE :])
    (cipherdir / "header-swapped").write_bytes(a[:HEADER] + b[HEADER:])
    (cipherdir / "id-swapped").write_bytes(b[:16] + a[16:32] + b[32:])
    for name in ("slot-swapped", "header-swapped", "id-swapped"):
        refused = kmsfs(live_keyd.env, "decrypt", "--cipherdir", str(cipherdir), name, "-")
        assert refused.returncode == 7, (name, refused.stderr)
    out = ok(kmsfs(live_keyd.env, "decrypt", "--cipherdir", str(cipherdir), "a", "-"))
    assert out == b"a" * 1000


def test_the_recipient_key_is_sealed_in_kmsfs_conf(live_keyd: Any, tmp_path: Path) -> None:
    """An attacker who can write the cipher directory cannot name another recipient key:
    kmsfs.conf's seal covers it (exit 8 before any file is read)."""
    arn, pem = setup_keys(live_keyd, tmp_path)
    cipherdir = tmp_path / "c"
    init(live_keyd, cipherdir, "--plaintext-names", "--recipient-key", "alias/rsa-ingest")
    (tmp_path / "in").write_bytes(b"x")
    ok(kmsfs(live_keyd.env, "encrypt", "--public-key", str(pem), str(tmp_path / "in"),
             str(cipherdir / "f")))  # fmt: skip
    conf = cipherdir / "kmsfs.conf"
    original = conf.read_text()
    document = json.loads(original)
    document["recipient_key"]["key_arn"] = arn.replace("-", "0", 1)
    conf.write_text(json.dumps(document))
    refused = kmsfs(live_keyd.env, "decrypt", "--cipherdir", str(cipherdir), "f", "-")
    assert refused.returncode == 8 and "failed authentication" in one_line(refused)
    del document["recipient_key"]
    conf.write_text(json.dumps(document))
    refused = kmsfs(live_keyd.env, "decrypt", "--cipherdir", str(cipherdir), "f", "-")
    assert refused.returncode == 8 and "failed authentication" in one_line(refused)
    conf.write_text(original)
    assert ok(kmsfs(live_keyd.env, "decrypt", "--cipherdir", str(cipherdir), "f", "-")) == b"x"
