"""Write-only ingestion through a real mount: files written with only the recipient CMK's
public key (no keyd) into a cipher directory open normally at its mountpoint."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import pytest

from tests.conftest import run_kmsfs
from tests.fs.helpers import MountFactory


def recipient_key(mounts: MountFactory, tmp: Path) -> tuple[Path, str]:
    alias = f"alias/rsa-ingest-{uuid.uuid4().hex[:8]}"
    mounts.keyd.kmsfs(
        "keys", "create", "--alias", alias, "--spec", "RSA_2048", "--usage", "ENCRYPT_DECRYPT"
    )
    pem = tmp / f"{alias.split('/')[1]}.pem"
    mounts.keyd.kmsfs("keys", "public-key", alias, "-o", str(pem))
    return pem, alias


def no_keyd_env(tmp: Path) -> dict[str, str]:
    return {**os.environ, "KMSFS_KEYD_SOCKET": str(tmp / "no-keyd.sock")}


def test_ingested_files_read_and_change_at_the_mountpoint(
    mounts: MountFactory, tmp_path: Path
) -> None:
    pem, alias = recipient_key(mounts, tmp_path)
    cipher = mounts.root / f"ingest-{uuid.uuid4().hex[:6]}"
    mounts.keyd.kmsfs(
        "init", str(cipher), "--key", "alias/fs", "--plaintext-names", "--recipient-key", alias
    )
    source = tmp_path / "src"
    source.write_bytes(os.urandom(300_000))
    run_kmsfs(
        "encrypt", "--public-key", str(pem), str(source), str(cipher / "ingested.bin"),
        env=no_keyd_env(tmp_path),
    )  # fmt: skip
    mount = mounts.mount(cipher)
    seen = mount.mnt / "ingested.bin"
    assert seen.stat().st_size == 300_000
    assert seen.read_bytes() == source.read_bytes()
    with open(seen, "ab") as appending:  # the reader may change it as any file
        appending.write(b"tail")
    assert seen.read_bytes() == source.read_bytes() + b"tail"
    (mount.mnt / "normal").write_bytes(b"made at the mountpoint")
    mount.stop()
    assert (cipher / "normal").read_bytes()[8:10] == b"\x00\x02"  # new files: version 2
    mount = mounts.mount(cipher)
    assert (mount.mnt / "ingested.bin").read_bytes() == source.read_bytes() + b"tail"


def test_a_mount_without_a_recipient_key_refuses_recipient_files(
    mounts: MountFactory, tmp_path: Path
) -> None:
    pem, alias = recipient_key(mounts, tmp_path)
    arn = alias  # an alias works as the KeyId keyd decrypts with
    cipher = mounts.init(plaintext_names=True)
    fs_id = json.loads((cipher / "kmsfs.conf").read_text())["filesystem_id"]
    source = tmp_path / "src"
    source.write_bytes(b"planted by a public-key holder")
    run_kmsfs(
        "encrypt", "--public-key", str(pem), "--key", arn, "--context", f"kmsfs:fs-id={fs_id}",
        str(source), str(tmp_path / "planted"), env=no_keyd_env(tmp_path),
    )  # fmt: skip
    (tmp_path / "planted").rename(cipher / "planted")
    mount = mounts.mount(cipher)
    with pytest.raises(OSError):
        (mount.mnt / "planted").read_bytes()
    assert "accepts none" in mount.log()
