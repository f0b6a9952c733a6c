import logging

import pytest


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
