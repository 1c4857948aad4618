import logging
import os
from collections.abc import Iterator

import pytest
import torch

# Tests run tiny models, often 2 ranks at once on a 2-core machine: one intra-op thread each.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)


_PKG = logging.getLogger("torchrec_dimgrow")
_PRISTINE = (list(_PKG.handlers), _PKG.propagate, _PKG.level)


def _restore_package_logger() -> None:
    handlers, propagate, level = _PRISTINE
    for handler in [h for h in _PKG.handlers if h not in handlers]:
        _PKG.removeHandler(handler)
    _PKG.propagate, _PKG.level = propagate, level


@pytest.fixture(autouse=True)
def _package_logger_as_found() -> Iterator[None]:
    """Every test starts and ends with the package logger as the session found it.

    A CLI run (``main()``, also inside module-scoped fixtures, which are set up before this
    one) gives it its own stderr handler and stops propagation: a later test's ``caplog``
    would see nothing, and the handler would write to a captured stream closed by then.
    """
    _restore_package_logger()
    yield
    _restore_package_logger()
