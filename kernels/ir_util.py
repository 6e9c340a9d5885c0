"""LLVM IR helpers shared by the llvmlite microkernels (int8 VNNI / ymm, half
precision, sparse, fp16 convolution)."""

from llvmlite import ir

_i32 = ir.IntType(32)
_lanes16 = ir.VectorType(_i32, 16)
_loop_counter = [0]


def no_unroll(builder, br):
    """Attach !llvm.loop !{self, !{"llvm.loop.unroll.disable"}} to the latch.

    Why: without it LLVM unrolls a register-tile loop by 2, needs 2 sets of the
    broadcast / B registers and spills accumulators to the stack (measured ~2x
    slower on the 6x4 VNNI tile). llvmlite has no 'distinct' MDValue, so the
    self-referential node is built by patching .operands (a unique string per
    loop keeps it out of the metadata cache).
    """
    mod = builder.module
    _loop_counter[0] += 1
    dis = mod.add_metadata([ir.MetaDataString(mod, "llvm.loop.unroll.disable")])
    tag = ir.MetaDataString(mod, f"lowprec.loop.{_loop_counter[0]}")
    loop_id = mod.add_metadata([tag, dis])
    loop_id.operands = (loop_id, dis)
    br.set_metadata("llvm.loop", loop_id)


def splat(builder, x, vty):
    """Scalar x -> the 16-lane vector type vty with x in every lane."""
    undef = ir.Constant(vty, ir.Undefined)
    v = builder.insert_element(undef, x, ir.Constant(_i32, 0))
    return builder.shuffle_vector(v, undef, ir.Constant(_lanes16, None))
