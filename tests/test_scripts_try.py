"""``scripts/try``, the README's first command: it runs, twice, and shows only ciphertext."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import KMSFS

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def demo_dir(short_tmp: Path) -> Iterator[Path]:
    demo = short_tmp / "demo"
    try:
        yield demo
    finally:  # the demo leaves a mount and a keyd running on purpose: stop both
        subprocess.run(["fusermount3", "-u", str(demo / "private")], capture_output=True)
        subprocess.run(
            [*KMSFS, "keyd", "stop", "--socket", str(demo / "keyd.sock")],
            capture_output=True,
            timeout=60,
        )


def test_scripts_try_runs_twice_and_shows_only_ciphertext(demo_dir: Path) -> None:
    env = dict(os.environ, KMSFS_DEMO_DIR=str(demo_dir))
    for run in range(2):
        result = subprocess.run(
            [str(REPO / "scripts" / "try")], capture_output=True, text=True, env=env, timeout=600
        )
        assert result.returncode == 0, f"run {run + 1}:\n{result.stdout}\n{result.stderr}"
        assert "FOUND" not in result.stdout
    assert (demo_dir / "private" / "diary.txt").read_text().startswith("Dear diary")
    cipher_names = [path.name for path in (demo_dir / "private.enc").rglob("*")]
    assert not any("diary" in name or "photos" in name for name in cipher_names)
    assert "decrypted: hello from kmsfs" in result.stdout
