"""Tile configs (data, per token-count range) and the launcher of the two `small_batch` kernels.

`SmallBatchConfig` holds every tuning knob of both launches; `CONFIGS` maps a token
range to one, `config_for(T)` looks it up. `small_batch_moe` allocates the per-call
scratch (shapes depend on T only, never on data, so it is graph-capturable) and runs:

    gate_up_kernel  grid (T * top_k, cdiv(I, block_n))   -> inter [T*k, I] f32, ids, wts
    down_kernel     grid (T, cdiv(H, block_h))           -> out [T, H] spec.dtype

On CPU tensors the kernels run only under Triton's interpreter, which must be chosen
(TRITON_INTERPRET=1) before triton itself is imported: triton.language's own helpers
(tl.max, tl.sum, ...) are built for one mode or the other at that import.
"""

from __future__ import annotations

import dataclasses

import torch
import triton

from moe_dispatch.backends.small_batch import kernels
from moe_dispatch.spec import MoESpec
from moe_dispatch.table_files import is_power_of_two
from moe_dispatch.weights import ExpertWeights


@dataclasses.dataclass(frozen=True)
class SmallBatchConfig:
    """Tiles, warps and pipeline stages of the two launches (tiles and warps: powers of two).

    block_n: intermediate columns per gate/up program (each reads 2*block_n rows of w13).
    block_k: hidden elements per step of the gate/up loop.
    block_h: output columns per down program (rows of w2 read per expert).
    block_i: intermediate elements per step of the down loop.
    *_warps, *_stages: num_warps of each launch, and the software-pipeline depth of
    its weight-streaming loop (`tl.range(num_stages=...)`; 1 = no pipelining).
    *_unroll: unroll that loop fully instead (stages then unused): all its loads can
    be in flight at once; for short loops (I=360 is 3 steps of 128).
    pdl: launch down with programmatic dependent launch (sm_90+): its launch and start-up
    overlap gate_up's tail (see `kernels`). Ignored under the interpreter and before sm_90.
    """

    block_n: int = 8
    block_k: int = 256
    up_warps: int = 4
    up_stages: int = 2
    up_unroll: bool = False
    block_h: int = 16
    block_i: int = 128
    down_warps: int = 4
    down_stages: int = 2
    down_unroll: bool = False
    pdl: bool = False

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name.endswith("_unroll") or field.name == "pdl":
                if not isinstance(value, bool):
                    raise ValueError(f"SmallBatchConfig.{field.name} must be a bool, got {value!r}")
            elif field.name.endswith("_stages"):
                if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 8:
                    raise ValueError(f"SmallBatchConfig.{field.name} must be an int in 1..8, got {value!r}")
            elif not is_power_of_two(value):
                raise ValueError(f"SmallBatchConfig.{field.name} must be a power of two, got {value!r}")
        for field in ("up_warps", "down_warps"):
            if getattr(self, field) > 32:
                raise ValueError(f"SmallBatchConfig.{field} must be <= 32, got {getattr(self, field)}")

    def describe(self) -> str:
        """Short name, e.g. n4k256w4s3-h8i128w4u(-pdl): tiles, warps, then s<stages> or u (unrolled)."""
        up = "u" if self.up_unroll else f"s{self.up_stages}"
        down = "u" if self.down_unroll else f"s{self.down_stages}"
        pdl = "-pdl" if self.pdl else ""
        return (
            f"n{self.block_n}k{self.block_k}w{self.up_warps}{up}-"
            f"h{self.block_h}i{self.block_i}w{self.down_warps}{down}{pdl}"
        )


# (largest T, config), ascending; T above the last bound uses the last config.
# Measured on an H200 (`python -m bench.small_batch_probe --configs --grid narrow`, 2026-11-29):
# at T=1 the narrow, fully unrolled pair n4k128u-h4i128u was fastest for GPT-OSS-120B at both
# tp=8 (10.8 us vs 11.4 for the first guess) and tp=2 (34.3 vs 38.8); at T=8 the first guess
# stayed within 1% of the best. PDL gained under 1% (10.8-11.3 / 34.1-34.3 / 56.8-57.2 us): off.
CONFIGS: tuple[tuple[int, SmallBatchConfig], ...] = (
    (
        2,
        SmallBatchConfig(
            block_n=4, block_k=128, up_stages=1, up_unroll=True, block_h=4, block_i=128, down_stages=1, down_unroll=True
        ),
    ),
    (8, SmallBatchConfig(block_n=8, block_k=256, up_stages=3, block_h=16, block_i=128, down_unroll=True)),
    (32, SmallBatchConfig(block_n=16, block_k=128, up_stages=3, block_h=32, block_i=128, down_stages=3)),
    (1 << 30, SmallBatchConfig(block_n=32, block_k=128, up_warps=8, block_h=64, block_i=64, down_warps=8)),
)


def config_for(num_tokens: int) -> SmallBatchConfig:
    """The config of the first range in `CONFIGS` that holds `num_tokens`."""
    for bound, config in CONFIGS:
        if num_tokens <= bound:
            return config
    return CONFIGS[-1][1]


def runs_interpreted() -> bool:
    """Whether the kernels were built for Triton's interpreter (TRITON_INTERPRET=1 before triton's import)."""
    return type(kernels.gate_up_kernel).__name__ == "InterpretedFunction"


def uses_pdl(config: SmallBatchConfig, device: torch.device) -> bool:
    """Whether `config.pdl` takes effect on `device`: compiled kernels on a CUDA GPU of sm_90 or newer."""
    return (
        config.pdl
        and device.type == "cuda"
        and not runs_interpreted()
        and torch.cuda.get_device_capability(device)[0] >= 9
    )


def gate_up(
    spec: MoESpec,
    weights: ExpertWeights,
    hidden_states: torch.Tensor,
    router_logits: torch.Tensor,
    config: SmallBatchConfig,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch 1: (hidden [T, H], logits [T, E]) -> (inter [T*k, I] f32, ids [T*k] i32, wts [T*k] f32).

    Row p = t * k + s of each output belongs to token t's s-th expert (in top-k order).
    """
    T = hidden_states.shape[0]
    E, k, H, I = spec.num_experts, spec.top_k, spec.hidden_size, spec.intermediate_size
    device = hidden_states.device
    inter = torch.empty((T * k, I), device=device, dtype=torch.float32)  # [T*k, I]
    ids = torch.empty((T * k,), device=device, dtype=torch.int32)  # [T*k]
    wts = torch.empty((T * k,), device=device, dtype=torch.float32)  # [T*k]
    b13 = weights.b13 if weights.b13 is not None else weights.w13  # never read without bias
    swiglu = spec.activation.kind == "swiglu"
    kernels.gate_up_kernel[(T * k, triton.cdiv(I, config.block_n))](
        hidden_states,
        router_logits,
        weights.w13,
        b13,
        inter,
        ids,
        wts,
        E=E,
        E_PAD=triton.next_power_of_2(E),
        TOP_K=k,
        H=H,
        I=I,
        RENORMALIZE=spec.routing.renormalize,
        SWIGLU=swiglu,
        ALPHA=float(spec.activation.alpha) if swiglu else 1.0,
        LIMIT=float(spec.activation.limit) if swiglu else 1.0,
        HAS_BIAS=spec.bias,
        BLOCK_N=config.block_n,
        BLOCK_K=config.block_k,
        STAGES=config.up_stages,
        UNROLL=config.up_unroll,
        PDL=uses_pdl(config, device),
        num_warps=config.up_warps,
    )
    return inter, ids, wts


def down(
    spec: MoESpec,
    weights: ExpertWeights,
    inter: torch.Tensor,
    ids: torch.Tensor,
    wts: torch.Tensor,
    config: SmallBatchConfig,
) -> torch.Tensor:
    """Launch 2: gate_up's (inter [T*k, I], ids [T*k], wts [T*k]) -> out [T, H] in spec.dtype."""
    k, H, I = spec.top_k, spec.hidden_size, spec.intermediate_size
    T = inter.shape[0] // k
    device = inter.device
    out = torch.empty((T, H), device=device, dtype=spec.dtype)  # [T, H]
    b2 = weights.b2 if weights.b2 is not None else weights.w2  # never read without bias
    pdl = uses_pdl(config, device)
    kernels.down_kernel[(T, triton.cdiv(H, config.block_h))](
        inter,
        ids,
        wts,
        weights.w2,
        b2,
        out,
        TOP_K=k,
        H=H,
        I=I,
        HAS_BIAS=spec.bias,
        BLOCK_H=config.block_h,
        BLOCK_I=config.block_i,
        STAGES=config.down_stages,
        UNROLL=config.down_unroll,
        PDL=pdl,
        num_warps=config.down_warps,
        **({"launch_pdl": True} if pdl else {}),
    )
    return out


def small_batch_moe(
    spec: MoESpec,
    weights: ExpertWeights,
    hidden_states: torch.Tensor,
    router_logits: torch.Tensor,
    config: SmallBatchConfig | None = None,
) -> torch.Tensor:
    """hidden_states [T, H], router_logits [T, E] (spec.dtype, contiguous, T >= 1) -> [T, H] spec.dtype.

    Two launches, no host sync. `config` None: `config_for(T)`. Inputs are assumed
    validated (see `PreparedKernel.__call__`); weights contiguous in the Triton layout.
    """
    config = config or config_for(hidden_states.shape[0])
    inter, ids, wts = gate_up(spec, weights, hidden_states, router_logits, config)
    return down(spec, weights, inter, ids, wts, config)
