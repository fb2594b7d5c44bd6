"""encrypt/decrypt never replace an existing output unless told to (--force), and write
into a device or FIFO instead of replacing it."""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path

import pytest

from tests.conftest import Keyd, run_kmsfs


@pytest.fixture
def keyd_with_key(live_keyd: Keyd) -> Keyd:
    live_keyd.kmsfs("keys", "create", "--alias", "alias/files")
    return live_keyd


def one_line(result) -> str:
    lines = result.stderr.decode().splitlines()
    assert len(lines) == 1 and "Traceback" not in lines[0], lines
    return lines[0]


@pytest.mark.parametrize("command", ["encrypt", "decrypt"])
def test_an_existing_output_is_kept_without_force(
    keyd_with_key: Keyd, short_tmp: Path, command: str
) -> None:
    plain, cipher = short_tmp / "plain", short_tmp / "cipher"
    plain.write_bytes(os.urandom(70_000))
    keyd_with_key.kmsfs("encrypt", "--key", "alias/files", str(plain), str(cipher))
    source = plain if command == "encrypt" else cipher
    key = ["--key", "alias/files"] if command == "encrypt" else []
    existing = short_tmp / "existing"
    existing.write_bytes(b"precious")
    before = sorted(os.listdir(short_tmp))
    result = keyd_with_key.kmsfs(command, *key, str(source), str(existing), check=False)
    assert result.returncode == 2
    assert one_line(result) == f"kmsfs: error: {existing} exists; add --force to replace it"
    assert existing.read_bytes() == b"precious"
    assert sorted(os.listdir(short_tmp)) == before  # no temporary left either
    keyd_with_key.kmsfs(command, *key, "--force", str(source), str(existing))
    if command == "decrypt":
        assert existing.read_bytes() == plain.read_bytes()
    else:
        back = short_tmp / "back"
        keyd_with_key.kmsfs("decrypt", str(existing), str(back))
        assert back.read_bytes() == plain.read_bytes()


def test_the_refusal_comes_before_any_work(short_tmp: Path) -> None:
    """No keyd at all: the existing output is the first thing said (usage, status 2)."""
    plain, existing = short_tmp / "plain", short_tmp / "existing"
    plain.write_bytes(b"x")
    existing.write_bytes(b"precious")
    result = run_kmsfs(
        "encrypt", "--keyd-socket", str(short_tmp / "none.sock"), "--key", "alias/files",
        str(plain), str(existing), check=False,
    )  # fmt: skip
    assert result.returncode == 2
    assert one_line(result).endswith("exists; add --force to replace it")


def test_a_dangling_symlink_counts_as_existing(keyd_with_key: Keyd, short_tmp: Path) -> None:
    plain, link = short_tmp / "plain", short_tmp / "link"
    plain.write_bytes(b"x")
    link.symlink_to(short_tmp / "nowhere")
    result = keyd_with_key.kmsfs(
        "encrypt", "--key", "alias/files", str(plain), str(link), check=False
    )
    assert result.returncode == 2 and link.is_symlink()


def test_a_fifo_is_written_into_not_replaced(keyd_with_key: Keyd, short_tmp: Path) -> None:
    plain, cipher, fifo = short_tmp / "plain", short_tmp / "cipher", short_tmp / "fifo"
    plain.write_bytes(os.urandom(200_000))
    keyd_with_key.kmsfs("encrypt", "--key", "alias/files", str(plain), str(cipher))
    os.mkfifo(fifo)
    # our own reader and writer ends first: the reader sees EOF only when both ours and the
    # command's writer are closed, and the test cannot block whatever the command does
    read_end = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    os.set_blocking(read_end, True)
    our_writer = os.open(fifo, os.O_WRONLY)
    received = bytearray()

    def read_all() -> None:
        while chunk := os.read(read_end, 1 << 16):
            received.extend(chunk)

    reader = threading.Thread(target=read_all)
    reader.start()
    try:
        keyd_with_key.kmsfs("decrypt", str(cipher), str(fifo))
    finally:
        os.close(our_writer)
        reader.join()
        os.close(read_end)
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert bytes(received) == plain.read_bytes()
