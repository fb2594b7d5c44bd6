"""A mount whose CMK lives in AWS KMS: the ``aws`` key service against moto's KMS.

moto (an implementation no one here wrote) serves on loopback behind a fault proxy
(tests/aws_endpoint.py) that can throttle, refuse, or stop answering. Credentials come
from the environment (botocore's chain) and never reach kmsfs.conf. The mounts are
real FUSE mounts; the keyd the mount helper names (``--keyd-socket``) is ignored for a
cipher directory whose key service is ``aws``.
"""

from __future__ import annotations

import errno
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.aws_endpoint import ACCESS_KEY, SECRET_KEY, FaultProxy, MotoKMS, aws_environment
from tests.conftest import run_kmsfs
from tests.fs.helpers import CHUNK, Mount, MountFactory, drop_page_cache


@pytest.fixture
def aws(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[MotoKMS, FaultProxy]]:
    from tests.aws_endpoint import moto_behind_proxy

    aws_environment(monkeypatch)
    with moto_behind_proxy() as pair:
        yield pair


def _init(cipher: Path, key_arn: str, url: str, *extra: str) -> dict:
    run_kmsfs("init", str(cipher), "--key", key_arn, "--aws-endpoint-url", url, *extra)
    return json.loads((cipher / "kmsfs.conf").read_text())


def _mount(mounts: MountFactory, cipher: Path, url: str, *extra: str) -> Mount:
    return mounts.mount(cipher, None, "--aws-endpoint-url", url, *extra)


def errno_of(function, *args) -> int:
    with pytest.raises(OSError) as caught:
        function(*args)
    return caught.value.errno


def test_aws_init_records_the_key_service_and_no_credentials(
    aws: tuple[MotoKMS, FaultProxy], fs_root: Path
) -> None:
    moto, proxy = aws
    key_arn = moto.create_key()
    cipher = fs_root / f"aws-init-{os.urandom(3).hex()}"
    document = _init(cipher, key_arn, proxy.url)
    assert document["key_arn"] == key_arn
    assert document["key_service"] == {
        "type": "aws",
        "region": "us-east-1",
        "endpoint_url": proxy.url,
        "profile": None,
    }
    assert document["keyd_socket"] is None
    text = (cipher / "kmsfs.conf").read_text()
    assert ACCESS_KEY not in text and SECRET_KEY not in text
    # the metadata key was wrapped by moto, not by any keyd
    assert "TrentService.GenerateDataKey" in proxy.forwarded
    info = run_kmsfs("info", str(cipher), "--json", "--aws-endpoint-url", proxy.url)
    shown = json.loads(info.stdout)
    assert shown["Authenticated"] == "yes" and shown["KeyState"] == "Enabled"


def test_aws_key_service_entry_is_sealed(aws: tuple[MotoKMS, FaultProxy], fs_root: Path) -> None:
    """The entry is covered by kmsfs.conf's MAC: naming the same server by another name
    (localhost for 127.0.0.1) unwraps fine and then fails authentication."""
    moto, proxy = aws
    cipher = fs_root / f"aws-seal-{os.urandom(3).hex()}"
    _init(cipher, moto.create_key(), proxy.url)
    path = cipher / "kmsfs.conf"
    other_name = proxy.url.replace("127.0.0.1", "localhost")
    path.write_text(path.read_text().replace(proxy.url, other_name))
    result = run_kmsfs("ls", str(cipher), "--aws-endpoint-url", other_name, check=False)
    assert result.returncode == 8, result.stderr  # ConfigTampered
    assert b"failed authentication" in result.stderr


def test_aws_endpoint_from_kmsfs_conf_needs_the_users_word(
    aws: tuple[MotoKMS, FaultProxy], fs_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An endpoint that is not AWS's own, named only by kmsfs.conf (which whoever can write
    the cipher directory can write), is refused until the user names it too."""
    moto, proxy = aws
    cipher = fs_root / f"aws-hint-{os.urandom(3).hex()}"
    _init(cipher, moto.create_key(), proxy.url)
    refused = run_kmsfs("ls", str(cipher), check=False)
    assert refused.returncode == 2
    assert b"not AWS's own" in refused.stderr and proxy.url.encode() in refused.stderr
    # info still describes the cipher directory, saying why it did not ask the service
    shown = json.loads(run_kmsfs("info", str(cipher), "--json").stdout)
    assert shown["Authenticated"] == "not checked" and "not AWS's own" in shown["KeyState"]
    monkeypatch.setenv("AWS_ENDPOINT_URL_KMS", proxy.url)
    assert run_kmsfs("ls", str(cipher)).returncode == 0


def test_aws_mount_write_read_and_offline_tools(
    aws: tuple[MotoKMS, FaultProxy], fs_root: Path, mounts: MountFactory, short_tmp: Path
) -> None:
    moto, proxy = aws
    key_arn = moto.create_key()
    cipher = fs_root / f"aws-rw-{os.urandom(3).hex()}"
    _init(cipher, key_arn, proxy.url)
    mount = _mount(mounts, cipher, proxy.url)
    small, large = b"hello from AWS KMS\n", os.urandom(3 * CHUNK + 123)
    (mount.mnt / "dir").mkdir()
    (mount.mnt / "dir" / "small.txt").write_bytes(small)
    (mount.mnt / "large.bin").write_bytes(large)
    mount.remount("--aws-endpoint-url", proxy.url)
    drop_page_cache(mount.mnt / "large.bin")
    assert (mount.mnt / "dir" / "small.txt").read_bytes() == small
    assert (mount.mnt / "large.bin").read_bytes() == large
    assert f"KMS endpoint {proxy.url}" in mount.log()
    backing = mount.backing(mount.mnt / "large.bin")
    mount.unmount_clean()

    url = ("--aws-endpoint-url", proxy.url)
    listed = json.loads(run_kmsfs("ls", str(cipher), "-R", "--json", *url).stdout)
    assert sorted(entry["path"] for entry in listed) == ["dir", "dir/small.txt", "large.bin"]
    out = short_tmp / "large.out"
    run_kmsfs("decrypt", "--cipherdir", str(cipher), "large.bin", str(out), *url)
    assert out.read_bytes() == large
    fsck = run_kmsfs("fsck", str(cipher), "--verify", *url)
    assert b"no problems found" in fsck.stdout
    shown = json.loads(run_kmsfs("inspect", str(backing), "--verify", "--json", *url).stdout)
    assert shown["KeyArn"] == key_arn and shown["Verified"] == "ok"
    # single files, no cipher directory: encrypt and decrypt through the same service
    plain, sealed, back = short_tmp / "p", short_tmp / "p.kmsfs", short_tmp / "p.back"
    plain.write_bytes(small * 100)
    run_kmsfs("encrypt", str(plain), str(sealed), "--key", key_arn, *url)
    run_kmsfs("decrypt", str(sealed), str(back), *url)
    assert back.read_bytes() == small * 100


def test_aws_refusal_gives_eacces_and_recovers(
    aws: tuple[MotoKMS, FaultProxy], fs_root: Path, mounts: MountFactory
) -> None:
    """AccessDeniedException (a key policy, IAM, a disabled key's refusal) is EACCES on
    open, as with keyd; the mount stays up and serves again once the service allows."""
    moto, proxy = aws
    cipher = fs_root / f"aws-deny-{os.urandom(3).hex()}"
    _init(cipher, moto.create_key(), proxy.url)
    mount = _mount(mounts, cipher, proxy.url, "--key-cache-seconds", "0")
    target = mount.mnt / "file"
    target.write_bytes(b"refused later " * 100)
    drop_page_cache(target)
    proxy.deny = True
    assert errno_of(target.read_bytes) == errno.EACCES
    # a new file's first bytes need a data key: as with keyd (test_fs_faults), the
    # refusal reaches the writer, as EACCES or (through the write-back cache) EIO
    assert errno_of((mount.mnt / "new").write_bytes, b"x") in (errno.EACCES, errno.EIO)
    assert mount.alive, mount.log()
    assert sorted(os.listdir(mount.mnt)) == ["file", "new"]
    proxy.deny = False
    assert target.read_bytes() == b"refused later " * 100
    (mount.mnt / "new").write_bytes(b"allowed again")
    assert (mount.mnt / "new").read_bytes() == b"allowed again"


def test_aws_unreachable_gives_eio_then_recovers(
    aws: tuple[MotoKMS, FaultProxy], fs_root: Path, mounts: MountFactory
) -> None:
    moto, proxy = aws
    cipher = fs_root / f"aws-down-{os.urandom(3).hex()}"
    _init(cipher, moto.create_key(), proxy.url)
    mount = _mount(mounts, cipher, proxy.url, "--key-cache-seconds", "1")
    target = mount.mnt / "file"
    target.write_bytes(b"unreachable later " * 100)
    drop_page_cache(target)
    proxy.stop()
    time.sleep(2.5)  # past the key cache and the key pool's lifetime
    assert errno_of(target.read_bytes) == errno.EIO
    assert mount.alive, mount.log()
    assert os.stat(target).st_size == len(b"unreachable later " * 100)
    proxy.start()  # the same port
    assert target.read_bytes() == b"unreachable later " * 100
    (mount.mnt / "after").write_bytes(b"back")
    assert (mount.mnt / "after").read_bytes() == b"back"


def test_aws_throttling_slows_a_read_instead_of_failing_it(
    aws: tuple[MotoKMS, FaultProxy], fs_root: Path, mounts: MountFactory
) -> None:
    """More ThrottlingExceptions in a row than botocore's retry mode attempts per call:
    the read still gets its data key (the mount backs off and asks again)."""
    from kmsfs.kms.aws import MOUNT_MAX_ATTEMPTS

    moto, proxy = aws
    cipher = fs_root / f"aws-throttle-{os.urandom(3).hex()}"
    _init(cipher, moto.create_key(), proxy.url)
    mount = _mount(mounts, cipher, proxy.url, "--key-cache-seconds", "0")
    target = mount.mnt / "file"
    target.write_bytes(b"throttled " * 100)
    drop_page_cache(target)
    proxy.throttle_next = 3 * MOUNT_MAX_ATTEMPTS
    assert target.read_bytes() == b"throttled " * 100
    assert proxy.throttled == 3 * MOUNT_MAX_ATTEMPTS
    assert mount.alive, mount.log()


def test_aws_mount_refuses_when_the_endpoint_is_down(
    aws: tuple[MotoKMS, FaultProxy], fs_root: Path, mounts: MountFactory
) -> None:
    moto, proxy = aws
    cipher = fs_root / f"aws-nomount-{os.urandom(3).hex()}"
    _init(cipher, moto.create_key(), proxy.url)
    proxy.stop()
    with pytest.raises(AssertionError, match="cannot reach KMS endpoint"):
        _mount(mounts, cipher, proxy.url)


def test_rewrap_import_export_refuse_a_cipherdir_in_aws_kms(
    aws: tuple[MotoKMS, FaultProxy], fs_root: Path, tmp_path: Path
) -> None:
    """They talk to keyd only so far: a cipher directory whose CMK is in AWS KMS is
    refused with one line naming the key, never sent to a keyd without it."""
    moto, proxy = aws
    cipher = fs_root / f"aws-rewrap-{os.urandom(3).hex()}"
    key_arn = moto.create_key()
    _init(cipher, key_arn, proxy.url)
    source = tmp_path / "src"
    source.mkdir()
    (source / "f").write_bytes(b"x")
    for args in (
        ["rewrap", str(cipher)],
        ["import", str(source), str(cipher)],
        ["export", str(cipher), str(tmp_path / "out")],
    ):
        result = run_kmsfs(*args, check=False)
        assert result.returncode == 2, (args, result.stderr.decode())
        assert "works with keyd's CMKs only so far" in result.stderr.decode()
        assert key_arn in result.stderr.decode()
