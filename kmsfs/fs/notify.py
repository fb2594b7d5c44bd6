"""sd_notify(3) without libsystemd: one datagram to ``$NOTIFY_SOCKET``.

systemd (``Type=notify``) sets NOTIFY_SOCKET to a Unix datagram socket's path, or to
an abstract socket's name written with a leading ``@``; the message is newline-separated
``KEY=VALUE`` lines such as ``READY=1`` (systemd's sd_notify(3) and its reference
implementation in the man page "NOTES"). Nothing happens when the variable is unset.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger("kmsfs.notify")


def sd_notify(state: str) -> bool:
    """Send ``state`` to the service manager; True if it was sent."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address or address[0] not in "/@":
        return False  # unset, or a kind of address (vsock:) not supported here
    target = "\0" + address[1:] if address[0] == "@" else address
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sender:
            sender.sendto(state.encode(), target)
    except OSError as error:
        log.warning("cannot notify the service manager at %s: %s", address, error.strerror)
        return False
    return True
