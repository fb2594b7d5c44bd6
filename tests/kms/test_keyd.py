"""keyd as users run it: the kmsfs command, a real daemon on a temporary socket."""

from __future__ import annotations

import base64
import json
import os
import signal
import stat
import subprocess
import threading
import time
from pathlib import Path

import pytest

from kmsfs.errors import (
    DisabledException,
    InvalidCiphertextException,
    KeydUnavailable,
    KMSInvalidStateException,
    NotFoundException,
)
from tests.conftest import Keyd, run_kmsfs


def _create(keyd: Keyd, alias: str | None = None) -> str:
    args = ["keys", "create", "--json", "--description", "test key"]
    if alias:
        args += ["--alias", alias]
    return json.loads(keyd.kmsfs(*args).stdout)["KeyMetadata"]["KeyId"]


def _serve_expecting_failure(keyd: Keyd) -> subprocess.CompletedProcess[bytes]:
    """``kmsfs keyd serve`` with the keyd's own keystore and key file, expected to refuse."""
    return keyd.kmsfs(*keyd.serve_args(), check=False)


def _one_error_line(result: subprocess.CompletedProcess[bytes]) -> str:
    assert result.returncode != 0
    lines = result.stderr.decode().strip().splitlines()
    assert len(lines) == 1, result.stderr.decode()
    assert "Traceback" not in lines[0]
    return lines[0]


# ------------------------------------------------------------------ the CLI
def test_cli_key_lifecycle(live_keyd: Keyd) -> None:
    keyd = live_keyd
    key_id = _create(keyd, "alias/home")
    table = keyd.kmsfs("keys", "list").stdout.decode()
    assert key_id in table and "alias/home" in table and "Enabled" in table
    listed = json.loads(keyd.kmsfs("keys", "list", "--json").stdout)
    assert [k["KeyId"] for k in listed] == [key_id]

    described = json.loads(keyd.kmsfs("keys", "describe", "alias/home", "--json").stdout)
    assert described["KeyMetadata"]["KeyId"] == key_id
    assert described["Aliases"] == ["alias/home"]

    keyd.kmsfs("keys", "disable", "alias/home")
    state = json.loads(keyd.kmsfs("keys", "describe", key_id, "--json").stdout)
    assert state["KeyMetadata"]["KeyState"] == "Disabled"
    refused = keyd.kmsfs("keys", "encrypt", "--key", "alias/home", input=b"x", check=False)
    assert "DisabledException" in _one_error_line(refused)
    assert refused.returncode == 3
    keyd.kmsfs("keys", "enable", "alias/home")

    keyd.kmsfs("keys", "rotate", "alias/home")
    keyd.kmsfs("keys", "rotation", "alias/home", "enable", "--days", "90")
    rotation = json.loads(keyd.kmsfs("keys", "rotation", "alias/home", "--json").stdout)
    assert rotation["KeyRotationEnabled"] is True
    assert rotation["RotationPeriodInDays"] == 90
    assert [r["RotationType"] for r in rotation["Rotations"]] == ["ON_DEMAND"]

    out = keyd.kmsfs("keys", "schedule-deletion", "alias/home", "--days", "7").stdout.decode()
    assert "pending deletion" in out
    state = json.loads(keyd.kmsfs("keys", "describe", key_id, "--json").stdout)
    assert state["KeyMetadata"]["KeyState"] == "PendingDeletion"
    assert state["KeyMetadata"]["PendingDeletionWindowInDays"] == 7
    keyd.kmsfs("keys", "cancel-deletion", key_id)
    state = json.loads(keyd.kmsfs("keys", "describe", key_id, "--json").stdout)
    assert state["KeyMetadata"]["KeyState"] == "Disabled"


def test_cli_encrypt_decrypt_pipes(live_keyd: Keyd) -> None:
    keyd = live_keyd
    _create(keyd, "alias/app")
    secret = b"small secret \x00\xff payload"
    blob = keyd.kmsfs(
        "keys", "encrypt", "--key", "alias/app", "--context", "app=x", input=secret
    ).stdout
    assert secret not in blob
    assert keyd.kmsfs("keys", "decrypt", "--context", "app=x", input=blob).stdout == secret
    wrong = keyd.kmsfs("keys", "decrypt", "--context", "app=y", input=blob, check=False)
    assert "InvalidCiphertextException" in _one_error_line(wrong)
    too_big = keyd.kmsfs("keys", "encrypt", "--key", "alias/app", input=b"a" * 4097, check=False)
    assert too_big.returncode == 2
    assert "4096" in _one_error_line(too_big)


def test_cli_errors_are_one_line(live_keyd: Keyd) -> None:
    keyd = live_keyd
    missing = keyd.kmsfs("keys", "describe", "alias/nope", check=False)
    assert "NotFoundException" in _one_error_line(missing)
    duplicate_alias = _create(keyd, "alias/one")
    again = keyd.kmsfs(
        "keys", "alias", "create", "alias/one", "--key", duplicate_alias, check=False
    )
    assert "AlreadyExistsException" in _one_error_line(again)
    bad_days = keyd.kmsfs("keys", "schedule-deletion", "alias/one", "--days", "3", check=False)
    assert "ValidationException" in _one_error_line(bad_days)


def test_cli_reports_unreachable_keyd(short_tmp: Path) -> None:
    env = {**os.environ, "KMSFS_KEYD_SOCKET": str(short_tmp / "none.sock")}
    result = run_kmsfs("keys", "list", env=env, check=False)
    line = _one_error_line(result)
    assert result.returncode == 4
    assert "none.sock" in line


# ----------------------------------------------------------- the wire protocol
def test_curl_lists_keys(live_keyd: Keyd) -> None:
    keyd = live_keyd
    key_id = _create(keyd)
    result = subprocess.run(
        [
            "curl",
            "-s",
            "--unix-socket",
            str(keyd.socket),
            "-H",
            "X-Amz-Target: TrentService.ListKeys",
            "-H",
            "Content-Type: application/x-amz-json-1.1",
            "-d",
            "{}",
            "http://localhost/",
        ],
        capture_output=True,
        timeout=30,
        check=True,
    )
    body = json.loads(result.stdout)
    assert body["Keys"][0]["KeyId"] == key_id
    assert body["Keys"][0]["KeyArn"].endswith(f":key/{key_id}")


def test_socket_is_private(live_keyd: Keyd) -> None:
    keyd = live_keyd
    assert stat.S_IMODE(os.stat(keyd.socket).st_mode) == 0o600


def test_every_operation_over_the_socket(live_keyd: Keyd) -> None:
    keyd = live_keyd
    with keyd.client() as client:
        key_id = client.call("CreateKey", {"Tags": [{"TagKey": "team", "TagValue": "a"}]})[
            "KeyMetadata"
        ]["KeyId"]
        other = client.call("CreateKey", {})["KeyMetadata"]["KeyId"]
        client.call("CreateAlias", {"AliasName": "alias/a", "TargetKeyId": key_id})
        context = {"kmsfs:file-id": "00ff"}
        data_key = client.generate_data_key("alias/a", encryption_context=context)
        assert len(data_key["Plaintext"]) == 32
        opened = client.decrypt(data_key["CiphertextBlob"], encryption_context=context)
        assert opened["Plaintext"] == data_key["Plaintext"]
        blob_only = client.generate_data_key_without_plaintext(key_id, encryption_context=context)
        assert "Plaintext" not in blob_only
        moved = client.re_encrypt(
            data_key["CiphertextBlob"],
            other,
            source_encryption_context=context,
            destination_encryption_context={"x": "y"},
        )
        assert (
            client.decrypt(moved["CiphertextBlob"], encryption_context={"x": "y"})["Plaintext"]
            == data_key["Plaintext"]
        )
        assert len(client.generate_random(100)["Plaintext"]) == 100
        client.call("UpdateAlias", {"AliasName": "alias/a", "TargetKeyId": other})
        assert client.describe_key("alias/a")["KeyMetadata"]["KeyId"] == other
        client.call("TagResource", {"KeyId": key_id, "Tags": [{"TagKey": "env", "TagValue": "t"}]})
        client.call("UntagResource", {"KeyId": key_id, "TagKeys": ["team"]})
        tags = client.call("ListResourceTags", {"KeyId": key_id})["Tags"]
        assert tags == [{"TagKey": "env", "TagValue": "t"}]
        client.call("DeleteAlias", {"AliasName": "alias/a"})
        assert client.call("ListAliases", {})["Aliases"] == []
        with pytest.raises(NotFoundException):
            client.describe_key("alias/a")
        client.call("DisableKey", {"KeyId": key_id})
        with pytest.raises(DisabledException):
            client.decrypt(data_key["CiphertextBlob"], encryption_context=context)
        client.call("ScheduleKeyDeletion", {"KeyId": key_id, "PendingWindowInDays": 7})
        with pytest.raises(KMSInvalidStateException):
            client.decrypt(data_key["CiphertextBlob"], encryption_context=context)
        flipped = bytearray(moved["CiphertextBlob"])
        flipped[-1] ^= 1
        with pytest.raises(InvalidCiphertextException):
            client.decrypt(bytes(flipped), encryption_context={"x": "y"})


# ----------------------------------------------------------------- lifecycle
def test_restart_keeps_keys_and_rotations(live_keyd: Keyd) -> None:
    keyd = live_keyd
    with keyd.client() as client:
        key_id = client.call("CreateKey", {})["KeyMetadata"]["KeyId"]
        client.call("CreateAlias", {"AliasName": "alias/kept", "TargetKeyId": key_id})
        blobs = []
        for _ in range(3):
            blobs.append(client.encrypt("alias/kept", b"v", encryption_context={"n": "1"}))
            client.call("RotateKeyOnDemand", {"KeyId": key_id})
    keyd.stop()
    keyd.start()
    with keyd.client() as client:
        for blob in blobs:
            assert (
                client.decrypt(blob["CiphertextBlob"], encryption_context={"n": "1"})["Plaintext"]
                == b"v"
            )
        rotations = client.call("ListKeyRotations", {"KeyId": "alias/kept"})["Rotations"]
        assert len(rotations) == 3


def test_kill_9_during_create_burst_loses_no_returned_key(live_keyd: Keyd) -> None:
    keyd = live_keyd
    created: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()

    def burst() -> None:
        with keyd.client() as client:
            while not stop.is_set():
                try:
                    key_id = client.call("CreateKey", {})["KeyMetadata"]["KeyId"]
                except (KeydUnavailable, OSError):
                    return
                with lock:
                    created.append(key_id)

    threads = [threading.Thread(target=burst) for _ in range(4)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 20
    while len(created) < 40 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert keyd.process is not None
    os.kill(keyd.process.pid, signal.SIGKILL)
    keyd.process.wait(timeout=10)
    stop.set()
    for thread in threads:
        thread.join(timeout=30)
    assert len(created) >= 40
    keyd.start()
    with keyd.client() as client:
        present = {k["KeyId"] for k in client.call("ListKeys", {"Limit": 1000})["Keys"]}
    assert set(created) <= present


def test_daemon_mode_and_stop(keyd_factory) -> None:
    keyd = keyd_factory()
    keyd.init()
    result = keyd.kmsfs(*keyd.serve_args("-d"))
    assert b"keyd running as pid" in result.stdout
    pid = int(result.stdout.split(b"pid ")[1].split()[0])
    try:
        assert keyd.kmsfs("keys", "list", "--json").stdout.strip() == b"[]"
        keyd.kmsfs("keyd", "stop", "--socket", str(keyd.socket))
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
        assert not keyd.socket.exists()
    finally:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


# ------------------------------------------------------------- the keystore
def test_passphrase_keystore_and_wrong_passphrase(keyd_factory) -> None:
    keyd = keyd_factory()
    good = keyd.workdir / "good"
    good.write_text("correct horse battery staple\n")
    bad = keyd.workdir / "bad"
    bad.write_text("wrong\n")
    good.chmod(0o600)  # readable by others is refused (tests/kms/test_permissions.py)
    bad.chmod(0o600)
    keyd.kmsfs("keyd", "init", "--keystore", str(keyd.keystore), "--passphrase-file", str(good))
    failed = keyd.kmsfs(
        *keyd.serve_args("--passphrase-file", str(bad), root_key=False), check=False
    )
    line = _one_error_line(failed)
    assert "wrong passphrase" in line
    assert failed.returncode == 5
    # The environment variable names the passphrase file too.
    keyd.start(root_key=False, env={**keyd.env, "KMSFS_PASSPHRASE_FILE": str(good)})
    with keyd.client() as client:
        assert client.call("ListKeys", {})["Keys"] == []


def test_refuses_writable_keystore(keyd_factory) -> None:
    keyd = keyd_factory()
    keyd.init()
    os.chmod(keyd.keystore, 0o777)
    result = _serve_expecting_failure(keyd)
    line = _one_error_line(result)
    assert "writable by group or others" in line


def test_root_key_file_is_private(keyd_factory) -> None:
    keyd = keyd_factory()
    keyd.init()
    assert stat.S_IMODE(os.stat(keyd.root_key).st_mode) == 0o600
    os.chmod(keyd.root_key, 0o644)
    result = _serve_expecting_failure(keyd)
    assert "chmod 600" in _one_error_line(result)


def test_no_secret_reaches_disk_or_logs(keyd_factory) -> None:
    from kmsfs.kms.keystore import Keystore, RootKeySource

    keyd = keyd_factory()
    keyd.init()
    keyd.start("--debug")
    marker = b"PLANTED-PLAINTEXT-MARKER-7f3a9c"
    secrets: list[bytes] = [marker]
    with keyd.client() as client:
        key_id = client.call("CreateKey", {})["KeyMetadata"]["KeyId"]
        client.call("RotateKeyOnDemand", {"KeyId": key_id})
        blob = client.encrypt(key_id, marker, encryption_context={"c": "d"})["CiphertextBlob"]
        assert client.decrypt(blob, encryption_context={"c": "d"})["Plaintext"] == marker
        for _ in range(5):
            data_key = client.generate_data_key(key_id)["Plaintext"]
            secrets.append(data_key)
        secrets.append(client.generate_random(32)["Plaintext"])
    keyd.stop()
    keystore = Keystore.open(keyd.keystore, RootKeySource.from_key_file(keyd.root_key))
    try:
        for version in (1, 2):
            material = keystore.unseal_material(key_id, version)
            assert material is not None
            secrets.append(material)
    finally:
        keystore.close()
    haystacks = {p: p.read_bytes() for p in keyd.workdir.rglob("*") if p.is_file()}
    haystacks = {p: data for p, data in haystacks.items() if p != keyd.root_key}
    assert any(p.name == "audit.log" for p in haystacks)
    for secret in secrets:
        needles = [secret, base64.b64encode(secret), secret.hex().encode()]
        for path, data in haystacks.items():
            for needle in needles:
                assert needle not in data, f"a secret appears in {path}"


# ---------------------------------------------------------------- audit log
def test_audit_log_records_and_verifies(live_keyd: Keyd) -> None:
    keyd = live_keyd
    key_id = _create(keyd, "alias/audited")
    keyd.kmsfs("keys", "encrypt", "--key", "alias/audited", input=b"x")
    keyd.kmsfs("keys", "describe", "alias/missing", check=False)
    keyd.stop()  # flushes the head file
    assert b"chain intact" in keyd.kmsfs("keyd", "audit", "verify").stdout
    events = [
        json.loads(line)
        for line in keyd.kmsfs("keyd", "audit", "tail", "-n", "100", "--json").stdout.splitlines()
    ]
    names = [event["eventName"] for event in events]
    assert "CreateKey" in names and "Encrypt" in names
    refused = [event for event in events if event.get("errorCode") == "NotFoundException"]
    assert refused and refused[0]["userIdentity"]["uid"] == os.getuid()
    assert refused[0]["userIdentity"]["pid"] > 0
    only_encrypt = keyd.kmsfs("keyd", "audit", "tail", "--event", "Encrypt", "--json").stdout
    assert [json.loads(line)["eventName"] for line in only_encrypt.splitlines()] == ["Encrypt"]
    by_key = keyd.kmsfs("keyd", "audit", "tail", "--key", key_id, "--json").stdout
    assert by_key.splitlines() and all(key_id in line.decode() for line in by_key.splitlines())

    log_path = keyd.keystore / "audit.log"
    lines = log_path.read_bytes().splitlines(keepends=True)
    assert len(lines) >= 4
    lines[1] = (
        lines[1].replace(b'"Encrypt"', b'"Decrypt"').replace(b'"CreateAlias"', b'"DeleteAlias"')
    )
    log_path.write_bytes(b"".join(lines))
    result = keyd.kmsfs("keyd", "audit", "verify", check=False)
    line = _one_error_line(result)
    assert result.returncode == 6
    assert "line 2" in line
