"""What the Mosaic backward's kernels share: the wgmma operands' shared-memory transforms, a
whole-ref load that both jax versions take, and for the key-block kernels (the split design's
dk/dv kernel in mosaic_bwd.py, the fused kernel in mosaic_bwd_fused.py) their dK/dV epilogue and
their query-side pipelines: one on `emit_pipeline_warp_specialized`, one written by hand with
constant slots.
"""

import functools

import jax.numpy as jnp
from jax import lax

from radial_jax.kernels.common import COMPUTE_WGS, MASK_BLOCK, block_grid

__all__ = ["ds_t_of", "dv_and_ds_t", "key_block_kernel", "load_ref", "p_t_and_dp_t", "query_tile_pipeline",
           "smem_transforms", "static_query_pipeline", "static_ring_scratch", "store_dk_dv", "tile_of_step"]


def smem_transforms(dtype):
    """(tiling, swizzle) of a wgmma operand in shared memory: 128-byte rows, swizzled."""
    import jax.experimental.pallas.mosaic_gpu as plgpu

    return plgpu.TilingTransform((8, 128 // jnp.dtype(dtype).itemsize)), plgpu.SwizzleTransform(128)


def load_ref(ref, *, layout):
    """plgpu.load of a whole ref: jax 0.10 requires an index argument, 0.11 deprecates it."""
    import jax.experimental.pallas.mosaic_gpu as plgpu

    try:
        return plgpu.load(ref, layout=layout)
    except TypeError:
        return plgpu.load(ref, None, layout=layout)


def store_dk_dv(dk, dv, k_smem, v_smem, dk_ref, dv_ref, *, scale: float):
    """The key-block kernels' epilogue: dk * scale and dv, cast to the inputs' dtype, through this
    warpgroup's K and V tiles in SMEM (free once its last wgmma retired) to dk_ref, dv_ref by TMA.

    dk, dv: [block_kv, D] f32 in registers; k_smem, v_smem: [block_kv, D] SMEM; dk_ref, dv_ref: the
    GMEM rows they go to.
    """
    import jax.experimental.pallas.mosaic_gpu as plgpu

    k_smem[...] = (dk * scale).astype(k_smem.dtype)
    v_smem[...] = dv.astype(v_smem.dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(k_smem, dk_ref, commit_group=False)
    plgpu.copy_smem_to_gmem(v_smem, dv_ref, commit_group=False)
    plgpu.commit_smem_to_gmem_group()
    plgpu.wait_smem_to_gmem(0)


def key_block_kernel(body, k, scratch, *, heads: int, batch: int, num_kv_blocks: int, grid_heads: int | None,
                     auto_barriers: bool = True):
    """plgpu.kernel of a key-block kernel (the split dk/dv kernel, the fused kernel): one CTA per
    (head, 128-key block, batch) in block_grid's launch order, two compute warpgroups and a memory
    warpgroup ("wg"), outputs (dk, dv) shaped and typed as k [B, M, N, D]; scratch: [SMEM, barriers].
    auto_barriers=False: MosaicBwdTuning.no_auto_barriers."""
    import jax
    import jax.experimental.pallas.mosaic_gpu as plgpu

    grid, grid_names = block_grid(heads, num_kv_blocks, batch, "kv_seq", grid_heads)
    params = plgpu.CompilerParams(approx_math=True, unsafe_no_auto_barriers=not auto_barriers)
    return plgpu.kernel(body, out_type=[jax.ShapeDtypeStruct(k.shape, k.dtype)] * 2, scratch_types=scratch,
                        compiler_params=params, grid=grid, grid_names=grid_names, num_threads=COMPUTE_WGS + 1,
                        thread_name="wg")  # fmt: skip


def dv_and_ds_t(p_t, v_smem, do_smem, delta_smem, delta_consumed, dv_acc):
    """One key-block step's middle: issues dP^T = V dO^T and dV += P^T dO, waits for dP^T only (dV may
    still run), and returns dS^T = P^T (dP^T - delta), f32.

    p_t: [block_kv, block_q] f32 (its cast is dV's register operand); v_smem: [block_kv, D];
    do_smem: [block_q, D]; delta_smem: [block_q], released on delta_consumed once read (None: the
    caller releases it later, as the static pipeline's one release a stage does).
    """
    import jax.experimental.pallas as pl
    import jax.experimental.pallas.mosaic_gpu as plgpu

    def compute_dp_t(acc):
        plgpu.wgmma(acc, v_smem, do_smem.transpose((1, 0)))
        plgpu.wgmma(dv_acc, p_t.astype(do_smem.dtype), do_smem)
        return plgpu.wgmma_accumulator_load(acc, wait_n=1)  # dP^T; dV may still run

    dp_t = pl.run_scoped(compute_dp_t, plgpu.ACC(p_t.shape, jnp.float32))
    return ds_t_of(p_t, dp_t, delta_smem, delta_consumed)


def ds_t_of(p_t, dp_t, delta_smem, delta_consumed):
    """dS^T = P^T (dP^T - delta), f32 [block_kv, block_q]: delta [block_q] read from delta_smem, which is
    released on delta_consumed once read (None: the caller releases it later)."""
    import jax.experimental.pallas.mosaic_gpu as plgpu

    delta = load_ref(delta_smem, layout=plgpu.Layout.WGMMA.reduce(0))
    if delta_consumed is not None:
        plgpu.barrier_arrive(delta_consumed)
    return p_t * (dp_t - lax.broadcast_in_dim(delta, dp_t.shape, [1]))


def p_t_and_dp_t(k_smem, v_smem, q_smem, do_smem, lse_smem, lse_consumed, dv_acc, qk_scale: float, *, issue_dv: bool):
    """One key-block step's head with dP^T beside S^T: issues S^T = K Q^T and dP^T = V dO^T together,
    waits for S^T only and forms P^T = 2^(S^T qk_scale - lse2) while dP^T runs; then, with issue_dv,
    issues dV += P^T dO and waits for dP^T (dV may still run), else waits for dP^T alone. Returns
    (p_t, dp_t): [block_kv, block_q] f32.

    k_smem, v_smem: [block_kv, D]; q_smem, do_smem: [block_q, D]; lse_smem: [block_q], released on
    lse_consumed once read (None: the caller releases it).
    """
    import jax.experimental.pallas as pl
    import jax.experimental.pallas.mosaic_gpu as plgpu

    def compute(s_acc, dp_acc):
        plgpu.wgmma(s_acc, k_smem, q_smem.transpose((1, 0)))
        plgpu.wgmma(dp_acc, v_smem, do_smem.transpose((1, 0)))
        s_t = plgpu.wgmma_accumulator_load(s_acc, wait_n=1)  # S^T; dP^T may still run
        lse = load_ref(lse_smem, layout=plgpu.Layout.WGMMA.reduce(0))
        if lse_consumed is not None:
            plgpu.barrier_arrive(lse_consumed)
        p_t = jnp.exp2(s_t * qk_scale - lax.broadcast_in_dim(lse, s_t.shape, [1]))
        if not issue_dv:
            return p_t, plgpu.wgmma_accumulator_load(dp_acc, wait_n=0)
        plgpu.wgmma(dv_acc, p_t.astype(do_smem.dtype), do_smem)
        return p_t, plgpu.wgmma_accumulator_load(dp_acc, wait_n=1)  # dP^T; dV may still run

    acc_t = plgpu.ACC((k_smem.shape[0], q_smem.shape[0]), jnp.float32)
    return pl.run_scoped(compute, acc_t, acc_t)


def tile_of_step(ids_ref, row, i, r):
    """The pipeline tile that step i of table row `row` visits: tiles are 1/r of a mask block."""
    return ids_ref[row, i // r] * r + lax.rem(i, jnp.int32(r))


def query_tile_pipeline(step, compute_thread, refs, ids_ref, counts_ref, where, block_q: int, stages: int,
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
    tile = lambda i: tile_of_step(ids_ref, kv_block, i, r)
    seq_spec = plgpu.BlockSpec(block_shape=(block_q, q_ref.shape[-1]), index_map=lambda i: (tile(i), 0),
                               transforms=smem_transforms(q_ref.dtype))
    row_spec = plgpu.BlockSpec(block_shape=(block_q,), index_map=lambda i: (tile(i),))
    pipeline = plgpu.emit_pipeline_warp_specialized(
        step, grid=(counts_ref[kv_block] * r,), max_concurrent_steps=stages, num_compute_wgs=COMPUTE_WGS,
        memory_registers=memory_registers, wg_axis="wg", manual_consumed_barriers=True, compute_context=compute_thread,
        in_specs=[seq_spec, seq_spec, row_spec, row_spec])
    pipeline(q_ref.at[b, :, head, :], do_ref.at[b, :, head, :], lse_ref.at[b, head, :], delta_ref.at[b, head, :])


def static_ring_scratch(head_dim: int, dtype, tile_rows: int) -> tuple[tuple, tuple]:
    """(SMEM, barriers) that static_query_pipeline's `ring` takes: the q and dO tile rings [2 * tile_rows,
    head_dim] and the lse2 and delta rings [2 * tile_rows], one stage per half of a mask block; each
    stage's full barrier (its four TMA loads) and consumed barrier (both compute warpgroups)."""
    import jax.experimental.pallas.mosaic_gpu as plgpu

    stages = MASK_BLOCK // tile_rows
    seq_ring = plgpu.SMEM((stages * tile_rows, head_dim), dtype, transforms=smem_transforms(dtype))
    row_ring = plgpu.SMEM((stages * tile_rows,), jnp.float32)
    return ((seq_ring, seq_ring, row_ring, row_ring),
            (plgpu.Barrier(num_arrivals=4, num_barriers=stages),
             plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=stages)))  # fmt: skip


def static_query_pipeline(step, compute_thread, refs, ring, ids_ref, counts_ref, where, tile_rows: int,
                           memory_registers: int):
    """The fused kernel's hand-written query pipeline (MosaicBwdTuning.fused_pipeline="static").

    One loop iteration j visits query block ids[kv_block, j] of the transposed table as two 64-row
    steps unrolled here: step A on ring stage 0, step B on stage 1, so the body's buffers, barriers
    and slots are constants and the one dynamic value an iteration is the block index (one table
    read). step(stage, q_block, (q, dO, lse2, delta) tiles of the stage, the stage's consumed
    barrier, carry) runs one step and arrives on that barrier once it has read the tiles for the
    last time; compute_thread(pipeline) as in query_tile_pipeline. Lists of COMPUTE_WGS steps and
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
