"""``kmsfs --version`` prints the installed package's version, as gocryptfs -version does."""

from __future__ import annotations

from importlib.metadata import version

from tests.conftest import run_kmsfs


def test_version_is_the_package_metadata_version() -> None:
    result = run_kmsfs("--version")
    assert result.stdout.decode() == f"kmsfs {version('kmsfs')}\n"
    assert result.stderr == b""
