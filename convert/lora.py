"""LoRA weights for the Wan2.1 DiT, merged into our parameters when a model is loaded.

A LoRA adds a low-rank update to a Linear weight: W' = W + strength * scale * B @ A, with A
[rank, in] ("lora_A" / "lora_down") and B [out, rank] ("lora_B" / "lora_up"). scale = alpha /
rank, alpha from the module's `.alpha` tensor, else from the PEFT config diffusers stores in the
safetensors metadata (`lora_alpha`, `alpha_pattern`, `use_rslora`: alpha / sqrt(rank); a
`rank_pattern` or `r` that contradicts the tensors is refused, as PEFT refuses it; of several
pattern entries matching a module the first listed wins, as in PEFT), else alpha = rank (scale 1). Merging once at load costs nothing per step, which is how the
length-extension LoRAs are meant to run.

Read from safetensors, in the spellings Wan LoRAs ship in:
- module names of the original Wan2.1 layout (`blocks.0.self_attn.q`) or the diffusers layout
  (`blocks.0.attn1.to_q`), bare or under one of PREFIXES, with dots or underscores (kohya:
  `lora_unet_blocks_0_self_attn_q`), mapped through the DiT converter's tables
  (convert/wan_original.py, wan_diffusers.py), so a LoRA lands exactly where its base weight does;
- `.lora_A[.adapter].weight` / `.lora_B[...].weight` (PEFT; `.lora_B.bias`: a bias delta),
  `.lora_down.weight` / `.lora_up.weight` with `.alpha` (kohya and the original trainers);
- `.diff` / `.diff_b`: full deltas of a weight and a bias. Applied everywhere they fit, norms
  included, as ComfyUI does (diffusers drops the norm ones); `.diff` also on the bare
  `modulation` tables. `blocks.N.diff_m` / `head.diff_m`: LightX2V's spelling of a delta of that
  module's `modulation` (lightx2v/utils/lora_loader.py; its 4-step distillation LoRAs carry one
  per block; diffusers ignores them).
Anything else (another model's modules, DoRA, LoKr, LoHa) is an error naming every such key.
"""

import dataclasses
import json
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from convert import wan_diffusers, wan_original
from convert.io import CheckpointError, read_safetensors
from convert.transforms import Row, expand_rows, transpose_linear
from convert.wan import abstract_wan
from models.wan import WanConfig, WanModel

# Where trainers and exporters put the DiT's modules; matched exactly after one of these.
PREFIXES = ("", "diffusion_model.", "model.diffusion_model.", "transformer.", "base_model.model.", "lora_unet_",
            "lora_transformer_")  # fmt: skip
KEY = re.compile(r"^(?P<module>.+?)\.(?P<kind>lora_A|lora_B|lora_down|lora_up)(?:\.[\w-]+)?\.(?P<leaf>weight|bias)$"
                 r"|^(?P<module2>.+)\.(?P<kind2>alpha|diff|diff_b|diff_m)$")  # fmt: skip
ROLE = {("lora_A", "weight"): "down", ("lora_down", "weight"): "down", ("lora_B", "weight"): "up",
        ("lora_up", "weight"): "up", ("lora_B", "bias"): "up_bias"}  # fmt: skip
UNSUPPORTED = re.compile(r"dora_scale|lora_magnitude_vector|lokr_|hada_")


@dataclasses.dataclass(frozen=True)
class Update:
    """One parameter's change, kept factored: delta = factor * transform(up @ down), or
    factor * transform(full) for a `.diff`/bias delta (down None). Arrays in PyTorch layout."""

    target: str  # our parameter path, "blocks.0.self_attn.q.kernel"
    transform: object
    factor: float
    up: np.ndarray  # [out, rank], or the full delta
    down: np.ndarray | None  # [rank, in]

    def delta(self) -> jnp.ndarray:
        """The float32 delta in our layout, computed on the default device."""
        full = jnp.asarray(self.up, jnp.float32)
        if self.down is not None:
            full = full @ jnp.asarray(self.down, jnp.float32)
        return self.transform(full) * self.factor


def parse_lora_arg(arg: str) -> tuple[Path, float]:
    """Returns (file, strength) from the CLI's "FILE" or "FILE:STRENGTH". A colon that is not
    followed by a number stays in the path (C:/loras/a.safetensors)."""
    path, _, tail = arg.rpartition(":")
    if path and re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?", tail):
        return Path(path), float(tail)
    return Path(arg), 1.0


def lora_updates(path: str | Path, config: WanConfig, *, strength: float = 1.0) -> list[Update]:
    """Returns the updates a LoRA file makes to a DiT of `config`, or raises CheckpointError
    listing every key it cannot place. Checks names and shapes only; no delta is built."""
    path = Path(path)
    if not path.is_file() or path.suffix != ".safetensors":
        raise CheckpointError(f"LoRA file {path}: no such .safetensors file")
    shard = read_safetensors(path)
    modules, shapes = _module_index(config)
    parts, problems = _collect(shard, modules)
    peft = _peft_config(shard.metadata, path)
    updates = []
    for key, got in parts.items():
        made, trouble = _module_updates(got, modules[key], shapes, peft, strength)
        updates += made
        problems += [f"{got['name']}: {t}" for t in trouble]
    if not updates and not problems:
        problems.append("no LoRA weights (lora_A/B, lora_down/up, diff, diff_b, diff_m) in the file")
    if problems:
        raise CheckpointError(f"LoRA file {path} does not fit this model ({len(problems)} problems):\n  "
                              + "\n  ".join(problems[:40]) + ("\n  ..." if len(problems) > 40 else ""))
    return updates


def merge_loras(dit: WanModel, loras: Sequence[tuple[str | Path, float]]) -> WanModel:
    """Adds each (file, strength) LoRA into `dit`'s parameters in place, one parameter at a time
    (float32 sum, cast back to the parameter's dtype); returns dit. Every file is checked before
    any parameter changes."""
    updates = [u for path, strength in loras for u in lora_updates(path, dit.config, strength=strength)]
    params = {".".join(map(str, p)): var for p, var in nnx.to_flat_state(nnx.state(dit, nnx.Param))}
    for update in updates:
        var = params[update.target]
        value = var.get_value()
        var.set_value((value.astype(jnp.float32) + update.delta()).astype(value.dtype))
    return dit


def _module_index(config: WanConfig) -> tuple[dict[str, tuple[Row, Row | None]], dict[str, tuple[int, ...]]]:
    """Returns ({module name with "_" for ".": (weight row, bias row or None)} of both layouts,
    {our parameter path: shape}) for a DiT of `config`."""
    _, flat = abstract_wan(config)
    shapes = {target: tuple(var.get_value().shape) for target, (_, var) in flat.items()}
    index = {}
    for layout in (wan_original, wan_diffusers):
        rows = {row.source: row for row in expand_rows(layout.TABLE, config.num_layers, targets=flat)}
        for source, row in rows.items():
            if source.endswith(".weight"):
                module = source[: -len(".weight")]
                index[module.replace(".", "_")] = (row, rows.get(module + ".bias"))
            elif not source.endswith(".bias"):  # a bare parameter (modulation): a .diff target
                index[source.replace(".", "_")] = (row, None)
    return index, shapes


def _find_module(name: str, index: Mapping[str, tuple]) -> tuple[str, str] | None:
    """Returns (index key, the name without its prefix) of a file's module name (one of
    PREFIXES, then an exact name), or None."""
    flat = name.replace(".", "_")
    for prefix in PREFIXES:
        if flat.startswith(prefix.replace(".", "_")) and flat[len(prefix) :] in index:
            return flat[len(prefix) :], name[len(prefix) :]  # "." -> "_" keeps lengths
    return None


def _collect(shard, modules) -> tuple[dict[str, dict], list[str]]:
    """Groups a file's tensors by module: {index key: {"name", role: array}}, and the keys that
    fit nowhere."""
    parts: dict[str, dict] = {}
    problems = []
    for name in shard.tensors:
        match = KEY.match(name)
        module = match and (match["module"] or match["module2"])
        if match and match["kind2"] == "diff_m":
            module += ".modulation"
        found = match and _find_module(module, modules)
        if UNSUPPORTED.search(name):
            problems.append(f"{name}: DoRA, LoKr and LoHa LoRAs are not supported")
        elif not match:
            problems.append(f"{name}: not a LoRA tensor (lora_A/B, lora_down/up, alpha, diff, diff_b, diff_m)")
        elif not found:
            problems.append(f"{name}: not a module of this DiT (another model's LoRA, or I2V layers on a T2V model?)")
        else:
            role = ROLE[(match["kind"], match["leaf"])] if match["kind"] else match["kind2"].replace("diff_m", "diff")
            got = parts.setdefault(found[0], {"name": module, "relative": found[1]})
            if role in got:
                problems.append(f"{name}: a second {role} tensor for {got['name']}")
            got[role] = shard.read(name)
    return parts, problems


def _peft_config(metadata: Mapping[str, str], path: Path) -> dict:
    """The PEFT LoraConfig fields diffusers writes into the metadata (keys bare or prefixed with
    "transformer."), or {}."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        config = json.loads(raw)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"LoRA file {path}: unreadable lora_adapter_metadata ({e})") from None
    return {k.removeprefix("transformer."): v for k, v in config.items()}


def _scale(got: Mapping, rank: int, peft: Mapping) -> tuple[float, str | None]:
    """Returns (alpha / rank of one module, or a problem). alpha: the module's .alpha tensor, else
    the PEFT config's (alpha_pattern, then lora_alpha; rsLoRA divides by sqrt(rank)), else rank."""
    if "alpha" in got:
        return float(np.asarray(got["alpha"], np.float32).reshape(-1)[0]) / rank, None
    # PEFT builds each layer with r from rank_pattern (else r) and refuses tensors of another rank.
    declared, source = _pattern_value(peft, "rank_pattern", got["relative"], peft.get("r"))
    problem = None
    if declared is not None and declared != rank:
        problem = f"tensors of rank {rank}, but the PEFT metadata says {declared} ({source}); PEFT refuses such a file"
    alpha, _ = _pattern_value(peft, "alpha_pattern", got["relative"], peft.get("lora_alpha", rank))
    return float(alpha) / (math.sqrt(rank) if peft.get("use_rslora") else rank), problem


def _pattern_value(peft: Mapping, field: str, module: str, default) -> tuple[object, str]:
    """Returns (value, where it came from) of a PEFT per-module pattern for `module` (its name in
    the DiT, "blocks.1.attn1.to_q"). PEFT's rule (peft.utils.other.get_pattern_key): the FIRST
    entry, in the order the metadata lists them (diffusers writes them sorted), whose regex matches
    the end of the name at a dot; else `default`."""
    for pattern, value in (peft.get(field) or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value, f"{field} {pattern!r}"
    return default, {"rank_pattern": "r", "alpha_pattern": "lora_alpha"}[field]


def _module_updates(got: Mapping, rows: tuple[Row, Row | None], shapes: Mapping, peft: Mapping,
                    strength: float) -> tuple[list[Update], list[str]]:
    """Returns (updates, problems) of one module's tensors."""
    weight, bias = rows
    updates, problems = [], []

    def add(row: Row | None, up, down, factor, what):
        if row is None:
            problems.append(f"{what}: the model has no bias there")
            return
        torch_shape = (up.shape[0], down.shape[1]) if down is not None else up.shape
        want = shapes[row.target][::-1] if row.transform is transpose_linear else shapes[row.target]
        if tuple(torch_shape) != tuple(want):
            problems.append(f"{what} of shape {tuple(torch_shape)} for {row.target}, which needs {tuple(want)} "
                            f"(PyTorch layout)")  # fmt: skip
            return
        updates.append(Update(row.target, row.transform, factor, up, down))

    if "diff" in got:
        add(weight, got["diff"], None, strength, "diff")
    if "diff_b" in got:
        add(bias, got["diff_b"], None, strength, "diff_b")
    if ("up" in got) != ("down" in got):
        problems.append(f"a LoRA {'up (B)' if 'up' in got else 'down (A)'} matrix without its partner")
    elif "up" in got:
        down, up = got["down"], got["up"]
        if weight.transform is not transpose_linear or down.ndim != 2 or up.ndim != 2 or up.shape[1] != down.shape[0]:
            problems.append(f"LoRA of shapes A {down.shape}, B {up.shape}; only Linear layers (A [rank, in], "
                            f"B [out, rank]) are supported")  # fmt: skip
        else:
            scale, problem = _scale(got, down.shape[0], peft)
            if problem:
                problems.append(problem)
            factor = scale * strength
            add(weight, up, down, factor, "B @ A")
            if "up_bias" in got:
                add(bias, got["up_bias"], None, factor, "lora_B.bias")
    return updates, problems
