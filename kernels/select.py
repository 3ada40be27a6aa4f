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

import torch
import triton
import triton.language as tl

from .common import TRITON_DTYPES, AotCase, on_tensor_device

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


def _aot_cases() -> list[AotCase]:
    cases = []
    cfg = CONFIG
    for dtype, ty in TRITON_DTYPES.items():
        for has_q in (True, False):
            for unit_stride in (True, False):  # contiguous channels (the fast path) and a general view
                strides = {"sx_c": "constexpr", "sq_c": "constexpr"} if unit_stride else {"sx_c": "i64", "sq_c": "i64"}
                unit = {"sx_c": 1, "sq_c": 1} if unit_stride else {}
                tag = f"{ty}-{'query' if has_q else 'noquery'}-{'contiguous' if unit_stride else 'strided'}"
                cases.append(AotCase(
                    f"frame_scores-{tag}", _frame_scores_kernel,
                    {"x_ptr": f"*{ty}", "q_ptr": f"*{ty}", "len_ptr": "*i32", "rel_ptr": "*fp32", "adj_ptr": "*fp32",
                     "norm_ptr": "*fp32", "T": "i32", "Q": "i32", "C": "i32", "n_tb": "i32", "n_qb": "i32",
                     "scale": "fp32", "bias": "fp32", "sx_b": "i64", "sx_t": "i64", "sx_c": strides["sx_c"],
                     "sq_b": "i64", "sq_q": "i64", "sq_c": strides["sq_c"],
                     "HAS_Q": "constexpr", "IEEE": "constexpr",
                     "BLOCK_T": "constexpr", "BLOCK_Q": "constexpr", "BLOCK_C": "constexpr"},
                    {**unit, "HAS_Q": has_q, "IEEE": dtype == torch.float32,
                     "BLOCK_T": cfg["BLOCK_T"], "BLOCK_Q": cfg["BLOCK_Q"], "BLOCK_C": cfg["BLOCK_C"]},
                    num_warps=cfg["num_warps"]))
    return cases


AOT_CASES = _aot_cases()
