"""`triton_tuned`: SGLang's Triton fused_moe (as `triton`) with our tuned tile configs.

The configs come from a `TunedTable` for this GPU, Triton version and shape (see
moe_dispatch.tuned_configs; made by `python -m bench.tune`). Each call runs inside
`sglang_tile_configs(table.config_for(T))`, so the up and down matmuls use the tuned
pair of the nearest bucket; under a CUDA graph that happens once, at capture. Without
a table for the spec the backend says no, naming the file it looked for.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from moe_dispatch.backends.base import Support
from moe_dispatch.backends.sglang_runner import SGLangKernel
from moe_dispatch.backends.sglang_tile_override import sglang_tile_configs
from moe_dispatch.backends.sglang_triton import SGLangTritonBackend, triton_quant_info
from moe_dispatch.spec import PRESETS, MoESpec
from moe_dispatch.tuned_configs import (
    BucketConfig,
    TunedConfigError,
    TunedKey,
    TunedTable,
    current_key,
    find_table,
    shape_key,
    table_path,
    tuned_directories,
)
from moe_dispatch.weights import ExpertWeights


class TunedTritonKernel(SGLangKernel):
    """SGLang's Triton runner with `config_for(num_tokens)`'s tile configs around each call."""

    def __init__(
        self,
        name: str,
        spec: MoESpec,
        weights: ExpertWeights,
        quant_info: Any,
        extra_bytes: int,
        config_for: Callable[[int], BucketConfig],
    ) -> None:
        super().__init__(name, spec, weights, "TRITON", "STANDARD", quant_info, extra_bytes)
        self.config_for = config_for

    def _run_context(self, num_tokens: int) -> contextlib.AbstractContextManager[Any]:
        return sglang_tile_configs(self.config_for(num_tokens))


def tune_command(spec: MoESpec) -> str:
    """The bench.tune command line that makes a table for `spec` (placeholders when not a preset)."""
    match = re.fullmatch(r"(\S+) tp=(\d+)", spec.name)
    model, tp = (match[1], match[2]) if match and match[1] in PRESETS else ("<model>", "<tp>")
    return f"python -m bench.tune --preset {model} --tp {tp}"


def lookup_table(
    spec: MoESpec,
    key_for: Callable[[MoESpec], TunedKey],
    directories: Sequence[str | os.PathLike] | None,
    find: Callable[..., Any],
    path_for: Callable[[TunedKey, Path], Path],
    command: str,
) -> tuple[Any, Support]:
    """`find(spec, directories, key=...)`'s table for `spec` here, or None with the reason (no GPU,
    no file: the paths looked at and the `command` that makes one; a broken file: why)."""
    try:
        key = key_for(spec)
    except RuntimeError as error:
        return None, Support.no(str(error))
    dirs = tuned_directories() if directories is None else tuple(map(Path, directories))
    try:
        table = find(spec, dirs, key=key)
    except TunedConfigError as error:
        return None, Support.no(str(error))
    if table is None:
        expected = " or ".join(str(path_for(key, d)) for d in dirs)
        return None, Support.no(
            f"no tuned table for {key.shape} on {key.gpu!r} with Triton {key.triton_version}: "
            f"expected {expected}; run {command} to make one"
        )
    return table, Support.yes()


class SGLangTritonTunedBackend(SGLangTritonBackend):
    """`directories` (default: `tuned_directories()`, read at each lookup) and `key_for`
    (default: this GPU and Triton) are injectable for tests."""

    name = "triton_tuned"

    def __init__(
        self,
        directories: Sequence[str | os.PathLike] | None = None,
        key_for: Callable[[MoESpec], TunedKey] = current_key,
    ) -> None:
        self._directories = directories
        self._key_for = key_for

    def supports(self, spec: MoESpec) -> Support:
        answer = super().supports(spec)
        return self.lookup(spec)[1] if answer else answer

    def lookup(self, spec: MoESpec) -> tuple[TunedTable | None, Support]:
        """The table for `spec` here, or None with the reason (no GPU, no file, a broken file)."""
        return lookup_table(spec, self._key_for, self._directories, find_table, table_path, tune_command(spec))

    def _prepare(self, spec: MoESpec, weights: ExpertWeights) -> TunedTritonKernel:
        table, answer = self.lookup(spec)
        if table is None:  # prepare() checked supports(); the file went away since
            raise ValueError(f"kernel {self.name!r} cannot run {spec.describe()}: {answer.reason}")
        return self.build(spec, weights, table.config_for)

    def prepare_with_table(self, spec: MoESpec, weights: ExpertWeights, table: TunedTable) -> TunedTritonKernel:
        """Bind to `table` directly (no files): how the tuner times candidate configs."""
        weights.check(spec)
        for answer in (self.availability(), SGLangTritonBackend.supports(self, spec)):
            if not answer:
                raise ValueError(f"kernel {self.name!r} cannot run {spec.describe()}: {answer.reason}")
        if table.key.shape != shape_key(spec):
            raise ValueError(f"table is for shape {table.key.shape!r}, the spec is {shape_key(spec)!r}")
        return self.build(spec, weights, table.config_for)

    def build(
        self, spec: MoESpec, weights: ExpertWeights, config_for: Callable[[int], BucketConfig]
    ) -> TunedTritonKernel:
        """The kernel, unchecked: weights laid out as `triton` does (no extra bytes when contiguous)."""
        quant_info, extra = triton_quant_info(weights)
        return TunedTritonKernel(self.name, spec, weights, quant_info, extra, config_for)
