"""Benchmark of the format engine: ``scripts/bench-format [--help]``.

Prints, in one run, each figure next to a peer measured in the same run:

1. sequential seal (write) and open (read) MB/s of the engine over ``--size`` (1 GiB)
   next to a bare AESGCM loop at the same chunk size (the target: engine ≥ 85 %), next
   to the same loop plus the same pwrite/preadv calls (what I/O costs on top), and the
   engine's own seal/open loop without I/O (``codec``);
2. 4 KiB random read and write ops/s through the engine next to plain pread/pwrite;
3. the chunk-size table behind the default (sequential MB/s, 4 KiB random ops/s,
   space overhead, cost of a 10 GiB hole);
4. whether AESGCM releases the GIL (two threads vs one) and whether a worker thread
   would help the engine's batches;
5. the pipe round trip ``encrypt_stream | decrypt_stream`` through OS pipes in separate
   processes, with each process's peak RSS.

All figures are medians of ``--repeat`` runs. Uses an in-memory key provider (no keyd).
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from kmsfs.format.chunks import ChunkCodec
from kmsfs.format.file import EncryptedFile
from kmsfs.format.keys import FileKeys
from kmsfs.format.offsets import CHUNK_OVERHEAD, DEFAULT_CHUNK_SIZE
from kmsfs.format.stream import decrypt_stream, encrypt_stream

MB = 1_000_000
KIB = 1024
MIB = 1024 * KIB
GIB = 1024 * MIB
TABLE_SIZES = (4 * KIB, 16 * KIB, 32 * KIB, 64 * KIB, 128 * KIB, 256 * KIB, 1 * MIB)


class BenchKeyProvider:
    """Bench-only key provider: AES-GCM under a wrapping key from the environment."""

    def __init__(self) -> None:
        wrapping = os.environ.get("KMSFS_BENCH_WRAPPING_KEY")
        self._aead = AESGCM(bytes.fromhex(wrapping) if wrapping else os.urandom(32))

    def generate_data_key(
        self, key_id: str, encryption_context: dict[str, str]
    ) -> tuple[bytes, bytes, str]:
        data_key = os.urandom(32)
        nonce = os.urandom(12)
        blob = nonce + self._aead.encrypt(
            nonce, data_key, repr(sorted(encryption_context.items())).encode()
        )
        return data_key, blob, "arn:aws:kms:local:000000000000:key/bench"

    def decrypt_data_key(self, wrapped_blob: bytes, encryption_context: dict[str, str]) -> bytes:
        aad = repr(sorted(encryption_context.items())).encode()
        return self._aead.decrypt(wrapped_blob[:12], wrapped_blob[12:], aad)


#: one provider (one wrapping key) for every file this process writes and reads back
_PROVIDER = BenchKeyProvider()


def parse_size(text: str) -> int:
    units = {"K": KIB, "M": MIB, "G": GIB}
    text = text.strip().upper().removesuffix("IB").removesuffix("B")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def human(size: int) -> str:
    for unit, factor in (("GiB", GIB), ("MiB", MIB), ("KiB", KIB)):
        if size >= factor and size % factor == 0:
            return f"{size // factor} {unit}"
    return f"{size} B"


def median_of(repeat: int, run: Callable[[], float]) -> float:
    return statistics.median(run() for _ in range(repeat))


# ----------------------------------------------------------------- sequential
def bare_seal(size: int, chunk_size: int) -> float:
    """MB/s of a bare AESGCM encrypt_into loop over ``size`` bytes (no I/O)."""
    aead = AESGCM(os.urandom(32))
    source = memoryview(os.urandom(min(size, 8 * MIB)))
    out = memoryview(bytearray(chunk_size + 16))
    nonce, aad = os.urandom(12), os.urandom(25)
    per_source = len(source) // chunk_size
    count = size // chunk_size
    start = time.perf_counter()
    for index in range(count):
        offset = (index % per_source) * chunk_size
        aead.encrypt_into(nonce, source[offset : offset + chunk_size], aad, out)
    return size / (time.perf_counter() - start) / MB


def bare_open(size: int, chunk_size: int) -> float:
    aead = AESGCM(os.urandom(32))
    nonce, aad = os.urandom(12), os.urandom(25)
    sealed = aead.encrypt(nonce, os.urandom(chunk_size), aad)
    out = memoryview(bytearray(chunk_size))
    count = size // chunk_size
    start = time.perf_counter()
    for _ in range(count):
        aead.decrypt_into(nonce, sealed, aad, out)
    return size / (time.perf_counter() - start) / MB


def bare_seal_io(path: str, size: int, chunk_size: int, request: int) -> float:
    """The bare loop plus one pwrite per request: the least any engine must do."""
    aead = AESGCM(os.urandom(32))
    stored = chunk_size + CHUNK_OVERHEAD
    per_request = max(1, request // chunk_size)
    source = memoryview(os.urandom(per_request * chunk_size))
    out = memoryview(bytearray(per_request * stored))
    nonce, aad = os.urandom(12), os.urandom(25)
    _fresh(path)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        start = time.perf_counter()
        position = 0
        for _ in range(size // (per_request * chunk_size)):
            for j in range(per_request):
                out[j * stored : j * stored + 12] = nonce
                aead.encrypt_into(
                    nonce,
                    source[j * chunk_size : (j + 1) * chunk_size],
                    aad,
                    out[j * stored + 12 : (j + 1) * stored],
                )
            os.pwrite(fd, out, position)
            position += len(out)
        elapsed = time.perf_counter() - start
    finally:
        os.close(fd)
    return size / elapsed / MB


def bare_open_io(path: str, size: int, chunk_size: int, request: int) -> float:
    """One preadv per request plus the bare decrypt loop (over the file bare_seal_io left)."""
    aead = AESGCM(os.urandom(32))
    stored = chunk_size + CHUNK_OVERHEAD
    per_request = max(1, request // chunk_size)
    nonce, aad = os.urandom(12), os.urandom(25)
    sealed = aead.encrypt(nonce, os.urandom(chunk_size), aad)
    cipher = memoryview(bytearray(per_request * stored))
    plain = memoryview(bytearray(per_request * chunk_size))
    fd = os.open(path, os.O_RDONLY)
    try:
        start = time.perf_counter()
        position = 0
        for _ in range(size // (per_request * chunk_size)):
            os.preadv(fd, [cipher], position)
            position += len(cipher)
            for j in range(per_request):
                aead.decrypt_into(nonce, sealed, aad, plain[j * chunk_size : (j + 1) * chunk_size])
        elapsed = time.perf_counter() - start
    finally:
        os.close(fd)
    return size / elapsed / MB


def _fresh(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _timed_writes(engine: EncryptedFile, size: int, data: memoryview) -> float:
    """MB/s of writing ``size`` bytes sequentially, ``len(data)`` at a time, then flush."""
    start = time.perf_counter()
    for offset in range(0, size, len(data)):
        engine.write(offset, data)
    engine.flush()
    return size / (time.perf_counter() - start) / MB


def engine_seal(path: str, size: int, chunk_size: int, request: int) -> float:
    """MB/s of sequential ``request``-sized writes through the engine into a new file."""
    provider = _PROVIDER
    data = memoryview(os.urandom(request))
    _fresh(path)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        engine = EncryptedFile.open(
            fd, key_provider=provider, key_id="bench", chunk_size=chunk_size
        )
        return _timed_writes(engine, size, data)
    finally:
        os.close(fd)


def engine_overwrite(path: str, size: int, request: int) -> float:
    """MB/s of sequential writes through the engine over an existing file (warm cache)."""
    data = memoryview(os.urandom(request))
    fd = os.open(path, os.O_RDWR)
    try:
        engine = EncryptedFile.open(fd, key_provider=_PROVIDER)
        return _timed_writes(engine, size, data)
    finally:
        os.close(fd)


def _codec_run(chunk_size: int, request: int) -> tuple[ChunkCodec, int, list[memoryview]]:
    """A codec under a fresh key and one request's worth of random chunk plaintexts."""
    codec = ChunkCodec(FileKeys.derive(os.urandom(32), os.urandom(16)), chunk_size)
    per_request = max(1, request // chunk_size)
    source = memoryview(os.urandom(per_request * chunk_size))
    plaintexts = [source[j * chunk_size : (j + 1) * chunk_size] for j in range(per_request)]
    return codec, per_request, plaintexts


def codec_seal(size: int, chunk_size: int, request: int) -> float:
    """MB/s of the engine's own sealing path (ChunkCodec.seal_into, nonces included), no I/O."""
    codec, per_request, plaintexts = _codec_run(chunk_size, request)
    out = memoryview(bytearray(per_request * (chunk_size + CHUNK_OVERHEAD)))
    rounds = size // (per_request * chunk_size)
    start = time.perf_counter()
    for r in range(rounds):
        codec.seal_into(out, r * per_request, plaintexts, final=False)
    return size / (time.perf_counter() - start) / MB


def codec_open(size: int, chunk_size: int, request: int) -> float:
    """MB/s of the engine's own opening path (ChunkCodec.open_into), no I/O."""
    codec, per_request, plaintexts = _codec_run(chunk_size, request)
    cipher = memoryview(bytearray(per_request * (chunk_size + CHUNK_OVERHEAD)))
    codec.seal_into(cipher, 0, plaintexts, final=False)
    plain = memoryview(bytearray(per_request * chunk_size))
    rounds = size // (per_request * chunk_size)
    start = time.perf_counter()
    for _ in range(rounds):
        codec.open_into(cipher, 0, plain, 0, -1)
    return size / (time.perf_counter() - start) / MB


def engine_open(path: str, size: int, provider: BenchKeyProvider, request: int) -> float:
    """MB/s of sequential ``request``-sized readinto calls through the engine (warm cache)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        engine = EncryptedFile.open(fd, key_provider=provider, writable=False)
        buffer = bytearray(request)
        start = time.perf_counter()
        for offset in range(0, size, request):
            engine.readinto(offset, buffer)
        elapsed = time.perf_counter() - start
    finally:
        os.close(fd)
    return size / elapsed / MB


def make_engine_file(path: str, size: int, chunk_size: int, provider: BenchKeyProvider) -> None:
    _fresh(path)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        engine = EncryptedFile.open(
            fd, key_provider=provider, key_id="bench", chunk_size=chunk_size
        )
        block = memoryview(os.urandom(min(size, 4 * MIB)))
        for offset in range(0, size, len(block)):
            engine.write(offset, block[: min(len(block), size - offset)])
        engine.flush()
    finally:
        os.close(fd)


# ---------------------------------------------------------------------- random
def random_ops(
    path: str, file_size: int, provider: BenchKeyProvider, ops: int, *, write: bool, seed: int
) -> float:
    """4 KiB ops/s at random 4 KiB-aligned offsets through the engine."""
    rng = random.Random(seed)
    offsets = [rng.randrange(0, file_size // 4096) * 4096 for _ in range(ops)]
    fd = os.open(path, os.O_RDWR)
    try:
        engine = EncryptedFile.open(fd, key_provider=provider, writable=write)
        buffer = bytearray(4096)
        data = os.urandom(4096)
        start = time.perf_counter()
        if write:
            for offset in offsets:
                engine.write(offset, data)
            engine.flush()
        else:
            for offset in offsets:
                engine.readinto(offset, buffer)
        elapsed = time.perf_counter() - start
    finally:
        os.close(fd)
    return ops / elapsed


def plain_random_ops(path: str, file_size: int, ops: int, *, write: bool, seed: int) -> float:
    rng = random.Random(seed)
    offsets = [rng.randrange(0, file_size // 4096) * 4096 for _ in range(ops)]
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        if os.fstat(fd).st_size < file_size:
            block = os.urandom(4 * MIB)
            for offset in range(0, file_size, len(block)):
                os.pwrite(fd, block, offset)
        buffer = bytearray(4096)
        data = os.urandom(4096)
        start = time.perf_counter()
        if write:
            for offset in offsets:
                os.pwrite(fd, data, offset)
        else:
            for offset in offsets:
                os.preadv(fd, [buffer], offset)
        elapsed = time.perf_counter() - start
    finally:
        os.close(fd)
    return ops / elapsed


# ------------------------------------------------------------------------- GIL
def gil_check(chunk_size: int, total: int) -> tuple[float, float]:
    """MB/s of one thread vs two threads sealing the same amount (cache-hot buffers)."""
    aead = AESGCM(os.urandom(32))
    nonce, aad = os.urandom(12), b"a" * 25

    def work(amount: int) -> None:
        data = os.urandom(chunk_size)
        out = bytearray(chunk_size + 16)
        for _ in range(amount // chunk_size):
            aead.encrypt_into(nonce, data, aad, out)

    start = time.perf_counter()
    work(total)
    one = total / (time.perf_counter() - start) / MB
    threads = [threading.Thread(target=work, args=(total // 2,)) for _ in range(2)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    two = total / (time.perf_counter() - start) / MB
    return one, two


def split_batch_check(chunk_size: int, batch: int, rounds: int) -> tuple[float, float]:
    """MB/s sealing ``batch``-byte batches of fresh data in one thread vs split with a worker."""
    aead = AESGCM(os.urandom(32))
    stored = chunk_size + CHUNK_OVERHEAD
    count = batch // chunk_size
    sources = [memoryview(os.urandom(batch)) for _ in range(4)]
    out = memoryview(bytearray(count * stored))
    nonces = os.urandom(12 * count)
    aad = b"a" * 25
    pool = ThreadPoolExecutor(1)
    pool.submit(int).result()
    out[:] = bytes(len(out))  # fault the pages in before timing

    def seal(source: memoryview, low: int, high: int) -> None:
        for j in range(low, high):
            nonce = nonces[12 * j : 12 * j + 12]
            out[j * stored : j * stored + 12] = nonce
            aead.encrypt_into(
                nonce,
                source[j * chunk_size : (j + 1) * chunk_size],
                aad,
                out[j * stored + 12 : (j + 1) * stored],
            )

    seal(sources[0], 0, count)
    start = time.perf_counter()
    for r in range(rounds):
        seal(sources[r % 4], 0, count)
    single = rounds * batch / (time.perf_counter() - start) / MB
    start = time.perf_counter()
    for r in range(rounds):
        future = pool.submit(seal, sources[r % 4], 0, count // 2)
        seal(sources[r % 4], count // 2, count)
        future.result()
    split = rounds * batch / (time.perf_counter() - start) / MB
    pool.shutdown()
    return single, split


# ------------------------------------------------------------------------ pipe
_PIPE_BLOCK = 1 * MIB


def _pattern_block() -> bytes:
    """The 1 MiB block the generator repeats and the checker expects (fixed seed)."""
    return random.Random(20240601).randbytes(_PIPE_BLOCK)


def _peak_rss() -> str:
    """Peak RSS of this process: getrusage's ru_maxrss and the kernel's VmHWM."""
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    hwm = "?"
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    hwm = f"{int(line.split()[1]) / 1024:.1f} MiB"
    except OSError:
        pass
    return f"ru_maxrss {maxrss / 1024:.1f} MiB (VmHWM {hwm})"


def _enlarge_pipe(stream: object) -> None:
    """Ask for 1 MiB pipe buffers (fewer context switches); harmless if refused."""
    try:
        import fcntl

        fcntl.fcntl(stream.fileno(), fcntl.F_SETPIPE_SZ, 1 * MIB)  # type: ignore[attr-defined]
    except (OSError, AttributeError, ValueError):
        pass


def pipe_round_trip(size: int, chunk_size: int) -> None:
    """gen | encrypt_stream | decrypt_stream | check, four processes started by bash.

    bash (a small process) starts them so their getrusage peaks are their own: Linux
    carries a process's peak RSS across fork+exec.
    """
    env = dict(os.environ, KMSFS_BENCH_WRAPPING_KEY=os.urandom(32).hex())
    child = f"{sys.executable} -m kmsfs.format.bench --pipe-child"
    command = (
        f"{child} gen --pipe-size {size} | {child} encrypt --chunk-size {chunk_size} "
        f"| {child} decrypt | {child} check --pipe-size {size}"
    )
    start = time.perf_counter()
    result = subprocess.run(
        ["bash", "-o", "pipefail", "-c", command], env=env, capture_output=True, text=True
    )
    elapsed = time.perf_counter() - start
    print(f"  {human(size)} through gen | encrypt_stream | decrypt_stream | check (4 processes)")
    for line in result.stderr.strip().splitlines():
        print(f"  {line}")
    state = "ok" if result.returncode == 0 else f"FAILED (exit {result.returncode})"
    print(f"  {state}: {size / elapsed / MB:,.0f} MB/s end to end, {elapsed:.1f} s")


def pipe_child(role: str, chunk_size: int, size: int) -> int:
    src, dst = sys.stdin.buffer, sys.stdout.buffer
    if role in ("encrypt", "decrypt", "check"):
        _enlarge_pipe(src)
    if role in ("gen", "encrypt", "decrypt"):
        _enlarge_pipe(dst)
    if role == "gen":
        block = _pattern_block()
        remaining = size
        while remaining:
            count = min(remaining, len(block))
            dst.write(block[:count])
            remaining -= count
        dst.flush()
        return 0
    if role == "check":
        block = _pattern_block()
        buffer = bytearray(len(block))
        total = 0
        while True:
            count = src.readinto(buffer)
            if not count:
                break
            # the decryptor's writes need not align with the generator's blocks
            offset = total % len(block)
            first = min(count, len(block) - offset)
            if buffer[:first] != block[offset : offset + first] or (
                count > first and buffer[first:count] != block[: count - first]
            ):
                print(f"check: MISMATCH at byte {total}", file=sys.stderr)
                return 1
            total += count
        print(f"check: {total} bytes identical to the input; {_peak_rss()}", file=sys.stderr)
        return 0 if total == size else 1
    provider = BenchKeyProvider()
    if role == "encrypt":
        encrypt_stream(src, dst, key_provider=provider, key_id="bench", chunk_size=chunk_size)
    else:
        decrypt_stream(src, dst, key_provider=provider)
    dst.flush()
    print(f"{role}_stream process: peak RSS {_peak_rss()}", file=sys.stderr)
    return 0


# ------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="scripts/bench-format",
        description=(__doc__ or "").split("\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--size", type=parse_size, default=GIB, help="sequential size (1G)")
    parser.add_argument("--chunk-size", type=parse_size, default=DEFAULT_CHUNK_SIZE)
    parser.add_argument("--request", type=parse_size, default=MIB, help="bytes per call (1M)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per figure; medians (3)")
    parser.add_argument("--random-file", type=parse_size, default=256 * MIB)
    parser.add_argument("--random-ops", type=int, default=20000)
    parser.add_argument("--table-size", type=parse_size, default=256 * MIB)
    parser.add_argument("--no-table", action="store_true", help="skip the chunk-size table")
    parser.add_argument("--table-only", action="store_true", help="only the chunk-size table")
    parser.add_argument("--pipe-size", type=parse_size, default=GIB)
    parser.add_argument("--no-pipe", action="store_true", help="skip the pipe round trip")
    parser.add_argument("--dir", default=None, help="where to put the test files (a temp dir)")
    parser.add_argument(
        "--pipe-child", choices=("gen", "encrypt", "decrypt", "check"), help=argparse.SUPPRESS
    )
    args = parser.parse_args(argv)
    if args.pipe_child:
        return pipe_child(args.pipe_child, args.chunk_size, args.pipe_size)

    workdir = tempfile.mkdtemp(prefix="kmsfs-bench-", dir=args.dir)
    try:
        run(args, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


def run(args: argparse.Namespace, workdir: str) -> None:
    repeat = args.repeat
    chunk = args.chunk_size
    path = os.path.join(workdir, "engine.bin")
    peer = os.path.join(workdir, "peer.bin")
    provider = _PROVIDER
    print(
        f"kmsfs format benchmark — {os.cpu_count()} CPUs, Python {sys.version.split()[0]}, "
        f"medians of {repeat}; files in {workdir}"
    )
    if not args.table_only:
        size = args.size
        print(
            f"\n1. Sequential, {human(size)} in {human(args.request)} requests, "
            f"chunk {human(chunk)} (MB/s = 10^6 B/s)"
        )
        seal_bare = median_of(repeat, lambda: bare_seal(size, chunk))
        seal_io = median_of(repeat, lambda: bare_seal_io(peer, size, chunk, args.request))
        seal_engine = median_of(repeat, lambda: engine_seal(path, size, chunk, args.request))
        seal_over = median_of(repeat, lambda: engine_overwrite(path, size, args.request))
        seal_codec = median_of(repeat, lambda: codec_seal(size, chunk, args.request))
        open_bare = median_of(repeat, lambda: bare_open(size, chunk))
        open_io = median_of(repeat, lambda: bare_open_io(peer, size, chunk, args.request))
        _fresh(peer)
        open_engine = median_of(repeat, lambda: engine_open(path, size, _PROVIDER, args.request))
        open_codec = median_of(repeat, lambda: codec_open(size, chunk, args.request))
        print(
            "  engine = EncryptedFile.write/readinto on a backing file; codec = the engine's\n"
            "  seal/open loop without I/O; bare = AESGCM encrypt_into/decrypt_into in a loop;\n"
            "  bare+I/O = that loop plus one pwrite/preadv per request (same files, same sizes)"
        )
        print(f"  {'':30}{'MB/s':>8}{'vs bare':>9}{'vs bare+I/O':>13}")
        print(f"  {'bare AESGCM seal':30}{seal_bare:8,.0f}")
        print(f"  {'bare AESGCM seal + pwrite':30}{seal_io:8,.0f}")
        for label, value in (
            ("codec seal (no I/O)", seal_codec),
            ("engine seal, new file", seal_engine),
            ("engine seal, overwrite", seal_over),
        ):
            print(f"  {label:30}{value:8,.0f}{value / seal_bare:9.0%}{value / seal_io:13.0%}")
        print(f"  {'bare AESGCM open':30}{open_bare:8,.0f}")
        print(f"  {'bare preadv + AESGCM open':30}{open_io:8,.0f}")
        for label, value in (
            ("codec open (no I/O)", open_codec),
            ("engine open, warm cache", open_engine),
        ):
            print(f"  {label:30}{value:8,.0f}{value / open_bare:9.0%}{value / open_io:13.0%}")
        _fresh(path)

        print(
            f"\n2. Random 4 KiB ops/s, {human(args.random_file)} file, {args.random_ops} ops, "
            f"chunk {human(chunk)}"
        )
        make_engine_file(path, args.random_file, chunk, provider)
        engine_provider = _PROVIDER
        rows = []
        for write in (False, True):
            engine = median_of(
                repeat,
                lambda w=write: random_ops(
                    path, args.random_file, engine_provider, args.random_ops, write=w, seed=1
                ),
            )
            plain = median_of(
                repeat,
                lambda w=write: plain_random_ops(
                    peer, args.random_file, args.random_ops, write=w, seed=1
                ),
            )
            rows.append(("write" if write else "read", engine, plain))
        print(f"  {'':10}{'engine':>10}{'plain file':>12}{'ratio':>8}")
        for label, engine, plain in rows:
            print(f"  {label:10}{engine:10,.0f}{plain:12,.0f}{engine / plain:8.0%}")
        _fresh(path)
        _fresh(peer)

    if not args.no_table:
        table(args, workdir, provider)

    if not args.table_only:
        gil_section(chunk, repeat)

    if not args.no_pipe and not args.table_only:
        print(f"\n5. Pipe round trip in bounded memory (chunk {human(chunk)})")
        pipe_round_trip(args.pipe_size, chunk)


def gil_section(chunk: int, repeat: int) -> None:
    print("\n4. Does AESGCM release the GIL? (one thread vs two threads, same total work)")
    for size in (4 * KIB, 64 * KIB, 1 * MIB):
        pairs = sorted(
            (gil_check(size, 256 * MIB) for _ in range(repeat)), key=lambda p: p[1] / p[0]
        )
        one, two = pairs[len(pairs) // 2]
        print(
            f"  {human(size):>8} calls, cache-hot: 1 thread {one:8,.0f}  "
            f"2 threads {two:8,.0f} MB/s ({two / one:.2f}x)"
        )
    for batch in (1 * MIB, 4 * MIB, 16 * MIB):
        pairs = sorted(
            (split_batch_check(chunk, batch, max(4, 256 * MIB // batch)) for _ in range(repeat)),
            key=lambda p: p[1] / p[0],
        )
        single, split = pairs[len(pairs) // 2]
        print(
            f"  engine-style batch {human(batch):>7} of fresh data: main thread {single:8,.0f}, "
            f"split with a worker {split:8,.0f} MB/s ({split / single:.2f}x)"
        )


def table(args: argparse.Namespace, workdir: str, provider: BenchKeyProvider) -> None:
    size = args.table_size
    ops = max(1000, args.random_ops // 4)
    path = os.path.join(workdir, "table.bin")
    print(
        f"\n3. Chunk size table: sequential over {human(size)} in {human(args.request)} requests, "
        f"{ops} random 4 KiB ops on a {human(min(size, args.random_file))} file"
    )
    print(
        f"  {'chunk':>8}{'bare seal':>11}{'seal':>8}{'open':>8}{'rand read/s':>13}"
        f"{'rand write/s':>14}{'overhead':>10}{'10 GiB hole':>13}"
    )
    for chunk in TABLE_SIZES:
        request = max(args.request, chunk)
        bare = median_of(args.repeat, lambda c=chunk: bare_seal(size, c))
        seal = median_of(args.repeat, lambda c=chunk, r=request: engine_seal(path, size, c, r))
        opened = median_of(args.repeat, lambda r=request: engine_open(path, size, _PROVIDER, r))
        random_size = min(size, args.random_file)
        make_engine_file(path, random_size, chunk, _PROVIDER)
        reads = median_of(
            args.repeat,
            lambda n=random_size: random_ops(path, n, _PROVIDER, ops, write=False, seed=2),
        )
        writes = median_of(
            args.repeat,
            lambda n=random_size: random_ops(path, n, _PROVIDER, ops, write=True, seed=3),
        )
        overhead = CHUNK_OVERHEAD / chunk
        # format version 1: one 4 KiB page per chunk (version 2: one marker, 8 KiB in all)
        hole_disk = f"{(10 * GIB // chunk) * 4096 // MIB:,} MiB"
        marker = " <- default" if chunk == DEFAULT_CHUNK_SIZE else ""
        print(
            f"  {human(chunk):>8}{bare:11,.0f}{seal:8,.0f}{opened:8,.0f}{reads:13,.0f}"
            f"{writes:14,.0f}{overhead:10.2%}{hole_disk:>13}{marker}"
        )
        _fresh(path)


if __name__ == "__main__":
    sys.exit(main())
