"""`flashinfer_cutlass`: FlashInfer's `cutlass_fused_moe` (TensorRT-LLM's CUTLASS MoE kernels).

One call, all of it inside one CUDA graph when captured:

    router_logits [T, E] --router--> topk_weights [T, k] fp32, topk_ids [T, k]
        --kernel_routing--> token_final_scales fp32, token_selected_experts int32 (contiguous)
        --flashinfer.fused_moe.cutlass_fused_moe--> out [T, H]
          (permute, grouped GEMM1, bias + gated activation, grouped GEMM2, bias, weighted combine)

The router is SGLang's `TopK` with the STANDARD format (what the `triton` backend runs) when
SGLang runs here, otherwise moe_dispatch's torch router (`router="torch"` forces it).

Interface facts this module relies on (flashinfer-python 0.6.15.post1, the version SGLang 0.5.17
pins; paths inside that wheel):
* flashinfer/fused_moe/core.py `cutlass_fused_moe(input, token_selected_experts,
  token_final_scales, fc1_expert_weights, fc2_expert_weights, output_dtype, quant_scales,
  fc1_expert_biases, fc2_expert_biases, ..., swiglu_alpha, swiglu_beta, swiglu_limit, tp_size,
  tp_rank, ..., output, ..., min_latency_mode, ..., tune_max_num_tokens, enable_pdl,
  activation_type)`. `min_latency_mode=True` raises NotImplementedError there on every GPU, so
  it is not offered. The first call JIT-compiles the module: on SM90 the bf16-only
  `fused_moe_90_bf16` (moe_dispatch.backends.flashinfer_slim) unless FlashInfer's full
  `fused_moe_90` is built or asked for (`module_choice`; bench/flashinfer_gpu.sh for the cache).
* data/csrc/fused_moe/cutlass_backend/flashinfer_cutlass_fused_moe_binding.cu `runMoe`: expert
  ids int32 and scales fp32, [T, k]; fc1 [E, 2I, H] and fc2 [E, H, I] in the activation dtype,
  read through raw pointers (no strides); biases [E, 2I] and [E, H] in the *output* dtype
  (our biases are fp32); H and I multiples of 8 (128-bit TMA rows); swiglu_alpha/beta/limit
  fp32 [E] each, and any of them turns Swiglu into SwigluBias. The workspace is allocated per
  call through tvm-ffi's environment allocator (torch's caching allocator), so a captured call
  takes it from the graph's pool; the Python path has no host sync (the autotuner lookup is a
  host-side cache hit or the fallback tactic).
* data/csrc/fused_moe/cutlass_backend/cutlass_fused_moe_kernels.cuh, gated activations: fc1
  output columns [0, I) are the linear ("up") half and [I, 2I) the gate, i.e. fc1 rows are
  [up; gate]. Swiglu = silu(g) * u; SwigluBias = min(g, l) * sigmoid(a * min(g, l)) *
  (clamp(u, -l, l) + beta): GPT-OSS with beta = 1. The fc2 bias is added on tp_rank 0 only;
  our spec is one shard whose reference adds b2, so tp_size=1, tp_rank=0.

Weights: ours are w13 [E, 2I, H] with rows [gate; up] (SiLU) or interleaved [g0, u0, g1, ...]
(GPT-OSS), w2 [E, H, I]. w2 is used as is; w13 is copied once into [up; gate] halves
(`to_up_gate_halves`), biases into the weight dtype (b13 re-ordered the same way), plus three
fp32 [E] SwiGLU vectors; `extra_bytes` counts all of it.

`autotune=True` (default) runs FlashInfer's autotuner once in prepare, outside any capture: it
profiles the GEMM tactics at its 21 token buckets up to `TUNE_MAX_NUM_TOKENS`; `False` keeps
TensorRT-LLM's heuristic tactic.

Not offered: fp32 (the 16-bit kernels are what we compare; fp32 is untested here); top_k > 8 (the
kernel's fused routing sort is specialized up to 8, our case list stops there). No
`flashinfer_cutedsl` backend: `cute_dsl_fused_moe_bf16` (CuTe-DSL SM90 bf16 MoE) is not in
flashinfer-python 0.6.15.post1 (flashinfer/fused_moe/cute_dsl/ there has only the NVFP4
Blackwell MoE; the SM90 bf16 one came later upstream) and would also need nvidia-cutlass-dsl.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import os
import time
from collections.abc import Callable, Mapping

import torch

from moe_dispatch.backends.base import KernelBackend, PreparedKernel, Support
from moe_dispatch.backends.flashinfer_slim import SLIM_NAME as SLIM_MODULE_NAME
from moe_dispatch.spec import MoESpec
from moe_dispatch.weights import ExpertWeights

PINNED_VERSION = "0.6.15.post1"
MIN_CAPABILITY = (9, 0)
MAX_TOP_K = 8
ALIGNMENT = 8  # elements of a 16-bit dtype in 128 bits: TMA row alignment of H and I
TUNE_MAX_NUM_TOKENS = 8192
ROUTERS = ("auto", "sglang", "torch")
DTYPES = (torch.bfloat16, torch.float16)
# our activation kind -> FlashInfer ActivationType member (SwigluBias is selected by swiglu_* tensors)
ACTIVATIONS = {"silu": "Swiglu", "swiglu": "Swiglu"}

Router = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def environment_support(installed: bool, capability: tuple[int, int] | None, device: str = "") -> Support:
    """The availability rule, from facts gathered elsewhere (pure, so CPU-testable)."""
    if not installed:
        return Support.no(
            f"flashinfer is not installed (pip install 'moe-dispatch[flashinfer]': flashinfer-python=={PINNED_VERSION})"
        )
    if capability is None:
        return Support.no("no CUDA GPU (torch.cuda.is_available() is False)")
    if tuple(capability) < MIN_CAPABILITY:
        major, minor = capability
        return Support.no(
            f"FlashInfer's CUTLASS MoE here needs compute capability 9.0+ (Hopper or newer); "
            f"found {device or 'a GPU'} with {major}.{minor}"
        )
    return Support.yes()


@functools.cache
def flashinfer_support() -> Support:
    """Whether `flashinfer.fused_moe` runs here, with the reason (package, GPU) if not."""
    installed = importlib.util.find_spec("flashinfer") is not None
    capability, device = None, ""
    if installed and torch.cuda.is_available():
        capability, device = torch.cuda.get_device_capability(), torch.cuda.get_device_name()
    answer = environment_support(installed, capability, device)
    if answer:
        try:
            import flashinfer.fused_moe  # noqa: F401
        except Exception as error:  # a broken install must not break moe_dispatch
            return Support.no(f"flashinfer.fused_moe failed to import: {type(error).__name__}: {error}")
    return answer


def flashinfer_version() -> str | None:
    try:
        from importlib.metadata import version

        return version("flashinfer-python")
    except Exception:
        return None


MODULE_ENV = "MOE_DISPATCH_FLASHINFER_MODULE"
MODULES = ("slim", "full")


def module_choice(full_built: bool, environ: Mapping[str, str]) -> str:
    """Which SM90 module the backend loads: `MOE_DISPATCH_FLASHINFER_MODULE` (slim or full) when set,
    else FlashInfer's full module once it is built, else the bf16-only one
    (moe_dispatch.backends.flashinfer_slim: about a sixth of the build)."""
    asked = environ.get(MODULE_ENV, "").strip()
    if asked:
        if asked not in MODULES:
            raise ValueError(f"{MODULE_ENV}={asked!r}; expected one of {MODULES}")
        return asked
    return "full" if full_built else "slim"


@functools.cache
def sm90_specs() -> dict[str, object]:
    """FlashInfer's SM90 MoE JitSpecs by module choice (running its kernel generator once)."""
    from flashinfer.jit.fused_moe import gen_cutlass_fused_moe_sm90_module

    from moe_dispatch.backends.flashinfer_slim import slim_spec

    full = gen_cutlass_fused_moe_sm90_module()
    return {"full": full, "slim": slim_spec(full)}


def sm90_module() -> str | None:
    """The module choice on a Hopper GPU with FlashInfer installed; None elsewhere."""
    if not flashinfer_support() or torch.cuda.get_device_capability() != (9, 0):
        return None
    return module_choice(sm90_specs()["full"].is_compiled, os.environ)


def module_built() -> bool | None:
    """Whether the SM90 module the backend loads (`sm90_module`) is built (JIT cache or AOT) already.

    None where that cannot be told cheaply (other GPUs). Building it is FlashInfer's JIT at the
    first call: ~180 CUDA translation units for the full module, tens of minutes of nvcc
    (bench/flashinfer_gpu.sh); 32 for the bf16 one (`python -m moe_dispatch.backends.flashinfer_slim`).
    """
    choice = sm90_module()
    return None if choice is None else sm90_specs()[choice].is_compiled


BUILD_ENV = "MOE_DISPATCH_FLASHINFER_BUILD"


def build_gate(built: bool | None, environ: Mapping[str, str]) -> Support:
    """Not a candidate while its module is unbuilt, unless the user opts in to the long first build.

    A default candidate list (AdaptiveMoE, `make bench`) must not start tens of minutes of nvcc
    on its own; `MOE_DISPATCH_FLASHINFER_BUILD=1` lets the first call build it.
    """
    if built is False and environ.get(BUILD_ENV, "").strip() != "1":
        return Support.no(
            "FlashInfer's CUTLASS MoE module is not built yet: build the bf16 one with "
            "`python -m moe_dispatch.backends.flashinfer_slim` (32 CUDA files), or set "
            f"{BUILD_ENV}=1 to let the first call build it"
        )
    return Support.yes()


def spec_support(spec: MoESpec) -> Support:
    """Which specs this backend computes, with the reason for the rest."""
    if spec.dtype not in DTYPES:
        return Support.no(f"FlashInfer's CUTLASS MoE is offered for bf16/fp16 here, not {spec.dtype}")
    if spec.activation.kind not in ACTIVATIONS:
        return Support.no(f"activation {spec.activation.describe()} has no FlashInfer CUTLASS form")
    if not 1 <= spec.top_k <= MAX_TOP_K:
        return Support.no(f"top_k={spec.top_k} is outside 1..{MAX_TOP_K}, the range this backend offers")
    for field in ("hidden_size", "intermediate_size"):
        value = getattr(spec, field)
        if value % ALIGNMENT:
            return Support.no(f"{field}={value} is not a multiple of {ALIGNMENT} (the kernel's TMA row alignment)")
    return Support.yes()


def to_up_gate_halves(t: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """Our gate/up rows along dim 1 -> FlashInfer's [up (I); gate (I)] halves, as a new tensor.

    t: [E, 2I, ...] (w13 [E, 2I, H] or b13 [E, 2I]); rows [gate; up], or [g0, u0, g1, u1, ...]
    when `interleaved` (GPT-OSS). Returns a contiguous [E, 2I, ...] of t's dtype and device.
    """
    if t.dim() < 2 or t.shape[1] % 2:
        raise ValueError(f"expected [E, 2I, ...] with an even dim 1, got shape {tuple(t.shape)}")
    if interleaved:
        gate, up = t[:, 0::2], t[:, 1::2]
    else:
        gate, up = t.chunk(2, dim=1)
    return torch.cat((up, gate), dim=1)


def kernel_routing(topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Router output -> (token_selected_experts int32 [T, k], token_final_scales fp32 [T, k]), contiguous.

    A no-op (no copy) when the router already gives int32 ids and fp32 weights, as SGLang's does.
    """
    if topk_ids.dim() != 2 or topk_ids.shape != topk_weights.shape:
        raise ValueError(
            f"topk_ids {tuple(topk_ids.shape)} and topk_weights {tuple(topk_weights.shape)} must both be [T, k]"
        )
    if topk_ids.dtype.is_floating_point or topk_ids.dtype == torch.bool:
        raise TypeError(f"topk_ids must hold integer expert ids, got {topk_ids.dtype}")
    return topk_ids.to(torch.int32).contiguous(), topk_weights.to(torch.float32).contiguous()


def make_router(spec: MoESpec, router: str = "auto") -> tuple[str, Router]:
    """(name, fn): fn(hidden_states [T, H], router_logits [T, E]) -> (topk_weights, topk_ids)."""
    if router not in ROUTERS:
        raise ValueError(f"router must be one of {ROUTERS}, got {router!r}")
    if router == "auto":
        from moe_dispatch.backends.sglang_env import sglang_support

        router = "sglang" if sglang_support() else "torch"
    if router == "torch":
        from moe_dispatch.reference import route

        return "torch", lambda hidden, logits: route(logits, spec.top_k, spec.routing)

    from moe_dispatch.backends.sglang_env import ensure_sglang_state

    ensure_sglang_state()
    from sglang.srt.layers.moe.topk import TopK, TopKOutputFormat

    topk = TopK(top_k=spec.top_k, renormalize=spec.routing.renormalize, output_format=TopKOutputFormat.STANDARD)

    def sglang_route(hidden: torch.Tensor, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = topk(hidden, logits)
        return out.topk_weights, out.topk_ids

    return "sglang", sglang_route


@dataclasses.dataclass(frozen=True)
class KernelWeights:
    """What cutlass_fused_moe reads, derived once from ExpertWeights (see `kernel_weights`)."""

    fc1: torch.Tensor  # [E, 2I, H] rows [up; gate], a copy
    fc2: torch.Tensor  # [E, H, I], ExpertWeights.w2 itself when contiguous
    fc1_bias: torch.Tensor | None  # [E, 2I] in the weight dtype, [up; gate]
    fc2_bias: torch.Tensor | None  # [E, H] in the weight dtype
    swiglu: dict[str, torch.Tensor]  # swiglu_alpha/beta/limit fp32 [E] (GPT-OSS SwiGLU), else empty
    extra_bytes: int  # memory allocated beyond ExpertWeights


def kernel_weights(spec: MoESpec, weights: ExpertWeights) -> KernelWeights:
    """Our canonical weights -> the layout and dtypes FlashInfer's kernel reads (pure torch, any device)."""
    interleaved = spec.activation.gate_up_interleaved
    fc1 = to_up_gate_halves(weights.w13, interleaved)
    fc2 = weights.w2.contiguous()
    fresh = [fc1] + ([fc2] if fc2 is not weights.w2 else [])
    b1 = b2 = None
    if spec.bias:
        b1 = to_up_gate_halves(weights.b13, interleaved).to(spec.dtype)
        b2 = weights.b2.to(spec.dtype).contiguous()
        fresh += [b1, b2]
    swiglu: dict[str, torch.Tensor] = {}
    if spec.activation.kind == "swiglu":
        act = spec.activation
        for key, value in (("swiglu_alpha", act.alpha), ("swiglu_beta", 1.0), ("swiglu_limit", act.limit)):
            swiglu[key] = torch.full((spec.num_experts,), float(value), dtype=torch.float32, device=weights.device)
        fresh += list(swiglu.values())
    return KernelWeights(fc1, fc2, b1, b2, swiglu, sum(t.nbytes for t in fresh))


class FlashInferCutlassKernel(PreparedKernel):
    """FlashInfer's cutlass_fused_moe bound to one spec, with its [up; gate] copy of w13."""

    name = "flashinfer_cutlass"

    def __init__(self, spec: MoESpec, weights: ExpertWeights, router: str = "auto", autotune: bool = True) -> None:
        from flashinfer.fused_moe import ActivationType, cutlass_fused_moe

        kw = kernel_weights(spec, weights)
        super().__init__(spec, weights, kw.extra_bytes)
        self.router, self._route = make_router(spec, router)
        self._moe = functools.partial(
            cutlass_fused_moe,
            fc1_expert_weights=kw.fc1,
            fc2_expert_weights=kw.fc2,
            output_dtype=spec.dtype,
            quant_scales=None,
            fc1_expert_biases=kw.fc1_bias,
            fc2_expert_biases=kw.fc2_bias,
            tp_size=1,
            tp_rank=0,
            tune_max_num_tokens=TUNE_MAX_NUM_TOKENS,
            activation_type=getattr(ActivationType, ACTIVATIONS[spec.activation.kind]),
            **kw.swiglu,
        )
        self.tune_seconds: float | None = self.tune() if autotune else None

    def tune(self, num_tokens: int = 8) -> float:
        """Run FlashInfer's autotuner over this kernel's GEMM tactics (eager, outside capture); seconds."""
        from flashinfer import autotune

        gen = torch.Generator(device=self.weights.device).manual_seed(0)
        x = torch.randn(num_tokens, self.spec.hidden_size, generator=gen, device=self.weights.device)
        logits = torch.randn(num_tokens, self.spec.num_experts, generator=gen, device=self.weights.device)
        start = time.perf_counter()
        with autotune(True):
            self.forward(x.to(self.spec.dtype), logits.to(self.spec.dtype))
        torch.cuda.synchronize()
        return time.perf_counter() - start

    def forward(self, hidden_states: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        topk_weights, topk_ids = self._route(hidden_states, router_logits)
        selected, scales = kernel_routing(topk_weights, topk_ids)
        out = torch.empty_like(hidden_states)  # [T, H]; the kernel writes every row
        self._moe(input=hidden_states, token_selected_experts=selected, token_final_scales=scales, output=out)
        return out


class FlashInferCutlassBackend(KernelBackend):
    name = "flashinfer_cutlass"

    def __init__(self, router: str = "auto", autotune: bool = True) -> None:
        if router not in ROUTERS:
            raise ValueError(f"router must be one of {ROUTERS}, got {router!r}")
        self.router = router
        self.autotune = autotune

    def availability(self) -> Support:
        answer = flashinfer_support()
        return build_gate(module_built(), os.environ) if answer else answer

    def supports(self, spec: MoESpec) -> Support:
        answer = spec_support(spec)
        if answer and spec.dtype != torch.bfloat16 and sm90_module() == "slim":
            return Support.no(
                f"the bf16-only FlashInfer module {SLIM_MODULE_NAME} is the one in use, not {spec.dtype}: "
                f"build FlashInfer's full module and set {MODULE_ENV}=full"
            )
        return answer

    def _prepare(self, spec: MoESpec, weights: ExpertWeights) -> PreparedKernel:
        if sm90_module() == "slim":
            from moe_dispatch.backends.flashinfer_slim import install

            install()
        return FlashInferCutlassKernel(spec, weights, self.router, self.autotune)
