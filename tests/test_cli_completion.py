"""Shell completion (bash, zsh) and the man page are generated from the parser, so they
name every subcommand, new ones included."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from kmsfs.cli import build_parser
from kmsfs.cli.common import walk_commands
from tests.conftest import run_kmsfs

COMMANDS = [path for path, _parser in walk_commands(build_parser()) if path]


def test_the_walk_finds_nested_commands() -> None:
    assert ["keys", "tags"] in COMMANDS and ["keyd", "audit", "verify"] in COMMANDS
    assert ["completion"] in COMMANDS and ["man"] in COMMANDS


@pytest.mark.parametrize("shell", ["bash", "zsh"])
def test_completion_names_every_subcommand(shell: str) -> None:
    script = run_kmsfs("completion", shell).stdout.decode()
    for path in COMMANDS:
        assert path[-1] in script, path
    if shutil.which(shell):
        subprocess.run([shell, "-n"], input=script.encode(), check=True)


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_bash_completes_subcommands() -> None:
    script = run_kmsfs("completion", "bash").stdout.decode()
    probe = script + (
        "\nCOMP_WORDS=(kmsfs ke); COMP_CWORD=1; COMP_LINE='kmsfs ke'; COMP_POINT=8\n"
        "_shtab_kmsfs kmsfs ke kmsfs\n"
        'printf "%s\\n" "${COMPREPLY[@]}"\n'
    )
    completed = subprocess.run(["bash", "-c", probe], capture_output=True, check=True)
    assert set(completed.stdout.decode().split()) == {"key", "keyd", "keys"}


def test_the_man_page_names_every_subcommand() -> None:
    page = run_kmsfs("man").stdout.decode()
    assert page.startswith(".TH KMSFS")
    unescaped = page.replace("\\-", "-")
    for path in COMMANDS:
        assert f"'kmsfs {' '.join(path)}'" in unescaped, path
    assert "exit status" in unescaped.lower()
