"""Tuned tile configs: validation, nearest-bucket lookup, files (round trip, tampered, stale,
foreign), directory lookup, the scoped SGLang override (with fake SGLang modules) and the
`triton_tuned` backend's answers without a table."""

import contextlib
import json
import types

import pytest
import torch

from moe_dispatch.backends.sglang_tile_override import sglang_tile_configs
from moe_dispatch.backends.sglang_triton_tuned import SGLangTritonTunedBackend, tune_command
from moe_dispatch.spec import MoESpec, preset
from moe_dispatch.table_files import content_sha256
from moe_dispatch.tuned_configs import (
    TUNED_DIR_ENV,
    BucketConfig,
    TileConfig,
    TunedConfigError,
    TunedKey,
    TunedTable,
    default_tuned_dir,
    find_table,
    load_table,
    save_table,
    shape_key,
    table_path,
)

SPEC = preset("gpt-oss-120b", tp=8)
KEY = TunedKey(gpu="NVIDIA H200", triton_version="3.5.1", shape=shape_key(SPEC))
SMALL = BucketConfig(TileConfig(16, 32, 64, 1, 4, 2), TileConfig(16, 64, 64, 1, 4, 3), 0.05, 0.04, 0.06)
LARGE = BucketConfig(TileConfig(64, 64, 64, 8, 4, 3), TileConfig(64, 128, 64, 8, 8, 3))


def table(key: TunedKey = KEY) -> TunedTable:
    return TunedTable(key, {256: LARGE, 8: SMALL}, created="2025-01-01T00:00:00+00:00", notes="test")


def test_shape_key_and_labels():
    assert shape_key(SPEC) == "E=128,H=2880,I=360,k=4,bf16,swiglu,bias"
    assert shape_key(preset("qwen3-30b-a3b", dtype=torch.float16)) == "E=128,H=2048,I=768,k=8,fp16,silu,nobias"
    assert SMALL.up.label() == "m16n32k64g1w4s2"
    assert SMALL.label() == "up=m16n32k64g1w4s2 down=m16n64k64g1w4s3"


def test_tile_config_sglang_round_trip_and_defaults():
    config = TileConfig(16, 64, 128, 1, 4, 3)
    assert config.to_sglang() == {
        "BLOCK_SIZE_M": 16,
        "BLOCK_SIZE_N": 64,
        "BLOCK_SIZE_K": 128,
        "GROUP_SIZE_M": 1,
        "num_warps": 4,
        "num_stages": 3,
    }
    assert TileConfig.from_sglang(config.to_sglang()) == config
    assert config.to_sglang() is not config.to_sglang()  # fresh dicts: SGLang pops keys from them
    # SGLang's built-in defaults leave warps/stages to Triton (4, 3).
    default = {"BLOCK_SIZE_M": 64, "BLOCK_SIZE_N": 64, "BLOCK_SIZE_K": 32, "GROUP_SIZE_M": 8}
    assert TileConfig.from_sglang(default) == TileConfig(64, 64, 32, 8, 4, 3)
    with pytest.raises(ValueError, match="unknown tile config key"):
        TileConfig.from_sglang({**config.to_sglang(), "USE_TMA": True})
    with pytest.raises(ValueError, match="lacks"):
        TileConfig.from_sglang({"BLOCK_SIZE_M": 16})


@pytest.mark.parametrize(
    "fields, message",
    [
        ((16, 48, 64, 1, 4, 3), "block_n=48 must be a power of 2"),
        ((8, 64, 64, 1, 4, 3), "block_m=8 must be a power of 2 and >= 16"),
        ((16, 64, 64, 0, 4, 3), "group_m=0 must be >= 1"),
        ((16, 64, 64, 1, 3, 3), "num_warps=3 must be a power of 2"),
        ((16, 64, 64, 1, 4, 0), "num_stages=0 must be >= 1"),
        ((16, 64, 64.0, 1, 4, 3), "block_k must be an int"),
    ],
)
def test_invalid_tile_config(fields, message):
    with pytest.raises(ValueError, match=message):
        TileConfig(*fields)


def test_bucket_config_checks():
    with pytest.raises(ValueError, match="down block_m=32 must equal up block_m=16"):
        BucketConfig(TileConfig(16, 64, 64, 1, 4, 3), TileConfig(32, 64, 64, 1, 4, 3))
    with pytest.raises(ValueError, match="up_ms must be None or a positive finite"):
        BucketConfig(SMALL.up, SMALL.down, up_ms=float("nan"))
    with pytest.raises(ValueError, match="non-empty mapping"):
        TunedTable(KEY, {}, created="now")
    with pytest.raises(ValueError, match="bucket 0 must be a positive int"):
        TunedTable(KEY, {0: SMALL}, created="now")


def test_nearest_bucket_ties_go_to_the_larger():
    t = TunedTable(KEY, {8: SMALL, 16: LARGE}, created="now")
    assert list(t.buckets) == [8, 16]
    assert t.config_for(1) is SMALL and t.config_for(11) is SMALL
    assert t.config_for(12) is LARGE  # |12-8| == |12-16|: the larger bucket
    assert t.config_for(13) is LARGE and t.config_for(5000) is LARGE
    with pytest.raises(ValueError, match="num_tokens must be an int >= 0"):
        t.config_for(-1)


def test_save_load_round_trip(tmp_path):
    path = save_table(table(), tmp_path)
    assert path == tmp_path / "nvidia-h200" / "triton_3_5_1" / "E128_H2880_I360_k4_bf16_swiglu_bias.json"
    assert path == table_path(KEY, tmp_path)
    loaded = load_table(path, expect=KEY)
    assert loaded == table() and list(loaded.buckets) == [8, 256]
    assert loaded.config_for(8) == SMALL and loaded.config_for(200) == LARGE
    data = json.loads(path.read_text())
    assert data["schema"] == 1 and data["key"]["gpu"] == "NVIDIA H200" and len(data["sha256"]) == 64
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp file left behind


def test_tampered_file_fails_its_checksum(tmp_path):
    path = save_table(table(), tmp_path)
    data = json.loads(path.read_text())
    data["buckets"]["8"]["up"]["BLOCK_SIZE_N"] = 128
    path.write_text(json.dumps(data))
    with pytest.raises(TunedConfigError, match=f"{path} fails its checksum"):
        load_table(path)


@pytest.mark.parametrize(
    "field, value", [("gpu", "NVIDIA H100 80GB HBM3"), ("triton_version", "3.4.0"), ("shape", "E=32")]
)
def test_stale_key_names_the_field(tmp_path, field, value):
    path = save_table(table(), tmp_path)
    here = TunedKey(**{**KEY.__dict__, field: value})
    with pytest.raises(TunedConfigError, match=rf"{path} are stale \({field}: file has .*, here '{value}'\)"):
        load_table(path, expect=here)


def test_foreign_and_broken_files(tmp_path):
    path = save_table(table(), tmp_path)
    data = json.loads(path.read_text())
    (tmp_path / "schema.json").write_text(json.dumps({**data, "schema": 2}))
    with pytest.raises(TunedConfigError, match="schema.json has schema 2, this moe-dispatch reads schema 1"):
        load_table(tmp_path / "schema.json")
    (tmp_path / "plan.json").write_text(json.dumps({"format": "moe-dispatch-plan"}))
    with pytest.raises(TunedConfigError, match="not a moe-dispatch tuned-config file"):
        load_table(tmp_path / "plan.json")
    (tmp_path / "half.json").write_text(path.read_text()[:40])
    with pytest.raises(TunedConfigError, match="half.json are not valid JSON"):
        load_table(tmp_path / "half.json")
    with pytest.raises(TunedConfigError, match="cannot read tuned configs"):
        load_table(tmp_path / "missing.json")


def test_invalid_config_with_a_valid_checksum(tmp_path):
    path = save_table(table(), tmp_path)
    data = json.loads(path.read_text())
    data["buckets"]["256"]["down"]["BLOCK_SIZE_M"] = 32
    data["sha256"] = content_sha256(data)
    path.write_text(json.dumps(data))
    with pytest.raises(TunedConfigError, match="invalid configs: bucket 256: down block_m=32 must equal up block_m=64"):
        load_table(path)
    del data["buckets"]["8"]["up"]
    data["sha256"] = content_sha256(data)
    path.write_text(json.dumps(data))
    with pytest.raises(TunedConfigError, match="holds invalid configs: bucket 8: missing field 'up'"):
        load_table(path)


def test_find_table_env_dir_first_and_none_when_absent(tmp_path, monkeypatch):
    shipped, env = tmp_path / "shipped", tmp_path / "env"
    monkeypatch.delenv(TUNED_DIR_ENV, raising=False)
    assert find_table(SPEC, [shipped], key=KEY) is None
    save_table(table(), shipped)
    assert find_table(SPEC, [env, shipped], key=KEY).notes == "test"
    save_table(TunedTable(KEY, {1: SMALL}, created="later", notes="env"), env)
    assert find_table(SPEC, [env, shipped], key=KEY).notes == "env"
    other = TunedKey(KEY.gpu, KEY.triton_version, shape_key(preset("gpt-oss-120b", tp=2)))
    assert find_table(SPEC, [env, shipped], key=other) is None


def test_find_table_default_directories(tmp_path, monkeypatch):
    """$MOE_DISPATCH_TUNED_DIR, then the shipped directory (which holds no table for this key)."""
    key = TunedKey("Test GPU (not real)", "0.0.0", shape_key(SPEC))
    monkeypatch.delenv(TUNED_DIR_ENV, raising=False)
    assert default_tuned_dir().is_dir() and (default_tuned_dir() / "README.md").is_file()
    assert find_table(SPEC, key=key) is None
    save_table(table(key), tmp_path)
    monkeypatch.setenv(TUNED_DIR_ENV, str(tmp_path))
    assert find_table(SPEC, key=key) == table(key)


def test_broken_file_in_lookup_raises(tmp_path):
    path = save_table(table(), tmp_path)
    path.write_text("{")
    with pytest.raises(TunedConfigError, match="not valid JSON"):
        find_table(SPEC, [tmp_path], key=KEY)


# ---- the scoped override, against stand-ins for SGLang's modules ------------------------------


class FakeSGLang:
    """SGLang's override_config (no try/finally, as in SGLang) and fused_moe's lookup name."""

    def __init__(self):
        self.override = None
        self.entered = []

        def original(*args, **kwargs):
            return "sglang's own lookup"

        self.original = original
        self.fused_moe = types.SimpleNamespace(try_get_optimal_moe_config=original)

    @contextlib.contextmanager
    def override_config(self, config):
        self.entered.append(config)
        old, self.override = self.override, config
        yield
        self.override = old

    def scope(self, bucket):
        return sglang_tile_configs(bucket, fused_moe_module=self.fused_moe, override_config=self.override_config)


def test_tile_configs_inside_the_scope():
    sgl = FakeSGLang()
    with sgl.scope(SMALL):
        lookup = sgl.fused_moe.try_get_optimal_moe_config
        up, (down, block_m) = lookup((128, 720, 2880), (128, 2880, 360), 4, None, 8, return_down_config=True)
        assert up == SMALL.up.to_sglang() and down == SMALL.down.to_sglang() and block_m == 16
        # positionally too, and the plain form returns the up config alone
        assert lookup(None, None, 4, None, 8, False, None, False, True)[0] == SMALL.up.to_sglang()
        assert lookup((128, 720, 2880), (128, 2880, 360), 4, None, 8) == SMALL.up.to_sglang()
        assert sgl.override == SMALL.up.to_sglang()
    assert sgl.entered == [SMALL.up.to_sglang()]
    assert sgl.fused_moe.try_get_optimal_moe_config is sgl.original and sgl.override is None


def test_tile_configs_restored_after_an_exception_and_nested():
    sgl = FakeSGLang()
    with pytest.raises(KeyError, match="boom"):
        with sgl.scope(LARGE):
            raise KeyError("boom")
    assert sgl.fused_moe.try_get_optimal_moe_config is sgl.original and sgl.override is None
    with sgl.scope(SMALL):
        with sgl.scope(LARGE):
            assert sgl.override == LARGE.up.to_sglang()
        assert sgl.override == SMALL.up.to_sglang()
        assert sgl.fused_moe.try_get_optimal_moe_config(0, 0, 1, None, 1) == SMALL.up.to_sglang()
    assert sgl.fused_moe.try_get_optimal_moe_config is sgl.original and sgl.override is None


def test_tile_configs_need_the_lookup_name():
    with pytest.raises(RuntimeError, match="has no try_get_optimal_moe_config"):
        with sglang_tile_configs(
            SMALL, fused_moe_module=types.SimpleNamespace(), override_config=FakeSGLang().override_config
        ):
            pass


# ---- the backend's answers (no SGLang or GPU needed) ----------------------------------------


def test_backend_says_no_without_a_table_naming_the_file(tmp_path):
    backend = SGLangTritonTunedBackend(directories=[tmp_path], key_for=lambda spec: KEY)
    answer = backend.supports(SPEC)
    assert not answer
    assert str(table_path(KEY, tmp_path)) in answer.reason
    assert "run python -m bench.tune --preset gpt-oss-120b --tp 8 to make one" in answer.reason
    save_table(table(), tmp_path)
    assert backend.supports(SPEC) and backend.lookup(SPEC)[0] == table()
    table_path(KEY, tmp_path).write_text("[]")
    assert "not a moe-dispatch tuned-config file" in backend.supports(SPEC).reason


def test_backend_checks_dtype_first_and_needs_a_gpu_for_its_key():
    fp32 = MoESpec(num_experts=4, top_k=2, hidden_size=8, intermediate_size=4, dtype=torch.float32)
    assert "bf16/fp16" in SGLangTritonTunedBackend(key_for=lambda spec: KEY).supports(fp32).reason

    def no_gpu(spec):
        raise RuntimeError("tuned configs are per GPU and no CUDA GPU is visible")

    assert "no CUDA GPU" in SGLangTritonTunedBackend(key_for=no_gpu).supports(SPEC).reason
    assert tune_command(fp32) == "python -m bench.tune --preset <model> --tp <tp>"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU answer")
def test_registered_backend_says_why_here():
    from moe_dispatch import available_kernels

    answer = available_kernels(SPEC)["triton_tuned"]
    assert not answer and any(word in answer.reason for word in ("not installed", "no CUDA GPU"))
