"""The `own_process` marker (tests/conftest.py) runs a test in a fresh Python process and reports its outcome."""

from __future__ import annotations

import os

import pytest

from tests.conftest import OWN_PROCESS_ENV

PARENT_PID = os.environ.get("FASTER_VLA_TEST_PARENT_PID") or str(os.getpid())
os.environ.setdefault("FASTER_VLA_TEST_PARENT_PID", PARENT_PID)  # inherited by the child process


@pytest.mark.own_process
def test_a_marked_test_runs_in_a_child_process():
    assert os.environ.get(OWN_PROCESS_ENV) == "1"
    assert str(os.getpid()) != os.environ["FASTER_VLA_TEST_PARENT_PID"]


@pytest.mark.own_process
def test_a_skip_in_the_child_is_a_skip_here():
    pytest.skip("skipped in the child on purpose")


def test_unmarked_tests_run_here():
    assert OWN_PROCESS_ENV not in os.environ
