"""RecordAccessEvents (issue 17, access audit): a mount's access events become records
of keyd's hash-chained audit log.

The service runs in-process over a fresh keystore and a real AuditLog (so the chain can
be verified); the last tests call a real keyd as other users.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kmsfs.errors import (
    AccessDeniedException,
    AuditError,
    SerializationException,
    StorageUnavailableException,
    ValidationException,
)
from kmsfs.kms import audit
from kmsfs.kms.access_events import GAP_EVENT_NAME, MAX_EVENTS
from kmsfs.kms.audit import AuditLog
from kmsfs.kms.caller import Caller
from kmsfs.kms.keystore import Keystore, RootKeySource
from kmsfs.kms.principal import AccountAccess
from kmsfs.kms.service import KeyService
from tests.conftest import Keyd
from tests.kms.users import NOBODY, call_as, needs_other_users

FS_ID = "0123456789abcdef0123456789abcdef"
FILE_ID = "fedcba9876543210fedcba9876543210"
ROOT = Caller(uid=0, gid=0, pid=os.getpid())
ALICE = Caller(uid=4321, gid=4321, pid=os.getpid())
REGION = "eu-test-1"
ACCOUNT = "123456789012"


def event(**changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "Time": "2026-12-07T09:05:13.123456Z",
        "Uid": 4321,
        "Gid": 4321,
        "Pid": 4242,
        "Executable": "/usr/bin/cat",
        "Operation": "Open",
        "AccessMode": "O_RDONLY",
        "FileId": FILE_ID,
        "Outcome": "Allowed",
    }
    base.update(changes)
    return {name: value for name, value in base.items() if value is not None}


class Service:
    def __init__(self, tmp_path: Path) -> None:
        self.keystore = Keystore.create(
            tmp_path / "ks",
            RootKeySource.from_key_file(tmp_path / "root.key"),
            region=REGION,
            account=ACCOUNT,
        )
        self.log_path = tmp_path / "audit.log"
        self.log = AuditLog.open(self.log_path)
        self.service = KeyService(self.keystore, self.log)
        self.requests = 0

    def call(self, caller: Caller = ROOT, **params: Any) -> dict[str, Any]:
        self.requests += 1
        return self.service.handle("RecordAccessEvents", params, caller, f"req-{self.requests}")

    def records(self) -> list[dict[str, Any]]:
        return list(audit.iter_events(self.log_path))


@pytest.fixture
def kms(tmp_path: Path) -> Iterator[Service]:
    service = Service(tmp_path)
    try:
        yield service
    finally:
        service.log.close()
        service.keystore.close()


# ------------------------------------------------------------------ records
def test_each_event_is_one_record_and_the_chain_verifies(kms: Service) -> None:
    events = [
        event(),
        event(Uid=1001, Gid=1002, Pid=77, Operation="Create", AccessMode="O_RDWR",
              Flags=["O_CREAT", "O_TRUNC"], FileId="ino:1234"),
        event(Operation="Unlink", AccessMode=None, Outcome="Allowed"),
        event(Operation="Rename", AccessMode=None, Flags=["RENAME_NOREPLACE"]),
        event(Outcome="EACCES", Executable=""),
    ]  # fmt: skip
    answer = kms.call(FilesystemId=FS_ID, Events=events)
    assert answer == {"RecordedEvents": 5, "DuplicateEvents": 0, "GapRecorded": False}
    records = kms.records()
    # the records are the call's audit: no RecordAccessEvents record besides them
    assert [r["eventName"] for r in records] == ["Open", "Create", "Unlink", "Rename", "Open"]
    assert {r["requestID"] for r in records} == {"req-1"}
    first, create, _unlink, rename, denied = records
    assert first["eventSource"] == "kmsfs-mount"
    assert first["eventTime"] == "2026-12-07T09:05:13.123456Z"
    assert first["eventType"] == "AwsServiceEvent"
    assert first["readOnly"] is True and create["readOnly"] is False
    identity = create["userIdentity"]
    assert (identity["uid"], identity["gid"], identity["pid"]) == (1001, 1002, 77)
    assert identity["invokedBy"] == "kmsfs-mount"
    assert identity["arn"].endswith(":user/" + identity["userName"])
    data = create["additionalEventData"]
    assert data == {
        "mountPrincipal": f"arn:aws:iam::{ACCOUNT}:root",
        "mountUid": 0,
        "mountPid": os.getpid(),
        "filesystemId": FS_ID,
        "pid": 77,
        "accessMode": "O_RDWR",
        "flags": ["O_CREAT", "O_TRUNC"],
        "fileId": "ino:1234",
        "outcome": "Allowed",
        "executable": "/usr/bin/cat",
    }
    assert rename["additionalEventData"]["flags"] == ["RENAME_NOREPLACE"]
    assert "errorCode" not in first
    assert denied["errorCode"] == "EACCES"
    assert denied["additionalEventData"]["outcome"] == "EACCES"
    kms.log.sync()
    report = audit.verify(kms.log_path)
    assert report.ok and report.lines == 5


def test_a_record_is_the_same_whatever_its_executable_holds(kms: Service) -> None:
    """keyd writes the records' JSON itself (a batch shares most of it): every record must
    read back as the members it was given, quotes, backslashes, non-ASCII and an
    executable long enough to be cut by the log's caps included."""
    executables = ['/tmp/a "b"\\c', "/opt/caf\u00e9/\U0001f600", "/x" * 2048, "/usr/bin/cat"]
    events = [
        event(Executable=executable, Pid=100 + n, Sequence=n + 1)
        for n, executable in enumerate(executables)
    ]
    kms.call(FilesystemId=FS_ID, MountSession="c" * 32, Events=events)
    records = kms.records()
    assert len(records) == 4
    for record, executable, n in zip(records, executables, range(4), strict=True):
        data = record["additionalEventData"]
        assert record["userIdentity"]["pid"] == 100 + n
        assert (data["mountSession"], data["sequence"]) == ("c" * 32, n + 1)
        assert set(record) >= {"eventID", "eventTime", "requestID", "recipientAccountId"}
        if len(executable) < 1000:
            assert data["executable"] == executable
            assert record["userIdentity"]["invokedBy"] == "kmsfs-mount"
    long_record = records[2]
    assert long_record.get("omitted") is True  # capped as any record of that size is
    assert len({record["eventID"] for record in records}) == 4
    kms.log.sync()
    assert audit.verify(kms.log_path).ok


def test_a_gap_becomes_one_record(kms: Service) -> None:
    gap = {"Count": 17, "Since": "2026-12-07T09:00:00Z", "Until": "2026-12-07T09:01:00.5Z"}
    assert kms.call(FilesystemId=FS_ID, Events=[event()], Gap=gap)["GapRecorded"] is True
    assert kms.call(FilesystemId=FS_ID, Gap={"Count": 3, "Since": "2026-12-07T09:02:00Z"})
    names = [r["eventName"] for r in kms.records()]
    assert names == ["Open", GAP_EVENT_NAME, GAP_EVENT_NAME]
    lost = kms.records()[1]["additionalEventData"]
    assert lost["lostEvents"] == 17
    assert (lost["firstLostTime"], lost["lastLostTime"]) == (gap["Since"], gap["Until"])
    assert kms.records()[2]["additionalEventData"]["lostEvents"] == 3


def test_records_carry_no_names(kms: Service) -> None:
    kms.call(FilesystemId=FS_ID, Events=[event()])
    text = kms.log_path.read_text()
    assert '"Name' not in text and "path" not in text.lower()


def test_the_limit_is_1000_events_per_call(kms: Service) -> None:
    assert kms.call(FilesystemId=FS_ID, Events=[event()] * MAX_EVENTS)["RecordedEvents"] == 1000
    with pytest.raises(ValidationException, match="at most 1000"):
        kms.call(FilesystemId=FS_ID, Events=[event()] * (MAX_EVENTS + 1))
    assert len([r for r in kms.records() if r["eventName"] == "Open"]) == 1000


# ------------------------------------------------------------------ validation
BAD_EVENTS = {
    "time not UTC": event(Time="2026-12-07T09:05:13+01:00"),
    "time impossible": event(Time="2026-13-07T09:05:13Z"),
    "time missing": event(Time=None),
    "uid negative": event(Uid=-1),
    "uid a string": event(Uid="0"),
    "uid a bool": event(Uid=True),
    "gid too large": event(Gid=1 << 32),
    "pid missing": event(Pid=None),
    "executable missing": event(Executable=None),
    "executable NUL": event(Executable="/bin/a\0b"),
    "executable too long": event(Executable="/" * 4097),
    "operation unknown": event(Operation="Read"),
    "open without mode": event(AccessMode=None),
    "mode unknown": event(AccessMode="O_EXEC"),
    "flag unknown": event(Flags=["O_EVIL"]),
    "flags not a list": event(Flags="O_TRUNC"),
    "file id short": event(FileId="abc"),
    "file id upper": event(FileId=FILE_ID.upper()),
    "file id a name": event(FileId="secret.txt"),
    "ino not a number": event(FileId="ino:x"),
    "outcome unknown": event(Outcome="Denied"),
    "unknown member": event(Path="/etc/shadow"),
}


@pytest.mark.parametrize("name", sorted(BAD_EVENTS))
def test_a_bad_event_anywhere_refuses_the_whole_call(kms: Service, name: str) -> None:
    events = [event(), event(), copy.deepcopy(BAD_EVENTS[name])]
    with pytest.raises(ValidationException):
        kms.call(FilesystemId=FS_ID, Events=events)
    records = kms.records()
    # nothing of the call was recorded but its refusal
    assert [r["eventName"] for r in records] == ["RecordAccessEvents"]
    assert records[0]["errorCode"] == "ValidationException"
    assert records[0]["requestParameters"] == {"filesystemId": FS_ID}


@pytest.mark.parametrize(
    "params",
    [
        {"FilesystemId": "ABCDEF" * 5 + "AB", "Events": [event()]},
        {"FilesystemId": FS_ID[:-1], "Events": [event()]},
        {"Events": [event()]},
        {"FilesystemId": FS_ID, "Events": []},
        {"FilesystemId": FS_ID},
        {"FilesystemId": FS_ID, "Gap": {"Count": 0, "Since": "2026-12-07T09:00:00Z"}},
        {"FilesystemId": FS_ID, "Gap": {"Count": 1}},
        {"FilesystemId": FS_ID, "Gap": {"Count": 1, "Since": "yesterday"}},
        {"FilesystemId": FS_ID, "Gap": {"Count": 1, "Since": "2026-12-07T09:00:00Z", "X": 1}},
    ],
)
def test_bad_requests_are_validation_errors(kms: Service, params: dict[str, Any]) -> None:
    with pytest.raises(ValidationException):
        kms.call(**params)
    assert [r["eventName"] for r in kms.records()] == ["RecordAccessEvents"]


@pytest.mark.parametrize(
    "params",
    [
        {"FilesystemId": FS_ID, "Events": event()},
        {"FilesystemId": FS_ID, "Events": ["Open"]},
        {"FilesystemId": FS_ID, "Events": [event()], "Gap": [1]},
        {"FilesystemId": 7, "Events": [event()]},
    ],
)
def test_wrong_types_are_serialization_errors(kms: Service, params: dict[str, Any]) -> None:
    with pytest.raises(SerializationException):
        kms.call(**params)


# ------------------------------------------------------------------ exactly once
SESSION = "a" * 32


def numbered(*sequences: int) -> list[dict[str, Any]]:
    return [event(FileId=f"ino:{n}", Sequence=n) for n in sequences]


def test_a_retried_call_of_a_mount_session_is_recorded_once(kms: Service) -> None:
    gap = {"Count": 2, "Since": "2026-12-07T09:00:00Z", "Sequence": 3}
    first = kms.call(FilesystemId=FS_ID, MountSession=SESSION, Events=numbered(1, 2), Gap=gap)
    assert first == {"RecordedEvents": 2, "DuplicateEvents": 0, "GapRecorded": True}
    # the answer was lost: the mount sends the same again, and more
    again = kms.call(FilesystemId=FS_ID, MountSession=SESSION, Events=numbered(1, 2), Gap=gap)
    assert again == {"RecordedEvents": 0, "DuplicateEvents": 3, "GapRecorded": False}
    more = kms.call(FilesystemId=FS_ID, MountSession=SESSION, Events=numbered(1, 2, 4, 5), Gap=gap)
    assert more == {"RecordedEvents": 2, "DuplicateEvents": 3, "GapRecorded": False}
    # another mount (session) numbers from 1 too
    other = kms.call(FilesystemId=FS_ID, MountSession="b" * 32, Events=numbered(1))
    assert other["RecordedEvents"] == 1
    records = kms.records()
    assert [(r["eventName"], r["additionalEventData"].get("sequence")) for r in records] == [
        ("Open", 1),
        ("Open", 2),
        (GAP_EVENT_NAME, None),
        ("Open", 4),
        ("Open", 5),
        ("Open", 1),
    ]
    assert records[0]["additionalEventData"]["mountSession"] == SESSION
    assert records[5]["additionalEventData"]["mountSession"] == "b" * 32


@pytest.mark.parametrize(
    "params",
    [
        {"MountSession": SESSION, "Events": [event()]},  # no Sequence
        {"MountSession": SESSION, "Events": numbered(2, 1)},
        {"MountSession": SESSION, "Events": numbered(1, 1)},
        {"MountSession": SESSION, "Events": numbered(1, 2),
         "Gap": {"Count": 1, "Since": "2026-12-07T09:00:00Z", "Sequence": 2}},
        {"MountSession": SESSION, "Events": numbered(1),
         "Gap": {"Count": 1, "Since": "2026-12-07T09:00:00Z"}},
        {"MountSession": "not hex", "Events": numbered(1)},
        {"MountSession": SESSION, "Events": [event(Sequence=0)]},
    ],
)  # fmt: skip
def test_bad_sequences_are_refused(kms: Service, params: dict[str, Any]) -> None:
    with pytest.raises(ValidationException):
        kms.call(FilesystemId=FS_ID, **params)
    assert [r["eventName"] for r in kms.records()] == ["RecordAccessEvents"]


# ------------------------------------------------------------------ who may record
def test_a_user_records_its_own_events(kms: Service) -> None:
    kms.call(ALICE, FilesystemId=FS_ID, Events=[event(Uid=ALICE.uid)])
    (record,) = kms.records()
    assert record["userIdentity"]["uid"] == ALICE.uid
    assert record["additionalEventData"]["mountUid"] == ALICE.uid


def test_a_user_cannot_record_another_uid(kms: Service) -> None:
    events = [event(Uid=ALICE.uid), event(Uid=0)]
    with pytest.raises(AccessDeniedException, match="only root"):
        kms.call(ALICE, FilesystemId=FS_ID, Events=events)
    (refusal,) = kms.records()
    assert refusal["eventName"] == "RecordAccessEvents"
    assert refusal["errorCode"] == "AccessDeniedException"
    assert refusal["userIdentity"]["uid"] == ALICE.uid


def test_a_signed_caller_has_no_uid_and_is_refused(kms: Service) -> None:
    signed = Caller(uid=None, gid=None, pid=None, signed_user="alice", access_key_id="AKIA1")
    with pytest.raises(AccessDeniedException):
        kms.call(signed, FilesystemId=FS_ID, Events=[event()])
    assert [r["errorCode"] for r in kms.records()] == ["AccessDeniedException"]


def test_a_trusted_forwarder_records_other_users_but_not_root(kms: Service) -> None:
    """A non-root mount keyd trusts to forward (--forwarders) serves other users: it may
    record their events, as it may forward their identities -- never root's."""
    kms.service.forwarders = AccountAccess.parse(str(ALICE.uid))
    kms.call(ALICE, FilesystemId=FS_ID, Events=[event(Uid=ALICE.uid), event(Uid=NOBODY)])
    assert [r["userIdentity"]["uid"] for r in kms.records()] == [ALICE.uid, NOBODY]
    with pytest.raises(AccessDeniedException, match="--forwarders"):
        kms.call(ALICE, FilesystemId=FS_ID, Events=[event(Uid=0)])


def test_root_records_any_uid(kms: Service) -> None:
    kms.call(ROOT, FilesystemId=FS_ID, Events=[event(Uid=0), event(Uid=NOBODY)])
    assert [r["userIdentity"]["uid"] for r in kms.records()] == [0, NOBODY]


# ------------------------------------------------------------------ all or nothing
class FailingLog:
    """A sink whose batch write fails as a full disk does."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def append(self, event: dict[str, Any]) -> None:
        self.events.append(event)

    def append_many(self, events: list[dict[str, Any]]) -> None:
        raise AuditError("cannot write audit log: No space left on device") from OSError(28, "")


def test_when_the_log_cannot_take_the_records_the_call_fails(kms: Service) -> None:
    sink = FailingLog()
    kms.service.audit = sink
    with pytest.raises(StorageUnavailableException):
        kms.call(FilesystemId=FS_ID, Events=[event(), event()])
    # none of the events; the refusal itself is recorded (best effort) by append
    assert [e["eventName"] for e in sink.events] == ["RecordAccessEvents"]


def test_append_many_writes_all_lines_in_one_step(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    with AuditLog.open(path) as log:
        log.append({"eventName": "A"})
        with pytest.raises(AuditError):  # one bad event: nothing written
            log.append_many([{"eventName": "B"}, {"eventName": b"not JSON"}])
        log.append_many([{"eventName": "B"}, {"eventName": "C"}])
        assert log.seq == 3
    assert [e["eventName"] for e in audit.iter_events(path)] == ["A", "B", "C"]
    assert audit.verify(path).ok


# ------------------------------------------------------------------ a real keyd
@needs_other_users
def test_real_keyd_who_may_record(shared_keyd: Keyd) -> None:
    own = call_as(NOBODY, shared_keyd, "RecordAccessEvents", FilesystemId=FS_ID,
                  Events=[event(Uid=NOBODY, Gid=NOBODY)])  # fmt: skip
    assert own == {"RecordedEvents": 1, "DuplicateEvents": 0, "GapRecorded": False}
    forged = call_as(NOBODY, shared_keyd, "RecordAccessEvents", FilesystemId=FS_ID,
                     Events=[event(Uid=0)])  # fmt: skip
    assert forged["__type"] == "AccessDeniedException"
    by_root = call_as(0, shared_keyd, "RecordAccessEvents", FilesystemId=FS_ID,
                      Events=[event(Uid=1234)])  # fmt: skip
    assert by_root["RecordedEvents"] == 1
    out = shared_keyd.kmsfs("keyd", "audit", "verify", "--keystore", str(shared_keyd.keystore))
    assert b"chain intact" in out.stdout
    records = list(audit.iter_events(shared_keyd.keystore / "audit.log"))
    access = [(r["eventName"], r.get("errorCode"), r["userIdentity"].get("uid")) for r in records
              if r["eventName"] in ("Open", "RecordAccessEvents")]  # fmt: skip
    assert access == [
        ("Open", None, NOBODY),
        ("RecordAccessEvents", "AccessDeniedException", NOBODY),
        ("Open", None, 1234),
    ]
