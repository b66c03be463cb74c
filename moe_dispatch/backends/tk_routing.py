"""A fused routing-metadata kernel for triton_kernels' matmul_ogs (Triton 3.6 generation).

SGLang's `routing(logits, k)` (sglang.srt.layers.moe.topk, TopK's TRITON_KERNEL format) turns the
router logits into triton_kernels' RoutingData, GatherIndx and ScatterIndx with a chain of small
launches: the top-k kernel, then `sum_bitmatrix_rows` (after a zero fill), two bitmatrix-metadata
stages, two ragged-metadata kernels and a torch gather of the gate values. Each takes 1-2 us and
a graph gap at decode sizes: about 10 us of kernels plus gaps per MoE call for GPT-OSS tp=8 on the
H200 (bench/results/nvidia-h200/kernel-breakdown-combine-tp8.md).

`routing_metadata_kernel` computes everything after the top-k in one program:
- a stable sort of the (token, slot) assignments by expert: `col_sorted_indx` (= GatherIndx.src,
  ScatterIndx.dst) and its inverse `row_sorted_indx` (GatherIndx.dst, ScatterIndx.src);
- the per-expert counts (`slice_sizes`, RoutingData.expt_hist) and their exclusive sums;
- per block size b in triton_kernels' list (16..128 on CUDA): the exclusive sums of
  ceil(count / b) and the block schedule ((block within expert) << 16 | expert, then -1s);
- the gate values in expert order (RoutingData.gate_scal).
The top-k itself stays triton_kernels' own kernel, so the selection and its tie-breaking are
unchanged; the metadata is integer work. Results are bit-identical to SGLang's `routing`.

One program sorts all N = tokens x k assignments, so the path is taken up to
`MAX_ASSIGNMENTS`; larger calls, and any call with arguments the fused path does not handle,
run SGLang's `routing` unchanged. `scoped_fast_routing()` swaps the module global for the
duration of a block, like `scoped_fast_combine`: for one thread issuing MoE calls.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools

import torch
import triton
import triton.language as tl

from moe_dispatch.backends.global_swap import swapped_global

# Tokens x k sorted by one program. On the H200 the one-program sort took 0.7 us for 128
# assignments and 46 us for 4096 (a one-off probe timing the kernel's parts, 2026-11-29): past
# about a thousand, triton_kernels' many-program metadata is faster.
MAX_ASSIGNMENTS = 1024
PAD_CHUNK = 256  # schedule slots filled with -1 per step


@triton.jit
def routing_metadata_kernel(
    expert_ptr,  # [N] expert of each (token, slot), row-major (the top-k's indices, any int type)
    vals_ptr,  # [N] gate value of each (token, slot)
    col_sum_ptr,  # [E] int32 out: assignments per expert
    col_sorted_ptr,  # [N] int32 out: assignment indices sorted by expert (stable)
    row_sorted_ptr,  # [N] int32 out: the inverse permutation
    gate_ptr,  # [N] out: vals in col_sorted order
    offs_ptr,  # [1 + SIZES, E + 1] int32 out: slice offsets, then block offsets per block size
    schedule_ptr,  # [SIZES, max_blocks] int32 out: block schedules, -1 padded
    N,
    E,
    max_blocks,
    BLOCK: tl.constexpr,  # power of 2 >= N
    E_PAD: tl.constexpr,  # power of 2 > E (bin E collects the unused lanes)
    FIRST_LOG2: tl.constexpr,  # log2 of the smallest block size
    SIZES: tl.constexpr,  # number of block sizes (powers of 2 from 2**FIRST_LOG2)
    PAD_CHUNK: tl.constexpr,
):
    lanes = tl.arange(0, BLOCK)
    real = lanes < N
    expert = tl.load(expert_ptr + lanes, mask=real, other=-1).to(tl.int32)
    expert = tl.where(real & (expert >= 0), expert, 0xFFFF)  # unused lanes sort last
    keys = tl.sort((expert.to(tl.uint32) << 16) | lanes.to(tl.uint32), 0)
    sorted_expert = (keys >> 16).to(tl.int32)
    sorted_src = (keys & 0xFFFF).to(tl.int32)
    used = sorted_expert != 0xFFFF
    tl.store(col_sorted_ptr + lanes, tl.where(used, sorted_src, -1), mask=real)
    tl.store(row_sorted_ptr + sorted_src, tl.where(used, lanes, -1), mask=real)
    gate = tl.load(vals_ptr + sorted_src, mask=used & real, other=0.0)
    tl.store(gate_ptr + lanes, gate, mask=real)

    experts = tl.arange(0, E_PAD)
    counts = tl.histogram(tl.minimum(sorted_expert, E), E_PAD)
    counts = tl.where(experts < E, counts, 0)
    tl.store(col_sum_ptr + experts, counts, mask=experts < E)
    tl.store(offs_ptr + experts, tl.cumsum(counts, 0) - counts, mask=experts <= E)
    for size in tl.static_range(SIZES):
        log2 = FIRST_LOG2 + size
        blocks = (counts + ((1 << log2) - 1)) >> log2
        total = tl.sum(blocks, 0)
        tl.store(offs_ptr + (1 + size) * (E + 1) + experts, tl.cumsum(blocks, 0) - blocks, mask=experts <= E)
        for start in range(0, max_blocks, PAD_CHUNK):  # -1 after the last block
            slots = start + tl.arange(0, PAD_CHUNK)
            tl.store(schedule_ptr + size * max_blocks + slots, -1, mask=(slots >= total) & (slots < max_blocks))
    tl.debug_barrier()  # the offsets are read back below by other threads of this program
    # Lane p holds the sorted assignment p, of expert e, at rank p - slice_offs[e] within e; a rank
    # that is a multiple of the block size starts block rank / size of e, at schedule slot
    # block_offs[e] + rank / size.
    owned = used & real
    expert = tl.minimum(sorted_expert, E)
    rank = lanes - tl.load(offs_ptr + expert, mask=owned, other=0)
    for size in tl.static_range(SIZES):
        log2 = FIRST_LOG2 + size
        block = rank >> log2
        slot = tl.load(offs_ptr + (1 + size) * (E + 1) + expert, mask=owned, other=0) + block
        starts = owned & ((rank & ((1 << log2) - 1)) == 0)
        tl.store(schedule_ptr + size * max_blocks + slot, (block << 16) | sorted_expert, mask=starts)


def max_tiles(num_experts: int, num_rows: int, min_block: int) -> int:
    """Schedule length: the most blocks of `min_block` rows `num_rows` rows over `num_experts`
    experts can need (each expert's last block partly filled)."""
    if num_rows <= num_experts:
        return num_rows
    return num_experts - 1 + triton.cdiv(num_rows - num_experts + 1, min_block)


@dataclasses.dataclass(frozen=True)
class RoutingMetadata:
    """What `routing_metadata` computes (shapes for N assignments, E experts, S block sizes)."""

    col_sum: torch.Tensor  # [E] int32
    col_sorted: torch.Tensor  # [N] int32
    row_sorted: torch.Tensor  # [N] int32
    gate: torch.Tensor  # [N], the dtype of the values
    slice_offs: torch.Tensor  # [E + 1] int32
    block_offs: torch.Tensor  # [S, E + 1] int32
    schedule: torch.Tensor  # [S, max_tiles] int32


def routing_metadata(
    experts: torch.Tensor, vals: torch.Tensor, num_experts: int, block_sizes_log2: range
) -> RoutingMetadata:
    """The routing metadata of top-k `experts` [T, k] (int) with gate `vals` [T, k], in one launch."""
    if experts.dim() != 2 or tuple(vals.shape) != tuple(experts.shape):
        raise ValueError(
            f"routing_metadata: experts {tuple(experts.shape)} and vals {tuple(vals.shape)} must be [T, k]"
        )
    n = experts.numel()
    if n > MAX_ASSIGNMENTS or num_experts >= 0xFFFF:
        raise ValueError(f"routing_metadata: {n} assignments / {num_experts} experts exceed one program's sort")
    sizes = len(block_sizes_log2)
    blocks = max_tiles(num_experts, n, 1 << block_sizes_log2[0])
    parts = [num_experts, n, n, (1 + sizes) * (num_experts + 1), sizes * blocks]  # one allocation, split
    ints = torch.empty(sum(parts), dtype=torch.int32, device=experts.device)
    col_sum, col_sorted, row_sorted, offs, schedule = ints.split(parts)
    gate = torch.empty(n, dtype=vals.dtype, device=vals.device)
    block = max(16, triton.next_power_of_2(n))
    routing_metadata_kernel[(1,)](
        experts.reshape(-1), vals.reshape(-1), col_sum, col_sorted, row_sorted, gate, offs, schedule,
        n, num_experts, blocks,
        BLOCK=block, E_PAD=triton.next_power_of_2(num_experts + 1), FIRST_LOG2=block_sizes_log2[0], SIZES=sizes,
        PAD_CHUNK=PAD_CHUNK, num_warps=4 if block <= 512 else 8,
    )  # fmt: skip
    offs = offs.view(1 + sizes, num_experts + 1)
    return RoutingMetadata(col_sum, col_sorted, row_sorted, gate, offs[0], offs[1:], schedule.view(sizes, blocks))


def takes_fast_path(logits: object, n_expts_act: int, options: dict) -> bool:
    """Whether `fast_routing` computes routing(logits, n_expts_act, **options) itself."""
    if any(options.get(name) is not None for name in ("expt_indx", "n_rows")):
        return False
    if options.get("simulated_ep", 1) != 1:
        return False
    if not (isinstance(logits, torch.Tensor) and logits.dim() == 2 and logits.is_cuda):
        return False
    return logits.shape[0] * n_expts_act <= MAX_ASSIGNMENTS and logits.shape[1] < 0xFFFF


def make_fast_routing(original):
    """SGLang's `routing(logits, n_expts_act, sm_first=False, expt_indx=None, simulated_ep=1,
    n_rows=None)`: the plain call runs triton_kernels' top-k and `routing_metadata`, any other
    `original`."""

    @functools.wraps(original)
    def fast_routing(logits, n_expts_act, *args, **options):
        if args or not takes_fast_path(logits, n_expts_act, options):
            return original(logits, n_expts_act, *args, **options)
        from triton_kernels.matmul_ogs import GatherIndx, RoutingData, ScatterIndx
        from triton_kernels.tensor import RaggedTensorMetadata
        from triton_kernels.topk import topk_forward

        fast_routing.calls += 1
        sm_first = options.get("sm_first", False)
        if sm_first:
            logits = torch.softmax(logits, dim=-1)
        vals, experts, _ = topk_forward(logits, n_expts_act, apply_softmax=not sm_first)
        meta = routing_metadata(experts, vals, logits.shape[-1], RaggedTensorMetadata.block_sizes_log2())
        ragged = RaggedTensorMetadata(meta.col_sum, meta.slice_offs, meta.block_offs, meta.schedule)
        routing_data = RoutingData(meta.gate, meta.col_sum, logits.shape[-1], n_expts_act, ragged)
        return routing_data, GatherIndx(meta.col_sorted, meta.row_sorted), ScatterIndx(meta.row_sorted, meta.col_sorted)

    fast_routing.calls = 0  # how many calls took the fused path (tests)
    return fast_routing


def sglang_topk_module() -> object | None:
    """sglang.srt.layers.moe.topk when it defines the triton_kernels `routing` (Triton 3.6 era)."""
    try:
        import sglang.srt.layers.moe.topk as module
    except Exception:  # SGLang absent or broken: nothing to swap
        return None
    return module if callable(getattr(module, "routing", None)) else None


def scoped_fast_routing(module: object = None) -> contextlib.AbstractContextManager[object | None]:
    """Inside the block, SGLang's triton_kernels routing runs `routing_metadata` after the top-k.

    Yields the installed fast_routing (its `calls` counts fused-path calls), or None when SGLang's
    `routing` is absent. `module`: the module whose `routing` global is swapped (tests).
    """
    module = module if module is not None else sglang_topk_module()
    return swapped_global(module, "routing", make_fast_routing)
