"""One Wan2.1 DiT forward step on one GPU: ours dense, ours radial, diffusers + cuDNN SDPA.

    python benchmarks/dit_step.py [--shapes 1.3b-480p-81f,14b-720p-81f] [--impls ours-dense,ours-radial,diffusers]
                                  [--iters 3] [--warmup 1] [--out FILE]
    python benchmarks/dit_step.py --dry-run [--out FILE]   # tiny model on the CPU, the same code path

Random weights built on the device (no download, no host copy of the 14B), bf16, batch 1, 512
text tokens. Each (shape, implementation) runs in its own process, so peak memory is that
run's alone and JAX and torch never share a GPU. Ours: the Flax model under jax.jit, dense =
cuDNN attention everywhere; radial = decay_factor 1.0, dense_layers=1, our Pallas kernel
(--radial-impl). Baseline: diffusers' WanTransformer3DModel in eager torch, bf16 with its
float32 modules (as from_pretrained(torch_dtype=bfloat16) keeps them), SDPA on the cuDNN
backend. diffusers is pure Python; where it is not installed the baseline is skipped with a
message (carry its wheel and importlib_metadata's; see the README). Prints ms/step, peak GPU
memory and speedup vs diffusers; writes benchmarks/results/dit-<device>.json (device,
command, date), merging rows into an existing file of the same device.
"""

import statistics
import sys
import time
from pathlib import Path

from workers import WEIGHT_STD, cell, matrix_main, matrix_parser, random_state, timed

GIB = 1 << 30
# Literal sizes so the torch worker needs neither flax nor our package; the JAX worker checks
# them against models.wan's presets. (preset, latent frames, height, width)
SHAPES = {
    "1.3b-480p-81f": ("t2v-1.3B", 21, 60, 104),  # 21 x 30 x 52 = 32,760 tokens
    "14b-720p-81f": ("t2v-14B", 21, 90, 160),  # 21 x 45 x 80 = 75,600 tokens
    "tiny": ("tiny", 5, 16, 16),  # --dry-run only
}
MODELS = {  # preset: dim, ffn_dim, heads, layers, in/out channels, text_dim, text_len
    "t2v-1.3B": dict(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30, in_dim=16, out_dim=16, text_dim=4096, text_len=512),
    "t2v-14B": dict(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40, in_dim=16, out_dim=16, text_dim=4096, text_len=512),
    "tiny": dict(dim=64, ffn_dim=128, num_heads=4, num_layers=2, in_dim=4, out_dim=4, text_dim=32, text_len=32),
}
IMPLS = ("ours-dense", "ours-radial", "diffusers")
TIMESTEP = 500.0


# ---------------------------------------------------------------- ours (JAX)


def jax_worker(shape: str, impl: str, args) -> dict:
    import dataclasses

    import jax
    import jax.numpy as jnp
    from flax import nnx

    from models.wan import PRESETS
    from radial_jax import RadialPlan

    preset, frames, height, width = SHAPES[shape]
    config = PRESETS[preset]
    sizes = MODELS[preset]
    assert all(getattr(config, k) == v for k, v in sizes.items()), f"{preset} differs from MODELS[{preset!r}]"
    if impl == "ours-dense":
        plan = None
    else:
        radial_impl = "reference" if args.dry_run else args.radial_impl
        plan = RadialPlan(decay_factor=1.0, dense_layers=1, implementation=radial_impl)
    config = dataclasses.replace(config, param_dtype="bfloat16", dtype="bfloat16")
    graphdef, state = random_wan(config)
    keys = jax.random.split(jax.random.key(1), 2)
    latents = jax.random.normal(keys[0], (1, frames, height, width, config.in_dim), jnp.bfloat16)
    context = jax.random.normal(keys[1], (1, config.text_len, config.text_dim), jnp.bfloat16)
    timestep = jnp.full((1,), TIMESTEP, jnp.float32)

    @jax.jit
    def step(state, latents, timestep, context):
        return nnx.merge(graphdef, state)(latents, timestep, context, plan=plan, dense=False)

    start = time.perf_counter()
    compiled = step.lower(state, latents, timestep, context).compile()
    compile_s = time.perf_counter() - start
    times = timed(lambda: compiled(state, latents, timestep, context), jax.block_until_ready, args.iters, args.warmup)
    stats = jax.devices()[0].memory_stats() or {}
    row = dict(device=jax.devices()[0].device_kind, jax=jax.__version__, compile_s=round(compile_s, 1),
               weights_gib=sum(x.nbytes for x in jax.tree.leaves(state)) / GIB,
               peak_gib=stats["peak_bytes_in_use"] / GIB if "peak_bytes_in_use" in stats else None)
    if impl == "ours-radial":
        mask = plan.block_mask(frames, (height // 2) * (width // 2))
        row.update(radial_implementation=plan.implementation, mask_density=float(mask.mean()), dense_layers=1)
    return dict(row, times_s=times)


def random_wan(config):
    """Returns (graphdef, state) with random bf16/f32 parameters created on the default device."""
    from flax import nnx

    from models.wan import WanModel

    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: WanModel(config, rngs=nnx.Rngs(0))))
    return graphdef, random_state(abstract, seed=0)


# ---------------------------------------------------------------- diffusers (torch)


def torch_worker(shape: str, args) -> dict:
    import torch

    try:
        from diffusers import WanTransformer3DModel
    except ImportError as e:
        return dict(skipped=f"diffusers is not importable here ({e}); carry the diffusers and importlib_metadata "
                            "wheels to get the baseline")
    from torch.nn.attention import SDPBackend, sdpa_kernel

    device = "cpu" if args.dry_run else "cuda"
    preset, frames, height, width = SHAPES[shape]
    m = MODELS[preset]
    kwargs = dict(patch_size=(1, 2, 2), num_attention_heads=m["num_heads"], attention_head_dim=m["dim"] // m["num_heads"],
                  in_channels=m["in_dim"], out_channels=m["out_dim"], text_dim=m["text_dim"], freq_dim=256,
                  ffn_dim=m["ffn_dim"], num_layers=m["num_layers"], cross_attn_norm=True,
                  qk_norm="rms_norm_across_heads", eps=1e-6)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # parameters are born bf16 on the device: no fp32 copy
    try:
        with torch.device(device), torch.no_grad():
            model = WanTransformer3DModel(**kwargs).eval().requires_grad_(False)
            for name, p in model.named_parameters():
                if any(part in model._keep_in_fp32_modules for part in name.split(".")):
                    p.data = p.data.float()
                p.normal_(0.0, WEIGHT_STD) if p.ndim >= 2 else None
    finally:
        torch.set_default_dtype(previous)
    gen = torch.Generator(device).manual_seed(1)
    hidden = torch.randn(1, m["in_dim"], frames, height, width, device=device, dtype=torch.bfloat16, generator=gen)
    context = torch.randn(1, m["text_len"], m["text_dim"], device=device, dtype=torch.bfloat16, generator=gen)
    timestep = torch.full((1,), TIMESTEP, device=device)
    sync = (lambda _: torch.cuda.synchronize()) if device == "cuda" else (lambda _: None)

    def run():
        with torch.inference_mode():
            return model(hidden, timestep, context, return_dict=False)[0]

    backends = [("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)]
    if device == "cpu":
        backends = [("math", SDPBackend.MATH)]
    for backend_name, backend in backends:
        try:
            with sdpa_kernel([backend]):
                if device == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                times = timed(run, sync, args.iters, args.warmup)
            break
        except RuntimeError as e:  # "No available kernel": this backend declines the shapes
            print(f"SDPA {backend_name} failed ({str(e)[:200]}); trying the next backend", file=sys.stderr)
    else:
        raise RuntimeError("no SDPA backend ran")
    return dict(device=torch.cuda.get_device_name() if device == "cuda" else "cpu", torch=torch.__version__,
                sdpa_backend=backend_name, weights_gib=sum(p.numel() * p.element_size() for p in model.parameters()) / GIB,
                peak_gib=torch.cuda.max_memory_allocated() / GIB if device == "cuda" else None, times_s=times)


# ---------------------------------------------------------------- orchestration


def summarise(rows: list[dict]) -> list[dict]:
    """Adds ms_per_step (median) and speedup vs diffusers to each row; returns the rows."""
    for row in rows:
        if "times_s" in row:
            row["ms_per_step"] = 1e3 * statistics.median(row["times_s"])
    for row in rows:
        base = next((r for r in rows if r["shape"] == row["shape"] and r["impl"] == "diffusers"), {})
        if "ms_per_step" in row and "ms_per_step" in base:
            row["speedup_vs_diffusers"] = base["ms_per_step"] / row["ms_per_step"]
    return rows


def print_table(rows: list[dict]) -> None:
    print(f"{'shape':16} {'impl':12} {'ms/step':>10} {'peak GiB':>9} {'speedup':>8}  note")
    for r in rows:
        speedup = f"{r['speedup_vs_diffusers']:.2f}x" if "speedup_vs_diffusers" in r else "-"
        note = r.get("skipped") or r.get("error", "")[:100] or r.get("sdpa_backend", r.get("radial_implementation", ""))
        print(f"{r['shape']:16} {r['impl']:12} {cell(r, 'ms_per_step', '.1f'):>10} {cell(r, 'peak_gib', '.1f'):>9} "
              f"{speedup:>8}  {note}")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = matrix_parser(__doc__, shapes=SHAPES, default_shapes="1.3b-480p-81f,14b-720p-81f", impls=IMPLS,
                           results="dit")  # fmt: skip
    args = parser.parse_args(argv)

    def worker(shape: str, impl: str) -> dict:
        return torch_worker(shape, args) if impl == "diffusers" else jax_worker(shape, impl, args)

    return matrix_main(args, script=str(Path(__file__).resolve()), shapes=SHAPES, impls=IMPLS, worker=worker,
                       summarise=summarise, print_table=print_table, results="dit")


if __name__ == "__main__":
    sys.exit(main())
