#!/usr/bin/env python3
"""Issue 18's figures: ``kmsfs rewrap`` rate and ``kmsfs import``/``export`` against the
same work through a mount, in one run, side by side.

    .venv/bin/python scripts/bench_rewrap.py                      # 100,000 + 10,000 files
    .venv/bin/python scripts/bench_rewrap.py --rewrap-files 20000 --workers 1,2,4
    .venv/bin/python scripts/bench_rewrap.py --only transfer --repeat 3

Everything lives under one fresh directory (``--base``, default under /var/tmp: the same
disk as the cipher directories), with its own keyd; all of it is stopped, unmounted and
removed at the end, also on failure. Each figure is the wall time of the ``kmsfs``
command (its start-up included) or of ``cp -a``; medians over ``--repeat`` runs.

- rewrap: a tree of N small files (1-3,000 bytes, 100 per directory) is imported
  offline, then rewrapped back and forth between two CMKs, once per worker count.
- transfer: a tree of M small files; ``cp -a SRC MNT/`` into a fresh mount (then
  ``sync``, as import ends with a syncfs) against ``kmsfs import SRC CIPHERDIR`` into a
  fresh cipher directory; ``cp -a MNT/SRC OUT`` out of the mount against ``kmsfs export``.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent
KMSFS = [str(HERE / ".venv" / "bin" / "kmsfs")]


def log(message: str) -> None:
    print(f"bench_rewrap: {message}", file=sys.stderr, flush=True)


def run(args: Sequence[str], **kwargs) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(list(args), capture_output=True, text=True, **kwargs)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed ({result.returncode}): {result.stderr}")
    return result


def timed(args: Sequence[str]) -> float:
    started = time.perf_counter()
    run(args)
    return time.perf_counter() - started


def make_tree(root: Path, count: int, seed: int) -> None:
    rng = random.Random(seed)
    for number in range(count):
        path = root / f"d{number // 100:04d}" / f"f{number:06d}"
        if number % 100 == 0:
            path.parent.mkdir(parents=True)
        path.write_bytes(rng.randbytes(rng.randrange(1, 3000)))


class Setup:
    def __init__(self, base: Path) -> None:
        self.base = base
        self.socket = base / "keyd.sock"
        self.keyd: subprocess.Popen[bytes] | None = None
        self.mounts: list[tuple[Path, subprocess.Popen[bytes]]] = []

    def kmsfs(self, *args: str) -> list[str]:
        return [*KMSFS, *args, "--keyd-socket", str(self.socket)]

    def start_keyd(self) -> None:
        keystore, root_key = self.base / "keystore", self.base / "root.key"
        run([*KMSFS, "keyd", "init", "--keystore", str(keystore), "--root-key-file", str(root_key)])
        with open(self.base / "keyd.log", "ab") as keyd_log:
            self.keyd = subprocess.Popen(
                [*KMSFS, "keyd", "serve", "--keystore", str(keystore)]
                + ["--root-key-file", str(root_key), "--socket", str(self.socket)],
                stdout=keyd_log,
                stderr=keyd_log,
                stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + 30
        while not self.socket.exists():
            if self.keyd.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("keyd did not start: see " + str(self.base / "keyd.log"))
            time.sleep(0.05)
        for alias in ("alias/a", "alias/b"):
            run(self.kmsfs("keys", "create", "--alias", alias))

    def init(self, name: str) -> Path:
        cipher = self.base / name
        run(self.kmsfs("init", str(cipher), "--key", "alias/a"))
        return cipher

    def mount(self, cipher: Path, mnt: Path) -> None:
        mnt.mkdir(exist_ok=True)
        with open(self.base / f"{mnt.name}.log", "ab") as mount_log:
            process = subprocess.Popen(
                self.kmsfs("mount", "-f", str(cipher), str(mnt)),
                stdout=mount_log,
                stderr=mount_log,
                stdin=subprocess.DEVNULL,
            )
        self.mounts.append((mnt, process))
        deadline = time.monotonic() + 30
        while not os.path.ismount(mnt):
            if process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"mount of {cipher} failed")
            time.sleep(0.05)

    def unmount(self, mnt: Path) -> None:
        for point, process in list(self.mounts):
            if point == mnt:
                subprocess.run(["fusermount3", "-u", str(point)], capture_output=True)
                if os.path.ismount(point):
                    subprocess.run(["fusermount3", "-uz", str(point)], capture_output=True)
                process.wait(timeout=60)
                self.mounts.remove((point, process))

    def close(self) -> None:
        for mnt, _process in list(self.mounts):
            self.unmount(mnt)
        if self.keyd is not None:
            self.keyd.terminate()
            self.keyd.wait(timeout=30)


def bench_rewrap(setup: Setup, files: int, workers: list[int], repeat: int) -> list[str]:
    source = setup.base / "rewrap-src"
    log(f"making {files} files")
    make_tree(source, files, seed=1)
    cipher = setup.init("rewrap-cipher")
    log("importing them")
    seconds = timed(setup.kmsfs("import", str(source), str(cipher), "--workers", "4", "-q"))
    shutil.rmtree(source)
    lines = [f"import of {files} files for the rewrap test: {seconds:.1f} s, "
             f"{files / seconds:,.0f} files/s (4 workers)"]  # fmt: skip
    target = "alias/b"
    for count in workers:
        rates = []
        for _ in range(repeat):
            log(f"rewrap to {target}, {count} worker(s)")
            run(["sync"])
            seconds = timed(
                setup.kmsfs(
                    "rewrap", str(cipher), "--to-key", target, "--workers", str(count), "-q"
                )
            )
            rates.append(files / seconds)
            target = "alias/a" if target == "alias/b" else "alias/b"
        lines.append(
            f"rewrap {files} files, {count} worker(s): {statistics.median(rates):,.0f} files/s "
            f"(runs: {', '.join(f'{rate:,.0f}' for rate in rates)})"
        )
    return lines


def bench_transfer(setup: Setup, files: int, repeat: int) -> list[str]:
    source = setup.base / "src"
    log(f"making {files} files")
    make_tree(source, files, seed=2)
    rows: dict[str, list[float]] = {"cp -a in": [], "import": [], "cp -a out": [], "export": []}
    for round_number in range(repeat):
        run(["sync"])
        cipher_mnt = setup.init(f"mnt-cipher{round_number}")
        mnt = setup.base / f"mnt{round_number}"
        setup.mount(cipher_mnt, mnt)
        log("cp -a SRC MNT/")
        started = time.perf_counter()
        run(["cp", "-a", str(source), str(mnt) + "/"])
        run(["sync"])
        rows["cp -a in"].append(time.perf_counter() - started)
        out = setup.base / f"out-cp{round_number}"
        setup.unmount(mnt)
        setup.mount(cipher_mnt, mnt)  # cold: nothing cached in the mount
        log("cp -a MNT/SRC OUT")
        started = time.perf_counter()
        run(["cp", "-a", str(mnt / "src"), str(out)])
        run(["sync"])
        rows["cp -a out"].append(time.perf_counter() - started)
        setup.unmount(mnt)

        run(["sync"])
        cipher = setup.init(f"imp-cipher{round_number}")
        log("kmsfs import SRC CIPHERDIR")
        rows["import"].append(timed(setup.kmsfs("import", str(source), str(cipher), "-q")))
        out = setup.base / f"out-export{round_number}"
        log("kmsfs export CIPHERDIR OUT")
        rows["export"].append(timed(setup.kmsfs("export", str(cipher), str(out), "-q")))
        subprocess.run(["diff", "-r", str(source), str(out)], check=True, capture_output=True)
    median = {name: statistics.median(values) for name, values in rows.items()}
    lines = [
        f"{name:>10}: {median[name]:6.2f} s  ({files / median[name]:,.0f} files/s; runs "
        f"{', '.join(f'{value:.2f}' for value in values)})"
        for name, values in rows.items()
    ]
    lines.append(f"import is {median['cp -a in'] / median['import']:.2f}x cp -a through the mount")
    lines.append(f"export is {median['cp -a out'] / median['export']:.2f}x cp -a out of the mount")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rewrap-files", type=int, default=100_000)
    parser.add_argument("--transfer-files", type=int, default=10_000)
    parser.add_argument("--workers", default="1,4", help="worker counts for rewrap")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--only", choices=["rewrap", "transfer"])
    parser.add_argument("--base", default="/var/tmp")
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="bench-rewrap-", dir=args.base))
    setup = Setup(base)
    lines: list[str] = []
    try:
        setup.start_keyd()
        if args.only in (None, "transfer"):
            lines += bench_transfer(setup, args.transfer_files, args.repeat)
        if args.only in (None, "rewrap"):
            workers = [int(value) for value in args.workers.split(",")]
            lines += bench_rewrap(setup, args.rewrap_files, workers, args.repeat)
    finally:
        setup.close()
        shutil.rmtree(base, ignore_errors=True)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
