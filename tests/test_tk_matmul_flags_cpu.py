"""Per-matmul opt flags for triton_kernels (moe_dispatch.backends.tk_matmul_flags) and the
variants bench.tk_flags_probe sweeps: pure Python, with a stand-in matmul_ogs module."""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import types

import pytest

from bench.tk_flags_probe import matmul_variants, stages_that_fit, variants_for, with_own_split
from bench.tk_flags_report import store_table
from moe_dispatch import preset
from moe_dispatch.backends.base import Support
from moe_dispatch.backends.tk_matmul_flags import MatmulFlags, gemm_keys, scoped_matmul_flags
from moe_dispatch.backends.triton_kernels_tuned import TritonKernelsTunedBackend
from moe_dispatch.tk_flags_table import TkBucket, TkFlagsTable, load_tk_table, save_tk_table, tk_table_path
from moe_dispatch.tuned_configs import TunedConfigError, TunedKey, shape_key

H100_SMEM = 232448  # shared_memory_per_block_optin on H100 / H200


@dataclasses.dataclass
class FakeOptFlags:  # the fields triton_kernels' OptFlags has that matter here, plus two it keeps
    block_m: int = 16
    block_n: int = 256
    block_k: int = 64
    num_warps: int = 4
    num_stages: int = 4
    is_persistent: bool = True
    group_m: int = 8
    split_k: int = 1


def fake_matmul_ogs() -> types.SimpleNamespace:
    calls = []

    def make_opt_flags(out_dtype, lhs_dtype, rhs_dtype, precision_config, batch_size, m, n, k, routing_data,
                       can_use_persistent_tma, can_use_split_k, epilogue_effective_itemsize, x_transpose,
                       has_y_acc_in, block_k):  # fmt: skip
        calls.append((n, k))
        return FakeOptFlags()

    return types.SimpleNamespace(make_opt_flags=make_opt_flags, calls=calls)


def _call(module, n, k, tma=True, block_k=None, can_split=False):
    return module.make_opt_flags(None, None, None, None, 1, 64, n, k, None, tma, can_split, 2, False, False, block_k)


def test_flags_validate_and_label_round_trip():
    flags = MatmulFlags(True, 16, 256, 64, 4, 4)
    assert flags.label() == "P-m16n256k64w4s4"
    assert MatmulFlags.from_label("NP-m32n128k128w8s3") == MatmulFlags(False, 32, 128, 128, 8, 3)
    for bad in ("P-m16n256k64w4", "X-m16n256k64w4s4", 7):
        with pytest.raises(ValueError, match="not a matmul flags label"):
            MatmulFlags.from_label(bad)
    with pytest.raises(ValueError, match="block_n must be a positive power of 2"):
        MatmulFlags(True, 16, 96, 64, 4, 4)
    with pytest.raises(ValueError, match="block_m must be 16..128"):
        MatmulFlags(True, 256, 256, 64, 4, 4)
    with pytest.raises(ValueError, match="num_stages"):
        MatmulFlags(True, 16, 256, 64, 4, 0)
    with pytest.raises(ValueError, match="is_persistent must be a bool"):
        MatmulFlags(1, 16, 256, 64, 4, 4)


def test_scoped_flags_steer_only_the_named_gemm_and_restore():
    module = fake_matmul_ogs()
    original = module.make_opt_flags
    keys = gemm_keys(2880, 360)
    down = MatmulFlags(False, 32, 128, 128, 8, 3)
    with scoped_matmul_flags({keys["down"]: down}, module=module) as steered:
        assert steered
        up_flags = _call(module, *keys["up"])
        down_flags = _call(module, *keys["down"])
    assert up_flags == FakeOptFlags()  # not named: triton_kernels' own
    assert MatmulFlags.of(down_flags) == down
    assert (down_flags.group_m, down_flags.split_k) == (8, 1)  # fields outside the six stay its own
    assert module.make_opt_flags is original


def test_split_k_is_an_optional_seventh_flag():
    flags = MatmulFlags(True, 16, 256, 128, 4, 3, split_k=8)
    assert flags.label() == "P-m16n256k128w4s3-split8"
    assert MatmulFlags.from_label(flags.label()) == flags
    assert MatmulFlags.from_label("P-m16n256k128w4s3").split_k is None  # tables written before the split
    for bad in (0, True, 2.0):
        with pytest.raises(ValueError, match="split_k must be an int >= 1"):
            MatmulFlags(True, 16, 256, 128, 4, 3, split_k=bad)
    assert MatmulFlags.of(dataclasses.asdict(FakeOptFlags(split_k=5))).split_k is None  # the six tile fields
    assert with_own_split(dataclasses.asdict(FakeOptFlags(split_k=5))).split_k == 5


def test_scoped_flags_set_split_k_only_where_triton_kernels_allows_a_split():
    module = fake_matmul_ogs()
    up = MatmulFlags(True, 16, 256, 128, 4, 3, split_k=8)
    tiles_only = MatmulFlags(True, 16, 256, 128, 4, 3)
    with scoped_matmul_flags({(720, 2880): up, (2880, 360): tiles_only}, module=module):
        allowed = _call(module, 720, 2880, can_split=True)
        refused = _call(module, 720, 2880, can_split=False)  # e.g. a matmul with a fused scatter
        own = _call(module, 2880, 360, can_split=True)
    assert allowed.split_k == 8 and MatmulFlags.of(allowed) == tiles_only
    assert refused.split_k == 1 and MatmulFlags.of(refused) == tiles_only
    assert own.split_k == 1  # no split set: triton_kernels' own


def test_scoped_flags_see_through_a_wrapping_recorder():
    """A functools.wraps wrapper (e.g. bench.tk_views_probe's recorder) does not hide n and k;
    a bare (*args) wrapper with no triton_kernels to read the parameters from is refused."""
    module = fake_matmul_ogs()
    plain = module.make_opt_flags

    @functools.wraps(plain)
    def recorder(*args, **kwargs):
        return plain(*args, **kwargs)

    module.make_opt_flags = recorder
    flags = MatmulFlags(False, 32, 64, 64, 4, 2)
    with scoped_matmul_flags({(256, 192): flags}, module=module):
        assert MatmulFlags.of(_call(module, 256, 192)) == flags
    module.make_opt_flags = lambda *args, **kwargs: plain(*args, **kwargs)
    with pytest.raises(RuntimeError, match="cannot tell the GEMM's n and k"):
        with scoped_matmul_flags({(256, 192): flags}, module=module):
            pass


def test_scoped_flags_leave_inner_block_k_and_no_tma_calls_alone_and_restore_on_error():
    module = fake_matmul_ogs()
    original = module.make_opt_flags
    flags = MatmulFlags(True, 64, 128, 32, 8, 3)
    with pytest.raises(RuntimeError, match="boom"):
        with scoped_matmul_flags({(720, 2880): flags}, module=module):
            assert _call(module, 720, 2880, block_k=64) == FakeOptFlags()
            assert _call(module, 720, 2880, tma=False) == FakeOptFlags()  # persistent needs TMA
            raise RuntimeError("boom")
    assert module.make_opt_flags is original
    with scoped_matmul_flags({}, module=module) as steered:
        assert not steered and module.make_opt_flags is original


@pytest.mark.parametrize("n,k", [(720, 2880), (2880, 360), (2880, 1440), (1536, 2048), (2048, 768)])
def test_variants_fit_shared_memory_and_differ_from_the_default(n, k):
    for persistent, block_m in itertools.product((True, False), (16, 32, 64, 128)):
        warps = max(block_m * 256 // 4096, 4 if persistent else 1)
        base = MatmulFlags(persistent, block_m, 256, 64, warps, 2)
        default = dataclasses.replace(base, num_stages=min(4, stages_that_fit(base, H100_SMEM)))
        variants = matmul_variants(default, n, k, H100_SMEM)
        assert variants and default not in variants and len(set(variants)) == len(variants)
        for v in variants:
            assert 2 <= v.num_stages <= stages_that_fit(v, H100_SMEM), v
        assert any(v.is_persistent != persistent for v in variants)  # the flip is always tried


def test_split_variants_for_a_long_k_only_and_only_they_set_split_k():
    own = MatmulFlags(True, 16, 256, 64, 4, 4, split_k=4)  # triton_kernels' own at 32 tokens, tp=8 (up)
    variants = matmul_variants(own, 720, 2880, H100_SMEM)
    split = [v for v in variants if v.split_k is not None]
    on_own_tile = sorted(v.split_k for v in split if v.block_k == 64)
    on_doubled_k = sorted(v.split_k for v in split if v.block_k == 128)
    assert on_own_tile == [1, 2, 3, 6, 8, 12, 16]  # every slice keeps >= 2 blocks of K; 4 is its own
    assert on_doubled_k == [1, 2, 3, 4, 6, 8]  # 2880 >= 2 x 8 x 128, not 2 x 12 x 128
    doubled = MatmulFlags(True, 16, 256, 128, 4, 3)  # the most stages (<= 4) that fit
    assert all(dataclasses.replace(v, split_k=None) in (dataclasses.replace(own, split_k=None), doubled)
               for v in split), split  # fmt: skip
    # A tile twice as deep that does not fit shared memory gets no split variants.
    deep = MatmulFlags(True, 16, 256, 128, 4, 3, split_k=5)
    assert {v.block_k for v in matmul_variants(deep, 720, 2880, H100_SMEM) if v.split_k} == {128}
    assert not [v for v in matmul_variants(dataclasses.replace(deep, split_k=1), 2880, 360, H100_SMEM) if v.split_k]
    assert not [v for v in matmul_variants(dataclasses.replace(own, split_k=None), 720, 2880, H100_SMEM) if v.split_k]


def test_variants_for_vary_one_phase_each():
    keys = gemm_keys(2880, 360)
    default = MatmulFlags(True, 16, 256, 64, 4, 4)
    variants = variants_for({"up": default, "down": default}, keys, H100_SMEM)
    assert variants[0].name == "default" and variants[0].up is None and variants[0].down is None
    for v in variants[1:]:
        assert (v.up is None) != (v.down is None)
        phase = "up" if v.up is not None else "down"
        assert v.name == f"{phase}:{getattr(v, phase).label()}"


# ---- the tuned flags table and backend triton_kernels_tuned ------------------------------------

KEY = TunedKey("NVIDIA H200", "3.6.0", shape_key(preset("gpt-oss-120b", tp=8)))
UP = MatmulFlags(True, 16, 256, 128, 4, 3)


def _point(T: int, gain: float, up: str | None, down: str | None) -> dict:
    default = [100.0, 101.0, 99.0]
    return {
        "tokens": T,
        "gain": gain,
        "combined": {"up": up, "down": down},
        "median_us": {"default": 100.0},
        "side_by_side_us": {"default": default, "combined": [100.0 / gain] * 3},
    }


def test_tk_table_round_trips_and_refuses_tampering(tmp_path):
    table = TkFlagsTable(KEY, {128: TkBucket(UP, None, 260.6, 241.9), 1024: TkBucket(None, None, 297.6, 297.6)}, "now")
    path = save_tk_table(table, tmp_path)
    assert path == tk_table_path(KEY, tmp_path) and path.parent.name == "triton_kernels"
    assert load_tk_table(path, expect=KEY) == table
    data = json.loads(path.read_text())
    data["buckets"]["128"]["up"] = "P-m16n256k64w4s3"
    path.write_text(json.dumps(data))
    with pytest.raises(TunedConfigError, match="fails its checksum"):
        load_tk_table(path)
    other = TunedKey("NVIDIA H100 80GB HBM3", "3.6.0", KEY.shape)
    save_tk_table(table, tmp_path)
    with pytest.raises(TunedConfigError, match="stale .*gpu: file has 'NVIDIA H200'"):
        load_tk_table(path, expect=other)
    with pytest.raises(TunedConfigError, match="not a moe-dispatch triton_kernels flags file"):
        TkFlagsTable.from_json({"format": "moe-dispatch-tuned-configs"})


def test_tk_table_uses_the_nearest_bucket_only_within_2x():
    table = TkFlagsTable(KEY, {32: TkBucket(None, UP), 128: TkBucket(UP, None)}, "now")
    assert table.flags_for(128).up == UP and table.flags_for(100).up == UP
    assert table.flags_for(64) == table.buckets[128]  # log2 tie between 32 and 128 goes to the larger
    assert table.flags_for(16).down == UP and table.flags_for(1) is None and table.flags_for(257) is None
    assert table.flags_for(128).by_gemm(2880, 360) == {(720, 2880): UP}
    with pytest.raises(ValueError, match="num_tokens"):
        table.flags_for(-1)


def test_store_table_keeps_own_flags_where_nothing_won_and_merges(tmp_path):
    spec = preset("gpt-oss-120b", tp=8)
    store_table(spec, [_point(128, 1.077, UP.label(), None), _point(1024, 1.001, "P-m64n256k64w8s4", None)],
                tmp_path, 0.01, "test", key=KEY)  # fmt: skip
    path = store_table(spec, [_point(256, 1.066, None, UP.label())], tmp_path, 0.01, "test", key=KEY)
    table = load_tk_table(path, expect=KEY)
    assert sorted(table.buckets) == [128, 256, 1024]
    assert table.buckets[128].up == UP and table.buckets[128].down is None
    assert table.buckets[256].down == UP
    assert table.buckets[1024] == TkBucket(None, None, 100.0, 100.0)  # 0.1 % is below min_gain: own flags


def test_triton_kernels_tuned_lookup_names_the_file_it_wants(tmp_path):
    spec = preset("gpt-oss-120b", tp=8)
    backend = TritonKernelsTunedBackend(directories=[tmp_path], key_for=lambda s: KEY)
    table, answer = backend.lookup(spec)
    assert table is None and str(tk_table_path(KEY, tmp_path)) in answer.reason
    assert "python -m bench.tk_flags_probe --preset gpt-oss-120b --tp 8" in answer.reason
    save_tk_table(TkFlagsTable(KEY, {128: TkBucket(UP, None)}, "now"), tmp_path)
    table, answer = backend.lookup(spec)
    assert answer and table.buckets[128].up == UP

    def no_gpu(spec):
        raise RuntimeError("no CUDA GPU is visible")

    assert "no CUDA GPU" in TritonKernelsTunedBackend([tmp_path], key_for=no_gpu).lookup(spec)[1].reason


def test_the_shipped_h200_flags_table_loads():
    """The GPT-OSS tp=8 flags table shipped for the H200 passes the schema, checksum and key checks;
    each bucket stores flags only where they beat triton_kernels' own side by side."""
    from moe_dispatch.tk_flags_table import find_tk_table
    from moe_dispatch.tuned_configs import default_tuned_dir

    table = find_tk_table(preset("gpt-oss-120b", tp=8), [default_tuned_dir()], key=KEY)
    assert table is not None and sorted(table.buckets) == [32, 64, 128, 256, 512, 1024, 2048, 4096]
    for bucket, entry in table.buckets.items():
        if entry.up is None and entry.down is None:
            assert entry.tuned_us == entry.default_us, bucket
        else:
            assert entry.tuned_us < entry.default_us * 0.99, bucket


def test_triton_kernels_tuned_runs_without_a_table_but_refuses_a_broken_one(tmp_path):
    from moe_dispatch.backends.sglang_triton_tuned import SGLangTritonTunedBackend

    spec = preset("gpt-oss-120b", tp=8)
    backend = TritonKernelsTunedBackend(directories=[tmp_path], key_for=lambda s: KEY)
    assert backend.table_for(spec) == (None, Support.yes())  # own flags, moe-dispatch's combine
    tile_backend = SGLangTritonTunedBackend(directories=[tmp_path], key_for=lambda s: KEY)
    table, answer = tile_backend.table_for(spec)
    assert table is None and not answer and "no tuned table" in answer.reason  # tile tables stay required
    path = tk_table_path(KEY, tmp_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("{not json")
    table, answer = backend.table_for(spec)
    assert table is None and not answer and str(path) in answer.reason


def test_a_backend_whose_table_is_required_refuses_to_bind_none():
    import torch

    from moe_dispatch import SILU, ExpertWeights, MoESpec, Routing
    from moe_dispatch.backends.sglang_triton_tuned import SGLangTritonTunedBackend

    spec = MoESpec(8, 2, 32, 16, SILU, False, torch.bfloat16, Routing.SOFTMAX_TOPK_RENORM)
    weights = ExpertWeights.random(spec, seed=0)
    with pytest.raises(ValueError, match="'triton_tuned' needs a table"):
        SGLangTritonTunedBackend(key_for=lambda s: KEY).check_binding(spec, weights, None)
