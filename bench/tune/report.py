"""The tuner's report: per shape, one row per bucket (default ms, tuned ms, speed-up, configs).

Written as Markdown (printed, and report.md) and JSON (report.json) under out/tune/, and
to `--report PATH` (PATH gets the Markdown, PATH with suffix .json the JSON).
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


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def speedup(outcome: Outcome) -> float | None:
    """default_ms / the stored pair's ms (1.0 where the default is kept)."""
    stored = outcome.stored_ms
    return None if stored is None or outcome.default_ms is None else outcome.default_ms / stored


def _configs(o: Outcome) -> str:
    parts = [f"{o.timed} timed"]
    if o.reused:
        parts.append(f"{o.reused} resumed")
    if o.failed:
        parts.append(f"{o.failed} failed")
    return ", ".join(parts)


def markdown(report: ShapeReport) -> str:
    """A heading and one Markdown table row per bucket."""
    key = report.key
    lines = [
        f"### {report.name}: {key.get('gpu', '?')}, Triton {key.get('triton_version', '?')}",
        "",
        f"shape `{key.get('shape', '?')}`; table: {report.table or 'not written'}",
        "",
        markdown_row(["bucket", "default ms", "tuned ms", "speed-up", "up", "down", "status", "configs"]),
        "|" + "---|" * 8,
    ]
    for o in report.outcomes:
        gain = speedup(o)
        up = down = "-"
        if o.config is not None:
            up, down = f"`{o.config.up.label()}`", f"`{o.config.down.label()}`"
        status = o.status + (f" ({o.note[:80]})" if o.note and o.status != "tuned" else "")
        cells = [str(o.bucket), _ms(o.default_ms), _ms(o.stored_ms), "-" if gain is None else f"{gain:.2f}x"]
        lines.append(markdown_row([*cells, up, down, status.replace("|", "/"), _configs(o)]))
    lines += ["", "Times: median CUDA-graph replay of one MoE call (both matmuls, routing, combine)."]
    return "\n".join(lines)


def _outcome_json(o: Outcome) -> dict:
    data = dataclasses.asdict(o)
    data["default"] = o.default.label()
    data["best"] = None if o.best is None else {"up": o.best[0].label(), "down": o.best[1].label()}
    data["config"] = None if o.config is None else {"up": o.config.up.label(), "down": o.config.down.label()}
    data["stored_ms"], data["speedup"] = o.stored_ms, speedup(o)
    return data


def to_json(reports: Sequence[ShapeReport]) -> dict:
    return {
        "tool": "bench.tune",
        "shapes": [
            {
                "name": r.name,
                "key": r.key,
                "table": r.table,
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
