"""scripts/soak_memory.py leaves nothing behind, however it ends."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.fs.helpers import is_mounted

REPO = Path(__file__).resolve().parents[2]


def _processes_naming(text: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if text.encode() in (entry / "cmdline").read_bytes():
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


@pytest.mark.skipif(os.geteuid() != 0, reason="the soak script needs root (drop_caches)")
def test_soak_memory_cleans_up_when_interrupted(tmp_path: Path) -> None:
    """Interrupted (SIGINT to the script alone, as ``kill -INT`` sends it) while its load
    runs in the mount: the load is stopped, the mount unmounted, the mount and keyd
    stopped and the working directory removed. (It unmounted while the load still ran in
    the mount: busy, so a killed mount and a dead mountpoint were left behind.)"""
    with open(tmp_path / "stderr", "wb") as stderr:
        script = subprocess.Popen(
            [sys.executable, str(REPO / "scripts" / "soak_memory.py"), "--rounds", "1"]
            + ["--procs", "2", "--ops", "1000000", "--idle", "0"],
            stdout=subprocess.PIPE,
            stderr=stderr,
            start_new_session=True,
        )
    base: Path | None = None
    try:
        assert script.stdout is not None
        first = script.stdout.readline().decode()
        assert first.startswith("working in "), first
        base = Path(first.removeprefix("working in ").strip())
        work = base / "mnt" / "round1"
        deadline = time.monotonic() + 120
        while not (work.is_dir() and len(list(work.iterdir())) == 2):
            assert script.poll() is None, (tmp_path / "stderr").read_text()
            assert time.monotonic() < deadline, "the load did not start"
            time.sleep(0.1)
        os.kill(script.pid, signal.SIGINT)
        script.wait(timeout=120)
        assert script.returncode != 0
        assert not is_mounted(base / "mnt")
        assert not base.exists()
        assert _processes_naming(str(base)) == [], "keyd or the mount is still running"
    finally:
        if script.poll() is None:
            os.killpg(script.pid, signal.SIGKILL)
            script.wait()
        if base is not None:
            for pid in _processes_naming(str(base)):
                os.kill(pid, signal.SIGKILL)
            if is_mounted(base / "mnt"):
                subprocess.run(["fusermount3", "-uz", str(base / "mnt")], check=False)
            shutil.rmtree(base, ignore_errors=True)
