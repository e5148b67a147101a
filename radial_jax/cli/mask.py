"""`radial-jax mask`: build the radial block mask for a video size, print its figures, draw it."""

import argparse
import math
import time
from pathlib import Path

import numpy as np

from radial_jax import mask as mask_lib


def add_mask_args(p: argparse.ArgumentParser, frames: int, height: int, width: int) -> None:
    """The video size and mask rule flags that `mask` and `demo` share."""
    p.add_argument("--model", choices=mask_lib.MODELS, default="wan", help="mask rule (wan: frame 0 is a sink)")
    p.add_argument("--frames", type=int, default=frames, help="video frames, 4k+1 (default %(default)s)")
    p.add_argument("--height", type=int, default=height, help="video height in pixels (default %(default)s)")
    p.add_argument("--width", type=int, default=width, help="video width in pixels (default %(default)s)")
    p.add_argument("--decay-factor", type=float, default=1.0,
                   help="window decay, > 0 (default %(default)s, the paper's figures; generate defaults to 0.2)")
    p.add_argument("--block", type=int, default=128, help="tokens per mask block (default %(default)s)")
    p.add_argument("--extra-tokens", type=int, default=0, help="tokens after the video, e.g. text (default 0)")


def build_mask(args) -> tuple[mask_lib.VideoTokens, np.ndarray, float]:
    """Returns (token geometry, bool block mask [QB, KB], seconds taken to build it)."""
    geometry = mask_lib.video_tokens(args.frames, args.height, args.width)
    start = time.perf_counter()
    block_mask = mask_lib.radial_block_mask(
        geometry.num_frames, geometry.tokens_per_frame, block_size=args.block,
        decay_factor=args.decay_factor, model=args.model, extra_tokens=args.extra_tokens,
    )
    return geometry, block_mask, time.perf_counter() - start


def print_mask_summary(args, geometry, block_mask, seconds) -> None:
    n = geometry.num_tokens + args.extra_tokens
    pairs = mask_lib.computed_token_pairs(block_mask, args.block, n, n)
    print(f"video {args.frames}x{args.height}x{args.width} -> {geometry.num_frames} latent frames "
          f"x {geometry.tokens_per_frame} tokens = {geometry.num_tokens} tokens (+{args.extra_tokens} extra)")
    print(f"blocks: {block_mask.shape[0]} x {block_mask.shape[1]} of {args.block} tokens, "
          f"{int(block_mask.sum())} on, density {mask_lib.block_density(block_mask):.4f} "
          f"(built in {seconds * 1e3:.0f} ms)")
    print(f"attention FLOPs vs dense: {pairs / n**2:.4f} ({n**2 / pairs:.2f}x fewer)")


def check_args(args) -> Path | None:
    """Returns the checked --png path (or None), or raises ValueError naming the wrong flag."""
    if not (args.decay_factor > 0 and math.isfinite(args.decay_factor)):
        raise ValueError(f"--decay-factor {args.decay_factor} must be > 0")
    if args.block < 16 or args.block % 16:
        raise ValueError(f"--block {args.block} must be a positive multiple of 16 (64 or 128 in the paper)")
    if args.extra_tokens < 0:
        raise ValueError(f"--extra-tokens {args.extra_tokens} must be >= 0")
    mask_lib.video_tokens(args.frames, args.height, args.width)  # frames 4k+1, height/width multiples of 16
    if not args.png:
        return None
    from radial_jax.cli.outputs import check_output_file

    return check_output_file(args.png, "--png", (".png",))


def mask_title(args, geometry, block_mask) -> list[str]:
    """Returns the picture's title lines: model, video size, token counts, density and decay."""
    extra = f" + {args.extra_tokens} extra tokens" if args.extra_tokens else ""
    return [f"Radial block mask, model {args.model}: video {args.frames} frames x {args.height}x{args.width} px "
            f"-> {geometry.num_frames} latent frames x {geometry.tokens_per_frame} tokens{extra}",
            f"{block_mask.shape[0]} x {block_mask.shape[1]} blocks of {args.block} tokens, "
            f"density {mask_lib.block_density(block_mask):.3f} of blocks computed, decay factor {args.decay_factor:g}"]


def run(args) -> int:
    png = check_args(args)
    geometry, block_mask, seconds = build_mask(args)
    print_mask_summary(args, geometry, block_mask, seconds)
    if png:
        write_png(png, args, geometry, block_mask)
    return 0


def write_png(png: Path, args, geometry, block_mask) -> None:
    """Draws the mask with axes, frame lines and title into `png` (temporary name, then renamed)."""
    from radial_jax.cli.outputs import replaced_atomically
    from radial_jax.plot import save_block_mask_png

    with replaced_atomically(png) as partial:
        save_block_mask_png(block_mask, partial, frame_tokens=geometry.tokens_per_frame,
                            num_frames=geometry.num_frames, block_size=args.block,
                            title=mask_title(args, geometry, block_mask))  # fmt: skip
    print(f"wrote {png}")


def add_parser(sub) -> None:
    p = sub.add_parser("mask", help="build the radial block mask, print its density, draw it",
                       description="Build the radial block mask for a video size, print tokens, blocks, "
                                   "density and FLOPs vs dense, and optionally draw it to a PNG.")
    add_mask_args(p, 81, 720, 1280)
    p.add_argument("--png", help="write a picture of the block mask here (.png)")
    p.set_defaults(func=run, interrupted="nothing written")
