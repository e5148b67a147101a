"""The diffusers layout (WanTransformer3DModel, src/diffusers/models/transformers/transformer_wan.py).

Same network as the original with other module names. Two traps: diffusers' block `norm2` is
the cross-attention norm (the original's `norm3`), and its I2V image projections are
attn2.add_k_proj/add_v_proj/norm_added_k (the original's k_img/v_img/norm_k_img).
"""

from collections.abc import Mapping
from typing import Any

from convert.transforms import conv, layer_norm, linear, param, rms_norm

NAME = "diffusers"
MARKER = "condition_embedder.time_proj.weight"  # a key only this layout has

TABLE = (
    *conv("patch_embedding", "patch_embedding"),
    *linear("condition_embedder.text_embedder.linear_1", "text_embedding.0"),
    *linear("condition_embedder.text_embedder.linear_2", "text_embedding.2"),
    *linear("condition_embedder.time_embedder.linear_1", "time_embedding.0"),
    *linear("condition_embedder.time_embedder.linear_2", "time_embedding.2"),
    *linear("condition_embedder.time_proj", "time_projection.1"),
    # I2V: the CLIP image projection
    *layer_norm("condition_embedder.image_embedder.norm1", "img_emb.proj.0"),
    *linear("condition_embedder.image_embedder.ff.net.0.proj", "img_emb.proj.1"),
    *linear("condition_embedder.image_embedder.ff.net.2", "img_emb.proj.3"),
    *layer_norm("condition_embedder.image_embedder.norm2", "img_emb.proj.4"),
    # blocks
    *linear("blocks.{n}.attn1.to_q", "blocks.{n}.self_attn.q"),
    *linear("blocks.{n}.attn1.to_k", "blocks.{n}.self_attn.k"),
    *linear("blocks.{n}.attn1.to_v", "blocks.{n}.self_attn.v"),
    *linear("blocks.{n}.attn1.to_out.0", "blocks.{n}.self_attn.o"),
    *rms_norm("blocks.{n}.attn1.norm_q", "blocks.{n}.self_attn.norm_q"),
    *rms_norm("blocks.{n}.attn1.norm_k", "blocks.{n}.self_attn.norm_k"),
    *layer_norm("blocks.{n}.norm2", "blocks.{n}.norm3"),
    *linear("blocks.{n}.attn2.to_q", "blocks.{n}.cross_attn.q"),
    *linear("blocks.{n}.attn2.to_k", "blocks.{n}.cross_attn.k"),
    *linear("blocks.{n}.attn2.to_v", "blocks.{n}.cross_attn.v"),
    *linear("blocks.{n}.attn2.to_out.0", "blocks.{n}.cross_attn.o"),
    *rms_norm("blocks.{n}.attn2.norm_q", "blocks.{n}.cross_attn.norm_q"),
    *rms_norm("blocks.{n}.attn2.norm_k", "blocks.{n}.cross_attn.norm_k"),
    *linear("blocks.{n}.attn2.add_k_proj", "blocks.{n}.cross_attn.k_img"),
    *linear("blocks.{n}.attn2.add_v_proj", "blocks.{n}.cross_attn.v_img"),
    *rms_norm("blocks.{n}.attn2.norm_added_k", "blocks.{n}.cross_attn.norm_k_img"),
    *linear("blocks.{n}.ffn.net.0.proj", "blocks.{n}.ffn.0"),
    *linear("blocks.{n}.ffn.net.2", "blocks.{n}.ffn.2"),
    *param("blocks.{n}.scale_shift_table", "blocks.{n}.modulation"),
    # head
    *linear("proj_out", "head.head"),
    *param("scale_shift_table", "head.modulation"),
)
# Some diffusers I2V checkpoints carry a q-norm for image tokens that no code uses (diffusers
# lists it in _keys_to_ignore_on_load_unexpected).
IGNORED = ("blocks.{n}.attn2.norm_added_q.weight", "blocks.{n}.attn2.norm_added_q.bias")

PROBES = {
    "dim": ("patch_embedding.weight", 0),
    "in_dim": ("patch_embedding.weight", 1),
    "text_dim": ("condition_embedder.text_embedder.linear_1.weight", 1),
    "freq_dim": ("condition_embedder.time_embedder.linear_1.weight", 1),
    "ffn_dim": ("blocks.0.ffn.net.0.proj.weight", 0),
    "img_dim": ("condition_embedder.image_embedder.norm1.weight", 0),
    "head_out": ("proj_out.weight", 0),
}
PATCH_WEIGHT = "patch_embedding.weight"
I2V_KEY = "condition_embedder.image_embedder.norm1.weight"
CROSS_NORM_KEY = "blocks.0.norm2.weight"


def config_fields(config_json: Mapping[str, Any]) -> dict[str, Any]:
    """Returns the WanConfig fields that a diffusers transformer/config.json states."""
    c = config_json
    fields = {}
    if "num_attention_heads" in c:
        fields["num_heads"] = c["num_attention_heads"]
        if "attention_head_dim" in c:
            fields["dim"] = c["num_attention_heads"] * c["attention_head_dim"]
    renames = {"in_channels": "in_dim", "out_channels": "out_dim", "text_dim": "text_dim", "freq_dim": "freq_dim",
               "ffn_dim": "ffn_dim", "num_layers": "num_layers", "cross_attn_norm": "cross_attn_norm",
               "eps": "eps", "patch_size": "patch_size", "image_dim": "img_dim"}
    fields.update({ours: c[theirs] for theirs, ours in renames.items() if c.get(theirs) is not None})
    if c.get("out_channels") is None and "in_channels" in c:
        fields["out_dim"] = c["in_channels"]  # diffusers: out_channels defaults to in_channels
    if "qk_norm" in c:
        if c["qk_norm"] not in ("rms_norm_across_heads", None):
            raise ValueError(f"qk_norm={c['qk_norm']!r}: only 'rms_norm_across_heads' (Wan2.1) is ported")
        fields["qk_norm"] = c["qk_norm"] is not None
    if c.get("pos_embed_seq_len") is not None:
        raise ValueError("pos_embed_seq_len is set: a first-last-frame (FLF2V) model, not ported")
    if c.get("image_dim") is not None:
        fields["model_type"] = "i2v"
        if c.get("added_kv_proj_dim") not in (None, fields.get("dim")):
            raise ValueError(f"added_kv_proj_dim={c['added_kv_proj_dim']} must equal the model width "
                             f"{fields.get('dim')} (Wan2.1 I2V)")
    return fields
