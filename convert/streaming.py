"""Table-driven, streaming conversion of PyTorch checkpoints into our parameter trees.

A converter is a list of `Rule`s (source name, our dotted parameter path, named transform) read
top to bottom. `convert_tree` checks the whole table against the source's names and shapes and
the target's abstract state (nnx.eval_shape: no memory) before writing anything, raising one
ValueError that lists every missing and unexpected name and every shape or dtype mismatch.
Tensors then stream one at a time: sources are memory-mapped (safetensors) or opened with
torch.load(mmap=True) (.pth), and the output safetensors file is written tensor by tensor from
a header computed up front, so peak memory is one tensor, never a whole file. Output goes to a
temporary folder renamed into place at the end: a crash leaves no half-written checkpoint.

An output folder holds config.json ({"model": ..., "config": {...}}) and model.safetensors
(keys: our dotted parameter paths).
"""

import dataclasses
import json
import os
import shutil
import struct
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
from flax import nnx

MAX_LISTED = 40  # problems listed per kind in one error message
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"

_SAFETENSORS_DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}  # fmt: skip
_SAFETENSORS_NAMES = {dtype: name for name, dtype in _SAFETENSORS_DTYPES.items()}


# Named transforms, PyTorch layout -> ours. Each returns a view where it can (transposes), so
# the shape check runs them on zero-stride placeholders without allocating.
def identity(w: np.ndarray) -> np.ndarray:
    return w


def linear(w: np.ndarray) -> np.ndarray:
    """nn.Linear weight (out, in) -> (in, out)."""
    return w.T


def conv3d(w: np.ndarray) -> np.ndarray:
    """nn.Conv3d weight (O, I, t, h, w) -> (t, h, w, I, O)."""
    return w.transpose(2, 3, 4, 1, 0)


def conv2d(w: np.ndarray) -> np.ndarray:
    """nn.Conv2d weight (O, I, h, w) -> (h, w, I, O)."""
    return w.transpose(2, 3, 1, 0)


def conv1x1_to_linear(w: np.ndarray) -> np.ndarray:
    """nn.Conv2d 1x1 weight (O, I, 1, 1) -> (I, O) (a larger window shows up as a shape mismatch)."""
    return w.reshape(w.shape[0], -1).T


def vector(w: np.ndarray) -> np.ndarray:
    """A broadcastable per-channel vector (C, 1, 1[, 1]) -> (C,)."""
    return w.reshape(-1)


@dataclasses.dataclass(frozen=True)
class Rule:
    source: str  # name in the PyTorch state dict
    target: str  # our dotted parameter path, e.g. "decoder.upsamples.3.kernel"
    transform: Callable[[np.ndarray], np.ndarray] = identity


class SafetensorsSource:
    """Lazy name -> numpy reader over one .safetensors file or every one in a folder (shards)."""

    def __init__(self, path: str | os.PathLike):
        path = Path(path)
        files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
        if not files:
            raise FileNotFoundError(f"no .safetensors files in {path}")
        self._entries = {}  # name -> (file, data offset, dtype, shape)
        for file in files:
            with open(file, "rb") as f:
                (header_len,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(header_len))
            header.pop("__metadata__", None)
            for name, info in header.items():
                if name in self._entries:
                    raise ValueError(
                        f"{name} is in both {self._entries[name][0].name} and {file.name}; "
                        "pass the one file to convert (e.g. not an .fp16 variant beside it)"
                    )
                if info["dtype"] not in _SAFETENSORS_DTYPES:
                    raise ValueError(f"{file}: tensor {name} has unsupported dtype {info['dtype']}")
                begin, end = info["data_offsets"]
                dtype = _SAFETENSORS_DTYPES[info["dtype"]]
                self._entries[name] = (file, 8 + header_len + begin, end - begin, dtype, tuple(info["shape"]))

    def names(self) -> list[str]:
        return list(self._entries)

    def shape_dtype(self, name: str) -> tuple[tuple[int, ...], np.dtype]:
        return self._entries[name][4], self._entries[name][3]

    def read(self, name: str) -> np.ndarray:
        file, offset, size, dtype, shape = self._entries[name]
        if size == 0:
            return np.zeros(shape, dtype)
        return np.memmap(file, np.uint8, "r", offset=offset, shape=(size,)).view(dtype).reshape(shape)


class TorchSource:
    """Lazy name -> numpy reader over a PyTorch .pth state dict (torch.load with mmap)."""

    def __init__(self, path: str | os.PathLike):
        try:
            import torch
        except ImportError as e:
            raise ImportError(f"reading {path} needs PyTorch: pip install torch (CPU build is enough)") from e
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ValueError(f"{path} is not a flat PyTorch state dict of tensors")
        self._torch = torch
        self._state = state

    def names(self) -> list[str]:
        return list(self._state)

    def shape_dtype(self, name: str) -> tuple[tuple[int, ...], np.dtype]:
        tensor = self._state[name]
        if tensor.dtype == self._torch.bfloat16:
            return tuple(tensor.shape), np.dtype(ml_dtypes.bfloat16)
        return tuple(tensor.shape), np.dtype(str(tensor.dtype).removeprefix("torch."))

    def read(self, name: str) -> np.ndarray:
        tensor = self._state[name]
        if tensor.dtype == self._torch.bfloat16:  # numpy has no bfloat16: reinterpret the bits
            return tensor.view(self._torch.int16).numpy().view(ml_dtypes.bfloat16)
        return tensor.numpy()


def open_source(path: str | os.PathLike) -> SafetensorsSource | TorchSource:
    """Returns a lazy reader for a .pth/.pt/.bin state dict, a .safetensors file or a folder of them."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if path.is_dir() or path.suffix == ".safetensors":
        return SafetensorsSource(path)
    if path.suffix in (".pth", ".pt", ".bin"):
        return TorchSource(path)
    raise ValueError(f"{path}: expected a .pth/.pt/.bin file, a .safetensors file or a folder of them")


def target_specs(abstract: nnx.Module) -> dict[str, jax.ShapeDtypeStruct]:
    """Returns our dotted parameter paths -> shape and dtype of an nnx.eval_shape'd module."""
    return {
        ".".join(map(str, path)): jax.ShapeDtypeStruct(var.get_value().shape, var.get_value().dtype)
        for path, var in nnx.to_flat_state(nnx.state(abstract, nnx.Param))
    }


def check_rules(source, rules: list[Rule], specs: dict, *, ignored: Iterable[str] = (), what: str = "") -> None:
    """Raises one ValueError listing every problem of `rules` mapping `source` onto `specs`."""
    names = set(source.names())
    used = {rule.source for rule in rules}
    missing = [rule.source for rule in rules if rule.source not in names]
    unexpected = sorted(names - used - set(ignored))
    targets = [rule.target for rule in rules]
    uncovered = sorted(set(specs) - set(targets))
    unknown = [t for t in targets if t not in specs]
    doubled = sorted({t for t in targets if targets.count(t) > 1})
    mismatched = []
    for rule in rules:
        if rule.source not in names or rule.target not in specs:
            continue
        shape, dtype = source.shape_dtype(rule.source)
        placeholder = np.lib.stride_tricks.as_strided(np.zeros(1, np.int8), shape, (0,) * len(shape))
        try:
            shape_ours = rule.transform(placeholder).shape
        except ValueError as e:
            shape_ours = f"untransformable ({e})"
        if shape_ours != specs[rule.target].shape:
            mismatched.append(
                f"{rule.source} {shape} -> {rule.target}: {rule.transform.__name__} gives {shape_ours}, "
                f"expected {specs[rule.target].shape}"
            )
        elif not np.issubdtype(dtype, np.floating) and not dtype == ml_dtypes.bfloat16:
            mismatched.append(f"{rule.source}: dtype {dtype} is not floating point")
    problems = [
        _listing("missing from the source", missing),
        _listing("unexpected in the source", unexpected),
        _listing("shape or dtype mismatches", mismatched),
        _listing("parameters of ours no rule fills", uncovered),
        _listing("rule targets that are not parameters of ours", unknown),
        _listing("parameters filled twice", doubled),
    ]
    problems = [p for p in problems if p]
    if problems:
        hint = f" Is the source a {what} checkpoint with this config?" if what else ""
        raise ValueError(f"cannot convert {what or 'checkpoint'}:{hint}\n" + "\n".join(problems))


def _listing(title: str, items: list[str]) -> str:
    if not items:
        return ""
    shown = "\n    ".join(items[:MAX_LISTED])
    more = f"\n    ... and {len(items) - MAX_LISTED} more" if len(items) > MAX_LISTED else ""
    return f"  {len(items)} {title}:\n    {shown}{more}"


def convert_tree(
    source, rules: list[Rule], abstract: nnx.Module, dst, *, model: str, config, ignored=(), overwrite=False
) -> Path:
    """Checks `rules`, then streams the converted tensors into dst/model.safetensors; returns dst.

    abstract: our module under nnx.eval_shape, built with the target dtype. config: a dataclass
    written to dst/config.json with `model` so `read_config` can rebuild it.
    """
    dst = Path(dst)
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst} exists; remove it or pass overwrite=True")
    specs = target_specs(abstract)
    check_rules(source, rules, specs, ignored=ignored, what=model)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.partial-", dir=dst.parent))
    try:
        layout = [(rule.target, specs[rule.target]) for rule in rules]
        arrays = (np.asarray(rule.transform(source.read(rule.source)), specs[rule.target].dtype) for rule in rules)
        write_safetensors(tmp / WEIGHTS_FILE, layout, arrays)
        config_json = {"model": model, "config": dataclasses.asdict(config)}
        (tmp / CONFIG_FILE).write_text(json.dumps(config_json, indent=2) + "\n")
        if dst.exists():
            shutil.rmtree(dst)
        tmp.rename(dst)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return dst


def write_safetensors(path, layout: list[tuple[str, jax.ShapeDtypeStruct]], arrays: Iterable[np.ndarray]) -> None:
    """Writes a safetensors file tensor by tensor; layout fixes names, order, shapes and dtypes."""
    header, offset = {}, 0
    for name, spec in layout:
        size = int(np.prod(spec.shape)) * np.dtype(spec.dtype).itemsize
        header[name] = {"dtype": _SAFETENSORS_NAMES[np.dtype(spec.dtype)], "shape": list(spec.shape),
                        "data_offsets": [offset, offset + size]}  # fmt: skip
        offset += size
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)  # 8-byte aligned data, as the spec recommends
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header_bytes)) + header_bytes)
        for (name, spec), array in zip(layout, arrays, strict=True):
            if array.shape != spec.shape or array.dtype != spec.dtype:
                raise ValueError(f"{name}: got {array.dtype}{array.shape}, layout says {spec.dtype}{spec.shape}")
            f.write(np.ascontiguousarray(array).tobytes())


def read_config(folder, model: str) -> dict:
    """Returns the config dict of a converted folder, checking it holds `model`."""
    path = Path(folder) / CONFIG_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: convert the checkpoint first")
    meta = json.loads(path.read_text())
    if meta.get("model") != model:
        raise ValueError(f"{folder} holds a {meta.get('model')!r} checkpoint, not {model!r}")
    return {k: tuple(v) if isinstance(v, list) else v for k, v in meta["config"].items()}


def load_tree(folder, abstract: nnx.Module, model: str) -> nnx.Module:
    """Returns `abstract` (an nnx.eval_shape'd module) filled from folder/model.safetensors."""
    source = SafetensorsSource(Path(folder) / WEIGHTS_FILE)
    specs = target_specs(abstract)
    check_rules(source, [Rule(name, name) for name in specs], specs, what=model)
    graphdef, state = nnx.split(abstract)
    flat = []
    for path, var in nnx.to_flat_state(state):
        name = ".".join(map(str, path))
        if name in specs:
            array = source.read(name)
            if array.dtype != specs[name].dtype:
                raise ValueError(f"{folder}: {name} is {array.dtype}, the config says {specs[name].dtype}")
            var = var.replace(jax.numpy.asarray(array))
        flat.append((path, var))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))
