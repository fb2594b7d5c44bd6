"""The offline tools against a real keyd: kmsfs encrypt / decrypt / inspect, kmsfs.open."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import kmsfs
from kmsfs.format import HEADER_SIZE
from tests.conftest import KMSFS, Keyd


@pytest.fixture
def keyd_with_key(live_keyd: Keyd) -> Keyd:
    live_keyd.kmsfs("keys", "create", "--alias", "alias/files")
    return live_keyd


def test_encrypt_decrypt_files_and_inspect(keyd_with_key: Keyd, short_tmp: Path) -> None:
    keyd = keyd_with_key
    plain = short_tmp / "plain"
    marker = b"PLANTED-MARKER-FOR-THE-SCAN"
    plain.write_bytes(os.urandom(100_000) + marker + os.urandom(200_000))
    cipher, back = short_tmp / "cipher", short_tmp / "back"
    keyd.kmsfs("encrypt", "--key", "alias/files", "--context", "app=x", str(plain), str(cipher))
    assert marker not in cipher.read_bytes()
    keyd.kmsfs("decrypt", str(cipher), str(back))
    assert back.read_bytes() == plain.read_bytes()

    info = json.loads(keyd.kmsfs("inspect", "--json", str(cipher)).stdout)
    assert info["PlaintextSize"] == plain.stat().st_size
    assert info["FormatVersion"] == 2 and info["ChunkSize"] == 65536
    assert info["KeyArn"].startswith("arn:aws:kms:") and info["KeyVersion"] == 1
    assert info["EncryptionContext"] == "app=x"
    verified = json.loads(keyd.kmsfs("inspect", "--verify", "--json", str(cipher)).stdout)
    assert verified["Verified"] == "ok" and verified["Chunks"] == 5


def test_exit_codes_tell_corrupt_data_from_missing_key(keyd_with_key: Keyd, short_tmp: Path):
    keyd = keyd_with_key
    plain, cipher, out = short_tmp / "p", short_tmp / "c", short_tmp / "o"
    plain.write_bytes(os.urandom(200_000))
    keyd.kmsfs("encrypt", "--key", "alias/files", str(plain), str(cipher))
    damaged = bytearray(cipher.read_bytes())
    damaged[HEADER_SIZE + 65536 + 28 + 100] ^= 0x01  # inside chunk 1
    cipher.write_bytes(bytes(damaged))

    verify = keyd.kmsfs("inspect", "--verify", str(cipher), check=False)
    assert verify.returncode == 7
    assert b"chunk 1 (plaintext offset 65536" in verify.stderr
    failed = keyd.kmsfs("decrypt", str(cipher), str(out), check=False)
    assert failed.returncode == 7 and not out.exists()  # nothing half-written is left

    wrong_context = keyd.kmsfs("decrypt", "--context", "app=y", str(cipher), "-", check=False)
    assert wrong_context.returncode == 7
    keyd.kmsfs("keys", "disable", "alias/files")
    disabled = keyd.kmsfs("decrypt", str(cipher), str(out), check=False)
    assert disabled.returncode == 3 and b"DisabledException" in disabled.stderr
    usage = keyd.kmsfs("decrypt", str(short_tmp / "missing"), str(out), check=False)
    assert usage.returncode == 2
    keyd.stop()
    down = keyd.kmsfs("decrypt", str(cipher), str(out), check=False)
    assert down.returncode == 4


def _pipe_peaks(keyd: Keyd, size: int) -> list[int]:
    """``size`` bytes through `kmsfs encrypt - - | kmsfs decrypt - -`; the peak resident
    memory (KiB) of each of the two processes."""
    env = keyd.env
    rss_probe = str(Path(__file__).with_name("rss_probe.py"))
    encrypt = subprocess.Popen(
        [sys.executable, rss_probe, "encrypt", "--key", "alias/files", "-", "-"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    decrypt = subprocess.Popen(
        [sys.executable, rss_probe, "decrypt", "-", "-"],
        stdin=encrypt.stdout,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    assert encrypt.stdout is not None and encrypt.stdin is not None
    encrypt.stdout.close()
    sent, received = hashlib.sha256(), hashlib.sha256()
    block = os.urandom(1 << 20)

    import threading

    def feed() -> None:
        for index in range(size >> 20):
            chunk = bytes([index % 251]) + block[1:]
            sent.update(chunk)
            encrypt.stdin.write(chunk)
        encrypt.stdin.close()

    feeder = threading.Thread(target=feed)
    feeder.start()
    assert decrypt.stdout is not None
    total = 0
    while data := decrypt.stdout.read(1 << 20):
        received.update(data)
        total += len(data)
    feeder.join()
    assert encrypt.wait(60) == 0 and decrypt.wait(60) == 0
    assert total == size and sent.digest() == received.digest()
    peaks = []
    for process in (encrypt, decrypt):
        assert process.stderr is not None
        peaks.append(int(process.stderr.read().split()[-1]))
    return peaks


def test_pipes_stream_with_bounded_memory(keyd_with_key: Keyd) -> None:
    """64 MiB through `kmsfs encrypt - - | kmsfs decrypt - -`; neither holds it whole.

    Measured against the same pipeline with 1 MiB: what the interpreter and kmsfs's
    imports take is the same in both, so only what grows with the data counts (a
    fixed ceiling broke each time an import grew)."""
    small = _pipe_peaks(keyd_with_key, 1 << 20)
    large = _pipe_peaks(keyd_with_key, 64 << 20)
    for name, base, peak in zip(("encrypt", "decrypt"), small, large, strict=True):
        assert peak - base < 16 * 1024, f"{name}: peak RSS {base} -> {peak} KiB: not streaming"


def test_kmsfs_open_reads_and_writes_the_format(keyd_with_key: Keyd, short_tmp: Path) -> None:
    path = short_tmp / "doc.enc"
    socket = str(keyd_with_key.socket)
    with kmsfs.open(
        path, "w+b", key="alias/files", keyd_socket=socket, encryption_context={"app": "docs"}
    ) as stream:
        stream.write(b"a" * 70_000)
        stream.seek(65_530)
        stream.write(b"BOUNDARY")
        stream.truncate(80_000)
    with kmsfs.open(path, "rb", keyd_socket=socket, encryption_context={"app": "docs"}) as f:
        data = f.read()
    assert len(data) == 80_000
    assert data[65_530:65_538] == b"BOUNDARY" and data[:10] == b"a" * 10
    assert data[70_000:] == bytes(10_000)
    with kmsfs.open(path, "a", keyd_socket=socket) as text:
        text.write("tail")
    with kmsfs.open(path, "rb", keyd_socket=socket) as f:
        f.seek(-4, os.SEEK_END)
        assert f.read() == b"tail"
    # the CLI decrypts what kmsfs.open wrote
    out = subprocess.run(
        [*KMSFS, "decrypt", str(path), "-"], capture_output=True, env=keyd_with_key.env, check=True
    ).stdout
    assert out == data + b"tail"


def _wait_for_output(process: subprocess.Popen, written: int) -> None:
    """Until ``process`` has written ``written`` bytes (as /proc counts them)."""
    import time

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert process.poll() is None, "decrypt finished before it could be killed"
        with open(f"/proc/{process.pid}/io") as stream:
            counters = dict(line.split(": ") for line in stream.read().splitlines())
        if int(counters["wchar"]) >= written:
            return
        time.sleep(0.01)
    raise AssertionError("decrypt wrote nothing")


def test_a_killed_decrypt_leaves_no_plaintext(keyd_with_key: Keyd, short_tmp: Path) -> None:
    """SIGKILL in the middle of decrypting a large file: no file of it remains anywhere in
    the destination directory (the plaintext was written to an unnamed O_TMPFILE)."""
    import signal

    keyd = keyd_with_key
    source, out_dir = short_tmp / "src", short_tmp / "out"
    out_dir.mkdir()
    plain = source.with_suffix(".plain")
    with open(plain, "wb") as stream:
        for _ in range(160):
            stream.write(os.urandom(1 << 20))
    keyd.kmsfs("encrypt", "--key", "alias/files", str(plain), str(source))
    plain.unlink()
    process = subprocess.Popen(
        [*KMSFS, "decrypt", str(source), str(out_dir / "back")],
        env=keyd.env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_for_output(process, 32 << 20)
    finally:
        process.send_signal(signal.SIGKILL)  # also when the wait failed: nothing left running
        process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL
    assert os.listdir(out_dir) == []


def test_decrypt_without_o_tmpfile_cleans_up_after_a_killed_run(
    keyd_with_key: Keyd, short_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where O_TMPFILE is refused the plaintext goes to a named temporary file; one that a
    killed run left behind (its process gone) is removed by the next run."""
    from kmsfs import cli

    keyd = keyd_with_key
    plain, cipher, out = short_tmp / "p", short_tmp / "c", short_tmp / "out" / "back"
    out.parent.mkdir()
    plain.write_bytes(os.urandom(300_000))
    keyd.kmsfs("encrypt", "--key", "alias/files", str(plain), str(cipher))
    dead = subprocess.Popen(["true"])
    dead.wait()
    leftover = out.parent / f".back.{dead.pid}.kmsfs-part"
    leftover.write_bytes(b"plaintext of a killed run")
    alive = out.parent / f".back.{os.getppid()}.kmsfs-part"  # a running process's: kept
    alive.write_bytes(b"still being written")
    real_open = os.open

    def no_tmpfile(path, flags, *args, **kwargs):
        if flags & os.O_TMPFILE == os.O_TMPFILE:
            raise OSError(95, "Operation not supported")
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", no_tmpfile)
    code = cli.main(["decrypt", "--keyd-socket", str(keyd.socket), str(cipher), str(out)])
    assert code == 0
    assert out.read_bytes() == plain.read_bytes()
    assert sorted(os.listdir(out.parent)) == sorted(["back", alive.name])


def test_an_output_that_is_a_directory_is_one_clear_line(
    keyd_with_key: Keyd, short_tmp: Path
) -> None:
    plain, sealed, directory = short_tmp / "p", short_tmp / "s", short_tmp / "d"
    plain.write_bytes(b"some data")
    directory.mkdir()
    result = keyd_with_key.kmsfs(
        "encrypt", "--key", "alias/files", str(plain), str(directory), check=False
    )
    assert result.returncode != 0
    assert "Traceback" not in result.stderr.decode()
    assert "is a directory" in result.stderr.decode()
    keyd_with_key.kmsfs("encrypt", "--key", "alias/files", str(plain), str(sealed))
    result = keyd_with_key.kmsfs("decrypt", str(sealed), str(directory), check=False)
    assert result.returncode != 0 and "Traceback" not in result.stderr.decode()
    assert os.listdir(directory) == []
