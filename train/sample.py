"""Sample videos during training: the DiT with the LoRA as trained so far, through the generation
pipeline (models/wan/pipeline.py: denoise, then decode_video), every sample.every steps and at
the last step, written to run.out/samples/step-NNNNNN.mp4.

    sampler = Sampler(config, arch, dataset, mesh)            # text encoded, VAE loaded: once
    path = sampler(step, graphdef, lora, base)                # every process calls it

Everything that does not depend on the LoRA is fixed at the start: the text context (a cached
caption's, or sample.prompt encoded once, the text encoder then dropped), the noise (one seed,
so successive samples differ only by the training), the sampler schedule and the VAE. The DiT
runs on the weights where training placed them (sharded over the mesh), under the mesh like the
training step, through pipeline.denoise's jitted step with the config's attention plan: its
programs (one dense, one radial) compile at the first sample and are reused, as are the VAE
decode's. Nothing here writes to the training state, so a run's losses and LoRA are the same
with or without samples (tested). Several processes: all run the DiT (one SPMD program);
process 0 alone decodes and writes.
"""

from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from models.wan import WanConfig, pipeline
from train.config import TrainConfig
from train.data import LatentDataset
from train.step import get_global, put_global
from train.video import write_mp4

SAMPLES_DIR = "samples"


def sample_path(out: str | Path, step: int) -> Path:
    """Returns where the sample of `step` goes: OUT/samples/step-000NNN.mp4."""
    return Path(out) / SAMPLES_DIR / f"step-{step:06d}.mp4"


def sample_steps(every: int, start: int, last: int) -> list[int]:
    """Returns the steps in start+1 .. last that sample: multiples of `every`, and `last` (none if every is 0)."""
    if every == 0:
        return []
    return [s for s in range(start + 1, last + 1) if s % every == 0 or s == last]


class Sampler:
    """The sampling setup of one run (see the module docstring); checks its settings on creation,
    before the model is built, so that a bad one fails before anything compiles."""

    def __init__(self, config: TrainConfig, arch: WanConfig, dataset: LatentDataset, mesh: Mesh):
        section = config.sample
        self.frames = section.frames or config.data.frames
        self.height, self.width = section.height or config.data.height, section.width or config.data.width
        pipeline.check_video_size(self.frames, self.height, self.width, arch.patch_size)
        try:
            import imageio.v2  # noqa: F401  (checked now: a missing writer should not cost a run's first K steps)
            import imageio_ffmpeg  # noqa: F401
        except ImportError:
            raise ValueError("sample.every needs imageio and imageio-ffmpeg: pip install -e \".[train]\"") from None
        if not section.prompt and section.cache_index >= len(dataset):
            raise ValueError(f"sample.cache_index={section.cache_index} but the cache holds {len(dataset)} samples; "
                             "pick one of them or set sample.prompt")  # fmt: skip
        self.out, self.mesh, self.plan, self.guidance = Path(config.run.out), mesh, config.attention, section.guidance
        guided = section.guidance != 1.0
        vae, encode = _components(config, dataset, text=bool(section.prompt) or guided)
        texts = [section.prompt] * bool(section.prompt) + [pipeline.WAN_NEGATIVE_PROMPT] * guided
        encoded = np.asarray(encode(texts), np.float32) if texts else None  # [len(texts), text_len, D]
        context = encoded[:1] if section.prompt else dataset.load(section.cache_index, arch.text_len)["context"][None]
        replicated = NamedSharding(mesh, P())
        self.context = put_global(context, replicated)
        self.negative = put_global(encoded[-1:], replicated) if guided else None
        self.noise = np.asarray(pipeline.sampler_lib.initial_noise(
            section.seed, pipeline.latent_shape(self.frames, self.height, self.width, arch.out_dim)))  # fmt: skip
        self.schedule = pipeline.make_sampler(section.sampler, section.steps, config.objective.shift)
        self.vae = vae if jax.process_index() == 0 else None  # the others never decode

    def __call__(self, step: int, graphdef: nnx.GraphDef, lora: nnx.State, base: nnx.State,
                 on_step: Callable[[int, int, bool], None] | None = None) -> Path | None:  # fmt: skip
        """Generates with the DiT graphdef(lora, base); returns the video written (process 0) or None.
        on_step(step, num_steps, dense): after each sampling step (pipeline.denoise's)."""
        model = nnx.merge(graphdef, lora, base)  # wraps the training arrays; nothing is copied or donated
        noise = put_global(self.noise, NamedSharding(self.mesh, P()))  # a fresh copy: denoise consumes it
        with jax.set_mesh(self.mesh):
            latents = pipeline.denoise(model, self.schedule, noise, self.context, self.negative, self.guidance,
                                       plan=self.plan, on_step=on_step)  # fmt: skip
        latents = get_global(latents)  # every process joins; one decodes
        if self.vae is None:
            return None
        video = pipeline.decode_video(self.vae, jnp.asarray(latents))  # uint8 [frames, height, width, 3]
        path = sample_path(self.out, step)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_mp4(path, video, pipeline.FPS)
        return path


def _components(config: TrainConfig, dataset: LatentDataset, *, text: bool):
    """Returns (VAE, encode(texts) -> context [N, text_len, D] or None): the checkpoint's VAE and
    umT5 (umT5 loaded only when text is needed, and dropped once encode has run), or the tiny
    preset's seeded random ones, with the seed the cache was prepared with."""
    if not config.model.ckpt:
        described = dataset.manifest.get("config", {}).get("encoders") or {}
        seed = described.get("seed", config.model.seed) if described.get("preset") == "tiny" else config.model.seed
        components = pipeline.tiny_components(seed=seed)
        return components.vae, lambda texts: pipeline.encode_prompts(components.text_encoder, components.tokenizer,
                                                                     texts)  # fmt: skip
    from convert import umt5, wan_vae

    root = Path(config.model.ckpt)
    needed = [wan_vae.SUBFOLDER] + ([umt5.SUBFOLDER, umt5.TOKENIZER_SUBFOLDER] if text else [])
    missing = [name for name in needed if not (root / name).is_dir()]
    if missing:
        raise ValueError(f"sample.every: model.ckpt {root} has no {', '.join(m + '/' for m in missing)} (convert the "
                         "whole Wan2.1 folder), or set sample.every=0" +
                         ("; with sample.guidance=1 and no sample.prompt only the VAE is needed" if text else ""))
    if not text:
        return wan_vae.load_vae(root), None
    from train.cache import load_encoders

    encoders = load_encoders(root, dtype=config.model.dtype)
    return encoders.vae, lambda texts: pipeline.encode_prompts(encoders.text_encoder, encoders.tokenizer, texts)
