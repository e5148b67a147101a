"""The Mosaic GPU kernels lower for CUDA on a machine without a GPU.

jax's cross-platform lowering (`.trace(...).lower(lowering_platforms=("cuda",))`) runs the whole
Pallas Mosaic GPU lowering here: wgmma shapes and transposes, smem tilings and swizzles, TMA
copies, barriers. The kernels themselves run only on a Hopper GPU (test_kernels.py); this
catches tracing and lowering errors in CI, on the jax version CI has.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend.core import jaxprs_in_params

from radial_jax.kernels import mosaic_bwd, mosaic_fwd
from radial_jax.kernels.tables import block_tables

# (q_len, kv_len, heads, head_dim); the last two are not multiples of 8 (the TMA's row tiling).
CASES = [(1000, 1000, 3, 128), (512, 768, 1, 64), (1560, 1000, 2, 128), (4100, 257, 2, 128), (7, 129, 1, 64)]


def _lowered_text(fn, *shapes) -> str:
    return jax.jit(fn).trace(*shapes).lower(lowering_platforms=("cuda",)).as_text()


def _setup(q_len, kv_len, heads, head_dim):
    mask = np.random.default_rng(q_len + kv_len).random((-(-q_len // 128), -(-kv_len // 128))) < 0.5
    mask[:, 0] = True
    tables = block_tables(mask, 128, q_len, kv_len)
    q = jax.ShapeDtypeStruct((2, q_len, heads, head_dim), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((2, kv_len, heads, head_dim), jnp.bfloat16)
    rows = jax.ShapeDtypeStruct((2, heads, q_len), jnp.float32)
    return tables, q, kv, rows


@pytest.mark.parametrize("case", CASES)
def test_forward_lowers_to_one_mosaic_kernel(case):
    tables, q, kv, _ = _setup(*case)
    text = _lowered_text(lambda q, k, v: mosaic_fwd.mosaic_forward(q, k, v, tables=tables, scale=0.1), q, kv, kv)
    assert text.count("mosaic_gpu") >= 1 and "wgmma" in text
    assert "vote.sync" not in text  # the exact online softmax rescales every step, no branch


@pytest.mark.parametrize("case", CASES)
def test_lazy_rescale_forward_lowers_with_a_warp_vote(case):
    # MosaicTuning.lazy_rescale_threshold: each warp votes on whether any of its rows' max moved
    # and branches around the accumulator multiply (inline Mosaic GPU: vote.sync + scf.if).
    tables, q, kv, _ = _setup(*case)
    tuning = mosaic_fwd.MosaicTuning(lazy_rescale_threshold=8.0)
    text = _lowered_text(lambda q, k, v: mosaic_fwd.mosaic_forward(q, k, v, tables=tables, scale=0.1, tuning=tuning),
                         q, kv, kv)  # fmt: skip
    assert "wgmma" in text and "vote.sync" in text and "scf.if" in text


def test_lazy_rescale_refuses_a_threshold_that_would_overflow_p():
    tables, q, kv, _ = _setup(*CASES[0])
    tuning = mosaic_fwd.MosaicTuning(lazy_rescale_threshold=20.0)
    with pytest.raises(ValueError, match="lazy_rescale_threshold=20.0"):
        jax.eval_shape(lambda q, k, v: mosaic_fwd.mosaic_forward(q, k, v, tables=tables, scale=0.1, tuning=tuning),
                       q, kv, kv)  # fmt: skip


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("tuning", [mosaic_bwd.MosaicBwdTuning(), mosaic_bwd.MosaicBwdTuning(block_kv_dq=128)],
                         ids=["split", "split_dq_tile_128"])
def test_split_backward_lowers(case, tuning):
    tables, q, kv, rows = _setup(*case)

    def backward(q, k, v, out, lse, d_out, d_lse):
        return mosaic_bwd.mosaic_backward(q, k, v, out, lse, d_out, d_lse, tables=tables, scale=0.1, tuning=tuning)

    text = _lowered_text(backward, q, kv, kv, q, rows, q, rows)
    assert "wgmma" in text and "cp.async.bulk" in text


@pytest.mark.skipif(jax.__version_info__ < (0, 11), reason="the fused backward needs jax >= 0.11")
def test_fused_backward_lowers_with_a_tma_reduce():
    tables, q, kv, rows = _setup(*CASES[0])

    def backward(q, k, v, out, lse, d_out, d_lse):
        return mosaic_bwd.mosaic_backward(q, k, v, out, lse, d_out, d_lse, tables=tables, scale=0.1,
                                          tuning=mosaic_bwd.MosaicBwdTuning(fused=True))  # fmt: skip

    assert "reduce" in _lowered_text(backward, q, kv, kv, q, rows, q, rows)


@pytest.mark.skipif(jax.__version_info__ >= (0, 11), reason="jax >= 0.11 runs the fused backward")
def test_fused_backward_refuses_jax_0_10_with_a_message():
    tables, q, kv, rows = _setup(*CASES[0])
    with pytest.raises(NotImplementedError, match="needs jax >= 0.11"):
        jax.eval_shape(lambda *a: mosaic_bwd.mosaic_backward(*a, tables=tables, scale=0.1,
                                                             tuning=mosaic_bwd.MosaicBwdTuning(fused=True)),
                       q, kv, kv, q, rows, q, rows)  # fmt: skip


def _sequence_copies(jaxpr) -> int:
    """Counts pad/slice equations on 4-d [B, L, N, D] arrays outside the kernels, nested jaxprs included."""
    count = 0
    for eqn in getattr(jaxpr, "jaxpr", jaxpr).eqns:
        if eqn.primitive.name in ("pad", "slice") and eqn.outvars[0].aval.ndim == 4:
            count += 1
        if eqn.primitive.name != "pallas_call":
            count += sum(_sequence_copies(sub) for sub in jaxprs_in_params(eqn.params))
    return count


@pytest.mark.parametrize("lengths", [(32760, 32760), (1000, 4100), (4100, 1000), (4100, 257)])
def test_only_lengths_off_the_tma_tiling_are_padded(lengths):
    # Wan's lengths (multiples of 8) must reach the kernels with no copy; another length costs one
    # pad per input on its axis and one slice per output.
    q_len, kv_len = lengths
    tables, q, kv, rows = _setup(q_len, kv_len, 2, 128)
    fwd = jax.make_jaxpr(lambda q, k, v: mosaic_fwd.mosaic_forward(q, k, v, tables=tables, scale=0.1))(q, kv, kv)
    bwd = jax.make_jaxpr(lambda *a: mosaic_bwd.mosaic_backward(*a, tables=tables, scale=0.1))(q, kv, kv, q, rows,
                                                                                              q, rows)  # fmt: skip
    q_off, kv_off = q_len % 8 != 0, kv_len % 8 != 0
    assert _sequence_copies(fwd) == 2 * q_off + 2 * kv_off  # q and out; k and v
    assert _sequence_copies(bwd) == 3 * q_off + 4 * kv_off  # q, dO and dq; k, v, dk and dv
