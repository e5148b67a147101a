"""The two largest pieces of the fast path (`generate --preset lightx2v`) alone, in the forms we could run them.

    python benchmarks/fast_parts.py [--parts conv,attention] [--out FILE]
    python benchmarks/fast_parts.py --dry-run      # small shapes on the CPU: checks the path

conv: the Wan VAE decoder's causal 3x3x3 conv at the three resolutions that hold nearly all of its
FLOPs at 720p (one latent frame in: 4 frames out, 2 cached frames before them), computed three ways
that are the same sum: one 3D conv (what nnx.Conv lowers to), three 2D convs over shifted frame
windows summed (taps2d), one 2D conv over the three frame windows stacked on the channel axis
(stack2d). bf16 (and the 3D conv in float32 as the reference and the f32 decode's cost).
attention: one dense self-attention of the 14B DiT at 720p-81f (75,600 tokens, 40 heads of 128),
bf16: cuDNN (the dense steps' path) vs our block-sparse kernel with every block on.

Each case is called back to back for --settle seconds before --iters timed calls (the H200 runs at
its power cap in a DiT step; benchmarks/NOTES.md), wall clock around a blocking call. Writes JSON
(device, command, date) to --out (default benchmarks/results/fast-parts-<device>.json).
"""

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# (label, frames out, height, width, channels): the decoder's 3x3x3 convs at 720p, per latent frame.
CONV_SHAPES = [("720x1280x96", 4, 720, 1280, 96), ("360x640x192", 4, 360, 640, 192),
               ("180x320x384", 2, 180, 320, 384)]  # fmt: skip
DRY_CONV_SHAPES = [("16x24x8", 4, 16, 24, 8)]
ATTENTION = ("14b-720p-81f", 75_600, 40, 128)
DRY_ATTENTION = ("tiny", 300, 2, 64)


def conv3d(x, w):
    """x: [B, T + 2, H, W, C]; w: [3, 3, 3, C, O] -> [B, T, H, W, O] (valid in time, same in space)."""
    import jax

    return jax.lax.conv_general_dilated(x, w, (1, 1, 1), ((0, 0), (1, 1), (1, 1)),
                                        dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))  # fmt: skip


def _windows(x):
    """The three frame windows of a 3-tap causal conv, each [B * T, H, W, C]."""
    b, t2, h, w, c = x.shape
    return [x[:, k : k + t2 - 2].reshape(b * (t2 - 2), h, w, c) for k in range(3)]


def taps2d(x, w):
    import jax

    conv = lambda a, k: jax.lax.conv_general_dilated(a, k, (1, 1), ((1, 1), (1, 1)),
                                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))  # fmt: skip
    out = sum(conv(a, w[k]) for k, a in enumerate(_windows(x)))
    return out.reshape(x.shape[0], x.shape[1] - 2, *out.shape[1:])


def stack2d(x, w):
    import jax
    import jax.numpy as jnp

    stacked = jnp.concatenate(_windows(x), axis=-1)  # channel k * C + c holds window k's channel c
    kernel = w.transpose(1, 2, 0, 3, 4).reshape(3, 3, 3 * w.shape[3], w.shape[4])
    out = jax.lax.conv_general_dilated(stacked, kernel, (1, 1), ((1, 1), (1, 1)),
                                       dimension_numbers=("NHWC", "HWIO", "NHWC"))  # fmt: skip
    return out.reshape(x.shape[0], x.shape[1] - 2, *out.shape[1:])


def time_call(fn, args, iters: int, settle: float) -> list[float]:
    import jax

    jax.block_until_ready(fn(*args))  # compile
    end = time.perf_counter() + settle
    while time.perf_counter() < end:
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return times


def conv_rows(shapes, iters: int, settle: float) -> list[dict]:
    import jax
    import jax.numpy as jnp

    rows = []
    for label, frames, height, width, channels in shapes:
        kx, kw = jax.random.split(jax.random.key(0))
        x32 = jax.random.normal(kx, (1, frames + 2, height, width, channels), jnp.float32)
        w32 = jax.random.normal(kw, (3, 3, 3, channels, channels), jnp.float32) * (27 * channels) ** -0.5
        flops = 2 * 27 * channels * channels * frames * height * width
        reference = jax.jit(conv3d)(x32, w32)
        cases = [("conv3d", conv3d, jnp.float32)] + [(n, f, jnp.bfloat16) for n, f in
                                                     (("conv3d", conv3d), ("taps2d", taps2d), ("stack2d", stack2d))]
        for name, fn, dtype in cases:
            x, w = x32.astype(dtype), w32.astype(dtype)
            jitted = jax.jit(fn)
            out = jitted(x, w).astype(jnp.float32)
            times = time_call(jitted, (x, w), iters, settle)
            ms = statistics.median(times) * 1e3
            rows.append(dict(part="conv", shape=label, form=name, dtype=jnp.dtype(dtype).name, ms=ms,
                             times_ms=[t * 1e3 for t in times], tflops=flops / (ms * 1e-3) / 1e12,
                             max_abs_err_vs_f32_conv3d=float(jnp.max(jnp.abs(out - reference))),
                             ref_max_abs=float(jnp.max(jnp.abs(reference)))))  # fmt: skip
            print(f"conv {label:14} {name:8} {rows[-1]['dtype']:9} {ms:8.2f} ms {rows[-1]['tflops']:6.0f} TFLOP/s "
                  f"err {rows[-1]['max_abs_err_vs_f32_conv3d']:.2e}", flush=True)  # fmt: skip
    return rows


def attention_rows(case, iters: int, settle: float, dry_run: bool) -> list[dict]:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from radial_jax import dense_attention, radial_attention

    label, tokens, heads, head_dim = case
    keys = jax.random.split(jax.random.key(1), 3)
    q, k, v = (jax.random.normal(key, (1, tokens, heads, head_dim), jnp.bfloat16) for key in keys)
    blocks = -(-tokens // 128)
    mask = np.ones((blocks, blocks), bool)
    impl = "reference" if dry_run else "pallas"
    forms = {"cudnn": lambda q, k, v: dense_attention(q, k, v),
             "ours-all-blocks": lambda q, k, v: radial_attention(q, k, v, block_mask=mask, implementation=impl)}
    flops = 4 * tokens * tokens * heads * head_dim
    outs, rows = {}, []
    for name, fn in forms.items():
        jitted = jax.jit(fn)
        outs[name] = jitted(q, k, v).astype(jnp.float32)
        times = time_call(jitted, (q, k, v), iters, settle)
        ms = statistics.median(times) * 1e3
        rows.append(dict(part="attention", shape=label, form=name, dtype="bfloat16", ms=ms,
                         times_ms=[t * 1e3 for t in times], tflops=flops / (ms * 1e-3) / 1e12))  # fmt: skip
        print(f"attention {label:14} {name:16} {ms:8.2f} ms {rows[-1]['tflops']:6.0f} TFLOP/s", flush=True)
    rows[-1]["max_abs_diff_vs_cudnn"] = float(jnp.max(jnp.abs(outs["ours-all-blocks"] - outs["cudnn"])))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="conv,attention", help="comma list of conv, attention")
    parser.add_argument("--iters", type=int, default=10, help="timed calls per case (median; default %(default)s)")
    parser.add_argument("--settle", type=float, default=1.0, help="seconds of back-to-back calls before timing")
    parser.add_argument("--out", help="JSON path (default benchmarks/results/fast-parts-<device>.json)")
    parser.add_argument("--dry-run", action="store_true", help="small shapes on the CPU")
    args = parser.parse_args(argv)
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    import jax

    if args.dry_run:
        jax.config.update("jax_platforms", "cpu")
    parts = args.parts.split(",")
    rows = []
    if "conv" in parts:
        rows += conv_rows(DRY_CONV_SHAPES if args.dry_run else CONV_SHAPES, args.iters, args.settle)
    if "attention" in parts:
        rows += attention_rows(DRY_ATTENTION if args.dry_run else ATTENTION, args.iters, args.settle, args.dry_run)
    device = jax.devices()[0].device_kind
    out = Path(args.out or f"benchmarks/results/fast-parts-{device.replace(' ', '-').lower()}.json")
    if args.dry_run and not args.out:
        return 0
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(device=device, jax=jax.__version__, command="python " + " ".join(sys.argv),
                                   date=datetime.date.today().isoformat(), rows=rows), indent=1) + "\n")  # fmt: skip
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
