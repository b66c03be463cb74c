"""CPU tests of the serving benchmark (bench.serving): model configs, modes, points, command lines,
log and result parsing, the driver with a stand-in for SGLang's one-batch benchmark, reports."""

from __future__ import annotations

import collections
import itertools
import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from bench.serving import __main__ as cli
from bench.serving import driver, host, logparse, models, modes, points, records, report, tokenizer
from bench.serving.points import Point, PointPlan
from bench.serving.records import RunRecord

PLAN = PointPlan((1, 8, 64), 64, 16, (512, 2048), prefill_repeats=3)


# ---- models ----


def test_gpt_oss_120b_tp8_per_rank_config():
    c = models.model_config("gpt-oss-120b", tp=8)
    assert c["architectures"] == ["GptOssForCausalLM"] and c["model_type"] == "gpt_oss"
    assert c["num_hidden_layers"] == 36 and c["hidden_size"] == 2880 and c["intermediate_size"] == 360
    assert c["num_local_experts"] == 128 and c["num_experts_per_tok"] == c["experts_per_token"] == 4
    assert (c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]) == (8, 1, 64)
    assert c["vocab_size"] == 25152  # 201088 / 8 = 25136, rounded up to 64
    assert c["layer_types"][:3] == ["sliding_attention", "full_attention", "sliding_attention"]
    assert len(c["layer_types"]) == 36 and c["sliding_window"] == 128 and c["swiglu_limit"] == 7.0
    assert c["rope_scaling"]["rope_type"] == "yarn" and c["rope_scaling"]["factor"] == 32.0
    assert "quantization_config" not in c  # bf16: SGLang builds UnquantizedFusedMoEMethod
    assert 29.0e9 < models.weight_bytes(c) < 29.6e9


def test_gpt_oss_120b_tp2_depth_fits_the_weight_budget():
    assert models.default_layers("gpt-oss-120b", 2) == 30
    c30 = models.model_config("gpt-oss-120b", 2)
    assert c30["num_hidden_layers"] == 30 and len(c30["layer_types"]) == 30
    assert c30["intermediate_size"] == 1440 and (c30["num_attention_heads"], c30["num_key_value_heads"]) == (32, 4)
    assert (
        models.weight_bytes(c30)
        <= models.WEIGHT_BUDGET
        < models.weight_bytes(models.model_config("gpt-oss-120b", 2, 32))
    )
    # Per layer by hand: experts + float32 biases, attention (+ biases, sinks), router (+ bias), norms.
    layer = 128 * 3 * 1440 * 2880 * 2 + 128 * (2 * 1440 + 2880) * 4
    layer += 2880 * 40 * 64 * 2 + 32 * 64 * 2880 * 2 + (40 * 64 + 2880) * 2 + 32 * 4 + 2880 * 128 * 2 + 128 * 2
    layer += 2 * 2880 * 2
    assert models.weight_bytes(c30) == 30 * layer + 2 * 100544 * 2880 * 2 + 2880 * 2


def test_qwen3_30b_a3b_config_keys_sglang_reads():
    c = models.model_config("qwen3-30b-a3b", tp=1)
    assert c["architectures"] == ["Qwen3MoeForCausalLM"] and c["model_type"] == "qwen3_moe"
    assert c["num_hidden_layers"] == 48 and c["hidden_size"] == 2048 and c["moe_intermediate_size"] == 768
    assert c["num_experts"] == 128 and c["num_experts_per_tok"] == 8 and c["norm_topk_prob"] is True
    assert (c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]) == (32, 4, 128)
    assert c["vocab_size"] == 151936 and c["attention_bias"] is False and c["max_position_embeddings"] == 40960
    assert 60e9 < models.weight_bytes(c) < 62.5e9  # a 30.5B-parameter model in bf16
    c4 = models.model_config("qwen3-30b-a3b", tp=4)
    assert (c4["moe_intermediate_size"], c4["num_attention_heads"], c4["num_key_value_heads"]) == (192, 8, 1)
    assert c4["vocab_size"] == 38016


def test_mixtral_keeps_heads_and_a_usable_vocab():
    c = models.model_config("mixtral-8x7b", tp=8)
    assert c["intermediate_size"] == 1792 and c["num_local_experts"] == 8 and c["num_experts_per_tok"] == 2
    assert (c["num_attention_heads"], c["num_key_value_heads"]) == (32, 8) and "head_dim" not in c
    assert c["vocab_size"] == models.MIN_VOCAB  # 32000 / 8 would be below one_batch's prompt ids


def test_full_model_for_a_real_tp_run():
    c = models.model_config("gpt-oss-120b", tp=8, per_rank=False)
    assert c["intermediate_size"] == 2880 and c["num_attention_heads"] == 64 and c["vocab_size"] == 201088
    assert c["num_hidden_layers"] == 36


def test_kv_bytes_and_mem_fraction():
    c = models.model_config("gpt-oss-120b", tp=8)
    assert models.kv_bytes_per_token(c) == 36 * 2 * 1 * 64 * 2
    gpu = int(139.8 * 2**30)
    fraction = models.mem_fraction_static(models.weight_bytes(c), gpu)
    assert fraction == 0.31 and fraction * gpu - models.weight_bytes(c) >= models.KV_BUDGET
    assert models.mem_fraction_static(10, gpu) == 0.2
    with pytest.raises(ValueError, match="fewer layers"):
        models.mem_fraction_static(130 * 2**30, gpu)


def test_parse_model_and_keys():
    assert models.parse_model("gpt-oss-120b:tp8").key == "gpt-oss-120b-tp8"
    assert models.parse_model("gpt-oss-120b:tp2").depth == 30
    assert models.parse_model("gpt-oss-120b:tp2:layers=30").key == "gpt-oss-120b-tp2"
    assert models.parse_model("gpt-oss-120b:tp2:layers=4").key == "gpt-oss-120b-tp2-4l"
    assert models.parse_model("qwen3-30b-a3b").tp == 1
    assert models.parse_model("qwen3-30b-a3b", default_tp=4).tp == 4
    with pytest.raises(ValueError, match="unknown model"):
        models.parse_model("llama")
    with pytest.raises(ValueError, match="bad part"):
        models.parse_model("gpt-oss-120b:8")
    with pytest.raises(ValueError, match="does not divide"):
        models.parse_model("gpt-oss-120b:tp3")
    with pytest.raises(ValueError, match="layers"):
        models.parse_model("gpt-oss-120b:tp8:layers=37")


def test_tokenizer_files_and_model_folder(tmp_path):
    files = tokenizer.tokenizer_files()
    vocab = files["tokenizer.json"]["model"]["vocab"]
    assert sorted(vocab.values()) == list(range(len(vocab))) == list(range(512))
    config = models.model_config("gpt-oss-120b", tp=8, num_layers=2)
    for key, token in (("pad_token_id", "<unk>"), ("bos_token_id", "<s>"), ("eos_token_id", "</s>")):
        assert vocab[token] == config[key]
    assert files["tokenizer_config.json"]["eos_token"] == "</s>"
    folder = models.write_model_folder(tmp_path / "m", config)
    assert json.loads((folder / "config.json").read_text()) == config
    assert {p.name for p in folder.iterdir()} == {"config.json", "tokenizer.json", "tokenizer_config.json"}


def test_tokenizer_json_loads_with_tokenizers(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(tokenizer.tokenizer_files()["tokenizer.json"]))
    tok = tokenizers.Tokenizer.from_file(str(path))
    assert tok.encode("w0 w1 nope").ids == [3, 4, 0]


# ---- modes ----


def test_mode_env():
    base = {"PATH": "/bin", "SGLANG_ADAPTIVE_MOE": "1", "SGLANG_ADAPTIVE_MOE_POLICY": "threshold"}
    assert modes.mode_env("off", base) == {"PATH": "/bin"}
    env = modes.mode_env("measure", base, "/tmp/p.json")
    assert env == {
        "PATH": "/bin",
        "SGLANG_ADAPTIVE_MOE": "1",
        "SGLANG_ADAPTIVE_MOE_POLICY": "measure",
        "SGLANG_ADAPTIVE_MOE_PLAN": "/tmp/p.json",
    }
    assert modes.overrides("plan", "/x") == {k: v for k, v in env.items() if k != "PATH"} | {modes.PLAN: "/x"}
    assert modes.overrides("threshold") == {
        "SGLANG_ADAPTIVE_MOE": "1",
        "SGLANG_ADAPTIVE_MOE_POLICY": "threshold",
        "SGLANG_ADAPTIVE_MOE_BATCH_THRESHOLD": "1536",
    }
    for kernel in ("triton", "triton_kernels"):
        assert modes.overrides(kernel)[modes.KERNEL] == kernel and modes.overrides(kernel)[modes.POLICY] == "fixed"
    with pytest.raises(ValueError, match="needs plan_path"):
        modes.mode_env("plan", base)
    with pytest.raises(ValueError, match="takes no plan_path"):
        modes.mode_env("off", base, "/x")


def test_modes_match_the_plugin_settings():
    from moe_dispatch.sglang_plugin import settings

    assert set(settings.ENV_VARS.values()) <= set(modes.ENV_NAMES)
    for mode in modes.MODES.values():
        if modes.POLICY in mode.env:
            assert mode.env[modes.POLICY] in settings.POLICIES
        if modes.KERNEL in mode.env and hasattr(settings, "FIXED_KERNELS"):
            assert mode.env[modes.KERNEL] in settings.FIXED_KERNELS


def test_parse_modes():
    assert modes.parse_modes("off, measure,plan,off") == ("off", "measure", "plan")
    assert modes.parse_modes("all") == tuple(modes.MODES)
    with pytest.raises(ValueError, match="unknown modes"):
        modes.parse_modes("off,fast")


# ---- points ----


def test_point_plan_product_covers_every_point():
    args = PLAN.one_batch_args()
    assert args == [
        "--batch-size", "1", "8", "64",
        "--input-len", "64", "512", "512", "512", "2048", "2048", "2048",
        "--output-len", "16", "1",
    ]  # fmt: skip
    product = collections.Counter(
        Point(b, i, o) for b, i, o in itertools.product((1, 8, 64), (64, 512, 512, 512, 2048, 2048, 2048), (16, 1))
    )
    full = collections.Counter(PLAN.points())
    decode = {Point(1, 64, 16): 1, Point(8, 64, 16): 1, Point(64, 64, 16): 1}
    assert full == collections.Counter(decode | {Point(1, 512, 1): 3, Point(1, 2048, 1): 3})
    assert all(product[p] >= n for p, n in full.items())
    assert points.decode_points(points.encode_points(PLAN.points())) == full
    assert points.encode_points(PLAN.points()) == "1x64x16,8x64x16,64x64x16,1x512x1*3,1x2048x1*3"
    with pytest.raises(ValueError, match="BSxINxOUT"):
        points.decode_points("1x2")
    with pytest.raises(ValueError, match="output_len"):
        PointPlan((1,), 64, 1, ())


def test_restrict_points_runs_each_point_as_often_as_listed():
    """A stand-in for one_batch's loop: warm-up, then the product, as SGLang 0.5.17 runs it."""
    ran, built = [], []

    def latency_test_run_once(run_name, model_runner, rank_print, reqs, batch_size, input_len, output_len, *rest):
        ran.append(Point(batch_size, input_len, output_len))
        return {"batch_size": batch_size}

    def prepare_synthetic_inputs_for_latency_test(batch_size, input_len, custom_inputs=None):
        built.append((batch_size, input_len))
        return ["req"] * batch_size

    module = SimpleNamespace(
        latency_test_run_once=latency_test_run_once,
        prepare_synthetic_inputs_for_latency_test=prepare_synthetic_inputs_for_latency_test,
    )
    points.restrict_points(module, collections.Counter(PLAN.points()))
    args = PLAN.one_batch_args()
    bs = [int(v) for v in args[1 : args.index("--input-len")]]
    il = [int(v) for v in args[args.index("--input-len") + 1 : args.index("--output-len")]]
    ol = [int(v) for v in args[args.index("--output-len") + 1 :]]
    warm_reqs = module.prepare_synthetic_inputs_for_latency_test(bs[0], il[0])
    module.latency_test_run_once("w", None, print, warm_reqs, bs[0], il[0], min(32, ol[0]))
    results = []
    for b, i, o in itertools.product(bs, il, ol):
        reqs = module.prepare_synthetic_inputs_for_latency_test(b, i, [])
        ret = module.latency_test_run_once("r", None, print, reqs, b, i, o, 0, False)
        if ret is not None:
            results.append(ret)
    assert ran[0] == Point(1, 64, 16)  # the warm-up
    assert collections.Counter(ran[1:]) == collections.Counter(PLAN.points())
    assert len(results) == len(PLAN.points())
    assert (64, 2048) not in built  # no prompts built for pairs no point uses


def test_restrict_points_refuses_an_unknown_one_batch():
    with pytest.raises(RuntimeError, match="latency_test_run_once"):
        points.restrict_points(SimpleNamespace(), collections.Counter())


# ---- log and result parsing (sample text from SGLang 0.5.17's format strings) ----


def _sglang_line(rank: int, message: str) -> str:
    return f"[2026-11-29 12:00:00 TP{rank}] {message}"  # configure_logger(prefix=f" TP{rank}")


def sample_log(rank: int = 0, decode_s: float = 25.1, decode_gb: float = 0.23, plugin: str | None = None) -> str:
    load_s, load_gb, avail = 5.12, 29.3, 100.0
    lines = [
        _sglang_line(rank, f"Load weight begin. avail mem={avail:.2f} GB"),
        _sglang_line(
            rank,
            f"Load weight end. elapsed={load_s:.2f} s, type=GptOssForCausalLM, "
            f"avail mem={avail:.2f} GB, mem usage={load_gb:.2f} GB.",
        ),
        _sglang_line(
            rank,
            f"Capture target prefill CUDA graph begin. backend=breakable, num_tokens=[512], avail mem={avail:.2f} GB",
        ),
        _sglang_line(
            rank,
            f"Capture target prefill CUDA graph end. elapsed={12.5:.2f} s, mem usage={0.5:.2f} GB, "
            f"avail mem={60.0:.2f} GB.",
        ),
        _sglang_line(
            rank,
            f"Capture target decode CUDA graph begin. backend=full, num_tokens_per_req=1, bs=[1, 2], "
            f"avail mem={59.5:.2f} GB",
        ),
        _sglang_line(
            rank,
            f"Capture target decode CUDA graph end. elapsed={decode_s:.2f} s, mem usage={decode_gb:.2f} GB, "
            f"avail mem={59.0:.2f} GB.",
        ),
    ]
    if plugin:
        lines.append(_sglang_line(rank, plugin))
    return "\n".join(lines) + "\n"


def test_parse_log_takes_the_slowest_rank():
    text = sample_log(0) + sample_log(1, decode_s=30.5, decode_gb=0.25) + "max_total_num_tokens=1234567\n"
    m = logparse.parse_log(text)
    assert m.decode_capture == logparse.Phase(30.5, 0.25)
    assert m.prefill_capture == logparse.Phase(12.5, 0.5)
    assert m.weight_load == logparse.Phase(5.12, 29.3)
    assert m.max_total_num_tokens == 1234567 and m.plugin is None and m.error is None


def test_parse_log_plugin_line_and_error():
    line = "adaptive MoE start-up: measure_s=4.80 sizes=36 source=measured"
    text = sample_log(0, plugin="adaptive MoE start-up: measure_s=1.00 sizes=3 source=measured") + sample_log(
        0, plugin=line
    )
    text += sample_log(1, plugin="adaptive MoE start-up: measure_s=5.25 sizes=36 source=measured")
    text += 'Traceback (most recent call last):\n  File "x.py", line 1, in <module>\n'
    text += "torch.OutOfMemoryError: CUDA out of memory.\n"
    m = logparse.parse_log(text)
    assert m.plugin == logparse.PluginStartup(5.25, 36, "measured")  # last line per rank, max over ranks
    assert m.error == "torch.OutOfMemoryError: CUDA out of memory."
    assert logparse.last_lines("a\n\nb\nc\n", 2) == "b | c"


def one_batch_row(bs: int, il: int, ol: int, prefill_s: float, decode_s: float | None = None) -> str:
    """A result line as one_batch writes it (json.dumps of its measurement_results)."""
    row = {"run_name": "off-r1", "batch_size": bs, "input_len": il, "output_len": ol}
    row |= {"prefill_latency": prefill_s, "prefill_throughput": il * bs / prefill_s}
    if decode_s is not None:
        row |= {"median_decode_latency": decode_s, "median_decode_throughput": bs / decode_s}
    row |= {"total_latency": prefill_s + (ol - 1) * (decode_s or 0), "overall_throughput": 1.0}
    return json.dumps(row)


def test_parse_results():
    lines = [one_batch_row(b, 64, 16, 0.01, 0.002 * (i + 1)) for i, b in enumerate((1, 8, 64))]
    lines += [one_batch_row(1, 512, 1, t) for t in (0.020, 0.010, 0.012)]
    lines += [one_batch_row(1, 2048, 1, 0.05), one_batch_row(1, 64, 1, 9.0)]  # the last is no point of PLAN
    r = logparse.parse_results("\n".join(lines) + "\n", PLAN)
    assert r.decode_ms == pytest.approx({1: 2.0, 8: 4.0, 64: 6.0})
    assert r.prefill_ms[512] == pytest.approx((20.0, 10.0, 12.0)) and r.prefill_ms[2048] == pytest.approx((50.0,))
    with pytest.raises(ValueError, match="line 1"):
        logparse.parse_results("{}\n", PLAN)


# ---- driver: command lines, schedule ----

TARGET = driver.Target("gpt-oss-120b-tp8", "/models/g", "GPT-OSS per rank", mem_fraction=0.31)


def test_sglang_args_are_the_same_for_every_mode():
    settings = driver.Settings(PLAN, "bench", ("--log-level", "warning"))
    runs = driver.schedule([TARGET], ("off", "measure", "plan", "threshold", "triton"), 1, Path("/out"))
    args = [driver.command(r, settings) for r in runs]
    strip = [[a for a in cmd if "/out/runs/" not in a and not a.endswith(("-r1", "-r0"))] for cmd in args]
    assert all(s == strip[0] for s in strip)
    cmd = args[0]
    assert cmd[:3] == [sys.executable, "-m", "bench.serving.one_batch_main"]
    joined = " ".join(cmd)
    for flag in (
        "--model-path /models/g --load-format dummy --mem-fraction-static 0.31",
        "--attention-backend triton --sampling-backend pytorch --grammar-backend none --disable-radix-cache",
        "--cuda-graph-max-bs-decode 64 --cuda-graph-bs-prefill 512 2048",
        "--run-name off-r1 --result-filename /out/runs/gpt-oss-120b-tp8/off-r1/result.jsonl --log-level warning",
    ):
        assert flag in joined
    assert "--tp-size" not in joined
    sglang = driver.sglang_args(TARGET, driver.Settings(PLAN, "sglang"), "x", Path("r"))
    assert "--cuda-graph-bs-prefill" not in sglang and "--disable-prefill-cuda-graph" not in sglang
    assert "--disable-prefill-cuda-graph" in driver.sglang_args(TARGET, driver.Settings(PLAN, "off"), "x", Path("r"))
    real = driver.Target("ckpt", "/ckpt", "real", tp_size=8, dummy=False)
    joined = " ".join(driver.sglang_args(real, settings, "x", Path("r")))
    assert "--tp-size 8" in joined and "dummy" not in joined and "--mem-fraction-static" not in joined


def test_env_overrides_per_run():
    settings = driver.Settings(PLAN)
    off, measure, plan = driver.schedule([TARGET], ("off", "measure", "plan"), 1, Path("/out"))
    assert driver.env_overrides(off, settings) == {
        points.POINTS_ENV: "1x64x16,8x64x16,64x64x16,1x512x1*3,1x2048x1*3",
        "PYTHONUNBUFFERED": "1",
    }
    assert driver.env_overrides(measure, settings)[modes.PLAN] == "/out/runs/gpt-oss-120b-tp8/measure-r1/plan.json"
    assert driver.env_overrides(plan, settings)[modes.PLAN] == "/out/runs/gpt-oss-120b-tp8/plan-r1/plan.json"


def test_schedule_alternates_modes_and_primes_the_plan():
    other = driver.Target("qwen3-30b-a3b-tp1", "/q", "Qwen")
    runs = driver.schedule([TARGET, other], ("off", "measure", "plan"), 2, Path("/o"))
    assert [(r.target.key[:4], r.mode, r.repeat) for r in runs] == [
        ("gpt-", "off", 1), ("gpt-", "measure", 1), ("gpt-", "plan", 1),
        ("gpt-", "off", 2), ("gpt-", "measure", 2), ("gpt-", "plan", 2),
        ("qwen", "off", 1), ("qwen", "measure", 1), ("qwen", "plan", 1),
        ("qwen", "off", 2), ("qwen", "measure", 2), ("qwen", "plan", 2),
    ]  # fmt: skip
    runs = driver.schedule([TARGET], ("plan", "off"), 2, Path("/o"))
    assert [(r.mode, r.repeat) for r in runs] == [("measure", 0), ("plan", 1), ("off", 1), ("plan", 2), ("off", 2)]
    assert runs[0].label == "gpt-oss-120b-tp8 measure prime" and runs[1].label == "gpt-oss-120b-tp8 plan 1/2"


def test_estimate_from_runs_so_far():
    a, b, c = driver.schedule([TARGET], ("off", "measure", "plan"), 1, Path("/o"))
    other = driver.schedule([driver.Target("q", "/q", "Q")], ("off",), 1, Path("/o"))[0]
    assert driver.estimate_s(a, []) is None
    done = [(a, 180.0), (b, 150.0), (c, 75.0)]  # a cold first run, then warm caches
    assert driver.estimate_s(a, done) == 75.0 and driver.estimate_s(b, done) == 75.0
    assert driver.estimate_s(b, done[:2]) == 150.0 and driver.estimate_s(c, done[:2]) == 150.0
    assert driver.estimate_s(other, done) == 75.0
    assert driver.estimate_s(a, done + [(a, 70.0)]) == 70.0


def test_visible_gpus():
    assert host.parse_nvidia_smi("NVIDIA H200, 143771\nNVIDIA H200, 143771\n") == [("NVIDIA H200", 143771 * 2**20)] * 2
    assert host.visible_count(8, {}) == 8
    assert host.visible_count(8, {"CUDA_VISIBLE_DEVICES": "0,1"}) == 2
    assert host.visible_count(8, {"CUDA_VISIBLE_DEVICES": ""}) == 0


# ---- driver with a stand-in for SGLang's one-batch benchmark; reports ----

FAKE_ONE_BATCH = r"""
import json, os, sys, time
args = sys.argv[1:]
assert args[:2] == ["-m", "bench.serving.one_batch_main"], args
def values(flag):
    i = args.index(flag) + 1
    out = []
    while i < len(args) and not args[i].startswith("--"):
        out.append(args[i]); i += 1
    return out
mode = values("--run-name")[0].split("-r")[0]
time.sleep(float(os.environ.get("FAKE_SLEEP", "0")))
if os.environ.get("FAKE_FAIL") == mode:
    print("Traceback (most recent call last):\nRuntimeError: boom", flush=True)
    sys.exit(3)
adaptive = os.environ.get("SGLANG_ADAPTIVE_MOE") == "1"
plan = os.environ.get("SGLANG_ADAPTIVE_MOE_PLAN")
source = "off"
if adaptive and plan:
    source = "plan" if os.path.exists(plan) else "measured"
    if source == "measured":
        with open(plan, "w") as f:
            json.dump({"fake": True}, f)
decode_s = {"off": 25.0, "measure": 40.0, "plan": 26.0}.get(mode, 30.0)
at = "[2026-11-29 12:00:00 TP0]"
print(f"{at} Load weight end. elapsed=5.00 s, type=X, avail mem=100.00 GB, mem usage=29.30 GB.")
print(f"{at} Capture target prefill CUDA graph end. elapsed=10.00 s, mem usage=0.50 GB, avail mem=60.00 GB.")
print(f"{at} Capture target decode CUDA graph end. elapsed={decode_s:.2f} s, mem usage=0.25 GB, avail mem=59.00 GB.")
if adaptive:
    measure_s = 4.0 if source == "measured" else 0.0
    print(f"{at} adaptive MoE start-up: measure_s={measure_s} sizes=36 source={source}")
step = 0.004 if adaptive else 0.005
counts = {}
for item in os.environ["MOE_DISPATCH_BENCH_POINTS"].split(","):
    spec, _, times = item.partition("*")
    counts[tuple(int(v) for v in spec.split("x"))] = int(times or 1)
with open(values("--result-filename")[0], "a") as f:
    for (bs, il, ol), n in counts.items():
        for _ in range(n):
            row = {"run_name": mode, "batch_size": bs, "input_len": il, "output_len": ol, "prefill_latency": il * 1e-5}
            if ol > 1:
                row["median_decode_latency"] = step * (1 + bs / 64)
            f.write(json.dumps(row) + "\n")
"""


@pytest.fixture
def fake_python(tmp_path):
    script = tmp_path / "fake_one_batch.py"
    script.write_text(FAKE_ONE_BATCH)
    wrapper = tmp_path / "python"
    wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{script}" "$@"\n')
    wrapper.chmod(0o755)
    return str(wrapper)


def _execute(tmp_path, fake_python, modes_=("off", "measure", "plan"), repeats=2, **kwargs):
    settings = driver.Settings(PLAN, python=fake_python)
    runs = driver.schedule([TARGET], modes_, repeats, tmp_path / "out")
    lines = []
    kwargs = {"run_timeout_s": 30.0, "time_budget_s": None} | kwargs
    done = driver.execute(runs, settings, runs_file=tmp_path / "out" / "runs.jsonl", say=lines.append, **kwargs)
    return done, lines


def test_execute_runs_parses_and_hands_the_plan_on(tmp_path, fake_python):
    done, lines = _execute(tmp_path, fake_python)
    assert [(r.mode, r.repeat, r.status) for r in done] == [
        (m, r, "ok") for r in (1, 2) for m in ("off", "measure", "plan")
    ]
    assert [r.metrics.plugin.source if r.metrics.plugin else None for r in done[:3]] == [None, "measured", "plan"]
    assert done[0].decode_ms == pytest.approx({1: 5.078125, 8: 5.625, 64: 10.0})
    assert done[0].prefill_ms[512] == pytest.approx((5.12,) * 3)
    assert done[1].metrics.decode_capture == logparse.Phase(40.0, 0.25)
    assert done[2].env[modes.PLAN].endswith("plan-r1/plan.json")
    assert records.load(tmp_path / "out" / "runs.jsonl") == done
    assert len(lines) == 6 and "gpt-oss-120b-tp8 measure 1/2: ok" in lines[1] and "decode graphs 40.0 s" in lines[1]


def test_execute_failures_timeouts_and_budget(tmp_path, fake_python, monkeypatch):
    monkeypatch.setenv("FAKE_FAIL", "measure")
    done, lines = _execute(tmp_path, fake_python, repeats=1)
    assert [r.status for r in done] == ["ok", "failed", "skipped"]
    assert "exit 3" in done[1].note and "RuntimeError: boom" in done[1].note
    assert "no plan" in done[2].note
    monkeypatch.delenv("FAKE_FAIL")
    monkeypatch.setenv("FAKE_SLEEP", "20")
    monkeypatch.setattr(driver, "KILL_GRACE_S", 2.0)
    done, _ = _execute(tmp_path / "t", fake_python, modes_=("off",), repeats=1, run_timeout_s=0.5)
    assert done[0].status == "timeout" and done[0].note == "killed after 0 s"
    done, lines = _execute(tmp_path / "b", fake_python, repeats=1, time_budget_s=10.0)
    assert [r.status for r in done] == ["skipped"] * 3 and all(r.note == "time budget" for r in done)
    assert "stopping, 3 runs not started" in lines[0]


def _session(done_models=("gpt-oss-120b-tp8",)) -> records.Session:
    info = records.ModelInfo("gpt-oss-120b-tp8", "GPT-OSS per rank", 1, 29.29, 0.31, {"num_hidden_layers": 36})
    settings = {"output_len": 16, "decode_input_len": 64, "prefill_repeats": 3, "prefill_graphs": "bench"}
    return records.Session(
        "NVIDIA H200",
        {"torch": "2.11"},
        "2026-11-29",
        "python -m bench.serving",
        settings,
        ("off", "measure", "plan"),
        2,
        (info,),
    )


def test_report_tables_json_and_plot(tmp_path, fake_python):
    from bench.serving.plot import plot_file

    done, _ = _execute(tmp_path, fake_python)
    session = _session()
    summaries = report.summarize(done, "gpt-oss-120b-tp8", session.modes)
    off, measure = summaries["off"], summaries["measure"]
    assert off.runs == 2 and off.decode_ms[64] == report.Stat(10.0, 10.0, 10.0, 2)
    assert measure.scalars["graph_s"].median == 50.0 and measure.scalars["graph_gb"].median == 0.75
    assert measure.plugin_source == "measured" and summaries["plan"].plugin_source == "plan"
    text = report.markdown(session, "gpt-oss-120b-tp8", summaries)
    assert "| batch | off ms | measure ms | plan ms | measure speed-up | plan speed-up |" in text
    assert "| 64 | 10.00 (10.00-10.00) | 8.00 (8.00-8.00) | 8.00 (8.00-8.00) | 1.25x | 1.25x |" in text
    assert "| 512 | 5.12 (5.12-5.12) |" in text
    assert "| measure | 0.25 (0.25-0.25) | 0.50 (0.50-0.50) | 0.75 (0.75-0.75) | 1.00x |" in text
    assert "| measure | 40.0 (40.0-40.0) | 10.0 (10.0-10.0) | 50.0 (50.0-50.0) | 1.43x | 4.0 (4.0-4.0) |" in text
    assert "| 54.0 | 1.54x | measured |" in text  # warm start: 40 + 10 graphs + 4 plugin, / 35
    assert "| plan | 26.0 (26.0-26.0) |" in text and "| 36.0 | 1.03x | plan |" in text
    assert text.rstrip().endswith("the fastest repeat is the warm process.")
    path, md = report.save(session, "gpt-oss-120b-tp8", done, tmp_path / "results")
    assert path == tmp_path / "results" / "nvidia-h200" / "serving-gpt-oss-120b-tp8.json"
    assert path.with_suffix(".md").read_text() == md == text
    data, loaded = report.load_summary(path)
    assert data["gpu"] == "NVIDIA H200" and len(data["runs"]) == 6
    assert {k: v.median for k, v in loaded["measure"].decode_ms.items()} == pytest.approx(
        {k: v.median for k, v in measure.decode_ms.items()}
    )
    assert loaded["plan"].scalars.keys() == summaries["plan"].scalars.keys()
    assert loaded["measure"].warm_start_s == 54.0 and report.warm_vs_off(loaded, "measure") == pytest.approx(54 / 35)
    assert plot_file(path).stat().st_size > 10_000


def _startup_run(mode: str, repeat: int, decode_s: float, prefill_s: float, plugin_s: float | None) -> RunRecord:
    plugin = None if plugin_s is None else logparse.PluginStartup(plugin_s, 36, "measured" if plugin_s else "plan")
    metrics = logparse.LogMetrics(
        prefill_capture=logparse.Phase(prefill_s, 0.5),
        decode_capture=logparse.Phase(decode_s, 0.25),
        plugin=plugin,
    )
    return RunRecord("gpt-oss-120b-tp8", mode, repeat, "ok", wall_s=60.0, decode_ms={1: 5.0}, metrics=metrics)


def test_report_warm_start_against_stock():
    """One cold (first process: compiles Triton kernels) and one warm run per mode; warm = the fastest."""
    runs = [
        _startup_run("measure", 0, 1.0, 1.0, 1.0),  # a priming run: not counted, so not the minimum
        _startup_run("off", 1, 40.0, 19.5, None),  # cold: 59.5 s of graphs
        _startup_run("measure", 1, 7.5, 2.0, 74.5),  # cold: 9.5 + 74.5 = 84.0
        _startup_run("plan", 1, 9.0, 3.0, 0.0),  # cold: 12.0
        _startup_run("off", 2, 8.0, 2.0, None),  # warm: 10.0
        _startup_run("measure", 2, 7.0, 2.0, 5.5),  # warm: 9.0 + 5.5 = 14.5
        _startup_run("plan", 2, 8.0, 2.5, 0.0),  # warm: 10.5
    ]
    session = _session()
    summaries = report.summarize(runs, "gpt-oss-120b-tp8", session.modes)
    assert {m: s.warm_start_s for m, s in summaries.items()} == {"off": 10.0, "measure": 14.5, "plan": 10.5}
    assert {m: report.warm_vs_off(summaries, m) for m in summaries} == {"off": 1.0, "measure": 1.45, "plan": 1.05}
    assert summaries["off"].scalars["graph_s"] == report.Stat(34.75, 10.0, 59.5, 2)  # the median mixes cold in
    text = report.markdown(session, "gpt-oss-120b-tp8", summaries)
    assert (
        "| mode | decode graphs | prefill graphs | graphs total | vs off | plugin timing | weight load | whole run "
        "| warm start s | warm vs off | plugin source |" in text
    )
    assert (
        "| off | 24.0 (8.0-40.0) | 10.8 (2.0-19.5) | 34.8 (10.0-59.5) | 1.00x | - | - | 60 (60-60) | 10.0 | 1.00x | - |"
        in text
    )
    assert "| 40.0 (5.5-74.5) | - | 60 (60-60) | 14.5 | 1.45x | measured |" in text
    assert "| plan | 8.5 (8.0-9.0) | 2.8 (2.5-3.0) | 11.2 (10.5-12.0) | 0.32x | 0.0 (0.0-0.0) |" in text
    assert "| 10.5 | 1.05x | plan |" in text
    assert "first process of a session compiles every Triton kernel" in text.split("| plan |")[-1]
    data = report.to_json(session, "gpt-oss-120b-tp8", summaries, runs)
    summary = data["summary"]
    assert [(summary[m]["warm_start_s"], summary[m]["warm_vs_off"]) for m in ("off", "measure", "plan")] == [
        (10.0, 1.0),
        (14.5, 1.45),
        (10.5, 1.05),
    ]
    assert summary["off"]["graph_s"] == {"median": 34.75, "min": 10.0, "max": 59.5, "n": 2}  # kept as it was
    keys = list(summary["measure"])
    assert keys[keys.index("wall_s") + 1 : keys.index("plugin_source")] == ["warm_start_s", "warm_vs_off"]
    # Without stock runs there is nothing to compare against; a mode without graph times has no warm start.
    alone = report.summarize(runs[2:3], "gpt-oss-120b-tp8", ("off", "measure"))
    assert alone["measure"].warm_start_s == 84.0 and report.warm_vs_off(alone, "measure") is None
    assert alone["off"].warm_start_s is None
    assert "| measure | 7.5 | 2.0 | 9.5 | - | 74.5 | - | 60 | 84.0 | - | measured |" in report.markdown(
        session, "gpt-oss-120b-tp8", alone
    )


def test_report_lists_runs_not_counted():
    runs = [
        RunRecord("m", "off", 1, "ok", decode_ms={1: 5.0}),
        RunRecord("m", "off", 2, "timeout", note="killed after 600 s"),
        RunRecord("m", "measure", 0, "ok", decode_ms={1: 1.0}),
    ]
    s = report.summarize(runs, "m", ("off", "measure"))
    assert s["off"].runs == 1 and s["off"].other == ("off r2: timeout (killed after 600 s)",)
    assert s["measure"].runs == 0 and s["measure"].other == ("measure r0: ok",)
    assert report.Stat(1.0, 1.0, 1.0, 1).cell() == "1.00" and report.stat([]) is None


def test_session_round_trip(tmp_path):
    session = _session()
    records.save_session(tmp_path, session)
    assert records.load_session(tmp_path) == session
    with pytest.raises(KeyError):
        session.model("nope")


# ---- command line ----


def test_cli_dry_run(capsys):
    argv = ["--dry-run", "--models", "gpt-oss-120b:tp8", "--modes", "off,measure", "--repeats", "1"]
    assert cli.main(argv + ["--", "--log-level", "warning"]) == 0
    out = capsys.readouterr().out.splitlines()
    commands = [line for line in out if not line.startswith("#")]
    assert len(commands) == 2
    assert "SGLANG_ADAPTIVE_MOE" not in commands[0] and "SGLANG_ADAPTIVE_MOE=1" in commands[1]
    for cmd in commands:
        assert "-m bench.serving.one_batch_main" in cmd and cmd.endswith("--log-level warning")
        assert "--load-format dummy" in cmd and "--cuda-graph-max-bs-decode 256" in cmd
        assert "--input-len 64 512 512 512 2048 2048 2048 8192 8192 8192 --output-len 64 1" in cmd


def test_cli_real_tp_needs_the_gpus(capsys, monkeypatch):
    monkeypatch.setattr(host, "gpu_info", lambda: host.GpuInfo("NVIDIA H200", 150 * 10**9, 1))
    argv = ["--dry-run", "--tp", "8", "--models", "gpt-oss-120b:tp8,gpt-oss-120b:tp2", "--modes", "off"]
    assert cli.main(argv + ["--repeats", "1"]) == 0
    captured = capsys.readouterr()
    assert "skip gpt-oss-120b:tp2" in captured.err and "needs 8 GPU(s), 1 visible: would be skipped" in captured.err
    assert "--tp-size 8" in captured.out
    assert cli.main(["--tp", "8", "--models", "gpt-oss-120b:tp8", "--modes", "off"]) == 1


def test_cli_end_to_end_and_report_from(tmp_path, fake_python, monkeypatch, capsys):
    import functools

    monkeypatch.setattr(host, "gpu_info", lambda: host.GpuInfo("NVIDIA H200", int(139.8 * 2**30), 1))
    monkeypatch.setattr(host, "plugin_installed", lambda: True)
    monkeypatch.setattr(cli.driver, "Settings", functools.partial(driver.Settings, python=fake_python))
    out, results = tmp_path / "out", tmp_path / "results"
    argv = ["--models", "gpt-oss-120b:tp8:layers=2", "--out", str(out), "--results", str(results), "--repeats", "1"]
    assert cli.main(argv + ["--batch-sizes", "1,8", "--prefill-lens", "512", "--output-len", "8"]) == 0
    config = json.loads((out / "models" / "gpt-oss-120b-tp8-2l" / "config.json").read_text())
    assert config["num_hidden_layers"] == 2
    saved = results / "nvidia-h200" / "serving-gpt-oss-120b-tp8-2l.json"
    assert saved.exists() and saved.with_suffix(".png").exists()
    assert "| 8 | 5.62 | 4.50 | 4.50 | 1.25x | 1.25x |" in capsys.readouterr().out
    saved.unlink()
    assert cli.main(["--report-from", str(out), "--results", str(results)]) == 0 and saved.exists()
    assert os.path.exists(out / "runs" / "gpt-oss-120b-tp8-2l" / "plan-r1" / "plan.json")


def test_cli_rejects_a_bad_model(capsys):
    assert cli.main(["--dry-run", "--models", "llama:tp8"]) == 2
    assert "unknown model 'llama'" in capsys.readouterr().err
    assert cli.main(["--dry-run", "--models", "gpt-oss-120b:tp1:layers=36"]) == 2
    assert "use fewer layers" in capsys.readouterr().err


def test_the_plugins_kernel_rule_is_parsed_kept_and_reported(tmp_path):
    rule = "small_batch for 1-16, triton_kernels_tuned for 24-2048, triton_kernels for 4096 tokens and above (measured)"
    text = sample_log(0, plugin="adaptive MoE start-up: measure_s=4.80 sizes=36 source=measured")
    text += _sglang_line(0, f"adaptive MoE: MoE calls run {rule}") + "\n"
    metrics = logparse.parse_log(text)
    assert metrics.kernel_rule == rule and logparse.parse_log(sample_log(0)).kernel_rule is None
    run = RunRecord("gpt-oss-120b-tp8", "measure", 1, "ok", wall_s=60.0, decode_ms={1: 5.0}, metrics=metrics)
    assert records.from_json(records.to_json(run)).metrics.kernel_rule == rule
    legacy = records.to_json(run)
    del legacy["kernel_rule"]  # records written before the rule was kept
    assert records.from_json(legacy).metrics.kernel_rule is None
    stock = logparse.parse_log(sample_log(0))
    off = RunRecord("gpt-oss-120b-tp8", "off", 1, "ok", wall_s=60.0, decode_ms={1: 6.0}, metrics=stock)
    session = _session()
    summaries = report.summarize([off, run], "gpt-oss-120b-tp8", ("off", "measure"))
    assert summaries["measure"].kernel_rules == (rule,) and summaries["off"].kernel_rules == ()
    text = report.markdown(session, "gpt-oss-120b-tp8", summaries)
    assert text.rstrip().endswith(f"- measure: {rule}")
    path, _ = report.save(session, "gpt-oss-120b-tp8", [off, run], tmp_path)
    assert report.load_summary(path)[1]["measure"].kernel_rules == (rule,)
