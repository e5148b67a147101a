"""Named layout transforms from PyTorch tensors to our Flax leaves, and the rows of name tables.

A table row maps one source tensor name to one target parameter path with one transform;
"{n}" in a row stands for the block index. Helpers expand a PyTorch module (a Linear, a norm)
into its rows, so a table reads as a list of modules top to bottom.
"""

import dataclasses
from collections.abc import Callable, Container, Sequence
from typing import TypeVar

import jax
import numpy as np

# A transform gives back the kind of array it is given: numpy while converting (tensors stream from
# the file), jax where convert/lora.py computes a LoRA delta on the device.
Tensor = TypeVar("Tensor", np.ndarray, jax.Array)


def identity(x: Tensor) -> Tensor:
    return x


def transpose_linear(weight: Tensor) -> Tensor:
    """nn.Linear weight (out, in) -> kernel (in, out)."""
    if weight.ndim != 2:
        raise ValueError(f"a Linear weight is 2-D (out, in), got shape {weight.shape}")
    return weight.T


def conv3d(weight: Tensor) -> Tensor:
    """nn.Conv3d weight (O, I, t, h, w) -> kernel (t, h, w, I, O)."""
    if weight.ndim != 5:
        raise ValueError(f"a Conv3d weight is 5-D (O, I, t, h, w), got shape {weight.shape}")
    return weight.transpose(2, 3, 4, 1, 0)


def transformed_shape(transform: Callable, shape: tuple[int, ...]) -> tuple[int, ...] | None:
    """Returns the shape `transform` gives a tensor of `shape` (None if it rejects it), without data."""
    try:
        return transform(np.broadcast_to(np.zeros((), np.float32), shape)).shape
    except ValueError:
        return None


def conv3d_inverse(kernel: Tensor) -> Tensor:
    return kernel.transpose(4, 3, 0, 1, 2)


INVERSES = {identity: identity, transpose_linear: transpose_linear, conv3d: conv3d_inverse}


def source_shape(transform: Callable, target_shape: tuple[int, ...]) -> tuple[int, ...] | None:
    """Returns the source shape that `transform` maps to `target_shape` (None if not known)."""
    inverse = INVERSES.get(transform)
    return None if inverse is None else transformed_shape(inverse, target_shape)


@dataclasses.dataclass(frozen=True)
class Row:
    source: str
    target: str
    transform: Callable[[np.ndarray], np.ndarray] = identity


def expand_rows(table: Sequence[Row], num_layers: int, *, prefix: str = "",
                targets: Container[str] | None = None) -> list[Row]:  # fmt: skip
    """Returns the table's rows with "{n}" expanded for blocks 0 .. num_layers - 1 and `prefix`
    put before each source name; with `targets`, only the rows whose target is one of them."""
    rows = []
    for row in table:
        for n in range(num_layers) if "{n}" in row.source else (None,):
            concrete = Row(prefix + row.source.format(n=n), row.target.format(n=n), row.transform)
            if targets is None or concrete.target in targets:
                rows.append(concrete)
    return rows


def linear(source: str, target: str) -> tuple[Row, ...]:
    """A torch nn.Linear -> an nnx.Linear."""
    return (Row(f"{source}.weight", f"{target}.kernel", transpose_linear), Row(f"{source}.bias", f"{target}.bias"))


def conv(source: str, target: str) -> tuple[Row, ...]:
    """A torch nn.Conv3d -> an nnx.Conv."""
    return (Row(f"{source}.weight", f"{target}.kernel", conv3d), Row(f"{source}.bias", f"{target}.bias"))


def rms_norm(source: str, target: str) -> tuple[Row, ...]:
    """An RMSNorm weight -> scale."""
    return (Row(f"{source}.weight", f"{target}.scale"),)


def layer_norm(source: str, target: str) -> tuple[Row, ...]:
    """An affine LayerNorm (weight, bias) -> (scale, bias)."""
    return (Row(f"{source}.weight", f"{target}.scale"), Row(f"{source}.bias", f"{target}.bias"))


def param(source: str, target: str) -> tuple[Row, ...]:
    """A bare nn.Parameter, same shape."""
    return (Row(source, target),)
