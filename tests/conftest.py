import logging
import os

import pytest
import torch


def _snapshot() -> tuple[dict[str, str], int]:
    return dict(os.environ), torch.get_num_threads()


def _restore(snapshot: tuple[dict[str, str], int]) -> None:
    env, num_threads = snapshot
    for key in [k for k in os.environ if k not in env]:
        del os.environ[key]
    for key, value in env.items():
        if os.environ.get(key) != value:
            os.environ[key] = value
    if torch.get_num_threads() != num_threads:
        torch.set_num_threads(num_threads)


@pytest.fixture(autouse=True, scope="module")
def _restore_process_state_per_module():
    """Module-scoped fixtures (e.g. a shared training run) may set environment variables or
    torch's thread count; put both back when the module is done (autouse fixtures of a scope
    are set up before that scope's other fixtures, so this one is torn down after them)."""
    snapshot = _snapshot()
    yield
    _restore(snapshot)


@pytest.fixture(autouse=True)
def _restore_process_state():
    """No test leaves environment variables or torch's intra-op thread count changed (tools
    call torch.set_num_threads(train.num_threads); some tests set DETRES_* variables)."""
    snapshot = _snapshot()
    yield
    _restore(snapshot)


@pytest.fixture(autouse=True)
def _reset_detres_logger():
    """Tools set up the "detres" logger (own handlers, no propagation); put it back after each
    test so that later tests' caplog sees its records whatever the test order."""
    yield
    logger = logging.getLogger("detres")
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    logger.propagate = True
    logger.setLevel(logging.NOTSET)


@pytest.fixture
def one_thread():
    """Tiny ops on a shared 2-core machine: a second OpenMP thread only adds waiting."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_cls_set(tmp_path_factory):
    """3 classes x (8 train, 4 val) images of the built-in kind (``helpers.tiny_cls_args``)."""
    from helpers import write_tiny_cls_set
    return write_tiny_cls_set(tmp_path_factory.mktemp("tiny_cls"), num_train=8, num_val=4)


@pytest.fixture(scope="session")
def finished_cls_run(tiny_cls_set, tmp_path_factory):
    """A finished 2-iteration tools/pretrain_cls.py run on ``tiny_cls_set`` (copy it before
    changing it), checkpoints after each iteration (``helpers.short_cls_run_args``)."""
    from helpers import load_tool, short_cls_run_args
    out = tmp_path_factory.mktemp("finished_cls_run") / "run"
    load_tool("pretrain_cls").main(short_cls_run_args(tiny_cls_set, out))
    return out
