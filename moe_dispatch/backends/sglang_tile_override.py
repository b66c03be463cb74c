"""Scoped tile configs for SGLang's Triton fused_moe: `sglang_tile_configs(bucket)`.

Inside the block, SGLang's fused_moe uses one tuned bucket's gate/up and down configs
(see `moe_dispatch.tuned_configs`). Entered at graph capture, so replays cost nothing.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable, Iterator
from typing import Any

from moe_dispatch.tuned_configs import BucketConfig

# The module whose `try_get_optimal_moe_config` name fused_moe's config lookup calls.
fused_moe_module_name = "sglang.srt.layers.moe.moe_runner.triton_utils.fused_moe"
_TRITON_UTILS_MODULE = "sglang.srt.layers.moe.moe_runner.triton_utils"
_RESOLVER = "try_get_optimal_moe_config"


@contextlib.contextmanager
def sglang_tile_configs(
    bucket: BucketConfig, fused_moe_module: Any = None, override_config: Callable[[dict], Any] | None = None
) -> Iterator[None]:
    """Make SGLang's Triton fused_moe use `bucket.up` and `bucket.down` inside the block.

    Enters SGLang's `override_config(up)` (one config for any caller of its lookup) and
    replaces the lookup name that fused_moe calls with one that also returns `down` to
    the down matmul. Both are restored on exit, on exceptions too. The replacement is
    process-wide while the block runs: not for use from concurrent threads.
    `fused_moe_module` / `override_config` default to SGLang's (injectable for tests).
    """
    if fused_moe_module is None:
        fused_moe_module = importlib.import_module(fused_moe_module_name)
    if not hasattr(fused_moe_module, _RESOLVER):
        raise RuntimeError(f"{getattr(fused_moe_module, '__name__', fused_moe_module)!r} has no {_RESOLVER}")
    if override_config is None:
        override_config = importlib.import_module(_TRITON_UTILS_MODULE).override_config
    original = getattr(fused_moe_module, _RESOLVER)
    up, down = bucket.up, bucket.down

    def resolver(
        w1_shape: Any,
        w2_shape: Any,
        top_k: int,
        dtype: Any,
        M: int,
        is_marlin: bool = False,
        block_shape: Any = None,
        per_channel_quant: bool = False,
        return_down_config: bool = False,
    ) -> Any:
        if return_down_config:
            return up.to_sglang(), (down.to_sglang(), up.block_m)
        return up.to_sglang()

    scope = override_config(up.to_sglang())
    scope.__enter__()
    setattr(fused_moe_module, _RESOLVER, resolver)
    try:
        yield
    finally:
        setattr(fused_moe_module, _RESOLVER, original)
        # SGLang's override_config restores only on a normal exit (no try/finally), so it is
        # always exited as one; an exception from the block still propagates from here.
        scope.__exit__(None, None, None)
