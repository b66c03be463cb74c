"""The SGLang plugin's start-up log for a GPT-OSS-120B-shaped layer stack, without a model.

    python -m bench.plugin_startup [--tp 2 --layers 4]

Builds `--layers` GPT-OSS-120B MoE layers (one tensor-parallel shard's experts, random
weights, a linear router each, residual adds between them) from SGLang's own TopK and
FusedMoE with the plugin's hooks applied, then captures the stack's forward through
SGLang's real FullCudaGraphBackend at SGLang's default decode batch sizes, as the
decode runner does (largest first, one static input buffer), with the plugin's
multi-kernel capture: both kernels per size, replays timed, the faster kept. Prints
the plugin's start-up table, capture-time overhead and extra weight bytes.
"""

from __future__ import annotations

import argparse
import functools
import sys
from types import SimpleNamespace

import torch


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.plugin_startup")
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--replays", type=int, default=20)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench.plugin_startup needs a CUDA GPU and SGLang", file=sys.stderr)
        return 1

    from sglang.srt.distributed.parallel_state import get_tp_group
    from sglang.srt.model_executor.runner.shape_key import ShapeKey
    from sglang.srt.model_executor.runner_backend.full_cuda_graph_backend import FullCudaGraphBackend
    from sglang.srt.plugins.hook_registry import HookRegistry

    from graphs import DEFAULT_BUCKETS
    from moe_dispatch import ExpertWeights, preset, random_inputs
    from moe_dispatch.sglang_plugin import decode_capture, layer_hooks, standalone
    from moe_dispatch.sglang_plugin.decode_capture import MultiKernelCapture, format_report
    from moe_dispatch.sglang_plugin.kernel_switch import SWITCH
    from moe_dispatch.sglang_plugin.settings import AdaptiveMoESettings

    spec = preset("gpt-oss-120b", tp=args.tp)
    standalone.init_single_rank()
    SWITCH.configure(AdaptiveMoESettings(enabled=True))
    layer_hooks.register()
    decode_capture.register()
    HookRegistry.apply_hooks()  # before the layers are built: their forwards bind at construction

    weights = ExpertWeights.random(spec, device="cuda", seed=0)
    gen = torch.Generator(device="cuda").manual_seed(1)
    layers, gates = [], []
    for i in range(args.layers):
        pair = standalone.build_layer(spec, "triton", weights, layer_id=i)
        support = layer_hooks.enable_for_layer(*pair)
        assert support, support.reason
        layers.append(pair)
        gate = torch.randn(spec.hidden_size, spec.num_experts, generator=gen, device="cuda")
        gates.append((gate * spec.hidden_size**-0.5).to(spec.dtype))
    extra = sum(layer_hooks.extra_weight_bytes(moe) for _, moe in layers)

    def stack(h: torch.Tensor) -> torch.Tensor:
        for (topk, moe), gate in zip(layers, gates, strict=True):
            h = h + standalone.forward(topk, moe, h, h @ gate)
        return h

    runner = SimpleNamespace(device_module=torch.cuda, model_runner=SimpleNamespace(tp_group=get_tp_group()))
    backend = FullCudaGraphBackend(runner)
    capture = MultiKernelCapture(backend, timed_replays=args.replays)
    x, _ = random_inputs(spec, DEFAULT_BUCKETS[-1], device="cuda", seed=2)
    print(f"{torch.cuda.get_device_name()}: {args.layers} x {spec.describe()}", flush=True)
    with backend.capture_session(torch.cuda.Stream()):
        for bs in reversed(DEFAULT_BUCKETS):
            capture.capture_one(
                FullCudaGraphBackend.capture_one,
                backend,
                ShapeKey(bs),
                functools.partial(stack, x[:bs]),
                post_warmup_hook=None,
            )
    report = capture.select()
    print(format_report(report, extra))
    return 0


if __name__ == "__main__":
    sys.exit(main())
