"""What both kinds of tuned table file share (tile configs: moe_dispatch.tuned_configs;
triton_kernels opt flags: moe_dispatch.tk_flags_table): the key, the checks of a table's
fields, the file envelope (format name, schema version, sha256 over the content), reading,
staleness and atomic writes. Every problem with a file is a `TunedConfigError` naming it."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any


class TunedConfigError(ValueError):
    """A tuned-config file that cannot be used: unreadable, foreign, tampered, stale or invalid."""


def is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_power_of_two(value: object) -> bool:
    """An int (not a bool) that is a positive power of 2."""
    return is_int(value) and value > 0 and value & (value - 1) == 0


@dataclasses.dataclass(frozen=True)
class TunedKey:
    """Where a table holds: the GPU name, the Triton version and the MoE shape (`shape_key`)."""

    gpu: str
    triton_version: str
    shape: str

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if not isinstance(value, str) or not value:
                raise ValueError(f"TunedKey.{field.name} must be a non-empty str, got {value!r}")

    def mismatches(self, here: TunedKey) -> list[str]:
        """'field: file has X, here Y' for each differing field."""
        return [
            f"{f.name}: file has {getattr(self, f.name)!r}, here {getattr(here, f.name)!r}"
            for f in dataclasses.fields(self)
            if getattr(self, f.name) != getattr(here, f.name)
        ]


def table_json(table: Any, fmt: str, schema: int, buckets: Mapping[int, Mapping[str, Any]]) -> dict:
    """A table's file content: the envelope, its key and notes, `buckets` (int -> JSON), the checksum."""
    data = {
        "format": fmt,
        "schema": schema,
        "key": dataclasses.asdict(table.key),
        "created": table.created,
        "tool": table.tool,
        "notes": table.notes,
        "buckets": {str(bucket): entry for bucket, entry in buckets.items()},
    }
    data["sha256"] = content_sha256(data)
    return data


def checked_table(table: Any, entry_type: type) -> dict[int, Any]:
    """A table's common fields checked (a TunedKey, a non-empty mapping of positive int bucket ->
    `entry_type`, str created/tool/notes); returns its buckets, ascending (a copy)."""
    kind = type(table).__name__
    if not isinstance(table.key, TunedKey):
        raise TypeError(f"{kind}.key must be a TunedKey, got {type(table.key).__name__}")
    if not isinstance(table.buckets, Mapping) or not table.buckets:
        raise ValueError(f"{kind}.buckets must be a non-empty mapping of bucket -> {entry_type.__name__}")
    for bucket, entry in table.buckets.items():
        if not is_int(bucket) or bucket <= 0:
            raise ValueError(f"bucket {bucket!r} must be a positive int (tokens)")
        if not isinstance(entry, entry_type):
            raise TypeError(f"bucket {bucket}: expected a {entry_type.__name__}, got {type(entry).__name__}")
    for field in ("created", "tool", "notes"):
        if not isinstance(getattr(table, field), str):
            raise TypeError(f"{kind}.{field} must be a str, got {getattr(table, field)!r}")
    return dict(sorted(table.buckets.items()))


def check_envelope(data: object, source: str, fmt: str, schema: int, what: str) -> None:
    """Format name, schema version and checksum of a table file's content; TunedConfigError naming `source`."""
    if not isinstance(data, dict) or data.get("format") != fmt:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise TunedConfigError(f"{source} is not a moe-dispatch {what} (format={found!r})")
    if data.get("schema") != schema:
        raise TunedConfigError(
            f"{source} has schema {data.get('schema')!r}, this moe-dispatch reads schema {schema}; re-tune"
        )
    try:
        stored, actual = data.get("sha256"), content_sha256(data)
    except ValueError as error:
        raise TunedConfigError(f"{source} is not plain JSON: {error}") from None
    if stored != actual:
        raise TunedConfigError(
            f"{source} fails its checksum (stored sha256 {stored!r}, content hashes to {actual!r}): "
            f"it was edited or damaged after {data.get('tool', 'its tool')} wrote it; re-tune rather than edit"
        )


def parse_buckets(data: Mapping[str, Any], entry: Any) -> dict[int, Any]:
    """{bucket: entry(its JSON)} of a checked file's "buckets"; ValueError naming the bad bucket."""
    buckets = {}
    for name, value in data["buckets"].items():
        if not re.fullmatch(r"[1-9][0-9]*", name):
            raise ValueError(f"bucket {name!r} is not a positive int")
        try:
            buckets[int(name)] = entry(value)
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise ValueError(f"bucket {name}: {error_reason(error)}") from None
    return buckets


def read_table_file(path: str | os.PathLike, what: str) -> object:
    """The JSON content of a table file; TunedConfigError when unreadable or not JSON."""
    try:
        text = Path(path).read_text()
    except OSError as error:
        raise TunedConfigError(f"cannot read {what} {path}: {error}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise TunedConfigError(f"{what} {path} are not valid JSON: {error}") from None


def check_key(found: TunedKey, expect: TunedKey | None, source: str, command: str) -> None:
    """TunedConfigError when a table's key is not `expect`'s (another GPU, Triton version or shape)."""
    if expect is not None and (problems := found.mismatches(expect)):
        raise TunedConfigError(f"{source} are stale ({'; '.join(problems)}); re-tune with {command}")


def error_reason(error: Exception) -> str:
    return f"missing field {error}" if isinstance(error, KeyError) else str(error)


def content_sha256(data: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of everything but the checksum itself."""
    content = {k: v for k, v in data.items() if k != "sha256"}
    text = json.dumps(content, sort_keys=True, separators=(",", ":"), allow_nan=False)  # ValueError on NaN
    return hashlib.sha256(text.encode()).hexdigest()


# ---- files -------------------------------------------------------------------------------------


def write_json_atomic(path: Path, data: Mapping[str, Any]) -> Path:
    """Write `data` as JSON to `path` (temp file + rename, parents made); returns the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path
