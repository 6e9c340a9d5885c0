import os

import numba
import pytest
from hypothesis import HealthCheck, settings

import lowprec

# CI and the default run use >= 200 examples per property; LOWPREC_HYPOTHESIS
# picks another profile ("dev" for quick local runs).
# The `isa` fixture is meant to hold for all examples of one test.
_SUPPRESS = [
    HealthCheck.too_slow,
    HealthCheck.data_too_large,
    HealthCheck.function_scoped_fixture,
]
settings.register_profile(
    "ci",
    max_examples=200,
    deadline=None,
    suppress_health_check=_SUPPRESS,
)
settings.register_profile(
    "dev", max_examples=30, deadline=None, suppress_health_check=_SUPPRESS
)
settings.load_profile(os.environ.get("LOWPREC_HYPOTHESIS", "ci"))


@pytest.fixture(params=lowprec.available_isas())
def isa(request):
    """Run the test once per instruction-set path this CPU supports (forced)."""
    before = lowprec.get_isa()
    lowprec.set_isa(request.param)
    yield request.param
    lowprec.set_isa(before)


@pytest.fixture
def use_isa():
    """For property tests that draw the path per example (one hypothesis run
    spreads its examples over every path): force it, restore after the test."""
    before = lowprec.get_isa()
    yield lowprec.set_isa
    lowprec.set_isa(before)


@pytest.fixture
def threads():
    """Restore numba's thread count after a test that changes it."""
    n = numba.get_num_threads()
    yield numba.config.NUMBA_NUM_THREADS
    numba.set_num_threads(n)
