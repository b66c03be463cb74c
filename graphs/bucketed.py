"""`BucketedGraphs`: one CUDA graph per (bucket, variant), timed, the fastest kept per bucket, replayed by size.

Capture (`BucketedGraphs.capture`):
    graphs.measure.measure_buckets: every variant per bucket into a scratch pool, largest
    bucket first, replays timed, agree_across_ranks (MAX), pick_fastest per bucket
    -> drop every scratch graph and output, synchronize + empty_cache (the scratch pool,
       losers included, goes back to the device)
    -> re-capture each bucket's winner, largest first, into a fresh serving pool.
A CUDA graph pool is returned to the device only once no graph uses it, so dropping
only the losers would keep their memory; re-capturing the winners is what frees it.
When no bucket has more than one candidate (every bucket chosen through `choose`, or a
single variant) there are no losers, and the winners are captured once, directly into
the serving pool. With keep_all every variant stays in one pool (for A/B)
and nothing is re-captured.
Replay (`run` / `replay`): bucket = smallest captured size >= T; inputs are copied into
the static buffers' first T rows and the winner graph of that bucket is replayed.

Padding: rows T..bucket-1 of the static inputs keep whatever they last held (the
caller fills the static buffers with finite values once). Variants must be
row-independent (output row r depends only on input row r) for padding to be harmless.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from graphs.buckets import DEFAULT_BUCKETS, bucket_for, validate_buckets
from graphs.capture import CapturedGraph, CaptureError, capture, require_cuda
from graphs.measure import BucketResult, TimingPlan, candidates, check_rows, measure_buckets
from graphs.ranges import RangeNamer, no_ranges


@dataclass(frozen=True)
class MemoryReading:
    """`torch.cuda.memory_allocated()` / `memory_reserved()` (bytes), read after synchronize + empty_cache."""

    allocated: int
    reserved: int


@dataclass(frozen=True)
class CaptureReport:
    """Outcome of `BucketedGraphs.capture`.

    Memory is read three times, each after `torch.cuda.synchronize()` and
    `torch.cuda.empty_cache()` (which returns idle cached blocks to the device but never
    a graph pool some graph still uses): before capture (`memory_before`), after every
    variant is captured (`memory_all_variants`, before anything is dropped), and once the
    serving graphs are in place (`memory_winners`: after the re-capture into the serving
    pool; without a re-capture, after the losers are dropped).
    - `pool_bytes_all_variants`: reserved bytes added by capture with every variant kept
      (the pool's segments: static outputs plus graph scratch).
    - `pool_bytes_winners`: reserved bytes added by the graphs that serve. After a
      re-capture the scratch pool (losers included) has gone back to the device, so this
      counts the winners' pool only. Without one (keep_all, or every bucket chosen) it is
      the one pool's size, which with keep_all equals the first number.
    - `seconds`: wall time of the whole capture, re-capture included.
    - `recapture_seconds`: wall time to drop the scratch pool and re-capture the winners
      into the serving pool; 0.0 when there was no re-capture (keep_all, every bucket
      chosen, or a single variant).
    """

    results: tuple[BucketResult, ...]
    pool_bytes_all_variants: int
    pool_bytes_winners: int
    seconds: float
    memory_before: MemoryReading
    memory_all_variants: MemoryReading
    memory_winners: MemoryReading
    recapture_seconds: float = 0.0

    def winners(self) -> dict[int, str]:
        """{bucket: winning variant}, ascending bucket order."""
        return {r.bucket: r.winner for r in self.results}

    def table(self) -> str:
        """Fixed-width text table: bucket, each variant's median replay ms, winner, margin, seconds."""
        names: list[str] = []
        for r in self.results:
            for name in (*r.timings_ms, *r.dropped, r.winner):
                if name not in names:
                    names.append(name)
        rows = [["bucket", *names, "winner", "margin", "seconds"]]
        for r in self.results:
            cells = [str(r.bucket)]
            for name in names:
                if name in r.timings_ms:
                    cells.append(f"{r.timings_ms[name].median_ms:.4f}")
                else:
                    cells.append("failed" if name in r.dropped else "-")
            cells += [r.winner, "-" if r.margin is None else f"{r.margin:.2f}x", f"{r.seconds:.2f}"]
            rows.append(cells)
        widths = [max(len(row[j]) for row in rows) for j in range(len(rows[0]))]
        winner_col = len(names) + 1
        lines = []
        for row in rows:
            padded = [c.ljust(widths[j]) if j == winner_col else c.rjust(widths[j]) for j, c in enumerate(row)]
            lines.append("  ".join(padded).rstrip())
        title = "median replay ms per variant; margin = runner-up / winner; seconds = capture + measure"
        return "\n".join([title, *lines])


def _release_cached() -> None:
    """Wait for the device, then return idle cached blocks (and unused graph pools) to it."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()


def _read_memory() -> MemoryReading:
    _release_cached()
    return MemoryReading(allocated=torch.cuda.memory_allocated(), reserved=torch.cuda.memory_reserved())


def _check_devices(static: Sequence[torch.Tensor]) -> None:
    here = torch.device("cuda", torch.cuda.current_device())
    for i, t in enumerate(static):
        if t.device != here:
            raise ValueError(f"static_inputs[{i}] is on {t.device}; expected the current CUDA device {here}")


class BucketedGraphs:
    """Captures every variant per bucket, keeps the fastest, and replays it by batch size.

    variants: name -> fn(*inputs) -> Tensor [rows, ...], one output row per input row.
    static_inputs: CUDA tensors [>= max(buckets), ...]; bucket b's graphs read t[:b].
        The caller allocates them once, fills them with finite values, and (with
        `replay`) writes each batch into their first rows.
    keep_all: keep the losers' graphs too, for A/B runs through `replay_variant`; every
        graph then stays in the one pool it was measured in (no re-capture, no memory freed).
    ranges: names profiler ranges for the "capture", "measure" and "replay" stages.
    progress: receives one line per (bucket, variant) step, and one for the re-capture.
    group: torch.distributed group whose ranks must agree on the winners.
    eligible: (variant, bucket) -> whether the variant is a candidate at that bucket (default: all).
    """

    def __init__(
        self,
        variants: Mapping[str, Callable[..., torch.Tensor]],
        static_inputs: Sequence[torch.Tensor],
        buckets: Sequence[int] = DEFAULT_BUCKETS,
        warmup_replays: int = 10,
        timed_replays: int = 100,
        keep_all: bool = False,
        ranges: RangeNamer = no_ranges,
        progress: Callable[[str], None] | None = None,
        group: object = None,
        eligible: Callable[[str, int], bool] | None = None,
    ) -> None:
        if not variants:
            raise ValueError("variants is empty; expected at least one name -> callable")
        for name, fn in variants.items():
            if not isinstance(name, str) or not name:
                raise TypeError(f"variant name {name!r} is not a non-empty str")
            if not callable(fn):
                raise TypeError(f"variant {name!r} is {type(fn).__name__}; expected a callable returning a tensor")
        if not static_inputs:
            raise ValueError("static_inputs is empty; expected at least one tensor")
        # Checked here, before any CUDA check, so a bad configuration fails the same way on every machine.
        self._buckets = validate_buckets(buckets)
        for i, t in enumerate(static_inputs):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"static_inputs[{i}] is {type(t).__name__}; expected a torch.Tensor")
            if t.dim() == 0 or t.shape[0] < self._buckets[-1]:
                raise ValueError(
                    f"static_inputs[{i}] has shape {tuple(t.shape)}; expected a leading dim >= the largest "
                    f"bucket {self._buckets[-1]}"
                )
        self._timing = TimingPlan(warmup_replays, timed_replays)
        self._variants = dict(variants)
        self._static = tuple(static_inputs)
        self._keep_all = keep_all
        self._ranges = ranges
        # Skipping the `with` for the default keeps the replay path free of a context-manager object.
        self._ranged = ranges is not no_ranges
        self._progress = progress
        self._group = group
        self._eligible = eligible
        self._kept: dict[int, dict[str, CapturedGraph]] = {}
        # Hot path: bucket -> (graph, static output, winner name).
        self._table: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, str]] = {}
        self._counts: dict[str, int] = dict.fromkeys(self._variants, 0)

    # ---- capture ---------------------------------------------------------------------------

    def capture(self, choose: Mapping[int, str] | None = None) -> CaptureReport:
        """Capture, time and select; `choose` {bucket: variant} skips measuring those buckets.

        Unless keep_all, the winners are then re-captured into a fresh serving pool, so the
        scratch pool the losers were measured in goes back to the device (see the module
        docstring); with every bucket chosen they are captured once, into the serving pool.

        Collective when torch.distributed is initialized: every rank of `group` must call
        it with the same buckets, variants and `choose`. Raises RuntimeError when a
        bucket is left with no variant that captured (on every rank).
        """
        chosen = dict(choose or {})
        for b, name in chosen.items():
            if b not in self._buckets:
                raise ValueError(f"choose names bucket {b!r}, which is not one of the buckets {list(self._buckets)}")
            if name not in self._variants:
                raise ValueError(f"choose[{b}]={name!r} is not a variant; expected one of {sorted(self._variants)}")
        require_cuda("BucketedGraphs.capture")
        _check_devices(self._static)
        self._kept, self._table = {}, {}  # a second capture replaces the first

        start = time.perf_counter()
        stream = torch.cuda.Stream()
        before = _read_memory()
        # Re-capture only when there were losers to free: some bucket had more than one candidate.
        recapture = not self._keep_all and any(
            b not in chosen and len(candidates(self._variants, b, self._eligible)) > 1 for b in self._buckets
        )
        measured = measure_buckets(
            self._variants,
            self._static,
            self._buckets,
            torch.cuda.graph_pool_handle(),  # the scratch pool when re-capturing, else the serving pool
            stream,
            choose=chosen,
            timing=self._timing,
            ranges=self._ranges,
            progress=self._progress,
            group=self._group,
            eligible=self._eligible,
        )
        all_variants = _read_memory()
        results = list(measured.results)
        winners = measured.winners()
        recapture_seconds = 0.0
        if recapture:
            # `measured` holds the only references to the scratch graphs and outputs; once they are
            # gone no graph uses the scratch pool, and empty_cache returns it to the device.
            recapture_start = time.perf_counter()
            del measured
            _release_cached()
            kept = self._recapture(winners, torch.cuda.graph_pool_handle(), stream)
            recapture_seconds = time.perf_counter() - recapture_start
        else:
            # Dropping the last references frees the losers' graphs and outputs (back into the pool).
            kept = {
                b: dict(graphs) if self._keep_all else {winners[b]: graphs[winners[b]]}
                for b, graphs in measured.graphs.items()
            }
            del measured
        self._kept = kept
        self._table = {b: (kept[b][w].graph, kept[b][w].output, w) for b, w in winners.items()}
        after = _read_memory()
        return CaptureReport(
            results=tuple(results),
            pool_bytes_all_variants=all_variants.reserved - before.reserved,
            pool_bytes_winners=after.reserved - before.reserved,
            seconds=time.perf_counter() - start,
            memory_before=before,
            memory_all_variants=all_variants,
            memory_winners=after,
            recapture_seconds=recapture_seconds,
        )

    def _recapture(
        self, winners: Mapping[int, str], pool: tuple[int, int], stream: torch.cuda.Stream
    ) -> dict[int, dict[str, CapturedGraph]]:
        """Capture each bucket's winner again, largest bucket first, into the serving `pool`."""
        self._say(f"re-capturing {len(winners)} winners into the serving pool")
        kept: dict[int, dict[str, CapturedGraph]] = {}
        for b in sorted(winners, reverse=True):
            name = winners[b]
            args = tuple(t[:b] for t in self._static)
            try:
                with self._ranges("capture", b, name):
                    captured = capture(self._variants[name], args, pool, stream)
            except CaptureError as exc:
                raise RuntimeError(
                    f"bucket {b}: winner {name!r} failed to re-capture into the serving pool: {exc}"
                ) from exc
            check_rows(name, b, captured.output)
            kept[b] = {name: captured}
        return kept

    def _say(self, line: str) -> None:
        if self._progress is not None:
            self._progress(line)

    # ---- replay ----------------------------------------------------------------------------

    @property
    def buckets(self) -> tuple[int, ...]:
        return self._buckets

    @property
    def max_bucket(self) -> int:
        return self._buckets[-1]

    @property
    def winners(self) -> dict[int, str]:
        """{bucket: winning variant} after capture; empty before."""
        return {b: entry[2] for b, entry in sorted(self._table.items())}

    @property
    def replay_counts(self) -> dict[str, int]:
        """Replays served per variant through `replay`, `run` and `replay_variant` (timing replays excluded)."""
        return dict(self._counts)

    def bucket_for(self, num_tokens: int) -> int | None:
        """The bucket serving `num_tokens` rows, or None above the largest bucket."""
        return bucket_for(num_tokens, self._buckets)

    def replay(self, bucket: int) -> torch.Tensor:
        """Replay the winner graph of exactly `bucket`; returns its static output [bucket, ...].

        The caller has written the batch into static_inputs[i][:num_tokens]. The returned
        tensor is the graph's static output: valid until the next replay of ANY graph of
        this object (all graphs share one memory pool, so another graph's scratch may overlap it).

        Hot path: a range namer whose `active` attribute is False (moe_dispatch's NvtxRanges
        with no NVTX tool attached) is skipped like no namer at all: its `with` costs more
        host time than the rest of this method, and it would open no range anyway.
        """
        try:
            graph, output, name = self._table[bucket]
        except KeyError:
            captured = sorted(self._table)
            raise ValueError(f"bucket {bucket!r} has no captured graph; captured buckets: {captured}") from None
        if self._ranged and getattr(self._ranges, "active", True):
            with self._ranges("replay", bucket, name):
                graph.replay()
        else:
            graph.replay()
        self._counts[name] += 1
        return output

    def run(self, *inputs: torch.Tensor) -> torch.Tensor:
        """Copy `inputs` ([T, ...] each, matching static_inputs) into the static buffers and replay.

        Returns output[:T], a VIEW of the bucket's static output, NOT a copy: the next
        replay of any graph of this object may overwrite it. Clone it to keep it.
        """
        if not self._table:
            raise RuntimeError("BucketedGraphs.run() before capture(); call capture() first")
        statics = self._static
        if len(inputs) != len(statics):
            raise ValueError(f"run() got {len(inputs)} inputs; expected {len(statics)} (one per static input)")
        if inputs[0].dim() == 0:
            raise ValueError("input 0 is a 0-d tensor; expected [T, ...] with T rows")
        num_tokens = inputs[0].shape[0]
        bucket = bucket_for(num_tokens, self._buckets)
        if bucket is None:
            raise ValueError(
                f"T={num_tokens} rows exceed the largest captured bucket {self._buckets[-1]}; run the eager path"
            )
        for i, (src, dst) in enumerate(zip(inputs, statics, strict=True)):
            if src.dtype != dst.dtype:
                raise TypeError(f"input {i} has dtype {src.dtype}; expected {dst.dtype} like static_inputs[{i}]")
            if src.dim() == 0 or src.shape[0] != num_tokens or src.shape[1:] != dst.shape[1:]:
                want = (num_tokens, *dst.shape[1:])
                raise ValueError(f"input {i} has shape {tuple(src.shape)}; expected {want} like static_inputs[{i}]")
            dst[:num_tokens].copy_(src)
        return self.replay(bucket)[:num_tokens]

    def replay_variant(self, bucket: int, name: str) -> torch.Tensor:
        """Replay a kept variant's graph at `bucket` (any variant with keep_all=True, else only the winner).

        Same static-output rules as `replay`; meant for A/B comparisons, not serving.
        """
        kept = self._kept.get(bucket)
        if kept is None:
            raise ValueError(f"bucket {bucket!r} has no captured graph; captured buckets: {sorted(self._kept)}")
        captured = kept.get(name)
        if captured is None:
            hint = "" if self._keep_all else " (construct with keep_all=True to keep every variant)"
            raise ValueError(f"variant {name!r} is not kept at bucket {bucket}; kept: {sorted(kept)}{hint}")
        if getattr(self._ranges, "active", True):  # as in `replay`, so A/B columns pay the same host cost
            with self._ranges("replay", bucket, name):
                captured.graph.replay()
        else:
            captured.graph.replay()
        self._counts[name] += 1
        return captured.output
