"""scripts/bench's own parts: the null filesystem (scripts/nullfs.py) on a real mount, the
spread of repetitions in the table and JSON, and ``--only scale`` end to end at tiny sizes.

No timing is asserted anywhere: only that every figure is there and the data is right.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = REPO / "scripts"
sys.path.insert(0, str(SCRIPTS))

import bench_fs  # noqa: E402  (scripts/ is not a package)

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="mounts and drop_caches need root")


def _mounted(path: Path) -> bool:
    return any(
        line.split()[1] == str(path) for line in Path("/proc/mounts").read_text().splitlines()
    )


@pytest.fixture
def scratch() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="kbench-t-", dir="/var/tmp"))
    try:
        yield path
    finally:
        for line in Path("/proc/mounts").read_text().splitlines():
            target = line.split()[1]
            if target.startswith(str(path) + "/"):
                subprocess.run(["fusermount3", "-uz", target], capture_output=True)
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def null_mount(scratch: Path) -> Iterator[tuple[Path, Path]]:
    """scripts/nullfs.py serving scratch/backing on scratch/mnt; unmounted and stopped after."""
    backing, mountpoint = scratch / "backing", scratch / "mnt"
    backing.mkdir()
    mountpoint.mkdir()
    with open(scratch / "nullfs.log", "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, str(SCRIPTS / "nullfs.py"), str(backing), str(mountpoint)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 30
        while not os.path.ismount(mountpoint):
            assert proc.poll() is None, (scratch / "nullfs.log").read_text()
            assert time.monotonic() < deadline, "nullfs did not mount within 30 s"
            time.sleep(0.05)
        yield backing, mountpoint
        assert proc.poll() is None, (scratch / "nullfs.log").read_text()
    finally:
        if os.path.ismount(mountpoint):
            subprocess.run(["fusermount3", "-u", str(mountpoint)], capture_output=True)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    assert proc.returncode == 0, (scratch / "nullfs.log").read_text()
    assert not _mounted(mountpoint)


@needs_root
def test_nullfs_serves_reads_writes_and_stats_as_the_backing_directory(
    null_mount: tuple[Path, Path],
) -> None:
    backing, mnt = null_mount
    data = os.urandom(3 * (1 << 20) + 12345)
    (mnt / "file.bin").write_bytes(data)
    assert (backing / "file.bin").read_bytes() == data
    assert (mnt / "file.bin").read_bytes() == data
    with open(mnt / "file.bin", "rb") as handle:  # random access
        assert os.pread(handle.fileno(), 4096, 1_000_001) == data[1_000_001:1_004_097]
    with open(mnt / "file.bin", "r+b") as handle:  # overwrite in the middle, O_WRONLY-like
        handle.seek(5000)
        handle.write(b"x" * 10)
    data = data[:5000] + b"x" * 10 + data[5010:]
    assert (mnt / "file.bin").read_bytes() == data
    with open(mnt / "log.txt", "ab") as handle:  # O_APPEND
        handle.write(b"one\n")
    with open(mnt / "log.txt", "ab") as handle:
        handle.write(b"two\n")
    assert (mnt / "log.txt").read_bytes() == b"one\ntwo\n"

    mounted, real = os.stat(mnt / "file.bin"), os.stat(backing / "file.bin")
    assert mounted.st_size == real.st_size == len(data)
    assert mounted.st_ino == real.st_ino
    assert mounted.st_mode == real.st_mode
    os.truncate(mnt / "file.bin", 100)
    os.chmod(mnt / "file.bin", 0o600)
    os.utime(mnt / "file.bin", ns=(1_000_000_000, 2_000_000_000))
    real = os.stat(backing / "file.bin")
    assert (real.st_size, real.st_mode & 0o777, real.st_mtime_ns) == (100, 0o600, 2_000_000_000)

    # a directory renamed with files below it: the files are still reached by their new path
    (mnt / "tree" / "sub").mkdir(parents=True)
    (mnt / "tree" / "sub" / "leaf").write_bytes(b"leaf")
    os.stat(mnt / "tree" / "sub" / "leaf")
    os.rename(mnt / "tree", mnt / "moved")
    assert (mnt / "moved" / "sub" / "leaf").read_bytes() == b"leaf"
    os.link(mnt / "moved" / "sub" / "leaf", mnt / "hard")
    os.unlink(mnt / "moved" / "sub" / "leaf")  # the other link stays readable
    assert (mnt / "hard").read_bytes() == b"leaf"
    assert os.stat(mnt / "hard").st_nlink == 1
    (mnt / "old").write_bytes(b"old")  # a rename over an existing name replaces it
    (mnt / "new").write_bytes(b"new")
    os.stat(mnt / "new")
    os.rename(mnt / "old", mnt / "new")
    assert (mnt / "new").read_bytes() == b"old"
    assert not (mnt / "old").exists()
    os.unlink(mnt / "new")
    os.symlink("hard", mnt / "soft")
    assert os.readlink(mnt / "soft") == "hard"
    assert sorted(os.listdir(mnt)) == ["file.bin", "hard", "log.txt", "moved", "soft"]
    assert sorted(os.listdir(backing)) == sorted(os.listdir(mnt))
    with pytest.raises(FileNotFoundError):
        os.stat(mnt / "missing")
    with pytest.raises(OSError) as raised:
        os.rmdir(mnt / "moved")
    assert raised.value.errno == errno.ENOTEMPTY
    shutil.rmtree(mnt / "moved")
    assert not (backing / "moved").exists()
    assert os.statvfs(mnt).f_blocks == os.statvfs(backing).f_blocks


def test_table_cells_show_the_median_and_the_spread_of_the_runs() -> None:
    assert bench_fs.fmt_runs([3.0, 1.0, 2.0], "s") == "2.00 (1.00–3.00)"
    assert bench_fs.fmt_runs([812.4, 1004.0, 950.2, 990.0], "IOPS") == "970 (812–1004)"
    assert bench_fs.fmt_runs([5.0], "s") == "5.00"  # one run: no spread to show
    assert bench_fs.fmt_runs(None, "s") == "-"
    assert bench_fs.fmt_runs([], "s") == "-"


def test_json_and_table_carry_the_spread_and_the_null_ratio() -> None:
    results = bench_fs.Results()
    metric = results.metric("seq_read_warm", "seq read warm", "MB/s", True)
    for value in (900.0, 1000.0, 1100.0):
        metric.add("kmsfs", value)
    for value in (1000.0, 1000.0, 1200.0):
        metric.add("null", value)
    metric.add("gocryptfs", 500.0)
    row = results.to_json()[0]
    assert row["spread"]["kmsfs"] == {"min": 900.0, "max": 1100.0, "relative": 0.2}
    assert row["spread"]["null"]["min"] == 1000.0 and row["spread"]["null"]["max"] == 1200.0
    assert row["spread"]["gocryptfs"] == {"min": 500.0, "max": 500.0, "relative": 0.0}
    assert row["kmsfs_vs_null"] == pytest.approx(1.0)
    assert row["kmsfs_vs_gocryptfs"] == pytest.approx(2.0)
    text = bench_fs.table(results)
    assert "kmsfs vs null" in text.splitlines()[0]
    line = next(line for line in text.splitlines() if line.startswith("| seq read warm"))
    assert "1000 (900–1100)" in line and "1000 (1000–1200)" in line and "1.00×" in line


SCALE_KEYS_ALL = [
    "scale_untar_300",
    "scale_untar_300_per_file",
    "scale_untar_900",
    "scale_untar_900_per_file",
    "scale_untar_growth",
    "scale_dir_create",
    "scale_dir_ls_first",
    "scale_dir_ls_second",
    "scale_dir_missing_first",
    "scale_dir_missing_second",
    "scale_big_write_first",
    "scale_big_write_last",
    "scale_big_write_growth",
    "scale_big_read_first",
    "scale_big_read_last",
    "scale_big_read_growth",
]
SCALE_KEYS_KMSFS = [
    "scale_rss_mounted",
    "scale_stat",
    "scale_rss_stat",
    "scale_rss_forget",
    "scale_rss_open",
    "scale_nodes_mounted",
    "scale_nodes_stat",
    "scale_nodes_forget",
    "scale_nodes_open",
]


@needs_root
@pytest.mark.slow
@pytest.mark.skipif(
    shutil.which("gocryptfs") is None or shutil.which("fio") is None,
    reason="scripts/bench installs gocryptfs and fio from apt",
)
def test_bench_only_scale_at_tiny_sizes_reports_every_figure(scratch: Path) -> None:
    json_out = scratch / "results.json"
    result = subprocess.run(
        [sys.executable, str(SCRIPTS / "bench_fs.py"), "--only", "scale"]
        + ["--scale-files", "300,900", "--scale-dir-entries", "500"]
        + ["--scale-stat-files", "2500", "--scale-open-files", "200"]
        + ["--scale-big-gib", "0.03125", "--scale-segment-mib", "8"]
        + ["--workdir", str(scratch), "--json-out", str(json_out)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(json_out.read_text())
    assert "error" not in report
    rows = {row["key"]: row for row in report["results"]}
    assert sorted(rows) == sorted(SCALE_KEYS_ALL + SCALE_KEYS_KMSFS)
    for key in SCALE_KEYS_ALL:
        for system in ("kmsfs", "gocryptfs"):
            runs = rows[key]["runs"][system]
            assert len(runs) == 1 and runs[0] > 0, (key, system, runs)
            assert rows[key]["spread"][system]["min"] == runs[0]
    for key in SCALE_KEYS_KMSFS:
        assert list(rows[key]["runs"]) == ["kmsfs"], key
        assert rows[key]["runs"]["kmsfs"][0] > 0, key
    # the growth rows are the ratio of the rows they are made from
    per_small = rows["scale_untar_300_per_file"]["median"]["kmsfs"]
    per_large = rows["scale_untar_900_per_file"]["median"]["kmsfs"]
    assert rows["scale_untar_growth"]["median"]["kmsfs"] == pytest.approx(per_large / per_small)
    assert report["scale"]["import_seconds"] >= 0
    # the mount's own counts at each point: the open files are handles it holds
    assert report["scale"]["mount_counts"]["open"]["handles"] == 200
    assert report["scale"]["mount_counts"]["mounted"]["handles"] == 0
    for label in ("untar 900 files, per file", "RSS with 200 files open", "read rate last"):
        assert label in result.stdout
    # everything started is gone: no mount, no scratch directory, no process
    assert [p for p in scratch.iterdir() if p.name.startswith("kmsfs-bench-")] == []
    assert not any(str(scratch) in line for line in Path("/proc/mounts").read_text().splitlines())
    assert _processes_mentioning(scratch) == []


def _processes_mentioning(path: Path) -> list[str]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(path) in command:
            found.append(f"{entry.name}: {command}")
    return found


@needs_root
@pytest.mark.skipif(
    shutil.which("gocryptfs") is None or shutil.which("fio") is None,
    reason="scripts/bench installs gocryptfs and fio from apt",
)
def test_bench_only_keyd_reports_its_four_rates(scratch: Path) -> None:
    """The keyd workload calls scripts/bench_keyd.measure() with its current signature
    (it failed with a TypeError after bench_keyd gained transports and keyd's CPU)."""
    json_out = scratch / "results.json"
    result = subprocess.run(
        [sys.executable, str(SCRIPTS / "bench_fs.py"), "--only", "keyd", "--repeat", "1"]
        + ["--keyd-seconds", "0.2", "--workdir", str(scratch), "--json-out", str(json_out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {row["key"]: row for row in json.loads(json_out.read_text())["results"]}
    assert sorted(rows) == sorted(
        f"keyd_{operation}_{clients}c"
        for operation in ("GenerateDataKey", "Decrypt")
        for clients in (1, 8)
    )
    for row in rows.values():
        assert row["runs"]["kmsfs"][0] > 0
    assert _processes_mentioning(scratch) == []
