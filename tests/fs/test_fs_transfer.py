"""``kmsfs import`` / ``kmsfs export`` (issue 18, "In and out"): a tree encrypted into a
cipher directory without a mount and read back out, byte and attribute for attribute;
readable through a real mount; refusals of a non-empty target; a SIGKILL at random
points of an import leaves no partial file under a final name, and --merge resumes."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import KMSFS, Keyd
from tests.fs.helpers import MountFactory
from tests.fs.trees import SPARSE_SIZE, assert_same_tree, make_rich_tree, make_small_files


@pytest.fixture
def keyd(keyd_factory: Callable[..., Keyd]) -> Keyd:
    instance = keyd_factory("tk")
    instance.init()
    instance.start()
    instance.kmsfs("keys", "create", "--alias", "alias/fs")
    return instance


def _init(keyd: Keyd, name: str = "cipher", *extra: str) -> Path:
    cipher = keyd.workdir / name
    keyd.kmsfs("init", str(cipher), "--key", "alias/fs", *extra)
    return cipher


@pytest.mark.parametrize("names", ["encrypted", "plaintext"])
def test_import_export_round_trip_keeps_everything(keyd: Keyd, names: str) -> None:
    source = keyd.workdir / "src"
    make_rich_tree(source)
    cipher = _init(keyd, "cipher", *(["--plaintext-names"] if names == "plaintext" else []))
    result = keyd.kmsfs("import", str(source), str(cipher), "--verify")
    assert b"every entry read back" in result.stdout
    # nothing in plaintext in the cipher directory: no source name, no content
    backing_names = [p.name for p in cipher.rglob("*")]
    if names == "encrypted":
        assert not {"plain.txt", "dir", "big.bin"} & set(backing_names)
    for path in cipher.rglob("*"):
        if path.is_file() and not path.is_symlink():
            assert b"hello, world" not in path.read_bytes()
    # the sparse file is stored as the format's holes, not 64 MiB of sealed zeros
    sparse_backing = max(
        (p for p in cipher.rglob("*") if p.is_file() and not p.is_symlink()),
        key=lambda p: p.stat().st_size,
    )
    assert sparse_backing.stat().st_size > SPARSE_SIZE
    assert sparse_backing.stat().st_blocks * 512 < 1 << 20
    out = keyd.workdir / "out"
    keyd.kmsfs("export", str(cipher), str(out))
    assert_same_tree(source, out)
    assert os.stat(out / "sparse").st_blocks * 512 < 1 << 20  # exported sparse as well


def test_imported_files_read_through_a_real_mount(keyd: Keyd) -> None:
    source = keyd.workdir / "src"
    make_rich_tree(source)
    cipher = _init(keyd)
    keyd.kmsfs("import", str(source), str(cipher))
    with MountFactory(keyd.workdir, keyd) as factory:
        mount = factory.mount(cipher, keyd.workdir / "mnt")
        assert_same_tree(source, mount.mnt)
        # and the mount goes on writing into what import made
        (mount.mnt / "dir" / "new").write_bytes(b"written at the mountpoint")
        mount.unmount_clean()
    out = keyd.workdir / "out"
    keyd.kmsfs("export", str(cipher), str(out))
    assert (out / "dir" / "new").read_bytes() == b"written at the mountpoint"


def test_non_empty_targets_are_refused_without_merge(keyd: Keyd) -> None:
    source = keyd.workdir / "src"
    make_small_files(source, 5)
    cipher = _init(keyd)
    keyd.kmsfs("import", str(source), str(cipher))
    before = sorted(str(p) for p in cipher.rglob("*"))
    refused = keyd.kmsfs("import", str(source), str(cipher), check=False)
    assert refused.returncode == 2
    assert b"--merge" in refused.stderr
    assert sorted(str(p) for p in cipher.rglob("*")) == before

    out = keyd.workdir / "out"
    out.mkdir()
    (out / "precious").write_bytes(b"mine")
    refused = keyd.kmsfs("export", str(cipher), str(out), check=False)
    assert refused.returncode == 2
    assert b"--merge" in refused.stderr
    assert [p.name for p in out.iterdir()] == ["precious"]
    keyd.kmsfs("export", str(cipher), str(out), "--merge")
    assert (out / "precious").read_bytes() == b"mine"
    assert (out / "d000" / "f000003").read_bytes() == (source / "d000" / "f000003").read_bytes()


def test_import_refused_while_mounted(keyd: Keyd) -> None:
    source = keyd.workdir / "src"
    make_small_files(source, 3)
    cipher = _init(keyd)
    with MountFactory(keyd.workdir, keyd) as factory:
        factory.mount(cipher, keyd.workdir / "mnt")
        refused = keyd.kmsfs("import", str(source), str(cipher), check=False)
        assert refused.returncode == 10, refused.stderr
        assert b"unmounted" in refused.stderr


def _user_files(cipher: Path) -> int:
    return sum(1 for p in cipher.rglob("*") if p.is_file() and not p.name.startswith("kmsfs."))


def _run_killed(args: list[str], keyd: Keyd, cipher: Path, delay: float) -> int:
    """Start kmsfs; once it has put files in place (not still starting up), kill it at a
    random moment."""
    before = _user_files(cipher)
    process = subprocess.Popen(
        [*KMSFS, *args], env=keyd.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    while process.poll() is None and _user_files(cipher) == before:
        time.sleep(0.005)
    time.sleep(delay)
    process.send_signal(signal.SIGKILL)
    return process.wait(timeout=60)


def test_import_killed_at_random_points_leaves_whole_files_and_resumes(keyd: Keyd) -> None:
    source = keyd.workdir / "src"
    files = make_small_files(source, 400, per_dir=50, seed=7)
    cipher = _init(keyd)
    rng = random.Random(18)
    partial_runs = 0
    for attempt in range(8):
        first = ["--merge"] if attempt else []
        _run_killed(
            ["import", str(source), str(cipher), *first, "--workers", str(1 + attempt % 4)],
            keyd,
            cipher,
            rng.uniform(0, 0.3),
        )
        # whatever is there under a final name is whole: export it all and compare
        out = keyd.workdir / f"out{attempt}"
        keyd.kmsfs("export", str(cipher), str(out))
        exported = {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()}
        for name, data in exported.items():
            assert data == files[name], name
        if 0 < len(exported) < len(files):
            partial_runs += 1
        if len(exported) == len(files):
            break
    assert partial_runs >= 1, "no kill landed in the middle of an import"
    keyd.kmsfs("import", str(source), str(cipher), "--merge", "--verify")
    out = keyd.workdir / "final"
    keyd.kmsfs("export", str(cipher), str(out))
    assert_same_tree(source, out)


def test_export_leaves_out_what_is_not_a_kmsfs_entry(keyd: Keyd) -> None:
    source = keyd.workdir / "src"
    files = make_small_files(source, 4)
    cipher = _init(keyd)
    keyd.kmsfs("import", str(source), str(cipher))
    (cipher / "kmsfs.part.0123456789abcdef").write_bytes(b"left by an interrupted run")
    out = keyd.workdir / "out"
    result = keyd.kmsfs("export", str(cipher), str(out))
    assert b"left out (not a kmsfs entry" in result.stdout
    assert {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()} == (
        files
    )
