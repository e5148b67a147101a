"""Block-sparse flash attention backward for Hopper, Pallas Mosaic GPU.

Two designs on the same index tables, both on `emit_pipeline_warp_specialized` (a traced step
count, index maps that read the tables from GMEM; only the memory warpgroup evaluates them):

- split (the default; jax's attention_mgpu structure, with tokamax's overlaps): a dq kernel
  per (head, 128-query block, batch) over its key blocks, and a dk/dv kernel per (head,
  128-key block, batch) over its query blocks (the transposed table); two compute warpgroups
  of 64 rows each. It recomputes S and dP in both kernels, seven matmuls per block pair
  instead of five, but needs no atomics and no cross-warpgroup barrier, and on the H100 it is
  the faster of the two.
- fused (`MosaicBwdTuning(fused=True)`, head_dim % 128 == 0; FlashAttention-3's design): the
  dk/dv kernel also computes dQ_partial = dS K. Each warpgroup stores its dS^T to shared
  memory, the two meet at a barrier, and warpgroup w computes head-dim half w of the partial
  dQ from all 128 keys one step later (so the two need not run in lockstep), adding it into an
  f32 dQ accumulator in GMEM with a TMA reduce-add; a cast turns it into dq.
  `MosaicBwdTuning.fused_order` picks the order inside a step: "deferred_dq" (the above),
  "fa4", FlashAttention-4's sm90 order (dQ of the step's own dS^T, issued beside dK and stored
  while dK runs; the warpgroups meet every step), "fa4_late_dv" (the same, dV issued where FA4
  issues it) or "private_dq" (each warpgroup reduces dS_w K_w over its own keys: no meeting), see
  `fused_kernel`. On the H200 every order runs slower than the split kernels (0.82-0.97x; the
  fused step spills and issues ~600 instructions per warp beside its 32 wgmmas, NOTES session 6).
  `MosaicBwdTuning.fused_pipeline="static"` runs the fa4_late_dv fused steps on a hand-written
  pipeline instead (`_static_query_pipeline`: a mask block per iteration, two steps on constant
  slots; "static_wg" also emits each compute warpgroup's code apart), built and lowered on the CPU.

Pipeline tiles are smaller than mask blocks (64 vs 128 tokens) to keep the accumulators in
registers, so step t of a row visits tile (ids[t // r] * r + t % r), r = 128 / tile.
Ragged ends need no masks: TMA zero-fills reads past the end and clips writes, padded keys are
zeros (their ds * k terms vanish) and padded query rows have q = dO = delta = 0. Lengths that
are not a multiple of 8 are zero-padded up to one first, as in the forward (mosaic_fwd.py).
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax

from radial_jax.kernels.common import COMPUTE_WGS, LOG2_E, MASK_BLOCK, MosaicBwdTuning, seq_multiple, unpad_seq
from radial_jax.kernels.tables import BlockTables

FUSED_ORDERS = ("deferred_dq", "fa4", "fa4_late_dv", "private_dq")  # MosaicBwdTuning.fused_order's choices
FUSED_PIPELINES = ("emit", "static", "static_wg")  # MosaicBwdTuning.fused_pipeline's choices

__all__ = ["FUSED_ORDERS", "FUSED_PIPELINES", "MosaicBwdTuning", "dkv_kernel", "dq_kernel", "fused_kernel",
           "mosaic_backward", "row_statistics"]


@functools.partial(jax.jit, static_argnames=("tables", "scale", "tuning"))
def mosaic_backward(q, k, v, out, lse, d_out, d_lse, *, tables: BlockTables, scale: float,
                    tuning: MosaicBwdTuning = MosaicBwdTuning()):
    """Returns (dq, dk, dv). q, out, d_out: [B, L, N, D]; k, v: [B, M, N, D]; lse, d_lse: [B, N, L]."""
    assert COMPUTE_WGS * tuning.block_q_dq == MASK_BLOCK == COMPUTE_WGS * tuning.block_kv_dkv == tables.block_size
    q_len, kv_len = q.shape[1], k.shape[1]
    assert (q_len, kv_len) == (tables.q_len, tables.kv_len), "tables built for other lengths"
    lse2, delta = row_statistics(out, lse, d_out, d_lse, tables)
    args = (seq_multiple(q), seq_multiple(k), seq_multiple(v), seq_multiple(d_out), lse2, delta)
    if tuning.memory_registers % 8 or not 24 <= tuning.memory_registers <= 256:  # setmaxnreg's range
        raise ValueError(f"memory_registers={tuning.memory_registers}: choose a multiple of 8 from 24 to 256 "
                         "(40, the default; 24 gives the compute warpgroups FA4's 240)")
    if tuning.fused_order not in FUSED_ORDERS:
        raise ValueError(f"fused_order={tuning.fused_order!r}: choose one of {FUSED_ORDERS}")
    if tuning.fused_order != "deferred_dq" and not tuning.fused:
        raise ValueError(f"fused_order={tuning.fused_order!r} orders the fused kernel: set fused=True too")
    if tuning.stats_in_acc and tuning.fused_order not in ("fa4_late_dv", "private_dq"):
        raise ValueError("stats_in_acc starts the late-dV fused steps' accumulators at the row statistics: "
                         "set fused=True, fused_order='fa4_late_dv' (or 'private_dq') too")
    if tuning.fused_pipeline not in FUSED_PIPELINES:
        raise ValueError(f"fused_pipeline={tuning.fused_pipeline!r}: choose one of {FUSED_PIPELINES}")
    if tuning.fused_pipeline != "emit" and not (tuning.fused and tuning.fused_order == "fa4_late_dv"):
        raise ValueError(f"fused_pipeline={tuning.fused_pipeline!r} streams the fused kernel's late-dV steps: "
                         "set fused=True, fused_order='fa4_late_dv' too")
    if tuning.fused and q.shape[-1] % (COMPUTE_WGS * 64) == 0:
        if jax.__version_info__ < (0, 11):  # 0.10 cannot pass the accumulator Ref through plgpu.kernel
            raise NotImplementedError(f"the fused Mosaic backward needs jax >= 0.11, not {jax.__version__}")
        dq, dk, dv = fused_kernel(*args, tables=tables, scale=scale, tuning=tuning)
    else:
        dq = dq_kernel(*args, tables=tables, scale=scale, tuning=tuning)
        dk, dv = dkv_kernel(*args, tables=tables, scale=scale, tuning=tuning)
    return unpad_seq(dq, q_len), unpad_seq(dk, kv_len), unpad_seq(dv, kv_len)


def row_statistics(out, lse, d_out, d_lse, tables: BlockTables):
    """Returns (lse2, delta): [B, N, padded L] f32, the kernels' per-row inputs.

    lse2 = lse * log2(e) (the kernels use exp2; empty rows, lse = -inf, are never visited and get
    0), delta = rowsum(dO * O) - d_lse (the lse cotangent folds into delta); rows padded with
    zeros to whole mask blocks.
    """
    q_len = out.shape[1]
    delta = jnp.einsum("blnd,blnd->bnl", d_out.astype(jnp.float32), out.astype(jnp.float32)) - d_lse
    lse2 = jnp.where(jnp.isfinite(lse), lse, 0.0) * LOG2_E
    pad_row = lambda x: jnp.pad(x, ((0, 0), (0, 0), (0, tables.num_q_blocks * MASK_BLOCK - q_len)))
    return pad_row(lse2), pad_row(delta)


def _smem_transforms(dtype):
    """(tiling, swizzle) of a wgmma operand in shared memory: 128-byte rows, swizzled."""
    import jax.experimental.pallas.mosaic_gpu as plgpu

    return plgpu.TilingTransform((8, 128 // jnp.dtype(dtype).itemsize)), plgpu.SwizzleTransform(128)


def _load(ref, *, layout):
    """plgpu.load of a whole ref: jax 0.10 requires an index argument, 0.11 deprecates it."""
    import jax.experimental.pallas.mosaic_gpu as plgpu

    try:
        return plgpu.load(ref, layout=layout)
    except TypeError:
        return plgpu.load(ref, None, layout=layout)


def dq_kernel(q, k, v, d_out, lse2, delta, *, tables: BlockTables, scale: float, tuning: MosaicBwdTuning):
    """The split design's dq: per (head, 128-query block, batch), over its key blocks. -> [B, L, N, D]."""
    import jax.experimental.pallas as pl
    import jax.experimental.pallas.mosaic_gpu as plgpu

    batch, _, heads, head_dim = q.shape
    dtype, t = q.dtype, tuning
    qk_scale = scale * LOG2_E
    tiling, swizzle = _smem_transforms(dtype)
    row = plgpu.Layout.WGMMA.reduce(1)
    r_dq = MASK_BLOCK // t.block_kv_dq

    def kernel_dq(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, ids_ref, counts_ref, dq_ref,
                  smem, barriers):
        b, head, q_tile = lax.axis_index("batch"), lax.axis_index("heads"), lax.axis_index("q_seq")
        wg = lax.axis_index("wg")
        q_smem2, do_smem2, lse_smem2, delta_smem2 = smem
        block_q, block_kv = t.block_q_dq, t.block_kv_dq

        def compute_thread(pipeline):
            q_smem, do_smem = q_smem2.at[wg], do_smem2.at[wg]
            lse_smem, delta_smem = lse_smem2.at[wg], delta_smem2.at[wg]
            q_base = q_tile * MASK_BLOCK + wg * block_q
            rows = (b, pl.ds(q_base, block_q), head)
            plgpu.copy_gmem_to_smem(q_ref.at[rows], q_smem, barriers[0].at[wg])
            plgpu.copy_gmem_to_smem(do_ref.at[rows], do_smem, barriers[1].at[wg])
            plgpu.copy_gmem_to_smem(lse_ref.at[b, head, pl.ds(q_base, block_q)], lse_smem, barriers[2].at[wg])
            plgpu.copy_gmem_to_smem(delta_ref.at[b, head, pl.ds(q_base, block_q)], delta_smem, barriers[3].at[wg])
            for barrier in barriers:
                plgpu.barrier_wait(barrier.at[wg])
            lse = _load(lse_smem, layout=row)
            delta = _load(delta_smem, layout=row)

            def run(dq_acc):
                pipeline((dq_acc, lse, delta))
                return dq_acc[...]

            dq = pl.run_scoped(run, plgpu.ACC((block_q, head_dim), jnp.float32))
            q_smem[...] = (dq * scale).astype(dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(q_smem, dq_ref.at[rows])
            plgpu.wait_smem_to_gmem(0)

        def step(_, k_smem, v_smem, k_consumed, v_consumed, carry):
            q_smem, do_smem = q_smem2.at[wg], do_smem2.at[wg]
            dq_acc, lse, delta = carry

            def compute_p_dp(s_acc, dp_acc):
                plgpu.wgmma(s_acc, q_smem, k_smem.transpose((1, 0)))
                plgpu.wgmma(dp_acc, do_smem, v_smem.transpose((1, 0)))
                s = plgpu.wgmma_accumulator_load(s_acc, wait_n=1)  # S; dP may still run
                p = jnp.exp2(s * qk_scale - lax.broadcast_in_dim(lse, s.shape, [0]))
                dp = dp_acc[...]
                plgpu.barrier_arrive(v_consumed)
                return p, dp

            acc = plgpu.ACC((block_q, block_kv), jnp.float32)
            p, dp = pl.run_scoped(compute_p_dp, acc, acc)
            ds = p * (dp - lax.broadcast_in_dim(delta, dp.shape, [0]))
            plgpu.wgmma(dq_acc, ds.astype(dtype), k_smem)
            plgpu.wgmma_wait(0)
            plgpu.barrier_arrive(k_consumed)
            return dq_acc, lse, delta

        kv_tile = lambda i: _tile_of_step(ids_ref, q_tile, i, r_dq)
        spec = plgpu.BlockSpec(block_shape=(block_kv, head_dim), index_map=lambda i: (kv_tile(i), 0),
                               transforms=[tiling, swizzle])
        pipeline = plgpu.emit_pipeline_warp_specialized(
            step, grid=(counts_ref[q_tile] * r_dq,), max_concurrent_steps=t.max_concurrent_steps,
            num_compute_wgs=COMPUTE_WGS, memory_registers=t.memory_registers, wg_axis="wg",
            manual_consumed_barriers=True, compute_context=compute_thread, in_specs=[spec, spec])
        pipeline(k_ref.at[b, :, head, :], v_ref.at[b, :, head, :])

    q_scratch = plgpu.SMEM((COMPUTE_WGS, t.block_q_dq, head_dim), dtype, transforms=(tiling, swizzle))
    row_scratch = plgpu.SMEM((COMPUTE_WGS, t.block_q_dq), jnp.float32)
    dq = plgpu.kernel(
        kernel_dq,
        out_type=jax.ShapeDtypeStruct(q.shape, dtype),
        scratch_types=[(q_scratch, q_scratch, row_scratch, row_scratch),
                       (plgpu.Barrier(num_barriers=COMPUTE_WGS),) * 4],
        compiler_params=plgpu.CompilerParams(approx_math=True),
        grid=(heads, tables.num_q_blocks, batch), grid_names=("heads", "q_seq", "batch"),
        num_threads=COMPUTE_WGS + 1, thread_name="wg",
    )(q, k, v, d_out, lse2, delta, jnp.asarray(tables.kv_ids), jnp.asarray(tables.kv_counts))
    return dq


def dkv_kernel(q, k, v, d_out, lse2, delta, *, tables: BlockTables, scale: float, tuning: MosaicBwdTuning):
    """The split design's dk, dv: per (head, 128-key block, batch), over the query blocks that see
    it (the transposed table). -> ([B, M, N, D], [B, M, N, D])."""
    import jax.experimental.pallas as pl
    import jax.experimental.pallas.mosaic_gpu as plgpu

    batch, _, heads, head_dim = q.shape
    dtype, t = q.dtype, tuning
    qk_scale = scale * LOG2_E
    tiling, swizzle = _smem_transforms(dtype)
    col = plgpu.Layout.WGMMA.reduce(0)

    def kernel_dkv(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, ids_ref, counts_ref, dk_ref, dv_ref,
                   smem, barriers):
        b, head, kv_block = lax.axis_index("batch"), lax.axis_index("heads"), lax.axis_index("kv_seq")
        wg = lax.axis_index("wg")
        k_smem2, v_smem2 = smem
        block_q, block_kv = t.block_q_dkv, t.block_kv_dkv

        def compute_thread(pipeline):
            k_smem, v_smem = k_smem2.at[wg], v_smem2.at[wg]
            kv_base = kv_block * MASK_BLOCK + wg * block_kv
            rows = (b, pl.ds(kv_base, block_kv), head)
            plgpu.copy_gmem_to_smem(k_ref.at[rows], k_smem, barriers[0].at[wg])
            plgpu.copy_gmem_to_smem(v_ref.at[rows], v_smem, barriers[1].at[wg])
            plgpu.barrier_wait(barriers[0].at[wg])
            plgpu.barrier_wait(barriers[1].at[wg])

            def run(dk_acc, dv_acc):
                pipeline((dk_acc, dv_acc))
                return dk_acc[...], dv_acc[...]

            acc = plgpu.ACC((block_kv, head_dim), jnp.float32)
            dk, dv = pl.run_scoped(run, acc, acc)
            k_smem[...] = (dk * scale).astype(dtype)
            v_smem[...] = dv.astype(dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(k_smem, dk_ref.at[rows], commit_group=False)
            plgpu.copy_smem_to_gmem(v_smem, dv_ref.at[rows], commit_group=False)
            plgpu.commit_smem_to_gmem_group()
            plgpu.wait_smem_to_gmem(0)

        def step(_, q_smem, do_smem, lse_smem, delta_smem, q_consumed, do_consumed, lse_consumed,
                 delta_consumed, carry):
            k_smem, v_smem = k_smem2.at[wg], v_smem2.at[wg]
            dk_acc, dv_acc = carry

            def compute_s_t(acc):
                plgpu.wgmma(acc, k_smem, q_smem.transpose((1, 0)))
                return acc[...]

            s_t = pl.run_scoped(compute_s_t, plgpu.ACC((block_kv, block_q), jnp.float32))
            lse = _load(lse_smem, layout=col)
            plgpu.barrier_arrive(lse_consumed)
            p_t = jnp.exp2(s_t * qk_scale - lax.broadcast_in_dim(lse, s_t.shape, [1]))

            def compute_dp_t(acc):
                plgpu.wgmma(acc, v_smem, do_smem.transpose((1, 0)))
                plgpu.wgmma(dv_acc, p_t.astype(dtype), do_smem)
                return plgpu.wgmma_accumulator_load(acc, wait_n=1)  # dP^T; dV may still run

            dp_t = pl.run_scoped(compute_dp_t, plgpu.ACC((block_kv, block_q), jnp.float32))
            delta = _load(delta_smem, layout=col)
            plgpu.barrier_arrive(delta_consumed)
            ds_t = p_t * (dp_t - lax.broadcast_in_dim(delta, dp_t.shape, [1]))
            plgpu.wgmma(dk_acc, ds_t.astype(dtype), q_smem)
            plgpu.wgmma_wait(1)
            plgpu.barrier_arrive(do_consumed)
            plgpu.wgmma_wait(0)
            plgpu.barrier_arrive(q_consumed)
            return dk_acc, dv_acc

        _query_tile_pipeline(step, compute_thread, (q_ref, do_ref, lse_ref, delta_ref), ids_ref, counts_ref,
                             (b, head, kv_block), block_q, t.max_concurrent_steps, t.memory_registers)

    kv_scratch = plgpu.SMEM((COMPUTE_WGS, t.block_kv_dkv, head_dim), dtype, transforms=(tiling, swizzle))
    dk, dv = plgpu.kernel(
        kernel_dkv,
        out_type=[jax.ShapeDtypeStruct(k.shape, dtype)] * 2,
        scratch_types=[(kv_scratch, kv_scratch), (plgpu.Barrier(num_barriers=COMPUTE_WGS),) * 2],
        compiler_params=plgpu.CompilerParams(approx_math=True),
        grid=(heads, tables.num_kv_blocks, batch), grid_names=("heads", "kv_seq", "batch"),
        num_threads=COMPUTE_WGS + 1, thread_name="wg",
    )(q, k, v, d_out, lse2, delta, jnp.asarray(tables.q_ids), jnp.asarray(tables.q_counts))
    return dk, dv


def _tile_of_step(ids_ref, row, i, r):
    """The pipeline tile that step i of table row `row` visits: tiles are 1/r of a mask block."""
    return ids_ref[row, i // r] * r + lax.rem(i, jnp.int32(r))


def _query_tile_pipeline(step, compute_thread, refs, ids_ref, counts_ref, where, block_q: int, stages: int,
                         memory_registers: int):
    """Runs the dk/dv-side pipeline: q, dO ([block_q, D]) and lse2, delta ([block_q]) tiles of the
    query blocks that see key block `kv_block` (the transposed table), in `stages` buffers.

    refs: (q, dO, lse2, delta) GMEM refs; where: (batch, head, kv_block) of this CTA;
    memory_registers: the memory warpgroup's registers per thread (MosaicBwdTuning).
    """
    import jax.experimental.pallas.mosaic_gpu as plgpu

    q_ref, do_ref, lse_ref, delta_ref = refs
    b, head, kv_block = where
    r = MASK_BLOCK // block_q
    tile = lambda i: _tile_of_step(ids_ref, kv_block, i, r)
    seq_spec = plgpu.BlockSpec(block_shape=(block_q, q_ref.shape[-1]), index_map=lambda i: (tile(i), 0),
                               transforms=_smem_transforms(q_ref.dtype))
    row_spec = plgpu.BlockSpec(block_shape=(block_q,), index_map=lambda i: (tile(i),))
    pipeline = plgpu.emit_pipeline_warp_specialized(
        step, grid=(counts_ref[kv_block] * r,), max_concurrent_steps=stages, num_compute_wgs=COMPUTE_WGS,
        memory_registers=memory_registers, wg_axis="wg", manual_consumed_barriers=True, compute_context=compute_thread,
        in_specs=[seq_spec, seq_spec, row_spec, row_spec])
    pipeline(q_ref.at[b, :, head, :], do_ref.at[b, :, head, :], lse_ref.at[b, head, :], delta_ref.at[b, head, :])


def _static_query_pipeline(step, compute_thread, refs, ring, ids_ref, counts_ref, where, tile_rows: int,
                           memory_registers: int):
    """The fused kernel's hand-written query pipeline (MosaicBwdTuning.fused_pipeline="static").

    One loop iteration j visits query block ids[kv_block, j] of the transposed table as two 64-row
    steps unrolled here: step A on ring stage 0, step B on stage 1, so the body's buffers, barriers
    and slots are constants and the one dynamic value an iteration is the block index (one table
    read). step(stage, q_block, (q, dO, lse2, delta) tiles of the stage, the stage's consumed
    barrier, carry) runs one step and arrives on that barrier once it has read the tiles for the
    last time; compute_thread(pipeline) as in _query_tile_pipeline. Lists of COMPUTE_WGS steps and
    compute_threads: warpgroup w runs its own (MosaicBwdTuning.fused_pipeline="static_wg").
    refs: (q [B, L, N, D], dO, lse2 [B, N, L], delta) in GMEM; ring: (q, dO, lse2, delta stages,
    full barriers, consumed barriers), each tile ring [2 * tile_rows, ...]; where: (batch, head, kv_block)
    of this CTA; tile_rows: a step's query rows, half a mask block.

    Slot safety. The memory warpgroup refills stage s for iteration j (j > 0) only after stage s's
    consumed barrier completed for iteration j - 1: both compute warpgroups had retired every wgmma
    reading its q and dO tiles (the step's last, dK) and had loaded its lse2 and delta. A compute
    warpgroup reads stage s of iteration j only after stage s's full barrier completed phase j (all
    four TMA loads landed). Each barrier completes once an iteration and every waiter waits on every
    phase, so the parities stay matched. The dS^T and dQ staging slots alternate as i % 2 does in the
    emit pipeline (step A is an even step, B odd), so fused_kernel's arguments for them hold as written.
    Ragged ends are as in the emit pipeline: TMA zero-fills q and dO past the length; lse2 and delta
    are padded to whole mask blocks with zeros. count 0: no iteration, no load, dK = dV = 0.
    """
    import jax.experimental.pallas as pl
    import jax.experimental.pallas.mosaic_gpu as plgpu

    q_ref, do_ref, lse_ref, delta_ref = refs
    *tiles, full, consumed = ring
    b, head, kv_block = where
    stages, block_q = MASK_BLOCK // tile_rows, tile_rows
    # A stage is a static row slice of the ring, not an integer index: an integer index of a ref that a
    # pl.run_state in the step closes over (stats_in_acc) reaches the loop body as a literal, which
    # Mosaic GPU's lowering of the loop rejects ("Shaped arrays must be represented by ir.Values").
    stage_of = lambda ref, stage: ref.at[pl.ds(stage * block_q, block_q)]
    count = counts_ref[kv_block]
    wg = lax.axis_index("wg")

    def compute(step, compute_thread):
        # emit_pipeline_warp_specialized's split of the 512 registers a thread (multiples of 8).
        plgpu.set_max_registers(min(256, (512 - memory_registers) // COMPUTE_WGS) // 8 * 8, action="increase")

        def pipeline(carry):
            @pl.loop(0, count)
            def _(j):
                q_block = ids_ref[kv_block, j]
                for stage in range(stages):
                    plgpu.barrier_wait(full.at[stage])
                    step(stage, q_block, tuple(stage_of(tile, stage) for tile in tiles), consumed.at[stage], carry)

            return carry

        compute_thread(pipeline)

    if isinstance(step, list):  # one (step, compute_thread) per compute warpgroup
        for w in range(COMPUTE_WGS):
            pl.when(wg == w)(functools.partial(compute, step[w], compute_thread[w]))
    else:
        pl.when(wg < COMPUTE_WGS)(functools.partial(compute, step, compute_thread))

    @pl.when(wg == COMPUTE_WGS)
    def _memory():
        plgpu.set_max_registers(memory_registers, action="decrease")

        def load(q_block, stage):
            rows = pl.ds((q_block * stages + stage) * block_q, block_q)
            sources = (q_ref.at[b, rows, head], do_ref.at[b, rows, head], lse_ref.at[b, head, rows],
                       delta_ref.at[b, head, rows])  # fmt: skip
            for source, tile in zip(sources, tiles):
                plgpu.copy_gmem_to_smem(source, stage_of(tile, stage), full.at[stage])

        @pl.when(count > 0)
        def _():  # iteration 0: both stages are free
            q_block = ids_ref[kv_block, 0]
            for stage in range(stages):
                load(q_block, stage)

        @pl.loop(1, count)
        def _(j):
            q_block = ids_ref[kv_block, j]
            for stage in range(stages):
                plgpu.barrier_wait(consumed.at[stage])  # iteration j - 1's step on this stage is done
                load(q_block, stage)


def fused_kernel(q, k, v, d_out, lse2, delta, *, tables: BlockTables, scale: float, tuning: MosaicBwdTuning):
    """The fused design (module docstring): one kernel per (head, 128-key block, batch). -> (dq, dk, dv)."""
    import jax.experimental.pallas as pl
    import jax.experimental.pallas.mosaic_gpu as plgpu

    batch, q_len, heads, head_dim = q.shape
    dtype = q.dtype
    block_q, block_kv = tuning.block_q_dkv, tuning.block_kv_dkv
    d_half = head_dim // COMPUTE_WGS  # head-dim columns of dQ per warpgroup
    r = MASK_BLOCK // block_q
    padded = tables.num_q_blocks * MASK_BLOCK
    qk_scale = scale * LOG2_E
    fa4 = tuning.fused_order in ("fa4", "fa4_late_dv", "private_dq")
    late_dv = tuning.fused_order in ("fa4_late_dv", "private_dq")
    private_dq = tuning.fused_order == "private_dq"
    stats_in_acc = tuning.stats_in_acc
    static_wg = tuning.fused_pipeline == "static_wg"
    static = tuning.fused_pipeline == "static" or static_wg
    assert not static or r == 2, "the static pipeline's two stages are the two query tiles of a mask block"

    tiling, swizzle = _smem_transforms(dtype)
    f32_tiling = plgpu.TilingTransform((8, 32))
    col = plgpu.Layout.WGMMA.reduce(0)
    bcast_col = lambda x, shape: lax.broadcast_in_dim(x, shape, [1])

    def kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, ids_ref, counts_ref, dq_acc_ref, dk_ref, dv_ref,
               smem, barriers):
        b, head, kv_block = lax.axis_index("batch"), lax.axis_index("heads"), lax.axis_index("kv_seq")
        wg = lax.axis_index("wg")
        k_smem, v_smem2, ds_smem, dq_smem2, *ring = smem  # ring: the static pipeline's q, dO, lse2, delta
        k_loaded, v_loaded, ds_ready, done, *ring_barriers = barriers  # its (full, consumed) barriers
        def warpgroup(wg):
            """(compute_thread, step, step_fa4, static_step) of compute warpgroup wg: traced (one code for both
            warpgroups) or, with fused_pipeline="static_wg", a Python int (each its own code, whose
            shared-memory addresses are all constants)."""
            own = pl.ds(wg * block_kv, block_kv)
            v_own = v_smem2.at[own] if static_wg else v_smem2.at[wg]  # static_wg: [2 * 64, D], a static slice
            k_own, dq_smem = k_smem.at[own], dq_smem2.at[wg]
            k_cols = k_smem.at[:, pl.ds(wg * d_half, d_half)]  # all 128 keys, this warpgroup's dQ columns

            def add_dq(dq, i, predicate=None, *, half=None, slot=None, tile=None):
                """Reduce-adds this warpgroup's dQ partial of step i (head-dim half `half`, by default
                the warpgroup's own) into the f32 accumulator in GMEM, staged in SMEM slot `slot`
                (by default i % 2; each use of a slot waits for the TMA read of its use before last).
                tile: () -> the query tile of the step (by default the table's tile of step i)."""
                slot = lax.rem(i, jnp.int32(2)) if slot is None else slot
                half = wg if half is None else half
                plgpu.wait_smem_to_gmem(1, wait_read_only=True)  # this slot's copy of two uses ago
                dq_smem.at[slot][...] = dq
                plgpu.commit_smem()
                row = (q_tile(i) if tile is None else tile()) * block_q
                dst = dq_acc_ref.at[b, head, pl.ds(row, block_q), pl.ds(half * d_half, d_half)]
                plgpu.copy_smem_to_gmem(dq_smem.at[slot], dst, predicate, reduction_op="add")

            def compute_thread(pipeline):
                rows = (b, pl.ds(kv_block * MASK_BLOCK + wg * block_kv, block_kv), head)
                plgpu.copy_gmem_to_smem(k_ref.at[rows], k_own, k_loaded.at[wg])
                plgpu.copy_gmem_to_smem(v_ref.at[rows], v_own, v_loaded.at[wg])
                plgpu.barrier_wait(k_loaded.at[wg])
                plgpu.barrier_wait(v_loaded.at[wg])

                def run(dk_acc, dv_acc):
                    pipeline((dk_acc, dv_acc))
                    return dk_acc[...], dv_acc[...]

                acc = plgpu.ACC((block_kv, head_dim), jnp.float32)
                dk, dv = pl.run_scoped(run, acc, acc)
                if not fa4:  # fa4 stores every step's dQ within the step
                    steps = counts_ref[kv_block] * r

                    @pl.when(steps > 0)
                    def _():  # the last step's dQ, deferred like every other (see step)
                        last = steps - 1
                        plgpu.barrier_wait(ds_ready.at[lax.rem(last, jnp.int32(2))])

                        def compute_dq(acc):
                            plgpu.wgmma(acc, ds_smem.at[lax.rem(last, jnp.int32(2))].transpose((1, 0)), k_cols)
                            return acc[...]

                        add_dq(pl.run_scoped(compute_dq, plgpu.ACC((block_q, d_half), jnp.float32)), last)

                # The other warpgroup may still read this one's K rows for its last dQ.
                plgpu.barrier_arrive(done)
                plgpu.barrier_wait(done)
                k_own[...] = (dk * scale).astype(dtype)
                v_own[...] = dv.astype(dtype)
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(k_own, dk_ref.at[rows], commit_group=False)
                plgpu.copy_smem_to_gmem(v_own, dv_ref.at[rows], commit_group=False)
                plgpu.commit_smem_to_gmem_group()
                plgpu.wait_smem_to_gmem(0)

            def step(index, q_smem, do_smem, lse_smem, delta_smem, q_consumed, do_consumed, lse_consumed,
                     delta_consumed, carry):
                # Step i computes dQ of step i - 1: by then the other warpgroup has usually stored its
                # half of that dS^T, so the barrier rarely stalls and the two warpgroups need not run
                # in lockstep (in lockstep their softmax phases coincide and the tensor cores idle).
                (i,) = index
                dk_acc, dv_acc = carry
                slot, prev = lax.rem(i, jnp.int32(2)), lax.rem(i + 1, jnp.int32(2))

                def compute_p_and_previous_dq(s_acc, dq_acc):
                    plgpu.wgmma(s_acc, k_own, q_smem.transpose((1, 0)))

                    @pl.when(i > 0)
                    def _():
                        plgpu.barrier_wait(ds_ready.at[prev])

                    # At i == 0 the slot holds no dS yet: the product is computed and not stored.
                    plgpu.wgmma(dq_acc, ds_smem.at[prev].transpose((1, 0)), k_cols)
                    s_t = plgpu.wgmma_accumulator_load(s_acc, wait_n=1)
                    lse = _load(lse_smem, layout=col)
                    plgpu.barrier_arrive(lse_consumed)
                    p_t = jnp.exp2(s_t * qk_scale - bcast_col(lse, s_t.shape))
                    return p_t, dq_acc[...]

                p_t, dq_prev = pl.run_scoped(compute_p_and_previous_dq, plgpu.ACC((block_kv, block_q), jnp.float32),
                                             plgpu.ACC((block_q, d_half), jnp.float32))
                add_dq(dq_prev, jnp.maximum(i - 1, 0), predicate=i > 0)

                def compute_dp_t(acc):
                    plgpu.wgmma(acc, v_own, do_smem.transpose((1, 0)))
                    plgpu.wgmma(dv_acc, p_t.astype(dtype), do_smem)
                    return plgpu.wgmma_accumulator_load(acc, wait_n=1)  # dP^T; dV may still run

                dp_t = pl.run_scoped(compute_dp_t, plgpu.ACC((block_kv, block_q), jnp.float32))
                delta = _load(delta_smem, layout=col)
                plgpu.barrier_arrive(delta_consumed)
                ds_t = (p_t * (dp_t - bcast_col(delta, dp_t.shape))).astype(dtype)
                plgpu.wgmma(dk_acc, ds_t, q_smem)
                # Safe to overwrite: both warpgroups read this slot (dQ of step i - 2) before they
                # arrived for step i - 1, and this warpgroup waited for that arrival above.
                ds_smem.at[slot, own][...] = ds_t
                plgpu.commit_smem()
                plgpu.barrier_arrive(ds_ready.at[slot])
                plgpu.wgmma_wait(1)
                plgpu.barrier_arrive(do_consumed)
                plgpu.wgmma_wait(0)
                plgpu.barrier_arrive(q_consumed)
                return dk_acc, dv_acc

            def arrive(barrier):  # the static pipeline releases a stage once, on its q barrier
                if barrier is not None:
                    plgpu.barrier_arrive(barrier)

            def step_fa4(index, q_smem, do_smem, lse_smem, delta_smem, q_consumed, do_consumed, lse_consumed,
                         delta_consumed, carry):
                (i,) = index
                dk_acc, dv_acc = carry
                bufs, consumed = (q_smem, do_smem, lse_smem, delta_smem), (q_consumed, do_consumed, lse_consumed,
                                                                            delta_consumed)  # fmt: skip
                fa4_body(lax.rem(i, jnp.int32(2)), functools.partial(add_dq, i=i), bufs, consumed, dk_acc, dv_acc)
                return dk_acc, dv_acc

            def fa4_body(slot, add, bufs, consumed, dk_acc, dv_acc):
                """One 64-query step of the fa4 orders on slot `slot` of dS^T (an int in the static pipeline).

                add(dq, **add_dq's keywords): reduce-adds a dQ partial of this step; bufs: the step's
                (q, dO, lse2, delta) tiles in SMEM; consumed: their release barriers (None: not released here).
                """
                # FlashAttention-4's sm90 order: each wait retires one wgmma with another queued behind
                # it, so the tensor cores have work through the exp2 (dP^T), dS^T's store (dV) and dQ's
                # store (dK). One deviation in "fa4": dV is issued before dP^T is waited for, as in
                # dkv_kernel, not after dS^T's store, so it also runs under dS^T's arithmetic;
                # "fa4_late_dv" issues it where FA4 does.
                # dS^T slot i % 2 is free when this warpgroup writes it: its last readers were both dQs of
                # step i - 2; this warpgroup's retired in that step, and the other warpgroup's retired
                # before it arrived at ds_ready of step i - 1, which this one passed. The dQ staging slots
                # are this warpgroup's own; add_dq waits for the TMA read of the slot's step i - 2.
                # P^T and dS^T (bf16) are RS operands of dV and dK: fresh values each step, never carried
                # (the loop carries only the accumulators), so LLVM cannot coalesce a later write into
                # their registers while their wgmma runs (what serialized the overlap forward, NOTES FWDOV2).
                q_smem, do_smem, lse_smem, delta_smem = bufs
                q_consumed, do_consumed, lse_consumed, delta_consumed = consumed

                def compute_p_and_dp_issue_dv(s_acc, dp_acc):
                    plgpu.wgmma(s_acc, k_own, q_smem.transpose((1, 0)))
                    plgpu.wgmma(dp_acc, v_own, do_smem.transpose((1, 0)))
                    s_t = plgpu.wgmma_accumulator_load(s_acc, wait_n=1)  # S^T; dP^T may still run
                    lse = _load(lse_smem, layout=col)
                    arrive(lse_consumed)
                    p_t = jnp.exp2(s_t * qk_scale - bcast_col(lse, s_t.shape))
                    if late_dv:
                        return p_t, plgpu.wgmma_accumulator_load(dp_acc, wait_n=0)
                    plgpu.wgmma(dv_acc, p_t.astype(dtype), do_smem)
                    return p_t, plgpu.wgmma_accumulator_load(dp_acc, wait_n=1)  # dP^T; dV may still run

                def compute_p_and_dp_from_stats(refs):
                    # The accumulators start at -lse2 / qk_scale and -delta (per query column), so S^T
                    # comes out shifted by the row's lse and dP^T minus delta: the stats take no
                    # registers of their own while the exp2 and dS^T are formed (FA4 shuffles them in
                    # from a few registers instead; Pallas has no shuffle).
                    s_acc, dp_acc, p_ref = refs
                    plgpu.wgmma(s_acc, k_own, q_smem.transpose((1, 0)))
                    plgpu.wgmma(dp_acc, v_own, do_smem.transpose((1, 0)))
                    p_ref[...] = jnp.exp2(plgpu.wgmma_accumulator_load(s_acc, wait_n=1) * qk_scale)  # under dP^T

                shape_t = (block_kv, block_q)
                if stats_in_acc:  # late_dv only: run_state ends with a wait for every wgmma in flight
                    lse = _load(lse_smem, layout=col)
                    arrive(lse_consumed)
                    delta = _load(delta_smem, layout=col)
                    arrive(delta_consumed)
                    inits = (plgpu.ACC.init(bcast_col(lse * (-1.0 / qk_scale), shape_t)),
                             plgpu.ACC.init(bcast_col(-delta, shape_t)), jnp.zeros(shape_t, jnp.float32))
                    _, dp_minus_delta, p_t = pl.run_state(compute_p_and_dp_from_stats)(inits)
                else:
                    acc_t = plgpu.ACC(shape_t, jnp.float32)
                    p_t, dp_t = pl.run_scoped(compute_p_and_dp_issue_dv, acc_t, acc_t)
                    delta = _load(delta_smem, layout=col)
                    arrive(delta_consumed)
                    dp_minus_delta = dp_t - bcast_col(delta, dp_t.shape)
                ds_t = (p_t * dp_minus_delta).astype(dtype)
                ds_smem.at[slot, own][...] = ds_t
                plgpu.commit_smem()
                if late_dv:  # FA4's own place: P^T's bf16 registers are not live through dS^T's arithmetic
                    plgpu.wgmma(dv_acc, p_t.astype(dtype), do_smem)
                if private_dq:
                    # Each warpgroup adds its own keys' share of dQ, dS_w K_w ([64 q, 128 d] over its
                    # 64 keys), in two head-dim halves: it reads only its own dS^T rows, so there is no
                    # rendezvous and the warpgroups drift apart (one's softmax under the other's
                    # wgmmas) at the price of twice the TMA reduce-adds. Its dS^T rows' last reader is
                    # its own dQ of step i - 2, retired in that step.
                    ds_own = ds_smem.at[slot, own].transpose((1, 0))  # dS_w: [block_q, block_kv]

                    def compute_dq_halves(dq_acc):
                        plgpu.wgmma(dq_acc, ds_own, k_own.at[:, pl.ds(0, d_half)])
                        plgpu.wgmma(dk_acc, ds_t, q_smem)
                        plgpu.wgmma_wait(2)  # dV
                        arrive(do_consumed)
                        return plgpu.wgmma_accumulator_load(dq_acc, wait_n=1)  # dK may still run

                    add(pl.run_scoped(compute_dq_halves, plgpu.ACC((block_q, d_half), jnp.float32)), half=0, slot=0)

                    def compute_dq_high(dq_acc):
                        plgpu.wgmma(dq_acc, ds_own, k_own.at[:, pl.ds(d_half, d_half)])
                        plgpu.wgmma_wait(1)  # dK
                        arrive(q_consumed)
                        return plgpu.wgmma_accumulator_load(dq_acc, wait_n=0)

                    add(pl.run_scoped(compute_dq_high, plgpu.ACC((block_q, d_half), jnp.float32)), half=1, slot=1)
                    return
                plgpu.barrier_arrive(ds_ready.at[slot])

                def compute_dq_issue_dk(dq_acc):
                    plgpu.barrier_wait(ds_ready.at[slot])  # the other warpgroup's half of dS^T stored
                    plgpu.wgmma(dq_acc, ds_smem.at[slot].transpose((1, 0)), k_cols)
                    plgpu.wgmma(dk_acc, ds_t, q_smem)
                    plgpu.wgmma_wait(2)  # dV
                    arrive(do_consumed)
                    return plgpu.wgmma_accumulator_load(dq_acc, wait_n=1)  # dQ; dK may still run

                add(pl.run_scoped(compute_dq_issue_dk, plgpu.ACC((block_q, d_half), jnp.float32)))
                plgpu.wgmma_wait(0)
                arrive(q_consumed)

            def static_step(stage, q_block, bufs, release, carry):
                # Stage `stage` is also the dS^T and dQ staging slot: the same alternation as the emit
                # pipeline's i % 2 (step i = 2 j + stage), so fa4_body's slot argument holds unchanged.
                dk_acc, dv_acc = carry
                add = functools.partial(add_dq, i=None, slot=stage, tile=lambda: q_block * r + stage)
                fa4_body(stage, add, bufs, (release, None, None, None), dk_acc, dv_acc)

            return compute_thread, step, step_fa4, static_step

        q_tile = lambda i: _tile_of_step(ids_ref, kv_block, i, r)
        refs = (q_ref, do_ref, lse_ref, delta_ref)
        if static_wg:  # one code per warpgroup, chosen by a branch on wg around each
            per_wg = [warpgroup(w) for w in range(COMPUTE_WGS)]
            _static_query_pipeline([w[3] for w in per_wg], [w[0] for w in per_wg], refs, (*ring, *ring_barriers),
                                   ids_ref, counts_ref, (b, head, kv_block), block_q, tuning.memory_registers)
            return
        compute_thread, step, step_fa4, static_step = warpgroup(wg)
        if static:
            _static_query_pipeline(static_step, compute_thread, refs, (*ring, *ring_barriers), ids_ref, counts_ref,
                                   (b, head, kv_block), block_q, tuning.memory_registers)  # fmt: skip
        else:
            _query_tile_pipeline(step_fa4 if fa4 else step, compute_thread, refs, ids_ref, counts_ref,
                                 (b, head, kv_block), block_q, tuning.max_concurrent_steps, tuning.memory_registers)

    smem = (
        plgpu.SMEM((COMPUTE_WGS * block_kv, head_dim), dtype, transforms=(tiling, swizzle)),  # K, both halves
        plgpu.SMEM((COMPUTE_WGS * block_kv, head_dim) if static_wg else (COMPUTE_WGS, block_kv, head_dim), dtype,
                   transforms=(tiling, swizzle)),  # V, per warpgroup (static_wg: by row slices, see warpgroup)
        plgpu.SMEM((2, COMPUTE_WGS * block_kv, block_q), dtype, transforms=(tiling, swizzle)),  # dS^T, 2 slots
        plgpu.SMEM((COMPUTE_WGS, 2, block_q, d_half), jnp.float32, transforms=(f32_tiling, swizzle)),  # dQ partials
    )
    barriers = (
        plgpu.Barrier(num_barriers=COMPUTE_WGS),  # K loaded
        plgpu.Barrier(num_barriers=COMPUTE_WGS),  # V loaded
        plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=2),  # both dS^T halves stored, per slot
        plgpu.Barrier(num_arrivals=COMPUTE_WGS),  # both warpgroups done with K
    )
    if static:  # the query ring, one stage per 64-row half of a mask block (_static_query_pipeline)
        seq_ring = plgpu.SMEM((r * block_q, head_dim), dtype, transforms=(tiling, swizzle))
        row_ring = plgpu.SMEM((r * block_q,), jnp.float32)
        smem += (seq_ring, seq_ring, row_ring, row_ring)
        barriers += (plgpu.Barrier(num_arrivals=4, num_barriers=r),  # a stage's four tiles loaded
                     plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=r))  # both warpgroups done with a stage
    # The accumulator must start at zero and plgpu.kernel has no input/output aliasing: pass a Ref.
    dq_acc = jax.new_ref(jnp.zeros((batch, heads, padded, head_dim), jnp.float32))
    dk, dv = plgpu.kernel(
        kernel,
        out_type=[jax.ShapeDtypeStruct(k.shape, dtype)] * 2,
        scratch_types=[smem, barriers],
        compiler_params=plgpu.CompilerParams(approx_math=True),
        grid=(heads, tables.num_kv_blocks, batch), grid_names=("heads", "kv_seq", "batch"),
        num_threads=COMPUTE_WGS + 1, thread_name="wg",
    )(q, k, v, d_out, lse2, delta, jnp.asarray(tables.q_ids), jnp.asarray(tables.q_counts), dq_acc)
    dq = (dq_acc[...][:, :, :q_len] * scale).astype(dtype).transpose(0, 2, 1, 3)
    return dq, dk, dv
