"""Cost of one dispatch call against a bare `graph.replay()`: host time, and GPU time.

    python -m bench.overhead [--preset gpt-oss-120b --tp 8 --buckets 1,2,4,8,64 --calls 200]
                             [--replays 200 --rounds 5 --json PATH]

Three ways to replay the same (winner) graph of one AdaptiveMoE:
    bare        graph.replay()                                  (no dispatch at all)
    nvtx on     moe.replay_bucket(bs), NVTX ranges always pushed (the behaviour before the
                namer learned `active`: with no tool attached they go to nvtx's dummy domain)
    nvtx off    moe.replay_bucket(bs), ranges skipped           (the default with no tool)

Host time: perf_counter around each call, GPU left to run behind (median of `calls`).
GPU time: a CUDA event pair around each call (median of `replays` x `rounds`; the rounds
interleave the three paths so clock drift hits them alike), in two regimes:
    queued  back to back after 10 warm-up calls: where the host runs ahead of the GPU, host
            time between the two events is hidden behind earlier work (graphs.timing makes
            sure of that with a GPU-side hold; this regime does not, to show the difference);
    idle    the device is synchronized before each call: the start event fires at once and
            the GPU waits for the host to launch the graph, so host time between the events
            (the dispatch's Python) counts as GPU time.
A dispatch cost that shows in GPU time only when idle is host time, not GPU work.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial

import torch

PATHS = ("bare", "nvtx on", "nvtx off")


def host_us(fn: Callable[[], object], calls: int) -> float:
    torch.cuda.synchronize()
    samples = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e6)
    torch.cuda.synchronize()
    return statistics.median(samples)


def gpu_us_samples(fn: Callable[[], object], replays: int, idle: bool) -> list[float]:
    """One CUDA-event time (us) per call; `idle` synchronizes before each call."""
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(replays)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(replays)]
    for _ in range(10):  # warm, and with idle=False fill the queue
        fn()
    for start, end in zip(starts, ends, strict=True):
        if idle:
            torch.cuda.synchronize()
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return [s.elapsed_time(e) * 1e3 for s, e in zip(starts, ends, strict=True)]


def set_nvtx(moe: object, setting: str) -> None:
    """Swap the replay path's range namer (a bench-only reach into BucketedGraphs' internals)."""
    from moe_dispatch.profiling import NvtxRanges

    graphs = moe.graphs
    graphs._ranges = NvtxRanges(setting=setting)
    graphs._ranged = True


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.overhead", description=__doc__)
    p.add_argument("--preset", default="gpt-oss-120b")
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--buckets", default="1,8,64,256")
    p.add_argument("--calls", type=int, default=200, help="host-time calls per path")
    p.add_argument("--replays", type=int, default=200, help="GPU-timed calls per path per round")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds of the three paths")
    p.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench.overhead needs a CUDA GPU", file=sys.stderr)
        return 1

    from moe_dispatch import ExpertWeights, preset, random_inputs
    from moe_dispatch.adaptive import AdaptiveMoE

    spec = preset(args.preset, tp=args.tp)
    buckets = tuple(int(b) for b in args.buckets.split(","))
    moe = AdaptiveMoE(
        spec, ExpertWeights.random(spec, device="cuda"), buckets=buckets, timed_replays=20, progress=lambda line: None
    )
    moe.capture()
    rows = []
    for bucket in buckets:
        graph = moe.graphs._table[bucket][0]  # the winner's graph, for the bare baseline
        x, logits = random_inputs(spec, bucket, device="cuda", seed=1)
        paths: dict[str, Callable[[], object]] = {
            "bare": graph.replay,
            "nvtx on": partial(moe.replay_bucket, bucket),
            "nvtx off": partial(moe.replay_bucket, bucket),
        }

        def run(path: str, what: Callable[[Callable[[], object]], object], paths=paths) -> object:
            if path != "bare":
                set_nvtx(moe, "on" if path == "nvtx on" else "off")
            return what(paths[path])

        for path in PATHS:  # warm every path
            run(path, lambda fn: [fn() for _ in range(20)])
        host = {path: run(path, partial(host_us, calls=args.calls)) for path in PATHS}
        set_nvtx(moe, "off")
        host["moe(x, logits)"] = host_us(partial(moe, x, logits), args.calls)
        gpu: dict[str, dict[str, float]] = {}
        for regime in ("queued", "idle"):
            samples: dict[str, list[float]] = {path: [] for path in PATHS}
            for _ in range(args.rounds):
                for path in PATHS:
                    samples[path] += run(path, partial(gpu_us_samples, replays=args.replays, idle=regime == "idle"))
            gpu[regime] = {path: statistics.median(s) for path, s in samples.items()}
        set_nvtx(moe, "off")
        rows.append({"bucket": bucket, "kernel": moe.winners[bucket], "host_us": host, "gpu_us": gpu})

    print(f"{spec.describe()}")
    print(f"\nhost time per call, median of {args.calls} (us)")
    print("| bs | kernel | bare graph.replay() | replay_bucket nvtx on | replay_bucket nvtx off | moe(x, logits) |")
    print("|---:|---|---:|---:|---:|---:|")
    for r in rows:
        h = r["host_us"]
        print(
            f"| {r['bucket']} | {r['kernel']} | {h['bare']:.2f} | {h['nvtx on']:.2f} ({h['nvtx on'] - h['bare']:+.2f}) "
            f"| {h['nvtx off']:.2f} ({h['nvtx off'] - h['bare']:+.2f}) | {h['moe(x, logits)']:.2f} |"
        )
    print(f"\nGPU time per call (CUDA events), median of {args.replays} x {args.rounds} interleaved rounds (us)")
    print("| bs | kernel | regime | bare | nvtx on | nvtx off | on/bare | off/bare |")
    print("|---:|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        for regime, g in r["gpu_us"].items():
            print(
                f"| {r['bucket']} | {r['kernel']} | {regime} | {g['bare']:.1f} | {g['nvtx on']:.1f} | "
                f"{g['nvtx off']:.1f} | {g['nvtx on'] / g['bare']:.3f}x | {g['nvtx off'] / g['bare']:.3f}x |"
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"spec": spec.to_json(), "gpu": torch.cuda.get_device_name(), "rows": rows}, f, indent=2)
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
