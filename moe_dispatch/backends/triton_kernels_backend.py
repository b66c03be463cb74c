"""`triton_kernels`: OpenAI triton_kernels through SGLang's runner (TopK with the
triton_kernels routing format + MoeRunner TRITON_KERNELS).

Two API generations of triton_kernels exist: `triton_kernels.matmul_ogs` (Triton
3.6, SGLang <= 0.5.17) and `triton_kernels.matmul` (Triton >= 3.7, SGLang >= 0.5.18).
SGLang's runner calls whichever generation it was written for; this backend detects
which one is installed and reports it (`triton_kernels_generation`).

Weight layout: the runner wants w13 [E, H, 2I] and w2 [E, I, H]. By default it gets
transposed *views* of the canonical Triton-layout weights, which matmul_ogs reads
through their strides: zero extra bytes. `layout="copy"` makes contiguous copies
instead (the layout SGLang itself allocates for this runner) and reports their bytes.
Views whose strides the non-persistent matmul_ogs kernel cannot vectorize (GPT-OSS-120B
at tp=8: I = 360) get triton_kernels' persistent kernel, per call, at the batch sizes
that would otherwise run the slow one (`tk_flags`; `steer_flags=False` turns it off).

What SGLang's runner computes: with biases, GPT-OSS SwiGLU (alpha, clamp limit,
gate/up interleaved) fused into the first matmul; without biases, SiLU-and-mul on
split gate/up. Other combinations are reported unsupported.
"""

from __future__ import annotations

import importlib.util

import torch

from moe_dispatch.backends.base import KernelBackend, PreparedKernel, Support
from moe_dispatch.backends.sglang_env import sglang_support
from moe_dispatch.backends.sglang_runner import SGLangKernel
from moe_dispatch.backends.tk_flags import call_with_view_flags
from moe_dispatch.spec import MoESpec
from moe_dispatch.weights import ExpertWeights

LAYOUTS = ("view", "copy")

# triton_kernels' router kernel `_topk_forward` (SGLang's TRITON_KERNEL TopK format calls it
# through `triton_kernels.topk.topk(logits, top_k, ...)`) takes k as the constexpr
# N_EXPTS_ACT and uses it as `tl.arange(0, N_EXPTS_ACT)` and `tl.topk(x, N_EXPTS_ACT, dim=1)`
# over tiles of BLOCK_N = 32 experts. Triton compiles an arange only over a power-of-2 range
# ("arange's range must be a power of 2") and tl.topk only for a power-of-2 k no larger than
# the tile, so any other k fails in Triton's compiler, at every bucket. Read in the Triton
# 3.6-era copy shipped in sglang-kernel 0.4.5 (triton_kernels/topk_details/_topk_forward.py
# lines 62, 72 and 114; topk.py line 31) and upstream in triton-lang/triton,
# python/triton_kernels/triton_kernels/topk_details/_topk_forward.py (same lines of code).
TOPK_BLOCK_EXPERTS = 32


def top_k_support(top_k: int) -> Support:
    """Whether triton_kernels' router can pick `top_k` experts per token.

    The SGLang plugin's `layer_support` asks the same question of a layer's TopK.
    """
    if top_k < 1 or top_k & (top_k - 1):
        return Support.no(
            f"top_k={top_k} is not a power of 2: triton_kernels' topk kernel uses it as tl.arange and "
            "tl.topk sizes, which Triton compiles only for powers of 2"
        )
    if top_k > TOPK_BLOCK_EXPERTS:
        return Support.no(
            f"top_k={top_k} exceeds {TOPK_BLOCK_EXPERTS}, the expert tile triton_kernels' topk kernel selects from"
        )
    return Support.yes()


def triton_kernels_generation() -> str | None:
    """ "matmul_ogs" (Triton 3.6 era), "matmul" (Triton >= 3.7), or None if absent."""
    try:
        if importlib.util.find_spec("triton_kernels") is None:
            return None
        if importlib.util.find_spec("triton_kernels.matmul_ogs") is not None:
            return "matmul_ogs"
        if importlib.util.find_spec("triton_kernels.matmul") is not None:
            return "matmul"
    except Exception:  # a broken triton_kernels install: treat as absent
        return None
    return None


class TritonKernelsBackend(KernelBackend):
    name = "triton_kernels"

    def __init__(self, layout: str = "view", steer_flags: bool = True) -> None:
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        self.layout = layout
        self.steer_flags = steer_flags

    def availability(self) -> Support:
        if triton_kernels_generation() is None:
            return Support.no(
                "triton_kernels is not installed (it ships inside sglang-kernel; "
                "PyPI's 'triton-kernels' is an unrelated package)"
            )
        return sglang_support()

    def supports(self, spec: MoESpec) -> Support:
        if spec.dtype != torch.bfloat16:
            return Support.no(f"SGLang's triton_kernels runner is bf16-only, got {spec.dtype}")
        if spec.bias and spec.activation.kind != "swiglu":
            return Support.no("with biases SGLang's triton_kernels runner applies GPT-OSS SwiGLU, not SiLU")
        if not spec.bias and spec.activation.kind != "silu":
            return Support.no("without biases SGLang's triton_kernels runner applies SiLU, not SwiGLU")
        return top_k_support(spec.top_k)

    def _prepare(self, spec: MoESpec, weights: ExpertWeights) -> PreparedKernel:
        kernel = TritonKernelsKernel if self.steer_flags else SGLangKernel
        return kernel(self.name, spec, weights, "TRITON_KERNELS", "TRITON_KERNEL", *self.quant_info(weights))

    def quant_info(self, weights: ExpertWeights) -> tuple[object, int]:
        """(SGLang's TritonKernelsQuantInfo for the weights in this layout, extra weight bytes)."""
        from sglang.srt.layers.moe.moe_runner.triton_kernels import TritonKernelsQuantInfo

        w13 = weights.w13.transpose(1, 2)  # [E, H, 2I]
        w2 = weights.w2.transpose(1, 2)  # [E, I, H]
        extra = 0
        if self.layout == "copy":
            w13, w2 = w13.contiguous(), w2.contiguous()
            extra = w13.nbytes + w2.nbytes
        return TritonKernelsQuantInfo(w13_weight=w13, w2_weight=w2, w13_bias=weights.b13, w2_bias=weights.b2), extra


class TritonKernelsKernel(SGLangKernel):
    """SGLang's triton_kernels runner, each call under the opt-flag constraints its weights need."""

    def forward(self, hidden_states: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        info = self._quant_info
        return call_with_view_flags(
            lambda: super(TritonKernelsKernel, self).forward(hidden_states, router_logits),
            hidden_states.shape[0],
            self.spec.top_k,
            info.w13_weight,
            info.w2_weight,
        )
