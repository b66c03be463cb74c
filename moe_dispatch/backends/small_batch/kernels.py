"""The two Triton kernels of `small_batch`: routing + gate/up + activation, then down + combine.

Launch 1, `gate_up_kernel`, grid (T * top_k, cdiv(I, BLOCK_N)); axis 0 (the pair) varies
fastest, so the programs working on the same rows of different (token, slot) pairs run
at the same time and a second reader of an expert's tile finds it in L2:
    program (pair p = t * top_k + s, tile j):
        route token t (all E logits, top-k by k max-reductions, lowest index on ties)
        -> e = its s-th expert, weight = its routing weight (stored by tile 0: ids[p], wts[p])
        -> gate, up [BLOCK_N] = w13[e, rows(j)] . x[t]  (+ b13)   streamed in BLOCK_K chunks
        -> inter[p, j*BLOCK_N : (j+1)*BLOCK_N] = act(gate, up)     float32
Launch 2, `down_kernel`, grid (T, cdiv(H, BLOCK_H)):
    program (token t, tile j): out[t, rows(j)] = sum_s wts[t, s] * (w2[e_s, rows(j)] . inter[t, s] + b2)
    The k experts are summed inside one program, in slot order: deterministic, no atomics.

Each weight-streaming loop (over H in launch 1, over I per expert in launch 2) is either
a `tl.range` loop pipelined STAGES deep, or, with UNROLL, fully unrolled straight-line
code whose loads can all be in flight at once (worth it when the loop is short, e.g. I=360).

Shapes and the spec's choices (E, top_k, H, I, activation, routing, bias) are constexpr:
one compiled kernel per layer shape, and the compiler knows the row strides (H, I) for
wide vectorized loads. Tile sizes, warps and pipeline stages are constexpr too but come
from `launch.SmallBatchConfig`, never from here.

Design trade-off: one program per (token, expert) pair, not per expert. Tokens that share
an expert each stream its rows, but with the pair axis fastest those programs run at the
same time, so the repeat reads come from L2: HBM traffic stays near the touched-experts
floor while L2-to-SM traffic and the CUDA-core FMAs grow with T * top_k. That is what
limits it to small T (about 32): beyond, grouped GEMMs (tokens sorted by expert, each
weight tile read once into tensor-core tiles) win. Grouping here would need the T*k ids
sorted or compacted by expert (another launch, or a scan in every program). Routing is
likewise recomputed by every gate/up program (E logits) instead of costing a launch.

PDL (programmatic dependent launch, Hopper and newer; `SmallBatchConfig.pdl`): gate_up lets
its dependent start at once (`gdc_launch_dependents`) and down, launched with `launch_pdl`,
waits (`gdc_wait`) for gate_up's completion and memory before its first read of gate_up's
outputs, so down's launch and start-up overlap gate_up's tail instead of following it.

Rows past the end of a tile (I or H not a multiple of the block) are clamped to the
last valid row instead of masked: the loads stay unmasked and vectorized, and the
duplicate rows are dropped by the masked store.
"""

import triton
import triton.language as tl


@triton.jit
def _gate_up_chunk(
    acc_gate,
    acc_up,
    x_row,
    w_expert,
    gate_rows,
    up_rows,
    k0,
    H: tl.constexpr,
    BLOCK_K: tl.constexpr,
    TILED: tl.constexpr,
):
    """acc_* [BLOCK_N, BLOCK_K] += w13 rows [BLOCK_N, k0 : k0 + BLOCK_K] * x [k0 : k0 + BLOCK_K].

    TILED (unrolled or unpipelined code): x is loaded at full tile shape, every row the
    same addresses (served by L1), so it has the weight tiles' layout; as a vector it
    would need a shared-memory layout conversion per chunk. A pipelined loop stages the
    vector itself; there the copies would cost L2 traffic (cp.async.cg bypasses L1).
    """
    offs_k = k0 + tl.arange(0, BLOCK_K)[None, :]  # [1, BLOCK_K]
    x_ptrs = x_row + offs_k + 0 * gate_rows[:, None] if TILED else x_row + offs_k  # [BLOCK_N or 1, BLOCK_K]
    gate_ptrs = w_expert + gate_rows[:, None] * H + offs_k  # [BLOCK_N, BLOCK_K]
    up_ptrs = w_expert + up_rows[:, None] * H + offs_k  # [BLOCK_N, BLOCK_K]
    if H % BLOCK_K == 0:
        x = tl.load(x_ptrs)
        w_gate = tl.load(gate_ptrs)
        w_up = tl.load(up_ptrs)
    else:
        x = tl.load(x_ptrs, mask=offs_k < H, other=0.0)
        w_gate = tl.load(gate_ptrs, mask=offs_k < H, other=0.0)
        w_up = tl.load(up_ptrs, mask=offs_k < H, other=0.0)
    x = x.to(tl.float32)
    return acc_gate + w_gate.to(tl.float32) * x, acc_up + w_up.to(tl.float32) * x


@triton.jit
def _down_chunk(acc, a_row, weight, w_expert, rows, i0, I: tl.constexpr, BLOCK_I: tl.constexpr, TILED: tl.constexpr):
    """acc [BLOCK_H, BLOCK_I] += w2 rows [BLOCK_H, i0 : i0 + BLOCK_I] * (weight * inter [i0 : i0 + BLOCK_I]).

    TILED: the intermediate row is loaded at full tile shape (see `_gate_up_chunk`).
    """
    offs_i = i0 + tl.arange(0, BLOCK_I)[None, :]  # [1, BLOCK_I]
    a_ptrs = a_row + offs_i + 0 * rows[:, None] if TILED else a_row + offs_i  # [BLOCK_H or 1, BLOCK_I]
    w_ptrs = w_expert + rows[:, None] * I + offs_i  # [BLOCK_H, BLOCK_I]
    if I % BLOCK_I == 0:
        a = tl.load(a_ptrs)  # float32
        w = tl.load(w_ptrs)
    else:
        a = tl.load(a_ptrs, mask=offs_i < I, other=0.0)
        w = tl.load(w_ptrs, mask=offs_i < I, other=0.0)
    return acc + w.to(tl.float32) * (weight * a)


@triton.jit
def gate_up_kernel(
    x_ptr,  # [T, H] spec.dtype: hidden states
    logits_ptr,  # [T, E] spec.dtype: router logits
    w13_ptr,  # [E, 2I, H] spec.dtype
    b13_ptr,  # [E, 2I] float32 (any tensor when not HAS_BIAS: never read)
    inter_ptr,  # [T * TOP_K, I] float32: activation output per (token, slot)
    ids_ptr,  # [T * TOP_K] int32: expert id per (token, slot)
    wts_ptr,  # [T * TOP_K] float32: routing weight per (token, slot)
    E: tl.constexpr,
    E_PAD: tl.constexpr,  # next power of two >= E
    TOP_K: tl.constexpr,
    H: tl.constexpr,
    I: tl.constexpr,
    RENORMALIZE: tl.constexpr,  # weights sum to 1 over the top-k (else: softmax over all E)
    SWIGLU: tl.constexpr,  # GPT-OSS SwiGLU on interleaved rows; else SiLU-and-mul on halves
    ALPHA: tl.constexpr,
    LIMIT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    STAGES: tl.constexpr,
    UNROLL: tl.constexpr,
    PDL: tl.constexpr,  # let the dependent down launch start now (it waits for our results itself)
):
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
    pair = tl.program_id(0)
    tile = tl.program_id(1)
    token = pair // TOP_K
    slot = pair % TOP_K

    # ---- routing of this token (every program redoes it: E logits, cheaper than a launch)
    # One max-reduction per slot: key = (order-preserving int of the logit) << 32 | (E_PAD - 1 - e),
    # so the max key is the largest logit, and on ties the lowest expert id.
    offs_e = tl.arange(0, E_PAD)
    logits = tl.load(logits_ptr + token.to(tl.int64) * E + offs_e, mask=offs_e < E, other=float("-inf"))
    logits = logits.to(tl.float32)  # [E_PAD]
    bits = logits.to(tl.int32, bitcast=True)
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # signed-int order == float order
    keys = (ordered.to(tl.int64) << 32) | (E_PAD - 1 - offs_e).to(tl.int64)  # [E_PAD]
    none = -(2**63)  # below every real key
    keys = tl.where(offs_e < E, keys, none)
    expert = 0  # this program's expert id
    chosen = 0.0  # exp(logit - top) of this program's expert
    selected_sum = 0.0  # sum over the top-k of exp(logit - top)
    for s in tl.static_range(TOP_K):
        best_key = tl.max(keys, axis=0)
        idx = E_PAD - 1 - (best_key & 0xFFFFFFFF).to(tl.int32)
        best_ordered = (best_key >> 32).to(tl.int32)
        best = (best_ordered ^ ((best_ordered >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)
        if s == 0:
            top = best
        keys = tl.where(offs_e == idx, none, keys)
        p = tl.exp(best - top)
        selected_sum += p
        expert = tl.where(slot == s, idx, expert)
        chosen = tl.where(slot == s, p, chosen)
    if RENORMALIZE:
        weight = chosen / selected_sum
    else:
        weight = chosen / tl.sum(tl.where(offs_e < E, tl.exp(logits - top), 0.0), axis=0)
    if tile == 0:
        tl.store(ids_ptr + pair, expert)
        tl.store(wts_ptr + pair, weight)

    # ---- gate and up rows of this tile, dot the token's hidden state
    offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)  # intermediate columns [BLOCK_N]
    cols = tl.minimum(offs_n, I - 1)
    if SWIGLU:
        gate_rows = 2 * cols  # rows interleaved [g0, u0, g1, u1, ...]
        up_rows = gate_rows + 1
    else:
        gate_rows = cols  # rows [gate (I) | up (I)]
        up_rows = cols + I
    w_expert = w13_ptr + expert.to(tl.int64) * (2 * I * H)
    x_row = x_ptr + token.to(tl.int64) * H
    acc_gate = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    if UNROLL:  # straight-line code: every chunk's loads can be in flight at once
        for k0 in tl.static_range(0, H, BLOCK_K):
            acc_gate, acc_up = _gate_up_chunk(
                acc_gate, acc_up, x_row, w_expert, gate_rows, up_rows, k0, H, BLOCK_K, True
            )
    else:  # a loop, software-pipelined STAGES deep
        for k0 in tl.range(0, H, BLOCK_K, num_stages=STAGES):
            acc_gate, acc_up = _gate_up_chunk(
                acc_gate, acc_up, x_row, w_expert, gate_rows, up_rows, k0, H, BLOCK_K, STAGES == 1
            )
    gate = tl.sum(acc_gate, axis=1)  # [BLOCK_N]
    up = tl.sum(acc_up, axis=1)  # [BLOCK_N]
    if HAS_BIAS:
        b_expert = b13_ptr + expert.to(tl.int64) * (2 * I)
        gate += tl.load(b_expert + gate_rows)
        up += tl.load(b_expert + up_rows)
    if SWIGLU:
        gate = tl.minimum(gate, LIMIT)
        up = tl.minimum(tl.maximum(up, -LIMIT), LIMIT)
        act = gate * tl.sigmoid(ALPHA * gate) * (up + 1.0)
    else:
        act = gate * tl.sigmoid(gate) * up
    tl.store(inter_ptr + pair.to(tl.int64) * I + offs_n, act, mask=offs_n < I)


@triton.jit
def down_kernel(
    inter_ptr,  # [T * TOP_K, I] float32
    ids_ptr,  # [T * TOP_K] int32
    wts_ptr,  # [T * TOP_K] float32
    w2_ptr,  # [E, H, I] spec.dtype
    b2_ptr,  # [E, H] float32 (any tensor when not HAS_BIAS: never read)
    out_ptr,  # [T, H] spec.dtype
    TOP_K: tl.constexpr,
    H: tl.constexpr,
    I: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_I: tl.constexpr,
    STAGES: tl.constexpr,
    UNROLL: tl.constexpr,
    PDL: tl.constexpr,  # launched with launch_pdl: wait for gate_up before reading its outputs
):
    token = tl.program_id(0)
    tile = tl.program_id(1)
    offs_h = tile * BLOCK_H + tl.arange(0, BLOCK_H)  # output columns [BLOCK_H]
    rows = tl.minimum(offs_h, H - 1)
    if PDL:
        tl.extra.cuda.gdc_wait()
    # One accumulator for all k experts: the routing weight scales the intermediate row
    # ([BLOCK_I] multiplies) so a single reduction at the end gives the weighted sum.
    acc = tl.zeros([BLOCK_H, BLOCK_I], dtype=tl.float32)
    bias = tl.zeros([BLOCK_H], dtype=tl.float32)
    for s in tl.static_range(TOP_K):
        pair = token * TOP_K + s
        expert = tl.load(ids_ptr + pair)
        weight = tl.load(wts_ptr + pair)
        w_expert = w2_ptr + expert.to(tl.int64) * (H * I)
        a_row = inter_ptr + pair.to(tl.int64) * I
        if UNROLL:
            for i0 in tl.static_range(0, I, BLOCK_I):
                acc = _down_chunk(acc, a_row, weight, w_expert, rows, i0, I, BLOCK_I, True)
        else:
            for i0 in tl.range(0, I, BLOCK_I, num_stages=STAGES):
                acc = _down_chunk(acc, a_row, weight, w_expert, rows, i0, I, BLOCK_I, STAGES == 1)
        if HAS_BIAS:
            bias += weight * tl.load(b2_ptr + expert.to(tl.int64) * H + rows)
    out = tl.sum(acc, axis=1) + bias  # [BLOCK_H]
    tl.store(out_ptr + token.to(tl.int64) * H + offs_h, out.to(out_ptr.dtype.element_ty), mask=offs_h < H)
