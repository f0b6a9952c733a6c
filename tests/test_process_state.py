"""conftest.py puts environment variables and torch's thread count back after each test: the
first test changes both, the second (run after it, in file order) sees them restored."""
import os

import torch

_BEFORE: dict = {}


def test_a_test_may_change_the_environment_and_threads():
    _BEFORE.update(threads=torch.get_num_threads(), home=os.environ.get("HOME"))
    os.environ["DETRES_TEST_LEAK"] = "1"
    os.environ["HOME"] = "/nowhere"
    torch.set_num_threads(1 if _BEFORE["threads"] != 1 else 2)
    assert torch.get_num_threads() != _BEFORE["threads"]


def test_the_next_test_sees_them_restored():
    assert _BEFORE, "runs after the test above"
    assert "DETRES_TEST_LEAK" not in os.environ
    assert os.environ.get("HOME") == _BEFORE["home"]
    assert torch.get_num_threads() == _BEFORE["threads"]
