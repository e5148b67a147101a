"""Wan2.1 DiT conversion (also each expert of a Wan2.2 A14B, convert/wan22.py): find the checkpoint files, detect the layout, check every name and
shape against the abstract model, then stream shard by shard into our format.

Everything is checked before anything is written; tensors are then read one at a time from
the memory-mapped source, transformed, cast and streamed to an output file per source shard.
"""

import dataclasses
import json
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from convert import wan_diffusers, wan_original
from convert.checkpoint import abstract_wan, mismatch_report, target_info, write_component_metadata
from convert.io import CheckpointError, Shard, TensorInfo, SafetensorsWriter, iter_tensor_infos, open_shards
from convert.transforms import Row, source_shape, transformed_shape
from models.wan import WAN_T2V_1_3B, WAN_T2V_14B, WanConfig

LAYOUTS = (wan_original, wan_diffusers)
# Tensor shapes give the width but not how it splits into heads: the Wan2.1 sizes' head counts
# (1.3B: 1536 = 12 x 128, 14B: 5120 = 40 x 128) fill in when no config.json says it.
HEADS_BY_DIM = {WAN_T2V_1_3B.dim: WAN_T2V_1_3B.num_heads, WAN_T2V_14B.dim: WAN_T2V_14B.num_heads}
NOT_DIT_PTH = re.compile(r"(^models_t5|^models_clip|vae)", re.IGNORECASE)  # other files of a Wan2.1 folder


@dataclasses.dataclass(frozen=True)
class Entry:
    """One tensor to convert: where it is, where it goes, how."""

    shard: Shard
    source: str  # name in the file
    target: str
    transform: Any
    info: TensorInfo  # the target's shape and dtype


@dataclasses.dataclass(frozen=True)
class Plan:
    layout: str
    config: WanConfig
    entries: tuple[Entry, ...]
    source: str


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
    if (src / "transformer").is_dir():
        return find_transformer(src / "transformer")
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


def expand_rows(table: Sequence[Row], num_layers: int, targets: Mapping[str, Any]) -> dict[str, Row]:
    """Returns {source name: row} with "{n}" expanded per block, for rows whose target exists."""
    rows = {}
    for row in table:
        for n in range(num_layers) if "{n}" in row.source else (None,):
            concrete = Row(row.source.format(n=n), row.target.format(n=n), row.transform)
            if concrete.target in targets:
                rows[concrete.source] = concrete
    return rows


def plan_transformer(files: Sequence[Path], config_path: Path | None, dtype: str) -> Plan:
    """Returns the conversion plan, or raises CheckpointError listing every problem at once."""
    shards = open_shards(files)
    found = {name: (info, shard) for name, info, shard in iter_tensor_infos(shards)}
    layout, prefix = detect_layout(list(found))
    by_name = {raw[len(prefix):]: raw for raw in found if raw.startswith(prefix)}
    config_json = json.loads(config_path.read_text()) if config_path else None
    config = infer_config(layout, {name: found[raw][0].shape for name, raw in by_name.items()}, config_json, dtype)
    _, flat = abstract_wan(config)
    rows = expand_rows(layout.TABLE, config.num_layers, flat)
    ignored = set(expand_rows([Row(n, n) for n in layout.IGNORED], config.num_layers, by_name))
    unexpected = [raw for raw in found if not raw.startswith(prefix)]
    unexpected += [name for name in by_name if name not in rows and name not in ignored]
    missing = [target for target in flat if target not in {r.target for r in rows.values()}]
    missing += [row.source for row in rows.values() if row.source not in by_name]
    entries, mismatched = [], []
    for name, row in rows.items():
        if name not in by_name:
            continue
        info, shard = found[by_name[name]]
        want = target_info(flat[row.target][1])
        got = transformed_shape(row.transform, info.shape)
        if got != want.shape or not np.issubdtype(info.dtype, np.floating):
            expected = source_shape(row.transform, want.shape) or f"{want.shape} after {row.transform.__name__}"
            mismatched.append((name, f"{expected} float (for our {row.target} {want.shape})", f"{info.shape} {info.dtype}"))
            continue
        entries.append(Entry(shard, by_name[name], row.target, row.transform, want))
    if missing or unexpected or mismatched:
        raise CheckpointError(mismatch_report(missing, unexpected, mismatched,
                                              what=f"{layout.NAME} checkpoint {', '.join(map(str, files))}"))
    return Plan(layout.NAME, config, tuple(entries), str(files[0]))


def write_transformer(plan: Plan, folder: Path, *, progress: bool = True) -> None:
    """Streams the planned tensors into `folder`: one safetensors file per source shard."""
    folder.mkdir(parents=True)
    per_shard: dict[Path, list[Entry]] = {}
    for entry in plan.entries:
        per_shard.setdefault(entry.shard.path, []).append(entry)
    weight_map = {}
    with tqdm(total=len(plan.entries), unit="tensor", disable=not progress, desc=folder.name) as bar:
        for i, entries in enumerate(per_shard.values(), start=1):
            file_name = f"model-{i:05d}-of-{len(per_shard):05d}.safetensors"
            bar.set_postfix_str(f"{entries[0].shard.path.name} -> {file_name}")
            writer = SafetensorsWriter(folder / file_name, {e.target: e.info for e in entries},
                                       metadata={"format": "radial-jax"})
            for e in entries:
                converted = np.ascontiguousarray(e.transform(e.shard.read(e.source)), dtype=e.info.dtype)
                writer.write(e.target, converted)
                weight_map[e.target] = file_name
                bar.update(1)
            writer.close()
    write_component_metadata(folder, plan.config, weight_map, {"layout": plan.layout, "path": plan.source})
