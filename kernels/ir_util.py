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


def target_has(context, *features) -> bool:
    """Whether LLVM compiles for a CPU with every one of these features (LLVM
    names: "avx512vnni", "avxvnni"). An intrinsic whose instruction the target
    lacks aborts the process in LLVM's instruction selection ("Cannot select"),
    even in a branch that never runs on that CPU, so kernels that name such
    intrinsics check here and emit exact generic IR instead (seen on an AVX2
    Zen 3 host: every INT8 call aborted)."""
    have = set(context.codegen()._tm_features.split(","))
    return all(f"+{f}" in have for f in features)


def splat(builder, x, vty):
    """Scalar x -> the vector type vty (any lane count) with x in every lane."""
    undef = ir.Constant(vty, ir.Undefined)
    v = builder.insert_element(undef, x, ir.Constant(_i32, 0))
    mask = ir.Constant(ir.VectorType(_i32, vty.count), None)
    return builder.shuffle_vector(v, undef, mask)


def loop(builder, start, stop, init, body, *, step=1, guard=True, name="loop"):
    """A counted loop carrying SSA values: for i in range(start, stop, step),
    values = body(i, values). Returns the values after it (init when it runs
    no iteration). guard=False: the caller knows start < stop (no entry test).

    The carried values are phi nodes of the loop block, so a register tile's
    accumulators stay in registers; the latch carries no_unroll (unrolling a
    register-tile loop doubled its live vectors and spilled them).
    """
    fn = builder.function
    pre = builder.block
    head = fn.append_basic_block(f"{name}.body")
    after = fn.append_basic_block(f"{name}.after")
    if guard:
        builder.cbranch(builder.icmp_signed("<", start, stop), head, after)
    else:
        builder.branch(head)
    builder.position_at_end(head)
    i = builder.phi(start.type, f"{name}.i")
    i.add_incoming(start, pre)
    phis = []
    for v in init:
        p = builder.phi(v.type)
        p.add_incoming(v, pre)
        phis.append(p)
    new = list(body(i, phis))
    inext = builder.add(i, ir.Constant(start.type, step))
    end = builder.block
    i.add_incoming(inext, end)
    for p, n in zip(phis, new, strict=True):
        p.add_incoming(n, end)
    br = builder.cbranch(builder.icmp_signed("<", inext, stop), head, after)
    no_unroll(builder, br)
    builder.position_at_end(after)
    return new if not guard else _merge(builder, init, pre, new, end)


def if_then(builder, cond, values, then, *, name="if"):
    """values, replaced by then(values) where cond holds (phis after)."""
    fn = builder.function
    here = builder.block
    blk = fn.append_basic_block(f"{name}.then")
    done = fn.append_basic_block(f"{name}.done")
    builder.cbranch(cond, blk, done)
    builder.position_at_end(blk)
    new = list(then(values))
    end = builder.block
    builder.branch(done)
    builder.position_at_end(done)
    return _merge(builder, values, here, new, end)


def _merge(builder, a, a_block, b, b_block):
    """Phis at the current block: a[i] arriving from a_block, b[i] from b_block."""
    out = []
    for x, y in zip(a, b, strict=True):
        p = builder.phi(x.type)
        p.add_incoming(x, a_block)
        p.add_incoming(y, b_block)
        out.append(p)
    return out


def by_case(builder, sel, cases, emit, *, name="case"):
    """emit(c) on its own branch for each constant c in cases, taken where the
    run-time value sel (an integer of sel's type) equals c; values outside
    cases take the last case's branch (callers list tile widths widest first:
    the narrowest reads least). Nothing is returned: each branch ends with
    its own stores."""
    fn = builder.function
    join = fn.append_basic_block(f"{name}.join")
    blocks = [fn.append_basic_block(f"{name}.{c}") for c in cases]
    sw = builder.switch(sel, blocks[-1])
    for c, blk in zip(cases, blocks, strict=True):
        sw.add_case(ir.Constant(sel.type, c), blk)
        builder.position_at_end(blk)
        emit(c)
        builder.branch(join)
    builder.position_at_end(join)
