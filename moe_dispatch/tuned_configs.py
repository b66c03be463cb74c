"""Tuned tile configs for SGLang's Triton fused_moe, per GPU, Triton version and MoE shape.

A `TunedTable` holds, per batch bucket, one `BucketConfig`: the tile config of the up
(gate/up) matmul and of the down matmul, with the times the tuner measured. Tables are
written by `python -m bench.tune` as JSON files laid out as

    <directory>/<gpu-slug>/triton_<version>/<shape>.json

with a schema version, the key they were tuned for and a sha256 over the content. A
file is used only when its key equals this process's (GPU name, Triton version, shape);
otherwise `load_table` raises `TunedConfigError` naming the file and what is wrong.

`moe_dispatch.backends.sglang_tile_override.sglang_tile_configs(bucket)` makes SGLang's
fused_moe use one bucket's configs for the duration of a call.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from moe_dispatch.spec import MoESpec
from moe_dispatch.table_files import (
    TunedConfigError,
    TunedKey,
    check_envelope,
    check_key,
    checked_table,
    error_reason,
    is_int,
    is_power_of_two,
    parse_buckets,
    read_table_file,
    table_json,
    write_json_atomic,
)

FORMAT = "moe-dispatch-tuned-configs"
SCHEMA = 1
TUNED_DIR_ENV = "MOE_DISPATCH_TUNED_DIR"

# TileConfig field -> SGLang config key.
_SGLANG_KEYS: dict[str, str] = {
    "block_m": "BLOCK_SIZE_M",
    "block_n": "BLOCK_SIZE_N",
    "block_k": "BLOCK_SIZE_K",
    "group_m": "GROUP_SIZE_M",
    "num_warps": "num_warps",
    "num_stages": "num_stages",
}
# Triton's launch defaults on NVIDIA, which SGLang's built-in default configs rely on.
_TRITON_DEFAULTS = {"num_warps": 4, "num_stages": 3}
_DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


@dataclasses.dataclass(frozen=True)
class TileConfig:
    """One Triton fused_moe launch config (one matmul)."""

    block_m: int
    block_n: int
    block_k: int
    group_m: int
    num_warps: int
    num_stages: int

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            if not is_int(getattr(self, field.name)):
                raise ValueError(f"TileConfig.{field.name} must be an int, got {getattr(self, field.name)!r}")
        for field in ("block_m", "block_n", "block_k"):
            value = getattr(self, field)
            if value < 16 or not is_power_of_two(value):  # tl.dot needs >= 16 per dimension
                raise ValueError(f"TileConfig.{field}={value} must be a power of 2 and >= 16")
        if self.group_m < 1:
            raise ValueError(f"TileConfig.group_m={self.group_m} must be >= 1")
        if not is_power_of_two(self.num_warps) or self.num_warps > 32:
            raise ValueError(f"TileConfig.num_warps={self.num_warps} must be a power of 2 up to 32")
        if self.num_stages < 1:
            raise ValueError(f"TileConfig.num_stages={self.num_stages} must be >= 1")

    def to_sglang(self) -> dict[str, int]:
        """A fresh dict with SGLang's keys (fresh: SGLang pops keys from the down config)."""
        return {key: getattr(self, field) for field, key in _SGLANG_KEYS.items()}

    @staticmethod
    def from_sglang(config: Mapping[str, Any]) -> TileConfig:
        """From SGLang's keys; num_warps/num_stages default to Triton's (4, 3) when absent."""
        unknown = set(config) - set(_SGLANG_KEYS.values())
        if unknown:
            raise ValueError(f"unknown tile config key(s) {sorted(unknown)}; expected {list(_SGLANG_KEYS.values())}")
        missing = [key for field, key in _SGLANG_KEYS.items() if key not in config and field not in _TRITON_DEFAULTS]
        if missing:
            raise ValueError(f"tile config lacks {missing}")
        return TileConfig(
            **{field: config.get(key, _TRITON_DEFAULTS.get(field)) for field, key in _SGLANG_KEYS.items()}
        )

    def label(self) -> str:
        return f"m{self.block_m}n{self.block_n}k{self.block_k}g{self.group_m}w{self.num_warps}s{self.num_stages}"


@dataclasses.dataclass(frozen=True)
class BucketConfig:
    """The configs of both matmuls at one bucket, and what the tuner measured there.

    Times are medians of graph replays of the whole MoE call, in ms (None: not measured):
    up_ms after tuning the up matmul, down_ms with the tuned up and down pair stored
    here, default_ms with SGLang's own config choice.
    """

    up: TileConfig
    down: TileConfig
    up_ms: float | None = None
    down_ms: float | None = None
    default_ms: float | None = None

    def __post_init__(self) -> None:
        for field in ("up", "down"):
            if not isinstance(getattr(self, field), TileConfig):
                raise TypeError(f"BucketConfig.{field} must be a TileConfig, got {type(getattr(self, field)).__name__}")
        # Both matmuls read one moe_align_block_size sort, made with the up config's BLOCK_SIZE_M.
        if self.down.block_m != self.up.block_m:
            raise ValueError(f"down block_m={self.down.block_m} must equal up block_m={self.up.block_m}")
        for field in ("up_ms", "down_ms", "default_ms"):
            value = getattr(self, field)
            ok = value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))
            if not ok or (value is not None and not (math.isfinite(value) and value > 0)):
                raise ValueError(f"BucketConfig.{field} must be None or a positive finite time in ms, got {value!r}")

    def label(self) -> str:
        return f"up={self.up.label()} down={self.down.label()}"


def shape_key(spec: MoESpec) -> str:
    """What changes the kernels' best tiles, e.g. 'E=128,H=2880,I=360,k=4,bf16,swiglu,bias'."""
    return (
        f"E={spec.num_experts},H={spec.hidden_size},I={spec.intermediate_size},k={spec.top_k},"
        f"{_DTYPES[spec.dtype]},{spec.activation.kind},{'bias' if spec.bias else 'nobias'}"
    )


def current_key(spec: MoESpec) -> TunedKey:
    """This process's key for `spec` (the current CUDA device); RuntimeError without CUDA."""
    import triton

    if not torch.cuda.is_available():
        raise RuntimeError("tuned configs are per GPU and no CUDA GPU is visible (torch.cuda.is_available() is False)")
    return TunedKey(gpu=torch.cuda.get_device_name(), triton_version=triton.__version__, shape=shape_key(spec))


@dataclasses.dataclass(frozen=True)
class TunedTable:
    """Bucket (tokens) -> BucketConfig for one key. `created`: when tuned (ISO 8601)."""

    key: TunedKey
    buckets: Mapping[int, BucketConfig]
    created: str
    tool: str = "bench.tune"
    notes: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "buckets", checked_table(self, BucketConfig))  # a copy, ascending

    def config_for(self, num_tokens: int) -> BucketConfig:
        """The nearest bucket's config (by |bucket - num_tokens|, as SGLang's own lookup).

        Ties go to the larger bucket (SGLang's min over its file order picks the smaller).
        """
        if not is_int(num_tokens) or num_tokens < 0:
            raise ValueError(f"num_tokens must be an int >= 0, got {num_tokens!r}")
        nearest = min(self.buckets, key=lambda b: (abs(b - num_tokens), -b))
        return self.buckets[nearest]

    def to_json(self) -> dict:
        """The file's content, checksum included."""
        return table_json(
            self,
            FORMAT,
            SCHEMA,
            {
                bucket: {
                    "up": c.up.to_sglang(),
                    "down": c.down.to_sglang(),
                    "up_ms": c.up_ms,
                    "down_ms": c.down_ms,
                    "default_ms": c.default_ms,
                }
                for bucket, c in self.buckets.items()
            },
        )

    @staticmethod
    def from_json(data: object, source: str = "<memory>") -> TunedTable:
        """Check format, schema and checksum, then build; TunedConfigError naming `source`."""
        check_envelope(data, source, FORMAT, SCHEMA, "tuned-config file")

        def entry(bucket: dict) -> BucketConfig:
            up, down = TileConfig.from_sglang(bucket["up"]), TileConfig.from_sglang(bucket["down"])
            return BucketConfig(up, down, **{f: bucket.get(f) for f in ("up_ms", "down_ms", "default_ms")})

        try:
            buckets = parse_buckets(data, entry)
            return TunedTable(TunedKey(**data["key"]), buckets, data["created"], data["tool"], data["notes"])
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise TunedConfigError(f"{source} holds invalid configs: {error_reason(error)}") from None


def _slug(text: str, sep: str) -> str:
    return re.sub(r"[^0-9a-z]+", sep, text.lower()).strip(sep)


def table_path(key: TunedKey, directory: str | os.PathLike) -> Path:
    """<directory>/<gpu-slug>/triton_<version>/<shape>.json, e.g. nvidia-h200/triton_3_5_1/E128_..._bias.json."""
    shape = re.sub(r"[^0-9A-Za-z._-]+", "-", key.shape.replace("=", "").replace(",", "_"))
    return Path(directory) / _slug(key.gpu, "-") / f"triton_{_slug(key.triton_version, '_')}" / f"{shape}.json"


def save_table(table: TunedTable, directory: str | os.PathLike) -> Path:
    """Write `table` under `directory` atomically; returns the path."""
    return write_json_atomic(table_path(table.key, directory), table.to_json())


def load_table(path: str | os.PathLike, expect: TunedKey | None = None) -> TunedTable:
    """The table in `path`; TunedConfigError when unreadable, foreign, tampered, invalid or
    (with `expect`) tuned for another GPU, Triton version or shape."""
    table = TunedTable.from_json(read_table_file(path, "tuned configs"), source=f"tuned configs {path}")
    check_key(table.key, expect, f"tuned configs {path}", "python -m bench.tune")
    return table


def default_tuned_dir() -> Path:
    """The tables shipped with the package."""
    return Path(__file__).resolve().parent / "tuned_data"


def tuned_directories() -> tuple[Path, ...]:
    """Where `find_table` looks, in order: $MOE_DISPATCH_TUNED_DIR (when set), then the shipped dir."""
    env = os.environ.get(TUNED_DIR_ENV)
    return ((Path(env),) if env else ()) + (default_tuned_dir(),)


def find_table(
    spec: MoESpec,
    directories: Sequence[str | os.PathLike] | None = None,
    key: TunedKey | None = None,
    path_for: Callable[[TunedKey, str | os.PathLike], Path] = table_path,
    load: Callable[..., Any] = load_table,
) -> Any:
    """The first table for `key` (default: `current_key(spec)`) in `directories` (default:
    `tuned_directories()`); None when there is none. A present but unusable file raises
    TunedConfigError. `path_for` and `load`: another table kind's (tk_flags_table)."""
    key = key or current_key(spec)
    for directory in tuned_directories() if directories is None else directories:
        path = path_for(key, directory)
        if path.exists():
            return load(path, expect=key)
    return None
