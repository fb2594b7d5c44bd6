"""`kmsfs keys policy get|put` against a real keyd (issue 14's CLI, first part)."""

from __future__ import annotations

import json
import subprocess
from typing import Any

from tests.conftest import KMSFS


def kmsfs(keyd: Any, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*KMSFS, *args], env=keyd.env, input=stdin, capture_output=True, text=True, timeout=120
    )


def test_policy_get_shows_the_default_and_put_replaces_it(live_keyd: Any, tmp_path) -> None:
    assert kmsfs(live_keyd, "keys", "create", "--alias", "alias/p").returncode == 0
    got = kmsfs(live_keyd, "keys", "policy", "get", "alias/p")
    assert got.returncode == 0, got.stderr
    policy = json.loads(got.stdout)
    arns = [s["Principal"]["AWS"] for s in policy["Statement"]]
    assert any(str(arn).endswith(":root") for arn in arns), policy

    account = json.dumps(policy).split("arn:aws:iam::")[1][:12]
    new = {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Sid": "root only",
                "Effect": "Allow",
                "Principal": {"AWS": f"arn:aws:iam::{account}:root"},
                "Action": "kms:*",
                "Resource": "*",
            }
        ],
    }
    (tmp_path / "p.json").write_text(json.dumps(new))
    put = kmsfs(live_keyd, "keys", "policy", "put", "alias/p", "--file", str(tmp_path / "p.json"))
    assert put.returncode == 0, put.stderr
    assert json.loads(kmsfs(live_keyd, "keys", "policy", "get", "alias/p").stdout) == new
    # from stdin as well
    new["Statement"][0]["Sid"] = "from stdin"
    put = kmsfs(live_keyd, "keys", "policy", "put", "alias/p", "--file", "-", stdin=json.dumps(new))
    assert put.returncode == 0, put.stderr
    assert "from stdin" in kmsfs(live_keyd, "keys", "policy", "get", "alias/p").stdout


def test_a_malformed_policy_is_one_line_naming_the_place(live_keyd: Any) -> None:
    assert kmsfs(live_keyd, "keys", "create", "--alias", "alias/m").returncode == 0
    bad = {"Statement": [{"Effect": "Allow", "Principal": "*", "Action": "kms:Frobnicate"}]}
    put = kmsfs(live_keyd, "keys", "policy", "put", "alias/m", "--file", "-", stdin=json.dumps(bad))
    lines = put.stderr.strip().splitlines()
    assert put.returncode == 3 and len(lines) == 1, put.stderr
    assert "MalformedPolicyDocumentException" in lines[0] and "Statement[0]" in lines[0]
    missing = kmsfs(live_keyd, "keys", "policy", "put", "alias/m")
    assert missing.returncode == 2 and "--file" in missing.stderr
