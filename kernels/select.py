"""Triton kernels for similarity-based frame selection.

frame_scores: the fused scan. For frame embeddings x [B, T, C] and queries q [B, Q, C], one program
owns BLOCK_T frames of one video and BLOCK_Q queries and streams the channels in BLOCK_C chunks:
  - relevance tile [BLOCK_T, BLOCK_Q] = x_tile @ q_tile^T with tl.dot (fp32 accumulation; fp32
    inputs use IEEE fp32 products, not TF32),
  - |x_t|^2 of its frames (every program needs them to normalise its relevance),
  - and, in the programs of the first query block only, dot(x_t, x_{t+1}) and |x_{t+1}|^2 for the
    adjacent cosine (the shifted tile is the same rows one frame later: L1/L2 hits).
Programs are numbered with the query block fastest, so the programs that re-read one frame tile for
further query blocks run back to back and find it in L2: x is read from HBM once for any Q.
Cosines follow F.cosine_similarity: dot / (max(|a|, eps) * max(|b|, eps)). Frames at
t >= lengths[b] are padding: relevance -inf, adjacent NaN for pairs touching them, norms 0.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .common import TRITON_DTYPES, AotCase, meta, on_tensor_device

EPS = tl.constexpr(1e-8)  # F.cosine_similarity's default eps
# BLOCK_Q = 16 is tl.dot's smallest N; wasted MMA columns cost nothing in this memory-bound scan.
# Registers per thread grow ~16 per tile element a thread holds. From `python -m vidtok aot` (sm_90,
# registers / stack bytes): [64 x 64] x 4 warps took 168-255 registers and 528-1984 bytes of stack
# (spilled); [16 x 64] x 4: 128-255, fp32 with stack; [64 x 32] x 8 warps: 124-148, no stack. The
# latter holds 8 elements (16 bytes of 16-bit data) per thread and tile and re-reads each query tile
# once per 64 frames. Not yet timed on a GPU.
CONFIG = dict(BLOCK_T=64, BLOCK_Q=16, BLOCK_C=32, num_warps=8)


@triton.jit
def _frame_scores_kernel(
    x_ptr, q_ptr, len_ptr, rel_ptr, adj_ptr, norm_ptr,
    T, Q, C, n_tb, n_qb, scale, bias,
    sx_b, sx_t, sx_c, sq_b, sq_q, sq_c,
    HAS_Q: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    qb = pid % n_qb
    tb = (pid // n_qb) % n_tb
    b = pid // (n_qb * n_tb)
    length = tl.load(len_ptr + b)

    offs_t = tb * BLOCK_T + tl.arange(0, BLOCK_T)
    in_t = offs_t < T
    # the first query block also computes the adjacency (vector condition: the interpreter rejects
    # scalar-and-vector masks); other programs' shifted loads are predicated off
    first_qb = (tl.zeros([BLOCK_T], dtype=tl.int32) + qb) == 0
    in_next = (offs_t + 1 < T) & first_qb
    x_rows = x_ptr + b.to(tl.int64) * sx_b + offs_t.to(tl.int64)[:, None] * sx_t
    offs_q = qb * BLOCK_Q + tl.arange(0, BLOCK_Q)
    in_q = offs_q < Q
    q_rows = q_ptr + b.to(tl.int64) * sq_b + offs_q.to(tl.int64)[:, None] * sq_q

    xx = tl.zeros([BLOCK_T], dtype=tl.float32)
    ab = tl.zeros([BLOCK_T], dtype=tl.float32)
    bb = tl.zeros([BLOCK_T], dtype=tl.float32)
    qq = tl.zeros([BLOCK_Q], dtype=tl.float32)
    acc = tl.zeros([BLOCK_T, BLOCK_Q], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        in_c = offs_c < C
        cols = offs_c.to(tl.int64)[None, :] * sx_c
        xt = tl.load(x_rows + cols, mask=in_t[:, None] & in_c[None, :], other=0.0)
        xf = xt.to(tl.float32)
        xx += tl.sum(xf * xf, axis=1)
        xn = tl.load(x_rows + sx_t + cols, mask=in_next[:, None] & in_c[None, :], other=0.0).to(tl.float32)
        ab += tl.sum(xf * xn, axis=1)
        bb += tl.sum(xn * xn, axis=1)
        if HAS_Q:
            qt = tl.load(q_rows + offs_c.to(tl.int64)[None, :] * sq_c, mask=in_q[:, None] & in_c[None, :], other=0.0)
            qf = qt.to(tl.float32)
            qq += tl.sum(qf * qf, axis=1)
            if IEEE:
                acc = tl.dot(xf, tl.trans(qf), acc, input_precision="ieee")
            else:
                acc = tl.dot(xt, tl.trans(qt), acc)

    norm_x = tl.sqrt_rn(xx)
    nx = tl.maximum(norm_x, EPS)
    valid = offs_t < length
    out_t = b.to(tl.int64) * T + offs_t
    tl.store(norm_ptr + out_t, tl.where(valid, norm_x, 0.0), mask=in_t & first_qb)
    adj = tl.div_rn(ab, nx * tl.maximum(tl.sqrt_rn(bb), EPS))
    adj = tl.where(offs_t + 1 < length, adj, float("nan"))
    tl.store(adj_ptr + b.to(tl.int64) * (T - 1) + offs_t, adj, mask=in_next)
    if HAS_Q:
        nq = tl.maximum(tl.sqrt_rn(qq), EPS)
        rel = scale * tl.div_rn(acc, nx[:, None] * nq[None, :]) + bias
        rel = tl.where(valid[:, None], rel, float("-inf"))
        rel_ptrs = rel_ptr + (b.to(tl.int64) * Q + offs_q.to(tl.int64))[None, :] * T + offs_t[:, None]
        tl.store(rel_ptrs, rel, mask=in_t[:, None] & in_q[None, :])


@on_tensor_device
def frame_scores(x: torch.Tensor, query: torch.Tensor | None, scale: float, bias: float, lengths: torch.Tensor | None):
    """(relevance fp32 [B, Q, T], adjacent fp32 [B, T - 1], norms fp32 [B, T]); any strides."""
    B, T, C = x.shape
    Q = 0 if query is None else query.shape[1]
    relevance = torch.empty((B, Q, T), device=x.device, dtype=torch.float32)
    adjacent = torch.empty((B, max(T - 1, 0)), device=x.device, dtype=torch.float32)
    norms = torch.empty((B, T), device=x.device, dtype=torch.float32)
    if B * T == 0:
        return relevance, adjacent, norms
    if lengths is None:
        lengths = torch.full((B,), T, device=x.device, dtype=torch.int32)
    lengths = lengths.to(device=x.device, dtype=torch.int32).contiguous()
    cfg = CONFIG
    n_tb = triton.cdiv(T, cfg["BLOCK_T"])
    n_qb = max(triton.cdiv(Q, cfg["BLOCK_Q"]), 1)
    q = x if query is None else query  # an unused pointer when there is no query
    q_strides = (0, 0, 0) if query is None else query.stride()
    _frame_scores_kernel[(B * n_tb * n_qb,)](
        x, q, lengths, relevance, adjacent, norms,
        T, Q, C, n_tb, n_qb, float(scale), float(bias),
        *x.stride(), *q_strides,
        HAS_Q=query is not None, IEEE=x.dtype == torch.float32,
        BLOCK_T=cfg["BLOCK_T"], BLOCK_Q=cfg["BLOCK_Q"], BLOCK_C=cfg["BLOCK_C"], num_warps=cfg["num_warps"],
    )
    return relevance, adjacent, norms


def _aot_rows(rows: int, C: int, dtype: torch.dtype, layout: str) -> torch.Tensor:
    if layout == "contiguous":
        return meta(1, rows, C, dtype=dtype)
    return meta(1, rows, 2 * C, dtype=dtype)[..., ::2]


def _aot_cases() -> list[AotCase]:
    # 256 frames' embeddings (768 channels) scored against one query (a question), four (its
    # options) or none; contiguous, and views with every other channel.
    T, C = 256, 768
    cases = []
    for dtype, ty in TRITON_DTYPES.items():
        for layout, queries in (("contiguous", (1, 4, 0)), ("strided", (4, 0))):
            for Q in queries:
                query = _aot_rows(Q, C, dtype, layout) if Q else None
                name = f"frame_scores-{ty}-{f'query{Q}' if Q else 'noquery'}-{layout}"
                cases.append(AotCase(name, functools.partial(frame_scores, _aot_rows(T, C, dtype, layout), query, 1.0, 0.0, None)))
    return cases


AOT_CASES = _aot_cases()


# ---------------------------------------------------------------------------------------------------
# topk_per_frame: exactly budgets[b, t] tokens of every frame, the highest scores first, ties to the
# lower index; NaN ranks as -inf (only reachable inside vidtok.allow_nan()), as the reference's sort.
#
# One program per frame holds its N scores in registers (N <= MAX_N). Each score becomes a signed
# int32 key that orders as the float does: the float32 bits, with the 31 low bits flipped for
# negative numbers (-0.0 is made +0.0 and NaN -inf first, so they tie as they compare). The k-th largest key is found by bisection over the int32 range: 32 passes that
# each count the keys >= the midpoint (a register reduction, no memory traffic). Keys above it are
# kept; of the keys equal to it, the first k - (count above) in index order (a prefix count). The
# kept tokens' flat positions go to index[b, offset[b, t] + rank], offset being the frame's place
# in its video (from the budgets' prefix sum, the one other launch), and the last frame of each video
# writes the -1 padding after its video's total. Memory: one read of the scores, one byte of keep per
# token, 4 bytes per index slot.

MAX_N = 4096
TOPK_BLOCKS = (256, 1024, 4096)  # the BLOCK_N a launch picks: the smallest that holds N


def _topk_warps(block_n: int) -> int:
    # 8 keys per thread: one warp up to 256 tokens (the 32 counting reductions are warp shuffles
    # only), 4 warps for 1024 and 16 for 4096 (50-64 registers, no spills: `python -m vidtok aot`).
    return 1 if block_n <= 256 else block_n // 256


@triton.jit
def _topk_per_frame_kernel(
    s_ptr, k_ptr, cum_ptr, keep_ptr, idx_ptr,
    T, N, capacity, ss_b, ss_t,
    BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    b = pid // T
    t = pid % T
    offs = tl.arange(0, BLOCK_N)
    valid = offs < N
    x = tl.load(s_ptr + b.to(tl.int64) * ss_b + t.to(tl.int64) * ss_t + offs, mask=valid, other=0.0).to(tl.float32)
    x = tl.where(x == 0.0, 0.0, x)  # -0.0 -> +0.0
    x = tl.where(x != x, float("-inf"), x)  # NaN ranks as -inf
    bits = x.to(tl.int32, bitcast=True)
    key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    k = tl.load(k_ptr + pid).to(tl.int32)

    # largest lo with count(key >= lo) >= k (k = 0 ends at INT32_MAX, above every key: nothing kept)
    lo = tl.full((), -2147483648, tl.int64)
    hi = tl.full((), 2147483647, tl.int64)
    for _ in range(32):
        mid = lo + (hi - lo + 1) // 2
        count = tl.sum(((key.to(tl.int64) >= mid) & valid).to(tl.int32), axis=0)
        enough = count >= k
        lo = tl.where(enough, mid, lo)
        hi = tl.where(enough, hi, mid - 1)

    wide = key.to(tl.int64)
    above = (wide > lo) & valid
    tied = (wide == lo) & valid
    need = k - tl.sum(above.to(tl.int32), axis=0)
    keep = above | (tied & (tl.cumsum(tied.to(tl.int32), axis=0) <= need))
    tl.store(keep_ptr + pid.to(tl.int64) * N + offs, keep.to(tl.int8), mask=valid)

    rank = tl.cumsum(keep.to(tl.int32), axis=0) - 1
    end = tl.load(cum_ptr + pid)  # the video's kept tokens up to and including this frame
    slot = end - k + rank
    row = idx_ptr + b.to(tl.int64) * capacity
    tl.store(row + slot, t * N + offs, mask=keep & (slot < capacity))
    if t == T - 1:  # the video's padding after its total
        for start in range(end, capacity, BLOCK_N):
            pad = start + offs
            tl.store(row + pad, tl.full([BLOCK_N], -1, tl.int32), mask=pad < capacity)


def topk_per_frame_reasons(scores: torch.Tensor, budgets: torch.Tensor, capacity: int) -> list[str]:
    N = scores.shape[-1]
    if N > MAX_N:
        return [f"the Triton kernel holds a frame's tokens in registers, N <= {MAX_N}, got N = {N}"]
    return []


@on_tensor_device
def topk_per_frame(scores: torch.Tensor, budgets: torch.Tensor, capacity: int):
    """(keep bool [B, T, N], index int32 [B, capacity]); scores of any strides (a view whose token
    dim is not contiguous is copied first)."""
    B, T, N = scores.shape
    keep = torch.empty((B, T, N), device=scores.device, dtype=torch.uint8)  # every token is written
    if B * T * N == 0:
        return keep.view(torch.bool), torch.full((B, capacity), -1, device=scores.device, dtype=torch.int32)
    index = torch.empty((B, capacity), device=scores.device, dtype=torch.int32)  # every slot is written
    if scores.stride(-1) != 1:
        scores = scores.contiguous()
    k = budgets.to(device=scores.device, dtype=torch.int64).contiguous()
    cum = k.cumsum(1)  # where each frame's slots end in its video's index
    block = next(size for size in TOPK_BLOCKS if size >= N)
    _topk_per_frame_kernel[(B * T,)](
        scores, k, cum, keep, index, T, N, capacity, scores.stride(0), scores.stride(1),
        BLOCK_N=block, num_warps=_topk_warps(block),
    )
    return keep.view(torch.bool), index


def _topk_aot_cases() -> list[AotCase]:
    """The launcher on meta tensors: 8 videos of 256 frames, N tokens per frame reaching each BLOCK_N
    (196 ViT patches, 576 SigLIP tokens, 4096), a quarter of the tokens kept."""
    cases = []
    for dtype, ty in TRITON_DTYPES.items():
        for N in (196, 576, MAX_N):
            scores, budgets = meta(8, 256, N, dtype=dtype), meta(8, 256, dtype=torch.int64)
            cases.append(AotCase(f"topk_per_frame-{ty}-n{N}", functools.partial(topk_per_frame, scores, budgets, 256 * N // 4)))
    return cases


AOT_CASES = AOT_CASES + _topk_aot_cases()
