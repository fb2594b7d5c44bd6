"""The ``aws`` key service pointed at keyd's TCP endpoint (TLS + SigV4): the same code
path as real AWS KMS (botocore signs, keyd verifies and enforces its key policies), with
a keyd that refuses a disabled key as AWS does (moto does not)."""

from __future__ import annotations

import errno
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import Keyd, run_kmsfs
from tests.fs.helpers import CHUNK, MountFactory, drop_page_cache
from tests.kms.tcp_keyd import TcpKeyd, start_tcp_keyd


@pytest.fixture
def tls_keyd(keyd_factory: Callable[..., Keyd], monkeypatch: pytest.MonkeyPatch) -> TcpKeyd:
    """keyd over HTTPS on loopback; this process's environment holds the access key,
    the CA bundle and the endpoint (as a host's administrator would set them)."""
    instance = start_tcp_keyd(keyd_factory, tls=True)
    for name in [name for name in os.environ if name.startswith("AWS_")]:
        monkeypatch.delenv(name)
    for name, value in instance.aws_env(base={}).items():
        monkeypatch.setenv(name, value)
    return instance


def errno_of(function, *args) -> int:
    with pytest.raises(OSError) as caught:
        function(*args)
    return caught.value.errno


def test_aws_service_on_keyd_tcp_mount_refusal_and_tools(
    tls_keyd: TcpKeyd, fs_root: Path, mounts: MountFactory, short_tmp: Path
) -> None:
    client = tls_keyd.client()
    key = client.create_key(Description="kmsfs over TCP")["KeyMetadata"]
    cipher = fs_root / f"aws-keyd-{os.urandom(3).hex()}"
    run_kmsfs("init", str(cipher), "--key", key["Arn"], "--aws-endpoint-url", tls_keyd.url)
    document = json.loads((cipher / "kmsfs.conf").read_text())
    assert document["key_service"]["endpoint_url"] == tls_keyd.url
    assert document["key_service"]["region"] == "local"
    assert tls_keyd.secret not in (cipher / "kmsfs.conf").read_text()

    mount = mounts.mount(cipher, None, "--key-cache-seconds", "1")
    content = os.urandom(2 * CHUNK + 7)
    (mount.mnt / "f").write_bytes(content)
    mount.remount("--key-cache-seconds", "1")
    drop_page_cache(mount.mnt / "f")
    assert (mount.mnt / "f").read_bytes() == content
    assert f"KMS endpoint {tls_keyd.url}" in mount.log()

    # keyd refuses a disabled key (DisabledException): EACCES, as with keyd's socket
    client.disable_key(KeyId=key["KeyId"])
    time.sleep(2.5)  # past the key cache and the key pool's lifetime
    assert errno_of((mount.mnt / "f").read_bytes) == errno.EACCES
    assert mount.alive, mount.log()
    client.enable_key(KeyId=key["KeyId"])
    assert (mount.mnt / "f").read_bytes() == content
    mount.unmount_clean()

    assert b"no problems found" in run_kmsfs("fsck", str(cipher), "--verify").stdout
    out = short_tmp / "f.out"
    run_kmsfs("decrypt", "--cipherdir", str(cipher), "f", str(out))
    assert out.read_bytes() == content


def test_init_picks_aws_for_an_arn_keyd_does_not_know(
    tls_keyd: TcpKeyd, fs_root: Path, fs_keyd: Keyd
) -> None:
    """``kmsfs init --key ARN`` with no --aws-* option: a key of the local keyd stays
    keyd's; an ARN that keyd does not know is AWS's (here: the TCP keyd, reached through
    $AWS_ENDPOINT_URL_KMS), and kmsfs.conf records no endpoint (the user's own)."""
    foreign = tls_keyd.client().create_key()["KeyMetadata"]["Arn"]
    local = fs_keyd.kmsfs("keys", "describe", "alias/fs", "--json")
    local_arn = json.loads(local.stdout)["KeyMetadata"]["Arn"]
    env = {**os.environ, "KMSFS_KEYD_SOCKET": str(fs_keyd.socket)}

    ours = fs_root / f"init-local-{os.urandom(3).hex()}"
    run_kmsfs("init", str(ours), "--key", local_arn, env=env)
    assert "key_service" not in json.loads((ours / "kmsfs.conf").read_text())

    theirs = fs_root / f"init-aws-{os.urandom(3).hex()}"
    run_kmsfs("init", str(theirs), "--key", foreign, env=env)
    document = json.loads((theirs / "kmsfs.conf").read_text())
    assert document["key_arn"] == foreign
    assert document["key_service"] == {
        "type": "aws",
        "region": "local",
        "endpoint_url": None,
        "profile": None,
    }
    assert run_kmsfs("ls", str(theirs), env=env).returncode == 0


@dataclass
class _Host:
    """What the mount helper needs of a keyd: here, another host's environment."""

    socket: Path
    env: dict[str, str]


def test_each_host_mounts_with_its_own_credentials(
    tls_keyd: TcpKeyd, fs_root: Path, mounts: MountFactory
) -> None:
    """Host A (alice) makes the cipher directory; host B (bob, its own access key) is
    refused until the key policy names bob, then reads A's files and writes its own."""
    alice = tls_keyd.client()
    key = alice.create_key(Description="shared")["KeyMetadata"]
    cipher = fs_root / f"aws-hosts-{os.urandom(3).hex()}"
    run_kmsfs("init", str(cipher), "--key", key["Arn"], "--aws-endpoint-url", tls_keyd.url)
    host_a = mounts.mount(cipher, None)
    (host_a.mnt / "from-a").write_bytes(b"written on host A")
    host_a.unmount_clean()  # one writer at a time

    bob_key_id, bob_secret = tls_keyd.create_credentials("bob")
    host_b = _Host(
        tls_keyd.keyd.socket,
        {**os.environ, "AWS_ACCESS_KEY_ID": bob_key_id, "AWS_SECRET_ACCESS_KEY": bob_secret},
    )
    with pytest.raises(AssertionError, match="refused the filesystem's key"):
        mounts.mount(cipher, None, keyd=host_b)

    policy = json.loads(alice.get_key_policy(KeyId=key["KeyId"], PolicyName="default")["Policy"])
    account = key["Arn"].split(":")[4]
    policy["Statement"].append(
        {
            "Sid": "HostB",
            "Effect": "Allow",
            "Principal": {"AWS": f"arn:aws:iam::{account}:user/bob"},
            "Action": ["kms:Decrypt", "kms:GenerateDataKey", "kms:DescribeKey"],
            "Resource": "*",
        }
    )
    alice.put_key_policy(KeyId=key["KeyId"], PolicyName="default", Policy=json.dumps(policy))
    mount_b = mounts.mount(cipher, None, keyd=host_b)
    assert (mount_b.mnt / "from-a").read_bytes() == b"written on host A"
    (mount_b.mnt / "from-b").write_bytes(b"written on host B")
    assert (mount_b.mnt / "from-b").read_bytes() == b"written on host B"
