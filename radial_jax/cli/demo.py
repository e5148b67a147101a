"""`radial-jax demo`: the Wan 720p-81f mask, then radial attention against a float64 dense check."""

import time

import numpy as np

from radial_jax import mask as mask_lib
from radial_jax.cli import mask as mask_cli


def run(args) -> int:
    """Mask for Wan 720p-81f, then radial attention vs a float64 dense check on a small problem."""
    import jax
    import jax.numpy as jnp

    from radial_jax.attention import radial_attention

    png = mask_cli.check_args(args)
    for flag in ("small_frames", "small_tokens_per_frame", "heads", "head_dim"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} {getattr(args, flag)} must be >= 1")
    geometry, block_mask, seconds = mask_cli.build_mask(args)
    mask_cli.print_mask_summary(args, geometry, block_mask, seconds)
    if png:
        mask_cli.write_png(png, args, geometry, block_mask)
    small = mask_lib.radial_block_mask(args.small_frames, args.small_tokens_per_frame, block_size=args.block,
                                       decay_factor=args.decay_factor, model=args.model)
    n = args.small_frames * args.small_tokens_per_frame
    keys = jax.random.split(jax.random.key(args.seed), 3)
    q, k, v = (jax.random.normal(key, (1, n, args.heads, args.head_dim), jnp.float32) for key in keys)
    # What "auto" picks without a GPU, named so that it does not warn in the middle of the output.
    implementation = "auto" if jax.default_backend() == "gpu" else "reference"
    start = time.perf_counter()
    out = jax.block_until_ready(radial_attention(q, k, v, block_mask=small, block_size=args.block,
                                                 implementation=implementation))  # fmt: skip
    seconds = time.perf_counter() - start
    expected = _float64_masked_attention(np.asarray(q), np.asarray(k), np.asarray(v),
                                         mask_lib.expand_block_mask(small, args.block, n, n))
    err = float(np.abs(np.asarray(out) - expected).max() / np.abs(expected).max())
    print(f"radial attention on {n} tokens x {args.heads} heads (density {small.mean():.3f}, "
          f"backend {jax.default_backend()}, implementation {implementation}): {seconds:.2f} s, max error vs float64 dense-masked {err:.1e}")
    return 0 if err < 1e-4 else 1


def _float64_masked_attention(q, k, v, token_mask):
    q, k, v = (x.astype(np.float64) for x in (q, k, v))
    logits = np.einsum("blnd,bmnd->bnlm", q, k) / np.sqrt(q.shape[-1])
    logits = np.where(token_mask, logits, -np.inf)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    return np.einsum("bnlm,bmnd->blnd", probs / probs.sum(-1, keepdims=True), v)


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="offline demo: the 720p-81f mask and a small radial-vs-dense check",
                       description="Offline demo with no download: builds the Wan 720p-81f mask (and a PNG "
                                   "of it), then runs radial attention on a small random problem and checks "
                                   "it against float64 dense masked attention.")
    mask_cli.add_mask_args(p, 81, 720, 1280)
    p.add_argument("--png", default="radial_mask.png", help="picture of the mask, .png (default %(default)s)")
    p.add_argument("--small-frames", type=int, default=8, help="latent frames of the small problem")
    p.add_argument("--small-tokens-per-frame", type=int, default=200, help="tokens per latent frame of it")
    p.add_argument("--heads", type=int, default=2, help="attention heads of it (default %(default)s)")
    p.add_argument("--head-dim", type=int, default=64, help="head width of it (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of its random q, k, v (default %(default)s)")
    p.set_defaults(func=run, interrupted="{png} is complete or absent")
