"""The configurations the serving benchmark compares; each one is a set of environment variables.

Every mode runs the same SGLang command line (stock flags, `--moe-runner-backend auto`, which SGLang
resolves to triton_kernel for GPT-OSS bf16); only the plugin's environment differs. The variable
names are the contract with the plugin (`moe_dispatch.sglang_plugin.settings`):

    off             none: stock SGLang (every SGLANG_ADAPTIVE_MOE* variable removed)
    measure         SGLANG_ADAPTIVE_MOE=1, POLICY=measure, PLAN=<fresh path>: the first start,
                    measuring each captured size; the plugin writes the plan it measured to PLAN
    plan            SGLANG_ADAPTIVE_MOE=1, POLICY=measure, PLAN=<a copy of an earlier measure run's
                    plan>: the start with a matching plan (captures only the winners)
    threshold       SGLANG_ADAPTIVE_MOE=1, POLICY=threshold, BATCH_THRESHOLD=1536: the old static rule
    triton          SGLANG_ADAPTIVE_MOE=1, POLICY=fixed, KERNEL=triton
    triton_kernels  SGLANG_ADAPTIVE_MOE=1, POLICY=fixed, KERNEL=triton_kernels
    extra           SGLANG_ADAPTIVE_MOE=1, POLICY=measure,
                    EXTRA_KERNELS=triton_tuned,triton_kernels_tuned,small_batch,
                    PLAN=<fresh path>: a first start that also measures the opt-in candidates
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from types import MappingProxyType

ENV_PREFIX = "SGLANG_ADAPTIVE_MOE"
ENABLED = "SGLANG_ADAPTIVE_MOE"
POLICY = "SGLANG_ADAPTIVE_MOE_POLICY"
PLAN = "SGLANG_ADAPTIVE_MOE_PLAN"
THRESHOLD = "SGLANG_ADAPTIVE_MOE_BATCH_THRESHOLD"
KERNEL = "SGLANG_ADAPTIVE_MOE_KERNEL"
EXTRA_KERNELS = "SGLANG_ADAPTIVE_MOE_EXTRA_KERNELS"
ENV_NAMES = (ENABLED, POLICY, PLAN, THRESHOLD, KERNEL, EXTRA_KERNELS)
STATIC_THRESHOLD = 1536


@dataclasses.dataclass(frozen=True)
class Mode:
    """One configuration: fixed env overrides, and how it uses a plan file.

    plan: "none"; "write" (PLAN names a fresh file the plugin fills); "read" (PLAN names a copy of
    the plan an earlier measure run of the same model wrote).
    """

    name: str
    env: Mapping[str, str]
    plan: str = "none"
    description: str = ""

    def __post_init__(self) -> None:
        if self.plan not in ("none", "write", "read"):
            raise ValueError(f"Mode.plan must be none/write/read, got {self.plan!r}")
        object.__setattr__(self, "env", MappingProxyType(dict(self.env)))


_ON = {ENABLED: "1"}
MODES: Mapping[str, Mode] = MappingProxyType(
    {
        m.name: m
        for m in (
            Mode("off", {}, description="stock SGLang"),
            Mode("measure", _ON | {POLICY: "measure"}, "write", "first start: measure each size"),
            Mode("plan", _ON | {POLICY: "measure"}, "read", "start with a matching plan"),
            Mode("threshold", _ON | {POLICY: "threshold", THRESHOLD: str(STATIC_THRESHOLD)}, description="1536 rule"),
            Mode("triton", _ON | {POLICY: "fixed", KERNEL: "triton"}, description="fixed: Triton fused_moe"),
            Mode(
                "triton_kernels",
                _ON | {POLICY: "fixed", KERNEL: "triton_kernels"},
                description="fixed: triton_kernels",
            ),
            Mode(
                "extra",
                _ON | {POLICY: "measure", EXTRA_KERNELS: "triton_tuned,triton_kernels_tuned,small_batch"},
                "write",
                "first start, the opt-in candidates measured too",
            ),
        )
    }
)
DEFAULT_MODES = ("off", "measure", "plan")
BASELINE = "off"


def parse_modes(text: str) -> tuple[str, ...]:
    """ "off,measure,plan" or "all" -> mode names (order kept, duplicates dropped); ValueError on unknown names."""
    words = [w.strip() for w in text.replace(" ", ",").split(",") if w.strip()]
    if words == ["all"]:
        return tuple(MODES)
    unknown = [w for w in words if w not in MODES]
    if unknown or not words:
        raise ValueError(f"unknown modes {unknown or text!r}; expected some of {', '.join(MODES)} or 'all'")
    return tuple(dict.fromkeys(words))


def mode_env(mode: str, base: Mapping[str, str], plan_path: str | None = None) -> dict[str, str]:
    """The child environment for `mode`: `base` without any SGLANG_ADAPTIVE_MOE* variable, plus the mode's.

    `plan_path` is required exactly for the modes that write or read a plan.
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {', '.join(MODES)}")
    spec = MODES[mode]
    if (spec.plan != "none") != (plan_path is not None):
        raise ValueError(f"mode {mode!r} {'needs' if spec.plan != 'none' else 'takes no'} plan_path, got {plan_path!r}")
    env = {k: v for k, v in base.items() if not k.startswith(ENV_PREFIX)}
    env.update(spec.env)
    if plan_path is not None:
        env[PLAN] = plan_path
    return env


def overrides(mode: str, plan_path: str | None = None) -> dict[str, str]:
    """Only the variables `mode` sets (what dry-run prints and the run records keep)."""
    return mode_env(mode, {}, plan_path)
