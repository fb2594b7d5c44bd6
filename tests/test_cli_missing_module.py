"""pyfuse3 is a plain dependency (the filesystem is the product), and a Python module that
is missing or cannot load anyway (a broken install, no libfuse3) is one line, no traceback."""

from __future__ import annotations

import os
import subprocess
import tomllib
from pathlib import Path

import pytest

from kmsfs.cli.errors import EXIT_STATUSES
from tests.conftest import KMSFS

ROOT = Path(__file__).resolve().parent.parent


def test_pyfuse3_is_a_plain_dependency() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = [d.split(">")[0].split("=")[0].split("[")[0].strip() for d in project["dependencies"]]
    assert "pyfuse3" in names


@pytest.fixture
def without_pyfuse3(tmp_path: Path) -> dict[str, str]:
    """An environment where ``import pyfuse3`` fails as it does when it is not installed."""
    shadow = tmp_path / "shadow" / "pyfuse3"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'pyfuse3'\", name='pyfuse3')\n"
    )
    path = os.pathsep.join([str(shadow.parent), str(ROOT)])
    return {**os.environ, "PYTHONPATH": path}


@pytest.mark.parametrize(
    "args",
    [
        ["init", "{tmp}/cipher", "--key", "alias/x", "--keyd-socket", "{tmp}/none.sock"],
        ["mount", "-f", "{tmp}/cipher", "{tmp}/mnt"],
        ["mount", "{tmp}/cipher", "{tmp}/mnt"],
        ["umount", "{tmp}/mnt"],
    ],
)
def test_a_missing_pyfuse3_is_one_line(
    without_pyfuse3: dict[str, str], tmp_path: Path, args: list[str]
) -> None:
    (tmp_path / "cipher").mkdir()
    (tmp_path / "mnt").mkdir()
    argv = [arg.format(tmp=tmp_path) for arg in args]
    result = subprocess.run(
        [*KMSFS, *argv], env=without_pyfuse3, capture_output=True, timeout=60, cwd=tmp_path
    )
    stderr = result.stderr.decode()
    assert "Traceback" not in stderr, stderr
    assert result.returncode in EXIT_STATUSES and result.returncode != 0, stderr
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("kmsfs: error: "), stderr
    assert "pyfuse3" in lines[0]
