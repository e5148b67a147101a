"""Wan2.2 A14B folders: two DiT experts and the timestep that switches them; TI2V-5B refused.

Original layout (Wan-Video/Wan2.2; wan/configs/wan_t2v_A14B.py names the subfolders
`high_noise_checkpoint` / `low_noise_checkpoint`): high_noise_model/ and low_noise_model/, each
a Wan2.1-layout DiT with its config.json, beside Wan2.1_VAE.pth, models_t5_umt5-xxl-enc-bf16.pth
and google/umt5-xxl/. The switch and sampling settings are not in the files (they live in the
original's code), so they come from models.wan.experts' table by task.

Diffusers layout (its scripts/convert_wan_to_diffusers.py): transformer/ is the high-noise
expert, transformer_2/ the low-noise one, and model_index.json holds `boundary_ratio` (0.875
T2V, 0.9 I2V), which we read from there.

Ours: transformer/ (the high-noise expert, as diffusers), transformer_2/ (the low-noise one, the
same architecture) and experts.json ({"format", "version", "source", "config": ExpertSwitch}).
"""

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from convert import wan
from convert.io import CheckpointError
from convert.wan import SUBFOLDER as TRANSFORMER_DIR
from models.wan.experts import EXPERT_PRESETS, ExpertSwitch

ORIGINAL_HIGH_NOISE, ORIGINAL_LOW_NOISE = "high_noise_model", "low_noise_model"
LOW_NOISE_SUBFOLDER = "transformer_2"  # diffusers' name and ours
SWITCH_FILE = "experts.json"
SWITCH_FORMAT = "radial-jax/wan-experts"
SWITCH_VERSION = 1
WAN22_LATENT_CHANNELS = 48  # TI2V-5B's Wan2.2 VAE (Wan2.1's: 16)
SUPPORTED = "Wan2.1 T2V/I2V (1.3B, 14B) and Wan2.2 T2V-A14B/I2V-A14B"
TI2V_REFUSAL = f"Wan2.2 TI2V-5B (48-channel Wan2.2 VAE) is not supported; supported: {SUPPORTED}"


@dataclasses.dataclass(frozen=True)
class SwitchPlan:
    task: str  # "t2v" or "i2v": the experts' task, checked against their configs before writing
    switch: ExpertSwitch
    source: dict


def refuse_unsupported(src: Path) -> None:
    """Raises CheckpointError (one line) if `src` is a Wan2.2 TI2V-5B folder, file or transformer."""
    src = Path(src)
    folder = src if src.is_dir() else src.parent
    signs = [(folder / "Wan2.2_VAE.pth").is_file(),
             _json(folder / "config.json").get("model_type") == "ti2v",
             bool(_json(folder / "model_index.json").get("expand_timesteps")),
             _json(folder / "vae" / "config.json").get("z_dim") == WAN22_LATENT_CHANNELS]  # fmt: skip
    for transformer in (folder, folder / "transformer"):
        config = _json(transformer / "config.json")
        signs.append(WAN22_LATENT_CHANNELS in (config.get("in_channels"), config.get("out_channels"),
                                               config.get("in_dim"), config.get("out_dim")))  # fmt: skip
    if any(signs):
        raise CheckpointError(f"{src}: {TI2V_REFUSAL}")


def find_high_noise_transformer(src: Path) -> tuple[list[Path], Path | None] | None:
    """Returns the DiT of `src` as convert.wan.find_transformer, the high-noise expert of an
    original A14B folder (high_noise_model/) included."""
    src = Path(src)
    if src.is_dir() and (src / ORIGINAL_HIGH_NOISE).is_dir():
        return wan.find_transformer(src / ORIGINAL_HIGH_NOISE)
    return wan.find_transformer(src)


def find_low_noise_transformer(src: Path) -> tuple[list[Path], Path | None] | None:
    """Returns (files, config.json) of the low-noise expert of an A14B folder, or None."""
    for name in (ORIGINAL_LOW_NOISE, LOW_NOISE_SUBFOLDER):
        if (Path(src) / name).is_dir():
            found = wan.find_transformer(Path(src) / name)
            if found is None:
                raise CheckpointError(f"{Path(src) / name}: no DiT checkpoint files in the low-noise expert's folder")
            return found
    return None


def find_expert_switch(src: Path) -> tuple[Path] | None:
    """Returns (src,) if `src` holds two experts, else None."""
    return (Path(src),) if find_low_noise_transformer(src) is not None else None


def plan_expert_switch(src: Path, dtype: str) -> SwitchPlan:
    """Returns the switch of an A14B folder: the task from the high-noise expert's config.json,
    the boundary from model_index.json (diffusers) or the original's table (original layout).
    `dtype` is unused (the COMPONENTS planners' signature)."""
    del dtype
    src = Path(src)
    task = _task(src)
    preset = EXPERT_PRESETS[task]
    if not (src / LOW_NOISE_SUBFOLDER).is_dir():
        source = {"layout": "original", "settings": f"Wan-Video/Wan2.2 wan/configs/wan_{task}_A14B.py"}
        return SwitchPlan(task, preset, source)
    index_path = src / "model_index.json"
    ratio = _json(index_path).get("boundary_ratio")
    if ratio is None:  # diffusers would then run transformer/ alone and ignore transformer_2/
        raise CheckpointError(f"{index_path}: no boundary_ratio beside {LOW_NOISE_SUBFOLDER}/; a Wan2.2 A14B "
                              "diffusers folder states it (0.875 T2V, 0.9 I2V): add it or fetch the folder again")
    try:
        switch = dataclasses.replace(preset, boundary=float(ratio))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{index_path}: boundary_ratio={ratio!r}: {e}") from None
    return SwitchPlan(task, switch, {"layout": "diffusers", "path": str(index_path)})


def check_experts(plans: Mapping[str, Any]) -> None:
    """Raises CheckpointError unless a low-noise expert comes with a high-noise one of the same
    architecture and a switch for their task (plans: component name -> plan)."""
    low, high, switch = plans.get(LOW_NOISE_SUBFOLDER), plans.get(TRANSFORMER_DIR), plans.get(SWITCH_FILE)
    if low is None:
        return
    if high is None or switch is None:
        raise CheckpointError("a low-noise expert without a high-noise one (high_noise_model/ or transformer/)")
    if high.config != low.config:
        diff = {f.name: (getattr(high.config, f.name), getattr(low.config, f.name))
                for f in dataclasses.fields(high.config) if getattr(high.config, f.name) != getattr(low.config, f.name)}
        raise CheckpointError(f"the two experts differ in architecture (high, low): {diff}; they must be one "
                              "Wan2.2 A14B pair")  # fmt: skip
    if switch.task != high.config.model_type:
        raise CheckpointError(f"the experts' config says {high.config.model_type} but the folder's configs say "
                              f"{switch.task}")  # fmt: skip


def write_expert_switch(plan: SwitchPlan, path: Path, *, progress: bool = True) -> None:
    """Writes experts.json at `path`."""
    del progress
    meta = {"format": SWITCH_FORMAT, "version": SWITCH_VERSION, "task": plan.task, "source": plan.source,
            "config": plan.switch.to_dict()}  # fmt: skip
    Path(path).write_text(json.dumps(meta, indent=2) + "\n")


def read_expert_switch(root: str | Path) -> ExpertSwitch:
    """Returns the ExpertSwitch of a converted A14B folder."""
    path = Path(root) / SWITCH_FILE
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{root}: a {LOW_NOISE_SUBFOLDER}/ but no {SWITCH_FILE}; convert the whole Wan2.2 "
                              "A14B folder again") from None  # fmt: skip
    if meta.get("format") != SWITCH_FORMAT or meta.get("version", 0) > SWITCH_VERSION:
        raise CheckpointError(f"{path}: not a {SWITCH_FORMAT} file of version <= {SWITCH_VERSION}")
    return ExpertSwitch.from_dict(meta["config"])


def _task(src: Path) -> str:
    """Returns "i2v" if the high-noise expert takes more input than output channels (the image
    latents and mask in y), else "t2v", from its config.json (original or diffusers names)."""
    folder = src / ORIGINAL_HIGH_NOISE if (src / ORIGINAL_HIGH_NOISE).is_dir() else src / TRANSFORMER_DIR
    config = _json(folder / "config.json")
    in_dim = config.get("in_dim", config.get("in_channels"))
    out_dim = config.get("out_dim", config.get("out_channels")) or in_dim
    if in_dim is None:
        raise CheckpointError(f"{folder}/config.json: no in_dim/in_channels; cannot tell T2V from I2V")
    return "i2v" if in_dim > out_dim else "t2v"


def _json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        return {}
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not JSON ({e})") from None
