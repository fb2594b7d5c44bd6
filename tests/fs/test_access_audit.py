"""``kmsfs mount --audit-opens`` (issue 17, access audit).

Unit tests of the mount's queue (:class:`AccessAuditor`) with a fake keyd client and
trio's MockClock, then real mounts on a keyd of the test's own: a scripted session whose
audit trail must match one for one, keyd stopped mid-session, and a queue overflow.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import trio
import trio.testing

from kmsfs.errors import KeydUnavailable, StorageUnavailableException, ValidationException
from kmsfs.format.header import MAGIC
from kmsfs.fs.access_audit import (
    AccessAuditor,
    _Event,
    _IsoTimes,
    executable_of,
    file_id_at,
    file_id_of_fd,
    flag_names,
    iso_time,
    unlinked_file_id,
)
from kmsfs.kms import audit
from kmsfs.kms.access_events import check_event
from tests.fs.conftest import FaultEnv
from tests.fs.helpers import Mount, MountFactory, file_key_aliases, flip_byte, run_as_child

FS_ID = "0123456789abcdef0123456789abcdef"
#: the header's key commitment: after magic, version, lengths, chunk size and file id
COMMITMENT_OFFSET = 32
CTX = SimpleNamespace(uid=1001, gid=1002, pid=4242)


class FakeKeyd:
    """RecordAccessEvents as keyd answers it: the calls it took (with their mock time),
    or the error it is told to raise."""

    def __init__(self) -> None:
        self.calls: list[tuple[float, dict[str, Any]]] = []
        self.attempts = 0
        self.error: Exception | None = None

    async def call(self, operation: str, params: dict[str, Any]) -> dict[str, Any]:
        assert operation == "RecordAccessEvents"
        self.attempts += 1
        await trio.sleep(0)
        if self.error is not None:
            raise self.error
        self.calls.append((trio.current_time(), json.loads(json.dumps(params))))
        return {"RecordedEvents": len(params["Events"]), "GapRecorded": "Gap" in params}

    async def call_encoded(self, operation: str, body: bytes) -> dict[str, Any]:
        return await self.call(operation, json.loads(body))

    async def aclose(self) -> None:
        pass

    def events(self) -> list[dict[str, Any]]:
        return [event for _when, params in self.calls for event in params["Events"]]


def auditor(keyd: FakeKeyd, max_queue: int = 100_000) -> AccessAuditor:
    return AccessAuditor(keyd, FS_ID, max_queue, read_executable=lambda pid: f"/bin/p{pid}")


def record(target: AccessAuditor, count: int, start: int = 0) -> None:
    for number in range(start, start + count):
        target.record(CTX, "Open", os.O_RDONLY, f"ino:{number}", "Allowed")


def run_with_clock(body) -> None:
    trio.run(body, clock=trio.testing.MockClock(autojump_threshold=0))


# ------------------------------------------------------------------ unit: the queue
def test_record_never_calls_keyd() -> None:
    keyd = FakeKeyd()
    target = auditor(keyd)
    record(target, 10)  # outside any trio run: it cannot await
    assert keyd.attempts == 0 and target.pending == 10


def test_full_batches_go_at_once_the_rest_after_the_interval() -> None:
    keyd = FakeKeyd()
    target = auditor(keyd)

    async def body() -> None:
        async with trio.open_nursery() as nursery:
            record(target, 2500)
            nursery.start_soon(target.run)
            await trio.sleep(1)
            record(target, 3, start=2500)
            await trio.sleep(1)
            nursery.cancel_scope.cancel()

    run_with_clock(body)
    sizes = [len(params["Events"]) for _when, params in keyd.calls]
    assert sizes == [1000, 1000, 500, 3]
    times = [when for when, _params in keyd.calls]
    assert times[0] == times[1] == 0  # a full batch does not wait
    assert times[2] == pytest.approx(0.1)  # the rest waits for the interval
    assert times[3] >= 1.0
    # every event once, in order, as keyd takes it
    assert [event["FileId"] for event in keyd.events()] == [f"ino:{n}" for n in range(2503)]
    first = keyd.events()[0]
    assert first["Uid"] == 1001 and first["Gid"] == 1002 and first["Pid"] == 4242
    assert first["Executable"] == "/bin/p4242"
    assert first["AccessMode"] == "O_RDONLY" and first["Outcome"] == "Allowed"
    assert first["Time"].endswith("Z")


def test_keyd_down_keeps_the_events_and_retries() -> None:
    keyd = FakeKeyd()
    target = auditor(keyd)

    async def body() -> None:
        async with trio.open_nursery() as nursery:
            keyd.error = KeydUnavailable("keyd is down")
            nursery.start_soon(target.run)
            record(target, 5)
            await trio.sleep(10)
            assert keyd.calls == [] and keyd.attempts > 2
            assert target.pending == 5
            keyd.error = StorageUnavailableException("keyd's disk is full")
            await trio.sleep(10)
            assert target.pending == 5
            keyd.error = None
            await trio.sleep(5)  # past the longest retry delay
            nursery.cancel_scope.cancel()

    run_with_clock(body)
    assert [event["FileId"] for event in keyd.events()] == [f"ino:{n}" for n in range(5)]
    assert target.pending == 0 and target.unreported == 0


def test_overflow_is_counted_and_sent_as_a_gap() -> None:
    keyd = FakeKeyd()
    target = auditor(keyd, max_queue=3)

    async def body() -> None:
        async with trio.open_nursery() as nursery:
            keyd.error = KeydUnavailable("keyd is down")
            nursery.start_soon(target.run)
            record(target, 10)
            await trio.sleep(3)
            assert (target.pending, target.unreported) == (3, 7)
            keyd.error = None
            await trio.sleep(5)
            record(target, 2, start=10)
            await trio.sleep(1)
            nursery.cancel_scope.cancel()

    run_with_clock(body)
    (_when, first), (_later, second) = keyd.calls
    assert [event["FileId"] for event in first["Events"]] == ["ino:0", "ino:1", "ino:2"]
    assert first["Gap"]["Count"] == 7
    assert first["Gap"]["Since"] <= first["Gap"]["Until"]
    assert "Gap" not in second and len(second["Events"]) == 2
    assert target.unreported == 0


def test_events_keyd_refuses_for_good_are_reported_as_lost() -> None:
    keyd = FakeKeyd()
    target = auditor(keyd)

    async def body() -> None:
        async with trio.open_nursery() as nursery:
            keyd.error = ValidationException("Events[0].Executable ...")
            nursery.start_soon(target.run)
            record(target, 4)
            await trio.sleep(0.5)
            keyd.error = None
            record(target, 1, start=4)
            await trio.sleep(1)
            nursery.cancel_scope.cancel()

    run_with_clock(body)
    ((_when, params),) = keyd.calls
    assert params["Gap"]["Count"] == 4
    assert [event["FileId"] for event in params["Events"]] == ["ino:4"]


class AnswerLost(FakeKeyd):
    """keyd writes the records, and the answer does not reach the mount (a timeout)."""

    def __init__(self, losses: int) -> None:
        super().__init__()
        self.losses = losses

    async def call(self, operation: str, params: dict[str, Any]) -> dict[str, Any]:
        answer = await super().call(operation, params)
        if self.losses:
            self.losses -= 1
            raise KeydUnavailable("no answer within 5 s")
        return answer


def test_a_retry_repeats_the_same_sequence_numbers_and_gap() -> None:
    keyd = AnswerLost(losses=1)
    target = auditor(keyd, max_queue=2)

    async def body() -> None:
        async with trio.open_nursery() as nursery:
            record(target, 5)  # 2 kept, 3 lost
            nursery.start_soon(target.run)
            await trio.sleep(0.05)  # the first call went; its answer is lost
            record(target, 1, start=5)  # lost too: after the frozen gap, in the next one
            await trio.sleep(3)
            nursery.cancel_scope.cancel()

    run_with_clock(body)
    first, second, third = (params for _when, params in keyd.calls)
    assert first["MountSession"] == second["MountSession"] == target.session
    assert [e["Sequence"] for e in first["Events"]] == [1, 2]
    assert first["Gap"] == second["Gap"]  # the same gap, the same number: keyd drops it
    assert first["Gap"]["Count"] == 3 and first["Gap"]["Sequence"] == 3
    assert first["Events"] == second["Events"]
    assert third["Gap"]["Count"] == 1 and third["Gap"]["Sequence"] > 3 and not third["Events"]


class SlowAnswer(FakeKeyd):
    """keyd writes the records at once; its answer comes when the test says."""

    def __init__(self) -> None:
        super().__init__()
        self.in_call = trio.Event()
        self.answer = trio.Event()

    async def call(self, operation: str, params: dict[str, Any]) -> dict[str, Any]:
        written = await super().call(operation, params)
        self.in_call.set()
        await self.answer.wait()
        return written


def test_unmount_does_not_cut_a_call_in_flight() -> None:
    """A call keyd may have written is never cancelled half way (it would be sent
    again by the drain at unmount, and recorded twice)."""
    keyd = SlowAnswer()
    target = auditor(keyd)

    async def body() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(target.run)
            record(target, 3)
            await keyd.in_call.wait()
            nursery.cancel_scope.cancel()  # the mount's nursery at unmount
            keyd.answer.set()
        await target.drain(5.0)

    run_with_clock(body)
    assert [len(params["Events"]) for _when, params in keyd.calls] == [3]


def test_drain_at_unmount_is_bounded_and_says_what_was_not_delivered(caplog) -> None:
    keyd = FakeKeyd()
    target = auditor(keyd)
    keyd.error = KeydUnavailable("keyd is down")

    async def body() -> None:
        record(target, 3)
        started = trio.current_time()
        with caplog.at_level(logging.ERROR, logger="kmsfs.mount"):
            await target.drain(5.0)
        assert trio.current_time() - started == pytest.approx(5.0)

    run_with_clock(body)
    assert target.pending == 3
    assert "3 event(s) not delivered" in caplog.text

    keyd.error = None

    async def delivered() -> None:
        await target.drain(5.0)

    run_with_clock(delivered)
    assert len(keyd.events()) == 3 and target.pending == 0


def test_an_events_json_is_what_the_encoder_would_write() -> None:
    """The events' JSON is written by hand (for speed): it must parse to the members
    keyd checks, whatever the executable's path holds."""
    when = 1_796_634_313.123456
    for executable, operation, flags, outcome in (
        ("/usr/bin/cat", "Open", os.O_RDONLY, "Allowed"),
        (
            '/tmp/a "quoted"\\path\n\u00e9\\xff',
            "Create",
            os.O_WRONLY | os.O_CREAT | os.O_EXCL,
            "EACCES",
        ),
        ("", "Unlink", 0, "EIO"),
        ("/bin/mv", "Rename", 1, "Allowed"),
    ):
        event = _Event(7, when, 1001, 1002, 4242, executable, operation, flags, "ab" * 16, outcome)
        mode, names = flag_names(operation, flags)
        expected = {
            "Time": iso_time(when),
            "Uid": 1001,
            "Gid": 1002,
            "Pid": 4242,
            "Executable": executable,
            "Operation": operation,
            "FileId": "ab" * 16,
            "Outcome": outcome,
            "Sequence": 7,
            **({"AccessMode": mode} if mode else {}),
            **({"Flags": names} if names else {}),
        }
        text = event.text()
        assert text.isascii()
        assert json.loads(text) == expected
        check_event(json.loads(text), "Events[0]")


def test_iso_times_keep_the_seconds_and_match_iso_time() -> None:
    times = _IsoTimes()
    start = 1_796_634_313.0
    for step in range(2000):
        value = start + step * 0.0123457
        assert times(value) == iso_time(value)
    assert times(start + 0.9999996) == iso_time(start + 0.9999996)  # rounds into the next second


@pytest.mark.skipif(os.geteuid() != 0, reason="needs a file another user owns")
def test_a_file_id_is_read_without_touching_atime_and_by_a_non_owner(tmp_path: Path) -> None:
    """The header's id is read with O_NOATIME (no journal write on the unlink path); a
    mount that does not own the backing file (O_NOATIME: EPERM) reads it all the same."""
    path = tmp_path / "file"
    path.write_bytes(MAGIC + b"\x00" * 8 + bytes(range(16)) + b"rest")
    os.utime(path, (1_000_000, 2_000_000))  # atime before mtime: relatime would update it
    tmp_path.chmod(0o755)
    path.chmod(0o644)
    dir_fd = os.open(tmp_path, os.O_RDONLY)
    try:
        assert file_id_at(dir_fd, b"file") == bytes(range(16)).hex()
        assert os.stat(path).st_atime == 1_000_000
        as_other = run_as_child(lambda: file_id_at(dir_fd, b"file"), uid=NOBODY)
        assert as_other == bytes(range(16)).hex()
    finally:
        os.close(dir_fd)


def test_flag_names() -> None:
    assert flag_names("Open", os.O_RDONLY) == ("O_RDONLY", [])
    assert flag_names("Open", os.O_WRONLY | os.O_TRUNC | os.O_APPEND) == (
        "O_WRONLY",
        ["O_APPEND", "O_TRUNC"],
    )
    assert flag_names("Create", os.O_RDWR | os.O_CREAT | os.O_EXCL) == (
        "O_RDWR",
        ["O_CREAT", "O_EXCL"],
    )
    assert flag_names("Open", os.O_RDONLY | os.O_SYNC) == ("O_RDONLY", ["O_SYNC"])
    assert flag_names("Open", os.O_RDONLY | os.O_DSYNC) == ("O_RDONLY", ["O_DSYNC"])
    assert flag_names("Rename", 1) == (None, ["RENAME_NOREPLACE"])
    assert flag_names("Unlink", 0) == (None, [])


def test_fstab_options() -> None:
    from kmsfs.fs.fstab import apply_options, parse_options
    from kmsfs.fs.mount import MountOptions

    options = apply_options(parse_options(["rw,audit_opens,audit_queue=5"]), MountOptions())
    assert options.audit_opens is True and options.audit_queue == 5
    assert apply_options(parse_options(["rw"]), MountOptions()).audit_opens is False


def test_executable_of() -> None:
    assert executable_of(os.getpid()) == os.readlink("/proc/self/exe")
    assert executable_of(2**22 + 12345) == ""  # above pid_max: no such process


# ------------------------------------------------------------------ real mounts
def access_records(keyd_keystore: Path) -> list[dict[str, Any]]:
    return [
        event
        for event in audit.iter_events(keyd_keystore / "audit.log")
        if event.get("eventSource") == "kmsfs-mount"
    ]


def wait_for_records(keystore: Path, count: int, timeout: float = 30.0) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        found = access_records(keystore)
        if len(found) >= count or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


def header_id(path: Path) -> str:
    fd = os.open(path, os.O_RDONLY)
    try:
        file_id = file_id_of_fd(fd)
    finally:
        os.close(fd)
    assert file_id is not None
    return file_id


def summary(record: dict[str, Any]) -> tuple[Any, ...]:
    data = record["additionalEventData"]
    return (record["eventName"], data["outcome"], data["fileId"], record["userIdentity"]["uid"])


def test_scripted_session_is_recorded_one_for_one(fault_env: FaultEnv) -> None:
    keyd, mounts = fault_env.keyd, fault_env.mounts
    cipher = mounts.init()
    plain = mounts.mount(cipher)
    for name in ("read-me", "locked", "damaged"):
        (plain.mnt / name).write_bytes(name.encode() * 1000)
    (plain.mnt / "sub").mkdir()
    (plain.mnt / "sub" / "deep").write_bytes(b"deep")
    backing = {name: plain.backing(plain.mnt / name) for name in ("read-me", "locked", "damaged")}
    ids = {name: header_id(path) for name, path in backing.items()}
    deep_id = header_id(plain.backing(plain.mnt / "sub" / "deep"))
    plain.unmount_clean()
    # (with KMSFS_TEST_AUDIT_OPENS=1 that mount recorded too: only what follows counts)
    before = len(access_records(keyd.keystore))
    # the key commitment, after the file id: the file cannot be opened (EIO)
    flip_byte(backing["damaged"], COMMITMENT_OFFSET + 3)

    mount = mounts.mount(cipher, None, "--audit-opens")
    mnt = mount.mnt
    me = os.getuid()
    assert (mnt / "read-me").read_bytes() == b"read-me" * 1000  # Open, O_RDONLY
    fd = os.open(mnt / "new", os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)  # Create
    new_ino = os.fstat(fd).st_ino
    os.write(fd, b"fresh")
    os.close(fd)
    new_id = header_id(mount.backing(mnt / "new"))
    os.rename(mnt / "new", mnt / "renamed")  # Rename
    os.unlink(mnt / "renamed")  # Unlink
    with pytest.raises(OSError) as damaged:
        (mnt / "damaged").read_bytes()  # Open: EIO
    assert damaged.value.errno == errno.EIO
    for alias in file_key_aliases():
        keyd.kmsfs("keys", "disable", alias)
    with pytest.raises(OSError) as refused:
        os.open(mnt / "locked", os.O_RDWR)  # Open: EACCES, the key refused
    assert refused.value.errno == errno.EACCES
    for alias in file_key_aliases():
        keyd.kmsfs("keys", "enable", alias)
    mount.unmount_clean()  # the queue is flushed at unmount

    records = access_records(keyd.keystore)[before:]
    assert [summary(record) for record in records] == [
        ("Open", "Allowed", ids["read-me"], me),
        ("Create", "Allowed", f"ino:{new_ino}", me),
        ("Rename", "Allowed", new_id, me),
        ("Unlink", "Allowed", new_id, me),
        ("Open", "EIO", ids["damaged"], me),
        ("Open", "EACCES", ids["locked"], me),
    ]
    modes = [record["additionalEventData"]["accessMode"] for record in records]
    assert modes[0] == "O_RDONLY" and modes[5] == "O_RDWR"
    assert modes[1] in ("O_RDWR", "O_WRONLY") and modes[2] is None
    assert "O_CREAT" in records[1]["additionalEventData"]["flags"]
    assert records[4]["errorCode"] == "EIO" and "errorCode" not in records[0]
    exe = os.readlink("/proc/self/exe")
    for record in records:
        data = record["additionalEventData"]
        assert data["executable"] == exe and data["pid"] == os.getpid()
        assert (
            data["filesystemId"] == json.loads((cipher / "kmsfs.conf").read_text())["filesystem_id"]
        )
        assert record["userIdentity"]["invokedBy"] == "kmsfs-mount"
    # no plaintext name anywhere in keyd's log
    log_text = (keyd.keystore / "audit.log").read_text()
    for name in ("read-me", "locked", "damaged", "renamed", '"new"', "deep"):
        assert name not in log_text

    verified = keyd.kmsfs("keyd", "audit", "verify", "--keystore", str(keyd.keystore))
    assert b"chain intact" in verified.stdout

    resolved = keyd.kmsfs("audit", "resolve", str(cipher), "--json")
    paths = {}
    for line in resolved.stdout.decode().splitlines():
        item = json.loads(line)
        paths[item["fileId"]] = item["paths"]
    assert paths[ids["read-me"]] == ["/read-me"]
    assert paths[ids["locked"]] == ["/locked"]
    assert paths[ids["damaged"]] == ["/damaged"]
    assert paths[deep_id] == ["/sub/deep"]
    assert new_id not in paths  # unlinked
    annotated = keyd.kmsfs(
        "keyd", "audit", "resolve", str(cipher), "--log", str(keyd.keystore / "audit.log")
    ).stdout.decode()
    lines = annotated.splitlines()[before:]
    assert len(lines) == 6
    assert "Open" in lines[0] and "/read-me" in lines[0]
    assert "EACCES" in lines[5] and "/locked" in lines[5]
    assert "(not found)" in lines[3]  # the unlinked file


def test_events_wait_for_keyd_and_are_delivered_after_it_restarts(fault_env: FaultEnv) -> None:
    keyd, mounts = fault_env.keyd, fault_env.mounts
    mount: Mount = mounts.mount(None, None, "--audit-opens")
    path = mount.mnt / "file"
    path.write_bytes(b"data" * 100)  # Create
    assert path.read_bytes() == b"data" * 100  # Open; its key stays cached (60 s)
    assert len(wait_for_records(keyd.keystore, 2)) == 2  # delivered while mounted
    keyd.stop()
    for _ in range(3):
        assert path.read_bytes() == b"data" * 100  # Open, Allowed: the cached key
    assert mount.alive, mount.log()
    assert len(access_records(keyd.keystore)) == 2
    keyd.start()
    records = wait_for_records(keyd.keystore, 5)
    assert [(r["eventName"], r["additionalEventData"]["outcome"]) for r in records] == [
        ("Create", "Allowed"),
        ("Open", "Allowed"),
        ("Open", "Allowed"),
        ("Open", "Allowed"),
        ("Open", "Allowed"),
    ]
    assert mount.alive, mount.log()
    mount.unmount_clean()
    assert len(access_records(keyd.keystore)) == 5  # nothing twice


def test_overflow_while_keyd_is_down_becomes_a_gap_record(fault_env: FaultEnv) -> None:
    keyd, mounts = fault_env.keyd, fault_env.mounts
    mount = mounts.mount(None, None, "--audit-opens", "--audit-queue", "3")
    path = mount.mnt / "file"
    path.write_bytes(b"data")
    assert path.read_bytes() == b"data"
    assert len(wait_for_records(keyd.keystore, 2)) == 2
    keyd.stop()
    for _ in range(10):
        assert path.read_bytes() == b"data"
    keyd.start()
    # the 7 lost events are counted in one gap record, or in two when the mount tried
    # keyd while the reads went on (a gap is frozen once sent: later losses go to the
    # next one)
    deadline = time.monotonic() + 30
    while True:
        records = access_records(keyd.keystore)
        gaps = [r for r in records if r["eventName"] == "AccessEventsLost"]
        lost = sum(gap["additionalEventData"]["lostEvents"] for gap in gaps)
        if lost >= 7 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    names = [record["eventName"] for record in records]
    assert names[:5] == ["Create", "Open", "Open", "Open", "Open"]
    assert set(names[5:]) == {"AccessEventsLost"} and len(gaps) in (1, 2)
    assert lost == 7
    mount.unmount_clean()
    verified = keyd.kmsfs("keyd", "audit", "verify", "--keystore", str(keyd.keystore))
    assert b"chain intact" in verified.stdout


NOBODY = 65534


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: a shared mount and another user")
def test_shared_mount_records_each_users_own_identity(mounts: MountFactory) -> None:
    """Mounted by root with -o allow_other: nobody's events carry nobody's uid, gid,
    pid and executable. What the kernel refuses itself (mode bits) never reaches the
    mount and is not recorded (documented). Forwarding off: key policy is not the subject."""
    mount = mounts.mount(None, None, "-o", "allow_other", "--audit-opens", "--no-forward-callers")
    root = mount.mnt
    os.chmod(root, 0o755)
    (root / "public").write_bytes(b"everyone may read")
    os.chmod(root / "public", 0o644)
    (root / "secret").write_bytes(b"root only")
    os.chmod(root / "secret", 0o600)
    os.mkdir(root / "tmp", 0o777)
    os.chmod(root / "tmp", 0o1777)
    public_id = header_id(mount.backing(root / "public"))
    filesystem_id = json.loads((mount.cipher / "kmsfs.conf").read_text())["filesystem_id"]

    def as_nobody() -> dict[str, Any]:
        results: dict[str, Any] = {"pid": os.getpid()}
        results["public"] = (root / "public").read_bytes()
        try:
            os.open(root / "secret", os.O_RDONLY)
        except OSError as error:
            results["secret"] = errno.errorcode[error.errno]
        fd = os.open(root / "tmp" / "mine", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        results["mine"] = os.fstat(fd).st_ino
        os.close(fd)
        return results

    results = run_as_child(as_nobody, uid=NOBODY)
    assert results["public"] == b"everyone may read" and results["secret"] == "EACCES"
    mount.unmount_clean()
    records = [
        record
        for record in access_records(mount.keyd.keystore)
        if record["additionalEventData"]["filesystemId"] == filesystem_id
    ]
    # root's own writes above are Creates and Opens of root's (uid 0); nobody's follow
    mine = [summary(record) for record in records if record["userIdentity"]["uid"] == NOBODY]
    assert mine == [
        ("Open", "Allowed", public_id, NOBODY),
        ("Create", "Allowed", f"ino:{results['mine']}", NOBODY),
    ]
    for record in records:
        if record["userIdentity"]["uid"] == NOBODY:
            assert record["userIdentity"]["gid"] == NOBODY
            assert record["additionalEventData"]["pid"] == results["pid"]
            assert record["additionalEventData"]["executable"] == os.readlink("/proc/self/exe")
            assert record["additionalEventData"]["mountUid"] == 0


def test_a_rename_that_replaces_or_exchanges_records_both_files(mounts: MountFactory) -> None:
    """The file a rename replaces is removed: its removal is an Unlink event; with
    RENAME_EXCHANGE both files move: two Rename events."""
    from tests.fs.test_fs_ops import RENAME_EXCHANGE, renameat2

    mount = mounts.mount(None, None, "--audit-opens")
    mnt = mount.mnt
    for name in ("a", "b", "c"):
        (mnt / name).write_bytes(name.encode() * 100)
    ids = {name: header_id(mount.backing(mnt / name)) for name in ("a", "b", "c")}
    keystore = mount.keyd.keystore
    filesystem_id = json.loads((mount.cipher / "kmsfs.conf").read_text())["filesystem_id"]
    os.rename(mnt / "a", mnt / "b")  # b is removed
    renameat2(mnt / "b", mnt / "c", RENAME_EXCHANGE)  # a's content and c swap names
    os.link(mnt / "c", mnt / "c-link")
    os.rename(mnt / "c", mnt / "c-link")  # the same file: nothing happens (POSIX; the
    # kernel does not even ask the mount)
    mount.unmount_clean()
    mine = [
        r
        for r in access_records(keystore)
        if r["eventName"] in ("Rename", "Unlink")
        and r["additionalEventData"]["filesystemId"] == filesystem_id
    ]
    assert [(r["eventName"], r["additionalEventData"]["fileId"]) for r in mine] == [
        ("Rename", ids["a"]),
        ("Unlink", ids["b"]),
        ("Rename", ids["a"]),
        ("Rename", ids["c"]),
    ]
    assert "RENAME_EXCHANGE" in mine[2]["additionalEventData"]["flags"]
    assert "RENAME_EXCHANGE" in mine[3]["additionalEventData"]["flags"]


def test_an_unlinked_files_id_comes_from_its_open_while_the_file_is_unchanged(
    tmp_path: Path,
) -> None:
    """An audited open keeps the header's id on the node with the backing file's ctime
    and size; an unlink of the file unchanged since takes it from there, and of a file
    changed since (ctime moved) reads the header again."""
    path = tmp_path / "file"
    path.write_bytes(MAGIC + b"\x00" * 8 + bytes(range(16)) + b"rest")
    dir_fd = os.open(tmp_path, os.O_RDONLY)
    try:
        st = os.lstat(path)
        node = SimpleNamespace(st_ino=st.st_ino, header_id=(st.st_ctime_ns, st.st_size, "kept"))
        assert unlinked_file_id(dir_fd, b"file", st, node) == "kept"
        assert unlinked_file_id(dir_fd, b"file", st, None) == bytes(range(16)).hex()
        other_inode = SimpleNamespace(st_ino=st.st_ino + 1, header_id=node.header_id)
        assert unlinked_file_id(dir_fd, b"file", st, other_inode) == bytes(range(16)).hex()
        time.sleep(0.01)
        path.write_bytes(MAGIC + b"\x00" * 8 + bytes(range(16, 32)) + b"rest")  # ctime moves
        changed = os.lstat(path)
        assert changed.st_ctime_ns != st.st_ctime_ns
        assert unlinked_file_id(dir_fd, b"file", changed, node) == bytes(range(16, 32)).hex()
    finally:
        os.close(dir_fd)


def _reads_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("syscr:"):
            return int(line.split()[1])
    raise AssertionError("no syscr in /proc/PID/io")


def test_unlinking_files_opened_before_reads_no_headers(mounts: MountFactory) -> None:
    """rm after a read (the common case: a file looked at, then removed) reads no header
    for the audit: the ids recorded at the opens are used, and they are the right ones."""
    mount = mounts.mount(None, None, "--audit-opens")
    assert mount.process is not None
    keystore = mount.keyd.keystore
    # this filesystem's records (the keyd is shared with other tests)
    filesystem_id = json.loads((mount.cipher / "kmsfs.conf").read_text())["filesystem_id"]
    count = 150
    for group in ("opened", "not-opened"):
        (mount.mnt / group).mkdir()
        for n in range(count):
            (mount.mnt / group / f"f{n}").write_bytes(b"x" * 100)
    ids = {n: header_id(mount.backing(mount.mnt / "opened" / f"f{n}")) for n in range(count)}
    for n in range(count):
        assert (mount.mnt / "opened" / f"f{n}").read_bytes() == b"x" * 100
        os.stat(mount.mnt / "not-opened" / f"f{n}")
    reads = {}
    for group in ("opened", "not-opened"):
        before = _reads_of(mount.process.pid)
        for n in range(count):
            os.unlink(mount.mnt / group / f"f{n}")
        reads[group] = _reads_of(mount.process.pid) - before
    mount.unmount_clean()
    unlinked = [
        r["additionalEventData"]["fileId"]
        for r in access_records(keystore)
        if r["eventName"] == "Unlink" and r["additionalEventData"]["filesystemId"] == filesystem_id
    ]
    assert unlinked[:count] == [ids[n] for n in range(count)]
    # a header read is one pread each: the second group made one more per file. The
    # count is every read syscall of the mount (keyd's answers to the audit's batches
    # too), so the margin is wide: without the ids kept from opens the two are equal
    # (749 each when this was written); a loaded run once gave 133 of 150 here
    assert reads["not-opened"] - reads["opened"] >= count * 0.5, reads
