"""The original Wan2.1 layout (github Wan-Video/Wan2.1, wan/modules/model.py, `WanModel`).

Our parameter paths copy this layout's module names (models/wan/transformer.py), so the table
below only swaps PyTorch leaves for Flax ones: Linear weight (out, in) -> kernel (in, out),
Conv3d (O, I, t, h, w) -> (t, h, w, I, O), norm weight -> scale.
"""

from collections.abc import Mapping
from typing import Any

from convert.transforms import conv, layer_norm, linear, param, rms_norm

NAME = "original"
MARKER = "time_projection.1.weight"  # a key only this layout has

TABLE = (
    *conv("patch_embedding", "patch_embedding"),
    *linear("text_embedding.0", "text_embedding.0"),
    *linear("text_embedding.2", "text_embedding.2"),
    *linear("time_embedding.0", "time_embedding.0"),
    *linear("time_embedding.2", "time_embedding.2"),
    *linear("time_projection.1", "time_projection.1"),
    # I2V: the CLIP image projection (MLPProj)
    *layer_norm("img_emb.proj.0", "img_emb.proj.0"),
    *linear("img_emb.proj.1", "img_emb.proj.1"),
    *linear("img_emb.proj.3", "img_emb.proj.3"),
    *layer_norm("img_emb.proj.4", "img_emb.proj.4"),
    # blocks
    *linear("blocks.{n}.self_attn.q", "blocks.{n}.self_attn.q"),
    *linear("blocks.{n}.self_attn.k", "blocks.{n}.self_attn.k"),
    *linear("blocks.{n}.self_attn.v", "blocks.{n}.self_attn.v"),
    *linear("blocks.{n}.self_attn.o", "blocks.{n}.self_attn.o"),
    *rms_norm("blocks.{n}.self_attn.norm_q", "blocks.{n}.self_attn.norm_q"),
    *rms_norm("blocks.{n}.self_attn.norm_k", "blocks.{n}.self_attn.norm_k"),
    *layer_norm("blocks.{n}.norm3", "blocks.{n}.norm3"),
    *linear("blocks.{n}.cross_attn.q", "blocks.{n}.cross_attn.q"),
    *linear("blocks.{n}.cross_attn.k", "blocks.{n}.cross_attn.k"),
    *linear("blocks.{n}.cross_attn.v", "blocks.{n}.cross_attn.v"),
    *linear("blocks.{n}.cross_attn.o", "blocks.{n}.cross_attn.o"),
    *rms_norm("blocks.{n}.cross_attn.norm_q", "blocks.{n}.cross_attn.norm_q"),
    *rms_norm("blocks.{n}.cross_attn.norm_k", "blocks.{n}.cross_attn.norm_k"),
    *linear("blocks.{n}.cross_attn.k_img", "blocks.{n}.cross_attn.k_img"),
    *linear("blocks.{n}.cross_attn.v_img", "blocks.{n}.cross_attn.v_img"),
    *rms_norm("blocks.{n}.cross_attn.norm_k_img", "blocks.{n}.cross_attn.norm_k_img"),
    *linear("blocks.{n}.ffn.0", "blocks.{n}.ffn.0"),
    *linear("blocks.{n}.ffn.2", "blocks.{n}.ffn.2"),
    *param("blocks.{n}.modulation", "blocks.{n}.modulation"),
    # head
    *linear("head.head", "head.head"),
    *param("head.modulation", "head.modulation"),
)
IGNORED = ()

# Where shapes tell the hyperparameters (tensor, axis), for checkpoints without a config.json
# and for fields the original config.json leaves out (text_dim, the CLIP width).
PROBES = {
    "dim": ("patch_embedding.weight", 0),
    "in_dim": ("patch_embedding.weight", 1),
    "text_dim": ("text_embedding.0.weight", 1),
    "freq_dim": ("time_embedding.0.weight", 1),
    "ffn_dim": ("blocks.0.ffn.0.weight", 0),
    "img_dim": ("img_emb.proj.0.weight", 0),
    "head_out": ("head.head.weight", 0),
}
PATCH_WEIGHT = "patch_embedding.weight"
I2V_KEY = "img_emb.proj.0.weight"
CROSS_NORM_KEY = "blocks.0.norm3.weight"

# config.json of the original (WanModel's register_to_config) -> WanConfig, same names.
CONFIG_FIELDS = ("model_type", "patch_size", "text_len", "in_dim", "dim", "ffn_dim", "freq_dim", "text_dim",
                 "out_dim", "num_heads", "num_layers", "qk_norm", "cross_attn_norm", "eps")


def config_fields(config_json: Mapping[str, Any]) -> dict[str, Any]:
    """Returns the WanConfig fields that an original config.json states."""
    window = config_json.get("window_size", (-1, -1))
    if tuple(window) != (-1, -1):
        raise ValueError(f"window_size={window}: local attention windows are not ported (Wan2.1 uses (-1, -1))")
    if config_json.get("model_type", "t2v") not in ("t2v", "i2v"):
        raise ValueError(f"model_type={config_json['model_type']!r}: only t2v and i2v (Wan2.1, Wan2.2 A14B) are "
                         "supported")  # fmt: skip
    return {k: config_json[k] for k in CONFIG_FIELDS if k in config_json}
