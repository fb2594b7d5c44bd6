"""Measure keyd round trips per second (see scripts/bench-keyd).

Three transports in one run, against one keyd: the Unix socket (kmsfs's client, peer
credentials), TCP on loopback with AWS Signature V4 (a light signing client, so that the
figure is keyd's cost: each request carries a botocore-made signature, renewed each
second as X-Amz-Date changes, and keyd verifies every request in full), and boto3
itself over TCP (AWS's client; its own per-call cost is in that figure).
"""

from __future__ import annotations

import argparse
import base64
import json
import multiprocessing
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


class _SignedTcpClient:
    """One keep-alive connection to keyd's TCP listener, HTTP as kmsfs's own client speaks
    it (protocol.encode_request and ResponseReader, so that client-side cost is alike on
    both transports); requests signed with botocore's SigV4Auth, the signature renewed
    when the second (X-Amz-Date) changes."""

    def __init__(self, port: int, access_key_id: str, secret: str) -> None:
        from botocore.credentials import Credentials

        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.credentials = Credentials(access_key_id, secret)
        self._signed: dict[tuple[str, bytes], tuple[int, list[tuple[bytes, bytes]]]] = {}

    def _headers(self, operation: str, body: bytes) -> list[tuple[bytes, bytes]]:
        from botocore.auth import SigV4Auth
        from botocore.awsrequest import AWSRequest

        second = int(time.time())
        cached = self._signed.get((operation, body))
        if cached is None or cached[0] != second:
            request = AWSRequest(
                method="POST",
                url="http://127.0.0.1/",
                data=body,
                headers={
                    "Content-Type": "application/x-amz-json-1.1",
                    "X-Amz-Target": f"TrentService.{operation}",
                },
            )
            SigV4Auth(self.credentials, "kms", "local").add_auth(request)
            signed = [("Host", "127.0.0.1"), *request.headers.items()]
            signed.append(("Content-Length", str(len(body))))
            cached = (second, [(name.encode(), value.encode()) for name, value in signed])
            self._signed[(operation, body)] = cached
        return cached[1]

    def call(self, operation: str, params: dict) -> dict:
        from kmsfs.kms.protocol import ResponseReader, encode_request

        body = json.dumps(params).encode()
        headers = self._headers(operation, body)
        self.sock.sendall(encode_request(headers, body))
        reader = ResponseReader(headers, body)
        while True:
            response = reader.feed(self.sock.recv(65536))
            if response is not None:
                break
        status, payload = response
        answer = json.loads(payload)
        if status != 200:
            raise RuntimeError(f"{operation}: {answer.get('__type')}")
        return answer

    def __enter__(self) -> _SignedTcpClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()


class _Boto3Client:
    def __init__(self, port: int, access_key_id: str, secret: str) -> None:
        import boto3

        self.client = boto3.session.Session().client(
            "kms",
            region_name="local",
            endpoint_url=f"http://127.0.0.1:{port}",
            aws_access_key_id=access_key_id,
            aws_secret_access_key=secret,
        )

    def call(self, operation: str, params: dict) -> dict:
        from botocore import xform_name

        # boto3 takes blobs as bytes (the JSON rows carry them as base64)
        params = {
            name: base64.b64decode(value) if name in ("CiphertextBlob", "Message") else value
            for name, value in params.items()
        }
        return getattr(self.client, xform_name(operation))(**params)

    def __enter__(self) -> _Boto3Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.client.close()


_CONTEXT = {"kmsfs:file-id": "bench"}
_MESSAGE = base64.b64encode(b"a message of a few dozen bytes, as a signer sends").decode()
#: row -> (AWS operation, key spec and usage of a key made for it (None: the symmetric
#: key), request members; KeyId, and Decrypt's blob, are filled in)
ROWS: dict[str, tuple[str, str | None, str | None, dict]] = {
    "GenerateDataKey": (
        "GenerateDataKey",
        None,
        None,
        {"KeySpec": "AES_256", "EncryptionContext": _CONTEXT},
    ),
    "Decrypt": ("Decrypt", None, None, {"EncryptionContext": _CONTEXT}),
    "Sign ECC_NIST_P256": (
        "Sign",
        "ECC_NIST_P256",
        "SIGN_VERIFY",
        {"Message": _MESSAGE, "SigningAlgorithm": "ECDSA_SHA_256"},
    ),
    "Sign RSA_2048": (
        "Sign",
        "RSA_2048",
        "SIGN_VERIFY",
        {"Message": _MESSAGE, "SigningAlgorithm": "RSASSA_PSS_SHA_256"},
    ),
    "GenerateMac": (
        "GenerateMac",
        "HMAC_256",
        "GENERATE_VERIFY_MAC",
        {"Message": _MESSAGE, "MacAlgorithm": "HMAC_SHA_256"},
    ),
    # no key, no policy, no audit record: the floor of keyd's cost per request (HTTP,
    # the event loop, the socket), for comparison with the rows above
    "GenerateRandom": ("GenerateRandom", None, None, {"NumberOfBytes": 32}),
}


def _client(transport: str, target: tuple):
    if transport == "unix":
        from kmsfs.kms.client import KMSClient

        return KMSClient(target[0])
    if transport == "tcp":
        return _SignedTcpClient(*target[1:])
    return _Boto3Client(*target[1:])


def _worker(
    transport: str,
    target: tuple,
    operation: str,
    params: dict,
    seconds: float,
    start_at: float,
    results,
) -> None:
    with _client(transport, target) as client:
        client.call("GenerateRandom", {"NumberOfBytes": 1})  # connect before the clock starts
        while time.time() < start_at:
            time.sleep(0.001)
        done = 0
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            client.call(operation, params)
            done += 1
    results.put(done)


def measure(
    transport: str,
    target: tuple,
    operation: str,
    params: dict,
    clients: int,
    seconds: float,
    keyd_pid: int,
) -> tuple[float, float]:
    """(requests per second, keyd's CPU time per request in microseconds)."""
    results: multiprocessing.Queue = multiprocessing.Queue()
    start_at = time.time() + (2.0 if transport == "boto3" else 0.5)
    procs = [
        multiprocessing.Process(
            target=_worker,
            args=(transport, target, operation, params, seconds, start_at, results),
        )
        for _ in range(clients)
    ]
    for proc in procs:
        proc.start()
    time.sleep(max(0.0, start_at - time.time()))
    cpu_before = _cpu_seconds(keyd_pid)
    time.sleep(seconds)
    cpu_used = _cpu_seconds(keyd_pid) - cpu_before
    total = sum(results.get(timeout=seconds + 30) for _ in procs)
    for proc in procs:
        proc.join()
    return total / seconds, cpu_used / max(total, 1) * 1e6


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (/proc/<pid>/stat), in seconds."""
    with open(f"/proc/{pid}/stat") as stat_file:
        fields = stat_file.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--clients", default="1,8")
    parser.add_argument("--repeat", type=int, default=3, help="runs per row; the median is shown")
    parser.add_argument(
        "--transports",
        default="unix,tcp,boto3",
        help="unix (socket), tcp (SigV4 over loopback), boto3 (AWS's client over TCP)",
    )
    parser.add_argument(
        "--operations",
        default="GenerateDataKey,Decrypt",
        help=f"comma-separated rows, of: {', '.join(ROWS)}",
    )
    args = parser.parse_args()

    from kmsfs.kms.client import KMSClient

    work = Path(tempfile.mkdtemp(prefix="kmsfs-bench-", dir="/tmp"))
    socket_path = str(work / "keyd.sock")
    keystore = work / "keystore"
    kmsfs = [sys.executable, "-m", "kmsfs.cli"]
    keyd = None
    try:
        subprocess.run(
            [
                *kmsfs,
                "keyd",
                "init",
                "--keystore",
                str(keystore),
                "--root-key-file",
                str(work / "root.key"),
            ],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        created = subprocess.run(
            [
                *kmsfs,
                "keyd",
                "credentials",
                "create",
                "--user",
                "bench",
                "--json",
                "--keystore",
                str(keystore),
                "--root-key-file",
                str(work / "root.key"),
            ],
            check=True,
            capture_output=True,
        )
        access_key = json.loads(created.stdout)["AccessKey"]
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        keyd = subprocess.Popen(
            [
                *kmsfs,
                "keyd",
                "serve",
                "--keystore",
                str(keystore),
                "--root-key-file",
                str(work / "root.key"),
                "--socket",
                socket_path,
                "--listen",
                f"127.0.0.1:{port}",
            ],
            stderr=subprocess.DEVNULL,
            env={**os.environ, "XDG_CONFIG_HOME": str(work)},  # record nothing in ~/.config
        )
        target = (socket_path, port, access_key["AccessKeyId"], access_key["SecretAccessKey"])
        deadline = time.monotonic() + 20
        while not os.path.exists(socket_path):
            if time.monotonic() > deadline or keyd.poll() is not None:
                raise SystemExit("keyd did not start")
            time.sleep(0.05)
        with KMSClient(socket_path) as client:
            key = client.call("CreateKey", {"Description": "bench"})["KeyMetadata"]
            key_id = key["KeyId"]
            me = client.call("GetCallerIdentity", {})["Arn"]
            bench_user = f"arn:aws:iam::{key['AWSAccountId']}:user/bench"
            policy = {
                "Version": "2012-10-17",
                "Statement": [
                    {
                        "Effect": "Allow",
                        "Principal": {"AWS": [me, bench_user]},
                        "Action": "kms:*",
                        "Resource": "*",
                    }
                ],
            }
            client.call(
                "PutKeyPolicy",
                {"KeyId": key_id, "PolicyName": "default", "Policy": json.dumps(policy)},
            )
            blob = client.generate_data_key(key_id, encryption_context={"kmsfs:file-id": "bench"})[
                "CiphertextBlob"
            ]
            rows: dict[str, tuple[str, dict]] = {}
            for row in args.operations.split(","):
                if row not in ROWS:
                    raise SystemExit(f"unknown row {row!r}; rows: {', '.join(ROWS)}")
                operation, spec, usage, params = ROWS[row]
                row_key = key_id
                if spec is not None:
                    row_key = client.call(
                        "CreateKey", {"Description": "bench", "KeySpec": spec, "KeyUsage": usage}
                    )["KeyMetadata"]["KeyId"]
                    client.call(
                        "PutKeyPolicy",
                        {"KeyId": row_key, "PolicyName": "default", "Policy": json.dumps(policy)},
                    )
                if operation not in ("Decrypt", "GenerateRandom"):
                    params = {**params, "KeyId": row_key}
                if operation == "Decrypt":
                    params = {**params, "CiphertextBlob": base64.b64encode(blob).decode()}
                rows[row] = (operation, params)
        print(
            f"keyd round trips per second: Unix socket {socket_path}, TCP+SigV4 127.0.0.1:{port} "
            f"({args.seconds:g} s per run, median of {args.repeat}; {os.cpu_count()} cores)"
        )
        print(
            "req/s: median rate; keyd us/req: keyd's own CPU time per request (less "
            "sensitive to other load on the machine than the rate)"
        )
        print(
            f"{'operation':<18} {'transport':<9} {'clients':>7} {'req/s':>9} {'/unix':>6}"
            f" {'keyd us/req':>9} {'/unix':>6}   runs"
        )
        transports = args.transports.split(",")
        for row, (operation, params) in rows.items():
            for clients in (int(c) for c in args.clients.split(",")):
                # rounds interleave the transports, so that load from elsewhere on the
                # machine falls on all of them alike
                runs: dict[str, list[float]] = {transport: [] for transport in transports}
                cpu: dict[str, list[float]] = {transport: [] for transport in transports}
                for _ in range(args.repeat):
                    for transport in transports:
                        rate, cpu_per_request = measure(
                            transport,
                            target,
                            operation,
                            params,
                            clients,
                            args.seconds,
                            keyd.pid,
                        )
                        runs[transport].append(rate)
                        cpu[transport].append(cpu_per_request)
                unix_rate = statistics.median(runs["unix"]) if "unix" in runs else None
                unix_cpu = statistics.median(cpu["unix"]) if "unix" in cpu else None
                for transport in transports:
                    rate = statistics.median(runs[transport])
                    cpu_us = statistics.median(cpu[transport])
                    ratio = f"{rate / unix_rate:.2f}" if unix_rate else "-"
                    cpu_ratio = f"{cpu_us / unix_cpu:.2f}" if unix_cpu else "-"
                    shown = ", ".join(f"{r:.0f}" for r in runs[transport])
                    print(
                        f"{row:<18} {transport:<9} {clients:>7} {rate:>9.0f} {ratio:>6}"
                        f" {cpu_us:>9.0f} {cpu_ratio:>6}   {shown}",
                        flush=True,
                    )
    finally:
        if keyd is not None:
            keyd.terminate()
            keyd.wait(timeout=10)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
