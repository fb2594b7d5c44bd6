"""Timing of rewrites in place with undo records (README.md, *Crashes*, Cost); not a test.

    .venv/bin/python scripts/bench_torn.py [REPO] [seq|rand|append|append-fsync ...]

REPO (default: this checkout) is where ``kmsfs`` is imported from, so that two versions
can be compared on the same machine. Engine only, in-memory keys, files under /tmp;
medians of 5 runs. ``seq``: MB/s writing 128 MiB in 1 MiB requests to a new file. ``rand``:
4 KiB writes/s at random 4 KiB-aligned offsets of a 64 MiB file that was there when the
engine opened it. ``append``: 100-byte appends/s to a 1 MiB file, each followed by
``flush`` and ``mark_durable`` (what the mount does around its fsync); ``append-fsync``:
the same with a real ``fsync``.
"""

from __future__ import annotations

import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, sys.argv[1] if len(sys.argv) > 1 else str(Path(__file__).parents[1]))

from kmsfs.format.bench import BenchKeyProvider  # noqa: E402
from kmsfs.format.file import EncryptedFile  # noqa: E402

MIB = 1 << 20
PROVIDER = BenchKeyProvider()
DIRECTORY = tempfile.mkdtemp(prefix="bench-torn-", dir="/tmp")


def fresh(name: str) -> int:
    return os.open(os.path.join(DIRECTORY, name), os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)


def sequential(total: int = 128 * MIB) -> float:
    fd = fresh("seq")
    engine = EncryptedFile.open(fd, key_provider=PROVIDER, key_id="k")
    data = memoryview(os.urandom(MIB))
    start = time.perf_counter()
    for offset in range(0, total, MIB):
        engine.write(offset, data)
    engine.flush()
    elapsed = time.perf_counter() - start
    os.close(fd)
    return total / elapsed / 1e6


def prepared(size: int) -> tuple[int, EncryptedFile]:
    """A file of ``size`` bytes, fsync'd, opened again by a new engine."""
    fd = fresh("existing")
    engine = EncryptedFile.open(fd, key_provider=PROVIDER, key_id="k")
    block = os.urandom(4 * MIB)
    for offset in range(0, size, len(block)):
        engine.write(offset, block)
    engine.fsync()
    engine.close()
    return fd, EncryptedFile.open(fd, key_provider=PROVIDER)


def random_writes(size: int = 64 * MIB, ops: int = 20000) -> float:
    fd, engine = prepared(size)
    rng = random.Random(1)
    data = os.urandom(4096)
    offsets = [rng.randrange(size // 4096) * 4096 for _ in range(ops)]
    start = time.perf_counter()
    for offset in offsets:
        engine.write(offset, data)
    engine.flush()
    elapsed = time.perf_counter() - start
    os.close(fd)
    return ops / elapsed


def appends(ops: int = 20000, step: int = 100, real_fsync: bool = False) -> float:
    fd, engine = prepared(MIB)
    data = os.urandom(step)
    offset = engine.size
    mark = getattr(engine, "mark_durable", None)  # (older engines have none)
    start = time.perf_counter()
    for _ in range(ops):
        engine.write(offset, data)
        offset += step
        if real_fsync:
            engine.fsync()
        else:
            engine.flush()
            if mark is not None:
                mark(engine.size)
    elapsed = time.perf_counter() - start
    os.close(fd)
    return ops / elapsed


RUNS = {
    "seq": sequential,
    "rand": random_writes,
    "append": appends,
    "append-fsync": lambda: appends(ops=2000, real_fsync=True),
}

if __name__ == "__main__":
    for name in sys.argv[2:] or list(RUNS):
        values = [RUNS[name]() for _ in range(5)]
        shown = ", ".join(f"{value:,.0f}" for value in values)
        print(f"{name:14s} median {statistics.median(values):12,.0f}   ({shown})")
