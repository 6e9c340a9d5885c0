"""Compile every CUDA kernel for sm_80 and sm_90 without a GPU and assemble it.

numba.cuda.compile_ptx (libNVVM; numba-cuda also needs NVRTC: the
``nvidia-cuda-nvrtc==13.0.*`` wheel) -> ``ptxas -v`` of the same CUDA 13.0
toolkit. Prints registers / spills / stack / shared memory per kernel (run with
``-s`` to see the table) and fails on spills or local memory in the GEMM main
loop, on more than 48 KiB static shared memory, on a missing dp4a, and on a
contracted ``fma.rn.f64`` (it would change eq. 11's rounding). Skipped, with
the reason, where numba-cuda, NVRTC or ptxas is missing.
"""

import os
import re
import shutil
import subprocess
import sys

import pytest

CCS = [(8, 0), (9, 0)]
_RESULTS = []


def _ptxas():
    found = shutil.which("ptxas")
    if found:
        return found
    wheel = os.path.join(sys.prefix, "lib", f"python{sys.version_info[0]}."
                         f"{sys.version_info[1]}", "site-packages", "nvidia", "cu13",
                         "bin", "ptxas")  # fmt: skip
    return wheel if os.path.exists(wheel) else None


@pytest.fixture(scope="module")
def toolchain():
    try:
        from numba import cuda
    except ImportError as e:
        pytest.skip(f'numba-cuda not installed ({e}): pip install ".[cuda]"')
    if cuda.config.ENABLE_CUDASIM:
        pytest.skip("the simulator stubs the compiler (unset NUMBA_ENABLE_CUDASIM)")
    ptxas = _ptxas()
    if ptxas is None:
        pytest.skip("no CUDA toolkit: ptxas is not on PATH")
    try:
        from numba import types as t

        cuda.compile_ptx(lambda x: None, (t.int32[::1],), cc=(8, 0))
    except Exception as e:  # NVRTC / libNVVM missing or mismatched
        pytest.skip(f"numba-cuda cannot compile here ({type(e).__name__}: {e})")
    yield cuda, ptxas
    if _RESULTS:
        print("\nkernel                        cc    regs spill(st/ld) stack  smem")
        for r in _RESULTS:
            print("{:29s} {:5s} {:4d} {:5d}/{:<5d}    {:5d} {:5d}".format(*r))


def _assemble(toolchain, tmp_path, name, pyfunc, sig, cc, **kw):
    cuda, ptxas = toolchain
    ptx, _ = cuda.compile_ptx(pyfunc, sig, cc=cc, **kw)
    arch = f"sm_{cc[0]}{cc[1]}"
    src = tmp_path / f"{name}_{arch}.ptx"
    src.write_text(ptx)
    res = subprocess.run(
        [ptxas, f"-arch={arch}", "-v", "-o", str(src.with_suffix(".cubin")), str(src)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert res.returncode == 0, res.stderr
    info = res.stderr

    def num(pattern):
        m = re.search(pattern, info)
        return int(m.group(1)) if m else 0

    stats = {
        "regs": num(r"Used (\d+) registers"),
        "spill_st": num(r"(\d+) bytes spill stores"),
        "spill_ld": num(r"(\d+) bytes spill loads"),
        "stack": num(r"(\d+) bytes stack frame"),
        "smem": num(r"(\d+) bytes smem"),
    }
    _RESULTS.append(
        (name, f"{cc[0]}.{cc[1]}", stats["regs"], stats["spill_st"],
         stats["spill_ld"], stats["stack"], stats["smem"])
    )  # fmt: skip
    return ptx, stats


def _gemm_sig(a_t, b_t, out_t, layout):
    from numba import types as t

    arr2 = (lambda dt: dt[:, ::1]) if layout == "C" else (lambda dt: dt[:, :])
    i64 = t.int64[::1]
    return (
        arr2(a_t), arr2(b_t), t.int32, t.int32, i64, i64, i64, i64, i64,
        t.float64[:, ::1], t.float64, t.float64, t.float64, t.int32,
        out_t[:, ::1], t.int32[::1],
    )  # fmt: skip


@pytest.mark.parametrize("cc", CCS, ids=lambda cc: f"sm_{cc[0]}{cc[1]}")
@pytest.mark.parametrize(
    ("a_t", "b_t", "out_t", "layout"),
    [
        ("uint8", "int8", "uint8", "C"),
        ("int8", "uint8", "int32", "A"),
        ("uint8", "uint8", "float32", "C"),
    ],  # fmt: skip
)
def test_int8_gemm_compiles_without_spills(
    toolchain, tmp_path, cc, a_t, b_t, out_t, layout
):
    from numba import types as t

    from lowprec.kernels import config_cuda as cfg
    from lowprec.kernels import int8_gemm_cuda as kg

    kernel = kg.gemm_kernel(cfg.BLOCK_M, cfg.BLOCK_N, cfg.BLOCK_KW, cfg.THREADS_M,
                            cfg.THREADS_N, cfg.SMEM_PAD)  # fmt: skip
    sig = _gemm_sig(getattr(t, a_t), getattr(t, b_t), getattr(t, out_t), layout)
    name = f"gemm_{a_t}_{b_t}_{out_t}_{layout}"
    ptx, st = _assemble(
        toolchain, tmp_path, name, kernel.py_func, sig, cc,
        launch_bounds=cfg.THREADS_M * cfg.THREADS_N,
    )  # fmt: skip
    assert st["spill_st"] == 0, st
    assert st["spill_ld"] == 0, st
    assert st["smem"] <= 48 * 1024, st
    assert "dp4a.u32.s32" in ptx
    assert "fma.rn.f64" not in ptx  # eq. 11 multiplies and adds with two roundings
    # the multiply body (first to last dp4a) keeps the accumulators in
    # registers; the epilogue stores them to local memory once, after the loop
    body = ptx[ptx.index("dp4a") : ptx.rindex("dp4a")]
    assert ".local" not in body


@pytest.mark.parametrize("cc", CCS, ids=lambda cc: f"sm_{cc[0]}{cc[1]}")
def test_helper_kernels_compile(toolchain, tmp_path, cc):
    from numba import types as t

    from lowprec.kernels import int8_gemm_cuda as kg
    from lowprec.kernels import quantize_cuda as kq

    f3 = t.float32[:, :, ::1]
    i3 = t.int32[:, :, ::1]
    cases = [
        ("row_sums", kg.row_sums, (t.uint8[:, :], t.int32, t.int64[::1], t.int64[::1])),
        ("col_sums", kg.col_sums, (t.int8[:, :], t.int32, t.int64[::1])),
        ("quantize_f32_u8", kq.quantize_linear,
         (t.float32[::1], t.int64, t.int64, f3, i3, t.int64, t.boolean, t.float64,
          t.float64, t.uint8[::1])),
        ("quantize_f16_s8", kq.quantize_linear,
         (t.float16[::1], t.int64, t.int64, f3, i3, t.int64, t.boolean, t.float64,
          t.float64, t.int8[::1])),
        ("dequantize_s8_f32", kq.dequantize_linear,
         (t.int8[::1], t.int64, t.int64, f3, i3, t.int64, t.float32[::1])),
        ("dequantize_i32_f16", kq.dequantize_linear,
         (t.int32[::1], t.int64, t.int64, f3, i3, t.int64, t.float16[::1])),
    ]  # fmt: skip
    for name, kernel, sig in cases:
        ptx, st = _assemble(toolchain, tmp_path, name, kernel.py_func, sig, cc)
        assert st["spill_st"] == 0, (name, st)
        if name.startswith("quantize"):
            assert "div.rn.f32" in ptx  # IEEE division, as the CPU path (eq. 1)


def _no_local_in_loop(ptx, marker):
    """The main loop (first to last ``marker`` instruction) keeps its
    accumulators in registers: no local-memory traffic inside it."""
    assert marker in ptx, marker
    body = ptx[ptx.index(marker) : ptx.rindex(marker)]
    assert ".local" not in body
    assert "call" not in body.replace("call.uni", "")  # no helper calls either


def _geo_sig(x_t, chw):
    from numba import types as t

    del chw
    return x_t[:, :, :, ::1], t.boolean, t.int64[::1], t.int32, t.int32


@pytest.mark.parametrize("cc", CCS, ids=lambda cc: f"sm_{cc[0]}{cc[1]}")
@pytest.mark.parametrize(
    ("x_t", "out_t"), [("uint8", "uint8"), ("int8", "int32"), ("uint8", "float32")]
)
def test_int8_conv_compiles_without_spills(toolchain, tmp_path, cc, x_t, out_t):
    from numba import types as t

    from lowprec.kernels import config_cuda as cfg
    from lowprec.kernels import int8_conv_cuda as kc

    kernel = kc.conv_kernel(cfg.BLOCK_M, cfg.BLOCK_N, cfg.BLOCK_KW, cfg.THREADS_M,
                            cfg.THREADS_N, cfg.SMEM_PAD)  # fmt: skip
    i64 = t.int64[::1]
    sig = (
        *_geo_sig(getattr(t, x_t), True), t.int8[:, :, ::1], t.int64[:, ::1], i64,
        i64, i64, t.float64[:, ::1], t.float64, t.float64, t.float64, t.int32,
        getattr(t, out_t)[:, :, ::1],
    )  # fmt: skip
    ptx, st = _assemble(
        toolchain, tmp_path, f"conv_{x_t}_{out_t}", kernel.py_func, sig, cc,
        launch_bounds=cfg.THREADS_M * cfg.THREADS_N,
    )  # fmt: skip
    assert st["spill_st"] == 0, st
    assert st["spill_ld"] == 0, st
    assert st["smem"] <= 48 * 1024, st
    assert "fma.rn.f64" not in ptx
    _no_local_in_loop(ptx, "dp4a.u32.s32")
    dw = (*_geo_sig(getattr(t, x_t), True), t.int32[:, ::1], i64,
          t.float64[:, ::1], t.float64, t.float64, t.float64, t.int32,
          getattr(t, out_t)[:, :, ::1])  # fmt: skip
    _, st = _assemble(toolchain, tmp_path, f"depthwise_{x_t}_{out_t}",
                      kc.depthwise.py_func, dw, cc)  # fmt: skip
    assert st["spill_st"] == 0, st
    rs = (*_geo_sig(getattr(t, x_t), True), t.int64[:, ::1])
    _, st = _assemble(toolchain, tmp_path, f"patch_row_sums_{x_t}",
                      kc.patch_row_sums.py_func, rs, cc)  # fmt: skip
    assert st["spill_st"] == 0, st


@pytest.mark.parametrize("cc", CCS, ids=lambda cc: f"sm_{cc[0]}{cc[1]}")
@pytest.mark.parametrize("out_t", ["float32", "float16"])
def test_fp16_gemm_and_conv_compile_without_spills(toolchain, tmp_path, cc, out_t):
    from numba import types as t

    from lowprec.kernels import config_cuda as cfg
    from lowprec.kernels import fp16_gemm_cuda as kf

    tiles = (cfg.FP16_BLOCK_M, cfg.FP16_BLOCK_N, cfg.FP16_BLOCK_K,
             cfg.FP16_THREADS_M, cfg.FP16_THREADS_N, cfg.FP16_SMEM_PAD)  # fmt: skip
    o = getattr(t, out_t)
    epi = (t.float32[::1], t.boolean, t.float32, t.float32)
    cases = [
        ("fp16_gemm_" + out_t, kf.gemm_kernel(*tiles),
         (t.float16[:, :], t.float16[:, :], *epi, t.boolean, o[:, ::1])),
        ("fp16_conv_" + out_t, kf.conv_kernel(*tiles),
         (t.float16[:, :, :, ::1], t.float16[:, ::1], t.int64[::1], *epi,
          o[:, :, ::1])),
    ]  # fmt: skip
    for name, kernel, sig in cases:
        ptx, st = _assemble(
            toolchain, tmp_path, name, kernel.py_func, sig, cc,
            launch_bounds=cfg.FP16_THREADS_M * cfg.FP16_THREADS_N,
        )  # fmt: skip
        assert st["spill_st"] == 0, (name, st)
        assert st["spill_ld"] == 0, (name, st)
        assert st["smem"] <= 48 * 1024, st
        _no_local_in_loop(ptx, "fma.rn.f32")
        assert "cvt.f32.f16" in ptx  # native conversions, no half-arithmetic calls
        if out_t == "float16":
            assert "cvt.rn.f16.f32" in ptx  # one round-to-nearest-even


@pytest.mark.parametrize("cc", CCS, ids=lambda cc: f"sm_{cc[0]}{cc[1]}")
def test_sparse_kernels_compile(toolchain, tmp_path, cc):
    from numba import types as t

    from lowprec.kernels import config_cuda as cfg
    from lowprec.kernels import sparse_gemm_cuda as ks

    tiles = (cfg.SPMM_ROWS, cfg.SPMM_THREADS, cfg.SPMM_VN)
    csr = (t.int64[::1], t.int32[::1])
    cases = [
        ("spmm_f32", ks.spmm_float_kernel(*tiles),
         (*csr, t.float32[::1], t.float32[:, ::1], t.float32[::1], t.float32,
          t.float32, t.float32[:, ::1])),
        ("spmm_f16vals", ks.spmm_float_kernel(*tiles),
         (*csr, t.float16[::1], t.float32[:, ::1], t.float32[::1], t.float32,
          t.float32, t.float32[:, ::1])),
        ("spmm_s8_u8", ks.spmm_s8_kernel(*tiles),
         (*csr, t.int8[::1], t.int8[::1], t.uint8[:, ::1], t.int64, t.int64[::1],
          t.int64[::1], t.float64[::1], t.float64, t.float64, t.float64, t.int32,
          t.uint8[:, ::1])),
    ]  # fmt: skip
    for name, kernel, sig in cases:
        ptx, st = _assemble(toolchain, tmp_path, name, kernel.py_func, sig, cc,
                            launch_bounds=cfg.SPMM_THREADS)  # fmt: skip
        assert st["spill_st"] == 0, (name, st)
        assert st["spill_ld"] == 0, (name, st)
        assert "fma.rn.f64" not in ptx


@pytest.mark.parametrize("cc", CCS, ids=lambda cc: f"sm_{cc[0]}{cc[1]}")
@pytest.mark.parametrize("out_t", ["float32", "uint16"])
def test_bf16_gemm_compiles_without_spills(toolchain, tmp_path, cc, out_t):
    from numba import types as t

    from lowprec.kernels import bf16_gemm_cuda as kb
    from lowprec.kernels import config_cuda as cfg

    kernel = kb.gemm_kernel(cfg.FP16_BLOCK_M, cfg.FP16_BLOCK_N, cfg.FP16_BLOCK_K,
                            cfg.FP16_THREADS_M, cfg.FP16_THREADS_N,
                            cfg.FP16_SMEM_PAD)  # fmt: skip
    sig = (t.uint16[:, :], t.uint16[:, :], t.float32[::1], t.boolean, t.float32,
           t.float32, t.boolean, getattr(t, out_t)[:, ::1])  # fmt: skip
    ptx, st = _assemble(
        toolchain, tmp_path, f"bf16_gemm_{out_t}", kernel.py_func, sig, cc,
        launch_bounds=cfg.FP16_THREADS_M * cfg.FP16_THREADS_N,
    )  # fmt: skip
    assert st["spill_st"] == 0, st
    assert st["spill_ld"] == 0, st
    assert st["smem"] <= 48 * 1024, st
    _no_local_in_loop(ptx, "fma.rn.f32")
    # bfloat16 -> float32 is a shift of the bits (no conversion instruction);
    # the output rounding is integer code that keeps NaN payloads, not cvt
    assert "cvt.rn.bf16.f32" not in ptx
    assert "cvt.f32.bf16" not in ptx


@pytest.mark.parametrize("cc", CCS, ids=lambda cc: f"sm_{cc[0]}{cc[1]}")
def test_dynamic_quantize_kernels_compile(toolchain, tmp_path, cc):
    from numba import types as t

    from lowprec.kernels import config_cuda as cfg
    from lowprec.kernels import dynamic_quantize_cuda as kd

    f1 = t.float32[::1]
    cases = [
        ("dq_min_max", kd.min_max_kernel(cfg.THREADS_1D),
         (f1, f1, f1, f1, t.int32[::1])),
        ("dq_quantize_rows", kd.quantize_rows_kernel(cfg.THREADS_1D),
         (t.float32[:, :], t.uint8[:, ::1], f1, t.int64[::1], t.int32[::1])),
        ("dq_row_col_mult", kd.row_col_mult, (f1, f1, t.float64[:, ::1])),
        ("dq_add_bias", kd.add_bias, (t.float32[:, ::1], f1)),
    ]  # fmt: skip
    for name, kernel, sig in cases:
        ptx, st = _assemble(toolchain, tmp_path, name, kernel.py_func, sig, cc,
                            launch_bounds=cfg.THREADS_1D)  # fmt: skip
        assert st["spill_st"] == 0, (name, st)
        assert st["spill_ld"] == 0, (name, st)
        if name == "dq_quantize_rows":
            assert "div.rn.f32" in ptx  # IEEE divisions, as the CPU (eq. 3)
            assert "fma.rn.f64" not in ptx
        if name == "dq_add_bias":
            assert "add.rn.f32" in ptx or "add.f32" in ptx


@pytest.mark.parametrize("cc", CCS, ids=lambda cc: f"sm_{cc[0]}{cc[1]}")
@pytest.mark.parametrize(
    ("bits", "lut"), [(4, False), (4, True), (2, False), (8, False)]
)
def test_nbits_kernels_compile(toolchain, tmp_path, cc, bits, lut):
    from numba import types as t

    from lowprec.cuda_ops import NBITS_WARPS
    from lowprec.kernels import nbits_cuda as kn

    f2 = t.float32[:, ::1]
    b3 = t.uint8[:, :, ::1]
    fk = kn.nbits_float_kernel(bits, 32, lut, NBITS_WARPS)
    ik = kn.nbits_int8_kernel(bits, 32, lut, NBITS_WARPS)
    cases = [
        (f"nbits{bits}_f32{'_lut' if lut else ''}", fk,
         (f2, b3, f2, f2, f2, t.float32[::1], f2)),
        (f"nbits{bits}_i8{'_lut' if lut else ''}", ik,
         (t.int8[:, ::1], f2, f2, b3, f2, f2, t.int32[:, ::1], t.float32[::1], f2)),
        ("nbits_quantize_blocks", kn.quantize_blocks,
         (f2, t.int64, t.int8[:, ::1], f2, f2, t.int32[::1])),
    ]  # fmt: skip
    for name, kernel, sig in cases:
        ptx, st = _assemble(toolchain, tmp_path, name, kernel.py_func, sig, cc)
        assert st["spill_st"] == 0, (name, st)
        assert st["spill_ld"] == 0, (name, st)
        if "_i8" in name:
            # the block terms are multiplied and added with separate roundings
            # (the CPU kernels' bits): no contracted fma on the float path
            assert "mul.rn.f32" in ptx
            assert "fma.rn.f32" not in ptx
