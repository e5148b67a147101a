"""Sequence-parallel (Ulysses) attention: the token axis sharded over a mesh axis `sequence`.

Each device holds L/P tokens of every head. One all-to-all regroups q, k and v to the whole
sequence for N/P heads, so the block-sparse kernel sees the full radial mask for its heads
unchanged; a second all-to-all returns the output to sequence sharding. Under `grad` the
transposes are the same two all-to-alls in reverse, so no device ever holds the whole
sequence of every head (no all-gather).

Two raggednesses are handled inside:
- L not a multiple of P: the sequence is zero-padded to one; after the first all-to-all the
  padding is sliced off, so the attention function sees exactly the L real tokens (padded keys
  are never attended) and the kernel handles L's own ragged last block as it does on one device.
- N not a multiple of P (Wan 1.3B: 12 heads on 8 devices): heads are zero-padded to P*ceil(N/P)
  and dropped after. Zero heads produce zeros; they cost (P*ceil(N/P) - N)/N extra work.
"""

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec
from jaxtyping import Array, Float

from radial_jax.attention import radial_attention

SEQUENCE_AXIS = "sequence"  # the mesh axis that shards the token axis of activations
Attend = Callable[[Array, Array, Array], Array]


def active_mesh():
    """Returns the mesh set by `jax.set_mesh` (an AbstractMesh inside jit), or None outside one."""
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh.empty else mesh


def sequence_parallel_size(mesh=None, axis: str = SEQUENCE_AXIS) -> int:
    """Returns the size of `axis` in mesh (default: the active mesh); 1 when absent."""
    mesh = active_mesh() if mesh is None else mesh
    return 1 if mesh is None else dict(mesh.shape).get(axis, 1)


@dataclasses.dataclass(frozen=True)
class TokenSharding:
    """Where activations [B, L, ...] live: L over mesh axis `axis`, B over batch axes.

    batch_axes: the mesh axes that split B, or None to choose them per batch size (see
    `batch_axes_for`). Mesh axes that split neither stay automatic (replicated here).
    """

    mesh: Any
    axis: str
    batch_axes: tuple[str, ...] | None = None

    @property
    def shards(self) -> int:
        """Returns P, the number of devices along the token axis."""
        return dict(self.mesh.shape)[self.axis]

    def batch_axes_for(self, batch: int) -> tuple[str, ...]:
        """Returns the mesh axes that split a batch of `batch` rows.

        Default: the other mesh axes in mesh order, each kept while the product of the kept
        sizes still divides the batch (data=2, fsdp=4: batch 8 -> (data, fsdp), 2 -> (data,),
        1 -> ()). Given batch_axes must divide the batch (ValueError).
        """
        sizes = dict(self.mesh.shape)
        if self.batch_axes is not None:
            shards = int(np.prod([sizes[name] for name in self.batch_axes]))
            if batch % shards:
                raise ValueError(f"batch={batch} must be a multiple of the batch axes {self.batch_axes} "
                                 f"({shards} shards); pass batch_axes=() to replicate the batch")
            return self.batch_axes
        axes, shards = [], 1
        for name in self.mesh.axis_names:
            if name != self.axis and sizes[name] > 1 and batch % (shards * sizes[name]) == 0:
                axes.append(name)
                shards *= sizes[name]
        return tuple(axes)

    def spec(self, batch: int) -> PartitionSpec:
        """Returns the PartitionSpec of a [batch, L, ...] activation."""
        return PartitionSpec(self.batch_axes_for(batch) or None, self.axis)

    def shard_map(self, fn, batch: int, in_specs, out_specs):
        """Returns fn under shard_map, manual over the token axis and the batch's axes only.

        Other mesh axes stay automatic. jit because eager shard_map refuses automatic axes; inside
        an outer jit it is inlined. check_vma=False: pallas_call's outputs carry no varying-axes
        type; shard_map then sums the cotangent of an operand replicated over a manual axis
        (cross-attention's k, v), which is the right transpose.
        """
        manual = frozenset({self.axis, *self.batch_axes_for(batch)})
        return jax.jit(jax.shard_map(fn, mesh=self.mesh, in_specs=in_specs, out_specs=out_specs, axis_names=manual,
                                     check_vma=False))


def token_sharding(mesh=None, *, axis: str = SEQUENCE_AXIS, batch_axes: Sequence[str] | None = None) -> TokenSharding:
    """Returns the token sharding over `axis` of mesh (default: the active mesh, `jax.set_mesh`).

    batch_axes: the mesh axes that split the batch (default: chosen per batch size, see
    TokenSharding.batch_axes_for; () replicates it).
    """
    mesh = active_mesh() if mesh is None else mesh
    if mesh is None or axis not in mesh.axis_names:
        raise ValueError(f"sequence parallelism needs a mesh with a {axis!r} axis (jax.set_mesh(mesh) or mesh=), "
                         f"got {None if mesh is None else mesh.axis_names}")
    if batch_axes is not None and axis in batch_axes:
        raise ValueError(f"batch_axes={tuple(batch_axes)} must not contain the sequence axis {axis!r}")
    return TokenSharding(mesh, axis, None if batch_axes is None else tuple(batch_axes))


def sequence_parallel(
    attend: Attend,
    *,
    mesh=None,
    axis: str = SEQUENCE_AXIS,
    batch_axes: Sequence[str] | None = None,
    valid_len: int | None = None,
) -> Attend:
    """Returns attend run sequence-parallel: a function of global q, k, v [B, L, N, D].

    attend(q, k, v) -> out computes attention over the whole sequence for any number of
    heads, each head independently ([B, L, n, D] -> [B, L, n, D], e.g. radial_attention with
    a fixed block mask for length L). The returned function takes q, k, v sharded (or not) on
    L over mesh axis `axis` and returns out sharded the same way. mesh, batch_axes: see
    `token_sharding`. valid_len: tokens at or past it are padding (the caller padded L to a
    multiple of P): attend never sees them and their output rows are 0.
    """
    sharding = token_sharding(mesh, axis=axis, batch_axes=batch_axes)
    parallel = sharding.shards

    def run(q, k, v):
        batch, length, heads, _ = q.shape
        spec = sharding.spec(batch)
        real_len = length if valid_len is None else valid_len
        if not 0 < real_len <= length:
            raise ValueError(f"valid_len={valid_len} must be in [1, {length}] (the sequence length)")
        padded_len = -(-length // parallel) * parallel
        padded_heads = -(-heads // parallel) * parallel
        qkv = jnp.stack([q, k, v])
        qkv = jnp.pad(qkv, ((0, 0), (0, 0), (0, padded_len - length), (0, padded_heads - heads), (0, 0)))

        def local(qkv_shard):
            out = _ulysses(attend, qkv_shard, axis, real_len)
            return out[:, :, :heads]

        out = sharding.shard_map(local, batch, PartitionSpec(None, *spec), spec)(qkv)
        return out[:, :length]

    return run


def sequence_parallel_cross(
    attend: Attend, *, mesh=None, axis: str = SEQUENCE_AXIS, batch_axes: Sequence[str] | None = None
) -> Attend:
    """Returns attend(q, k, v) with q [B, L, N, D] sharded on L and k, v [B, T, N, D] replicated.

    For attention to a short context (text tokens): every device attends its own queries to the
    whole context, no communication forward; the backward sums k's and v's gradients over the
    token axis. L must be a multiple of P (pad it, as for self-attention).
    """
    sharding = token_sharding(mesh, axis=axis, batch_axes=batch_axes)

    def run(q, k, v):
        batch = q.shape[0]
        if q.shape[1] % sharding.shards:
            raise ValueError(f"q has {q.shape[1]} tokens, not a multiple of the {sharding.shards} devices on "
                             f"{axis!r}; pad the tokens first")
        spec = sharding.spec(batch)
        context_spec = PartitionSpec(spec[0])
        return sharding.shard_map(attend, batch, (spec, context_spec, context_spec), spec)(q, k, v)

    return run


def _ulysses(attend: Attend, qkv: Array, axis: str, real_len: int) -> Array:
    """Returns this device's output [b, L/P, N', D] from its stacked qkv [3, b, L/P, N', D]."""
    # Heads -> devices, sequence <- devices: each device now holds all L tokens of N'/P heads.
    qkv = jax.lax.all_to_all(qkv, axis, split_axis=3, concat_axis=2, tiled=True)  # [3, b, L, N'/P, D]
    padded_len = qkv.shape[2]
    q, k, v = (x[:, :real_len] for x in qkv)
    out = attend(q, k, v)  # [b, real_len, N'/P, D]
    out = jnp.pad(out, ((0, 0), (0, padded_len - real_len), (0, 0), (0, 0)))
    return jax.lax.all_to_all(out, axis, split_axis=1, concat_axis=2, tiled=True)  # [b, L/P, N', D]


def sequence_parallel_attention(
    q: Float[Array, "B L N D"],
    k: Float[Array, "B L N D"],
    v: Float[Array, "B L N D"],
    *,
    block_mask: np.ndarray,
    block_size: int = 128,
    implementation: str | Sequence[str] = "auto",
    scale: float | None = None,
    mesh=None,
    axis: str = SEQUENCE_AXIS,
    batch_axes: Sequence[str] | None = None,
) -> Float[Array, "B L N D"]:
    """Returns radial_attention(q, k, v, ...) computed with the token axis sharded over `axis`.

    q, k, v: [batch, seq, heads, head_dim], self-attention (one length L); block_mask: static
    bool numpy [ceil(L/block_size), ceil(L/block_size)]. Same result as radial_attention on
    one device, any L and any head count (see the module docstring).
    """
    def attend(q, k, v):
        return radial_attention(q, k, v, block_mask=block_mask, block_size=block_size,
                                implementation=implementation, scale=scale)

    return sequence_parallel(attend, mesh=mesh, axis=axis, batch_axes=batch_axes)(q, k, v)
