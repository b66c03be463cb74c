"""The MoE problem spec: what a layer computes, independent of any kernel.

`MoESpec` is a frozen record built once per layer (or per benchmark point) before any
backend is chosen; backends answer `supports(spec)` from it alone. Presets for the
models we serve live here too, each sharded by tensor parallelism (`tp`).
"""

from __future__ import annotations

import dataclasses
import enum

import torch


class Routing(enum.Enum):
    """How router logits [T, E] become (weights [T, k], expert ids [T, k]).

    TOPK_SOFTMAX: top-k of the logits, then softmax over those k (GPT-OSS).
    SOFTMAX_TOPK_RENORM: softmax over all experts, top-k, weights renormalized to sum
        to 1 (Mixtral, Qwen3-MoE with norm_topk_prob). Equal in exact arithmetic to
        TOPK_SOFTMAX; kept as its own name because models document it this way.
    SOFTMAX_TOPK: softmax over all experts, top-k, no renormalization.
    """

    TOPK_SOFTMAX = "topk_softmax"
    SOFTMAX_TOPK_RENORM = "softmax_topk_renorm"
    SOFTMAX_TOPK = "softmax_topk"

    @property
    def renormalize(self) -> bool:
        """SGLang's `renormalize` flag for this rule (triton_kernels: sm_first = not it)."""
        return self is not Routing.SOFTMAX_TOPK


@dataclasses.dataclass(frozen=True)
class Activation:
    """The gated activation between the two expert matmuls.

    kind "silu": silu(gate) * up, with w13 rows [gate (I) | up (I)].
    kind "swiglu": GPT-OSS SwiGLU, rows interleaved [g0, u0, g1, u1, ...]:
        g = min(gate, limit); u = clamp(up, -limit, limit)
        out = g * sigmoid(alpha * g) * (u + 1)
    """

    kind: str
    alpha: float | None = None
    limit: float | None = None

    def __post_init__(self) -> None:
        if self.kind == "silu":
            if self.alpha is not None or self.limit is not None:
                raise ValueError(f"silu takes no alpha/limit, got alpha={self.alpha} limit={self.limit}")
        elif self.kind == "swiglu":
            if self.alpha is None or self.limit is None or self.alpha <= 0 or self.limit <= 0:
                raise ValueError(f"swiglu needs positive alpha and limit, got alpha={self.alpha} limit={self.limit}")
        else:
            raise ValueError(f"unknown activation kind {self.kind!r}; expected 'silu' or 'swiglu'")

    @property
    def gate_up_interleaved(self) -> bool:
        return self.kind == "swiglu"

    def describe(self) -> str:
        if self.kind == "silu":
            return "silu"
        return f"swiglu(alpha={self.alpha:g},limit={self.limit:g})"


SILU = Activation("silu")
GPT_OSS_SWIGLU = Activation("swiglu", alpha=1.702, limit=7.0)

SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@dataclasses.dataclass(frozen=True)
class MoESpec:
    """One MoE layer on one tensor-parallel rank.

    num_experts (E), top_k (k), hidden_size (H), intermediate_size (I, per shard:
    the full model's intermediate size divided by tp). Weights: w13 [E, 2I, H],
    w2 [E, H, I]; biases (when `bias`) b13 [E, 2I] and b2 [E, H] in float32, as
    SGLang stores them.
    """

    num_experts: int
    top_k: int
    hidden_size: int
    intermediate_size: int
    activation: Activation = SILU
    bias: bool = False
    dtype: torch.dtype = torch.bfloat16
    routing: Routing = Routing.SOFTMAX_TOPK_RENORM
    name: str = "custom"

    def __post_init__(self) -> None:
        for field in ("num_experts", "top_k", "hidden_size", "intermediate_size"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"MoESpec.{field} must be a positive int, got {value!r}")
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k={self.top_k} exceeds num_experts={self.num_experts}")
        if not isinstance(self.activation, Activation):
            raise TypeError(f"activation must be an Activation, got {type(self.activation).__name__}")
        if not isinstance(self.routing, Routing):
            raise TypeError(f"routing must be a Routing, got {type(self.routing).__name__}")
        if self.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"dtype {self.dtype} not supported; expected one of {SUPPORTED_DTYPES}")

    def describe(self) -> str:
        return (
            f"{self.name}: E={self.num_experts} top_k={self.top_k} H={self.hidden_size} "
            f"I={self.intermediate_size} act={self.activation.describe()} bias={self.bias} "
            f"routing={self.routing.value} dtype={str(self.dtype).removeprefix('torch.')}"
        )

    def to_json(self) -> dict:
        """A plain-JSON form, used in plan metadata and bench results."""
        return {
            "name": self.name,
            "num_experts": self.num_experts,
            "top_k": self.top_k,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "activation": dataclasses.asdict(self.activation),
            "bias": self.bias,
            "dtype": str(self.dtype).removeprefix("torch."),
            "routing": self.routing.value,
        }

    @staticmethod
    def from_json(data: dict) -> MoESpec:
        dtype = getattr(torch, data["dtype"], None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"unknown dtype {data['dtype']!r} in spec JSON")
        return MoESpec(
            num_experts=data["num_experts"],
            top_k=data["top_k"],
            hidden_size=data["hidden_size"],
            intermediate_size=data["intermediate_size"],
            activation=Activation(**data["activation"]),
            bias=data["bias"],
            dtype=dtype,
            routing=Routing(data["routing"]),
            name=data["name"],
        )


@dataclasses.dataclass(frozen=True)
class _Model:
    num_experts: int
    top_k: int
    hidden_size: int
    intermediate_size: int  # unsharded
    activation: Activation
    bias: bool
    routing: Routing


# Model configs as published with the checkpoints (config.json of each model).
_MODELS: dict[str, _Model] = {
    "gpt-oss-120b": _Model(128, 4, 2880, 2880, GPT_OSS_SWIGLU, True, Routing.TOPK_SOFTMAX),
    "gpt-oss-20b": _Model(32, 4, 2880, 2880, GPT_OSS_SWIGLU, True, Routing.TOPK_SOFTMAX),
    "mixtral-8x7b": _Model(8, 2, 4096, 14336, SILU, False, Routing.SOFTMAX_TOPK_RENORM),
    "qwen3-30b-a3b": _Model(128, 8, 2048, 768, SILU, False, Routing.SOFTMAX_TOPK_RENORM),
}

PRESETS: tuple[str, ...] = tuple(_MODELS)


def preset(name: str, tp: int = 1, dtype: torch.dtype = torch.bfloat16) -> MoESpec:
    """The MoE layer of a named model on one of `tp` tensor-parallel ranks."""
    if name not in _MODELS:
        raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}")
    if not isinstance(tp, int) or isinstance(tp, bool) or tp <= 0:
        raise ValueError(f"tp must be a positive int, got {tp!r}")
    model = _MODELS[name]
    if model.intermediate_size % tp:
        raise ValueError(f"tp={tp} does not divide {name}'s intermediate size {model.intermediate_size}")
    return MoESpec(
        num_experts=model.num_experts,
        top_k=model.top_k,
        hidden_size=model.hidden_size,
        intermediate_size=model.intermediate_size // tp,
        activation=model.activation,
        bias=model.bias,
        dtype=dtype,
        routing=model.routing,
        name=f"{name} tp={tp}",
    )
