"""The bench plot, drawn from a saved run (never from live measurements).

One panel per shard, latency (us) against batch size on log-log axes: a line per kernel
(graph replay, uniform routing, p20-p80 band), the adaptive module's choice as markers
in the chosen kernel's colour, the old 1536-token rule dashed, the roofline floor
dotted black, and skewed-routing points as faint markers.

    python -m bench.plot bench/results/<gpu>/latest.json [-o out.png]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from bench.results import BatchResult, BenchRun, ShardResult, load

_STATIC_THRESHOLD = 1536  # the old rule's switch point, marked on the x axis


def _series(batches: list[BatchResult], value: Callable[[BatchResult], float | None]) -> tuple[list[int], list[float]]:
    """(batch sizes, values in us) for the batches where `value(batch)` gives a time in ms."""
    xs, ys = [], []
    for b in batches:
        ms = value(b)
        if ms is not None and b.num_tokens > 0:
            xs.append(b.num_tokens)
            ys.append(ms * 1e3)
    return xs, ys


def _kernel_series(batches: list[BatchResult], kernel: str, field: str) -> tuple[list[int], list[float]]:
    """`_series` of one kernel's graph-replay Timing field ("median_ms", "p20_ms" or "p80_ms")."""
    return _series(batches, lambda b: getattr(b.kernels[kernel], field) if kernel in b.kernels else None)


def _draw_shard(ax: Axes, shard: ShardResult, colors: dict[str, str]) -> None:
    uniform = sorted((b for b in shard.batches if b.routing == "uniform"), key=lambda b: b.num_tokens)
    skewed = sorted((b for b in shard.batches if b.routing == "skewed"), key=lambda b: b.num_tokens)
    for k in shard.kernel_names:
        color = colors[k]
        xs, ys = _kernel_series(uniform, k, "median_ms")
        ax.plot(xs, ys, ".-", color=color, linewidth=1.6, markersize=4, label=f"{k} (graph)")
        ax.fill_between(
            xs,
            _kernel_series(uniform, k, "p20_ms")[1],
            _kernel_series(uniform, k, "p80_ms")[1],
            color=color,
            alpha=0.15,
            linewidth=0,
        )
        xs, ys = _kernel_series(skewed, k, "median_ms")
        if xs:
            ax.plot(xs, ys, "x", color=color, alpha=0.4, markersize=5, label=f"{k} (skewed routing)")
    for k in shard.kernel_names:
        chose_k = [b for b in uniform if b.adaptive_kernel == k]
        xs, ys = _series(chose_k, lambda b: b.adaptive.median_ms if b.adaptive else None)
        if xs:
            ax.plot(xs, ys, "o", color=colors[k], markerfacecolor="none", markersize=7, label=f"adaptive chose {k}")
    xs, ys = _series(uniform, lambda b: b.static_rule.median_ms if b.static_rule else None)
    if xs:
        ax.plot(xs, ys, "--", color="0.35", linewidth=1.2, label=f"static rule ({_STATIC_THRESHOLD})")
    xs, ys = _series(uniform, lambda b: b.floor.seconds * 1e3 if b.floor.seconds > 0 else None)
    if xs:
        ax.plot(xs, ys, ":", color="black", linewidth=1.4, label="roofline floor")
    sizes = [b.num_tokens for b in shard.batches]
    if sizes and min(sizes) <= _STATIC_THRESHOLD <= max(sizes):
        ax.axvline(_STATIC_THRESHOLD, color="0.8", linewidth=0.8, zorder=0)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size (tokens)")
    ax.set_ylabel("latency (us)")
    name = str(shard.spec_json.get("name", "custom"))
    ax.set_title(name if name.endswith(f"tp={shard.tp}") else f"{name} tp={shard.tp}")
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(fontsize=7, loc="upper left")


def plot(run: BenchRun, out_png: Path | str) -> Path:
    """Draw `run` to `out_png` (parent folders created); return the path."""
    if not run.shards:
        raise ValueError(f"run on {run.gpu} at {run.date} has no shards to plot")
    out_png = Path(out_png)
    kernels = list(dict.fromkeys(k for shard in run.shards for k in shard.kernel_names))
    colors = {k: f"C{i % 10}" for i, k in enumerate(kernels)}  # one colour per kernel across panels
    n = len(run.shards)
    fig = Figure(figsize=(6.5 * n, 5.0), layout="constrained")
    FigureCanvasAgg(fig)  # Agg without pyplot: no global backend state, works headless
    axes = fig.subplots(1, n, squeeze=False)[0]
    for ax, shard in zip(axes, run.shards, strict=True):
        _draw_shard(ax, shard, colors)
    fig.suptitle(f"MoE kernels under CUDA-graph replay\n{run.gpu}, {run.date[:10]}")  # fits one panel's width
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=120)
    return out_png


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.plot", description="Plot a saved bench run.")
    parser.add_argument("json", type=Path, help="a bench result JSON (e.g. bench/results/<gpu>/latest.json)")
    parser.add_argument("-o", "--out", type=Path, default=None, help="output PNG (default: the JSON's path, .png)")
    args = parser.parse_args(argv)
    out = plot(load(args.json), args.out or args.json.with_suffix(".png"))
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
