"""Wan2.1 VAE checkpoints -> our WanVAE tree (models/wan/vae.py), and loading converted ones.

Two source formats, one name table each, read top to bottom:
- original: `Wan2.1_VAE.pth` (wan/modules/vae.py). Our module tree keeps its structure
  (encoder.downsamples.k, middle.k, decoder.upsamples.k, conv1/conv2) and names its
  nn.Sequential slots: residual.0/2/3/6 -> norm1/conv1/norm2/conv2, head.0/2 -> head_norm/head_conv.
- diffusers: the `vae/` folder of a Wan *-Diffusers repo (AutoencoderKLWan, safetensors);
  its decoder groups the flat upsamples list into up_blocks.i.resnets.j / upsamplers.0.
Transforms: conv3d (O,I,t,h,w)->(t,h,w,I,O), conv2d (O,I,h,w)->(h,w,I,O), the attention's 1x1
convs (O,I,1,1)->(I,O), RMS-norm gammas (C,1,1[,1])->(C,).
"""

import dataclasses
import json
from pathlib import Path

from flax import nnx

from convert.streaming import (
    Rule, SafetensorsSource, conv1x1_to_linear, conv2d, conv3d, convert_tree, identity, load_tree,
    open_source, read_config, vector,
)  # fmt: skip
from models.wan.vae import WAN21_VAE, VAEConfig, WanVAE
from models.wan.vae_blocks import AttentionBlock, ResidualBlock, Resample

MODEL = "wan_vae"

# Our ResidualBlock attribute -> the source's name for it.
ORIGINAL_RESIDUAL = {"norm1": "residual.0", "conv1": "residual.2", "norm2": "residual.3",
                     "conv2": "residual.6", "shortcut": "shortcut"}  # fmt: skip
DIFFUSERS_RESIDUAL = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2",
                      "conv2": "conv2", "shortcut": "conv_shortcut"}  # fmt: skip


def original_rules(vae: WanVAE) -> list[Rule]:
    """Returns the Wan2.1_VAE.pth -> ours table for `vae`'s (abstract) structure."""
    rules = _conv("encoder.conv1", "encoder.conv1")
    for k, block in enumerate(vae.encoder.downsamples):
        rules += _block(f"encoder.downsamples.{k}", f"encoder.downsamples.{k}", block, ORIGINAL_RESIDUAL)
    for k, block in enumerate(vae.encoder.middle):
        rules += _block(f"encoder.middle.{k}", f"encoder.middle.{k}", block, ORIGINAL_RESIDUAL)
    rules += [Rule("encoder.head.0.gamma", "encoder.head_norm.gamma", vector)]
    rules += _conv("encoder.head.2", "encoder.head_conv")
    rules += _conv("conv1", "conv1") + _conv("conv2", "conv2")
    rules += _conv("decoder.conv1", "decoder.conv1")
    for k, block in enumerate(vae.decoder.middle):
        rules += _block(f"decoder.middle.{k}", f"decoder.middle.{k}", block, ORIGINAL_RESIDUAL)
    for k, block in enumerate(vae.decoder.upsamples):
        rules += _block(f"decoder.upsamples.{k}", f"decoder.upsamples.{k}", block, ORIGINAL_RESIDUAL)
    rules += [Rule("decoder.head.0.gamma", "decoder.head_norm.gamma", vector)]
    rules += _conv("decoder.head.2", "decoder.head_conv")
    return rules


def diffusers_rules(vae: WanVAE) -> list[Rule]:
    """Returns the diffusers AutoencoderKLWan -> ours table for `vae`'s (abstract) structure."""
    rules = _conv("encoder.conv_in", "encoder.conv1")
    for k, block in enumerate(vae.encoder.downsamples):
        rules += _block(f"encoder.down_blocks.{k}", f"encoder.downsamples.{k}", block, DIFFUSERS_RESIDUAL)
    for k, name in enumerate(("resnets.0", "attentions.0", "resnets.1")):
        rules += _block(f"encoder.mid_block.{name}", f"encoder.middle.{k}", vae.encoder.middle[k], DIFFUSERS_RESIDUAL)
    rules += [Rule("encoder.norm_out.gamma", "encoder.head_norm.gamma", vector)]
    rules += _conv("encoder.conv_out", "encoder.head_conv")
    rules += _conv("quant_conv", "conv1") + _conv("post_quant_conv", "conv2")
    rules += _conv("decoder.conv_in", "decoder.conv1")
    for k, name in enumerate(("resnets.0", "attentions.0", "resnets.1")):
        rules += _block(f"decoder.mid_block.{name}", f"decoder.middle.{k}", vae.decoder.middle[k], DIFFUSERS_RESIDUAL)
    level, resnet = 0, 0  # diffusers groups each level's resnets and its upsampler into up_blocks.level
    for k, block in enumerate(vae.decoder.upsamples):
        if isinstance(block, Resample):
            rules += _block(f"decoder.up_blocks.{level}.upsamplers.0", f"decoder.upsamples.{k}", block, {})
            level, resnet = level + 1, 0
        else:
            rules += _block(f"decoder.up_blocks.{level}.resnets.{resnet}", f"decoder.upsamples.{k}", block, DIFFUSERS_RESIDUAL)
            resnet += 1
    rules += [Rule("decoder.norm_out.gamma", "decoder.head_norm.gamma", vector)]
    rules += _conv("decoder.conv_out", "decoder.head_conv")
    return rules


def _conv(source: str, target: str, transform=conv3d) -> list[Rule]:
    return [Rule(f"{source}.weight", f"{target}.kernel", transform), Rule(f"{source}.bias", f"{target}.bias", identity)]


def _block(source: str, target: str, block, residual_names: dict[str, str]) -> list[Rule]:
    if isinstance(block, ResidualBlock):
        names = {ours: f"{source}.{theirs}" for ours, theirs in residual_names.items()}
        rules = [Rule(f"{names['norm1']}.gamma", f"{target}.norm1.gamma", vector)]
        rules += _conv(names["conv1"], f"{target}.conv1")
        rules += [Rule(f"{names['norm2']}.gamma", f"{target}.norm2.gamma", vector)]
        rules += _conv(names["conv2"], f"{target}.conv2")
        if block.shortcut is not None:
            rules += _conv(names["shortcut"], f"{target}.shortcut")
        return rules
    if isinstance(block, AttentionBlock):
        return [
            Rule(f"{source}.norm.gamma", f"{target}.norm.gamma", vector),
            *_conv(f"{source}.to_qkv", f"{target}.to_qkv", conv1x1_to_linear),
            *_conv(f"{source}.proj", f"{target}.proj", conv1x1_to_linear),
        ]
    if isinstance(block, Resample):  # nn.Sequential(Upsample or ZeroPad2d, Conv2d): the conv is slot 1
        rules = _conv(f"{source}.resample.1", f"{target}.resample", conv2d)
        if block.time_conv is not None:
            rules += _conv(f"{source}.time_conv", f"{target}.time_conv")
        return rules
    raise TypeError(f"no conversion rule for {type(block).__name__} at {target}")


def config_from_diffusers(folder) -> VAEConfig:
    """Returns our VAEConfig from a diffusers AutoencoderKLWan config.json (Wan2.1 layouts only)."""
    path = Path(folder) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: expected the vae/ folder of a diffusers Wan checkpoint")
    cfg = json.loads(path.read_text())
    wan21 = {"is_residual": False, "attn_scales": [], "patch_size": None, "in_channels": 3,
             "out_channels": 3, "decoder_base_dim": None}  # fmt: skip
    for key, expected in wan21.items():
        if cfg.get(key, expected) != expected:
            raise ValueError(f"{path}: {key}={cfg[key]!r} is not a Wan2.1 VAE (only {key}={expected!r} is supported)")
    default = WAN21_VAE
    return VAEConfig(
        base_dim=cfg.get("base_dim", default.base_dim),
        z_dim=cfg.get("z_dim", default.z_dim),
        dim_mult=tuple(cfg.get("dim_mult", default.dim_mult)),
        num_res_blocks=cfg.get("num_res_blocks", default.num_res_blocks),
        temporal_downsample=tuple(cfg.get("temperal_downsample", default.temporal_downsample)),
        latents_mean=tuple(cfg.get("latents_mean", default.latents_mean)),
        latents_std=tuple(cfg.get("latents_std", default.latents_std)),
    )


def convert_vae(src, dst, dtype: str = "float32", *, config: VAEConfig | None = None, overwrite: bool = False) -> Path:
    """Converts a Wan2.1 VAE into dst (config.json + model.safetensors in `dtype`); returns dst.

    src: `Wan2.1_VAE.pth` (original; config defaults to WAN21_VAE) or a diffusers `vae/` folder
    (config read from its config.json unless given).
    """
    src = Path(src)
    if src.is_dir():
        config = config or config_from_diffusers(src)
        source, make_rules = SafetensorsSource(src), diffusers_rules
    else:
        config = config or WAN21_VAE
        source, make_rules = open_source(src), original_rules
    config = dataclasses.replace(config, dtype=dtype)
    abstract = nnx.eval_shape(lambda: WanVAE(config, rngs=nnx.Rngs(0)))
    return convert_tree(source, make_rules(abstract), abstract, dst, model=MODEL, config=config, overwrite=overwrite)


def load_vae(folder) -> WanVAE:
    """Returns the WanVAE converted into `folder` by convert_vae, on the default device."""
    config = VAEConfig(**read_config(folder, MODEL))
    abstract = nnx.eval_shape(lambda: WanVAE(config, rngs=nnx.Rngs(0)))
    return load_tree(folder, abstract, MODEL)
