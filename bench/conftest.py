"""Fixtures for the pytest-benchmark suite in bench/.

`pytest` (addopts: --benchmark-disable) runs every benchmark once as a smoke
test; `pytest bench --benchmark-enable` (optionally `-m "not slow"`) measures.
"""

import numba
import pytest


@pytest.fixture
def smoke(benchmark):
    """True when pytest-benchmark is disabled: each benchmark runs its function
    once, so heavy cases shrink to keep the default test run fast."""
    return bool(getattr(benchmark, "disabled", False))


@pytest.fixture(autouse=True)
def _restore_numba_threads():
    # lowprec.bench.limit_threads restores on exit; this also covers a failure
    # between set and restore
    n = numba.get_num_threads()
    yield
    numba.set_num_threads(n)
