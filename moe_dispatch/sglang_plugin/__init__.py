"""SGLang general plugin (entry-point group `sglang.srt.plugins`) for adaptive MoE dispatch.

Switches each unquantized MoE layer between SGLang's Triton `fused_moe` runner and the
`triton_kernels` runner: at start-up both are timed on the model's own MoE layers, inside
CUDA graphs, at every size the server will run (decode and prefill graph sizes, eager
sizes); every MoE call, captured or eager, then runs its size's winner. SGLang captures
each graph once, as stock does.

Enable:
    pip install 'moe-dispatch[sglang]'          # SGLang finds the plugin through its entry point
    python -m sglang.launch_server --model-path <gpt-oss bf16> --enable-adaptive-moe \
        [--adaptive-moe-policy measure|threshold|fixed] [--adaptive-moe-batch-threshold 1536] \
        [--adaptive-moe-kernel triton|triton_kernels] [--adaptive-moe-plan plan.json] \
        [--adaptive-moe-extra-kernels triton_tuned,triton_kernels_tuned,small_batch]
    offline Engine(...): the same through SGLANG_ADAPTIVE_MOE=1, SGLANG_ADAPTIVE_MOE_POLICY,
        SGLANG_ADAPTIVE_MOE_BATCH_THRESHOLD, SGLANG_ADAPTIVE_MOE_KERNEL, SGLANG_ADAPTIVE_MOE_PLAN,
        SGLANG_ADAPTIVE_MOE_EXTRA_KERNELS

Modules, one job each:
    settings.py        the settings: flags, env vars, precedence
    targets.py         hooked SGLang names, supported versions, the up-front check
    launcher_hooks.py  ServerArgs: flags, env hand-off to schedulers, refusals, backend -> triton
    kernel_switch.py   per-process choice: forced kernel (probe), size rule, adaptive TopKs
    layer_hooks.py     TopK/UnquantizedFusedMoEMethod/ModelRunner.load_model: per-call switching
    probe.py           both kernels timed on the model's layers in CUDA graphs, per size (graphs/)
    startup.py         before graph capture: plan or probe -> the rule; TP agreement; NVTX replays
    extras.py          the opt-in candidates (triton_tuned, triton_kernels_tuned, small_batch), set up before the probe

`load()` runs in the launcher and in every scheduler process (SGLang calls `load_plugins()`
in each). It always registers the launcher hooks (inert while the flag is off) and, only
where SGLANG_ADAPTIVE_MOE is on (the launcher writes it for its children), the scheduler
hooks. With the flag off SGLang runs stock: no scheduler target is patched.
"""

from __future__ import annotations

import logging
import os

logger = logging.getLogger("moe_dispatch.sglang_plugin")


def load() -> None:
    """Zero-argument entry point SGLang calls; never raises (SGLang would only log it anyway)."""
    try:
        from sglang.srt.plugins.hook_registry import HookRegistry  # noqa: F401
    except Exception as error:  # absent or broken SGLang: stay out of the way
        logger.warning(
            "moe-dispatch SGLang plugin inactive: SGLang is not importable (%s: %s)", type(error).__name__, error
        )
        return
    try:
        from moe_dispatch.sglang_plugin import launcher_hooks
        from moe_dispatch.sglang_plugin.settings import from_env

        launcher_hooks.register()
        settings = from_env(os.environ)
    except Exception as error:
        # A malformed SGLANG_ADAPTIVE_MOE* value: ServerArgs.__post_init__ (launcher) raises it.
        logger.error("moe-dispatch adaptive MoE not loaded: %s: %s", type(error).__name__, error)
        return
    if not settings.enabled:
        return
    try:
        _load_scheduler_hooks(settings)
    except Exception:
        logger.exception("moe-dispatch adaptive MoE: failed to register the scheduler hooks; SGLang runs stock")


def _load_scheduler_hooks(settings: object) -> None:
    from moe_dispatch.sglang_plugin import layer_hooks, startup, targets
    from moe_dispatch.sglang_plugin.kernel_switch import SWITCH

    problems = targets.verify_targets()
    if problems:
        # The launcher's __post_init__ hook refuses this set-up; a child must not run half-hooked.
        logger.error(
            "moe-dispatch adaptive MoE disabled: SGLang %s lacks hook target(s) %s; supported: %s",
            targets.sglang_version(),
            "; ".join(problems),
            ", ".join(targets.SUPPORTED_SGLANG),
        )
        return
    SWITCH.configure(settings)
    layer_hooks.register()
    startup.register()
