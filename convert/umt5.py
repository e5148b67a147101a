"""umT5 encoder checkpoints -> our UMT5Encoder tree (models/t5.py), its tokenizer files, and loading.

Two source layouts, one name table each, read top to bottom ("{n}": the layer):
- original: Wan2.1's `models_t5_umt5-xxl-enc-bf16.pth` (wan/modules/t5.py, T5Encoder); our
  names are its names with Flax leaves.
- diffusers: the `text_encoder/` folder of a Wan *-Diffusers repo (transformers
  UMT5EncoderModel, safetensors). `encoder.embed_tokens.weight` is tied to `shared.weight`:
  whichever is present is read, the other skipped.
Transforms: Linear (out, in) -> kernel (in, out); embeddings and norm weights as they are.
"""

import dataclasses
import json
import re
import shutil
from collections.abc import Sequence
from pathlib import Path

from flax import nnx

from convert.checkpoint import canonical_dtype, load_model, staged_directory
from convert.component import ComponentPlan, find_checkpoint, plan_component, write_component
from convert.io import CheckpointError, iter_tensor_infos, open_shards
from convert.transforms import Row, expand_rows, identity, transpose_linear
from models.t5 import UMT5_XXL, UMT5Config, UMT5Encoder

MODEL = "umt5-encoder"
SUBFOLDER = "text_encoder"  # in a converted checkpoint, and in a diffusers pipeline folder
TOKENIZER_SUBFOLDER = "tokenizer"
ORIGINAL_FILE = "models_t5_umt5-xxl-enc-bf16.pth"
TOKENIZER_FILES = ("tokenizer.json", "spiece.model", "tokenizer_config.json", "special_tokens_map.json")

ORIGINAL_TABLE = (
    Row("token_embedding.weight", "token_embedding.embedding", identity),
    Row("blocks.{n}.norm1.weight", "blocks.{n}.norm1.scale", identity),
    Row("blocks.{n}.attn.q.weight", "blocks.{n}.attn.q.kernel", transpose_linear),
    Row("blocks.{n}.attn.k.weight", "blocks.{n}.attn.k.kernel", transpose_linear),
    Row("blocks.{n}.attn.v.weight", "blocks.{n}.attn.v.kernel", transpose_linear),
    Row("blocks.{n}.attn.o.weight", "blocks.{n}.attn.o.kernel", transpose_linear),
    Row("blocks.{n}.norm2.weight", "blocks.{n}.norm2.scale", identity),
    Row("blocks.{n}.ffn.gate.0.weight", "blocks.{n}.ffn.gate.kernel", transpose_linear),
    Row("blocks.{n}.ffn.fc1.weight", "blocks.{n}.ffn.fc1.kernel", transpose_linear),
    Row("blocks.{n}.ffn.fc2.weight", "blocks.{n}.ffn.fc2.kernel", transpose_linear),
    Row("blocks.{n}.pos_embedding.embedding.weight", "blocks.{n}.pos_embedding.embedding", identity),
    Row("norm.weight", "norm.scale", identity),
)

DIFFUSERS_TABLE = (
    Row("shared.weight", "token_embedding.embedding", identity),
    Row("encoder.block.{n}.layer.0.layer_norm.weight", "blocks.{n}.norm1.scale", identity),
    Row("encoder.block.{n}.layer.0.SelfAttention.q.weight", "blocks.{n}.attn.q.kernel", transpose_linear),
    Row("encoder.block.{n}.layer.0.SelfAttention.k.weight", "blocks.{n}.attn.k.kernel", transpose_linear),
    Row("encoder.block.{n}.layer.0.SelfAttention.v.weight", "blocks.{n}.attn.v.kernel", transpose_linear),
    Row("encoder.block.{n}.layer.0.SelfAttention.o.weight", "blocks.{n}.attn.o.kernel", transpose_linear),
    Row("encoder.block.{n}.layer.0.SelfAttention.relative_attention_bias.weight",
        "blocks.{n}.pos_embedding.embedding", identity),  # fmt: skip
    Row("encoder.block.{n}.layer.1.layer_norm.weight", "blocks.{n}.norm2.scale", identity),
    Row("encoder.block.{n}.layer.1.DenseReluDense.wi_0.weight", "blocks.{n}.ffn.gate.kernel", transpose_linear),
    Row("encoder.block.{n}.layer.1.DenseReluDense.wi_1.weight", "blocks.{n}.ffn.fc1.kernel", transpose_linear),
    Row("encoder.block.{n}.layer.1.DenseReluDense.wo.weight", "blocks.{n}.ffn.fc2.kernel", transpose_linear),
    Row("encoder.final_layer_norm.weight", "norm.scale", identity),
)
DIFFUSERS_TIED = "encoder.embed_tokens.weight"  # the same tensor as shared.weight

# Where each layout keeps the tensors that fix the model size: (name, axis).
PROBES = {
    "original": {"vocab_size": ("token_embedding.weight", 0), "dim": ("token_embedding.weight", 1),
                 "dim_attn": ("blocks.0.attn.q.weight", 0), "dim_ffn": ("blocks.0.ffn.fc1.weight", 0),
                 "num_buckets": ("blocks.0.pos_embedding.embedding.weight", 0),
                 "num_heads": ("blocks.0.pos_embedding.embedding.weight", 1)},
    "diffusers": {"vocab_size": ("shared.weight", 0), "dim": ("shared.weight", 1),
                  "dim_attn": ("encoder.block.0.layer.0.SelfAttention.q.weight", 0),
                  "dim_ffn": ("encoder.block.0.layer.1.DenseReluDense.wi_1.weight", 0),
                  "num_buckets": ("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", 0),
                  "num_heads": ("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", 1)},
}  # fmt: skip
LAYER_PATTERN = {"original": r"blocks\.(\d+)\.", "diffusers": r"encoder\.block\.(\d+)\."}


def config_fields_from_json(config_json: dict) -> dict:
    """Returns the UMT5Config fields a transformers UMT5 config.json states (umT5 gated-GELU only)."""
    c = config_json
    if c.get("model_type", "umt5") != "umt5":
        raise CheckpointError(f"text encoder model_type={c['model_type']!r}: only umT5 (a position bias per layer) "
                              "is ported")  # fmt: skip
    if c.get("feed_forward_proj", "gated-gelu") != "gated-gelu" or c.get("dense_act_fn", "gelu_new") != "gelu_new":
        raise CheckpointError(f"feed_forward_proj={c.get('feed_forward_proj')!r}, "
                              f"dense_act_fn={c.get('dense_act_fn')!r}: only gated-gelu with gelu_new (umT5) is ported")
    renames = {"relative_attention_max_distance": "max_distance", "layer_norm_epsilon": "eps"}
    return {ours: c[theirs] for theirs, ours in renames.items() if theirs in c}


def find_umt5(src: Path) -> tuple[list[Path], Path | None] | None:
    """Returns (checkpoint files, config.json or None) of the umT5 encoder in `src`, or None.

    src: a .pth or .safetensors file, a diffusers text_encoder/ folder or pipeline folder, or an
    original Wan2.1 folder (models_t5_umt5-xxl-enc-bf16.pth).
    """
    return find_checkpoint(src, subfolder=SUBFOLDER, original_file=ORIGINAL_FILE, what="T5",
                           is_config=lambda c: c.get("model_type") in ("umt5", "t5"), weights_glob="*.safetensors")


def plan_umt5(files: Sequence[Path], config_path: Path | None, dtype: str) -> ComponentPlan:
    """Returns the conversion plan of a umT5 encoder checkpoint, or raises listing every problem.

    The config comes from the tensor shapes (sizes, layers) and config.json where there is one
    (max_distance, eps); both layouts are read without it.
    """
    shards = open_shards(files)
    shapes = {name: info.shape for name, info, _ in iter_tensor_infos(shards)}
    layout = "original" if "token_embedding.weight" in shapes else "diffusers"
    table, ignored = (ORIGINAL_TABLE, ()) if layout == "original" else (DIFFUSERS_TABLE, (DIFFUSERS_TIED,))
    if layout == "diffusers" and "shared.weight" not in shapes and DIFFUSERS_TIED in shapes:
        table = (Row(DIFFUSERS_TIED, "token_embedding.embedding", identity), *DIFFUSERS_TABLE[1:])
        shapes["shared.weight"] = shapes[DIFFUSERS_TIED]  # for the size probes
    missing = [name for name, _ in PROBES[layout].values() if name not in shapes]
    if missing:
        raise CheckpointError(f"{files[0]}: not a umT5 encoder in the {layout} layout: no {missing} "
                              f"among {sorted(shapes)[:8]}...")  # fmt: skip
    fields = {field: shapes[name][axis] for field, (name, axis) in PROBES[layout].items()}
    fields["num_layers"] = 1 + max(int(m[1]) for name in shapes if (m := re.match(LAYER_PATTERN[layout], name)))
    if config_path is not None:
        fields.update(config_fields_from_json(json.loads(Path(config_path).read_text())))
    config = dataclasses.replace(UMT5_XXL, **fields, dtype=canonical_dtype(dtype))
    abstract = nnx.eval_shape(lambda: UMT5Encoder(config, rngs=nnx.Rngs(0)))
    return plan_component(MODEL, config, abstract, expand_rows(table, config.num_layers), shards, layout=layout,
                          ignored=ignored)  # fmt: skip


def find_tokenizer(src: Path) -> tuple[Path] | None:
    """Returns (the folder holding the umT5 tokenizer files,) of a checkpoint, or None.

    Wan2.1 keeps them in google/umt5-xxl/, diffusers in tokenizer/.
    """
    src = Path(src)
    for folder in (src / "google" / "umt5-xxl", src / TOKENIZER_SUBFOLDER, src, src.parent / TOKENIZER_SUBFOLDER):
        if src.is_dir() and any((folder / name).is_file() for name in ("tokenizer.json", "spiece.model")):
            return (folder,)
    return None


def plan_tokenizer(folder: Path, dtype: str | None = None) -> list[Path]:
    """Returns the tokenizer files to copy from `folder` (dtype: unused, for the COMPONENTS shape)."""
    return [folder / name for name in TOKENIZER_FILES if (folder / name).is_file()]


def write_tokenizer(files: list[Path], folder: Path, *, progress: bool = True) -> None:
    """Copies the tokenizer files into folder (models.t5.Tokenizer.from_dir reads it)."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    for file in files:
        shutil.copyfile(file, Path(folder) / file.name)


def convert_umt5(src, dst, dtype: str = "bfloat16", *, progress: bool = False) -> Path:
    """Converts the umT5 encoder at `src` into the new folder `dst`; returns dst.

    src: see find_umt5. dtype: of the stored parameters and of compute after load_umt5 ("bf16",
    as Wan runs it, or "f32"). Tokenizer files found beside the checkpoint (see find_tokenizer)
    are copied into dst/tokenizer/. All names and shapes are checked before writing; dst
    appears only when complete.
    """
    found = find_umt5(Path(src))
    if found is None:
        raise CheckpointError(f"{src}: no umT5 encoder found (looked for {ORIGINAL_FILE}, a text_encoder/ "
                              "folder, a T5 config.json)")  # fmt: skip
    plan = plan_umt5(*found, dtype)
    tokenizer = find_tokenizer(Path(src)) if Path(src).is_dir() else None
    with staged_directory(Path(dst)) as staging:
        write_component(plan, staging, progress=progress)
        if tokenizer is not None:
            write_tokenizer(plan_tokenizer(*tokenizer), staging / TOKENIZER_SUBFOLDER)
    return Path(dst)


def load_umt5(path, *, dtype: str | None = None) -> UMT5Encoder:
    """Returns the UMT5Encoder converted into `path` (the component folder or a root with text_encoder/).

    dtype: param and compute dtype; default as converted.
    """
    return load_model(path, UMT5Encoder, UMT5Config, model=MODEL, subfolder=SUBFOLDER, dtype=dtype)