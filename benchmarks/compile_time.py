"""Compile time of the Wan DiT forward: 40 unrolled blocks (the model as built) vs the same
blocks under one lax.scan (a candidate for nnx.scan), abstractly (no weights allocated).

    python benchmarks/compile_time.py [--preset t2v-14B] [--layers 1,8,40] [--out FILE]
    python benchmarks/compile_time.py --dry-run          # tiny preset, seconds

jax.jit(forward).lower(abstract state, abstract inputs).compile() on the default backend,
timed in process CPU seconds per layer count; the scan variant stacks one block's abstract state along a leading
layer axis and scans a WanBlock over it (block 0 kept apart, as dense_layers=1 would). Both
with the dense plan at a small latent (2 x 16 x 16), bf16: compile time depends on the program,
not the sizes. Prints one JSON object.
"""

import argparse
import dataclasses
import datetime
import json
import sys
import time


def abstract(tree):
    import jax

    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tree)


def compile_seconds(fn, *args) -> float:
    """Returns the CPU seconds (all threads of this process) of tracing, lowering and compiling:
    unlike wall time, not inflated by other processes sharing the machine."""
    import jax

    start = time.process_time()
    jax.jit(fn).lower(*args).compile()
    return time.process_time() - start


def measure(preset: str, layers: int) -> dict:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from models.wan import PRESETS, WanModel
    from models.wan.rope import rope_tables
    from models.wan.transformer import WanBlock
    from radial_jax.attention import dense_attention

    config = dataclasses.replace(PRESETS[preset], num_layers=layers, param_dtype="bfloat16", dtype="bfloat16")
    graphdef, state = nnx.split(nnx.eval_shape(lambda: WanModel(config, rngs=nnx.Rngs(0))))
    latents = jax.ShapeDtypeStruct((1, 2, 16, 16, config.in_dim), jnp.bfloat16)
    timestep = jax.ShapeDtypeStruct((1,), jnp.float32)
    context = jax.ShapeDtypeStruct((1, config.text_len, config.text_dim), jnp.bfloat16)

    def unrolled(state, latents, timestep, context):
        return nnx.merge(graphdef, state)(latents, timestep, context)

    block_def, block_state = nnx.split(nnx.eval_shape(lambda: WanBlock(config, rngs=nnx.Rngs(0))))
    stacked = jax.tree.map(lambda a: jax.ShapeDtypeStruct((layers - 1, *a.shape), a.dtype), abstract(block_state))
    tokens = 2 * 8 * 8
    x = jax.ShapeDtypeStruct((1, tokens, config.dim), jnp.float32)
    e0 = jax.ShapeDtypeStruct((1, 6, config.dim), jnp.float32)
    ctx = jax.ShapeDtypeStruct((1, config.text_len, config.dim), jnp.float32)

    def blocks_unrolled(first, rest, x, e0, ctx):
        rope = rope_tables((2, 8, 8), config.head_dim, config.rope_theta)
        x = nnx.merge(block_def, first)(x, e0, ctx, None, rope, dense_attention)
        for i in range(layers - 1):
            x = nnx.merge(block_def, jax.tree.map(lambda a, i=i: a[i], rest))(x, e0, ctx, None, rope, dense_attention)
        return x

    def blocks_scanned(first, rest, x, e0, ctx):
        rope = rope_tables((2, 8, 8), config.head_dim, config.rope_theta)
        x = nnx.merge(block_def, first)(x, e0, ctx, None, rope, dense_attention)

        def body(x, block_state):
            return nnx.merge(block_def, block_state)(x, e0, ctx, None, rope, dense_attention), None

        return jax.lax.scan(body, x, rest)[0]

    first = abstract(block_state)
    return dict(
        layers=layers,
        model_unrolled_s=round(compile_seconds(unrolled, abstract(state), latents, timestep, context), 2),
        blocks_unrolled_s=round(compile_seconds(blocks_unrolled, first, stacked, x, e0, ctx), 2),
        blocks_scanned_s=round(compile_seconds(blocks_scanned, first, stacked, x, e0, ctx), 2),
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="t2v-14B", help="models.wan.PRESETS key (default %(default)s)")
    parser.add_argument("--layers", default="2,8,20,40", help="block counts to time (default %(default)s)")
    parser.add_argument("--dry-run", action="store_true", help="tiny preset, 2 layers: checks the script runs")
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args(argv)
    import jax

    preset, layers = ("tiny", [2]) if args.dry_run else (args.preset, [int(n) for n in args.layers.split(",")])
    rows = [measure(preset, n) for n in layers]
    result = dict(preset=preset, backend=jax.default_backend(), device=jax.devices()[0].device_kind,
                  jax=jax.__version__, command="python benchmarks/compile_time.py " + " ".join(sys.argv[1:]),
                  date=datetime.date.today().isoformat(), unit="process CPU seconds", rows=rows)  # fmt: skip
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
