"""Name -> backend, with lazy imports.

Backend modules import their optional packages (SGLang, triton_kernels) only inside
`availability()` and `prepare()`, so `import moe_dispatch` never fails because one is
missing: the backend is reported unavailable, with the reason.
"""

from __future__ import annotations

import functools
import importlib

from moe_dispatch.backends.base import KernelBackend, PreparedKernel, Support
from moe_dispatch.spec import MoESpec
from moe_dispatch.weights import ExpertWeights

_BACKENDS: dict[str, tuple[str, str]] = {
    "torch": ("moe_dispatch.backends.torch_backend", "TorchBackend"),
    "triton": ("moe_dispatch.backends.sglang_triton", "SGLangTritonBackend"),
    "triton_tuned": ("moe_dispatch.backends.sglang_triton_tuned", "SGLangTritonTunedBackend"),
    "triton_kernels": ("moe_dispatch.backends.triton_kernels_backend", "TritonKernelsBackend"),
    "triton_kernels_tuned": ("moe_dispatch.backends.triton_kernels_tuned", "TritonKernelsTunedBackend"),
    "small_batch": ("moe_dispatch.backends.small_batch.backend", "SmallBatchBackend"),
    "flashinfer_cutlass": ("moe_dispatch.backends.flashinfer_moe", "FlashInferCutlassBackend"),
}

KNOWN_KERNELS: tuple[str, ...] = tuple(_BACKENDS)


@functools.cache
def get_backend(name: str) -> KernelBackend:
    """The backend object for `name`; ValueError listing the known names otherwise."""
    if name not in _BACKENDS:
        raise ValueError(f"unknown kernel {name!r}; known kernels: {', '.join(KNOWN_KERNELS)}")
    module, cls = _BACKENDS[name]
    return getattr(importlib.import_module(module), cls)()


def kernel_support(name: str, spec: MoESpec | None = None) -> Support:
    """Whether `name` can run here (and run `spec`, when given), with the reason if not."""
    backend = get_backend(name)
    answer = backend.availability()
    if answer and spec is not None:
        answer = backend.supports(spec)
    return answer


def candidate_at(name: str, num_tokens: int) -> bool:
    """Whether kernel `name` is a candidate for calls of `num_tokens` (its backend's `max_tokens`)."""
    limit = get_backend(name).max_tokens
    return limit is None or num_tokens <= limit


def available_kernels(spec: MoESpec | None = None) -> dict[str, Support]:
    """Every known kernel -> Support: what can run here, and for the rest, why not."""
    return {name: kernel_support(name, spec) for name in KNOWN_KERNELS}


def make_kernel(name: str, spec: MoESpec, weights: ExpertWeights) -> PreparedKernel:
    """Prepare kernel `name` for `spec` and `weights` (ValueError when it cannot)."""
    return get_backend(name).prepare(spec, weights)
