"""PyTorch checkpoints -> our Flax parameter trees.

    convert_checkpoint(src, dst, dtype="bf16")   # what `radial-jax convert` runs
    load_wan(dst, dtype="bf16")                  # -> models.wan.WanModel, ready to call

One module per source format with a name table read top to bottom (wan_original.py,
wan_diffusers.py); io.py streams tensors; checkpoint.py writes and reads our format.
"""

from pathlib import Path

from convert import wan
from convert.checkpoint import TRANSFORMER_DIR, canonical_dtype, load_wan, read_config, staged_directory
from convert.io import CheckpointError

# What a source folder may hold: (output subfolder, finder, planner, writer). The VAE and umT5
# encoder plug in here; each finder returns None when its component is absent.
COMPONENTS = (
    (TRANSFORMER_DIR, wan.find_transformer, wan.plan_transformer, wan.write_transformer),
)


def convert_checkpoint(src: str | Path, dst: str | Path, *, dtype: str = "bf16", progress: bool = True) -> list[str]:
    """Converts every component found in `src` into `dst`; returns the component names.

    All components are checked (names, shapes) before anything is written; output goes to a
    temporary folder beside `dst` that is renamed into place only when complete.
    """
    dtype = canonical_dtype(dtype)
    plans = []
    for name, find, plan, write in COMPONENTS:
        found = find(Path(src))
        if found is not None:
            plans.append((name, plan(*found, dtype), write))
    if not plans:
        raise CheckpointError(f"{src}: no Wan2.1 checkpoint found (looked for *.safetensors.index.json, "
                              "*.safetensors, a DiT .pth, or a diffusers transformer/ folder)")
    with staged_directory(Path(dst)) as staging:
        for name, plan, write in plans:
            write(plan, staging / name, progress=progress)
    return [name for name, _, _ in plans]


__all__ = ["CheckpointError", "convert_checkpoint", "load_wan", "read_config"]
