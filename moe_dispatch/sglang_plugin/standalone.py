"""SGLang's own MoE layers outside a server: a one-rank SGLang process state and
GPT-OSS-style TopK + FusedMoE pairs built from a MoESpec (tests and the start-up demo).
"""

from __future__ import annotations

import socket
from typing import Any

import torch

from moe_dispatch.spec import MoESpec
from moe_dispatch.weights import ExpertWeights


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_single_rank() -> None:
    """A published default ServerArgs and real one-rank TP/EP groups (what FusedMoE reads)."""
    from moe_dispatch.backends import sglang_env

    torch.cuda.set_device(0)
    sglang_env.ensure_sglang_state()
    from sglang.srt.distributed import parallel_state as ps

    if isinstance(ps._TP, sglang_env._SingleRankGroup):  # the stand-in the standalone backends install
        ps._TP = None
    if ps._TP is None:
        ps.init_distributed_environment(
            world_size=1,
            rank=0,
            distributed_init_method=f"tcp://127.0.0.1:{_free_port()}",
            local_rank=0,
            backend="nccl",
        )
        ps.initialize_model_parallel(tensor_model_parallel_size=1, expert_model_parallel_size=1)


def build_layer(spec: MoESpec, runner_backend: str, weights: ExpertWeights, layer_id: int = 0) -> tuple[Any, Any]:
    """(TopK, FusedMoE) as SGLang's GPT-OSS model builds them, `runner_backend` forced at build time,
    loaded with `weights` (a triton_kernel layer stores them transposed: same values, its layout)."""
    from sglang.srt.layers.moe.fused_moe_triton.layer import FusedMoE
    from sglang.srt.layers.moe.topk import TopK
    from sglang.srt.layers.moe.utils import MoeRunnerBackend
    from sglang.srt.runtime_context import get_flags

    swiglu = spec.activation.kind == "swiglu"
    with get_flags().moe.override(runner_backend=MoeRunnerBackend(runner_backend)), torch.device("cuda"):
        topk = TopK(top_k=spec.top_k, renormalize=spec.routing.renormalize, layer_id=layer_id)
        moe = FusedMoE(
            num_experts=spec.num_experts,
            hidden_size=spec.hidden_size,
            intermediate_size=spec.intermediate_size,
            layer_id=layer_id,
            top_k=spec.top_k,
            params_dtype=spec.dtype,
            activation="silu",
            inplace=False,  # graphs replay over static inputs
            gemm1_alpha=spec.activation.alpha if swiglu else None,
            gemm1_clamp_limit=spec.activation.limit if swiglu else None,
            with_bias=spec.bias,
            gate_up_interleaved=swiglu,
        )
    tk = moe.use_triton_kernels
    moe.w13_weight.data.copy_(weights.w13.transpose(1, 2) if tk else weights.w13)
    moe.w2_weight.data.copy_(weights.w2.transpose(1, 2) if tk else weights.w2)
    if spec.bias:
        moe.w13_weight_bias.data.copy_(weights.b13)
        moe.w2_weight_bias.data.copy_(weights.b2)
    return topk, moe


def forward(
    topk: Any, moe: Any, hidden_states: torch.Tensor, router_logits: torch.Tensor, runner_backend: str | None = None
) -> torch.Tensor:
    """One MoE call; `runner_backend` set = SGLang's global backend during the call (stock TopK reads it)."""
    if runner_backend is None:
        return moe(hidden_states, topk(hidden_states, router_logits))
    from sglang.srt.layers.moe.utils import MoeRunnerBackend
    from sglang.srt.runtime_context import get_flags

    with get_flags().moe.override(runner_backend=MoeRunnerBackend(runner_backend)):
        return moe(hidden_states, topk(hidden_states, router_logits))
