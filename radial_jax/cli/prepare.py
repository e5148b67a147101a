"""`radial-jax prepare`: videos + captions -> a cache of VAE latents and umT5 contexts for training."""

import time
from pathlib import Path

from radial_jax.cli.generate import CKPT_DEFAULTS, TINY_DEFAULTS, _parse_size

SYNTHETIC_WIDER = 1.25  # synthetic clips are this much wider than --size, so the centre crop is exercised


def run(args) -> int:
    """Lists the sources, loads the encoders, encodes what is not cached yet, reports what was skipped."""
    defaults = CKPT_DEFAULTS if args.ckpt else TINY_DEFAULTS
    width, height = _parse_size(args.size or defaults["size"])
    frames = defaults["frames"] if args.frames is None else args.frames
    try:
        import imageio_ffmpeg  # noqa: F401  checked first: without it every video would be skipped
    except ImportError:
        raise ValueError("decoding videos needs imageio-ffmpeg: pip install -e \".[video]\"") from None
    from train import cache, video

    config = cache.PrepareConfig(width=width, height=height, frames=frames, mode=args.mode, windows=args.windows)
    cache.check_out(args.out, config)
    if args.synthetic is not None:
        wide = 2 * round(width * SYNTHETIC_WIDER / 2)
        video.write_synthetic_dataset(args.source, args.synthetic, frames=frames + frames // 2, width=wide,
                                      height=height, seed=args.seed)  # fmt: skip
        print(f"{args.source}: {args.synthetic} synthetic clips (mp4 + txt, {wide}x{height}, 16 fps)")
    sources, skipped = cache.find_sources(args.source)
    start = time.perf_counter()
    if args.ckpt:
        encoders = cache.load_encoders(args.ckpt, dtype=args.dtype)
    else:
        print("no --ckpt: the tiny preset's seeded random VAE and umT5 (the same as generate's and the tiny "
              "training config's); pass --ckpt (radial-jax convert) to train a real model")  # fmt: skip
        encoders = cache.tiny_encoders(seed=0)
    print(f"encoders loaded in {time.perf_counter() - start:.1f} s; {len(sources)} videos -> {frames} frames at "
          f"{width}x{height}, 16 fps, mode {args.mode}")  # fmt: skip
    report = cache.prepare_cache(sources, args.out, config, encoders, skipped=skipped)
    total = report.written + report.reused
    print(f"{args.out}: {total} samples ({report.written} encoded now, {report.reused} already cached); "
          f"manifest {report.manifest}")  # fmt: skip
    if report.skipped:
        print(f"skipped {len(report.skipped)} videos:")
        for name, reason in report.skipped:
            print(f"  {name}: {reason}")
    if total == 0:
        print(f"radial-jax prepare: error: no usable video in {args.source}; see the reasons above")
        return 1
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("prepare", help="encode training videos + captions once into a latent cache",
                       description="Encode a folder of videos (mp4/webm/mov, each with a NAME.txt caption) or a "
                                   "JSONL of {\"video_path\", \"caption\"} into a training cache: resampled to 16 "
                                   "fps, windows of --frames frames, resized and centre-cropped to --size, VAE "
                                   "latents and umT5 contexts, one safetensors file per sample plus manifest.json. "
                                   "Rerunning skips finished samples; unusable videos are skipped and listed. "
                                   "Without --ckpt, the tiny preset's random encoders (for the tiny config and "
                                   "tests).")  # fmt: skip
    p.add_argument("source", type=Path, help="folder of videos with NAME.txt captions, or a .jsonl file")
    p.add_argument("--out", type=Path, required=True, help="cache folder (new, empty, or an earlier run's to resume)")
    p.add_argument("--ckpt", help="converted checkpoint (radial-jax convert --dst) whose VAE, umT5 and tokenizer "
                                  "encode; default: the tiny random preset")  # fmt: skip
    p.add_argument("--dtype", choices=("bf16", "f32"), help="umT5's dtype with --ckpt (default: as converted)")
    p.add_argument("--size", help="WIDTHxHEIGHT, multiples of 16 (default 832x480; tiny 160x96)")
    p.add_argument("--frames", type=int, help="frames a sample, 4k+1 (default 81; tiny 17)")
    p.add_argument("--mode", choices=("head", "uniform", "chunked"), default="head",
                   help="which windows of a video: its first frames, --windows evenly spread windows, or every "
                        "non-overlapping window (default %(default)s)")  # fmt: skip
    p.add_argument("--windows", type=int, default=1, help="windows a video in --mode uniform (default %(default)s)")
    p.add_argument("--synthetic", type=int, metavar="N",
                   help="first write N synthetic clips (moving shapes + captions) into SOURCE (new or empty; "
                        "reused by a rerun of the same command)")
    p.add_argument("--seed", type=int, default=0, help="of the synthetic clips (default %(default)s)")
    p.set_defaults(func=run, interrupted="samples finished so far are kept; the same command resumes")
