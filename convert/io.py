"""Streaming tensor I/O: safetensors shards (with .index.json) and PyTorch .pth files, read one
tensor at a time from a memory map; and a safetensors writer that streams tensors to disk.

Nothing here holds more than one tensor beyond the mapped file: a 57 GB checkpoint converts in
the memory of one tensor plus page cache. Truncated or corrupt files raise CheckpointError
naming the file and what is wrong.
"""

import dataclasses
import json
import mmap
import os
import struct
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import ml_dtypes
import numpy as np

HEADER_LENGTH_BYTES = 8  # safetensors: little-endian u64 header size, then JSON, then data
MAX_HEADER_BYTES = 100 << 20  # a header larger than this is corruption, not metadata
SAFETENSORS_DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or converted; the message says what and where."""


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    dtype: np.dtype


@dataclasses.dataclass
class Shard:
    """One file of a checkpoint: its tensors' shapes and dtypes, and a reader for each."""

    path: Path
    tensors: dict[str, TensorInfo]
    read: Callable[[str], np.ndarray]
    metadata: dict[str, str] = dataclasses.field(default_factory=dict)  # safetensors __metadata__


# ---------------------------------------------------------------- safetensors


def _safetensors_header(path: Path) -> tuple[dict, int, dict[str, str]]:
    """Returns (header without __metadata__, byte offset of the data section, __metadata__)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(HEADER_LENGTH_BYTES)
        if len(head) < HEADER_LENGTH_BYTES:
            raise CheckpointError(f"{path}: truncated ({size} bytes): no safetensors header")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > MAX_HEADER_BYTES or HEADER_LENGTH_BYTES + header_len > size:
            raise CheckpointError(f"{path}: truncated or not safetensors: header of {header_len} bytes, "
                                  f"file of {size} bytes")
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
    metadata = header.pop("__metadata__", None) or {}
    data_start = HEADER_LENGTH_BYTES + header_len
    needed = data_start + max((v["data_offsets"][1] for v in header.values()), default=0)
    if size < needed:
        raise CheckpointError(f"{path}: truncated: the header needs {needed} bytes, the file has {size} "
                              f"(an interrupted download? fetch it again)")
    return header, data_start, metadata


def read_safetensors(path: Path) -> Shard:
    """Returns the shard of one .safetensors file; tensors are read lazily from a memory map."""
    path = Path(path)
    header, data_start, metadata = _safetensors_header(path)
    tensors = {}
    for name, entry in header.items():
        if entry["dtype"] not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"{path}: tensor {name} has unsupported dtype {entry['dtype']}")
        tensors[name] = TensorInfo(tuple(entry["shape"]), SAFETENSORS_DTYPES[entry["dtype"]])
    mapped = {}

    def read(name: str) -> np.ndarray:
        if "map" not in mapped:
            with open(path, "rb") as f:
                mapped["map"] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        begin, end = header[name]["data_offsets"]
        info = tensors[name]
        count = int(np.prod(info.shape, dtype=np.int64))
        if end - begin != count * info.dtype.itemsize:
            raise CheckpointError(f"{path}: tensor {name} spans {end - begin} bytes, its shape "
                                  f"{info.shape} and dtype need {count * info.dtype.itemsize}")
        return np.frombuffer(mapped["map"], info.dtype, count, data_start + begin).reshape(info.shape)

    return Shard(path, tensors, read, metadata)


def read_index(index_path: Path) -> list[Shard]:
    """Returns the shards named by a safetensors .index.json, in file-name order."""
    index_path = Path(index_path)
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index_path}: not a safetensors index (needs a weight_map): {e}") from None
    files = sorted(set(weight_map.values()))
    absent = [f for f in files if not (index_path.parent / f).is_file()]
    if absent:
        raise CheckpointError(f"{index_path}: shard files missing beside it: {absent}")
    shards = [read_safetensors(index_path.parent / f) for f in files]
    for shard in shards:
        listed = {k for k, f in weight_map.items() if f == shard.path.name}
        if not listed <= set(shard.tensors):
            raise CheckpointError(f"{shard.path}: tensors listed in the index are not in the file: "
                                  f"{sorted(listed - set(shard.tensors))[:10]}")
    return shards


# ---------------------------------------------------------------- .pth


def read_pth(path: Path) -> Shard:
    """Returns the shard of a torch.save'd state dict (memory-mapped where the file allows)."""
    path = Path(path)
    try:
        import torch
    except ImportError:
        raise CheckpointError(f"{path}: reading .pth needs torch (pip install -e \".[torch]\"; the CPU build "
                              "is enough), or convert the safetensors files instead") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as e:
        if "mmap" not in str(e):
            raise CheckpointError(f"{path}: cannot read as a PyTorch checkpoint (truncated or corrupt?): {e}") from None
        state = torch.load(path, map_location="cpu", weights_only=True)  # legacy format: no mmap
    except Exception as e:  # torch raises several types for a damaged zip
        raise CheckpointError(f"{path}: cannot read as a PyTorch checkpoint (truncated or corrupt?): {e}") from None
    state = _unwrap_state_dict(state, path)
    tensors = {k: TensorInfo(tuple(t.shape), _numpy_dtype(t.dtype)) for k, t in state.items()}

    def read(name: str) -> np.ndarray:
        tensor = state[name].detach().contiguous()
        if tensor.dtype == torch.bfloat16:  # numpy has no bfloat16: reinterpret the bits
            return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return tensor.numpy()

    return Shard(path, tensors, read)


def _unwrap_state_dict(state, path: Path) -> Mapping:
    import torch

    if isinstance(state, Mapping) and len(state) == 1:
        (key, inner), = state.items()
        if key in ("state_dict", "model", "module") and isinstance(inner, Mapping):
            state = inner
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{path}: holds a {type(state).__name__}, not a state dict")
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path}: entries that are not tensors: {bad[:10]}")
    return state


def _numpy_dtype(torch_dtype) -> np.dtype:
    import torch

    if torch_dtype == torch.bfloat16:
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(torch.empty((), dtype=torch_dtype).numpy().dtype)


# ---------------------------------------------------------------- sources


def open_shards(files: Sequence[Path]) -> list[Shard]:
    """Returns the shards of the given files: one .index.json, .safetensors files, or one .pth."""
    files = [Path(f) for f in files]
    if len(files) == 1 and files[0].name.endswith(".index.json"):
        return read_index(files[0])
    if all(f.suffix == ".safetensors" for f in files):
        return [read_safetensors(f) for f in sorted(files)]
    if len(files) == 1 and files[0].suffix in (".pth", ".pt", ".bin", ".ckpt"):
        return [read_pth(files[0])]
    raise CheckpointError(f"cannot read {[str(f) for f in files]}: expected one .index.json, "
                          ".safetensors files, or one .pth")


def iter_tensor_infos(shards: Sequence[Shard]) -> Iterator[tuple[str, TensorInfo, Shard]]:
    """Yields (name, info, shard) for every tensor; a name in two shards is an error."""
    seen = {}
    for shard in shards:
        for name, info in shard.tensors.items():
            if name in seen:
                raise CheckpointError(f"tensor {name} is in both {seen[name]} and {shard.path}")
            seen[name] = shard.path
            yield name, info, shard


# ---------------------------------------------------------------- writing


class SafetensorsWriter:
    """Writes one .safetensors file whose tensor names, shapes and dtypes are declared up front,
    then streams each tensor's bytes in declaration order (one tensor in memory at a time)."""

    def __init__(self, path: Path, specs: Mapping[str, TensorInfo], metadata: Mapping[str, str] | None = None):
        self.path = Path(path)
        self.order = list(specs)
        self.specs = dict(specs)
        header, offset = {"__metadata__": dict(metadata or {})}, 0
        for name in self.order:
            info = self.specs[name]
            nbytes = int(np.prod(info.shape, dtype=np.int64)) * info.dtype.itemsize
            header[name] = {"dtype": DTYPE_NAMES[info.dtype], "shape": list(info.shape),
                            "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # the format aligns the data section to 8 bytes
        self.file = open(self.path, "wb")
        self.file.write(struct.pack("<Q", len(encoded)) + encoded)
        self.next = 0

    def write(self, name: str, array: np.ndarray) -> None:
        expected = self.order[self.next] if self.next < len(self.order) else None
        info = self.specs.get(expected)
        if name != expected or (array.shape, array.dtype) != (info.shape, info.dtype):
            want = f"{expected} {info.shape} {info.dtype}" if info else "no more tensors"
            raise CheckpointError(f"{self.path}: writing {name} {array.shape} {array.dtype}, expected {want}")
        self.file.write(np.ascontiguousarray(array).reshape(-1).view(np.uint8).data)
        self.next += 1

    def close(self) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())  # the caller renames the folder into place next
        self.file.close()
        if self.next != len(self.order):
            raise CheckpointError(f"{self.path}: closed after {self.next} of {len(self.order)} tensors")
