"""Encrypted file names (kmsfs's default) at a real mountpoint.

What lands in the cipher directory (no plaintext name or symlink target anywhere), long
names and their ``.name`` sidecars through every operation, symlink targets and sizes,
tampered backing names (left out of listings, logged, reported by ``kmsfs fsck``), large
directories, and the offline tools (``kmsfs ls``, ``kmsfs decrypt --cipherdir``).

Every cipher directory here is made with encrypted names whatever
``KMSFS_TEST_PLAINTEXT_NAMES`` says (the tests are about encrypted names). Tampering is
done while the directory is unmounted (the kernel caches dentries for a second) or in a
directory the mount has not looked at yet.

(Named ``test_fs_encrypted_names.py``: ``tests/test_fs_names.py`` holds the unit tests,
and two test modules may not share a basename in this rootdir-based layout.)
"""

from __future__ import annotations

import errno
import json
import os
import re
import secrets
import stat
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Keyd
from tests.fs.helpers import Mount, MountFactory
from tests.fs.test_fs_ciphertext import everything_stored
from tests.fs.test_fs_ops import RENAME_EXCHANGE, renameat2

LONG_PREFIX = "kmsfs.longname."
SIDECAR_SUFFIX = ".name"
DIRIV = "kmsfs.diriv"
BASE64URL = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
MAX_INLINE_NAME = 175  # bytes: AES-SIV adds 16, base64url of 191 bytes is 255 characters
LONGEST_STORABLE_TARGET = 3043  # 4/3 · (12 + target + 16) must stay ≤ 4095 bytes


# ------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def encrypted_mounts(fs_root: Path, fs_keyd: Keyd) -> Iterator[MountFactory]:
    with MountFactory(fs_root, fs_keyd, plaintext_names=False) as factory:
        yield factory


@pytest.fixture(scope="module")
def names_mount(encrypted_mounts: MountFactory) -> Mount:
    """One mount with encrypted names, shared by this module's tests (each in its own dir)."""
    return encrypted_mounts.mount(encrypted_mounts.init())


@pytest.fixture
def names_dir(names_mount: Mount, request: pytest.FixtureRequest) -> Iterator[Path]:
    assert names_mount.alive, names_mount.log()
    path = names_mount.mnt / f"{request.node.name[:30]}-{uuid.uuid4().hex[:6]}"
    path.mkdir()
    yield path
    assert names_mount.alive, f"the mount died during the test:\n{names_mount.log()}"


@pytest.fixture
def own_mounts(fs_root: Path, fs_keyd: Keyd) -> Iterator[MountFactory]:
    """Mounts with encrypted names for one test (free to unmount, tamper, remount)."""
    with MountFactory(fs_root, fs_keyd, plaintext_names=False) as factory:
        yield factory


# ------------------------------------------------------------------ helpers
def exact_name(length: int, text: str) -> str:
    """A name of exactly ``length`` UTF-8 bytes: ``text`` repeated, padded with ASCII."""
    out = ""
    while True:
        for char in text:
            if len((out + char).encode()) > length:
                return out + "x" * (length - len(out.encode()))
            out += char


def backing_names(directory: Path) -> set[str]:
    """A backing directory's entries, without its ``kmsfs.diriv``."""
    return set(os.listdir(directory)) - {DIRIV}


def unpaired_long_names(cipher: Path) -> list[str]:
    """Long-name entries without their sidecar, and sidecars without their entry."""
    problems = []
    for directory, dirnames, filenames in os.walk(cipher):
        present = set(dirnames) | set(filenames)
        for name in sorted(present):
            if not name.startswith(LONG_PREFIX):
                continue
            if name.endswith(SIDECAR_SUFFIX):
                if name[: -len(SIDECAR_SUFFIX)] not in present:
                    problems.append(f"orphaned sidecar {directory}/{name}")
            elif name + SIDECAR_SUFFIX not in present:
                problems.append(f"no sidecar for {directory}/{name}")
    return problems


def long_entries(directory: Path) -> set[str]:
    return {
        name
        for name in os.listdir(directory)
        if name.startswith(LONG_PREFIX) and not name.endswith(SIDECAR_SUFFIX)
    }


def relative_backing(mount: Mount, path: Path) -> str:
    return str(mount.backing(path).relative_to(mount.cipher))


def run_fsck(mount: Mount) -> tuple[int, list[str]]:
    result = mount.keyd.kmsfs("fsck", str(mount.cipher), check=False)
    return result.returncode, result.stdout.decode().splitlines()


def lines_about(lines: list[str], relative: str) -> list[str]:
    return [line for line in lines if line.startswith((f"{relative}:", f"{relative} ("))]


def errno_of(function, *args, **kwargs) -> int:
    with pytest.raises(OSError) as caught:
        function(*args, **kwargs)
    return caught.value.errno


def warned_about(mount: Mount, backing_name: str) -> bool:
    return any(
        backing_name in line and "left out of the listing" in line
        for line in mount.log().splitlines()
    )


# ------------------------------------------------------------ no plaintext leaks
def test_no_plaintext_name_or_target_in_cipher_directory(own_mounts: MountFactory) -> None:
    mount = own_mounts.mount(own_mounts.init())
    root = mount.mnt
    token = secrets.token_hex(4)
    short = [
        f"plan-{token}",
        f"with spaces {token}.txt",
        f"ünïcødé résumé 📄 {token}",
        f"..dots..{token}..",
        f".hidden-{token}",
        f"-leading-dash-{token}",
        f"--{token}",
        f"archive.{token}.tar.gz",
    ]
    long = [
        exact_name(MAX_INLINE_NAME, f"inline-longest {token} "),
        exact_name(176, f"first-sidecar {token} "),
        exact_name(200, f"Zweihundert Bytes {token} "),
        exact_name(255, f"ascii-limit-{token}-"),
        exact_name(255, f"Ünïcødé {token} résumé 📄 "),
    ]
    renamed_from = [f"before rename {token}", exact_name(230, f"long before rename {token} ")]
    renamed_to = [f"after rename ünï {token}", exact_name(240, f"long after rename {token} ")]
    dir_names = [f"dir with spaces {token}", exact_name(255, f"Verzeichnis 📁 {token} ")]
    link_names = [
        f"symlink ünï {token}",
        exact_name(250, f"long symlink name {token} "),
        f"-absolute link {token}",
        f"very long target link {token}",
    ]
    hard_link_names = [f"hard link {token}", exact_name(210, f"long hard link {token} ")]
    targets = [
        f"target-{token}",
        f"../relative target/ünïcødé {token}",
        f"/absolute/{token}/" + exact_name(200, f"target component {token} "),
        exact_name(LONGEST_STORABLE_TARGET, f"very long target {token} /"),
    ]
    planted = short + long + renamed_from + renamed_to + dir_names + link_names + hard_link_names

    for name in short + long:
        (root / name).write_bytes(b"plain content")
    for directory in dir_names:
        os.mkdir(root / directory)
        for name in short[:3] + long[-2:]:
            (root / directory / name).write_bytes(b"inside")
    os.mkfifo(root / dir_names[0] / f"fifo {token}")
    planted.append(f"fifo {token}")
    for link, target in zip(link_names, targets, strict=True):
        os.symlink(target, root / link)
    for index, name in enumerate(hard_link_names):
        os.link(root / long[index], root / dir_names[1] / name)
    for old, new in zip(renamed_from, renamed_to, strict=True):
        (root / dir_names[0] / old).write_bytes(b"renamed")
        os.rename(root / dir_names[0] / old, root / dir_names[1] / new)  # across directories
    mount.unmount_clean()

    stored = everything_stored(mount.cipher)
    kinds = " ".join(where for where, _ in stored)
    assert f"content of {mount.cipher}/kmsfs.conf" in kinds
    assert f"{DIRIV}" in kinds and f"{SIDECAR_SUFFIX}" in kinds and "target of" in kinds

    def leaks(found: list[tuple[str, bytes]]) -> list[str]:
        # every planted name and target whole, and the random token each of them holds
        probes = {name.encode() for name in planted + targets} | {token.encode()}
        # every 8-byte window of the long names and targets: any longer substring holds one
        windows = {
            text.encode()[start : start + 8]
            for text in long + renamed_from + renamed_to + dir_names + targets
            for start in range(len(text.encode()) - 7)
        }
        out = []
        for where, data in found:
            if any(probe in data for probe in probes):
                out.append(f"{where}: a whole planted name or target")
            elif any(data[start : start + 8] in windows for start in range(len(data) - 7)):
                out.append(f"{where}: part of a long planted name or target")
        return out

    assert leaks(stored) == []
    # the scan can fail: a plaintext name dropped into the cipher directory is found
    (mount.cipher / long[2][:100]).write_bytes(b"")
    assert leaks(everything_stored(mount.cipher)) != []
    os.unlink(mount.cipher / long[2][:100])

    mount.start()  # and it all reads back under the plaintext names
    assert set(os.listdir(root)) == set(short + long + dir_names + link_names)
    assert set(os.listdir(root / dir_names[1])) == set(
        short[:3] + long[-2:] + hard_link_names + renamed_to
    )
    assert (root / dir_names[1] / renamed_to[1]).read_bytes() == b"renamed"
    assert (root / dir_names[1] / hard_link_names[1]).read_bytes() == b"plain content"
    assert [os.readlink(root / link) for link in link_names] == targets


# ------------------------------------------------------------------ symlinks
SYMLINK_LENGTHS = [1, 2, 3, 4, 5, 17, 100, 255, 256, 1000, 2047, LONGEST_STORABLE_TARGET]


def test_readlink_and_size_are_the_plaintext_targets(own_mounts: MountFactory) -> None:
    mount = own_mounts.mount(own_mounts.init())
    targets = {}
    for length in SYMLINK_LENGTHS:
        target = exact_name(length, "target/ünï 📄/")
        targets[f"link-{length}"] = target
        os.symlink(target, mount.mnt / f"link-{length}")
        assert os.readlink(mount.mnt / f"link-{length}") == target
        assert os.lstat(mount.mnt / f"link-{length}").st_size == len(target.encode()), length
    # what the backing filesystem stores is longer, and not the target
    stored = os.readlink(mount.backing(mount.mnt / "link-100"))
    assert len(stored) > 100 and "ünï" not in stored
    mount.remount()  # nothing cached: sizes come from the stored length alone
    for name, target in targets.items():
        assert os.lstat(mount.mnt / name).st_size == len(target.encode()), name
        assert os.readlink(mount.mnt / name) == target
    with os.scandir(mount.mnt) as entries:
        sizes = {entry.name: entry.stat(follow_symlinks=False).st_size for entry in entries}
    assert sizes == {name: len(target.encode()) for name, target in targets.items()}
    listed = subprocess.run(
        ["ls", "-l", "--time-style=+", str(mount.mnt)], capture_output=True, text=True, check=True
    ).stdout
    assert "-> t " in listed or "-> t\n" in listed  # the one-byte target


def test_symlink_target_too_long_fails_cleanly(names_dir: Path, names_mount: Mount) -> None:
    target = "t" * (LONGEST_STORABLE_TARGET + 1)
    assert errno_of(os.symlink, target, names_dir / "short") == errno.ENAMETOOLONG
    assert os.listdir(names_dir) == []
    assert backing_names(names_mount.backing(names_dir)) == set()


def test_failed_symlink_with_long_name_leaves_no_sidecar(
    names_dir: Path, names_mount: Mount
) -> None:
    name = exact_name(255, "long symlink name ")
    assert errno_of(os.symlink, "t" * 4000, names_dir / name) == errno.ENAMETOOLONG
    assert os.listdir(names_dir) == []
    assert backing_names(names_mount.backing(names_dir)) == set()


# ------------------------------------------------------------------ long names
LONG_NAMES = {
    "176": exact_name(176, "one-seven-six "),
    "200": exact_name(200, "two hundred "),
    "255": exact_name(255, "ascii two-five-five "),
    "255-utf8": exact_name(255, "Ünïcødé résumé 📄 "),
    "255-emoji": "📄" * 63 + "abc",
}


def test_long_name_lengths_are_what_they_claim() -> None:
    assert [len(name.encode()) for name in LONG_NAMES.values()] == [176, 200, 255, 255, 255]
    assert len(exact_name(255, "Ünïcødé résumé 📄 ")) < 255  # really multi-byte


def test_long_names_round_trip(own_mounts: MountFactory) -> None:
    mount = own_mounts.mount(own_mounts.init())
    root = mount.mnt
    inline = exact_name(MAX_INLINE_NAME, "inline ")
    names = list(LONG_NAMES.values())
    a, b, c, d, e = names

    # create, write, read; the longest inline name needs no sidecar, 176 bytes does
    for index, name in enumerate([inline, *names]):
        (root / name).write_bytes(f"content {index}".encode())
    for index, name in enumerate([inline, *names]):
        assert (root / name).read_bytes() == f"content {index}".encode()
    assert set(os.listdir(root)) == {inline, *names}
    assert len(long_entries(mount.cipher)) == 5
    assert len(mount.backing(root / inline).name) == 255
    assert not mount.backing(root / inline).name.startswith(LONG_PREFIX)
    assert all(mount.backing(root / name).name.startswith(LONG_PREFIX) for name in names)
    sidecar = mount.backing(root / a).with_name(mount.backing(root / a).name + SIDECAR_SUFFIX)
    assert sidecar.exists() and LONG_PREFIX not in sidecar.read_text()
    assert unpaired_long_names(mount.cipher) == []

    # long-named directories, nested
    long_dir, nested_dir = exact_name(255, "directory ünï "), exact_name(180, "nested dir ")
    deep_file = exact_name(230, "deep file ")
    os.mkdir(root / long_dir)
    os.mkdir(root / long_dir / nested_dir)
    (root / long_dir / nested_dir / deep_file).write_bytes(b"deep")
    assert os.listdir(root / long_dir) == [nested_dir]
    assert (root / long_dir / nested_dir / deep_file).read_bytes() == b"deep"

    # renames: long→long, long→short, short→long and across directories, over a long name
    renamed, again, across = (
        exact_name(254, "renamed long "),
        exact_name(199, "long again "),
        exact_name(255, "across ünï "),
    )
    os.rename(root / a, root / renamed)
    os.rename(root / b, root / "short now")
    os.rename(root / "short now", root / long_dir / again)
    os.rename(root / inline, root / long_dir / nested_dir / across)
    os.rename(root / long_dir / again, root / long_dir / nested_dir / deep_file)
    assert (root / long_dir / nested_dir / deep_file).read_bytes() == b"content 2"
    assert (root / long_dir / nested_dir / across).read_bytes() == b"content 0"
    assert sorted(os.listdir(root / long_dir / nested_dir)) == sorted([deep_file, across])
    assert sorted(os.listdir(root)) == sorted([renamed, c, d, e, long_dir])
    assert unpaired_long_names(mount.cipher) == []
    # a long-named directory renamed into another long-named directory
    second_dir, moved_dir = exact_name(180, "second dir "), exact_name(201, "moved dir ")
    os.mkdir(root / second_dir)
    os.rename(root / long_dir / nested_dir, root / second_dir / moved_dir)
    moved = root / second_dir / moved_dir
    assert (moved / deep_file).read_bytes() == b"content 2"
    assert os.listdir(root / long_dir) == []
    assert unpaired_long_names(mount.cipher) == []

    # rename exchange of two long names keeps each name's sidecar
    renameat2(root / renamed, root / e, RENAME_EXCHANGE)
    assert (root / e).read_bytes() == b"content 1"
    assert (root / renamed).read_bytes() == b"content 5"
    assert unpaired_long_names(mount.cipher) == []

    # hard links between long names, in two directories
    linked, second_link = exact_name(222, "hard link "), exact_name(176, "second link ")
    os.link(root / e, moved / linked)
    os.link(root / e, root / second_link)
    assert os.stat(root / e).st_nlink == 3
    os.unlink(root / e)
    assert (moved / linked).read_bytes() == b"content 1"
    assert os.stat(root / second_link).st_nlink == 2
    assert unpaired_long_names(mount.cipher) == []
    assert sorted(os.listdir(moved)) == sorted([deep_file, across, linked])

    # a 256-byte name is refused by every operation that makes a name
    for too_long in ("n" * 256, "é" * 128, "📄" * 64):
        path = root / too_long
        assert errno_of(os.open, path, os.O_CREAT | os.O_WRONLY) == errno.ENAMETOOLONG
        assert errno_of(os.mkdir, path) == errno.ENAMETOOLONG
        assert errno_of(os.symlink, "x", path) == errno.ENAMETOOLONG
        assert errno_of(os.link, root / c, path) == errno.ENAMETOOLONG
        assert errno_of(os.rename, root / c, path) == errno.ENAMETOOLONG
        assert errno_of(os.stat, path) == errno.ENAMETOOLONG
    assert unpaired_long_names(mount.cipher) == []

    # survives a remount, and fsck finds nothing wrong
    expected = {
        path.relative_to(root): path.read_bytes() if path.is_file() else None
        for path in sorted(root.rglob("*"))
    }
    mount.remount()
    again = {
        path.relative_to(root): path.read_bytes() if path.is_file() else None
        for path in sorted(root.rglob("*"))
    }
    assert again == expected
    code, lines = run_fsck(mount)
    assert code == 0, lines

    # unlink and rmdir everything: only the directory ids are left behind
    for path in sorted(root.rglob("*"), key=lambda p: -len(p.parts)):
        if path.is_dir():
            os.rmdir(path)
        else:
            os.unlink(path)
    assert os.listdir(root) == []
    assert backing_names(mount.cipher) == {"kmsfs.conf"}


def test_long_names_failed_operations_keep_sidecars_paired(
    names_dir: Path, names_mount: Mount
) -> None:
    long_dir, other_dir = exact_name(255, "full dir "), exact_name(230, "other dir ")
    os.mkdir(names_dir / long_dir)
    (names_dir / long_dir / "inside").write_bytes(b"x")
    os.mkdir(names_dir / other_dir)
    assert errno_of(os.mkdir, names_dir / long_dir) == errno.EEXIST
    assert errno_of(os.rename, names_dir / other_dir, names_dir / long_dir) in (
        errno.ENOTEMPTY,
        errno.EEXIST,
    )
    assert errno_of(os.rmdir, names_dir / long_dir) == errno.ENOTEMPTY
    backing = names_mount.backing(names_dir)
    assert len(long_entries(backing)) == 2
    assert unpaired_long_names(backing) == []
    assert sorted(os.listdir(names_dir)) == sorted([long_dir, other_dir])


# ------------------------------------------------------------------ tampering
def test_tampered_backing_names_are_left_out_logged_and_reported(
    own_mounts: MountFactory,
) -> None:
    mount = own_mounts.mount(own_mounts.init())
    root = mount.mnt
    good = ["good one", exact_name(190, "good long ")]
    cases = [
        *("stray", "garbage", "onechar", "src", "dst", "left", "right", "longmoved"),
        *("longswap", "nosidecar", "truncated", "orphan", "idswap1", "idswap2", "noid"),
        "badlink",
    ]
    victims = {
        "garbage": ["victim"],
        "onechar": ["victim ünï"],
        "src": ["wanderer"],
        "left": ["a-file"],
        "right": ["b-file"],
        "longmoved": [exact_name(240, "long wanderer ")],
        "longswap": [exact_name(200, "long A "), exact_name(201, "long B ")],
        "nosidecar": [exact_name(210, "long C ")],
        "truncated": ["cut four", "cut short"],
        "orphan": [exact_name(220, "long D ")],
    }
    for case in cases:
        os.mkdir(root / case)
        for name in good:
            (root / case / name).write_bytes(b"good")
        for name in victims.get(case, []):
            (root / case / name).write_bytes(b"victim")
    os.symlink("the real target", root / "badlink" / "link")
    backing = {case: mount.backing(root / case) for case in cases}
    backing_name = {
        (case, name): mount.backing(root / case / name).name
        for case in cases
        for name in good + victims.get(case, [])
    }
    link = mount.backing(root / "badlink" / "link")
    code, lines = run_fsck(mount)
    assert code == 0 and lines[-1].endswith("no problems found"), lines
    mount.unmount_clean()

    expected: dict[str, set[str] | None] = {case: set(good) for case in cases}
    problems: list[Path] = []  # backing entries that fsck must report, one line each
    warned: list[str] = []  # backing names the mount must log when it lists them

    def tampered(case: str, name: str, *, warn: bool = True) -> None:
        problems.append(backing[case] / name)
        if warn:
            warned.append(name)

    def victim(case: str, index: int = 0) -> str:
        return backing_name[(case, victims[case][index])]

    # a stray file; one named like a valid encoded name; one too short to be one
    for stray in ("stray-file.txt", "A" * 40, "AAAA"):
        (backing["stray"] / stray).write_bytes(b"dropped in")
        tampered("stray", stray)
    # an entry renamed to garbage
    os.rename(backing["garbage"] / victim("garbage"), backing["garbage"] / "garbage-name")
    tampered("garbage", "garbage-name")
    # one character changed in the middle of an encoded name
    name = victim("onechar")
    middle = len(name) // 2
    changed = (
        name[:middle] + BASE64URL[(BASE64URL.index(name[middle]) + 1) % 64] + name[middle + 1 :]
    )
    os.rename(backing["onechar"] / name, backing["onechar"] / changed)
    tampered("onechar", changed)
    # moved into another directory; two entries swapped between directories
    os.rename(backing["src"] / victim("src"), backing["dst"] / victim("src"))
    tampered("dst", victim("src"))
    os.rename(backing["left"] / victim("left"), backing["right"] / victim("left"))
    os.rename(backing["right"] / victim("right"), backing["left"] / victim("right"))
    tampered("right", victim("left"))
    tampered("left", victim("right"))
    # a long name moved, sidecar and all, into another directory
    for suffix in ("", SIDECAR_SUFFIX):
        moved = victim("longmoved") + suffix
        os.rename(backing["longmoved"] / moved, backing["dst"] / moved)
    tampered("dst", victim("longmoved"))
    # two long names' sidecars swapped
    sidecar_a = backing["longswap"] / (victim("longswap", 0) + SIDECAR_SUFFIX)
    sidecar_b = backing["longswap"] / (victim("longswap", 1) + SIDECAR_SUFFIX)
    content_a, content_b = sidecar_a.read_bytes(), sidecar_b.read_bytes()
    os.chmod(sidecar_a, 0o644)
    os.chmod(sidecar_b, 0o644)
    sidecar_a.write_bytes(content_b)
    sidecar_b.write_bytes(content_a)
    tampered("longswap", victim("longswap", 0))
    tampered("longswap", victim("longswap", 1))
    # a sidecar deleted
    os.unlink(backing["nosidecar"] / (victim("nosidecar") + SIDECAR_SUFFIX))
    tampered("nosidecar", victim("nosidecar"))
    # truncated encoded names: by four characters (still valid base64url), to twelve
    for index, cut in enumerate((victim("truncated", 0)[:-4], victim("truncated", 1)[:12])):
        os.rename(backing["truncated"] / victim("truncated", index), backing["truncated"] / cut)
        tampered("truncated", cut)
    # a long name's entry deleted, its sidecar left behind (fsck only: nothing to list)
    os.unlink(backing["orphan"] / victim("orphan"))
    tampered("orphan", victim("orphan") + SIDECAR_SUFFIX, warn=False)
    # two directories' ids swapped: nothing in either decrypts any more
    id_one, id_two = backing["idswap1"] / DIRIV, backing["idswap2"] / DIRIV
    os.rename(id_one, mount.cipher / "saved-id")
    os.rename(id_two, id_one)
    os.rename(mount.cipher / "saved-id", id_two)
    for case in ("idswap1", "idswap2"):
        expected[case] = set()
        for name in good:
            tampered(case, backing_name[(case, name)])
    # a directory id deleted: the directory cannot be listed at all
    os.unlink(backing["noid"] / DIRIV)
    expected["noid"] = None
    problems.append(backing["noid"])
    # a symlink's stored target with one character changed: listed, but readlink fails
    stored = os.readlink(link)
    os.unlink(link)
    os.symlink(stored[:10] + ("B" if stored[10] != "B" else "C") + stored[11:], link)
    expected["badlink"] = {*good, "link"}
    problems.append(link)

    mount.start()
    for case in cases:
        if expected[case] is None:
            assert errno_of(os.listdir, root / case) == errno.EIO
            continue
        with os.scandir(root / case) as entries:  # every listed entry has attributes too
            listed = {entry.name: entry.stat(follow_symlinks=False) for entry in entries}
        assert set(listed) == expected[case], case
        if good[0] in expected[case]:
            assert (root / case / good[0]).read_bytes() == b"good"
    assert errno_of(os.readlink, root / "badlink" / "link") == errno.EIO
    assert mount.alive
    for name in warned:
        assert warned_about(mount, name), f"no warning about {name}:\n{mount.log()}"
    assert f"{backing['noid']}: directory has no {DIRIV}" in mount.log()
    # the names left out can be used again
    (root / "dst" / "wanderer").write_bytes(b"a new file of that name")
    assert set(os.listdir(root / "dst")) == {*good, "wanderer"}
    os.unlink(root / "dst" / "wanderer")

    # a stray dropped while mounted, into a directory already listed
    (backing["garbage"] / "live-stray").write_bytes(b"x")
    tampered("garbage", "live-stray")
    assert set(os.listdir(root / "garbage")) == set(good)
    assert warned_about(mount, "live-stray")
    assert mount.alive

    code, lines = run_fsck(mount)
    assert code == 7, lines
    for path in problems:
        relative = str(path.relative_to(mount.cipher))
        assert len(lines_about(lines, relative)) == 1, (relative, lines)
    assert len(lines) == len(problems), lines


def test_unknown_kmsfs_file_is_left_out_and_reported(names_dir: Path, names_mount: Mount) -> None:
    (names_dir / "good").write_bytes(b"good")
    backing = names_mount.backing(names_dir)
    (backing / "kmsfs.stray").write_bytes(b"not one of ours")
    assert os.listdir(names_dir) == ["good"]
    code, lines = run_fsck(names_mount)
    relative = str((backing / "kmsfs.stray").relative_to(names_mount.cipher))
    assert code == 7 and len(lines_about(lines, relative)) == 1, lines


def test_unknown_kmsfs_file_is_logged(names_dir: Path, names_mount: Mount) -> None:
    (names_dir / "good").write_bytes(b"good")
    stray = f"kmsfs.stray-{uuid.uuid4().hex[:6]}"
    (names_mount.backing(names_dir) / stray).write_bytes(b"not one of ours")
    assert os.listdir(names_dir) == ["good"]
    assert warned_about(names_mount, stray), names_mount.log()


def non_canonical_spellings(encoded: str) -> list[str]:
    """Other spellings Python's lenient base64 decoder reads as the same bytes."""
    spellings = [encoded[:4] + "...." + encoded[4:]]  # characters outside the alphabet
    if len(encoded) % 4:  # the last character's unused low bits
        unused = 2 if len(encoded) % 4 == 3 else 4
        last = BASE64URL.index(encoded[-1])
        spellings.append(encoded[:-1] + BASE64URL[last ^ ((1 << unused) - 1)])
    if "-" in encoded:  # standard-alphabet '+' for url-safe '-'
        spellings.append(encoded.replace("-", "+", 1))
    return spellings


def test_non_canonical_encodings_are_strays(names_dir: Path, names_mount: Mount) -> None:
    victim = names_dir / "victim"  # 6 + 16 bytes: 30 characters, 4 unused bits at the end
    victim.write_bytes(b"victim")
    backing = names_mount.backing(victim)
    spellings = non_canonical_spellings(backing.name)
    for spelling in spellings:
        os.link(backing, backing.with_name(spelling))
    listed = os.listdir(names_dir)
    assert listed == ["victim"], f"{listed} from backing {sorted(os.listdir(backing.parent))}"
    code, lines = run_fsck(names_mount)
    for spelling in spellings:
        relative = str(backing.with_name(spelling).relative_to(names_mount.cipher))
        assert len(lines_about(lines, relative)) == 1, (relative, lines)


# ------------------------------------------------------------------ large directories
def test_readdir_of_ten_thousand_entries(own_mounts: MountFactory) -> None:
    mount = own_mounts.mount(own_mounts.init())
    big = mount.mnt / "big directory"
    big.mkdir()
    names = [f"entry {index:05d} ünï" for index in range(10_000)]
    names[::100] = [exact_name(200, f"long entry {index:05d} ") for index in range(0, 10_000, 100)]
    started = time.monotonic()
    for name in names:
        os.mknod(big / name, stat.S_IFREG | 0o644)
    created = time.monotonic() - started
    assert len(os.listdir(mount.backing(big))) == 10_000 + 100 + 1  # sidecars, diriv
    mount.remount()  # the first listing decrypts every name
    started = time.monotonic()
    first = os.listdir(big)
    first_time = time.monotonic() - started
    started = time.monotonic()
    second = os.listdir(big)
    second_time = time.monotonic() - started
    assert sorted(first) == sorted(second) == sorted(names)
    started = time.monotonic()
    listed = subprocess.run(
        ["ls", "-l", str(big)], capture_output=True, text=True, check=True, timeout=120
    )
    ls_time = time.monotonic() - started
    lines = listed.stdout.splitlines()
    assert lines[0].startswith("total") and len(lines) == 10_001
    assert all(line.startswith("-rw-r--r--") for line in lines[1:])
    assert listed.stderr == ""
    print(
        f"\n10,000 entries: created in {created:.2f} s; listing after remount "
        f"{first_time * 1000:.0f} ms, again {second_time * 1000:.0f} ms "
        f"({first_time / max(second_time, 1e-9):.1f}×); ls -l {ls_time * 1000:.0f} ms"
    )


# ------------------------------------------------------------------ offline tools
def test_kmsfs_ls_and_decrypt_show_the_mounts_names(own_mounts: MountFactory) -> None:
    mount = own_mounts.mount(own_mounts.init())
    root = mount.mnt
    spaced = root / "dir with spaces"
    spaced.mkdir()
    (spaced / "ünï.txt").write_bytes(b"found by its plaintext path\n")
    (spaced / exact_name(255, "long résumé 📄 ")).write_bytes(b"long")
    os.mkdir(spaced / "sub dir")
    (spaced / "sub dir" / "-dash.txt").write_bytes(b"deeper")
    os.symlink("ünï.txt", spaced / "link to ünï")
    os.mkfifo(root / "a fifo")
    (root / ".hidden").write_bytes(b"")

    view = {}
    for path in root.rglob("*"):
        mode = os.lstat(path).st_mode
        kind = {stat.S_IFREG: "file", stat.S_IFDIR: "dir", stat.S_IFLNK: "symlink"}.get(
            stat.S_IFMT(mode), "fifo" if stat.S_ISFIFO(mode) else "other"
        )
        view[str(path.relative_to(root))] = (kind, relative_backing(mount, path))

    keyd = mount.keyd
    listed = json.loads(keyd.kmsfs("ls", str(mount.cipher), "-R", "--json").stdout)
    assert {item["path"]: (item["kind"], item["backing"]) for item in listed} == view
    table = keyd.kmsfs("ls", str(mount.cipher), "dir with spaces").stdout.decode()
    for name in ("ünï.txt", "sub dir", "link to ünï", exact_name(255, "long résumé 📄 ")):
        assert f"dir with spaces/{name}" in table
        assert view[f"dir with spaces/{name}"][1] in table
    assert "a fifo" not in table

    mount.unmount_clean()  # works unmounted too
    shallow = json.loads(keyd.kmsfs("ls", str(mount.cipher), "--json").stdout)
    assert sorted(item["path"] for item in shallow) == [".hidden", "a fifo", "dir with spaces"]
    decrypted = keyd.kmsfs(
        "decrypt", "--cipherdir", str(mount.cipher), "dir with spaces/ünï.txt", "-"
    ).stdout
    assert decrypted == b"found by its plaintext path\n"
    long_path = f"dir with spaces/{exact_name(255, 'long résumé 📄 ')}"
    assert keyd.kmsfs("decrypt", "--cipherdir", str(mount.cipher), long_path, "-").stdout == b"long"
    missing = keyd.kmsfs(
        "decrypt", "--cipherdir", str(mount.cipher), "dir with spaces/nope", "-", check=False
    )
    assert missing.returncode != 0 and len(missing.stderr.decode().strip().splitlines()) == 1


# ------------------------------------------------------------------ determinism
def test_same_name_differs_across_directories_and_is_stable(own_mounts: MountFactory) -> None:
    mount = own_mounts.mount(own_mounts.init())
    root = mount.mnt
    for directory in ("one", "two", "one/nested"):
        os.mkdir(root / directory)
    places = {"root": root, "one": root / "one", "two": root / "two", "nested": root / "one/nested"}
    same = ["same name ünï", exact_name(230, "same long name ")]
    for place in places.values():
        for name in same:
            (place / name).write_bytes(b"x")
    first = {
        (label, name): mount.backing(place / name).name
        for label, place in places.items()
        for name in same
    }
    assert re.fullmatch(r"[A-Za-z0-9_-]+", first[("root", same[0])])
    for name in same:
        assert len({first[(label, name)] for label in places}) == len(places), name
    # a directory renamed elsewhere keeps its id, so the names in it stay what they were
    os.rename(places["nested"], root / "two" / "nested")
    places["nested"] = root / "two" / "nested"
    mount.remount()
    for label, place in places.items():
        for name in same:
            assert mount.backing(place / name).name == first[(label, name)], (label, name)
            os.unlink(place / name)
            (place / name).write_bytes(b"again")  # made anew: the same backing name
            assert mount.backing(place / name).name == first[(label, name)], (label, name)
