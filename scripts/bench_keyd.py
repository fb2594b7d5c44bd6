"""Measure keyd round trips per second (see scripts/bench-keyd)."""

from __future__ import annotations

import argparse
import base64
import multiprocessing
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

#: the rows: name shown -> the operation it calls (parameters are built in main)
ROWS = {
    "GenerateDataKey": "GenerateDataKey",
    "Decrypt": "Decrypt",
    "Sign ECC_NIST_P256": "Sign",
    "Sign RSA_2048": "Sign",
    "GenerateMac": "GenerateMac",
}


def _worker(
    socket_path: str,
    operation: str,
    params: dict,
    seconds: float,
    start_at: float,
    results,
) -> None:
    from kmsfs.kms.client import KMSClient

    with KMSClient(socket_path) as client:
        client.call("GenerateRandom", {"NumberOfBytes": 1})  # connect before the clock starts
        while time.time() < start_at:
            time.sleep(0.001)
        done = 0
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            client.call(operation, params)
            done += 1
    results.put(done)


def measure(socket_path: str, operation: str, params: dict, clients: int, seconds: float) -> float:
    results: multiprocessing.Queue = multiprocessing.Queue()
    start_at = time.time() + 0.5
    procs = [
        multiprocessing.Process(
            target=_worker, args=(socket_path, operation, params, seconds, start_at, results)
        )
        for _ in range(clients)
    ]
    for proc in procs:
        proc.start()
    total = sum(results.get(timeout=seconds + 30) for _ in procs)
    for proc in procs:
        proc.join()
    return total / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--clients", default="1,8")
    parser.add_argument("--repeat", type=int, default=3, help="runs per row; the median is shown")
    parser.add_argument(
        "--operations",
        default=",".join(ROWS),
        help=f"comma-separated rows to run (default: all of {', '.join(ROWS)})",
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
            ],
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 20
        while not os.path.exists(socket_path):
            if time.monotonic() > deadline or keyd.poll() is not None:
                raise SystemExit("keyd did not start")
            time.sleep(0.05)
        context = {"kmsfs:file-id": "bench"}
        message = base64.b64encode(
            b"a message of some 64 bytes, as a document digest or so..."
        ).decode()
        with KMSClient(socket_path) as client:

            def create(**params: str) -> str:
                return client.call("CreateKey", {"Description": "bench", **params})["KeyMetadata"][
                    "KeyId"
                ]

            key_id = create()
            blob = client.generate_data_key(key_id, encryption_context=context)["CiphertextBlob"]
            row_params = {
                "GenerateDataKey": {
                    "KeyId": key_id,
                    "KeySpec": "AES_256",
                    "EncryptionContext": context,
                },
                "Decrypt": {
                    "CiphertextBlob": base64.b64encode(blob).decode(),
                    "EncryptionContext": context,
                },
                "Sign ECC_NIST_P256": {
                    "KeyId": create(KeySpec="ECC_NIST_P256", KeyUsage="SIGN_VERIFY"),
                    "Message": message,
                    "SigningAlgorithm": "ECDSA_SHA_256",
                },
                "Sign RSA_2048": {
                    "KeyId": create(KeySpec="RSA_2048", KeyUsage="SIGN_VERIFY"),
                    "Message": message,
                    "SigningAlgorithm": "RSASSA_PSS_SHA_256",
                },
                "GenerateMac": {
                    "KeyId": create(KeySpec="HMAC_256", KeyUsage="GENERATE_VERIFY_MAC"),
                    "Message": message,
                    "MacAlgorithm": "HMAC_SHA_256",
                },
            }
        print(
            f"keyd round trips per second over {socket_path} "
            f"({args.seconds:g} s per run, median of {args.repeat}; {os.cpu_count()} cores)"
        )
        print(f"{'operation':<18} {'clients':>7} {'req/s':>9}   runs")
        for row in args.operations.split(","):
            if row not in ROWS:
                raise SystemExit(f"unknown row {row!r}; rows: {', '.join(ROWS)}")
            for clients in (int(c) for c in args.clients.split(",")):
                runs = [
                    measure(socket_path, ROWS[row], row_params[row], clients, args.seconds)
                    for _ in range(args.repeat)
                ]
                shown = ", ".join(f"{r:.0f}" for r in runs)
                print(f"{row:<18} {clients:>7} {statistics.median(runs):>9.0f}   {shown}")
    finally:
        if keyd is not None:
            keyd.terminate()
            keyd.wait(timeout=10)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
