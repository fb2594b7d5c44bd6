"""Per-directory CMKs (issue 17, "Per-directory CMKs"): ``kmsfs key set|show``, the sealed
``key_bindings`` registry, names and new files' data keys under the bound CMK, EXDEV
for directory renames across a binding, offline binding of a non-empty directory (and a
kill in the middle of it), fsck and rewrap."""

from __future__ import annotations

import base64
import errno
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from kmsfs.format.header import read_header
from kmsfs.fs.bindings import binding_from_key, new_record, read_records, store_records
from kmsfs.fs.config import ConfigError, FsConfig, load_config
from kmsfs.fs.names import DIRIV_NAME, NameCipher, NameError_
from kmsfs.fs.offline import unlock_config
from kmsfs.kms.datakeys import blob_key_version
from tests.conftest import Keyd
from tests.fs.helpers import ROOT_BINDING_ENV, ROOT_BINDING_KEY, Mount, MountFactory

KEY_XATTR = "user.kmsfs.key"


@pytest.fixture
def keyd(keyd_factory: Callable[..., Keyd]) -> Keyd:
    instance = keyd_factory("bk")
    instance.init()
    instance.start()
    instance.kmsfs("keys", "create", "--alias", "alias/fs")
    instance.kmsfs("keys", "create", "--alias", "alias/team")
    return instance


@pytest.fixture
def factory(keyd: Keyd, monkeypatch: pytest.MonkeyPatch) -> Iterator[MountFactory]:
    """Mounts of cipher directories without a root binding (these tests make their own,
    whatever KMSFS_TEST_ROOT_BINDING says)."""
    monkeypatch.delenv(ROOT_BINDING_ENV, raising=False)
    with MountFactory(keyd.workdir, keyd, plaintext_names=False) as made:
        yield made


def _arn(keyd: Keyd, alias: str) -> str:
    with keyd.client() as client:
        return client.describe_key(alias)["KeyMetadata"]["Arn"]


def _header_arn(backing: Path) -> str:
    with open(backing, "rb") as file:
        return read_header(file.fileno()).active_slot.key_arn


def _fs_names(keyd: Keyd, cipher: Path) -> NameCipher:
    """The filesystem's default name cipher (kmsfs.conf's metadata key)."""
    config = load_config(cipher)
    with keyd.client() as client:
        return NameCipher(unlock_config(client, config))


def _key(keyd: Keyd, *args: str, check: bool = True) -> subprocess.CompletedProcess[bytes]:
    return keyd.kmsfs("key", *args, check=check)


def _show(keyd: Keyd, *args: str) -> dict:
    return json.loads(_key(keyd, "show", "--json", *args).stdout)


def _mount_refused(keyd: Keyd, cipher: Path, mnt: Path) -> bytes:
    """``kmsfs mount`` must fail; its stderr. (Unmounted at once if it did not.)"""
    started = keyd.kmsfs("mount", str(cipher), str(mnt), check=False)
    if started.returncode == 0:
        subprocess.run(["fusermount3", "-u", str(mnt)], check=False)
        raise AssertionError(f"{cipher} was mounted")
    return started.stderr


def _mounted_bound_dir(keyd: Keyd, factory: MountFactory) -> tuple[Mount, Path]:
    mount = factory.mount()
    bound = mount.mnt / "team"
    bound.mkdir()
    _key(keyd, "set", str(bound), "alias/team")
    return mount, bound


# -------------------------------------------------------------------- pure
def test_a_name_key_that_fails_its_commitment_fails_its_subtree() -> None:
    dir_id = bytes(range(16))
    good = os.urandom(32)
    record = new_record(
        dir_id, "arn:k", {"CiphertextBlob": b"blob", "Plaintext": good, "KeyId": "arn:k"}
    )
    assert binding_from_key(record, good).name_cipher() is not None
    other = binding_from_key(record, os.urandom(32))
    assert other.failure is not None and other.failure[0] == errno.EIO
    with pytest.raises(OSError) as raised:
        other.name_cipher()
    assert raised.value.errno == errno.EIO


def test_key_bindings_document_round_trips_and_rejects_junk() -> None:
    config = FsConfig(filesystem_id="0" * 32, key_arn="arn:fs")
    record = new_record(
        bytes(16), "arn:k", {"CiphertextBlob": b"b", "Plaintext": b"p" * 32}, migrating=True
    )
    store_records(config, {record.dir_id: record})
    assert read_records(config) == {record.dir_id: record}
    for junk in ([], {"zz": {}}, {"00" * 16: {"key_arn": "a"}}):
        config.extra["key_bindings"] = junk
        with pytest.raises(ConfigError):
            read_records(config)


# ----------------------------------------------------------------- mounted
def test_bound_directory_new_files_and_names_are_under_its_cmk(
    keyd: Keyd, factory: MountFactory
) -> None:
    mount, bound = _mounted_bound_dir(keyd, factory)
    (bound / "plan.txt").write_bytes(b"secret plan")
    (bound / "sub").mkdir()
    (bound / "sub" / "deep.txt").write_bytes(b"deeper")
    os.symlink("plan.txt", bound / "link")
    (mount.mnt / "outside.txt").write_bytes(b"public")
    team, default = _arn(keyd, "alias/team"), _arn(keyd, "alias/fs")

    assert _header_arn(mount.backing(bound / "plan.txt")) == team
    assert _header_arn(mount.backing(bound / "sub" / "deep.txt")) == team
    assert _header_arn(mount.backing(mount.mnt / "outside.txt")) == default
    assert os.readlink(bound / "link") == "plan.txt"
    assert sorted(os.listdir(bound)) == ["link", "plan.txt", "sub"]

    # the names inside do not decrypt with the filesystem's name key
    names = _fs_names(keyd, mount.cipher)
    backing_dir = mount.backing(bound)
    dir_id = (backing_dir / DIRIV_NAME.decode()).read_bytes()
    inside = [p.name for p in backing_dir.iterdir() if not p.name.startswith("kmsfs.")]
    assert len(inside) == 3
    for name in inside:
        with pytest.raises(NameError_):
            names.decrypt_name(dir_id, name.encode())
    # kmsfs.conf names no path, only the directory id
    conf = (mount.cipher / "kmsfs.conf").read_text()
    assert dir_id.hex() in conf and "team" not in conf.replace("alias/team", "")

    shown = json.loads(os.getxattr(bound / "sub" / "deep.txt", KEY_XATTR))
    assert shown == {"key_arn": team, "binding_key_arn": team, "source": "team"}
    shown = json.loads(os.getxattr(mount.mnt / "outside.txt", KEY_XATTR))
    assert shown == {"key_arn": default, "binding_key_arn": default, "source": "kmsfs.conf"}

    # after a remount (name keys unwrapped again from kmsfs.conf) all reads back
    mount.remount()
    assert (bound / "sub" / "deep.txt").read_bytes() == b"deeper"
    assert os.readlink(bound / "link") == "plan.txt"


def test_directory_rename_across_a_binding_is_exdev_file_rename_keeps_its_cmk(
    keyd: Keyd, factory: MountFactory
) -> None:
    mount, bound = _mounted_bound_dir(keyd, factory)
    team = _arn(keyd, "alias/team")
    (bound / "d").mkdir()
    (bound / "d" / "f").write_bytes(b"in d")
    (bound / "f").write_bytes(b"moving out")
    os.symlink("f", bound / "s")
    (mount.mnt / "plain").mkdir()

    for source, target in [(bound / "d", mount.mnt / "d"), (mount.mnt / "plain", bound / "p")]:
        with pytest.raises(OSError) as raised:
            os.rename(source, target)
        assert raised.value.errno == errno.EXDEV
    with pytest.raises(OSError) as raised:
        os.rename(bound / "s", mount.mnt / "s")
    assert raised.value.errno == errno.EXDEV
    os.rename(bound / "d", bound / "d2")  # within one binding: as ever
    with pytest.raises(OSError) as raised:
        os.link(bound / "s", mount.mnt / "s-link", follow_symlinks=False)
    assert raised.value.errno == errno.EXDEV
    os.link(bound / "d2" / "f", mount.mnt / "hard")  # a file keeps its data key
    assert (mount.mnt / "hard").read_bytes() == b"in d"

    os.rename(bound / "f", mount.mnt / "f")
    assert (mount.mnt / "f").read_bytes() == b"moving out"
    assert _header_arn(mount.backing(mount.mnt / "f")) == team
    shown = json.loads(os.getxattr(mount.mnt / "f", KEY_XATTR))
    assert shown["key_arn"] == team and shown["source"] == "kmsfs.conf"
    listed = _show(keyd, str(mount.mnt))
    # a hard link across a binding is listed under both its names
    assert sorted(item["path"] for item in listed["stale"]) == ["f", "hard", "team/d2/f"]
    assert {item["key_arn"] for item in listed["stale"]} == {team}
    os.unlink(mount.mnt / "hard")  # it could never agree with both bindings

    # the bound directory itself moves: its names stay under its own key
    os.rename(bound, mount.mnt / "renamed")
    assert (mount.mnt / "renamed" / "d2" / "f").read_bytes() == b"in d"
    assert _show(keyd, str(mount.mnt / "renamed" / "d2"))["source"] == "renamed"

    mount.unmount_clean()
    fsck = keyd.kmsfs("fsck", str(mount.cipher), check=False)
    assert fsck.returncode != 0
    assert b"not its directory's binding" in fsck.stdout, fsck.stdout
    keyd.kmsfs("rewrap", str(mount.cipher))
    keyd.kmsfs("fsck", str(mount.cipher))


def test_key_set_at_the_mountpoint_refuses_a_non_empty_directory(
    keyd: Keyd, factory: MountFactory
) -> None:
    mount = factory.mount()
    (mount.mnt / "full").mkdir()
    (mount.mnt / "full" / "f").write_bytes(b"x")
    result = _key(keyd, "set", str(mount.mnt / "full"), "alias/team", check=False)
    assert result.returncode == 2
    assert b"--cipherdir" in result.stderr and b"not empty" in result.stderr
    (mount.mnt / "file").write_bytes(b"x")
    result = _key(keyd, "set", str(mount.mnt / "file"), "alias/team", check=False)
    assert result.returncode == 2 and b"only a directory" in result.stderr


def test_tampered_key_bindings_are_refused_by_mount_and_fsck(
    keyd: Keyd, factory: MountFactory
) -> None:
    mount, _bound = _mounted_bound_dir(keyd, factory)
    mount.unmount_clean()
    conf_path = mount.cipher / "kmsfs.conf"
    original = conf_path.read_text()
    document = json.loads(original)
    dropped = dict(document)
    del dropped["key_bindings"]  # the binding removed: the parent's key would take over
    swapped = json.loads(original)
    entry = next(iter(swapped["key_bindings"].values()))
    entry["key_arn"] = _arn(keyd, "alias/fs")
    for tampered in (dropped, swapped):
        conf_path.write_text(json.dumps(tampered, indent=2))
        fsck = keyd.kmsfs("fsck", str(mount.cipher), check=False)
        assert fsck.returncode != 0 and b"failed authentication" in fsck.stderr, fsck.stderr
        assert b"failed authentication" in _mount_refused(keyd, mount.cipher, mount.mnt)
    conf_path.write_text(original)
    keyd.kmsfs("fsck", str(mount.cipher))


def test_refused_binding_key_fails_its_subtree_only(keyd: Keyd, factory: MountFactory) -> None:
    mount, bound = _mounted_bound_dir(keyd, factory)
    (bound / "f").write_bytes(b"x")
    (mount.mnt / "g").write_bytes(b"y")
    mount.unmount_clean()
    keyd.kmsfs("keys", "disable", "alias/team")
    mount.start()
    for attempt in (lambda: os.listdir(bound), lambda: (bound / "f").read_bytes()):
        with pytest.raises(OSError) as raised:
            attempt()
        assert raised.value.errno == errno.EACCES
    assert (mount.mnt / "g").read_bytes() == b"y"
    assert "team" in os.listdir(mount.mnt)
    mount.unmount_clean()
    fsck = keyd.kmsfs("fsck", str(mount.cipher), check=False)
    assert fsck.returncode != 0 and b"was refused" in fsck.stdout, fsck.stdout


def _errno_of_listing(path: Path) -> int:
    try:
        os.listdir(path)
    except OSError as error:
        return error.errno or 0
    return 0


def _wait_for(condition: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout:g} s: {what}"
        time.sleep(0.2)


def test_a_binding_cmk_disabled_while_mounted_fails_its_subtree_after_the_cache_time(
    keyd: Keyd, factory: MountFactory
) -> None:
    mount = factory.mount(None, None, "--key-cache-seconds", "1")
    bound = mount.mnt / "team"
    bound.mkdir()
    _key(keyd, "set", str(bound), "alias/team")
    (bound / "f").write_bytes(b"x")
    keyd.kmsfs("keys", "disable", "alias/team")
    _wait_for(lambda: _errno_of_listing(bound) == errno.EACCES, "EACCES listing")
    keyd.kmsfs("keys", "enable", "alias/team")
    _wait_for(lambda: _errno_of_listing(bound) == 0, "listing again")
    assert os.listdir(bound) == ["f"]


def test_removing_a_bound_directory_removes_its_binding(keyd: Keyd, factory: MountFactory) -> None:
    mount, bound = _mounted_bound_dir(keyd, factory)
    assert json.loads((mount.cipher / "kmsfs.conf").read_text())["key_bindings"]
    bound.rmdir()
    assert "key_bindings" not in json.loads((mount.cipher / "kmsfs.conf").read_text())
    bound.mkdir()
    assert _show(keyd, str(bound))["source"] == "kmsfs.conf"
    # replaced by a rename: the same
    _key(keyd, "set", str(bound), "alias/team")
    assert json.loads((mount.cipher / "kmsfs.conf").read_text())["key_bindings"]
    (mount.mnt / "other").mkdir()
    os.rename(mount.mnt / "other", bound)
    assert "key_bindings" not in json.loads((mount.cipher / "kmsfs.conf").read_text())
    mount.unmount_clean()
    keyd.kmsfs("fsck", str(mount.cipher))


def test_root_binding_switch_binds_every_new_cipher_root(
    keyd: Keyd, factory: MountFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(ROOT_BINDING_ENV, "1")
    mount = factory.mount()
    (mount.mnt / "f").write_bytes(b"x")
    root_key = _arn(keyd, ROOT_BINDING_KEY)
    assert _header_arn(mount.backing(mount.mnt / "f")) == root_key
    assert _show(keyd, str(mount.mnt / "f"))["source"] == "."


# ----------------------------------------------------------------- offline
def _populate(root: Path) -> None:
    (root / "a").mkdir()
    (root / "a" / "one.txt").write_bytes(b"one")
    (root / "a" / "sub").mkdir()
    (root / "a" / "sub" / ("L" * 200)).write_bytes(b"long name")
    os.symlink("../one.txt", root / "a" / "sub" / "link")
    (root / "a" / "empty").write_bytes(b"")
    (root / "b.txt").write_bytes(b"outside")


def _check_populated(root: Path, more: tuple[str, ...] = ()) -> None:
    assert (root / "a" / "one.txt").read_bytes() == b"one"
    assert (root / "a" / "sub" / ("L" * 200)).read_bytes() == b"long name"
    assert os.readlink(root / "a" / "sub" / "link") == "../one.txt"
    assert (root / "a" / "sub" / "link").read_bytes() == b"one"
    assert sorted(os.listdir(root / "a")) == sorted(["empty", "one.txt", "sub", *more])
    assert (root / "b.txt").read_bytes() == b"outside"


def test_offline_key_set_of_a_non_empty_directory_then_show_fsck_rewrap(
    keyd: Keyd, factory: MountFactory
) -> None:
    mount = factory.mount()
    _populate(mount.mnt)
    mount.unmount_clean()
    cipher = mount.cipher
    team, default = _arn(keyd, "alias/team"), _arn(keyd, "alias/fs")

    refused = _key(keyd, "set", "--cipherdir", str(cipher), "a", "alias/team", check=False)
    assert refused.returncode == 0, refused.stderr
    shown = _show(keyd, "--cipherdir", str(cipher), "a/sub")
    assert shown["binding_key_arn"] == team and shown["source"] == "a"
    assert {item["path"] for item in shown["stale"]} == {"a/sub/" + "L" * 200}
    assert _show(keyd, "--cipherdir", str(cipher), "b.txt")["source"] == "kmsfs.conf"

    fsck = keyd.kmsfs("fsck", str(cipher), check=False)
    assert fsck.returncode != 0 and fsck.stdout.count(b"not its directory's binding") == 2
    keyd.kmsfs("rewrap", str(cipher))
    keyd.kmsfs("fsck", str(cipher))
    assert _show(keyd, "--cipherdir", str(cipher), "a")["stale"] == []
    assert _show(keyd, "--cipherdir", str(cipher), "b.txt")["key_arn"] == default

    mount.start()
    _check_populated(mount.mnt)
    (mount.mnt / "a" / "sub" / "new").write_bytes(b"new")
    assert _header_arn(mount.backing(mount.mnt / "a" / "sub" / "new")) == team
    mount.unmount_clean()
    # refused while mounted
    mount.start()
    busy = _key(keyd, "set", "--cipherdir", str(cipher), "b", "alias/team", check=False)
    assert busy.returncode != 0 and b"unmounted" in busy.stderr


def test_import_and_export_follow_the_bindings(keyd: Keyd, factory: MountFactory) -> None:
    source = keyd.workdir / "source"
    source.mkdir()
    _populate(source)
    cipher = factory.init()
    _key(keyd, "set", "--cipherdir", str(cipher), "/", "alias/team")
    keyd.kmsfs("import", "--verify", str(source), str(cipher))
    team = _arn(keyd, "alias/team")
    headers = [
        _header_arn(path)
        for path in cipher.rglob("*")
        if path.is_file() and not path.is_symlink() and path.stat().st_size >= 2048
    ]
    assert len(headers) == 3 and set(headers) == {team}
    keyd.kmsfs("fsck", str(cipher))
    # a binding below the root, made offline over what was imported, then exported
    _key(keyd, "set", "--cipherdir", str(cipher), "a/sub", "alias/fs")
    out = keyd.workdir / "out"
    keyd.kmsfs("export", str(cipher), str(out))
    _check_populated(out)


def test_rewrap_moves_binding_name_keys_to_their_cmk_current_version(
    keyd: Keyd, factory: MountFactory
) -> None:
    mount, bound = _mounted_bound_dir(keyd, factory)
    (bound / "f").write_bytes(b"kept")
    mount.unmount_clean()

    def name_key_version() -> int:
        entry = next(
            iter(json.loads((mount.cipher / "kmsfs.conf").read_text())["key_bindings"].values())
        )
        named = blob_key_version(base64.b64decode(entry["name_key"]["wrapped"]))
        assert named is not None
        return named[1]

    before = name_key_version()
    keyd.kmsfs("keys", "rotate", "alias/team")
    keyd.kmsfs("rewrap", str(mount.cipher))
    assert name_key_version() == before + 1
    keyd.kmsfs("fsck", str(mount.cipher))
    mount.start()
    assert (bound / "f").read_bytes() == b"kept"


_KILL_AFTER = """
import os, signal, sys
from pathlib import Path
from kmsfs.fs.bindings_offline import bind_offline
from kmsfs.fs.keyservice import KeyServiceOptions
count = 0
def after_entry():
    global count
    count += 1
    if count == int(sys.argv[3]):
        os.kill(os.getpid(), signal.SIGKILL)
bind_offline(Path(sys.argv[1]), sys.argv[2], "alias/team",
             options=KeyServiceOptions(keyd_socket=sys.argv[4]), after_entry=after_entry)
"""


@pytest.mark.parametrize("kill_after", [1, 6, 11])  # of 11 names to move
def test_offline_key_set_killed_in_the_middle_is_finished_by_a_second_run(
    keyd: Keyd, factory: MountFactory, kill_after: int
) -> None:
    mount = factory.mount()
    _populate(mount.mnt)
    for index in range(6):
        (mount.mnt / "a" / f"more{index}").write_bytes(b"m")
    mount.unmount_clean()
    killed = subprocess.run(
        [
            sys.executable,
            "-c",
            _KILL_AFTER,
            str(mount.cipher),
            "a",
            str(kill_after),
            str(keyd.socket),
        ],
        env=keyd.env,
        capture_output=True,
    )
    assert killed.returncode == -9, killed.stderr
    # half way: the mount refuses and says what to do
    assert b"kmsfs key set again" in _mount_refused(keyd, mount.cipher, mount.mnt)
    _key(keyd, "set", "--cipherdir", str(mount.cipher), "a", "alias/team")
    fsck = keyd.kmsfs("fsck", str(mount.cipher), check=False)
    problems = [line for line in fsck.stdout.decode().splitlines() if ": " in line]
    assert problems and all("not its directory's binding" in line for line in problems), problems
    conf = json.loads((mount.cipher / "kmsfs.conf").read_text())
    assert all("migrating" not in entry for entry in conf["key_bindings"].values())
    mount.start()
    _check_populated(mount.mnt, tuple(f"more{index}" for index in range(6)))
