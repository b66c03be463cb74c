"""NVTX ranges: when they are emitted, and the replay hot path skipping an inactive namer (CPU)."""

import contextlib

import pytest
import torch

from graphs.bucketed import BucketedGraphs
from moe_dispatch import profiling
from moe_dispatch.profiling import NvtxRanges, nvtx_active, nvtx_setting, range_name


@pytest.mark.parametrize(
    "raw, setting", [(None, "auto"), ("", "auto"), ("auto", "auto"), ("1", "on"), ("ON", "on"), ("0", "off")]
)
def test_nvtx_setting_from_env(monkeypatch, raw, setting):
    if raw is None:
        monkeypatch.delenv(profiling.ENV, raising=False)
    else:
        monkeypatch.setenv(profiling.ENV, raw)
    assert nvtx_setting() == setting


def test_nvtx_setting_rejects_unknown_values(monkeypatch):
    monkeypatch.setenv(profiling.ENV, "sometimes")
    with pytest.raises(ValueError, match=r"MOE_DISPATCH_NVTX='sometimes'; expected one of auto, 1, on"):
        nvtx_setting()


def test_ranges_are_off_without_a_tool_unless_forced(monkeypatch):
    import nvtx

    monkeypatch.delenv(profiling.ENV, raising=False)
    domain = nvtx.get_domain(profiling.DOMAIN)  # no NVTX tool attached in the test process
    assert not profiling.tool_attached(domain)
    assert not nvtx_active(domain) and nvtx_active(domain, "on") and not nvtx_active(domain, "off")
    assert nvtx_active(object(), "auto")  # a live (non-dummy) domain: a tool is attached

    off = NvtxRanges()
    assert not off.active
    assert off("replay", 8, "triton") is off("capture", 1, "x")  # one shared no-op, nothing allocated
    with off("replay", 8, "triton"):
        pass

    on = NvtxRanges(setting="on")
    assert on.active
    entry = on("replay", 8, "triton")
    assert entry is on("replay", 8, "triton")  # cached per (stage, bucket, kernel)
    with entry:  # pushes into nvtx's dummy domain: harmless
        pass
    assert range_name("replay", 8, "triton") == "replay bs=8 kernel=triton"
    with pytest.raises(ValueError, match="setting must be"):
        NvtxRanges(setting="maybe")


class _Graph:
    def __init__(self):
        self.replays = 0

    def replay(self):
        self.replays += 1


class _Namer:
    """A range namer that records its calls; `active` as given (absent when None)."""

    def __init__(self, active):
        self.calls = []
        if active is not None:
            self.active = active

    def __call__(self, stage, bucket, variant):
        self.calls.append((stage, bucket, variant))
        return contextlib.nullcontext()


def _served(namer):
    """BucketedGraphs with its serving table filled by hand (capture needs CUDA)."""
    g = BucketedGraphs({"k": lambda x: x}, [torch.zeros(8, 2)], buckets=(1, 8), ranges=namer)
    graph, out = _Graph(), torch.zeros(8, 2)
    g._table = {8: (graph, out, "k")}
    g._kept = {8: {"k": type("Captured", (), {"graph": graph, "output": out})()}}
    return g, graph, out


@pytest.mark.parametrize("active, ranged", [(True, True), (None, True), (False, False)])
def test_replay_skips_an_inactive_namer(active, ranged):
    namer = _Namer(active)
    g, graph, out = _served(namer)
    assert g.replay(8) is out and g.replay_variant(8, "k") is out
    assert graph.replays == 2 and g.replay_counts == {"k": 2}
    assert namer.calls == ([("replay", 8, "k")] * 2 if ranged else [])


def test_replay_with_moe_dispatch_ranges_off(monkeypatch):
    monkeypatch.setenv(profiling.ENV, "off")
    g, graph, out = _served(NvtxRanges())
    assert g.replay(8) is out and graph.replays == 1 and g.replay_counts == {"k": 1}
