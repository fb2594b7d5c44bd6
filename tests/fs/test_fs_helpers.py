"""The test helpers themselves: what a test relies on them for."""

from __future__ import annotations

import os
import time

import pytest

from tests.fs.helpers import ChildError, run_as_child


def test_run_as_child_returns_the_result_or_the_error() -> None:
    assert run_as_child(lambda: ("result", 42)) == ("result", 42)
    with pytest.raises(ChildError) as raised:
        run_as_child(lambda: os.stat("/nonexistent/file"))
    assert raised.value.errno == 2


def test_run_as_child_kills_a_child_that_hangs() -> None:
    """A child that does not finish within the timeout is killed and the test fails (the
    helper used to wait for the child's result without a deadline)."""
    with pytest.raises(AssertionError, match="did not finish within 0.5 s"):
        run_as_child(lambda: time.sleep(60), timeout=0.5)
