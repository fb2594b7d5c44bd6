"""What lands in the cipher directory: ciphertext only, of exactly the format's sizes."""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path

from tests.fs.helpers import CHUNK, MountFactory, backing_of, drop_page_cache

HEADER_SIZE = 2048
OVERHEAD = 28


def ciphertext_size(plain: int, chunk: int = CHUNK) -> int:
    if plain == 0:
        return 0
    full, rest = divmod(plain, chunk)
    return HEADER_SIZE + full * (chunk + OVERHEAD) + (rest + OVERHEAD if rest else 0)


def everything_stored(cipher: Path) -> list[tuple[str, bytes]]:
    """Every byte the cipher directory holds: names, file contents, link targets, xattrs."""
    found: list[tuple[str, bytes]] = []
    for directory, dirnames, filenames in os.walk(cipher):
        for name in dirnames + filenames:
            path = Path(directory) / name
            found.append((f"name of {path}", os.fsencode(name)))
            st = os.lstat(path)
            if stat.S_ISREG(st.st_mode):
                found.append((f"content of {path}", path.read_bytes()))
            elif stat.S_ISLNK(st.st_mode):
                found.append((f"target of {path}", os.fsencode(os.readlink(path))))
            try:
                xattr_names = os.listxattr(path, follow_symlinks=False)
            except OSError:
                xattr_names = []
            for xattr in xattr_names:
                found.append((f"xattr name on {path}", xattr.encode()))
                value = os.getxattr(path, xattr, follow_symlinks=False)
                found.append((f"xattr {xattr} on {path}", value))
    return found


def test_no_plaintext_marker_in_cipher_directory(mounts: MountFactory) -> None:
    mount = mounts.mount(mounts.init(plaintext_names=False))
    marker = b"PLAINTEXT-MARKER-" + secrets.token_hex(8).encode()
    text_marker = marker.decode()
    root = mount.mnt
    (root / "small").write_bytes(marker)
    (root / "one-chunk").write_bytes((marker * (CHUNK // len(marker) + 1))[:CHUNK])
    big = (marker + b"\n") * (3 * (1 << 20) // (len(marker) + 1))
    (root / "big").write_bytes(big)
    straddling = bytearray(2 * CHUNK)
    straddling[CHUNK - 10 : CHUNK - 10 + len(marker)] = marker
    (root / "straddling").write_bytes(bytes(straddling))
    # written piecewise, through an O_WRONLY handle, then partly rewritten
    fd = os.open(root / "pieces", os.O_CREAT | os.O_WRONLY, 0o600)
    try:
        for index in range(100):
            os.pwrite(fd, marker, index * 997)
        os.pwrite(fd, marker, 5)
        os.fsync(fd)
    finally:
        os.close(fd)
    # a file that held the marker and was then truncated and rewritten
    (root / "rewritten").write_bytes(marker * 1000)
    os.truncate(root / "rewritten", 10)
    (root / "sub").mkdir()
    (root / "sub" / f"name-{text_marker}").write_bytes(b"named after the marker")
    os.mkdir(root / f"dir-{text_marker}")
    os.symlink(f"target-{text_marker}", root / "sub" / "link")
    os.setxattr(root / "small", f"user.{text_marker}", marker)
    mount.unmount_clean()

    stored = everything_stored(mount.cipher)
    assert len(stored) >= 8
    probes = [marker, marker[:16], marker[-16:], text_marker.encode()[len("PLAINTEXT-") :]]
    leaks = [where for where, data in stored for probe in probes if probe in data]
    assert leaks == [], f"the plaintext marker is in the cipher directory: {leaks}"

    mount.start()  # and it all reads back
    assert (mount.mnt / "big").read_bytes() == big
    assert (mount.mnt / "straddling").read_bytes() == bytes(straddling)
    assert (mount.mnt / "rewritten").read_bytes() == (marker * 1000)[:10]
    assert os.getxattr(mount.mnt / "small", f"user.{text_marker}") == marker
    assert os.readlink(mount.mnt / "sub" / "link") == f"target-{text_marker}"
    assert (mount.mnt / "sub" / f"name-{text_marker}").read_bytes() == b"named after the marker"


SIZES = [0, 1, 15, CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK, 3 * CHUNK + 5, 10 * CHUNK - 1]


def test_sizes_match_plaintext_exactly(mounts: MountFactory) -> None:
    mount = mounts.mount()
    for size in SIZES:
        path = mount.mnt / f"size-{size}"
        path.write_bytes(os.urandom(size))
    for size in SIZES:
        path = mount.mnt / f"size-{size}"
        assert os.stat(path).st_size == size
        assert os.stat(mount.backing(path)).st_size == ciphertext_size(size), size
    written = {size: (mount.mnt / f"size-{size}").read_bytes() for size in SIZES}
    mount.remount()
    # sizes come from the backing sizes alone (stat and readdir), before any open
    with os.scandir(mount.mnt) as entries:
        listed = {entry.name: entry.stat().st_size for entry in entries}
    assert listed == {f"size-{size}": size for size in SIZES}
    for size in SIZES:
        path = mount.mnt / f"size-{size}"
        assert os.stat(path).st_size == size
        drop_page_cache(path)
        assert path.read_bytes() == written[size]
    # growing and shrinking keep the backing size exact
    path = mount.mnt / "size-1"
    for size in (CHUNK + 1, CHUNK, 5, 0, 2 * CHUNK - 1):
        os.truncate(path, size)
        assert os.stat(path).st_size == size
        assert os.stat(mount.backing(path)).st_size == ciphertext_size(size), size


def test_same_content_different_ciphertext(mounts: MountFactory) -> None:
    mount = mounts.mount()
    content = b"identical content " * 5000
    (mount.mnt / "one").write_bytes(content)
    (mount.mnt / "two").write_bytes(content)
    first = mount.backing(mount.mnt / "one").read_bytes()
    second = mount.backing(mount.mnt / "two").read_bytes()
    assert len(first) == len(second) == ciphertext_size(len(content))
    # each file has its own file id, data key and nonces: no common chunk
    for index in range(len(content) // CHUNK + 1):
        start = HEADER_SIZE + index * (CHUNK + OVERHEAD)
        assert first[start : start + 64] != second[start : start + 64]
    assert first[16:32] != second[16:32]  # file id


def test_hard_links_share_one_backing_file(mounts: MountFactory) -> None:
    mount = mounts.mount()
    (mount.mnt / "a").write_bytes(b"shared")
    os.link(mount.mnt / "a", mount.mnt / "b")
    ino = os.stat(mount.mnt / "a").st_ino
    backing = backing_of(mount.cipher, ino)
    assert os.stat(backing).st_nlink == 2
    mount.remount()
    assert (mount.mnt / "b").read_bytes() == b"shared"
    assert os.stat(mount.mnt / "b").st_ino == ino
