"""Packed sparse weights and the sparse-weight GEMMs ``spmm`` / ``qlinear_spmm``.

Formats (immutable :class:`SparseMatrix`, built with :func:`from_dense`):

    "csr"      one column index per nonzero (uint16 when K <= 65535, else int32)
    "bsr4x1"   blocks of 4 rows x 1 column: one index per 4 output rows
    "bsr1x4"   blocks of 1 row x 4 columns: one index per 4 consecutive k
               (int8: the vpdpbusd path)
    "nm24"     2:4 along K: two values and one byte of positions per group of 4

Values are float32, float16 (float32 accumulation) or int8 with a per-row
scale and zero point (the pruned entries of an int8 matrix hold the row's zero
point, i.e. real 0). Files are .npz without pickle (:meth:`SparseMatrix.save`,
:func:`load`).

``spmm(w, x)`` = W @ X for W (M, K) sparse and X (K, N) or (K,) dense float32.
Float results differ from a dense float32 product only by summation order: for
every output, |y - y_exact| <= g(n) * sum_k |w[m,k] x[k,n]| with
g(n) = n u / (1 - n u), u = 2**-24 and n the row's stored count (each product
rounded at most once by the FMA, then n - 1 additions).

``qlinear_spmm(w, x, ...)`` is QLinearMatMul with the weights on the left:
bit-exactly ``qlinear_matmul(x.T, x_scale, x_zp, w.to_dense().T, w.scale,
w.zero_point, y_scale, y_zp, bias=bias, ...).T`` (docs/quantization.md eqs.
8-13: int32-exact accumulation, multiplier fl(fl(sx*sw)/sy), rint half to even).
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
import time

import numba
import numpy as np

from . import _dispatch
from . import _validate as v
from . import gemm as _g  # the multiplier and clamp of qlinear_matmul
from . import kernels as _ks_pkg
from .kernels import int8_gemm_vnni as _kv  # float32_requant_ok
from .kernels import sparse_gemm as _ks

FORMATS = ("csr", "bsr4x1", "bsr1x4", "nm24")
NM_FREE0, NM_FREE1 = _ks.NM_FREE0, _ks.NM_FREE1  # nm24: slot holds no weight
VALUE_TYPES = (np.dtype(np.float32), np.dtype(np.float16), np.dtype(np.int8))
_BLOCK = {"csr": (1, 1), "bsr4x1": (4, 1), "bsr1x4": (1, 4), "nm24": (1, 4)}
_SHAPE_ID = {"csr": _ks.CSR, "bsr4x1": _ks.R4, "bsr1x4": _ks.C4, "nm24": _ks.NM24}
FORMAT_VERSION = 1

# below this many multiply-adds a call runs on the calling thread (numba's pool
# launch costs a few microseconds, more than a small product)
SERIAL_MACS = 1 << 18
# the one-column int8 kernel runs on the calling thread below this many slots:
# a parallel call cost 4-7 us more than its kernel halves saved (2 threads,
# 70 %: 1024 x 1024, 8052 slots, serial 15.2 us, parallel 17.8-19.5; 768 x
# 3072, 18204 slots, serial 27.9, parallel 31.4-32.7). Timed alone, the kernel
# halves better (16305 slots: 20.0 us serial, 14.7 on 2 threads), but in the
# benchmark, after the dense baseline's calls, a threshold of 12288 slots made
# 768 x 3072 at 70 % 0.94x -> 0.78x dense
BANK_PARALLEL_SLOTS = 65536
# the same for the AVX2 one-column kernel (8-row tiles, a vpgatherdd per
# slot, ~11 cycles a slot on Zen 3, estimated): 1024 x 1024 through
# qlinear_spmm, serial / 2 threads, 50 % (17834 slots) 93 / 84 us, 70 %
# (11136) 61 / 61 us
GATHER_PARALLEL_SLOTS = 16384
CHUNKS_PER_THREAD = 8
# qlinear_spmm (int8 1x4): per-thread packed copies of X up to this many bytes
# in all (every thread packs all of X; past this one shared copy is packed)
_S8_PRIVATE_X_BYTES = 16 << 20
# spmm (float): K is walked in chunks of this many columns, so that a tile's X
# rows (chunk x 64 columns x 4 bytes = 256 KB) stay in L2 across the rows
SPMM_K_CHUNK = 1024
# |w - zw| * |x| <= 255 * 255: int32 sums are exact up to this many per output
_INT32_SAFE_NNZ = (2**31 - 1) // (255 * 255)

_ARRAYS = ("ptr", "idx", "val", "scale", "zero_point")


def _normalize_format(fmt) -> str:
    aliases = {
        ("bsr", 4, 1): "bsr4x1",
        ("bsr", 1, 4): "bsr1x4",
        (2, 4): "nm24",
        ("nm", 2, 4): "nm24",
    }
    if isinstance(fmt, tuple | list):
        name = aliases.get(tuple(fmt))
    else:
        name = fmt if fmt in FORMATS else None
    if name is None:
        msg = (
            f"format must be one of {', '.join(FORMATS)} (or ('bsr', 4, 1), "
            f"('bsr', 1, 4), (2, 4)), got {fmt!r}"
        )
        raise ValueError(msg)
    return name


class SparseMatrix:
    """Immutable packed sparse weights (M, K). Build with :func:`from_dense`.

    Attributes: ``format``, ``shape``, ``dtype`` (of the values), ``nnz`` (values
    stored, block padding included), ``scale`` / ``zero_point`` ((M,) float32 /
    int8 for int8 values, else None), ``nbytes``.
    """

    __slots__ = (
        "format",
        "shape",
        "dtype",
        "ptr",
        "idx",
        "val",
        "scale",
        "zero_point",
        "_cache",
    )

    def __init__(self, fmt, shape, ptr, idx, val, scale=None, zero_point=None):
        fields = {
            "format": fmt,
            "shape": (int(shape[0]), int(shape[1])),
            "dtype": val.dtype,
            "ptr": ptr,
            "idx": idx,
            "val": val,
            "scale": scale,
            "zero_point": zero_point,
            "_cache": {},
        }
        for name, value in fields.items():
            if isinstance(value, np.ndarray):
                value.flags.writeable = False
            object.__setattr__(self, name, value)

    def __setattr__(self, name, value):
        msg = (
            "SparseMatrix is immutable; build a new one with lowprec.sparse.from_dense"
        )
        raise AttributeError(msg)

    def __repr__(self):
        M, K = self.shape
        return (
            f"SparseMatrix(format={self.format!r}, shape=({M}, {K}), "
            f"dtype={self.dtype}, nnz={self.nnz}, density={self.density:.3f}, "
            f"nbytes={self.nbytes})"
        )

    @property
    def block(self) -> tuple[int, int]:
        return _BLOCK[self.format]

    @property
    def nnz(self) -> int:
        return int(self.val.size)

    @property
    def density(self) -> float:
        M, K = self.shape
        return self.nnz / max(1, M * K)

    @property
    def nbytes(self) -> int:
        """Bytes of every array held (pointers, indices, values, scales)."""
        return sum(
            a.nbytes
            for a in (self.ptr, self.idx, self.val, self.scale, self.zero_point)
            if a is not None
        )

    # ------------------------------------------------------------------ views
    def _expanded(self):
        """(indptr int64 (M+1,), cols int32, vals) in row-major order, block
        padding inside the matrix included, positions outside dropped."""
        got = self._cache.get("csr")
        if got is not None:
            return got
        M, K = self.shape
        ptr = self.ptr
        nblk = np.diff(ptr)
        brow = np.repeat(np.arange(ptr.size - 1, dtype=np.int64), nblk)
        idx = self.idx.astype(np.int64)
        if self.format == "csr":
            rows, cols, vals = brow, idx, self.val
        elif self.format == "bsr4x1":
            rows = (4 * brow[:, None] + np.arange(4)).reshape(-1)
            cols = np.repeat(idx, 4)
            vals = self.val
        elif self.format == "bsr1x4":
            rows = np.repeat(brow, 4)
            cols = (4 * idx[:, None] + np.arange(4)).reshape(-1)
            vals = self.val
        else:  # nm24: idx holds the position byte of each group
            G = (K + 3) // 4
            g = np.arange(brow.size, dtype=np.int64) - G * brow
            p0 = idx & 3
            p1 = (idx >> 2) & 3
            keep = np.stack([(idx & NM_FREE0) == 0, (idx & NM_FREE1) == 0], 1)
            keep = keep.reshape(-1)
            rows = np.repeat(brow, 2)[keep]
            cols = (4 * g[:, None] + np.stack([p0, p1], 1)).reshape(-1)[keep]
            vals = self.val[keep]
        inside = (rows < M) & (cols < K)
        rows, cols, vals = rows[inside], cols[inside], vals[inside]
        order = np.lexsort((cols, rows))
        rows, cols, vals = rows[order], cols[order], vals[order]
        indptr = np.zeros(M + 1, np.int64)
        np.cumsum(np.bincount(rows, minlength=M), out=indptr[1:])
        got = (indptr, cols.astype(np.int32), np.ascontiguousarray(vals))
        for a in got:
            a.flags.writeable = False
        self._cache["csr"] = got
        return got

    def to_dense(self) -> np.ndarray:
        """The dense (M, K) matrix; pruned int8 entries hold the row's zero point."""
        M, K = self.shape
        indptr, cols, vals = self._expanded()
        if self.dtype == np.int8:
            out = np.repeat(self.zero_point.reshape(M, 1), K, axis=1)
        else:
            out = np.zeros((M, K), self.dtype)
        rows = np.repeat(np.arange(M), np.diff(indptr))
        out[rows, cols] = vals
        return out

    def _chunks(self, threads: int, rows: bool = False) -> np.ndarray:
        """Block-row bounds of ``threads`` contiguous parts of ~equal work;
        with ``rows``, row bounds over the expanded CSR view (the same thing
        for CSR). Cached: np.linspace and searchsorted were 15-30 us of a ~40
        us one-column call."""
        rows = rows and self.format != "csr"
        key = ("chunks", threads, rows)
        got = self._cache.get(key)
        if got is None:
            ptr = self._expanded()[0] if rows else self.ptr
            got = self._cache[key] = _row_chunks(ptr, threads)
        return got

    # -------------------------------------------------------------- files
    def save(self, path) -> None:
        """Write an .npz (no pickle); read back with :func:`load`."""
        arrays = {k: getattr(self, k) for k in _ARRAYS if getattr(self, k) is not None}
        meta = {
            "lowprec_sparse": np.array(FORMAT_VERSION),
            "format": np.array(self.format),
            "shape": np.array(self.shape, np.int64),
        }
        if hasattr(path, "write"):  # an open file object
            np.savez(path, **meta, **arrays)
            return
        # a name through a file object: np.savez would append ".npz" to a name
        # without it, and load(path) would then not find the file
        with open(path, "wb") as f:
            np.savez(f, **meta, **arrays)


def load(path) -> SparseMatrix:
    """Read a :meth:`SparseMatrix.save` file (allow_pickle=False)."""
    f = np.load(path, allow_pickle=False)
    if not isinstance(f, np.lib.npyio.NpzFile):
        msg = f"{path} is not a lowprec sparse file (a single .npy array, not an .npz)"
        raise ValueError(msg)
    with f:
        if "lowprec_sparse" not in f.files:
            msg = f"{path} is not a lowprec sparse file (no 'lowprec_sparse' entry)"
            raise ValueError(msg)
        ver = int(f["lowprec_sparse"])
        if ver != FORMAT_VERSION:
            msg = (
                f"{path} has sparse file version {ver}; this lowprec reads "
                f"{FORMAT_VERSION}"
            )
            raise ValueError(msg)
        fmt = _normalize_format(str(f["format"]))
        shape = tuple(int(s) for s in f["shape"])
        arr = {k: (f[k] if k in f.files else None) for k in _ARRAYS}
    _check_structure(fmt, shape, arr)
    if fmt == "nm24":
        zp = arr["zero_point"]
        fill = zp if zp is not None else np.zeros(shape[0], arr["val"].dtype)
        arr["idx"] = _nm_flags(arr["idx"], arr["val"], fill, -(-shape[1] // 4))
    return SparseMatrix(
        fmt, shape, arr["ptr"], arr["idx"], arr["val"], arr["scale"], arr["zero_point"]
    )


def _check_structure(fmt, shape, arr):
    """A loaded file must index inside its shape (the kernels trust it)."""
    M, K = shape
    R, C = _BLOCK[fmt]
    ptr, idx, val = arr["ptr"], arr["idx"], arr["val"]
    nb = -(-M // R)
    per = 2 if fmt == "nm24" else R * C
    ok = (
        ptr is not None
        and idx is not None
        and val is not None
        and ptr.dtype == np.int64
        and ptr.shape == (nb + 1,)
        and ptr[0] == 0
        and bool(np.all(np.diff(ptr) >= 0))
        and idx.shape == (ptr[-1],)
        and val.dtype in VALUE_TYPES
        and val.shape == (per * ptr[-1],)
    )
    if ok and fmt != "nm24" and idx.size:
        ok = idx.dtype in (np.uint16, np.int32) and int(idx.min()) >= 0
        ok = ok and int(idx.max()) < -(-K // C)
    if ok and fmt == "nm24":
        ok = idx.dtype == np.uint8 and bool(np.all(np.diff(ptr) == -(-K // 4)))
        if ok and idx.size and K % 4:
            last = idx.reshape(M, -1)[:, -1].astype(np.int64)
            ok = bool(np.all(((last & 3) < K % 4) & (((last >> 2) & 3) < K % 4)))
    if ok and val.dtype == np.int8:
        sc, zp = arr["scale"], arr["zero_point"]
        ok = sc is not None and zp is not None and sc.shape == (M,) and zp.shape == (M,)
        ok = ok and sc.dtype == np.float32 and zp.dtype == np.int8
        ok = ok and bool(np.all(np.isfinite(sc) & (sc > 0)))
    if not ok:
        msg = f"corrupt or unsupported sparse file: structure of a {fmt} {shape} matrix"
        raise ValueError(msg)


# --------------------------------------------------------------------------- #
# building


def _index_dtype(n: int):
    return np.uint16 if n <= 65535 else np.int32


def _row_quantize(w, mask):
    """Symmetric per-row int8: scale = max|w_kept| / 127 (1 for an empty row)."""
    a = np.where(mask, np.abs(w.astype(np.float32)), 0).max(axis=1, initial=0)
    scale = np.where(a > 0, a / np.float32(127), np.float32(1)).astype(np.float32)
    q = np.clip(np.rint(w.astype(np.float32) / scale[:, None]), -127, 127)
    return q.astype(np.int8), scale, np.zeros(w.shape[0], np.int8)


def from_dense(
    w, mask=None, *, format="csr", dtype=None, scale=None, zero_point=None
) -> SparseMatrix:
    """Pack dense weights (M, K) into a sparse format.

    Parameters
    ----------
    w : float32 / float16 / int8 ndarray (M, K)
    mask : bool (M, K), optional
        Entries to keep (e.g. from :func:`lowprec.prune.magnitude`); default:
        the nonzeros of ``w`` (int8: the entries that differ from the row's
        zero point). Entries outside the mask are dropped whatever their value.
    format : "csr", "bsr4x1", "bsr1x4" or "nm24" (tuples ('bsr', 4, 1),
        ('bsr', 1, 4), (2, 4) accepted)
    dtype : float32, float16 or int8 values; default w's dtype. int8 from a
        float ``w``: symmetric per-row quantization of the kept entries.
    scale, zero_point : (M,) or scalar float32 / int8, for an int8 ``w``
        (required scale; zero point default 0).
    """
    v.check_array(w, "w", VALUE_TYPES, fix="use float32, float16 or int8 weights")
    if w.ndim != 2:
        msg = f"w must be 2-D (M, K), got shape {w.shape}"
        raise ValueError(msg)
    fmt = _normalize_format(format)
    M, K = w.shape
    dt = w.dtype if dtype is None else np.dtype(dtype)
    if dt not in VALUE_TYPES:
        msg = f"dtype must be float32, float16 or int8, got {dt}"
        raise TypeError(msg)
    if w.dtype == np.int8 and dt != np.int8:
        msg = "int8 w packs to int8 values only; dequantize it first for float values"
        raise TypeError(msg)
    sc = zp = None
    if w.dtype == np.int8:
        if scale is None:
            msg = "scale is required for int8 w (per row (M,) or scalar, float32)"
            raise ValueError(msg)
        sc = _row_vec(v.scale_param(scale, "scale").astype(np.float32), "scale", M)
        zp = (
            np.zeros(M, np.int8)
            if zero_point is None
            else _row_vec(
                v.zero_point_param(zero_point, "zero_point", np.int8), "zero_point", M
            )
        )
    elif scale is not None or zero_point is not None:
        msg = "scale / zero_point apply to int8 w only (float w: pass dtype=np.int8)"
        raise ValueError(msg)
    if mask is None:
        mask = w != (zp.reshape(M, 1) if zp is not None else 0)
    else:
        v.check_array(mask, "mask", (np.dtype(bool),), fix="pass a boolean keep-mask")
        if mask.shape != w.shape:
            msg = f"mask must have w's shape {w.shape}, got {mask.shape}"
            raise ValueError(msg)
    if dt == np.int8 and w.dtype != np.int8:
        w, sc, zp = _row_quantize(w, mask)
    else:
        w = w.astype(dt, copy=False)
    fill = zp.reshape(M, 1) if zp is not None else np.zeros((M, 1), dt)
    wm = np.where(mask, w, fill).astype(dt)  # pruned entries: 0 (or zero point)
    if fmt == "csr":
        rows, cols = np.nonzero(mask)
        ptr = np.zeros(M + 1, np.int64)
        np.cumsum(np.bincount(rows, minlength=M), out=ptr[1:])
        idx = cols.astype(_index_dtype(K))
        val = wm[rows, cols]
    elif fmt == "bsr4x1":
        Mb = -(-M // 4)
        pm = np.zeros((Mb * 4, K), bool)
        pm[:M] = mask
        pw = np.concatenate([wm, np.zeros((Mb * 4 - M, K), dt)], 0)
        bmask = pm.reshape(Mb, 4, K).any(axis=1)
        brow, bcol = np.nonzero(bmask)
        ptr = np.zeros(Mb + 1, np.int64)
        np.cumsum(np.bincount(brow, minlength=Mb), out=ptr[1:])
        idx = bcol.astype(_index_dtype(K))
        val = pw.reshape(Mb, 4, K)[brow, :, bcol].reshape(-1)
    elif fmt == "bsr1x4":
        K4 = -(-K // 4)
        pm = np.zeros((M, K4 * 4), bool)
        pm[:, :K] = mask
        pw = np.repeat(fill, K4 * 4, 1).astype(dt)
        pw[:, :K] = wm
        bmask = pm.reshape(M, K4, 4).any(axis=2)
        brow, bcol = np.nonzero(bmask)
        ptr = np.zeros(M + 1, np.int64)
        np.cumsum(np.bincount(brow, minlength=M), out=ptr[1:])
        idx = bcol.astype(_index_dtype(K4))
        val = pw.reshape(M, K4, 4)[brow, bcol].reshape(-1)
    else:
        ptr, idx, val = _pack_nm(wm, mask, fill)
    val = np.ascontiguousarray(val, dtype=dt)
    return SparseMatrix(fmt, (M, K), ptr, np.ascontiguousarray(idx), val, sc, zp)


def _pack_nm(wm, mask, fill):
    """2:4 along K: per group two (value, 2-bit position) slots; a slot left
    free repeats the other slot's position with the fill value."""
    M, K = wm.shape
    G = -(-K // 4)
    pm = np.zeros((M, G * 4), bool)
    pm[:, :K] = mask
    pw = np.repeat(fill, G * 4, 1).astype(wm.dtype)
    pw[:, :K] = wm
    pm = pm.reshape(M, G, 4)
    counts = pm.sum(-1)
    if counts.max(initial=0) > 2:
        m, g = np.argwhere(counts > 2)[0]
        msg = (
            f"format 'nm24' keeps at most 2 of every 4 consecutive k, but row {m} "
            f"keeps {counts[m, g]} in columns {4 * g}..{4 * g + 3}; prune with "
            f"lowprec.prune.magnitude(w, 0.5, pattern=(2, 4)) first"
        )
        raise ValueError(msg)
    # positions of the kept entries first (stable), then the rest
    order = np.argsort(~pm, axis=-1, kind="stable")
    p0 = order[..., 0]
    p1 = np.where(counts == 2, order[..., 1], p0)
    pw = pw.reshape(M, G, 4)
    v0 = np.take_along_axis(pw, p0[..., None], -1)[..., 0]
    v1 = np.take_along_axis(pw, p1[..., None], -1)[..., 0]
    f = np.broadcast_to(fill.reshape(M, 1), (M, G))
    v0 = np.where(counts >= 1, v0, f)
    v1 = np.where(counts == 2, v1, f)
    p0 = np.where(counts >= 1, p0, 0)
    p1 = np.where(counts >= 1, p1, 0)
    # free-slot flags: the kernels skip a free slot's product (0 * inf would
    # be NaN where the weight was pruned)
    flags = (counts == 0) * NM_FREE0 | (counts < 2) * NM_FREE1
    idx = (p0 | (p1 << 2) | flags).astype(np.uint8).reshape(-1)
    val = np.stack([v0, v1], -1).reshape(-1)
    ptr = np.arange(M + 1, dtype=np.int64) * G
    return ptr, idx, val


def _nm_flags(idx, val, fill, G):
    """nm24 position bytes (p0 | p1 << 2) of a file written before the
    free-slot flags existed, with the flags derived from the arrays: slot 1
    is free where it repeats slot 0's position, slot 0 too where both slots
    hold the row's fill value (an empty group, or one kept weight equal to
    the fill value, whose product is then skipped: 0 either way for finite
    x). A file with any flag set keeps its own."""
    if np.any(idx & (NM_FREE0 | NM_FREE1)):
        return idx
    pos = idx & 15
    free1 = (pos & 3) == (pos >> 2)
    f = np.repeat(fill, G)
    v = val.reshape(-1, 2)
    free0 = free1 & (v[:, 0] == f) & (v[:, 1] == f)
    return (pos | (free0 * NM_FREE0) | (free1 * NM_FREE1)).astype(np.uint8)


def _row_vec(arr, name, M):
    if arr.size == 1:
        return np.full(M, arr.reshape(-1)[0], arr.dtype)
    if arr.shape == (M,):
        return arr
    msg = f"{name} must be a scalar or have shape ({M},) (one per row), got {arr.shape}"
    raise ValueError(msg)


# --------------------------------------------------------------------------- #
# spmm


def _check_w(w, name="w"):
    if not isinstance(w, SparseMatrix):
        msg = (
            f"{name} must be a lowprec.sparse.SparseMatrix, got {type(w).__name__}; "
            f"pack it with lowprec.sparse.from_dense"
        )
        raise TypeError(msg)


def _check_x(x, K, dtypes, fix):
    v.check_array(x, "x", dtypes, fix=fix)
    if x.ndim not in (1, 2):
        msg = f"x must be 1-D (K,) or 2-D (K, N), got shape {x.shape}"
        raise ValueError(msg)
    if x.shape[0] != K:
        msg = (
            f"x.shape[0] must equal w.shape[1]={K} (W (M, K) @ X (K, N)), got {x.shape}"
        )
        raise ValueError(msg)
    return x.reshape(K, 1) if x.ndim == 1 else x


def _check_out(out, shape, dtype, x):
    if out is None:
        return np.empty(shape, dtype)
    v.check_array(out, "out", (np.dtype(dtype),))
    if out.shape != shape or not out.flags.c_contiguous or not out.flags.writeable:
        msg = (
            f"out must be a writable C-contiguous {dtype} array of shape "
            f"{shape}, got {out.shape}"
        )
        raise ValueError(msg)
    if np.shares_memory(out, x):
        msg = "out must not overlap x"
        raise ValueError(msg)
    return out


def _fast_path() -> bool:
    """The zmm kernels (float and int8): AVX-512 VNNI hosts."""
    return _dispatch.zmm_isa()


def _ymm_path() -> bool:
    """The AVX2 (ymm) kernels: isa avx2 or avx_vnni."""
    return _dispatch.get_isa() in ("avx2", "avx_vnni")


def _ymm_float_path() -> bool:
    """The float kernels' AVX2 tiles: the ymm path on a CPU with FMA and F16C
    (float16 values widened by vcvtph2ps). Every AVX2 x86 CPU has both; the
    check keeps the LLVM IR off a target that would lower them to library
    calls."""
    return _ymm_path() and {"fma", "f16c"} <= _dispatch.host_features()


def _parts(threads: int) -> int:
    # Work is split into CHUNKS_PER_THREAD parts of equal nnz per thread, handed
    # out dynamically (parallel_chunksize 1): on a shared machine a thread that
    # loses its core no longer holds up the call. 1024x1024 @ 95%, N=256, two
    # threads on a loaded 2-core VM: 11.3 ms with one static part per thread,
    # 1.0 ms for one thread alone.
    return 1 if threads == 1 else threads * CHUNKS_PER_THREAD


def _run(threads: int, serial, parallel, args) -> None:
    """serial(*args) on this thread for threads == 1 (no parallel region at
    all: numba.set_num_threads around a prange call cost ~20 us of a 60 us
    small call), else parallel(*args) with the parts handed out one at a time
    (see _parts)."""
    if threads == 1:
        serial(*args)
    else:
        with numba.parallel_chunksize(1):
            parallel(*args)


def _threads(work: int) -> int:
    return 1 if work < SERIAL_MACS else _dispatch.num_threads()


def spmm(w, x, *, bias=None, activation=None, out=None, device=None):
    """y = activation(W @ X + bias) for sparse float W (M, K) and dense X.

    Parameters
    ----------
    w : SparseMatrix with float32 or float16 values
    x : float32 (or float16, converted) ndarray (K, N) or (K,)
    bias : float32 (M,) or scalar, optional (one per output row)
    activation : None, "relu", "relu6" or (min, max)
    out : float32 (M, N) (or (M,) for 1-D x) C-contiguous, optional
    device : None, "cpu" or "cuda"; None follows x (CUDA arrays run on the GPU
        and come back as the same kind, docs/cuda.md)

    Accuracy: see the module docstring (summation-order bound).
    """
    if device is not None or type(x) is not np.ndarray:
        from . import _cuda, cuda_ops

        if _cuda.use_cuda(x, device=device):
            return cuda_ops.spmm_cuda(w, x, bias=bias, activation=activation, out=out)
    _check_w(w)
    if w.dtype == np.int8:
        msg = "w has int8 values; use lowprec.qlinear_spmm (or pack float values)"
        raise TypeError(msg)
    M, K = w.shape
    x2 = _check_x(x, K, v.FLOAT_INPUT_TYPES, "use float32 activations")
    N = x2.shape[1]
    shape = (M,) if x.ndim == 1 else (M, N)
    y = _check_out(out, shape, np.float32, x)
    y2 = y.reshape(M, N)
    lo, hi = v.activation_bounds(activation)
    if bias is None:
        b = np.zeros(1, np.float32)
    else:
        b = np.asarray(bias, dtype=np.float32).reshape(-1)
        if b.size not in (1, M):
            msg = (
                f"bias must be a scalar or have shape ({M},) (one per row), "
                f"got {np.shape(bias)}"
            )
            raise ValueError(msg)
    epi = bias is not None or activation is not None
    if M == 0 or N == 0:
        return y
    if K == 0 or w.nnz == 0:
        y2[:] = np.minimum(
            np.maximum(np.broadcast_to(b.reshape(-1, 1), (M, N)), lo), hi
        )
        return y
    threads = _threads(w.nnz * N)
    xf = np.ascontiguousarray(x2, dtype=np.float32)
    if N == 1:  # one column: a row-dot kernel, not a 1-of-16-lanes tile
        fast = _row_dot8_path()  # once: the arrays' form follows it
        indptr, cols, vals = _spmv_arrays(w, fast)
        chunks = w._chunks(_parts(threads), rows=True)
        args = (indptr, cols, vals, xf.reshape(K), chunks, b, np.float32(lo),
                np.float32(hi), y2.reshape(M))  # fmt: skip
        if fast:
            _run(threads, _ks.spmv_float8_serial, _ks.spmv_float8, args)
        else:
            _dispatch.call_on_threads(threads, _ks.spmv_float, *args)
        return y
    ymm = _ymm_float_path()
    if not (ymm or _fast_path()):
        indptr, cols, vals = w._expanded()
        vals = _f32_values(w, vals)
        rows = _row_chunks(indptr, threads)
        _dispatch.call_on_threads(
            threads,
            _ks.spmm_float_portable,
            indptr,
            cols,
            vals,
            xf,
            rows,
            b,
            np.float32(lo),
            np.float32(hi),
            y2,
        )
        return y
    R, C = w.block
    # X rows past K for the last 1x4 block; for the ymm tiles, which read
    # whole 8-column vectors, columns up to a multiple of 8 (zeros)
    Kp = -(-K // 4) * 4 if w.format == "bsr1x4" else K
    Np = -(-N // 8) * 8 if ymm else N
    if (Kp, Np) != (K, N):
        xp = np.zeros((Kp, Np), np.float32)
        xp[:K, :N] = xf
        xf = xp
    kid = (
        4 * _SHAPE_ID[w.format]
        + 2 * (w.dtype == np.float16)
        + (w.idx.dtype == np.int32)
    )
    chunks = w._chunks(_parts(threads))
    args = (
        kid,
        R,
        xf.ctypes.data,
        xf.strides[0],
        w.idx.ctypes.data,
        w.val.ctypes.data,
        _k_chunks(w, SPMM_K_CHUNK),
        chunks,
        y2,
        y2.ctypes.data,
        b,
        np.float32(lo),
        np.float32(hi),
        epi,
        ymm,
    )
    _run(threads, _ks.spmm_float_serial, _ks.spmm_float, args)
    return y


def _f32_values(w, vals):
    """Expanded values as float32 (numba arrays have no float16), cached."""
    if vals.dtype == np.float32:
        return vals
    got = w._cache.get("vals_f32")
    if got is None:
        got = w._cache["vals_f32"] = vals.astype(np.float32)
    return got


def _row_multiplier(w, sx, sy):
    """eq. 10 per row, (M,) float64, cached on w for the last (x_scale,
    y_scale) seen (one slot: dynamically quantized activations change x_scale
    on every call)."""
    key = (sx.dtype.str, sx.tobytes(), None if sy is None else sy.tobytes())
    got = w._cache.get("mult")
    if got is None or got[0] != key:
        sy_ = None if sy is None else sy.reshape(-1)
        m = np.ascontiguousarray(
            _g._multiplier(sx.reshape(-1), w.scale, sy_, w.shape[0])[0]
        )
        m.flags.writeable = False
        got = w._cache["mult"] = (key, m)
    return got[1]


def _row_stats(w):
    """(longest row's stored count, all zero points 0, rowsum(W - zw) (M,)
    int64 over the stored entries), cached on w (pruned entries hold zw: 0)."""
    got = w._cache.get("row_stats")
    if got is None:
        M = w.shape[0]
        indptr, _, vals = w._expanded()
        counts = np.diff(indptr)
        rows = np.repeat(np.arange(M), counts)
        wz = vals.astype(np.int64) - w.zero_point.astype(np.int64)[rows]
        rs = np.zeros(M, np.int64)
        np.add.at(rs, rows, wz)
        rs.flags.writeable = False
        got = (int(counts.max(initial=0)), not w.zero_point.any(), rs)
        w._cache["row_stats"] = got
    return got


def _k_chunks(w, k_chunk):
    """(Mb, nkc+1) int64: block row b's blocks whose columns lie in K chunk j
    ([j*k_chunk, (j+1)*k_chunk)) are kptr[b, j] .. kptr[b, j+1]-1 (cached on
    w). One chunk for 2:4 (its groups are all stored), for K <= k_chunk, and
    for rows whose block columns are not increasing (a file written
    elsewhere)."""
    key = ("kptr", k_chunk)
    got = w._cache.get(key)
    if got is None:
        Mb, (_, C) = w.ptr.size - 1, w.block
        ncols = -(-w.shape[1] // C)  # block columns
        step = max(1, k_chunk // C)
        nkc = -(-ncols // step)
        rows = np.repeat(np.arange(Mb, dtype=np.int64), np.diff(w.ptr))
        keys = rows * ncols + w.idx.astype(np.int64)
        if w.format == "nm24" or nkc <= 1 or np.any(np.diff(keys) <= 0):
            got = np.stack([w.ptr[:-1], w.ptr[1:]], 1)
        else:
            bounds = np.minimum(np.arange(nkc + 1, dtype=np.int64) * step, ncols)
            targets = np.arange(Mb, dtype=np.int64)[:, None] * ncols + bounds
            got = np.searchsorted(keys, targets.ravel()).reshape(Mb, nkc + 1)
        got = np.ascontiguousarray(got, dtype=np.int64)
        got.flags.writeable = False
        w._cache[key] = got
    return got


def _row_dot8_path() -> bool:
    """The one-column float kernel of 8-entry groups (kernels/sparse_gemm.py
    _row_dot8): any x86 path with FMA and F16C (every AVX2 CPU has both);
    the portable path keeps the scalar row-dot."""
    return _dispatch.get_isa() != "portable" and {"fma", "f16c"} <= (
        _dispatch.host_features()
    )


def _spmv_arrays(w, fast):
    """(indptr, cols, vals) for the one-column float kernels, cached: CSR's own
    arrays (uint16 indices where K allows) for the row-dot of 8, the expanded
    view otherwise; float16 values as their uint16 bits for it (widened in the
    kernel: half the bytes), as float32 for the scalar kernel."""
    key = ("spmv", fast)
    got = w._cache.get(key)
    if got is None:
        if not fast:
            indptr, cols, vals = w._expanded()
            got = (indptr, cols, _f32_values(w, vals))
        else:
            indptr, cols, vals = (
                (w.ptr, w.idx, w.val) if w.format == "csr" else w._expanded()
            )
            vals = vals.view(np.uint16) if vals.dtype == np.float16 else vals
            got = (indptr, cols, vals)
        w._cache[key] = got
    return got


def _row_chunks(indptr, threads):
    # bounds of `threads` parts of ~equal work: a row's (block row's) stored
    # entries (blocks) plus a fixed cost per row
    work = indptr + np.arange(indptr.size)
    got = np.searchsorted(work, np.linspace(0, work[-1], threads + 1)).astype(np.int64)
    got[0], got[-1] = 0, indptr.size - 1
    return np.maximum.accumulate(got)


def qlinear_spmm(
    w,
    x,
    x_scale,
    x_zero_point,
    y_scale,
    y_zero_point,
    *,
    bias=None,
    activation=None,
    out_dtype=None,
    out=None,
    device=None,
):
    """QLinearMatMul with sparse int8 weights on the left: y = W @ X requantized.

    Bit-exactly ``lowprec.qlinear_matmul(x.T, x_scale, x_zero_point,
    w.to_dense().T, w.scale, w.zero_point, y_scale, y_zero_point, bias=bias,
    activation=activation, out_dtype=out_dtype).T`` (docs/quantization.md eqs.
    8-13), computed from the stored entries only.

    Parameters
    ----------
    w : SparseMatrix with int8 values, per-row scale and zero point
    x : uint8 / int8 ndarray (K, N) or (K,)
    x_scale, x_zero_point : per-tensor scale (float32/float16) and zero point
    y_scale, y_zero_point : per-tensor; y_zero_point's dtype is the output type
        (both may be None with ``out_dtype=np.float32``: real output, eq. 13)
    bias : int32 (M,) or scalar, in the accumulator's scale x_scale * w.scale
    activation : None, "relu", "relu6" or (min, max), in real units (eq. 12)
    device : None, "cpu" or "cuda"; None follows x (docs/cuda.md)
    """
    if device is not None or type(x) is not np.ndarray:
        from . import _cuda, cuda_ops

        if _cuda.use_cuda(x, device=device):
            return cuda_ops.qlinear_spmm_cuda(
                w, x, x_scale, x_zero_point, y_scale, y_zero_point, bias=bias,
                activation=activation, out_dtype=out_dtype, out=out,
            )  # fmt: skip
    _check_w(w)
    if w.dtype != np.int8:
        msg = "w has float values; use lowprec.spmm (or pack with dtype=np.int8)"
        raise TypeError(msg)
    M, K = w.shape
    x2 = _check_x(x, K, v.INT8_TYPES, "quantize it with lowprec.quantize_linear")
    N = x2.shape[1]
    key = _s8_key(
        x, x_scale, x_zero_point, y_scale, y_zero_point, activation, out_dtype
    )
    calls = w._cache.get("s8_calls")
    if calls is None:
        calls = w._cache["s8_calls"] = {}
    got = calls.get(key) if key is not None else None
    if got is None:
        got = _s8_params(w, x, x_scale, x_zero_point, y_scale, y_zero_point,
                         activation, out_dtype)  # fmt: skip
        if key is not None:
            if len(calls) >= 8:  # engines use a few; a changing x_scale, many
                calls.clear()
            calls[key] = got
    zx, mult, zy, qlo, qhi, mode, odt_final, f32_ok = got
    if bias is None:
        bias64 = w._cache.get("s8_no_bias")
        if bias64 is None:  # the kernels only read it
            bias64 = w._cache["s8_no_bias"] = np.zeros(M, np.int64)
    else:
        v.check_array(
            bias,
            "bias",
            (np.dtype(np.int32),),
            fix="quantize it as rint(bias_real / (x_scale * w.scale))",
        )
        if bias.size != 1 and bias.shape != (M,):
            msg = (
                f"bias must be a scalar or have shape ({M},) (one per row), "
                f"got {bias.shape}"
            )
            raise ValueError(msg)
        bias64 = np.broadcast_to(bias.reshape(-1).astype(np.int64), (M,)).copy()
    shape = (M,) if x.ndim == 1 else (M, N)
    y = _check_out(out, shape, odt_final, x)
    y2 = y.reshape(M, N)
    if M == 0 or N == 0:
        return y
    maxrow, symmetric, rs = _row_stats(w)
    if maxrow > _INT32_SAFE_NNZ:
        msg = (
            f"a row of w stores more than {_INT32_SAFE_NNZ} entries: int32 sums "
            f"could overflow; split K"
        )
        raise ValueError(msg)
    threads = _threads(w.nnz * N)
    flip = 0x80 if x.dtype == np.int8 else 0
    if _fast_path() and w.format == "bsr1x4" and symmetric and K > 0 and N == 1:
        # one column: 16 rows a tile, X words from two registers per bank
        bv, bi, tb, slot_ptr = _gemv_banks(w)
        if slot_ptr[-1] < BANK_PARALLEL_SLOTS:
            threads = 1
        chunks = _bank_chunks(w, slot_ptr, _parts(threads), "banks")
        xc = np.ascontiguousarray(x2)
        args = (xc, np.uint8(flip), bv, bi, tb, chunks, zx + flip, rs, bias64, mult,
                zy, qlo, qhi, mode, y2.reshape(M))  # fmt: skip
        _run(threads, _ks.spmm_s8_banks_serial, _ks.spmm_s8_banks, args)
        return y
    ymm = _ymm_path()
    if ymm and w.format == "bsr1x4" and symmetric and K > 0 and N == 1:
        # one column on AVX2: 8 rows a tile, X words gathered
        bv, bi, slot_ptr = _gemv_gather8(w)
        if slot_ptr[-1] < GATHER_PARALLEL_SLOTS:
            threads = 1
        chunks = _bank_chunks(w, slot_ptr, _parts(threads), "gather8")
        args = (np.ascontiguousarray(x2).view(np.uint8), np.uint8(flip), bv, bi,
                slot_ptr, chunks, zx + flip, rs, bias64, mult, zy, qlo, qhi, mode,
                y2.reshape(M))  # fmt: skip
        _run(threads, _ks.spmm_s8_gather_serial, _ks.spmm_s8_gather, args)
        return y
    if (_fast_path() or ymm) and w.format == "bsr1x4" and symmetric and K > 0:
        # ymm: the AVX2 tiles (exact vpmaddwd): X' in k pairs of uint16, twice
        # the rows of the zmm layout, and the values as int16
        K4, Np = -(-K // 4), -(-N // 16) * 16
        Kx = 2 * K4 if ymm else K4
        x2 = np.ascontiguousarray(x2).view(np.uint8)  # flip carries the sign
        # X packed 64-byte aligned (a zmm load across two cache lines costs
        # two: the tile loop ran 8 cycles per block instead of 5.7 with X in
        # L1), one copy per thread packed inside the parallel region
        # (kernels/sparse_gemm.spmm_s8_vnni) unless the copies would pass
        # _S8_PRIVATE_X_BYTES: then one copy, packed here
        T = 1 if threads == 1 else numba.config.NUMBA_NUM_THREADS
        if T * Kx * Np * 4 > _S8_PRIVATE_X_BYTES:
            T = 1
        xps = _dispatch.scratch("spmm_s8_x", (T, Kx, Np, 4), np.uint8)
        packed = np.zeros(numba.config.NUMBA_NUM_THREADS, np.int64)
        if T == 1 and threads != 1:
            (_ks.pack_x_u16 if ymm else _ks.pack_x_u8)(x2, np.uint8(flip), xps[0])
            packed[:] = 1
        val = _val16(w) if ymm else w.val  # held here while the kernel reads it
        f32 = 0
        if f32_ok:  # |acc| <= |P| + |c|: |x'| <= 255, |w| <= 128
            b_max = int(np.abs(bias64).max()) if bias is not None else 0
            acc_max = maxrow * 255 * 128 + abs(zx + flip) * _rs_absmax(w) + b_max
            f32 = int(acc_max < 2**24)
        args = (x2, np.uint8(flip), xps, packed, w.idx.ctypes.data,
                w.idx.dtype == np.int32, val.ctypes.data, w.ptr,
                w._chunks(_parts(threads)), zx + flip, rs, bias64, mult, zy, qlo,
                qhi, f32, y2, ymm)  # fmt: skip
        _run(threads, _ks.spmm_s8_vnni_serial, _ks.spmm_s8_vnni, args)
        return y
    indptr, cols, vals = w._expanded()
    _dispatch.call_on_threads(
        threads,
        _ks.spmm_s8_portable,
        indptr,
        cols,
        vals,
        w.zero_point,
        np.ascontiguousarray(x2),
        _row_chunks(indptr, threads),
        zx,
        rs,
        bias64,
        mult,
        zy,
        qlo,
        qhi,
        mode,
        y2,
    )
    return y


def _f32_lanes_ok(mult, zy, qlo, qhi) -> bool:
    """float32_requant_ok's conditions other than the accumulator bound."""
    return bool(_kv.float32_requant_ok(0, mult.reshape(1, -1), zy, qlo, qhi))


def _rs_absmax(w) -> int:
    """max |rowsum(W)| (the row terms' bound), cached."""
    got = w._cache.get("rs_absmax")
    if got is None:
        got = w._cache["rs_absmax"] = int(np.abs(_row_stats(w)[2]).max(initial=0))
    return got


def _val16(w):
    """w's int8 values as int16 (the AVX2 tiles' vpmaddwd operands), cached."""
    got = w._cache.get("val16")
    if got is None:
        got = w._cache["val16"] = w.val.astype(np.int16)
        got.flags.writeable = False
    return got


def _gemv_banks(w):
    """The one-column int8 kernel's slots (kernels/sparse_gemm.py, BANK_WORDS),
    built once per w: bv (slots, 16) int32 block words, bi (slots, 16) uint8
    word indices within the bank, tb (tiles, banks + 1) int64 slot offsets,
    slot_ptr (tiles + 1,) each tile's first slot and the slot count."""
    got = w._cache.get("gemv_banks")
    if got is not None:
        return got
    M, K = w.shape
    BW = _ks.BANK_WORDS
    K4 = -(-K // 4)
    nb = -(-K4 // BW)
    nt = -(-M // 16)
    counts = np.diff(w.ptr.astype(np.int64))
    rows = np.repeat(np.arange(M, dtype=np.int64), counts)
    words = w.idx.astype(np.int64)
    banks = words // BW
    order = np.lexsort((words, banks, rows))  # by row, bank, word
    rows, banks, words = rows[order], banks[order], words[order]
    group = rows * nb + banks
    per = np.bincount(group, minlength=M * nb)
    rank = np.arange(group.size) - (np.cumsum(per) - per)[group]
    tiled = np.zeros((nt * 16, nb), np.int64)
    tiled[:M] = per.reshape(M, nb)
    slots = tiled.reshape(nt, 16, nb).max(axis=1)  # (nt, nb): the fullest row
    first = np.zeros(nt * nb + 1, np.int64)
    np.cumsum(slots.reshape(-1), out=first[1:])
    tb = first[np.arange(nt)[:, None] * nb + np.arange(nb + 1)[None, :]]
    at = first[(rows // 16) * nb + banks] + rank
    bv = np.zeros((first[-1], 16), np.int32)
    bi = np.zeros((first[-1], 16), np.uint8)
    lane = rows % 16
    bv[at, lane] = np.ascontiguousarray(w.val).view(np.int32)[order]
    bi[at, lane] = words - banks * BW
    for arr in (bv, bi, tb):
        arr.flags.writeable = False
    slot_ptr = np.append(tb[:, 0], first[-1])
    got = w._cache["gemv_banks"] = (bv, bi, tb, slot_ptr)
    return got


def _gemv_gather8(w):
    """The AVX2 one-column kernel's slots (kernels/sparse_gemm._gather_tile),
    built once per w: bv (slots, 8) int32 block words, bi (slots, 8) int32
    word indices (block columns), slot_ptr (tiles + 1,) each 8-row tile's
    first slot and the slot count; lane l of tile t is row 8t + l, a tile
    has as many slots as its longest row has blocks (0 pads the others)."""
    got = w._cache.get("gemv_gather8")
    if got is not None:
        return got
    M = w.shape[0]
    nt = -(-M // 8)
    counts = np.zeros(nt * 8, np.int64)
    counts[:M] = np.diff(w.ptr.astype(np.int64))
    slots = counts.reshape(nt, 8).max(axis=1)
    slot_ptr = np.zeros(nt + 1, np.int64)
    np.cumsum(slots, out=slot_ptr[1:])
    rows = np.repeat(np.arange(M, dtype=np.int64), counts[:M])
    rank = np.arange(rows.size) - w.ptr.astype(np.int64)[rows]
    at = slot_ptr[rows // 8] + rank
    bv = np.zeros((slot_ptr[-1], 8), np.int32)
    bi = np.zeros((slot_ptr[-1], 8), np.int32)
    bv[at, rows % 8] = np.ascontiguousarray(w.val).view(np.int32)
    bi[at, rows % 8] = w.idx
    for arr in (bv, bi, slot_ptr):
        arr.flags.writeable = False
    got = w._cache["gemv_gather8"] = (bv, bi, slot_ptr)
    return got


def _bank_chunks(w, slot_ptr, parts: int, layout: str) -> np.ndarray:
    """Tile bounds of ``parts`` contiguous parts of ~equal slots (cached per
    layout: "banks" or "gather8")."""
    key = ("bank_chunks", layout, parts)
    got = w._cache.get(key)
    if got is None:
        nt = slot_ptr.size - 1
        work = slot_ptr + np.arange(nt + 1)  # slots plus a fixed cost per tile
        targets = np.linspace(0, work[-1], parts + 1)
        got = np.searchsorted(work, targets).astype(np.int64)
        got[0], got[-1] = 0, nt
        got = w._cache[key] = np.maximum.accumulate(got)
    return got


def _s8_key(x, x_scale, x_zero_point, y_scale, y_zero_point, activation, out_dtype):
    """qlinear_spmm's per-tensor parameters as a hashable key, or None where
    the general path must look at them (and raise if they are invalid): the
    validated parameters are cached on w per key (the validation cost 20 us
    a call, as much as a 1024 x 1024 int8 GEMV)."""
    kx = _g._scale_key(x_scale)
    zx = _g._scalar_zero_point(x_zero_point, x.dtype)
    if kx is None or zx is None:
        return None
    ky = None if y_scale is None else _g._scale_key(y_scale)
    if ky is None and y_scale is not None:
        return None
    t = type(y_zero_point)
    if t is np.uint8 or t is np.int8:
        kz = (t, int(y_zero_point))
    elif y_zero_point is None:
        kz = None
    else:
        return None
    act = activation
    if isinstance(activation, tuple):
        # by value and sign: (-0.0, 6.0) == (0.0, 6.0), but the float output
        # clamps negative values to its bound, -0.0 or 0.0
        try:
            act = tuple((float(b), math.copysign(1.0, float(b))) for b in activation)
        except (TypeError, ValueError):
            return None
    elif not (activation is None or isinstance(activation, str)):
        return None
    key = (x.dtype.char, kx, zx, ky, kz, act, out_dtype)
    try:
        hash(key)
    except TypeError:  # unhashable parts: the general path says what is wrong
        return None
    return key


def _s8_params(w, x, x_scale, x_zero_point, y_scale, y_zero_point, activation,
               out_dtype):  # fmt: skip
    """Validated (zx, row multipliers, zy, qlo, qhi, mode, output dtype)."""
    sx = v.scale_param(x_scale, "x_scale")
    if sx.size != 1:
        msg = f"x_scale must be a scalar (per-tensor activations), got shape {sx.shape}"
        raise ValueError(msg)
    zx = (
        0
        if x_zero_point is None
        else v.zero_point_param(x_zero_point, "x_zero_point", x.dtype)
    )
    if np.size(zx) != 1:
        msg = f"x_zero_point must be a scalar, got shape {np.shape(zx)}"
        raise ValueError(msg)
    zx = int(np.asarray(zx).reshape(-1)[0])
    odt = _g._out_dtype(out_dtype)
    if odt == np.float32:
        mult = _row_multiplier(w, sx, None)
        zy = 0.0
        qlo, qhi = v.activation_bounds(activation)
        mode, odt_final = 2, np.dtype(np.float32)
    else:
        sy = v.output_scale(y_scale)
        zyp = _g._y_zero_point(y_zero_point, odt)
        odt_final = zyp.dtype
        zy = float(zyp.reshape(-1)[0])
        qlo, qhi = _g._quant_bounds(
            _g._hashable(activation), zy, float(sy.reshape(-1)[0]), odt_final
        )
        mult = _row_multiplier(w, sx, sy)
        mode = 1
    # uint8 / int8 output may take the tiles' float32 lanes when, besides
    # |acc| < 2**24 (checked per call: bias changes), the multipliers, z_y and
    # bounds pass int8_gemm_vnni.float32_requant_ok
    f32_ok = mode == 1 and _f32_lanes_ok(mult, zy, qlo, qhi)
    return zx, mult, zy, qlo, qhi, mode, odt_final, f32_ok


# --------------------------------------------------------------------------- #
# auto_pack: dense or sparse, from a cost model measured on this machine

# A sparse format is chosen only when its estimate beats dense by this factor:
# the model's error (noise, cache effects of other shapes) must not make a
# layer slower than dense.
DENSE_BIAS = 0.85
_CAL_N = (1, 16, 64, 256)
_CAL_SHAPE = (512, 512)
_CAL_SPARSITY = 0.9
_COST_FILE = "sparse_cost_v3.json"  # v3: serial small calls (v2 fits held stalls)
_cost_memory: dict[str, dict] = {}


@dataclasses.dataclass(frozen=True)
class AutoPacked:
    """The result of :func:`auto_pack`."""

    weights: object  # SparseMatrix, or the masked dense ndarray
    choice: str  # "dense" or a format name
    reason: str
    estimates_s: dict  # choice -> estimated seconds per call at n_hint
    measured_s: dict | None = None  # {"dense": s, choice: s} when timed

    def __str__(self):
        return f"{self.choice}: {self.reason}"


def _cache_dir():
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(
        os.path.expanduser("~"), ".cache"
    )
    return os.path.join(base, "lowprec")


def _machine_key() -> str:
    feats = ",".join(
        sorted(f for f in _dispatch.host_features() if f.startswith("avx"))
    )
    # the kernels' source stamp: a model measured on older kernels is stale
    stamp = _ks_pkg.SOURCE_STAMP[:12]
    return f"{_dispatch.get_isa()}|threads={_dispatch.num_threads()}|{feats}|{stamp}"


def per_call(fn, min_time):
    """Seconds per call of fn, called back to back until min_time has passed."""
    n, t0 = 0, time.perf_counter()
    while True:
        fn()
        n += 1
        el = time.perf_counter() - t0
        if el >= min_time:
            return el / n


def _time(fn, min_time=0.02):
    fn()
    return min(per_call(fn, min_time / 3) for _ in range(3))


def calibrate(*, refresh=False) -> dict:
    """The cost model: for dense numpy float32 matmul and each sparse format, at
    each N in _CAL_N, [fixed seconds per call, seconds per multiply-add] (dense:
    per M*K*N; sparse: per stored value and column), fitted from a near-empty
    and a _CAL_SPARSITY matrix of _CAL_SHAPE (best of 3 samples each).
    Measured once per machine / isa / thread count; cached in memory and in
    ``$XDG_CACHE_HOME/lowprec/sparse_cost_v2.json``."""
    key = _machine_key()
    if not refresh and key in _cost_memory:
        return _cost_memory[key]
    path = os.path.join(_cache_dir(), _COST_FILE)
    stored = {}
    try:
        with open(path) as f:
            stored = json.load(f)
    except (OSError, ValueError):
        stored = {}
    if not refresh and isinstance(stored.get(key), dict):
        _cost_memory[key] = stored[key]
        return stored[key]
    rng = np.random.default_rng(0)
    M, K = _CAL_SHAPE
    w = rng.standard_normal((M, K)).astype(np.float32)
    order = np.argsort(rng.random((M, K)), axis=1)

    def rows_mask(keep):
        mask = np.zeros((M, K), bool)
        np.put_along_axis(mask, order[:, :keep], True, axis=1)
        return mask

    big, tiny = rows_mask(max(1, int(K * (1 - _CAL_SPARSITY)))), rows_mask(1)
    mats = {}
    for f in ("csr", "bsr4x1", "bsr1x4"):
        pair = []
        for mask in (tiny, big):
            if f == "bsr4x1":
                mask = np.repeat(mask[::4], 4, 0)
            elif f == "bsr1x4":
                mask = np.repeat(mask[:, ::4], 4, 1)
            pair.append(from_dense(w, mask, format=f))
        mats[f] = pair
    w_tiny = np.ascontiguousarray(w[:8, :8])
    model = {"dense": {}, **{f: {} for f in mats}}
    for n in _CAL_N:
        x = rng.standard_normal((K, n)).astype(np.float32)
        t0 = _time(lambda x=x: w_tiny @ x[:8])
        t1 = _time(lambda x=x: w @ x)
        model["dense"][str(n)] = [t0, max(t1 - t0, 1e-3 * t1) / (M * K * n)]
        for f, (a, b) in mats.items():
            t0 = _time(lambda a=a, x=x: spmm(a, x))
            t1 = _time(lambda b=b, x=x: spmm(b, x))
            per = max(t1 - t0, 1e-3 * t1) / max(1, (b.nnz - a.nnz) * n)
            model[f][str(n)] = [t0, per]
    model["nm24"] = {k: list(v) for k, v in model["csr"].items()}  # same loop
    _cost_memory[key] = model
    try:
        os.makedirs(_cache_dir(), exist_ok=True)
        stored[key] = model
        with open(path, "w") as f:
            json.dump(stored, f, indent=1)
    except OSError:
        pass  # a read-only home keeps the in-memory cache only
    return model


def _interp(table: dict, n: int, i: int) -> float:
    """Entry i of the model at n: log-linear interpolation between calibrated n."""
    ns = sorted(int(k) for k in table)
    if n <= ns[0]:
        return table[str(ns[0])][i]
    if n >= ns[-1]:
        return table[str(ns[-1])][i]
    for a, b in zip(ns, ns[1:], strict=False):
        if a <= n <= b:
            t = (math.log(n) - math.log(a)) / (math.log(b) - math.log(a))
            lo, hi = table[str(a)][i], table[str(b)][i]
            return math.exp((1 - t) * math.log(lo) + t * math.log(hi))
    return table[str(ns[-1])][i]


def _estimate(table: dict, n: int, work: int) -> float:
    """Seconds per call: fixed cost + work (multiply-adds) * seconds each."""
    return _interp(table, n, 0) + work * _interp(table, n, 1)


# auto_pack times its sparse choice against dense when a dense call is
# estimated to take at most this long (_measure_pair: up to ~0.3 s per layer)
VERIFY_MAX_S = 0.02


def _measure_pair(dense_w, sm, n, rounds=5, min_time=1e-3, warmup=2):
    """(dense, sparse) seconds per call on one random X, interleaved rounds,
    the fastest round of each (a neighbour's burst slows one round, not all).
    Each round first makes ``warmup`` untimed calls: the first call after the
    other library ran pays for switching thread pools (numpy's BLAS threads
    and numba's, both spinning on the same cores; measured on the 2-core VM:
    0.2-6 ms extra for a 150 us spmm), which with 1 ms windows and no warm-up
    made both sides measure 10-30x too slow and kept dense for a 95 % sparse
    layer. Cost: rounds x 2 x (warmup + 1..) calls, ~0.3 s for the slowest
    layers timed (dense estimated at VERIFY_MAX_S)."""
    x = np.random.default_rng(1).standard_normal((dense_w.shape[1], n))
    x = x.astype(np.float32)
    fns = (lambda: dense_w @ x, lambda: spmm(sm, x))
    best = [math.inf, math.inf]
    for _ in range(rounds):
        for i, f in enumerate(fns):
            for _ in range(warmup):
                f()
            best[i] = min(best[i], per_call(f, min_time))
    return best[0], best[1]


def auto_pack(
    w, *, n_hint, mask=None, dtype=None, formats=FORMATS, verify=True
) -> AutoPacked:
    """Pack float weights (M, K) in the format expected to be fastest for
    ``W @ X`` with X of ``n_hint`` columns: dense (numpy float32 matmul) or one
    of ``formats``. Uses :func:`calibrate` (measured once per machine, cached).

    A sparse format must beat dense by ``DENSE_BIAS`` in the model; with
    ``verify`` (default) and a dense call estimated at <= ``VERIFY_MAX_S``, the
    choice is then timed against dense on these weights (interleaved, fastest
    of 5 rounds each) and dropped if it measures slower: a cost model cached
    while the machine was busy once picked a format 2.3x slower than dense.

    Returns an :class:`AutoPacked` with the weights, the choice, the reason and
    the estimates (and the measured seconds when timed).
    """
    v.check_array(w, "w", v.FLOAT_INPUT_TYPES, fix="auto_pack takes float weights")
    if w.ndim != 2:
        msg = f"w must be 2-D (M, K), got shape {w.shape}"
        raise ValueError(msg)
    if not isinstance(n_hint, numbers.Integral) or n_hint < 1:
        msg = f"n_hint must be an int >= 1 (columns of X per call), got {n_hint!r}"
        raise ValueError(msg)
    if dtype is not None and np.dtype(dtype) not in (
        np.dtype(np.float32),
        np.dtype(np.float16),
    ):
        msg = (
            f"dtype must be None, np.float32 or np.float16 (auto_pack compares float "
            f"kernels), got {dtype!r}; for int8 weights call from_dense(w, "
            f"dtype=np.int8) and qlinear_spmm"
        )
        raise TypeError(msg)
    M, K = w.shape
    if mask is None:
        mask = w != 0
    model = calibrate()
    est = {"dense": _estimate(model["dense"], n_hint, M * K * n_hint)}
    for f in (_normalize_format(f) for f in formats):
        if f == "csr":
            stored = int(mask.sum())
        elif f == "bsr4x1":
            pm = np.zeros((-(-M // 4) * 4, K), bool)
            pm[:M] = mask
            stored = 4 * int(pm.reshape(-(-M // 4), 4, K).any(1).sum())
        elif f == "bsr1x4":
            pm = np.zeros((M, -(-K // 4) * 4), bool)
            pm[:, :K] = mask
            stored = 4 * int(pm.reshape(M, -(-K // 4), 4).any(2).sum())
        else:
            pm = np.zeros((M, -(-K // 4) * 4), bool)
            pm[:, :K] = mask
            if pm.reshape(M, -(-K // 4), 4).sum(2).max(initial=0) > 2:
                continue
            stored = M * (-(-K // 4)) * 2
        est[f] = _estimate(model[f], n_hint, stored * n_hint)
    best = min((f for f in est if f != "dense"), key=est.get, default=None)
    d = est["dense"]
    density = float(mask.mean()) if mask.size else 0.0
    dense = np.where(mask, w, 0).astype(dtype or np.float32)
    if best is not None and est[best] <= DENSE_BIAS * d:
        sm = from_dense(w, mask, format=best, dtype=dtype)
        reason = (
            f"density {density:.3f}, n={n_hint}: {best} estimated "
            f"{est[best] * 1e6:.1f} us vs dense {d * 1e6:.1f} us "
            f"({d / est[best]:.2f}x, needs >= {1 / DENSE_BIAS:.2f}x)"
        )
        if not verify or d > VERIFY_MAX_S:
            return AutoPacked(sm, best, reason, est)
        td, ts = _measure_pair(dense.astype(np.float32, copy=False), sm, n_hint)
        got = {"dense": td, best: ts}
        timed = f"measured {ts * 1e6:.1f} us vs dense {td * 1e6:.1f} us"
        if ts <= td:
            return AutoPacked(sm, best, f"{reason}; {timed}", est, got)
        reason = f"{reason}, but {timed}: dense kept"
        return AutoPacked(dense, "dense", reason, est, got)
    if best is None:
        reason = "no sparse format applies"
    else:
        reason = (
            f"density {density:.3f}, n={n_hint}: best sparse ({best}) estimated "
            f"{est[best] * 1e6:.1f} us vs dense {d * 1e6:.1f} us, not "
            f"{1 / DENSE_BIAS:.2f}x faster"
        )
    return AutoPacked(dense, "dense", reason, est)
