"""The points one run measures, and the filter that makes SGLang's one-batch benchmark run only those.

SGLang's one-batch benchmark runs every combination of `--batch-size` x `--input-len` x
`--output-len` after one warm-up point, each as: prefill of batch x input tokens (timed once), then
output - 1 decode steps (median step time). A serving comparison wants two families instead:

    decode points   (bs, decode_input_len, output_len) per decode batch size: the median decode step
    prefill points  (1, L, 1) per prefill length L, `prefill_repeats` times: prefill latency of L tokens

Their union is a subset of one product (batch sizes x input lengths x output lengths), with the
prefill lengths repeated in `--input-len` so the product yields each prefill point that many times.
The wrapper (`one_batch_main.py`) wraps one_batch's per-point function so that, after the warm-up,
a point runs only while its count in `POINTS_ENV` lasts; other combinations return at once (one_batch
skips points whose result is None), and their synthetic prompts are not built (256 x 8192 tokens of
them would cost seconds of host time). One process thus loads and captures once for all points.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import inspect
from typing import Any

POINTS_ENV = "MOE_DISPATCH_BENCH_POINTS"
_ARGS = ("batch_size", "input_len", "output_len")


@dataclasses.dataclass(frozen=True, order=True)
class Point:
    """One one_batch measurement: batch size, input tokens per sequence, output tokens."""

    batch_size: int
    input_len: int
    output_len: int

    def __post_init__(self) -> None:
        for name in _ARGS:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"Point.{name} must be a positive int, got {value!r}")


@dataclasses.dataclass(frozen=True)
class PointPlan:
    """The decode and prefill points of a run; `points()` lists them, repeats included."""

    decode_batch_sizes: tuple[int, ...]
    decode_input_len: int
    output_len: int
    prefill_lens: tuple[int, ...]
    prefill_repeats: int = 3

    def __post_init__(self) -> None:
        if not self.decode_batch_sizes and not self.prefill_lens:
            raise ValueError("PointPlan needs decode batch sizes or prefill lengths")
        if self.output_len < 2:
            raise ValueError(f"output_len must be >= 2 (one decode step at least), got {self.output_len}")
        if self.prefill_repeats < 1:
            raise ValueError(f"prefill_repeats must be >= 1, got {self.prefill_repeats}")
        for value in (*self.decode_batch_sizes, *self.prefill_lens, self.decode_input_len):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"batch sizes and lengths must be positive ints, got {value!r}")

    def decode_points(self) -> list[Point]:
        return [Point(bs, self.decode_input_len, self.output_len) for bs in dict.fromkeys(self.decode_batch_sizes)]

    def prefill_points(self) -> list[Point]:
        return [Point(1, n, 1) for n in dict.fromkeys(self.prefill_lens) for _ in range(self.prefill_repeats)]

    def points(self) -> list[Point]:
        return self.decode_points() + self.prefill_points()

    def one_batch_args(self) -> list[str]:
        """--batch-size / --input-len / --output-len whose product contains every point (the first is the warm-up)."""
        batch = list(dict.fromkeys(self.decode_batch_sizes))
        if self.prefill_lens and 1 not in batch:
            batch.append(1)
        inputs = [self.decode_input_len] if self.decode_batch_sizes else []
        inputs += [p.input_len for p in self.prefill_points()]
        outputs = [self.output_len] + ([1] if self.prefill_lens else [])
        return [
            "--batch-size",
            *map(str, batch),
            "--input-len",
            *map(str, inputs),
            "--output-len",
            *map(str, outputs),
        ]


def encode_points(points: list[Point]) -> str:
    """ "1x64x64,1x512x1*3": each distinct point with its count, in first-seen order."""
    counts = collections.Counter(points)
    parts = []
    for p in dict.fromkeys(points):
        text = f"{p.batch_size}x{p.input_len}x{p.output_len}"
        parts.append(text if counts[p] == 1 else f"{text}*{counts[p]}")
    return ",".join(parts)


def decode_points(text: str) -> collections.Counter[Point]:
    """Inverse of `encode_points`; ValueError names the malformed item."""
    counts: collections.Counter[Point] = collections.Counter()
    for item in filter(None, (part.strip() for part in text.split(","))):
        spec, _, times = item.partition("*")
        try:
            bs, il, ol = (int(v) for v in spec.split("x"))
            counts[Point(bs, il, ol)] += int(times) if times else 1
        except ValueError:
            raise ValueError(f"{POINTS_ENV}: expected BSxINxOUT[*COUNT] items, got {item!r}") from None
    return counts


def restrict_points(module: Any, counts: collections.Counter[Point]) -> None:
    """Wrap `module.latency_test_run_once` (SGLang's one_batch) so only `counts` points run after the warm-up.

    The first call (one_batch's warm-up) always runs; afterwards a call runs while its point's count
    lasts and returns None otherwise. `module.prepare_synthetic_inputs_for_latency_test`, when present,
    returns no requests for a (batch, input) pair that no point uses. RuntimeError when the module
    lacks the per-point function or its arguments.
    """
    original = getattr(module, "latency_test_run_once", None)
    if original is None:
        raise RuntimeError(
            "SGLang's one_batch has no latency_test_run_once: bench.serving's point filter was written "
            "against SGLang 0.5.17's sglang.benchmark.one_batch"
        )
    signature = inspect.signature(original)
    missing = [name for name in _ARGS if name not in signature.parameters]
    if missing:
        raise RuntimeError(f"one_batch.latency_test_run_once has no parameters {missing}; cannot filter points")
    remaining = collections.Counter(counts)
    calls = 0

    @functools.wraps(original)
    def run_once(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:
            return original(*args, **kwargs)
        bound = signature.bind(*args, **kwargs).arguments
        point = Point(*(bound[name] for name in _ARGS))
        if remaining[point] <= 0:
            return None
        remaining[point] -= 1
        return original(*args, **kwargs)

    module.latency_test_run_once = run_once
    prepare = getattr(module, "prepare_synthetic_inputs_for_latency_test", None)
    if prepare is not None:
        pairs = {(p.batch_size, p.input_len) for p in counts}

        @functools.wraps(prepare)
        def prepare_used(batch_size: int, input_len: int, *args: Any, **kwargs: Any) -> Any:
            if (batch_size, input_len) not in pairs:
                return []
            return prepare(batch_size, input_len, *args, **kwargs)

        module.prepare_synthetic_inputs_for_latency_test = prepare_used
