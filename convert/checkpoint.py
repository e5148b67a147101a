"""Our checkpoint format and its loader: `load_wan(dir, dtype=...) -> WanModel`.

A converted checkpoint is a folder with one subfolder per component (today `transformer/`):
config.json ({"format", "version", "source", "config": WanConfig fields}), safetensors files
of the flattened parameter tree ("blocks.0.self_attn.q.kernel", ...) and their .index.json.
Folders are written under a temporary name beside the destination and renamed into place,
so a failed conversion leaves nothing at the destination.
"""

import contextlib
import dataclasses
import json
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from convert.io import CheckpointError, TensorInfo, iter_tensor_infos, open_shards
from models.wan import WanConfig, WanModel

FORMAT = "radial-jax/wan-transformer"
FORMAT_VERSION = 1
TRANSFORMER_DIR = "transformer"
INDEX_NAME = "model.safetensors.index.json"
DTYPE_ALIASES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "f32": "float32", "float32": "float32",
                 "fp32": "float32", "f16": "float16", "float16": "float16"}


def canonical_dtype(dtype: str) -> str:
    """Returns "bfloat16" / "float32" / "float16" for the spellings the CLI accepts."""
    if dtype not in DTYPE_ALIASES:
        raise ValueError(f"dtype={dtype!r} must be one of {sorted(DTYPE_ALIASES)}")
    return DTYPE_ALIASES[dtype]


def abstract_wan(config: WanConfig) -> tuple[nnx.GraphDef, dict[str, tuple[tuple, nnx.Variable]]]:
    """Returns (graphdef, {"blocks.0.self_attn.q.kernel": (path, abstract variable)}) with no
    parameter memory allocated (nnx.eval_shape)."""
    model = nnx.eval_shape(lambda: WanModel(config, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(model)
    flat = {".".join(map(str, path)): (path, var) for path, var in nnx.to_flat_state(state)}
    return graphdef, flat


def target_info(var: nnx.Variable) -> TensorInfo:
    value = var.get_value()
    return TensorInfo(tuple(value.shape), np.dtype(value.dtype))


def mismatch_report(missing, unexpected, mismatched, *, what: str) -> str:
    """Returns one message listing missing and unexpected keys and every shape/dtype mismatch."""
    lines = [f"{what} does not match the model:"]
    if missing:
        lines.append(f"  missing keys ({len(missing)}): " + ", ".join(sorted(missing)))
    if unexpected:
        lines.append(f"  unexpected keys ({len(unexpected)}): " + ", ".join(sorted(unexpected)))
    for name, expected, got in mismatched:
        lines.append(f"  mismatch {name}: expected {expected}, got {got}")
    return "\n".join(lines)


PARTIAL_MARK = ".partial-"  # staging folders: .{dst name}.partial-{pid}-{random hex}


def _partial_pid(folder: Path) -> int | None:
    """Returns the pid in a staging folder's name (None for names without one)."""
    pid, sep, _ = folder.name.rpartition(PARTIAL_MARK)[2].partition("-")
    return int(pid) if sep and pid.isdigit() else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def stale_partials(dst: Path) -> list[Path]:
    """Returns the staging folders of `dst` left by conversions that were killed (SIGKILL, power
    loss): those whose process no longer runs on this machine."""
    dst = Path(dst)
    if not dst.parent.is_dir():
        return []
    found = sorted(dst.parent.glob(f".{dst.name}{PARTIAL_MARK}*"))
    return [p for p in found if p.is_dir() and ((pid := _partial_pid(p)) is None or not _alive(pid))]


def check_destination(dst: Path) -> None:
    """Raises CheckpointError unless `dst` can be converted into: absent or an empty folder."""
    dst = Path(dst)
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise CheckpointError(f"destination {dst} exists and is not an empty folder; choose a new path or remove it")


@contextlib.contextmanager
def staged_directory(dst: Path) -> Iterator[Path]:
    """Yields an empty temporary folder beside `dst`; renames it to `dst` on success, deletes it
    on any failure (including Ctrl-C, and SIGTERM where the caller turns it into an exception).
    `dst` must not exist or be an empty folder. A SIGKILL leaves the folder: stale_partials finds it."""
    dst = Path(dst)
    check_destination(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    # mkdir, not tempfile.mkdtemp: mkdtemp makes the folder 0700, and it becomes `dst`.
    staging = dst.parent / f".{dst.name}{PARTIAL_MARK}{os.getpid()}-{secrets.token_hex(4)}"
    staging.mkdir()
    try:
        yield staging
        if dst.exists():
            dst.rmdir()
        os.rename(staging, dst)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def write_component_metadata(folder: Path, config: WanConfig, weight_map: dict[str, str], source: dict) -> None:
    meta = {"format": FORMAT, "version": FORMAT_VERSION, "source": source, "config": config.to_dict()}
    (folder / "config.json").write_text(json.dumps(meta, indent=2) + "\n")
    (folder / INDEX_NAME).write_text(json.dumps({"metadata": {"format": FORMAT}, "weight_map": weight_map},
                                                indent=2) + "\n")


def read_config(path: str | Path) -> tuple[Path, WanConfig]:
    """Returns (transformer folder, WanConfig) of a converted checkpoint (its root or transformer/)."""
    folder = Path(path)
    if (folder / TRANSFORMER_DIR / "config.json").is_file():
        folder = folder / TRANSFORMER_DIR
    try:
        meta = json.loads((folder / "config.json").read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no config.json; is this a `radial-jax convert` output folder?") from None
    except json.JSONDecodeError as e:  # a truncated copy, or a file edited by hand
        raise CheckpointError(f"{folder}/config.json is not valid JSON ({e}); convert the checkpoint again") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{folder}/config.json: format {meta.get('format')!r} is not {FORMAT!r}; convert the "
                              "checkpoint first with `radial-jax convert --src ... --dst ...`")
    if meta.get("version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{folder}: written by a newer radial-jax (format version {meta['version']})")
    return folder, WanConfig.from_dict(meta["config"])


def load_wan(path: str | Path, *, dtype: str | None = None) -> WanModel:
    """Returns a ready WanModel from a converted checkpoint folder.

    dtype: param and compute dtype ("bf16", "f32"; default: as converted). The attention plan
    is not part of the model: pass it at call time (`model(..., plan=plan)`).
    Tensors stream from disk to the device one at a time.
    """
    folder, config = read_config(path)
    if dtype is not None:
        config = dataclasses.replace(config, param_dtype=canonical_dtype(dtype), dtype=canonical_dtype(dtype))
    graphdef, flat = abstract_wan(config)
    loaded, unexpected, mismatched = {}, [], []
    for name, info, shard in iter_tensor_infos(open_shards([folder / INDEX_NAME])):
        if name not in flat:
            unexpected.append(name)
            continue
        path_parts, var = flat[name]
        want = target_info(var)
        if info.shape != want.shape:
            mismatched.append((name, want.shape, info.shape))
            continue
        loaded[path_parts] = var.replace(jnp.asarray(shard.read(name)).astype(want.dtype))
    missing = [name for name, (path_parts, _) in flat.items() if path_parts not in loaded]
    if missing or unexpected or mismatched:
        raise CheckpointError(mismatch_report(missing, unexpected, mismatched, what=str(folder)))
    return nnx.merge(graphdef, nnx.from_flat_state(loaded))
