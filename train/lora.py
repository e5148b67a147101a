"""LoRA on the Wan DiT's Linear layers, as flax NNX `LoRAParam` leaves beside the base weights.

A targeted `nnx.Linear` at `blocks.N.self_attn.q` is replaced in place by a `LoRALinear` that
keeps the same `kernel` and `bias` variables (same paths: a converted checkpoint still loads)
and adds two `nnx.LoRAParam` leaves at the same module path:

    blocks.N.self_attn.q.lora_a  float32 [in, rank]   (PEFT lora_A.weight = lora_a.T)
    blocks.N.self_attn.q.lora_b  float32 [rank, out]  (PEFT lora_B.weight = lora_b.T)

y = x @ kernel + bias + (alpha / rank) * (x @ lora_a) @ lora_b. lora_a is drawn like PEFT's
default (uniform in +-1/sqrt(in)) and lora_b is zero, so at step 0 the model is exactly the base
model. Gradients and the optimizer take only `nnx.LoRAParam` (`nnx.DiffState(0, nnx.LoRAParam)`),
so the base weights are never differentiated nor held in optimizer state.
"""

import dataclasses
import fnmatch
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Float

from convert import wan_diffusers, wan_original
from convert.transforms import transpose_linear
from radial_jax.sharding import logical_axes

F32 = jnp.float32
SELF_ATTENTION = ("blocks.*.self_attn.q", "blocks.*.self_attn.k", "blocks.*.self_attn.v", "blocks.*.self_attn.o")
CROSS_ATTENTION = ("blocks.*.cross_attn.q", "blocks.*.cross_attn.k", "blocks.*.cross_attn.v", "blocks.*.cross_attn.o")
FFN = ("blocks.*.ffn.0", "blocks.*.ffn.2")
LAYOUTS = {"original": wan_original, "diffusers": wan_diffusers}


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Which Linear layers get a LoRA and its size.

    rank: inner width r; alpha: the update is scaled by alpha / rank (applied in the forward,
      not folded into the weights, so changing alpha needs no retraining of the factors' scale);
    targets: fnmatch patterns over module paths ("blocks.*.self_attn.q"); SELF_ATTENTION by
      default, add CROSS_ATTENTION and/or FFN for more capacity.
    """

    rank: int = 32
    alpha: float = 32.0
    targets: tuple[str, ...] = SELF_ATTENTION

    def __post_init__(self):
        object.__setattr__(self, "targets", tuple(self.targets))
        if self.rank < 1:
            raise ValueError(f"LoRA rank={self.rank} must be >= 1")
        if not self.targets:
            raise ValueError("LoRA targets is empty; name at least one module pattern, e.g. 'blocks.*.self_attn.q'")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


class LoRALinear(nnx.Linear):
    """An nnx.Linear (same kernel/bias variables) plus a float32 low-rank update.

    Built from an existing Linear by `apply_lora`; the LoRA product runs in the layer's
    compute dtype (bf16 in real runs), its factors stay float32 (the optimizer's copy).
    """

    def __init__(self, base: nnx.Linear, *, rank: int, scale: float, rngs: nnx.Rngs):
        # Take over the base layer's variables and settings (whatever this flax version stores),
        # so nnx.Linear.__call__ computes exactly what the base layer did.
        for name, value in vars(base).items():
            if not name.startswith("_"):
                setattr(self, name, value)
        self.scale = float(scale)
        init_a = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")  # +-1/sqrt(in), as PEFT
        # The factors carry the kernel's logical names on their outer axes (radial_jax/sharding.py).
        axes_in, axes_out = logical_axes(base.kernel) or (None, None)
        self.lora_a = nnx.LoRAParam(init_a(rngs.params(), (base.in_features, rank), F32), out_sharding=(axes_in, None),
                                    eager_sharding=False)  # fmt: skip
        self.lora_b = nnx.LoRAParam(jnp.zeros((rank, base.out_features), F32), out_sharding=(None, axes_out),
                                    eager_sharding=False)  # fmt: skip

    def __call__(self, x: Float[Array, "*B I"], out_sharding=None) -> Float[Array, "*B O"]:
        y = super().__call__(x, out_sharding=out_sharding)
        dtype = y.dtype
        down = jnp.matmul(x.astype(dtype), self.lora_a[...].astype(dtype), precision=self.precision)
        up = jnp.matmul(down, self.lora_b[...].astype(dtype), precision=self.precision)
        return y + up * jnp.asarray(self.scale, dtype)

    def merged_kernel(self) -> Array:
        """Returns kernel + scale * lora_a @ lora_b in the kernel's dtype (summed in float32)."""
        kernel = self.kernel[...]
        delta = jnp.matmul(self.lora_a[...], self.lora_b[...], precision=jax.lax.Precision.HIGHEST) * self.scale
        return (kernel.astype(F32) + delta).astype(kernel.dtype)


def linear_paths(model: nnx.Module) -> list[str]:
    """Returns the dotted paths of every nnx.Linear in `model` ("blocks.0.self_attn.q", ...)."""
    return [".".join(map(str, path)) for path, node in nnx.iter_graph(model) if isinstance(node, nnx.Linear) and path]


def target_paths(model: nnx.Module, targets: tuple[str, ...]) -> list[str]:
    """Returns the Linear paths matched by the fnmatch `targets`; a pattern matching nothing is an error."""
    paths = linear_paths(model)
    unmatched = [t for t in targets if not any(fnmatch.fnmatchcase(p, t) for p in paths)]
    if unmatched:
        names = sorted({re.sub(r"^blocks\.\d+\.", "blocks.*.", p) for p in paths})
        raise ValueError(f"LoRA targets {unmatched} match no Linear layer; valid layers: {', '.join(names)}")
    return [p for p in paths if any(fnmatch.fnmatchcase(p, t) for t in targets)]


def apply_lora(model: nnx.Module, config: LoraConfig, *, rngs: nnx.Rngs) -> nnx.Module:
    """Replaces every targeted Linear of `model` by a LoRALinear in place; returns model.

    The base kernels and biases are the same variables afterwards (no copy); only lora_a/lora_b
    are new. Applying twice is an error (the targets would already be LoRALinear).
    """
    for path in target_paths(model, config.targets):
        parent, name = _parent(model, path)
        base = _get(parent, name)
        if isinstance(base, LoRALinear):
            raise ValueError(f"{path} already has a LoRA; merge_lora first to add another")
        _set(parent, name, LoRALinear(base, rank=config.rank, scale=config.scale, rngs=rngs))
    return model


def merge_lora(model: nnx.Module) -> nnx.Module:
    """Folds every LoRALinear into its kernel and puts a plain nnx.Linear back; returns model.

    In place: the kernel variable keeps its identity (and metadata), the LoRA leaves are gone,
    so the result has exactly the base model's state structure (exportable, convert-loadable).
    """
    for path, module in list(lora_modules(model).items()):
        merged = module.merged_kernel()
        module.kernel.set_value(merged)
        parent, name = _parent(model, path)
        _set(parent, name, _plain_linear(module))
    return model


def lora_modules(model: nnx.Module) -> dict[str, LoRALinear]:
    """Returns {module path: LoRALinear} of `model`, in graph order."""
    return {".".join(map(str, p)): m for p, m in nnx.iter_graph(model) if isinstance(m, LoRALinear)}


def lora_factors(model: nnx.Module) -> dict[str, tuple[np.ndarray, np.ndarray, float]]:
    """Returns {our module path: (down [rank, in], up [out, rank], alpha)} in PyTorch layout,
    float32 numpy: what PEFT files call lora_A.weight and lora_B.weight (scale = alpha / rank)."""
    out = {}
    for path, module in lora_modules(model).items():
        # C-contiguous copies: safetensors' numpy writer stores a transposed view's raw buffer.
        down = np.ascontiguousarray(np.asarray(jax.device_get(module.lora_a[...]), np.float32).T)
        up = np.ascontiguousarray(np.asarray(jax.device_get(module.lora_b[...]), np.float32).T)
        out[path] = (down, up, module.scale * down.shape[0])
    return out


def module_name(path: str, layout: str = "diffusers") -> str:
    """Returns the module name of our Linear `path` in `layout` ("original" or "diffusers"), read
    from the DiT converter's name table: "blocks.3.self_attn.q" -> "blocks.3.attn1.to_q"."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r} must be one of {tuple(LAYOUTS)}")
    for row in LAYOUTS[layout].TABLE:
        if row.transform is not transpose_linear:
            continue
        ours = re.escape(row.target.removesuffix(".kernel")).replace(r"\{n\}", r"(?P<n>\d+)")
        match = re.fullmatch(ours, path)
        if match:
            source = row.source.removesuffix(".weight")
            return source.replace("{n}", match["n"]) if "{n}" in source else source
    raise ValueError(f"{path} is not a Linear layer of the {layout} Wan layout")


def _parent(model: nnx.Module, path: str) -> tuple[object, str]:
    *head, name = path.split(".")
    node = model
    for part in head:
        node = _get(node, part)
    return node, name


def _get(node, name: str):
    return node[int(name)] if isinstance(node, nnx.List) else getattr(node, name)


def _set(node, name: str, value) -> None:
    if isinstance(node, nnx.List):
        node[int(name)] = value
    else:
        setattr(node, name, value)


def _plain_linear(module: LoRALinear) -> nnx.Linear:
    """Returns an nnx.Linear holding `module`'s kernel/bias variables and settings (no new weights)."""
    linear = nnx.eval_shape(lambda: nnx.Linear(module.in_features, module.out_features, use_bias=module.use_bias,
                                               rngs=nnx.Rngs(0)))
    for name, value in vars(module).items():
        if not name.startswith("_") and name not in ("lora_a", "lora_b", "scale"):
            setattr(linear, name, value)
    return linear
