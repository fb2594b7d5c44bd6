"""Aliases work wherever a kmsfs command names a key, as its help says: also where the
KMS operation itself wants a key id (TagResource, ListResourceTags, UntagResource, and an
alias's TargetKeyId), the command resolves the alias first."""

from __future__ import annotations

from tests.conftest import Keyd


def test_keys_tags_accepts_an_alias(live_keyd: Keyd) -> None:
    live_keyd.kmsfs("keys", "create", "--alias", "alias/team")
    added = live_keyd.kmsfs("keys", "tags", "alias/team", "add", "owner=ops", "tier=2")
    assert added.stdout.decode().split() == ["TagKey", "TagValue", "owner", "ops", "tier", "2"]
    removed = live_keyd.kmsfs("keys", "tags", "alias/team", "remove", "tier")
    assert removed.stdout.decode().split() == ["TagKey", "TagValue", "owner", "ops"]
    listed = live_keyd.kmsfs("keys", "tags", "alias/team", "--json")
    assert b'"owner"' in listed.stdout


def test_an_alias_can_point_at_a_key_named_by_its_alias(live_keyd: Keyd) -> None:
    live_keyd.kmsfs("keys", "create", "--alias", "alias/first")
    live_keyd.kmsfs("keys", "alias", "create", "alias/second", "--key", "alias/first")
    live_keyd.kmsfs("keys", "create", "--alias", "alias/third")
    live_keyd.kmsfs("keys", "alias", "update", "alias/first", "--key", "alias/third")
    with live_keyd.client() as client:
        aliases = {
            a["AliasName"]: a["TargetKeyId"] for a in client.call("ListAliases", {})["Aliases"]
        }
    assert aliases["alias/first"] == aliases["alias/third"] != aliases["alias/second"]


def test_an_unknown_alias_is_one_line(live_keyd: Keyd) -> None:
    result = live_keyd.kmsfs("keys", "tags", "alias/nobody", check=False)
    assert result.returncode == 3
    assert result.stderr.decode().startswith("kmsfs: error: NotFoundException")
    assert len(result.stderr.splitlines()) == 1
