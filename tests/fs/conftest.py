"""Fixtures for the real-mount tests (helpers in ``helpers.py``).

- ``fs_keyd`` (session): one keyd with the key ``alias/fs``, shared by the tests that
  do not stop or disturb it.
- ``session_mounts`` / ``mounts`` (session / function): :class:`MountFactory` objects
  that init cipher directories and start mounts; each unmounts what it started, at the
  end of the session / test, whether it passed or not.
- ``shared_mount`` (session): one mount of a default cipher directory (64 KiB chunks);
  tests work in their own subdirectory of it (``workdir``).
- ``fault_env`` (function): a keyd of the test's own (free to stop, disable keys) and a
  factory bound to it.

Environment switches (helpers.py): ``KMSFS_TEST_PLAINTEXT_NAMES=1`` (cipher directories
with plaintext names), ``KMSFS_TEST_AUDIT_OPENS=1`` (every mount with ``--audit-opens``),
``KMSFS_TEST_ROOT_BINDING=1`` (a per-directory CMK bound at every cipher directory's root
right after init).
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import Keyd
from tests.fs.helpers import Mount, MountFactory, mounted_paths


def _short_dir(prefix: str) -> Path:
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    path.chmod(0o755)  # other users (the allow_other tests) must reach mounts below it
    return path


def _make_keyd(workdir: Path) -> Keyd:
    keyd = Keyd(workdir, workdir / "ks", workdir / "root.key", workdir / "s.sock")
    keyd.init()
    keyd.start()
    keyd.kmsfs("keys", "create", "--alias", "alias/fs")
    return keyd


@pytest.fixture(scope="session")
def fs_root() -> Iterator[Path]:
    path = _short_dir("kfs-")
    try:
        yield path
    finally:
        leftover = [p for p in mounted_paths() if p.startswith(str(path))]
        for point in leftover:
            subprocess.run(["fusermount3", "-uz", point], capture_output=True)
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def fs_keyd(fs_root: Path) -> Iterator[Keyd]:
    workdir = fs_root / "k"
    workdir.mkdir()
    keyd = _make_keyd(workdir)
    try:
        yield keyd
    finally:
        keyd.stop()


@pytest.fixture(scope="session")
def session_mounts(fs_root: Path, fs_keyd: Keyd) -> Iterator[MountFactory]:
    with MountFactory(fs_root, fs_keyd) as factory:
        yield factory


@pytest.fixture
def mounts(fs_root: Path, fs_keyd: Keyd) -> Iterator[MountFactory]:
    """Mounts for one test (on the shared keyd); all unmounted at the test's end."""
    with MountFactory(fs_root, fs_keyd) as factory:
        yield factory


@pytest.fixture(scope="session")
def shared_mount(session_mounts: MountFactory) -> Mount:
    return session_mounts.mount(session_mounts.init("shared"), session_mounts.root / "mnt")


@pytest.fixture
def workdir(shared_mount: Mount, request: pytest.FixtureRequest) -> Iterator[Path]:
    """A fresh directory of the shared mount for one test; fails the test if the mount died."""
    assert shared_mount.alive, f"the shared mount is gone:\n{shared_mount.log()}"
    path = shared_mount.mnt / f"{request.node.name[:40]}-{uuid.uuid4().hex[:6]}"
    path.mkdir()
    yield path
    assert shared_mount.alive, f"the shared mount died during the test:\n{shared_mount.log()}"


@dataclass
class FaultEnv:
    keyd: Keyd
    mounts: MountFactory


@pytest.fixture
def fault_env(keyd_factory: Callable[..., Keyd]) -> Iterator[FaultEnv]:
    """A keyd of this test's own (free to stop or disable keys) and mounts bound to it."""
    keyd = keyd_factory("fk")
    keyd.init()
    keyd.start()
    keyd.kmsfs("keys", "create", "--alias", "alias/fs")
    with MountFactory(keyd.workdir, keyd) as factory:
        yield FaultEnv(keyd, factory)
