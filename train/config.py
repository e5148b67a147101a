"""The training configuration: one frozen TrainConfig read from TOML, with `--set` overrides.

    config = load_config("train/configs/tiny.toml", ["optim.learning_rate=3e-4", "run.steps=20"])

A TOML file has one table per section ([model], [lora], [objective], [attention], [data],
[optim], [run], [sample]); every key is a field of that section's dataclass, and anything missing keeps
its default. An override is "section.key=value" with a TOML value (`lora.targets=["blocks.*.ffn.0"]`);
a bare word that is not TOML is taken as a string (`data.cache=/data/cache`). A field that is itself a
dataclass (attention.tuning, the kernels' KernelTuning) is a sub-table applied over its current value:
`attention.tuning.mosaic_bwd.fused=false` keeps every other field of the default. An unknown section
or key is an error naming the valid ones. The config is stored with every checkpoint
(to_dict/from_dict) so a resumed run can check it continues the same training.
"""

import dataclasses
import sys
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from radial_jax.plan import RadialPlan
from train.lora import LoraConfig
from train.objective import FlowMatching

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

DTYPES = ("float32", "bfloat16")
SAMPLERS = ("unipc", "euler")  # models/wan/pipeline.py's Wan schedules (its distilled one takes timesteps)
CONFIGS_DIR = Path(__file__).parent / "configs"


@dataclasses.dataclass(frozen=True)
class ModelSection:
    """The base DiT. ckpt: a folder written by `radial-jax convert`; empty: the tiny preset's
    random DiT (the one `radial-jax generate` uses without --ckpt, seeded by `seed`).
    dtype: storage and compute dtype of the frozen base weights (bfloat16 for real runs;
    the LoRA factors and optimizer state are float32 either way)."""

    ckpt: str = ""
    dtype: str = "bfloat16"
    seed: int = 0

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"model.dtype={self.dtype!r} must be one of {DTYPES}")


@dataclasses.dataclass(frozen=True)
class DataSection:
    """The latent cache (`radial-jax prepare --out CACHE`) and the video size it must hold.
    batch_size: global samples a step (over all devices and hosts); seed: the data order."""

    cache: str = ""
    frames: int = 81
    height: int = 480
    width: int = 832
    batch_size: int = 1
    seed: int = 0
    prefetch: int = 2

    def __post_init__(self):
        if self.batch_size < 1:
            raise ValueError(f"data.batch_size={self.batch_size} must be >= 1")


@dataclasses.dataclass(frozen=True)
class OptimSection:
    """AdamW on the LoRA factors: linear warmup to learning_rate over warmup_steps, cosine
    decay to min_lr_ratio * learning_rate at run.steps; gradients clipped to global norm
    grad_clip (0: off); accumulate: micro-batches summed per optimizer step."""

    learning_rate: float = 1e-4
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.01
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    grad_clip: float = 1.0
    accumulate: int = 1

    def __post_init__(self):
        if self.learning_rate <= 0:
            raise ValueError(f"optim.learning_rate={self.learning_rate} must be positive")
        if self.accumulate < 1 or self.warmup_steps < 0:
            raise ValueError("optim.accumulate must be >= 1 and optim.warmup_steps >= 0")


@dataclasses.dataclass(frozen=True)
class RunSection:
    """steps: optimizer steps in all; out: the run folder (checkpoints/, logs); remat:
    jax.checkpoint each block; mesh: e.g. "data=2,fsdp=4" (empty: every device on fsdp);
    save_every/keep: checkpoint interval and how many to keep; log_every: metrics interval."""

    steps: int = 1000
    out: str = "runs/train"
    seed: int = 0
    remat: bool = True
    mesh: str = ""
    save_every: int = 100
    keep: int = 3
    log_every: int = 10

    def __post_init__(self):
        if self.steps < 1 or self.save_every < 1 or self.keep < 1 or self.log_every < 1:
            raise ValueError("run.steps, run.save_every, run.keep and run.log_every must be >= 1")


@dataclasses.dataclass(frozen=True)
class SampleSection:
    """A video generated with the LoRA as trained so far, every `every` steps and at the last
    step (0: never), written to run.out/samples/step-NNNNNN.mp4 (train/sample.py).
    prompt: encoded once at the start with the checkpoint's umT5 (tiny: the tiny preset's); empty:
    the cached text context of sample `cache_index` (manifest order), a caption trained on.
    steps/sampler/guidance/seed: as `radial-jax generate` (guidance != 1 encodes Wan's negative
    prompt once; the seed's noise is the same at every sample, so they differ only by the LoRA);
    the shift is objective.shift. frames/height/width: 0 takes data's (the trained length)."""

    every: int = 0
    prompt: str = ""
    cache_index: int = 0
    steps: int = 20
    sampler: str = "unipc"
    guidance: float = 5.0
    seed: int = 0
    frames: int = 0
    height: int = 0
    width: int = 0

    def __post_init__(self):
        if self.every < 0 or self.steps < 1 or self.cache_index < 0 or min(self.frames, self.height, self.width) < 0:
            raise ValueError("sample.every, sample.cache_index, sample.frames/height/width must be >= 0 and "
                             "sample.steps >= 1")  # fmt: skip
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sample.sampler={self.sampler!r} must be one of {SAMPLERS}")
        if not self.guidance >= 0:
            raise ValueError(f"sample.guidance={self.guidance} must be >= 0 (1: no negative prompt pass)")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything a training run depends on; see the module docstring."""

    model: ModelSection = ModelSection()
    lora: LoraConfig = LoraConfig()
    objective: FlowMatching = FlowMatching()
    attention: RadialPlan = RadialPlan()
    data: DataSection = DataSection()
    optim: OptimSection = OptimSection()
    run: RunSection = RunSection()
    sample: SampleSection = SampleSection()

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Returns {section: {key: value}} (JSON- and TOML-ready; tuples become lists)."""
        return {f.name: _plain(dataclasses.asdict(getattr(self, f.name))) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, sections: Mapping[str, Mapping[str, Any]]) -> "TrainConfig":
        """Returns the config of {section: {key: value}}; an unknown section or key is an error
        naming the valid ones."""
        types = {f.name: f.type for f in dataclasses.fields(cls)}
        unknown = sorted(set(sections) - set(types))
        if unknown:
            raise ValueError(f"unknown config section(s) {unknown}; valid sections: {', '.join(types)}")
        return cls(**{name: _section(name, types[name], values) for name, values in sections.items()})


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> TrainConfig:
    """Returns the TrainConfig of a TOML file (None: all defaults) with "section.key=value"
    overrides applied in order. A bare name ("tiny") is one of the shipped train/configs/."""
    sections: dict[str, dict[str, Any]] = {}
    if path is not None:
        path = _resolve(path)
        try:
            sections = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"config {path}: not valid TOML ({e})") from None
        if any(not isinstance(v, dict) for v in sections.values()):
            raise ValueError(f"config {path}: every key belongs in a [section]; sections: {', '.join(_SECTIONS)}")
    for override in overrides:
        key, sep, raw = override.partition("=")
        section, dot, name = key.strip().partition(".")
        if not sep or not dot or not name:
            raise ValueError(f"--set {override!r} must be section.key=value, e.g. optim.learning_rate=1e-4")
        table = sections.setdefault(section, {})
        *tables, name = name.split(".")  # attention.tuning.mosaic_bwd.fused: a key of a sub-table
        for sub in tables:
            table = table.setdefault(sub, {})
            if not isinstance(table, dict):
                raise ValueError(f"--set {override!r}: {section}.{sub} is not a table")
        table[name] = _parse_value(raw.strip())
    return TrainConfig.from_dict(sections)


def shipped_configs() -> list[str]:
    """Returns the names of the shipped configs (train/configs/*.toml)."""
    return sorted(p.stem for p in CONFIGS_DIR.glob("*.toml"))


_SECTIONS = tuple(f.name for f in dataclasses.fields(TrainConfig))


def _resolve(path: str | Path) -> Path:
    path = Path(path)
    if path.is_file():
        return path
    shipped = CONFIGS_DIR / f"{path.name}.toml"
    if path.suffix != ".toml" and path.parent == Path(".") and shipped.is_file():
        return shipped
    raise ValueError(f"config {path}: no such file (shipped configs: {', '.join(shipped_configs())})")


def _parse_value(raw: str) -> Any:
    """Returns the TOML value of `raw`, or `raw` itself when it is not TOML (an unquoted path)."""
    try:
        return tomllib.loads(f"value = {raw}")["value"]
    except tomllib.TOMLDecodeError:
        return raw


def _section(name: str, cls: type, values: Mapping[str, Any], base: Any = None) -> Any:
    """Returns the dataclass cls of a table: its keys over base's fields (None: cls's defaults). A key
    whose field is itself a dataclass (attention.tuning, a KernelTuning) takes a sub-table, applied over
    that field's current value, so `[attention.tuning.mosaic_bwd]` with `fused = false` changes only that
    field of the default backward."""
    if not isinstance(values, Mapping):
        raise ValueError(f"config section [{name}] must be a table of keys")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ValueError(f"unknown key(s) {', '.join(f'{name}.{k}' for k in unknown)}; valid keys of [{name}]: "
                         f"{', '.join(fields)}")  # fmt: skip
    hints = typing.get_type_hints(cls)
    base = cls() if base is None else base
    changes = {}
    for key, value in values.items():
        inner = _dataclass_of(hints[key])
        if inner is not None and isinstance(value, Mapping):
            current = getattr(base, key)
            changes[key] = _section(f"{name}.{key}", inner, value, current if isinstance(current, inner) else None)
        else:
            changes[key] = _coerce(f"{name}.{key}", hints[key], value)
    return dataclasses.replace(base, **changes)


def _dataclass_of(hint: Any) -> type | None:
    """The dataclass a field holds (`KernelTuning | None` -> KernelTuning), or None for other fields."""
    for candidate in (hint, *typing.get_args(hint)):
        if isinstance(candidate, type) and dataclasses.is_dataclass(candidate):
            return candidate
    return None


def _coerce(key: str, hint: Any, value: Any) -> Any:
    """Returns value as the field's type (int -> float, list -> tuple); a wrong type is an error."""
    origin = typing.get_origin(hint)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool):
        if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
            raise ValueError(f"{key}={value!r} must be a {hint.__name__}")
        return value
    if origin is tuple or (isinstance(value, list) and tuple in typing.get_args(hint)):
        return tuple(value) if isinstance(value, (list, tuple)) else (value,)
    return tuple(value) if isinstance(value, list) else value


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value
