"""systemd integration: sd_notify, the generated kmsfs-keyd.service, its ExecStart booted
the way systemd would (NOTIFY_SOCKET, CREDENTIALS_DIRECTORY, SIGTERM), and the fstab line.

No systemd is needed: a datagram socket of the test stands in for the service manager.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from kmsfs.systemd import Notifier
from tests.conftest import KMSFS, Keyd

#: the longest a test waits for keyd to report (a deadline, not a measurement)
DEADLINE = 60.0


class FakeServiceManager:
    """The notification side of systemd: a datagram socket that collects messages."""

    def __init__(self, address: str | bytes) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.settimeout(DEADLINE)
        self.received: list[dict[str, str]] = []

    def wait_for(self, key: str, process: subprocess.Popen[bytes] | None = None) -> dict[str, str]:
        """The first message that sets ``key`` (raises if none comes in time)."""
        while True:
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                exited = "" if process is None else f" (keyd exit status {process.poll()})"
                raise AssertionError(f"no {key} within {DEADLINE} s{exited}") from None
            message = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            self.received.append(message)
            if key in message:
                return message

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def manager(short_tmp: Path) -> Iterator[tuple[str, FakeServiceManager]]:
    address = str(short_tmp / "notify")
    fake = FakeServiceManager(address)
    try:
        yield address, fake
    finally:
        fake.close()


# ------------------------------------------------------------------ sd_notify
def test_notifier_sends_one_datagram_to_a_path(manager) -> None:
    address, fake = manager
    assert Notifier(address).ready("serving")
    assert fake.wait_for("READY") == {"READY": "1", "STATUS": "serving"}


def test_notifier_reaches_the_abstract_namespace() -> None:
    name = f"kmsfs-test-{os.getpid()}"
    fake = FakeServiceManager(b"\0" + name.encode())
    try:
        assert Notifier("@" + name).stopping()
        assert fake.wait_for("STOPPING") == {"STOPPING": "1"}
    finally:
        fake.close()


def test_notifier_without_notify_socket_is_a_no_op(monkeypatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    notifier = Notifier.from_environment()
    assert not notifier.enabled
    assert not notifier.ready()


def test_notifier_takes_the_address_out_of_the_environment(monkeypatch, manager) -> None:
    address, _fake = manager
    monkeypatch.setenv("NOTIFY_SOCKET", address)
    notifier = Notifier.from_environment()
    assert notifier.address == address
    assert "NOTIFY_SOCKET" not in os.environ  # children cannot pose as the main process


def test_notifier_survives_a_vanished_manager(short_tmp: Path) -> None:
    assert not Notifier(str(short_tmp / "nobody-listens")).ready()
    assert not Notifier("vsock:2:1234").ready()


def test_keyd_serve_reports_ready_and_stopping(live_keyd: Keyd, manager) -> None:
    """keyd serve sends READY=1 once its socket answers and STOPPING=1 on SIGTERM."""
    address, fake = manager
    live_keyd.stop()
    env = {**live_keyd.env, "NOTIFY_SOCKET": address}
    process = subprocess.Popen(
        [*KMSFS, *live_keyd.serve_args()],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
    )
    try:
        ready = fake.wait_for("READY", process)
        assert ready["READY"] == "1"
        assert str(live_keyd.socket) in ready.get("STATUS", "")
        # READY=1 means the socket answers now, not soon
        with live_keyd.client() as client:
            assert "Keys" in client.call("ListKeys", {})
        process.send_signal(signal.SIGTERM)
        assert fake.wait_for("STOPPING", process)["STOPPING"] == "1"
        assert process.wait(timeout=DEADLINE) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        assert process.stderr is not None
        process.stderr.close()


# ------------------------------------------------- passphrase sources (--extpass)
def test_extpass_takes_stdout_without_one_trailing_newline() -> None:
    from kmsfs.kms.daemon import extpass_argv, passphrase_from_command

    assert passphrase_from_command(["printf", "secret\\n\\n"]) == b"secret\n"
    assert passphrase_from_command(extpass_argv(["printf 'two words\\n'"])) == b"two words"
    # several values: the command and its arguments as they are (gocryptfs -extpass)
    assert extpass_argv(["echo", "a b"]) == ["echo", "a b"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["sh", "-c", "echo secret-word; exit 3"], "sh exited with status 3; no passphrase"),
        (["sh", "-c", "kill -9 $$"], "sh was killed by signal 9"),
        (["true"], "true printed no passphrase"),
        (["head", "-c", "5000", "/dev/zero"], "head printed more than 2048 bytes"),
        (["/nonexistent/askpass"], "cannot run /nonexistent/askpass"),
    ],
)
def test_extpass_failures_are_clear_and_never_show_the_output(argv, message) -> None:
    from kmsfs.errors import KeystoreError
    from kmsfs.kms.daemon import passphrase_from_command

    with pytest.raises(KeystoreError) as caught:
        passphrase_from_command(argv)
    assert message in str(caught.value)
    assert "secret-word" not in str(caught.value)


def test_credentials_are_read_from_the_credentials_directory(short_tmp, monkeypatch) -> None:
    from kmsfs.errors import KeystoreInsecure, UsageError
    from kmsfs.kms.daemon import source_from_credential

    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    with pytest.raises(UsageError, match="LoadCredential=kmsfs-passphrase"):
        source_from_credential("kmsfs-passphrase", root_key=False)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(short_tmp))
    credential = short_tmp / "kmsfs-passphrase"
    credential.write_bytes(b"correct horse\n")
    credential.chmod(0o400)  # as systemd makes it
    assert source_from_credential("kmsfs-passphrase", root_key=False).passphrase == b"correct horse"
    credential.chmod(0o644)  # a passphrase others can read is refused, as everywhere
    with pytest.raises(KeystoreInsecure, match="chmod 600"):
        source_from_credential("kmsfs-passphrase", root_key=False)
    with pytest.raises(UsageError, match="not a plain file name"):
        source_from_credential("../etc/shadow", root_key=False)
    key = source_from_credential("kmsfs-root-key", root_key=True)
    assert key.key_file == short_tmp / "kmsfs-root-key"
