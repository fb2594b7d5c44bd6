"""Name and symlink-target encryption, and the backing tree, without a mount."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kmsfs.fs.names import (
    DIRIV_NAME,
    LONGNAME_PREFIX,
    MAX_ENCODED_NAME,
    NameCipher,
    NameError_,
    b64decode,
    b64encode,
    longname_sidecar,
)
from kmsfs.fs.tree import CipherTree

KEY = bytes(range(32))
DIR_A = b"A" * 16
DIR_B = b"B" * 16

names_strategy = (
    st.text(
        alphabet=st.characters(blacklist_characters="/\0", blacklist_categories=("Cs",)),
        min_size=1,
        max_size=80,
    )
    .map(str.encode)
    .filter(lambda n: 0 < len(n) <= 255 and n not in (b".", b".."))
)


@pytest.fixture
def cipher() -> NameCipher:
    return NameCipher(KEY)


@settings(max_examples=200, deadline=None)
@given(name=names_strategy)
def test_names_round_trip_and_encode_safely(name: bytes) -> None:
    cipher = NameCipher(KEY)
    encoded = cipher.encrypt_name(DIR_A, name)
    assert b"/" not in encoded and b"\0" not in encoded and b"." not in encoded
    if len(name) >= 8:  # a short name may occur in base64 by chance
        assert name not in encoded
    assert NameCipher(KEY).decrypt_name(DIR_A, encoded) == name  # no cache involved


def test_deterministic_per_directory_different_across(cipher: NameCipher) -> None:
    a1 = cipher.encrypt_name(DIR_A, b"report.pdf")
    assert NameCipher(KEY).encrypt_name(DIR_A, b"report.pdf") == a1
    b1 = cipher.encrypt_name(DIR_B, b"report.pdf")
    assert a1 != b1
    with pytest.raises(NameError_):
        NameCipher(KEY).decrypt_name(DIR_B, a1)  # moved to another directory


def test_tampered_names_are_rejected(cipher: NameCipher) -> None:
    encoded = cipher.encrypt_name(DIR_A, b"divorce-lawyer.pdf")
    fresh = NameCipher(KEY)
    for index in range(len(encoded)):
        altered = bytearray(encoded)
        altered[index] = ord("A") if altered[index] != ord("A") else ord("B")
        with pytest.raises(NameError_):
            fresh.decrypt_name(DIR_A, bytes(altered))
    for cut in (1, len(encoded) // 2, len(encoded) - 1):
        with pytest.raises(NameError_):
            fresh.decrypt_name(DIR_A, encoded[:cut])
    with pytest.raises(NameError_):
        NameCipher(bytes(32)).decrypt_name(DIR_A, encoded)  # another filesystem's key


def test_long_names_use_a_digest_and_a_checked_sidecar(cipher: NameCipher) -> None:
    short = cipher.encrypt_name(DIR_A, b"s" * 175)
    assert NameCipher.backing_name(short) == short and len(short) <= MAX_ENCODED_NAME
    long_name = "é".encode() * 127 + b"x"  # 255 bytes of UTF-8
    encoded = cipher.encrypt_name(DIR_A, long_name)
    backing = NameCipher.backing_name(encoded)
    assert len(encoded) > MAX_ENCODED_NAME
    assert backing.startswith(LONGNAME_PREFIX) and len(longname_sidecar(backing)) <= 255
    NameCipher.check_longname(backing, encoded)
    other = cipher.encrypt_name(DIR_A, b"y" * 250)
    with pytest.raises(NameError_):
        NameCipher.check_longname(backing, other)  # a sidecar swapped in from another entry


def test_symlink_targets(cipher: NameCipher) -> None:
    target = "../tax/2026/ünï lawyer.pdf".encode()
    stored = cipher.encrypt_target(target)
    assert target not in stored and b"lawyer" not in stored
    assert cipher.encrypt_target(target) != stored  # random nonce
    assert cipher.decrypt_target(stored) == target
    assert NameCipher.target_length(len(stored)) == len(target)
    for length in (1, 2, 3, 4, 100, 4095):
        assert NameCipher.target_length(len(cipher.encrypt_target(b"t" * length))) == length
    with pytest.raises(NameError_):
        cipher.decrypt_target(stored[:-2] + (b"A" if stored[-2:-1] != b"A" else b"B") + stored[-1:])


def test_base64url_rejects_padding_and_garbage() -> None:
    assert b64decode(b64encode(b"\xff\xfe")) == b"\xff\xfe"
    for bad in (b"abc=", b"a", b"ab$c"):
        with pytest.raises(NameError_):
            b64decode(bad)


# ------------------------------------------------------------------- the tree
@pytest.fixture
def tree(tmp_path: Path) -> CipherTree:
    root = os.fsencode(tmp_path)
    built = CipherTree(root, NameCipher(KEY))
    built.write_dir_id(root)
    return built


def test_tree_directories_names_and_strays(tree: CipherTree) -> None:
    root = tree.root
    entry = tree.entry(root, b"photos")
    tree.add_name(root, entry)
    tree.make_dir(root + b"/" + entry.backing, 0o1750)
    sub = root + b"/" + entry.backing
    assert os.stat(sub).st_mode & 0o7777 == 0o1750
    assert os.stat(sub + b"/" + DIRIV_NAME).st_size == 16
    long_entry = tree.entry(sub, b"L" * 240)
    tree.add_name(sub, long_entry)
    open(sub + b"/" + long_entry.backing, "wb").close()
    open(root + b"/stray-file", "wb").close()
    entries, strays = tree.list_dir(root)
    assert [e.name for e in entries] == [b"photos"]
    assert [s.backing for s in strays] == [b"stray-file"]
    entries, strays = tree.list_dir(sub)
    assert [e.name for e in entries] == [b"L" * 240] and strays == []
    assert tree.resolve("photos/" + "L" * 240) == sub + b"/" + long_entry.backing

    with pytest.raises(OSError) as refused:
        tree.remove_dir(sub)
    assert refused.value.errno == errno.ENOTEMPTY
    os.unlink(sub + b"/" + long_entry.backing)
    tree.drop_name(sub, long_entry)
    tree.remove_dir(sub)
    assert not os.path.exists(sub)


def test_tree_missing_directory_id_is_eio(tree: CipherTree) -> None:
    os.mkdir(tree.root + b"/bare")
    with pytest.raises(OSError) as failed:
        tree.entry(tree.root + b"/bare", b"x")
    assert failed.value.errno == errno.EIO


def test_plaintext_names_reserve_only_the_config(tmp_path: Path) -> None:
    root = os.fsencode(tmp_path)
    tree = CipherTree(root, None)
    assert tree.entry(root, b"notes.txt").backing == b"notes.txt"
    with pytest.raises(OSError) as reserved:
        tree.entry(root, b"kmsfs.conf")
    assert reserved.value.errno == errno.EPERM
    os.mkdir(root + b"/d")
    assert tree.entry(root + b"/d", b"kmsfs.conf").backing == b"kmsfs.conf"
    open(root + b"/kmsfs.conf", "w").close()
    assert tree.list_dir(root)[0] == [tree.entry(root, b"d")]
