"""The mount suite's core again, in a cipher directory made with ``--plaintext-names``.

A plain ``pytest tests/fs`` runs every mount test with encrypted names (kmsfs's
default) and, through this module, a representative subset once more with plaintext
names: the tests of ``test_fs_ops.py`` that make, list, rename, link and remove names,
the 10,000-step random-operation test, and those of ``test_fs_deep.py`` (inode numbers
under churn, syncfs, paths near PATH_MAX; not the slow one). They are imported here so that pytest
collects them a second time under this module, where ``shared_mount`` and ``mounts``
are overridden to give plaintext-names cipher directories (``workdir`` follows
``shared_mount``). What only this mode has — ``kmsfs.conf`` as a reserved name at the
root, backing names equal to the plaintext ones — is tested below.

``KMSFS_TEST_PLAINTEXT_NAMES=1 pytest tests/fs`` runs the whole mount suite with
plaintext names instead (see ``helpers.py``).
"""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Keyd
from tests.fs.helpers import Mount, MountFactory
from tests.fs.test_fs_deep import (
    test_deeper_than_the_descriptor_cache,
    test_one_name_created_and_unlinked_thousands_of_times,
    test_paths_near_path_max,
    test_syncfs_after_unlinking_written_files,
)
from tests.fs.test_fs_ops import (
    errno_of,
    test_config_file_hidden_and_untouchable,
    test_create_write_read_and_stat_match_plaintext,
    test_hard_links,
    test_inode_numbers_stable_across_renames_and_links,
    test_long_names_through_every_operation,
    test_mkdir_exact_modes_with_umask_zero,
    test_mkfifo,
    test_name_length_limits,
    test_open_directory_removed_still_answers_fstat,
    test_open_trunc_append_excl,
    test_readdir_names_and_stats,
    test_readdir_thousand_entries,
    test_rename_directories,
    test_rename_directory_over_empty_directory,
    test_rename_exchange,
    test_rename_noreplace,
    test_rename_over_a_file_with_another_hard_link,
    test_rename_over_open_file,
    test_rename_replace,
    test_reused_backing_inode_numbers_get_new_fuse_numbers,
    test_rmdir,
    test_symlink_readlink,
    test_truncate_shrink_and_grow,
    test_unix_socket,
    test_unlink_while_open_keeps_working_until_closed,
    test_xattr_survives_rename_and_is_bound_to_its_name,
)
from tests.fs.test_fs_random_ops import test_random_operations_match_a_plain_directory

__all__ = [  # collected again here, with the fixtures below
    "test_deeper_than_the_descriptor_cache",
    "test_one_name_created_and_unlinked_thousands_of_times",
    "test_paths_near_path_max",
    "test_syncfs_after_unlinking_written_files",
    "test_config_file_hidden_and_untouchable",
    "test_create_write_read_and_stat_match_plaintext",
    "test_hard_links",
    "test_inode_numbers_stable_across_renames_and_links",
    "test_long_names_through_every_operation",
    "test_mkdir_exact_modes_with_umask_zero",
    "test_mkfifo",
    "test_name_length_limits",
    "test_open_directory_removed_still_answers_fstat",
    "test_open_trunc_append_excl",
    "test_random_operations_match_a_plain_directory",
    "test_readdir_names_and_stats",
    "test_readdir_thousand_entries",
    "test_rename_directories",
    "test_rename_directory_over_empty_directory",
    "test_rename_exchange",
    "test_rename_noreplace",
    "test_rename_over_a_file_with_another_hard_link",
    "test_rename_over_open_file",
    "test_rename_replace",
    "test_reused_backing_inode_numbers_get_new_fuse_numbers",
    "test_rmdir",
    "test_symlink_readlink",
    "test_truncate_shrink_and_grow",
    "test_unix_socket",
    "test_unlink_while_open_keeps_working_until_closed",
    "test_xattr_survives_rename_and_is_bound_to_its_name",
]


# ---------------------------------------------- the overrides that select the mode
@pytest.fixture(scope="module")
def plaintext_mounts(fs_root: Path, fs_keyd: Keyd) -> Iterator[MountFactory]:
    with MountFactory(fs_root, fs_keyd, plaintext_names=True) as factory:
        yield factory


@pytest.fixture(scope="module")
def shared_mount(plaintext_mounts: MountFactory) -> Mount:
    """This module's shared mount: a cipher directory with plaintext names."""
    return plaintext_mounts.mount(plaintext_mounts.init())


@pytest.fixture
def mounts(fs_root: Path, fs_keyd: Keyd) -> Iterator[MountFactory]:
    """Mounts for one test, of cipher directories with plaintext names."""
    with MountFactory(fs_root, fs_keyd, plaintext_names=True) as factory:
        yield factory


# ------------------------------------------------------------ this mode's own tests
def test_the_mode_is_plaintext_names(shared_mount: Mount, mounts: MountFactory) -> None:
    """The overrides really give plaintext names (else the tests above prove nothing new)."""
    for mount in (shared_mount, mounts.mount()):
        assert json.loads((mount.cipher / "kmsfs.conf").read_text())["plaintext_names"] is True
        assert not (mount.cipher / "kmsfs.diriv").exists()


def test_backing_names_and_targets_are_the_plaintext_ones(workdir: Path, shared_mount: Mount):
    names = ["ünïcødé résumé 📄", "with spaces", "-dash", "kmsfs.diriv", "x" * 255]
    for name in names:
        (workdir / name).write_bytes(b"content")
    os.mkdir(workdir / "a dir")
    os.symlink("../target ünï", workdir / "a dir" / "link")
    backing = shared_mount.backing(workdir)
    assert backing.name == workdir.name
    assert set(os.listdir(backing)) == {*names, "a dir"}
    assert os.readlink(backing / "a dir" / "link") == "../target ünï"
    assert (backing / names[0]).read_bytes() != b"content"  # the contents stay encrypted
    assert sorted(os.listdir(workdir)) == sorted([*names, "a dir"])
    assert os.readlink(workdir / "a dir" / "link") == "../target ünï"
    assert os.lstat(workdir / "a dir" / "link").st_size == len("../target ünï".encode())


def test_config_name_is_reserved_at_the_root(shared_mount: Mount, workdir: Path) -> None:
    root, config = shared_mount.mnt, shared_mount.cipher / "kmsfs.conf"
    original = config.read_bytes()
    reserved = root / "kmsfs.conf"
    (workdir / "a file").write_bytes(b"x")
    assert "kmsfs.conf" not in os.listdir(root)
    assert errno_of(os.stat, reserved) == errno.ENOENT
    assert errno_of(os.lstat, reserved) == errno.ENOENT
    assert errno_of(os.open, reserved, os.O_RDONLY) == errno.ENOENT
    assert errno_of(os.open, reserved, os.O_CREAT | os.O_WRONLY, 0o600) == errno.EPERM
    assert errno_of(os.mkdir, reserved) == errno.EPERM
    assert errno_of(os.symlink, "anything", reserved) == errno.EPERM
    assert errno_of(os.mkfifo, reserved) == errno.EPERM
    assert errno_of(os.link, workdir / "a file", reserved) == errno.EPERM
    assert errno_of(os.rename, workdir / "a file", reserved) == errno.EPERM
    assert errno_of(os.unlink, reserved) == errno.ENOENT
    assert config.read_bytes() == original
    assert (workdir / "a file").read_bytes() == b"x"
    # only at the root: elsewhere it is an ordinary name
    (workdir / "kmsfs.conf").write_bytes(b"just a file")
    os.rename(workdir / "a file", workdir / "kmsfs.conf")
    assert (workdir / "kmsfs.conf").read_bytes() == b"x"
    assert os.listdir(workdir) == ["kmsfs.conf"]
    assert config.read_bytes() == original


def test_offline_tools_with_plaintext_names(mounts: MountFactory) -> None:
    mount = mounts.mount()
    (mount.mnt / "dir with spaces").mkdir()
    (mount.mnt / "dir with spaces" / "ünï.txt").write_bytes(b"plaintext-names content\n")
    mount.unmount_clean()
    keyd = mount.keyd
    listed = json.loads(keyd.kmsfs("ls", str(mount.cipher), "-R", "--json").stdout)
    assert [(item["path"], item["backing"], item["kind"]) for item in listed] == [
        ("dir with spaces", "dir with spaces", "dir"),
        ("dir with spaces/ünï.txt", "dir with spaces/ünï.txt", "file"),
    ]
    decrypted = keyd.kmsfs(
        "decrypt", "--cipherdir", str(mount.cipher), "dir with spaces/ünï.txt", "-"
    ).stdout
    assert decrypted == b"plaintext-names content\n"
    result = keyd.kmsfs("fsck", str(mount.cipher), check=False)
    assert result.returncode == 0, result.stdout + result.stderr
