"""The Wan2.1 DiT (also each expert of a Wan2.2 A14B, convert/wan22.py) as one component of the
checkpoint pipeline (convert/component.py): find its files, detect the layout (wan_original.py /
wan_diffusers.py tables), infer the config, plan against the abstract model; write and load as
every component does.

Everything is checked before anything is written; tensors are then read one at a time from
the memory-mapped source, transformed, cast and streamed to an output file per source shard.
"""

import json
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

from flax import nnx

from convert import wan_diffusers, wan_original
from convert.checkpoint import load_model, read_component_config
from convert.component import ComponentPlan, abstract_params, plan_component
from convert.io import CheckpointError, iter_tensor_infos, open_shards
from convert.transforms import Row, expand_rows
from models.wan import WAN_T2V_1_3B, WAN_T2V_14B, WanConfig, WanModel

MODEL = "wan-transformer"
SUBFOLDER = "transformer"  # in a converted checkpoint, and in a diffusers pipeline folder

LAYOUTS = (wan_original, wan_diffusers)
# Tensor shapes give the width but not how it splits into heads: the Wan2.1 sizes' head counts
# (1.3B: 1536 = 12 x 128, 14B: 5120 = 40 x 128) fill in when no config.json says it.
HEADS_BY_DIM = {WAN_T2V_1_3B.dim: WAN_T2V_1_3B.num_heads, WAN_T2V_14B.dim: WAN_T2V_14B.num_heads}
NOT_DIT_PTH = re.compile(r"(^models_t5|^models_clip|vae)", re.IGNORECASE)  # other files of a Wan2.1 folder


def find_transformer(src: Path) -> tuple[list[Path], Path | None] | None:
    """Returns (checkpoint files, config.json or None) of the DiT in `src`, or None if none is there.

    src: a file (.safetensors, .index.json, .pth), a transformer folder, a diffusers pipeline
    folder (uses transformer/), or an original Wan2.1 folder (diffusion_pytorch_model*).
    """
    src = Path(src)
    if src.is_file():
        config = src.parent / "config.json"
        return [src], config if config.is_file() else None
    if not src.is_dir():
        raise CheckpointError(f"--src {src} does not exist")
    if (src / SUBFOLDER).is_dir():
        return find_transformer(src / SUBFOLDER)
    config = src / "config.json" if (src / "config.json").is_file() else None
    indexes = sorted(src.glob("*.safetensors.index.json"))
    if len(indexes) > 1:
        raise CheckpointError(f"{src}: several safetensors indexes {[i.name for i in indexes]}; pass one as --src")
    if indexes:
        return indexes, config
    tensors = sorted(src.glob("diffusion_pytorch_model*.safetensors")) or sorted(src.glob("*.safetensors"))
    if tensors:
        return tensors, config
    pths = [p for p in sorted(src.glob("*.pth")) if not NOT_DIT_PTH.search(p.name)]
    if len(pths) == 1:
        return pths, config
    if len(pths) > 1:
        raise CheckpointError(f"{src}: several .pth files {[p.name for p in pths]}; pass the DiT one as --src")
    return None


def detect_layout(names: Sequence[str]) -> tuple[ModuleType, str]:
    """Returns (layout module, key prefix) from the tensor names (a prefix such as
    "model.diffusion_model." is allowed, as in single-file exports)."""
    for layout in LAYOUTS:
        for name in names:
            if name.endswith(layout.MARKER):
                return layout, name[: -len(layout.MARKER)]
    sample = ", ".join(sorted(names)[:8])
    raise CheckpointError(f"unknown checkpoint layout: no {wan_original.MARKER} (Wan2.1 original) or "
                          f"{wan_diffusers.MARKER} (diffusers) among {len(names)} tensors: {sample}, ...")


def infer_config(layout: ModuleType, shapes: Mapping[str, tuple], config_json: Mapping | None, dtype: str) -> WanConfig:
    """Returns the WanConfig of a checkpoint: config.json where it says, tensor shapes elsewhere."""
    if layout.PATCH_WEIGHT not in shapes:
        raise CheckpointError(f"missing {layout.PATCH_WEIGHT}: cannot tell the model size")
    fields: dict[str, Any] = {"patch_size": tuple(shapes[layout.PATCH_WEIGHT][2:])}
    for field, (name, axis) in layout.PROBES.items():
        if name in shapes:
            fields[field] = shapes[name][axis]
    head_out = fields.pop("head_out", None)
    if head_out is not None:
        fields["out_dim"] = head_out // math.prod(fields["patch_size"])
    fields["model_type"] = "i2v" if layout.I2V_KEY in shapes else "t2v"
    blocks = {int(m.group(1)) for name in shapes if (m := re.match(r"blocks\.(\d+)\.", name))}
    if not blocks:
        raise CheckpointError("no blocks.N.* tensors: cannot tell the number of transformer blocks")
    fields["num_layers"] = max(blocks) + 1
    try:
        fields.update(layout.config_fields(config_json or {}))
        if layout.I2V_KEY not in shapes and fields.get("in_dim", 0) > fields.get("out_dim", 0):
            # Wan2.2 I2V-A14B: the image enters through y alone; its DiT has no CLIP projection.
            fields.update(model_type="i2v", img_dim=None)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"cannot build the model config from this checkpoint: {e}") from None
    if "num_heads" not in fields:
        fields["num_heads"] = _heads_from_width(fields["dim"], config_json is not None)
    try:
        fields["patch_size"] = tuple(fields["patch_size"])
        return WanConfig(**fields, param_dtype=dtype, dtype=dtype)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"cannot build the model config from this checkpoint: {e}") from None


def _heads_from_width(dim: int, has_config: bool) -> int:
    if dim in HEADS_BY_DIM:
        return HEADS_BY_DIM[dim]
    where = "its config.json does not say num_heads" if has_config else "there is no config.json beside the weights"
    raise CheckpointError(f"the number of attention heads cannot be read from tensor shapes and {where}; dim={dim} "
                          f"is no Wan2.1 size ({', '.join(f'{d}: {h} heads' for d, h in HEADS_BY_DIM.items())}): add "
                          "a config.json with num_attention_heads (diffusers layout) or num_heads (original layout)")


def abstract_wan(config: WanConfig) -> tuple[nnx.GraphDef, dict[str, tuple[tuple, nnx.Variable]]]:
    """Returns (graphdef, {"blocks.0.self_attn.q.kernel": (path, abstract variable)}) with no
    parameter memory allocated (nnx.eval_shape)."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: WanModel(config, rngs=nnx.Rngs(0))))
    return graphdef, {".".join(map(str, path)): (path, var) for path, var in nnx.to_flat_state(state)}


def plan_transformer(files: Sequence[Path], config_path: Path | None, dtype: str) -> ComponentPlan:
    """Returns the conversion plan, or raises CheckpointError listing every problem at once."""
    shards = open_shards(files)
    found = {name: info for name, info, _ in iter_tensor_infos(shards)}
    layout, prefix = detect_layout(list(found))
    shapes = {raw[len(prefix):]: info.shape for raw, info in found.items() if raw.startswith(prefix)}
    config_json = json.loads(config_path.read_text()) if config_path else None
    config = infer_config(layout, shapes, config_json, dtype)
    abstract = nnx.eval_shape(lambda: WanModel(config, rngs=nnx.Rngs(0)))
    # The tables hold both T2V and I2V rows: keep those whose target this model has.
    rows = expand_rows(layout.TABLE, config.num_layers, prefix=prefix, targets=abstract_params(abstract))
    ignored = [row.source for row in expand_rows([Row(n, n) for n in layout.IGNORED], config.num_layers, prefix=prefix)]
    return plan_component(MODEL, config, abstract, rows, shards, layout=layout.NAME, ignored=ignored)


def read_config(path: str | Path) -> tuple[Path, WanConfig]:
    """Returns (transformer folder, WanConfig) of a converted checkpoint (its root or transformer/)."""
    folder, fields = read_component_config(path, MODEL, SUBFOLDER)
    return folder, WanConfig.from_dict(fields)


def load_wan(path: str | Path, *, dtype: str | None = None) -> WanModel:
    """Returns a ready WanModel from a converted checkpoint folder (its root or transformer/).

    dtype: param and compute dtype ("bf16", "f32"; default: as converted). The attention plan
    is not part of the model: pass it at call time (`model(..., plan=plan)`). Tensors stream
    from disk to the device one at a time.
    """
    return load_model(path, WanModel, WanConfig, model=MODEL, subfolder=SUBFOLDER, dtype=dtype,
                      dtype_fields=("param_dtype", "dtype"))  # fmt: skip
