"""`triton`: SGLang's Triton fused_moe (standard TopK routing + MoeRunner TRITON).

Weights are the canonical layout (w13 [E, 2I, H], w2 [E, H, I], contiguous, which
SGLang's wrapper asserts), so this backend costs no extra weight memory.
"""

from __future__ import annotations

from typing import Any

import torch

from moe_dispatch.backends.base import KernelBackend, PreparedKernel, Support
from moe_dispatch.backends.sglang_env import sglang_support
from moe_dispatch.backends.sglang_runner import SGLangKernel
from moe_dispatch.spec import MoESpec
from moe_dispatch.weights import ExpertWeights


class SGLangTritonBackend(KernelBackend):
    name = "triton"

    def availability(self) -> Support:
        return sglang_support()

    def supports(self, spec: MoESpec) -> Support:
        if spec.dtype not in (torch.bfloat16, torch.float16):
            return Support.no(f"SGLang's unquantized Triton fused_moe runs bf16/fp16, not {spec.dtype}")
        return Support.yes()

    def _prepare(self, spec: MoESpec, weights: ExpertWeights) -> PreparedKernel:
        quant_info, extra = triton_quant_info(weights)
        return SGLangKernel(self.name, spec, weights, "TRITON", "STANDARD", quant_info, extra)


def triton_quant_info(weights: ExpertWeights) -> tuple[Any, int]:
    """SGLang's TritonMoeQuantInfo over contiguous weights, and the bytes a copy (if any) added."""
    from sglang.srt.layers.moe.moe_runner.triton import TritonMoeQuantInfo

    w13, w2 = weights.w13.contiguous(), weights.w2.contiguous()
    extra = sum(t.nbytes for t, src in ((w13, weights.w13), (w2, weights.w2)) if t is not src)
    return TritonMoeQuantInfo(w13_weight=w13, w2_weight=w2, b13=weights.b13, b2=weights.b2), extra
