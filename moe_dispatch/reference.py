"""The torch reference MoE: routing, experts and combine in float32.

Ground truth for every backend's tests. Clear rather than fast: a loop over the
experts that received tokens.
"""

from __future__ import annotations

import torch

from moe_dispatch.spec import Activation, MoESpec, Routing
from moe_dispatch.weights import ExpertWeights


def route(router_logits: torch.Tensor, top_k: int, routing: Routing) -> tuple[torch.Tensor, torch.Tensor]:
    """router_logits [T, E] -> (weights [T, k] float32, expert ids [T, k] int64)."""
    logits = router_logits.float()
    if routing is Routing.TOPK_SOFTMAX:
        values, ids = torch.topk(logits, top_k, dim=-1)
        return torch.softmax(values, dim=-1), ids
    probs = torch.softmax(logits, dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if routing is Routing.SOFTMAX_TOPK_RENORM:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def activate(h: torch.Tensor, activation: Activation) -> torch.Tensor:
    """h [N, 2I] (gate and up) -> [N, I]."""
    if activation.kind == "silu":
        gate, up = h.chunk(2, dim=-1)
        return torch.nn.functional.silu(gate) * up
    gate = h[:, 0::2].clamp(max=activation.limit)
    up = h[:, 1::2].clamp(-activation.limit, activation.limit)
    return gate * torch.sigmoid(activation.alpha * gate) * (up + 1)


def reference_moe(
    spec: MoESpec, weights: ExpertWeights, hidden_states: torch.Tensor, router_logits: torch.Tensor
) -> torch.Tensor:
    """hidden_states [T, H], router_logits [T, E] -> [T, H] float32."""
    x = hidden_states.float()
    topk_weights, topk_ids = route(router_logits, spec.top_k, spec.routing)
    out = torch.zeros_like(x)
    for expert in topk_ids.unique().tolist():
        rows, slot = (topk_ids == expert).nonzero(as_tuple=True)
        h = x[rows] @ weights.w13[expert].float().t()
        if weights.b13 is not None:
            h = h + weights.b13[expert]
        y = activate(h, spec.activation) @ weights.w2[expert].float().t()
        if weights.b2 is not None:
            y = y + weights.b2[expert]
        out.index_add_(0, rows, y * topk_weights[rows, slot].unsqueeze(1))
    return out
