"""LoRA weights for the Wan2.1 DiT, merged into our parameters when a model is loaded.

A LoRA adds a low-rank update to a Linear weight: W' = W + strength * scale * B @ A, with A
[rank, in] ("lora_A" / "lora_down") and B [out, rank] ("lora_B" / "lora_up"); scale = alpha /
rank where the file gives an alpha (per module, or PEFT's `lora_alpha` and `r` in the
safetensors metadata), else 1. Merging once at load costs nothing per step, which is how the
length-extension LoRAs are meant to run.

Read from safetensors, in the spellings Wan LoRAs ship in:
- module names in the original Wan2.1 layout (`blocks.0.self_attn.q`) or the diffusers layout
  (`blocks.0.attn1.to_q`), under any prefix (`diffusion_model.`, `transformer.`,
  `base_model.model.`, ...), with dots or underscores (kohya: `lora_unet_blocks_0_self_attn_q`);
- `.lora_A[.adapter].weight` / `.lora_B[...]` (PEFT), `.lora_down.weight` / `.lora_up.weight`
  with `.alpha` (kohya and the original trainers);
- `.diff` and `.diff_b`: full deltas of a weight and a bias, as some trainers add for norms.
Modules map through the DiT converter's tables (convert/wan_original.py, wan_diffusers.py), so
a LoRA lands exactly where its base weight does.
"""

import dataclasses
import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from convert import wan_diffusers, wan_original
from convert.io import CheckpointError, read_safetensors
from convert.transforms import Row, transpose_linear
from models.wan import WanConfig, WanModel

LORA_KEY = re.compile(r"^(?P<module>.+?)\.(?P<kind>lora_A|lora_B|lora_down|lora_up)(?:\.[\w-]+)?\.weight$")
OTHER_KEY = re.compile(r"^(?P<module>.+)\.(?P<kind>alpha|diff|diff_b)$")
UP = {"lora_B", "lora_up"}


@dataclasses.dataclass(frozen=True)
class Update:
    """One parameter's change: our path ("blocks.0.self_attn.q.kernel") and the float32 delta
    in our layout, strength and scale applied."""

    target: str
    delta: np.ndarray


def parse_lora_arg(arg: str) -> tuple[Path, float]:
    """Returns (file, strength) from the CLI's "FILE" or "FILE:STRENGTH"."""
    path, _, tail = arg.rpartition(":")
    if path and re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?", tail):
        return Path(path), float(tail)
    return Path(arg), 1.0


def lora_updates(path: str | Path, config: WanConfig, *, strength: float = 1.0) -> list[Update]:
    """Returns the updates a LoRA file makes to a DiT of `config`, or raises CheckpointError
    listing every key it cannot place (unknown module, A without B, wrong shape)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"LoRA file {path} does not exist")
    if path.suffix != ".safetensors":
        raise CheckpointError(f"LoRA file {path}: only .safetensors LoRAs are read")
    shard = read_safetensors(path)
    modules, shapes = _module_index(config)
    parts: dict[str, dict[str, np.ndarray]] = {}  # per module: up, down, alpha, diff, diff_b
    names: dict[str, str] = {}  # module as the file spells it, for messages
    problems = []
    for name in shard.tensors:
        match = LORA_KEY.match(name) or OTHER_KEY.match(name)
        found = match and _find_module(match["module"], modules)
        if not found:
            problems.append(f"{name}: not a LoRA key of a Wan2.1 DiT module")
            continue
        kind = "up" if match["kind"] in UP else "down" if match["kind"].startswith("lora_") else match["kind"]
        parts.setdefault(found, {})[kind] = shard.read(name)
        names.setdefault(found, match["module"])
    scale = _metadata_scale(path)
    updates = []
    for key, got in parts.items():
        weight, bias = modules[key]
        module = names[key]
        if "diff_b" in got:
            updates += _checked(module + ".diff_b", bias, got["diff_b"] * strength, shapes, problems)
        if "diff" in got:
            updates += _checked(module + ".diff", weight, got["diff"] * strength, shapes, problems)
        if ("up" in got) != ("down" in got):
            problems.append(f"{module}: a LoRA {'up (B)' if 'up' in got else 'down (A)'} matrix without its partner")
            continue
        if "up" not in got:
            continue
        down, up = got["down"].astype(np.float32), got["up"].astype(np.float32)
        if weight.transform is not transpose_linear or down.ndim != 2 or up.ndim != 2 or up.shape[1] != down.shape[0]:
            problems.append(f"{module}: LoRA of shapes A {down.shape}, B {up.shape}; only Linear layers "
                            f"(A [rank, in], B [out, rank]) are supported")  # fmt: skip
            continue
        rank = down.shape[0]
        if "alpha" in got:
            factor = float(np.asarray(got["alpha"], np.float32).reshape(-1)[0]) / rank
        else:
            factor = scale.get("alpha", rank) / scale.get("rank", rank)
        updates += _checked(module, weight, (up @ down) * (factor * strength), shapes, problems)
    if problems:
        raise CheckpointError(f"LoRA file {path} does not fit this model ({len(problems)} problems):\n  "
                              + "\n  ".join(problems[:40]) + ("\n  ..." if len(problems) > 40 else ""))
    return updates


def merge_loras(dit: WanModel, loras: Sequence[tuple[str | Path, float]]) -> WanModel:
    """Adds each (file, strength) LoRA into `dit`'s parameters in place (in float32, cast back to
    each parameter's dtype); returns dit. Every file is checked before any parameter changes."""
    updates = [u for path, strength in loras for u in lora_updates(path, dit.config, strength=strength)]
    if not updates:
        return dit
    state = nnx.state(dit, nnx.Param)
    flat = {".".join(map(str, p)): (p, v) for p, v in nnx.to_flat_state(state)}
    changed = {}
    for update in updates:
        path, var = changed.get(update.target) or flat[update.target]
        value = var.get_value()
        new = (value.astype(jnp.float32) + jnp.asarray(update.delta)).astype(value.dtype)
        changed[update.target] = (path, var.replace(new))
    nnx.update(dit, nnx.from_flat_state(list(changed.values())))
    return dit


def _module_index(config: WanConfig) -> tuple[dict[str, tuple[Row, Row | None]], dict[str, tuple[int, ...]]]:
    """Returns ({normalised source module name: (weight row, bias row or None)} of both layouts,
    {our parameter path: shape}) for a DiT of `config`; names normalised with "_" for "."."""
    from convert.checkpoint import abstract_wan
    from convert.wan import expand_rows

    _, flat = abstract_wan(config)
    shapes = {target: tuple(var.get_value().shape) for target, (_, var) in flat.items()}
    index = {}
    for layout in (wan_original, wan_diffusers):
        rows = expand_rows(layout.TABLE, config.num_layers, flat)
        for source, row in rows.items():
            if source.endswith(".weight"):
                module = source[: -len(".weight")]
                index[module.replace(".", "_")] = (row, rows.get(module + ".bias"))
    return index, shapes


def _find_module(name: str, index: Mapping[str, tuple]) -> str | None:
    """Returns the index key that `name` ends with at a name boundary (the longest), or None."""
    words = name.replace(".", "_").split("_")
    for start in range(len(words)):
        candidate = "_".join(words[start:])
        if candidate in index:
            return candidate
    return None


def _metadata_scale(path: Path) -> dict[str, float]:
    """PEFT's lora_alpha and r from the safetensors metadata diffusers writes, if any."""
    from safetensors import safe_open

    with safe_open(path, "numpy") as f:
        raw = (f.metadata() or {}).get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        meta = json.loads(raw)
        return {"alpha": float(meta["lora_alpha"]), "rank": float(meta["r"])}
    except (ValueError, KeyError, TypeError):
        return {}


def _checked(what: str, row: Row | None, delta_torch: np.ndarray, shapes: Mapping[str, tuple[int, ...]],
             problems: list[str]) -> list[Update]:
    """Returns [Update] of a delta in PyTorch layout for `row`'s parameter, or notes a problem."""
    if row is None:
        problems.append(f"{what}: the model has no bias there")
        return []
    try:
        delta = row.transform(np.asarray(delta_torch, np.float32))
    except ValueError as e:
        problems.append(f"{what}: {e}")
        return []
    if delta.shape != shapes[row.target]:
        problems.append(f"{what}: a delta of shape {delta.shape} (our layout) for {row.target} of shape "
                        f"{shapes[row.target]}")
        return []
    return [Update(row.target, delta)]
