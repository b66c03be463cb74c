"""`triton_kernels_tuned`: the `triton_kernels` backend with tuned opt flags per matmul.

The flags come from a `TkFlagsTable` for this GPU, Triton version and shape (see
moe_dispatch.tk_flags_table; made by `python -m bench.tk_flags_probe --tables DIR`). Each
call runs inside `scoped_matmul_flags` with the nearest bucket's flags for the up and the
down matmul (a matmul the table leaves to triton_kernels, or a call more than 2x from every
bucket, keeps triton_kernels' own); under a CUDA graph that happens once, at capture. The
weights, the views and tk_flags' view fix are the `triton_kernels` backend's. Without a
table for the spec the backend says no, naming the file it looked for.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence

import torch

from moe_dispatch.backends.base import PreparedKernel, Support
from moe_dispatch.backends.sglang_triton_tuned import lookup_table
from moe_dispatch.backends.tk_matmul_flags import scoped_matmul_flags
from moe_dispatch.backends.triton_kernels_backend import TritonKernelsBackend, TritonKernelsKernel
from moe_dispatch.spec import PRESETS, MoESpec
from moe_dispatch.tk_flags_table import TkFlagsTable, find_tk_table, tk_table_path
from moe_dispatch.tuned_configs import TunedKey, current_key, shape_key
from moe_dispatch.weights import ExpertWeights


def probe_command(spec: MoESpec) -> str:
    match = re.fullmatch(r"(\S+) tp=(\d+)", spec.name)
    model, tp = (match[1], match[2]) if match and match[1] in PRESETS else ("<model>", "<tp>")
    return f"python -m bench.tk_flags_probe --preset {model} --tp {tp} --tables DIR"


class TunedTritonKernelsKernel(TritonKernelsKernel):
    """SGLang's triton_kernels runner with the table's flags around each call."""

    def __init__(self, name: str, spec: MoESpec, weights: ExpertWeights, table: TkFlagsTable, *runner: object) -> None:
        super().__init__(name, spec, weights, "TRITON_KERNELS", "TRITON_KERNEL", *runner)
        self.table = table

    def forward(self, hidden_states: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        entry = self.table.flags_for(hidden_states.shape[0])
        flags = {} if entry is None else entry.by_gemm(self.spec.hidden_size, self.spec.intermediate_size)
        with scoped_matmul_flags(flags):
            return super().forward(hidden_states, router_logits)


class TritonKernelsTunedBackend(TritonKernelsBackend):
    """`directories` (default: tuned_directories(), read at each lookup) and `key_for`
    (default: this GPU and Triton) are injectable for tests."""

    name = "triton_kernels_tuned"

    def __init__(
        self,
        directories: Sequence[str | os.PathLike] | None = None,
        key_for: Callable[[MoESpec], TunedKey] = current_key,
    ) -> None:
        super().__init__(layout="view", steer_flags=True)
        self._directories = directories
        self._key_for = key_for

    def supports(self, spec: MoESpec) -> Support:
        answer = super().supports(spec)
        return self.lookup(spec)[1] if answer else answer

    def lookup(self, spec: MoESpec) -> tuple[TkFlagsTable | None, Support]:
        return lookup_table(spec, self._key_for, self._directories, find_tk_table, tk_table_path, probe_command(spec))

    def _prepare(self, spec: MoESpec, weights: ExpertWeights) -> PreparedKernel:
        table, answer = self.lookup(spec)
        if table is None:
            raise ValueError(f"kernel {self.name!r} cannot run {spec.describe()}: {answer.reason}")
        return self.prepare_with_table(spec, weights, table)

    def prepare_with_table(self, spec: MoESpec, weights: ExpertWeights, table: TkFlagsTable) -> PreparedKernel:
        """Bind to `table` directly (no files): tests and the probe."""
        weights.check(spec)
        for answer in (self.availability(), TritonKernelsBackend.supports(self, spec)):
            if not answer:
                raise ValueError(f"kernel {self.name!r} cannot run {spec.describe()}: {answer.reason}")
        if table.key.shape != shape_key(spec):
            raise ValueError(f"table is for shape {table.key.shape!r}, the spec is {shape_key(spec)!r}")
        return TunedTritonKernelsKernel(self.name, spec, weights, table, *self.quant_info(weights))
