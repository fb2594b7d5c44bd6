"""IpAddress / NotIpAddress on aws:SourceIp (network callers of keyd over TCP)."""

from __future__ import annotations

import json

import pytest

from kmsfs.errors import MalformedPolicyDocumentException
from kmsfs.kms.policy import RequestContext, evaluate, parse_policy

ACCOUNT = "123456789012"
USER = f"arn:aws:iam::{ACCOUNT}:user/alice"
KEY = f"arn:aws:kms:local:{ACCOUNT}:key/1234"


def _policy(operator: str, value: object) -> str:
    return json.dumps(
        {
            "Version": "2012-10-17",
            "Statement": [
                {
                    "Effect": "Allow",
                    "Principal": {"AWS": USER},
                    "Action": "kms:Decrypt",
                    "Resource": "*",
                    "Condition": {operator: {"aws:SourceIp": value}},
                }
            ],
        }
    )


def _allowed(policy: str, source_ip: str | None) -> bool:
    conditions = {} if source_ip is None else {"aws:SourceIp": source_ip}
    context = RequestContext(USER, False, ACCOUNT, "kms:Decrypt", KEY, conditions)
    return evaluate(parse_policy(policy), context).allowed


@pytest.mark.parametrize(
    ("block", "address", "allowed"),
    [
        ("127.0.0.0/8", "127.0.0.1", True),
        ("10.0.0.0/8", "127.0.0.1", False),
        (["192.0.2.0/24", "127.0.0.1"], "127.0.0.1", True),
        ("::1/128", "::1", True),
        ("2001:db8::/32", "::1", False),
        ("127.0.0.0/8", None, False),  # a Unix-socket caller has no source address
    ],
)
def test_ip_address(block: object, address: str | None, allowed: bool) -> None:
    assert _allowed(_policy("IpAddress", block), address) is allowed


def test_not_ip_address() -> None:
    policy = _policy("NotIpAddress", "10.0.0.0/8")
    assert _allowed(policy, "127.0.0.1")
    assert not _allowed(policy, "10.1.2.3")


def test_a_malformed_block_names_its_place() -> None:
    with pytest.raises(MalformedPolicyDocumentException, match="not an IP address"):
        parse_policy(_policy("IpAddress", "300.1.1.1/8"))
