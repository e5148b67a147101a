"""Wan2.1 video generation from built modules: prompts -> umT5 context, seeded noise, a flow
sampler with classifier-free guidance (one jitted step), VAE decode -> uint8 frames.

    components = convert.load_pipeline("wan-1.3b", dtype="bf16")   # or tiny_components()
    video = generate(components, "a cat surfing", frames=81, height=480, width=832)  # uint8 [81, 480, 832, 3]

Nothing here reads files or prints: the caller loads the modules and shows progress through
`on_step(step, num_steps, dense)` and `on_stage(name, seconds)`. As Wan2.1 (wan/text2video.py, image2video.py): the negative
prompt defaults to Wan's; guidance runs the DiT twice per step (cond, then uncond; no second
pass at guidance 1); I2V conditions on CLIP features of the image and on y = 4 mask channels
(1 on the first latent frame) + the VAE latents of the image followed by black frames. The
noise comes from jax.random, so a seed does not reproduce the original's torch noise.
"""

import dataclasses
import functools
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Float, UInt8

from models import clip as clip_lib
from models import t5
from models.wan import sampler as sampler_lib
from models.wan import vae as vae_lib
from models.wan.config import WAN_TINY
from models.wan.transformer import WanModel
from radial_jax.plan import RadialPlan

# Wan2.1's default negative prompt (wan/configs/shared_config.py, sample_neg_prompt).
WAN_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，"
    "JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，"
    "手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)
FPS = 16  # Wan2.1's sample_fps
SAMPLERS = ("unipc", "euler", "distilled")  # distilled: flow Euler at a step-distilled model's timesteps
I2V_MASK_CHANNELS = 4  # y's leading channels: 1 where the frame is given (the first latent frame)
BYTE_OFFSET = 3  # byte tokenizer: ids 0 pad, 1 EOS, 2 unk (umT5's), then the 256 byte values

StepCallback = Callable[[int, int, bool], None]
StageCallback = Callable[[str, float], None]  # (what finished, seconds it took on the device)


@dataclasses.dataclass
class Components:
    """The modules of one Wan2.1 checkpoint and the DiT's attention plan (None: dense). Mutable
    so that generate(free_text_encoder=True) can drop the text encoder (its device memory is
    freed once nothing else refers to it)."""

    dit: WanModel
    vae: vae_lib.WanVAE
    text_encoder: t5.UMT5Encoder | None
    tokenizer: t5.Tokenizer
    image_encoder: clip_lib.CLIPVisionEncoder | None = None  # I2V only
    plan: RadialPlan | None = None


def check_video_size(frames: int, height: int, width: int, patch: Sequence[int] = (1, 2, 2)) -> None:
    """Raises ValueError (one line saying what to pass) unless frames is 4k+1 and height/width
    are multiples of 8 * the DiT's spatial patch (16 for Wan2.1)."""
    if frames < 1 or (frames - 1) % vae_lib.TEMPORAL_STRIDE:
        raise ValueError(f"frames={frames} must be 4k+1 (e.g. 17, 81, 161)")
    step = vae_lib.SPATIAL_STRIDE * max(patch[1], patch[2])
    if height < step or width < step or height % step or width % step:
        raise ValueError(f"size {width}x{height} (width x height) must be positive multiples of {step}, "
                         "e.g. 832x480 or 1280x720")  # fmt: skip


def latent_shape(frames: int, height: int, width: int, channels: int) -> tuple[int, int, int, int, int]:
    """Returns the latent shape [1, F, H, W, C] of a video of frames x height x width pixels."""
    t, s = vae_lib.TEMPORAL_STRIDE, vae_lib.SPATIAL_STRIDE
    return (1, (frames - 1) // t + 1, height // s, width // s, channels)


@functools.lru_cache(maxsize=8)
def make_sampler(name: str, num_steps: int | None, shift: float,
                 timesteps: tuple[float, ...] | None = None) -> sampler_lib.FlowEuler:  # fmt: skip
    """Returns the sampler; cached, so that equal settings give the same (hashable, static) object
    and a second generate() reuses the compiled step. num_steps None: 50, or for "distilled" the
    number of its timesteps (default LightX2V's 4, sampler.LIGHTX2V_TIMESTEPS)."""
    if timesteps is not None and name != "distilled":
        raise ValueError(f"timesteps are the distilled sampler's; sampler={name!r} takes num_steps and shift")
    if name == "distilled":
        timesteps = sampler_lib.LIGHTX2V_TIMESTEPS if timesteps is None else timesteps
        if num_steps is not None and num_steps != len(timesteps):
            raise ValueError(f"steps={num_steps} but the distilled sampler runs one step per timestep "
                             f"({len(timesteps)}: {list(timesteps)})")  # fmt: skip
        return sampler_lib.distilled_sampler(timesteps, shift)
    num_steps = sampler_lib.DEFAULT_STEPS if num_steps is None else num_steps
    if name == "unipc":
        return sampler_lib.unipc_sampler(num_steps, shift)
    if name == "euler":
        return sampler_lib.euler_sampler(num_steps, shift)
    raise ValueError(f"sampler={name!r} must be one of {SAMPLERS}")


def encode_prompts(
    encoder: t5.UMT5Encoder, tokenizer: t5.Tokenizer, prompts: Sequence[str]
) -> Float[Array, "B T C"]:
    """Returns the umT5 context [len(prompts), text_len, dim], zero beyond each prompt."""
    ids, mask = tokenizer(list(prompts))
    return t5.encode_text(encoder, ids, mask)


def image_to_unit_range(image: UInt8[np.ndarray, "H W 3"]) -> Float[Array, "1 H W 3"]:
    """Returns an RGB uint8 image as float32 [1, H, W, 3] in [-1, 1]."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be RGB uint8 [H, W, 3], got {image.dtype} {image.shape}")
    return jnp.asarray(image, jnp.float32)[None] / 127.5 - 1.0


def image_condition(
    vae: vae_lib.WanVAE, image: Float[Array, "1 h w 3"], frames: int, height: int, width: int
) -> Float[Array, "1 F H W Cy"]:
    """Returns I2V's y [1, F', H/8, W/8, 4 + z_dim]: the mask channels, then the VAE latents of the
    image (resized to height x width, bicubic) followed by frames - 1 black frames."""
    first = jax.image.resize(image, (1, height, width, 3), "cubic", antialias=False)
    video = jnp.concatenate([first[:, None], jnp.zeros((1, frames - 1, height, width, 3), jnp.float32)], axis=1)
    latents = vae_lib.encode(vae, video)
    mask = jnp.zeros((*latents.shape[:-1], I2V_MASK_CHANNELS), jnp.float32).at[:, 0].set(1.0)
    return jnp.concatenate([mask, latents], axis=-1)


@functools.partial(jax.jit, static_argnames=("graphdef", "sampler", "plan", "dense"), donate_argnames=("state",))
def denoise_step(graphdef, params, sampler, state, context, negative_context, guidance, clip_fea, y, *, plan,
                 dense):  # fmt: skip
    """Returns the sampler state after one step: the DiT on (cond[, uncond]) context, cfg, update.

    graphdef/params: nnx.split(dit); sampler: static (see make_sampler); state: donated;
    context/negative_context: [1, T, C] (negative None: no guidance pass); guidance: float32
    scalar; clip_fea/y: I2V inputs or None; plan (RadialPlan or None) and dense: static, so at
    most two programs compile.
    """
    dit = nnx.merge(graphdef, params)
    timestep = jnp.broadcast_to(sampler.timestep(state), state.sample.shape[:1])
    flow = dit(state.sample, timestep, context, plan=plan, dense=dense, clip_fea=clip_fea, y=y)
    if negative_context is not None:
        uncond = dit(state.sample, timestep, negative_context, plan=plan, dense=dense, clip_fea=clip_fea, y=y)
        flow = sampler_lib.cfg(flow, uncond, guidance)
    return sampler.step(state, flow)


def denoise(
    dit: WanModel,
    sampler: sampler_lib.FlowEuler,
    noise: Float[Array, "1 F H W C"],
    context: Float[Array, "1 T Ct"],
    negative_context: Float[Array, "1 T Ct"] | None,
    guidance: float,
    *,
    plan: RadialPlan | None = None,
    clip_fea: Float[Array, "1 I E"] | None = None,
    y: Float[Array, "1 F H W Cy"] | None = None,
    on_step: StepCallback | None = None,
) -> Float[Array, "1 F H W C"]:
    """Returns the denoised latents after all sampler steps (noise is consumed: donated).

    plan: the DiT's attention plan (None: dense); a step is dense where plan.is_dense_step says.
    on_step(step, num_steps, dense) runs after each step has finished on the device, so its
    timing is the step's.
    """
    graphdef, params = nnx.split(dit)  # once: every step reuses the same static graph
    state = sampler.init(noise)
    scale = jnp.float32(guidance)
    for step in range(sampler.num_steps):
        dense = plan is None or plan.is_dense_step(step, sampler.num_steps)
        state = denoise_step(graphdef, params, sampler, state, context, negative_context, scale, clip_fea, y,
                             plan=plan, dense=dense)  # fmt: skip
        if on_step is not None:
            jax.block_until_ready(state.sample)
            on_step(step, sampler.num_steps, dense)
    return state.sample


def decode_video(vae: vae_lib.WanVAE, latents: Float[Array, "1 F H W C"]) -> UInt8[np.ndarray, "Fp Hp Wp 3"]:
    """Returns the decoded video as uint8 [frames, height, width, 3] (from [-1, 1], rounded)."""
    pixels = vae_lib.decode(vae, latents)[0]
    return np.asarray(jnp.round((pixels + 1.0) * 127.5)).astype(np.uint8)


def generate(
    components: Components,
    prompt: str,
    *,
    negative_prompt: str | None = None,
    image: UInt8[np.ndarray, "H W 3"] | None = None,
    frames: int = 81,
    height: int = 480,
    width: int = 832,
    steps: int | None = None,
    guidance: float = 5.0,
    shift: float | None = None,
    seed: int = 0,
    sampler: str = "unipc",
    timesteps: Sequence[float] | None = None,
    free_text_encoder: bool = False,
    on_step: StepCallback | None = None,
    on_stage: StageCallback | None = None,
) -> UInt8[np.ndarray, "Fp Hp Wp 3"]:
    """Returns the generated video, uint8 [frames, height, width, 3] (RGB, FPS frames a second).

    negative_prompt: None for Wan's default; image: RGB uint8 [H, W, 3], needed by (and only by)
    an I2V DiT; steps: None for 50 (the distilled sampler: one per timestep); timesteps: the
    distilled sampler's (None: LightX2V's [1000, 750, 500, 250]); guidance 1: one DiT pass a step,
    the negative prompt is not encoded; shift: None for Wan's default at this size (3.0 at 480p,
    5.0 at 720p);
    free_text_encoder: set components.text_encoder to None once the prompts are encoded;
    on_step: see denoise; on_stage(name, seconds): after the umT5 encode, the image encode (I2V)
    and the VAE decode, each waited for on the device so that its time is its own.
    Deterministic for a seed on a given device and dtype.
    """
    dit = components.dit
    check_video_size(frames, height, width, dit.config.patch_size)
    if components.text_encoder is None:
        raise ValueError("components.text_encoder is None (freed by an earlier generate(free_text_encoder=True)); "
                         "load the pipeline again")  # fmt: skip
    sampler_ = make_sampler(sampler, steps, sampler_lib.default_shift(height, width) if shift is None else shift,
                            None if timesteps is None else tuple(timesteps))  # fmt: skip
    negative = WAN_NEGATIVE_PROMPT if negative_prompt is None else negative_prompt
    prompts = [prompt] if guidance == 1.0 else [prompt, negative]  # guidance 1: cond alone, no uncond pass
    timed = _Timer(on_stage)
    context = timed(f"umT5 encode ({'prompt' if len(prompts) == 1 else 'prompt, negative prompt'})",
                    lambda: encode_prompts(components.text_encoder, components.tokenizer, prompts))
    if free_text_encoder:
        components.text_encoder = None
    image_inputs = functools.partial(_image_inputs, components, image, frames, height, width)
    clip_fea, y = image_inputs() if dit.config.model_type == "t2v" else timed("image encode (CLIP, VAE)", image_inputs)
    noise = sampler_lib.initial_noise(seed, latent_shape(frames, height, width, dit.config.out_dim))
    latents = denoise(dit, sampler_, noise, context[:1], context[1:] if guidance != 1.0 else None, guidance,
                      plan=components.plan, clip_fea=clip_fea, y=y, on_step=on_step)  # fmt: skip
    return timed("VAE decode", lambda: decode_video(components.vae, latents))


class _Timer:
    """Calls a function and reports its device time to an on_stage callback (if any)."""

    def __init__(self, on_stage: StageCallback | None):
        self.on_stage = on_stage

    def __call__(self, name: str, compute: Callable):
        if self.on_stage is None:
            return compute()
        start = time.perf_counter()
        result = jax.block_until_ready(compute())
        self.on_stage(name, time.perf_counter() - start)
        return result


def _image_inputs(components: Components, image, frames: int, height: int, width: int):
    """Returns (clip_fea, y) for an I2V DiT, (None, None) for T2V; checks that they go together."""
    if components.dit.config.model_type == "t2v":
        if image is not None:
            raise ValueError("an image was given but this is a text-to-video checkpoint; use an I2V one")
        return None, None
    if image is None:
        raise ValueError("this image-to-video checkpoint needs an image (--image)")
    if components.image_encoder is None:
        raise ValueError("this image-to-video checkpoint has no CLIP image encoder; convert its folder again")
    unit = image_to_unit_range(image)
    return clip_lib.encode_image(components.image_encoder, unit), image_condition(components.vae, unit, frames,
                                                                                    height, width)


# ---------------------------------------------------------------- the tiny preset (no download)


def byte_tokenizer(text_len: int) -> t5.Tokenizer:
    """Returns a tokenizer whose ids are UTF-8 bytes + 3 (0 pad, 1 EOS, 2 unk as in umT5): no
    vocabulary file needed, for the tiny preset's random text encoder."""
    return t5.Tokenizer(
        lambda text: [b + BYTE_OFFSET for b in text.encode("utf-8")],
        lambda ids: bytes(i - BYTE_OFFSET for i in ids if i >= BYTE_OFFSET).decode("utf-8", errors="replace"),
        eos_id=1, pad_id=0, text_len=text_len,
    )  # fmt: skip


# The tiny preset's DiT: WAN_TINY with the tiny VAE's latent channels, umT5's and CLIP's widths.
TINY_T2V = dataclasses.replace(WAN_TINY, in_dim=vae_lib.VAE_TINY.z_dim, out_dim=vae_lib.VAE_TINY.z_dim,
                               text_dim=t5.UMT5_TINY.dim, img_dim=clip_lib.CLIP_TINY.dim)  # fmt: skip
TINY_I2V = dataclasses.replace(TINY_T2V, model_type="i2v", in_dim=2 * TINY_T2V.in_dim + I2V_MASK_CHANNELS)


def tiny_components(*, seed: int = 0, model_type: str = "t2v", attention: RadialPlan | None = None,
                    vae_dtype: str = "float32") -> Components:  # fmt: skip
    """Returns the tiny preset with seeded random weights: TINY_T2V/TINY_I2V DiT, VAE_TINY (in
    vae_dtype), UMT5_TINY, a byte tokenizer (and CLIP_TINY for "i2v"), with `attention` as its
    plan (None: dense). Runs on a CPU in seconds; its videos are noise."""
    dit_config = TINY_T2V if model_type == "t2v" else TINY_I2V
    if t5.UMT5_TINY.vocab_size < 256 + BYTE_OFFSET:
        raise ValueError("UMT5_TINY's vocabulary cannot hold the byte tokenizer's ids")
    return Components(
        dit=random_weights(lambda rngs: WanModel(dit_config, rngs=rngs), seed),
        vae=random_weights(lambda rngs: vae_lib.WanVAE(dataclasses.replace(vae_lib.VAE_TINY, dtype=vae_dtype),
                                                       rngs=rngs), seed + 1),  # fmt: skip
        text_encoder=random_weights(lambda rngs: t5.UMT5Encoder(t5.UMT5_TINY, rngs=rngs), seed + 2),
        tokenizer=byte_tokenizer(dit_config.text_len),
        image_encoder=random_weights(lambda rngs: clip_lib.CLIPVisionEncoder(clip_lib.CLIP_TINY, rngs=rngs), seed + 3)
        if model_type == "i2v" else None,
        plan=attention,
    )  # fmt: skip


def random_weights(build: Callable[[nnx.Rngs], nnx.Module], seed: int) -> nnx.Module:
    """Returns build(rngs)'s module with seeded numpy weights: norm scales 1, biases 0, other
    tensors normal with std 1/sqrt(fan in = product of all but the last axis).

    Not the modules' own initialisers: those compile one random program per parameter shape
    (~10 s for the tiny VAE on a CPU); this takes milliseconds and keeps activations O(1).
    """
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: build(nnx.Rngs(0))))
    rng = np.random.default_rng(seed)
    leaves = []
    for path, var in nnx.to_flat_state(abstract):
        shape, dtype = var.get_value().shape, var.get_value().dtype
        if path[-1] in ("scale", "gamma"):
            value = np.ones(shape)
        elif path[-1] == "bias":
            value = np.zeros(shape)
        else:
            value = rng.standard_normal(shape) / np.sqrt(max(1, int(np.prod(shape[:-1]))))
        leaves.append((path, var.replace(jnp.asarray(value, dtype))))
    return nnx.merge(graphdef, nnx.from_flat_state(leaves))
