"""``kmsfs keys grant``: naming users (login name, uid, ARN) and the argument checks
made before anything is sent to keyd. (The grant commands against a real keyd, with
a second user, are in tests/kms/test_grants_real_users.py.)"""

from __future__ import annotations

import pwd

import pytest

from kmsfs.cli import build_parser
from kmsfs.cli.keys import parse_operations, principal_arn
from kmsfs.errors import UsageError
from tests.conftest import run_kmsfs

ACCOUNT = "123456789012"


def _unused_uid() -> int:
    uid = 4_000_000
    while True:
        try:
            pwd.getpwuid(uid)
        except KeyError:
            return uid
        uid += 1


def test_a_login_name_and_its_uid_name_the_same_user() -> None:
    entry = pwd.getpwuid(65534)
    expected = f"arn:aws:iam::{ACCOUNT}:user/{entry.pw_name}"
    assert principal_arn(entry.pw_name, ACCOUNT) == expected
    assert principal_arn("65534", ACCOUNT) == expected


def test_root_is_the_account_root() -> None:
    root_name = pwd.getpwuid(0).pw_name
    assert principal_arn(root_name, ACCOUNT) == f"arn:aws:iam::{ACCOUNT}:root"
    assert principal_arn("0", ACCOUNT) == f"arn:aws:iam::{ACCOUNT}:root"


def test_a_uid_without_a_name_is_uid_n_as_keyd_names_it() -> None:
    uid = _unused_uid()
    assert principal_arn(str(uid), ACCOUNT) == f"arn:aws:iam::{ACCOUNT}:user/uid-{uid}"


def test_an_arn_is_passed_on_unchanged() -> None:
    arn = "arn:aws:iam::999999999999:user/someone"
    assert principal_arn(arn, ACCOUNT) == arn  # keyd decides whether it is valid


def test_an_unknown_login_name_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="no user named"):
        principal_arn("no-such-user-kmsfs", ACCOUNT)


def test_operations_are_comma_separated() -> None:
    assert parse_operations("Decrypt,GenerateDataKey") == ["Decrypt", "GenerateDataKey"]
    assert parse_operations(" Decrypt , Encrypt,") == ["Decrypt", "Encrypt"]
    with pytest.raises(UsageError):
        parse_operations(" , ")


def test_grant_create_parses_every_option() -> None:
    args = build_parser().parse_args(
        [
            "keys", "grant", "create", "alias/k", "--grantee", "nobody",
            "--operations", "Decrypt", "--retiring", "0", "--name", "n",
            "--context-subset", "a=b", "--context-subset", "c=d", "--context-equals", "e=f",
            "--json",
        ]
    )  # fmt: skip
    assert (args.key, args.grantee, args.operations, args.retiring, args.name) == (
        "alias/k",
        "nobody",
        "Decrypt",
        "0",
        "n",
    )
    assert args.context_subset == ["a=b", "c=d"] and args.context_equals == ["e=f"]
    assert args.json


@pytest.mark.parametrize(
    "argv",
    [
        ["keys", "grant", "retire"],
        ["keys", "grant", "retire", "KEY"],
        ["keys", "grant", "retire", "KEY", "GRANT", "--token", "T"],
    ],
)
def test_retire_needs_a_token_or_key_and_grant_id(argv: list[str]) -> None:
    result = run_kmsfs(*argv, check=False)
    assert result.returncode == 2
    assert b"grant retire: give" in result.stderr
