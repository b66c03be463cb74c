"""Expert weights: one container in SGLang's Triton layout, and a seeded initializer.

Layout (the canonical one; backends derive theirs from it):
    w13 [E, 2I, H]  gate and up projections (interleaved rows for GPT-OSS SwiGLU)
    w2  [E, H, I]   down projection
    b13 [E, 2I]     float32, only when spec.bias
    b2  [E, H]      float32, only when spec.bias
"""

from __future__ import annotations

import dataclasses

import torch

from moe_dispatch.spec import MoESpec


@dataclasses.dataclass(frozen=True)
class ExpertWeights:
    w13: torch.Tensor
    w2: torch.Tensor
    b13: torch.Tensor | None = None
    b2: torch.Tensor | None = None

    @property
    def device(self) -> torch.device:
        return self.w13.device

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def bytes_per_expert(self) -> int:
        return self.nbytes() // self.w13.shape[0]

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return tuple(t for t in (self.w13, self.w2, self.b13, self.b2) if t is not None)

    def check(self, spec: MoESpec) -> None:
        """Raise ValueError/TypeError when these weights do not fit `spec`."""
        E, H, I = spec.num_experts, spec.hidden_size, spec.intermediate_size
        expected = {"w13": (E, 2 * I, H), "w2": (E, H, I)}
        if spec.bias:
            expected.update(b13=(E, 2 * I), b2=(E, H))
        for name, shape in expected.items():
            tensor = getattr(self, name)
            if tensor is None:
                raise ValueError(f"spec has bias=True but weights.{name} is None")
            if tuple(tensor.shape) != shape:
                raise ValueError(
                    f"weights.{name} has shape {tuple(tensor.shape)}, expected {shape} for {spec.describe()}"
                )
            want_dtype = torch.float32 if name.startswith("b") else spec.dtype
            if tensor.dtype != want_dtype:
                raise TypeError(f"weights.{name} has dtype {tensor.dtype}, expected {want_dtype}")
            if tensor.device != self.device:
                raise ValueError(f"weights.{name} is on {tensor.device}, w13 on {self.device}")
        if not spec.bias and (self.b13 is not None or self.b2 is not None):
            raise ValueError("weights carry biases but spec has bias=False")

    @staticmethod
    def random(spec: MoESpec, device: torch.device | str = "cpu", seed: int = 0) -> ExpertWeights:
        """Seeded random weights with realistic scales (never zeros).

        Weights ~ N(0, 1/fan_in) so that unit-variance hidden states keep unit-scale
        activations (the regime trained models run in); biases ~ N(0, 0.1^2).
        """
        device = torch.device(device)
        gen = torch.Generator(device=device).manual_seed(seed)
        E, H, I = spec.num_experts, spec.hidden_size, spec.intermediate_size

        def normal(shape: tuple[int, ...], std: float, dtype: torch.dtype) -> torch.Tensor:
            out = torch.empty(shape, device=device, dtype=dtype)
            # Fill in float32 then cast, one expert at a time to bound peak memory.
            for e in range(shape[0]):
                out[e] = torch.randn(shape[1:], generator=gen, device=device, dtype=torch.float32).mul_(std)
            return out

        w13 = normal((E, 2 * I, H), H**-0.5, spec.dtype)
        w2 = normal((E, H, I), I**-0.5, spec.dtype)
        b13 = normal((E, 2 * I), 0.1, torch.float32) if spec.bias else None
        b2 = normal((E, H), 0.1, torch.float32) if spec.bias else None
        return ExpertWeights(w13, w2, b13, b2)


def random_inputs(
    spec: MoESpec, num_tokens: int, device: torch.device | str = "cpu", seed: int = 0, skew: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden_states [T, H] ~ N(0, 1), router_logits [T, E]) in spec.dtype.

    skew = 0 gives uniform random logits; skew > 0 adds a per-expert offset that
    grows with the expert index, so routing concentrates on a few hot experts.
    """
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    T, H, E = num_tokens, spec.hidden_size, spec.num_experts
    hidden = torch.randn(T, H, generator=gen, device=device, dtype=torch.float32)
    logits = torch.randn(T, E, generator=gen, device=device, dtype=torch.float32)
    if skew:
        logits += skew * torch.linspace(0.0, 1.0, E, device=device)
    return hidden.to(spec.dtype), logits.to(spec.dtype)
