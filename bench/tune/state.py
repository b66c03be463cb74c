"""The tuner's resume file: one JSON line per timed point, appended as soon as it is measured.

    {"key": "<gpu>|<triton>|<shape>", "bucket": 8, "phase": "up", "up": "m16n64k128g1w4s3",
     "down": "m16n32k64g1w4s3", "ms": 0.0412, "error": null}

`ms` null with an `error`: the pair failed to compile or capture; it is never retried.
Phase "check" lines hold the reference check of a bucket's winner (`error` null: passed).
Phase "confirm" lines hold the side-by-side timings of the confirm phase: one line per
pair per round, with `round` (0-based) and `vs` (the label of the pair timed beside it),
so a resumed run repeats no round it finished. Other lines carry no `round`/`vs`.
On start the file is read back, so points timed by an earlier (interrupted) run are not
timed again. A torn last line (a run killed while writing) is ignored; any other bad
line is an error naming the file and line.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

PHASES = ("default", "up", "down", "confirm", "check")


@dataclass(frozen=True)
class Entry:
    """One line of the state file."""

    key: str
    bucket: int
    phase: str
    up: str
    down: str
    ms: float | None
    error: str | None = None
    round: int | None = None  # confirm lines only: the confirm round (0-based)
    vs: str | None = None  # confirm lines only: pair_label of the pair timed beside this one

    def __post_init__(self) -> None:
        if self.phase not in PHASES:
            raise ValueError(f"phase {self.phase!r}; expected one of {PHASES}")
        if not isinstance(self.bucket, int) or isinstance(self.bucket, bool) or self.bucket <= 0:
            raise ValueError(f"bucket {self.bucket!r}; expected a positive int")
        for field in ("key", "up", "down"):
            if not isinstance(getattr(self, field), str) or not getattr(self, field):
                raise ValueError(f"{field} {getattr(self, field)!r}; expected a non-empty str")
        if self.ms is not None:
            if not isinstance(self.ms, (int, float)) or isinstance(self.ms, bool) or not math.isfinite(self.ms):
                raise ValueError(f"ms {self.ms!r}; expected a finite number or null")
            if self.ms <= 0:
                raise ValueError(f"ms {self.ms!r}; expected > 0")
        if self.error is not None and not isinstance(self.error, str):
            raise ValueError(f"error {self.error!r}; expected a str or null")
        if self.phase != "check" and (self.ms is None) == (self.error is None):
            raise ValueError(f"a timed point has either ms or an error, got ms={self.ms!r} error={self.error!r}")
        if self.phase == "confirm":
            if not isinstance(self.round, int) or isinstance(self.round, bool) or self.round < 0:
                raise ValueError(f"round {self.round!r}; a confirm line needs an int >= 0")
            if not isinstance(self.vs, str) or not self.vs:
                raise ValueError(f"vs {self.vs!r}; a confirm line needs the label of the pair beside it")
        elif self.round is not None or self.vs is not None:
            raise ValueError(f"round/vs are for confirm lines only, got phase {self.phase!r}")

    @property
    def lookup(self) -> tuple[str, int, str, str]:
        return (self.key, self.bucket, self.up, self.down)


class State:
    """Timed points by (key, bucket, up label, down label); `path` None keeps them in memory only."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._points: dict[tuple[str, int, str, str], Entry] = {}
        self._checks: dict[tuple[str, int, str, str], Entry] = {}
        self._confirms: dict[tuple[str, int, str, str, int, str], Entry] = {}
        self.loaded = 0
        if path is not None and path.exists():
            self._read(path)

    def _read(self, path: Path) -> None:
        lines = path.read_text().splitlines()
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                entry = Entry(**json.loads(line))
            except (json.JSONDecodeError, TypeError, ValueError) as error:
                if number == len(lines):  # torn by a kill mid-write: that point is simply timed again
                    warnings.warn(f"{path}:{number}: ignoring a torn last line", RuntimeWarning, stacklevel=3)
                    continue
                raise ValueError(f"{path}:{number}: not a tuner state line ({error}): {line[:200]!r}") from None
            self._remember(entry)
            self.loaded += 1

    def _remember(self, entry: Entry) -> None:
        if entry.phase == "confirm":
            self._confirms[(*entry.lookup, entry.round, entry.vs)] = entry  # type: ignore[index]
        else:
            (self._checks if entry.phase == "check" else self._points)[entry.lookup] = entry

    def point(self, key: str, bucket: int, up: str, down: str) -> Entry | None:
        """The timed (or failed) point, None when never timed."""
        return self._points.get((key, bucket, up, down))

    def check(self, key: str, bucket: int, up: str, down: str) -> Entry | None:
        """The reference check of a pair, None when never checked."""
        return self._checks.get((key, bucket, up, down))

    def confirm(self, key: str, bucket: int, up: str, down: str, round: int, vs: str) -> Entry | None:
        """The pair's timing in confirm round `round` beside pair `vs`, None when not timed."""
        return self._confirms.get((key, bucket, up, down, round, vs))

    def count(self, key_matches: Callable[[str], bool]) -> int:
        """How many timed points have a key that `key_matches`."""
        return sum(1 for key, *_ in self._points if key_matches(key))

    def record(self, entry: Entry) -> None:
        """Remember `entry` and append it to the file at once (a later kill loses nothing before it)."""
        self._remember(entry)
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            line = {k: v for k, v in asdict(entry).items() if v is not None or k not in ("round", "vs")}
            f.write(json.dumps(line) + "\n")
