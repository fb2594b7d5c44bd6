"""A shorter way from one FUSE request to the next in pyfuse3's worker loop.

Why: pyfuse3's workers wait for each request in ``_wait_fuse_readable``: take a trio
lock (a checkpoint: one pass of trio's scheduler) and ``wait_readable`` on /dev/fuse.
The worker woken for a request releases the lock on its way out, which wakes the next
worker so that it waits for the fd while the first one runs the request: one more pass
of the scheduler per request, and another task step and epoll registration, even when
the request is answered without ever waiting (most are) and the first worker could just
as well have waited for the next request itself.

How: :func:`install` replaces that function (pyfuse3 looks it up by name on each call)
with :meth:`RequestWaiter.wait`, and wraps each of the filesystem's request handlers
so that the waiter learns when one suspends.

- One worker at a time is *the reader*. It waits for /dev/fuse and keeps the role while
  it runs the request it read: when the handler answers without suspending (no other
  task can have run meanwhile), it comes straight back and waits again. A sequential
  workload (untar, ``ls -lR``) then costs one pass of the scheduler per request.
- A handler that suspends (a keyd round trip, a lock held by another request, a thread)
  hands the role to a parked worker at that moment, so requests keep being read while
  it waits; when it is done it parks in turn.
- Before waiting, a worker asks ``poll()`` with a zero timeout whether a request is
  already waiting and, if one is, returns at once: pyfuse3 reads it before any other
  task can run, since nothing in between yields. The reader keeps asking for up to
  :data:`SPIN_SECONDS` (50 µs; the busy poller's window, ``--busy-poll-us``, bounds it
  and 0 turns it off): a process doing one file operation after another (tar, ``ls
  -l``, ``cat``, ``rm``) sends its next request within tens of µs of the reply, and
  spinning for it is cheaper than a pass of trio's scheduler (``epoll_wait``, the
  task switch, the fd's epoll registration). Measured on the stdlib untar: 3 in 4
  requests arrived within the spin; untar, ``ls -lR``, read-all and ``rm -rf`` took
  20–40% less time; 200 µs was no better than 50. After :data:`MAX_STREAK` requests in
  a row taken without waiting, the worker waits through trio, so other tasks (keyd
  replies, the busy poller, handlers that await) get their turn. A worker woken by epoll
  checks again that the request is still there, since one taking the fast way may have
  read it meanwhile.

:func:`terminate` stands in for ``pyfuse3.terminate``. pyfuse3 counts the workers
waiting inside its own function to decide when to start or stop one; with this one in
place it sees none waiting, so it keeps its full pool of worker tasks (``max_tasks``,
99), all but one parked. They cost a little memory, nothing per request. If a pyfuse3
release stops looking the function up by name, the replacement is simply not used.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import select
import time
import types
from collections.abc import Awaitable, Callable, Coroutine, Generator
from typing import Any

import pyfuse3
import trio

log = logging.getLogger("kmsfs.mount")

#: requests taken without a pass of the scheduler before one is forced
MAX_STREAK = 16
#: how long the reader keeps asking for the next request before it waits through trio
SPIN_SECONDS = 50e-6


class RequestWaiter(trio.abc.Instrument):
    """What pyfuse3's workers call to wait for the next request on /dev/fuse.

    Also a trio instrument: a reader that leaves pyfuse3's loop for good (the kernel
    ended the session, or its request failed) wakes a parked worker as it exits.
    """

    def __init__(self, fd: int, spin: float = 0.0) -> None:
        self.fd = fd
        self.spin = spin
        self.fast = 0  # requests taken at once, for tests
        self.slow = 0  # waits through trio, for tests
        self.spun = 0  # requests taken while spinning, for tests
        self.handoffs = 0  # readers whose request suspended, for tests
        self.closed = False
        self._poll = select.poll()
        self._poll.register(fd, select.POLLIN)
        self._streak = 0
        self._reader: trio.lowlevel.Task | None = None
        self._parked = trio.lowlevel.ParkingLot()

    async def wait(self) -> bool:
        """True when a request can be read now; False when the loop should end."""
        poll = self._poll.poll
        if self._streak < MAX_STREAK and not self.closed:
            if poll(0):
                self._streak += 1
                self.fast += 1
                return True  # no await: the caller reads the request before anyone else
            if self.spin and self._reader is trio.lowlevel.current_task():
                # the app's next request usually follows the reply within tens of µs
                deadline = time.perf_counter() + self.spin
                while time.perf_counter() < deadline:
                    if poll(0):
                        self._streak += 1
                        self.spun += 1
                        return True
        self._streak = 0
        self.slow += 1
        task = trio.lowlevel.current_task()
        if self._reader is None:
            self._reader = task
        elif self._reader is not task:
            await self._parked.park()  # until handed the role (or the session ends)
        try:
            while not self.closed:
                await trio.lowlevel.wait_readable(self.fd)
                # a worker taking the fast way may have read it meanwhile: only
                # return if a request is still there (nothing yields from here on)
                if not self.closed and poll(0):
                    return True  # the reader still, while it runs this request
        except trio.ClosedResourceError:
            pass
        except BaseException:
            self._give_up(task)  # cancelled: someone else must read
            raise
        self._give_up(task)  # closed: the next one wakes, sees it, and so on
        return False

    def handoff(self) -> None:
        """The running request suspends: if its worker was the reader, wake another."""
        if self._reader is trio.lowlevel.current_task():
            self.handoffs += 1
            self._give_up(self._reader)

    def _give_up(self, task: trio.lowlevel.Task) -> None:
        if self._reader is task:
            woken = self._parked.unpark()
            self._reader = woken[0] if woken else None

    def task_exited(self, task: trio.lowlevel.Task) -> None:
        self._give_up(task)

    def close(self) -> None:
        """The session is ending: every waiter, now and later, returns False."""
        self.closed = True
        trio.lowlevel.notify_closing(self.fd)
        self._parked.unpark_all()


@types.coroutine
def _watched(request: Coroutine[Any, Any, Any], waiter: RequestWaiter) -> Generator[Any, Any, Any]:
    """Run one handler's coroutine as ``await`` would, telling ``waiter`` when it suspends."""
    try:
        message = request.send(None)
    except StopIteration as done:
        return done.value  # answered without suspending: most requests
    waiter.handoff()
    while True:  # the rest is ``yield from request``, which cannot resume mid-way
        try:
            sent = yield message
        except GeneratorExit:
            request.close()
            raise
        except BaseException as error:  # noqa: BLE001 - thrown in: passed on as it is
            try:
                message = request.throw(error)
            except StopIteration as done:
                return done.value
        else:
            try:
                message = request.send(sent)
            except StopIteration as done:
                return done.value


def _watch(
    handler: Callable[..., Coroutine[Any, Any, Any]], waiter: RequestWaiter
) -> Callable[..., Awaitable[Any]]:
    def call(*args: Any, **kwargs: Any) -> Awaitable[Any]:
        return _watched(handler(*args, **kwargs), waiter)

    call.__wrapped__ = handler  # type: ignore[attr-defined]
    return call


#: the request handlers pyfuse3 awaits (every coroutine method of pyfuse3.Operations)
HANDLERS = tuple(
    name for name, member in vars(pyfuse3.Operations).items() if inspect.iscoroutinefunction(member)
)

_installed: RequestWaiter | None = None
_original: Callable[[], Awaitable[bool]] | None = None
_watching: object | None = None


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


def install(operations: pyfuse3.Operations, spin: float = SPIN_SECONDS) -> RequestWaiter | None:
    """Call after pyfuse3.init(operations); None (and pyfuse3's own loop) if not possible.
    *spin*: seconds the reader polls for the next request before it waits (0: never)."""
    global _installed, _original, _watching
    original = getattr(pyfuse3, "_wait_fuse_readable", None)
    fd = fuse_fd()
    if original is None or fd is None or _installed is not None:
        log.debug("pyfuse3's request loop is left as it is")
        return None
    _original = original
    waiter = _installed = RequestWaiter(fd, spin)
    for name in HANDLERS:  # instance attributes: what pyfuse3 looks up on each request
        setattr(operations, name, _watch(getattr(operations, name), waiter))
    _watching = operations
    trio.lowlevel.add_instrument(waiter)
    pyfuse3._wait_fuse_readable = waiter.wait  # type: ignore[attr-defined]
    return waiter


def uninstall() -> None:
    """Give pyfuse3 its own function back, and the handlers theirs (the session is over)."""
    global _installed, _original, _watching
    if _original is not None:
        pyfuse3._wait_fuse_readable = _original  # type: ignore[attr-defined]
    if _watching is not None:
        for name in HANDLERS:
            vars(_watching).pop(name, None)
    if _installed is not None:
        with contextlib.suppress(KeyError, RuntimeError):
            trio.lowlevel.remove_instrument(_installed)
    _installed = _original = _watching = None


def terminate() -> None:
    """pyfuse3.terminate(), letting the installed waiter know."""
    if _installed is not None:
        _installed.closed = True
    pyfuse3.terminate()
