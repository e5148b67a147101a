"""Shared helpers for the Wan tests: tiny random diffusers models (the torch oracle), their
original-layout twins, and converting them with our converter."""

import json
import re
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import torch

from convert import convert_checkpoint, load_wan

TEXT_TOKENS = 512  # diffusers' I2V attention splits image from text tokens at len - 512
HEADS, HEAD_DIM = 2, 20  # head_dim 20: RoPE splits it unevenly (t 8, h 6, w 6)
LATENT = (3, 8, 12)  # latent frames, height, width: 3 x 4 x 6 = 72 tokens, h != w catches swaps


def tiny_diffusers(kind: str = "t2v", *, seed: int = 0, num_layers: int = 2):
    """Returns a random f32 diffusers WanTransformer3DModel; every tensor perturbed so that no
    two norms or tables are equal (an exchanged pair would otherwise go unnoticed)."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    i2v = dict(image_dim=20, added_kv_proj_dim=HEADS * HEAD_DIM) if kind == "i2v" else {}
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=HEADS, attention_head_dim=HEAD_DIM,
        in_channels=12 if kind == "i2v" else 4, out_channels=4, text_dim=24, freq_dim=256, ffn_dim=48,
        num_layers=num_layers, cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, **i2v,
    ).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def inputs(kind: str = "t2v", *, seed: int = 1, text_tokens: int = 9, batch: int = 1):
    """Returns torch inputs channels-first: latents, timestep, context (unpadded), clip, y."""
    g = torch.Generator().manual_seed(seed)
    f, h, w = LATENT
    x = torch.randn(batch, 4, f, h, w, generator=g)
    t = torch.tensor([937.0, 250.0][:batch])
    context = torch.randn(batch, text_tokens, 24, generator=g)
    clip = torch.randn(batch, 257, 20, generator=g) if kind == "i2v" else None
    y = torch.randn(batch, 8, f, h, w, generator=g) if kind == "i2v" else None
    return x, t, context, clip, y


def torch_forward(model, x, t, context, clip=None, y=None, *, hook_blocks: bool = False):
    """Returns (output channels-first, [per-block outputs]) of diffusers, with the text padded to
    512 tokens by zeros as Wan's pipelines do before the model."""
    padded = torch.cat([context, context.new_zeros(context.shape[0], TEXT_TOKENS - context.shape[1], context.shape[2])], 1)
    hidden = torch.cat([x, y], 1) if y is not None else x
    captured = []
    hooks = [b.register_forward_hook(lambda mod, args, out: captured.append(out.detach().numpy()))
             for b in model.blocks] if hook_blocks else []
    try:
        with torch.no_grad():
            out = model(hidden, t, padded, encoder_hidden_states_image=clip, return_dict=False)[0]
    finally:
        for hook in hooks:
            hook.remove()
    return out.numpy(), captured


def channels_last(t: torch.Tensor | None):
    return None if t is None else jnp.asarray(t.permute(0, 2, 3, 4, 1).numpy())


def ours_kwargs(x, t, context, clip=None, y=None) -> tuple[tuple, dict]:
    """Returns (args, kwargs) for our model from torch inputs."""
    kwargs = {}
    if clip is not None:
        kwargs.update(clip_fea=jnp.asarray(clip.numpy()), y=channels_last(y))
    return (channels_last(x), jnp.asarray(t.numpy()), jnp.asarray(context.numpy())), kwargs


def save_and_convert(model, root: Path, *, dtype: str = "f32", shard_size: str | None = None, **load):
    """Saves `model` with save_pretrained under root/src, converts to root/ours, returns (dir, ours model)."""
    src = root / "src"
    model.save_pretrained(src / "transformer", **({"max_shard_size": shard_size} if shard_size else {}))
    convert_checkpoint(src, root / "ours", dtype=dtype, progress=False)
    return root / "ours", load_wan(root / "ours", **load)


# The original Wan2.1 names (wan/modules/model.py) of diffusers' tensors: the test's own reading
# of both sources, kept independent of convert/'s tables.
TO_ORIGINAL = [
    (r"^condition_embedder\.text_embedder\.linear_1\.", "text_embedding.0."),
    (r"^condition_embedder\.text_embedder\.linear_2\.", "text_embedding.2."),
    (r"^condition_embedder\.time_embedder\.linear_1\.", "time_embedding.0."),
    (r"^condition_embedder\.time_embedder\.linear_2\.", "time_embedding.2."),
    (r"^condition_embedder\.time_proj\.", "time_projection.1."),
    (r"^condition_embedder\.image_embedder\.norm1\.", "img_emb.proj.0."),
    (r"^condition_embedder\.image_embedder\.ff\.net\.0\.proj\.", "img_emb.proj.1."),
    (r"^condition_embedder\.image_embedder\.ff\.net\.2\.", "img_emb.proj.3."),
    (r"^condition_embedder\.image_embedder\.norm2\.", "img_emb.proj.4."),
    (r"\.attn1\.to_out\.0\.", ".self_attn.o."),
    (r"\.attn1\.to_([qkv])\.", r".self_attn.\1."),
    (r"\.attn1\.norm_([qk])\.", r".self_attn.norm_\1."),
    (r"\.attn2\.to_out\.0\.", ".cross_attn.o."),
    (r"\.attn2\.to_([qkv])\.", r".cross_attn.\1."),
    (r"\.attn2\.norm_([qk])\.", r".cross_attn.norm_\1."),
    (r"\.attn2\.add_([kv])_proj\.", r".cross_attn.\1_img."),
    (r"\.attn2\.norm_added_k\.", ".cross_attn.norm_k_img."),
    (r"^(blocks\.\d+)\.norm2\.", r"\1.norm3."),
    (r"\.ffn\.net\.0\.proj\.", ".ffn.0."),
    (r"\.ffn\.net\.2\.", ".ffn.2."),
    (r"^(blocks\.\d+)\.scale_shift_table$", r"\1.modulation"),
    (r"^proj_out\.", "head.head."),
    (r"^scale_shift_table$", "head.modulation"),
]


def original_state_dict(model) -> dict[str, torch.Tensor]:
    """Returns the diffusers model's tensors under the original Wan2.1 names."""
    out = {}
    for name, tensor in model.state_dict().items():
        for pattern, replacement in TO_ORIGINAL:
            name = re.sub(pattern, replacement, name)
        out[name] = tensor.contiguous()
    return out


def original_config_json(model) -> dict:
    """Returns a config.json as the original WanModel writes it (no text_dim: not registered)."""
    c = model.config
    return {"_class_name": "WanModel", "_diffusers_version": "0.30.0",
            "model_type": "i2v" if c.image_dim else "t2v", "dim": c.num_attention_heads * c.attention_head_dim,
            "eps": c.eps, "ffn_dim": c.ffn_dim, "freq_dim": c.freq_dim, "in_dim": c.in_channels,
            "num_heads": c.num_attention_heads, "num_layers": c.num_layers, "out_dim": c.out_channels, "text_len": 512}


def write_config(folder: Path, config: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))


def relative_error(ours, reference) -> float:
    ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
    return float(np.abs(ours - reference).max() / np.abs(reference).max())
