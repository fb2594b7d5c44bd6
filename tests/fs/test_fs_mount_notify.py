"""``kmsfs mount`` tells a service manager it is ready (sd_notify: ``READY=1`` to
``$NOTIFY_SOCKET``), as a ``Type=notify`` unit needs, and that it is stopping."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fs.helpers import MountFactory, is_mounted

pytestmark = pytest.mark.slow


@pytest.fixture(params=["path", "abstract"])
def notify_socket(
    request: pytest.FixtureRequest, mounts: MountFactory
) -> Iterator[tuple[str, socket.socket]]:
    """A datagram socket standing in for systemd's; its NOTIFY_SOCKET value."""
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if request.param == "path":
        path = mounts.root / f"notify-{os.urandom(3).hex()}"
        receiver.bind(str(path))
        address = str(path)
    else:
        name = f"kmsfs-test-notify-{os.getpid()}-{os.urandom(4).hex()}"
        receiver.bind("\0" + name)
        address = "@" + name
    receiver.settimeout(20)
    try:
        yield address, receiver
    finally:
        receiver.close()
        if request.param == "path":
            Path(address).unlink(missing_ok=True)


def messages_until(receiver: socket.socket, wanted: str) -> list[str]:
    seen = []
    while True:
        message = receiver.recv(4096).decode()
        seen.append(message)
        if wanted in message.splitlines():
            return seen


def test_mount_notifies_ready_then_stopping(
    mounts: MountFactory, notify_socket: tuple[str, socket.socket]
) -> None:
    address, receiver = notify_socket
    mount = mounts.mount(None, None, wrapper=("env", f"NOTIFY_SOCKET={address}"))
    messages = messages_until(receiver, "READY=1")
    assert is_mounted(mount.mnt)  # ready means mounted
    assert any(str(mount.mnt) in message for message in messages)  # STATUS=mounted ...
    mount.unmount_clean()
    messages_until(receiver, "STOPPING=1")
