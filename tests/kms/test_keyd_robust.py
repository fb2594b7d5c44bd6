"""keyd never dies and never acts unaudited (issue 12).

- A request is checked whole before anything runs: NaN/Infinity/1e999 are not JSON
  (400 SerializationException), a member of the wrong JSON type is a
  SerializationException (as AWS answers), a lone surrogate anywhere a
  ValidationException; nothing changes and the refusal is audited.
- A state change commits only together with its audit record; key use is refused
  without one (503); reads are answered and counted in an AuditGap record.
- Out of file descriptors or disk space, keyd refuses what it cannot do, serves the
  rest, stays alive and recovers.
- A short seeded run of scripts/fuzz-keyd gets no 500.
"""

from __future__ import annotations

import base64
import errno
import http.client
import json
import os
import resource
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from kmsfs.errors import (
    AuditError,
    KMSError,
    SerializationException,
    StorageUnavailableException,
    ValidationException,
)
from kmsfs.kms import audit as audit_module
from kmsfs.kms.audit import AuditLog, verify
from kmsfs.kms.protocol import decode_request_body
from kmsfs.kms.server import ServerLimits
from kmsfs.kms.service import (
    KEY_USE_OPERATIONS,
    REQUEST_MEMBERS,
    STATE_CHANGING_OPERATIONS,
    KeyService,
)
from tests.conftest import KMSFS, Keyd, mounted_tmpfs
from tests.kms.test_service import CALLER, Harness, make_harness

ROOT = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to mount a tmpfs")
REPO = Path(__file__).resolve().parents[2]


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# ------------------------------------------------------------ a raw HTTP client
class UnixHTTP(http.client.HTTPConnection):
    def __init__(self, path: Path, timeout: float = 10.0) -> None:
        super().__init__("keyd", timeout=timeout)
        self.path = os.fspath(path)

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self.path)
        self.sock = sock


def call_raw(path: Path, operation: str, body: bytes | str) -> tuple[int, str, dict[str, Any]]:
    """(status, request id, JSON body) of one request with ``body`` sent verbatim."""
    if isinstance(body, str):
        body = body.encode("utf-8", "surrogatepass")
    conn = UnixHTTP(path)
    try:
        conn.request(
            "POST",
            "/",
            body,
            {
                "X-Amz-Target": f"TrentService.{operation}",
                "Content-Type": "application/x-amz-json-1.1",
            },
        )
        response = conn.getresponse()
        payload = response.read()
        return (
            response.status,
            response.getheader("x-amzn-RequestId") or "",
            json.loads(payload) if payload else {},
        )
    finally:
        conn.close()


def call(path: Path, operation: str, **params: Any) -> tuple[int, str, dict[str, Any]]:
    return call_raw(path, operation, json.dumps(params))


def wait_until_served(path: Path) -> None:
    """ListKeys until it succeeds: connections that were refused (503, closed at once,
    possibly before our request was sent: EPIPE) take a moment to go away."""
    deadline = time.monotonic() + 10
    while True:
        try:
            if call(path, "ListKeys")[0] == 200:
                return
        except OSError:
            pass
        assert time.monotonic() < deadline, "keyd did not serve again"
        time.sleep(0.05)


def audit_events(keystore: Path) -> list[dict[str, Any]]:
    lines = (keystore / "audit.log").read_bytes().splitlines()
    return [json.loads(line) for line in lines]


# ------------------------------------------------------------ an audit that fails
class FailingAudit:
    """An audit sink whose writes fail (ENOSPC) while ``failing`` is set."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.failing = False
        self.syncs = 0

    def append(self, event: dict[str, Any]) -> None:
        if self.failing:
            raise AuditError("cannot write audit log x: No space left on device") from OSError(
                errno.ENOSPC, os.strerror(errno.ENOSPC)
            )
        self.events.append(event)

    def datasync(self) -> None:
        self.syncs += 1


@pytest.fixture
def kms(tmp_path: Path) -> Iterator[Harness]:
    harness = make_harness(tmp_path)
    try:
        yield harness
    finally:
        harness.keystore.close()


@pytest.fixture
def failing(tmp_path: Path) -> Iterator[tuple[Harness, FailingAudit]]:
    harness = make_harness(tmp_path)
    sink = FailingAudit()
    harness.service = KeyService(harness.keystore, sink, clock=harness.clock)
    try:
        yield harness, sink
    finally:
        harness.keystore.close()


# ------------------------------------------------------------ parse-time checks
@pytest.mark.parametrize(
    "body",
    [b'{"a":NaN}', b'{"a":Infinity}', b'{"a":-Infinity}', b'{"a":1e999}', b'{"a":[-1e400]}'],
)
def test_nan_infinity_and_overflow_are_not_json(body: bytes) -> None:
    with pytest.raises(SerializationException):
        decode_request_body(body)


def test_finite_numbers_and_whitespace_still_parse() -> None:
    assert decode_request_body(b' {"a": 1.5e3, "b": -0, "c": 1e-999}\n') == {
        "a": 1500.0,
        "b": 0,
        "c": 0.0,
    }


def test_disable_key_with_infinite_member_changes_nothing(live_keyd: Keyd) -> None:
    """The issue's case: 500 and a disabled key with no audit line, before."""
    status, _, created = call(live_keyd.socket, "CreateKey")
    key_id = created["KeyMetadata"]["KeyId"]
    for operation, extra in [
        ("DisableKey", '"Limit":1e999'),
        ("DisableKey", '"Limit":NaN'),
        ("ScheduleKeyDeletion", '"PendingWindowInDays":7,"Marker":-Infinity'),
    ]:
        status, _, body = call_raw(live_keyd.socket, operation, f'{{"KeyId":"{key_id}",{extra}}}')
        assert (status, body["__type"]) == (400, "SerializationException"), body
    status, _, described = call(live_keyd.socket, "DescribeKey", KeyId=key_id)
    assert described["KeyMetadata"]["KeyState"] == "Enabled"


# ------------------------------------------------------------ member types
def test_every_member_of_every_operation_is_type_checked(kms: Harness) -> None:
    key_id = kms.create_key()
    wrong_for = {
        "string": 5,
        "blob": 5,
        "integer": "5",
        "boolean": "true",
        "context": {"k": 1},
        "strings": ["a", 1],
        "tags": [{"TagKey": 1, "TagValue": "v"}],
        "recipient": "x",
        "number": "1800000000",
        "constraints": {"EncryptionContextSubset": {"k": 1}},
        "structure": 5,  # RecordAccessEvents' Gap: an object
        "structures": [5],  # its Events: a list of objects
    }
    for operation, members in REQUEST_MEMBERS.items():
        for name, kind in members.items():
            params: dict[str, Any] = {"KeyId": key_id, name: wrong_for[kind]}
            with pytest.raises(SerializationException, match="can not be converted"):
                kms.service.handle(operation, params, CALLER, "r")
    assert kms.describe(key_id)["KeyState"] == "Enabled"
    assert kms.call("ListResourceTags", KeyId=key_id)["Tags"] == []


def test_every_operation_is_classified(kms: Harness) -> None:
    operations = set(KeyService.operation_names())
    assert set(REQUEST_MEMBERS) == operations
    assert operations.issuperset(STATE_CHANGING_OPERATIONS | KEY_USE_OPERATIONS)


def test_wrongly_typed_float_is_not_an_integer(kms: Harness) -> None:
    key_id = kms.create_key()
    with pytest.raises(SerializationException):
        kms.call("ScheduleKeyDeletion", KeyId=key_id, PendingWindowInDays=7.0)
    assert kms.describe(key_id)["KeyState"] == "Enabled"


def test_unknown_members_are_ignored_and_not_audited(kms: Harness) -> None:
    key_id = kms.create_key()
    kms.call("DisableKey", KeyId=key_id, Limit=5, Unknown={"deep": [1, 2]}, Plaintext="eA==")
    event = kms.events[-1]
    assert event["eventName"] == "DisableKey" and "errorCode" not in event
    assert event["requestParameters"] == {"keyId": key_id}


@pytest.mark.parametrize(
    ("operation", "params"),
    [
        ("UntagResource", {"TagKeys": ["\ud800"]}),
        ("UntagResource", {"TagKeys": ["ok", "a\udc00b"]}),
        ("TagResource", {"Tags": [{"TagKey": "\ud83d", "TagValue": "v"}]}),
        ("DisableKey", {"Unknown": "\ud800"}),
        ("DisableKey", {"\udfff": "x"}),
        ("DisableKey", {"Unknown": {"nested": ["\ud800"]}}),
    ],
)
def test_lone_surrogate_anywhere_is_a_validation_error(
    kms: Harness, operation: str, params: dict[str, Any]
) -> None:
    key_id = kms.create_key(Tags=[{"TagKey": "ok", "TagValue": "v"}])
    with pytest.raises(ValidationException):
        kms.call(operation, KeyId=key_id, **params)
    assert kms.describe(key_id)["KeyState"] == "Enabled"
    assert kms.call("ListResourceTags", KeyId=key_id)["Tags"] == [{"TagKey": "ok", "TagValue": "v"}]
    refused = [event for event in kms.events if event["eventName"] == operation][-1]
    assert refused["errorCode"] == "ValidationException"


def test_lone_surrogate_over_the_socket_is_400(live_keyd: Keyd) -> None:
    _, _, created = call(live_keyd.socket, "CreateKey")
    key_id = created["KeyMetadata"]["KeyId"]
    status, _, body = call_raw(
        live_keyd.socket, "UntagResource", f'{{"KeyId":"{key_id}","TagKeys":["\\ud800"]}}'
    )
    assert (status, body["__type"]) == (400, "ValidationException")


# ------------------------------------------------------------ change + record, or neither
STATE_CHANGES: list[tuple[str, Callable[[str], dict[str, Any]]]] = [
    ("CreateKey", lambda key_id: {"Description": "new"}),
    ("DisableKey", lambda key_id: {"KeyId": key_id}),
    ("ScheduleKeyDeletion", lambda key_id: {"KeyId": key_id, "PendingWindowInDays": 7}),
    ("EnableKeyRotation", lambda key_id: {"KeyId": key_id}),
    ("RotateKeyOnDemand", lambda key_id: {"KeyId": key_id}),
    ("CreateAlias", lambda key_id: {"AliasName": "alias/new", "TargetKeyId": key_id}),
    ("DeleteAlias", lambda key_id: {"AliasName": "alias/old"}),
    ("TagResource", lambda key_id: {"KeyId": key_id, "Tags": [{"TagKey": "t", "TagValue": "v"}]}),
    ("UntagResource", lambda key_id: {"KeyId": key_id, "TagKeys": ["keep"]}),
]


def _state(kms: Harness) -> list[Any]:
    return [
        kms.rows("SELECT * FROM keys ORDER BY key_id"),
        kms.rows("SELECT key_id, version FROM key_versions ORDER BY key_id, version"),
        kms.rows("SELECT alias_name, key_id FROM aliases ORDER BY alias_name"),
        kms.rows("SELECT * FROM tags ORDER BY key_id, tag_key"),
    ]


@pytest.mark.parametrize(
    ("operation", "make_params"), STATE_CHANGES, ids=[s[0] for s in STATE_CHANGES]
)
def test_state_change_without_its_record_is_rolled_back(
    failing: tuple[Harness, FailingAudit], operation: str, make_params: Callable[[str], Any]
) -> None:
    kms, sink = failing
    key_id = kms.create_key(Tags=[{"TagKey": "keep", "TagValue": "me"}])
    kms.call("CreateAlias", AliasName="alias/old", TargetKeyId=key_id)
    before = _state(kms)
    sink.failing = True
    with pytest.raises(StorageUnavailableException) as caught:
        kms.service.handle(operation, make_params(key_id), CALLER, "refused")
    assert caught.value.status == 503 and caught.value.aws_type == "KMSInternalException"
    assert "audit log" in caught.value.message and "No space left" in caught.value.message
    assert _state(kms) == before
    # once the log accepts records again, the same request commits, with its record
    sink.failing = False
    syncs = sink.syncs
    kms.service.handle(operation, make_params(key_id), CALLER, "accepted")
    assert _state(kms) != before
    assert sink.syncs == syncs + 1  # flushed before the commit
    assert [e.get("requestID") for e in sink.events[-1:]] == ["accepted"]


@pytest.mark.parametrize("operation", sorted(KEY_USE_OPERATIONS))
def test_key_use_without_its_record_is_refused(
    failing: tuple[Harness, FailingAudit], operation: str
) -> None:
    kms, sink = failing
    key_id = kms.create_key()
    blob = kms.encrypt(key_id)
    message = b64(b"message")
    if operation in ("Sign", "Verify"):
        signing_key = kms.create_key(KeySpec="ECC_NIST_P256", KeyUsage="SIGN_VERIFY")
        signature = kms.call(
            "Sign", KeyId=signing_key, Message=message, SigningAlgorithm="ECDSA_SHA_256"
        )["Signature"]
    if operation in ("GenerateMac", "VerifyMac"):
        mac_key = kms.create_key(KeySpec="HMAC_256", KeyUsage="GENERATE_VERIFY_MAC")
        mac = kms.call("GenerateMac", KeyId=mac_key, Message=message, MacAlgorithm="HMAC_SHA_256")
    if operation == "DeriveSharedSecret":
        agreement_key = kms.create_key(KeySpec="ECC_NIST_P256", KeyUsage="KEY_AGREEMENT")
        peer = kms.call("GetPublicKey", KeyId=agreement_key)["PublicKey"]
    params = {
        "Encrypt": lambda: {"KeyId": key_id, "Plaintext": b64(b"secret")},
        "Decrypt": lambda: {"CiphertextBlob": blob},
        "ReEncrypt": lambda: {"CiphertextBlob": blob, "DestinationKeyId": key_id},
        "GenerateDataKey": lambda: {"KeyId": key_id, "KeySpec": "AES_256"},
        "GenerateDataKeyWithoutPlaintext": lambda: {"KeyId": key_id, "KeySpec": "AES_256"},
        "GenerateDataKeyPair": lambda: {"KeyId": key_id, "KeyPairSpec": "ECC_NIST_P256"},
        "GenerateDataKeyPairWithoutPlaintext": lambda: {
            "KeyId": key_id,
            "KeyPairSpec": "ECC_NIST_P256",
        },
        "Sign": lambda: {
            "KeyId": signing_key,
            "Message": message,
            "SigningAlgorithm": "ECDSA_SHA_256",
        },
        "Verify": lambda: {
            "KeyId": signing_key,
            "Message": message,
            "Signature": signature,
            "SigningAlgorithm": "ECDSA_SHA_256",
        },
        "GenerateMac": lambda: {
            "KeyId": mac_key,
            "Message": message,
            "MacAlgorithm": "HMAC_SHA_256",
        },
        "VerifyMac": lambda: {
            "KeyId": mac_key,
            "Message": message,
            "Mac": mac["Mac"],
            "MacAlgorithm": "HMAC_SHA_256",
        },
        "DeriveSharedSecret": lambda: {
            "KeyId": agreement_key,
            "KeyAgreementAlgorithm": "ECDH",
            "PublicKey": peer,
        },
    }[operation]()
    sink.failing = True
    with pytest.raises(StorageUnavailableException):
        kms.service.handle(operation, params, CALLER, "refused")
    sink.failing = False
    assert "Plaintext" in kms.service.handle("Decrypt", {"CiphertextBlob": blob}, CALLER, "ok")


def test_reads_are_served_and_the_gap_is_recorded(failing: tuple[Harness, FailingAudit]) -> None:
    kms, sink = failing
    key_id = kms.create_key()
    sink.failing = True
    assert kms.describe(key_id)["KeyState"] == "Enabled"
    assert len(kms.call("ListKeys")["Keys"]) == 1
    with pytest.raises(KMSError):
        kms.call("DescribeKey", KeyId="alias/missing")  # a refusal: answered too
    sink.failing = False
    kms.call("ListKeys")
    gap, listed = sink.events[-2:]
    assert gap["eventName"] == "AuditGap" and gap["eventType"] == "AwsServiceEvent"
    assert gap["additionalEventData"]["unauditedRequests"] == 3
    assert listed["eventName"] == "ListKeys"


def test_maintenance_deletes_only_with_its_record(failing: tuple[Harness, FailingAudit]) -> None:
    kms, sink = failing
    key_id = kms.create_key()
    kms.call("ScheduleKeyDeletion", KeyId=key_id, PendingWindowInDays=7)
    kms.clock.advance(8 * 86400)
    sink.failing = True
    assert kms.service.run_maintenance() == {"deleted": [], "rotated": [], "expired": []}
    assert kms.describe(key_id)["KeyState"] == "PendingDeletion"
    sink.failing = False
    assert kms.service.run_maintenance()["deleted"] == [key_id]
    assert sink.events[-1]["eventName"] == "DeleteKey"


def test_a_partly_written_audit_line_is_cut_off(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ENOSPC in the middle of a line (a full disk): the log stays whole and usable."""
    log = AuditLog.open(tmp_path / "audit.log")
    log.append({"eventName": "First"})
    real_write = os.write
    calls = {"n": 0}

    def write_half_then_fail(fd: int, data: bytes) -> int:
        calls["n"] += 1
        if calls["n"] == 1:
            return real_write(fd, bytes(data[: len(data) // 2]))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(audit_module.os, "write", write_half_then_fail)
    with pytest.raises(AuditError):
        log.append({"eventName": "Lost"})
    monkeypatch.setattr(audit_module.os, "write", real_write)
    log.append({"eventName": "Second"})
    log.close()
    assert verify(tmp_path / "audit.log").ok
    names = [
        json.loads(line)["eventName"] for line in (tmp_path / "audit.log").read_bytes().splitlines()
    ]
    assert names == ["First", "Second"]


# ------------------------------------------------------------ connections
def test_per_uid_quota_answers_429(start_keyd: Any) -> None:
    keyd = start_keyd(limits=ServerLimits(max_connections_per_uid=2))
    held = [socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(2)]
    try:
        for sock in held:
            sock.connect(os.fspath(keyd.socket_path))
        conn = UnixHTTP(keyd.socket_path)
        conn.request("POST", "/", b"{}", {"X-Amz-Target": "TrentService.ListKeys"})
        response = conn.getresponse()
        assert response.status == 429
        assert json.loads(response.read())["__type"] == "ThrottlingException"
        conn.close()
        # an open connection is still served
        held[0].sendall(
            b"POST / HTTP/1.1\r\nHost: x\r\nX-Amz-Target: TrentService.ListKeys\r\n"
            b"Content-Length: 2\r\n\r\n{}"
        )
        held[0].settimeout(5)
        assert held[0].recv(100).startswith(b"HTTP/1.1 200")
    finally:
        for sock in held:
            sock.close()
    wait_until_served(keyd.socket_path)  # the quota counts open connections only


def _start_with_fd_limit(keyd: Keyd, limit: int) -> None:
    def lower_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))

    with open(keyd.log_path, "ab") as log:
        keyd.process = subprocess.Popen(
            [*KMSFS, *keyd.serve_args()],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            preexec_fn=lower_limit,
        )
    keyd.wait_ready()


def _connect(path: Path) -> socket.socket:
    """Connect, waiting while the listen backlog is full (EAGAIN on a Unix socket)."""
    deadline = time.monotonic() + 10
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(os.fspath(path))
        except BlockingIOError:
            sock.close()
            assert time.monotonic() < deadline, "keyd accepts no connection"
            time.sleep(0.01)
            continue
        sock.settimeout(10)
        return sock


def test_fd_exhaustion_keeps_keyd_alive_and_serving(keyd_factory: Callable[..., Keyd]) -> None:
    """Before: 1,100 idle connections under a limit of 1,024 made the audit sync hit
    EMFILE and end keyd. Here the limit is 96 (and cannot be raised) and 150 clients
    connect and stay idle."""
    keyd = keyd_factory()
    keyd.init()
    _start_with_fd_limit(keyd, 96)
    idle: list[socket.socket] = []
    try:
        for _ in range(150):
            idle.append(_connect(keyd.socket))
        # the last ones were refused, with an answer rather than a hang
        answer = idle[-1].recv(4096)
        assert answer.startswith(b"HTTP/1.1 503"), answer
        assert b"ServiceUnavailableException" in answer
        time.sleep(2.5)  # more than one periodic audit sync at the limit
        assert keyd.process is not None and keyd.process.poll() is None, keyd.log()
        # an open connection is served
        idle[0].sendall(
            b"POST / HTTP/1.1\r\nHost: x\r\nX-Amz-Target: TrentService.CreateKey\r\n"
            b"Content-Length: 2\r\n\r\n{}"
        )
        assert idle[0].recv(4096).startswith(b"HTTP/1.1 200")
    finally:
        for sock in idle:
            sock.close()
    wait_until_served(keyd.socket)
    assert keyd.process.poll() is None
    keyd.stop()
    assert "Traceback" not in keyd.log()


_CONNECTOR = """
import json, os, select, socket, sys, time
sys.stdin.readline()
socks = []
for _ in range(int(sys.argv[2])):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(sys.argv[1])
    socks.append(sock)
answers = {}
deadline = time.monotonic() + 5
while len(answers) < len(socks) and time.monotonic() < deadline:
    readable, _, _ = select.select([s for s in socks if s.fileno() not in answers], [], [], 0.2)
    for sock in readable:
        answers[sock.fileno()] = sock.recv(4096).decode("latin-1")
print(json.dumps([answers.get(sock.fileno(), "") for sock in socks]))
"""


def test_accept_at_the_fd_limit_answers_503(start_keyd: Any) -> None:
    """Descriptors run out below the connection cap (other files, a lower limit): the
    waiting clients are told 503 instead of hanging in the backlog, and keyd serves on."""
    keyd = start_keyd()  # in this process: the limit below applies to it
    helper = subprocess.Popen(
        [sys.executable, "-c", _CONNECTOR, os.fspath(keyd.socket_path), "20"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        open_now = len(os.listdir("/proc/self/fd"))
        resource.setrlimit(resource.RLIMIT_NOFILE, (open_now + 6, hard))
        try:
            assert helper.stdin is not None
            helper.stdin.write("go\n")
            helper.stdin.flush()
            output, _ = helper.communicate(timeout=60)
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    finally:
        if helper.poll() is None:
            helper.kill()
            helper.wait()
    answers = json.loads(output)
    refused = [a for a in answers if a.startswith("HTTP/1.1 503")]
    assert refused, answers
    assert all("out of file descriptors" in a for a in refused)
    assert answers[0] == ""  # the first clients were accepted and wait, idle
    wait_until_served(keyd.socket_path)  # the helper's connections close as it exits


# ------------------------------------------------------------ a full keystore disk
@pytest.fixture
def small_tmpfs() -> Iterator[Path]:
    with mounted_tmpfs("8m", mode=0o700, prefix="kks-") as path:
        yield path


def _fill(directory: Path) -> Path:
    filler = directory / "filler"
    with open(filler, "wb", buffering=0) as stream:
        for size in (1 << 20, 4096, 1):
            while True:
                try:
                    stream.write(b"\xa5" * size)
                except OSError as error:
                    assert error.errno == errno.ENOSPC
                    break
    return filler


@ROOT
def test_full_keystore_disk(keyd_factory: Callable[..., Keyd], small_tmpfs: Path) -> None:
    keyd = keyd_factory()
    keyd.keystore = small_tmpfs / "ks"
    keyd.init()
    keyd.start()
    sock = keyd.socket
    _, _, created = call(sock, "CreateKey")
    key_id = created["KeyMetadata"]["KeyId"]
    assert call(sock, "CreateAlias", AliasName="alias/disk", TargetKeyId=key_id)[0] == 200
    _, _, sealed = call(sock, "Encrypt", KeyId=key_id, Plaintext=b64(b"hello"))
    blob = sealed["CiphertextBlob"]

    filler = _fill(small_tmpfs)
    # key use: refused unless its record was written (a line may still fit in the log's
    # last page); once the page is full every one is refused
    answered: list[tuple[int, str]] = []
    for _ in range(30):
        status, request_id, body = call(sock, "Encrypt", KeyId=key_id, Plaintext=b64(b"x"))
        assert status in (200, 503), body
        if status == 503:
            assert body["__type"] == "KMSInternalException"
            assert "No space left on device" in body["message"], body
        answered.append((status, request_id))
    assert answered[-1][0] == 503
    for operation, params in [
        ("Decrypt", {"CiphertextBlob": blob}),
        ("GenerateDataKey", {"KeyId": key_id, "KeySpec": "AES_256"}),
        ("DisableKey", {"KeyId": key_id}),
        ("CreateKey", {}),
        ("TagResource", {"KeyId": key_id, "Tags": [{"TagKey": "a", "TagValue": "b"}]}),
    ]:
        status, _, body = call(sock, operation, **params)
        assert (status, body.get("__type")) == (503, "KMSInternalException"), (operation, body)
        assert "nothing was changed" in body["message"]
    # reads are served
    status, _, described = call(sock, "DescribeKey", KeyId="alias/disk")
    assert status == 200 and described["KeyMetadata"]["KeyState"] == "Enabled"
    assert [k["KeyId"] for k in call(sock, "ListKeys")[2]["Keys"]] == [key_id]
    time.sleep(2.5)  # the periodic audit sync fails meanwhile
    assert keyd.process is not None and keyd.process.poll() is None, keyd.log()

    filler.unlink()  # space returns
    assert call(sock, "DisableKey", KeyId=key_id)[0] == 200
    assert call(sock, "EnableKey", KeyId=key_id)[0] == 200
    status, _, _ = call(sock, "Decrypt", CiphertextBlob=blob)
    assert status == 200
    assert keyd.stop() == 0

    report = subprocess.run(
        [*KMSFS, "keyd", "audit", "verify", "--keystore", str(keyd.keystore)],
        capture_output=True,
        text=True,
    )
    assert report.returncode == 0 and "intact" in report.stdout, report.stdout + report.stderr
    events = audit_events(keyd.keystore)
    succeeded = [e for e in events if "errorCode" not in e]
    by_name: dict[str, int] = {}
    for event in succeeded:
        by_name[event["eventName"]] = by_name.get(event["eventName"], 0) + 1
    # the keystore matches the log: one key created, disabled once, enabled once
    assert by_name["CreateKey"] == 1 and by_name["DisableKey"] == 1 and by_name["EnableKey"] == 1
    assert "TagResource" not in by_name
    # every Encrypt answered 200 during the full disk has its record
    recorded = {e.get("requestID") for e in succeeded if e["eventName"] == "Encrypt"}
    assert all(request_id in recorded for status, request_id in answered if status == 200)
    assert any(e["eventName"] == "AuditGap" for e in events)


# ------------------------------------------------------------ the fuzzer, briefly
def test_short_fuzz_gets_no_500(live_keyd: Keyd) -> None:
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "fuzz_keyd.py"),
            "--socket",
            str(live_keyd.socket),
            "--requests",
            "1500",
            "--seed",
            "12",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "500s: 0" in result.stdout
    assert live_keyd.process is not None and live_keyd.process.poll() is None
    status, _, _ = call(live_keyd.socket, "ListKeys")
    assert status == 200
