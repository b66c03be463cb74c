"""The tuner's report: per shape, one row per bucket (default ms, tuned ms, speed-ups, configs).

Written as Markdown (printed, and report.md) and JSON (report.json) under out/tune/, and
to `--report PATH` (PATH gets the Markdown, PATH with suffix .json the JSON). The JSON
holds per bucket the stored config with its times, so `--table-from-report` can rebuild
the tables from it without a GPU (bench/tune/tables.py).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.table import markdown_row
from bench.tune.search import Outcome


@dataclass(frozen=True)
class ShapeReport:
    """One shape's outcomes and where its table went (None: nothing was stored)."""

    name: str
    key: dict[str, str]  # gpu, triton_version, shape
    outcomes: tuple[Outcome, ...]
    table: str | None
    settings: dict[str, object]
    created: str | None = None  # the table's `created` (when this run stored it)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def stored_default_ms(outcome: Outcome) -> float | None:
    """The default's time as stored (the confirm's median when confirmed), else the search's."""
    config = outcome.config
    return config.default_ms if config is not None and config.default_ms is not None else outcome.default_ms


def speedup(outcome: Outcome) -> float | None:
    """Stored default ms / stored pair ms (1.0 where the default is kept)."""
    stored, default = outcome.stored_ms, stored_default_ms(outcome)
    return None if stored is None or default is None else default / stored


def search_speedup(outcome: Outcome) -> float | None:
    """What the search saw: its baseline / its best pair (timed in different chunks)."""
    o = outcome
    return None if o.best_ms is None or o.default_ms is None else o.default_ms / o.best_ms


def confirmed_speedup(outcome: Outcome) -> float | None:
    """1 / the confirm's median tuned/default ratio (side-by-side rounds); None: no confirm."""
    return None if outcome.confirmed is None else 1 / outcome.confirmed


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _configs(o: Outcome) -> str:
    parts = [f"{o.timed} timed"]
    if o.reused:
        parts.append(f"{o.reused} resumed")
    if o.failed:
        parts.append(f"{o.failed} failed")
    if o.confirm_rounds:
        parts.append(f"{o.confirm_rounds} confirm round{'s' if o.confirm_rounds > 1 else ''}")
    return ", ".join(parts)


def markdown(report: ShapeReport) -> str:
    """A heading and one Markdown table row per bucket."""
    key = report.key
    lines = [
        f"### {report.name}: {key.get('gpu', '?')}, Triton {key.get('triton_version', '?')}",
        "",
        f"shape `{key.get('shape', '?')}`; table: {report.table or 'not written'}",
        "",
        markdown_row(
            ["bucket", "default ms", "tuned ms", "search speed-up", "confirmed speed-up", "up", "down", "status"]
            + ["configs"]
        ),
        "|" + "---|" * 9,
    ]
    for o in report.outcomes:
        up = down = "-"
        if o.config is not None:
            up, down = f"`{o.config.up.label()}`", f"`{o.config.down.label()}`"
        status = o.status + (f" ({o.note[:80]})" if o.note and o.status != "tuned" else "")
        cells = [str(o.bucket), _ms(stored_default_ms(o)), _ms(o.stored_ms), _x(search_speedup(o))]
        cells += [_x(confirmed_speedup(o)), up, down, status.replace("|", "/"), _configs(o)]
        lines.append(markdown_row(cells))
    lines += [
        "",
        "Times: median CUDA-graph replay of one MoE call (both matmuls, routing, combine), as stored in the "
        "table (default and tuned: medians of the confirm rounds where there are any). Search speed-up: the "
        "search's baseline over its best pair, timed in different chunks; confirmed speed-up: 1 / the median "
        "tuned/default ratio of the side-by-side confirm rounds, which decides what is stored.",
    ]
    return "\n".join(lines)


def _outcome_json(o: Outcome) -> dict:
    data = dataclasses.asdict(o)
    data["default"] = o.default.label()
    data["best"] = None if o.best is None else {"up": o.best[0].label(), "down": o.best[1].label()}
    c = o.config
    data["config"] = (
        None
        if c is None
        else {
            "up": c.up.label(),
            "down": c.down.label(),
            "up_ms": c.up_ms,
            "down_ms": c.down_ms,
            "default_ms": c.default_ms,
        }
    )
    data["stored_ms"], data["speedup"] = o.stored_ms, speedup(o)
    data["search_speedup"], data["confirmed_speedup"] = search_speedup(o), confirmed_speedup(o)
    return data


def to_json(reports: Sequence[ShapeReport]) -> dict:
    return {
        "tool": "bench.tune",
        "shapes": [
            {
                "name": r.name,
                "key": r.key,
                "table": r.table,
                "created": r.created,
                "settings": r.settings,
                "buckets": [_outcome_json(o) for o in r.outcomes],
            }
            for r in reports
        ],
    }


def write(reports: Sequence[ShapeReport], directory: Path, extra: Path | None = None) -> list[Path]:
    """report.md + report.json in `directory`, and `extra` (Markdown) + its .json; the paths written."""
    text = "\n\n".join(markdown(r) for r in reports) + "\n"
    data = json.dumps(to_json(reports), indent=1) + "\n"
    targets = [(directory / "report.md", directory / "report.json")]
    if extra is not None:
        md = extra.with_suffix(".md") if extra.suffix == ".json" else extra
        targets.append((md, md.with_suffix(".json")))
    written = []
    for md, js in targets:
        md.parent.mkdir(parents=True, exist_ok=True)
        md.write_text(text)
        js.write_text(data)
        written += [md, js]
    return written
