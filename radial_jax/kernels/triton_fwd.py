"""Block-sparse flash attention forward, Pallas Triton lowering: the portable twin.

The same algorithm as the Mosaic GPU kernel (mosaic_fwd.py) on the same index tables, its lazy
rescale included (the default's softmax rule): each program owns one query block of one head and
loops over that block's key blocks only. It runs on any CUDA GPU and, with interpret=True, on the
CPU, where the test suite checks it. On Hopper it runs at about half the speed of the Mosaic kernel
(the Triton lowering issues no wgmma).
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from radial_jax.kernels.common import (DEFAULT_TRITON_FWD, LN_2, LOG2_E, TritonTuning,
                                       check_lazy_rescale_threshold)
from radial_jax.kernels.tables import BlockTables, packed_table


def _forward_kernel(table_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *, scale, block, tile, kv_len, ragged, lazy):
    """One query tile x one head. table_ref: [1 + max_kv] = (count, kv block ids...) of its block.

    Tiles of `tile` tokens split each `block`-token mask block (tile < block where shared
    memory is short: f32, head_dim 128); the loop visits every tile of every listed block.
    lazy: None (the exact online softmax) or the lazy rescale's threshold in log2 units (TritonTuning).
    """
    per_block = block // tile
    count = table_ref[0] if per_block == 1 else table_ref[0] * per_block
    q = q_ref[...]  # [block, D]
    head_dim = q.shape[-1]
    qk_scale = scale * LOG2_E  # exp(x) = exp2(x log2 e): one FMA per logit
    # f32 inputs get IEEE f32 products (Triton's default for f32 is TF32, ~1e-3 relative).
    precision = jax.lax.Precision.HIGHEST if q.dtype == jnp.float32 else None

    def body(step, carry):
        acc, row_max, row_sum = carry
        start = pl.multiple_of(tile_start(table_ref, step, block, tile), tile)
        k = k_ref[pl.ds(start, tile), :]  # [tile, D]
        v = v_ref[pl.ds(start, tile), :]
        s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), precision=precision,
                                preferred_element_type=jnp.float32) * qk_scale  # [block_q, block_kv], log2 units
        if ragged:
            cols = start + jax.lax.broadcasted_iota(jnp.int32, s.shape, 1)
            s = jnp.where(cols < kv_len, s, -jnp.inf)
        if lazy is None:
            new_max = jnp.maximum(row_max, s.max(axis=1))
            correction = jnp.exp2(row_max - new_max)
        else:  # the max moves only past the threshold; the correction is exactly 1 where it stays
            raw_max = s.max(axis=1)
            raised = raw_max > row_max + lazy
            new_max = jnp.where(raised, raw_max, row_max)
            correction = jnp.where(raised, jnp.exp2(row_max - new_max), 1.0)
        p = jnp.exp2(s - new_max[:, None])
        pv = jnp.dot(p.astype(v.dtype), v, precision=precision, preferred_element_type=jnp.float32)
        acc = acc * correction[:, None] + pv
        return acc, new_max, row_sum * correction + p.sum(axis=1)

    init = (
        jnp.zeros((q.shape[0], head_dim), jnp.float32),
        jnp.full((q.shape[0],), -jnp.inf, jnp.float32),
        jnp.zeros((q.shape[0],), jnp.float32),
    )
    acc, row_max, row_sum = jax.lax.fori_loop(0, count, body, init)
    # An empty row (count == 0) has row_sum 0: return zeros and lse -inf, never NaN.
    nonempty = row_sum > 0
    inv = jnp.where(nonempty, 1.0 / jnp.where(nonempty, row_sum, 1.0), 0.0)
    o_ref[...] = (acc * inv[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(nonempty, (row_max + jnp.log2(jnp.where(nonempty, row_sum, 1.0))) * LN_2, -jnp.inf)


def block_of_tile(i, per_block: int):
    """Returns the mask block of kernel tile i (Triton mis-lowers // by 1, so skip it)."""
    return i if per_block == 1 else jax.lax.div(i, jnp.int32(per_block))


def tile_start(table_ref, step, block: int, tile: int):
    """Returns the first token of loop step `step`: tile (step mod r) of listed block (step div r)."""
    if tile == block:  # jnp // and % by 1 mis-lower in Triton (an i1 constant)
        return table_ref[1 + step] * block
    per_block = jnp.int32(block // tile)
    return table_ref[1 + jax.lax.div(step, per_block)] * block + jax.lax.rem(step, per_block) * tile


def default_tile(dtype, head_dim: int, block: int, interpret: bool) -> int:
    """Returns the kernel tile: the whole block, or 64 tokens where 128 x D tiles overflow shared memory."""
    if interpret or block <= 64 or (jnp.dtype(dtype).itemsize <= 2 and head_dim <= 128):
        return block
    return 64


@functools.partial(jax.jit, static_argnames=("tables", "scale", "interpret", "tuning"))
def triton_forward(q, k, v, *, tables: BlockTables, scale: float, interpret: bool = False,
                   tuning: TritonTuning = DEFAULT_TRITON_FWD):
    """Returns (out [B, L, N, D] in q.dtype, lse [B, N, L] float32, natural log).

    q: [batch, seq_q, heads, head_dim]; k, v: [batch, seq_kv, heads, head_dim]. Sequences are
    zero-padded to whole blocks inside (keys past seq_kv are masked; padded query rows dropped).
    """
    from jax.experimental.pallas import triton as pltriton

    batch, q_len, heads, head_dim = q.shape
    kv_len = k.shape[1]
    block = tables.block_size
    qb, kb = tables.num_q_blocks, tables.num_kv_blocks
    pad = lambda x, n: jnp.pad(x, ((0, 0), (0, n * block - x.shape[1]), (0, 0), (0, 0)))
    q, k, v = pad(q, qb), pad(k, kb), pad(v, kb)
    table = packed_table(tables.kv_ids, tables.kv_counts)
    tile = default_tile(q.dtype, head_dim, block, interpret)
    per_block = block // tile
    lazy = tuning.lazy_rescale_threshold
    check_lazy_rescale_threshold(lazy)
    kernel = functools.partial(_forward_kernel, scale=scale, block=block, tile=tile, kv_len=kv_len,
                               ragged=tables.kv_ragged, lazy=lazy)
    out, lse = pl.pallas_call(
        kernel,
        grid=(heads, qb * per_block, batch),  # heads fastest: neighbouring programs share a K/V row
        in_specs=[
            pl.BlockSpec((None, table.shape[1]), lambda h, i, b: (block_of_tile(i, per_block), 0)),
            pl.BlockSpec((None, tile, None, head_dim), lambda h, i, b: (b, i, h, 0)),
            pl.BlockSpec((None, kb * block, None, head_dim), lambda h, i, b: (b, 0, h, 0)),
            pl.BlockSpec((None, kb * block, None, head_dim), lambda h, i, b: (b, 0, h, 0)),
        ],
        out_specs=[
            pl.BlockSpec((None, tile, None, head_dim), lambda h, i, b: (b, i, h, 0)),
            pl.BlockSpec((None, None, tile), lambda h, i, b: (b, h, i)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct(q.shape, q.dtype),
            jax.ShapeDtypeStruct((batch, heads, qb * block), jnp.float32),
        ],
        compiler_params=pltriton.CompilerParams(num_warps=tuning.num_warps, num_stages=tuning.num_stages),
        interpret=interpret,
        name="radial_block_sparse_fwd_triton",
    )(table, q, k, v)
    return out[:, :q_len], lse[..., :q_len]
