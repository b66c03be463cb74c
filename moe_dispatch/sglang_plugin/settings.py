"""The plugin's settings, read from SGLang's command line or from the environment.

One frozen record, `AdaptiveMoESettings`, travels from the launcher to every spawned
scheduler process through environment variables (`ENV_VARS`): SGLang spawns its
schedulers, so monkey-patches and module state of the launcher are lost, but `os.environ`
is inherited. The offline `sglang.Engine(**kwargs)` rejects unknown keyword arguments, so
there the environment is the only way in.

Precedence: a flag given on the command line beats the environment, which beats the
defaults. CLI defaults are therefore `None` ("not given"). An empty environment value
counts as unset.

    enabled          --enable-adaptive-moe / --no-enable-adaptive-moe   SGLANG_ADAPTIVE_MOE
    batch_threshold  --adaptive-moe-batch-threshold N                    SGLANG_ADAPTIVE_MOE_BATCH_THRESHOLD
    policy           --adaptive-moe-policy {measure,threshold,fixed}     SGLANG_ADAPTIVE_MOE_POLICY
    kernel           --adaptive-moe-kernel {triton,triton_kernels}       SGLANG_ADAPTIVE_MOE_KERNEL
    plan_path        --adaptive-moe-plan PATH                            SGLANG_ADAPTIVE_MOE_PLAN
    extra_kernels    --adaptive-moe-extra-kernels K[,K]                  SGLANG_ADAPTIVE_MOE_EXTRA_KERNELS

Pure Python: no SGLang, no torch.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

POLICIES: tuple[str, ...] = ("measure", "threshold", "fixed")
# The runners one layer switches between (policy "fixed" names one of them).
FIXED_KERNELS: tuple[str, ...] = ("triton", "triton_kernels")
# Candidates policy "measure" may add (opt-in until each has run inside the engine on a GPU).
EXTRA_KERNELS: tuple[str, ...] = ("triton_tuned", "triton_kernels_tuned", "small_batch")
DEFAULT_BATCH_THRESHOLD = 1536

# Field name -> environment variable.
ENV_VARS: Mapping[str, str] = MappingProxyType(
    {
        "enabled": "SGLANG_ADAPTIVE_MOE",
        "batch_threshold": "SGLANG_ADAPTIVE_MOE_BATCH_THRESHOLD",
        "policy": "SGLANG_ADAPTIVE_MOE_POLICY",
        "kernel": "SGLANG_ADAPTIVE_MOE_KERNEL",
        "plan_path": "SGLANG_ADAPTIVE_MOE_PLAN",
        "extra_kernels": "SGLANG_ADAPTIVE_MOE_EXTRA_KERNELS",
    }
)

# Field name -> argparse `dest` of its flag.
CLI_DESTS: Mapping[str, str] = MappingProxyType(
    {
        "enabled": "enable_adaptive_moe",
        "batch_threshold": "adaptive_moe_batch_threshold",
        "policy": "adaptive_moe_policy",
        "kernel": "adaptive_moe_kernel",
        "plan_path": "adaptive_moe_plan",
        "extra_kernels": "adaptive_moe_extra_kernels",
    }
)

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


@dataclasses.dataclass(frozen=True)
class AdaptiveMoESettings:
    """What the plugin does; with `enabled=False` (the default) SGLang runs stock.

    enabled: switch MoE layers between the Triton and triton_kernels runners.
    batch_threshold: policy "threshold": tokens per MoE call from which triton_kernels runs.
    policy: "measure" times both kernels at start-up at every captured decode and prefill
        size (and eager sizes up to the chunked-prefill size) and runs the faster one at each;
        "threshold" applies `batch_threshold`; "fixed" runs `kernel` everywhere.
    kernel: the kernel of policy "fixed" (required there, refused elsewhere).
    plan_path: JSON plan file: a matching one skips the measurement; a measurement is saved there.
    extra_kernels: candidates policy "measure" times beside the two runners, where they can run:
        "triton_tuned" (SGLang's Triton runner with the tile configs of a tuned table for this GPU,
        Triton version and layer shape; see moe_dispatch.tuned_configs), "triton_kernels_tuned"
        (the triton_kernels runner with moe-dispatch's routing metadata and top-k combine, and a
        flags table's opt flags where one exists; moe_dispatch.tk_flags_table) and "small_batch"
        (our decode kernel, up to its max_tokens). Opt-in: the probe times uniform routing, and
        small_batch loses to grouped GEMMs when a model routes few experts (README: decode sizes).
    """

    enabled: bool = False
    batch_threshold: int = DEFAULT_BATCH_THRESHOLD
    policy: str = "measure"
    plan_path: str | None = None
    kernel: str | None = None
    extra_kernels: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.enabled, bool):
            raise TypeError(f"enabled must be a bool, got {self.enabled!r}")
        extra = self.extra_kernels
        if not isinstance(extra, tuple) or any(k not in EXTRA_KERNELS for k in extra) or len(set(extra)) != len(extra):
            raise ValueError(f"extra_kernels must be a tuple of distinct names from {EXTRA_KERNELS}, got {extra!r}")
        threshold = self.batch_threshold
        if isinstance(threshold, bool) or not isinstance(threshold, int) or threshold <= 0:
            raise ValueError(f"batch_threshold must be a positive int, got {threshold!r}")
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {self.policy!r}")
        if self.policy == "fixed" and self.kernel not in FIXED_KERNELS:
            raise ValueError(f"policy 'fixed' needs kernel one of {FIXED_KERNELS}, got {self.kernel!r}")
        if self.policy != "fixed" and self.kernel is not None:
            raise ValueError(f"kernel={self.kernel!r} is only used with policy 'fixed', not {self.policy!r}")
        if extra and self.policy != "measure":
            raise ValueError(f"extra_kernels {extra} need policy 'measure' (they are measured), not {self.policy!r}")
        if self.plan_path is not None and (not isinstance(self.plan_path, str) or not self.plan_path.strip()):
            raise ValueError(f"plan_path must be a non-empty path or None, got {self.plan_path!r}")

    def to_env(self) -> dict[str, str]:
        """Environment variables that make `from_env` rebuild these settings.

        `plan_path=None` is expressed by leaving its variable out; a caller that applies the
        result to `os.environ` should also remove `ENV_VARS["plan_path"]` in that case.
        """
        env = {
            ENV_VARS["enabled"]: "1" if self.enabled else "0",
            ENV_VARS["batch_threshold"]: str(self.batch_threshold),
            ENV_VARS["policy"]: self.policy,
        }
        if self.kernel is not None:
            env[ENV_VARS["kernel"]] = self.kernel
        if self.plan_path is not None:
            env[ENV_VARS["plan_path"]] = self.plan_path
        if self.extra_kernels:
            env[ENV_VARS["extra_kernels"]] = ",".join(self.extra_kernels)
        return env


def parse_bool(text: str, *, name: str = "value") -> bool:
    """Parse a flag word: 1/true/yes/on -> True, 0/false/no/off -> False (any case, spaces ignored)."""
    word = text.strip().lower()
    if word in _TRUE:
        return True
    if word in _FALSE:
        return False
    raise ValueError(f"{name} must be one of 1/true/yes/on or 0/false/no/off, got {text!r}")


def parse_positive_int(text: str, *, name: str = "value") -> int:
    """A decimal integer > 0 ("1536"); anything else raises ValueError naming `name`."""
    stripped = text.strip()
    try:
        number = int(stripped, 10)
    except ValueError:
        raise ValueError(f"{name} must be a positive integer, got {text!r}") from None
    if number <= 0:
        raise ValueError(f"{name} must be a positive integer, got {text!r}")
    return number


def parse_policy(text: str, *, name: str = "value") -> str:
    """One of `POLICIES`, case-insensitive."""
    word = text.strip().lower()
    if word not in POLICIES:
        raise ValueError(f"{name} must be one of {'/'.join(POLICIES)}, got {text!r}")
    return word


def parse_kernel(text: str, *, name: str = "value") -> str:
    """One of `FIXED_KERNELS`, case-insensitive."""
    word = text.strip().lower()
    if word not in FIXED_KERNELS:
        raise ValueError(f"{name} must be one of {'/'.join(FIXED_KERNELS)}, got {text!r}")
    return word


def parse_extra_kernels(text: str, *, name: str = "value") -> tuple[str, ...]:
    """ "triton_tuned,small_batch" -> a tuple of `EXTRA_KERNELS` names (case-insensitive, order kept)."""
    words = tuple(dict.fromkeys(w.strip().lower() for w in text.split(",") if w.strip()))
    unknown = [w for w in words if w not in EXTRA_KERNELS]
    if unknown:
        raise ValueError(f"{name} names unknown kernels {unknown}; expected some of {'/'.join(EXTRA_KERNELS)}")
    return words


def _env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    """The fields set (non-empty) in `environ`, parsed; errors name the variable."""
    parsers = {
        "enabled": parse_bool,
        "extra_kernels": parse_extra_kernels,
        "batch_threshold": parse_positive_int,
        "policy": parse_policy,
        "kernel": parse_kernel,
    }
    fields: dict[str, Any] = {}
    for field, var in ENV_VARS.items():
        raw = environ.get(var)
        if raw is None or not raw.strip():
            continue
        fields[field] = parsers[field](raw, name=var) if field in parsers else raw
    return fields


def from_env(environ: Mapping[str, str]) -> AdaptiveMoESettings:
    """Settings from environment variables (`ENV_VARS`); unset or empty ones keep their defaults."""
    return AdaptiveMoESettings(**_env_overrides(environ))


def _cli_type(parse: Callable[..., Any], flag: str) -> Callable[[str], Any]:
    """An argparse `type` from one of the parsers above: its ValueError, naming `flag`, becomes a usage error."""

    def convert(text: str) -> Any:
        try:
            return parse(text, name=flag)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return convert


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    """Add the six flags to `parser`; every default is None so the environment can fill in."""
    group = parser.add_argument_group("adaptive MoE (moe-dispatch plugin)")
    group.add_argument(
        "--enable-adaptive-moe",
        dest=CLI_DESTS["enabled"],
        action=argparse.BooleanOptionalAction,
        default=None,
        help=(
            "Switch unquantized MoE layers between the Triton and triton_kernels runners per decode "
            f"batch size (env {ENV_VARS['enabled']}; default off)."
        ),
    )
    group.add_argument(
        "--adaptive-moe-batch-threshold",
        dest=CLI_DESTS["batch_threshold"],
        type=_cli_type(parse_positive_int, "--adaptive-moe-batch-threshold"),
        default=None,
        metavar="N",
        help=(
            "Policy threshold: tokens per MoE call from which triton_kernels is used "
            f"(env {ENV_VARS['batch_threshold']}; default {DEFAULT_BATCH_THRESHOLD})."
        ),
    )
    group.add_argument(
        "--adaptive-moe-policy",
        dest=CLI_DESTS["policy"],
        choices=POLICIES,
        default=None,
        help=(
            "measure: time both kernels at start-up at every captured size and run the faster one; "
            "threshold: triton below --adaptive-moe-batch-threshold tokens, triton_kernels from it; "
            f"fixed: --adaptive-moe-kernel everywhere (env {ENV_VARS['policy']}; default measure)."
        ),
    )
    group.add_argument(
        "--adaptive-moe-kernel",
        dest=CLI_DESTS["kernel"],
        choices=FIXED_KERNELS,
        default=None,
        help=f"The kernel of --adaptive-moe-policy fixed (env {ENV_VARS['kernel']}).",
    )
    group.add_argument(
        "--adaptive-moe-plan",
        dest=CLI_DESTS["plan_path"],
        default=None,
        metavar="PATH",
        help=(
            "Plan file: a matching one skips the start-up measurement; a new measurement is saved there "
            f"(env {ENV_VARS['plan_path']})."
        ),
    )
    group.add_argument(
        "--adaptive-moe-extra-kernels",
        dest=CLI_DESTS["extra_kernels"],
        type=_cli_type(parse_extra_kernels, "--adaptive-moe-extra-kernels"),
        default=None,
        metavar="K[,K]",
        help=(
            f"Policy measure: also time these candidates ({', '.join(EXTRA_KERNELS)}) where they can run "
            f"(env {ENV_VARS['extra_kernels']}; default none)."
        ),
    )


def from_cli_namespace(ns: argparse.Namespace, environ: Mapping[str, str]) -> AdaptiveMoESettings:
    """Settings from a parsed namespace over the environment: a flag given on the CLI wins.

    Attributes the namespace lacks (a parser without our flags) count as not given. The
    environment is parsed first, so a malformed variable raises even where a flag overrides it.
    """
    fields = _env_overrides(environ)
    for field, dest in CLI_DESTS.items():
        value = getattr(ns, dest, None)
        if value is not None:
            fields[field] = value
    return AdaptiveMoESettings(**fields)
