"""Jobs handed out at run time: a parallel driver's threads take the next job
number from a shared counter (an atomic add) instead of prange's fixed halves.

numba's prange gives each thread an equal contiguous share of the iterations
(the omp layer here, also with set_parallel_chunksize: a test loop whose first
iteration ran 30x longer still split 20/20), so a call lasts as long as its
slowest thread. On the shared 2-vCPU VM one vCPU often runs slower than the
other: in one process whose 2-thread calls of the float16 3x3 64->64 56^2
convolution took 2.1-3.5 ms, the fastest (2.14-2.18 ms) had split its 49 jobs
34 / 15 through the counter, where fixed halves would have waited for the
slow thread's 24 (~3.4 ms).

    for _ in prange(nt):                   # one pass per thread
        t = fetch_add(counter_address, 1)
        while t < njobs:
            ...job t...
            t = fetch_add(counter_address, 1)

The counter (int64) is set to 0 before the prange, on the calling thread. nt
is the thread count, passed in: numba.get_num_threads() inside a cached
function made numba refuse to cache it ("dynamic globals").
"""

from llvmlite import ir
from numba import types
from numba.extending import intrinsic

_i64 = ir.IntType(64)


@intrinsic
def fetch_add(typingctx, addr, val):
    """The int64 at address addr, then addr's value += val (one atomic
    read-modify-write, sequentially consistent)."""

    def codegen(context, builder, sig, args):
        ptr = builder.inttoptr(args[0], _i64.as_pointer())
        return builder.atomic_rmw("add", ptr, args[1], "seq_cst")

    return types.int64(types.int64, types.int64), codegen
