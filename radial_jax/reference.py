"""Pure-jnp block-sparse attention: the twin of the Pallas kernels and the CPU fallback."""

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float


def attention_reference(
    q: Float[Array, "B L N D"],
    k: Float[Array, "B M N D"],
    v: Float[Array, "B M N D"],
    block_mask: np.ndarray,
    *,
    block_size: int,
    scale: float | None = None,
    chunk_tokens: int | None = None,
) -> tuple[Float[Array, "B L N D"], Float[Array, "B N L"]]:
    """Returns (out, lse): masked softmax attention and its row logsumexp (natural log).

    q: [batch, seq_q, heads, head_dim], k/v: [batch, seq_kv, heads, head_dim];
    block_mask: bool numpy [ceil(seq_q/B), ceil(seq_kv/B)], static. Rows with no visible key
    return zeros and lse = -inf. Logits, softmax and the PV product run in float32 at the
    highest matmul precision; out is cast to q.dtype. Queries are processed `chunk_tokens`
    at a time (a multiple of B; default: about 64 MB of logits per chunk) so that no
    [seq_q, seq_kv] array exists at once.
    """
    batch, q_len, heads, head_dim = q.shape
    kv_len = k.shape[1]
    scale = head_dim**-0.5 if scale is None else scale
    if chunk_tokens is None:
        budget = (64 << 20) // (4 * max(1, batch * heads * kv_len))
        chunk_tokens = max(block_size, budget // block_size * block_size)
    chunk = min(chunk_tokens, -(-q_len // block_size) * block_size)
    num_chunks = -(-q_len // chunk)
    padded_q_len = num_chunks * chunk

    kv_block_of_token = jnp.asarray(np.arange(kv_len) // block_size)
    padded_mask = np.zeros((padded_q_len // block_size, block_mask.shape[1]), bool)
    padded_mask[: block_mask.shape[0]] = block_mask
    # [chunks, chunk/B, seq_kv]: the token-column view of each chunk's block rows.
    chunk_masks = jnp.asarray(padded_mask)[:, kv_block_of_token].reshape(num_chunks, chunk // block_size, kv_len)

    qf = jnp.pad(q, ((0, 0), (0, padded_q_len - q_len), (0, 0), (0, 0))).astype(jnp.float32)
    q_chunks = qf.reshape(batch, num_chunks, chunk, heads, head_dim).swapaxes(0, 1)
    kf, vf = k.astype(jnp.float32), v.astype(jnp.float32)

    def one_chunk(args):
        q_chunk, chunk_mask = args  # [B, chunk, N, D], [chunk/B, M]
        mask = jnp.repeat(chunk_mask, block_size, axis=0)  # [chunk, M]
        return _masked_attention(q_chunk, kf, vf, mask, scale)

    out, lse = jax.lax.map(one_chunk, (q_chunks, chunk_masks))
    out = out.swapaxes(0, 1).reshape(batch, padded_q_len, heads, head_dim)[:, :q_len]
    lse = jnp.moveaxis(lse, 0, 2).reshape(batch, heads, padded_q_len)[..., :q_len]
    return out.astype(q.dtype), lse


def _masked_attention(
    q: Float[Array, "B l N D"],
    k: Float[Array, "B M N D"],
    v: Float[Array, "B M N D"],
    mask: Bool[Array, "l M"],
    scale: float,
) -> tuple[Float[Array, "B l N D"], Float[Array, "B N l"]]:
    hi = jax.lax.Precision.HIGHEST
    logits = jnp.einsum("blnd,bmnd->bnlm", q, k, precision=hi) * scale
    masked = jnp.where(mask, logits, -jnp.inf)
    row_max = jnp.max(masked, axis=-1, keepdims=True)
    # Softmax is shift-invariant: the shift needs no gradient, and an empty row shifts by 0.
    shift = jax.lax.stop_gradient(jnp.where(jnp.isfinite(row_max), row_max, 0.0))
    # exp(-inf) = 0 with a zero gradient: masked entries never meet an inf cotangent.
    probs = jnp.exp(jnp.where(mask, logits - shift, -jnp.inf))
    row_sum = jnp.sum(probs, axis=-1, keepdims=True)
    safe_sum = jnp.where(row_sum > 0, row_sum, 1.0)
    out = jnp.einsum("bnlm,bmnd->blnd", probs / safe_sum, v, precision=hi)
    lse = jnp.where(row_sum > 0, jnp.log(safe_sum) + shift, -jnp.inf)[..., 0]
    return out, lse
