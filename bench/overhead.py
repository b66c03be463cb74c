"""Host time of one dispatch call vs a bare `graph.replay()` (issue: <= 5 us above).

    python -m bench.overhead [--preset gpt-oss-120b --tp 2 --bucket 64 --calls 200]

Each call is timed on the host with perf_counter, the GPU left to run behind it (a
few hundred launches never fill the launch queue), median over `calls`.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from functools import partial

import torch


def host_us(fn, calls: int) -> float:
    torch.cuda.synchronize()
    samples = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e6)
    torch.cuda.synchronize()
    return statistics.median(samples)


def main(argv: list[str] | None = None) -> int:
    from moe_dispatch import ExpertWeights, preset, random_inputs
    from moe_dispatch.adaptive import AdaptiveMoE

    p = argparse.ArgumentParser(prog="python -m bench.overhead")
    p.add_argument("--preset", default="gpt-oss-120b")
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--buckets", default="1,8,64,256")
    p.add_argument("--calls", type=int, default=200)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench.overhead needs a CUDA GPU", file=sys.stderr)
        return 1
    spec = preset(args.preset, tp=args.tp)
    buckets = tuple(int(b) for b in args.buckets.split(","))
    moe = AdaptiveMoE(
        spec, ExpertWeights.random(spec, device="cuda"), buckets=buckets, timed_replays=20, progress=lambda line: None
    )
    moe.capture()
    print(f"{spec.name}: host time per call, median of {args.calls} (us)")
    print("| bs | kernel | bare graph.replay() | moe.replay_bucket(bs) | overhead | moe(x, logits) with copies |")
    print("|---:|---|---:|---:|---:|---:|")
    for bucket in buckets:
        graph = moe.graphs._table[bucket][0]  # the winner's graph, for the bare baseline
        x, logits = random_inputs(spec, bucket, device="cuda", seed=1)
        for _ in range(20):  # warm both paths
            graph.replay()
            moe.replay_bucket(bucket)
            moe(x, logits)
        bare = host_us(graph.replay, args.calls)
        dispatch = host_us(lambda b=bucket: moe.replay_bucket(b), args.calls)
        full = host_us(partial(moe, x, logits), args.calls)
        kernel = moe.winners[bucket]
        print(f"| {bucket} | {kernel} | {bare:.2f} | {dispatch:.2f} | {dispatch - bare:+.2f} | {full:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
