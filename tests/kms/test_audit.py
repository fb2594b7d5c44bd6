"""keyd's audit log: chain, head file, tamper detection, reading, following."""

from __future__ import annotations

import hashlib
import io
import json
import os
import stat
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kmsfs.errors import AuditError, AuditTampered
from kmsfs.kms import audit
from kmsfs.kms.audit import (
    ZERO_DIGEST,
    AuditLog,
    format_event_line,
    head_path,
    iter_events,
    line_digest,
    tail,
    verify,
    verify_or_raise,
)

KEY1 = "1234abcd-12ab-34cd-56ef-1234567890ab"
KEY2 = "0987dcba-09fe-87dc-65ba-ab0987654321"


def arn(key_id: str) -> str:
    return f"arn:aws:kms:local:000000000000:key/{key_id}"


def make_event(
    i: int,
    *,
    key_id: str = KEY1,
    name: str = "Decrypt",
    error: str | None = None,
    user: str = "alice",
    uid: int = 1000,
) -> dict[str, Any]:
    """A CloudTrail-shaped KMS event as the service layer builds it."""
    resolved = KEY2 if key_id.startswith("alias/") else key_id.rsplit("/", 1)[-1]
    return {
        "eventVersion": "1.08",
        "eventTime": f"2024-05-01T12:00:{i % 60:02d}Z",
        "eventSource": "kms.amazonaws.com",
        "eventName": name,
        "awsRegion": "local",
        "userIdentity": {"uid": uid, "gid": uid, "pid": 4000 + i, "userName": user},
        "requestParameters": {
            "keyId": key_id,
            "encryptionContext": {"kmsfs:file": f"/data/file-{i}"},
            "encryptionAlgorithm": "SYMMETRIC_DEFAULT",
        },
        "responseElements": None if error else {"keyId": arn(resolved)},
        "errorCode": error,
        "errorMessage": "denied by policy" if error else None,
        "requestID": f"req-{i:08d}",
        "eventID": f"evt-{i:08d}",
        "readOnly": True,
        "resources": [{"accountId": "000000000000", "type": "AWS::KMS::Key", "ARN": arn(resolved)}],
        "eventType": "AwsApiCall",
    }


def write_log(path: Path, n: int) -> None:
    with AuditLog.open(path) as log:
        for i in range(1, n + 1):
            log.append(make_event(i))


def read_lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def write_lines(path: Path, lines: list[bytes]) -> None:
    path.write_bytes(b"".join(lines))


def forged_line(seq: int, prev: str) -> bytes:
    body = json.dumps(make_event(seq, name="ScheduleKeyDeletion"), separators=(",", ":"))
    return f'{{"seq":{seq},"prevDigest":"{prev}",{body[1:]}\n'.encode()


def digest_of(line: bytes) -> str:
    return hashlib.sha256(line.rstrip(b"\n")).hexdigest()


# --------------------------------------------------------------------------- intact
def test_empty_log_verifies(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    AuditLog.open(path).close()
    assert path.read_bytes() == b""
    report = verify(path)
    assert report == audit.VerifyReport(True, 0)
    assert json.loads(head_path(path).read_text()) == {"seq": 0, "digest": ZERO_DIGEST}


@pytest.mark.parametrize("n", [1, 2, 57])
def test_intact_log_verifies(tmp_path: Path, n: int) -> None:
    path = tmp_path / "audit.log"
    write_log(path, n)
    report = verify(path)
    assert report.ok and report.lines == n
    assert report.first_bad_line is None and report.problem is None and report.warnings == ()
    assert verify_or_raise(path) == report


def test_line_format_and_chain(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    write_log(path, 3)
    lines = read_lines(path)
    assert all(line.endswith(b"\n") and line.count(b"\n") == 1 for line in lines)
    first, second, third = (json.loads(line) for line in lines)
    assert lines[0].startswith(b'{"seq":1,"prevDigest":"' + ZERO_DIGEST.encode() + b'","event')
    assert b", " not in lines[0] and b": " not in lines[0]
    assert [first["seq"], second["seq"], third["seq"]] == [1, 2, 3]
    assert second["prevDigest"] == digest_of(lines[0]) == line_digest(lines[0][:-1])
    assert third["prevDigest"] == digest_of(lines[1])
    # the event is carried unchanged
    assert {k: v for k, v in first.items() if k not in ("seq", "prevDigest")} == make_event(1)
    assert json.loads(head_path(path).read_text()) == {"seq": 3, "digest": digest_of(lines[2])}


def test_non_ascii_is_escaped_and_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    event = make_event(1, user="zoë\u2028\U0001f511")
    with AuditLog.open(path) as log:
        log.append(event)
    raw = path.read_bytes()
    assert raw.isascii()
    assert next(iter_events(path))["userIdentity"]["userName"] == "zoë\u2028\U0001f511"
    assert verify(path).ok


def test_reopen_continues_chain(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    write_log(path, 3)
    with AuditLog.open(path) as log:
        assert log.seq == 3
        log.append(make_event(4))
        log.append(make_event(5))
    with AuditLog.open(path) as log:
        log.append(make_event(6))
    assert [e["seq"] for e in iter_events(path)] == [1, 2, 3, 4, 5, 6]
    report = verify(path)
    assert report.ok and report.lines == 6 and report.warnings == ()


def test_missing_head_is_a_warning(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    write_log(path, 4)
    head_path(path).unlink()
    report = verify(path)
    assert report.ok and report.lines == 4
    assert len(report.warnings) == 1 and "no head file" in report.warnings[0]
    strict = verify(path, require_head=True)
    assert not strict.ok and strict.kind == "head missing" and strict.first_bad_line is None


def test_head_behind_log_is_a_warning(tmp_path: Path) -> None:
    """As after a crash: the last lines were written after the last head rewrite."""
    path = tmp_path / "audit.log"
    write_log(path, 3)
    old_head = head_path(path).read_bytes()
    with AuditLog.open(path) as log:
        log.append(make_event(4))
        log.append(make_event(5))
    head_path(path).write_bytes(old_head)
    report = verify(path)
    assert report.ok and report.lines == 5
    assert len(report.warnings) == 1 and report.warnings[0].startswith("head behind log")
    # keyd may reopen such a log and go on
    with AuditLog.open(path) as log:
        log.append(make_event(6))
    assert verify(path) == audit.VerifyReport(True, 6)


def test_head_is_rewritten_by_append(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    log = AuditLog.open(path, head_interval=0.0)
    try:
        for i in range(1, 4):
            log.append(make_event(i))
            head = json.loads(head_path(path).read_text())
            assert head == {"seq": i, "digest": digest_of(read_lines(path)[-1])}
    finally:
        log.close()
    # with the default interval, the first append writes it, the next ones wait
    other = tmp_path / "other.log"
    log = AuditLog.open(other)
    try:
        log.append(make_event(1))
        log.append(make_event(2))
        assert json.loads(head_path(other).read_text())["seq"] == 1
        assert verify(other).ok  # a running keyd's log: head behind, not tampered
        log.sync()
        assert json.loads(head_path(other).read_text())["seq"] == 2
        assert log.last_head_error is None
    finally:
        log.close()


def test_file_modes_are_0600(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    old_umask = os.umask(0o022)
    try:
        write_log(path, 2)
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(head_path(path).stat().st_mode) == 0o600
    assert not list(tmp_path.glob("*.tmp"))


# --------------------------------------------------------------------------- tampering
def _edit_field(lines: list[bytes], index: int) -> None:
    record = json.loads(lines[index])
    record["eventName"] = "Encrypt"
    lines[index] = json.dumps(record, separators=(",", ":")).encode() + b"\n"


def _set_seq(lines: list[bytes], index: int, seq: int) -> None:
    record = json.loads(lines[index])
    record["seq"] = seq
    lines[index] = json.dumps(record, separators=(",", ":")).encode() + b"\n"


def _insert_smart(lines: list[bytes], index: int) -> None:
    """A forged line with a plausible seq and a correct prevDigest."""
    prev = digest_of(lines[index - 1]) if index else ZERO_DIGEST
    lines.insert(index, forged_line(index + 1, prev))


def _insert_lazy(lines: list[bytes], index: int) -> None:
    """A forged line with a plausible seq and a made-up prevDigest."""
    lines.insert(index, forged_line(index + 1, "ab" * 32))


def _swap(lines: list[bytes], i: int, j: int) -> None:
    lines[i], lines[j] = lines[j], lines[i]


def _move_to_end(lines: list[bytes], index: int) -> None:
    lines.append(lines.pop(index))


def _replace_last(lines: list[bytes]) -> None:
    lines.pop()
    lines.append(forged_line(len(lines) + 1, digest_of(lines[-1])))


TAMPERINGS: dict[str, tuple[Callable[[list[bytes]], None], int, str]] = {
    # name: (change to the 10 lines, first bad line, kind)
    "edit a middle line": (lambda ls: _edit_field(ls, 4), 5, "edited"),
    "edit the first line": (lambda ls: _edit_field(ls, 0), 1, "edited"),
    "edit the last line": (lambda ls: _edit_field(ls, 9), 10, "edited"),
    "edit the second-to-last line": (lambda ls: _edit_field(ls, 8), 9, "edited"),
    "edit a seq": (lambda ls: _set_seq(ls, 4, 9), 5, "edited"),
    "edit a seq backwards": (lambda ls: _set_seq(ls, 4, 2), 5, "edited"),
    "delete a middle line": (lambda ls: ls.pop(4), 5, "removed"),
    "delete two middle lines": (lambda ls: [ls.pop(4), ls.pop(4)], 5, "removed"),
    "delete the first line": (lambda ls: ls.pop(0), 1, "removed"),
    "insert a forged line": (lambda ls: _insert_smart(ls, 4), 5, "inserted"),
    "insert a forged first line": (lambda ls: _insert_smart(ls, 0), 1, "inserted"),
    "insert a lazily forged line": (lambda ls: _insert_lazy(ls, 4), 5, "inserted"),
    "append a lazily forged line": (lambda ls: _insert_lazy(ls, 10), 11, "inserted"),
    "duplicate a line": (lambda ls: ls.insert(5, ls[4]), 6, "inserted"),
    "replay an old line": (lambda ls: ls.insert(6, ls[1]), 7, "inserted"),
    "swap adjacent lines": (lambda ls: _swap(ls, 3, 4), 4, "reordered"),
    "swap distant lines": (lambda ls: _swap(ls, 2, 7), 3, "reordered"),
    "swap the first two lines": (lambda ls: _swap(ls, 0, 1), 1, "reordered"),
    "swap the last two lines": (lambda ls: _swap(ls, 8, 9), 9, "reordered"),
    "move a line to the end": (lambda ls: _move_to_end(ls, 2), 3, "reordered"),
    "remove the last line": (lambda ls: ls.pop(), 10, "tail removed"),
    "remove the last three lines": (lambda ls: ls.__delitem__(slice(7, None)), 8, "tail removed"),
    "remove every line": (lambda ls: ls.clear(), 1, "tail removed"),
    "replace the last line": (_replace_last, 10, "edited"),
    "truncate mid-line": (lambda ls: ls.__setitem__(9, ls[9][:40]), 10, "truncated"),
    "truncate mid-line, earlier": (
        lambda ls: ls.__setitem__(slice(5, None), [ls[5][:-1]]),
        6,
        "truncated",
    ),
    "append garbage": (lambda ls: ls.append(b"garbage\n"), 11, "garbage"),
    "append garbage without newline": (lambda ls: ls.append(b"\x00\x00\x00"), 11, "truncated"),
    "append a JSON line": (lambda ls: ls.append(b'{"eventName":"Decrypt"}\n'), 11, "edited"),
    "insert an empty line": (lambda ls: ls.insert(3, b"\n"), 4, "garbage"),
    "overwrite a line with garbage": (
        lambda ls: ls.__setitem__(6, b"x" * 80 + b"\n"),
        7,
        "garbage",
    ),
}


@pytest.mark.parametrize("name", list(TAMPERINGS))
def test_tampering_is_found_at_the_right_line(tmp_path: Path, name: str) -> None:
    change, first_bad, kind = TAMPERINGS[name]
    path = tmp_path / "audit.log"
    write_log(path, 10)
    lines = read_lines(path)
    change(lines)
    write_lines(path, lines)
    report = verify(path)
    assert not report.ok
    assert (report.first_bad_line, report.kind) == (first_bad, kind), report.problem
    assert report.problem and f"line {first_bad}" in report.problem
    assert report.lines == len(lines)
    with pytest.raises(AuditTampered) as raised:
        verify_or_raise(path)
    assert raised.value.line_number == first_bad


def test_damaged_head_fails(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    write_log(path, 3)
    head_path(path).write_text("{not json")
    report = verify(path)
    assert not report.ok and report.kind == "head damaged" and report.first_bad_line is None
    with pytest.raises(AuditError, match="damaged"):
        AuditLog.open(path)


def test_deleted_log_with_head_fails(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    write_log(path, 3)
    path.unlink()
    report = verify(path)
    assert (report.ok, report.lines, report.first_bad_line, report.kind) == (
        False,
        0,
        1,
        "tail removed",
    )
    head_path(path).unlink()
    with pytest.raises(AuditError, match="no audit log"):
        verify(path)


def test_appending_forged_lines_at_the_end_is_a_documented_limit(tmp_path: Path) -> None:
    """An unkeyed chain can be extended by anyone; the head only shows it as 'behind'."""
    path = tmp_path / "audit.log"
    write_log(path, 5)
    lines = read_lines(path)
    _insert_smart(lines, 5)
    write_lines(path, lines)
    report = verify(path)
    assert report.ok and report.warnings[0].startswith("head behind log")


def test_open_refuses_a_log_shorter_than_its_head(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    write_log(path, 10)
    write_lines(path, read_lines(path)[:8])
    with pytest.raises(AuditTampered) as raised:
        AuditLog.open(path)
    assert raised.value.line_number == 9
    assert path.stat().st_size > 0  # nothing was appended or rewritten
    assert json.loads(head_path(path).read_text())["seq"] == 10


def test_open_refuses_an_edited_last_line(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    write_log(path, 4)
    lines = read_lines(path)
    _edit_field(lines, 3)
    write_lines(path, lines)
    with pytest.raises(AuditTampered, match="does not match"):
        AuditLog.open(path)


@pytest.mark.parametrize("tail_bytes", [b'{"seq":5,"prevD', b"garbage\n", b"\n"])
def test_open_refuses_a_damaged_end(tmp_path: Path, tail_bytes: bytes) -> None:
    path = tmp_path / "audit.log"
    write_log(path, 4)
    with path.open("ab") as f:
        f.write(tail_bytes)
    before = path.read_bytes()
    with pytest.raises(AuditError) as raised:
        AuditLog.open(path)
    assert not isinstance(raised.value, AuditTampered)
    assert path.read_bytes() == before


def test_second_writer_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    with AuditLog.open(path) as log:
        log.append(make_event(1))
        with pytest.raises(AuditError, match="in use"):
            AuditLog.open(path)
    with AuditLog.open(path) as log:  # the lock went with the close
        log.append(make_event(2))
    assert verify(path).ok


def test_bad_events_are_refused_and_nothing_is_written(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    with AuditLog.open(path) as log:
        log.append(make_event(1))
        size = path.stat().st_size
        with pytest.raises(AuditError, match="reserved"):
            log.append({"seq": 7, "eventName": "Decrypt"})
        secret = b"\x01\x02secret-plaintext"
        with pytest.raises(AuditError, match="bytes") as raised:
            log.append({"eventName": "Decrypt", "plaintext": secret})
        assert "secret" not in str(raised.value)
        with pytest.raises(AuditError, match="JSON"):
            log.append({"eventName": "Decrypt", "ratio": float("nan")})
        assert path.stat().st_size == size and log.seq == 1
        log.append({})  # an empty event is still a valid line
    assert verify(path).ok
    assert list(iter_events(path))[-1] == {"seq": 2, "prevDigest": digest_of(read_lines(path)[0])}
    with pytest.raises(AuditError, match="closed"):
        log.append(make_event(3))
    log.close()  # closing twice is harmless


def test_concurrent_appends_make_one_valid_chain(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    threads_count, per_thread = 8, 300
    with AuditLog.open(path, head_interval=0.001) as log:
        barrier = threading.Barrier(threads_count)

        def worker(worker_id: int) -> None:
            barrier.wait()
            for i in range(per_thread):
                log.append(make_event(i, uid=worker_id))

        threads = [threading.Thread(target=worker, args=(w,)) for w in range(threads_count)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
        assert log.last_head_error is None
    report = verify(path)
    total = threads_count * per_thread
    assert report == audit.VerifyReport(True, total)
    events = list(iter_events(path))
    assert [e["seq"] for e in events] == list(range(1, total + 1))
    for worker_id in range(threads_count):
        mine = [e for e in events if e["userIdentity"]["uid"] == worker_id]
        assert [e["requestID"] for e in mine] == [f"req-{i:08d}" for i in range(per_thread)]


def test_verify_while_keyd_appends_never_sees_the_head_ahead(tmp_path: Path) -> None:
    """The head is read first and only ever written after the log was flushed."""
    path = tmp_path / "audit.log"
    done = threading.Event()
    with AuditLog.open(path, head_interval=0.002) as log:

        def writer() -> None:
            for i in range(1000):
                log.append(make_event(i))
            done.set()

        thread = threading.Thread(target=writer)
        thread.start()
        reports = []
        while not done.is_set() or not reports:
            reports.append(verify(path))
        thread.join(timeout=30)
    for report in reports:
        # a reader may catch the very last line half-written (documented)
        assert report.ok or (report.kind, report.first_bad_line) == ("truncated", report.lines)
    assert verify(path) == audit.VerifyReport(True, 1000)


# --------------------------------------------------------------------------- properties
TAMPER_KINDS = ["flip", "delete", "insert_smart", "insert_lazy", "swap", "truncate", "edit"]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(min_value=1, max_value=12),
    kind=st.sampled_from(TAMPER_KINDS),
    data=st.data(),
)
def test_any_single_tampering_is_found_at_its_line(n: int, kind: str, data: st.DataObject) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "audit.log"
        write_log(path, n)
        lines = read_lines(path)
        if kind == "flip":
            index = data.draw(st.integers(0, n - 1), label="line")
            offset = data.draw(st.integers(0, len(lines[index]) - 2), label="byte")
            old = lines[index][offset]
            new = data.draw(st.integers(0, 255).filter(lambda b: b != old), label="value")
            lines[index] = lines[index][:offset] + bytes([new]) + lines[index][offset + 1 :]
            expected = index + 1
        elif kind == "edit":
            index = data.draw(st.integers(0, n - 1), label="line")
            _edit_field(lines, index)
            expected = index + 1
        elif kind == "delete":
            index = data.draw(st.integers(0, n - 1), label="line")
            del lines[index]
            expected = index + 1
        elif kind == "insert_smart":
            index = data.draw(st.integers(0, n - 1), label="before")  # n: documented limit
            _insert_smart(lines, index)
            expected = index + 1
        elif kind == "insert_lazy":
            index = data.draw(st.integers(0, n), label="before")
            _insert_lazy(lines, index)
            expected = index + 1
        elif kind == "swap":
            if n < 2:
                return
            i = data.draw(st.integers(0, n - 2), label="first")
            j = data.draw(st.integers(i + 1, n - 1), label="second")
            _swap(lines, i, j)
            expected = i + 1
        else:  # truncate: cut the file inside line `index` (or right before it)
            index = data.draw(st.integers(0, n - 1), label="line")
            cut = data.draw(st.integers(0, len(lines[index]) - 1), label="cut")
            lines = lines[:index] + ([lines[index][:cut]] if cut else [])
            expected = index + 1
        write_lines(path, lines)
        report = verify(path)
        assert not report.ok, kind
        assert report.first_bad_line == expected, (kind, report)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.binary(max_size=20).map(lambda b: b.replace(b"\n", b"")), max_size=12),
    st.integers(min_value=1, max_value=9),
)
def test_reading_backwards_across_blocks(raw_lines: list[bytes], block: int) -> None:
    data = b"".join(line + b"\n" for line in raw_lines)
    original = audit._BLOCK
    audit._BLOCK = block
    try:
        backwards = list(audit._lines_backward(io.BytesIO(data), len(data)))
    finally:
        audit._BLOCK = original
    assert backwards == [b"", *reversed(raw_lines)] if raw_lines else backwards == [b""]


# --------------------------------------------------------------------------- reading
def _mixed_log(path: Path) -> None:
    with AuditLog.open(path) as log:
        log.append(make_event(1, name="CreateKey"))
        log.append(make_event(2, key_id=KEY2, name="GenerateDataKey"))
        log.append(make_event(3, key_id=arn(KEY1)))
        log.append(make_event(4, key_id="alias/backup", name="GenerateDataKey"))
        log.append(make_event(5, error="AccessDeniedException", user="mallory", uid=1001))
        log.append(make_event(6, key_id=KEY2))


def test_iter_events_filters(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    _mixed_log(path)
    ids = lambda **kw: [e["seq"] for e in iter_events(path, **kw)]  # noqa: E731
    assert ids() == [1, 2, 3, 4, 5, 6]
    assert ids(key=KEY1) == [1, 3, 5]
    assert ids(key=KEY2) == [2, 4, 6]  # event 4 named the alias; its response names KEY2
    assert ids(key="alias/backup") == [4]
    assert ids(key=arn(KEY2)) == [2, 4, 6]
    assert ids(key=KEY1[:8]) == [1, 3, 5]
    assert ids(event_name="GenerateDataKey") == [2, 4]
    assert ids(event_name="GenerateDataKey", key=KEY1) == []
    assert ids(event_name="generatedatakey") == []


def test_tail_returns_the_last_matching_events(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    _mixed_log(path)
    seqs = lambda **kw: [e["seq"] for e in tail(path, **kw)]  # noqa: E731
    assert seqs() == [1, 2, 3, 4, 5, 6]
    assert seqs(n=2) == [5, 6]
    assert seqs(n=0) == []
    assert seqs(n=2, key=KEY1) == [3, 5]
    assert seqs(n=5, event_name="CreateKey") == [1]
    with path.open("ab") as f:  # garbage and a partial last line are skipped
        f.write(b"garbage\n\n" + read_lines(path)[0][:30])
    assert seqs(n=3) == [4, 5, 6]
    with pytest.raises(ValueError):
        list(tail(path, -1))
    with pytest.raises(AuditError):
        list(tail(tmp_path / "missing.log"))


def test_tail_of_a_large_log_reads_from_the_end(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    write_log(path, 600)  # several 64 KiB blocks
    assert [e["seq"] for e in tail(path, 3)] == [598, 599, 600]
    assert len(list(tail(path, 1000))) == 600


def _collect_in_thread(
    stream: Any, expected: int, stop: threading.Event
) -> tuple[list[dict[str, Any]], threading.Thread]:
    got: list[dict[str, Any]] = []

    def consume() -> None:
        for event in stream:
            got.append(event)
            if len(got) >= expected:
                return

    thread = threading.Thread(target=consume, daemon=True)
    thread.start()
    return got, thread


def test_tail_follow_yields_appended_lines_and_waits_for_newlines(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    _mixed_log(path)
    stop = threading.Event()
    stream = tail(path, 2, follow=True, key=KEY1, poll_interval=0.01, stop=stop)
    got, consumer = _collect_in_thread(stream, 5, stop)

    def writer() -> None:
        time.sleep(0.05)
        with AuditLog.open(path) as log:
            log.append(make_event(7, key_id=KEY2))  # filtered out
            log.append(make_event(8))
        # a line arriving in two writes must be yielded once, whole
        line = b'{"seq":9,"eventName":"Decrypt","requestParameters":{"keyId":"' + KEY1.encode()
        with path.open("ab", buffering=0) as f:
            f.write(line)
            time.sleep(0.1)
            f.write(b'"}}\n')
            f.write(b'{"seq":10,"requestParameters":{"keyId":"' + KEY1.encode() + b'"}}\n')

    producer = threading.Thread(target=writer)
    producer.start()
    producer.join(timeout=5)
    consumer.join(timeout=5)
    stop.set()
    consumer.join(timeout=5)
    assert not consumer.is_alive()
    assert [e["seq"] for e in got] == [3, 5, 8, 9, 10]
    assert got[3]["requestParameters"]["keyId"] == KEY1


def test_tail_follow_stops_and_survives_rotation(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    write_log(path, 2)
    stop = threading.Event()
    stream = tail(path, 0, follow=True, poll_interval=0.01, stop=stop)
    got, consumer = _collect_in_thread(stream, 2, stop)
    time.sleep(0.05)
    rotated = tmp_path / "audit.log.1"
    path.rename(rotated)
    head_path(path).rename(head_path(rotated))
    write_log(path, 2)  # a new log in its place: followed from its start
    consumer.join(timeout=5)
    assert [e["seq"] for e in got] == [1, 2]
    assert not consumer.is_alive()

    # an idle follow ends when asked to
    stream = tail(path, 0, follow=True, poll_interval=0.01, stop=stop)
    got, consumer = _collect_in_thread(stream, 1, stop)
    time.sleep(0.05)
    stop.set()
    consumer.join(timeout=5)
    assert got == [] and not consumer.is_alive()


# --------------------------------------------------------------------------- display
def test_format_event_line() -> None:
    ok_line = format_event_line(make_event(3))
    assert ok_line == f"2024-05-01T12:00:03Z  alice(1000)  Decrypt  {KEY1}  ok"
    denied = format_event_line(make_event(4, error="AccessDeniedException", uid=1001))
    assert denied.endswith(f"{KEY1}  AccessDeniedException: denied by policy")
    assert "alice(1001)" in denied
    hostile = make_event(5, user="eve\x1b[2J\nroot")
    line = format_event_line(hostile)
    assert "\n" not in line and "\x1b" not in line and "eve\\x1b[2J\\x0aroot(1000)" in line
    assert format_event_line({}) == "?  ?(?)  ?  -  ok"


# --------------------------------------------------------------------------- throughput
def test_throughput_is_reported(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Printed, not asserted (DESIGN.md: no timing assertions in the suite)."""
    events = [make_event(i) for i in range(20_000)]
    path = tmp_path / "audit.log"
    with AuditLog.open(path) as log:
        started = time.perf_counter()
        for event in events:
            log.append(event)
        single = len(events) / (time.perf_counter() - started)
    line_bytes = path.stat().st_size / len(events)

    threaded_path = tmp_path / "threaded.log"
    with AuditLog.open(threaded_path) as log:

        def worker(part: list[dict[str, Any]]) -> None:
            for event in part:
                log.append(event)

        threads = [threading.Thread(target=worker, args=(events[w::4],)) for w in range(4)]
        started = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        threaded = len(events) / (time.perf_counter() - started)

    started = time.perf_counter()
    report = verify(path)
    verified = report.lines / (time.perf_counter() - started)
    assert report.ok and verify(threaded_path).ok
    with capsys.disabled():
        print(
            f"\naudit log: append {single:,.0f} lines/s (1 thread), {threaded:,.0f} lines/s "
            f"(4 threads), verify {verified:,.0f} lines/s; {line_bytes:.0f} bytes/line"
        )
