"""float16 convolution with float32 accumulation (ONNX Conv semantics).

``conv_fp16(x, w, bias, ...)`` takes float16 ``x`` (N, C, [H,] W) and ``w``
(M, C/group, [kH,] kW), computes every product and sum in float32 and returns
float32 (or float16, rounded once) in NCHW, as ONNX Conv on the float32 values.

Accuracy contract (tests/test_conv_half.py checks each line on every path):

* Summation order. x is padded with +0 (ONNX pads); for each output
  (n, m, oh, ow), with g = m // (M/group), Cg = C/group, one float32
  accumulator starting at +0 sums the K = kH*kW*Cg taps in the order

      for i in 0..kH-1, for j in 0..kW-1, for c in 0..Cg-1:       (c fastest)
          acc = fl32(acc + xpad[n, g*Cg + c, oh*sH + i*dH, ow*sW + j*dW]
                           * w[m, c, i, j])

  (xpad: x with pads[begin] zeros before and pads[end] after each spatial axis)

  (1-D: kH = 1). Products of two float16 values are exact in float32, so the
  result equals a float32 reference summing in this order, bit for bit, on
  every path (F16C+FMA kernels, depthwise loops, portable loops).
* Error bound. |result - exact| <= gamma_K * sum |x| |w| over the K taps,
  gamma_K = K u / (1 - K u), u = 2**-24.
* Epilogue, as :func:`lowprec.matmul_fp16`: y = clamp(fl32(acc + bias[m]),
  lo, hi), then float32, or float16 rounded to nearest even (overflow -> inf).
* Padding taps are real products with +0: they leave a finite sum unchanged,
  and 0 * inf = NaN (an inf/NaN weight next to padding gives NaN, as ONNX's
  reference implementation that pads with zeros). NaN and inf propagate.

Kernels (kernels/fp16_conv.py), F16C+FMA with the sum in registers over all
kernel taps and channels (implicit GEMM, no im2col): the taps kernel (6
pixels x 64 channels, straight on a zero-padded float32 image; 1x1 converts
float16 per block of pixels instead) for layers with >= 16 channels per
group; the rows kernel (6 channels x 64 pixels, on the image split into
stride phases, stored NCHW in vectors) for fewer channels, such as the RGB
stem, and where the taps kernel's 64-channel panels would run mostly empty;
depthwise convolutions have a row microkernel vectorized over 16 pixels;
threads split the work over output pixels and, when pixels are few, output
channels. On avx2_f16c (AVX2 CPUs) the weights are the A rows of
fp16_gemm's 16-column ymm strips and each job's B is the taps of 64 output
pixels, packed into a float16 panel from the image split into its stride
phases (output rows' runs, through a table of tap offsets: any stride, as
the rows kernel); the depthwise row kernels run there as they are (plain LLVM
vectors, split into ymm pairs).
"""

from __future__ import annotations

import threading

import numba
import numpy as np

from . import _dispatch, half
from . import _validate as v
from .conv import (
    _attrs,
    _check_group,
    _geometry,
    _ints,
    _key,
    _remember,
    _Uncacheable,
    check_w_shape,
)

_F16 = np.dtype(np.float16)
_F32 = np.dtype(np.float32)
# writeable dummies, 3-D as the real outputs: one compiled variant per kernel
_DUMMY32 = np.empty((1, 1, 1), np.float32)
_DUMMY16 = np.empty((1, 1, 1), np.uint16)
_DUMMY_SA = np.empty((1, 1, 1), np.float32)

# channels per group below which the SIMD path always takes the rows kernel
# (its channel loop per tap is short, but the taps kernel's is as short)
ROWS_BELOW = 16
# with fewer than this many row segments (and border-column jobs) per
# thread, jobs are also split over 64-channel weight panels (threads over
# output channels), as lowprec/conv.py. 16: 256x14x14 3x3 on 2 threads ran
# 16 unequal jobs (the first and last rows and the border columns run fewer
# taps) at 228 GFLOP/s with 8, 64 jobs at 232 (15 alternating rounds)
SPLIT_N_TILES = 16
# below this many jobs per thread their count is rounded up to a multiple of
# the thread count (one job more on one thread costs > 3 % here)
BALANCE_JOBS = 32
# a prepared taps-kernel call keeps its scratch views (per thread) up to this
# many bytes of input copies: small layers, where the lookups cost
KEEP_SCRATCH_BYTES = 1 << 20


_KC = []


def _kernels():
    # imported on first use (numba compiles or loads the kernels then); the
    # module kept, as an import statement costs ~1 us a call
    if not _KC:
        from .kernels import fp16_conv

        _KC.append(fp16_conv)
    return _KC[0]


class PackedConvWeightsFP16:
    """Immutable prepacked float16 convolution weights for :func:`conv_fp16`.

    Build with :func:`pack_conv_weights_fp16`. Holds the float16 weights and
    each path's layout (built on first use): [group][M/group/64][K][64]
    float32 tiles in K order (i, j, c) for the taps kernel, [group][M/group/6]
    [K][6] for the rows kernel, (group, K, M/group) for the portable loops,
    (C, kH*kW) for depthwise.
    """

    __slots__ = ("shape", "group", "_bits", "_layouts", "_finite", "_plans")

    def __init__(self, w: np.ndarray, group: int):
        bits = np.array(w.view(np.uint16), order="C")  # an owned copy
        bits.flags.writeable = False
        for name, value in (
            ("shape", tuple(w.shape)),
            ("group", group),
            ("_bits", bits),
            ("_layouts", {}),
            ("_finite", None),  # _all_finite's answer, once asked
            ("_plans", {}),  # conv_fp16's prepared calls (_plan_key -> run)
        ):
            object.__setattr__(self, name, value)

    def __setattr__(self, name, value):
        msg = (
            "PackedConvWeightsFP16 is immutable; pack new weights with "
            "lowprec.pack_conv_weights_fp16"
        )
        raise AttributeError(msg)

    def __repr__(self):
        return f"PackedConvWeightsFP16(shape={self.shape}, group={self.group})"

    def _all_finite(self) -> bool:
        """No inf/NaN weight: a tap reading only padding then adds +-0 to every
        sum (never -0: the sum starts at +0), so the taps kernel may skip it.
        Asked on that path only; the exponent bits test costs ~95 us for
        256x256x3x3 (np.isfinite on float16: ~1 ms)."""
        if self._finite is None:
            finite = bool(((self._bits & 0x7C00) != 0x7C00).all())
            object.__setattr__(self, "_finite", finite)
        return self._finite

    @property
    def nbytes(self) -> int:
        """Bytes held: the weights and every layout built so far."""
        return self._bits.nbytes + sum(a.nbytes for a in self._layouts.values())

    def _gemm_order(self) -> np.ndarray:
        """(G, K, Mg) float32: wk[g, (i*kw + j)*Cg + c, m] = w[g*Mg + m, c, i, j]."""
        M, Cg = self.shape[:2]
        ks = self.shape[2:]
        kh, kw = (1, ks[0]) if len(ks) == 1 else ks
        G = self.group
        w32 = self._bits.view(np.float16).astype(np.float32)
        w32 = w32.reshape(G, M // G, Cg, kh, kw)
        return np.ascontiguousarray(
            w32.transpose(0, 3, 4, 2, 1).reshape(G, kh * kw * Cg, M // G)
        )

    def _layout(self, kind: str) -> np.ndarray:
        lay = self._layouts.get(kind)
        if lay is not None:
            return lay
        if kind == "portable":
            lay = self._gemm_order()
        elif kind == "dw":
            M = self.shape[0]
            lay = np.ascontiguousarray(
                self._bits.view(np.float16).astype(np.float32).reshape(M, -1)
            )
        elif kind == "rows":  # (G, MT, K, WS) float32, zero channels past M/group
            wk = self._gemm_order()
            G, K, Mg = wk.shape
            ws = _kernels().WS
            MT = -(-Mg // ws)
            padded = np.zeros((G, K, MT * ws), np.float32)
            padded[:, :, :Mg] = wk
            lay = np.ascontiguousarray(
                padded.reshape(G, K, MT, ws).transpose(0, 2, 1, 3)
            )
        elif kind == "avx2":  # (G, Mg, K) float32: the strips' A rows
            lay = np.ascontiguousarray(self._gemm_order().transpose(0, 2, 1))
        else:  # "simd": (G, NP, K, NR) float32, zero columns past M/group
            wk = self._gemm_order()
            G, K, Mg = wk.shape
            nr = _kernels().NR
            NP = -(-Mg // nr)
            size = G * NP * K * nr
            raw = np.zeros(size + 16, np.float32)
            off = ((-raw.ctypes.data) % 64) // 4
            lay = raw[off : off + size].reshape(G, NP, K, nr)
            padded = np.zeros((G, K, NP * nr), np.float32)
            padded[:, :, :Mg] = wk
            lay[...] = padded.reshape(G, K, NP, nr).transpose(0, 2, 1, 3)
        lay.flags.writeable = False
        self._layouts[kind] = lay
        return lay


# 64-position tiles per job of the rows kernel (before the split below), and
# the fewest jobs per thread before channel tiles are split across jobs too
ROWS_QB = 8
ROWS_MIN_JOBS = 4


def _use_rows(Cg, Mg, Ho, Wo, Wp, sw) -> bool:
    """The channels-as-rows kernel, or the 64-channel taps kernel?

    Few channels per group (< ROWS_BELOW; the 3-channel stem): rows, whose
    K loop runs Cg channels per tap straight from the phase planes (the taps
    kernel read 3-channel stems from an NHWC copy and gathered the rest:
    1.16-4.8x slower on 7 few-channel layers, 1 thread; on 2 threads one of
    them, 8 -> 32 channels at 56x56, ran 0.85x). Otherwise the kernel
    that wastes less of its tile: taps loses the columns past M/group in its
    64-wide panels, rows the grid's pad columns and the last tile's tail, and
    its 6-channel tiles past M/group. At equal use taps measured 3-15 %
    faster (3x3c64_56: 0.97x; strided layers convert every phase: 0.6-0.8x).
    """
    if Cg < ROWS_BELOW:
        return True
    Wq = -(-Wp // sw)
    use_taps = Mg / (64 * -(-Mg // 64))
    use_rows = Ho * Wo / (64 * -(-Ho * Wq // 64)) * Mg / (6 * -(-Mg // 6))
    return use_rows > 1.1 * use_taps


def _conv_rows(kc, x_bits, wr, geo, pt, pl, epi):
    N, Hp, Wp, C, Ho, Wo, kh, kw, sh, sw, dh, dw, G, Cg, Mg, M = geo.tolist()
    Hq, Wq = -(-Hp // sh), -(-Wp // sw)
    P = sh * sw * Hq * Wq
    # zeros after the last phase plane: a tile loads all 64 of its positions
    # for every tap, and the last one's dropped lanes reach up to 63 + Wq - Wo
    # floats past the plane (a 251-tap 1-D kernel: 280)
    slack = kc.NR + Wq
    raw = _dispatch.scratch("conv_fp16.phases", N * C * P + slack, np.float32)
    raw[N * C * P :] = 0.0
    xp = raw[: N * C * P].reshape(N * C, P)
    offs = np.empty(kh * kw, np.int64)
    for i in range(kh):
        for j in range(kw):
            r, c = i * dh, j * dw
            ph = (r % sh) * sw + c % sw
            offs[i * kw + j] = 4 * (ph * Hq * Wq + (r // sh) * Wq + c // sw)
    ntile = -(-Ho * Wq // kc.NR)
    nq, nblk = _rows_split(N * G, ntile, wr.shape[1])
    threads = numba.config.NUMBA_NUM_THREADS
    ps = np.empty((threads, 2 * kc.NV * -(-ntile // nq)), np.int64)
    kc.conv_rows(nq, nblk, Cg == 3, x_bits, pt, pl, xp, wr, geo, Wq, offs, ps, *epi)


def _skip_plan(packed, MR, pt, pl, H, W, Hp, Wp, kw, sw, dw, Wo):
    """The taps kernel's skip argument: (pt, pl, H, W, eL, eR) int64 where its
    tiles leave out taps that read padding alone, else (-1, 0, 0, 0, 0, 0).

    Only with finite weights (a padding product is then +-0, which leaves
    the float32 sum unchanged: it never is -0, starting at +0) and padding.
    eL / eR: the columns at a row's start / end whose pixels miss a kernel
    column (at most MR each, else 0): the kernel runs them as tiles down
    the column, leaving the row tiles between them all kernel columns.
    """
    if (Hp, Wp) == (H, W) or not packed._all_finite():
        return np.array([-1, 0, 0, 0, 0, 0], np.int64)
    eL = min(-(-pl // sw), Wo)  # ow * sw < pl: column 0 reads padding
    # ow * sw + (kw - 1) * dw >= pl + W: the last column reads padding
    first = (pl + W - 1 - (kw - 1) * dw) // sw + 1
    eR = min(max(Wo - max(first, 0), 0), Wo)
    if eL > MR or eR > MR or Wo - eL - eR < 1:
        eL = eR = 0
    return np.array([pt, pl, H, W, eL, eR], np.int64)


def _rows_split(units, ntile, MT):
    """(nq, nblk): position chunks per image/group and channel blocks."""
    threads = _dispatch.num_threads()
    nq = max(1, min(ntile, round(ntile / ROWS_QB)))
    # a multiple of the threads when there are few jobs (prange hands each
    # thread an equal contiguous count: 13 jobs on 2 threads ran 7 against 6)
    if units * nq < BALANCE_JOBS * threads:
        while (units * nq) % threads and nq < ntile:
            nq += 1
    nblk = 1
    if units * nq < ROWS_MIN_JOBS * threads:
        nblk = min(MT, -(-ROWS_MIN_JOBS * threads // (units * nq)))
    return nq, nblk


def _check_w(w):
    v.check_array(w, "w", (_F16,), fix="convert it with w.astype(np.float16)")
    check_w_shape(w)


def pack_conv_weights_fp16(w, *, group: int = 1) -> PackedConvWeightsFP16:
    """Prepack float16 convolution weights once for many :func:`conv_fp16` calls.

    Parameters
    ----------
    w : ndarray (M, C/group, kW) or (M, C/group, kH, kW) of float16
    group : int, the convolution's number of groups

    Returns
    -------
    PackedConvWeightsFP16, accepted as ``w`` by :func:`conv_fp16` (same results).
    """
    if isinstance(w, PackedConvWeightsFP16):
        msg = "w is already a PackedConvWeightsFP16; pass it to conv_fp16 directly"
        raise TypeError(msg)
    _check_w(w)
    group = _check_group(group)
    if w.shape[0] % group:
        msg = (
            f"w has M={w.shape[0]} output channels, not divisible by group={group}; "
            f"each group needs M/group output channels"
        )
        raise ValueError(msg)
    return PackedConvWeightsFP16(w, group)


def _fp16_out_dtype(out_dtype):
    try:
        dt = np.dtype(out_dtype)
    except TypeError:
        dt = None
    if dt not in (_F32, _F16):
        msg = f"out_dtype must be np.float32 or np.float16, got {out_dtype!r}"
        raise TypeError(msg)
    return dt


def conv_fp16(
    x,
    w,
    bias=None,
    *,
    auto_pad="NOTSET",
    dilations=None,
    group=1,
    kernel_shape=None,
    pads=None,
    strides=None,
    activation=None,
    out_dtype=np.float32,
    device=None,
):
    """ONNX Conv on float16 inputs with float32 products and sums.

    Parameters
    ----------
    x : ndarray (N, C, W) or (N, C, H, W) of float16 (NCHW, as ONNX)
    w : ndarray (M, C/group, kW) or (M, C/group, kH, kW) of float16, or
        :class:`PackedConvWeightsFP16`
    bias : float32 or float16 (M,), optional; added to the float32 sum
    auto_pad, dilations, group, kernel_shape, pads, strides : as ONNX Conv
    activation : None, "relu", "relu6" or a (min, max) clamp (fused)
    out_dtype : np.float32 (default) or np.float16 (rounded once, to nearest
        even; overflow gives inf)
    device : None, "cpu" or "cuda"; None follows x (docs/cuda.md)

    Returns
    -------
    ndarray (N, M, *out_spatial) of ``out_dtype``. The sum order and error
    bound are this module's accuracy contract; inputs are never modified.

    Examples
    --------
    >>> import numpy as np, lowprec
    >>> x = np.arange(9, dtype=np.float16).reshape(1, 1, 3, 3)
    >>> w = np.ones((1, 1, 2, 2), np.float16)
    >>> lowprec.conv_fp16(x, w)
    array([[[[ 8., 12.],
             [20., 24.]]]], dtype=float32)
    """
    if device is not None or type(x) is not np.ndarray:
        from . import _cuda, cuda_ops

        if _cuda.use_cuda(x, device=device):
            return cuda_ops.conv_fp16_cuda(
                x, w, bias, auto_pad=auto_pad, dilations=dilations, group=group,
                kernel_shape=kernel_shape, pads=pads, strides=strides,
                activation=activation, out_dtype=out_dtype,
            )  # fmt: skip
    key = _plan_key(
        x, w, group, auto_pad, dilations, kernel_shape, pads, strides, activation,
        out_dtype,
    )  # fmt: skip
    plan = w._plans.get(key) if key is not None else None
    if plan is None:
        plan = _remember(w, key, _plan(
            x, w, group, auto_pad, dilations, kernel_shape, pads, strides,
            activation, out_dtype,
        ))  # fmt: skip
    return plan(x, bias)


def _plan_key(x, w, *args):
    """The plan-cache key of a CPU call with prepacked weights, or None."""
    if not isinstance(w, PackedConvWeightsFP16) or type(x) is not np.ndarray:
        return None
    try:
        args = tuple(_key(a) for a in args)
    except _Uncacheable:
        return None
    # the path itself, not only whether it is SIMD: avx2_f16c and portable
    # plans differ too (a forced path change kept the other path's plan)
    isa = half.get_half_isa()
    return (x.shape, x.dtype.str, isa, _dispatch.num_threads(), *args)


def _plan(
    x, w, group, auto_pad, dilations, kernel_shape, pads, strides, activation,
    out_dtype,
):  # fmt: skip
    """Validate everything but the bias for x's shape and dtype and prepare the
    call; returns run(x, bias) for any x of that shape and dtype (conv_fp16
    keeps it on prepacked weights: the preparation was ~2/3 of a small
    layer's ~24 us call)."""
    v.check_array(
        x,
        "x",
        (_F16,),
        fix="convert it with x.astype(np.float16) (float32 inputs: use a float32 conv)",
    )
    group = _check_group(group)
    if isinstance(w, PackedConvWeightsFP16):
        if group != w.group:
            msg = (
                f"group={group} differs from the group={w.group} the weights were "
                f"packed with; pass group={w.group}"
            )
            raise ValueError(msg)
        packed = w
    else:
        packed = pack_conv_weights_fp16(w, group=group)
    odt = _fp16_out_dtype(out_dtype)
    wshape = packed.shape
    if x.ndim == 5:
        msg = "3-D convolution (5-D x) is not implemented; lowprec supports 1-D and 2-D"
        raise NotImplementedError(msg)
    if x.ndim != len(wshape):
        msg = (
            f"x has {x.ndim} dimensions and w {len(wshape)}: a {len(wshape) - 2}-D "
            f"convolution needs x of shape (N, C, *spatial) with "
            f"{len(wshape) - 2} spatial axes"
        )
        raise ValueError(msg)
    M, Cg = wshape[:2]
    G = packed.group
    C = x.shape[1]
    if C != Cg * G:
        msg = (
            f"x has C={C} channels but w expects C/group * group = {Cg} * {G} = "
            f"{Cg * G} (w shape {wshape}, group={G}); fix group or x's channel axis"
        )
        raise ValueError(msg)
    k = tuple(wshape[2:])
    if kernel_shape is not None and _ints(kernel_shape, "kernel_shape", len(k), 1,
                                          1) != k:  # fmt: skip
        msg = f"kernel_shape={tuple(kernel_shape)} does not match w.shape[2:]={k}"
        raise ValueError(msg)
    a = _attrs(auto_pad, dilations, kernel_shape, pads, strides)
    out_sp, pb, pe, s, d = _geometry(
        x.shape[2:], k, a["auto_pad"], a["dilations"], a["pads"], a["strides"]
    )
    lo, hi = v.activation_bounds(activation)
    lo, hi = np.float32(lo), np.float32(hi)

    one_d = len(k) == 1
    N = x.shape[0]
    H, W = (1, x.shape[2]) if one_d else x.shape[2:]
    kh, kw = (1, k[0]) if one_d else k
    Ho, Wo = (1, out_sp[0]) if one_d else out_sp
    sh, sw = (1, s[0]) if one_d else s
    dh, dw = (1, d[0]) if one_d else d
    pt, pl = (0, pb[0]) if one_d else pb
    pbot, pr = (0, pe[0]) if one_d else pe
    Hp, Wp = H + pt + pbot, W + pl + pr
    Mg = M // G
    mode = 0 if odt == _F32 else 1
    geo = np.array(
        [N, Hp, Wp, C, Ho, Wo, kh, kw, sh, sw, dh, dw, G, Cg, Mg, M], np.int64
    )
    kc = _kernels()
    simd = half._simd("f16")
    threads = numba.config.NUMBA_NUM_THREADS

    def start(x, bias):
        # per call: the bias, the output, x's bits (C-contiguous)
        bias_arr, has_bias = half._bias(bias, M)
        out = np.empty((N, M, Ho * Wo), odt)
        out32 = out if mode == 0 else _DUMMY32
        out16 = out.view(np.uint16) if mode else _DUMMY16
        epi = (bias_arr, has_bias, lo, hi, mode, out32, out16)
        x_bits = x.reshape(N, C, H, W).view(np.uint16)
        if not (x_bits.flags.c_contiguous and x_bits.flags.writeable):
            x_bits = np.array(x_bits, order="C")  # one compiled variant per kernel
        return out, epi, x_bits

    def finish(out):
        return out.reshape(N, M, *out_sp)

    if N == 0:

        def run_empty(x, bias):
            half._bias(bias, M)
            return finish(np.empty((N, M, Ho * Wo), odt))

        return run_empty
    if G == C and Mg == 1:  # depthwise
        # the kernel converts each plane itself (vcvtph2ps); its row kernels are
        # plain LLVM vectors, so AVX2 CPUs run them too (as ymm pairs)
        fused = simd or half._split("f16")
        wd = packed._layout("dw")
        nj = _dispatch.num_threads()

        def run_depthwise(x, bias):
            out, epi, x_bits = start(x, bias)
            if fused:
                xp = _DUMMY_SA.reshape(1, 1, 1, 1)
            else:
                xp = np.zeros((N, C, Hp, Wp), np.float32)
                xp[:, :, pt : pt + H, pl : pl + W] = x_bits.view(np.float16)
            kc.depthwise(threads, nj, fused, x_bits, xp, wd, geo, pt, pl, *epi)
            return finish(out)

        return run_depthwise
    if simd and _use_rows(Cg, Mg, Ho, Wo, Wp, sw):
        wr = packed._layout("rows")  # (not packed: kept on it, no cycle)

        def run_rows(x, bias):
            out, epi, x_bits = start(x, bias)
            _conv_rows(kc, x_bits, wr, geo, pt, pl, epi)
            return finish(out)

        return run_rows
    if half._split("f16"):  # avx2_f16c: the GEMM strips on packed taps
        wa = packed._layout("avx2")
        K = kh * kw * Cg
        # the image's stride phases (kernels/fp16_conv.py, avx2_f16c); a 1x1
        # stride-1 unpadded image is its own only phase, read in place
        Hq, Wq = -(-Hp // sh), -(-Wp // sw)
        plane = sh * sw * Hq * Wq
        in_place = (sh, sw, Hp, Wp) == (1, 1, H, W) and (kh, kw) == (1, 1)
        tab = kc.tap_table(geo, Hq, Wq)
        mb = Mg if Mg * K * 4 <= kc.AVX2_W_BYTES else kc.AVX2_MB
        # few segments (small images, one image): channel blocks too, for two
        # jobs a thread (3x3 64->64 at 7x7 was one job on two threads).
        # Segments run over all the images' pixels (kernels/fp16_conv.py)
        nseg = -(-(N * Ho * Wo) // kc.AVX2_PIX)
        base = G * nseg  # jobs without blocks
        want = 2 * _dispatch.num_threads()
        if base * -(-Mg // mb) < want:
            per = -(-Mg // -(-want // base))  # channels a block
            mb = min(mb, max(kc.MR_MAX, -(-per // kc.MR_MAX) * kc.MR_MAX))
        # channel blocks share the segments' panels when they all fit
        pre = mb < Mg and base * K * kc.AVX2_PIX * 2 <= kc.AVX2_PRE_BYTES
        panels = (base if pre else threads, K * kc.AVX2_PIX)

        def run_avx2(x, bias):
            out, epi, x_bits = start(x, bias)
            if in_place:
                xq = x_bits.reshape(N * C, plane)
            else:
                xq = _dispatch.scratch("conv_fp16.xq", (N * C, plane), np.uint16)
                kc.pad_phases16(x_bits, xq, pt, pl, sh, sw, Hq, Wq)
            pk = _dispatch.scratch("conv_fp16.panels", panels, np.uint16)
            tiles = _dispatch.scratch(
                "conv_fp16.tiles", (threads, kc.MR_MAX, kc.AVX2_PIX), np.float32
            )
            nxt = _dispatch.scratch("conv_fp16.jobs", (2,), np.int64)
            kc.conv_avx2(
                xq, wa, geo, Wq, tab, mb, pre, pk, tiles, nxt, _dispatch.num_threads(),
                *epi,
            )  # fmt: skip
            return finish(out)

        return run_avx2
    flat = (kh, kw, sh, sw) == (1, 1, 1, 1) and (Hp, Wp) == (H, W)
    fuse = simd and flat
    if not simd:  # portable: numpy's conversion (no F16C instruction needed)
        wk = packed._layout("portable")
        K = kh * kw * Cg

        def run_portable(x, bias):
            out, epi, x_bits = start(x, bias)
            xp = np.zeros((N, C, Hp, Wp), np.float32)
            xp[:, :, pt : pt + H, pl : pl + W] = x_bits.view(np.float16)
            sa = np.empty((threads, kc.TM, K), np.float32)
            sp = np.empty((threads, kc.TM, Mg), np.float32)
            kc.conv_portable(xp, wk, geo, sa, sp, *epi)
            return finish(out)

        return run_portable
    bp = packed._layout("simd")
    skip = _skip_plan(packed, kc.MR_MAX, pt, pl, H, W, Hp, Wp, kw, sw, dw, Wo)
    eL, eR = int(skip[4]), int(skip[5])
    # a row's tiles (near-equal, between its border columns) and the
    # border columns' band jobs (fp16_conv._seg_job / _band_job)
    L = Ho * Wo if flat else Wo - eL - eR
    ntr = -(-L // kc.MR_MAX)
    nsr = -(-ntr // kc.TS)  # segments per row, <= TS tiles each
    # per pass: every image when flat, else one image (fp16_conv.conv_simd)
    rows = N if flat else Ho
    nbj = (eL + eR) * -(-Ho // (kc.TS * kc.MR_MAX))
    nthr = _dispatch.num_threads()
    pbk = bp.shape[1]
    if (rows * nsr + nbj) * G < SPLIT_N_TILES * nthr:
        pbk = 1
    # up to BALANCE_JOBS per thread, a multiple of the threads (prange
    # hands each thread an equal contiguous count: the 1x1 56x56 layer's
    # 33 segments ran 17 against 16 on 2 threads)
    units = G * -(-bp.shape[1] // pbk)
    if (rows * nsr + nbj) * units < BALANCE_JOBS * nthr:
        while ((rows * nsr + nbj) * units) % nthr and nsr < ntr:
            nsr += 1
    tw = -(-2 * kh * kw // 8) * 8  # tap-table rows of whole cache lines
    mine = threading.local()

    def buffers():
        # this plan's scratch on the calling thread, looked up once per thread
        # (four lookups a call were ~4 us of a small layer's ~20): views of
        # _dispatch.scratch buffers, which stay this plan's memory if a later
        # request of the same name grows them, and are only used sequentially
        # on this thread otherwise
        bufs = getattr(mine, "bufs", None)
        if bufs is None:
            if fuse:  # converted per segment (x_bits)
                xp = _DUMMY_SA.reshape(1, 1, 1, 1)
                xb = _dispatch.scratch("conv_fp16.xb",
                                       (threads, Cg, kc.TS * kc.MR_MAX),
                                       np.float32)  # fmt: skip
            else:
                xp = _dispatch.scratch("conv_fp16.xp", (1, C, Hp, Wp), np.float32)
                xb = _DUMMY_SA
            # rb: the segments' channel-major buffer; tts: per-tile tap tables
            rb = _dispatch.scratch("conv_fp16.rb",
                                   (threads, kc.TS * kc.MR_MAX, kc.NR),
                                   np.float32)  # fmt: skip
            sp = _dispatch.scratch("conv_fp16.sp", (threads, kc.MR_MAX, kc.NR),
                                   np.float32)  # fmt: skip
            tts = _dispatch.scratch("conv_fp16.tts", (threads, tw), np.int64)
            bufs = (xp, xb, bp, geo, tts, rb, sp)
            if sum(b.nbytes for b in (xp, xb)) <= KEEP_SCRATCH_BYTES:
                mine.bufs = bufs  # large layers look theirs up every call
        return bufs

    def run_taps(x, bias):
        out, epi, x_bits = start(x, bias)
        kc.conv_simd(flat, fuse, nsr, pbk, skip, pt, pl, x_bits, *buffers(), *epi)
        return finish(out)

    return run_taps


__all__ = ["PackedConvWeightsFP16", "conv_fp16", "pack_conv_weights_fp16"]
