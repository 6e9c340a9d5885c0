"""kernels/jobs.py: job numbers handed out by an atomic counter."""

import numba
import numpy as np
import pytest
from numba import njit, prange

from lowprec.kernels.jobs import fetch_add


@njit(parallel=True)
def _run(counter, hits, who, nt):
    counter[0] = 0
    for _ in prange(nt):
        t = fetch_add(counter.ctypes.data, 1)
        while t < hits.shape[0]:
            hits[t] += 1
            who[t] = numba.get_thread_id()
            t = fetch_add(counter.ctypes.data, 1)


@pytest.mark.parametrize("nt", [1, 2, 5])
@pytest.mark.parametrize("njobs", [0, 1, 7, 1000])
def test_every_job_runs_once(nt, njobs):
    # nt passes (more than the pool's threads: the later ones find the
    # counter past the end), each job taken by exactly one of them
    counter = np.full(1, -3, np.int64)
    hits = np.zeros(njobs, np.int64)
    who = np.full(njobs, -1, np.int64)
    _run(counter, hits, who, nt)
    assert (hits == 1).all()
    assert ((who >= 0) & (who < numba.config.NUMBA_NUM_THREADS)).all()
    # every pass took one number past the last job
    assert counter[0] == njobs + nt


def test_fetch_add_returns_the_old_value():
    @njit
    def f(a):
        x = fetch_add(a.ctypes.data, 5)
        y = fetch_add(a.ctypes.data + 8, -2)
        return x, y

    a = np.array([10, 3], np.int64)
    assert f(a) == (10, 3)
    assert a.tolist() == [15, 1]
