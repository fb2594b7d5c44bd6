"""The one place that turns a failed command into a line on stderr and an exit status.

The status comes from the error's type (``KmsfsError.exit_code``, see ``kmsfs.errors``);
:data:`EXIT_STATUSES` is the table of what each status means, shown by ``kmsfs --help``
and copied in the README (a test keeps the three and every error type in step).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator

from kmsfs.background import ERROR_PREFIX
from kmsfs.errors import KmsfsError

#: every status a kmsfs command exits with. Like gocryptfs's exitcodes package, one number
#: per kind of failure so scripts can tell them apart; 2 is argparse's (and BSD
#: sysexits' habit) for usage, 128+N the shell's for a signal.
EXIT_STATUSES: dict[int, str] = {
    0: "success",
    1: "a signature or MAC that does not verify; any other failure (e.g. a system call failed)",
    2: "usage: bad arguments, a missing or unreadable file, an output that exists",
    3: "refused by the key service (the AWS error name is printed)",
    4: "keyd unreachable or not trusted",
    5: "keystore: wrong passphrase or root key, unsafe permissions, missing or existing",
    6: "audit log: tampered, unreadable or unwritable",
    7: "data: a corrupt or tampered file (the first bad chunk is named)",
    8: "cipher directory: kmsfs.conf missing, not sealed, or failed authentication",
    9: "the mount failed (mountpoint, FUSE, /dev/fuse)",
    10: "in use: another keyd serves the socket or keystore, or the cipherdir is mounted",
    130: "interrupted (Ctrl-C); 128+N in general: killed by signal N",
}


def exit_status_epilog() -> str:
    """The table as ``kmsfs --help`` shows it."""
    rows = "\n".join(f"  {status:>3}  {meaning}" for status, meaning in EXIT_STATUSES.items())
    return f"exit status:\n{rows}"


def _leaf_errors(group: BaseExceptionGroup) -> Iterator[BaseException]:
    for error in group.exceptions:
        if isinstance(error, BaseExceptionGroup):
            yield from _leaf_errors(error)
        else:
            yield error


def missing_module_message(exc: ImportError) -> str:
    name = (exc.name or "").split(".")[0]
    if isinstance(exc, ModuleNotFoundError) and name:
        how = f"pip install {name}"
        if name == "pyfuse3":  # built against the system's libfuse3
            how += ", after apt install fuse3 libfuse3-dev pkg-config"
        return f"this command needs the Python module {name}, which is not installed ({how})"
    return f"a Python module cannot be loaded: {exc}"


#: what a path the user named can be: missing, not theirs, not the kind expected (status 2)
_PATH_ERRORS = (FileNotFoundError, PermissionError, NotADirectoryError, IsADirectoryError)


def os_error_message(exc: OSError) -> str:
    reason = exc.strerror or str(exc)
    if exc.filename is None:
        return reason
    where = os.fsdecode(exc.filename)
    if exc.filename2 is not None:
        where += f" -> {os.fsdecode(exc.filename2)}"
    return f"{where}: {reason}"


def run_reporting_errors(command: Callable[[], None]) -> int:
    """Run ``command``; return 0, or print one line for its error and return its status."""
    try:
        command()
    except KmsfsError as exc:
        print(f"{ERROR_PREFIX}{exc}", file=sys.stderr)
        return exc.exit_code
    except BaseExceptionGroup as group:
        # trio wraps what fails while a nursery starts (keyd serve: a live socket) in a
        # group: one line for the first kmsfs error, if kmsfs errors are all it holds
        errors = list(_leaf_errors(group))
        if not all(isinstance(error, KmsfsError) for error in errors):
            raise
        first = errors[0]
        assert isinstance(first, KmsfsError)
        print(f"{ERROR_PREFIX}{first}", file=sys.stderr)
        return first.exit_code
    except ImportError as exc:
        # a dependency missing or unloadable (pip install --no-deps, no libfuse3.so):
        # what is missing and how to get it, not a traceback
        print(f"{ERROR_PREFIX}{missing_module_message(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0
    except OSError as exc:
        # a system call the command made on the user's behalf failed (most often a path
        # the user named that is not there or not theirs to read): the call's own words
        print(f"{ERROR_PREFIX}{os_error_message(exc)}", file=sys.stderr)
        return 2 if isinstance(exc, _PATH_ERRORS) and exc.filename is not None else 1
    return 0
