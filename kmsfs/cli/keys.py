"""``kmsfs keys ...``: manage and use the keys in keyd (AWS KMS operations by name)."""

from __future__ import annotations

import argparse
import pwd
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kmsfs.cli.common import (
    client_options,
    context_option,
    parse_pairs,
    print_json,
    print_record,
    print_table,
    when,
)
from kmsfs.errors import UsageError


# ---------------------------------------------------------------------- keys
def _client(args: argparse.Namespace):
    from kmsfs.kms.client import KMSClient

    return KMSClient(args.keyd_socket)


def _all_pages(client, operation: str, params: dict[str, Any], field: str) -> list[Any]:
    items: list[Any] = []
    marker = None
    while True:
        page = client.call(operation, {**params, **({"Marker": marker} if marker else {})})
        items += page.get(field, [])
        marker = page.get("NextMarker")
        if not page.get("Truncated") or not marker:
            return items


def _is_alias(name: str) -> bool:
    """``alias/NAME`` or an alias ARN (``arn:aws:kms:REGION:ACCOUNT:alias/NAME``)."""
    return name.startswith("alias/") or (name.startswith("arn:") and ":alias/" in name)


def _key_id(client, name: str) -> str:
    """The key id ``name`` stands for. AWS KMS's TagResource, UntagResource,
    ListResourceTags and an alias's TargetKeyId take only a key id or key ARN; our
    commands accept an alias wherever a key is named, so it is resolved here first
    (DescribeKey, as the aws CLI user would)."""
    if not _is_alias(name):
        return name
    return client.call("DescribeKey", {"KeyId": name})["KeyMetadata"]["KeyId"]


def _key_row(metadata: dict[str, Any], aliases: list[str]) -> dict[str, Any]:
    return {
        "KeyId": metadata["KeyId"],
        "State": metadata["KeyState"],
        "Aliases": ",".join(aliases) or "-",
        "Created": when(metadata.get("CreationDate")),
        "Description": metadata.get("Description") or "",
    }


def cmd_keys_create(args: argparse.Namespace) -> None:
    tags = [{"TagKey": k, "TagValue": v} for k, v in parse_pairs(args.tag, "--tag").items()]
    params: dict[str, Any] = {"Description": args.description or ""}
    if args.spec:
        params["KeySpec"] = args.spec
    if args.usage:
        params["KeyUsage"] = args.usage
    if tags:
        params["Tags"] = tags
    if getattr(args, "origin", None):
        params["Origin"] = args.origin
    if getattr(args, "key_id", None):
        params["KeyId"] = args.key_id  # kmsfs's own member (kmsfs/kms/byok.py)
    with _client(args) as client:
        metadata = client.call("CreateKey", params)["KeyMetadata"]
        if args.alias:
            client.call("CreateAlias", {"AliasName": args.alias, "TargetKeyId": metadata["KeyId"]})
    if args.json:
        print_json({"KeyMetadata": metadata, "Alias": args.alias})
    else:
        print_record(
            {
                "KeyId": metadata["KeyId"],
                "Arn": metadata["Arn"],
                "Alias": args.alias or "-",
                "State": metadata["KeyState"],
                "KeySpec": metadata.get("KeySpec", "-"),
                "KeyUsage": metadata.get("KeyUsage", "-"),
            }
        )


def cmd_keys_public_key(args: argparse.Namespace) -> None:
    """GetPublicKey: the DER SubjectPublicKeyInfo keyd returns, as PEM (default) or DER."""
    import base64

    from kmsfs.cli.tools import output_file

    with _client(args) as client:
        response = client.call("GetPublicKey", {"KeyId": args.key})
    der = base64.b64decode(response["PublicKey"])
    if args.der:
        data = der
    else:
        lines = base64.encodebytes(der).decode("ascii").replace("\n", "")
        body = "\n".join(lines[i : i + 64] for i in range(0, len(lines), 64))
        data = f"-----BEGIN PUBLIC KEY-----\n{body}\n-----END PUBLIC KEY-----\n".encode()
    with output_file(args.output or "-", force=args.force) as stream:
        stream.write(data)


def cmd_keys_list(args: argparse.Namespace) -> None:
    with _client(args) as client:
        keys = _all_pages(client, "ListKeys", {}, "Keys")
        aliases = _all_pages(client, "ListAliases", {}, "Aliases")
        described = [client.call("DescribeKey", {"KeyId": k["KeyId"]})["KeyMetadata"] for k in keys]
    by_key: dict[str, list[str]] = {}
    for alias in aliases:
        by_key.setdefault(alias.get("TargetKeyId", ""), []).append(alias["AliasName"])
    if args.json:
        print_json([{**m, "Aliases": by_key.get(m["KeyId"], [])} for m in described])
        return
    rows = [_key_row(m, by_key.get(m["KeyId"], [])) for m in described]
    print_table(rows, ["KeyId", "State", "Aliases", "Created", "Description"])


def cmd_keys_describe(args: argparse.Namespace) -> None:
    with _client(args) as client:
        metadata = client.call("DescribeKey", {"KeyId": args.key})["KeyMetadata"]
        rotation = None
        if metadata["KeyState"] != "PendingDeletion":
            rotation = client.call("GetKeyRotationStatus", {"KeyId": metadata["KeyId"]})
        aliases = _all_pages(client, "ListAliases", {"KeyId": metadata["KeyId"]}, "Aliases")
        tags = _all_pages(client, "ListResourceTags", {"KeyId": metadata["KeyId"]}, "Tags")
    if args.json:
        print_json(
            {
                "KeyMetadata": metadata,
                "Rotation": rotation,
                "Aliases": [a["AliasName"] for a in aliases],
                "Tags": tags,
            }
        )
        return
    record: dict[str, Any] = {
        "KeyId": metadata["KeyId"],
        "Arn": metadata["Arn"],
        "State": metadata["KeyState"],
        "Description": metadata.get("Description") or "-",
        "KeySpec": metadata["KeySpec"],
        "KeyUsage": metadata["KeyUsage"],
        "Created": when(metadata.get("CreationDate")),
        "Aliases": [a["AliasName"] for a in aliases],
        "Tags": [f"{t['TagKey']}={t['TagValue']}" for t in tags],
    }
    if metadata.get("DeletionDate"):
        record["DeletionDate"] = when(metadata["DeletionDate"])
    if rotation is not None:
        record["Rotation"] = (
            f"every {rotation['RotationPeriodInDays']} days, next "
            f"{when(rotation.get('NextRotationDate'))}"
            if rotation["KeyRotationEnabled"]
            else "off"
        )
    print_record(record)


def _simple(operation: str, done: str) -> Callable[[argparse.Namespace], None]:
    """A keys subcommand that sends one KeyId-only request and prints what it did."""

    def command(args: argparse.Namespace) -> None:
        with _client(args) as client:
            response = client.call(operation, {"KeyId": args.key})
        if args.json:
            print_json(response)
        else:
            print(f"{args.key}: {done}")

    return command


def cmd_keys_schedule_deletion(args: argparse.Namespace) -> None:
    with _client(args) as client:
        response = client.call(
            "ScheduleKeyDeletion", {"KeyId": args.key, "PendingWindowInDays": args.days}
        )
    if args.json:
        print_json(response)
    else:
        print(
            f"{response['KeyId']}: pending deletion, destroyed at {when(response['DeletionDate'])}"
        )


def cmd_keys_rotation(args: argparse.Namespace) -> None:
    with _client(args) as client:
        if args.action == "enable":
            params: dict[str, Any] = {"KeyId": args.key}
            if args.days:
                params["RotationPeriodInDays"] = args.days
            client.call("EnableKeyRotation", params)
        elif args.action == "disable":
            client.call("DisableKeyRotation", {"KeyId": args.key})
        status = client.call("GetKeyRotationStatus", {"KeyId": args.key})
        rotations = _all_pages(client, "ListKeyRotations", {"KeyId": args.key}, "Rotations")
    if args.json:
        print_json({**status, "Rotations": rotations})
        return
    print_record(
        {
            "KeyId": status["KeyId"],
            "AutomaticRotation": "on" if status["KeyRotationEnabled"] else "off",
            "PeriodDays": status.get("RotationPeriodInDays", "-"),
            "NextRotation": when(status.get("NextRotationDate")),
            "Rotations": len(rotations),
        }
    )
    if rotations:
        print()
        print_table(
            [{"Date": when(r["RotationDate"]), "Type": r["RotationType"]} for r in rotations],
            ["Date", "Type"],
        )


def _read_stdin_limited(limit: int, what: str) -> bytes:
    data = sys.stdin.buffer.read(limit + 1)
    if len(data) > limit:
        raise UsageError(f"{what} is larger than {limit} bytes")
    if not data:
        raise UsageError(f"{what} is empty")
    return data


def cmd_keys_encrypt(args: argparse.Namespace) -> None:
    from kmsfs.kms.service import MAX_PLAINTEXT

    plaintext = _read_stdin_limited(MAX_PLAINTEXT, "the plaintext on standard input")
    context = parse_pairs(args.context, "--context")
    with _client(args) as client:
        response = client.encrypt(args.key, plaintext, encryption_context=context)
    sys.stdout.buffer.write(response["CiphertextBlob"])
    sys.stdout.buffer.flush()


def cmd_keys_decrypt(args: argparse.Namespace) -> None:
    from kmsfs.kms.service import MAX_CIPHERTEXT

    blob = _read_stdin_limited(MAX_CIPHERTEXT, "the ciphertext on standard input")
    context = parse_pairs(args.context, "--context")
    with _client(args) as client:
        response = client.decrypt(blob, encryption_context=context, key_id=args.key)
    sys.stdout.buffer.write(response["Plaintext"])
    sys.stdout.buffer.flush()


def _check_alias_args(args: argparse.Namespace) -> str | None:
    """A usage error (printed with the usage line) before anything is sent."""
    if args.action != "list" and not args.name:
        return "alias create/update/delete need an alias name"
    return None


def cmd_alias(args: argparse.Namespace) -> None:
    with _client(args) as client:
        if args.action == "list":
            aliases = _all_pages(client, "ListAliases", {}, "Aliases")
            if args.json:
                print_json(aliases)
            else:
                print_table(aliases, ["AliasName", "TargetKeyId"])
            return
        if args.action in ("create", "update"):
            if not args.key:
                raise UsageError(f"alias {args.action} needs --key")
            operation = "CreateAlias" if args.action == "create" else "UpdateAlias"
            target = _key_id(client, args.key)
            client.call(operation, {"AliasName": args.name, "TargetKeyId": target})
        else:
            client.call("DeleteAlias", {"AliasName": args.name})
    print(f"{args.name}: {args.action}d")


def cmd_tags(args: argparse.Namespace) -> None:
    pairs = parse_pairs(args.pairs, "a tag") if args.action == "add" else {}
    with _client(args) as client:
        key_id = _key_id(client, args.key)
        if args.action == "add":
            tags = [{"TagKey": k, "TagValue": v} for k, v in pairs.items()]
            client.call("TagResource", {"KeyId": key_id, "Tags": tags})
        elif args.action == "remove":
            client.call("UntagResource", {"KeyId": key_id, "TagKeys": args.pairs})
        tags = _all_pages(client, "ListResourceTags", {"KeyId": key_id}, "Tags")
    if args.json:
        print_json(tags)
    else:
        print_table(tags, ["TagKey", "TagValue"])


def cmd_policy(args: argparse.Namespace) -> None:
    """``keys policy get KEY`` prints the key policy; ``keys policy put KEY --file F|-``
    replaces it (PutKeyPolicy: validated by keyd, with AWS's lockout safety check)."""
    with _client(args) as client:
        key_id = _key_id(client, args.key)  # Get/PutKeyPolicy take a key id or ARN only
        if args.action == "get":
            policy = client.call("GetKeyPolicy", {"KeyId": key_id, "PolicyName": "default"})
            print(policy["Policy"])
            return
        if args.file is None:
            raise UsageError("keys policy put: name the policy with --file FILE (- for stdin)")
        text = sys.stdin.read() if args.file == "-" else Path(args.file).read_text()
        params: dict[str, Any] = {"KeyId": key_id, "PolicyName": "default", "Policy": text}
        if args.bypass_lockout_check:
            params["BypassPolicyLockoutSafetyCheck"] = True
        client.call("PutKeyPolicy", params)
    print(f"{args.key}: key policy replaced")


# -------------------------------------------------------------------- grants
def principal_arn(user: str, account: str) -> str:
    """The principal ARN keyd uses for *user*: a login name, a uid or an ARN (kept as
    given). uid 0 / root is the account root (``arn:aws:iam::ACCOUNT:root``); another
    uid is ``...:user/<login name>``, or ``...:user/uid-<n>`` when it has no name, as
    keyd names callers (kmsfs.kms.principal)."""
    if user.startswith("arn:"):
        return user
    if user.isdigit():
        uid = int(user)
        try:
            name = pwd.getpwuid(uid).pw_name
        except KeyError:
            name = f"uid-{uid}"
    else:
        try:
            uid = pwd.getpwnam(user).pw_uid
        except KeyError:
            raise UsageError(
                f"no user named {user!r} (give a login name, a uid or an ARN)"
            ) from None
        name = user
    if uid == 0:
        return f"arn:aws:iam::{account}:root"
    return f"arn:aws:iam::{account}:user/{name}"


def parse_operations(text: str) -> list[str]:
    """``Decrypt,GenerateDataKey`` -> the Operations list (keyd checks the names)."""
    operations = [item.strip() for item in text.split(",") if item.strip()]
    if not operations:
        raise UsageError("--operations needs at least one operation, e.g. Decrypt")
    return operations


def _account(client) -> str:
    return client.call("GetCallerIdentity", {})["Account"]


def _check_grant_args(args: argparse.Namespace) -> str | None:
    """A usage error (printed with the usage line) before anything is sent."""
    if args.grant_command == "retire":
        if args.token is not None and (args.key or args.grant_id):
            return "grant retire: give either --token or KEY GRANT_ID, not both"
        if args.token is None and not (args.key and args.grant_id):
            return "grant retire: give --token TOKEN, or KEY and GRANT_ID"
    return None


def cmd_grant_create(args: argparse.Namespace) -> None:
    operations = parse_operations(args.operations)
    subset = parse_pairs(args.context_subset, "--context-subset")
    equals = parse_pairs(args.context_equals, "--context-equals")
    with _client(args) as client:
        account = _account(client)
        params: dict[str, Any] = {
            "KeyId": _key_id(client, args.key),  # CreateGrant takes no alias
            "GranteePrincipal": principal_arn(args.grantee, account),
            "Operations": operations,
        }
        if args.retiring:
            params["RetiringPrincipal"] = principal_arn(args.retiring, account)
        if args.name:
            params["Name"] = args.name
        constraints: dict[str, dict[str, str]] = {}
        if subset:
            constraints["EncryptionContextSubset"] = subset
        if equals:
            constraints["EncryptionContextEquals"] = equals
        if constraints:
            params["Constraints"] = constraints
        response = client.call("CreateGrant", params)
    if args.json:
        print_json(response)
    else:
        print_record({"GrantId": response["GrantId"], "GrantToken": response["GrantToken"]})


def _constraints_text(entry: dict[str, Any]) -> str:
    constraints = entry.get("Constraints") or {}
    parts = []
    for kind, label in (
        ("EncryptionContextEquals", "equals:"),
        ("EncryptionContextSubset", "subset:"),
    ):
        pairs = constraints.get(kind)
        if pairs:
            parts.append(label + ",".join(f"{k}={v}" for k, v in sorted(pairs.items())))
    return " ".join(parts) or "-"


def cmd_grant_list(args: argparse.Namespace) -> None:
    with _client(args) as client:
        entries = _all_pages(client, "ListGrants", {"KeyId": _key_id(client, args.key)}, "Grants")
    if args.json:
        print_json(entries)
        return
    rows = [
        {
            "GrantId": entry["GrantId"],
            "Grantee": entry["GranteePrincipal"],
            "Operations": ",".join(entry["Operations"]),
            "Context": _constraints_text(entry),
            "Retiring": entry.get("RetiringPrincipal") or "-",
            "Name": entry.get("Name") or "-",
            "Created": when(entry.get("CreationDate")),
        }
        for entry in entries
    ]
    print_table(
        rows, ["GrantId", "Grantee", "Operations", "Context", "Retiring", "Name", "Created"]
    )


def cmd_grant_retire(args: argparse.Namespace) -> None:
    with _client(args) as client:
        if args.token is not None:
            client.call("RetireGrant", {"GrantToken": args.token})
        else:
            key_id = _key_id(client, args.key)
            client.call("RetireGrant", {"KeyId": key_id, "GrantId": args.grant_id})
    print("grant retired")


def cmd_grant_revoke(args: argparse.Namespace) -> None:
    with _client(args) as client:
        client.call("RevokeGrant", {"KeyId": _key_id(client, args.key), "GrantId": args.grant_id})
    print(f"{args.grant_id}: revoked")


def _add_grant_parsers(keys: argparse._SubParsersAction) -> None:
    grant = keys.add_parser(
        "grant", help="grants: let another user use a key (create/list/retire/revoke)"
    ).add_subparsers(dest="grant_command", required=True, metavar="ACTION")
    user_help = "a login name, a uid or a principal ARN"

    create = grant.add_parser("create", help="create a grant (prints GrantId and GrantToken)")
    client_options(create)
    create.add_argument("key", help="key id, key ARN or alias/NAME")
    create.add_argument("--grantee", required=True, metavar="USER", help=f"who: {user_help}")
    create.add_argument(
        "--operations",
        required=True,
        metavar="OP,OP",
        help="grant operations, comma-separated (Decrypt, Encrypt, GenerateDataKey, "
        "GenerateDataKeyWithoutPlaintext, ReEncryptFrom, ReEncryptTo, DescribeKey, "
        "CreateGrant, RetireGrant, ...)",
    )
    create.add_argument("--retiring", metavar="USER", help=f"who may retire it: {user_help}")
    create.add_argument("--name", help="a name: the same name and parameters give the same grant")
    create.add_argument(
        "--context-subset",
        action="append",
        metavar="KEY=VALUE",
        help="allow only requests whose encryption context includes this pair (repeatable)",
    )
    create.add_argument(
        "--context-equals",
        action="append",
        metavar="KEY=VALUE",
        help="allow only requests whose encryption context is exactly these pairs (repeatable)",
    )
    create.set_defaults(func=cmd_grant_create)

    listing = grant.add_parser("list", help="list a key's grants")
    client_options(listing)
    listing.add_argument("key", help="key id, key ARN or alias/NAME")
    listing.set_defaults(func=cmd_grant_list)

    retire = grant.add_parser(
        "retire", help="retire a grant (its retiring principal, or its grantee if allowed)"
    )
    client_options(retire)
    retire.add_argument("key", nargs="?", help="key id, key ARN or alias/NAME")
    retire.add_argument("grant_id", nargs="?", help="the grant id")
    retire.add_argument("--token", help="the grant token instead of KEY GRANT_ID")
    retire.set_defaults(func=cmd_grant_retire, check_args=_check_grant_args)

    revoke = grant.add_parser("revoke", help="revoke a grant (needs kms:RevokeGrant on the key)")
    client_options(revoke)
    revoke.add_argument("key", help="key id, key ARN or alias/NAME")
    revoke.add_argument("grant_id", help="the grant id")
    revoke.set_defaults(func=cmd_grant_revoke)


# -------------------------------------------------------------------- parser
def add_parsers(commands: argparse._SubParsersAction) -> None:
    keys = commands.add_parser("keys", help="manage and use keys in keyd").add_subparsers(
        dest="keys_command", required=True, metavar="SUBCOMMAND"
    )

    def key_command(
        name: str,
        help_text: str,
        func: Callable[[argparse.Namespace], None],
        *,
        positional_key: bool = True,
    ) -> argparse.ArgumentParser:
        sub = keys.add_parser(name, help=help_text)
        client_options(sub)
        if positional_key:
            sub.add_argument("key", help="key id, key ARN or alias/NAME")
        sub.set_defaults(func=func)
        return sub

    create = key_command("create", "create a key", cmd_keys_create, positional_key=False)
    create.add_argument("--alias", help="also create this alias (alias/NAME)")
    create.add_argument("--description", default="", help="free text")
    create.add_argument("--tag", action="append", metavar="KEY=VALUE", help="add a tag")
    create.add_argument(
        "--spec",
        metavar="KEY_SPEC",
        help="AWS KeySpec: SYMMETRIC_DEFAULT (default), RSA_2048/3072/4096, ECC_NIST_P256/"
        "P384/P521, ECC_SECG_P256K1, HMAC_224/256/384/512",
    )
    create.add_argument(
        "--usage",
        metavar="KEY_USAGE",
        help="AWS KeyUsage: ENCRYPT_DECRYPT (default), SIGN_VERIFY, GENERATE_VERIFY_MAC, "
        "KEY_AGREEMENT",
    )
    from kmsfs.cli import keys_import

    keys_import.add_create_options(create)
    key_command("list", "list keys", cmd_keys_list, positional_key=False)
    key_command("describe", "show one key", cmd_keys_describe)
    public_key = key_command(
        "public-key",
        "export an asymmetric key's public key (GetPublicKey), PEM unless --der",
        cmd_keys_public_key,
    )
    public_format = public_key.add_mutually_exclusive_group()
    public_format.add_argument("--pem", action="store_true", help="PEM (the default)")
    public_format.add_argument("--der", action="store_true", help="DER SubjectPublicKeyInfo")
    public_key.add_argument("-o", "--output", metavar="FILE", help="write here (default stdout)")
    public_key.add_argument("-f", "--force", action="store_true", help="replace FILE if it exists")
    key_command("enable", "enable a key", _simple("EnableKey", "enabled"))
    key_command("disable", "disable a key", _simple("DisableKey", "disabled"))
    key_command("rotate", "rotate now (new key version)", _simple("RotateKeyOnDemand", "rotated"))
    rotation = key_command(
        "rotation", "automatic rotation: status/enable/disable", cmd_keys_rotation
    )
    rotation.add_argument(
        "action", nargs="?", default="status", choices=["status", "enable", "disable"]
    )
    rotation.add_argument("--days", type=int, help="rotation period (90-2560)")
    schedule = key_command(
        "schedule-deletion", "destroy after a waiting period", cmd_keys_schedule_deletion
    )
    schedule.add_argument("--days", type=int, default=30, help="waiting period, 7-30 (30)")
    key_command(
        "cancel-deletion",
        "cancel a scheduled deletion (key stays disabled)",
        _simple("CancelKeyDeletion", "deletion cancelled, key is Disabled"),
    )
    encrypt = key_command(
        "encrypt", "encrypt stdin (<= 4096 bytes) to stdout", cmd_keys_encrypt, positional_key=False
    )
    encrypt.add_argument("--key", required=True, help="key id, ARN or alias")
    context_option(encrypt, "encryption context pair (repeatable)")
    decrypt = key_command(
        "decrypt", "decrypt stdin to stdout", cmd_keys_decrypt, positional_key=False
    )
    decrypt.add_argument("--key", help="require this key")
    context_option(decrypt, "encryption context pair (repeatable)")
    alias = keys.add_parser("alias", help="create/update/delete/list aliases")
    client_options(alias)
    alias.add_argument("action", choices=["create", "update", "delete", "list"])
    alias.add_argument("name", nargs="?", help="alias/NAME")
    alias.add_argument("--key", help="target key: key id, ARN or alias/NAME")
    alias.set_defaults(func=cmd_alias, check_args=_check_alias_args)
    policy = key_command(
        "policy", "show (get) or replace (put) the key policy", cmd_policy, positional_key=False
    )
    policy.add_argument("action", choices=["get", "put"])
    policy.add_argument("key", help="key id, key ARN or alias/NAME")
    policy.add_argument("--file", help="put: the policy document (JSON), - for stdin")
    policy.add_argument(
        "--bypass-lockout-check",
        action="store_true",
        help="put: allow a policy that stops you from changing it again "
        "(AWS's BypassPolicyLockoutSafetyCheck)",
    )
    _add_grant_parsers(keys)
    tags = key_command("tags", "list/add/remove tags", cmd_tags)
    tags.add_argument("action", nargs="?", default="list", choices=["list", "add", "remove"])
    tags.add_argument("pairs", nargs="*", help="KEY=VALUE to add, or KEY to remove")
    keys_import.add_parsers(key_command)
