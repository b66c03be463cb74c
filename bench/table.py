"""The Markdown report of a bench run: a header for the run, then one table per shard.

One row per (batch size, routing). Times are in microseconds: median (p20-p80) of
CUDA-graph replays. Each time is also given as a multiple of the batch's roofline
floor (`bench.roofline`). A kernel that was not timed shows "error (n)"; footnote n
under the table says why.
"""

from __future__ import annotations

from bench.results import ROUTINGS, BatchResult, BenchRun, ShardResult, Timing
from bench.roofline import Ceilings

_BOUND_SHORT = {"memory": "mem", "compute": "flop"}


def _us(ms: float) -> str:
    return f"{ms * 1e3:.1f}"


def _timing_cell(t: Timing) -> str:
    return f"{_us(t.median_ms)} ({_us(t.p20_ms)}-{_us(t.p80_ms)})"


def _ratio_cell(batch: BatchResult, t: Timing | None) -> str:
    if t is None or batch.floor.seconds <= 0:
        return "-"
    return f"{batch.ratio_to_floor(t):.2f}x"


def _escape(text: str) -> str:
    # A "|" would split the cell and a newline would end the row.
    return " ".join(text.split()).replace("|", "\\|")


def markdown_row(cells: list[str]) -> str:
    """One Markdown table row (cells are not escaped: see `_escape`)."""
    return "| " + " | ".join(cells) + " |"


def markdown_table(shard: ShardResult, ceilings: Ceilings) -> str:
    """The table of one shard, a line saying how the floor was computed, and the error footnotes."""
    kernels = shard.kernel_names
    eager_kernels = tuple(dict.fromkeys(k for b in shard.batches for k in b.eager))
    header = (
        ["T", "routing", "touched experts"]
        + [f"{k} us" for k in kernels]
        + [f"{k} eager us" for k in eager_kernels]
        + ["adaptive us", "1536 rule us", "winner", "margin", "regret", "floor us"]
        + [f"{k}/floor" for k in kernels]
        + ["adaptive/floor", "rule/floor"]
    )
    lines = [markdown_row(header), markdown_row(["--:" if i in (0, 2) else "---" for i in range(len(header))])]
    footnotes: list[str] = []
    rows = sorted(shard.batches, key=lambda b: (b.num_tokens, ROUTINGS.index(b.routing)))
    for b in rows:
        kernel_cells = []
        for k in kernels:
            if k in b.kernels:
                kernel_cells.append(_timing_cell(b.kernels[k]))
            elif k in b.errors:
                footnotes.append(f"{len(footnotes) + 1}. T={b.num_tokens} {b.routing}, {k}: {_escape(b.errors[k])}")
                kernel_cells.append(f"error ({len(footnotes)})")
            else:
                kernel_cells.append("-")
        margin = b.margin
        cells = (
            [str(b.num_tokens), b.routing, str(b.touched_experts)]
            + kernel_cells
            + [_timing_cell(b.eager[k]) if k in b.eager else "-" for k in eager_kernels]
            + [
                f"{_us(b.adaptive.median_ms)} {b.adaptive_kernel}" if b.adaptive else "-",
                f"{_us(b.static_rule.median_ms)} {b.static_rule_kernel}" if b.static_rule else "-",
                b.winner or "-",
                f"{margin:.2f}x" if margin is not None else "-",
                f"{b.regret:.1%}" if b.regret is not None else "-",
                f"{_us(b.floor.seconds * 1e3)} {_BOUND_SHORT[b.floor.bound]}",
            ]
            + [_ratio_cell(b, b.kernels.get(k)) for k in kernels]
            + [_ratio_cell(b, b.adaptive), _ratio_cell(b, b.static_rule)]
        )
        lines.append(markdown_row(cells))
    lines += [
        "",
        "Times in us: median (p20-p80) of CUDA-graph replays. "
        "Floor = max((touched experts' weight bytes + activation bytes) / "
        f"{ceilings.hbm_bytes_per_s / 1e12:.2f} TB/s, flops / {ceilings.bf16_flops_per_s / 1e12:.0f} TFLOP/s); "
        "mem/flop names the larger term. Margin = runner-up / winner. Regret = the adaptive module's "
        "kernel over the winner, both from the side-by-side columns (the adaptive column is its own replay path).",
    ]
    if footnotes:
        lines += ["", "Errors (not timed):", "", *footnotes]
    return "\n".join(lines) + "\n"


def _shard_title(shard: ShardResult) -> str:
    name = str(shard.spec_json.get("name", "custom"))
    # Preset names already end in "tp=N"; say it once.
    return name if name.endswith(f"tp={shard.tp}") else f"{name} tp={shard.tp}"


def render_run(run: BenchRun) -> str:
    """The whole report: run header (GPU, versions, ceilings, date, command), then each shard's table."""
    versions = ", ".join(f"{k} {v}" for k, v in run.versions.items()) or "-"
    seeds = ", ".join(f"{k}={v}" for k, v in run.seeds.items()) or "-"
    parts = [
        f"# MoE kernels under CUDA-graph replay: {run.gpu}",
        "",
        f"- GPU: {run.gpu} ({run.sm_count} SMs)",
        f"- versions: {versions}",
        f"- measured ceilings: {run.ceilings.hbm_bytes_per_s / 1e12:.2f} TB/s device copy, "
        f"{run.ceilings.bf16_flops_per_s / 1e12:.0f} TFLOP/s bf16 matmul",
        f"- seeds: {seeds}",
        f"- date: {run.date}",
        f"- command: `{run.command}`",
    ]
    for shard in run.shards:
        parts += [
            "",
            f"## {_shard_title(shard)}",
            "",
            f"`{shard.spec.describe()}`",
            "",
            markdown_table(shard, run.ceilings).rstrip("\n"),
        ]
    return "\n".join(parts) + "\n"
