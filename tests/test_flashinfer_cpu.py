"""`flashinfer_cutlass` on CPU: availability reasons, spec rules, the weight layout FlashInfer's
kernel reads (checked by emulating its documented math against the reference), routing format,
registry and packaging. Needs neither flashinfer nor a GPU."""

import enum
import pathlib
import subprocess
import sys
import types

import pytest
import torch

from moe_dispatch import KNOWN_KERNELS, ExpertWeights, MoESpec, available_kernels, get_backend, make_kernel, preset
from moe_dispatch.backends import flashinfer_moe as fi
from moe_dispatch.reference import reference_moe, route
from moe_dispatch.spec import GPT_OSS_SWIGLU, SILU, Routing
from moe_dispatch.weights import random_inputs

ROOT = pathlib.Path(__file__).resolve().parents[1]


def small_spec(activation: str, bias: bool, dtype: torch.dtype = torch.float32, top_k: int = 2) -> MoESpec:
    swiglu = activation == "swiglu"
    return MoESpec(
        num_experts=6,
        top_k=top_k,
        hidden_size=16,
        intermediate_size=8,
        activation=GPT_OSS_SWIGLU if swiglu else SILU,
        bias=bias,
        dtype=dtype,
        routing=Routing.TOPK_SOFTMAX if swiglu else Routing.SOFTMAX_TOPK_RENORM,
    )


# ---- availability ----


def test_environment_rule_names_what_is_missing():
    missing = fi.environment_support(installed=False, capability=None)
    assert not missing and "flashinfer is not installed" in missing.reason
    assert "moe-dispatch[flashinfer]" in missing.reason and fi.PINNED_VERSION in missing.reason
    no_gpu = fi.environment_support(installed=True, capability=None)
    assert not no_gpu and "no CUDA GPU" in no_gpu.reason
    ampere = fi.environment_support(installed=True, capability=(8, 0), device="NVIDIA A100-SXM4-80GB")
    assert not ampere and "compute capability 9.0+" in ampere.reason
    assert "NVIDIA A100-SXM4-80GB with 8.0" in ampere.reason
    assert fi.environment_support(installed=True, capability=(9, 0), device="NVIDIA H200")
    assert fi.environment_support(installed=True, capability=(10, 0), device="NVIDIA B200")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU answers")
def test_unavailable_here_with_a_reason():
    backend = get_backend("flashinfer_cutlass")
    answer = backend.availability()
    assert not answer
    assert any(word in answer.reason for word in ("not installed", "no CUDA GPU"))
    assert available_kernels(preset("gpt-oss-120b", tp=2))["flashinfer_cutlass"].reason == answer.reason
    spec = small_spec("swiglu", True, torch.bfloat16)
    with pytest.raises(ValueError, match="kernel 'flashinfer_cutlass' cannot run"):
        make_kernel("flashinfer_cutlass", spec, ExpertWeights.random(spec))
    assert fi.module_built() is None  # nothing to tell without flashinfer and a Hopper GPU


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine availability may import flashinfer")
def test_import_and_availability_never_import_flashinfer():
    code = (
        "import sys, moe_dispatch; moe_dispatch.available_kernels(); "
        "moe_dispatch.get_backend('flashinfer_cutlass').supports(moe_dispatch.preset('gpt-oss-120b', tp=2)); "
        "print('flashinfer' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip().splitlines()[-1] == "False"


def test_backend_options_are_checked():
    with pytest.raises(ValueError, match="router must be one of"):
        fi.FlashInferCutlassBackend(router="deepep")
    with pytest.raises(ValueError, match="router must be one of"):
        fi.make_router(small_spec("silu", False), "fused")


# ---- supports(spec) ----


@pytest.mark.parametrize(
    "spec",
    [
        preset("gpt-oss-120b", tp=2),
        preset("gpt-oss-120b", tp=8),
        preset("gpt-oss-20b"),
        preset("mixtral-8x7b", tp=2),
        preset("qwen3-30b-a3b"),
        preset("mixtral-8x7b", dtype=torch.float16),
        small_spec("swiglu", False, torch.bfloat16, top_k=1),
        small_spec("silu", True, torch.bfloat16, top_k=6),
    ],
    ids=lambda s: s.describe(),
)
def test_supported_specs(spec):
    assert get_backend("flashinfer_cutlass").supports(spec), spec.describe()


@pytest.mark.parametrize(
    "spec, reason",
    [
        (small_spec("silu", False, torch.float32), "bf16/fp16 here, not torch.float32"),
        (MoESpec(16, 9, 64, 32), "top_k=9 is outside 1..8"),
        (MoESpec(8, 2, 2884, 64), "hidden_size=2884 is not a multiple of 8"),
        (MoESpec(8, 2, 64, 100), "intermediate_size=100 is not a multiple of 8"),
    ],
)
def test_unsupported_specs_say_why(spec, reason):
    answer = get_backend("flashinfer_cutlass").supports(spec)
    assert not answer and reason in answer.reason


# ---- weight layout ----


def test_up_gate_halves_of_split_and_interleaved_rows():
    E, I, H = 3, 4, 5
    gate, up = torch.randn(E, I, H), torch.randn(E, I, H)
    split = torch.cat((gate, up), dim=1)  # our SiLU layout [gate; up]
    interleaved = torch.stack((gate, up), dim=2).reshape(E, 2 * I, H)  # GPT-OSS [g0, u0, g1, u1, ...]
    want = torch.cat((up, gate), dim=1)
    assert torch.equal(fi.to_up_gate_halves(split, interleaved=False), want)
    assert torch.equal(fi.to_up_gate_halves(interleaved, interleaved=True), want)
    bias = torch.arange(2 * 2 * I, dtype=torch.float32).reshape(2, 2 * I)  # [E, 2I]: same rule along dim 1
    assert fi.to_up_gate_halves(bias, interleaved=True)[0].tolist() == [1, 3, 5, 7, 0, 2, 4, 6]
    assert fi.to_up_gate_halves(bias, interleaved=False)[0].tolist() == [4, 5, 6, 7, 0, 1, 2, 3]
    out = fi.to_up_gate_halves(interleaved, interleaved=True)
    assert out.is_contiguous() and out.data_ptr() != interleaved.data_ptr()
    with pytest.raises(ValueError, match=r"even dim 1, got shape \(3, 5, 2\)"):
        fi.to_up_gate_halves(torch.zeros(3, 5, 2), interleaved=False)


def emulate(spec, fc1, fc1_bias, fc2, fc2_bias, swiglu, selected, scales, x) -> torch.Tensor:
    """cutlass_fused_moe's math as FlashInfer's sources state it, in fp32, on FlashInfer's layout."""
    I = spec.intermediate_size
    out = torch.zeros(x.shape[0], spec.hidden_size)
    for t in range(x.shape[0]):
        for slot in range(selected.shape[1]):
            e = int(selected[t, slot])
            h = fc1[e].float() @ x[t].float()
            if fc1_bias is not None:
                h = h + fc1_bias[e].float()
            up, gate = h[:I], h[I:]  # columns [0, I) linear, [I, 2I) gate
            if swiglu:
                a, b, lim = (float(swiglu[k][e]) for k in ("swiglu_alpha", "swiglu_beta", "swiglu_limit"))
                g = gate.clamp(max=lim)
                act = g * torch.sigmoid(a * g) * (up.clamp(-lim, lim) + b)
            else:
                act = torch.nn.functional.silu(gate) * up
            y = fc2[e].float() @ act
            if fc2_bias is not None:
                y = y + fc2_bias[e].float()
            out[t] += scales[t, slot] * y
    return out


def emulate_kernel(spec: MoESpec, kw: fi.KernelWeights, x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    selected, scales = fi.kernel_routing(*route(logits, spec.top_k, spec.routing))
    return emulate(spec, kw.fc1, kw.fc1_bias, kw.fc2, kw.fc2_bias, kw.swiglu, selected, scales, x)


@pytest.mark.parametrize("activation", ["swiglu", "silu"])
@pytest.mark.parametrize("bias", [True, False])
def test_converted_weights_compute_the_reference(activation, bias):
    spec = small_spec(activation, bias, torch.float32, top_k=3)
    weights = ExpertWeights.random(spec, seed=3)
    x, logits = random_inputs(spec, 7, seed=4)
    kw = fi.kernel_weights(spec, weights)
    torch.testing.assert_close(emulate_kernel(spec, kw, x, logits), reference_moe(spec, weights, x, logits))


def test_kernel_weights_dtypes_sharing_and_extra_bytes():
    spec = preset("gpt-oss-20b", tp=8)  # E=32, H=2880, I=360, bf16, biases, SwiGLU
    weights = ExpertWeights.random(spec, seed=0)
    kw = fi.kernel_weights(spec, weights)
    E, H, I = spec.num_experts, spec.hidden_size, spec.intermediate_size
    assert kw.fc1.shape == (E, 2 * I, H) and kw.fc1.dtype == torch.bfloat16 and kw.fc1.is_contiguous()
    assert kw.fc2 is weights.w2  # the kernel's layout already: shared, no copy
    assert kw.fc1_bias.dtype == kw.fc2_bias.dtype == torch.bfloat16  # the kernel wants the output dtype
    assert torch.equal(kw.fc1_bias, fi.to_up_gate_halves(weights.b13, True).to(torch.bfloat16))
    assert sorted(kw.swiglu) == ["swiglu_alpha", "swiglu_beta", "swiglu_limit"]
    assert kw.swiglu["swiglu_alpha"].tolist() == pytest.approx([1.702] * E)
    assert kw.swiglu["swiglu_beta"].tolist() == [1.0] * E and kw.swiglu["swiglu_limit"].tolist() == [7.0] * E
    assert kw.extra_bytes == E * 2 * I * H * 2 + E * (2 * I + H) * 2 + 3 * E * 4

    spec = small_spec("silu", False, torch.bfloat16)
    weights = ExpertWeights.random(spec, seed=1)
    kw = fi.kernel_weights(spec, weights)
    assert kw.fc1_bias is None and kw.fc2_bias is None and kw.swiglu == {}
    assert kw.extra_bytes == weights.w13.nbytes


# ---- routing format ----


def test_kernel_routing_from_the_torch_router():
    spec = small_spec("swiglu", True, torch.bfloat16, top_k=4)
    _, logits = random_inputs(spec, 5, seed=2)
    weights, ids = route(logits, spec.top_k, spec.routing)  # fp32, int64
    selected, scales = fi.kernel_routing(weights, ids)
    assert selected.dtype == torch.int32 and scales.dtype == torch.float32
    assert selected.is_contiguous() and scales.is_contiguous()
    assert torch.equal(selected.long(), ids) and torch.equal(scales, weights)


def test_kernel_routing_is_free_when_already_in_format_and_fixes_strides():
    ids = torch.randint(0, 8, (6, 2), dtype=torch.int32)
    weights = torch.rand(6, 2)
    selected, scales = fi.kernel_routing(weights, ids)
    assert selected is ids and scales is weights  # SGLang's TopK output: no copy
    selected, scales = fi.kernel_routing(weights.t().contiguous().t(), ids.t().contiguous().t())
    assert selected.is_contiguous() and scales.is_contiguous() and torch.equal(selected, ids)


def test_kernel_routing_rejects_bad_inputs():
    with pytest.raises(ValueError, match=r"\(4, 2\) and topk_weights \(4, 3\) must both be \[T, k\]"):
        fi.kernel_routing(torch.rand(4, 3), torch.zeros(4, 2, dtype=torch.int64))
    with pytest.raises(TypeError, match="integer expert ids, got torch.float32"):
        fi.kernel_routing(torch.rand(4, 2), torch.rand(4, 2))


def test_torch_router_matches_the_reference_routing():
    spec = small_spec("silu", False, torch.bfloat16, top_k=2)
    x, logits = random_inputs(spec, 9, seed=6)
    name, router = fi.make_router(spec, "torch")
    assert name == "torch"
    for got, want in zip(router(x, logits), route(logits, spec.top_k, spec.routing), strict=True):
        assert torch.equal(got, want)


# ---- registry and packaging ----


def test_registry_lists_the_backend():
    assert "flashinfer_cutlass" in KNOWN_KERNELS
    backend = get_backend("flashinfer_cutlass")
    assert isinstance(backend, fi.FlashInferCutlassBackend) and backend.name == "flashinfer_cutlass"
    assert backend.router == "auto" and backend.autotune is True
    assert "flashinfer_cutlass" in available_kernels()


def test_pyproject_extra_pins_the_version_sglang_pins():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["optional-dependencies"]["flashinfer"] == [f"flashinfer-python=={fi.PINNED_VERSION}"]
    assert not any("flashinfer" in dep for dep in project["dependencies"])


# ---- the glue, against a stand-in for flashinfer.fused_moe ----


class _ActivationType(enum.IntEnum):  # flashinfer/tllm_enums.py values
    Swiglu = 3
    SwigluBias = 5


# cutlass_fused_moe's parameters in flashinfer-python 0.6.15.post1 (flashinfer/fused_moe/core.py); the first 7 required
CUTLASS_FUSED_MOE_PARAMS = (
    "input", "token_selected_experts", "token_final_scales", "fc1_expert_weights", "fc2_expert_weights",
    "output_dtype", "quant_scales", "fc1_expert_biases", "fc2_expert_biases", "input_sf", "swiglu_alpha",
    "swiglu_beta", "swiglu_limit", "tp_size", "tp_rank", "ep_size", "ep_rank", "cluster_size", "cluster_rank",
    "output", "enable_alltoall", "use_deepseek_fp8_block_scale", "use_w4_group_scaling", "use_mxfp8_act_scaling",
    "min_latency_mode", "use_packed_weights", "tune_max_num_tokens", "enable_pdl", "activation_type",
    "swizzled_input_sf", "use_fused_finalize",
)  # fmt: skip


@pytest.fixture
def fake_flashinfer(monkeypatch):
    """flashinfer.fused_moe whose cutlass_fused_moe takes the real parameter names and computes by `emulate`."""
    calls = []

    def cutlass_fused_moe(**kw):
        assert set(kw) <= set(CUTLASS_FUSED_MOE_PARAMS), set(kw) - set(CUTLASS_FUSED_MOE_PARAMS)
        assert set(CUTLASS_FUSED_MOE_PARAMS[:7]) <= set(kw)
        calls.append(kw)
        fc1, fc2, selected = kw["fc1_expert_weights"], kw["fc2_expert_weights"], kw["token_selected_experts"]
        spec = MoESpec(fc1.shape[0], selected.shape[1], fc2.shape[1], fc2.shape[2], dtype=torch.float32)
        swiglu = {k: kw[k] for k in ("swiglu_alpha", "swiglu_beta", "swiglu_limit") if kw.get(k) is not None}
        biases = kw.get("fc1_expert_biases"), kw.get("fc2_expert_biases")
        y = emulate(spec, fc1, biases[0], fc2, biases[1], swiglu, selected, kw["token_final_scales"], kw["input"])
        kw["output"].copy_(y)
        return [kw["output"]]

    fused = types.ModuleType("flashinfer.fused_moe")
    fused.cutlass_fused_moe, fused.ActivationType = cutlass_fused_moe, _ActivationType
    root = types.ModuleType("flashinfer")
    root.fused_moe = fused
    monkeypatch.setitem(sys.modules, "flashinfer", root)
    monkeypatch.setitem(sys.modules, "flashinfer.fused_moe", fused)
    return calls


@pytest.mark.parametrize("activation, bias", [("swiglu", True), ("silu", False), ("silu", True)])
def test_kernel_glue_calls_cutlass_fused_moe_as_documented(fake_flashinfer, activation, bias):
    spec = small_spec(activation, bias, torch.float32, top_k=3)
    weights = ExpertWeights.random(spec, seed=8)
    kernel = fi.FlashInferCutlassKernel(spec, weights, router="torch", autotune=False)
    assert kernel.router == "torch" and kernel.tune_seconds is None
    assert kernel.extra_bytes == fi.kernel_weights(spec, weights).extra_bytes
    x, logits = random_inputs(spec, 5, seed=9)
    out = kernel.forward(x, logits)
    torch.testing.assert_close(out, reference_moe(spec, weights, x, logits))
    (call,) = fake_flashinfer
    assert call["output"] is out and out.shape == (5, spec.hidden_size)
    assert call["token_selected_experts"].dtype == torch.int32 and call["token_final_scales"].dtype == torch.float32
    assert call["tp_size"] == 1 and call["tp_rank"] == 0 and call["quant_scales"] is None
    assert call["activation_type"] == _ActivationType.Swiglu and not call.get("min_latency_mode")
    assert call["output_dtype"] == spec.dtype and call["tune_max_num_tokens"] == fi.TUNE_MAX_NUM_TOKENS
    assert (call.get("swiglu_alpha") is not None) == (activation == "swiglu")
    assert (call["fc1_expert_biases"] is not None) == (call["fc2_expert_biases"] is not None) == bias


def test_an_unbuilt_module_is_no_default_candidate_without_opt_in():
    from moe_dispatch.backends.flashinfer_moe import BUILD_ENV, build_gate

    refused = build_gate(False, {})
    assert not refused and "not built yet" in refused.reason and BUILD_ENV in refused.reason
    assert build_gate(False, {BUILD_ENV: "1"})
    assert build_gate(True, {}) and build_gate(None, {})
