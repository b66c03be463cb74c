"""`torch`: the reference as a backend. Runs on CPU and GPU; ground truth for tests."""

from __future__ import annotations

import torch

from moe_dispatch.backends.base import KernelBackend, PreparedKernel, Support
from moe_dispatch.reference import reference_moe
from moe_dispatch.spec import MoESpec
from moe_dispatch.weights import ExpertWeights


class TorchKernel(PreparedKernel):
    name = "torch"
    needs_cuda = False

    def forward(self, hidden_states: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        return reference_moe(self.spec, self.weights, hidden_states, router_logits).to(self.spec.dtype)


class TorchBackend(KernelBackend):
    """Note: its expert loop syncs with the host (`unique`), so it cannot be captured
    in a CUDA graph; graph dispatch never lists it as a candidate."""

    name = "torch"
    graph_capturable = False

    def availability(self) -> Support:
        return Support.yes()

    def supports(self, spec: MoESpec) -> Support:
        return Support.yes()

    def _prepare(self, spec: MoESpec, weights: ExpertWeights) -> PreparedKernel:
        return TorchKernel(spec, weights)
