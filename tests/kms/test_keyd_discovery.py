"""One rule for finding keyd (issue 13): --keyd-socket, else KMSFS_KEYD_SOCKET, else the
cipherdir's kmsfs.conf hint, else the per-user config (~/.config/kmsfs/config), else the
default; places that do not answer are passed over, and the error names every one.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from kmsfs.errors import KeydUnavailable, KeydUntrusted
from kmsfs.fs.config import keyd_endpoint
from kmsfs.kms import paths
from kmsfs.kms.paths import (
    SOCKET_ENV,
    find_keyd,
    read_user_config,
    remember_keyd_socket,
    user_config_path,
)
from kmsfs.kms.trust import KEYD_UID_ENV
from tests.conftest import KMSFS, Keyd

NOBODY = 65534


class Listener:
    """A socket that accepts connections (all a probe needs), run by this process."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen(16)

    def close(self) -> None:
        self.sock.close()
        self.path.unlink(missing_ok=True)


@pytest.fixture
def place(short_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., Path]]:
    """``place(name, live=True)``: a socket path under a private directory, with a
    listener on it (live), a stale socket file (live=False) or nothing (live=None).
    The default socket, the per-user config and the environment are the test's own."""
    monkeypatch.delenv(SOCKET_ENV, raising=False)
    monkeypatch.delenv(KEYD_UID_ENV, raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(short_tmp / "config"))
    monkeypatch.setattr(paths, "default_socket_path", lambda: short_tmp / "default" / "keyd.sock")
    monkeypatch.setattr(paths, "SYSTEM_SOCKET", short_tmp / "system" / "keyd.sock")
    listeners: list[Listener] = []

    def make(name: str, live: bool | None = True) -> Path:
        path = short_tmp / name / "keyd.sock"
        if live is None:
            return path
        listener = Listener(path)
        if live:
            listeners.append(listener)
        else:
            listener.sock.close()  # the file stays: a keyd that was killed
        return path

    try:
        yield make
    finally:
        for listener in listeners:
            listener.close()


def set_user_config(socket_path: Path) -> None:
    path = user_config_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f'keyd_socket = "{socket_path}"\n')


def test_user_config_path_follows_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    assert user_config_path() == tmp_path / "kmsfs" / "config"
    monkeypatch.setenv("XDG_CONFIG_HOME", "relative/ignored")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert user_config_path() == tmp_path / ".config" / "kmsfs" / "config"


def test_named_sockets_are_used_as_they_are(place, monkeypatch: pytest.MonkeyPatch) -> None:
    """--keyd-socket and KMSFS_KEYD_SOCKET are the user's choice: never passed over."""
    hint = place("hint")
    set_user_config(place("config"))
    nothing = place("nothing", live=None)
    assert find_keyd(nothing, hint=str(hint)) == nothing
    monkeypatch.setenv(SOCKET_ENV, str(nothing))
    assert find_keyd(None, hint=str(hint)) == nothing
    assert find_keyd("/elsewhere.sock", hint=str(hint)) == Path("/elsewhere.sock")


def test_the_hint_comes_before_the_user_config_and_the_default(place) -> None:
    hint, configured, default = place("hint"), place("config"), place("default")
    set_user_config(configured)
    assert find_keyd(None, hint=str(hint)) == hint
    assert keyd_endpoint(None, SimpleNamespace(keyd_socket=str(hint))) == hint  # type: ignore[arg-type]
    assert find_keyd(None) == configured
    user_config_path().unlink()
    assert find_keyd(None, hint=None) == default


def test_a_user_without_a_keyd_of_her_own_finds_the_system_keyd(place) -> None:
    """The machine's system keyd (/run/kmsfs/keyd.sock) comes last: after the user's own
    default socket, which wins when a keyd answers there."""
    system = place("system")
    place("default", live=None)
    assert find_keyd(None) == system
    default = place("default")
    assert find_keyd(None) == default


def test_places_where_nothing_answers_are_passed_over(place) -> None:
    stale_hint = place("hint", live=False)
    set_user_config(place("config", live=None))
    default = place("default")
    assert find_keyd(None, hint=str(stale_hint)) == default


def test_an_untrusted_hint_is_passed_over(place, short_tmp: Path) -> None:
    theirs = short_tmp / "theirs"
    listener = Listener(theirs / "keyd.sock")
    try:
        os.chown(theirs, NOBODY, NOBODY)
        configured = place("config")
        set_user_config(configured)
        assert find_keyd(None, hint=str(theirs / "keyd.sock")) == configured
    finally:
        listener.close()


def test_the_error_names_every_place_and_why(place, short_tmp: Path) -> None:
    stale = place("hint", live=False)
    missing = place("config", live=None)
    set_user_config(missing)
    with pytest.raises(KeydUnavailable) as caught:
        find_keyd(None, hint=str(stale))
    message = str(caught.value)
    assert "\n" not in message
    assert f"the hint in kmsfs.conf: keyd at {stale}: nothing answers" in message
    assert f"{user_config_path()}: keyd at {missing}" in message
    assert f"the default: keyd at {short_tmp / 'default' / 'keyd.sock'}" in message
    assert not isinstance(caught.value, KeydUntrusted)


def test_an_untrusted_place_makes_the_error_a_refusal(place, short_tmp: Path) -> None:
    theirs = short_tmp / "theirs"
    listener = Listener(theirs / "keyd.sock")
    try:
        os.chown(theirs, NOBODY, NOBODY)
        with pytest.raises(KeydUntrusted, match=f"owned by uid {NOBODY}"):
            find_keyd(None, hint=str(theirs / "keyd.sock"))
    finally:
        listener.close()


def test_a_broken_user_config_is_named_and_passed_over(place) -> None:
    default = place("default")
    user_config_path().parent.mkdir(parents=True)
    user_config_path().write_text("keyd_socket = [not toml\n")
    assert find_keyd(None) == default
    user_config_path().write_text('keyd_socket = "relative.sock"\n')
    assert find_keyd(None) == default


# ------------------------------------------------- keyd records its socket
def test_remember_writes_a_non_default_socket_and_keeps_other_lines(place) -> None:
    first = place("first", live=False)
    user_config_path().parent.mkdir(parents=True)
    user_config_path().write_text('# mine\nother = 1\nkeyd_socket = "/gone/keyd.sock"\n')
    written, _what = remember_keyd_socket(first)
    assert written == user_config_path()
    assert read_user_config() == {"other": 1, "keyd_socket": str(first)}
    assert user_config_path().read_text().startswith("# mine\n")
    assert remember_keyd_socket(paths.default_socket_path())[0] is None


def test_remember_leaves_a_live_keyd_in_place(place) -> None:
    live = place("live")
    set_user_config(live)
    written, what = remember_keyd_socket(place("throwaway", live=None))
    assert written is None and "answers" in what
    assert read_user_config()["keyd_socket"] == str(live)


def test_a_new_shell_finds_the_keyd_serve_started(keyd_factory, short_tmp: Path) -> None:
    """keyd serve on a non-default socket records it; a command run without
    --keyd-socket or KMSFS_KEYD_SOCKET (a new shell) then finds that keyd."""
    keyd: Keyd = keyd_factory()
    keyd.init()
    config_home = short_tmp / "xdg"
    env = {**os.environ, "XDG_CONFIG_HOME": str(config_home)}
    keyd.start(env=env)
    # keyd records it right after it starts listening: a client may connect a moment before
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        recorded = read_user_config(config_home / "kmsfs" / "config").get("keyd_socket")
        if recorded is not None:
            break
        time.sleep(0.02)
    assert recorded == str(keyd.socket)
    new_shell = {k: v for k, v in env.items() if k != SOCKET_ENV}
    result = subprocess.run(
        [*KMSFS, "keys", "create", "--alias", "alias/found"],
        env=new_shell,
        capture_output=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr.decode()
    with keyd.client() as client:
        assert any(
            a["AliasName"] == "alias/found" for a in client.call("ListAliases", {})["Aliases"]
        )


def test_the_command_line_error_says_where_it_looked(short_tmp: Path) -> None:
    config_home = short_tmp / "xdg"
    (config_home / "kmsfs").mkdir(parents=True)
    (config_home / "kmsfs" / "config").write_text(f'keyd_socket = "{short_tmp}/gone.sock"\n')
    env = {k: v for k, v in os.environ.items() if k != SOCKET_ENV}
    env["XDG_CONFIG_HOME"] = str(config_home)
    default = subprocess.run(
        [*KMSFS[:1], "-c", "from kmsfs.kms.paths import default_socket_path as d; print(d())"],
        env=env,
        capture_output=True,
        text=True,
    ).stdout.strip()
    try:
        paths.probe_keyd(Path(default), frozenset({os.geteuid(), 0}))
    except KeydUnavailable:
        pass
    else:
        pytest.skip(f"a keyd answers at the default socket {default}")
    result = subprocess.run([*KMSFS, "keys", "list"], env=env, capture_output=True, timeout=120)
    assert result.returncode == 4
    lines = result.stderr.decode().strip().splitlines()
    assert len(lines) == 1, lines
    assert f"{short_tmp}/gone.sock" in lines[0] and "kmsfs/config" in lines[0], lines[0]
    assert f"the default: keyd at {default}" in lines[0], lines[0]
