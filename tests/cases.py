"""The one shared case list every kernel is tested over (GPU tier).

Small dims keep a case fast; the token counts hit 0, 1, odd sizes and past the
1000-row range where kernels change tile configs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import os
from collections.abc import Callable, Mapping

import torch

from moe_dispatch.spec import GPT_OSS_SWIGLU, SILU, MoESpec, Routing

TOKENS = (0, 1, 3, 37, 129, 1000)
TOP_KS = (1, 2, 4, 8)


@dataclasses.dataclass(frozen=True)
class Case:
    num_tokens: int
    top_k: int
    bias: bool
    activation: str  # "silu" | "swiglu"

    def spec(self, dtype: torch.dtype = torch.bfloat16) -> MoESpec:
        swiglu = self.activation == "swiglu"
        return MoESpec(
            num_experts=16,
            top_k=self.top_k,
            hidden_size=256,
            intermediate_size=192,
            activation=GPT_OSS_SWIGLU if swiglu else SILU,
            bias=self.bias,
            dtype=dtype,
            routing=Routing.TOPK_SOFTMAX if swiglu else Routing.SOFTMAX_TOPK_RENORM,
            name=f"case-k{self.top_k}-{self.activation}{'-bias' if self.bias else ''}",
        )

    @property
    def id(self) -> str:
        return f"T{self.num_tokens}-k{self.top_k}-{self.activation}-{'bias' if self.bias else 'nobias'}"


CASES: tuple[Case, ...] = tuple(
    Case(t, k, bias, act) for t, k, bias, act in itertools.product(TOKENS, TOP_KS, (True, False), ("swiglu", "silu"))
)


def record_error(case_id: str, kernel: str, stats, dtype: torch.dtype = torch.bfloat16) -> None:
    """Append one row of the case x kernel error table when MOE_DISPATCH_ERROR_TABLE names a file (reports)."""
    path = os.environ.get("MOE_DISPATCH_ERROR_TABLE")
    if path:
        row = {"case": case_id, "kernel": kernel, "dtype": str(dtype).removeprefix("torch."), "rms": stats.rms}
        row["max"] = stats.max
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")


def skip_unless_available(kernel: str) -> None:
    """pytest.skip with the backend's own reason when `kernel` cannot run here."""
    import pytest

    from moe_dispatch.backends import get_backend

    answer = get_backend(kernel).availability()
    if not answer:
        pytest.skip(f"{kernel} unavailable here: {answer.reason}")


def check_replays(captured, static_inputs, spec, weights, inputs_for, seeds, label, eager=None) -> None:
    """For each seed: write `inputs_for(seed)` (x, logits) into `static_inputs`, replay `captured`,
    and compare its output with the torch reference (and, given `eager`, bitwise with an eager call)."""
    from moe_dispatch import reference_moe
    from moe_dispatch.testing import assert_close

    static_x, static_logits = static_inputs
    for seed in seeds:
        new_x, new_logits = inputs_for(seed)
        static_x.copy_(new_x)
        static_logits.copy_(new_logits)
        captured.graph.replay()
        torch.cuda.synchronize()
        ref = reference_moe(spec, weights, new_x, new_logits)
        assert_close(captured.output, ref, spec.dtype, f"{label} seed={seed}")
        if eager is not None:
            assert torch.equal(captured.output, eager(new_x, new_logits)), f"{label} seed={seed}: replay != eager"


def spy_fused_moe_configs(monkeypatch) -> list[dict[str, int]]:
    """Record the tile config of every SGLang fused_moe matmul launch (`invoke_fused_moe_kernel`), in order."""
    import importlib
    import inspect

    from moe_dispatch.backends.sglang_tile_override import fused_moe_module_name
    from moe_dispatch.tuned_configs import TileConfig

    module = importlib.import_module(fused_moe_module_name)
    original = module.invoke_fused_moe_kernel
    signature = inspect.signature(original)
    keys = TileConfig(16, 16, 16, 1, 1, 1).to_sglang()
    configs: list[dict[str, int]] = []

    def spy(*args, **kwargs):
        config = signature.bind(*args, **kwargs).arguments["config"]
        configs.append({key: config[key] for key in keys if key in config})
        return original(*args, **kwargs)

    monkeypatch.setattr(module, "invoke_fused_moe_kernel", spy)
    return configs


def steering_then_recording(seen: list) -> Callable[[Mapping], contextlib.ExitStack]:
    """A stand-in for moe_dispatch.backends.tk_matmul_flags.scoped_matmul_flags that steers as it
    does, then records (into `seen`, one list per call) the flags matmul_ogs receives after the steering."""
    from bench.tk_views_probe import recorded_opt_flags
    from moe_dispatch.backends.tk_matmul_flags import scoped_matmul_flags

    def steer_and_record(flags: Mapping) -> contextlib.ExitStack:
        stack = contextlib.ExitStack()
        stack.enter_context(scoped_matmul_flags(flags))
        seen.append(stack.enter_context(recorded_opt_flags()))
        return stack

    return steer_and_record


class Recorder:
    """Stands for a library function a scoped swap wraps: records each call, returns "original"."""

    def __init__(self) -> None:
        self.calls: list[tuple[tuple, dict]] = []

    def __call__(self, *args, **kwargs) -> str:
        self.calls.append((args, kwargs))
        return "original"


def interpreted_results(test_file: str, tmp_path_factory, worker: str = "_interpreter_worker") -> dict:
    """What `worker(out_path)` of `test_file` saved, run in a child process under Triton's interpreter."""
    import pytest

    from moe_dispatch.testing import run_interpreted

    out = tmp_path_factory.mktemp(os.path.basename(test_file).removesuffix(".py")) / "results.pt"
    failure = run_interpreted(test_file, worker, str(out))
    if failure:
        pytest.fail(f"interpreter {failure}")
    return torch.load(out, weights_only=True)
