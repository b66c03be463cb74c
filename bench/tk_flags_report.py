"""bench.tk_flags_probe's outputs: the Markdown table and the TkFlagsTable it stores per shard."""

from __future__ import annotations

import statistics
from pathlib import Path

from bench.results import now_iso
from moe_dispatch.backends.tk_matmul_flags import MatmulFlags


def bucket_entry(point: dict, min_gain: float):
    """The TkBucket a probed point stores: its combined flags when they won by min_gain side by
    side, else triton_kernels' own (None, None), so a neighbour's flags are not used there."""
    from moe_dispatch.tk_flags_table import TkBucket

    side = point["side_by_side_us"]
    default_us = statistics.median(side["default"]) if side["default"] else point["median_us"].get("default")
    if point["gain"] >= 1 + min_gain and side["combined"]:
        up, down = (
            MatmulFlags.from_label(x) if x else None for x in (point["combined"]["up"], point["combined"]["down"])
        )
        return TkBucket(up, down, default_us, statistics.median(side["combined"]))
    return TkBucket(None, None, default_us, default_us)


def store_table(spec, points: list[dict], directory: Path, min_gain: float, command: str, key=None) -> Path:
    """Save `points` as spec's TkFlagsTable under `directory`, over the buckets of one already there.

    `key`: the TunedKey to store under (default: this GPU and Triton)."""
    from moe_dispatch.tk_flags_table import TkFlagsTable, load_tk_table, save_tk_table, tk_table_path
    from moe_dispatch.tuned_configs import TunedConfigError, current_key

    key = key or current_key(spec)
    buckets = {}
    if tk_table_path(key, directory).exists():
        try:
            buckets = dict(load_tk_table(tk_table_path(key, directory), expect=key).buckets)
        except TunedConfigError as error:
            print(f"replacing {tk_table_path(key, directory)}: {error}", flush=True)
    buckets.update({p["tokens"]: bucket_entry(p, min_gain) for p in points})
    now = now_iso()
    notes = f"python -m bench.tk_flags_probe {command}; min_gain={min_gain}; buckets {[p['tokens'] for p in points]}"
    return save_tk_table(TkFlagsTable(key, buckets, created=now, notes=notes), directory)


def markdown(points: list[dict], header: str) -> str:
    lines = [header, ""]
    lines.append(
        "| shard | T | default flags (up ; down) | default us | best up (us) | best down (us) | "
        "combined us | gain | timed / failed |"
    )
    lines.append("|---|--:|---|--:|---|---|--:|--:|---|")
    for p in points:
        med = p["median_us"]

        def best(phase: str, med: dict[str, float] = med) -> str:
            mine = {k: v for k, v in med.items() if k.startswith(phase + ":")}
            if not mine:
                return "-"
            name = min(mine, key=mine.get)
            return f"{name.split(':', 1)[1]} ({mine[name]:.1f})"

        comb = statistics.median(p["side_by_side_us"]["combined"]) if p["side_by_side_us"]["combined"] else None
        lines.append(
            f"| {p['shard']} | {p['tokens']} | {p['defaults']['up']} ; {p['defaults']['down']} | "
            f"{med.get('default', float('nan')):.1f} | {best('up')} | {best('down')} | "
            f"{'-' if comb is None else f'{comb:.1f}'} | {p['gain']:.3f}x | {len(med)} / {len(p['failed'])} |"
        )
    return "\n".join(lines)
