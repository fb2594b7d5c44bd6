"""The no-traceback walk: every subcommand (found by walking the parser, so new ones are
covered) is run with bad arguments, with missing files and a stopped keyd, and as an
unprivileged user; none may print a traceback or exit with a status the table lacks."""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from kmsfs.cli import build_parser
from kmsfs.cli.common import walk_commands
from kmsfs.cli.errors import EXIT_STATUSES
from tests.conftest import KMSFS

NOBODY = ("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--")


def leaf_commands() -> list[tuple[list[str], argparse.ArgumentParser]]:
    leaves = []
    for path, parser in walk_commands(build_parser()):
        if path and not any(isinstance(a, argparse._SubParsersAction) for a in parser._actions):
            leaves.append((path, parser))
    return leaves


LEAVES = leaf_commands()
IDS = [" ".join(path) for path, _ in LEAVES]


def plausible_argv(path: list[str], parser: argparse.ArgumentParser, where: Path) -> list[str]:
    """Arguments that parse: every positional filled (a choice, or a path that does not
    exist), every required option given, every keyd/keystore option pointing nowhere."""
    missing = str(where / "missing")
    argv = list(path)
    for action in parser._actions:
        if action.option_strings:
            if "--keyd-socket" in action.option_strings or "--socket" in action.option_strings:
                argv += [action.option_strings[-1], str(where / "no-keyd.sock")]
            elif "--keystore" in action.option_strings:
                argv += ["--keystore", str(where / "no-keystore")]
            elif action.required:
                argv += [action.option_strings[-1], "alias/nothing"]
        elif action.nargs in ("?", "*"):
            continue
        elif action.choices:
            argv.append(next(iter(action.choices)))
        else:
            argv += [missing] * (action.nargs if isinstance(action.nargs, int) else 1)
    return argv


def run(argv: list[str], where: Path, prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "HOME": str(where / "home"),
        "XDG_RUNTIME_DIR": str(where / "run"),
        "XDG_DATA_HOME": str(where / "data"),
        "XDG_STATE_HOME": str(where / "state"),
        "KMSFS_KEYD_SOCKET": str(where / "no-keyd.sock"),
        "KMSFS_KEYSTORE": str(where / "no-keystore"),
    }
    env.pop("KMSFS_PASSPHRASE_FILE", None)
    return subprocess.run(
        [*prefix, *KMSFS, *argv],
        capture_output=True,
        stdin=subprocess.DEVNULL,
        env=env,
        timeout=60,
        cwd=where,
    )


def check(result: subprocess.CompletedProcess, argv: list[str]) -> None:
    stderr = result.stderr.decode(errors="replace")
    assert "Traceback" not in stderr, (argv, stderr)
    assert result.returncode in EXIT_STATUSES, (argv, result.returncode, stderr)
    if result.returncode not in (0, 2):  # 2: argparse's usage line comes first
        lines = [line for line in stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("kmsfs: error: "), (argv, stderr)


@pytest.mark.parametrize(("path", "parser"), LEAVES, ids=IDS)
def test_bad_arguments(path: list[str], parser: argparse.ArgumentParser, tmp_path: Path) -> None:
    argv = [*path, "--no-such-option"]
    result = run(argv, tmp_path)
    check(result, argv)
    assert result.returncode == 2


@pytest.mark.parametrize(("path", "parser"), LEAVES, ids=IDS)
def test_missing_files_and_a_stopped_keyd(
    path: list[str], parser: argparse.ArgumentParser, tmp_path: Path
) -> None:
    argv = plausible_argv(path, parser, tmp_path)
    check(run(argv, tmp_path), argv)


@pytest.fixture(params=["reachable", "unreachable"])
def nobody_dir(request: pytest.FixtureRequest) -> Iterator[Path]:
    """A directory of the user's own, in a directory the user can or cannot enter."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to run as another user")
    if subprocess.run([*NOBODY, *KMSFS, "--version"], capture_output=True).returncode != 0:
        pytest.skip("this Python cannot be run as uid 65534")
    top = Path(tempfile.mkdtemp(prefix="kmsfs-nobody-", dir="/tmp"))
    try:
        os.chmod(top, 0o755 if request.param == "reachable" else 0o700)
        where = top / "nobody"
        where.mkdir()
        os.chown(where, 65534, 65534)
        yield where
    finally:
        shutil.rmtree(top, ignore_errors=True)


@pytest.mark.parametrize(("path", "parser"), LEAVES, ids=IDS)
def test_as_an_unprivileged_user(
    path: list[str], parser: argparse.ArgumentParser, nobody_dir: Path
) -> None:
    argv = plausible_argv(path, parser, nobody_dir)
    check(run(argv, nobody_dir, NOBODY), argv)


def test_mount_without_access_to_dev_fuse(nobody_dir: Path) -> None:
    """A real cipher directory is not needed to reach /dev/fuse checks: the mountpoint
    and cipher directory exist, owned by the user; nothing may end in a traceback."""
    cipher, mountpoint = nobody_dir / "cipher", nobody_dir / "mnt"
    for directory in (cipher, mountpoint):
        directory.mkdir()
        os.chown(directory, 65534, 65534)
    (cipher / "kmsfs.conf").write_text("{}")
    for foreground in ([], ["-f"]):
        argv = ["mount", *foreground, str(cipher), str(mountpoint)]
        result = run(argv, nobody_dir, NOBODY)
        check(result, argv)
        assert result.returncode != 0
