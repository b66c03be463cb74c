"""The SGLang names the plugin hooks or relies on, the versions they were read from, and their check.

Every hook target is a dotted path `module.Class.method` as SGLang's `HookRegistry` takes
it. SGLang's registry logs a missing target and carries on unpatched, so the plugin checks
the whole table itself, up front (`verify_targets`), and refuses to start with adaptive MoE
on (`require_targets`) rather than run half-hooked. A target is "changed" when its leading
parameters are not the ones our hooks were written against (`SIGNATURES`).

Where each target sits in SGLang 0.5.17, and why it is hooked: docs/sglang-internals.md.
Registration (`register_hook`) is idempotent, so calling the plugin's `load()` twice does
not stack a hook twice.
"""

from __future__ import annotations

import inspect
import pkgutil
from collections.abc import Callable, Mapping
from types import MappingProxyType

SUPPORTED_SGLANG: tuple[str, ...] = ("0.5.17",)

_SERVER_ARGS = "sglang.srt.server_args.ServerArgs"
_UNQUANT = "sglang.srt.layers.quantization.unquant.UnquantizedFusedMoEMethod"
_TOPK = "sglang.srt.layers.moe.topk.TopK"
_MODEL_RUNNER = "sglang.srt.model_executor.model_runner.ModelRunner"
_FULL_BACKEND = "sglang.srt.model_executor.runner_backend.full_cuda_graph_backend.FullCudaGraphBackend"

# Patched in every process (launcher and schedulers); inert while adaptive MoE is off.
ADD_CLI_ARGS = f"{_SERVER_ARGS}.add_cli_args"
FROM_CLI_ARGS = f"{_SERVER_ARGS}.from_cli_args"
POST_INIT = f"{_SERVER_ARGS}.__post_init__"
LAUNCHER_TARGETS: tuple[str, ...] = (ADD_CLI_ARGS, FROM_CLI_ARGS, POST_INIT)

# Patched only where SGLANG_ADAPTIVE_MOE is on (the scheduler processes it is inherited by).
CREATE_MOE_RUNNER = f"{_UNQUANT}.create_moe_runner"
UNQUANT_FORWARD = f"{_UNQUANT}.forward_cuda"
TOPK_FORWARD = f"{_TOPK}.forward_cuda"
LOAD_MODEL = f"{_MODEL_RUNNER}.load_model"
INIT_CUDA_GRAPHS = f"{_MODEL_RUNNER}.init_cuda_graphs"
FULL_REPLAY = f"{_FULL_BACKEND}.replay"
SCHEDULER_TARGETS: tuple[str, ...] = (
    CREATE_MOE_RUNNER,
    UNQUANT_FORWARD,
    TOPK_FORWARD,
    LOAD_MODEL,
    INIT_CUDA_GRAPHS,
    FULL_REPLAY,
)

# Not patched, but called or constructed by the hooks.
USED_NAMES: tuple[str, ...] = (
    "sglang.srt.plugins.hook_registry.HookRegistry",
    "sglang.srt.layers.moe.moe_runner.runner.MoeRunner",
    "sglang.srt.layers.moe.moe_runner.triton_kernels.TritonKernelsQuantInfo",
    "sglang.srt.layers.moe.utils.MoeRunnerBackend",
    "sglang.srt.layers.moe.topk.TopKOutputFormat",
    "sglang.srt.layers.moe.topk.TopKOutputChecker",
    "sglang.srt.layers.moe.fused_moe_triton.layer.FusedMoE",
)

ALL_TARGETS: tuple[str, ...] = LAUNCHER_TARGETS + SCHEDULER_TARGETS + USED_NAMES

# Leading parameter names each hook relies on (positional order); later parameters may vary.
SIGNATURES: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        ADD_CLI_ARGS: ("parser",),
        FROM_CLI_ARGS: ("cls", "args"),
        CREATE_MOE_RUNNER: ("self", "layer", "moe_runner_config"),
        UNQUANT_FORWARD: ("self", "layer", "dispatch_output"),
        TOPK_FORWARD: ("self", "hidden_states", "router_logits"),
        LOAD_MODEL: ("self",),
        INIT_CUDA_GRAPHS: ("self", "capture_decode_cuda_graph"),
        FULL_REPLAY: ("self", "shape_key", "static_forward_batch"),
    }
)


def resolve(target: str) -> object:
    """The object a dotted `module.attr[.attr]` path names; raises what import or getattr raises."""
    owner_path, _, attr = target.rpartition(".")
    if not owner_path:
        raise ValueError(f"target {target!r} needs the form module.attr")
    owner = pkgutil.resolve_name(owner_path)
    if isinstance(owner, type) and attr in owner.__dict__:
        raw = owner.__dict__[attr]
        # staticmethod/classmethod: check the function, with `cls` for a classmethod.
        if isinstance(raw, (staticmethod, classmethod)):
            return raw.__func__
    return getattr(owner, attr)


def _leading_params(fn: object) -> tuple[str, ...] | None:
    try:
        params = inspect.signature(fn, follow_wrapped=True).parameters.values()
    except (TypeError, ValueError):
        return None
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return tuple(p.name for p in params if p.kind in kinds)


def _problem(target: str) -> str | None:
    try:
        obj = resolve(target)
    except Exception as error:  # any import-time failure means the target is unusable
        return f"{target} ({type(error).__name__}: {error})"
    expected = SIGNATURES.get(target)
    if expected is not None:
        found = _leading_params(obj)
        if found is None or found[: len(expected)] != expected:
            return f"{target} (signature changed: expected parameters {expected}, found {found})"
    return None


def verify_targets(targets: tuple[str, ...] = ALL_TARGETS) -> list[str]:
    """The targets that are missing or changed here, each with why; [] when all are usable.

    Without SGLang every target is missing, so every target is listed. Imports the target
    modules (as SGLang's own `HookRegistry.apply_hooks` would).
    """
    return [p for p in (_problem(t) for t in targets) if p is not None]


def sglang_version() -> str:
    try:
        from importlib.metadata import version

        return version("sglang")
    except Exception:
        try:
            import sglang

            return str(getattr(sglang, "__version__", "unknown"))
        except Exception:
            return "unknown"


def require_targets(targets: tuple[str, ...] = ALL_TARGETS) -> None:
    """RuntimeError naming the first missing/changed target and the supported versions."""
    problems = verify_targets(targets)
    if not problems:
        return
    more = f" (and {len(problems) - 1} more: {'; '.join(problems[1:])})" if len(problems) > 1 else ""
    raise RuntimeError(
        f"moe-dispatch adaptive MoE: SGLang {sglang_version()} lacks hook target {problems[0]}{more}; "
        f"supported SGLang versions: {', '.join(SUPPORTED_SGLANG)}"
    )


def register_hook(target: str, hook: Callable[..., object], hook_type_name: str) -> bool:
    """Register `hook` on `target` with SGLang's HookRegistry unless it already is; True if added.

    hook_type_name: "BEFORE", "AFTER", "AROUND" or "REPLACE". The registry applies hooks at
    `HookRegistry.apply_hooks()` (which SGLang's `load_plugins` calls after every plugin ran).
    """
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    hook_type = HookType[hook_type_name]
    if any(h is hook and ht is hook_type for ht, h, _src in HookRegistry._hooks.get(target, ())):
        return False
    HookRegistry.register(target, hook, hook_type)
    return True
