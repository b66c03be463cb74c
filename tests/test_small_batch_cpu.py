"""`small_batch` on the CPU under Triton's interpreter (tiny shapes), its supports() answers and input errors.

Triton's interpreter must be chosen (TRITON_INTERPRET=1) before triton is first imported:
triton.language's own helpers (tl.max, tl.sum, ...) are built for one mode at that import,
and by the time this file runs other tests may have imported triton for real. Setting the
variable here would also leak into a GPU session that merely collects this file. So the
kernel runs happen in ONE child process started with TRITON_INTERPRET=1 and no visible GPU
(`_interpreter_worker`); it saves each case's output and reference, and the tests here
compare them with `moe_dispatch.testing.assert_close`.
"""

from __future__ import annotations

import dataclasses
import traceback
from pathlib import Path

import pytest
import torch

from moe_dispatch import GPT_OSS_SWIGLU, SILU, ExpertWeights, MoESpec, Routing, get_backend, preset
from moe_dispatch.backends.small_batch.backend import SmallBatchBackend, SmallBatchKernel
from moe_dispatch.testing import assert_close, untied_inputs
from tests.cases import interpreted_results

REPO = Path(__file__).resolve().parents[1]
NUM_EXPERTS, INTERMEDIATE = 8, 48
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
ROUTINGS = {
    "topk_softmax": Routing.TOPK_SOFTMAX,
    "renorm": Routing.SOFTMAX_TOPK_RENORM,
    "no_renorm": Routing.SOFTMAX_TOPK,
}


def _configs():
    from moe_dispatch.backends.small_batch.launch import SmallBatchConfig

    return {
        None: None,  # the table's config for T (block_k 256 > H: one masked chunk)
        # blocks divide H and I: unmasked chunks; both loops unrolled
        "even": SmallBatchConfig(block_n=16, block_k=16, block_h=16, block_i=16, up_unroll=True, down_unroll=True),
        # loops neither unrolled nor pipelined (vectors loaded at tile shape, as when unrolled)
        "plain": SmallBatchConfig(block_n=8, block_k=32, up_stages=1, block_h=32, block_i=32, down_stages=1),
        # blocks past I and H: clamped rows, masked chunks; both loops pipelined
        "wide": SmallBatchConfig(
            block_n=64, block_k=32, up_warps=8, up_stages=3, block_h=128, block_i=32, down_warps=8, down_stages=3
        ),
    }


@dataclasses.dataclass(frozen=True)
class CpuCase:
    num_tokens: int
    top_k: int
    activation: str  # "swiglu" | "silu"
    routing: str  # key of ROUTINGS
    bias: bool
    dtype: str  # key of DTYPES
    hidden: int
    config: str | None  # key of _configs()
    scale: float = 1.0  # hidden states times this; 12 drives SwiGLU's gate and up past its clamp limit

    def spec(self) -> MoESpec:
        return MoESpec(
            num_experts=NUM_EXPERTS,
            top_k=self.top_k,
            hidden_size=self.hidden,
            intermediate_size=INTERMEDIATE,
            activation=GPT_OSS_SWIGLU if self.activation == "swiglu" else SILU,
            bias=self.bias,
            dtype=DTYPES[self.dtype],
            routing=ROUTINGS[self.routing],
            name=f"cpu-{self.activation}",
        )

    @property
    def id(self) -> str:
        bias = "bias" if self.bias else "nobias"
        name = f"T{self.num_tokens}-k{self.top_k}-{self.activation}-{self.routing}-{bias}-{self.dtype}-H{self.hidden}"
        return f"{name}-{self.config}" + (f"-x{self.scale:g}" if self.scale != 1 else "")


# Each value of each field appears with several others; T in 1, 3, 5; top-k 1, 2, 3, 4, 8 (= E);
# two SwiGLU cases with large activations, so the clamps matter.
CPU_CASES = tuple(
    CpuCase(*row)
    for row in (
        (1, 1, "swiglu", "topk_softmax", True, "bf16", 80, None),
        (3, 2, "swiglu", "topk_softmax", True, "fp16", 80, "even"),
        (5, 4, "swiglu", "topk_softmax", False, "bf16", 96, "wide"),
        (1, 4, "swiglu", "topk_softmax", False, "fp16", 64, None),
        (3, 4, "swiglu", "topk_softmax", True, "bf16", 80, None),
        (5, 8, "swiglu", "renorm", False, "bf16", 80, "wide"),
        (3, 3, "silu", "renorm", True, "bf16", 80, "wide"),
        (5, 2, "silu", "renorm", False, "fp16", 80, "plain"),
        (1, 2, "silu", "renorm", False, "bf16", 96, "even"),
        (5, 8, "silu", "renorm", True, "fp16", 80, None),
        (3, 1, "silu", "no_renorm", True, "bf16", 80, "plain"),
        (5, 4, "silu", "no_renorm", False, "fp16", 96, "even"),
        (1, 4, "silu", "no_renorm", True, "fp16", 64, "wide"),
        (3, 2, "silu", "topk_softmax", True, "fp16", 96, None),
        (5, 4, "swiglu", "topk_softmax", True, "bf16", 80, None, 12.0),
        (3, 2, "swiglu", "topk_softmax", False, "fp16", 96, "wide", 12.0),
    )
)


def _expected_routing(logits: torch.Tensor, top_k: int, routing: Routing) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [T, k], weights [T, k]) with ties broken by the lowest expert id (small_batch's rule)."""
    values, ids = torch.sort(logits.float(), dim=-1, descending=True, stable=True)
    values, ids = values[:, :top_k], ids[:, :top_k]
    if routing.renormalize:
        return ids, torch.softmax(values, dim=-1)
    return ids, torch.softmax(logits.float(), dim=-1).gather(1, ids)


def _interpreter_worker(out_path: str) -> None:
    """Child process (TRITON_INTERPRET=1): run every case, save {name: {...tensors} | {"error": text}}."""
    from moe_dispatch import reference_moe
    from moe_dispatch.backends.small_batch import launch

    assert launch.runs_interpreted(), "the child must start with TRITON_INTERPRET=1"
    configs = _configs()
    results: dict[str, dict] = {}

    def attempt(name, fn):
        try:
            results[name] = fn()
        except Exception:
            results[name] = {"error": traceback.format_exc()}

    def run_case(i: int, case: CpuCase) -> dict:
        spec = case.spec()
        weights = ExpertWeights.random(spec, seed=100 + i)
        kernel = SmallBatchBackend(configs[case.config]).prepare(spec, weights)
        x, logits = untied_inputs(spec, case.num_tokens, seed=200 + i)
        x = (x.float() * case.scale).to(spec.dtype)
        return {"out": kernel(x, logits), "ref": reference_moe(spec, weights, x, logits)}

    for i, case in enumerate(CPU_CASES):
        attempt(case.id, lambda i=i, case=case: run_case(i, case))

    def routing_with_ties(routing: Routing) -> dict:
        spec = MoESpec(8, 3, 32, 16, SILU, False, torch.bfloat16, routing)
        gen = torch.Generator().manual_seed(3)
        logits = torch.randint(-2, 3, (6, 8), generator=gen).to(torch.bfloat16)  # [6, 8], many ties
        logits[0, :2] = float("-inf")
        logits[1] = 1.0  # all tied: experts 0, 1, 2
        x = torch.randn(6, 32, generator=gen).to(torch.bfloat16)
        weights = ExpertWeights.random(spec, seed=4)
        _, ids, wts = launch.gate_up(spec, weights, x, logits, launch.config_for(6))
        expected_ids, expected_wts = _expected_routing(logits, 3, routing)
        return {
            "ids": ids.view(6, 3).long(),
            "wts": wts.view(6, 3),
            "expected_ids": expected_ids,
            "expected_wts": expected_wts,
        }

    for name, routing in ROUTINGS.items():
        attempt(f"routing-{name}", lambda routing=routing: routing_with_ties(routing))

    def edge_inputs() -> dict:
        spec = CPU_CASES[0].spec()
        kernel = SmallBatchBackend().prepare(spec, ExpertWeights.random(spec, seed=5))
        x, logits = untied_inputs(spec, 3, seed=6)
        wide_x = torch.stack([x, x], dim=2)[:, :, 0]  # [3, H], non-contiguous, equal to x
        assert not wide_x.is_contiguous() and torch.equal(wide_x, x)
        return {"empty": kernel(x[:0], logits[:0]), "strided": kernel(wide_x, logits), "plain": kernel(x, logits)}

    attempt("edges", edge_inputs)
    torch.save(results, out_path)


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory) -> dict[str, dict]:
    return interpreted_results(__file__, tmp_path_factory)


def _result(results: dict[str, dict], name: str) -> dict:
    result = results[name]
    if "error" in result:
        pytest.fail(f"{name} raised in the interpreter:\n{result['error']}")
    return result


@pytest.mark.parametrize("case", CPU_CASES, ids=lambda c: c.id)
def test_matches_reference_under_interpreter(interpreted, case: CpuCase):
    result = _result(interpreted, case.id)
    out, ref = result["out"], result["ref"]
    assert out.shape == (case.num_tokens, case.hidden) and out.dtype == DTYPES[case.dtype]
    assert ref.abs().max() > 0.1  # a real signal, not zeros
    assert_close(out, ref, DTYPES[case.dtype], f"small_batch {case.id}")


@pytest.mark.parametrize("routing", ROUTINGS)
def test_routing_breaks_ties_by_lowest_expert_id(interpreted, routing):
    result = _result(interpreted, f"routing-{routing}")
    assert torch.equal(result["ids"], result["expected_ids"]), (result["ids"], result["expected_ids"])
    torch.testing.assert_close(result["wts"], result["expected_wts"], rtol=1e-6, atol=1e-7)


def test_empty_and_strided_inputs(interpreted):
    result = _result(interpreted, "edges")
    assert result["empty"].shape == (0, CPU_CASES[0].hidden)
    assert torch.equal(result["strided"], result["plain"])


# ---- in this process: no kernel runs ----


def test_registered_with_max_tokens():
    backend = get_backend("small_batch")
    assert isinstance(backend, SmallBatchBackend) and backend.name == "small_batch"
    assert backend.max_tokens == 16


def test_supports_answers_with_reasons():
    backend = SmallBatchBackend()
    for name, tp in (("gpt-oss-120b", 8), ("gpt-oss-120b", 2), ("qwen3-30b-a3b", 1), ("mixtral-8x7b", 8)):
        assert backend.supports(preset(name, tp=tp)), name
    assert backend.supports(preset("mixtral-8x7b", dtype=torch.float16))
    assert backend.supports(MoESpec(num_experts=16, top_k=3, hidden_size=80, intermediate_size=48))
    assert "bf16/fp16" in backend.supports(preset("mixtral-8x7b", dtype=torch.float32)).reason
    assert "top_k <= 8, got top_k=9" in backend.supports(MoESpec(16, 9, 64, 32)).reason
    assert "num_experts <= 1024, got num_experts=2048" in backend.supports(MoESpec(2048, 2, 64, 32)).reason


def test_availability(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert SmallBatchBackend().availability()
    if not torch.cuda.is_available():
        monkeypatch.delenv("TRITON_INTERPRET")
        answer = SmallBatchBackend().availability()
        assert not answer and "no CUDA GPU" in answer.reason and "TRITON_INTERPRET=1" in answer.reason


def test_prepare_errors(monkeypatch):
    from moe_dispatch.backends.small_batch import launch

    monkeypatch.setenv("TRITON_INTERPRET", "1")  # available, so prepare reaches its own checks
    spec = CPU_CASES[0].spec()
    weights = ExpertWeights.random(spec)
    strided = dataclasses.replace(weights, w2=weights.w2.transpose(1, 2).contiguous().transpose(1, 2))
    with pytest.raises(ValueError, match=r"needs it contiguous; got shape \(8, 80, 48\)"):
        SmallBatchBackend().prepare(spec, strided)
    with pytest.raises(ValueError, match="cannot run .* top_k <= 8"):
        SmallBatchBackend().prepare(MoESpec(16, 9, 64, 32), ExpertWeights.random(MoESpec(16, 9, 64, 32)))
    if not launch.runs_interpreted():  # this process imported triton for real
        with pytest.raises(ValueError, match="TRITON_INTERPRET=1 before triton is first imported"):
            SmallBatchBackend().prepare(spec, weights)


@pytest.mark.parametrize(
    "x_shape, l_shape, dtype, error, message",
    [
        ((3, 81), (3, 8), torch.bfloat16, ValueError, "hidden_states has hidden size 81, expected 80"),
        ((3, 80), (2, 8), torch.bfloat16, ValueError, r"router_logits has shape \(2, 8\), expected \(3, 8\)"),
        ((3, 80), (3, 8), torch.float16, TypeError, "hidden_states has dtype torch.float16, expected torch.bfloat16"),
        ((3, 80, 1), (3, 8), torch.bfloat16, ValueError, r"hidden_states must be 2-D"),
    ],
)
def test_bad_inputs_get_clear_errors(x_shape, l_shape, dtype, error, message):
    spec = CPU_CASES[0].spec()  # bf16, H=80, E=8
    kernel = SmallBatchKernel(spec, ExpertWeights.random(spec))  # checks run before any launch
    with pytest.raises(error, match=message):
        kernel(torch.randn(x_shape).to(dtype), torch.randn(l_shape).to(torch.bfloat16))


def test_config_is_validated_data():
    from moe_dispatch.backends.small_batch.launch import CONFIGS, SmallBatchConfig, config_for

    with pytest.raises(ValueError, match="block_n must be a power of two, got 12"):
        SmallBatchConfig(block_n=12)
    with pytest.raises(ValueError, match="down_stages must be an int in 1..8, got 0"):
        SmallBatchConfig(down_stages=0)
    with pytest.raises(ValueError, match="up_warps must be <= 32"):
        SmallBatchConfig(up_warps=64)
    with pytest.raises(ValueError, match="down_unroll must be a bool, got 1"):
        SmallBatchConfig(down_unroll=1)
    with pytest.raises(ValueError, match="pdl must be a bool"):
        SmallBatchConfig(pdl="yes")
    assert SmallBatchConfig(block_n=4, up_stages=3, down_unroll=True).describe() == "n4k256w4s3-h16i128w4u"
    assert SmallBatchConfig(pdl=True).describe().endswith("-pdl")
    bounds = [bound for bound, _ in CONFIGS]
    assert bounds == sorted(bounds)
    assert config_for(1) is CONFIGS[0][1] and config_for(10**9) is CONFIGS[-1][1]
    for bound, config in CONFIGS:
        assert config_for(bound) is config
