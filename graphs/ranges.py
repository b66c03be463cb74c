"""Profiler-range hook: the caller names each stage's range, `graphs` only opens it.

`graphs` stays free of any profiler dependency (NVTX, torch.profiler, ...); a caller
passes a `RangeNamer` that returns a context manager per (stage, bucket, variant).
"""

from __future__ import annotations

import contextlib
from contextlib import AbstractContextManager
from typing import Protocol

# The stages `graphs` opens ranges for: capturing a graph, timing its replays, serving replays.
STAGES: tuple[str, ...] = ("capture", "measure", "replay")


class RangeNamer(Protocol):
    """Returns the context manager to wrap one stage of one variant at one bucket."""

    def __call__(self, stage: str, bucket: int, variant: str) -> AbstractContextManager[None]: ...


def no_ranges(stage: str, bucket: int, variant: str) -> AbstractContextManager[None]:
    """The default `RangeNamer`: no ranges at all."""
    return contextlib.nullcontext()
