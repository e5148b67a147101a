"""A model, not a measurement: how busy the tensor cores stay in the forward's key loop when every
synchronisation point costs latency, for the default loop and for FlashAttention-3's overlapped order.

    python benchmarks/schedule_model.py [--gemm 512] [--softmax 600] [--latencies 30,100,200,300]

Two compute warpgroups share one tensor pipe that runs their wgmmas one at a time, in issue order.
Each warpgroup runs a program of steps (all times in SM cycles):
- "default" (mosaic_fwd.py's kv_step): issue S = Q K^T; meet the other warpgroup (a two-arrival
  barrier); wait for S; softmax; meet again; issue O += P V; wait for it. Warpgroup 1 starts one
  meeting behind, so the two alternate (the ping-pong).
- "overlap" (MosaicTuning.overlap_qk, FA3's order): take the turn token; issue S_{j+1} and
  O += P_j V_j together; pass the token; wait for S_{j+1}; softmax; wait for P_j V_j; rescale O.
Each issue, wait and meeting costs `latency` cycles (barrier wake-up, wgmma wait, descriptor setup;
not measured here: `benchmarks/ncu_report.py` reads stalls, not latencies). Events run in time order
(the warpgroup whose clock is behind moves first); the softmaxes of the two warpgroups take turns on
the SM's units (shared_alu). The model ignores memory (K/V always ready), register pressure and issue
slots, so it says which schedule tolerates latency, not how fast a kernel is; and it misses something
real: without meetings (no ping-pong) it keeps the pipe as busy as the default loop at low latency and
busier at high latency, where the H200 measured the ping-pong worth 5-7% (NOTES, session 5). At 64 x 128 x 128 a wgmma takes ~512 cycles (4 MFLOP at ~4,096 FLOP a
cycle and SM) and a 64 x 128 softmax ~600 (64 ex2 a thread at 16 a cycle and SM, plus the FMAs).
"""

import argparse
import json


def busy_fraction(program: str, *, gemm: float = 512, softmax: float = 600, latency: float = 200,
                  steps: int = 200, shared_alu: bool = True) -> float:
    """Share of the time the tensor pipe is busy when two warpgroups run `program` for `steps` key blocks.

    shared_alu: one warpgroup's softmax at a time (both warpgroups' warps share the SM's four schedulers
    and its exp2 units, which the softmax saturates), else both may compute at once at full speed."""
    ops = [_default_ops(w, steps, softmax) if program == "default" else _overlap_ops(w, steps, softmax)
           for w in range(2)]  # fmt: skip
    clock, position = [0.0, 0.0], [0, 0]
    pipe_free, busy, alu_free = 0.0, 0.0, 0.0
    finished = [{}, {}]  # per warpgroup: wgmma name -> when its last issue retires
    arrivals: dict[tuple, list[float]] = {}  # (barrier, phase) -> arrival times

    def step(w: int) -> bool:
        """Runs warpgroup w's next op; False if it must wait for the other warpgroup."""
        nonlocal pipe_free, busy, alu_free
        kind, arg = ops[w][position[w]]
        if kind == "issue":  # the pipe takes wgmmas in the order they are issued in time
            start = max(clock[w] + latency, pipe_free)
            pipe_free, busy = start + gemm, busy + gemm
            finished[w][arg] = pipe_free
            clock[w] += latency
        elif kind == "wait_gemm":
            clock[w] = max(clock[w], finished[w][arg]) + latency
        elif kind == "compute":  # the exp2s and FMAs: both warpgroups' warps share the SM's units
            start = max(clock[w], alu_free) if shared_alu else clock[w]
            clock[w] = start + arg
            alu_free = clock[w]
        elif kind == "arrive":
            arrivals.setdefault(arg, []).append(clock[w])
        elif kind == "wait":  # for both warpgroups' arrival (a meeting) or the other's (a token)
            seen = arrivals.get(arg, [])
            if len(seen) < (2 if arg[0] == "meet" else 1):
                return False
            clock[w] = max(clock[w], max(seen)) + latency
        position[w] += 1
        return True

    # Discrete events in time order: the warpgroup whose clock is behind moves first, so the two
    # interleave their issues as they would on the chip.
    while True:
        runnable = sorted((clock[w], w) for w in range(2) if position[w] < len(ops[w]))
        if not runnable or not any(step(w) for _, w in runnable):
            break
    if any(p < len(o) for p, o in zip(position, ops)):
        raise RuntimeError(f"{program}: the two warpgroups deadlocked at {position}")
    return busy / max(clock)


def _default_ops(w: int, steps: int, softmax: float) -> list[tuple]:
    ops = [("arrive", ("meet", 0)), ("wait", ("meet", 0))] if w == 1 else []  # one meeting behind
    for j in range(steps):
        first, second = 2 * j + w, 2 * j + w + 1
        ops += [("issue", "s"), ("arrive", ("meet", first)), ("wait", ("meet", first)), ("wait_gemm", "s"),
                ("compute", softmax), ("arrive", ("meet", second)), ("wait", ("meet", second)),
                ("issue", "o"), ("wait_gemm", "o")]  # fmt: skip
    if w == 0:
        ops += [("arrive", ("meet", 2 * steps)), ("wait", ("meet", 2 * steps))]
    return ops


def _overlap_ops(w: int, steps: int, softmax: float) -> list[tuple]:
    turn = [0]

    def take_turn():  # warpgroup 0 goes first; turn k of warpgroup w waits for the other's pass k (or k-1)
        k = turn[0]
        turn[0] += 1
        need = k - 1 if w == 0 else k
        wait = [("wait", ("token", 1 - w, need))] if need >= 0 else []
        return wait, [("arrive", ("token", w, k))]

    ops = []
    for j in range(steps + 1):
        wait, passed = take_turn()
        if j == 0:
            ops += [*wait, ("issue", "s"), *passed, ("wait_gemm", "s"), ("compute", softmax)]
        elif j < steps:
            ops += [*wait, ("issue", "s"), ("issue", "o"), *passed, ("wait_gemm", "s"), ("compute", softmax),
                    ("wait_gemm", "o"), ("compute", 100)]  # fmt: skip  (100: O *= alpha)
        else:
            ops += [*wait, ("issue", "o"), *passed, ("wait_gemm", "o")]
    return ops


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gemm", type=float, default=512, help="cycles of one 64x128x128 wgmma")
    parser.add_argument("--softmax", type=float, default=600, help="cycles of one warpgroup's softmax")
    parser.add_argument("--latencies", default="30,100,200,300", help="cycles each sync point costs")
    args = parser.parse_args(argv)
    rows = [{"latency": latency, **{program: busy_fraction(program, gemm=args.gemm, softmax=args.softmax,
                                                           latency=latency) for program in ("default", "overlap")}}
            for latency in map(float, args.latencies.split(","))]  # fmt: skip
    for row in rows:
        print(json.dumps(row))
    return rows


if __name__ == "__main__":
    main()
