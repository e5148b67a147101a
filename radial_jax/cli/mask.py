"""`radial-jax mask`: build the radial block mask for a video size, print its figures, draw it."""

import argparse
import time

import numpy as np

from radial_jax import mask as mask_lib


def add_mask_args(p: argparse.ArgumentParser, frames: int, height: int, width: int) -> None:
    """The video size and mask rule flags that `mask` and `demo` share."""
    p.add_argument("--model", choices=mask_lib.MODELS, default="wan", help="mask rule (wan: frame 0 is a sink)")
    p.add_argument("--frames", type=int, default=frames, help="video frames in pixels, 4k+1 (default %(default)s)")
    p.add_argument("--height", type=int, default=height, help="video height in pixels (default %(default)s)")
    p.add_argument("--width", type=int, default=width, help="video width in pixels (default %(default)s)")
    p.add_argument("--decay-factor", type=float, default=1.0, help="window decay (default %(default)s)")
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


def run(args) -> int:
    geometry, block_mask, seconds = build_mask(args)
    print_mask_summary(args, geometry, block_mask, seconds)
    if args.png:
        from radial_jax.plot import save_block_mask_png

        save_block_mask_png(block_mask, args.png, frame_tokens=geometry.tokens_per_frame,
                            num_frames=geometry.num_frames, block_size=args.block)
        print(f"wrote {args.png}")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("mask", help="build the radial block mask, print its density, draw it",
                       description="Build the radial block mask for a video size, print tokens, blocks, "
                                   "density and FLOPs vs dense, and optionally draw it to a PNG.")
    add_mask_args(p, 81, 720, 1280)
    p.add_argument("--png", help="write a picture of the block mask here")
    p.set_defaults(func=run)
