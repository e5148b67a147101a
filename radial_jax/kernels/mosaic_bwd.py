"""Block-sparse flash attention backward for Hopper, Pallas Mosaic GPU.

Two designs on the same index tables, both on `emit_pipeline_warp_specialized` (a traced step
count, index maps that read the tables from GMEM; only the memory warpgroup evaluates them):

- split (`MosaicBwdTuning()`; jax's attention_mgpu structure, with tokamax's overlaps): a dq kernel
  per (head, 128-query block, batch) over its key blocks, and a dk/dv kernel per (head,
  128-key block, batch) over its query blocks (the transposed table); two compute warpgroups
  of 64 rows each. It recomputes S and dP in both kernels, seven matmuls per block pair
  instead of five, but needs no atomics and no cross-warpgroup barrier. `MosaicBwdTuning(
  split_pipeline="static")` runs its dk/dv kernel on the fused kernel's hand-written pipeline
  instead (mosaic_pipeline.static_query_pipeline: constant slots).
- fused (`MosaicBwdTuning(fused=True)`, head_dim % 128 == 0 and jax >= 0.11; FlashAttention-3's
  design, in mosaic_bwd_fused.py): the dk/dv kernel also computes dQ_partial = dS K and adds it
  into an f32 accumulator in GMEM with TMA reduce-adds, five matmuls per block pair. The default
  (common.DEFAULT_MOSAIC_BWD) is its lean design in FlashAttention-4's order, 1.08-1.10x the split
  kernels forward+backward on the H200 (benchmarks/NOTES.md, sessions 11-13); where the
  fused kernel cannot run (head_dim 64, jax 0.10) the same tuning runs the split kernels.

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

from radial_jax.kernels.common import (COMPUTE_WGS, DEFAULT_MOSAIC_BWD, LOG2_E, MASK_BLOCK, MosaicBwdTuning,
                                       block_coords, block_grid, seq_multiple, unpad_seq)
from radial_jax.kernels.mosaic_bwd_fused import (DQ_STAGINGS, FUSED_ORDERS, FUSED_PIPELINES, LATE_DV_ORDERS,
                                                 MEETING_ORDERS, fused_kernel)
from radial_jax.kernels.mosaic_pipeline import (ds_t_of, dv_and_ds_t, key_block_kernel, load_ref, p_t_and_dp_t,
                                                query_tile_pipeline, smem_transforms, static_query_pipeline,
                                                static_ring_scratch, store_dk_dv, tile_of_step)
from radial_jax.kernels.tables import BlockTables

__all__ = ["DEFAULT_MOSAIC_BWD", "FUSED_ORDERS", "FUSED_PIPELINES", "MosaicBwdTuning", "dkv_kernel", "dq_kernel",
           "fused_kernel", "mosaic_backward", "row_statistics"]


@functools.partial(jax.jit, static_argnames=("tables", "scale", "tuning"))
def mosaic_backward(q, k, v, out, lse, d_out, d_lse, *, tables: BlockTables, scale: float,
                    tuning: MosaicBwdTuning = DEFAULT_MOSAIC_BWD):
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
    if tuning.stats_in_acc and tuning.fused_order not in LATE_DV_ORDERS:
        raise ValueError("stats_in_acc starts the late-dV fused steps' accumulators at the row statistics: "
                         "set fused=True, fused_order='fa4_late_dv' (or 'private_dq') too")
    if tuning.fused_pipeline not in FUSED_PIPELINES:
        raise ValueError(f"fused_pipeline={tuning.fused_pipeline!r}: choose one of {FUSED_PIPELINES}")
    if tuning.fused_pipeline != "emit" and not (tuning.fused and tuning.fused_order == "fa4_late_dv"):
        raise ValueError(f"fused_pipeline={tuning.fused_pipeline!r} streams the fused kernel's late-dV steps: "
                         "set fused=True, fused_order='fa4_late_dv' too")
    if tuning.fused_dk_from_smem and not (tuning.fused and tuning.fused_order != "deferred_dq"):
        raise ValueError("fused_dk_from_smem reads dK's operand from the fa4 orders' dS^T tile: set fused=True "
                         "and fused_order='fa4', 'fa4_late_dv' or 'private_dq' too")
    if tuning.dv_before_commit and not (tuning.fused and tuning.fused_order in LATE_DV_ORDERS):
        raise ValueError("dv_before_commit moves the late-dV fused orders' dV issue: set fused=True and "
                         "fused_order='fa4_late_dv' (or 'private_dq') too")
    if tuning.ds_rendezvous not in ("mbarrier", "named"):
        raise ValueError(f"ds_rendezvous={tuning.ds_rendezvous!r}: choose 'mbarrier' or 'named'")
    if tuning.ds_rendezvous == "named" and not (tuning.fused and tuning.fused_order in MEETING_ORDERS):
        raise ValueError("ds_rendezvous='named' is where the fa4 orders' warpgroups meet over dS^T: set fused=True "
                         "and fused_order='fa4' or 'fa4_late_dv' too")
    if tuning.dq_copy_next_step and not (tuning.fused and tuning.fused_order in MEETING_ORDERS
                                         and tuning.fused_pipeline == "emit"):
        raise ValueError("dq_copy_next_step defers the fa4 orders' dQ copy by one step of the emit pipeline: set "
                         "fused=True, fused_order='fa4' or 'fa4_late_dv' and fused_pipeline='emit' too")
    if tuning.fused_dq_staging not in DQ_STAGINGS:
        raise ValueError(f"fused_dq_staging={tuning.fused_dq_staging!r}: choose one of {DQ_STAGINGS}")
    if tuning.split_pipeline not in ("emit", "static"):
        raise ValueError(f"split_pipeline={tuning.split_pipeline!r}: choose 'emit' or 'static'")
    if tuning.split_pipeline == "static" and (tuning.block_q_dkv, tuning.max_concurrent_steps) != (64, 2):
        raise ValueError("split_pipeline='static' streams a mask block as two 64-row stages: "
                         "keep block_q_dkv=64 and max_concurrent_steps=2")
    # jax 0.10 cannot pass the fused kernel's accumulator Ref through plgpu.kernel.
    if tuning.fused and q.shape[-1] % (COMPUTE_WGS * 64) == 0 and jax.__version_info__ >= (0, 11):
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


def dq_kernel(q, k, v, d_out, lse2, delta, *, tables: BlockTables, scale: float, tuning: MosaicBwdTuning):
    """The split design's dq: per (head, 128-query block, batch), over its key blocks. -> [B, L, N, D]."""
    import jax.experimental.pallas as pl
    import jax.experimental.pallas.mosaic_gpu as plgpu

    batch, _, heads, head_dim = q.shape
    dtype, t = q.dtype, tuning
    qk_scale = scale * LOG2_E
    tiling, swizzle = smem_transforms(dtype)
    row = plgpu.Layout.WGMMA.reduce(1)
    r_dq = MASK_BLOCK // t.block_kv_dq

    def kernel_dq(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, ids_ref, counts_ref, dq_ref,
                  smem, barriers):
        b, head, q_tile = block_coords(lax.axis_index, heads, "q_seq", t.grid_heads)
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
            lse = load_ref(lse_smem, layout=row)
            delta = load_ref(delta_smem, layout=row)

            def run(dq_acc):
                pipeline((dq_acc, lse, delta))
                return dq_acc[...]

            dq = pl.run_scoped(run, plgpu.ACC((block_q, head_dim), jnp.float32))
            q_smem[...] = (dq * scale).astype(dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(q_smem, dq_ref.at[rows])
            plgpu.wait_smem_to_gmem(0)

        def step(_, k_smem, v_smem, k_consumed, v_consumed, carry):
            w = lax.optimization_barrier(wg) if t.operands_in_step else wg
            q_smem, do_smem = q_smem2.at[w], do_smem2.at[w]
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

        kv_tile = lambda i: tile_of_step(ids_ref, q_tile, i, r_dq)
        spec = plgpu.BlockSpec(block_shape=(block_kv, head_dim), index_map=lambda i: (kv_tile(i), 0),
                               transforms=[tiling, swizzle])
        pipeline = plgpu.emit_pipeline_warp_specialized(
            step, grid=(counts_ref[q_tile] * r_dq,), max_concurrent_steps=t.max_concurrent_steps,
            num_compute_wgs=COMPUTE_WGS, memory_registers=t.memory_registers, wg_axis="wg",
            manual_consumed_barriers=True, compute_context=compute_thread, in_specs=[spec, spec])
        pipeline(k_ref.at[b, :, head, :], v_ref.at[b, :, head, :])

    q_scratch = plgpu.SMEM((COMPUTE_WGS, t.block_q_dq, head_dim), dtype, transforms=(tiling, swizzle))
    row_scratch = plgpu.SMEM((COMPUTE_WGS, t.block_q_dq), jnp.float32)
    grid, grid_names = block_grid(heads, tables.num_q_blocks, batch, "q_seq", t.grid_heads)
    dq = plgpu.kernel(
        kernel_dq,
        out_type=jax.ShapeDtypeStruct(q.shape, dtype),
        scratch_types=[(q_scratch, q_scratch, row_scratch, row_scratch),
                       (plgpu.Barrier(num_barriers=COMPUTE_WGS),) * 4],
        compiler_params=plgpu.CompilerParams(approx_math=True),
        grid=grid, grid_names=grid_names,
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
    tiling, swizzle = smem_transforms(dtype)
    col = plgpu.Layout.WGMMA.reduce(0)
    static = t.split_pipeline == "static"

    def kernel_dkv(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, ids_ref, counts_ref, dk_ref, dv_ref,
                   smem, barriers):
        b, head, kv_block = block_coords(lax.axis_index, heads, "kv_seq", t.grid_heads)
        wg = lax.axis_index("wg")
        k_smem2, v_smem2, *ring = smem  # ring: the static pipeline's q, dO, lse2, delta stages
        kv_loaded, ring_barriers = barriers[:2], barriers[2:]  # the latter: its (full, consumed) barriers
        block_q, block_kv = t.block_q_dkv, t.block_kv_dkv

        def compute_thread(pipeline):
            k_smem, v_smem = k_smem2.at[wg], v_smem2.at[wg]
            kv_base = kv_block * MASK_BLOCK + wg * block_kv
            rows = (b, pl.ds(kv_base, block_kv), head)
            plgpu.copy_gmem_to_smem(k_ref.at[rows], k_smem, kv_loaded[0].at[wg])
            plgpu.copy_gmem_to_smem(v_ref.at[rows], v_smem, kv_loaded[1].at[wg])
            plgpu.barrier_wait(kv_loaded[0].at[wg])
            plgpu.barrier_wait(kv_loaded[1].at[wg])

            def run(dk_acc, dv_acc):
                pipeline((dk_acc, dv_acc))
                return dk_acc[...], dv_acc[...]

            acc = plgpu.ACC((block_kv, head_dim), jnp.float32)
            dk, dv = pl.run_scoped(run, acc, acc)
            store_dk_dv(dk, dv, k_smem, v_smem, dk_ref.at[rows], dv_ref.at[rows], scale=scale)

        def step(_, q_smem, do_smem, lse_smem, delta_smem, q_consumed, do_consumed, lse_consumed,
                 delta_consumed, carry):
            w = lax.optimization_barrier(wg) if t.operands_in_step else wg
            k_smem, v_smem = k_smem2.at[w], v_smem2.at[w]
            dk_acc, dv_acc = carry
            arrive = lambda barrier: barrier is not None and plgpu.barrier_arrive(barrier)

            def compute_s_t(acc):
                plgpu.wgmma(acc, k_smem, q_smem.transpose((1, 0)))
                return acc[...]

            if t.dkv_dp_with_s:  # dP^T runs under the exp2, dV under dS^T's arithmetic
                p_t, dp_t = p_t_and_dp_t(k_smem, v_smem, q_smem, do_smem, lse_smem, lse_consumed, dv_acc, qk_scale,
                                         issue_dv=True)  # fmt: skip
                ds_t = ds_t_of(p_t, dp_t, delta_smem, delta_consumed)
            else:
                s_t = pl.run_scoped(compute_s_t, plgpu.ACC((block_kv, block_q), jnp.float32))
                lse = load_ref(lse_smem, layout=col)
                arrive(lse_consumed)
                p_t = jnp.exp2(s_t * qk_scale - lax.broadcast_in_dim(lse, s_t.shape, [1]))
                ds_t = dv_and_ds_t(p_t, v_smem, do_smem, delta_smem, delta_consumed, dv_acc)
            plgpu.wgmma(dk_acc, ds_t.astype(dtype), q_smem)
            plgpu.wgmma_wait(1)
            arrive(do_consumed)
            plgpu.wgmma_wait(0)
            arrive(q_consumed)
            return dk_acc, dv_acc

        def static_step(stage, q_block, tiles, release, carry):
            # One release of the stage's four tiles, after dK (their last reader) retired.
            step(None, *tiles, release, None, None, None, carry)

        refs = (q_ref, do_ref, lse_ref, delta_ref)
        if static:
            static_query_pipeline(static_step, compute_thread, refs, (*ring, *ring_barriers), ids_ref, counts_ref,
                                   (b, head, kv_block), block_q, t.memory_registers)  # fmt: skip
        else:
            query_tile_pipeline(step, compute_thread, refs, ids_ref, counts_ref, (b, head, kv_block), block_q,
                                 t.max_concurrent_steps, t.memory_registers)  # fmt: skip

    kv_scratch = plgpu.SMEM((COMPUTE_WGS, t.block_kv_dkv, head_dim), dtype, transforms=(tiling, swizzle))
    smem, barriers = (kv_scratch, kv_scratch), (plgpu.Barrier(num_barriers=COMPUTE_WGS),) * 2
    if static:  # the query ring, one stage per 64-row half of a mask block
        ring_smem, ring_barriers = static_ring_scratch(head_dim, dtype, t.block_q_dkv)
        smem, barriers = smem + ring_smem, barriers + ring_barriers
    launch = key_block_kernel(kernel_dkv, k, [smem, barriers], heads=heads, batch=batch,
                              num_kv_blocks=tables.num_kv_blocks, grid_heads=t.grid_heads,
                              auto_barriers=not t.no_auto_barriers)  # fmt: skip
    return launch(q, k, v, d_out, lse2, delta, jnp.asarray(tables.q_ids), jnp.asarray(tables.q_counts))
