"""Failures that used to end in a traceback end in one line on stderr and a non-zero exit:
inspect of a directory or an unreadable file, keyd serve on a live or squatted socket."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import KMSFS, Keyd, run_kmsfs

# root reads any file; without these capabilities it is held to the file modes like a user
AS_A_USER = (
    "setpriv",
    "--inh-caps=-dac_override,-dac_read_search",
    "--bounding-set=-dac_override,-dac_read_search",
    "--",
)


def one_error_line(result: subprocess.CompletedProcess[bytes]) -> str:
    stderr = result.stderr.decode()
    lines = [line for line in stderr.splitlines() if " WARNING " not in line]  # keyd's log
    assert result.returncode != 0, stderr
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr and "│" not in stderr and "+-" not in stderr, stderr
    assert lines[0].startswith("kmsfs: error: "), stderr
    return lines[0]


def run_as_user(*args: str) -> subprocess.CompletedProcess[bytes]:
    if os.geteuid() != 0:
        return run_kmsfs(*args, check=False)
    if shutil.which("setpriv") is None:
        pytest.skip("needs setpriv to run without root's file capabilities")
    return subprocess.run([*AS_A_USER, *KMSFS, *args], capture_output=True, timeout=120)


# ------------------------------------------------------------------------ inspect
@pytest.mark.parametrize("verify", [False, True])
def test_inspect_of_a_directory(tmp_path: Path, verify: bool) -> None:
    result = run_kmsfs("inspect", *(["--verify"] if verify else []), str(tmp_path), check=False)
    assert one_error_line(result) == f"kmsfs: error: cannot read {tmp_path}: Is a directory"
    assert result.returncode == 2


def test_inspect_of_an_unreadable_file(tmp_path: Path) -> None:
    os.chmod(tmp_path, 0o755)
    unreadable = tmp_path / "secret.kmsfs"
    unreadable.write_bytes(b"x" * 100)
    os.chmod(unreadable, 0o000)
    result = run_as_user("inspect", str(unreadable))
    assert one_error_line(result) == f"kmsfs: error: cannot read {unreadable}: Permission denied"
    assert result.returncode == 2


# ------------------------------------------------------------------------ keyd serve
@pytest.fixture
def second_keyd(keyd_factory: Callable[..., Keyd]) -> Iterator[Keyd]:
    other = keyd_factory("other")
    other.init()
    yield other


@pytest.mark.parametrize("detached", [False, True])
def test_keyd_serve_on_a_live_socket(live_keyd: Keyd, second_keyd: Keyd, detached: bool) -> None:
    args = ["keyd", "serve", "--keystore", str(second_keyd.keystore)]
    args += ["--root-key-file", str(second_keyd.root_key), "--socket", str(live_keyd.socket)]
    result = run_kmsfs(*args, *(["-d"] if detached else []), check=False)
    line = one_error_line(result)
    assert line.endswith(
        f"another keyd is listening on {live_keyd.socket}; stop it or choose another --socket"
    )
    if detached:
        assert line.startswith("kmsfs: error: keyd did not start: another keyd is listening")
    assert result.returncode == 10  # in use, detached or not
    with live_keyd.client() as client:  # the live one is untouched
        assert client.call("ListKeys", {})["Keys"] == []


@pytest.mark.parametrize("detached", [False, True])
def test_keyd_serve_on_a_path_that_is_not_a_socket(second_keyd: Keyd, detached: bool) -> None:
    squatted = second_keyd.workdir / "not-a-socket"
    squatted.write_text("someone's file\n")
    result = run_kmsfs(
        *second_keyd.serve_args("--socket", str(squatted), *(["-d"] if detached else [])),
        check=False,
    )
    line = one_error_line(result)
    assert line.endswith(f"{squatted} exists and is not a socket; refusing to replace it")
    assert squatted.read_text() == "someone's file\n"


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to own a socket as another user")
def test_keyd_serve_on_a_socket_another_user_listens_on(second_keyd: Keyd) -> None:
    squatted = second_keyd.workdir / "squat.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(str(squatted))
        listener.listen()
        os.chown(squatted, 65534, 65534)
        result = run_kmsfs(*second_keyd.serve_args("--socket", str(squatted)), check=False)
    finally:
        listener.close()
    assert one_error_line(result) == (
        f"kmsfs: error: another process is listening on {squatted} (owned by uid 65534); "
        "choose another --socket"
    )


NOBODY = ("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--")


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None,
    reason="needs root and setpriv to play two users",
)
def test_keyd_serve_on_another_users_stale_socket_in_a_sticky_directory(
    second_keyd: Keyd,
) -> None:
    """As in /tmp: a user's keyd cannot remove another user's stale socket."""
    if subprocess.run([*NOBODY, *KMSFS, "--help"], capture_output=True).returncode != 0:
        pytest.skip("this Python cannot be run as uid 65534")
    for directory in (second_keyd.workdir.parent, second_keyd.workdir):
        os.chmod(directory, 0o755)
    for item in [second_keyd.keystore, *second_keyd.keystore.iterdir(), second_keyd.root_key]:
        os.chown(item, 65534, 65534)
    shared = second_keyd.workdir / "shared"
    shared.mkdir()
    os.chmod(shared, 0o1777)
    stale = shared / "keyd.sock"
    leftover = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    leftover.bind(str(stale))
    leftover.close()  # nobody listens on it: stale, and root's
    os.chmod(stale, 0o777)
    result = subprocess.run(
        [*NOBODY, *KMSFS, *second_keyd.serve_args("--socket", str(stale))],
        capture_output=True,
        timeout=120,
    )
    assert one_error_line(result) == (
        f"kmsfs: error: cannot remove the stale socket {stale} (owned by uid 0): "
        "Operation not permitted; remove it or choose another --socket"
    )
    assert stale.exists()
