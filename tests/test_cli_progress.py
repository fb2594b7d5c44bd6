"""Progress bars: shown on a terminal, not in a pipe, forced either way by --progress and
--quiet; the data is the same with or without them."""

from __future__ import annotations

import os
import pty
import subprocess
from pathlib import Path

import pytest

from tests.conftest import KMSFS, Keyd


@pytest.fixture
def keyd_with_key(live_keyd: Keyd) -> Keyd:
    live_keyd.kmsfs("keys", "create", "--alias", "alias/files")
    return live_keyd


SIZE = 9 << 20  # three 4 MiB batches: the bar moves more than once


def test_progress_forced_into_a_pipe(keyd_with_key: Keyd, short_tmp: Path) -> None:
    plain, cipher, back = short_tmp / "plain", short_tmp / "cipher", short_tmp / "back"
    plain.write_bytes(os.urandom(SIZE))
    encrypted = keyd_with_key.kmsfs(
        "encrypt", "--progress", "--key", "alias/files", str(plain), str(cipher)
    )
    shown = encrypted.stderr.decode()
    assert "encrypt" in shown and "100%" in shown and "9.00M" in shown, shown
    decrypted = keyd_with_key.kmsfs("decrypt", "--progress", str(cipher), str(back))
    assert "decrypt" in decrypted.stderr.decode() and "100%" in decrypted.stderr.decode()
    assert back.read_bytes() == plain.read_bytes()
    # through stdout, the bar on stderr does not touch the data
    piped = keyd_with_key.kmsfs("decrypt", "--progress", str(cipher), "-")
    assert piped.stdout == plain.read_bytes() and b"100%" in piped.stderr


def test_nothing_in_a_pipe_by_default_or_with_quiet(keyd_with_key: Keyd, short_tmp: Path) -> None:
    plain, cipher = short_tmp / "plain", short_tmp / "cipher"
    plain.write_bytes(os.urandom(1 << 20))
    assert (
        keyd_with_key.kmsfs("encrypt", "--key", "alias/files", str(plain), str(cipher)).stderr
        == b""
    )
    assert keyd_with_key.kmsfs("decrypt", "-q", str(cipher), "-").stderr == b""


def test_a_bar_on_a_terminal(keyd_with_key: Keyd, short_tmp: Path) -> None:
    plain, cipher = short_tmp / "plain", short_tmp / "cipher"
    plain.write_bytes(os.urandom(1 << 20))
    controller, terminal = pty.openpty()
    try:
        subprocess.run(
            [*KMSFS, "encrypt", "--key", "alias/files", str(plain), str(cipher)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=terminal,
            env=keyd_with_key.env,
            timeout=60,
            check=True,
        )
        os.close(terminal)
        terminal = -1
        shown = b""
        while True:
            try:
                data = os.read(controller, 65536)
            except OSError:  # EIO: the terminal side is closed and drained
                break
            if not data:
                break
            shown += data
    finally:
        if terminal != -1:
            os.close(terminal)
        os.close(controller)
    assert b"encrypt" in shown and b"100%" in shown, shown
    quiet = keyd_with_key.kmsfs("decrypt", "--quiet", str(cipher), "-")
    assert quiet.stdout == plain.read_bytes()


def test_fsck_verify_and_ls_recursive_show_progress(keyd_with_key: Keyd, short_tmp: Path) -> None:
    cipher = short_tmp / "cipherdir"
    keyd_with_key.kmsfs("init", str(cipher), "--key", "alias/files")
    fsck = keyd_with_key.kmsfs("fsck", "--verify", "--progress", str(cipher))
    assert b"fsck" in fsck.stderr and b"no problems found" in fsck.stdout
    listed = keyd_with_key.kmsfs("ls", "-R", "--progress", str(cipher))
    assert b"ls" in listed.stderr and b"entries" in listed.stderr
    assert keyd_with_key.kmsfs("fsck", "--verify", str(cipher)).stderr == b""
