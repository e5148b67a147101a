"""Wan2.1's CLIP image encoder checkpoints -> our CLIPVisionEncoder tree (models/clip.py), and loading.

Two source layouts, one name table each, read top to bottom ("{n}": the block):
- original: Wan2.1's `models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth` (wan/modules/
  clip.py, XLMRobertaCLIP): the visual tower under `visual.`; its fused attn.to_qkv (3*dim, dim)
  is split by rows into our q, k, v. The text tower (`textual.`) and `log_scale` are skipped.
- transformers: the `image_encoder/` folder of a Wan I2V *-Diffusers repo (CLIPVisionModel or
  CLIPVisionModelWithProjection, safetensors), with or without the `vision_model.` prefix.
Both skip what Wan never runs: the last block, the post-norm and the head or projection.
Transforms: Linear (out, in) -> kernel (in, out); Conv2d (O, I, h, w) -> (h, w, I, O); the
class token and positions reshaped to (1, 1, dim) and (1, tokens, dim).
"""

import dataclasses
import json
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from flax import nnx

from convert.checkpoint import canonical_dtype, load_model
from convert.component import ComponentPlan, convert_component, find_checkpoint, plan_component
from convert.io import CheckpointError, iter_tensor_infos, open_shards
from convert.transforms import Row, expand_rows, layer_norm, linear
from convert.wan_vae import conv2d
from models.clip import CLIP_VIT_H_14, CLIPVisionConfig, CLIPVisionEncoder

MODEL = "clip-vision"
SUBFOLDER = "image_encoder"  # in a converted checkpoint, and in a diffusers pipeline folder
ORIGINAL_FILE = "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth"
ORIGINAL_MARKER = "visual.cls_embedding"
TRANSFORMERS_MARKER = "embeddings.class_embedding"  # after an optional "vision_model." prefix


def qkv_part(index: int):
    """Returns the transform taking rows [index*dim, (index+1)*dim) of a fused qkv weight or bias,
    as a Linear kernel (in, out) or a bias (out,)."""

    def take(fused: np.ndarray) -> np.ndarray:
        if fused.shape[0] % 3:
            raise ValueError(f"a fused qkv tensor has 3*dim rows, got shape {fused.shape}")
        part = np.split(fused, 3, axis=0)[index]
        return part.T if part.ndim == 2 else part

    take.__name__ = f"qkv_part_{'qkv'[index]}"
    return take


QKV = tuple(qkv_part(i) for i in range(3))


def class_token(x: np.ndarray) -> np.ndarray:
    """A class embedding (dim,) or (1, 1, dim) -> (1, 1, dim)."""
    return x.reshape(1, 1, x.shape[-1])


def positions(x: np.ndarray) -> np.ndarray:
    """A position table (tokens, dim) or (1, tokens, dim) -> (1, tokens, dim)."""
    if x.ndim not in (2, 3):
        raise ValueError(f"a position table is (tokens, dim), got shape {x.shape}")
    return x.reshape(1, *x.shape[-2:])


ORIGINAL_TABLE = (
    Row("patch_embedding.weight", "patch_embedding.kernel", conv2d),
    Row("cls_embedding", "cls_embedding", class_token),
    Row("pos_embedding", "pos_embedding", positions),
    *layer_norm("pre_norm", "pre_norm"),
    *layer_norm("transformer.{n}.norm1", "transformer.{n}.norm1"),
    *(Row(f"transformer.{{n}}.attn.to_qkv.{leaf}", f"transformer.{{n}}.attn.{name}.{ours}", QKV[i])
      for i, name in enumerate("qkv") for leaf, ours in (("weight", "kernel"), ("bias", "bias"))),
    *linear("transformer.{n}.attn.proj", "transformer.{n}.attn.proj"),
    *layer_norm("transformer.{n}.norm2", "transformer.{n}.norm2"),
    *linear("transformer.{n}.mlp.0", "transformer.{n}.mlp.0"),
    *linear("transformer.{n}.mlp.2", "transformer.{n}.mlp.2"),
)  # fmt: skip

TRANSFORMERS_TABLE = (
    Row("embeddings.patch_embedding.weight", "patch_embedding.kernel", conv2d),
    Row("embeddings.class_embedding", "cls_embedding", class_token),
    Row("embeddings.position_embedding.weight", "pos_embedding", positions),
    *layer_norm("pre_layrnorm", "pre_norm"),  # sic: transformers spells it "layrnorm"
    *layer_norm("encoder.layers.{n}.layer_norm1", "transformer.{n}.norm1"),
    *linear("encoder.layers.{n}.self_attn.q_proj", "transformer.{n}.attn.q"),
    *linear("encoder.layers.{n}.self_attn.k_proj", "transformer.{n}.attn.k"),
    *linear("encoder.layers.{n}.self_attn.v_proj", "transformer.{n}.attn.v"),
    *linear("encoder.layers.{n}.self_attn.out_proj", "transformer.{n}.attn.proj"),
    *layer_norm("encoder.layers.{n}.layer_norm2", "transformer.{n}.norm2"),
    *linear("encoder.layers.{n}.mlp.fc1", "transformer.{n}.mlp.0"),
    *linear("encoder.layers.{n}.mlp.fc2", "transformer.{n}.mlp.2"),
)

VIT_H_HEAD_DIM = 80  # 1280 / 16; the original .pth does not store the head count
# Per layout: (a block's name prefix, names Wan never runs besides the last block, size probes).
LAYOUTS = {
    "original": ("transformer.{n}.", re.compile(r"^(post_norm\.|head$)"),
                 {"dim": ("cls_embedding", -1), "mlp_dim": ("transformer.0.mlp.0.weight", 0),
                  "patch_size": ("patch_embedding.weight", 2), "num_tokens": ("pos_embedding", -2)}),
    "transformers": ("encoder.layers.{n}.", re.compile(r"^(post_layernorm\.|position_ids$)"),
                     {"dim": ("embeddings.class_embedding", -1), "mlp_dim": ("encoder.layers.0.mlp.fc1.weight", 0),
                      "patch_size": ("embeddings.patch_embedding.weight", 2),
                      "num_tokens": ("embeddings.position_embedding.weight", -2)}),
}  # fmt: skip


def config_from_transformers(config_json: dict) -> dict:
    """Returns the CLIPVisionConfig fields a transformers CLIPVisionConfig json states."""
    c = config_json.get("vision_config", config_json)
    if c.get("hidden_act", "gelu") != "gelu":
        raise CheckpointError(f"image encoder hidden_act={c['hidden_act']!r}: only exact GELU (Wan's ViT-H/14) is ported")
    renames = {"image_size": "image_size", "num_attention_heads": "num_heads", "layer_norm_eps": "eps"}
    return {ours: c[theirs] for theirs, ours in renames.items() if theirs in c}


def find_clip(src: Path) -> tuple[list[Path], Path | None] | None:
    """Returns (checkpoint files, config.json or None) of the image encoder in `src`, or None.

    src: a .pth or .safetensors file, an image_encoder/ folder or a pipeline folder holding one,
    or an original Wan2.1 I2V folder (models_clip_...pth).
    """
    return find_checkpoint(src, subfolder=SUBFOLDER, original_file=ORIGINAL_FILE, what="CLIP vision",
                           is_config=lambda c: c.get("model_type") in ("clip_vision_model", "clip"),
                           weights_glob="*.safetensors")


def plan_clip(files: Sequence[Path], config_path: Path | None, dtype: str) -> ComponentPlan:
    """Returns the conversion plan of a CLIP image encoder, or raises listing every problem.

    The config comes from the tensor shapes (sizes, blocks) and config.json where there is one
    (heads, eps); the original layout gets ViT-H/14's 16 heads.
    """
    shards = open_shards(files)
    shapes = {name: info.shape for name, info, _ in iter_tensor_infos(shards)}
    marker = next((n for n in shapes if n == ORIGINAL_MARKER or n.endswith(TRANSFORMERS_MARKER)), None)
    if marker is None:
        raise CheckpointError(f"{files[0]}: not a CLIP image encoder: neither {ORIGINAL_MARKER} (Wan2.1 original) "
                              f"nor {TRANSFORMERS_MARKER} (transformers) among {sorted(shapes)[:8]}...")  # fmt: skip
    layout = "original" if marker == ORIGINAL_MARKER else "transformers"
    prefix = "visual." if layout == "original" else marker[: -len(TRANSFORMERS_MARKER)]
    block, unused, probes = LAYOUTS[layout]
    pattern = re.escape(block).replace(re.escape("{n}"), r"(\d+)")
    ours = {n[len(prefix):]: n for n in shapes if n.startswith(prefix)}
    fields = {field: shapes[prefix + name][axis] for field, (name, axis) in probes.items() if name in ours}
    blocks = {int(m[1]) for n in ours if (m := re.match(pattern, n))}
    if len(fields) < len(probes) or not blocks:
        raise CheckpointError(f"{files[0]}: a {layout} CLIP checkpoint without "
                              f"{[name for name, _ in probes.values() if name not in ours] or 'blocks'}")
    num_tokens = fields.pop("num_tokens")
    fields["image_size"] = round((num_tokens - 1) ** 0.5) * fields["patch_size"]
    fields["num_layers"] = max(blocks) + 1
    fields["num_heads"] = max(1, fields["dim"] // VIT_H_HEAD_DIM)
    if config_path is not None:
        fields.update(config_from_transformers(json.loads(Path(config_path).read_text())))
    try:
        config = dataclasses.replace(CLIP_VIT_H_14, **fields, dtype=canonical_dtype(dtype))
    except ValueError as e:
        raise CheckpointError(f"{files[0]}: cannot build the CLIP config: {e}") from None
    last = block.format(n=config.num_layers - 1)
    ignored = [full for n, full in ours.items() if n.startswith(last) or unused.match(n)]
    ignored += [n for n in shapes if not n.startswith(prefix)]  # the text tower, log_scale, visual_projection
    table = ORIGINAL_TABLE if layout == "original" else TRANSFORMERS_TABLE
    abstract = nnx.eval_shape(lambda: CLIPVisionEncoder(config, rngs=nnx.Rngs(0)))
    return plan_component(MODEL, config, abstract, expand_rows(table, config.num_layers - 1, prefix=prefix), shards,
                          layout=layout, ignored=ignored)  # fmt: skip


def convert_clip(src, dst, dtype: str = "bfloat16", *, progress: bool = False) -> Path:
    """Converts the CLIP image encoder at `src` (see find_clip) into the new folder `dst`; returns dst."""
    return convert_component(src, dst, find=find_clip, plan=plan_clip, dtype=dtype, progress=progress,
                             what="CLIP image encoder",
                             looked_for=f"{ORIGINAL_FILE}, an {SUBFOLDER}/ folder, a CLIP vision config.json")


def load_clip(path, *, dtype: str | None = None) -> CLIPVisionEncoder:
    """Returns the CLIPVisionEncoder converted into `path` (the component folder or a root with image_encoder/).

    dtype: param and compute dtype; default as converted.
    """
    return load_model(path, CLIPVisionEncoder, CLIPVisionConfig, model=MODEL, subfolder=SUBFOLDER, dtype=dtype)