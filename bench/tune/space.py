"""Which tile configs the tuner tries: spaces, per-bucket rules, resource filters (pure Python).

A tuning point is one (shape, bucket). Its two matmuls are the phases:
    up:   gate/up, w13 [E, 2I, H]  -> GEMM with N = 2I, K = H
    down: down,    w2  [E, H, I]   -> GEMM with N = H,  K = I
Both share BLOCK_SIZE_M (one moe_align_block_size sort per call), so block_m is chosen
in the up phase and held fixed in the down phase.

Each phase is a short coordinate descent over steps (search.py runs them):
    block_m  (small space, only when the bucket allows more than one block_m)
             every allowed block_m x a few probe tiles (PROBE_TILES), warps 4 stages 3
    tiles    block_n x block_k at the best block_m (full space: x every block_m too)
    launch   small: num_warps x num_stages around the best tile, plus group_m alternatives
             full: group_m x num_warps x num_stages (the product)
Configs Triton cannot run are filtered out before any compile (`unfit`): shared memory
(A and B tiles x stages), fp32 accumulator registers per thread, tiles larger than the GEMM.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterable
from dataclasses import dataclass

from moe_dispatch.spec import MoESpec
from moe_dispatch.tuned_configs import TileConfig

PHASES = ("up", "down")
BLOCK_MS = (16, 32, 64, 128)
DEFAULT_SMEM_BYTES = 200 * 1024  # when no GPU says otherwise (H100/H200 opt in to 227 KiB per block)
MAX_ACCUMULATORS = 128  # fp32 accumulator registers per thread (block_m * block_n / threads)
TRITON_WARPS, TRITON_STAGES = 4, 3  # Triton's launch defaults, which SGLang's default config leaves in place
PROBE_TILES = ((64, 64), (128, 128))  # (block_n, block_k) tried per block_m to choose block_m (small space)


@dataclass(frozen=True)
class Space:
    """The values each knob may take. `local`: two-step local search per step (small),
    else each step is the full product of its knobs (full)."""

    name: str
    block_n: tuple[int, ...]
    block_k: tuple[int, ...]
    group_m: tuple[int, ...]
    num_warps: tuple[int, ...]
    num_stages: tuple[int, ...]
    local: bool


SPACES: dict[str, Space] = {
    "small": Space("small", (32, 64, 128, 256), (64, 128, 256), (1, 8, 16), (4, 8), (2, 3, 4), local=True),
    "full": Space("full", (32, 64, 128, 256), (32, 64, 128, 256), (1, 8, 16, 32), (4, 8), (2, 3, 4, 5), local=False),
}


def get_space(name: str) -> Space:
    if name not in SPACES:
        raise ValueError(f"unknown search space {name!r}; expected one of {', '.join(SPACES)}")
    return SPACES[name]


@dataclass(frozen=True)
class Limits:
    """What one thread block may use on the GPU being tuned."""

    smem_bytes: int = DEFAULT_SMEM_BYTES
    elem_bytes: int = 2  # bf16 / fp16 operands

    def __post_init__(self) -> None:
        if self.smem_bytes <= 0 or self.elem_bytes <= 0:
            raise ValueError(f"Limits needs positive sizes, got {self}")


def device_limits(elem_bytes: int = 2) -> Limits:
    """The current GPU's opt-in shared memory per block; DEFAULT_SMEM_BYTES without a GPU."""
    import torch

    if not torch.cuda.is_available():
        return Limits(DEFAULT_SMEM_BYTES, elem_bytes)
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    smem = getattr(props, "shared_memory_per_block_optin", 0) or DEFAULT_SMEM_BYTES
    return Limits(int(smem), elem_bytes)


@dataclass(frozen=True)
class Point:
    """One (shape, bucket) to tune: the sizes that decide what is worth trying."""

    num_experts: int
    top_k: int
    hidden_size: int
    intermediate_size: int
    bucket: int
    limits: Limits = Limits()

    @staticmethod
    def of(spec: MoESpec, bucket: int, limits: Limits = Limits()) -> Point:
        if not isinstance(bucket, int) or isinstance(bucket, bool) or bucket <= 0:
            raise ValueError(f"bucket must be a positive int, got {bucket!r}")
        return Point(spec.num_experts, spec.top_k, spec.hidden_size, spec.intermediate_size, bucket, limits)

    @property
    def rows_per_expert(self) -> float:
        """Average rows each expert's GEMM gets: tokens * top_k / E (uniform routing)."""
        return self.bucket * self.top_k / self.num_experts

    def gemm(self, phase: str) -> tuple[int, int]:
        """(N, K) of the phase's GEMM."""
        if phase == "up":
            return 2 * self.intermediate_size, self.hidden_size
        if phase == "down":
            return self.hidden_size, self.intermediate_size
        raise ValueError(f"unknown phase {phase!r}; expected one of {PHASES}")


def default_tile(num_tokens: int, num_experts: int) -> TileConfig:
    """SGLang's config for unquantized bf16/fp16 fused_moe without a tuned file (both matmuls):
    M <= E: m16 n32 k64 g1, else m64 n64 k32 g8; num_warps/num_stages are Triton's defaults."""
    if num_tokens <= num_experts:
        return TileConfig(16, 32, 64, 1, TRITON_WARPS, TRITON_STAGES)
    return TileConfig(64, 64, 32, 8, TRITON_WARPS, TRITON_STAGES)


def down_base(default: TileConfig, block_m: int) -> TileConfig:
    """The down config paired with an up candidate in the up phase: the default with its block_m."""
    return dataclasses.replace(default, block_m=block_m)


def block_m_choices(point: Point) -> tuple[int, ...]:
    """16 always; a larger block_m only when an average expert fills at least half of it
    (block_m <= 2 * tokens * top_k / E), so padding never dominates."""
    return tuple(m for m in BLOCK_MS if m == 16 or m <= 2 * point.rows_per_expert)


def grouping_matters(point: Point, block_m: int) -> bool:
    """group_m reorders M blocks for L2 reuse of weight tiles: it can matter only when an
    average expert spans more than one M block."""
    return point.rows_per_expert > block_m


def start_group(point: Point, block_m: int) -> int:
    """group_m for the tile steps: 8 (SGLang's large-M choice) where grouping matters, else 1."""
    return 8 if grouping_matters(point, block_m) else 1


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def smem_bytes(tile: TileConfig, elem_bytes: int = 2) -> int:
    """Shared memory of the software pipeline: an A and a B tile per stage."""
    return (tile.block_m * tile.block_k + tile.block_k * tile.block_n) * elem_bytes * tile.num_stages


def unfit(tile: TileConfig, point: Point, phase: str) -> str | None:
    """Why Triton cannot run `tile` for this phase's GEMM (None: it can)."""
    smem = smem_bytes(tile, point.limits.elem_bytes)
    if smem > point.limits.smem_bytes:
        return f"shared memory {smem} B > {point.limits.smem_bytes} B"
    acc = tile.block_m * tile.block_n // (32 * tile.num_warps)
    if acc > MAX_ACCUMULATORS:
        return f"{acc} fp32 accumulators per thread > {MAX_ACCUMULATORS}"
    n, k = point.gemm(phase)
    if tile.block_n > _next_pow2(n) or tile.block_k > _next_pow2(k):
        return f"tile n{tile.block_n} k{tile.block_k} exceeds the GEMM (N={n}, K={k})"
    return None


def _keep(tiles: Iterable[TileConfig], point: Point, phase: str) -> list[TileConfig]:
    """Runnable tiles, first occurrence kept, order kept."""
    seen: dict[TileConfig, None] = {}
    for t in tiles:
        if t not in seen and unfit(t, point, phase) is None:
            seen[t] = None
    return list(seen)


def steps(space: Space, point: Point, phase: str) -> tuple[str, ...]:
    """The names of the phase's steps, in order."""
    point.gemm(phase)  # validates the phase
    probe = space.local and phase == "up" and len(block_m_choices(point)) > 1
    return ("block_m", "tiles", "launch") if probe else ("tiles", "launch")


def candidates(space: Space, point: Point, phase: str, step: str, best: TileConfig) -> list[TileConfig]:
    """The tiles one step tries around the best so far (`best` itself is timed already).

    In the down phase block_m stays best.block_m (shared with the up phase)."""
    if step not in ("block_m", "tiles", "launch"):
        raise ValueError(f"unknown step {step!r}; expected block_m, tiles or launch")
    choices = block_m_choices(point)
    if phase == "down" or step == "launch":
        block_ms: tuple[int, ...] = (best.block_m,)
    elif space.local and step == "tiles" and len(choices) > 1:
        block_ms = (best.block_m,)  # chosen by the block_m step
    else:
        block_ms = choices
    if step in ("block_m", "tiles"):
        nk = PROBE_TILES if step == "block_m" else tuple(itertools.product(space.block_n, space.block_k))
        if step == "block_m" and not space.local:
            raise ValueError("the full space has no block_m step: its tiles step covers every block_m")
        tiles = (
            dataclasses.replace(best, block_m=m, block_n=n, block_k=k, group_m=start_group(point, m))
            for m in block_ms
            for n, k in nk
        )
        return _keep(tiles, point, phase)
    groups = space.group_m if grouping_matters(point, best.block_m) else (best.group_m,)
    if space.local:  # warps x stages at the best group, then the other groups at the best warps/stages
        tiles = [
            dataclasses.replace(best, num_warps=w, num_stages=s)
            for w, s in itertools.product(space.num_warps, space.num_stages)
        ]
        tiles += [dataclasses.replace(best, group_m=g) for g in groups]
    else:
        tiles = [
            dataclasses.replace(best, group_m=g, num_warps=w, num_stages=s)
            for g, w, s in itertools.product(groups, space.num_warps, space.num_stages)
        ]
    return _keep(tiles, point, phase)
