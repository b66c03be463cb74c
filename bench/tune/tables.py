"""Tuned tables out of the tuner: from a run's outcomes (`store`) or from its report JSON
(`tables_from_report`, `--table-from-report`: no GPU, for when the table files of a device
run did not come back but the report did)."""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from bench.results import now_iso
from bench.tune.search import Outcome
from moe_dispatch.tuned_configs import (
    BucketConfig,
    TileConfig,
    TunedConfigError,
    TunedKey,
    TunedTable,
    load_table,
    save_table,
    table_path,
)

_LABEL = re.compile(r"m(\d+)n(\d+)k(\d+)g(\d+)w(\d+)s(\d+)")


def parse_label(label: object) -> TileConfig:
    """'m16n32k256g1w8s4' (TileConfig.label()) -> TileConfig; ValueError when it is not one."""
    match = _LABEL.fullmatch(label) if isinstance(label, str) else None
    if match is None:
        raise ValueError(f"{label!r} is not a tile label like 'm16n32k64g1w4s3'")
    return TileConfig(*map(int, match.groups()))


def _settings_text(settings: Mapping[str, object]) -> str:
    fields = ("space", "replays", "warmup", "min_gain", "seed", "confirm_rounds", "confirm_replays")
    return " ".join(f"{f}={settings[f]}" for f in fields if f in settings)


def store(
    key: TunedKey,
    outcomes: Sequence[Outcome],
    args: argparse.Namespace,
    say: Callable[[str], None],
    created: str | None = None,
) -> Path | None:
    """Save the buckets done (merged over an existing table for the same key); None when none is."""
    done = {o.bucket: o.config for o in outcomes if o.config is not None}
    if not done:
        return None
    buckets = {}
    path = table_path(key, args.out)
    if path.exists():
        try:
            buckets = dict(load_table(path, expect=key).buckets)
        except TunedConfigError as error:
            say(f"replacing {path}: {error}")
    kept = sorted(set(buckets) - set(done))
    buckets.update(done)
    now = created or now_iso()
    notes = (
        f"{_settings_text(vars(args))}; buckets {sorted(done)} tuned {now}"
        + (f"; {kept} kept from the earlier table" if kept else "")
    )  # fmt: skip
    return save_table(TunedTable(key, buckets, created=now, notes=notes), args.out)


def _bucket_config(entry: Mapping) -> BucketConfig | None:
    """A report bucket's stored config (None: nothing was stored there)."""
    config = entry.get("config")
    if config is None:
        return None
    up, down = parse_label(config["up"]), parse_label(config["down"])
    if "down_ms" in config:  # reports since the confirm phase carry the stored times
        times = {f: config.get(f) for f in ("up_ms", "down_ms", "default_ms")}
    else:  # earlier reports: the stored pair's time and the baseline; up_ms was not reported
        times = {"up_ms": None, "down_ms": entry.get("stored_ms"), "default_ms": entry.get("default_ms")}
    return BucketConfig(up, down, **times)


def tables_from_report(data: object, source: str, note: str = "") -> list[TunedTable]:
    """One TunedTable per shape of a bench.tune report JSON that stored any bucket.

    `created`: the report's, else now; `notes` say it was rebuilt from `source`, with the
    run's settings and `note`. ValueError naming `source` when the report is not usable."""
    if not isinstance(data, dict) or data.get("tool") != "bench.tune" or not isinstance(data.get("shapes"), list):
        raise ValueError(f"{source} is not a bench.tune report (no tool 'bench.tune' with a list of shapes)")
    tables = []
    for i, shape in enumerate(data["shapes"]):
        where = f"{source}: shape {i} ({shape.get('name', '?') if isinstance(shape, dict) else '?'})"
        try:
            key = TunedKey(**shape["key"])
            buckets = {}
            for entry in shape["buckets"]:
                config = _bucket_config(entry)
                if config is not None:
                    buckets[entry["bucket"]] = config
            if not buckets:
                continue
            created = shape.get("created") or data.get("created") or now_iso()
            old = "" if any("down_ms" in (e.get("config") or {}) for e in shape["buckets"]) else " (up_ms not in it)"
            notes = (
                f"rebuilt from the report {source}{old} by python -m bench.tune --table-from-report at {now_iso()}; "
                f"{_settings_text(shape.get('settings') or {})}; buckets {sorted(buckets)}"
                + (f"; {note}" if note else "")
            )  # fmt: skip
            tables.append(TunedTable(key, buckets, created=created, notes=notes))
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            why = f"missing field {error}" if isinstance(error, KeyError) else str(error)
            raise ValueError(f"{where}: {why}") from None
    return tables


def save_from_report(report: Path, out: Path, note: str = "", say: Callable[[str], None] = print) -> list[Path]:
    """Rebuild the tables of `report` and save them under `out` (replacing any for the same key)."""
    try:
        data = json.loads(report.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"cannot read the report {report}: {error}") from None
    tables = tables_from_report(data, str(report), note)
    if not tables:
        raise ValueError(f"{report} stores no bucket of any shape: no table to write")
    paths = []
    for table in tables:
        if table_path(table.key, out).exists():
            say(f"replacing {table_path(table.key, out)}")
        path = save_table(table, out)
        load_table(path, expect=table.key)  # reads back as the backend will
        paths.append(path)
    return paths
