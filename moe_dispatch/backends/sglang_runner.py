"""Run one MoE call the way an SGLang server does: TopK router -> MoeRunner.

Both GPU backends (`triton`, `triton_kernels`) go through this module, so our
numbers are SGLang's numbers: the router is SGLang's `TopK` module with the output
format its runner needs (standard top-k for Triton fused_moe, triton_kernels routing
data for matmul_ogs), and the experts run through `MoeRunner(backend, config).run`,
the call `UnquantizedFusedMoEMethod.forward_cuda` makes. Outside a server the minimal
SGLang state is set up first (see sglang_env).

Differences from a server, on purpose: `inplace=False` (an in-place runner would
overwrite the static input buffer of a captured graph), and no expert parallelism.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from moe_dispatch.backends.base import PreparedKernel
from moe_dispatch.backends.sglang_env import ensure_sglang_state
from moe_dispatch.spec import MoESpec
from moe_dispatch.weights import ExpertWeights


def runner_config(spec: MoESpec) -> Any:
    from sglang.srt.layers.moe.moe_runner import MoeRunnerConfig

    swiglu = spec.activation.kind == "swiglu"
    return MoeRunnerConfig(
        num_experts=spec.num_experts,
        num_local_experts=spec.num_experts,
        hidden_size=spec.hidden_size,
        intermediate_size_per_partition=spec.intermediate_size,
        top_k=spec.top_k,
        params_dtype=spec.dtype,
        activation="silu",  # GPT-OSS models also declare "silu", plus alpha/limit below
        is_gated=True,
        inplace=False,
        gemm1_alpha=spec.activation.alpha if swiglu else None,
        gemm1_clamp_limit=spec.activation.limit if swiglu else None,
        gate_up_interleaved=swiglu,
    )


class SGLangKernel(PreparedKernel):
    """A prepared SGLang runner: `runner_backend` is the MoeRunnerBackend member name,
    `topk_format` the TopKOutputFormat member name, `quant_info` what the runner reads."""

    def __init__(
        self,
        name: str,
        spec: MoESpec,
        weights: ExpertWeights,
        runner_backend: str,
        topk_format: str,
        quant_info: Any,
        extra_bytes: int,
    ) -> None:
        super().__init__(spec, weights, extra_bytes)
        self.name = name
        ensure_sglang_state()
        from sglang.srt.layers.moe.moe_runner.runner import MoeRunner
        from sglang.srt.layers.moe.topk import TopK, TopKOutputFormat
        from sglang.srt.layers.moe.utils import MoeRunnerBackend

        self._topk = TopK(
            top_k=spec.top_k,
            renormalize=spec.routing.renormalize,
            output_format=TopKOutputFormat[topk_format],
        )
        self._runner = MoeRunner(MoeRunnerBackend[runner_backend], runner_config(spec))
        self._quant_info = quant_info

    def _run_context(self, num_tokens: int) -> contextlib.AbstractContextManager[Any]:
        """Entered around the runner call; a subclass may set SGLang state there (tile configs)."""
        return contextlib.nullcontext()

    def forward(self, hidden_states: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        from sglang.srt.layers.moe.token_dispatcher.standard import StandardDispatchOutput

        topk_output = self._topk(hidden_states, router_logits)
        dispatch = StandardDispatchOutput(
            hidden_states=hidden_states, hidden_states_scale=None, topk_output=topk_output
        )
        with self._run_context(hidden_states.shape[0]):
            return self._runner.run(dispatch, self._quant_info).hidden_states
