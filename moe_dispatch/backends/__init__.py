"""Kernel backends: `torch` (reference), `triton` (SGLang fused_moe), `triton_kernels`."""

from moe_dispatch.backends.base import KernelBackend, PreparedKernel, Support
from moe_dispatch.backends.registry import (
    KNOWN_KERNELS,
    available_kernels,
    candidate_at,
    get_backend,
    kernel_support,
    make_kernel,
)

__all__ = [
    "KNOWN_KERNELS",
    "KernelBackend",
    "PreparedKernel",
    "Support",
    "available_kernels",
    "candidate_at",
    "get_backend",
    "kernel_support",
    "make_kernel",
]
