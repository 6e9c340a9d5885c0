"""GPU benchmark of lowprec's CUDA kernels against cuBLAS, cuSPARSE, cuDNN (GPU only).

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

    lowprec fp16          lowprec.cuda_ops.matmul_fp16_cuda (float16 in, float32
                          accumulate and out; issue 7 target >= 0.5x cuBLAS fp16)

Prints GOP/s (2 n^3 / time) and lowprec's ratio to torch._int_mm and to cuBLAS
fp16 (targets, issue 7: int8 >= 0.5x torch._int_mm / cuBLAS int8 on 4096^3).
The lowprec results are checked bit-exactly against cupy's int32 product at the
smallest size first. Needs numba-cuda, cupy-cuda13x and a GPU; torch optional.

``--ops`` also selects (default: all)

    spmm    W (n, n) at 90% sparsity (CSR) @ X (n, --spmm-n) float32:
            lowprec spmm_cuda, qlinear_spmm_cuda (int8 W, uint8 X), cuSPARSE
            (cupyx.scipy.sparse.csr_matrix @ X), torch.sparse.mm when present;
            GOP/s counted on the stored entries (2 nnz N / time);
            issue 7 target: lowprec float >= cuSPARSE
    conv    a ResNet-50 stage-1 3x3 convolution, N=32, 64 -> 64 channels,
            56 x 56, pad 1: lowprec qlinear_conv (uint8, NCHW and NHWC),
            conv_fp16_cuda, and torch (cuDNN) fp16 NCHW when present;
            GOP/s = 2 N M Ho Wo C kH kW / time
    bf16    per size n: lowprec matmul_bf16_cuda (uint16 bfloat16 bits in,
            float32 accumulate and out) vs torch.matmul on bfloat16 (cuBLAS,
            tensor cores, when torch has CUDA), checked against cuBLAS fp32
    dqmm    per size n: lowprec dynamic_quantize_matmul_cuda, float32 a (n, n)
            quantized on the fly (per tensor and per row), int8 weights on the
            device, float bias; vs torch float32 and float16 matmul (cuBLAS) and
            torch's dynamic-quantization recipe on the GPU (abs-max scale,
            round to int8, torch._int_mm, rescale) when present; checked bit
            for bit against the CPU lowprec.dynamic_quantize_matmul at the
            smallest size
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
    a16 = cp.asarray(rng.standard_normal((n, n)), dtype=cp.float16)
    b16 = cp.asarray(rng.standard_normal((n, n)), dtype=cp.float16)
    if check:  # the float32 sums of lowprec.half's contract, vs cuBLAS fp32
        got = cuda_ops.matmul_fp16_cuda(a16, b16)
        ref = a16.astype(cp.float32) @ b16.astype(cp.float32)
        err = float(cp.abs(got - ref).max() / cp.abs(ref).max())
        assert err < 1e-5, f"lowprec fp16 GEMM relative error {err}"
    row["lowprec_fp16"] = _timeit(
        lambda: cuda_ops.matmul_fp16_cuda(a16, b16), repeat, cp
    )
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
    ap.add_argument(
        "--ops", default="gemm,spmm,conv,bf16,dqmm", help="gemm, spmm, conv, bf16, dqmm"
    )
    ap.add_argument("--spmm-n", type=int, default=256, help="columns of X (SpMM)")
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
    ops = set(args.ops.split(","))
    rng = np.random.default_rng(0)
    results = []
    for i, n in enumerate(sizes if "gemm" in ops else []):
        row = _bench_size(n, i == 0, args.repeat, rng, cp, np, cuda_ops, torch,
                          has_int_mm)  # fmt: skip
        results.append(row)
        work = 2.0 * n**3  # (not `ops`: the --ops set is read below)
        cols = [k for k in row if k != "n"]
        print(
            f"\nn={n}: "
            + "  ".join(f"{k} {work / row[k] / 1e9:9.1f} GOP/s" for k in cols)
        )
        mine = row["lowprec_i8_i32"]
        if "torch_int_mm" in row:
            print(f"  lowprec int8 / torch._int_mm: {row['torch_int_mm'] / mine:.2f}x")
        print(f"  lowprec int8 / cuBLAS fp16:   {row['cublas_fp16'] / mine:.2f}x")
        print(
            f"  lowprec fp16 / cuBLAS fp16:   "
            f"{row['cublas_fp16'] / row['lowprec_fp16']:.2f}x"
        )
    extra = {}
    if "spmm" in ops:
        extra["spmm"] = [
            _bench_spmm(n, args.spmm_n, args.repeat, rng, cp, np, cuda_ops, torch)
            for n in sizes
        ]
    if "conv" in ops:
        extra["conv"] = _bench_conv(args.repeat, rng, cp, np, cuda_ops, torch)
    if "bf16" in ops:
        extra["bf16"] = [
            _bench_bf16(n, args.repeat, rng, cp, np, cuda_ops, torch) for n in sizes
        ]
    if "dqmm" in ops:
        extra["dqmm"] = [
            _bench_dqmm(n, i == 0, args.repeat, rng, cp, np, cuda_ops, torch,
                        has_int_mm)
            for i, n in enumerate(sizes)
        ]  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"device": dev["name"].decode(), "seconds": results, **extra},
                f,
                indent=1,
            )
    return 0


def _report(title, work, row):
    print(f"\n{title}: " + "  ".join(
        f"{k} {work / t / 1e9:9.1f} GOP/s" for k, t in row.items() if k != "shape"
    ))  # fmt: skip


def _bench_spmm(n, N, repeat, rng, cp, np, cuda_ops, torch):
    from cupyx.scipy import sparse as cpsp

    from lowprec import sparse as sp

    mask = rng.random((n, n)) < 0.1  # 90% sparsity
    w = (rng.standard_normal((n, n)) * mask).astype(np.float32)
    W = sp.from_dense(w, mask)
    Wq = sp.from_dense(w, mask, dtype=np.int8)
    x = cp.asarray(rng.standard_normal((n, N)), dtype=cp.float32)
    xq = cp.asarray(rng.integers(0, 256, (n, N), dtype=np.uint8))
    ws = cpsp.csr_matrix(cp.asarray(w))
    got = cuda_ops.spmm_cuda(W, x)
    ref = ws @ x
    err = float(cp.abs(got - ref).max() / cp.abs(ref).max())
    assert err < 1e-5, f"lowprec SpMM relative error {err}"
    row = {"shape": [n, n, N]}
    row["lowprec_spmm_f32"] = _timeit(lambda: cuda_ops.spmm_cuda(W, x), repeat, cp)
    args = (np.float32(0.02), np.uint8(128), np.float32(0.5), np.uint8(128))
    row["lowprec_qspmm_u8"] = _timeit(
        lambda: cuda_ops.qlinear_spmm_cuda(Wq, xq, *args), repeat, cp
    )
    row["cusparse_f32"] = _timeit(lambda: ws @ x, repeat, cp)
    if torch is not None and torch.cuda.is_available():
        tw = torch.as_tensor(w, device="cuda").to_sparse_csr()
        tx = torch.as_tensor(x, device="cuda")
        row["torch_sparse_mm"] = _timeit(lambda: torch.sparse.mm(tw, tx), repeat, cp)
    _report(f"SpMM {n}x{n} @ 90% x {N}", 2.0 * W.nnz * N, row)
    print(f"  lowprec / cuSPARSE: {row['cusparse_f32'] / row['lowprec_spmm_f32']:.2f}x")
    return row


def _bench_conv(repeat, rng, cp, np, cuda_ops, torch):
    N, C, H, W, M = 32, 64, 56, 56, 64
    x = rng.integers(0, 256, (N, C, H, W), dtype=np.uint8)
    w = rng.integers(-128, 128, (M, C, 3, 3), dtype=np.int8)
    xd = cp.asarray(x)
    xh = cp.asarray(np.ascontiguousarray(x.transpose(0, 2, 3, 1)))
    args = (np.float32(0.02), np.uint8(128), w, np.float32(0.01), None,
            np.float32(0.5), np.uint8(128))  # fmt: skip
    row = {"shape": [N, C, H, W, M, 3, 3]}
    row["lowprec_qconv_nchw"] = _timeit(
        lambda: cuda_ops.qlinear_conv_cuda(xd, *args, pads=(1, 1, 1, 1)), repeat, cp
    )
    row["lowprec_qconv_nhwc"] = _timeit(
        lambda: cuda_ops.qlinear_conv_cuda(xh, *args, pads=(1,) * 4, layout="NHWC"),
        repeat, cp,
    )  # fmt: skip
    x16 = cp.asarray(rng.standard_normal((N, C, H, W)), dtype=cp.float16)
    w16 = cp.asarray(rng.standard_normal((M, C, 3, 3)), dtype=cp.float16)
    row["lowprec_conv_fp16"] = _timeit(
        lambda: cuda_ops.conv_fp16_cuda(x16, w16, pads=(1, 1, 1, 1)), repeat, cp
    )
    if torch is not None and torch.cuda.is_available():
        tx = torch.as_tensor(x16, device="cuda")
        tw = torch.as_tensor(w16, device="cuda")
        conv = torch.nn.functional.conv2d
        row["torch_cudnn_fp16"] = _timeit(lambda: conv(tx, tw, padding=1), repeat, cp)
    _report("conv 3x3 64->64 56x56 N=32", 2.0 * N * M * H * W * C * 9, row)
    return row


def _torch_cuda(torch):
    return torch is not None and torch.cuda.is_available()


def _bench_bf16(n, repeat, rng, cp, np, cuda_ops, torch):
    import lowprec

    a = lowprec.float32_to_bfloat16(rng.standard_normal((n, n)).astype(np.float32))
    b = lowprec.float32_to_bfloat16(rng.standard_normal((n, n)).astype(np.float32))
    ad, bd = cp.asarray(a), cp.asarray(b)  # uint16 bit patterns on the device
    got = cuda_ops.matmul_bf16_cuda(ad, bd)
    a32 = (ad.astype(cp.uint32) << 16).view(cp.float32)
    b32 = (bd.astype(cp.uint32) << 16).view(cp.float32)
    ref = a32 @ b32
    err = float(cp.abs(cp.asarray(got) - ref).max() / cp.abs(ref).max())
    assert err < 1e-5, f"lowprec bf16 GEMM relative error {err}"
    row = {"shape": [n, n, n]}
    row["lowprec_bf16"] = _timeit(lambda: cuda_ops.matmul_bf16_cuda(ad, bd), repeat, cp)
    row["cublas_fp32"] = _timeit(lambda: a32 @ b32, repeat, cp)
    if _torch_cuda(torch):
        ta = torch.as_tensor(a32, device="cuda").to(torch.bfloat16)
        tb = torch.as_tensor(b32, device="cuda").to(torch.bfloat16)
        row["torch_bf16"] = _timeit(lambda: ta @ tb, repeat, cp)
    _report(f"bf16 GEMM {n}^3", 2.0 * n**3, row)
    if "torch_bf16" in row:
        ratio = row["torch_bf16"] / row["lowprec_bf16"]
        print(f"  lowprec bf16 / cuBLAS bf16 (bf16 out): {ratio:.2f}x")
    return row


def _bench_dqmm(n, check, repeat, rng, cp, np, cuda_ops, torch, has_int_mm):
    import lowprec

    a = (rng.standard_normal((n, n)) * 3).astype(np.float32)
    b = rng.integers(-128, 128, (n, n), dtype=np.int8)
    sb = rng.uniform(0.001, 0.01, n).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32)
    ad, bd = cp.asarray(a), cp.asarray(b)
    if check:  # bit-exact against the CPU function
        for per_row in (False, True):
            got = cuda_ops.dynamic_quantize_matmul_cuda(
                ad, bd, sb, bias=bias, per_row=per_row
            )
            cpu = lowprec.dynamic_quantize_matmul(a, b, sb, bias=bias, per_row=per_row)
            got = cp.asnumpy(cp.asarray(got)).view(np.uint32)
            assert np.array_equal(got, cpu.view(np.uint32)), "dqmm differs from CPU"
    row = {"shape": [n, n, n]}
    for per_row in (False, True):
        row[f"lowprec_dqmm{'_rows' if per_row else ''}"] = _timeit(
            lambda per_row=per_row: cuda_ops.dynamic_quantize_matmul_cuda(
                ad, bd, sb, bias=bias, per_row=per_row
            ),
            repeat,
            cp,
        )
    if _torch_cuda(torch):
        ta = torch.as_tensor(ad, device="cuda")
        tw = torch.as_tensor(bd, device="cuda").float() * torch.as_tensor(sb).cuda()
        tbias = torch.as_tensor(bias).cuda()
        row["torch_fp32"] = _timeit(lambda: torch.addmm(tbias, ta, tw), repeat, cp)
        ta16, tw16 = ta.half(), tw.half()
        row["torch_fp16"] = _timeit(lambda: ta16 @ tw16, repeat, cp)
        if has_int_mm:  # torch's dynamic-quant recipe (symmetric int8 a)
            tb8 = torch.as_tensor(bd, device="cuda")
            tsb = torch.as_tensor(sb).cuda()

            def recipe():
                s = ta.abs().amax() / 127.0
                q = torch.clamp(torch.round(ta / s), -127, 127).to(torch.int8)
                return torch._int_mm(q, tb8).float() * (s * tsb) + tbias

            row["torch_dyn_int_mm"] = _timeit(recipe, repeat, cp)
    _report(f"dynamic quantized matmul {n}^3", 2.0 * n**3, row)
    return row


if __name__ == "__main__":
    sys.exit(main())
