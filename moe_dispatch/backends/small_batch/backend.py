"""`small_batch`: our Triton MoE for decode batches (T <= 32), two graph-capturable launches.

Reads the canonical Triton-layout weights in place (w13 [E, 2I, H], w2 [E, H, I],
contiguous; float32 biases), so it costs no extra weight memory. Kernels and design:
`kernels.py`; tile configs and the launcher: `launch.py`.

Runs on a CUDA GPU, or on the CPU under Triton's interpreter when TRITON_INTERPRET=1
(slow; for the CPU test tier).
"""

from __future__ import annotations

import importlib.util
import os
from typing import TYPE_CHECKING

import torch

from moe_dispatch.backends.base import KernelBackend, PreparedKernel, Support
from moe_dispatch.spec import MoESpec
from moe_dispatch.weights import ExpertWeights

if TYPE_CHECKING:  # launch imports triton; this module must import without it
    from moe_dispatch.backends.small_batch.launch import SmallBatchConfig

MAX_TOP_K = 8
MAX_EXPERTS = 1024  # the router holds all E logits of a token in one register tile


def _interpreter_requested() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


class SmallBatchKernel(PreparedKernel):
    """`small_batch` bound to one spec and its weights; `config` pins one tile config (tuning)."""

    name = "small_batch"

    def __init__(self, spec: MoESpec, weights: ExpertWeights, config: SmallBatchConfig | None = None) -> None:
        super().__init__(spec, weights, extra_bytes=0)
        # On CPU tensors the launcher runs the interpreter; anywhere else it needs CUDA.
        self.needs_cuda = weights.device.type != "cpu"
        self.config = config

    def forward(self, hidden_states: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        from moe_dispatch.backends.small_batch.launch import small_batch_moe

        return small_batch_moe(self.spec, self.weights, hidden_states, router_logits, self.config)


class SmallBatchBackend(KernelBackend):
    name = "small_batch"
    # The largest batch it is a candidate for; it stays correct above. Its cost grows with
    # tokens x top_k (each pair streams its expert's rows) and does not fall when routing
    # concentrates on few experts, while grouped GEMMs' does. Measurement times uniform
    # routing, so the cap keeps it where skew cannot turn a win into a large loss (H200,
    # GPT-OSS-120B tp=8, skewed routing: 49 vs 75 us at T=8, 91 vs 83 at 16, 148 vs 101 at 32).
    max_tokens = 16

    def __init__(self, config: SmallBatchConfig | None = None) -> None:
        """config: one tile config pinned for every T (config sweeps); None looks it up per T."""
        self.config = config

    def availability(self) -> Support:
        if importlib.util.find_spec("triton") is None:
            return Support.no("triton is not installed")
        if torch.cuda.is_available() or _interpreter_requested():
            return Support.yes()
        return Support.no("no CUDA GPU (set TRITON_INTERPRET=1 to run it on the CPU under Triton's interpreter)")

    def supports(self, spec: MoESpec) -> Support:
        if spec.dtype not in (torch.bfloat16, torch.float16):
            return Support.no(f"small_batch runs bf16/fp16 weights, not {spec.dtype}")
        if spec.top_k > MAX_TOP_K:
            return Support.no(f"small_batch routes top_k <= {MAX_TOP_K}, got top_k={spec.top_k}")
        if spec.num_experts > MAX_EXPERTS:
            return Support.no(f"small_batch routes num_experts <= {MAX_EXPERTS}, got num_experts={spec.num_experts}")
        return Support.yes()

    def _prepare(self, spec: MoESpec, weights: ExpertWeights) -> PreparedKernel:
        for name in ("w13", "w2", "b13", "b2"):
            tensor = getattr(weights, name)
            if tensor is not None and not tensor.is_contiguous():
                raise ValueError(
                    f"small_batch reads weights.{name} in place and needs it contiguous; "
                    f"got shape {tuple(tensor.shape)} strides {tensor.stride()}"
                )
        device = weights.device
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"small_batch runs on CUDA (or CPU under the interpreter), not on {device}")
        if device.type == "cpu":
            from moe_dispatch.backends.small_batch.launch import runs_interpreted

            if not runs_interpreted():
                raise ValueError(
                    "small_batch runs on CPU weights only under Triton's interpreter: set TRITON_INTERPRET=1 "
                    "before triton is first imported in this process"
                )
        return SmallBatchKernel(spec, weights, self.config)
