"""NVTX ranges for capture, measurement and replay, named by bucket and kernel.

Domain `moe_dispatch`; range names like `replay bs=64 kernel=triton_kernels`. The
prefix sits in the domain and names carry no "/", because ncu's NVTX filter reads
"/" as the push/pop nesting separator. Select one range's kernels with
    ncu --nvtx --nvtx-include "moe_dispatch@replay bs=64 kernel=triton_kernels/" ...
or every range of the domain with --nvtx-include "regex:moe_dispatch@.*/".

Cost: the `nvtx` package hands out a do-nothing domain when no profiler is attached;
event attributes are built once per (stage, bucket, kernel) and cached, so a replay
pays two cheap calls (measured ~0.06 us per push/pop pair on our CPU machine).
"""

from __future__ import annotations

DOMAIN = "moe_dispatch"


def range_name(stage: str, bucket: int, kernel: str) -> str:
    return f"{stage} bs={bucket} kernel={kernel}"


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


class NvtxRanges:
    """A graphs.RangeNamer that emits NVTX push/pop ranges in the moe_dispatch domain."""

    def __init__(self, domain: str = DOMAIN) -> None:
        import nvtx

        self._domain = nvtx.get_domain(domain)
        self._ranges: dict[tuple[str, int, str], _Range] = {}

    def __call__(self, stage: str, bucket: int, kernel: str) -> _Range:
        key = (stage, bucket, kernel)
        entry = self._ranges.get(key)
        if entry is None:
            attribute = self._domain.get_event_attributes(message=range_name(stage, bucket, kernel))
            entry = self._ranges[key] = _Range(self._domain, attribute)
        return entry
