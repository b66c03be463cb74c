"""The serving benchmark's plot, drawn from a saved result JSON (never from live runs).

Left: decode step (ms) against batch size, a line per mode with min-max bars over repeats. Right:
prefill latency (ms) against prompt tokens, likewise. Log-2 x axes.

    python -m bench.serving.plot bench/results/<gpu>/serving-<model>.json [-o out.png]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from bench.serving.report import ModeSummary, Stat, load_summary


def _draw(ax: Axes, series: dict[str, dict[int, Stat]], xlabel: str, ylabel: str) -> None:
    for i, (mode, points) in enumerate(series.items()):
        if not points:
            continue
        xs = sorted(points)
        ys = [points[x].median for x in xs]
        below = [points[x].median - points[x].lo for x in xs]
        above = [points[x].hi - points[x].median for x in xs]
        ax.errorbar(xs, ys, yerr=[below, above], fmt=".-", color=f"C{i % 10}", capsize=3, label=mode)
    ax.set_xscale("log", base=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(fontsize=8)


def plot(data: dict, summaries: dict[str, ModeSummary], out_png: Path | str) -> Path:
    """Draw one model's decode and prefill panels to `out_png` (folders created); return the path."""
    out_png = Path(out_png)
    fig = Figure(figsize=(12, 4.8), layout="constrained")
    FigureCanvasAgg(fig)  # Agg without pyplot: no global backend state, works headless
    left, right = fig.subplots(1, 2)
    _draw(left, {m: s.decode_ms for m, s in summaries.items()}, "decode batch size", "decode step (ms)")
    _draw(right, {m: s.prefill_ms for m, s in summaries.items()}, "prefill tokens (batch 1)", "prefill latency (ms)")
    model = data.get("model", {}).get("description", "?")
    fig.suptitle(f"SGLang one-batch, {model}: {data.get('gpu', '?')} ({data.get('date', '?')})", fontsize=10)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=120)
    return out_png


def plot_file(json_path: Path | str, out_png: Path | str | None = None) -> Path:
    data, summaries = load_summary(Path(json_path))
    return plot(data, summaries, out_png or Path(json_path).with_suffix(".png"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.serving.plot", description="Plot a saved serving result.")
    parser.add_argument("json", type=Path, help="bench/results/<gpu>/serving-<model>.json")
    parser.add_argument("-o", "--out", type=Path, default=None, help="output PNG (default: the JSON's path, .png)")
    args = parser.parse_args(argv)
    print(plot_file(args.json, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
