"""Mount options as mount(8) and /etc/fstab pass them, and the ``mount.kmsfs`` helper.

How mount(8) reaches kmsfs (util-linux 2.38, fuse3 3.14; see README "Mount at boot"):

- type ``fuse.kmsfs``: mount(8) runs ``/sbin/mount.fuse.kmsfs`` if it exists, else
  ``mount.fuse3 SOURCE MOUNTPOINT -t fuse.kmsfs -o OPTIONS``, which runs
  ``kmsfs SOURCE MOUNTPOINT -o OPTIONS`` through ``/bin/sh`` with the PATH of a
  sanitised environment (``/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin``):
  the ``kmsfs`` command takes that form too (:func:`is_helper_call`).
- type ``fuse./path/to/mount.kmsfs`` (gocryptfs documents ``fuse./usr/bin/gocryptfs``):
  mount.fuse3 runs that program with the same arguments; nothing to install in /sbin.
- type ``kmsfs`` with ``/sbin/mount.kmsfs`` (a link to this helper) also works.

mount(8) has already removed the options it keeps to itself (``_netdev``, ``nofail``,
``x-*``, ``noauto``...) and turned ``user`` into ``noexec,nosuid,nodev``; mount.fuse3
appends ``dev,suid`` unless ``nodev``/``nosuid`` were given. A helper can still be run
by hand with any of them, so every option mount(8) documents is known here: the kernel
ones go to FUSE, the userspace-only ones are ignored, the ones FUSE cannot apply and
any other unknown option are one clear error, as gocryptfs's ``-o`` does.

The helper returns once the filesystem is mounted (it runs ``kmsfs mount`` detached),
which is what mount(8) expects of it.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from kmsfs.errors import UsageError

if TYPE_CHECKING:  # the mount itself (pyfuse3) is imported only to mount
    from kmsfs.fs.mount import MountOptions

#: kernel mount flags that FUSE (libfuse 3 through pyfuse3.init) takes: each name and
#: its opposite, the last one given wins as in mount(8)
KERNEL_FLAGS = {
    "suid": "nosuid",
    "dev": "nodev",
    "exec": "noexec",
    "atime": "noatime",
    "async": "sync",
    "dirsync": None,
}
_FLAG_OF = {name: name for name in KERNEL_FLAGS} | {
    opposite: name for name, opposite in KERNEL_FLAGS.items() if opposite
}

#: mount(8)'s options that the kernel applies to FUSE by default already (relatime is
#: every new mount's atime mode) or that only change kernel log messages
ALREADY_SO = frozenset({"relatime", "silent", "loud", "default_permissions"})

#: options mount(8) documents for itself, for fstab or for other programs: nothing
#: for the filesystem to do (mount(8), "FILESYSTEM-INDEPENDENT MOUNT OPTIONS")
USERSPACE_ONLY = frozenset(
    {"defaults", "auto", "noauto", "user", "nouser", "users", "owner", "group", "_netdev"}
    | {"nofail"}
)
USERSPACE_PREFIXES = ("x-", "X-", "comment=")

#: mount(8) options that libfuse refuses (pyfuse3.init fails on each): named clearly
NOT_FOR_FUSE = frozenset(
    {
        "strictatime",
        "nostrictatime",
        "norelatime",
        "diratime",
        "nodiratime",
        "lazytime",
        "nolazytime",
        "mand",
        "nomand",
        "iversion",
        "noiversion",
        "symfollow",
        "nosymfollow",
        "remount",
        "bind",
        "move",
    }
)

#: kmsfs's own options (the same settings as ``kmsfs mount``'s flags)
VALUED_OPTIONS = (
    "keyd_socket",
    "keyd_uid",
    "aws_endpoint_url",
    "aws_profile",
    "aws_region",
    "key_cache_seconds",
    "busy_poll_us",
    "max_dirty_ratio",
    "idle",
    "log_file",
    "audit_queue",
)

KNOWN_HELP = (
    "rw, ro, allow_other, nonempty, forward_callers/no_forward_callers, audit_opens, "
    "nosuid/suid, nodev/dev, noexec/exec, noatime/atime, "
    "sync/async, dirsync, " + ", ".join(f"{name}=" for name in VALUED_OPTIONS)
)


@dataclass
class ParsedOptions:
    """What a list of ``-o`` strings asks for."""

    read_only: bool | None = None
    allow_other: bool = False
    nonempty: bool = False
    #: forward_callers / no_forward_callers (kmsfs mount --[no-]forward-callers)
    forward_callers: bool | None = None
    #: record opens, creates, unlinks and renames in keyd's log (--audit-opens)
    audit_opens: bool = False
    #: kernel flag (``suid``, ``dev``...) -> the word given last for it (``nosuid``...)
    kernel: dict[str, str] = field(default_factory=dict)
    #: kmsfs settings by name (``keyd_socket``...), checked and converted
    settings: dict[str, str | int | float] = field(default_factory=dict)
    #: userspace-only options that were given and ignored
    ignored: list[str] = field(default_factory=list)

    @property
    def kernel_options(self) -> tuple[str, ...]:
        return tuple(self.kernel[name] for name in sorted(self.kernel))


def split_options(values: Iterable[str]) -> list[str]:
    """``["a,b", "c"]`` -> ``["a", "b", "c"]``; empty items are dropped."""
    return [option for value in values for option in value.split(",") if option]


def parse_options(values: Iterable[str] | None, *, sloppy: bool = False) -> ParsedOptions:
    """Parse comma-separated mount options; unknown ones raise :class:`UsageError`
    (with ``sloppy``, mount(8)'s ``-s``, they are ignored instead)."""
    parsed = ParsedOptions()
    for option in split_options(values or []):
        name, has_value, value = option.partition("=")
        if option in ("ro", "rw"):
            parsed.read_only = option == "ro"
        elif option == "allow_other":
            parsed.allow_other = True
        elif option == "nonempty":
            parsed.nonempty = True
        elif option in ("forward_callers", "no_forward_callers"):
            parsed.forward_callers = option == "forward_callers"
        elif option == "audit_opens":
            parsed.audit_opens = True
        elif option in _FLAG_OF:
            parsed.kernel[_FLAG_OF[option]] = option
        elif option in ALREADY_SO:
            continue
        elif option in USERSPACE_ONLY or option.startswith(USERSPACE_PREFIXES):
            parsed.ignored.append(option)
        elif name in VALUED_OPTIONS and has_value:
            parsed.settings[name] = _setting(name, value)
        elif name in VALUED_OPTIONS:
            raise UsageError(f"mount option {name} needs a value: {name}=...")
        elif sloppy:
            parsed.ignored.append(option)
        elif option in NOT_FOR_FUSE:
            raise UsageError(f"mount option {option!r} is not supported by FUSE filesystems")
        else:
            raise UsageError(f"unknown mount option {option!r} (known: {KNOWN_HELP})")
    return parsed


def _setting(name: str, text: str) -> str | int | float:
    if not text:
        raise UsageError(f"mount option {name}= needs a value")
    if name == "idle":
        return parse_duration(text)
    if name == "key_cache_seconds":
        try:
            seconds = float(text)
        except ValueError:
            seconds = -1.0
        if not 0 <= seconds < float("inf"):
            raise UsageError(f"key_cache_seconds= takes a number of seconds: {text!r}")
        return seconds
    if name in ("busy_poll_us", "max_dirty_ratio", "audit_queue"):
        low, high = {"busy_poll_us": (0, 10**9), "max_dirty_ratio": (1, 100)}.get(name, (0, 10**9))
        if not text.isdigit() or not low <= int(text) <= high:
            raise UsageError(f"{name}= takes a whole number from {low} to {high}: {text!r}")
        return int(text)
    return text


def apply_options(parsed: ParsedOptions, options: MountOptions) -> MountOptions:
    """Set what ``parsed`` names on ``options`` (the -o options win over flags)."""
    if parsed.read_only is not None:
        options.read_only = parsed.read_only
    options.allow_other = options.allow_other or parsed.allow_other
    options.nonempty = options.nonempty or parsed.nonempty
    if parsed.forward_callers is not None:
        options.forward_callers = parsed.forward_callers
    options.audit_opens = options.audit_opens or parsed.audit_opens
    options.kernel_options = parsed.kernel_options
    settings = parsed.settings
    if "idle" in settings:
        options.idle_seconds = float(settings["idle"]) or None
    if "busy_poll_us" in settings:
        options.busy_poll_seconds = int(settings["busy_poll_us"]) / 1e6
    if "audit_queue" in settings:
        options.audit_queue = int(settings["audit_queue"])
    for name in (
        "keyd_socket",
        "keyd_uid",
        "aws_endpoint_url",
        "aws_profile",
        "aws_region",
        "key_cache_seconds",
        "max_dirty_ratio",
        "log_file",
    ):
        if name in settings:
            setattr(options, name, settings[name])
    return options


_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ms|s|m|h|d)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(text: str) -> float:
    """``30s``, ``10m``, ``1h30m``, ``500ms`` or plain seconds -> seconds (as gocryptfs's
    ``-idle``, which takes Go durations such as ``2h45m``)."""
    stripped = text.strip()
    try:
        seconds = float(stripped)
    except ValueError:
        position = 0
        seconds = 0.0
        for match in _DURATION_PART.finditer(stripped):
            if match.start() != position:
                break
            seconds += float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
            position = match.end()
        if position != len(stripped) or not stripped:
            raise UsageError(f"not a duration: {text!r} (for example 30s, 10m, 1h30m)") from None
    if seconds != seconds or seconds < 0 or seconds == float("inf"):
        raise UsageError(f"not a duration: {text!r} (for example 30s, 10m, 1h30m)")
    return seconds


# ------------------------------------------------------------------ the helper
HELPER_USAGE = "usage: mount.kmsfs CIPHERDIR MOUNTPOINT [-o OPTIONS] [-s] [-f] [-n] [-v]"


@dataclass
class HelperCall:
    cipherdir: str
    mountpoint: str
    options: list[str]
    fake: bool = False
    sloppy: bool = False


def parse_helper_args(argv: Sequence[str]) -> HelperCall:
    """mount(8)'s helper convention: ``SOURCE MOUNTPOINT [-sfnv] [-o OPTS] [-t TYPE]``
    (mount.fuse3 passes ``SOURCE MOUNTPOINT -o OPTS``)."""
    positional: list[str] = []
    options: list[str] = []
    fake = sloppy = False
    arguments = iter(argv)
    for argument in arguments:
        if argument in ("-o", "-t", "-N"):
            value = next(arguments, None)
            if value is None:
                raise UsageError(f"{argument} needs a value ({HELPER_USAGE})")
            if argument == "-o":
                options.append(value)
            elif argument == "-N":
                raise UsageError("mount.kmsfs cannot mount in another namespace (-N)")
            # -t fuse.kmsfs, kmsfs or fuse./path/mount.kmsfs: we are that type
        elif argument.startswith("-o") and len(argument) > 2:
            options.append(argument[2:])
        elif argument.startswith("-") and len(argument) > 1 and not argument.startswith("--"):
            for letter in argument[1:]:
                if letter == "f":
                    fake = True
                elif letter == "s":
                    sloppy = True
                elif letter not in "nvi":  # no mtab, verbose, no other helper: nothing to do
                    raise UsageError(f"unknown option -{letter} ({HELPER_USAGE})")
        elif argument.startswith("--"):
            raise UsageError(f"unknown option {argument} ({HELPER_USAGE})")
        else:
            positional.append(argument)
    if len(positional) != 2:
        raise UsageError(HELPER_USAGE)
    return HelperCall(positional[0], positional[1], options, fake=fake, sloppy=sloppy)


def kmsfs_mount_argv(call: HelperCall) -> list[str]:
    """The ``kmsfs mount`` command line a helper call stands for (detached, like every
    mount(8) helper: it returns once the filesystem is mounted)."""
    parsed = parse_options(call.options, sloppy=call.sloppy)  # errors now, in one line
    kept = [
        option
        for option in split_options(call.options)
        if option not in parsed.ignored and option not in ALREADY_SO
    ]
    argv = ["mount", call.cipherdir, call.mountpoint]
    if kept:
        argv += ["-o", ",".join(kept)]
    return argv


def is_helper_call(argv: Sequence[str], commands: Iterable[str]) -> bool:
    """Whether a ``kmsfs`` command line is mount.fuse3's ``kmsfs SOURCE MOUNTPOINT -o ...``
    rather than a subcommand: the first word is no command and names a directory (a
    mistyped command stays argparse's "invalid choice")."""
    if len(argv) < 2 or argv[0].startswith("-") or argv[0] in set(commands):
        return False
    return "/" in argv[0] or os.path.isdir(argv[0])


def run_helper(argv: Sequence[str], prog: str = "mount.kmsfs") -> int:
    """Mount as mount(8) asks; an error is one line on stderr and a non-zero status."""
    from kmsfs import cli

    try:
        call = parse_helper_args(argv)
        mount_argv = kmsfs_mount_argv(call)
    except UsageError as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return error.exit_code
    if call.fake:
        return 0
    return cli.main(mount_argv)


def main() -> int:
    """The ``mount.kmsfs`` console script."""
    return run_helper(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
