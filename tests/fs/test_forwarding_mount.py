"""Forwarding on the mount side (issue 17): KeyManager's per-principal caches and pools
with a fake keyd, then a real mount.

A root mount with ``-o allow_other`` forwards each request's caller to keyd (issue 17):
the key policy decides per user. A (uid 4242) may Decrypt through the mount, B (nobody)
may not: B gets EACCES on a 0666 file, also while A holds it open (the mount has the
key in memory then; it still asks keyd as B).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import pwd
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import trio
import trio.testing

from kmsfs.errors import AccessDeniedException, CorruptHeader
from kmsfs.format.header import SlotKind
from kmsfs.fs.config import FsConfig, load_config
from kmsfs.fs.keys import KeyManager
from kmsfs.kms.caller import ForwardedCaller
from kmsfs.kms.client import KMSClient
from tests.conftest import Keyd
from tests.fs.helpers import Mount, MountFactory, run_as_child
from tests.kms.users import NOBODY, needs_other_users, user_prefix

A = 4242
B = NOBODY


@pytest.fixture
def policy_mount(fs_root: Path, fs_keyd: Keyd) -> Iterator[tuple[Mount, str]]:
    """A root mount (allow_other, forwarding by default) of a cipher directory whose CMK
    root administers and only A may Decrypt with, and only through a kmsfs mount."""
    with _policy_mount(fs_root, fs_keyd) as (mount, a_arn, _key_id):
        yield mount, a_arn


@contextlib.contextmanager
def _policy_mount(
    fs_root: Path, fs_keyd: Keyd, *mount_args: str
) -> Iterator[tuple[Mount, str, str]]:
    with KMSClient(fs_keyd.socket) as client:
        account = client.call("GetCallerIdentity", {})["Account"]
        key_id = client.call("CreateKey", {})["KeyMetadata"]["KeyId"]
        a_arn = f"arn:aws:iam::{account}:user/uid-{A}"
        via_mount = {"StringEquals": {"kms:ViaService": "kmsfs-mount"}}
        statements = [
            {
                "Effect": "Allow",
                "Principal": {"AWS": f"arn:aws:iam::{account}:root"},
                "Action": "kms:*",
                "Resource": "*",
            },
            {
                "Effect": "Allow",
                "Principal": {"AWS": a_arn},
                "Action": "kms:Decrypt",
                "Resource": "*",
                "Condition": via_mount,
            },
        ]
        policy = json.dumps({"Version": "2012-10-17", "Statement": statements})
        client.call("PutKeyPolicy", {"KeyId": key_id, "Policy": policy})
    with MountFactory(fs_root, fs_keyd) as factory:
        cipher = factory.init(key=key_id)
        mount = factory.mount(cipher, None, "-o", "allow_other", *mount_args)
        os.chmod(mount.mnt, 0o755)
        yield mount, a_arn, key_id


def _open_as(uid: int, path: Path) -> object:
    def attempt() -> object:
        try:
            with open(path, "rb") as f:
                return f.read()
        except OSError as error:
            return errno.errorcode[error.errno]

    return run_as_child(attempt, uid=uid)


@needs_other_users
def test_b_is_refused_even_while_a_holds_the_file_open(
    policy_mount: tuple[Mount, str], fs_keyd: Keyd
) -> None:
    mount, a_arn = policy_mount
    shared = mount.mnt / "shared"
    shared.write_bytes(b"for A only")  # root: the mount's own key, no forwarding
    os.chmod(shared, 0o666)
    os.mkdir(mount.mnt / "tmp")
    os.chmod(mount.mnt / "tmp", 0o1777)

    assert _open_as(B, shared) == "EACCES"
    # A opens the file and keeps it open (until its stdin closes)
    holder = subprocess.Popen(
        [*user_prefix(A), sys.executable, "-c",
         "import sys; f = open(sys.argv[1], 'rb'); print(f.read().decode(), flush=True); "
         "sys.stdin.read()", str(shared)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        assert holder.stdout is not None
        line = holder.stdout.readline()
        assert line == b"for A only\n", holder.stderr.read() if holder.stderr else b""
        # the file is open (its key in the mount's memory): B is still asked about
        assert _open_as(B, shared) == "EACCES"
        assert _open_as(A, shared) == b"for A only"  # A: from A's own cached answer
    finally:
        holder.communicate(b"", timeout=60)
    assert holder.returncode == 0
    assert _open_as(B, shared) == "EACCES"
    assert _open_as(A, shared) == b"for A only"

    # B may not make data keys: creating a file is refused before it exists
    def create_as_b() -> object:
        try:
            with open(mount.mnt / "tmp" / "b-file", "wb") as f:
                f.write(b"x")
        except OSError as error:
            return errno.errorcode[error.errno]
        return "ok"

    assert run_as_child(create_as_b, uid=B) == "EACCES"
    assert not (mount.mnt / "tmp" / "b-file").exists()

    # keyd's audit: A's Decrypt through the mount names A, the mount and its filesystem
    filesystem_id = load_config(mount.cipher).filesystem_id
    out = fs_keyd.kmsfs("keyd", "audit", "tail", "--json", "-n", "500").stdout.decode()
    # (the keyd is shared with other tests: this mount's records are its filesystem's)
    records = [
        r
        for r in map(json.loads, out.splitlines())
        if ((r.get("additionalEventData") or {}).get("forwardedBy") or {}).get("filesystemId")
        == filesystem_id
    ]
    by_a = [r for r in records if r["eventName"] == "Decrypt" and r["userIdentity"].get("uid") == A]
    assert by_a and all("errorCode" not in r for r in by_a)
    assert by_a[0]["userIdentity"]["invokedBy"] == "kmsfs-mount"
    forwarded_by = by_a[0]["additionalEventData"]["forwardedBy"]
    assert forwarded_by["filesystemId"] == filesystem_id
    assert forwarded_by["pid"] == mount.process.pid  # type: ignore[union-attr]
    b_name = pwd.getpwuid(B).pw_name
    by_b = [r for r in records if r["userIdentity"].get("userName") == b_name]
    assert {r["eventName"] for r in by_b} == {"Decrypt", "GenerateDataKey"}
    assert all(r["errorCode"] == "AccessDeniedException" for r in by_b)
    # A's own answer was cached: A's opens cost fewer Decrypts than A's opens
    assert len(by_a) < 3


@needs_other_users
def test_a_grant_lets_b_in_and_its_revocation_shuts_b_out_after_the_cache_time(
    fs_root: Path, fs_keyd: Keyd
) -> None:
    with _policy_mount(fs_root, fs_keyd, "--key-cache-seconds", "1") as (mount, _a, key_id):
        shared = mount.mnt / "shared"
        shared.write_bytes(b"granted")
        os.chmod(shared, 0o644)
        assert _open_as(B, shared) == "EACCES"  # a refusal is never cached
        with KMSClient(fs_keyd.socket) as client:
            account = client.call("GetCallerIdentity", {})["Account"]
            b_arn = f"arn:aws:iam::{account}:user/{pwd.getpwuid(B).pw_name}"
            grant_id = client.call(
                "CreateGrant",
                {"KeyId": key_id, "GranteePrincipal": b_arn, "Operations": ["Decrypt"]},
            )["GrantId"]
            assert _open_as(B, shared) == b"granted"
            client.call("RevokeGrant", {"KeyId": key_id, "GrantId": grant_id})
        # B's answer is kept at most --key-cache-seconds (1 s) from when keyd gave it
        time.sleep(1.5)
        assert _open_as(B, shared) == "EACCES"


# ------------------------------------------------------- KeyManager, with a fake keyd
KEY_ARN = "arn:aws:kms:local:000000000000:key/k"
OTHER_ARN = "arn:aws:kms:local:000000000000:key/other"
FS_ID = "ab" * 16
ALICE = ForwardedCaller(1001, 1001, 11, FS_ID)
BOB = ForwardedCaller(1002, 1002, 22, FS_ID)


class FakeKeyd:
    """Answers as a key policy would: ``refused`` uids get AccessDeniedException; every
    call is logged as (operation, uid or None)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int | None]] = []
        self.refused: set[int] = set()
        self.key = b"K" * 32

    def _check(self, operation: str, on_behalf_of: ForwardedCaller | None) -> None:
        uid = None if on_behalf_of is None else on_behalf_of.uid
        self.calls.append((operation, uid))
        if uid in self.refused:
            raise AccessDeniedException(f"User uid-{uid} is not authorized")

    async def decrypt(self, wrapped: bytes, *, encryption_context, on_behalf_of=None) -> dict:
        self._check("Decrypt", on_behalf_of)
        return {"Plaintext": self.key}

    async def generate_data_key(
        self, key_id: str, *, encryption_context, on_behalf_of=None
    ) -> dict:
        self._check("GenerateDataKey", on_behalf_of)
        return {
            "Plaintext": os.urandom(32),
            "CiphertextBlob": b"w" + os.urandom(8),
            "KeyId": key_id,
        }


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _header() -> SimpleNamespace:
    return SimpleNamespace(
        file_id=b"f" * 16,
        active_slot=SimpleNamespace(wrapped_key=b"wrapped", kind=SlotKind.KMS_BLOB),
        full_context={},
    )


def _manager(keyd: FakeKeyd, clock: Clock, **kwargs: object) -> KeyManager:
    config = FsConfig(filesystem_id=FS_ID, key_arn=KEY_ARN)
    return KeyManager(keyd, config, cache_seconds=60, clock=clock, **kwargs)  # type: ignore[arg-type]


def test_an_unwrapped_key_is_reused_only_for_its_own_principal() -> None:
    keyd, clock = FakeKeyd(), Clock()
    keys = _manager(keyd, clock)
    header = _header()

    async def main() -> None:
        assert await keys.unwrap(header, ALICE) == keyd.key
        assert await keys.unwrap(header, ALICE) == keyd.key  # alice's cached answer
        assert keyd.calls == [("Decrypt", ALICE.uid)]
        keyd.refused.add(BOB.uid)
        with pytest.raises(AccessDeniedException):  # alice's answer is not bob's
            await keys.unwrap(header, BOB)
        with pytest.raises(AccessDeniedException):  # held open by alice: still asked
            await keys.check_access(header, keyd.key, BOB)
        assert keyd.calls[1:] == [("Decrypt", BOB.uid)] * 2
        # the mount itself: its own cache (remember, after a close) and no forwarding
        assert await keys.unwrap(header) == keyd.key
        assert keyd.calls[-1] == ("Decrypt", None)
        # a key that differs from the one held is refused, not used
        keyd.refused.clear()
        with pytest.raises(CorruptHeader):
            await keys.check_access(header, b"X" * 32, BOB)

    trio.run(main)


def test_a_forwarded_answer_expires_cache_seconds_after_keyd_gave_it() -> None:
    keyd, clock = FakeKeyd(), Clock()
    keys = _manager(keyd, clock)
    header = _header()

    async def main() -> None:
        await keys.unwrap(header, ALICE)
        clock.now += 59
        await keys.check_access(header, keyd.key, ALICE)  # within the minute: cached
        assert keyd.calls == [("Decrypt", ALICE.uid)]
        keyd.refused.add(ALICE.uid)  # alice's grant revoked
        clock.now += 1
        with pytest.raises(AccessDeniedException):  # 60 s after keyd answered: asked again
            await keys.check_access(header, keyd.key, ALICE)
        assert keyd.calls == [("Decrypt", ALICE.uid)] * 2

    trio.run(main)


def test_a_pooled_key_is_taken_without_a_checkpoint() -> None:
    """KeyManager.pooled_file_key (a new file's first write without the node's lock):
    what new_file_key would answer from the pool alone, taken with no await at all."""
    keyd, clock = FakeKeyd(), Clock()
    keys = _manager(keyd, clock, pool_size=2)

    async def main() -> None:
        assert keys.pooled_file_key() is None  # nothing made yet, and keyd not asked
        assert keyd.calls == []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(keys.run)
            await trio.testing.wait_all_tasks_blocked()
            with trio.testing.assert_no_checkpoints():
                first = keys.pooled_file_key()
                second = keys.pooled_file_key()
                assert keys.pooled_file_key() is None  # two made, two taken
                assert keys.pooled_file_key(caller=ALICE) is None  # never another's
            assert first is not None and second is not None
            assert first.file_id != second.file_id
            await trio.testing.wait_all_tasks_blocked()  # taking them asked for more
            assert keys.pooled_file_key() is not None
            mine = [call for call in keyd.calls if call[1] is None]
            assert mine == [("GenerateDataKey", None)] * 4
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_pools_per_principal_and_key_made_as_that_principal_dropped_when_idle() -> None:
    keyd, clock = FakeKeyd(), Clock()
    keys = _manager(keyd, clock, pool_size=2)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(keys.run)
            await trio.testing.wait_all_tasks_blocked()
            assert keyd.calls == [("GenerateDataKey", None)] * 2  # the mount's own pool
            keyd.calls.clear()
            first = await keys.new_file_key(caller=ALICE)  # alice's first create: keyd
            assert keyd.calls[0] == ("GenerateDataKey", ALICE.uid)
            await trio.testing.wait_all_tasks_blocked()
            # alice's pool filled as alice; the mount's own untouched
            assert keyd.calls == [("GenerateDataKey", ALICE.uid)] * 3
            keyd.calls.clear()
            second = await keys.new_file_key(caller=ALICE)  # from alice's pool
            assert keyd.calls == [] and second.file_id != first.file_id
            keyd.refused.add(BOB.uid)
            with pytest.raises(AccessDeniedException):  # never from alice's pool
                await keys.new_file_key(caller=BOB)
            await trio.testing.wait_all_tasks_blocked()
            # refused: bob's pool is not refilled in the background (one refusal only)
            assert [call for call in keyd.calls if call[1] == BOB.uid] == [
                ("GenerateDataKey", BOB.uid)
            ]
            # a pool per CMK too
            other = await keys.new_file_key(OTHER_ARN, caller=ALICE)
            assert other.key_arn == OTHER_ARN
            assert (ALICE.uid, OTHER_ARN) in keys._pools
            # idle for cache_seconds: a user's pools go, the mount's stays
            clock.now += 61
            keys.drop_idle_pools()
            assert set(keys._pools) == {(None, KEY_ARN)}
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_fstab_options_turn_forwarding_on_and_off() -> None:
    from kmsfs.fs.fstab import apply_options, parse_options
    from kmsfs.fs.mount import MountOptions

    assert MountOptions().forward_callers is None  # the default: root on keyd forwards
    off = apply_options(parse_options(["allow_other,no_forward_callers"]), MountOptions())
    assert off.forward_callers is False and off.allow_other
    on = apply_options(parse_options(["forward_callers"]), MountOptions(forward_callers=False))
    assert on.forward_callers is True


def test_only_a_mount_others_can_use_forwards() -> None:
    """Without allow_other the kernel lets only the mounting user in, the mount's own
    principal: nothing to forward (and nothing to pay for it, see
    MountKeyBindings.uncached); AWS KMS never takes a forwarded identity."""
    from kmsfs.fs.keyservice import KeyService
    from kmsfs.fs.mount import MountError, MountOptions, _forwards_callers

    keyd, aws = KeyService("keyd"), KeyService("aws")
    assert _forwards_callers(MountOptions(allow_other=True), keyd) == (os.geteuid() == 0)
    assert _forwards_callers(MountOptions(allow_other=True, forward_callers=True), keyd)
    assert not _forwards_callers(MountOptions(forward_callers=True), keyd)
    assert not _forwards_callers(MountOptions(allow_other=True), aws)
    with pytest.raises(MountError):
        _forwards_callers(MountOptions(allow_other=True, forward_callers=True), aws)
