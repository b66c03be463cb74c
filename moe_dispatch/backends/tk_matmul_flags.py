"""Chosen opt flags per matmul for triton_kernels' matmul_ogs (what `bench.tk_flags_probe` sweeps).

triton_kernels picks one `OptFlags` per matmul_ogs call from its heuristics
(matmul_ogs_details/opt_flags.py, make_default_opt_flags_nvidia in the Triton 3.6 copy).
Its two knobs do not reach what a tuner needs:
- constraints (`update_opt_flags_constraints`) accept block_m, block_k, split_k,
  is_persistent, epilogue_subtile, num_stages and idle_sms, not block_n or num_warps;
- both constraints and the manual override (`set_opt_flags`) apply one setting to every
  matmul of a call, and an MoE call runs two GEMMs of different shapes:
      up:   w13 [E, H, 2I] -> N = 2I, K = H
      down: w2  [E, I, H]  -> N = H,  K = I

`scoped_matmul_flags({(n, k): MatmulFlags})` wraps `triton_kernels.matmul_ogs.make_opt_flags`
inside the block: a matmul whose (N, K) has an entry gets triton_kernels' own flags with that
entry's six tile fields replaced, and split_k where the entry sets one and triton_kernels allows
a split for that call (group_m, swizzle, epilogue and the rest stay its own); every other
matmul is untouched. A split-K up matmul hands its fused activation to the reduce over the
slices, which `tk_combine` takes: the cheaper that reduce, the more a larger split can pay.
Under CUDA-graph capture the flags are read once, at capture.
Like triton_kernels' constraints this is a module global for the duration of the block: safe
for one thread issuing MoE calls, not for two threads launching matmul_ogs at once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import re
from collections.abc import Iterator, Mapping

from moe_dispatch.backends.global_swap import swapped_global
from moe_dispatch.table_files import is_int, is_power_of_two

FIELDS = ("is_persistent", "block_m", "block_n", "block_k", "num_warps", "num_stages")
_LABEL = re.compile(r"(P|NP)-m(\d+)n(\d+)k(\d+)w(\d+)s(\d+)(?:-split(\d+))?")


@dataclasses.dataclass(frozen=True)
class MatmulFlags:
    """The opt flags of one matmul_ogs GEMM that the tuner varies (split_k None: its own)."""

    is_persistent: bool
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    split_k: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.is_persistent, bool):
            raise ValueError(f"is_persistent must be a bool, got {self.is_persistent!r}")
        for name in ("block_m", "block_n", "block_k", "num_warps"):
            if not is_power_of_two(getattr(self, name)):
                raise ValueError(f"{name} must be a positive power of 2, got {getattr(self, name)!r}")
        if self.block_m < 16 or self.block_m > 128:
            raise ValueError(
                f"block_m must be 16..128 (the routing block sizes triton_kernels prepares), got {self.block_m}"
            )
        if self.num_warps > 16:
            raise ValueError(f"num_warps must be <= 16, got {self.num_warps}")
        counts = {"num_stages": self.num_stages} | ({} if self.split_k is None else {"split_k": self.split_k})
        for name, value in counts.items():
            if not (is_int(value) and value >= 1):
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")

    @staticmethod
    def of(flags: object) -> MatmulFlags:
        """The six tile fields of triton_kernels' OptFlags, or of a mapping with them (a recorded
        call); split_k None."""
        if isinstance(flags, Mapping):
            return MatmulFlags(*(flags[name] for name in FIELDS))
        return MatmulFlags(*(getattr(flags, name) for name in FIELDS))

    def label(self) -> str:
        """'P-m16n256k64w4s6' (P: persistent, NP: not), then '-split8' where split_k is set."""
        kind = "P" if self.is_persistent else "NP"
        split = "" if self.split_k is None else f"-split{self.split_k}"
        return f"{kind}-m{self.block_m}n{self.block_n}k{self.block_k}w{self.num_warps}s{self.num_stages}{split}"

    @staticmethod
    def from_label(label: object) -> MatmulFlags:
        match = _LABEL.fullmatch(label) if isinstance(label, str) else None
        if match is None:
            raise ValueError(
                f"{label!r} is not a matmul flags label like 'P-m16n256k64w4s6' or 'P-m16n256k64w4s6-split4'"
            )
        kind, *numbers, split = match.groups()
        return MatmulFlags(kind == "P", *map(int, numbers), split_k=None if split is None else int(split))

    def replace_in(self, opt_flags: object, can_split: bool = True) -> object:
        """triton_kernels' OptFlags with the six tile fields replaced, and split_k where set and
        `can_split` (a dataclass copy)."""
        fields = {name: getattr(self, name) for name in FIELDS}
        if self.split_k is not None and can_split:
            fields["split_k"] = self.split_k
        return dataclasses.replace(opt_flags, **fields)


def gemm_keys(hidden_size: int, intermediate_size: int) -> dict[str, tuple[int, int]]:
    """{"up": (N, K), "down": (N, K)} of an MoE layer's two matmul_ogs calls."""
    return {"up": (2 * intermediate_size, hidden_size), "down": (hidden_size, intermediate_size)}


@functools.cache
def matmul_ogs_module(global_name: str) -> object | None:
    """triton_kernels.matmul_ogs when that generation (Triton 3.6) is installed and calls the
    module-level function `global_name` (what a scoped swap replaces), else None."""
    try:
        import triton_kernels.matmul_ogs as module
    except Exception:  # absent, broken, or the triton_kernels.matmul generation
        return None
    return module if callable(getattr(module, global_name, None)) else None


@functools.lru_cache(maxsize=8)  # scoped_matmul_flags runs per eager MoE call: read each function once
def _arguments_of(installed) -> inspect.Signature:
    """The parameters (m, n, k, ...) of the make_opt_flags in place, through any functools.wraps
    wrapper; for a bare (*args, **kwargs) wrapper, those of triton_kernels' own definition."""
    signature = inspect.signature(inspect.unwrap(installed))
    if {"n", "k"} <= set(signature.parameters):
        return signature
    try:
        from triton_kernels.matmul_ogs_details.opt_flags import make_opt_flags
    except Exception:
        make_opt_flags = None
    if make_opt_flags is None or not {"n", "k"} <= set(inspect.signature(make_opt_flags).parameters):
        raise RuntimeError(f"cannot tell the GEMM's n and k from make_opt_flags{signature}: refusing to steer blindly")
    return inspect.signature(make_opt_flags)


def _steering(original, flags_by_gemm: Mapping[tuple[int, int], MatmulFlags]):
    signature = _arguments_of(original)

    def steered(*args, **kwargs):
        flags = original(*args, **kwargs)
        bound = signature.bind(*args, **kwargs).arguments
        chosen = flags_by_gemm.get((bound.get("n"), bound.get("k")))
        if chosen is None or bound.get("block_k") is not None:  # not ours, or a fixed inner block_k
            return flags
        if chosen.is_persistent and not bound.get("can_use_persistent_tma", True):
            return flags  # the operands cannot take TMA: keep triton_kernels' choice
        return chosen.replace_in(flags, can_split=bound.get("can_use_split_k", True))

    return steered


@contextlib.contextmanager
def scoped_matmul_flags(flags_by_gemm: Mapping[tuple[int, int], MatmulFlags], module: object = None) -> Iterator[bool]:
    """Inside the block, matmul_ogs GEMMs with an (N, K) in `flags_by_gemm` run those flags.

    Yields whether the steering is in place (not when the mapping is empty or the
    matmul_ogs generation is not installed). `module`: the matmul_ogs module (tests).
    """
    module = module if module is not None else matmul_ogs_module("make_opt_flags")
    steer = functools.partial(_steering, flags_by_gemm=dict(flags_by_gemm))
    with swapped_global(module if flags_by_gemm else None, "make_opt_flags", steer) as installed:
        yield installed is not None
