"""3D rotary position embedding of Wan2.1: head_dim split into frame, height and width channels.

The original (wan/modules/model.py, rope_params/rope_apply) rotates interleaved channel pairs
(x[2i], x[2i+1]) as complex numbers; pair i belongs to the frame axis for the first
d_t/2 pairs, then height, then width, with d_h = d_w = 2 * (head_dim // 6) and d_t the rest.
Each axis has its own frequencies 1 / theta ** (2j / d_axis).

Deviation: the original precomputes 1024 positions per axis and cannot go beyond; we compute
the angles for the grid at hand, so any latent size works (identical values below 1024).
"""

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float


def axis_dims(head_dim: int) -> tuple[int, int, int]:
    """Returns the real channel counts (d_t, d_h, d_w) of the frame, height and width axes."""
    d_hw = 2 * (head_dim // 6)
    return head_dim - 2 * d_hw, d_hw, d_hw


def axis_angles(length: int, axis_dim: int, theta: float) -> np.ndarray:
    """Returns float64 angles [length, axis_dim/2]: position p times 1 / theta ** (2j / axis_dim)."""
    inv_freq = 1.0 / theta ** (np.arange(0, axis_dim, 2, dtype=np.float64) / axis_dim)
    return np.outer(np.arange(length, dtype=np.float64), inv_freq)


def rope_tables(
    grid: tuple[int, int, int], head_dim: int, theta: float = 10000.0
) -> tuple[Float[Array, "L D2"], Float[Array, "L D2"]]:
    """Returns (cos, sin), float32 [F*H*W, head_dim/2], for tokens in frame-major (f, h, w) order.

    grid: latent tokens per axis after patching (F, H, W). Angles are computed in float64 on
    the host per axis (a few KB) and broadcast to all tokens on the device.
    """
    frames, height, width = grid
    parts = []
    for axis, (length, dim) in enumerate(zip(grid, axis_dims(head_dim))):
        angles = axis_angles(length, dim, theta)
        shape = [1, 1, 1, dim // 2]
        shape[axis] = length
        parts.append((np.cos(angles).astype(np.float32).reshape(shape), np.sin(angles).astype(np.float32).reshape(shape)))
    full = (frames, height, width)

    def broadcast(tables):
        return jnp.concatenate([jnp.broadcast_to(t, (*full, t.shape[-1])) for t in tables], axis=-1).reshape(
            frames * height * width, head_dim // 2
        )

    return broadcast([c for c, _ in parts]), broadcast([s for _, s in parts])


def apply_rope(
    x: Float[Array, "B L N D"], cos: Float[Array, "L D2"], sin: Float[Array, "L D2"]
) -> Float[Array, "B L N D"]:
    """Returns x with each channel pair (2i, 2i+1) rotated by the token's angle i, in float32."""
    batch, length, heads, head_dim = x.shape
    pairs = x.astype(jnp.float32).reshape(batch, length, heads, head_dim // 2, 2)
    real, imag = pairs[..., 0], pairs[..., 1]
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    rotated = jnp.stack([real * cos - imag * sin, real * sin + imag * cos], axis=-1)
    return rotated.reshape(batch, length, heads, head_dim)
