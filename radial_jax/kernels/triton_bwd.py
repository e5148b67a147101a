"""Block-sparse flash attention backward, Pallas Triton lowering: the portable twin.

Two kernels over the index tables, as in FlashAttention-2: dq loops over each query block's
key blocks (the forward's table); dk/dv loop over each key block's query blocks (the
transposed table). Both recompute p = exp(s - lse) from the forward's logsumexp and use
delta = rowsum(dO * O) - dlse, so no [L, M] array exists. Runs on any CUDA GPU and, with
interpret=True, on the CPU. With TritonTuning.fused_backward (KernelTuning's default since session 12)
the dk/dv kernel also adds each step's dQ partial into an f32 accumulator by atomic adds and the dq
kernel is not run: the Mosaic fused kernel's algorithm (MosaicBwdTuning(fused=True), the default).

Padding is harmless by construction: padded keys are zeros, so their ds * k terms vanish in dq,
and padded query rows have q = dO = delta = 0 (lse padded with 0), so their terms vanish in
dk and dv; padded rows of the outputs are sliced off.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from radial_jax.kernels.common import LOG2_E, TritonTuning
from radial_jax.kernels.tables import BlockTables, packed_table
from radial_jax.kernels.triton_fwd import block_of_tile, default_tile, tile_start


def _dot(a, b, contract_a, contract_b, precision):
    return jax.lax.dot_general(a, b, (((contract_a,), (contract_b,)), ((), ())), precision=precision,
                               preferred_element_type=jnp.float32)


def _dq_kernel(table_ref, q_ref, do_ref, lse_ref, delta_ref, k_ref, v_ref, dq_ref, *, scale, block, tile):
    """One query tile x one head: dq = scale * sum_j ds_j k_j over its block's key blocks."""
    per_block = block // tile
    count = table_ref[0] if per_block == 1 else table_ref[0] * per_block
    q, do = q_ref[...], do_ref[...]  # [block, D]
    lse2 = lse_ref[...] * LOG2_E  # [block], log2 units
    delta = delta_ref[...]
    precision = jax.lax.Precision.HIGHEST if q.dtype == jnp.float32 else None

    def body(step, dq):
        start = pl.multiple_of(tile_start(table_ref, step, block, tile), tile)
        k = k_ref[pl.ds(start, tile), :]
        v = v_ref[pl.ds(start, tile), :]
        p = jnp.exp2(_dot(q, k, 1, 1, precision) * (scale * LOG2_E) - lse2[:, None])  # [block_q, block_kv]
        ds = p * (_dot(do, v, 1, 1, precision) - delta[:, None])
        return dq + _dot(ds.astype(k.dtype), k, 1, 0, precision)

    dq = jax.lax.fori_loop(0, count, body, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _dkv_kernel(table_ref, k_ref, v_ref, q_ref, do_ref, lse_ref, delta_ref, *refs, scale, block, tile,
                fused=False):
    """One key tile x one head: dk, dv summed over the query blocks that see its key block.

    refs: (dk_ref, dv_ref), or with fused (TritonTuning.fused_backward) (dq_acc_in, dk_ref, dv_ref,
    dq_acc_ref): each step also atomically adds its dQ partial, dS K in f32 from dS's cast to the input
    dtype, into the f32 accumulator [padded L, D] (the Mosaic fused kernel's TMA reduce-adds).
    """
    from jax.experimental.pallas import triton as pltriton

    dk_ref, dv_ref, dq_acc_ref = (refs[1], refs[2], refs[3]) if fused else (*refs, None)
    per_block = block // tile
    count = table_ref[0] if per_block == 1 else table_ref[0] * per_block
    k, v = k_ref[...], v_ref[...]  # [block, D]
    precision = jax.lax.Precision.HIGHEST if k.dtype == jnp.float32 else None

    def body(step, carry):
        dk, dv = carry
        start = pl.multiple_of(tile_start(table_ref, step, block, tile), tile)
        q = q_ref[pl.ds(start, tile), :]
        do = do_ref[pl.ds(start, tile), :]
        lse2 = lse_ref[pl.ds(start, tile)] * LOG2_E
        delta = delta_ref[pl.ds(start, tile)]
        p_t = jnp.exp2(_dot(k, q, 1, 1, precision) * (scale * LOG2_E) - lse2[None, :])  # [block_kv, block_q]
        dv = dv + _dot(p_t.astype(do.dtype), do, 1, 0, precision)
        ds_t = (p_t * (_dot(v, do, 1, 1, precision) - delta[None, :])).astype(q.dtype)
        if fused:
            pltriton.atomic_add(dq_acc_ref, (pl.ds(start, tile), slice(None)), _dot(ds_t, k, 0, 0, precision))
        return dk + _dot(ds_t, q, 1, 0, precision), dv

    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = jax.lax.fori_loop(0, count, body, (zeros, zeros))
    dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


@functools.partial(jax.jit, static_argnames=("tables", "scale", "interpret", "tuning"))
def triton_backward(q, k, v, out, lse, d_out, d_lse, *, tables: BlockTables, scale: float,
                    interpret: bool = False, tuning: TritonTuning = TritonTuning(num_warps=4, num_stages=1)):
    """Returns (dq, dk, dv) of block-sparse attention.

    q, out, d_out: [B, L, N, D]; k, v: [B, M, N, D]; lse, d_lse: [B, N, L] (natural log).
    """
    from jax.experimental.pallas import triton as pltriton

    batch, q_len, heads, head_dim = q.shape
    kv_len = k.shape[1]
    block = tables.block_size
    qb, kb = tables.num_q_blocks, tables.num_kv_blocks
    pad_seq = lambda x, n: jnp.pad(x, ((0, 0), (0, n * block - x.shape[1]), (0, 0), (0, 0)))
    pad_row = lambda x: jnp.pad(x, ((0, 0), (0, 0), (0, qb * block - q_len)))
    # delta_i = sum_d dO_id O_id; an lse cotangent enters as p * dlse, i.e. delta - dlse.
    delta = jnp.einsum("blnd,blnd->bnl", d_out.astype(jnp.float32), out.astype(jnp.float32)) - d_lse
    finite_lse = jnp.where(jnp.isfinite(lse), lse, 0.0)  # empty rows are never visited
    q, d_out = pad_seq(q, qb), pad_seq(d_out, qb)
    k, v = pad_seq(k, kb), pad_seq(v, kb)
    lse, delta = pad_row(finite_lse), pad_row(delta)
    params = dict(compiler_params=pltriton.CompilerParams(num_warps=tuning.num_warps, num_stages=tuning.num_stages),
                  interpret=interpret)

    tile = default_tile(q.dtype, head_dim, block, interpret)
    per_block = block // tile
    seq_tile = lambda: pl.BlockSpec((None, tile, None, head_dim), lambda h, i, b: (b, i, h, 0))
    full = lambda n: pl.BlockSpec((None, n * block, None, head_dim), lambda h, i, b: (b, 0, h, 0))
    row_tile = pl.BlockSpec((None, None, tile), lambda h, i, b: (b, h, i))
    row_full = pl.BlockSpec((None, None, qb * block), lambda h, i, b: (b, h, 0))
    table_row = lambda width: pl.BlockSpec((None, width), lambda h, i, b: (block_of_tile(i, per_block), 0))

    q_table = packed_table(tables.q_ids, tables.q_counts)
    fused = tuning.fused_backward
    dq_acc = [jnp.zeros(q.shape, jnp.float32)] if fused else []  # in and out, aliased: the atomic adds' target
    outs = pl.pallas_call(
        functools.partial(_dkv_kernel, scale=scale, block=block, tile=tile, fused=fused),
        grid=(heads, kb * per_block, batch),
        in_specs=[table_row(q_table.shape[1]), seq_tile(), seq_tile(), full(qb), full(qb), row_full, row_full]
        + [full(qb)] * fused,
        out_specs=[seq_tile(), seq_tile()] + [full(qb)] * fused,
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype)] * 2 + [jax.ShapeDtypeStruct(q.shape, jnp.float32)] * fused,
        input_output_aliases={7: 2} if fused else {},
        name="radial_block_sparse_dkv_dq_triton" if fused else "radial_block_sparse_dkv_triton",
        **params,
    )(q_table, k, v, q, d_out, lse, delta, *dq_acc)
    if fused:
        dk, dv, dq_sum = outs
        dq = (dq_sum * scale).astype(q.dtype)
    else:
        dk, dv = outs
        kv_table = packed_table(tables.kv_ids, tables.kv_counts)
        dq = pl.pallas_call(
            functools.partial(_dq_kernel, scale=scale, block=block, tile=tile),
            grid=(heads, qb * per_block, batch),
            in_specs=[table_row(kv_table.shape[1]), seq_tile(), seq_tile(), row_tile, row_tile, full(kb), full(kb)],
            out_specs=seq_tile(),
            out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
            name="radial_block_sparse_dq_triton",
            **params,
        )(kv_table, q, d_out, lse, delta, k, v)
    return dq[:, :q_len], dk[:, :kv_len], dv[:, :kv_len]
