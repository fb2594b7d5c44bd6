"""kmsfs.conf is authenticated, and does not choose the keyd (issue 12).

Every field of a sealed kmsfs.conf changed (and its MAC, its key commitment, its wrapped
key) makes the mount and the offline tools refuse with one line; a config made before
sealing is refused until ``kmsfs seal``; a keyd socket named in kmsfs.conf is only a
hint that must pass the clients' ownership checks, and the user's own choice wins.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from kmsfs.errors import NotFoundException
from kmsfs.fs.config import load_config
from kmsfs.kms.client import KMSClient
from kmsfs.kms.paths import SOCKET_ENV, default_socket_path
from kmsfs.kms.trust import KEYD_UID_ENV
from tests.conftest import KMSFS, Keyd
from tests.fs.helpers import MountFactory, is_mounted
from tests.kms.test_client_trust import NOBODY, FakeKeyd, fake_keyd  # noqa: F401

CONF = "kmsfs.conf"


def one_error_line(result: subprocess.CompletedProcess[bytes]) -> str:
    assert result.returncode != 0, f"it succeeded: {result.stdout.decode()}"
    lines = result.stderr.decode().strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{result.stderr.decode()}"
    assert lines[0].startswith("kmsfs: error: "), lines[0]
    return lines[0]


def kmsfs(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([*KMSFS, *args], capture_output=True, env=env, timeout=120, check=False)


@pytest.fixture
def try_mount(mounts: MountFactory) -> Iterator[Callable[..., subprocess.CompletedProcess[bytes]]]:
    """Mount detached (so a mount that should have failed returns too); unmounted at the end."""
    tried: list[Path] = []

    def attempt(cipher: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
        mnt = mounts.root / f"m{uuid.uuid4().hex[:6]}"
        mnt.mkdir()
        tried.append(mnt)
        log = mounts.root / f"{mnt.name}.log"
        result = kmsfs(env, "mount", str(cipher), str(mnt), "--log-file", str(log), *args)
        result.mnt = mnt  # type: ignore[attr-defined]
        result.mounted = is_mounted(mnt)  # type: ignore[attr-defined]
        if result.mounted:  # type: ignore[attr-defined]
            result.names = os.listdir(mnt)  # type: ignore[attr-defined]
        return result

    yield attempt
    for mnt in tried:
        if is_mounted(mnt):
            subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True, timeout=60)


def read_conf(cipher: Path) -> dict[str, Any]:
    return json.loads((cipher / CONF).read_text())


def write_conf(cipher: Path, document: dict[str, Any]) -> None:
    (cipher / CONF).write_text(json.dumps(document, indent=2) + "\n")


def flip_b64(value: str) -> str:
    raw = bytearray(base64.b64decode(value))
    raw[len(raw) // 2] ^= 0x01
    return base64.b64encode(bytes(raw)).decode()


def rewrapped(keyd: Keyd, document: dict[str, Any]) -> str:
    """A new metadata key, validly wrapped by the same CMK with the same context."""
    with keyd.client() as client:
        blob = client.generate_data_key_without_plaintext(
            document["key_arn"], encryption_context=document["metadata_key"]["context"]
        )["CiphertextBlob"]
    return base64.b64encode(blob).decode()


def other_key_arn(keyd: Keyd) -> str:
    """Another enabled CMK of the same keyd, which the mounting user may use too."""
    with keyd.client() as client:
        try:
            return client.describe_key("alias/conf-other")["KeyMetadata"]["Arn"]
        except NotFoundException:
            keyd.kmsfs("keys", "create", "--alias", "alias/conf-other")
            return client.describe_key("alias/conf-other")["KeyMetadata"]["Arn"]


# each: how to change a sealed kmsfs.conf
TAMPERS: dict[str, Callable[[Keyd, dict[str, Any]], None]] = {
    "filesystem_id": lambda k, d: d.update(filesystem_id=uuid.uuid4().hex),
    "key_arn": lambda k, d: d.update(key_arn=other_key_arn(k)),
    "chunk_size": lambda k, d: d.update(chunk_size=d["chunk_size"] // 2),
    "plaintext_names": lambda k, d: d.update(plaintext_names=not d["plaintext_names"]),
    "keyd_socket": lambda k, d: d.update(keyd_socket=str(k.socket)),
    "created": lambda k, d: d.update(created="2020-01-01T00:00:00Z"),
    "extra-field": lambda k, d: d.update(surprise=True),
    "wrapped-bit": lambda k, d: d["metadata_key"].update(
        wrapped=flip_b64(d["metadata_key"]["wrapped"])
    ),
    "wrapped-rewrapped": lambda k, d: d["metadata_key"].update(wrapped=rewrapped(k, d)),
    "commitment": lambda k, d: d["metadata_key"].update(
        commitment=flip_b64(d["metadata_key"]["commitment"])
    ),
    "mac": lambda k, d: d.update(mac=flip_b64(d["mac"])),
}


@pytest.mark.parametrize("field", list(TAMPERS))
def test_a_changed_field_is_refused_by_mount_and_offline_tools(
    field: str, fs_keyd: Keyd, mounts: MountFactory, try_mount: Callable[..., Any]
) -> None:
    cipher = mounts.init(plaintext_names=False)
    document = read_conf(cipher)
    assert "mac" in document and "commitment" in document["metadata_key"]
    TAMPERS[field](fs_keyd, document)
    write_conf(cipher, document)

    line = one_error_line(kmsfs(fs_keyd.env, "ls", str(cipher)))
    assert CONF in line, line
    assert "failed authentication" in line, line
    line = one_error_line(kmsfs(fs_keyd.env, "fsck", str(cipher)))
    assert "failed authentication" in line, line
    result = try_mount(cipher, fs_keyd.env)
    assert not result.mounted, f"mounted with a changed {field}: {result.names}"
    line = one_error_line(result)
    assert "failed authentication" in line, line


def test_the_untouched_config_mounts(
    fs_keyd: Keyd, mounts: MountFactory, try_mount: Callable[..., Any]
) -> None:
    """The control for the test above: the same steps without a change succeed."""
    cipher = mounts.init(plaintext_names=False)
    write_conf(cipher, read_conf(cipher))
    assert kmsfs(fs_keyd.env, "ls", str(cipher)).returncode == 0
    result = try_mount(cipher, fs_keyd.env)
    assert result.mounted, result.stderr.decode()


def test_flipped_plaintext_names_write_no_plaintext_name(
    fs_keyd: Keyd, mounts: MountFactory, try_mount: Callable[..., Any]
) -> None:
    """The issue's case: plaintext_names flipped to true made new names go to disk in
    plaintext; now the mount refuses, so no name reaches the disk at all."""
    cipher = mounts.init(plaintext_names=False)
    document = read_conf(cipher)
    document["plaintext_names"] = True
    write_conf(cipher, document)
    result = try_mount(cipher, fs_keyd.env)
    if result.mounted:
        mnt = result.mnt
        (mnt / "secret-name.txt").write_bytes(b"x")
    assert "secret-name.txt" not in os.listdir(cipher)
    assert not result.mounted


# ------------------------------------------------------------ unsealed configs
def unseal(cipher: Path) -> None:
    """Make a config look like one made before sealing existed (version 1)."""
    document = read_conf(cipher)
    document["config_version"] = 1
    del document["mac"]
    del document["metadata_key"]["commitment"]
    write_conf(cipher, document)


def test_an_unsealed_config_is_refused_until_its_owner_seals_it(
    fs_keyd: Keyd, mounts: MountFactory, try_mount: Callable[..., Any]
) -> None:
    cipher = mounts.init(plaintext_names=False)
    unseal(cipher)
    for result in (kmsfs(fs_keyd.env, "ls", str(cipher)), try_mount(cipher, fs_keyd.env)):
        line = one_error_line(result)
        assert "not sealed" in line and f"kmsfs seal {cipher}" in line, line
        assert not getattr(result, "mounted", False)

    asked = kmsfs(fs_keyd.env, "seal", str(cipher))  # stdin is not a terminal: no
    assert "not sealed" in one_error_line(asked)
    assert "KeyArn" in asked.stdout.decode() and "encrypted" in asked.stdout.decode()
    assert read_conf(cipher)["config_version"] == 1

    sealed = kmsfs(fs_keyd.env, "seal", str(cipher), "--yes")
    assert sealed.returncode == 0, sealed.stderr.decode()
    assert read_conf(cipher)["config_version"] == 2
    again = kmsfs(fs_keyd.env, "seal", str(cipher))
    assert again.returncode == 0 and "authentic" in again.stdout.decode()
    assert kmsfs(fs_keyd.env, "ls", str(cipher)).returncode == 0
    assert try_mount(cipher, fs_keyd.env).mounted


def test_sealing_warns_about_plaintext_names_and_refuses_a_changed_key(
    fs_keyd: Keyd, mounts: MountFactory
) -> None:
    cipher = mounts.init(plaintext_names=False)
    unseal(cipher)
    document = read_conf(cipher)
    document["plaintext_names"] = True
    write_conf(cipher, document)
    shown = kmsfs(fs_keyd.env, "seal", str(cipher)).stdout.decode()
    assert "WARNING" in shown and "PLAINTEXT" in shown

    document["key_arn"] = other_key_arn(fs_keyd)
    write_conf(cipher, document)
    line = one_error_line(kmsfs(fs_keyd.env, "seal", str(cipher), "--yes"))
    assert "failed authentication" in line, line
    assert read_conf(cipher)["config_version"] == 1


# ---------------------------------------------------------- which keyd to trust
def reseal_with_hint(keyd: Keyd, cipher: Path, hint: str) -> None:
    """What the owner would have: a properly sealed config whose keyd_socket is ``hint``."""
    from kmsfs.fs.offline import unlock_config

    config = load_config(cipher)
    with KMSClient(keyd.socket) as client:
        metadata_key = unlock_config(client, config)
    config.keyd_socket = hint
    config.seal(metadata_key)
    (cipher / CONF).write_text(config.to_json())


@pytest.fixture
def no_default_keyd() -> None:
    if os.path.lexists(default_socket_path()):
        pytest.skip(f"a keyd socket exists at the default {default_socket_path()}")


def env_without_socket(keyd: Keyd) -> dict[str, str]:
    return {k: v for k, v in keyd.env.items() if k not in (SOCKET_ENV, KEYD_UID_ENV)}


def test_a_fake_keyd_named_in_kmsfs_conf_is_refused(
    fs_keyd: Keyd,
    mounts: MountFactory,
    try_mount: Callable[..., Any],
    fake_keyd: Callable[..., FakeKeyd],  # noqa: F811
    no_default_keyd: None,
) -> None:
    theirs = mounts.root / f"theirs-{uuid.uuid4().hex[:6]}"
    theirs.mkdir()
    os.chown(theirs, NOBODY, NOBODY)
    try:
        fake = fake_keyd(theirs / "keyd.sock")
        cipher = mounts.init(plaintext_names=False)
        reseal_with_hint(fs_keyd, cipher, str(theirs / "keyd.sock"))
        env = env_without_socket(fs_keyd)
        for result in (kmsfs(env, "ls", str(cipher)), try_mount(cipher, env)):
            assert not getattr(result, "mounted", False), "mounted through the fake keyd"
            line = one_error_line(result)
            assert str(theirs) in line and f"owned by uid {NOBODY}" in line, line
        assert fake.finish() == 0
    finally:
        shutil.rmtree(theirs, ignore_errors=True)


def test_the_users_keyd_wins_over_the_hint(
    fs_keyd: Keyd,
    mounts: MountFactory,
    try_mount: Callable[..., Any],
    fake_keyd: Callable[..., FakeKeyd],  # noqa: F811
) -> None:
    """With --keyd-socket or KMSFS_KEYD_SOCKET the hint is not even looked at."""
    theirs = mounts.root / f"theirs-{uuid.uuid4().hex[:6]}"
    theirs.mkdir()
    os.chown(theirs, NOBODY, NOBODY)
    try:
        fake = fake_keyd(theirs / "keyd.sock")
        cipher = mounts.init(plaintext_names=False)
        reseal_with_hint(fs_keyd, cipher, str(theirs / "keyd.sock"))
        assert kmsfs(fs_keyd.env, "ls", str(cipher)).returncode == 0
        result = try_mount(cipher, fs_keyd.env)
        assert result.mounted, result.stderr.decode()
        # one mount of a cipher directory at a time (test_fs_mount_checks.py)
        subprocess.run(["fusermount3", "-u", str(result.mnt)], check=True, timeout=60)
        option = try_mount(
            cipher, env_without_socket(fs_keyd), "--keyd-socket", str(fs_keyd.socket)
        )
        assert option.mounted, option.stderr.decode()
        assert fake.finish() == 0
    finally:
        shutil.rmtree(theirs, ignore_errors=True)


def test_a_trustworthy_hint_is_used_when_the_user_names_no_keyd(
    fs_keyd: Keyd, mounts: MountFactory, try_mount: Callable[..., Any], no_default_keyd: None
) -> None:
    cipher = mounts.root / f"c{uuid.uuid4().hex[:6]}"
    fs_keyd.kmsfs("init", str(cipher), "--key", "alias/fs", "--keyd-socket", str(fs_keyd.socket))
    env = env_without_socket(fs_keyd)
    assert kmsfs(env, "ls", str(cipher)).returncode == 0
    result = try_mount(cipher, env)
    assert result.mounted, result.stderr.decode()
