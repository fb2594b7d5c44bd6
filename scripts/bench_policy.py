"""µs per key-policy evaluation (kmsfs.kms.policy.evaluate), as the issue-14 note quotes.

.venv/bin/python scripts/bench_policy.py
"""

from __future__ import annotations

import json
import sys
import timeit
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1]))

from kmsfs.kms.policy import RequestContext, default_policy, evaluate, parse_policy  # noqa: E402

ACCT = "111122223333"
ALICE = f"arn:aws:iam::{ACCT}:user/alice"
KEY = f"arn:aws:kms:local:{ACCT}:key/1234abcd-12ab-34cd-56ef-1234567890ab"
EC = "kms:EncryptionContext:Department"


def ten_statements() -> str:
    statements = [
        {
            "Effect": "Allow",
            "Principal": {"AWS": f"arn:aws:iam::{ACCT}:user/u{i}"},
            "Action": ["kms:Encrypt", "kms:Generate*"],
            "Resource": "*",
            "Condition": {
                "StringEquals": {EC: f"dept{i}"},
                "ForAllValues:StringLike": {"kms:EncryptionContextKeys": "Dep*"},
                "NumericLessThanIfExists": {"kmsfs:CallerUid": 60000},
            },
        }
        for i in range(9)
    ]
    statements.append(
        {
            "Effect": "Allow",
            "Principal": {"AWS": ALICE},
            "Action": "kms:*",
            "Resource": "*",
            "Condition": {"StringEquals": {EC: "IT"}},
        }
    )
    return json.dumps({"Version": "2012-10-17", "Statement": statements})


def main() -> None:
    context = RequestContext(
        ALICE,
        False,
        ACCT,
        "kms:Encrypt",
        KEY,
        {EC: "IT", "kms:EncryptionContextKeys": ["Department"], "kmsfs:CallerUid": 1000},
    )
    runs = 20000
    for label, text in (
        ("default policy", default_policy(ACCT, ALICE)),
        ("10-statement policy", ten_statements()),
    ):
        policy = parse_policy(text)
        assert evaluate(policy, context).allowed
        seconds = min(timeit.repeat(lambda p=policy: evaluate(p, context), number=runs, repeat=3))
        print(f"evaluate() on the {label}: {seconds / runs * 1e6:.2f} µs/call")
    seconds = min(timeit.repeat(lambda: parse_policy(ten_statements()), number=200, repeat=3))
    print(f"parse_policy() of the 10-statement policy: {seconds / 200 * 1e6:.0f} µs/call")


if __name__ == "__main__":
    main()
