"""`triton_kernels_tuned`: the `triton_kernels` backend steered by moe-dispatch: tuned opt flags
per matmul where a table has them, its own routing metadata (moe_dispatch.backends.tk_routing) in
place of the chain of small kernels after triton_kernels' top-k, and its own top-k combine
(moe_dispatch.backends.tk_combine) in place of triton_kernels' reduce everywhere.

The flags come from a `TkFlagsTable` for this GPU, Triton version and shape (see
moe_dispatch.tk_flags_table; made by `python -m bench.tk_flags_probe --tables DIR`). Each
call runs inside `scoped_matmul_flags` with the nearest bucket's flags for the up and the
down matmul (a matmul the table leaves to triton_kernels, or a call more than 2x from every
bucket, keeps triton_kernels' own) and inside `scoped_fast_routing` and `scoped_fast_combine`;
under a CUDA graph that happens once, at capture. Routing and combine are bit-identical to stock.
The weights, the views and tk_flags' view fix are the `triton_kernels` backend's. Without a table
file for the spec it runs triton_kernels' own flags with the routing and the combine; a broken
table file is refused, with the reason.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import torch

from moe_dispatch.backends.base import PreparedKernel
from moe_dispatch.backends.table_backed import TableBacked
from moe_dispatch.backends.tk_combine import scoped_fast_combine
from moe_dispatch.backends.tk_matmul_flags import scoped_matmul_flags
from moe_dispatch.backends.tk_routing import scoped_fast_routing
from moe_dispatch.backends.triton_kernels_backend import TritonKernelsBackend, TritonKernelsKernel
from moe_dispatch.spec import MoESpec
from moe_dispatch.tk_flags_table import TkFlagsTable, find_tk_table, tk_table_path
from moe_dispatch.tuned_configs import TunedKey, current_key
from moe_dispatch.weights import ExpertWeights


class TunedTritonKernelsKernel(TritonKernelsKernel):
    """SGLang's triton_kernels runner with the table's flags, the fused routing metadata and the
    combine around each call."""

    def __init__(
        self, name: str, spec: MoESpec, weights: ExpertWeights, table: TkFlagsTable | None, *runner: object
    ) -> None:
        super().__init__(name, spec, weights, "TRITON_KERNELS", "TRITON_KERNEL", *runner)
        self.table = table

    def forward(self, hidden_states: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        entry = None if self.table is None else self.table.flags_for(hidden_states.shape[0])
        flags = {} if entry is None else entry.by_gemm(self.spec.hidden_size, self.spec.intermediate_size)
        with scoped_matmul_flags(flags), scoped_fast_routing(), scoped_fast_combine():
            return super().forward(hidden_states, router_logits)


class TritonKernelsTunedBackend(TableBacked, TritonKernelsBackend):
    """triton_kernels' runner on the weight views (with tk_flags' view fix), steered by moe-dispatch."""

    name = "triton_kernels_tuned"
    table_required = False
    find = staticmethod(find_tk_table)
    path_for = staticmethod(tk_table_path)
    command = "python -m bench.tk_flags_probe --preset {model} --tp {tp} --tables DIR"

    def __init__(
        self,
        directories: Sequence[str | os.PathLike] | None = None,
        key_for: Callable[[MoESpec], TunedKey] = current_key,
    ) -> None:
        TableBacked.__init__(self, directories, key_for)
        TritonKernelsBackend.__init__(self, layout="view", steer_flags=True)

    def prepare_with_table(self, spec: MoESpec, weights: ExpertWeights, table: TkFlagsTable | None) -> PreparedKernel:
        """Bind to `table` directly (no files; None: triton_kernels' own flags): tests and the probe."""
        self.check_binding(spec, weights, table)
        return TunedTritonKernelsKernel(self.name, spec, weights, table, *self.quant_info(weights))
