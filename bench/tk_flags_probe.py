"""How much triton_kernels gains from opt flags other than its own, per matmul and batch size.

    python -m bench.tk_flags_probe --out DIR [--preset gpt-oss-120b --tp 8,2 --tokens 32,128,1024
                                   --workers 8 --replays 100 --rounds 3]

Per shard and token count T, on the kernel the table steers: `triton_kernels_tuned` without a
table (SGLang's triton_kernels runner on the weight views, with moe-dispatch's routing, combine
and split-K reduce), so each variant pays what it will cost in serving:
    1. triton_kernels' own flags for the up and the down matmul are recorded (`default`);
    2. `matmul_variants` lists flags around each (tiles, block_m, warps, stages, persistence,
       and for a K long enough, split-K counts on the default tile and on the tile with twice its
       block_k);
       each variant runs with the other matmul at its own flags, steered by
       moe_dispatch.backends.tk_matmul_flags.scoped_matmul_flags;
    3. every variant's output is checked against the default's (bf16 tolerance), the ones
       that run and match are captured as CUDA graphs and timed, interleaved over `rounds`;
    4. the best up and the best down variant are combined and timed side by side with the
       default (`rounds` more rounds): the gain reported is default / combined.
Compiling a new flags variant takes seconds (Triton); `--workers N` first runs every variant
once in N processes (no timing), so the timing process finds Triton's on-disk cache warm.
Writes DIR/tk_flags_probe.md and .json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from bench.cli import positive_ints
from bench.tk_flags_report import markdown, store_table
from moe_dispatch.backends.tk_flags import default_block_n, next_power_of_2
from moe_dispatch.backends.tk_matmul_flags import MatmulFlags, gemm_keys

PHASES = ("up", "down")
BLOCK_NS = (64, 128, 256)
BLOCK_KS = (32, 64, 128, 256)
MAX_STAGES = 6
SPLITS = (1, 2, 3, 4, 6, 8, 12, 16)  # split-K counts tried where K / split >= 2 block_k
REL_RMS_TOL = 1e-2  # bf16 outputs of two flag choices (different summation orders) vs each other


def stages_that_fit(flags: MatmulFlags, smem_bytes: int) -> int:
    """Pipeline stages whose A and B tiles (bf16) fit `smem_bytes`, as triton_kernels 3.6 counts
    them (persistent: the epilogue's staging tile comes off the top, 8 B barrier per stage)."""
    stage = (flags.block_m * flags.block_k + flags.block_k * flags.block_n) * 2
    if flags.is_persistent:
        stage += 8
        smem_bytes -= (flags.block_m + 4) * flags.block_n * 2
    return max(0, smem_bytes // stage)


def default_warps(block_m: int, block_n: int, persistent: bool) -> int:
    """triton_kernels 3.6's num_warps rule (compute_num_warps, no microscaling)."""
    return max(block_m * block_n // 4096, 4 if persistent else 1)


def matmul_variants(default: MatmulFlags, n: int, k: int, smem_bytes: int) -> list[MatmulFlags]:
    """Flags around `default` for a GEMM of N = n, K = k (default itself excluded, no repeats).

    tiles: every block_n x block_k (no larger than the GEMM) at default's block_m, persistence;
    block_m: 16..128; warps: 4 and 8; stages: one fewer and one more; persistence flipped;
    split_k: on default's tile and on that tile with twice its block_k, each of SPLITS that leaves
    every slice at least two blocks of K, other than default's own split on its own tile
    (`default.split_k`, the recorded count; None: no split variants). Only the split variants
    set split_k; the others leave it to triton_kernels.
    A variant gets triton_kernels' warps rule and the most stages (<= 4) that fit, unless the
    step varies them. Variants with fewer than 2 stages, or whose pipeline needs more than
    `smem_bytes`, are left out.
    """

    def shaped(persistent: bool, m: int, bn: int, bk: int) -> MatmulFlags | None:
        base = MatmulFlags(persistent, m, bn, bk, default_warps(m, bn, persistent), 2)
        stages = min(4, stages_that_fit(base, smem_bytes))
        return dataclasses.replace(base, num_stages=stages) if stages >= 2 else None

    d = dataclasses.replace(default, split_k=None)
    out: list[MatmulFlags | None] = []
    for bn in BLOCK_NS:
        for bk in BLOCK_KS:
            if bn <= max(16, next_power_of_2(n)) and bk <= max(16, next_power_of_2(k)):
                out.append(shaped(d.is_persistent, d.block_m, bn, bk))
    for m in (16, 32, 64, 128):
        out.append(shaped(d.is_persistent, m, d.block_n, d.block_k))
    for warps in (4, 8):
        out.append(dataclasses.replace(d, num_warps=warps))
    for stages in (d.num_stages - 1, d.num_stages + 1):
        if 2 <= stages <= MAX_STAGES:
            out.append(dataclasses.replace(d, num_stages=stages))
    flip = not d.is_persistent
    out.append(shaped(flip, d.block_m, default_block_n(n), d.block_k))
    if default.split_k is not None:
        for tile in (d, shaped(d.is_persistent, d.block_m, d.block_n, 2 * d.block_k)):
            if tile is not None:
                own = default.split_k if tile == d else None
                out.extend(
                    dataclasses.replace(tile, split_k=s) for s in SPLITS if s != own and k >= 2 * s * tile.block_k
                )
    kept: dict[MatmulFlags, None] = {}
    for v in out:
        if v is not None and v != d and stages_that_fit(v, smem_bytes) >= v.num_stages:
            kept.setdefault(v)
    return list(kept)


@dataclasses.dataclass(frozen=True)
class Variant:
    """One timed configuration: each phase's flags (None: triton_kernels' own)."""

    name: str
    up: MatmulFlags | None = None
    down: MatmulFlags | None = None


def variants_for(defaults: dict[str, MatmulFlags], keys: dict[str, tuple[int, int]], smem: int) -> list[Variant]:
    out = [Variant("default", None, None)]
    for phase in PHASES:
        n, k = keys[phase]
        for flags in matmul_variants(defaults[phase], n, k, smem):
            out.append(Variant(f"{phase}:{flags.label()}", **{phase: flags}))
    return out


def _flag_map(variant: Variant, keys: dict[str, tuple[int, int]]) -> dict[tuple[int, int], MatmulFlags]:
    return {keys[p]: getattr(variant, p) for p in PHASES if getattr(variant, p) is not None}


# ---- GPU --------------------------------------------------------------------------------------


def _recorded_defaults(kernel, x, logits) -> tuple[dict[str, MatmulFlags], torch.Tensor]:
    """triton_kernels' own flags of each matmul of one call (with its split-K count), and that
    call's output."""
    from bench.tk_views_probe import recorded_opt_flags

    with recorded_opt_flags() as seen:
        out = kernel.forward(x, logits)
    if not seen or len(seen) != 2:
        raise RuntimeError(f"expected 2 matmul_ogs calls per MoE call, recorded {seen}")
    return {p: with_own_split(f) for p, f in zip(PHASES, seen, strict=True)}, out


def with_own_split(recorded: object) -> MatmulFlags:
    """MatmulFlags of a recorded OptFlags (or mapping), split_k set to the recorded count."""
    split = recorded["split_k"] if isinstance(recorded, Mapping) else recorded.split_k
    return dataclasses.replace(MatmulFlags.of(recorded), split_k=split)


def _run(kernel, variant: Variant, keys, x, logits) -> torch.Tensor:
    from moe_dispatch.backends.tk_matmul_flags import scoped_matmul_flags

    with scoped_matmul_flags(_flag_map(variant, keys)):
        return kernel.forward(x, logits)


@dataclasses.dataclass
class Shard:
    spec: object
    kernel: object
    keys: dict[str, tuple[int, int]]
    smem: int


def _shard(preset_name: str, tp: int) -> Shard:
    from moe_dispatch import ExpertWeights, preset
    from moe_dispatch.backends.triton_kernels_tuned import TritonKernelsTunedBackend

    spec = preset(preset_name, tp=tp)
    weights = ExpertWeights.random(spec, device="cuda", seed=0)
    kernel = TritonKernelsTunedBackend().prepare_with_table(spec, weights, None)  # steered by each variant
    smem = torch.cuda.get_device_properties(0).shared_memory_per_block_optin
    return Shard(spec, kernel, gemm_keys(spec.hidden_size, spec.intermediate_size), smem)


def warm(args) -> int:
    """Worker: run this part's variants once each (compiles into Triton's cache); no timing."""
    from moe_dispatch import random_inputs

    index, parts = args.part
    job = 0
    for tp in args.tp:
        shard = _shard(args.preset, tp)
        for T in args.tokens:
            t0 = time.time()
            x, logits = random_inputs(shard.spec, T, device="cuda", seed=1000 + T)
            defaults, _ = _recorded_defaults(shard.kernel, x, logits)
            for variant in variants_for(defaults, shard.keys, shard.smem):
                job += 1
                if job % parts != index:
                    continue
                try:
                    _run(shard.kernel, variant, shard.keys, x, logits)
                    torch.cuda.synchronize()
                except Exception:  # the timing process records the failure with its reason
                    pass
            print(f"[warm {index}/{parts}] tp={tp} T={T} in {time.time() - t0:.0f} s", flush=True)
    return 0


def _spawn_warmers(argv: list[str], workers: int, say: Callable[[str], None]) -> None:
    t0 = time.time()
    procs = [
        subprocess.Popen([sys.executable, "-m", "bench.tk_flags_probe", *argv, "--part", f"{i}/{workers}"])
        for i in range(workers)
    ]
    codes = [p.wait() for p in procs]
    say(f"warmed Triton's cache in {workers} processes in {time.time() - t0:.0f} s (exit codes {codes})")


def probe_point(shard: Shard, T: int, replays: int, rounds: int, say) -> dict:
    from graphs.capture import capture
    from graphs.timing import time_replays
    from moe_dispatch import random_inputs
    from moe_dispatch.testing import error_stats

    x, logits = random_inputs(shard.spec, T, device="cuda", seed=1000 + T)
    defaults, reference = _recorded_defaults(shard.kernel, x, logits)
    reference = reference.clone()
    variants = variants_for(defaults, shard.keys, shard.smem)
    failed: dict[str, str] = {}
    pool, stream = torch.cuda.graph_pool_handle(), torch.cuda.Stream()

    def captured(variant: Variant):
        try:
            out = _run(shard.kernel, variant, shard.keys, x, logits)
            err = error_stats(out, reference)
            if err.nonfinite or err.rms > REL_RMS_TOL:
                raise ValueError(f"output differs from the default's: rel rms {err.rms:.2e}, max {err.max:.2e}")
            return capture(lambda a, b: _run(shard.kernel, variant, shard.keys, a, b), (x, logits), pool, stream)
        except Exception as error:  # compile, resources, capture or mismatch: recorded, not timed
            failed[variant.name] = f"{type(error).__name__}: {str(error).splitlines()[0][:160] if str(error) else ''}"
            return None

    graphs = {v.name: g for v in variants if (g := captured(v)) is not None}
    times: dict[str, list[float]] = {name: [] for name in graphs}
    for _ in range(rounds):
        for name, g in graphs.items():
            times[name].append(time_replays(g.graph, warmup=10, replays=replays).median_ms * 1e3)
    median = {name: statistics.median(ts) for name, ts in times.items()}
    best = {}
    for phase in PHASES:
        mine = [v for v in variants if getattr(v, phase) is not None and v.name in median]
        best[phase] = min(mine, key=lambda v: median[v.name]) if mine else None
    combined = Variant(
        "combined",
        best["up"].up if best["up"] and median[best["up"].name] < median["default"] else None,
        best["down"].down if best["down"] and median[best["down"].name] < median["default"] else None,
    )
    side_by_side: dict[str, list[float]] = {"default": [], "combined": []}
    if combined.up or combined.down:
        g = captured(combined)
        if g is not None:
            for r in range(rounds):
                order = (("default", graphs["default"]), ("combined", g))
                for name, graph in order if r % 2 == 0 else order[::-1]:
                    side_by_side[name].append(time_replays(graph.graph, warmup=10, replays=replays).median_ms * 1e3)
    gain = (
        statistics.median(side_by_side["default"]) / statistics.median(side_by_side["combined"])
        if side_by_side["combined"]
        else 1.0
    )
    say(
        f"[{shard.spec.name}] T={T:5d} default {median.get('default', float('nan')):8.1f} us"
        f" | best up {best['up'].name if best['up'] else '-'} | best down {best['down'].name if best['down'] else '-'}"
        f" | combined gain {gain:.3f}x | {len(graphs)} timed, {len(failed)} failed"
    )
    del graphs
    torch.cuda.synchronize()
    return {
        "shard": shard.spec.name,
        "tokens": T,
        "defaults": {p: defaults[p].label() for p in PHASES},
        "median_us": median,
        "failed": failed,
        "combined": {p: getattr(combined, p).label() if getattr(combined, p) else None for p in PHASES},
        "side_by_side_us": side_by_side,
        "gain": gain,
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.tk_flags_probe", description=__doc__)
    p.add_argument("--out", required=True, help="directory for tk_flags_probe.md / .json")
    p.add_argument("--preset", default="gpt-oss-120b")
    p.add_argument("--tp", type=positive_ints, default=(8,))
    p.add_argument("--tokens", type=positive_ints, default=(32, 128, 256, 1024))
    p.add_argument("--replays", type=int, default=100)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--workers", type=int, default=0, help="processes that compile every variant first (0: none)")
    p.add_argument("--tables", type=Path, help="write each shard's TkFlagsTable here (merged over one there)")
    p.add_argument("--min-gain", type=float, default=0.01, help="store tuned flags only when this much faster")
    p.add_argument("--part", type=lambda s: tuple(map(int, s.split("/"))), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.replays < 1 or args.rounds < 1 or args.workers < 0:
        p.error("--replays and --rounds must be >= 1, --workers >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("bench.tk_flags_probe needs a CUDA GPU", file=sys.stderr)
        return 1
    if args.part is not None:
        return warm(args)
    from bench.results import run_meta
    from moe_dispatch.backends.triton_kernels_backend import TritonKernelsBackend

    support = TritonKernelsBackend().availability()
    if not support:
        print(f"triton_kernels unavailable: {support.reason}", file=sys.stderr)
        return 1

    def say(line: str) -> None:
        print(line, flush=True)

    if args.workers:
        _spawn_warmers(argv, args.workers, say)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    points = []
    for tp in args.tp:
        shard = _shard(args.preset, tp)
        say(f"## {shard.spec.describe()}")
        mine = []
        for T in args.tokens:
            try:
                mine.append(probe_point(shard, T, args.replays, args.rounds, say))
            except Exception as error:  # keep the other points; the failure is in the log
                say(f"[{shard.spec.name}] T={T}: probe failed: {type(error).__name__}: {error}")
        points += mine
        if args.tables is not None and mine:
            say(f"wrote {store_table(shard.spec, mine, args.tables, args.min_gain, ' '.join(argv))}")
        del shard
        torch.cuda.empty_cache()
    meta = run_meta("bench.tk_flags_probe", argv)
    gpu = meta["gpu"]
    meta["pid"] = os.getpid()
    header = (
        f"### triton_kernels opt flags: its own vs the best per matmul ({args.preset}, {gpu})\n\n"
        f"versions: {meta['versions']}; CUDA-graph replays, median of {args.rounds} round medians of "
        f"{args.replays}; gain = default / combined, timed side by side"
    )
    text = markdown(points, header)
    say("\n" + text)
    (out / "tk_flags_probe.md").write_text(text + "\n")
    (out / "tk_flags_probe.json").write_text(json.dumps({**meta, "points": points}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
