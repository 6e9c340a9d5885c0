"""Below 8 bits: block-quantized weights (ONNX Runtime's MatMulNBits), k-means
codebooks (Deep Compression's weight sharing) and power-of-two codes.

MatMulNBits layout (com.microsoft contrib op), for weights W of shape (K, N):

    packed       uint8 (N, nblk, blob)   nblk = ceil(K / bs), blob = bs * bits / 8;
                 codes packed low bits first along K, K padded with code 0
    scales       float (N, nblk) (or flattened (N * nblk,))
    zero_points  uint8 (N, ceil(nblk * bits / 8)), codes packed the same way
                 (or flattened), or float (N, nblk); default 2**(bits - 1)
    W[k, n] = (code - zero_point) * scale       of block k // bs of column n

``matmul_nbits`` computes y = a @ W (+ bias) in float32. Accuracy:

* ``accuracy_level=0`` (default; 1 is the same): float32 products of a and
  (code - zero_point), summed in float32 per block and multiplied by the
  block's scale. Error bound vs the exact sum:
  |y - y_exact| <= (K + 2) * 2**-24 * sum_k |a[k]| * |W[k, n]| (tests check it).
* ``accuracy_level=4`` (MLAS's CompInt8): each row of a is quantized per block
  to int8 (scale max|a| / 127, round half to even, the ONNX rounding), the
  block dot products are exact integers, and blocks are combined in float32.
  The result equals a float32 evaluation of that formula bit for bit (tests);
  its error vs the float result is the activation quantization's, up to
  0.5 * sa per element. This is the fast path: ``vpdpbusd`` on the codes
  (AVX-512 VNNI), ``vpmaddubsw`` on their nibbles (AVX2).

Codebooks (``kmeans_quantize``, ``log2_quantize``): each weight is an index
into a small table of float32 values, per tensor or one table per output
column. ``matmul_codebook`` computes a @ table[indices]; with
``accuracy_level=4`` the table is also rounded to int8 (scale max|table| / 127)
and looked up with ``vpshufb``.

Kernels: ``kernels/nbits.py`` (portable numba), ``kernels/nbits_vnni.py``
(AVX-512 VNNI; its float kernels also serve AVX2) and ``kernels/nbits_ymm.py``
(the int8 path on AVX2 and AVX-VNNI CPUs), chosen like the INT8 GEMM's path
(``lowprec.set_isa``).
"""

from __future__ import annotations

import functools

import numba
import numpy as np

from . import _dispatch
from . import _validate as v
from .kernels import nbits as _kn

BITS = (2, 4, 8)
_FLOATS = (np.dtype(np.float32), np.dtype(np.float16), np.dtype(np.float64))


# ---------------------------------------------------------------------------
# checks and bit packing


def _check_bits(bits) -> int:
    if (
        isinstance(bits, bool)
        or not isinstance(bits, int | np.integer)
        or bits not in BITS
    ):
        msg = (
            f"bits must be one of {BITS} (the widths ONNX Runtime's MatMulNBits "
            f"runs), got {bits!r}"
        )
        raise ValueError(msg)
    return int(bits)


def _check_block(block_size) -> int:
    ok = isinstance(block_size, int | np.integer) and not isinstance(block_size, bool)
    if not ok or block_size < 16 or block_size & (block_size - 1):
        msg = f"block_size must be a power of two >= 16 (e.g. 32), got {block_size!r}"
        raise ValueError(msg)
    return int(block_size)


def _check_dim(value, name: str) -> int:
    ok = isinstance(value, int | np.integer) and not isinstance(value, bool)
    if not ok or value < 1:
        msg = f"{name} must be a positive int (the weight's {name}), got {value!r}"
        raise ValueError(msg)
    return int(value)


def _weights_2d(w, axis) -> np.ndarray:
    """w with the reduction axis K at `axis` -> float32 (N, K) copy."""
    v.check_array(w, "w", _FLOATS, fix="pass w.astype(np.float32)")
    if w.ndim != 2:
        msg = (
            f"w must be 2-D weights, (K, N) for axis=0 or (N, K) for axis=1, got "
            f"shape {w.shape}; reshape it to 2-D"
        )
        raise ValueError(msg)
    axis = v.check_axis(axis, 2)
    if w.size == 0:
        msg = f"w has no elements (shape {w.shape}); quantize non-empty weights"
        raise ValueError(msg)
    if not np.isfinite(w).all():
        msg = "w contains NaN or infinity; quantized weights must be finite"
        raise ValueError(msg)
    with np.errstate(over="ignore"):
        wt = (w.T if axis == 0 else w).astype(np.float32)
    if not np.isfinite(wt).all():
        msg = (
            f"w has values beyond float32's range (max |w| = {np.abs(w).max():g}); "
            f"the weights are quantized in float32: rescale them"
        )
        raise ValueError(msg)
    return wt


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """uint8 codes (..., L) with L * bits a multiple of 8 -> (..., L * bits // 8)
    bytes, low bits first."""
    per = 8 // bits
    c = codes.reshape(*codes.shape[:-1], -1, per).astype(np.uint8)
    out = np.zeros(c.shape[:-1], np.uint8)
    for i in range(per):
        out |= c[..., i] << (bits * i)
    return out


def unpack_codes(data: np.ndarray, bits: int, length: int) -> np.ndarray:
    """bytes (..., nbytes) -> the first ``length`` codes (..., length), uint8."""
    per = 8 // bits
    shifts = (np.arange(per, dtype=np.uint8) * bits)[None]
    c = (data[..., None] >> shifts) & np.uint8((1 << bits) - 1)
    return c.reshape(*data.shape[:-1], -1)[..., :length]


def _pad_to(n: int, m: int) -> int:
    return -(-n // m) * m


# ---------------------------------------------------------------------------
# MatMulNBits quantization


def _block_params(x: np.ndarray, bits: int, symmetric: bool):
    """Scales and zero points (float32, x.shape[:-1]) of blocks x (..., bs)."""
    qmax = (1 << bits) - 1
    if symmetric:
        idx = np.abs(x).argmax(axis=-1)[..., None]
        peak = np.take_along_axis(x, idx, axis=-1)[..., 0]
        scale = (peak / np.float32(-(1 << (bits - 1)))).astype(np.float32)
        zp = np.full(x.shape[:-1], 1 << (bits - 1), np.float32)
    else:
        lo = np.minimum(x.min(axis=-1), 0)
        hi = np.maximum(x.max(axis=-1), 0)
        scale = ((hi - lo) / np.float32(qmax)).astype(np.float32)
        with np.errstate(divide="ignore", invalid="ignore"):
            zp = np.where(scale > 0, np.clip(np.rint(-lo / scale), 0, qmax), 0)
        zp = zp.astype(np.float32)
    return scale, zp


def _block_codes(x, scale, zp, bits):
    """clip(rint(x / scale) + zp) per block (scale, zp broadcast over the last axis)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.rint(x / scale[..., None])
    q = np.where(scale[..., None] != 0, q, 0) + zp[..., None]
    return np.clip(q, 0, (1 << bits) - 1)


def _gptq(wt, xcal, bits, bs, symmetric, damp):
    """GPTQ (Frantar et al. 2022) for (N, K) weights and calibration inputs
    (S, K): columns quantized in order, each one's rounding error spread over
    the columns not yet quantized through the inverse Hessian of the layer's
    squared output error, H = 2 X^T X (+ damp * mean diag). A block's scale
    and zero point are set when its first column is reached, from the weights
    as updated so far. Returns (codes (N, Kp), scale, zp (N, nblk))."""
    N, K = wt.shape
    nblk = -(-K // bs)
    W = np.zeros((N, nblk * bs))
    W[:, :K] = wt
    Kp = W.shape[1]
    X = xcal.astype(np.float64)
    H = np.zeros((Kp, Kp))
    H[:K, :K] = 2 * X.T @ X
    dead = np.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += np.eye(Kp) * damp * np.mean(np.diag(H))
    # upper Cholesky factor of H^-1: row i holds the update weights of column i
    Hinv = np.linalg.cholesky(np.linalg.inv(H)).T
    codes = np.zeros((N, Kp))
    scale = np.zeros((N, nblk), np.float32)
    zp = np.zeros((N, nblk), np.float32)
    for j in range(nblk):
        i1, i2 = j * bs, (j + 1) * bs
        s, z = _block_params(W[:, i1:i2].astype(np.float32), bits, symmetric)
        scale[:, j], zp[:, j] = s, z
        err = np.zeros((N, bs))
        for i in range(i1, i2):
            w = W[:, i]
            c = _block_codes(w.astype(np.float32)[:, None], s, z, bits)[:, 0]
            codes[:, i] = c
            q = (c - z).astype(np.float64) * s
            e = (w - q) / Hinv[i, i]
            W[:, i + 1 : i2] -= e[:, None] * Hinv[i, i + 1 : i2][None]
            err[:, i - i1] = e
        W[:, i2:] -= err @ Hinv[i1:i2, i2:]
    return codes.astype(np.uint8), scale, zp


def quantize_blockwise(w, *, bits=4, block_size=32, symmetric=True, axis=0,
                       method="rtn", calibration=None, damp=0.01):  # fmt: skip
    """Block quantization of weights into MatMulNBits' layout.

    w: float (K, N) weights with K along ``axis`` (0: MatMul's B; 1: a Linear
    layer's (N, K) weight). Returns ``(packed, scales, zero_points)``:
    packed uint8 (N, nblk, blob), scales float32 (N, nblk), zero_points None
    (symmetric: the default 2**(bits-1)) or packed uint8 (N, ceil(nblk*bits/8)).

    symmetric: scale = v / -2**(bits-1) where v is the block's value of largest
    magnitude, so v maps to code 0 exactly (MLAS's choice: the full range,
    e.g. [-8, 7] for 4 bits). Asymmetric: scale = (max - min) / (2**bits - 1)
    over the block and 0, zero point rint(-min / scale). Codes are
    clip(rint(w / scale) + zero_point) with true division and rounding half to
    even (ONNX QuantizeLinear); a zero scale gives code = zero point.

    method: ``"rtn"`` (round to nearest, as above) or ``"gptq"``: the same
    grid, but columns are rounded in order and each rounding error is
    compensated on the columns not yet rounded (GPTQ), which needs
    ``calibration``: float (S, K) samples of the layer's input; ``damp`` is
    GPTQ's relative diagonal damping.
    """
    bits = _check_bits(bits)
    bs = _check_block(block_size)
    wt = _weights_2d(w, axis)
    N, K = wt.shape
    nblk = -(-K // bs)
    if method == "gptq":
        if calibration is None:
            msg = "method='gptq' needs calibration: float (S, K) inputs of the layer"
            raise ValueError(msg)
        v.check_array(calibration, "calibration", _FLOATS)
        if calibration.ndim != 2 or calibration.shape[1] != K:
            msg = f"calibration must have shape (S, {K}), got {calibration.shape}"
            raise ValueError(msg)
        codes, scale, zp = _gptq(wt, calibration, bits, bs, symmetric, float(damp))
    elif method == "rtn":
        x = np.zeros((N, nblk * bs), np.float32)
        x[:, :K] = wt
        x = x.reshape(N, nblk, bs)
        scale, zp = _block_params(x, bits, symmetric)
        codes = _block_codes(x, scale, zp, bits).astype(np.uint8).reshape(N, -1)
    else:
        msg = f"method must be 'rtn' or 'gptq', got {method!r}"
        raise ValueError(msg)
    if not np.isfinite(scale).all():
        msg = (
            "a block's scale overflows float32 (its range max - min exceeds "
            "float32's); rescale w or use symmetric=True"
        )
        raise ValueError(msg)
    packed = pack_codes(codes.reshape(N, nblk, bs), bits)
    if symmetric:
        return packed, scale, None
    zpc = np.zeros((N, _pad_to(nblk, 8 // bits)), np.uint8)
    zpc[:, :nblk] = zp.astype(np.uint8)
    return packed, scale, pack_codes(zpc, bits)


def _nbits_arrays(b, scales, zero_points, K, N, bits, bs):
    """Validated (codes (N, nblk*bs) uint8, scales (N, nblk) f32, zp (N, nblk) f32)."""
    bits = _check_bits(bits)
    bs = _check_block(bs)
    K = _check_dim(K, "K")
    N = _check_dim(N, "N")
    nblk = -(-K // bs)
    blob = bs * bits // 8
    v.check_array(b, "b", (np.dtype(np.uint8),), fix="pass the uint8 packed codes")
    if b.shape != (N, nblk, blob):
        msg = (
            f"b must have shape (N, ceil(K / block_size), block_size * bits / 8) = "
            f"{(N, nblk, blob)} for K={K}, N={N}, bits={bits}, block_size={bs}, "
            f"got {b.shape}"
        )
        raise ValueError(msg)
    v.check_array(scales, "scales", v.SCALE_TYPES, fix="pass scales.astype(np.float32)")
    if scales.size != N * nblk or scales.shape not in ((N * nblk,), (N, nblk)):
        msg = (
            f"scales must have shape ({N}, {nblk}) or ({N * nblk},), got {scales.shape}"
        )
        raise ValueError(msg)
    sc = scales.reshape(N, nblk).astype(np.float32)
    if not np.isfinite(sc).all():
        msg = "scales contain NaN or infinity"
        raise ValueError(msg)
    if zero_points is None:
        zp = np.full((N, nblk), 1 << (bits - 1), np.float32)
    else:
        v.check_array(zero_points, "zero_points", (np.dtype(np.uint8),) + v.SCALE_TYPES)
        if zero_points.dtype == np.uint8:
            zb = -(-nblk * bits // 8)
            if zero_points.shape not in ((N * zb,), (N, zb)):
                msg = (
                    f"uint8 zero_points must be packed {bits}-bit codes of shape "
                    f"({N}, {zb}) or ({N * zb},), got {zero_points.shape}"
                )
                raise ValueError(msg)
            zp = unpack_codes(zero_points.reshape(N, zb), bits, nblk).astype(np.float32)
        else:
            if zero_points.shape not in ((N * nblk,), (N, nblk)):
                msg = (
                    f"float zero_points must have the scales' shape ({N}, {nblk}), "
                    f"got {zero_points.shape}"
                )
                raise ValueError(msg)
            zp = zero_points.reshape(N, nblk).astype(np.float32)
    codes = unpack_codes(b.reshape(N, nblk * blob), bits, nblk * bs)
    return codes, sc, zp


def dequantize_blockwise(
    b, scales, zero_points=None, *, K, bits=4, block_size=32, axis=0
):
    """The float32 weights of MatMulNBits arrays: (K, N) for axis=0, (N, K) for 1."""
    N = b.shape[0] if isinstance(b, np.ndarray) and b.ndim == 3 else 1
    codes, sc, zp = _nbits_arrays(b, scales, zero_points, K, N, bits, block_size)
    bs = int(block_size)
    nblk = sc.shape[1]
    w = (codes.reshape(N, nblk, bs).astype(np.float32) - zp[..., None]) * sc[..., None]
    w = np.ascontiguousarray(w.reshape(N, -1)[:, :K])
    axis = v.check_axis(axis, 2)
    return np.ascontiguousarray(w.T) if axis == 0 else w


# ---------------------------------------------------------------------------
# the quad-plane layout (kernels/nbits.py) and the prepacked objects


def _quad_planes(codes_nk: np.ndarray, bits: int) -> np.ndarray:
    """codes (N, Kp) uint8, Kp % 4 == 0 -> wq (ngroups, Kp/4, 64) uint8."""
    N, Kp = codes_nk.shape
    P = 8 // bits
    G = 16 * P
    ng = -(-N // G)
    c = np.zeros((ng * G, Kp), np.uint8)
    c[:N] = codes_nk
    # (g, p, L, q, r) -> (g, q, L, r, p)
    c = c.reshape(ng, P, 16, Kp // 4, 4).transpose(0, 3, 2, 4, 1)
    wq = np.zeros((ng, Kp // 4, 16, 4), np.uint8)
    for p in range(P):
        wq |= c[..., p] << (bits * p)
    return np.ascontiguousarray(wq.reshape(ng, Kp // 4, 64))


def _codes_from_planes(wq: np.ndarray, bits: int) -> np.ndarray:
    """The inverse of _quad_planes: wq -> codes (ngroups * G, Kp) uint8."""
    ng, nq, _ = wq.shape
    P = 8 // bits
    x = wq.reshape(ng, nq, 16, 4)
    planes = [(x >> (bits * p)) & ((1 << bits) - 1) for p in range(P)]
    c = np.stack(planes, axis=1)  # (g, p, q, L, r)
    return np.ascontiguousarray(c.transpose(0, 1, 3, 2, 4).reshape(ng * P * 16, nq * 4))


def _per_group(x_nj: np.ndarray, G: int, fill: float = 0.0) -> np.ndarray:
    """(N, J) per-column values -> (ngroups, J, G) float32 (padded columns fill)."""
    N, J = x_nj.shape
    ng = -(-N // G)
    y = np.full((ng * G, J), fill, np.float32)
    y[:N] = x_nj
    return np.ascontiguousarray(y.reshape(ng, G, J).transpose(0, 2, 1))


class PackedNBits:
    """MatMulNBits weights repacked once for ``matmul_nbits`` (see the module
    docstring); build with :func:`pack_nbits`. Immutable."""

    __slots__ = (
        "K",
        "N",
        "bits",
        "block_size",
        "_wq",
        "_sc",
        "_zp",
        "_zstride",
        "nbytes",
        "_dev",
    )

    def __init__(self, codes, sc, zp, K, N, bits, bs):
        self.K, self.N, self.bits, self.block_size = K, N, bits, bs
        G = 16 * (8 // bits)
        self._wq = _quad_planes(codes, bits)
        self._sc = _per_group(sc, G)
        if np.all(zp == zp[:1, :1]):
            # one zero point everywhere (the symmetric default): block stride 0
            self._zp, self._zstride = _per_group(zp[:, :1], G), 0
        else:
            self._zp, self._zstride = _per_group(zp, G), 1
        for arr in (self._wq, self._sc, self._zp):
            arr.flags.writeable = False
        self.nbytes = self._wq.nbytes + self._sc.nbytes + self._zp.nbytes
        self._dev = None  # device copies (lowprec.cuda_ops), built on first use

    def __repr__(self):
        return (
            f"PackedNBits(K={self.K}, N={self.N}, bits={self.bits}, "
            f"block_size={self.block_size}, nbytes={self.nbytes})"
        )


def pack_nbits(
    b, scales, zero_points=None, *, K, N, bits=4, block_size=32
) -> PackedNBits:
    """Prepack MatMulNBits arrays (module docstring) for repeated ``matmul_nbits``."""
    codes, sc, zp = _nbits_arrays(b, scales, zero_points, K, N, bits, block_size)
    return PackedNBits(codes, sc, zp, int(K), int(N), int(bits), int(block_size))


def _activations(a, K: int) -> tuple[np.ndarray, tuple]:
    v.check_array(a, "a", v.FLOAT_INPUT_TYPES, fix="pass a.astype(np.float32)")
    if a.ndim < 1 or a.shape[-1] != K:
        msg = f"a must have shape (..., K) with K={K}, got {a.shape}"
        raise ValueError(msg)
    return a.reshape(-1, K), a.shape[:-1]


def _bias(bias, N: int):
    if bias is None:
        return None
    v.check_array(bias, "bias", v.FLOAT_INPUT_TYPES, fix="pass bias.astype(np.float32)")
    if bias.shape != (N,):
        msg = f"bias must have shape ({N},) (one per output column), got {bias.shape}"
        raise ValueError(msg)
    return bias.astype(np.float32)


def _level(accuracy_level) -> int:
    if accuracy_level not in (0, 1, 4) or isinstance(accuracy_level, bool):
        msg = (
            f"accuracy_level must be 0 or 1 (float32 compute) or 4 (int8 "
            f"activations), got {accuracy_level!r}"
        )
        raise ValueError(msg)
    return int(accuracy_level)


def _padded(a2: np.ndarray, Kp: int) -> np.ndarray:
    M, K = a2.shape
    x = _dispatch.scratch("nbits.a", (M, Kp), np.float32)
    x[:, :K] = a2
    x[:, K:] = 0
    return x


def _quantized(a2: np.ndarray, Kp: int, bs: int):
    """The int8 path's activations: per row and block of bs, zero-padded to Kp."""
    M = a2.shape[0]
    if a2.dtype != np.float32:
        a2 = a2.astype(np.float32)
    qa = _dispatch.scratch("nbits.qa", (M, Kp), np.int8)
    ascale = np.empty((M, Kp // bs), np.float32)
    qasum = np.empty((M, Kp // bs), np.float32)
    _finite(_kn.quantize_rows_blockwise(a2, bs, qa, ascale, qasum))
    return qa, ascale, qasum


def _finite(ok: bool) -> None:
    if not ok:
        msg = (
            "a holds NaN or infinity: accuracy_level=4 quantizes the activations "
            "to int8 and cannot represent them; clean a or use accuracy_level=0"
        )
        raise ValueError(msg)


def _output(M: int, N: int, width: int) -> np.ndarray:
    """Where the kernels write (M, width >= N) columns: the result array itself
    when no padding columns exist, else scratch copied by _finish."""
    if width == N:
        return np.empty((M, N), np.float32)
    return _dispatch.scratch("nbits.y", (M, width), np.float32)


def _finish(y, N, bias, lead):
    out = y if y.shape[1] == N else np.array(y[:, :N])  # scratch is copied
    if bias is not None:
        out += bias
    return out if len(lead) == 1 else out.reshape(*lead, N)  # (M, N) already


# below this many multiply-adds a call runs on the calling thread (a parallel
# launch costs more than the work, lowprec.gemm.SERIAL_MACS measured the same)
SERIAL_MACS = 1 << 18


def _call(macs: int, kernel, *args):
    """kernel(*args) on numba's threads, or on this thread for small work."""
    if macs >= SERIAL_MACS:
        return kernel(*args)
    return _dispatch.call_on_threads(1, kernel, *args)


def matmul_nbits(a, b, scales=None, zero_points=None, *, K=None, N=None, bits=4,
                 block_size=32, bias=None, accuracy_level=0, device=None):  # fmt: skip
    """y = a @ W (+ bias) for MatMulNBits weights W (module docstring).

    a: float32 or float16 (..., K); b: a :class:`PackedNBits` (then scales,
    zero_points, K, N, bits and block_size come from it) or the uint8 packed
    codes with their scales (and zero points), repacked on every call (pack
    once with :func:`pack_nbits` for repeated calls). Returns float32 (..., N).
    device: None (follow a: CuPy / numba device arrays run on the GPU), "cpu"
    or "cuda" (docs/cuda.md); on the GPU a must be float32 and the int8 path
    gives the CPU's bits.
    """
    if isinstance(b, PackedNBits):
        if scales is not None or zero_points is not None:
            msg = "b is a PackedNBits (it has its scales and zero points): pass neither"
            raise TypeError(msg)
        pk = b
    else:
        if K is None or N is None:
            msg = "K and N are required with packed uint8 b (MatMulNBits attributes)"
            raise TypeError(msg)
        if scales is None:
            msg = "scales is required with packed uint8 b"
            raise TypeError(msg)
        pk = pack_nbits(
            b, scales, zero_points, K=K, N=N, bits=bits, block_size=block_size
        )
    level = _level(accuracy_level)
    bias_ = _bias(bias, pk.N)
    if _on_gpu(a, device):
        from . import cuda_ops

        return cuda_ops.nbits_cuda(pk, a, level, bias_, codebook=False)
    a2, lead = _activations(a, pk.K)
    return _finish(_run_nbits(pk, a2, level), pk.N, bias_, lead)


def _on_gpu(a, device) -> bool:
    if device is None and type(a) is np.ndarray:
        return False
    from . import _cuda

    return _cuda.use_cuda(a, device=device)


def _run_nbits(pk: PackedNBits, a2: np.ndarray, level: int) -> np.ndarray:
    M = a2.shape[0]
    Kp = pk._wq.shape[1] * 4
    ng, _, _ = pk._wq.shape
    G = pk._sc.shape[2]
    y = _output(M, pk.N, ng * G)
    macs = M * pk.K * pk.N
    if level == 4:
        if _vnni():
            ok = _call(
                macs, _kv().run_quantizing, _f32(a2), pk._wq, pk._sc, 1, pk._zp,
                pk._zstride, pk.bits, pk.block_size, _NO_LUT, False, y, 0,
            )  # fmt: skip
            _finite(ok)
            return y
        if _ymm():
            ok = _call(
                macs, _ky().run_quantizing, _f32(a2), pk._wq, pk._sc, 1, pk._zp,
                pk._zstride, pk.bits, pk.block_size, _NO_LUT, False, y,
            )  # fmt: skip
            _finite(ok)
            return y
        qa, ascale, qasum = _quantized(a2, Kp, pk.block_size)
        _call(
            macs, _kn.nbits_i8, qa, ascale, qasum, pk._wq, pk._sc, 1, pk._zp,
            pk._zstride, pk.bits, pk.block_size, _LUT_DUMMY, False, y,
        )  # fmt: skip
    else:
        x = _padded(a2, Kp)
        # the float kernels of nbits_vnni are plain LLVM vectors (no VNNI):
        # AVX2 CPUs run them as ymm pairs (1 x 4096 x 4096, 4 bits, Zen 3,
        # 2 threads: 10 -> 30 GOP/s; 16 rows 12 -> 55)
        simd = _vnni() or _ymm()
        if simd and M >= _kv().PANEL_MIN_ROWS:
            panels = _dispatch.scratch(
                "nbits.panel", (numba.config.NUMBA_NUM_THREADS, Kp * G), np.float32
            )
            _call(
                macs, _kv().run_f32_panel, x, pk._wq, pk._sc, pk._zp, pk._zstride,
                pk.bits, pk.block_size, panels, y,
            )  # fmt: skip
        elif simd:
            obuf = _dispatch.scratch("nbits.o", (M, ng, 4 * G), np.float32)
            _call(
                macs, _kv().run_f32, x, pk._wq, pk._sc, pk._zp, pk._zstride, pk.bits,
                pk.block_size, obuf, y, _vnni(),
            )  # fmt: skip
        else:
            arep = _dispatch.scratch("nbits.arep", (M, Kp // 4, 64), np.float32)
            _kn.repeat_quads(x, arep)
            _call(
                macs, _kn.nbits_f32, arep, pk._wq, pk._sc, pk._zp, pk._zstride,
                pk.bits, pk.block_size, y,
            )  # fmt: skip
    return y


_LUT_DUMMY = np.zeros((1, 1, 1), np.int32)
_NO_LUT = np.zeros(16, np.uint8)
for _c in (_LUT_DUMMY, _NO_LUT):
    _c.flags.writeable = False


def _vnni() -> bool:
    return _dispatch.zmm_isa()


def _ymm() -> bool:
    """The AVX2 kernels (kernels/nbits_ymm.py) serve avx2 and avx_vnni."""
    return _dispatch.get_isa() in ("avx_vnni", "avx2")


@functools.cache
def _kv():
    from .kernels import nbits_vnni

    return nbits_vnni


@functools.cache
def _ky():
    from .kernels import nbits_ymm

    return nbits_ymm


def _f32(a2: np.ndarray) -> np.ndarray:
    return (
        a2
        if a2.dtype == np.float32 and a2.flags.c_contiguous
        else (np.ascontiguousarray(a2, dtype=np.float32))
    )


# ---------------------------------------------------------------------------
# codebooks: k-means weight sharing and power-of-two codes


def _assign(x: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Index of the nearest entry of ``table`` (any order) for every x."""
    order = np.argsort(table, kind="stable")
    t = table[order]
    mids = (t[:-1].astype(np.float64) + t[1:]) / 2
    return order[np.searchsorted(mids, x, side="left")].astype(np.uint8)


def _kmeanspp(xs: np.ndarray, C: int, rng) -> np.ndarray:
    """k-means++ seeding on sorted 1-D values: each next center drawn with
    probability proportional to the squared distance to the nearest chosen one."""
    c = [xs[rng.integers(xs.size)]]
    d2 = (xs - c[0]) ** 2
    for _ in range(1, C):
        total = d2.sum()
        if total <= 0:  # fewer distinct values than C: repeat the last center
            c.append(c[-1])
            continue
        pick = np.searchsorted(np.cumsum(d2), rng.random() * total, side="right")
        c.append(xs[min(pick, xs.size - 1)])
        d2 = np.minimum(d2, (xs - c[-1]) ** 2)
    return np.sort(np.array(c))


def _lloyd(x: np.ndarray, C: int, iters: int, init: str, rng) -> np.ndarray:
    """1-D k-means: exact Lloyd steps on sorted values with prefix sums,
    O(C log n) per step, from a linear initialization over [min, max] (Deep
    Compression's best-performing init) or k-means++ seeding (rng)."""
    xs = np.sort(x.astype(np.float64))
    cum = np.concatenate(([0.0], np.cumsum(xs)))
    c = np.linspace(xs[0], xs[-1], C) if init == "linear" else _kmeanspp(xs, C, rng)
    for _ in range(iters):
        mids = (c[:-1] + c[1:]) / 2
        bounds = np.concatenate(
            ([0], np.searchsorted(xs, mids, side="left"), [xs.size])
        )
        cnt = np.diff(bounds)
        sums = cum[bounds[1:]] - cum[bounds[:-1]]
        new = np.where(cnt > 0, sums / np.maximum(cnt, 1), c)
        if np.array_equal(new, c):
            break
        c = np.sort(new)
    return c.astype(np.float32)


def _codebook_out(wt: np.ndarray, table: np.ndarray, bits: int):
    """(N, K) weights and (C,) or (N, C) tables -> (indices_packed, table)."""
    N, K = wt.shape
    Kp = _pad_to(K, 8 // bits)
    idx = np.zeros((N, Kp), np.uint8)
    if table.ndim == 1:
        idx[:, :K] = _assign(wt, table)
    else:
        for n in range(N):
            idx[n, :K] = _assign(wt[n], table[n])
    return pack_codes(idx, bits), table


def _check_iters(iters) -> int:
    if isinstance(iters, bool) or not isinstance(iters, int | np.integer) or iters < 0:
        msg = f"iters must be an int >= 0, got {iters!r}"
        raise ValueError(msg)
    return int(iters)


def kmeans_quantize(w, *, bits=4, per_row=False, iters=30, init="linear", seed=0,
                    axis=0):  # fmt: skip
    """Deep Compression weight sharing: 2**bits shared float32 values.

    w: float (K, N) with K along ``axis``. Returns ``(indices_packed,
    codebook)``: indices uint8 (N, ceil(K * bits / 8)) packed low bits first
    along K; codebook float32 (2**bits,), or (N, 2**bits) with per_row (one
    table per output column). Each weight takes its nearest codebook value.
    At most ``iters`` Lloyd steps from ``init``: "linear" (evenly spaced over
    [min, max]; needs no seed) or "kmeans++" (seeded by ``seed``). The same
    arguments give the same result.
    """
    bits = _check_bits(bits)
    iters = _check_iters(iters)
    if init not in ("linear", "kmeans++"):
        msg = f"init must be 'linear' or 'kmeans++', got {init!r}"
        raise ValueError(msg)
    wt = _weights_2d(w, axis)
    C = 1 << bits
    rng = np.random.default_rng(seed)
    if per_row:
        table = np.stack([_lloyd(row, C, iters, init, rng) for row in wt])
    else:
        table = _lloyd(wt.reshape(-1), C, iters, init, rng)
    return _codebook_out(wt, table, bits)


def log2_quantize(w, *, bits=4, axis=0):
    """Sign + power-of-two codes (logarithmic quantization) as a codebook.

    Code c (bits wide): the top bit is the sign, m = the rest; m = 0 is 0.0,
    m >= 1 is 2**(e - m + 1) with e = rint(log2(max |w|)). Each weight takes
    the nearest value. Returns ``(indices_packed, codebook)`` as
    :func:`kmeans_quantize` (codebook float32 (2**bits,)), so
    :func:`matmul_codebook` and :func:`dequantize_codebook` run it.
    """
    bits = _check_bits(bits)
    wt = _weights_2d(w, axis)
    peak = float(np.abs(wt).max())
    e = int(np.rint(np.log2(peak))) if peak > 0 else 0
    half = 1 << (bits - 1)
    mags = np.array([0.0] + [2.0 ** (e - m + 1) for m in range(1, half)], np.float32)
    table = np.concatenate([mags, -mags]).astype(np.float32)
    table[half] = 0.0  # -0.0 would print oddly; same value
    return _codebook_out(wt, table, bits)


def _codebook_arrays(indices, codebook, K, N, bits):
    bits = _check_bits(bits)
    K = _check_dim(K, "K")
    N = _check_dim(N, "N")
    C = 1 << bits
    v.check_array(indices, "indices", (np.dtype(np.uint8),))
    nb = -(-K * bits // 8)
    if indices.shape != (N, nb):
        msg = (
            f"indices must have shape (N, ceil(K * bits / 8)) = {(N, nb)} for "
            f"K={K}, N={N}, bits={bits}, got {indices.shape}"
        )
        raise ValueError(msg)
    v.check_array(codebook, "codebook", v.SCALE_TYPES)
    if codebook.shape not in ((C,), (N, C)):
        msg = (
            f"codebook must have shape ({C},) or ({N}, {C}) for bits={bits}, "
            f"got {codebook.shape}"
        )
        raise ValueError(msg)
    cb = codebook.astype(np.float32)
    if not np.isfinite(cb).all():
        msg = "codebook contains NaN or infinity"
        raise ValueError(msg)
    return unpack_codes(indices, bits, K), cb


def dequantize_codebook(indices, codebook, *, K, bits=4, axis=0):
    """The float32 weights of a codebook: (K, N) for axis=0, (N, K) for 1."""
    N = indices.shape[0] if isinstance(indices, np.ndarray) and indices.ndim == 2 else 1
    codes, cb = _codebook_arrays(indices, codebook, K, N, bits)
    w = cb[codes] if cb.ndim == 1 else np.take_along_axis(cb, codes.astype(np.intp), 1)
    axis = v.check_axis(axis, 2)
    return np.ascontiguousarray(w.T if axis == 0 else w)


# activation blocks of the int8 path of matmul_codebook (the codebook has no
# blocks of its own)
CODEBOOK_ACT_BLOCK = 32


class PackedCodebook:
    """Codebook weights repacked once for ``matmul_codebook``; build with
    :func:`pack_codebook`. Immutable."""

    __slots__ = ("K", "N", "bits", "shared", "_wq", "_lut", "_qlut", "_sc", "_zp",
                 "_table", "nbytes", "_dev")  # fmt: skip

    def __init__(self, codes, cb, K, N, bits):
        self.K, self.N, self.bits = K, N, bits
        C = 1 << bits
        G = 16 * (8 // bits)
        Kp = _pad_to(K, CODEBOOK_ACT_BLOCK)
        c = np.zeros((N, Kp), np.uint8)
        c[:, :K] = codes
        self._wq = _quad_planes(c, bits)
        self.shared = cb.ndim == 1
        per_col = np.broadcast_to(cb, (N, C))
        ng = self._wq.shape[0]
        lut = np.zeros((ng * G, C), np.float32)
        lut[:N] = per_col
        self._lut = np.ascontiguousarray(lut.reshape(ng, G, C))
        # int8 path: table rounded to int8 per codebook, +128 as the unsigned
        # operand of vpdpbusd; the zero point 128 takes the offset back out
        peak = np.abs(per_col).max(axis=1)
        cs = (peak / np.float32(127)).astype(np.float32)
        with np.errstate(divide="ignore", invalid="ignore"):
            q = np.where(cs[:, None] > 0, np.rint(per_col / cs[:, None]), 0)
        qlut = np.zeros((ng * G, C), np.int32)
        qlut[:N] = q + 128
        self._qlut = np.ascontiguousarray(qlut.reshape(ng, G, C))
        self._sc = _per_group(cs[:, None], G)
        self._zp = np.full((ng, 1, G), 128, np.float32)
        # a shared codebook's int8 table; at least 16 bytes (a vpshufb table,
        # which the 2-bit codebooks' 4 entries are padded to)
        self._table = None
        if self.shared:
            self._table = np.zeros(max(C, 16), np.uint8)
            self._table[:C] = q[0] + 128
        for arr in (self._wq, self._lut, self._qlut, self._sc, self._zp, self._table):
            if arr is not None:
                arr.flags.writeable = False
        self.nbytes = self._wq.nbytes + (C * 4 if self.shared else N * C * 4)
        self._dev = None

    def __repr__(self):
        return (
            f"PackedCodebook(K={self.K}, N={self.N}, bits={self.bits}, "
            f"shared={self.shared}, nbytes={self.nbytes})"
        )


def pack_codebook(indices, codebook, *, K, N, bits=4) -> PackedCodebook:
    """Prepack codebook indices (see :func:`kmeans_quantize`) for repeated
    ``matmul_codebook``."""
    codes, cb = _codebook_arrays(indices, codebook, K, N, bits)
    return PackedCodebook(codes, cb, int(K), int(N), int(bits))


def matmul_codebook(a, indices, codebook=None, *, K=None, N=None, bits=4, bias=None,
                    accuracy_level=0, device=None):  # fmt: skip
    """y = a @ codebook[indices] (+ bias), float32 out (module docstring).

    indices: a :class:`PackedCodebook`, or the packed uint8 indices with their
    codebook (repacked on every call). accuracy_level 4: int8 activations per
    block of 32 and the codebook rounded to int8. device: as
    :func:`matmul_nbits`.
    """
    if isinstance(indices, PackedCodebook):
        if codebook is not None:
            msg = "indices is a PackedCodebook: it carries its codebook; pass none"
            raise TypeError(msg)
        pk = indices
    else:
        if K is None or N is None or codebook is None:
            msg = "K, N and codebook are required with packed uint8 indices"
            raise TypeError(msg)
        pk = pack_codebook(indices, codebook, K=K, N=N, bits=bits)
    level = _level(accuracy_level)
    bias_ = _bias(bias, pk.N)
    if _on_gpu(a, device):
        from . import cuda_ops

        return cuda_ops.nbits_cuda(pk, a, level, bias_, codebook=True)
    a2, lead = _activations(a, pk.K)
    M = a2.shape[0]
    ng, nq, _ = pk._wq.shape
    G = pk._lut.shape[1]
    y = _output(M, pk.N, ng * G)
    macs = M * pk.K * pk.N
    if level == 4:
        if _vnni() and pk.shared and pk.bits == 4:
            ok = _call(
                macs, _kv().run_quantizing, _f32(a2), pk._wq, pk._sc, 0, pk._zp, 0,
                pk.bits, CODEBOOK_ACT_BLOCK, pk._table, True, y, _kv().LUT_KIND,
            )  # fmt: skip
            _finite(ok)
        elif (_ymm() or _vnni()) and pk.shared and pk.bits <= 4:
            # (the VNNI hosts' 2-bit tables too: vpshufb is AVX2's)
            ok = _call(
                macs, _ky().run_quantizing, _f32(a2), pk._wq, pk._sc, 0, pk._zp, 0,
                pk.bits, CODEBOOK_ACT_BLOCK, pk._table, True, y,
            )  # fmt: skip
            _finite(ok)
        else:
            qa, ascale, qasum = _quantized(a2, nq * 4, CODEBOOK_ACT_BLOCK)
            _call(
                macs, _kn.nbits_i8, qa, ascale, qasum, pk._wq, pk._sc, 0, pk._zp, 0,
                pk.bits, CODEBOOK_ACT_BLOCK, pk._qlut, True, y,
            )  # fmt: skip
    else:
        x = _padded(a2, nq * 4)
        _call(macs, _kn.codebook_f32, x, pk._wq, pk._lut, pk.bits, y)
    return _finish(y, pk.N, bias_, lead)


__all__ = [
    "PackedCodebook",
    "PackedNBits",
    "dequantize_blockwise",
    "dequantize_codebook",
    "kmeans_quantize",
    "log2_quantize",
    "matmul_codebook",
    "matmul_nbits",
    "pack_codebook",
    "pack_nbits",
    "quantize_blockwise",
]
