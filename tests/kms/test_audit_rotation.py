"""The audit log's size caps, its size-based rotation, and verify/tail over the rotated set."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from kmsfs.cli import main as kmsfs_main
from kmsfs.errors import AuditError
from kmsfs.kms import audit
from kmsfs.kms.audit import (
    MAX_EVENT_BYTES,
    MAX_VALUE_BYTES,
    AuditLog,
    cap_event,
    head_path,
    iter_events,
    rotated_files,
    tail,
    verify,
)
from kmsfs.kms.caller import Caller
from kmsfs.kms.keystore import Keystore, RootKeySource
from kmsfs.kms.service import KeyService
from tests.kms.test_audit import KEY1, make_event

SMALL = 4000  # rotate after about 4 lines of make_event()


def write_rotating_log(path: Path, n: int, max_bytes: int = SMALL) -> None:
    with AuditLog.open(path, max_bytes=max_bytes) as log:
        for i in range(1, n + 1):
            log.append(make_event(i))


def seqs_in(path: Path) -> list[int]:
    return [json.loads(line)["seq"] for line in path.read_bytes().splitlines()]


def logged(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_bytes().splitlines()]


# ------------------------------------------------------------------------- caps
def test_a_250_kb_value_is_cut_to_its_start_and_marked_omitted(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    description = "é" * 125_000  # 250 KB of UTF-8; 750 KB once \\u-escaped
    event = make_event(1)
    event["requestParameters"]["description"] = description
    with AuditLog.open(path) as log:
        log.append(event)
    assert path.stat().st_size < 2 * MAX_VALUE_BYTES + 1024  # was 750 KB
    (record,) = logged(path)
    kept = record["requestParameters"]["description"]
    assert description.startswith(kept) and len(json.dumps(kept)) <= MAX_VALUE_BYTES
    assert record["omitted"] is True
    assert record["omittedFields"] == ["requestParameters.description (750002 bytes)"]
    # everything else is as the service gave it
    assert record["requestParameters"]["keyId"] == KEY1
    assert record["userIdentity"] == event["userIdentity"]
    assert verify(path).ok


def test_a_typical_event_is_logged_unchanged(tmp_path: Path) -> None:
    event = make_event(1)
    event["requestParameters"]["description"] = "x" * 900  # a long, legitimate one
    assert cap_event(event) == event
    path = tmp_path / "audit.log"
    with AuditLog.open(path) as log:
        log.append(event)
    (record,) = logged(path)
    assert "omitted" not in record
    assert record["requestParameters"]["description"] == "x" * 900


def _deep(levels: int) -> Any:
    value: Any = "bottom"
    for _ in range(levels):
        value = {"k": value}
    return value


HOSTILE: dict[str, Any] = {
    "a long ASCII value": "a" * 250_000,
    "a long escaped value": "\x01" * 40_000,
    "characters outside the BMP": "\U0001f511" * 20_000,
    "a context of many entries": {f"k{i}": "v" * 100 for i in range(3000)},
    "a context with a huge key": {"k" * 100_000: "v"},
    "two huge keys with the same start": {"k" * 100_000 + "1": "a", "k" * 100_000 + "2": "b"},
    "a long list": ["t" * 50] * 5000,
    "deep nesting": _deep(500),
    "nesting deeper than Python recurses": _deep(5000),
    "a huge number": 10**4000,
    "many long values": {f"k{i}": "v" * 5000 for i in range(60)},
}


@pytest.mark.parametrize("shape", list(HOSTILE))
def test_every_part_of_an_event_is_bounded(tmp_path: Path, shape: str) -> None:
    path = tmp_path / "audit.log"
    event = make_event(1)
    event["requestParameters"]["encryptionContext"] = HOSTILE[shape]
    event["errorMessage"] = f"Invalid keyId '{'z' * 200_000}'"  # messages may echo input
    with AuditLog.open(path) as log:
        log.append(event)
    size = path.stat().st_size
    assert size <= MAX_EVENT_BYTES + 4096, size
    (record,) = list(iter_events(path))
    assert record["omitted"] is True and record["omittedFields"]
    assert record["requestParameters"]["keyId"] == KEY1  # what fits is kept
    assert len(record["errorMessage"]) < MAX_VALUE_BYTES
    assert verify(path).ok


def test_a_section_over_its_budget_keeps_the_members_that_fit() -> None:
    event = make_event(1)
    event["requestParameters"] = {f"member{i}": "v" * 1000 for i in range(40)}
    event["requestParameters"]["keyId"] = KEY1
    capped = cap_event(event)
    kept = capped["requestParameters"]
    assert len(json.dumps(kept, separators=(",", ":"))) <= audit.MAX_SECTION_BYTES
    assert "member0" in kept and "member39" not in kept
    listed = capped["omittedFields"]
    assert listed[0].startswith("requestParameters.member1") and listed[-1].startswith("and ")


def test_100_list_keys_with_a_250_kb_description_stay_small(tmp_path: Path) -> None:
    """The issue's figure: 100 ListKeys with an ignored 250 KB Description grew the log
    by 71 MiB; now each record keeps at most MAX_VALUE_BYTES of it."""
    keystore = Keystore.create(
        tmp_path / "ks", RootKeySource.from_key_file(tmp_path / "root.key"), kdf_seconds=0
    )
    log = AuditLog.open(keystore.audit_path)
    try:
        service = KeyService(keystore, log)
        for i in range(100):
            service.handle("ListKeys", {"Description": "é" * 125_000}, Caller(0, 0, 1), f"r{i}")
    finally:
        log.close()
        keystore.close()
    size = keystore.audit_path.stat().st_size
    assert size < 100 * 3 * MAX_VALUE_BYTES, size  # 75,054,492 bytes before the cap
    assert verify(keystore.audit_path).ok


# --------------------------------------------------------------------- rotation
def test_the_log_is_rotated_by_size_and_verified_as_one_chain(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    write_rotating_log(path, 50)
    rotated = rotated_files(path)
    assert len(rotated) >= 5
    previous_last = 0
    for item in rotated:  # named after the seqs they hold, in order, chain unbroken
        first, last = (int(n) for n in item.name.removeprefix("audit.log.").split("-"))
        assert seqs_in(item) == list(range(first, last + 1))
        assert first == previous_last + 1
        assert item.stat().st_size >= SMALL
        assert item.stat().st_mode & 0o777 == 0o600
        previous_last = last
    assert seqs_in(path) == list(range(previous_last + 1, 51))
    first_of_current = logged(path)[0] if path.stat().st_size else None
    if first_of_current is not None:
        last_rotated_line = rotated[-1].read_bytes().splitlines()[-1]
        assert first_of_current["prevDigest"] == audit.line_digest(last_rotated_line)
    report = verify(path)
    assert report.ok and report.lines == 50 and report.files == len(rotated) + 1
    assert report.warnings == ()
    assert [e["seq"] for e in iter_events(path)] == list(range(1, 51))
    assert [e["seq"] for e in tail(path, 17)] == list(range(34, 51))
    assert [e["seq"] for e in tail(path, 500)] == list(range(1, 51))


def test_a_single_file_log_of_before_rotation_goes_on_rotating(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    write_rotating_log(path, 10, max_bytes=0)  # 0: never rotate
    assert rotated_files(path) == []
    write_rotating_log_continued(path, 11, 30)
    assert rotated_files(path)[0].name.startswith("audit.log.1-")
    assert verify(path).ok and verify(path).lines == 30


def write_rotating_log_continued(path: Path, first: int, last: int) -> None:
    with AuditLog.open(path, max_bytes=SMALL) as log:
        assert log.seq == first - 1
        for i in range(first, last + 1):
            log.append(make_event(i))


def test_reopening_after_a_rotation_continues_from_the_rotated_file(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    with AuditLog.open(path, max_bytes=0) as log:
        for i in range(1, 4):
            log.append(make_event(i))
        rotated = log.rotate()
        assert rotated == tmp_path / "audit.log.1-3"
        assert log.rotate() is None  # nothing to rotate in an empty log
    assert path.read_bytes() == b""
    with AuditLog.open(path, max_bytes=0) as log:
        assert log.seq == 3
        log.append(make_event(4))
    assert seqs_in(path) == [4]
    assert verify(path).ok and [e["seq"] for e in iter_events(path)] == [1, 2, 3, 4]


def test_the_size_limit_comes_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(audit.MAX_BYTES_ENV, str(SMALL))
    path = tmp_path / "audit.log"
    with AuditLog.open(path) as log:
        for i in range(1, 11):
            log.append(make_event(i))
    assert rotated_files(path)
    monkeypatch.setenv(audit.MAX_BYTES_ENV, "lots")
    with pytest.raises(AuditError, match=audit.MAX_BYTES_ENV):
        AuditLog.open(path)


# ------------------------------------------------------------- damage to the set
def _rotated_set(tmp_path: Path) -> tuple[Path, list[Path]]:
    path = tmp_path / "audit.log"
    with AuditLog.open(path, max_bytes=0) as log:
        for i in range(1, 16):
            log.append(make_event(i))
            if i % 5 == 0:
                log.rotate()
        log.append(make_event(16))
    return path, rotated_files(path)  # 1-5, 6-10, 11-15, then seq 16 in audit.log


def _edit_line(path: Path, index: int) -> None:
    lines = path.read_bytes().splitlines(keepends=True)
    record = json.loads(lines[index])
    record["eventName"] = "Encrypt"
    lines[index] = json.dumps(record, separators=(",", ":")).encode() + b"\n"
    path.write_bytes(b"".join(lines))


def _swap_contents(a: Path, b: Path) -> None:
    data_a, data_b = a.read_bytes(), b.read_bytes()
    a.write_bytes(data_b)
    b.write_bytes(data_a)


DAMAGE = {
    # name: (change, file index reported (3 = audit.log), line in it, kind)
    "a middle rotated file removed": (lambda p, r: r[1].unlink(), 2, 1, "removed"),
    "the oldest rotated file removed": (lambda p, r: r[0].unlink(), 1, 1, "removed"),
    "a line of a rotated file edited": (lambda p, r: _edit_line(r[1], 2), 1, 3, "edited"),
    "the last line of a rotated file edited": (lambda p, r: _edit_line(r[1], 4), 1, 5, "edited"),
    "two rotated files swapped": (lambda p, r: _swap_contents(r[0], r[1]), 0, 1, "reordered"),
    "a rotated file cut short": (
        lambda p, r: r[2].write_bytes(r[2].read_bytes()[:-30]),
        2,
        5,
        "truncated",
    ),
    "the log emptied": (lambda p, r: p.write_bytes(b""), 3, 1, "tail removed"),
}


@pytest.mark.parametrize("name", list(DAMAGE))
def test_damage_to_the_rotated_set_is_found_and_located(tmp_path: Path, name: str) -> None:
    change, file_index, line, kind = DAMAGE[name]
    path, rotated = _rotated_set(tmp_path)
    assert verify(path).ok
    files = [*rotated, path]
    change(path, rotated)
    report = verify(path)
    assert not report.ok
    assert (report.file, report.first_bad_line, report.kind) == (
        files[file_index],
        line,
        kind,
    ), report.problem
    assert report.problem and f"line {line} of {files[file_index].name}" in report.problem


def test_the_newest_rotated_file_removed_is_found_through_the_head(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    with AuditLog.open(path, max_bytes=0) as log:
        for i in range(1, 11):
            log.append(make_event(i))
            if i % 5 == 0:
                log.rotate()  # seq 10 is the last line written: audit.log is empty
    rotated_files(path)[-1].unlink()
    report = verify(path)
    assert not report.ok and report.kind == "tail removed", report


def test_audit_verify_command_over_a_rotated_set(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path, rotated = _rotated_set(tmp_path)
    assert kmsfs_main(["keyd", "audit", "verify", "--keystore", str(tmp_path)]) == 0
    assert "16 lines in 4 files" in capsys.readouterr().out
    rotated[1].unlink()
    assert kmsfs_main(["keyd", "audit", "verify", "--keystore", str(tmp_path)]) == 6
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "audit.log.11-15: line 1: lines with seqs 6..10" in error
    assert kmsfs_main(["keyd", "audit", "tail", "--keystore", str(tmp_path), "-n", "3"]) == 0
    assert capsys.readouterr().out.count("\n") == 3


# ------------------------------------------------------------------ crash safety
def test_a_rotation_killed_before_its_renames_loses_nothing(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    write_rotating_log(path, 3, max_bytes=0)
    (tmp_path / "audit.log.new").write_bytes(b"")  # created, then killed
    write_rotating_log_continued(path, 4, 6)
    assert not (tmp_path / "audit.log.new").exists()
    assert [e["seq"] for e in iter_events(path)] == [1, 2, 3, 4, 5, 6]
    assert verify(path).ok


def test_a_rotation_killed_between_its_renames_loses_nothing(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    write_rotating_log(path, 3, max_bytes=0)
    path.rename(tmp_path / "audit.log.1-3")  # the log renamed...
    (tmp_path / "audit.log.new").write_bytes(b"")  # ...its successor not yet in place
    report = verify(path)
    assert report.ok and report.lines == 3
    write_rotating_log_continued(path, 4, 6)
    assert seqs_in(path)[0] == 4
    assert [e["seq"] for e in iter_events(path)] == [1, 2, 3, 4, 5, 6]
    assert verify(path).ok


def test_a_foreign_new_file_is_not_removed(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    write_rotating_log(path, 2, max_bytes=0)
    (tmp_path / "audit.log.new").write_bytes(b"not ours\n")
    with pytest.raises(AuditError, match="interrupted rotation"):
        AuditLog.open(path)
    assert (tmp_path / "audit.log.new").read_bytes() == b"not ours\n"


_WRITER = """
import sys
from pathlib import Path
sys.path.insert(0, {tests!r})
from test_audit import make_event
from kmsfs.kms.audit import AuditLog
log = AuditLog.open(Path({path!r}), max_bytes=2000, head_interval=0.0)
i = log.seq
while True:
    i += 1
    log.append(make_event(i))
    if i == {announce}:
        print("running", flush=True)
"""


@pytest.mark.parametrize("run", range(4))
def test_a_writer_killed_anywhere_leaves_a_verifiable_set(tmp_path: Path, run: int) -> None:
    """SIGKILL a process that appends and rotates every 2 lines; whatever step it was
    in, the set verifies, and reopening continues it without a gap or a repeat."""
    path = tmp_path / "audit.log"
    code = _WRITER.format(tests=str(Path(__file__).parent), path=str(path), announce=50 + 37 * run)
    writer = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    try:
        assert writer.stdout is not None
        assert writer.stdout.readline() == b"running\n"
        time.sleep(0.001 * run)
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait()
    report = verify(path)
    assert report.ok, report
    with AuditLog.open(path, max_bytes=2000) as log:
        last = log.seq
        log.append(make_event(last + 1))
    assert [e["seq"] for e in iter_events(path)] == list(range(1, last + 2))
    assert verify(path).ok
    assert not (tmp_path / "audit.log.new").exists()


def test_verify_during_rotations_never_reports_damage(tmp_path: Path) -> None:
    """A rotation between reading the file list and reading the log would look like a
    missing file: verify notices the list changed and reads the set again."""
    path = tmp_path / "audit.log"
    log = AuditLog.open(path, max_bytes=1800, head_interval=0.0)
    stop = threading.Event()

    def writer() -> None:
        i = 0
        while not stop.is_set():
            i += 1
            log.append(make_event(i))

    thread = threading.Thread(target=writer)
    thread.start()
    reports = []
    try:
        while len(rotated_files(path)) < 40 and thread.is_alive():
            reports.append(verify(path))
    finally:
        stop.set()
        thread.join()
        log.close()
    assert len(rotated_files(path)) >= 40
    assert all(r.ok for r in reports), [r.problem for r in reports if not r.ok]


def test_tail_follow_reads_across_a_rotation(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    log = AuditLog.open(path, max_bytes=0)
    stop = threading.Event()
    try:
        log.append(make_event(1))
        stream = tail(path, 1, follow=True, poll_interval=0.01, stop=stop)
        got = [next(stream)["seq"]]  # the log is open now, at its end

        def consume() -> None:
            for event in stream:
                got.append(event["seq"])
                if len(got) == 7:
                    return

        for i in range(2, 5):
            log.append(make_event(i))
        log.rotate()  # lines 2-4 were not read from the old file yet
        for i in range(5, 8):
            log.append(make_event(i))
        consumer = threading.Thread(target=consume, daemon=True)
        consumer.start()
        consumer.join(timeout=10)
        assert got == [1, 2, 3, 4, 5, 6, 7]
    finally:
        stop.set()
        log.close()


def test_tail_follow_reads_what_the_old_file_got_just_before_its_rotation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Lines written after follow's last read and before the rename must not be lost:
    the race is forced by rotating inside follow's own check for a new file."""
    path = tmp_path / "audit.log"
    path.write_bytes(b'{"seq":1}\n')
    real_stat = os.stat
    stop = threading.Event()
    checks = []

    def stat_with_a_rotation(target: Any, *args: Any, **kwargs: Any) -> os.stat_result:
        if Path(target) == path:
            checks.append(True)
            if len(checks) == 1:  # follow has read everything and looks for a new file
                with path.open("ab") as f:
                    f.write(b'{"seq":2}\n{"seq":3}\n')  # after its last read...
                path.rename(tmp_path / "audit.log.1-3")  # ...and then rotated
                path.write_bytes(b'{"seq":4}\n')
            elif len(checks) == 4:  # idle again after reading both files: done
                stop.set()
        return real_stat(target, *args, **kwargs)

    stream = tail(path, 0, follow=True, poll_interval=0.01, stop=stop)
    monkeypatch.setattr(audit.os, "stat", stat_with_a_rotation)
    assert [event["seq"] for event in stream] == [2, 3, 4]


def test_head_covers_the_set(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    write_rotating_log(path, 20)
    head = json.loads(head_path(path).read_text())
    assert head["seq"] == 20
    assert os.path.exists(tmp_path / "audit.log.lock")
