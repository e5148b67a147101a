"""Wan2.1 VAE checkpoints -> our WanVAE tree (models/wan/vae.py), and loading converted ones.

Two source layouts, one name table each, read top to bottom:
- original: `Wan2.1_VAE.pth` (wan/modules/vae.py). Our module tree keeps its structure
  (encoder.downsamples.k, middle.k, decoder.upsamples.k, conv1/conv2) and names its
  nn.Sequential slots: residual.0/2/3/6 -> norm1/conv1/norm2/conv2, head.0/2 -> head_norm/head_conv.
- diffusers: the `vae/` folder of a Wan *-Diffusers repo (AutoencoderKLWan, safetensors); its
  decoder groups the flat upsamples list into up_blocks.i.resnets.j / up_blocks.i.upsamplers.0.
The tables walk our (abstract) module, so which blocks have a shortcut or a temporal conv comes
from the config. Transforms: conv3d (O,I,t,h,w)->(t,h,w,I,O), conv2d (O,I,h,w)->(h,w,I,O),
the attention's 1x1 convs (O,I,1,1)->(I,O), RMS-norm gammas (C,1,1[,1])->(C,).
"""

import dataclasses
import functools
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from flax import nnx

from convert.checkpoint import canonical_dtype, load_model
from convert.component import ComponentPlan, convert_component, find_checkpoint, plan_component
from convert.io import CheckpointError, iter_tensor_infos, open_shards
from convert.transforms import Row, conv, identity
from models.wan.vae import WAN21_VAE, VAEConfig, WanVAE
from models.wan.vae_blocks import AttentionBlock, ResidualBlock, Resample

MODEL = "wan-vae"
SUBFOLDER = "vae"  # in a converted checkpoint, and in a diffusers pipeline folder
ORIGINAL_FILE = "Wan2.1_VAE.pth"
ORIGINAL_MARKER = "encoder.conv1.weight"  # a key only the original layout has
DIFFUSERS_MARKER = "encoder.conv_in.weight"

# Our ResidualBlock attribute -> the layout's name for it.
ORIGINAL_RESIDUAL = {"norm1": "residual.0", "conv1": "residual.2", "norm2": "residual.3",
                     "conv2": "residual.6", "shortcut": "shortcut"}  # fmt: skip
DIFFUSERS_RESIDUAL = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2",
                      "conv2": "conv2", "shortcut": "conv_shortcut"}  # fmt: skip
DIFFUSERS_MIDDLE = ("resnets.0", "attentions.0", "resnets.1")  # our middle.0, .1, .2


def conv2d(weight: np.ndarray) -> np.ndarray:
    """nn.Conv2d weight (O, I, h, w) -> kernel (h, w, I, O)."""
    if weight.ndim != 4:
        raise ValueError(f"a Conv2d weight is 4-D (O, I, h, w), got shape {weight.shape}")
    return weight.transpose(2, 3, 1, 0)


def conv1x1_to_linear(weight: np.ndarray) -> np.ndarray:
    """A 1x1 nn.Conv2d weight (O, I, 1, 1) -> Linear kernel (I, O)."""
    if weight.ndim != 4 or weight.shape[2:] != (1, 1):
        raise ValueError(f"a 1x1 Conv2d weight is (O, I, 1, 1), got shape {weight.shape}")
    return weight[:, :, 0, 0].T


def gamma(weight: np.ndarray) -> np.ndarray:
    """An RMS_norm gamma (C, 1, 1[, 1]) -> (C,)."""
    if weight.ndim < 1 or any(n != 1 for n in weight.shape[1:]):
        raise ValueError(f"an RMS_norm gamma is (C, 1, ..., 1), got shape {weight.shape}")
    return weight.reshape(weight.shape[0])


def original_table(vae: WanVAE) -> list[Row]:
    """Returns the Wan2.1_VAE.pth -> ours rows for `vae`'s (abstract) structure."""
    rows = [*conv("encoder.conv1", "encoder.conv1")]
    for k, block in enumerate(vae.encoder.downsamples):
        rows += _block(f"encoder.downsamples.{k}", f"encoder.downsamples.{k}", block, ORIGINAL_RESIDUAL)
    for k, block in enumerate(vae.encoder.middle):
        rows += _block(f"encoder.middle.{k}", f"encoder.middle.{k}", block, ORIGINAL_RESIDUAL)
    rows += [Row("encoder.head.0.gamma", "encoder.head_norm.gamma", gamma)]
    rows += conv("encoder.head.2", "encoder.head_conv")
    rows += [*conv("conv1", "conv1"), *conv("conv2", "conv2")]
    rows += [*conv("decoder.conv1", "decoder.conv1")]
    for k, block in enumerate(vae.decoder.middle):
        rows += _block(f"decoder.middle.{k}", f"decoder.middle.{k}", block, ORIGINAL_RESIDUAL)
    for k, block in enumerate(vae.decoder.upsamples):
        rows += _block(f"decoder.upsamples.{k}", f"decoder.upsamples.{k}", block, ORIGINAL_RESIDUAL)
    rows += [Row("decoder.head.0.gamma", "decoder.head_norm.gamma", gamma)]
    rows += conv("decoder.head.2", "decoder.head_conv")
    return rows


def diffusers_table(vae: WanVAE) -> list[Row]:
    """Returns the diffusers AutoencoderKLWan -> ours rows for `vae`'s (abstract) structure."""
    rows = [*conv("encoder.conv_in", "encoder.conv1")]
    for k, block in enumerate(vae.encoder.downsamples):
        rows += _block(f"encoder.down_blocks.{k}", f"encoder.downsamples.{k}", block, DIFFUSERS_RESIDUAL)
    for k, name in enumerate(DIFFUSERS_MIDDLE):
        rows += _block(f"encoder.mid_block.{name}", f"encoder.middle.{k}", vae.encoder.middle[k], DIFFUSERS_RESIDUAL)
    rows += [Row("encoder.norm_out.gamma", "encoder.head_norm.gamma", gamma)]
    rows += conv("encoder.conv_out", "encoder.head_conv")
    rows += [*conv("quant_conv", "conv1"), *conv("post_quant_conv", "conv2")]
    rows += [*conv("decoder.conv_in", "decoder.conv1")]
    for k, name in enumerate(DIFFUSERS_MIDDLE):
        rows += _block(f"decoder.mid_block.{name}", f"decoder.middle.{k}", vae.decoder.middle[k], DIFFUSERS_RESIDUAL)
    level, resnet = 0, 0  # diffusers groups a level's resnets and its upsampler into up_blocks.level
    for k, block in enumerate(vae.decoder.upsamples):
        if isinstance(block, Resample):
            rows += _block(f"decoder.up_blocks.{level}.upsamplers.0", f"decoder.upsamples.{k}", block, {})
            level, resnet = level + 1, 0
        else:
            source = f"decoder.up_blocks.{level}.resnets.{resnet}"
            rows += _block(source, f"decoder.upsamples.{k}", block, DIFFUSERS_RESIDUAL)
            resnet += 1
    rows += [Row("decoder.norm_out.gamma", "decoder.head_norm.gamma", gamma)]
    rows += conv("decoder.conv_out", "decoder.head_conv")
    return rows


def _block(source: str, target: str, block: nnx.Module, residual_names: dict[str, str]) -> list[Row]:
    if isinstance(block, ResidualBlock):
        name = {ours: f"{source}.{theirs}" for ours, theirs in residual_names.items()}
        rows = [Row(f"{name['norm1']}.gamma", f"{target}.norm1.gamma", gamma), *conv(name["conv1"], f"{target}.conv1")]
        rows += [Row(f"{name['norm2']}.gamma", f"{target}.norm2.gamma", gamma), *conv(name["conv2"], f"{target}.conv2")]
        if block.shortcut is not None:
            rows += conv(name["shortcut"], f"{target}.shortcut")
        return rows
    if isinstance(block, AttentionBlock):
        return [
            Row(f"{source}.norm.gamma", f"{target}.norm.gamma", gamma),
            Row(f"{source}.to_qkv.weight", f"{target}.to_qkv.kernel", conv1x1_to_linear),
            Row(f"{source}.to_qkv.bias", f"{target}.to_qkv.bias", identity),
            Row(f"{source}.proj.weight", f"{target}.proj.kernel", conv1x1_to_linear),
            Row(f"{source}.proj.bias", f"{target}.proj.bias", identity),
        ]
    if isinstance(block, Resample):  # nn.Sequential(Upsample or ZeroPad2d, Conv2d): the conv is slot 1
        rows = [
            Row(f"{source}.resample.1.weight", f"{target}.resample.kernel", conv2d),
            Row(f"{source}.resample.1.bias", f"{target}.resample.bias", identity),
        ]
        if block.time_conv is not None:
            rows += conv(f"{source}.time_conv", f"{target}.time_conv")
        return rows
    raise TypeError(f"no conversion rows for {type(block).__name__} at {target}")


def config_from_diffusers(config_json: dict) -> VAEConfig:
    """Returns our VAEConfig from a diffusers AutoencoderKLWan config.json (Wan2.1 layouts only)."""
    c = config_json
    wan21 = {"is_residual": False, "attn_scales": [], "patch_size": None, "in_channels": 3,
             "out_channels": 3, "decoder_base_dim": None}  # fmt: skip
    for key, expected in wan21.items():
        if c.get(key, expected) != expected:
            raise CheckpointError(f"vae config {key}={c[key]!r}: not a Wan2.1 VAE (needs {key}={expected!r}; "
                                  "the Wan2.2 VAE is not ported)")  # fmt: skip
    d = WAN21_VAE
    return VAEConfig(
        base_dim=c.get("base_dim", d.base_dim), z_dim=c.get("z_dim", d.z_dim),
        dim_mult=tuple(c.get("dim_mult", d.dim_mult)), num_res_blocks=c.get("num_res_blocks", d.num_res_blocks),
        temporal_downsample=tuple(c.get("temperal_downsample", d.temporal_downsample)),
        latents_mean=tuple(c.get("latents_mean", d.latents_mean)),
        latents_std=tuple(c.get("latents_std", d.latents_std)),
    )  # fmt: skip


def find_vae(src: Path) -> tuple[list[Path], Path | None] | None:
    """Returns (checkpoint files, config.json or None) of the VAE in `src`, or None.

    src: a .pth or .safetensors file, a diffusers vae/ folder or pipeline folder (uses vae/),
    or an original Wan2.1 folder (Wan2.1_VAE.pth).
    """
    return find_checkpoint(src, subfolder=SUBFOLDER, original_file=ORIGINAL_FILE, what="AutoencoderKLWan",
                           is_config=lambda c: c.get("_class_name") == "AutoencoderKLWan",
                           weights_glob="diffusion_pytorch_model.safetensors")


def plan_vae(
    files: Sequence[Path], config_path: Path | None, dtype: str, *, config: VAEConfig | None = None
) -> ComponentPlan:
    """Returns the conversion plan of a Wan2.1 VAE checkpoint, or raises listing every problem.

    config: the VAE's config; default from the diffusers config.json, else from the tensor
    shapes (base_dim, z_dim) on top of WAN21_VAE.
    """
    shards = open_shards(files)
    shapes = {name: info.shape for name, info, _ in iter_tensor_infos(shards)}
    if ORIGINAL_MARKER in shapes:
        layout, make_table, probes = "original", original_table, ("encoder.conv1.weight", "conv2.weight")
    elif DIFFUSERS_MARKER in shapes:
        layout, make_table, probes = "diffusers", diffusers_table, ("encoder.conv_in.weight", "post_quant_conv.weight")
    else:
        raise CheckpointError(f"{files[0]}: not a Wan2.1 VAE: neither {ORIGINAL_MARKER} (original) nor "
                              f"{DIFFUSERS_MARKER} (diffusers) among {sorted(shapes)[:8]}...")  # fmt: skip
    if config is None and config_path is not None:
        config = config_from_diffusers(json.loads(Path(config_path).read_text()))
    if config is None:
        base_dim, z_dim = (shapes[p][0] if p in shapes else None for p in probes)
        try:
            config = dataclasses.replace(WAN21_VAE, base_dim=base_dim or WAN21_VAE.base_dim, z_dim=z_dim or 16)
        except ValueError as e:
            message = f"{files[0]}: z_dim={z_dim} has no Wan latent statistics; pass config=: {e}"
            raise CheckpointError(message) from None
    config = dataclasses.replace(config, dtype=canonical_dtype(dtype))
    abstract = nnx.eval_shape(lambda: WanVAE(config, rngs=nnx.Rngs(0)))
    return plan_component(MODEL, config, abstract, make_table(abstract), shards, layout=layout)


def convert_vae(src, dst, dtype: str = "float32", *, config: VAEConfig | None = None, progress: bool = False) -> Path:
    """Converts the Wan2.1 VAE at `src` into the new folder `dst`; returns dst.

    src: see find_vae. dtype: of the stored parameters and of compute after load_vae ("float32",
    as Wan runs its VAE, or "bf16"); config: see plan_vae. All names and shapes are checked
    before writing; dst appears only when complete.
    """
    return convert_component(src, dst, find=find_vae, plan=functools.partial(plan_vae, config=config), dtype=dtype,
                             progress=progress, what="Wan2.1 VAE",
                             looked_for=f"{ORIGINAL_FILE}, a {SUBFOLDER}/ folder, an AutoencoderKLWan config.json")


def load_vae(path, *, dtype: str | None = None) -> WanVAE:
    """Returns the WanVAE converted into `path` (the component folder or a root with vae/).

    dtype: param and compute dtype; default as converted.
    """
    return load_model(path, WanVAE, VAEConfig, model=MODEL, subfolder=SUBFOLDER, dtype=dtype)