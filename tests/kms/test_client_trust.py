"""Clients trust only a keyd run by an expected user (issue 12, socket squatting).

A fake keyd here is a small server run as another user (``setpriv`` to ``nobody``) that
answers every request with an all-zero "data key" and counts the bytes it received.
Each refusal must come before the client sends a single byte.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from kmsfs.errors import KeydUnavailable, KeydUntrusted, UsageError
from kmsfs.kms.client import AsyncKMSClient, KMSClient
from kmsfs.kms.paths import SOCKET_ENV
from kmsfs.kms.trust import KEYD_UID_ENV, named_keyd_uids
from tests.conftest import run_kmsfs
from tests.fs.helpers import run_as_child

NOBODY = 65534

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None,
    reason="needs root and setpriv to run a keyd as another user",
)

# The fake keyd: listens (on a path it binds, or on a bound socket it is handed), answers
# every complete request with a canned success, and when its stdin closes takes every
# connection still queued, reads what they hold and prints the bytes received in all.
FAKE_KEYD = r"""
import base64, json, os, select, socket, sys
mode, where = sys.argv[1], sys.argv[2]
dir_mode, sock_mode = int(sys.argv[3], 8), int(sys.argv[4], 8)
if mode == "fd":
    listener = socket.socket(fileno=int(where))
else:
    os.makedirs(os.path.dirname(where), exist_ok=True)
    os.chmod(os.path.dirname(where), dir_mode)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(where)
    os.chmod(where, sock_mode)
listener.listen(16)
listener.setblocking(False)
zero = base64.b64encode(bytes(32)).decode()
arn = "arn:aws:kms:local:000000000000:key/00000000-0000-0000-0000-000000000000"
body = json.dumps({
    "KeyId": arn, "Plaintext": zero, "CiphertextBlob": zero, "Keys": [], "Aliases": [],
    "KeyMetadata": {"KeyId": arn, "Arn": arn, "KeyState": "Enabled"},
}).encode()
answer = (b"HTTP/1.1 200 OK\r\nContent-Type: application/x-amz-json-1.1\r\n"
          b"Content-Length: %d\r\n\r\n" % len(body)) + body
received = 0
buffers = {}

def take():
    while True:
        try:
            conn, _ = listener.accept()
        except BlockingIOError:
            return
        conn.setblocking(False)
        buffers[conn] = b""

def read(conn):
    global received
    try:
        data = conn.recv(65536)
    except BlockingIOError:
        return True
    except OSError:
        data = b""
    if not data:
        conn.close()
        del buffers[conn]
        return False
    received += len(data)
    buffers[conn] += data
    head, sep, rest = buffers[conn].partition(b"\r\n\r\n")
    if sep:
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        if len(rest) >= length:
            buffers[conn] = rest[length:]
            conn.setblocking(True)
            conn.sendall(answer)
            conn.setblocking(False)
    return True

print("ready", flush=True)
while True:
    readable, _, _ = select.select([sys.stdin, listener, *buffers], [], [])
    if sys.stdin in readable:
        take()
        for conn in list(buffers):
            while read(conn):
                if conn not in buffers or not select.select([conn], [], [], 0)[0]:
                    break
        print(received, flush=True)
        break
    if listener in readable:
        take()
    for conn in readable:
        if conn in buffers:
            read(conn)
"""


class FakeKeyd:
    """The fake keyd running as ``uid``; :meth:`finish` stops it and says what it read."""

    def __init__(self, process: subprocess.Popen[bytes], path: Path) -> None:
        self.process = process
        self.path = path

    def finish(self) -> int:
        """Stop the fake keyd; the number of request bytes it received in all."""
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.close()
        out = self.process.stdout.read().decode()
        self.process.wait(timeout=30)
        return int(out.split()[-1])


@pytest.fixture
def fake_keyd() -> Iterator[Callable[..., FakeKeyd]]:
    """Start fake keyds as another user (``nobody``); all stopped at teardown."""
    started: list[FakeKeyd] = []

    def start(
        path: Path,
        *,
        uid: int = NOBODY,
        listen_fd: int | None = None,
        dir_mode: int = 0o755,
        sock_mode: int = 0o666,
    ) -> FakeKeyd:
        mode, where = ("fd", str(listen_fd)) if listen_fd is not None else ("bind", str(path))
        process = subprocess.Popen(
            [
                "setpriv",
                f"--reuid={uid}",
                f"--regid={uid}",
                "--clear-groups",
                sys.executable,
                "-I",
                "-c",
                FAKE_KEYD,
                mode,
                where,
                oct(dir_mode),
                oct(sock_mode),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            pass_fds=() if listen_fd is None else (listen_fd,),
        )
        fake = FakeKeyd(process, path)
        started.append(fake)
        assert process.stdout is not None
        assert process.stdout.readline() == b"ready\n", "the fake keyd did not start"
        return fake

    yield start
    for fake in started:
        if fake.process.poll() is None:
            fake.process.kill()
            fake.process.wait(timeout=30)


@pytest.fixture
def shared_tmp(short_tmp: Path) -> Path:
    """``short_tmp`` made like ``/tmp`` (root's, sticky, writable by all): where a squatter
    can make a directory of its own."""
    short_tmp.chmod(0o1777)
    return short_tmp


def ask_keyd(kind: str, socket_path: Path | None, **options: Any) -> tuple[str, str]:
    """GenerateDataKey through a sync or async client: ("refused", the error's line) or
    ("answered", the plaintext key in hex)."""
    try:
        if kind == "sync":
            with KMSClient(socket_path, timeout=5, **options) as client:
                result = client.generate_data_key("alias/files")
        else:

            async def ask() -> dict[str, Any]:
                async with AsyncKMSClient(socket_path, timeout=5, **options) as client:
                    return await client.generate_data_key("alias/files")

            result = trio.run(ask)
    except KeydUntrusted as error:
        return "refused", str(error)
    return "answered", result["Plaintext"].hex()


KINDS = pytest.mark.parametrize("kind", ["sync", "async"])


# ------------------------------------------------------------- the squatter
@KINDS
def test_squatted_fallback_directory_is_refused(
    kind: str, fake_keyd: Callable[..., FakeKeyd]
) -> None:
    """The issue's attack: no XDG_RUNTIME_DIR, another user made /tmp/kmsfs-<uid> first."""
    victim = 40000 + os.getpid() % 20000
    squatted = Path(f"/tmp/kmsfs-{victim}")
    if squatted.exists():
        pytest.skip(f"{squatted} exists already")
    try:
        fake = fake_keyd(squatted / "keyd.sock", dir_mode=0o777, sock_mode=0o777)

        def as_victim() -> tuple[str, str]:
            os.environ.pop("XDG_RUNTIME_DIR", None)
            os.environ.pop(SOCKET_ENV, None)
            os.environ.pop(KEYD_UID_ENV, None)
            return ask_keyd(kind, None)

        outcome, detail = run_as_child(as_victim, uid=victim)
        assert outcome == "refused", f"the victim took key {detail} from the squatter"
        assert str(squatted) in detail
        assert "owned by uid 65534" in detail
        assert "\n" not in detail
        assert fake.finish() == 0
    finally:
        shutil.rmtree(squatted, ignore_errors=True)


@KINDS
def test_explicit_socket_in_a_foreign_directory_is_refused(
    kind: str, shared_tmp: Path, fake_keyd: Callable[..., FakeKeyd]
) -> None:
    path = shared_tmp / "theirs" / "keyd.sock"
    fake = fake_keyd(path)
    outcome, detail = ask_keyd(kind, path)
    assert outcome == "refused", f"took key {detail} from another user's keyd"
    assert f"its directory {path.parent} is owned by uid {NOBODY}" in detail
    assert fake.finish() == 0


@KINDS
def test_peer_running_as_another_user_is_refused(
    kind: str, short_tmp: Path, fake_keyd: Callable[..., FakeKeyd]
) -> None:
    """Directory and socket file are root's; only the listening process is not (SO_PEERCRED
    names whoever called listen(), here nobody, on a socket root bound)."""
    path = short_tmp / "peer.sock"
    bound = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        bound.bind(os.fspath(path))
        fake = fake_keyd(path, listen_fd=bound.fileno())
    finally:
        bound.close()
    assert os.lstat(path).st_uid == 0
    outcome, detail = ask_keyd(kind, path)
    assert outcome == "refused", f"took key {detail} from a keyd running as nobody"
    assert f"runs as uid {NOBODY} (nobody)" in detail
    assert str(path) in detail
    assert fake.finish() == 0


@KINDS
def test_socket_file_owned_by_another_user_is_refused(kind: str, short_tmp: Path) -> None:
    path = short_tmp / "chowned.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(os.fspath(path))
        listener.listen(1)
        os.chown(path, NOBODY, NOBODY)
        with pytest.raises(KeydUntrusted, match=rf"the socket is owned by uid {NOBODY}"):
            _raise_untrusted(kind, path)
    finally:
        listener.close()


def _raise_untrusted(kind: str, path: Path) -> None:
    """Like ask_keyd, but lets KeydUntrusted out."""
    if kind == "sync":
        with KMSClient(path, timeout=5) as client:
            client.generate_data_key("alias/files")
    else:

        async def ask() -> None:
            async with AsyncKMSClient(path, timeout=5) as client:
                await client.generate_data_key("alias/files")

        trio.run(ask)


@KINDS
@pytest.mark.parametrize("mode", [0o775, 0o757, 0o1777], ids=["group", "other", "sticky"])
def test_socket_directory_writable_by_others_is_refused(
    kind: str, mode: int, short_tmp: Path
) -> None:
    """Even root's own directory: anyone who may write in it may replace the socket (and a
    sticky directory lets anyone take the name first)."""
    directory = short_tmp / "open"
    directory.mkdir()
    directory.chmod(mode)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(os.fspath(directory / "keyd.sock"))
        listener.listen(1)
        with pytest.raises(KeydUntrusted, match="writable by other users"):
            _raise_untrusted(kind, directory / "keyd.sock")
    finally:
        listener.close()


@KINDS
def test_a_symlink_is_judged_by_where_it_leads(
    kind: str, shared_tmp: Path, fake_keyd: Callable[..., FakeKeyd]
) -> None:
    theirs = shared_tmp / "theirs" / "keyd.sock"
    fake = fake_keyd(theirs)
    link = shared_tmp / "mine.sock"
    link.symlink_to(theirs)
    outcome, detail = ask_keyd(kind, link)
    assert outcome == "refused"
    assert f"{theirs.parent} is owned by uid {NOBODY}" in detail
    assert fake.finish() == 0


@KINDS
def test_not_a_socket_is_refused(kind: str, short_tmp: Path) -> None:
    (short_tmp / "file.sock").write_bytes(b"")
    with pytest.raises(KeydUntrusted, match="is not a socket"):
        _raise_untrusted(kind, short_tmp / "file.sock")


@KINDS
def test_missing_socket_is_still_unavailable(kind: str, short_tmp: Path) -> None:
    with pytest.raises(KeydUnavailable, match="no socket there") as caught:
        _raise_untrusted(kind, short_tmp / "none.sock")
    assert not isinstance(caught.value, KeydUntrusted)


# ----------------------------------------------------- the named service account
@KINDS
@pytest.mark.parametrize("how", ["env-uid", "env-name", "option"])
def test_a_named_service_account_is_trusted(
    kind: str,
    how: str,
    shared_tmp: Path,
    fake_keyd: Callable[..., FakeKeyd],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A system keyd under its own user: KMSFS_KEYD_UID (uid or name) or keyd_uid=."""
    path = shared_tmp / "service" / "keyd.sock"
    fake = fake_keyd(path, dir_mode=0o755)
    options: dict[str, Any] = {}
    if how == "env-uid":
        monkeypatch.setenv(KEYD_UID_ENV, str(NOBODY))
    elif how == "env-name":
        monkeypatch.setenv(KEYD_UID_ENV, pwd.getpwuid(NOBODY).pw_name)
    else:
        monkeypatch.delenv(KEYD_UID_ENV, raising=False)
        options["keyd_uid"] = NOBODY
    outcome, detail = ask_keyd(kind, path, **options)
    assert outcome == "answered", detail
    assert fake.finish() > 0


def test_named_keyd_uids_parsing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(KEYD_UID_ENV, raising=False)
    assert named_keyd_uids() == frozenset()
    assert named_keyd_uids("nobody, 1234") == {NOBODY, 1234}
    monkeypatch.setenv(KEYD_UID_ENV, "4321")
    assert named_keyd_uids() == {4321}
    assert named_keyd_uids("7") == {7}  # the option wins over the environment
    with pytest.raises(UsageError, match="no user 'no-such-user-here'"):
        named_keyd_uids("no-such-user-here")


# -------------------------------------------------------------------- the CLI
def test_cli_refuses_in_one_line_and_keyd_uid_allows(
    shared_tmp: Path, fake_keyd: Callable[..., FakeKeyd]
) -> None:
    path = shared_tmp / "theirs" / "keyd.sock"
    fake = fake_keyd(path)
    env = {k: v for k, v in os.environ.items() if k not in (KEYD_UID_ENV, SOCKET_ENV)}
    result = run_kmsfs("keys", "list", "--keyd-socket", str(path), env=env, check=False)
    lines = result.stderr.decode().strip().splitlines()
    assert len(lines) == 1, lines
    assert result.returncode == 4
    assert str(path) in lines[0] and f"owned by uid {NOBODY} (nobody)" in lines[0]
    assert fake.finish() == 0

    path = shared_tmp / "service" / "keyd.sock"
    fake = fake_keyd(path)
    result = run_kmsfs(
        "keys", "list", "--keyd-socket", str(path), "--keyd-uid", "nobody", env=env, check=False
    )
    assert result.returncode == 0, result.stderr.decode()
    assert fake.finish() > 0


def test_real_keyd_in_a_private_directory_is_trusted(keyd: Any) -> None:
    """The ordinary case still works (and its directory is what keyd makes)."""
    directory = os.lstat(Path(keyd.socket_path).parent)
    assert not directory.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
    with KMSClient(keyd.socket_path) as client:
        assert client.call("Echo", {"KeyId": "k"}) == {"Params": {"KeyId": "k"}}


def test_keyd_stop_signals_only_a_trusted_keyd(
    shared_tmp: Path, fake_keyd: Callable[..., FakeKeyd]
) -> None:
    """`kmsfs keyd stop` sent SIGTERM to whatever process answered on the socket; it now
    makes the clients' checks first, so another user's keyd is refused and left running."""
    path = shared_tmp / "theirs" / "keyd.sock"
    fake = fake_keyd(path)
    env = {k: v for k, v in os.environ.items() if k not in (KEYD_UID_ENV, SOCKET_ENV)}
    result = run_kmsfs("keyd", "stop", "--socket", str(path), env=env, check=False)
    lines = result.stderr.decode().strip().splitlines()
    assert result.returncode == 4, lines
    assert len(lines) == 1 and f"owned by uid {NOBODY} (nobody)" in lines[0], lines
    assert fake.process.poll() is None, "keyd stop killed another user's process"
    assert fake.finish() == 0
