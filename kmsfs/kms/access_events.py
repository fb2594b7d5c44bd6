"""RecordAccessEvents: a mount's access audit (``kmsfs mount --audit-opens``) in keyd's log.

A mount started with ``--audit-opens`` observes every open, create, unlink and rename
at its mountpoint and sends them to keyd in batches (:mod:`kmsfs.fs.access_audit`). This
kmsfs operation (target ``TrentService.RecordAccessEvents``; mixed into
:class:`~kmsfs.kms.service.KeyService` like the keystore operations of
:mod:`kmsfs.kms.admin`) turns each event into one record of keyd's hash-chained audit
log, so file access and key use are in one tamper-evident trail.

Request::

    {"FilesystemId": "<32 hex>",
     "Events": [{"Time": "2026-12-07T09:05:13.123456Z", "Uid": 1001, "Gid": 1001,
                 "Pid": 4242, "Executable": "/usr/bin/cat", "Operation": "Open",
                 "AccessMode": "O_RDONLY", "Flags": ["O_TRUNC"],
                 "FileId": "<32 hex>" | "ino:<n>", "Outcome": "Allowed" | "EACCES" | ...},
                ...],                                   (at most MAX_EVENTS)
     "Gap": {"Count": 17, "Since": "<time>", "Until": "<time>"},   (optional)
     "MountSession": "<32 hex>"}                         (optional; then every event
                                                          and the gap carry "Sequence")

Exactly once. A mount that retries a call whose answer it did not get (a timeout, a
cancelled call) would record its events twice. So a mount names its session (random,
per mount) and numbers its events and gaps (``Sequence``, increasing); keyd remembers
the last number it recorded per session (in memory, :data:`MAX_SESSIONS` sessions) and
leaves out what it already has (``DuplicateEvents`` in the answer). The records carry
``mountSession`` and ``sequence``.

``AccessMode`` is required for Open and Create, optional for Unlink and Rename;
``Flags`` is optional. ``FileId`` is the file header's id (``kmsfs keyd audit resolve``
maps it back to a path), or ``ino:<n>`` -- the backing inode number -- for an entry
without a header (an empty file, a symlink, a directory). No file names: the log never
holds plaintext names.

The whole request is checked before anything is written; then every event's record
(and one record for a gap: events the mount could not keep) is appended in one write,
or none is (StorageUnavailableException: the mount keeps them and retries). Like the
records of key use, they are not fsynced per call (see the note in the operation). The
records *are* the call's audit: a successful call gets no record of its own; a refused
one gets the usual refusal record.

Records are CloudTrail-shaped: ``eventSource`` ``kmsfs-mount``, ``eventName`` the
operation, ``eventType`` ``AwsServiceEvent``, ``userIdentity`` the event's user (with
``invokedBy: kmsfs-mount``, as CloudTrail names the service acting for a user), and
``additionalEventData`` with the mount's principal and pid, the filesystem id, the
access mode, the file id, the outcome and the executable. A refused outcome is also
the record's ``errorCode``.

Who may record: root (uid 0) events of any user (a shared mount, ``-o allow_other``);
a principal ``keyd serve --forwarders`` names, events of any user but root; any other
local user only events of its own uid (its own mount). A SigV4-signed caller
has no uid: refused. Refusals are AccessDeniedException, audited.
"""

from __future__ import annotations

import datetime as dt
import errno
import json
import re
from typing import Any

from kmsfs.errors import AccessDeniedException, ValidationException
from kmsfs.kms.audit import EncodedEvent
from kmsfs.kms.caller import Caller
from kmsfs.kms.principal import AccountAccess, Principal, login_name
from kmsfs.kms.protocol import random_uuid

OPERATION = "RecordAccessEvents"
#: request members (see kmsfs.kms.service.REQUEST_MEMBERS)
ACCESS_EVENT_REQUEST_MEMBERS: dict[str, dict[str, str]] = {
    OPERATION: {
        "FilesystemId": "string",
        "MountSession": "string",
        "Events": "structures",
        "Gap": "structure",
    },
}
ACCESS_EVENT_OPERATIONS = frozenset(ACCESS_EVENT_REQUEST_MEMBERS)

#: most events per call (the mount sends at most this many per flush)
MAX_EVENTS = 1000
#: longest Executable accepted, in characters (Linux's PATH_MAX)
MAX_EXECUTABLE = 4096
#: most entries of Flags
MAX_FLAGS = 16
EVENT_SOURCE = "kmsfs-mount"
GAP_EVENT_NAME = "AccessEventsLost"
EVENT_OPERATIONS = ("Open", "Create", "Unlink", "Rename")
ACCESS_MODES = ("O_RDONLY", "O_WRONLY", "O_RDWR")
FLAG_NAMES = frozenset(
    {
        "O_APPEND",
        "O_ASYNC",
        "O_CREAT",
        "O_DIRECT",
        "O_DIRECTORY",
        "O_DSYNC",
        "O_EXCL",
        "O_NOATIME",
        "O_NOCTTY",
        "O_NOFOLLOW",
        "O_NONBLOCK",
        "O_SYNC",
        "O_TRUNC",
        "RENAME_EXCHANGE",
        "RENAME_NOREPLACE",
        "RENAME_WHITEOUT",
    }
)
ALLOWED = "Allowed"
#: what an Outcome may be: Allowed, or an errno name
OUTCOMES = frozenset({ALLOWED, *errno.errorcode.values()})
_EVENT_MEMBERS = frozenset(
    {
        "Time",
        "Uid",
        "Gid",
        "Pid",
        "Executable",
        "Operation",
        "AccessMode",
        "Flags",
        "FileId",
        "Outcome",
        "Sequence",
    }
)
_GAP_MEMBERS = frozenset({"Count", "Since", "Until", "Sequence"})
#: mount sessions whose last recorded sequence number keyd remembers
MAX_SESSIONS = 4096
_FILESYSTEM_ID = re.compile(r"[0-9a-f]{32}")
_FILE_ID = re.compile(r"[0-9a-f]{32}|ino:(0|[1-9][0-9]{0,19})")
_TIME = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,6})?Z")
_ID_LIMIT = 1 << 32  # uids, gids and pids are 32-bit on Linux
_SEQUENCE_LIMIT = 1 << 63


def parse_event_time(value: object, where: str) -> str:
    """*value* if it is an ISO-8601 UTC time (``YYYY-MM-DDTHH:MM:SS[.ffffff]Z``)."""
    if not isinstance(value, str) or not _TIME.fullmatch(value):
        raise ValidationException(f"{where} must be an ISO-8601 UTC time (...Z)")
    try:
        dt.datetime.fromisoformat(value[:-1])
    except ValueError:
        raise ValidationException(f"{where} is not a valid time") from None
    return value


def _identifier(event: dict[str, Any], name: str, where: str) -> int:
    value = event.get(name)
    if type(value) is not int or not 0 <= value < _ID_LIMIT:
        raise ValidationException(f"{where}.{name} must be an integer from 0 to {_ID_LIMIT - 1}")
    return value


def check_event(event: dict[str, Any], where: str) -> None:
    """Raise ValidationException unless *event* is a well-formed access event."""
    unknown = set(event) - _EVENT_MEMBERS
    if unknown:
        raise ValidationException(f"{where} has unknown members: {', '.join(sorted(unknown))}")
    parse_event_time(event.get("Time"), f"{where}.Time")
    for name in ("Uid", "Gid", "Pid"):
        _identifier(event, name, where)
    executable = event.get("Executable")
    if not isinstance(executable, str) or len(executable) > MAX_EXECUTABLE:
        raise ValidationException(
            f"{where}.Executable must be a string of at most {MAX_EXECUTABLE} characters"
        )
    if "\0" in executable:
        raise ValidationException(f"{where}.Executable must not contain a NUL character")
    operation = event.get("Operation")
    if operation not in EVENT_OPERATIONS:
        raise ValidationException(f"{where}.Operation must be one of {', '.join(EVENT_OPERATIONS)}")
    mode = event.get("AccessMode")
    if mode is None and operation in ("Open", "Create"):
        raise ValidationException(f"{where}.AccessMode is required for {operation}")
    if mode is not None and mode not in ACCESS_MODES:
        raise ValidationException(f"{where}.AccessMode must be one of {', '.join(ACCESS_MODES)}")
    flags = event.get("Flags")
    if flags is not None and (
        type(flags) is not list
        or len(flags) > MAX_FLAGS
        or not all(isinstance(flag, str) and flag in FLAG_NAMES for flag in flags)
    ):
        raise ValidationException(
            f"{where}.Flags must be a list of at most {MAX_FLAGS} flag names (O_TRUNC, ...)"
        )
    file_id = event.get("FileId")
    if not isinstance(file_id, str) or not _FILE_ID.fullmatch(file_id):
        raise ValidationException(
            f"{where}.FileId must be a file id (32 hex digits) or ino:<number>"
        )
    if event.get("Outcome") not in OUTCOMES:
        raise ValidationException(f"{where}.Outcome must be Allowed or an errno name (EACCES, ...)")
    _check_sequence(event, where)


def _check_sequence(item: dict[str, Any], where: str) -> None:
    sequence = item.get("Sequence")
    if sequence is not None and (type(sequence) is not int or not 0 < sequence < _SEQUENCE_LIMIT):
        raise ValidationException(f"{where}.Sequence must be a positive integer")


def check_gap(gap: dict[str, Any]) -> None:
    unknown = set(gap) - _GAP_MEMBERS
    if unknown:
        raise ValidationException(f"Gap has unknown members: {', '.join(sorted(unknown))}")
    count = gap.get("Count")
    if type(count) is not int or not 0 < count < 1 << 63:
        raise ValidationException("Gap.Count must be a positive integer")
    parse_event_time(gap.get("Since"), "Gap.Since")
    if gap.get("Until") is not None:
        parse_event_time(gap.get("Until"), "Gap.Until")
    _check_sequence(gap, "Gap")


class AccessEvents:
    """RecordAccessEvents, mixed into KeyService (which provides principal, account,
    region, the request id and the audit writing)."""

    account: str
    region: str
    #: keyd serve --forwarders (kmsfs:ForwardCaller)
    forwarders: AccountAccess
    _request_id: str
    _access_sessions: dict[str, int]

    def principal(self, caller: Caller) -> Any:  # pragma: no cover
        raise NotImplementedError  # KeyService's

    def _record_many(  # pragma: no cover
        self, events: list[dict[str, Any] | EncodedEvent], *, durable: bool
    ) -> None:
        raise NotImplementedError  # KeyService's

    def _op_RecordAccessEvents(self, params: dict[str, Any], caller: Caller) -> dict[str, Any]:
        mount = self.principal(caller)
        if caller.signed_user is not None or mount.uid is None:
            raise AccessDeniedException(
                f"User: {mount.arn} is not authorized to perform: kmsfs:{OPERATION}: "
                "only local users (keyd's Unix socket) record access events"
            )
        filesystem_id = params.get("FilesystemId")
        if not isinstance(filesystem_id, str) or not _FILESYSTEM_ID.fullmatch(filesystem_id):
            raise ValidationException("FilesystemId must be 32 lowercase hex digits")
        events = params.get("Events") or []
        gap = params.get("Gap")
        if len(events) > MAX_EVENTS:
            raise ValidationException(
                f"Events has {len(events)} members; at most {MAX_EVENTS} per call"
            )
        if not events and gap is None:
            raise ValidationException("RecordAccessEvents needs Events or a Gap")
        for index, event in enumerate(events):
            check_event(event, f"Events[{index}]")
        if gap is not None:
            check_gap(gap)
        session = params.get("MountSession")
        if session is not None:
            self._check_sequences(session, events, gap)
        if not mount.is_root:
            # a principal keyd trusts to forward callers (keyd serve --forwarders,
            # kmsfs:ForwardCaller) serves other users too: it records their events, as
            # it forwards their identities -- but not root's (only root forwards uid 0)
            forwarder = self.forwarders.allows(mount)
            for event in events:
                if event["Uid"] != mount.uid and not (forwarder and event["Uid"] != 0):
                    raise AccessDeniedException(
                        f"User: {mount.arn} is not authorized to perform: kmsfs:{OPERATION} "
                        f"for uid {event['Uid']}: only root and the forwarders keyd names "
                        "(--forwarders) record other users' events"
                    )
        # (sequence, record) in the mount's order; a retried call's items that keyd
        # already recorded (its answer was lost) are left out
        writer = _AccessRecords(self, mount, filesystem_id, session)
        items: list[tuple[int, dict[str, Any] | EncodedEvent]] = [
            (event.get("Sequence", 0), writer.record(event)) for event in events
        ]
        if gap is not None:
            gap_item = (gap.get("Sequence", 0), self._gap_record(gap, mount, filesystem_id))
            items.append(gap_item)
        recorded_up_to = 0
        if session is not None:
            seen = self._session_sequences().get(session, 0)
            items.sort(key=lambda item: item[0])
            fresh = [item for item in items if item[0] > seen]
            duplicates = len(items) - len(fresh)
            items = fresh
            recorded_up_to = max([seen, *(item[0] for item in items)])
        else:
            duplicates = 0
        records = [record for _sequence, record in items]
        if records:
            # written before the answer, not fsynced per call: as key-use records
            # (Decrypt...) are not; the log reaches the disk with its head file within
            # a second. A crash of the host, the only thing that loses page-cache
            # lines, also loses the mount's own queue: a flush would save nothing the
            # queue could. (Measured: a flush per call made the small-file rows of
            # scripts/bench several percent slower.)
            self._record_many(records, durable=False)
        if session is not None:
            sessions = self._session_sequences()
            sessions.pop(session, None)
            sessions[session] = recorded_up_to
            while len(sessions) > MAX_SESSIONS:
                sessions.pop(next(iter(sessions)))
        gap_recorded = gap is not None and any(item is gap_item for item in items)
        return {
            "RecordedEvents": len(records) - gap_recorded,
            "DuplicateEvents": duplicates,
            "GapRecorded": gap_recorded,
        }

    def _session_sequences(self) -> dict[str, int]:
        """The last sequence number recorded per mount session (in memory: a keyd restart
        forgets it; then only a call whose answer was lost *and* that keyd wrote just
        before it stopped can be recorded twice)."""
        sessions: dict[str, int] | None = getattr(self, "_access_sessions", None)
        if sessions is None:
            sessions = self._access_sessions = {}
        return sessions

    @staticmethod
    def _check_sequences(
        session: object, events: list[dict[str, Any]], gap: dict[str, Any] | None
    ) -> None:
        if not isinstance(session, str) or not _FILESYSTEM_ID.fullmatch(session):
            raise ValidationException("MountSession must be 32 lowercase hex digits")
        sequences = [event.get("Sequence") for event in events]
        if gap is not None:
            sequences.append(gap.get("Sequence"))
        if any(sequence is None for sequence in sequences):
            raise ValidationException(
                "with a MountSession, every event and the gap need a Sequence"
            )
        event_sequences = sequences[: len(events)]
        if any(a >= b for a, b in zip(event_sequences, event_sequences[1:], strict=False)):
            raise ValidationException("the events' Sequence numbers must increase")
        if len(set(sequences)) != len(sequences):
            raise ValidationException("Sequence numbers must be unique")

    def _mount_data(self, mount: Principal, filesystem_id: str) -> dict[str, Any]:
        return {
            "mountPrincipal": mount.arn,
            "mountUid": mount.uid,
            "mountPid": mount.pid,
            "filesystemId": filesystem_id,
        }

    def _common(self, name: str, when: str) -> dict[str, Any]:
        return {
            "eventVersion": "1.08",
            "userIdentity": None,
            "eventTime": when,
            "eventSource": EVENT_SOURCE,
            "eventName": name,
            "awsRegion": self.region,
            "requestParameters": None,
            "responseElements": None,
            "requestID": self._request_id,
            "eventID": random_uuid(),
        }

    def _gap_record(
        self, gap: dict[str, Any], mount: Principal, filesystem_id: str
    ) -> dict[str, Any]:
        until = gap.get("Until") or gap["Since"]
        record = self._common(GAP_EVENT_NAME, until)
        identity = mount.user_identity()
        identity["invokedBy"] = EVENT_SOURCE
        record["userIdentity"] = identity
        record["readOnly"] = True
        record["eventType"] = "AwsServiceEvent"
        record["recipientAccountId"] = self.account
        data = self._mount_data(mount, filesystem_id)
        data.update(
            {
                "lostEvents": gap["Count"],
                "firstLostTime": gap["Since"],
                "lastLostTime": until,
                "note": "access events the mount could not keep (its queue was full while "
                "keyd did not answer); they are counted here, not recorded",
            }
        )
        record["additionalEventData"] = data
        return record


_ENCODE = json.JSONEncoder(separators=(",", ":")).encode


class _AccessRecords:
    """The records of one RecordAccessEvents call, as JSON text (audit.EncodedEvent).

    What the records of one call share -- the mount's data, the request id, the region,
    each process's identity -- is encoded once; each event adds its own values, which
    check_event has checked: the time, the operation, the access mode, the flags, the
    file id and the outcome are tokens JSON takes as they are, and the executable is
    encoded (once per call and path). A third of the cost of building each record as a
    dictionary and encoding it whole (measured: 19 -> 7 us per event in-process), on
    the core that the application and the mount share.
    """

    def __init__(
        self, service: AccessEvents, mount: Principal, filesystem_id: str, session: str | None
    ) -> None:
        self.service = service
        self.mount = mount
        mount_data = _ENCODE(service._mount_data(mount, filesystem_id))
        self._after_identity = '","eventSource":"' + EVENT_SOURCE + '","eventName":"'
        self._after_name = (
            f'","awsRegion":{_ENCODE(service.region)},"requestParameters":null,'
            f'"responseElements":null,"requestID":{_ENCODE(service._request_id)},"eventID":"'
        )
        self._after_id = '","readOnly":'
        self._after_read_only = (
            f',"eventType":"AwsServiceEvent","recipientAccountId":{_ENCODE(service.account)}'
        )
        self._data = ',"additionalEventData":' + mount_data[:-1] + ',"pid":'
        self._session = "" if session is None else f',"mountSession":{_ENCODE(session)},"sequence":'
        self._identities: dict[tuple[int, int, int, str], str] = {}
        self._logins: dict[int, str | None] = {}
        self._executables: dict[str, str] = {}

    def _identity(self, event: dict[str, Any]) -> str:
        """The event's userIdentity, encoded: the user (uid, gid, pid, executable) with
        ``invokedBy: kmsfs-mount``."""
        uid, gid, pid, executable = event["Uid"], event["Gid"], event["Pid"], event["Executable"]
        key = (uid, gid, pid, executable)
        text = self._identities.get(key)
        if text is None:
            logins = self._logins
            name = logins[uid] if uid in logins else logins.setdefault(uid, login_name(uid))
            user = Principal(self.service.account, uid, gid, pid, name, (), executable)
            identity = user.user_identity()
            identity["invokedBy"] = EVENT_SOURCE
            text = self._identities[key] = _ENCODE(identity)
        return text

    def record(self, event: dict[str, Any]) -> EncodedEvent:
        operation = event["Operation"]
        mode = event.get("AccessMode")
        outcome = event["Outcome"]
        executable = event["Executable"]
        encoded_executable = self._executables.get(executable)
        if encoded_executable is None:
            encoded_executable = self._executables[executable] = _ENCODE(executable)
        read_only = operation == "Open" and mode == "O_RDONLY"
        flags = event.get("Flags") or []
        parts = [
            '{"eventVersion":"1.08","userIdentity":',
            self._identity(event),
            ',"eventTime":"',
            event["Time"],
            self._after_identity,
            operation,
            self._after_name,
            random_uuid(),
            self._after_id,
            "true" if read_only else "false",
            self._after_read_only,
        ]
        if outcome != ALLOWED:
            parts += (',"errorCode":"', outcome, '"')
        parts += (
            self._data,
            str(event["Pid"]),
            ',"accessMode":',
            "null" if mode is None else f'"{mode}"',
            ',"flags":[',
            ",".join(f'"{flag}"' for flag in flags),
            '],"fileId":"',
            event["FileId"],
            '","outcome":"',
            outcome,
            '","executable":',
            encoded_executable,
        )
        if self._session:
            parts += (self._session, str(event["Sequence"]))
        parts.append("}}")
        return EncodedEvent("".join(parts))
