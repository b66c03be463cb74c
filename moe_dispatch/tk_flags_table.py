"""Tuned triton_kernels opt flags per batch bucket: what backend `triton_kernels_tuned` reads.

A `TkFlagsTable` holds, per bucket, the flags of the up and the down matmul
(`moe_dispatch.backends.tk_matmul_flags.MatmulFlags`; None: triton_kernels' own flags were
fastest there) with the times measured side by side. `python -m bench.tk_flags_probe
--tables DIR` writes them, keyed like the Triton tile tables (GPU name, Triton version,
shape; see moe_dispatch.tuned_configs) and laid out next to them:

    <directory>/<gpu-slug>/triton_<version>/triton_kernels/<shape>.json

with a format name, a schema version and a sha256 over the content; a file for another key,
edited by hand or damaged raises `TunedConfigError` naming it.

`flags_for(T)` uses the nearest bucket within a factor of 2 (triton_kernels' own block_m
follows T, so flags tuned for 128 tokens are not carried to 1024); farther from every bucket
it returns None (triton_kernels' own flags).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

from moe_dispatch.backends.tk_matmul_flags import MatmulFlags, gemm_keys
from moe_dispatch.spec import MoESpec
from moe_dispatch.tuned_configs import (
    TunedConfigError,
    TunedKey,
    content_sha256,
    current_key,
    table_path,
    tuned_directories,
    write_json_atomic,
)

FORMAT = "moe-dispatch-tk-flags"
SCHEMA = 1
MAX_BUCKET_RATIO = 2.0
SUBDIR = "triton_kernels"


@dataclasses.dataclass(frozen=True)
class TkBucket:
    """One bucket's flags (None: triton_kernels' own) and the side-by-side medians, us."""

    up: MatmulFlags | None
    down: MatmulFlags | None
    default_us: float | None = None
    tuned_us: float | None = None

    def __post_init__(self) -> None:
        for name in ("up", "down"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, MatmulFlags):
                raise TypeError(f"TkBucket.{name} must be MatmulFlags or None, got {type(value).__name__}")
        for name in ("default_us", "tuned_us"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0):
                raise ValueError(f"TkBucket.{name} must be a positive time in us or None, got {value!r}")

    def by_gemm(self, hidden_size: int, intermediate_size: int) -> dict[tuple[int, int], MatmulFlags]:
        """{(N, K): flags} for scoped_matmul_flags (the matmuls left to triton_kernels omitted)."""
        keys = gemm_keys(hidden_size, intermediate_size)
        return {keys[p]: getattr(self, p) for p in ("up", "down") if getattr(self, p) is not None}

    def label(self) -> str:
        own = "own"
        return f"up={self.up.label() if self.up else own} down={self.down.label() if self.down else own}"


@dataclasses.dataclass(frozen=True)
class TkFlagsTable:
    key: TunedKey
    buckets: Mapping[int, TkBucket]
    created: str
    tool: str = "bench.tk_flags_probe"
    notes: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.key, TunedKey):
            raise TypeError(f"TkFlagsTable.key must be a TunedKey, got {type(self.key).__name__}")
        if not isinstance(self.buckets, Mapping) or not self.buckets:
            raise ValueError("TkFlagsTable.buckets must be a non-empty mapping of bucket -> TkBucket")
        for bucket, entry in self.buckets.items():
            if isinstance(bucket, bool) or not isinstance(bucket, int) or bucket <= 0:
                raise ValueError(f"bucket {bucket!r} must be a positive int (tokens)")
            if not isinstance(entry, TkBucket):
                raise TypeError(f"bucket {bucket}: expected a TkBucket, got {type(entry).__name__}")
        object.__setattr__(self, "buckets", dict(sorted(self.buckets.items())))

    def flags_for(self, num_tokens: int) -> TkBucket | None:
        """The nearest bucket (in log2 distance; ties to the larger) within 2x of `num_tokens`, else None."""
        if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or num_tokens < 0:
            raise ValueError(f"num_tokens must be an int >= 0, got {num_tokens!r}")
        t = max(num_tokens, 1)
        nearest = min(self.buckets, key=lambda b: (abs(math.log2(b / t)), -b))
        if max(nearest / t, t / nearest) > MAX_BUCKET_RATIO:
            return None
        return self.buckets[nearest]

    def to_json(self) -> dict:
        def flags(f: MatmulFlags | None) -> str | None:
            return None if f is None else f.label()

        data = {
            "format": FORMAT,
            "schema": SCHEMA,
            "key": dataclasses.asdict(self.key),
            "created": self.created,
            "tool": self.tool,
            "notes": self.notes,
            "buckets": {
                str(b): {"up": flags(e.up), "down": flags(e.down), "default_us": e.default_us, "tuned_us": e.tuned_us}
                for b, e in self.buckets.items()
            },
        }
        data["sha256"] = content_sha256(data)
        return data

    @staticmethod
    def from_json(data: object, source: str = "<memory>") -> TkFlagsTable:
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            found = data.get("format") if isinstance(data, dict) else type(data).__name__
            raise TunedConfigError(f"{source} is not a moe-dispatch triton_kernels flags file (format={found!r})")
        if data.get("schema") != SCHEMA:
            raise TunedConfigError(f"{source} has schema {data.get('schema')!r}, this moe-dispatch reads {SCHEMA}")
        try:
            stored, actual = data.get("sha256"), content_sha256(data)
        except ValueError as error:
            raise TunedConfigError(f"{source} is not plain JSON: {error}") from None
        if stored != actual:
            raise TunedConfigError(
                f"{source} fails its checksum (stored {stored!r}, content {actual!r}): edited or damaged; re-tune"
            )

        def flags(label: object) -> MatmulFlags | None:
            return None if label is None else MatmulFlags.from_label(label)

        try:
            buckets = {}
            for name, entry in data["buckets"].items():
                if not re.fullmatch(r"[1-9][0-9]*", name):
                    raise ValueError(f"bucket {name!r} is not a positive int")
                times = {f: entry.get(f) for f in ("default_us", "tuned_us")}
                buckets[int(name)] = TkBucket(flags(entry["up"]), flags(entry["down"]), **times)
            return TkFlagsTable(TunedKey(**data["key"]), buckets, data["created"], data["tool"], data["notes"])
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            why = f"missing field {error}" if isinstance(error, KeyError) else str(error)
            raise TunedConfigError(f"{source} holds invalid flags: {why}") from None


def tk_table_path(key: TunedKey, directory: str | os.PathLike) -> Path:
    tile_path = table_path(key, directory)
    return tile_path.parent / SUBDIR / tile_path.name


def save_tk_table(table: TkFlagsTable, directory: str | os.PathLike) -> Path:
    return write_json_atomic(tk_table_path(table.key, directory), table.to_json())


def load_tk_table(path: str | os.PathLike, expect: TunedKey | None = None) -> TkFlagsTable:
    """The table in `path`; TunedConfigError when unreadable, foreign, tampered, invalid or stale."""
    source = f"triton_kernels flags {path}"
    try:
        data = json.loads(Path(path).read_text())
    except OSError as error:
        raise TunedConfigError(f"cannot read {source}: {error}") from None
    except json.JSONDecodeError as error:
        raise TunedConfigError(f"{source} is not valid JSON: {error}") from None
    table = TkFlagsTable.from_json(data, source=source)
    if expect is not None and (problems := table.key.mismatches(expect)):
        stale = "; ".join(problems)
        raise TunedConfigError(f"{source} is stale ({stale}); re-tune with python -m bench.tk_flags_probe")
    return table


def find_tk_table(
    spec: MoESpec, directories: Sequence[str | os.PathLike] | None = None, key: TunedKey | None = None
) -> TkFlagsTable | None:
    """The first table for `key` (default: this GPU and Triton) in `directories` (default: tuned_directories())."""
    key = key or current_key(spec)
    for directory in tuned_directories() if directories is None else directories:
        path = tk_table_path(key, directory)
        if path.exists():
            return load_tk_table(path, expect=key)
    return None
