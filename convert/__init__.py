"""PyTorch checkpoints -> our Flax parameter trees.

    convert_checkpoint(src, dst, dtype="bf16")   # what `radial-jax convert` runs: every component found
    load_wan(dst, dtype="bf16")                  # -> models.wan.WanModel, ready to call
    load_pipeline(dst, dtype="bf16")             # -> models.wan.pipeline.Components (DiT, VAE, umT5, ...)

One pipeline for every component (the DiT, VAE, umT5, CLIP): find it in the source folder,
plan it against the abstract model by a name table (one module per source format, read top to
bottom: wan_original.py, wan_diffusers.py, wan_vae.py, umt5.py, clip.py), write it
(component.py), read its config and load it with a two-way key check (checkpoint.py); io.py
streams tensors. wan22.py finds Wan2.2 A14B's two experts (each one more DiT
component) and their switch.
"""

from pathlib import Path

from convert import clip, umt5, wan, wan22, wan_vae
from convert.checkpoint import canonical_dtype, check_destination, stale_partials, staged_directory
from convert.component import write_component
from convert.io import CheckpointError
from convert.wan import SUBFOLDER as TRANSFORMER_DIR
from convert.wan import load_wan, read_config
from models.t5 import Tokenizer
from models.wan.pipeline import Components
from radial_jax.plan import RadialPlan


def _plan_vae_float32(files, config_path, dtype: str):
    # Wan runs its VAE in float32 whatever the DiT's dtype; bf16 would cost detail for ~0.5 GB.
    return wan_vae.plan_vae(files, config_path, "float32")


def _find_tokenizer(src: Path):
    # Only beside a text encoder: a diffusers transformer/ folder would otherwise pick up ../tokenizer.
    return umt5.find_tokenizer(src) if umt5.find_umt5(src) is not None else None


# What a source folder may hold: (output subfolder, finder, planner, writer). Each finder
# returns None when its component is absent; only the DiT is looked for in a single file.
# Wan2.2 A14B: transformer/ is the high-noise expert, transformer_2/ the low-noise one.
COMPONENTS = (
    (TRANSFORMER_DIR, wan22.find_high_noise_transformer, wan.plan_transformer, write_component),
    (wan22.LOW_NOISE_SUBFOLDER, wan22.find_low_noise_transformer, wan.plan_transformer, write_component),
    (wan22.SWITCH_FILE, wan22.find_expert_switch, wan22.plan_expert_switch, wan22.write_expert_switch),
    (wan_vae.SUBFOLDER, wan_vae.find_vae, _plan_vae_float32, write_component),
    (umt5.SUBFOLDER, umt5.find_umt5, umt5.plan_umt5, write_component),
    (umt5.TOKENIZER_SUBFOLDER, _find_tokenizer, umt5.plan_tokenizer, umt5.write_tokenizer),
    (clip.SUBFOLDER, clip.find_clip, clip.plan_clip, write_component),
)
GENERATION_PARTS = (TRANSFORMER_DIR, wan_vae.SUBFOLDER, umt5.SUBFOLDER, umt5.TOKENIZER_SUBFOLDER)


def convert_checkpoint(src: str | Path, dst: str | Path, *, dtype: str = "bf16", progress: bool = True) -> list[str]:
    """Converts every component found in `src` into `dst`; returns the component names.

    All components are checked (names, shapes) before anything is written; output goes to a
    temporary folder beside `dst` that is renamed into place only when complete. The VAE is
    stored in float32 whatever `dtype` says. Wan2.2 TI2V-5B is refused.
    """
    dtype = canonical_dtype(dtype)
    src = Path(src)
    check_destination(Path(dst))  # before reading any source: that can take minutes for a .pth
    wan22.refuse_unsupported(src)
    plans = []
    for name, find, plan, write in COMPONENTS:
        found = find(src) if src.is_dir() or name == TRANSFORMER_DIR else None
        if found is not None:
            plans.append((name, plan(*found, dtype), write))
    if not any(name == TRANSFORMER_DIR for name, _, _ in plans):
        raise CheckpointError(f"{src}: no Wan2.1 checkpoint found (looked for *.safetensors.index.json, "
                              "*.safetensors, a DiT .pth, or a diffusers transformer/ folder)")
    wan22.check_experts({name: plan for name, plan, _ in plans})
    with staged_directory(Path(dst)) as staging:
        for name, plan, write in plans:
            write(plan, staging / name, progress=progress)
    return [name for name, _, _ in plans]


def load_pipeline(path: str | Path, *, dtype: str | None = None, attention: RadialPlan | None = None,
                  vae_dtype: str | None = None) -> Components:  # fmt: skip
    """Returns the generation components of a converted checkpoint folder, on the default device.

    dtype: of the DiT, text and image encoders ("bf16", "f32"; default: as converted); vae_dtype:
    the VAE's (default as converted, float32; "bf16" decodes faster and adds ~1 uint8 level of
    error, tests/models/test_vae.py); attention: the DiT's self-attention plan, kept beside the
    modules as Components.plan (default None: dense), for both experts of a Wan2.2 A14B
    (Components.low_noise_dit and .experts set).
    """
    root = Path(path)
    missing = [part for part in GENERATION_PARTS if not (root / part).is_dir()]
    if missing:
        raise CheckpointError(f"{root}: no {', '.join(p + '/' for p in missing)}; convert the whole Wan2.1 "
                              f"folder (not one file): radial-jax convert --src WAN_FOLDER --dst NEW_DIR")
    dit = load_wan(root, dtype=dtype)
    low_noise_dit = experts = None
    if (root / wan22.LOW_NOISE_SUBFOLDER).is_dir():
        experts = wan22.read_expert_switch(root)
        low_noise_dit = load_wan(root / wan22.LOW_NOISE_SUBFOLDER, dtype=dtype)
    image_encoder = None
    if dit.config.uses_clip:
        if not (root / clip.SUBFOLDER).is_dir():
            raise CheckpointError(f"{root}: an I2V DiT but no {clip.SUBFOLDER}/ (CLIP); convert the whole I2V folder")
        image_encoder = clip.load_clip(root, dtype=dtype)
    return Components(
        dit=dit, vae=wan_vae.load_vae(root, dtype=vae_dtype), text_encoder=umt5.load_umt5(root, dtype=dtype),
        tokenizer=Tokenizer.from_dir(root / umt5.TOKENIZER_SUBFOLDER, text_len=dit.config.text_len),
        image_encoder=image_encoder, plan=attention, low_noise_dit=low_noise_dit, experts=experts,
    )  # fmt: skip


__all__ = ["CheckpointError", "convert_checkpoint", "load_pipeline", "load_wan", "read_config", "stale_partials"]
