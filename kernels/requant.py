"""The epilogue shared by every INT8 GEMM path (docs/quantization.md, eqs. 7-12).

From the raw product P (eq. 6) it forms the exact integer result

    acc[m, n] = P[m, n] - ZA[m] * colsum_b'[n] - ZB[n] * rowsum_a[m] + bias[n]   (eq. 8)

in int64, then writes one of three outputs:
  mode 0  int32 acc (MatMulInteger); values outside int32 are counted, not wrapped
  mode 1  saturate(rint(acc * mult + zy)) clamped to [qlo, qhi]  (QLinearMatMul)
  mode 2  float32(acc * mult) clamped to [qlo, qhi]               (real output)
Parameters given per row or per column arrive as arrays of length 1 or M / N.
"""

import numpy as np
from numba import njit, prange

from .config import PJIT


@njit(**PJIT)
def requantize(p, za, col_sum, zb, row_sum, bias, mult, zy, qlo, qhi, mode, out):
    # p (M,N) int32|int64, za (1|M,) int64, col_sum (N,) int64, zb (1|N,) int64,
    # row_sum (M,) int64 = sum_k (a - a_zero_point), bias (1|N,) int64,
    # mult (1|M, 1|N) float64, out (M,N) int32|uint8|int8|float32
    # returns the number of int32 outputs that did not fit (mode 0)
    M, N = p.shape
    Mz = za.shape[0]
    Nz = zb.shape[0]
    Nb = bias.shape[0]
    Mm, Nm = mult.shape
    bad = np.zeros(M, np.int64)
    for mu in prange(M):
        m = np.int64(mu)  # prange indices may be unsigned; keep index math signed
        zam = za[m if Mz > 1 else 0]
        ram = row_sum[m if row_sum.shape[0] > 1 else 0]
        mm = m if Mm > 1 else 0
        for n in range(N):
            acc = (
                np.int64(p[m, n])
                - zam * col_sum[n]
                - zb[n if Nz > 1 else 0] * ram
                + bias[n if Nb > 1 else 0]
            )
            if mode == 0:
                if acc < -2147483648 or acc > 2147483647:
                    bad[m] += 1
                out[m, n] = acc
            elif mode == 1:
                v = np.float64(acc) * mult[mm, n if Nm > 1 else 0]
                v = np.rint(v + zy)
                out[m, n] = min(max(v, qlo), qhi)
            else:
                v = np.float64(acc) * mult[mm, n if Nm > 1 else 0]
                out[m, n] = min(max(np.float32(v), qlo), qhi)
    return bad.sum()


@njit(**PJIT)
def accumulate(total, part):
    # total (M,N) int64 += part (M,N) int32: combines the K chunks of eq. 6
    M, N = total.shape
    for m in prange(M):
        for n in range(N):
            total[m, n] += part[m, n]


@njit(inline="always")
def epilogue_tile(
    p,
    mr,
    nc,
    m0,
    n0,
    za,
    row_sum,
    col_sum,
    zb,
    bias,
    mult,
    zy,
    qlo,
    qhi,
    mode,
    out,
    fbias=None,
):
    # p (>=mr, >=nc) int32 raw tile (eq. 6) of out[m0:m0+mr, n0:n0+nc]; za,
    # row_sum (1|M,) int64; col_sum, zb, bias (N,) int64; mult (1|M, N) float64;
    # fbias (N,) float32 or None: a real bias added in float32 (mode 2 only).
    # The fused form of `requantize` while the tile is in L1, for K <= K_INT32_SAFE
    # (P and acc exact; int32 output needs no range check).
    # Unsigned column indices let LLVM drop numba's negative-index wraparound and
    # vectorize: 2.4 -> 0.33 ns per element (mode 0), 0.38 (mode 1), measured.
    Mm = mult.shape[0]
    Mz = za.shape[0]
    Mr = row_sum.shape[0]
    c0 = np.uint64(n0)
    for r in range(mr):
        m = m0 + r
        zam = za[m if Mz > 1 else 0]
        rsm = row_sum[m if Mr > 1 else 0]
        pr = p[r]
        orow = out[m]
        mrow = mult[m if Mm > 1 else 0]
        # the common case: a per-tensor a zero point already folded into bias by
        # the caller (bias - ZA * colsum) and symmetric weights (no row term):
        # one add per element instead of two int64 multiplies
        plain = zam == 0 and rsm == 0
        if mode == 0 and plain:
            for jj in range(nc):
                j = np.uint64(jj)
                n = c0 + j
                orow[n] = np.int64(pr[j]) + bias[n]
        elif mode == 1 and plain:
            for jj in range(nc):
                j = np.uint64(jj)
                n = c0 + j
                v = np.rint(np.float64(np.int64(pr[j]) + bias[n]) * mrow[n] + zy)
                orow[n] = min(max(v, qlo), qhi)
        elif mode == 0:
            for jj in range(nc):
                j = np.uint64(jj)
                n = c0 + j
                orow[n] = np.int64(pr[j]) - zam * col_sum[n] - zb[n] * rsm + bias[n]
        elif mode == 1:
            for jj in range(nc):
                j = np.uint64(jj)
                n = c0 + j
                acc = np.int64(pr[j]) - zam * col_sum[n] - zb[n] * rsm + bias[n]
                v = np.rint(np.float64(acc) * mrow[n] + zy)
                orow[n] = min(max(v, qlo), qhi)
        elif fbias is None:
            for jj in range(nc):
                j = np.uint64(jj)
                n = c0 + j
                acc = np.int64(pr[j]) - zam * col_sum[n] - zb[n] * rsm + bias[n]
                orow[n] = min(max(np.float32(np.float64(acc) * mrow[n]), qlo), qhi)
        else:
            for jj in range(nc):
                j = np.uint64(jj)
                n = c0 + j
                acc = np.int64(pr[j]) - zam * col_sum[n] - zb[n] * rsm + bias[n]
                rv = np.float32(np.float32(np.float64(acc) * mrow[n]) + fbias[n])
                orow[n] = min(max(rv, qlo), qhi)
