"""conftest.py puts environment variables and torch's thread count back after each test: a
test may change both, and the test after it sees them restored. Each check runs its own inner
session (pytester) with this folder's conftest.py, so it depends on no other test here."""
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

INNER = '''
import os

import torch

THREADS, HOME = torch.get_num_threads(), os.environ.get("HOME")   # before any test runs


def test_changes_them():
    os.environ["DETRES_TEST_LEAK"] = "1"
    os.environ["HOME"] = "/nowhere"
    torch.set_num_threads(1 if THREADS != 1 else 2)
    assert torch.get_num_threads() != THREADS


def test_sees_them_restored():
    assert os.environ.get("DETRES_TEST_LEAK") is None
    assert os.environ.get("HOME") == HOME
    assert torch.get_num_threads() == THREADS
'''


def run_inner(pytester, *node_ids: str, conftest: bool = True):
    """The inner tests ``node_ids``, in that order; their outcomes as pytester reports them."""
    if conftest:
        pytester.makeconftest(Path(__file__).with_name("conftest.py").read_text())
    pytester.makepyfile(test_inner=INNER)
    result = pytester.runpytest_inprocess("-v", "-p", "no:randomly", "-p", "no:cacheprovider",
                                          *(f"test_inner.py::{n}" for n in node_ids))
    ran = [n for line in result.outlines for n in node_ids
           if line.startswith(f"test_inner.py::{n} ")]
    assert ran == list(node_ids)
    return result


@pytest.mark.parametrize("order", [("test_changes_them", "test_sees_them_restored"),
                                   ("test_sees_them_restored", "test_changes_them")])
def test_the_next_test_sees_them_restored(pytester, order):
    run_inner(pytester, *order).assert_outcomes(passed=2)


def test_without_the_conftest_the_change_leaks(pytester):
    """The check above can fail: with no restoring fixture the second test sees the change."""
    run_inner(pytester, "test_changes_them", "test_sees_them_restored",
              conftest=False).assert_outcomes(passed=1, failed=1)
