"""radial-jax: Radial Attention (arXiv 2506.19852) for video diffusion transformers, in JAX.

Dimension glossary, used by annotations, einsum strings and comments alike:
  B batch, L query tokens, M key tokens, N heads, D head_dim, C width, T text tokens,
  F/H/W latent frames/height/width, QB/KB query/key blocks.

Public API:
  radial_block_mask(num_frames, tokens_per_frame, ...) -> bool numpy [QB, KB]
  radial_attention(q, k, v, *, block_mask, block_size=128, implementation="auto", scale=None, tuning=None)
  KernelTuning(mosaic_fwd=..., mosaic_bwd=..., triton_fwd=..., triton_bwd=...): the kernels' tunables
  sequence_parallel_attention(q, k, v, *, block_mask, ..., mesh=None)  (token axis over mesh axis "sequence")
  dense_attention(q, k, v, *, scale=None, block_mask=None, block_size=128)
  RadialPlan(mode="radial", dense_layers=0, ...): which layers/steps are radial, the mask cache
"""

from radial_jax.attention import IMPLEMENTATIONS, dense_attention, radial_attention
from radial_jax.kernels import KernelTuning
from radial_jax.mask import (
    attention_flops,
    block_density,
    computed_token_pairs,
    expand_block_mask,
    radial_block_mask,
    radial_token_mask,
    video_tokens,
)
from radial_jax.parallel import sequence_parallel, sequence_parallel_attention
from radial_jax.plan import RadialPlan
from radial_jax.reference import attention_reference

__all__ = [
    "IMPLEMENTATIONS",
    "KernelTuning",
    "RadialPlan",
    "attention_flops",
    "attention_reference",
    "block_density",
    "computed_token_pairs",
    "dense_attention",
    "expand_block_mask",
    "radial_attention",
    "radial_block_mask",
    "radial_token_mask",
    "sequence_parallel",
    "sequence_parallel_attention",
    "video_tokens",
]
