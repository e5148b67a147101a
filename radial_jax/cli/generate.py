"""`radial-jax generate`: text (or image) to video with a converted Wan2.1 checkpoint, or a tiny random model."""

import dataclasses
import time
import warnings
from pathlib import Path

import numpy as np

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


def run(args) -> int:
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


def add_parser(sub) -> None:
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
    p.set_defaults(func=run)
