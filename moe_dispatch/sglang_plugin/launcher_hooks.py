"""Launcher-side hooks on SGLang's `ServerArgs`: the flags, the environment hand-off, the refusals.

    AFTER  ServerArgs.add_cli_args   add the --adaptive-moe flags (settings.add_cli_args)
    AROUND ServerArgs.from_cli_args  flags over env -> os.environ, so spawned schedulers inherit them
    BEFORE ServerArgs.__post_init__  adaptive on: every hook target present, supported options only,
                                     moe_runner_backend "auto" -> "triton" (weights in the Triton layout)

Registered in every process, always; with adaptive MoE off each hook passes straight
through (the flags exist but default to "not given"). `__post_init__` runs in the launcher
for the CLI and for the offline `Engine(...)` alike, and an exception raised there stops
start-up, which is how the plugin refuses (SGLang swallows exceptions raised in `load()`).
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
from typing import Any

from moe_dispatch.sglang_plugin import settings as settings_mod
from moe_dispatch.sglang_plugin import targets

logger = logging.getLogger("moe_dispatch.sglang_plugin")

# The only runner backends under which the plugin can keep one Triton-layout weight copy.
_ALLOWED_RUNNER_BACKENDS = ("auto", "triton")


def after_add_cli_args(result: Any, parser: argparse.ArgumentParser) -> None:
    settings_mod.add_cli_args(parser)


def around_from_cli_args(original: Any, cls: type, args: argparse.Namespace) -> Any:
    """Resolve flags over env and publish the result to os.environ before ServerArgs is built.

    Nothing is written when none of our flags was given, so the environment stays as the
    user left it.
    """
    given = any(getattr(args, dest, None) is not None for dest in settings_mod.CLI_DESTS.values())
    if given:
        resolved = settings_mod.from_cli_namespace(args, os.environ)
        os.environ.update(resolved.to_env())
        for field in ("plan_path", "kernel", "extra_kernels"):  # unset fields leave no stale variable behind
            if getattr(resolved, field) in (None, ()):
                os.environ.pop(settings_mod.ENV_VARS[field], None)
    return original(cls, args)


def unsupported_options(server_args: Any) -> list[str]:
    """Each ServerArgs option that adaptive MoE cannot run with, as 'name=value (why)'."""
    problems = []
    backend = getattr(server_args, "moe_runner_backend", "auto")
    if backend == "triton_kernel":
        problems.append(
            "moe_runner_backend='triton_kernel' (adaptive MoE switches to triton_kernels itself and needs the "
            "Triton weight layout; use --moe-runner-backend auto or triton)"
        )
    elif backend not in _ALLOWED_RUNNER_BACKENDS:
        problems.append(f"moe_runner_backend={backend!r} (adaptive MoE needs auto or triton)")
    checks = (
        ("ep_size", lambda v: v not in (None, 1), "expert parallelism: triton_kernels routing needs ep_size 1"),
        ("moe_a2a_backend", lambda v: v not in (None, "none"), "an all-to-all MoE backend; needs 'none'"),
        ("enable_lora", bool, "LoRA MoE runners read the stock runner only"),
        ("lora_paths", bool, "LoRA MoE runners read the stock runner only"),
        ("enable_torch_compile", bool, "torch.compile replaces the MoE forward at bs 1"),
        ("enable_eplb", bool, "triton_kernels routing ignores EPLB dispatch info"),
    )
    for name, bad, why in checks:
        value = getattr(server_args, name, None)
        if bad(value):
            problems.append(f"{name}={value!r} ({why})")
    return problems


def triton_kernels_importable() -> bool:
    return importlib.util.find_spec("triton_kernels") is not None


def before_post_init(server_args: Any) -> None:
    """Refuse unsupported set-ups with one clear error; pin the runner backend to Triton."""
    settings = settings_mod.from_env(os.environ)  # ValueError naming a malformed variable
    if not settings.enabled:
        return None
    targets.require_targets()
    if not triton_kernels_importable():
        raise RuntimeError(
            "moe-dispatch adaptive MoE needs the triton_kernels package (shipped with sglang-kernel); "
            "it is not importable here"
        )
    problems = unsupported_options(server_args)
    if problems:
        raise ValueError("moe-dispatch adaptive MoE cannot run with " + "; ".join(problems))
    if server_args.moe_runner_backend == "auto":
        # Before __post_init__ resolves "auto" (GPT-OSS bf16 -> triton_kernel on H100), so the
        # one weight copy is loaded in the Triton layout; triton_kernels reads transposed views.
        server_args.moe_runner_backend = "triton"
        logger.info("adaptive MoE: moe_runner_backend auto -> triton (triton_kernels gets transposed views)")
    return None


def register() -> None:
    targets.register_hook(targets.ADD_CLI_ARGS, after_add_cli_args, "AFTER")
    targets.register_hook(targets.FROM_CLI_ARGS, around_from_cli_args, "AROUND")
    targets.register_hook(targets.POST_INIT, before_post_init, "BEFORE")
