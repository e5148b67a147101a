"""Pallas kernels vs the jnp reference: interpret mode on the CPU, the real kernels on a GPU.

One base class over the kernel API; the interpret subclass runs the Triton twin at small sizes
everywhere, the GPU subclasses (skipped without a GPU) run the Triton and Mosaic kernels.
"""

import contextlib
import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from radial_jax import attention_reference, radial_block_mask
from radial_jax.kernels import (DEFAULT_MOSAIC_BWD, DEFAULT_MOSAIC_FWD, GRID_MOSAIC_FWD, LAZY_MOSAIC_FWD, KernelTuning,
                                MosaicBwdTuning, MosaicTuning, TritonTuning, block_sparse_attention)
from radial_jax.kernels.tables import block_tables

ON_GPU = jax.default_backend() == "gpu"
IS_HOPPER = ON_GPU and str(getattr(jax.devices()[0], "compute_capability", "")).startswith("9")


def _qkv(seed, batch, q_len, kv_len, heads, head_dim, dtype):
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    shape_q, shape_kv = (batch, q_len, heads, head_dim), (batch, kv_len, heads, head_dim)
    return (jax.random.normal(kq, shape_q, jnp.float32).astype(dtype),
            jax.random.normal(kk, shape_kv, jnp.float32).astype(dtype),
            jax.random.normal(kv, shape_kv, jnp.float32).astype(dtype))


def _random_mask(seed, q_blocks, kv_blocks, density, empty_rows=()):
    rng = np.random.default_rng(seed)
    mask = rng.random((q_blocks, kv_blocks)) < density
    mask[list(empty_rows)] = False
    return mask


def _masks(q_len, kv_len, block):
    qb, kb = -(-q_len // block), -(-kv_len // block)
    masks = {
        "all_on": np.ones((qb, kb), bool),
        "random_with_empty_rows": _random_mask(qb * 7 + kb, qb, kb, 0.4, empty_rows=(0, qb - 1)),
        "single_block_per_row": np.eye(qb, kb, k=0, dtype=bool)[:, ::-1].copy(),
    }
    frame_tokens = {1000: 100, 1560: 260, 512: 64}
    if q_len == kv_len and q_len in frame_tokens:
        s = frame_tokens[q_len]
        masks["radial"] = radial_block_mask(q_len // s, s, block_size=block, decay_factor=0.5)
    return masks


# (seq_q, seq_kv): residues mod 8 of 0..7 on both sides; mod 128: 0, 1, 2, 4, 7, 8, 61, 62, 64,
# 67, 72, 104, 127 (below 64 the second warpgroup's rows lie wholly past the end); tiny lengths
# (1, 7, 8); q and kv apart in both directions.
RAGGED_LENGTHS = [(1, 1), (7, 7), (61, 130), (4100, 4100), (1000, 7), (8, 1000), (4100, 257), (257, 4100),
                  (129, 129), (383, 383), (258, 258), (195, 195), (189, 189), (318, 318), (192, 320), (256, 200)]


# The lean fused design: FA4's order with dV late, the stats in the accumulators, dQ staged in plain tiles,
# dK's A from SMEM, 24/240 registers.
_LEAN = MosaicBwdTuning(fused=True, fused_order="fa4_late_dv", memory_registers=24, stats_in_acc=True,
                        fused_dq_staging="tiles8x8", fused_dk_from_smem=True)


def _ragged_mask(seed, q_len, kv_len, block):
    """A random mask holding the ragged last key block in every other row, row 1 empty where there are 3+ rows."""
    qb, kb = -(-q_len // block), -(-kv_len // block)
    mask = _random_mask(seed, qb, kb, 0.5)
    mask[::2, -1] = True
    mask[1::2, 0] = True
    if qb >= 3:
        mask[1] = False
    return mask


def pytest_generate_tests(metafunc):
    if "ragged" in metafunc.fixturenames and metafunc.cls is not None:  # each class its own list
        metafunc.parametrize("ragged", metafunc.cls.ragged_lengths, ids=lambda n: f"{n[0]}x{n[1]}")


class KernelChecks:
    """Forward of block_sparse_attention vs attention_reference (f32 HIGHEST) on one backend."""

    backend: str
    block: int = 128
    # (q_len, kv_len, heads, head_dim, batch)
    cases = [(1000, 1000, 3, 64, 2), (512, 768, 1, 128, 1), (1560, 1560, 12, 64, 1)]
    dtypes = (jnp.float32, jnp.bfloat16)
    grad_case = (1000, 1000, 2, 64, 2)
    ragged_lengths = RAGGED_LENGTHS
    ragged_dtype = jnp.float32
    tuning: KernelTuning | None = None  # None: the defaults

    def tolerance(self, dtype):
        # f32: <= 2e-5 of the output scale catches a wrong block or a missing rescale.
        return 2e-5 if dtype == jnp.float32 else 2e-2

    def check(self, q_len, kv_len, heads, head_dim, batch, dtype, mask, tolerance=None):
        q, k, v = _qkv(q_len + heads, batch, q_len, kv_len, heads, head_dim, dtype)
        out, lse = block_sparse_attention(q, k, v, mask, block_size=self.block, return_lse=True,
                                          backend=self.backend, tuning=self.tuning)
        f32 = lambda x: x.astype(jnp.float32)
        # jit: one compile per shape instead of one per eager op (the GPU suite runs dozens of shapes).
        reference = jax.jit(lambda q, k, v: attention_reference(q, k, v, mask, block_size=self.block))
        ref_out, ref_lse = reference(f32(q), f32(k), f32(v))
        self.assert_forward(out, lse, ref_out, ref_lse, q, mask, tolerance)

    def assert_forward(self, out, lse, ref_out, ref_lse, q, mask, tolerance=None):
        (batch, q_len, heads, _), dtype = q.shape, q.dtype
        assert out.shape == q.shape and out.dtype == q.dtype
        assert lse.shape == (batch, heads, q_len)
        assert not jnp.isnan(out).any() and not jnp.isnan(lse).any()
        scale = float(jnp.abs(ref_out).max())
        err = float(jnp.abs(out.astype(jnp.float32) - ref_out).max())
        tolerance = self.tolerance(dtype) if tolerance is None else tolerance
        assert err <= tolerance * scale, (err, scale, out.shape)
        finite = jnp.isfinite(ref_lse)
        assert bool((finite == jnp.isfinite(lse)).all())
        lse_err = float(jnp.abs(jnp.where(finite, lse - ref_lse, 0.0)).max())
        assert lse_err <= (1e-4 if dtype == jnp.float32 else 2e-2), lse_err
        empty = ~mask.any(axis=1)
        if empty.any():
            rows = np.repeat(empty, self.block)[:q_len]
            assert bool((out[:, rows] == 0).all())

    @pytest.mark.parametrize("case", range(3))
    @pytest.mark.parametrize("mask_name", ["all_on", "random_with_empty_rows", "single_block_per_row", "radial"])
    def test_kernel_matches_reference(self, case, mask_name):
        q_len, kv_len, heads, head_dim, batch = self.cases[case]
        masks = _masks(q_len, kv_len, self.block)
        if mask_name not in masks:
            pytest.skip(f"no {mask_name} mask for q_len={q_len}, kv_len={kv_len}")
        for dtype in self.dtypes:
            self.check(q_len, kv_len, heads, head_dim, batch, dtype, masks[mask_name])

    def grad_tolerance(self, dtype):
        # f32: <= 1e-4 of the gradient scale catches a wrong transpose table or a missing term.
        return 1e-4 if dtype == jnp.float32 else 3e-2

    @pytest.mark.parametrize("mask_name", ["all_on", "random_with_empty_rows", "single_block_per_row", "radial"])
    def test_gradients_match_reference(self, mask_name):
        q_len, kv_len, heads, head_dim, batch = self.grad_case
        mask = _masks(q_len, kv_len, self.block)[mask_name]
        self.check_gradients(q_len, kv_len, heads, head_dim, batch, self.dtypes[0], mask)

    def check_gradients(self, q_len, kv_len, heads, head_dim, batch, dtype, mask, tolerance=None):
        q, k, v = _qkv(5, batch, q_len, kv_len, heads, head_dim, dtype)
        weights = jax.random.normal(jax.random.key(7), (batch, q_len, heads, head_dim), jnp.float32)
        (_, _, grads), (_, _, ref_grads) = self.forward_and_gradients(q, k, v, mask, weights)
        self.assert_gradients(grads, ref_grads, q, mask, tolerance)

    def assert_gradients(self, grads, ref_grads, q, mask, tolerance=None):
        dtype, q_len = q.dtype, q.shape[1]
        tolerance = self.grad_tolerance(dtype) if tolerance is None else tolerance
        for name, g, r in zip("qkv", grads, ref_grads):
            assert g.shape == r.shape and g.dtype == dtype and not jnp.isnan(g).any(), name
            err = float(jnp.abs(g.astype(jnp.float32) - r).max())
            assert err <= tolerance * float(jnp.abs(r).max()), (name, err, g.shape)
        empty = ~mask.any(axis=1)
        if empty.any():
            rows = np.repeat(empty, self.block)[:q_len]
            assert bool((grads[0][:, rows] == 0).all())

    def forward_and_gradients(self, q, k, v, mask, weights):
        """Returns ((out, lse, grads) of ours, the same of the f32 reference): one jitted program each,
        so a length costs two compiles. The loss weighs out by `weights` and adds 0.1 * sum(lse)."""
        f32 = lambda x: x.astype(jnp.float32)

        def program(attend):
            def loss(q, k, v):
                out, lse = attend(q, k, v)
                finite_lse = jnp.where(jnp.isfinite(lse), lse, 0.0)
                return jnp.sum(f32(out) * weights) + 0.1 * jnp.sum(finite_lse), (out, lse)

            def run(q, k, v):
                (_, (out, lse)), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
                return out, lse, grads

            return jax.jit(run)

        ours = program(lambda q, k, v: block_sparse_attention(q, k, v, mask, block_size=self.block, return_lse=True,
                                                              backend=self.backend, tuning=self.tuning))
        reference = program(lambda q, k, v: attention_reference(q, k, v, mask, block_size=self.block))
        return ours(q, k, v), reference(f32(q), f32(k), f32(v))

    # f32 bounds as above; f16 (10 mantissa bits) keeps a missed or doubled row in sight.
    RAGGED_TOLERANCE = {jnp.float32: (2e-5, 1e-4), jnp.float16: (5e-3, 5e-3)}

    def test_any_length_forward_and_gradients_match_reference(self, ragged):
        """Lengths with every residue mod 8 and the mod-128 cases that matter (a warpgroup's 64 rows
        wholly or partly past the end), tiny ones, and seq_q != seq_kv (parametrized by the class's
        ragged_lengths, pytest_generate_tests): forward, lse and gradients."""
        q_len, kv_len = ragged
        dtype = self.ragged_dtype
        out_tol, grad_tol = self.RAGGED_TOLERANCE[dtype]
        mask = _ragged_mask(q_len * 7 + kv_len, q_len, kv_len, self.block)
        head_dim, batch = (64, 2) if (q_len + kv_len) % 3 == 0 else (128, 1)
        q, k, v = _qkv(q_len + kv_len, batch, q_len, kv_len, 2, head_dim, dtype)
        weights = jax.random.normal(jax.random.key(7), q.shape, jnp.float32)
        (out, lse, grads), (ref_out, ref_lse, ref_grads) = self.forward_and_gradients(q, k, v, mask, weights)
        self.assert_forward(out, lse, ref_out, ref_lse, q, mask, out_tol)
        self.assert_gradients(grads, ref_grads, q, mask, grad_tol)

    def test_custom_scale(self):
        q, k, v = _qkv(9, 1, 256, 256, 2, 64, self.dtypes[-1])
        mask = np.array([[True, False], [True, True]])
        out = block_sparse_attention(q, k, v, mask, block_size=self.block, scale=0.05, backend=self.backend,
                                     tuning=self.tuning)
        f32 = lambda x: x.astype(jnp.float32)
        ref, _ = attention_reference(f32(q), f32(k), f32(v), mask, block_size=self.block, scale=0.05)
        assert float(jnp.abs(f32(out) - ref).max()) <= self.tolerance(self.dtypes[-1]) * float(jnp.abs(ref).max())


class TestInterpret(KernelChecks):
    """The Triton twin under Pallas interpret mode: runs on any machine."""

    backend = "interpret"
    cases = [(1000, 1000, 3, 64, 2), (200, 520, 1, 128, 1), (1560, 1560, 12, 64, 1)]
    block = 128
    grad_case = (1000, 1000, 2, 64, 1)
    # Every residue mod 8 on one side or the other, at sizes interpret mode runs in seconds.
    ragged_lengths = [(1, 7), (195, 258), (260, 189), (318, 200)]

    def test_kernel_block_64_ragged(self):
        mask = radial_block_mask(10, 100, block_size=64)
        self.block = 64
        self.check(1000, 1000, 2, 64, 1, jnp.float32, mask)

    def test_gradients_ragged_cross_lengths_block_64(self):
        q, k, v = _qkv(3, 1, 300, 200, 2, 32, jnp.float32)
        mask = _random_mask(1, 5, 4, 0.6, empty_rows=(1,))
        loss = lambda q, k, v: jnp.sum(jnp.sin(block_sparse_attention(q, k, v, mask, block_size=64,
                                                                    backend="interpret")))
        ref_loss = lambda q, k, v: jnp.sum(jnp.sin(attention_reference(q, k, v, mask, block_size=64)[0]))
        grads = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
        ref_grads = jax.grad(ref_loss, argnums=(0, 1, 2))(q, k, v)
        for g, r in zip(grads, ref_grads):
            assert float(jnp.abs(g - r).max()) <= 1e-4 * float(jnp.abs(r).max())

    def test_gradient_matches_float64_finite_differences(self):
        q, k, v = _qkv(11, 1, 70, 90, 1, 16, jnp.float32)
        mask = np.array([[True, False], [True, True]])
        loss = lambda q, k, v: jnp.sum(jnp.cos(block_sparse_attention(q, k, v, mask, block_size=64,
                                                                    backend="interpret")))
        grads = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
        token_mask = np.repeat(np.repeat(mask, 64, 0), 64, 1)[:70, :90]

        def f64(q, k, v):
            logits = np.einsum("blnd,bmnd->bnlm", q, k) / 4.0
            logits = np.where(token_mask, logits, -np.inf)
            p = np.exp(logits - logits.max(-1, keepdims=True))
            return np.cos(np.einsum("bnlm,bmnd->blnd", p / p.sum(-1, keepdims=True), v)).sum()

        base = [np.asarray(x, np.float64) for x in (q, k, v)]
        rng = np.random.default_rng(0)
        for i in range(3):
            direction = rng.standard_normal(base[i].shape)
            plus, minus = list(base), list(base)
            plus[i], minus[i] = base[i] + 1e-6 * direction, base[i] - 1e-6 * direction
            numeric = (f64(*plus) - f64(*minus)) / 2e-6
            analytic = float(np.sum(np.asarray(grads[i], np.float64) * direction))
            assert abs(numeric - analytic) <= 1e-3 * max(1.0, abs(numeric)), (i, numeric, analytic)

    def test_grad_under_jit_remat_and_vmap(self):
        q, k, v = _qkv(12, 2, 256, 256, 1, 32, jnp.float32)
        mask = np.array([[True, False], [True, True]])
        attend = lambda q, k, v: block_sparse_attention(q, k, v, mask, block_size=128, backend="interpret")
        loss = lambda q, k, v: jnp.sum(jnp.sin(attend(q, k, v)))
        expected = jax.grad(loss)(q, k, v)
        remat = jax.jit(jax.grad(lambda q, k, v: jnp.sum(jnp.sin(jax.checkpoint(attend)(q, k, v)))))(q, k, v)
        per_example = jax.vmap(jax.grad(lambda q, k, v: jnp.sum(jnp.sin(attend(q[None], k[None], v[None])))))
        vmapped = per_example(q, k, v)
        np.testing.assert_allclose(remat, expected, atol=1e-6)
        np.testing.assert_allclose(vmapped, expected, atol=1e-6)


from hypothesis import given, settings, strategies as st  # noqa: E402


@settings(max_examples=8, deadline=None)
@given(q_len=st.integers(1, 400), kv_len=st.integers(1, 400), density=st.floats(0.0, 1.0),
       seed=st.integers(0, 2**16))
def test_interpret_kernel_matches_reference_on_drawn_masks(q_len, kv_len, density, seed):
    block = 64
    mask = _random_mask(seed, -(-q_len // block), -(-kv_len // block), density)
    checks = TestInterpret()
    checks.block = block
    checks.check(q_len, kv_len, 2, 64, 1, jnp.float32, mask)


# The twin's backward before session 12 (TritonTuning(fused_backward=False)): the dq kernel and the dk/dv
# kernel, the Mosaic split design's algorithm. The default twin (fused) runs TestInterpret.
_SPLIT_TWIN = KernelTuning(triton_bwd=dataclasses.replace(KernelTuning().triton_bwd, fused_backward=False))


def test_the_default_twin_runs_the_fused_backward():
    assert KernelTuning().triton_bwd.fused_backward and KernelTuning().mosaic_bwd.fused


@pytest.mark.parametrize("mask_name", ["all_on", "random_with_empty_rows", "single_block_per_row", "radial"])
def test_interpret_split_backward_matches_reference(mask_name):
    checks = TestInterpret()
    checks.tuning = _SPLIT_TWIN
    q_len, kv_len, heads, head_dim, batch = checks.grad_case
    mask = _masks(q_len, kv_len, checks.block)[mask_name]
    checks.check_gradients(q_len, kv_len, heads, head_dim, batch, jnp.float32, mask)


@pytest.mark.parametrize("lengths", [(1, 7), (260, 189), (318, 200)], ids=lambda n: f"{n[0]}x{n[1]}")
def test_interpret_split_backward_any_length(lengths):
    checks = TestInterpret()
    checks.tuning = _SPLIT_TWIN
    checks.test_any_length_forward_and_gradients_match_reference(lengths)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_interpret_fused_backward_changes_only_the_dq_sum(dtype):
    # The fused twin runs the dk/dv kernel's steps unchanged, so dk and dv are bitwise the split
    # twin's; dq sums the same f32 products dS K (dS cast to the input dtype) over key blocks by atomic
    # adds instead of over the query tile's loop, so it agrees to the rounding of that order.
    q_len, kv_len, heads, batch = 300, 389, 2, 2
    mask = _random_mask(3, 3, 4, 0.6, empty_rows=(1,))
    q, k, v = _qkv(4, batch, q_len, kv_len, heads, 64, dtype)
    weights = jax.random.normal(jax.random.key(8), q.shape, jnp.float32)

    def grads(tuning):
        loss = lambda q, k, v: jnp.sum(block_sparse_attention(q, k, v, mask, block_size=128, backend="interpret",
                                                              tuning=tuning).astype(jnp.float32) * weights)
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)

    (dq, dk, dv), (ref_dq, ref_dk, ref_dv) = grads(None), grads(_SPLIT_TWIN)
    assert bool((dk == ref_dk).all()) and bool((dv == ref_dv).all())
    f32 = lambda x: x.astype(jnp.float32)
    bound = (1e-6 if dtype == jnp.float32 else 1e-2) * float(jnp.abs(f32(ref_dq)).max())
    assert float(jnp.abs(f32(dq) - f32(ref_dq)).max()) <= bound
    rows = np.repeat(~mask.any(axis=1), 128)[:q_len]
    assert bool((dq[:, rows] == 0).all())


@pytest.mark.skipif(jax.__version_info__ >= (0, 11) and not ON_GPU,
                    reason="jax >= 0.11 lowers a Triton kernel for CUDA only with a GPU to read its compute capability")
def test_fused_twin_lowers_to_one_triton_kernel_with_atomic_adds():
    # Lowered for CUDA on any machine: the split twin is two Triton kernels (dq, dk/dv) without atomics;
    # the fused twin one (dk/dv with dQ), whose Triton IR holds the atomic read-modify-writes.
    from radial_jax.kernels import triton_bwd

    mask = _random_mask(2, 8, 8, 0.5)
    tables = block_tables(mask, 128, 1000, 1000)
    q = jax.ShapeDtypeStruct((2, 1000, 2, 64), jnp.bfloat16)
    rows = jax.ShapeDtypeStruct((2, 2, 1000), jnp.float32)
    texts = {}
    for fused in (False, True):
        tuning = dataclasses.replace(KernelTuning().triton_bwd, fused_backward=fused)
        backward = lambda *a, tuning=tuning: triton_bwd.triton_backward(*a, tables=tables, scale=0.1, tuning=tuning)
        traced = jax.jit(backward).trace(q, q, q, q, rows, q, rows)
        texts[fused] = traced.lower(lowering_platforms=("cuda",)).as_text()
    kernels = {fused: text.count("__gpu$xla.gpu.triton") for fused, text in texts.items()}
    assert kernels == {False: 2, True: 1}
    assert "atomic_rmw" not in texts[False] and "atomic_rmw" in texts[True]


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")
class TestTritonGPU(KernelChecks):
    backend = "triton"


@pytest.mark.gpu
@pytest.mark.skipif(not IS_HOPPER, reason="needs a Hopper GPU (sm90) for the Mosaic kernel")
class TestMosaicGPU(KernelChecks):
    backend = "mosaic"
    dtypes = (jnp.bfloat16, jnp.float16)
    ragged_dtype = jnp.float16
    cases = [(1000, 1000, 3, 64, 2), (512, 768, 1, 128, 1), (1560, 1560, 12, 128, 1)]

    grad_case = (1560, 1560, 3, 128, 2)

    def tolerance(self, dtype):
        return 2e-2

    @pytest.mark.parametrize("lengths", [(1560, 1560), (1000, 1560), (1560, 1000)])
    @pytest.mark.parametrize("variant", ["split", "split_dq_tile_128", "fused", "fused_dq_swizzle", "fused_dv_late",
                                         "fused_mbarrier_ds", "fused_dq_in_step", "fused_session13"])
    def test_backward_variants_match_reference(self, lengths, variant):
        # The fused kernel's dQ comes from two warpgroups' TMA reduce-adds across key blocks; the
        # split kernels compute it per query block, in 64- or 128-key tiles. f16 (10 mantissa
        # bits) keeps the bound tight.
        from radial_jax.kernels import mosaic_bwd, mosaic_fwd

        tuning = {"split": mosaic_bwd.MosaicBwdTuning(fused=False),
                  "split_dq_tile_128": mosaic_bwd.MosaicBwdTuning(fused=False, block_kv_dq=128),
                  "split_static": mosaic_bwd.MosaicBwdTuning(split_pipeline="static"),
                  "split_static_regs240": mosaic_bwd.MosaicBwdTuning(split_pipeline="static", memory_registers=24),
                  "fused": mosaic_bwd.MosaicBwdTuning(fused=True),
                  "fused_dq_swizzle": dataclasses.replace(DEFAULT_MOSAIC_BWD, fused_dq_staging="swizzle128"),
                  "fused_dv_late": dataclasses.replace(DEFAULT_MOSAIC_BWD, dv_before_commit=False),
                  "fused_mbarrier_ds": dataclasses.replace(DEFAULT_MOSAIC_BWD, ds_rendezvous="mbarrier"),
                  "fused_dq_in_step": dataclasses.replace(DEFAULT_MOSAIC_BWD, dq_copy_next_step=False),
                  "fused_session13": dataclasses.replace(DEFAULT_MOSAIC_BWD, dq_copy_next_step=False,
                                                         ds_rendezvous="mbarrier"),
                  "fused_fa4": mosaic_bwd.MosaicBwdTuning(fused=True, fused_order="fa4"),
                  "fused_fa4_late_dv": mosaic_bwd.MosaicBwdTuning(fused=True, fused_order="fa4_late_dv",
                                                                  memory_registers=24),
                  "fused_fa4_stats": mosaic_bwd.MosaicBwdTuning(fused=True, fused_order="fa4_late_dv",
                                                                memory_registers=24, stats_in_acc=True),
                  "fused_lean_noauto": dataclasses.replace(_LEAN, no_auto_barriers=True),
                  "fused_lean_in_step": dataclasses.replace(_LEAN, operands_in_step=True),
                  "fused_private_dq": mosaic_bwd.MosaicBwdTuning(fused=True, fused_order="private_dq",
                                                                 memory_registers=24),
                  "fused_private_dq_stats": mosaic_bwd.MosaicBwdTuning(fused=True, fused_order="private_dq",
                                                                       memory_registers=24, stats_in_acc=True),
                  "fused_static": mosaic_bwd.MosaicBwdTuning(fused=True, fused_order="fa4_late_dv",
                                                             memory_registers=24, fused_pipeline="static"),
                  "fused_static_stats": mosaic_bwd.MosaicBwdTuning(fused=True, fused_order="fa4_late_dv",
                                                                   memory_registers=24, stats_in_acc=True,
                                                                   fused_pipeline="static"),
                  "fused_static_wg_stats": mosaic_bwd.MosaicBwdTuning(fused=True, fused_order="fa4_late_dv",
                                                                      memory_registers=24, stats_in_acc=True,
                                                                      fused_pipeline="static_wg"),
                  "fused_static_dq8": mosaic_bwd.MosaicBwdTuning(fused=True, fused_order="fa4_late_dv",
                                                                 memory_registers=24, stats_in_acc=True,
                                                                 fused_pipeline="static", fused_dq_staging="tiles8x8"),
                  "fused_fa4_stats_dq8": mosaic_bwd.MosaicBwdTuning(fused=True, fused_order="fa4_late_dv",
                                                                    memory_registers=24, stats_in_acc=True,
                                                                    fused_dq_staging="tiles8x8"),
                  "fused_static_lean": mosaic_bwd.MosaicBwdTuning(fused=True, fused_order="fa4_late_dv",
                                                                  memory_registers=24, stats_in_acc=True,
                                                                  fused_pipeline="static", fused_dq_staging="tiles8x8",
                                                                  fused_dk_from_smem=True),
                  "fused_private_dq_dk_smem": mosaic_bwd.MosaicBwdTuning(fused=True, fused_order="private_dq",
                                                                         memory_registers=24,
                                                                         fused_dk_from_smem=True)}[variant]

        q_len, kv_len = lengths
        heads, head_dim, batch, block = 3, 128, 2, self.block
        mask = _random_mask(q_len + kv_len, -(-q_len // block), -(-kv_len // block), 0.5, empty_rows=(1,))
        mask[:, 2] = False  # an empty key-block column: the dk/dv side's count 0 (dK = dV = 0, no dQ added)
        tables = block_tables(mask, block, q_len, kv_len)
        q, k, v = _qkv(11, batch, q_len, kv_len, heads, head_dim, jnp.float16)
        d_out = jax.random.normal(jax.random.key(12), q.shape, jnp.float32).astype(jnp.float16)
        d_lse = jax.random.normal(jax.random.key(13), (batch, heads, q_len), jnp.float32)
        scale = head_dim**-0.5
        fwd_tuning = (self.tuning or KernelTuning()).mosaic_fwd
        out, lse = mosaic_fwd.mosaic_forward(q, k, v, tables=tables, scale=scale, tuning=fwd_tuning)

        f32 = lambda x: x.astype(jnp.float32)
        ref_fn = lambda q, k, v: attention_reference(q, k, v, mask, block_size=block)
        _, vjp = jax.vjp(ref_fn, f32(q), f32(k), f32(v))
        ref = vjp((f32(d_out), jnp.where(jnp.isfinite(lse), d_lse, 0.0)))
        grads = mosaic_bwd.mosaic_backward(q, k, v, out, lse, d_out, d_lse, tables=tables, scale=scale, tuning=tuning)
        for name, g, r in zip("qkv", grads, ref):
            assert g.shape == r.shape and g.dtype == jnp.float16, name
            err = float(jnp.abs(f32(g) - r).max())
            assert err <= 3e-3 * float(jnp.abs(r).max()), (name, err)
        rows = np.repeat(~mask.any(axis=1), block)[:q_len]
        assert bool((grads[0][:, rows] == 0).all())
        cols = np.repeat(~mask.any(axis=0), block)[:kv_len]
        assert cols.any() and bool((grads[1][:, cols] == 0).all()) and bool((grads[2][:, cols] == 0).all())


@pytest.mark.gpu
@pytest.mark.skipif(not IS_HOPPER, reason="needs a Hopper GPU (sm90) for the Mosaic kernel")
class TestMosaicFusedFA4GPU(TestMosaicGPU):
    """The Mosaic suite with the fused backward in FlashAttention-4's order (MosaicBwdTuning(fused=True,
    fused_order="fa4")): gradients of every mask (bf16, 3 heads, batch 2), any length (f16), the
    cross-length variant check (f16, an empty row). Its arithmetic is the deferred fused kernel's
    (dS^T cast to the input dtype, dQ summed in f32 by TMA reduce-adds), issued in another order, so
    the suite's bounds. The forward tests re-run the default forward."""

    tuning = KernelTuning(mosaic_bwd=MosaicBwdTuning(fused=True, fused_order="fa4"))
    # head_dim 128 (the fused kernel's condition) needs (q_len + kv_len) % 3 != 0 in the any-length
    # test; every residue mod 8 on the query side, tiny lengths, count 1, q and kv apart both ways.
    ragged_lengths = [(1, 1), (7, 7), (61, 130), (130, 61), (1000, 7), (8, 1001), (4100, 257), (257, 4100),
                      (195, 196), (318, 317), (383, 383), (258, 256), (192, 320), (256, 202)]

    @pytest.mark.parametrize("lengths", [(1560, 1560), (1000, 1560), (1560, 1000)])
    @pytest.mark.parametrize("variant", ["fused_fa4", "fused_fa4_late_dv", "fused_fa4_stats", "fused_private_dq",
                                         "fused_private_dq_stats", "fused_static", "fused_static_stats",
                                         "fused_static_wg_stats"])
    def test_backward_variants_match_reference(self, lengths, variant):
        super().test_backward_variants_match_reference(lengths, variant)


@pytest.mark.gpu
@pytest.mark.skipif(not IS_HOPPER, reason="needs a Hopper GPU (sm90) for the Mosaic kernel")
class TestMosaicSplitGPU(TestMosaicGPU):
    """The suite on the split backward (MosaicBwdTuning(): a dq kernel and a dk/dv kernel), the default
    until session 12 and what head_dim 64 and jax 0.10 still run."""

    tuning = KernelTuning(mosaic_bwd=MosaicBwdTuning())
    # The variant check names its own tunings (the split ones among them): it runs in TestMosaicGPU.
    test_backward_variants_match_reference = None


@pytest.mark.gpu
@pytest.mark.skipif(not IS_HOPPER, reason="needs a Hopper GPU (sm90) for the Mosaic kernel")
class TestMosaicFusedLeanNoAutoGPU(TestMosaicFusedFA4GPU):
    """The lean fused design (_LEAN) compiled without Pallas's automatic warpgroup barriers
    (MosaicBwdTuning.no_auto_barriers): the same arithmetic; a missing barrier would show as a race."""

    tuning = KernelTuning(mosaic_bwd=dataclasses.replace(_LEAN, no_auto_barriers=True))

    @pytest.mark.parametrize("lengths", [(1560, 1560), (1000, 1560), (1560, 1000)])
    @pytest.mark.parametrize("variant", ["fused_lean_noauto"])
    def test_backward_variants_match_reference(self, lengths, variant):
        super().test_backward_variants_match_reference(lengths, variant)

@pytest.mark.gpu
@pytest.mark.skipif(not IS_HOPPER, reason="needs a Hopper GPU (sm90) for the Mosaic kernel")
class TestMosaicFusedStaticGPU(TestMosaicFusedFA4GPU):
    """The Mosaic suite with the fused backward on the hand-written static pipeline
    (MosaicBwdTuning(fused_pipeline="static"), fa4_late_dv with the stats in the accumulators, 24/240
    registers): the fa4_late_dv step's arithmetic, two steps an iteration on constant slots, so the
    same cases and bounds as TestMosaicFusedFA4GPU (any length, empty rows, cross lengths, and in the
    variant check an empty key-block column: no iteration, dK = dV = 0)."""

    tuning = KernelTuning(mosaic_bwd=MosaicBwdTuning(fused=True, fused_order="fa4_late_dv", memory_registers=24,
                                                     stats_in_acc=True, fused_pipeline="static"))

    @pytest.mark.parametrize("lengths", [(1560, 1560), (1000, 1560), (1560, 1000)])
    @pytest.mark.parametrize("variant", ["fused_static", "fused_static_stats", "fused_static_wg_stats", "fused_static_dq8",
                                         "fused_fa4_stats_dq8", "fused_static_lean", "fused_private_dq_dk_smem"])
    def test_backward_variants_match_reference(self, lengths, variant):
        super().test_backward_variants_match_reference(lengths, variant)


@pytest.mark.gpu
@pytest.mark.skipif(not IS_HOPPER, reason="needs a Hopper GPU (sm90) for the Mosaic kernel")
class TestMosaicFusedStaticWgGPU(TestMosaicFusedStaticGPU):
    """TestMosaicFusedStaticGPU with each compute warpgroup's code emitted apart
    (fused_pipeline="static_wg"): the same steps, so the same cases and bounds."""

    tuning = KernelTuning(mosaic_bwd=MosaicBwdTuning(fused=True, fused_order="fa4_late_dv", memory_registers=24,
                                                     stats_in_acc=True, fused_pipeline="static_wg"))


@pytest.mark.gpu
@pytest.mark.skipif(not IS_HOPPER, reason="needs a Hopper GPU (sm90) for the Mosaic kernel")
class TestMosaicSplitStaticGPU(TestMosaicGPU):
    """The Mosaic suite with the split dk/dv kernel on the static pipeline
    (MosaicBwdTuning(split_pipeline="static")): the split step's arithmetic, two steps an iteration
    on constant slots, so the suite's cases and bounds (any length, empty rows, cross lengths, and in
    the variant check an empty key-block column: no iteration, dK = dV = 0)."""

    tuning = KernelTuning(mosaic_bwd=MosaicBwdTuning(split_pipeline="static"))
    ragged_lengths = TestMosaicFusedFA4GPU.ragged_lengths

    @pytest.mark.parametrize("lengths", [(1560, 1560), (1000, 1560), (1560, 1000)])
    @pytest.mark.parametrize("variant", ["split_static", "split_static_regs240"])
    def test_backward_variants_match_reference(self, lengths, variant):
        super().test_backward_variants_match_reference(lengths, variant)


@pytest.mark.gpu
@pytest.mark.skipif(not IS_HOPPER, reason="needs a Hopper GPU (sm90) for the Mosaic kernel")
class TestMosaicOverlapGPU(TestMosaicGPU):
    """The Mosaic suite with the forward's intra-warpgroup overlap (MosaicTuning.overlap_qk): the same
    arithmetic issued in another order, so the same cases and bounds; the backward reads its lse.
    Radial, empty-row and one-block-per-row masks, bf16/f16, head_dim 64/128 come from the suite."""

    tuning = KernelTuning(mosaic_fwd=MosaicTuning(overlap_qk=True))
    # Every residue mod 8 on one side or the other; count 1 with a masked key block (kv 7), a
    # warpgroup's rows wholly past the end (61), q and kv apart both ways, the ragged block in
    # the middle steps (4100).
    ragged_lengths = [(1, 1), (7, 7), (61, 130), (1000, 7), (8, 1000), (4100, 257), (257, 4100), (383, 383),
                      (195, 195), (318, 318), (256, 200)]

    @pytest.mark.parametrize("lengths", [(1560, 1000)])
    @pytest.mark.parametrize("variant", ["split"])
    def test_backward_variants_match_reference(self, lengths, variant):
        super().test_backward_variants_match_reference(lengths, variant)

    @pytest.mark.parametrize("pingpong", [True, False], ids=["pingpong", "no_pingpong"])
    @pytest.mark.parametrize("shape", [(32760, 32760, 2), (4100, 1000, 3)], ids=["wan_480p_81f_radial", "ragged_cross"])
    def test_overlap_matches_the_serial_kernel(self, shape, pingpong):
        # Same operations in the same order per element (O is rescaled by step j+1's factor before
        # P_{j+1} V_{j+1} is added, as in the serial loop, MosaicTuning()), so out agrees to f16 rounding and lse
        # to f32 rounding; a block visited twice, skipped or unrescaled would move them by O(1).
        q_len, kv_len, heads = shape
        if q_len == kv_len:
            mask = radial_block_mask(21, 1560, block_size=self.block, decay_factor=1.0)
        else:
            mask = _ragged_mask(q_len + kv_len, q_len, kv_len, self.block)
        q, k, v = _qkv(q_len, 1, q_len, kv_len, heads, 128, jnp.float16)
        attend = lambda tuning: jax.jit(lambda q, k, v: block_sparse_attention(
            q, k, v, mask, block_size=self.block, return_lse=True, backend=self.backend, tuning=tuning))
        overlap = KernelTuning(mosaic_fwd=dataclasses.replace(self.tuning.mosaic_fwd, pingpong=pingpong))
        serial = KernelTuning(mosaic_fwd=MosaicTuning())
        (out, lse), (ref_out, ref_lse) = attend(overlap)(q, k, v), attend(serial)(q, k, v)
        f32 = lambda x: x.astype(jnp.float32)
        assert float(jnp.abs(f32(out) - f32(ref_out)).max()) <= 2**-9 * float(jnp.abs(f32(ref_out)).max())
        finite = jnp.isfinite(ref_lse)
        assert bool((finite == jnp.isfinite(lse)).all())
        lse_err = float(jnp.abs(jnp.where(finite, lse - ref_lse, 0.0)).max())
        assert lse_err <= 1e-5 * float(jnp.abs(ref_lse[finite]).max()), lse_err


class TestMosaicSerialGPU(TestMosaicOverlapGPU):
    """The Mosaic suite on the serial key loop (MosaicTuning(): issue Q K^T, wait, softmax, issue P V,
    wait), the default forward until GRID_MOSAIC_FWD overlapped it; the persistent grid and the
    other designs build on it."""

    tuning = KernelTuning(mosaic_fwd=MosaicTuning())


class TestMosaicOverlapLatePGPU(TestMosaicOverlapGPU):
    """The overlap with P_{j+1} cast to bf16 only after P_j V_j is waited for
    (MosaicTuning.overlap_late_p): the cast no longer writes the registers of the wgmma in flight."""

    tuning = KernelTuning(mosaic_fwd=MosaicTuning(overlap_qk=True, overlap_late_p=True))


class TestMosaicOverlapPSmemGPU(TestMosaicOverlapGPU):
    """The overlap with P V as an SS wgmma (MosaicTuning.overlap_p_smem): P_{j+1} is cast after the
    wait and stored to the warpgroup's shared-memory tile, which the next P V reads."""

    tuning = KernelTuning(mosaic_fwd=MosaicTuning(overlap_qk=True, overlap_late_p=True, overlap_p_smem=True))


class TestMosaicPairedIssueGPU(TestMosaicOverlapGPU):
    """The overlapped loop waiting for P_j V_j with S_{j+1} before the softmax (MosaicTuning(overlap_qk=True,
    overlap_softmax=False)): the same arithmetic in the same order per element, so the overlap's cases
    and bounds, and its agreement with the default kernel."""

    tuning = KernelTuning(mosaic_fwd=MosaicTuning(overlap_qk=True, overlap_softmax=False))


class TestMosaicOverlapFA3GPU(TestMosaicOverlapGPU):
    """FA3's order in full: the late cast, and O rescaled between the S_{j+1} and the P_j V_j issues
    (MosaicTuning.overlap_early_rescale); step j's factor is carried to step j + 1."""

    tuning = KernelTuning(mosaic_fwd=MosaicTuning(overlap_qk=True, overlap_late_p=True, overlap_early_rescale=True))


class TestMosaicTreeReduceGPU(TestMosaicOverlapGPU):
    """The default loop with the softmax's row max and sum reduced as trees (MosaicTuning.tree_reduce):
    the same max bitwise and the sum rounded in another order, so the same cases and bounds, and the
    default kernel's out to f16 rounding and lse to f32 rounding (test_overlap_matches_the_default_kernel,
    with and without the ping-pong)."""

    tuning = KernelTuning(mosaic_fwd=MosaicTuning(tree_reduce=True))


class TestMosaicNamedTurnGPU(TestMosaicOverlapGPU):
    """The overlap with the late cast and its turn token on named barriers (MosaicTuning.named_turn):
    the same arithmetic in the same order, so the overlap's cases and bounds."""

    tuning = KernelTuning(mosaic_fwd=MosaicTuning(overlap_qk=True, overlap_late_p=True, named_turn=True))


class TestMosaicOverlapWaitsFirstGPU(TestMosaicOverlapGPU):
    """The overlap with the late cast, the named-barrier turn, and K's and the turn's waits before S's
    accumulator scope opens (MosaicTuning.overlap_waits_first): the same arithmetic in the same order."""

    tuning = KernelTuning(mosaic_fwd=MosaicTuning(overlap_qk=True, overlap_late_p=True, named_turn=True,
                                                  overlap_waits_first=True))


class TestMosaicOverlapSeparateKVGPU(TestMosaicOverlapGPU):
    """The overlap of TestMosaicOverlapWaitsFirstGPU with the memory warpgroup waiting for K's and V's
    ring slots apart (MosaicTuning.separate_kv_waits): the same arithmetic in the same order."""

    tuning = KernelTuning(mosaic_fwd=MosaicTuning(overlap_qk=True, overlap_late_p=True, named_turn=True,
                                                  overlap_waits_first=True, separate_kv_waits=True))


class TestMosaicLatePVWaitGPU(TestMosaicOverlapGPU):
    """The lazy default's exact form (LAZY_MOSAIC_FWD, the default until session 16, less its lazy
    rescale): the wait for P V kept below the softmax by a never-taken branch (MosaicTuning.late_pv_wait),
    the same arithmetic in the same order as the serial loop. LAZY_MOSAIC_FWD against this one is
    test_mosaic_lazy_rescale.py's."""

    tuning = KernelTuning(mosaic_fwd=dataclasses.replace(LAZY_MOSAIC_FWD, lazy_rescale_threshold=None))


class TestMosaicPVWaitAfterGPU(TestMosaicOverlapGPU):
    """The exact late-wait loop with the wait for P V and O's rescale after the exp2 of S's first 16
    columns (MosaicTuning.pv_wait_after_cols, FA4's place): the same arithmetic in the same order."""

    tuning = KernelTuning(mosaic_fwd=dataclasses.replace(LAZY_MOSAIC_FWD, lazy_rescale_threshold=None,
                                                         pv_wait_after_cols=16))

class TestMosaicProducerWarpGPU(TestMosaicOverlapGPU):
    """The default forward with its K/V loads issued by one warp of the memory warpgroup
    (MosaicTuning.producer_warp): the same arithmetic; the same cases and bounds."""

    tuning = KernelTuning(mosaic_fwd=dataclasses.replace(GRID_MOSAIC_FWD, producer_warp=True))

class TestMosaicRowSumInThreadGPU(TestMosaicOverlapGPU):
    """The lazy default (LAZY_MOSAIC_FWD) with its row sum kept as each thread's partial sums and added
    across the row's threads after the loop (MosaicTuning.row_sum_in_thread): the sum rounded in another
    order, so the same cases and bounds."""

    tuning = KernelTuning(mosaic_fwd=dataclasses.replace(LAZY_MOSAIC_FWD, row_sum_in_thread=True))



class TestMosaicDefaultOverlapGPU(TestMosaicOverlapGPU):
    """The default forward (FA4's loop: the exact late-wait loop, the row sum kept in each thread, the
    wait for P V after S's first 8 columns' exp2) through the overlap suite: its agreement with the
    serial loop (out to f16 rounding, lse to f32 rounding) besides TestMosaicGPU's cases and bounds."""

    tuning = KernelTuning()


class TestMosaicWaitAfter16GPU(TestMosaicOverlapGPU):
    """The default forward with the wait for P V after S's first 16 columns' exp2 (pv_wait_after_cols=16,
    where FA4's SASS waits): the same arithmetic in the same order as the default."""

    tuning = KernelTuning(mosaic_fwd=dataclasses.replace(GRID_MOSAIC_FWD, pv_wait_after_cols=16))


class TestMosaicExp2PolyGPU(TestMosaicOverlapGPU):
    """The tree reductions with every 4th 8-key tile's exp2 by the FMA pipe's polynomial
    (MosaicTuning.exp2_poly_every=4; relative error <= 7.5e-5 a term, under f16's 2^-11): the same cases
    and bounds, and the default kernel's out to f16 rounding and lse to 1e-5 relative."""

    tuning = KernelTuning(mosaic_fwd=MosaicTuning(tree_reduce=True, exp2_poly_every=4))


_FUSED = MosaicBwdTuning(fused=True, fused_order="fa4_late_dv", memory_registers=24)
# Designs that reorder the CTAs or re-address the same steps: (forward tuning, backward tuning, the
# backward they are compared with).
_SAME_VALUES = {
    "heads1": (MosaicTuning(grid_heads=1), MosaicBwdTuning(grid_heads=1), MosaicBwdTuning()),
    "heads2": (MosaicTuning(grid_heads=2), MosaicBwdTuning(grid_heads=2), MosaicBwdTuning()),
    "split_static": (MosaicTuning(), MosaicBwdTuning(split_pipeline="static"), MosaicBwdTuning()),
    "split_static_regs240": (MosaicTuning(), MosaicBwdTuning(split_pipeline="static", memory_registers=24),
                             MosaicBwdTuning()),
    "fused_heads2": (MosaicTuning(grid_heads=2), dataclasses.replace(_FUSED, grid_heads=2), _FUSED),
    "separate_kv": (MosaicTuning(separate_kv_waits=True), MosaicBwdTuning(), MosaicBwdTuning()),
    "dkv_dp_with_s": (MosaicTuning(), MosaicBwdTuning(dkv_dp_with_s=True), MosaicBwdTuning()),
    "dkv_dp_with_s_static": (MosaicTuning(), MosaicBwdTuning(dkv_dp_with_s=True, split_pipeline="static"),
                             MosaicBwdTuning()),
    "operands_in_step": (MosaicTuning(), MosaicBwdTuning(operands_in_step=True), MosaicBwdTuning()),
    "fused_lean_in_step": (MosaicTuning(), dataclasses.replace(_LEAN, operands_in_step=True), _LEAN),
    "fused_dq_swizzle": (MosaicTuning(), dataclasses.replace(DEFAULT_MOSAIC_BWD, fused_dq_staging="swizzle128"),
                         DEFAULT_MOSAIC_BWD),
    "dv_after_commit": (MosaicTuning(), dataclasses.replace(DEFAULT_MOSAIC_BWD, dv_before_commit=False),
                        DEFAULT_MOSAIC_BWD),
    "mbarrier_ds_rendezvous": (MosaicTuning(), dataclasses.replace(DEFAULT_MOSAIC_BWD, ds_rendezvous="mbarrier"),
                               DEFAULT_MOSAIC_BWD),
    "dq_copy_in_step": (MosaicTuning(), dataclasses.replace(DEFAULT_MOSAIC_BWD, dq_copy_next_step=False),
                        DEFAULT_MOSAIC_BWD),
    "stages3_separate_kv": (MosaicTuning(num_stages=3, separate_kv_waits=True), MosaicBwdTuning(), MosaicBwdTuning()),
    "persistent_separate_kv": (MosaicTuning(persistent=True, persistent_ctas=5, separate_kv_waits=True),
                               MosaicBwdTuning(), MosaicBwdTuning()),
}


@pytest.mark.gpu
@pytest.mark.skipif(not IS_HOPPER, reason="needs a Hopper GPU (sm90) for the Mosaic kernel")
@pytest.mark.parametrize("design", list(_SAME_VALUES))
def test_reordered_designs_change_no_value(design):
    # grid_heads only reorders the CTAs, split_pipeline="static" runs the same steps in the same order
    # on constant slots, dkv_dp_with_s issues the dk/dv step's wgmmas in another order (each element's
    # arithmetic unchanged), operands_in_step takes the same operand refs again in every step,
    # dv_before_commit issues the same dV at another place, the dQ stagings hold the same partials in another order,
    # ds_rendezvous="named" meets over the same dS^T on another barrier, dq_copy_next_step copies the same dQ
    # partials one step later,
    # separate_kv_waits reorders the memory warpgroup's waits and loads (with a
    # 3-slot ring too; and the persistent grid walks the same items, here 5 CTAs each several): each
    # CTA's arithmetic is the same, so out, lse and the split backward's gradients are bitwise those of
    # the design they are compared with. The fused dQ is summed by TMA
    # reduce-adds in arrival order, so it agrees to rounding only.
    q_len, kv_len, heads, batch, block = 1000, 1560, 4, 2, 128
    mask = _random_mask(7, -(-q_len // block), -(-kv_len // block), 0.5, empty_rows=(1,))
    mask[:, 2] = False  # an empty key-block column: a dk/dv CTA with no step
    q, k, v = _qkv(5, batch, q_len, kv_len, heads, 128, jnp.bfloat16)
    weights = jax.random.normal(jax.random.key(6), q.shape, jnp.float32)

    def run(fwd, bwd):
        tuning = KernelTuning(mosaic_fwd=fwd, mosaic_bwd=bwd)

        def loss(q, k, v):
            out, lse = block_sparse_attention(q, k, v, mask, block_size=block, return_lse=True, backend="mosaic",
                                              tuning=tuning)  # fmt: skip
            return jnp.sum(out.astype(jnp.float32) * weights), (out, lse)

        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)

    fwd, bwd, reference = _SAME_VALUES[design]
    (_, (out, lse)), grads = run(fwd, bwd)
    (_, (ref_out, ref_lse)), ref_grads = run(MosaicTuning(), reference)
    assert bool((out == ref_out).all()) and bool(jnp.array_equal(lse, ref_lse, equal_nan=True))
    for name, g, r in zip("qkv", grads, ref_grads):
        if bwd.fused and name == "q":
            assert float(jnp.abs(g - r).max()) <= 2e-2 * float(jnp.abs(r).max()), name  # bf16 rounding of dQ
        else:
            assert bool((g == r).all()), name


@pytest.mark.gpu
@pytest.mark.skipif(not IS_HOPPER, reason="needs a Hopper GPU (sm90) for the Mosaic kernel")
@pytest.mark.parametrize("cols", [0, 16])
def test_the_default_forward_waits_for_p_v_elsewhere_with_the_same_values(cols):
    # pv_wait_after_cols moves only the wait for P V and O's rescale among the exp2 (the default waits
    # after 8 columns): the same operations on the same values, so out and lse are bitwise the default's,
    # on ragged cross lengths with an empty row and at head_dim 128 and 64.
    for head_dim, dtype in ((128, jnp.float16), (64, jnp.bfloat16)):
        q_len, kv_len, heads, batch, block = 1000, 1560, 3, 2, 128
        mask = _random_mask(8, -(-q_len // block), -(-kv_len // block), 0.6, empty_rows=(2,))
        q, k, v = _qkv(9, batch, q_len, kv_len, heads, head_dim, dtype)
        attend = lambda fwd: jax.jit(lambda q, k, v: block_sparse_attention(
            q, k, v, mask, block_size=block, return_lse=True, backend="mosaic", tuning=KernelTuning(mosaic_fwd=fwd)))
        out, lse = attend(dataclasses.replace(GRID_MOSAIC_FWD, pv_wait_after_cols=cols))(q, k, v)
        ref_out, ref_lse = attend(GRID_MOSAIC_FWD)(q, k, v)
        assert bool((out == ref_out).all()) and bool(jnp.array_equal(lse, ref_lse, equal_nan=True)), head_dim


# (q_len, kv_len, heads, batch, head_dim, dtype) of TestMosaicPersistentGPU's cases.
_PERSISTENT_CASES = {
    "wan_480p_81f_radial": (32760, 32760, 2, 1, 128, jnp.bfloat16),  # 512 items, 1.3B-like rows
    "ragged_cross_empty_row": (4100, 1000, 3, 2, 128, jnp.float16),  # 198 items, 6 of them empty
    "random_hd64_empty_rows": (1000, 1560, 4, 2, 64, jnp.bfloat16),  # 64 items, 16 empty
    "tiny_7x129": (7, 129, 1, 2, 64, jnp.bfloat16),  # 2 items, one ragged key block each
    "tiny_61x130": (61, 130, 2, 2, 128, jnp.float16),  # the second warpgroup's rows all past the end
}


def _persistent_case(name):
    """((q, k, v), block mask) of a case of TestMosaicPersistentGPU."""
    q_len, kv_len, heads, batch, head_dim, dtype = _PERSISTENT_CASES[name]
    if name.startswith("wan"):
        mask = radial_block_mask(21, 1560, block_size=128, decay_factor=1.0)
    elif name.startswith("random"):
        mask = _random_mask(3, 8, 13, 0.4, empty_rows=(0, 7))
    else:  # the ragged last key block in every other row, row 1 empty where there are 3+ rows
        mask = _ragged_mask(q_len + kv_len, q_len, kv_len, 128)
    return _qkv(q_len + heads, batch, q_len, kv_len, heads, head_dim, dtype), mask


def _poison_free_memory(*shapes_and_dtypes):
    """Allocates NaN-filled arrays of the given (shape, dtype)s and frees them, so that the next outputs of
    those sizes likely take that memory (XLA's allocator reuses freed blocks): a tile a kernel never
    writes then reads NaN, not an earlier result that might be the expected one."""
    poison = [jnp.full(shape, jnp.nan, dtype) for shape, dtype in shapes_and_dtypes]
    jax.block_until_ready(poison)
    del poison


def _assert_persistent_forward_bitwise(name, reference, persistent, reference_tables=lambda tables: tables):
    """_assert_forward_bitwise on the case _PERSISTENT_CASES[name]."""
    return _assert_forward_bitwise(*_persistent_case(name), reference, persistent, reference_tables)


def _assert_forward_bitwise(qkv, mask, reference, tuning, reference_tables=lambda tables: tables):
    """Runs the Mosaic forward of qkv (q, k, v) on the block mask with tuning `reference` (on the mask's
    tables passed through reference_tables), then (over freed NaN-filled memory) with `tuning`, asserts out
    and lse bitwise equal and the reference free of NaN, and returns (out, lse, mask)."""
    from radial_jax.kernels import mosaic_fwd

    q, k, v = qkv
    q_len, kv_len = q.shape[1], k.shape[1]
    tables = block_tables(mask, 128, q_len, kv_len)
    run = lambda tuning, tables=tables: mosaic_fwd.mosaic_forward(q, k, v, tables=tables, scale=q.shape[-1] ** -0.5,
                                                                  tuning=tuning)  # fmt: skip
    ref_out, ref_lse = jax.block_until_ready(run(reference, reference_tables(tables)))  # kept alive
    padded_q = -(-q_len // 8) * 8
    _poison_free_memory(((q.shape[0], padded_q, *q.shape[2:]), q.dtype),
                        ((q.shape[0], q.shape[2], tables.num_q_blocks * 128), jnp.float32))  # fmt: skip
    out, lse = run(tuning)
    assert not jnp.isnan(ref_out).any() and not jnp.isnan(ref_lse).any()
    assert bool((out == ref_out).all()), float(jnp.abs(out.astype(jnp.float32) - ref_out.astype(jnp.float32)).max())
    assert bool(jnp.array_equal(lse, ref_lse)), float(jnp.nanmax(jnp.abs(lse - ref_lse)))
    return out, lse, mask


@pytest.mark.gpu
@pytest.mark.skipif(not IS_HOPPER, reason="needs a Hopper GPU (sm90) for the Mosaic kernel")
class TestMosaicPersistentGPU:
    """MosaicTuning(persistent=True) against the serial kernel (MosaicTuning()): each work item runs its key
    loop on the same data, so out and lse must be bitwise equal. With few CTAs (persistent_ctas=3)
    each walks dozens to hundreds of items with different key counts, empty rows among them (no K/V
    loads), so the K/V ring's slots and barrier phases carry across many item boundaries at every
    parity: a skipped item leaves its tile unwritten (NaN from the poisoned memory, or garbage), a
    stale phase reads a slot before its TMA lands (or hangs: run under `timeout`), an O stored before
    its last P V or a Q slot reloaded under a QK changes values. A duplicated item would write the same
    values twice; the CPU test test_persistent_ctas_walk_the_launch_order_once rules it out."""

    @pytest.mark.parametrize("name, grid_heads, ctas, lazy", [
        ("wan_480p_81f_radial", None, None, None), ("wan_480p_81f_radial", 1, None, None),
        ("wan_480p_81f_radial", None, 3, None), ("ragged_cross_empty_row", None, None, None),
        ("ragged_cross_empty_row", None, 3, None), ("ragged_cross_empty_row", 1, 3, None),
        ("ragged_cross_empty_row", None, 5, 8.0), ("random_hd64_empty_rows", None, 3, None),
        ("random_hd64_empty_rows", 2, None, None), ("tiny_7x129", None, None, None), ("tiny_7x129", None, 1, None),
        ("tiny_61x130", 1, 3, None)])  # fmt: skip
    def test_forward_is_bitwise_the_serial_kernel(self, name, grid_heads, ctas, lazy):
        persistent = MosaicTuning(persistent=True, persistent_ctas=ctas, grid_heads=grid_heads,
                                  lazy_rescale_threshold=lazy)  # fmt: skip
        out, lse, mask = _assert_persistent_forward_bitwise(name, MosaicTuning(lazy_rescale_threshold=lazy), persistent)
        q_len = out.shape[1]
        empty = np.repeat(~mask.any(axis=1), 128)[:q_len]  # zeros and lse = -inf, as the default writes
        assert bool((out[:, empty] == 0).all()) and bool((lse[..., empty] == -jnp.inf).all())
        assert empty.any() == (name not in ("wan_480p_81f_radial", "tiny_7x129", "tiny_61x130"))

    @pytest.mark.parametrize("name, ctas, fields", [
        ("wan_480p_81f_radial", None, {}), ("wan_480p_81f_radial", 3, {}), ("ragged_cross_empty_row", 3, {}),
        ("ragged_cross_empty_row", 5, {}), ("random_hd64_empty_rows", 3, {}), ("tiny_7x129", 1, {}),
        ("tiny_61x130", 3, {}), ("ragged_cross_empty_row", 3, {"named_turn": False}),
        ("ragged_cross_empty_row", 3, {"separate_kv_waits": False, "overlap_waits_first": False})])  # fmt: skip
    def test_overlapped_forward_is_bitwise_the_grid_one(self, name, ctas, fields):
        # The default forward's overlapped loop on the persistent grid: the turn token is handed over once a
        # CTA and carries across the items (empty ones take no turn), so each item's arithmetic is the
        # grid kernel's; a turn lost or taken twice would hang (run under `timeout`) or let the two
        # warpgroups' wgmmas overlap out of order, which moves no value but the time.
        grid = dataclasses.replace(GRID_MOSAIC_FWD, **fields)  # fields: the turn on mbarriers, K/V together
        _assert_persistent_forward_bitwise(name, grid, dataclasses.replace(grid, persistent=True, persistent_ctas=ctas))

    @pytest.mark.parametrize("name, ctas, fields, walk_cost", [
        ("wan_480p_81f_radial", None, {}, None), ("wan_480p_81f_radial", 3, {}, None),
        ("ragged_cross_empty_row", 1, {}, None), ("ragged_cross_empty_row", 3, {}, None),
        ("ragged_cross_empty_row", 5, {}, None), ("random_hd64_empty_rows", 1, {}, None),
        ("random_hd64_empty_rows", 3, {}, None), ("tiny_7x129", 1, {}, None), ("tiny_61x130", 3, {}, None),
        ("ragged_cross_empty_row", 3, {"named_turn": False}, None), ("random_hd64_empty_rows", 2, {"grid_heads": 1}, None),
        ("wan_480p_81f_radial", None, {}, 1.0), ("ragged_cross_empty_row", 5, {}, 1.0),
        ("random_hd64_empty_rows", 3, {}, 3.0), ("tiny_61x130", 3, {}, 0.5),
        ("random_hd64_empty_rows", None, {}, 0.5)])  # fmt: skip
    def test_carried_forward_is_bitwise_the_grid_one(self, name, ctas, fields, walk_cost):
        # carry_items: an item's first S is issued with the previous item's last P V, and that item's O is
        # normalised and stored after the wait. Every item's arithmetic is still the grid kernel's. With one
        # CTA, random_hd64_empty_rows walks four empty items in a row (row 7 of a head in both batches, then
        # row 0 of the next head), its first and last items among them, so a drain before an empty item and
        # an opening after one both run; a bridge that stored
        # the wrong item's O, zeroed O late, or read the next item's Q from the wrong slot moves values.
        # walk_cost: the items dealt by list scheduling (each CTA's list read from a table) rather than
        # round robin; with empty items (cost walk_cost alone) the CTAs' lists are uneven.
        grid = dataclasses.replace(GRID_MOSAIC_FWD, **fields)
        carried = dataclasses.replace(grid, persistent=True, persistent_ctas=ctas, carry_items=True,
                                      walk_item_cost=walk_cost)  # fmt: skip
        out, lse, mask = _assert_persistent_forward_bitwise(name, grid, carried)
        empty = np.repeat(~mask.any(axis=1), 128)[:out.shape[1]]
        assert bool((out[:, empty] == 0).all()) and bool((lse[..., empty] == -jnp.inf).all())

    @pytest.mark.parametrize("name, ctas", [("wan_480p_81f_radial", None), ("ragged_cross_empty_row", 5),
                                            ("random_hd64_empty_rows", 3)])  # fmt: skip
    def test_list_scheduled_forward_is_bitwise_the_grid_one(self, name, ctas):
        # walk_item_cost without carry_items: each item's own pipeline, the items dealt from the table.
        persistent = dataclasses.replace(GRID_MOSAIC_FWD, persistent=True, persistent_ctas=ctas, walk_item_cost=3.0)
        _assert_persistent_forward_bitwise(name, GRID_MOSAIC_FWD, persistent)

    def test_backward_on_the_persistent_forward_is_the_serial_one(self):
        # The backward reads the forward's out and lse; fed the persistent forward's, its dK and dV
        # (the loss weighs out and the finite lse) are bitwise those on the serial forward's. dQ is
        # summed in f32 by TMA reduce-adds from every key block's CTA in whatever order they land,
        # so it may differ between any two runs by the last bit of its f16 cast, and no more.
        (q, k, v), mask = _persistent_case("ragged_cross_empty_row")
        weights = jax.random.normal(jax.random.key(6), q.shape, jnp.float32)
        lse_weights = jax.random.normal(jax.random.key(7), (q.shape[0], q.shape[2], q.shape[1]), jnp.float32)

        def run(fwd):
            def loss(q, k, v):
                out, lse = block_sparse_attention(q, k, v, mask, block_size=128, return_lse=True, backend="mosaic",
                                                  tuning=KernelTuning(mosaic_fwd=fwd))  # fmt: skip
                finite_lse = jnp.where(jnp.isfinite(lse), lse, 0.0)
                return jnp.sum(out.astype(jnp.float32) * weights) + jnp.sum(finite_lse * lse_weights), (out, lse)
            return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)

        (ref_loss, (ref_out, ref_lse)), ref_grads = jax.block_until_ready(run(MosaicTuning()))
        (value, (out, lse)), grads = run(MosaicTuning(persistent=True, persistent_ctas=3))
        assert bool((out == ref_out).all()) and bool(jnp.array_equal(lse, ref_lse)) and float(value) == float(ref_loss)
        for name, g, r in zip("qkv", grads, ref_grads):
            assert bool(jnp.isfinite(r.astype(jnp.float32)).all()) and float(jnp.abs(r).max()) > 0, name
            if name == "q":
                g, r = np.asarray(g), np.asarray(r)
                assert (np.abs(g.astype(np.float32) - r) <= np.spacing(np.abs(r))).all(), name
            else:
                assert bool((g == r).all()), name


@pytest.mark.gpu
@pytest.mark.skipif(not IS_HOPPER, reason="needs a Hopper GPU (sm90) for the Mosaic kernel")
class TestMosaicMulticastGPU:
    """MosaicTuning.kv_multicast against the grid kernel (GRID_MOSAIC_FWD): a CTA pair runs two query
    tiles, each walking the key blocks both have first (shared_first_pairs), a shared block one multicast
    copy into the same ring slot of both CTAs. Each tile's loop is the grid kernel's on its reordered row,
    so out and lse must be bitwise those of the grid kernel run on the reordered tables. A block landed in
    the wrong slot or read before its other half arrived, a slot overwritten while the partner still reads
    it, or a phase out of step moves values or hangs (run under `timeout`). ragged_cross_empty_row (33
    tiles) and the tiny cases (1 tile) have an odd tile count, so the last tile's partner is past the end
    and loads nothing; the ragged cases keep their masked block last; the radial case's pairs share 85% of
    their blocks, the random masks' far fewer."""

    @staticmethod
    def reordered(tables, matching=False):
        from radial_jax.kernels.common import matched_pairs, shared_first_pairs

        pairs = matched_pairs(tables.kv_ids, tables.kv_counts) if matching else None
        ids = shared_first_pairs(tables.kv_ids, tables.kv_counts, tables.kv_full_counts, pairs)[0]
        return dataclasses.replace(tables, kv_ids=ids[:tables.num_q_blocks])

    @pytest.mark.parametrize("name, fields", [(name, fields) for name in _PERSISTENT_CASES for fields in (
        {}, {"num_stages": 3}, {"pair_matching": True}, {"pair_matching": True, "num_stages": 3})] + [
            (name, {"ablate": "multicast"}) for name in ("wan_480p_81f_radial", "ragged_cross_empty_row")])  # fmt: skip
    def test_forward_is_bitwise_the_grid_one_on_its_order(self, name, fields):
        # fields: a 3-slot ring; every block loaded alone (ablate="multicast": the pairs without it); matched
        # pairs (pair_matching: a tile read from the wrong row of the pairs' table, or written twice, moves values)
        tuning = dataclasses.replace(GRID_MOSAIC_FWD, kv_multicast=True, **fields)
        reordered = functools.partial(self.reordered, matching=tuning.pair_matching)
        out, lse, mask = _assert_persistent_forward_bitwise(name, GRID_MOSAIC_FWD, tuning, reordered)
        empty = np.repeat(~mask.any(axis=1), 128)[:out.shape[1]]
        assert bool((out[:, empty] == 0).all()) and bool((lse[..., empty] == -jnp.inf).all())

    @staticmethod
    def long_case():
        """((q, k, v), mask) with 385 query tiles (the last ragged) on 1.3B 480p-81f's radial rows, 2 heads:
        past DEFAULT_MOSAIC_FWD's 384, where the library runs matched pairs."""
        q_len, kv_len = 384 * 128 + 77, 32760
        rows = radial_block_mask(21, 1560, block_size=128, decay_factor=1.0)
        mask = np.tile(rows, (2, 1))[:-(-q_len // 128)]
        return _qkv(11, 1, q_len, kv_len, 2, 128, jnp.bfloat16), mask

    def test_default_runs_matched_pairs_from_384_query_tiles(self):
        # The library's default forward at 385 tiles: out and lse bitwise the grid kernel's on the matched
        # pairs' order (at 256 tiles, wan_480p_81f_radial, it is the grid kernel: TestMosaicPersistentGPU)
        _assert_forward_bitwise(*self.long_case(), GRID_MOSAIC_FWD, DEFAULT_MOSAIC_FWD,
                                functools.partial(self.reordered, matching=True))

    def test_default_gradients_from_384_query_tiles_match_the_grid_kernels(self):
        # The backward reads the pairs' out and lse: its gradients must be the grid forward's up to the
        # rounding of the reordered sums (bf16 inputs; a wrong lse row moves a gradient row by O(1))
        (q, k, v), mask = self.long_case()
        loss = lambda tuning: jax.jit(jax.grad(lambda q, k, v: jnp.sum((block_sparse_attention(
            q, k, v, mask, block_size=128, backend="mosaic", tuning=tuning) * q[..., :1]).astype(jnp.float32)),
            argnums=(0, 1, 2)))(q, k, v)  # fmt: skip
        for got, want in zip(loss(None), loss(KernelTuning(mosaic_fwd=GRID_MOSAIC_FWD))):
            got, want = got.astype(jnp.float32), want.astype(jnp.float32)
            assert float(jnp.abs(got - want).max()) <= 2e-2 * float(jnp.abs(want).max())

    def test_cluster_launch_alone_is_bitwise_the_grid_one(self):
        # ablate="cluster": the pairs' launch with each tile's blocks in the grid kernel's order, loaded alone
        _assert_persistent_forward_bitwise("ragged_cross_empty_row", GRID_MOSAIC_FWD,
                                           dataclasses.replace(GRID_MOSAIC_FWD, kv_multicast=True, ablate="cluster"))


@pytest.mark.parametrize("matching", [False, True])
def test_shared_first_pairs_put_a_pairs_common_full_blocks_first_in_both_rows(matching):
    from radial_jax.kernels.common import matched_pairs, shared_first_pairs
    from radial_jax.kernels.tables import block_tables

    masks = [(radial_block_mask(21, 1560, block_size=128, decay_factor=1.0), 32760),  # 256 tiles, ragged
             (_random_mask(5, 33, 9, 0.5, empty_rows=(0, 32)), 9 * 128 - 70),  # odd tile count, empty rows
             (np.ones((1, 2), bool), 200)]
    for mask, kv_len in masks:
        tables = block_tables(mask, 128, mask.shape[0] * 128, kv_len)
        tiles = mask.shape[0]
        pairs = matched_pairs(tables.kv_ids, tables.kv_counts) if matching else np.arange(2 * -(-tiles // 2))
        pairs = pairs.reshape(-1, 2)
        ids, shared = shared_first_pairs(tables.kv_ids, tables.kv_counts, tables.kv_full_counts,
                                         pairs if matching else None)
        assert ids.shape == (2 * len(shared), tables.kv_ids.shape[1]) and len(shared) == -(-tiles // 2)
        ragged = mask[:, -1] & (kv_len % 128 != 0)
        for p, n in enumerate(shared):
            rows = [ids[t, :tables.kv_counts[t]] if t < tiles else ids[t, :0] for t in pairs[p]]
            full = [set(np.nonzero(mask[t, :-1] if ragged[t] else mask[t])[0]) if t < tiles else set()
                    for t in pairs[p]]
            assert n == len(full[0] & full[1])
            assert rows[0][:n].tolist() == rows[1][:n].tolist() == sorted(full[0] & full[1])
            for m, t in enumerate(pairs[p]):
                if t >= tiles:
                    continue
                assert sorted(rows[m].tolist()) == np.nonzero(mask[t])[0].tolist()  # each block once
                assert (not ragged[t]) or rows[m][-1] == mask.shape[1] - 1  # the masked block stays last
                assert tables.kv_counts[t] == 0 or (ids[t, tables.kv_counts[t]:] == rows[m][-1]).all()
        assert shared.sum() > 0.8 * tables.kv_counts.sum() / 2 or tiles < 256  # radial pairs share 85%


def test_matched_pairs_take_every_tile_once_and_wait_less_than_neighbours():
    from radial_jax.kernels.common import matched_pairs
    from radial_jax.kernels.tables import block_tables

    for frames, tokens in ((21, 1560), (41, 1560), (21, 3600)):  # 1.3B 480p-81f, 480p-161f, 14B 720p-81f
        mask = radial_block_mask(frames, tokens, block_size=128, decay_factor=1.0)
        tables = block_tables(mask, 128, frames * tokens, frames * tokens)
        tiles = mask.shape[0]
        pairs = matched_pairs(tables.kv_ids, tables.kv_counts)
        assert sorted(pairs.ravel().tolist()) == list(range(tiles + tiles % 2))  # each once; odd: + the phantom
        assert (pairs[:, 0] < pairs[:, 1]).all() and (np.diff(pairs[:, 0]) > 0).all()  # launch order

        def costs(pairs):  # (bytes a pair reads against two lone CTAs, SM time a pair's shorter tile idles)
            sets = [set(np.nonzero(row)[0]) for row in mask] + [set()]
            counts = np.array([len(x) for x in sets], float)
            shared = sum(len(sets[a] & sets[b]) for a, b in pairs)
            idle = sum(abs(counts[a] - counts[b]) for a, b in pairs)
            return 1 - shared / counts.sum(), idle / (counts.sum() + idle)

        neighbours = np.arange(tiles + tiles % 2).reshape(-1, 2)
        (bytes_n, idle_n), (bytes_m, idle_m) = costs(neighbours), costs(pairs)
        # measured: idle 1.8% / 1.7% / 1.1% for neighbours, 0.7% / 0.7% / 0.5% matched; bytes within 0.6%
        assert idle_m < 0.6 * idle_n and bytes_m < bytes_n + 0.01, (frames, tokens, idle_n, idle_m, bytes_n, bytes_m)
    pairs = matched_pairs(np.array([[0], [0], [0]], np.int32), np.ones(3, np.int32))
    assert pairs.tolist() == [[0, 1], [2, 3]]  # the odd tile out with the phantom


def test_list_scheduled_walk_deals_every_item_once_to_the_first_free_cta():
    from radial_jax.kernels.common import list_scheduled_walk, persistent_items

    rng = np.random.default_rng(3)
    for total, ctas in [(1, 4), (7, 3), (100, 7), (3072, 132)]:
        equal = list_scheduled_walk(np.ones(total), ctas)  # equal costs: round robin
        for cta in range(min(ctas, total)):
            n = int(equal[cta, 0])
            assert n == persistent_items(cta, ctas, total)
            assert equal[cta, 1:1 + n].tolist() == list(range(cta, total, ctas)) and (equal[cta, 1 + n:] == -1).all()
        costs = rng.integers(0, 40, total) + 0.5  # empty rows cost only the item's own 0.5
        # Positive costs: every CTA gets an item, the first min(ctas, total) items one each.
        assert (list_scheduled_walk(costs, ctas)[:, 1] == np.arange(min(ctas, total))).all()
        walk = list_scheduled_walk(costs, ctas)
        dealt = [walk[c, 1:1 + walk[c, 0]] for c in range(walk.shape[0])]
        assert sorted(np.concatenate(dealt).tolist()) == list(range(total))
        assert all((np.diff(items) > 0).all() for items in dealt)  # each CTA's items in launch order
        loads = np.array([costs[items].sum() for items in dealt])
        # List scheduling: no CTA ends more than one item after the least loaded one could have taken it.
        assert loads.max() <= loads.min() + costs.max() + 1e-9
        # Replaying the deal: each item went to a CTA that was free first when it was dealt.
        finish = np.zeros(walk.shape[0])
        owner = {int(item): c for c, items in enumerate(dealt) for item in items}
        for item in range(total):
            assert finish[owner[item]] == finish.min()
            finish[owner[item]] += costs[item]
    with pytest.raises(ValueError, match="cost > 0"):
        list_scheduled_walk(np.array([1.0, 0.0, 2.0]), 2)


def test_launch_order_visits_every_head_block_and_batch_once():
    from radial_jax.kernels.common import block_grid

    heads, blocks, batch = 12, 5, 2
    for grid_heads in (None, 1, 2, 3, 4, 6, 12):
        grid, names = block_grid(heads, blocks, batch, "q_seq", grid_heads)
        order = _launch_order(heads, blocks, batch, grid_heads)
        assert len(set(order)) == heads * blocks * batch == len(order) == int(np.prod(grid))
        assert all(0 <= b < batch and 0 <= h < heads and 0 <= t < blocks for b, h, t in order)
        if grid_heads is None:  # batch fastest, then the blocks of head 0
            assert order[: blocks * batch] == [(b, 0, t) for t in range(blocks) for b in range(batch)]
        else:  # the first g heads of a block together, block after block, in batch 0
            assert order[: grid_heads * blocks] == [(0, h, t) for t in range(blocks) for h in range(grid_heads)]
    with pytest.raises(ValueError, match="grid_heads=5 must divide the 12 heads"):
        block_grid(heads, blocks, batch, "q_seq", 5)


def _launch_order(heads, blocks, batch, grid_heads) -> list[tuple[int, int, int]]:
    """(batch, head, block) of each CTA of block_grid's grid in CUDA's launch order: linear block index
    x + X * (y + Y * z). Pallas Mosaic GPU hands the grid to CUDA reversed, (x, y, z) = its (last, middle,
    first) axis (test_mosaic_lowering checks the lowered gpu.launch)."""
    from radial_jax.kernels.common import block_coords, block_grid

    grid, names = block_grid(heads, blocks, batch, "q_seq", grid_heads)
    order = []
    for z in range(grid[0]):
        for y in range(grid[1]):
            for x in range(grid[2]):
                index = {names[0]: z, names[1]: y, names[2]: x}.__getitem__
                order.append(tuple(int(c) for c in block_coords(index, heads, "q_seq", grid_heads)))
    return order


@pytest.mark.parametrize("grid_heads", [None, 1, 2, 3, 12])
def test_persistent_ctas_walk_the_launch_order_once(grid_heads):
    # MosaicTuning(persistent=True): CTA c of n walks items c, c + n, ... (persistent_items of them)
    # and item w is the w-th CTA a normal launch starts (work_coords), so the CTAs together visit
    # every (batch, head, query tile) once, whatever n, and the first n items are the first wave's.
    # In the kernel both take int32 values (traced): the same numbers.
    from radial_jax.kernels.common import persistent_items, work_coords

    heads, blocks, batch = 12, 5, 2
    total = heads * blocks * batch
    order = _launch_order(heads, blocks, batch, grid_heads)
    assert [tuple(int(c) for c in work_coords(w, heads, blocks, batch, grid_heads)) for w in range(total)] == order
    traced = jax.jit(lambda w: jnp.stack(work_coords(w, heads, blocks, batch, grid_heads)))
    assert np.asarray(traced(jnp.arange(total, dtype=jnp.int32))).T.tolist() == [list(c) for c in order]
    for n in (1, 3, 7, 64, 132, total - 1, total):
        counts = [int(persistent_items(cta, n, total)) for cta in range(min(n, total))]
        ctas = jnp.arange(min(n, total), dtype=jnp.int32)
        assert np.asarray(jax.jit(lambda c: persistent_items(c, n, total))(ctas)).tolist() == counts
        walked = [cta + i * n for cta, count in enumerate(counts) for i in range(count)]
        assert sorted(walked) == list(range(total)), n


def test_tables_list_exactly_the_mask_blocks():
    mask = _random_mask(4, 9, 7, 0.5, empty_rows=(2,))
    t = block_tables(mask, 128, 9 * 128 - 5, 7 * 128 - 50)
    for i in range(9):
        ids = t.kv_ids[i, : t.kv_counts[i]]
        assert sorted(ids.tolist()) == np.flatnonzero(mask[i]).tolist()
        if mask[i, -1]:  # the ragged key block comes last and is not counted as full
            assert ids[-1] == 6 and t.kv_full_counts[i] == t.kv_counts[i] - 1
        else:
            assert t.kv_full_counts[i] == t.kv_counts[i]
    for j in range(7):
        assert t.q_ids[j, : t.q_counts[j]].tolist() == np.flatnonzero(mask[:, j]).tolist()
    assert t.kv_counts[2] == 0


def test_tables_are_cached_per_mask():
    mask = radial_block_mask(8, 256)
    assert block_tables(mask, 128, 2048, 2048) is block_tables(mask.copy(), 128, 2048, 2048)


def test_tables_build_fast_at_720p_161f():
    import time

    mask = radial_block_mask(41, 3600)
    start = time.perf_counter()
    block_tables(mask, 128, 41 * 3600, 41 * 3600)
    assert time.perf_counter() - start < 1.0


def test_tuning_reaches_the_kernels_through_radial_attention():
    # Non-default Triton launch parameters must appear in the lowered forward and backward kernels.
    import radial_jax

    tuning = radial_jax.KernelTuning(triton_fwd=TritonTuning(num_warps=8, num_stages=3),
                                     triton_bwd=TritonTuning(num_warps=2, num_stages=4))
    q, k, v = _qkv(3, 1, 256, 256, 1, 32, jnp.float32)
    mask = np.array([[True, False], [True, True]])
    loss = lambda q, k, v: jnp.sum(radial_jax.radial_attention(q, k, v, block_mask=mask, implementation="pallas",
                                                               tuning=tuning))  # fmt: skip
    with pytest.warns(UserWarning, match="interpret mode") if not ON_GPU else contextlib.nullcontext():
        text = str(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v))
    params = [(int(w), int(s)) for w, s in re.findall(r"num_warps=(\d+), num_stages=(\d+)", text)]
    assert (8, 3) in params and (2, 4) in params and (4, 2) not in params, params
