"""`radial-jax generate`: text (or image) to video with a converted Wan2.1 or Wan2.2 A14B checkpoint, or a tiny
random model."""

import contextlib
import dataclasses
import math
import sys
import time
import warnings
from pathlib import Path

import numpy as np

from radial_jax.cli.outputs import write_video

# The no-checkpoint preset: seconds on a CPU; 16 steps so that with the default 12 dense steps
# the radial program runs too.
TINY_DEFAULTS = {"size": "160x96", "frames": 17, "steps": 16}
CKPT_DEFAULTS = {"size": "832x480", "frames": 81, "steps": 50}  # Wan2.1's 480p T2V defaults
# Flags a --preset sets, with their values without one. A flag given explicitly always wins.
# guidance None: the checkpoint's (WAN21_GUIDANCE; a Wan2.2 A14B's per expert, models/wan/experts.py).
WAN21_GUIDANCE = 5.0
BASE = {"sampler": "unipc", "timesteps": None, "shift": None, "guidance": None, "dense_layers": 1,
        "dense_timesteps": 12, "decay_factor": 0.2, "vae_dtype": "f32", "dense_implementation": "dense"}  # fmt: skip
# lightx2v: LightX2V's step- and CFG-distilled Wan2.1 LoRAs (configs/distill/wan21/*_4step_cfg.json:
# denoising_step_list [1000, 750, 500, 250], sample_shift 5, no CFG) with the reference's radial
# plan for them (scripts/wan_t2v_inference_lightx2v.sh: dense_layers 1, dense_timesteps 1, decay
# 0.2); the dense step through our kernel (faster than cuDNN at 720p: benchmarks/results/
# fast-parts-h200.json); the VAE in float32, which decoded 720p-81f faster than bf16 on the H200
# (3.60 vs 3.78 s, generate-fast-h200.json) without bf16's rounding. benchmarks/NOTES.md has the sources.
PRESETS = {"lightx2v": {"sampler": "distilled", "timesteps": "1000,750,500,250", "shift": 5.0, "guidance": 1.0,
                        "dense_layers": 1, "dense_timesteps": 1, "decay_factor": 0.2, "vae_dtype": "f32",
                        "dense_implementation": "mosaic"}}
# --dense-implementation: mosaic falls back to cuDNN where our Hopper kernel cannot run.
DENSE_IMPLEMENTATIONS = {"dense": "dense", "mosaic": ("mosaic", "dense")}
MAX_SEED = 2**32 - 1  # jax.random.key keeps 32 bits without x64: larger seeds would alias smaller ones
DEFAULT_PROMPT = "Two anthropomorphic cats in comfy boxing gear and bright gloves fight intensely on a spotlighted stage."


def _parse_size(size: str) -> tuple[int, int]:
    """Returns (width, height) from "832x480"."""
    try:
        width, height = (int(n) for n in size.lower().split("x"))
    except ValueError:
        raise ValueError(f"--size {size!r} must be WIDTHxHEIGHT, e.g. 832x480 or 1280x720") from None
    return width, height


@dataclasses.dataclass(frozen=True)
class Request:
    """What `generate` was asked for, every flag checked, before anything is loaded."""

    width: int
    height: int
    frames: int
    steps: int
    out: Path
    image: np.ndarray | None
    loras: tuple[tuple[Path, float], ...]
    config: object  # the DiT's WanConfig (--ckpt's, or the tiny preset's)
    timesteps: tuple[float, ...] | None = None  # --sampler distilled's
    mesh: object = None  # jax.sharding.Mesh of --mesh (1 device by default)
    experts: object = None  # Wan2.2 A14B: --ckpt's models.wan.experts.ExpertSwitch


def apply_preset(args) -> None:
    """Fills each preset-able flag left unset (None) from --preset, else from BASE."""
    preset = PRESETS[args.preset] if args.preset else {}
    for flag, value in BASE.items():
        if getattr(args, flag) is None:
            setattr(args, flag, preset.get(flag, value))


def _parse_timesteps(text: str | None) -> tuple[float, ...] | None:
    """Returns the --timesteps list as floats, or None."""
    if text is None:
        return None
    try:
        return tuple(float(t) for t in text.split(","))
    except ValueError:
        raise ValueError(f"--timesteps {text!r} must be comma-separated numbers, e.g. 1000,750,500,250") from None


def run(args) -> int:
    """Text (or image) to video: checks every flag, loads the components, generates, writes the video."""
    request = check_request(args)
    if args.attention == "radial" and args.dense_timesteps + args.dense_final_timesteps >= request.steps:
        print(f"note: --dense-timesteps {args.dense_timesteps} and --dense-final-timesteps "
              f"{args.dense_final_timesteps} cover all {request.steps} steps: every step runs dense attention")
    from models.wan import pipeline
    from radial_jax.plan import RadialPlan

    attention = RadialPlan(mode=args.attention, dense_layers=args.dense_layers, dense_timesteps=args.dense_timesteps,
                           dense_final_timesteps=args.dense_final_timesteps, decay_factor=args.decay_factor,
                           dense_implementation=DENSE_IMPLEMENTATIONS[args.dense_implementation])  # fmt: skip
    start = time.perf_counter()
    components = _load_components(args, attention, request.image is not None)
    if request.loras:
        from convert.lora import merge_loras

        merge_loras(components.dit, list(request.loras))
        print("merged LoRA " + ", ".join(f"{path} (strength {strength:g})" for path, strength in request.loras))
    print(f"loaded in {time.perf_counter() - start:.1f} s; generating {request.frames} frames at "
          f"{request.width}x{request.height}, {request.steps} steps ({args.sampler}), "
          f"{_guidance_note(request.experts, args)}, attention {args.attention}"
          + (f" (preset {args.preset})" if args.preset else ""))  # fmt: skip
    for dit in (components.dit, components.low_noise_dit):  # the low-noise expert of an A14B too
        if dit is not None:
            _place_on_mesh(dit, request.mesh)
    start = time.perf_counter()
    with Progress(request.steps) as progress, _active(request.mesh):
        video = pipeline.generate(
            components, args.prompt, negative_prompt=args.negative_prompt, image=request.image,
            frames=request.frames, height=request.height, width=request.width, steps=request.steps,
            guidance=args.guidance, guidance_low=args.guidance_low, shift=args.shift, seed=args.seed,
            sampler=args.sampler, timesteps=request.timesteps, free_text_encoder=True,
            on_step=progress.step, on_stage=progress.stage,
        )  # fmt: skip
    write_video(video, request.out, pipeline.FPS)
    print(f"wrote {request.out}: {video.shape[0]} frames, {request.width}x{request.height}, {pipeline.FPS} fps "
          f"({time.perf_counter() - start:.1f} s)" + ("; random weights: the video is noise" if not args.ckpt else ""))
    return 0


def check_request(args) -> Request:
    """Returns the checked request, or raises ValueError naming the first flag that is wrong.

    Everything that can be known without loading weights is checked here: numbers and their
    ranges, the output path, the image, the LoRA files, and --ckpt's config against --image,
    --size, --dense-layers and the LoRAs.
    """
    apply_preset(args)
    defaults = CKPT_DEFAULTS if args.ckpt else TINY_DEFAULTS
    width, height = _parse_size(args.size or defaults["size"])
    frames = defaults["frames"] if args.frames is None else args.frames
    experts = _checkpoint_experts(args.ckpt)
    if args.guidance is None and experts is None:
        args.guidance = WAN21_GUIDANCE
    if args.guidance_low is not None and experts is None:
        raise ValueError("--guidance-low is for a Wan2.2 A14B checkpoint (two experts); this one has one DiT")
    timesteps = _parse_timesteps(args.timesteps)
    if args.sampler == "distilled":
        steps = _distilled_steps(args, timesteps)
    elif timesteps is not None:
        raise ValueError(f"--timesteps is for --sampler distilled, not {args.sampler}; drop it or pass "
                         "--sampler distilled")  # fmt: skip
    else:
        steps = (experts.steps if experts else defaults["steps"]) if args.steps is None else args.steps
    _check_numbers(args, steps)
    from radial_jax.cli.outputs import VIDEO_SUFFIXES, check_output_file

    out = check_output_file(args.out, "--out", VIDEO_SUFFIXES)
    try:
        import imageio.v2  # noqa: F401  (checked first: a missing writer should not cost a whole run)
        import imageio_ffmpeg  # noqa: F401
    except ImportError:
        raise ValueError("writing a video needs imageio and imageio-ffmpeg: pip install -e \".[video]\"") from None
    loras = tuple(_lora_arg(arg) for arg in args.lora)
    image = _read_image(args.image) if args.image else None
    config = _checkpoint_config(args.ckpt, image is not None)
    from models.wan import pipeline

    pipeline.check_video_size(frames, height, width, config.patch_size)
    if args.attention == "radial" and args.dense_layers > config.num_layers:
        raise ValueError(f"--dense-layers {args.dense_layers} is more than the DiT's {config.num_layers} blocks; "
                         "for dense attention everywhere pass --attention dense")  # fmt: skip
    if loras and experts is not None:  # Wan2.2 LoRAs come as a pair, one per expert
        raise ValueError("--lora on a Wan2.2 A14B checkpoint (two experts) is not supported yet")
    if loras:  # names and shapes against the checkpoint's config, before minutes of loading
        from convert.lora import lora_updates

        for path, strength in loras:
            lora_updates(path, config, strength=strength)
    mesh = _check_mesh(args.mesh, config)
    return Request(width, height, frames, steps, out, image, loras, config, timesteps, mesh, experts)


def _check_mesh(spec: str, config):
    """Returns the mesh of --mesh: only a `sequence` axis (one video, one DiT pass at a time)."""
    from radial_jax.parallel import SEQUENCE_AXIS
    from radial_jax.sharding import make_mesh, parse_mesh

    if any(size > 1 for axis, size in parse_mesh(spec).items() if axis != SEQUENCE_AXIS):
        raise ValueError(f"--mesh {spec!r}: generate splits only the video's tokens; use --mesh sequence=N")
    mesh = make_mesh(spec)
    devices = mesh.shape[SEQUENCE_AXIS]
    if devices > 1 and config.num_heads % devices:
        padded = -(-config.num_heads // devices) * devices
        print(f"note: {config.num_heads} heads on {devices} devices run as {padded} (zero heads padded): "
              f"{config.num_heads / padded:.0%} attention efficiency")
    return mesh


def _place_on_mesh(dit, mesh) -> None:
    """Replicates the DiT's weights over the mesh's devices once (not at every step)."""
    if mesh.size == 1:
        return
    import jax
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec

    nnx.update(dit, jax.device_put(nnx.state(dit), NamedSharding(mesh, PartitionSpec())))
    print(f"sequence parallel: the video's tokens split over {mesh.size} devices")


def _active(mesh):
    """Returns a context that makes the mesh active (the DiT then splits its tokens over it)."""
    if mesh.size == 1:
        return contextlib.nullcontext()
    import jax

    return jax.set_mesh(mesh)


def _checkpoint_experts(ckpt: str | None):
    """Returns --ckpt's ExpertSwitch if it is a Wan2.2 A14B (two experts), else None."""
    if not ckpt or not Path(ckpt).is_dir():
        return None  # _checkpoint_config says what is wrong with it
    from convert.wan22 import LOW_NOISE_SUBFOLDER, read_expert_switch

    return read_expert_switch(ckpt) if (Path(ckpt) / LOW_NOISE_SUBFOLDER).is_dir() else None


def _guidance_note(experts, args) -> str:
    """Returns the guidance the run uses: one scale, or an A14B's two experts and their switch."""
    if experts is None:
        return f"guidance {args.guidance:g}"
    from models.wan.experts import expert_guidance

    high, low = expert_guidance(experts, args.guidance, args.guidance_low)
    return (f"two experts: high-noise while t >= {experts.boundary_timestep:g} (guidance {high:g}), "
            f"then low-noise (guidance {low:g})")


def _distilled_steps(args, timesteps: tuple[float, ...] | None) -> int:
    """Returns the distilled sampler's step count (one per timestep), checking --timesteps and --steps."""
    from models.wan import sampler as sampler_lib

    timesteps = sampler_lib.LIGHTX2V_TIMESTEPS if timesteps is None else timesteps
    try:
        sampler_lib.distilled_sigmas(timesteps, 1.0)
    except ValueError:
        raise ValueError(f"--timesteps {args.timesteps} must be decreasing numbers in (0, 1000], e.g. "
                         "1000,750,500,250") from None  # fmt: skip
    if args.steps is not None and args.steps != len(timesteps):
        raise ValueError(f"--steps {args.steps}: --sampler distilled runs one step per timestep ({len(timesteps)}); "
                         "drop --steps or change --timesteps")  # fmt: skip
    return len(timesteps)


def _check_numbers(args, steps: int) -> None:
    """Raises ValueError naming the one numeric flag that is out of range."""
    checks = (
        (steps >= 1, f"--steps {steps} must be >= 1"),
        *((g is None or (g >= 0 and math.isfinite(g)), f"{flag} {g} must be >= 0")
          for flag, g in (("--guidance", args.guidance), ("--guidance-low", args.guidance_low))),
        (args.shift is None or (args.shift > 0 and math.isfinite(args.shift)), f"--shift {args.shift} must be > 0"),
        (0 <= args.seed <= MAX_SEED, f"--seed {args.seed} must be in 0..{MAX_SEED}"),
        (args.decay_factor > 0 and math.isfinite(args.decay_factor), f"--decay-factor {args.decay_factor} must be > 0"),
        (args.dense_layers >= 0, f"--dense-layers {args.dense_layers} must be >= 0"),
        (args.dense_timesteps >= 0, f"--dense-timesteps {args.dense_timesteps} must be >= 0"),
        (args.dense_final_timesteps >= 0, f"--dense-final-timesteps {args.dense_final_timesteps} must be >= 0"),
    )
    for ok, message in checks:
        if not ok:
            raise ValueError(message)


def _checkpoint_config(ckpt: str | None, i2v: bool):
    """Returns the DiT config of --ckpt (or of the tiny preset), checked against --image."""
    if not ckpt:
        from models.wan import pipeline

        return pipeline.TINY_I2V if i2v else pipeline.TINY_T2V
    root = Path(ckpt)
    if not root.exists():
        raise ValueError(f"--ckpt {ckpt} does not exist; pass the folder radial-jax convert --dst wrote")
    if not root.is_dir():
        raise ValueError(f"--ckpt {ckpt} is a file; pass the folder radial-jax convert --dst wrote")
    from convert import GENERATION_PARTS, read_config

    missing = [part + "/" for part in GENERATION_PARTS if not (root / part).is_dir()]
    if missing:
        raise ValueError(f"--ckpt {ckpt} has no {', '.join(missing)}; convert the whole Wan2.1 folder "
                         "(not one file): radial-jax convert --src WAN_FOLDER --dst NEW_DIR")  # fmt: skip
    _, config = read_config(root)
    if config.model_type == "t2v" and i2v:
        raise ValueError(f"--image given but --ckpt {ckpt} is a text-to-video model; drop --image or use an I2V one")
    if config.model_type == "i2v" and not i2v:
        raise ValueError(f"--ckpt {ckpt} is an image-to-video model; pass the first frame with --image")
    if config.uses_clip and not (root / "image_encoder").is_dir():
        raise ValueError(f"--ckpt {ckpt} is an image-to-video model without image_encoder/; convert its whole folder")
    return config


def _lora_arg(arg: str) -> tuple[Path, float]:
    """Returns (path, strength) of a --lora FILE[:STRENGTH] naming an existing .safetensors file."""
    path, strength = arg, 1.0
    head, colon, tail = arg.rpartition(":")
    if colon and head.lower().endswith(".safetensors"):  # FILE:STRENGTH (a colon inside a path stays)
        path = head
        try:
            strength = float(tail)
        except ValueError:
            raise ValueError(f"--lora {arg}: strength {tail!r} is not a number (FILE[:STRENGTH], e.g. a.safetensors:0.8)") from None
        if not math.isfinite(strength):
            raise ValueError(f"--lora {arg}: strength {tail!r} must be a finite number")
    if Path(path).suffix.lower() != ".safetensors":
        raise ValueError(f"--lora {arg}: not a .safetensors file (FILE[:STRENGTH])")
    if not Path(path).is_file():
        raise ValueError(f"--lora {arg}: {path} does not exist")
    return Path(path), strength


def _read_image(path: str) -> np.ndarray:
    from PIL import Image

    if not Path(path).is_file():
        raise ValueError(f"--image {path}: no such file")
    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB"))
    except OSError as e:
        raise ValueError(f"--image {path}: cannot read it as an image ({e})") from None


def _load_components(args, attention, i2v: bool):
    if not args.ckpt:
        import jax

        from models.wan import pipeline

        print("no --ckpt: the built-in tiny preset with seeded random weights (no download); the video is "
              "meaningless noise. Convert a Wan2.1 checkpoint (radial-jax convert) and pass --ckpt for a real one.")
        if jax.default_backend() == "cpu":  # what "auto" picks there, named so that it does not warn mid-bar
            attention = dataclasses.replace(attention, implementation="reference")
        return pipeline.tiny_components(seed=args.seed, model_type="i2v" if i2v else "t2v", attention=attention,
                                        vae_dtype={"bf16": "bfloat16", "f32": "float32"}[args.vae_dtype])  # fmt: skip
    from convert import load_pipeline

    return load_pipeline(args.ckpt, dtype=args.dtype, attention=attention, vae_dtype=args.vae_dtype)


class Progress:
    """Progress of one generation on the terminal: a line with the seconds of each stage (umT5
    encode, image encode, VAE decode), and a tqdm bar over the sampling steps showing each step's
    seconds and attention, marking the first step of each compiled program (dense, radial).
    Warnings and log records raised while the bar is open print above it, not inside it."""

    def __init__(self, steps: int):
        self.steps = steps
        self.bar = None
        self.compiled: set[bool] = set()  # which step programs (dense: True, radial: False) have run
        self.last = time.perf_counter()
        self._exits = contextlib.ExitStack()
        self._bar_started = False  # a bar may be on stderr's last line until it is closed

    def stage(self, name: str, seconds: float) -> None:
        self._write(f"{name}: {seconds:.1f} s")
        self.last = time.perf_counter()

    def step(self, step: int, num_steps: int, dense: bool) -> None:
        now = time.perf_counter()
        if self.bar is None:
            from tqdm.auto import tqdm

            self._bar_started = True
            self.bar = self._exits.enter_context(tqdm(total=num_steps, unit="step", desc="denoising"))
        note = "" if dense in self.compiled else " (incl. compile)"
        self.compiled.add(dense)
        self.bar.set_postfix_str(f"{now - self.last:.2f} s/step{note}, {'dense' if dense else 'radial'}")
        self.bar.update(1)
        self.last = now
        if step + 1 == num_steps:  # before the VAE decode, which is not a step
            self.bar.close()
            self.bar, self._bar_started = None, False

    def _write(self, line: str) -> None:
        if self.bar is None:
            print(line)
        else:
            self.bar.write(line)

    def _show_warning(self, message, category, filename, lineno, file=None, line=None) -> None:
        from tqdm.auto import tqdm

        tqdm.write(warnings.formatwarning(message, category, filename, lineno, line).rstrip(), file=sys.stderr)

    def __enter__(self):
        from tqdm.contrib.logging import logging_redirect_tqdm

        self._exits.enter_context(logging_redirect_tqdm())
        self._exits.enter_context(warnings.catch_warnings())  # restores showwarning on exit
        warnings.showwarning = self._show_warning
        return self

    def __exit__(self, *exc):
        bar, self.bar = self.bar, None
        self._exits.close()  # closes the bar, which ends its line
        if self._bar_started and bar is None:
            # Interrupted (Ctrl-C, SIGTERM) while tqdm was drawing its first line, before the bar was
            # ours to close: end that line, so that what follows (the interruption note) starts its own.
            print(file=sys.stderr)


def _preset_help(text: str, flag: str, default: str | None = None) -> str:
    """Returns a flag's help with its default and each preset's value."""
    presets = "; ".join(f"--preset {name}: {values[flag]}" for name, values in PRESETS.items() if flag in values)
    return f"{text} (default {default or BASE[flag]}" + (f"; {presets})" if presets else ")")


def add_parser(sub) -> None:
    p = sub.add_parser("generate", help="text/image to video with Wan2.1 or Wan2.2 A14B (no --ckpt: a tiny random model)",
                       description="Generate a video with a converted Wan2.1 or Wan2.2 A14B checkpoint (radial-jax "
                                   "convert) and "
                                   "write it as mp4. Without --ckpt, a built-in tiny model with random weights "
                                   "runs on the CPU in seconds and writes a meaningless video.")  # fmt: skip
    p.add_argument("--ckpt", help="converted checkpoint folder (radial-jax convert --dst); default: tiny random preset")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="what to generate")
    p.add_argument("--negative-prompt", help="what to avoid (default: Wan2.1's default negative prompt)")
    p.add_argument("--image", help="first frame for an I2V checkpoint (png, jpg)")
    p.add_argument("--size", help="WIDTHxHEIGHT, multiples of 16: 832x480 or 1280x720 (default 832x480; tiny 160x96)")
    p.add_argument("--frames", type=int, help="video frames, 4k+1 (default 81; tiny 17)")
    p.add_argument("--preset", choices=tuple(PRESETS),
                   help="settings for a kind of checkpoint; flags given explicitly win. lightx2v: LightX2V's "
                        "4-step step- and CFG-distilled Wan2.1 LoRAs (pass the LoRA with --lora): --sampler "
                        "distilled --timesteps 1000,750,500,250 --shift 5 --guidance 1 --dense-layers 1 "
                        "--dense-timesteps 1 --decay-factor 0.2 --vae-dtype f32 --dense-implementation mosaic")  # fmt: skip
    p.add_argument("--steps", type=int, help="sampling steps (default 50, Wan2.2 A14B 40; tiny 16; --sampler "
                                             "distilled: one per timestep)")  # fmt: skip
    p.add_argument("--guidance", type=float,
                   help=_preset_help("classifier-free guidance scale, of the high-noise expert on a Wan2.2 A14B; 1: "
                                     "one DiT pass a step, no negative prompt", "guidance",
                                     f"{WAN21_GUIDANCE}; Wan2.2 A14B T2V 4.0, I2V 3.5"))  # fmt: skip
    p.add_argument("--guidance-low", type=float,
                   help="Wan2.2 A14B: the low-noise expert's guidance (default: --guidance if given, else T2V 3.0, "
                        "I2V 3.5)")  # fmt: skip
    p.add_argument("--shift", type=float,
                   help=_preset_help("flow shift", "shift", "3.0 at 480p, 5.0 at 720p; Wan2.2 A14B T2V 12.0, I2V 5.0"))
    p.add_argument("--seed", type=int, default=0, help="noise seed (default %(default)s)")
    p.add_argument("--sampler", choices=("unipc", "euler", "distilled"),
                   help=_preset_help("unipc and euler: Wan's shifted schedule over --steps; distilled: flow Euler at "
                                     "a step-distilled model's training timesteps (--timesteps)", "sampler"))
    p.add_argument("--timesteps", metavar="T1,T2,...",
                   help="--sampler distilled's timesteps, decreasing in (0, 1000] (default 1000,750,500,250: "
                        "LightX2V's 4-step distillation)")  # fmt: skip
    p.add_argument("--attention", choices=("dense", "radial"), default="radial", help="self-attention (default %(default)s)")
    p.add_argument("--dense-layers", type=int, help=_preset_help("first N blocks stay dense", "dense_layers"))
    p.add_argument("--dense-timesteps", type=int, help=_preset_help("first N steps stay dense", "dense_timesteps"))
    p.add_argument("--dense-final-timesteps", type=int, default=0, help="last N steps stay dense (default %(default)s)")
    p.add_argument("--decay-factor", type=float,
                   help=_preset_help("radial window decay, > 0", "decay_factor", "0.2; mask and demo default to 1.0"))
    p.add_argument("--dense-implementation", choices=tuple(DENSE_IMPLEMENTATIONS),
                   help=_preset_help("dense steps' and dense layers' self-attention: dense is cuDNN; mosaic is our "
                                     "Hopper kernel with every block on (~10%% faster than cuDNN at 720p on an "
                                     "H200; cuDNN elsewhere)", "dense_implementation"))  # fmt: skip
    p.add_argument("--vae-dtype", choices=("bf16", "f32"),
                   help=_preset_help("VAE (decode, and I2V's image encode); bf16 halves its memory, adds ~1 uint8 "
                                     "level of error and decodes 720p-81f in 2.1 s instead of 3.2 s on an H200",
                                     "vae_dtype"))  # fmt: skip
    p.add_argument("--dtype", choices=("bf16", "f32"), default="bf16",
                   help="DiT and encoders of --ckpt (default %(default)s; the tiny preset is float32)")
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:STRENGTH]",
                   help="LoRA weights (.safetensors; original, diffusers, PEFT or kohya names, and LightX2V's "
                        "layout with .diff/.diff_b/.diff_m deltas) merged into the DiT before generating; "
                        "repeatable; strength default 1")
    p.add_argument("--mesh", default="", metavar="sequence=N",
                   help="split the video's tokens over N devices (sequence parallel; default: one device)")
    p.add_argument("--out", default="video.mp4", help="video to write: .mp4, .mkv, .mov or .avi (default %(default)s)")
    p.set_defaults(func=run, interrupted="no video written to {out}")
