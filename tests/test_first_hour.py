"""The first hour as a new user (issue 13): after scripts/setup, ``kmsfs`` is on PATH in a
new login shell, and the README's "Using it" commands work copied line by line there.

The README's commands start their own keyd on the default socket and mount under
``$HOME``; the test gives them a fresh empty ``HOME`` and a login shell's environment
(``env -i ... bash -l``: PATH comes from /etc/profile), and stops both in teardown.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from kmsfs.errors import KeydUnavailable
from tests.conftest import KMSFS

REPO = Path(__file__).resolve().parent.parent
SETUP = REPO / "scripts" / "setup"
#: the socket a root keyd serves on by default (kmsfs.kms.paths.default_socket_path)
ROOT_DEFAULT_SOCKET = Path("/run/kmsfs/keyd.sock")


#: fenced blocks of the section that are not shell commands to run (synopses, Python)
NOT_SHELL = {"text", "python", "json", "toml", "ini"}


def using_it_commands(readme: str) -> list[str]:
    """The lines of the shell blocks in the README's "## Using it" section: every fenced
    block there but those marked as another language (```text for a synopsis)."""
    match = re.search(r"^## Using it\n(.*?)(?=^## )", readme, re.S | re.M)
    assert match, "README.md has no '## Using it' section"
    blocks = re.findall(r"^```([^\n]*)\n(.*?)^```", match.group(1), re.S | re.M)
    shell = [body for language, body in blocks if language.strip() not in NOT_SHELL]
    assert shell, "the 'Using it' section has no shell block"
    return [line for block in shell for line in block.splitlines() if line.strip()]


def test_synopses_are_not_taken_for_commands() -> None:
    readme = "## Using it\n```sh\nls\n```\n```text\nkmsfs x [--y]\n```\n```\npwd\n```\n## Next\n"
    assert using_it_commands(readme) == ["ls", "pwd"]


def login_shell(home: Path, script: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """Run ``script`` in a new login shell as a fresh user would have it."""
    (home / ".first-hour.sh").write_text(script)
    return subprocess.run(
        ["env", "-i", f"HOME={home}", "TERM=dumb", "LANG=C.UTF-8", "bash", "-l", ".first-hour.sh"],
        cwd=home,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def keyd_answers(path: Path) -> bool:
    from kmsfs.kms.paths import probe_keyd

    try:
        probe_keyd(path, frozenset({os.geteuid(), 0}))
    except KeydUnavailable:
        return False
    return True


# ----------------------------------------------------------- scripts/setup links
def run_setup(bin_dir: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "KMSFS_BIN_DIR": str(bin_dir)}
    return subprocess.run([str(SETUP)], capture_output=True, text=True, env=env, timeout=900)


def test_setup_links_kmsfs_and_is_safe_to_run_twice(short_tmp: Path) -> None:
    bin_dir = short_tmp / "bin"
    for _ in range(2):
        result = run_setup(bin_dir)
        assert result.returncode == 0, result.stderr
        assert os.readlink(bin_dir / "kmsfs") == str(REPO / ".venv" / "bin" / "kmsfs")
    assert "->" not in result.stderr  # the second run found the link in place


def test_setup_moves_a_link_of_another_checkout(short_tmp: Path) -> None:
    bin_dir = short_tmp / "bin"
    bin_dir.mkdir()
    (bin_dir / "kmsfs").symlink_to("/gone/checkout/.venv/bin/kmsfs")
    assert run_setup(bin_dir).returncode == 0
    assert os.readlink(bin_dir / "kmsfs") == str(REPO / ".venv" / "bin" / "kmsfs")


def test_setup_never_clobbers_a_foreign_file(short_tmp: Path) -> None:
    bin_dir = short_tmp / "bin"
    bin_dir.mkdir()
    (bin_dir / "kmsfs").write_text("#!/bin/sh\necho someone else's kmsfs\n")
    (bin_dir / "mount.kmsfs").symlink_to("/opt/other/mount.kmsfs")
    result = run_setup(bin_dir)
    assert result.returncode == 0, result.stderr
    assert (bin_dir / "kmsfs").read_text().startswith("#!/bin/sh\necho someone")
    assert os.readlink(bin_dir / "mount.kmsfs") == "/opt/other/mount.kmsfs"
    assert f"leaving {bin_dir / 'kmsfs'} alone" in result.stderr


# ------------------------------------------------------- the README, literally
@pytest.fixture
def fresh_home(tmp_path: Path) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("scripts/setup links into /usr/local/bin as root only")
    if not os.path.exists("/dev/fuse"):
        pytest.skip("no /dev/fuse")
    if keyd_answers(ROOT_DEFAULT_SOCKET):
        pytest.skip(f"a keyd already serves the default socket {ROOT_DEFAULT_SOCKET}")
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    try:
        yield home
    finally:
        mountpoint = home / "Private"
        if os.path.ismount(mountpoint):
            subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], capture_output=True)
        if keyd_answers(ROOT_DEFAULT_SOCKET):  # the README's own keyd: none ran before
            subprocess.run(
                [*KMSFS, "keyd", "stop", "--socket", str(ROOT_DEFAULT_SOCKET)],
                capture_output=True,
                timeout=60,
            )
        shutil.rmtree(home, ignore_errors=True)


def test_kmsfs_is_on_path_in_a_new_login_shell(fresh_home: Path) -> None:
    assert subprocess.run([str(SETUP)], capture_output=True, timeout=900).returncode == 0
    result = login_shell(fresh_home, "command -v kmsfs\nkmsfs --help >/dev/null\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "/usr/local/bin/kmsfs"
    assert Path("/usr/local/bin/kmsfs").resolve() == (REPO / ".venv" / "bin" / "kmsfs").resolve()


def test_the_readme_using_it_section_works_in_a_new_login_shell(fresh_home: Path) -> None:
    assert subprocess.run([str(SETUP)], capture_output=True, timeout=900).returncode == 0
    commands = using_it_commands((REPO / "README.md").read_text())
    # each line as typed; -e stops at the first that fails, -x shows which one it was
    result = login_shell(fresh_home, "set -e -o pipefail -x\n" + "\n".join(commands) + "\n")
    assert result.returncode == 0, (
        f"exit status {result.returncode}\n--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}"
    )
    assert "my first secret" in result.stdout
    assert not os.path.ismount(fresh_home / "Private"), "the README's umount did not unmount"
    assert not keyd_answers(ROOT_DEFAULT_SOCKET), "the README's keyd stop did not stop keyd"
    for path in (fresh_home / "Private.enc").rglob("*"):
        assert "notes" not in path.name
        if path.is_file():
            assert b"my first secret" not in path.read_bytes()


def test_after_scripts_try_a_new_shell_finds_the_demo_keyd(short_tmp: Path) -> None:
    """scripts/try records its keyd in ~/.config/kmsfs/config: a new login shell's
    commands find it without --keyd-socket or KMSFS_KEYD_SOCKET."""
    if os.geteuid() != 0:
        pytest.skip("scripts/setup links into /usr/local/bin as root only")
    home = short_tmp / "home"
    home.mkdir()
    demo = home / ".local" / "share" / "kmsfs-demo"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KMSFS_", "XDG_"))}
    env["HOME"] = str(home)
    try:
        result = subprocess.run(
            [str(REPO / "scripts" / "try")], capture_output=True, text=True, env=env, timeout=600
        )
        assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
        config = (home / ".config" / "kmsfs" / "config").read_text()
        assert str(demo / "keyd.sock") in config
        listed = login_shell(home, "kmsfs keys list\n")
        assert listed.returncode == 0, listed.stderr
        assert "alias/demo" in listed.stdout or "kmsfs demo key" in listed.stdout, listed.stdout
    finally:
        subprocess.run(["fusermount3", "-u", "-z", str(demo / "private")], capture_output=True)
        subprocess.run(
            [*KMSFS, "keyd", "stop", "--socket", str(demo / "keyd.sock")],
            capture_output=True,
            timeout=60,
        )
