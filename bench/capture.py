"""What AdaptiveMoE's start-up costs and buys, per shard: the per-bucket capture table
(each kernel's replay time, winner, margin), capture time, graph-pool memory (all
variants vs winners only), and the adaptive dispatch's replay time vs the fastest.

    python -m bench.capture [--preset gpt-oss-120b --tp 2,8]

Buckets are the defaults (SGLang's decode capture sizes, 1..256).
"""

from __future__ import annotations

import argparse
import sys
import time
from functools import partial

import torch


def main(argv: list[str] | None = None) -> int:
    from graphs.timing import time_callable
    from moe_dispatch import ExpertWeights, preset
    from moe_dispatch.adaptive import AdaptiveMoE

    p = argparse.ArgumentParser(prog="python -m bench.capture")
    p.add_argument("--preset", default="gpt-oss-120b")
    p.add_argument("--tp", default="2,8")
    p.add_argument("--replays", type=int, default=100)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench.capture needs a CUDA GPU", file=sys.stderr)
        return 1
    print(f"GPU: {torch.cuda.get_device_name()}")
    for tp in (int(t) for t in args.tp.split(",")):
        spec = preset(args.preset, tp=tp)
        weights = ExpertWeights.random(spec, device="cuda", seed=0)
        start = time.perf_counter()
        moe = AdaptiveMoE(spec, weights, timed_replays=args.replays, progress=lambda line: None)
        report = moe.capture()
        wall = time.perf_counter() - start
        print(f"\n## {spec.describe()}\n")
        print("| bs | triton us | triton_kernels us | winner | margin | adaptive replay us | adaptive / fastest |")
        print("|---:|---:|---:|---|---:|---:|---:|")
        worst = 0.0
        for r in report.results:
            times = {n: s.median_ms * 1e3 for n, s in r.timings_ms.items()}
            adaptive = time_callable(partial(moe.replay_bucket, r.bucket), repeats=args.replays).median_ms * 1e3
            ratio = adaptive / min(times.values())
            worst = max(worst, ratio)
            cells = " | ".join(f"{times.get(n, float('nan')):.1f}" for n in ("triton", "triton_kernels"))
            print(f"| {r.bucket} | {cells} | {r.winner} | {r.margin:.2f}x | {adaptive:.1f} | {ratio:.3f} |")
        print(
            f"\ncapture+measure {report.seconds:.1f} s (re-capture of winners {report.recapture_seconds:.1f} s; "
            f"wall incl. kernel prep {wall:.1f} s); graph pool: all variants "
            f"{report.pool_bytes_all_variants / 2**20:.1f} MiB, "
            f"winners only {report.pool_bytes_winners / 2**20:.1f} MiB; "
            f"extra weight bytes {moe.extra_weight_bytes}; worst adaptive/fastest {worst:.3f}"
        )
        del moe
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
