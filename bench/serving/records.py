"""A serving-benchmark session as raw data: <out>/session.json and one <out>/runs.jsonl line per run.

    Session     GPU, versions, date, command, settings, modes, repeats, and a ModelInfo per model
    RunRecord   one finished (or skipped) run: status, timings, start-up phases, plugin line

The driver writes session.json before the first run and appends a run's line as soon as it ends, so
a session cut short (a GPU job's time limit) keeps every finished run; `python -m bench.serving
--report-from <out>` rebuilds the reports from them. This module is the only place that reads or
writes these two files.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from bench.serving.logparse import LogMetrics, Phase, PluginStartup, PointResults

STATUSES = ("ok", "failed", "timeout", "skipped")
SESSION_FILE = "session.json"
RUNS_FILE = "runs.jsonl"


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """One benchmarked model: its key, a one-line description, SGLang's tp size, what the folder holds."""

    key: str
    description: str
    tp_size: int = 1
    weights_gb: float | None = None  # estimated per GPU; None for a real checkpoint
    mem_fraction_static: float | None = None
    config: dict | None = None  # the config.json we wrote; None for a real checkpoint


@dataclasses.dataclass(frozen=True)
class Session:
    """Everything about a session but its runs. settings: plain JSON values (batch sizes, lengths, flags)."""

    gpu: str
    versions: dict[str, str]
    date: str
    command: str
    settings: dict
    modes: tuple[str, ...]
    repeats: int
    models: tuple[ModelInfo, ...]

    def model(self, key: str) -> ModelInfo:
        for info in self.models:
            if info.key == key:
                return info
        raise KeyError(f"no model {key!r} in the session; models: {[m.key for m in self.models]}")


def save_session(folder: Path, session: Session) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / SESSION_FILE
    data = dataclasses.asdict(session)
    path.write_text(json.dumps(data, indent=1) + "\n")
    return path


def load_session(folder: Path) -> Session:
    """Read <folder>/session.json; ValueError names a missing key."""
    path = Path(folder) / SESSION_FILE
    data = json.loads(path.read_text())
    try:
        models = tuple(ModelInfo(**m) for m in data.pop("models"))
        return Session(**{**data, "modes": tuple(data["modes"]), "models": models})
    except (KeyError, TypeError) as err:
        raise ValueError(f"{path}: not a serving session ({err})") from None


@dataclasses.dataclass(frozen=True)
class RunRecord:
    """One process of one model in one mode.

    repeat: 1..repeats, or 0 for a priming measure run that only provides a plan (not aggregated).
    status: ok (exit 0 and results read), failed, timeout, skipped (never started; `note` says why).
    decode_ms: median decode step per batch size; prefill_ms: each prefill repeat's latency per token count.
    """

    model: str
    mode: str
    repeat: int
    status: str
    wall_s: float = 0.0
    returncode: int | None = None
    command: tuple[str, ...] = ()
    env: dict[str, str] = dataclasses.field(default_factory=dict)
    log: str | None = None
    decode_ms: dict[int, float] = dataclasses.field(default_factory=dict)
    prefill_ms: dict[int, tuple[float, ...]] = dataclasses.field(default_factory=dict)
    metrics: LogMetrics = dataclasses.field(default_factory=LogMetrics)
    note: str | None = None

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"RunRecord.status must be one of {STATUSES}, got {self.status!r}")
        if not isinstance(self.repeat, int) or self.repeat < 0:
            raise ValueError(f"RunRecord.repeat must be an int >= 0, got {self.repeat!r}")

    @property
    def counted(self) -> bool:
        """Whether aggregation uses this run: it finished and is not a priming run."""
        return self.status == "ok" and self.repeat > 0

    def with_results(self, results: PointResults) -> RunRecord:
        return dataclasses.replace(self, decode_ms=results.decode_ms, prefill_ms=results.prefill_ms)


def _phase_json(phase: Phase | None) -> dict | None:
    return None if phase is None else dataclasses.asdict(phase)


def to_json(record: RunRecord) -> dict:
    m = record.metrics
    return {
        "model": record.model,
        "mode": record.mode,
        "repeat": record.repeat,
        "status": record.status,
        "wall_s": record.wall_s,
        "returncode": record.returncode,
        "command": list(record.command),
        "env": dict(record.env),
        "log": record.log,
        "decode_ms": {str(k): v for k, v in record.decode_ms.items()},
        "prefill_ms": {str(k): list(v) for k, v in record.prefill_ms.items()},
        "weight_load": _phase_json(m.weight_load),
        "prefill_capture": _phase_json(m.prefill_capture),
        "decode_capture": _phase_json(m.decode_capture),
        "plugin": None if m.plugin is None else dataclasses.asdict(m.plugin),
        "max_total_num_tokens": m.max_total_num_tokens,
        "error": m.error,
        "kernel_rule": m.kernel_rule,
        "note": record.note,
    }


def _phase(data: dict | None) -> Phase | None:
    return None if data is None else Phase(float(data["elapsed_s"]), float(data["mem_gb"]))


def from_json(data: dict) -> RunRecord:
    """Inverse of `to_json`; ValueError names a missing key."""
    try:
        plugin = data["plugin"]
        metrics = LogMetrics(
            weight_load=_phase(data["weight_load"]),
            prefill_capture=_phase(data["prefill_capture"]),
            decode_capture=_phase(data["decode_capture"]),
            plugin=None if plugin is None else PluginStartup(plugin["measure_s"], plugin["sizes"], plugin["source"]),
            max_total_num_tokens=data["max_total_num_tokens"],
            error=data["error"],
            kernel_rule=data.get("kernel_rule"),  # absent from records written before it was kept
        )
        return RunRecord(
            model=data["model"],
            mode=data["mode"],
            repeat=data["repeat"],
            status=data["status"],
            wall_s=data["wall_s"],
            returncode=data["returncode"],
            command=tuple(data["command"]),
            env=dict(data["env"]),
            log=data["log"],
            decode_ms={int(k): float(v) for k, v in data["decode_ms"].items()},
            prefill_ms={int(k): tuple(float(x) for x in v) for k, v in data["prefill_ms"].items()},
            metrics=metrics,
            note=data["note"],
        )
    except KeyError as err:
        raise ValueError(f"run record is missing key {err.args[0]!r}") from None


def append(path: Path, record: RunRecord) -> None:
    """Add `record` as one line of `path` (created with its folder)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(to_json(record)) + "\n")


def load(path: Path) -> list[RunRecord]:
    """Every record in a runs.jsonl file; ValueError with the line number on a bad line."""
    records = []
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        if line.strip():
            try:
                records.append(from_json(json.loads(line)))
            except (json.JSONDecodeError, ValueError, TypeError) as err:
                raise ValueError(f"{path}:{number}: {err}") from None
    return records
