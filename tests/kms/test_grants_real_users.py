"""Grants with a real keyd and real users (issue 14): root's keyd serves every user
through a --socket-mode 0666 socket; user B is uid 65534 (nobody), run with setpriv.

B cannot decrypt root's data key; after ``kmsfs keys grant create ... --grantee
<nobody's login name> --context-subset ...`` B decrypts a matching context and is
refused another; after ``kmsfs keys grant revoke`` B is refused on the next call. The
grant steps go through the CLI, as a user would type them.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import KMSFS, Keyd, run_kmsfs

ACCOUNT = "123456789012"
NOBODY = 65534

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None,
    reason="needs root and setpriv to run a client as another user",
)


@pytest.fixture
def shared_keyd(keyd_factory: Callable[..., Keyd], short_tmp: Path) -> Keyd:
    """root's keyd on a keystore of account 123456789012, its socket open to every
    user (--socket-mode 0666) in a root-owned directory every user can search."""
    keyd = keyd_factory()
    run_kmsfs(
        "keyd", "init", "--keystore", str(keyd.keystore), "--root-key-file",
        str(keyd.root_key), "--account-id", ACCOUNT,
    )  # fmt: skip
    os.chmod(short_tmp, 0o755)
    os.chmod(keyd.workdir, 0o755)
    keyd.start("--socket-mode", "0666")
    return keyd


def as_nobody(keyd: Keyd, *args: str, input: bytes | None = None) -> subprocess.CompletedProcess:
    env = {**keyd.env, "KMSFS_KEYD_UID": "0"}  # a user's client trusts root's keyd
    prefix = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
    return subprocess.run(
        [*prefix, *KMSFS, *args], input=input, capture_output=True, env=env, timeout=120
    )


def nobody_decrypts(keyd: Keyd, blob: bytes, context: str) -> subprocess.CompletedProcess:
    return as_nobody(keyd, "keys", "decrypt", "--context", context, input=blob)


def test_a_grant_with_a_context_subset_lets_another_user_decrypt_until_revoked(
    shared_keyd: Keyd,
) -> None:
    keyd = shared_keyd
    nobody = pwd.getpwuid(NOBODY).pw_name
    key_id = json.loads(keyd.kmsfs("keys", "create", "--json").stdout)["KeyMetadata"]["KeyId"]
    data_key = os.urandom(32)
    blob_it = keyd.kmsfs(
        "keys", "encrypt", "--key", key_id, "--context", "dept=it", input=data_key
    ).stdout
    blob_hr = keyd.kmsfs(
        "keys", "encrypt", "--key", key_id, "--context", "dept=hr", input=data_key
    ).stdout

    refused = nobody_decrypts(keyd, blob_it, "dept=it")
    assert refused.returncode == 3, refused.stderr.decode()
    assert b"AccessDeniedException" in refused.stderr
    assert f"user/{nobody}".encode() in refused.stderr

    created = json.loads(
        keyd.kmsfs(
            "keys", "grant", "create", key_id, "--grantee", nobody,
            "--operations", "Decrypt", "--context-subset", "dept=it", "--json",
        ).stdout
    )  # fmt: skip
    grant_id = created["GrantId"]
    (entry,) = json.loads(keyd.kmsfs("keys", "grant", "list", key_id, "--json").stdout)
    assert entry["GrantId"] == grant_id
    assert entry["GranteePrincipal"] == f"arn:aws:iam::{ACCOUNT}:user/{nobody}"
    assert entry["Constraints"] == {"EncryptionContextSubset": {"dept": "it"}}

    allowed = nobody_decrypts(keyd, blob_it, "dept=it")
    assert allowed.returncode == 0, allowed.stderr.decode()
    assert allowed.stdout == data_key
    other = nobody_decrypts(keyd, blob_hr, "dept=hr")
    assert other.returncode == 3 and b"AccessDeniedException" in other.stderr

    # the audit record says which grant allowed nobody's Decrypt
    tail = keyd.kmsfs("keyd", "audit", "tail", "--json", "-n", "100", "--user", nobody)
    records = [json.loads(line) for line in tail.stdout.decode().splitlines()]
    granted = [r for r in records if r["eventName"] == "Decrypt" and "errorCode" not in r]
    assert [r["additionalEventData"] for r in granted] == [{"grantId": grant_id}]
    assert (
        created["GrantToken"]
        not in keyd.kmsfs("keyd", "audit", "tail", "-n", "100").stdout.decode()
    )

    keyd.kmsfs("keys", "grant", "revoke", key_id, grant_id)
    after = nobody_decrypts(keyd, blob_it, "dept=it")
    assert after.returncode == 3 and b"AccessDeniedException" in after.stderr
    assert json.loads(keyd.kmsfs("keys", "grant", "list", key_id, "--json").stdout) == []


def test_the_grantee_may_retire_its_grant_by_token_when_the_grant_allows_it(
    shared_keyd: Keyd,
) -> None:
    keyd = shared_keyd
    key_id = json.loads(keyd.kmsfs("keys", "create", "--json").stdout)["KeyMetadata"]["KeyId"]
    blob = keyd.kmsfs("keys", "encrypt", "--key", key_id, input=b"secret").stdout
    printed = keyd.kmsfs(
        "keys", "grant", "create", key_id, "--grantee", str(NOBODY),
        "--operations", "Decrypt,RetireGrant",
    ).stdout.decode()  # fmt: skip
    created = dict(line.split(None, 1) for line in printed.splitlines())
    assert set(created) == {"GrantId", "GrantToken"}
    listed = keyd.kmsfs("keys", "grant", "list", key_id).stdout.decode()
    assert created["GrantId"] in listed and "Decrypt,RetireGrant" in listed
    assert as_nobody(keyd, "keys", "decrypt", input=blob).stdout == b"secret"
    retired = as_nobody(keyd, "keys", "grant", "retire", "--token", created["GrantToken"])
    assert retired.returncode == 0, retired.stderr.decode()
    assert as_nobody(keyd, "keys", "decrypt", input=blob).returncode == 3
