"""Half-precision matrix multiplication: float16 / bfloat16 storage, float32 sums.

``matmul_fp16`` and ``matmul_bf16`` take half-precision operands (numpy
``float16``; ``ml_dtypes.bfloat16`` or raw ``uint16`` bit patterns) and compute
every product and sum in float32.

Accuracy contract (tests/test_half.py checks each line on every path):

* Summation order. For each output, one float32 accumulator starting at +0:

      float16   for k = 0, 1, ..., K-1:   acc = fl32(acc + a[m,k] * b[k,n])
      bfloat16  for j = 0, ..., ceil(K/2)-1, with a[K] = b[K] = 0:
                    acc = fl32(acc + a[m,2j+1] * b[2j+1,n])
                    acc = fl32(acc + a[m,2j]   * b[2j,n])

  (the bfloat16 pair order is the one of AVX512_BF16 ``vdpbf16ps``). A product
  of two float16 values is exact in float32, so a fused multiply-add and a
  multiply then add give the same bits; a product of two bfloat16 values is
  exact unless it overflows or needs bits below 2**-149 (paths fuse only when
  every product of the call is exact). The float32 result equals a float32
  reference summing in this order exactly, on every path.
* Error bound. Hence |result - exact| <= gamma_K * sum_k |a[m,k]| |b[k,n]|,
  gamma_K = K u / (1 - K u), u = 2**-24 (the recursive summation bound).
* Epilogue: y = clamp(fl32(acc + bias[n]), lo, hi) in float32 (bounds rounded to
  float32; NaN passes the clamp), then rounded once to the output type, to
  nearest even; overflow gives inf (as numpy's ``astype``). NaN and inf
  propagate as in IEEE arithmetic.
* bfloat16 on AVX512_BF16: ``vdpbf16ps`` treats subnormal inputs and results
  as zero (DAZ/FTZ, Intel SDM). Outside the subnormal range (|x| < 2**-126,
  irrelevant to real weights and activations) every path but amx_bf16 gives
  the same bits.
* bfloat16 on AMX-BF16 (path amx_bf16) sums in the order of ``tdpbf16ps``
  instead (kernels/bf16_gemm_amx.py), measured on the hardware: per block of
  32 k (K zero-padded to a multiple of 32) an even and an odd float32 sum

      E = sum over j = 0..15 ascending of a[m,32i+2j]   * b[32i+2j,n]
      O = sum over j = 0..15 ascending of a[m,32i+2j+1] * b[32i+2j+1,n]
      acc = fl32(acc + fl32(E + O))

  each starting at +0 and rounding once per step (a fused multiply-add: a
  product past float32's range is not rounded before the add), subnormals
  flushed as on AVX512_BF16. The same error bound holds (every term passes
  through fewer than K roundings). Force avx512_bf16 for the order above on
  the same CPU.

Paths (``available_half_isas``; ``set_half_isa`` or ``LOWPREC_HALF_ISA`` force one):

    amx_bf16     float16 on the F16C+FMA kernel, bfloat16 on 32x64 blocks of
                 AMX tdpbf16ps tiles (Intel Sapphire Rapids and later, on Linux
                 once the process is granted the tile state)
    avx512_bf16  float16 on the F16C+FMA kernel, bfloat16 on vdpbf16ps
    avx512_f16c  float16 on 6x64 float32 register tiles of vcvtph2ps + vfmadd231ps
                 zmm, B packed panel-major in float16; bfloat16 portable
    avx2_f16c    float16 and bfloat16 GEMMs on the same tiles run as 6x16
                 strips of ymm (AVX2 CPUs with F16C and FMA: Zen 1-3, Haswell
                 and later; bfloat16 pairs widened by shift and mask, FMAs
                 where every product of the call is exact), and the
                 float16 convolution on those strips (depthwise: the AVX-512
                 row kernels' plain-vector IR, as ymm pairs)
    portable     plain numba loops on float32 copies, every CPU
"""

from __future__ import annotations

import math
import os

import numba
import numpy as np

from . import _dispatch
from . import _validate as v

# Below this many multiply-adds a call runs on the calling thread (as gemm.py).
SERIAL_MACS = 1 << 20

_BF16_FEATURES = ("avx512f", "avx512bw", "f16c", "fma", "avx512bf16")
HALF_ISA_REQUIREMENTS = {
    "amx_bf16": (*_BF16_FEATURES, "amx-tile", "amx-bf16"),
    "avx512_bf16": _BF16_FEATURES,
    "avx512_f16c": ("avx512f", "f16c", "fma"),
    "avx2_f16c": ("avx2", "f16c", "fma"),
    "portable": (),
}
ENV_VAR = "LOWPREC_HALF_ISA"
_selected: str | None = None

_F16 = np.dtype(np.float16)
_U16 = np.dtype(np.uint16)
_F32 = np.dtype(np.float32)
_DUMMY32 = np.empty((1, 1), np.float32)
_DUMMY16 = np.empty((1, 1), np.uint16)
_ZERO_BIAS = np.zeros(1, np.float32)
# (writeable: a read-only argument would compile every kernel a second time;
# the kernels never write them)


def _bf16_dtype():
    """ml_dtypes.bfloat16 as a numpy dtype, or None when ml_dtypes is missing."""
    try:
        import ml_dtypes
    except ImportError:
        return None
    return np.dtype(ml_dtypes.bfloat16)


def _kernels():
    # imported on first use: building the llvmlite intrinsics costs ~0.1 s
    from .kernels import fp16_gemm

    return fp16_gemm


# --------------------------------------------------------------------------- #
# instruction-set paths


def available_half_isas() -> tuple[str, ...]:
    """The half-precision paths this CPU can run, best first."""
    feats = _dispatch.host_features()
    return tuple(
        name
        for name, need in HALF_ISA_REQUIREMENTS.items()
        if all(f in feats for f in need)
        and (name != "amx_bf16" or _dispatch.amx_permitted())
    )


def _check_isa(name: str, source: str) -> str:
    if name not in HALF_ISA_REQUIREMENTS:
        msg = (
            f"{source}={name!r} is not a half-precision path; choose one of "
            f"{', '.join(HALF_ISA_REQUIREMENTS)}"
        )
        raise ValueError(msg)
    if name not in available_half_isas():
        feats = _dispatch.host_features()
        missing = [f for f in HALF_ISA_REQUIREMENTS[name] if f not in feats]
        msg = (
            f"{source}={name!r} needs CPU features {', '.join(missing)} that this "
            f"CPU lacks; available here: {', '.join(available_half_isas())}"
        )
        if not missing:
            msg = (
                f"{source}={name!r}: Linux did not grant this process the AMX "
                f"tile state; available here: {', '.join(available_half_isas())}"
            )
        raise ValueError(msg)
    return name


def get_half_isa() -> str:
    """The half-precision path in use (chosen on first call)."""
    global _selected
    if _selected is None:
        env = os.environ.get(ENV_VAR, "").strip()
        _selected = _check_isa(env, ENV_VAR) if env else available_half_isas()[0]
    return _selected


def set_half_isa(name: str | None) -> str:
    """Force a path (``None``: back to the environment / best available).
    Returns the path now in use; ValueError for one this CPU cannot run."""
    global _selected
    _selected = None if name is None else _check_isa(name, "isa")
    return get_half_isa()


def _simd(kind: str) -> bool:
    """Whether `kind` runs on the AVX-512 kernels (GEMM and convolution)."""
    isa = get_half_isa()
    return isa in ("amx_bf16", "avx512_bf16") or (
        isa == "avx512_f16c" and kind == "f16"
    )


def _amx(kind: str) -> bool:
    """Whether the GEMM runs on the AMX tiles (bfloat16 on amx_bf16)."""
    return kind == "bf16" and get_half_isa() == "amx_bf16"


def _split(kind: str) -> bool:
    """Whether the GEMM runs as the avx2_f16c strips (float16 and bfloat16)."""
    return get_half_isa() == "avx2_f16c"


# --------------------------------------------------------------------------- #
# conversions


def _as_bf16_bits(x, name: str, fix: str) -> np.ndarray:
    """A bfloat16 array (ml_dtypes) or uint16 bit patterns -> uint16 view."""
    v.check_array(x, name)
    bf = _bf16_dtype()
    if x.dtype == _U16 or (bf is not None and x.dtype == bf):
        return x.view(np.uint16)
    msg = (
        f"{name} must be bfloat16 (an ml_dtypes.bfloat16 array or its uint16 bit "
        f"patterns), got {x.dtype}; {fix}"
    )
    raise TypeError(msg)


def _bf16_out_dtype(out_dtype, name: str = "out_dtype"):
    """np.uint16 (bit patterns) or ml_dtypes.bfloat16 -> numpy dtype."""
    bf = _bf16_dtype()
    try:
        dt = np.dtype(out_dtype)
    except TypeError:
        dt = None
    if dt == _U16 or (bf is not None and dt == bf):
        return dt
    msg = (
        f"{name} must be ml_dtypes.bfloat16 or np.uint16 (bfloat16 bit "
        f"patterns), got {out_dtype!r}"
    )
    raise TypeError(msg)


def float32_to_bfloat16(x, out_dtype=np.uint16) -> np.ndarray:
    """float32 -> bfloat16, rounded to nearest even; overflow gives inf, NaN
    stays NaN (quieted, sign kept).

    Returns uint16 bit patterns (default) or, with
    ``out_dtype=ml_dtypes.bfloat16``, an ml_dtypes array with the same bits.
    """
    v.check_array(
        x, "x", (_F32,), fix="convert with x.astype(np.float32) (exact for float16)"
    )
    odt = _bf16_out_dtype(out_dtype)
    flat = np.ascontiguousarray(x).reshape(-1)
    out = np.empty(flat.shape, np.uint16)
    _kernels().f32_to_bf16_array(flat, out)
    return out.reshape(x.shape).view(odt)


def bfloat16_to_float32(x) -> np.ndarray:
    """bfloat16 (ml_dtypes array or uint16 bit patterns) -> float32, exactly."""
    bits = _as_bf16_bits(x, "x", fix="pass x.view(np.uint16) for raw bit patterns")
    # (np.asarray: a 0-d shift gives a numpy scalar)
    return np.asarray(bits.astype(np.uint32) << 16).view(np.float32)


# --------------------------------------------------------------------------- #
# prepacked weights


class _Packed:
    __slots__ = ("shape", "kind", "_bits", "_layouts")
    _name = ""

    def __init__(self, bits: np.ndarray, kind: str):
        bits = np.array(bits, np.uint16, order="C")  # an owned copy
        bits.flags.writeable = False
        for name, value in (
            ("shape", bits.shape),
            ("kind", kind),
            ("_bits", bits),
            ("_layouts", {}),
        ):
            object.__setattr__(self, name, value)

    def __setattr__(self, name, value):
        msg = f"{self._name} is immutable; pack new weights instead"
        raise AttributeError(msg)

    def __repr__(self):
        K, N = self.shape
        return f"{self._name}(K={K}, N={N})"

    def _exponents(self, cached=False):
        """kernels/fp16_gemm.bf16_exponents of the weights, kept (cached:
        only if already known, else None)."""
        got = self._layouts.get("exponents")
        if got is None and not cached:
            got = self._layouts["exponents"] = _kernels().bf16_exponents(self._bits)
        return got

    @property
    def nbytes(self) -> int:
        """Bytes held: the weights and every layout built so far."""
        return self._bits.nbytes + sum(
            x.nbytes for x in self._layouts.values() if isinstance(x, np.ndarray)
        )

    def _layout(self, simd: bool, amx: bool = False) -> np.ndarray:
        key = "amx" if amx else "simd" if simd else "portable"
        lay = self._layouts.get(key)
        if lay is None:
            k = _kernels()
            if amx:
                from .kernels import bf16_gemm_amx

                lay = bf16_gemm_amx.pack_b(self._bits)
            elif not simd:
                lay = _to_f32(self._bits, self.kind)
            elif self.kind == "f16":
                lay = k.pack_b_f16(self._bits)
            else:
                lay = k.pack_b_bf16(self._bits)
            lay.flags.writeable = False
            self._layouts[key] = lay
        return lay


class PackedWeightsFP16(_Packed):
    """Immutable prepacked float16 weights for :func:`matmul_fp16`.

    Build with :func:`pack_weights_fp16`. The F16C path's layout is panel-major
    [N/64][K][64] float16 (half the bytes of float32); each path's layout is
    built on first use and reused by every call.
    """

    __slots__ = ()
    _name = "PackedWeightsFP16"


class PackedWeightsBF16(_Packed):
    """Immutable prepacked bfloat16 weights for :func:`matmul_bf16` (layout
    [N/64][K/2][64][2] on the AVX512_BF16 path; on amx_bf16 1 KB tiles of 16
    pairs of k x 16 columns, K padded to 32)."""

    __slots__ = ()
    _name = "PackedWeightsBF16"


def _check_2d(b, name):
    if b.ndim != 2:
        msg = f"{name} must be 2-D (K, N) to be packed, got shape {b.shape}"
        raise ValueError(msg)


def pack_weights_fp16(b) -> PackedWeightsFP16:
    """Prepack float16 weights (K, N) once for many :func:`matmul_fp16` calls
    (results identical to passing ``b`` itself)."""
    if isinstance(b, _Packed):
        msg = "b is already packed; pass it to the matmul directly"
        raise TypeError(msg)
    v.check_array(b, "b", (_F16,), fix="convert it with b.astype(np.float16)")
    _check_2d(b, "b")
    return PackedWeightsFP16(b.view(np.uint16), "f16")


def pack_weights_bf16(b) -> PackedWeightsBF16:
    """Prepack bfloat16 weights (K, N) (ml_dtypes.bfloat16 or uint16 bits)."""
    if isinstance(b, _Packed):
        msg = "b is already packed; pass it to the matmul directly"
        raise TypeError(msg)
    bits = _as_bf16_bits(b, "b", fix=_BF16_FIX)
    _check_2d(bits, "b")
    packed = PackedWeightsBF16(bits, "bf16")
    packed._exponents()  # at pack time: calls then check only A (_gemm_2d)
    return packed


_BF16_FIX = "convert float32 with lowprec.float32_to_bfloat16(x)"


def _to_f32(bits: np.ndarray, kind: str) -> np.ndarray:
    """uint16 half bits -> float32 (exact) as a C-contiguous array."""
    if kind == "f16":
        return np.ascontiguousarray(bits).view(np.float16).astype(np.float32)
    # (np.asarray: a 0-d shift gives a numpy scalar)
    return np.asarray(bits.astype(np.uint32) << 16).view(np.float32)


# --------------------------------------------------------------------------- #
# the 2-D driver


def _gemm_2d(a_bits, packed: _Packed, kind, bias, has_bias, lo, hi, mode, out):
    """out (M, N) = epilogue(a @ b) for C-contiguous uint16 a (M, K)."""
    M, K = a_bits.shape
    N = packed.shape[1]
    if M == 0 or N == 0:
        return
    k = _kernels()
    split = _split(kind)
    simd = _simd(kind) or split
    out32 = out if mode == 0 else _DUMMY32
    out16 = out.view(np.uint16) if mode != 0 else _DUMMY16
    serial = M * N * K < SERIAL_MACS or _dispatch.num_threads() == 1
    args = (bias, has_bias, lo, hi, mode, out32, out16)
    if _amx(kind):
        _gemm_amx(a_bits, packed._layout(True, amx=True), serial, args)
        return
    threads = numba.config.NUMBA_NUM_THREADS
    lay = packed._layout(simd)
    if not simd:
        a32 = _to_f32(a_bits, kind)
        scratch = np.empty((threads, k.TM, k.TN), np.float32)
        fn = k.gemm_portable_serial if serial else k.gemm_portable
        fn(kind == "bf16", a32, lay, scratch, *args)
        return
    scratch = np.empty((threads, k.MR_MAX, k.NR), np.float32)
    if kind == "f16":
        a32 = np.empty((M, K), np.float32)
        (k.f16_to_f32_rows_serial if serial else k.f16_to_f32_rows)(a_bits, a32)
        fn = k.gemm_f16_serial if serial else k.gemm_f16
        fn(a32, lay, scratch, *args, split)
        return
    if K % 2:  # pairs of k: pad one zero column (b's pad row is zero too)
        padded = np.zeros((M, K + 1), np.uint16)
        padded[:, :K] = a_bits
        a_bits = padded
    # vdpbf16ps takes A's pairs as they are; the avx2 strips float32 rows,
    # with FMAs where every product is exact (kernels/fp16_gemm.py)
    a = _to_f32(a_bits, kind) if split else a_bits.view(np.uint32)
    how = 0
    if split:
        # the check scans A (and B once per packed weights, ~0.3 ns a value);
        # the FMAs save ~25 % of the GEMM: worth it from ~100 columns, and
        # for raw (unpacked) B from ~100 rows too
        how = 1
        if N >= 128 and (M >= 128 or packed._exponents(cached=True) is not None):
            ea, eb = k.bf16_exponents(a_bits), packed._exponents()
            how = 2 if k.bf16_products_exact(ea, eb) else 1
    fn = k.gemm_bf16_serial if serial else k.gemm_bf16
    fn(a, lay, scratch, *args, how)


def _gemm_amx(a_bits, lay, serial, args):
    """_gemm_2d on the AMX tiles (kernels/bf16_gemm_amx.py): per-thread scratch
    for the row blocks of a copied as tiles and each block's float32 sums
    before the epilogue."""
    from .kernels import bf16_gemm_amx as k

    M = a_bits.shape[0]
    kp = k.KB * lay.shape[1]
    threads = 1 if serial else _dispatch.num_threads()
    rows = k.block_rows(M, kp, threads)
    buf = _dispatch.scratch("amx_bf16.a", (threads, rows, kp), np.uint16)
    tile = _dispatch.scratch("amx_bf16.tile", (threads, k.BM, k.NR), np.float32)
    if serial:
        k.gemm_serial(a_bits, lay, buf, tile, *args)
    else:
        k.gemm(a_bits, lay, buf, tile, *args, threads)


# --------------------------------------------------------------------------- #
# public matmuls


def _shapes(a, b_shape):
    """numpy matmul shapes: (a as 2+-D, b as 2+-D, batch)."""
    if a.ndim == 0 or len(b_shape) == 0:
        msg = "a and b must have at least 1 dimension (numpy matmul), got a 0-d array"
        raise ValueError(msg)
    a_shape = (1, a.shape[0]) if a.ndim == 1 else a.shape
    b2 = (b_shape[0], 1) if len(b_shape) == 1 else tuple(b_shape)
    if a_shape[-1] != b2[-2]:
        msg = (
            f"inner dimensions differ: a.shape[-1]={a_shape[-1]}, "
            f"b.shape[-2]={b2[-2]} (a {a.shape} @ b {tuple(b_shape)})"
        )
        raise ValueError(msg)
    try:
        batch = np.broadcast_shapes(a_shape[:-2], b2[:-2])
    except ValueError:
        msg = (
            f"batch dimensions of a {a.shape} and b {tuple(b_shape)} do not "
            f"broadcast (numpy matmul rules)"
        )
        raise ValueError(msg) from None
    return a_shape, b2, batch


def _bias(bias, N):
    if bias is None:
        return _ZERO_BIAS, False
    if isinstance(bias, np.floating):
        bias = np.asarray(bias)
    v.check_array(
        bias,
        "bias",
        (_F32, _F16),
        fix="pass bias.astype(np.float32) (one float32 value per column)",
    )
    if bias.size != 1 and bias.shape != (N,):
        msg = (
            f"bias must be a scalar or have shape ({N},) (one per column), "
            f"got {bias.shape}"
        )
        raise ValueError(msg)
    out = np.empty(N, np.float32)
    out[:] = bias.reshape(-1)  # float16 -> float32 is exact
    return out, True


def _matmul(a_bits, a, b, packed_cls, kind, bias, activation, out_dt, mode):
    b_is_packed = isinstance(b, _Packed)
    b_bits = None
    if b_is_packed:
        b_shape = b.shape
    else:
        b_bits = (
            b.view(np.uint16) if kind == "f16" else _as_bf16_bits(b, "b", _BF16_FIX)
        )
        b_shape = b.shape
    a_shape, b2, batch = _shapes(a, b_shape)
    M, K = a_shape[-2:]
    N = b2[-1]
    bias_arr, has_bias = _bias(bias, N)
    lo, hi = v.activation_bounds(activation)
    lo, hi = np.float32(lo), np.float32(hi)
    out = np.empty((*batch, M, N), out_dt)
    a_bits = a_bits.reshape(a_shape)
    if len(b2) == 2:
        # one GEMM: a's batch dimensions are folded into its rows
        packed = b if b_is_packed else packed_cls(b_bits.reshape(b2), kind)
        rows = math.prod(batch) * M
        a2 = np.ascontiguousarray(a_bits.reshape(rows, K))
        _gemm_2d(
            a2, packed, kind, bias_arr, has_bias, lo, hi, mode, out.reshape(rows, N)
        )
    else:
        a_b = np.broadcast_to(a_bits, (*batch, M, K))
        b_b = np.broadcast_to(b_bits.reshape(b2), (*batch, K, N))
        for idx in np.ndindex(*batch):
            _gemm_2d(
                np.ascontiguousarray(a_b[idx]),
                packed_cls(b_b[idx], kind),
                kind,
                bias_arr,
                has_bias,
                lo,
                hi,
                mode,
                out[idx],
            )
    if a.ndim == 1:
        out = out[..., 0, :]
    if len(b_shape) == 1:
        out = out[..., 0]
    return out


def _fp16_out_dtype(out_dtype):
    try:
        dt = np.dtype(out_dtype)
    except TypeError:
        dt = None
    if dt not in (_F32, _F16):
        msg = f"out_dtype must be np.float32 or np.float16, got {out_dtype!r}"
        raise TypeError(msg)
    return dt


def matmul_fp16(a, b, *, bias=None, activation=None, out_dtype=np.float32, device=None):
    """float16 matrix product with float32 accumulation (numpy matmul rules).

    Parameters
    ----------
    a : ndarray of float16, 1-D or N-D
    b : ndarray of float16, or :class:`PackedWeightsFP16` (2-D weights)
    bias : float32 scalar or (N,), optional; added to the float32 sum
    activation : None, "relu", "relu6" or a (min, max) clamp
    out_dtype : np.float32 (default) or np.float16 (rounded once, to nearest
        even; overflow gives inf)
    device : None, "cpu" or "cuda"; None follows a (CUDA arrays run on the GPU
        and come back as the same kind, docs/cuda.md)

    Every product and sum is float32, in the order documented in this module
    (the accuracy contract); inputs are never modified.
    """
    if device is not None or type(a) is not np.ndarray:
        from . import cuda_ops
        from .gemm import _on_gpu

        if _on_gpu(device, a, None if isinstance(b, _Packed) else b):
            return cuda_ops.matmul_fp16_cuda(
                a, b, bias=bias, activation=activation, out_dtype=out_dtype
            )
    fix = "convert it with {0}.astype(np.float16) (or use np.matmul for float32)"
    v.check_array(a, "a", (_F16,), fix=fix.format("a"))
    if isinstance(b, PackedWeightsBF16):
        msg = "b is packed bfloat16 weights; use matmul_bf16, or pack_weights_fp16"
        raise TypeError(msg)
    if not isinstance(b, PackedWeightsFP16):
        v.check_array(b, "b", (_F16,), fix=fix.format("b"))
    odt = _fp16_out_dtype(out_dtype)
    mode = 0 if odt == _F32 else 1
    return _matmul(
        a.view(np.uint16), a, b, PackedWeightsFP16, "f16", bias, activation, odt, mode
    )


def matmul_bf16(a, b, *, bias=None, activation=None, out_dtype=np.float32, device=None):
    """bfloat16 matrix product with float32 accumulation (numpy matmul rules).

    ``a`` and ``b`` are ml_dtypes.bfloat16 arrays or uint16 bit patterns (``b``
    may be a :class:`PackedWeightsBF16`). ``out_dtype``: np.float32 (default),
    ml_dtypes.bfloat16, or np.uint16 for bfloat16 bit patterns (rounded once, to
    nearest even). bias, activation and device as :func:`matmul_fp16` (CUDA
    arrays carry bfloat16 as uint16 bit patterns).
    """
    if device is not None or type(a) is not np.ndarray:
        from . import cuda_ops
        from .gemm import _on_gpu

        if _on_gpu(device, a, None if isinstance(b, _Packed) else b):
            return cuda_ops.matmul_bf16_cuda(
                a, b, bias=bias, activation=activation, out_dtype=out_dtype
            )
    a_bits = _as_bf16_bits(a, "a", _BF16_FIX)
    if isinstance(b, PackedWeightsFP16):
        msg = "b is packed float16 weights; use matmul_fp16, or pack_weights_bf16"
        raise TypeError(msg)
    try:
        odt = np.dtype(out_dtype)
    except TypeError:
        odt = None
    if odt == _F32:
        mode = 0
    else:
        odt = _bf16_out_dtype(out_dtype)
        mode = 2
    return _matmul(a_bits, a, b, PackedWeightsBF16, "bf16", bias, activation, odt, mode)


__all__ = [
    "PackedWeightsBF16",
    "PackedWeightsFP16",
    "available_half_isas",
    "bfloat16_to_float32",
    "float32_to_bfloat16",
    "get_half_isa",
    "matmul_bf16",
    "matmul_fp16",
    "pack_weights_bf16",
    "pack_weights_fp16",
    "set_half_isa",
]
