"""The one place that turns a failed command into a line on stderr and an exit status.

The status comes from the error's type (``KmsfsError.exit_code``, see ``kmsfs.errors``).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator

from kmsfs.errors import KmsfsError


def _leaf_errors(group: BaseExceptionGroup) -> Iterator[BaseException]:
    for error in group.exceptions:
        if isinstance(error, BaseExceptionGroup):
            yield from _leaf_errors(error)
        else:
            yield error


def run_reporting_errors(command: Callable[[], None]) -> int:
    """Run ``command``; return 0, or print one line for its error and return its status."""
    try:
        command()
    except KmsfsError as exc:
        print(f"kmsfs: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except BaseExceptionGroup as group:
        # trio wraps what fails while a nursery starts (keyd serve: a live socket) in a
        # group: one line for the first kmsfs error, if kmsfs errors are all it holds
        errors = list(_leaf_errors(group))
        if not all(isinstance(error, KmsfsError) for error in errors):
            raise
        first = errors[0]
        assert isinstance(first, KmsfsError)
        print(f"kmsfs: error: {first}", file=sys.stderr)
        return first.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0
    return 0
