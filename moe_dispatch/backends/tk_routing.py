"""Fused routing for triton_kernels' matmul_ogs (Triton 3.6 generation): top-k and metadata.

SGLang's `routing(logits, k)` (sglang.srt.layers.moe.topk, TopK's TRITON_KERNEL format) turns the
router logits into triton_kernels' RoutingData, GatherIndx and ScatterIndx with a chain of small
launches: the top-k kernel, then `sum_bitmatrix_rows` (after a zero fill), two bitmatrix-metadata
stages, two ragged-metadata kernels and a torch gather of the gate values. Each takes 1-2 us and
a graph gap at decode sizes: about 13 us of kernels plus gaps per MoE call for GPT-OSS tp=8 on the
H200 (bench/results/nvidia-h200/kernel-breakdown-combine-tp8.md).

`fused_routing` computes the same in one launch up to 32 tokens and two above, in programs of
32 tokens (triton_kernels' top-k block):
1. `routing_topk_kernel`: triton_kernels' own top-k function (`streaming_topk`, passed in as a
   constexpr, so selection and tie-breaking are unchanged) and the same softmax over the k
   selected values, then each program's per-expert counts.
2. `routing_scatter_kernel` (with one program, the first kernel runs its code on the top-k still
   in registers): from all programs' counts, the per-expert totals and offsets; a stable sort of
   the program's (token, slot) assignments by expert gives each its rank within its expert over
   the whole call, hence `col_sorted_indx` (= GatherIndx.src, ScatterIndx.dst), its inverse `row_sorted_indx`
   (GatherIndx.dst, ScatterIndx.src), the gate values in expert order and, per block size b in
   triton_kernels' list (16..128 on CUDA), the block schedule ((block within expert) << 16 |
   expert, then -1s); the first program writes the counts, slice offsets and block offsets.
Results are bit-identical to SGLang's `routing` (tests/test_tk_routing_gpu.py).

Each scatter program reads every program's counts, so the path is taken up to `MAX_TOKENS`;
larger calls, and any call with arguments the fused path does not handle, run SGLang's `routing`
unchanged. `scoped_fast_routing()` swaps the module global for the duration of a block, like
`scoped_fast_combine`: for one thread issuing MoE calls.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools

import torch
import triton
import triton.language as tl

from moe_dispatch.backends.global_swap import swapped_global
from moe_dispatch.table_files import is_power_of_two

CHUNK_TOKENS = 32  # tokens per program: triton_kernels' top-k block, so its softmax runs in the same layout
TOPK_BLOCK_N = 32  # experts per step of triton_kernels' streaming top-k (its own choice)
MAX_CHUNKS = 256  # each scatter program reads all programs' counts: up to 8192 tokens
MAX_TOKENS = CHUNK_TOKENS * MAX_CHUNKS
MAX_COUNT_ROWS = 64  # programs' counts read per step: one step up to 2048 tokens
PAD_CHUNK = 256  # schedule slots filled with -1 per step


@triton.jit
def _chunk_counts(chunk, n_chunks, counts_ptr, E, E_PAD: tl.constexpr, COUNT_ROWS: tl.constexpr):
    """From all chunks' counts [n_chunks, E]: (this chunk's, the earlier chunks', all chunks')
    assignments per expert, each [E_PAD] (0 past E)."""
    experts = tl.arange(0, E_PAD)
    in_range = experts < E
    totals = tl.zeros([E_PAD], dtype=tl.int32)
    before = tl.zeros([E_PAD], dtype=tl.int32)
    for first in range(0, n_chunks, COUNT_ROWS):
        rows = first + tl.arange(0, COUNT_ROWS)
        present = (rows < n_chunks)[:, None] & in_range[None, :]
        counts = tl.load(counts_ptr + rows[:, None] * E + experts[None, :], mask=present, other=0)
        totals += tl.sum(counts, 0)
        before += tl.sum(tl.where((rows < chunk)[:, None], counts, 0), 0)
    mine = tl.load(counts_ptr + chunk * E + experts, mask=in_range, other=0)
    return mine, before, totals


@triton.jit
def _scatter_chunk(
    chunk,  # this program's chunk of LANES assignments
    expert,  # [LANES] int32: expert of each assignment of the chunk, 0xFFFF past the last
    vals,  # [LANES]: their gate values
    mine,  # [E_PAD] int32: the chunk's assignments per expert (0 past E)
    before,  # [E_PAD] int32: the earlier chunks' assignments per expert
    totals,  # [E_PAD] int32: all chunks' assignments per expert
    col_sum_ptr,  # [E] int32 out: assignments per expert
    col_sorted_ptr,  # [N] int32 out: assignment indices sorted by expert (stable)
    row_sorted_ptr,  # [N] int32 out: the inverse permutation
    gate_ptr,  # [N] out: vals in col_sorted order
    offs_ptr,  # [1 + SIZES, E + 1] int32 out: slice offsets, then block offsets per block size
    schedule_ptr,  # [SIZES, max_blocks] int32 out: block schedules, -1 padded
    E,
    max_blocks,
    LANES: tl.constexpr,  # assignments per chunk (CHUNK_TOKENS x k, a power of 2)
    E_PAD: tl.constexpr,  # power of 2 > E
    FIRST_LOG2: tl.constexpr,  # log2 of the smallest block size
    SIZES: tl.constexpr,  # number of block sizes (powers of 2 from 2**FIRST_LOG2)
    PAD_CHUNK: tl.constexpr,
):
    # Stable sort of the chunk's assignments by expert: sorted position p of expert e has rank
    # before[e] + p - (first position of e in the chunk) within e over the whole call.
    lanes = tl.arange(0, LANES)
    keys = tl.sort((expert.to(tl.uint32) << 16) | lanes.to(tl.uint32), 0)  # padding sorts last
    sorted_expert = (keys >> 16).to(tl.int32)
    sorted_lane = (keys & 0xFFFF).to(tl.int32)
    used = sorted_expert < E
    lookup = tl.minimum(sorted_expert, E_PAD - 1)
    slice_offs = tl.cumsum(totals, 0) - totals
    rank = tl.gather(before - (tl.cumsum(mine, 0) - mine), lookup, 0) + lanes
    dest = tl.gather(slice_offs, lookup, 0) + rank
    src = chunk * LANES + sorted_lane
    tl.store(col_sorted_ptr + dest, src, mask=used)
    tl.store(row_sorted_ptr + src, dest, mask=used)
    tl.store(gate_ptr + dest, tl.gather(vals, sorted_lane, 0), mask=used)
    experts = tl.arange(0, E_PAD)
    if chunk == 0:  # the per-expert metadata (block offsets below)
        tl.store(col_sum_ptr + experts, totals, mask=experts < E)
        tl.store(offs_ptr + experts, slice_offs, mask=experts <= E)
    for size in tl.static_range(SIZES):
        log2 = FIRST_LOG2 + size
        blocks = (totals + ((1 << log2) - 1)) >> log2
        block_offs = tl.cumsum(blocks, 0) - blocks
        block = rank >> log2
        slot = tl.gather(block_offs, lookup, 0) + block
        starts = used & ((rank & ((1 << log2) - 1)) == 0)  # the first assignment of each block
        tl.store(schedule_ptr + size * max_blocks + slot, (block << 16) | sorted_expert, mask=starts)
        if chunk == 0:  # the block offsets, and -1 after the schedule's last block
            tl.store(offs_ptr + (1 + size) * (E + 1) + experts, block_offs, mask=experts <= E)
            total = tl.sum(blocks, 0)
            for start in range(0, max_blocks, PAD_CHUNK):
                slots = start + tl.arange(0, PAD_CHUNK)
                tl.store(schedule_ptr + size * max_blocks + slots, -1, mask=(slots >= total) & (slots < max_blocks))


@triton.jit
def routing_topk_kernel(
    logits_ptr,  # [T, E], unit column stride
    stride_logits,
    experts_ptr,  # [N = T x K] int32 out: expert of each (token, slot), ascending per token
    vals_ptr,  # [N] out: gate value of each (token, slot), the logits' dtype
    counts_ptr,  # [n_chunks, E] int32 out
    col_sum_ptr,
    col_sorted_ptr,
    row_sorted_ptr,
    gate_ptr,
    offs_ptr,
    schedule_ptr,
    T,
    E,
    max_blocks,
    TOPK: tl.constexpr,  # triton_kernels' streaming_topk (or a stand-in with its signature)
    APPLY_SOFTMAX: tl.constexpr,
    K: tl.constexpr,  # top-k, a power of 2
    TOPK_E_PAD: tl.constexpr,  # E rounded up to TOPK_BLOCK_N, as triton_kernels pads it
    TOPK_BLOCK_N: tl.constexpr,
    CHUNK_TOKENS: tl.constexpr,
    ONE_CHUNK: tl.constexpr,  # one program: it also runs the scatter, on its registers
    E_PAD: tl.constexpr,
    FIRST_LOG2: tl.constexpr,
    SIZES: tl.constexpr,
    COUNT_ROWS: tl.constexpr,
    PAD_CHUNK: tl.constexpr,
):
    chunk = tl.program_id(0)
    tokens = chunk * CHUNK_TOKENS + tl.arange(0, CHUNK_TOKENS)
    real = tokens[:, None] < T
    vals, experts = TOPK(logits_ptr, stride_logits, E, tokens, real, TOPK_E_PAD, K, TOPK_BLOCK_N)
    if APPLY_SOFTMAX:  # as triton_kernels' top-k kernel normalizes the selected values
        vals = tl.softmax(vals.to(tl.float32), dim=1, keep_dims=True).to(logits_ptr.dtype.element_ty)
    LANES: tl.constexpr = CHUNK_TOKENS * K
    expert = tl.reshape(tl.where(real, experts.to(tl.int32), 0xFFFF), [LANES])  # token-major, as flattened
    bins = tl.arange(0, E_PAD)
    counts = tl.histogram(tl.minimum(expert, E), E_PAD)  # lanes past the last token count in bin E
    counts = tl.where(bins < E, counts, 0)
    flat = tokens[:, None] * K + tl.arange(0, K)[None, :]
    tl.store(vals_ptr + flat, vals, mask=real)
    tl.store(experts_ptr + flat, experts, mask=real)
    tl.store(counts_ptr + chunk * E + bins, counts, mask=bins < E)
    if ONE_CHUNK:  # nothing stored above is read back: the scatter runs on this program's registers
        _scatter_chunk(
            0, expert, tl.reshape(vals, [LANES]), counts, tl.zeros([E_PAD], dtype=tl.int32), counts, col_sum_ptr,
            col_sorted_ptr, row_sorted_ptr, gate_ptr, offs_ptr, schedule_ptr, E, max_blocks, LANES, E_PAD, FIRST_LOG2,
            SIZES, PAD_CHUNK,
        )  # fmt: skip


@triton.jit
def routing_scatter_kernel(
    experts_ptr, vals_ptr, counts_ptr, col_sum_ptr, col_sorted_ptr, row_sorted_ptr, gate_ptr, offs_ptr, schedule_ptr,
    N, E, max_blocks, n_chunks,
    LANES: tl.constexpr, E_PAD: tl.constexpr, FIRST_LOG2: tl.constexpr, SIZES: tl.constexpr,
    COUNT_ROWS: tl.constexpr, PAD_CHUNK: tl.constexpr,
):  # fmt: skip
    chunk = tl.program_id(0)
    assignments = chunk * LANES + tl.arange(0, LANES)
    real = assignments < N
    expert = tl.load(experts_ptr + assignments, mask=real, other=0xFFFF)
    vals = tl.load(vals_ptr + assignments, mask=real)
    mine, before, totals = _chunk_counts(chunk, n_chunks, counts_ptr, E, E_PAD, COUNT_ROWS)
    _scatter_chunk(
        chunk, expert, vals, mine, before, totals, col_sum_ptr, col_sorted_ptr, row_sorted_ptr, gate_ptr, offs_ptr,
        schedule_ptr, E, max_blocks, LANES, E_PAD, FIRST_LOG2, SIZES, PAD_CHUNK,
    )  # fmt: skip


def max_tiles(num_experts: int, num_rows: int, min_block: int) -> int:
    """Schedule length: the most blocks of `min_block` rows `num_rows` rows over `num_experts`
    experts can need (each expert's last block partly filled)."""
    if num_rows <= num_experts:
        return num_rows
    return num_experts - 1 + triton.cdiv(num_rows - num_experts + 1, min_block)


@dataclasses.dataclass(frozen=True)
class RoutingMetadata:
    """What `fused_routing` computes (shapes for N = T x k assignments, E experts, S block sizes)."""

    experts: torch.Tensor  # [T, k] int32: the top-k's experts, ascending per token
    vals: torch.Tensor  # [T, k]: their gate values, the logits' dtype
    col_sum: torch.Tensor  # [E] int32
    col_sorted: torch.Tensor  # [N] int32
    row_sorted: torch.Tensor  # [N] int32
    gate: torch.Tensor  # [N], the logits' dtype
    slice_offs: torch.Tensor  # [E + 1] int32
    block_offs: torch.Tensor  # [S, E + 1] int32
    schedule: torch.Tensor  # [S, max_tiles] int32


def fused_routing(
    logits: torch.Tensor, k: int, apply_softmax: bool, topk_fn: object, block_sizes_log2: range
) -> RoutingMetadata:
    """The top-k of `logits` [T, E] and its routing metadata, in one launch up to CHUNK_TOKENS
    tokens and two above. `topk_fn`: triton_kernels' `streaming_topk` (a jit function)."""
    if logits.dim() != 2 or logits.stride(1) != 1 or not 1 <= logits.shape[0] <= MAX_TOKENS:
        raise ValueError(
            f"fused_routing: logits {tuple(logits.shape)} must be [T, E], unit column stride, 1..{MAX_TOKENS} rows"
        )
    tokens, num_experts = logits.shape
    if not is_power_of_two(k) or k > num_experts or num_experts >= 0xFFFF:
        raise ValueError(f"fused_routing: top-k {k} must be a power of 2 <= the {num_experts} experts (< 65535)")
    n = tokens * k
    chunks = triton.cdiv(tokens, CHUNK_TOKENS)
    sizes = len(block_sizes_log2)
    blocks = max_tiles(num_experts, n, 1 << block_sizes_log2[0])
    parts = [n, chunks * num_experts, num_experts, n, n, (1 + sizes) * (num_experts + 1), sizes * blocks]
    ints = torch.empty(sum(parts), dtype=torch.int32, device=logits.device)  # one allocation, split
    experts, counts, col_sum, col_sorted, row_sorted, offs, schedule = ints.split(parts)
    vals, gate = torch.empty(2, n, dtype=logits.dtype, device=logits.device).unbind(0)
    outputs = (experts, vals, counts, col_sum, col_sorted, row_sorted, gate, offs, schedule)
    shape = dict(
        E_PAD=triton.next_power_of_2(num_experts + 1), FIRST_LOG2=block_sizes_log2[0], SIZES=sizes,
        COUNT_ROWS=min(MAX_COUNT_ROWS, max(2, triton.next_power_of_2(chunks))), PAD_CHUNK=PAD_CHUNK, num_warps=4,
    )  # fmt: skip
    routing_topk_kernel[(chunks,)](
        logits, logits.stride(0), *outputs, tokens, num_experts, blocks,
        TOPK=topk_fn, APPLY_SOFTMAX=apply_softmax, K=k,
        TOPK_E_PAD=triton.cdiv(num_experts, TOPK_BLOCK_N) * TOPK_BLOCK_N, TOPK_BLOCK_N=TOPK_BLOCK_N,
        CHUNK_TOKENS=CHUNK_TOKENS, ONE_CHUNK=chunks == 1, **shape,
    )  # fmt: skip
    if chunks > 1:
        routing_scatter_kernel[(chunks,)](*outputs, n, num_experts, blocks, chunks, LANES=CHUNK_TOKENS * k, **shape)
    offs = offs.view(1 + sizes, num_experts + 1)
    return RoutingMetadata(
        experts.view(tokens, k), vals.view(tokens, k), col_sum, col_sorted, row_sorted, gate, offs[0], offs[1:],
        schedule.view(sizes, blocks),
    )  # fmt: skip


def takes_fast_path(logits: object, n_expts_act: int, options: dict) -> bool:
    """Whether `fast_routing` computes routing(logits, n_expts_act, **options) itself."""
    if any(options.get(name) is not None for name in ("expt_indx", "n_rows")):
        return False
    if options.get("simulated_ep", 1) != 1:
        return False
    if not (isinstance(logits, torch.Tensor) and logits.dim() == 2 and logits.is_cuda and logits.stride(1) == 1):
        return False
    tokens, experts = logits.shape
    return 1 <= tokens <= MAX_TOKENS and is_power_of_two(n_expts_act) and n_expts_act <= experts < 0xFFFF


def triton_kernels_topk() -> object | None:
    """triton_kernels' streaming top-k (a jit function), None where this triton_kernels lacks it."""
    try:
        from triton_kernels.topk_details._topk_forward import streaming_topk
    except ImportError:
        return None
    return streaming_topk


def make_fast_routing(original, topk_fn: object = None):
    """SGLang's `routing(logits, n_expts_act, sm_first=False, expt_indx=None, simulated_ep=1,
    n_rows=None)`: the plain call runs `fused_routing`, any other `original`. `topk_fn`: the
    top-k jit function (default: triton_kernels'; without it every call runs `original`)."""
    topk_fn = topk_fn if topk_fn is not None else triton_kernels_topk()

    @functools.wraps(original)
    def fast_routing(logits, n_expts_act, *args, **options):
        if args or topk_fn is None or not takes_fast_path(logits, n_expts_act, options):
            return original(logits, n_expts_act, *args, **options)
        from triton_kernels.matmul_ogs import GatherIndx, RoutingData, ScatterIndx
        from triton_kernels.tensor import RaggedTensorMetadata

        fast_routing.calls += 1
        sm_first = options.get("sm_first", False)
        if sm_first:
            logits = torch.softmax(logits, dim=-1)
        meta = fused_routing(logits, n_expts_act, not sm_first, topk_fn, RaggedTensorMetadata.block_sizes_log2())
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
    """Inside the block, SGLang's triton_kernels routing runs `fused_routing`.

    Yields the installed fast_routing (its `calls` counts fused-path calls), or None when SGLang's
    `routing` is absent. `module`: the module whose `routing` global is swapped (tests).
    """
    module = module if module is not None else sglang_topk_module()
    return swapped_global(module, "routing", make_fast_routing)
