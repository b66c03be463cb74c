"""What every kernel backend provides, and the input checks they share.

A backend (`KernelBackend`) answers two questions, each with a `Support` that says
why when the answer is no: can it run here at all (`availability`: packages, GPU),
and can it run this spec (`supports`). `prepare(spec, weights)` then returns a
`PreparedKernel`: a callable `(hidden_states [T, H], router_logits [T, E]) -> [T, H]`
with routing included, so routing is captured with the experts in one CUDA graph.
"""

from __future__ import annotations

import abc
import dataclasses

import torch

from moe_dispatch.spec import MoESpec
from moe_dispatch.weights import ExpertWeights


@dataclasses.dataclass(frozen=True)
class Support:
    """A yes, or a no with its reason. Falsy when no."""

    ok: bool
    reason: str = ""

    def __bool__(self) -> bool:
        return self.ok

    @staticmethod
    def yes() -> Support:
        return Support(True)

    @staticmethod
    def no(reason: str) -> Support:
        assert reason, "a 'no' must say why"
        return Support(False, reason)


class PreparedKernel(abc.ABC):
    """One backend bound to one spec and its weights (in the layout it wants).

    Calling it validates the inputs (clear ValueError/TypeError on misuse), returns an
    empty [0, H] tensor for T = 0, and otherwise runs `forward`. Non-contiguous inputs
    are made contiguous (a copy) before the kernel sees them.
    """

    name: str = "?"
    needs_cuda: bool = True

    def __init__(self, spec: MoESpec, weights: ExpertWeights, extra_bytes: int = 0) -> None:
        self.spec = spec
        self.weights = weights
        # Weight memory this backend allocated beyond the shared ExpertWeights.
        self.extra_bytes = extra_bytes

    def __call__(self, hidden_states: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        check_inputs(self.spec, self.weights, hidden_states, router_logits, self.name, self.needs_cuda)
        if hidden_states.shape[0] == 0:
            return hidden_states.new_empty((0, self.spec.hidden_size))
        return self.forward(hidden_states.contiguous(), router_logits.contiguous())

    @abc.abstractmethod
    def forward(self, hidden_states: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        """Validated, contiguous, T >= 1 inputs -> [T, H] in spec.dtype."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec.describe()}, extra_bytes={self.extra_bytes})"


class KernelBackend(abc.ABC):
    name: str = "?"
    # The largest call (tokens) this backend is a candidate for; None: any. Larger calls stay
    # correct but are never measured or chosen (e.g. a kernel built for decode sizes).
    max_tokens: int | None = None

    @abc.abstractmethod
    def availability(self) -> Support:
        """Can this backend run in this process at all (packages, GPU)?"""

    @abc.abstractmethod
    def supports(self, spec: MoESpec) -> Support:
        """Can it compute this spec (activation, bias, dtype, routing)?"""

    @abc.abstractmethod
    def _prepare(self, spec: MoESpec, weights: ExpertWeights) -> PreparedKernel: ...

    def prepare(self, spec: MoESpec, weights: ExpertWeights) -> PreparedKernel:
        """Bind to `spec` and `weights`; ValueError when unavailable or unsupported."""
        weights.check(spec)
        for answer in (self.availability(), self.supports(spec)):
            if not answer:
                raise ValueError(f"kernel {self.name!r} cannot run {spec.describe()}: {answer.reason}")
        return self._prepare(spec, weights)


def check_inputs(
    spec: MoESpec,
    weights: ExpertWeights,
    hidden_states: torch.Tensor,
    router_logits: torch.Tensor,
    kernel: str,
    needs_cuda: bool,
) -> None:
    """Raise ValueError/TypeError naming the offending value and what was expected."""
    for name, tensor in (("hidden_states", hidden_states), ("router_logits", router_logits)):
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
        if tensor.dim() != 2:
            raise ValueError(f"{name} must be 2-D, got shape {tuple(tensor.shape)}")
        if tensor.dtype != spec.dtype:
            raise TypeError(f"{name} has dtype {tensor.dtype}, expected {spec.dtype} ({spec.name})")
        if tensor.device != weights.device:
            raise ValueError(f"{name} is on {tensor.device} but the expert weights are on {weights.device}")
        if needs_cuda and tensor.device.type != "cuda":
            raise ValueError(f"kernel {kernel!r} runs on CUDA only; {name} is on {tensor.device}")
    T, H = hidden_states.shape
    if H != spec.hidden_size:
        raise ValueError(f"hidden_states has hidden size {H}, expected {spec.hidden_size}")
    if tuple(router_logits.shape) != (T, spec.num_experts):
        raise ValueError(f"router_logits has shape {tuple(router_logits.shape)}, expected ({T}, {spec.num_experts})")
