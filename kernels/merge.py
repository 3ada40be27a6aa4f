"""Triton kernels for the temporal token merging hot path.

paired_similarity: for x [B, T, N, C], out[b, t, n] = cos(x[b, t + lag, n], x[b, t, n]) in fp32,
dot / (max(|a|, eps) * max(|b|, eps)) as F.cosine_similarity. One program owns BLOCK_N tokens of
one output frame and streams their channels in BLOCK_C chunks, accumulating dot and both squared
norms in fp32 registers. Frame t is re-read as the partner of frame t + lag by programs launched
about N * lag / BLOCK_N programs later, so the second read hits L2: one HBM pass over x.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import TRITON_DTYPES, AotCase

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
    na = tl.maximum(tl.sqrt(tl.sum(aa, axis=1)), EPS)
    nb = tl.maximum(tl.sqrt(tl.sum(bb, axis=1)), EPS)
    tl.store(out_ptr + pid_bt.to(tl.int64) * N + offs_n, dot / (na * nb), mask=mask_n)


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
    norm_self = tl.sqrt(ss)
    ns = tl.maximum(norm_self, EPS)
    denom_prev = ns * tl.maximum(tl.sqrt(pp), EPS)
    denom_next = ns * tl.maximum(tl.sqrt(nn), EPS)
    g_row = grad_out_ptr + b.to(tl.int64) * T_out * N + offs_n
    # (scalar conditions broadcast to vectors: the interpreter rejects scalar-and-vector mask dtypes)
    zero = tl.zeros([BLOCK_N], dtype=tl.int32)
    g_prev = tl.load(g_row + t_prev.to(tl.int64) * N, mask=mask_n & (zero + t >= lag), other=0.0)
    g_next = tl.load(g_row + t.to(tl.int64) * N, mask=mask_n & (zero + t + lag < T), other=0.0)
    coef_prev = g_prev / denom_prev
    coef_next = g_next / denom_next
    coef_self = g_prev * (d_prev / denom_prev) + g_next * (d_next / denom_next)
    coef_self = tl.where(norm_self > EPS, coef_self / (ns * ns), 0.0)

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


def paired_similarity_fwd(x: torch.Tensor, lag: int) -> torch.Tensor:
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


def paired_similarity_bwd(grad_out: torch.Tensor, x: torch.Tensor, lag: int) -> torch.Tensor:
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


def _aot_cases() -> list[AotCase]:
    cases = []
    for dtype, ty in TRITON_DTYPES.items():
        for unit_stride in (True, False):  # contiguous channels (the fast path) and a general view
            stride_c = {"s_c": "constexpr"} if unit_stride else {"s_c": "i64"}
            unit = {"s_c": 1} if unit_stride else {}
            tag = f"{ty}-{'contiguous' if unit_stride else 'strided'}"
            cfg = FWD_CONFIG
            cases.append(AotCase(
                f"paired_similarity_fwd-{tag}", _paired_similarity_fwd_kernel,
                {"x_ptr": f"*{ty}", "out_ptr": "*fp32", "T_out": "i32", "N": "i32", "C": "i32", "lag": "i32",
                 "s_b": "i64", "s_t": "i64", "s_n": "i64", **stride_c, "BLOCK_N": "constexpr", "BLOCK_C": "constexpr"},
                {**unit, "BLOCK_N": cfg["BLOCK_N"], "BLOCK_C": cfg["BLOCK_C"]}, num_warps=cfg["num_warps"]))
            cfg = BWD_CONFIG
            cases.append(AotCase(
                f"paired_similarity_bwd-{tag}", _paired_similarity_bwd_kernel,
                {"x_ptr": f"*{ty}", "grad_out_ptr": "*fp32", "grad_x_ptr": f"*{ty}", "T": "i32", "N": "i32",
                 "C": "i32", "lag": "i32", "s_b": "i64", "s_t": "i64", "s_n": "i64", **stride_c,
                 "BLOCK_N": "constexpr", "BLOCK_C": "constexpr"},
                {**unit, "BLOCK_N": cfg["BLOCK_N"], "BLOCK_C": cfg["BLOCK_C"]}, num_warps=cfg["num_warps"]))
    return cases


AOT_CASES = _aot_cases()
