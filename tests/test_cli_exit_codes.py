"""One exit-status table: the code's (kmsfs.cli.errors.EXIT_STATUSES), the README's and
``kmsfs --help``'s are the same, every error type's status is in it, and a detached
command's parent exits with its child's status."""

from __future__ import annotations

import importlib
import pkgutil
import re
from collections.abc import Callable
from pathlib import Path

import kmsfs
from kmsfs.cli.errors import EXIT_STATUSES
from kmsfs.errors import KmsfsError
from tests.conftest import Keyd, run_kmsfs

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_table() -> dict[int, str]:
    """The rows of the README's exit-status table: ``| 2 | usage: ... |``."""
    text = README.read_text()
    start = text.index("| exit status | meaning |")
    rows: dict[int, str] = {}
    for line in text[start:].splitlines()[2:]:
        match = re.fullmatch(r"\| (\d+) \| (.*) \|", line)
        if match is None:
            break
        rows[int(match[1])] = match[2]
    return rows


def test_the_readme_table_is_the_codes_table() -> None:
    assert readme_table() == EXIT_STATUSES


def test_help_shows_the_table() -> None:
    help_text = " ".join(run_kmsfs("--help").stdout.decode().split())
    for status, meaning in EXIT_STATUSES.items():
        assert f"{status} {' '.join(meaning.split())}" in help_text


def all_error_types() -> set[type[KmsfsError]]:
    for module in pkgutil.walk_packages(kmsfs.__path__, "kmsfs."):
        if not module.name.endswith(".__main__"):  # that one runs the command
            importlib.import_module(module.name)
    found: set[type[KmsfsError]] = set()
    todo: list[type[KmsfsError]] = [KmsfsError]
    while todo:
        error_type = todo.pop()
        found.add(error_type)
        todo += error_type.__subclasses__()
    return found


def test_every_error_type_exits_with_a_documented_status() -> None:
    error_types = all_error_types()
    assert len(error_types) > 20  # the walk found the types of every layer
    undocumented = {
        t.__name__: t.exit_code for t in error_types if t.exit_code not in EXIT_STATUSES
    }
    assert undocumented == {}
    assert all(t.exit_code != 0 for t in error_types)


IN_USE = 10


def test_a_second_keyd_on_the_same_keystore_is_in_use(
    live_keyd: Keyd, keyd_factory: Callable[..., Keyd]
) -> None:
    other_socket = keyd_factory("other").workdir / "s.sock"
    for detach in ([], ["-d"]):
        result = run_kmsfs(
            *live_keyd.serve_args("--socket", str(other_socket), *detach), check=False
        )
        assert result.returncode == IN_USE, result.stderr
        assert b"in use by another process" in result.stderr


def test_a_second_keyd_on_a_live_socket_is_in_use(
    live_keyd: Keyd, keyd_factory: Callable[..., Keyd]
) -> None:
    other = keyd_factory("other")
    other.init()
    for detach in ([], ["-d"]):
        args = ["keyd", "serve", "--keystore", str(other.keystore)]
        args += ["--root-key-file", str(other.root_key), "--socket", str(live_keyd.socket), *detach]
        result = run_kmsfs(*args, check=False)
        assert result.returncode == IN_USE, result.stderr
        assert b"another keyd is listening" in result.stderr


def test_a_detached_mount_exits_with_the_mounts_status(tmp_path: Path) -> None:
    """The child fails on a directory without kmsfs.conf (8); the parent says so with 8."""
    (tmp_path / "cipher").mkdir()
    (tmp_path / "mnt").mkdir()
    result = run_kmsfs(
        "mount",
        str(tmp_path / "cipher"),
        str(tmp_path / "mnt"),
        "--log-file",
        str(tmp_path / "mount.log"),
        check=False,
    )
    stderr = result.stderr.decode()
    assert result.returncode == 8, stderr
    assert stderr.splitlines() == [
        f"kmsfs: error: the mount did not start: {tmp_path / 'cipher'} is not a kmsfs cipher "
        "directory (no kmsfs.conf; create one with 'kmsfs init')"
    ]
