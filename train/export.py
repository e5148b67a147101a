"""A trained LoRA -> one .safetensors file that other tools load.

    export_lora(model, "lora.safetensors")                    # diffusers / PEFT names
    export_lora(model, "lora_comfy.safetensors", format="comfy")

format="diffusers": `transformer.blocks.N.attn1.to_q.lora_A.weight` [rank, in] and `.lora_B.weight`
[out, rank], the scale alpha / rank folded into lora_B, so every reader applies B @ A as stored
(diffusers' `load_lora_weights` / `load_lora_adapter` infer lora_alpha = rank when the file
carries no PEFT config, and so does our `generate --lora`). No PEFT metadata is written: a file
whose lora_alpha a reader might ignore or misread could only be wrong there.
format="comfy": ComfyUI's (and kohya's) spelling of the original Wan2.1 names,
`diffusion_model.blocks.N.self_attn.q.lora_down.weight` / `.lora_up.weight` with the trained
`.alpha` beside them (scale alpha / rank applied by the reader; B stored as trained).

Module names come from the DiT converter's tables (train/lora.py module_name, reading
convert/wan_diffusers.py and convert/wan_original.py), the same tables `generate --lora` reads
back. Every LoRA must have one rank (PEFT's loaders take a single r). The safetensors metadata
records what was trained under "radial_jax" (rank, alpha, modules, folded or not).
"""

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from flax import nnx

from convert.transforms import transpose_linear
from train.lora import LAYOUTS, lora_factors, module_name

FORMATS = ("diffusers", "comfy")
PREFIX = {"diffusers": "transformer.", "comfy": "diffusion_model."}
LAYOUT = {"diffusers": "diffusers", "comfy": "original"}  # the converter table each format names modules by

# {our module path: (down [rank, in], up [out, rank], alpha)}, PyTorch layout, as lora_factors returns
Factors = Mapping[str, tuple[np.ndarray, np.ndarray, float]]


def lora_tensors(factors: Factors, format: str = "diffusers") -> dict[str, np.ndarray]:
    """Returns the file's tensors, float32, named for `format` (see the module docstring)."""
    if format not in FORMATS:
        raise ValueError(f"format={format!r} must be one of {FORMATS}")
    if not factors:
        raise ValueError("no LoRA to export: the model has no LoRA layers (train/lora.py apply_lora)")
    ranks = {path: np.shape(down)[0] for path, (down, _, _) in factors.items()}
    if len(set(ranks.values())) > 1:
        raise ValueError(f"LoRAs of several ranks {sorted(set(ranks.values()))}; export needs one rank")
    tensors = {}
    for path, (down, up, alpha) in factors.items():
        down, up = np.asarray(down, np.float32), np.asarray(up, np.float32)
        if down.ndim != 2 or up.ndim != 2 or up.shape[1] != down.shape[0]:
            raise ValueError(f"{path}: LoRA factors of shapes down {down.shape}, up {up.shape}; need [rank, in] "
                             "and [out, rank]")  # fmt: skip
        name = PREFIX[format] + module_name(path, LAYOUT[format])
        if format == "diffusers":
            tensors[f"{name}.lora_A.weight"] = np.ascontiguousarray(down)
            tensors[f"{name}.lora_B.weight"] = np.ascontiguousarray(up * np.float32(alpha / down.shape[0]))
        else:
            tensors[f"{name}.lora_down.weight"] = np.ascontiguousarray(down)
            tensors[f"{name}.lora_up.weight"] = np.ascontiguousarray(up)
            tensors[f"{name}.alpha"] = np.asarray(alpha, np.float32)
    return tensors


def export_lora(
    source: nnx.Module | Factors, path: str | Path, *, format: str = "diffusers",
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Writes the LoRA of `source` (a model with train/lora.py LoRA layers, or its lora_factors)
    to `path` (.safetensors) in `format`, through a temporary file renamed into place; returns path.

    metadata: extra string entries for the file's header (e.g. the training config).
    """
    from safetensors.numpy import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"LoRA export path {path} must end in .safetensors")
    factors = lora_factors(source) if isinstance(source, nnx.Module) else source
    tensors = lora_tensors(factors, format)
    (down, _, alpha), *_ = factors.values()
    summary = {"format": format, "rank": int(np.shape(down)[0]), "alpha": float(alpha),
               "alpha_folded_into_lora_B": format == "diffusers", "modules": sorted(factors)}  # fmt: skip
    header = {"format": "pt", **(metadata or {}), "radial_jax": json.dumps(summary)}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata=header)
    os.replace(tmp, path)
    return path


def read_exported(path: str | Path) -> dict[str, tuple[np.ndarray, np.ndarray, float]]:
    """Returns the factors {our module path: (down, up, alpha)} of a file export_lora wrote, in
    either format, as trained (a folded alpha unfolded again). Raises ValueError for any other file."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    try:
        with safe_open(str(path), "np") as f:
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except SafetensorError as e:
        raise ValueError(f"{path}: not a readable .safetensors file ({e})") from None
    try:
        summary = json.loads(metadata.get("radial_jax", "null"))
    except json.JSONDecodeError:
        summary = None
    if not summary or summary.get("format") not in FORMATS:
        raise ValueError(f"{path}: not a LoRA exported by radial-jax (no radial_jax metadata); merge it with "
                         "generate --lora instead")  # fmt: skip
    format, trained_alpha = summary["format"], float(summary["alpha"])
    down_key, up_key = ("lora_A", "lora_B") if format == "diffusers" else ("lora_down", "lora_up")
    factors = {}
    for name in tensors:
        if not name.endswith(f".{down_key}.weight"):
            continue
        module = name[len(PREFIX[format]) : -len(f".{down_key}.weight")]
        up_name = f"{PREFIX[format]}{module}.{up_key}.weight"
        if up_name not in tensors:
            raise ValueError(f"{path}: {name} has no {up_name}")
        down, up = tensors[name], tensors[up_name]
        if format == "diffusers":  # folded: up holds alpha / rank * B
            alpha, up = trained_alpha, up * np.float32(down.shape[0] / trained_alpha)
        else:
            alpha = float(tensors[f"{PREFIX[format]}{module}.alpha"])
        factors[our_path(module, LAYOUT[format])] = (down, up, alpha)
    return factors


def our_path(module: str, layout: str) -> str:
    """Returns our Linear path of a module name in `layout`, the inverse of train/lora.py's
    module_name, from the same converter table: "blocks.3.attn1.to_q" -> "blocks.3.self_attn.q"."""
    for row in LAYOUTS[layout].TABLE:
        if row.transform is transpose_linear:
            pattern = re.escape(row.source.removesuffix(".weight")).replace(r"\{n\}", r"(?P<n>\d+)")
            match = re.fullmatch(pattern, module)
            if match:
                target = row.target.removesuffix(".kernel")
                return target.replace("{n}", match["n"]) if "{n}" in target else target
    raise ValueError(f"{module} is not a Linear layer of the {layout} Wan layout")
