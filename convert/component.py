"""One component (the DiT, the VAE, the umT5 or CLIP encoder) converted by a name table into our format.

`plan_component` checks a table of Rows (convert/transforms.py) against the source tensors
(convert/io.py shards) and against the abstract module (nnx.eval_shape: no memory), raising
one CheckpointError that lists every missing and unexpected name and every shape or dtype
mismatch before anything is written. `write_component` then streams the tensors one at a time
into the folder (convert/checkpoint.py's format), one output file per source file; each
component's loader reads them back through checkpoint.load_model. `convert_component` runs
find -> plan -> write for one component into a new folder.
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

from convert.checkpoint import FORMAT_PREFIX, WEIGHTS_NAME, mismatch_report, staged_directory, write_metadata
from convert.io import CheckpointError, SafetensorsWriter, Shard, TensorInfo, iter_tensor_infos
from convert.transforms import Row, source_shape, transformed_shape

Found = tuple[list[Path], Path | None]  # (checkpoint files, config.json or None)


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
            expected = source_shape(row.transform, want.shape) or f"{want.shape} after {row.transform.__name__}"
            mismatched.append((row.source, f"{expected} float (for our {row.target} {want.shape})",
                               f"{info.shape} {info.dtype}"))  # fmt: skip
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
    """Streams the planned tensors into `folder` and writes its config.json: one safetensors
    file per source file (model.safetensors for one, else model-0000i-of-0000n.safetensors and
    their index), so a 14B DiT converts in a few GB of RAM."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    per_source: dict[Path, list[Entry]] = {}
    for entry in plan.entries:
        per_source.setdefault(entry.shard.path, []).append(entry)
    weight_map = {}
    with tqdm(total=len(plan.entries), unit="tensor", disable=not progress, desc=folder.name) as bar:
        for i, entries in enumerate(per_source.values(), start=1):
            name = WEIGHTS_NAME if len(per_source) == 1 else f"model-{i:05d}-of-{len(per_source):05d}.safetensors"
            bar.set_postfix_str(f"{entries[0].shard.path.name} -> {name}")
            writer = SafetensorsWriter(folder / name, {e.row.target: e.info for e in entries},
                                       metadata={"format": FORMAT_PREFIX + plan.model})  # fmt: skip
            for e in entries:
                writer.write(e.row.target, np.ascontiguousarray(e.row.transform(e.shard.read(e.row.source)), e.info.dtype))
                weight_map[e.row.target] = name
                bar.update(1)
            writer.close()
    write_metadata(folder, plan.model, plan.config, plan.source, weight_map if len(per_source) > 1 else None)


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


def convert_component(src: str | Path, dst: str | Path, *, find: Callable[[Path], Found | None],
                      plan: Callable[[Sequence[Path], Path | None, str], ComponentPlan], dtype: str, what: str,
                      looked_for: str, progress: bool = False) -> Path:  # fmt: skip
    """Converts the component `find` locates in `src` into the new folder `dst`; returns dst.

    plan(files, config_path, dtype) checks every name and shape before anything is written;
    dst appears only when complete. what, looked_for: the component and what `find` looks
    for, named in the error when nothing is found.
    """
    found = find(Path(src))
    if found is None:
        raise CheckpointError(f"{src}: no {what} found (looked for {looked_for})")
    component = plan(*found, dtype)
    with staged_directory(Path(dst)) as staging:
        write_component(component, staging, progress=progress)
    return Path(dst)
