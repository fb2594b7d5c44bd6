"""A shorter way from one FUSE request to the next in pyfuse3's worker loop.

Why: pyfuse3's workers wait for each request in ``_wait_fuse_readable``: take a trio
lock (a checkpoint: one pass of trio's scheduler) and ``wait_readable`` on /dev/fuse
(the task sleeps until the next pass's ``epoll_wait`` reports the fd). That is two
scheduler passes per request even when the next request is already queued, which is
the usual case under load.

How: :func:`install` replaces that function (pyfuse3 looks it up by name on each call)
with one that first asks ``poll()`` with a zero timeout whether a request is waiting
and, if one is, returns at once: pyfuse3 then reads that request before any other task
can run, since nothing in between yields. Otherwise, and after :data:`MAX_STREAK`
requests in a row, it waits as pyfuse3 does, so other tasks (keyd replies, the busy
poller, handlers that await) get their turn; a worker woken that way checks again that
the request is still there, since one taking the fast way may have read it meanwhile.
:func:`terminate` stands in for ``pyfuse3.terminate``.

pyfuse3 counts the workers waiting inside its own function to decide when to start or
stop one; with this one in place it sees none waiting, so it keeps its full pool of
worker tasks (``max_tasks``, 99), most of them parked on this waiter's lock. They cost
a little memory, nothing per request. If a pyfuse3 release stops looking the function
up by name, the replacement is simply not used.
"""

from __future__ import annotations

import logging
import os
import select
from collections.abc import Awaitable, Callable

import pyfuse3
import trio

log = logging.getLogger("kmsfs.mount")

#: requests taken without a pass of the scheduler before one is forced
MAX_STREAK = 16


class RequestWaiter:
    """What pyfuse3's workers call to wait for the next request on /dev/fuse."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.fast = 0  # requests taken at once, for tests
        self.slow = 0  # waits through trio, for tests
        self.closed = False
        self._lock = trio.Lock()
        self._poll = select.poll()
        self._poll.register(fd, select.POLLIN)
        self._streak = 0

    async def wait(self) -> bool:
        """True when a request can be read now; False when the loop should end."""
        poll = self._poll.poll
        if self._streak < MAX_STREAK and not self.closed and poll(0):
            self._streak += 1
            self.fast += 1
            return True  # no await: the caller reads the request before anyone else
        self._streak = 0
        self.slow += 1
        try:
            async with self._lock:
                while not self.closed:
                    await trio.lowlevel.wait_readable(self.fd)
                    # a worker taking the fast way may have read it meanwhile: only
                    # return if a request is still there (nothing yields from here on)
                    if not self.closed and poll(0):
                        return True
        except trio.ClosedResourceError:
            pass
        return False

    def close(self) -> None:
        """The session is ending: every waiter, now and later, returns False."""
        self.closed = True
        trio.lowlevel.notify_closing(self.fd)


_installed: RequestWaiter | None = None
_original: Callable[[], Awaitable[bool]] | None = None


def fuse_fd() -> int | None:
    """The /dev/fuse descriptor that pyfuse3.init() opened (pyfuse3 does not export it)."""
    found = []
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}") == "/dev/fuse":
                found.append(int(name))
        except OSError:
            continue
    return found[0] if len(found) == 1 else None


def install() -> RequestWaiter | None:
    """Call after pyfuse3.init(); None (and pyfuse3's own loop) if that is not possible."""
    global _installed, _original
    original = getattr(pyfuse3, "_wait_fuse_readable", None)
    fd = fuse_fd()
    if original is None or fd is None or _installed is not None:
        log.debug("pyfuse3's request loop is left as it is")
        return None
    _original = original
    waiter = _installed = RequestWaiter(fd)
    pyfuse3._wait_fuse_readable = waiter.wait  # type: ignore[attr-defined]
    return waiter


def uninstall() -> None:
    """Give pyfuse3 its own function back (the session is over)."""
    global _installed, _original
    if _original is not None:
        pyfuse3._wait_fuse_readable = _original  # type: ignore[attr-defined]
    _installed = _original = None


def terminate() -> None:
    """pyfuse3.terminate(), letting the installed waiter know."""
    if _installed is not None:
        _installed.closed = True
    pyfuse3.terminate()
