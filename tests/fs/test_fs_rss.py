"""The mount's resident memory (issue 19, "Scale"): what a file held open costs.

Figures come from ``/proc/<mount pid>/status`` (VmRSS). The bound is generous: before
the fix an open file cost 70-100 KiB (a 64 KiB zero chunk per file's codec); after it
about 8 KiB. What stat-ed and forgotten inodes cost: test_fs_inode_memory.py.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

from tests.fs.helpers import Mount, MountFactory

OPEN_FILES = int(os.environ.get("KMSFS_TEST_RSS_OPEN_FILES", "2000"))
#: what one file held open (read-only, one byte read) may cost; it was 70-100 KiB
OPEN_FILE_BOUND = 24 << 10


def rss_of(mount: Mount) -> int:
    assert mount.process is not None and mount.alive, mount.log()
    for line in Path(f"/proc/{mount.process.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) << 10
    raise AssertionError("no VmRSS")


def settled_rss(mount: Mount) -> int:
    """RSS once the mount has had a moment to finish what it was doing."""
    time.sleep(0.5)
    return rss_of(mount)


def make_cipherdir(
    mounts: MountFactory, tmp: Path, count: int, *, plaintext_names: bool | None = None
) -> Path:
    """A cipher directory of ``count`` small files in ``files/`` (kmsfs import)."""
    source = tmp / "src"
    (source / "files").mkdir(parents=True)
    for index in range(count):
        (source / "files" / f"file-{index:07d}").write_bytes(b"x" * (index % 200 + 1))
    cipher = mounts.init(plaintext_names=plaintext_names)
    mounts.keyd.kmsfs("import", "-q", str(source), str(cipher))
    return cipher


def test_files_held_open_cost_a_few_kib_each(mounts: MountFactory, tmp_path: Path) -> None:
    cipher = make_cipherdir(mounts, tmp_path, OPEN_FILES)
    mount = mounts.mount(cipher, None, "--key-cache-seconds", "0")
    names = sorted((mount.mnt / "files").iterdir())
    # a first round warms what the mount keeps once (scratch buffers, caches)
    for path in names[:50]:
        with open(path, "rb") as warm:
            warm.read(1)
    before = settled_rss(mount)
    with contextlib.ExitStack() as stack:
        for path in names:
            handle = stack.enter_context(open(path, "rb", buffering=0))
            assert handle.read(1) == b"x"
        held = settled_rss(mount)
    per_file = (held - before) // len(names)
    print(
        f"rss before={before >> 10} KiB with {len(names)} open={held >> 10} KiB: "
        f"{per_file} B per open file"
    )
    assert per_file <= OPEN_FILE_BOUND, (
        f"{per_file} bytes of RSS per open file (before {before}, held {held})"
    )
