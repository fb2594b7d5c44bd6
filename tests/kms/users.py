"""Calling a real keyd as other local users (uids switched with setpriv), for the tests
of who may use a key: key policies and grants against real peer credentials."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from typing import Any

import pytest

from tests.conftest import KMSFS, Keyd

#: the account of the shared keyd's keystore (kmsfs keyd init --account-id)
ACCOUNT = "123456789012"
NOBODY = 65534

needs_other_users = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None,
    reason="needs root and setpriv to run clients as other users",
)

# One AWS KMS call through kmsfs's client, as whoever runs it: the request (operation,
# params) comes on stdin, the response (or the error's __type and message) goes to stdout.
_CALL = """
import json, sys
from kmsfs.errors import KeydUnavailable, KMSError
from kmsfs.kms.client import KMSClient
operation, params = json.load(sys.stdin)
try:
    with KMSClient() as client:
        print(json.dumps(client.call(operation, params)))
except KMSError as exc:
    print(json.dumps({"__type": exc.aws_type, "message": exc.message}))
except KeydUnavailable as exc:
    print(json.dumps({"__type": type(exc).__name__, "message": str(exc)}))
"""


def user_prefix(uid: int) -> list[str]:
    """Run as uid (and a group of the same number), without root's groups."""
    return ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups"] if uid else []


def user_env(keyd: Keyd, keyd_uid: int | None = 0) -> dict[str, str]:
    """keyd's socket, and the uid a user's client is told to trust as keyd's
    (KMSFS_KEYD_UID; root's keyd by default, None: only the usual ones)."""
    env = {**keyd.env, "HOME": "/nonexistent"}
    if keyd_uid is None:
        env.pop("KMSFS_KEYD_UID", None)
    else:
        env["KMSFS_KEYD_UID"] = str(keyd_uid)
    return env


def call_as(
    uid: int, keyd: Keyd, operation: str, *, keyd_uid: int | None = 0, **params: Any
) -> dict[str, Any]:
    """``operation`` as uid through keyd's socket: the response, or ``{"__type": ...}``
    (KeydUntrusted when the client refused keyd's socket)."""
    result = subprocess.run(
        [*user_prefix(uid), sys.executable, "-c", _CALL],
        input=json.dumps([operation, params]).encode(),
        capture_output=True,
        env=user_env(keyd, keyd_uid),
        timeout=120,
    )
    assert result.returncode == 0, result.stderr.decode()
    return json.loads(result.stdout)


def kmsfs_as(
    uid: int, keyd: Keyd, *args: str, input: bytes | None = None
) -> subprocess.CompletedProcess[bytes]:
    """The kmsfs command as uid (not checked: the caller looks at the outcome)."""
    return subprocess.run(
        [*user_prefix(uid), *KMSFS, *args],
        input=input,
        capture_output=True,
        env=user_env(keyd),
        timeout=120,
    )
