"""What one serving-benchmark run printed, and its one-batch result file, as typed records.

Log lines read (SGLang 0.5.17 logs through `[<date> TP<rank>] <message>`):

    Load weight end. elapsed=<s> s, type=..., avail mem=<GB> GB, mem usage=<GB> GB.
    Capture target prefill CUDA graph end. elapsed=<s> s, mem usage=<GB> GB, avail mem=<GB> GB.
    Capture target decode CUDA graph end. elapsed=<s> s, mem usage=<GB> GB, avail mem=<GB> GB.
    adaptive MoE start-up: measure_s=<float> sizes=<int> source=<measured|plan|threshold|fixed>   (the plugin)
    adaptive MoE: MoE calls run <kernel> for <sizes>, ... (<source>)      (the plugin's rule, rank 0)

With several tensor-parallel ranks each value is the largest over ranks (the slowest rank sets
start-up; memory is per GPU). The plugin line counts once per rank: its last occurrence.

The result file is one_batch's JSONL (`--result-filename`): one object per point with batch_size,
input_len, output_len, prefill_latency (s) and, when output_len > 1, median_decode_latency (s).
"""

from __future__ import annotations

import dataclasses
import json
import re
import statistics

from bench.serving.points import PointPlan

_RANK = re.compile(r"^\[[^\]]*\bTP(\d+)\]")
_NUM = r"(-?\d+(?:\.\d+)?)"
_LOAD = re.compile(rf"Load weight end\. elapsed={_NUM} s,.*\bmem usage={_NUM} GB")
_CAPTURE = re.compile(rf"Capture target (decode|prefill) CUDA graph end\. elapsed={_NUM} s, mem usage={_NUM} GB")
_PLUGIN = re.compile(rf"adaptive MoE start-up: measure_s={_NUM} sizes=(\d+) source=(\w+)")
_RULE = re.compile(r"adaptive MoE: MoE calls run (.+\(\w+\))\s*$")
_MAX_TOKENS = re.compile(r"max_total_num_tokens=(\d+)")
_EXCEPTION = re.compile(r"^(?:[A-Za-z_][\w.]*)?(?:Error|Exception|Interrupt)\b.*")


@dataclasses.dataclass(frozen=True)
class Phase:
    """Seconds and GPU memory (GB, as SGLang prints them) one start-up phase took."""

    elapsed_s: float
    mem_gb: float


@dataclasses.dataclass(frozen=True)
class PluginStartup:
    """The plugin's start-up line: seconds spent timing kernels, sizes decided, where choices came from."""

    measure_s: float
    sizes: int
    source: str


@dataclasses.dataclass(frozen=True)
class LogMetrics:
    """Start-up phases, the plugin's line and the last exception line of one run's log (None: not printed)."""

    weight_load: Phase | None = None
    prefill_capture: Phase | None = None
    decode_capture: Phase | None = None
    plugin: PluginStartup | None = None
    max_total_num_tokens: int | None = None
    error: str | None = None
    kernel_rule: str | None = None  # which kernel runs MoE calls of which size, as the plugin logged it


def _rank(line: str) -> int:
    match = _RANK.match(line)
    return int(match.group(1)) if match else 0


def _max_phase(phases: list[Phase]) -> Phase | None:
    if not phases:
        return None
    return Phase(max(p.elapsed_s for p in phases), max(p.mem_gb for p in phases))


def parse_log(text: str) -> LogMetrics:
    """The metrics in one run's combined stdout/stderr."""
    load: list[Phase] = []
    capture: dict[str, list[Phase]] = {"decode": [], "prefill": []}
    plugin: dict[int, PluginStartup] = {}
    max_tokens = None
    error = None
    rule = None
    in_traceback = False
    for line in text.splitlines():
        if match := _LOAD.search(line):
            load.append(Phase(float(match.group(1)), float(match.group(2))))
        elif match := _CAPTURE.search(line):
            capture[match.group(1)].append(Phase(float(match.group(2)), float(match.group(3))))
        elif match := _PLUGIN.search(line):
            plugin[_rank(line)] = PluginStartup(float(match.group(1)), int(match.group(2)), match.group(3))
        elif match := _RULE.search(line):
            rule = match.group(1)
        elif match := _MAX_TOKENS.search(line):
            max_tokens = int(match.group(1))
        if line.startswith("Traceback (most recent call last)"):
            in_traceback = True
        elif in_traceback and _EXCEPTION.match(line):
            error, in_traceback = line.strip(), False
    startup = None
    if plugin:
        lines = list(plugin.values())
        sources = "+".join(dict.fromkeys(p.source for p in lines))
        startup = PluginStartup(max(p.measure_s for p in lines), max(p.sizes for p in lines), sources)
    return LogMetrics(
        weight_load=_max_phase(load),
        prefill_capture=_max_phase(capture["prefill"]),
        decode_capture=_max_phase(capture["decode"]),
        plugin=startup,
        max_total_num_tokens=max_tokens,
        error=error,
        kernel_rule=rule,
    )


def last_lines(text: str, count: int = 3) -> str:
    """The last `count` non-empty lines, joined with " | " (for a failed run's note)."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return " | ".join(lines[-count:])


@dataclasses.dataclass(frozen=True)
class PointResults:
    """Decode step ms per batch size (median over steps) and prefill ms per token count (one per repeat)."""

    decode_ms: dict[int, float]
    prefill_ms: dict[int, tuple[float, ...]]


def parse_results(text: str, plan: PointPlan) -> PointResults:
    """Read one_batch's JSONL; rows that are neither a decode nor a prefill point of `plan` are ignored."""
    decode: dict[int, list[float]] = {}
    prefill: dict[int, list[float]] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            bs, il, ol = row["batch_size"], row["input_len"], row["output_len"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(f"result line {number}: not a one_batch result ({err}): {line[:200]}") from None
        if ol == plan.output_len and il == plan.decode_input_len and "median_decode_latency" in row:
            decode.setdefault(bs, []).append(row["median_decode_latency"] * 1e3)
        elif bs == 1 and ol == 1 and il in plan.prefill_lens:
            prefill.setdefault(il, []).append(row["prefill_latency"] * 1e3)
    return PointResults(
        decode_ms={bs: statistics.median(v) for bs, v in sorted(decode.items())},
        prefill_ms={n: tuple(v) for n, v in sorted(prefill.items())},
    )
