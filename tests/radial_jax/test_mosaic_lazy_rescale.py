"""The forward's lazy rescale (MosaicTuning.lazy_rescale_threshold, the default until session 16) on a
Hopper GPU, against the f32 reference and the exact kernel: a row's running max stays stale until a key block passes it
by more than the threshold, so out and lse must not move beyond rounding. On the CPU: its lowering
(test_mosaic_lowering.py) and the same rule in the Triton twin (TritonTuning.lazy_rescale_threshold,
off in the twin's default as in the Mosaic one) under interpret mode, on inputs whose row maxima jump late.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tests.radial_jax.test_kernels as kernel_tests
from radial_jax import attention_reference, radial_block_mask
from radial_jax.kernels import GRID_MOSAIC_FWD, KernelTuning, MosaicTuning, TritonTuning, block_sparse_attention
from radial_jax.kernels.tables import block_tables


@pytest.mark.gpu
@pytest.mark.skipif(not kernel_tests.IS_HOPPER, reason="needs a Hopper GPU (sm90) for the Mosaic kernel")
class TestLazyRescaleGPU:
    backend = "mosaic"
    block = 128
    checks = kernel_tests.TestMosaicGPU()  # assert_forward / assert_gradients, the Mosaic suite's bounds
    overlap = {}  # MosaicTuning's overlap fields

    LAZY_CASES = {  # name: (q_len, kv_len, heads, head_dim, batch, dtype, radial (frames, tokens) or None)
        "radial_10x100_d64": (1000, 1000, 3, 64, 2, jnp.float16, (10, 100)),
        "radial_7x151_off_tma_tiling": (1057, 1057, 2, 128, 1, jnp.bfloat16, (7, 151)),
        "radial_21x1560_wan_480p_81f": (32760, 32760, 2, 128, 1, jnp.bfloat16, (21, 1560)),
        "random_cross_1000x1560": (1000, 1560, 2, 128, 1, jnp.float16, None),
    }

    @pytest.mark.parametrize("name", list(LAZY_CASES))
    def test_lazy_rescale_matches_reference_and_exact_kernel(self, name):
        q_len, kv_len, heads, head_dim, batch, dtype, radial = self.LAZY_CASES[name]
        if radial:
            mask = radial_block_mask(*radial, block_size=self.block, decay_factor=1.0 if q_len > 10_000 else 0.5)
        else:
            mask = kernel_tests._ragged_mask(q_len + kv_len, q_len, kv_len, self.block)
        q, k, v = kernel_tests._qkv(q_len + 3, batch, q_len, kv_len, heads, head_dim, dtype)
        self.check_lazy_forward(q, k, v, mask, 8.0, tolerance=5e-3 if dtype == jnp.float16 else 2e-2)

    @pytest.mark.parametrize("threshold", [8.0, 0.0])
    def test_lazy_rescale_when_row_maxima_jump_late(self, threshold):
        # Rows of one warp see their logits jump by 9 to 26 log2 units in later key blocks (the max
        # must move: that warp rescales while others skip) and by 4 in between (the max stays stale,
        # p reaches ~2^4 to 2^8); half of another warp jumps by less; the rest never jump.
        # _lazy_max_events replays the rule on these inputs to prove both paths are taken.
        q_len, kv_len = 1000, 1560
        mask = kernel_tests._ragged_mask(11, q_len, kv_len, self.block)
        q, k, v = _late_jump_qkv(q_len, kv_len, heads=2, head_dim=128, dtype=jnp.float16)
        tables = block_tables(mask, self.block, q_len, kv_len)
        moved_late, stale_high = _lazy_max_events(q[0, :, 0], k[0, :, 0], tables, 128**-0.5, threshold)
        events = (int(moved_late.sum()), int(stale_high.sum()))
        assert events[0] >= 32 and (events[1] >= 32 or not threshold), events
        self.check_lazy_forward(q, k, v, mask, threshold, tolerance=5e-3)
        if threshold:  # the backward reads the lazy forward's lse
            tuning = self.lazy_tuning(threshold)
            weights = jax.random.normal(jax.random.key(7), q.shape, jnp.float32)
            f32 = lambda x: x.astype(jnp.float32)

            def gradients(attend):
                loss = lambda q, k, v: jnp.sum(f32(attend(q, k, v)) * weights)
                return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))

            grads = gradients(lambda q, k, v: block_sparse_attention(q, k, v, mask, block_size=self.block,
                                                                     backend=self.backend, tuning=tuning))(q, k, v)
            ref = gradients(lambda q, k, v: attention_reference(q, k, v, mask, block_size=self.block)[0])
            self.checks.assert_gradients(grads, ref(f32(q), f32(k), f32(v)), q, mask, 5e-3)

    def lazy_tuning(self, threshold):
        return KernelTuning(mosaic_fwd=MosaicTuning(lazy_rescale_threshold=threshold, **self.overlap))

    def check_lazy_forward(self, q, k, v, mask, threshold, tolerance):
        """The lazy kernel vs the f32 reference (assert_forward) and vs the same design without the lazy
        rescale, on the same inputs."""
        lazy = self.lazy_tuning(threshold)
        attend = lambda tuning: jax.jit(lambda q, k, v: block_sparse_attention(
            q, k, v, mask, block_size=self.block, return_lse=True, backend=self.backend, tuning=tuning))
        out, lse = attend(lazy)(q, k, v)
        exact = KernelTuning(mosaic_fwd=dataclasses.replace(lazy.mosaic_fwd, lazy_rescale_threshold=None))
        exact_out, exact_lse = attend(exact)(q, k, v)
        f32 = lambda x: x.astype(jnp.float32)
        reference = jax.jit(lambda q, k, v: attention_reference(q, k, v, mask, block_size=self.block))
        ref_out, ref_lse = reference(f32(q), f32(k), f32(v))
        self.checks.assert_forward(out, lse, ref_out, ref_lse, q, mask, tolerance)
        scale = float(jnp.abs(ref_out).max())
        assert float(jnp.abs(f32(out) - f32(exact_out)).max()) <= tolerance * scale
        finite = jnp.isfinite(exact_lse)
        assert bool((finite == jnp.isfinite(lse)).all())
        assert float(jnp.abs(jnp.where(finite, lse - exact_lse, 0.0)).max()) <= 1e-3


class TestLazyRescaleOverlapGPU(TestLazyRescaleGPU):
    """The lazy rescale inside the intra-warpgroup overlap (MosaicTuning.overlap_qk): the warp vote
    and branch run on O after its wait_group 0, between two pipelined steps."""

    overlap = {"overlap_qk": True}


class TestLazyRescaleOverlapFA3GPU(TestLazyRescaleGPU):
    """The lazy rescale in FA3's order (overlap_late_p, overlap_early_rescale): the warp vote and branch
    act on O between the S_{j+1} and the P_j V_j issues, with step j's maxima carried to step j + 1."""

    overlap = {"overlap_qk": True, "overlap_late_p": True, "overlap_early_rescale": True}


class TestLazyRescaleLatePVWaitGPU(TestLazyRescaleGPU):
    """The default forward until session 16 (LAZY_MOSAIC_FWD's fields): the lazy rescale with the wait for
    P V kept below the softmax (late_pv_wait), so the warp vote and branch run on O right after that late wait, the
    step's second branch."""

    overlap = {"overlap_qk": True, "overlap_late_p": True, "named_turn": True, "overlap_waits_first": True,
               "separate_kv_waits": True, "late_pv_wait": True}



class TestLazyRescaleFA4OrderGPU(TestLazyRescaleGPU):
    """The lazy rescale in the default's FA4 order (row_sum_in_thread, pv_wait_after_cols=8): the warp
    votes after the wait for P V, which comes after S's first 8 columns' exp2, and skips O's multiplies
    where no row's max moved; the exact kernel it is compared with is the default."""

    overlap = {"overlap_qk": True, "overlap_late_p": True, "named_turn": True, "overlap_waits_first": True,
               "separate_kv_waits": True, "late_pv_wait": True, "row_sum_in_thread": True, "pv_wait_after_cols": 8}


class TestLazyRescaleInterpret:
    """The lazy rule in the Triton twin under interpret mode (any machine): the rows of one warp's band
    jump late past the threshold (their max must move), others rise by less (it stays stale and p grows
    to 2^threshold); out and lse match the f32 reference and the exact twin to rounding."""

    def test_the_twin_follows_the_mosaic_default(self):
        # Both exact since session 16 (the Mosaic default's speed came from FA4's softmax order instead).
        assert KernelTuning().triton_fwd.lazy_rescale_threshold is KernelTuning().mosaic_fwd.lazy_rescale_threshold is None

    @pytest.mark.parametrize("threshold", [8.0, 0.0])
    def test_lazy_twin_matches_reference_and_exact_twin(self, threshold):
        q_len, kv_len, block = 300, 700, 128  # ragged both ways; six key blocks for the five bands
        mask = kernel_tests._ragged_mask(11, q_len, kv_len, block)
        q, k, v = _late_jump_qkv(q_len, kv_len, heads=2, head_dim=64, dtype=jnp.float32)
        tables = block_tables(mask, block, q_len, kv_len)
        moved_late, stale_high = _lazy_max_events(q[0, :, 0], k[0, :, 0], tables, 64**-0.5, threshold)
        assert moved_late.sum() >= 16 and (stale_high.sum() >= 16 or not threshold), (moved_late.sum(), stale_high.sum())

        def attend(lazy):
            tuning = KernelTuning(triton_fwd=TritonTuning(lazy_rescale_threshold=lazy))
            return block_sparse_attention(q, k, v, mask, block_size=block, return_lse=True, backend="interpret",
                                          tuning=tuning)  # fmt: skip

        (out, lse), (exact_out, exact_lse) = attend(threshold), attend(None)
        ref_out, ref_lse = attention_reference(q, k, v, mask, block_size=block)
        kernel_tests.TestInterpret().assert_forward(out, lse, ref_out, ref_lse, q, mask)
        scale = float(jnp.abs(ref_out).max())
        assert float(jnp.abs(out - exact_out).max()) <= 1e-5 * scale
        finite = jnp.isfinite(exact_lse)  # empty rows: -inf in both
        assert bool((finite == jnp.isfinite(lse)).all())
        assert float(jnp.abs(jnp.where(finite, lse - exact_lse, 0.0)).max()) <= 1e-5 * float(jnp.abs(exact_lse[finite]).max())
        if threshold:  # the stale max is visible: p above 1 in some step, yet the same result
            assert not bool(jnp.array_equal(out, exact_out))

def _late_jump_qkv(q_len, kv_len, heads, head_dim, dtype):
    """q, k, v ~ N(0, 1) but for the last feature, which adds row_gain[r] * key_step[m] to logit (r, m)
    (natural units, at scale head_dim**-0.5): key_step climbs 0, 3, 9, 12, 30 over five bands of
    key blocks; row_gain is 1 on rows 0-15 of each 64-row warpgroup tile (one warp), 0.25 on rows
    16-23, 0 elsewhere. Returns f32 cast to dtype, [1, L, heads, head_dim]."""
    q, k, v = kernel_tests._qkv(21, 1, q_len, kv_len, heads, head_dim, jnp.float32)
    rows = np.arange(q_len) % 64
    row_gain = np.where(rows < 16, 1.0, np.where(rows < 24, 0.25, 0.0))
    kv_blocks = -(-kv_len // 128)
    band = np.minimum(np.arange(kv_len) // 128 * 5 // kv_blocks, 4)
    key_step = np.array([0.0, 3.0, 9.0, 12.0, 30.0])[band]
    q = q.at[..., -1].set(jnp.asarray(row_gain, jnp.float32)[None, :, None])
    k = k.at[..., -1].set(jnp.asarray(key_step * head_dim**0.5, jnp.float32)[None, :, None])
    return q.astype(dtype), k.astype(dtype), v.astype(dtype)


def _lazy_max_events(q, k, tables, scale, threshold):
    """Replays the lazy running max (log2 units) of each query row over its key blocks in the kernel's
    visiting order (tables.kv_ids) and returns two bool arrays over the rows: `moved_late` (the max
    moved at a step after the first) and `stale_high` (a step's max passed the stale max by 2 to
    `threshold` log2 units and it stayed, so p reached 4 to 2^threshold). q: [L, D], k: [M, D], one head."""
    q, k = np.asarray(q, np.float32), np.asarray(k, np.float32)
    q_len, kv_len, block = q.shape[0], k.shape[0], tables.block_size
    moved_late, stale_high = np.zeros(q_len, bool), np.zeros(q_len, bool)
    for qb in range(tables.num_q_blocks):
        rows = slice(qb * block, min((qb + 1) * block, q_len))
        running = None
        for kb in tables.kv_ids[qb, : tables.kv_counts[qb]]:
            keys = k[kb * block : min((kb + 1) * block, kv_len)]
            block_max = (q[rows] @ keys.T).max(axis=1) * scale * np.log2(np.e)
            if running is None:
                running = block_max
                continue
            rise = block_max - running
            moved_late[rows] |= rise > threshold
            stale_high[rows] |= (rise > 2.0) & (rise <= threshold)
            running = np.where(rise > threshold, block_max, running)
    return moved_late, stale_high


def test_the_fa4_order_class_runs_the_default_with_the_lazy_rescale():
    assert MosaicTuning(**TestLazyRescaleFA4OrderGPU.overlap) == GRID_MOSAIC_FWD
