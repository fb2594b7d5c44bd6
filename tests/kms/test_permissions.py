"""A keystore, its audit files, or a passphrase file that others can read is refused,
as ssh refuses a private key other users can read; what kmsfs creates passes."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from kmsfs.errors import KeystoreInsecure
from kmsfs.kms.audit import AuditLog, rotated_files
from kmsfs.kms.keystore import (
    AUDIT_NAME,
    DB_NAME,
    Keystore,
    RootKeySource,
    check_keystore_permissions,
    read_passphrase_file,
)
from tests.conftest import Keyd, run_kmsfs
from tests.kms.test_audit import make_event


@pytest.fixture
def keystore_dir(tmp_path: Path) -> Iterator[Path]:
    """A keystore as keyd leaves it: database, audit log rotated once, head, lock."""
    old_umask = os.umask(0o022)  # the usual umask: files would be 0644 if not asked
    try:
        keystore = Keystore.create(
            tmp_path / "ks", RootKeySource.from_key_file(tmp_path / "root.key"), kdf_seconds=0
        )
        try:
            with AuditLog.open(keystore.audit_path, max_bytes=0) as log:
                log.append(make_event(1))
                log.rotate()
                log.append(make_event(2))
        finally:
            keystore.close()
    finally:
        os.umask(old_umask)
    yield tmp_path / "ks"


def test_what_kmsfs_creates_is_private(keystore_dir: Path) -> None:
    names = sorted(item.name for item in keystore_dir.iterdir())
    assert {DB_NAME, AUDIT_NAME, "audit.log.1-1", "audit.log.head", "audit.log.lock"} <= set(names)
    assert stat.S_IMODE(keystore_dir.stat().st_mode) == 0o700
    for item in keystore_dir.iterdir():
        assert stat.S_IMODE(item.lstat().st_mode) == 0o600, item.name
    check_keystore_permissions(keystore_dir)


def _targets(keystore_dir: Path) -> dict[str, Path]:
    return {
        "the keystore directory": keystore_dir,
        "keystore.db": keystore_dir / DB_NAME,
        "audit.log": keystore_dir / AUDIT_NAME,
        "a rotated audit file": rotated_files(keystore_dir / AUDIT_NAME)[0],
        "the audit head": keystore_dir / "audit.log.head",
    }


@pytest.mark.parametrize(
    "target",
    [
        "the keystore directory",
        "keystore.db",
        "audit.log",
        "a rotated audit file",
        "the audit head",
    ],
)
@pytest.mark.parametrize("bits", [0o040, 0o004, 0o044])
def test_readable_by_group_or_others_is_refused(keystore_dir: Path, target: str, bits: int) -> None:
    path = _targets(keystore_dir)[target]
    is_dir = path.is_dir()
    mode = (0o700 if is_dir else 0o600) | bits | (0o011 if is_dir and bits else 0)
    os.chmod(path, mode)
    try:
        with pytest.raises(KeystoreInsecure) as caught:
            check_keystore_permissions(keystore_dir)
    finally:
        os.chmod(path, 0o700 if is_dir else 0o600)
    message = str(caught.value)
    assert f"{path} has mode {mode:04o}" in message
    assert "readable by group or others" in message
    assert f"run 'chmod {'700' if is_dir else '600'} {path}'" in message
    check_keystore_permissions(keystore_dir)  # and fixed by that chmod


def test_keyd_refuses_a_readable_keystore_in_one_line(keyd_factory) -> None:
    keyd: Keyd = keyd_factory()
    keyd.init()
    os.chmod(keyd.keystore / DB_NAME, 0o644)
    failed = keyd.kmsfs(*keyd.serve_args(), check=False)
    lines = failed.stderr.decode().strip().splitlines()
    assert failed.returncode == 5
    assert lines[-1].startswith("kmsfs: error: refusing keystore")
    assert f"chmod 600 {keyd.keystore / DB_NAME}" in lines[-1]
    assert "Traceback" not in failed.stderr.decode()


# ------------------------------------------------------------------ passphrase file
@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660, 0o606, 0o620])
def test_a_passphrase_file_others_can_read_or_write_is_refused(tmp_path: Path, mode: int) -> None:
    secret = tmp_path / "passphrase"
    secret.write_bytes(b"correct horse battery staple\n")
    os.chmod(secret, mode)
    with pytest.raises(KeystoreInsecure) as caught:
        read_passphrase_file(secret)
    message = str(caught.value)
    assert f"passphrase file {secret} has mode {mode:04o}" in message
    assert f"run 'chmod 600 {secret}'" in message
    assert "horse" not in message


@pytest.mark.parametrize("mode", [0o600, 0o400])
def test_a_private_passphrase_file_is_read(tmp_path: Path, mode: int) -> None:
    secret = tmp_path / "passphrase"
    secret.write_bytes(b"correct horse battery staple\r\n")
    os.chmod(secret, mode)
    assert read_passphrase_file(secret) == b"correct horse battery staple"


def test_a_passphrase_from_a_pipe_is_read() -> None:
    """``--passphrase-file <(pass show kmsfs)``: a pipe has no mode to judge."""
    read_end, write_end = os.pipe()
    try:
        os.write(write_end, b"from a pipe\n")
        os.close(write_end)
        assert read_passphrase_file(f"/proc/self/fd/{read_end}") == b"from a pipe"
    finally:
        os.close(read_end)


def test_keyd_init_with_a_readable_passphrase_file_is_one_line(tmp_path: Path) -> None:
    secret = tmp_path / "passphrase"
    secret.write_bytes(b"correct horse battery staple\n")
    os.chmod(secret, 0o644)
    result = run_kmsfs(
        "keyd", "init", "--keystore", str(tmp_path / "ks"), "--passphrase-file", str(secret),
        check=False,
    )  # fmt: skip
    assert result.returncode == 5
    assert result.stderr.decode() == (
        f"kmsfs: error: passphrase file {secret} has mode 0644 and is readable by group or "
        f"others; run 'chmod 600 {secret}'\n"
    )
    assert not (tmp_path / "ks").exists()
    env = {**os.environ, "KMSFS_PASSPHRASE_FILE": str(secret)}
    result = run_kmsfs("keyd", "init", "--keystore", str(tmp_path / "ks"), env=env, check=False)
    assert result.returncode == 5 and b"chmod 600" in result.stderr
