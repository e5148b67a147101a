"""One LoRA training step of the Wan2.1 DiT on one GPU: radial attention vs dense (cuDNN).

    python benchmarks/train_step.py [--shapes 1.3b-480p-161f,14b-720p-81f] [--impls radial,dense]
                                    [--iters 3] [--warmup 1] [--out FILE]
    python benchmarks/train_step.py --dry-run [--out FILE]   # tiny model on the CPU, the same code path

The step is the training's own (train/step.py TrainStep): forward and backward of Wan's
flow-matching loss with jax.checkpoint per block, gradients of the LoRA only (rank 32 on the
self-attention q/k/v/o, float32), gradient clipping and AdamW. Random bf16 base weights are
created on the device (no host copy of the 14B); batch 1, 512 text tokens. Radial: decay 1.0,
our Pallas kernels forward and backward (--radial-impl), dense_layers 2 at 161 frames and 1 at
81 (the reference's settings); dense: every layer through cuDNN. Each (shape, impl) runs in its
own process, so its peak memory is its own. Prints s/step, peak memory and the radial speedup;
writes benchmarks/results/train-step-<device>.json (device, command, date), merging rows into an
existing file of the same device.
"""

import statistics
import sys
import time
from pathlib import Path

from workers import cell, matrix_main, matrix_parser, random_state

GIB = 1 << 30
SHAPES = {  # preset, latent frames, height, width, dense_layers of the radial plan
    "1.3b-480p-161f": ("t2v-1.3B", 41, 60, 104, 2),  # 41 x 30 x 52 = 63,960 tokens
    "14b-720p-81f": ("t2v-14B", 21, 90, 160, 1),  # 21 x 45 x 80 = 75,600 tokens
    "1.3b-480p-81f": ("t2v-1.3B", 21, 60, 104, 1),  # 32,760 tokens
    "tiny": ("tiny", 5, 16, 16, 1),  # --dry-run only: 5 x 8 x 8 = 320 tokens
}
IMPLS = ("radial", "dense")
# The 14B step at 720p-81f needs ~101 GiB: 26 GiB of bf16 weights and one 75 GiB buffer of remat
# residuals and temporaries. JAX's allocator, growing region by region (no preallocation) under its
# default cap of 75% of the card, had claimed ~59 GiB of regions for the weights piecemeal and found
# no room for a 75 GiB one (H200, 2026-11-30): claim 95% of the card as one region up front.
WORKER_ENV = {"XLA_PYTHON_CLIENT_PREALLOCATE": "true", "XLA_PYTHON_CLIENT_MEM_FRACTION": "0.95"}
LORA_RANK = 32


def worker(shape: str, impl: str, args) -> dict:
    import dataclasses

    import jax

    from models.wan import PRESETS
    from radial_jax.plan import RadialPlan
    from train.step import make_mesh

    preset, frames, height, width, dense_layers = SHAPES[shape]
    config = dataclasses.replace(PRESETS[preset], param_dtype="bfloat16", dtype="bfloat16")
    if impl == "dense":
        plan = RadialPlan(mode="dense")
    else:
        block = 16 if args.dry_run else 128  # tiny frames hold 64 tokens: 16-token blocks give a real mask
        plan = RadialPlan(dense_layers=dense_layers, block_size=block, decay_factor=1.0,
                          implementation="reference" if args.dry_run else args.radial_impl)  # fmt: skip
    step, lora, base, opt_state, batch = training_setup(config, plan, make_mesh("", jax.devices()[:1]),
                                                        (frames, height, width))

    start = time.perf_counter()
    lowered = step.lower(lora, opt_state, base, batch, jax.random.key(0))
    compiled = lowered.compile()
    compile_s = time.perf_counter() - start
    memory = compiled.memory_analysis()
    state = [lora, opt_state]
    times = []
    for i in range(args.warmup + args.iters):
        begin = time.perf_counter()
        state[0], state[1], metrics = compiled(state[0], state[1], base, batch, jax.random.key(i))
        loss = float(metrics["loss"])  # waits for the step
        if i >= args.warmup:
            times.append(time.perf_counter() - begin)
    stats = jax.devices()[0].memory_stats() or {}
    tokens = frames * (height // 2) * (width // 2)
    row = dict(device=jax.devices()[0].device_kind, jax=jax.__version__, tokens=tokens, compile_s=round(compile_s, 1),
               base_weights_gib=sum(x.nbytes for x in jax.tree.leaves(base)) / GIB,
               lora_params=int(sum(x.size for x in jax.tree.leaves(lora))), loss=loss,
               temp_gib=getattr(memory, "temp_size_in_bytes", 0) / GIB if memory is not None else None,
               peak_gib=stats["peak_bytes_in_use"] / GIB if "peak_bytes_in_use" in stats else None,
               plan=dict(mode=plan.mode, dense_layers=plan.dense_layers, implementation=plan.implementation))  # fmt: skip
    if impl == "radial":
        mask = plan.block_mask(frames, (height // 2) * (width // 2))
        row["mask_density"] = float(mask.mean())
    return dict(row, times_s=times)


def training_setup(config, plan, mesh, grid: tuple[int, int, int]):
    """Returns (TrainStep, LoRA, base, optimizer state, batch) placed on `mesh`: the training's own
    step (remat, rank-LORA_RANK LoRA, AdamW, flow matching at shift 5) on random weights and one
    random sample of latent grid (frames, height, width)."""
    import jax
    import jax.numpy as jnp

    from train.config import OptimSection
    from train.lora import LoraConfig
    from train.objective import FlowMatching
    from train.step import TrainStep, make_optimizer

    graphdef, lora, base = random_lora_model(config, LoraConfig(rank=LORA_RANK, alpha=float(LORA_RANK)))
    tx, _ = make_optimizer(OptimSection(learning_rate=1e-4, warmup_steps=0), steps=100)
    step = TrainStep(graphdef, tx, mesh, plan, FlowMatching(shift=5.0), remat=True)
    lora, base, opt_state = step.place(lora, base, tx.init(lora))
    keys = jax.random.split(jax.random.key(1), 2)
    batch = {"latents": jax.random.normal(keys[0], (1, 1, *grid, config.in_dim), jnp.float32),
             "context": jax.random.normal(keys[1], (1, 1, config.text_len, config.text_dim), jnp.float32)}
    return step, lora, base, opt_state, jax.device_put(batch, step.batch_sharding(1))


def random_lora_model(config, lora_config):
    """Returns (graphdef, LoRA state, base state): random parameters created on the default device
    by one jitted program per leaf shape (the 14B never exists on the host)."""
    from flax import nnx

    from models.wan import WanModel
    from train.lora import apply_lora
    from train.step import split_model

    abstract = nnx.eval_shape(lambda: apply_lora(WanModel(config, rngs=nnx.Rngs(0)), lora_config, rngs=nnx.Rngs(1)))
    graphdef, lora, base = split_model(abstract)
    return graphdef, random_state(lora, seed=1), random_state(base, seed=0)


def summarise(rows: list[dict]) -> list[dict]:
    """Adds s_per_step (median) and the radial speedup over dense of the same shape."""
    for row in rows:
        if row.get("times_s"):
            row["s_per_step"] = statistics.median(row["times_s"])
            row["tokens_per_s"] = row["tokens"] / row["s_per_step"]
    for row in rows:
        dense = next((r for r in rows if r["shape"] == row["shape"] and r["impl"] == "dense"), {})
        if row["impl"] == "radial" and "s_per_step" in row and "s_per_step" in dense:
            row["speedup_vs_dense"] = dense["s_per_step"] / row["s_per_step"]
            if row.get("peak_gib") and dense.get("peak_gib"):
                row["peak_vs_dense"] = row["peak_gib"] / dense["peak_gib"]
    return rows


def print_table(rows: list[dict]) -> None:
    print(f"{'shape':16} {'impl':7} {'s/step':>8} {'peak GiB':>9} {'speedup':>8}  note")
    for r in rows:
        speedup = f"{r['speedup_vs_dense']:.2f}x" if "speedup_vs_dense" in r else "-"
        note = r.get("error", "")[:160] or f"compile {r.get('compile_s')} s, {r.get('tokens')} tokens"
        print(f"{r['shape']:16} {r['impl']:7} {cell(r, 's_per_step', '.3f'):>8} {cell(r, 'peak_gib', '.1f'):>9} "
              f"{speedup:>8}  {note}")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = matrix_parser(__doc__, shapes=SHAPES, default_shapes="1.3b-480p-161f,14b-720p-81f", impls=IMPLS,
                           results="train-step")  # fmt: skip
    args = parser.parse_args(argv)
    return matrix_main(args, script=str(Path(__file__).resolve()), shapes=SHAPES, impls=IMPLS,
                       worker=lambda shape, impl: worker(shape, impl, args), summarise=summarise,
                       print_table=print_table, results="train-step", env=WORKER_ENV)  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
