"""NVTX ranges for capture, measurement and replay, named by bucket and kernel.

Domain `moe_dispatch`; range names like `replay bs=64 kernel=triton_kernels`. The
prefix sits in the domain and names carry no "/", because ncu's NVTX filter reads
"/" as the push/pop nesting separator. Select one range's kernels with
    ncu --nvtx --nvtx-include "moe_dispatch@replay bs=64 kernel=triton_kernels/" ...
or every range of the domain with --nvtx-include "regex:moe_dispatch@.*/".

When ranges are emitted (`nvtx_active`), decided once per `NvtxRanges`:
    MOE_DISPATCH_NVTX unset or "auto"  only when an NVTX tool (nsys, ncu --nvtx) is attached
    MOE_DISPATCH_NVTX=1 (on, true)     always, even with no tool (to measure their cost)
    MOE_DISPATCH_NVTX=0 (off, false)   never
The `nvtx` package hands out a do-nothing domain when no tool is attached, but the
Python around each push/pop (the namer call, the `with`, two calls into the dummy) still
cost ~0.6 us of host time per replay, about as much as the rest of the dispatch; an
inactive `NvtxRanges` says so (`active` False) and `graphs` skips it on the replay path.
Active, event attributes are built once per (stage, bucket, kernel) and cached.
"""

from __future__ import annotations

import contextlib
import os

DOMAIN = "moe_dispatch"
ENV = "MOE_DISPATCH_NVTX"
_ON = ("1", "on", "true", "yes")
_OFF = ("0", "off", "false", "no")


def range_name(stage: str, bucket: int, kernel: str) -> str:
    return f"{stage} bs={bucket} kernel={kernel}"


def nvtx_setting() -> str:
    """'on', 'off' or 'auto' from MOE_DISPATCH_NVTX; ValueError naming the accepted values."""
    raw = os.environ.get(ENV, "auto").strip().lower()
    if raw in ("", "auto"):
        return "auto"
    if raw in _ON:
        return "on"
    if raw in _OFF:
        return "off"
    raise ValueError(f"{ENV}={raw!r}; expected one of auto, {', '.join(_ON)}, {', '.join(_OFF)}")


def tool_attached(domain: object) -> bool:
    """Whether `domain` (from nvtx.get_domain) is a live one: an NVTX tool is attached.

    nvtx returns its shared `DummyDomain` when none is; a version without that class
    counts as attached (ranges kept, the behaviour before this check).
    """
    try:
        from nvtx._lib import DummyDomain
    except ImportError:
        return True
    return not isinstance(domain, DummyDomain)


def nvtx_active(domain: object, setting: str | None = None) -> bool:
    """Whether to emit ranges into `domain` under `setting` (default: the env setting)."""
    setting = nvtx_setting() if setting is None else setting
    if setting == "auto":
        return tool_attached(domain)
    return setting == "on"


class _Range:
    """A reusable push/pop pair for one (stage, bucket, kernel): no allocation per use."""

    __slots__ = ("_domain", "_attribute")

    def __init__(self, domain: object, attribute: object) -> None:
        self._domain = domain
        self._attribute = attribute

    def __enter__(self) -> None:
        self._domain.push_range(self._attribute)

    def __exit__(self, *exc: object) -> None:
        self._domain.pop_range()


_NO_RANGE = contextlib.nullcontext()


class NvtxRanges:
    """A graphs.RangeNamer that emits NVTX push/pop ranges in the moe_dispatch domain.

    `active` (fixed at construction, see the module docstring) False: every call returns
    a shared no-op context, and `graphs.BucketedGraphs` skips the range on replay.
    `setting` overrides MOE_DISPATCH_NVTX ('on', 'off', 'auto').
    """

    def __init__(self, domain: str = DOMAIN, setting: str | None = None) -> None:
        import nvtx

        if setting not in (None, "on", "off", "auto"):
            raise ValueError(f"setting must be 'on', 'off', 'auto' or None, got {setting!r}")
        self._domain = nvtx.get_domain(domain)
        self.active = nvtx_active(self._domain, setting)
        self._ranges: dict[tuple[str, int, str], _Range] = {}

    def __call__(self, stage: str, bucket: int, kernel: str) -> contextlib.AbstractContextManager[None]:
        if not self.active:
            return _NO_RANGE
        key = (stage, bucket, kernel)
        entry = self._ranges.get(key)
        if entry is None:
            attribute = self._domain.get_event_attributes(message=range_name(stage, bucket, kernel))
            entry = self._ranges[key] = _Range(self._domain, attribute)
        return entry
