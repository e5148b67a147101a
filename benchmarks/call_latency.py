"""What a blocking call costs the host beyond the GPU's work, in JAX and in torch (GPU machine).

    python benchmarks/call_latency.py [--iters 200] [--out FILE]

At batch 1, benchmarks/attention.py times each call on the host's clock, from dispatch to the return
of the wait for its result (jax.block_until_ready; torch.cuda.synchronize for the torch baselines).
Part of that time is the runtime's, not the kernel's. This times the same loop around a call that
does almost no GPU work (one element plus one), in JAX (jitted) and in torch, so the two runtimes'
fixed cost per blocking call can be read off and subtracted from a batch-1 comparison.
"""

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # benchmarks/ is no package
from workers import timed  # noqa: E402


def median_us(call, wait, iters: int, warmup: int = 20) -> float:
    """Median host time, in microseconds, of call() followed by wait() on its result."""
    return statistics.median(timed(call, wait, iters, warmup)) * 1e6


def jax_latency(iters: int) -> dict:
    import jax
    import jax.numpy as jnp

    x = jnp.zeros((1,), jnp.float32)
    plus_one = jax.jit(lambda x: x + 1)
    return dict(jax=jax.__version__, jax_device=str(jax.devices()[0]),
                jax_tiny_call_us=median_us(lambda: plus_one(x), jax.block_until_ready, iters))


def torch_latency(iters: int) -> dict:
    try:
        import torch
    except ImportError:
        return {}
    if not torch.cuda.is_available():
        return {}
    x = torch.zeros(1, device="cuda")
    return dict(torch=torch.__version__,
                torch_tiny_call_us=median_us(lambda: x + 1, lambda _: torch.cuda.synchronize(), iters))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iters", type=int, default=200, help="timed calls (the median is kept)")
    parser.add_argument("--out", help="write the result as JSON here")
    args = parser.parse_args(argv)
    result = {**torch_latency(args.iters), **jax_latency(args.iters), "iters": args.iters,
              "date": time.strftime("%Y-%m-%d")}
    print(json.dumps(result))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
