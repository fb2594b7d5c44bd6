"""The busy poller (``kmsfs/fs/polling.py``): spins only while requests keep coming."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest
import trio
import trio.testing

from kmsfs.fs.mount import DEFAULT_MAX_DIRTY_RATIO
from kmsfs.fs.polling import DEFAULT_WINDOW, BusyPoller
from tests.conftest import KMSFS
from tests.fs.helpers import Mount, MountFactory


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def _parked() -> None:
    """Return once the poller is parked: a 10 ms quiet spell that its turns would reset."""
    with trio.fail_after(5):
        await trio.testing.wait_all_tasks_blocked(0.01)


def test_a_negative_window_is_refused() -> None:
    with pytest.raises(ValueError):
        BusyPoller(-0.001)


def test_window_zero_never_polls() -> None:
    async def main() -> None:
        poller = BusyPoller(0)
        with trio.fail_after(5):
            await poller.run()  # returns at once
        poller.note_request()
        assert poller.turns == 0

    trio.run(main)


def test_polls_after_a_request_until_the_window_passes_then_sleeps() -> None:
    clock = FakeClock()
    yields: list[int] = []

    async def main() -> None:
        poller = BusyPoller(0.001, clock=clock, yield_cpu=lambda: yields.append(1))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(poller.run)
            await _parked()
            assert poller.parked and poller.turns == 0  # idle: no turns at all

            poller.note_request()
            await trio.sleep(0.02)  # real time; the poller's clock stands still
            assert not poller.parked
            spun = poller.turns
            assert spun >= 5 and len(yields) >= spun  # and gives the CPU away each turn

            clock.now += 0.0005
            poller.note_request()  # a request inside the window restarts it
            await trio.sleep(0.01)
            clock.now += 0.0007  # 1.2 ms after the first request, 0.7 ms after the second
            await trio.sleep(0.01)
            assert not poller.parked and poller.turns > spun

            clock.now += 0.0004  # the window has passed: park
            await _parked()
            parked_at = poller.turns
            await trio.sleep(0.05)
            assert poller.turns == parked_at  # a parked poller costs nothing

            poller.note_request()  # and wakes on the next request
            await trio.sleep(0.01)
            assert poller.turns > parked_at
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_no_turns_while_other_tasks_keep_the_loop_busy() -> None:
    async def main() -> None:
        poller = BusyPoller(0.001, clock=FakeClock(), yield_cpu=lambda: None)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(poller.run)
            await _parked()
            poller.note_request()
            await trio.sleep(0.01)
            before = poller.turns
            for _ in range(200):  # runnable all along, as when requests queue up
                await trio.lowlevel.checkpoint()
            assert poller.turns == before
            nursery.cancel_scope.cancel()

    trio.run(main)


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _busy_then_idle_cpu(mount: Mount) -> float:
    """CPU seconds the mount uses in the 1.5 s after a burst of small reads."""
    path = mount.mnt / "f"
    path.write_bytes(os.urandom(256 << 10))
    assert mount.process is not None
    fd = os.open(path, os.O_RDONLY)
    try:
        for index in range(2000):  # synchronous small I/O: the poller's case
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            assert len(os.pread(fd, 4096, (index * 4096) % (256 << 10))) == 4096
    finally:
        os.close(fd)
    time.sleep(0.2)  # the window is 1 ms: long gone
    before = _cpu_seconds(mount.process.pid)
    time.sleep(1.5)
    return _cpu_seconds(mount.process.pid) - before


def test_an_idle_mount_stops_polling(mounts: MountFactory) -> None:
    """After the last request the mount parks: an idle mount uses no CPU.

    A poller that never parked would use about 1 CPU second per second here.
    """
    mount = mounts.mount()
    assert _busy_then_idle_cpu(mount) < 0.5, mount.log()


@pytest.mark.parametrize(
    ("flag", "given", "field", "default", "convert"),
    [
        ("--busy-poll-us", None, "busy_poll_seconds", DEFAULT_WINDOW, lambda v: int(v) / 1e6),
        ("--busy-poll-us", "0", "busy_poll_seconds", DEFAULT_WINDOW, lambda v: int(v) / 1e6),
        ("--busy-poll-us", "250", "busy_poll_seconds", DEFAULT_WINDOW, lambda v: int(v) / 1e6),
        ("--max-dirty-ratio", None, "max_dirty_ratio", DEFAULT_MAX_DIRTY_RATIO, int),
        ("--max-dirty-ratio", "1", "max_dirty_ratio", DEFAULT_MAX_DIRTY_RATIO, int),
        ("--max-dirty-ratio", "20", "max_dirty_ratio", DEFAULT_MAX_DIRTY_RATIO, int),
    ],
)
def test_tuning_flags_reach_the_mount(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    flag: str,
    given: str | None,
    field: str,
    default: float,
    convert,
) -> None:
    """--busy-poll-us and --max-dirty-ratio reach the mount, in the foreground and detached."""
    import kmsfs.background
    import kmsfs.fs.mount
    from kmsfs.cli import main

    seen: dict[str, object] = {}
    monkeypatch.setattr(kmsfs.fs.mount, "check_mount", lambda cipher, mnt, options: False)
    monkeypatch.setattr(
        kmsfs.fs.mount,
        "mount_foreground",
        lambda cipher, mnt, options, ready_fd=None: seen.update(value=getattr(options, field)),
    )
    monkeypatch.setattr(
        kmsfs.background,
        "start_detached",
        lambda argv, log_path, what: seen.update(argv=argv) or 1,
    )
    flags = [flag, given] if given is not None else []
    assert main(["mount", "-f", str(tmp_path), str(tmp_path), *flags]) == 0
    expected = default if given is None else convert(given)
    assert seen["value"] == pytest.approx(expected)
    log = str(tmp_path / "log")
    assert main(["mount", str(tmp_path), str(tmp_path), "--log-file", log, *flags]) == 0
    argv = seen["argv"]
    assert isinstance(argv, list) and argv[:2] == ["mount", "-f"]
    assert (flag in argv) == (given is not None)
    if given is not None:
        assert argv[argv.index(flag) + 1] == given


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--busy-poll-us", "-1", "cannot be negative"),
        ("--busy-poll-us", "x", "whole"),
        ("--max-dirty-ratio", "0", "from 1 to 100"),
        ("--max-dirty-ratio", "101", "from 1 to 100"),
    ],
)
def test_a_bad_tuning_value_is_a_usage_error(
    tmp_path: Path, flag: str, value: str, message: str
) -> None:
    result = subprocess.run(
        [*KMSFS, "mount", "-f", str(tmp_path), str(tmp_path), flag, value],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert message in result.stderr


def test_the_window_halves_when_polls_find_nothing_and_doubles_when_they_do() -> None:
    """cpuidle-haltpoll's rule: sparse requests cost a short spin each, not a whole window."""
    clock = FakeClock()

    async def main() -> None:
        poller = BusyPoller(0.0016, clock=clock, yield_cpu=lambda: None)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(poller.run)
            await _parked()
            sizes = []
            for _ in range(6):  # requests 10 ms apart: every poll times out
                clock.now += 0.010
                poller.note_request()
                await trio.sleep(0.005)
                clock.now += poller.current + 1e-9
                await _parked()
                sizes.append(round(poller.current * 1e6))
            assert sizes == [800, 400, 200, 100, 100, 100]  # down to window / 16

            poller.note_request()  # a request soon after parking: grow
            await trio.sleep(0.005)
            assert round(poller.current * 1e6) == 200
            poller.note_request()  # and while polling: grow again
            await trio.sleep(0.005)
            assert round(poller.current * 1e6) == 400
            for _ in range(5):
                poller.note_request()
                await trio.sleep(0.002)
            assert round(poller.current * 1e6) == 1600  # never above the window
            nursery.cancel_scope.cancel()

    trio.run(main)
