"""Radial block-sparse attention vs dense baselines on one GPU, side by side in one run.

    python benchmarks/attention.py [--shapes ...] [--decay F] [--variants ...] [--backward [--breakdown]]
                                   [--batch N] [--no-torch] [--out FILE]

Times, bf16, head_dim 128, batch 1, Wan's real token counts (ragged last block): ours with the
radial mask (decay 1.0 unless --decay), ours with an all-on mask, (on Hopper) ours with other
kernel designs beside the default (--variants: forward ones such as the lazy rescale or FA3's
intra-warpgroup overlap, backward ones with --backward such as the fused kernel or a 128-key dq
tile; each one `KernelTuning` through the same API; the default is timed again after them to show
the drift), cuDNN dense via jax.nn.dot_product_attention(implementation="cudnn"), and where torch
with CUDA is importable (a child process), FlexAttention and FlashAttention-4 (benchmarks/fa4.py,
where installed) with the same block mask, and SDPA. TFLOP/s count 4*pairs*D*H for the forward on
the computed blocks only (ragged edge blocks exactly), and 3.5x that for forward+backward. Writes
JSON with the device, the command and the date.
"""

import argparse
import dataclasses
import datetime
import json
import os
import statistics
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # leave memory for torch

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # benchmarks/ is no package: fa4.py beside this
import fa4  # noqa: E402

from radial_jax import attention_flops, block_density, computed_token_pairs, radial_block_mask  # noqa: E402
from radial_jax.kernels import (DEFAULT_MOSAIC_BWD, DEFAULT_MOSAIC_FWD, GRID_MOSAIC_FWD, LAZY_MOSAIC_FWD, KernelTuning,  # noqa: E402
                                MosaicBwdTuning, MosaicTuning, block_sparse_attention)
from radial_jax.kernels.mosaic_fwd import STAGE_ABLATIONS  # noqa: E402
from radial_jax.kernels.tables import block_tables  # noqa: E402

SHAPES = {**fa4.SHAPES, "tiny": (3, 100, 2)}  # tiny: --dry-run only (the Triton twin in interpret mode, CPU)
FWD_SHAPES = "1.3b-480p-81f,1.3b-480p-161f,14b-720p-81f,14b-720p-161f"  # issue 16's table
BWD_SHAPES = "1.3b-480p-81f,1.3b-480p-161f,14b-720p-81f"
HEAD_DIM, BWD_FLOP_FACTOR = fa4.HEAD_DIM, fa4.BWD_FLOP_FACTOR


def median_seconds(fn, iters: int, settle_s: float, warmup: int = 2, batch: int = 1) -> float:
    """Returns the median wall time of one call of fn over `iters` samples, after at least `warmup` calls
    and `settle_s` seconds of back-to-back calls (the power-capped clock; fa4.SETTLE_S says why).

    batch 1: each sample is one call, blocked on (its dispatch and the wait for the result count, as
    they do where a caller waits on each attention call). batch N: a sample is N calls dispatched back
    to back and blocked on once, divided by N: the GPU never idles between them, as in a DiT step,
    and the host's share vanishes (fa4.median_ms times the torch baselines on the same host clock)."""
    start = time.perf_counter()
    for i in range(10**6):
        jax.block_until_ready(fn())
        if i + 1 >= warmup and time.perf_counter() - start >= settle_s:
            break
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        for _ in range(batch - 1):
            fn()  # one stream: blocking on the last call waits for all
        jax.block_until_ready(fn())
        times.append((time.perf_counter() - start) / batch)
    return statistics.median(times)


def jax_case(q, k, v, mask, backward: bool, backend: str | None, tuning: KernelTuning | None = None):
    """Returns a no-argument callable running ours (forward, or value_and_grad wrt q, k, v)."""
    return _wrap(_attend(mask, backend, tuning), q, k, v, backward)


def jax_fn(mask, backward: bool, backend: str | None, tuning: KernelTuning | None = None):
    """The jitted function of (q, k, v) that jax_case calls: for ahead-of-time lowering and compiling."""
    return _jitted(_attend(mask, backend, tuning), backward)


def _attend(mask, backend, tuning):
    return lambda q, k, v: block_sparse_attention(q, k, v, mask, block_size=128, backend=backend, tuning=tuning)


def backward_variants() -> dict[str, KernelTuning]:
    """{case name: KernelTuning} of the Mosaic backward designs --variants can time beside the default
    (DEFAULT_MOSAIC_BWD, the lean fused design with its operands taken in each step, sessions 12-13; the
    default_* names below change one field of it, so in a result file they mean that session's default). Most
    are named for what they change in the split design (MosaicBwdTuning(), `split_bwd`), which was the
    default until session 12 and which the result files before it call ours_radial."""
    # The lean fused design: FA4's order with dV late, the stats in the accumulators, plain dQ tiles,
    # dK's A from SMEM, 24/240 registers; lean(**changes) is it with other fields changed too.
    lean = lambda **changes: KernelTuning(mosaic_bwd=MosaicBwdTuning(
        fused=True, fused_order="fa4_late_dv", memory_registers=24, stats_in_acc=True, fused_dq_staging="tiles8x8",
        fused_dk_from_smem=True, **changes))
    default_and = lambda **changes: KernelTuning(mosaic_bwd=dataclasses.replace(DEFAULT_MOSAIC_BWD, **changes))
    return {"split_bwd": KernelTuning(mosaic_bwd=MosaicBwdTuning()),
            "fused_bwd": KernelTuning(mosaic_bwd=MosaicBwdTuning(fused=True)),
            "fused_fa4_bwd": KernelTuning(mosaic_bwd=MosaicBwdTuning(fused=True, fused_order="fa4")),
            "fused_fa4_regs240_bwd": KernelTuning(mosaic_bwd=MosaicBwdTuning(fused=True, fused_order="fa4",
                                                                             memory_registers=24)),
            "fused_fa4_late_dv_bwd": KernelTuning(mosaic_bwd=MosaicBwdTuning(fused=True, fused_order="fa4_late_dv")),
            "fused_fa4_late_dv_regs240_bwd": KernelTuning(mosaic_bwd=MosaicBwdTuning(
                fused=True, fused_order="fa4_late_dv", memory_registers=24)),
            "fused_fa4_stats_regs240_bwd": KernelTuning(mosaic_bwd=MosaicBwdTuning(
                fused=True, fused_order="fa4_late_dv", memory_registers=24, stats_in_acc=True)),
            "fused_private_dq_regs240_bwd": KernelTuning(mosaic_bwd=MosaicBwdTuning(
                fused=True, fused_order="private_dq", memory_registers=24)),
            "fused_private_dq_stats_regs240_bwd": KernelTuning(mosaic_bwd=MosaicBwdTuning(
                fused=True, fused_order="private_dq", memory_registers=24, stats_in_acc=True)),
            # fused_fa4_stats_regs240_bwd on the hand-written pipeline: a mask block an iteration, constant slots.
            "fused_static_bwd": KernelTuning(mosaic_bwd=MosaicBwdTuning(
                fused=True, fused_order="fa4_late_dv", memory_registers=24, stats_in_acc=True, fused_pipeline="static")),
            "fused_static_nostats_bwd": KernelTuning(mosaic_bwd=MosaicBwdTuning(
                fused=True, fused_order="fa4_late_dv", memory_registers=24, fused_pipeline="static")),
            "fused_static_wg_bwd": KernelTuning(mosaic_bwd=MosaicBwdTuning(
                fused=True, fused_order="fa4_late_dv", memory_registers=24, stats_in_acc=True,
                fused_pipeline="static_wg")),
            "fused_regs240_bwd": KernelTuning(mosaic_bwd=MosaicBwdTuning(fused=True, memory_registers=24)),
            "regs240_bwd": KernelTuning(mosaic_bwd=MosaicBwdTuning(memory_registers=24)),
            "dq_tile_128_bwd": KernelTuning(mosaic_bwd=MosaicBwdTuning(block_kv_dq=128)),
            "stages_3_bwd": KernelTuning(mosaic_bwd=MosaicBwdTuning(max_concurrent_steps=3)),
            # The fused kernel's dQ staged in plain 8x8 f32 tiles (no swizzle selects), on both pipelines.
            "fused_fa4_stats_dq8_regs240_bwd": KernelTuning(mosaic_bwd=MosaicBwdTuning(
                fused=True, fused_order="fa4_late_dv", memory_registers=24, stats_in_acc=True,
                fused_dq_staging="tiles8x8")),
            "fused_static_dq8_bwd": KernelTuning(mosaic_bwd=MosaicBwdTuning(
                fused=True, fused_order="fa4_late_dv", memory_registers=24, stats_in_acc=True, fused_pipeline="static",
                fused_dq_staging="tiles8x8")),
            # All three register/instruction cuts together: static slots, plain dQ tiles, dK's A from SMEM.
            # fused_fa4_stats_dq8_regs240_bwd with dK's A operand from the dS^T tile in SMEM (Pallas's pipeline).
            "fused_fa4_lean_regs240_bwd": lean(),
            # The split dk/dv kernel with dP^T issued beside S^T (alone, and at 24/240 registers).
            "dkv_dp_with_s_bwd": KernelTuning(mosaic_bwd=MosaicBwdTuning(dkv_dp_with_s=True)),
            "dkv_dp_with_s_regs240_bwd": KernelTuning(mosaic_bwd=MosaicBwdTuning(dkv_dp_with_s=True,
                                                                               memory_registers=24)),
            # ... and without Pallas's automatic warpgroup barriers around its shared-memory stores.
            "fused_fa4_lean_noauto_bwd": lean(no_auto_barriers=True),
            # The fixed operands' descriptors formed in each step: the split default, the lean fused design.
            "operands_in_step_bwd": KernelTuning(mosaic_bwd=MosaicBwdTuning(operands_in_step=True)),
            "operands_in_step_regs240_bwd": KernelTuning(mosaic_bwd=MosaicBwdTuning(operands_in_step=True,
                                                                                    memory_registers=24)),
            # (fused_lean_in_step_bwd in session 11's files is the default.)
            "fused_lean_in_step_noauto_bwd": default_and(no_auto_barriers=True),
            # The default with the row statistics in registers (S^T issued before they are loaded, as
            # FA4 does), and with dQ staged in plain 8x8 tiles (no swizzle selects, but the TMA
            # reduce-add's boxes 32 bytes wide instead of 128; default_dq_swizzle_bwd in session 12's
            # files is the default, this its base).
            "default_stats_in_regs_bwd": default_and(stats_in_acc=False),
            "default_dq_tiles8x8_bwd": default_and(fused_dq_staging="tiles8x8"),
            # Session 13 made the default stage dQ in plain 8x8 tiles with its GMEM accumulator in tile order
            # (256-byte TMA rows, no selects) and issue dV before the fence and barrier that publish dS^T
            # (FA4's place); in session 12's and 13's files default_dq_flat_bwd, default_dv_early_bwd and
            # default_dv_early_dq_flat_bwd are those changes to session 12's default (session12_bwd here).
            # Each undone alone:
            "default_dq_swizzle_bwd": default_and(fused_dq_staging="swizzle128"),
            "default_dv_late_bwd": default_and(dv_before_commit=False),
            # Session 14 made the warpgroups meet over dS^T on one 256-thread bar.sync instead of an mbarrier
            # (FA4's PdS barrier) and each step's dQ partial published by the next step's dS^T fence and
            # copied then (one fence and barrier a step fewer); in session 13's and 14's files
            # default_named_ds_bwd, default_dq_next_bwd and default_dq_next_named_ds_bwd are those changes to
            # session 13's default (session13_bwd here). Each undone alone:
            "default_mbarrier_ds_bwd": default_and(ds_rendezvous="mbarrier"),
            "default_dq_in_step_bwd": default_and(dq_copy_next_step=False),
            "session13_bwd": default_and(ds_rendezvous="mbarrier", dq_copy_next_step=False),
            "session12_bwd": default_and(ds_rendezvous="mbarrier", dq_copy_next_step=False,
                                         fused_dq_staging="swizzle128", dv_before_commit=False),
            "fused_static_lean_bwd": lean(fused_pipeline="static"),
            # The split dk/dv kernel on the fused kernel's hand-written static pipeline, also at 24/240 registers.
            "split_static_bwd": KernelTuning(mosaic_bwd=MosaicBwdTuning(split_pipeline="static")),
            "split_static_regs240_bwd": KernelTuning(mosaic_bwd=MosaicBwdTuning(split_pipeline="static",
                                                                                memory_registers=24)),
            # Launch order of the backward kernels: 4 heads of a block together (the default: blocks fastest).
            "heads4_bwd": KernelTuning(mosaic_bwd=MosaicBwdTuning(grid_heads=4)),
            "fused_static_heads4_bwd": KernelTuning(mosaic_bwd=MosaicBwdTuning(
                fused=True, fused_order="fa4_late_dv", memory_registers=24, stats_in_acc=True, fused_pipeline="static",
                grid_heads=4))}


def forward_variants() -> dict[str, KernelTuning]:
    """{case name: KernelTuning} of the Mosaic forward designs --variants can time beside the default
    (DEFAULT_MOSAIC_FWD: the grid kernel GRID_MOSAIC_FWD, from 384 query tiles its K/V multicast pairs; the
    designs built on the grid kernel are best timed beside grid_fwd at long shapes): the grid kernel at every
    length (grid_fwd, the default until session 20); the serial key loop (MosaicTuning(), on which the others
    below build); session 9's default (the exact overlapped loop, its wait for P V before the softmax); the lazy
    rescale at FA4's threshold (8 log2 units) and at 0 (skip only where no row max moved); FA3's intra-warpgroup
    overlap, alone, with the lazy rescale, and without the warpgroups' ping-pong; the overlap with P cast after
    its P V's wait (late_p), also with P V reading P from shared memory (p_smem), and in FA3's full order
    (late_p and O rescaled between the issues: fa3), alone, lazy and without the ping-pong; the serial loop
    without the ping-pong; 4 heads launched together (grid_heads); the persistent grid (one CTA per SM walks the
    work items) in either order; the softmax's row reductions as trees, alone and with the lazy rescale; part of
    the exp2 on the FMA pipe; the overlaps' turn on named barriers, and their waits before S's accumulator
    opens; the memory warpgroup's K and V slot waits apart, in the serial, lazy, persistent and overlapped
    loops; the wait for P V kept below the softmax without the lazy rescale (the lazy loop's exact form), and in
    FA3's order; that wait and O's rescale placed after the exp2 of S's first 8, 16 or 24 columns; the row sum
    in each thread; and on the grid kernel (FA4's order): one producer warp, the lazy rescale, the wait after 0
    columns, a 3-slot ring."""
    fwd = lambda **fields: KernelTuning(mosaic_fwd=MosaicTuning(**fields))
    # The variants below were built on the lazy default (LAZY_MOSAIC_FWD, the default until session 16)
    # and keep their names' meaning; "lazy_default_fwd" is that forward itself.
    default_and = lambda **fields: KernelTuning(mosaic_fwd=dataclasses.replace(LAZY_MOSAIC_FWD, **fields))
    # Session 9's default: the exact overlapped loop, P V waited for before the softmax's exp2.
    session9 = dict(overlap_qk=True, overlap_late_p=True, named_turn=True, overlap_waits_first=True,
                    separate_kv_waits=True)
    return {"lazy_default_fwd": default_and(),  # the default until session 16
            "serial_fwd": fwd(),  # MosaicTuning(): the serial key loop, the default until session 9
            "session9_fwd": fwd(**session9),  # overlap_late_p_sep_fwd in session 9's result files
            "lazy_rescale_fwd": fwd(lazy_rescale_threshold=8.0),
            "lazy_rescale_0_fwd": fwd(lazy_rescale_threshold=0.0),
            "overlap_fwd": fwd(overlap_qk=True),
            "overlap_lazy_fwd": fwd(overlap_qk=True, lazy_rescale_threshold=8.0),
            "overlap_no_pingpong_fwd": fwd(overlap_qk=True, pingpong=False),
            "overlap_late_p_fwd": fwd(overlap_qk=True, overlap_late_p=True),
            "overlap_p_smem_fwd": fwd(overlap_qk=True, overlap_late_p=True, overlap_p_smem=True),
            "overlap_fa3_fwd": fwd(overlap_qk=True, overlap_late_p=True, overlap_early_rescale=True),
            "overlap_fa3_lazy_fwd": fwd(overlap_qk=True, overlap_late_p=True, overlap_early_rescale=True,
                                        lazy_rescale_threshold=8.0),
            "overlap_fa3_no_pingpong_fwd": fwd(overlap_qk=True, overlap_late_p=True, overlap_early_rescale=True,
                                               pingpong=False),
            "no_pingpong_fwd": fwd(pingpong=False),
            # The overlapped loop's one turn a step, waiting for P V with S before the softmax.
            "paired_issue_fwd": fwd(overlap_qk=True, overlap_softmax=False),
            "paired_issue_lazy_fwd": fwd(overlap_qk=True, overlap_softmax=False, lazy_rescale_threshold=8.0),
            # Launch order: 4 heads of a query tile together (the default: query tiles fastest, as FA4's).
            "heads4_fwd": fwd(grid_heads=4),
            # One CTA per SM walking the (head, query tile, batch) items in either launch order.
            "persistent_fwd": fwd(persistent=True),
            "persistent_heads4_fwd": fwd(persistent=True, grid_heads=4),
            # The softmax's row max and sum reduced as trees (4 dependent levels, not a 16-deep chain).
            "tree_reduce_fwd": fwd(tree_reduce=True),
            "tree_reduce_lazy_fwd": fwd(tree_reduce=True, lazy_rescale_threshold=8.0),
            # Every k-th 8-key tile's exp2 by a polynomial on the FMA pipe (FA4's split on Blackwell).
            "exp2_poly4_fwd": fwd(exp2_poly_every=4),
            "exp2_poly2_fwd": fwd(exp2_poly_every=2),
            "tree_exp2_poly4_fwd": fwd(tree_reduce=True, exp2_poly_every=4),
            "tree_exp2_poly4_lazy_fwd": fwd(tree_reduce=True, exp2_poly_every=4, lazy_rescale_threshold=8.0),
            # The overlapped loops with the turn token on named barriers (FA3's and FA4's).
            "overlap_late_p_named_fwd": fwd(overlap_qk=True, overlap_late_p=True, named_turn=True),
            "overlap_fa3_named_fwd": fwd(overlap_qk=True, overlap_late_p=True, overlap_early_rescale=True,
                                         named_turn=True),
            "paired_issue_named_fwd": fwd(overlap_qk=True, overlap_softmax=False, named_turn=True),
            # ... and S's accumulator opened after K's and the turn's waits (ptxas folds its zeros).
            "overlap_late_p_waits_fwd": fwd(overlap_qk=True, overlap_late_p=True, overlap_waits_first=True),
            "overlap_late_p_named_waits_fwd": fwd(overlap_qk=True, overlap_late_p=True, named_turn=True,
                                                  overlap_waits_first=True),
            "overlap_fa3_named_waits_fwd": fwd(overlap_qk=True, overlap_late_p=True, overlap_early_rescale=True,
                                               named_turn=True, overlap_waits_first=True),
            "paired_issue_named_waits_fwd": fwd(overlap_qk=True, overlap_softmax=False, named_turn=True,
                                                overlap_waits_first=True),
            # ... and the memory warpgroup waiting for K's and V's ring slots apart (and the default so).
            "separate_kv_fwd": fwd(separate_kv_waits=True),
            "separate_kv_lazy_fwd": fwd(separate_kv_waits=True, lazy_rescale_threshold=8.0),
            "persistent_separate_kv_fwd": fwd(persistent=True, separate_kv_waits=True),
            "overlap_late_p_sep_lazy_fwd": fwd(**session9, lazy_rescale_threshold=8.0),  # default_lazy_fwd in session 9
            "overlap_fa3_sep_fwd": fwd(**session9, overlap_early_rescale=True),
            "paired_issue_sep_fwd": fwd(overlap_qk=True, overlap_softmax=False, named_turn=True,
                                        overlap_waits_first=True, separate_kv_waits=True),
            # ... and the wait for P V kept below the softmax (a never-taken divergent branch): exact, the
            # default's form without the lazy rescale (late_pv_wait_lazy_fwd in session 10's files is
            # the default), and in FA3's order.
            "late_pv_wait_fwd": default_and(lazy_rescale_threshold=None),
            "late_pv_wait_fa3_fwd": default_and(lazy_rescale_threshold=None, overlap_early_rescale=True),
            # ... with the wait and O's exact rescale after the first 8 / 16 / 24 columns' exp2 (FA4's place).
            "pv_wait_after8_fwd": default_and(lazy_rescale_threshold=None, pv_wait_after_cols=8),
            "pv_wait_after16_fwd": default_and(lazy_rescale_threshold=None, pv_wait_after_cols=16),
            "pv_wait_after24_fwd": default_and(lazy_rescale_threshold=None, pv_wait_after_cols=24),
            # The K/V loads issued by one warp of the memory warpgroup (FA4's producer warp).
            "producer_warp_fwd": default_and(producer_warp=True),
            "producer_warp_after8_fwd": default_and(producer_warp=True, lazy_rescale_threshold=None,
                                                    pv_wait_after_cols=8),
            # The row sum kept as each thread's partial sums, its shuffles once after the loop (FA4's).
            "row_sum_in_thread_fwd": default_and(row_sum_in_thread=True),
            # ... with the wait for P V after the first 16 columns' exp2 (FA4's order and its 4 shuffles a
            # step); after 8 columns (row_sum_in_thread_after8_fwd in session 16's files) it is the default.
            "row_sum_in_thread_after16_fwd": default_and(row_sum_in_thread=True, lazy_rescale_threshold=None,
                                                         pv_wait_after_cols=16),
            # The lazy loop on the persistent grid (one CTA an SM walking the work items).
            "persistent_overlap_fwd": default_and(persistent=True),
            # The grid kernel (FA4's softmax order; from 384 query tiles the default runs pairs of it, so
            # time these beside grid_fwd at long shapes) with its K/V loads issued by one warp (FA4's producer).
            "fa4_order_producer_warp_fwd": KernelTuning(mosaic_fwd=dataclasses.replace(GRID_MOSAIC_FWD,
                                                                                       producer_warp=True)),
            # ... and with the lazy rescale (threshold 8): after the wait for P V the warp votes and skips
            # O's multiplies where no row's max moved.
            "fa4_order_lazy_fwd": KernelTuning(mosaic_fwd=dataclasses.replace(GRID_MOSAIC_FWD,
                                                                              lazy_rescale_threshold=8.0)),
            # ... and waiting for P V right after O's row factors' exp2, before any of S's (8 columns won
            # over 16 and 24).
            "fa4_order_after0_fwd": KernelTuning(mosaic_fwd=dataclasses.replace(GRID_MOSAIC_FWD,
                                                                                pv_wait_after_cols=0)),
            # ... and with a K/V ring of 3 slots (224 KiB of tiles at head_dim 128).
            "fa4_order_s3_fwd": KernelTuning(mosaic_fwd=dataclasses.replace(GRID_MOSAIC_FWD, num_stages=3)),
            # The grid kernel on the persistent grid (one CTA an SM), each item's pipeline alone, and with
            # the pipeline carried across items (an item's first S issued with the previous one's last P V).
            "fa4_order_persistent_fwd": KernelTuning(mosaic_fwd=dataclasses.replace(GRID_MOSAIC_FWD,
                                                                                    persistent=True)),
            "persistent_carry_fwd": KernelTuning(mosaic_fwd=dataclasses.replace(GRID_MOSAIC_FWD, persistent=True,
                                                                                carry_items=True)),
            # ... with the items dealt by list scheduling at trace time (walk_item_cost: an item's key blocks
            # plus F steps), as a launch hands CTAs to free SMs, instead of round robin.
            "persistent_carry_list1_fwd": KernelTuning(mosaic_fwd=dataclasses.replace(
                GRID_MOSAIC_FWD, persistent=True, carry_items=True, walk_item_cost=1.0)),
            "persistent_carry_list3_fwd": KernelTuning(mosaic_fwd=dataclasses.replace(
                GRID_MOSAIC_FWD, persistent=True, carry_items=True, walk_item_cost=3.0)),
            "fa4_order_persistent_list3_fwd": KernelTuning(mosaic_fwd=dataclasses.replace(
                GRID_MOSAIC_FWD, persistent=True, walk_item_cost=3.0)),
            "row_sum_in_thread_producer_warp_fwd": default_and(row_sum_in_thread=True, producer_warp=True),
            # Timing only (wrong output): the grid kernel minus one stage of its middle steps, to price that
            # stage at the power cap: the whole softmax (P = bf16(S)), the exp2 (p = x), O's rescale, 15/16
            # of the K/V loads.
            **{f"ablate_{stage}_fwd": KernelTuning(mosaic_fwd=dataclasses.replace(GRID_MOSAIC_FWD, ablate=stage))
               for stage in STAGE_ABLATIONS},
            # The grid kernel at every length: the default until session 20 (the pairs from 384 query tiles).
            "grid_fwd": KernelTuning(mosaic_fwd=GRID_MOSAIC_FWD),
            # The grid kernel with K/V multicast across a cluster of two CTAs (pairs of query tiles, each tile's
            # shared blocks first: named apart from session 18's kv_multicast_fwd, which walked the pair's
            # union); the same with every block loaded alone (the pairing's cost), and the cluster launch
            # alone (the grid kernel's order and loads).
            "kv_multicast_shared_first_fwd": KernelTuning(mosaic_fwd=dataclasses.replace(
                GRID_MOSAIC_FWD, kv_multicast=True)),
            "kv_multicast_matched_fwd": KernelTuning(mosaic_fwd=dataclasses.replace(
                GRID_MOSAIC_FWD, kv_multicast=True, pair_matching=True)),
            "kv_multicast_shared_first_s3_fwd": KernelTuning(mosaic_fwd=dataclasses.replace(
                GRID_MOSAIC_FWD, kv_multicast=True, num_stages=3)),
            "kv_multicast_shared_first_ablate_multicast_fwd": KernelTuning(mosaic_fwd=dataclasses.replace(
                GRID_MOSAIC_FWD, kv_multicast=True, ablate="multicast")),
            "kv_multicast_ablate_cluster_fwd": KernelTuning(mosaic_fwd=dataclasses.replace(
                GRID_MOSAIC_FWD, kv_multicast=True, ablate="cluster")),
            "overlap_late_p_sep_s3_fwd": fwd(**session9, num_stages=3),
            # The default with a 3-slot K/V ring (the pairs from 384 query tiles; below, the grid kernel's 3 slots).
            "pairs_s3_fwd": KernelTuning(mosaic_fwd=dataclasses.replace(DEFAULT_MOSAIC_FWD, num_stages=3))}


def variants(backward: bool) -> dict[str, KernelTuning]:
    """The designs --variants can name: forward ones always, backward ones with --backward."""
    return {**forward_variants(), **(backward_variants() if backward else {})}


def backward_breakdown(q, k, v, mask, iters: int, fwd_flops: float, settle_s: float, batch: int = 1) -> dict:
    """Times the split Mosaic backward's parts alone (MosaicBwdTuning(), the default until session 12):
    the row statistics (XLA), the dq kernel and the dk/dv kernel. Each kernel's TFLOP/s count the matmuls it executes (dq: S, dP, dQ = 1.5x
    the forward's FLOPs; dk/dv: S, dP, dV, dK = 2x), i.e. how busy its tensor cores are."""
    import functools

    from radial_jax.kernels import mosaic_bwd, mosaic_fwd

    tables, scale = block_tables(mask, 128, q.shape[1], k.shape[1]), HEAD_DIM**-0.5
    tuning = mosaic_bwd.MosaicBwdTuning()
    out, lse = mosaic_fwd.mosaic_forward(q, k, v, tables=tables, scale=scale)
    d_out = (out.astype(jnp.float32) * cotangent_weights(q)).astype(q.dtype)
    d_lse = jnp.zeros_like(lse)
    rows = jax.jit(functools.partial(mosaic_bwd.row_statistics, tables=tables))
    lse2, delta = rows(out, lse, d_out, d_lse)
    kernel_args = (q, k, v, d_out, lse2, delta)
    dq = jax.jit(functools.partial(mosaic_bwd.dq_kernel, tables=tables, scale=scale, tuning=tuning))
    dkv = jax.jit(functools.partial(mosaic_bwd.dkv_kernel, tables=tables, scale=scale, tuning=tuning))
    parts = {"rows": (lambda: rows(out, lse, d_out, d_lse), None),
             "dq_kernel": (lambda: dq(*kernel_args), 1.5 * fwd_flops),
             "dkv_kernel": (lambda: dkv(*kernel_args), 2.0 * fwd_flops)}
    result = {}
    for name, (fn, executed_flops) in parts.items():
        ms = median_seconds(fn, iters, settle_s, batch=batch) * 1e3
        result[f"bwd_{name}_ms"] = ms
        if executed_flops:
            result[f"bwd_{name}_executed_tflops"] = executed_flops / (ms * 1e-3) / 1e12
    return result


def cudnn_case(q, k, v, backward: bool):
    attend = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
    return _wrap(attend, q, k, v, backward)


def _jitted(attend, backward):
    if not backward:
        return jax.jit(attend)
    loss = lambda q, k, v: jnp.sum(attend(q, k, v).astype(jnp.float32) * cotangent_weights(q))
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))


def _wrap(attend, q, k, v, backward):
    fn = _jitted(attend, backward)
    call = lambda: fn(q, k, v)
    call.temp_bytes = lambda: fn.lower(q, k, v).compile().memory_analysis().temp_size_in_bytes
    return call


def cotangent_weights(q):
    # A fixed non-uniform cotangent so that the backward does real work on every row.
    return jnp.cos(jnp.arange(q.shape[1], dtype=jnp.float32))[None, :, None, None]


def sampled_block_error(q, k, v, mask, out, rows=(0, -1), heads=4) -> float:
    """Returns max |ours - f32 masked reference| over a few query blocks and heads."""
    b = 128
    worst = 0.0
    for r in rows:
        r = r % mask.shape[0]
        sl = slice(r * b, min((r + 1) * b, q.shape[1]))
        qs = q[:, sl, :heads].astype(jnp.float32)
        ks, vs = k[:, :, :heads].astype(jnp.float32), v[:, :, :heads].astype(jnp.float32)
        logits = jnp.einsum("blnd,bmnd->bnlm", qs, ks, precision="highest") * HEAD_DIM**-0.5
        cols = jnp.asarray(np.repeat(mask[r], b)[: k.shape[1]])
        probs = jax.nn.softmax(jnp.where(cols, logits, -jnp.inf), axis=-1)
        ref = jnp.einsum("bnlm,bmnd->blnd", probs, vs, precision="highest")
        worst = max(worst, float(jnp.abs(out[:, sl, :heads].astype(jnp.float32) - ref).max()))
    return worst


TORCH_RUNS = ("flex", "sdpa", "fa4")


def torch_cases(q_len, heads, mask, backward, iters, settle_s, batch=1, only=TORCH_RUNS):
    """Returns {name: ms} for FlexAttention and FA4 (same block mask) and SDPA, or {} without torch+CUDA.
    only: the baselines to run (TORCH_RUNS' names)."""
    try:
        import torch
        from torch.nn.attention.flex_attention import BlockMask, flex_attention
    except ImportError as e:
        print(f"torch baselines skipped: {e}")
        return {}
    if not torch.cuda.is_available():
        return {}
    dev = "cuda"
    shape = (1, heads, q_len, HEAD_DIM)
    q, k, v = (torch.randn(shape, device=dev, dtype=torch.bfloat16, requires_grad=backward) for _ in range(3))
    d_out = torch.randn(shape, device=dev, dtype=torch.bfloat16)
    tables = block_tables(mask, 128, q_len, q_len)
    as_t = lambda a: torch.as_tensor(np.ascontiguousarray(a), device=dev, dtype=torch.int32)
    # FlexAttention's kv_indices are [B, H, QB, KB] (it transposes them as a dense matrix).
    ids = np.zeros(mask.shape, np.int32)
    ids[:, : tables.kv_ids.shape[1]] = tables.kv_ids
    kv_num = as_t(tables.kv_counts)[None, None].expand(1, heads, -1).contiguous()
    kv_idx = as_t(ids)[None, None].expand(1, heads, -1, -1).contiguous()
    zeros_num = torch.zeros_like(kv_num)
    # Every computed block passed as a full block (no mask_mod work), as FA4 gets them (benchmarks/fa4.py).
    block_mask = BlockMask.from_kv_blocks(zeros_num, kv_idx, kv_num, kv_idx, BLOCK_SIZE=128,
                                          seq_lengths=(q_len, q_len))
    flex = torch.compile(flex_attention, dynamic=False)
    runs = {
        "flex": lambda: flex(q, k, v, block_mask=block_mask),
        "sdpa": lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v),
    }
    step = (lambda fn: lambda: torch.autograd.grad(fn(), (q, k, v), d_out)) if backward else _without_grad
    results = {}

    def time_into(name, fn):
        # The host's clock, as ours is timed; at batch 1 also the GPU's (CUDA events), which leaves out
        # the wait for the result (at batch N the two agree: the host's share is spread over N calls).
        results[name] = fa4.median_ms(fn, iters, settle_s, batch=batch)
        if batch == 1:
            results[f"{name}_gpu_events"] = fa4.median_ms(fn, iters, 0.0, batch=1, clock="events")

    for name, fn in runs.items():
        if name not in only:
            continue
        try:
            time_into(name, step(fn))
        except Exception as e:  # a baseline failing must not lose ours
            print(f"torch {name} failed: {type(e).__name__}: {e}")
    if "fa4" not in only:
        pass
    elif reason := fa4.unavailable():
        print(f"FA4 skipped: {reason}")
    else:  # FA4 takes [B, L, N, D], as ours
        q4, k4, v4 = (x.detach().transpose(1, 2).contiguous().requires_grad_(backward) for x in (q, k, v))
        try:
            time_into("fa4", fa4.fa4_case(q4, k4, v4, mask, backward, d_out.transpose(1, 2).contiguous()))
            if not backward:
                results["fa4_max_rel_err_sampled_blocks"] = fa4.sampled_error(q4, k4, v4, mask,
                                                                               fa4.fa4_case(q4, k4, v4, mask, False)())
        except Exception as e:
            print(f"torch fa4 failed: {type(e).__name__}: {e}")
        del q4, k4, v4
    del q, k, v
    torch.cuda.empty_cache()
    return results


def _without_grad(fn):
    import torch

    def run():
        with torch.no_grad():
            return fn()

    return run


def run_torch_shape(name, args):
    frames, tokens, heads = SHAPES[name]
    mask = radial_block_mask(frames, tokens, decay_factor=args.decay)
    return torch_cases(frames * tokens, heads, mask, args.backward, args.iters, args.settle, args.batch,
                       args.torch_runs.split(","))


def torch_in_subprocess(names, args) -> dict:
    """Runs the torch baselines in a child process: a device assert there cannot lose ours,
    and the child's GPU memory is gone before JAX allocates."""
    import subprocess

    cmd = [sys.executable, __file__, "--torch-only", "--shapes", ",".join(names), "--iters", str(args.iters),
           "--decay", str(args.decay), "--settle", str(args.settle), "--batch", str(args.batch),
           "--torch-runs", args.torch_runs]
    cmd += ["--backward"] if args.backward else []
    proc = subprocess.run(cmd, capture_output=True, text=True)
    results = {}
    for line in proc.stdout.splitlines():
        if line.startswith("TORCH_JSON "):
            results.update(json.loads(line[len("TORCH_JSON "):]))
    if proc.returncode:
        print(f"torch baselines exited with {proc.returncode}: {proc.stderr[-1500:]}")
    return results


def run_shape(name, args, torch_ms):
    frames, tokens, heads = SHAPES[name]
    L = frames * tokens
    start = time.perf_counter()
    mask = radial_block_mask(frames, tokens, decay_factor=args.decay)
    mask_s = time.perf_counter() - start
    start = time.perf_counter()
    block_tables(mask, 128, L, L)
    tables_s = time.perf_counter() - start
    all_on = np.ones_like(mask)
    keys = jax.random.split(jax.random.key(0), 3)
    q, k, v = (jax.random.normal(key, (1, L, heads, HEAD_DIM), jnp.bfloat16) for key in keys)
    pairs = computed_token_pairs(mask, 128, L, L)
    factor = BWD_FLOP_FACTOR if args.backward else 1.0
    flops = attention_flops(pairs, heads=heads, head_dim=HEAD_DIM) * factor
    dense_flops = attention_flops(L * L, heads=heads, head_dim=HEAD_DIM) * factor
    row = dict(shape=name, seq=L, heads=heads, density=block_density(mask), decay=args.decay,
               mask_build_s=mask_s, tables_build_s=tables_s)

    cases = {"ours_radial": jax_case(q, k, v, mask, args.backward, args.backend)}
    # Variants right after the default and the default again after them: the drift between the two
    # default timings bounds what a variant's difference can mean. The Triton twin (--dry-run)
    # ignores the Mosaic tunings but runs the same bookkeeping.
    named = [v for v in args.variants.split(",") if v] if args.backend in (None, "mosaic", "interpret") else []
    for variant in named:
        backend = "interpret" if args.backend == "interpret" else "mosaic"
        cases[f"ours_radial_{variant}"] = jax_case(q, k, v, mask, args.backward, backend,
                                                   variants(args.backward)[variant])  # fmt: skip
    if named:
        cases["ours_radial_again"] = cases["ours_radial"]
    cases["ours_all_on"] = jax_case(q, k, v, all_on, args.backward, args.backend)
    if not args.dry_run:
        cases["cudnn_dense"] = cudnn_case(q, k, v, args.backward)
    for case, fn in cases.items():
        start = time.perf_counter()
        try:
            jax.block_until_ready(fn())
        except Exception as e:
            print(f"{name} {case} failed: {type(e).__name__}: {str(e)[:2000]}")
            continue
        row[f"{case}_first_call_s"] = time.perf_counter() - start
        row[f"{case}_ms"] = median_seconds(fn, args.iters, args.settle, batch=args.batch) * 1e3
        if args.backward:  # XLA's buffer plan: scratch the gradient needs beyond q, k, v, dq, dk, dv
            row[f"{case}_temp_gib"] = fn.temp_bytes() / 2**30
    if args.backward:
        fwd_flops = flops / BWD_FLOP_FACTOR
        for case, fn, on in (("ours_radial", jax_case(q, k, v, mask, False, args.backend), fwd_flops),
                             ("cudnn_dense", cudnn_case(q, k, v, False), dense_flops / BWD_FLOP_FACTOR)):
            if f"{case}_ms" not in row:
                continue
            fwd_ms = median_seconds(fn, args.iters, args.settle, batch=args.batch) * 1e3
            row[f"{case}_fwd_only_msec"] = fwd_ms
            bwd_s = (row[f"{case}_ms"] - fwd_ms) * 1e-3
            row[f"{case}_bwd_only_tflops"] = (BWD_FLOP_FACTOR - 1) * on / bwd_s / 1e12
        timed = [c for c in cases if c.endswith("_bwd") and f"{c}_ms" in row and "ours_radial_fwd_only_msec" in row]
        for variant in timed:  # the default's forward kernel: time it once
            bwd_s = (row[f"{variant}_ms"] - row["ours_radial_fwd_only_msec"]) * 1e-3
            row[f"{variant}_bwd_only_tflops"] = (BWD_FLOP_FACTOR - 1) * fwd_flops / bwd_s / 1e12
        if args.breakdown and args.backend in (None, "mosaic"):
            row.update(backward_breakdown(q, k, v, mask, args.iters, fwd_flops, args.settle, args.batch))
        if "cudnn_dense_bwd_only_tflops" in row and "ours_radial_bwd_only_tflops" in row:
            row["bwd_throughput_vs_cudnn"] = row["ours_radial_bwd_only_tflops"] / row["cudnn_dense_bwd_only_tflops"]
    for variant in [v for v in named if f"ours_radial_{v}_ms" in row and "ours_radial_ms" in row]:
        row[f"ours_radial_{variant}_speed_vs_default"] = row["ours_radial_ms"] / row[f"ours_radial_{variant}_ms"]
    if not args.backward and "ours_radial_ms" in row:
        out = block_sparse_attention(q, k, v, mask, block_size=128, backend=args.backend)
        row["ours_radial_max_err_sampled_blocks"] = sampled_block_error(q, k, v, mask, out)
        for variant in [v for v in named if f"ours_radial_{v}_ms" in row]:  # the same bound as the default's
            variant_out = cases[f"ours_radial_{variant}"]()
            row[f"ours_radial_{variant}_max_err_sampled_blocks"] = sampled_block_error(q, k, v, mask, variant_out)
        if "cudnn_dense_ms" in row:
            dense = block_sparse_attention(q, k, v, all_on, block_size=128, backend=args.backend)
            ref = jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
            err = jnp.abs(dense.astype(jnp.float32) - ref.astype(jnp.float32)).max()
            row["ours_all_on_max_err_vs_cudnn"] = float(err)
    del q, k, v
    for case, value in torch_ms.items():
        row[f"torch_{case}" if case.endswith("_sampled_blocks") else f"torch_{case}_ms"] = value
    whole = [k for k in row if k.endswith("_ms") and not k.startswith("bwd_")]  # a full attention call each
    for key in whole:
        on_blocks = flops if key.startswith(("ours_radial", "torch_flex_", "torch_fa4_")) else dense_flops
        row[key.replace("_ms", "_tflops")] = on_blocks / (row[key] * 1e-3) / 1e12
    if "cudnn_dense_ms" in row:
        for key in [k for k in whole if k != "cudnn_dense_ms"]:
            row[key.replace("_ms", "_speedup_vs_cudnn")] = row["cudnn_dense_ms"] / row[key]
    if "torch_fa4_ms" in row and "ours_radial_ms" in row:  # the target: >= 1.05 forward, >= 1.0 backward
        row["ours_radial_speed_vs_fa4"] = row["torch_fa4_ms"] / row["ours_radial_ms"]
    return row


def print_table(rows, backward):
    mode = "fwd+bwd" if backward else "fwd"
    print(f"\n{mode}, bf16, D={HEAD_DIM}, B=1; TFLOP/s on computed blocks (radial) or all blocks (dense)")
    cols = ["ours_radial", "torch_fa4", "ours_all_on", "cudnn_dense", "torch_flex", "torch_sdpa"]
    print(f"{'shape':16} {'dens':>5} " + " ".join(f"{c:>22}" for c in cols) + "  radial/cudnn  radial/fa4")
    for r in rows:
        cells = []
        for c in cols:
            ms = r.get(f"{c}_ms")
            cells.append(f"{ms:9.2f} ms {r[c + '_tflops']:5.0f} TF" if ms else f"{'-':>22}")
        speed, vs_fa4 = r.get("ours_radial_speedup_vs_cudnn"), r.get("ours_radial_speed_vs_fa4")
        print(f"{r['shape']:16} {r['density']:5.3f} " + " ".join(f"{c:>22}" for c in cells)
              + (f"  {speed:11.2f}x" if speed else f"  {'-':>12}") + (f"  {vs_fa4:9.2f}x" if vs_fa4 else ""))
    for r in rows:  # batch 1: the GPU's own time of the torch baselines, without the wait for the result
        events = {c: r[f"torch_{c}_gpu_events_ms"] for c in ("fa4", "flex", "sdpa") if f"torch_{c}_gpu_events_ms" in r}
        if events:
            print(f"  {r['shape']:16} torch baselines on CUDA events (GPU time only): "
                  + ", ".join(f"{c} {ms:.2f} ms" for c, ms in events.items()))
    for r in rows:  # the variants beside the default, and the default timed again after them
        for key in [k for k in r if k.startswith("ours_radial_") and k.endswith("_speed_vs_default")]:
            case = key[: -len("_speed_vs_default")]
            again = r.get("ours_radial_again_ms")
            print(f"  {r['shape']:16} {case:36} {r[case + '_ms']:9.2f} ms {r[case + '_tflops']:5.0f} TF  "
                  f"{r[key]:.3f}x the default ({r['ours_radial_ms']:.2f} ms"
                  + (f", {again:.2f} ms timed again after the variants)" if again else ")"))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", help=f"comma list of {list(SHAPES)}")
    parser.add_argument("--backward", action="store_true", help="time forward+backward (value_and_grad wrt q, k, v)")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--settle", type=float, default=fa4.SETTLE_S,
                        help="seconds of back-to-back calls before each case is timed (default %(default)s)")
    parser.add_argument("--batch", type=int, default=1,
                        help="calls per timed sample, dispatched back to back and waited on once (default "
                             "%(default)s: each call timed alone; see median_seconds)")  # fmt: skip
    parser.add_argument("--decay", type=float, default=1.0, help="radial mask decay factor (default %(default)s)")
    parser.add_argument("--backend", choices=["mosaic", "triton"], help="our kernel (default: fastest available)")
    parser.add_argument("--variants",
                        help="on Hopper: comma list of other Mosaic designs to time beside the default: "
                             f"{', '.join(forward_variants())}; with --backward also {', '.join(backward_variants())} "
                             "('' for none; default: split_bwd with --backward, none without)")
    parser.add_argument("--breakdown", action="store_true",
                        help="with --backward on Hopper: also time the split backward's row statistics, dq "
                             "kernel and dk/dv kernel alone")
    parser.add_argument("--no-torch", action="store_true", help="skip the torch baselines")
    parser.add_argument("--torch-runs", default=",".join(TORCH_RUNS),
                        help="comma list of the torch baselines to run (default %(default)s); fa4 alone skips "
                             "FlexAttention's compile and the dense SDPA, the slow ones at 720p")
    parser.add_argument("--torch-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--dry-run", action="store_true",
                        help="a tiny shape on the CPU (the Triton twin in interpret mode): checks the path in seconds")
    parser.add_argument("--out", help="JSON path (default benchmarks/results/attention[-backward]-<device>.json)")
    args = parser.parse_args(argv)
    if args.variants is None:
        args.variants = "split_bwd" if args.backward else ""
    unknown = [v for v in filter(None, args.variants.split(",")) if v not in variants(args.backward)]
    if unknown:
        sys.exit(f"unknown --variants {unknown}{'' if args.backward else ' (backward designs need --backward)'}; "
                 f"choose from {list(variants(args.backward))}")
    if unknown := set(filter(None, args.torch_runs.split(","))) - set(TORCH_RUNS):
        sys.exit(f"unknown --torch-runs {sorted(unknown)}; choose from {list(TORCH_RUNS)}")
    if args.dry_run:
        args.shapes, args.backend, args.no_torch = "tiny", "interpret", True
        args.iters, args.settle = min(args.iters, 2), 0.0
    elif not args.torch_only and jax.default_backend() != "gpu":
        sys.exit("benchmarks/attention.py needs a GPU")
    names = (args.shapes or (BWD_SHAPES if args.backward else FWD_SHAPES)).split(",")
    if args.torch_only:
        for name in names:
            print("TORCH_JSON " + json.dumps({name: run_torch_shape(name, args)}), flush=True)
        return
    torch_ms = {} if args.no_torch else torch_in_subprocess(names, args)
    rows = []
    for name in names:
        rows.append(run_shape(name, args, torch_ms.get(name, {})))
        print(json.dumps(rows[-1]), flush=True)
    print_table(rows, args.backward)
    device = jax.devices()[0].device_kind
    tag = "h200" if "H200" in device else "h100" if "H100" in device else device.replace(" ", "_").lower()
    out = args.out or f"benchmarks/results/attention{'-backward' if args.backward else ''}-{tag}.json"
    if args.dry_run and not args.out:
        return
    record = dict(device=device, command="python " + " ".join(sys.argv), date=datetime.date.today().isoformat(),
                  jax=jax.__version__, settle_s=args.settle, batch=args.batch, rows=rows)
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w") as f:
        json.dump(record, f, indent=1)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
