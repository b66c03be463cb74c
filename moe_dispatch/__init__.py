"""moe-dispatch: a CUDA-graph-aware dispatch layer for Mixture-of-Experts layers.

Pipeline of one MoE call, and who owns each stage:

    hidden_states [T, H], router_logits [T, E]
      -> spec check and input validation     backends/base.py (check_inputs)
      -> routing (top-k) + experts + combine  backends/<kernel>.py, one call per kernel
      -> out [T, H]

`spec.py` describes the problem, `weights.py` holds the experts, `reference.py` is the
torch ground truth, `backends/` maps kernel names to prepared callables. Graph
dispatch (a CUDA graph per kernel per batch bucket, fastest kept) builds on `graphs/`.
"""

from moe_dispatch.backends import (
    KNOWN_KERNELS,
    KernelBackend,
    PreparedKernel,
    Support,
    available_kernels,
    get_backend,
    kernel_support,
    make_kernel,
)
from moe_dispatch.reference import reference_moe, route
from moe_dispatch.spec import GPT_OSS_SWIGLU, PRESETS, SILU, Activation, MoESpec, Routing, preset
from moe_dispatch.weights import ExpertWeights, random_inputs

__version__ = "0.1.0"

__all__ = [
    "GPT_OSS_SWIGLU",
    "KNOWN_KERNELS",
    "PRESETS",
    "SILU",
    "Activation",
    "ExpertWeights",
    "KernelBackend",
    "MoESpec",
    "PreparedKernel",
    "Routing",
    "Support",
    "available_kernels",
    "get_backend",
    "kernel_support",
    "make_kernel",
    "preset",
    "random_inputs",
    "reference_moe",
    "route",
]
