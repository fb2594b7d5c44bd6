"""Losing the keystore and getting it back (issue 18): a backup taken while keyd
serves, the keystore destroyed, restored from the backup into a new directory — and a
mount of the cipher directory opens every file as it was."""

from __future__ import annotations

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
