"""The request waiter that replaces pyfuse3's ``_wait_fuse_readable`` (kmsfs/fs/session.py)."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import threading
import time

import pytest
import trio
import trio.testing

from kmsfs.fs.session import MAX_STREAK, RequestWaiter
from tests.fs.helpers import MountFactory, is_mounted


def _pipe() -> tuple[int, int]:
    reader, writer = os.pipe()
    os.set_blocking(reader, False)
    return reader, writer


def test_a_queued_request_is_taken_at_once_but_not_forever() -> None:
    reader, writer = _pipe()
    os.write(writer, b"x")  # always "a request waiting"

    async def main() -> None:
        waiter = RequestWaiter(reader)
        for _ in range(MAX_STREAK):
            assert await waiter.wait()
        assert (waiter.fast, waiter.slow) == (MAX_STREAK, 0)
        # then once through trio, so that other tasks get a turn
        with trio.testing.assert_checkpoints():
            assert await waiter.wait()
        assert (waiter.fast, waiter.slow) == (MAX_STREAK, 1)
        assert await waiter.wait()
        assert waiter.fast == MAX_STREAK + 1

    try:
        trio.run(main)
    finally:
        os.close(reader)
        os.close(writer)


def test_a_woken_waiter_checks_the_request_is_still_there(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A worker on the fast way may read the request a parked worker was woken for."""
    reader, writer = _pipe()
    results: list[bool] = []
    wakeups: list[trio.Event] = []

    async def wait_readable(fd: int) -> None:  # epoll's wake-up, under the test's control
        wakeups.append(trio.Event())
        await wakeups[-1].wait()

    monkeypatch.setattr(trio.lowlevel, "wait_readable", wait_readable)

    async def main() -> None:
        waiter = RequestWaiter(reader)

        async def parked() -> None:
            results.append(await waiter.wait())

        async with trio.open_nursery() as nursery:
            nursery.start_soon(parked)
            await trio.testing.wait_all_tasks_blocked()
            assert waiter.slow == 1 and len(wakeups) == 1
            os.write(writer, b"x")
            assert os.read(reader, 1) == b"x"  # taken by another worker...
            wakeups[-1].set()  # ...after the parked one was woken for it
            await trio.testing.wait_all_tasks_blocked()
            assert results == [] and len(wakeups) == 2  # found nothing, waits again
            os.write(writer, b"y")
            wakeups[-1].set()
            await trio.testing.wait_all_tasks_blocked()
            assert results == [True]

    try:
        trio.run(main)
    finally:
        os.close(reader)
        os.close(writer)


def test_closing_ends_every_wait() -> None:
    reader, writer = _pipe()
    results: list[bool] = []

    async def main() -> None:
        waiter = RequestWaiter(reader)

        async def parked() -> None:
            results.append(await waiter.wait())

        with trio.fail_after(10):  # a waiter that missed the close would hang here
            async with trio.open_nursery() as nursery:
                for _ in range(3):  # one waits for the fd, two for the lock
                    nursery.start_soon(parked)
                await trio.testing.wait_all_tasks_blocked()
                waiter.close()
        assert results == [False, False, False]
        os.write(writer, b"x")
        assert not await waiter.wait()  # even with a request there

    try:
        trio.run(main)
    finally:
        os.close(reader)
        os.close(writer)


def test_the_mount_takes_queued_requests_at_once(mounts: MountFactory) -> None:
    """Installed in the real mount: under parallel load most requests skip the wait."""
    mount = mounts.mount()
    path = mount.mnt / "f"
    data = os.urandom(4 << 20)
    path.write_bytes(data)
    errors: list[BaseException] = []

    def reader(seed: int) -> None:
        try:
            fd = os.open(path, os.O_RDONLY)
            try:
                for i in range(3000):
                    offset = ((seed * 7919 + i * 104729) % 1024) * 4096
                    os.posix_fadvise(fd, offset, 4096, os.POSIX_FADV_DONTNEED)
                    assert os.pread(fd, 4096, offset) == data[offset : offset + 4096]
            finally:
                os.close(fd)
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=reader, args=(seed,)) for seed in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    mount.unmount_clean()
    found = re.search(r"requests taken at once: (\d+), after a wait: (\d+)", mount.log())
    assert found, mount.log()
    assert int(found.group(1)) > 0


def test_sigterm_unmounts_while_requests_keep_coming(mounts: MountFactory) -> None:
    """session.terminate() reaches every worker: the mount exits 0 and is gone."""
    mount = mounts.mount()
    path = mount.mnt / "f"
    path.write_bytes(os.urandom(1 << 20))
    stop = threading.Event()

    def reader() -> None:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            return
        try:
            while not stop.is_set():
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                os.pread(fd, 4096, 8192)
        except OSError:  # the mount went away under us: expected
            pass
        finally:
            with contextlib.suppress(OSError):
                os.close(fd)

    threads = [threading.Thread(target=reader) for _ in range(3)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(0.5)
        assert mount.process is not None
        mount.process.send_signal(signal.SIGTERM)
        assert mount.process.wait(timeout=30) == 0, mount.log()
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=30)
    assert not is_mounted(mount.mnt)


@pytest.mark.parametrize("signum", [signal.SIGUSR1, signal.SIGTERM])
def test_a_signal_the_moment_the_mount_appears_is_handled(
    mounts: MountFactory, signum: signal.Signals
) -> None:
    """Whoever waits for the mount to appear may signal it at once: the receivers are in
    place before the mount does (SIGUSR1's default action killed it; SIGTERM's left the
    mount behind, dead). CI caught the SIGUSR1 case once in ~15 minutes of tests."""
    for _ in range(5):
        mount = mounts.mount()
        assert mount.process is not None
        mount.process.send_signal(signum)  # start() returned when the mount appeared
        if signum == signal.SIGTERM:
            assert mount.process.wait(timeout=30) == 0, mount.log()
            assert not is_mounted(mount.mnt)
            continue
        deadline = time.monotonic() + 30
        while " memory: " not in mount.log():
            assert mount.alive, f"the mount died of {signum.name}:\n{mount.log()}"
            assert time.monotonic() < deadline, mount.log()
            time.sleep(0.02)
        mount.unmount_clean()
