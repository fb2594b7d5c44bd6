"""Fuzz a real keyd over its Unix socket (see scripts/fuzz-keyd).

Sends random and mutated AWS KMS JSON 1.1 requests for every operation keyd serves,
with every member of each operation (and members of other operations, and unknown
ones) given valid values, wrong JSON types, NaN/Infinity/-Infinity, numbers that
overflow a double (1e999), huge integers, lone surrogates, over-long strings and deep
nesting; and a share of broken HTTP (garbage, bad Content-Length, truncated requests,
wrong method or target). Counts the answers by HTTP status and error type, and fails
(exit status 1) if keyd answered 500 or died. Seeded: the same seed and
``--requests`` send the same requests.

The request table below is written from the AWS KMS API reference, not imported from
kmsfs: a member the service forgot is still sent.
"""

from __future__ import annotations

import argparse
import base64
import collections
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import h11

# ------------------------------------------------------------------- request model
# member kinds: S string, I integer, B boolean, BLOB base64 string, CTX string map,
# LS list of strings, TAGS list of {TagKey, TagValue}, REC Recipient structure
KEY = "KEY"  # a string naming a key (id, ARN, alias)
OPERATIONS: dict[str, dict[str, str]] = {
    "CreateKey": {
        "Description": "S",
        "KeySpec": "S",
        "CustomerMasterKeySpec": "S",
        "KeyUsage": "S",
        "Origin": "S",
        "MultiRegion": "B",
        "Policy": "S",
        "Tags": "TAGS",
        "BypassPolicyLockoutSafetyCheck": "B",
        "CustomKeyStoreId": "S",
        "XksKeyId": "S",
    },
    "DescribeKey": {"KeyId": KEY, "GrantTokens": "LS"},
    "ListKeys": {"Limit": "I", "Marker": "S"},
    "EnableKey": {"KeyId": KEY},
    "DisableKey": {"KeyId": KEY},
    "ScheduleKeyDeletion": {"KeyId": KEY, "PendingWindowInDays": "I"},
    "CancelKeyDeletion": {"KeyId": KEY},
    "EnableKeyRotation": {"KeyId": KEY, "RotationPeriodInDays": "I"},
    "DisableKeyRotation": {"KeyId": KEY},
    "GetKeyRotationStatus": {"KeyId": KEY},
    "RotateKeyOnDemand": {"KeyId": KEY},
    "ListKeyRotations": {"KeyId": KEY, "Limit": "I", "Marker": "S"},
    "Encrypt": {
        "KeyId": KEY,
        "Plaintext": "BLOB",
        "EncryptionContext": "CTX",
        "GrantTokens": "LS",
        "EncryptionAlgorithm": "S",
        "DryRun": "B",
    },
    "Decrypt": {
        "CiphertextBlob": "BLOB",
        "EncryptionContext": "CTX",
        "GrantTokens": "LS",
        "KeyId": KEY,
        "EncryptionAlgorithm": "S",
        "Recipient": "REC",
        "DryRun": "B",
    },
    "ReEncrypt": {
        "CiphertextBlob": "BLOB",
        "SourceEncryptionContext": "CTX",
        "SourceKeyId": KEY,
        "DestinationKeyId": KEY,
        "DestinationEncryptionContext": "CTX",
        "SourceEncryptionAlgorithm": "S",
        "DestinationEncryptionAlgorithm": "S",
        "GrantTokens": "LS",
        "DryRun": "B",
    },
    "GenerateDataKey": {
        "KeyId": KEY,
        "EncryptionContext": "CTX",
        "NumberOfBytes": "I",
        "KeySpec": "S",
        "GrantTokens": "LS",
        "Recipient": "REC",
        "DryRun": "B",
    },
    "GenerateDataKeyWithoutPlaintext": {
        "KeyId": KEY,
        "EncryptionContext": "CTX",
        "NumberOfBytes": "I",
        "KeySpec": "S",
        "GrantTokens": "LS",
        "DryRun": "B",
    },
    "GenerateRandom": {"NumberOfBytes": "I", "CustomKeyStoreId": "S", "Recipient": "REC"},
    "CreateAlias": {"AliasName": "S", "TargetKeyId": KEY},
    "UpdateAlias": {"AliasName": "S", "TargetKeyId": KEY},
    "DeleteAlias": {"AliasName": "S"},
    "ListAliases": {"KeyId": KEY, "Limit": "I", "Marker": "S"},
    "TagResource": {"KeyId": KEY, "Tags": "TAGS"},
    "UntagResource": {"KeyId": KEY, "TagKeys": "LS"},
    "ListResourceTags": {"KeyId": KEY, "Limit": "I", "Marker": "S"},
    "GetPublicKey": {"KeyId": KEY, "GrantTokens": "LS"},
    "Sign": {
        "KeyId": KEY,
        "Message": "BLOB",
        "MessageType": "S",
        "SigningAlgorithm": "S",
        "GrantTokens": "LS",
        "DryRun": "B",
    },
    "Verify": {
        "KeyId": KEY,
        "Message": "BLOB",
        "MessageType": "S",
        "Signature": "BLOB",
        "SigningAlgorithm": "S",
        "GrantTokens": "LS",
        "DryRun": "B",
    },
    "GenerateMac": {"KeyId": KEY, "Message": "BLOB", "MacAlgorithm": "S", "DryRun": "B"},
    "VerifyMac": {
        "KeyId": KEY,
        "Message": "BLOB",
        "Mac": "BLOB",
        "MacAlgorithm": "S",
        "DryRun": "B",
    },
    "GenerateDataKeyPair": {
        "KeyId": KEY,
        "KeyPairSpec": "S",
        "EncryptionContext": "CTX",
        "Recipient": "REC",
        "DryRun": "B",
    },
    "GenerateDataKeyPairWithoutPlaintext": {
        "KeyId": KEY,
        "KeyPairSpec": "S",
        "EncryptionContext": "CTX",
        "DryRun": "B",
    },
    "DeriveSharedSecret": {
        "KeyId": KEY,
        "KeyAgreementAlgorithm": "S",
        "PublicKey": "BLOB",
        "Recipient": "REC",
        "DryRun": "B",
    },
}
ALL_MEMBERS = sorted(
    {(name, kind) for members in OPERATIONS.values() for name, kind in members.items()}
)
ENUM_WORDS = [
    "SYMMETRIC_DEFAULT",
    "AES_256",
    "AES_128",
    "ENCRYPT_DECRYPT",
    "AWS_KMS",
    "RSA_2048",
    "SIGN_VERIFY",
    "EXTERNAL",
    "RSAES_OAEP_SHA_1",
    "ECC_NIST_P256",
    "ECC_SECG_P256K1",
    "HMAC_256",
    "GENERATE_VERIFY_MAC",
    "KEY_AGREEMENT",
    "ECDSA_SHA_256",
    "RSASSA_PSS_SHA_256",
    "HMAC_SHA_256",
    "ECDH",
    "RAW",
    "DIGEST",
]


class Raw:
    """JSON text inserted as is (NaN, 1e999, a broken escape...)."""

    def __init__(self, text: str) -> None:
        self.text = text


SPECIAL_NUMBERS = [
    Raw("NaN"),
    Raw("Infinity"),
    Raw("-Infinity"),
    Raw("1e999"),
    Raw("-1e999"),
    Raw("1e-999"),
    Raw("1.5"),
    Raw("7.0"),
    Raw("-0"),
    Raw("123456789012345678901234567890"),
    Raw("9" * 5000),  # beyond Python's int-from-text digit limit
    10**19,
    2**63,
    -(2**63) - 1,
]
SURROGATES = ["\ud800", "\udfff", "a\udc00b", "\ud83d", "x" * 10 + "\ud800"]


def dump(value: Any) -> str:
    """JSON text of ``value``; Raw values are inserted verbatim."""
    if isinstance(value, Raw):
        return value.text
    if isinstance(value, dict):
        return "{" + ",".join(f"{dump(str(k))}:{dump(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ",".join(dump(v) for v in value) + "]"
    return json.dumps(value)  # ensure_ascii: a lone surrogate becomes "\ud800"


class Fuzzer:
    def __init__(self, socket_path: str, seed: int) -> None:
        self.socket_path = socket_path
        self.rng = random.Random(seed)
        self.key_ids: list[str] = []
        self.aliases: list[str] = []
        self.blobs: list[str] = []
        self.sock: socket.socket | None = None
        self.statuses: collections.Counter[int] = collections.Counter()
        self.types: collections.Counter[str] = collections.Counter()
        self.examples_500: list[str] = []
        self.no_answer = 0

    # ------------------------------------------------------------------ values
    def key_ref(self) -> Any:
        rng = self.rng
        choice = rng.random()
        if self.key_ids and choice < 0.5:
            key_id = rng.choice(self.key_ids)
            return rng.choice(
                [key_id, f"arn:aws:kms:local:000000000000:key/{key_id}", key_id.upper()]
            )
        if self.aliases and choice < 0.7:
            return rng.choice(self.aliases)
        return self.string()

    def string(self) -> str:
        rng = self.rng
        return rng.choice(
            [
                "",
                "x",
                "alias/fuzz-" + str(rng.randrange(20)),
                "alias/aws/x",
                "arn:aws:kms:local:000000000000:alias/fuzz-1",
                "arn:aws:kms:other:1:key/x",
                rng.choice(ENUM_WORDS),
                "é" * rng.randrange(1, 300),
                "\x00\x01\n\r",
                "a" * rng.choice([255, 256, 2048, 2049, 8193, 40000]),
                "😀" * rng.randrange(1, 50),
                "aws:reserved",
                str(rng.random()),
            ]
        )

    def blob(self) -> str:
        rng = self.rng
        if self.blobs and rng.random() < 0.5:
            blob = base64.b64decode(rng.choice(self.blobs))
            if rng.random() < 0.3:
                index = rng.randrange(len(blob))
                blob = blob[:index] + bytes([blob[index] ^ 1]) + blob[index + 1 :]
            return base64.b64encode(blob).decode()
        return rng.choice(
            [
                base64.b64encode(
                    os.urandom(rng.choice([1, 16, 32, 64, 4096, 4097, 7000]))
                ).decode(),
                "not base64!",
                "",
                "AAAA=",
                "=" * 8,
            ]
        )

    def valid(self, kind: str) -> Any:
        rng = self.rng
        if kind == KEY:
            return self.key_ref()
        if kind == "S":
            return self.string()
        if kind == "I":
            return rng.choice([0, 1, 7, 30, 32, 64, 90, 365, 1000, 1024, 1025, 2560, -1, 10**6])
        if kind == "B":
            return rng.random() < 0.3
        if kind == "BLOB":
            return self.blob()
        if kind == "CTX":
            return {self.string(): self.string() for _ in range(rng.randrange(4))}
        if kind == "LS":
            return [self.string() for _ in range(rng.randrange(4))]
        if kind == "TAGS":
            return [
                {"TagKey": self.string(), "TagValue": self.string()}
                for _ in range(rng.choice([0, 1, 2, 51]))
            ]
        if kind == "REC":
            return {"KeyEncryptionAlgorithm": "RSAES_OAEP_SHA_256", "AttestationDocument": "AA=="}
        raise AssertionError(kind)

    def mutant(self, kind: str) -> Any:
        """A value that is wrong for ``kind``: another type, a special number, a surrogate."""
        rng = self.rng
        roll = rng.random()
        if roll < 0.25:
            return rng.choice(SPECIAL_NUMBERS)
        if roll < 0.4:
            surrogate = rng.choice(SURROGATES)
            return {
                "S": surrogate,
                KEY: surrogate,
                "BLOB": surrogate,
                "CTX": {surrogate: "v"} if rng.random() < 0.5 else {"k": surrogate},
                "LS": ["ok", surrogate],
                "TAGS": [{"TagKey": surrogate, "TagValue": "v"}],
            }.get(kind, surrogate)
        if roll < 0.5:
            depth = rng.choice([2, 50, 900, 5000])
            return Raw("[" * depth + '"x"' + "]" * depth)
        if roll < 0.6 and kind in ("CTX", "TAGS", "LS", "REC"):
            # the right container, wrong things inside
            inner = rng.choice([1, None, True, [], {}, Raw("NaN"), 1.5])
            return {
                "CTX": {"k": inner},
                "TAGS": rng.choice([[inner], [{"TagKey": inner, "TagValue": "v"}], [{}]]),
                "LS": [inner],
                "REC": {"KeyEncryptionAlgorithm": inner},
            }[kind]
        return rng.choice(
            [None, True, False, 0, -5, 3.25, "", "12", [], {}, ["a"], {"a": "b"}, 10**400]
        )

    def params(self, operation: str) -> dict[str, Any]:
        rng = self.rng
        members = OPERATIONS.get(operation, {})
        params: dict[str, Any] = {}
        for name, kind in members.items():
            roll = rng.random()
            if roll < 0.35:
                continue
            params[name] = self.valid(kind) if roll < 0.8 else self.mutant(kind)
        if rng.random() < 0.2:  # members of other operations (e.g. Limit on DisableKey)
            name, kind = rng.choice(ALL_MEMBERS)
            params[name] = self.valid(kind) if rng.random() < 0.5 else self.mutant(kind)
        if rng.random() < 0.1:  # unknown members
            params[rng.choice(["Foo", "keyId", "__type", "\ud800", ""])] = self.mutant("S")
        return params

    # ------------------------------------------------------------------ sending
    def connect(self) -> socket.socket:
        if self.sock is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(15)
            sock.connect(self.socket_path)
            self.sock = sock
        return self.sock

    def drop(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def exchange(self, data: bytes, *, half_close: bool = False) -> tuple[int, dict[str, Any]]:
        """Send bytes, read one response; (status, JSON body) or (0, {}) if none came."""
        sock = self.connect()
        conn = h11.Connection(h11.CLIENT)
        try:
            sock.sendall(data)
            if half_close:
                sock.shutdown(socket.SHUT_WR)
            status, body = 0, b""
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    chunk = sock.recv(65536)
                    conn.receive_data(chunk)
                    continue
                if isinstance(event, h11.Response):
                    status = event.status_code
                    if any(n == b"connection" and v == b"close" for n, v in event.headers):
                        half_close = True
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                    break
        except (OSError, h11.ProtocolError):
            self.drop()
            return 0, {}
        if half_close or status == 0:
            self.drop()
        try:
            document = json.loads(body) if body else {}
        except ValueError:
            document = {"__type": "<not JSON>"}
        return status, document if isinstance(document, dict) else {}

    def call(self, operation: str, body: bytes) -> tuple[int, dict[str, Any]]:
        head = (
            f"POST / HTTP/1.1\r\nHost: keyd\r\nX-Amz-Target: TrentService.{operation}\r\n"
            f"Content-Type: application/x-amz-json-1.1\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode()
        return self.exchange(head + body)

    def broken_http(self) -> tuple[str, int, dict[str, Any]]:
        rng = self.rng
        body = b"{}"
        kinds = {
            "garbage": os.urandom(rng.randrange(1, 200)) + b"\r\n\r\n",
            "get": b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
            "path": b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}",
            "no-target": b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}",
            "bad-target": (
                b"POST / HTTP/1.1\r\nHost: x\r\nX-Amz-Target: TrentService.\xff\xfe\r\n"
                b"Content-Length: 2\r\n\r\n{}"
            ),
            "bad-length": (
                b"POST / HTTP/1.1\r\nHost: x\r\nX-Amz-Target: TrentService.ListKeys\r\n"
                b"Content-Length: -1\r\n\r\n{}"
            ),
            "huge-length": (
                b"POST / HTTP/1.1\r\nHost: x\r\nX-Amz-Target: TrentService.ListKeys\r\n"
                b"Content-Length: 99999999999999999999\r\n\r\n{}"
            ),
            "short-body": (
                b"POST / HTTP/1.1\r\nHost: x\r\nX-Amz-Target: TrentService.ListKeys\r\n"
                b"Content-Length: 10\r\n\r\n{}"
            ),
            "chunked": (
                b"POST / HTTP/1.1\r\nHost: x\r\nX-Amz-Target: TrentService.ListKeys\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n"
            ),
            "http10": (
                b"POST / HTTP/1.0\r\nX-Amz-Target: TrentService.ListKeys\r\n"
                b"Content-Length: 2\r\n\r\n{}"
            ),
            "big-header": (b"POST / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n"),
            "not-object": (
                b"POST / HTTP/1.1\r\nHost: x\r\nX-Amz-Target: TrentService.ListKeys\r\n"
                b"Content-Length: 7\r\n\r\n[1,2,3]"
            ),
            "bad-utf8": (
                b"POST / HTTP/1.1\r\nHost: x\r\nX-Amz-Target: TrentService.DescribeKey\r\n"
                b'Content-Length: 14\r\n\r\n{"KeyId":"\xed\xa0\x80"}'
            ),
            "pipelined": (
                b"POST / HTTP/1.1\r\nHost: x\r\nX-Amz-Target: TrentService.ListKeys\r\n"
                b"Content-Length: 2\r\n\r\n{}" * 3
            ),
        }
        del body
        name = rng.choice(sorted(kinds))
        status, document = self.exchange(kinds[name], half_close=name in ("short-body",))
        self.drop()  # leave no half-read pipelined answers behind
        return name, status, document

    # ------------------------------------------------------------------ running
    def setup(self) -> None:
        for index in range(3):
            status, result = self.call("CreateKey", b'{"Description":"fuzz"}')
            if status != 200:
                raise SystemExit(f"keyd refused CreateKey during setup: {status} {result}")
            key_id = result["KeyMetadata"]["KeyId"]
            self.key_ids.append(key_id)
            alias = f"alias/fuzz-{index}"
            self.call(
                "CreateAlias", json.dumps({"AliasName": alias, "TargetKeyId": key_id}).encode()
            )
            self.aliases.append(alias)
            status, result = self.call(
                "Encrypt", json.dumps({"KeyId": key_id, "Plaintext": "aGVsbG8="}).encode()
            )
            if status == 200:
                self.blobs.append(result["CiphertextBlob"])

    def one(self) -> None:
        rng = self.rng
        if rng.random() < 0.08:
            name, status, document = self.broken_http()
            label = f"HTTP:{name}"
            if name == "short-body":
                # the client half-closed in the middle of its body: nobody to answer,
                # keyd closes quietly (as for any client that vanishes mid-request)
                status = status or -1
        else:
            operation = rng.choice(sorted(OPERATIONS) + ["NoSuchOperation"])
            params = self.params(operation)
            text = dump(params)
            body = text.encode("utf-8", "surrogatepass")
            status, document = self.call(operation, body)
            label = f"{operation} {text[:300]}"
            if status == 200:
                self.learn(operation, document)
        self.statuses[status] += 1  # -1: closed quietly, 0: no answer
        self.types[str(document.get("__type", "-"))] += 1
        if status >= 500 and status != 503 or status == 0:
            if status == 0:
                self.no_answer += 1
            if len(self.examples_500) < 20:
                self.examples_500.append(f"{status} {document.get('__type')}: {label}")

    def learn(self, operation: str, result: dict[str, Any]) -> None:
        if operation == "CreateKey" and len(self.key_ids) < 40:
            key_id = result.get("KeyMetadata", {}).get("KeyId")
            if isinstance(key_id, str):
                self.key_ids.append(key_id)
        blob = result.get("CiphertextBlob")
        if isinstance(blob, str) and len(self.blobs) < 50:
            self.blobs.append(blob)


def start_keyd(work: Path) -> tuple[subprocess.Popen[bytes], str]:
    kmsfs = [sys.executable, "-m", "kmsfs.cli"]
    keystore, root_key, sock = work / "ks", work / "root.key", work / "keyd.sock"
    subprocess.run(
        [*kmsfs, "keyd", "init", "--keystore", str(keystore), "--root-key-file", str(root_key)],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    log = open(work / "keyd.log", "wb")  # noqa: SIM115 - lives as long as keyd
    keyd = subprocess.Popen(
        [
            *kmsfs,
            "keyd",
            "serve",
            "--keystore",
            str(keystore),
            "--root-key-file",
            str(root_key),
            "--socket",
            str(sock),
        ],
        stdout=log,
        stderr=log,
    )
    deadline = time.monotonic() + 30
    while not sock.exists():
        if time.monotonic() > deadline or keyd.poll() is not None:
            raise SystemExit("keyd did not start")
        time.sleep(0.05)
    return keyd, str(sock)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="how long to fuzz")
    parser.add_argument("--requests", type=int, help="stop after this many requests instead")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--socket", help="fuzz the keyd on this socket (default: start one)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="kmsfs-fuzz-", dir="/tmp"))
    keyd = None
    try:
        if args.socket:
            socket_path = args.socket
        else:
            keyd, socket_path = start_keyd(work)
        fuzzer = Fuzzer(socket_path, args.seed)
        fuzzer.setup()
        started = time.monotonic()
        sent = 0
        while True:
            if args.requests is not None:
                if sent >= args.requests:
                    break
            elif time.monotonic() - started >= args.seconds:
                break
            fuzzer.one()
            sent += 1
        elapsed = time.monotonic() - started
        fuzzer.drop()
        alive = keyd is None or keyd.poll() is None
        try:
            status, _ = fuzzer.call("ListKeys", b"{}")
        except OSError:
            status = 0
        fuzzer.drop()
        serving = status == 200
        print(f"{sent} requests in {elapsed:.1f} s (seed {args.seed})")
        print("by status: " + ", ".join(f"{s}: {n}" for s, n in sorted(fuzzer.statuses.items())))
        print("by error type: " + ", ".join(f"{t}: {n}" for t, n in fuzzer.types.most_common()))
        for example in fuzzer.examples_500:
            print("  bad answer:", example)
        if keyd is not None:
            verify = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "kmsfs.cli",
                    "keyd",
                    "audit",
                    "verify",
                    "--keystore",
                    str(work / "ks"),
                ],
                capture_output=True,
                text=True,
            )
            print("audit verify:", (verify.stdout + verify.stderr).strip().splitlines()[-1:])
        bad = sum(n for s, n in fuzzer.statuses.items() if s >= 500 and s != 503)
        print(
            f"500s: {bad}, no answer: {fuzzer.no_answer}, keyd alive: {alive}, serving: {serving}"
        )
        return 0 if bad == 0 and fuzzer.no_answer == 0 and alive and serving else 1
    finally:
        if keyd is not None:
            keyd.terminate()
            try:
                keyd.wait(timeout=15)
            except subprocess.TimeoutExpired:
                keyd.kill()
                keyd.wait()
        if args.keep:
            print("work directory:", work)
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
