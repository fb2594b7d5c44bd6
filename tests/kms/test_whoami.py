"""``kmsfs whoami`` against a real keyd, as root and as another user, and the
userIdentity of the audit records those requests leave."""

from __future__ import annotations

import grp
import json
import os
import pwd
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import KMSFS, Keyd, run_kmsfs
from tests.kms.users import ACCOUNT, NOBODY


def _whoami(keyd: Keyd, *, as_nobody: bool = False) -> dict[str, object]:
    env = {**keyd.env, "KMSFS_KEYD_UID": "0"}  # a user's client trusts root's keyd
    prefix = (
        ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"] if as_nobody else []
    )
    result = subprocess.run(
        [*prefix, *KMSFS, "whoami", "--json"], capture_output=True, env=env, timeout=120
    )
    assert result.returncode == 0, result.stderr.decode()
    return json.loads(result.stdout)


def _audit(keyd: Keyd, *args: str) -> list[dict[str, object]]:
    out = keyd.kmsfs("keyd", "audit", "tail", "--json", "-n", "100", *args).stdout.decode()
    return [json.loads(line) for line in out.splitlines()]


def test_whoami_as_root(shared_keyd: Keyd) -> None:
    identity = _whoami(shared_keyd)
    assert identity["Arn"] == f"arn:aws:iam::{ACCOUNT}:root"
    assert identity["Account"] == ACCOUNT
    assert identity["UserId"] == "0"
    assert identity["UserName"] == pwd.getpwuid(0).pw_name
    assert grp.getgrgid(0).gr_name in identity["Groups"]  # type: ignore[operator]
    text = shared_keyd.kmsfs("whoami").stdout.decode()
    assert f"arn:aws:iam::{ACCOUNT}:root" in text and "uid" in text

    (record,) = _audit(shared_keyd, "--event", "GetCallerIdentity", "--user", "root")[:1]
    identity_record = record["userIdentity"]
    assert isinstance(identity_record, dict)
    assert identity_record["type"] == "Root"
    assert identity_record["principalId"] == ACCOUNT
    assert identity_record["arn"] == f"arn:aws:iam::{ACCOUNT}:root"
    assert identity_record["accountId"] == ACCOUNT
    assert record["readOnly"] is True


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None,
    reason="needs root and setpriv to run a client as another user",
)
def test_whoami_as_nobody_and_its_audit_record(shared_keyd: Keyd) -> None:
    name = pwd.getpwuid(NOBODY).pw_name
    identity = _whoami(shared_keyd, as_nobody=True)
    executable = os.path.realpath(shutil.which(KMSFS[0]) or KMSFS[0])
    assert identity == {
        "Arn": f"arn:aws:iam::{ACCOUNT}:user/{name}",
        "Account": ACCOUNT,
        "UserId": str(NOBODY),
        "UserName": name,
        "Gid": NOBODY,
        "Groups": [grp.getgrgid(NOBODY).gr_name],  # --clear-groups: the primary only
        "Executable": executable,
    }

    records = _audit(shared_keyd, "--user", name)
    assert [r["eventName"] for r in records] == ["GetCallerIdentity"]
    assert records == _audit(shared_keyd, "--user", str(NOBODY))
    user_identity = records[0]["userIdentity"]
    assert isinstance(user_identity, dict)
    pid = user_identity.pop("pid")
    assert isinstance(pid, int) and pid > 0
    assert user_identity == {
        "type": "IAMUser",
        "principalId": str(NOBODY),
        "arn": f"arn:aws:iam::{ACCOUNT}:user/{name}",
        "accountId": ACCOUNT,
        "userName": name,
        "uid": NOBODY,
        "gid": NOBODY,
        "executable": executable,
    }
    assert records[0]["recipientAccountId"] == ACCOUNT
    assert _audit(shared_keyd, "--denied") == []
    shared_keyd.kmsfs("keyd", "audit", "verify")


def test_key_arns_use_the_account_from_init(shared_keyd: Keyd) -> None:
    created = json.loads(shared_keyd.kmsfs("keys", "create", "--json").stdout)
    assert created["KeyMetadata"]["Arn"].startswith(f"arn:aws:kms:local:{ACCOUNT}:key/")


def test_a_keystore_without_account_id_keeps_the_old_default(live_keyd: Keyd) -> None:
    identity = _whoami(live_keyd)
    assert identity["Account"] == "000000000000"
    assert identity["Arn"] == "arn:aws:iam::000000000000:root"


@pytest.mark.parametrize("bad", ["12345", "12345678901a", "1234567890123", ""])
def test_account_id_must_be_12_digits(short_tmp: Path, bad: str) -> None:
    result = run_kmsfs(
        "keyd", "init", "--keystore", str(short_tmp / "ks"), "--root-key-file",
        str(short_tmp / "root.key"), "--account-id", bad, check=False,
    )  # fmt: skip
    assert result.returncode != 0
    assert "--account-id must be 12 digits" in result.stderr.decode()
    assert not (short_tmp / "ks").exists()
