"""Reference implementations for the temporal token merging hot path."""

from __future__ import annotations

import torch

# torch.nn.functional.cosine_similarity's default eps; the formula below is its documented one.
EPS = 1e-8


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for 16- and 32-bit inputs; float64 stays float64 (for gradcheck)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def paired_similarity(x: torch.Tensor, lag: int = 1) -> torch.Tensor:
    """Cosine similarity of token (t, n) with token (t - lag, n).

    x: [B, T, N, C] float. Returns fp32 (fp64 for fp64 x) [B, T - lag, N] where out[:, t] compares frame t + lag with
    frame t, as ``F.cosine_similarity(x[:, lag:], x[:, :-lag], dim=-1)`` does:
    dot(a, b) / (max(|a|, eps) * max(|b|, eps)), eps = 1e-8, so a zero-norm token gives 0.
    """
    xf = x.to(accumulation_dtype(x.dtype))
    norms = torch.linalg.vector_norm(xf, dim=-1).clamp_min(EPS)  # each token's norm, once
    dot = torch.linalg.vecdot(xf[:, lag:], xf[:, :-lag])
    return dot / (norms[:, lag:] * norms[:, :-lag])


def paired_similarity_backward(grad: torch.Tensor, x: torch.Tensor, lag: int = 1) -> torch.Tensor:
    """Gradient of ``paired_similarity`` with respect to x, in x's dtype.

    With |v|_e = max(|v|, eps): d cos(a, b)/da = b / (|a|_e |b|_e) - [|a| > eps] * cos * a / |a|^2.
    Frame t is the "a" of output t - lag and the "b" of output t; both terms land in grad_x[:, t].
    """
    xf = x.to(accumulation_dtype(x.dtype))
    grad = grad.to(xf.dtype)
    norms = torch.linalg.vector_norm(xf, dim=-1)
    clamped = norms.clamp_min(EPS)
    # 1/|v|^2 where the norm is not clamped, 0 where it is (the clamp has no gradient there).
    inv_sq = torch.where(norms > EPS, clamped.reciprocal().square(), torch.zeros_like(norms))
    a, b = xf[:, lag:], xf[:, :-lag]
    inv_denom = (clamped[:, lag:] * clamped[:, :-lag]).reciprocal()
    cos = torch.linalg.vecdot(a, b) * inv_denom
    g_cross = (grad * inv_denom).unsqueeze(-1)
    g_cos = grad * cos
    grad_x = torch.zeros_like(xf)
    grad_x[:, lag:] += g_cross * b - (g_cos * inv_sq[:, lag:]).unsqueeze(-1) * a
    grad_x[:, :-lag] += g_cross * a - (g_cos * inv_sq[:, :-lag]).unsqueeze(-1) * b
    return grad_x.to(x.dtype)
