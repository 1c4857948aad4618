import logging
import os
from collections.abc import Iterator

import pytest
import torch

# Tests run tiny models, often 2 ranks at once on a 2-core machine: one intra-op thread each.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _package_logger_as_found() -> Iterator[None]:
    """Undo what a CLI run in a test does to the package logger (its own stderr handler, no
    propagation): a later test's ``caplog`` would see nothing, and the handler would write to
    a captured stream that is closed by then."""
    pkg = logging.getLogger("torchrec_dimgrow")
    handlers, propagate, level = list(pkg.handlers), pkg.propagate, pkg.level
    yield
    for handler in [h for h in pkg.handlers if h not in handlers]:
        pkg.removeHandler(handler)
    pkg.propagate, pkg.level = propagate, level
