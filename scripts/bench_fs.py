"""kmsfs against gocryptfs, a null FUSE filesystem and a plain directory (see scripts/bench).

Sets up, under one fresh directory on the same disk: a keyd and a kmsfs mount, a
gocryptfs mount, a null pyfuse3 filesystem (scripts/nullfs.py: a passthrough with
kmsfs's FUSE settings and no encryption, the ceiling of a Python FUSE filesystem) and a
plain directory. Runs every workload on the four in turn (the order rotates each
repetition), prints progress on stderr, then a table of medians with their spread
(min-max over the repetitions) and kmsfs's ratio to gocryptfs, to the null filesystem
and to the plain directory (> 1 always means kmsfs is better), and writes the same, with
every run's value, to a JSON file. Everything it started is unmounted, stopped and
removed at the end, also on failure or Ctrl-C.

Workloads (--only takes these names, comma-separated):
  seq        dd 1 MiB and 4 KiB sequential write (conv=fsync), cold and warm 1 MiB read;
             CPU seconds of the mount process per GiB during each of them
  randread   fio random 4 KiB reads on a 256 MiB file, psync, buffered, 1 and 4 jobs; and
             1 job with O_DIRECT (every read reaches the daemon: no page cache at all)
  randwrite  fio random 4 KiB writes, same
  small      untar a tarball of the Python standard library (copies of it up to ~10k
             files; no site-packages, __pycache__, config-*, lib-dynload), ls -lR,
             read every file, rm -rf
  keyd       GenerateDataKey and Decrypt round trips per second, 1 and 8 clients (kmsfs only)
  scale      only when asked for (--only scale): how costs grow with the work, on kmsfs and
             gocryptfs (--scale-systems): untar of the same stdlib tree cut to 10,000 and
             100,000 files (time per file at each, and their ratio); one directory of
             100,000 empty files (create, ls -l and the stat of a missing name, first and
             second time); a 20 GiB file written and read sequentially (MiB/s of its first
             and last GiB); and, on a kmsfs mount of its own whose tree kmsfs import made
             offline, the mount's VmRSS after stat-ing 1,000,000 files, after drop_caches,
             and with 10,000 files open. --scale-* options set the sizes (--quick: 2,000 and
             20,000 files, 20,000 entries, 100,000 stats, 2,000 open, 2 GiB); 1 repetition.

--aws-provider adds a fourth system, kmsfs-aws: a second kmsfs mount whose key service
is ``aws`` (botocore, SigV4) pointed at this run's keyd over loopback TCP
(``keyd serve --listen``), and a column "kmsfs-aws vs kmsfs" (> 1: the aws provider is
better).

--audit-opens adds kmsfs-audit: a second kmsfs mount (same keyd) with ``--audit-opens``,
and a column "kmsfs-audit vs kmsfs" (> 1: auditing made it faster; < 0.9: more than
10% slower). --bound adds kmsfs-bound: a kmsfs mount whose root is bound to a CMK of its
own (``kmsfs key set --cipherdir CIPHER / KEY`` before mounting: every name and data key
under the binding's), and a column "kmsfs-bound vs kmsfs".

Full run (default): 1 GiB sequential, fio 20 s (plain directory 3 s), keyd 1.5 s,
~10k files, 3 repetitions: about 14 minutes without the null filesystem, so about 18
with it (estimated, not timed). --quick: 256 MiB, fio 5 s (plain 2 s), keyd 1 s, one copy
of the stdlib, 1 repetition: about 2 minutes with it (3 repetitions took 391 s). Every
figure is the median over the repetitions, shown with the min-max spread of the runs;
all runs are in the JSON.
"""

from __future__ import annotations

import argparse
import base64
import importlib
import json
import os
import platform
import re
import resource
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

SCRIPTS = Path(__file__).resolve().parent
REPO = SCRIPTS.parent
#: null: scripts/nullfs.py, a pyfuse3 + trio passthrough without encryption (the FUSE ceiling)
SYSTEMS = ["kmsfs", "gocryptfs", "null", "plain"]  # + "kmsfs-aws" with --aws-provider
AWS_SYSTEM = "kmsfs-aws"
AUDIT_SYSTEM = "kmsfs-audit"
BOUND_SYSTEM = "kmsfs-bound"
#: variants of kmsfs compared with the plain kmsfs mount in a column of their own
VARIANTS = (AWS_SYSTEM, AUDIT_SYSTEM, BOUND_SYSTEM)
WORKLOADS = ("seq", "randread", "randwrite", "small", "keyd", "scale")
#: what runs without --only (scale takes far longer than the rest: ask for it by name)
DEFAULT_WORKLOADS = ("seq", "randread", "randwrite", "small", "keyd")
READ_AHEAD_KB = 1024
#: the share of the dirty-page limit kmsfs's mount gives itself (--max-dirty-ratio's
#: default); the bench gives gocryptfs the same, as it gives both the same read-ahead
MAX_DIRTY_RATIO = 5
MIB = 1 << 20
GIB = 1 << 30

T0 = time.monotonic()

NOTES = [
    "MB/s = 10^6 bytes/s as reported by dd; writes are from /dev/zero with conv=fsync "
    "(the fsync is timed); before each timed step everything is synced",
    "cold read: sync + drop_caches first; warm read: the same file read again at once",
    "mount CPU: user+sys of the mount process (kmsfs mount -f / gocryptfs -fg) "
    "per GiB moved, from /proc/PID/stat; kernel work in the caller is not in it",
    "fio: psync, buffered (--direct=0); on the FUSE mounts --invalidate=1 (fio's default) "
    "drops the test file's page cache at the mount at the start of each run while the "
    "backing file stays cached; the plain directory is the page-cache reference "
    "(--invalidate=0, file read in first, shorter runs); the O_DIRECT row: --direct=1, "
    "every read a request to the daemon (kmsfs and gocryptfs only)",
    "small files: caches dropped before ls -lR and read-all (find -type f -exec cat); "
    "untar and rm -rf are timed without a trailing sync; file names encrypted on both",
    "keyd: scripts/bench_keyd.measure() on the mount's own keyd while the mount is idle",
    "null: scripts/nullfs.py, a pyfuse3 + trio passthrough with kmsfs's FUSE settings "
    "(writeback cache, 1 s entry/attr timeouts) and no encryption: one pread/pwrite per "
    "request, no read-ahead of its own; its backing dir is on the same disk",
    "table cells: median (min–max) over the repetitions; every run is in the JSON",
]
#: printed only when the scale workload ran
SCALE_NOTES = [
    "scale untar: the same stdlib tarball cut to each size, timed with a syncfs of the "
    "mount (sync -f); the growth row is per-file time at the larger size ÷ at the smaller",
    "scale dir: empty files created through the mount; caches dropped before the first "
    "ls -l; the missing-name stat is one lstat() timed in the bench process",
    "scale RSS: VmRSS of the kmsfs mount process of a cipherdir filled offline by kmsfs "
    "import (empty files in directories of 1000, and small files to hold open)",
    "scale big file: 1 MiB write()s with fdatasync at each segment's end; read after "
    "drop_caches; rates of the first and last segment in MiB/s (every segment in the JSON)",
]


def log(message: str) -> None:
    print(f"[{time.monotonic() - T0:6.1f}s] {message}", file=sys.stderr, flush=True)


class BenchError(Exception):
    """A step of the benchmark failed; the message says which and why."""


def run(cmd: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """Run a command; raise BenchError with its stderr if it fails."""
    kwargs.setdefault("stdout", subprocess.PIPE)
    kwargs.setdefault("stderr", subprocess.PIPE)
    proc = subprocess.run(list(cmd), text=True, **kwargs)
    if proc.returncode != 0:
        tail = (proc.stderr or "").strip().splitlines()[-5:]
        raise BenchError(f"{' '.join(cmd)} exited {proc.returncode}: {' | '.join(tail)}")
    return proc


def timed(cmd: Sequence[str] | str, shell: bool = False) -> float:
    """Wall-clock seconds of one command (stdout to /dev/null unless the shell redirects)."""
    start = time.perf_counter()
    proc = subprocess.run(
        cmd, shell=shell, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-5:]
        raise BenchError(f"{cmd} exited {proc.returncode}: {' | '.join(tail)}")
    return elapsed


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


# --- processes and mounts -------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """user+sys CPU seconds of a process, its threads and its live descendants."""
    tick = os.sysconf("SC_CLK_TCK")
    children: dict[int, list[int]] = {}
    stats: dict[int, list[str]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            text = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2 :].split()
        stats[int(entry)] = fields
        children.setdefault(int(fields[1]), []).append(int(entry))
    total = 0.0
    todo = [pid]
    while todo:
        current = todo.pop()
        if current in stats:
            fields = stats[current]
            total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
        todo.extend(children.get(current, []))
    return total


def mounted_under(base: Path) -> list[str]:
    found = []
    for line in Path("/proc/mounts").read_text().splitlines():
        target = line.split()[1].replace("\\040", " ")
        if target == str(base) or target.startswith(str(base) + "/"):
            found.append(target)
    return found


def tune_bdi(mountpoint: Path) -> dict[str, Any]:
    """The same read-ahead and dirty-page budget on both FUSE mounts (kmsfs sets its own)."""
    dev = os.stat(mountpoint).st_dev
    bdi = Path(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}")
    report: dict[str, Any] = {"bdi": bdi.name}
    for name, value in (("read_ahead_kb", READ_AHEAD_KB), ("max_ratio", MAX_DIRTY_RATIO)):
        report[f"{name}_before"] = int((bdi / name).read_text())
        (bdi / name).write_text(f"{value}\n")
        report[name] = int((bdi / name).read_text())
    return report


def start_logged(
    cmd: Sequence[str], log_path: Path, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """Start a daemon with its output in ``log_path``, in its own session: Ctrl-C reaches
    only us, and we stop what we started in order."""
    with open(log_path, "wb") as log_file:
        return subprocess.Popen(
            list(cmd), stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True, env=env
        )


def wait_for_mount(mountpoint: Path, proc: subprocess.Popen[bytes], what: str, log_path: Path):
    deadline = time.monotonic() + 60
    while not os.path.ismount(mountpoint):
        if proc.poll() is not None:
            raise BenchError(f"{what} exited {proc.returncode} before mounting: {tail(log_path)}")
        if time.monotonic() > deadline:
            raise BenchError(f"{what} did not mount within 60 s: {tail(log_path)}")
        time.sleep(0.05)


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def tail(path: Path, lines: int = 8) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(text[-lines:])


def stop_process(proc: subprocess.Popen[bytes] | None, what: str) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        log(f"{what} (pid {proc.pid}) ignored SIGTERM for 15 s; killing it")
        proc.kill()
        proc.wait(timeout=10)


def unmount(mountpoint: Path, proc: subprocess.Popen[bytes] | None, what: str) -> None:
    """Unmount (retrying while busy), then wait for the mount process to exit."""
    for attempt in range(10):
        if not os.path.ismount(mountpoint):
            break
        result = subprocess.run(
            ["fusermount3", "-u", str(mountpoint)], capture_output=True, text=True
        )
        if result.returncode == 0:
            break
        if attempt == 9:
            log(f"{what}: fusermount3 -u failed ({result.stderr.strip()}); lazy unmount")
            subprocess.run(["fusermount3", "-uz", str(mountpoint)], capture_output=True)
        time.sleep(0.5)
    if proc is not None and proc.poll() is None:
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            log(f"{what} (pid {proc.pid}) still running 15 s after unmount; stopping it")
            stop_process(proc, what)


@dataclass
class System:
    name: str
    root: Path  # where workloads read and write: a mountpoint or the plain directory
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None

    def cpu(self) -> float | None:
        return None if self.proc is None else cpu_seconds(self.proc.pid)

    def check(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is not None:
            raise BenchError(
                f"{self.name} mount process exited {self.proc.returncode}: "
                f"{tail(self.log_path) if self.log_path else ''}"
            )
        if not os.path.ismount(self.root):
            raise BenchError(f"{self.name} is no longer mounted on {self.root}")


@dataclass
class Rig:
    """Everything started for the run; close() undoes it all."""

    base: Path
    kmsfs_bin: str
    systems: dict[str, System] = field(default_factory=dict)
    keyd: subprocess.Popen[bytes] | None = None
    keyd_socket: Path | None = None
    key_alias: str = "alias/bench"
    bdi: dict[str, Any] = field(default_factory=dict)
    #: keyd's TCP listener and the access key of the aws provider's mount (--aws-provider)
    tcp_port: int | None = None
    aws_env: dict[str, str] = field(default_factory=dict)

    def start_keyd(self) -> None:
        keyd_dir = self.base / "keyd"
        keyd_dir.mkdir(mode=0o700)
        keystore, root_key = keyd_dir / "keystore", keyd_dir / "root.key"
        self.keyd_socket = keyd_dir / "keyd.sock"
        run(
            [self.kmsfs_bin, "keyd", "init", "--keystore", str(keystore)]
            + ["--root-key-file", str(root_key)]
        )
        listen: list[str] = []
        if self.tcp_port is not None:
            created = run(
                [self.kmsfs_bin, "keyd", "credentials", "create", "--user", "bench", "--json"]
                + ["--keystore", str(keystore), "--root-key-file", str(root_key)]
            )
            access_key = json.loads(created.stdout)["AccessKey"]
            self.aws_env = {
                "AWS_ACCESS_KEY_ID": access_key["AccessKeyId"],
                "AWS_SECRET_ACCESS_KEY": access_key["SecretAccessKey"],
                "AWS_CONFIG_FILE": "/dev/null",
                "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
                "AWS_EC2_METADATA_DISABLED": "true",
            }
            listen = ["--listen", f"127.0.0.1:{self.tcp_port}"]
        log_path = keyd_dir / "keyd.log"
        self.keyd = start_logged(
            [self.kmsfs_bin, "keyd", "serve", "--keystore", str(keystore)]
            + ["--root-key-file", str(root_key), "--socket", str(self.keyd_socket)]
            + listen,
            log_path,
        )
        deadline = time.monotonic() + 30
        while not self.keyd_socket.exists():
            if self.keyd.poll() is not None or time.monotonic() > deadline:
                raise BenchError(f"keyd did not start: {tail(log_path)}")
            time.sleep(0.05)
        run(
            [self.kmsfs_bin, "keys", "create", "--alias", self.key_alias]
            + ["--keyd-socket", str(self.keyd_socket), "--description", "scripts/bench"]
        )

    def start_kmsfs(
        self,
        name: str = "kmsfs",
        *extra: str,
        bind_root: bool = False,
        before_mount: Callable[[Path], None] | None = None,
    ) -> None:
        """A kmsfs mount of a new cipherdir; ``before_mount(cipherdir)`` runs between
        ``kmsfs init`` and the mount (the scale workload imports its tree there)."""
        assert self.keyd_socket is not None
        socket_args = ["--keyd-socket", str(self.keyd_socket)]
        cipher, mnt = self.base / f"{name}.cipher", self.base / f"{name}.mnt"
        cipher.mkdir()
        mnt.mkdir()
        run([self.kmsfs_bin, "init", str(cipher), "--key", self.key_alias] + socket_args)
        if bind_root:  # the root bound to a second CMK (issue 17's per-directory CMKs)
            alias = f"{self.key_alias}-bound"
            run(
                [self.kmsfs_bin, "keys", "create", "--alias", alias, "--description"]
                + ["scripts/bench --bound", *socket_args]
            )
            run(
                [self.kmsfs_bin, "key", "set", "--cipherdir", str(cipher), "/", alias, *socket_args]
            )
        if before_mount is not None:
            before_mount(cipher)
        log_path = self.base / f"{name}-mount.log"
        proc = start_logged(
            [self.kmsfs_bin, "mount", str(cipher), str(mnt), "-f"]
            + ["--keyd-socket", str(self.keyd_socket), *extra],
            log_path,
        )
        self.systems[name] = System(name, mnt, proc, log_path)
        wait_for_mount(mnt, proc, f"{name} mount", log_path)
        self.bdi[name] = tune_bdi(mnt)

    def start_kmsfs_aws(self) -> None:
        """kmsfs with the aws key service (botocore + SigV4) on this keyd's TCP listener;
        its CMK made over TCP by the access key's principal (the default key policy lets
        the creator use it)."""
        import botocore.session

        assert self.tcp_port is not None
        url = f"http://127.0.0.1:{self.tcp_port}"
        kms = botocore.session.Session().create_client(
            "kms",
            region_name="local",
            endpoint_url=url,
            aws_access_key_id=self.aws_env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=self.aws_env["AWS_SECRET_ACCESS_KEY"],
        )
        key_arn = kms.create_key(Description="scripts/bench --aws-provider")["KeyMetadata"]["Arn"]
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        env.update(self.aws_env)
        cipher, mnt = self.base / "kmsfs-aws.cipher", self.base / "kmsfs-aws.mnt"
        cipher.mkdir()
        mnt.mkdir()
        run(
            [self.kmsfs_bin, "init", str(cipher), "--key", key_arn, "--aws-endpoint-url", url],
            env=env,
        )
        log_path = self.base / "kmsfs-aws-mount.log"
        proc = start_logged(
            [self.kmsfs_bin, "mount", str(cipher), str(mnt), "-f", "--aws-endpoint-url", url],
            log_path,
            env=env,
        )
        self.systems[AWS_SYSTEM] = System(AWS_SYSTEM, mnt, proc, log_path)
        wait_for_mount(mnt, proc, "kmsfs mount (aws provider)", log_path)
        self.bdi[AWS_SYSTEM] = tune_bdi(mnt)

    def start_gocryptfs(self) -> None:
        cipher, mnt = self.base / "gocryptfs.cipher", self.base / "gocryptfs.mnt"
        cipher.mkdir()
        mnt.mkdir()
        passfile = self.base / "gocryptfs.pass"
        passfile.write_text("bench passphrase\n")
        passfile.chmod(0o600)
        run(["gocryptfs", "-init", "-q", "-passfile", str(passfile), str(cipher)])
        log_path = self.base / "gocryptfs.log"
        # -fg: we own the serving process (its pid gives the CPU figures)
        proc = start_logged(
            ["gocryptfs", "-fg", "-q", "-passfile", str(passfile), str(cipher), str(mnt)],
            log_path,
        )
        self.systems["gocryptfs"] = System("gocryptfs", mnt, proc, log_path)
        wait_for_mount(mnt, proc, "gocryptfs", log_path)
        self.bdi["gocryptfs"] = tune_bdi(mnt)

    def start_null(self) -> None:
        """scripts/nullfs.py on a backing directory of its own, tuned as the other mounts."""
        backing, mnt = self.base / "null.backing", self.base / "null.mnt"
        backing.mkdir()
        mnt.mkdir()
        log_path = self.base / "null-mount.log"
        proc = start_logged(
            [sys.executable, str(SCRIPTS / "nullfs.py"), str(backing), str(mnt)], log_path
        )
        self.systems["null"] = System("null", mnt, proc, log_path)
        wait_for_mount(mnt, proc, "null filesystem", log_path)
        self.bdi["null"] = tune_bdi(mnt)

    def start_plain(self) -> None:
        plain = self.base / "plain"
        plain.mkdir()
        self.systems["plain"] = System("plain", plain)
        dev = os.stat(plain).st_dev
        bdi = Path(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb")
        self.bdi["plain"] = {
            "bdi": bdi.parent.name,
            "read_ahead_kb": int(bdi.read_text()) if bdi.exists() else None,
            "note": "left as is (the backing disk's own)",
        }

    def close(self) -> None:
        for name in ("kmsfs", *VARIANTS, "gocryptfs", "null", SCALE_SYSTEM):
            system = self.systems.get(name)
            if system is not None:
                try:
                    unmount(system.root, system.proc, name)
                except Exception as error:  # keep cleaning up the rest
                    log(f"cleanup: unmounting {name} failed: {error}")
        stop_process(self.keyd, "keyd")
        left = mounted_under(self.base)
        if left:
            log(f"cleanup: still mounted, leaving {self.base} in place: {left}")
            return
        shutil.rmtree(self.base, ignore_errors=True)
        if self.base.exists():
            log(f"cleanup: could not remove {self.base} entirely")


# --- results ------------------------------------------------------------------------


@dataclass
class Metric:
    key: str
    label: str
    unit: str
    higher_is_better: bool
    runs: dict[str, list[float]] = field(default_factory=dict)

    def add(self, system: str, value: float) -> None:
        self.runs.setdefault(system, []).append(value)

    def median(self, system: str) -> float | None:
        values = self.runs.get(system)
        return statistics.median(values) if values else None

    def spread(self, system: str) -> dict[str, float] | None:
        """min, max and (max - min) / median of a system's repetitions (None without runs)."""
        values = self.runs.get(system)
        if not values:
            return None
        median = statistics.median(values)
        low, high = min(values), max(values)
        relative = (high - low) / median if median else 0.0
        return {"min": low, "max": high, "relative": relative}

    def ratio(self, other: str, mine_name: str = "kmsfs") -> float | None:
        """kmsfs (or ``mine_name``) against `other`, oriented so that > 1 means it is better."""
        mine, theirs = self.median(mine_name), self.median(other)
        if mine is None or theirs is None or mine == 0 or theirs == 0:
            return None
        return mine / theirs if self.higher_is_better else theirs / mine


class Results:
    def __init__(self) -> None:
        self.metrics: dict[str, Metric] = {}

    def metric(self, key: str, label: str, unit: str, higher_is_better: bool) -> Metric:
        if key not in self.metrics:
            self.metrics[key] = Metric(key, label, unit, higher_is_better)
        return self.metrics[key]

    def to_json(self) -> list[dict[str, Any]]:
        return [
            {
                "key": m.key,
                "workload": m.label,
                "unit": m.unit,
                "better": "higher" if m.higher_is_better else "lower",
                "runs": m.runs,
                "median": {s: m.median(s) for s in SYSTEMS if s in m.runs},
                "spread": {s: m.spread(s) for s in SYSTEMS if s in m.runs},
                "kmsfs_vs_gocryptfs": m.ratio("gocryptfs"),
                "kmsfs_vs_null": m.ratio("null"),
                "kmsfs_vs_plain": m.ratio("plain"),
                **{
                    f"{variant.replace('-', '_')}_vs_kmsfs": m.ratio("kmsfs", variant)
                    for variant in VARIANTS
                    if variant in SYSTEMS
                },
            }
            for m in self.metrics.values()
        ]


def fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if unit == "inodes":
        return f"{value:.0f}"
    if unit in ("s", "s/GiB", "×"):
        return f"{value:.2f}" if value < 100 else f"{value:.0f}"
    return f"{value:.0f}" if value >= 100 else f"{value:.1f}"


def fmt_runs(values: Sequence[float] | None, unit: str) -> str:
    """A table cell: the median, and with more than one run the spread, as
    ``median (min-max)``; ``-`` without runs."""
    if not values:
        return "-"
    median = fmt(statistics.median(values), unit)
    if len(values) == 1:
        return median
    return f"{median} ({fmt(min(values), unit)}–{fmt(max(values), unit)})"


def table(results: Results) -> str:
    variants = [variant for variant in VARIANTS if variant in SYSTEMS]
    head = ["workload", "unit", *SYSTEMS]
    head += ["kmsfs vs gocryptfs", "kmsfs vs null", "kmsfs vs plain"]
    head += [f"{variant} vs kmsfs" for variant in variants]
    rows = [head]
    for m in results.metrics.values():
        ratios = [m.ratio("gocryptfs"), m.ratio("null"), m.ratio("plain")]
        ratios += [m.ratio("kmsfs", variant) for variant in variants]
        rows.append(
            [m.label, m.unit]
            + [fmt_runs(m.runs.get(s), m.unit) for s in SYSTEMS]
            + ["-" if r is None else f"{r:.2f}×" for r in ratios]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    rows.insert(1, ["-" * w if i < 2 else "-" * (w - 1) + ":" for i, w in enumerate(widths)])
    lines = []
    for row in rows:
        cells = [
            c.ljust(w) if i < 2 else c.rjust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# --- workloads ----------------------------------------------------------------------


def order(systems: list[System], rep: int) -> list[System]:
    shift = rep % len(systems)
    return systems[shift:] + systems[:shift]


def dd_seconds(cmd: list[str], expect_bytes: int) -> float:
    proc = run(cmd)
    match = re.search(r"^(\d+) bytes .* copied, ([\d.e+-]+) s", proc.stderr, re.MULTILINE)
    if not match:
        raise BenchError(f"cannot parse dd output: {proc.stderr.strip()}")
    if int(match.group(1)) != expect_bytes:
        raise BenchError(f"{' '.join(cmd)} moved {match.group(1)} bytes, expected {expect_bytes}")
    return float(match.group(2))


def bench_seq(results: Results, systems: list[System], args: argparse.Namespace) -> None:
    size = args.size * MIB
    gib = size / GIB
    unit_label = f"{args.size} MiB" if args.size != 1024 else "1 GiB"
    w1m = results.metric("seq_write_1m", f"seq write {unit_label}, bs=1M", "MB/s", True)
    w4k = results.metric("seq_write_4k", f"seq write {unit_label}, bs=4k", "MB/s", True)
    rcold = results.metric("seq_read_cold", f"seq read {unit_label} cold, bs=1M", "MB/s", True)
    rwarm = results.metric("seq_read_warm", f"seq read {unit_label} warm, bs=1M", "MB/s", True)
    cw1m = results.metric("cpu_write_1m", "mount CPU, write bs=1M", "s/GiB", False)
    cw4k = results.metric("cpu_write_4k", "mount CPU, write bs=4k", "s/GiB", False)
    cr = results.metric("cpu_read_cold", "mount CPU, cold read bs=1M", "s/GiB", False)
    crw = results.metric("cpu_read_warm", "mount CPU, warm read bs=1M", "s/GiB", False)
    for rep in range(args.repeat):
        for system in order(systems, rep):
            system.check()
            path = system.root / "seq.dat"
            path.unlink(missing_ok=True)
            os.sync()
            cpu0 = system.cpu()
            seconds = dd_seconds(
                ["dd", "if=/dev/zero", f"of={path}", "bs=1M", f"count={args.size}", "conv=fsync"],
                size,
            )
            cpu1 = system.cpu()
            w1m.add(system.name, size / seconds / 1e6)
            drop_caches()
            cpu2 = system.cpu()
            cold = dd_seconds(["dd", f"if={path}", "of=/dev/null", "bs=1M"], size)
            cpu3 = system.cpu()
            rcold.add(system.name, size / cold / 1e6)
            warm = dd_seconds(["dd", f"if={path}", "of=/dev/null", "bs=1M"], size)
            cpu_warm = system.cpu()
            rwarm.add(system.name, size / warm / 1e6)
            path.unlink()
            os.sync()
            cpu4 = system.cpu()
            seconds4k = dd_seconds(
                ["dd", "if=/dev/zero", f"of={path}", "bs=4k", f"count={args.size * 256}"]
                + ["conv=fsync"],
                size,
            )
            cpu5 = system.cpu()
            w4k.add(system.name, size / seconds4k / 1e6)
            path.unlink()
            cpu_note = ""
            if cpu0 is not None:
                assert cpu1 is not None and cpu2 is not None and cpu3 is not None
                assert cpu4 is not None and cpu5 is not None and cpu_warm is not None
                cw1m.add(system.name, (cpu1 - cpu0) / gib)
                cr.add(system.name, (cpu3 - cpu2) / gib)
                crw.add(system.name, (cpu_warm - cpu3) / gib)
                cw4k.add(system.name, (cpu5 - cpu4) / gib)
                cpu_note = (
                    f"; mount CPU s/GiB write {(cpu1 - cpu0) / gib:.2f}, "
                    f"cold read {(cpu3 - cpu2) / gib:.2f}, "
                    f"warm read {(cpu_warm - cpu3) / gib:.2f}, write 4k {(cpu5 - cpu4) / gib:.2f}"
                )
            log(
                f"seq {rep + 1}/{args.repeat} {system.name}: write 1M {size / seconds / 1e6:.0f}, "
                f"cold read {size / cold / 1e6:.0f}, warm read {size / warm / 1e6:.0f}, "
                f"write 4k {size / seconds4k / 1e6:.0f} MB/s{cpu_note}"
            )


def fio_iops(
    path: Path,
    rw: str,
    jobs: int,
    seconds: int,
    size_mib: int,
    invalidate: bool,
    direct: bool = False,
) -> float:
    cmd = [
        "fio",
        f"--name={rw}",
        f"--filename={path}",
        f"--size={size_mib}M",
        f"--rw={rw}",
        "--bs=4k",
        "--ioengine=psync",
        f"--direct={int(direct)}",
        f"--numjobs={jobs}",
        "--group_reporting",
        "--time_based",
        f"--runtime={seconds}",
        f"--invalidate={int(invalidate)}",
        "--output-format=json",
    ]
    proc = run(cmd)
    text = proc.stdout
    try:
        report = json.loads(text[text.index("{") :])
    except ValueError as error:
        raise BenchError(f"cannot parse fio output: {error}: {text[:300]!r}") from error
    job = report["jobs"][0]
    if job.get("error"):
        raise BenchError(f"fio {rw} on {path} reported error {job['error']}")
    direction = "read" if rw == "randread" else "write"
    return float(job[direction]["iops"])


def bench_fio(results: Results, systems: list[System], args: argparse.Namespace, rw: str) -> None:
    what = "read" if rw == "randread" else "write"
    for system in systems:  # lay the files out once, untimed
        system.check()
        path = system.root / "fio.dat"
        if not path.exists() or path.stat().st_size != args.fio_size * MIB:
            run(
                ["dd", "if=/dev/urandom", f"of={path}", "bs=1M", f"count={args.fio_size}"]
                + ["conv=fsync"]
            )
    # Random reads also run with O_DIRECT (1 job): every read then reaches the FUSE
    # daemon, none is served from the page cache. The buffered rows let kmsfs answer most
    # reads from chunks it handed the kernel whole (kmsfs/fs/pagefill.py); this one shows
    # the cost of a read that no earlier read helps.
    variants = [(False, "", "")]
    if rw == "randread":
        variants.append((True, "_direct", ", O_DIRECT"))
    for rep in range(args.repeat):
        # (the O_DIRECT variant with 1 job only: it is there for the cost of a miss)
        runs = [(v, j) for v in variants for j in ((1, 4) if not v[1] else (1,))]
        for (direct, key, label), jobs in runs:
            metric = results.metric(
                f"{rw}{key}_{jobs}j",
                f"fio random {what} 4k{label}, {jobs} job{'s' if jobs > 1 else ''}",
                "IOPS",
                True,
            )
            for system in order(systems, rep):
                if direct and system.name in ("null", "plain"):
                    # nullfs opens its backing file with the caller's O_DIRECT and
                    # reads into unaligned buffers (EINVAL); the plain directory would
                    # read from the disk: neither is a reference for this row
                    continue
                system.check()
                os.sync()
                path = system.root / "fio.dat"
                if system.name == "plain":
                    # the reference: the file served from the page cache, as the FUSE
                    # daemons' backing files are (invalidating it would measure the disk)
                    run(["cat", str(path)], stdout=subprocess.DEVNULL)
                    iops = fio_iops(
                        path, rw, jobs, args.plain_fio_seconds, args.fio_size, False, direct
                    )
                else:
                    iops = fio_iops(path, rw, jobs, args.fio_seconds, args.fio_size, True, direct)
                metric.add(system.name, iops)
                log(
                    f"{rw}{label} {rep + 1}/{args.repeat} {jobs} job(s) {system.name}: "
                    f"{iops:.0f} IOPS"
                )


def build_tarball(
    base: Path, target_files: int, exact: bool = False, file_name: str = "stdlib.tar"
) -> tuple[Path, int, int]:
    """A tarball of the Python standard library, repeated until it holds target_files files
    (with ``exact``, the last copy cut short so that it holds exactly that many)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"]).resolve()
    skip_dirs = {"site-packages", "dist-packages", "__pycache__"}
    members: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(stdlib):
        dirnames[:] = sorted(
            d
            for d in dirnames
            if d not in skip_dirs and not d.startswith("config-") and d != "lib-dynload"
        )
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if path.is_file() and not path.is_symlink():
                members.append(path)
    if not members:
        raise BenchError(f"no files found in the standard library at {stdlib}")
    if exact:
        copies = -(-target_files // len(members))
        files = target_files
    else:
        copies = max(1, round(target_files / len(members)))
        files = copies * len(members)
    tarball = base / file_name
    total_bytes = 0
    with tarfile.open(tarball, "w") as tar:
        for index in range(files):
            copy, path = divmod(index, len(members))[0], members[index % len(members)]
            arcname = f"stdlib-{copy + 1}/{path.relative_to(stdlib)}"
            tar.add(path, arcname=arcname, recursive=False)
            total_bytes += path.stat().st_size
    log(
        f"tarball {tarball.name}: {files} files from {copies} cop{'ies' if copies > 1 else 'y'} "
        f"of {stdlib} ({len(members)} files each, no site-packages/__pycache__/config-*/"
        f"lib-dynload), {total_bytes / MIB:.0f} MiB"
    )
    return tarball, files, total_bytes


def count_files(root: Path) -> int:
    return sum(len(files) for _, _, files in os.walk(root))


def bench_small(
    results: Results, systems: list[System], args: argparse.Namespace, tar_info: dict[str, Any]
) -> None:
    tarball, expected = Path(tar_info["path"]), int(tar_info["files"])

    def untar(tree: Path) -> float:
        return timed(["tar", "-xf", str(tarball), "-C", str(tree)])

    def list_all(tree: Path) -> float:
        return timed(["ls", "-lR", str(tree)])

    def read_all(tree: Path) -> float:
        return timed(["find", str(tree), "-type", "f", "-exec", "cat", "{}", "+"])

    def remove_all(tree: Path) -> float:
        return timed(["rm", "-rf", str(tree)])

    # (key, label, timed step, drop caches first)
    steps: list[tuple[str, str, Callable[[Path], float], bool]] = [
        ("untar", "untar stdlib", untar, False),
        ("ls", "ls -lR (cold)", list_all, True),
        ("readall", "read every file (cold)", read_all, True),
        ("rm", "rm -rf", remove_all, False),
    ]
    label_files = f"{expected} files"
    metrics = {
        key: results.metric(f"small_{key}", f"{label} ({label_files})", "s", False)
        for key, label, _, _ in steps
    }
    for rep in range(args.repeat):
        for system in order(systems, rep):
            system.check()
            tree = system.root / "small"
            if tree.exists():
                shutil.rmtree(tree)
            tree.mkdir()
            shown = []
            for key, _, step, cold in steps:
                if key == "ls":  # untimed check that the untar is complete
                    found = count_files(tree)
                    if found != expected:
                        raise BenchError(f"{system.name}: untar left {found} of {expected} files")
                if cold:
                    drop_caches()
                else:
                    os.sync()
                seconds = step(tree)
                metrics[key].add(system.name, seconds)
                shown.append(f"{key} {seconds:.2f}")
            if tree.exists():
                raise BenchError(f"{system.name}: rm -rf left {tree} behind")
            log(f"small {rep + 1}/{args.repeat} {system.name}: {', '.join(shown)} s")


def bench_keyd(results: Results, rig: Rig, args: argparse.Namespace) -> None:
    sys.path.insert(0, str(SCRIPTS))
    bench_keyd_module = importlib.import_module("bench_keyd")
    from kmsfs.kms.client import KMSClient

    assert rig.keyd_socket is not None and rig.keyd is not None
    socket_path = str(rig.keyd_socket)
    rows = bench_keyd_module.ROWS
    with KMSClient(socket_path) as client:
        key_id = client.call("DescribeKey", {"KeyId": rig.key_alias})["KeyMetadata"]["KeyId"]
        blob = client.generate_data_key(
            key_id, encryption_context=rows["Decrypt"][3]["EncryptionContext"]
        )["CiphertextBlob"]
    params = {
        "GenerateDataKey": {**rows["GenerateDataKey"][3], "KeyId": key_id},
        "Decrypt": {**rows["Decrypt"][3], "CiphertextBlob": base64.b64encode(blob).decode()},
    }
    for rep in range(args.repeat):
        for operation in ("GenerateDataKey", "Decrypt"):
            for clients in (1, 8):
                metric = results.metric(
                    f"keyd_{operation}_{clients}c",
                    f"keyd {operation}, {clients} client{'s' if clients > 1 else ''}",
                    "req/s",
                    True,
                )
                # bench_keyd.measure: (requests per second, keyd's CPU µs per request)
                rate, _ = bench_keyd_module.measure(
                    "unix",
                    (socket_path,),
                    operation,
                    params[operation],
                    clients,
                    args.keyd_seconds,
                    rig.keyd.pid,
                )
                metric.add("kmsfs", rate)
                log(f"keyd {rep + 1}/{args.repeat} {operation} {clients} client(s): {rate:.0f}/s")


# --- scale: how costs grow with the work -------------------------------------------


#: the kmsfs mount of the imported tree that the memory figures are taken on
SCALE_SYSTEM = "kmsfs-scale"
#: files per directory of the tree that is stat-ed (1,000,000 files: 1000 x 1000)
SCALE_FILES_PER_DIR = 1000


def vm_rss_mib(pid: int) -> float:
    """Resident memory of a process in MiB, from /proc/PID/status VmRSS."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise BenchError(f"no VmRSS in /proc/{pid}/status")


def mount_memory_counts(system: System, timeout: float = 20.0) -> dict[str, int] | None:
    """The kmsfs mount's own counts of what it holds (nodes, handles, cached keys...): its
    SIGUSR1 memory report (kmsfs.fs.mount.memory_report), read back from its log; None if
    no report appeared within ``timeout``."""
    assert system.proc is not None and system.log_path is not None
    before = system.log_path.read_text(errors="replace").count("memory: ")
    system.proc.send_signal(signal.SIGUSR1)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        reports = re.findall(r"memory: (.*)", system.log_path.read_text(errors="replace"))
        if len(reports) > before:
            return {name: int(value) for name, value in re.findall(r"(\w+)=(\d+)", reports[-1])}
        time.sleep(0.1)
    return None


def wait_for_forgets(system: System, nodes: int, timeout: float = 60.0) -> None:
    """Until the mount holds at most ``nodes`` inodes (the kernel's FORGETs arrived, up to
    ``timeout``), then long enough for its memory return (kmsfs.fs.mount.return_memory,
    every RETURN_MEMORY_SECONDS) to have run twice: the RSS read next is what it kept."""
    from kmsfs.fs.mount import RETURN_MEMORY_SECONDS

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        counts = mount_memory_counts(system)
        if counts is None or counts.get("nodes", 0) <= nodes:
            break
        time.sleep(0.5)
    time.sleep(2 * RETURN_MEMORY_SECONDS + 0.5)


def raise_open_file_limit(wanted: int) -> None:
    """Let this process hold ``wanted`` descriptors (root may raise the hard limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        if hard != resource.RLIM_INFINITY and hard < wanted:
            hard = wanted
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


def scale_untar(
    results: Results, systems: list[System], args: argparse.Namespace, base: Path
) -> None:
    """The same kind of tree at two sizes: the time per file should not grow with the tree."""
    per_file: dict[int, Metric] = {}
    counts: list[int] = args.scale_files
    for count in counts:
        tarball, files, total_bytes = build_tarball(
            base, count, exact=True, file_name=f"scale-{count}.tar"
        )
        total = results.metric(
            f"scale_untar_{count}", f"scale: untar {files} files + syncfs", "s", False
        )
        per_file[count] = results.metric(
            f"scale_untar_{count}_per_file", f"scale: untar {files} files, per file", "µs", False
        )
        for rep in range(args.scale_repeat):
            for system in order(systems, rep):
                system.check()
                tree = system.root / f"scale-untar-{count}-{rep + 1}"
                tree.mkdir()
                os.sync()
                # syncfs of the mount in the timing: the larger tree's data must not be
                # written back inside its own run only (the dirty-page limit would see to it)
                seconds = timed(
                    f"tar -xf {shlex.quote(str(tarball))} -C {shlex.quote(str(tree))} "
                    f"&& sync -f {shlex.quote(str(tree))}",
                    shell=True,
                )
                found = count_files(tree)
                if found != files:
                    raise BenchError(f"{system.name}: untar left {found} of {files} files")
                total.add(system.name, seconds)
                per_file[count].add(system.name, seconds / files * 1e6)
                log(
                    f"scale untar {files} files {rep + 1}/{args.scale_repeat} {system.name}: "
                    f"{seconds:.2f} s, {seconds / files * 1e6:.0f} µs/file"
                )
        tarball.unlink()
    small, large = counts[0], counts[-1]
    growth = results.metric(
        "scale_untar_growth",
        f"scale: untar time per file, {large} ÷ {small} files",
        "×",
        False,
    )
    for system in systems:
        for large_run, small_run in zip(
            per_file[large].runs.get(system.name, []),
            per_file[small].runs.get(system.name, []),
            strict=True,
        ):
            growth.add(system.name, large_run / small_run)


def scale_directory(results: Results, systems: list[System], args: argparse.Namespace) -> None:
    """One directory with many entries: ls -l and the lookup of a missing name, twice each."""
    entries = args.scale_dir_entries
    create = results.metric(
        "scale_dir_create", f"scale: create {entries} empty files in one dir", "s", False
    )
    listing = [
        results.metric(f"scale_dir_ls_{when}", f"scale: ls -l of that dir, {when}", "s", False)
        for when in ("first", "second")
    ]
    missing = [
        results.metric(
            f"scale_dir_missing_{when}", f"scale: stat of a missing name in it, {when}", "µs", False
        )
        for when in ("first", "second")
    ]
    for rep in range(args.scale_repeat):
        for system in order(systems, rep):
            system.check()
            directory = system.root / f"scale-dir-{rep + 1}"
            directory.mkdir()
            os.sync()
            start = time.perf_counter()
            for index in range(entries):
                os.close(
                    os.open(f"{directory}/entry-{index:07d}", os.O_WRONLY | os.O_CREAT | os.O_EXCL)
                )
            created = time.perf_counter() - start
            create.add(system.name, created)
            if len(os.listdir(directory)) != entries:
                raise BenchError(f"{system.name}: {directory} does not hold {entries} entries")
            drop_caches()  # the first ls -l starts from nothing cached, as after a mount
            shown = [f"create {created:.2f} s"]
            for when, metric in zip(("first", "second"), listing, strict=True):
                seconds = timed(["ls", "-l", str(directory)])
                metric.add(system.name, seconds)
                shown.append(f"ls -l {when} {seconds:.2f} s")
            absent = f"{directory}/missing-name-{rep + 1}"
            for when, metric in zip(("first", "second"), missing, strict=True):
                start = time.perf_counter()
                try:
                    os.stat(absent)
                except FileNotFoundError:
                    pass
                else:
                    raise BenchError(f"{system.name}: {absent} exists")
                micros = (time.perf_counter() - start) * 1e6
                metric.add(system.name, micros)
                shown.append(f"missing {when} {micros:.0f} µs")
            log(
                f"scale dir {entries} {rep + 1}/{args.scale_repeat} {system.name}: "
                f"{', '.join(shown)}"
            )


def make_stat_tree(source: Path, files: int, open_files: int) -> None:
    """``files`` empty files in directories of SCALE_FILES_PER_DIR and ``open_files`` small
    ones in ``open/``, on the plain disk (kmsfs import encrypts them into the cipherdir:
    far faster than creating them through a mount)."""
    source.mkdir()
    for index in range(files):
        directory, position = divmod(index, SCALE_FILES_PER_DIR)
        if position == 0:
            os.mkdir(f"{source}/d{directory:05d}")
        os.close(os.open(f"{source}/d{directory:05d}/f{position:05d}", os.O_WRONLY | os.O_CREAT))
    (source / "open").mkdir()
    for index in range(open_files):
        fd = os.open(f"{source}/open/f{index:06d}", os.O_WRONLY | os.O_CREAT)
        try:
            os.write(fd, b"kmsfs scale open\n")
        finally:
            os.close(fd)


def scale_memory(
    results: Results, rig: Rig, args: argparse.Namespace, report: dict[str, Any]
) -> None:
    """The mount's RSS as the kernel gets to know a million inodes, and with 10,000 files
    open; on a mount of its own (started here) whose tree ``kmsfs import`` made offline."""
    files, open_files = args.scale_stat_files, args.scale_open_files
    source = rig.base / "scale-source"
    start = time.perf_counter()
    make_stat_tree(source, files, open_files)
    log(
        f"scale: made {files} + {open_files} files on the disk "
        f"in {time.perf_counter() - start:.0f} s"
    )

    def import_tree(cipher: Path) -> None:
        assert rig.keyd_socket is not None
        began = time.perf_counter()
        run(
            [rig.kmsfs_bin, "import", "-q", str(source), str(cipher)]
            + ["--keyd-socket", str(rig.keyd_socket)]
        )
        seconds = time.perf_counter() - began
        report.setdefault("scale", {})["import_seconds"] = round(seconds, 1)
        log(f"scale: kmsfs import of {files + open_files} files took {seconds:.0f} s")
        shutil.rmtree(source)

    rig.start_kmsfs(SCALE_SYSTEM, before_mount=import_tree)
    system = rig.systems[SCALE_SYSTEM]
    assert system.proc is not None
    pid = system.proc.pid

    def rss(key: str, label: str) -> float:
        value = vm_rss_mib(pid)
        results.metric(f"scale_rss_{key}", f"scale: mount RSS {label}", "MiB", False).add(
            "kmsfs", value
        )
        counts = mount_memory_counts(system)
        report.setdefault("scale", {}).setdefault("mount_counts", {})[key] = counts
        if counts is not None and "nodes" in counts:
            results.metric(
                f"scale_nodes_{key}", f"scale: inodes the mount holds {label}", "inodes", False
            ).add("kmsfs", counts["nodes"])
        log(f"scale: mount RSS {label}: {value:.0f} MiB; the mount's counts: {counts}")
        return value

    rss("mounted", "after mounting")
    root = system.root
    start = time.perf_counter()
    for index in range(files):
        directory, position = divmod(index, SCALE_FILES_PER_DIR)
        os.lstat(f"{root}/d{directory:05d}/f{position:05d}")
    seconds = time.perf_counter() - start
    results.metric("scale_stat", f"scale: stat {files} files", "s", False).add("kmsfs", seconds)
    log(f"scale: stat of {files} files: {seconds:.1f} s ({files / seconds:.0f}/s)")
    rss("stat", f"after stat-ing {files} files")
    drop_caches()  # the kernel forgets the inodes: FORGETs reach the mount
    wait_for_forgets(system, max(10, files // 100))
    rss("forget", "after that + drop_caches (FORGETs)")
    raise_open_file_limit(open_files + 1024)
    held: list[int] = []
    try:
        for index in range(open_files):
            fd = os.open(f"{root}/open/f{index:06d}", os.O_RDONLY)
            held.append(fd)
            if os.read(fd, 5) != b"kmsfs":  # its data key in use, not just a handle
                raise BenchError(f"{SCALE_SYSTEM}: open/f{index:06d} reads back wrong")
        rss("open", f"with {open_files} files open")
    finally:
        for fd in held:
            os.close(fd)
    system.check()
    unmount(system.root, system.proc, SCALE_SYSTEM)


def scale_big_file(
    results: Results, systems: list[System], args: argparse.Namespace, report: dict[str, Any]
) -> None:
    """One big file written and read sequentially: the rate of its last segment against
    its first (the cost per chunk must not grow with the offset)."""
    total = max(2, int(args.scale_big_gib * GIB) // MIB) * MIB
    segment = min(args.scale_segment_mib * MIB, total // 2 // MIB * MIB)
    size_label = f"{total / GIB:g} GiB" if total >= GIB else f"{total // MIB} MiB"
    segment_label = f"{segment / GIB:g} GiB" if segment >= GIB else f"{segment // MIB} MiB"
    rows: dict[str, Metric] = {}
    for what in ("write", "read"):
        for where in ("first", "last"):
            rows[f"{what}_{where}"] = results.metric(
                f"scale_big_{what}_{where}",
                f"scale: {size_label} file, {what} rate of the {where} {segment_label}",
                "MiB/s",
                True,
            )
        rows[f"{what}_growth"] = results.metric(
            f"scale_big_{what}_growth",
            f"scale: {size_label} file, {what} rate last ÷ first",
            "×",
            True,
        )
    block = os.urandom(MIB)
    buffer = bytearray(MIB)
    for rep in range(args.scale_repeat):
        for system in order(systems, rep):
            system.check()
            path = system.root / "scale-big.dat"
            rates: dict[str, list[float]] = {"write": [], "read": []}
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                done, mark, began = 0, 0, time.perf_counter()
                while done < total:
                    if os.write(fd, block) != MIB:
                        raise BenchError(f"{system.name}: short write to {path}")
                    done += MIB
                    if done % segment == 0 or done == total:
                        os.fdatasync(fd)  # each segment's data stored within its own time
                        now = time.perf_counter()
                        rates["write"].append((done - mark) / MIB / (now - began))
                        mark, began = done, now
            finally:
                os.close(fd)
            drop_caches()
            fd = os.open(path, os.O_RDONLY)
            try:
                done, mark, began = 0, 0, time.perf_counter()
                while done < total:
                    if os.readv(fd, [buffer]) != MIB or buffer != block:
                        raise BenchError(f"{system.name}: {path} reads back wrong at {done}")
                    done += MIB
                    if done % segment == 0 or done == total:
                        now = time.perf_counter()
                        rates["read"].append((done - mark) / MIB / (now - began))
                        mark, began = done, now
            finally:
                os.close(fd)
            path.unlink()
            os.sync()
            every = report.setdefault("scale", {}).setdefault("big_file_mib_per_s", {})
            every.setdefault(system.name, []).append(
                {
                    "segment_mib": segment // MIB,
                    **{k: [round(r, 1) for r in v] for k, v in rates.items()},
                }
            )
            for what, measured in rates.items():
                rows[f"{what}_first"].add(system.name, measured[0])
                rows[f"{what}_last"].add(system.name, measured[-1])
                rows[f"{what}_growth"].add(system.name, measured[-1] / measured[0])
            log(
                f"scale big file {rep + 1}/{args.scale_repeat} {system.name}: MiB/s per "
                f"{segment_label}: write {' '.join(f'{r:.0f}' for r in rates['write'])}; "
                f"read {' '.join(f'{r:.0f}' for r in rates['read'])}"
            )


def bench_scale(
    results: Results, rig: Rig, args: argparse.Namespace, report: dict[str, Any]
) -> None:
    systems = [rig.systems[name] for name in args.scale_systems]
    scale_untar(results, systems, args, rig.base)
    scale_directory(results, systems, args)
    scale_big_file(results, systems, args, report)
    scale_memory(results, rig, args, report)


# --- the run ------------------------------------------------------------------------


def version_of(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    return (out.stdout or out.stderr).strip().splitlines()[0] if (out.stdout or out.stderr) else "?"


def machine_info() -> dict[str, Any]:
    model = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    mem_kib = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            mem_kib = int(line.split()[1])
    try:
        import cryptography

        crypto_version = cryptography.__version__
    except ImportError:
        crypto_version = "?"
    try:
        import pyfuse3

        pyfuse3_version = getattr(pyfuse3, "__version__", "?")
    except ImportError:
        pyfuse3_version = "?"
    git = subprocess.run(
        ["git", "-C", str(REPO), "describe", "--always", "--dirty"], capture_output=True, text=True
    )
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "memory_gib": round(mem_kib / (1 << 20), 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "cryptography": crypto_version,
        "pyfuse3": pyfuse3_version,
        "gocryptfs": version_of(["gocryptfs", "-version"]),
        "fio": version_of(["fio", "--version"]),
        "kmsfs_commit": git.stdout.strip() or "?",
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="scripts/bench",
        description="kmsfs vs gocryptfs vs a plain directory",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a ~2-minute subset: 256 MiB sequential, fio 5 s (plain 2 s), keyd 1 s, "
        "~2000 small files (one copy of the stdlib), 1 repetition (explicit options still win)",
    )
    parser.add_argument("--size", type=int, help="sequential file size in MiB (1024; quick 256)")
    parser.add_argument("--repeat", type=int, help="repetitions per workload (3; quick 1)")
    parser.add_argument("--only", help=f"comma-separated workloads: {','.join(WORKLOADS)}")
    parser.add_argument(
        "--aws-provider",
        action="store_true",
        help="also mount kmsfs with the aws key service pointed at this run's keyd over "
        "loopback TCP + SigV4 (system kmsfs-aws)",
    )
    parser.add_argument(
        "--audit-opens",
        action="store_true",
        help="also mount kmsfs with --audit-opens (system kmsfs-audit, compared with kmsfs)",
    )
    parser.add_argument(
        "--bound",
        action="store_true",
        help="also mount kmsfs with its root bound to a CMK of its own (kmsfs key set; "
        "system kmsfs-bound, compared with kmsfs)",
    )
    parser.add_argument("--fio-seconds", type=int, help="seconds per fio run (20; quick 5)")
    parser.add_argument(
        "--plain-fio-seconds",
        type=int,
        help="seconds per fio run on the plain directory, the page-cache reference (3; quick 2)",
    )
    parser.add_argument("--fio-size", type=int, default=256, help="fio file size in MiB (256)")
    parser.add_argument(
        "--keyd-seconds", type=float, help="seconds per keyd measurement (1.5; quick 1)"
    )
    parser.add_argument(
        "--files", type=int, help="small-file tarball size in files (10000; quick 2000)"
    )
    parser.add_argument(
        "--scale-files",
        help="scale: the two tree sizes untarred, comma-separated (10000,100000; quick 2000,20000)",
    )
    parser.add_argument(
        "--scale-dir-entries",
        type=int,
        help="scale: entries in the one big directory (100000; quick 20000)",
    )
    parser.add_argument(
        "--scale-stat-files",
        type=int,
        help="scale: files stat-ed before the mount's RSS is read (1000000; quick 100000)",
    )
    parser.add_argument(
        "--scale-open-files",
        type=int,
        help="scale: files held open at once for the RSS figure (10000; quick 2000)",
    )
    parser.add_argument(
        "--scale-big-gib",
        type=float,
        help="scale: size of the big file in GiB, fractions allowed (20; quick 2)",
    )
    parser.add_argument(
        "--scale-segment-mib",
        type=int,
        help="scale: the big file's first and last segment whose rates are compared, MiB "
        "(1024; quick 256; at most half the file)",
    )
    parser.add_argument("--scale-repeat", type=int, default=1, help="scale: repetitions (1)")
    parser.add_argument(
        "--scale-systems",
        default="kmsfs,gocryptfs",
        help="scale: systems for the untar, directory and big-file rows (kmsfs,gocryptfs; "
        "the memory rows are kmsfs's only)",
    )
    parser.add_argument(
        "--workdir",
        default="/var/tmp",
        help="parent of the scratch directory (backing dirs and plain dir); must be a real disk",
    )
    parser.add_argument(
        "--json-out",
        help="where to write the JSON results "
        f"(default {Path(tempfile.gettempdir()) / 'kmsfs-bench-results.json'})",
    )
    args = parser.parse_args(argv)
    defaults: dict[str, Any] = {
        "size": 1024,
        "repeat": 3,
        "fio_seconds": 20,
        "plain_fio_seconds": 3,
        "keyd_seconds": 1.5,
        "files": 10000,
        "scale_files": "10000,100000",
        "scale_dir_entries": 100000,
        "scale_stat_files": 1000000,
        "scale_open_files": 10000,
        "scale_big_gib": 20.0,
        "scale_segment_mib": 1024,
    }
    if args.quick:
        defaults.update(
            size=256,
            repeat=1,
            fio_seconds=5,
            plain_fio_seconds=2,
            keyd_seconds=1.0,
            files=2000,
            scale_files="2000,20000",
            scale_dir_entries=20000,
            scale_stat_files=100000,
            scale_open_files=2000,
            scale_big_gib=2.0,
            scale_segment_mib=256,
        )
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.workloads = list(DEFAULT_WORKLOADS) if not args.only else args.only.split(",")
    unknown = [w for w in args.workloads if w not in WORKLOADS]
    if unknown:
        parser.error(f"unknown workload(s) {unknown}; choose from {','.join(WORKLOADS)}")
    try:
        args.scale_files = [int(count) for count in str(args.scale_files).split(",")]
    except ValueError:
        parser.error("--scale-files takes two file counts, e.g. 10000,100000")
    if len(args.scale_files) != 2 or min(args.scale_files) < 1:
        parser.error("--scale-files takes two file counts, e.g. 10000,100000")
    args.scale_systems = args.scale_systems.split(",")
    unknown = [name for name in args.scale_systems if name not in ("kmsfs", "gocryptfs", "null")]
    if unknown:
        parser.error(f"--scale-systems: unknown {unknown}; choose from kmsfs,gocryptfs,null")
    if min(args.scale_dir_entries, args.scale_stat_files, args.scale_open_files) < 1:
        parser.error("--scale-dir-entries, --scale-stat-files and --scale-open-files: at least 1")
    if args.scale_big_gib <= 0 or args.scale_segment_mib < 1 or args.scale_repeat < 1:
        parser.error("--scale-big-gib, --scale-segment-mib and --scale-repeat must be positive")
    if args.json_out is None:
        args.json_out = str(Path(tempfile.gettempdir()) / "kmsfs-bench-results.json")
    if args.repeat < 1 or args.size < 1:
        parser.error("--repeat and --size must be at least 1")
    return args


def describe(error: BaseException) -> str:
    if isinstance(error, KeyboardInterrupt):
        return f"interrupted ({error or 'Ctrl-C'})"
    return f"{type(error).__name__}: {error}"


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("scripts/bench: run as root (mounts, drop_caches, read_ahead_kb)", file=sys.stderr)
        return 2
    for tool in ("fio", "gocryptfs", "fusermount3", "dd", "tar"):
        if shutil.which(tool) is None:
            print(f"scripts/bench: {tool} is missing (scripts/bench installs it)", file=sys.stderr)
            return 2
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGHUP, _terminate)

    kmsfs_bin = str(Path(sys.executable).parent / "kmsfs")
    base = Path(tempfile.mkdtemp(prefix="kmsfs-bench-", dir=args.workdir))
    fstype = run(["findmnt", "-n", "-o", "FSTYPE", "-T", str(base)]).stdout.strip()
    started = time.monotonic()
    rig = Rig(base, kmsfs_bin)
    results = Results()
    report: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "machine": machine_info(),
        "settings": {
            "quick": args.quick,
            "workloads": args.workloads,
            "size_mib": args.size,
            "repeat": args.repeat,
            "fio_seconds": args.fio_seconds,
            "plain_fio_seconds": args.plain_fio_seconds,
            "fio_size_mib": args.fio_size,
            "keyd_seconds": args.keyd_seconds,
            **(
                {
                    "scale_files": args.scale_files,
                    "scale_dir_entries": args.scale_dir_entries,
                    "scale_stat_files": args.scale_stat_files,
                    "scale_open_files": args.scale_open_files,
                    "scale_big_gib": args.scale_big_gib,
                    "scale_segment_mib": args.scale_segment_mib,
                    "scale_repeat": args.scale_repeat,
                    "scale_systems": args.scale_systems,
                }
                if "scale" in args.workloads
                else {}
            ),
            "workdir": str(base),
            "workdir_fstype": fstype,
            "kmsfs_file_names": "encrypted (kmsfs init default)",
            "gocryptfs_file_names": "encrypted (gocryptfs default)",
        },
    }
    error: BaseException | None = None
    try:
        machine = report["machine"]
        log(
            f"scratch directory {base} ({fstype}); {machine['cpu']}, {machine['cores']} cores, "
            f"Python {machine['python']}, cryptography {machine['cryptography']}, "
            f"pyfuse3 {machine['pyfuse3']}, kmsfs {machine['kmsfs_commit']}"
        )
        if fstype in ("tmpfs", "ramfs"):
            log(f"warning: {base} is on {fstype}, not a disk; use --workdir")
        if args.aws_provider:
            rig.tcp_port = free_port()
            SYSTEMS.insert(1, AWS_SYSTEM)
        rig.start_keyd()
        rig.start_kmsfs()
        if args.aws_provider:
            rig.start_kmsfs_aws()
        if args.audit_opens:
            SYSTEMS.insert(1, AUDIT_SYSTEM)
            rig.start_kmsfs(AUDIT_SYSTEM, "--audit-opens")
        if args.bound:
            SYSTEMS.insert(1, BOUND_SYSTEM)
            rig.start_kmsfs(BOUND_SYSTEM, bind_root=True)
        rig.start_gocryptfs()
        rig.start_null()
        rig.start_plain()
        report["bdi"] = rig.bdi
        kmsfs_bdi, gocryptfs_bdi = rig.bdi["kmsfs"], rig.bdi["gocryptfs"]
        log(
            f"mounted kmsfs, gocryptfs and null; read_ahead_kb {READ_AHEAD_KB} and max_ratio "
            f"{MAX_DIRTY_RATIO} on each (before: kmsfs {kmsfs_bdi['read_ahead_kb_before']}/"
            f"{kmsfs_bdi['max_ratio_before']}, gocryptfs "
            f"{gocryptfs_bdi['read_ahead_kb_before']}/{gocryptfs_bdi['max_ratio_before']})"
        )
        systems = [rig.systems[name] for name in SYSTEMS]
        if "small" in args.workloads:
            tarball, files, total = build_tarball(base, args.files)
            report["tarball"] = {"path": str(tarball), "files": files, "bytes": total}
        for workload in args.workloads:
            log(f"--- {workload}")
            if workload == "seq":
                bench_seq(results, systems, args)
            elif workload in ("randread", "randwrite"):
                bench_fio(results, systems, args, workload)
            elif workload == "small":
                bench_small(results, systems, args, report["tarball"])
            elif workload == "keyd":
                bench_keyd(results, rig, args)
            elif workload == "scale":
                bench_scale(results, rig, args, report)
        for system in systems:
            system.check()
    except BaseException as caught:  # report, clean up, then fail
        error = caught
        log(f"FAILED: {describe(caught)}")
    finally:
        mount_log = rig.systems["kmsfs"].log_path if "kmsfs" in rig.systems else None
        if mount_log is not None and mount_log.exists():
            lines = mount_log.read_text(errors="replace").splitlines()
            report["kmsfs_mount_log_lines"] = len(lines)
            report["kmsfs_mount_log_problems"] = [
                line for line in lines if re.search(r"ERROR|WARNING|CRITICAL|Traceback", line)
            ][:50]
            report["kmsfs_mount_log_tail"] = lines[-40:]
        log("cleaning up")
        rig.close()
    runtime = time.monotonic() - started
    report["runtime_seconds"] = round(runtime, 1)
    report["results"] = results.to_json()
    report["notes"] = NOTES + (SCALE_NOTES if "scale" in args.workloads else [])
    if error is not None:
        report["error"] = describe(error)
    json_path = Path(args.json_out)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(report, indent=2) + "\n")

    machine = report["machine"]
    print(
        f"kmsfs vs gocryptfs vs plain directory — {report['date']}, {machine['cpu']}, "
        f"{machine['cores']} cores, {machine['memory_gib']} GiB, kernel {machine['kernel']}, "
        f"{fstype} backing; gocryptfs {machine['gocryptfs'].split(';')[0].split()[-1]}, "
        f"Python {machine['python']}, kmsfs {machine['kmsfs_commit']}"
    )
    runs = f"median (min–max) of {args.repeat} run(s); " if set(args.workloads) - {"scale"} else ""
    if "scale" in args.workloads:
        runs += f"scale: {args.scale_repeat} run(s); "
    print(
        f"{runs}read_ahead_kb={READ_AHEAD_KB}, max_ratio={MAX_DIRTY_RATIO} on every FUSE mount; "
        f"fio {args.fio_seconds} s per run (plain {args.plain_fio_seconds} s), "
        f"{args.fio_size} MiB file, psync, buffered"
    )
    print(
        "ratios are oriented so that > 1 means kmsfs is better: throughput kmsfs/other, "
        "times and CPU other/kmsfs"
    )
    print()
    print(table(results))
    print()
    for note in NOTES + (SCALE_NOTES if "scale" in args.workloads else []):
        print(f"- {note}")
    print(f"runtime {runtime:.0f} s; JSON in {json_path}")
    problems = report.get("kmsfs_mount_log_problems", [])
    if problems:
        print(f"kmsfs mount log: {len(problems)} warning/error line(s), e.g.:")
        for line in problems[:10]:
            print(f"  {line}")
    if error is not None:
        print(f"FAILED: {describe(error)}", file=sys.stderr)
        return 130 if isinstance(error, KeyboardInterrupt) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
