"""`small_batch`: our own Triton MoE kernel for decode batch sizes (T <= 32).

    backend.py   SmallBatchBackend / SmallBatchKernel: availability, supports(), prepare
    launch.py    SmallBatchConfig (tile sizes as data, per T range) and the launcher
    kernels.py   the two @triton.jit kernels (routing + gate/up + activation; down + combine)

Importing this package does not import triton; `launch` and `kernels` do.
"""

from moe_dispatch.backends.small_batch.backend import SmallBatchBackend, SmallBatchKernel

__all__ = ["SmallBatchBackend", "SmallBatchKernel"]
