"""Scheduler-side hooks that let one unquantized MoE layer run either runner, call by call.

    model block:  TopK(hidden, logits) ------------------> FusedMoE(hidden, topk_output)
                  AROUND TopK.forward_cuda                  -> quant_method.apply
                  picks the kernel (KernelSwitch) and        AROUND UnquantizedFusedMoEMethod.forward_cuda
                  sets topk_config.output_format             triton_kernels-format output -> 2nd runner
                  for this call only                         else the stock Triton runner

The decision is taken once, in TopK; the runner follows the routing format it is handed,
so router format and runner always switch together. Weights stay in SGLang's Triton layout
(w13 [E, 2I, H], w2 [E, H, I]; the launcher pins moe_runner_backend to triton); the
triton_kernels runner reads transposed views of them (w13 [E, H, 2I], w2 [E, I, H]).

    AFTER UnquantizedFusedMoEMethod.create_moe_runner  a second MoeRunner(TRITON_KERNELS, same cfg)
    AFTER ModelRunner.load_model                       pair each TopK with its FusedMoE sibling
                                                       (`enable_for_layer`), log what was skipped

Only layers passing every check in `layer_support` become adaptive; all others (quantized
methods included) run exactly as stock.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import logging
import types
from typing import Any

import torch

from moe_dispatch.backends.base import Support
from moe_dispatch.backends.sglang_tile_override import sglang_tile_configs
from moe_dispatch.backends.tk_combine import scoped_fast_combine
from moe_dispatch.backends.tk_flags import call_with_view_flags
from moe_dispatch.backends.tk_matmul_flags import scoped_matmul_flags
from moe_dispatch.backends.tk_routing import scoped_fast_routing
from moe_dispatch.backends.triton_kernels_backend import top_k_support
from moe_dispatch.sglang_plugin import targets
from moe_dispatch.sglang_plugin.kernel_switch import SWITCH, KernelSwitch
from moe_dispatch.spec import SILU, Activation, MoESpec, Routing

logger = logging.getLogger("moe_dispatch.sglang_plugin")

_TK_RUNNER = "_moe_dispatch_tk_runner"  # attribute on UnquantizedFusedMoEMethod instances


@functools.cache
def _sgl() -> types.SimpleNamespace:
    """SGLang names the hooks use, imported once (hooks run inside SGLang, so it is loaded)."""
    from sglang.srt.layers.moe import topk as topk_module
    from sglang.srt.layers.moe.fused_moe_triton.layer import FusedMoE
    from sglang.srt.layers.moe.moe_runner.runner import MoeRunner
    from sglang.srt.layers.moe.moe_runner.triton_kernels import TritonKernelsQuantInfo
    from sglang.srt.layers.moe.token_dispatcher.standard import StandardCombineInput
    from sglang.srt.layers.moe.topk import TopK, TopKOutputChecker, TopKOutputFormat
    from sglang.srt.layers.moe.utils import MoeRunnerBackend
    from sglang.srt.layers.quantization.unquant import UnquantizedFusedMoEMethod

    return types.SimpleNamespace(
        topk_module=topk_module,
        FusedMoE=FusedMoE,
        MoeRunner=MoeRunner,
        TritonKernelsQuantInfo=TritonKernelsQuantInfo,
        TopK=TopK,
        TopKOutputChecker=TopKOutputChecker,
        StandardCombineInput=StandardCombineInput,
        MoeRunnerBackend=MoeRunnerBackend,
        UnquantizedFusedMoEMethod=UnquantizedFusedMoEMethod,
        formats={
            "triton": TopKOutputFormat.STANDARD,
            "triton_tuned": TopKOutputFormat.STANDARD,
            "small_batch": TopKOutputFormat.STANDARD,  # it reads the router logits this output carries
            "triton_kernels": TopKOutputFormat.TRITON_KERNEL,
            "triton_kernels_tuned": TopKOutputFormat.TRITON_KERNEL,
        },
    )


# --- the two runners ----------------------------------------------------------------------


def tk_quant_info(layer: torch.nn.Module) -> Any:
    """TritonKernelsQuantInfo over transposed VIEWS of the layer's Triton-layout weights (no copy)."""
    return _sgl().TritonKernelsQuantInfo(
        w13_weight=layer.w13_weight.transpose(-2, -1),  # [E, 2I, H] -> [E, H, 2I]
        w2_weight=layer.w2_weight.transpose(-2, -1),  # [E, H, I] -> [E, I, H]
        w13_bias=getattr(layer, "w13_weight_bias", None),  # [E, 2I] fp32
        w2_bias=getattr(layer, "w2_weight_bias", None),  # [E, H] fp32
    )


def extra_weight_bytes(layer: torch.nn.Module) -> int:
    """Bytes of weight tensors the triton_kernels runner reads that the layer does not already own.

    Measured, not assumed: a tensor counts unless its storage is one of the layer's parameters'.
    """
    owned = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    info = tk_quant_info(layer)
    total = 0
    for tensor in (info.w13_weight, info.w2_weight, info.w13_bias, info.w2_bias):
        if tensor is not None and tensor.untyped_storage().data_ptr() not in owned:
            total += tensor.untyped_storage().nbytes()
    return total


def _attach_tk_runner(method: Any, moe_runner_config: Any) -> None:
    sgl = _sgl()
    setattr(method, _TK_RUNNER, sgl.MoeRunner(sgl.MoeRunnerBackend.TRITON_KERNELS, moe_runner_config))


def after_create_moe_runner(result: Any, method: Any, layer: Any, moe_runner_config: Any) -> None:
    """Give each stock-Triton unquantized method a triton_kernels runner beside its own."""
    sgl = _sgl()
    if type(method) is not sgl.UnquantizedFusedMoEMethod or method.use_triton_kernels:
        return None
    if not method.runner.runner_backend.is_triton():
        return None
    _attach_tk_runner(method, moe_runner_config)
    return None


def around_unquant_forward_cuda(original: Any, method: Any, layer: Any, dispatch_output: Any) -> Any:
    """Run the triton_kernels runner when TopK routed in its format; otherwise small_batch when this
    call runs it, else the stock path (inside the tuned tile configs when the call runs triton_tuned)."""
    runner = getattr(method, _TK_RUNNER, None)
    if runner is None or not _sgl().TopKOutputChecker.format_is_triton_kernels(dispatch_output.topk_output):
        num_tokens = dispatch_output.hidden_states.shape[0]
        small = SWITCH.small_batch_kernel(method, num_tokens)
        if small is not None:
            out = run_small_batch(small, dispatch_output)
            if out is not None:
                return _sgl().StandardCombineInput(hidden_states=out)
        tuned = SWITCH.tuned_config(method, num_tokens)
        if tuned is None:
            return original(method, layer, dispatch_output)
        with sglang_tile_configs(tuned):  # read while SGLang resolves the configs: at capture, once
            return original(method, layer, dispatch_output)
    info = tk_quant_info(layer)
    num_tokens = dispatch_output.hidden_states.shape[0]
    tuned = SWITCH.tk_flags(method, num_tokens)  # triton_kernels_tuned: the table's flags per matmul
    flags = {} if tuned is None else tuned.by_gemm(layer.w2_weight.shape[-2], layer.w2_weight.shape[-1])
    combine = scoped_fast_combine() if SWITCH.runs_tk_tuned(method, num_tokens) else contextlib.nullcontext()
    with scoped_matmul_flags(flags), combine:  # read while matmul_ogs picks its flags: at capture, once
        # Small calls on views of narrow shards need the persistent kernel (moe_dispatch.backends.tk_flags).
        return call_with_view_flags(
            lambda: runner.run(dispatch_output, info),
            num_tokens,
            dispatch_output.topk_output.routing_data.n_expts_act,
            info.w13_weight,
            info.w2_weight,
        )


_warned_logits: set[str] = set()


def run_small_batch(kernel: Any, dispatch_output: Any) -> torch.Tensor | None:
    """small_batch on the call's hidden states and router logits; None (the caller runs the stock
    path, logged once) when the top-k output carries no logits of the kernel's dtype."""
    logits = getattr(dispatch_output.topk_output, "router_logits", None)
    hidden = dispatch_output.hidden_states
    if logits is None or logits.dtype != hidden.dtype or logits.dim() != 2:
        why = "no router logits" if logits is None else f"router logits {logits.dtype} {tuple(logits.shape)}"
        if why not in _warned_logits:
            _warned_logits.add(why)
            logger.warning(
                "adaptive MoE: small_batch needs %s router logits [T, E], got %s; ran Triton", hidden.dtype, why
            )
        return None
    return kernel(hidden, logits)


def around_topk_forward_cuda(
    original: Any, topk: Any, hidden_states: torch.Tensor, router_logits: torch.Tensor, **kwargs: Any
) -> Any:
    """Adaptive TopKs route in the format of the kernel chosen for this call (for triton_kernels_tuned
    with moe-dispatch's fused routing metadata); others run stock."""
    if not SWITCH.is_adaptive(topk):
        return original(topk, hidden_states, router_logits, **kwargs)
    num_tokens = hidden_states.shape[0]
    config = topk.topk_config
    previous = config.output_format
    config.output_format = _sgl().formats[SWITCH.kernel_for(num_tokens)]
    fused = scoped_fast_routing() if SWITCH.routes_tk_tuned(num_tokens) else contextlib.nullcontext()
    try:
        with fused:
            return original(topk, hidden_states, router_logits, **kwargs)
    finally:
        config.output_format = previous  # one forward thread: set/restore around the call is enough


# --- which layers become adaptive ----------------------------------------------------------


def layer_support(topk: Any, fused_moe: Any) -> Support:
    """Whether this TopK/FusedMoE pair can switch runners with identical results; why not if not."""
    sgl = _sgl()
    if not isinstance(topk, sgl.TopK):
        return Support.no(f"router is {type(topk).__name__}, not SGLang's TopK")
    if type(fused_moe) is not sgl.FusedMoE:
        return Support.no(f"MoE layer class {type(fused_moe).__name__} (only plain FusedMoE)")
    method = fused_moe.quant_method
    if type(method) is not sgl.UnquantizedFusedMoEMethod:
        return Support.no(f"quantized MoE method {type(method).__name__}")
    if method.use_triton_kernels or not method.runner.runner_backend.is_triton():
        return Support.no(f"runner backend {method.runner.runner_backend.value} (needs triton)")
    if getattr(method, "_aiter_runner", None) is not None:
        return Support.no("aiter runner active")
    if getattr(sgl.topk_module, "routing", None) is None:
        return Support.no("triton_kernels routing unavailable (triton_kernels did not import)")
    if fused_moe.moe_ep_size != 1:
        return Support.no(f"moe_ep_size={fused_moe.moe_ep_size} (needs 1)")
    if fused_moe.w13_weight.dtype != torch.bfloat16:
        return Support.no(f"weights in {fused_moe.w13_weight.dtype} (triton_kernels runner is bf16-only)")
    if tuple(fused_moe.w13_weight.shape[1:]) != (2 * fused_moe.intermediate_size_per_partition, fused_moe.hidden_size):
        return Support.no(f"w13 shape {tuple(fused_moe.w13_weight.shape)} is not the Triton layout [E, 2I, H]")
    cfg = fused_moe.moe_runner_config
    for name, ok in (
        ("activation", cfg.activation == "silu"),
        ("is_gated", cfg.is_gated),
        ("apply_router_weight_on_input", not cfg.apply_router_weight_on_input),
        ("no_combine", not cfg.no_combine),
        ("num_fused_shared_experts", not cfg.num_fused_shared_experts),
        ("routed_scaling_factor", cfg.routed_scaling_factor in (None, 1.0)),
        ("swiglu_limit", cfg.swiglu_limit is None),
    ):
        if not ok:
            return Support.no(f"MoeRunnerConfig.{name}={getattr(cfg, name)!r} unsupported by the triton_kernels runner")
    swiglu = cfg.gemm1_alpha is not None
    # With biases triton_kernels applies interleaved GPT-OSS SwiGLU, without them split SiLU.
    if fused_moe.with_bias and not (swiglu and cfg.gemm1_clamp_limit is not None and cfg.gate_up_interleaved):
        return Support.no("biases without interleaved SwiGLU(alpha, limit)")
    if not fused_moe.with_bias and (swiglu or cfg.gemm1_clamp_limit is not None):
        return Support.no("SwiGLU without biases (triton_kernels applies SiLU there)")
    tc = topk.topk_config
    for name, ok in (
        ("use_grouped_topk", not tc.use_grouped_topk),
        ("correction_bias", tc.correction_bias is None),
        ("custom_routing_function", tc.custom_routing_function is None),
        ("num_fused_shared_experts", not tc.num_fused_shared_experts),
        ("output_format", tc.output_format is None),
        ("scoring_func", tc.scoring_func == "softmax"),
        ("routed_scaling_factor", tc.routed_scaling_factor in (None, 1.0)),
    ):
        if not ok:
            return Support.no(f"TopKConfig.{name}={getattr(tc, name)!r} unsupported by triton_kernels routing")
    answer = top_k_support(int(tc.top_k))  # triton_kernels routing compiles only power-of-2 top-k
    if not answer:
        return answer
    if getattr(topk, "enable_waterfill", False):
        return Support.no("waterfill TopK")
    if fused_moe.top_k is not None and fused_moe.top_k != tc.top_k:
        return Support.no(f"FusedMoE.top_k={fused_moe.top_k} differs from TopK top_k={tc.top_k}")
    return Support.yes()


def spec_from_layer(topk: Any, fused_moe: Any) -> MoESpec:
    """The MoESpec (per rank) of an adaptive pair; keys the plan file."""
    cfg = fused_moe.moe_runner_config
    if cfg.gemm1_alpha is not None:
        activation = Activation("swiglu", alpha=float(cfg.gemm1_alpha), limit=float(cfg.gemm1_clamp_limit))
        routing = Routing.TOPK_SOFTMAX if topk.topk_config.renormalize else Routing.SOFTMAX_TOPK
    else:
        activation = SILU
        routing = Routing.SOFTMAX_TOPK_RENORM if topk.topk_config.renormalize else Routing.SOFTMAX_TOPK
    return MoESpec(
        num_experts=int(fused_moe.num_local_experts),
        top_k=int(topk.topk_config.top_k),
        hidden_size=int(fused_moe.hidden_size),
        intermediate_size=int(fused_moe.intermediate_size_per_partition),
        activation=activation,
        bias=bool(fused_moe.with_bias),
        dtype=fused_moe.w13_weight.dtype,
        routing=routing,
        name="sglang-moe-layer",
    )


def enable_for_layer(topk: Any, fused_moe: Any, switch: KernelSwitch = SWITCH) -> Support:
    """Make this TopK/FusedMoE pair adaptive if `layer_support` allows; returns that answer.

    Works on hand-built layers too (tests): the second runner is attached here when the layer
    was built before the create_moe_runner hook was active.
    """
    support = layer_support(topk, fused_moe)
    if not support:
        return support
    method = fused_moe.quant_method
    if getattr(method, _TK_RUNNER, None) is None:
        _attach_tk_runner(method, fused_moe.moe_runner_config)
    switch.add_topk(topk)
    if switch.first_spec is None:
        switch.first_spec = spec_from_layer(topk, fused_moe)
    return support


@dataclasses.dataclass(frozen=True)
class PairingReport:
    """What `enable_model` did: adaptive layer count, skipped layers by reason, extra weight bytes,
    and the adaptive (TopK, FusedMoE) pairs in model order."""

    adaptive: int
    skipped: dict[str, int]
    extra_bytes: int
    pairs: tuple[tuple[Any, Any], ...] = ()

    def log_lines(self) -> list[str]:
        lines = [
            f"adaptive MoE: {self.adaptive} MoE layer(s) switch between triton and triton_kernels; "
            f"extra weight memory {self.extra_bytes} bytes per GPU "
            "(triton_kernels reads transposed views of the Triton weights)"
        ]
        for reason, count in sorted(self.skipped.items()):
            lines.append(f"adaptive MoE: {count} MoE layer(s) left untouched: {reason}")
        return lines


def _partner(fused_moe: Any, topks: list[Any]) -> Any:
    if len(topks) == 1:
        return topks[0]
    same = [t for t in topks if t.layer_id is not None and t.layer_id == fused_moe.layer_id]
    return same[0] if len(same) == 1 else None


def enable_model(model: torch.nn.Module, switch: KernelSwitch = SWITCH) -> PairingReport:
    """Pair every FusedMoE with its TopK sibling (the model's MoE block owns both) and enable it."""
    sgl = _sgl()
    adaptive, extra = 0, 0
    pairs: list[tuple[Any, Any]] = []
    skipped: collections.Counter[str] = collections.Counter()
    for _name, module in model.named_modules():
        children = [child for _n, child in module.named_children()]
        moes = [c for c in children if isinstance(c, sgl.FusedMoE)]
        if not moes:
            continue
        topks = [c for c in children if isinstance(c, sgl.TopK)]
        for moe in moes:
            topk = _partner(moe, topks)
            if topk is None:
                skipped["no unique TopK sibling in the MoE block"] += 1
                continue
            support = enable_for_layer(topk, moe, switch)
            if support:
                adaptive += 1
                extra += extra_weight_bytes(moe)
                pairs.append((topk, moe))
            else:
                skipped[support.reason] += 1
    return PairingReport(adaptive, dict(skipped), extra, tuple(pairs))


def after_load_model(result: Any, model_runner: Any) -> None:
    if getattr(model_runner, "is_draft_worker", False):
        return None  # draft models keep their own (speculative) runner backend untouched
    report = enable_model(model_runner.model)
    model_runner._moe_dispatch_pairing = report
    # The start-up probe times layers of the spec that keys the plan (a model's MoE layers share it).
    model_runner._moe_dispatch_pairs = [p for p in report.pairs if spec_from_layer(*p) == SWITCH.first_spec]
    if getattr(model_runner, "tp_rank", 0) == 0:
        for line in report.log_lines():
            logger.info(line)
    return None


def register() -> None:
    targets.register_hook(targets.CREATE_MOE_RUNNER, after_create_moe_runner, "AFTER")
    targets.register_hook(targets.UNQUANT_FORWARD, around_unquant_forward_cuda, "AROUND")
    targets.register_hook(targets.TOPK_FORWARD, around_topk_forward_cuda, "AROUND")
    targets.register_hook(targets.LOAD_MODEL, after_load_model, "AFTER")
