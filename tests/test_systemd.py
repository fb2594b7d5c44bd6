"""systemd integration: sd_notify, the generated kmsfs-keyd.service, its ExecStart booted
the way systemd would (NOTIFY_SOCKET, CREDENTIALS_DIRECTORY, SIGTERM), and the fstab line.

No systemd is needed: a datagram socket of the test stands in for the service manager.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from kmsfs.systemd import (
    PASSPHRASE_CREDENTIAL,
    ROOT_KEY_CREDENTIAL,
    KeydUnit,
    Notifier,
    fstab_line,
    keyd_service_unit,
    quote_exec_word,
)
from tests.conftest import KMSFS, Keyd, run_kmsfs

#: the longest a test waits for keyd to report (a deadline, not a measurement)
DEADLINE = 60.0


class FakeServiceManager:
    """The notification side of systemd: a datagram socket that collects messages."""

    def __init__(self, address: str | bytes) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.settimeout(DEADLINE)
        self.received: list[dict[str, str]] = []

    def wait_for(self, key: str, process: subprocess.Popen[bytes] | None = None) -> dict[str, str]:
        """The first message that sets ``key`` (raises if none comes in time)."""
        while True:
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                exited = "" if process is None else f" (keyd exit status {process.poll()})"
                raise AssertionError(f"no {key} within {DEADLINE} s{exited}") from None
            message = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            self.received.append(message)
            if key in message:
                return message

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def manager(short_tmp: Path) -> Iterator[tuple[str, FakeServiceManager]]:
    address = str(short_tmp / "notify")
    fake = FakeServiceManager(address)
    try:
        yield address, fake
    finally:
        fake.close()


# ------------------------------------------------------------------ sd_notify
def test_notifier_sends_one_datagram_to_a_path(manager) -> None:
    address, fake = manager
    assert Notifier(address).ready("serving")
    assert fake.wait_for("READY") == {"READY": "1", "STATUS": "serving"}


def test_notifier_reaches_the_abstract_namespace() -> None:
    name = f"kmsfs-test-{os.getpid()}"
    fake = FakeServiceManager(b"\0" + name.encode())
    try:
        assert Notifier("@" + name).stopping()
        assert fake.wait_for("STOPPING") == {"STOPPING": "1"}
    finally:
        fake.close()


def test_notifier_without_notify_socket_is_a_no_op(monkeypatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    notifier = Notifier.from_environment()
    assert not notifier.enabled
    assert not notifier.ready()


def test_notifier_takes_the_address_out_of_the_environment(monkeypatch, manager) -> None:
    address, _fake = manager
    monkeypatch.setenv("NOTIFY_SOCKET", address)
    notifier = Notifier.from_environment()
    assert notifier.address == address
    assert "NOTIFY_SOCKET" not in os.environ  # children cannot pose as the main process


def test_notifier_survives_a_vanished_manager(short_tmp: Path) -> None:
    assert not Notifier(str(short_tmp / "nobody-listens")).ready()
    assert not Notifier("vsock:2:1234").ready()


def test_keyd_serve_reports_ready_and_stopping(live_keyd: Keyd, manager) -> None:
    """keyd serve sends READY=1 once its socket answers and STOPPING=1 on SIGTERM."""
    address, fake = manager
    live_keyd.stop()
    env = {**live_keyd.env, "NOTIFY_SOCKET": address}
    process = subprocess.Popen(
        [*KMSFS, *live_keyd.serve_args()],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
    )
    try:
        ready = fake.wait_for("READY", process)
        assert ready["READY"] == "1"
        assert str(live_keyd.socket) in ready.get("STATUS", "")
        # READY=1 means the socket answers now, not soon
        with live_keyd.client() as client:
            assert "Keys" in client.call("ListKeys", {})
        process.send_signal(signal.SIGTERM)
        assert fake.wait_for("STOPPING", process)["STOPPING"] == "1"
        assert process.wait(timeout=DEADLINE) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        assert process.stderr is not None
        process.stderr.close()


# ------------------------------------------------- passphrase sources (--extpass)
def test_extpass_takes_stdout_without_one_trailing_newline() -> None:
    from kmsfs.kms.daemon import extpass_argv, passphrase_from_command

    assert passphrase_from_command(["printf", "secret\\n\\n"]) == b"secret\n"
    assert passphrase_from_command(extpass_argv(["printf 'two words\\n'"])) == b"two words"
    # several values: the command and its arguments as they are (gocryptfs -extpass)
    assert extpass_argv(["echo", "a b"]) == ["echo", "a b"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["sh", "-c", "echo secret-word; exit 3"], "sh exited with status 3; no passphrase"),
        (["sh", "-c", "kill -9 $$"], "sh was killed by signal 9"),
        (["true"], "true printed no passphrase"),
        (["head", "-c", "5000", "/dev/zero"], "head printed more than 2048 bytes"),
        (["/nonexistent/askpass"], "cannot run /nonexistent/askpass"),
    ],
)
def test_extpass_failures_are_clear_and_never_show_the_output(argv, message) -> None:
    from kmsfs.errors import KeystoreError
    from kmsfs.kms.daemon import passphrase_from_command

    with pytest.raises(KeystoreError) as caught:
        passphrase_from_command(argv)
    assert message in str(caught.value)
    assert "secret-word" not in str(caught.value)


def test_credentials_are_read_from_the_credentials_directory(short_tmp, monkeypatch) -> None:
    from kmsfs.errors import KeystoreInsecure, UsageError
    from kmsfs.kms.daemon import source_from_credential

    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    with pytest.raises(UsageError, match="LoadCredential=kmsfs-passphrase"):
        source_from_credential("kmsfs-passphrase", root_key=False)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(short_tmp))
    credential = short_tmp / "kmsfs-passphrase"
    credential.write_bytes(b"correct horse\n")
    credential.chmod(0o400)  # as systemd makes it
    assert source_from_credential("kmsfs-passphrase", root_key=False).passphrase == b"correct horse"
    credential.chmod(0o644)  # a passphrase others can read is refused, as everywhere
    with pytest.raises(KeystoreInsecure, match="chmod 600"):
        source_from_credential("kmsfs-passphrase", root_key=False)
    with pytest.raises(UsageError, match="not a plain file name"):
        source_from_credential("../etc/shadow", root_key=False)
    key = source_from_credential("kmsfs-root-key", root_key=True)
    assert key.key_file == short_tmp / "kmsfs-root-key"


# ---------------------------------------------------------------------- units
def exec_start_argv(unit_text: str) -> list[str]:
    """ExecStart= split as systemd splits it (quotes, C escapes), %% and $$ unescaped."""
    lines = [line for line in unit_text.splitlines() if line.startswith("ExecStart=")]
    assert len(lines) == 1, unit_text
    words = shlex.split(lines[0].removeprefix("ExecStart="))
    return [word.replace("%%", "%").replace("$$", "$") for word in words]


def credentials(unit_text: str) -> dict[str, str]:
    pairs = [
        line.removeprefix("LoadCredential=").split(":", 1)
        for line in unit_text.splitlines()
        if line.startswith("LoadCredential=")
    ]
    return {name: path.replace("%%", "%") for name, path in pairs}


@pytest.mark.parametrize(
    "word", ["plain", "/a b/c", "100%", "$HOME", 'say "hi"', "back\\slash", "it's"]
)
def test_exec_words_survive_systemd_quoting(word: str) -> None:
    assert exec_start_argv(f"ExecStart={quote_exec_word(word)}") == [word]


def system_unit(passphrase_from: str, secret: Path | None, keystore: Path) -> KeydUnit:
    return KeydUnit(
        kmsfs_command=[sys.executable, "-m", "kmsfs.cli"],
        keystore=keystore,
        passphrase_from=passphrase_from,  # type: ignore[arg-type]
        secret_file=secret,
    )


def test_the_unit_is_type_notify_with_the_secret_as_a_credential(short_tmp: Path) -> None:
    text = keyd_service_unit(
        system_unit("credential", short_tmp / "passphrase", short_tmp / "key store%")
    )
    assert "\nType=notify\n" in text and "\nNotifyAccess=main\n" in text
    assert credentials(text) == {PASSPHRASE_CREDENTIAL: str(short_tmp / "passphrase")}
    argv = exec_start_argv(text)
    assert argv[-2:] == ["--passphrase-credential", PASSPHRASE_CREDENTIAL]
    assert argv[argv.index("--keystore") + 1] == str(short_tmp / "key store%")
    root_key = keyd_service_unit(system_unit("root-key-file", short_tmp / "root.key", short_tmp))
    assert credentials(root_key) == {ROOT_KEY_CREDENTIAL: str(short_tmp / "root.key")}
    ask = keyd_service_unit(system_unit("ask-password", None, short_tmp))
    assert "LoadCredential" not in ask and "TimeoutStartSec=infinity" in ask
    extpass = exec_start_argv(ask)[-1]
    assert shlex.split(extpass)[0] == "systemd-ask-password"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
@pytest.mark.parametrize("passphrase_from", ["credential", "root-key-file", "ask-password"])
def test_systemd_analyze_verify_finds_nothing_to_say(passphrase_from: str, short_tmp: Path) -> None:
    secret = None if passphrase_from == "ask-password" else short_tmp / "secret"
    unit = system_unit(passphrase_from, secret, short_tmp / "key store")
    path = short_tmp / "kmsfs-keyd.service"
    path.write_text(keyd_service_unit(unit))
    result = subprocess.run(
        ["systemd-analyze", "verify", str(path)], capture_output=True, text=True, timeout=120
    )
    complaints = [line for line in result.stderr.splitlines() if "kmsfs-keyd" in line]
    assert result.returncode == 0 and not complaints, result.stderr


def test_the_fstab_line_requires_keyd_and_follows_fstab_5() -> None:
    line = fstab_line("/srv/private enc", "/home/me/Private")
    assert line == (
        "/srv/private\\040enc /home/me/Private fuse.kmsfs "
        "nosuid,nodev,X-mount.mkdir,x-systemd.requires=kmsfs-keyd.service,_netdev 0 0"
    )
    assert len(line.split()) == 6
    # mount(8) gives the helper no environment: a unit's own socket is named in the line
    line = fstab_line("/srv/c", "/srv/m", keyd_socket="/run/my keyd/keyd.sock")
    assert line.split()[3].endswith(",keyd_socket=/run/my\\040keyd/keyd.sock")


# ------------------------------------ the unit's ExecStart, booted as systemd would
def boot_exec_start(units: str, short_tmp: Path, address: str) -> subprocess.Popen[bytes]:
    """Start ExecStart as systemd does for this unit: LoadCredential= files copied into a
    private credentials directory (0400 files in a 0500 directory), NOTIFY_SOCKET and
    CREDENTIALS_DIRECTORY set, a small environment, no terminal."""
    directory = short_tmp / "credentials"
    directory.mkdir()
    for name, source in credentials(units).items():
        shutil.copyfile(source, directory / name)
        (directory / name).chmod(0o400)
    directory.chmod(0o500)
    env = {
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "LANG": "C.UTF-8",
        "HOME": str(short_tmp),
        "XDG_CONFIG_HOME": os.environ["XDG_CONFIG_HOME"],
        "NOTIFY_SOCKET": address,
        "CREDENTIALS_DIRECTORY": str(directory),
    }
    log = open(short_tmp / "unit.log", "wb")  # noqa: SIM115 - closed with the process
    with log:
        return subprocess.Popen(
            exec_start_argv(units), env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log
        )


@pytest.mark.parametrize("secret", ["root-key-file", "passphrase-file"])
def test_the_units_exec_start_boots_as_systemd_would(
    secret: str, keyd_factory, manager, short_tmp: Path
) -> None:
    address, fake = manager
    keyd: Keyd = keyd_factory()
    if secret == "root-key-file":
        keyd.init()
        secret_args = ["--root-key-file", str(keyd.root_key)]
    else:
        passphrase = keyd.workdir / "passphrase"
        passphrase.write_bytes(b"correct horse battery staple\n")
        passphrase.chmod(0o600)
        secret_args = ["--passphrase-file", str(passphrase)]
        run_kmsfs("keyd", "init", "--keystore", str(keyd.keystore), *secret_args)
    units = run_kmsfs(
        "systemd-units",
        "--keystore",
        str(keyd.keystore),
        "--socket",
        str(keyd.socket),
        *secret_args,
    ).stdout.decode()
    assert "\nType=notify\n" in units
    assert "KillSignal" not in units  # systemd's default: SIGTERM to the main process
    assert "x-systemd.requires=kmsfs-keyd.service" in units  # the fstab line, as a comment
    process = boot_exec_start(units, short_tmp, address)
    try:
        assert fake.wait_for("READY", process)["READY"] == "1"
        with keyd.client() as client:
            assert "Keys" in client.call("ListKeys", {})
        process.send_signal(signal.SIGTERM)
        assert fake.wait_for("STOPPING", process)["STOPPING"] == "1"
        assert process.wait(timeout=DEADLINE) == 0
        assert not keyd.socket.exists()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_systemd_units_install_writes_a_user_unit_once(short_tmp: Path) -> None:
    env = {**os.environ, "XDG_CONFIG_HOME": str(short_tmp / "config")}
    args = ["systemd-units", "--user", "--install", "--keystore", str(short_tmp / "ks")]
    first = run_kmsfs(*args, env=env)
    unit = short_tmp / "config" / "systemd" / "user" / "kmsfs-keyd.service"
    assert unit.exists() and "systemctl --user" in first.stdout.decode()
    assert "WantedBy=default.target" in unit.read_text()
    run_kmsfs(*args, env=env)  # the same unit again: fine
    other = run_kmsfs(*args[:-1], str(short_tmp / "other"), env=env, check=False)
    assert other.returncode == 2 and b"--force" in other.stderr
    run_kmsfs(*args[:-1], str(short_tmp / "other"), "--force", env=env)
    assert str(short_tmp / "other") in unit.read_text()


def test_keyd_serve_extpass(keyd_factory, short_tmp: Path) -> None:
    keyd: Keyd = keyd_factory()
    passphrase = keyd.workdir / "passphrase"
    passphrase.write_bytes(b"from a command\n")
    passphrase.chmod(0o600)
    run_kmsfs(
        "keyd", "init", "--keystore", str(keyd.keystore), "--passphrase-file", str(passphrase)
    )
    failing = run_kmsfs(
        *keyd.serve_args(root_key=False), "--extpass", "sh -c 'exit 7'", check=False
    )
    assert failing.returncode == 5
    assert failing.stderr.decode().strip() == (
        "kmsfs: error: --extpass: sh exited with status 7; no passphrase"
    )
    keyd.start("--extpass", f"cat {passphrase}", root_key=False)
    with keyd.client() as client:
        assert "Keys" in client.call("ListKeys", {})
