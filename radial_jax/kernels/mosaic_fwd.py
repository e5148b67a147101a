"""Block-sparse flash attention forward for Hopper, Pallas Mosaic GPU (TMA + wgmma).

FlashAttention-3 structure (as in jax's attention_mgpu example and tokamax's sm90 kernel) with
the key loop driven by the index tables: one CTA per (head, 128-token query block, batch), two
compute warpgroups of 64 query rows each and one memory warpgroup that TMA-loads the K/V
blocks listed for this query block into a ring of `num_stages` shared-memory slots. Empty
blocks are never loaded.

Ragged lengths are handled in the kernel: TMA zero-fills reads past the end and clips writes;
keys past seq_kv are masked in the one step that needs it (the ragged key block is the last
in every row's list, see tables.py); the lse output is padded to whole blocks and sliced. A
length that is not a multiple of 8 (TMA_SEQ_MULTIPLE) is zero-padded up to one first, since the
TMA cannot address it; Wan's lengths are multiples of 8 and take no copy.

MosaicTuning.overlap_qk pipelines each warpgroup's loop as FlashAttention-3's Hopper forward does
(the softmax of one step runs while the previous step's P V is on the tensor cores); the default
loop issues QK, waits, softmaxes, issues PV and waits. As first built it ran 0.60x the default on
the H200: ptxas serialized its wgmmas (C7513), most likely because P_{j+1}'s bf16 cast landed in
P_j's registers while P_j V_j was in flight. overlap_late_p casts after the wait (NOTES FWDOV2):
no longer serialized, but 0.89-0.94x the serial loop, until ncu showed the compute warpgroups
waiting for K: the memory warpgroup waited for both of a ring slot's K and V before loading either,
and the overlap releases V_j late. With K and V loaded apart (separate_kv_waits) the overlap runs
1.03-1.04x the serial loop. common.LAZY_MOSAIC_FWD (the default in sessions 10-15) adds late_pv_wait
(a never-taken branch that keeps ptxas's wait for P V below the softmax) and the lazy rescale (which
skips most warps' O multiplies after that wait): another 1.015-1.03x. The default since session 16
(common.GRID_MOSAIC_FWD) runs FA4's softmax order instead: the exact rescale, the row sum kept in
each thread (row_sum_in_thread) and the wait for P V after S's first 8 columns' exp2
(pv_wait_after_cols), 1.014-1.054x the lazy loop on the H200. MosaicTuning() keeps the serial loop.
The library's default since session 20 (common.DEFAULT_MOSAIC_FWD) runs that loop from 384 query
tiles on pairs of query tiles, a cluster of two CTAs that take their shared K/V blocks by multicast
(kv_multicast): at the 700 W cap the bytes saved buy a higher clock (1.01-1.04x the grid kernel).

MosaicTuning.persistent launches one CTA per SM instead, each walking work items (head, query block,
batch) in the normal launch's order: its memory warpgroup streams the next item's K/V into the same
ring (one running ring position, so slots and barrier phases carry across items), each compute
warpgroup loads the next item's Q into a second Q slot while it works on the current one, and O is
staged apart from Q, so one item's end overlaps the next one's start.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from radial_jax.kernels.common import (COMPUTE_WGS, DEFAULT_MOSAIC_FWD, GRID_MOSAIC_FWD, HOPPER_SMS, LN_2, LOG2_E,
                                       MASK_BLOCK, MosaicTuning, block_coords, block_grid, check_lazy_rescale_threshold,
                                       list_scheduled_walk, matched_pairs, persistent_items, seq_multiple,
                                       shared_first_pairs, unpad_seq, work_coords)
from radial_jax.kernels.tables import BlockTables

__all__ = ["MosaicTuning", "mosaic_forward", "supported"]


# MosaicTuning.ablate's stages (timing only): of the default's loop, and of kv_multicast's pairs
STAGE_ABLATIONS = ("softmax", "exp2", "rescale", "loads")
PAIR_ABLATIONS = ("multicast", "cluster")
ABLATIONS = STAGE_ABLATIONS + PAIR_ABLATIONS


def supported(q_dtype, head_dim: int, block_size: int) -> str | None:
    """Returns None if the Mosaic kernel can run this case, else the reason it cannot."""
    if block_size != MASK_BLOCK:
        return f"block_size={block_size} (the Mosaic kernel serves {MASK_BLOCK})"
    if jnp.dtype(q_dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return f"dtype {jnp.dtype(q_dtype)} (the Mosaic kernel takes bf16/f16)"
    if head_dim not in (64, 128):
        return f"head_dim={head_dim} (the Mosaic kernel takes 64 or 128)"
    return None


@functools.lru_cache(maxsize=16)
def _pair_lists(tables: BlockTables, matching: bool):
    """kv_multicast's (ids [2P, width], shared [P], pairs [P, 2] or None) for `tables` (see shared_first_pairs),
    read-only. Cached on the tables object (block_tables caches those): the pairing takes 0.1-0.3 s at Wan's
    long shapes, and every new trace of the forward (a jit, then its grad, ...) would redo it."""
    pairs = matched_pairs(tables.kv_ids, tables.kv_counts) if matching else None
    ids, shared = shared_first_pairs(tables.kv_ids, tables.kv_counts, tables.kv_full_counts, pairs)
    for a in (ids, shared) if pairs is None else (ids, shared, pairs):
        a.setflags(write=False)
    return ids, shared, pairs


def _sm_count() -> int:
    """The SM count of the GPU jax runs on, or HOPPER_SMS when tracing elsewhere (cross-lowering on a CPU)."""
    device = jax.devices()[0]
    return device.core_count if device.platform == "gpu" else HOPPER_SMS


def _warp_any_row_moved(m_old, m_new):
    """Inside inline_mgpu: an i1, true in every lane of a warp where any of the warp's 16 rows has
    m_new > m_old. m_old, m_new: [block_q] f32 FragmentedArrays in the WGMMA row layout (a thread holds
    2 of the 64 rows); each thread compares its own rows and the warp votes (vote.sync.any), so a
    branch on the result is warp-uniform: no divergence before the next wgmma."""
    import jax.experimental.mosaic.gpu as mgpu
    from jaxlib.mlir import ir
    from jaxlib.mlir.dialects import arith, nvvm, vector

    moved = None
    for old, new in zip(m_old.registers.flat, m_new.registers.flat):
        above = arith.cmpf(arith.CmpFPredicate.OGT, new, old)  # vector<1xi1>: this thread's row
        for i in range(ir.VectorType(above.type).shape[0]):
            bit = vector.extract(above, [], [i])
            moved = bit if moved is None else arith.ori(moved, bit)
    i32 = ir.IntegerType.get_signless(32)
    return nvvm.vote_sync(mgpu.utils.c(0xFFFFFFFF, i32), moved, nvvm.VoteSyncKind.any)


def _scaled_where_moved(moved, acc, alpha):
    """Inside inline_mgpu: acc * alpha in the warps where `moved` (_warp_any_row_moved) holds, acc
    untouched in the others, as one branch (scf.if) around the multiplies. acc, alpha: [block_q,
    head_dim] f32 FragmentedArrays in the WGMMA layout; alpha is exactly 1 on rows whose max stayed."""
    import jax.experimental.mosaic.gpu as mgpu
    from jaxlib.mlir import ir
    from jaxlib.mlir.dialects import scf

    registers = list(acc.registers.flat)
    branch = scf.IfOp(moved, [r.type for r in registers], has_else=True)
    with ir.InsertionPoint(branch.then_block):
        scf.yield_(list((acc * alpha).registers.flat))
    with ir.InsertionPoint(branch.else_block):
        scf.yield_(registers)
    results = np.empty(acc.registers.shape, dtype=object)
    for i, result in enumerate(branch.results):
        results.flat[i] = result
    return mgpu.FragmentedArray(_registers=results, _layout=acc.layout, _is_signed=None)


def _rescale_raised_warps(acc, alpha, m_old, m_new):
    """Returns acc * alpha, computed only by the warps holding a row whose max moved.

    acc, alpha: [block_q, head_dim] f32 in the WGMMA layout (alpha: the row factor broadcast along
    head_dim, exactly 1 on rows where m_new == m_old, broadcast by Pallas as in the exact path);
    m_old, m_new: [block_q] f32 in its row layout. A warp whose 16 rows all kept their max skips its
    64 multiplies per thread. Pallas has no per-thread scalar (lax.cond needs a warpgroup-wide
    reduction through shared memory and a barrier), hence inline Mosaic GPU.
    """
    import jax.experimental.pallas.mosaic_gpu as plgpu

    row = plgpu.Layout.WGMMA.reduce(1)

    @plgpu.inline_mgpu(arg_types=(plgpu.Layout.WGMMA, plgpu.Layout.WGMMA, row, row),
                       return_type=plgpu.ShapeDtypeStruct(acc.shape, jnp.float32, layout=plgpu.Layout.WGMMA))
    def rescale(_, acc, alpha, m_old, m_new):
        return _scaled_where_moved(_warp_any_row_moved(m_old, m_new), acc, alpha)

    return rescale(acc, alpha, m_old, m_new)


def _tree_row_reduce(x, op: str):
    """Returns x reduced along its columns ("max" or "add"), [rows] f32 in the WGMMA row layout.

    x: [rows, cols] f32 in the WGMMA layout, cols a power-of-two multiple of 8. Pallas's own
    reduction (FragmentedArray.reduce) folds a thread's registers of a row into one or two running
    values, a chain 8 to 16 deep (jax 0.11.2's accumulator ILP leaves 1 part for 2 rows a thread); here the
    column halves are combined instead (cols/2 + cols/4 + ... + 8 columns, log2(cols/8) dependent levels),
    and what is left, 8 columns, goes to FragmentedArray.reduce for the last in-thread pair and the
    shuffles across the row's 4 threads. The max is exact in any order, so its result is bitwise
    Pallas's; the sum rounds in another order.
    """
    import jax.experimental.pallas.mosaic_gpu as plgpu

    row = plgpu.Layout.WGMMA.reduce(1)

    @plgpu.inline_mgpu(arg_types=(plgpu.Layout.WGMMA,),
                       return_type=plgpu.ShapeDtypeStruct(x.shape[:1], jnp.float32, layout=row))
    def reduce(_, x):
        while x.shape[1] > 8:
            half = x.shape[1] // 2
            left, right = x[:, :half], x[:, half:]
            x = left.max(right) if op == "max" else left + right
        return x.reduce(op, 1)

    return reduce(x)


def _fold_columns(x, width: int = 8):
    """Returns x [rows, cols] f32 (WGMMA layout, cols a multiple of width) with its `width`-column tiles
    added in column order: [rows, width], each thread's own columns summed in the thread (no shuffles).
    Summed over its columns it is x's row sum, rounded in another order. Tile by tile rather than by
    halves: each add needs only the tiles before it, so ptxas can place it right after that tile's exp2
    (with pv_wait_after_cols=8 its SASS interleaves the adds with the exp2 and the casts; by halves,
    37 of the adds came after the last exp2)."""
    import jax.experimental.pallas.mosaic_gpu as plgpu

    @plgpu.inline_mgpu(arg_types=(plgpu.Layout.WGMMA,),
                       return_type=plgpu.ShapeDtypeStruct((x.shape[0], width), jnp.float32,
                                                          layout=plgpu.Layout.WGMMA))
    def fold(_, x):
        total = x[:, :width]
        for start in range(width, x.shape[1], width):
            total = total + x[:, start:start + width]
        return total

    return fold(x)


# Named barriers 0 (gpu.barrier) and 1-3 (Mosaic's per-warpgroup bar.sync) are taken; the turn uses 4 + wg.
_TURN_BARRIER = 4


def _named_turn(op: str, other: bool):
    """bar.sync ("take") or bar.arrive ("pass") on the turn barrier of this warpgroup or (other) of the
    other compute warpgroup, 256 threads: FA3's and FA4's warp scheduler barrier. A warpgroup takes its
    turn by syncing on its own barrier, which completes when the other warpgroup has passed it there.
    A single instruction (ptxas: BAR.SYNC / BAR.ARV), where an mbarrier wait is a try_wait loop."""
    import jax.experimental.mosaic.gpu as mgpu
    import jax.experimental.pallas.mosaic_gpu as plgpu
    from jaxlib.mlir import ir
    from jaxlib.mlir.dialects import arith, llvm

    @plgpu.inline_mgpu()
    def turn(_):
        i32 = ir.IntegerType.get_signless(32)
        wg = arith.shrui(mgpu.utils.thread_idx(), mgpu.utils.c(7, i32))  # 0 or 1 in a compute warpgroup
        if other:
            wg = arith.xori(wg, mgpu.utils.c(1, i32))
        barrier = arith.addi(wg, mgpu.utils.c(_TURN_BARRIER, i32))
        instruction = {"take": "bar.sync", "pass": "bar.arrive"}[op]
        llvm.inline_asm(ir.Type.parse("!llvm.void"), [barrier], f"{instruction} $0, 256;", "r", has_side_effects=True)

    turn()


def _never_taken_branch(pinned=None):
    """Inside inline_mgpu: a branch on the thread index that is never taken (tid.x >= 4096) around a
    nanosleep, neither of which LLVM or ptxas can remove (the index comes from an asm, the sleep has
    side effects). pinned: None, or a FragmentedArray of f32 that the branch's condition also reads
    (its minimum below -1, never true for exp2's results), so ptxas computes it before the branch."""
    import jax.experimental.mosaic.gpu as mgpu
    from jaxlib.mlir import ir
    from jaxlib.mlir.dialects import arith, llvm, vector

    i32 = ir.IntegerType.get_signless(32)
    tid = llvm.inline_asm(i32, [], "mov.u32 $0, %tid.x;", "=r", has_side_effects=True)
    taken = arith.cmpi(arith.CmpIPredicate.uge, tid, mgpu.utils.c(4096, i32))
    if pinned is not None:
        low = None
        for register in pinned.registers.flat:
            for i in range(ir.VectorType(register.type).shape[0]):
                value = vector.extract(register, [], [i])
                low = value if low is None else arith.minimumf(low, value)
        f32 = ir.F32Type.get()
        below = arith.cmpf(arith.CmpFPredicate.OLT, low, arith.constant(f32, ir.FloatAttr.get(f32, -1.0)))
        taken = arith.andi(taken, below)
    with mgpu.utils.when(taken):
        llvm.inline_asm(ir.Type.parse("!llvm.void"), [], "nanosleep.u32 0;", "", has_side_effects=True)


def _convergence_point():
    """_never_taken_branch as a Pallas statement. After a branch that may diverge, ptxas keeps a later
    wgmma wait down at the first use of what it waits for instead of hoisting it to the first write of
    the softmax (MosaicTuning.late_pv_wait; its row sums' shuffles removed from the PTX, the wait stays
    as low: benchmarks/NOTES.md, session 10)."""
    import jax.experimental.pallas.mosaic_gpu as plgpu

    @plgpu.inline_mgpu()
    def point(_):
        _never_taken_branch()

    point()


def _exp2_around_pv_wait(x, acc, alpha, head_cols: int, maxima=None, exp2: bool = True):
    """Returns (2^x, acc * alpha) with the warpgroup's wait for its last wgmma (P_j V_j) between the
    exp2 of x's first head_cols columns and the rest, the multiplies after it (MosaicTuning.pv_wait_after_cols).

    x: [rows, cols] f32 in the WGMMA layout (scores less their row max, log2 units); acc: O [rows,
    head_dim] f32 as the P V wgmma in flight leaves it (read without a wait); alpha: O's row factor
    broadcast to acc's shape. The head's exp2 pass an optimization barrier before the wait and acc one
    after it (both side-effecting asm, so LLVM keeps them in that order around the wait and reads O
    only after it); the rest follows in program order, where ptxas 13.0 (after late_pv_wait's branch)
    keeps it and interleaves the multiplies with the remaining exp2. Same operations as jnp.exp2 (ex2.approx)
    and acc * alpha. maxima: None, or the lazy rescale's (m_old, m_new) [rows] in the row layout: after
    the wait the warp votes and multiplies only where one of its rows' max moved (_rescale_raised_warps's
    rule), the remaining exp2 after that branch. head_cols may be 0: the wait before any of x's exp2.
    alpha None: acc is returned as it is after the wait, unscaled (MosaicTuning.carry_items: a finished
    item's O, to be normalised). exp2=False returns x itself for 2^x (MosaicTuning.ablate="exp2", timing only).
    """
    import jax.experimental.mosaic.gpu as mgpu
    import jax.experimental.pallas.mosaic_gpu as plgpu
    from jax.experimental.mosaic.gpu import fragmented_array as fa
    from jaxlib.mlir.dialects import nvvm

    wgmma = plgpu.Layout.WGMMA
    types = (plgpu.ShapeDtypeStruct(x.shape, jnp.float32, layout=wgmma),
             plgpu.ShapeDtypeStruct(acc.shape, jnp.float32, layout=wgmma))
    rows = () if maxima is None else (wgmma.reduce(1),) * 2
    factor = () if alpha is None else (wgmma,)

    power = (lambda t: t.exp2(approx=True)) if exp2 else (lambda t: t)

    @plgpu.inline_mgpu(arg_types=(wgmma, wgmma) + factor + rows, return_type=types)
    def around(_, x, acc, *factor_and_maxima):
        alpha, maxima = (None, ()) if not factor else (factor_and_maxima[0], factor_and_maxima[1:])
        tail = x[:, head_cols:]  # views: the same register objects as x's
        parts = []  # (part of x, its 2^x)
        if head_cols:
            head = x[:, :head_cols]
            parts.append((head, fa.optimization_barrier(power(head))))  # computed before the wait
            if maxima:  # O's first use sits in the lazy branch: without this, ptxas waits before the exp2
                _never_taken_branch(parts[0][1])
        nvvm.wgmma_wait_group_sync_aligned(0)
        moved = _warp_any_row_moved(*maxima) if maxima else None
        acc = fa.optimization_barrier(acc)  # O read after the wait
        if alpha is None:
            scaled = acc
        else:
            scaled = acc * alpha if moved is None else _scaled_where_moved(moved, acc, alpha)
        parts.append((tail, power(tail)))
        computed = {}  # id(register of x) -> its 2^x
        for part, values in parts:
            computed.update(zip(map(id, part.registers.flat), values.registers.flat))
        registers = np.empty(x.registers.shape, dtype=object)
        for index, r in np.ndenumerate(x.registers):
            registers[index] = computed[id(r)]
        return mgpu.FragmentedArray(_registers=registers, _layout=x.layout, _is_signed=None), scaled

    assert alpha is not None or maxima is None, "the lazy rule's vote needs O's factor"
    return around(x, acc, *(() if alpha is None else (alpha,)), *(() if maxima is None else maxima))


# 2^f on [-1/2, 1/2], degree 3, fitted for relative error (Lawson-weighted least squares on Chebyshev
# nodes): at most 7.5e-5 off, below bf16's 2^-9 rounding of P.
_EXP2_POLY = (0.9999280735783096, 0.6932609862225378, 0.24261112187715136, 0.05517166493030209)
# x + 1.5 * 2^23 rounds x to an integer j held in the low mantissa bits (exact for |x| < 2^22).
_ROUND_MAGIC = 12582912.0


def _exp2_with_polynomial_tiles(x, every: int):
    """Returns 2^x, every `every`-th 8-column tile of x computed on the FMA pipe, the rest by ex2.approx.

    x: [rows, cols] f32 in the WGMMA layout, every entry <= 0 (scores less their row max) or -inf.
    The multi-function unit computes 4 exp2 a cycle per SM sub-partition, a warp's in 8 cycles, and
    the softmax's 64 a thread a key block are its longest stretch (ncu, benchmarks/NOTES.md session 8).
    FlashAttention-4 moves part of them to the FMA pipe on Blackwell; here as a polynomial in FADD/FFMA
    and one shift-add: j = round(x) by the magic-number add, f = x - j in [-1/2, 1/2], 2^f by
    _EXP2_POLY, and j added to the exponent field. x is clamped to -126 first, so j's shift cannot
    leave the exponent field; below that ex2.approx.ftz gives 0 where this gives 2^-126 (a polynomial
    tile of a masked key block would hold 2^-126, not 0: callers keep masked blocks on ex2.approx).
    """
    import jax.experimental.mosaic.gpu as mgpu
    import jax.experimental.pallas.mosaic_gpu as plgpu
    from jaxlib.mlir import ir
    from jaxlib.mlir.dialects import arith
    from jaxlib.mlir.dialects import math as mlir_math

    def poly(r):  # r: one register, a vector of f32
        f32, i32 = ir.F32Type.get(), ir.IntegerType.get_signless(32)
        ints = ir.VectorType.get(ir.VectorType(r.type).shape, i32)
        splat = lambda value, element, vec: arith.constant(vec, ir.DenseElementsAttr.get_splat(
            vec, ir.FloatAttr.get(element, value) if element == f32 else ir.IntegerAttr.get(element, value)))
        const = lambda value: splat(value, f32, r.type)
        x = arith.maximumf(r, const(-126.0))
        shifted = arith.addf(x, const(_ROUND_MAGIC))
        frac = arith.subf(x, arith.subf(shifted, const(_ROUND_MAGIC)))
        p = const(_EXP2_POLY[3])
        for c in reversed(_EXP2_POLY[:3]):
            p = mlir_math.fma(p, frac, const(c))
        exponent = arith.shli(arith.bitcast(ints, shifted), splat(23, i32, ints))  # j's low bits, into the exponent
        return arith.bitcast(r.type, arith.addi(arith.bitcast(ints, p), exponent))

    @plgpu.inline_mgpu(arg_types=(plgpu.Layout.WGMMA,),
                       return_type=plgpu.ShapeDtypeStruct(x.shape, jnp.float32, layout=plgpu.Layout.WGMMA))
    def exp2(_, x):
        computed = {}  # id(register of x) -> its 2^x
        for tile in range(x.shape[1] // 8):
            part = x[:, tile * 8:(tile + 1) * 8]  # a view: the same register objects as x's
            if tile % every == every - 1:
                values = [poly(r) for r in part.registers.flat]
            else:
                values = list(part.exp2(approx=True).registers.flat)
            computed.update(zip(map(id, part.registers.flat), values))
        registers = np.empty(x.registers.shape, dtype=object)
        for index, r in np.ndenumerate(x.registers):
            registers[index] = computed[id(r)]
        return mgpu.FragmentedArray(_registers=registers, _layout=x.layout, _is_signed=None)

    return exp2(x)


@functools.partial(jax.jit, static_argnames=("tables", "scale", "tuning"))
def mosaic_forward(q, k, v, *, tables: BlockTables, scale: float, tuning: MosaicTuning = DEFAULT_MOSAIC_FWD):
    """Returns (out [B, L, N, D] in q.dtype, lse [B, N, L] float32, natural log).

    q: [batch, seq_q, heads, head_dim]; k, v: [batch, seq_kv, heads, head_dim], bf16 or f16.
    """
    import jax.experimental.pallas as pl
    import jax.experimental.pallas.mosaic_gpu as plgpu

    batch, q_len, heads, head_dim = q.shape
    kv_len = k.shape[1]
    assert (q_len, kv_len) == (tables.q_len, tables.kv_len), "tables built for other lengths"
    q, k, v = seq_multiple(q), seq_multiple(k), seq_multiple(v)
    dtype = q.dtype
    block_q, block_kv, stages = tuning.block_q, tuning.block_kv, tuning.num_stages
    assert COMPUTE_WGS * block_q == MASK_BLOCK == block_kv == tables.block_size
    num_q_tiles = tables.num_q_blocks
    if tuning.pairs_from_q_tiles and not (tuning.kv_multicast and tuning.pairs_from_q_tiles > 0):
        raise ValueError(f"pairs_from_q_tiles={tuning.pairs_from_q_tiles} is where kv_multicast's pairs start: set "
                         "kv_multicast and a tile count > 0, or start from GRID_MOSAIC_FWD (the grid kernel)")
    qk_scale = scale * LOG2_E
    lazy_threshold = tuning.lazy_rescale_threshold
    late_p, early_rescale, p_smem = tuning.overlap_late_p, tuning.overlap_early_rescale, tuning.overlap_p_smem
    if (late_p or early_rescale or p_smem) and not tuning.overlap_qk:
        raise ValueError("overlap_late_p, overlap_early_rescale and overlap_p_smem reorder the overlapped loop: "
                         "set overlap_qk=True too")  # fmt: skip
    if p_smem and not late_p:
        raise ValueError("overlap_p_smem writes P after P V's wait (else it overwrites the tile in flight): "
                         "set overlap_late_p=True too")  # fmt: skip
    overlap_softmax = tuning.overlap_softmax
    if not overlap_softmax and (late_p or p_smem or not tuning.overlap_qk):
        raise ValueError("overlap_softmax=False waits for P V before the softmax, which the late cast and the "
                         "SMEM P exist to protect: set overlap_qk=True, without overlap_late_p/overlap_p_smem")
    check_lazy_rescale_threshold(lazy_threshold)

    grid, grid_names = block_grid(heads, num_q_tiles, batch, "q_seq", tuning.grid_heads)
    persistent, total = tuning.persistent, heads * num_q_tiles * batch
    if persistent and p_smem:
        raise ValueError("persistent=True has no SMEM tile for P (its SMEM holds two Q slots and O's staging): "
                         "set overlap_p_smem=False")
    if tuning.persistent_ctas is not None and not (persistent and tuning.persistent_ctas >= 1):
        raise ValueError(f"persistent_ctas={tuning.persistent_ctas} needs persistent=True and at least 1 CTA")
    if tuning.overlap_waits_first and not tuning.overlap_qk:
        raise ValueError("overlap_waits_first reorders the overlapped loop's waits: set overlap_qk")
    if tuning.late_pv_wait and not (tuning.overlap_qk and overlap_softmax):
        raise ValueError("late_pv_wait keeps the overlapped loop's wait for P V after its softmax: set overlap_qk "
                         "(with overlap_softmax)")
    head_cols = tuning.pv_wait_after_cols
    if head_cols is not None and not (tuning.late_pv_wait and late_p and not early_rescale
                                      and tuning.exp2_poly_every is None):
        raise ValueError("pv_wait_after_cols places late_pv_wait's wait for P V and O's rescale between the "
                         "exp2: set late_pv_wait and overlap_late_p, without overlap_early_rescale or "
                         "exp2_poly_every")  # fmt: skip
    if head_cols is not None and not (head_cols % 8 == 0 and 0 <= head_cols < block_kv):
        raise ValueError(f"pv_wait_after_cols={head_cols}: a multiple of 8 from 0 to below block_kv={block_kv}")
    if tuning.producer_warp and persistent:
        raise ValueError("producer_warp runs the K/V loads of one work item on one warp; the persistent kernel's "
                         "memory warpgroup also loads the next items' Q: set one of them")  # fmt: skip
    if tuning.named_turn and not tuning.overlap_qk:
        raise ValueError("named_turn passes the overlapped loop's turn token; the default loop's rendezvous "
                         "(arrive, then wait for the other's arrival) has no named-barrier form: set overlap_qk")
    if tuning.exp2_poly_every is not None and not tuning.exp2_poly_every >= 1:
        raise ValueError(f"exp2_poly_every={tuning.exp2_poly_every}: None, or k >= 1 (every k-th 8-key tile)")
    # pv_wait_after_cols (checked above) implies the overlapped loop with late_pv_wait, the late P cast and
    # no early rescale.
    if tuning.carry_items and not (persistent and head_cols is not None and tuning.overlap_waits_first
                                   and lazy_threshold is None):
        raise ValueError("carry_items runs GRID_MOSAIC_FWD's loop across the persistent kernel's items: set "
                         "persistent=True on GRID_MOSAIC_FWD (the exact rescale, pv_wait_after_cols)")
    if tuning.walk_item_cost is not None and not (persistent and tuning.walk_item_cost > 0):
        # F > 0 makes every item's cost positive, so the first CTAs' worth of items go one to each CTA and no
        # CTA is left without an item (the kernels load their first item's Q unconditionally).
        raise ValueError(f"walk_item_cost={tuning.walk_item_cost} deals the persistent kernel's items: set "
                         "persistent=True and a cost > 0 (key steps an item adds to its blocks)")
    if tuning.ablate in PAIR_ABLATIONS and not (tuning.kv_multicast and not tuning.pairs_from_q_tiles):
        raise ValueError(f"ablate={tuning.ablate!r} (timing only) takes kv_multicast's pairs apart: set kv_multicast, "
                         "with pairs_from_q_tiles=0 (pairs at every length)")
    if tuning.ablate in STAGE_ABLATIONS and tuning.kv_multicast:
        raise ValueError(f"ablate={tuning.ablate!r} (timing only) drops a stage of the grid kernel's loop: set it on "
                         "GRID_MOSAIC_FWD (DEFAULT_MOSAIC_FWD runs kv_multicast's pairs from 384 query tiles)")
    if tuning.ablate is not None and not (tuning.ablate in ABLATIONS and head_cols is not None
                                          and lazy_threshold is None and not persistent):
        raise ValueError(f"ablate={tuning.ablate!r} (timing only) drops one of {', '.join(ABLATIONS)} from the grid "
                         "kernel's GRID_MOSAIC_FWD loop: set it on GRID_MOSAIC_FWD, not persistent")
    multicast = tuning.kv_multicast
    if multicast and not (tuning.overlap_qk and tuning.separate_kv_waits and stages in (2, 3) and not persistent
                          and not early_rescale
                          and not tuning.producer_warp and tuning.grid_heads is None and not p_smem):
        raise ValueError("kv_multicast runs pairs of query tiles on the grid kernel's overlapped loop with its K and V "
                         "waits apart: set it on GRID_MOSAIC_FWD (num_stages 2 or 3, not persistent, producer_warp, "
                         "grid_heads, overlap_p_smem or overlap_early_rescale); DEFAULT_MOSAIC_FWD sets it, so start "
                         "other designs from GRID_MOSAIC_FWD (or set kv_multicast, pair_matching and "
                         "pairs_from_q_tiles off)")
    if tuning.pair_matching and not (multicast and tuning.ablate != "cluster"):
        raise ValueError("pair_matching chooses kv_multicast's pairs: set kv_multicast (not ablate='cluster')")
    # Checked above on the tuning as given, so that a design is refused at every length or at none.
    if multicast and num_q_tiles < tuning.pairs_from_q_tiles:  # too few tiles for pairs: the grid kernel
        tuning = dataclasses.replace(tuning, kv_multicast=False, pair_matching=False, pairs_from_q_tiles=0)
        multicast = False
    num_ctas = min(tuning.persistent_ctas or _sm_count(), total) if persistent else None
    if persistent:
        grid, grid_names = (num_ctas,), ("cta",)
    kv_ids = jnp.asarray(tables.kv_ids)
    counts = jnp.stack([jnp.asarray(tables.kv_counts), jnp.asarray(tables.kv_full_counts)], axis=1)
    inputs = (q, k, v, kv_ids, counts)
    if multicast:  # the grid runs pairs of query tiles (an odd last tile with an empty one: count 0)
        ids, shared, pairs = _pair_lists(tables, tuning.pair_matching)
        if tuning.ablate == "cluster":  # the grid kernel's order
            ids = np.pad(tables.kv_ids, ((0, len(ids) - num_q_tiles), (0, 0)))
        grid = (heads, len(shared), batch)
        counts = jnp.pad(counts, ((0, len(ids) - num_q_tiles), (0, 0)))
        inputs = (q, k, v, jnp.asarray(ids), counts, jnp.asarray(shared))
        if pairs is not None:  # the pairs' tiles, a table the kernel reads its tile from
            inputs += (jnp.asarray(pairs),)
    if persistent and tuning.walk_item_cost is not None:  # the items' costs in launch order, off the tables
        q_tiles = work_coords(np.arange(total), heads, num_q_tiles, batch, tuning.grid_heads)[2]
        walk = list_scheduled_walk(tables.kv_counts[q_tiles] + tuning.walk_item_cost, num_ctas)
        inputs += (jnp.asarray(walk),)

    row = plgpu.Layout.WGMMA.reduce(1)

    def fresh_row_state():
        """Returns (m, l) before a row's first key block: m = -inf [block_q] (row layout, log2 units) and
        l = 0, [block_q] in the row layout or (row_sum_in_thread) each thread's partial sums [block_q, 8]."""
        m_i = plgpu.layout_cast(jnp.full((block_q,), -jnp.inf, jnp.float32), row)
        if tuning.row_sum_in_thread:
            return m_i, plgpu.layout_cast(jnp.full((block_q, 8), 0.0, jnp.float32), plgpu.Layout.WGMMA)
        return m_i, plgpu.layout_cast(jnp.full((block_q,), 0.0, jnp.float32), row)

    def row_max(s):  # [block_q, block_kv] f32 -> [block_q]
        return _tree_row_reduce(s, "max") if tuning.tree_reduce else s.max(axis=1)

    def add_row_sum(l_i, alpha, p):
        """Returns l_i * alpha + p's row sum: l_i and the result as fresh_row_state's l, alpha [block_q]."""
        if tuning.row_sum_in_thread:
            return l_i * lax.broadcast_in_dim(alpha, l_i.shape, [0]) + _fold_columns(p)
        return l_i * alpha + (_tree_row_reduce(p, "add") if tuning.tree_reduce else p.sum(axis=1))

    def total_row_sum(l_i):  # l as above -> [block_q], the row layout
        return l_i.sum(axis=1) if tuning.row_sum_in_thread else l_i

    def shifted_block_scores(s, m_i, ids_ref, q_tile, step, *, mask_tail):
        """Returns (x, m_new, alpha) of the scores s [block_q, block_kv] f32 of key block `step` of query
        tile q_tile's list (ids_ref: the kernel's index table): p = 2^x."""
        if mask_tail:
            kv_start = ids_ref[q_tile, step] * block_kv
            cols = plgpu.broadcasted_iota(jnp.int32, (block_q, block_kv), 1, layout=plgpu.Layout.WGMMA)
            s = jnp.where(kv_start + cols < kv_len, s, -jnp.inf)
        # m_i is kept in log2 units (scaled logits) so that p is one FMA + exp2.
        if lazy_threshold is None:
            m_new = jnp.maximum(m_i, row_max(s) * qk_scale)
            alpha = jnp.exp2(m_i - m_new)
        else:  # the max moves only past the threshold; alpha is exactly 1 where it stays
            raw_max = row_max(s) * qk_scale
            raised = raw_max > m_i + lazy_threshold
            m_new = jnp.where(raised, raw_max, m_i)
            alpha = jnp.where(raised, jnp.exp2(m_i - m_new), 1.0)
        return s * qk_scale - lax.broadcast_in_dim(m_new, s.shape, [0]), m_new, alpha

    def rescale(acc, alpha, m_i, m_new):
        if lazy_threshold is None:
            return acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
        return _rescale_raised_warps(acc, lax.broadcast_in_dim(alpha, acc.shape, [0]), m_i, m_new)

    def take_turn(wg, schedule_barrier):  # the overlapped loops' ping-pong: wait for this warpgroup's turn
        if tuning.pingpong and tuning.named_turn:
            _named_turn("take", other=False)
        elif tuning.pingpong:
            plgpu.barrier_wait(schedule_barrier.at[wg])

    def pass_turn(wg, schedule_barrier):  # ... and hand it to the other compute warpgroup
        if tuning.pingpong and tuning.named_turn:
            _named_turn("pass", other=True)
        elif tuning.pingpong:
            plgpu.barrier_arrive(schedule_barrier.at[COMPUTE_WGS - 1 - wg])

    def hand_over_first_turn(wg, schedule_barrier):
        """The overlapped loop's ping-pong: warpgroup 1 passes the turn once, so that warpgroup 0 takes
        the first. Every phase after it takes the turn and passes it back, the same number in both
        warpgroups (they walk the same key blocks), so one pass at the start of a CTA serves all the
        work items the persistent kernel walks; the last pass of the last item is left unclaimed."""
        if tuning.pingpong and tuning.named_turn:
            pl.when(wg == 1)(lambda: _named_turn("pass", other=True))
        elif tuning.pingpong:
            pl.when(wg == 1)(lambda: plgpu.barrier_arrive(schedule_barrier.at[0]))

    def attend(refs, qo_smem, wg, q_tile, count, full_count, base=None):
        """Returns (acc [block_q, head_dim] f32, unnormalised; m_i, l_i [block_q] f32, m_i in log2 units)
        of this compute warpgroup's rows (Q in qo_smem, landed) against query tile q_tile's `count` key
        blocks, the last `count - full_count` masked, as the memory warpgroup streams them into the ring.

        refs: (ids_ref, k_smem, v_smem, k_barriers, v_barriers, k_consumed, v_consumed, schedule_barrier,
        p_smem2), the kernel's. base: None, or (persistent kernel) the ring position of the tile's first
        block, int32: the blocks of earlier items went through the ring before it, so step s's slot is
        (base + s) % stages and every barrier phase carries on from the previous item.
        """
        ids_ref, k_smem, v_smem, k_barriers, v_barriers, k_consumed, v_consumed, schedule_barrier, p_smem2 = refs
        pingpong = tuning.pingpong

        def ring_slot(step):
            return lax.rem(step if base is None else base + step, jnp.int32(stages))

        def schedule():
            plgpu.barrier_arrive(schedule_barrier)
            plgpu.barrier_wait(schedule_barrier)

        m_i, l_i = fresh_row_state()
        acc = plgpu.layout_cast(jnp.full((block_q, head_dim), 0.0, jnp.float32), plgpu.Layout.WGMMA)

        def shifted_scores(s, m_i, step, *, mask_tail):
            return shifted_block_scores(s, m_i, ids_ref, q_tile, step, mask_tail=mask_tail)

        def softmax_scores(s, m_i, step, *, mask_tail):
            """Returns (p, m_new, alpha) of one key block's scores s [block_q, block_kv] f32."""
            x, m_new, alpha = shifted_scores(s, m_i, step, mask_tail=mask_tail)
            if tuning.exp2_poly_every is None or mask_tail:  # masked entries must give exactly 0
                p = jnp.exp2(x)
            else:
                p = _exp2_with_polynomial_tiles(x, tuning.exp2_poly_every)
            return p, m_new, alpha

        def kv_step(step, carry, *, mask_tail):
            acc, m_i, l_i = carry
            slot = ring_slot(step)

            def compute_qk(acc_ref):
                plgpu.wgmma(acc_ref, qo_smem, k_smem.at[slot].transpose((1, 0)))
                if pingpong:
                    schedule()
                return acc_ref[...]

            s = pl.run_scoped(compute_qk, plgpu.ACC((block_q, block_kv), jnp.float32))
            plgpu.barrier_arrive(k_consumed.at[slot])
            p, m_new, alpha = softmax_scores(s, m_i, step, mask_tail=mask_tail)
            acc = rescale(acc, alpha, m_i, m_new)
            l_i = add_row_sum(l_i, alpha, p)
            p16 = p.astype(dtype)
            # Ordering found by the jax example to matter for speed on H100.
            acc, l_i, m_new, p16 = lax.optimization_barrier((acc, l_i, m_new, p16))
            if pingpong:
                plgpu.barrier_arrive(schedule_barrier)
            plgpu.barrier_wait(v_barriers.at[slot])
            if pingpong:
                plgpu.barrier_wait(schedule_barrier)

            def compute_pv(acc_ref):
                plgpu.wgmma(acc_ref, p16, v_smem.at[slot])
                next_slot = ring_slot(step + 1)

                @pl.when(step + 1 < count)
                def _():
                    plgpu.barrier_wait(k_barriers.at[next_slot])

            acc = pl.run_state(compute_pv)(plgpu.ACC.init(acc))
            plgpu.barrier_arrive(v_consumed.at[slot])
            return acc, m_new, l_i

        def overlapped_loop(o_ref):
            """Returns (acc, m_i, l_i) after every key block, FlashAttention-3's intra-warpgroup overlap.

            o_ref: the [block_q, head_dim] f32 accumulator, zero. Step 0's S is issued alone; each
            middle iteration j issues S_{j+1} then P_j V_j (two wgmma groups in flight), waits for
            the first (wait_group 1), releases K_{j+1} and computes the softmax of S_{j+1} while P_j V_j
            runs, then waits for it (wait_group 0), releases V_j and rescales O; the last P V goes
            alone. P_j's registers are an operand of the wgmma in flight, so P_{j+1} is a new value
            carried to the next iteration; overlap_late_p casts it to bf16 only after the wait (else
            LLVM may put it in P_j's registers), overlap_early_rescale moves O's rescale between
            the issues (then step j's factor and maxima are carried to step j + 1). With pingpong,
            every phase (first, middles, last) takes the turn token from the other warpgroup before
            issuing and hands it over after, as FA3's named barriers do. Zero-trip loops make count 0
            and 1 need no branch.
            """
            waits_first = tuning.overlap_waits_first  # S's scope opens after the waits (MosaicTuning)
            first_slot = 0 if base is None else ring_slot(0)  # the persistent kernel's ring runs on

            def issue_qk(s_ref, step):  # after K_step's barrier: FA3 waits for data before its turn
                plgpu.wgmma(s_ref, qo_smem, k_smem.at[ring_slot(step)].transpose((1, 0)))

            def issue_pv(p16, step):  # p16: P in registers, or None: P in this warpgroup's SMEM tile
                slot = ring_slot(step)
                plgpu.barrier_wait(v_barriers.at[slot])
                plgpu.wgmma(o_ref, p_smem2[0].at[wg] if p_smem else p16, v_smem.at[slot])

            def keep_p(p):  # P [block_q, block_kv] f32 -> bf16, carried in registers or staged in SMEM
                if not p_smem:
                    return p.astype(dtype)
                p_smem2[0].at[wg][...] = p.astype(dtype)
                plgpu.commit_smem()  # visible to the wgmma's async proxy, every warp of the warpgroup
                return None

            def rescale_o(alpha, m_old, m_new):  # no wait: O's last P V has been waited for
                o_ref[...] = rescale(plgpu.wgmma_accumulator_load(o_ref, wait_n=None), alpha, m_old, m_new)

            def first(_, carry, *, mask_tail):
                m_i, l_i = carry[:2]
                if waits_first:
                    plgpu.barrier_wait(k_barriers.at[first_slot])
                    take_turn(wg, schedule_barrier)

                def qk(s_ref):
                    if not waits_first:
                        plgpu.barrier_wait(k_barriers.at[first_slot])
                        take_turn(wg, schedule_barrier)
                    issue_qk(s_ref, 0)
                    pass_turn(wg, schedule_barrier)
                    return plgpu.wgmma_accumulator_load(s_ref, wait_n=0)

                s = pl.run_scoped(qk, plgpu.ACC((block_q, block_kv), jnp.float32))  # [block_q, block_kv]
                plgpu.barrier_arrive(k_consumed.at[first_slot])
                p, m_new, alpha = softmax_scores(s, m_i, 0, mask_tail=mask_tail)
                out = (m_new, add_row_sum(l_i, alpha, p), keep_p(p))  # O is zero: no rescale
                if early_rescale:  # alpha_0 = 1 and no max moved: step 0's rescale is a no-op
                    out += (plgpu.layout_cast(jnp.full((block_q,), 1.0, jnp.float32), row), m_new)
                return out

            def middle(j, carry, *, mask_tail):
                m_i, l_i, p16 = carry[:3]
                if waits_first:
                    plgpu.barrier_wait(k_barriers.at[ring_slot(j + 1)])
                    take_turn(wg, schedule_barrier)

                def qk_and_pv(s_ref):
                    if not waits_first:
                        plgpu.barrier_wait(k_barriers.at[ring_slot(j + 1)])
                        take_turn(wg, schedule_barrier)
                    issue_qk(s_ref, j + 1)
                    if early_rescale:  # O *= alpha_j under S_{j+1}'s wgmma; the store fences O
                        rescale_o(*carry[3:], m_i)
                    issue_pv(p16, j)
                    pass_turn(wg, schedule_barrier)
                    # S_{j+1} done and P_j V_j still running, or (overlap_softmax=False) both done
                    return plgpu.wgmma_accumulator_load(s_ref, wait_n=1 if overlap_softmax else 0)

                s = pl.run_scoped(qk_and_pv, plgpu.ACC((block_q, block_kv), jnp.float32))
                plgpu.barrier_arrive(k_consumed.at[ring_slot(j + 1)])
                if tuning.late_pv_wait:
                    _convergence_point()
                if not overlap_softmax:  # P_j V_j has retired: V_j is free before the softmax
                    plgpu.barrier_arrive(v_consumed.at[ring_slot(j)])
                if tuning.ablate == "softmax":  # timing only: P = bf16(S), cast after P_j V_j's wait
                    plgpu.wgmma_accumulator_load(o_ref, wait_n=0)
                    plgpu.barrier_arrive(v_consumed.at[ring_slot(j)])
                    return m_i, l_i, keep_p(lax.optimization_barrier(s))
                if head_cols is not None:  # the wait and O's rescale amid the exp2, as in FA4's loop
                    x, m_new, alpha = shifted_scores(s, m_i, j + 1, mask_tail=mask_tail)
                    in_flight = plgpu.wgmma_accumulator_load(o_ref, wait_n=None)  # read after the wait
                    factor = None if tuning.ablate == "rescale" else lax.broadcast_in_dim(alpha, in_flight.shape, [0])
                    p, acc = _exp2_around_pv_wait(x, in_flight, factor, head_cols,
                                                  None if lazy_threshold is None else (m_i, m_new),
                                                  exp2=tuning.ablate != "exp2")
                    l_i = add_row_sum(l_i, alpha, p)
                    plgpu.barrier_arrive(v_consumed.at[ring_slot(j)])
                    o_ref[...] = acc
                    return m_new, l_i, keep_p(lax.optimization_barrier(p))
                p, m_new, alpha = softmax_scores(s, m_i, j + 1, mask_tail=mask_tail)
                l_i = add_row_sum(l_i, alpha, p)
                # The softmax must be done before the wait below, or LLVM may sink it past the
                # wait (its results are used only after it) and the overlap is gone.
                if late_p:
                    l_i, m_new, alpha, p = lax.optimization_barrier((l_i, m_new, alpha, p))
                else:
                    p16_next = p.astype(dtype)
                    l_i, m_new, alpha, p16_next = lax.optimization_barrier((l_i, m_new, alpha, p16_next))
                if tuning.late_pv_wait and tuning.row_sum_in_thread:
                    # The sum's shuffles (a warp-synchronous point after the last exp2) held the wait
                    # below the softmax; without them ptxas hoists it to after the max's.
                    _convergence_point()
                acc = plgpu.wgmma_accumulator_load(o_ref, wait_n=0)  # P_j V_j done
                if overlap_softmax:
                    plgpu.barrier_arrive(v_consumed.at[ring_slot(j)])
                if late_p:  # p passes a barrier after the wait, so LLVM cannot hoist the cast above it
                    p16_next = keep_p(lax.optimization_barrier(p))  # into P_j's registers, now free
                if early_rescale:
                    return m_new, l_i, p16_next, alpha, m_i
                o_ref[...] = rescale(acc, alpha, m_i, m_new)
                return m_new, l_i, p16_next

            def last(_, carry):
                if early_rescale:  # nothing to overlap with: before the turn, not while holding it
                    rescale_o(*carry[3:], carry[0])
                take_turn(wg, schedule_barrier)
                issue_pv(carry[2], count - 1)
                pass_turn(wg, schedule_barrier)
                plgpu.wgmma_wait(0)
                plgpu.barrier_arrive(v_consumed.at[ring_slot(count - 1)])
                return carry

            p16 = None  # P_0 comes from the first step; in SMEM mode it is never carried
            if not p_smem:
                p16 = plgpu.layout_cast(jnp.full((block_q, block_kv), 0.0, dtype), plgpu.Layout.WGMMA)
            carry = (m_i, l_i, p16)
            if early_rescale:  # + (alpha_j, m_{j-1}): O's factor for step j, applied before P_j V_j
                carry += (plgpu.layout_cast(jnp.full((block_q,), 1.0, jnp.float32), row), m_i)
            # Step s is masked iff s >= full_count (the ragged block is the last, tables.py):
            # the first step when full_count == 0, middle j (step j + 1) when j >= full_count - 1.
            has_first, full_first = jnp.minimum(count, 1), jnp.minimum(full_count, 1)
            carry = lax.fori_loop(0, full_first, functools.partial(first, mask_tail=False), carry)
            full_middles = jnp.maximum(full_count - 1, 0)
            carry = lax.fori_loop(0, full_middles, functools.partial(middle, mask_tail=False), carry)
            if tables.kv_ragged:
                carry = lax.fori_loop(full_first, has_first, functools.partial(first, mask_tail=True), carry)
                carry = lax.fori_loop(full_middles, count - 1, functools.partial(middle, mask_tail=True),
                                      carry)  # fmt: skip
            m_last, l_last = lax.fori_loop(0, has_first, last, carry)[:2]
            return o_ref[...], m_last, l_last

        if tuning.overlap_qk:
            if base is None:  # the persistent kernel hands the first turn over once, before its first item
                hand_over_first_turn(wg, schedule_barrier)
            carry = pl.run_scoped(overlapped_loop, plgpu.ACC((block_q, head_dim), jnp.float32))
        else:

            @pl.when(count > 0)
            def _():
                plgpu.barrier_wait(k_barriers.at[0 if base is None else ring_slot(0)])

            if pingpong:  # warpgroup 1 starts one rendezvous behind
                pl.when(wg == 1)(schedule)
            carry = lax.fori_loop(0, full_count, functools.partial(kv_step, mask_tail=False), (acc, m_i, l_i))
            if tables.kv_ragged:
                carry = lax.fori_loop(full_count, count, functools.partial(kv_step, mask_tail=True), carry)
            if pingpong:
                pl.when(wg == 0)(schedule)
        acc, m_i, l_i = carry
        return acc, m_i, total_row_sum(l_i)

    def stage_tile(o_smem, lse_smem, acc, m_i, l_i):
        """Writes a warpgroup's normalised O (dtype) and lse (natural log) to its staging tiles, fenced
        for the TMA stores. acc [block_q, head_dim], m_i, l_i [block_q]: attend's results."""
        # An empty row (count == 0) has l_i == 0: write zeros and lse = -inf, never NaN.
        nonempty = l_i > 0.0
        inv = jnp.where(nonempty, 1.0 / jnp.where(nonempty, l_i, 1.0), 0.0)
        acc *= lax.broadcast_in_dim(inv, acc.shape, [0])
        o_smem[...] = acc.astype(dtype)
        lse_smem[...] = jnp.where(nonempty, (m_i + jnp.log2(jnp.where(nonempty, l_i, 1.0))) * LN_2, -jnp.inf)
        plgpu.commit_smem()

    def store_item(out_refs, staging, wg, where, acc, m_i, l_i):
        """The persistent kernel's end of an item: once the previous item's TMA stores have read the staging
        tiles, writes this warpgroup's O and lse there (stage_tile) and stores them. out_refs: (out_ref,
        lse_ref); staging: (o_smem, lse_smem), this warpgroup's; where: the item's (batch, head, query tile)."""
        (out_ref, lse_ref), (o_smem, lse_smem) = out_refs, staging
        b, head, q_tile = where
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)
        stage_tile(o_smem, lse_smem, acc, m_i, l_i)
        q_base = q_tile * MASK_BLOCK + wg * block_q
        plgpu.copy_smem_to_gmem(o_smem, out_ref.at[b, pl.ds(q_base, block_q), head])
        plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[b, head, pl.ds(q_base, block_q)])

    def carried_walk(refs, q_barriers, out_refs, smem, wg, items, coords, counts_ref, load_q):
        """The compute warpgroup's walk of the persistent kernel with carry_items: GRID_MOSAIC_FWD's loop
        (waits first, P cast late, the wait for P V amid the exp2), one pipeline across its items.

        An item with count key blocks runs count - 1 middle steps (S_{j+1} and P_j V_j issued together);
        what the grid kernel does alone at an item's ends is paired across the boundary: the bridge issues
        item i + 1's S_0 (its Q landed, K_0 from the ring) with item i's last P V, computes S_0's softmax
        under it, waits, and normalises and stores item i's O. An item is opened alone (its S_0 with no
        P V under it) only after an empty item or at the CTA's start, and drained alone (its last P V with
        no S) only before an empty item or at the CTA's end. Every phase takes and passes the turn once,
        as in the grid kernel's loop, so both warpgroups keep taking it in turn.

        refs: attend's; q_barriers: the kernel's (one a warpgroup); out_refs: (out_ref, lse_ref); smem:
        (q_smem3, o_smem, lse_smem): the kernel's Q slots [2, COMPUTE_WGS, block_q, head_dim] and this
        warpgroup's staging tiles; coords(i): item i's (batch, head, query tile);
        counts_ref: the kernel's [query tiles, 2] (count, full_count); load_q(i, slot): issues item i's Q load
        into Q slot `slot`. The next item's counts are read before the key loop (their latency passes under
        it); the items' coordinates are read again where they are used, so that no more than those two
        values stay live across the key loop (more, and ptxas moved the loop's own slot and address
        arithmetic off the uniform datapath: +15 instructions a step, 7% slower on the H200).
        Item i's Q is in slot i % 2 and its first K/V block at ring position base_i, the sum of the
        earlier items' counts.
        """
        ids_ref, k_smem, v_smem, k_barriers, v_barriers, k_consumed, v_consumed, schedule_barrier, _ = refs
        q_smem3, staging = smem[0], smem[1:]
        q_barrier = q_barriers.at[wg]
        zero_o = lambda: plgpu.layout_cast(jnp.full((block_q, head_dim), 0.0, jnp.float32), plgpu.Layout.WGMMA)

        def slot(position):  # ring slot of the K/V block at this ring position
            return lax.rem(position, jnp.int32(stages))

        def issue_qk(s_ref, q_slot, position):
            plgpu.wgmma(s_ref, q_smem3.at[q_slot, wg], k_smem.at[slot(position)].transpose((1, 0)))

        def issue_pv(o_ref, p16, position):
            plgpu.barrier_wait(v_barriers.at[slot(position)])
            plgpu.wgmma(o_ref, p16, v_smem.at[slot(position)])

        def turn_and(issue, wait_n):
            """Takes the turn, issues, passes it on and returns S after wait_group(wait_n). S's scope opens
            after the waits (MosaicTuning.overlap_waits_first), so its zero init folds into the wgmma."""
            take_turn(wg, schedule_barrier)

            def scoped(s_ref):
                issue(s_ref)
                pass_turn(wg, schedule_barrier)
                return plgpu.wgmma_accumulator_load(s_ref, wait_n=wait_n)

            return pl.run_scoped(scoped, plgpu.ACC((block_q, block_kv), jnp.float32))

        finish = functools.partial(store_item, out_refs, staging, wg)  # (where, acc, m_i, l_i)

        # An item's first key block may be its ragged one (full_count == 0); the opening and the bridge
        # mask it whenever the tables have a ragged block, a no-op on a full block (every key is below
        # kv_len), so that each is compiled once rather than masked and unmasked.
        first_masked = tables.kv_ragged

        def open_item(_, carry, *, item, base):
            """Item `item`'s S_0 and softmax alone: returns its (m, l, P_0 in dtype). carry: the previous
            item's (finished), a fori_loop body's argument only."""
            plgpu.barrier_wait(k_barriers.at[slot(base)])
            s = turn_and(lambda s_ref: issue_qk(s_ref, lax.rem(item, 2), base), wait_n=0)
            plgpu.barrier_arrive(k_consumed.at[slot(base)])
            m_i, l_i = fresh_row_state()
            x, m_new, alpha = shifted_block_scores(s, m_i, ids_ref, coords(item)[2], 0, mask_tail=first_masked)
            p = jnp.exp2(x)
            return m_new, add_row_sum(l_i, alpha, p), p.astype(dtype)

        def middle(j, carry, *, o_ref, item, base, mask_tail):
            """S_{j+1} with P_j V_j of one item, as the grid kernel's middle step."""
            m_i, l_i, p16 = carry
            plgpu.barrier_wait(k_barriers.at[slot(base + j + 1)])

            def issue(s_ref):
                issue_qk(s_ref, lax.rem(item, 2), base + j + 1)
                issue_pv(o_ref, p16, base + j)

            s = turn_and(issue, wait_n=1)
            plgpu.barrier_arrive(k_consumed.at[slot(base + j + 1)])
            _convergence_point()
            x, m_new, alpha = shifted_block_scores(s, m_i, ids_ref, coords(item)[2], j + 1, mask_tail=mask_tail)
            in_flight = plgpu.wgmma_accumulator_load(o_ref, wait_n=None)  # read after the wait
            p, acc = _exp2_around_pv_wait(x, in_flight, lax.broadcast_in_dim(alpha, in_flight.shape, [0]), head_cols)
            l_i = add_row_sum(l_i, alpha, p)
            plgpu.barrier_arrive(v_consumed.at[slot(base + j)])
            o_ref[...] = acc
            return m_new, l_i, lax.optimization_barrier(p).astype(dtype)

        def bridge(_, carry, *, o_ref, item, base, count):
            """Item + 1's S_0 with item's last P V: returns item + 1's (m, l, P_0); item's O is stored."""
            m_i, l_i, p16 = carry
            last, next_base = base + count - 1, base + count
            plgpu.barrier_wait(k_barriers.at[slot(next_base)])

            def issue(s_ref):
                issue_qk(s_ref, lax.rem(item + 1, 2), next_base)
                issue_pv(o_ref, p16, last)

            s = turn_and(issue, wait_n=1)
            plgpu.barrier_arrive(k_consumed.at[slot(next_base)])
            _convergence_point()
            m_0, l_0 = fresh_row_state()
            x, m_new, alpha = shifted_block_scores(s, m_0, ids_ref, coords(item + 1)[2], 0, mask_tail=first_masked)
            p, acc = _exp2_around_pv_wait(x, plgpu.wgmma_accumulator_load(o_ref, wait_n=None), None, head_cols)
            l_new = add_row_sum(l_0, alpha, p)
            plgpu.barrier_arrive(v_consumed.at[slot(last)])
            finish(coords(item), acc, m_i, total_row_sum(l_i))
            o_ref[...] = zero_o()  # item + 1's first P V accumulates from zero
            return m_new, l_new, lax.optimization_barrier(p).astype(dtype)

        def drain(_, carry, *, o_ref, item, base, count):
            """Item's last P V alone (no item with key blocks follows it); its O is stored."""
            m_i, l_i, p16 = carry
            take_turn(wg, schedule_barrier)
            issue_pv(o_ref, p16, base + count - 1)
            pass_turn(wg, schedule_barrier)
            acc = plgpu.wgmma_accumulator_load(o_ref, wait_n=0)
            plgpu.barrier_arrive(v_consumed.at[slot(base + count - 1)])
            finish(coords(item), acc, m_i, total_row_sum(l_i))
            o_ref[...] = zero_o()
            return carry

        def walk(o_ref):
            def item_step(i, state):
                """Item i: opened unless the previous bridge did, its middle steps, then the bridge to
                item i + 1, or the drain, or (an empty item) its zeros. State: (ring position of its first
                block, count, full_count, opened: 1 if the bridge ran S_0, (m, l, P) after S_0)."""
                base, count, full_count, opened, carry = state
                next_tile = coords(jnp.minimum(i + 1, items - 1))[2]
                next_count, next_full = counts_ref[next_tile, 0], counts_ref[next_tile, 1]
                busy = (count > 0).astype(jnp.int32)
                carry = lax.fori_loop(0, busy * (1 - opened), functools.partial(open_item, item=i, base=base), carry)
                kw = dict(o_ref=o_ref, item=i, base=base)
                full_middles = jnp.maximum(full_count - 1, 0)
                carry = lax.fori_loop(0, full_middles, functools.partial(middle, mask_tail=False, **kw), carry)
                if tables.kv_ragged:
                    carry = lax.fori_loop(full_middles, count - 1, functools.partial(middle, mask_tail=True, **kw),
                                          carry)  # fmt: skip

                # Item i + 1's Q (issued an item ago) must have landed; item i's QKs are done, so its
                # slot takes item i + 2's Q. One Q load in flight a warpgroup: one barrier, phases in turn.
                @pl.when(i + 1 < items)
                def _():
                    plgpu.barrier_wait(q_barrier)
                    pl.when(i + 2 < items)(lambda: load_q(i + 2, lax.rem(i, 2)))

                paired = busy * (i + 1 < items).astype(jnp.int32) * (next_count > 0).astype(jnp.int32)
                carry = lax.fori_loop(0, paired, functools.partial(bridge, count=count, **kw), carry)
                carry = lax.fori_loop(0, busy * (1 - paired), functools.partial(drain, count=count, **kw), carry)

                @pl.when(count == 0)
                def _():
                    m_empty, l_empty = fresh_row_state()
                    finish(coords(i), zero_o(), m_empty, total_row_sum(l_empty))

                return base + count, next_count, next_full, paired, carry

            first_tile = coords(0)[2]
            count, full_count = counts_ref[first_tile, 0], counts_ref[first_tile, 1]
            plgpu.barrier_wait(q_barrier)
            pl.when(1 < items)(lambda: load_q(1, 1))
            m_i, l_i = fresh_row_state()
            carry = (m_i, l_i, plgpu.layout_cast(jnp.full((block_q, block_kv), 0.0, dtype), plgpu.Layout.WGMMA))
            lax.fori_loop(0, items, item_step, (jnp.int32(0), count, full_count, jnp.int32(0), carry))

        load_q(0, 0)
        pl.run_scoped(walk, plgpu.ACC((block_q, head_dim), jnp.float32))

    def copy_block(src, dst, full, rendezvous=None, together=None):
        """Issues the TMA copy of one K or V block src (GMEM) into its ring slot dst, arriving on full.

        together: None, or (kv_multicast) a traced bool: the block is the pair's other CTA's too. The two
        memory warpgroups then meet on the slot's rendezvous cluster barrier (each arrives on both CTAs'
        once its own slot is free) and each issues half of one multicast copy that both receive.
        """
        def alone():
            plgpu.copy_gmem_to_smem(src, dst, full)

        if together is None:
            return alone()

        def multicast():
            plgpu.barrier_arrive(rendezvous)
            plgpu.barrier_wait(rendezvous)
            plgpu.copy_gmem_to_smem(src, dst, full, collective_axes="pair")

        pl.when(together)(multicast)
        pl.when(jnp.logical_not(together))(alone)

    def load_kv(refs, b, head, q_tile, step, slot, reused=None, ready=None, together=None):
        """Issues the TMA loads of K and V block `step` of query tile q_tile's list into ring slot `slot`.

        reused: None for a fresh slot; True, or a traced bool (the persistent kernel's ring runs across
        items), when the slot held earlier blocks: the loads then wait for their K and V to be consumed.
        By default both waits come first; with separate_kv_waits the block's index is read first (its
        global load's latency passes under the waits) and K waits only for K, V only for V.
        ready, together: None, or (kv_multicast) the K and V rendezvous barriers and whether the block is
        the pair's other CTA's too (copy_block).
        """
        k_ref, v_ref, ids_ref, k_smem, v_smem, k_barriers, v_barriers, k_consumed, v_consumed = refs

        def wait(*consumed):
            def waits():
                for barrier in consumed:
                    plgpu.barrier_wait(barrier.at[slot])

            waits() if reused is True else pl.when(reused)(waits)

        apart = reused is not None and tuning.separate_kv_waits
        if reused is not None and not apart:
            wait(k_consumed, v_consumed)
        # ablate="loads" (timing only): the first 8 rows of each block, the rest of the slot as the CTA before left it
        rows = 8 if tuning.ablate == "loads" else block_kv
        kv = (b, pl.ds(ids_ref[q_tile, step] * block_kv, rows), head)
        rendezvous = (None, None) if ready is None else (ready[0].at[slot], ready[1].at[slot])
        if apart:
            wait(k_consumed)
        copy_block(k_ref.at[kv], k_smem.at[slot, pl.ds(0, rows)], k_barriers.at[slot], rendezvous[0], together)
        if apart:
            wait(v_consumed)
        copy_block(v_ref.at[kv], v_smem.at[slot, pl.ds(0, rows)], v_barriers.at[slot], rendezvous[1], together)

    def kernel(q_ref, k_ref, v_ref, ids_ref, counts_ref, *refs):
        """One CTA a (batch, head, query tile), or with kv_multicast one CTA of a pair (a cluster of two) that
        runs query tiles 2p and 2p + 1, each walking the blocks both have first (shared_first_pairs), and
        takes those by multicast copies."""
        # kv_multicast: the pairs' shared step counts, and with pair_matching their tiles
        pair_refs = (1 + tuning.pair_matching) if multicast else 0
        (shared_ref, tiles_ref), refs = (refs[:pair_refs] + (None, None))[:2], refs[pair_refs:]
        (out_ref, lse_ref, qo_smem2, k_smem, v_smem, lse_smem2, k_barriers, v_barriers, q_barriers, k_consumed,
         v_consumed, schedule_barrier, *extra) = refs
        ready, p_smem2 = (extra, ()) if multicast else ((), tuple(extra))
        b, head, q_tile = block_coords(lax.axis_index, heads, "q_seq", tuning.grid_heads)
        pair = q_tile  # with kv_multicast the grid runs pairs of query tiles
        if multicast and tiles_ref is None:
            q_tile = 2 * pair + lax.axis_index("pair")
        elif multicast:
            q_tile = tiles_ref[pair, lax.axis_index("pair")]
        wg = lax.axis_index("wg")
        count = counts_ref[q_tile, 0]
        full_count = counts_ref[q_tile, 1]

        @pl.when(wg < COMPUTE_WGS)
        def _compute_wg():
            plgpu.set_max_registers(232, action="increase")
            qo_smem = qo_smem2.at[wg]  # Q, then O's staging tile
            lse_smem = lse_smem2.at[wg]
            q_base = q_tile * MASK_BLOCK + wg * block_q
            plgpu.copy_gmem_to_smem(q_ref.at[b, pl.ds(q_base, block_q), head], qo_smem, q_barriers.at[wg])
            plgpu.barrier_wait(q_barriers.at[wg])
            refs = (ids_ref, k_smem, v_smem, k_barriers, v_barriers, k_consumed, v_consumed, schedule_barrier, p_smem2)
            acc, m_i, l_i = attend(refs, qo_smem, wg, q_tile, count, full_count)
            stage_tile(qo_smem, lse_smem, acc, m_i, l_i)

            def store():
                plgpu.copy_smem_to_gmem(qo_smem, out_ref.at[b, pl.ds(q_base, block_q), head])
                plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[b, head, pl.ds(q_base, block_q)])
                plgpu.wait_smem_to_gmem(0)

            if multicast and num_q_tiles % 2:  # the last pair's second tile is past the end: no rows
                pl.when(q_tile < num_q_tiles)(store)
            else:
                store()

        @pl.when(wg == COMPUTE_WGS)
        def _memory_wg():
            plgpu.set_max_registers(40, action="decrease")
            ring = (k_ref, v_ref, ids_ref, k_smem, v_smem, k_barriers, v_barriers, k_consumed, v_consumed)
            load = functools.partial(load_kv, ring, b, head, q_tile, ready=ready or None)

            def produce(shared=None):  # shared: kv_multicast's shared steps (multicast copies), traced
                def together(step):
                    return None if shared is None else step < shared

                for i in range(stages):
                    pl.when(i < count)(functools.partial(load, i, i, together=together(i)))

                @pl.loop(0, jnp.maximum(count - stages, 0))
                def _(step):
                    ahead = step + stages
                    load(ahead, lax.rem(step, jnp.int32(stages)), True, together=together(ahead))

            if multicast and tuning.ablate is None:  # ablate: the pairs' blocks each loaded alone
                produce(shared_ref[pair])
            elif tuning.producer_warp:  # warp 0 alone, in single-warp semantics; warps 1-3 have nothing to do
                plgpu.warp_map(lambda warp: pl.when(warp == 0)(produce))
            else:
                produce()

    def persistent_kernel(q_ref, k_ref, v_ref, ids_ref, counts_ref, *refs):
        """One CTA walks work items cta, cta + num_ctas, ... (block_grid's launch order, work_coords), or with
        walk_item_cost the items of its row of the list-scheduled walk (walk_ref, list_scheduled_walk).

        Each warpgroup keeps a running ring position (`base`, the K/V blocks of its earlier items), so
        the memory warpgroup's loads and the compute warpgroups' waits agree on every slot and barrier
        phase across items, and the memory warpgroup runs ahead into the next item as far as the ring
        lets it. Q is double-buffered (q_smem3 [2, COMPUTE_WGS, block_q, head_dim], slot i % 2): item
        i + 1's Q is loaded as soon as item i's has landed, into the slot item i - 1's QKs have
        finished with, so it lands under item i's key loop (with carry_items, after item i's key loop,
        item i + 2's: carried_walk). O has its own staging tile (o_smem2), whose
        previous TMA store (with the lse's) is waited for only, and only for its reads, right before
        the next item's O overwrites it.
        """
        walk_ref, refs = (refs[0], refs[1:]) if tuning.walk_item_cost is not None else (None, refs)
        (out_ref, lse_ref, q_smem3, k_smem, v_smem, lse_smem2,
         k_barriers, v_barriers, q_barriers, k_consumed, v_consumed, schedule_barrier, o_smem2) = refs
        cta = lax.axis_index("cta")
        wg = lax.axis_index("wg")
        items = persistent_items(cta, num_ctas, total) if walk_ref is None else walk_ref[cta, 0]

        def coords(i):  # (batch, head, query tile) of this CTA's i-th item
            item = cta + i * num_ctas if walk_ref is None else walk_ref[cta, 1 + i]
            return work_coords(item, heads, num_q_tiles, batch, tuning.grid_heads)

        @pl.when(wg < COMPUTE_WGS)
        def _compute_wg():
            plgpu.set_max_registers(232, action="increase")
            o_smem, lse_smem = o_smem2.at[wg], lse_smem2.at[wg]
            refs = (ids_ref, k_smem, v_smem, k_barriers, v_barriers, k_consumed, v_consumed, schedule_barrier, ())
            if tuning.overlap_qk:
                hand_over_first_turn(wg, schedule_barrier)

            def load_q(i, q_slot):
                b, head, q_tile = coords(i)
                q_rows = pl.ds(q_tile * MASK_BLOCK + wg * block_q, block_q)
                plgpu.copy_gmem_to_smem(q_ref.at[b, q_rows, head], q_smem3.at[q_slot, wg], q_barriers.at[wg])

            if tuning.carry_items:
                carried_walk(refs, q_barriers, (out_ref, lse_ref), (q_smem3, o_smem, lse_smem), wg, items, coords,
                             counts_ref, load_q)  # fmt: skip
                plgpu.wait_smem_to_gmem(0)
                return

            def counts_of(i):  # (count, full_count) of item i (the last one's past the end)
                q_tile = coords(jnp.minimum(i, items - 1))[2]
                return counts_ref[q_tile, 0], counts_ref[q_tile, 1]

            load_q(0, 0)

            def item(i, carry):
                base, count, full_count = carry
                b, head, q_tile = coords(i)
                # The next item's counts, read now and carried: the global load's latency passes under
                # this item instead of delaying the next one's first wait.
                next_counts = counts_of(i + 1)
                q_slot = lax.rem(i, 2)
                # One Q load in flight per warpgroup at a time (the next is issued after this wait),
                # so one barrier serves both slots and its phases alternate with the items.
                plgpu.barrier_wait(q_barriers.at[wg])
                pl.when(i + 1 < items)(lambda: load_q(i + 1, 1 - q_slot))
                acc, m_i, l_i = attend(refs, q_smem3.at[q_slot, wg], wg, q_tile, count, full_count, base)
                store_item((out_ref, lse_ref), (o_smem, lse_smem), wg, (b, head, q_tile), acc, m_i, l_i)
                return base + count, *next_counts

            lax.fori_loop(0, items, item, (jnp.int32(0), *counts_of(0)))
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == COMPUTE_WGS)
        def _memory_wg():
            plgpu.set_max_registers(40, action="decrease")

            def item(i, base):
                b, head, q_tile = coords(i)
                count = counts_ref[q_tile, 0]
                ring = (k_ref, v_ref, ids_ref, k_smem, v_smem, k_barriers, v_barriers, k_consumed, v_consumed)
                load = functools.partial(load_kv, ring, b, head, q_tile)

                @pl.loop(0, count)  # an empty row loads nothing
                def _(step):
                    position = base + step
                    slot = lax.rem(position, jnp.int32(stages))

                    # The slot is reused when the block `stages` earlier (maybe an earlier item's) was loaded.
                    load(step, slot, position >= stages)

                return base + count

            lax.fori_loop(0, items, item, jnp.int32(0))

    tiling = plgpu.TilingTransform((8, 64 * 2 // jnp.dtype(dtype).itemsize))
    swizzle = plgpu.SwizzleTransform(128)
    scratch = [
        # Q (and O's staging tile) of each compute warpgroup; persistent: Q double-buffered
        plgpu.SMEM((2,) * persistent + (COMPUTE_WGS, block_q, head_dim), dtype, transforms=(tiling, swizzle)),
        plgpu.SMEM((stages, block_kv, head_dim), dtype, transforms=(tiling, swizzle)),
        plgpu.SMEM((stages, block_kv, head_dim), dtype, transforms=(tiling, swizzle)),
        plgpu.SMEM((COMPUTE_WGS, block_q), jnp.float32),
        plgpu.Barrier(num_barriers=stages),
        plgpu.Barrier(num_barriers=stages),
        plgpu.Barrier(num_barriers=COMPUTE_WGS),
        plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=stages),
        plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=stages),
        # The schedule barrier: a rendezvous of both warpgroups twice a step, or with overlap_qk one
        # turn barrier per warpgroup, which the other arrives on when it has issued its wgmmas.
        plgpu.Barrier(num_barriers=COMPUTE_WGS) if tuning.overlap_qk else plgpu.Barrier(num_arrivals=COMPUTE_WGS),
    ]
    if multicast:  # the two memory warpgroups' rendezvous before a multicast K, and V, into a slot
        scratch += [plgpu.ClusterBarrier(collective_axes=("pair",), num_barriers=stages)] * 2
    if p_smem:  # each compute warpgroup's P tile, as its Q tile: the lhs of an SS wgmma
        scratch.append(plgpu.SMEM((COMPUTE_WGS, block_q, block_kv), dtype, transforms=(tiling, swizzle)))
    params = {}
    if persistent:  # O's staging tiles, apart from Q's two slots
        scratch.append(plgpu.SMEM((COMPUTE_WGS, block_q, head_dim), dtype, transforms=(tiling, swizzle)))
    if persistent or stages > 2:
        # Pallas reserves 2 KiB of SMEM for cross-warp reductions by default; the row max and sum in
        # the WGMMA layout reduce within a warp's quads (no scratch used), and at head_dim 128 the
        # 224 KiB of tiles of either design plus those 2 KiB pass the 227 KiB a Hopper CTA can have
        # (by 88 and 128 bytes). A reduction across warps would need the scratch: Mosaic GPU (jax 0.10
        # and 0.11) then raises at lowering ("Required reduction scratch size ..."), so the CPU lowering
        # tests would catch one.
        params["reduction_scratch_bytes"] = 0
    out, lse = plgpu.kernel(
        persistent_kernel if persistent else kernel,
        out_type=[
            jax.ShapeDtypeStruct(q.shape, dtype),
            jax.ShapeDtypeStruct((batch, heads, num_q_tiles * MASK_BLOCK), jnp.float32),
        ],
        scratch_types=scratch,
        grid=grid,
        grid_names=grid_names,
        num_threads=COMPUTE_WGS + 1,
        thread_name="wg",
        **(dict(cluster=(2,), cluster_names=("pair",)) if multicast else {}),
        compiler_params=plgpu.CompilerParams(approx_math=True, **params),
    )(*inputs)
    return unpad_seq(out, q_len), lse[..., :q_len]
