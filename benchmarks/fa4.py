"""FlashAttention-4's block-sparse kernel on our radial masks: the bar our kernels are held to.

    python benchmarks/fa4.py [--shapes 1.3b-480p-81f,...] [--decay 1.0] [--backward] [--iters N] [--out FILE]

FA4 (the `flash-attn-4` package, CuTe DSL kernels called from PyTorch) reads a block-sparse
pattern as, per query block, a count and a list of key blocks; blocks listed as "full" are
computed with no per-token mask. The backward reads the transpose (per key block, its query
blocks). Every block our mask computes goes to FA4 as a full block, taken from the same index
tables our kernels loop over (`radial_jax.kernels.tables.block_tables`), so both do the same
work; the ragged last block is clipped at the sequence end by FA4 itself. bf16, head_dim 128,
batch 1, [batch, seq, heads, head_dim] as ours. `benchmarks/attention.py` imports `fa4_case` so
that one call times ours, FA4, cuDNN and Flex on the same shapes (its torch child process).

Bringing FA4 to the GPU machine (Python 3.12, no network), from the repository root here:
    pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
      --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \\
      -d WHEELS flash-attn-4==4.0.0b36 nvidia-cutlass-dsl==4.8.1 nvidia-cutlass-dsl-libs-base==4.8.1 \\
      nvidia-cutlass-dsl-libs-core==4.8.1 nvidia-cutlass-dsl-libs-cu13==4.8.1 apache-tvm-ffi quack-kernels \\
      torch-c-dlpack-ext
and install them there with `pip install --no-index --no-deps --target SITE WHEELS/*.whl`, then put
both `SITE/nvidia_cutlass_dsl/dsl_packages` and `SITE` on PYTHONPATH. The cu13 libraries wheel
(92 MB) is larger than one device call carries (64 MiB): `split` it in two, carry one half in
each of two back-to-back calls (the first copies its half to /tmp, which lives as long as the
warm machine) and `cat` them together before installing. Measured figures: benchmarks/NOTES.md.
"""

import argparse
import json
import os
import statistics
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # radial_jax imports jax: leave the GPU to torch

import numpy as np  # noqa: E402

from radial_jax import attention_flops, computed_token_pairs, radial_block_mask  # noqa: E402

BLOCK = 128  # tokens per mask block
HEAD_DIM = 128
BWD_FLOP_FACTOR = 3.5  # forward + backward counted as 3.5 forwards: 2.5x for the backward's five matmuls
# Seconds of back-to-back calls before timing. The H200 boosts to 1980 MHz when it has idled (after
# a compile, say) and falls to ~1650 MHz at its 700 W power cap within ~0.1 s of full load
# (benchmarks/NOTES.md, benchmarks/steadiness.py): timing right after a pause measures the boost,
# up to 15% faster than the steady state. Settling first times every kernel at the capped clock.
SETTLE_S = 1.0
# name: (latent frames, tokens per frame, heads); benchmarks/attention.py and steadiness.py time these too
SHAPES = {
    "1.3b-480p-81f": (21, 1560, 12),
    "1.3b-480p-121f": (31, 1560, 12),  # 378 query tiles: just below the default's pairs (384 on)
    "1.3b-480p-161f": (41, 1560, 12),
    "14b-480p-81f": (21, 1560, 40),
    "14b-720p-81f": (21, 3600, 40),
    "14b-720p-161f": (41, 3600, 40),
}


def unavailable() -> str | None:
    """Returns why FA4 cannot run here (not installed, no CUDA), or None."""
    try:
        import torch
        from flash_attn.cute import flash_attn_func  # noqa: F401
    except Exception as e:  # an incomplete install fails in several ways, not only ImportError
        return f"flash-attn-4 not importable: {type(e).__name__}: {e}"
    if not torch.cuda.is_available():
        return "no CUDA device for torch"
    return None


def block_lists(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Returns FA4's (counts [rows], ids [rows, cols]) int32 of a bool [rows, cols] matrix: each row's
    on columns ascending, then zeros."""
    counts = mask.sum(axis=1).astype(np.int32)
    rows, cols = np.nonzero(mask)  # row-major: columns ascending within a row
    slot = np.arange(rows.size) - np.repeat(np.cumsum(counts) - counts, counts)
    ids = np.zeros(mask.shape, np.int32)
    ids[rows, slot] = cols
    return counts, ids


def fa4_block_sparsity(mask: np.ndarray, heads: int):
    """Returns (forward, backward) BlockSparseTensorsTorch of a bool block mask [QB, KB], every block full."""
    import torch
    from flash_attn.cute.block_sparsity import BlockSparseTensorsTorch

    on_gpu = lambda a: torch.from_numpy(a).cuda()[None, None].expand(1, heads, *a.shape).contiguous()

    def sparsity(matrix):
        count, ids = map(on_gpu, block_lists(matrix))  # [1, H, rows], [1, H, rows, cols]
        # No partial ("mask") blocks: their lists are empty.
        return BlockSparseTensorsTorch(mask_block_cnt=torch.zeros_like(count), mask_block_idx=torch.zeros_like(ids),
                                       full_block_cnt=count, full_block_idx=ids, block_size=(BLOCK, BLOCK))

    return sparsity(mask), sparsity(mask.T)


def fa4_case(q, k, v, mask: np.ndarray, backward: bool, d_out=None):
    """Returns a no-argument callable running FA4 on q, k, v [B, L, N, D] torch bf16 (with requires_grad
    for backward): the forward, or the forward and the gradients wrt q, k, v for cotangent d_out."""
    import torch
    from flash_attn.cute import flash_attn_func

    fwd_sparsity, bwd_sparsity = fa4_block_sparsity(mask, q.shape[2])
    attend = lambda: flash_attn_func(q, k, v, block_sparse_tensors=fwd_sparsity,
                                     block_sparse_tensors_bwd=bwd_sparsity)[0]  # fmt: skip
    if not backward:
        return lambda: _no_grad(attend)
    d_out = torch.randn_like(q) if d_out is None else d_out
    return lambda: torch.autograd.grad(attend(), (q, k, v), d_out)


def _no_grad(fn):
    import torch

    with torch.no_grad():
        return fn()


def median_ms(fn, iters: int, settle_s: float = SETTLE_S, warmup: int = 2, batch: int = 1, clock: str = "wall") -> float:
    """Returns the median time of one call of fn() in ms over `iters` samples, after at least `warmup`
    calls and settle_s seconds of back-to-back calls (SETTLE_S says why). A sample is `batch` calls
    issued back to back, its time divided by `batch`.

    clock "wall": the host's clock from before the first call to the return of torch.cuda.synchronize()
    after the last, as attention.median_seconds times ours, so the two are comparable at batch 1 (the
    caller's dispatch and the wait for the result count). clock "events": CUDA events recorded before
    the first call and after the last, the GPU's time only (the wait for the result does not count)."""
    import torch

    if clock not in ("wall", "events"):
        raise ValueError(f"clock={clock!r}: 'wall' or 'events'")
    start = time.perf_counter()
    for i in range(10**6):
        fn()
        torch.cuda.synchronize()
        if i + 1 >= warmup and time.perf_counter() - start >= settle_s:
            break
    times = []
    for _ in range(iters):
        if clock == "wall":
            start = time.perf_counter()
            for _ in range(batch):
                fn()
            torch.cuda.synchronize()
            times.append((time.perf_counter() - start) * 1e3 / batch)
            continue
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        for _ in range(batch):
            fn()
        end.record()
        torch.cuda.synchronize()
        times.append(begin.elapsed_time(end) / batch)
    return statistics.median(times)


def sampled_error(q, k, v, mask: np.ndarray, out, rows=(0, -1), heads=2) -> float:
    """Returns max |FA4 - float32 masked softmax| / max |reference| over a few query blocks and heads."""
    import torch

    worst, scale = 0.0, 0.0
    for r in rows:
        r = r % mask.shape[0]
        sl = slice(r * BLOCK, min((r + 1) * BLOCK, q.shape[1]))
        qs, ks, vs = (x[0, :, :heads].float() for x in (q[:, sl], k, v))
        logits = torch.einsum("lnd,mnd->nlm", qs, ks) * HEAD_DIM**-0.5
        cols = torch.from_numpy(np.repeat(mask[r], BLOCK)[: k.shape[1]]).cuda()
        ref = torch.einsum("nlm,mnd->lnd", torch.softmax(logits.masked_fill(~cols, float("-inf")), -1), vs)
        worst = max(worst, float((out[0, sl, :heads].float() - ref).abs().max()))
        scale = max(scale, float(ref.abs().max()))
    return worst / scale


def inputs(name: str, *, zeros: bool = False, requires_grad: bool = False):
    """(q, k, v) [1, L, heads, HEAD_DIM] bf16 on the GPU at shape `name`: random normal, or zeros."""
    import torch

    frames, tokens, heads = SHAPES[name]
    make = torch.zeros if zeros else torch.randn
    return tuple(make(1, frames * tokens, heads, HEAD_DIM, device="cuda", dtype=torch.bfloat16,
                      requires_grad=requires_grad) for _ in range(3))  # fmt: skip


def run_shape(name: str, decay: float, backward: bool, iters: int) -> dict:
    import torch

    frames, tokens, heads = SHAPES[name]
    L = frames * tokens
    mask = radial_block_mask(frames, tokens, decay_factor=decay)
    q, k, v = inputs(name, requires_grad=backward)
    # TFLOP/s on the computed blocks, ragged edge blocks counted exactly (benchmarks/attention.py's count).
    flops = attention_flops(computed_token_pairs(mask, BLOCK, L, L), heads=heads, head_dim=HEAD_DIM)
    row = dict(shape=name, seq=L, heads=heads, density=float(mask.mean()), decay=decay)
    fwd = fa4_case(q, k, v, mask, backward=False)
    row["fa4_fwd_ms"] = median_ms(fwd, iters)
    row["fa4_fwd_tflops"] = flops / row["fa4_fwd_ms"] / 1e9
    row["fa4_max_rel_err_sampled_blocks"] = sampled_error(q, k, v, mask, fwd())
    if backward:
        row["fa4_fwd_bwd_ms"] = median_ms(fa4_case(q, k, v, mask, backward=True), iters)
        row["fa4_fwd_bwd_tflops"] = BWD_FLOP_FACTOR * flops / row["fa4_fwd_bwd_ms"] / 1e9
    del q, k, v
    torch.cuda.empty_cache()
    return row


def band_mask(blocks: int, steps: int) -> np.ndarray:
    """[blocks, blocks] bool: query block i sees key blocks i, i + 1, ..., i + steps - 1 (mod blocks)."""
    rows = np.arange(blocks)[:, None]
    mask = np.zeros((blocks, blocks), bool)
    mask[rows, (rows + np.arange(steps)[None, :]) % blocks] = True
    return mask


def profiled_mask(frames: int, tokens: int, decay: float = 1.0, band: int | None = None) -> np.ndarray:
    """The block mask a profiled run uses for `frames` latent frames of `tokens` tokens: the radial mask,
    or with `band` the band mask of that many key blocks a query block (benchmarks/cta_cost.py's masks)."""
    if band is None:
        return radial_block_mask(frames, tokens, decay_factor=decay)
    return band_mask(-(-frames * tokens // BLOCK), band)


def run_once(name: str, decay: float, backward: bool, band: int | None = None) -> None:
    """Runs FA4 once at shape `name` (forward, or forward and backward) on profiled_mask's mask, zeros in
    bf16 as ptxas_report.compile_one runs ours: the program ncu_report.py profiles FA4's kernels in."""
    import torch

    frames, tokens, _ = SHAPES[name]
    q, k, v = inputs(name, zeros=True, requires_grad=backward)
    fa4_case(q, k, v, profiled_mask(frames, tokens, decay, band), backward=backward)()
    torch.cuda.synchronize()


def calls_for(name: str, decay: float, seconds: float, batch: int = 1) -> list[dict]:
    """FA4's forward at shape `name` called back to back for `seconds` (random bf16), `batch` calls to a
    timing by wall clock around them and one synchronize, as benchmarks/steadiness.py times ours:
    [{t, ms, batch}], ms the batch's mean, t its start in time.time() (the clock nvidia-smi's samples
    are matched against)."""
    import torch

    frames, tokens, _ = SHAPES[name]
    q, k, v = inputs(name)
    fn = fa4_case(q, k, v, radial_block_mask(frames, tokens, decay_factor=decay), backward=False)
    fn()  # compile
    torch.cuda.synchronize()
    calls, end = [], time.perf_counter() + seconds
    while time.perf_counter() < end:
        wall, start = time.time(), time.perf_counter()
        for _ in range(batch):
            fn()
        torch.cuda.synchronize()
        calls.append(dict(t=wall, ms=(time.perf_counter() - start) * 1e3 / batch, batch=batch))
    return calls


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="1.3b-480p-81f,1.3b-480p-161f,14b-720p-81f",
                        help=f"comma list of {list(SHAPES)}")
    parser.add_argument("--decay", type=float, default=1.0)
    parser.add_argument("--backward", action="store_true", help="also time forward+backward")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--out", help="JSON path")
    parser.add_argument("--once", action="store_true",
                        help="run the first shape once, untimed, zeros (for a profiler: ncu_report.py)")
    parser.add_argument("--band", type=int, help="with --once: the band mask of this many key blocks a row")
    parser.add_argument("--calls-for", type=float, metavar="SECONDS",
                        help="call the first shape's forward back to back, print each call's time as JSON "
                             "(for benchmarks/steadiness.py)")  # fmt: skip
    parser.add_argument("--calls-batch", type=int, default=1, help="with --calls-for: calls to a timing")
    args = parser.parse_args(argv)
    if args.calls_batch < 1:
        parser.error("--calls-batch must be at least 1")
    names = args.shapes.split(",")
    if unknown := [n for n in names if n not in SHAPES]:
        sys.exit(f"unknown --shapes {unknown}; choose from {list(SHAPES)}")
    if reason := unavailable():
        sys.exit(f"benchmarks/fa4.py: {reason} (install: see this file's docstring)")
    if args.once:
        return run_once(names[0], args.decay, args.backward, args.band)
    if args.calls_for:
        return print(json.dumps(calls_for(names[0], args.decay, args.calls_for, args.calls_batch)))
    import torch

    rows = []
    for name in names:
        rows.append(run_shape(name, args.decay, args.backward, args.iters))
        print(json.dumps(rows[-1]), flush=True)
    record = dict(device=torch.cuda.get_device_name(), command="python " + " ".join(sys.argv),
                  date=time.strftime("%Y-%m-%d"), rows=rows)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(record, f, indent=1)


if __name__ == "__main__":
    main()
