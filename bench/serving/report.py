"""The serving benchmark's report: aggregation over repeats, Markdown tables, the result JSON.

Per model and mode every metric is the median over the counted runs (finished, not priming), with
the spread as min-max. Decode speed-up = stock step / mode step (above 1: faster than stock);
memory and start-up are given as mode / stock (above 1: more than stock). The first process of a
session compiles every Triton kernel (cold), so start-up also has a warm comparison: per mode the
fastest repeat's plugin timing + graph capture, over stock's fastest graph capture. Files (`save`):
<results>/<gpu slug>/serving-<model>.json and .md; the JSON carries {"format": FORMAT, "version":
FORMAT_VERSION, ...}, the summary and every run record. This module is the only place that writes it.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
from collections.abc import Callable
from pathlib import Path

from bench.results import slug
from bench.serving import records
from bench.serving.logparse import Phase
from bench.serving.modes import BASELINE, MODES
from bench.serving.records import RunRecord, Session
from bench.table import markdown_row

FORMAT = "moe-dispatch-serving"
FORMAT_VERSION = 1


@dataclasses.dataclass(frozen=True)
class Stat:
    """Median and min-max of one metric over `n` runs."""

    median: float
    lo: float
    hi: float
    n: int

    def cell(self, digits: int = 2) -> str:
        text = f"{self.median:.{digits}f}"
        return text if self.n < 2 else f"{text} ({self.lo:.{digits}f}-{self.hi:.{digits}f})"


def stat(values: list[float]) -> Stat | None:
    values = [v for v in values if v is not None]
    if not values:
        return None
    return Stat(statistics.median(values), min(values), max(values), len(values))


def _sum_phases(a: Phase | None, b: Phase | None, field: str) -> float | None:
    parts = [getattr(p, field) for p in (a, b) if p is not None]
    return sum(parts) if parts else None


# Start-up and memory metrics per run: name -> how to read it from a record.
_SCALARS: dict[str, Callable[[RunRecord], float | None]] = {
    "decode_graph_s": lambda r: r.metrics.decode_capture and r.metrics.decode_capture.elapsed_s,
    "prefill_graph_s": lambda r: r.metrics.prefill_capture and r.metrics.prefill_capture.elapsed_s,
    "graph_s": lambda r: _sum_phases(r.metrics.decode_capture, r.metrics.prefill_capture, "elapsed_s"),
    "decode_graph_gb": lambda r: r.metrics.decode_capture and r.metrics.decode_capture.mem_gb,
    "prefill_graph_gb": lambda r: r.metrics.prefill_capture and r.metrics.prefill_capture.mem_gb,
    "graph_gb": lambda r: _sum_phases(r.metrics.decode_capture, r.metrics.prefill_capture, "mem_gb"),
    "weight_load_s": lambda r: r.metrics.weight_load and r.metrics.weight_load.elapsed_s,
    "plugin_measure_s": lambda r: r.metrics.plugin and r.metrics.plugin.measure_s,
    "wall_s": lambda r: r.wall_s,
}


@dataclasses.dataclass(frozen=True)
class ModeSummary:
    """One mode of one model over its counted runs; `other` lists runs not counted, with why."""

    mode: str
    runs: int
    decode_ms: dict[int, Stat]
    prefill_ms: dict[int, Stat]
    scalars: dict[str, Stat]
    plugin_source: str | None
    other: tuple[str, ...]
    warm_start_s: float | None = None  # min over counted runs of plugin timing + graphs total
    kernel_rules: tuple[str, ...] = ()  # the plugin's logged kernel-by-size rules, distinct over counted runs


def _start_s(r: RunRecord) -> float | None:
    """One run's start-up work: graph capture (decode + prefill) plus the plugin's own timing, if any."""
    graphs = _SCALARS["graph_s"](r)
    if graphs is None:
        return None
    return graphs + (_SCALARS["plugin_measure_s"](r) or 0.0)


def summarize(runs: list[RunRecord], model: str, modes: tuple[str, ...]) -> dict[str, ModeSummary]:
    """Per mode of `model`: medians over counted runs. Prefill: each run's median over its repeats first."""
    out = {}
    for mode in modes:
        mine = [r for r in runs if r.model == model and r.mode == mode]
        counted = [r for r in mine if r.counted]
        other = tuple(f"{r.mode} r{r.repeat}: {r.status}" + (f" ({r.note})" if r.note else "") for r in mine)
        other = tuple(line for line, r in zip(other, mine, strict=True) if not r.counted)
        sizes = sorted({bs for r in counted for bs in r.decode_ms})
        lens = sorted({n for r in counted for n in r.prefill_ms})
        sources = [r.metrics.plugin.source for r in counted if r.metrics.plugin is not None]
        starts = [s for r in counted if (s := _start_s(r)) is not None]
        out[mode] = ModeSummary(
            mode=mode,
            runs=len(counted),
            decode_ms={bs: stat([r.decode_ms.get(bs) for r in counted]) for bs in sizes},
            prefill_ms={
                n: stat([statistics.median(r.prefill_ms[n]) for r in counted if r.prefill_ms.get(n)]) for n in lens
            },
            scalars={k: s for k, read in _SCALARS.items() if (s := stat([read(r) for r in counted])) is not None},
            plugin_source="+".join(dict.fromkeys(sources)) or None,
            other=other,
            warm_start_s=min(starts) if starts else None,
            kernel_rules=tuple(dict.fromkeys(r.metrics.kernel_rule for r in counted if r.metrics.kernel_rule)),
        )
    return out


def warm_vs_off(summaries: dict[str, ModeSummary], mode: str) -> float | None:
    """The mode's warm start (min of plugin timing + graphs total) / stock's minimum graphs total."""
    base = summaries.get(BASELINE)
    den = base.scalars.get("graph_s") if base is not None else None
    num = summaries[mode].warm_start_s
    if num is None or den is None or den.lo == 0:
        return None
    return num / den.lo


def _ratio(num: Stat | None, den: Stat | None) -> str:
    if num is None or den is None or den.median == 0:
        return "-"
    return f"{num.median / den.median:.2f}x"


def _table(header: list[str], rows: list[list[str]], left: int = 0) -> list[str]:
    """Markdown table; the first `left` columns left-aligned, the others right-aligned."""
    align = ["---"] * left + ["--:"] * (len(header) - left)
    return [markdown_row(header), markdown_row(align), *(markdown_row(r) for r in rows)]


def _by_size(summaries: dict[str, ModeSummary], field: str, first: str) -> list[str]:
    """Rows per batch size (decode_ms) or token count (prefill_ms): each mode's time, then speed-ups vs stock."""
    modes = list(summaries)
    others = [m for m in modes if m != BASELINE]
    base = summaries.get(BASELINE)
    sizes = sorted({k for s in summaries.values() for k in getattr(s, field)})
    rows = []
    for size in sizes:
        per_mode = {m: getattr(summaries[m], field).get(size) for m in modes}
        cells = [str(size)] + [s.cell() if s is not None else "-" for s in per_mode.values()]
        if base is not None:
            cells += [_ratio(per_mode[BASELINE], per_mode[m]) for m in others]
        rows.append(cells)
    header = [first, *(f"{m} ms" for m in modes)] + ([f"{m} speed-up" for m in others] if base is not None else [])
    return _table(header, rows)


def _per_mode(
    summaries: dict[str, ModeSummary],
    columns: list[tuple[str, str, int]],
    ratio_of: str,
    source: bool = False,
    extra: tuple[tuple[str, Callable[[str], str]], ...] = (),
) -> list[str]:
    """A row per mode: the scalar `columns` (title, key, digits), "vs off" (mode / stock of `ratio_of`)
    right after the `ratio_of` column, then the `extra` columns (title, cell of a mode), then the
    plugin's source when `source`."""
    base = summaries.get(BASELINE)
    header, rows = ["mode"], []
    for title, key, _ in columns:
        header += [title] + (["vs off"] if key == ratio_of else [])
    header += [title for title, _ in extra]
    for mode, s in summaries.items():
        cells = [mode]
        for _, key, digits in columns:
            cells.append(s.scalars[key].cell(digits) if key in s.scalars else "-")
            if key == ratio_of:
                cells.append(_ratio(s.scalars.get(key), base.scalars.get(key) if base else None))
        cells += [cell(mode) for _, cell in extra]
        rows.append(cells + ([s.plugin_source or "-"] if source else []))
    return _table(header + (["plugin source"] if source else []), rows, left=1)


def _number(value: float | None, fmt: str, suffix: str = "") -> str:
    return "-" if value is None else format(value, fmt) + suffix


def markdown(session: Session, model: str, summaries: dict[str, ModeSummary]) -> str:
    """The model's report: context lines, then decode, prefill, graph memory and start-up tables (the
    last with the warm comparison: see `warm_vs_off`)."""
    info = session.model(model)
    st = session.settings
    versions = ", ".join(f"{k} {v}" for k, v in session.versions.items()) or "-"
    lines = [
        f"### Serving: {info.description}",
        "",
        f"- GPU: {session.gpu}; versions: {versions}",
        f"- date: {session.date}; command: `{session.command}`",
        f"- SGLang one-batch benchmark, {session.repeats} repeat(s) per mode, modes alternating "
        f"({', '.join(session.modes)}); cells: median (min-max) over repeats",
        f"- decode step: one_batch's median over {st.get('output_len', 0) - 1} steps after a "
        f"{st.get('decode_input_len', '?')}-token prompt per sequence; prefill: batch 1, median of "
        f"{st.get('prefill_repeats', '?')} per run; prefill graphs captured: {st.get('prefill_graphs', '?')}",
        f"- modes: {'; '.join(f'{m} = {MODES[m].description}' for m in session.modes if m in MODES)}",
    ]
    dropped = [line for s in summaries.values() for line in s.other]
    if dropped:
        lines.append(f"- not counted: {'; '.join(dropped)}")
    lines += ["", "Decode step (ms; speed-up = stock / mode)", ""]
    lines += _by_size(summaries, "decode_ms", "batch")
    lines += ["", "Prefill latency (ms; speed-up = stock / mode)", ""]
    lines += _by_size(summaries, "prefill_ms", "tokens")
    lines += ["", "CUDA-graph memory (GB, as SGLang logs it; vs off = mode / stock)", ""]
    memory = [("decode", "decode_graph_gb", 2), ("prefill", "prefill_graph_gb", 2), ("total", "graph_gb", 2)]
    lines += _per_mode(summaries, memory, "graph_gb")
    lines += ["", "Start-up (s; vs off = graph capture of mode / stock)", ""]
    startup = [
        ("decode graphs", "decode_graph_s", 1),
        ("prefill graphs", "prefill_graph_s", 1),
        ("graphs total", "graph_s", 1),
        ("plugin timing", "plugin_measure_s", 1),
        ("weight load", "weight_load_s", 1),
        ("whole run", "wall_s", 0),
    ]
    warm = (
        ("warm start s", lambda m: _number(summaries[m].warm_start_s, ".1f")),
        ("warm vs off", lambda m: _number(warm_vs_off(summaries, m), ".2f", "x")),
    )
    lines += _per_mode(summaries, startup, "graph_s", source=True, extra=warm)
    lines += [
        "",
        "Warm start = plugin timing + graphs total of a mode's fastest repeat, and warm vs off = that / stock's "
        "fastest graphs total: the first process of a session compiles every Triton kernel it uses (cold), so the "
        "medians above mix cold and warm starts, while the fastest repeat is the warm process.",
    ]
    rules = [f"- {m}: {rule}" for m, s in summaries.items() for rule in s.kernel_rules]
    if rules:
        lines += ["", "Kernels by MoE call size (tokens), as the plugin logged them", "", *rules]
    return "\n".join(lines) + "\n"


def _stat_json(s: Stat) -> dict:
    return {"median": round(s.median, 4), "min": round(s.lo, 4), "max": round(s.hi, 4), "n": s.n}


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def to_json(session: Session, model: str, summaries: dict[str, ModeSummary], runs: list[RunRecord]) -> dict:
    info = session.model(model)
    return {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "gpu": session.gpu,
        "versions": dict(session.versions),
        "date": session.date,
        "command": session.command,
        "settings": dict(session.settings),
        "modes": list(session.modes),
        "repeats": session.repeats,
        "model": dataclasses.asdict(info),
        "summary": {
            m: {
                "runs": s.runs,
                "decode_ms": {str(k): _stat_json(v) for k, v in s.decode_ms.items()},
                "prefill_ms": {str(k): _stat_json(v) for k, v in s.prefill_ms.items()},
                **{k: _stat_json(v) for k, v in s.scalars.items()},
                "warm_start_s": _round(s.warm_start_s),
                "warm_vs_off": _round(warm_vs_off(summaries, m)),
                "plugin_source": s.plugin_source,
                "kernel_rules": list(s.kernel_rules),
                "not_counted": list(s.other),
            }
            for m, s in summaries.items()
        },
        "runs": [records.to_json(r) for r in runs if r.model == model],
    }


def save(session: Session, model: str, runs: list[RunRecord], results_dir: Path) -> tuple[Path, str]:
    """Write serving-<model>.json and .md under <results_dir>/<gpu slug>/; return the JSON path and the Markdown."""
    summaries = summarize(runs, model, session.modes)
    text = markdown(session, model, summaries)
    folder = Path(results_dir) / slug(session.gpu)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"serving-{model}.json"
    path.write_text(json.dumps(to_json(session, model, summaries, runs), indent=1) + "\n")
    path.with_suffix(".md").write_text(text)
    return path, text


def load_summary(path: Path) -> tuple[dict, dict[str, ModeSummary]]:
    """A saved result: its JSON (for titles) and the summary as ModeSummary per mode; ValueError if not ours."""
    data = json.loads(Path(path).read_text())
    if data.get("format") != FORMAT or data.get("version") != FORMAT_VERSION:
        raise ValueError(f"{path}: not a {FORMAT} v{FORMAT_VERSION} file")

    def stats(table: dict) -> dict[int, Stat]:
        return {int(k): Stat(v["median"], v["min"], v["max"], v["n"]) for k, v in table.items()}

    summaries = {}
    for mode, s in data["summary"].items():
        scalars = {k: Stat(v["median"], v["min"], v["max"], v["n"]) for k, v in s.items() if k in _SCALARS}
        summaries[mode] = ModeSummary(
            mode,
            s["runs"],
            stats(s["decode_ms"]),
            stats(s["prefill_ms"]),
            scalars,
            s["plugin_source"],
            (),
            s.get("warm_start_s"),  # absent in files written before it was added
            tuple(s.get("kernel_rules", ())),  # likewise
        )
    return data, summaries
