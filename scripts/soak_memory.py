"""The mount's memory across rounds of a many-process create/delete load (see scripts/soak-memory).

Sets up, under a fresh directory in /tmp: a keyd, a cipher directory and a mount
(``kmsfs mount -f``). Each round, ``--procs`` processes each run ``--ops`` random
operations in their own directory (create files of 0-150 kB, mkdir, rename across
directories, set xattrs, unlink, symlink, read, stat); then ``rm -rf``, sync,
``drop_caches`` (so the kernel forgets every inode), ``--idle`` seconds idle and
``drop_caches`` again. Prints the mount's RSS (``/proc/PID/status`` VmRSS) at the end of
each round's load and after the idle time, and the mount's own memory report (SIGUSR1:
its per-file structures' sizes). Everything is unmounted, stopped and removed at the end,
also after Ctrl-C or any failure (keyd and the mount run in their own sessions, so a
terminal's Ctrl-C reaches only this script and its load processes; they are stopped first).

``--no-lock`` runs the mount without CAP_IPC_LOCK and with RLIMIT_MEMLOCK 0 (so it does
not lock its memory); ``--trace`` sets PYTHONTRACEMALLOC=1 in the mount (slower; its
report then has Python's traced bytes and the top allocation sites). Needs root.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from multiprocessing import Process
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
KMSFS = [sys.executable, "-m", "kmsfs.cli"]
NO_LOCK = ("prlimit", "--memlock=0:0", "setpriv", "--inh-caps=-ipc_lock",
           "--bounding-set=-ipc_lock", "--")  # fmt: skip


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def load(root: Path, seed: int, ops: int) -> None:
    """One process's random operations in ``root/w<seed>``."""
    rnd = random.Random(seed)
    base = root / f"w{seed}"
    base.mkdir()
    dirs, files = [base], []
    for i in range(ops):
        op = rnd.random()
        try:
            if op < 0.45:
                path = rnd.choice(dirs) / f"f{i}"
                path.write_bytes(os.urandom(rnd.choice([0, 100, 4096, 20000, 70000, 150000])))
                files.append(path)
            elif op < 0.55:
                directory = rnd.choice(dirs) / f"d{i}"
                directory.mkdir()
                dirs.append(directory)
            elif op < 0.65 and files:
                index = rnd.randrange(len(files))
                target = rnd.choice(dirs) / f"r{i}"
                os.rename(files[index], target)
                files[index] = target
            elif op < 0.72 and files:
                os.setxattr(rnd.choice(files), b"user.t", os.urandom(rnd.randint(1, 200)))
            elif op < 0.80 and files:
                os.unlink(files.pop(rnd.randrange(len(files))))
            elif op < 0.85:
                os.symlink("target", rnd.choice(dirs) / f"s{i}")
            elif op < 0.90 and files:
                rnd.choice(files).read_bytes()
            elif files:
                os.stat(rnd.choice(files))
        except OSError as error:
            print(f"operation failed: {error}", file=sys.stderr)


def memory_line(mount: subprocess.Popen[bytes], log_path: Path) -> str:
    seen = log_path.read_text().count(" memory: ")
    mount.send_signal(signal.SIGUSR1)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        lines = [line for line in log_path.read_text().splitlines() if " memory: " in line]
        if len(lines) > seen:
            return lines[-1].split(" memory: ", 1)[1]
        time.sleep(0.05)
    return "(no report)"


def drop_caches() -> None:
    subprocess.run(["sync"], check=True)
    Path("/proc/sys/vm/drop_caches").write_text("2\n")


def is_mounted(path: Path) -> bool:
    with open("/proc/self/mountinfo") as info:
        return any(line.split()[4] == str(path) for line in info)


def stop(process: subprocess.Popen[bytes], timeout: float) -> None:
    """Wait for ``process`` to end; SIGTERM, then SIGKILL, past ``timeout``."""
    for send in (None, process.terminate, process.kill):
        if send is not None:
            send()
        try:
            process.wait(timeout)
            return
        except subprocess.TimeoutExpired:
            continue


def clean_up(
    base: Path,
    mnt: Path,
    workers: list[Process],
    mount: subprocess.Popen[bytes] | None,
    keyd: subprocess.Popen[bytes] | None,
) -> None:
    """Stop the load, unmount, stop the mount and keyd, remove ``base``: whatever state
    the run is in. A second Ctrl-C does not interrupt it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for worker in workers:
        if worker.is_alive():
            worker.kill()
        worker.join(15)
    if is_mounted(mnt):
        result = subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True)
        if result.returncode != 0 and is_mounted(mnt):
            print(f"unmounting {mnt}: {result.stderr.decode().strip()}; lazily", file=sys.stderr)
            subprocess.run(["fusermount3", "-uz", str(mnt)], check=False)
    if mount is not None:
        stop(mount, 30)
    if is_mounted(mnt):  # the mount process died without its kernel mount going
        subprocess.run(["fusermount3", "-uz", str(mnt)], check=False)
    if keyd is not None:
        stop(keyd, 15)
    shutil.rmtree(base, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--procs", type=int, default=4)
    parser.add_argument("--ops", type=int, default=5000, help="operations per process")
    parser.add_argument("--idle", type=float, default=10.0, help="seconds idle after rm -rf")
    parser.add_argument("--no-lock", action="store_true")
    parser.add_argument("--trace", action="store_true")
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="soak-", dir="/tmp"))
    env = {
        **os.environ,
        "KMSFS_KEYD_SOCKET": str(base / "s.sock"),
        "KMSFS_KEYSTORE": str(base / "ks"),
        "PYTHONPATH": str(REPO),
    }
    mount_env = {**env, **({"PYTHONTRACEMALLOC": "1"} if args.trace else {})}
    mnt, log_path = base / "mnt", base / "mount.log"
    mnt.mkdir()
    print(f"working in {base}", flush=True)
    keyd = mount = None
    workers: list[Process] = []
    try:
        keystore = ["--keystore", str(base / "ks")]
        root_key = ["--root-key-file", str(base / "rk")]

        def kmsfs(*command: str) -> None:
            subprocess.run([*KMSFS, *command], check=True, env=env, capture_output=True)

        kmsfs("keyd", "init", *keystore, *root_key)
        with open(base / "keyd.log", "wb") as keyd_log:
            keyd = subprocess.Popen(
                [*KMSFS, "keyd", "serve", *keystore, "--socket", str(base / "s.sock"), *root_key],
                env=env, stdout=keyd_log, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        while not (base / "s.sock").exists():
            if keyd.poll() is not None:
                raise SystemExit((base / "keyd.log").read_text())
            time.sleep(0.05)
        kmsfs("keys", "create", "--alias", "alias/soak")
        kmsfs("init", str(base / "c"), "--key", "alias/soak")
        wrapper = NO_LOCK if args.no_lock else ()
        with open(log_path, "wb") as mount_log:
            mount = subprocess.Popen(
                [*wrapper, *KMSFS, "mount", "-f", str(base / "c"), str(mnt)],
                env=mount_env, stdout=mount_log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        while not os.path.ismount(mnt):
            if mount.poll() is not None:
                raise SystemExit(log_path.read_text())
            time.sleep(0.05)
        print(f"round 0 (just mounted): RSS {rss_mib(mount.pid):.1f} MiB", flush=True)
        for round_number in range(1, args.rounds + 1):
            work = mnt / f"round{round_number}"
            work.mkdir()
            started = time.monotonic()
            workers += [
                Process(target=load, args=(work, round_number * 100 + i, args.ops))
                for i in range(args.procs)
            ]
            for worker in workers[-args.procs :]:
                worker.start()
            for worker in workers:
                worker.join()
            workers.clear()
            entries = sum(len(f) + len(d) for _, d, f in os.walk(work))
            loaded = rss_mib(mount.pid)
            subprocess.run(["rm", "-rf", str(work)], check=True)
            drop_caches()
            time.sleep(args.idle)
            drop_caches()
            time.sleep(1)
            print(
                f"round {round_number}: {entries} entries, {time.monotonic() - started:.0f} s; "
                f"RSS after the load {loaded:.1f} MiB, after rm -rf + drop_caches + "
                f"{args.idle:g} s idle {rss_mib(mount.pid):.1f} MiB\n"
                f"  mount's report: {memory_line(mount, log_path)}",
                flush=True,
            )
    except KeyboardInterrupt:
        print("interrupted: cleaning up", file=sys.stderr, flush=True)
        raise SystemExit(130) from None
    finally:
        clean_up(base, mnt, workers, mount, keyd)


if __name__ == "__main__":
    main()
