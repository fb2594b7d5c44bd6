"""``kmsfs whoami``: who keyd takes you for (its GetCallerIdentity operation)."""

from __future__ import annotations

import argparse

from kmsfs.cli.common import client_options, print_json, print_record


def cmd_whoami(args: argparse.Namespace) -> None:
    from kmsfs.kms.client import KMSClient

    with KMSClient(args.keyd_socket) as client:
        identity = client.call("GetCallerIdentity", {})
    if args.json:
        print_json(identity)
        return
    print_record(
        {
            "arn": identity.get("Arn"),
            "user": identity.get("UserName"),
            "uid": identity.get("UserId"),
            "groups": identity.get("Groups") or [],
            "account": identity.get("Account"),
            "executable": identity.get("Executable") or "-",
        }
    )


def add_parsers(commands: argparse._SubParsersAction) -> None:
    whoami = commands.add_parser(
        "whoami",
        help="show your principal as keyd sees it (ARN, user, uid, groups, account)",
    )
    client_options(whoami)
    whoami.set_defaults(func=cmd_whoami)
