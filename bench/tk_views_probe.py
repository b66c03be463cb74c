"""triton_kernels on transposed weight views vs contiguous copies, with and without `tk_flags`.

    python -m bench.tk_views_probe --out DIR [--preset gpt-oss-120b --tp 8,2
                                   --tokens 1,2,4,8,16,64 --replays 200 --rounds 3]

Per shard and token count T, one CUDA graph per variant of SGLang's triton_kernels runner:
    copy            contiguous w13 [E, H, 2I] / w2 [E, I, H] copies (what SGLang allocates; + weight bytes)
    view            transposed views of the Triton-layout weights, unsteered (triton_kernels' own flags)
    view+fix        the views under tk_flags' per-call constraint (the backend's default)
    view+persistent the views with is_persistent=True at every T (shows what the fix's T range leaves out)
Each graph is timed with graphs.timing.time_replays (CUDA events, `replays` per round), the
variants interleaved over `rounds` rounds; the median of the round medians is reported.
The opt flags matmul_ogs chose for each matmul of one eager call are recorded by wrapping
triton_kernels.matmul_ogs.make_opt_flags for that call (restored after). Outputs are checked
against the copy's (max/RMS relative error). Writes DIR/tk_views_probe.md and .json; the
target is view+fix within 1.05x of copy at every T.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import statistics
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from bench.cli import positive_ints

TARGET = 1.05
VARIANTS = ("copy", "view", "view+fix", "view+persistent")
FLAG_FIELDS = ("is_persistent", "block_m", "block_n", "block_k", "split_k", "num_warps", "num_stages")


@contextlib.contextmanager
def recorded_opt_flags() -> Iterator[list[dict] | None]:
    """Yields a list filled with one dict per matmul_ogs call's chosen flags; None if not reachable."""
    try:
        import triton_kernels.matmul_ogs as matmul_ogs

        original = matmul_ogs.make_opt_flags
    except (ImportError, AttributeError):
        yield None
        return
    seen: list[dict] = []

    @functools.wraps(original)  # keeps make_opt_flags' parameters visible (tk_matmul_flags binds them)
    def recording(*args, **kwargs):
        flags = original(*args, **kwargs)
        seen.append({f: getattr(flags, f, None) for f in FLAG_FIELDS})
        return flags

    matmul_ogs.make_opt_flags = recording
    try:
        yield seen
    finally:
        matmul_ogs.make_opt_flags = original


@dataclasses.dataclass
class Case:
    tp: int
    tokens: int
    variant: str
    median_us: float
    round_us: list[float]
    flags: list[dict] | None
    decision: str
    max_err_vs_copy: float
    rms_err_vs_copy: float
    extra_weight_bytes: int


def variant_fns(spec, weights) -> tuple[dict[str, Callable], dict[str, int], Callable]:
    """name -> forward(hidden, logits); name -> extra weight bytes; and the steered kernel (for decisions)."""
    from moe_dispatch.backends import tk_flags
    from moe_dispatch.backends.triton_kernels_backend import TritonKernelsBackend

    copy = TritonKernelsBackend("copy", steer_flags=False).prepare(spec, weights)
    view = TritonKernelsBackend("view", steer_flags=False).prepare(spec, weights)
    fixed = TritonKernelsBackend("view", steer_flags=True).prepare(spec, weights)

    def persistent(hidden, logits):
        with tk_flags.scoped_constraints(tk_flags.PERSISTENT):
            return view.forward(hidden, logits)

    fns = {"copy": copy.forward, "view": view.forward, "view+fix": fixed.forward, "view+persistent": persistent}
    extra = {"copy": copy.extra_bytes, "view": 0, "view+fix": 0, "view+persistent": 0}
    return fns, extra, fixed


def probe_shard(spec, tp: int, tokens: tuple[int, ...], replays: int, rounds: int, say) -> list[Case]:
    from graphs.capture import capture
    from graphs.timing import time_replays
    from moe_dispatch import ExpertWeights, random_inputs
    from moe_dispatch.backends import tk_flags
    from moe_dispatch.testing import error_stats

    weights = ExpertWeights.random(spec, device="cuda", seed=0)
    fns, extra, fixed = variant_fns(spec, weights)
    info = fixed._quant_info
    stream = torch.cuda.Stream()
    cases: list[Case] = []
    for T in tokens:
        x, logits = random_inputs(spec, T, device="cuda", seed=1000 + T)
        decision = tk_flags.decision_for(T, spec.top_k, info.w13_weight, info.w2_weight).reason
        flags: dict[str, list[dict] | None] = {}
        outs: dict[str, torch.Tensor] = {}
        for name, fn in fns.items():
            fn(x, logits)  # compile outside the recording
            with recorded_opt_flags() as seen:
                outs[name] = fn(x, logits).clone()
            flags[name] = list(seen) if seen is not None else None
        pool = torch.cuda.graph_pool_handle()
        graphs = {name: capture(fn, (x, logits), pool, stream) for name, fn in fns.items()}
        per_round: dict[str, list[float]] = {name: [] for name in fns}
        for _ in range(rounds):
            for name, captured in graphs.items():
                per_round[name].append(time_replays(captured.graph, warmup=20, replays=replays).median_ms * 1e3)
        for name in fns:
            err = error_stats(outs[name], outs["copy"])
            cases.append(
                Case(
                    tp,
                    T,
                    name,
                    statistics.median(per_round[name]),
                    per_round[name],
                    flags[name],
                    decision if name == "view+fix" else "",
                    err.max,
                    err.rms,
                    extra[name],
                )
            )
        line = " ".join(f"{c.variant}={c.median_us:8.1f}us" for c in cases[-len(fns) :])
        say(f"[tp={tp}] T={T:4d} {line}")
        del graphs
        torch.cuda.synchronize()
    del fns, fixed, weights
    torch.cuda.empty_cache()
    return cases


def _flags_text(flags: list[dict] | None) -> str:
    if flags is None:
        return "not exposed"
    parts = []
    for f in flags:
        kind = "P" if f["is_persistent"] else "NP"
        tiles = f"m{f['block_m']} n{f['block_n']} k{f['block_k']}"
        parts.append(f"{kind} {tiles} sk{f['split_k']} w{f['num_warps']} s{f['num_stages']}")
    return " ; ".join(parts) or "none"


def markdown(cases: list[Case], header: str) -> str:
    by = {(c.tp, c.tokens, c.variant): c for c in cases}
    shards = sorted({(c.tp, c.tokens) for c in cases}, key=lambda k: (-k[0], k[1]))
    lines = [header, ""]
    lines.append(
        "| tp | T | copy us | view us | view/copy | view+fix us | fix/copy | within 1.05x | "
        "view+persistent us | persistent/copy | fix max err vs copy |"
    )
    lines.append("|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|")
    worst = 0.0
    for tp, T in shards:
        copy = by[(tp, T, "copy")].median_us
        view, fix, pers = (by[(tp, T, v)] for v in ("view", "view+fix", "view+persistent"))
        worst = max(worst, fix.median_us / copy)
        lines.append(
            f"| {tp} | {T} | {copy:.1f} | {view.median_us:.1f} | {view.median_us / copy:.2f}x | {fix.median_us:.1f} | "
            f"{fix.median_us / copy:.3f}x | {'yes' if fix.median_us / copy <= TARGET else 'NO'} | "
            f"{pers.median_us:.1f} | {pers.median_us / copy:.3f}x | {fix.max_err_vs_copy:.1e} |"
        )
    lines += ["", f"worst view+fix / copy: {worst:.3f}x (target <= {TARGET}x)", ""]
    lines.append("Opt flags per matmul (gate/up ; down): P persistent / NP not, block m/n/k, split_k, warps, stages")
    lines.append("")
    lines.append("| tp | T | variant | flags | tk_flags decision |")
    lines.append("|---:|---:|---|---|---|")
    for tp, T in shards:
        for v in VARIANTS:
            c = by[(tp, T, v)]
            lines.append(f"| {tp} | {T} | {v} | {_flags_text(c.flags)} | {c.decision} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.tk_views_probe", description=__doc__)
    p.add_argument("--out", required=True, help="directory for tk_views_probe.md / .json")
    p.add_argument("--preset", default="gpt-oss-120b")
    p.add_argument("--tp", type=positive_ints, default=(8, 2))
    p.add_argument("--tokens", type=positive_ints, default=(1, 2, 4, 8, 16, 64))
    p.add_argument("--replays", type=int, default=200, help="timed replays per round (>= 100)")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    if args.replays < 100:
        p.error("--replays must be >= 100")
    if not torch.cuda.is_available():
        print("bench.tk_views_probe needs a CUDA GPU", file=sys.stderr)
        return 1
    from bench.results import run_meta
    from moe_dispatch import preset
    from moe_dispatch.backends.triton_kernels_backend import TritonKernelsBackend

    support = TritonKernelsBackend().availability()
    if not support:
        print(f"triton_kernels unavailable: {support.reason}", file=sys.stderr)
        return 1
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cases: list[Case] = []
    for tp in args.tp:
        spec = preset(args.preset, tp=tp)
        print(f"## {spec.describe()}", flush=True)
        cases += probe_shard(spec, tp, args.tokens, args.replays, args.rounds, lambda line: print(line, flush=True))
    meta = run_meta("bench.tk_views_probe", argv)
    gpu = meta["gpu"]
    meta |= {
        "sm_count": torch.cuda.get_device_properties(0).multi_processor_count,
        "replays": args.replays,
        "rounds": args.rounds,
    }
    header = (
        f"### triton_kernels: weight views vs contiguous copies ({args.preset}, {gpu})\n\n"
        f"versions: {meta['versions']}; CUDA-graph replays, median of {args.rounds} round medians "
        f"of {args.replays} replays each"
    )
    text = markdown(cases, header)
    print("\n" + text)
    (out / "tk_views_probe.md").write_text(text + "\n")
    with open(out / "tk_views_probe.json", "w") as f:
        json.dump({**meta, "cases": [dataclasses.asdict(c) for c in cases]}, f, indent=2)
    print(f"\nwrote {out / 'tk_views_probe.md'} and {out / 'tk_views_probe.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
