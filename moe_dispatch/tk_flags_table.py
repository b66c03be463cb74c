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
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from moe_dispatch.backends.tk_matmul_flags import MatmulFlags, gemm_keys
from moe_dispatch.spec import MoESpec
from moe_dispatch.table_files import (
    TunedConfigError,
    TunedKey,
    check_envelope,
    check_key,
    checked_table,
    error_reason,
    is_int,
    parse_buckets,
    read_table_file,
    table_json,
    write_json_atomic,
)
from moe_dispatch.tuned_configs import find_table, table_path

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
        object.__setattr__(self, "buckets", checked_table(self, TkBucket))

    def flags_for(self, num_tokens: int) -> TkBucket | None:
        """The nearest bucket (in log2 distance; ties to the larger) within 2x of `num_tokens`, else None."""
        if not is_int(num_tokens) or num_tokens < 0:
            raise ValueError(f"num_tokens must be an int >= 0, got {num_tokens!r}")
        t = max(num_tokens, 1)
        nearest = min(self.buckets, key=lambda b: (abs(math.log2(b / t)), -b))
        if max(nearest / t, t / nearest) > MAX_BUCKET_RATIO:
            return None
        return self.buckets[nearest]

    def to_json(self) -> dict:
        def flags(f: MatmulFlags | None) -> str | None:
            return None if f is None else f.label()

        return table_json(
            self,
            FORMAT,
            SCHEMA,
            {
                b: {"up": flags(e.up), "down": flags(e.down), "default_us": e.default_us, "tuned_us": e.tuned_us}
                for b, e in self.buckets.items()
            },
        )

    @staticmethod
    def from_json(data: object, source: str = "<memory>") -> TkFlagsTable:
        """Check format, schema and checksum, then build; TunedConfigError naming `source`."""
        check_envelope(data, source, FORMAT, SCHEMA, "triton_kernels flags file")

        def flags(label: object) -> MatmulFlags | None:
            return None if label is None else MatmulFlags.from_label(label)

        def entry(bucket: dict) -> TkBucket:
            times = {f: bucket.get(f) for f in ("default_us", "tuned_us")}
            return TkBucket(flags(bucket["up"]), flags(bucket["down"]), **times)

        try:
            buckets = parse_buckets(data, entry)
            return TkFlagsTable(TunedKey(**data["key"]), buckets, data["created"], data["tool"], data["notes"])
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise TunedConfigError(f"{source} holds invalid flags: {error_reason(error)}") from None


def tk_table_path(key: TunedKey, directory: str | os.PathLike) -> Path:
    tile_path = table_path(key, directory)
    return tile_path.parent / SUBDIR / tile_path.name


def save_tk_table(table: TkFlagsTable, directory: str | os.PathLike) -> Path:
    return write_json_atomic(tk_table_path(table.key, directory), table.to_json())


def load_tk_table(path: str | os.PathLike, expect: TunedKey | None = None) -> TkFlagsTable:
    """The table in `path`; TunedConfigError when unreadable, foreign, tampered, invalid or stale."""
    source = f"triton_kernels flags {path}"
    table = TkFlagsTable.from_json(read_table_file(path, "triton_kernels flags"), source=source)
    check_key(table.key, expect, source, "python -m bench.tk_flags_probe")
    return table


def find_tk_table(
    spec: MoESpec, directories: Sequence[str | os.PathLike] | None = None, key: TunedKey | None = None
) -> TkFlagsTable | None:
    """The first table for `key` (default: this GPU and Triton) in `directories` (default: tuned_directories())."""
    return find_table(spec, directories, key, path_for=tk_table_path, load=load_tk_table)
