"""The attention plan of a video DiT: which layers and sampling steps run radial attention,
with which mask and implementation; and the self-attention function a block calls.

The plan is the paper's rule, not one model's: it is passed to a model at call time
(`model(..., plan=plan, dense=plan.is_dense_step(step, num_steps))`), never stored in a
checkpoint's config. It is a frozen, hashable dataclass, so it can be a static argument of
jax.jit; masks are cached per latent shape by a bounded cache of read-only numpy arrays.
"""

import dataclasses
import functools
from collections.abc import Callable, Sequence

import numpy as np
from jaxtyping import Array

from radial_jax.attention import check_implementation, dense_attention, radial_attention
from radial_jax.kernels import KernelTuning
from radial_jax.mask import MODELS, radial_block_mask

MODES = ("radial", "dense")
Attend = Callable[[Array, Array, Array], Array]  # attend(q, k, v): [B, L, N, D] x3 -> [B, L, N, D]


@dataclasses.dataclass(frozen=True)
class RadialPlan:
    """How self-attention is computed, per layer and per sampling step.

    mode: "radial" (the radial block mask through radial_attention with `implementation`) or
      "dense" (dense everywhere; the same as passing no plan).
    dense_layers: the first N blocks stay dense (reference: 1 at 1x length, 2 at 2x).
    dense_timesteps: the first N sampling steps stay dense (reference: 12 at 1x, 2 at 2x).
    dense_final_timesteps: the last N steps stay dense (not in the reference; users report it
      sharpens fine detail).
    decay_factor, block_size, mask_model: of the radial mask (radial_jax.radial_block_mask's
      decay_factor, block_size, model: "wan" keeps frame 0 as a sink, "hunyuan" does not).
    implementation: radial_attention's (see radial_jax.attention.IMPLEMENTATIONS), one name or
      an ordered tuple; tuning: the Pallas kernels' tunables (None: KernelTuning's defaults).
    dense_implementation: how dense steps and dense layers attend: "dense" (radial_jax.dense_attention,
      cuDNN on a GPU) or another of IMPLEMENTATIONS, which runs radial_attention with every block on
      (e.g. "pallas": our kernel, ~10% faster than cuDNN at 75,600 tokens on an H200).
    Cross-attention is always dense (dense_attention).
    """

    mode: str = "radial"
    dense_layers: int = 0
    dense_timesteps: int = 0
    dense_final_timesteps: int = 0
    decay_factor: float = 1.0
    block_size: int = 128
    implementation: str | Sequence[str] = "auto"  # a list becomes a tuple (hashable)
    mask_model: str = "wan"
    tuning: KernelTuning | None = None
    dense_implementation: str | Sequence[str] = "dense"

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode={self.mode!r} must be one of {MODES}")
        for name in ("dense_layers", "dense_timesteps", "dense_final_timesteps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0")
        if self.mask_model not in MODELS:
            raise ValueError(f"mask_model={self.mask_model!r} must be one of {MODELS}")
        for name in ("implementation", "dense_implementation"):
            if isinstance(getattr(self, name), list):  # keep the dataclass hashable (a jit static)
                object.__setattr__(self, name, tuple(getattr(self, name)))
            try:
                check_implementation(getattr(self, name))
            except ValueError as e:
                raise ValueError(f"{name}: {e}") from None

    def is_dense_step(self, step: int, num_steps: int | None = None) -> bool:
        """Returns whether sampling step `step` (0-based) of `num_steps` runs all layers dense.

        Decide this in Python and pass it to the model as the static `dense=` argument: a jitted
        sampler then compiles at most two programs (dense and radial), not one per step.
        """
        if self.mode == "dense" or step < self.dense_timesteps:
            return True
        if self.dense_final_timesteps:
            if num_steps is None:
                raise ValueError("dense_final_timesteps needs num_steps (the sampler's step count)")
            return step >= num_steps - self.dense_final_timesteps
        return False

    def is_dense_layer(self, layer: int) -> bool:
        """Returns whether block `layer` (0-based) is dense at a non-dense step."""
        return self.mode == "dense" or layer < self.dense_layers

    def block_mask(self, num_frames: int, tokens_per_frame: int) -> np.ndarray:
        """Returns the (read-only, cached) radial block mask of this latent shape, bool [QB, KB]."""
        return radial_mask(num_frames, tokens_per_frame, self.block_size, self.decay_factor, self.mask_model)


@functools.lru_cache(maxsize=32)
def radial_mask(
    num_frames: int, tokens_per_frame: int, block_size: int, decay_factor: float, model: str = "wan"
) -> np.ndarray:
    """Returns radial_block_mask(...) as a read-only numpy array, cached (32 shapes at most)."""
    mask = radial_block_mask(num_frames, tokens_per_frame, block_size=block_size, decay_factor=decay_factor,
                             model=model)  # fmt: skip
    mask.setflags(write=False)
    return mask


@functools.lru_cache(maxsize=8)
def full_mask(blocks: int) -> np.ndarray:
    """Returns a read-only all-True block mask [blocks, blocks] (dense attention through the kernel)."""
    mask = np.ones((blocks, blocks), bool)
    mask.setflags(write=False)
    return mask


def self_attention(
    plan: RadialPlan | None, num_frames: int, tokens_per_frame: int, *, layer: int, dense: bool = False
) -> Attend:
    """Returns attend(q, k, v) for block `layer` over a video of num_frames x tokens_per_frame
    tokens (frame-major): dense when there is no plan, at a dense step (`dense`), or in a
    dense layer; else radial attention with the plan's mask and implementation."""
    if plan is None:
        return dense_attention
    if dense or plan.is_dense_layer(layer):
        if plan.dense_implementation == "dense":
            return dense_attention
        mask = full_mask(-(-num_frames * tokens_per_frame // plan.block_size))
        return functools.partial(radial_attention, block_mask=mask, block_size=plan.block_size,
                                 implementation=plan.dense_implementation, tuning=plan.tuning)  # fmt: skip
    mask = plan.block_mask(num_frames, tokens_per_frame)
    return functools.partial(radial_attention, block_mask=mask, block_size=plan.block_size,
                             implementation=plan.implementation, tuning=plan.tuning)  # fmt: skip
