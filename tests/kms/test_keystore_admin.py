"""The keystore is the crown jewels (issue 18): backup while keyd serves, --verify,
restore, passwd and rotate-root-key, each audited, each checked against kills.

Every test runs the real commands against a real keyd (or a stopped one's keystore).
"""

from __future__ import annotations

import base64
import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest

from kmsfs.errors import KeystoreError, KMSError, WrongRootKey
from kmsfs.kms.admin import MANIFEST_NAME, read_manifest, restore_backup, verify_backup
from kmsfs.kms.keystore import DB_NAME, Keystore, RootKeySource
from tests.conftest import KMSFS, Keyd, run_kmsfs
from tests.kms.users import NOBODY, call_as, needs_other_users

SECRET = b"the data key of a file, say"


def audit(keystore: Path, *args: str) -> list[dict]:
    out = run_kmsfs(
        "keyd", "audit", "tail", "--keystore", str(keystore), "--json", "-n", "500", *args
    ).stdout.decode()
    return [json.loads(line) for line in out.splitlines()]


def seal(keyd: Keyd, key: str = "alias/k") -> str:
    with keyd.client() as client:
        response = client.call(
            "Encrypt",
            {"KeyId": key, "Plaintext": base64.b64encode(SECRET).decode(),
             "EncryptionContext": {"file": "x"}},
        )  # fmt: skip
    return response["CiphertextBlob"]


def opens(keyd: Keyd, blob: str) -> bytes:
    with keyd.client() as client:
        response = client.call(
            "Decrypt", {"CiphertextBlob": blob, "EncryptionContext": {"file": "x"}}
        )
    return base64.b64decode(response["Plaintext"])


def unseal_all(keystore: Path, source: RootKeySource) -> int:
    """Open the keystore with *source* and unseal every key version; how many."""
    store = Keystore.open(keystore, source)
    try:
        count = 0
        for key in store.list_keys():
            for version in store.list_versions(key.key_id):
                assert store.unseal_material(key.key_id, version.version) is not None
                count += 1
        return count
    finally:
        store.close()


@pytest.fixture
def served(live_keyd: Keyd) -> Keyd:
    live_keyd.kmsfs("keys", "create", "--alias", "alias/k")
    live_keyd.kmsfs("keys", "rotate", "alias/k")  # two versions
    return live_keyd


# --------------------------------------------------------------------- backup
def test_backup_while_keyd_serves_is_one_consistent_snapshot(served: Keyd, tmp_path) -> None:
    keyd = served
    blob = seal(keyd)
    destination = tmp_path / "backup"
    out = keyd.kmsfs("keyd", "backup", str(destination), "--keystore", str(keyd.keystore))
    assert "backed up keystore" in out.stdout.decode()
    keyd.kmsfs("keys", "create", "--alias", "alias/after")  # not in the backup
    manifest = read_manifest(destination)
    assert manifest["contents"]["keys"] == 1
    assert manifest["contents"]["key_versions"] == 2
    assert manifest["contents"]["aliases"] == 1
    assert manifest["contents"]["key_policies"] == 1
    assert sorted(os.listdir(destination)) == [DB_NAME, MANIFEST_NAME]
    assert not [p for p in tmp_path.iterdir() if "partial" in p.name]
    assert (destination.stat().st_mode & 0o777) == 0o700
    assert (destination / DB_NAME).stat().st_mode & 0o077 == 0
    # sealed: the data key's plaintext and the root key are nowhere in it
    raw = (destination / DB_NAME).read_bytes()
    assert SECRET not in raw
    assert base64.b64decode(keyd.root_key.read_text().strip()) not in raw
    # keyd audited it, with where it went and the checksum
    (record,) = audit(keyd.keystore, "--event", "BackupKeystore")
    assert record["requestParameters"]["destination"] == str(destination)
    assert record["responseElements"]["databaseSha256"] == manifest["database"]["sha256"]
    assert manifest["audit_head"]["seq"] == record["seq"] - 1
    # --verify opens it with the root secret and unseals every version
    verified = keyd.kmsfs(
        "keyd", "backup", "--verify", str(destination), "--root-key-file", str(keyd.root_key)
    )
    assert "intact" in verified.stdout.decode() and "2 key versions" in verified.stdout.decode()
    assert opens(keyd, blob) == SECRET
    keyd.kmsfs("keyd", "audit", "verify", "--keystore", str(keyd.keystore))


def test_backup_refuses_an_existing_destination(served: Keyd, tmp_path) -> None:
    (tmp_path / "there").mkdir()
    result = served.kmsfs(
        "keyd", "backup", str(tmp_path / "there"), "--keystore", str(served.keystore), check=False
    )
    assert result.returncode != 0
    assert "exists; a backup goes into a new directory" in result.stderr.decode()
    assert os.listdir(tmp_path / "there") == []


def test_a_damaged_or_foreign_backup_is_refused(served: Keyd, tmp_path) -> None:
    destination = tmp_path / "b"
    served.kmsfs("keyd", "backup", str(destination), "--keystore", str(served.keystore))
    source = RootKeySource.from_key_file(served.root_key)
    # the wrong root secret
    other = tmp_path / "other.key"
    Keystore.create(tmp_path / "ks-other", RootKeySource.from_key_file(other)).close()
    with pytest.raises(WrongRootKey):
        verify_backup(destination, RootKeySource.from_key_file(other))
    # one flipped byte
    data = bytearray((destination / DB_NAME).read_bytes())
    data[len(data) // 2] ^= 0x01
    (destination / DB_NAME).write_bytes(bytes(data))
    with pytest.raises(KeystoreError, match="does not match its manifest"):
        verify_backup(destination, source)
    with pytest.raises(KeystoreError, match="does not match its manifest"):
        restore_backup(destination, tmp_path / "restored", source)
    assert not (tmp_path / "restored" / DB_NAME).exists()
    result = run_kmsfs(
        "keyd", "backup", "--verify", str(destination), "--root-key-file", str(served.root_key),
        check=False,
    )  # fmt: skip
    assert result.returncode == 5 and "damaged" in result.stderr.decode()


@needs_other_users
def test_only_root_and_keyds_user_may_back_up(shared_keyd: Keyd, tmp_path) -> None:
    os.chmod(tmp_path, 0o777)
    refused = call_as(NOBODY, shared_keyd, "BackupKeystore", Destination=str(tmp_path / "b"))
    assert refused["__type"] == "AccessDeniedException"
    assert not (tmp_path / "b").exists()


# -------------------------------------------------------------------- restore
def test_restore_into_a_new_directory_and_serve_it(served: Keyd, keyd_factory, tmp_path) -> None:
    keyd = served
    blob = seal(keyd)
    backup = tmp_path / "b"
    keyd.kmsfs("keyd", "backup", str(backup), "--keystore", str(keyd.keystore))
    # never over a live keystore (nor an existing one)
    for target in (keyd.keystore,):
        result = run_kmsfs(
            "keyd", "restore", str(backup), "--keystore", str(target),
            "--root-key-file", str(keyd.root_key), check=False,
        )  # fmt: skip
        assert result.returncode == 5
        assert "holds a live keystore" in result.stderr.decode()
    keyd.stop()
    # the keystore is lost; restore it elsewhere, with the root secret kept apart
    new = keyd_factory("restored")
    new.root_key.write_bytes(keyd.root_key.read_bytes())
    os.chmod(new.root_key, 0o600)
    out = run_kmsfs(
        "keyd", "restore", str(backup), "--keystore", str(new.keystore),
        "--root-key-file", str(new.root_key),
    )  # fmt: skip
    assert "restored keystore" in out.stdout.decode()
    first = audit(new.keystore)[0]
    assert first["eventName"] == "RestoreKeystore" and first["seq"] == 1
    assert first["additionalEventData"]["backup"] == str(backup)
    new.start()
    assert opens(new, blob) == SECRET
    with new.client() as client:
        aliases = client.call("ListAliases", {})["Aliases"]
    assert [a["AliasName"] for a in aliases] == ["alias/k"]


# --------------------------------------------------------------------- passwd
def test_passwd_switches_between_key_file_and_passphrase(served: Keyd, tmp_path) -> None:
    keyd = served
    blob = seal(keyd)
    passphrase = tmp_path / "pass"
    passphrase.write_text("correct horse battery staple\n")
    passphrase.chmod(0o600)
    # while keyd serves: keyd stores the new wrapping and audits it
    out = keyd.kmsfs(
        "keyd", "passwd", "--keystore", str(keyd.keystore), "--root-key-file",
        str(keyd.root_key), "--new-passphrase-file", str(passphrase),
    )  # fmt: skip
    assert "now opened by the new passphrase" in out.stdout.decode()
    assert opens(keyd, blob) == SECRET  # keyd never stopped
    (record,) = audit(keyd.keystore, "--event", "UpdateRootProtection")
    assert record["responseElements"] == {
        "previousProtectionKind": "key-file",
        "protectionKind": "passphrase",
    }
    assert "wrapped" not in json.dumps(record) and "salt" not in json.dumps(record)
    keyd.stop()
    with pytest.raises(WrongRootKey):
        Keystore.open(keyd.keystore, RootKeySource.from_key_file(keyd.root_key))
    assert (
        unseal_all(keyd.keystore, RootKeySource.from_passphrase(b"correct horse battery staple"))
        == 2
    )
    # offline, back to a (new) root key file; the one in use cannot be named
    same = run_kmsfs(
        "keyd", "passwd", "--keystore", str(keyd.keystore), "--passphrase-file", str(passphrase),
        "--new-root-key-file", str(passphrase), check=False,
    )  # fmt: skip
    assert same.returncode != 0
    new_key = tmp_path / "new.key"
    run_kmsfs(
        "keyd", "passwd", "--keystore", str(keyd.keystore), "--passphrase-file",
        str(passphrase), "--new-root-key-file", str(new_key),
    )  # fmt: skip
    assert new_key.stat().st_mode & 0o077 == 0
    assert unseal_all(keyd.keystore, RootKeySource.from_key_file(new_key)) == 2
    assert audit(keyd.keystore, "--event", "UpdateRootProtection")[-1]["userIdentity"]["uid"] == 0
    keyd.kmsfs("keyd", "audit", "verify", "--keystore", str(keyd.keystore))


def test_passwd_cut_before_commit_leaves_the_old_secret(
    served: Keyd, tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each cut point in-process: the new key file written but the change not
    committed (the audit record failing, the commit failing) leaves the old secret."""
    from kmsfs.kms import keystore as keystore_module
    from kmsfs.kms.service import KeyService

    keyd = served
    keyd.stop()
    old = RootKeySource.from_key_file(keyd.root_key)
    for cut in ("record", "commit"):
        new_key = tmp_path / f"{cut}.key"
        store = Keystore.open(keyd.keystore, old)
        protection = store.protection_for(RootKeySource.from_key_file(new_key))
        store.close()
        assert new_key.exists()  # the new file exists before the change commits
        with monkeypatch.context() as patch:
            if cut == "record":
                patch.setattr(KeyService, "_record", _fail_record)
            else:
                patch.setattr(keystore_module.Keystore, "set_root_protection", _fail_set)
            from kmsfs.cli.keyd_admin import local_service

            with local_service(keyd.keystore, old) as service:
                with pytest.raises(KMSError):
                    service.handle(
                        "UpdateRootProtection", {"Protection": protection},
                        _caller(), f"cut-{cut}",
                    )  # fmt: skip
        assert unseal_all(keyd.keystore, old) == 2
        with pytest.raises(WrongRootKey):
            Keystore.open(keyd.keystore, RootKeySource.from_key_file(new_key))


def _fail_record(self, event, *, durable):  # noqa: ANN001
    from kmsfs.errors import StorageUnavailableException

    raise StorageUnavailableException("audit log full (test)")


def _fail_set(self, db, text):  # noqa: ANN001
    db.execute("UPDATE meta SET value = ? WHERE name = 'root_protection'", (text,))
    raise OSError(28, "No space left on device (test)")


def _caller():
    from kmsfs.kms.caller import Caller

    return Caller(uid=0, gid=0, pid=os.getpid())


def _kill_at_random(argv: list[str], env: dict[str, str] | None, rng: random.Random, most: float):
    """Run a command and SIGKILL it after a random delay (or let it finish)."""
    process = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    delay = rng.uniform(0, most)
    try:
        process.wait(timeout=delay)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    return process.returncode


def test_passwd_killed_at_random_points_leaves_old_or_new(served: Keyd, tmp_path) -> None:
    keyd = served
    keyd.stop()
    rng = random.Random(1807)
    old = RootKeySource.from_key_file(keyd.root_key)
    outcomes = {"old": 0, "new": 0}
    for attempt in range(8):
        new_key = tmp_path / f"n{attempt}.key"
        started = time.monotonic()
        code = _kill_at_random(
            [*KMSFS, "keyd", "passwd", "--keystore", str(keyd.keystore), "--root-key-file",
             str(old.key_file), "--new-root-key-file", str(new_key)],
            None, rng, 1.5,
        )  # fmt: skip
        del started
        try:
            assert unseal_all(keyd.keystore, old) == 2
            outcomes["old"] += 1
            assert code != 0  # a finished passwd would have switched
        except WrongRootKey:
            assert unseal_all(keyd.keystore, RootKeySource.from_key_file(new_key)) == 2
            outcomes["new"] += 1
            old = RootKeySource.from_key_file(new_key)
        # a key file is whole or absent, never truncated
        if new_key.exists():
            assert len(base64.b64decode(new_key.read_text().strip())) == 32
    print("passwd kill outcomes", outcomes)
    assert sum(outcomes.values()) == 8
    run_kmsfs("keyd", "audit", "verify", "--keystore", str(keyd.keystore))


# ------------------------------------------------------------ rotate-root-key
def test_rotate_root_key_reseals_everything_and_refuses_while_served(served: Keyd) -> None:
    keyd = served
    blob = seal(keyd)
    refused = keyd.kmsfs(
        "keyd", "rotate-root-key", "--keystore", str(keyd.keystore), "--root-key-file",
        str(keyd.root_key), check=False,
    )  # fmt: skip
    assert refused.returncode != 0 and "stop it first" in refused.stderr.decode()
    keyd.stop()
    before = _sealed_rows(keyd.keystore)
    out = run_kmsfs(
        "keyd", "rotate-root-key", "--keystore", str(keyd.keystore), "--root-key-file",
        str(keyd.root_key),
    )  # fmt: skip
    assert "2 sealed records resealed" in out.stdout.decode()
    after = _sealed_rows(keyd.keystore)
    assert before.keys() == after.keys() and all(before[k] != after[k] for k in before)
    (record,) = audit(keyd.keystore, "--event", "RotateRootKey")
    assert record["responseElements"] == {"resealedRecords": 2}
    keyd.start()
    assert opens(keyd, blob) == SECRET


def _sealed_rows(keystore: Path) -> dict[tuple[str, int], bytes]:
    import sqlite3

    db = sqlite3.connect(f"file:{keystore / DB_NAME}?mode=ro", uri=True)
    try:
        rows = db.execute("SELECT key_id, version, sealed FROM key_versions").fetchall()
    finally:
        db.close()
    return {(r[0], r[1]): bytes(r[2]) for r in rows}


def test_rotate_root_key_killed_at_random_points(served: Keyd) -> None:
    keyd = served
    for _ in range(3):
        keyd.kmsfs("keys", "create")
    blob = seal(keyd)
    keyd.stop()
    rng = random.Random(42)
    source = RootKeySource.from_key_file(keyd.root_key)
    for _ in range(6):
        _kill_at_random(
            [*KMSFS, "keyd", "rotate-root-key", "--keystore", str(keyd.keystore),
             "--root-key-file", str(keyd.root_key)],
            None, rng, 2.0,
        )  # fmt: skip
        assert unseal_all(keyd.keystore, source) == 5
    keyd.start()
    assert opens(keyd, blob) == SECRET
    keyd.kmsfs("keyd", "audit", "verify", "--keystore", str(keyd.keystore))


def test_cli_help_lists_the_commands() -> None:
    text = run_kmsfs("keyd", "--help").stdout.decode()
    for name in ("backup", "restore", "passwd", "rotate-root-key"):
        assert name in text


def test_rotate_root_key_keeps_asymmetric_and_hmac_keys(live_keyd: Keyd) -> None:
    keyd = live_keyd
    message = base64.b64encode(b"signed before and after").decode()
    with keyd.client() as client:
        rsa_id = client.call("CreateKey", {"KeySpec": "RSA_2048", "KeyUsage": "SIGN_VERIFY"})[
            "KeyMetadata"
        ]["KeyId"]
        hmac_id = client.call(
            "CreateKey", {"KeySpec": "HMAC_256", "KeyUsage": "GENERATE_VERIFY_MAC"}
        )["KeyMetadata"]["KeyId"]
        public_before = client.call("GetPublicKey", {"KeyId": rsa_id})["PublicKey"]
        mac = client.call(
            "GenerateMac", {"KeyId": hmac_id, "Message": message, "MacAlgorithm": "HMAC_SHA_256"}
        )["Mac"]
    keyd.stop()
    run_kmsfs(
        "keyd", "rotate-root-key", "--keystore", str(keyd.keystore), "--root-key-file",
        str(keyd.root_key),
    )  # fmt: skip
    keyd.start()
    with keyd.client() as client:
        assert client.call("GetPublicKey", {"KeyId": rsa_id})["PublicKey"] == public_before
        signature = client.call(
            "Sign", {"KeyId": rsa_id, "Message": message, "SigningAlgorithm": "RSASSA_PSS_SHA_256"}
        )["Signature"]
        assert client.call(
            "Verify",
            {"KeyId": rsa_id, "Message": message, "Signature": signature,
             "SigningAlgorithm": "RSASSA_PSS_SHA_256"},
        )["SignatureValid"]  # fmt: skip
        assert client.call(
            "VerifyMac",
            {"KeyId": hmac_id, "Message": message, "Mac": mac, "MacAlgorithm": "HMAC_SHA_256"},
        )["MacValid"]


def test_a_bad_backup_destination_is_a_validation_error(tmp_path: Path) -> None:
    """Refused as the client's mistake (400), never an internal error of keyd."""
    from kmsfs.errors import ValidationException
    from kmsfs.kms.caller import Caller
    from kmsfs.kms.service import KeyService

    store = Keystore.create(tmp_path / "ks", RootKeySource.from_key_file(tmp_path / "rk"))
    try:
        service = KeyService(store, [])
        root = Caller(uid=0, gid=0, pid=os.getpid())
        for destination in ("relative/dir", f"{tmp_path}/a\0b", str(tmp_path / "no" / "parent")):
            with pytest.raises(ValidationException):
                service.handle("BackupKeystore", {"Destination": destination}, root, "r")
    finally:
        store.close()
