"""Triton kernels for the temporal token merging hot path.

paired_similarity: for x [B, T, N, C], out[b, t, n] = cos(x[b, t + lag, n], x[b, t, n]) in fp32,
dot / (max(|a|, eps) * max(|b|, eps)) as F.cosine_similarity. One program owns BLOCK_N tokens of
one output frame and streams their channels in BLOCK_C chunks, accumulating dot and both squared
norms in fp32 registers. Frame t is re-read as the partner of frame t + lag by programs launched
about N * lag / BLOCK_N programs later, so the second read hits L2: one HBM pass over x.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from vidtok.reference import merge as reference

from .common import TRITON_DTYPES, AotCase, meta, on_tensor_device

EPS = tl.constexpr(1e-8)  # F.cosine_similarity's default eps
# One configuration each. BLOCK_C = 128 elements is 256 contiguous bytes per token row in 16-bit.
# Register counts from `python -m vidtok aot` (sm_90): the forward at [16, 128] x 4 warps took 168,
# at [8, 128] x 4 warps 48; the backward (three token tiles and their pointers) took 166 at 4 warps
# and 80 at 8. Fewer registers mean more resident warps, hence more loads in flight for these
# bandwidth-bound kernels.
FWD_CONFIG = dict(BLOCK_N=8, BLOCK_C=128, num_warps=4)
BWD_CONFIG = dict(BLOCK_N=8, BLOCK_C=128, num_warps=8)


@triton.jit
def _paired_similarity_fwd_kernel(
    x_ptr, out_ptr, T_out, N, C, lag,
    s_b, s_t, s_n, s_c,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_bt = tl.program_id(0)  # b * T_out + t
    b = pid_bt // T_out
    t = pid_bt % T_out
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    rows = offs_n.to(tl.int64)[:, None] * s_n
    cur = x_ptr + b.to(tl.int64) * s_b + (t + lag).to(tl.int64) * s_t + rows
    prev = x_ptr + b.to(tl.int64) * s_b + t.to(tl.int64) * s_t + rows

    ab = tl.zeros([BLOCK_N, BLOCK_C], dtype=tl.float32)
    aa = tl.zeros([BLOCK_N, BLOCK_C], dtype=tl.float32)
    bb = tl.zeros([BLOCK_N, BLOCK_C], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        cols = offs_c.to(tl.int64)[None, :] * s_c
        mask = mask_n[:, None] & (offs_c[None, :] < C)
        va = tl.load(cur + cols, mask=mask, other=0.0).to(tl.float32)
        vb = tl.load(prev + cols, mask=mask, other=0.0).to(tl.float32)
        ab += va * vb
        aa += va * va
        bb += vb * vb
    dot = tl.sum(ab, axis=1)
    na = tl.maximum(tl.sqrt_rn(tl.sum(aa, axis=1)), EPS)
    nb = tl.maximum(tl.sqrt_rn(tl.sum(bb, axis=1)), EPS)
    tl.store(out_ptr + pid_bt.to(tl.int64) * N + offs_n, tl.div_rn(dot, na * nb), mask=mask_n)


@triton.jit
def _paired_similarity_bwd_kernel(
    x_ptr, grad_out_ptr, grad_x_ptr, T, N, C, lag,
    s_b, s_t, s_n, s_c,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # Token (t, n) is "a" of output pair t - lag and "b" of output pair t: both gradient terms are
    # gathered here, so every grad_x element is written once (no atomics, deterministic).
    pid_bt = tl.program_id(0)  # b * T + t
    b = pid_bt // T
    t = pid_bt % T
    T_out = T - lag
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    t_prev = tl.where(t >= lag, t - lag, t)  # a missing neighbour reads the token itself, weight 0
    t_next = tl.where(t + lag < T, t + lag, t)
    rows = offs_n.to(tl.int64)[:, None] * s_n
    base = x_ptr + b.to(tl.int64) * s_b + rows
    self_p = base + t.to(tl.int64) * s_t
    prev_p = base + t_prev.to(tl.int64) * s_t
    next_p = base + t_next.to(tl.int64) * s_t

    # Row sums reduced every chunk (not 2-D accumulators): five [BLOCK_N, BLOCK_C] fp32 tiles plus
    # three loaded ones took ~160 registers on sm_90.
    d_prev = tl.zeros([BLOCK_N], dtype=tl.float32)
    d_next = tl.zeros([BLOCK_N], dtype=tl.float32)
    ss = tl.zeros([BLOCK_N], dtype=tl.float32)
    pp = tl.zeros([BLOCK_N], dtype=tl.float32)
    nn = tl.zeros([BLOCK_N], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        cols = offs_c.to(tl.int64)[None, :] * s_c
        mask = mask_n[:, None] & (offs_c[None, :] < C)
        vs = tl.load(self_p + cols, mask=mask, other=0.0).to(tl.float32)
        vp = tl.load(prev_p + cols, mask=mask, other=0.0).to(tl.float32)
        vn = tl.load(next_p + cols, mask=mask, other=0.0).to(tl.float32)
        d_prev += tl.sum(vs * vp, axis=1)
        d_next += tl.sum(vs * vn, axis=1)
        ss += tl.sum(vs * vs, axis=1)
        pp += tl.sum(vp * vp, axis=1)
        nn += tl.sum(vn * vn, axis=1)
    norm_self = tl.sqrt_rn(ss)
    ns = tl.maximum(norm_self, EPS)
    denom_prev = ns * tl.maximum(tl.sqrt_rn(pp), EPS)
    denom_next = ns * tl.maximum(tl.sqrt_rn(nn), EPS)
    g_row = grad_out_ptr + b.to(tl.int64) * T_out * N + offs_n
    # (scalar conditions broadcast to vectors: the interpreter rejects scalar-and-vector mask dtypes)
    zero = tl.zeros([BLOCK_N], dtype=tl.int32)
    g_prev = tl.load(g_row + t_prev.to(tl.int64) * N, mask=mask_n & (zero + t >= lag), other=0.0)
    g_next = tl.load(g_row + t.to(tl.int64) * N, mask=mask_n & (zero + t + lag < T), other=0.0)
    coef_prev = tl.div_rn(g_prev, denom_prev)
    coef_next = tl.div_rn(g_next, denom_next)
    coef_self = g_prev * tl.div_rn(d_prev, denom_prev) + g_next * tl.div_rn(d_next, denom_next)
    coef_self = tl.where(norm_self > EPS, tl.div_rn(coef_self, ns * ns), 0.0)

    out_row = grad_x_ptr + pid_bt.to(tl.int64) * N * C + offs_n.to(tl.int64)[:, None] * C
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        cols = offs_c.to(tl.int64)[None, :] * s_c
        mask = mask_n[:, None] & (offs_c[None, :] < C)
        vs = tl.load(self_p + cols, mask=mask, other=0.0).to(tl.float32)
        vp = tl.load(prev_p + cols, mask=mask, other=0.0).to(tl.float32)
        vn = tl.load(next_p + cols, mask=mask, other=0.0).to(tl.float32)
        g = coef_prev[:, None] * vp + coef_next[:, None] * vn - coef_self[:, None] * vs
        tl.store(out_row + offs_c[None, :], g.to(grad_x_ptr.dtype.element_ty), mask=mask)


@on_tensor_device
def paired_similarity(x: torch.Tensor, lag: int) -> torch.Tensor:
    """fp32 [B, T - lag, N] cosine similarities; x [B, T, N, C] may be any strided view."""
    B, T, N, C = x.shape
    out = torch.empty((B, T - lag, N), device=x.device, dtype=torch.float32)
    if out.numel() == 0:
        return out
    cfg = FWD_CONFIG
    grid = (B * (T - lag), triton.cdiv(N, cfg["BLOCK_N"]))
    _paired_similarity_fwd_kernel[grid](
        x, out, T - lag, N, C, lag, *x.stride(),
        BLOCK_N=cfg["BLOCK_N"], BLOCK_C=cfg["BLOCK_C"], num_warps=cfg["num_warps"],
    )
    return out


@on_tensor_device
def paired_similarity_backward(grad_out: torch.Tensor, x: torch.Tensor, lag: int) -> torch.Tensor:
    """Contiguous grad_x [B, T, N, C] in x's dtype from grad_out [B, T - lag, N]."""
    B, T, N, C = x.shape
    grad_out = grad_out.to(torch.float32).contiguous()
    grad_x = torch.empty((B, T, N, C), device=x.device, dtype=x.dtype)
    if grad_x.numel() == 0:
        return grad_x
    cfg = BWD_CONFIG
    grid = (B * T, triton.cdiv(N, cfg["BLOCK_N"]))
    _paired_similarity_bwd_kernel[grid](
        x, grad_out, grad_x, T, N, C, lag, *x.stride(),
        BLOCK_N=cfg["BLOCK_N"], BLOCK_C=cfg["BLOCK_C"], num_warps=cfg["num_warps"],
    )
    return grad_x


# Realistic inputs of the AOT cases: ViT-B/16 tokens of 16 frames at 224 x 224 (14 x 14 per frame, 768
# channels), contiguous or a view with every other channel (last stride 2).
AOT_T, AOT_GRID, AOT_C = 16, (14, 14), 768


def _aot_tokens(*shape: int, dtype: torch.dtype, layout: str) -> torch.Tensor:
    if layout == "contiguous":
        return meta(*shape, dtype=dtype)
    return meta(*shape[:-1], 2 * shape[-1], dtype=dtype)[..., ::2]


def _paired_similarity_both(x: torch.Tensor, lag: int) -> None:
    paired_similarity_backward(paired_similarity(x, lag), x, lag)


def _aot_cases() -> list[AotCase]:
    n = AOT_GRID[0] * AOT_GRID[1]
    return [
        AotCase(f"paired_similarity-{ty}-{layout}",
                functools.partial(_paired_similarity_both, _aot_tokens(1, AOT_T, n, AOT_C, dtype=dtype, layout=layout), 1))
        for dtype, ty in TRITON_DTYPES.items()
        for layout in ("contiguous", "strided")
    ]


AOT_CASES = _aot_cases()


# ---------------------------------------------------------------------------------------------------
# match: for each row of a [B, M, D], its most cosine-similar row of b [B, K, D].
#
# One program owns BLOCK_M rows of a and walks b in BLOCK_K tiles: tensor-core dot products over D in
# BLOCK_D chunks (fp32 accumulation), the squared norms of the b tile from the same loads, then a
# running max/argmax per row. The [M, K] matrix never leaves registers. With group ids, a b tile whose
# group range cannot meet the a tile's is skipped. Ties: a later tile must be strictly better, and
# within a tile the lowest column of the maximum wins, so the lowest index wins overall.

# Registers from the offline compile (sm_90, fp16, contiguous): [64, 64] tiles with BLOCK_D=64 at 4 warps
# took 255, BLOCK_D=32 at 8 warps 128 (fp32 155, strided with groups 148), without spills.
MATCH_CONFIG = dict(BLOCK_M=64, BLOCK_K=64, BLOCK_D=32, num_warps=8)
NEG_INF = tl.constexpr(float("-inf"))
INT_MAX = tl.constexpr(2**31 - 1)
INT_MIN = tl.constexpr(-(2**31))


@triton.jit
def _match_kernel(
    a_ptr, b_ptr, ag_ptr, bg_ptr, score_ptr, idx_ptr, M, K, D,
    s_ab, s_am, s_ad, s_bb, s_bk, s_bd, s_agb, s_agm, s_bgb, s_bgk,
    HAS_GROUPS: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    num_m = tl.cdiv(M, BLOCK_M)
    b = tl.program_id(0) // num_m
    offs_m = (tl.program_id(0) % num_m) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    a_rows = a_ptr + b.to(tl.int64) * s_ab + offs_m.to(tl.int64)[:, None] * s_am
    b_base = b_ptr + b.to(tl.int64) * s_bb

    # norms of the a rows, once
    sq_a = tl.zeros([BLOCK_M], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        va = tl.load(a_rows + offs_d.to(tl.int64)[None, :] * s_ad,
                     mask=mask_m[:, None] & (offs_d[None, :] < D), other=0.0).to(tl.float32)
        sq_a += tl.sum(va * va, axis=1)
    norm_a = tl.maximum(tl.sqrt_rn(sq_a), EPS)

    if HAS_GROUPS:
        ga = tl.load(ag_ptr + b.to(tl.int64) * s_agb + offs_m.to(tl.int64) * s_agm, mask=mask_m, other=0)
        ga_lo = tl.min(tl.where(mask_m, ga, INT_MAX), axis=0)
        ga_hi = tl.max(tl.where(mask_m, ga, INT_MIN), axis=0)

    best = tl.full([BLOCK_M], NEG_INF, dtype=tl.float32)
    best_idx = tl.full([BLOCK_M], -1, dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        visit = True
        if HAS_GROUPS:
            gb = tl.load(bg_ptr + b.to(tl.int64) * s_bgb + offs_k.to(tl.int64) * s_bgk, mask=mask_k, other=0)
            gb_lo = tl.min(tl.where(mask_k, gb, INT_MAX), axis=0)
            gb_hi = tl.max(tl.where(mask_k, gb, INT_MIN), axis=0)
            visit = (gb_lo <= ga_hi) & (ga_lo <= gb_hi)
        if visit:
            dot = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
            sq_b = tl.zeros([BLOCK_K], dtype=tl.float32)
            b_cols = b_base + offs_k.to(tl.int64)[None, :] * s_bk
            for d0 in range(0, D, BLOCK_D):
                offs_d = d0 + tl.arange(0, BLOCK_D)
                mask_d = offs_d < D
                va = tl.load(a_rows + offs_d.to(tl.int64)[None, :] * s_ad,
                             mask=mask_m[:, None] & mask_d[None, :], other=0.0)
                vb = tl.load(b_cols + offs_d.to(tl.int64)[:, None] * s_bd,  # [BLOCK_D, BLOCK_K]: b transposed
                             mask=mask_d[:, None] & mask_k[None, :], other=0.0)
                dot = tl.dot(va, vb, dot, input_precision=PRECISION)
                vbf = vb.to(tl.float32)
                sq_b += tl.sum(vbf * vbf, axis=0)
            sim = tl.div_rn(dot, norm_a[:, None] * tl.maximum(tl.sqrt_rn(sq_b), EPS)[None, :])
            ok = mask_k[None, :] & (sim == sim)  # NaN similarities never match
            if HAS_GROUPS:
                ok = ok & (ga[:, None] == gb[None, :])
            sim = tl.where(ok, sim, NEG_INF)
            tile_best, tile_col = tl.max(sim, axis=1, return_indices=True, return_indices_tie_break_left=True)
            tile_idx = k0 + tile_col
            better = tile_best > best  # strictly: an earlier tile keeps its tie
            best = tl.where(better, tile_best, best)
            best_idx = tl.where(better, tile_idx, best_idx)
    out = b.to(tl.int64) * M + offs_m
    tl.store(score_ptr + out, best, mask=mask_m)
    tl.store(idx_ptr + out, best_idx, mask=mask_m)


@on_tensor_device
def match(a: torch.Tensor, b: torch.Tensor, a_group: torch.Tensor | None, b_group: torch.Tensor | None):
    """(score fp32 [B, M], idx int32 [B, M]); a [B, M, D], b [B, K, D] of one dtype, any strides;
    a_group/b_group int32 [B, M]/[B, K] or both None."""
    B, M, D = a.shape
    K = b.shape[1]
    score = torch.full((B, M), float("-inf"), device=a.device, dtype=torch.float32)
    idx = torch.full((B, M), -1, device=a.device, dtype=torch.int32)
    if score.numel() == 0 or K == 0:
        return score, idx
    has_groups = a_group is not None
    ag = a_group if has_groups else idx  # unused placeholders when there are no groups
    bg = b_group if has_groups else idx
    cfg = MATCH_CONFIG
    grid = (B * triton.cdiv(M, cfg["BLOCK_M"]),)
    _match_kernel[grid](
        a, b, ag, bg, score, idx, M, K, D, *a.stride(), *b.stride(),
        *(ag.stride() if has_groups else (0, 0)), *(bg.stride() if has_groups else (0, 0)),
        HAS_GROUPS=has_groups, PRECISION=_dot_precision(a.dtype),
        BLOCK_M=cfg["BLOCK_M"], BLOCK_K=cfg["BLOCK_K"], BLOCK_D=cfg["BLOCK_D"], num_warps=cfg["num_warps"],
    )
    return score, idx


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs use full-precision products ("ieee"), not TF32: indices must equal the reference's.
    return "ieee" if dtype == torch.float32 else "tf32"


def _aot_bipartite(metric: torch.Tensor, r: int) -> None:
    bipartite_assignment(metric, r, 0, "keep", None)  # defined below


def _match_aot_cases() -> list[AotCase]:
    # The three ways vidtok calls match: ToMe's alternating split of one frame sequence (rows of a
    # and b every other token), frame t against frame t - 1 (temporal_merge without a radius), and
    # group ids (per-frame matching of the public op).
    n = AOT_T * AOT_GRID[0] * AOT_GRID[1]
    per_frame = AOT_GRID[0] * AOT_GRID[1]
    cases = []
    for dtype, ty in TRITON_DTYPES.items():
        tokens = meta(1, n, AOT_C, dtype=dtype)
        frames = meta(AOT_T - 1, per_frame, AOT_C, dtype=dtype)
        groups = meta(1, n, dtype=torch.int32)
        cases += [
            AotCase(f"match-{ty}-bipartite", functools.partial(_aot_bipartite, tokens, n // 3)),
            AotCase(f"match-{ty}-frames", functools.partial(match, frames, frames, None, None)),
            AotCase(f"match-{ty}-groups", functools.partial(match, tokens, tokens, groups, groups)),
        ]
    return cases


AOT_CASES = AOT_CASES + _match_aot_cases()


# ---------------------------------------------------------------------------------------------------
# merge_tokens: a deterministic segmented reduction grouped by output slot.
#
# The launcher sorts the input positions by output slot (a stable sort, so each group's members come in
# position order) and finds each slot's [start, end) in that order. One program owns BLOCK_S output
# slots and BLOCK_C channels and walks their members in lockstep, accumulating in fp32 registers in
# that fixed order: no atomics, the same bits every run, each output written once.

# [16, 128] at 4 warps took 168 registers (sm_90), [8, 128] at 4 warps 80-109, at 8 warps 52-63.
MERGE_CONFIG = dict(BLOCK_S=8, BLOCK_C=128, num_warps=8)
MERGE_MODE_CODES = {"wmean": 0, "mean": 1, "sum": 2, "replace": 3}


@triton.jit
def _merge_tokens_kernel(
    x_ptr, size_ptr, perm_ptr, start_ptr, origin_ptr, out_ptr, size_out_ptr, N, L, C,
    s_xb, s_xn, s_xc, s_sb, s_sn,
    MODE: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # slot blocks on grid axis 0 (up to 2^31 - 1; axes 1 and 2 stop at 65,535): long videos keep
    # millions of slots
    offs_s = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
    b = tl.program_id(1)
    mask_s = offs_s < L
    offs_c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    x_base = x_ptr + b.to(tl.int64) * s_xb
    out_rows = out_ptr + (b.to(tl.int64) * L + offs_s)[:, None] * C + offs_c[None, :]
    mask = mask_s[:, None] & mask_c[None, :]
    starts = tl.load(start_ptr + b.to(tl.int64) * (L + 1) + offs_s, mask=mask_s, other=0)
    counts = tl.load(start_ptr + b.to(tl.int64) * (L + 1) + offs_s + 1, mask=mask_s, other=0) - starts
    acc = tl.zeros([BLOCK_S, BLOCK_C], dtype=tl.float32)
    total = tl.zeros([BLOCK_S], dtype=tl.float32)
    for i in range(0, tl.max(counts, axis=0)):
        live = mask_s & (i < counts)
        n = tl.load(perm_ptr + b.to(tl.int64) * N + starts + i, mask=live, other=0)
        s = tl.load(size_ptr + b.to(tl.int64) * s_sb + n.to(tl.int64) * s_sn, mask=live, other=0.0).to(tl.float32)
        total += s
        if MODE != 3:
            v = tl.load(x_base + n.to(tl.int64)[:, None] * s_xn + offs_c.to(tl.int64)[None, :] * s_xc,
                        mask=live[:, None] & mask_c[None, :], other=0.0).to(tl.float32)
            if MODE == 0:
                v = v * s[:, None]
            acc += v
    # a slot without members (padding, origin -1) gets zeros and size 0
    # (div_rn takes operands of one shape: the divisor is broadcast explicitly)
    if MODE == 0:
        acc = tl.div_rn(acc, tl.broadcast_to(tl.where(total > 0, total, 1.0)[:, None], (BLOCK_S, BLOCK_C)))
    if MODE == 1:
        acc = tl.div_rn(acc, tl.broadcast_to(tl.maximum(counts, 1).to(tl.float32)[:, None], (BLOCK_S, BLOCK_C)))
    if MODE == 3:  # replace: the representative's own value
        rep = tl.load(origin_ptr + b.to(tl.int64) * L + offs_s, mask=mask_s, other=-1)
        acc = tl.load(x_base + rep.to(tl.int64)[:, None] * s_xn + offs_c.to(tl.int64)[None, :] * s_xc,
                      mask=mask & (rep >= 0)[:, None], other=0.0).to(tl.float32)
    tl.store(out_rows, acc.to(out_ptr.dtype.element_ty), mask=mask)
    if tl.program_id(2) == 0:
        tl.store(size_out_ptr + b.to(tl.int64) * L + offs_s, total, mask=mask_s)


@on_tensor_device
def merge_tokens(x: torch.Tensor, size: torch.Tensor, index: torch.Tensor, origin: torch.Tensor, mode: str):
    """(out [B, L, C] in x's dtype, size_out fp32 [B, L]) from x [B, N, C] (any strides), size [B, N],
    index int32 [B, N] (slot of each token) and origin int32 [B, L]."""
    B, N, C = x.shape
    L = origin.shape[1]
    size = size.to(torch.float32)
    out = torch.empty((B, L, C), device=x.device, dtype=x.dtype)
    size_out = torch.zeros((B, L), device=x.device, dtype=torch.float32)
    if B * L == 0:
        return out, size_out
    order = torch.sort(index, dim=1, stable=True)
    perm = order.indices.to(torch.int32).contiguous()
    slots = torch.arange(L + 1, device=x.device, dtype=index.dtype).expand(B, L + 1).contiguous()
    starts = torch.searchsorted(order.values.contiguous(), slots).to(torch.int32).contiguous()
    cfg = MERGE_CONFIG
    grid = (triton.cdiv(L, cfg["BLOCK_S"]), B, max(triton.cdiv(C, cfg["BLOCK_C"]), 1))
    _merge_tokens_kernel[grid](
        x, size, perm, starts, origin.contiguous(), out, size_out, N, L, C, *x.stride(), *size.stride(),
        MODE=MERGE_MODE_CODES[mode], BLOCK_S=cfg["BLOCK_S"], BLOCK_C=cfg["BLOCK_C"], num_warps=cfg["num_warps"],
    )
    return out, size_out


def _merge_tokens_aot_cases() -> list[AotCase]:
    # ToMe's bipartite merge of 16 frames' tokens down to two thirds, every mode; wmean also on a view
    n = AOT_T * AOT_GRID[0] * AOT_GRID[1]
    kept = n - n // 3
    index, origin = meta(1, n, dtype=torch.int32), meta(1, kept, dtype=torch.int32)
    size = meta(1, n, dtype=torch.float32)
    return [
        AotCase(f"merge_tokens-{ty}-{mode}{'' if layout == 'contiguous' else '-strided'}",
                functools.partial(merge_tokens, _aot_tokens(1, n, AOT_C, dtype=dtype, layout=layout), size, index, origin, mode))
        for dtype, ty in TRITON_DTYPES.items()
        for mode in MERGE_MODE_CODES
        for layout in ("contiguous", "strided")
        if layout == "contiguous" or mode == "wmean"
    ]


AOT_CASES = AOT_CASES + _merge_tokens_aot_cases()


# ---------------------------------------------------------------------------------------------------
# window_links: token (t + lag, y, x)'s best match among tokens (t, y', x') within a Chebyshev radius.
#
# One program owns BLOCK_N tokens of one frame and visits the (2 radius + 1)^2 offsets in increasing
# candidate position (dy, then dx), streaming channels in BLOCK_C chunks: a strictly better candidate
# replaces the best, so ties keep the lowest position. The token's own rows are re-read per offset
# from L1/L2; the candidates of neighbouring tokens overlap, so one HBM pass over x is the aim.

# [8, 128] at 4 warps took 163 registers (sm_90), at 8 warps 76.
WINDOW_CONFIG = dict(BLOCK_N=8, BLOCK_C=128, num_warps=8)


@triton.jit
def _window_links_kernel(
    x_ptr, score_ptr, idx_ptr, T_out, N, C, lag, h, w, radius_h, radius_w,
    s_b, s_t, s_n, s_c,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_bt = tl.program_id(0)  # b * T_out + t
    b = pid_bt // T_out
    t = pid_bt % T_out
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    y = offs_n // w
    x = offs_n % w
    frame = x_ptr + b.to(tl.int64) * s_b
    cur = frame + (t + lag).to(tl.int64) * s_t + offs_n.to(tl.int64)[:, None] * s_n
    prev = frame + t.to(tl.int64) * s_t

    sq = tl.zeros([BLOCK_N], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        v = tl.load(cur + offs_c.to(tl.int64)[None, :] * s_c, mask=mask_n[:, None] & (offs_c[None, :] < C),
                    other=0.0).to(tl.float32)
        sq += tl.sum(v * v, axis=1)
    norm_cur = tl.maximum(tl.sqrt_rn(sq), EPS)

    best = tl.full([BLOCK_N], NEG_INF, dtype=tl.float32)
    best_idx = tl.full([BLOCK_N], -1, dtype=tl.int32)
    for dy in range(-radius_h, radius_h + 1):
        for dx in range(-radius_w, radius_w + 1):
            y2 = y + dy
            x2 = x + dx
            valid = mask_n & (y2 >= 0) & (y2 < h) & (x2 >= 0) & (x2 < w)
            n2 = tl.where(valid, y2 * w + x2, 0)
            cand = prev + n2.to(tl.int64)[:, None] * s_n
            dot = tl.zeros([BLOCK_N], dtype=tl.float32)
            sq2 = tl.zeros([BLOCK_N], dtype=tl.float32)
            for c0 in range(0, C, BLOCK_C):
                offs_c = c0 + tl.arange(0, BLOCK_C)
                cols = offs_c.to(tl.int64)[None, :] * s_c
                mask = valid[:, None] & (offs_c[None, :] < C)
                va = tl.load(cur + cols, mask=mask, other=0.0).to(tl.float32)
                vb = tl.load(cand + cols, mask=mask, other=0.0).to(tl.float32)
                dot += tl.sum(va * vb, axis=1)
                sq2 += tl.sum(vb * vb, axis=1)
            sim = tl.div_rn(dot, norm_cur * tl.maximum(tl.sqrt_rn(sq2), EPS))
            better = valid & (sim > best)  # NaN compares false: never better
            best = tl.where(better, sim, best)
            best_idx = tl.where(better, n2, best_idx)
    out = pid_bt.to(tl.int64) * N + offs_n
    tl.store(score_ptr + out, best, mask=mask_n)
    tl.store(idx_ptr + out, best_idx, mask=mask_n)


@on_tensor_device
def window_links(x: torch.Tensor, lag: int, radius: int, grid: tuple[int, int]):
    """(score fp32 [B, T - lag, N], idx int32 [B, T - lag, N]) for x [B, T, N, C], any strides."""
    B, T, N, C = x.shape
    h, w = grid
    score = torch.full((B, T - lag, N), float("-inf"), device=x.device, dtype=torch.float32)
    idx = torch.full((B, T - lag, N), -1, device=x.device, dtype=torch.int32)
    if score.numel() == 0:
        return score, idx
    cfg = WINDOW_CONFIG
    grid_ = (B * (T - lag), triton.cdiv(N, cfg["BLOCK_N"]))
    _window_links_kernel[grid_](
        x, score, idx, T - lag, N, C, lag, h, w, min(radius, h - 1), min(radius, w - 1), *x.stride(),
        BLOCK_N=cfg["BLOCK_N"], BLOCK_C=cfg["BLOCK_C"], num_warps=cfg["num_warps"],
    )
    return score, idx


def _window_links_aot_cases() -> list[AotCase]:
    n = AOT_GRID[0] * AOT_GRID[1]
    return [
        AotCase(f"window_links-{ty}-{layout}",
                functools.partial(window_links, _aot_tokens(1, AOT_T, n, AOT_C, dtype=dtype, layout=layout), 1, 2, AOT_GRID))
        for dtype, ty in TRITON_DTYPES.items()
        for layout in ("contiguous", "strided")
    ]


AOT_CASES = AOT_CASES + _window_links_aot_cases()


# ---------------------------------------------------------------------------------------------------
# The merges' assignment steps: the reference's ranking and forest resolution (a stable sort and
# pointer jumping, already device-wide tensor ops) around the kernels above.


def bipartite_assignment(metric: torch.Tensor, r: int, protect: int, order: str, a_mask: torch.Tensor | None):
    """vidtok.reference.merge.bipartite_assignment with the match kernel (with a_mask: its group ids
    keep A rows to B columns)."""
    return reference.bipartite_assignment(metric, r, protect, order, a_mask, match_fn=match)


def temporal_assignment(metric: torch.Tensor, threshold, r, lag: int, radius, grid: tuple[int, int],
                        segment_id: torch.Tensor | None, out_len: int | None):
    """vidtok.reference.merge.temporal_assignment with the kernels: links by paired_similarity
    (radius 0), window_links (radius > 0) or match (radius None)."""
    return reference.temporal_assignment(
        metric, threshold, r, lag, radius, grid, segment_id, out_len,
        match_fn=match, paired_fn=paired_similarity, window_fn=window_links,
    )
