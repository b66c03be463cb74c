"""The minimal SGLang process state that SGLang's MoE functions read.

Inside a running SGLang server the scheduler publishes a `ServerArgs` and builds a
tensor-parallel group before any MoE layer runs. A standalone moe-dispatch kernel
(tests, `make bench`) has neither, so `ensure_sglang_state()` provides both, once:

* a published `ServerArgs` holding the dataclass defaults, set without running
  `__post_init__` (which would try to resolve a model from the hub);
* a one-rank tensor-parallel group stand-in, installed only when no TP group
  exists (SGLang's TopK asks for it to decide on symmetric memory, which is off).

Nothing is replaced when SGLang already set these up (inside a server).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util

from moe_dispatch.backends.base import Support


@functools.cache
def sglang_support() -> Support:
    """Whether SGLang's MoE runners can run here, with the reason if not."""
    import torch

    if importlib.util.find_spec("sglang") is None:
        return Support.no("SGLang is not installed (pip install 'moe-dispatch[sglang]')")
    if not torch.cuda.is_available():
        return Support.no("no CUDA GPU (torch.cuda.is_available() is False)")
    try:
        import sglang.srt.layers.moe.moe_runner.runner  # noqa: F401
        import sglang.srt.layers.moe.topk  # noqa: F401
    except Exception as error:  # a broken install must not break moe_dispatch
        return Support.no(f"SGLang's MoE runner failed to import: {type(error).__name__}: {error}")
    return Support.yes()


def sglang_version() -> str | None:
    try:
        from importlib.metadata import version

        return version("sglang")
    except Exception:
        try:
            import sglang

            return getattr(sglang, "__version__", None)
        except Exception:
            return None


class _SingleRankGroup:
    """Stands in for SGLang's GroupCoordinator of a one-rank TP group."""

    world_size = 1
    rank_in_group = 0
    rank = 0
    local_rank = 0
    device_group = None
    cpu_group = None
    unique_name = "moe_dispatch_tp1"


@functools.cache
def ensure_sglang_state() -> None:
    from sglang.srt import runtime_context
    from sglang.srt.distributed import parallel_state
    from sglang.srt.server_args import ServerArgs

    try:
        runtime_context.get_server_args()
    except ValueError:  # nothing published: we are outside a server
        args = ServerArgs.__new__(ServerArgs)
        for field in dataclasses.fields(ServerArgs):
            if field.default is not dataclasses.MISSING:
                value = field.default
            elif field.default_factory is not dataclasses.MISSING:
                value = field.default_factory()
            else:
                value = None
            object.__setattr__(args, field.name, value)
        object.__setattr__(args, "model_path", "moe-dispatch-standalone")
        runtime_context.publish(args, role="test")
    if getattr(parallel_state, "_TP", None) is None:
        parallel_state._TP = _SingleRankGroup()
