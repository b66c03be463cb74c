"""Bench results as data: the typed records one run produces, and their JSON file format.

    BenchRun            one run on one GPU: versions, measured ceilings, seeds, date, command
      ShardResult       one MoE spec on one tensor-parallel rank (tp)
        BatchResult     one batch size and routing: each kernel's Timing, the adaptive
                        module's and the old 1536-token rule's, the roofline Floor, errors
          Timing        median / p20 / p80 of replay times, in ms

File layout (`save`): <directory>/<gpu slug>/<date slug>.json plus a copy as latest.json.
The JSON carries {"format": "moe-dispatch-bench", "version": FORMAT_VERSION, ...};
`load` refuses another version or a missing key with a ValueError that names it.
This module is the only place that reads or writes that JSON.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import re
import sys
from pathlib import Path

from bench.roofline import Ceilings, Floor
from graphs.timing import ReplayStats
from moe_dispatch.spec import MoESpec

FORMAT = "moe-dispatch-bench"
FORMAT_VERSION = 1
ROUTINGS: tuple[str, ...] = ("uniform", "skewed")


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_int(name: str, value: object, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def _check_str_dict(name: str, value: object, value_type: type) -> None:
    if not isinstance(value, dict):
        raise ValueError(f"{name} must be a dict, got {type(value).__name__}")
    for key, item in value.items():
        if not isinstance(key, str) or not isinstance(item, value_type) or isinstance(item, bool):
            raise ValueError(f"{name}[{key!r}] must map str to {value_type.__name__}, got {item!r}")


@dataclasses.dataclass(frozen=True)
class Timing:
    """Replay time of one callable at one batch: median and 20th/80th percentiles, in ms."""

    median_ms: float
    p20_ms: float
    p80_ms: float

    def __post_init__(self) -> None:
        for field in ("median_ms", "p20_ms", "p80_ms"):
            value = getattr(self, field)
            if not _is_number(value) or not 0 < value < math.inf:
                raise ValueError(f"Timing.{field} must be a finite positive number, got {value!r}")
        if not self.p20_ms <= self.median_ms <= self.p80_ms:
            raise ValueError(
                f"Timing needs p20 <= median <= p80, got p20={self.p20_ms} median={self.median_ms} p80={self.p80_ms}"
            )

    @staticmethod
    def from_stats(stats: ReplayStats) -> Timing:
        """From the graphs package's replay statistics."""
        return Timing(median_ms=stats.median_ms, p20_ms=stats.p20_ms, p80_ms=stats.p80_ms)

    @property
    def seconds(self) -> float:
        return self.median_ms * 1e-3


@dataclasses.dataclass(frozen=True)
class BatchResult:
    """One batch size under one routing.

    kernels: graph-replay Timing per kernel name; eager: eager Timing per kernel (may be
    empty); adaptive / static_rule: the adaptive module's and the old rule's ("triton
    below 1536 tokens, else triton_kernels") replay time with the kernel each ran, or
    None when not measured; errors: kernel -> why it was not timed (a kernel is in
    `kernels` or in `errors`, never both).
    """

    num_tokens: int
    routing: str
    touched_experts: int
    kernels: dict[str, Timing]
    eager: dict[str, Timing]
    adaptive: Timing | None
    adaptive_kernel: str | None
    static_rule: Timing | None
    static_rule_kernel: str | None
    floor: Floor
    errors: dict[str, str] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_int("BatchResult.num_tokens", self.num_tokens, 0)
        _check_int("BatchResult.touched_experts", self.touched_experts, 0)
        if self.routing not in ROUTINGS:
            raise ValueError(f"BatchResult.routing must be one of {ROUTINGS}, got {self.routing!r}")
        _check_str_dict("BatchResult.kernels", self.kernels, Timing)
        _check_str_dict("BatchResult.eager", self.eager, Timing)
        _check_str_dict("BatchResult.errors", self.errors, str)
        for name in ("adaptive", "static_rule"):
            timing, kernel = getattr(self, name), getattr(self, f"{name}_kernel")
            if (timing is None) != (kernel is None):
                raise ValueError(
                    f"BatchResult.{name} and {name}_kernel must both be set or both None, got {timing!r} and {kernel!r}"
                )
            if timing is not None and not isinstance(timing, Timing):
                raise ValueError(f"BatchResult.{name} must be a Timing, got {type(timing).__name__}")
            if kernel is not None and not isinstance(kernel, str):
                raise ValueError(f"BatchResult.{name}_kernel must be a str, got {kernel!r}")
        if not isinstance(self.floor, Floor):
            raise ValueError(f"BatchResult.floor must be a Floor, got {type(self.floor).__name__}")
        both = sorted(set(self.kernels) & set(self.errors))
        if both:
            raise ValueError(f"kernels {both} at T={self.num_tokens} {self.routing} are both timed and in errors")

    def _ranked(self) -> list[tuple[str, Timing]]:
        # Name breaks ties so the winner does not depend on dict order.
        return sorted(self.kernels.items(), key=lambda item: (item[1].median_ms, item[0]))

    @property
    def winner(self) -> str | None:
        """The kernel with the lowest graph-replay median, or None when none was timed."""
        ranked = self._ranked()
        return ranked[0][0] if ranked else None

    @property
    def margin(self) -> float | None:
        """Runner-up median over winner median (>= 1), or None with fewer than two kernels."""
        ranked = self._ranked()
        if len(ranked) < 2:
            return None
        return ranked[1][1].median_ms / ranked[0][1].median_ms

    @property
    def regret(self) -> float | None:
        """How much slower the adaptive module's choice is than the best kernel, both re-timed side by
        side here (0.0: it chose the best); None without a choice or without its kernel's timing."""
        winner = self.winner
        if self.adaptive_kernel is None or winner is None or self.adaptive_kernel not in self.kernels:
            return None
        return self.kernels[self.adaptive_kernel].median_ms / self.kernels[winner].median_ms - 1.0

    def ratio_to_floor(self, t: Timing) -> float:
        """t's median over this batch's roofline floor (>= 1 unless the ceilings were underestimated)."""
        if self.floor.seconds <= 0:
            raise ValueError(f"floor of T={self.num_tokens} {self.routing} is zero; no ratio to it")
        return t.seconds / self.floor.seconds


def _spec_from_json(spec_json: object) -> MoESpec:
    if not isinstance(spec_json, dict):
        raise ValueError(f"ShardResult.spec_json must be a dict, got {type(spec_json).__name__}")
    try:
        return MoESpec.from_json(spec_json)
    except KeyError as err:
        raise ValueError(f"spec_json is missing key {err.args[0]!r}: {spec_json}") from None
    except TypeError as err:
        raise ValueError(f"spec_json is malformed ({err}): {spec_json}") from None


@dataclasses.dataclass(frozen=True)
class ShardResult:
    """Every batch of one spec on one tensor-parallel rank; spec_json is `MoESpec.to_json()`."""

    spec_json: dict
    tp: int
    batches: tuple[BatchResult, ...]

    def __post_init__(self) -> None:
        _check_int("ShardResult.tp", self.tp, 1)
        object.__setattr__(self, "batches", tuple(self.batches))
        for batch in self.batches:
            if not isinstance(batch, BatchResult):
                raise ValueError(f"ShardResult.batches must hold BatchResult, got {type(batch).__name__}")
        _spec_from_json(self.spec_json)  # fail at construction, not at first use

    @property
    def spec(self) -> MoESpec:
        return _spec_from_json(self.spec_json)

    @property
    def kernel_names(self) -> tuple[str, ...]:
        """Every kernel timed or failed in any batch, in first-seen order."""
        names: dict[str, None] = {}
        for batch in self.batches:
            names.update(dict.fromkeys(batch.kernels))
            names.update(dict.fromkeys(batch.errors))
        return tuple(names)


@dataclasses.dataclass(frozen=True)
class BenchRun:
    """One bench run on one GPU. `date` is ISO 8601; `command` is the command line that ran it."""

    gpu: str
    sm_count: int
    versions: dict[str, str]
    ceilings: Ceilings
    seeds: dict[str, int]
    date: str
    command: str
    shards: tuple[ShardResult, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.gpu, str) or not slug(self.gpu):
            raise ValueError(f"BenchRun.gpu must be a name with letters or digits, got {self.gpu!r}")
        _check_int("BenchRun.sm_count", self.sm_count, 1)
        _check_str_dict("BenchRun.versions", self.versions, str)
        _check_str_dict("BenchRun.seeds", self.seeds, int)
        if not isinstance(self.ceilings, Ceilings):
            raise ValueError(f"BenchRun.ceilings must be a Ceilings, got {type(self.ceilings).__name__}")
        try:
            datetime.datetime.fromisoformat(self.date)
        except (TypeError, ValueError):
            raise ValueError(f"BenchRun.date must be an ISO 8601 date, got {self.date!r}") from None
        if not isinstance(self.command, str):
            raise ValueError(f"BenchRun.command must be a str, got {self.command!r}")
        object.__setattr__(self, "shards", tuple(self.shards))
        for shard in self.shards:
            if not isinstance(shard, ShardResult):
                raise ValueError(f"BenchRun.shards must hold ShardResult, got {type(shard).__name__}")


# ---- JSON ----


def slug(text: str) -> str:
    """A file-name form of `text`: "NVIDIA H200" -> "nvidia-h200"."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def versions() -> dict[str, str]:
    """Versions of the stack a result was measured with (imports torch and triton, never initializes CUDA)."""
    import torch
    import triton

    from moe_dispatch.backends.sglang_env import sglang_version
    from moe_dispatch.backends.triton_kernels_backend import triton_kernels_generation

    return {
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": str(torch.version.cuda),
        "sglang": str(sglang_version()),
        "triton_kernels": str(triton_kernels_generation()),
        "python": sys.version.split()[0],
    }


def now_iso() -> str:
    """Now, in UTC, as ISO 8601 to the second: when a result or table was made."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def run_meta(tool: str, argv: list[str] | None) -> dict[str, object]:
    """A probe's run header: GPU name, versions, date and the command line (`argv`: its arguments,
    None for sys.argv's). Imports torch, asks CUDA for the device name."""
    import torch

    args = sys.argv[1:] if argv is None else argv
    return {
        "gpu": torch.cuda.get_device_name(),
        "versions": versions(),
        "date": now_iso(),
        "command": f"python -m {tool} " + " ".join(args),
    }


def _timing_json(t: Timing | None) -> dict | None:
    return None if t is None else dataclasses.asdict(t)


def to_json(run: BenchRun) -> dict:
    """The JSON form of `run` (what `save` writes)."""
    return {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "gpu": run.gpu,
        "sm_count": run.sm_count,
        "versions": dict(run.versions),
        "ceilings": dataclasses.asdict(run.ceilings),
        "seeds": dict(run.seeds),
        "date": run.date,
        "command": run.command,
        "shards": [
            {
                "spec": shard.spec_json,
                "tp": shard.tp,
                "batches": [
                    {
                        "num_tokens": b.num_tokens,
                        "routing": b.routing,
                        "touched_experts": b.touched_experts,
                        "kernels": {k: _timing_json(t) for k, t in b.kernels.items()},
                        "eager": {k: _timing_json(t) for k, t in b.eager.items()},
                        "adaptive": _timing_json(b.adaptive),
                        "adaptive_kernel": b.adaptive_kernel,
                        "static_rule": _timing_json(b.static_rule),
                        "static_rule_kernel": b.static_rule_kernel,
                        "floor": dataclasses.asdict(b.floor),
                        "errors": dict(b.errors),
                    }
                    for b in shard.batches
                ],
            }
            for shard in run.shards
        ],
    }


def _get(data: object, key: str, where: str) -> object:
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(data).__name__}")
    if key not in data:
        raise ValueError(f"{where}: missing key {key!r}")
    return data[key]


def _list(data: object, key: str, where: str) -> list:
    value = _get(data, key, where)
    if not isinstance(value, list):
        raise ValueError(f"{where}.{key}: expected a JSON list, got {type(value).__name__}")
    return value


def _timing(data: object, where: str) -> Timing | None:
    if data is None:
        return None
    return Timing(**{f: _get(data, f, where) for f in ("median_ms", "p20_ms", "p80_ms")})


def _timings(data: object, where: str) -> dict[str, Timing]:
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(data).__name__}")
    out: dict[str, Timing] = {}
    for name, t in data.items():
        timing = _timing(t, f"{where}.{name}")
        if timing is None:
            raise ValueError(f"{where}.{name}: expected a timing, got null")
        out[name] = timing
    return out


def _batch(data: object, where: str) -> BatchResult:
    floor_json = _get(data, "floor", where)
    return BatchResult(
        num_tokens=_get(data, "num_tokens", where),
        routing=_get(data, "routing", where),
        touched_experts=_get(data, "touched_experts", where),
        kernels=_timings(_get(data, "kernels", where), f"{where}.kernels"),
        eager=_timings(_get(data, "eager", where), f"{where}.eager"),
        adaptive=_timing(_get(data, "adaptive", where), f"{where}.adaptive"),
        adaptive_kernel=_get(data, "adaptive_kernel", where),
        static_rule=_timing(_get(data, "static_rule", where), f"{where}.static_rule"),
        static_rule_kernel=_get(data, "static_rule_kernel", where),
        floor=Floor(**{f.name: _get(floor_json, f.name, f"{where}.floor") for f in dataclasses.fields(Floor)}),
        errors=_get(data, "errors", where),
    )


def from_json(data: object) -> BenchRun:
    """Parse what `to_json` wrote; ValueError names the first wrong version, missing key or bad value."""
    fmt, version = _get(data, "format", "run"), _get(data, "version", "run")
    if fmt != FORMAT:
        raise ValueError(f"not a bench result: format is {fmt!r}, expected {FORMAT!r}")
    if version != FORMAT_VERSION:
        raise ValueError(f"bench result format version {version!r} is not supported; expected {FORMAT_VERSION}")
    ceilings_json = _get(data, "ceilings", "run")
    shards = []
    for i, shard in enumerate(_list(data, "shards", "run")):
        where = f"shards[{i}]"
        batches = tuple(_batch(b, f"{where}.batches[{j}]") for j, b in enumerate(_list(shard, "batches", where)))
        shards.append(ShardResult(spec_json=_get(shard, "spec", where), tp=_get(shard, "tp", where), batches=batches))
    return BenchRun(
        gpu=_get(data, "gpu", "run"),
        sm_count=_get(data, "sm_count", "run"),
        versions=_get(data, "versions", "run"),
        ceilings=Ceilings(**{f.name: _get(ceilings_json, f.name, "ceilings") for f in dataclasses.fields(Ceilings)}),
        seeds=_get(data, "seeds", "run"),
        date=_get(data, "date", "run"),
        command=_get(data, "command", "run"),
        shards=tuple(shards),
    )


def save(run: BenchRun, directory: Path | str) -> Path:
    """Write `run` to <directory>/<gpu slug>/<date slug>.json and latest.json beside it; return the first."""
    folder = Path(directory) / slug(run.gpu)
    folder.mkdir(parents=True, exist_ok=True)
    text = json.dumps(to_json(run), indent=2) + "\n"
    dated = folder / f"{slug(run.date)}.json"
    for path in (dated, folder / "latest.json"):
        # Write then rename, so a reader never sees half a file.
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(text)
        tmp.replace(path)
    return dated


def load(path: Path | str) -> BenchRun:
    """Read a file written by `save`; ValueError (with the path) when it is not this format or version."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    try:
        return from_json(data)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path}: {err}") from None
