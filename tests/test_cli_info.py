"""``kmsfs info CIPHERDIR`` (like ``gocryptfs -info``): what kmsfs.conf says, the CMK's
state in keyd, and how many files there are; without keyd it says so and prints the rest.
``kmsfs inspect CIPHERDIR`` shows the same instead of failing on a directory."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.conftest import Keyd


@pytest.fixture
def cipherdir(live_keyd: Keyd, short_tmp: Path) -> Path:
    live_keyd.kmsfs("keys", "create", "--alias", "alias/home")
    cipher = short_tmp / "cipher"
    live_keyd.kmsfs("init", str(cipher), "--key", "alias/home", "--plaintext-names")
    # backing files put in place by hand: info counts them, it does not decrypt them
    (cipher / "sub").mkdir()
    for name in ("a", "b", "sub/c"):
        (cipher / name).write_bytes(os.urandom(100))
    (cipher / "link").symlink_to("a")
    return cipher


def record(stdout: bytes) -> dict[str, str]:
    rows = {}
    for line in stdout.decode().splitlines():
        name, _, value = line.partition(" ")
        rows[name] = value.strip()
    return rows


def test_info_describes_the_cipherdir_and_its_key(live_keyd: Keyd, cipherdir: Path) -> None:
    shown = record(live_keyd.kmsfs("info", str(cipherdir)).stdout)
    assert shown["FormatVersion"] == "1"
    assert shown["ChunkSize"] == "65536"
    assert shown["KeyArn"].startswith("arn:aws:kms:") and ":key/" in shown["KeyArn"]
    assert shown["KeyState"] == "Enabled"
    assert shown["Names"].startswith("PLAINTEXT")
    assert shown["Files"] == "3"
    assert shown["Directories"] == "1"
    assert shown["Symlinks"] == "1"
    assert shown["Authenticated"] == "yes"
    live_keyd.kmsfs("keys", "disable", "alias/home")
    assert record(live_keyd.kmsfs("info", str(cipherdir)).stdout)["KeyState"] == "Disabled"


def test_info_json(live_keyd: Keyd, cipherdir: Path) -> None:
    shown = json.loads(live_keyd.kmsfs("info", "--json", str(cipherdir)).stdout)
    assert shown["KeyState"] == "Enabled" and shown["Files"] == 3


def test_info_without_keyd_says_so_and_prints_the_rest(live_keyd: Keyd, cipherdir: Path) -> None:
    live_keyd.stop()
    result = live_keyd.kmsfs("info", str(cipherdir))
    shown = record(result.stdout)
    assert shown["KeyState"].startswith("unknown (keyd unreachable")
    assert shown["Authenticated"].startswith("not checked")
    assert shown["Files"] == "3" and shown["ChunkSize"] == "65536"
    assert b"Traceback" not in result.stderr


def test_info_of_a_directory_that_is_no_cipherdir(live_keyd: Keyd, short_tmp: Path) -> None:
    result = live_keyd.kmsfs("info", str(short_tmp), check=False)
    assert result.returncode == 8
    assert len(result.stderr.splitlines()) == 1


def test_inspect_of_a_cipherdir_describes_it(live_keyd: Keyd, cipherdir: Path) -> None:
    shown = record(live_keyd.kmsfs("inspect", str(cipherdir)).stdout)
    assert shown["KeyState"] == "Enabled" and shown["Files"] == "3"
