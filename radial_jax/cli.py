"""The `radial-jax` command line: one subcommand per job, each with --help."""

import argparse
import dataclasses
import sys
import time
import warnings
from pathlib import Path

import numpy as np

from radial_jax import mask as mask_lib


def _add_mask_args(p: argparse.ArgumentParser, frames: int, height: int, width: int) -> None:
    p.add_argument("--model", choices=mask_lib.MODELS, default="wan", help="mask rule (wan: frame 0 is a sink)")
    p.add_argument("--frames", type=int, default=frames, help="video frames in pixels, 4k+1 (default %(default)s)")
    p.add_argument("--height", type=int, default=height, help="video height in pixels (default %(default)s)")
    p.add_argument("--width", type=int, default=width, help="video width in pixels (default %(default)s)")
    p.add_argument("--decay-factor", type=float, default=1.0, help="window decay (default %(default)s)")
    p.add_argument("--block", type=int, default=128, help="tokens per mask block (default %(default)s)")
    p.add_argument("--extra-tokens", type=int, default=0, help="tokens after the video, e.g. text (default 0)")


def _build_mask(args) -> tuple[mask_lib.VideoTokens, np.ndarray, float]:
    geometry = mask_lib.video_tokens(args.frames, args.height, args.width)
    start = time.perf_counter()
    block_mask = mask_lib.radial_block_mask(
        geometry.num_frames, geometry.tokens_per_frame, block_size=args.block,
        decay_factor=args.decay_factor, model=args.model, extra_tokens=args.extra_tokens,
    )
    return geometry, block_mask, time.perf_counter() - start


def _print_mask_summary(args, geometry, block_mask, seconds) -> None:
    n = geometry.num_tokens + args.extra_tokens
    pairs = mask_lib.computed_token_pairs(block_mask, args.block, n, n)
    print(f"video {args.frames}x{args.height}x{args.width} -> {geometry.num_frames} latent frames "
          f"x {geometry.tokens_per_frame} tokens = {geometry.num_tokens} tokens (+{args.extra_tokens} extra)")
    print(f"blocks: {block_mask.shape[0]} x {block_mask.shape[1]} of {args.block} tokens, "
          f"{int(block_mask.sum())} on, density {mask_lib.block_density(block_mask):.4f} "
          f"(built in {seconds * 1e3:.0f} ms)")
    print(f"attention FLOPs vs dense: {pairs / n**2:.4f} ({n**2 / pairs:.2f}x fewer)")


def run_mask(args) -> int:
    geometry, block_mask, seconds = _build_mask(args)
    _print_mask_summary(args, geometry, block_mask, seconds)
    if args.png:
        from radial_jax.plot import save_block_mask_png

        save_block_mask_png(block_mask, args.png, frame_tokens=geometry.tokens_per_frame,
                            num_frames=geometry.num_frames, block_size=args.block)
        print(f"wrote {args.png}")
    return 0


def run_demo(args) -> int:
    """Mask for Wan 720p-81f, then radial attention vs a float64 dense check on a small problem."""
    import jax
    import jax.numpy as jnp

    from radial_jax.attention import radial_attention

    run_mask(args)
    small = mask_lib.radial_block_mask(args.small_frames, args.small_tokens_per_frame, block_size=args.block,
                                       decay_factor=args.decay_factor, model=args.model)
    n = args.small_frames * args.small_tokens_per_frame
    keys = jax.random.split(jax.random.key(args.seed), 3)
    q, k, v = (jax.random.normal(key, (1, n, args.heads, args.head_dim), jnp.float32) for key in keys)
    start = time.perf_counter()
    out = jax.block_until_ready(radial_attention(q, k, v, block_mask=small, block_size=args.block))
    seconds = time.perf_counter() - start
    expected = _float64_masked_attention(np.asarray(q), np.asarray(k), np.asarray(v),
                                         mask_lib.expand_block_mask(small, args.block, n, n))
    err = float(np.abs(np.asarray(out) - expected).max() / np.abs(expected).max())
    print(f"radial attention on {n} tokens x {args.heads} heads (density {small.mean():.3f}, "
          f"backend {jax.default_backend()}): {seconds:.2f} s, max error vs float64 dense-masked {err:.1e}")
    return 0 if err < 1e-4 else 1


def _float64_masked_attention(q, k, v, token_mask):
    q, k, v = (x.astype(np.float64) for x in (q, k, v))
    logits = np.einsum("blnd,bmnd->bnlm", q, k) / np.sqrt(q.shape[-1])
    logits = np.where(token_mask, logits, -np.inf)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    return np.einsum("bnlm,bmnd->blnd", probs / probs.sum(-1, keepdims=True), v)


def run_convert(args) -> int:
    from convert import convert_checkpoint  # deferred: pulls in flax and the model

    components = convert_checkpoint(args.src, args.dst, dtype=args.dtype)
    print(f"wrote {', '.join(components)} to {args.dst}")
    return 0


# The no-checkpoint preset: seconds on a CPU; 16 steps so that with the default 12 dense steps
# the radial program runs too.
TINY_DEFAULTS = {"size": "160x96", "frames": 17, "steps": 16}
CKPT_DEFAULTS = {"size": "832x480", "frames": 81, "steps": 50}  # Wan2.1's 480p T2V defaults
DEFAULT_PROMPT = "Two anthropomorphic cats in comfy boxing gear and bright gloves fight intensely on a spotlighted stage."


def _parse_size(size: str) -> tuple[int, int]:
    """Returns (width, height) from "832x480"."""
    try:
        width, height = (int(n) for n in size.lower().split("x"))
    except ValueError:
        raise ValueError(f"--size {size!r} must be WIDTHxHEIGHT, e.g. 832x480 or 1280x720") from None
    return width, height


def run_generate(args) -> int:
    """Text (or image) to video: loads the components, generates, writes an mp4."""
    defaults = CKPT_DEFAULTS if args.ckpt else TINY_DEFAULTS
    width, height = _parse_size(args.size or defaults["size"])
    frames = defaults["frames"] if args.frames is None else args.frames
    steps = defaults["steps"] if args.steps is None else args.steps
    loras = [_lora_arg(arg) for arg in args.lora]
    if steps < 1 or args.guidance < 0:
        raise ValueError(f"--steps {steps} must be >= 1 and --guidance {args.guidance} >= 0")
    try:
        import imageio.v2 as imageio  # checked first: a missing writer should not cost a whole run
        import imageio_ffmpeg  # noqa: F401
    except ImportError:
        raise ValueError("writing mp4 needs imageio and imageio-ffmpeg: pip install -e \".[video]\"") from None
    from models.wan import AttentionConfig, pipeline

    pipeline.check_video_size(frames, height, width)
    image = _read_image(args.image) if args.image else None
    attention = AttentionConfig(backend=args.attention, dense_layers=args.dense_layers,
                                dense_timesteps=args.dense_timesteps, dense_final_timesteps=args.dense_final_timesteps,
                                decay_factor=args.decay_factor)  # fmt: skip
    if loras:  # names and shapes against the checkpoint's config, before minutes of loading
        _check_loras(loras, args.ckpt, image is not None)
    start = time.perf_counter()
    components = _load_components(args, attention, image is not None)
    if loras:
        from convert.lora import merge_loras

        merge_loras(components.dit, loras)
        print("merged LoRA " + ", ".join(f"{path} (strength {strength:g})" for path, strength in loras))
    print(f"loaded in {time.perf_counter() - start:.1f} s; generating {frames} frames at {width}x{height}, "
          f"{steps} steps, attention {args.attention}")
    start = time.perf_counter()
    with _StepBar(steps) as bar:
        video = pipeline.generate(
            components, args.prompt, negative_prompt=args.negative_prompt, image=image, frames=frames,
            height=height, width=width, steps=steps, guidance=args.guidance, shift=args.shift, seed=args.seed,
            sampler=args.sampler, free_text_encoder=True, on_step=bar.update,
        )  # fmt: skip
    with warnings.catch_warnings():  # JAX warns on any fork; imageio's child only execs ffmpeg
        warnings.filterwarnings("ignore", message="os.fork", category=RuntimeWarning)
        imageio.mimwrite(args.out, list(video), fps=pipeline.FPS, codec="libx264", quality=8, macro_block_size=1,
                         ffmpeg_log_level="error")  # fmt: skip
    print(f"wrote {args.out}: {video.shape[0]} frames, {width}x{height}, {pipeline.FPS} fps "
          f"({time.perf_counter() - start:.1f} s)" + ("; random weights: the video is noise" if not args.ckpt else ""))
    return 0


def _check_loras(loras, ckpt: str | None, i2v: bool) -> None:
    """Raises CheckpointError if a LoRA does not fit the DiT that --ckpt (or the tiny preset) holds."""
    from convert.lora import lora_updates

    if ckpt:
        from convert import read_config

        _, config = read_config(ckpt)
    else:
        from models.wan import pipeline

        config = pipeline.TINY_I2V if i2v else pipeline.TINY_T2V
    for path, strength in loras:
        lora_updates(path, config, strength=strength)


def _lora_arg(arg: str) -> tuple[Path, float]:
    """Returns (path, strength) of a --lora FILE[:STRENGTH] whose file exists."""
    from convert.lora import parse_lora_arg

    path, strength = parse_lora_arg(arg)
    if not path.is_file() or path.suffix != ".safetensors":
        raise ValueError(f"--lora {arg}: no such .safetensors file")
    return path, strength


def _read_image(path: str) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB"))
    except OSError as e:
        raise ValueError(f"--image {path}: cannot read it ({e})") from None


def _load_components(args, attention, i2v: bool):
    if not args.ckpt:
        import jax

        from models.wan import pipeline

        print("no --ckpt: the built-in tiny preset with seeded random weights (no download); the video is "
              "meaningless noise. Convert a Wan2.1 checkpoint (radial-jax convert) and pass --ckpt for a real one.")
        if jax.default_backend() == "cpu":  # what "auto" picks there, named so that it does not warn mid-bar
            attention = dataclasses.replace(attention, implementation="reference")
        return pipeline.tiny_components(seed=args.seed, model_type="i2v" if i2v else "t2v", attention=attention)
    from convert import load_pipeline

    return load_pipeline(args.ckpt, dtype=args.dtype, attention=attention)


class _StepBar:
    """A tqdm bar over sampling steps showing the last step's seconds and attention."""

    def __init__(self, steps: int):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=steps, unit="step", desc="denoising")
        self.last = time.perf_counter()

    def update(self, step: int, num_steps: int, dense: bool) -> None:
        now = time.perf_counter()
        note = " (incl. compile)" if step == 0 else ""
        self.bar.set_postfix_str(f"{now - self.last:.2f} s/step{note}, {'dense' if dense else 'radial'}")
        self.bar.update(1)
        self.last = now
        if step + 1 == num_steps:  # before the VAE decode, which is not a step
            self.bar.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.bar.close()


def _add_generate_parser(sub) -> None:
    p = sub.add_parser("generate", help="text/image to video with Wan2.1 (no --ckpt: a tiny random model)",
                       description="Generate a video with a converted Wan2.1 checkpoint (radial-jax convert) and "
                                   "write it as mp4. Without --ckpt, a built-in tiny model with random weights "
                                   "runs on the CPU in seconds and writes a meaningless video.")  # fmt: skip
    p.add_argument("--ckpt", help="converted checkpoint folder (radial-jax convert --dst); default: tiny random preset")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="what to generate")
    p.add_argument("--negative-prompt", help="what to avoid (default: Wan2.1's default negative prompt)")
    p.add_argument("--image", help="first frame for an I2V checkpoint (png, jpg)")
    p.add_argument("--size", help="WIDTHxHEIGHT, multiples of 16: 832x480 or 1280x720 (default 832x480; tiny 160x96)")
    p.add_argument("--frames", type=int, help="video frames, 4k+1 (default 81; tiny 17)")
    p.add_argument("--steps", type=int, help="sampling steps (default 50; tiny 16)")
    p.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance scale (default %(default)s)")
    p.add_argument("--shift", type=float, help="flow shift (default 3.0 at 480p, 5.0 at 720p)")
    p.add_argument("--seed", type=int, default=0, help="noise seed (default %(default)s)")
    p.add_argument("--sampler", choices=("unipc", "euler"), default="unipc", help="(default %(default)s)")
    p.add_argument("--attention", choices=("dense", "radial"), default="radial", help="self-attention (default %(default)s)")
    p.add_argument("--dense-layers", type=int, default=1, help="first N blocks stay dense (default %(default)s)")
    p.add_argument("--dense-timesteps", type=int, default=12, help="first N steps stay dense (default %(default)s)")
    p.add_argument("--dense-final-timesteps", type=int, default=0, help="last N steps stay dense (default %(default)s)")
    p.add_argument("--decay-factor", type=float, default=0.2, help="radial window decay (default %(default)s)")
    p.add_argument("--dtype", choices=("bf16", "f32"), default="bf16", help="DiT and encoders (default %(default)s)")
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:STRENGTH]",
                   help="LoRA weights (.safetensors; original, diffusers, PEFT or kohya names) merged into the DiT "
                        "before generating; repeatable; strength default 1")
    p.add_argument("--out", default="video.mp4", help="mp4 to write (default %(default)s)")
    p.set_defaults(func=run_generate)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="radial-jax", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("mask", help="build the radial block mask, print its density, draw it",
                       description="Build the radial block mask for a video size, print tokens, blocks, "
                                   "density and FLOPs vs dense, and optionally draw it to a PNG.")
    _add_mask_args(p, 81, 720, 1280)
    p.add_argument("--png", help="write a picture of the block mask here")
    p.set_defaults(func=run_mask)

    p = sub.add_parser("demo", help="offline demo: the 720p-81f mask and a small radial-vs-dense check",
                       description="Offline demo with no download: builds the Wan 720p-81f mask (and a PNG "
                                   "of it), then runs radial attention on a small random problem and checks "
                                   "it against float64 dense masked attention.")
    _add_mask_args(p, 81, 720, 1280)
    p.add_argument("--png", default="radial_mask.png", help="picture of the mask (default %(default)s)")
    p.add_argument("--small-frames", type=int, default=8, help="latent frames of the small problem")
    p.add_argument("--small-tokens-per-frame", type=int, default=200, help="tokens per latent frame of it")
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run_demo)

    p = sub.add_parser("convert", help="convert a Wan2.1 PyTorch checkpoint (original or diffusers) to ours",
                       description="Convert a Wan2.1 checkpoint folder (original layout: "
                                   "diffusion_pytorch_model*.safetensors [+ .index.json] or a .pth, Wan2.1_VAE.pth, "
                                   "models_t5_umt5-xxl-enc-bf16.pth, google/umt5-xxl/, for I2V models_clip_*.pth; "
                                   "diffusers layout: transformer/, vae/, text_encoder/, tokenizer/, image_encoder/) "
                                   "or a single DiT file into radial-jax's format, streaming one tensor at a time. "
                                   "Generate with radial-jax generate --ckpt DST; load with "
                                   "convert.load_pipeline(DST) or convert.load_wan(DST).")  # fmt: skip
    p.add_argument("--src", required=True, help="checkpoint folder or file")
    p.add_argument("--dst", required=True, help="output folder (must not exist, or be empty)")
    p.add_argument("--dtype", choices=("bf16", "f32"), default="bf16",
                   help="storage dtype of the large weights (norms, modulation, head and the VAE stay f32; "
                        "default %(default)s)")
    p.set_defaults(func=run_convert)
    _add_generate_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as e:
        print(f"radial-jax {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
