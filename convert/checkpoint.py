"""Our checkpoint format: write a component's config.json, read it back, load its tensors.

A converted checkpoint is a folder with one subfolder per component (transformer/, vae/,
text_encoder/, image_encoder/; tokenizer/ is copied files): config.json
({"format": "radial-jax/<model>", "version", "source", "config": the model config's fields}),
the flattened parameter tree ("blocks.0.self_attn.q.kernel", ...) in model.safetensors, or in
model-0000i-of-0000n.safetensors files listed by model.safetensors.index.json. Every component
loads through one function with a two-way key check (load_component). Folders are written
under a temporary name beside the destination and renamed into place, so a failed conversion
leaves nothing at the destination.
"""

import contextlib
import dataclasses
import json
import os
import secrets
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp
from flax import nnx

from convert.io import CheckpointError, iter_tensor_infos, open_shards, read_safetensors

FORMAT_PREFIX = "radial-jax/"
FORMAT_VERSION = 1
WEIGHTS_NAME = "model.safetensors"  # a component written from one source file
INDEX_NAME = "model.safetensors.index.json"  # a component written from several
DTYPE_ALIASES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "f32": "float32", "float32": "float32",
                 "fp32": "float32", "f16": "float16", "float16": "float16"}


def canonical_dtype(dtype: str) -> str:
    """Returns "bfloat16" / "float32" / "float16" for the spellings the CLI accepts."""
    if dtype not in DTYPE_ALIASES:
        raise ValueError(f"dtype={dtype!r} must be one of {sorted(DTYPE_ALIASES)}")
    return DTYPE_ALIASES[dtype]


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


def write_metadata(folder: Path, model: str, config: Any, source: dict, weight_map: Mapping[str, str] | None = None,
                   ) -> None:  # fmt: skip
    """Writes folder/config.json for our `model` (its config dataclass's fields) and, given a
    {parameter: file} weight_map over several files, folder/model.safetensors.index.json."""
    meta = {"format": FORMAT_PREFIX + model, "version": FORMAT_VERSION, "source": source,
            "config": dataclasses.asdict(config)}  # fmt: skip
    (Path(folder) / "config.json").write_text(json.dumps(meta, indent=2) + "\n")
    if weight_map is not None:
        index = {"metadata": {"format": FORMAT_PREFIX + model}, "weight_map": dict(weight_map)}
        (Path(folder) / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")


def read_component_config(path: str | Path, model: str, subfolder: str) -> tuple[Path, dict]:
    """Returns (component folder, config fields) of a converted `model` at `path` or path/subfolder."""
    folder = Path(path)
    if (folder / subfolder / "config.json").is_file():
        folder = folder / subfolder
    try:
        meta = json.loads((folder / "config.json").read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no config.json; is this a `radial-jax convert` output folder?") from None
    except json.JSONDecodeError as e:  # a truncated copy, or a file edited by hand
        raise CheckpointError(f"{folder}/config.json is not valid JSON ({e}); convert the checkpoint again") from None
    if meta.get("format") != FORMAT_PREFIX + model:
        raise CheckpointError(f"{folder}/config.json: format {meta.get('format')!r} is not {FORMAT_PREFIX + model!r}; "
                              "convert the checkpoint first with `radial-jax convert --src ... --dst ...`")
    if meta.get("version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{folder}: written by a newer radial-jax (format version {meta['version']})")
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in meta["config"].items()}
    return folder, fields


def load_component(folder: Path, abstract: nnx.Module) -> nnx.Module:
    """Returns `abstract` (an nnx.eval_shape'd module) filled from the folder's safetensors (its
    index if there is one, else model.safetensors), cast to its dtypes, one tensor at a time onto
    the default device. Raises CheckpointError listing missing and unexpected keys and every
    shape mismatch."""
    folder = Path(folder)
    index = folder / INDEX_NAME
    shards = open_shards([index]) if index.is_file() else [read_safetensors(folder / WEIGHTS_NAME)]
    graphdef, state = nnx.split(abstract)
    flat = {".".join(map(str, path)): (path, var) for path, var in nnx.to_flat_state(state)}
    loaded, unexpected, mismatched = {}, [], []
    for name, info, shard in iter_tensor_infos(shards):
        if name not in flat:
            unexpected.append(name)
            continue
        path, var = flat[name]
        want = var.get_value()
        if info.shape != tuple(want.shape):
            mismatched.append((name, tuple(want.shape), info.shape))
            continue
        loaded[path] = var.replace(jnp.asarray(shard.read(name)).astype(want.dtype))
    missing = [name for name, (path, _) in flat.items() if path not in loaded]
    if missing or unexpected or mismatched:
        raise CheckpointError(mismatch_report(missing, unexpected, mismatched, what=str(folder)))
    return nnx.merge(graphdef, nnx.from_flat_state(loaded))


def load_model(path: str | Path, module_cls: type, config_cls: type, *, model: str, subfolder: str,
               dtype: str | None = None, dtype_fields: tuple[str, ...] = ("dtype",)) -> nnx.Module:  # fmt: skip
    """Returns module_cls(config) with the weights converted into `path` (the component folder
    or a root holding `subfolder`/); the config is config_cls.from_dict(fields) where the class
    has one (it may drop stale fields), else config_cls(**fields). dtype: sets the config's
    dtype_fields (default: as converted)."""
    folder, fields = read_component_config(path, model, subfolder)
    config = config_cls.from_dict(fields) if hasattr(config_cls, "from_dict") else config_cls(**fields)
    if dtype is not None:
        config = dataclasses.replace(config, **dict.fromkeys(dtype_fields, canonical_dtype(dtype)))
    return load_component(folder, nnx.eval_shape(lambda: module_cls(config, rngs=nnx.Rngs(0))))
