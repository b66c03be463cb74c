"""Model folders for the serving benchmark: config.json and a tokenizer, built from the project's presets.

SGLang's one-batch benchmark loads a model folder; with `--load-format dummy` the weights are random
and only `config.json` plus a tokenizer the loader can open must exist. The MoE part of each config
(experts, top-k, hidden size, intermediate size) comes from `moe_dispatch.spec.preset`; the rest
(layers, heads, vocabulary, rope, ...) from each model's published config.json, kept in `ARCHS`.

Per-rank shapes (`gpt-oss-120b:tp8`, run on one GPU with tp=1): the layer shapes that one rank of a
tp-way server holds. Divided by tp: the MoE intermediate size, query heads, KV heads (at least 1, as
SGLang replicates them), the vocabulary (rounded up to 64, at least 10048 because one_batch draws
prompt ids below 10000). Kept: experts, top-k, hidden size, head_dim. Mixtral keeps all its heads:
SGLang's Mixtral derives head_dim from hidden_size / heads. With a real tp (`per_rank=False`) the
folder holds the full model and SGLang shards it.

Depth: the model's own unless the (per-rank) weights would pass WEIGHT_BUDGET (100 GB). The arithmetic,
bf16 weights, float32 expert biases (`weight_bytes`), for GPT-OSS-120B tp=2 per rank:
    experts   128 x (2*1440*2880 + 2880*1440) x 2 B + 128 x (2*1440 + 2880) x 4 B = 3.188 GB per layer
    attention 2880 x (32 + 2*4) x 64 x 2 B (qkv) + 32*64 x 2880 x 2 B (o) + router   = 0.027 GB per layer
    embedding and lm_head 2 x 100544 x 2880 x 2 B                                       = 1.16 GB
30 layers weigh 97.6 GB (32 would be 104 GB); the depth rounds down to even so sliding and full
attention layers stay paired. On a 139 GiB H200 that leaves ~51 GB: the KV pool (KV_BUDGET, 16 GiB)
and ~34 GB for CUDA graphs (decode + prefill, both kernels while measuring) and activations (an eager
prefill of 256 x 64 tokens). GPT-OSS-120B tp=8 (29 GB, 36 layers) and Qwen3-30B-A3B tp=1 (61 GB,
48 layers) fit at full depth.

Pure functions return dicts (unit-tested); `write_model_folder` is the only one that writes. The
tokenizer is ours (tokenizer.py).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

from bench.serving.tokenizer import BOS_ID, EOS_ID, PAD_ID, tokenizer_files
from moe_dispatch.spec import PRESETS, preset

WEIGHT_BUDGET = 100e9  # bytes of weights per GPU the default depth stays under
KV_BUDGET = 16 * 2**30  # bytes of KV cache the static memory fraction leaves room for
MIN_VOCAB = 10048  # one_batch's synthetic prompts use token ids < 10000
_VOCAB_ALIGN = 64


@dataclasses.dataclass(frozen=True)
class Arch:
    """The non-MoE part of a published config.json: depth, attention, vocabulary, family keys."""

    architecture: str
    model_type: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    shard_heads: bool = True  # False: SGLang derives head_dim from hidden_size / heads (Mixtral)
    layer_multiple: int = 1  # depths round down to a multiple of this (GPT-OSS pairs sliding/full)


_GPT_OSS = dict(architecture="GptOssForCausalLM", model_type="gpt_oss", head_dim=64, vocab_size=201088)
ARCHS: dict[str, Arch] = {
    "gpt-oss-120b": Arch(num_layers=36, num_heads=64, num_kv_heads=8, layer_multiple=2, **_GPT_OSS),
    "gpt-oss-20b": Arch(num_layers=24, num_heads=64, num_kv_heads=8, layer_multiple=2, **_GPT_OSS),
    "qwen3-30b-a3b": Arch("Qwen3MoeForCausalLM", "qwen3_moe", 48, 32, 4, 128, 151936),
    "mixtral-8x7b": Arch("MixtralForCausalLM", "mixtral", 32, 32, 8, 128, 32000, shard_heads=False),
}
assert set(ARCHS) == set(PRESETS), "every MoE preset needs an architecture entry"


def _arch(name: str) -> Arch:
    if name not in ARCHS:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(ARCHS)}")
    return ARCHS[name]


def _shard(total: int, tp: int, what: str) -> int:
    if total % tp:
        raise ValueError(f"tp={tp} does not divide {what}={total}")
    return total // tp


def _gpt_oss_keys(layers: int) -> dict:
    return {
        "rms_norm_eps": 1e-05,
        "rope_theta": 150000,
        "rope_scaling": {
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "factor": 32.0,
            "original_max_position_embeddings": 4096,
            "rope_type": "yarn",
            "truncate": False,
        },
        "sliding_window": 128,
        "layer_types": ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)],
        "max_position_embeddings": 131072,
        "initial_context_length": 4096,
        "swiglu_limit": 7.0,
        "attention_bias": True,
        "router_aux_loss_coef": 0.9,
        "hidden_act": "silu",
    }


def _qwen3_moe_keys(layers: int, tp: int) -> dict:
    return {
        "intermediate_size": _shard(6144, tp, "qwen3 dense intermediate_size"),  # unused: every layer is MoE
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "norm_topk_prob": True,
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        "rope_scaling": None,
        "max_position_embeddings": 40960,
        "max_window_layers": layers,
        "sliding_window": None,
        "use_sliding_window": False,
        "attention_bias": False,
        "router_aux_loss_coef": 0.001,
        "hidden_act": "silu",
    }


def _mixtral_keys() -> dict:
    return {
        "rms_norm_eps": 1e-05,
        "rope_theta": 1000000.0,
        "max_position_embeddings": 32768,
        "sliding_window": None,
        "router_aux_loss_coef": 0.02,
        "hidden_act": "silu",
    }


def model_config(name: str, tp: int = 1, num_layers: int | None = None, per_rank: bool = True) -> dict:
    """config.json of preset `name` at depth `num_layers` (None: `default_layers`).

    per_rank=True: the shapes of one rank of a tp-way server, for a tp=1 run; False: the full model
    (tp only chooses the default depth), for a real `--tp-size tp` run.
    """
    arch = _arch(name)
    if not isinstance(tp, int) or isinstance(tp, bool) or tp <= 0:
        raise ValueError(f"tp must be a positive int, got {tp!r}")
    layers = default_layers(name, tp) if num_layers is None else num_layers
    if not isinstance(layers, int) or isinstance(layers, bool) or not 1 <= layers <= arch.num_layers:
        raise ValueError(f"{name} has 1..{arch.num_layers} layers, got {layers!r}")
    shard = tp if per_rank else 1
    spec = preset(name, tp=shard)
    heads_tp = shard if arch.shard_heads else 1
    vocab = arch.vocab_size
    if shard > 1:
        vocab = max(MIN_VOCAB, math.ceil(vocab / shard / _VOCAB_ALIGN) * _VOCAB_ALIGN)
    config = {
        "architectures": [arch.architecture],
        "model_type": arch.model_type,
        "hidden_size": spec.hidden_size,
        "num_hidden_layers": layers,
        "num_attention_heads": _shard(arch.num_heads, heads_tp, f"{name} attention heads"),
        "num_key_value_heads": max(1, arch.num_kv_heads // heads_tp),
        "head_dim": arch.head_dim,
        "num_experts_per_tok": spec.top_k,
        "vocab_size": vocab,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "output_router_logits": False,
        "pad_token_id": PAD_ID,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
    }
    if arch.model_type == "gpt_oss":
        config |= _gpt_oss_keys(layers)
        config |= {"experts_per_token": spec.top_k, "num_local_experts": spec.num_experts}
        config["intermediate_size"] = spec.intermediate_size
    elif arch.model_type == "qwen3_moe":
        config |= _qwen3_moe_keys(layers, shard)
        config |= {"num_experts": spec.num_experts, "moe_intermediate_size": spec.intermediate_size}
    else:
        config |= _mixtral_keys()
        config |= {"num_local_experts": spec.num_experts, "intermediate_size": spec.intermediate_size}
        del config["head_dim"]  # SGLang's Mixtral computes it as hidden_size / heads
    return config


def moe_dims(config: dict) -> tuple[int, int, int, int]:
    """(experts, top-k, hidden, intermediate) as written in `config`, whatever the family's key names."""
    experts = config.get("num_local_experts", config.get("num_experts"))
    inter = config.get("moe_intermediate_size", config.get("intermediate_size"))
    return experts, config["num_experts_per_tok"], config["hidden_size"], inter


def weight_bytes(config: dict) -> int:
    """Bytes of bf16 weights the config describes (float32 expert biases for GPT-OSS); norms included."""
    experts, _, hidden, inter = moe_dims(config)
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config.get("head_dim", hidden // heads)
    bf16 = 2
    qkv_out = (heads + 2 * kv_heads) * head_dim
    attention = hidden * qkv_out * bf16 + heads * head_dim * hidden * bf16
    if config.get("attention_bias"):
        attention += (qkv_out + hidden) * bf16
    if config["model_type"] == "gpt_oss":
        attention += heads * 4  # sinks, float32
    router = hidden * experts * bf16
    expert_weights = experts * 3 * inter * hidden * bf16
    if config["model_type"] == "gpt_oss":
        router += experts * bf16
        expert_weights += experts * (2 * inter + hidden) * 4
    norms = 2 * hidden * bf16
    per_layer = attention + router + expert_weights + norms
    embeddings = 2 * config["vocab_size"] * hidden * bf16 + hidden * bf16
    return config["num_hidden_layers"] * per_layer + embeddings


def kv_bytes_per_token(config: dict) -> int:
    """KV-cache bytes per token over all layers (bf16 K and V)."""
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim", config["hidden_size"] // heads)
    return config["num_hidden_layers"] * 2 * config["num_key_value_heads"] * head_dim * 2


def default_layers(name: str, tp: int = 1, budget: float = WEIGHT_BUDGET) -> int:
    """The model's depth, or the deepest multiple of its layer_multiple whose per-rank weights fit `budget`."""
    arch = _arch(name)
    layers = arch.num_layers
    while layers > arch.layer_multiple:
        if weight_bytes(model_config(name, tp, layers)) <= budget:
            return layers
        layers -= arch.layer_multiple
    return layers


def mem_fraction_static(weights: int, gpu_bytes: int, kv_bytes: int = KV_BUDGET) -> float:
    """SGLang's --mem-fraction-static for `weights` plus a `kv_bytes` KV pool on a `gpu_bytes` GPU.

    SGLang sizes the KV pool as fraction x free memory - weights; the rest of the GPU stays free for
    CUDA graphs and activations. Rounded up to 0.01, clamped to [0.2, 0.9].
    """
    if gpu_bytes <= 0:
        raise ValueError(f"gpu_bytes must be positive, got {gpu_bytes!r}")
    fraction = math.ceil((weights + kv_bytes) / gpu_bytes * 100) / 100
    if fraction > 0.9:
        raise ValueError(
            f"{weights / 1e9:.1f} GB of weights and a {kv_bytes / 2**30:.0f} GiB KV pool need "
            f"{fraction:.2f} of a {gpu_bytes / 2**30:.0f} GiB GPU; use fewer layers (name:tpN:layers=L)"
        )
    return max(0.2, fraction)


def write_model_folder(folder: Path | str, config: dict) -> Path:
    """Write config.json and the tokenizer files into `folder` (created); return it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in {"config.json": config, **tokenizer_files()}.items():
        (folder / name).write_text(json.dumps(data, indent=1) + "\n")
    return folder


DEFAULT_MODELS = ("gpt-oss-120b:tp8", "gpt-oss-120b:tp2", "qwen3-30b-a3b:tp1")


@dataclasses.dataclass(frozen=True)
class ModelChoice:
    """One `--models` entry: a preset, the tp whose rank shapes it takes (or the real tp), a depth."""

    name: str
    tp: int = 1
    layers: int | None = None  # None: default_layers(name, tp)

    @property
    def depth(self) -> int:
        return default_layers(self.name, self.tp) if self.layers is None else self.layers

    @property
    def key(self) -> str:
        """File-name key: "gpt-oss-120b-tp8", with "-<L>l" when the depth is not the default."""
        suffix = "" if self.depth == default_layers(self.name, self.tp) else f"-{self.depth}l"
        return f"{self.name}-tp{self.tp}{suffix}"


def parse_model(text: str, default_tp: int = 1) -> ModelChoice:
    """ "gpt-oss-120b:tp2:layers=30" -> ModelChoice; tp and layers are optional; ValueError names the part."""
    name, *parts = [p.strip() for p in text.strip().split(":")]
    _arch(name)
    tp, layers = default_tp, None
    for part in parts:
        try:
            if part.startswith("tp"):
                tp = int(part[2:])
            elif part.startswith("layers="):
                layers = int(part.removeprefix("layers="))
            else:
                raise ValueError(part)
        except ValueError:
            raise ValueError(f"bad part {part!r} in model {text!r}; expected NAME[:tpN][:layers=L]") from None
    choice = ModelChoice(name, tp, layers)
    model_config(name, tp, choice.depth)  # validates tp against heads/intermediate size and the depth
    return choice
