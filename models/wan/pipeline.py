"""Wan2.1 and Wan2.2 A14B video generation from built modules: prompts -> umT5 context, seeded
noise, a flow sampler with classifier-free guidance (one jitted step), VAE decode -> uint8 frames.

    components = convert.load_pipeline("wan-1.3b", dtype="bf16")   # or tiny_components()
    video = generate(components, "a cat surfing", frames=81, height=480, width=832)  # uint8 [81, 480, 832, 3]

Nothing here reads files or prints: the caller loads the modules and shows progress through
`on_step(step, num_steps, dense)` and `on_stage(name, seconds)`. As Wan2.1 (wan/text2video.py, image2video.py): the negative
prompt defaults to Wan's; guidance runs the DiT twice per step (cond, then uncond; no second
pass at guidance 1); I2V conditions on CLIP features of the image and on y = 4 mask channels
(1 on the first latent frame) + the VAE latents of the image followed by black frames. The
noise comes from jax.random, so a seed does not reproduce the original's torch noise.

Wan2.2 A14B (models/wan/experts.py): `components.low_noise_dit` and `components.experts` are
set; each step runs the expert its timestep selects, with that expert's guidance scale (as
Wan2.2's wan/text2video.py and diffusers' WanPipeline). Its I2V DiT takes y without CLIP
features. The radial plan applies to both experts with the same global step index (as the
reference's Wan2.2 pipeline, which passes the step index i to both transformers).
"""

import dataclasses
import functools
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Float, Int, UInt8

from models import clip as clip_lib
from models import static_graph
from models import t5
from models.wan import experts as experts_lib
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
    """The modules of one Wan2.1 or Wan2.2 A14B checkpoint and the DiT's attention plan (None:
    dense; for A14B, of both experts). Mutable so that generate(free_text_encoder=True) can drop
    the text encoder (its device memory is freed once nothing else refers to it). For A14B,
    `dit` is the high-noise expert."""

    dit: WanModel
    vae: vae_lib.WanVAE
    text_encoder: t5.UMT5Encoder | None
    tokenizer: t5.Tokenizer
    image_encoder: clip_lib.CLIPVisionEncoder | None = None  # Wan2.1 I2V only
    plan: RadialPlan | None = None
    low_noise_dit: WanModel | None = None  # Wan2.2 A14B: the second expert, same config as dit
    experts: experts_lib.ExpertSwitch | None = None  # Wan2.2 A14B: when the experts switch


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
                 timesteps: tuple[float | int, ...] | None = None) -> sampler_lib.FlowEuler:  # fmt: skip
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

    graphdef/params: models.static_graph.split(dit); sampler: static (see make_sampler); state: donated;
    context/negative_context: [1, T, C] (negative None: no guidance pass); guidance: float32
    scalar; clip_fea/y: I2V inputs or None; plan (RadialPlan or None) and dense: static, so at
    most two programs compile.
    """
    dit = nnx.merge(graphdef.graphdef, params)
    timestep = jnp.broadcast_to(sampler.timestep(state), state.sample.shape[:1])
    flow = dit(state.sample, timestep, context, plan=plan, dense=dense, clip_fea=clip_fea, y=y)
    if negative_context is not None:
        uncond = dit(state.sample, timestep, negative_context, plan=plan, dense=dense, clip_fea=clip_fea, y=y)
        flow = sampler_lib.cfg(flow, uncond, guidance)
    return sampler.step(state, flow)


def denoise(
    dit: WanModel | Sequence[WanModel],
    sampler: sampler_lib.FlowEuler,
    noise: Float[Array, "1 F H W C"],
    context: Float[Array, "1 T Ct"],
    negative_context: Float[Array, "1 T Ct"] | None,
    guidance: float | Sequence[float],
    *,
    plan: RadialPlan | None = None,
    step_experts: Sequence[int] | Int[np.ndarray, "S"] | None = None,
    clip_fea: Float[Array, "1 I E"] | None = None,
    y: Float[Array, "1 F H W Cy"] | None = None,
    on_step: StepCallback | None = None,
) -> Float[Array, "1 F H W C"]:
    """Returns the denoised latents after all sampler steps (noise is consumed: donated).

    dit: one DiT, or the experts of a Wan2.2 A14B (same config); guidance: one scale for all, or
    a scale per DiT; plan: the attention plan of every DiT (None: dense); a step is dense where
    plan.is_dense_step says, with one global step index for both experts; step_experts: the
    index into the DiTs of each step, [S] ints or ExpertSwitch.experts' numpy array (None: the
    first throughout). on_step(step, num_steps, dense) runs after each step has finished on the
    device, so its timing is the step's.
    """
    dits = [dit] if isinstance(dit, WanModel) else list(dit)
    guidance = [guidance] * len(dits) if isinstance(guidance, (int, float)) else list(guidance)
    if len({d.config for d in dits}) != 1 or len(guidance) != len(dits):
        raise ValueError(f"{len(dits)} DiTs with {len(guidance)} guidance scales; the DiTs must share one config")
    step_experts = [0] * sampler.num_steps if step_experts is None else list(step_experts)
    if len(step_experts) != sampler.num_steps or not set(step_experts) <= set(range(len(dits))):
        raise ValueError(f"step_experts={step_experts} must give one of {len(dits)} DiTs for each of "
                         f"{sampler.num_steps} steps")  # fmt: skip
    # Once per expert: every step reuses the same static graph. The experts share it (equal
    # configs), so their steps share the compiled programs: their weights are arguments.
    graphdef, params = static_graph.split(dits[0])
    params = [params] + [nnx.split(d)[1] for d in dits[1:]]  # the experts share the first one's graph
    scales = [jnp.float32(g) for g in guidance]
    state = sampler.init(noise)
    for step in range(sampler.num_steps):
        dense = plan is None or plan.is_dense_step(step, sampler.num_steps)
        expert = step_experts[step]
        state = denoise_step(graphdef, params[expert], sampler, state, context, negative_context, scales[expert],
                             clip_fea, y, plan=plan, dense=dense)  # fmt: skip
        if on_step is not None:
            jax.block_until_ready(state.sample)
            on_step(step, sampler.num_steps, dense)
    return state.sample


def decode_video(vae: vae_lib.WanVAE, latents: Float[Array, "1 F H W C"]) -> UInt8[np.ndarray, "Fp Hp Wp 3"]:
    """Returns the decoded video as uint8 [frames, height, width, 3] (from [-1, 1], rounded)."""
    # Chunk by chunk, to uint8 on the device (a quarter of the bytes, no host-side cast of 224 M
    # values at 720p-81f), each chunk's copy to the host running while the next one decodes; no
    # program sees the whole video, so none compiles for its length.
    chunks = []
    for pixels in vae_lib.decode_chunks(vae, latents):
        chunks.append(_to_uint8(pixels[0]))
        chunks[-1].copy_to_host_async()
    return np.concatenate([np.asarray(chunk) for chunk in chunks])


@jax.jit
def _to_uint8(pixels: Float[Array, "F H W 3"]) -> UInt8[Array, "F H W 3"]:
    return jnp.round((pixels + 1.0) * 127.5).astype(jnp.uint8)


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
    guidance: float | None = None,
    guidance_low: float | None = None,
    shift: float | None = None,
    seed: int = 0,
    sampler: str = "unipc",
    timesteps: Sequence[float | int] | None = None,
    free_text_encoder: bool = False,
    on_step: StepCallback | None = None,
    on_stage: StageCallback | None = None,
) -> UInt8[np.ndarray, "Fp Hp Wp 3"]:
    """Returns the generated video, uint8 [frames, height, width, 3] (RGB, FPS frames a second).

    negative_prompt: None for Wan's default; image: RGB uint8 [H, W, 3], needed by (and only by)
    an I2V DiT; steps, guidance, shift: None for the defaults (Wan2.1: 50 steps, guidance 5,
    shift 3.0 at 480p and 5.0 at 720p; Wan2.2 A14B: components.experts'; the distilled sampler:
    one step per timestep); guidance_low: the low-noise expert's scale of an A14B (None:
    guidance if given, else the default); guidance 1 (every expert's): one DiT pass a step, the
    negative prompt is not encoded; timesteps: the distilled sampler's (None: LightX2V's
    [1000, 750, 500, 250]);
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
    dits, scales, switch = _experts(components, guidance, guidance_low)
    # An A14B's steps and shift are its UniPC/Euler defaults; a distilled run keeps its own.
    defaults = switch if switch is not None and sampler != "distilled" else None
    if steps is None and defaults is not None:
        steps = defaults.steps
    if shift is None:
        shift = defaults.shift if defaults is not None else sampler_lib.default_shift(height, width)
    sampler_ = make_sampler(sampler, steps, shift, None if timesteps is None else tuple(timesteps))
    negative = WAN_NEGATIVE_PROMPT if negative_prompt is None else negative_prompt
    guided = any(g != 1.0 for g in scales)  # else the cond pass alone; cfg at scale 1 among guided DiTs is cond
    prompts = [prompt, negative] if guided else [prompt]
    timed = _Timer(on_stage)
    context = timed(f"umT5 encode ({'prompt' if len(prompts) == 1 else 'prompt, negative prompt'})",
                    lambda: encode_prompts(components.text_encoder, components.tokenizer, prompts))
    if free_text_encoder:
        components.text_encoder = None
    image_inputs = functools.partial(_image_inputs, components, image, frames, height, width)
    clip_fea, y = image_inputs() if dit.config.model_type == "t2v" else timed("image encode (CLIP, VAE)", image_inputs)
    noise = sampler_lib.initial_noise(seed, latent_shape(frames, height, width, dit.config.out_dim))
    latents = denoise(dits, sampler_, noise, context[:1], context[1:] if guided else None, scales,
                      plan=components.plan, step_experts=switch.experts(sampler_.timesteps) if switch else None,
                      clip_fea=clip_fea, y=y, on_step=on_step)  # fmt: skip
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


def _experts(components: Components, guidance: float | None, guidance_low: float | None):
    """Returns (DiTs, their guidance scales, the ExpertSwitch or None) of a Wan2.1 or A14B checkpoint."""
    if (components.low_noise_dit is None) != (components.experts is None):
        raise ValueError("components.low_noise_dit and components.experts go together (a Wan2.2 A14B has both)")
    if components.experts is None:
        if guidance_low is not None:
            raise ValueError("guidance_low is for a Wan2.2 A14B checkpoint (two experts); this one has one DiT")
        return [components.dit], [5.0 if guidance is None else guidance], None
    scales = experts_lib.expert_guidance(components.experts, guidance, guidance_low)
    return [components.dit, components.low_noise_dit], list(scales), components.experts


def _image_inputs(components: Components, image, frames: int, height: int, width: int):
    """Returns (clip_fea, y) for an I2V DiT, (None, None) for T2V; checks that they go together."""
    if components.dit.config.model_type == "t2v":
        if image is not None:
            raise ValueError("an image was given but this is a text-to-video checkpoint; use an I2V one")
        return None, None
    if image is None:
        raise ValueError("this image-to-video checkpoint needs an image (--image)")
    unit = image_to_unit_range(image)
    y = image_condition(components.vae, unit, frames, height, width)
    if not components.dit.config.uses_clip:  # Wan2.2 I2V-A14B: the image enters through y alone
        return None, y
    if components.image_encoder is None:
        raise ValueError("this image-to-video checkpoint has no CLIP image encoder; convert its folder again")
    return clip_lib.encode_image(components.image_encoder, unit), y


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
