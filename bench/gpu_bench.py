"""GPU benchmark of lowprec's CUDA INT8 GEMM against cuBLAS (a GPU machine only).

Run (one command, from the repository root, with the cuda extra installed):

    python bench/gpu_bench.py                      # 1024^3, 2048^3, 4096^3
    python bench/gpu_bench.py --sizes 4096 --repeat 50 --json gpu.json

Compares, per square size n (M = N = K = n), the median of --repeat timed runs
(CUDA events around each call, after 3 warm-up calls that also JIT-compile):

    lowprec int8->int32   lowprec.cuda_ops.matmul_integer_cuda (uint8 x int8, zero
                          points 0: the GEMM kernel alone plus parameter uploads)
    lowprec int8->uint8   qlinear_matmul_cuda with zero points, per-channel scale
                          and bias (row/col sums + fused requantization)
    cuBLAS fp16 / fp32    cupy.matmul
    torch._int_mm         int8 x int8 -> int32 (cuBLASLt IMMA), when torch has CUDA

Prints GOP/s (2 n^3 / time) and lowprec's ratio to torch._int_mm and to cuBLAS
fp16 (targets, issue 7: int8 >= 0.5x torch._int_mm / cuBLAS int8 on 4096^3).
The lowprec results are checked bit-exactly against cupy's int32 product at the
smallest size first. Needs numba-cuda, cupy-cuda13x and a GPU; torch optional.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys


def _timeit(fn, repeat, cp):
    for _ in range(3):
        fn()
    cp.cuda.Device().synchronize()
    times = []
    start, stop = cp.cuda.Event(), cp.cuda.Event()
    for _ in range(repeat):
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(cp.cuda.get_elapsed_time(start, stop) / 1e3)
    return statistics.median(times)


def _bench_size(n, check, repeat, rng, cp, np, cuda_ops, torch, has_int_mm):
    a = cp.asarray(rng.integers(0, 256, (n, n), dtype=np.uint8))
    b = cp.asarray(rng.integers(-128, 128, (n, n), dtype=np.int8))
    sb = rng.uniform(0.001, 0.01, n).astype(np.float32)
    bias = rng.integers(-1000, 1000, n).astype(np.int32)
    if check:  # exactness against cupy's int32 product
        exact = a.astype(cp.int32) @ b.astype(cp.int32)
        got = cuda_ops.matmul_integer_cuda(a, b)
        assert bool((got == exact).all()), "lowprec int8 GEMM differs from cupy"
    row = {"n": n}
    row["lowprec_i8_i32"] = _timeit(
        lambda: cuda_ops.matmul_integer_cuda(a, b), repeat, cp
    )
    row["lowprec_i8_u8"] = _timeit(
        lambda: cuda_ops.qlinear_matmul_cuda(
            a, np.float32(0.02), np.uint8(128), b, sb, np.int8(0),
            np.float32(0.5), np.uint8(128), bias=bias,
        ),
        repeat, cp,
    )  # fmt: skip
    for name, dt in (("cublas_fp16", cp.float16), ("cublas_fp32", cp.float32)):
        x = cp.asarray(rng.standard_normal((n, n)), dtype=dt)
        y = cp.asarray(rng.standard_normal((n, n)), dtype=dt)
        row[name] = _timeit(lambda x=x, y=y: cp.matmul(x, y), repeat, cp)
    if has_int_mm:
        ta = torch.as_tensor(a.view(cp.int8), device="cuda")
        tb = torch.as_tensor(b, device="cuda")
        row["torch_int_mm"] = _timeit(lambda: torch._int_mm(ta, tb), repeat, cp)
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1024,2048,4096")
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args(argv)

    import cupy as cp
    import numpy as np

    from lowprec import cuda_ops

    try:
        import torch

        has_int_mm = torch.cuda.is_available() and hasattr(torch, "_int_mm")
    except ImportError:
        torch, has_int_mm = None, False

    dev = cp.cuda.runtime.getDeviceProperties(0)
    print(f"device: {dev['name'].decode()}  cupy {cp.__version__}", flush=True)
    sizes = [int(s) for s in args.sizes.split(",")]
    rng = np.random.default_rng(0)
    results = []
    for i, n in enumerate(sizes):
        row = _bench_size(n, i == 0, args.repeat, rng, cp, np, cuda_ops, torch,
                          has_int_mm)  # fmt: skip
        results.append(row)
        ops = 2.0 * n**3
        cols = [k for k in row if k != "n"]
        print(
            f"\nn={n}: "
            + "  ".join(f"{k} {ops / row[k] / 1e9:9.1f} GOP/s" for k in cols)
        )
        mine = row["lowprec_i8_i32"]
        if "torch_int_mm" in row:
            print(f"  lowprec int8 / torch._int_mm: {row['torch_int_mm'] / mine:.2f}x")
        print(f"  lowprec int8 / cuBLAS fp16:   {row['cublas_fp16'] / mine:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": dev["name"].decode(), "seconds": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
