"""One small model component (the VAE, the umT5 encoder) converted by a name table into our format.

`plan_component` checks a table of Rows (convert/transforms.py) against the source tensors
(convert/io.py shards) and against the abstract module (nnx.eval_shape: no memory), raising
one CheckpointError that lists every missing and unexpected name and every shape or dtype
mismatch before anything is written. `write_component` then streams the tensors one at a time
into folder/model.safetensors beside config.json ({"format", "version", "source", "config"}),
and `load_component` reads them back into the module. The plan/write pair has the shape of
convert/__init__.py's COMPONENTS entries.
"""

import dataclasses
import json
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from convert.checkpoint import canonical_dtype, mismatch_report
from convert.io import CheckpointError, SafetensorsWriter, Shard, TensorInfo, iter_tensor_infos, read_safetensors
from convert.transforms import Row, transformed_shape

FORMAT_PREFIX = "radial-jax/"
FORMAT_VERSION = 1
WEIGHTS_NAME = "model.safetensors"


@dataclasses.dataclass(frozen=True)
class Entry:
    """One tensor to convert: where it is, where it goes, how, and the target shape and dtype."""

    shard: Shard
    row: Row
    info: TensorInfo


@dataclasses.dataclass(frozen=True)
class ComponentPlan:
    model: str  # "wan-vae", "umt5-encoder": our format name
    config: Any  # the model's frozen config dataclass, written to config.json
    entries: tuple[Entry, ...]
    source: dict  # {"layout": ..., "path": ...}, recorded in config.json


def abstract_params(module: nnx.Module) -> dict[str, TensorInfo]:
    """Returns {dotted parameter path: shape and dtype} of an nnx.eval_shape'd module."""
    return {
        ".".join(map(str, path)): TensorInfo(tuple(var.get_value().shape), np.dtype(var.get_value().dtype))
        for path, var in nnx.to_flat_state(nnx.state(module))
    }


def plan_component(
    model: str, config: Any, abstract: nnx.Module, rows: Sequence[Row], shards: Sequence[Shard], *,
    layout: str, ignored: Iterable[str] = (),
) -> ComponentPlan:  # fmt: skip
    """Returns the plan mapping `shards` onto `abstract` by `rows`, or raises listing every problem.

    ignored: source names that may be present and are skipped (e.g. a tied embedding copy).
    """
    found = {name: (info, shard) for name, info, shard in iter_tensor_infos(shards)}
    targets = abstract_params(abstract)
    by_source = {row.source: row for row in rows}
    covered = [row.target for row in rows]
    missing = [row.source for row in rows if row.source not in found]
    missing += [f"(ours) {t}" for t in targets if t not in covered]
    unexpected = [name for name in found if name not in by_source and name not in set(ignored)]
    unexpected += [f"(rule target) {t}" for t in covered if t not in targets]
    entries, mismatched = [], []
    for row in rows:
        if row.source not in found or row.target not in targets:
            continue
        info, shard = found[row.source]
        want = targets[row.target]
        got = transformed_shape(row.transform, info.shape)
        if got != want.shape or not _is_float(info.dtype):
            mismatched.append((row.source, f"{want.shape} float (our {row.target})", f"{info.shape} {info.dtype}"))
            continue
        entries.append(Entry(shard, row, want))
    if missing or unexpected or mismatched:
        paths = sorted({str(s.path) for s in shards})
        raise CheckpointError(
            mismatch_report(missing, unexpected, mismatched, what=f"{layout} {model} checkpoint {', '.join(paths)}")
            + f"\n  config used (from the checkpoint's shapes and config.json): {_short(config)}"
        )
    return ComponentPlan(model, config, tuple(entries), {"layout": layout, "path": str(shards[0].path)})


def _short(config: Any) -> str:
    fields = dataclasses.asdict(config)
    return ", ".join(f"{k}={v}" for k, v in fields.items() if not (isinstance(v, tuple) and len(v) > 8))


def _is_float(dtype: np.dtype) -> bool:
    return np.issubdtype(dtype, np.floating) or dtype == jnp.bfloat16


def write_component(plan: ComponentPlan, folder: Path, *, progress: bool = True) -> None:
    """Streams the planned tensors into folder/model.safetensors and writes folder/config.json."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    specs = {e.row.target: e.info for e in plan.entries}
    writer = SafetensorsWriter(folder / WEIGHTS_NAME, specs, metadata={"format": FORMAT_PREFIX + plan.model})
    for e in tqdm(plan.entries, unit="tensor", disable=not progress, desc=plan.model):
        writer.write(e.row.target, np.ascontiguousarray(e.row.transform(e.shard.read(e.row.source)), e.info.dtype))
    writer.close()
    meta = {"format": FORMAT_PREFIX + plan.model, "version": FORMAT_VERSION, "source": plan.source,
            "config": dataclasses.asdict(plan.config)}  # fmt: skip
    (folder / "config.json").write_text(json.dumps(meta, indent=2) + "\n")


def read_component_config(path: str | Path, model: str, subfolder: str) -> tuple[Path, dict]:
    """Returns (component folder, config fields) of a converted `model` at `path` or path/subfolder."""
    folder = Path(path)
    if (folder / subfolder / "config.json").is_file():
        folder = folder / subfolder
    try:
        meta = json.loads((folder / "config.json").read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no config.json; is this a `radial-jax convert` output folder?") from None
    if meta.get("format") != FORMAT_PREFIX + model:
        raise CheckpointError(f"{folder}/config.json: format {meta.get('format')!r} is not "
                              f"{FORMAT_PREFIX + model!r}; convert the checkpoint first")  # fmt: skip
    if meta.get("version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{folder}: written by a newer radial-jax (format version {meta['version']})")
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in meta["config"].items()}
    return folder, fields


def load_component(folder: Path, abstract: nnx.Module) -> nnx.Module:
    """Returns `abstract` (an nnx.eval_shape'd module) filled from folder/model.safetensors,
    cast to its dtypes, one tensor at a time onto the default device."""
    shard = read_safetensors(Path(folder) / WEIGHTS_NAME)
    graphdef, state = nnx.split(abstract)
    flat = {".".join(map(str, path)): (path, var) for path, var in nnx.to_flat_state(state)}
    loaded, unexpected, mismatched = {}, [], []
    for name, info in shard.tensors.items():
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


def find_checkpoint(
    src: str | Path, *, subfolder: str, original_file: str, is_config: Callable[[dict], bool],
    weights_glob: str, what: str,
) -> tuple[list[Path], Path | None] | None:  # fmt: skip
    """Returns (checkpoint files, config.json or None) of one component in `src`, or None.

    src: a .pth or .safetensors file; the component's own folder (a config.json that
    `is_config` accepts, weights matching `weights_glob` or a .safetensors.index.json); a
    pipeline or converted folder holding it as `subfolder`/; or an original Wan2.1 folder
    holding `original_file`. `what` names the component in errors.
    """
    src = Path(src)
    if src.is_file():
        config = src.parent / "config.json"
        return [src], config if src.suffix == ".safetensors" and config.is_file() else None
    if not src.is_dir():
        raise CheckpointError(f"{src} does not exist")
    if (src / subfolder).is_dir():
        return find_checkpoint(src / subfolder, subfolder=subfolder, original_file=original_file,
                               is_config=is_config, weights_glob=weights_glob, what=what)
    if (src / original_file).is_file():
        return [src / original_file], None
    config = src / "config.json"
    if config.is_file() and is_config(json.loads(config.read_text())):
        files = sorted(src.glob("*.safetensors.index.json")) or sorted(src.glob(weights_glob))
        if not files:
            raise CheckpointError(f"{src}: a {what} config.json but no {weights_glob} files")
        return files, config
    return None


def load_model(path: str | Path, module_cls: type, config_cls: type, *, model: str, subfolder: str,
               dtype: str | None = None) -> nnx.Module:
    """Returns module_cls(config) with the weights converted into `path` (the component folder or
    a root holding `subfolder`/); dtype: param and compute dtype, default as converted."""
    folder, fields = read_component_config(path, model, subfolder)
    config = config_cls(**fields)
    if dtype is not None:
        config = dataclasses.replace(config, dtype=canonical_dtype(dtype))
    abstract = nnx.eval_shape(lambda: module_cls(config, rngs=nnx.Rngs(0)))
    return load_component(folder, abstract)
