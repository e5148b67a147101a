"""The fused Hopper backward (`MosaicBwdTuning(fused=True)`, head_dim % 128 == 0; FlashAttention-3's
design), one kernel per (head, 128-key block, batch) beside mosaic_bwd.py's split design:

- The split design's dk/dv kernel that also computes dQ_partial = dS K. Each warpgroup stores its dS^T to shared
  memory, the two meet at a barrier, and warpgroup w computes head-dim half w of the partial
  dQ from all 128 keys one step later (so the two need not run in lockstep), adding it into an
  f32 dQ accumulator in GMEM with a TMA reduce-add; a cast turns it into dq.
  `MosaicBwdTuning.fused_order` picks the order inside a step: "deferred_dq" (the above),
  "fa4", FlashAttention-4's sm90 order (dQ of the step's own dS^T, issued beside dK and stored
  while dK runs; the warpgroups meet every step), "fa4_late_dv" (the same, dV issued where FA4
  issues it) or "private_dq" (each warpgroup reduces dS_w K_w over its own keys: no meeting), see
  `fused_kernel`. On the H200 every order ran slower than the split kernels (0.82-0.97x; the
  fused step spills and issues ~600 instructions per warp beside its 32 wgmmas, NOTES session 6),
  until MosaicBwdTuning.operands_in_step stopped LLVM hoisting the fixed operands' descriptors (and
  ptxas spilling them): the lean fa4_late_dv design then ran 1.06-1.08x the split kernels (session 11),
  and with dQ staged in swizzled tiles it became the library's backward (common.DEFAULT_MOSAIC_BWD, session 12);
  since session 13 with dV issued before dS^T's fence and dQ's accumulator kept in tile order.
  `MosaicBwdTuning.fused_pipeline="static"` runs the fa4_late_dv fused steps on a hand-written
  pipeline instead (`mosaic_pipeline.static_query_pipeline`: a mask block per iteration, two steps on constant
  slots; "static_wg" also emits each compute warpgroup's code apart), built and lowered on the CPU.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax

from radial_jax.kernels.common import COMPUTE_WGS, LOG2_E, MASK_BLOCK, MosaicBwdTuning, block_coords
from radial_jax.kernels.mosaic_pipeline import (ds_t_of, dv_and_ds_t, key_block_kernel, load_ref, p_t_and_dp_t,
                                                query_tile_pipeline, smem_transforms, static_query_pipeline,
                                                static_ring_scratch, store_dk_dv, tile_of_step)
from radial_jax.kernels.tables import BlockTables

FUSED_ORDERS = ("deferred_dq", "fa4", "fa4_late_dv", "private_dq")  # MosaicBwdTuning.fused_order's choices
FUSED_PIPELINES = ("emit", "static", "static_wg")  # MosaicBwdTuning.fused_pipeline's choices
LATE_DV_ORDERS = ("fa4_late_dv", "private_dq")  # the orders that issue dV after dS^T's store
MEETING_ORDERS = ("fa4", "fa4_late_dv")  # the in-step dQ orders whose warpgroups meet over each step's dS^T
DQ_STAGINGS = ("swizzle128", "tiles8x8", "tiles8x8_flat")  # MosaicBwdTuning.fused_dq_staging's choices

__all__ = ["DQ_STAGINGS", "FUSED_ORDERS", "FUSED_PIPELINES", "LATE_DV_ORDERS", "MEETING_ORDERS", "fused_kernel",
           "untile_dq"]


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
    in_step_dq = tuning.fused_order != "deferred_dq"  # step_fa4: each step reduces its own dQ
    late_dv = tuning.fused_order in LATE_DV_ORDERS
    private_dq = tuning.fused_order == "private_dq"
    named_rendezvous = tuning.ds_rendezvous == "named"
    stats_in_acc = tuning.stats_in_acc
    if stats_in_acc:  # the accumulators' starting values, formed once here rather than in every step
        lse2, delta = lse2 * (-1.0 / qk_scale), -delta  # the same f32 product, so the same bits
    static_wg = tuning.fused_pipeline == "static_wg"
    static = tuning.fused_pipeline == "static" or static_wg
    assert not static or r == 2, "the static pipeline's two stages are the two query tiles of a mask block"

    tiling, swizzle = smem_transforms(dtype)
    plain_tiles = (plgpu.TilingTransform((8, 8)),)
    dq_staging = {"swizzle128": (plgpu.TilingTransform((8, 32)), swizzle), "tiles8x8": plain_tiles,
                  "tiles8x8_flat": plain_tiles}[tuning.fused_dq_staging]  # fmt: skip
    # "tiles8x8_flat": dQ's accumulator in GMEM in the staging tiles' own order, [B, N, row tiles, column
    # tiles, 64] (an 8x8 tile's 64 values contiguous), so the TMA copies each warpgroup's staging as it lies:
    # rows of 256 bytes, where the tiled copy into [B, N, rows, D] reads 32-byte rows. The epilogue's
    # transpose puts the rows back in order.
    flat_dq = tuning.fused_dq_staging == "tiles8x8_flat"
    col = plgpu.Layout.WGMMA.reduce(0)
    bcast_col = lambda x, shape: lax.broadcast_in_dim(x, shape, [1])

    def kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, ids_ref, counts_ref, dq_acc_ref, dk_ref, dv_ref,
               smem, barriers):
        b, head, kv_block = block_coords(lax.axis_index, heads, "kv_seq", tuning.grid_heads)
        wg = lax.axis_index("wg")
        k_smem, v_smem2, ds_smem, dq_smem2, *ring = smem  # ring: the static pipeline's q, dO, lse2, delta
        # tiles8x8_flat: (the staging as 8x8 tiles, the same bytes as [.., row tiles, column tiles, 64])
        dq_smem2, dq_flat2 = dq_smem2 if flat_dq else (dq_smem2, None)
        k_loaded, v_loaded, ds_ready, done, *ring_barriers = barriers  # its (full, consumed) barriers

        def warpgroup(wg):
            """(compute_thread, step, step_fa4, static_step) of compute warpgroup wg: traced (one code for both
            warpgroups) or, with fused_pipeline="static_wg", a Python int (each its own code, whose
            shared-memory addresses are all constants)."""
            def fixed_operands(w):
                """(rows of w, its K rows, its V rows, all 128 keys' K at its dQ columns) in SMEM."""
                own = pl.ds(w * block_kv, block_kv)
                v_own = v_smem2.at[own] if static_wg else v_smem2.at[w]  # static_wg: [2 * 64, D], a static slice
                return own, k_smem.at[own], v_own, k_smem.at[:, pl.ds(w * d_half, d_half)]

            own, k_own, v_own, k_cols = fixed_operands(wg)
            dq_smem = dq_smem2.at[wg]

            def stage_dq(dq, slot):
                """Stores this warpgroup's dQ partial (registers) into its SMEM staging slot `slot`, once the
                TMA read of the slot's use before last is done."""
                plgpu.wait_smem_to_gmem(1, wait_read_only=True)  # this slot's copy of two uses ago
                dq_smem.at[slot][...] = dq

            def copy_dq(i, slot, predicate=None, *, half=None, tile=None):
                """Reduce-adds staging slot `slot`, step i's dQ partial (head-dim half `half`, by default the
                warpgroup's own), into the f32 accumulator in GMEM by TMA. The slot's stores must be fenced for
                the async proxy and the warpgroup past a barrier since. tile: () -> the query tile of the step
                (by default the table's tile of step i)."""
                half = wg if half is None else half
                row = (q_tile(i) if tile is None else tile()) * block_q
                if flat_dq:  # written through the tiled view, copied through the flat one
                    tiles = (pl.ds(row // 8, block_q // 8), pl.ds(half * (d_half // 8), d_half // 8))
                    plgpu.copy_smem_to_gmem(dq_flat2.at[wg, slot], dq_acc_ref.at[b, head, *tiles], predicate,
                                            reduction_op="add")
                    return
                dst = dq_acc_ref.at[b, head, pl.ds(row, block_q), pl.ds(half * d_half, d_half)]
                plgpu.copy_smem_to_gmem(dq_smem.at[slot], dst, predicate, reduction_op="add")

            def add_dq(dq, i, predicate=None, *, half=None, slot=None, tile=None):
                """stage_dq, the fence and barrier that publish it (commit_smem), then copy_dq: step i's dQ
                partial added to the accumulator now, through slot `slot` (by default i % 2)."""
                slot = lax.rem(i, jnp.int32(2)) if slot is None else slot
                stage_dq(dq, slot)
                plgpu.commit_smem()
                copy_dq(i, slot, predicate, half=half, tile=tile)

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
                if not in_step_dq:  # the deferred order's last dQ, after the loop
                    steps = counts_ref[kv_block] * r

                    @pl.when(steps > 0)
                    def _():  # the last step's dQ, deferred like every other (see step)
                        last = steps - 1
                        plgpu.barrier_wait(ds_ready.at[lax.rem(last, jnp.int32(2))])

                        def compute_dq(acc):
                            plgpu.wgmma(acc, ds_smem.at[lax.rem(last, jnp.int32(2))].transpose((1, 0)), k_cols)
                            return acc[...]

                        add_dq(pl.run_scoped(compute_dq, plgpu.ACC((block_q, d_half), jnp.float32)), last)

                if tuning.dq_copy_next_step:
                    steps = counts_ref[kv_block] * r

                    @pl.when(steps > 0)
                    def _():  # the last step's dQ partial: no next step's fence publishes it
                        plgpu.commit_smem()
                        copy_dq(steps - 1, lax.rem(steps - 1, jnp.int32(2)))

                # The other warpgroup may still read this one's K rows for its last dQ.
                plgpu.barrier_arrive(done)
                plgpu.barrier_wait(done)
                store_dk_dv(dk, dv, k_own, v_own, dk_ref.at[rows], dv_ref.at[rows], scale=scale)

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
                    lse = load_ref(lse_smem, layout=col)
                    plgpu.barrier_arrive(lse_consumed)
                    p_t = jnp.exp2(s_t * qk_scale - bcast_col(lse, s_t.shape))
                    return p_t, dq_acc[...]

                p_t, dq_prev = pl.run_scoped(compute_p_and_previous_dq, plgpu.ACC((block_kv, block_q), jnp.float32),
                                             plgpu.ACC((block_q, d_half), jnp.float32))
                add_dq(dq_prev, jnp.maximum(i - 1, 0), predicate=i > 0)

                ds_t = dv_and_ds_t(p_t, v_own, do_smem, delta_smem, delta_consumed, dv_acc).astype(dtype)
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
                if tuning.dq_copy_next_step:
                    # Step i only stages its dQ partial; the fence after step i + 1's dS^T store publishes
                    # it (a thread's fence covers all its earlier SMEM writes), and step i + 1 copies it.
                    add = lambda dq: stage_dq(dq, lax.rem(i, jnp.int32(2)))  # noqa: E731
                    copy_previous = lambda: copy_dq(jnp.maximum(i - 1, 0), lax.rem(i + 1, jnp.int32(2)),  # noqa: E731
                                                    i > 0)
                else:
                    add, copy_previous = functools.partial(add_dq, i=i), None
                fa4_body(lax.rem(i, jnp.int32(2)), add, bufs, consumed, dk_acc, dv_acc, copy_previous)
                return dk_acc, dv_acc

            def fa4_body(slot, add, bufs, consumed, dk_acc, dv_acc, copy_previous=None):
                """One 64-query step of the fa4 orders on slot `slot` of dS^T (an int in the static pipeline).

                add(dq, **add_dq's keywords): reduce-adds (or with dq_copy_next_step stages) a dQ partial of
                this step; bufs: the step's (q, dO, lse2, delta) tiles in SMEM; consumed: their release
                barriers (None: not released here); copy_previous: () -> the previous step's staged dQ partial
                copied, once this step's fence and barrier have published it (dq_copy_next_step).
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
                own, k_own, v_own, k_cols = fixed_operands(
                    lax.optimization_barrier(wg) if tuning.operands_in_step and not static_wg else wg)

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
                    lse = load_ref(lse_smem, layout=col)
                    arrive(lse_consumed)
                    delta = load_ref(delta_smem, layout=col)
                    arrive(delta_consumed)
                    # lse and delta arrive as -lse2 / qk_scale and -delta (see the top): 16 multiplies
                    # and 16 sign flips a step fewer (ptxas 13.0 SASS, NOTES session 10).
                    inits = (plgpu.ACC.init(bcast_col(lse, shape_t)), plgpu.ACC.init(bcast_col(delta, shape_t)),
                             jnp.zeros(shape_t, jnp.float32))
                    _, dp_minus_delta, p_t = pl.run_state(compute_p_and_dp_from_stats)(inits)
                    ds_t = p_t * dp_minus_delta
                else:
                    p_t, dp_t = p_t_and_dp_t(k_own, v_own, q_smem, do_smem, lse_smem, lse_consumed, dv_acc, qk_scale,
                                             issue_dv=not late_dv)  # fmt: skip
                    ds_t = ds_t_of(p_t, dp_t, delta_smem, delta_consumed)
                ds_t = ds_t.astype(dtype)
                ds_smem.at[slot, own][...] = ds_t
                # dV reads P^T's registers and dO, neither of them the rows just stored, so it may be issued
                # before the fence and barrier that publish them (dv_before_commit, FA4's place exactly).
                issue_dv = lambda: plgpu.wgmma(dv_acc, p_t.astype(dtype), do_smem)  # noqa: E731
                if late_dv and tuning.dv_before_commit:
                    issue_dv()
                if named_rendezvous:  # the fence alone: the 256-thread barrier below also orders this warpgroup
                    _fence_smem_for_async_proxy()
                else:
                    plgpu.commit_smem()
                # dK's A operand: dS^T's registers, or the rows just stored (visible to the wgmma's async
                # proxy since the fence and barrier; the slot is rewritten two steps on, after dK of this step
                # retired).
                ds_operand = ds_smem.at[slot, own] if tuning.fused_dk_from_smem else ds_t
                if late_dv and not tuning.dv_before_commit:  # P^T's registers not live through dS^T's arithmetic
                    issue_dv()
                if private_dq:
                    # Each warpgroup adds its own keys' share of dQ, dS_w K_w ([64 q, 128 d] over its
                    # 64 keys), in two head-dim halves: it reads only its own dS^T rows, so there is no
                    # rendezvous and the warpgroups drift apart (one's softmax under the other's
                    # wgmmas) at the price of twice the TMA reduce-adds. Its dS^T rows' last reader is
                    # its own dQ of step i - 2, retired in that step.
                    ds_own = ds_smem.at[slot, own].transpose((1, 0))  # dS_w: [block_q, block_kv]

                    def compute_dq_halves(dq_acc):
                        plgpu.wgmma(dq_acc, ds_own, k_own.at[:, pl.ds(0, d_half)])
                        plgpu.wgmma(dk_acc, ds_operand, q_smem)
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
                if named_rendezvous:
                    _sync_compute_warpgroups()  # the other warpgroup's half of dS^T stored
                else:
                    plgpu.barrier_arrive(ds_ready.at[slot])
                    plgpu.barrier_wait(ds_ready.at[slot])  # the other warpgroup's half of dS^T stored
                # (waited for before dQ's scope opens: its zeroed accumulator then meets the wgmma with
                # no wait between, and ptxas folds the zeros into the first wgmma, as in the forward's
                # overlap_waits_first; after the wait, 16 CS2R a step)

                def compute_dq_issue_dk(dq_acc):
                    plgpu.wgmma(dq_acc, ds_smem.at[slot].transpose((1, 0)), k_cols)
                    plgpu.wgmma(dk_acc, ds_operand, q_smem)
                    if copy_previous is not None:  # the tensor cores have dQ and dK queued first
                        copy_previous()
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

        q_tile = lambda i: tile_of_step(ids_ref, kv_block, i, r)
        refs = (q_ref, do_ref, lse_ref, delta_ref)
        if static_wg:  # one code per warpgroup, chosen by a branch on wg around each
            per_wg = [warpgroup(w) for w in range(COMPUTE_WGS)]
            static_query_pipeline([w[3] for w in per_wg], [w[0] for w in per_wg], refs, (*ring, *ring_barriers),
                                   ids_ref, counts_ref, (b, head, kv_block), block_q, tuning.memory_registers)
            return
        compute_thread, step, step_fa4, static_step = warpgroup(wg)
        if static:
            static_query_pipeline(static_step, compute_thread, refs, (*ring, *ring_barriers), ids_ref, counts_ref,
                                   (b, head, kv_block), block_q, tuning.memory_registers)  # fmt: skip
        else:
            query_tile_pipeline(step_fa4 if in_step_dq else step, compute_thread, refs, ids_ref, counts_ref,
                                 (b, head, kv_block), block_q, tuning.max_concurrent_steps, tuning.memory_registers)

    staging = plgpu.SMEM((COMPUTE_WGS, 2, block_q, d_half), jnp.float32, transforms=dq_staging)
    if flat_dq:  # Mosaic lays a tiled ref out tile by tile: [.., row tiles, column tiles, 8, 8]
        staging = plgpu.RefUnion(staging, plgpu.SMEM((COMPUTE_WGS, 2, block_q // 8, d_half // 8, 64), jnp.float32))
    smem = (
        plgpu.SMEM((COMPUTE_WGS * block_kv, head_dim), dtype, transforms=(tiling, swizzle)),  # K, both halves
        plgpu.SMEM((COMPUTE_WGS * block_kv, head_dim) if static_wg else (COMPUTE_WGS, block_kv, head_dim), dtype,
                   transforms=(tiling, swizzle)),  # V, per warpgroup (static_wg: by row slices, see warpgroup)
        plgpu.SMEM((2, COMPUTE_WGS * block_kv, block_q), dtype, transforms=(tiling, swizzle)),  # dS^T, 2 slots
        staging,  # dQ partials
    )
    barriers = (
        plgpu.Barrier(num_barriers=COMPUTE_WGS),  # K loaded
        plgpu.Barrier(num_barriers=COMPUTE_WGS),  # V loaded
        plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=2),  # both dS^T halves stored, per slot
        plgpu.Barrier(num_arrivals=COMPUTE_WGS),  # both warpgroups done with K
    )
    if static:  # the query ring, one stage per 64-row half of a mask block
        ring_smem, ring_barriers = static_ring_scratch(head_dim, dtype, block_q)
        smem, barriers = smem + ring_smem, barriers + ring_barriers
    # The accumulator must start at zero and plgpu.kernel has no input/output aliasing: pass a Ref.
    acc_shape = (batch, heads, padded // 8, head_dim // 8, 64) if flat_dq else (batch, heads, padded, head_dim)
    dq_acc = jax.new_ref(jnp.zeros(acc_shape, jnp.float32))
    launch = key_block_kernel(kernel, k, [smem, barriers], heads=heads, batch=batch,
                              num_kv_blocks=tables.num_kv_blocks, grid_heads=tuning.grid_heads,
                              auto_barriers=not tuning.no_auto_barriers)  # fmt: skip
    dk, dv = launch(q, k, v, d_out, lse2, delta, jnp.asarray(tables.q_ids), jnp.asarray(tables.q_counts), dq_acc)
    acc = untile_dq(dq_acc[...]) if flat_dq else dq_acc[...]
    dq = (acc[:, :, :q_len] * scale).astype(dtype).transpose(0, 2, 1, 3)
    return dq, dk, dv


# Hardware barrier 0 is gpu.barrier's and 1-3 are Mosaic's per-warpgroup bar.sync (warpgroup index + 1).
_DS_BARRIER = 4


def _fence_smem_for_async_proxy():
    """This thread's shared-memory writes made visible to the async proxy (wgmma, TMA): commit_smem's
    fence without its warpgroup barrier (ptxas: MEMBAR.ALL.CTA, FENCE.VIEW.ASYNC.S)."""
    import jax.experimental.pallas.mosaic_gpu as plgpu
    from jaxlib.mlir.dialects import nvvm

    @plgpu.inline_mgpu()
    def fence(_):
        nvvm.fence_proxy(nvvm.ProxyKind.async_shared, space=nvvm.SharedSpace.shared_cta)

    fence()


def _sync_compute_warpgroups():
    """bar.sync of both compute warpgroups (256 threads) on _DS_BARRIER: each waits until the other has
    come too, and their earlier fenced SMEM writes are then visible to each other's wgmmas
    (MosaicBwdTuning.ds_rendezvous="named"; one BAR.SYNC in the SASS)."""
    import jax.experimental.mosaic.gpu as mgpu
    import jax.experimental.pallas.mosaic_gpu as plgpu

    @plgpu.inline_mgpu()
    def sync(_):  # convergent: LLVM must not move it under a branch some threads skip
        mgpu.utils.inline_ptx(f"bar.sync {_DS_BARRIER}, {COMPUTE_WGS * 128};", has_side_effects=True, convergent=True)

    sync()


def untile_dq(acc):
    """[B, N, rows / 8, D / 8, 64] (each 8x8 tile's values contiguous, fused_dq_staging="tiles8x8_flat")
    -> [B, N, rows, D]."""
    batch, heads, row_tiles, col_tiles, _ = acc.shape
    tiles = acc.reshape(batch, heads, row_tiles, col_tiles, 8, 8)
    return tiles.transpose(0, 1, 2, 4, 3, 5).reshape(batch, heads, row_tiles * 8, col_tiles * 8)
