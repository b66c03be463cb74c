"""`triton_tuned`: SGLang's Triton fused_moe (as `triton`) with our tuned tile configs.

The configs come from a `TunedTable` for this GPU, Triton version and shape (see
moe_dispatch.tuned_configs; made by `python -m bench.tune`). Each call runs inside
`sglang_tile_configs(table.config_for(T))`, so the up and down matmuls use the tuned
pair of the nearest bucket; under a CUDA graph that happens once, at capture. Without
a table for the spec the backend says no, naming the file it looked for.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

from moe_dispatch.backends.sglang_runner import SGLangKernel
from moe_dispatch.backends.sglang_tile_override import sglang_tile_configs
from moe_dispatch.backends.sglang_triton import SGLangTritonBackend, triton_quant_info
from moe_dispatch.backends.table_backed import TableBacked, preset_command
from moe_dispatch.spec import MoESpec
from moe_dispatch.tuned_configs import (
    BucketConfig,
    TunedTable,
    find_table,
    table_path,
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
    return preset_command(spec, SGLangTritonTunedBackend.command)


class SGLangTritonTunedBackend(TableBacked, SGLangTritonBackend):
    name = "triton_tuned"
    find = staticmethod(find_table)
    path_for = staticmethod(table_path)
    command = "python -m bench.tune --preset {model} --tp {tp}"

    def prepare_with_table(self, spec: MoESpec, weights: ExpertWeights, table: TunedTable) -> TunedTritonKernel:
        """Bind to `table` directly (no files): how the tuner times candidate configs."""
        self.check_binding(spec, weights, table)
        return self.build(spec, weights, table.config_for)

    def build(
        self, spec: MoESpec, weights: ExpertWeights, config_for: Callable[[int], BucketConfig]
    ) -> TunedTritonKernel:
        """The kernel, unchecked: weights laid out as `triton` does (no extra bytes when contiguous)."""
        quant_info, extra = triton_quant_info(weights)
        return TunedTritonKernel(self.name, spec, weights, quant_info, extra, config_for)
