"""What the kernel files share: numeric constants, the Mosaic kernels' CTA shape, the padding of
lengths the TMA cannot take, and the one tuning argument (`KernelTuning`) that
`block_sparse_attention` and `radial_attention` pass down to whichever kernel runs.
"""

import dataclasses
import heapq
import math

import jax.numpy as jnp
import numpy as np

LOG2_E = math.log2(math.e)  # exp(x) = exp2(x * LOG2_E): the kernels keep logits in log2 units
LN_2 = math.log(2.0)
MASK_BLOCK = 128  # tokens per mask block the Mosaic kernels serve: COMPUTE_WGS x 64 rows
COMPUTE_WGS = 2  # compute warpgroups per Mosaic CTA
HOPPER_SMS = 132  # SMs of an H100/H200 SXM: the persistent forward's CTA count when tracing off a GPU
# Rows of the 8-row shared-memory tiling: a TMA copy needs the sequence axis of its GMEM array to
# be a multiple of it (or shorter), so other lengths are zero-padded up to one (seq_multiple).
TMA_SEQ_MULTIPLE = 8


@dataclasses.dataclass(frozen=True)
class MosaicTuning:
    """The Mosaic forward (mosaic_fwd.py). MosaicTuning() is the serial key loop (issue Q K^T, wait,
    softmax, issue P V, wait), the reference design the others are timed against; the library runs
    DEFAULT_MOSAIC_FWD below: the grid kernel GRID_MOSAIC_FWD, and from 384 query tiles its K/V multicast
    pairs (start a variant with dataclasses.replace(GRID_MOSAIC_FWD, ...): most fields exclude the pairs)."""

    block_q: int = 64  # query rows per compute warpgroup (wgmma M)
    block_kv: int = 128  # keys per pipeline step; equals the mask block
    num_stages: int = 2  # K/V ring depth; 3 gave no gain on the H100 (benchmarks/NOTES.md)
    # Lazy rescale (FlashAttention-4's on Blackwell): None keeps the exact online softmax. A float
    # t >= 0 raises a row's running max only when a step's row max exceeds it by more than t (log2
    # units, FA4 uses 8: p then reaches at most 2^8, which bf16/f16 and the f32 sums hold), and a
    # warp skips the multiply of its accumulator rows where none of its 16 rows was raised. Sum and
    # accumulator share the stale max, so out and lse stay exact up to rounding.
    lazy_rescale_threshold: float | None = None
    # Intra-warpgroup overlap (FlashAttention-3's Hopper forward): S_{j+1} = Q K_{j+1}^T and
    # O += P_j V_j are issued together and the softmax of S_{j+1} runs while P_j V_j is on the
    # tensor cores; the two warpgroups pass a token so that their issues alternate (ping-pong).
    # Alone: measured 0.60x the serial loop on the H200 (1.3B 480p-81f/161f, 14B 720p-81f; benchmarks/NOTES.md,
    # 2026-11-30 FWDOV): ptxas serializes its wgmmas (C7513, "non wgmma instructions defining input
    # registers"). The three reorders below remove the serialization but still run 0.90-0.94x the
    # serial loop at 1.3B 480p-81f (NOTES, 2026-11-30 session 5); with overlap_late_p, named_turn,
    # overlap_waits_first and separate_kv_waits it is LAZY_MOSAIC_FWD's and GRID_MOSAIC_FWD's loop.
    overlap_qk: bool = False
    # With overlap_qk: the softmax of S_{j+1} stays f32 until P_j V_j is waited for and is cast to
    # P_{j+1} (bf16, the next P V's register operand) only after wait_group 0, as FA3 does. Cast
    # before the wait, P_{j+1} takes P_j's registers (LLVM sees P_j dead once the asm is issued),
    # so the cast writes an operand of the wgmma in flight and ptxas serializes (NOTES FWDOV2).
    overlap_late_p: bool = False
    # With overlap_qk: O *= alpha_j between the S_{j+1} and the P_j V_j issues (FA3's rescale_o above
    # head_dim 128, as we recall its source), under S_{j+1}'s wgmma and before P V's fence, instead of
    # after the wait_group 0. ptxas 13.0 injects a wait for S before the multiply in a PTX model of it
    # (C7517, benchmarks/wgmma_hazards.py); timed with overlap_late_p on the H200: 0.90x the default.
    overlap_early_rescale: bool = False
    # With overlap_late_p: P V reads P from a per-warpgroup shared-memory tile (an SS wgmma, FA3's
    # Mma1_is_RS = false) written after the wait, so no register of the wgmma in flight is P's;
    # 16 KiB of SMEM per warpgroup and a store, proxy fence and warpgroup barrier per step.
    overlap_p_smem: bool = False
    # With overlap_qk: False waits for P_j V_j together with S_{j+1} (wait_group 0) before the softmax,
    # so no wgmma of the warpgroup is in flight while it computes (no register hazard, V_j released
    # before the softmax). What stays of the overlapped order is one turn a step, under which P_j V_j
    # and S_{j+1} are issued back to back, where the default loop meets the other warpgroup twice a step
    # and waits for P V before it issues the next S. A latency model (benchmarks/schedule_model.py,
    # NOTES session 7) keeps the tensor pipe ~92% busy this way at ~200 cycles a sync point, against
    # ~72% for the default loop and ~100% for the full overlap.
    overlap_softmax: bool = True
    # The two compute warpgroups alternate on the tensor cores (FA3's ping-pong): a rendezvous of both
    # around each softmax, or with overlap_qk a turn token passed at each issue. False drops it, to
    # time what it buys: 0.93-0.95x the default on the H200 (benchmarks/attention.py --variants
    # no_pingpong_fwd, results/attention-overlap-h200.json).
    pingpong: bool = True
    # The softmax's row max and row sum combine a thread's column halves as a tree (log2(block_kv / 8)
    # dependent levels) before the last pair and the shuffles, instead of Pallas's running values a
    # row (a chain 8-16 deep): ncu's source view of the default on the H200 put 23% of the softmax's
    # stall samples on the max's chain (benchmarks/NOTES.md, session 8). The max is bitwise the same;
    # the sum rounds in another order. Off: 1.000-1.005x the default on the H200 (the chains' latency
    # is not on the critical path).
    tree_reduce: bool = False
    # The row sum l kept as each thread's partial sums, [block_q, 8] in the WGMMA layout (a thread's
    # 2 columns of every 8-column tile, the tiles added in the thread), and added across the row's 4
    # threads once, after the loop: no shuffles in a step, as FA4's sm90 loop (its SASS: 4 SHFL a step,
    # the max's; ours 8). In the default loop the sum's 4 shuffles and the adds that wait for them sit
    # between the last exp2 and the wait for P V (ncu's source view, NOTES session 14), and a warp
    # issues in order. 4 multiplies by alpha a step instead of 2. The sum rounds in another order. With
    # late_pv_wait a second never-taken branch before the wait for P V keeps it below the exp2 (else
    # ptxas hoists it to the max's shuffles). With the lazy rescale: 0.954x it at 1.3B 480p-81f on the H200
    # (NOTES session 14; ptxas then issues 60 of the 66 exp2 back to back and the sum's adds after that
    # wait). With the exact rescale and pv_wait_after_cols (8 or 16), FA4's loop: GRID_MOSAIC_FWD.
    row_sum_in_thread: bool = False
    # None: every exp2 of the softmax on the multi-function unit (ex2.approx, 8 cycles a warp). k >= 1:
    # every k-th 8-key tile of each unmasked key block by a degree-3 polynomial on the FMA pipe instead
    # (FlashAttention-4's split on Blackwell; relative error <= 7.5e-5, below bf16's rounding of P).
    # Off: 0.958x (k = 4) and 0.926x (k = 2) the default on the H200.
    exp2_poly_every: int | None = None
    # With overlap_qk and pingpong: the turn token through named barriers (bar.sync to take it, bar.arrive
    # to pass it; FA3's and FA4's warp scheduler barrier, one instruction each) instead of mbarriers,
    # whose wait is a try_wait loop. ncu's source view of FA4's sm90 forward (NOTES session 8) shows the
    # turn costing it 1.3% of its compute warps' stall samples. On the H200 the overlaps run as fast as
    # with mbarriers (0.895x and 0.91x the default).
    named_turn: bool = False
    # With overlap_qk: wait for K and the turn before opening S's accumulator scope, so that its zero
    # init lands next to the first wgmma. Opened first (False), the scope's fence holds 64 zeroed registers
    # across the waits and ptxas re-zeroes them with 31 CS2R while holding the turn (510 instructions a
    # middle step); opened after, ptxas folds them into the wgmma (RZ, scale-d off) as in the default
    # loop: 475 instructions, 469 with named_turn (FA4: 475; compiled without a GPU, benchmarks/NOTES.md
    # session 8). Timed on the H200: 0.89-0.91x the serial loop alone, the default with separate_kv_waits.
    overlap_waits_first: bool = False
    # The memory warpgroup reads the next block's index, waits until K's ring slot is free and loads K,
    # then the same for V; False: it waits for both slots, then reads the index and loads both. The
    # overlapped loops release V_j only after P_j V_j, late in step j + 1, and K_{j+2} (same slot) is
    # wanted right after: ncu's source view of overlap_late_p with named_turn and overlap_waits_first
    # on the H200 put 12% of the compute warps' stall samples on that K wait (FA4's sm90 forward waits
    # and loads K and V apart). On the H200 that overlap went from 0.91x to 1.04x the serial loop, whose
    # own speed it leaves as it was (1.004x; benchmarks/NOTES.md, session 9).
    separate_kv_waits: bool = False
    # With overlap_qk (and overlap_softmax): after the wait for S_{j+1}, a branch on the thread index
    # that is never taken (mosaic_fwd._convergence_point). ptxas otherwise puts the wait for P_j V_j
    # before the softmax's first exp2 whatever the PTX's order (6.8% of the compute warps' stall samples
    # on the H200, NOTES session 9). After a branch that may diverge it keeps that wait down to its
    # first consumer: all 64 exp2 run under P_j V_j (FA4's elected thread's release of K does the same
    # for 10 of its exp2). Found on FA4's PTX and ours compiled without a GPU; ~10 more instructions a
    # step. On the H200 (NOTES session 10): alone 0.98-0.99x, as O's 64 multiplies and P's 32 casts
    # then run after the wait with no exp2 left to hide them; with the lazy rescale, which skips the
    # multiplies of most warps, 1.015-1.031x the exact default: in LAZY_MOSAIC_FWD and GRID_MOSAIC_FWD.
    late_pv_wait: bool = False
    # With late_pv_wait and overlap_late_p: the wait for P_j V_j and O's rescale go
    # after the exp2 of S_{j+1}'s first pv_wait_after_cols columns (a multiple of 8: 4 exp2 a thread
    # per 8), the other exp2 after them (mosaic_fwd._exp2_around_pv_wait). In FA4's loop the wait comes
    # after 10 of its 64 exp2 and ptxas puts O's multiplies and P's casts between the rest (6 to an
    # exp2); with late_pv_wait alone ptxas keeps the wait below all 64 and runs the 64 multiplies and 32
    # casts after them with nothing to hide them (NOTES session 10). The same arithmetic: bitwise the
    # exact late_pv_wait loop's out and lse. Compiled (ptxas 13.0): the wait after 4 + cols/2 exp2 and
    # the multiplies 6-7 to an exp2, FA4's schedule, 477 instructions a step, no spills. On the H200 at
    # 1.3B 480p-81f (NOTES session 10): 8 / 16 / 24 columns 1.004x / 0.995x / 0.984x the default (lazy),
    # the exact late wait without it 0.964x: exact and as fast as the lazy default, not yet faster. With
    # row_sum_in_thread (no sum shuffles left between the exp2) 8 columns ran 1.014-1.054x the lazy loop:
    # GRID_MOSAIC_FWD since session 16. With the lazy rescale the warp votes after the wait and O's
    # multiplies sit in a branch before the other exp2 (ptxas then cannot interleave them; a warp whose
    # rows' max stayed skips them): 490 instructions a step with the multiplies, 426 without, the wait
    # after 6 exp2 (compiled without a GPU; fa4_order_lazy_fwd: 0.994-1.009x the default on the H200,
    # within the spread, NOTES session 16). 0: the wait right after O's row factors' exp2, before any of
    # S's (fa4_order_after0_fwd: the wait after 3 exp2 in the SASS; 0.973-0.990x).
    pv_wait_after_cols: int | None = None
    # The memory warpgroup's K/V loop on its first warp only (plgpu.warp_map), as FA4's sm90 producer is
    # one warp: in warpgroup semantics all 4 warps run the loop, each thread arrives with a 128th of the
    # TMA's bytes and a warpgroup barrier (bar.sync, 128 threads) precedes each copy, so the 4 warps meet
    # twice a step and take issue slots on all 4 SM sub-partitions. In warp semantics one warp arrives and
    # issues. Not with persistent.
    producer_warp: bool = False
    # Launch order (block_grid below). None: batch, then query tiles fastest, then heads (at batch 1
    # FA4's sm90 order: consecutive query tiles of one head share its K/V in L2); g: g heads of one
    # query tile launched together, then the next tile, ..., then the next g heads (g = 1: the default's
    # order at batch 1). Pallas Mosaic GPU hands the grid to CUDA reversed (benchmarks/NOTES.md,
    # 2026-11-30 PERSIST): block_grid writes its grids for that.
    grid_heads: int | None = None
    # Persistent grid: one CTA per SM walks the (head, query tile, batch) work items in the launch
    # order above (item w = cta, cta + CTAs, ..., work_coords), so its memory warpgroup loads the next item's first
    # K/V blocks (and each compute warpgroup the next Q) while the current item's last steps, O and lse
    # run: a CTA's start (Q and first K/V latency) and end (last P V, O store) no longer idle the SM.
    # What that can win (a list-scheduling model: the tail of the last wave is 1.8% at 1.3B 480p-81f,
    # less elsewhere) is mostly the overlap of one item's end with the next one's start. With overlap_qk
    # the turn token carries across items: warpgroup 1 hands the first turn over once per CTA, and each
    # item's phases take and pass it alike in both warpgroups. Not with overlap_p_smem or producer_warp.
    # On the H200 with the serial loop (NOTES session 8): 0.957-0.984x the grid. A model of the launch
    # (NOTES session 14; a CTA's fixed cost 4.6 key steps, session 7's fit): with a CTA's start and end
    # wholly hidden, this static walk would run 0.3% / 1.7% / 1.7% faster than the grid at 480p-81f /
    # 161f / 720p-81f, and a walk handing items out as CTAs free up 4.0% / 3.0% / 1.9%.
    persistent: bool = False
    # With persistent: CTAs launched. None: the GPU's SM count at trace time (jax.devices()[0].core_count),
    # or HOPPER_SMS when tracing off a GPU (cross-lowering), so a lowered module does not depend on the host.
    persistent_ctas: int | None = None
    # With persistent and GRID_MOSAIC_FWD's loop: the compute pipeline runs on across items. Item i's
    # last P V is issued together with item i + 1's first Q K^T (its Q double-buffered), the softmax of that
    # S runs while the P V is on the tensor cores, and item i's O is normalised and stored after the wait,
    # as a middle step rescales it. Without it each item fills and drains the pipeline alone: its first
    # S and softmax with no P V under them, its last P V with no S (session 15: the persistent grid then
    # hid none of a CTA's ~2.5-5 key steps of fixed cost; a model put a 1-step cost at up to 2.8% at 1.3B
    # 480p-81f, NOTES). The arithmetic of every item is the grid kernel's: out and lse bitwise its own.
    # On the H200 (NOTES session 17), against the grid default: 0.967x / 0.997x / 0.984x at 1.3B 480p-81f /
    # 480p-161f / 14B 720p-81f with the round robin (the persistent grid without it: 0.946x / 1.000x / 0.980x),
    # and with walk_item_cost=1.0 1.003x / 0.993x / 0.978x. Not the default.
    carry_items: bool = False
    # With persistent: how the work items are dealt to the CTAs. None: CTA c walks items c, c + CTAs, ...
    # (round robin). A float F: list scheduling at trace time (the mask is static, so each item's cost is
    # known): in launch order, each item goes to the CTA that would be free first, an item costing its
    # key blocks plus F steps (common.list_scheduled_walk). This is what the hardware does with a grid's
    # CTAs as SMs free up; the round robin instead lets CTAs drift apart (session 15: the static walk's
    # imbalance cost the persistent kernel 3.5% at 1.3B 480p-81f), and items far apart in launch order then
    # run at once (less of their K/V shared in L2). On the H200 (NOTES session 17) it lifted the persistent
    # grid at 1.3B 480p-81f from 0.946x to 0.988x the grid kernel (F = 3), with carry_items from 0.966x to
    # 1.003x (F = 1); at 480p-161f and 14B 720p-81f every persistent form stays 0.98-0.995x.
    walk_item_cost: float | None = None
    # K/V multicast across a cluster of two CTAs (FlashAttention-3's cluster mode, which FA4's sm90 forward
    # does not run). The grid runs pairs of query tiles (2p, 2p + 1), one CTA each, launched as one cluster.
    # Each tile walks the key blocks both tiles have first, in the same order, then its own, then its
    # masked ragged block (shared_first_pairs; 80-92% of a tile's blocks are shared on the radial masks), so
    # a CTA's step j takes ring slot j % stages exactly as in the grid kernel, and a shared block lands in
    # the same slot of both CTAs: it is one multicast TMA copy, each CTA issuing half and both receiving
    # all, after the two memory warpgroups meet on the slot's cluster barrier. After the shared steps the
    # two CTAs run apart. Each CTA's compute loop is the grid kernel's; its sums run in that order, so out
    # and lse are the grid kernel's run on the reordered tables. Why: at the 700 W cap, the K/V traffic
    # from L2 is 8-14% of a call's energy (ablate="loads", NOTES session 18), and a pair moves 54-60% of the
    # bytes of two lone CTAs at 1.3B 480p / 14B 720p. On the H200 (NOTES session 19) its clock at the cap is
    # 4-6% above the grid kernel's at the same power, but it takes 3-4% more cycles (the cluster launch;
    # the coupling of the two CTAs), so it runs 1.00-1.02x the grid kernel at the cap and 0.96x / 0.98x /
    # 1.01x at 480p-81f / 480p-161f / 720p-81f in alternating rounds. With pair_matching it is
    # DEFAULT_MOSAIC_FWD's from pairs_from_q_tiles on. (Session 18's design walked the union of the two
    # tiles' blocks in ascending order, the ring slots dealt into a table; it ran 0.94x / 0.98x / 1.01x:
    # replaced. Session 19's pair_release, the compute warpgroups releasing a shared slot in both CTAs
    # instead of the memory warpgroups' rendezvous, took 8% more cycles than the rendezvous (NOTES
    # session 20): removed.)
    kv_multicast: bool = False
    # With kv_multicast: the CTA pairs are matched_pairs' (tiles that share many blocks and have about as
    # many, read from a table) instead of tiles 2p and 2p + 1, so that a pair's SMs wait less for its longer
    # tile (idle SM time by the tables 0.5-0.7% against 1.1-1.8%). At one clock (ncu, 1.3B 480p-81f, NOTES
    # session 20) 0.3% fewer cycles than 2p and 2p + 1.
    pair_matching: bool = False
    # With kv_multicast: the pairs run only when the query has at least this many tiles (of 128 rows);
    # shorter queries run the grid kernel (this tuning with kv_multicast and pair_matching off). The pairs'
    # gain is at the power cap, where fewer bytes from L2 buy a higher clock, and they cost cycles: at
    # 1.3B 480p-81f (256 tiles) they ran 0.93-0.985x the grid kernel in alternating rounds and level with
    # it at the cap (session 19's pairs of tiles 2p and 2p + 1), at 480p-121f (378 tiles) 0.976x and
    # level; at 480p-161f (500 tiles) 1.014-1.023x at the cap and 0.975-1.025x alternating; at 14B 720p
    # (591 and 1154 tiles) 1.014-1.023x alternating and, at 720p-81f, 1.031-1.036x at the cap (NOTES
    # session 20).
    pairs_from_q_tiles: int = 0
    # Timing only, the output is wrong: the grid kernel with GRID_MOSAIC_FWD's loop minus one stage of
    # its middle steps, to measure what that stage costs at the 700 W cap (issue 16: "timing variants that
    # drop one stage"). "softmax": P = bf16(S), no row max, exp2, sum or rescale (what the matmuls, loads
    # and turns cost alone); "exp2": p = x, the max, shift, sum and rescale kept (what the multi-function
    # unit's exp2 costs); "rescale": O is not multiplied by its row factor; "loads": the TMA brings only
    # the first 8 of each K and V block's 128 rows (what moving K and V from L2 costs; the other rows are
    # those the SM's previous CTA left, real K/V values, so the tensor cores' power is a real step's);
    # "multicast" (with kv_multicast; the output is right): each CTA of a pair loads every block alone, to
    # price the pairing (cluster launch, reordered walk) apart from the multicast; "cluster" (with
    # kv_multicast, right output): the pairs' cluster launch with each CTA walking its blocks in the grid
    # kernel's order, loaded alone, to price the cluster launch alone. None: the kernel.
    ablate: str | None = None


def check_lazy_rescale_threshold(threshold: float | None) -> None:
    """Raises ValueError unless the lazy rescale's threshold is None (off) or in [0, 15] log2 units: p
    reaches 2^threshold, and f16 ends at 2^16 (FA4 uses 8)."""
    if threshold is not None and not 0.0 <= threshold <= 15.0:
        raise ValueError(f"lazy_rescale_threshold={threshold} is outside [0, 15] (log2 units; FA4 uses 8): "
                         "p reaches 2^threshold and f16 ends at 2^16")

# The library's forward until session 16 (LAZY_MOSAIC_FWD): FA3's intra-warpgroup overlap with P cast
# after its P V, the turn on named barriers, K's and the turn's waits before S's accumulator opens, K and
# V each loaded as soon as its own ring slot is free, the wait for P V kept below the softmax, and the
# lazy rescale at FA4's threshold. On the H200 (benchmarks/NOTES.md, sessions 9 and 10): the exact loop
# (lazy_rescale_threshold=None, late_pv_wait=False) 1.033-1.041x the serial one at 1.3B 480p-81f and
# 480p-161f and 14B 720p-81f (decay 1.0 and 0.2); the late wait with the lazy rescale another
# 1.015-1.031x. Without separate_kv_waits the loop ran 0.89-0.91x the serial one: V_j is released late
# in the overlapped order, and K_{j+2} waited for it.
LAZY_MOSAIC_FWD = MosaicTuning(overlap_qk=True, overlap_late_p=True, named_turn=True, overlap_waits_first=True,
                               separate_kv_waits=True, late_pv_wait=True, lazy_rescale_threshold=8.0)
# The grid kernel (the library's forward since session 16; below 384 query tiles still): that loop with
# FA4's softmax order instead of the lazy rescale: the exact online softmax, the row sum kept in each
# thread (its shuffles once after the loop), and the wait for P V with O's rescale after the exp2 of S's
# first 8 columns. Timed against LAZY_MOSAIC_FWD in one process, alternating rounds, on the H200 (NOTES
# session 16): 1.054x / 1.039x / 1.014x / 1.026x at 1.3B 480p-81f / 480p-161f / 14B 720p-81f / 720p-161f
# and 1.017x at decay 0.2; after 16 columns (FA4's place) 1.034x / 1.019x / 1.005x / 1.017x.
GRID_MOSAIC_FWD = dataclasses.replace(LAZY_MOSAIC_FWD, lazy_rescale_threshold=None, row_sum_in_thread=True,
                                      pv_wait_after_cols=8)
# The forward the library runs (KernelTuning's default) since session 20: GRID_MOSAIC_FWD, and from 384
# query tiles (49,152 query tokens: Wan 1.3B 480p-161f, 14B 720p-81f and longer) its loop on pairs
# of matched query tiles sharing K/V by multicast. Against the grid kernel on the H200 (NOTES session
# 20): at the cap 1.014-1.023x at 1.3B 480p-161f and 1.031-1.036x at 14B 720p-81f; in alternating rounds
# 0.975-1.025x (median 0.99x) / 1.015-1.023x / 1.014-1.021x at 480p-161f / 720p-81f / 720p-161f. Beside
# FA4 at the cap 1.029x / 1.040x at 480p-161f / 720p-81f.
DEFAULT_MOSAIC_FWD = dataclasses.replace(GRID_MOSAIC_FWD, kv_multicast=True, pair_matching=True,
                                         pairs_from_q_tiles=384)


@dataclasses.dataclass(frozen=True)
class MosaicBwdTuning:
    """The Mosaic backward (mosaic_bwd.py). MosaicBwdTuning() is the split design (a dq kernel and a
    dk/dv kernel), the default until session 12, which the fused designs are timed against; the library
    runs DEFAULT_MOSAIC_BWD below (start a variant of it with dataclasses.replace)."""

    block_q_dq: int = 64  # query rows per warpgroup in the dq kernel
    block_kv_dq: int = 64  # key tile streamed by the dq pipeline
    block_q_dkv: int = 64  # query tile streamed by the dk/dv pipeline
    block_kv_dkv: int = 64  # key rows per warpgroup in the dk/dv kernel
    max_concurrent_steps: int = 2  # 3 ran 5-6% slower on the H100 (benchmarks/NOTES.md)
    # One kernel with dq by TMA reduce-add. It needs head_dim % 128 == 0 and jax >= 0.11 (0.10 cannot
    # pass the accumulator Ref through plgpu.kernel); elsewhere the split kernels run. Its first
    # design, deferred_dq, ran the backward at ~430 on-block TFLOP/s on the H100 where the split
    # kernels ran ~505 (benchmarks/NOTES.md); DEFAULT_MOSAIC_BWD, 1.08-1.10x the split kernels
    # forward+backward on the H200 (NOTES sessions 11 and 12).
    fused: bool = False
    # The fused kernel's order within a step. "deferred_dq" (the measured one above): dQ of step
    # i - 1 is issued beside S^T of step i, then the exp2, a full wait and dQ's store before dP^T
    # and dV are even issued, so the tensor cores idle during the store. "fa4" (FlashAttention-4's
    # sm90 backward): S^T and dP^T issued together (exp2 under dP^T), dV under dS^T's store, then
    # dQ and dK issued together and dQ stored while dK runs: the tensor cores always have queued
    # work, at the price of a barrier of both warpgroups every step (lockstep, as FA4 runs).
    # "fa4_late_dv": the same with dV issued after dS^T's store, where FA4 issues it ("fa4" issues
    # it before dP^T's wait): 16 fewer live registers through dS^T's arithmetic, since "fa4" spills
    # (ptxas, H200) and the spill reloads stall the wgmma issues (ncu, benchmarks/NOTES.md session 6).
    # "private_dq": as "fa4_late_dv", but each warpgroup reduce-adds dS_w K_w over its own 64 keys
    # (two head-dim halves, twice the TMA reduce-adds) instead of meeting the other warpgroup for
    # dS K over all 128: no rendezvous, so the warpgroups are not held in lockstep.
    # Measured on the H200, forward+backward vs the split design (benchmarks/NOTES.md session 6):
    # deferred_dq 0.89-0.93x, fa4 0.82-0.84x, fa4_late_dv 0.92-0.97x, private_dq 0.85-0.88x
    # (the last two at memory_registers=24): none is the default.
    fused_order: str = "deferred_dq"
    # Registers per thread left to the memory warpgroup (TMA issue only; setmaxnreg takes a multiple
    # of 8 from 24 to 256); the two compute warpgroups share the rest of the 512, each rounded down
    # to a multiple of 8 (40 -> 232 each, 24 -> 240, FA4's split). ptxas spills
    # 276-452 bytes in the fused kernels (less at 240) and 24 in the split dk/dv kernel at 232 (0 at
    # 240, which times within the drift: 1.005-1.016x; benchmarks/NOTES.md session 6).
    memory_registers: int = 40
    # With fused_order="fa4_late_dv" or "private_dq": S^T's and dP^T's accumulators start at
    # -lse2/scale and -delta (per query column) instead of zero, so the exp2 and dS^T need no
    # registers for the stats (16 a thread each in the transposed S^T layout). The best fused
    # design with fa4_late_dv and 24 registers: 0.94-0.96x the split design on the H200.
    stats_in_acc: bool = False
    # How the fused kernel streams the query tiles. "emit": plgpu.emit_pipeline_warp_specialized, one
    # step a 64-row tile, whose buffers, barriers and dS^T / dQ staging slots are indexed by the
    # step's parity at run time. "static" (fused_order="fa4_late_dv" only): a hand-written pipeline
    # (mosaic_pipeline.static_query_pipeline) whose loop iteration is one 128-query mask block, i.e. two
    # steps unrolled in Python, the first on ring stage 0 and the second on stage 1, so every
    # shared-memory address, barrier and wgmma descriptor in the body is a compile-time constant (ncu
    # found the emit steps spilling and reloading such addresses, benchmarks/NOTES.md session 6).
    # "static_wg": the same with each compute warpgroup's code emitted apart (a branch on the
    # warpgroup around each), so its own K/V rows, dS^T half and dQ staging tile are constants too and
    # no wgmma descriptor depends on the thread index; twice the compute code.
    fused_pipeline: str = "emit"
    # How the split design's dk/dv kernel streams its query tiles: "emit" (emit_pipeline_warp_specialized,
    # slots indexed by the step's parity at run time) or "static" (mosaic_pipeline.static_query_pipeline,
    # the fused kernel's hand-written pipeline: a mask block an iteration as two steps on constant ring
    # stages, so the step's shared-memory addresses are constants; one release a stage, after dK).
    # "static" needs block_q_dkv = 64 and max_concurrent_steps = 2, the defaults.
    split_pipeline: str = "emit"
    # The fused kernel's f32 dQ staging tile in shared memory (registers -> SMEM -> TMA reduce-add):
    # "swizzle128", (8, 32) tiles swizzled over 128 bytes, or "tiles8x8", plain (8, 8) tiles. Both
    # store a warp's register pair as 256 contiguous bytes (no bank conflict), but the swizzle's
    # addresses depend on the row, which costs the store 48 selects a step in the lowered module
    # (ncu: 32 FSEL a warp and step); plain 8x8 tiles have none. The TMA copies the same values, but
    # from 8x8 tiles in 32-byte rows, from the swizzled ones in 128-byte rows: on the lean fused design
    # the swizzle ran 1.02-1.04x the plain tiles forward+backward (H200, NOTES session 12), and ncu saw
    # the plain tiles' kernel at 85% of L2 throughput (FA4's backward: 63%). "tiles8x8_flat": plain 8x8
    # tiles with dQ's GMEM accumulator in the same tile order ([B, N, rows / 8, D / 8, 64]), so the TMA
    # copies 256-byte rows without the swizzle's selects; the epilogue puts the rows back (ptxas 13.0: 441
    # instructions a step against the swizzle's 475; part of DEFAULT_MOSAIC_BWD since session 13).
    fused_dq_staging: str = "swizzle128"
    # The fused kernel's dK += dS^T Q (fa4 orders): A from dS^T's registers (an RS wgmma, as FA4 does),
    # or, with True, from this warpgroup's rows of the dS^T tile already stored to SMEM for dQ (an SS
    # wgmma): dS^T's 16 bf16 registers a thread die at that store instead of living until dK retires,
    # through the dQ wgmma and its staging, where the fused step's register pressure peaks (dK, dV, dQ
    # accumulators: 160 a thread) and ptxas spills.
    fused_dk_from_smem: bool = False
    # Launch order of every backward kernel (block_grid below), as MosaicTuning.grid_heads: None runs
    # batch, then the query (dq) or key (dk/dv, fused) blocks fastest; g, g heads of a block together.
    grid_heads: int | None = None
    # The key-block kernels (fused, split dk/dv) compiled with Pallas's unsafe_no_auto_barriers: no
    # warpgroup barrier (bar.sync, 128 threads) before and after each store of registers to shared memory.
    # Safe here: every such store (dS^T, the dQ staging tile, the epilogue's dK/dV) overwrites a region
    # only wgmma and TMA read, behind a wgmma wait, wait_smem_to_gmem (which has its own barrier) or the
    # warpgroups' dS^T barriers, and commit_smem (fence and barrier) makes it visible after. The fused
    # loop's warpgroup barriers go from 7 to 3 a step (FA4's: 2; ptxas 13.0, NOTES session 10).
    no_auto_barriers: bool = False
    # The split design's dk/dv kernel issues dP^T = V dO^T together with S^T = K Q^T and waits for S^T
    # alone, so dP^T runs under the exp2 (mosaic_pipeline.p_t_and_dp_t, the fused kernel's head of a
    # step); False issues S^T, waits for it, forms P^T, then issues dP^T and dV (ptxas 13.0: the S^T
    # wait comes before any exp2 with nothing else in flight in the warpgroup; ncu: the dk/dv kernel's
    # tensor pipe 83% busy against the dq kernel's 90%). dP^T's 32 accumulator registers a thread are
    # then live through the exp2.
    dkv_dp_with_s: bool = False
    # Each kernel's fixed wgmma operands (the fused and dk/dv kernels' K and V rows and the fused one's K
    # at its dQ columns; the dq kernel's Q and dO rows) taken again in every step, from the warpgroup
    # index passed through an optimization barrier. Their wgmma descriptors (8 a 128-deep operand) are
    # loop-invariant, so LLVM hoists them out of the loop, and ptxas then holds the 64-bit values in
    # vector registers (an R2UR before each use) and spills: the lean fused step 498 instructions and
    # 164 spill bytes. Formed in the step they are a uniform base plus constants, which ptxas builds in
    # uniform registers, as FlashAttention-4's loop does (ptxas 13.0, NOTES session 11).
    operands_in_step: bool = False
    # The late-dV fused orders issue dV right after dS^T's store to SMEM, before the fence and warpgroup
    # barrier (commit_smem) that publish the store to the dQ and dK wgmmas, as FlashAttention-4's loop does:
    # dV reads P^T's registers and dO, not the stored rows, and is queued on the tensor cores two barriers
    # earlier (H200, NOTES session 13: 1.004-1.008x alone, part of DEFAULT_MOSAIC_BWD).
    dv_before_commit: bool = False
    # How the fa4 orders' two compute warpgroups meet once both halves of a step's dS^T are in SMEM.
    # "mbarrier": each runs commit_smem (the async-proxy fence and its own 128-thread barrier), then
    # arrives on the slot's mbarrier and polls it (a try_wait loop; ncu put 3.8% of the compute warps'
    # samples on that loop, NOTES session 13). "named": the fence, then one bar.sync of both warpgroups'
    # 256 threads on a hardware barrier, as FA3's and FA4's PdS barrier: one instruction instead of a
    # warpgroup barrier, an arrive and a polling loop (lowered, not yet run on a GPU).
    ds_rendezvous: str = "mbarrier"
    # The fa4 orders' dQ partial: staged, published (commit_smem: the async-proxy fence and a warpgroup
    # barrier) and copied by TMA within its step (False), or staged only, then published by the next
    # step's fence after its dS^T store (one fence covers all the thread's earlier SMEM writes) and
    # copied by the next step after its dQ and dK are issued; the last step's after the loop. One fence
    # (MEMBAR.ALL.CTA + FENCE.VIEW.ASYNC.S) and one warpgroup barrier a step fewer, and the staging
    # stores drain under the next step's work instead of being waited for (ncu: the fence and barrier
    # after the dQ stores held 7.6% of the compute warps' samples, NOTES session 13). Emit pipeline only.
    dq_copy_next_step: bool = False


# The library's backward since session 12: the fused kernel in FlashAttention-4's order with dV issued
# after dS^T's store, the row statistics in S^T's and dP^T's accumulators, dK's A operand from the dS^T
# tile in SMEM, FA4's 24/240 register split and the fixed operands taken in each step. On the H200,
# forward+backward (NOTES session 12): with plain 8x8 dQ tiles it ran 1.072x, 1.058x, 1.057x the split
# kernels at 1.3B 480p-81f, 480p-161f and 14B 720p-81f (0.94-0.96x FA4 in the same calls); 128-byte
# swizzled tiles another 1.022x, 1.027x, 1.042x. Session 13: dV issued before dS^T's fence and barrier
# (dv_before_commit, FA4's place) and dQ's accumulator kept in tile order (fused_dq_staging="tiles8x8_flat":
# 256-byte TMA rows, no selects in the stores) another 1.007x, 1.012x, 1.017x, which put it at 0.978x,
# 0.990x and 1.008x FA4 in the same calls. Session 14: the warpgroups meet over dS^T on one named barrier
# (ds_rendezvous="named") and each step's dQ partial is copied by the next step (dq_copy_next_step), one
# fence and one warpgroup barrier a step fewer: another 1.047x, 1.034x, 1.036x, which put it at 1.030x,
# 1.024x and 1.038x FA4 in the same calls (NOTES session 14). Its dQ is summed in the order the TMA reduce-adds land, so it is
# not bitwise reproducible from run to run (dK and dV are). head_dim 64 and jax 0.10 run the split kernels
# with its other fields.
DEFAULT_MOSAIC_BWD = MosaicBwdTuning(fused=True, fused_order="fa4_late_dv", memory_registers=24, stats_in_acc=True,
                                     fused_dk_from_smem=True, operands_in_step=True, dv_before_commit=True,
                                     fused_dq_staging="tiles8x8_flat", ds_rendezvous="named",
                                     dq_copy_next_step=True)


@dataclasses.dataclass(frozen=True)
class TritonTuning:
    """One Triton-lowered kernel (triton_fwd.py, triton_bwd.py): Triton's launch parameters, and for the
    forward the softmax's rule."""

    num_warps: int = 4
    num_stages: int = 2
    # The forward's lazy rescale, MosaicTuning.lazy_rescale_threshold's rule row by row (a row's max is
    # raised only past the threshold, and its factor is exactly 1 where it is not); the Mosaic kernel's
    # per-warp skip of the multiply is its speed, not its values. The twin follows the Mosaic default so
    # that the CPU suite runs the algorithm the GPU does (exact since session 16). The Mosaic default's
    # other orders (the row sum added in each thread and across threads after the loop, the wait for
    # P V placed among the exp2) move only the sum's rounding and the schedule, so the twin keeps
    # Triton's per-step row sum. So does the pairs' order (from 384 query tiles the Mosaic default walks a
    # tile's key blocks shared with its pair first, a permutation of the row): the twin walks each row in
    # ascending order, and the GPU suite checks the pairs bitwise against the grid kernel on that
    # permutation. The backward ignores it.
    lazy_rescale_threshold: float | None = None
    # The backward as one kernel per key tile that also adds its dQ partials (dS K, dS cast to the input
    # dtype) into an f32 accumulator with atomic adds: MosaicBwdTuning(fused=True)'s algorithm, on in
    # KernelTuning's default as in the Mosaic one (DEFAULT_MOSAIC_BWD). Off: the dq kernel and the dk/dv
    # kernel, the split design's. The forward ignores it.
    fused_backward: bool = False


# The Triton twin's forward: the Mosaic default's softmax rule (exact since session 16), Triton's launch defaults.
DEFAULT_TRITON_FWD = TritonTuning(num_warps=4, num_stages=2,
                                  lazy_rescale_threshold=DEFAULT_MOSAIC_FWD.lazy_rescale_threshold)


@dataclasses.dataclass(frozen=True)
class KernelTuning:
    """Every tunable of the kernels as one frozen, hashable value (a static argument of jit and of
    the custom_vjp); each backend reads its own fields. Defaults: chosen with benchmarks/attention.py, on
    the H100 and, for the Mosaic forward since session 9, on the H200."""

    mosaic_fwd: MosaicTuning = DEFAULT_MOSAIC_FWD
    mosaic_bwd: MosaicBwdTuning = DEFAULT_MOSAIC_BWD
    triton_fwd: TritonTuning = DEFAULT_TRITON_FWD
    # The twin runs the Mosaic default's backward algorithm (fused), so the CPU suite checks it.
    triton_bwd: TritonTuning = TritonTuning(num_warps=4, num_stages=1, fused_backward=True)


def block_grid(heads: int, blocks: int, batch: int, block_axis: str, grid_heads: int | None):
    """Returns (grid, grid_names) of a Mosaic kernel with one CTA per (head, block, batch).

    Pallas Mosaic GPU reverses the grid for CUDA (its last axis becomes blockIdx.x, which runs fastest;
    the lowered gpu.launch shows it). None: the grid (heads, blocks, batch), launched batch fastest, then
    blocks, then heads. g: (heads / g * batch, blocks, g), launched g heads of one block together, then
    the next block, ..., then the next g heads (and batch). block_coords reads a CTA's (batch, head,
    block) back, work_coords the item-th CTA's.
    """
    if grid_heads is None:
        return (heads, blocks, batch), ("heads", block_axis, "batch")
    if not 1 <= grid_heads <= heads or heads % grid_heads:
        raise ValueError(f"grid_heads={grid_heads} must divide the {heads} heads")
    return (heads // grid_heads * batch, blocks, grid_heads), ("group_batch", block_axis, "head_in_group")


def block_coords(axis_index, heads: int, block_axis: str, grid_heads: int | None):
    """Returns (batch, head, block) of this CTA in block_grid's launch order.

    axis_index: name -> index of the CTA along that grid axis (jax.lax.axis_index in a kernel).
    """
    if grid_heads is None:
        return axis_index("batch"), axis_index("heads"), axis_index(block_axis)
    groups = heads // grid_heads
    group_batch = axis_index("group_batch")
    head = (group_batch % groups) * grid_heads + axis_index("head_in_group")
    return group_batch // groups, head, axis_index(block_axis)


def work_coords(item, heads: int, blocks: int, batch: int, grid_heads: int | None):
    """Returns (batch, head, block) of linear work item `item`: the item-th CTA a launch of block_grid's
    grid starts (CUDA's linear block index, i.e. the grid's last axis fastest, see block_grid).

    item: a Python/numpy int or an int32 scalar (traced in a kernel), 0 <= item < heads * blocks * batch.
    """
    grid, names = block_grid(heads, blocks, batch, "block", grid_heads)
    index, rest = {}, item
    for size, name in zip(grid[:0:-1], names[:0:-1]):  # the last axis first
        index[name], rest = rest % size, rest // size
    index[names[0]] = rest  # the slowest axis: what is left (item is in range)
    return block_coords(index.__getitem__, heads, "block", grid_heads)


def persistent_items(cta, num_ctas: int, total: int):
    """Returns how many work items CTA `cta` (0 <= cta < min(num_ctas, total)) walks, items cta,
    cta + num_ctas, ... below total: ceil((total - cta) / num_ctas), at least 1."""
    return (total - 1 - cta) // num_ctas + 1


def list_scheduled_walk(item_costs, num_ctas: int):
    """Returns walk [min(num_ctas, items), 1 + most items] int32, row c = (how many items CTA c walks, its items
    in launch order, -1 padding): items 0, 1, ... (launch order) dealt in turn to the CTA whose items so far
    cost the least (ties: the lowest CTA), as a launch hands CTAs to SMs as they free up. item_costs: [items]
    floats, > 0, so that every CTA gets at least one item (the first ones, one each). Equal costs deal the
    items round robin (CTA c: c, c + num_ctas, ...)."""
    costs = np.asarray(item_costs, np.float64)
    if not (costs > 0).all():
        raise ValueError("list_scheduled_walk needs every item's cost > 0 (else a CTA may get no item)")
    ctas = min(num_ctas, len(costs))
    free = [(0.0, cta) for cta in range(ctas)]  # (time the CTA is free, CTA), a heap
    walks = [[] for _ in range(ctas)]
    for item, cost in enumerate(costs):
        time, cta = heapq.heappop(free)
        walks[cta].append(item)
        heapq.heappush(free, (time + cost, cta))
    walk = np.full((ctas, 1 + max(map(len, walks))), -1, np.int32)
    for cta, items in enumerate(walks):
        walk[cta, 0] = len(items)
        walk[cta, 1:1 + len(items)] = items
    return walk


def matched_pairs(kv_ids, kv_counts, window: int = 40):
    """Returns pairs [ceil(tiles / 2), 2] int32 of query tiles for MosaicTuning.kv_multicast's CTA pairs,
    matched so that a pair shares many key blocks and its two tiles have about as many: candidates are tiles
    at most `window` apart, taken greedily by (shared blocks - 2 x the difference of their counts), the
    best first (ties: the lower tiles); the tiles left over pair in order, an odd last one with the
    phantom tile `tiles` (no blocks). Rows are sorted by their lower tile, the launch order.

    Why: a pair's SMs wait for its longer tile. Pairing tiles 2p and 2p + 1 leaves 1.1-1.8% of SM time idle
    at 1.3B 480p / 14B 720p by the tables; these pairs leave 0.5-0.7%, at the same shared bytes.
    """
    kv_ids, kv_counts = np.asarray(kv_ids), np.asarray(kv_counts)
    tiles = len(kv_counts)
    rows = [set(kv_ids[t, :kv_counts[t]].tolist()) for t in range(tiles)]
    scored = sorted((-(len(rows[a] & rows[b]) - 2 * abs(len(rows[a]) - len(rows[b]))), a, b)
                    for a in range(tiles) for b in range(a + 1, min(tiles, a + 1 + window)))
    taken, pairs = np.zeros(tiles + 1, bool), []
    for _, a, b in scored:
        if not (taken[a] or taken[b]):
            taken[[a, b]] = True
            pairs.append((a, b))
    left = [t for t in range(tiles) if not taken[t]] + ([tiles] if tiles % 2 else [])
    pairs += list(zip(left[0::2], left[1::2]))
    return np.array(sorted(pairs), np.int32).reshape(-1, 2)


def shared_first_pairs(kv_ids, kv_counts, kv_full_counts, pairs=None):
    """Orders each tile's key blocks for MosaicTuning.kv_multicast: the blocks both tiles of its pair have
    first, then its own, then its masked ragged block, so that a CTA's own step j takes ring slot
    j % stages as in the grid kernel and a shared block lands in the same slot of both CTAs.

    kv_ids: [tiles, width], kv_counts, kv_full_counts: [tiles] (BlockTables'); pairs: None (tiles 2p and
    2p + 1), or [P, 2] tiles (matched_pairs; tile `tiles` is an empty phantom). Returns (ids [2 * P,
    width] int32, row t tile t's blocks reordered, padding repeating its last; shared [P] int32, how many
    leading steps pair p's two rows have in common). Only full blocks are shared: the ragged block stays
    each row's last step (the only masked one), loaded by each CTA alone. An odd tile count pairs the
    last (or leftover) tile with the phantom (no shared steps).
    """
    kv_ids, kv_counts, kv_full_counts = map(np.asarray, (kv_ids, kv_counts, kv_full_counts))
    tiles, width = kv_ids.shape
    if pairs is None:
        pairs = np.arange(2 * -(-tiles // 2)).reshape(-1, 2)
    ids, shared = np.zeros((2 * len(pairs), width), np.int32), np.zeros(len(pairs), np.int32)
    for p, pair in enumerate(pairs):
        full = [kv_ids[t, :kv_full_counts[t]].tolist() if t < tiles else [] for t in pair]
        common = set(full[0]) & set(full[1])
        both = sorted(common)
        shared[p] = len(both)
        for m, tile in enumerate(pair):
            if tile >= tiles or not kv_counts[tile]:
                continue
            row = both + [b for b in full[m] if b not in common]
            row += kv_ids[tile, kv_full_counts[tile]:kv_counts[tile]].tolist()
            ids[tile] = row + [row[-1]] * (width - len(row))
    return ids, shared


def seq_multiple(x, multiple: int = TMA_SEQ_MULTIPLE):
    """Returns x [B, L, ...] zero-padded along L to a multiple of `multiple`; x itself (no copy) if it is one."""
    extra = -x.shape[1] % multiple
    if not extra:
        return x
    return jnp.pad(x, ((0, 0), (0, extra)) + ((0, 0),) * (x.ndim - 2))


def unpad_seq(x, length: int):
    """Returns x [B, L', ...] cut to L = length along axis 1; x itself if L' == L."""
    return x if x.shape[1] == length else x[:, :length]
