"""Backends whose kernel reads a table file for this GPU, Triton version and shape
(`triton_tuned`: tile configs; `triton_kernels_tuned`: opt flags): the lookup, the reason
when there is none, and the checks before binding a kernel to a table."""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar

from moe_dispatch.backends.base import PreparedKernel, Support
from moe_dispatch.spec import PRESETS, MoESpec
from moe_dispatch.tuned_configs import TunedConfigError, TunedKey, current_key, shape_key, tuned_directories
from moe_dispatch.weights import ExpertWeights


def preset_command(spec: MoESpec, template: str) -> str:
    """`template` with {model} and {tp} from a preset spec's name ('<model>', '<tp>' otherwise)."""
    match = re.fullmatch(r"(\S+) tp=(\d+)", spec.name)
    model, tp = (match[1], match[2]) if match and match[1] in PRESETS else ("<model>", "<tp>")
    return template.format(model=model, tp=tp)


class TableBacked:
    """Mix in before the backend it extends. Subclasses set `find` (spec, directories, key=) ->
    table or None, `path_for` (key, directory) -> path, `command` (a preset_command template) and
    implement `prepare_with_table`. `directories` (default: tuned_directories(), read at each
    lookup) and `key_for` (default: this GPU and Triton) are injectable for tests."""

    find: ClassVar[Callable[..., Any]]
    path_for: ClassVar[Callable[[TunedKey, Path], Path]]
    command: ClassVar[str]
    table_required: ClassVar[bool] = True  # False: without a file the kernel runs with table None

    def __init__(
        self,
        directories: Sequence[str | os.PathLike] | None = None,
        key_for: Callable[[MoESpec], TunedKey] = current_key,
    ) -> None:
        self._directories = directories
        self._key_for = key_for

    def supports(self, spec: MoESpec) -> Support:
        answer = super().supports(spec)
        return self.table_for(spec)[1] if answer else answer

    def lookup(self, spec: MoESpec) -> tuple[Any, Support]:
        """The table for `spec` here, or None with the reason (no GPU; no file: the paths looked at
        and the command that makes one; a broken file: why)."""
        table, answer, _missing = self._lookup(spec)
        return table, answer

    def table_for(self, spec: MoESpec) -> tuple[Any, Support]:
        """The table to bind and whether the backend can run: as `lookup`, except that a backend
        whose table is optional (`table_required` False) runs with None where there is no file
        (a broken file is still refused, with its reason)."""
        table, answer, missing = self._lookup(spec)
        if table is None and missing and not self.table_required:
            return None, Support.yes()
        return table, answer

    def _lookup(self, spec: MoESpec) -> tuple[Any, Support, bool]:
        """(table or None, Support, whether the table is missing rather than broken)."""
        try:
            key = self._key_for(spec)
        except RuntimeError as error:
            return None, Support.no(str(error)), True
        dirs = tuned_directories() if self._directories is None else tuple(map(Path, self._directories))
        try:
            table = type(self).find(spec, dirs, key=key)
        except TunedConfigError as error:
            return None, Support.no(str(error)), False
        if table is None:
            expected = " or ".join(str(type(self).path_for(key, d)) for d in dirs)
            reason = (
                f"no tuned table for {key.shape} on {key.gpu!r} with Triton {key.triton_version}: "
                f"expected {expected}; run {preset_command(spec, self.command)} to make one"
            )
            return None, Support.no(reason), True
        return table, Support.yes(), False

    def _prepare(self, spec: MoESpec, weights: ExpertWeights) -> PreparedKernel:
        table, answer = self.table_for(spec)
        if not answer:  # prepare() checked supports(); the file changed since
            raise ValueError(f"kernel {self.name!r} cannot run {spec.describe()}: {answer.reason}")
        return self.prepare_with_table(spec, weights, table)

    def check_binding(self, spec: MoESpec, weights: ExpertWeights, table: Any) -> None:
        """What prepare() checks, with `table` in place of the lookup; ValueError when it cannot run."""
        weights.check(spec)
        if table is None and self.table_required:
            raise ValueError(f"kernel {self.name!r} needs a table, got None")
        for answer in (self.availability(), super().supports(spec)):
            if not answer:
                raise ValueError(f"kernel {self.name!r} cannot run {spec.describe()}: {answer.reason}")
        if table is not None and table.key.shape != shape_key(spec):
            raise ValueError(f"table is for shape {table.key.shape!r}, the spec is {shape_key(spec)!r}")
