"""Opt-in candidates beside the two runners (`--adaptive-moe-extra-kernels`), set up at start-up.

    triton_tuned  a tuned table (moe_dispatch.tuned_configs) for the layers' shape, this GPU and
                  Triton version -> the Triton runner runs inside the table's tile configs
    triton_kernels_tuned
                  the triton_kernels runner with moe-dispatch's routing metadata and top-k
                  combine, and with the opt flags per matmul of a flags table
                  (moe_dispatch.tk_flags_table) for the same key where there is one (without:
                  triton_kernels' own flags)
    small_batch   our decode kernel (moe_dispatch.backends.small_batch), prepared per layer over
                  the layer's own Triton-layout weights (no copy); it routes from the router
                  logits that SGLang's standard top-k output carries

Each one that cannot run here is logged with the reason and left out; the start-up probe then
measures the candidates that remain (`KernelSwitch.kernels`). Every TP rank decides alike (same
files, same layers), so the candidate lists agree.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

from moe_dispatch.sglang_plugin.kernel_switch import SMALL_BATCH_BACKEND, TK_TUNED_KERNEL, TUNED_KERNEL, KernelSwitch

logger = logging.getLogger("moe_dispatch.sglang_plugin")


def enable(names: Sequence[str], pairs: list[tuple[Any, Any]], switch: KernelSwitch, rank0: bool) -> None:
    """Enable each requested extra candidate that can run on these (TopK, FusedMoE) pairs."""
    for name in names:
        setup = {TUNED_KERNEL: enable_tuned, TK_TUNED_KERNEL: enable_tk_tuned, SMALL_BATCH_BACKEND: enable_small_batch}
        enabled, detail = setup[name](pairs, switch)
        if rank0:
            if enabled:
                note = f" ({detail})" if detail else ""
                logger.info("adaptive MoE: %s is a candidate for %d layer(s)%s", name, len(pairs), note)
            else:
                logger.warning("adaptive MoE: %s is not a candidate: %s", name, detail)


def enable_tuned(pairs: list[tuple[Any, Any]], switch: KernelSwitch) -> tuple[bool, str]:
    """triton_tuned from the tuned table for `switch.first_spec`: (enabled, why not)."""
    from moe_dispatch.tuned_configs import find_table

    return _enable_from_table(pairs, switch, find_table, "tuned table", "python -m bench.tune", switch.enable_tuned)


def enable_tk_tuned(pairs: list[tuple[Any, Any]], switch: KernelSwitch) -> tuple[bool, str]:
    """triton_kernels_tuned, with the flags table for `switch.first_spec` when there is one:
    (enabled, a note on the missing table or why not)."""
    from moe_dispatch.tk_flags_table import find_tk_table

    command = "python -m bench.tk_flags_probe --tables DIR"
    return _enable_from_table(
        pairs,
        switch,
        find_tk_table,
        "triton_kernels flags table",
        command,
        switch.enable_tk_tuned,
        without="triton_kernels' own flags with moe-dispatch's routing and combine",
    )


def _enable_from_table(
    pairs: list[tuple[Any, Any]],
    switch: KernelSwitch,
    find: Callable[[Any], Any],
    what: str,
    command: str,
    enable: Callable[[Any, list[object]], None],
    without: str | None = None,
) -> tuple[bool, str]:
    """Find the table `what` for `switch.first_spec` and `enable` it for the pairs' layers:
    (enabled, why not). `without`: what runs when the table is absent (`enable` gets None, the
    note says so); None: the table is required."""
    from moe_dispatch.tuned_configs import TunedConfigError, shape_key

    spec = switch.first_spec
    assert spec is not None
    try:
        table = find(spec)
    except TunedConfigError as error:
        return False, f"{what} unusable: {error}"
    missing = f"no {what} for {shape_key(spec)} on this GPU and Triton ({command} makes one)"
    if table is None and without is None:
        return False, missing
    enable(table, [moe.quant_method for _topk, moe in pairs])
    return True, "" if table is not None else f"{missing}: {without}"


def enable_small_batch(pairs: list[tuple[Any, Any]], switch: KernelSwitch) -> tuple[bool, str]:
    """small_batch over each layer's weights: (enabled, why not: any layer refused)."""
    from moe_dispatch.backends import get_backend
    from moe_dispatch.weights import ExpertWeights

    spec = switch.first_spec
    assert spec is not None
    backend = get_backend(SMALL_BATCH_BACKEND)
    kernels = {}
    for _topk, moe in pairs:
        weights = ExpertWeights(
            w13=moe.w13_weight,
            w2=moe.w2_weight,
            b13=getattr(moe, "w13_weight_bias", None),
            b2=getattr(moe, "w2_weight_bias", None),
        )
        try:
            kernels[moe.quant_method] = backend.prepare(spec, weights)
        except (TypeError, ValueError) as error:
            return False, str(error)
    switch.enable_small_batch(kernels)
    return True, ""
