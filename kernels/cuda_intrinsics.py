"""Device helpers numba-cuda lacks, each with a Python stand-in for the CUDA
simulator (``NUMBA_ENABLE_CUDASIM=1``), which cannot run inline PTX.

    dp4a(a, b, c)   c + sum_i u8(a)[i] * s8(b)[i]   (PTX dp4a.u32.s32)
    mul_rn(x, y)    x * y in float64, rounded once; never fused with a later add
    mul_rn32(x, y)  the same in float32
    rint(x)         round half to even (cvt.rni.f64.f64)
    f32_bits(x)     float32 -> its uint32 bit pattern (a register move)
    bits_f32(u)     uint32 bit pattern -> float32 (bfloat16 -> float32 is
                    bits_f32(u16 << 16), exact)

Why mul_rn: libNVVM contracts fmul + fadd into fma by default (its -fma=1; numba
only sets the option under fastmath). Measured: ``float64(acc) * mult + zy``
compiles to ``fma.rn.f64``, which rounds once where the CPU path (and ONNX's
reference) rounds twice, so eq. 11 would differ on rare near-ties. An inline-asm
``mul.rn.f64`` is opaque to NVVM and cannot be contracted.
"""

import numpy as np
from numba import cuda

SIM = bool(cuda.config.ENABLE_CUDASIM)

if SIM:

    def dp4a(a, b, c):
        # a: four uint8 in a uint32, b: four int8 in a uint32, c: int32
        a = int(a)
        b = int(b)
        s = int(c)
        for i in range(4):
            ua = (a >> (8 * i)) & 0xFF
            sb = (((b >> (8 * i)) & 0xFF) ^ 0x80) - 0x80
            s += ua * sb
        return np.int32(s)

    def mul_rn(x, y):
        return np.float64(x) * np.float64(y)

    def mul_rn32(x, y):
        return np.float32(np.float32(x) * np.float32(y))

    def rint(x):
        return np.rint(np.float64(x))

    def f32_bits(x):
        return np.float32(x).view(np.uint32)

    def bits_f32(u):
        return np.uint32(u).view(np.float32)

else:
    from llvmlite import ir
    from numba import types
    from numba.cuda import libdevice
    from numba.cuda.extending import intrinsic

    @intrinsic
    def dp4a(typingctx, a, b, c):
        sig = types.int32(types.uint32, types.uint32, types.int32)

        def codegen(context, builder, sig, args):
            i32 = ir.IntType(32)
            fnty = ir.FunctionType(i32, [i32, i32, i32])
            asm = ir.InlineAsm(fnty, "dp4a.u32.s32 $0, $1, $2, $3;", "=r,r,r,r")
            return builder.call(asm, args)

        return sig, codegen

    @intrinsic
    def mul_rn(typingctx, x, y):
        sig = types.float64(types.float64, types.float64)

        def codegen(context, builder, sig, args):
            f64 = ir.DoubleType()
            fnty = ir.FunctionType(f64, [f64, f64])
            asm = ir.InlineAsm(fnty, "mul.rn.f64 $0, $1, $2;", "=d,d,d")
            return builder.call(asm, args)

        return sig, codegen

    @intrinsic
    def mul_rn32(typingctx, x, y):
        sig = types.float32(types.float32, types.float32)

        def codegen(context, builder, sig, args):
            f32 = ir.FloatType()
            fnty = ir.FunctionType(f32, [f32, f32])
            asm = ir.InlineAsm(fnty, "mul.rn.f32 $0, $1, $2;", "=f,f,f")
            return builder.call(asm, args)

        return sig, codegen

    rint = libdevice.rint

    @intrinsic
    def f32_bits(typingctx, x):
        sig = types.uint32(types.float32)

        def codegen(context, builder, sig, args):
            return builder.bitcast(args[0], ir.IntType(32))

        return sig, codegen

    @intrinsic
    def bits_f32(typingctx, u):
        sig = types.float32(types.uint32)

        def codegen(context, builder, sig, args):
            return builder.bitcast(args[0], ir.FloatType())

        return sig, codegen
