"""Losing the keystore and getting it back (issue 18): a backup taken while keyd
serves, the keystore destroyed, restored from the backup into a new directory — and a
mount of the cipher directory opens every file as it was."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from tests.conftest import Keyd, run_kmsfs
from tests.fs.helpers import MountFactory


def test_restore_then_mount_opens_every_file(keyd_factory: Callable[..., Keyd]) -> None:
    keyd = keyd_factory("orig")
    keyd.init()
    keyd.start()
    keyd.kmsfs("keys", "create", "--alias", "alias/fs")
    files = {f"dir{i % 3}/file{i}": os.urandom(i * 7919) for i in range(24)}
    with MountFactory(keyd.workdir, keyd) as factory:
        cipher = factory.init("cipher")
        mount = factory.mount(cipher, keyd.workdir / "mnt")
        for name, data in files.items():
            path = mount.mnt / name
            path.parent.mkdir(exist_ok=True)
            path.write_bytes(data)
    backup = keyd.workdir / "backup"
    keyd.kmsfs("keyd", "backup", str(backup), "--keystore", str(keyd.keystore))
    root_secret = keyd.root_key.read_bytes()
    keyd.stop()
    shutil.rmtree(keyd.keystore)  # the disk holding the keystore is gone

    # what the README's recovery drill says: the backup + the root secret, kept apart
    new = Keyd(keyd.workdir, keyd.workdir / "ks-new", keyd.workdir / "new-root.key", keyd.socket)
    new.root_key.write_bytes(root_secret)
    new.root_key.chmod(0o600)
    run_kmsfs(
        "keyd", "restore", str(backup), "--keystore", str(new.keystore),
        "--root-key-file", str(new.root_key),
    )  # fmt: skip
    new.start()
    try:
        with MountFactory(keyd.workdir, new) as factory:
            mount = factory.mount(cipher, keyd.workdir / "mnt2")
            for name, data in files.items():
                assert (mount.mnt / name).read_bytes() == data, name
            assert sorted(str(p.relative_to(mount.mnt)) for p in mount.mnt.rglob("file*")) == (
                sorted(files)
            )
    finally:
        new.stop()
    assert Path(new.keystore / "audit.log").exists()


def test_a_keystore_without_the_filesystems_key_is_named_as_such(
    keyd_factory: Callable[..., Keyd],
) -> None:
    """After the keystore is lost (a fresh one serves the same socket), `ls` and the
    mount say that the keystore in use does not hold this filesystem's key, naming both,
    instead of a bare NotFoundException/InvalidCiphertextException."""
    keyd = keyd_factory("lost")
    keyd.init()
    keyd.start()
    keyd.kmsfs("keys", "create", "--alias", "alias/fs")
    with MountFactory(keyd.workdir, keyd) as factory:
        cipher = factory.init("cipher")
    key_arn = json.loads((cipher / "kmsfs.conf").read_text())["key_arn"]
    keyd.stop()
    shutil.rmtree(keyd.keystore)
    keyd.init()  # a new, empty keystore behind the same socket
    keyd.start()
    listed = keyd.kmsfs("ls", str(cipher), check=False)
    assert listed.returncode == 3, listed.stderr.decode()
    message = listed.stderr.decode()
    assert "does not hold this filesystem's key" in message
    assert key_arn in message and str(keyd.socket) in message
    assert "kmsfs keyd restore" in message
    mount = run_kmsfs("mount", str(cipher), str(keyd.workdir / "mnt"), "--keyd-socket",
                      str(keyd.socket), check=False, env=keyd.env)  # fmt: skip
    assert mount.returncode != 0
    assert "does not hold this filesystem's key" in mount.stderr.decode()
    assert key_arn in mount.stderr.decode()


def test_a_deleted_key_is_named_as_deleted() -> None:
    from kmsfs.errors import NotFoundException
    from kmsfs.fs.config import FsConfig, unwrap_refused

    config = FsConfig(filesystem_id="0" * 32, key_arn="arn:aws:kms:local:000000000000:key/x")
    error = unwrap_refused(
        config, NotFoundException("Key 'arn:...' has been deleted"), "keyd at /run/k.sock"
    )
    assert isinstance(error, NotFoundException)
    assert "was deleted from the keystore of keyd at /run/k.sock" in error.message
    assert config.key_arn in error.message
