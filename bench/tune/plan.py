"""The dry run's plan of one bucket's search: its steps and how many configs each times."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from bench.tune.budget import Budget
from bench.tune.search import BucketSearch, Pair, SearchContext, Settings
from bench.tune.space import Point
from bench.tune.state import State
from moe_dispatch.tuned_configs import TileConfig


class _Planner(BucketSearch):
    """A search whose every pair takes 1 ms: the steps and counts of a run where nothing
    beats the starting config (a dry run: no GPU, no state written)."""

    def __init__(self, point: Point, settings: Settings) -> None:
        super().__init__(
            point, SearchContext("plan", settings, _no_timer, _no_check, State(None), Budget(None), _quiet, "plan")
        )
        self.steps: list[tuple[str, str, int]] = []
        self._planned: set[Pair] = set()

    def evaluate(self, phase: str, step: str, pairs: Sequence[Pair], best: float | None) -> dict[Pair, float | None]:
        new = [p for p in dict.fromkeys(pairs) if p not in self._planned]
        self._planned.update(new)
        self.steps.append((phase, step, len(new)))
        return dict.fromkeys(pairs, 1.0)


def plan_bucket(point: Point, settings: Settings) -> list[tuple[str, str, int]]:
    """(phase, step, configs timed) of the search at `point`, assuming no candidate beats its
    start; then ("confirm", "rounds", 2 * rounds): the side-by-side timings a real run makes
    whenever its search found a pair other than the default (no compiles: both ran already)."""
    planner = _Planner(point, settings)
    planner.run()
    if settings.confirm_rounds:
        planner.steps.append(("confirm", "rounds", 2 * settings.confirm_rounds))
    return planner.steps


def _no_timer(bucket: int, pairs: Mapping[str, Pair], replays: int | None = None) -> dict[str, float | str | None]:
    raise AssertionError("the planner times nothing")


def _no_check(bucket: int, up: TileConfig, down: TileConfig) -> str | None:
    raise AssertionError("the planner checks nothing")


def _quiet(line: str) -> None:
    pass
